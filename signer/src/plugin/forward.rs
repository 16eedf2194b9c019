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
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock as StdRwLock};
use std::time::Duration;

use signet_proto::connect::{self, LiveRoots, ServerAuth, SwappableIdentity};
use signet_proto::signet::v1 as pb;
use signet_proto::spire::plugin::server::keymanager::v1 as km;
use signet_proto::spire::plugin::server::keymanager::v1::key_manager_client::KeyManagerClient;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as ua;
use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_client::UpstreamAuthorityClient;
use tokio::sync::{RwLock, mpsc, watch};
use tokio_rustls::rustls;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use super::settings::{FirstCredential, PluginSettings};

/// Why the plug-in cannot reach the appliance, or get, renew or keep its credential.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The configuration (the key identifier file).
    #[error(transparent)]
    Settings(#[from] super::settings::SettingsError),
    /// The client certificate is not PEM.
    #[error("the client certificate is not PEM: {0}")]
    Pem(#[source] pem::PemError),
    /// The client certificate file holds no certificate.
    #[error("the client certificate holds no CERTIFICATE")]
    NoCertificate,
    /// The client certificate does not parse.
    #[error("the client certificate does not parse: {0}")]
    Parse(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The key does not match the certificate.
    #[error("the client key does not match its certificate: {0}")]
    KeyMismatch(#[source] rustls::Error),
    /// The TLS client side cannot be set up (the client plumbing of `signet-proto` reports its errors as text).
    #[error("{0}")]
    Tls(String),
    /// `trust_bundle_path` holds no usable roots (as the client plumbing reports it).
    #[error("trust_bundle_path: {0}")]
    TrustBundle(String),
    /// An endpoint is not a usable address (as the client plumbing reports it).
    #[error("endpoint {url:?}: {reason}")]
    Endpoint {
        /// The endpoint.
        url: String,
        /// Why.
        reason: String,
    },
    /// The configuration lists no endpoint.
    #[error("no endpoint for the appliance")]
    NoEndpoint,
    /// The key identifier is not a valid header value.
    #[error("key identifier {value:?}: {source}")]
    KeyIdentifier {
        /// The identifier.
        value: String,
        /// Why.
        #[source]
        source: tonic::metadata::errors::InvalidMetadataValue,
    },
    /// No new key could be generated.
    #[error("cannot generate a key: {0}")]
    KeyGen(#[source] rcgen::Error),
    /// The client's SPIFFE ID cannot be a URI SAN.
    #[error("{id}: {source}")]
    SanUri {
        /// The SPIFFE ID.
        id: String,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// The CSR cannot be built.
    #[error("cannot make the CSR: {0}")]
    Csr(#[source] rcgen::Error),
    /// A credential file cannot be written.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A private credential file cannot be written.
    #[error(transparent)]
    File(#[from] crate::datadir::FileError),
    /// The Workload API gave no X509-SVID in time.
    #[error("the Workload API at {socket} gave no X509-SVID within {timeout:?}")]
    WorkloadApiTimeout {
        /// The Workload API address.
        socket: String,
        /// The time allowed.
        timeout: Duration,
    },
    /// The Workload API source cannot start.
    #[error("the Workload API at {socket}: {source}")]
    WorkloadApi {
        /// The Workload API address.
        socket: String,
        /// Why.
        #[source]
        source: spiffe::X509SourceError,
    },
    /// The Workload API has no X509-SVID.
    #[error("the Workload API has no X509-SVID: {0}")]
    NoSvid(#[source] spiffe::X509SourceError),
    /// The Workload API's X509-SVID is of another trust domain.
    #[error("the Workload API's X509-SVID is {id}, not of SPIRE's trust domain {trust_domain}")]
    ForeignSvid {
        /// The SVID's SPIFFE ID.
        id: String,
        /// SPIRE's trust domain.
        trust_domain: String,
    },
    /// SPIRE's trust domain is not a trust domain name.
    #[error("trust domain {trust_domain:?}: {source}")]
    TrustDomain {
        /// The name.
        trust_domain: String,
        /// Why.
        #[source]
        source: spiffe::SpiffeIdError,
    },
    /// The Workload API has no bundle.
    #[error("the Workload API has no bundle: {0}")]
    NoBundle(#[source] spiffe::X509SourceError),
    /// The Workload API's bundle has no X.509 roots for the trust domain.
    #[error("the Workload API has no X.509 roots for trust domain {0}")]
    NoRoots(String),
    /// The bootstrap port cannot be reached.
    #[error("join token: cannot reach the bootstrap port {endpoint}: {reason}")]
    Bootstrap {
        /// The bootstrap port.
        endpoint: String,
        /// Why (as the client plumbing reports it).
        reason: String,
    },
    /// The appliance refused the join token.
    #[error("join token: the appliance refused it ({}): {}", crate::api::code_name(.0.code()), .0.message())]
    JoinRefused(#[source] tonic::Status),
    /// The appliance answered without an SVID.
    #[error("{0}: the appliance answered no SVID")]
    NoSvidAnswered(&'static str),
    /// Every endpoint refused or failed the renewal.
    #[error("{}", .0.iter().map(|(e, s)| format!("{e}: {}: {}", crate::api::code_name(s.code()), s.message())).collect::<Vec<_>>().join("; "))]
    Renewal(Vec<(String, tonic::Status)>),
    /// The credential files hold a credential for another SPIFFE ID.
    #[error("the files now hold a credential for {found}, not {expected}")]
    OtherId {
        /// The ID in the files.
        found: String,
        /// The plug-in's ID.
        expected: String,
    },
}

/// The plug-in's X509-SVID as it holds it: PEM text (as on disk), when it got it, and its NotAfter.
#[derive(Clone)]
struct Held {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    obtained: std::time::SystemTime,
    not_after: std::time::SystemTime,
}

impl Held {
    fn new(cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<Self, ForwardError> {
        let leaf = pem::parse_many(&cert_pem)
            .map_err(ForwardError::Pem)?
            .into_iter()
            .find(|p| p.tag() == "CERTIFICATE")
            .ok_or(ForwardError::NoCertificate)?;
        let (_, c) =
            x509_parser::parse_x509_certificate(leaf.contents()).map_err(ForwardError::Parse)?;
        let secs = u64::try_from(c.validity().not_after.timestamp()).unwrap_or(0);
        Ok(Self {
            cert_pem,
            key_pem,
            obtained: std::time::SystemTime::now(),
            not_after: std::time::UNIX_EPOCH + Duration::from_secs(secs),
        })
    }

    /// rustls's form of it (the key checked against the certificate).
    fn certified(&self) -> Result<rustls::sign::CertifiedKey, ForwardError> {
        let k =
            connect::certified_key_pem(&self.cert_pem, &self.key_pem).map_err(ForwardError::Tls)?;
        k.keys_match().map_err(ForwardError::KeyMismatch)?;
        Ok(k)
    }

    /// When to renew it: half-way from when it was obtained to its NotAfter.
    fn renew_in(&self) -> Duration {
        let life = self
            .not_after
            .duration_since(self.obtained)
            .unwrap_or_default();
        let due = self.obtained + life / 2;
        due.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
    }
}

fn pem_chain(ders: &[Vec<u8>]) -> Vec<u8> {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
        .collect::<String>()
        .into_bytes()
}

/// A new P-256 key (PKCS#8 PEM) and a CSR for `id` signed with it.
fn key_and_csr(id: &str) -> Result<(Vec<u8>, Vec<u8>), ForwardError> {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(ForwardError::KeyGen)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().map_err(
        |source| ForwardError::SanUri {
            id: id.to_string(),
            source,
        },
    )?)];
    let csr = params.serialize_request(&kp).map_err(ForwardError::Csr)?;
    Ok((kp.serialize_pem().into_bytes(), csr.der().to_vec()))
}

/// Writes `data` to `path` through a temporary file and a rename (a reader never sees half of it); `private`: 0600.
fn write_atomically(path: &Path, data: &[u8], private: bool) -> Result<(), ForwardError> {
    let tmp = path.with_extension("signet-tmp");
    if private {
        crate::datadir::write_private(&tmp, data)?;
    } else {
        std::fs::write(&tmp, data).map_err(|source| ForwardError::Write {
            path: tmp.clone(),
            source,
        })?;
    }
    std::fs::rename(&tmp, path).map_err(|source| ForwardError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// A connection to the appliance (or to each of its replicas), built from the plug-in's configuration.
///
/// The appliance is checked by its SPIFFE ID ([`connect::ApplianceVerifier`]); the plug-in presents its current
/// X509-SVID ([`SwappableIdentity`]), which a background task renews half-way through its life
/// (`Issuer.RenewX509SVID`, a new key made in this process) and reloads when the files it came from change. After a
/// swap the channels are rebuilt, so new calls open connections with the new credential while streams already open
/// carry on over theirs.
#[derive(Debug, Clone)]
pub struct Appliance {
    /// One lazily connecting channel per endpoint, in the order of `settings.endpoints`; rebuilt after a renewal.
    channels: Arc<StdRwLock<Arc<Vec<Channel>>>>,
    /// The endpoint calls go to now.
    current: Arc<AtomicUsize>,
    settings: Arc<PluginSettings>,
    identity: Arc<SwappableIdentity>,
    roots: LiveRoots,
    tls: Arc<rustls::ClientConfig>,
    /// How many times the credential was renewed or reloaded.
    swaps: Arc<AtomicUsize>,
    /// The key identifier KeyManager calls carry (`signet-key-identifier`), resolved at `Configure`.
    key_identifier: Option<tonic::metadata::AsciiMetadataValue>,
    /// Ends the renewal task when the last clone goes (a new Configure replaced this one).
    _renewal: Arc<AbortOnDrop>,
}

#[derive(Debug)]
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

impl Appliance {
    /// Gets the first credential (exchanging a join token when the configuration has one), then builds lazily
    /// connecting channels (tonic reconnects on its own after an appliance comes back) and starts the renewal.
    pub async fn connect(settings: PluginSettings) -> Result<Self, ForwardError> {
        let key_identifier = match settings.key_identifier.resolve()? {
            Some(k) => Some(k.parse::<tonic::metadata::AsciiMetadataValue>().map_err(
                |source| ForwardError::KeyIdentifier {
                    value: k.clone(),
                    source,
                },
            )?),
            None => None,
        };
        let roots = if settings.trust_bundle_pem.is_empty() {
            LiveRoots::default()
        } else {
            LiveRoots::new(
                connect::pem_blocks(&settings.trust_bundle_pem, "CERTIFICATE")
                    .map_err(ForwardError::TrustBundle)?,
            )
        };
        let verifier = Arc::new(connect::ApplianceVerifier::new(
            roots.clone(),
            ServerAuth::for_appliance(&settings.trust_domain, settings.server_name.as_deref()),
        ));
        let mut source = None;
        let held = match &settings.credential {
            FirstCredential::Pem { cert_pem, key_pem } => {
                Held::new(cert_pem.clone(), key_pem.clone())?
            }
            FirstCredential::WorkloadApi { socket } => {
                let src = tokio::time::timeout(
                    settings.request_timeout,
                    spiffe::X509Source::builder().endpoint(socket).build(),
                )
                .await
                .map_err(|_| ForwardError::WorkloadApiTimeout {
                    socket: socket.clone(),
                    timeout: settings.request_timeout,
                })?
                .map_err(|source| ForwardError::WorkloadApi {
                    socket: socket.clone(),
                    source,
                })?;
                let (held, r) = from_source(&src, &settings.trust_domain)?;
                roots.set(r);
                source = Some(src);
                held
            }
            FirstCredential::JoinToken {
                token,
                bootstrap_endpoint,
            } => {
                let held = exchange(
                    &settings,
                    verifier.clone(),
                    &roots,
                    token,
                    bootstrap_endpoint,
                )
                .await?;
                if let Some((c, k)) = &settings.credential_paths {
                    write_atomically(k, &held.key_pem, true)?;
                    write_atomically(c, &held.cert_pem, false)?;
                }
                held
            }
        };
        let identity = Arc::new(SwappableIdentity::new(Some(held.certified()?)));
        let tls = Arc::new(
            connect::client_config(verifier, Some(identity.clone())).map_err(ForwardError::Tls)?,
        );
        let channels = build_channels(&settings, &tls)?;
        let mut app = Self {
            channels: Arc::new(StdRwLock::new(Arc::new(channels))),
            current: Arc::new(AtomicUsize::new(0)),
            settings: Arc::new(settings),
            identity,
            roots,
            tls,
            swaps: Arc::new(AtomicUsize::new(0)),
            key_identifier,
            _renewal: Arc::new(AbortOnDrop(None)),
        };
        if let Some(src) = source {
            let worker = app.clone();
            app._renewal = Arc::new(AbortOnDrop(Some(tokio::spawn(follow_workload_api(
                worker, src,
            )))));
        } else if app.settings.renew {
            // The task holds a copy without the abort handle, so dropping the last Appliance ends it.
            let worker = app.clone();
            app._renewal = Arc::new(AbortOnDrop(Some(tokio::spawn(renewal(worker, held)))));
        }
        Ok(app)
    }

    /// The configuration in force.
    pub fn settings(&self) -> &PluginSettings {
        &self.settings
    }

    /// How many times the credential was renewed or reloaded so far.
    pub fn swaps(&self) -> usize {
        self.swaps.load(Ordering::Relaxed)
    }

    fn channel(&self, i: usize) -> Channel {
        let chs = self
            .channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        chs[i % chs.len()].clone()
    }

    fn count(&self) -> usize {
        self.settings.endpoints.len().max(1)
    }

    /// Puts `held` in force: the credential new connections present, and fresh channels for new calls.
    fn swap(&self, held: &Held, roots: Vec<Vec<u8>>) -> Result<(), ForwardError> {
        let key = held.certified()?;
        if !roots.is_empty() {
            self.roots.set(roots);
        }
        self.identity.set(key);
        let fresh = build_channels(&self.settings, &self.tls)?;
        *self.channels.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        self.swaps.fetch_add(1, Ordering::Relaxed);
        Ok(())
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
        let n = self.count();
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
        let n = self.count() as u32;
        if !(attempt + 1).is_multiple_of(n) {
            Duration::ZERO
        } else {
            backoff(attempt / n, self.settings.max_backoff)
        }
    }

    fn upstream(&self) -> UpstreamAuthorityClient<Channel> {
        UpstreamAuthorityClient::new(self.channel(self.current()))
    }

    fn keymanager(&self) -> KeyManagerClient<Channel> {
        KeyManagerClient::new(self.channel(self.current()))
    }

    /// A KeyManager request: `msg`, its timeout and this server's key identifier, if it has one.
    fn keymanager_request<T>(&self, msg: T, t: Duration) -> Request<T> {
        let mut r = with_timeout(msg, t);
        if let Some(k) = &self.key_identifier {
            r.metadata_mut()
                .insert(crate::api::keymanager::KEY_IDENTIFIER_HEADER, k.clone());
        }
        r
    }
}

fn build_channels(
    settings: &PluginSettings,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Vec<Channel>, ForwardError> {
    let mut channels = Vec::with_capacity(settings.endpoints.len());
    for url in &settings.endpoints {
        let timeout = settings.connect_timeout;
        channels.push(
            connect::lazy_channel(url, tls.clone(), |e| {
                e.connect_timeout(timeout)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(20))
                    .keep_alive_while_idle(true)
            })
            .map_err(|reason| ForwardError::Endpoint {
                url: url.clone(),
                reason,
            })?,
        );
    }
    if channels.is_empty() {
        return Err(ForwardError::NoEndpoint);
    }
    Ok(channels)
}

/// Exchanges the join token for the plug-in's first X509-SVID (a key made here) on the bootstrap port.
async fn exchange(
    settings: &PluginSettings,
    verifier: Arc<connect::ApplianceVerifier>,
    roots: &LiveRoots,
    token: &str,
    bootstrap: &str,
) -> Result<Held, ForwardError> {
    use signet_proto::signet::v1::bootstrap_client::BootstrapClient;
    let (key_pem, csr) = key_and_csr(&settings.client_id)?;
    let tls = Arc::new(connect::client_config(verifier, None).map_err(ForwardError::Tls)?);
    let timeout = settings.connect_timeout;
    let ch = connect::channel(bootstrap, tls, |e| e.connect_timeout(timeout))
        .await
        .map_err(|reason| ForwardError::Bootstrap {
            endpoint: bootstrap.to_string(),
            reason,
        })?;
    let r = BootstrapClient::new(ch)
        .exchange_join_token(with_timeout(
            pb::ExchangeJoinTokenRequest {
                token: token.to_string(),
                csr,
                ttl_seconds: i64::try_from(settings.svid_ttl.as_secs()).unwrap_or(i64::MAX),
            },
            settings.request_timeout,
        ))
        .await
        .map_err(ForwardError::JoinRefused)?
        .into_inner();
    let svid = r.svid.ok_or(ForwardError::NoSvidAnswered("join token"))?;
    if !r.x509_authorities.is_empty() {
        roots.set(r.x509_authorities);
    }
    tracing::info!(spiffe_id = %svid.spiffe_id, expires_at = svid.expires_at,
        "got the plug-in's first X509-SVID with the join token");
    Held::new(pem_chain(&svid.cert_chain), key_pem)
}

/// One renewal: a new key, `Issuer.RenewX509SVID` over the authenticated connection (each endpoint in turn).
async fn renew_once(app: &Appliance) -> Result<(Held, Vec<Vec<u8>>), ForwardError> {
    let (key_pem, csr) = key_and_csr(&app.settings.client_id)?;
    let req = pb::RenewX509svidRequest {
        csr,
        ttl_seconds: i64::try_from(app.settings.svid_ttl.as_secs()).unwrap_or(i64::MAX),
    };
    let mut errors = Vec::new();
    for k in 0..app.count() {
        let i = (app.current() + k) % app.count();
        let mut c = signet_proto::signet::v1::issuer_client::IssuerClient::new(app.channel(i));
        match c
            .renew_x509svid(with_timeout(req.clone(), app.settings.request_timeout))
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                let svid = r.svid.ok_or(ForwardError::NoSvidAnswered("renewal"))?;
                return Ok((
                    Held::new(pem_chain(&svid.cert_chain), key_pem)?,
                    r.x509_authorities,
                ));
            }
            Err(s) => errors.push((app.endpoint(i).to_string(), s)),
        }
    }
    Err(ForwardError::Renewal(errors))
}

/// The X509-SVID the Workload API gives now (its default one, which must be of `td`) and the roots of `td`.
fn from_source(src: &spiffe::X509Source, td: &str) -> Result<(Held, Vec<Vec<u8>>), ForwardError> {
    let svid = src.svid().map_err(ForwardError::NoSvid)?;
    let id = svid.spiffe_id().to_string();
    if connect::trust_domain_of(&id) != Some(td) {
        return Err(ForwardError::ForeignSvid {
            id,
            trust_domain: td.to_string(),
        });
    }
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let key_pem = pem::encode(&pem::Pem::new(
        "PRIVATE KEY",
        svid.private_key().as_bytes().to_vec(),
    ));
    let tdn = spiffe::TrustDomain::new(td).map_err(|source| ForwardError::TrustDomain {
        trust_domain: td.to_string(),
        source,
    })?;
    let roots: Vec<Vec<u8>> = src
        .bundle_set()
        .map_err(ForwardError::NoBundle)?
        .get(&tdn)
        .map(|b| {
            b.authorities()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect()
        })
        .unwrap_or_default();
    if roots.is_empty() {
        return Err(ForwardError::NoRoots(td.to_string()));
    }
    Ok((Held::new(pem_chain(&chain), key_pem.into_bytes())?, roots))
}

/// Follows the Workload API's rotations: each new X509-SVID (and bundle) is put in force as a renewal is.
async fn follow_workload_api(app: Appliance, src: spiffe::X509Source) {
    let mut updates = src.updated();
    loop {
        if let Err(e) = updates.changed().await {
            tracing::error!(error = %e, "the Workload API source stopped; the plug-in keeps its last credential");
            return;
        }
        match from_source(&src, &app.settings.trust_domain).and_then(|(h, r)| app.swap(&h, r)) {
            Ok(()) => tracing::info!(
                renewals = app.swaps(),
                "took the rotated X509-SVID from the Workload API"
            ),
            Err(e) => tracing::warn!(error = %e, "the Workload API's update is unusable"),
        }
    }
}

/// How often the credential files are looked at for a change made by someone else.
const FILE_POLL: Duration = Duration::from_secs(2);

/// Renews the plug-in's credential half-way through its life and reloads it when its files change, until the
/// plug-in stops or is configured again.
async fn renewal(app: Appliance, mut held: Held) {
    let mut failures = 0u32;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let due = retry_at.unwrap_or_else(|| tokio::time::Instant::now() + held.renew_in());
        let wake = if app.settings.credential_paths.is_some() {
            due.min(tokio::time::Instant::now() + FILE_POLL)
        } else {
            due
        };
        tokio::time::sleep_until(wake).await;
        if let Some((c, k)) = &app.settings.credential_paths
            && let (Ok(cert_pem), Ok(key_pem)) = (std::fs::read(c), std::fs::read(k))
            && (cert_pem != held.cert_pem || key_pem != held.key_pem)
        {
            // Someone else changed the files: take them if they are a whole, matching credential for this ID.
            let fresh = super::settings::check_credential(&cert_pem, &key_pem)
                .map_err(ForwardError::from)
                .and_then(|id| {
                    if id == app.settings.client_id {
                        Ok(())
                    } else {
                        Err(ForwardError::OtherId {
                            found: id,
                            expected: app.settings.client_id.clone(),
                        })
                    }
                })
                .and_then(|()| Held::new(cert_pem, key_pem));
            match fresh.and_then(|h| app.swap(&h, Vec::new()).map(|()| h)) {
                Ok(h) => {
                    tracing::info!(path = %c.display(), "reloaded the plug-in's credential: its files changed");
                    held = h;
                    retry_at = None;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "the credential files changed but are not usable (yet)")
                }
            }
        }
        if tokio::time::Instant::now() < due {
            continue;
        }
        match renew_once(&app).await {
            Ok((h, roots)) => {
                if let Err(e) = app.swap(&h, roots) {
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures, app.settings.max_backoff);
                    tracing::error!(error = %e, retry_in = ?wait, "the renewed credential is unusable");
                    retry_at = Some(tokio::time::Instant::now() + wait);
                    continue;
                }
                if let Some((c, k)) = &app.settings.credential_paths {
                    let written = write_atomically(k, &h.key_pem, true)
                        .and_then(|()| write_atomically(c, &h.cert_pem, false));
                    if let Err(e) = written {
                        tracing::warn!(error = %e, "cannot keep the renewed credential in its files; it is used from memory");
                    }
                }
                tracing::info!(spiffe_id = %app.settings.client_id, renewals = app.swaps(),
                    "renewed the plug-in's X509-SVID");
                held = h;
                failures = 0;
                retry_at = None;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = backoff(failures, app.settings.max_backoff);
                tracing::warn!(error = %e, retry_in = ?wait, "cannot renew the plug-in's X509-SVID");
                retry_at = Some(tokio::time::Instant::now() + wait);
            }
        }
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
                () = crate::shutdown::until_shutdown(&mut shutdown) => return,
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
                    () = crate::shutdown::until_shutdown(&mut shutdown) => return,
                }
                let made = tokio::select! {
                    r = reconnect(app.clone()) => r,
                    () = tx.closed() => return,
                    () = crate::shutdown::until_shutdown(&mut shutdown) => return,
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
            async move {
                let r = a.keymanager_request(req, t);
                a.keymanager().$method(r).await
            }
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
