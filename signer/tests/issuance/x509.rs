//! X.509 issuance against independent verifiers.

use std::sync::Arc;
use std::time::Duration;

use rcgen::PublicKeyData as _;
use signet::keys::KeySchemes as _;
use signet::keys::spki::SubjectKey;
use signet::keys::{AuthorityKey, KeyType, SoftwareKey};
use signet::spiffe::SpiffeId;
use signet::x509::{Authority, IntermediateRequest, LeafRequest, parse_and_verify_csr};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry;
use x509_parser::prelude::*;

use crate::common::*;

const WORKLOAD_KEYS: [KeyType; 4] = [
    KeyType::EcP256,
    KeyType::EcP384,
    KeyType::Rsa2048,
    KeyType::Ed25519,
];

fn ext<'a>(
    cert: &'a X509Certificate<'a>,
    oid: &x509_parser::der_parser::oid::Oid,
) -> (&'a ParsedExtension<'a>, bool) {
    let e = cert
        .get_extension_unique(oid)
        .unwrap()
        .unwrap_or_else(|| panic!("extension {oid} missing"));
    (e.parsed_extension(), e.critical)
}

fn ski(cert: &X509Certificate<'_>) -> Vec<u8> {
    match ext(cert, &oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER).0 {
        ParsedExtension::SubjectKeyIdentifier(k) => k.0.to_vec(),
        other => panic!("{other:?}"),
    }
}

fn aki(cert: &X509Certificate<'_>) -> Vec<u8> {
    match ext(cert, &oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER).0 {
        ParsedExtension::AuthorityKeyIdentifier(k) => k.key_identifier.as_ref().unwrap().0.to_vec(),
        other => panic!("{other:?}"),
    }
}

fn uris(cert: &X509Certificate<'_>) -> Vec<String> {
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .filter_map(|n| {
            if let GeneralName::URI(u) = n {
                Some(u.to_string())
            } else {
                None
            }
        })
        .collect()
}

fn check_serial(cert: &X509Certificate<'_>) {
    let raw = cert.raw_serial();
    assert!(
        raw.len() <= 17 && raw.len() >= 8,
        "serial length {}",
        raw.len()
    );
    assert!(raw[0] & 0x80 == 0, "serial must be positive");
}

/// Root, leaves of every workload key type, SPIRE CA and a leaf below it, for every authority key type.
pub fn x509_suite(factory: &dyn KeyFactory) {
    for kt in KeyType::ALL {
        let Some(root) = root(factory, kt) else {
            continue;
        };
        let root_der = root.cert_der().to_vec();
        let (_, rc) = parse_x509_certificate(&root_der).unwrap();
        let bc = rc.basic_constraints().unwrap().unwrap();
        assert!(
            bc.critical && bc.value.ca && bc.value.path_len_constraint.is_none(),
            "{kt}: root BC"
        );
        let ku = rc.key_usage().unwrap().unwrap();
        assert!(
            ku.critical
                && ku.value.key_cert_sign()
                && ku.value.crl_sign()
                && !ku.value.digital_signature()
        );
        assert_eq!(uris(&rc), vec!["spiffe://example.org"]);
        assert!(!ski(&rc).is_empty());
        assert!(rc.extended_key_usage().unwrap().is_none(), "no EKU on a CA");
        check_serial(&rc);
        let (ok, out) = openssl_verify(std::slice::from_ref(&root_der), &[], &root_der);
        assert!(ok, "{}: openssl rejects the root: {out}", factory.name());

        for wk in WORKLOAD_KEYS {
            let key = workload_key(wk);
            let id = format!("spiffe://example.org/ns/prod/sa/{}", wk.name());
            let csr_der = csr(
                &key,
                &[&id],
                &["svc.example.org"],
                rcgen::DistinguishedName::new(),
            );
            let csr = parse_and_verify_csr(&csr_der).unwrap();
            let req = LeafRequest::from_csr(&csr, Duration::from_secs(3600)).unwrap();
            let leaf = root.issue_x509_svid(&req, now()).unwrap();
            let (_, lc) = parse_x509_certificate(&leaf.der).unwrap();
            check_serial(&lc);
            let (_, san_critical) = ext(&lc, &oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME);
            assert!(san_critical, "empty subject => critical SAN");
            assert_eq!(aki(&lc), ski(&rc), "leaf AKI = root SKI");
            let ku = lc.key_usage().unwrap().unwrap();
            assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
            assert_eq!(
                ku.value.key_encipherment(),
                wk.is_rsa(),
                "keyEncipherment only for RSA keys"
            );
            let eku = lc.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.server_auth && eku.client_auth);
            assert!(!lc.basic_constraints().unwrap().unwrap().value.ca);
            let nb = lc.validity().not_before.timestamp();
            assert!(nb <= now().unix_timestamp() - 9, "NotBefore backdated");

            // Oracle 1: the spiffe crate.
            let svid = spiffe::X509Svid::parse_from_der(&leaf.der, &key.serialize_der())
                .unwrap_or_else(|e| panic!("{kt}/{wk}: spiffe crate rejects the leaf: {e}"));
            assert_eq!(svid.spiffe_id().to_string(), id);
            // Oracle 2: openssl, strict.
            let (ok, out) = openssl_verify(std::slice::from_ref(&root_der), &[], &leaf.der);
            assert!(ok, "{kt}/{wk}: openssl rejects the leaf: {out}");
        }

        // SPIRE's MintX509CA: CSR from a SPIRE server with its default subject.
        for spire_kt in [KeyType::EcP256, KeyType::EcP384] {
            spire_ca_case(&root, spire_kt);
        }
    }
}

/// Mint a CA for SPIRE under `authority`, check it, then have "SPIRE" sign a leaf under it and verify the chain.
pub fn spire_ca_case(authority: &Authority, spire_kt: KeyType) {
    let (spire_key, pkcs8) = SoftwareKey::generate(spire_kt).unwrap();
    let spire_rcgen = rcgen::KeyPair::try_from(pkcs8.0.as_slice()).unwrap();
    let csr_der = csr(
        &spire_rcgen,
        &["spiffe://example.org"],
        &[],
        spire_subject(),
    );
    let csr_subject = parse_and_verify_csr(&csr_der)
        .unwrap()
        .subject_der()
        .to_vec();
    let t0 = now();
    let minted = authority.mint_spire_ca(&csr_der, 0, None, t0).unwrap();
    assert_eq!(minted.upstream_x509_roots, authority.roots().to_vec());
    assert_eq!(minted.x509_ca_chain.len(), 1 + authority.chain().len());
    assert_eq!(&minted.x509_ca_chain[1..], authority.chain().as_slice());
    let ca_der = minted.x509_ca_chain[0].clone();
    let (_, cc) = parse_x509_certificate(&ca_der).unwrap();
    assert_eq!(
        cc.subject().as_raw(),
        csr_subject.as_slice(),
        "subject copied byte for byte"
    );
    let bc = cc.basic_constraints().unwrap().unwrap();
    // No constraint of its own (as SPIRE's upstream authorities); below a constrained CA, the most it allows.
    let expected = authority.path_len().map(|p| p - 1);
    assert!(bc.critical && bc.value.ca && bc.value.path_len_constraint == expected);
    let ku = cc.key_usage().unwrap().unwrap();
    assert!(
        ku.critical
            && ku.value.key_cert_sign()
            && ku.value.crl_sign()
            && !ku.value.digital_signature()
    );
    assert_eq!(uris(&cc), vec!["spiffe://example.org"]);
    assert!(!ski(&cc).is_empty());
    let (_, ic) = parse_x509_certificate(authority.cert_der()).unwrap();
    assert_eq!(aki(&cc), ski(&ic));
    let ttl = cc.validity().not_after.timestamp() - t0.unix_timestamp();
    assert_eq!(ttl, 3600, "TTL 0 means 1h");
    assert_eq!(
        cc.validity().not_before.timestamp(),
        t0.unix_timestamp() - 10
    );
    // spiffe crate: the CA must pass as a signing certificate in a chain (checked after the leaf below).
    let (ok, out) = openssl_verify(
        &minted.upstream_x509_roots,
        &minted.x509_ca_chain[1..],
        &ca_der,
    );
    assert!(ok, "openssl rejects the SPIRE CA: {out}");

    // Capped at the issuer's NotAfter.
    let long = authority
        .mint_spire_ca(&csr_der, i32::MAX, None, now())
        .unwrap();
    assert_eq!(
        long.not_after,
        authority.not_after(),
        "NotAfter capped at the issuer's"
    );

    // "SPIRE" signs a workload leaf with its new CA.
    let spire = Authority::new(
        ca_der.clone(),
        Arc::new(spire_key) as Arc<dyn AuthorityKey>,
        td(),
        minted.x509_ca_chain[1..].to_vec(),
        minted.upstream_x509_roots.clone(),
    )
    .unwrap();
    let wl = workload_key(KeyType::EcP256);
    let id = SpiffeId::parse("spiffe://example.org/workload").unwrap();
    let spki = SubjectKey::from_spki_der(&wl.subject_public_key_info()).unwrap();
    let req = LeafRequest::from_spki(id, spki.spki_der(), Duration::from_secs(600)).unwrap();
    let leaf = spire.issue_x509_svid(&req, now()).unwrap();
    let chain = spire.chain();
    assert_eq!(chain[0], ca_der);
    let (ok, out) = openssl_verify(&minted.upstream_x509_roots, &chain, &leaf.der);
    assert!(ok, "openssl rejects root -> SPIRE CA -> leaf: {out}");
    let mut full = leaf.der.clone();
    for c in &chain {
        full.extend_from_slice(c);
    }
    spiffe::X509Svid::parse_from_der(&full, &wl.serialize_der())
        .expect("spiffe crate accepts leaf + SPIRE CA");
}

#[test]
fn software_keys_issue_roots_leaves_and_spire_cas() {
    x509_suite(&SoftwareKeys);
}

#[test]
fn softhsm2_keys_issue_roots_leaves_and_spire_cas() {
    let Some(keys) = SoftHsmKeys::new() else {
        return;
    };
    x509_suite(&keys);
}

#[test]
fn three_level_chain_root_intermediate_spire_ca_leaf() {
    let root = root(&SoftwareKeys, KeyType::EcP384).unwrap();
    let (ikey, _) = SoftwareKey::generate(KeyType::EcP256).unwrap();
    let ikey: Arc<dyn AuthorityKey> = Arc::new(ikey);
    let req = IntermediateRequest {
        subject_key: SubjectKey::from_spki_der(ikey.spki_der()).unwrap(),
        subject: root_subject("issuing intermediate"),
        ttl: Duration::from_secs(6 * 3600),
        path_len: Some(1),
    };
    let inter = root.issue_intermediate(&req, now()).unwrap();
    let (ok, out) = openssl_verify(&[root.cert_der().to_vec()], &[], &inter.der);
    assert!(ok, "{out}");
    let inter = Authority::new(
        inter.der,
        ikey,
        td(),
        Vec::new(),
        vec![root.cert_der().to_vec()],
    )
    .unwrap();
    spire_ca_case(&inter, KeyType::EcP256);
}

/// The SPIRE CA's pathLen: the policy's value, a shorter one the CSR asks for, a refusal of a longer one; below a
/// constrained authority at most one less than its own.
#[test]
fn spire_ca_path_len_follows_policy_csr_and_authority() {
    use signet::x509::{IssueError, RequestedCa};
    let root = root(&SoftwareKeys, KeyType::EcP256).unwrap();
    assert_eq!(root.path_len(), None);
    assert_eq!(root.spire_ca_path_len(None, None).unwrap(), None);
    assert_eq!(root.spire_ca_path_len(Some(2), None).unwrap(), Some(2));
    assert_eq!(
        root.spire_ca_path_len(Some(2), Some(RequestedCa::PathLen(1)))
            .unwrap(),
        Some(1)
    );
    assert_eq!(
        root.spire_ca_path_len(None, Some(RequestedCa::PathLen(4)))
            .unwrap(),
        Some(4)
    );
    for asked in [RequestedCa::Unconstrained, RequestedCa::PathLen(3)] {
        let e = root.spire_ca_path_len(Some(2), Some(asked)).unwrap_err();
        assert!(
            matches!(e, IssueError::PathLenBeyondPolicy { allowed: 2, .. }),
            "{e}"
        );
        assert_eq!(e.rule(), "x509.path-len");
    }
    let below = |path_len: u8| {
        let (ikey, _) = SoftwareKey::generate(KeyType::EcP256).unwrap();
        let ikey: Arc<dyn AuthorityKey> = Arc::new(ikey);
        let req = IntermediateRequest {
            subject_key: SubjectKey::from_spki_der(ikey.spki_der()).unwrap(),
            subject: root_subject("constrained intermediate"),
            ttl: Duration::from_secs(3600),
            path_len: Some(path_len),
        };
        let der = root.issue_intermediate(&req, now()).unwrap().der;
        Authority::new(der, ikey, td(), Vec::new(), vec![root.cert_der().to_vec()]).unwrap()
    };
    let two = below(2);
    assert_eq!(two.path_len(), Some(2));
    assert_eq!(two.spire_ca_path_len(None, None).unwrap(), Some(1));
    assert_eq!(two.spire_ca_path_len(Some(0), None).unwrap(), Some(0));
    let e = two.spire_ca_path_len(Some(2), None).unwrap_err();
    assert!(
        matches!(e, IssueError::Authority(ref m) if m.contains("pathLen 2") && m.contains("1 at most")),
        "{e}"
    );
    let e = below(0).spire_ca_path_len(None, None).unwrap_err();
    assert!(
        matches!(e, IssueError::Authority(ref m) if m.contains("pathLen 0")),
        "{e}"
    );
}

#[test]
fn leaf_with_subject_has_non_critical_san_and_verifies() {
    let root = root(&SoftwareKeys, KeyType::EcP256).unwrap();
    let key = workload_key(KeyType::EcP256);
    let csr_der = csr(&key, &["spiffe://example.org/web"], &[], spire_subject());
    let mut req = LeafRequest::from_csr(
        &parse_and_verify_csr(&csr_der).unwrap(),
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(
        req.subject.iter().next().is_none(),
        "the CSR subject is not copied"
    );
    req.subject = spire_subject();
    let leaf = root.issue_x509_svid(&req, now()).unwrap();
    let (_, lc) = parse_x509_certificate(&leaf.der).unwrap();
    assert!(!ext(&lc, &oid_registry::OID_X509_EXT_SUBJECT_ALT_NAME).1);
    let (ok, out) = openssl_verify(&[root.cert_der().to_vec()], &[], &leaf.der);
    assert!(ok, "{out}");
}

/// The two-step leaf (prepare, sign the TBS elsewhere, complete) is the certificate the one-step path makes: same
/// TBS layout, a signature that `openssl verify` and x509-parser accept, for every authority key type; a signature
/// over anything else is refused by the post-sign check.
#[test]
fn two_step_leaves_verify_for_every_authority_key_type() {
    use signet::x509::IssueError;
    for key_type in [
        KeyType::EcP256,
        KeyType::EcP384,
        KeyType::Rsa2048,
        KeyType::Ed25519,
    ] {
        let root = root(&SoftwareKeys, key_type).unwrap();
        let key = workload_key(KeyType::EcP256);
        let csr_der = csr(
            &key,
            &["spiffe://example.org/two-step"],
            &["a.example.org"],
            root_subject("x"),
        );
        let req = LeafRequest::from_csr(
            &parse_and_verify_csr(&csr_der).unwrap(),
            Duration::from_secs(600),
        )
        .unwrap();
        let scheme = key_type.x509_scheme();
        let unsigned = root.prepare_x509_svid(&req, now()).unwrap();
        let raw = root.key().sign(scheme, unsigned.tbs()).unwrap();
        let leaf = root.complete(unsigned.clone(), raw).unwrap();
        let (rest, cert) = parse_x509_certificate(&leaf.der).unwrap();
        assert!(rest.is_empty(), "{key_type}: trailing bytes");
        assert_eq!(cert.tbs_certificate.as_ref(), unsigned.tbs(), "{key_type}");
        assert_eq!(uris(&cert), ["spiffe://example.org/two-step"]);
        assert_eq!(
            leaf.not_after.unix_timestamp(),
            cert.validity().not_after.timestamp()
        );
        cert.verify_signature(Some(
            parse_x509_certificate(root.cert_der())
                .unwrap()
                .1
                .public_key(),
        ))
        .unwrap_or_else(|e| panic!("{key_type}: {e}"));
        let (ok, out) = openssl_verify(&[root.cert_der().to_vec()], &[], &leaf.der);
        assert!(ok, "{key_type}: {out}");
        // The same template as the one-step path: only serial, validity and signature differ.
        let one_step = root.issue_x509_svid(&req, now()).unwrap();
        let (_, other) = parse_x509_certificate(&one_step.der).unwrap();
        assert_eq!(
            cert.signature_algorithm, other.signature_algorithm,
            "{key_type}"
        );
        assert_eq!(
            cert.extensions().len(),
            other.extensions().len(),
            "{key_type}"
        );

        let wrong = root.key().sign(scheme, b"something else").unwrap();
        match root.complete(unsigned, wrong) {
            Err(IssueError::PostSignCheck(_)) => {}
            other => panic!("{key_type}: a signature over another message: {other:?}"),
        }
    }
}
