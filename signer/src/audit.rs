//! The audit log: one JSON line per credential issued, key used or request refused, written and flushed before
//! the answer goes out.
//!
//! A request hands its records (one, or all of a batch RPC's) to [`AuditLog::record`] and awaits it; a dedicated
//! writer thread takes every batch waiting, appends their lines, flushes and (with `sync`, the default:
//! `[server] audit_sync`) syncs the data to the disk (`fdatasync`) once for all of them, then answers each: many
//! concurrent requests share one write and one sync (group commit), and none is answered before its lines are in the
//! file (and, synced, survive a crash of the machine). If the file cannot be written or synced, `record` fails and
//! the request must fail (UNAVAILABLE): nothing is handed out or changed unaudited.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crossbeam::channel::{self, Receiver, Sender};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::oneshot;

/// What happened to the request a record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// A credential was issued.
    Issued,
    /// A key was used (signature) or created.
    KeyUsed,
    /// A key was added to the bundle (a SPIRE server's JWT key).
    Published,
    /// Refused before anything was signed (authentication, policy, bad input).
    Refused,
    /// Failed while issuing (token, pipeline, lint): nothing was handed out.
    Failed,
    /// A rotation step was committed (the step is in `reason`, the authority's label in `key_id`).
    Rotated,
    /// Keys were destroyed on the token (a KeyManager namespace nobody used for the sweep window).
    Destroyed,
}

/// One audit line.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// RFC 3339 UTC time.
    pub time: String,
    /// The caller's SPIFFE ID (empty when unauthenticated).
    pub caller: String,
    /// `upstream-authority`, `key-manager`, `issuer`, `admin`.
    pub service: &'static str,
    /// The RPC.
    pub method: &'static str,
    /// The requested or issued SPIFFE ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// The key used or created (KeyManager: `key_id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Serial number of an issued certificate (lowercase hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The authority that signed (X.509: the issuer's key identifier in hex; JWT: the kid; KeyManager: the key's
    /// fingerprint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// NotAfter / exp of what was issued (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// What happened.
    pub outcome: Outcome,
    /// The gRPC status code name of a refusal or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<&'static str>,
    /// Why it was refused or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The peer's address, for refusals before authentication (which have no caller).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// How the caller reached the service when not over the gRPC port: `in-process` for the SPIRE plug-in running
    /// the appliance itself (`--embedded`), which presents its credential without TLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<&'static str>,
}

impl AuditRecord {
    /// A record stamped now.
    pub fn new(
        caller: &str,
        service: &'static str,
        method: &'static str,
        outcome: Outcome,
    ) -> Self {
        let time = OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        Self {
            time,
            caller: caller.to_string(),
            service,
            method,
            spiffe_id: None,
            key_id: None,
            serial: None,
            authority: None,
            expires_at: None,
            outcome,
            code: None,
            reason: None,
            peer: None,
            via: None,
        }
    }
}

/// The audit log could not be written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the audit log {path} cannot be written ({reason}); nothing is issued until it can")]
pub struct AuditError {
    path: String,
    reason: String,
}

struct Batch {
    lines: Vec<u8>,
    done: oneshot::Sender<Result<(), AuditError>>,
}

/// The audit log (cheap to clone).
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: Sender<Batch>,
    path: PathBuf,
    /// Fault drills: while set, every write fails as a full disk would.
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writer: std::sync::Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl AuditLog {
    /// Opens (creates, appends to) the audit log at `path` and starts its writer thread. With `sync`, every group of
    /// lines is also synced to the disk (`fdatasync`) before the requests that wrote them are answered.
    pub fn open(path: &Path, sync: bool) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut opts = OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let file = opts.open(path)?;
        let (tx, rx) = channel::unbounded::<Batch>();
        let shown = path.display().to_string();
        let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f2 = failing.clone();
        let handle = std::thread::Builder::new()
            .name("signet-audit".into())
            .spawn(move || writer(file, rx, sync, &f2, shown))?;
        Ok(Self {
            tx,
            path: path.to_path_buf(),
            failing,
            writer: std::sync::Arc::new(std::sync::Mutex::new(Some(handle))),
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `records` and returns once they are flushed to the file (or why they could not be).
    pub async fn record(&self, records: &[AuditRecord]) -> Result<(), AuditError> {
        let fail = |reason: String| AuditError {
            path: self.path.display().to_string(),
            reason,
        };
        if records.is_empty() {
            return Ok(());
        }
        let mut lines = Vec::with_capacity(records.len() * 256);
        for r in records {
            serde_json::to_writer(&mut lines, r).map_err(|e| fail(e.to_string()))?;
            lines.push(b'\n');
        }
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Batch { lines, done })
            .map_err(|_| fail("the audit writer has stopped".into()))?;
        wait.await
            .map_err(|_| fail("the audit writer has stopped".into()))?
    }

    /// Fault drills and tests: while `on`, every write fails (ENOSPC, as on a full disk), so that what depends on
    /// the audit log can be shown to stop rather than act unaudited.
    #[doc(hidden)]
    pub fn simulate_write_failure(&self, on: bool) {
        self.failing.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops the writer after the lines already handed to it are written. Blocks until it has exited.
    pub fn close(&self) {
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            // An empty batch is the writer's signal to stop once everything before it is written.
            let (done, _) = oneshot::channel();
            let _ = self.tx.send(Batch {
                lines: Vec::new(),
                done,
            });
            let _ = h.join();
        }
    }
}

fn writer(
    mut file: File,
    rx: Receiver<Batch>,
    sync: bool,
    failing: &std::sync::atomic::AtomicBool,
    path: String,
) {
    while let Ok(first) = rx.recv() {
        let stop = first.lines.is_empty();
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let stop = stop || batch.iter().any(|b| b.lines.is_empty());
        let mut result = if failing.load(std::sync::atomic::Ordering::SeqCst) {
            Err(std::io::Error::from_raw_os_error(28))
        } else {
            Ok(())
        };
        for b in batch.iter().filter(|_| result.is_ok()) {
            if let Err(e) = file.write_all(&b.lines) {
                result = Err(e);
                break;
            }
        }
        let result = result
            .and_then(|()| file.flush())
            .and_then(|()| if sync { file.sync_data() } else { Ok(()) })
            .map_err(|e| {
                tracing::error!(path = %path, error = %e, "cannot write the audit log");
                AuditError {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            });
        for b in batch {
            let _ = b.done.send(result.clone());
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_in_the_file_when_record_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, false).unwrap();
        let mut r = AuditRecord::new("spiffe://td/a", "issuer", "MintJWTSVID", Outcome::Refused);
        r.reason = Some("because".into());
        log.record(&[r.clone(), r]).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["outcome"], "refused");
        assert_eq!(lines[0]["reason"], "because");
        log.close();
        assert!(
            log.record(&[AuditRecord::new("c", "issuer", "x", Outcome::Issued)])
                .await
                .is_err()
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn an_unwritable_log_fails_the_request() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let log = AuditLog::open(Path::new("/dev/full"), false).unwrap();
        let r = AuditRecord::new("c", "issuer", "x", Outcome::Issued);
        assert!(log.record(&[r]).await.is_err());
    }
}
