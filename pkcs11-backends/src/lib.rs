//! signet's PKCS#11 token layer: tokens, keys, sessions and signing with host-side hashing, on
//! `cryptoki`.
//!
//! - A [`Token`] is a module path + token selector (label or serial) + PIN source ([`TokenConfig`]).
//!   The module is loaded and initialised once per process (a registry, [`Module`]). `Token` is
//!   `Clone + Send + Sync`.
//! - A [`TokenSession`] is one logged-in R/W session, `Send` but not `Sync`: one per worker thread.
//!   It generates, finds, lists, exports (public halves, as SubjectPublicKeyInfo DER) and destroys
//!   keys, and signs (ECDSA P-256/P-384, RSA PKCS#1 v1.5 and PSS, Ed25519) with host-side hashing.
//! - Errors ([`Error`]) have a [`kind`](Error::kind) and know whether they are transient
//!   ([`Error::is_transient`], [`classify_rv`]).
//! - [`Profile`]s know token quirks (SoftHSM2, tpm2-pkcs11, generic).
//! - Feature `testing`: test beds ([`testing::TokenBed`]): [`testing::SoftHsm`], a throwaway
//!   SoftHSM2 token per test; [`testing::HsmSim`], the workspace's simulator; [`testing::Tpm`], a
//!   TPM 2.0 through tpm2-pkcs11 started by `scripts/tpm-rig`.
//!
//! ```no_run
//! use signet_pkcs11::{KeyGenOptions, KeyType, PinSource, SignAlgorithm, Token, TokenConfig};
//! # fn main() -> signet_pkcs11::Result<()> {
//! let token = Token::open(&TokenConfig::new(
//!     "/usr/lib/softhsm/libsofthsm2.so",
//!     "ca",
//!     PinSource::Env("SIGNET_PIN".into()),
//! ))?;
//! let mut session = token.session()?; // one per worker thread
//! session.generate_key("ca-key", KeyType::EcP256, KeyGenOptions::default())?;
//! let key = session.find_key("ca-key")?; // once; then sign many times
//! let sig = session.sign(&key, SignAlgorithm::EcdsaSha256, b"message")?; // raw r||s
//! let spki_der = session.public_key_der("ca-key")?;
//! # let _ = (sig, spki_der); Ok(()) }
//! ```
// No unsafe code in the token layer; the `testing` feature's test beds set one environment variable before a
// module loads, which is the only exception (and never part of a production build).
#![cfg_attr(not(feature = "testing"), forbid(unsafe_code))]

mod encoding;
pub mod error;
mod keys;
mod module;
mod pin;
mod profile;
mod session;
mod sign;
#[cfg(feature = "testing")]
pub mod testing;
mod token;

pub use encoding::{digest_info, ecdsa_der_to_raw, ecdsa_raw_to_der, spki_subject_public_key};
pub use error::{
    Error, ErrorKind, Result, RvClass, RvError, classify_rv, is_transient_in_chain, rv_in_chain,
};
pub use keys::{Key, KeyGenOptions, KeyInfo, KeyType};
pub use module::{BUILTIN_MODULE, Module};
pub use pin::{Pin, PinSource};
pub use profile::Profile;
pub use session::TokenSession;
pub use sign::{HashAlg, SignAlgorithm};
pub use token::{
    DEFAULT_MODULE, SlotSummary, Token, TokenConfig, TokenSelector, TokenSummary, init_token,
    list_slots,
};

/// Re-export of the `cryptoki` crate this layer is built on (for raw access in benchmarks).
pub use cryptoki;
