//! Changing faults while a process runs. The module polls a control file (TOML with the keys of
//! [`FaultPlan`](crate::faults::FaultPlan)) at most every `control_poll_ms` and applies it when its content
//! changes; it writes what it injected to `<control file>.status.json`. [`Control`] is the safe API tests and tools
//! use to write that file and read those counters, from any process.
//!
//! One-shot faults are per process: every process that loaded the module with this control file arms them once
//! when it first sees a new `seq`.

use crate::faults::{Counters, FaultPlan, OpKind};
use crate::rv::Rv;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why the control file could not be written or the status read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// A file could not be read or written.
    #[error("hsm-sim control file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file did not have the expected content.
    #[error("hsm-sim control file {path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// Where a control file's status (the injected-fault counters) is written.
pub fn status_path(control_file: &Path) -> PathBuf {
    let mut name = control_file
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".status.json");
    control_file.with_file_name(name)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Writes the control file of a running hsm-sim (set `HSM_SIM_CONTROL` or `control_file` to the same path).
///
/// Each change writes a whole plan with a new `seq`. Level faults (`fail_rate`, `corrupt_rate`, `unplugged`)
/// carry over from one change to the next; one-shot faults (`fail_next`, `corrupt_next`, `unplug`,
/// `invalidate_sessions`, `invalidate_handles`) are armed by the change that sets them.
#[derive(Debug)]
pub struct Control {
    path: PathBuf,
    plan: FaultPlan,
}

impl Control {
    /// Starts a control file at `path` with no faults (replacing any previous one and its status).
    pub fn create(path: impl Into<PathBuf>) -> Result<Control, ControlError> {
        let path = path.into();
        let _ = std::fs::remove_file(status_path(&path));
        let c = Control {
            path,
            plan: FaultPlan::default(),
        };
        c.write()?;
        Ok(c)
    }

    /// The control file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The plan last written.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    fn write(&self) -> Result<(), ControlError> {
        let text = toml::to_string(&self.plan).map_err(|e| ControlError::Format {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&self.path, text.as_bytes())
    }

    /// Writes a change: one-shot fields start from zero, `change` sets what it wants, `seq` goes up.
    /// Returns the new `seq` (compare with [`Counters::applied_seq`] to see that a process picked it up).
    pub fn update(&mut self, change: impl FnOnce(&mut FaultPlan)) -> Result<u64, ControlError> {
        let mut plan = self.plan.clone();
        plan.fail_next = 0;
        plan.corrupt_next = 0;
        plan.unplug_ms = 0;
        plan.invalidate_sessions = false;
        plan.invalidate_handles = false;
        plan.cancel_pending = false;
        change(&mut plan);
        plan.seq = self.plan.seq + 1;
        self.plan = plan;
        self.write()?;
        Ok(self.plan.seq)
    }

    /// Fails the next `count` operations of the kinds in `ops` with `rv`.
    pub fn fail_next(
        &mut self,
        count: u64,
        rv: cryptoki_sys::CK_RV,
        ops: &[OpKind],
    ) -> Result<u64, ControlError> {
        self.update(|p| {
            p.fail_next = count;
            p.fail_rv = Rv(rv);
            p.fail_ops = ops.to_vec();
        })
    }

    /// Fails this fraction (0.0–1.0) of the operations of the kinds in `ops` with `rv`, drawn from a RNG seeded
    /// with `seed`.
    pub fn fail_rate(
        &mut self,
        fraction: f64,
        rv: cryptoki_sys::CK_RV,
        ops: &[OpKind],
        seed: u64,
    ) -> Result<u64, ControlError> {
        self.update(|p| {
            p.fail_rate = fraction;
            p.fail_rv = Rv(rv);
            p.fail_ops = ops.to_vec();
            p.seed = seed;
        })
    }

    /// Corrupts the next `count` signatures.
    pub fn corrupt_next(&mut self, count: u64) -> Result<u64, ControlError> {
        self.update(|p| p.corrupt_next = count)
    }

    /// Corrupts this fraction (0.0–1.0) of signatures.
    pub fn corrupt_rate(&mut self, fraction: f64) -> Result<u64, ControlError> {
        self.update(|p| p.corrupt_rate = fraction)
    }

    /// Unplugs the device for `duration` (at least a millisecond).
    pub fn unplug_for(&mut self, duration: Duration) -> Result<u64, ControlError> {
        let ms = u64::try_from(duration.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.update(|p| p.unplug_ms = ms)
    }

    /// Unplugs the device until `set_unplugged(false)`.
    pub fn set_unplugged(&mut self, unplugged: bool) -> Result<u64, ControlError> {
        self.update(|p| p.unplugged = unplugged)
    }

    /// Drops every open session.
    pub fn invalidate_sessions(&mut self) -> Result<u64, ControlError> {
        self.update(|p| p.invalidate_sessions = true)
    }

    /// Renumbers every object (an HSM cluster fail-over): cached key handles become invalid.
    pub fn invalidate_handles(&mut self) -> Result<u64, ControlError> {
        self.update(|p| p.invalidate_handles = true)
    }

    /// Ends every fault: rates to zero, device back, pending one-shots forgotten.
    pub fn clear(&mut self) -> Result<u64, ControlError> {
        self.update(|p| {
            let seed = p.seed;
            *p = FaultPlan {
                seed,
                cancel_pending: true,
                ..FaultPlan::default()
            };
        })
    }

    /// What the module reported injecting (zero counters if it has not written a status yet).
    pub fn counters(&self) -> Result<Counters, ControlError> {
        let path = status_path(&self.path);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ControlError::Format {
                path: path.clone(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Counters::default()),
            Err(source) => Err(ControlError::Io { path, source }),
        }
    }
}

/// The module's side: polls the control file and writes the status.
#[derive(Debug)]
pub(crate) struct ControlWatch {
    path: PathBuf,
    status: PathBuf,
    interval: Duration,
    last_poll: Option<Instant>,
    last_content: Option<Vec<u8>>,
    last_status: Option<Instant>,
}

impl ControlWatch {
    pub(crate) fn new(path: PathBuf, interval: Duration) -> ControlWatch {
        ControlWatch {
            status: status_path(&path),
            path,
            interval,
            last_poll: None,
            last_content: None,
            last_status: None,
        }
    }

    /// A new plan if the file changed since the last look (and the poll interval has passed).
    pub(crate) fn poll(&mut self, now: Instant) -> Option<Result<FaultPlan, String>> {
        if let Some(last) = self.last_poll
            && now.duration_since(last) < self.interval
        {
            return None;
        }
        self.last_poll = Some(now);
        let bytes = std::fs::read(&self.path).ok()?;
        if self.last_content.as_deref() == Some(bytes.as_slice()) {
            return None;
        }
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|t| toml::from_str::<FaultPlan>(t).map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: {e}", self.path.display()));
        self.last_content = Some(bytes);
        Some(parsed)
    }

    /// Whether a status write is allowed now (at most one per poll interval unless `force`).
    pub(crate) fn status_due(&self, now: Instant, force: bool) -> bool {
        force
            || self
                .last_status
                .is_none_or(|t| now.duration_since(t) >= self.interval)
    }

    pub(crate) fn write_status(&mut self, now: Instant, counters: &Counters) {
        self.last_status = Some(now);
        if let Ok(bytes) = serde_json::to_vec_pretty(counters) {
            // Best effort: a status that cannot be written must not fail the PKCS#11 call.
            let _ = write_atomic(&self.status, &bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_writes_plans_the_watch_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faults.toml");
        let mut c = Control::create(&path).unwrap();
        let mut w = ControlWatch::new(path.clone(), Duration::ZERO);
        let t = Instant::now();
        assert_eq!(w.poll(t).unwrap().unwrap(), FaultPlan::default());
        assert!(w.poll(t).is_none(), "unchanged");
        let seq = c
            .fail_next(3, cryptoki_sys::CKR_DEVICE_ERROR, &[OpKind::Sign])
            .unwrap();
        let plan = w.poll(t).unwrap().unwrap();
        assert_eq!((plan.seq, plan.fail_next), (seq, 3));
        c.corrupt_rate(0.5).unwrap();
        let plan = w.poll(t).unwrap().unwrap();
        assert_eq!(
            (plan.fail_next, plan.corrupt_rate),
            (0, 0.5),
            "one-shots do not repeat, levels carry over"
        );
        c.clear().unwrap();
        let plan = w.poll(t).unwrap().unwrap();
        assert!(plan.cancel_pending && plan.corrupt_rate == 0.0);
    }

    #[test]
    fn poll_interval_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faults.toml");
        let mut w = ControlWatch::new(path.clone(), Duration::from_millis(50));
        let t = Instant::now();
        assert!(w.poll(t).is_none(), "no file yet");
        std::fs::write(&path, "fail_rate = \"lots\"").unwrap();
        assert!(
            w.poll(t + Duration::from_millis(10)).is_none(),
            "within the interval"
        );
        assert!(w.poll(t + Duration::from_millis(60)).unwrap().is_err());
        let counters = Counters {
            failures: 4,
            ..Counters::default()
        };
        w.write_status(t, &counters);
        let c = Control {
            path: path.clone(),
            plan: FaultPlan::default(),
        };
        assert_eq!(c.counters().unwrap().failures, 4);
        assert!(!w.status_due(t + Duration::from_millis(1), false));
        assert!(w.status_due(t + Duration::from_millis(1), true));
    }
}
