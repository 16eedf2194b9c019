//! SPIRE's UpstreamAuthority v1 over gRPC: the minted CA validated as SPIRE does, a leaf signed under it verified to
//! the returned roots, root updates pushed on the open stream, JWT key publication and the local bundle stream, and
//! the CA's path length as the caller's policy rule sets it.

use signet_proto::spire::plugin::server::upstreamauthority::v1 as pb;
use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_client::UpstreamAuthorityClient;
use signet_proto::spire::plugin::types::JwtKey;
use tonic::Code;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use crate::support::bed::*;
use crate::support::openssl_verify;

/// SPIRE's CSR: subject C=US, O=SPIFFE, one URI SAN `spiffe://<td>`.
fn spire_csr() -> (Vec<u8>, rcgen::KeyPair) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CountryName, "US");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "SPIFFE");
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org".try_into().unwrap(),
    )];
    let der = params.serialize_request(&kp).unwrap().der().to_vec();
    (der, kp)
}

/// What SPIRE checks on the CA it gets: CA, keyCertSign, only allowed key usages, the trust domain URI SAN, valid now.
fn validate_like_spire(ca_der: &[u8], root_der: &[u8]) {
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der).unwrap();
    let bc = ca
        .basic_constraints()
        .unwrap()
        .expect("BasicConstraints")
        .value;
    assert!(bc.ca, "not a CA");
    // No pathLen by default, as SPIRE's own upstream authorities: downstream SPIRE servers may chain below it.
    assert_eq!(bc.path_len_constraint, None);
    let ku = ca.key_usage().unwrap().expect("KeyUsage").value;
    assert!(ku.key_cert_sign() && ku.crl_sign());
    assert!(!ku.digital_signature() && !ku.key_encipherment() && !ku.data_encipherment());
    let uris: Vec<String> = ca
        .subject_alternative_name()
        .unwrap()
        .expect("SAN")
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec!["spiffe://example.org".to_string()]);
    assert!(ca.validity().is_valid(), "the CA is not valid now");
    let has =
        |f: fn(&ParsedExtension) -> bool| ca.iter_extensions().any(|e| f(e.parsed_extension()));
    assert!(
        has(|e| matches!(e, ParsedExtension::SubjectKeyIdentifier(_))),
        "no SKI"
    );
    assert!(
        has(|e| matches!(e, ParsedExtension::AuthorityKeyIdentifier(_))),
        "no AKI"
    );
    assert!(
        !has(|e| matches!(e, ParsedExtension::ExtendedKeyUsage(_))),
        "EKU on a CA"
    );
    let (_, root) = x509_parser::parse_x509_certificate(root_der).unwrap();
    assert!(ca.validity().not_after <= root.validity().not_after);
    ca.verify_signature(Some(root.public_key()))
        .expect("signed by the root");
}

/// A leaf signed under the minted CA with the key the test holds (what SPIRE then does for its workloads).
fn leaf_under(ca_der: &[u8], ca_key: rcgen::KeyPair) -> (Vec<u8>, Vec<u8>) {
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der.to_vec().into(), ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/workload/test".try_into().unwrap(),
    )];
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let leaf = p.signed_by(&leaf_key, &issuer).unwrap();
    (leaf.der().to_vec(), leaf_key.serialize_der())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mint_x509_ca_is_what_spire_accepts_and_root_updates_are_pushed() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let spire = bed.credential_for(SPIRE_A).await;
    let mut c = UpstreamAuthorityClient::new(bed.channel(Some(&spire)).await);
    let (csr, ca_key) = spire_csr();
    let mut stream = c
        .mint_x509ca_and_subscribe(pb::MintX509caRequest {
            csr,
            preferred_ttl: 6 * 3600,
        })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    assert_eq!(
        first.x509_ca_chain.len(),
        1,
        "a root-signed CA has no intermediates"
    );
    assert!(!first.upstream_x509_roots.is_empty());
    let roots: Vec<Vec<u8>> = first
        .upstream_x509_roots
        .iter()
        .map(|r| r.asn1.clone())
        .collect();
    let ca = first.x509_ca_chain[0].asn1.clone();
    validate_like_spire(&ca, &roots[0]);
    let (_, parsed) = x509_parser::parse_x509_certificate(&ca).unwrap();
    let life = parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp();
    assert_eq!(
        life,
        6 * 3600 + 10,
        "preferred_ttl honoured, NotBefore backdated 10 s"
    );

    // A test SVID signed under the new CA verifies to the returned roots (spiffe crate + openssl -x509_strict).
    let (leaf, leaf_key) = leaf_under(&ca, ca_key);
    let mut chain = leaf.clone();
    chain.extend_from_slice(&ca);
    let svid =
        spiffe::X509Svid::parse_from_der(&chain, &leaf_key).expect("spiffe crate accepts the SVID");
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/workload/test"
    );
    openssl_verify(&roots, std::slice::from_ref(&ca), &leaf).expect("openssl verifies the chain");
    // The oracle can refuse: the same leaf does not verify to a foreign root.
    let (foreign, _) = foreign_ca();
    assert!(openssl_verify(&[foreign.der().to_vec()], std::slice::from_ref(&ca), &leaf).is_err());

    // The stream stays open and pushes the roots (no chain) when the bundle changes.
    assert!(bed.app.bundle().add_x509_root(foreign.der().to_vec()));
    let update = next(&mut stream).await;
    assert!(update.x509_ca_chain.is_empty());
    let pushed: Vec<Vec<u8>> = update
        .upstream_x509_roots
        .iter()
        .map(|r| r.asn1.clone())
        .collect();
    assert_eq!(pushed, vec![roots[0].clone(), foreign.der().to_vec()]);

    // The issuance is in the audit log.
    let audit = bed.audit();
    let lines = audit_lines(&audit, SPIRE_A, "MintX509CAAndSubscribe");
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["outcome"], "issued");
    assert_eq!(lines[0]["spiffe_id"], "spiffe://example.org");
    drop(stream);
    bed.stop().await;
}

/// SPIRE's CSR asking, in a requested BasicConstraints extension, for a CA with `path_len` (`None`: no limit).
fn spire_csr_asking(path_len: Option<u8>) -> (Vec<u8>, rcgen::KeyPair) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "SPIFFE");
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org".try_into().unwrap(),
    )];
    // BasicConstraints ::= SEQUENCE { cA BOOLEAN TRUE, pathLenConstraint INTEGER OPTIONAL }
    let content = match path_len {
        None => vec![0x30, 0x03, 0x01, 0x01, 0xff],
        Some(n) => vec![0x30, 0x06, 0x01, 0x01, 0xff, 0x02, 0x01, n],
    };
    let mut bc = rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 19], content);
    bc.set_criticality(true);
    params.custom_extensions = vec![bc];
    let der = params.serialize_request(&kp).unwrap().der().to_vec();
    (der, kp)
}

/// A CA named `name` below `issuer_der` (held with `issuer_key`), as a downstream SPIRE server's CA would be.
fn ca_under(
    issuer_der: &[u8],
    issuer_key: rcgen::KeyPair,
    name: &str,
) -> (Vec<u8>, rcgen::KeyPair) {
    let issuer = rcgen::Issuer::from_ca_cert_der(&issuer_der.to_vec().into(), issuer_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    // Its own subject: a CA whose subject is its issuer's is self-issued and does not count against a pathLen.
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, name);
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org".try_into().unwrap(),
    )];
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    p.use_authority_key_identifier_extension = true;
    let ca = p.signed_by(&key, &issuer).unwrap();
    (ca.der().to_vec(), key)
}

async fn mint(
    c: &mut UpstreamAuthorityClient<tonic::transport::Channel>,
    csr: Vec<u8>,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), tonic::Status> {
    let mut stream = c
        .mint_x509ca_and_subscribe(pb::MintX509caRequest {
            csr,
            preferred_ttl: 3600,
        })
        .await?
        .into_inner();
    let first = next(&mut stream).await;
    let roots = first
        .upstream_x509_roots
        .iter()
        .map(|r| r.asn1.clone())
        .collect();
    Ok((first.x509_ca_chain[0].asn1.clone(), roots))
}

fn path_len_of(ca: &[u8]) -> Option<u32> {
    let (_, ca) = x509_parser::parse_x509_certificate(ca).unwrap();
    let bc = ca.basic_constraints().unwrap().expect("BasicConstraints");
    assert!(bc.critical && bc.value.ca);
    bc.value.path_len_constraint
}

/// The CA minted for SPIRE has the pathLen of the caller's rule (`spire_ca_path_len`; none when absent): with 1, a
/// downstream SPIRE CA below it verifies (`openssl verify -x509_strict`, root -> SPIRE CA -> downstream CA -> leaf)
/// and one more level does not; a CSR that asks for a longer path than the rule allows is PERMISSION_DENIED, nothing
/// is issued, and the refusal is audited; a shorter one is honoured. A rule value the root cannot give, or one on a
/// rule that mints no SPIRE CA, is refused when the configuration loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_ca_path_len_is_set_per_caller() {
    let Some(bed) = Bed::start_with(|c| {
        let b = c.policy.iter_mut().find(|r| r.caller == SPIRE_B).unwrap();
        b.spire_ca_path_len = Some(1);
    })
    .await
    else {
        return;
    };
    // Default: no constraint.
    let a = bed.credential_for(SPIRE_A).await;
    let mut ca_client = UpstreamAuthorityClient::new(bed.channel(Some(&a)).await);
    let (csr, _) = spire_csr();
    let (ca, _) = mint(&mut ca_client, csr).await.unwrap();
    assert_eq!(path_len_of(&ca), None);

    // Set: pathLen 1, one downstream CA below it.
    let b = bed.credential_for(SPIRE_B).await;
    let mut cb = UpstreamAuthorityClient::new(bed.channel(Some(&b)).await);
    let (csr, key) = spire_csr();
    let (ca, roots) = mint(&mut cb, csr).await.unwrap();
    assert_eq!(path_len_of(&ca), Some(1));
    let (down, down_key) = ca_under(&ca, key, "downstream SPIRE");
    let (leaf, leaf_key) = leaf_under(&down, down_key);
    openssl_verify(&roots, &[down.clone(), ca.clone()], &leaf)
        .expect("root -> SPIRE CA (pathLen 1) -> downstream CA -> leaf verifies");
    let mut chain = leaf.clone();
    chain.extend_from_slice(&down);
    chain.extend_from_slice(&ca);
    spiffe::X509Svid::parse_from_der(&chain, &leaf_key).expect("spiffe crate parses the chain");
    // One level more breaks the constraint: the oracle refuses it.
    let (csr, key) = spire_csr();
    let (ca, _) = mint(&mut cb, csr).await.unwrap();
    let (down, down_key) = ca_under(&ca, key, "downstream SPIRE");
    let (deeper, deeper_key) = ca_under(&down, down_key, "downstream of downstream");
    let (leaf, _) = leaf_under(&deeper, deeper_key);
    let e = openssl_verify(&roots, &[deeper, down, ca], &leaf).unwrap_err();
    assert!(e.contains("path length"), "{e}");

    // A CSR asking for a longer path (or none at all) is refused; nothing issued; audited.
    let issued = |bed: &Bed| {
        bed.audit()
            .iter()
            .filter(|l| {
                l["caller"] == SPIRE_B
                    && l["method"] == "MintX509CAAndSubscribe"
                    && l["outcome"] == "issued"
            })
            .count()
    };
    let before = issued(&bed);
    for asked in [Some(2), None] {
        let (csr, _) = spire_csr_asking(asked);
        let e = mint(&mut cb, csr).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains("spire_ca_path_len") && e.message().contains("pathLen 1"),
            "{}",
            e.message()
        );
    }
    assert_eq!(issued(&bed), before, "nothing was issued");
    let audit = bed.audit();
    let refused: Vec<_> = audit_lines(&audit, SPIRE_B, "MintX509CAAndSubscribe")
        .into_iter()
        .filter(|l| l["outcome"] == "refused")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(refused[0]["code"], "PERMISSION_DENIED");
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap()
            .contains("asks for a CA with pathLen 2"),
        "{}",
        refused[0]
    );
    // A shorter path than the rule allows is what it gets.
    let (csr, _) = spire_csr_asking(Some(0));
    let (ca, _) = mint(&mut cb, csr).await.unwrap();
    assert_eq!(path_len_of(&ca), Some(0));

    // At configuration load: only on a rule that mints SPIRE CAs.
    let mut cfg = signet::config::Config::embedded_default();
    cfg.policy.push(signet::config::PolicyRule {
        caller: AGENT.into(),
        may: vec!["issuer".into()],
        ids: vec!["spiffe://example.org/workloads/".into()],
        max_ttl: None,
        jwt_max_ttl: None,
        rate: None,
        burst: None,
        downstream_credentials: false,
        spire_ca_path_len: Some(0),
    });
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("spire_ca_path_len") && e.contains("needs upstream-authority"),
        "{e}"
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mint_x509_ca_refuses_a_csr_for_a_workload_id() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let spire = bed.credential_for(SPIRE_A).await;
    let mut c = UpstreamAuthorityClient::new(bed.channel(Some(&spire)).await);
    let (csr, _) = csr_for("spiffe://example.org/not/the/td");
    let e = c
        .mint_x509ca_and_subscribe(pb::MintX509caRequest {
            csr,
            preferred_ttl: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let (csr, _) = csr_for("spiffe://other.org");
    let e = c
        .mint_x509ca_and_subscribe(pb::MintX509caRequest {
            csr,
            preferred_ttl: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    bed.stop().await;
}

fn p256_spki() -> Vec<u8> {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::PublicKeyData::subject_public_key_info(&kp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_jwt_keys_reach_every_subscriber() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let spire = bed.credential_for(SPIRE_A).await;
    let mut c = UpstreamAuthorityClient::new(bed.channel(Some(&spire)).await);
    let mut local = c
        .subscribe_to_local_bundle(pb::SubscribeToLocalBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let initial = next(&mut local).await;
    assert_eq!(initial.upstream_x509_roots.len(), 1);
    assert_eq!(initial.upstream_jwt_keys.len(), 1, "signet's own JWT key");

    let key = JwtKey {
        public_key: p256_spki(),
        key_id: "spire-jwt-1".into(),
        expires_at: time::OffsetDateTime::now_utc().unix_timestamp() + 3600,
        tainted: false,
    };
    let mut published = c
        .publish_jwt_key_and_subscribe(pb::PublishJwtKeyRequest {
            jwt_key: Some(key.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut published).await;
    assert!(first.upstream_jwt_keys.contains(&key));
    assert_eq!(first.upstream_jwt_keys.len(), 2);
    let pushed = next(&mut local).await;
    assert!(pushed.upstream_jwt_keys.contains(&key));

    // A second key reaches the first publisher's stream too.
    let key2 = JwtKey {
        key_id: "spire-jwt-2".into(),
        public_key: p256_spki(),
        ..key.clone()
    };
    let mut c2 = UpstreamAuthorityClient::new(bed.channel(Some(&spire)).await);
    let _s2 = c2
        .publish_jwt_key_and_subscribe(pb::PublishJwtKeyRequest {
            jwt_key: Some(key2.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    let update = next(&mut published).await;
    assert!(update.upstream_jwt_keys.contains(&key2));

    // The same kid with another key is refused.
    let clash = JwtKey {
        public_key: p256_spki(),
        ..key.clone()
    };
    let e = c2
        .publish_jwt_key_and_subscribe(pb::PublishJwtKeyRequest {
            jwt_key: Some(clash),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    bed.stop().await;
}
