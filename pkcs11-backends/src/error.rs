//! Errors of the token layer and the classification of PKCS#11 return values (CK_RV) into transient
//! (retry, possibly after re-opening the session or re-initialising the library) and permanent (report).
//!
//! Every [`Error`] has a [`kind`](Error::kind) for callers that branch on what went wrong, and
//! [`is_transient`](Error::is_transient) for callers that only need to know whether to retry. When the
//! error came from the token, the original `cryptoki::error::Error` (and so the CK_RV) is kept as the
//! error's `source()`; [`rv_in_chain`] and [`is_transient_in_chain`] find it by walking `source()`, so
//! they also work on errors of other crates that wrap ours.

use std::error::Error as StdError;
use std::fmt;

pub use cryptoki::error::RvError;

/// What went wrong, for callers that branch on it. New kinds may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The PKCS#11 module could not be found or loaded (missing file, not a PKCS#11 library).
    ModuleLoad,
    /// No token matches the label or serial asked for.
    TokenNotFound,
    /// No free (uninitialised) slot to initialise a token in.
    NoFreeSlot,
    /// The PIN was rejected by the token.
    PinIncorrect,
    /// The PIN is locked or expired: an administrator must act.
    PinLocked,
    /// The PIN could not be obtained from its source (missing env var, unreadable file, no terminal).
    PinUnavailable,
    /// No key with that label (or id) on the token.
    KeyNotFound,
    /// A key with that label already exists (and replacing it was not asked for).
    KeyExists,
    /// More than one key matches the label.
    KeyAmbiguous,
    /// The token cannot do this (mechanism or key size missing from its mechanism list, or the
    /// profile's known limits).
    NotSupported,
    /// The key's type does not fit the algorithm asked for (e.g. an ECDSA signature with an RSA key).
    KeyTypeMismatch,
    /// The value is sensitive or unextractable and the token refused to reveal it (what we want for
    /// private keys).
    Sensitive,
    /// The caller's input is invalid (wrong digest length, bad label, bad encoding).
    InvalidInput,
    /// A transient token, device or session failure: retry, after re-opening the session or
    /// re-initialising the library as [`Error::recovery`] says.
    Transient,
    /// The session or key handle belongs to a library instance that has since been re-initialised:
    /// re-open the session.
    Stale,
    /// Encoding or decoding of DER/ASN.1 failed.
    Encoding,
    /// Any other permanent PKCS#11 failure.
    Pkcs11,
    /// I/O failure (reading a PIN file, writing a configuration).
    Io,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::ModuleLoad => "module load failure",
            ErrorKind::TokenNotFound => "token not found",
            ErrorKind::NoFreeSlot => "no free slot",
            ErrorKind::PinIncorrect => "PIN incorrect",
            ErrorKind::PinLocked => "PIN locked or expired",
            ErrorKind::PinUnavailable => "PIN unavailable",
            ErrorKind::KeyNotFound => "key not found",
            ErrorKind::KeyExists => "key exists",
            ErrorKind::KeyAmbiguous => "key label ambiguous",
            ErrorKind::NotSupported => "not supported by this token",
            ErrorKind::KeyTypeMismatch => "key type mismatch",
            ErrorKind::Sensitive => "sensitive value",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Transient => "transient token failure",
            ErrorKind::Stale => "stale session",
            ErrorKind::Encoding => "encoding failure",
            ErrorKind::Pkcs11 => "PKCS#11 failure",
            ErrorKind::Io => "I/O failure",
        };
        f.write_str(s)
    }
}

/// How to recover from a CK_RV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RvClass {
    /// Transient: retry the same call on the same session (e.g. the device was busy).
    Retry,
    /// Transient: the session is gone or in a bad state; re-open it (`TokenSession::reopen`) and retry.
    ReopenSession,
    /// Transient: the token was removed/re-inserted or the library lost its state; re-initialise the
    /// library (`Token::reinitialize`), then re-open sessions and retry.
    Reinitialize,
    /// Permanent: retrying cannot help; report it.
    Permanent,
}

impl RvClass {
    /// Whether a retry (after the recovery step) may succeed.
    pub fn is_transient(self) -> bool {
        !matches!(self, RvClass::Permanent)
    }
}

/// The classification table. Every CK_RV not listed as transient is permanent.
///
/// Decisions worth explaining:
/// - `CKR_GENERAL_ERROR` is **transient, recovery: re-open the session** (retry once on a fresh
///   session; if it persists, escalate to re-initialising the library or report it). Network HSM
///   clients return it when the link to the appliance dropped, and signing is idempotent, so a bounded
///   retry cannot do harm while calling it permanent would fail requests that a fresh session fixes.
///   But it is not *re-initialise* straight away: SoftHSM2 also answers plain request errors with it
///   (a key-type/mechanism mismatch at C_Sign returns CKR_GENERAL_ERROR, found by our tests), and a
///   re-initialisation disturbs every session in the process. The layer checks key type and
///   algorithm before calling the token, so such requests do not reach it. Callers must bound
///   retries (and must not blindly retry key generation, which is not idempotent).
/// - `CKR_FUNCTION_FAILED` is **transient (retry)**: the spec says the same call may succeed again.
/// - `CKR_SESSION_COUNT` is **transient (retry)**: another session may close; back off first.
/// - `CKR_USER_NOT_LOGGED_IN` and `CKR_OPERATION_ACTIVE` are **transient (re-open)**: a token that was
///   re-inserted forgets the login, and a failed call can leave an operation half-open; a fresh,
///   logged-in session fixes both.
/// - `CKR_CRYPTOKI_NOT_INITIALIZED` is **transient (re-initialise)**: someone finalised the library.
/// - `CKR_HOST_MEMORY` is **transient (retry)**.
/// - PIN errors, key handle/type/mechanism errors, attribute and template errors are **permanent**:
///   they mean the configuration or the request is wrong, and retrying repeats the same answer (and
///   retrying a wrong PIN can lock the token). Key and object handle errors are permanent *for that
///   handle*: a caller that cached it looks the key up again by label once ([`Error::is_stale_handle`]).
pub fn classify_rv(rv: RvError) -> RvClass {
    match rv {
        RvError::DeviceError
        | RvError::DeviceRemoved
        | RvError::TokenNotPresent
        | RvError::CryptokiNotInitialized => RvClass::Reinitialize,
        RvError::GeneralError
        | RvError::SessionClosed
        | RvError::SessionHandleInvalid
        | RvError::UserNotLoggedIn
        | RvError::OperationActive
        | RvError::OperationNotInitialized => RvClass::ReopenSession,
        RvError::DeviceMemory
        | RvError::HostMemory
        | RvError::FunctionFailed
        | RvError::FunctionCanceled
        | RvError::SessionCount
        | RvError::Cancel => RvClass::Retry,
        _ => RvClass::Permanent,
    }
}

/// The first CK_RV found in `err`'s `source()` chain (including `err` itself).
pub fn rv_in_chain(err: &(dyn StdError + 'static)) -> Option<RvError> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(cryptoki::error::Error::Pkcs11(rv, _)) =
            e.downcast_ref::<cryptoki::error::Error>()
        {
            return Some(*rv);
        }
        cur = e.source();
    }
    None
}

/// Whether `err` (of any type) is a transient token failure, by walking its `source()` chain for one
/// of our [`Error`]s or a `cryptoki` error with a CK_RV.
pub fn is_transient_in_chain(err: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(ours) = e.downcast_ref::<Error>() {
            return ours.is_transient();
        }
        if let Some(cryptoki::error::Error::Pkcs11(rv, _)) =
            e.downcast_ref::<cryptoki::error::Error>()
        {
            return classify_rv(*rv).is_transient();
        }
        cur = e.source();
    }
    false
}

/// An error of the token layer. The PIN never appears in it.
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// A new error of `kind` with a message and a source.
    pub fn with_source(
        kind: ErrorKind,
        message: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        Error {
            kind,
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// An error from a cryptoki call, classified by its CK_RV; `what` says what we were doing.
    pub fn pkcs11(what: impl Into<String>, err: cryptoki::error::Error) -> Self {
        let kind = match &err {
            cryptoki::error::Error::LibraryLoading(_)
            | cryptoki::error::Error::MissingSymbol(_) => ErrorKind::ModuleLoad,
            cryptoki::error::Error::Pkcs11(rv, _) => kind_of_rv(*rv),
            cryptoki::error::Error::NotSupported => ErrorKind::NotSupported,
            _ => ErrorKind::Pkcs11,
        };
        Error {
            kind,
            message: what.into(),
            source: Some(Box::new(err)),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The CK_RV behind this error, if it came from the token.
    pub fn rv(&self) -> Option<RvError> {
        rv_in_chain(self)
    }

    /// How to recover: from the CK_RV when there is one, else from the kind.
    pub fn recovery(&self) -> RvClass {
        if let Some(rv) = self.rv() {
            return classify_rv(rv);
        }
        match self.kind {
            ErrorKind::Transient => RvClass::Retry,
            ErrorKind::Stale => RvClass::ReopenSession,
            _ => RvClass::Permanent,
        }
    }

    /// Whether retrying (after [`recovery`](Self::recovery)'s step) may succeed.
    pub fn is_transient(&self) -> bool {
        self.recovery().is_transient()
    }

    /// Whether the token no longer knows an object handle the caller cached (`CKR_KEY_HANDLE_INVALID`,
    /// `CKR_OBJECT_HANDLE_INVALID`), as after an HSM cluster failed over to a member that numbers its objects
    /// differently. The error stays permanent for the call that got it ([`classify_rv`]); a caller that cached
    /// the handle should drop it, find the object again by its label and retry once.
    pub fn is_stale_handle(&self) -> bool {
        matches!(
            self.rv(),
            Some(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid)
        )
    }
}

/// The kind for a CK_RV.
pub(crate) fn kind_of_rv(rv: RvError) -> ErrorKind {
    match rv {
        RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange => {
            ErrorKind::PinIncorrect
        }
        RvError::PinLocked | RvError::PinExpired => ErrorKind::PinLocked,
        RvError::MechanismInvalid
        | RvError::MechanismParamInvalid
        | RvError::CurveNotSupported
        | RvError::KeySizeRange
        | RvError::FunctionNotSupported
        | RvError::DomainParamsInvalid => ErrorKind::NotSupported,
        RvError::KeyTypeInconsistent | RvError::KeyFunctionNotPermitted => {
            ErrorKind::KeyTypeMismatch
        }
        RvError::AttributeSensitive | RvError::KeyUnextractable | RvError::InformationSensitive => {
            ErrorKind::Sensitive
        }
        RvError::DataLenRange | RvError::DataInvalid | RvError::ArgumentsBad => {
            ErrorKind::InvalidInput
        }
        rv if classify_rv(rv).is_transient() => ErrorKind::Transient,
        _ => ErrorKind::Pkcs11,
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(rv) = self.rv() {
            write!(f, ": {} ({rv:?})", self.kind)?;
        } else if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl From<der::Error> for Error {
    fn from(e: der::Error) -> Self {
        Error::with_source(ErrorKind::Encoding, "DER encoding failed", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table, spelled out: each row is (CK_RV, expected class).
    const TABLE: &[(RvError, RvClass)] = &[
        (RvError::DeviceError, RvClass::Reinitialize),
        (RvError::DeviceRemoved, RvClass::Reinitialize),
        (RvError::TokenNotPresent, RvClass::Reinitialize),
        (RvError::GeneralError, RvClass::ReopenSession),
        (RvError::CryptokiNotInitialized, RvClass::Reinitialize),
        (RvError::SessionClosed, RvClass::ReopenSession),
        (RvError::SessionHandleInvalid, RvClass::ReopenSession),
        (RvError::UserNotLoggedIn, RvClass::ReopenSession),
        (RvError::OperationActive, RvClass::ReopenSession),
        (RvError::DeviceMemory, RvClass::Retry),
        (RvError::HostMemory, RvClass::Retry),
        (RvError::FunctionFailed, RvClass::Retry),
        (RvError::SessionCount, RvClass::Retry),
        (RvError::PinIncorrect, RvClass::Permanent),
        (RvError::PinLocked, RvClass::Permanent),
        (RvError::PinExpired, RvClass::Permanent),
        (RvError::PinInvalid, RvClass::Permanent),
        (RvError::KeyHandleInvalid, RvClass::Permanent),
        (RvError::ObjectHandleInvalid, RvClass::Permanent),
        (RvError::MechanismInvalid, RvClass::Permanent),
        (RvError::MechanismParamInvalid, RvClass::Permanent),
        (RvError::KeyTypeInconsistent, RvClass::Permanent),
        (RvError::KeyFunctionNotPermitted, RvClass::Permanent),
        (RvError::AttributeSensitive, RvClass::Permanent),
        (RvError::TemplateIncomplete, RvClass::Permanent),
        (RvError::TemplateInconsistent, RvClass::Permanent),
        (RvError::DataLenRange, RvClass::Permanent),
        (RvError::TokenWriteProtected, RvClass::Permanent),
        (RvError::SlotIdInvalid, RvClass::Permanent),
        (RvError::ArgumentsBad, RvClass::Permanent),
        (RvError::CurveNotSupported, RvClass::Permanent),
    ];

    #[test]
    fn classification_table() {
        for (rv, class) in TABLE {
            assert_eq!(classify_rv(*rv), *class, "{rv:?}");
        }
    }

    fn err_of(rv: RvError) -> Error {
        Error::pkcs11(
            "signing",
            cryptoki::error::Error::Pkcs11(rv, cryptoki::context::Function::Sign),
        )
    }

    #[test]
    fn error_transience_and_kind_follow_rv() {
        let e = err_of(RvError::DeviceRemoved);
        assert!(e.is_transient());
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert_eq!(e.recovery(), RvClass::Reinitialize);
        assert_eq!(e.rv(), Some(RvError::DeviceRemoved));

        let e = err_of(RvError::PinIncorrect);
        assert!(!e.is_transient());
        assert_eq!(e.kind(), ErrorKind::PinIncorrect);

        let e = err_of(RvError::MechanismInvalid);
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        assert!(e.to_string().contains("not supported by this token"), "{e}");
        let e = err_of(RvError::KeyTypeInconsistent);
        assert_eq!(e.kind(), ErrorKind::KeyTypeMismatch);
    }

    #[derive(Debug)]
    struct Wrapper(Error);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn classification_found_through_source_chain() {
        let w = Wrapper(err_of(RvError::SessionHandleInvalid));
        assert!(is_transient_in_chain(&w));
        assert_eq!(rv_in_chain(&w), Some(RvError::SessionHandleInvalid));
        let w = Wrapper(err_of(RvError::KeyHandleInvalid));
        assert!(!is_transient_in_chain(&w));
        let w = Wrapper(Error::new(ErrorKind::Stale, "stale"));
        assert!(is_transient_in_chain(&w));
        let io = std::io::Error::other("x");
        assert!(!is_transient_in_chain(&io));
    }
}
