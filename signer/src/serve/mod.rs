//! `signet serve`: brings the appliance up from a [`Config`] and runs it until it is told to stop.
//!
//! Start-up, in order: the data directory and its datastore ([`crate::store`], `state.db`), which says which keys
//! are the active root and JWT key after a rotation; the tokens (the configured ones, or the embedded token
//! provisioned in the data directory through the [`EmbeddedToken`] seam); the root and JWT keys on the token
//! (generated when missing); the signing pipeline; the root certificate (`root.pem`, self-signed through the pipeline on the first
//! start, reused after); the server's and the admin's X509-SVIDs (issued by the root, re-issued when no more than
//! half their life is left, or issued by another root than the active one); the authorities' life cycle
//! ([`crate::ca::Authorities`], which adopts the first root and JWT key into a fresh datastore and finishes any
//! rotation step a crash interrupted) and the bundle it keeps; the KeyManager keys; the audit log. Background tasks
//! swap the issuers when a rotation activates a new root or key, keep `bundle.pem` in step, run the rotation
//! schedule, and renew signet's own server and admin credentials while it runs ([`crate::own`]: at half their life
//! and right after every activate, swapped into the TLS listeners without dropping a connection, so no restart is
//! needed for a rotation). Then the gRPC server (mTLS) with the four APIs, gRPC health (NOT_SERVING while no token
//! can sign) and reflection, and the Prometheus endpoint.
//!
//! [`Appliance::shutdown`] stops accepting connections, ends the subscription streams, lets requests in flight
//! finish (within `server.shutdown_grace`), then stops the pipeline and flushes the audit log.
//!
//! One file per job:
//!
//! | file | owns |
//! | --- | --- |
//! | `mod.rs` | the running [`Appliance`], its accessors and [`Appliance::shutdown`] |
//! | `error.rs` | [`ServeError`]: why a start failed, each kind with its source |
//! | `embedded.rs` | the token signet provisions for itself ([`EmbeddedToken`], [`HsmSimEmbedded`]) |
//! | `bootstrap.rs` | before anything serves: tokens, keys, pipelines, the authority's certificate (and [`install_offline`] below an offline root), signet's own X509-SVIDs, the KeyManager keys |
//! | `authorities.rs` | the rotation policy the configuration describes, the authorities' life cycle, the issuers of the active set |
//! | `start.rs` | the assembly, in order ([`Appliance::start`]), and undoing it when a step fails |
//! | `background.rs` | the tasks beside the gRPC server: issuer switch after rotation, bundle endpoint, metrics, health |

mod authorities;
mod background;
mod bootstrap;
mod embedded;
mod error;
mod start;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use bootstrap::install_offline;
pub use embedded::{
    EMBEDDED_LABEL, EmbeddedToken, HsmSimEmbedded, default_embedded_token, embedded_token_settings,
};
pub use error::ServeError;

use crate::api::AppState;
use crate::audit::AuditLog;
use crate::bundle::TrustBundle;
use crate::config::Config;
use crate::datadir::DataPaths;
use crate::pipeline::Pipeline;
use crate::spiffe::TrustDomain;

/// A running appliance.
#[derive(Debug)]
pub struct Appliance {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    federation_addr: Option<SocketAddr>,
    paths: DataPaths,
    state: Arc<AppState>,
    km_pipeline: Option<Pipeline>,
    shutdown_tx: watch::Sender<bool>,
    /// The gRPC server; `None` for an appliance started [in process](Self::start_in_process).
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    background: Vec<JoinHandle<()>>,
    grace: Duration,
    token_names: Vec<String>,
}

impl Appliance {
    /// Starts the appliance from `cfg`; with no `[[tokens]]`, the embedded token is provisioned in the data
    /// directory.
    pub async fn start(cfg: Config) -> Result<Self, ServeError> {
        Self::start_with(cfg, default_embedded_token()).await
    }

    /// [`start`](Self::start) with another embedded token.
    pub async fn start_with(
        cfg: Config,
        embedded: Arc<dyn EmbeddedToken>,
    ) -> Result<Self, ServeError> {
        Self::start_inner(cfg, embedded, crate::ca::crash::clock(), true).await
    }

    /// [`start`](Self::start) without the gRPC port: everything else of the appliance (pipeline, authorities,
    /// policy, audit log, own credentials, rotation, the bootstrap and bundle-endpoint ports when configured) runs,
    /// and callers in this process reach the services through [`in_process`](Self::in_process) (the SPIRE plug-in
    /// with `--embedded`). [`addr`](Self::addr) is then the unspecified address `0.0.0.0:0` and no endpoint file is
    /// written.
    pub async fn start_in_process(cfg: Config) -> Result<Self, ServeError> {
        Self::start_inner(
            cfg,
            default_embedded_token(),
            crate::ca::crash::clock(),
            false,
        )
        .await
    }

    /// [`start`](Self::start) with the rotation life cycle reading `clock` (tests move it past a publish lead or
    /// a root's descendants without waiting). Certificates, TLS and signet's own credentials keep the system time.
    #[doc(hidden)]
    pub async fn start_with_clock(
        cfg: Config,
        clock: Arc<dyn crate::ca::Clock>,
    ) -> Result<Self, ServeError> {
        Self::start_inner(cfg, default_embedded_token(), clock, true).await
    }
    /// The services for callers in this process, authenticated by the admin credential of the data directory
    /// (see [`crate::api::InProcess`]).
    pub fn in_process(&self) -> Result<crate::api::InProcess, ServeError> {
        crate::api::InProcess::new(self.state.clone(), self.paths.admin_cert.clone()).map_err(|e| {
            ServeError::InProcess {
                reason: e.to_string(),
            }
        })
    }

    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bootstrap port's address (join tokens), if `[server] bootstrap_listen` is set.
    pub fn bootstrap_addr(&self) -> Option<SocketAddr> {
        self.state.bootstrap_addr.get().copied()
    }

    /// The Prometheus address, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The SPIFFE bundle endpoint's address, if `[federation] listen` is set.
    pub fn federation_addr(&self) -> Option<SocketAddr> {
        self.federation_addr
    }

    /// The bundles of the federated trust domains.
    pub fn federated_bundles(&self) -> &crate::federation::FederatedBundles {
        &self.state.federated
    }

    /// The data directory's files.
    pub fn paths(&self) -> &DataPaths {
        &self.paths
    }

    /// The live bundle (what changes it reaches every subscriber).
    pub fn bundle(&self) -> &TrustBundle {
        &self.state.bundle
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.state.trust_domain
    }

    /// The names of the tokens in use.
    pub fn token_names(&self) -> &[String] {
        &self.token_names
    }

    /// The audit log's path.
    pub fn audit_path(&self) -> &Path {
        self.state.audit.path()
    }

    /// The audit log (fault drills: [`AuditLog::simulate_write_failure`]).
    pub fn audit_log(&self) -> &AuditLog {
        &self.state.audit
    }

    /// Stops: no new connections, subscription streams end, requests in flight finish (within the grace period),
    /// then the pipeline stops and the audit log is closed.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        let _ = self.shutdown_tx.send(true);
        let served = match self.server {
            Some(server) => tokio::time::timeout(self.grace, server).await,
            None => Ok(Ok(Ok(()))),
        };
        for b in self.background {
            b.abort();
        }
        let pipeline = self.state.pipeline.clone();
        let km = self.km_pipeline.clone();
        let audit = self.state.audit.clone();
        let _ = tokio::task::spawn_blocking(move || {
            pipeline.shutdown();
            if let Some(k) = km {
                k.shutdown();
            }
            audit.close();
        })
        .await;
        match served {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(ServeError::Server(e)),
            Ok(Err(source)) => Err(ServeError::Task {
                what: "the gRPC server's task",
                source,
            }),
            Err(_) => {
                tracing::warn!(grace = ?self.grace, "requests still in flight after the grace period were cut");
                Ok(())
            }
        }
    }
}
