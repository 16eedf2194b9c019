//! The SPIRE external-plugin shim: `signet spire-plugin upstream-authority|key-manager`, the process a SPIRE server
//! starts for `plugin_cmd`, speaking HashiCorp go-plugin's gRPC protocol on one side and forwarding every plug-in RPC
//! over mTLS to a signet appliance on the other.
//!
//! What the process does, in SPIRE's order:
//! 1. checks go-plugin's magic cookie (`UpstreamAuthority=UpstreamAuthority` or `KeyManager=KeyManager`) and
//!    `PLUGIN_PROTOCOL_VERSIONS`; run by hand, it says what it is and exits with status 2;
//! 2. listens on a unix socket in `PLUGIN_UNIX_SOCKET_DIR` (the temporary directory without it) and prints the
//!    handshake line `1|1|unix|<socket>|grpc` on stdout;
//! 3. serves go-plugin's broker (the stream SPIRE opens at once is held open), controller (`Shutdown` ends the
//!    process) and stdio services, gRPC health (`plugin` is SERVING), SPIRE's `Init` (answers with the plug-in
//!    service and `Config`) and `Config` (`Configure` and `Validate` parse `plugin_data` as HCL, see [`settings`]),
//!    and the plug-in service itself, which [`forward`] relays to the appliance;
//! 4. logs to stderr as hclog JSON ([`log`]), so the lines show up in SPIRE's log.
//!
//! With `--embedded CONFIG`, the process runs the appliance itself (the `signet serve` configuration CONFIG) without
//! its gRPC port, and SPIRE's calls go to the appliance's services in this process ([`in_process`]): no TLS, no TCP,
//! no second gRPC server, but the same admission, policy and audit, as the data directory's admin credential
//! (audit lines say `"via": "in-process"`). One host, no separate service.

pub mod forward;
pub mod in_process;
pub mod log;
pub mod settings;

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use signet_proto::plugin as gp;
use signet_proto::spire::service::common::config::v1 as cfgpb;
use signet_proto::spire::service::private::init::v1 as initpb;
use tokio::sync::{RwLock, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use forward::{Appliance, KeyManagerForwarder, Slot, UpstreamAuthorityForwarder};
use settings::PluginSettings;

/// The plug-in point signet serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// `UpstreamAuthority`.
    UpstreamAuthority,
    /// `KeyManager`.
    KeyManager,
}

impl PluginKind {
    /// SPIRE's plug-in type name, which is also go-plugin's magic cookie key and value.
    pub fn type_name(self) -> &'static str {
        match self {
            PluginKind::UpstreamAuthority => "UpstreamAuthority",
            PluginKind::KeyManager => "KeyManager",
        }
    }

    /// The gRPC service name of the plug-in service.
    pub fn service_name(self) -> &'static str {
        match self {
            PluginKind::UpstreamAuthority => {
                "spire.plugin.server.upstreamauthority.v1.UpstreamAuthority"
            }
            PluginKind::KeyManager => "spire.plugin.server.keymanager.v1.KeyManager",
        }
    }
}

/// The gRPC service name of SPIRE's configuration service.
pub const CONFIG_SERVICE: &str = "spire.service.common.config.v1.Config";

/// go-plugin's core protocol version and the application protocol version SPIRE speaks.
const CORE_PROTOCOL_VERSION: u32 = 1;
const APP_PROTOCOL_VERSION: u32 = 1;

/// Why the plug-in process could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// Not started by SPIRE (no magic cookie) or by an incompatible host.
    #[error("{0}")]
    NotLaunchedBySpire(String),
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

/// Checks the environment go-plugin's host sets. Returns a message for the operator when it is not there.
pub fn check_launch(
    kind: PluginKind,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(), PluginError> {
    let key = kind.type_name();
    if env(key).as_deref() != Some(key) {
        return Err(PluginError::NotLaunchedBySpire(format!(
            "this is a SPIRE plug-in: a SPIRE server starts it itself. Add it to server.conf as\n  {key} \"signet\" {{\n    \
             plugin_cmd = \"<path to signet>\"\n    plugin_args = [\"spire-plugin\", \"{}\"]\n    \
             plugin_checksum = \"<sha256sum of signet>\"\n    plugin_data {{ endpoint = ..., trust_bundle_path = ..., \
             client_cert_path = ..., client_key_path = ... }}\n  }}\n(the manual's SPIRE chapter, docs/src/spire.md, has the whole snippet). \
             The environment variable {key}={key} that SPIRE sets is missing.",
            match kind {
                PluginKind::UpstreamAuthority => "upstream-authority",
                PluginKind::KeyManager => "key-manager",
            }
        )));
    }
    if let Some(v) = env("PLUGIN_PROTOCOL_VERSIONS") {
        let ok = v
            .split(',')
            .any(|p| p.trim() == APP_PROTOCOL_VERSION.to_string());
        if !ok {
            return Err(PluginError::NotLaunchedBySpire(format!(
                "the host speaks plug-in protocol versions {v:?}; signet speaks {APP_PROTOCOL_VERSION}"
            )));
        }
    }
    Ok(())
}

/// go-plugin's handshake line for a unix socket.
pub fn handshake_line(socket: &Path) -> String {
    format!(
        "{CORE_PROTOCOL_VERSION}|{APP_PROTOCOL_VERSION}|unix|{}|grpc",
        socket.display()
    )
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// go-plugin's broker. SPIRE announces its host-services listener (id 1) at once and expects the stream to stay
/// open; signet uses no host service, so announcements are logged and the stream is held until shutdown.
#[derive(Debug, Clone)]
struct Broker {
    shutdown: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl gp::grpc_broker_server::GrpcBroker for Broker {
    type StartStreamStream = Boxed<gp::ConnInfo>;

    async fn start_stream(
        &self,
        request: Request<Streaming<gp::ConnInfo>>,
    ) -> Result<Response<Self::StartStreamStream>, Status> {
        let mut incoming = request.into_inner();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<gp::ConnInfo, Status>>(1);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = incoming.next() => match m {
                        Some(Ok(c)) => tracing::debug!(service_id = c.service_id, network = %c.network,
                            address = %c.address, "broker: host announced a connection (not used)"),
                        _ => break,
                    },
                    () = crate::shutdown::until_shutdown(&mut shutdown) => break,
                }
            }
            drop(tx);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// go-plugin's controller: `Shutdown` stops the process.
#[derive(Debug, Clone)]
struct Controller {
    stop: Arc<watch::Sender<bool>>,
}

#[tonic::async_trait]
impl gp::grpc_controller_server::GrpcController for Controller {
    async fn shutdown(&self, _: Request<gp::Empty>) -> Result<Response<gp::Empty>, Status> {
        tracing::info!("SPIRE asked the plug-in to shut down");
        let _ = self.stop.send(true);
        Ok(Response::new(gp::Empty {}))
    }
}

/// go-plugin's stdio relay: signet writes its log to stderr itself, so the stream carries nothing and stays open
/// until shutdown.
#[derive(Debug, Clone)]
struct Stdio {
    shutdown: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl gp::grpc_stdio_server::GrpcStdio for Stdio {
    type StreamStdioStream = Boxed<gp::StdioData>;

    async fn stream_stdio(
        &self,
        _: Request<()>,
    ) -> Result<Response<Self::StreamStdioStream>, Status> {
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<gp::StdioData, Status>>(1);
        tokio::spawn(async move {
            tokio::select! {
                () = crate::shutdown::until_shutdown(&mut shutdown) => {}
                () = tx.closed() => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// SPIRE's `Init`: the plug-in names the services it serves.
#[derive(Debug, Clone)]
struct Init {
    kind: PluginKind,
}

#[tonic::async_trait]
impl initpb::init_server::Init for Init {
    async fn init(
        &self,
        request: Request<initpb::InitRequest>,
    ) -> Result<Response<initpb::InitResponse>, Status> {
        tracing::debug!(host_services = ?request.get_ref().host_service_names, "init");
        Ok(Response::new(initpb::InitResponse {
            plugin_service_names: vec![
                self.kind.service_name().to_string(),
                CONFIG_SERVICE.to_string(),
            ],
        }))
    }

    async fn deinit(
        &self,
        _: Request<initpb::DeinitRequest>,
    ) -> Result<Response<initpb::DeinitResponse>, Status> {
        tracing::debug!("deinit");
        Ok(Response::new(initpb::DeinitResponse {}))
    }
}

/// How `Configure` turns SPIRE's configuration into a connection to the appliance.
#[derive(Debug, Clone)]
enum Source {
    /// `plugin_data` names the appliance.
    Remote,
    /// The appliance runs in this process; `plugin_data` may only tune timeouts (which do not apply in process).
    Embedded {
        base: Arc<PluginSettings>,
        configured: in_process::Configured,
    },
}

/// SPIRE's `Config` service.
#[derive(Debug, Clone)]
struct Configurer {
    slot: Slot,
    source: Source,
}

impl Configurer {
    fn settings(
        &self,
        req: &cfgpb::ConfigureRequest,
    ) -> Result<PluginSettings, settings::SettingsError> {
        let td = req
            .core_configuration
            .as_ref()
            .map(|c| c.trust_domain.as_str())
            .unwrap_or_default();
        match &self.source {
            Source::Remote => PluginSettings::parse(&req.hcl_configuration, td),
            Source::Embedded { base, .. } => {
                let mut s = (**base).clone();
                s.tune(&req.hcl_configuration)?;
                Ok(s)
            }
        }
    }
}

#[tonic::async_trait]
impl cfgpb::config_server::Config for Configurer {
    async fn configure(
        &self,
        request: Request<cfgpb::ConfigureRequest>,
    ) -> Result<Response<cfgpb::ConfigureResponse>, Status> {
        let settings = self
            .settings(request.get_ref())
            .map_err(|e| Status::invalid_argument(format!("signet plug-in configuration: {e}")))?;
        if let Source::Embedded { configured, .. } = &self.source {
            configured.store(true, std::sync::atomic::Ordering::Release);
            tracing::info!(client = %settings.client_id, "configured (the appliance runs in this process)");
            return Ok(Response::new(cfgpb::ConfigureResponse {}));
        }
        tracing::info!(endpoints = ?settings.endpoints, client = %settings.client_id, "configured");
        let app = Appliance::connect(settings)
            .await
            .map_err(|e| Status::failed_precondition(format!("signet plug-in: {e}")))?;
        *self.slot.write().await = Some(app);
        Ok(Response::new(cfgpb::ConfigureResponse {}))
    }

    async fn validate(
        &self,
        request: Request<cfgpb::ValidateRequest>,
    ) -> Result<Response<cfgpb::ValidateResponse>, Status> {
        let r = request.into_inner();
        let as_configure = cfgpb::ConfigureRequest {
            core_configuration: r.core_configuration,
            hcl_configuration: r.hcl_configuration,
        };
        Ok(Response::new(match self.settings(&as_configure) {
            Ok(_) => cfgpb::ValidateResponse {
                valid: true,
                notes: Vec::new(),
            },
            Err(e) => cfgpb::ValidateResponse {
                valid: false,
                notes: vec![e.to_string()],
            },
        }))
    }
}

/// Options of the plug-in process.
#[derive(Debug, Clone)]
pub struct PluginOptions {
    /// Which plug-in point.
    pub kind: PluginKind,
    /// Run the appliance in this process from this `signet serve` configuration.
    pub embedded: Option<PathBuf>,
}

/// Runs the plug-in process until SPIRE shuts it down. Call after [`check_launch`]; prints the handshake line on
/// stdout once it listens.
pub async fn run(opts: PluginOptions) -> Result<(), PluginError> {
    let fail = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| PluginError::Failed(format!("{what}: {e}"))
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);

    let mut embedded_app = None;
    let mut local = None;
    let source = match &opts.embedded {
        None => Source::Remote,
        Some(path) => {
            let (app, settings, caller) = start_embedded(path).await?;
            embedded_app = Some(app);
            let configured = in_process::Configured::default();
            local = Some((caller, configured.clone()));
            Source::Embedded {
                base: Arc::new(settings),
                configured,
            }
        }
    };

    let dir = std::env::var_os("PLUGIN_UNIX_SOCKET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let socket = dir.join(format!("signet-plugin-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .map_err(fail(&format!("listening on {}", socket.display())))?;
    let _cleanup = RemoveOnDrop(socket.clone());

    let slot: Slot = Arc::new(RwLock::new(None));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("plugin", tonic_health::ServingStatus::Serving)
        .await;
    health
        .set_service_status(
            opts.kind.service_name(),
            tonic_health::ServingStatus::Serving,
        )
        .await;

    let mut router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(gp::grpc_broker_server::GrpcBrokerServer::new(Broker {
            shutdown: stop_rx.clone(),
        }))
        .add_service(gp::grpc_controller_server::GrpcControllerServer::new(
            Controller {
                stop: stop_tx.clone(),
            },
        ))
        .add_service(gp::grpc_stdio_server::GrpcStdioServer::new(Stdio {
            shutdown: stop_rx.clone(),
        }))
        .add_service(initpb::init_server::InitServer::new(Init {
            kind: opts.kind,
        }))
        .add_service(cfgpb::config_server::ConfigServer::new(Configurer {
            slot: slot.clone(),
            source,
        }));
    router = match (opts.kind, local) {
        (PluginKind::UpstreamAuthority, Some((caller, configured))) => {
            use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_server::UpstreamAuthorityServer;
            router.add_service(UpstreamAuthorityServer::new(
                in_process::InProcessUpstreamAuthority::new(caller, configured),
            ))
        }
        (PluginKind::KeyManager, Some((caller, configured))) => {
            use signet_proto::spire::plugin::server::keymanager::v1::key_manager_server::KeyManagerServer;
            router.add_service(KeyManagerServer::new(in_process::InProcessKeyManager::new(
                caller, configured,
            )))
        }
        (PluginKind::UpstreamAuthority, None) => {
            use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_server::UpstreamAuthorityServer;
            router.add_service(UpstreamAuthorityServer::new(
                UpstreamAuthorityForwarder::new(slot.clone(), stop_rx.clone()),
            ))
        }
        (PluginKind::KeyManager, None) => {
            use signet_proto::spire::plugin::server::keymanager::v1::key_manager_server::KeyManagerServer;
            router.add_service(KeyManagerServer::new(KeyManagerForwarder::new(
                slot.clone(),
            )))
        }
    };

    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", handshake_line(&socket)).map_err(fail("writing the handshake"))?;
        out.flush().map_err(fail("writing the handshake"))?;
    }
    tracing::info!(plugin = opts.kind.type_name(), socket = %socket.display(), "signet plug-in serving");

    // SPIRE handles Ctrl-C and unloads its plug-ins itself (Deinit, then Shutdown): the plug-in must outlive the
    // signal its terminal sends to the whole process group.
    let interrupts = ignore_interrupts();
    let mut stop = stop_rx.clone();
    let served = router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            crate::shutdown::until_shutdown(&mut stop).await;
        })
        .await;
    drop(interrupts);
    if let Some(app) = embedded_app
        && let Err(e) = tokio::time::timeout(Duration::from_secs(5), app.shutdown())
            .await
            .unwrap_or(Ok(()))
    {
        tracing::warn!(error = %e, "the embedded appliance stopped badly");
    }
    served.map_err(|e| PluginError::Failed(format!("the plug-in's gRPC server failed: {e}")))
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn ignore_interrupts() -> Option<tokio::task::JoinHandle<()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sig = signal(SignalKind::interrupt()).ok()?;
        Some(tokio::spawn(async move {
            while sig.recv().await.is_some() {
                tracing::debug!("interrupt ignored: SPIRE unloads the plug-in");
            }
        }))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

async fn start_embedded(
    path: &Path,
) -> Result<
    (
        crate::serve::Appliance,
        PluginSettings,
        crate::api::InProcess,
    ),
    PluginError,
> {
    let failed =
        |e: String| PluginError::Failed(format!("embedded appliance ({}): {e}", path.display()));
    let mut cfg = crate::config::Config::load(path).map_err(|e| failed(e.to_string()))?;
    cfg.server.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.server.metrics = None;
    if cfg.data_dir.is_relative()
        && let Some(parent) = path.parent()
    {
        cfg.data_dir = parent.join(&cfg.data_dir);
    }
    let app = crate::serve::Appliance::start_in_process(cfg)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let caller = app.in_process().map_err(|e| failed(e.to_string()))?;
    let p = app.paths().clone();
    let read = |f: &Path| std::fs::read(f).map_err(|e| failed(format!("{}: {e}", f.display())));
    let admin = read(&p.admin_cert)?;
    let client_id =
        crate::plugin::settings::spiffe_id_of_pem(&admin).map_err(|e| failed(e.to_string()))?;
    let trust_domain = signet_proto::connect::trust_domain_of(&client_id)
        .unwrap_or_default()
        .to_string();
    let settings = PluginSettings {
        endpoints: vec!["in-process".into()],
        server_name: None,
        trust_domain,
        trust_bundle_pem: read(&p.bundle)?,
        credential: settings::FirstCredential::Pem {
            cert_pem: admin,
            key_pem: read(&p.admin_key)?,
        },
        credential_paths: None,
        client_id,
        svid_ttl: Duration::ZERO,
        // The admin credential is the appliance's own, renewed by the appliance.
        renew: false,
        connect_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(30),
        max_backoff: Duration::from_secs(5),
        key_identifier: settings::KeyIdentifier::None,
    };
    tracing::info!(data_dir = %p.dir.display(), caller = %settings.client_id,
        "embedded appliance started in this process");
    Ok((app, settings, caller))
}
