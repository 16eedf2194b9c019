//! signet's Issuer and Admin over gRPC: batch X509-SVIDs verified with the spiffe crate and openssl, JWT-SVIDs
//! verified with the spiffe crate against GetBundle's bundle, and the status.

use signet::spiffe::BundleDocument;
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::admin_client::AdminClient;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use spiffe::{JwtBundle, JwtBundleSet, JwtSvid};
use tonic::Code;

use crate::support::bed::*;
use crate::support::openssl_verify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_answers_each_csr_in_order() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let agent = bed.credential_for(AGENT).await;
    let mut c = IssuerClient::new(bed.channel(Some(&agent)).await);
    let ids = [
        "spiffe://example.org/workloads/a",
        "spiffe://example.org/elsewhere/b",
        "spiffe://example.org/workloads/c",
    ];
    let mut keys = Vec::new();
    let mut requests = Vec::new();
    for id in ids {
        let (csr, kp) = csr_for(id);
        keys.push(kp);
        requests.push(pb::X509svidRequest {
            csr,
            ttl_seconds: 600,
        });
    }
    let r = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest { requests })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 3);
    assert_eq!(
        expect_failure(&r.results[1]).code,
        Code::PermissionDenied as i32
    );
    let roots = bed.app.bundle().current().x509_roots.clone();
    for i in [0, 2] {
        let svid = expect_svid(r.results[i].clone());
        assert_eq!(svid.spiffe_id, ids[i]);
        let chain: Vec<u8> = svid.cert_chain.concat();
        let parsed = spiffe::X509Svid::parse_from_der(&chain, &keys[i].serialize_der()).unwrap();
        assert_eq!(parsed.spiffe_id().to_string(), ids[i]);
        openssl_verify(&roots, &svid.cert_chain[1..], &svid.cert_chain[0]).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&svid.cert_chain[0]).unwrap();
        assert_eq!(hex::encode(leaf.raw_serial()), svid.serial);
        assert_eq!(leaf.validity().not_after.timestamp(), svid.expires_at);
    }
    // One audit line per CSR, with serials for the issued ones.
    let audit = bed.audit();
    let lines = audit_lines(&audit, AGENT, "BatchMintX509SVID");
    assert_eq!(lines.len(), 3);
    assert_eq!(lines.iter().filter(|l| l["outcome"] == "issued").count(), 2);
    assert!(
        lines
            .iter()
            .filter(|l| l["outcome"] == "issued")
            .all(|l| l["serial"].is_string())
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegated_mode_svids_chain_through_the_issuing_intermediate() {
    let Some(bed) =
        Bed::start_with(|c| c.authority.x509.mode = signet::config::ModeSetting::Delegated).await
    else {
        return;
    };
    let mut c = IssuerClient::new(bed.channel(Some(&bed.admin())).await);
    let (csr, kp) = csr_for("spiffe://example.org/workloads/d");
    let r = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: vec![pb::X509svidRequest {
                csr,
                ttl_seconds: 0,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let svid = expect_svid(r.results[0].clone());
    assert_eq!(svid.cert_chain.len(), 2, "leaf + issuing intermediate");
    let roots = bed.app.bundle().current().x509_roots.clone();
    openssl_verify(&roots, &svid.cert_chain[1..], &svid.cert_chain[0]).unwrap();
    spiffe::X509Svid::parse_from_der(&svid.cert_chain.concat(), &kp.serialize_der()).unwrap();
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_verify_against_the_served_bundle() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let agent = bed.credential_for(AGENT).await;
    let mut c = IssuerClient::new(bed.channel(Some(&agent)).await);
    let minted = c
        .mint_jwtsvid(pb::MintJwtsvidRequest {
            spiffe_id: "spiffe://example.org/workloads/j".into(),
            audience: vec!["db".into()],
            ttl_seconds: 300,
        })
        .await
        .unwrap()
        .into_inner();
    let bundle = c
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let doc = BundleDocument::parse(&bundle.spiffe_bundle).unwrap();
    assert_eq!(doc.sequence, bundle.sequence);
    assert_eq!(doc.x509_authorities.len(), bundle.x509_authorities.len());
    let jwks = doc.jwt_authorities_jwks().unwrap();
    let mut set = JwtBundleSet::new();
    set.add_bundle(
        JwtBundle::from_jwt_authorities(spiffe::TrustDomain::new(TD).unwrap(), jwks.as_bytes())
            .unwrap(),
    );
    let svid =
        JwtSvid::parse_and_validate(&minted.token, &set, &["db"]).expect("spiffe crate verifies");
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/workloads/j"
    );
    assert!(JwtSvid::parse_and_validate(&minted.token, &set, &["other"]).is_err());
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_status_reports_authorities_tokens_and_sequence() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let mut a = AdminClient::new(bed.channel(Some(&bed.admin())).await);
    let s = a
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.trust_domain, TD);
    assert_eq!(s.tokens.len(), 1);
    assert!(s.tokens[0].healthy);
    assert_eq!(s.tokens[0].sessions, 1);
    assert!(
        s.authorities
            .iter()
            .any(|x| x.kind == "x509" && x.state == "active")
    );
    assert!(s.authorities.iter().any(|x| x.kind == "jwt"));
    assert_eq!(s.bundle_sequence, bed.app.bundle().current().sequence);
    bed.stop().await;
}
