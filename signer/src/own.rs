//! signet's own credentials, renewed while it runs: the server's X509-SVID (`spiffe://<td>/signet/server`, presented
//! by the gRPC listener and by the `https_spiffe` bundle endpoint) and the admin client's
//! (`spiffe://<td>/signet/admin`, the files the CLI reads).
//!
//! Both are issued at start ([`crate::serve`]); from then on [`OwnCredentials::run`] keeps them fresh:
//!
//! - **When.** A credential is re-issued once half its life has passed (the same rule as at start: re-issued when
//!   no more than half of it is left), and at once when the active root, or the chain it is presented with (a
//!   cross-certificate while a rotation is under way), is no longer the one that issued it: right after every
//!   `activate`, whether taken here or by another replica (learned through [`Authorities::subscribe_active`], as
//!   the issuers are). Every replica renews its own credentials.
//! - **How.** A new P-256 key, an X509-SVID from the active root, the files in the data directory replaced
//!   atomically (written aside, then renamed; keys 0600). The server credential is swapped into the TLS listeners
//!   through [`LiveCert`], a rustls certificate resolver: connections already open keep their session, new
//!   handshakes get the new certificate, nothing is dropped.
//! - **Trust.** Each credential in use is held on its issuing root ([`Authorities::hold_descendant`], replacing the
//!   hold of the credential it replaces), and the roots of the credentials in use are reported in this replica's
//!   heartbeat ([`crate::replica::Replication::set_serving_roots`]), so `retire` is refused while any live replica
//!   still serves a credential of the root being retired.
//! - **Failures.** A failed renewal (token unavailable, disk full) is logged and retried with backoff (1 s doubling
//!   up to 5 min; a change of the active root retries at once); the credential in use stays in use meanwhile.
//! - **Metrics.** `signet_own_credential_not_after_seconds{credential="server|admin|bundle_endpoint"}` and
//!   `signet_own_credential_issued_at_seconds{credential}` (Unix seconds) and
//!   `signet_own_credential_renewals_total{credential, outcome="renewed|failed"}`.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_rustls::rustls;

use crate::ca::{ActiveSet, Authorities};
use crate::datadir::{DataPaths, pem_certs, rename_over, write_aside};
use crate::replica::Replication;
use crate::spiffe::SpiffeId;
use crate::x509::root_id;
use crate::x509::{Authority, LeafRequest};

/// The first retry after a failed renewal; doubled per failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between retries of a failed renewal.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The least time between two renewals of one credential (a root about to expire cuts a credential's life short).
const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// Why one of signet's own credentials cannot be used, adopted or renewed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OwnError {
    /// rustls cannot load the private key.
    #[error("the server key is unusable: {0}")]
    Key(#[source] rustls::Error),
    /// The certificate's public key is not the key's.
    #[error("the server certificate does not match its key: {0}")]
    KeyMismatch(#[source] rustls::Error),
    /// A credential without a certificate.
    #[error("{what}: an empty chain")]
    EmptyChain {
        /// Which credential.
        what: &'static str,
    },
    /// The leaf certificate does not parse.
    #[error("{what}: the certificate does not parse: {source}")]
    Parse {
        /// Which credential.
        what: &'static str,
        /// The parser's error.
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    /// The blocking task of a renewal did not finish (panicked or was cancelled).
    #[error("the renewal task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// No new key could be generated.
    #[error("cannot generate a key: {0}")]
    KeyGen(#[source] rcgen::Error),
    /// The active root refused to issue the credential.
    #[error("cannot issue the SVID for {id}: {source}")]
    Issue {
        /// The credential's SPIFFE ID.
        id: SpiffeId,
        /// The issuance error.
        #[source]
        source: crate::x509::IssueError,
    },
    /// The credential's files cannot be written.
    #[error(transparent)]
    File(#[from] crate::datadir::FileError),
}

/// The server certificate the TLS listeners present, swapped in place: every new handshake reads the current one.
pub struct LiveCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for LiveCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveCert").finish_non_exhaustive()
    }
}

fn certified(chain: &[Vec<u8>], key_pkcs8: &[u8]) -> Result<CertifiedKey, OwnError> {
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(key_pkcs8.to_vec().into()))
        .map_err(OwnError::Key)?;
    let ck = CertifiedKey::new(
        chain.iter().cloned().map(CertificateDer::from).collect(),
        key,
    );
    ck.keys_match().map_err(OwnError::KeyMismatch)?;
    Ok(ck)
}

impl LiveCert {
    /// Presents `chain` (leaf first, DER) with its PKCS#8 key.
    pub fn new(chain: &[Vec<u8>], key_pkcs8: &[u8]) -> Result<Self, OwnError> {
        Ok(Self {
            current: RwLock::new(Arc::new(certified(chain, key_pkcs8)?)),
        })
    }

    /// Presents `chain` with its key from the next handshake on; open connections are not touched.
    pub fn set(&self, chain: &[Vec<u8>], key_pkcs8: &[u8]) -> Result<(), OwnError> {
        let ck = Arc::new(certified(chain, key_pkcs8)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = ck;
        Ok(())
    }

    /// What new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for LiveCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// One of signet's own credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Own {
    /// The server's X509-SVID.
    Server,
    /// The admin client's X509-SVID.
    Admin,
}

impl Own {
    /// The `credential` label of the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Own::Server => "server",
            Own::Admin => "admin",
        }
    }

    /// How holds and messages name it.
    pub fn what(self) -> &'static str {
        match self {
            Own::Server => "signet's server certificate",
            Own::Admin => "signet's admin certificate",
        }
    }

    fn index(self) -> usize {
        match self {
            Own::Server => 0,
            Own::Admin => 1,
        }
    }
}

/// A credential in use.
#[derive(Debug, Clone)]
struct Held {
    /// When it was issued (NotBefore without the backdating).
    issued_at: OffsetDateTime,
    not_after: OffsetDateTime,
    /// The root that signed it, and the chain above the leaf it is presented with.
    root: Vec<u8>,
    chain: Vec<Vec<u8>>,
}

impl Held {
    /// Half its life.
    fn renew_at(&self) -> OffsetDateTime {
        self.issued_at + (self.not_after - self.issued_at) / 2
    }

    /// Whether `set` no longer issues it as it is (another root, or another chain).
    fn stale(&self, set: &ActiveSet) -> bool {
        self.root != set.x509.cert_der() || self.chain != set.x509.chain()
    }
}

/// A renewal to retry.
#[derive(Debug, Clone, Copy)]
struct Retry {
    at: OffsetDateTime,
    backoff: Duration,
}

/// What to issue signet's own credentials for, where they go, and what they are now.
#[derive(Debug)]
pub struct OwnCredentials {
    server_id: SpiffeId,
    admin_id: SpiffeId,
    dns: Vec<String>,
    ttl: Duration,
    paths: DataPaths,
    server: Arc<LiveCert>,
    bundle_endpoint: bool,
    authorities: Arc<Authorities>,
    replication: Arc<Replication>,
    held: Mutex<[Option<Held>; 2]>,
}

/// Parameters of [`OwnCredentials::new`].
#[derive(Debug)]
pub struct OwnSettings {
    /// The server's SPIFFE ID.
    pub server_id: SpiffeId,
    /// The admin's SPIFFE ID.
    pub admin_id: SpiffeId,
    /// DNS SANs of the server certificate.
    pub dns: Vec<String>,
    /// Lifetime of a new credential (`server.service_svid_ttl`).
    pub ttl: Duration,
    /// The data directory's files.
    pub paths: DataPaths,
    /// Whether the `https_spiffe` bundle endpoint presents the server credential too.
    pub bundle_endpoint: bool,
}

fn spki_of(der: &[u8]) -> Option<Vec<u8>> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.public_key().raw.to_vec())
}

/// (issued at, NotAfter, serial in hex) of the leaf of `which`.
fn leaf_facts(
    which: Own,
    der: &[u8],
) -> Result<(OffsetDateTime, OffsetDateTime, String), OwnError> {
    let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|source| OwnError::Parse {
        what: which.what(),
        source,
    })?;
    let nb = c.validity().not_before.to_datetime();
    let na = c.validity().not_after.to_datetime();
    let backdate = time::Duration::try_from(crate::x509::issue::BACKDATE).unwrap_or_default();
    Ok(((nb + backdate).min(na), na, hex::encode(c.raw_serial())))
}

impl OwnCredentials {
    /// Signet's own credentials, `server` being what the TLS listeners present.
    pub fn new(
        settings: OwnSettings,
        server: Arc<LiveCert>,
        authorities: Arc<Authorities>,
        replication: Arc<Replication>,
    ) -> Self {
        Self {
            server_id: settings.server_id,
            admin_id: settings.admin_id,
            dns: settings.dns,
            ttl: settings.ttl,
            paths: settings.paths,
            server,
            bundle_endpoint: settings.bundle_endpoint,
            authorities,
            replication,
            held: Mutex::new([None, None]),
        }
    }

    /// Records `which` as issued at start: `chain` (leaf first) signed by `root`.
    pub fn adopt(&self, which: Own, chain: &[Vec<u8>], root: &[u8]) -> Result<(), OwnError> {
        let leaf = chain
            .first()
            .ok_or(OwnError::EmptyChain { what: which.what() })?;
        let (issued_at, not_after, _) = leaf_facts(which, leaf)?;
        self.record(
            which,
            Held {
                issued_at,
                not_after,
                root: root.to_vec(),
                chain: chain[1..].to_vec(),
            },
        );
        Ok(())
    }

    /// Makes `held` the credential in use for `which`: the hold on its root, the metric, the heartbeat's roots.
    fn record(&self, which: Own, held: Held) {
        if let Some(spki) = spki_of(&held.root) {
            self.authorities
                .hold_descendant(&spki, held.not_after, which.what());
        }
        let not_after = held.not_after.unix_timestamp() as f64;
        let issued_at = held.issued_at.unix_timestamp() as f64;
        let mut names = vec![which.name()];
        if which == Own::Server && self.bundle_endpoint {
            names.push("bundle_endpoint");
        }
        for name in names {
            metrics::gauge!("signet_own_credential_not_after_seconds", "credential" => name)
                .set(not_after);
            metrics::gauge!("signet_own_credential_issued_at_seconds", "credential" => name)
                .set(issued_at);
        }
        // Exported from the start (0), so that the first renewal or failure shows as an increase.
        for outcome in ["renewed", "failed"] {
            metrics::counter!("signet_own_credential_renewals_total", "credential" => which.name(), "outcome" => outcome)
                .increment(0);
        }
        let roots = {
            let mut h = self.held.lock().unwrap_or_else(|p| p.into_inner());
            h[which.index()] = Some(held);
            let mut roots: Vec<String> = h.iter().flatten().map(|h| root_id(&h.root)).collect();
            roots.sort();
            roots.dedup();
            roots
        };
        self.replication.set_serving_roots(roots);
    }

    fn held(&self, which: Own) -> Option<Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())[which.index()].clone()
    }

    /// Issues `which` anew from the active root, replaces its files and (for the server) what the listeners
    /// present.
    pub async fn renew(&self, which: Own) -> Result<(), OwnError> {
        let set = self.authorities.active();
        let authority = set.x509.clone();
        let (id, dns, cert_path, key_path) = match which {
            Own::Server => (
                self.server_id.clone(),
                self.dns.clone(),
                self.paths.server_cert.clone(),
                self.paths.server_key.clone(),
            ),
            Own::Admin => (
                self.admin_id.clone(),
                Vec::new(),
                self.paths.admin_cert.clone(),
                self.paths.admin_key.clone(),
            ),
        };
        let ttl = self.ttl;
        let now = OffsetDateTime::now_utc();
        let (chain, key) = tokio::task::spawn_blocking(move || {
            issue(&authority, &id, &dns, ttl, now, &cert_path, &key_path)
        })
        .await
        .map_err(OwnError::Task)??;
        if which == Own::Server {
            self.server.set(&chain, &key)?;
        }
        let leaf = chain
            .first()
            .ok_or(OwnError::EmptyChain { what: which.what() })?;
        let (_, not_after, serial) = leaf_facts(which, leaf)?;
        let root = set.x509.cert_der().to_vec();
        tracing::info!(
            credential = which.name(),
            serial,
            %not_after,
            root = root_id(&root),
            "own credential renewed"
        );
        self.record(
            which,
            Held {
                issued_at: now,
                not_after,
                root,
                chain: chain[1..].to_vec(),
            },
        );
        Ok(())
    }

    /// Renews the credentials when due (see the module docs) until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut active = self.authorities.subscribe_active();
        active.borrow_and_update();
        let mut retry: [Option<Retry>; 2] = [None, None];
        loop {
            let set = self.authorities.active();
            let mut wake: Option<OffsetDateTime> = None;
            for which in [Own::Server, Own::Admin] {
                let now = OffsetDateTime::now_utc();
                let held = self.held(which);
                let r = retry[which.index()];
                let due = match (&r, &held) {
                    (Some(r), _) => now >= r.at,
                    (None, None) => true,
                    (None, Some(h)) => h.stale(&set) || now >= h.renew_at(),
                };
                if due {
                    match self.renew(which).await {
                        Ok(()) => {
                            retry[which.index()] = None;
                            metrics::counter!("signet_own_credential_renewals_total", "credential" => which.name(), "outcome" => "renewed").increment(1);
                        }
                        Err(e) => {
                            let backoff =
                                r.map_or(MIN_BACKOFF, |r| (r.backoff * 2).min(MAX_BACKOFF));
                            let at = OffsetDateTime::now_utc() + backoff;
                            retry[which.index()] = Some(Retry { at, backoff });
                            metrics::counter!("signet_own_credential_renewals_total", "credential" => which.name(), "outcome" => "failed").increment(1);
                            tracing::warn!(
                                credential = which.name(),
                                error = %e,
                                retry_in = ?backoff,
                                "cannot renew signet's own credential; the current one stays in use"
                            );
                        }
                    }
                }
                let next = match (retry[which.index()], self.held(which)) {
                    (Some(r), _) => Some(r.at),
                    (None, Some(h)) => Some(h.renew_at()),
                    (None, None) => None,
                };
                wake = match (wake, next) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            let wait = wake
                .map(|w| {
                    Duration::try_from(w - OffsetDateTime::now_utc()).unwrap_or(Duration::ZERO)
                })
                .unwrap_or(MAX_BACKOFF)
                .max(MIN_INTERVAL);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                r = active.changed() => {
                    if r.is_err() {
                        return;
                    }
                    active.borrow_and_update();
                    // A new root or chain: renew at once, whatever failed before.
                    retry = [None, None];
                }
                () = crate::shutdown::until_shutdown(&mut shutdown) => return,
            }
        }
    }
}

/// Issues an X509-SVID for `id` from `authority` with a new key and replaces the files; returns the chain (leaf
/// first) and the PKCS#8 key.
fn issue(
    authority: &Authority,
    id: &SpiffeId,
    dns: &[String],
    ttl: Duration,
    now: OffsetDateTime,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<Vec<u8>>, Vec<u8>), OwnError> {
    let kp =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(OwnError::KeyGen)?;
    let failed = |source| OwnError::Issue {
        id: id.clone(),
        source,
    };
    let mut req = LeafRequest::from_spki(
        id.clone(),
        &rcgen::PublicKeyData::subject_public_key_info(&kp),
        ttl,
    )
    .map_err(failed)?;
    req.dns_names = dns.to_vec();
    let issued = authority.issue_x509_svid(&req, now).map_err(failed)?;
    let mut chain = vec![issued.der];
    chain.extend(authority.chain());
    // Both files are written aside before either is replaced, so a failure leaves the pair in use untouched.
    let key_aside = write_aside(key_path, kp.serialize_pem().as_bytes(), true)?;
    let cert_aside = match write_aside(cert_path, pem_certs(&chain).as_bytes(), false) {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&key_aside);
            return Err(e.into());
        }
    };
    rename_over(&key_aside, key_path)?;
    rename_over(&cert_aside, cert_path)?;
    Ok((chain, kp.serialize_der()))
}
