//! The simulated device's model: where the token lives, how slow the device is, its limits, and the faults it
//! starts with. Read from a TOML file named by `HSM_SIM_CONFIG`, then overridden by `HSM_SIM_*` environment
//! variables (see the crate documentation for the list and `hsm-sim.example.toml` for a commented file).

use crate::faults::FaultPlan;
use crate::rv::Rv;
use cryptoki_sys::CKR_DEVICE_MEMORY;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read hsm-sim configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML for this model.
    #[error("invalid hsm-sim configuration {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        source: Box<toml::de::Error>,
    },
    /// An environment variable has a value that cannot be used.
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is expected.
        reason: &'static str,
    },
    /// No token directory was given and no default could be found.
    #[error("no token directory: set HSM_SIM_DIR (or `dir` in the file named by HSM_SIM_CONFIG)")]
    NoDirectory,
}

/// What the device does when signatures arrive faster than `max_ops_per_sec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitMode {
    /// The calling thread waits for its turn (a saturated HSM queues requests).
    #[default]
    Wait,
    /// The call fails at once with `rate_limit_rv`.
    Reject,
}

/// The device model.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Directory holding the token (created if missing).
    pub dir: Option<PathBuf>,
    /// Fixed latency of a signature or key generation, in milliseconds (the network round trip).
    pub latency_ms: u64,
    /// Random extra latency, uniform in 0..=jitter_ms.
    pub jitter_ms: u64,
    /// Latency of every other call that reaches the token (open session, login, find, ...), in milliseconds.
    pub call_latency_ms: u64,
    /// Maximum concurrently open sessions (0: unlimited); beyond it C_OpenSession returns CKR_SESSION_COUNT.
    pub max_sessions: u64,
    /// Maximum signatures per second across the device (0: unlimited).
    pub max_ops_per_sec: f64,
    /// Signatures the device may do in a burst above the rate (0: a tenth of a second's worth, at least 1).
    pub burst: u64,
    /// Wait for a turn, or refuse, when over the rate.
    pub rate_limit: RateLimitMode,
    /// The return value of a refused signature in `reject` mode.
    pub rate_limit_rv: Rv,
    /// PBKDF2-HMAC-SHA256 iterations for PIN hashes and the keys derived from PINs.
    pub pin_kdf_iterations: u32,
    /// Wrong PINs in a row before the PIN is locked (0: never).
    pub max_pin_failures: u32,
    /// A control file to poll for fault plans (see [`crate::control`]).
    pub control_file: Option<PathBuf>,
    /// How often the control file is read at most, in milliseconds (0: at every call).
    pub control_poll_ms: u64,
    /// Faults from the start.
    pub faults: FaultPlan,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            dir: None,
            latency_ms: 0,
            jitter_ms: 0,
            call_latency_ms: 0,
            max_sessions: 0,
            max_ops_per_sec: 0.0,
            burst: 0,
            rate_limit: RateLimitMode::Wait,
            rate_limit_rv: Rv(CKR_DEVICE_MEMORY),
            pin_kdf_iterations: 100_000,
            max_pin_failures: 10,
            control_file: None,
            control_poll_ms: 50,
            faults: FaultPlan::default(),
        }
    }
}

fn parse_env<T: std::str::FromStr>(
    var: &'static str,
    value: String,
    reason: &'static str,
) -> Result<T, ConfigError> {
    value
        .trim()
        .parse::<T>()
        .map_err(|_| ConfigError::Env { var, value, reason })
}

impl Config {
    /// Loads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::load(|name| std::env::var(name).ok())
    }

    /// Parses a TOML configuration; relative paths in it are taken relative to `base`.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(d) = &cfg.dir
            && d.is_relative()
        {
            cfg.dir = Some(base.join(d));
        }
        if let Some(c) = &cfg.control_file
            && c.is_relative()
        {
            cfg.control_file = Some(base.join(c));
        }
        Ok(cfg)
    }

    /// Loads the configuration, reading variables through `var` (the environment, or a map in tests).
    pub fn load(var: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut cfg = match var("HSM_SIM_CONFIG").filter(|p| !p.is_empty()) {
            Some(path) => {
                let path = PathBuf::from(path);
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Config::from_toml(&text, &path)?
            }
            None => Config::default(),
        };
        if let Some(v) = var("HSM_SIM_DIR").filter(|v| !v.is_empty()) {
            cfg.dir = Some(PathBuf::from(v));
        }
        if let Some(v) = var("HSM_SIM_LATENCY_MS") {
            cfg.latency_ms = parse_env("HSM_SIM_LATENCY_MS", v, "milliseconds as an integer")?;
        }
        if let Some(v) = var("HSM_SIM_JITTER_MS") {
            cfg.jitter_ms = parse_env("HSM_SIM_JITTER_MS", v, "milliseconds as an integer")?;
        }
        if let Some(v) = var("HSM_SIM_CALL_LATENCY_MS") {
            cfg.call_latency_ms =
                parse_env("HSM_SIM_CALL_LATENCY_MS", v, "milliseconds as an integer")?;
        }
        if let Some(v) = var("HSM_SIM_MAX_SESSIONS") {
            cfg.max_sessions =
                parse_env("HSM_SIM_MAX_SESSIONS", v, "a session count (0: unlimited)")?;
        }
        if let Some(v) = var("HSM_SIM_MAX_OPS_PER_SEC") {
            cfg.max_ops_per_sec = parse_env(
                "HSM_SIM_MAX_OPS_PER_SEC",
                v,
                "signatures per second (0: unlimited)",
            )?;
            if !(cfg.max_ops_per_sec >= 0.0 && cfg.max_ops_per_sec.is_finite()) {
                return Err(ConfigError::Env {
                    var: "HSM_SIM_MAX_OPS_PER_SEC",
                    value: cfg.max_ops_per_sec.to_string(),
                    reason: "a non-negative number",
                });
            }
        }
        if let Some(v) = var("HSM_SIM_BURST") {
            cfg.burst = parse_env("HSM_SIM_BURST", v, "a signature count")?;
        }
        if let Some(v) = var("HSM_SIM_RATE_LIMIT") {
            cfg.rate_limit = match v.trim() {
                "wait" => RateLimitMode::Wait,
                "reject" => RateLimitMode::Reject,
                _ => {
                    return Err(ConfigError::Env {
                        var: "HSM_SIM_RATE_LIMIT",
                        value: v,
                        reason: "`wait` or `reject`",
                    });
                }
            };
        }
        if let Some(v) = var("HSM_SIM_PIN_KDF_ITERATIONS") {
            cfg.pin_kdf_iterations =
                parse_env("HSM_SIM_PIN_KDF_ITERATIONS", v, "a positive integer")?;
        }
        if let Some(v) = var("HSM_SIM_CONTROL").filter(|v| !v.is_empty()) {
            cfg.control_file = Some(PathBuf::from(v));
        }
        if let Some(v) = var("HSM_SIM_CONTROL_POLL_MS") {
            cfg.control_poll_ms =
                parse_env("HSM_SIM_CONTROL_POLL_MS", v, "milliseconds as an integer")?;
        }
        if let Some(v) = var("HSM_SIM_SEED") {
            cfg.faults.seed = parse_env("HSM_SIM_SEED", v, "an unsigned integer")?;
        }
        if cfg.pin_kdf_iterations == 0 {
            cfg.pin_kdf_iterations = 1;
        }
        if cfg.dir.is_none() {
            cfg.dir = match (
                var("XDG_DATA_HOME").filter(|v| !v.is_empty()),
                var("HOME").filter(|v| !v.is_empty()),
            ) {
                (Some(xdg), _) => Some(PathBuf::from(xdg).join("hsm-sim")),
                (None, Some(home)) => Some(PathBuf::from(home).join(".local/share/hsm-sim")),
                (None, None) => None,
            };
        }
        if cfg.dir.is_none() {
            return Err(ConfigError::NoDirectory);
        }
        Ok(cfg)
    }

    /// The token directory.
    pub fn token_dir(&self) -> Result<&Path, ConfigError> {
        self.dir.as_deref().ok_or(ConfigError::NoDirectory)
    }

    /// Fixed latency of a signature or key generation.
    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.latency_ms)
    }

    /// The burst the rate limiter allows.
    pub fn effective_burst(&self) -> u64 {
        if self.burst > 0 {
            self.burst
        } else {
            ((self.max_ops_per_sec / 10.0) as u64).max(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../hsm-sim.example.toml");
        let cfg = Config::from_toml(text, Path::new("/etc/hsm-sim/hsm-sim.toml")).unwrap();
        assert_eq!(cfg.dir.as_deref(), Some(Path::new("/var/lib/hsm-sim")));
        assert_eq!(cfg.latency_ms, 5);
    }

    #[test]
    fn environment_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sim.toml");
        std::fs::write(
            &file,
            "dir = \"tok\"\nlatency_ms = 3\nmax_sessions = 4\n[faults]\nfail_rate = 0.5\n",
        )
        .unwrap();
        let cfg = Config::load(env(&[
            ("HSM_SIM_CONFIG", file.to_str().unwrap()),
            ("HSM_SIM_LATENCY_MS", "12"),
            ("HSM_SIM_MAX_OPS_PER_SEC", "250"),
            ("HSM_SIM_RATE_LIMIT", "reject"),
        ]))
        .unwrap();
        assert_eq!(cfg.dir, Some(dir.path().join("tok")));
        assert_eq!(cfg.latency_ms, 12);
        assert_eq!(cfg.max_sessions, 4);
        assert_eq!(cfg.max_ops_per_sec, 250.0);
        assert_eq!(cfg.effective_burst(), 25);
        assert_eq!(cfg.rate_limit, RateLimitMode::Reject);
        assert_eq!(cfg.faults.fail_rate, 0.5);
    }

    #[test]
    fn bad_values_are_named() {
        let err = Config::load(env(&[
            ("HSM_SIM_DIR", "/x"),
            ("HSM_SIM_LATENCY_MS", "fast"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("HSM_SIM_LATENCY_MS"), "{err}");
        assert!(matches!(
            Config::load(env(&[])),
            Err(ConfigError::NoDirectory)
        ));
        let home = Config::load(env(&[("HOME", "/home/u")])).unwrap();
        assert_eq!(
            home.dir,
            Some(PathBuf::from("/home/u/.local/share/hsm-sim"))
        );
    }
}
