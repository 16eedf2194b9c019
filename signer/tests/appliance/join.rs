//! A client's first credential with a one-time join token (Admin.CreateJoinToken, then Bootstrap.ExchangeJoinToken
//! on the bootstrap port, TLS without a client certificate), a caller's renewal of its own X509-SVID
//! (Issuer.RenewX509SVID), and the clients' check of the appliance by its SPIFFE ID whatever address they dial.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use signet_proto::connect;
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::admin_client::AdminClient;
use signet_proto::signet::v1::bootstrap_client::BootstrapClient;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use tonic::Code;

use crate::support::bed::*;
use crate::support::openssl_verify;

const JOINER: &str = "spiffe://example.org/workloads/joiner";

async fn with_bootstrap() -> Option<Bed> {
    Bed::start_with(|c| {
        c.server.bootstrap_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
}

async fn create(
    bed: &Bed,
    id: &str,
    ttl_seconds: i64,
) -> Result<pb::CreateJoinTokenResponse, tonic::Status> {
    AdminClient::new(bed.channel(Some(&bed.admin())).await)
        .create_join_token(pb::CreateJoinTokenRequest {
            spiffe_id: id.into(),
            ttl_seconds,
        })
        .await
        .map(|r| r.into_inner())
}

/// A channel to the bootstrap port without a client certificate, checking the appliance by its SPIFFE ID.
async fn bootstrap(bed: &Bed) -> BootstrapClient<tonic::transport::Channel> {
    let roots = connect::pem_blocks(bed.roots_pem().as_bytes(), "CERTIFICATE").unwrap();
    let verifier = Arc::new(connect::ApplianceVerifier::new(
        connect::LiveRoots::new(roots),
        connect::ServerAuth::for_appliance(TD, None),
    ));
    let tls = Arc::new(connect::client_config(verifier, None).unwrap());
    let addr = bed.app.bootstrap_addr().unwrap().to_string();
    BootstrapClient::new(connect::channel(&addr, tls, |e| e).await.unwrap())
}

async fn exchange(
    bed: &Bed,
    token: &str,
    id: &str,
) -> Result<pb::ExchangeJoinTokenResponse, tonic::Status> {
    let (csr, _) = csr_for(id);
    bootstrap(bed)
        .await
        .exchange_join_token(pb::ExchangeJoinTokenRequest {
            token: token.into(),
            csr,
            ttl_seconds: 0,
        })
        .await
        .map(|r| r.into_inner())
}

fn exchanges(bed: &Bed, outcome: &str) -> Vec<serde_json::Value> {
    bed.audit()
        .into_iter()
        .filter(|l| {
            l["service"] == "bootstrap"
                && l["method"] == "ExchangeJoinToken"
                && l["outcome"] == outcome
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_works_once_for_its_id_until_it_expires_and_every_attempt_is_audited() {
    let Some(bed) = with_bootstrap().await else {
        return;
    };
    let t = create(&bed, JOINER, 600).await.unwrap();
    assert!(t.token.len() >= 22, "at least 128 bits: {}", t.token);
    assert_eq!(t.spiffe_id, JOINER);
    let created = audit_lines(&bed.audit(), ADMIN, "CreateJoinToken")
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["spiffe_id"], JOINER);
    let fp = created[0]["key_id"].as_str().unwrap().to_string();
    assert!(fp.starts_with("join-token:"));
    assert!(
        !std::fs::read_to_string(bed.app.audit_path())
            .unwrap()
            .contains(&t.token),
        "the secret is never written"
    );

    // A CSR for another ID: INVALID_ARGUMENT, nothing issued, the token stays usable.
    let wrong = exchange(&bed, &t.token, "spiffe://example.org/workloads/other")
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument, "{wrong:?}");
    assert!(
        wrong.message().contains("the join token is for"),
        "{wrong:?}"
    );
    assert!(exchanges(&bed, "issued").is_empty());

    // The exchange: an SVID for exactly the token's ID that chains to the roots it answers.
    let r = exchange(&bed, &t.token, JOINER).await.unwrap();
    let svid = r.svid.unwrap();
    assert_eq!(svid.spiffe_id, JOINER);
    openssl_verify(
        &r.x509_authorities,
        &svid.cert_chain[1..],
        &svid.cert_chain[0],
    )
    .unwrap();
    let issued = exchanges(&bed, "issued");
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0]["spiffe_id"], JOINER);
    assert_eq!(issued[0]["key_id"], fp.as_str());
    assert_eq!(issued[0]["peer"], "127.0.0.1");

    // Replay: PERMISSION_DENIED, nothing issued.
    let replay = exchange(&bed, &t.token, JOINER).await.unwrap_err();
    assert_eq!(replay.code(), Code::PermissionDenied, "{replay:?}");
    assert!(replay.message().contains("already used"), "{replay:?}");
    assert_eq!(exchanges(&bed, "issued").len(), 1);

    // Unknown token.
    let unknown = exchange(&bed, "bm90LWEtdG9rZW4", JOINER).await.unwrap_err();
    assert_eq!(unknown.code(), Code::PermissionDenied, "{unknown:?}");

    // Expired: a token of one second, used once the clock has passed its expiry.
    let short = create(&bed, JOINER, 1).await.unwrap();
    // The thing under test: real time passes the token's expiry.
    crate::support::wait::wait_until_async(
        "the one-second token expired",
        Duration::from_secs(30),
        || {
            let past = time::OffsetDateTime::now_utc().unix_timestamp() > short.expires_at;
            async move { past }
        },
    )
    .await;
    let expired = exchange(&bed, &short.token, JOINER).await.unwrap_err();
    assert_eq!(expired.code(), Code::PermissionDenied, "{expired:?}");
    assert!(expired.message().contains("expired"), "{expired:?}");
    assert_eq!(
        exchanges(&bed, "issued").len(),
        1,
        "nothing more was issued"
    );

    let refused = exchanges(&bed, "refused");
    let codes: Vec<&str> = refused
        .iter()
        .map(|l| l["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        [
            "INVALID_ARGUMENT",
            "PERMISSION_DENIED",
            "PERMISSION_DENIED",
            "PERMISSION_DENIED"
        ],
        "{refused:?}"
    );
    assert!(refused.iter().all(|l| l["peer"] == "127.0.0.1"));
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_are_for_admins_and_never_for_signets_own_ids() {
    let Some(bed) = with_bootstrap().await else {
        return;
    };
    let own = create(&bed, "spiffe://example.org/signet/server", 60)
        .await
        .unwrap_err();
    assert_eq!(own.code(), Code::PermissionDenied, "{own:?}");
    let agent = bed.credential_for(AGENT).await;
    let denied = AdminClient::new(bed.channel(Some(&agent)).await)
        .create_join_token(pb::CreateJoinTokenRequest {
            spiffe_id: JOINER.into(),
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let lines = bed.audit();
    let refused = audit_lines(&lines, AGENT, "CreateJoinToken");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["outcome"], "refused");
    let long = create(&bed, JOINER, 30 * 86_400).await.unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument, "{long:?}");
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_renews_only_its_own_svid() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    // SPIRE_A's rule grants upstream-authority and key-manager only, not issuer.
    let spire = bed.credential_for(SPIRE_A).await;
    let mut c = IssuerClient::new(bed.channel(Some(&spire)).await);
    let (csr, _) = csr_for(SPIRE_A);
    let r = c
        .renew_x509svid(pb::RenewX509svidRequest {
            csr,
            ttl_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.svid.unwrap().spiffe_id, SPIRE_A);
    let (csr, _) = csr_for(SPIRE_B);
    let other = c
        .renew_x509svid(pb::RenewX509svidRequest {
            csr,
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied, "{other:?}");
    let lines = bed.audit();
    let renewals = audit_lines(&lines, SPIRE_A, "RenewX509SVID");
    let outcomes: Vec<&str> = renewals
        .iter()
        .map(|l| l["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["issued", "refused"]);
    assert_eq!(renewals[1]["spiffe_id"], SPIRE_B);
    // Nor may it get another ID through the issuer service.
    let (csr, _) = csr_for(SPIRE_A);
    let batch = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: vec![pb::X509svidRequest {
                csr,
                ttl_seconds: 60,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(batch.code(), Code::PermissionDenied);
    bed.stop().await;
}

fn signet(data_dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_signet"));
    c.env_remove("SIGNET_ADDR")
        .env_remove("SIGNET_JOIN_TOKEN")
        .env("SIGNET_DATA_DIR", data_dir);
    c
}

/// The CLI dials 127.0.0.1:<port> (no server name) and checks the appliance by its SPIFFE ID; it creates a join
/// token and mints with it; a server presenting a valid SVID of another SPIFFE ID is refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_checks_the_appliance_by_spiffe_id_and_joins_with_a_token() {
    let Some(bed) = with_bootstrap().await else {
        return;
    };
    let data = bed.app.paths().dir.clone();
    let addr = bed.app.addr().to_string();
    let status = signet(&data)
        .args(["status", "--addr", &addr])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    // --server-name checks a DNS name of the certificate instead (`[server] names`, localhost by default).
    let dns = signet(&data)
        .args(["status", "--addr", &addr, "--server-name", "localhost"])
        .output()
        .unwrap();
    assert!(
        dns.status.success(),
        "{}",
        String::from_utf8_lossy(&dns.stderr)
    );
    let wrong = signet(&data)
        .args([
            "status",
            "--addr",
            &addr,
            "--server-name",
            "signet.example.net",
        ])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        err.contains("not valid for the name signet.example.net"),
        "{err}"
    );

    let created = signet(&data)
        .args([
            "join-token",
            "create",
            "--spiffe-id",
            JOINER,
            "--ttl",
            "10m",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&created.stderr);
    assert!(created.status.success(), "{err}");
    let token = String::from_utf8(created.stdout)
        .unwrap()
        .trim()
        .to_string();
    assert!(err.contains("join_token") && err.contains(&token), "{err}");
    let out = tempfile::tempdir().unwrap();
    let bootstrap = bed.app.bootstrap_addr().unwrap().to_string();
    // A client with nothing but the bundle and the token.
    let minted = signet(out.path())
        .args([
            "mint",
            "x509-svid",
            "--spiffe-id",
            JOINER,
            "--join-token",
            &token,
        ])
        .args(["--bootstrap-addr", &bootstrap, "--ca"])
        .arg(data.join("bundle.pem"))
        .arg("--out")
        .arg(out.path().join("svid"))
        .output()
        .unwrap();
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let chain = std::fs::read_to_string(out.path().join("svid/svid.pem")).unwrap();
    assert_eq!(
        signet::plugin::settings::spiffe_id_of_pem(chain.as_bytes()).unwrap(),
        JOINER
    );
    let again = signet(out.path())
        .args([
            "mint",
            "x509-svid",
            "--spiffe-id",
            JOINER,
            "--join-token",
            &token,
        ])
        .args(["--bootstrap-addr", &bootstrap, "--ca"])
        .arg(data.join("bundle.pem"))
        .arg("--out")
        .arg(out.path().join("svid2"))
        .output()
        .unwrap();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("PERMISSION_DENIED") && err.contains("already used"),
        "{err}"
    );

    // An impostor: a TLS server with a valid X509-SVID of the trust domain, but not the appliance's.
    let impostor = bed
        .credential_for("spiffe://example.org/workloads/impostor")
        .await;
    let chain: Vec<Vec<u8>> =
        connect::pem_blocks(impostor.chain_pem.as_bytes(), "CERTIFICATE").unwrap();
    let key = connect::pem_blocks(impostor.key_pem.as_bytes(), "PRIVATE KEY")
        .unwrap()
        .remove(0);
    let mut cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        chain.into_iter().map(Into::into).collect(),
        tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
    )
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        for _ in 0..8 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let a = acceptor.clone();
            tokio::spawn(async move {
                let _ = a.accept(tcp).await;
            });
        }
    });
    let data2 = data.clone();
    let refused = tokio::task::spawn_blocking(move || {
        signet(&data2)
            .args(["status", "--addr", &fake])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("spiffe://example.org/workloads/impostor")
            && err.contains("not of the signet appliance spiffe://example.org/signet/server"),
        "{err}"
    );
    server.abort();
    bed.stop().await;
}
