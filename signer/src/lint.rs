//! Pre-issuance lint: the shared failure type and the metric every failed check increments.
//!
//! The X.509 checks live in [`crate::x509::lint`], the JWT checks in [`crate::jwt`]; both run on the exact bytes
//! that are about to be signed, before the key signs them. A failure is an error naming the rule (a rule of
//! spiffe-rules / RFC 5280 / RFC 7515); nothing is ever fixed silently.

/// Counter incremented once per lint failure, labelled `rule`.
pub const LINT_FAILURES_METRIC: &str = "signet_lint_failures_total";

/// A to-be-signed credential broke a rule; it was not signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pre-issuance lint failed, rule {rule}: {detail}")]
pub struct LintFailure {
    /// The rule's stable name, e.g. `x509.leaf.uri-san-count`.
    pub rule: &'static str,
    /// What exactly was wrong.
    pub detail: String,
}

impl LintFailure {
    /// Record a failure of `rule` (incrementing the metric) and return it.
    pub fn record(rule: &'static str, detail: impl Into<String>) -> Self {
        metrics::counter!(LINT_FAILURES_METRIC, "rule" => rule).increment(1);
        let failure = Self {
            rule,
            detail: detail.into(),
        };
        tracing::warn!(rule, detail = %failure.detail, "pre-issuance lint failed; nothing was signed");
        failure
    }
}

/// `Err(LintFailure::record(..))` unless `ok`.
pub(crate) fn ensure(
    ok: bool,
    rule: &'static str,
    detail: impl FnOnce() -> String,
) -> Result<(), LintFailure> {
    if ok {
        Ok(())
    } else {
        Err(LintFailure::record(rule, detail()))
    }
}
