//! The trust boundary, attacked over the wire: only credentials signet signed itself act on signet.
//!
//! A SPIRE server with the upstream-authority role gets a CA from `MintX509CAAndSubscribe`, and that CA can sign
//! any SPIFFE ID of the trust domain, `signet/admin` included. Each test here does what such an attacker would do
//! (a real MintX509CA answer, leaves signed under it, presented over mTLS) and checks the exact status, that
//! nothing was issued or changed, and the audit line. Also: signet's own IDs cannot be minted, the handshake
//! requires a client certificate, a flood of unauthenticated peers is bounded and audited in aggregate, and the
//! opt-in for downstream credentials reaches the issuer service alone.

use std::time::Duration;

use signet::config::ModeSetting;
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::admin_client::AdminClient;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use signet_proto::spire::plugin::server::keymanager::v1 as km;
use signet_proto::spire::plugin::server::keymanager::v1::key_manager_client::KeyManagerClient;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as ua;
use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_client::UpstreamAuthorityClient;
use tonic::Code;

use crate::support::bed::*;
use crate::support::pem_chain;

/// A SPIRE server's CA, minted by the appliance for `spire` (a real MintX509CA answer), with its key.
async fn spire_ca(bed: &Bed, spire: &Credential) -> (Vec<u8>, rcgen::KeyPair) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "SPIRE");
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org".try_into().unwrap(),
    )];
    let csr = params.serialize_request(&kp).unwrap().der().to_vec();
    let mut c = UpstreamAuthorityClient::new(bed.channel(Some(spire)).await);
    let mut stream = c
        .mint_x509ca_and_subscribe(ua::MintX509caRequest {
            csr,
            preferred_ttl: 3600,
        })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    (first.x509_ca_chain[0].asn1.clone(), kp)
}

/// A client X509-SVID for `id` signed by the CA `ca` (DER) with `ca_key`, presented with that CA.
fn signed_under(ca: &[u8], ca_key: &rcgen::KeyPair, id: &str) -> Credential {
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca.to_vec().into(), ca_key).unwrap();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf = p.signed_by(&kp, &issuer).unwrap();
    Credential {
        chain_pem: pem_chain(&[leaf.der().to_vec(), ca.to_vec()]),
        key_pem: kp.serialize_pem(),
    }
}

fn count(bed: &Bed, outcome: &str) -> usize {
    bed.audit()
        .iter()
        .filter(|l| l["outcome"] == outcome)
        .count()
}

/// Asserts `e` is PERMISSION_DENIED for a credential a CA below signet signed, and that the refusal of `caller`
/// on `method` is the audit log's latest line for them.
fn assert_downstream_refused(bed: &Bed, e: &tonic::Status, caller: &str, method: &str) {
    assert_eq!(e.code(), Code::PermissionDenied, "{method}: {e:?}");
    assert!(
        e.message().contains("a CA below signet") && e.message().contains("O=SPIRE"),
        "{method}: {}",
        e.message()
    );
    let audit = bed.audit();
    let lines = audit_lines(&audit, caller, method);
    let last = lines
        .last()
        .unwrap_or_else(|| panic!("no audit line for {caller} {method}"));
    assert_eq!(last["outcome"], "refused", "{last}");
    assert_eq!(last["code"], "PERMISSION_DENIED", "{last}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("a CA below signet"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spire_ca_cannot_make_itself_signets_admin() {
    let Some(bed) = Bed::start().await else {
        panic!("the SoftHSM2 test bed is required");
    };
    let spire = bed.credential_for(SPIRE_A).await;
    let (ca, ca_key) = spire_ca(&bed, &spire).await;
    let issued = count(&bed, "issued");
    let mut admin = AdminClient::new(bed.channel(Some(&bed.admin())).await);
    let rotation = admin
        .get_rotation(pb::GetRotationRequest {})
        .await
        .unwrap()
        .into_inner();

    // The attacker's leaf for signet's admin ID chains to signet's root (through the SPIRE CA), so it passes the
    // handshake; it gets no role.
    let forged = signed_under(&ca, &ca_key, ADMIN);
    let mut f = AdminClient::new(bed.channel(Some(&forged)).await);
    let e = f.get_status(pb::GetStatusRequest {}).await.unwrap_err();
    assert_downstream_refused(&bed, &e, ADMIN, "GetStatus");
    let e = f.get_rotation(pb::GetRotationRequest {}).await.unwrap_err();
    assert_downstream_refused(&bed, &e, ADMIN, "GetRotation");
    for step in ["prepare", "taint", "destroy"] {
        let e = f
            .rotate(pb::RotateRequest {
                step: step.into(),
                kind: "x509".into(),
                label: rotation.authorities[0].label.clone(),
            })
            .await
            .unwrap_err();
        assert_downstream_refused(&bed, &e, ADMIN, "Rotate");
    }
    // Nor does it issue, mint CAs or use SPIRE's keys under any of the roles' IDs.
    let mut i = IssuerClient::new(bed.channel(Some(&forged)).await);
    let e = i
        .mint_jwtsvid(pb::MintJwtsvidRequest {
            spiffe_id: "spiffe://example.org/workloads/x".into(),
            audience: vec!["a".into()],
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_downstream_refused(&bed, &e, ADMIN, "MintJWTSVID");
    // Nor can it launder the forged credential into one of signet's own by renewing it.
    let (csr, _) = csr_for(ADMIN);
    let e = i
        .renew_x509svid(pb::RenewX509svidRequest {
            csr,
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_downstream_refused(&bed, &e, ADMIN, "RenewX509SVID");
    let as_spire = signed_under(&ca, &ca_key, SPIRE_B);
    let mut u = UpstreamAuthorityClient::new(bed.channel(Some(&as_spire)).await);
    let (csr, _) = csr_for("spiffe://example.org");
    let e = u
        .mint_x509ca_and_subscribe(ua::MintX509caRequest {
            csr,
            preferred_ttl: 60,
        })
        .await
        .unwrap_err();
    assert_downstream_refused(&bed, &e, SPIRE_B, "MintX509CAAndSubscribe");
    let mut k = KeyManagerClient::new(bed.channel(Some(&as_spire)).await);
    let e = k
        .get_public_keys(km::GetPublicKeysRequest {})
        .await
        .unwrap_err();
    assert_downstream_refused(&bed, &e, SPIRE_B, "GetPublicKeys");
    let as_agent = signed_under(&ca, &ca_key, AGENT);
    let mut a = IssuerClient::new(bed.channel(Some(&as_agent)).await);
    let (csr, _) = csr_for("spiffe://example.org/workloads/w");
    let e = a
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: vec![pb::X509svidRequest {
                csr,
                ttl_seconds: 60,
            }],
        })
        .await
        .unwrap_err();
    assert_downstream_refused(&bed, &e, AGENT, "BatchMintX509SVID");

    // Nothing was issued and nothing moved.
    assert_eq!(count(&bed, "issued"), issued);
    let after = admin
        .get_rotation(pb::GetRotationRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, rotation);
    // signet's own credential still works, and so does the SPIRE server's own (signet-issued) one.
    admin.get_status(pb::GetStatusRequest {}).await.unwrap();
    let mut k = KeyManagerClient::new(bed.channel(Some(&spire)).await);
    k.get_public_keys(km::GetPublicKeysRequest {})
        .await
        .unwrap();
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signets_own_ids_are_never_minted() {
    let Some(bed) = Bed::start().await else {
        panic!("the SoftHSM2 test bed is required");
    };
    // The admin's rule allows every ID of the trust domain; signet's own stay out of reach all the same.
    let issued = count(&bed, "issued");
    let mut c = IssuerClient::new(bed.channel(Some(&bed.admin())).await);
    for id in [
        "spiffe://example.org/signet/admin",
        "spiffe://example.org/signet/server",
        "spiffe://example.org/signet",
        "spiffe://example.org/signet/anything/else",
    ] {
        let (csr, _) = csr_for(id);
        let r = mint_one(&mut c, csr, 60).await;
        let f = expect_failure(&r);
        assert_eq!(f.code, Code::PermissionDenied as i32, "{id}: {f:?}");
        assert!(f.message.contains("reserved"), "{id}: {}", f.message);
        let e = c
            .mint_jwtsvid(pb::MintJwtsvidRequest {
                spiffe_id: id.into(),
                audience: vec!["a".into()],
                ttl_seconds: 60,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{id}: {e:?}");
        assert!(e.message().contains("reserved"), "{id}: {}", e.message());
        let audit = bed.audit();
        for method in ["BatchMintX509SVID", "MintJWTSVID"] {
            assert!(
                audit_lines(&audit, ADMIN, method)
                    .iter()
                    .any(|l| l["spiffe_id"] == id
                        && l["outcome"] == "refused"
                        && l["code"] == "PERMISSION_DENIED"),
                "{id} {method}: {audit:?}"
            );
        }
    }
    // A neighbour that merely starts with the same letters is an ordinary ID.
    jwt_ok(&mut c, "spiffe://example.org/signetwork/x").await;
    assert_eq!(count(&bed, "issued"), issued + 1);
    bed.stop().await;
}

async fn jwt_ok(c: &mut IssuerClient<tonic::transport::Channel>, id: &str) {
    c.mint_jwtsvid(pb::MintJwtsvidRequest {
        spiffe_id: id.into(),
        audience: vec!["a".into()],
        ttl_seconds: 60,
    })
    .await
    .unwrap_or_else(|e| panic!("{id}: {e:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_credentials_reach_the_issuer_only_by_opt_in() {
    const DOWN: &str = "spiffe://example.org/downstream/*";
    let Some(bed) = Bed::start_with(|c| {
        let mut r = c.policy[3].clone();
        r.caller = DOWN.into();
        r.downstream_credentials = true;
        c.policy.push(r);
    })
    .await
    else {
        panic!("the SoftHSM2 test bed is required");
    };
    let spire = bed.credential_for(SPIRE_A).await;
    let (ca, ca_key) = spire_ca(&bed, &spire).await;
    let w = signed_under(&ca, &ca_key, "spiffe://example.org/downstream/w1");
    let mut c = IssuerClient::new(bed.channel(Some(&w)).await);
    jwt_ok(&mut c, "spiffe://example.org/workloads/from-downstream").await;
    // The same credential calling admin is refused: the opt-in is for the issuer service alone.
    let mut a = AdminClient::new(bed.channel(Some(&w)).await);
    let e = a.get_status(pb::GetStatusRequest {}).await.unwrap_err();
    assert_downstream_refused(&bed, &e, "spiffe://example.org/downstream/w1", "GetStatus");
    bed.stop().await;

    // A rule that opts in and grants more than the issuer service is refused at start.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = signet::config::Config::embedded_default();
    cfg.data_dir = dir.path().to_path_buf();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.metrics = None;
    cfg.policy[0].downstream_credentials = true;
    let e = signet::serve::Appliance::start(cfg).await.unwrap_err();
    assert!(
        e.to_string().contains("downstream_credentials") && e.to_string().contains("issuer"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegated_mode_credentials_are_signets_own() {
    let Some(bed) = Bed::start_with(|c| c.authority.x509.mode = ModeSetting::Delegated).await
    else {
        panic!("the SoftHSM2 test bed is required");
    };
    // An agent's SVID is signed by the in-memory issuing intermediate, which signet made: it acts.
    let agent = bed.credential_for(AGENT).await;
    assert_eq!(
        pem::parse_many(&agent.chain_pem).unwrap().len(),
        2,
        "leaf and issuing intermediate"
    );
    let mut c = IssuerClient::new(bed.channel(Some(&agent)).await);
    jwt_ok(&mut c, "spiffe://example.org/workloads/d").await;
    let spire = bed.credential_for(SPIRE_A).await;
    let mut k = KeyManagerClient::new(bed.channel(Some(&spire)).await);
    k.get_public_keys(km::GetPublicKeysRequest {})
        .await
        .unwrap();

    // The CA minted for SPIRE is also directly below the root, but it is not an issuing intermediate: what it
    // signs is refused, in delegated mode as in direct mode.
    let (ca, ca_key) = spire_ca(&bed, &spire).await;
    let (_, parsed) = x509_parser::parse_x509_certificate(&ca).unwrap();
    assert!(
        !signet::x509::issuing::carries_issuing_policy(&parsed),
        "a SPIRE CA never carries the issuing policy"
    );
    let forged = signed_under(&ca, &ca_key, AGENT);
    let mut f = IssuerClient::new(bed.channel(Some(&forged)).await);
    let e = f
        .mint_jwtsvid(pb::MintJwtsvidRequest {
            spiffe_id: "spiffe://example.org/workloads/d".into(),
            audience: vec!["a".into()],
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_downstream_refused(&bed, &e, AGENT, "MintJWTSVID");
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_rpc_runs_before_authentication() {
    let Some(bed) = Bed::start_with(|c| {
        c.server.refusal_audit_interval = signet::config::ConfigDuration(Duration::from_secs(1));
    })
    .await
    else {
        panic!("the SoftHSM2 test bed is required");
    };
    let lines_before = bed.audit().len();
    // No client certificate: refused at the handshake.
    let e = bed.refused_at_handshake(None).await;
    assert!(!e.is_empty());
    // A certificate for the admin's ID from another CA: refused at the handshake too.
    let (ca, ca_key) = foreign_ca();
    let forged = signed_under(ca.der(), &ca_key, ADMIN);
    bed.refused_at_handshake(Some(&forged)).await;
    // A self-signed SVID for the admin's ID.
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(ADMIN.try_into().unwrap())];
    let selfsigned = Credential {
        chain_pem: p.self_signed(&kp).unwrap().pem(),
        key_pem: kp.serialize_pem(),
    };
    bed.refused_at_handshake(Some(&selfsigned)).await;

    // No RPC was audited for them (none ran); the refusals arrive as one aggregated line for the peer address.
    let line = wait_for_refusal_line(&bed, lines_before, 3).await;
    // (A client's channel may try a refused connection more than once, so the counts are at least the attempts.)
    let reason = line["reason"].as_str().unwrap();
    assert!(reason.contains("no_certificate="), "{reason}");
    assert!(reason.contains("untrusted_certificate="), "{reason}");
    assert!(
        reason.contains("not trusted by trust domain example.org"),
        "{reason}"
    );
    assert_eq!(line["caller"], "");
    assert_eq!(line["code"], "UNAUTHENTICATED");
    assert!(
        bed.audit()[lines_before..]
            .iter()
            .all(|l| l["method"] == "handshake"),
        "nothing but the aggregated line was written"
    );
    bed.stop().await;
}

/// Waits (bounded) until the audit log, after its first `skip` lines, holds handshake refusal lines for 127.0.0.1
/// counting at least `at_least` connections in all; returns the last of them.
async fn wait_for_refusal_line(bed: &Bed, skip: usize, at_least: u64) -> serde_json::Value {
    crate::support::wait::wait_for_async(
        &format!("handshake refusal lines counting {at_least} connections in all"),
        Duration::from_secs(60),
        || {
            let found = refusal_line(bed, skip, at_least);
            async move { found }
        },
    )
    .await
}

/// The last handshake refusal line for 127.0.0.1 after the first `skip` lines of the audit log, once they count
/// `at_least` connections in all; or the lines seen.
fn refusal_line(bed: &Bed, skip: usize, at_least: u64) -> Result<serde_json::Value, String> {
    {
        let lines: Vec<serde_json::Value> = bed.audit()[skip..]
            .iter()
            .filter(|l| l["method"] == "handshake" && l["peer"] == "127.0.0.1")
            .cloned()
            .collect();
        let total: u64 = lines
            .iter()
            .filter_map(|l| l["reason"].as_str()?.split(' ').next()?.parse::<u64>().ok())
            .sum();
        if total >= at_least {
            return Ok(lines.last().cloned().unwrap());
        }
        Err(format!("{lines:?}"))
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_peers_is_bounded() {
    use tokio::io::AsyncWriteExt as _;
    const MAX: usize = 32;
    const FLOOD: usize = 400;
    let Some(bed) = Bed::start_with(|c| {
        c.server.max_connections = MAX;
        c.server.refusal_audit_interval = signet::config::ConfigDuration(Duration::from_secs(1));
    })
    .await
    else {
        panic!("the SoftHSM2 test bed is required");
    };
    // An authenticated caller connected before the flood.
    let mut admin = AdminClient::new(bed.channel(Some(&bed.admin())).await);
    admin.get_status(pb::GetStatusRequest {}).await.unwrap();
    let lines_before = bed.audit().len();
    let rss_before = rss_kib();

    // Silent peers hold every free place (each handshake would wait for its timeout); the rest are closed at once.
    let mut silent = Vec::new();
    for _ in 0..FLOOD {
        silent.push(
            tokio::net::TcpStream::connect(bed.app.addr())
                .await
                .unwrap(),
        );
    }
    // The authenticated connection keeps being served through the flood.
    for _ in 0..20 {
        admin.get_status(pb::GetStatusRequest {}).await.unwrap();
    }
    // Peers sending garbage are refused at the handshake.
    drop(silent);
    let mut garbage = 0;
    for _ in 0..FLOOD {
        if let Ok(mut s) = tokio::net::TcpStream::connect(bed.app.addr()).await {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            garbage += 1;
        }
    }
    assert_eq!(garbage, FLOOD);
    admin.get_status(pb::GetStatusRequest {}).await.unwrap();
    let grown_kib = rss_kib().saturating_sub(rss_before);

    // Every refused peer is counted; the audit log got a handful of aggregated lines, not hundreds.
    let line = wait_for_refusal_line(&bed, lines_before, (FLOOD - MAX) as u64).await;
    let new_lines = bed.audit().len() - lines_before;
    assert!(new_lines <= 60, "{new_lines} audit lines for a flood");
    let all: String = bed.audit()[lines_before..]
        .iter()
        .filter_map(|l| l["reason"].as_str().map(str::to_string))
        .collect();
    assert!(all.contains("connection_limit="), "{all}");
    assert!(line["peer"] == "127.0.0.1", "{line}");
    // Memory stays bounded: the flood costs far less than a megabyte per hundred peers.
    assert!(
        grown_kib < 64 * 1024,
        "resident memory grew by {grown_kib} KiB during a flood of {} connections",
        2 * FLOOD
    );
    // A new authenticated connection is served once the flood is gone.
    crate::support::wait::wait_until_async(
        "a new connection served after the flood",
        Duration::from_secs(60),
        || async {
            match bed.try_channel(Some(&bed.admin())).await {
                Ok(ch) => AdminClient::new(ch)
                    .get_status(pb::GetStatusRequest {})
                    .await
                    .is_ok(),
                Err(_) => false,
            }
        },
    )
    .await;
    bed.stop().await;
}
