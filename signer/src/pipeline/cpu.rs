//! The CPU pool: a fixed set of threads for CPU-bound issuance work (CSR verification, DER building, lint, post-sign
//! verification, software signing in delegated mode), off tokio's reactor threads and out of the HSM workers.
//!
//! Tasks go through a bounded queue; a full queue refuses at once with `Overloaded`. A task whose caller has gone
//! (its result future dropped) is skipped when a thread picks it up. A task that panics does not take its thread
//! with it, and its caller is answered `Internal` (never left waiting). X509-SVIDs in direct mode never wait on a pool
//! thread for the token (see `svid.rs`), but other signatures through the pipeline do (JWT-SVIDs, CAs minted for
//! SPIRE: rcgen's and the JWT code's synchronous `sign`), so the default pool has more threads than cores.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use tokio::sync::oneshot;

use super::error::PipelineError;

type Task = Box<dyn FnOnce() + Send + 'static>;

struct CpuInner {
    tx: Sender<Task>,
    rx: Receiver<Task>,
    closed: AtomicBool,
    capacity: usize,
    threads: usize,
    stop: Mutex<Option<Sender<()>>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

/// A fixed pool of CPU threads with a bounded task queue (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct CpuPool {
    inner: Arc<CpuInner>,
}

impl std::fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPool")
            .field("threads", &self.inner.threads)
            .field("queued", &self.inner.tx.len())
            .field("capacity", &self.inner.capacity)
            .finish()
    }
}

/// The result of a task run on the [`CpuPool`]: a future.
#[derive(Debug)]
pub struct CpuTask<T> {
    state: CpuTaskState<T>,
}

#[derive(Debug)]
enum CpuTaskState<T> {
    Refused(Option<PipelineError>),
    Waiting(oneshot::Receiver<Result<T, PipelineError>>),
}

impl<T> Future for CpuTask<T> {
    type Output = Result<T, PipelineError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // `CpuTask` holds no self-references: it is `Unpin` whenever `T` is, and we never move `T` out of a pin.
        let this = self.get_mut();
        match &mut this.state {
            CpuTaskState::Refused(e) => {
                Poll::Ready(Err(e.take().unwrap_or(PipelineError::ShuttingDown)))
            }
            CpuTaskState::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(PipelineError::ShuttingDown))),
        }
    }
}

impl CpuPool {
    /// Starts `threads` threads (at least 1) with a queue of `capacity` tasks (at least 1).
    pub fn new(threads: usize, capacity: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let capacity = capacity.max(1);
        let (tx, rx) = channel::bounded::<Task>(capacity);
        let (stop_tx, stop_rx) = channel::bounded::<()>(0);
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = rx.clone();
            let stop_rx = stop_rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("signet-cpu-{i}"))
                .spawn(move || run(rx, stop_rx));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    drop(stop_tx);
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(Self {
            inner: Arc::new(CpuInner {
                tx,
                rx,
                closed: AtomicBool::new(false),
                capacity,
                threads,
                stop: Mutex::new(Some(stop_tx)),
                handles: Mutex::new(handles),
            }),
        })
    }

    /// The number of threads.
    pub fn threads(&self) -> usize {
        self.inner.threads
    }

    /// Runs `f` on a pool thread; the returned future resolves to its result. Refuses at once with `Overloaded` when
    /// the queue is full and `ShuttingDown` after [`shutdown`](Self::shutdown); resolves to `Internal` if `f`
    /// panics.
    pub fn run<T, F>(&self, f: F) -> CpuTask<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let queued = self.queue(Box::new(move || {
            if tx.is_closed() {
                return; // the caller gave up: skip the work
            }
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| {
                tracing::error!("a CPU-pool task panicked");
                PipelineError::Internal("a CPU-pool task panicked".into())
            });
            let _ = tx.send(r);
        }));
        CpuTask {
            state: match queued {
                Ok(()) => CpuTaskState::Waiting(rx),
                Err(e) => CpuTaskState::Refused(Some(e)),
            },
        }
    }

    /// Queues `task`, or refuses it: `Overloaded` when the queue is full, `ShuttingDown` after a shutdown.
    fn queue(&self, task: Task) -> Result<(), PipelineError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(PipelineError::ShuttingDown);
        }
        match self.inner.tx.try_send(task) {
            Ok(()) => {
                if self.inner.closed.load(Ordering::SeqCst) {
                    self.drain();
                }
                Ok(())
            }
            Err(TrySendError::Full(_)) => {
                metrics::counter!(super::metrics::CPU_REFUSED).increment(1);
                Err(PipelineError::Overloaded {
                    capacity: self.inner.capacity,
                })
            }
            Err(TrySendError::Disconnected(_)) => Err(PipelineError::ShuttingDown),
        }
    }

    /// Runs `f` like [`run`](Self::run), except that a pool shutting down does not lose it: when the pool refuses
    /// it or drops it unrun (`ShuttingDown`), `f` runs on the calling thread. For the last step of work already
    /// done, which a shutdown must let finish (the check of a signature the token has made); `Overloaded` still
    /// refuses.
    pub async fn run_to_completion<T, F>(&self, f: F) -> Result<T, PipelineError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(Some(f)));
        let pools = slot.clone();
        let taken = move |s: &Mutex<Option<F>>| s.lock().unwrap_or_else(|p| p.into_inner()).take();
        match self.run(move || taken(&pools).map(|f| f())).await {
            Ok(Some(t)) => Ok(t),
            // Refused or dropped unrun, the closure is still here (a task that panicked answered `Internal`).
            Ok(None) | Err(PipelineError::ShuttingDown) => {
                taken(&slot).map(|f| f()).ok_or(PipelineError::ShuttingDown)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs `f` on a pool thread without waiting for it, or refuses it as [`run`](Self::run) does. A task queued
    /// and then dropped by a shutdown does not run.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> Result<(), PipelineError> {
        self.queue(Box::new(f))
    }

    /// Runs `f` exactly once without waiting for it: on a pool thread; on this thread when the pool refuses it (full
    /// or stopped); or on the thread that drops it unrun (a shutdown). For work that must not be lost, such as the
    /// rest of a certificate whose signature is already made.
    pub fn spawn_to_completion(&self, f: impl FnOnce() + Send + 'static) {
        struct RunOnce<F: FnOnce()>(Option<F>);
        impl<F: FnOnce()> Drop for RunOnce<F> {
            fn drop(&mut self) {
                if let Some(f) = self.0.take() {
                    f();
                }
            }
        }
        let once = RunOnce(Some(f));
        // Run, dropped unrun or refused, the task drops `once`, which runs `f`.
        let _ = self.queue(Box::new(move || drop(once)));
    }

    /// Drops every queued task unrun (their futures resolve to `ShuttingDown`).
    fn drain(&self) {
        while let Ok(task) = self.inner.rx.try_recv() {
            drop(task);
        }
    }

    /// Stops the threads after the task each is running; queued tasks are dropped (their futures resolve to
    /// `ShuttingDown`). Idempotent.
    pub fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let stop = self
            .inner
            .stop
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(stop);
        let handles: Vec<_> =
            std::mem::take(&mut *self.inner.handles.lock().unwrap_or_else(|p| p.into_inner()));
        let me = std::thread::current().id();
        for h in handles {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
        // Whatever is still queued is dropped unrun: the futures see a closed channel (`ShuttingDown`).
        self.drain();
    }
}

fn run(rx: Receiver<Task>, stop: Receiver<()>) {
    loop {
        crossbeam::channel::select! {
            recv(rx) -> task => match task {
                // A task that panics must not take the thread with it: `run`'s tasks answer their caller `Internal`
                // themselves; the state a spawned task owns answers from its `Drop` (e.g. an X509-SVID's slot).
                Ok(task) => {
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(task)).is_err() {
                        tracing::error!("a CPU-pool task panicked");
                    }
                }
                Err(_) => return,
            },
            recv(stop) -> _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stopped_pool_refuses_new_work_but_finishes_the_last_step() {
        let pool = CpuPool::new(1, 4).unwrap();
        assert_eq!(pool.run(|| 1).await.unwrap(), 1);
        assert_eq!(pool.run_to_completion(|| 2).await.unwrap(), 2);
        pool.shutdown();
        assert_eq!(pool.run(|| 3).await, Err(PipelineError::ShuttingDown));
        assert_eq!(pool.run_to_completion(|| 4).await, Ok(4));
    }

    /// A panicking task answers its caller `Internal` (it does not hang it), and the thread serves the next task.
    #[tokio::test]
    async fn a_panicking_task_answers_internal_and_the_pool_keeps_working() {
        let pool = CpuPool::new(1, 4).unwrap();
        let r: Result<u32, _> = pool.run(|| panic!("injected by the test")).await;
        assert!(matches!(r, Err(PipelineError::Internal(_))), "{r:?}");
        let r: Result<u32, _> = pool
            .run_to_completion(|| panic!("injected by the test"))
            .await;
        assert!(matches!(r, Err(PipelineError::Internal(_))), "{r:?}");
        assert_eq!(pool.run(|| 7).await, Ok(7));
        pool.shutdown();
    }

    #[test]
    fn spawn_to_completion_runs_on_the_caller_when_the_pool_refuses() {
        use std::sync::mpsc;
        let here = || std::thread::current().name().unwrap_or("").to_string();
        let pool = CpuPool::new(1, 1).unwrap();
        let (tx, rx) = mpsc::channel();
        let t = tx.clone();
        pool.spawn_to_completion(move || t.send(here()).unwrap());
        assert_eq!(rx.recv().unwrap(), "signet-cpu-0");
        // Hold the only thread, fill the one-slot queue: the next one runs on this thread.
        let (started_tx, started_rx) = mpsc::channel();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        pool.spawn(move || {
            started_tx.send(()).unwrap();
            let _ = gate_rx.recv();
        })
        .unwrap();
        started_rx.recv().unwrap();
        let t = tx.clone();
        pool.spawn(move || t.send("queued".to_string()).unwrap())
            .unwrap();
        let t = tx.clone();
        pool.spawn_to_completion(move || t.send(here()).unwrap());
        assert_eq!(rx.recv().unwrap(), here());
        drop(gate_tx);
        assert_eq!(rx.recv().unwrap(), "queued");
        pool.shutdown();
        pool.spawn_to_completion(move || tx.send(here()).unwrap());
        assert_eq!(rx.recv().unwrap(), here());
    }
}
