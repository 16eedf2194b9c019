//! The independent judges (Go's crypto/x509, Python `cryptography`; `support::judges`) over what a running appliance
//! issued from its SoftHSM2 token through the wire: an X509-SVID signed by the token (direct mode) checked against
//! the published bundle, and a SPIRE CA minted through UpstreamAuthority with a leaf SPIRE would sign under it,
//! checked against the roots the appliance returned. Each judge must accept those and refuse the same X509-SVID
//! with one byte of its signature flipped.

use std::path::Path;

use signet::config::ModeSetting;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as ua;
use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_client::UpstreamAuthorityClient;

use crate::support::bed::*;
use crate::support::corrupt_signature;
use crate::support::judges::{Judge, write_case};

/// Cases of what the appliance issued: `good` holds the X509-SVID (case-00) and the SPIRE CA chain (case-01);
/// `bad` the X509-SVID with a corrupted signature byte (case-00).
async fn issued_cases(bed: &Bed, good: &Path, bad: &Path) {
    // An X509-SVID over the Issuer API, checked against the bundle the appliance published (its bundle file).
    let mut issuer = IssuerClient::new(bed.channel(Some(&bed.admin())).await);
    let (csr, _key) = csr_for("spiffe://example.org/workloads/judged");
    let svid = expect_svid(mint_one(&mut issuer, csr, 600).await);
    let published: Vec<Vec<u8>> = pem::parse_many(bed.roots_pem())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect();
    assert!(!published.is_empty(), "the appliance published no root");
    let (leaf, chain) = svid.cert_chain.split_first().unwrap();
    write_case(good, 0, &published, chain, leaf);
    write_case(bad, 0, &published, chain, &corrupt_signature(leaf));

    // A SPIRE CA over UpstreamAuthority (SPIRE's CSR), and a leaf SPIRE would sign under it.
    let spire = bed.credential_for(SPIRE_A).await;
    let mut upstream = UpstreamAuthorityClient::new(bed.channel(Some(&spire)).await);
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
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
    let csr = params.serialize_request(&ca_key).unwrap().der().to_vec();
    let mut stream = upstream
        .mint_x509ca_and_subscribe(ua::MintX509caRequest {
            csr,
            preferred_ttl: 3600,
        })
        .await
        .unwrap()
        .into_inner();
    let minted = next(&mut stream).await;
    drop(stream);
    let roots: Vec<Vec<u8>> = minted
        .upstream_x509_roots
        .iter()
        .map(|r| r.asn1.clone())
        .collect();
    let ca: Vec<Vec<u8>> = minted
        .x509_ca_chain
        .iter()
        .map(|c| c.asn1.clone())
        .collect();
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca[0].clone().into(), ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/workload/under-spire"
            .try_into()
            .unwrap(),
    )];
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    let leaf = p.signed_by(&leaf_key, &issuer).unwrap();
    write_case(good, 1, &roots, &ca, leaf.der());
}

/// Starts an appliance on SoftHSM2 in direct mode (the token signs every certificate), has `judge` judge what it
/// issued, and asserts acceptance of the real output and refusal of the corrupted one.
async fn judged_by(judge: Judge, test: &str) {
    if !judge.available(test) {
        return;
    }
    let Some(bed) = Bed::start_with(|c| c.authority.x509.mode = ModeSetting::Direct).await else {
        return;
    };
    let good = tempfile::tempdir().unwrap();
    let bad = tempfile::tempdir().unwrap();
    issued_cases(&bed, good.path(), bad.path()).await;
    let (ok, text) = judge.judge(good.path());
    assert!(
        ok,
        "{} refuses what the appliance issued:\n{text}",
        judge.name()
    );
    assert_eq!(text.matches("ok case-").count(), 2, "{text}");
    let (ok, text) = judge.judge(bad.path());
    assert!(
        !ok && text.contains("FAIL"),
        "{} accepted an X509-SVID with a corrupted signature: {text}",
        judge.name()
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_crypto_x509_judges_what_the_appliance_issued_from_softhsm() {
    judged_by(
        Judge::Go,
        "go_crypto_x509_judges_what_the_appliance_issued_from_softhsm",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_cryptography_judges_what_the_appliance_issued_from_softhsm() {
    judged_by(
        Judge::Python,
        "python_cryptography_judges_what_the_appliance_issued_from_softhsm",
    )
    .await;
}
