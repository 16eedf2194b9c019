//! The embedded token: the PKCS#11 token signet provisions for itself in the data directory when the
//! configuration names none (the [`EmbeddedToken`] seam, hsm-sim by default), with random PINs kept beside it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::Zeroizing;

use super::error::{ServeError, io};
use crate::config::{PinConfig, TokenSettings};
use crate::datadir::write_private;

/// The token signet provisions for itself in the data directory when the configuration names none. This is the
/// seam for changing the default token: implement it for another PKCS#11 module and return it from
/// [`default_embedded_token`].
pub trait EmbeddedToken: std::fmt::Debug + Send + Sync {
    /// A short name for messages.
    fn name(&self) -> &'static str;
    /// Environment variables that must be set before the module is loaded (name, value).
    fn environment(&self, data_dir: &Path) -> Vec<(String, PathBuf)>;
    /// Creates the token if it does not exist yet (in `data_dir`) and returns its settings.
    fn provision(&self, data_dir: &Path) -> Result<TokenSettings, ServeError>;
}

/// hsm-sim, the PKCS#11 simulator linked into the `signet` binary, with its token directory inside the data
/// directory: nothing to install, no configuration to write. The module is the program itself
/// ([`signet_pkcs11::BUILTIN_MODULE`]), so this token is only available in a program that exports hsm-sim's
/// `C_GetFunctionList` (the `signet` binary does; see its build script).
#[derive(Debug, Clone, Copy, Default)]
pub struct HsmSimEmbedded;

/// The embedded token's label.
pub const EMBEDDED_LABEL: &str = "signet";

/// The settings of the embedded token provisioned in `data_dir` on `module` (its user PIN in `token.pin`).
pub fn embedded_token_settings(module: PathBuf, data_dir: &Path) -> TokenSettings {
    TokenSettings {
        name: "embedded".into(),
        module,
        token: Some(EMBEDDED_LABEL.into()),
        serial: None,
        pin: PinConfig::File(data_dir.join("token.pin")),
        sessions: 2,
    }
}

impl EmbeddedToken for HsmSimEmbedded {
    fn name(&self) -> &'static str {
        "hsm-sim"
    }

    fn environment(&self, _data_dir: &Path) -> Vec<(String, PathBuf)> {
        // Configured through hsm_sim::set_embedded_config, not the environment.
        Vec::new()
    }

    fn provision(&self, data_dir: &Path) -> Result<TokenSettings, ServeError> {
        let dir = data_dir.join("hsm-sim");
        std::fs::create_dir_all(&dir).map_err(io("creating the token directory"))?;
        let config = hsm_sim::Config {
            dir: Some(dir.clone()),
            // Fault injection for drills and tests (the simulator's control file; see hsm-sim.example.toml).
            control_file: std::env::var_os("HSM_SIM_CONTROL").map(PathBuf::from),
            ..hsm_sim::Config::default()
        };
        // The first configuration of the process stays; a second appliance in one process shares the device.
        if !hsm_sim::set_embedded_config(config) {
            tracing::debug!("the embedded hsm-sim device was configured already in this process");
        }
        let settings = provision_token(PathBuf::from(signet_pkcs11::BUILTIN_MODULE), data_dir)?;
        tracing::info!(dir = %dir.display(), "embedded hsm-sim token ready");
        Ok(settings)
    }
}

/// Creates the embedded token `signet` on `module` unless it exists, with random PINs kept in the data directory
/// (0600), and returns its settings.
fn provision_token(module: PathBuf, data_dir: &Path) -> Result<TokenSettings, ServeError> {
    let pin_file = data_dir.join("token.pin");
    let so_pin_file = data_dir.join("token.so-pin");
    for f in [&pin_file, &so_pin_file] {
        if !f.exists() {
            write_private(f, random_pin()?.as_bytes())?;
        }
    }
    let slots = signet_pkcs11::list_slots(&module).map_err(|source| ServeError::Token {
        token: "embedded".into(),
        source,
    })?;
    let exists = slots
        .iter()
        .any(|s| s.token.as_ref().is_some_and(|t| t.label == EMBEDDED_LABEL));
    if !exists {
        let read = |p: &Path| -> Result<signet_pkcs11::Pin, ServeError> {
            let text = Zeroizing::new(
                std::fs::read_to_string(p).map_err(io(format!("reading {}", p.display())))?,
            );
            Ok(signet_pkcs11::Pin::new(text.trim()))
        };
        signet_pkcs11::init_token(
            &module,
            EMBEDDED_LABEL,
            &read(&so_pin_file)?,
            &read(&pin_file)?,
        )
        .map_err(ServeError::EmbeddedToken)?;
        tracing::info!("embedded token created");
    }
    Ok(embedded_token_settings(module, data_dir))
}

/// The embedded token used when the configuration names none.
pub fn default_embedded_token() -> Arc<dyn EmbeddedToken> {
    Arc::new(HsmSimEmbedded)
}

/// A random PIN for the embedded token: 16 random bytes in hex, both buffers zeroised when dropped.
fn random_pin() -> Result<Zeroizing<String>, ServeError> {
    use ring::rand::SecureRandom as _;
    let mut b = Zeroizing::new([0u8; 16]);
    ring::rand::SystemRandom::new()
        .fill(b.as_mut())
        .map_err(|_| ServeError::Random)?;
    Ok(Zeroizing::new(hex::encode(&b[..])))
}
