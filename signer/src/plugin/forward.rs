//! Forwarding of the plug-in RPCs to the appliance over mTLS.
//!
//! Unary RPCs (KeyManager) are retried on UNAVAILABLE with backoff within `request_timeout`, so an appliance
//! restart costs SPIRE a delay, not an error. Streams (UpstreamAuthority) are relayed: the SPIRE-side stream stays
//! open whatever happens to the appliance; when the appliance's stream ends or fails, the relay reconnects with
//! backoff and resubscribes, and passes on only what changed:
//! - `MintX509CAAndSubscribe`: the first answer (SPIRE's new CA and the roots) comes from the appliance's stream;
//!   after a reconnection the roots are followed through `SubscribeToLocalBundle` (minting again would give SPIRE a
//!   CA it did not ask for), and sent as messages with roots only, as the contract wants;
//! - `PublishJWTKeyAndSubscribe`: the same request again (publishing is idempotent, and it restores SPIRE's key to
//!   an appliance that forgot it);
//! - `SubscribeToLocalBundle`: subscribed again.
//!
//! With replicas (`endpoints = [...]`), calls go to one replica at a time, the first of the list to begin with; when
//! it cannot be reached (or its stream fails) the next one takes over at once, and the backoff applies only once
//! every replica has failed in turn. The replicas share their state, so a stream resumed on another replica follows
//! the same roots.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use signet_proto::spire::plugin::server::keymanager::v1 as km;
use signet_proto::spire::plugin::server::keymanager::v1::key_manager_client::KeyManagerClient;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as ua;
use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_client::UpstreamAuthorityClient;
use tokio::sync::{RwLock, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Response, Status};

use super::settings::PluginSettings;

/// A connection to the appliance (or to each of its replicas), built from the plug-in's configuration.
#[derive(Debug, Clone)]
pub struct Appliance {
    /// One lazily connecting channel per endpoint, in the order of `settings.endpoints`.
    channels: Arc<Vec<Channel>>,
    /// The endpoint calls go to now.
    current: Arc<AtomicUsize>,
    settings: Arc<PluginSettings>,
}

impl Appliance {
    /// Lazily connecting channels (tonic reconnects on its own after an appliance comes back).
    pub fn new(settings: PluginSettings) -> Result<Self, String> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&settings.trust_bundle_pem))
            .identity(Identity::from_pem(
                &settings.client_cert_pem,
                &settings.client_key_pem,
            ))
            .domain_name(settings.server_name.clone());
        let mut channels = Vec::with_capacity(settings.endpoints.len());
        for url in &settings.endpoints {
            channels.push(
                Endpoint::from_shared(url.clone())
                    .map_err(|e| format!("endpoint {url:?}: {e}"))?
                    .tls_config(tls.clone())
                    .map_err(|e| format!("TLS set-up for the appliance: {e}"))?
                    .connect_timeout(settings.connect_timeout)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(20))
                    .keep_alive_while_idle(true)
                    .connect_lazy(),
            );
        }
        if channels.is_empty() {
            return Err("no endpoint for the appliance".into());
        }
        Ok(Self {
            channels: Arc::new(channels),
            current: Arc::new(AtomicUsize::new(0)),
            settings: Arc::new(settings),
        })
    }

    /// The configuration in force.
    pub fn settings(&self) -> &PluginSettings {
        &self.settings
    }

    /// The endpoint calls go to now (an index into `settings.endpoints`).
    fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    /// The address of endpoint `i`, for messages.
    fn endpoint(&self, i: usize) -> &str {
        &self.settings.endpoints[i]
    }

    /// Endpoint `failed` could not be reached: calls go to the next one (unless another call moved on already).
    fn fail_over(&self, failed: usize) {
        let n = self.channels.len();
        if n > 1
            && self
                .current
                .compare_exchange(
                    failed,
                    (failed + 1) % n,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            tracing::warn!(
                from = self.endpoint(failed),
                to = self.endpoint((failed + 1) % n),
                "the appliance replica cannot be reached; its calls go to the next one"
            );
        }
    }

    /// How long to wait before attempt `attempt + 1` after a transient failure: nothing while some replica of this
    /// round has not been tried, the backoff once all have.
    fn wait_after(&self, attempt: u32) -> Duration {
        let n = self.channels.len() as u32;
        if !(attempt + 1).is_multiple_of(n) {
            Duration::ZERO
        } else {
            backoff(attempt / n, self.settings.max_backoff)
        }
    }

    fn upstream(&self) -> UpstreamAuthorityClient<Channel> {
        UpstreamAuthorityClient::new(self.channels[self.current()].clone())
    }

    fn keymanager(&self) -> KeyManagerClient<Channel> {
        KeyManagerClient::new(self.channels[self.current()].clone())
    }
}

/// The configuration slot the services read: empty until SPIRE calls `Configure`.
pub type Slot = Arc<RwLock<Option<Appliance>>>;

async fn configured(slot: &Slot) -> Result<Appliance, Status> {
    slot.read().await.clone().ok_or_else(|| {
        Status::failed_precondition(
            "the signet plug-in is not configured: SPIRE calls Configure first",
        )
    })
}

/// Whether a failure is worth another attempt (the appliance is restarting or unreachable).
fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

fn backoff(attempt: u32, max: Duration) -> Duration {
    let ms = 100u64.saturating_mul(1u64 << attempt.min(10));
    Duration::from_millis(ms).min(max)
}

fn explain(s: Status, endpoint: &str) -> Status {
    if s.code() == Code::Unavailable {
        Status::unavailable(format!(
            "the signet appliance at {endpoint} is unavailable: {}",
            s.message()
        ))
    } else {
        s
    }
}

/// Calls `call` until it succeeds, fails for good, or `timeout` has passed.
async fn retrying<T, F, Fut>(app: &Appliance, mut call: F) -> Result<T, Status>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let timeout = app.settings.request_timeout;
    let until = tokio::time::Instant::now() + timeout;
    let mut attempt = 0;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let on = app.current();
        let r = match tokio::time::timeout(left, call(left)).await {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer from the signet appliance at {} within {timeout:?}",
                app.endpoint(on)
            ))),
        };
        match r {
            Err(s) if transient(&s) => {
                app.fail_over(on);
                let wait = app.wait_after(attempt);
                if tokio::time::Instant::now() + wait >= until {
                    return Err(explain(s, app.endpoint(on)));
                }
                tracing::debug!(error = %s.message(), "the appliance is unavailable; retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            other => return other.map_err(|s| explain(s, app.endpoint(on))),
        }
    }
}

fn with_timeout<T>(msg: T, t: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(t);
    r
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
type Reconnect<T> =
    Box<dyn Fn(Appliance) -> Pin<Box<dyn Future<Output = Result<Boxed<T>, Status>> + Send>> + Send>;

/// Relays `first` (already read from `upstream`) and what follows to SPIRE; when the appliance's stream ends or
/// fails, waits (backoff) and calls `reconnect`, sending on only messages that `same` says differ from the last one
/// sent. Ends when SPIRE goes away or the plug-in shuts down.
fn relay<T: Clone + Send + 'static>(
    app: Appliance,
    first: T,
    upstream: Boxed<T>,
    reconnect: Reconnect<T>,
    same: fn(&T, &T) -> bool,
    mut shutdown: watch::Receiver<bool>,
    what: &'static str,
) -> Boxed<T> {
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(4);
    tokio::spawn(async move {
        let mut last = first;
        let mut up = upstream;
        if tx.send(Ok(last.clone())).await.is_err() {
            return;
        }
        let mut attempt = 0u32;
        // The endpoint the appliance's stream is open on.
        let mut on = app.current();
        loop {
            tokio::select! {
                m = up.next() => match m {
                    Some(Ok(m)) => {
                        attempt = 0;
                        if !same(&last, &m) {
                            if tx.send(Ok(m.clone())).await.is_err() {
                                return;
                            }
                            last = m;
                        }
                        continue;
                    }
                    Some(Err(s)) => tracing::warn!(stream = what, code = ?s.code(), error = %s.message(),
                        "the appliance's stream failed; reconnecting (SPIRE's stream stays open)"),
                    None => tracing::warn!(stream = what,
                        "the appliance ended the stream; reconnecting (SPIRE's stream stays open)"),
                },
                () = tx.closed() => return,
                () = crate::api::until_shutdown(&mut shutdown) => return,
            }
            // Reconnect (to the next replica, if there are several) until it works, SPIRE goes away or the plug-in
            // stops.
            app.fail_over(on);
            loop {
                let wait = app.wait_after(attempt);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = tx.closed() => return,
                    () = crate::api::until_shutdown(&mut shutdown) => return,
                }
                let made = tokio::select! {
                    r = reconnect(app.clone()) => r,
                    () = tx.closed() => return,
                    () = crate::api::until_shutdown(&mut shutdown) => return,
                };
                match made {
                    Ok(s) => {
                        on = app.current();
                        tracing::info!(
                            stream = what,
                            endpoint = app.endpoint(on),
                            "reconnected to the appliance"
                        );
                        up = s;
                        break;
                    }
                    Err(s) => {
                        tracing::debug!(stream = what, error = %s.message(), "reconnection failed")
                    }
                }
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

fn boxed<T: Send + 'static>(s: tonic::Streaming<T>) -> Boxed<T> {
    Box::pin(s)
}

/// Opens a stream on the appliance and reads its first message, retrying transient failures within the
/// request timeout.
async fn open_first<T, F, Fut>(app: &Appliance, open: F) -> Result<(T, Boxed<T>), Status>
where
    T: Send + 'static,
    F: Fn(Appliance, Duration) -> Fut,
    Fut: Future<Output = Result<Response<tonic::Streaming<T>>, Status>>,
{
    retrying(app, |left| {
        let a = app.clone();
        let fut = open(a, left);
        async move {
            let mut s = fut.await?.into_inner();
            match s.message().await? {
                Some(first) => Ok((first, boxed(s))),
                None => Err(Status::unavailable(
                    "the appliance ended the stream before answering",
                )),
            }
        }
    })
    .await
}

/// The UpstreamAuthority plug-in service: forwards to the appliance.
#[derive(Debug, Clone)]
pub struct UpstreamAuthorityForwarder {
    slot: Slot,
    shutdown: watch::Receiver<bool>,
}

impl UpstreamAuthorityForwarder {
    /// Forwards with the configuration in `slot`.
    pub fn new(slot: Slot, shutdown: watch::Receiver<bool>) -> Self {
        Self { slot, shutdown }
    }
}

fn roots_only(b: ua::SubscribeToLocalBundleResponse) -> ua::MintX509caResponse {
    ua::MintX509caResponse {
        x509_ca_chain: Vec::new(),
        upstream_x509_roots: b.upstream_x509_roots,
    }
}

#[tonic::async_trait]
impl ua::upstream_authority_server::UpstreamAuthority for UpstreamAuthorityForwarder {
    type MintX509CAAndSubscribeStream = Boxed<ua::MintX509caResponse>;
    type PublishJWTKeyAndSubscribeStream = Boxed<ua::PublishJwtKeyResponse>;
    type SubscribeToLocalBundleStream = Boxed<ua::SubscribeToLocalBundleResponse>;

    async fn mint_x509ca_and_subscribe(
        &self,
        request: Request<ua::MintX509caRequest>,
    ) -> Result<Response<Self::MintX509CAAndSubscribeStream>, Status> {
        let app = configured(&self.slot).await?;
        let req = request.into_inner();
        let (first, up) = open_first(&app, |a, t| {
            let req = req.clone();
            async move {
                a.upstream()
                    .mint_x509ca_and_subscribe(with_timeout(req, t))
                    .await
            }
        })
        .await?;
        tracing::info!(
            chain = first.x509_ca_chain.len(),
            roots = first.upstream_x509_roots.len(),
            "the appliance signed SPIRE's X.509 CA"
        );
        let reconnect: Reconnect<ua::MintX509caResponse> = Box::new(|a: Appliance| {
            Box::pin(async move {
                let s = a
                    .upstream()
                    .subscribe_to_local_bundle(ua::SubscribeToLocalBundleRequest {})
                    .await?
                    .into_inner();
                let s: Boxed<ua::MintX509caResponse> = Box::pin(s.map(|r| r.map(roots_only)));
                Ok(s)
            })
        });
        Ok(Response::new(relay(
            app,
            first,
            up,
            reconnect,
            |a, b| a.upstream_x509_roots == b.upstream_x509_roots,
            self.shutdown.clone(),
            "MintX509CAAndSubscribe",
        )))
    }

    async fn publish_jwt_key_and_subscribe(
        &self,
        request: Request<ua::PublishJwtKeyRequest>,
    ) -> Result<Response<Self::PublishJWTKeyAndSubscribeStream>, Status> {
        let app = configured(&self.slot).await?;
        let req = request.into_inner();
        let (first, up) = open_first(&app, |a, t| {
            let req = req.clone();
            async move {
                a.upstream()
                    .publish_jwt_key_and_subscribe(with_timeout(req, t))
                    .await
            }
        })
        .await?;
        let reconnect: Reconnect<ua::PublishJwtKeyResponse> = Box::new(move |a: Appliance| {
            let req = req.clone();
            Box::pin(async move {
                let s = a.upstream().publish_jwt_key_and_subscribe(req).await?;
                Ok(boxed(s.into_inner()))
            })
        });
        Ok(Response::new(relay(
            app,
            first,
            up,
            reconnect,
            |a, b| a == b,
            self.shutdown.clone(),
            "PublishJWTKeyAndSubscribe",
        )))
    }

    async fn subscribe_to_local_bundle(
        &self,
        _request: Request<ua::SubscribeToLocalBundleRequest>,
    ) -> Result<Response<Self::SubscribeToLocalBundleStream>, Status> {
        let app = configured(&self.slot).await?;
        let (first, up) = open_first(&app, |a, t| async move {
            a.upstream()
                .subscribe_to_local_bundle(with_timeout(ua::SubscribeToLocalBundleRequest {}, t))
                .await
        })
        .await?;
        let reconnect: Reconnect<ua::SubscribeToLocalBundleResponse> = Box::new(|a: Appliance| {
            Box::pin(async move {
                let s = a
                    .upstream()
                    .subscribe_to_local_bundle(ua::SubscribeToLocalBundleRequest {})
                    .await?;
                Ok(boxed(s.into_inner()))
            })
        });
        Ok(Response::new(relay(
            app,
            first,
            up,
            reconnect,
            |a, b| a == b,
            self.shutdown.clone(),
            "SubscribeToLocalBundle",
        )))
    }
}

/// The KeyManager plug-in service: forwards to the appliance.
#[derive(Debug, Clone)]
pub struct KeyManagerForwarder {
    slot: Slot,
}

impl KeyManagerForwarder {
    /// Forwards with the configuration in `slot`.
    pub fn new(slot: Slot) -> Self {
        Self { slot }
    }
}

macro_rules! unary {
    ($self:ident, $request:ident, $method:ident) => {{
        let app = configured(&$self.slot).await?;
        let req = $request.into_inner();
        let answer = retrying(&app, |t| {
            let (a, req) = (app.clone(), req.clone());
            async move { a.keymanager().$method(with_timeout(req, t)).await }
        })
        .await?;
        Ok(Response::new(answer.into_inner()))
    }};
}

#[tonic::async_trait]
impl km::key_manager_server::KeyManager for KeyManagerForwarder {
    async fn generate_key(
        &self,
        request: Request<km::GenerateKeyRequest>,
    ) -> Result<Response<km::GenerateKeyResponse>, Status> {
        unary!(self, request, generate_key)
    }

    async fn get_public_key(
        &self,
        request: Request<km::GetPublicKeyRequest>,
    ) -> Result<Response<km::GetPublicKeyResponse>, Status> {
        unary!(self, request, get_public_key)
    }

    async fn get_public_keys(
        &self,
        request: Request<km::GetPublicKeysRequest>,
    ) -> Result<Response<km::GetPublicKeysResponse>, Status> {
        unary!(self, request, get_public_keys)
    }

    async fn sign_data(
        &self,
        request: Request<km::SignDataRequest>,
    ) -> Result<Response<km::SignDataResponse>, Status> {
        unary!(self, request, sign_data)
    }
}
