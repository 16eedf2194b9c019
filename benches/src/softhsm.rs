//! A SoftHSM2 token of the bench's own for an in-process `signet bench --token softhsm` run, without touching the
//! operator's SoftHSM2 tokens and without changing this process's environment.
//!
//! SoftHSM2 finds its token directory through the configuration file that `SOFTHSM2_CONF` names, read once when
//! the module is loaded. So the bench writes a configuration with a token directory of its own in a temporary
//! directory and runs itself again as a child process ([`run_in_child`]), with `SOFTHSM2_CONF` and [`DIR_ENV`]
//! set in the child's environment only. The child ([`private_dir`] answers) initialises a fresh token there
//! ([`fresh_token`]) with random PINs and runs the bench; the parent waits for it, passes its failure on and
//! removes the directory. This is product code: the release binary needs no test bed for it.
//!
//! The child is the same program with the same arguments (`std::env::current_exe`), so [`crate::run`] must be
//! called from the `signet bench` command line, as the `signet` binary does.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use signet_pkcs11::{DEFAULT_MODULE, Pin};

use crate::ceiling::TokenSpec;

/// Set by the parent in the child's environment: the bench's own SoftHSM2 directory.
pub const DIR_ENV: &str = "SIGNET_BENCH_SOFTHSM_DIR";
/// The variable SoftHSM2 reads its configuration's path from.
const CONF_ENV: &str = "SOFTHSM2_CONF";
/// The label of the bench's token.
const LABEL: &str = "signet-bench";

/// In the child: the bench's own SoftHSM2 directory; `None` in a process the bench did not start.
pub fn private_dir() -> Option<PathBuf> {
    std::env::var_os(DIR_ENV).map(PathBuf::from)
}

/// The configuration file in `dir`.
fn conf_path(dir: &Path) -> PathBuf {
    dir.join("softhsm2.conf")
}

/// Writes a SoftHSM2 configuration with a token directory of its own under `dir`.
fn write_conf(dir: &Path) -> Result<PathBuf, String> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| format!("creating {}: {e}", tokens.display()))?;
    let conf = conf_path(dir);
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        ),
    )
    .map_err(|e| format!("writing {}: {e}", conf.display()))?;
    Ok(conf)
}

/// In the parent: runs this same command again in a child process with a SoftHSM2 directory of its own under
/// `dir` (removed by the caller); Ok when the child's bench succeeded.
pub fn run_in_child(dir: &Path) -> Result<(), String> {
    if !Path::new(DEFAULT_MODULE).exists() {
        return Err(format!(
            "SoftHSM2 is not installed ({DEFAULT_MODULE} is missing; install the softhsm2 package)"
        ));
    }
    let conf = write_conf(dir)?;
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let status = Command::new(&exe)
        .args(&args)
        .env(CONF_ENV, &conf)
        .env(DIR_ENV, dir)
        .status()
        .map_err(|e| {
            format!(
                "running {} again with its own SoftHSM2 token: {e}",
                exe.display()
            )
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "the bench on its own SoftHSM2 token failed ({status}; its error is above)"
        ))
    }
}

/// In the child: initialises a fresh token with random PINs in the bench's own directory `dir`. Refuses when the
/// SoftHSM2 configuration in force is not that directory's (the operator's tokens are never touched).
pub fn fresh_token(dir: &Path) -> Result<TokenSpec, String> {
    fresh_token_labelled(dir, LABEL)
}

/// [`fresh_token`] with the label `label`: a second token beside the bench's own (a plug-in's appliance of its
/// own, which must not share the keys' labels of the first).
pub fn fresh_token_labelled(dir: &Path, label: &str) -> Result<TokenSpec, String> {
    let conf = conf_path(dir);
    if std::env::var_os(CONF_ENV).map(PathBuf::from).as_deref() != Some(conf.as_path()) {
        return Err(format!(
            "{DIR_ENV} is set but {CONF_ENV} does not name {}: not the bench's own SoftHSM2 directory",
            conf.display()
        ));
    }
    let so_pin = random_pin()?;
    let user_pin = random_pin()?;
    signet_pkcs11::init_token(Path::new(DEFAULT_MODULE), label, &so_pin, &user_pin)
        .map_err(|e| format!("initialising the bench's SoftHSM2 token {label}: {e}"))?;
    Ok(TokenSpec {
        module: DEFAULT_MODULE.into(),
        label: label.into(),
        pin: user_pin,
    })
}

/// 16 random bytes, base64url: a PIN nobody else knows.
fn random_pin() -> Result<Pin, String> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no randomness for the token's PINs".to_string())?;
    Ok(Pin::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
    ))
}
