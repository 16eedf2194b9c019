//! Bounded waits on a condition: a test that needs something to happen (a process to write a file, a stream to
//! reconnect, a replica to take over) looks at it again and again until it holds, and fails naming what never
//! happened once `within` has passed. The bound is a guard against a hang, never a claim about speed: make it
//! generous (tens of seconds), so that a slow, loaded machine cannot fail a test that is right.
//!
//! The looks start 1 ms apart and back off to 100 ms apart.

use std::future::Future;
use std::time::{Duration, Instant};

const FIRST_PAUSE: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// Waits until `done` answers true; fails the test with `what` if it has not after `within`.
pub fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    wait_for(what, within, || {
        if done() { Ok(()) } else { Err(String::new()) }
    })
}

/// Waits until `look` answers `Ok`, and returns its value; fails the test with `what` and the last `Err` (the
/// state seen, to say why it never happened) if it has not after `within`.
pub fn wait_for<T>(what: &str, within: Duration, mut look: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    loop {
        match look() {
            Ok(v) => return v,
            Err(last) => timed_out(what, within, deadline, &last),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// [`wait_until`] for an async condition, without blocking the runtime.
pub async fn wait_until_async<F>(what: &str, within: Duration, mut done: impl FnMut() -> F)
where
    F: Future<Output = bool>,
{
    wait_for_async(what, within, || {
        let f = done();
        async move { if f.await { Ok(()) } else { Err(String::new()) } }
    })
    .await
}

/// [`wait_for`] for an async look, without blocking the runtime.
pub async fn wait_for_async<T, F>(what: &str, within: Duration, mut look: impl FnMut() -> F) -> T
where
    F: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    loop {
        match look().await {
            Ok(v) => return v,
            Err(last) => timed_out(what, within, deadline, &last),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

fn timed_out(what: &str, within: Duration, deadline: Instant, last: &str) {
    if Instant::now() >= deadline {
        if last.is_empty() {
            panic!("never happened within {within:?}: {what}");
        }
        panic!("never happened within {within:?}: {what}; last seen: {last}");
    }
}
