//! The start of the appliance, in order: the metrics recorder, the datastore, the bootstrap (one replica at a time),
//! the authorities and their issuers, the shared state, signet's own credentials, the background tasks, the gRPC
//! server with its four services, and the bundle endpoint. A failure part-way stops what was started.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::Appliance;
use super::authorities::{open_authorities, signers_of};
use super::background::{follow_authorities, health_loop, start_federation, start_metrics};
use super::bootstrap::{AWAIT_CERTIFICATE_POLL, bootstrap, external_parent, prior_of};
use super::embedded::EmbeddedToken;
use super::error::{ServeError, datastore, io};
use crate::api::admin::AdminService;
use crate::api::issuer::IssuerService;
use crate::api::keymanager::KeyManagerService;
use crate::api::listener::{RefusalTally, accept_loop, audit_refusals};
use crate::api::upstream::UpstreamAuthorityService;
use crate::api::{AppParts, AppState, tls};
use crate::config::{ADMIN_ID_PATH, Config, ConfigError, ModeSetting, SERVER_ID_PATH};
use crate::datadir::{pem_certs, replace_file};
use crate::health::HealthBoard;
use crate::pipeline::{DelegatedConfig, Pipeline, SigningMode};
use crate::policy::Policy;
use crate::store::Store;

impl Appliance {
    pub(super) async fn start_inner(
        cfg: Config,
        embedded: Arc<dyn EmbeddedToken>,
        clock: Arc<dyn crate::ca::Clock>,
        network: bool,
    ) -> Result<Self, ServeError> {
        cfg.validate()?;
        let policy = Policy::from_rules(&cfg.policy, cfg.authority.jwt.max_ttl.0)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        // The recorder goes in before anything registers a metric (handles taken earlier would be no-ops).
        let mut background = Vec::new();
        let health_board = HealthBoard::default();
        let metrics_addr = match cfg.server.metrics.as_deref().map(str::trim) {
            Some(m) if !m.is_empty() => {
                let a: SocketAddr = m.parse().map_err(|e| {
                    ConfigError::Invalid(format!("server.metrics = {m:?} is not an address: {e}"))
                })?;
                Some(start_metrics(a, health_board.clone(), &mut background).await?)
            }
            _ => None,
        };

        let td = cfg.trust_domain()?;
        std::fs::create_dir_all(&cfg.data_dir).map_err(io(format!(
            "creating the data directory {}",
            cfg.data_dir.display()
        )))?;
        let dir =
            std::fs::canonicalize(&cfg.data_dir).map_err(io("resolving the data directory"))?;
        let store = Store::open(&cfg.datastore, &dir)
            .await
            .map_err(datastore("opening the datastore"))?;
        let external = match external_parent(&cfg) {
            Ok(e) => e,
            Err(e) => {
                for b in &background {
                    b.abort();
                }
                return Err(e);
            }
        };
        // Below an offline root, the first start waits until the authority's certificate is installed (see
        // `load_installed`): it says so, then looks again every few seconds.
        let mut told = false;
        let (start_lock, boot) = loop {
            // Replicas sharing a datastore start one at a time up to the adoption of the first authorities, so that
            // only the first makes the root and keys.
            let start_lock = store
                .start_lock()
                .await
                .map_err(datastore("waiting for the start lock"))?;
            let prior = prior_of(&store, &td).await?;
            let (cfg2, dir2, emb, ext) =
                (cfg.clone(), dir.clone(), embedded.clone(), external.clone());
            let boot = tokio::task::spawn_blocking(move || {
                bootstrap(&cfg2, emb.as_ref(), dir2, prior, ext.as_ref())
            })
            .await
            .map_err(|source| ServeError::Task {
                what: "the start-up task",
                source,
            })
            .and_then(|r| r);
            match boot {
                Ok(b) => break (start_lock, b),
                Err(ServeError::AwaitingCertificate(m)) => {
                    start_lock.release().await;
                    if !told {
                        tracing::warn!("{m}");
                        told = true;
                    }
                    tokio::time::sleep(AWAIT_CERTIFICATE_POLL).await;
                }
                Err(e) => {
                    for b in &background {
                        b.abort();
                    }
                    return Err(e);
                }
            }
        };

        let mode = match cfg.authority.x509.mode {
            ModeSetting::Direct => SigningMode::Direct,
            ModeSetting::Delegated => SigningMode::Delegated(DelegatedConfig {
                intermediate_ttl: cfg.authority.x509.intermediate_ttl.0,
                ..DelegatedConfig::default()
            }),
        };
        let stop_pipeline = |p: Pipeline| async move {
            let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
        };
        if let Err(e) = boot
            .keys
            .attach_store(store.clone(), clock.clone(), cfg.key_manager.sweep_after.0)
            .await
        {
            stop_pipeline(boot.pipeline.clone()).await;
            return Err(ServeError::KeyStore {
                reason: e.to_string(),
            });
        }
        let authorities = match open_authorities(&cfg, &boot, store.clone(), clock).await {
            Ok(a) => Arc::new(a),
            Err(e) => {
                stop_pipeline(boot.pipeline.clone()).await;
                return Err(e);
            }
        };
        start_lock.release().await;
        let signers = match signers_of(
            &authorities.active(),
            &boot.td,
            mode.clone(),
            &boot.pipeline,
            cfg.authority.jwt.max_ttl.0,
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                stop_pipeline(boot.pipeline.clone()).await;
                return Err(e);
            }
        };
        // The SPIRE CAs the policy asks for must fit below the authority that signs them.
        if let Err(e) = policy.check_spire_path_lens(signers.root.path_len()) {
            stop_pipeline(boot.pipeline.clone()).await;
            return Err(ConfigError::Invalid(e.to_string()).into());
        }
        let bundle = authorities.bundle().clone();
        bundle.set_refresh_hint(cfg.authority.bundle_refresh_hint.0);
        replace_file(
            &boot.paths.bundle,
            pem_certs(&bundle.current().x509_roots).as_bytes(),
            false,
        )?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let listener = if network {
            Some(
                TcpListener::bind(cfg.server.listen)
                    .await
                    .map_err(io(format!("listening on {}", cfg.server.listen)))?,
            )
        } else {
            None
        };
        let addr = match &listener {
            Some(l) => l.local_addr().map_err(io("reading the listen address"))?,
            None => SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let replication = Arc::new(if store.is_shared() {
            let id = cfg
                .server
                .replica_id
                .clone()
                .unwrap_or_else(|| crate::replica::default_id(addr.port()));
            crate::replica::Replication::new(store.engine(), id)
        } else {
            crate::replica::Replication::single(store.engine())
        });
        let state = Arc::new(AppState::new(AppParts {
            trust_domain: boot.td.clone(),
            policy,
            audit: boot.audit.clone(),
            signers,
            authorities: authorities.clone(),
            pipeline: boot.pipeline.clone(),
            keys: boot.keys,
            replication,
            max_batch: cfg.server.max_batch,
            request_timeout: cfg.pipeline.default_timeout.0,
            max_in_flight_per_caller: cfg.server.max_in_flight_per_caller,
            token_sessions: boot.token_sessions.into_iter().collect(),
            shutdown: shutdown_rx.clone(),
        }));
        // signet's own credentials: what the listeners present (swapped in place when renewed), held on the root
        // that signed them (it stays in the bundle while they are in use) and reported in the heartbeat.
        let server_cert = Arc::new(
            crate::own::LiveCert::new(&boot.server.0, &boot.server.1).map_err(|e| {
                ServeError::OwnCredentials {
                    reason: e.to_string(),
                }
            })?,
        );
        let own = Arc::new(crate::own::OwnCredentials::new(
            crate::own::OwnSettings {
                server_id: boot
                    .td
                    .workload_id(SERVER_ID_PATH)
                    .map_err(ServeError::OwnId)?,
                admin_id: boot
                    .td
                    .workload_id(ADMIN_ID_PATH)
                    .map_err(ServeError::OwnId)?,
                dns: cfg.server.names.clone(),
                ttl: cfg.server.service_svid_ttl.0,
                paths: boot.paths.clone(),
                bundle_endpoint: cfg.federation.listen.is_some()
                    && cfg.federation.profile == crate::config::EndpointProfile::HttpsSpiffe,
            },
            server_cert.clone(),
            authorities.clone(),
            state.replication.clone(),
        ));
        for (which, chain) in [
            (crate::own::Own::Server, &boot.server.0),
            (crate::own::Own::Admin, &boot.admin),
        ] {
            own.adopt(which, chain, &boot.root_der)
                .map_err(|e| ServeError::OwnCredentials {
                    reason: e.to_string(),
                })?;
        }
        if cfg.server.renew_own_credentials {
            background.push(tokio::spawn(own.clone().run(shutdown_rx.clone())));
        }
        let tls_cfg =
            tls::server_config_live(server_cert.clone(), state.client_trust()).map_err(|e| {
                ServeError::Tls {
                    what: "the gRPC port's TLS",
                    reason: e.to_string(),
                }
            })?;
        background.push(tokio::spawn(follow_authorities(
            state.clone(),
            authorities.clone(),
            mode,
            cfg.authority.jwt.max_ttl.0,
            boot.paths.bundle.clone(),
            shutdown_rx.clone(),
        )));
        background.push(tokio::spawn(crate::api::keymanager::sweep(
            state.clone(),
            cfg.key_manager.sweep_after.0,
            cfg.key_manager.sweep_every.0,
            shutdown_rx.clone(),
        )));
        let schedule = cfg.authority.rotation.schedule;
        if schedule || store.is_shared() {
            background.push(tokio::spawn(crate::replica::lead_rotations(
                store.clone(),
                state.replication.clone(),
                authorities.clone(),
                cfg.authority.rotation.check_every.0,
                schedule,
                shutdown_rx.clone(),
            )));
        }
        if store.is_shared() {
            background.push(tokio::spawn(crate::replica::follow_changes(
                store.clone(),
                {
                    let state = state.clone();
                    move |which| match which {
                        crate::replica::Forget::Key(ns, id) => state.keys.forget(Some((ns, id))),
                        crate::replica::Forget::Namespace(ns) => state.keys.forget_namespace(ns),
                        crate::replica::Forget::All => state.keys.forget(None),
                    }
                },
                authorities.clone(),
                shutdown_rx.clone(),
            )));
            background.push(tokio::spawn(crate::replica::heartbeat(
                store.clone(),
                state.replication.clone(),
                {
                    let state = state.clone();
                    move |n| state.policy.set_share(n)
                },
                if network {
                    addr.to_string()
                } else {
                    format!("in-process (pid {})", std::process::id())
                },
                shutdown_rx.clone(),
            )));
        }

        let (incoming_tx, incoming_rx) = mpsc::channel(64);
        let refusals = Arc::new(RefusalTally::default());
        if let Some(listener) = listener {
            background.push(tokio::spawn(accept_loop(
                listener,
                tokio_rustls::TlsAcceptor::from(Arc::new(tls_cfg)),
                cfg.server.max_connections,
                refusals.clone(),
                incoming_tx,
                shutdown_rx.clone(),
            )));
        }
        if let Some(listen) = cfg.server.bootstrap_listen {
            let tls = crate::api::join::bootstrap_tls(boot.server.0.clone(), boot.server.1.clone())
                .map_err(|e| ServeError::Tls {
                    what: "the bootstrap port's TLS",
                    reason: e.to_string(),
                })?;
            crate::api::join::start_bootstrap(
                listen,
                tls,
                state.clone(),
                refusals.clone(),
                shutdown_rx.clone(),
                &mut background,
            )
            .await
            .map_err(|e| ServeError::Bootstrap {
                reason: e.to_string(),
            })?;
        }
        background.push(tokio::spawn(audit_refusals(
            refusals,
            boot.audit.clone(),
            cfg.server.refusal_audit_interval.0,
            shutdown_rx.clone(),
        )));

        let (health, health_service) = tonic_health::server::health_reporter();
        background.push(tokio::spawn(health_loop(
            health,
            health_board,
            state.pipeline.clone(),
            shutdown_rx.clone(),
        )));
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(signet_proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(ServeError::Reflection)?;

        let max = cfg.server.max_message_bytes;
        use signet_proto::signet::v1::{admin_server::AdminServer, issuer_server::IssuerServer};
        use signet_proto::spire::plugin::server::keymanager::v1::key_manager_server::KeyManagerServer;
        use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_server::UpstreamAuthorityServer;
        // Subscription streams live for hours: HTTP/2 pings find dead peers (and end their streams); the stream
        // limit bounds what one connection can hold open.
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(cfg.server.max_streams_per_connection))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(
                UpstreamAuthorityServer::new(UpstreamAuthorityService::new(state.clone()))
                    .max_decoding_message_size(max),
            )
            .add_service(
                KeyManagerServer::new(KeyManagerService::new(state.clone()))
                    .max_decoding_message_size(max),
            )
            .add_service(
                IssuerServer::new(IssuerService::new(state.clone())).max_decoding_message_size(max),
            )
            .add_service(
                AdminServer::new(AdminService::new(state.clone())).max_decoding_message_size(max),
            );
        let mut stop = shutdown_rx.clone();
        let server = network.then(|| {
            tokio::spawn(
                router.serve_with_incoming_shutdown(ReceiverStream::new(incoming_rx), async move {
                    crate::shutdown::until_shutdown(&mut stop).await
                }),
            )
        });
        let federation_addr =
            match start_federation(&cfg, &server_cert, &state, &shutdown_rx, &mut background).await
            {
                Ok(a) => a,
                Err(e) => {
                    let _ = shutdown_tx.send(true);
                    for b in &background {
                        b.abort();
                    }
                    let p = state.pipeline.clone();
                    let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
                    return Err(e);
                }
            };
        if network {
            tracing::info!(%addr, trust_domain = %boot.td, "signet is serving");
            // Written aside and renamed over: a reader (the CLI, a supervisor, a test) never sees it empty.
            replace_file(&boot.paths.endpoint, addr.to_string().as_bytes(), false)?;
        } else {
            tracing::info!(trust_domain = %boot.td, "signet is serving callers in this process (no gRPC port)");
        }
        Ok(Self {
            addr,
            metrics_addr,
            federation_addr,
            paths: boot.paths,
            state,
            km_pipeline: boot.km_pipeline,
            shutdown_tx,
            server,
            background,
            grace: cfg.server.shutdown_grace.0,
            token_names: boot.token_names,
        })
    }
}
