//! The plain-HTTP operations listener (`server.metrics`): Prometheus `/metrics` and the health probes
//! `/healthz` and `/readyz` for orchestrators, which need no credential. The gRPC port requires a client X509-SVID
//! at the handshake, so probes that cannot present one come here; gRPC health stays on the gRPC port for
//! authenticated clients.
//!
//! `/healthz` and `/readyz` answer 200 `serving` while at least one token is in rotation, else 503 with the reason
//! (`starting`, `shutting down`, or the tokens out of rotation). Only GET and HEAD are served; everything else is 404
//! or 405. Bind it to a loopback or management address: it tells the health of the tokens to whoever asks.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Most connections the operations listener serves at once (probes and scrapes are few).
const MAX_CONNECTIONS: usize = 64;

/// How often histogram summaries are compacted.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// What the probes answer: serving, or why not. The reason is text on purpose: it is the probe's answer as shown
/// (the HTTP body), assembled by the start-up and the token health loop, not an error of an operation.
#[derive(Debug, Clone)]
pub struct HealthBoard {
    state: Arc<RwLock<Result<(), String>>>,
}

impl Default for HealthBoard {
    fn default() -> Self {
        Self {
            state: Arc::new(RwLock::new(Err("starting".into()))),
        }
    }
}

impl HealthBoard {
    /// Serving.
    pub fn serving(&self) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Ok(());
    }

    /// Not serving, because of `why`.
    pub fn not_serving(&self, why: impl Into<String>) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Err(why.into());
    }

    /// The current answer.
    pub fn current(&self) -> Result<(), String> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn text(
    status: StatusCode,
    body: impl Into<Bytes>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn handle(
    req: &Request<Incoming>,
    metrics: &PrometheusHandle,
    health: &HealthBoard,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n",
            "text/plain; charset=utf-8",
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            metrics.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/healthz" | "/readyz" => match health.current() {
            Ok(()) => text(StatusCode::OK, "serving\n", "text/plain; charset=utf-8"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not serving: {why}\n"),
                "text/plain; charset=utf-8",
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz and /readyz are served here\n",
            "text/plain; charset=utf-8",
        ),
    }
}

/// Serves `/metrics` from `metrics` and the probes from `health` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, metrics: PrometheusHandle, health: HealthBoard) {
    let upkeep = metrics.clone();
    let upkeep_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(place) = places.clone().acquire_owned().await else {
            break;
        };
        let (tcp, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "operations listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = handle(&req, &metrics, &health);
                async move { Ok::<_, Infallible>(r) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(60), served).await {
                tracing::debug!(%peer, error = %e, "operations listener: connection ended with an error");
            }
        });
    }
    upkeep_task.abort();
}
