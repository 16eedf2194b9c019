//! The one place where errors become gRPC statuses: each error kind of the layers below (policy refusals, the
//! pipeline, issuance, X509-SVID and JWT-SVID issuance, rotation steps, token failures, a client that is not
//! authenticated, a CSR without a readable SPIFFE ID) maps to its status code here, by kind, so every service
//! answers the same failure the same way. [`code_name`] names a code for the audit log and metrics.

use tonic::{Code, Status};

use crate::jwt::JwtError;
use crate::pipeline::{PipelineError, SvidError};
use crate::policy::Denied;
use crate::x509::IssueError;

/// The gRPC status of a policy refusal.
pub fn denied_status(d: &Denied) -> Status {
    match d {
        Denied::RateLimited { .. } | Denied::BeyondBurst { .. } => {
            Status::resource_exhausted(d.to_string())
        }
        _ => Status::permission_denied(d.to_string()),
    }
}

/// The gRPC status of a pipeline failure.
pub fn pipeline_status(e: &PipelineError) -> Status {
    let m = e.to_string();
    match e {
        PipelineError::Overloaded { .. } => Status::resource_exhausted(m),
        PipelineError::DeadlineExceeded => Status::deadline_exceeded(m),
        PipelineError::Unavailable { .. } | PipelineError::ShuttingDown => Status::unavailable(m),
        PipelineError::Key(_) => Status::failed_precondition(m),
        PipelineError::InvalidRequest(_) => Status::invalid_argument(m),
        _ => Status::internal(m),
    }
}

/// The gRPC status of an issuance failure.
pub fn issue_status(e: &IssueError) -> Status {
    if let Some(p) = PipelineError::in_chain(e) {
        return pipeline_status(&p);
    }
    let m = e.to_string();
    match e {
        IssueError::Csr(_)
        | IssueError::SpiffeId(_)
        | IssueError::MissingSpiffeId
        | IssueError::BadDnsName(_)
        | IssueError::InvalidTtl(_)
        | IssueError::TtlExceedsIssuer { .. }
        | IssueError::Lint(_) => Status::invalid_argument(m),
        IssueError::Key(k) if k.is_transient() => Status::unavailable(m),
        IssueError::Authority(_) => Status::failed_precondition(m),
        IssueError::PathLenBeyondPolicy { .. } => Status::permission_denied(m),
        _ => Status::internal(m),
    }
}

/// The gRPC status of an X509-SVID failure.
pub fn svid_status(e: &SvidError) -> Status {
    match e {
        SvidError::Issue(i) => issue_status(i),
        SvidError::Pipeline(p) => pipeline_status(p),
    }
}

/// The gRPC status of a JWT-SVID failure.
pub fn jwt_status(e: &JwtError) -> Status {
    if let Some(p) = PipelineError::in_chain(e) {
        return pipeline_status(&p);
    }
    let m = e.to_string();
    match e {
        JwtError::SpiffeId(_) | JwtError::Audience(_) | JwtError::Ttl(_) | JwtError::Lint(_) => {
            Status::invalid_argument(m)
        }
        JwtError::Key(k) if k.is_transient() => Status::unavailable(m),
        _ => Status::internal(m),
    }
}

/// The gRPC status of a client that is not authenticated: UNAUTHENTICATED when the client's credential is at
/// fault; INTERNAL when signet cannot build the trust of its own bundle's roots.
pub fn auth_status(e: &crate::api::tls::AuthError) -> Status {
    use crate::api::tls::AuthError as E;
    match e {
        E::Trust(_) => Status::internal(e.to_string()),
        _ => Status::unauthenticated(e.to_string()),
    }
}

/// The gRPC status of a CSR whose SPIFFE ID cannot be read: the caller's request is at fault.
pub fn csr_id_status(e: &crate::api::issuer::CsrIdError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The canonical name of a gRPC code, for the audit log.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The gRPC status of a refused or failed rotation step.
pub fn rotation_status(e: &crate::ca::RotationError) -> Status {
    use crate::ca::RotationError as E;
    match e {
        E::Precondition(_) | E::TooEarly { .. } => Status::failed_precondition(e.to_string()),
        E::NotFound(_) => Status::not_found(e.to_string()),
        E::Refused(_) | E::NotInstallable(_) => Status::invalid_argument(e.to_string()),
        E::Token(_) => Status::unavailable(format!("{e}; nothing was changed")),
        E::Store(_) | E::NotRecorded(_) => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// The gRPC status of a token failure while managing keys, by what went wrong: a transient failure (device busy or
/// unplugged, session lost) is UNAVAILABLE, the one answer SPIRE retries; a key type or mechanism the token cannot
/// do is UNIMPLEMENTED; a token that is not usable as configured (PIN wrong, locked or missing, token or module
/// missing) is FAILED_PRECONDITION; anything else permanent (a template the token refuses, a key it will not show)
/// is INTERNAL. Retrying any of those repeats the answer, and SPIRE retries UNAVAILABLE without end.
pub fn token_status(e: &signet_pkcs11::Error, what: &str) -> Status {
    use signet_pkcs11::ErrorKind as K;
    let m = format!("{what}: {e}");
    if e.is_transient() {
        return Status::unavailable(m);
    }
    match e.kind() {
        K::NotSupported => Status::unimplemented(m),
        K::PinIncorrect
        | K::PinLocked
        | K::PinUnavailable
        | K::TokenNotFound
        | K::ModuleLoad
        | K::KeyNotFound => Status::failed_precondition(m),
        _ => Status::internal(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tls::{AuthError, TlsError};
    use crate::spiffe::TrustDomain;
    use tokio_rustls::rustls;

    #[test]
    fn authentication_failures_map_by_kind() {
        let td = TrustDomain::parse("example.org").unwrap();
        let s = auth_status(&AuthError::NoCertificate { trust_domain: td });
        assert_eq!(s.code(), Code::Unauthenticated);
        assert!(
            s.message().starts_with("no client certificate"),
            "{}",
            s.message()
        );
        // signet's own bundle at fault, not the client.
        let s = auth_status(&AuthError::Trust(TlsError::Config(rustls::Error::General(
            "x".into(),
        ))));
        assert_eq!(s.code(), Code::Internal);
        let s = csr_id_status(&crate::api::issuer::CsrIdError::NoSpiffeId);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("no URI SAN"), "{}", s.message());
    }
}
