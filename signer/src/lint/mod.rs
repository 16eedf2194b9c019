//! Pre-issuance lint: the shared failure type and the metric every failed check increments.
//!
//! The X.509 checks live in [`crate::lint::x509`], the JWT checks in [`crate::jwt`]; both run on the exact bytes
//! that are about to be signed, before the key signs them. A failure is an error naming the rule (a rule of
//! the SPIFFE standards, RFC 5280 or RFC 7515); nothing is ever fixed silently.
//!
//! Rules (the `rule` label of `signet_lint_failures_total`):
//!
//! | rule | checks |
//! |---|---|
//! | `x509.der`, `x509.version` | the TBS parses, v3 |
//! | `x509.serial` | positive, non-zero, >= 64 bits, <= 20 octets |
//! | `x509.signature-algorithm` | the TBS names the algorithm the issuer key signs with |
//! | `x509.issuer-name` | issuer name byte-identical to the issuer's subject (issuer == subject for roots) |
//! | `x509.subject` | a copied subject (SPIRE's CA) is byte-identical to the request's |
//! | `x509.validity`, `x509.not-after-beyond-issuer` | NotBefore < NotAfter <= the issuer's NotAfter |
//! | `x509.subject-key` | the requested key, of an accepted kind |
//! | `x509.extension-duplicate`, `x509.extension-unexpected` | SAN, KU, EKU, BC, SKI, AKI only, each once |
//! | `x509.uri-san-count`, `x509.spiffe-id`, `x509.trust-domain` | exactly one URI SAN, a valid SPIFFE ID of the TD |
//! | `x509.leaf.uri-san-path`, `x509.ca.uri-san-path` | leaves have a path, CAs are `spiffe://<td>` exactly |
//! | `x509.san-type`, `x509.san-critical` | only URI (+ DNS on leaves); SAN critical when the subject is empty |
//! | `x509.basic-constraints`, `x509.path-len` | critical, cA per profile, pathlen as configured, never 0 on a root |
//! | `x509.key-usage`, `x509.eku` | critical KU per profile; leaves server+client auth EKU, CAs none |
//! | `x509.ski`, `x509.aki` | SKI on CAs; AKI = issuer SKI on everything below a root |
//! | `jwt.json`, `jwt.header-members`, `jwt.alg`, `jwt.kid`, `jwt.typ` | header is exactly alg/kid/typ, matching the key |
//! | `jwt.claims-members`, `jwt.sub`, `jwt.aud`, `jwt.exp` | only sub/aud/exp/iat; workload sub; aud array; exp bounded |

pub mod jwt;
pub mod x509;

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
