//! A TPM 2.0 (through tpm2-pkcs11) as a test bed.
//!
//! `scripts/tpm-rig start` runs a software TPM (swtpm) behind tpm2-abrmd on a private D-Bus, creates
//! a tpm2-pkcs11 store with one token and prints the environment a test needs; [`Tpm::from_env`]
//! reads it. Without it the bed prints a loud SKIP and returns `None`, unless [`REQUIRE_TPM_ENV`] is
//! set (the test script sets it after starting the rig): then a missing rig fails the test.
//!
//! The token is shared by every test on the machine's rig; each [`Tpm`] gives its test a key-label
//! prefix of its own. [`Rig`] drives the rig (take the TPM away and bring it back) for tests of
//! recovery.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::bed::TokenBed;
use crate::pin::{Pin, PinSource};
use crate::token::{Token, TokenConfig, TokenSelector};

/// Set in the environment to make a missing TPM rig fail the tests instead of skipping them.
pub const REQUIRE_TPM_ENV: &str = "SIGNET_REQUIRE_TPM";

/// This test's share of the rig's tpm2-pkcs11 token.
#[derive(Debug, Clone)]
pub struct Tpm {
    module: PathBuf,
    label: String,
    pin: String,
    prefix: String,
    rig: Option<Rig>,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Tpm {
    /// The rig's token, from the environment `scripts/tpm-rig start` prints (`TPM2_PKCS11_MODULE`,
    /// `TPM2_PKCS11_STORE`, `TPM_RIG_TOKEN_LABEL`, `TPM_RIG_USER_PIN`, and the TCTI and D-Bus
    /// settings tpm2-pkcs11 reads itself), or `None` after a SKIP line naming `test`. Panics when
    /// [`REQUIRE_TPM_ENV`] is set and the rig is missing.
    pub fn from_env(test: &str) -> Option<Tpm> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let found = (
            var("TPM2_PKCS11_MODULE"),
            var("TPM2_PKCS11_STORE"),
            var("TPM_RIG_TOKEN_LABEL"),
            var("TPM_RIG_USER_PIN"),
        );
        let (Some(module), Some(_store), Some(label), Some(pin)) = found else {
            let why =
                "no TPM rig in the environment (start one: eval \"$(scripts/tpm-rig start)\")";
            if std::env::var_os(REQUIRE_TPM_ENV).is_some() {
                panic!("{test}: a TPM is required ({REQUIRE_TPM_ENV} is set) but there is {why}");
            }
            // Straight to stderr: the test harness does not capture it, so the skip shows.
            let _ = writeln!(std::io::stderr().lock(), "SKIP {test}: {why}");
            return None;
        };
        let module = PathBuf::from(module);
        if !module.exists() {
            panic!(
                "{test}: the TPM rig names {}, which does not exist",
                module.display()
            );
        }
        let rig = match (var("TPM_RIG_SCRIPT"), var("TPM_RIG_DIR")) {
            (Some(script), Some(dir)) => Some(Rig {
                script: script.into(),
                dir: dir.into(),
            }),
            _ => None,
        };
        Some(Tpm {
            module,
            label,
            pin,
            prefix: format!(
                "p{}-{}-",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ),
            rig,
        })
    }

    /// The module path (tpm2-pkcs11).
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The rig, when its script and directory are known (to take the TPM away and back).
    pub fn rig(&self) -> Option<&Rig> {
        self.rig.as_ref()
    }

    /// Opens the token. Panics on failure (test code).
    #[allow(clippy::expect_used)]
    pub fn open(&self) -> Token {
        Token::open(&TokenBed::config(self)).expect("opening the TPM rig's token")
    }
}

impl TokenBed for Tpm {
    fn provider(&self) -> &str {
        "tpm2"
    }
    fn config(&self) -> TokenConfig {
        TokenConfig {
            module: self.module.clone(),
            token: TokenSelector::Label(self.label.clone()),
            pin: PinSource::Value(Pin::new(self.pin.clone())),
            profile: None,
        }
    }
    fn key_prefix(&self) -> &str {
        &self.prefix
    }
    fn fresh(&self) -> bool {
        false
    }
}

/// The running TPM rig (`scripts/tpm-rig` and its state directory).
#[derive(Debug, Clone)]
pub struct Rig {
    script: PathBuf,
    dir: PathBuf,
}

impl Rig {
    fn run(&self, what: &str) -> std::io::Result<()> {
        let out = Command::new(&self.script)
            .arg(what)
            .arg(&self.dir)
            .output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "tpm-rig {what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// Kills swtpm and tpm2-abrmd: the TPM is gone (its state stays on disk).
    pub fn down(&self) -> std::io::Result<()> {
        self.run("down")
    }

    /// Starts swtpm and tpm2-abrmd again on the same state, ports and bus.
    pub fn up(&self) -> std::io::Result<()> {
        self.run("up")
    }
}
