//! The module's process-wide state, in one safe type: the initialised device (between C_Initialize and
//! C_Finalize), the configuration a program that embeds hsm-sim handed over, and the fault engine carried from a
//! finalised device into the next. The C ABI (`ffi`) holds the one [`Registry`] of the process and only converts
//! pointers around calls on it.

use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use cryptoki_sys::{CKR_CRYPTOKI_ALREADY_INITIALIZED, CKR_CRYPTOKI_NOT_INITIALIZED};

use crate::config::Config;
use crate::faults::Faults;
use crate::rv::{CkResult, Rv};
use crate::token::{Device, DeviceError};

/// Why [`Registry::initialize`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitializeError {
    /// C_Initialize was called twice.
    #[error("hsm-sim is initialised already")]
    AlreadyInitialized,
    /// The device could not be opened (its configuration or token directory).
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// The device of a process and what outlives it.
#[derive(Debug)]
pub struct Registry {
    device: RwLock<Option<Arc<Device>>>,
    /// The configuration a program that embeds hsm-sim handed over (see [`Registry::set_embedded_config`]).
    embedded: OnceLock<Config>,
    /// The fault engine of the last finalised device, carried into the next initialisation (see
    /// [`Device::take_faults`]): an application that re-initialises the library after CKR_DEVICE_REMOVED finds
    /// the device still unplugged until its time is up, and one-shot faults are not armed a second time.
    carried: Mutex<Option<Faults>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new()
    }
}

impl Registry {
    /// An empty registry: no device, no embedded configuration.
    pub const fn new() -> Registry {
        Registry {
            device: RwLock::new(None),
            embedded: OnceLock::new(),
            carried: Mutex::new(None),
        }
    }

    /// Gives the device its configuration instead of the environment's. Returns false, and keeps the first, when
    /// a configuration was set already.
    pub fn set_embedded_config(&self, config: Config) -> bool {
        self.embedded.set(config).is_ok()
    }

    /// C_Initialize: opens the device from the embedded configuration, else from `HSM_SIM_CONFIG` and the
    /// `HSM_SIM_*` variables, with the faults a finalised device left.
    pub fn initialize(&self) -> Result<(), InitializeError> {
        let mut slot = self.device.write().unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            return Err(InitializeError::AlreadyInitialized);
        }
        let config = match self.embedded.get() {
            Some(config) => config.clone(),
            None => Config::from_env().map_err(DeviceError::from)?,
        };
        let device = Device::open(config)?;
        if let Some(f) = self
            .carried
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            device.carry_faults(f);
        }
        *slot = Some(Arc::new(device));
        Ok(())
    }

    /// C_Finalize: shuts the device down and keeps its fault engine for the next initialisation.
    pub fn finalize(&self) -> CkResult<()> {
        let device = self
            .device
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or(Rv(CKR_CRYPTOKI_NOT_INITIALIZED))?;
        device.shutdown();
        *self.carried.lock().unwrap_or_else(PoisonError::into_inner) = Some(device.take_faults());
        Ok(())
    }

    /// The initialised device, or CKR_CRYPTOKI_NOT_INITIALIZED.
    pub fn device(&self) -> CkResult<Arc<Device>> {
        self.device
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(Rv(CKR_CRYPTOKI_NOT_INITIALIZED))
    }

    /// Whether a device is initialised.
    pub fn is_initialized(&self) -> bool {
        self.device().is_ok()
    }
}

impl InitializeError {
    /// The CK_RV C_Initialize answers.
    pub fn rv(&self) -> Rv {
        match self {
            InitializeError::AlreadyInitialized => Rv(CKR_CRYPTOKI_ALREADY_INITIALIZED),
            InitializeError::Device(_) => Rv(cryptoki_sys::CKR_GENERAL_ERROR),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_registry_has_no_device_and_keeps_the_first_embedded_config() {
        let r = Registry::new();
        assert_eq!(r.device().err(), Some(Rv(CKR_CRYPTOKI_NOT_INITIALIZED)));
        assert_eq!(r.finalize().err(), Some(Rv(CKR_CRYPTOKI_NOT_INITIALIZED)));
        assert!(r.set_embedded_config(Config::default()));
        assert!(!r.set_embedded_config(Config::default()));
    }

    #[test]
    fn initialize_finalize_and_initialize_again() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::new();
        assert!(r.set_embedded_config(Config {
            dir: Some(dir.path().to_path_buf()),
            ..Config::default()
        }));
        r.initialize().unwrap();
        assert!(r.is_initialized());
        let again = r.initialize().unwrap_err();
        assert!(matches!(again, InitializeError::AlreadyInitialized));
        assert_eq!(again.rv(), Rv(CKR_CRYPTOKI_ALREADY_INITIALIZED));
        r.finalize().unwrap();
        assert!(!r.is_initialized());
        r.initialize().unwrap();
        r.finalize().unwrap();
    }
}
