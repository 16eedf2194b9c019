//! The process-wide registry of loaded PKCS#11 modules.
//!
//! A module is loaded and C_Initialize'd **once per process** per path (concurrent C_Initialize
//! crashes some modules, SoftHSM2 among them), with OS locking allowed, tolerating
//! CKR_CRYPTOKI_ALREADY_INITIALIZED (another component of the process got there first).
//!
//! [`Module::reinitialize`] is the hook for a token that was pulled and re-inserted (krill's approach):
//! C_Finalize + C_Initialize on the same loaded library. Every re-initialisation bumps the module's
//! *generation*; sessions remember the generation they were opened in and refuse to run (kind
//! `Stale`) once it changed, so no call ever reaches the library with a handle from before.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;

use crate::error::{Error, ErrorKind, Result};
use crate::pin::Pin;
use zeroize::Zeroizing;

pub(crate) struct ModuleState {
    pub(crate) ctx: Pkcs11,
    pub(crate) generation: u64,
}

/// One loaded PKCS#11 library, shared by every token on it in this process.
pub struct Module {
    path: PathBuf,
    state: RwLock<ModuleState>,
    /// Serialises administrative operations (C_InitToken and friends) and the slot lookups of token opens in this
    /// process.
    admin: Mutex<()>,
    /// Serialises every call of tokens whose profile signs on one session at a time (tpm2-pkcs11:
    /// concurrent logins on two sessions corrupt its TPM context).
    serial: Mutex<()>,
    /// HMAC-SHA256 (under [`login_key`](Self::login_key)) of the user PIN of each slot this process
    /// logged in to (C_Login answered CKR_OK): the check of a PIN when the token answers
    /// CKR_USER_ALREADY_LOGGED_IN. Keyed, not a bare hash: PINs are short, and a plain SHA-256 of one is
    /// reversed by trying them all; zeroised when dropped.
    logins: Mutex<HashMap<u64, Zeroizing<Vec<u8>>>>,
    /// A random key of this process for [`logins`](Self::logins).
    login_key: ring::hmac::Key,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn registry() -> &'static Mutex<HashMap<PathBuf, Arc<Module>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

fn initialize(ctx: &Pkcs11) -> Result<()> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) => Ok(()),
        Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
            tracing::debug!("PKCS#11 library already initialised in this process; sharing it");
            Ok(())
        }
        Err(e) => Err(Error::pkcs11("C_Initialize failed", e)),
    }
}

/// The module path that names the PKCS#11 module linked into the running program instead of a library file.
pub const BUILTIN_MODULE: &str = "builtin:";

impl Module {
    /// The module at `path`, loading and initialising it on first use in this process.
    ///
    /// [`BUILTIN_MODULE`] names the module linked into the running program (its exported `C_GetFunctionList`),
    /// e.g. the simulator the `signet` binary embeds as its default token.
    pub fn get(path: &Path) -> Result<Arc<Module>> {
        let builtin = path == Path::new(BUILTIN_MODULE);
        // Keyed by the canonical path, so that two spellings of one library share one context.
        let path = if builtin {
            path.to_path_buf()
        } else {
            std::fs::canonicalize(path).map_err(|_| {
                Error::new(
                    ErrorKind::ModuleLoad,
                    format!("PKCS#11 module {} does not exist", path.display()),
                )
            })?
        };
        let path = path.as_path();
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = reg.get(path) {
            return Ok(m.clone());
        }
        let loaded = if builtin {
            Pkcs11::new_from_self()
        } else {
            Pkcs11::new(path)
        };
        let ctx = loaded.map_err(|e| {
            let what = if builtin {
                "this program has no built-in PKCS#11 module (C_GetFunctionList is not exported)"
                    .to_string()
            } else {
                format!("cannot load PKCS#11 module {}", path.display())
            };
            Error::pkcs11(what, e)
        })?;
        initialize(&ctx)?;
        let login_key =
            ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
                .map_err(|_| Error::new(ErrorKind::Io, "the system random generator failed"))?;
        let m = Arc::new(Module {
            path: path.to_path_buf(),
            state: RwLock::new(ModuleState { ctx, generation: 0 }),
            admin: Mutex::new(()),
            serial: Mutex::new(()),
            logins: Mutex::new(HashMap::new()),
            login_key,
        });
        reg.insert(path.to_path_buf(), m.clone());
        tracing::info!(module = %path.display(), "PKCS#11 module loaded and initialised");
        Ok(m)
    }

    /// The module's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The library's manufacturer and description (C_GetInfo), e.g. ("SoftHSM", "Implementation of PKCS11").
    pub fn library_info(&self) -> Result<(String, String)> {
        let st = self.read();
        let info = st
            .ctx
            .get_library_info()
            .map_err(|e| Error::pkcs11("C_GetInfo failed", e))?;
        Ok((
            info.manufacturer_id().trim().to_string(),
            info.library_description().trim().to_string(),
        ))
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, ModuleState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn admin_lock(&self) -> MutexGuard<'_, ()> {
        self.admin.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn serial(&self) -> MutexGuard<'_, ()> {
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pin_tag(&self, pin: &Pin) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(
            ring::hmac::sign(&self.login_key, pin.expose().as_bytes())
                .as_ref()
                .to_vec(),
        )
    }

    /// Remembers that this process logged in to `slot` with `pin`.
    pub(crate) fn record_login(&self, slot: u64, pin: &Pin) {
        self.logins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(slot, self.pin_tag(pin));
    }

    /// Whether `pin` is the PIN this process logged in to `slot` with (`None`: it did not log in
    /// itself; another component of the process did).
    pub(crate) fn login_matches(&self, slot: u64, pin: &Pin) -> Option<bool> {
        self.logins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&slot)
            .map(|tag| ring::hmac::verify(&self.login_key, pin.expose().as_bytes(), tag).is_ok())
    }

    /// The current generation (bumped by every re-initialisation).
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// Re-initialises the library (C_Finalize + C_Initialize) if it is still at `seen_generation`;
    /// if another thread already did it, does nothing. Every session opened before becomes stale and
    /// must be re-opened. Waits for calls in flight on other sessions to finish first.
    pub fn reinitialize(&self, seen_generation: u64) -> Result<()> {
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        if st.generation != seen_generation {
            return Ok(());
        }
        tracing::warn!(module = %self.path.display(), "re-initialising the PKCS#11 library");
        if let Err(e) = st.ctx.clone().finalize() {
            tracing::warn!(error = %e, "C_Finalize failed during re-initialisation; continuing");
        }
        st.generation += 1;
        self.logins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        initialize(&st.ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_module_missing_is_a_clear_error() {
        // This test program links no PKCS#11 module and exports no C_GetFunctionList.
        let err = Module::get(Path::new(BUILTIN_MODULE)).expect_err("no built-in module here");
        assert!(
            err.to_string().contains("no built-in PKCS#11 module"),
            "unexpected message: {err}"
        );
    }

    #[test]
    fn missing_module_file_is_a_clear_error() {
        let err = Module::get(Path::new("/nonexistent/libpkcs11.so")).expect_err("no such file");
        assert_eq!(err.kind(), ErrorKind::ModuleLoad);
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
