//! Where the time of one KeyManager `SignData` goes: a measurement, not a test (run by name, in release).
//!
//! One appliance on SoftHSM2 in this process, with a Prometheus recorder installed first so the stage histograms
//! can be read back. SPIRE's calls are replayed one after another (as SPIRE signs the SVIDs of a batch), through
//! each layer in turn, and the median of each layer's round trip is printed next to the appliance's own per-stage
//! medians:
//! - `C_Sign` alone, on a session of the same token (the floor);
//! - the appliance's KeyManager in process (what `signet spire-plugin --embedded` calls);
//! - the same behind the plug-in's gRPC server on a unix socket (the SPIRE -> plug-in hop, `--embedded`);
//! - the plug-in's forwarder over mTLS to the appliance's port (the network path, one warm HTTP/2 connection);
//! - that forwarder behind the plug-in's unix socket (what SPIRE sees with a remote appliance).
//!
//! `cargo test --release -p signet --test signdata_budget -- --ignored --nocapture` (and with
//! `SIGNET_BUDGET_AUDIT_SYNC=0` for an audit log that is not synced to the disk before each answer)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a measurement: a failed fixture is a failed run"
)]

mod support;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use signet::plugin::forward::{Appliance as Remote, KeyManagerForwarder};
use signet::plugin::in_process::InProcessKeyManager;
use signet::plugin::settings::{FirstCredential, KeyIdentifier, PluginSettings};
use signet_proto::spire::plugin::server::keymanager::v1 as km;
use signet_proto::spire::plugin::server::keymanager::v1::key_manager_client::KeyManagerClient;
use signet_proto::spire::plugin::server::keymanager::v1::key_manager_server::{
    KeyManager, KeyManagerServer,
};
use support::bed::*;
use tonic::transport::{Channel, Endpoint};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sign_request() -> km::SignDataRequest {
    km::SignDataRequest {
        key_id: "x509-CA-budget".into(),
        data: ring::digest::digest(&ring::digest::SHA256, b"budget")
            .as_ref()
            .to_vec(),
        signer_opts: Some(km::sign_data_request::SignerOpts::HashAlgorithm(
            km::HashAlgorithm::Sha256 as i32,
        )),
    }
}

/// Median µs of `n` sequential SignData calls through `call` (after `n / 10` warm-up calls).
async fn round_trips<F, Fut>(n: usize, mut call: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    for _ in 0..n / 10 {
        call().await.unwrap();
    }
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Instant::now();
        call().await.unwrap();
        t.push(s.elapsed().as_secs_f64() * 1e6);
    }
    median(t)
}

/// A gRPC server for `svc` on a unix socket in `dir`, and a channel to it (as SPIRE dials its plug-in).
async fn on_unix_socket<S>(svc: S, dir: &std::path::Path, name: &str) -> Channel
where
    S: KeyManager,
{
    let path = dir.join(name);
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(KeyManagerServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    Endpoint::from_static("http://plugin.invalid").connect_with_connector_lazy(tower::service_fn(
        move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        },
    ))
}

/// The appliance's per-stage medians (µs) from the recorder's summaries: `(metric, label filter)`.
fn stage_medians(text: &str) -> Vec<(String, f64)> {
    let wanted = [
        ("signet_api_request_seconds", "method=\"SignData\""),
        ("signet_keymanager_sign_stage_seconds", "stage=\"admit\""),
        ("signet_keymanager_sign_stage_seconds", "stage=\"checks\""),
        ("signet_keymanager_sign_stage_seconds", "stage=\"pipeline\""),
        ("signet_pipeline_queue_wait_seconds", ""),
        ("signet_pipeline_sign_seconds", ""),
        ("signet_pipeline_reply_seconds", ""),
        ("signet_pipeline_digest_check_seconds", ""),
        ("signet_keymanager_sign_stage_seconds", "stage=\"audit\""),
    ];
    wanted
        .iter()
        .map(|(m, f)| {
            let v = text
                .lines()
                .find(|l| {
                    l.starts_with(&format!("{m}{{"))
                        && l.contains(f)
                        && l.contains("quantile=\"0.5\"")
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN);
            (format!("{m}{{{f}}}"), v * 1e6)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run with --ignored --nocapture, in release"]
async fn signdata_latency_budget() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    // `SIGNET_BUDGET_AUDIT_SYNC=0` measures the same calls with `[server] audit_sync = false` (the audit line flushed
    // to the kernel, not synced to the disk, before the answer).
    let audit_sync = std::env::var("SIGNET_BUDGET_AUDIT_SYNC").map_or(true, |v| v != "0");
    let Some(bed) = Bed::start_with(|c| {
        c.tokens[0].sessions = 2;
        c.server.audit_sync = audit_sync;
    })
    .await
    else {
        return;
    };
    let n: usize = std::env::var("SIGNET_BUDGET_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir = tempfile::tempdir().unwrap();

    // In process: the admin credential of the data directory, as `--embedded` uses it.
    let local = InProcessKeyManager::new(
        bed.app.in_process().unwrap(),
        Arc::new(AtomicBool::new(true)),
    );
    local
        .generate_key(tonic::Request::new(km::GenerateKeyRequest {
            key_id: "x509-CA-budget".into(),
            key_type: km::KeyType::EcP256 as i32,
        }))
        .await
        .unwrap();

    // Over the network: the plug-in's forwarder with the same admin credential (the same key namespace).
    let admin = bed.admin();
    let settings = PluginSettings {
        endpoints: vec![format!("https://{}", bed.app.addr())],
        server_name: Some("localhost".into()),
        trust_domain: TD.into(),
        trust_bundle_pem: bed.roots_pem().into_bytes(),
        credential: FirstCredential::Pem {
            cert_pem: admin.chain_pem.into_bytes(),
            key_pem: admin.key_pem.into_bytes(),
        },
        credential_paths: None,
        client_id: ADMIN.into(),
        svid_ttl: Duration::ZERO,
        renew: false,
        connect_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
        max_backoff: Duration::from_secs(2),
        key_identifier: KeyIdentifier::None,
    };
    let remote = Remote::connect(settings).await.unwrap();
    let forwarder = KeyManagerForwarder::new(Arc::new(tokio::sync::RwLock::new(Some(remote))));

    let local_socket = on_unix_socket(local.clone(), dir.path(), "local.sock").await;
    let remote_socket = on_unix_socket(forwarder.clone(), dir.path(), "remote.sock").await;

    // The floor: C_Sign alone on a session of the token (the key SPIRE's GenerateKey made).
    let token = bed.token();
    let floor = tokio::task::spawn_blocking(move || {
        let mut s = token.session().unwrap();
        let label = s
            .list_keys()
            .unwrap()
            .into_iter()
            .find(|k| k.label.contains("/x509-CA-budget/"))
            .unwrap()
            .label;
        let key = s.find_key(&label).unwrap();
        let digest = sign_request().data;
        let mut t = Vec::with_capacity(n);
        for _ in 0..n {
            let started = Instant::now();
            s.sign_digest(&key, signet_pkcs11::SignAlgorithm::EcdsaSha256, &digest)
                .unwrap();
            t.push(started.elapsed().as_secs_f64() * 1e6);
        }
        median(t)
    })
    .await
    .unwrap();

    let in_process = round_trips(n, || {
        let l = local.clone();
        async move {
            l.sign_data(tonic::Request::new(sign_request()))
                .await
                .map(drop)
        }
    })
    .await;
    // The stage histograms now hold the in-process calls only: read them before the network path adds its own.
    let stages = stage_medians(&recorder.render());
    let in_process_socket = round_trips(n, || {
        let mut c = KeyManagerClient::new(local_socket.clone());
        async move { c.sign_data(sign_request()).await.map(drop) }
    })
    .await;
    let network = round_trips(n, || {
        let f = forwarder.clone();
        async move {
            f.sign_data(tonic::Request::new(sign_request()))
                .await
                .map(drop)
        }
    })
    .await;
    let network_socket = round_trips(n, || {
        let mut c = KeyManagerClient::new(remote_socket.clone());
        async move { c.sign_data(sign_request()).await.map(drop) }
    })
    .await;

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "SignData, EC P-256, SoftHSM2 (2 sessions), audit_sync = {audit_sync}, {n} sequential calls per path; \
         medians in µs (load average: {})",
        load.trim()
    );
    println!("  C_Sign alone                                   {floor:8.1}");
    println!("  appliance in process (--embedded)              {in_process:8.1}");
    println!("  + plug-in gRPC on a unix socket (as SPIRE)     {in_process_socket:8.1}");
    println!("  plug-in forwarder over mTLS (network)          {network:8.1}");
    println!("  + plug-in gRPC on a unix socket (as SPIRE)     {network_socket:8.1}");
    println!("appliance stages of the in-process calls (medians, µs):");
    for (name, v) in &stages {
        println!("  {name:70} {v:8.1}");
    }
    assert!(floor > 0.0 && in_process > 0.0 && network > 0.0);
    bed.stop().await;
}
