//! Why the appliance did not start or stopped badly: [`ServeError`], the one error type of `serve`. Each kind says
//! what was being done and carries the error of the layer that failed as its `source()`; where that layer reports
//! a message only (a `String`), the message is kept as the kind's `reason`.

use std::path::PathBuf;

use crate::ca::RotationError;
use crate::config::ConfigError;
use crate::datadir::FileError;
use crate::jwt::JwtError;
use crate::pipeline::{PipelineError, SvidError};
use crate::spiffe::SpiffeIdError;
use crate::store::StoreError;
use crate::x509::{CsrError, IssueError};

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

    // The tokens.
    /// A token could not be opened or used.
    #[error("token {token:?}: {source}")]
    Token {
        /// The token's name.
        token: String,
        /// What the token layer said.
        #[source]
        source: signet_pkcs11::Error,
    },
    /// The embedded token could not be created.
    #[error("token \"embedded\": cannot initialise the embedded token: {0}")]
    EmbeddedToken(#[source] signet_pkcs11::Error),
    /// The system random generator failed (making the embedded token's PINs).
    #[error("the system random generator failed")]
    Random,
    /// A key on a token is of another type than the configuration asks for.
    #[error(
        "token {token:?}: key {label:?} is {found} but the configuration asks for {wanted}: fix key_type or use \
         another label"
    )]
    KeyType {
        /// The token's name.
        token: String,
        /// The key's label.
        label: String,
        /// The key's type on the token.
        found: &'static str,
        /// The configured type.
        wanted: &'static str,
    },
    /// A key is missing and this start may not generate it (several tokens share the authority, or the datastore
    /// says the key exists).
    #[error(
        "token {token:?}: key {label:?} is missing: with several tokens, create it on each (signet token keygen) \
         first"
    )]
    KeyMissing {
        /// The token's name.
        token: String,
        /// The key's label.
        label: String,
    },
    /// A key could not be generated on the token.
    #[error("token {token:?}: cannot generate {label:?}: {source}")]
    KeyGeneration {
        /// The token's name.
        token: String,
        /// The key's label.
        label: String,
        /// What the token layer said.
        #[source]
        source: signet_pkcs11::Error,
    },
    /// No configured token signs for the X.509 authority.
    #[error("no token for the X.509 authority")]
    NoX509Token,
    /// `key_manager.token` names no configured token.
    #[error("key_manager.token {0:?} is not defined")]
    UnknownKeyManagerToken(String),
    /// A signing pipeline could not be started, or has no key of that label.
    #[error("{what}: {source}")]
    Pipeline {
        /// What was being done.
        what: String,
        /// The pipeline's error.
        #[source]
        source: PipelineError,
    },
    /// The SPIRE KeyManager keys could not be loaded or attached to the datastore.
    #[error("KeyManager keys: {reason}")]
    KeyStore {
        /// What the key store said.
        reason: String,
    },

    // The datastore and the authorities' life cycle.
    /// The datastore failed.
    #[error("{what}: {source}")]
    Store {
        /// What was being done.
        what: &'static str,
        /// The datastore's error.
        #[source]
        source: StoreError,
    },
    /// The authorities' life cycle could not be opened on the datastore.
    #[error("authorities: {0}")]
    Authorities(#[source] RotationError),
    /// The key the datastore names as the active root's is another key on the token.
    #[error("the key {label:?} on the token is not the datastore's active root's key")]
    RootKeyMismatch {
        /// The key's label.
        label: String,
    },
    /// The configuration asks for an offline root, but the datastore's active authority is signet's own root.
    #[error(
        "authority.x509.parent = \"external\", but the datastore's active X.509 authority {label:?} is signet's own \
         self-signed root: an offline root is set up on a fresh datastore and data directory"
    )]
    OwnRootNotExternal {
        /// The active authority's label.
        label: String,
    },
    /// The datastore names no active JWT key.
    #[error("no active JWT key")]
    NoJwtKey,

    // Certificates.
    /// A certificate or CSR could not be made or issued.
    #[error("{what}: {source}")]
    Issue {
        /// What was being made.
        what: String,
        /// The issuance error.
        #[source]
        source: IssueError,
    },
    /// A key for one of signet's own credentials could not be generated.
    #[error("cannot generate a key: {0}")]
    OwnKey(#[source] rcgen::Error),
    /// signet's own SPIFFE IDs (server, admin) are not valid in the trust domain.
    #[error("signet's own SPIFFE ID: {0}")]
    OwnId(#[source] SpiffeIdError),
    /// signet's own credentials could not be adopted or presented.
    #[error("signet's own credentials: {reason}")]
    OwnCredentials {
        /// What `own` said.
        reason: String,
    },
    /// A file of the data directory is not PEM.
    #[error("{}: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The PEM error.
        #[source]
        source: pem::PemError,
    },
    /// A certificate does not parse.
    #[error("{what}: {source}")]
    Certificate {
        /// Which certificate.
        what: String,
        /// The parser's error.
        #[source]
        source: x509_parser::nom::Err<x509_parser::error::X509Error>,
    },
    /// The CSR in the data directory does not parse or its signature does not verify.
    #[error("{}: {source}", path.display())]
    Csr {
        /// The file.
        path: PathBuf,
        /// The CSR check's error.
        #[source]
        source: CsrError,
    },
    /// `root.pem` holds a certificate of another key than the one on the token.
    #[error(
        "{} does not hold the root key's certificate: the key on the token changed; move the file away to create a \
         new root",
        path.display()
    )]
    RootKeyChanged {
        /// `root.pem`.
        path: PathBuf,
    },
    /// `root.pem` is not valid now.
    #[error("the root in {} is not valid now (expired?): move it away to create a new one", path.display())]
    RootNotValid {
        /// `root.pem`.
        path: PathBuf,
    },
    /// The X.509 issuer of the active authority could not be started.
    #[error("X.509 issuer: {0}")]
    X509Issuer(#[source] SvidError),
    /// The JWT issuer of the active key could not be built.
    #[error("JWT authority: {0}")]
    Jwt(#[source] JwtError),

    // Below an offline root.
    /// The upstream roots (`authority.x509.upstream_roots`) cannot be used.
    #[error("{reason}")]
    UpstreamRoots {
        /// What is wrong with them.
        reason: String,
    },
    /// The authority's certificate from the offline root is refused (wrong key, wrong parent, expired, not PEM …).
    #[error("{what} is refused: {reason}")]
    CertificateRefused {
        /// Which certificate (the ceremony's, or the installed file).
        what: String,
        /// Why.
        reason: String,
    },
    /// Below an offline root, on the first start: the authority's certificate is not installed yet (the CSR is
    /// written; the message says where and what to run).
    #[error("{0}")]
    AwaitingCertificate(String),

    // The servers.
    /// The TLS configuration of a listener could not be built.
    #[error("{what}: {reason}")]
    Tls {
        /// Which listener.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The bootstrap port (join tokens) could not be started.
    #[error("the bootstrap port: {reason}")]
    Bootstrap {
        /// Why.
        reason: String,
    },
    /// The gRPC reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The credential for callers in this process could not be read.
    #[error("the in-process caller: {reason}")]
    InProcess {
        /// Why.
        reason: String,
    },
    /// A task of the start or the gRPC server's task failed (panicked or was cancelled).
    #[error("{what} failed: {source}")]
    Task {
        /// Which task.
        what: &'static str,
        /// The join error.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Server(#[source] tonic::transport::Error),
}

impl From<FileError> for ServeError {
    fn from(e: FileError) -> Self {
        ServeError::Io {
            what: e.what,
            source: e.source,
        }
    }
}

pub(super) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// The datastore failed while doing `what`.
pub(super) fn datastore(what: &'static str) -> impl FnOnce(StoreError) -> ServeError {
    move |source| ServeError::Store { what, source }
}
