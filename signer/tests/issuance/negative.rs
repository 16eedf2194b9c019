//! Table-driven negative cases. Each case must fail, and the error must name the rule it broke.

use std::sync::Arc;
use std::time::Duration;

use rcgen::PublicKeyData as _;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod,
    KeyUsagePurpose,
};
use signet::jwt::JwtIssuer;
use signet::keys::spki::SubjectKey;
use signet::keys::{AuthorityKey, KeyType, SoftwareKey};
use signet::spiffe::{BundleDocument, SpiffeId, TrustDomain};
use signet::x509::{Authority, LeafRequest, Profile, RootRequest, parse_and_verify_csr};

use crate::common::*;

/// Assert `result` failed with `rule`, and that the message says something about it.
fn expect_rule<T: std::fmt::Debug, E: std::fmt::Display>(
    case: &str,
    result: Result<T, E>,
    rule_of: impl Fn(&E) -> &'static str,
    rule: &str,
) {
    match result {
        Ok(v) => panic!("case {case:?}: expected failure of rule {rule}, got {v:?}"),
        Err(e) => {
            assert_eq!(rule_of(&e), rule, "case {case:?}: wrong rule; message: {e}");
            assert!(!e.to_string().is_empty());
        }
    }
}

#[test]
fn invalid_spiffe_ids() {
    let long_id = format!(
        "spiffe://example.org/{}",
        "a".repeat(2049 - "spiffe://example.org/".len())
    );
    assert_eq!(long_id.len(), 2049);
    let long_td = format!("spiffe://{}", "a".repeat(256));
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        ("spiffe://Example.org/a", "uppercase-trust-domain"),
        ("spiffe://EXAMPLE.ORG", "uppercase-trust-domain"),
        ("spiffe://example.org:8443/a", "port"),
        ("spiffe://user@example.org/a", "userinfo"),
        ("spiffe://example.org/a?x=1", "query"),
        ("spiffe://example.org?x=1", "query"),
        ("spiffe://example.org/a#frag", "fragment"),
        ("spiffe://example.org#frag", "fragment"),
        ("spiffe://example.org/a/../b", "dot-segment"),
        ("spiffe://example.org/./b", "dot-segment"),
        ("spiffe://example.org/a/..", "dot-segment"),
        ("spiffe://example.org/a//b", "empty-segment"),
        ("spiffe://example.org/a/", "trailing-slash"),
        ("spiffe://example.org/", "trailing-slash"),
        ("spiffe://example.org/a%20b", "percent-encoding"),
        ("spiffe://exa%6Dple.org/a", "percent-encoding"),
        (long_id.as_str(), "too-long"),
        (long_td.as_str(), "trust-domain-too-long"),
        ("https://example.org/a", "scheme"),
        ("SPIFFE://example.org/a", "scheme"),
        ("spiffe:/example.org/a", "scheme"),
        ("example.org/a", "scheme"),
        ("spiffe:///a", "missing-trust-domain"),
        ("spiffe://", "missing-trust-domain"),
        ("spiffe://exa mple.org", "trust-domain-char"),
        ("spiffe://example.org/a b", "path-char"),
        ("spiffe://example.org/a*b", "path-char"),
        ("spiffe://example.org/ünï", "path-char"),
    ];
    for (input, rule) in cases {
        expect_rule(input, SpiffeId::parse(input), |e| e.rule(), rule);
    }
    expect_rule(
        "td with path",
        TrustDomain::parse("spiffe://example.org/a"),
        |e| e.rule(),
        "unexpected-path",
    );
    expect_rule(
        "td uppercase",
        TrustDomain::parse("Example.org"),
        |e| e.rule(),
        "uppercase-trust-domain",
    );
}

struct Ctx {
    root: Authority,
    root_probe: Arc<ProbeKey>,
}

fn ctx() -> Ctx {
    let probe = Arc::new(ProbeKey::new(SoftwareKeys.make(KeyType::EcP256).unwrap()));
    let req = RootRequest {
        trust_domain: td(),
        subject: root_subject("negative root"),
        ttl: Duration::from_secs(3600),
        path_len: None,
    };
    let root =
        Authority::self_signed_root(probe.clone() as Arc<dyn AuthorityKey>, &req, now()).unwrap();
    Ctx {
        root,
        root_probe: probe,
    }
}

/// openssl-made CSRs for key types rcgen cannot make (weak RSA, secp256k1).
fn openssl_csr(keyopt: &[&str], subj_uri: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let out = dir.path().join("r.der");
    let mut gen_args = vec!["genpkey"];
    gen_args.extend_from_slice(keyopt);
    gen_args.extend(["-out", key.to_str().unwrap()]);
    run_openssl(&gen_args);
    let san = format!("subjectAltName=URI:{subj_uri}");
    run_openssl(&[
        "req",
        "-new",
        "-key",
        key.to_str().unwrap(),
        "-subj",
        "/O=test",
        "-addext",
        &san,
        "-outform",
        "DER",
        "-out",
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

#[test]
fn rejected_csrs_and_requests() {
    let c = ctx();
    let p256 = workload_key(KeyType::EcP256);
    let good = csr(
        &p256,
        &["spiffe://example.org/w"],
        &[],
        rcgen::DistinguishedName::new(),
    );
    let mut bad_sig = good.clone();
    let n = bad_sig.len();
    bad_sig[n - 3] ^= 0x55;
    let mut trailing = good.clone();
    trailing.push(0);
    let truncated = &good[..good.len() - 10];

    type Case = (&'static str, Vec<u8>, &'static str);
    let csr_cases: Vec<Case> = vec![
        ("bad signature", bad_sig, "csr.signature"),
        ("trailing data", trailing, "csr.trailing-data"),
        ("truncated", truncated.to_vec(), "csr.malformed"),
        ("garbage", b"not a csr".to_vec(), "csr.malformed"),
        (
            "two URI SANs",
            csr(
                &p256,
                &["spiffe://example.org/a", "spiffe://example.org/b"],
                &[],
                Default::default(),
            ),
            "csr.uri-san-count",
        ),
        (
            "SPIFFE + https URI SANs",
            csr(
                &p256,
                &["spiffe://example.org/a", "https://example.org/b"],
                &[],
                Default::default(),
            ),
            "csr.uri-san-count",
        ),
        (
            "https URI SAN",
            csr(&p256, &["https://example.org/a"], &[], Default::default()),
            "csr.uri-san-scheme",
        ),
        (
            "invalid SPIFFE ID",
            csr(&p256, &["spiffe://EXAMPLE.org/a"], &[], Default::default()),
            "uppercase-trust-domain",
        ),
        (
            "weak RSA 1024",
            openssl_csr(
                &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
                "spiffe://example.org/w",
            ),
            "csr.subject-key",
        ),
        (
            "secp256k1",
            openssl_csr(
                &[
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:secp256k1",
                ],
                "spiffe://example.org/w",
            ),
            "csr.subject-key",
        ),
        (
            "P-521",
            openssl_csr(
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"],
                "spiffe://example.org/w",
            ),
            "csr.subject-key",
        ),
    ];
    for (case, der, rule) in &csr_cases {
        let r = parse_and_verify_csr(der).map_err(signet::x509::IssueError::from);
        expect_rule(case, r.map(|_| ()), |e| e.rule(), rule);
    }
    // The weak key and unknown curve are named in the message.
    let weak = parse_and_verify_csr(&csr_cases[8].1)
        .unwrap_err()
        .to_string();
    assert!(weak.contains("1024") && weak.contains("2048"), "{weak}");
    let k1 = parse_and_verify_csr(&csr_cases[9].1)
        .unwrap_err()
        .to_string();
    assert!(k1.contains("secp256k1"), "{k1}");

    // MintX509CA: CA requests.
    let mint = |der: &[u8], ttl| c.root.mint_spire_ca(der, ttl, None, now()).map(|_| ());
    let spire = workload_key(KeyType::EcP256);
    expect_rule(
        "path on a CA request",
        mint(
            &csr(
                &spire,
                &["spiffe://example.org/spire"],
                &[],
                spire_subject(),
            ),
            0,
        ),
        |e| e.rule(),
        "unexpected-path",
    );
    expect_rule(
        "wrong trust domain on a CA request",
        mint(
            &csr(&spire, &["spiffe://other.org"], &[], spire_subject()),
            0,
        ),
        |e| e.rule(),
        "wrong-trust-domain",
    );
    expect_rule(
        "CA request without URI SAN",
        mint(&csr(&spire, &[], &[], spire_subject()), 0),
        |e| e.rule(),
        "missing-spiffe-id",
    );
    expect_rule(
        "negative preferred TTL",
        mint(
            &csr(&spire, &["spiffe://example.org"], &[], spire_subject()),
            -5,
        ),
        |e| e.rule(),
        "ttl",
    );
    expect_rule(
        "CA request with empty subject",
        mint(
            &csr(&spire, &["spiffe://example.org"], &[], Default::default()),
            0,
        ),
        |e| e.rule(),
        "csr.subject",
    );

    // Leaves.
    let spki = SubjectKey::from_spki_der(&p256.subject_public_key_info()).unwrap();
    let leaf = |id: &str, ttl: u64| {
        let id = SpiffeId::parse(id).unwrap();
        let req = LeafRequest::from_spki(id, spki.spki_der(), Duration::from_secs(ttl)).unwrap();
        c.root.issue_x509_svid(&req, now()).map(|_| ())
    };
    expect_rule(
        "leaf in another trust domain",
        leaf("spiffe://other.org/w", 60),
        |e| e.rule(),
        "wrong-trust-domain",
    );
    expect_rule(
        "leaf with the trust domain ID",
        leaf("spiffe://example.org", 60),
        |e| e.rule(),
        "missing-path",
    );
    // A TTL beyond the issuer's life, however large, is cut at the issuer's NotAfter (the TTL rule), not refused
    // (on another root: this one counts what it signs).
    let other = ctx();
    for ttl in [Duration::from_secs(7200), Duration::MAX] {
        let req = LeafRequest::from_spki(
            SpiffeId::parse("spiffe://example.org/w").unwrap(),
            spki.spki_der(),
            ttl,
        )
        .unwrap();
        let issued = other.root.issue_x509_svid(&req, now()).unwrap();
        assert_eq!(issued.not_after, other.root.not_after(), "{ttl:?}");
    }
    expect_rule(
        "leaf TTL zero",
        leaf("spiffe://example.org/w", 0),
        |e| e.rule(),
        "ttl",
    );
    let mut req = LeafRequest::from_spki(
        SpiffeId::parse("spiffe://example.org/w").unwrap(),
        spki.spki_der(),
        Duration::from_secs(60),
    )
    .unwrap();
    req.dns_names = vec!["bad_name!".into()];
    expect_rule(
        "invalid DNS SAN",
        c.root.issue_x509_svid(&req, now()).map(|_| ()),
        |e| e.rule(),
        "dns-name",
    );
    let no_id = csr(&p256, &[], &["a.example.org"], Default::default());
    expect_rule(
        "leaf CSR without SPIFFE ID",
        LeafRequest::from_csr(
            &parse_and_verify_csr(&no_id).unwrap(),
            Duration::from_secs(60),
        )
        .map(|_| ()),
        |e| e.rule(),
        "missing-spiffe-id",
    );

    // Root with pathlen 0.
    let root_req = RootRequest {
        trust_domain: td(),
        subject: root_subject("r"),
        ttl: Duration::from_secs(60),
        path_len: Some(0),
    };
    expect_rule(
        "root with pathlen 0",
        Authority::self_signed_root(
            SoftwareKeys.make(KeyType::EcP256).unwrap(),
            &root_req,
            now(),
        )
        .map(|_| ()),
        |e| e.rule(),
        "x509.path-len",
    );
    assert_eq!(
        c.root_probe.count(),
        1,
        "only the root itself was signed so far"
    );
}

/// Templates that break a rule: the lint names it and the key is never asked to sign.
#[test]
fn lint_failures_stop_signing() {
    let c = ctx();
    let before = c.root_probe.count();
    let wl = workload_key(KeyType::EcP256);
    let spki = SubjectKey::from_spki_der(&wl.subject_public_key_info()).unwrap();
    let base = || {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.not_before = now() - time::Duration::seconds(10);
        p.not_after = now() + time::Duration::minutes(5);
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x11; 16]));
        p.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://example.org/w".try_into().unwrap(),
        )];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.key_identifier_method = KeyIdMethod::PreSpecified(spki.key_identifier());
        p
    };
    // The base template passes (so each case below fails for its own reason).
    c.root
        .issue_with_params(&base(), &spki, Profile::Leaf, None)
        .unwrap();
    let signed_base = c.root_probe.count();
    assert_eq!(signed_base, before + 1);

    type Edit = Box<dyn Fn(&mut CertificateParams)>;
    let uri = |s: &str| rcgen::SanType::URI(s.try_into().unwrap());
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "two URI SANs",
            Box::new(move |p| p.subject_alt_names.push(uri("spiffe://example.org/x"))),
            "x509.uri-san-count",
        ),
        (
            "no URI SAN",
            Box::new(|p| p.subject_alt_names.clear()),
            "x509.uri-san-count",
        ),
        (
            "leaf without path",
            Box::new(move |p| p.subject_alt_names = vec![uri("spiffe://example.org")]),
            "x509.leaf.uri-san-path",
        ),
        (
            "leaf in other TD",
            Box::new(move |p| p.subject_alt_names = vec![uri("spiffe://other.org/w")]),
            "x509.trust-domain",
        ),
        (
            "leaf with CA=true",
            Box::new(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
            "x509.basic-constraints",
        ),
        (
            "leaf without BasicConstraints",
            Box::new(|p| p.is_ca = IsCa::NoCa),
            "x509.basic-constraints",
        ),
        (
            "leaf with keyCertSign",
            Box::new(|p| p.key_usages.push(KeyUsagePurpose::KeyCertSign)),
            "x509.key-usage",
        ),
        (
            "leaf without digitalSignature",
            Box::new(|p| p.key_usages = vec![KeyUsagePurpose::KeyAgreement]),
            "x509.key-usage",
        ),
        (
            "keyEncipherment on an EC key",
            Box::new(|p| p.key_usages.push(KeyUsagePurpose::KeyEncipherment)),
            "x509.key-usage",
        ),
        (
            "leaf without EKU",
            Box::new(|p| p.extended_key_usages.clear()),
            "x509.eku",
        ),
        (
            "EKU serverAuth only",
            Box::new(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]),
            "x509.eku",
        ),
        (
            "EKU with codeSigning",
            Box::new(|p| {
                p.extended_key_usages
                    .push(ExtendedKeyUsagePurpose::CodeSigning)
            }),
            "x509.eku",
        ),
        (
            "no AKI",
            Box::new(|p| p.use_authority_key_identifier_extension = false),
            "x509.aki",
        ),
        (
            "zero serial",
            Box::new(|p| p.serial_number = Some(rcgen::SerialNumber::from_slice(&[0]))),
            "x509.serial",
        ),
        (
            "short serial",
            Box::new(|p| p.serial_number = Some(rcgen::SerialNumber::from_slice(&[1, 2, 3]))),
            "x509.serial",
        ),
        (
            "NotAfter beyond issuer",
            Box::new(|p| p.not_after = now() + time::Duration::days(2)),
            "x509.not-after-beyond-issuer",
        ),
        (
            "NotBefore after NotAfter",
            Box::new(|p| p.not_before = p.not_after + time::Duration::seconds(1)),
            "x509.validity",
        ),
        (
            "email SAN",
            Box::new(|p| {
                p.subject_alt_names
                    .push(rcgen::SanType::Rfc822Name("a@b.c".try_into().unwrap()))
            }),
            "x509.san-type",
        ),
        (
            "unexpected extension",
            Box::new(|p| {
                p.custom_extensions
                    .push(rcgen::CustomExtension::from_oid_content(
                        &[1, 2, 3, 4],
                        vec![5, 0],
                    ))
            }),
            "x509.extension-unexpected",
        ),
    ];
    for (case, edit, rule) in &cases {
        let mut p = base();
        edit(&mut p);
        expect_rule(
            case,
            c.root
                .issue_with_params(&p, &spki, Profile::Leaf, None)
                .map(|_| ()),
            |e| e.rule(),
            rule,
        );
    }
    // A subject key other than the requested one.
    let other = SubjectKey::from_spki_der(&workload_key(KeyType::EcP256).subject_public_key_info())
        .unwrap();
    let mut p = base();
    p.key_identifier_method = KeyIdMethod::PreSpecified(other.key_identifier());
    // CA profile on a leaf template: CA rules fire.
    expect_rule(
        "leaf template under CA profile",
        c.root
            .issue_with_params(&p, &spki, Profile::IntermediateCa, Some(0))
            .map(|_| ()),
        |e| e.rule(),
        "x509.ca.uri-san-path",
    );
    // A CA template with EKU and digitalSignature.
    let mut ca = base();
    ca.subject_alt_names = vec![uri("spiffe://example.org")];
    ca.distinguished_name = root_subject("ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    expect_rule(
        "CA with EKU",
        c.root
            .issue_with_params(&ca, &spki, Profile::IntermediateCa, Some(0))
            .map(|_| ()),
        |e| e.rule(),
        "x509.eku",
    );
    ca.extended_key_usages.clear();
    ca.key_usages.push(KeyUsagePurpose::DigitalSignature);
    expect_rule(
        "CA with digitalSignature",
        c.root
            .issue_with_params(&ca, &spki, Profile::IntermediateCa, Some(0))
            .map(|_| ()),
        |e| e.rule(),
        "x509.key-usage",
    );
    ca.key_usages.pop();
    expect_rule(
        "CA with unexpected pathlen",
        c.root
            .issue_with_params(&ca, &spki, Profile::IntermediateCa, None)
            .map(|_| ()),
        |e| e.rule(),
        "x509.path-len",
    );
    c.root
        .issue_with_params(&ca, &spki, Profile::IntermediateCa, Some(0))
        .expect("the corrected CA template passes");
    assert_eq!(
        c.root_probe.count(),
        signed_base + 1,
        "no failed template reached the key"
    );
}

#[test]
fn faulty_and_failing_keys() {
    let inner = SoftwareKeys.make(KeyType::EcP256).unwrap();
    let mut probe = ProbeKey::new(inner.clone());
    probe.corrupt = true;
    let req = RootRequest {
        trust_domain: td(),
        subject: root_subject("r"),
        ttl: Duration::from_secs(600),
        path_len: None,
    };
    expect_rule(
        "HSM returns a bad signature (root)",
        Authority::self_signed_root(Arc::new(probe) as Arc<dyn AuthorityKey>, &req, now())
            .map(|_| ()),
        |e| e.rule(),
        "post-sign-check",
    );
    let mut probe = ProbeKey::new(inner.clone());
    probe.fail_transient = true;
    let err = Authority::self_signed_root(Arc::new(probe) as Arc<dyn AuthorityKey>, &req, now())
        .unwrap_err();
    assert_eq!(err.rule(), "key");
    assert!(
        err.is_transient(),
        "a transient token error stays transient: {err}"
    );

    let mut probe = ProbeKey::new(inner.clone());
    probe.corrupt = true;
    let issuer =
        JwtIssuer::new(Arc::new(probe), td(), None, None, Duration::from_secs(60)).unwrap();
    let sub = SpiffeId::parse("spiffe://example.org/w").unwrap();
    expect_rule(
        "HSM returns a bad signature (JWT)",
        issuer.issue(&sub, &["a".into()], Duration::from_secs(30), now()),
        |e| e.rule(),
        "post-sign-check",
    );

    // A key whose public half does not match the certificate.
    let root = root(&SoftwareKeys, KeyType::EcP256).unwrap();
    let other = SoftwareKeys.make(KeyType::EcP256).unwrap();
    expect_rule(
        "authority cert/key mismatch",
        Authority::new(root.cert_der().to_vec(), other, td(), vec![], vec![]).map(|_| ()),
        |e| e.rule(),
        "authority",
    );
    // A non-root CA given without the roots it chains to.
    let ikey = SoftwareKeys.make(KeyType::EcP256).unwrap();
    let ireq = signet::x509::IntermediateRequest {
        subject_key: SubjectKey::from_spki_der(ikey.spki_der()).unwrap(),
        subject: root_subject("i"),
        ttl: Duration::from_secs(600),
        path_len: Some(0),
    };
    let inter = root.issue_intermediate(&ireq, now()).unwrap();
    expect_rule(
        "intermediate without roots",
        Authority::new(inter.der, ikey, td(), vec![], vec![]).map(|_| ()),
        |e| e.rule(),
        "authority",
    );
    // SoftwareKey refuses a scheme its type cannot do.
    let err = inner
        .sign(signet::keys::SignatureScheme::RsaPkcs1Sha256, b"x")
        .unwrap_err();
    assert!(
        !err.is_transient() && err.to_string().contains("cannot sign"),
        "{err}"
    );
    assert!(SoftwareKey::from_pkcs8(b"junk").is_err());
}

#[test]
fn jwt_requests_and_lint() {
    let key = SoftwareKeys.make(KeyType::EcP256).unwrap();
    let probe = Arc::new(ProbeKey::new(key));
    let issuer = JwtIssuer::new(
        probe.clone(),
        td(),
        Some("k1".into()),
        None,
        Duration::from_secs(600),
    )
    .unwrap();
    let sub = SpiffeId::parse("spiffe://example.org/w").unwrap();
    let t = now().unix_timestamp();
    let issue = |s: &str, aud: &[&str], ttl: u64| {
        let aud: Vec<String> = aud.iter().map(|a| a.to_string()).collect();
        issuer.issue(
            &SpiffeId::parse(s).unwrap(),
            &aud,
            Duration::from_secs(ttl),
            now(),
        )
    };
    expect_rule(
        "JWT no audience",
        issue(sub.as_str(), &[], 60),
        |e| e.rule(),
        "jwt.aud",
    );
    expect_rule(
        "JWT empty audience",
        issue(sub.as_str(), &[""], 60),
        |e| e.rule(),
        "jwt.aud",
    );
    expect_rule(
        "JWT TTL over maximum",
        issue(sub.as_str(), &["a"], 601),
        |e| e.rule(),
        "jwt.exp",
    );
    expect_rule(
        "JWT TTL zero",
        issue(sub.as_str(), &["a"], 0),
        |e| e.rule(),
        "jwt.exp",
    );
    expect_rule(
        "JWT other trust domain",
        issue("spiffe://other.org/w", &["a"], 60),
        |e| e.rule(),
        "wrong-trust-domain",
    );
    expect_rule(
        "JWT trust domain ID as sub",
        issue("spiffe://example.org", &["a"], 60),
        |e| e.rule(),
        "missing-path",
    );

    let good_h = r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#.to_string();
    let good_c = format!(
        r#"{{"sub":"spiffe://example.org/w","aud":["a"],"exp":{},"iat":{t}}}"#,
        t + 60
    );
    issuer
        .sign_parts(good_h.as_bytes(), good_c.as_bytes())
        .expect("the reference header and claims pass");
    let signed = probe.count();
    let claims = |extra: &str| {
        format!(
            r#"{{"sub":"spiffe://example.org/w","aud":["a"],"exp":{},"iat":{t}{extra}}}"#,
            t + 60
        )
    };
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "header with jku",
            r#"{"alg":"ES256","kid":"k1","typ":"JWT","jku":"https://x"}"#.into(),
            good_c.clone(),
            "jwt.header-members",
        ),
        (
            "header without kid",
            r#"{"alg":"ES256","typ":"JWT"}"#.into(),
            good_c.clone(),
            "jwt.kid",
        ),
        (
            "header with other kid",
            r#"{"alg":"ES256","kid":"k2","typ":"JWT"}"#.into(),
            good_c.clone(),
            "jwt.kid",
        ),
        (
            "alg none",
            r#"{"alg":"none","kid":"k1","typ":"JWT"}"#.into(),
            good_c.clone(),
            "jwt.alg",
        ),
        (
            "alg HS256",
            r#"{"alg":"HS256","kid":"k1","typ":"JWT"}"#.into(),
            good_c.clone(),
            "jwt.alg",
        ),
        (
            "typ JWS",
            r#"{"alg":"ES256","kid":"k1","typ":"JWS"}"#.into(),
            good_c.clone(),
            "jwt.typ",
        ),
        (
            "aud as string",
            good_h.clone(),
            format!(
                r#"{{"sub":"spiffe://example.org/w","aud":"a","exp":{},"iat":{t}}}"#,
                t + 60
            ),
            "jwt.aud",
        ),
        (
            "exp beyond max",
            good_h.clone(),
            format!(
                r#"{{"sub":"spiffe://example.org/w","aud":["a"],"exp":{},"iat":{t}}}"#,
                t + 601
            ),
            "jwt.exp",
        ),
        (
            "missing exp",
            good_h.clone(),
            format!(r#"{{"sub":"spiffe://example.org/w","aud":["a"],"iat":{t}}}"#),
            "jwt.exp",
        ),
        (
            "extra claim",
            good_h.clone(),
            claims(r#","admin":true"#),
            "jwt.claims-members",
        ),
        (
            "sub uppercase TD",
            good_h.clone(),
            format!(
                r#"{{"sub":"spiffe://EXAMPLE.org/w","aud":["a"],"exp":{},"iat":{t}}}"#,
                t + 60
            ),
            "jwt.sub",
        ),
        (
            "claims not an object",
            good_h.clone(),
            "[1,2]".into(),
            "jwt.json",
        ),
    ];
    for (case, h, cl, rule) in &cases {
        expect_rule(
            case,
            issuer.sign_parts(h.as_bytes(), cl.as_bytes()),
            |e| e.rule(),
            rule,
        );
    }
    assert_eq!(
        probe.count(),
        signed,
        "no failed header/claims reached the key"
    );
}

#[test]
fn rejected_bundle_documents() {
    let root = root(&SoftwareKeys, KeyType::EcP256).unwrap();
    let doc = BundleDocument {
        sequence: 1,
        refresh_hint_secs: None,
        x509_authorities: vec![
            signet::spiffe::X509Authority::new(root.cert_der().to_vec()).unwrap(),
        ],
        jwt_authorities: vec![
            signet::spiffe::JwtAuthority::new(
                "k",
                SoftwareKeys
                    .make(KeyType::EcP256)
                    .unwrap()
                    .spki_der()
                    .to_vec(),
            )
            .unwrap(),
        ],
    };
    let good: serde_json::Value = serde_json::from_str(&doc.to_json().unwrap()).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "no keys",
            edit(&|v| {
                v.as_object_mut().unwrap().remove("keys");
            }),
            "\"keys\"",
        ),
        (
            "negative sequence",
            edit(&|v| v["spiffe_sequence"] = (-1).into()),
            "spiffe_sequence",
        ),
        (
            "x509 entry with kid",
            edit(&|v| v["keys"][0]["kid"] = "x".into()),
            "must not carry \"kid\"",
        ),
        (
            "x5c with two certs",
            edit(&|v| {
                let c = v["keys"][0]["x5c"][0].clone();
                v["keys"][0]["x5c"].as_array_mut().unwrap().push(c);
            }),
            "exactly one",
        ),
        (
            "x5c not base64",
            edit(&|v| v["keys"][0]["x5c"][0] = "***".into()),
            "base64",
        ),
        (
            "x509 key params mismatch",
            edit(&|v| {
                let y = v["keys"][1]["y"].clone();
                v["keys"][0]["y"] = y;
            }),
            "do not match",
        ),
        (
            "jwt entry without kid",
            edit(&|v| {
                v["keys"][1].as_object_mut().unwrap().remove("kid");
            }),
            "\"kid\"",
        ),
        (
            "jwt entry with padded x",
            edit(&|v| {
                let x = format!("{}=", v["keys"][1]["x"].as_str().unwrap());
                v["keys"][1]["x"] = x.into();
            }),
            "base64url",
        ),
        (
            "jwt entry curve P-521",
            edit(&|v| v["keys"][1]["crv"] = "P-521".into()),
            "P-521",
        ),
        (
            "jwt entry kty oct",
            edit(&|v| v["keys"][1]["kty"] = "oct".into()),
            "oct",
        ),
        (
            "duplicate kid",
            edit(&|v| {
                let k = v["keys"][1].clone();
                v["keys"].as_array_mut().unwrap().push(k);
            }),
            "kid",
        ),
        (
            "missing use",
            edit(&|v| {
                v["keys"][1].as_object_mut().unwrap().remove("use");
            }),
            "\"use\"",
        ),
        ("not JSON", b"{".to_vec(), "JSON"),
    ];
    for (case, json, needle) in &cases {
        let err = BundleDocument::parse(json).expect_err(case).to_string();
        assert!(
            err.contains(needle),
            "case {case:?}: error {err:?} does not name {needle:?}"
        );
    }
    // Unknown use values are ignored, as the standard asks.
    let ignored = edit(&|v| v["keys"][1]["use"] = "wit-svid".into());
    assert_eq!(
        BundleDocument::parse(&ignored)
            .unwrap()
            .jwt_authorities
            .len(),
        0
    );
}
