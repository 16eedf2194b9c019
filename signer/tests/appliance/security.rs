//! The security boundary: unauthenticated callers, foreign certificates, callers outside the policy, SPIFFE IDs
//! outside a caller's prefixes and rate limits are each refused with the right status and an audit line, and
//! nothing is issued; over-long TTLs are cut to the caller's maximum (the TTL rule; see `ttl.rs`).

use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::admin_client::AdminClient;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as ua;
use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_client::UpstreamAuthorityClient;
use tonic::Code;

use crate::support::bed::*;

fn issued_count(bed: &Bed) -> usize {
    bed.audit()
        .iter()
        .filter(|l| l["outcome"] == "issued")
        .count()
}

async fn jwt(
    c: &mut IssuerClient<tonic::transport::Channel>,
    id: &str,
    ttl: i64,
) -> Result<pb::MintJwtsvidResponse, tonic::Status> {
    c.mint_jwtsvid(pb::MintJwtsvidRequest {
        spiffe_id: id.into(),
        audience: vec!["a".into()],
        ttl_seconds: ttl,
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_and_foreign_callers_are_refused() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let before = issued_count(&bed);

    // No client certificate: the handshake refuses it, and no RPC runs.
    bed.refused_at_handshake(None).await;

    // A certificate for the admin's SPIFFE ID, from another CA: refused at the handshake too.
    let (ca, ca_key) = foreign_ca();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), ca_key).unwrap();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(ADMIN.try_into().unwrap())];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let forged = Credential {
        chain_pem: p.signed_by(&kp, &issuer).unwrap().pem(),
        key_pem: kp.serialize_pem(),
    };
    bed.refused_at_handshake(Some(&forged)).await;

    // Nothing ran for them: no RPC was audited, nothing issued.
    let audit = bed.audit();
    assert!(
        !audit.iter().any(|l| l["method"] == "GetStatus"),
        "{audit:?}"
    );
    assert_eq!(issued_count(&bed), before);

    // The server keeps serving its real callers.
    let mut admin = AdminClient::new(bed.channel(Some(&bed.admin())).await);
    admin.get_status(pb::GetStatusRequest {}).await.unwrap();
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_decides_who_gets_what() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let outsider = bed.credential_for(OUTSIDER).await;
    let agent = bed.credential_for(AGENT).await;
    let limited = bed.credential_for(LIMITED).await;
    let before = issued_count(&bed);

    // A caller no rule names.
    let mut o = IssuerClient::new(bed.channel(Some(&outsider)).await);
    let e = jwt(&mut o, "spiffe://example.org/workloads/x", 60)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("not in the policy"), "{}", e.message());

    // A caller that may use the issuer but not the upstream authority.
    let mut ua_client = UpstreamAuthorityClient::new(bed.channel(Some(&agent)).await);
    let (csr, _) = csr_for("spiffe://example.org");
    let e = ua_client
        .mint_x509ca_and_subscribe(ua::MintX509caRequest {
            csr,
            preferred_ttl: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("may not use the upstream-authority service"),
        "{}",
        e.message()
    );

    // A SPIFFE ID outside the agent's prefix, and an over-long TTL: per CSR in a batch, and for JWTs.
    let mut a = IssuerClient::new(bed.channel(Some(&agent)).await);
    let (csr1, _) = csr_for("spiffe://example.org/admin/x");
    let (csr2, _) = csr_for("spiffe://example.org/workloads/w");
    let r = a
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: vec![
                pb::X509svidRequest {
                    csr: csr1,
                    ttl_seconds: 60,
                },
                pb::X509svidRequest {
                    csr: csr2,
                    ttl_seconds: 2 * 3600,
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let f0 = expect_failure(&r.results[0]);
    assert_eq!(f0.code, Code::PermissionDenied as i32);
    assert!(
        f0.message
            .contains("may not request spiffe://example.org/admin/x"),
        "{}",
        f0.message
    );
    // An over-long TTL is cut to the policy's maximum (the TTL rule), never beyond it.
    let s1 = expect_svid(r.results[1].clone());
    let (_, leaf) = x509_parser::parse_x509_certificate(&s1.cert_chain[0]).unwrap();
    assert_eq!(
        leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp(),
        3600 + 10,
        "cut to the agent's max_ttl of 1 h (NotBefore backdated 10 s)"
    );
    let e = jwt(&mut a, "spiffe://example.org/admin/x", 60)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let t = jwt(&mut a, "spiffe://example.org/workloads/w", 7200)
        .await
        .unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        t.expires_at <= now + 3600,
        "cut to the agent's 1 h: {}",
        t.expires_at - now
    );

    // A rate limit of 1/h with a burst of 2: the third credential is refused with the limit in the message.
    let mut l = IssuerClient::new(bed.channel(Some(&limited)).await);
    jwt(&mut l, "spiffe://example.org/workloads/l", 60)
        .await
        .unwrap();
    jwt(&mut l, "spiffe://example.org/workloads/l", 60)
        .await
        .unwrap();
    let e = jwt(&mut l, "spiffe://example.org/workloads/l", 60)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("rate limit"), "{}", e.message());

    let audit = bed.audit();
    assert_eq!(
        issued_count(&bed),
        before + 4,
        "only the agent's two over-long requests (cut to its maximum) and the rate-limited caller's two tokens \
         were issued"
    );
    let refused = |caller: &str| {
        audit
            .iter()
            .filter(|l| l["caller"] == caller && l["outcome"] == "refused")
            .count()
    };
    assert_eq!(refused(OUTSIDER), 1);
    assert_eq!(refused(AGENT), 3);
    assert_eq!(refused(LIMITED), 1);
    assert!(
        audit
            .iter()
            .any(|l| l["code"] == "RESOURCE_EXHAUSTED" && l["caller"] == LIMITED)
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_follows_the_bundle() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let mut admin = AdminClient::new(bed.channel(Some(&bed.admin())).await);
    admin.get_status(pb::GetStatusRequest {}).await.unwrap();
    // A client verified before is not trusted any more once its root leaves the bundle, on the same connection.
    let root = bed.app.bundle().current().x509_roots[0].clone();
    let (foreign, _) = foreign_ca();
    assert!(bed.app.bundle().add_x509_root(foreign.der().to_vec()));
    assert!(bed.app.bundle().remove_x509_root(&root));
    let e = admin.get_status(pb::GetStatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(bed.app.bundle().add_x509_root(root));
    admin.get_status(pb::GetStatusRequest {}).await.unwrap();
    bed.stop().await;
}
