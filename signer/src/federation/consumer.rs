//! The federation consumer: one poller per foreign trust domain fetches its bundle endpoint, validates the bundle
//! and stores it in [`FederatedBundles`].
//!
//! Schedule: after a good fetch the next one comes after the bundle's `spiffe_refresh_hint` (5 minutes when it has
//! none), never sooner than `federation.refresh_floor` and never later than a day. After a failed fetch the poller
//! retries after the floor, doubling on each further failure up to the last refresh hint. Requests are conditional
//! (`If-None-Match` with the last `ETag`), so an unchanged bundle costs a `304` and no parsing.
//!
//! A fetch fails, with a warning in the log, a count in `signet_federation_fetches_total{outcome=<reason>}` and the
//! last good bundle kept, when: the endpoint cannot be reached (`connect`), TLS fails (`tls`: certificate not trusted
//! for https_web, or for https_spiffe an X509-SVID with another SPIFFE ID or not chaining to the trust domain's
//! bundle), HTTP fails (`http`) or answers another status than 200/304 (`status`), the body exceeds
//! `federation.max_bundle_bytes` (`too_large`), it is not a valid SPIFFE bundle document (`garbage`), it holds an
//! authority of another trust domain or one of our own keys (`wrong_trust_domain`), or the whole exchange takes
//! longer than `federation.fetch_timeout` (`timeout`).
//!
//! A valid bundle whose `spiffe_sequence` is lower than the stored one is still taken (the endpoint is the
//! authority on its trust domain's bundle; a restored or rebuilt server may restart its sequence), with a warning.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::header;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, ServerName};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::rustls;

use super::verify::{SpiffeServerVerifier, provider};
use super::{EndpointProfile, FederatedTrustDomain, FederationSettings};
use super::{FederatedBundle, FederatedBundles, FetchFailure, StoredBundle};
use crate::bundle::{BundleSnapshot, TrustBundle};
use crate::spiffe::{BundleDocument, SpiffeId, TrustDomain};

/// The refresh interval used when a bundle has no `spiffe_refresh_hint`.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// The longest interval between two fetches, whatever the hint says.
pub const MAX_REFRESH: Duration = Duration::from_secs(86_400);

/// Why a bundle endpoint URL is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// Not a URL at all.
    #[error("endpoint {url:?} is not a URL: {source}")]
    NotUrl {
        /// The URL as written.
        url: String,
        /// The parser's error.
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    /// Another scheme than `https`.
    #[error("endpoint {url:?} must be an https:// URL")]
    NotHttps {
        /// The URL as written.
        url: String,
    },
    /// No host.
    #[error("endpoint {url:?} has no host")]
    NoHost {
        /// The URL as written.
        url: String,
    },
    /// A `user@` part.
    #[error("endpoint {url:?} must not carry user information")]
    UserInfo {
        /// The URL as written.
        url: String,
    },
}

/// Why a document cannot be the bundle of a foreign trust domain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForeignBundleError {
    /// An X.509 authority is not a certificate.
    #[error("X.509 authority #{index} does not parse: {source}")]
    Parse {
        /// Its position in the document.
        index: usize,
        /// The parser's error.
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    /// An X.509 authority carries a `spiffe://` URI that is not a SPIFFE ID.
    #[error("X.509 authority #{index} has an invalid SPIFFE ID: {source}")]
    BadSpiffeId {
        /// Its position in the document.
        index: usize,
        /// The rule broken.
        #[source]
        source: crate::spiffe::SpiffeIdError,
    },
    /// An X.509 authority names another trust domain.
    #[error(
        "X.509 authority #{index} belongs to trust domain {found}, not {expected}: this is another trust \
         domain's bundle"
    )]
    OtherTrustDomain {
        /// Its position in the document.
        index: usize,
        /// The trust domain it names.
        found: TrustDomain,
        /// The trust domain federated with.
        expected: TrustDomain,
    },
    /// An X.509 authority is one of our own roots.
    #[error(
        "X.509 authority #{index} is one of our own trust domain's roots: a foreign bundle must not hold them"
    )]
    OwnRoot {
        /// Its position in the document.
        index: usize,
    },
    /// A JWT authority is one of our own keys.
    #[error(
        "JWT authority {kid:?} is one of our own trust domain's keys: a foreign bundle must not hold them"
    )]
    OwnJwtKey {
        /// Its key ID.
        kid: String,
    },
}

/// Why a poller cannot be set up from its `[[federation.trust_domains]]` entry.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PollerError {
    /// `trust_domain` is not a trust domain name.
    #[error("trust_domain: {0}")]
    TrustDomain(#[source] crate::spiffe::SpiffeIdError),
    /// `endpoint` is not a usable URL.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// A setting the profile needs is missing.
    #[error("profile {profile} needs {setting}")]
    Missing {
        /// The profile.
        profile: &'static str,
        /// The setting.
        setting: &'static str,
    },
    /// `endpoint_spiffe_id` is not a SPIFFE ID.
    #[error("endpoint_spiffe_id: {0}")]
    EndpointId(#[source] crate::spiffe::SpiffeIdError),
    /// A file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The `ca` file cannot be read, is not PEM, or holds no certificate.
    #[error(transparent)]
    CaFile(#[from] crate::datadir::PemFileError),
    /// A certificate of the `ca` file is not a usable root.
    #[error("{}: {source}", path.display())]
    Root {
        /// The file.
        path: std::path::PathBuf,
        /// What rustls found.
        #[source]
        source: rustls::Error,
    },
    /// The bootstrap bundle is not a SPIFFE bundle document.
    #[error("bootstrap bundle {}: {source}", path.display())]
    Bootstrap {
        /// The file.
        path: std::path::PathBuf,
        /// The parser's error.
        #[source]
        source: crate::spiffe::BundleError,
    },
    /// The bootstrap bundle is not the foreign trust domain's.
    #[error("bootstrap bundle {}: {source}", path.display())]
    BootstrapForeign {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        #[source]
        source: ForeignBundleError,
    },
}

/// A poller that cannot start, with its trust domain.
#[derive(Debug, thiserror::Error)]
#[error("federation.trust_domains {trust_domain}: {source}")]
pub struct StartError {
    /// The entry's `trust_domain`.
    pub trust_domain: String,
    /// What is wrong.
    #[source]
    pub source: PollerError,
}

/// A bundle endpoint URL: `https://host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl {
    host: String,
    port: u16,
    authority: String,
    path: String,
}

impl EndpointUrl {
    /// Parses and checks `url`.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let uri: hyper::Uri = url.parse().map_err(|source| UrlError::NotUrl {
            url: url.to_string(),
            source,
        })?;
        if uri.scheme_str() != Some("https") {
            return Err(UrlError::NotHttps {
                url: url.to_string(),
            });
        }
        let authority = uri.authority().ok_or_else(|| UrlError::NoHost {
            url: url.to_string(),
        })?;
        if authority.as_str().contains('@') {
            return Err(UrlError::UserInfo {
                url: url.to_string(),
            });
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(UrlError::NoHost {
                url: url.to_string(),
            });
        }
        Ok(Self {
            host,
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_string(),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
        })
    }
}

/// The delay before the next fetch after a good one.
pub fn next_refresh(hint: Option<Duration>, floor: Duration) -> Duration {
    hint.unwrap_or(DEFAULT_REFRESH)
        .clamp(floor, MAX_REFRESH.max(floor))
}

/// The delay before the next attempt after `failures` (>= 1) failures in a row: the floor, doubling, at most `cap`
/// (and never less than the floor).
pub fn backoff(failures: u32, floor: Duration, cap: Duration) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    floor.saturating_mul(factor).min(cap.max(floor))
}

/// A failed fetch: the reason label and a message.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The metric's reason label.
    pub reason: &'static str,
    /// What went wrong.
    pub message: String,
}

impl Failure {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    let mut depth = 0;
    while let Some(c) = cur
        && depth < 8
    {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
        depth += 1;
    }
    s
}

/// Checks that `doc` can be the bundle of `td`: every X.509 authority that names a SPIFFE trust domain names `td`,
/// and no key is one of our own trust domain's (trust domains are never merged, and keys are never shared).
pub fn validate_foreign(
    doc: &BundleDocument,
    td: &TrustDomain,
    own: &BundleSnapshot,
) -> Result<(), ForeignBundleError> {
    for (i, a) in doc.x509_authorities.iter().enumerate() {
        let (_, cert) = x509_parser::parse_x509_certificate(a.cert_der())
            .map_err(|source| ForeignBundleError::Parse { index: i, source })?;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::URI(u) = n
                    && u.starts_with("spiffe://")
                {
                    let id = SpiffeId::parse(u)
                        .map_err(|source| ForeignBundleError::BadSpiffeId { index: i, source })?;
                    if id.trust_domain() != *td {
                        return Err(ForeignBundleError::OtherTrustDomain {
                            index: i,
                            found: id.trust_domain(),
                            expected: td.clone(),
                        });
                    }
                }
            }
        }
        let spki = cert.public_key().raw;
        let ours = own.x509_roots.iter().any(|r| {
            x509_parser::parse_x509_certificate(r).is_ok_and(|(_, c)| c.public_key().raw == spki)
        });
        if ours {
            return Err(ForeignBundleError::OwnRoot { index: i });
        }
    }
    for a in &doc.jwt_authorities {
        if own.jwt_keys.iter().any(|k| k.spki == a.spki_der()) {
            return Err(ForeignBundleError::OwnJwtKey {
                kid: a.kid().to_string(),
            });
        }
    }
    Ok(())
}

/// What a good fetch brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// A new bundle with this sequence and refresh hint.
    Updated {
        /// `spiffe_sequence`.
        sequence: u64,
        /// `spiffe_refresh_hint`.
        hint: Option<Duration>,
    },
    /// `304 Not Modified`: the stored bundle is current.
    NotModified,
}

/// The poller of one foreign trust domain.
#[derive(Debug)]
pub struct Poller {
    td: TrustDomain,
    url: EndpointUrl,
    endpoint: String,
    profile: EndpointProfile,
    web_roots: Option<Arc<RootCertStore>>,
    endpoint_id: Option<SpiffeId>,
    store: FederatedBundles,
    own: TrustBundle,
    max_bytes: usize,
    timeout: Duration,
    floor: Duration,
}

impl Poller {
    /// A poller for `cfg`; registers the trust domain in `store` (with its bootstrap bundle, for https_spiffe).
    pub fn new(
        cfg: &FederatedTrustDomain,
        settings: &FederationSettings,
        store: FederatedBundles,
        own: TrustBundle,
    ) -> Result<Self, PollerError> {
        let td = TrustDomain::parse(&cfg.trust_domain).map_err(PollerError::TrustDomain)?;
        let url = EndpointUrl::parse(&cfg.endpoint)?;
        let mut web_roots = None;
        let mut endpoint_id = None;
        let mut bundle = None;
        match cfg.profile {
            EndpointProfile::HttpsWeb => {
                let path = cfg.ca.as_ref().ok_or(PollerError::Missing {
                    profile: "https_web",
                    setting: "`ca`",
                })?;
                let mut roots = RootCertStore::empty();
                for der in crate::datadir::read_pem_certs(path)? {
                    roots
                        .add(CertificateDer::from(der))
                        .map_err(|source| PollerError::Root {
                            path: path.clone(),
                            source,
                        })?;
                }
                web_roots = Some(Arc::new(roots));
            }
            EndpointProfile::HttpsSpiffe => {
                let id = cfg
                    .endpoint_spiffe_id
                    .as_deref()
                    .ok_or(PollerError::Missing {
                        profile: "https_spiffe",
                        setting: "endpoint_spiffe_id",
                    })?;
                endpoint_id = Some(SpiffeId::parse(id).map_err(PollerError::EndpointId)?);
                let path = cfg.bootstrap_bundle.as_ref().ok_or(PollerError::Missing {
                    profile: "https_spiffe",
                    setting: "bootstrap_bundle",
                })?;
                let text = std::fs::read(path).map_err(|source| PollerError::Read {
                    path: path.clone(),
                    source,
                })?;
                let document =
                    BundleDocument::parse(&text).map_err(|source| PollerError::Bootstrap {
                        path: path.clone(),
                        source,
                    })?;
                validate_foreign(&document, &td, &own.current()).map_err(|source| {
                    PollerError::BootstrapForeign {
                        path: path.clone(),
                        source,
                    }
                })?;
                bundle = Some(StoredBundle {
                    document,
                    source: "bootstrap",
                    stored_at: OffsetDateTime::now_utc().unix_timestamp(),
                    etag: None,
                });
            }
        }
        store.insert(FederatedBundle {
            trust_domain: td.clone(),
            endpoint: cfg.endpoint.clone(),
            bundle,
            last_failure: None,
            fetches: 0,
            unchanged: 0,
            failures: 0,
        });
        Ok(Self {
            td,
            url,
            endpoint: cfg.endpoint.clone(),
            profile: cfg.profile,
            web_roots,
            endpoint_id,
            store,
            own,
            max_bytes: settings.max_bundle_bytes,
            timeout: settings.fetch_timeout.0,
            floor: settings.refresh_floor.0,
        })
    }

    fn client_config(&self) -> Result<rustls::ClientConfig, Failure> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| Failure::new("tls", e.to_string()))?;
        let mut cfg = match (&self.web_roots, &self.endpoint_id) {
            (Some(roots), _) => builder
                .with_root_certificates(roots.clone())
                .with_no_client_auth(),
            (None, Some(id)) => {
                let roots: Vec<Vec<u8>> = self
                    .store
                    .get(&self.td)
                    .and_then(|e| e.bundle)
                    .map(|b| {
                        b.document
                            .x509_authorities
                            .iter()
                            .map(|a| a.cert_der().to_vec())
                            .collect()
                    })
                    .unwrap_or_default();
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                        &roots,
                        id.clone(),
                        &provider(),
                    )))
                    .with_no_client_auth()
            }
            (None, None) => return Err(Failure::new("tls", "no way to authenticate the endpoint")),
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }

    /// One fetch (without the time limit): conditional GET, validation, storage.
    pub async fn fetch(&self) -> Result<Fetched, Failure> {
        let cfg = self.client_config()?;
        let tcp = tokio::net::TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|e| {
                Failure::new(
                    "connect",
                    format!("cannot connect to {}: {e}", self.url.authority),
                )
            })?;
        let name = ServerName::try_from(self.url.host.clone()).map_err(|e| {
            Failure::new(
                "tls",
                format!("{:?} is not a server name: {e}", self.url.host),
            )
        })?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                Failure::new(
                    "tls",
                    format!(
                        "TLS with {} failed: {}",
                        self.url.authority,
                        error_chain(&e)
                    ),
                )
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| Failure::new("http", error_chain(&e)))?;
        let conn = tokio::spawn(conn);
        let result = self.exchange(&mut sender).await;
        conn.abort();
        result
    }

    async fn exchange(
        &self,
        sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    ) -> Result<Fetched, Failure> {
        let stored = self.store.get(&self.td).and_then(|e| e.bundle);
        let etag = stored
            .as_ref()
            .filter(|b| b.source == "endpoint")
            .and_then(|b| b.etag.clone());
        let mut req = Request::get(self.url.path.as_str())
            .header(header::HOST, self.url.authority.as_str())
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("signet/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(t) = &etag {
            req = req.header(header::IF_NONE_MATCH, t.as_str());
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| Failure::new("http", e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Failure::new("http", error_chain(&e)))?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_MODIFIED if etag.is_some() => return Ok(Fetched::NotModified),
            s => {
                return Err(Failure::new(
                    "status",
                    format!("the endpoint answered HTTP {s}"),
                ));
            }
        }
        let new_etag = resp
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let declared = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let limit = self.max_bytes;
        let too_large = || {
            Failure::new(
                "too_large",
                format!("the bundle is larger than federation.max_bundle_bytes = {limit}"),
            )
        };
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let body = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<LengthLimitError>().is_some() {
                    too_large()
                } else {
                    Failure::new("http", format!("reading the body: {e}"))
                }
            })?
            .to_bytes();
        let text = std::str::from_utf8(&body)
            .map_err(|_| Failure::new("garbage", "the body is not UTF-8 text"))?;
        let document = BundleDocument::parse(text.as_bytes())
            .map_err(|e| Failure::new("garbage", format!("not a SPIFFE bundle document: {e}")))?;
        validate_foreign(&document, &self.td, &self.own.current())
            .map_err(|e| Failure::new("wrong_trust_domain", e.to_string()))?;
        let sequence = document.sequence;
        let hint = document.refresh_hint_secs.map(Duration::from_secs);
        let previous = stored.as_ref().map(|b| b.document.sequence);
        self.store.update(&self.td, |e| {
            e.bundle = Some(StoredBundle {
                document,
                source: "endpoint",
                stored_at: OffsetDateTime::now_utc().unix_timestamp(),
                etag: new_etag,
            });
        });
        if previous.is_some_and(|p| sequence < p) {
            tracing::warn!(trust_domain = %self.td, sequence, previous, "the federated bundle's sequence went back");
        }
        Ok(Fetched::Updated { sequence, hint })
    }

    /// Runs the polling schedule until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut failures: u32 = 0;
        let mut hint: Option<Duration> = None;
        let td = self.td.to_string();
        loop {
            let result = tokio::select! {
                r = tokio::time::timeout(self.timeout, self.fetch()) => r.unwrap_or_else(|_| Err(Failure::new(
                    "timeout",
                    format!("no complete answer within federation.fetch_timeout = {:?}", self.timeout),
                ))),
                () = crate::shutdown::until_shutdown(&mut shutdown) => return,
            };
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let delay = match result {
                Ok(fetched) => {
                    failures = 0;
                    let outcome = match &fetched {
                        Fetched::Updated { sequence, hint: h } => {
                            let sequence = *sequence;
                            hint = *h;
                            metrics::gauge!("signet_federation_bundle_sequence", "trust_domain" => td.clone())
                                .set(sequence as f64);
                            tracing::info!(trust_domain = %td, endpoint = %self.endpoint, sequence, "federated bundle updated");
                            "ok"
                        }
                        Fetched::NotModified => "not_modified",
                    };
                    metrics::counter!("signet_federation_fetches_total", "trust_domain" => td.clone(), "outcome" => outcome)
                        .increment(1);
                    self.store.update(&self.td, |e| {
                        e.fetches += 1;
                        if fetched == Fetched::NotModified {
                            e.unchanged += 1;
                        }
                        e.last_failure = None;
                    });
                    next_refresh(hint, self.floor)
                }
                Err(f) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(
                        trust_domain = %td,
                        endpoint = %self.endpoint,
                        profile = self.profile.name(),
                        reason = f.reason,
                        error = %f.message,
                        "federated bundle fetch failed; the last good bundle is kept"
                    );
                    metrics::counter!("signet_federation_fetches_total", "trust_domain" => td.clone(), "outcome" => f.reason)
                        .increment(1);
                    self.store.update(&self.td, |e| {
                        e.failures += 1;
                        e.last_failure = Some(FetchFailure {
                            reason: f.reason,
                            message: f.message,
                            at: now,
                        });
                    });
                    backoff(failures, self.floor, next_refresh(hint, self.floor))
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = crate::shutdown::until_shutdown(&mut shutdown) => return,
            }
        }
    }
}

/// Starts a poller for every `[[federation.trust_domains]]` entry.
pub fn start(
    settings: &FederationSettings,
    store: &FederatedBundles,
    own: &TrustBundle,
    shutdown: &watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<()>>, StartError> {
    let pollers = settings
        .trust_domains
        .iter()
        .map(|t| {
            Poller::new(t, settings, store.clone(), own.clone()).map_err(|source| StartError {
                trust_domain: t.trust_domain.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(pollers
        .into_iter()
        .map(|p| tokio::spawn(p.run(shutdown.clone())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = EndpointUrl::parse("https://127.0.0.1:8444").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8444, "/")
        );
        let u = EndpointUrl::parse("https://[::1]/bundle?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 443, "/bundle?x=1")
        );
        assert!(matches!(
            EndpointUrl::parse("http://example.org"),
            Err(UrlError::NotHttps { .. })
        ));
        assert!(matches!(
            EndpointUrl::parse("https://user@example.org"),
            Err(UrlError::UserInfo { .. })
        ));
        assert!(matches!(
            EndpointUrl::parse("not a url"),
            Err(UrlError::NotUrl { .. }) | Err(UrlError::NotHttps { .. })
        ));
    }

    #[test]
    fn schedule_respects_hint_floor_and_backoff() {
        let s = Duration::from_secs;
        assert_eq!(next_refresh(Some(s(60)), s(30)), s(60));
        assert_eq!(next_refresh(Some(s(1)), s(30)), s(30));
        assert_eq!(next_refresh(None, s(30)), DEFAULT_REFRESH);
        assert_eq!(next_refresh(Some(s(10_000_000)), s(30)), MAX_REFRESH);
        assert_eq!(backoff(1, s(30), s(300)), s(30));
        assert_eq!(backoff(2, s(30), s(300)), s(60));
        assert_eq!(backoff(4, s(30), s(300)), s(240));
        assert_eq!(backoff(5, s(30), s(300)), s(300));
        assert_eq!(backoff(u32::MAX, s(30), s(300)), s(300));
        assert_eq!(backoff(3, s(30), s(1)), s(30));
    }
}
