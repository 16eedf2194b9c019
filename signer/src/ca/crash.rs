//! Crash points: places in a rotation step where a test can have the process stop so that it can kill it there
//! (SIGKILL) and check what a restart makes of the datastore and the token.
//!
//! They exist only in a build with the cargo feature `crash-points` (never in a release build of the appliance):
//! without it [`reached`] is an empty inline function. With it, the environment variable `SIGNET_CRASH_POINT` names
//! one point (`STEP:before-journal`, `STEP:after-journal` or `STEP:after-effect`, where STEP is prepare, publish,
//! activate, retire, taint or destroy); when the process reaches that point it prints
//! `signet: crash point STEP:WHERE reached` on stderr and stops there, holding its locks, until it is killed. Stopping
//! (rather than aborting) lets the test deliver the SIGKILL itself, exactly as an operator's `kill -9` or a power
//! cut would arrive, at a moment the test knows.

/// The clock of the appliance: the system's. With the `crash-points` feature, `SIGNET_TEST_CLOCK_OFFSET_FILE` may
/// name a file holding a number of seconds added to the system time (read at every call), so that a test can move
/// a running appliance's rotation clock past the publish lead or a root's descendants without sleeping.
pub fn clock() -> std::sync::Arc<dyn super::Clock> {
    #[cfg(feature = "crash-points")]
    if let Some(path) = std::env::var_os("SIGNET_TEST_CLOCK_OFFSET_FILE") {
        return std::sync::Arc::new(OffsetClock(path.into()));
    }
    std::sync::Arc::new(super::SystemClock)
}

/// The system time plus the seconds in a file (test builds only).
#[cfg(feature = "crash-points")]
#[derive(Debug)]
struct OffsetClock(std::path::PathBuf);

#[cfg(feature = "crash-points")]
impl super::Clock for OffsetClock {
    fn now(&self) -> time::OffsetDateTime {
        let offset = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .unwrap_or(0);
        time::OffsetDateTime::now_utc() + time::Duration::seconds(offset)
    }
}

/// Called at a crash point.
#[cfg(feature = "crash-points")]
pub fn reached(step: &str, at: &str) {
    let Ok(want) = std::env::var("SIGNET_CRASH_POINT") else {
        return;
    };
    if want != format!("{step}:{at}") {
        return;
    }
    eprintln!("signet: crash point {step}:{at} reached");
    loop {
        std::thread::park();
    }
}

/// Called at a crash point (a no-op: built without the `crash-points` feature).
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn reached(_step: &str, _at: &str) {}
