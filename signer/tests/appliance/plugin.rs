//! `signet spire-plugin` as SPIRE drives it: the process started with go-plugin's environment, its handshake line
//! read, and go-plugin and SPIRE's plumbing spoken to it over its unix socket (broker stream held open, health,
//! Init, Config with HCL), then the plug-in RPCs forwarded to a real appliance over mTLS, a stream that survives an
//! appliance restart, and Shutdown.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ring::signature::{self, UnparsedPublicKey};
use signet_proto::plugin as gp;
use signet_proto::spire::plugin::server::keymanager::v1 as km;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as ua;
use signet_proto::spire::service::common::config::v1 as cfg;
use signet_proto::spire::service::private::init::v1 as init;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use x509_parser::prelude::FromDer as _;

use crate::support::bed::*;
use crate::support::wait::{wait_for_async, wait_until_async};
use crate::support::{free_port, openssl_verify};

/// A running plug-in process and a channel to its socket.
struct PluginProcess {
    child: Child,
    channel: Channel,
    stderr: PathBuf,
}

impl PluginProcess {
    fn start(kind: &str, cookie: &str, dir: &Path) -> PluginProcess {
        Self::start_with(&["spire-plugin", kind], cookie, dir)
    }

    fn start_with(args: &[&str], cookie: &str, dir: &Path) -> PluginProcess {
        let stderr = dir.join(format!("{}.log", args[1]));
        let mut child = Command::new(env!("CARGO_BIN_EXE_signet"))
            .args(args)
            .env(cookie, cookie)
            .env("PLUGIN_PROTOCOL_VERSIONS", "1")
            .env("PLUGIN_MIN_PORT", "10000")
            .env("PLUGIN_MAX_PORT", "25000")
            .env("PLUGIN_UNIX_SOCKET_DIR", dir)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting signet spire-plugin");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let parts: Vec<&str> = line.trim_end().split('|').collect();
        assert_eq!(parts.len(), 5, "handshake line {line:?}");
        assert_eq!(&parts[..3], ["1", "1", "unix"], "handshake line {line:?}");
        assert_eq!(parts[4], "grpc", "handshake line {line:?}");
        let socket = PathBuf::from(parts[3]);
        assert!(
            socket.starts_with(dir),
            "the socket is in PLUGIN_UNIX_SOCKET_DIR"
        );
        let channel = Endpoint::from_static("http://plugin.invalid").connect_with_connector_lazy(
            tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }),
        );
        PluginProcess {
            child,
            channel,
            stderr,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Controller.Shutdown, then the process must be gone within 5 s with status 0.
    async fn shutdown(mut self) {
        gp::grpc_controller_client::GrpcControllerClient::new(self.channel.clone())
            .shutdown(gp::Empty {})
            .await
            .unwrap();
        let child = &mut self.child;
        let status = wait_for_async(
            "the plug-in exited after Shutdown",
            Duration::from_secs(5),
            || {
                let exited = child.try_wait().unwrap().ok_or_else(String::new);
                async move { exited }
            },
        )
        .await;
        assert!(status.success(), "exit status {status}: {}", self.log());
    }
}

impl Drop for PluginProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The plumbing SPIRE's loader goes through before it uses a plug-in: the broker stream (with the host-services
/// announcement, id 1) must stay open, health says `plugin` is SERVING, Init names the plug-in service and Config.
async fn spire_loader_steps(
    ch: &Channel,
    service: &str,
) -> tokio::sync::mpsc::Sender<gp::ConnInfo> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(gp::ConnInfo {
        service_id: 1,
        network: "unix".into(),
        address: "/nonexistent/host-services.sock".into(),
        knock: None,
    })
    .await
    .unwrap();
    let mut broker = gp::grpc_broker_client::GrpcBrokerClient::new(ch.clone())
        .start_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("broker stream")
        .into_inner();
    // The broker stream must stay open (and quiet) through the loader's steps below: a reader notes the first
    // thing it sees, looked at once the steps are done.
    let (seen_tx, mut seen) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let first = broker.message().await;
        let _ = seen_tx.send(format!("{first:?}"));
        while let Ok(Some(_)) = broker.message().await {}
    });

    let health = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "plugin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let names = init::init_client::InitClient::new(ch.clone())
        .init(init::InitRequest {
            host_service_names: vec!["spire.hostservice.common.metrics.v1.Metrics".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .plugin_service_names;
    let mut names = names;
    names.sort();
    let mut want = vec![
        service.to_string(),
        "spire.service.common.config.v1.Config".to_string(),
    ];
    want.sort();
    assert_eq!(names, want);
    assert!(
        matches!(
            seen.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        ),
        "the broker stream must stay open through the loader's steps"
    );
    tx
}

fn core(td: &str) -> Option<cfg::CoreConfiguration> {
    Some(cfg::CoreConfiguration {
        trust_domain: td.into(),
    })
}

/// Writes the SPIRE server's credential and the appliance's roots, and returns plugin_data for them.
fn plugin_data(bed: &Bed, spire: &Credential, dir: &Path, addr: std::net::SocketAddr) -> String {
    std::fs::write(dir.join("client.pem"), &spire.chain_pem).unwrap();
    std::fs::write(dir.join("client.key"), &spire.key_pem).unwrap();
    std::fs::write(dir.join("bundle.pem"), bed.roots_pem()).unwrap();
    format!(
        "endpoint = \"{addr}\"\ntrust_bundle_path = \"{}\"\n\
         client_cert_path = \"{}\"\nclient_key_path = \"{}\"\nrequest_timeout = \"20s\"\nmax_backoff = \"1s\"\n",
        dir.join("bundle.pem").display(),
        dir.join("client.pem").display(),
        dir.join("client.key").display()
    )
}

/// SPIRE's CSR for its intermediate: subject C=US, O=SPIFFE, one URI SAN `spiffe://<td>`.
fn spire_csr() -> Vec<u8> {
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
    params.serialize_request(&kp).unwrap().der().to_vec()
}

#[test]
fn run_by_hand_it_explains_itself_and_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_signet"))
        .args(["spire-plugin", "upstream-authority"])
        .env_remove("UpstreamAuthority")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SPIRE plug-in") && err.contains("plugin_cmd"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "no handshake line without the cookie"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_authority_plugin_forwards_and_its_stream_survives_an_appliance_restart() {
    let port = free_port();
    let Some(bed) = Bed::start_with(|c| {
        c.server.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    })
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spire = bed.credential_for(SPIRE_A).await;
    let data = plugin_data(&bed, &spire, dir.path(), bed.app.addr());
    let p = PluginProcess::start("upstream-authority", "UpstreamAuthority", dir.path());
    let _broker = spire_loader_steps(
        &p.channel,
        "spire.plugin.server.upstreamauthority.v1.UpstreamAuthority",
    )
    .await;

    let mut ua_client =
        ua::upstream_authority_client::UpstreamAuthorityClient::new(p.channel.clone());
    let early = ua_client
        .mint_x509ca_and_subscribe(ua::MintX509caRequest {
            csr: spire_csr(),
            preferred_ttl: 3600,
        })
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition, "{early:?}");

    let mut config = cfg::config_client::ConfigClient::new(p.channel.clone());
    // What `spire-server validate` shows: notes naming the problem.
    let v = config
        .validate(cfg::ValidateRequest {
            core_configuration: core(TD),
            hcl_configuration: "endpoint = \"127.0.0.1:1\"\n".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    assert!(
        v.notes.iter().any(|n| n.contains("trust_bundle_path")),
        "{v:?}"
    );
    let bad = config
        .configure(cfg::ConfigureRequest {
            core_configuration: core(TD),
            hcl_configuration: "endpoint = \"127.0.0.1:1\"\ntrust_bundle_path = ".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("plugin_data: "), "{bad:?}");
    let other_td = config
        .configure(cfg::ConfigureRequest {
            core_configuration: core("other.org"),
            hcl_configuration: data.clone(),
        })
        .await
        .unwrap_err();
    assert!(other_td.message().contains("trust domain"), "{other_td:?}");
    let ok = config
        .validate(cfg::ValidateRequest {
            core_configuration: core(TD),
            hcl_configuration: data.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ok.valid, "{ok:?}");
    config
        .configure(cfg::ConfigureRequest {
            core_configuration: core(TD),
            hcl_configuration: data,
        })
        .await
        .unwrap();

    let mut stream = ua_client
        .mint_x509ca_and_subscribe(ua::MintX509caRequest {
            csr: spire_csr(),
            preferred_ttl: 3600,
        })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    assert_eq!(first.x509_ca_chain.len(), 1);
    let roots: Vec<Vec<u8>> = first
        .upstream_x509_roots
        .iter()
        .map(|r| r.asn1.clone())
        .collect();
    openssl_verify(&roots, &[], &first.x509_ca_chain[0].asn1)
        .expect("SPIRE's CA, minted through the plug-in, chains to signet's root");

    // The JWT key SPIRE publishes reaches the appliance's bundle.
    let spki = rcgen::PublicKeyData::subject_public_key_info(
        &rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
    );
    let mut jwt = ua_client
        .publish_jwt_key_and_subscribe(ua::PublishJwtKeyRequest {
            jwt_key: Some(signet_proto::spire::plugin::types::JwtKey {
                public_key: spki,
                key_id: "spire-jwt-1".into(),
                expires_at: time::OffsetDateTime::now_utc().unix_timestamp() + 3600,
                tainted: false,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let keys = next(&mut jwt).await.upstream_jwt_keys;
    assert!(keys.iter().any(|k| k.key_id == "spire-jwt-1"), "{keys:?}");

    // The appliance restarts (same port); SPIRE's streams stay open, and a root added afterwards reaches SPIRE on
    // the stream it opened before the restart, as a message with roots only.
    let bed = bed.restart().await;
    let (extra, _) = foreign_ca();
    let extra = extra.der().to_vec();
    // The relay reconnects with backoff (max_backoff 1 s) and then follows the roots: add the root once the
    // plug-in says its X.509 stream reconnected to the restarted appliance.
    wait_until_async(
        "the plug-in's MintX509CAAndSubscribe relay reconnected to the restarted appliance",
        Duration::from_secs(30),
        || {
            let reconnected = p.log().lines().any(|l| {
                l.contains("reconnected to the appliance") && l.contains("MintX509CAAndSubscribe")
            });
            async move { reconnected }
        },
    )
    .await;
    assert!(bed.app.bundle().add_x509_root(extra.clone()));
    let pushed = next(&mut stream).await;
    assert!(
        pushed.x509_ca_chain.is_empty(),
        "later messages carry roots only"
    );
    assert!(
        pushed.upstream_x509_roots.iter().any(|r| r.asn1 == extra),
        "the new root reached SPIRE's stream across the restart; plug-in log:\n{}",
        p.log()
    );
    assert!(
        pushed
            .upstream_x509_roots
            .iter()
            .any(|r| r.asn1 == roots[0]),
        "the old root is still there"
    );
    // The restarted appliance forgot SPIRE's JWT key; the relay published it again (SPIRE sees no message: the
    // keys it knows did not change).
    wait_until_async(
        "the relay republished SPIRE's JWT key after the restart",
        Duration::from_secs(30),
        || {
            let there = bed
                .app
                .bundle()
                .current()
                .jwt_keys
                .iter()
                .any(|k| k.kid == "spire-jwt-1");
            async move { there }
        },
    )
    .await;
    // A bound, not a synchronisation: nothing marks the moment the relay decided not to tell SPIRE of the
    // republication, so the stream is watched for a while for a message that must not come.
    let quiet = tokio::time::timeout(Duration::from_millis(300), jwt.message()).await;
    assert!(
        quiet.is_err(),
        "the JWT stream stays open and quiet: {quiet:?}"
    );

    // The log is hclog JSON, one object per line.
    let log = p.log();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["@level"].is_string() && v["@message"].is_string(),
            "{line}"
        );
    }
    assert!(log.contains("reconnected to the appliance"), "{log}");
    p.shutdown().await;
    bed.stop().await;
}

/// GenerateKey then SignData through the plug-in; the signature verifies (ring) under the returned public key.
async fn generate_and_sign(ch: &Channel) -> km::PublicKey {
    let mut c = km::key_manager_client::KeyManagerClient::new(ch.clone());
    let key = c
        .generate_key(km::GenerateKeyRequest {
            key_id: "x509-CA-A".into(),
            key_type: km::KeyType::EcP256 as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .public_key
        .unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, b"to be signed");
    let signed = c
        .sign_data(km::SignDataRequest {
            key_id: "x509-CA-A".into(),
            data: digest.as_ref().to_vec(),
            signer_opts: Some(km::sign_data_request::SignerOpts::HashAlgorithm(
                km::HashAlgorithm::Sha256 as i32,
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(signed.key_fingerprint, key.fingerprint);
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&key.pkix_data).unwrap();
    UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        info.subject_public_key.data.as_ref(),
    )
    .verify(b"to be signed", &signed.signature)
    .expect("the signature verifies (ASN.1 DER ECDSA)");
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_key_manager_runs_the_appliance_in_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("signet.toml");
    std::fs::write(
        &config,
        "trust_domain = \"example.org\"\ndata_dir = \"data\"\n\n[[policy]]\n\
         caller = \"spiffe://example.org/signet/admin\"\nmay = [\"key-manager\"]\n",
    )
    .unwrap();
    let p = PluginProcess::start_with(
        &[
            "spire-plugin",
            "key-manager",
            "--embedded",
            config.to_str().unwrap(),
        ],
        "KeyManager",
        dir.path(),
    );
    let _broker =
        spire_loader_steps(&p.channel, "spire.plugin.server.keymanager.v1.KeyManager").await;
    let mut config_client = cfg::config_client::ConfigClient::new(p.channel.clone());
    let refused = config_client
        .configure(cfg::ConfigureRequest {
            core_configuration: core(TD),
            hcl_configuration: "endpoint = \"127.0.0.1:1\"\n".into(),
        })
        .await
        .unwrap_err();
    assert!(refused.message().contains("--embedded"), "{refused:?}");
    config_client
        .configure(cfg::ConfigureRequest {
            core_configuration: core(TD),
            hcl_configuration: "request_timeout = \"20s\"\n".into(),
        })
        .await
        .unwrap();
    generate_and_sign(&p.channel).await;
    assert!(
        dir.path().join("data/hsm-sim").is_dir(),
        "the embedded token lives in the configuration's data directory: {}",
        p.log()
    );
    // In process: no gRPC port (no endpoint file), and every call audited under the admin credential's SPIFFE ID,
    // marked as coming from this process.
    assert!(
        !dir.path().join("data/endpoint").exists(),
        "the embedded appliance opens no gRPC port: {}",
        p.log()
    );
    let audit = embedded_audit(dir.path());
    let signed = audit
        .iter()
        .find(|l| l["method"] == "SignData")
        .unwrap_or_else(|| panic!("no SignData audit line: {audit:?}"));
    assert_eq!(
        signed["caller"], "spiffe://example.org/signet/admin",
        "{signed}"
    );
    assert_eq!(signed["via"], "in-process", "{signed}");
    assert_eq!(signed["outcome"], "key_used", "{signed}");
    p.shutdown().await;
}

/// The audit lines of an embedded appliance whose data directory is `<dir>/data`.
fn embedded_audit(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("data/audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The in-process caller is judged by the policy like any other: an embedded appliance whose policy does not let
/// the admin credential use the KeyManager refuses SPIRE's calls with PERMISSION_DENIED, generates no key, and
/// audits the refusal under that SPIFFE ID, marked in-process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_key_manager_is_bound_by_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("signet.toml");
    std::fs::write(
        &config,
        "trust_domain = \"example.org\"\ndata_dir = \"data\"\n\n[[policy]]\n\
         caller = \"spiffe://example.org/signet/admin\"\nmay = [\"issuer\"]\nids = [\"spiffe://example.org/\"]\n",
    )
    .unwrap();
    let p = PluginProcess::start_with(
        &[
            "spire-plugin",
            "key-manager",
            "--embedded",
            config.to_str().unwrap(),
        ],
        "KeyManager",
        dir.path(),
    );
    let _broker =
        spire_loader_steps(&p.channel, "spire.plugin.server.keymanager.v1.KeyManager").await;
    let mut c = km::key_manager_client::KeyManagerClient::new(p.channel.clone());
    // Before Configure: refused as with a remote appliance.
    let early = c
        .get_public_keys(km::GetPublicKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition, "{early:?}");
    cfg::config_client::ConfigClient::new(p.channel.clone())
        .configure(cfg::ConfigureRequest {
            core_configuration: core(TD),
            hcl_configuration: String::new(),
        })
        .await
        .unwrap();
    let refused = c
        .generate_key(km::GenerateKeyRequest {
            key_id: "x509-CA-A".into(),
            key_type: km::KeyType::EcP256 as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let listed = c
        .get_public_keys(km::GetPublicKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(listed.code(), Code::PermissionDenied, "{listed:?}");
    let audit = embedded_audit(dir.path());
    let line = audit
        .iter()
        .find(|l| l["method"] == "GenerateKey")
        .unwrap_or_else(|| panic!("no GenerateKey audit line: {audit:?}"));
    assert_eq!(
        line["caller"], "spiffe://example.org/signet/admin",
        "{line}"
    );
    assert_eq!(line["via"], "in-process", "{line}");
    assert_eq!(line["outcome"], "refused", "{line}");
    assert_eq!(line["code"], "PERMISSION_DENIED", "{line}");
    assert!(
        !audit.iter().any(|l| l["outcome"] == "key_used"),
        "no key was generated or used: {audit:?}"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_manager_plugin_forwards_to_keys_on_the_token() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spire = bed.credential_for(SPIRE_A).await;
    let data = plugin_data(&bed, &spire, dir.path(), bed.app.addr());
    let p = PluginProcess::start("key-manager", "KeyManager", dir.path());
    let _broker =
        spire_loader_steps(&p.channel, "spire.plugin.server.keymanager.v1.KeyManager").await;
    cfg::config_client::ConfigClient::new(p.channel.clone())
        .configure(cfg::ConfigureRequest {
            core_configuration: core(TD),
            hcl_configuration: data,
        })
        .await
        .unwrap();
    let key = generate_and_sign(&p.channel).await;
    let on_token = bed
        .token()
        .session()
        .unwrap()
        .list_keys()
        .unwrap()
        .into_iter()
        .any(|k| k.label.starts_with("spire-km/") && k.label.contains("/x509-CA-A/"));
    assert!(on_token, "the key SPIRE asked for is on the token");
    let mut c = km::key_manager_client::KeyManagerClient::new(p.channel.clone());
    let listed = c
        .get_public_keys(km::GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .public_keys;
    assert_eq!(listed, vec![key.clone()]);
    // Errors of the appliance reach SPIRE with their code and message.
    let missing = c
        .get_public_key(km::GetPublicKeyRequest {
            key_id: "JWT-Signer-Z".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    p.shutdown().await;
    bed.stop().await;
}

async fn configure(p: &PluginProcess, data: String) -> Result<(), tonic::Status> {
    cfg::config_client::ConfigClient::new(p.channel.clone())
        .configure(cfg::ConfigureRequest {
            core_configuration: core(TD),
            hcl_configuration: data,
        })
        .await
        .map(|_| ())
}

/// The plug-in renews its own X509-SVID (Issuer.RenewX509SVID, a SPIRE server's rule grants no issuer service)
/// before half its life, again and again, and a loop that keeps calling through it never sees a failure; the
/// renewed credential is kept in its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_renews_its_credential_without_a_failed_call() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spire = bed.credential_lasting(SPIRE_A, 12).await;
    let data = plugin_data(&bed, &spire, dir.path(), bed.app.addr()) + "svid_ttl = \"12s\"\n";
    let p = PluginProcess::start("key-manager", "KeyManager", dir.path());
    let _broker =
        spire_loader_steps(&p.channel, "spire.plugin.server.keymanager.v1.KeyManager").await;
    configure(&p, data).await.unwrap();
    let key = generate_and_sign(&p.channel).await;
    let mut c = km::key_manager_client::KeyManagerClient::new(p.channel.clone());
    let renewals = |bed: &Bed| {
        bed.audit()
            .iter()
            .filter(|l| {
                l["caller"] == SPIRE_A && l["method"] == "RenewX509SVID" && l["outcome"] == "issued"
            })
            .count()
    };
    let mut calls = 0u32;
    for _ in 0..2000 {
        let listed = c
            .get_public_keys(km::GetPublicKeysRequest {})
            .await
            .unwrap_or_else(|e| panic!("call {calls} failed: {e:?}\n{}", p.log()))
            .into_inner()
            .public_keys;
        assert_eq!(listed, vec![key.clone()]);
        calls += 1;
        if renewals(&bed) >= 3 {
            break;
        }
        // Paces the calls while the short-lived credentials run out (real time); the loop ends on the renewals.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        renewals(&bed) >= 3,
        "three renewals within the loop's bound ({calls} calls): {}",
        p.log()
    );
    // Calls after the last renewal still work (the first credentials have expired by now).
    c.get_public_keys(km::GetPublicKeysRequest {})
        .await
        .unwrap();
    let kept = std::fs::read_to_string(dir.path().join("client.pem")).unwrap();
    assert_ne!(
        kept, spire.chain_pem,
        "the renewed credential is kept in its file"
    );
    assert!(
        p.log().contains("renewed the plug-in's X509-SVID"),
        "{}",
        p.log()
    );
    p.shutdown().await;
    bed.stop().await;
}

/// A first credential from a join token: Configure exchanges it on the bootstrap port (the key made in the
/// plug-in), keeps the credential in the files named, and the plug-in works; the appliance is reached by address
/// and checked by its SPIFFE ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_joins_with_a_token() {
    let Some(bed) = Bed::start_with(|c| {
        c.server.bootstrap_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let token = signet_proto::signet::v1::admin_client::AdminClient::new(
        bed.channel(Some(&bed.admin())).await,
    )
    .create_join_token(signet_proto::signet::v1::CreateJoinTokenRequest {
        spiffe_id: SPIRE_B.into(),
        ttl_seconds: 600,
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(
        token.bootstrap_address,
        bed.app.bootstrap_addr().unwrap().to_string()
    );
    std::fs::write(dir.path().join("bundle.pem"), bed.roots_pem()).unwrap();
    let data = format!(
        "endpoint = \"{}\"\ntrust_bundle_path = \"{}\"\nspiffe_id = \"{SPIRE_B}\"\njoin_token = \"{}\"\n\
         bootstrap_endpoint = \"{}\"\nclient_cert_path = \"{}\"\nclient_key_path = \"{}\"\n",
        bed.app.addr(),
        dir.path().join("bundle.pem").display(),
        token.token,
        token.bootstrap_address,
        dir.path().join("client.pem").display(),
        dir.path().join("client.key").display(),
    );
    let p = PluginProcess::start("key-manager", "KeyManager", dir.path());
    let _broker =
        spire_loader_steps(&p.channel, "spire.plugin.server.keymanager.v1.KeyManager").await;
    configure(&p, data.clone())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", p.log()));
    generate_and_sign(&p.channel).await;
    let kept = std::fs::read_to_string(dir.path().join("client.pem")).unwrap();
    assert!(kept.contains("BEGIN CERTIFICATE"));
    // Configured again (a SPIRE restart): the token is spent, the kept credential is used instead.
    configure(&p, data)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", p.log()));
    km::key_manager_client::KeyManagerClient::new(p.channel.clone())
        .get_public_keys(km::GetPublicKeysRequest {})
        .await
        .unwrap();
    p.shutdown().await;
    bed.stop().await;
}

/// A server presenting a valid X509-SVID of the trust domain that is not the appliance's: the plug-in refuses it
/// at the handshake and SPIRE's call fails with a message that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_refuses_a_server_with_another_spiffe_id() {
    use std::sync::Arc;
    use tokio_rustls::rustls;
    let Some(bed) = Bed::start().await else {
        return;
    };
    let impostor = bed
        .credential_for("spiffe://example.org/workloads/impostor")
        .await;
    let chain = pem::parse_many(&impostor.chain_pem)
        .unwrap()
        .into_iter()
        .map(|p| p.contents().to_vec().into())
        .collect();
    let key = pem::parse(&impostor.key_pem).unwrap().contents().to_vec();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()))
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake = listener.local_addr().unwrap();
    let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = handshakes.clone();
    let server = tokio::spawn(async move {
        for _ in 0..200 {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (a, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                if a.accept(tcp).await.is_ok() {
                    seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let spire = bed.credential_for(SPIRE_A).await;
    let data = plugin_data(&bed, &spire, dir.path(), fake).replace("\"20s\"", "\"2s\"");
    let p = PluginProcess::start("key-manager", "KeyManager", dir.path());
    let _broker =
        spire_loader_steps(&p.channel, "spire.plugin.server.keymanager.v1.KeyManager").await;
    configure(&p, data).await.unwrap();
    let e = km::key_manager_client::KeyManagerClient::new(p.channel.clone())
        .get_public_keys(km::GetPublicKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let said = e.message().to_string();
    assert!(
        said.contains("spiffe://example.org/workloads/impostor")
            && said.contains("not of the signet appliance spiffe://example.org/signet/server"),
        "{e:?}\n{}",
        p.log()
    );
    server.abort();
    p.shutdown().await;
    bed.stop().await;
}

/// The plug-in reloads its credential when someone else replaces the files it came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_reloads_its_credential_files() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spire = bed.credential_for(SPIRE_A).await;
    let data = plugin_data(&bed, &spire, dir.path(), bed.app.addr());
    let p = PluginProcess::start("key-manager", "KeyManager", dir.path());
    let _broker =
        spire_loader_steps(&p.channel, "spire.plugin.server.keymanager.v1.KeyManager").await;
    configure(&p, data).await.unwrap();
    generate_and_sign(&p.channel).await;
    let fresh = bed.credential_for(SPIRE_A).await;
    std::fs::write(dir.path().join("client.key"), &fresh.key_pem).unwrap();
    std::fs::write(dir.path().join("client.pem"), &fresh.chain_pem).unwrap();
    wait_for_async(
        "the plug-in reloaded its credential",
        Duration::from_secs(30),
        || {
            let log = p.log();
            let done = if log.contains("reloaded the plug-in's credential") {
                Ok(())
            } else {
                Err(log)
            };
            async move { done }
        },
    )
    .await;
    km::key_manager_client::KeyManagerClient::new(p.channel.clone())
        .get_public_keys(km::GetPublicKeysRequest {})
        .await
        .unwrap();
    p.shutdown().await;
    bed.stop().await;
}

/// A stand-in for a SPIRE agent's Workload API: answers FetchX509SVID with the SVIDs sent on its channel.
#[derive(Clone)]
struct FakeAgent {
    updates: std::sync::Arc<
        tokio::sync::watch::Receiver<Option<signet_proto::workload::X509svidResponse>>,
    >,
}

#[tonic::async_trait]
impl signet_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi for FakeAgent {
    type FetchX509SVIDStream = std::pin::Pin<
        Box<
            dyn tokio_stream::Stream<
                    Item = Result<signet_proto::workload::X509svidResponse, tonic::Status>,
                > + Send,
        >,
    >;
    type FetchX509BundlesStream = std::pin::Pin<
        Box<
            dyn tokio_stream::Stream<
                    Item = Result<signet_proto::workload::X509BundlesResponse, tonic::Status>,
                > + Send,
        >,
    >;

    async fn fetch_x509svid(
        &self,
        _: tonic::Request<signet_proto::workload::X509svidRequest>,
    ) -> Result<tonic::Response<Self::FetchX509SVIDStream>, tonic::Status> {
        let rx = (*self.updates).clone();
        let s = tokio_stream::StreamExt::filter_map(
            tokio_stream::wrappers::WatchStream::new(rx),
            |u| u.map(Ok),
        );
        Ok(tonic::Response::new(Box::pin(s)))
    }

    async fn fetch_x509_bundles(
        &self,
        _: tonic::Request<signet_proto::workload::X509BundlesRequest>,
    ) -> Result<tonic::Response<Self::FetchX509BundlesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this stand-in"))
    }
}

fn workload_response(c: &Credential, roots_pem: &str) -> signet_proto::workload::X509svidResponse {
    let der = |text: &str| -> Vec<u8> {
        pem::parse_many(text)
            .unwrap()
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .flat_map(|p| p.contents().to_vec())
            .collect()
    };
    signet_proto::workload::X509svidResponse {
        svids: vec![signet_proto::workload::X509svid {
            spiffe_id: SPIRE_A.into(),
            x509_svid: der(&c.chain_pem),
            x509_svid_key: pem::parse(&c.key_pem).unwrap().contents().to_vec(),
            bundle: der(roots_pem),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: Default::default(),
    }
}

/// `workload_api_socket`: the plug-in takes its credential and the roots from a Workload API and follows its
/// rotations (calls keep working after the first credential has expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_takes_its_credential_from_a_workload_api() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let first = bed.credential_lasting(SPIRE_A, 6).await;
    let (tx, rx) = tokio::sync::watch::channel(Some(workload_response(&first, &bed.roots_pem())));
    let socket = dir.path().join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let agent = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                signet_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(
                    FakeAgent {
                        updates: std::sync::Arc::new(rx),
                    },
                ),
            )
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let data = format!(
        "endpoint = \"{}\"\nworkload_api_socket = \"unix://{}\"\nrequest_timeout = \"20s\"\n",
        bed.app.addr(),
        socket.display()
    );
    let p = PluginProcess::start("key-manager", "KeyManager", dir.path());
    let _broker =
        spire_loader_steps(&p.channel, "spire.plugin.server.keymanager.v1.KeyManager").await;
    configure(&p, data)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", p.log()));
    generate_and_sign(&p.channel).await;
    // The agent rotates the SVID.
    let second = bed.credential_lasting(SPIRE_A, 3600).await;
    tx.send(Some(workload_response(&second, &bed.roots_pem())))
        .unwrap();
    wait_for_async(
        "the plug-in took the rotated X509-SVID",
        Duration::from_secs(30),
        || {
            let log = p.log();
            let done = if log.contains("took the rotated X509-SVID from the Workload API") {
                Ok(())
            } else {
                Err(log)
            };
            async move { done }
        },
    )
    .await;
    // Once the first credential has expired, calls still work: they use the rotated one.
    let first_expiry = {
        let leaf = pem::parse_many(&first.chain_pem).unwrap().remove(0);
        let (_, c) = x509_parser::parse_x509_certificate(leaf.contents()).unwrap();
        c.validity().not_after.timestamp()
    };
    // The thing under test: real time passes the first credential's expiry.
    wait_until_async(
        "the first credential expired",
        Duration::from_secs(30),
        || {
            let past = time::OffsetDateTime::now_utc().unix_timestamp() > first_expiry + 1;
            async move { past }
        },
    )
    .await;
    km::key_manager_client::KeyManagerClient::new(p.channel.clone())
        .get_public_keys(km::GetPublicKeysRequest {})
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", p.log()));
    agent.abort();
    p.shutdown().await;
    bed.stop().await;
}
