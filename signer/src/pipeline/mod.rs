//! The batching signer pipeline: many concurrent requests in, a steady stream of token signatures out.
//!
//! How a job travels:
//! 1. A submitter hashes on its own thread (never in a worker) and submits the digest (Ed25519: the message) with a
//!    key, an algorithm and a deadline: [`Pipeline::submit_digest`] from async code (SPIRE's KeyManager
//!    `SignData`), [`PipelineKey`]'s `AuthorityKey::sign` from a CPU-pool thread (rcgen's synchronous
//!    `SigningKey::sign(tbs)` while issuing a certificate), or its `sign_then`, which does not wait (X509-SVIDs in
//!    direct mode). The job carries its own reply channel, or the continuation that takes its answer.
//! 2. The job enters one bounded queue shared by every worker of every token behind the authority. A full queue
//!    refuses at once with [`PipelineError::Overloaded`] (memory stays bounded whatever the offered load); a closed
//!    pipeline with `ShuttingDown`; no token in rotation with `Unavailable`.
//! 3. An HSM worker ([`worker`]; N per token, each owning one logged-in session and caching key handles) blocks for
//!    the first job, drains what else is queued up to the batch bound and signs the batch back to back with
//!    `C_Sign`. Jobs whose caller gave up or whose deadline passed are dropped before they reach the token.
//!    Transient token errors are retried on a fresh session within the job's deadline; a token whose session cannot
//!    be recovered is taken out of rotation (probed again with backoff) and its unfinished jobs go to the others.
//!    A key handle the token no longer knows (`CKR_KEY_HANDLE_INVALID` / `CKR_OBJECT_HANDLE_INVALID`, as after an
//!    HSM cluster failed over) is dropped from the worker's cache, the key is found again by its label and the
//!    signature retried once.
//! 4. The worker answers the job on its reply channel, exactly once: a signature or an error. Within a batch,
//!    signatures are answered in small groups held back at most `REPLY_DELAY` (2 ms), so that one wake-up of the
//!    callers' threads serves several answers; on a slow HSM each answer goes out at once. On shutdown the queue is
//!    drained and every job still in it is answered `ShuttingDown`. A worker that panics answers every job it held
//!    `Internal` and carries on as a fresh worker with a new session; callers awaiting a reply wait at most until
//!    the job's deadline (then `DeadlineExceeded`), so no caller waits forever even if a reply were lost.
//! 5. Before a credential leaves, its signature is checked against the public key: X.509 and JWT signatures by the
//!    issuance core (ring, over the whole message), bare digests here ([`VerifyPolicy`]). The check fails closed:
//!    a signature that cannot be checked (no verifier for the key) is refused like one that does not verify.
//!    Every failed check counts against the token that made the signature; after
//!    [`max_bad_signatures`](PipelineConfig::max_bad_signatures) of them the token leaves rotation (its workers'
//!    unfinished jobs go to the other tokens) and comes back only when a probe signature over a fixed digest, made
//!    with every registered key, verifies. [`Pipeline::token_status`] says why a token is out.
//!
//! CPU work (CSR verification, DER building, lint, post-sign verification, delegated mode's software signing) runs
//! on the pipeline's [`CpuPool`], never on tokio's reactor threads and never in the HSM workers. [`X509SvidIssuer`]
//! puts it together: `issue_x509_svid(csr, ttl, deadline).await` in `direct` or `delegated` mode.

mod cpu;
mod error;
mod job;
mod key;
pub mod metrics;
mod session;
mod svid;
mod worker;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use signet_pkcs11::SignAlgorithm;

pub use cpu::{CpuPool, CpuTask};
pub use error::PipelineError;
pub use job::{Reply, with_deadline};
pub use key::PipelineKey;
pub use session::{HsmSession, SessionOpener};
pub use svid::{DelegatedConfig, SigningMode, SvidError, X509Svid, X509SvidIssuer};

use crate::keys::KeyType;
use crate::keys::verify;
use job::Job;

/// How signatures over bare digests are checked after signing (X.509 and JWT signatures are always checked by the
/// issuance core, over the whole message).
///
/// ring cannot verify ECDSA over a prehashed digest, so P-256 digests are checked where the reply lands, with per-key
/// precomputed tables over the `p256` crate's arithmetic (see `keys/verify.rs`): about 0.7 million instructions a check,
/// against 3.2 million for `p256`'s own `verify_prehash` and 0.5 million for SoftHSM2's `C_Sign`. A check still costs
/// about what a signature does on a software token, which is why sampling exists: `Sample(64)` adds about 2% of CPU
/// per signature. P-384 (`p384`), RSA PKCS#1 v1.5 and PSS (`rsa`) and Ed25519 (ring) signatures are checked with
/// those crates' general verifiers.
///
/// `Always` is the default: a token that corrupts signatures gives no other sign of it, so under `Sample(n)` up to
/// `n - 1` of every `n` corrupted signatures leave unchecked (hsm-sim's corrupted-signature fault runs show exactly
/// that). Sampling is for operators who accept that risk for CPU; once a sampled check fails, the pipeline checks
/// every digest signature from then on (until it is restarted), so a token seen to be faulty is not trusted again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyPolicy {
    /// Check every digest signature.
    Always,
    /// Check one in `n` (n >= 1) digest signatures, and every one after a check has failed.
    Sample(u32),
    /// Never check bare-digest signatures.
    Never,
}

/// Pipeline settings.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Jobs the queue holds; beyond it submissions are refused with `Overloaded`.
    pub queue_capacity: usize,
    /// Most jobs a worker takes per wake-up.
    pub batch: usize,
    /// Sign attempts per job (over all tokens) before transient failures are reported as `Unavailable`.
    pub max_attempts: u32,
    /// First wait before probing a token taken out of rotation; doubled per failed probe.
    pub backoff_initial: Duration,
    /// Longest wait between probes: also the longest a token that came back stays out of rotation. A probe that
    /// fails costs a `C_OpenSession` (and a re-initialisation after a removal), so a short bound is cheap; with
    /// 10 s a device unplugged for 2 s came back to a pipeline that kept refusing for another 1.1 s.
    pub backoff_max: Duration,
    /// Deadline of a [`PipelineKey`] signature when the caller set none ([`with_deadline`]).
    pub default_timeout: Duration,
    /// CPU-pool threads; 0 picks available cores + 2 x the HSM sessions (a CPU thread waits while the token signs a
    /// JWT-SVID or a CA; direct-mode X509-SVIDs do not wait).
    pub cpu_threads: usize,
    /// CPU-pool queue length.
    pub cpu_queue: usize,
    /// Post-sign check of bare-digest signatures.
    pub verify_digests: VerifyPolicy,
    /// Failed post-sign checks (of signatures a token made since it last entered rotation) that take the token out
    /// of rotation until a probe signature verifies; 0 counts as 1.
    pub max_bad_signatures: u32,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 65_536,
            batch: 64,
            max_attempts: 4,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(400),
            default_timeout: Duration::from_secs(5),
            cpu_threads: 0,
            cpu_queue: 65_536,
            verify_digests: VerifyPolicy::Always,
            max_bad_signatures: 3,
        }
    }
}

/// One token (or slot) behind the authority, with its number of worker sessions.
#[derive(Debug, Clone)]
pub struct TokenMember {
    /// A name for logs and metrics (e.g. the configured token name).
    pub name: String,
    /// How workers open sessions on it (a [`signet_pkcs11::Token`]).
    pub opener: Arc<dyn SessionOpener>,
    /// Worker sessions (threads) on this token.
    pub sessions: usize,
}

impl TokenMember {
    /// A member for `token` with `sessions` workers.
    pub fn new(name: impl Into<String>, token: signet_pkcs11::Token, sessions: usize) -> Self {
        Self {
            name: name.into(),
            opener: Arc::new(token),
            sessions,
        }
    }
}

/// A token's state as the pipeline sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenStatus {
    /// The member's name.
    pub name: String,
    /// Whether it is in rotation.
    pub healthy: bool,
    /// Signatures its workers made.
    pub signatures: u64,
    /// Transient failures seen on it.
    pub failures: u64,
    /// Its signatures that failed a post-sign check (over the pipeline's life).
    pub bad_signatures: u64,
    /// Why it is out of rotation (`None` while it is in), e.g. "3 signatures failed the post-sign check".
    pub reason: Option<String>,
}

pub(crate) struct TokenState {
    pub(crate) name: String,
    pub(crate) opener: Arc<dyn SessionOpener>,
    pub(crate) healthy: AtomicBool,
    pub(crate) signatures: AtomicU64,
    pub(crate) failures: AtomicU64,
    /// Failed post-sign checks since the token last entered rotation.
    bad_since_up: AtomicU64,
    bad_total: AtomicU64,
    /// Out of rotation for bad signatures: only a probe signature that verifies brings it back.
    pub(crate) needs_probe: AtomicBool,
    /// Why it is out of rotation.
    reason: Mutex<Option<String>>,
    healthy_gauge: ::metrics::Gauge,
    /// Workers of this token handling a batch now.
    pub(crate) busy_gauge: ::metrics::Gauge,
    pub(crate) failure_counter: ::metrics::Counter,
    bad_counter: ::metrics::Counter,
    pub(crate) panic_counter: ::metrics::Counter,
}

impl TokenState {
    fn new(name: &str, opener: Arc<dyn SessionOpener>) -> Self {
        Self {
            name: name.to_string(),
            opener,
            healthy: AtomicBool::new(true),
            signatures: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            bad_since_up: AtomicU64::new(0),
            bad_total: AtomicU64::new(0),
            needs_probe: AtomicBool::new(false),
            reason: Mutex::new(None),
            healthy_gauge: ::metrics::gauge!(metrics::TOKEN_HEALTHY, "token" => name.to_string()),
            busy_gauge: ::metrics::gauge!(metrics::TOKEN_BUSY_WORKERS, "token" => name.to_string()),
            failure_counter: ::metrics::counter!(metrics::TOKEN_FAILURES, "token" => name.to_string()),
            bad_counter: ::metrics::counter!(metrics::TOKEN_BAD_SIGNATURES, "token" => name.to_string()),
            panic_counter: ::metrics::counter!(metrics::WORKER_PANICS, "token" => name.to_string()),
        }
    }

    fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_reason(&self, reason: Option<String>) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }
}

pub(crate) struct RegisteredKey {
    pub(crate) label: Arc<str>,
    pub(crate) key_type: KeyType,
    pub(crate) spki: Arc<[u8]>,
    /// The post-sign check of its digest signatures (`None`: the public key did not parse, and every signature
    /// fails the check; [`Pipeline::key`] refuses to register such a key).
    pub(crate) verifier: Option<verify::DigestVerifier>,
}

pub(crate) struct Shared {
    pub(crate) config: PipelineConfig,
    tx: Sender<Job>,
    pub(crate) rx: Receiver<Job>,
    pub(crate) retry_tx: Sender<Job>,
    pub(crate) retry_rx: Receiver<Job>,
    stop_tx: Mutex<Option<Sender<()>>>,
    pub(crate) stop_rx: Receiver<()>,
    closed: AtomicBool,
    tokens: Vec<Arc<TokenState>>,
    pub(crate) healthy_tokens: AtomicUsize,
    keys: RwLock<Vec<Arc<RegisteredKey>>>,
    next_id: AtomicU64,
    workers: Mutex<Vec<JoinHandle<()>>>,
    handles: metrics::Handles,
    cpu: CpuPool,
    verified: AtomicU64,
    verify_counter: ::metrics::Counter,
    /// A post-sign check of a digest signature failed: check every one from now on (see [`VerifyPolicy`]).
    verify_escalated: AtomicBool,
    /// HSM workers (of every token) waiting for a job now. A worker that takes a job drains more into its batch only
    /// when none is waiting: queued jobs then spread over every free session instead of being signed one after
    /// another by the first worker that woke (on a 5 ms network HSM, eight concurrent requests answered in 5 ms,
    /// not 40).
    pub(crate) idle_workers: AtomicUsize,
}

impl Shared {
    pub(crate) fn registered(&self, index: u32) -> Option<Arc<RegisteredKey>> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(index as usize)
            .cloned()
    }

    /// Every registered key, in slot order.
    pub(crate) fn registered_all(&self) -> Vec<Arc<RegisteredKey>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn mark_down(&self, token: &TokenState, reason: &str) {
        if token.healthy.swap(false, Ordering::AcqRel) {
            token.set_reason(Some(reason.to_string()));
            self.healthy_tokens.fetch_sub(1, Ordering::AcqRel);
            token.healthy_gauge.set(0.0);
            tracing::warn!(token = %token.name, reason, "token taken out of rotation");
        }
    }

    pub(crate) fn mark_up(&self, token: &TokenState) {
        if !token.healthy.swap(true, Ordering::AcqRel) {
            token.set_reason(None);
            self.healthy_tokens.fetch_add(1, Ordering::AcqRel);
            token.healthy_gauge.set(1.0);
            tracing::info!(token = %token.name, "token back in rotation");
        }
    }

    /// A signature `token` made failed its post-sign check: counted, and the token leaves rotation once
    /// `max_bad_signatures` of them were seen since it last entered it.
    pub(crate) fn post_sign_failed(&self, token: &TokenState) {
        token.bad_counter.increment(1);
        token.bad_total.fetch_add(1, Ordering::Relaxed);
        let n = token.bad_since_up.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::error!(token = %token.name, failed = n, "a signature made by the token failed the post-sign check");
        if n >= u64::from(self.config.max_bad_signatures.max(1)) {
            token.needs_probe.store(true, Ordering::Release);
            let reason = format!("{n} signatures failed the post-sign check");
            if !token.healthy.load(Ordering::Acquire) {
                // Already out (e.g. its session failed): it now also needs a probe signature to come back.
                token.set_reason(Some(reason));
            } else {
                self.mark_down(token, &reason);
            }
        }
    }

    /// A probe signature verified: the token's count of failed checks starts again.
    pub(crate) fn probe_passed(&self, token: &TokenState) {
        token.bad_since_up.store(0, Ordering::Release);
        token.needs_probe.store(false, Ordering::Release);
    }

    /// Why no token can sign: each token's reason for being out of rotation.
    pub(crate) fn out_of_rotation(&self) -> String {
        let reasons: Vec<String> = self
            .tokens
            .iter()
            .filter(|t| !t.healthy.load(Ordering::Acquire))
            .map(|t| match t.reason() {
                Some(r) => format!("{:?}: {r}", t.name),
                None => format!("{:?}", t.name),
            })
            .collect();
        format!("every token is out of rotation ({})", reasons.join("; "))
    }

    /// Answers every queued job `Unavailable` (no token can take it).
    pub(crate) fn fail_queued(&self) {
        let reason = self.out_of_rotation();
        while let Ok(job) = self.retry_rx.try_recv().or_else(|_| self.rx.try_recv()) {
            let e = PipelineError::Unavailable {
                reason: reason.clone(),
                retry_after: self.config.backoff_initial,
            };
            self.handles.outcome(e.outcome());
            job.answer(Err(e));
        }
    }

    /// Answers every queued job `ShuttingDown`.
    fn drain_shutting_down(&self) {
        while let Ok(job) = self.retry_rx.try_recv().or_else(|_| self.rx.try_recv()) {
            self.handles.outcome("shutting_down");
            job.answer(Err(PipelineError::ShuttingDown));
        }
    }
}

/// The batching signer (see the module docs). Cheap to clone; call [`shutdown`](Self::shutdown) once to stop it.
#[derive(Clone)]
pub struct Pipeline {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("queued", &self.shared.rx.len())
            .field("tokens", &self.shared.tokens.len())
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Starts the pipeline: opens every worker's session, starts the workers and the CPU pool. A token whose
    /// sessions fail transiently starts out of rotation (and is probed); a permanent failure (wrong PIN, ...) is an
    /// error, as is a pipeline with no session at all.
    pub fn start(config: PipelineConfig, members: Vec<TokenMember>) -> Result<Self, PipelineError> {
        let sessions: usize = members.iter().map(|m| m.sessions.max(1)).sum();
        if members.is_empty() {
            return Err(PipelineError::InvalidRequest(
                "a pipeline needs at least one token".into(),
            ));
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let cpu_threads = if config.cpu_threads == 0 {
            cores + 2 * sessions
        } else {
            config.cpu_threads
        };
        let cpu = CpuPool::new(cpu_threads, config.cpu_queue).map_err(|e| {
            PipelineError::Unavailable {
                reason: format!("cannot start CPU threads: {e}"),
                retry_after: Duration::from_secs(1),
            }
        })?;
        let (tx, rx) = channel::bounded(config.queue_capacity.max(1));
        ::metrics::gauge!(metrics::QUEUE_CAPACITY).set(config.queue_capacity.max(1) as f64);
        // Exported from the start (0), so that the first refusal shows as an increase.
        ::metrics::counter!(metrics::CPU_REFUSED).increment(0);
        // Unbounded, but it only ever holds jobs that were in a worker's hands: at most workers x batch.
        let (retry_tx, retry_rx) = channel::unbounded();
        let (stop_tx, stop_rx) = channel::bounded(0);

        let mut opened = Vec::new();
        let mut tokens = Vec::new();
        for m in &members {
            let state = Arc::new(TokenState::new(&m.name, m.opener.clone()));
            for _ in 0..m.sessions.max(1) {
                match m.opener.open() {
                    Ok(s) => opened.push((state.clone(), Some(s))),
                    Err(e) if e.is_transient() => {
                        tracing::warn!(token = %m.name, error = %e, "cannot open a worker session; token starts out of rotation");
                        state.healthy.store(false, Ordering::Release);
                        state.set_reason(Some(format!("cannot open a session: {e}")));
                        opened.push((state.clone(), None));
                    }
                    Err(e) => {
                        cpu.shutdown();
                        return Err(PipelineError::Key(format!(
                            "token {:?}: cannot open a worker session: {e}",
                            m.name
                        )));
                    }
                }
            }
            state
                .healthy_gauge
                .set(if state.healthy.load(Ordering::Acquire) {
                    1.0
                } else {
                    0.0
                });
            state.busy_gauge.set(0.0);
            ::metrics::gauge!(metrics::TOKEN_SESSIONS, "token" => m.name.clone())
                .set(m.sessions.max(1) as f64);
            tokens.push(state);
        }
        let healthy = tokens
            .iter()
            .filter(|t| t.healthy.load(Ordering::Acquire))
            .count();
        let shared = Arc::new(Shared {
            config,
            tx,
            rx,
            retry_tx,
            retry_rx,
            stop_tx: Mutex::new(Some(stop_tx)),
            stop_rx,
            closed: AtomicBool::new(false),
            tokens,
            healthy_tokens: AtomicUsize::new(healthy),
            keys: RwLock::new(Vec::new()),
            next_id: AtomicU64::new(1),
            workers: Mutex::new(Vec::new()),
            handles: metrics::Handles::new(),
            cpu,
            verified: AtomicU64::new(0),
            verify_counter: ::metrics::counter!(metrics::DIGEST_VERIFIED),
            verify_escalated: AtomicBool::new(false),
            idle_workers: AtomicUsize::new(0),
        });
        let mut handles = Vec::new();
        for (i, (state, session)) in opened.into_iter().enumerate() {
            let w = worker::Worker::new(shared.clone(), state.clone(), session);
            let spawned = std::thread::Builder::new()
                .name(format!("signet-hsm-{}-{i}", state.name))
                .spawn(move || w.run());
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    *shared.workers.lock().unwrap_or_else(|p| p.into_inner()) = handles;
                    let p = Pipeline { shared };
                    p.shutdown();
                    return Err(PipelineError::Unavailable {
                        reason: format!("cannot start HSM worker threads: {e}"),
                        retry_after: Duration::from_secs(1),
                    });
                }
            }
        }
        *shared.workers.lock().unwrap_or_else(|p| p.into_inner()) = handles;
        Ok(Pipeline { shared })
    }

    /// The CPU pool of this pipeline (for issuance work).
    pub fn cpu(&self) -> &CpuPool {
        &self.shared.cpu
    }

    /// The settings.
    pub fn config(&self) -> &PipelineConfig {
        &self.shared.config
    }

    /// Registers the key labelled `label` (it must be on every token) and returns it as an
    /// [`AuthorityKey`](crate::keys::AuthorityKey). Reads the public key through a short-lived session on the first
    /// token in rotation. Registering the same label again returns the same key.
    pub fn key(&self, label: &str) -> Result<PipelineKey, PipelineError> {
        if let Some((i, reg)) = self
            .shared
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .enumerate()
            .find(|(_, k)| &*k.label == label)
        {
            return Ok(PipelineKey::new(self.clone(), i as u32, reg.clone()));
        }
        let mut last = None;
        let mut found = None;
        for t in &self.shared.tokens {
            if !t.healthy.load(Ordering::Acquire) {
                continue;
            }
            let r = t.opener.open().and_then(|mut s| {
                let k = s.find_key(label)?;
                let spki = s.public_key_der(label)?;
                Ok((k.key_type(), spki))
            });
            match r {
                Ok(v) => {
                    found = Some(v);
                    break;
                }
                Err(e) if e.is_transient() => last = Some(e),
                Err(e) => {
                    return Err(PipelineError::Key(format!(
                        "key {label:?} on token {:?}: {e}",
                        t.name
                    )));
                }
            }
        }
        let Some((token_type, spki)) = found else {
            return Err(PipelineError::Unavailable {
                reason: match last {
                    Some(e) => format!("cannot read key {label:?}: {e}"),
                    None => "no token is in rotation".into(),
                },
                retry_after: self.shared.config.backoff_initial,
            });
        };
        let key_type = token_type;
        // Fail closed: a key whose signatures could not be checked after signing is not used at all.
        let Some(verifier) = verify::DigestVerifier::new(key_type, &spki) else {
            return Err(PipelineError::Key(format!(
                "key {label:?}: its public key does not parse as a {key_type} key, so its signatures could not be \
                 checked after signing"
            )));
        };
        let verifier = Some(verifier);
        let reg = Arc::new(RegisteredKey {
            label: Arc::from(label),
            key_type,
            spki: Arc::from(spki),
            verifier,
        });
        let mut keys = self.shared.keys.write().unwrap_or_else(|p| p.into_inner());
        if let Some((i, existing)) = keys.iter().enumerate().find(|(_, k)| &*k.label == label) {
            return Ok(PipelineKey::new(self.clone(), i as u32, existing.clone()));
        }
        let index = u32::try_from(keys.len())
            .map_err(|_| PipelineError::InvalidRequest("too many keys registered".into()))?;
        keys.push(reg.clone());
        Ok(PipelineKey::new(self.clone(), index, reg))
    }

    /// Queues one job. The digest (or Ed25519 message) is already computed; errors come back at once.
    pub(crate) fn submit(
        &self,
        key: u32,
        alg: SignAlgorithm,
        data: Vec<u8>,
        deadline: Instant,
    ) -> Result<Reply, PipelineError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (job, reply) = Job::new(id, key, alg, data, deadline);
        self.enqueue(job)?;
        Ok(reply)
    }

    /// Queues one job whose answer goes to `then`, which runs exactly once: on the worker that answers, or here
    /// with the error when the job is refused.
    pub(crate) fn submit_then(
        &self,
        key: u32,
        alg: SignAlgorithm,
        data: Vec<u8>,
        deadline: Instant,
        then: Box<dyn job::Continuation>,
    ) {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let job = Job::with_continuation(id, key, alg, data, deadline, then);
        // A refusal has answered the continuation.
        let _ = self.enqueue(job);
    }

    /// Puts `job` in the queue, or refuses it ([`Job::refuse`]) and says why.
    fn enqueue(&self, job: Job) -> Result<(), PipelineError> {
        let s = &self.shared;
        let refuse = |e: PipelineError, job: Job| {
            s.handles.outcome(e.outcome());
            job.refuse(e.clone());
            Err(e)
        };
        if s.closed.load(Ordering::SeqCst) {
            return refuse(PipelineError::ShuttingDown, job);
        }
        if s.healthy_tokens.load(Ordering::Acquire) == 0 {
            let e = PipelineError::Unavailable {
                reason: s.out_of_rotation(),
                retry_after: s.config.backoff_initial,
            };
            return refuse(e, job);
        }
        if Instant::now() >= job.deadline {
            return refuse(PipelineError::DeadlineExceeded, job);
        }
        match s.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                s.handles.queue_depth.set(s.rx.len() as f64);
                let e = PipelineError::Overloaded {
                    capacity: s.config.queue_capacity,
                };
                return refuse(e, job);
            }
            Err(TrySendError::Disconnected(job)) => {
                return refuse(PipelineError::ShuttingDown, job);
            }
        }
        // A shutdown that raced with this submission may have drained the queue already: drain again so the job is
        // answered rather than left behind.
        if s.closed.load(Ordering::SeqCst) {
            s.drain_shutting_down();
        }
        Ok(())
    }

    /// Signs a bare digest computed by the caller (SPIRE KeyManager `SignData`): `digest` must have the length of
    /// `alg`'s hash (for Ed25519, pass the message). ECDSA signatures come back raw r||s
    /// ([`ecdsa_raw_to_der`](crate::keys::ecdsa_raw_to_der) for DER). The job is refused at once when the queue is
    /// full; dropping the future abandons the job (it is then never signed); the reply is awaited until `deadline`
    /// at most (then `DeadlineExceeded`). Signatures are checked against the public key per [`VerifyPolicy`] (P-256
    /// in place with the key's tables, the others on the CPU pool) before they are returned; a failed check counts
    /// against the token that signed.
    pub fn submit_digest(
        &self,
        key: &PipelineKey,
        alg: SignAlgorithm,
        digest: &[u8],
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<u8>, PipelineError>> + Send + 'static + use<> {
        let checked = key.check_request(alg, digest).map(|reg| {
            // Keep a copy of the digest only for the signatures that will be checked.
            let verify = self.should_verify().then(|| digest.to_vec());
            let reply = self.submit(key.index(), alg, digest.to_vec(), deadline);
            (reg, verify, reply)
        });
        let cpu = self.shared.cpu.clone();
        let shared = self.shared.clone();
        async move {
            let (reg, verify, reply) = checked?;
            let reply = reply?;
            // A lost reply cannot hold the caller past its deadline (on a tokio runtime; the pipeline answers every
            // job it holds in any case).
            let job::Signed {
                sig,
                token,
                answered,
            } = if tokio::runtime::Handle::try_current().is_ok() {
                tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), reply.signed())
                    .await
                    .unwrap_or(Err(PipelineError::DeadlineExceeded))?
            } else {
                reply.signed().await?
            };
            let resumed = Instant::now();
            shared
                .handles
                .reply
                .record(resumed.saturating_duration_since(answered).as_secs_f64());
            let Some(digest_copy) = verify else {
                return Ok(sig);
            };
            // A P-256 check with the key's tables is a few tens of microseconds: done here, on the task that
            // answers, rather than paying two thread hand-offs for it. The other key types' checks (hundreds of
            // microseconds to milliseconds) go to the CPU pool, off the runtime's threads. The signature is made: a
            // shutdown lets its check finish rather than answer `ShuttingDown`.
            let checked = if matches!(reg.verifier, Some(verify::DigestVerifier::P256(_))) {
                verify_digest(&reg, alg, &digest_copy, &sig).map(|()| sig)
            } else {
                cpu.run_to_completion(move || {
                    verify_digest(&reg, alg, &digest_copy, &sig).map(|()| sig)
                })
                .await?
            };
            shared
                .handles
                .digest_check
                .record(resumed.elapsed().as_secs_f64());
            shared.verified.fetch_add(1, Ordering::Relaxed);
            shared.verify_counter.increment(1);
            if let Err(PipelineError::PostSignCheck(_)) = &checked {
                shared.post_sign_failed(&token);
            }
            if checked.is_err() && !shared.verify_escalated.swap(true, Ordering::AcqRel) {
                tracing::error!(
                    "a token returned a digest signature that does not verify: every digest signature is checked \
                     from now on"
                );
            }
            checked
        }
    }

    fn should_verify(&self) -> bool {
        match self.shared.config.verify_digests {
            VerifyPolicy::Always => true,
            VerifyPolicy::Never => false,
            VerifyPolicy::Sample(_) if self.shared.verify_escalated.load(Ordering::Acquire) => true,
            VerifyPolicy::Sample(n) => {
                let n = u64::from(n.max(1));
                self.shared
                    .next_id
                    .load(Ordering::Relaxed)
                    .is_multiple_of(n)
            }
        }
    }

    /// HSM workers (of every token) waiting for a job now.
    pub fn idle_workers(&self) -> usize {
        self.shared.idle_workers.load(Ordering::Acquire)
    }

    /// The state of every token behind the pipeline.
    pub fn token_status(&self) -> Vec<TokenStatus> {
        self.shared
            .tokens
            .iter()
            .map(|t| TokenStatus {
                name: t.name.clone(),
                healthy: t.healthy.load(Ordering::Acquire),
                signatures: t.signatures.load(Ordering::Relaxed),
                failures: t.failures.load(Ordering::Relaxed),
                bad_signatures: t.bad_total.load(Ordering::Relaxed),
                reason: if t.healthy.load(Ordering::Acquire) {
                    None
                } else {
                    Some(t.reason().unwrap_or_else(|| "out of rotation".into()))
                },
            })
            .collect()
    }

    /// Bare-digest signatures checked after signing so far.
    pub fn digests_verified(&self) -> u64 {
        self.shared.verified.load(Ordering::Relaxed)
    }

    /// Jobs waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.shared.rx.len() + self.shared.retry_rx.len()
    }

    /// Stops the pipeline: refuses new jobs (`ShuttingDown`), lets each worker finish the batch in its hands (a
    /// digest signature made is still checked and returned), then answers every job still queued with
    /// `ShuttingDown`, and stops the CPU pool. Idempotent; blocks until the
    /// worker threads have exited (do not call it from an async task without `spawn_blocking`).
    pub fn shutdown(&self) {
        let s = &self.shared;
        s.closed.store(true, Ordering::SeqCst);
        drop(s.stop_tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        let workers = std::mem::take(&mut *s.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in workers {
            let _ = w.join();
        }
        s.drain_shutting_down();
        s.cpu.shutdown();
    }
}

fn verify_digest(
    reg: &RegisteredKey,
    alg: SignAlgorithm,
    digest: &[u8],
    sig: &[u8],
) -> Result<(), PipelineError> {
    // Fail closed: a signature that cannot be checked does not leave.
    let Some(v) = reg.verifier.as_ref() else {
        tracing::error!(key = %reg.label, "no post-sign verifier for the key: the signature is refused");
        return Err(PipelineError::PostSignCheck(format!(
            "key {:?}: its public key could not be read, so the signature could not be checked",
            reg.label
        )));
    };
    if v.verify(alg, digest, sig) {
        Ok(())
    } else {
        tracing::error!(key = %reg.label, "token signature over a digest does not verify");
        Err(PipelineError::PostSignCheck(format!("key {:?}", reg.label)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::keys::KeySchemes as _;
    use crate::keys::{AuthorityKey, KeyError, SignatureScheme, SoftwareKey};

    fn registered(key_type: KeyType, spki: &[u8]) -> RegisteredKey {
        RegisteredKey {
            label: Arc::from("k"),
            key_type,
            spki: Arc::from(spki),
            verifier: verify::DigestVerifier::new(key_type, spki),
        }
    }

    /// A key whose public half cannot be read: no verifier is built, and a signature is refused, not passed.
    #[test]
    fn a_signature_that_cannot_be_checked_fails_the_post_sign_check() {
        for key_type in [
            KeyType::EcP256,
            KeyType::EcP384,
            KeyType::Rsa2048,
            KeyType::Ed25519,
        ] {
            let reg = registered(key_type, b"not a SubjectPublicKeyInfo");
            assert!(reg.verifier.is_none(), "{key_type}");
            let alg = crate::keys::token::sign_algorithm(key_type.x509_scheme());
            let e = verify_digest(&reg, alg, &[0u8; 32], &[1u8; 64]).unwrap_err();
            assert!(
                matches!(e, PipelineError::PostSignCheck(_)),
                "{key_type}: {e}"
            );
        }
    }

    /// A P-256 key's verifier given another key type's point, or the right key but a bad signature: refused.
    #[test]
    fn wrong_key_type_or_bad_signature_fails_the_post_sign_check() {
        let (key, _) = SoftwareKey::generate(KeyType::EcP256).unwrap();
        let spki = key.spki_der().to_vec();
        // The P-256 point is no P-384 point, nor an RSA key.
        assert!(verify::DigestVerifier::new(KeyType::EcP384, &spki).is_none());
        assert!(verify::DigestVerifier::new(KeyType::Rsa2048, &spki).is_none());
        let reg = registered(KeyType::EcP256, &spki);
        let msg = b"message";
        let sig = key.sign(SignatureScheme::EcdsaP256Sha256, msg).unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, msg);
        let alg = SignAlgorithm::EcdsaSha256;
        assert_eq!(verify_digest(&reg, alg, digest.as_ref(), &sig), Ok(()));
        let mut bad = sig.clone();
        bad[5] ^= 1;
        assert!(matches!(
            verify_digest(&reg, alg, digest.as_ref(), &bad),
            Err(PipelineError::PostSignCheck(_))
        ));
        // An RSA verifier refuses a non-RSA algorithm outright.
        assert!(matches!(
            verify_digest(&reg, alg, digest.as_ref(), &[]),
            Err(PipelineError::PostSignCheck(_))
        ));
    }

    /// A key that signs correctly but whose public key does not parse, recording what it was told.
    #[derive(Debug)]
    struct Unreadable {
        key: SoftwareKey,
        checked: Mutex<Vec<bool>>,
    }

    impl AuthorityKey for Unreadable {
        fn key_type(&self) -> KeyType {
            KeyType::EcP256
        }
        fn spki_der(&self) -> &[u8] {
            b"\x30\x03\x02\x01\x00"
        }
        fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, KeyError> {
            self.key.sign(scheme, message)
        }
        fn post_sign_checked(&self, _signature: &[u8], passed: bool) {
            self.checked.lock().unwrap().push(passed);
        }
    }

    /// The JWT post-sign check fails closed on a public key it cannot read, and tells the key.
    #[test]
    fn a_jwt_whose_key_cannot_be_read_is_refused() {
        let (key, _) = SoftwareKey::generate(KeyType::EcP256).unwrap();
        let key = Arc::new(Unreadable {
            key,
            checked: Mutex::new(Vec::new()),
        });
        let td = crate::spiffe::TrustDomain::parse("example.org").unwrap();
        let issuer = crate::jwt::JwtIssuer::new(
            key.clone(),
            td,
            Some("kid".into()),
            None,
            Duration::from_secs(300),
        )
        .unwrap();
        let id = crate::spiffe::SpiffeId::parse("spiffe://example.org/w").unwrap();
        let e = issuer
            .issue(
                &id,
                &["aud".into()],
                Duration::from_secs(60),
                time::OffsetDateTime::now_utc(),
            )
            .unwrap_err();
        assert!(matches!(e, crate::jwt::JwtError::PostSignCheck(_)), "{e}");
        assert_eq!(*key.checked.lock().unwrap(), vec![false]);
    }
}
