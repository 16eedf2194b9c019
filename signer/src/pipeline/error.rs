//! The pipeline's error: what happened to a job, and whether a retry may help.

use std::time::Duration;

/// Why a job submitted to the pipeline did not produce a signature.
///
/// [`is_retryable`](Self::is_retryable) says whether the same request may succeed later: `Overloaded`,
/// `DeadlineExceeded`, `Unavailable` and `ShuttingDown` are (elsewhere or after a pause); key, mechanism and request
/// errors are not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The queue is full: the job was refused at once, nothing was queued. Retry after a pause.
    #[error(
        "the signing queue is full ({capacity} jobs): retry after a short pause or lower the offered load"
    )]
    Overloaded {
        /// The queue's capacity.
        capacity: usize,
    },
    /// The job's deadline passed (or the caller gave up) before a token signed it; nothing was signed for it.
    #[error("the deadline passed before a token signed the job")]
    DeadlineExceeded,
    /// No token can sign now (all are out of rotation, or the job failed on every attempt with transient errors).
    #[error("no token can sign now: {reason}; retry after {retry_after:?}")]
    Unavailable {
        /// What went wrong last.
        reason: String,
        /// A hint for when to retry.
        retry_after: Duration,
    },
    /// The pipeline is shutting down (or has shut down): the job was not signed.
    #[error("the signing pipeline is shutting down: the job was not signed")]
    ShuttingDown,
    /// The token refused permanently (wrong key type or mechanism, missing key, PIN): retrying repeats the answer.
    #[error("the token cannot sign this job: {0}")]
    Key(String),
    /// The request itself is malformed (digest length, algorithm not fitting the key).
    #[error("invalid signing request: {0}")]
    InvalidRequest(String),
    /// A signature returned by the token failed the check against the public key: nothing leaves.
    #[error(
        "the token returned a signature that does not verify against the key's public key ({0}); the token is \
         faulty and nothing was issued"
    )]
    PostSignCheck(String),
    /// The pipeline failed internally while it held the job (an HSM worker or a CPU task panicked; the worker was
    /// replaced). The job was answered rather than lost; whether a signature was made for it is unknown, and none
    /// is returned.
    #[error("internal error in the signing pipeline: {0}; no signature is returned for this job")]
    Internal(String),
}

impl PipelineError {
    /// Whether the same request may succeed if retried (later, or elsewhere).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            PipelineError::Overloaded { .. }
                | PipelineError::DeadlineExceeded
                | PipelineError::Unavailable { .. }
                | PipelineError::ShuttingDown
        )
    }

    /// A short stable name, used as the `outcome` label of the jobs metric.
    pub fn outcome(&self) -> &'static str {
        match self {
            PipelineError::Overloaded { .. } => "overloaded",
            PipelineError::DeadlineExceeded => "deadline_exceeded",
            PipelineError::Unavailable { .. } => "unavailable",
            PipelineError::ShuttingDown => "shutting_down",
            PipelineError::Key(_) => "key_error",
            PipelineError::InvalidRequest(_) => "invalid_request",
            PipelineError::PostSignCheck(_) => "post_sign_check",
            PipelineError::Internal(_) => "internal",
        }
    }

    /// Finds a pipeline error in `err`'s `source()` chain (e.g. inside a [`KeyError`](crate::keys::KeyError) that a
    /// [`PipelineKey`](super::PipelineKey) returned through the issuance core).
    pub fn in_chain(err: &(dyn std::error::Error + 'static)) -> Option<PipelineError> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(p) = e.downcast_ref::<PipelineError>() {
                return Some(p.clone());
            }
            cur = e.source();
        }
        None
    }
}
