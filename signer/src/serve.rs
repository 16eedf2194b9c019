//! `signet serve`: brings the appliance up from a [`Config`] and runs it until it is told to stop.
//!
//! Start-up, in order: the data directory and its datastore ([`crate::store`], `state.db`), which says which keys
//! are the active root and JWT key after a rotation; the tokens (the configured ones, or the embedded token
//! provisioned in the data directory through the [`EmbeddedToken`] seam); the root and JWT keys on the token (generated when
//! missing); the signing pipeline; the root certificate (`root.pem`, self-signed through the pipeline on the first
//! start, reused after); the server's and the admin's X509-SVIDs (issued by the root, re-issued when no more than
//! half their life is left, or issued by another root than the active one); the authorities' life cycle
//! ([`crate::ca::Authorities`], which adopts the first root and JWT key into a fresh datastore and finishes any
//! rotation step a crash interrupted) and the bundle it keeps; the KeyManager keys; the audit log. Background tasks
//! swap the issuers when a rotation activates a new root or key, keep `bundle.pem` in step, run the rotation
//! schedule, and renew signet's own server and admin credentials while it runs ([`crate::own`]: at half their life
//! and right after every activate, swapped into the TLS listeners without dropping a connection, so no restart is
//! needed for a rotation). Then the gRPC server (mTLS) with the four
//! APIs, gRPC health (NOT_SERVING while no token can sign) and reflection, and the Prometheus endpoint.
//!
//! [`Appliance::shutdown`] stops accepting connections, ends the subscription streams, lets requests in flight
//! finish (within `server.shutdown_grace`), then stops the pipeline and flushes the audit log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{DistinguishedName, DnType};
use signet_pkcs11::{ErrorKind, KeyGenOptions, Token};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use zeroize::Zeroizing;

use crate::api::admin::AdminService;
use crate::api::issuer::IssuerService;
use crate::api::keymanager::{KeyManagerService, KeyStore};
use crate::api::listener::{RefusalTally, accept_loop, audit_refusals};
use crate::api::upstream::UpstreamAuthorityService;
use crate::api::{AppState, Signers, tls};
use crate::audit::AuditLog;
use crate::bundle::TrustBundle;
use crate::ca::external::ExternalParent;
use crate::ca::{
    ActiveSet, Authorities, AuthorityKind, AuthorityState, Initial, RotationPolicy, Schedule,
    TokenKeyring,
};
use crate::config::{
    ADMIN_ID_PATH, Config, ConfigError, ModeSetting, PinConfig, SERVER_ID_PATH, TokenSettings,
};
use crate::datadir::{DataPaths, FileError, pem_certs, replace_file, write_private, write_public};
use crate::health::HealthBoard;
use crate::jwt::JwtIssuer;
use crate::keys::AuthorityKey;
use crate::pipeline::{DelegatedConfig, Pipeline, SigningMode, TokenMember, X509SvidIssuer};
use crate::policy::Policy;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::store::Store;
use crate::x509::{Authority, LeafRequest, RootRequest};

/// Why the appliance did not start (or stopped badly).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A token could not be opened or used.
    #[error("token {token:?}: {message}")]
    Token {
        /// The token's name.
        token: String,
        /// What went wrong.
        message: String,
    },
    /// The authorities could not be set up.
    #[error("authority set-up failed: {0}")]
    Authority(String),
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Server(String),
    /// Below an offline root, on the first start: the authority's certificate is not installed yet (the CSR is
    /// written; the message says where and what to run).
    #[error("{0}")]
    AwaitingCertificate(String),
}

impl From<FileError> for ServeError {
    fn from(e: FileError) -> Self {
        ServeError::Io {
            what: e.what,
            source: e.source,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// The token signet provisions for itself in the data directory when the configuration names none. This is the
/// seam for changing the default token: implement it for another PKCS#11 module and return it from
/// [`default_embedded_token`].
pub trait EmbeddedToken: std::fmt::Debug + Send + Sync {
    /// A short name for messages.
    fn name(&self) -> &'static str;
    /// Environment variables that must be set before the module is loaded (name, value).
    fn environment(&self, data_dir: &Path) -> Vec<(String, PathBuf)>;
    /// Creates the token if it does not exist yet (in `data_dir`) and returns its settings.
    fn provision(&self, data_dir: &Path) -> Result<TokenSettings, ServeError>;
}

/// hsm-sim, the PKCS#11 simulator linked into the `signet` binary, with its token directory inside the data
/// directory: nothing to install, no configuration to write. The module is the program itself
/// ([`signet_pkcs11::BUILTIN_MODULE`]), so this token is only available in a program that exports hsm-sim's
/// `C_GetFunctionList` (the `signet` binary does; see its build script).
#[derive(Debug, Clone, Copy, Default)]
pub struct HsmSimEmbedded;

/// The embedded token's label.
pub const EMBEDDED_LABEL: &str = "signet";

/// The settings of the embedded token provisioned in `data_dir` on `module` (its user PIN in `token.pin`).
pub fn embedded_token_settings(module: PathBuf, data_dir: &Path) -> TokenSettings {
    TokenSettings {
        name: "embedded".into(),
        module,
        token: Some(EMBEDDED_LABEL.into()),
        serial: None,
        pin: PinConfig::File(data_dir.join("token.pin")),
        sessions: 2,
    }
}

impl EmbeddedToken for HsmSimEmbedded {
    fn name(&self) -> &'static str {
        "hsm-sim"
    }

    fn environment(&self, _data_dir: &Path) -> Vec<(String, PathBuf)> {
        // Configured through hsm_sim::set_embedded_config, not the environment.
        Vec::new()
    }

    fn provision(&self, data_dir: &Path) -> Result<TokenSettings, ServeError> {
        let dir = data_dir.join("hsm-sim");
        std::fs::create_dir_all(&dir).map_err(io("creating the token directory"))?;
        let config = hsm_sim::Config {
            dir: Some(dir.clone()),
            // Fault injection for drills and tests (the simulator's control file; see hsm-sim.example.toml).
            control_file: std::env::var_os("HSM_SIM_CONTROL").map(PathBuf::from),
            ..hsm_sim::Config::default()
        };
        // The first configuration of the process stays; a second appliance in one process shares the device.
        if !hsm_sim::set_embedded_config(config) {
            tracing::debug!("the embedded hsm-sim device was configured already in this process");
        }
        let settings = provision_token(PathBuf::from(signet_pkcs11::BUILTIN_MODULE), data_dir)?;
        tracing::info!(dir = %dir.display(), "embedded hsm-sim token ready");
        Ok(settings)
    }
}

/// Creates the embedded token `signet` on `module` unless it exists, with random PINs kept in the data directory
/// (0600), and returns its settings.
fn provision_token(module: PathBuf, data_dir: &Path) -> Result<TokenSettings, ServeError> {
    let token_err = |message: String| ServeError::Token {
        token: "embedded".into(),
        message,
    };
    let pin_file = data_dir.join("token.pin");
    let so_pin_file = data_dir.join("token.so-pin");
    for f in [&pin_file, &so_pin_file] {
        if !f.exists() {
            write_private(f, random_pin()?.as_bytes())?;
        }
    }
    let slots = signet_pkcs11::list_slots(&module).map_err(|e| token_err(e.to_string()))?;
    let exists = slots
        .iter()
        .any(|s| s.token.as_ref().is_some_and(|t| t.label == EMBEDDED_LABEL));
    if !exists {
        let read = |p: &Path| -> Result<signet_pkcs11::Pin, ServeError> {
            let text = Zeroizing::new(
                std::fs::read_to_string(p).map_err(io(format!("reading {}", p.display())))?,
            );
            Ok(signet_pkcs11::Pin::new(text.trim()))
        };
        signet_pkcs11::init_token(
            &module,
            EMBEDDED_LABEL,
            &read(&so_pin_file)?,
            &read(&pin_file)?,
        )
        .map_err(|e| token_err(format!("cannot initialise the embedded token: {e}")))?;
        tracing::info!("embedded token created");
    }
    Ok(embedded_token_settings(module, data_dir))
}

/// The embedded token used when the configuration names none.
pub fn default_embedded_token() -> Arc<dyn EmbeddedToken> {
    Arc::new(HsmSimEmbedded)
}

/// A random PIN for the embedded token: 16 random bytes in hex, both buffers zeroised when dropped.
fn random_pin() -> Result<Zeroizing<String>, ServeError> {
    use ring::rand::SecureRandom as _;
    let mut b = Zeroizing::new([0u8; 16]);
    ring::rand::SystemRandom::new()
        .fill(b.as_mut())
        .map_err(|_| ServeError::Authority("the system random generator failed".into()))?;
    Ok(Zeroizing::new(hex::encode(&b[..])))
}

/// Makes sure a key labelled `label` exists on `token`, generating it when it does not.
fn ensure_key(
    token: &Token,
    name: &str,
    label: &str,
    key_type: signet_pkcs11::KeyType,
    may_generate: bool,
) -> Result<(), ServeError> {
    let err = |message: String| ServeError::Token {
        token: name.to_string(),
        message,
    };
    let mut s = token.session().map_err(|e| err(e.to_string()))?;
    match s.find_key(label) {
        Ok(k) if k.key_type() == key_type => Ok(()),
        Ok(k) => Err(err(format!(
            "key {label:?} is {} but the configuration asks for {}: fix key_type or use another label",
            k.key_type().name(),
            key_type.name()
        ))),
        Err(e) if e.kind() == ErrorKind::KeyNotFound && may_generate => {
            s.generate_key(label, key_type, KeyGenOptions::default())
                .map_err(|e| err(format!("cannot generate {label:?}: {e}")))?;
            tracing::info!(token = name, label, "key generated on the token");
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::KeyNotFound => Err(err(format!(
            "key {label:?} is missing: with several tokens, create it on each (signet token keygen) first"
        ))),
        Err(e) => Err(err(e.to_string())),
    }
}

/// How often a first start below an offline root looks again for the installed certificate.
const AWAIT_CERTIFICATE_POLL: Duration = Duration::from_secs(2);

/// The external parent the configuration names, with its upstream roots loaded, or `None` for signet's own roots.
fn external_parent(cfg: &Config) -> Result<Option<ExternalParent>, ServeError> {
    let x = &cfg.authority.x509;
    if x.parent != crate::config::ParentSetting::External {
        return Ok(None);
    }
    let path = x.upstream_roots.as_ref().ok_or_else(|| {
        ConfigError::Invalid(
            "authority.x509.parent = \"external\" needs authority.x509.upstream_roots".into(),
        )
    })?;
    let roots =
        crate::ca::external::load_roots(path).map_err(|e| ServeError::Authority(e.to_string()))?;
    Ok(Some(ExternalParent {
        roots,
        source: path.display().to_string(),
        path_len_room: PATH_LEN_ROOM,
        least_life: rotation_policy(cfg, true).least_life(),
    }))
}

/// How many levels of CA signet issues below its X.509 authority: SPIRE servers' CAs (pathlen 0) and delegated
/// mode's issuing intermediates are one level.
const PATH_LEN_ROOM: u8 = 1;

/// Below an offline root, the first start's authority: the certificate `signet rotate install --offline` wrote to
/// the data directory (checked again here, against the key on the token), with its chain. Without one, the CSR is
/// written for the ceremony and [`ServeError::AwaitingCertificate`] says what to do.
fn load_installed(
    paths: &DataPaths,
    key: &dyn AuthorityKey,
    td: &TrustDomain,
    label: &str,
    ext: &ExternalParent,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), ServeError> {
    if !paths.authority.exists() {
        let csr =
            crate::x509::certificate_request(key, td, &crate::ca::intermediate_subject(td, 1))
                .map_err(|e| ServeError::Authority(format!("cannot make the CSR: {e}")))?;
        write_public(
            &paths.authority_csr,
            pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr)).as_bytes(),
        )?;
        return Err(ServeError::AwaitingCertificate(format!(
            "awaiting the authority's certificate: have the offline root sign {} (a CA certificate for {label}), then \
             run signet rotate install --offline --config FILE --cert FILE [--chain FILE]; signet starts serving once \
             it is installed",
            paths.authority_csr.display()
        )));
    }
    let text = std::fs::read(&paths.authority)
        .map_err(io(format!("reading {}", paths.authority.display())))?;
    let mut certs =
        crate::ca::external::pem_certificates(&text, &paths.authority.display().to_string())
            .map_err(|e| ServeError::Authority(e.to_string()))?;
    if certs.is_empty() {
        return Err(ServeError::Authority(format!(
            "{} holds no certificate",
            paths.authority.display()
        )));
    }
    let cert = certs.remove(0);
    crate::ca::external::check_installed(
        &cert,
        &certs,
        label,
        key.spki_der(),
        ext,
        OffsetDateTime::now_utc(),
    )
    .map_err(|e| ServeError::Authority(format!("{}: {e}", paths.authority.display())))?;
    Ok((cert, certs))
}

/// `signet rotate install --offline`: below an offline root, before the first start, checks the certificate the
/// ceremony returned (`cert_pem`, with `chain_pem` the CA certificates between it and the upstream root) against
/// the CSR the waiting `signet serve` wrote to the data directory and the configured upstream roots, and writes it
/// where the start picks it up (`authority.pem`). The start checks it again against the key on the token.
pub fn install_offline(
    cfg: &Config,
    cert_pem: &[u8],
    chain_pem: &[u8],
) -> Result<PathBuf, ServeError> {
    cfg.validate()?;
    let ext = external_parent(cfg)?.ok_or_else(|| {
        ConfigError::Invalid(
            "install is for an X.509 authority below an offline root: set authority.x509.parent = \"external\"".into(),
        )
    })?;
    let paths = DataPaths::new(&cfg.data_dir);
    let csr_pem = std::fs::read(&paths.authority_csr).map_err(io(format!(
        "reading {} (start signet serve once: it writes the CSR and waits)",
        paths.authority_csr.display()
    )))?;
    let csr_der = pem::parse(&csr_pem)
        .map_err(|e| ServeError::Authority(format!("{}: {e}", paths.authority_csr.display())))?
        .contents()
        .to_vec();
    let csr = crate::x509::parse_and_verify_csr(&csr_der)
        .map_err(|e| ServeError::Authority(format!("{}: {e}", paths.authority_csr.display())))?;
    let mut certs = crate::ca::external::pem_certificates(cert_pem, "the certificate file")
        .map_err(|e| ServeError::Authority(e.to_string()))?;
    if certs.len() != 1 {
        return Err(ServeError::Authority(format!(
            "the certificate file holds {} certificates: give signet's certificate alone (--cert) and the CA \
             certificates above it with --chain",
            certs.len()
        )));
    }
    let chain = crate::ca::external::pem_certificates(chain_pem, "the chain file")
        .map_err(|e| ServeError::Authority(e.to_string()))?;
    crate::ca::external::check_installed(
        &certs[0],
        &chain,
        &cfg.authority.x509.key_label,
        csr.subject_key().spki_der(),
        &ext,
        OffsetDateTime::now_utc(),
    )
    .map_err(|e| ServeError::Authority(e.to_string()))?;
    certs.extend(chain);
    write_public(&paths.authority, pem_certs(&certs).as_bytes())?;
    Ok(paths.authority)
}

fn load_root(
    paths: &DataPaths,
    key: Arc<dyn AuthorityKey>,
    td: &TrustDomain,
    ttl: Duration,
) -> Result<Vec<u8>, ServeError> {
    if paths.root.exists() {
        let text =
            std::fs::read(&paths.root).map_err(io(format!("reading {}", paths.root.display())))?;
        let block = pem::parse(&text)
            .map_err(|e| ServeError::Authority(format!("{}: {e}", paths.root.display())))?;
        let der = block.contents().to_vec();
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| ServeError::Authority(format!("{}: {e}", paths.root.display())))?;
        if cert.public_key().raw != key.spki_der() {
            return Err(ServeError::Authority(format!(
                "{} does not hold the root key's certificate: the key on the token changed; move the file away to \
                 create a new root",
                paths.root.display()
            )));
        }
        if !cert.validity().is_valid() {
            return Err(ServeError::Authority(format!(
                "the root in {} is not valid now (expired?): move it away to create a new one",
                paths.root.display()
            )));
        }
        return Ok(der);
    }
    let mut subject = DistinguishedName::new();
    subject.push(DnType::OrganizationName, "signet");
    subject.push(DnType::CommonName, format!("signet root {td}"));
    let root = Authority::self_signed_root(
        key,
        &RootRequest {
            trust_domain: td.clone(),
            subject,
            ttl,
            path_len: None,
        },
        OffsetDateTime::now_utc(),
    )
    .map_err(|e| ServeError::Authority(format!("cannot create the root: {e}")))?;
    let der = root.cert_der().to_vec();
    write_public(
        &paths.root,
        pem_certs(std::slice::from_ref(&der)).as_bytes(),
    )?;
    tracing::info!(path = %paths.root.display(), "root certificate created");
    Ok(der)
}

/// Issues (or keeps, when it is still good) the X509-SVID for `id` at `cert_path`/`key_path`.
fn service_svid(
    root: &Authority,
    id: &SpiffeId,
    dns: &[String],
    ttl: Duration,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<Vec<u8>>, Vec<u8>), ServeError> {
    if let Some(kept) = reuse_svid(root, id, dns, cert_path, key_path, ttl) {
        return Ok(kept);
    }
    let ttl = ttl.min(
        (root.not_after() - OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or_default(),
    );
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ServeError::Authority(format!("cannot generate a key: {e}")))?;
    let mut req = LeafRequest::from_spki(
        id.clone(),
        &rcgen::PublicKeyData::subject_public_key_info(&kp),
        ttl,
    )
    .map_err(|e| ServeError::Authority(e.to_string()))?;
    req.dns_names = dns.to_vec();
    let issued = root
        .issue_x509_svid(&req, OffsetDateTime::now_utc())
        .map_err(|e| ServeError::Authority(format!("cannot issue the SVID for {id}: {e}")))?;
    let mut chain = vec![issued.der];
    chain.extend(root.chain());
    let key = kp.serialize_der();
    write_private(key_path, kp.serialize_pem().as_bytes())?;
    write_public(cert_path, pem_certs(&chain).as_bytes())?;
    Ok((chain, key))
}

fn reuse_svid(
    root: &Authority,
    id: &SpiffeId,
    dns: &[String],
    cert_path: &Path,
    key_path: &Path,
    ttl: Duration,
) -> Option<(Vec<Vec<u8>>, Vec<u8>)> {
    let chain: Vec<Vec<u8>> = pem::parse_many(std::fs::read(cert_path).ok()?)
        .ok()?
        .into_iter()
        .map(|p| p.contents().to_vec())
        .collect();
    let key = pem::parse(std::fs::read(key_path).ok()?)
        .ok()?
        .contents()
        .to_vec();
    let leaf = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let (_, root_cert) = x509_parser::parse_x509_certificate(root.cert_der()).ok()?;
    cert.verify_signature(Some(root_cert.public_key())).ok()?;
    let left = cert.validity().time_to_expiration()?;
    let has_id = cert
        .subject_alternative_name()
        .ok()??
        .value
        .general_names
        .iter()
        .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == id.as_str()));
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()??
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    let mut wanted = dns.to_vec();
    names.sort();
    wanted.sort();
    if names != wanted {
        return None;
    }
    let kp = rcgen::KeyPair::try_from(key.as_slice()).ok()?;
    let same_key = rcgen::PublicKeyData::subject_public_key_info(&kp) == cert.public_key().raw;
    (has_id && same_key && left.whole_seconds() > i64::try_from(ttl.as_secs() / 2).ok()?)
        .then_some((chain, key))
}

struct Bootstrapped {
    td: TrustDomain,
    paths: DataPaths,
    root_label: String,
    jwt_label: String,
    authority_token: (String, Token),
    single: bool,
    pipeline: Pipeline,
    km_pipeline: Option<Pipeline>,
    root_der: Vec<u8>,
    /// Below an offline root: the CA certificates between `root_der` (signet's intermediate) and the upstream root.
    root_chain: Vec<Vec<u8>>,
    /// Below an offline root: the upstream roots and what installed certificates are checked against.
    external: Option<ExternalParent>,
    server: (Vec<Vec<u8>>, Vec<u8>),
    /// The admin's chain (leaf first).
    admin: Vec<Vec<u8>>,
    keys: KeyStore,
    audit: AuditLog,
    token_names: Vec<String>,
    token_sessions: Vec<(String, u32)>,
}

/// What the datastore says signs now (from an earlier start), if anything.
#[derive(Debug, Default)]
struct Prior {
    /// The active root's label and certificate.
    x509: Option<(String, Vec<u8>)>,
    /// Below an offline root: the chain installed with the active intermediate.
    x509_chain: Vec<Vec<u8>>,
    /// The active JWT key's label.
    jwt: Option<String>,
}

fn bootstrap(
    cfg: &Config,
    embedded: &dyn EmbeddedToken,
    dir: PathBuf,
    prior: Prior,
    external: Option<&ExternalParent>,
) -> Result<Bootstrapped, ServeError> {
    let td = cfg.trust_domain()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    }
    let paths = DataPaths::new(&dir);
    let audit_path = if cfg.server.audit_log.is_absolute() {
        cfg.server.audit_log.clone()
    } else {
        dir.join(&cfg.server.audit_log)
    };
    let audit = AuditLog::open(&audit_path, cfg.server.audit_sync).map_err(io(format!(
        "opening the audit log {}",
        audit_path.display()
    )))?;
    let settings = if cfg.tokens.is_empty() {
        vec![embedded.provision(&dir)?]
    } else {
        cfg.tokens.clone()
    };
    let mut tokens = Vec::new();
    for s in &settings {
        let token = Token::open(&s.token_config()?).map_err(|e| ServeError::Token {
            token: s.name.clone(),
            message: e.to_string(),
        })?;
        tokens.push((s.clone(), token));
    }
    let x509_names: Vec<String> = if cfg.authority.x509.tokens.is_empty() || cfg.tokens.is_empty() {
        settings.iter().map(|s| s.name.clone()).collect()
    } else {
        cfg.authority.x509.tokens.clone()
    };
    let members: Vec<&(TokenSettings, Token)> = tokens
        .iter()
        .filter(|(s, _)| x509_names.contains(&s.name))
        .collect();
    let Some((first_settings, _)) = members.first().copied() else {
        return Err(ServeError::Authority(
            "no token for the X.509 authority".into(),
        ));
    };
    let single = members.len() == 1;
    let x = &cfg.authority.x509;
    let j = &cfg.authority.jwt;
    // After a rotation the active keys are the datastore's, not the configured labels (which name generation 1).
    let root_label = prior
        .x509
        .as_ref()
        .map_or_else(|| x.key_label.clone(), |p| p.0.clone());
    let jwt_label = prior.jwt.clone().unwrap_or_else(|| j.key_label.clone());
    for (s, t) in &members {
        ensure_key(
            t,
            &s.name,
            &root_label,
            x.key_type.token_key_type(),
            single && prior.x509.is_none(),
        )?;
        ensure_key(
            t,
            &s.name,
            &jwt_label,
            j.key_type.token_key_type(),
            single && prior.jwt.is_none(),
        )?;
    }
    // KeyManager keys: on the configured token (the first by default); they share the authority's pipeline when it
    // signs with that token alone, else they get a pipeline of their own.
    let km_name = cfg
        .key_manager
        .token
        .clone()
        .unwrap_or_else(|| first_settings.name.clone());
    let (km_settings, km_token) =
        tokens
            .iter()
            .find(|(s, _)| s.name == km_name)
            .ok_or_else(|| {
                ServeError::Authority(format!("key_manager.token {km_name:?} is not defined"))
            })?;
    let pcfg = cfg.pipeline.pipeline_config()?;
    let pipeline = Pipeline::start(
        pcfg.clone(),
        members
            .iter()
            .map(|(s, t)| TokenMember::new(s.name.clone(), t.clone(), s.sessions))
            .collect(),
    )
    .map_err(|e| ServeError::Authority(format!("cannot start the signing pipeline: {e}")))?;
    let started = (|| {
        let root_key: Arc<dyn AuthorityKey> = Arc::new(
            pipeline
                .key(&root_label)
                .map_err(|e| ServeError::Authority(e.to_string()))?,
        );
        let jwt_key: Arc<dyn AuthorityKey> = Arc::new(
            pipeline
                .key(&jwt_label)
                .map_err(|e| ServeError::Authority(e.to_string()))?,
        );
        let root_der = match &prior.x509 {
            Some((label, cert)) => {
                let (_, c) = x509_parser::parse_x509_certificate(cert)
                    .map_err(|e| ServeError::Authority(format!("the datastore's root: {e}")))?;
                if c.public_key().raw != root_key.spki_der() {
                    return Err(ServeError::Authority(format!(
                        "the key {label:?} on the token is not the datastore's active root's key"
                    )));
                }
                if external.is_some() && c.subject().as_raw() == c.issuer().as_raw() {
                    return Err(ServeError::Authority(format!(
                        "authority.x509.parent = \"external\", but the datastore's active X.509 authority {label:?} is \
                         signet's own self-signed root: an offline root is set up on a fresh datastore and data \
                         directory"
                    )));
                }
                if external.is_none() {
                    write_public(
                        &paths.root,
                        pem_certs(std::slice::from_ref(cert)).as_bytes(),
                    )?;
                }
                (cert.clone(), prior.x509_chain.clone())
            }
            None => match external {
                Some(ext) => load_installed(&paths, root_key.as_ref(), &td, &root_label, ext)?,
                None => (
                    load_root(&paths, root_key.clone(), &td, x.root_ttl.0)?,
                    Vec::new(),
                ),
            },
        };
        let (root_der, root_chain) = root_der;
        let root = Arc::new(
            Authority::new(
                root_der.clone(),
                root_key.clone(),
                td.clone(),
                root_chain.clone(),
                external.map(|e| e.roots.clone()).unwrap_or_default(),
            )
            .map_err(|e| ServeError::Authority(e.to_string()))?,
        );
        let jwt = Arc::new(
            JwtIssuer::new(jwt_key, td.clone(), None, None, j.max_ttl.0)
                .map_err(|e| ServeError::Authority(format!("JWT authority: {e}")))?,
        );
        let svid_ttl = cfg.server.service_svid_ttl.0;
        let server_id = td
            .workload_id(SERVER_ID_PATH)
            .map_err(|e| ServeError::Authority(e.to_string()))?;
        let admin_id = td
            .workload_id(ADMIN_ID_PATH)
            .map_err(|e| ServeError::Authority(e.to_string()))?;
        let server = service_svid(
            &root,
            &server_id,
            &cfg.server.names,
            svid_ttl,
            &paths.server_cert,
            &paths.server_key,
        )?;
        let (admin, _) = service_svid(
            &root,
            &admin_id,
            &[],
            svid_ttl,
            &paths.admin_cert,
            &paths.admin_key,
        )?;
        write_public(&paths.bundle, pem_certs(root.roots()).as_bytes())?;
        // The JWT key was checked by building its issuer; the running issuers come from the datastore's active set.
        drop(jwt);
        Ok::<_, ServeError>((root_der, root_chain, server, admin))
    })();
    let (root_der, root_chain, server, admin) = match started {
        Ok(v) => v,
        Err(e) => {
            pipeline.shutdown();
            return Err(e);
        }
    };
    let km_pipeline = if single && first_settings.name == km_name {
        None
    } else {
        match Pipeline::start(
            pcfg,
            vec![TokenMember::new(
                km_name.clone(),
                km_token.clone(),
                km_settings.sessions,
            )],
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                pipeline.shutdown();
                return Err(ServeError::Authority(format!("key manager pipeline: {e}")));
            }
        }
    };
    let keys = match KeyStore::load(
        km_token.clone(),
        km_pipeline.clone().unwrap_or_else(|| pipeline.clone()),
    ) {
        Ok(k) => k,
        Err(e) => {
            pipeline.shutdown();
            if let Some(p) = &km_pipeline {
                p.shutdown();
            }
            return Err(ServeError::Authority(e.to_string()));
        }
    };
    Ok(Bootstrapped {
        td,
        paths,
        root_label,
        jwt_label,
        authority_token: (first_settings.name.clone(), members[0].1.clone()),
        single,
        pipeline,
        km_pipeline,
        root_der,
        root_chain,
        external: external.cloned(),
        server,
        admin,
        keys,
        audit,
        token_names: settings.iter().map(|s| s.name.clone()).collect(),
        token_sessions: settings
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    u32::try_from(s.sessions).unwrap_or(u32::MAX),
                )
            })
            .collect(),
    })
}

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

    async fn start_inner(
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
            .map_err(|e| ServeError::Authority(e.to_string()))?;
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
                .map_err(|e| ServeError::Authority(e.to_string()))?;
            let prior = prior_of(&store, &td).await?;
            let (cfg2, dir2, emb, ext) =
                (cfg.clone(), dir.clone(), embedded.clone(), external.clone());
            let boot = tokio::task::spawn_blocking(move || {
                bootstrap(&cfg2, emb.as_ref(), dir2, prior, ext.as_ref())
            })
            .await
            .map_err(|e| ServeError::Server(format!("start-up task failed: {e}")))
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
            return Err(ServeError::Authority(e.to_string()));
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
        write_public(
            &boot.paths.bundle,
            pem_certs(&bundle.current().x509_roots).as_bytes(),
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
        let state = Arc::new(
            AppState::new(
                boot.td.clone(),
                policy,
                boot.audit.clone(),
                signers,
                boot.pipeline.clone(),
                bundle,
                boot.keys,
                cfg.server.max_batch,
                cfg.pipeline.default_timeout.0,
                shutdown_rx.clone(),
            )
            .with_token_sessions(boot.token_sessions.clone())
            .with_authorities(authorities.clone())
            .with_replication(replication)
            .with_store(store.clone())
            .with_max_in_flight_per_caller(cfg.server.max_in_flight_per_caller),
        );
        // signet's own credentials: what the listeners present (swapped in place when renewed), held on the root
        // that signed them (it stays in the bundle while they are in use) and reported in the heartbeat.
        let server_cert = Arc::new(
            crate::own::LiveCert::new(&boot.server.0, &boot.server.1)
                .map_err(|e| ServeError::Server(e.to_string()))?,
        );
        let own = Arc::new(crate::own::OwnCredentials::new(
            crate::own::OwnSettings {
                server_id: boot
                    .td
                    .workload_id(SERVER_ID_PATH)
                    .map_err(|e| ServeError::Authority(e.to_string()))?,
                admin_id: boot
                    .td
                    .workload_id(ADMIN_ID_PATH)
                    .map_err(|e| ServeError::Authority(e.to_string()))?,
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
                .map_err(|e| ServeError::Authority(e.to_string()))?;
        }
        if cfg.server.renew_own_credentials {
            background.push(tokio::spawn(own.clone().run(shutdown_rx.clone())));
        }
        let tls_cfg = tls::server_config_live(server_cert.clone(), state.client_trust())
            .map_err(|e| ServeError::Server(e.to_string()))?;
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
                .map_err(|e| ServeError::Server(e.to_string()))?;
            crate::api::join::start_bootstrap(
                listen,
                tls,
                state.clone(),
                refusals.clone(),
                shutdown_rx.clone(),
                &mut background,
            )
            .await
            .map_err(|e| ServeError::Server(e.to_string()))?;
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
            .map_err(|e| ServeError::Server(format!("reflection: {e}")))?;

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
            write_public(&boot.paths.endpoint, addr.to_string().as_bytes())?;
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

    /// The services for callers in this process, authenticated by the admin credential of the data directory
    /// (see [`crate::api::InProcess`]).
    pub fn in_process(&self) -> Result<crate::api::InProcess, ServeError> {
        crate::api::InProcess::new(self.state.clone(), self.paths.admin_cert.clone())
            .map_err(|e| ServeError::Server(e.to_string()))
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
            Ok(Ok(Err(e))) => Err(ServeError::Server(e.to_string())),
            Ok(Err(e)) => Err(ServeError::Server(e.to_string())),
            Err(_) => {
                tracing::warn!(grace = ?self.grace, "requests still in flight after the grace period were cut");
                Ok(())
            }
        }
    }
}

/// The active authorities an earlier start left in the datastore.
async fn prior_of(store: &Store, td: &TrustDomain) -> Result<Prior, ServeError> {
    let rows = store
        .authorities(&td.to_string())
        .await
        .map_err(|e| ServeError::Authority(e.to_string()))?;
    let active = |k: AuthorityKind| {
        rows.iter()
            .find(|r| r.kind == k && r.state == AuthorityState::Active)
    };
    Ok(Prior {
        x509: active(AuthorityKind::X509)
            .and_then(|r| Some((r.label.clone(), r.certificate.clone()?))),
        x509_chain: active(AuthorityKind::X509)
            .map(|r| crate::ca::external::split_ders(r.chain.as_deref().unwrap_or_default()))
            .unwrap_or_default(),
        jwt: active(AuthorityKind::Jwt).map(|r| r.label.clone()),
    })
}

/// The rotation policy the configuration describes.
fn rotation_policy(cfg: &Config, single_token: bool) -> RotationPolicy {
    let x = &cfg.authority.x509;
    let r = &cfg.authority.rotation;
    let mut p = RotationPolicy::new(x.key_label.clone(), cfg.authority.jwt.key_label.clone());
    p.x509_key_type = x.key_type.token_key_type();
    p.jwt_key_type = cfg.authority.jwt.key_type.token_key_type();
    p.root_ttl = x.root_ttl.0;
    p.publish_lead = r.publish_lead.0;
    // The longest life of anything a root signs: SPIRE CAs and X509-SVIDs (capped by the policy's max_ttl),
    // issuing intermediates, and signet's own credentials unless they are renewed while running (then they are
    // re-issued right after activate, and `retire` waits for that through the holds and the replicas' heartbeats
    // instead).
    let policy_max = cfg
        .policy
        .iter()
        .filter_map(|p| p.max_ttl.map(|t| t.0))
        .max()
        .unwrap_or(Duration::from_secs(24 * 3600));
    p.max_x509_issued_ttl = policy_max.max(x.intermediate_ttl.0);
    if !cfg.server.renew_own_credentials {
        p.max_x509_issued_ttl = p.max_x509_issued_ttl.max(cfg.server.service_svid_ttl.0);
    }
    p.max_jwt_issued_ttl = cfg.authority.jwt.max_ttl.0;
    // A new key is generated on one token; with several tokens sharing the load it must be made on each first.
    if !single_token {
        p.cannot_prepare = Some(
            "the X.509 authority signs with several tokens: rotating across several tokens is not supported yet (a \
             new key would be on one token only)"
                .into(),
        );
    }
    p.schedule = (r.schedule && single_token).then_some(Schedule {
        prepare_at: r.prepare_at,
        activate_at: r.activate_at,
    });
    p
}

async fn open_authorities(
    cfg: &Config,
    boot: &Bootstrapped,
    store: Store,
    clock: Arc<dyn crate::ca::Clock>,
) -> Result<Authorities, ServeError> {
    let keyring = Arc::new(TokenKeyring::new(
        boot.authority_token.0.clone(),
        boot.authority_token.1.clone(),
        Some(boot.pipeline.clone()),
    ));
    Authorities::open(
        boot.td.clone(),
        store,
        keyring,
        clock,
        RotationPolicy {
            external: boot.external.clone(),
            ..rotation_policy(cfg, boot.single)
        },
        Initial {
            x509_label: boot.root_label.clone(),
            x509_root: boot.root_der.clone(),
            x509_chain: boot.root_chain.clone(),
            jwt_label: boot.jwt_label.clone(),
        },
    )
    .await
    .map_err(|e| ServeError::Authority(format!("authorities: {e}")))
}

/// The issuers for `set`.
async fn signers_of(
    set: &ActiveSet,
    td: &TrustDomain,
    mode: SigningMode,
    pipeline: &Pipeline,
    jwt_max_ttl: Duration,
) -> Result<Signers, ServeError> {
    let a = &set.x509;
    let authority = |a: &Authority| {
        Authority::new(
            a.cert_der().to_vec(),
            a.key().clone(),
            td.clone(),
            a.intermediates().to_vec(),
            a.roots().to_vec(),
        )
        .map_err(|e| ServeError::Authority(e.to_string()))
    };
    let x509 = X509SvidIssuer::start(authority(a)?, mode, pipeline.cpu().clone())
        .await
        .map_err(|e| ServeError::Authority(format!("X.509 issuer: {e}")))?;
    let (_, jwt_key) = set
        .jwt
        .clone()
        .ok_or_else(|| ServeError::Authority("no active JWT key".into()))?;
    let jwt = JwtIssuer::new(jwt_key, td.clone(), None, None, jwt_max_ttl)
        .map_err(|e| ServeError::Authority(format!("JWT authority: {e}")))?;
    Ok(Signers {
        root: Arc::new(authority(a)?),
        x509,
        jwt: Arc::new(jwt),
    })
}

/// Swaps the issuers in when a rotation step changes what signs, and keeps `bundle.pem` in step with the bundle.
async fn follow_authorities(
    state: Arc<AppState>,
    authorities: Arc<Authorities>,
    mode: SigningMode,
    jwt_max_ttl: Duration,
    bundle_pem: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut active = authorities.subscribe_active();
    let mut bundle = authorities.bundle().subscribe();
    active.borrow_and_update();
    let mut roots = bundle.borrow_and_update().x509_roots.clone();
    loop {
        tokio::select! {
            r = active.changed() => {
                if r.is_err() {
                    return;
                }
                let set = active.borrow_and_update().clone();
                match signers_of(&set, &state.trust_domain, mode.clone(), &state.pipeline, jwt_max_ttl).await {
                    Ok(s) => {
                        state.set_signers(s);
                        tracing::info!("issuers switched to the active authorities");
                    }
                    Err(e) => tracing::error!(error = %e, "cannot switch the issuers to the new authorities"),
                }
            }
            r = bundle.changed() => {
                if r.is_err() {
                    return;
                }
                let now = bundle.borrow_and_update().x509_roots.clone();
                if now == roots {
                    continue;
                }
                roots = now;
                // Readers (the CLI, clients) never see a half-written file: write aside, then rename.
                if let Err(e) = replace_file(&bundle_pem, pem_certs(&roots).as_bytes(), false) {
                    tracing::warn!(error = %e, "cannot update bundle.pem");
                }
            }
            () = crate::shutdown::until_shutdown(&mut shutdown) => return,
        }
    }
}

/// Starts the SPIFFE bundle endpoint (when `[federation] listen` is set) and the pollers of the federated trust
/// domains; returns the endpoint's address.
async fn start_federation(
    cfg: &Config,
    server_cert: &Arc<crate::own::LiveCert>,
    state: &Arc<AppState>,
    shutdown: &watch::Receiver<bool>,
    background: &mut Vec<JoinHandle<()>>,
) -> Result<Option<SocketAddr>, ServeError> {
    use crate::config::EndpointProfile;
    use crate::federation::{consumer, endpoint};
    let f = &cfg.federation;
    let invalid = |m: String| ServeError::Config(ConfigError::Invalid(m));
    let mut bound = None;
    if let Some(listen) = f.listen {
        let tls = match f.profile {
            // The appliance's own server SVID, renewed in place.
            EndpointProfile::HttpsSpiffe => endpoint::tls_config_live(server_cert.clone()),
            _ => {
                let (Some(cert), Some(key)) = (&f.cert, &f.key) else {
                    return Err(invalid(
                        "federation.profile = \"https_web\" needs federation.cert and federation.key".into(),
                    ));
                };
                let (chain, key) =
                    endpoint::load_pem(cert, key).map_err(|e| invalid(format!("federation: {e}")))?;
                endpoint::tls_config(chain, key)
            }
        }
        .map_err(|e| invalid(format!("federation: {e}")))?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(io(format!("listening on {listen} (federation)")))?;
        let a = listener
            .local_addr()
            .map_err(io("reading the bundle endpoint's address"))?;
        background.push(tokio::spawn(endpoint::serve(
            listener,
            tls,
            state.bundle.clone(),
            f.refresh_hint.0,
            shutdown.clone(),
        )));
        tracing::info!(addr = %a, profile = f.profile.name(), "SPIFFE bundle endpoint is serving");
        bound = Some(a);
    }
    let pollers = consumer::start(f, &state.federated, &state.bundle, shutdown)
        .map_err(|e| invalid(e.to_string()))?;
    background.extend(pollers);
    Ok(bound)
}

/// Buckets of the `*_seconds` histograms: 1 ms to 30 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

async fn start_metrics(
    addr: SocketAddr,
    health: HealthBoard,
    background: &mut Vec<JoinHandle<()>>,
) -> Result<SocketAddr, ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(io(format!("metrics listener {addr}")))?;
    let bound = listener.local_addr().map_err(io("metrics listener"))?;
    // Time histograms (`*_seconds`: RPC latency, signing, queue wait) are exported as Prometheus histograms with
    // these buckets, so that percentiles can be aggregated across replicas (`histogram_quantile`).
    let builder = match metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &LATENCY_BUCKETS,
        ) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "latency buckets refused: time histograms are exported as summaries");
            metrics_exporter_prometheus::PrometheusBuilder::new()
        }
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!(
            "a metrics recorder is already installed in this process: /metrics shows nothing of this appliance"
        );
    }
    background.push(tokio::spawn(crate::health::serve(listener, handle, health)));
    Ok(bound)
}

async fn health_loop(
    health: tonic_health::server::HealthReporter,
    board: HealthBoard,
    pipeline: Pipeline,
    mut shutdown: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    let services = [
        "",
        "spire.plugin.server.upstreamauthority.v1.UpstreamAuthority",
        "spire.plugin.server.keymanager.v1.KeyManager",
        "signet.v1.Issuer",
        "signet.v1.Admin",
    ];
    let mut last = None;
    let mut last_out = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let tokens = pipeline.token_status();
        let serving = tokens.iter().any(|t| t.healthy);
        // The gRPC health protocol carries no reason: the plain-HTTP probe and the log say which tokens are out of
        // rotation and why.
        let out: Vec<(String, String)> = tokens
            .iter()
            .filter(|t| !t.healthy)
            .map(|t| {
                let why = t.reason.clone().unwrap_or_else(|| "out of rotation".into());
                (t.name.clone(), why)
            })
            .collect();
        if serving {
            board.serving();
        } else {
            let said: Vec<String> = out.iter().map(|(t, r)| format!("{t}: {r}")).collect();
            board.not_serving(format!("no token in rotation ({})", said.join("; ")));
        }
        if out != last_out {
            for (token, reason) in &out {
                tracing::warn!(token, reason, "health: token out of rotation");
            }
            last_out = out;
        }
        if last != Some(serving) {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for s in services {
                health.set_service_status(s, status).await;
            }
            if last.is_some() {
                tracing::warn!(serving, "health changed");
            }
            last = Some(serving);
        }
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::shutdown::until_shutdown(&mut shutdown) => {
                board.not_serving("shutting down");
                for s in services {
                    health.set_service_status(s, ServingStatus::NotServing).await;
                }
                return;
            }
        }
    }
}
