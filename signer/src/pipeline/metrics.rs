//! Metric names of the pipeline (`metrics` crate; exported by whatever recorder the process installs).
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `signet_pipeline_queue_depth` | gauge | | jobs waiting in the queue (sampled per batch and per submit refusal) |
//! | `signet_pipeline_queue_capacity` | gauge | | most jobs the queue holds (`pipeline.queue_capacity`; set at start) |
//! | `signet_pipeline_batch_size` | histogram | | jobs a worker took in one wake-up |
//! | `signet_pipeline_sign_seconds` | histogram | `token` | time of one C_Sign on that token |
//! | `signet_pipeline_queue_wait_seconds` | histogram | | time from submit to a worker picking the job |
//! | `signet_pipeline_reply_seconds` | histogram | | digest signatures (`submit_digest`): time from the worker's answer to the awaiting task running again (the hand-off back) |
//! | `signet_pipeline_digest_check_seconds` | histogram | | digest signatures: the post-sign check, from the hand-off to the CPU pool to its answer |
//! | `signet_pipeline_jobs_total` | counter | `outcome` | jobs by how they ended (`ok`, `overloaded`, `deadline_exceeded`, `abandoned`, `unavailable`, `shutting_down`, `key_error`, `invalid_request`, `post_sign_check`, `internal`) |
//! | `signet_pipeline_token_healthy` | gauge | `token` | 1 while the token is in rotation, 0 while it is out |
//! | `signet_pipeline_token_sessions` | gauge | `token` | HSM worker sessions of the token (set at start) |
//! | `signet_pipeline_token_busy_workers` | gauge | `token` | workers of the token handling a batch now |
//! | `signet_pipeline_token_failures_total` | counter | `token` | transient failures seen on the token |
//! | `signet_pipeline_token_bad_signatures_total` | counter | `token` | signatures by the token that failed a post-sign check |
//! | `signet_pipeline_worker_panics_total` | counter | `token` | HSM workers of the token that panicked (and were replaced) |
//! | `signet_pipeline_cpu_refused_total` | counter | | CPU-pool tasks refused because its queue was full |
//! | `signet_pipeline_digest_verified_total` | counter | | bare-digest signatures checked after signing |
//! | `signet_pipeline_intermediate_rotations_total` | counter | | delegated-mode issuing intermediates minted |

use metrics::{Counter, Gauge, Histogram};

/// Queue depth gauge.
pub const QUEUE_DEPTH: &str = "signet_pipeline_queue_depth";
/// Queue capacity gauge.
pub const QUEUE_CAPACITY: &str = "signet_pipeline_queue_capacity";
/// Worker sessions per token, label `token`.
pub const TOKEN_SESSIONS: &str = "signet_pipeline_token_sessions";
/// Workers of a token busy with a batch, label `token`.
pub const TOKEN_BUSY_WORKERS: &str = "signet_pipeline_token_busy_workers";
/// Batch size histogram.
pub const BATCH_SIZE: &str = "signet_pipeline_batch_size";
/// Sign latency histogram, label `token`.
pub const SIGN_SECONDS: &str = "signet_pipeline_sign_seconds";
/// Queue wait histogram.
pub const QUEUE_WAIT_SECONDS: &str = "signet_pipeline_queue_wait_seconds";
/// Reply hand-off histogram (digest signatures).
pub const REPLY_SECONDS: &str = "signet_pipeline_reply_seconds";
/// Post-sign check histogram (digest signatures).
pub const DIGEST_CHECK_SECONDS: &str = "signet_pipeline_digest_check_seconds";
/// Jobs by outcome, label `outcome`.
pub const JOBS: &str = "signet_pipeline_jobs_total";
/// Token health gauge, label `token`.
pub const TOKEN_HEALTHY: &str = "signet_pipeline_token_healthy";
/// Transient failures per token, label `token`.
pub const TOKEN_FAILURES: &str = "signet_pipeline_token_failures_total";
/// Signatures that failed a post-sign check, label `token` (`max_bad_signatures` of them since the token last
/// entered rotation take it out).
pub const TOKEN_BAD_SIGNATURES: &str = "signet_pipeline_token_bad_signatures_total";
/// HSM worker panics, label `token`.
pub const WORKER_PANICS: &str = "signet_pipeline_worker_panics_total";
/// CPU-pool refusals.
pub const CPU_REFUSED: &str = "signet_pipeline_cpu_refused_total";
/// Bare-digest signatures verified after signing.
pub const DIGEST_VERIFIED: &str = "signet_pipeline_digest_verified_total";
/// Delegated-mode intermediates minted.
pub const ROTATIONS: &str = "signet_pipeline_intermediate_rotations_total";

/// The outcomes a job can end with (the `outcome` label values).
pub(crate) const OUTCOMES: [&str; 10] = [
    "ok",
    "overloaded",
    "deadline_exceeded",
    "abandoned",
    "unavailable",
    "shutting_down",
    "key_error",
    "invalid_request",
    "post_sign_check",
    "internal",
];

/// Metric handles registered once (per worker or per pipeline), so the hot path does no key lookup.
#[derive(Clone)]
pub(crate) struct Handles {
    outcomes: [Counter; 10],
    pub(crate) queue_depth: Gauge,
    pub(crate) batch_size: Histogram,
    pub(crate) queue_wait: Histogram,
    pub(crate) reply: Histogram,
    pub(crate) digest_check: Histogram,
}

impl Handles {
    pub(crate) fn new() -> Self {
        Self {
            outcomes: OUTCOMES.map(|o| metrics::counter!(JOBS, "outcome" => o)),
            queue_depth: metrics::gauge!(QUEUE_DEPTH),
            batch_size: metrics::histogram!(BATCH_SIZE),
            queue_wait: metrics::histogram!(QUEUE_WAIT_SECONDS),
            reply: metrics::histogram!(REPLY_SECONDS),
            digest_check: metrics::histogram!(DIGEST_CHECK_SECONDS),
        }
    }

    pub(crate) fn outcome(&self, outcome: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome)
            && let Some(c) = self.outcomes.get(i)
        {
            c.increment(1);
        }
    }
}
