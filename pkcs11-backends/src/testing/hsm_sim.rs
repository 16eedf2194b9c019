//! hsm-sim, the workspace's simulated network HSM, as a test bed.
//!
//! hsm-sim has one slot and one token per process, configured from the environment when the module
//! is first initialised. So the bed sets `HSM_SIM_DIR` to a new temporary directory (and a cheap PIN
//! key derivation) **once per process, before the module's first load**, and initialises the token
//! once, through the layer ([`init_token`](crate::init_token)). Tests share that token; each
//! [`HsmSim`] gives its test a key-label prefix of its own. The bed also names a control file
//! (`HSM_SIM_CONTROL`, polled every 10 ms unless `HSM_SIM_CONTROL_POLL_MS` says otherwise) in that
//! directory: [`HsmSim::control_file`] is where a test writes fault plans with `hsm_sim::Control`
//! while the module runs. Faults hit the whole per-process token, so tests that inject them keep a
//! test binary of their own and run one at a time.
//!
//! The module is the `libhsm_sim.so` cargo builds when a crate depends on `hsm-sim` (into the
//! target directory's `deps/`). [`hsm_sim_module`] finds it next to the running test or bench
//! executable, or at `HSM_SIM_MODULE`; a missing module is a loud failure, never a skip.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use super::bed::TokenBed;
use super::{SO_PIN, USER_PIN};
use crate::pin::{Pin, PinSource};
use crate::token::{Token, TokenConfig, TokenSelector};

/// Overrides where the bed looks for `libhsm_sim.so`.
pub const HSM_SIM_MODULE_ENV: &str = "HSM_SIM_MODULE";
/// The label of the per-process hsm-sim token.
const LABEL: &str = "signet-sim";

/// The built hsm-sim module: `$HSM_SIM_MODULE`, else `libhsm_sim.so` in the running executable's
/// directory, its `deps/` or its parent (cargo puts test and bench executables in `deps/`).
pub fn hsm_sim_module() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(HSM_SIM_MODULE_ENV) {
        let p = PathBuf::from(p);
        return if p.exists() {
            Ok(p)
        } else {
            Err(format!(
                "{HSM_SIM_MODULE_ENV}={} does not exist",
                p.display()
            ))
        };
    }
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the running executable's path: {e}"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", exe.display()))?;
    let candidates = [
        dir.join("libhsm_sim.so"),
        dir.join("deps").join("libhsm_sim.so"),
        dir.join("..").join("libhsm_sim.so"),
    ];
    candidates.iter().find(|p| p.exists()).cloned().ok_or_else(|| {
        format!(
            "libhsm_sim.so not found (looked at {candidates:?}): depend on hsm-sim (a dev-dependency \
             is enough) so that cargo builds it, or set {HSM_SIM_MODULE_ENV}"
        )
    })
}

struct Process {
    module: PathBuf,
    control: PathBuf,
}

fn process() -> &'static Process {
    static PROCESS: OnceLock<Process> = OnceLock::new();
    PROCESS.get_or_init(|| match setup() {
        Ok(p) => p,
        Err(e) => panic!("hsm-sim test bed: {e}"),
    })
}

fn setup() -> Result<Process, String> {
    let module = hsm_sim_module()?;
    let dir = tempfile::Builder::new()
        .prefix("signet-hsm-sim-")
        .tempdir()
        .map_err(|e| format!("cannot create a token directory: {e}"))?
        .keep();
    let control = dir.join("control.toml");
    // SAFETY: set once per process, before the hsm-sim module is loaded (it reads them at
    // C_Initialize), from inside a OnceLock initialiser. Test code only.
    #[allow(unsafe_code)]
    #[allow(
        clippy::disallowed_methods,
        reason = "test bed: the module reads its directory from the environment when loaded in this process"
    )]
    unsafe {
        std::env::set_var("HSM_SIM_DIR", &dir);
        std::env::set_var("HSM_SIM_CONTROL", &control);
        if std::env::var_os("HSM_SIM_CONTROL_POLL_MS").is_none() {
            std::env::set_var("HSM_SIM_CONTROL_POLL_MS", "10");
        }
        if std::env::var_os("HSM_SIM_PIN_KDF_ITERATIONS").is_none() {
            std::env::set_var("HSM_SIM_PIN_KDF_ITERATIONS", "1000");
        }
    }
    crate::init_token(&module, LABEL, &Pin::new(SO_PIN), &Pin::new(USER_PIN))
        .map_err(|e| format!("cannot initialise the hsm-sim token: {e}"))?;
    Ok(Process { module, control })
}

/// This test's share of the per-process hsm-sim token: the token (label `signet-sim`, user PIN
/// [`USER_PIN`]) and a key-label prefix of its own.
#[derive(Debug, Clone)]
pub struct HsmSim {
    module: PathBuf,
    control: PathBuf,
    prefix: String,
}

impl HsmSim {
    /// The per-process token (initialised on first use) and a new key prefix. Panics when the module
    /// cannot be found or the token cannot be initialised: the workspace builds hsm-sim, so its
    /// absence is a build problem, not a reason to skip.
    pub fn new() -> HsmSim {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let p = process();
        HsmSim {
            module: p.module.clone(),
            control: p.control.clone(),
            prefix: format!("c{}-", COUNTER.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// The module path.
    pub fn module(&self) -> &Path {
        &self.module
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        LABEL
    }

    /// The control file the module polls for fault plans (it need not exist: no file, no faults).
    pub fn control_file(&self) -> &Path {
        &self.control
    }

    /// Opens the token. Panics on failure (test code).
    #[allow(clippy::expect_used)]
    pub fn open(&self) -> Token {
        Token::open(&TokenBed::config(self)).expect("opening the hsm-sim test token")
    }
}

impl Default for HsmSim {
    fn default() -> Self {
        HsmSim::new()
    }
}

impl TokenBed for HsmSim {
    fn provider(&self) -> &str {
        "hsm-sim"
    }
    fn config(&self) -> TokenConfig {
        TokenConfig {
            module: self.module.clone(),
            token: TokenSelector::Label(LABEL.into()),
            pin: PinSource::Value(Pin::new(USER_PIN)),
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
