//! Several replicas of signet on one PostgreSQL datastore: one trust domain, no single point of failure.
//!
//! Replicas share an existing, trusted engine and nothing else: the datastore ([`crate::store`]) holds the
//! authorities, the rotation journal, the bundle's sequence, the JWT keys SPIRE servers published and the
//! KeyManager keys' records; the keys themselves are on the HSM, which the vendor's cluster replicates. What each
//! replica runs besides serving:
//!
//! - **Following** ([`follow_changes`]): every commit announces what it changed on a PostgreSQL channel
//!   (`LISTEN`/`NOTIFY`, in the same transaction, so the announcement and the change arrive together); each replica
//!   re-reads the authorities and the bundle when told, and every few seconds anyway in case a notification was
//!   lost. A bundle change made through any replica reaches the subscription streams of all of them within a second.
//! - **Leading** ([`lead_rotations`]): exactly one replica runs the rotation schedule, the one holding a PostgreSQL
//!   advisory lock on a connection of its own. If it dies, the database drops its session and the lock with it;
//!   another replica takes the lock at its next check, finishes the step the dead one left half done (a `preparing`
//!   or `destroy`-requested row, under the step lock that every step takes, so it cannot belong to a live process)
//!   and carries on with the schedule. Steps taken by hand through any replica take the same step lock.
//! - **Heartbeat** ([`heartbeat`]): each replica records itself every [`HEARTBEAT`] and counts the replicas seen
//!   within [`LIVE_WINDOW`]; per-caller rate limits are divided by that count ([`crate::policy::Policy::set_share`]).
//!   The bound: with N live replicas, each grants a caller at most `rate / N` per second and `burst / N` at once (or
//!   one request's cost), so together at most the configured rate however the caller's requests are spread. While
//!   a replica joins, the others learn of it within one heartbeat, and for that long the sum may reach
//!   `rate × (N+1)/N`; while one leaves, the others keep the smaller share for up to [`LIVE_WINDOW`] (they grant
//!   less, never more). A caller that reaches only one replica gets `rate / N`: the safe side.
//!
//! - **Own credentials**: the heartbeat also records which roots signed the credentials the replica serves now (its
//!   server and admin X509-SVIDs, renewed by [`crate::own`] right after every activate); `retire` of a root is
//!   refused while a live replica still reports it ([`crate::ca::Authorities::retire`]), so no replica is left
//!   serving a credential its clients no longer trust, and no replica has to be restarted for a rotation.
//!
//! With SQLite the datastore belongs to one process: none of this runs, and the process leads alone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::ca::Authorities;
use crate::store::{ReplicaRecord, Store};

/// How often a replica records its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
pub use crate::store::LIVE_WINDOW;
/// How often a replica re-reads the datastore even without notifications.
pub const RESYNC_EVERY: Duration = Duration::from_secs(5);

/// This replica, as `Admin.GetStatus` shows it.
#[derive(Debug)]
pub struct Replication {
    /// The datastore's engine.
    pub engine: &'static str,
    /// This replica's id (empty with SQLite).
    pub id: String,
    /// Unix seconds.
    pub started_at: i64,
    leader: AtomicBool,
    live: std::sync::Mutex<Vec<ReplicaRecord>>,
    /// The roots (see [`crate::x509::root_id`]) that signed the credentials this replica serves now.
    serving_roots: std::sync::Mutex<Vec<String>>,
    /// Asks the heartbeat to record at once (after this replica's own credentials changed).
    beat_now: tokio::sync::Notify,
}

impl Replication {
    /// A replica named `id` on a datastore of `engine`.
    pub fn new(engine: &'static str, id: String) -> Self {
        Self {
            engine,
            id,
            started_at: time::OffsetDateTime::now_utc().unix_timestamp(),
            leader: AtomicBool::new(false),
            live: std::sync::Mutex::new(Vec::new()),
            serving_roots: std::sync::Mutex::new(Vec::new()),
            beat_now: tokio::sync::Notify::new(),
        }
    }

    /// A process alone on its datastore.
    pub fn single(engine: &'static str) -> Self {
        Self::new(engine, String::new())
    }

    /// Whether this replica runs the rotation schedule.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// The replicas the last heartbeat saw.
    pub fn live(&self) -> Vec<ReplicaRecord> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records which roots signed the credentials this replica serves now (its own server and admin X509-SVIDs)
    /// and has the heartbeat report them at once.
    pub fn set_serving_roots(&self, roots: Vec<String>) {
        *self.serving_roots.lock().unwrap_or_else(|p| p.into_inner()) = roots;
        self.beat_now.notify_one();
    }

    /// The roots that signed the credentials this replica serves now.
    pub fn serving_roots(&self) -> Vec<String> {
        self.serving_roots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The default replica id: the host's name and the port served.
pub fn default_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{port}")
}

/// Records this replica's heartbeat every [`HEARTBEAT`] and keeps the rate limits' share at the live count
/// (`set_share` is told the count and says whether the share changed); leaves the table at a clean stop.
pub async fn heartbeat(
    store: Store,
    repl: Arc<Replication>,
    set_share: impl Fn(u32) -> bool + Send + 'static,
    address: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let window = i64::try_from(LIVE_WINDOW.as_secs()).unwrap_or(6);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = repl.beat_now.notified() => {}
            () = crate::shutdown::until_shutdown(&mut shutdown) => {
                if let Err(e) = store.leave(&repl.id).await {
                    tracing::debug!(error = %e, "cannot remove this replica's heartbeat");
                }
                return;
            }
        }
        let me = ReplicaRecord {
            id: repl.id.clone(),
            address: address.clone(),
            started_at: repl.started_at,
            seen_at: time::OffsetDateTime::now_utc().unix_timestamp(),
            serving_roots: Some(repl.serving_roots().join(",")),
        };
        match store.heartbeat(&me, window).await {
            Ok(live) => {
                let n = u32::try_from(live.len().max(1)).unwrap_or(u32::MAX);
                if set_share(n) {
                    tracing::info!(
                        replicas = n,
                        "live replicas changed: each grants 1/{n} of every rate limit"
                    );
                }
                metrics::gauge!("signet_replicas_live").set(f64::from(n));
                *repl.live.lock().unwrap_or_else(|p| p.into_inner()) = live;
            }
            Err(e) => tracing::warn!(error = %e, "cannot record this replica's heartbeat"),
        }
    }
}

/// Cached KeyManager keys that another replica changed, for [`follow_changes`] to have forgotten.
#[derive(Debug, Clone, Copy)]
pub enum Forget<'a> {
    /// One key (namespace, key id) was replaced.
    Key(&'a str, &'a str),
    /// A namespace was swept.
    Namespace(&'a str),
    /// Anything may have changed.
    All,
}

/// Follows what other replicas commit: re-reads the authorities and the bundle when the datastore announces a
/// change (and every [`RESYNC_EVERY`]), and has `forget_keys` drop the cached KeyManager keys another replica
/// replaced or swept.
pub async fn follow_changes(
    store: Store,
    forget_keys: impl Fn(Forget<'_>) + Send + 'static,
    authorities: Arc<Authorities>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(mut changes) = store.follow_changes() else {
        return;
    };
    let mut resync = tokio::time::interval(RESYNC_EVERY);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut reload = false;
        tokio::select! {
            _ = resync.tick() => reload = true,
            got = changes.recv() => {
                let Some(first) = got else { return };
                // Take everything already queued at once: one re-read answers a burst of announcements.
                let mut batch = vec![first];
                while let Ok(more) = changes.try_recv() {
                    batch.push(more);
                }
                for what in batch {
                    let mut words = what.split(' ');
                    match (words.next(), words.next(), words.next()) {
                        (Some("keymanager"), Some(ns), Some(id)) => forget_keys(Forget::Key(ns, id)),
                        (Some("keymanager-swept"), Some(ns), _) => forget_keys(Forget::Namespace(ns)),
                        (Some("resync"), _, _) => {
                            forget_keys(Forget::All);
                            reload = true;
                        }
                        _ => reload = true,
                    }
                }
            }
            () = crate::shutdown::until_shutdown(&mut shutdown) => return,
        }
        if reload {
            match authorities.reload().await {
                Ok(true) => tracing::debug!("took up changes another replica committed"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot re-read the datastore"),
            }
        }
    }
}

/// Runs the rotation schedule every `every` while this replica holds the schedule lock, and tries to take the
/// lock at the same pace while another replica holds it. On taking it (and on every tick), steps a dead replica
/// left half done are finished first.
pub async fn lead_rotations(
    store: Store,
    repl: Arc<Replication>,
    authorities: Arc<Authorities>,
    every: Duration,
    schedule: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut lead = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = crate::shutdown::until_shutdown(&mut shutdown) => return,
        }
        match lead.as_mut() {
            None => match store.try_lead().await {
                Ok(Some(l)) => {
                    if store.is_shared() {
                        tracing::info!(
                            replica = repl.id,
                            "this replica now runs the rotation schedule"
                        );
                    }
                    lead = Some(l);
                    repl.leader.store(true, Ordering::Relaxed);
                }
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot try the rotation schedule's lock");
                    continue;
                }
            },
            Some(l) => {
                if !l.still_held().await {
                    tracing::warn!("lost the rotation schedule's lock (datastore connection lost)");
                    lead = None;
                    repl.leader.store(false, Ordering::Relaxed);
                    continue;
                }
            }
        }
        if store.is_shared() {
            match authorities.finish_abandoned().await {
                Ok(true) => {
                    tracing::warn!("finished a rotation step a stopped replica left half done")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot finish a half-done rotation step"),
            }
        }
        if schedule {
            for (step, label) in authorities.tick().await {
                tracing::info!(step, label, "scheduled rotation step");
            }
        }
    }
}
