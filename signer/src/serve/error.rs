//! Why the appliance did not start or stopped badly: [`ServeError`], the one error type of `serve`.

use crate::config::ConfigError;
use crate::datadir::FileError;

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

pub(super) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}
