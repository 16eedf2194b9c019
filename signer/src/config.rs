//! The appliance's configuration: the TOML file `signet serve --config FILE` reads (see `signet.example.toml` at
//! the repository root for every setting, commented), and the embedded default used when no file is given.
//!
//! Parsing is strict (`deny_unknown_fields`): a misspelt setting is an error that names it, never a silently ignored
//! line. Durations are written `90s`, `5m`, `1h`, `30d` (units may be combined: `1h30m`); rates `100/s`, `6000/m`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::federation::{EndpointProfile, FederatedTrustDomain, FederationSettings};
use crate::keys::KeyType;
pub use crate::policy::{ADMIN_ID_PATH, PolicyRule, SERVER_ID_PATH};
use crate::spiffe::{SpiffeIdError, TrustDomain};
pub use crate::units::{ConfigDuration, Rate};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown or mistyped setting.
    #[error("invalid configuration: {0}")]
    Toml(String),
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The trust domain is not a valid SPIFFE trust domain name.
    #[error("invalid trust_domain: {0}")]
    TrustDomain(#[from] SpiffeIdError),
}

/// Where a token's user PIN comes from. The PIN itself never appears in the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum PinConfig {
    /// An environment variable.
    Env(String),
    /// The first line of a file (keep it 0600).
    File(PathBuf),
}

impl PinConfig {
    /// The token layer's PIN source.
    pub fn source(&self) -> signet_pkcs11::PinSource {
        match self {
            PinConfig::Env(v) => signet_pkcs11::PinSource::Env(v.clone()),
            PinConfig::File(f) => signet_pkcs11::PinSource::File(f.clone()),
        }
    }
}

/// One PKCS#11 token (`[[tokens]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// A name used in the rest of the configuration, in logs and metrics.
    pub name: String,
    /// Path of the PKCS#11 module.
    pub module: PathBuf,
    /// The token's label.
    #[serde(default)]
    pub token: Option<String>,
    /// The token's serial number (instead of `token`).
    #[serde(default)]
    pub serial: Option<String>,
    /// Where the user PIN comes from.
    pub pin: PinConfig,
    /// Worker sessions (threads) on this token.
    #[serde(default = "default_sessions")]
    pub sessions: usize,
}

fn default_sessions() -> usize {
    2
}

impl TokenSettings {
    /// The token layer's configuration.
    pub fn token_config(&self) -> Result<signet_pkcs11::TokenConfig, ConfigError> {
        let selector = match (&self.token, &self.serial) {
            (Some(l), None) => signet_pkcs11::TokenSelector::Label(l.clone()),
            (None, Some(s)) => signet_pkcs11::TokenSelector::Serial(s.clone()),
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "token {:?}: give exactly one of `token` (label) or `serial`",
                    self.name
                )));
            }
        };
        Ok(signet_pkcs11::TokenConfig {
            module: self.module.clone(),
            token: selector,
            pin: self.pin.source(),
            profile: None,
        })
    }
}

/// A key type as written in the configuration (`ec-p256`, `ec-p384`, `rsa-2048`, `rsa-3072`, `rsa-4096`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum KeyTypeSetting {
    /// ECDSA P-256.
    EcP256,
    /// ECDSA P-384.
    EcP384,
    /// RSA 2048.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    /// RSA 3072.
    #[serde(rename = "rsa-3072")]
    Rsa3072,
    /// RSA 4096.
    #[serde(rename = "rsa-4096")]
    Rsa4096,
}

impl KeyTypeSetting {
    /// The token layer's key type.
    pub fn token_key_type(self) -> signet_pkcs11::KeyType {
        match self {
            KeyTypeSetting::EcP256 => signet_pkcs11::KeyType::EcP256,
            KeyTypeSetting::EcP384 => signet_pkcs11::KeyType::EcP384,
            KeyTypeSetting::Rsa2048 => signet_pkcs11::KeyType::Rsa2048,
            KeyTypeSetting::Rsa3072 => signet_pkcs11::KeyType::Rsa3072,
            KeyTypeSetting::Rsa4096 => signet_pkcs11::KeyType::Rsa4096,
        }
    }

    /// The issuance core's key type.
    pub fn key_type(self) -> KeyType {
        match self {
            KeyTypeSetting::EcP256 => KeyType::EcP256,
            KeyTypeSetting::EcP384 => KeyType::EcP384,
            KeyTypeSetting::Rsa2048 => KeyType::Rsa2048,
            KeyTypeSetting::Rsa3072 => KeyType::Rsa3072,
            KeyTypeSetting::Rsa4096 => KeyType::Rsa4096,
        }
    }
}

/// How the X.509 authority signs leaves.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ModeSetting {
    /// Every certificate is signed by the token key.
    #[default]
    Direct,
    /// The token key signs a short-lived in-memory issuing intermediate that signs the leaves.
    Delegated,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// gRPC listen address (mTLS always).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address; empty or absent: no metrics endpoint.
    #[serde(default)]
    pub metrics: Option<String>,
    /// The audit log (JSON lines); relative paths are under the data directory.
    #[serde(default = "default_audit")]
    pub audit_log: PathBuf,
    /// Whether the audit log is synced to the disk (`fdatasync`) before a request is answered (once for all the
    /// requests written together); without it a line is flushed to the kernel only and may be lost with the machine.
    #[serde(default = "default_audit_sync")]
    pub audit_sync: bool,
    /// DNS names of the server certificate (besides its SPIFFE ID).
    #[serde(default = "default_names")]
    pub names: Vec<String>,
    /// Most CSRs in one `BatchMintX509SVID` call.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Largest gRPC message accepted, in bytes.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// How long a shutdown waits for requests in flight.
    #[serde(default = "default_grace")]
    pub shutdown_grace: ConfigDuration,
    /// Lifetime of the server's and the admin's X509-SVIDs: re-issued at start when no more than half is left, and
    /// while running once half their life has passed and right after a root rotation activates (see
    /// [`crate::own`]).
    #[serde(default = "default_service_svid_ttl")]
    pub service_svid_ttl: ConfigDuration,
    /// Whether the running appliance renews its own credentials (default true). Off, they are re-issued at start
    /// only, the old root's retirement waits for them (`service_svid_ttl` counts in its descendants' life) and each
    /// replica must be restarted after `activate`: for diagnosis and tests.
    #[serde(default = "default_true")]
    pub renew_own_credentials: bool,
    /// This replica's name among those sharing a PostgreSQL datastore (default: host name and port).
    #[serde(default)]
    pub replica_id: Option<String>,
    /// Most connections open (or handshaking) on the gRPC port at once; a peer beyond it is closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most concurrent HTTP/2 streams (RPCs, subscriptions) on one connection.
    #[serde(default = "default_max_streams")]
    pub max_streams_per_connection: u32,
    /// Most requests one caller (SPIFFE ID) may have in flight at once; beyond it RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight_per_caller: usize,
    /// How often peers refused before authentication are written to the audit log: one line per peer address per
    /// interval, whatever their number.
    #[serde(default = "default_refusal_audit_interval")]
    pub refusal_audit_interval: ConfigDuration,
    /// The bootstrap port: TLS without a client certificate, serving only `Bootstrap.ExchangeJoinToken` (a join
    /// token for a first X509-SVID), rate-limited per peer address and audited. Absent: no bootstrap port.
    #[serde(default)]
    pub bootstrap_listen: Option<SocketAddr>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_audit() -> PathBuf {
    PathBuf::from("audit.jsonl")
}
fn default_audit_sync() -> bool {
    true
}
fn default_names() -> Vec<String> {
    vec!["localhost".into()]
}
fn default_max_batch() -> usize {
    1000
}
fn default_max_message() -> usize {
    4 * 1024 * 1024
}
fn default_grace() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_streams() -> u32 {
    1024
}
fn default_max_in_flight() -> usize {
    crate::api::DEFAULT_MAX_IN_FLIGHT_PER_CALLER
}
fn default_refusal_audit_interval() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(60))
}
fn default_service_svid_ttl() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30 * 86_400))
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            metrics: Some("127.0.0.1:9090".into()),
            audit_log: default_audit(),
            audit_sync: default_audit_sync(),
            names: default_names(),
            max_batch: default_max_batch(),
            max_message_bytes: default_max_message(),
            shutdown_grace: default_grace(),
            service_svid_ttl: default_service_svid_ttl(),
            renew_own_credentials: true,
            replica_id: None,
            max_connections: default_max_connections(),
            max_streams_per_connection: default_max_streams(),
            max_in_flight_per_caller: default_max_in_flight(),
            refusal_audit_interval: default_refusal_audit_interval(),
            bootstrap_listen: None,
        }
    }
}

/// `[authority.x509]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509Settings {
    /// Key type of the root.
    #[serde(default = "default_key_type")]
    pub key_type: KeyTypeSetting,
    /// Label of the root key on the tokens (generated on the first token when missing and only one token is set).
    #[serde(default = "default_root_label")]
    pub key_label: String,
    /// The tokens that share the signing load (names from `[[tokens]]`; all of them by default).
    #[serde(default)]
    pub tokens: Vec<String>,
    /// `direct` or `delegated`.
    #[serde(default)]
    pub mode: ModeSetting,
    /// Lifetime of a newly created root.
    #[serde(default = "default_root_ttl")]
    pub root_ttl: ConfigDuration,
    /// Lifetime of delegated mode's issuing intermediates.
    #[serde(default = "default_intermediate_ttl")]
    pub intermediate_ttl: ConfigDuration,
    /// `self` (default): signet's X.509 authority is a self-signed root it makes on the token; `external`: it is an
    /// intermediate whose certificate an offline root signs (`signet rotate prepare` writes the CSR, `signet rotate
    /// install` takes the certificate back; see the offline-root chapter of the book).
    #[serde(default)]
    pub parent: ParentSetting,
    /// With `parent = "external"`: the PEM file of the upstream roots the installed certificates must chain to;
    /// they, not signet's intermediate, are the trust domain's X.509 bundle.
    #[serde(default)]
    pub upstream_roots: Option<PathBuf>,
}

/// `authority.x509.parent`: who certifies signet's X.509 authority.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParentSetting {
    /// Nobody: a self-signed root on the token.
    #[default]
    #[serde(rename = "self")]
    SelfSigned,
    /// An offline root outside signet (the key never reaches signet).
    External,
}

fn default_key_type() -> KeyTypeSetting {
    KeyTypeSetting::EcP256
}
fn default_root_label() -> String {
    "signet-x509-root".into()
}
fn default_jwt_label() -> String {
    "signet-jwt".into()
}
fn default_root_ttl() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(365 * 86_400))
}
fn default_intermediate_ttl() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(4 * 3600))
}

impl Default for X509Settings {
    fn default() -> Self {
        Self {
            key_type: default_key_type(),
            key_label: default_root_label(),
            tokens: Vec::new(),
            mode: ModeSetting::Direct,
            root_ttl: default_root_ttl(),
            intermediate_ttl: default_intermediate_ttl(),
            parent: ParentSetting::SelfSigned,
            upstream_roots: None,
        }
    }
}

/// `[authority.jwt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    /// Key type of the JWT signing key (ES256 for ec-p256, ES384 for ec-p384, RS256 for RSA).
    #[serde(default = "default_key_type")]
    pub key_type: KeyTypeSetting,
    /// Label of the JWT key on the token.
    #[serde(default = "default_jwt_label")]
    pub key_label: String,
    /// The longest JWT-SVID lifetime any caller may get (a longer request is cut to it).
    #[serde(default = "default_jwt_max")]
    pub max_ttl: ConfigDuration,
}

fn default_jwt_max() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(24 * 3600))
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            key_type: default_key_type(),
            key_label: default_jwt_label(),
            max_ttl: default_jwt_max(),
        }
    }
}

/// `[authority]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthoritySettings {
    /// How often relying parties should fetch the bundle again (`spiffe_refresh_hint` of GetBundle and of the
    /// subscription streams' documents). A new key is published at least 3 of these before it signs.
    #[serde(default = "default_bundle_refresh_hint")]
    pub bundle_refresh_hint: ConfigDuration,
    /// The X.509 authority.
    #[serde(default)]
    pub x509: X509Settings,
    /// The JWT authority.
    #[serde(default)]
    pub jwt: JwtSettings,
    /// Rotation of the root and the JWT key.
    #[serde(default)]
    pub rotation: RotationSettings,
}

fn default_bundle_refresh_hint() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(crate::bundle::REFRESH_HINT_SECS))
}

impl Default for AuthoritySettings {
    fn default() -> Self {
        Self {
            bundle_refresh_hint: default_bundle_refresh_hint(),
            x509: X509Settings::default(),
            jwt: JwtSettings::default(),
            rotation: RotationSettings::default(),
        }
    }
}

/// `[authority.rotation]`: when the root and the JWT key rotate on their own (like SPIRE: prepare and publish the
/// successor at half the active one's life, activate it at ~83 %), and how long a published key waits before it
/// signs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationSettings {
    /// Rotate on the schedule; false: by hand only (`signet rotate`).
    #[serde(default = "default_true")]
    pub schedule: bool,
    /// Fraction of the active authority's life at which its successor is prepared and published.
    #[serde(default = "default_prepare_at")]
    pub prepare_at: f64,
    /// Fraction of the active authority's life at which its successor is activated.
    #[serde(default = "default_activate_at")]
    pub activate_at: f64,
    /// Least time between publishing and activating (3–5 × the bundle's refresh hint of 5 minutes).
    #[serde(default = "default_publish_lead")]
    pub publish_lead: ConfigDuration,
    /// How often the schedule is checked.
    #[serde(default = "default_check_every")]
    pub check_every: ConfigDuration,
}

fn default_true() -> bool {
    true
}
fn default_prepare_at() -> f64 {
    0.5
}
fn default_activate_at() -> f64 {
    0.83
}
fn default_publish_lead() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(
        crate::ca::PUBLISH_LEAD_HINTS * crate::bundle::REFRESH_HINT_SECS,
    ))
}
fn default_check_every() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(60))
}

impl Default for RotationSettings {
    fn default() -> Self {
        Self {
            schedule: true,
            prepare_at: default_prepare_at(),
            activate_at: default_activate_at(),
            publish_lead: default_publish_lead(),
            check_every: default_check_every(),
        }
    }
}

/// `[key_manager]`: the keys SPIRE servers keep on signet's token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyManagerSettings {
    /// The token the keys are generated on (a name from `[[tokens]]`; the first token by default).
    #[serde(default)]
    pub token: Option<String>,
    /// The keys of a namespace (one SPIRE server: SPIFFE ID and key identifier) that no KeyManager call used for
    /// this long are destroyed on the token; default 14 days, as SPIRE's KMS key managers; `0s`: never.
    #[serde(default = "default_sweep_after")]
    pub sweep_after: ConfigDuration,
    /// How often the sweep looks for such namespaces (default 1 hour).
    #[serde(default = "default_sweep_every")]
    pub sweep_every: ConfigDuration,
}

fn default_sweep_after() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(14 * 86_400))
}

fn default_sweep_every() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(3600))
}

impl Default for KeyManagerSettings {
    fn default() -> Self {
        Self {
            token: None,
            sweep_after: default_sweep_after(),
            sweep_every: default_sweep_every(),
        }
    }
}

/// `[pipeline]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Jobs the signing queue holds; beyond it requests are refused with RESOURCE_EXHAUSTED.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Most jobs an HSM worker takes per wake-up.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// CPU threads (0: cores + 2 x HSM sessions).
    #[serde(default)]
    pub cpu_threads: usize,
    /// Post-sign check of bare-digest (KeyManager) signatures: `always` (the default), `never` or `1/N` (sampled:
    /// a token that corrupts signatures then gets up to N-1 in N of them past the check).
    #[serde(default = "default_verify")]
    pub verify_after_sign: String,
    /// Failed post-sign checks of a token's signatures (since it last entered rotation) that take it out of
    /// rotation until a probe signature verifies (at least 1).
    #[serde(default = "default_max_bad_signatures")]
    pub max_bad_signatures: u32,
    /// Deadline of a request that carries none.
    #[serde(default = "default_timeout")]
    pub default_timeout: ConfigDuration,
}

fn default_queue() -> usize {
    65_536
}
fn default_batch() -> usize {
    64
}
fn default_verify() -> String {
    "always".into()
}
fn default_max_bad_signatures() -> u32 {
    3
}
fn default_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            queue: default_queue(),
            batch: default_batch(),
            cpu_threads: 0,
            verify_after_sign: default_verify(),
            max_bad_signatures: default_max_bad_signatures(),
            default_timeout: default_timeout(),
        }
    }
}

impl PipelineSettings {
    /// The pipeline's settings.
    pub fn pipeline_config(&self) -> Result<crate::pipeline::PipelineConfig, ConfigError> {
        use crate::pipeline::VerifyPolicy;
        let verify = match self.verify_after_sign.trim() {
            "always" => VerifyPolicy::Always,
            "never" => VerifyPolicy::Never,
            other => {
                let n = other
                    .strip_prefix("1/")
                    .and_then(|n| n.trim().parse::<u32>().ok())
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| {
                        ConfigError::Invalid(format!(
                            "pipeline.verify_after_sign = {other:?}: use \"always\", \"never\" or \"1/N\""
                        ))
                    })?;
                VerifyPolicy::Sample(n)
            }
        };
        if self.max_bad_signatures == 0 {
            return Err(ConfigError::Invalid(
                "pipeline.max_bad_signatures must be at least 1 (a token whose signatures fail the post-sign \
                 check must leave rotation)"
                    .into(),
            ));
        }
        if self.queue == 0 || self.batch == 0 {
            return Err(ConfigError::Invalid(
                "pipeline.queue and pipeline.batch must be at least 1".into(),
            ));
        }
        Ok(crate::pipeline::PipelineConfig {
            queue_capacity: self.queue,
            batch: self.batch,
            cpu_threads: self.cpu_threads,
            verify_digests: verify,
            max_bad_signatures: self.max_bad_signatures,
            default_timeout: self.default_timeout.0,
            ..crate::pipeline::PipelineConfig::default()
        })
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The trust domain (lowercase).
    pub trust_domain: String,
    /// Where generated state lives (root certificate, service credentials, the embedded token, the audit log).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The datastore (authorities, their rotation, the bundle's sequence, KeyManager key records): `sqlite://PATH`,
    /// relative to the data directory, or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` for several replicas.
    #[serde(default = "default_datastore")]
    pub datastore: String,
    /// `[server]`.
    #[serde(default)]
    pub server: ServerSettings,
    /// `[[tokens]]`; none: the embedded default token in the data directory.
    #[serde(default)]
    pub tokens: Vec<TokenSettings>,
    /// `[authority]`.
    #[serde(default)]
    pub authority: AuthoritySettings,
    /// `[key_manager]`.
    #[serde(default)]
    pub key_manager: KeyManagerSettings,
    /// `[pipeline]`.
    #[serde(default)]
    pub pipeline: PipelineSettings,
    /// `[[policy]]`, in order: the first rule whose `caller` matches applies.
    #[serde(default)]
    pub policy: Vec<PolicyRule>,
    /// `[federation]`.
    #[serde(default)]
    pub federation: FederationSettings,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("signet-data")
}

fn default_datastore() -> String {
    "sqlite://state.db".into()
}

/// The path of the SPIRE server's SPIFFE ID that the embedded default's policy lets use the SPIRE services.
pub const SPIRE_SERVER_ID_PATH: &str = "/spire/server";

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The embedded default: trust domain `example.org`, data in `./signet-data/`, an embedded token, a bootstrap
    /// port for join tokens on a free loopback port, and a policy that lets the generated admin credential use every
    /// service for the whole trust domain and the SPIRE server (`spiffe://example.org/spire/server`) use signet as
    /// its UpstreamAuthority and KeyManager (CAs of at most 24 h).
    pub fn embedded_default() -> Self {
        let td = "example.org";
        Config {
            trust_domain: td.into(),
            data_dir: default_data_dir(),
            datastore: default_datastore(),
            server: ServerSettings {
                // A bootstrap port for join tokens, on a free loopback port (the banner and `signet join-token
                // create` / `signet spire config` say which).
                bootstrap_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                ..ServerSettings::default()
            },
            tokens: Vec::new(),
            authority: AuthoritySettings::default(),
            key_manager: KeyManagerSettings::default(),
            pipeline: PipelineSettings::default(),
            policy: vec![
                PolicyRule {
                    caller: format!("spiffe://{td}{ADMIN_ID_PATH}"),
                    may: vec![
                        "issuer".into(),
                        "admin".into(),
                        "upstream-authority".into(),
                        "key-manager".into(),
                    ],
                    ids: vec![format!("spiffe://{td}/")],
                    max_ttl: Some(ConfigDuration(Duration::from_secs(24 * 3600))),
                    jwt_max_ttl: Some(ConfigDuration(Duration::from_secs(3600))),
                    rate: None,
                    burst: None,
                    downstream_credentials: false,
                    spire_ca_path_len: None,
                },
                // The SPIRE server of the trust domain (`signet spire config` plugs it in with a join token).
                PolicyRule {
                    caller: format!("spiffe://{td}{SPIRE_SERVER_ID_PATH}"),
                    may: vec!["upstream-authority".into(), "key-manager".into()],
                    ids: Vec::new(),
                    max_ttl: Some(ConfigDuration(Duration::from_secs(24 * 3600))),
                    jwt_max_ttl: None,
                    rate: None,
                    burst: None,
                    downstream_credentials: false,
                    spire_ca_path_len: None,
                },
            ],
            federation: FederationSettings::default(),
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> Result<TrustDomain, ConfigError> {
        Ok(TrustDomain::parse(&self.trust_domain)?)
    }

    /// A path from the configuration, resolved against the data directory when relative.
    pub fn in_data_dir(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.data_dir.join(p)
        }
    }

    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.trust_domain()?;
        let km = &self.key_manager;
        if !km.sweep_after.0.is_zero() && km.sweep_every.0.is_zero() {
            return Err(ConfigError::Invalid(
                "key_manager.sweep_every must be longer than 0 (or sweep_after = \"0s\" to never sweep)".into(),
            ));
        }
        let r = &self.authority.rotation;
        if !(r.prepare_at > 0.0 && r.prepare_at < r.activate_at && r.activate_at < 1.0) {
            return Err(ConfigError::Invalid(format!(
                "authority.rotation: need 0 < prepare_at ({}) < activate_at ({}) < 1",
                r.prepare_at, r.activate_at
            )));
        }
        // The longest refresh hint signet publishes: the bundle's, and the bundle endpoint's when it serves.
        let mut hint = self.authority.bundle_refresh_hint.0.as_secs();
        if self.federation.listen.is_some() {
            hint = hint.max(self.federation.refresh_hint.0.as_secs());
        }
        if hint == 0 {
            return Err(ConfigError::Invalid(
                "authority.bundle_refresh_hint must be at least 1 s".into(),
            ));
        }
        if r.publish_lead.0.as_secs() < 3 * hint {
            return Err(ConfigError::Invalid(format!(
                "authority.rotation.publish_lead must be at least 3 refresh hints ({} s): relying parties must have \
                 fetched a new key before it signs",
                3 * hint
            )));
        }
        let x = &self.authority.x509;
        match (x.parent, &x.upstream_roots) {
            (ParentSetting::External, None) => {
                return Err(ConfigError::Invalid(
                    "authority.x509.parent = \"external\" needs authority.x509.upstream_roots (the PEM file of the \
                     offline roots the authority's certificate chains to)"
                        .into(),
                ));
            }
            (ParentSetting::SelfSigned, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "authority.x509.upstream_roots is only for parent = \"external\"".into(),
                ));
            }
            _ => {}
        }
        if r.check_every.0.is_zero() {
            return Err(ConfigError::Invalid(
                "authority.rotation.check_every must be positive".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tokens {
            if !names.insert(t.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "two [[tokens]] are named {:?}",
                    t.name
                )));
            }
            if t.sessions == 0 {
                return Err(ConfigError::Invalid(format!(
                    "token {:?}: sessions must be at least 1",
                    t.name
                )));
            }
            t.token_config()?;
        }
        for n in self
            .authority
            .x509
            .tokens
            .iter()
            .chain(self.key_manager.token.iter())
        {
            if !self.tokens.is_empty() && !names.contains(n.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "token {n:?} is used but not defined in [[tokens]]"
                )));
            }
        }
        let srv = &self.server;
        for (name, v) in [
            ("max_connections", srv.max_connections),
            (
                "max_streams_per_connection",
                srv.max_streams_per_connection as usize,
            ),
            ("max_in_flight_per_caller", srv.max_in_flight_per_caller),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!(
                    "server.{name} must be at least 1"
                )));
            }
        }
        if srv.refusal_audit_interval.0 < Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "server.refusal_audit_interval must be at least 1 s".into(),
            ));
        }
        if self.server.service_svid_ttl.0 < Duration::from_secs(2) {
            return Err(ConfigError::Invalid(
                "server.service_svid_ttl must be at least 2 s".into(),
            ));
        }
        if self.server.max_batch == 0 {
            return Err(ConfigError::Invalid(
                "server.max_batch must be at least 1".into(),
            ));
        }
        if self.server.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "server.max_message_bytes must be at least 1024".into(),
            ));
        }
        self.pipeline.pipeline_config()?;
        crate::federation::check_settings(&self.federation, &self.trust_domain()?)
            .map_err(|e| ConfigError::Invalid(e.0))?;
        crate::policy::Policy::from_rules(&self.policy, self.authority.jwt.max_ttl.0)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            ConfigDuration::parse("1h30m").ok(),
            Some(ConfigDuration(Duration::from_secs(5400)))
        );
        assert_eq!(
            ConfigDuration::parse("8760h").ok(),
            Some(ConfigDuration(Duration::from_secs(8760 * 3600)))
        );
        assert!(ConfigDuration::parse("10").is_err());
        assert!(ConfigDuration::parse("5w").is_err());
        assert!(ConfigDuration::parse("").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(Rate::parse("100/s").map(|r| r.per_second), Ok(100.0));
        assert_eq!(Rate::parse("60/m").map(|r| r.per_second), Ok(1.0));
        assert!(Rate::parse("0/s").is_err());
        assert!(Rate::parse("100").is_err());
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../../signet.example.toml");
        let cfg = Config::parse(text);
        assert!(cfg.is_ok(), "{cfg:?}");
    }

    #[test]
    fn unknown_settings_are_refused() {
        let e = Config::parse("trust_domain = \"example.org\"\n[server]\nlisen = \"1.2.3.4:5\"\n");
        assert!(matches!(e, Err(ConfigError::Toml(m)) if m.contains("lisen")));
    }

    #[test]
    fn the_embedded_default_is_valid() {
        assert!(Config::embedded_default().validate().is_ok());
    }

    #[test]
    fn federation_settings_are_checked() {
        let base = "trust_domain = \"example.org\"\n";
        let refused = |extra: &str, needle: &str| {
            let e = Config::parse(&format!("{base}{extra}"));
            assert!(
                matches!(&e, Err(ConfigError::Invalid(m)) if m.contains(needle)),
                "{extra}: {e:?}"
            );
        };
        refused(
            "[federation]\nlisten = \"127.0.0.1:0\"\n",
            "federation.cert",
        );
        let td = |body: &str| format!("[[federation.trust_domains]]\n{body}");
        refused(
            &td(
                "trust_domain = \"example.org\"\nendpoint = \"https://x\"\nprofile = \"https_web\"\nca = \"c\"\n",
            ),
            "itself",
        );
        refused(
            &td(
                "trust_domain = \"b.org\"\nendpoint = \"http://x\"\nprofile = \"https_web\"\nca = \"c\"\n",
            ),
            "https://",
        );
        refused(
            &td("trust_domain = \"b.org\"\nendpoint = \"https://x\"\nprofile = \"https_web\"\n"),
            "`ca`",
        );
        refused(
            &td(
                "trust_domain = \"b.org\"\nendpoint = \"https://x\"\nprofile = \"https_spiffe\"\nbootstrap_bundle = \"b\"\n",
            ),
            "endpoint_spiffe_id",
        );
        refused(
            &td(
                "trust_domain = \"b.org\"\nendpoint = \"https://x\"\nprofile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://b.org/x\"\n",
            ),
            "bootstrap_bundle",
        );
        refused(
            &td(
                "trust_domain = \"B.org\"\nendpoint = \"https://x\"\nprofile = \"https_web\"\nca = \"c\"\n",
            ),
            "B.org",
        );
        let ok = Config::parse(&format!(
            "{base}{}",
            td(
                "trust_domain = \"b.org\"\nendpoint = \"https://x:8444\"\nprofile = \"https_web\"\nca = \"c\"\n"
            )
        ));
        assert!(ok.is_ok(), "{ok:?}");
    }
}
