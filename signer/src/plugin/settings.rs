//! The plug-in's configuration: the `plugin_data` block of SPIRE's `server.conf`, which SPIRE hands over as HCL
//! text in `Configure` and `Validate`.
//!
//! ```hcl
//! plugin_data {
//!   endpoint          = "signet.example.org:8443"      # the appliance (host:port)
//!   # or, with replicas sharing one datastore, all of them (tried in order; a replica that cannot be reached
//!   # hands its calls and streams to the next):
//!   # endpoints       = ["signet-a.example.org:8443", "signet-b.example.org:8443"]
//!   trust_bundle_path = "/etc/spire/signet-bundle.pem" # roots that verify the appliance (PEM)
//!   client_cert_path  = "/etc/spire/signet-client.pem" # this SPIRE server's X509-SVID chain (PEM, leaf first)
//!   client_key_path   = "/etc/spire/signet-client.key" # its key (PKCS#8 PEM)
//!   # or, for the first start, a join token (`signet join-token create`) instead of a credential made by hand:
//!   # spiffe_id          = "spiffe://example.org/spire/server"
//!   # join_token         = "..."                       # used once; the credential is then kept (and renewed) in
//!   # bootstrap_endpoint = "signet.example.org:8444"   # client_cert_path/client_key_path when they are given
//!   # or the credential (and the roots) from a SPIFFE Workload API, rotations followed:
//!   # workload_api_socket = "unix:///run/spire/agent.sock"
//!   # server_name     = "signet.example.org"           # check this DNS name instead of the appliance's SPIFFE ID
//!   svid_ttl          = "0s"                           # lifetime asked at renewal (0: the policy's default)
//!   connect_timeout   = "10s"
//!   request_timeout   = "30s"                          # per RPC, retries included
//!   max_backoff       = "30s"                          # longest wait between reconnections of a stream
//!   # KeyManager only: this SPIRE server instance's key identifier, so that servers sharing one SPIFFE ID (an HA
//!   # pair) keep their keys apart, as SPIRE's aws_kms / gcp_kms / azure_key_vault key managers do. One of:
//!   # key_identifier_file  = "/var/lib/spire/signet-key-id"  # made with a random UUID on the first start
//!   # key_identifier_value = "spire-a"                       # 1-128 of A-Z a-z 0-9 - _ .
//! }
//! ```
//!
//! Without a key identifier the keys are namespaced by the SPIFFE ID alone (as before identifiers existed), so a
//! running deployment keeps its keys. `key_identifier_file` is read at `Configure`; when it does not exist it is
//! created (mode 0600) with a new random UUID, which is then kept; a file that exists must hold a UUID. Losing
//! the file means a new identifier, so new keys (SPIRE makes them), and the old namespace is swept once unused.
//!
//! The appliance is checked by its SPIFFE ID, `spiffe://<trust domain>/signet/server`, against the trust bundle,
//! whatever address `endpoint` names (so `127.0.0.1:8443` works); `server_name` switches to a DNS-name check.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigDuration;

/// `plugin_data`, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    endpoint: Option<String>,
    endpoints: Option<Vec<String>>,
    server_name: Option<String>,
    trust_bundle_path: Option<PathBuf>,
    client_cert_path: Option<PathBuf>,
    client_key_path: Option<PathBuf>,
    workload_api_socket: Option<String>,
    spiffe_id: Option<String>,
    join_token: Option<String>,
    bootstrap_endpoint: Option<String>,
    svid_ttl: Option<ConfigDuration>,
    connect_timeout: Option<ConfigDuration>,
    request_timeout: Option<ConfigDuration>,
    max_backoff: Option<ConfigDuration>,
    key_identifier_value: Option<String>,
    key_identifier_file: Option<PathBuf>,
}

/// Why `plugin_data`, or a file it names, is refused. Every message names the field.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// `plugin_data` is not HCL of the known fields.
    #[error("plugin_data: {0}")]
    Hcl(#[source] hcl::Error),
    /// A required field is missing.
    #[error("plugin_data needs {field}: {what}")]
    Missing {
        /// The field.
        field: &'static str,
        /// What it holds.
        what: &'static str,
    },
    /// A field holds a value its rule refuses (the message names the field, the value and the rule).
    #[error("{reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The value and what is wrong with it.
        reason: String,
    },
    /// A file a field names cannot be read.
    #[error("{field} = {:?}: cannot read it: {source}", path.display())]
    Read {
        /// The field.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The key identifier file cannot be created.
    #[error("key_identifier_file = {:?}: cannot create it: {source}", path.display())]
    CreateIdentifier {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: crate::datadir::FileError,
    },
    /// A file a field names is not PEM.
    #[error("{field}: not PEM: {source}")]
    Pem {
        /// The field.
        field: &'static str,
        /// The parser's error.
        #[source]
        source: pem::PemError,
    },
    /// The client certificate is not an X509-SVID.
    #[error("{field}: {source}")]
    Certificate {
        /// The field.
        field: &'static str,
        /// What is wrong with the certificate.
        #[source]
        source: CertIdError,
    },
    /// The system's random source failed (ring tells no more).
    #[error("cannot draw random bytes for a key identifier")]
    Random,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Why a certificate's SPIFFE ID cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertIdError {
    /// The text is not PEM.
    #[error("not PEM: {0}")]
    Pem(#[source] pem::PemError),
    /// The PEM holds no certificate.
    #[error("no CERTIFICATE in the PEM")]
    NoCertificate,
    /// The certificate does not parse.
    #[error("the certificate does not parse: {0}")]
    Parse(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    /// The subjectAltName extension does not parse.
    #[error("bad SAN extension: {0}")]
    San(#[source] x509_parser::error::X509Error),
    /// No subjectAltName at all.
    #[error("the certificate has no SPIFFE ID (no URI SAN): it must be an X509-SVID")]
    NoSan,
    /// No `spiffe://` URI SAN.
    #[error("the certificate has no SPIFFE ID: it must be an X509-SVID")]
    NoSpiffeId,
}

/// Where the KeyManager plug-in's key identifier comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyIdentifier {
    /// None: keys are namespaced by the SPIFFE ID alone.
    None,
    /// `key_identifier_value`.
    Value(String),
    /// `key_identifier_file`: read at `Configure`, created with a random UUID when absent.
    File(PathBuf),
}

impl KeyIdentifier {
    fn from_raw(value: Option<String>, file: Option<PathBuf>) -> Result<Self, SettingsError> {
        match (value, file) {
            (Some(_), Some(_)) => Err(invalid(
                "key_identifier_value",
                "give key_identifier_value or key_identifier_file, not both (as SPIRE's KMS key managers)",
            )),
            (Some(v), None) => {
                if crate::api::keymanager::valid_key_identifier(&v) {
                    Ok(Self::Value(v))
                } else {
                    Err(invalid(
                        "key_identifier_value",
                        format!(
                            "key_identifier_value {v:?} must be 1 to 128 characters of A-Z a-z 0-9 - _ ."
                        ),
                    ))
                }
            }
            (None, Some(f)) => {
                if f.as_os_str().is_empty() {
                    return Err(invalid(
                        "key_identifier_file",
                        "key_identifier_file is empty",
                    ));
                }
                // Checked now when it exists; created at Configure when it does not.
                if f.exists() {
                    read_identifier_file(&f)?;
                }
                Ok(Self::File(f))
            }
            (None, None) => Ok(Self::None),
        }
    }

    /// The identifier to send: the value, or the file's UUID (the file made with a new random UUID when it does not
    /// exist).
    pub fn resolve(&self) -> Result<Option<String>, SettingsError> {
        match self {
            Self::None => Ok(None),
            Self::Value(v) => Ok(Some(v.clone())),
            Self::File(f) => match std::fs::metadata(f) {
                Ok(_) => read_identifier_file(f).map(Some),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let id = new_uuid()?;
                    crate::datadir::write_private(f, id.as_bytes()).map_err(|source| {
                        SettingsError::CreateIdentifier {
                            path: f.clone(),
                            source,
                        }
                    })?;
                    tracing::info!(file = %f.display(), key_identifier = %id,
                        "made a new key identifier for this SPIRE server");
                    Ok(Some(id))
                }
                Err(source) => Err(SettingsError::Read {
                    field: "key_identifier_file",
                    path: f.clone(),
                    source,
                }),
            },
        }
    }
}

/// The UUID in a key identifier file (surrounding whitespace ignored).
fn read_identifier_file(f: &Path) -> Result<String, SettingsError> {
    let text = std::fs::read_to_string(f).map_err(|source| SettingsError::Read {
        field: "key_identifier_file",
        path: f.to_path_buf(),
        source,
    })?;
    let id = text.trim();
    if is_uuid(id) {
        Ok(id.to_ascii_lowercase())
    } else {
        Err(invalid(
            "key_identifier_file",
            format!(
                "key_identifier_file = {:?} does not hold a UUID (it holds {:?}); delete it to have a new one made, \
                 or use key_identifier_value",
                f.display(),
                id.chars().take(40).collect::<String>()
            ),
        ))
    }
}

/// Whether `s` is a UUID in its canonical text form (`8-4-4-4-12` hex digits).
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// A random (version 4) UUID.
fn new_uuid() -> Result<String, SettingsError> {
    use ring::rand::SecureRandom as _;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| SettingsError::Random)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// Where the plug-in's first credential comes from.
#[derive(Clone)]
pub enum FirstCredential {
    /// Read from files (or handed over in process): the chain (PEM, leaf first) and its PKCS#8 key (PEM).
    Pem {
        /// The X509-SVID chain.
        cert_pem: Vec<u8>,
        /// Its key.
        key_pem: Vec<u8>,
    },
    /// From a SPIFFE Workload API (`unix:///path` or `tcp://host:port`), its rotations followed; the roots that
    /// verify the appliance come from there too (the bundle of the trust domain).
    WorkloadApi {
        /// The Workload API endpoint.
        socket: String,
    },
    /// Exchanged for a one-time join token on the appliance's bootstrap port (at Configure).
    JoinToken {
        /// The secret.
        token: String,
        /// The bootstrap port, `host:port`.
        bootstrap_endpoint: String,
    },
}

impl std::fmt::Debug for FirstCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key or the token.
        match self {
            FirstCredential::Pem { .. } => f.write_str("Pem"),
            FirstCredential::WorkloadApi { socket } => f
                .debug_struct("WorkloadApi")
                .field("socket", socket)
                .finish(),
            FirstCredential::JoinToken {
                bootstrap_endpoint, ..
            } => f
                .debug_struct("JoinToken")
                .field("bootstrap_endpoint", bootstrap_endpoint)
                .finish_non_exhaustive(),
        }
    }
}

/// The checked configuration, with the files it names read.
#[derive(Clone)]
pub struct PluginSettings {
    /// `https://host:port` of the appliance, or of each of its replicas (in the order of preference).
    pub endpoints: Vec<String>,
    /// The DNS name the appliance's certificate must carry; `None`: it is checked by its SPIFFE ID.
    pub server_name: Option<String>,
    /// The trust domain (SPIRE's): the appliance is `spiffe://<td>/signet/server`.
    pub trust_domain: String,
    /// Roots that verify the appliance (PEM).
    pub trust_bundle_pem: Vec<u8>,
    /// The first credential.
    pub credential: FirstCredential,
    /// Where the credential is kept: renewals are written there, and changes made there by others are loaded.
    pub credential_paths: Option<(PathBuf, PathBuf)>,
    /// The client's SPIFFE ID (from its certificate, or `spiffe_id` with a join token).
    pub client_id: String,
    /// The lifetime asked for at renewal (zero: the policy's default).
    pub svid_ttl: Duration,
    /// Whether the plug-in renews its credential (not when it runs the appliance itself with `--embedded`).
    pub renew: bool,
    /// Connection timeout.
    pub connect_timeout: Duration,
    /// Per-RPC timeout, retries included.
    pub request_timeout: Duration,
    /// Longest wait between two reconnection attempts.
    pub max_backoff: Duration,
    /// The KeyManager plug-in's key identifier.
    pub key_identifier: KeyIdentifier,
}

impl std::fmt::Debug for PluginSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginSettings")
            .field("endpoints", &self.endpoints)
            .field("server_name", &self.server_name)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path, field: &'static str) -> Result<Vec<u8>, SettingsError> {
    std::fs::read(path).map_err(|source| SettingsError::Read {
        field,
        path: path.to_path_buf(),
        source,
    })
}

fn required<T>(v: Option<T>, field: &'static str, what: &'static str) -> Result<T, SettingsError> {
    v.ok_or(SettingsError::Missing { field, what })
}

impl PluginSettings {
    /// Parses `hcl` (the `plugin_data` block's body) and reads the files it names. `trust_domain` is SPIRE's
    /// (from the core configuration): the client certificate must belong to it. Every error names the field and
    /// says what is wrong.
    pub fn parse(hcl: &str, trust_domain: &str) -> Result<Self, SettingsError> {
        let raw: Raw = hcl::from_str(hcl).map_err(SettingsError::Hcl)?;
        let key_identifier =
            KeyIdentifier::from_raw(raw.key_identifier_value, raw.key_identifier_file)?;
        let (field, given) = match (raw.endpoint, raw.endpoints) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "endpoints",
                    "give endpoint (one appliance) or endpoints (its replicas), not both",
                ));
            }
            (Some(e), None) => ("endpoint", Some(vec![e])),
            (None, list) => ("endpoints", list),
        };
        let given = required(
            given,
            "endpoint",
            "the appliance's address, e.g. \"signet.example.org:8443\" (or endpoints = [...], its replicas)",
        )?;
        if given.is_empty() {
            return Err(invalid(
                "endpoints",
                "endpoints is empty: list the replicas' addresses (host:port)",
            ));
        }
        let mut endpoints = Vec::with_capacity(given.len());
        for endpoint in given {
            let host_port = endpoint
                .strip_prefix("https://")
                .unwrap_or(&endpoint)
                .trim_end_matches('/')
                .to_string();
            if host_port.contains("://") || !host_port.contains(':') {
                return Err(invalid(
                    field,
                    format!(
                        "{field}: {endpoint:?} is not host:port (e.g. \"127.0.0.1:8443\"); signet speaks gRPC over TLS"
                    ),
                ));
            }
            endpoints.push(format!("https://{host_port}"));
        }
        let secs = |d: Option<ConfigDuration>, default: u64, field: &'static str| {
            let d = d.map_or(Duration::from_secs(default), |d| d.0);
            if d.is_zero() {
                Err(invalid(field, format!("{field} must be longer than 0")))
            } else {
                Ok(d)
            }
        };
        if let Some(socket) = raw.workload_api_socket {
            if raw.client_cert_path.is_some()
                || raw.client_key_path.is_some()
                || raw.join_token.is_some()
                || raw.spiffe_id.is_some()
                || raw.bootstrap_endpoint.is_some()
            {
                return Err(invalid(
                    "workload_api_socket",
                    "workload_api_socket gives the plug-in its credential: leave out client_cert_path, \
                     client_key_path and join_token",
                ));
            }
            if !(socket.starts_with("unix:") || socket.starts_with("tcp:")) {
                return Err(invalid(
                    "workload_api_socket",
                    format!(
                        "workload_api_socket {socket:?} is not a Workload API address: write \
                         \"unix:///run/spire/agent.sock\" (or tcp://host:port)"
                    ),
                ));
            }
            if trust_domain.is_empty() {
                return Err(invalid(
                    "workload_api_socket",
                    "workload_api_socket needs SPIRE's trust domain (from its core configuration)",
                ));
            }
            let trust_bundle_pem = match raw.trust_bundle_path {
                Some(p) => read(&p, "trust_bundle_path")?,
                None => Vec::new(),
            };
            return Ok(Self {
                endpoints,
                server_name: raw.server_name.filter(|n| !n.trim().is_empty()),
                trust_domain: trust_domain.to_string(),
                trust_bundle_pem,
                credential: FirstCredential::WorkloadApi { socket },
                credential_paths: None,
                // Known once the Workload API answers.
                client_id: String::new(),
                svid_ttl: Duration::ZERO,
                renew: false,
                connect_timeout: secs(raw.connect_timeout, 10, "connect_timeout")?,
                request_timeout: secs(raw.request_timeout, 30, "request_timeout")?,
                max_backoff: secs(raw.max_backoff, 30, "max_backoff")?,
                key_identifier,
            });
        }
        let bundle_path = required(
            raw.trust_bundle_path,
            "trust_bundle_path",
            "the PEM roots that verify the appliance (its bundle.pem)",
        )?;
        let trust_bundle_pem = read(&bundle_path, "trust_bundle_path")?;
        let roots = pem::parse_many(&trust_bundle_pem).map_err(|source| SettingsError::Pem {
            field: "trust_bundle_path",
            source,
        })?;
        if !roots.iter().any(|p| p.tag() == "CERTIFICATE") {
            return Err(invalid(
                "trust_bundle_path",
                "trust_bundle_path holds no CERTIFICATE",
            ));
        }
        let paths = match (raw.client_cert_path, raw.client_key_path) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "client_cert_path",
                    "client_cert_path needs client_key_path (the key of the certificate)",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "client_key_path",
                    "client_key_path needs client_cert_path (the certificate of the key)",
                ));
            }
        };
        let (credential, client_id) = match raw.join_token {
            Some(token) => {
                let id = required(
                    raw.spiffe_id,
                    "spiffe_id",
                    "the SPIFFE ID the join token was created for",
                )?;
                let bootstrap = required(
                    raw.bootstrap_endpoint,
                    "bootstrap_endpoint",
                    "the appliance's bootstrap port (host:port, [server] bootstrap_listen) that exchanges join tokens",
                )?;
                signet_proto::connect::check_address(&bootstrap).map_err(|e| {
                    invalid("bootstrap_endpoint", format!("bootstrap_endpoint: {e}"))
                })?;
                if token.trim().is_empty() {
                    return Err(invalid("join_token", "join_token is empty"));
                }
                // A credential kept from an earlier start (the token worked once) is used instead of the token.
                match paths.as_ref().and_then(|(c, k)| kept_credential(c, k, &id)) {
                    Some((cert_pem, key_pem)) => (FirstCredential::Pem { cert_pem, key_pem }, id),
                    None => (
                        FirstCredential::JoinToken {
                            token: token.trim().to_string(),
                            bootstrap_endpoint: bootstrap,
                        },
                        id,
                    ),
                }
            }
            None => {
                if raw.spiffe_id.is_some() || raw.bootstrap_endpoint.is_some() {
                    return Err(invalid(
                        "spiffe_id",
                        "spiffe_id and bootstrap_endpoint go with join_token",
                    ));
                }
                let (cert_path, key_path) = required(
                    paths.clone(),
                    "client_cert_path",
                    "this SPIRE server's X509-SVID chain (PEM) issued by signet, and client_key_path its key \
                     (or a join_token)",
                )?;
                let cert_pem = read(&cert_path, "client_cert_path")?;
                let key_pem = read(&key_path, "client_key_path")?;
                let id = check_credential(&cert_pem, &key_pem)?;
                (FirstCredential::Pem { cert_pem, key_pem }, id)
            }
        };
        if !trust_domain.is_empty() {
            let td = client_id
                .strip_prefix("spiffe://")
                .and_then(|r| r.split('/').next())
                .unwrap_or_default();
            if td != trust_domain {
                return Err(invalid(
                    "client_cert_path",
                    format!(
                        "the plug-in's credential is an SVID of trust domain {td:?} but this SPIRE server's is \
                         {trust_domain:?}: signet must serve SPIRE's own trust domain"
                    ),
                ));
            }
        }
        let trust_domain = signet_proto::connect::trust_domain_of(&client_id)
            .ok_or_else(|| invalid("spiffe_id", format!("{client_id:?} is not a SPIFFE ID")))?
            .to_string();
        Ok(Self {
            endpoints,
            server_name: raw.server_name.filter(|n| !n.trim().is_empty()),
            trust_domain,
            trust_bundle_pem,
            credential,
            credential_paths: paths,
            client_id,
            svid_ttl: raw.svid_ttl.map_or(Duration::ZERO, |d| d.0),
            renew: true,
            connect_timeout: secs(raw.connect_timeout, 10, "connect_timeout")?,
            request_timeout: secs(raw.request_timeout, 30, "request_timeout")?,
            max_backoff: secs(raw.max_backoff, 30, "max_backoff")?,
            key_identifier,
        })
    }
}

/// Checks a credential (chain PEM and PKCS#8 key PEM) and returns its SPIFFE ID.
pub fn check_credential(cert_pem: &[u8], key_pem: &[u8]) -> Result<String, SettingsError> {
    let chain = pem::parse_many(cert_pem).map_err(|source| SettingsError::Pem {
        field: "client_cert_path",
        source,
    })?;
    let leaf = chain
        .iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .ok_or_else(|| invalid("client_cert_path", "client_cert_path holds no CERTIFICATE"))?;
    let id = spiffe_id_of(leaf.contents()).map_err(|source| SettingsError::Certificate {
        field: "client_cert_path",
        source,
    })?;
    let key = pem::parse(key_pem).map_err(|source| SettingsError::Pem {
        field: "client_key_path",
        source,
    })?;
    if key.tag() != "PRIVATE KEY" {
        return Err(invalid(
            "client_key_path",
            format!(
                "client_key_path holds a {:?} block: give the key as PKCS#8 (\"PRIVATE KEY\")",
                key.tag()
            ),
        ));
    }
    Ok(id)
}

/// The credential kept at `cert`/`key` from an earlier start, if it is there, for `id` and not expired.
fn kept_credential(cert: &Path, key: &Path, id: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let cert_pem = std::fs::read(cert).ok()?;
    let key_pem = std::fs::read(key).ok()?;
    if check_credential(&cert_pem, &key_pem).ok()? != id {
        return None;
    }
    let leaf = pem::parse_many(&cert_pem).ok()?.into_iter().next()?;
    let (_, c) = x509_parser::parse_x509_certificate(leaf.contents()).ok()?;
    c.validity().is_valid().then_some((cert_pem, key_pem))
}

/// The SPIFFE ID of the first certificate in `pem_text`.
pub fn spiffe_id_of_pem(pem_text: &[u8]) -> Result<String, CertIdError> {
    let chain = pem::parse_many(pem_text).map_err(CertIdError::Pem)?;
    let leaf = chain
        .iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .ok_or(CertIdError::NoCertificate)?;
    spiffe_id_of(leaf.contents())
}

fn spiffe_id_of(der: &[u8]) -> Result<String, CertIdError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(CertIdError::Parse)?;
    let san = cert
        .subject_alternative_name()
        .map_err(CertIdError::San)?
        .ok_or(CertIdError::NoSan)?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => {
                Some(u.to_string())
            }
            _ => None,
        })
        .ok_or(CertIdError::NoSpiffeId)
}

impl PluginSettings {
    /// Applies the timeouts of `hcl` (the only settings `plugin_data` may hold when the appliance runs inside the
    /// plug-in with `--embedded`).
    pub fn tune(&mut self, hcl: &str) -> Result<(), SettingsError> {
        let raw: Raw = hcl::from_str(hcl).map_err(SettingsError::Hcl)?;
        if raw.endpoint.is_some()
            || raw.endpoints.is_some()
            || raw.server_name.is_some()
            || raw.trust_bundle_path.is_some()
            || raw.client_cert_path.is_some()
            || raw.client_key_path.is_some()
            || raw.workload_api_socket.is_some()
            || raw.join_token.is_some()
            || raw.spiffe_id.is_some()
            || raw.bootstrap_endpoint.is_some()
            || raw.svid_ttl.is_some()
        {
            return Err(invalid(
                "plugin_data",
                "with --embedded the plug-in runs the appliance itself: plugin_data may set \
                        connect_timeout, request_timeout, max_backoff and key_identifier_value or \
                        key_identifier_file only",
            ));
        }
        self.key_identifier =
            KeyIdentifier::from_raw(raw.key_identifier_value, raw.key_identifier_file)?;
        for (d, field, slot) in [
            (
                raw.connect_timeout,
                "connect_timeout",
                &mut self.connect_timeout,
            ),
            (
                raw.request_timeout,
                "request_timeout",
                &mut self.request_timeout,
            ),
            (raw.max_backoff, "max_backoff", &mut self.max_backoff),
        ] {
            if let Some(d) = d {
                if d.0.is_zero() {
                    return Err(invalid(field, format!("{field} must be longer than 0")));
                }
                *slot = d.0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hcl_errors_name_the_field() {
        let e = PluginSettings::parse("endpoint = ", "example.org")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("plugin_data: "), "{e}");
        let e = PluginSettings::parse("endpoint = \"x:1\"", "example.org")
            .unwrap_err()
            .to_string();
        assert!(e.contains("trust_bundle_path"), "{e}");
        let e = PluginSettings::parse("endpoint = \"x:1\"\nbogus = 1", "example.org")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = PluginSettings::parse("endpoint = \"nohost\"", "example.org")
            .unwrap_err()
            .to_string();
        assert!(e.contains("host:port"), "{e}");
        let e = PluginSettings::parse("endpoints = [\"a:1\", \"nohost\"]", "example.org")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("endpoints: ") && e.contains("host:port"),
            "{e}"
        );
        let e = PluginSettings::parse("endpoints = []", "example.org")
            .unwrap_err()
            .to_string();
        assert!(e.contains("endpoints is empty"), "{e}");
        let e = PluginSettings::parse("endpoint = \"a:1\"\nendpoints = [\"b:1\"]", "example.org")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not both"), "{e}");
        let e = PluginSettings::parse("server_name = \"x\"", "example.org")
            .unwrap_err()
            .to_string();
        assert!(e.contains("plugin_data needs endpoint"), "{e}");
        let e = PluginSettings::parse(
            "endpoint = \"x:1\"\nworkload_api_socket = \"/x\"",
            "example.org",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unix:///run/spire/agent.sock"), "{e}");
        let e = PluginSettings::parse(
            "endpoint = \"x:1\"\nworkload_api_socket = \"unix:///x\"\njoin_token = \"t\"",
            "example.org",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("leave out"), "{e}");
        let e = PluginSettings::parse(
            "endpoint = \"x:1\"\ntrust_bundle_path = \"/nonexistent/b.pem\"\nclient_cert_path = \"/c\"\nclient_key_path = \"/k\"",
            "example.org",
        )
        .unwrap_err().to_string();
        assert!(
            e.contains("trust_bundle_path") && e.contains("cannot read"),
            "{e}"
        );
    }

    #[test]
    fn key_identifiers_as_spires_kms_key_managers() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key-id");
        let e = KeyIdentifier::from_raw(Some("a".into()), Some(f.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not both"), "{e}");
        for bad in ["a/b", "", "a b", &"x".repeat(129)] {
            let e = KeyIdentifier::from_raw(Some(bad.to_string()), None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("key_identifier_value"), "{bad:?}: {e}");
        }
        assert_eq!(
            KeyIdentifier::from_raw(Some("spire-a.1".into()), None).unwrap(),
            KeyIdentifier::Value("spire-a.1".into())
        );
        assert_eq!(
            KeyIdentifier::from_raw(None, None)
                .unwrap()
                .resolve()
                .unwrap(),
            None
        );
        // Absent: accepted (Validate makes nothing), created with a random UUID at resolve, then kept.
        let k = KeyIdentifier::from_raw(None, Some(f.clone())).unwrap();
        assert!(!f.exists());
        let id = k.resolve().unwrap().unwrap();
        assert!(is_uuid(&id) && id.as_bytes()[14] == b'4', "{id}");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(k.resolve().unwrap().unwrap(), id);
        let other = KeyIdentifier::from_raw(None, Some(dir.path().join("other")))
            .unwrap()
            .resolve()
            .unwrap()
            .unwrap();
        assert_ne!(other, id, "each file its own UUID");
        // A file that does not hold a UUID is refused, at Validate and at Configure.
        std::fs::write(&f, "not-a-uuid\n").unwrap();
        let e = KeyIdentifier::from_raw(None, Some(f.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not hold a UUID"), "{e}");
        assert!(
            k.resolve()
                .unwrap_err()
                .to_string()
                .contains("does not hold a UUID")
        );
    }
}
