//! The load driver of every target the bench measures with its own clients (signet's API, a SPIRE server's agent
//! API, cfssl's HTTP API): closed loop (`concurrency` agents, each sending its next request when the last one is
//! answered) or open loop (requests start on schedule whatever the answers do, at most `concurrency` in flight;
//! latency counts from the moment a request was due). The request itself is the caller's: a function of (agent,
//! sequence number) that answers what it received, or the kind of its failure.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::load::Outcome;

/// How a run offers load.
#[derive(Debug, Clone, Copy)]
pub struct Offer {
    /// Agents (closed loop) or the most requests in flight (open loop).
    pub concurrency: usize,
    /// Stop after this many requests.
    pub requests: Option<u64>,
    /// Stop after this long (at most `hard_limit` in any case).
    pub duration: Option<Duration>,
    /// Open loop: credentials a second offered.
    pub rate: Option<f64>,
    /// Credentials one request asks for (open loop: requests a second are `rate / per_request`).
    pub per_request: usize,
    /// The longest a run may last, whatever the flags say.
    pub hard_limit: Duration,
}

/// Runs `offer` with `request` to its end and sums what came back; `progress` counts credentials as they arrive.
pub async fn drive<F, Fut>(offer: Offer, progress: Arc<AtomicU64>, request: F) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Outcome, String>> + Send + 'static,
{
    drive_counted(offer, progress, move |agent, seq| {
        let answer = request(agent, seq);
        async move {
            match answer.await {
                Ok(got) => (true, got),
                Err(kind) => {
                    let mut out = Outcome::default();
                    out.error(kind);
                    (false, out)
                }
            }
        }
    })
    .await
}

/// [`drive`] for a request that keeps its own account even when it fails (failovers, the errors of each attempt):
/// it answers whether it was answered, and what it saw. An answered request counts once, with its latency.
pub async fn drive_counted<F, Fut>(offer: Offer, progress: Arc<AtomicU64>, request: F) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (bool, Outcome)> + Send + 'static,
{
    let start = Instant::now();
    let deadline = start
        + offer
            .duration
            .unwrap_or(offer.hard_limit)
            .min(offer.hard_limit);
    let mut total = match offer.rate {
        None => closed(offer, deadline, progress, request).await,
        Some(rate) => open(offer, rate, deadline, progress, request).await,
    };
    total.elapsed = start.elapsed();
    total
}

/// How long one request may take past the run's end before it counts as a client timeout.
const GRACE: Duration = Duration::from_secs(30);

/// Adds one request's result to `out`: its latency (from `since`) and one answered request if it was answered.
fn count(out: &mut Outcome, progress: &AtomicU64, since: Instant, result: Option<(bool, Outcome)>) {
    match result {
        Some((answered, got)) => {
            progress.fetch_add(got.credentials, Ordering::Relaxed);
            if answered {
                out.requests += 1;
                out.latencies_us.push(since.elapsed().as_micros() as u64);
            }
            out.merge(got);
        }
        None => out.error("client timeout"),
    }
}

async fn closed<F, Fut>(
    offer: Offer,
    deadline: Instant,
    progress: Arc<AtomicU64>,
    request: F,
) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (bool, Outcome)> + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(offer.concurrency);
    for agent in 0..offer.concurrency.max(1) {
        let (next, request, progress) = (next.clone(), request.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if offer.requests.is_some_and(|n| seq >= n) || Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                let left = deadline.saturating_duration_since(t);
                let result = tokio::time::timeout(left + GRACE, request(agent, seq)).await;
                count(&mut out, &progress, t, result.ok());
            }
            out
        }));
    }
    let mut total = Outcome::default();
    for t in tasks {
        match t.await {
            Ok(o) => total.merge(o),
            Err(e) => total.error(format!("agent task failed: {e}")),
        }
    }
    total
}

async fn open<F, Fut>(
    offer: Offer,
    rate: f64,
    deadline: Instant,
    progress: Arc<AtomicU64>,
    request: F,
) -> Outcome
where
    F: Fn(usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (bool, Outcome)> + Send + 'static,
{
    let interval = Duration::from_secs_f64(offer.per_request.max(1) as f64 / rate.max(1e-3));
    let limit = Arc::new(tokio::sync::Semaphore::new(offer.concurrency.max(1)));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    let start = Instant::now();
    let mut dropped = 0u64;
    let mut seq = 0u64;
    loop {
        let due = start + interval.mul_f64(seq as f64);
        if due >= deadline || offer.requests.is_some_and(|n| seq >= n) {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // Every slot busy: the offered rate is beyond what answers come back at. Counted, never queued here.
            dropped += 1;
            seq += 1;
            continue;
        };
        let (request, tx, progress) = (request.clone(), tx.clone(), progress.clone());
        let agent = (seq % offer.concurrency.max(1) as u64) as usize;
        tokio::spawn(async move {
            let mut out = Outcome::default();
            let result = tokio::time::timeout(GRACE, request(agent, seq)).await;
            count(&mut out, &progress, due, result.ok());
            drop(permit);
            let _ = tx.send(out);
        });
        seq += 1;
    }
    drop(tx);
    let mut total = Outcome::default();
    while let Some(o) = rx.recv().await {
        total.merge(o);
    }
    if dropped > 0 {
        *total
            .errors
            .entry("not sent: all agents busy".into())
            .or_default() += dropped;
    }
    total
}

/// CPU seconds (user + system) of process `pid` and of its children that are still running (SPIRE's plug-ins),
/// from /proc (clock ticks of 1/100 s); `None` when the process is gone or /proc cannot be read.
pub fn process_tree_cpu_seconds(pid: u32) -> Option<f64> {
    let own = stat_of(&format!("/proc/{pid}/stat"))?;
    let mut ticks = own.utime + own.stime;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Some(s) = stat_of(&format!("/proc/{name}/stat"))
            && s.ppid == pid
        {
            ticks += s.utime + s.stime;
        }
    }
    Some(ticks as f64 / 100.0)
}

struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
}

fn stat_of(path: &str) -> Option<Stat> {
    let text = std::fs::read_to_string(path).ok()?;
    // After the command name (in parentheses, which may hold spaces): state, ppid, ... utime (14th field of the
    // line, 12th after the name), stime.
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        utime: fields.get(11)?.parse().ok()?,
        stime: fields.get(12)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time() {
        // Spin a little so that at least one tick is spent.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let cpu = process_tree_cpu_seconds(std::process::id()).unwrap();
        assert!(cpu > 0.0, "{cpu}");
        assert!(process_tree_cpu_seconds(u32::MAX).is_none());
    }

    #[tokio::test]
    async fn closed_loop_counts_requests_credentials_and_failures() {
        let offer = Offer {
            concurrency: 3,
            requests: Some(30),
            duration: None,
            rate: None,
            per_request: 2,
            hard_limit: Duration::from_secs(60),
        };
        let progress = Arc::new(AtomicU64::new(0));
        let out = drive(offer, progress.clone(), |_agent, seq| async move {
            if seq % 10 == 9 {
                return Err("refused".to_string());
            }
            Ok(Outcome {
                credentials: 2,
                ..Outcome::default()
            })
        })
        .await;
        assert_eq!(out.requests, 27);
        assert_eq!(out.credentials, 54);
        assert_eq!(progress.load(Ordering::Relaxed), 54);
        assert_eq!(out.errors.get("refused"), Some(&3));
        assert_eq!(out.latencies_us.len(), 27);
    }
}
