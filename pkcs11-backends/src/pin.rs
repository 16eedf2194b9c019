//! PINs: where they come from and how they are held.
//!
//! A [`Pin`] is zeroised on drop, never logged, and its `Debug` prints `Pin(<redacted>)`. Every copy of a PIN in
//! this workspace lives in a [`Pin`] (or a `Zeroizing` buffer on its way into one): the value read from a file, the
//! terminal or the environment is moved into it without a plain copy left behind, and cryptoki gets it as an
//! [`AuthPin`] (a `secrecy` box, itself zeroised on drop) built for the one call that needs it. No error message
//! of the token layer contains a PIN.

use std::fmt;
use std::path::PathBuf;

use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::error::{Error, ErrorKind, Result};

/// A PIN held in memory. Zeroised on drop; `Debug` never shows it.
#[derive(Clone)]
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Wraps a PIN value. A `String` is moved in (its buffer is the one zeroised on drop); a `&str` is copied.
    pub fn new(pin: impl Into<String>) -> Self {
        Pin(Zeroizing::new(pin.into()))
    }

    /// Wraps a PIN already held in a zeroising buffer, without copying it.
    pub fn from_zeroizing(pin: Zeroizing<String>) -> Self {
        Pin(pin)
    }

    /// The PIN as cryptoki wants it (a `secrecy` box, itself zeroised on drop).
    pub(crate) fn auth(&self) -> AuthPin {
        AuthPin::from(self.0.as_str())
    }

    /// The PIN's characters. Handle with care: do not log or store.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

/// Where to get a PIN from.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum PinSource {
    /// The value of an environment variable.
    Env(String),
    /// The first line of a file (trailing newline and carriage return stripped).
    File(PathBuf),
    /// Ask on the terminal (no echo), with this prompt.
    Prompt(String),
    /// A PIN already in hand.
    Value(Pin),
}

impl PinSource {
    /// Reads the PIN.
    pub fn resolve(&self) -> Result<Pin> {
        let pin = match self {
            PinSource::Env(var) => match std::env::var(var) {
                Ok(v) => Pin::new(v),
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::PinUnavailable,
                        format!("PIN environment variable {var} is not set"),
                    ));
                }
            },
            PinSource::File(path) => {
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                    Error::with_source(
                        ErrorKind::PinUnavailable,
                        format!("cannot read PIN file {}", path.display()),
                        e,
                    )
                })?);
                let line = text.lines().next().unwrap_or("");
                Pin::new(line.trim_end_matches(['\r', '\n']))
            }
            PinSource::Prompt(prompt) => {
                let v = rpassword::prompt_password(prompt).map_err(|e| {
                    Error::with_source(
                        ErrorKind::PinUnavailable,
                        "cannot prompt for the PIN (no terminal?); use an environment variable or a PIN file",
                        e,
                    )
                })?;
                Pin::new(v)
            }
            PinSource::Value(p) => p.clone(),
        };
        if pin.expose().is_empty() {
            return Err(Error::new(ErrorKind::PinUnavailable, "the PIN is empty"));
        }
        Ok(pin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts() {
        let p = Pin::new("123456");
        assert_eq!(format!("{p:?}"), "Pin(<redacted>)");
        assert!(!format!("{p:#?}").contains("123456"));
        let s = PinSource::Value(p.clone());
        assert!(!format!("{s:?}").contains("123456"));
        let cfg = crate::TokenConfig::new("/m.so", "label", PinSource::Value(p));
        let shown = format!("{cfg:?} {cfg:#?}");
        assert!(!shown.contains("123456"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        let z = Pin::from_zeroizing(Zeroizing::new("987654".to_string()));
        assert_eq!(format!("{z:?}"), "Pin(<redacted>)");
        assert_eq!(z.expose(), "987654");
    }

    #[test]
    fn file_source_strips_newline() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pin");
        std::fs::write(&f, "4321\n").unwrap();
        assert_eq!(PinSource::File(f).resolve().unwrap().expose(), "4321");
    }

    #[test]
    fn missing_sources_are_clear_errors() {
        let e = PinSource::Env("SIGNET_TEST_NO_SUCH_VAR_93".into())
            .resolve()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PinUnavailable);
        let e = PinSource::File("/nonexistent/pin".into())
            .resolve()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PinUnavailable);
    }
}
