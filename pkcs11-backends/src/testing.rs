//! Test beds for everyone's tests and benchmarks (feature `testing`): real tokens to run against.
//!
//! - [`SoftHsm`]: a fresh SoftHSM2 token per test (this module).
//! - [`HsmSim`]: the workspace's own simulated HSM (`hsm-sim`), one token per process.
//! - [`Tpm`]: a TPM 2.0 through tpm2-pkcs11, started by `scripts/tpm-rig` and found through its
//!   environment.
//!
//! Each implements [`TokenBed`], so one conformance suite can run the same cases against all of them.
//!
//! SoftHSM2 reads its configuration from `SOFTHSM2_CONF` once, when the module is first initialised
//! in the process. So the test bed writes **one** configuration (and token directory) per test
//! process, in a temporary directory, and sets `SOFTHSM2_CONF` before the module's first load; every
//! test then gets a **fresh token** of its own, initialised in the free slot (C_InitToken), serialised
//! by a mutex. Tests in one process may run in parallel on their own tokens.
//!
//! If SoftHSM2 is not installed or its test bed cannot be set up, [`SoftHsm::new`] prints why and returns
//! `None`: the test must then return early (it is skipped loudly). With [`REQUIRE_ENV`] set (the test script
//! sets it) it panics instead, so that a suite which ran without its token fails.
//!
//! ```no_run
//! let Some(hsm) = signet_pkcs11::testing::SoftHsm::new() else { return };
//! let token = hsm.open();
//! ```

mod bed;
mod hsm_sim;
mod tpm;

pub use bed::TokenBed;
pub use hsm_sim::{HSM_SIM_MODULE_ENV, HsmSim, hsm_sim_module};
pub use tpm::{REQUIRE_TPM_ENV, Rig, Tpm};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::pin::{Pin, PinSource};
use crate::token::{DEFAULT_MODULE, Token, TokenConfig, TokenSelector};

/// The SoftHSM2 module path this test bed uses.
pub const SOFTHSM_MODULE: &str = DEFAULT_MODULE;
/// The user PIN of test tokens.
pub const USER_PIN: &str = "1234";
/// The SO PIN of test tokens.
pub const SO_PIN: &str = "12345678";

/// Set in the environment (the test script does) to make a missing SoftHSM2 fail the tests instead of
/// skipping them, so that a suite which ran without its token can never pass.
pub const REQUIRE_ENV: &str = "SIGNET_REQUIRE_SOFTHSM";

/// Whether SoftHSM2 is installed; if not, prints a loud SKIP line naming `test`, or panics when
/// [`REQUIRE_ENV`] is set.
pub fn softhsm_available(test: &str) -> bool {
    if Path::new(SOFTHSM_MODULE).exists() {
        true
    } else if std::env::var_os(REQUIRE_ENV).is_some() {
        panic!(
            "{test}: SoftHSM2 is required ({REQUIRE_ENV} is set) but {SOFTHSM_MODULE} is missing"
        );
    } else {
        eprintln!(
            "SKIP {test}: SoftHSM2 is not installed ({SOFTHSM_MODULE} missing); install the softhsm2 package (./scripts/test does)"
        );
        false
    }
}

/// A test bed that is installed but cannot be set up: fails the test when [`REQUIRE_ENV`] is set (a suite that ran
/// without its token can never pass), else prints a loud SKIP line.
fn skip_or_fail(why: &str) {
    if std::env::var_os(REQUIRE_ENV).is_some() {
        panic!(
            "SoftHSM2 is required ({REQUIRE_ENV} is set) but its test bed cannot be set up: {why}"
        );
    }
    eprintln!("SKIP: {why}");
}

/// Writes a SoftHSM2 configuration with its own token directory under `dir`; returns the file's path.
/// For tests that run a separate process (set `SOFTHSM2_CONF` to it in the child's environment).
pub fn write_softhsm_conf(dir: &Path) -> std::io::Result<PathBuf> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        ),
    )?;
    Ok(conf)
}

fn process_conf() -> Option<&'static Path> {
    static CONF: OnceLock<Option<PathBuf>> = OnceLock::new();
    CONF.get_or_init(|| {
        let dir = match tempfile::Builder::new().prefix("signet-softhsm-").tempdir() {
            Ok(d) => d.keep(),
            Err(e) => {
                skip_or_fail(&format!("cannot create a temporary SoftHSM2 directory: {e}"));
                return None;
            }
        };
        let conf = match write_softhsm_conf(&dir) {
            Ok(c) => c,
            Err(e) => {
                skip_or_fail(&format!("cannot write a SoftHSM2 configuration: {e}"));
                return None;
            }
        };
        // SAFETY: set once per process, before the SoftHSM2 module is loaded (which reads it), from
        // inside a OnceLock initialiser. Test code only; other threads of a test process do not write
        // the environment.
        #[allow(unsafe_code)]
        #[allow(
            clippy::disallowed_methods,
            reason = "test bed: SoftHSM2 reads its configuration's path from the environment when loaded in this process"
        )]
        unsafe {
            std::env::set_var("SOFTHSM2_CONF", &conf);
        }
        Some(conf)
    })
    .as_deref()
}

/// A fresh SoftHSM2 token for one test.
#[derive(Debug, Clone)]
pub struct SoftHsm {
    label: String,
    conf: PathBuf,
}

impl SoftHsm {
    /// Creates a fresh token (label `t<pid>-<n>`, user PIN [`USER_PIN`], SO PIN [`SO_PIN`]), or prints
    /// why not and returns `None` when SoftHSM2 is not installed.
    pub fn new() -> Option<SoftHsm> {
        static SERIAL: Mutex<()> = Mutex::new(());
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        if !softhsm_available("SoftHsm::new") {
            return None;
        }
        let conf = process_conf()?.to_path_buf();
        let _guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let label = format!(
            "t{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        if let Err(e) = crate::init_token(
            Path::new(SOFTHSM_MODULE),
            &label,
            &Pin::new(SO_PIN),
            &Pin::new(USER_PIN),
        ) {
            skip_or_fail(&format!("cannot initialise a SoftHSM2 test token: {e}"));
            return None;
        }
        Some(SoftHsm { label, conf })
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The module path.
    pub fn module(&self) -> &Path {
        Path::new(SOFTHSM_MODULE)
    }

    /// The SoftHSM2 configuration this process uses.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// A configuration that opens this token with the right PIN (profile detected).
    pub fn config(&self) -> TokenConfig {
        TokenConfig {
            module: SOFTHSM_MODULE.into(),
            token: TokenSelector::Label(self.label.clone()),
            pin: PinSource::Value(Pin::new(USER_PIN)),
            profile: None,
        }
    }

    /// Opens the token. Panics on failure (test code).
    #[allow(clippy::expect_used)]
    pub fn open(&self) -> Token {
        Token::open(&self.config()).expect("opening the SoftHSM2 test token")
    }
}

impl TokenBed for SoftHsm {
    fn provider(&self) -> &str {
        "softhsm2"
    }
    fn config(&self) -> TokenConfig {
        SoftHsm::config(self)
    }
    fn key_prefix(&self) -> &str {
        ""
    }
    fn fresh(&self) -> bool {
        true
    }
}
