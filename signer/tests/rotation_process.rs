//! Rotation through the real `signet` binary: `signet serve` on its embedded default (hsm-sim token, SQLite
//! datastore in the data directory), driven with `signet rotate`.
//!
//! - By hand: refusals (activating what is not published, activating before the publish lead, a token that refuses
//!   key generation with CKR_DEVICE_MEMORY through hsm-sim's fault control file) change nothing; a restart keeps the
//!   rotation state; credentials still verify with `openssl verify`.
//! - Crashes: the server is stopped at a crash point (before a step's journal write, after it, and for the steps
//!   that touch the token after the token operation) and killed with SIGKILL; after a restart the state is the
//!   step's whole effect or none of it, and the token (listed independently by `signet token list`) holds exactly the
//!   keys the authorities name.
//!
//! Needs the `crash-points` feature (`cargo test -p signet --features crash-points --test rotation_process`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// A private copy of the built binary, taken once: a test that restarts the server many times must not pick up a
/// binary rebuilt meanwhile by another build sharing the target directory.
fn binary() -> &'static std::path::Path {
    static COPY: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    &COPY
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("signet");
            std::fs::copy(env!("CARGO_BIN_EXE_signet"), &path).unwrap();
            (dir, path)
        })
        .1
}

fn signet() -> Command {
    let mut c = Command::new(binary());
    c.env_remove("SOFTHSM2_CONF")
        .env_remove("SIGNET_CONFIG")
        .env_remove("SIGNET_DATA_DIR")
        .env_remove("SIGNET_ADDR")
        .env_remove("SIGNET_CRASH_POINT")
        .env_remove("HSM_SIM_CONTROL");
    c
}

struct Rig {
    _dir: tempfile::TempDir,
    cwd: PathBuf,
}

impl Rig {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path().to_path_buf();
        std::fs::write(cwd.join("offset"), "0").unwrap();
        // The embedded default with the schedule off, so that only the test moves the authorities.
        std::fs::write(
            cwd.join("signet.toml"),
            r#"trust_domain = "example.org"
[authority.rotation]
schedule = false
[[policy]]
caller = "spiffe://example.org/signet/admin"
may = ["issuer", "admin", "upstream-authority", "key-manager"]
ids = ["spiffe://example.org/"]
max_ttl = "24h"
"#,
        )
        .unwrap();
        Rig { _dir: dir, cwd }
    }

    fn data(&self) -> PathBuf {
        self.cwd.join("signet-data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.cwd.join("serve.log")).unwrap_or_default()
    }

    /// Starts `signet serve` and waits for its banner.
    fn serve(&self, env: &[(&str, &str)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.cwd.join("serve.log"))
            .unwrap();
        let mut cmd = signet();
        cmd.args([
            "serve",
            "--config",
            "signet.toml",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .current_dir(&self.cwd)
        .env("SIGNET_TEST_CLOCK_OFFSET_FILE", self.cwd.join("offset"))
        .stdout(Stdio::piped())
        .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting signet serve");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        loop {
            let mut line = String::new();
            let n = out.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "signet serve exited before serving; its log:\n{}",
                self.log()
            );
            if line.starts_with("Stop with") {
                break;
            }
        }
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        child
    }

    fn run(&self, args: &[&str]) -> Output {
        signet().args(args).current_dir(&self.cwd).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "signet {args:?} failed: {}\n--- server log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn refused(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "signet {args:?} should have been refused"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// (label, state, key destroyed) of every authority, and the orphaned/lost lines, from `signet rotate status`.
    fn status(&self) -> (Vec<(String, String, bool)>, Vec<String>) {
        let text = self.ok(&["rotate", "status"]);
        let mut rows = Vec::new();
        let mut problems = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if matches!(f.first(), Some(&"x509") | Some(&"jwt")) {
                rows.push((
                    f[1].to_string(),
                    f[3].to_string(),
                    line.contains("key-destroyed"),
                ));
            } else if line.starts_with("orphaned key") || line.starts_with("lost key") {
                problems.push(line.to_string());
            }
        }
        (rows, problems)
    }

    fn state_of(&self, label: &str) -> Option<String> {
        self.status()
            .0
            .into_iter()
            .find(|r| r.0 == label)
            .map(|r| r.1)
    }

    /// The key labels on the embedded token, listed by `signet token list` (the token layer, not the datastore).
    fn token_keys(&self) -> Vec<String> {
        let data = self.data();
        let out = signet()
            .args(["token", "list", "--token", "signet", "--pin-file"])
            .arg(data.join("token.pin"))
            .env("SIGNET_PKCS11_MODULE", "builtin:")
            .env("HSM_SIM_DIR", data.join("hsm-sim"))
            .current_dir(&self.cwd)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "signet token list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut labels: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|l| l.starts_with("signet-x509-root") || l.starts_with("signet-jwt"))
            .map(str::to_string)
            .collect();
        labels.sort();
        labels
    }

    /// The token holds exactly the keys of the authorities not destroyed, and the server sees nothing amiss.
    fn assert_consistent(&self, when: &str) {
        let (rows, problems) = self.status();
        assert!(problems.is_empty(), "{when}: {problems:?}");
        let mut named: Vec<String> = rows.iter().filter(|r| !r.2).map(|r| r.0.clone()).collect();
        named.sort();
        assert_eq!(
            self.token_keys(),
            named,
            "{when}: token keys vs. authorities"
        );
    }

    fn set_offset(&self, secs: i64) {
        std::fs::write(self.cwd.join("offset"), secs.to_string()).unwrap();
    }
}

fn term(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

fn kill9(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn rotate_by_hand_with_refusals_token_faults_and_a_restart() {
    let rig = Rig::new();
    let faults = rig.cwd.join("faults.toml");
    std::fs::write(&faults, "seq = 0\n").unwrap();
    let faults_s = faults.to_str().unwrap().to_string();
    let server = rig.serve(&[("HSM_SIM_CONTROL", &faults_s)]);
    rig.assert_consistent("start");
    assert_eq!(rig.state_of("signet-x509-root").as_deref(), Some("active"));

    // Nothing to activate or retire yet.
    let e = rig.refused(&["rotate", "activate"]);
    assert!(
        e.contains("FAILED_PRECONDITION") && e.contains("no published x509"),
        "{e}"
    );
    let e = rig.refused(&["rotate", "retire", "--kind", "jwt"]);
    assert!(e.contains("FAILED_PRECONDITION"), "{e}");

    // The token refuses key generation (no room): refused with the token's reason, nothing changes.
    let before = rig.status();
    std::fs::write(
        &faults,
        "seq = 1\nfail_next = 1\nfail_rv = \"CKR_DEVICE_MEMORY\"\nfail_ops = [\"keygen\"]\n",
    )
    .unwrap();
    // The thing waited for is a clock: the simulator looks at its control file at a token call at most every
    // 50 ms, and nothing calls the token between two requests, so nothing can be waited on: 300 ms pass.
    std::thread::sleep(Duration::from_millis(300));
    let e = rig.refused(&["rotate", "prepare"]);
    assert!(
        e.contains("UNAVAILABLE") && e.contains("DeviceMemory"),
        "{e}"
    );
    assert_eq!(rig.status(), before, "a refused prepare changed the state");
    rig.assert_consistent("after the refused prepare");

    // Then it works; publishing adds the root to the bundle; activating at once is too early.
    let out = rig.ok(&["rotate", "prepare"]);
    assert!(out.starts_with("prepare: signet-x509-root-g2"), "{out}");
    rig.ok(&["rotate", "publish"]);
    let pem = rig.ok(&["bundle", "--format", "pem"]);
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2, "{pem}");
    let before = rig.status();
    let e = rig.refused(&["rotate", "activate"]);
    assert!(
        e.contains("FAILED_PRECONDITION") && e.contains("allowed from"),
        "{e}"
    );
    assert_eq!(rig.status(), before);
    // Retiring the active root's predecessor before anything was superseded is refused too.
    let e = rig.refused(&["rotate", "destroy", "--label", "signet-x509-root"]);
    assert!(
        e.contains("FAILED_PRECONDITION") && e.contains("only a retired"),
        "{e}"
    );
    let seq = |text: String| -> u64 {
        text.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    let seq_before = seq(rig.ok(&["rotate", "status"]));
    term(server);

    // A restart keeps the rotation state and the sequence; issuance works and verifies.
    let server = rig.serve(&[]);
    assert_eq!(rig.status(), before);
    // The sequence never goes back (it starts no lower than the clock, as JWT keys SPIRE publishes move it too).
    assert!(seq(rig.ok(&["rotate", "status"])) >= seq_before);
    rig.ok(&[
        "mint",
        "x509-svid",
        "--spiffe-id",
        "spiffe://example.org/demo",
        "--out",
        "svid",
    ]);
    let v = Command::new("openssl")
        .args([
            "verify",
            "-x509_strict",
            "-CAfile",
            "svid/bundle.pem",
            "svid/svid.pem",
        ])
        .current_dir(&rig.cwd)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    // The issued chain carries the new -> old cross-certificate while the new root is published.
    let chain = std::fs::read_to_string(rig.cwd.join("svid/svid.pem")).unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
    rig.assert_consistent("after the restart");
    term(server);
}

/// Waits until the server's log shows `marker`; panics after a minute.
fn wait_for(rig: &Rig, marker: &str) {
    support::wait::wait_for(
        &format!("the server reached {marker}"),
        Duration::from_secs(60),
        || {
            if rig.log().contains(marker) {
                Ok(())
            } else {
                Err(format!(
                    "the client said: {}",
                    std::fs::read_to_string(rig.cwd.join("cli.err")).unwrap_or_default()
                ))
            }
        },
    );
}

/// A step of the crash matrix: (step, CLI arguments, the label it moves, the state it leads to, the crash points,
/// the clock offset it runs at).
type Case = (
    &'static str,
    Vec<&'static str>,
    &'static str,
    &'static str,
    &'static [&'static str],
    i64,
);

#[test]
fn killed_before_and_after_each_journal_write_restarts_consistent() {
    let day = 86_400;
    let steps: [Case; 5] = [
        (
            "prepare",
            vec!["rotate", "prepare"],
            "signet-x509-root-g2",
            "prepared",
            &["before-journal", "after-journal", "after-effect"],
            0,
        ),
        (
            "publish",
            vec!["rotate", "publish"],
            "signet-x509-root-g2",
            "published",
            &["before-journal", "after-journal"],
            0,
        ),
        (
            "activate",
            vec!["rotate", "activate"],
            "signet-x509-root-g2",
            "active",
            &["before-journal", "after-journal"],
            3600,
        ),
        (
            "retire",
            vec!["rotate", "retire"],
            "signet-x509-root",
            "retired",
            &["before-journal", "after-journal"],
            32 * day,
        ),
        (
            "destroy",
            vec!["rotate", "destroy", "--label", "signet-x509-root"],
            "signet-x509-root",
            "retired",
            &["before-journal", "after-journal", "after-effect"],
            32 * day,
        ),
    ];
    let mut last = None;
    for (i, (step, args, label, leads_to, points, offset)) in steps.iter().enumerate() {
        for point in points.iter() {
            // Every crash point starts from a fresh appliance brought to the state before the step.
            let rig = Rig::new();
            let mut server = rig.serve(&[]);
            for prev in &steps[..i] {
                rig.set_offset(prev.5);
                rig.ok(&prev.1);
                // A restart after each step (not needed for the rotation: signet renews its own credentials
                // right after activate; it checks that a restart between steps keeps the state).
                term(server);
                server = rig.serve(&[]);
            }
            rig.set_offset(*offset);
            let before = rig.status();
            rig.assert_consistent("before the step");
            term(server);

            let crash = format!("{step}:{point}");
            let server = rig.serve(&[("SIGNET_CRASH_POINT", &crash)]);
            let cli = signet()
                .args(args)
                .current_dir(&rig.cwd)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(rig.cwd.join("cli.err")).unwrap())
                .spawn()
                .unwrap();
            wait_for(&rig, &format!("crash point {crash} reached"));
            kill9(server);
            kill9(cli);

            let server = rig.serve(&[]);
            rig.assert_consistent(&crash);
            let (rows, _) = rig.status();
            let row = rows.iter().find(|r| r.0 == *label).cloned();
            let applied = match *step {
                "destroy" => row.as_ref().is_some_and(|r| r.2),
                _ => row.as_ref().map(|r| r.1.as_str()) == Some(*leads_to),
            };
            if *point == "before-journal" {
                assert!(
                    !applied,
                    "{crash}: a step killed before its journal write took effect"
                );
                assert_eq!(rig.status(), before, "{crash}: the state changed");
                // The step can simply be run again.
                rig.ok(args);
            } else {
                assert!(applied, "{crash}: a journalled step was lost: {rows:?}");
                // ... and it happened once: running it again is refused (destroy: a no-op), never applied twice.
                let again = rig.run(args);
                assert_eq!(
                    again.status.success(),
                    *step == "destroy",
                    "{crash}: run again"
                );
            }
            rig.assert_consistent(&format!("{crash}, then done"));
            term(server);
            last = Some(rig);
        }
    }
    let rig = last.unwrap();
    let server = rig.serve(&[]);
    let (rows, _) = rig.status();
    assert!(
        rows.iter()
            .any(|r| r.0 == "signet-x509-root" && r.1 == "retired" && r.2),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r.0 == "signet-x509-root-g2" && r.1 == "active"),
        "{rows:?}"
    );
    term(server);
}
