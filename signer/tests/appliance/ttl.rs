//! The TTL rule (signet.proto, above the Issuer service) over the wire, in direct and delegated mode alike: 0 is the
//! default, negative is INVALID_ARGUMENT, above the caller's policy maximum is cut to it, nothing outlives the CA
//! that signs it, and huge values (i64::MAX, i32::MAX) are cut, never an error or a panic. Checked on
//! BatchMintX509SVID, MintJWTSVID and MintX509CA, with the audit lines.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use signet::config::{ConfigDuration, ModeSetting};
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as ua;
use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_client::UpstreamAuthorityClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::bed::*;
use crate::support::openssl_verify;

/// The JWT authority's own maximum in these runs (shorter than the policy's, so that it is the one that cuts).
const JWT_AUTHORITY_MAX: u64 = 1800;

/// (NotBefore, NotAfter) of a DER certificate, Unix seconds.
fn validity(der: &[u8]) -> (i64, i64) {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    (
        c.validity().not_before.timestamp(),
        c.validity().not_after.timestamp(),
    )
}

async fn mint_x509(c: &mut IssuerClient<Channel>, id: &str, ttl: i64) -> pb::X509svidResult {
    let (csr, _) = csr_for(id);
    c.batch_mint_x509svid(pb::BatchMintX509svidRequest {
        requests: vec![pb::X509svidRequest {
            csr,
            ttl_seconds: ttl,
        }],
    })
    .await
    .unwrap()
    .into_inner()
    .results
    .remove(0)
}

/// A SPIRE server's CA CSR: a subject, the trust domain's ID.
fn ca_csr() -> Vec<u8> {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "SPIFFE");
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org".try_into().unwrap(),
    )];
    params.serialize_request(&kp).unwrap().der().to_vec()
}

/// The claims of a JWT-SVID: (iat, exp).
fn iat_exp(token: &str) -> (i64, i64) {
    let claims = token.split('.').nth(1).unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    (v["iat"].as_i64().unwrap(), v["exp"].as_i64().unwrap())
}

async fn mint_jwt(
    c: &mut IssuerClient<Channel>,
    id: &str,
    ttl: i64,
) -> Result<pb::MintJwtsvidResponse, tonic::Status> {
    c.mint_jwtsvid(pb::MintJwtsvidRequest {
        spiffe_id: id.into(),
        audience: vec!["aud".into()],
        ttl_seconds: ttl,
    })
    .await
    .map(|r| r.into_inner())
}

async fn ttl_rule_in(mode: ModeSetting) {
    let delegated = mode == ModeSetting::Delegated;
    // The admin has no policy maximum (so the issuing CA's NotAfter is what cuts a huge TTL); agents have 1 h.
    let Some(bed) = Bed::start_with(|cfg| {
        cfg.authority.x509.mode = mode;
        cfg.authority.jwt.max_ttl = ConfigDuration(Duration::from_secs(JWT_AUTHORITY_MAX));
        cfg.policy[0].max_ttl = None;
    })
    .await
    else {
        return;
    };
    let root = bed.app.bundle().current().x509_roots[0].clone();
    let (_, root_not_after) = validity(&root);
    let mut admin = IssuerClient::new(bed.channel(Some(&bed.admin())).await);
    let agent = bed.credential_for(AGENT).await;
    let mut agent = IssuerClient::new(bed.channel(Some(&agent)).await);
    let w = "spiffe://example.org/workloads/w";

    // Huge: i64::MAX with no policy maximum is cut at the NotAfter of the CA that signed the leaf (the root in
    // direct mode, the issuing intermediate in delegated mode).
    let svid = expect_svid(mint_x509(&mut admin, w, i64::MAX).await);
    let (_, leaf_not_after) = validity(&svid.cert_chain[0]);
    assert_eq!(svid.expires_at, leaf_not_after);
    let issuer_not_after = if delegated {
        assert_eq!(svid.cert_chain.len(), 2, "leaf and issuing intermediate");
        let (_, n) = validity(&svid.cert_chain[1]);
        assert!(n < root_not_after);
        n
    } else {
        assert_eq!(svid.cert_chain.len(), 1, "the leaf only; the root signs it");
        root_not_after
    };
    assert_eq!(
        leaf_not_after, issuer_not_after,
        "cut at the issuing CA's NotAfter"
    );
    openssl_verify(
        std::slice::from_ref(&root),
        &svid.cert_chain[1..],
        &svid.cert_chain[0],
    )
    .unwrap();

    // Above the policy maximum (the agent's 1 h), huge included: cut to exactly the maximum. Zero: the default,
    // 1 h. (NotBefore is backdated 10 s.)
    for ttl in [7200, i64::MAX, 0, 3600] {
        let svid = expect_svid(mint_x509(&mut agent, w, ttl).await);
        let (nb, na) = validity(&svid.cert_chain[0]);
        assert_eq!(na - nb, 3600 + 10, "ttl {ttl}");
    }
    let svid = expect_svid(mint_x509(&mut agent, w, 60).await);
    let (nb, na) = validity(&svid.cert_chain[0]);
    assert_eq!(na - nb, 60 + 10, "a TTL within the maximum is kept");

    // Negative: INVALID_ARGUMENT, nothing issued.
    for ttl in [-1, i64::MIN] {
        let r = mint_x509(&mut agent, w, ttl).await;
        let f = expect_failure(&r);
        assert_eq!(f.code, Code::InvalidArgument as i32, "ttl {ttl}: {f:?}");
        assert!(f.message.contains("negative"), "{}", f.message);
    }

    // JWT-SVIDs: the same rule; here the JWT authority's 30 min is below the agent's 1 h, so it cuts.
    for (ttl, want) in [
        (0, 300),
        (60, 60),
        (7200, JWT_AUTHORITY_MAX as i64),
        (i64::MAX, JWT_AUTHORITY_MAX as i64),
    ] {
        let r = mint_jwt(&mut agent, w, ttl).await.unwrap();
        let (iat, exp) = iat_exp(&r.token);
        assert_eq!(exp - iat, want, "jwt ttl {ttl}");
        assert_eq!(r.expires_at, exp);
    }
    let r = mint_jwt(&mut admin, w, i64::MAX).await.unwrap();
    let (iat, exp) = iat_exp(&r.token);
    assert_eq!(exp - iat, JWT_AUTHORITY_MAX as i64);
    for ttl in [-1, i64::MIN] {
        let e = mint_jwt(&mut agent, w, ttl).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "jwt ttl {ttl}: {e:?}");
    }

    // MintX509CA: 0 is 1 h, above SPIRE_A's 24 h maximum (i32::MAX) is cut to it, negative is refused.
    let spire = bed.credential_for(SPIRE_A).await;
    let mut up = UpstreamAuthorityClient::new(bed.channel(Some(&spire)).await);
    for (ttl, want) in [(0, 3600), (i32::MAX, 24 * 3600), (600, 600)] {
        let csr = ca_csr();
        let mut s = up
            .mint_x509ca_and_subscribe(ua::MintX509caRequest {
                csr,
                preferred_ttl: ttl,
            })
            .await
            .unwrap()
            .into_inner();
        let first = next(&mut s).await;
        let (nb, na) = validity(&first.x509_ca_chain[0].asn1);
        assert_eq!(na - nb, want + 10, "preferred_ttl {ttl}");
        assert!(na <= root_not_after);
    }
    for ttl in [-1, i32::MIN] {
        let csr = ca_csr();
        let e = up
            .mint_x509ca_and_subscribe(ua::MintX509caRequest {
                csr,
                preferred_ttl: ttl,
            })
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "preferred_ttl {ttl}: {e:?}"
        );
    }

    // The audit: every refusal with its code, every issuance with the NotAfter it got.
    let audit = bed.audit();
    let x509 = audit_lines(&audit, AGENT, "BatchMintX509SVID");
    assert_eq!(
        x509.iter()
            .filter(|l| l["code"] == "INVALID_ARGUMENT")
            .count(),
        2,
        "{x509:?}"
    );
    assert_eq!(x509.iter().filter(|l| l["outcome"] == "issued").count(), 5);
    let jwt = audit_lines(&audit, AGENT, "MintJWTSVID");
    assert_eq!(
        jwt.iter()
            .filter(|l| l["code"] == "INVALID_ARGUMENT")
            .count(),
        2,
        "{jwt:?}"
    );
    let huge = audit_lines(&audit, ADMIN, "BatchMintX509SVID");
    assert!(
        huge.iter()
            .any(|l| l["outcome"] == "issued" && l["expires_at"] == issuer_not_after),
        "{huge:?}"
    );
    let ca = audit_lines(&audit, SPIRE_A, "MintX509CAAndSubscribe");
    assert_eq!(
        ca.iter()
            .filter(|l| l["code"] == "INVALID_ARGUMENT")
            .count(),
        2,
        "{ca:?}"
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_rule_direct_mode() {
    ttl_rule_in(ModeSetting::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_rule_delegated_mode() {
    ttl_rule_in(ModeSetting::Delegated).await;
}
