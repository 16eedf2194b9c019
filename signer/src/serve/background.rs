//! What runs beside the gRPC server until shutdown: the switch of the issuers after a rotation step (and
//! `bundle.pem` kept in step), the SPIFFE bundle endpoint and the federation pollers, the Prometheus listener, and
//! the health loop that turns gRPC health and `/readyz` NOT_SERVING while no token can sign.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::authorities::signers_of;
use super::error::{ServeError, io};
use crate::api::AppState;
use crate::ca::Authorities;
use crate::config::{Config, ConfigError};
use crate::datadir::{pem_certs, replace_file};
use crate::health::HealthBoard;
use crate::pipeline::{Pipeline, SigningMode};

/// Swaps the issuers in when a rotation step changes what signs, and keeps `bundle.pem` in step with the bundle.
pub(super) async fn follow_authorities(
    state: Arc<AppState>,
    authorities: Arc<Authorities>,
    mode: SigningMode,
    jwt_max_ttl: Duration,
    bundle_pem: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut active = authorities.subscribe_active();
    let mut bundle = authorities.bundle().subscribe();
    active.borrow_and_update();
    let mut roots = bundle.borrow_and_update().x509_roots.clone();
    loop {
        tokio::select! {
            r = active.changed() => {
                if r.is_err() {
                    return;
                }
                let set = active.borrow_and_update().clone();
                match signers_of(&set, &state.trust_domain, mode.clone(), &state.pipeline, jwt_max_ttl).await {
                    Ok(s) => {
                        state.set_signers(s);
                        tracing::info!("issuers switched to the active authorities");
                    }
                    Err(e) => tracing::error!(error = %e, "cannot switch the issuers to the new authorities"),
                }
            }
            r = bundle.changed() => {
                if r.is_err() {
                    return;
                }
                let now = bundle.borrow_and_update().x509_roots.clone();
                if now == roots {
                    continue;
                }
                roots = now;
                // Readers (the CLI, clients) never see a half-written file: write aside, then rename.
                if let Err(e) = replace_file(&bundle_pem, pem_certs(&roots).as_bytes(), false) {
                    tracing::warn!(error = %e, "cannot update bundle.pem");
                }
            }
            () = crate::shutdown::until_shutdown(&mut shutdown) => return,
        }
    }
}

/// Starts the SPIFFE bundle endpoint (when `[federation] listen` is set) and the pollers of the federated trust
/// domains; returns the endpoint's address.
pub(super) async fn start_federation(
    cfg: &Config,
    server_cert: &Arc<crate::own::LiveCert>,
    state: &Arc<AppState>,
    shutdown: &watch::Receiver<bool>,
    background: &mut Vec<JoinHandle<()>>,
) -> Result<Option<SocketAddr>, ServeError> {
    use crate::config::EndpointProfile;
    use crate::federation::{consumer, endpoint};
    let f = &cfg.federation;
    let invalid = |m: String| ServeError::Config(ConfigError::Invalid(m));
    let mut bound = None;
    if let Some(listen) = f.listen {
        let tls = match f.profile {
            // The appliance's own server SVID, renewed in place.
            EndpointProfile::HttpsSpiffe => endpoint::tls_config_live(server_cert.clone()),
            _ => {
                let (Some(cert), Some(key)) = (&f.cert, &f.key) else {
                    return Err(invalid(
                        "federation.profile = \"https_web\" needs federation.cert and federation.key".into(),
                    ));
                };
                let (chain, key) =
                    endpoint::load_pem(cert, key).map_err(|e| invalid(format!("federation: {e}")))?;
                endpoint::tls_config(chain, key)
            }
        }
        .map_err(|e| invalid(format!("federation: {e}")))?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(io(format!("listening on {listen} (federation)")))?;
        let a = listener
            .local_addr()
            .map_err(io("reading the bundle endpoint's address"))?;
        background.push(tokio::spawn(endpoint::serve(
            listener,
            tls,
            state.bundle.clone(),
            f.refresh_hint.0,
            shutdown.clone(),
        )));
        tracing::info!(addr = %a, profile = f.profile.name(), "SPIFFE bundle endpoint is serving");
        bound = Some(a);
    }
    let pollers = consumer::start(f, &state.federated, &state.bundle, shutdown)
        .map_err(|e| invalid(e.to_string()))?;
    background.extend(pollers);
    Ok(bound)
}

/// Buckets of the `*_seconds` histograms: 1 ms to 30 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub(super) async fn start_metrics(
    addr: SocketAddr,
    health: HealthBoard,
    background: &mut Vec<JoinHandle<()>>,
) -> Result<SocketAddr, ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(io(format!("metrics listener {addr}")))?;
    let bound = listener.local_addr().map_err(io("metrics listener"))?;
    // Time histograms (`*_seconds`: RPC latency, signing, queue wait) are exported as Prometheus histograms with
    // these buckets, so that percentiles can be aggregated across replicas (`histogram_quantile`).
    let builder = match metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &LATENCY_BUCKETS,
        ) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "latency buckets refused: time histograms are exported as summaries");
            metrics_exporter_prometheus::PrometheusBuilder::new()
        }
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!(
            "a metrics recorder is already installed in this process: /metrics shows nothing of this appliance"
        );
    }
    background.push(tokio::spawn(crate::health::serve(listener, handle, health)));
    Ok(bound)
}

pub(super) async fn health_loop(
    health: tonic_health::server::HealthReporter,
    board: HealthBoard,
    pipeline: Pipeline,
    mut shutdown: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    let services = [
        "",
        "spire.plugin.server.upstreamauthority.v1.UpstreamAuthority",
        "spire.plugin.server.keymanager.v1.KeyManager",
        "signet.v1.Issuer",
        "signet.v1.Admin",
    ];
    let mut last = None;
    let mut last_out = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let tokens = pipeline.token_status();
        let serving = tokens.iter().any(|t| t.healthy);
        // The gRPC health protocol carries no reason: the plain-HTTP probe and the log say which tokens are out of
        // rotation and why.
        let out: Vec<(String, String)> = tokens
            .iter()
            .filter(|t| !t.healthy)
            .map(|t| {
                let why = t.reason.clone().unwrap_or_else(|| "out of rotation".into());
                (t.name.clone(), why)
            })
            .collect();
        if serving {
            board.serving();
        } else {
            let said: Vec<String> = out.iter().map(|(t, r)| format!("{t}: {r}")).collect();
            board.not_serving(format!("no token in rotation ({})", said.join("; ")));
        }
        if out != last_out {
            for (token, reason) in &out {
                tracing::warn!(token, reason, "health: token out of rotation");
            }
            last_out = out;
        }
        if last != Some(serving) {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for s in services {
                health.set_service_status(s, status).await;
            }
            if last.is_some() {
                tracing::warn!(serving, "health changed");
            }
            last = Some(serving);
        }
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::shutdown::until_shutdown(&mut shutdown) => {
                board.not_serving("shutting down");
                for s in services {
                    health.set_service_status(s, ServingStatus::NotServing).await;
                }
                return;
            }
        }
    }
}
