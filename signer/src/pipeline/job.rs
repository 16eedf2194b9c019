//! A signing job and its reply.
//!
//! A [`Job`] carries what the token needs (key slot, algorithm, a digest or, for Ed25519, the message), its deadline
//! and where its answer goes: its own reply channel (a `tokio::sync::oneshot`), or a [`Continuation`] that the
//! answering thread runs (X509-SVIDs in direct mode: it queues the rest of the certificate's work on the CPU pool, so
//! no thread waits for the token). It is answered exactly once: [`Job::answer`] consumes it, and a job dropped
//! unanswered answers from its `Drop`: `Internal` when it is dropped by a thread that panics (an HSM worker that
//! panicked while it held the job), `ShuttingDown` otherwise (a queue torn down). A successful answer carries the
//! token that made the signature, so that a signature failing its post-sign check counts against that token.
//!
//! The reply is awaitable from async code ([`Reply`] is a future) and blockable from a sync thread
//! ([`Reply::wait_until`], which parks the thread; it does not need or touch a tokio runtime).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use signet_pkcs11::SignAlgorithm;
use tokio::sync::oneshot;

use super::TokenState;
use super::error::PipelineError;

/// A signature and the token that made it.
pub(crate) struct Signed {
    pub(crate) sig: Vec<u8>,
    pub(crate) token: Arc<TokenState>,
    /// When the worker answered (the reply's hand-off time is measured from it).
    pub(crate) answered: Instant,
}

pub(crate) type SignResult = Result<Signed, PipelineError>;

impl std::fmt::Debug for Signed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signed")
            .field("token", &self.token.name)
            .finish_non_exhaustive()
    }
}

/// One signing job on its way through the queue to a worker.
pub(crate) struct Job {
    pub(crate) id: u64,
    pub(crate) key: u32,
    pub(crate) alg: SignAlgorithm,
    /// The digest (or the message, for Ed25519).
    pub(crate) data: Vec<u8>,
    pub(crate) deadline: Instant,
    pub(crate) enqueued: Instant,
    /// Sign attempts that failed transiently so far (on any token).
    pub(crate) attempts: u32,
    reply: Option<ReplyTo>,
}

/// Code that receives a job's answer, on the thread that answers it (an HSM worker, or the submitter when the job is
/// refused): it should only hand the result on.
pub(crate) trait Continuation: Send {
    /// Whether the caller gave up (the job is then dropped before it reaches the token, and answered).
    fn abandoned(&self) -> bool;
    /// Receives the answer.
    fn resume(self: Box<Self>, result: SignResult);
}

/// Where a job's answer goes.
enum ReplyTo {
    Channel(oneshot::Sender<SignResult>),
    Then(Box<dyn Continuation>),
}

impl ReplyTo {
    fn closed(&self) -> bool {
        match self {
            ReplyTo::Channel(tx) => tx.is_closed(),
            ReplyTo::Then(c) => c.abandoned(),
        }
    }

    fn send(self, result: SignResult) -> bool {
        match self {
            ReplyTo::Channel(tx) => tx.send(result).is_ok(),
            ReplyTo::Then(c) => {
                let wanted = !c.abandoned();
                c.resume(result);
                wanted
            }
        }
    }
}

impl Job {
    pub(crate) fn new(
        id: u64,
        key: u32,
        alg: SignAlgorithm,
        data: Vec<u8>,
        deadline: Instant,
    ) -> (Job, Reply) {
        let (tx, rx) = oneshot::channel();
        let job = Self::to(id, key, alg, data, deadline, ReplyTo::Channel(tx));
        (job, Reply { rx })
    }

    /// A job whose answer goes to `then`.
    pub(crate) fn with_continuation(
        id: u64,
        key: u32,
        alg: SignAlgorithm,
        data: Vec<u8>,
        deadline: Instant,
        then: Box<dyn Continuation>,
    ) -> Job {
        Self::to(id, key, alg, data, deadline, ReplyTo::Then(then))
    }

    fn to(
        id: u64,
        key: u32,
        alg: SignAlgorithm,
        data: Vec<u8>,
        deadline: Instant,
        reply: ReplyTo,
    ) -> Job {
        Job {
            id,
            key,
            alg,
            data,
            deadline,
            enqueued: Instant::now(),
            attempts: 0,
            reply: Some(reply),
        }
    }

    /// Whether the caller has given up (its reply receiver was dropped, or its continuation says so).
    pub(crate) fn abandoned(&self) -> bool {
        self.reply.as_ref().is_none_or(ReplyTo::closed)
    }

    /// Answers the job. Returns whether the caller was still there to receive it.
    pub(crate) fn answer(mut self, result: SignResult) -> bool {
        match self.reply.take() {
            Some(reply) => reply.send(result),
            None => false,
        }
    }

    /// Answers a job refused at submission: the caller of a reply channel gets the error from the submission itself
    /// (the channel is closed unanswered); a continuation receives it here.
    pub(crate) fn refuse(mut self, e: PipelineError) {
        if let Some(ReplyTo::Then(c)) = self.reply.take() {
            c.resume(Err(e));
        }
    }

    /// Drops an abandoned job. A reply channel is closed already; a continuation still receives an answer (it
    /// holds its caller's state and must run exactly once).
    pub(crate) fn disarm(self) {
        self.refuse(PipelineError::ShuttingDown);
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(reply) = self.reply.take() {
            let e = if std::thread::panicking() {
                PipelineError::Internal(
                    "the HSM worker holding the job panicked (it was replaced)".into(),
                )
            } else {
                PipelineError::ShuttingDown
            };
            reply.send(Err(e));
        }
    }
}

/// The reply to one job: a future for async callers, or [`wait_until`](Self::wait_until) for sync threads. Dropping
/// it tells the pipeline the caller gave up: the job is then dropped before it reaches the token.
#[derive(Debug)]
pub struct Reply {
    rx: oneshot::Receiver<SignResult>,
}

impl Future for Reply {
    type Output = Result<Vec<u8>, PipelineError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.poll_signed(cx).map(|r| r.map(|s| s.sig))
    }
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

thread_local! {
    static WAKER: Waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

impl Reply {
    fn poll_signed(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SignResult> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(PipelineError::ShuttingDown)))
    }

    /// The answer with the token that signed (for the post-sign check's accounting).
    pub(crate) async fn signed(mut self) -> SignResult {
        std::future::poll_fn(|cx| Pin::new(&mut self).poll_signed(cx)).await
    }

    /// Blocks the calling (non-async) thread until the answer arrives or `deadline` passes (then
    /// `DeadlineExceeded`, and the job is abandoned). Parks the thread; never needs a runtime.
    pub fn wait_until(self, deadline: Instant) -> Result<Vec<u8>, PipelineError> {
        self.wait_signed_until(deadline).map(|s| s.sig)
    }

    /// [`wait_until`](Self::wait_until), with the token that signed.
    pub(crate) fn wait_signed_until(mut self, deadline: Instant) -> SignResult {
        WAKER.with(|waker| {
            let mut cx = Context::from_waker(waker);
            loop {
                if let Poll::Ready(r) = Pin::new(&mut self).poll_signed(&mut cx) {
                    return r;
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(PipelineError::DeadlineExceeded);
                }
                std::thread::park_timeout(deadline - now);
            }
        })
    }
}

/// Runs `f` with `deadline` as the deadline of every pipeline signature made on this thread inside it (through
/// [`PipelineKey`](super::PipelineKey), whose `sign` has no deadline parameter: rcgen calls it).
pub fn with_deadline<R>(deadline: Instant, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Instant>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DEADLINE.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(DEADLINE.with(|d| d.replace(Some(deadline))));
    f()
}

/// The deadline set by [`with_deadline`] on this thread, if any.
pub(crate) fn current_deadline() -> Option<Instant> {
    DEADLINE.with(|d| d.get())
}
