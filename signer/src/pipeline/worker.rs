//! The HSM worker: one thread, one logged-in session, cached key handles.
//!
//! A worker blocks for the first job (retried jobs first, then the shared queue), drains what else is queued up to
//! the batch bound when no other worker is waiting (otherwise the waiting workers take the queued jobs on their own
//! sessions, so concurrent jobs spread over every free session), and signs the batch back to back. Per job: a job whose caller gave up or whose deadline passed is
//! dropped before it reaches the token; a transient failure is retried on a fresh session (after re-initialising the
//! library when the device went away) within the job's deadline and attempt budget; when the session cannot be
//! recovered the token is taken out of rotation, the worker's unfinished jobs go to the retry queue for the other
//! tokens, and the worker probes the token with exponential backoff until a session opens again. A token taken out
//! because its signatures failed post-sign checks ([`Shared::post_sign_failed`]) also needs a probe signature: the
//! worker signs a fixed message with every registered key and checks each signature before the token comes back.
//! Jobs a worker holds when its token leaves rotation (for any reason) go back to the retry queue unsigned.
//!
//! A cached key handle the token no longer knows (`CKR_KEY_HANDLE_INVALID`, `CKR_OBJECT_HANDLE_INVALID`: an HSM
//! cluster that failed over) is dropped, the key is found again by label and the signature retried once, within
//! the job's deadline.
//!
//! A panic while the worker handles a batch (or probes) is caught: every job the worker held is answered
//! `Internal` (those in flight from their `Drop` during the unwind, those held for a grouped reply here), and the
//! thread carries on as a fresh worker: new session, empty handle cache.
//!
//! Replies are grouped. Answering a job wakes its caller's thread (a tokio worker, or a CPU-pool thread parked in
//! `wait_until`): a futex wake here and a context switch there, per signature, which on a software token costs a
//! noticeable share of a signature's CPU. Within a batch, a worker therefore holds successful answers back while
//! the oldest held one plus the expected duration of the next `C_Sign` (a moving average) stays within
//! [`REPLY_DELAY`], up to [`REPLY_GROUP`] answers, and sends them back to back: tokio then wakes one thread for the
//! group. Every held answer is sent before the worker takes its next batch (or stops); errors are answered at once.
//! On a slow (network) HSM the expected signing time alone exceeds the bound, so every answer goes out at once.

use crate::keys::KeySchemes as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam::channel::{RecvTimeoutError, TryRecvError, select};
use signet_pkcs11::{Key, RvClass};

use super::error::PipelineError;
use super::job::{Job, Signed};
use super::metrics::Handles;
use super::session::HsmSession;
use super::{Shared, TokenState};

/// The message of probe signatures (hashed per the key's X.509 scheme; Ed25519 signs it as is).
const PROBE_MESSAGE: &[u8] = b"signet post-sign probe: does this token's signature verify?";

/// Longest a successful answer is held back to be sent together with the next ones (see the module docs). On
/// SoftHSM2 (about 0.1 ms a signature) 2 ms gave 12,800-13,200 signatures/s at 142-146 µs of process CPU each, against
/// 10,300-11,600/s at 163-179 µs with 0.5 ms (64 async submitters, 2 sessions, 2 cores, alternating runs).
pub(crate) const REPLY_DELAY: Duration = Duration::from_micros(2000);
/// Most answers held back at once.
pub(crate) const REPLY_GROUP: usize = 32;

/// Counts a worker out of its token's busy gauge when the batch ends (also when it panics).
struct BusyGuard(metrics::Gauge);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

enum Flow {
    Continue,
    TokenDown,
}

pub(crate) struct Worker {
    shared: Arc<Shared>,
    token: Arc<TokenState>,
    session: Option<Box<dyn HsmSession>>,
    keys: Vec<Option<Key>>,
    handles: Handles,
    sign_seconds: metrics::Histogram,
    batch: Vec<Job>,
    /// Signed jobs whose answers are held back (see the module docs), and when the first of them was signed.
    held: Vec<(Job, Vec<u8>)>,
    held_since: Option<Instant>,
    /// Moving average of one signature's duration on this worker's token.
    sign_avg: Duration,
}

impl Worker {
    pub(crate) fn new(
        shared: Arc<Shared>,
        token: Arc<TokenState>,
        session: Option<Box<dyn HsmSession>>,
    ) -> Self {
        let batch = Vec::with_capacity(shared.config.batch);
        let sign_seconds =
            metrics::histogram!(super::metrics::SIGN_SECONDS, "token" => token.name.clone());
        Self {
            shared,
            token,
            session,
            keys: Vec::new(),
            handles: Handles::new(),
            sign_seconds,
            batch,
            held: Vec::with_capacity(REPLY_GROUP),
            held_since: None,
            // Until a signature has been timed, answer at once.
            sign_avg: REPLY_DELAY,
        }
    }

    pub(crate) fn run(mut self) {
        loop {
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            match step {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => self.replace_after_panic(),
            }
        }
    }

    /// After a panic: answers every job still held `Internal` and becomes a fresh worker (new session, no cached
    /// handles). A session that cannot be opened now is probed by the usual recovery.
    fn replace_after_panic(&mut self) {
        self.token.panic_counter.increment(1);
        tracing::error!(token = %self.token.name, "an HSM worker panicked: its jobs are answered and it is replaced");
        let internal = || {
            PipelineError::Internal(
                "the HSM worker holding the job panicked (it was replaced)".into(),
            )
        };
        self.held_since = None;
        for (job, _sig) in std::mem::take(&mut self.held) {
            self.finish(job, Err(internal()));
        }
        for job in std::mem::take(&mut self.batch) {
            self.finish(job, Err(internal()));
        }
        self.batch = Vec::with_capacity(self.shared.config.batch);
        self.held = Vec::with_capacity(REPLY_GROUP);
        self.keys.clear();
        self.sign_avg = REPLY_DELAY;
        // Close the old session before opening its replacement.
        self.session = None;
        match self.token.opener.open() {
            Ok(s) => self.session = Some(s),
            Err(e) => {
                tracing::warn!(token = %self.token.name, error = %e, "the replacement worker cannot open a session yet");
            }
        }
    }

    /// One turn: recovery while the token is out, else one batch. Returns false when the pipeline stops.
    fn step(&mut self) -> bool {
        if self.session.is_none() || !self.token.healthy.load(Ordering::Acquire) {
            return self.recover();
        }
        // A stopping pipeline takes no new batch: what is queued is answered `ShuttingDown` by `shutdown`.
        if let Err(TryRecvError::Disconnected) = self.shared.stop_rx.try_recv() {
            return false;
        }
        // An idle worker looks up now and then, so that a token taken out of rotation while no job comes (its
        // pipeline then refuses new jobs) is still probed back.
        self.shared.idle_workers.fetch_add(1, Ordering::AcqRel);
        let first = select! {
            recv(self.shared.retry_rx) -> j => j.ok().map(Some),
            recv(self.shared.rx) -> j => j.ok().map(Some),
            recv(self.shared.stop_rx) -> _ => None,
            default(self.shared.config.backoff_max) => Some(None),
        };
        let others_idle = self.shared.idle_workers.fetch_sub(1, Ordering::AcqRel) > 1;
        let first = match first {
            Some(Some(j)) => j,
            // Nothing came within the idle period.
            Some(None) => return true,
            None => return false,
        };
        self.batch.push(first);
        // Another worker waiting takes the next queued job on its own session; only when every worker is busy does
        // this one batch what is queued (then grouped replies save wake-ups, see the module docs).
        while !others_idle && self.batch.len() < self.shared.config.batch {
            match self
                .shared
                .retry_rx
                .try_recv()
                .or_else(|_| self.shared.rx.try_recv())
            {
                Ok(j) => self.batch.push(j),
                Err(_) => break,
            }
        }
        self.handles.batch_size.record(self.batch.len() as f64);
        self.handles.queue_depth.set(self.shared.rx.len() as f64);
        // Jobs are taken from the front of `self.batch` one at a time, so that a panic leaves the ones not yet
        // handled there (answered by `replace_after_panic`); the one in hand answers from its `Drop`.
        self.batch.reverse();
        self.token.busy_gauge.increment(1.0);
        let _idle = BusyGuard(self.token.busy_gauge.clone());
        let mut down = false;
        while let Some(job) = self.batch.pop() {
            // A token taken out of rotation meanwhile (by another worker, or for bad signatures) signs no more.
            if down || !self.token.healthy.load(Ordering::Acquire) {
                self.requeue(job);
                continue;
            }
            if let Flow::TokenDown = self.process(job) {
                down = true;
            }
            self.release_held(false);
        }
        self.release_held(true);
        true
    }

    /// Sends the held answers when `all`, or when holding them over one more signature would exceed the bounds.
    fn release_held(&mut self, all: bool) {
        let Some(since) = self.held_since else {
            return;
        };
        let due = all
            || self.held.len() >= REPLY_GROUP
            || since.elapsed().saturating_add(self.sign_avg) > REPLY_DELAY;
        if !due {
            return;
        }
        self.held_since = None;
        let mut held = std::mem::take(&mut self.held);
        for (job, sig) in held.drain(..) {
            self.finish(job, Ok(sig));
        }
        // Keep the allocation for the next group.
        self.held = held;
    }

    /// Sends a job back to the retry queue (for another worker, usually on another token).
    fn requeue(&self, job: Job) {
        if let Err(e) = self.shared.retry_tx.send(job) {
            // Cannot happen while the pipeline exists (it holds the receiver); answer rather than lose it.
            e.into_inner().answer(Err(PipelineError::ShuttingDown));
        }
    }

    fn finish(&self, job: Job, result: Result<Vec<u8>, PipelineError>) {
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        let result = result.map(|sig| Signed {
            sig,
            token: self.token.clone(),
            answered: Instant::now(),
        });
        if job.answer(result) {
            self.handles.outcome(outcome);
        } else {
            self.handles.outcome("abandoned");
        }
    }

    fn key(&mut self, index: u32) -> Result<Key, signet_pkcs11::Error> {
        let i = index as usize;
        if let Some(Some(k)) = self.keys.get(i) {
            return Ok(k.clone());
        }
        let Some(reg) = self.shared.registered(index) else {
            return Err(signet_pkcs11::Error::new(
                signet_pkcs11::ErrorKind::KeyNotFound,
                format!("no key registered with the pipeline under slot {index}"),
            ));
        };
        let Some(session) = self.session.as_mut() else {
            return Err(signet_pkcs11::Error::new(
                signet_pkcs11::ErrorKind::Stale,
                "the worker has no open session",
            ));
        };
        let key = session.find_key(&reg.label)?;
        // Every token behind the authority must hold the same key: check the public half once per session.
        let spki = session.public_key_der(&reg.label)?;
        if spki.as_slice() != &*reg.spki {
            return Err(signet_pkcs11::Error::new(
                signet_pkcs11::ErrorKind::KeyTypeMismatch,
                format!(
                    "token {:?} holds a different key under label {:?} than the pipeline registered",
                    self.token.name, reg.label
                ),
            ));
        }
        if self.keys.len() <= i {
            self.keys.resize(i + 1, None);
        }
        if let Some(slot) = self.keys.get_mut(i) {
            *slot = Some(key.clone());
        }
        Ok(key)
    }

    fn process(&mut self, mut job: Job) -> Flow {
        if job.abandoned() {
            self.handles.outcome("abandoned");
            job.disarm();
            return Flow::Continue;
        }
        if Instant::now() >= job.deadline {
            self.finish(job, Err(PipelineError::DeadlineExceeded));
            return Flow::Continue;
        }
        let _span =
            tracing::trace_span!("sign_job", job = job.id, attempts = job.attempts).entered();
        self.handles
            .queue_wait
            .record(job.enqueued.elapsed().as_secs_f64());
        let mut relooked = false;
        loop {
            let result = self.key(job.key).and_then(|key| {
                let Some(session) = self.session.as_mut() else {
                    return Err(signet_pkcs11::Error::new(
                        signet_pkcs11::ErrorKind::Stale,
                        "the worker has no open session",
                    ));
                };
                let started = Instant::now();
                let r = if job.alg.hash().is_some() {
                    session.sign_digest(&key, job.alg, &job.data)
                } else {
                    session.sign_message(&key, job.alg, &job.data)
                };
                let took = started.elapsed();
                self.sign_seconds.record(took.as_secs_f64());
                self.sign_avg = self.sign_avg.saturating_mul(7).saturating_add(took) / 8;
                r
            });
            let err = match result {
                Ok(sig) => {
                    self.token.signatures.fetch_add(1, Ordering::Relaxed);
                    self.held_since.get_or_insert_with(Instant::now);
                    self.held.push((job, sig));
                    return Flow::Continue;
                }
                Err(e) => e,
            };
            if err.is_stale_handle() && !relooked && Instant::now() < job.deadline {
                // The token forgot the handle (a cluster fail-over): find the key again by label, retry once.
                tracing::warn!(token = %self.token.name, error = %err, "stale key handle: looking the key up again");
                relooked = true;
                if let Some(slot) = self.keys.get_mut(job.key as usize) {
                    *slot = None;
                }
                if let (Some(reg), Some(session)) =
                    (self.shared.registered(job.key), self.session.as_mut())
                {
                    session.forget_key(&reg.label);
                }
                continue;
            }
            if !err.is_transient() {
                tracing::warn!(token = %self.token.name, error = %err, "permanent token error");
                let e = match err.kind() {
                    signet_pkcs11::ErrorKind::InvalidInput => {
                        PipelineError::InvalidRequest(err.to_string())
                    }
                    _ => PipelineError::Key(format!("token {:?}: {err}", self.token.name)),
                };
                self.finish(job, Err(e));
                return Flow::Continue;
            }
            self.token.failures.fetch_add(1, Ordering::Relaxed);
            self.token.failure_counter.increment(1);
            job.attempts += 1;
            tracing::warn!(token = %self.token.name, error = %err, attempts = job.attempts, "transient token error");
            if job.attempts >= self.shared.config.max_attempts {
                self.finish(
                    job,
                    Err(PipelineError::Unavailable {
                        reason: format!(
                            "{} attempts failed transiently, last on token {:?}: {err}",
                            self.shared.config.max_attempts, self.token.name
                        ),
                        retry_after: self.shared.config.backoff_initial,
                    }),
                );
                return Flow::Continue;
            }
            if Instant::now() >= job.deadline {
                self.finish(job, Err(PipelineError::DeadlineExceeded));
                return Flow::Continue;
            }
            if let Err(re) = self.recover_session(err.recovery()) {
                self.shared.mark_down(&self.token, &re.to_string());
                self.session = None;
                self.keys.clear();
                self.requeue(job);
                return Flow::TokenDown;
            }
        }
    }

    /// Recovers the session in place after a transient failure.
    fn recover_session(&mut self, class: RvClass) -> Result<(), signet_pkcs11::Error> {
        let Some(session) = self.session.as_mut() else {
            let s = self.token.opener.open()?;
            self.session = Some(s);
            self.keys.clear();
            return Ok(());
        };
        match class {
            RvClass::Retry => std::thread::sleep(Duration::from_millis(1)),
            RvClass::Reinitialize => {
                self.token.opener.reinitialize(session.generation())?;
                self.keys.clear();
                session.reopen()?;
            }
            _ => {
                self.keys.clear();
                session.reopen()?;
            }
        }
        Ok(())
    }

    /// The token is out of rotation (or this worker has no session): wait with backoff and probe until a session
    /// opens. While no token at all is in rotation, queued jobs are answered `Unavailable` at once. Returns false
    /// when the pipeline stops.
    fn recover(&mut self) -> bool {
        let shared = self.shared.clone();
        let cfg = &shared.config;
        let mut backoff = cfg.backoff_initial;
        loop {
            if self.shared.healthy_tokens.load(Ordering::Acquire) == 0 {
                self.shared.fail_queued();
            }
            match self.shared.stop_rx.recv_timeout(backoff) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return false,
            }
            let probe = match self.session.as_mut() {
                Some(s) => s.reopen(),
                None => self.token.opener.open().map(|s| {
                    self.session = Some(s);
                }),
            };
            let probe = probe.map_err(|e| (e.to_string(), Some(e))).and_then(|()| {
                self.keys.clear();
                if self.token.needs_probe.load(Ordering::Acquire) {
                    self.probe_signatures().map_err(|r| (r.to_string(), None))
                } else {
                    Ok(())
                }
            });
            match probe {
                Ok(()) => {
                    if self.token.needs_probe.swap(false, Ordering::AcqRel) {
                        tracing::info!(token = %self.token.name, "a probe signature verified");
                    }
                    self.shared.probe_passed(&self.token);
                    self.shared.mark_up(&self.token);
                    return true;
                }
                Err((reason, None)) => {
                    tracing::warn!(token = %self.token.name, reason, "the token's probe signature failed: it stays out of rotation");
                    backoff = (backoff * 2).min(cfg.backoff_max);
                }
                Err((_, Some(e))) => {
                    tracing::debug!(token = %self.token.name, error = %e, "token still unavailable");
                    if e.recovery() == RvClass::Reinitialize
                        && let Some(s) = self.session.as_ref()
                    {
                        let _ = self.token.opener.reinitialize(s.generation());
                    }
                    backoff = (backoff * 2).min(cfg.backoff_max);
                }
            }
        }
    }

    /// Signs [`PROBE_MESSAGE`] with every registered key and checks each signature against the key's public half
    /// (on this thread: probes are rare). Says why when one cannot be made or does not verify.
    fn probe_signatures(&mut self) -> Result<(), ProbeError> {
        let keys = self.shared.registered_all();
        if keys.is_empty() {
            return Err(ProbeError::NoKey);
        }
        for (i, reg) in keys.iter().enumerate() {
            let index = u32::try_from(i).map_err(|_| ProbeError::TooManyKeys)?;
            let key = self.key(index).map_err(|source| ProbeError::Key {
                label: reg.label.clone(),
                source,
            })?;
            let (alg, data) = super::key::job_data(reg.key_type.x509_scheme(), PROBE_MESSAGE);
            let Some(session) = self.session.as_mut() else {
                return Err(ProbeError::NoSession);
            };
            let sig = if alg.hash().is_some() {
                session.sign_digest(&key, alg, &data)
            } else {
                session.sign_message(&key, alg, &data)
            }
            .map_err(|source| ProbeError::Sign {
                label: reg.label.clone(),
                source,
            })?;
            let verified = reg
                .verifier
                .as_ref()
                .is_some_and(|v| v.verify(alg, &data, &sig));
            if !verified {
                return Err(ProbeError::NotVerified {
                    label: reg.label.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Why a token's probe signature could not be made or did not verify (the token then stays out of rotation).
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    /// Nothing to sign with.
    #[error("no key is registered to make a probe signature with")]
    NoKey,
    /// More keys than a key index holds.
    #[error("too many keys")]
    TooManyKeys,
    /// The key cannot be found on the token.
    #[error("key {label:?}: {source}")]
    Key {
        /// The key's label.
        label: std::sync::Arc<str>,
        /// The token's error.
        #[source]
        source: signet_pkcs11::Error,
    },
    /// The worker has no session to sign in.
    #[error("the worker has no open session")]
    NoSession,
    /// The token failed the signature.
    #[error("key {label:?}: the probe signature failed: {source}")]
    Sign {
        /// The key's label.
        label: std::sync::Arc<str>,
        /// The token's error.
        #[source]
        source: signet_pkcs11::Error,
    },
    /// The signature does not verify against the key's public half.
    #[error("key {label:?}: the probe signature does not verify")]
    NotVerified {
        /// The key's label.
        label: std::sync::Arc<str>,
    },
}
