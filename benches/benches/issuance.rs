//! CPU cost of issuing one X509-SVID leaf outside the signature itself, piece by piece: CSR parse + signature
//! verification, template + DER assembly (rcgen), the pre-issuance lint, and the post-sign verification; plus the
//! whole issuance with an in-memory P-256 key, a JWT-SVID, and CSR signature verification with ring (what signet
//! uses) against RustCrypto's `p256`.
//!
//! Run: `cargo bench -p signet-bench --bench issuance`
//!
//! Verifier choice (2-core reference machine, loaded): ring verifies a P-256 CSR in ~80-105 µs, RustCrypto `p256`
//! 0.13 in ~500 µs (5-6x slower), so `p256` stays out. aws-lc-rs 1.19 was measured outside the workspace: within
//! noise of ring (64-85 µs vs 66-88 µs per P-256 verify), for a 2.5-minute cmake/C build of aws-lc-sys on 2 cores.
//! Not materially faster, so signet keeps ring.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark set-up: a failed fixture aborts the run"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use signet::jwt::JwtIssuer;
use signet::keys::spki::SubjectKey;
use signet::keys::{AuthorityKey, KeyType, SignatureScheme, SoftwareKey, verify_signature};
use signet::lint::x509::{IssuerFacts, LintContext, Profile, lint_tbs};
use signet::spiffe::{SpiffeId, TrustDomain};
use signet::x509::{Authority, LeafRequest, RootRequest, parse_and_verify_csr};
use time::OffsetDateTime;
use x509_parser::prelude::FromDer as _;

struct Fixture {
    root: Authority,
    root_key: Arc<dyn AuthorityKey>,
    csr: Vec<u8>,
    leaf_tbs: Vec<u8>,
    leaf_sig_raw: Vec<u8>,
    td: TrustDomain,
}

fn fixture() -> Fixture {
    let td = TrustDomain::parse("example.org").unwrap();
    let root_key: Arc<dyn AuthorityKey> =
        Arc::new(SoftwareKey::generate(KeyType::EcP256).unwrap().0);
    let mut subject = DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, "bench root");
    let req = RootRequest {
        trust_domain: td.clone(),
        subject,
        ttl: Duration::from_secs(86400),
        path_len: None,
    };
    let root =
        Authority::self_signed_root(root_key.clone(), &req, OffsetDateTime::now_utc()).unwrap();
    let wl = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(
        "spiffe://example.org/ns/prod/sa/web".try_into().unwrap(),
    )];
    let csr = p.serialize_request(&wl).unwrap().der().to_vec();
    let leaf = issue_leaf(&root, &csr);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let leaf_tbs = cert.tbs_certificate.as_ref().to_vec();
    let leaf_sig_raw = root_key
        .sign(SignatureScheme::EcdsaP256Sha256, &leaf_tbs)
        .unwrap();
    Fixture {
        root,
        root_key,
        csr,
        leaf_tbs,
        leaf_sig_raw,
        td,
    }
}

fn issue_leaf(root: &Authority, csr: &[u8]) -> Vec<u8> {
    let csr = parse_and_verify_csr(csr).unwrap();
    let req = LeafRequest::from_csr(&csr, Duration::from_secs(3600)).unwrap();
    root.issue_x509_svid(&req, OffsetDateTime::now_utc())
        .unwrap()
        .der
}

/// A signer that returns a fixed signature: measures rcgen's template + DER work alone.
struct FixedSigner {
    public: Vec<u8>,
    sig: Vec<u8>,
}

impl rcgen::PublicKeyData for FixedSigner {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for FixedSigner {
    fn sign(&self, _msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self.sig.clone())
    }
}

fn leaf_cpu(c: &mut Criterion) {
    let f = fixture();
    let mut g = c.benchmark_group("leaf_cpu");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);

    g.bench_function("csr_parse_verify", |b| {
        b.iter(|| parse_and_verify_csr(black_box(&f.csr)).unwrap())
    });

    // Template + DER: the same leaf template signet builds, signed by a fixed signature.
    let csr = parse_and_verify_csr(&f.csr).unwrap();
    let subject_key = csr.subject_key().clone();
    let root_spki = SubjectKey::from_spki_der(f.root_key.spki_der()).unwrap();
    let fixed = FixedSigner {
        public: root_spki.raw().to_vec(),
        sig: vec![0x30, 0x06, 2, 1, 1, 2, 1, 1],
    };
    let mut issuer_params = CertificateParams::default();
    issuer_params.key_identifier_method = KeyIdMethod::PreSpecified(root_spki.key_identifier());
    g.bench_function("template_der", |b| {
        b.iter(|| {
            let now = OffsetDateTime::now_utc();
            let mut p = CertificateParams::default();
            p.not_before = now - time::Duration::seconds(10);
            p.not_after = now + time::Duration::hours(1);
            p.serial_number = Some(SerialNumber::from_slice(&[0x5a; 16]));
            p.distinguished_name = DistinguishedName::new();
            p.subject_alt_names = vec![SanType::URI(
                "spiffe://example.org/ns/prod/sa/web".try_into().unwrap(),
            )];
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.use_authority_key_identifier_extension = true;
            p.key_identifier_method = KeyIdMethod::PreSpecified(subject_key.key_identifier());
            let issuer = Issuer::from_params(&issuer_params, &fixed);
            black_box(p.signed_by(&subject_key, &issuer).unwrap())
        })
    });

    let (_, root_cert) = x509_parser::parse_x509_certificate(f.root.cert_der()).unwrap();
    let root_ski = root_spki.key_identifier();
    let ctx = LintContext {
        profile: Profile::Leaf,
        trust_domain: &f.td,
        subject_spki: subject_key.spki_der(),
        signature_oid: "1.2.840.10045.4.3.2",
        issuer: Some(IssuerFacts {
            subject_der: root_cert.subject().as_raw(),
            key_id: &root_ski,
            not_after: f.root.not_after().unix_timestamp(),
        }),
        path_len: None,
        subject_der: None,
        issuing: false,
    };
    g.bench_function("lint", |b| {
        b.iter(|| lint_tbs(black_box(&f.leaf_tbs), &ctx).unwrap())
    });

    g.bench_function("post_sign_verify", |b| {
        b.iter(|| {
            verify_signature(
                f.root_key.spki_der(),
                SignatureScheme::EcdsaP256Sha256,
                black_box(&f.leaf_tbs),
                &f.leaf_sig_raw,
            )
            .unwrap()
        })
    });

    g.bench_function("sign_ring_p256", |b| {
        b.iter(|| {
            f.root_key
                .sign(SignatureScheme::EcdsaP256Sha256, black_box(&f.leaf_tbs))
                .unwrap()
        })
    });

    g.bench_function("issue_total_software_p256", |b| {
        b.iter(|| issue_leaf(&f.root, black_box(&f.csr)))
    });

    let jwt_key: Arc<dyn AuthorityKey> =
        Arc::new(SoftwareKey::generate(KeyType::EcP256).unwrap().0);
    let jwt = JwtIssuer::new(jwt_key, f.td.clone(), None, None, Duration::from_secs(3600)).unwrap();
    let sub = SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap();
    let aud = vec!["spiffe://example.org/backend".to_string()];
    g.bench_function("jwt_svid_total_software_es256", |b| {
        b.iter(|| {
            jwt.issue(
                &sub,
                &aud,
                Duration::from_secs(300),
                OffsetDateTime::now_utc(),
            )
            .unwrap()
        })
    });
    g.finish();
}

/// CSR signature verification: ring (through x509-parser, as signet does), ring directly, and RustCrypto p256.
fn csr_verifiers(c: &mut Criterion) {
    use p256::ecdsa::signature::Verifier as _;
    let f = fixture();
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(&f.csr)
        .expect("bench CSR parses");
    let info = req.certification_request_info.raw;
    let point = req
        .certification_request_info
        .subject_pki
        .subject_public_key
        .data
        .to_vec();
    let sig_der = req.signature_value.data.to_vec();

    let mut g = c.benchmark_group("csr_verify_p256");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    g.bench_function("x509_parser_ring", |b| {
        b.iter(|| black_box(&req).verify_signature().unwrap())
    });
    g.bench_function("ring", |b| {
        b.iter(|| {
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_ASN1,
                &point,
            )
            .verify(black_box(info), &sig_der)
            .unwrap()
        })
    });
    g.bench_function("rustcrypto_p256", |b| {
        b.iter(|| {
            let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
            let sig = p256::ecdsa::Signature::from_der(&sig_der).unwrap();
            vk.verify(black_box(info), &sig).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, leaf_cpu, csr_verifiers);
criterion_main!(benches);
