//! hsm-sim: a PKCS#11 module that behaves like a network HSM.
//!
//! SoftHSM2 is fast, local and never fails; a real HSM sits across a network (milliseconds a signature), caps
//! sessions and signatures per second, and fails: sessions drop, the device disappears, a signature comes back
//! wrong. hsm-sim is a complete PKCS#11 v2.40 token (EC P-256/P-384, Ed25519, RSA 2048–4096; keys persisted in a
//! directory, sealed under the PIN) with that behaviour on demand, loaded like any vendor module:
//! `Pkcs11::new("libhsm_sim.so")`, `pkcs11-tool --module libhsm_sim.so`.
//!
//! # Configuration
//! A TOML file named by `HSM_SIM_CONFIG` (see `hsm-sim.example.toml`, every key commented), overridden by:
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `HSM_SIM_CONFIG` | path of the TOML model | none |
//! | `HSM_SIM_DIR` | token directory | `$XDG_DATA_HOME/hsm-sim`, else `~/.local/share/hsm-sim` |
//! | `HSM_SIM_LATENCY_MS` | latency of a signature / key generation | 0 |
//! | `HSM_SIM_JITTER_MS` | extra random latency, uniform 0..=N | 0 |
//! | `HSM_SIM_CALL_LATENCY_MS` | latency of every other token call | 0 |
//! | `HSM_SIM_MAX_SESSIONS` | open sessions allowed (0: unlimited) | 0 |
//! | `HSM_SIM_MAX_OPS_PER_SEC` | signatures per second, whole device (0: unlimited) | 0 |
//! | `HSM_SIM_BURST` | burst above the rate | rate/10 |
//! | `HSM_SIM_RATE_LIMIT` | `wait` (queue) or `reject` (fail with `rate_limit_rv`) | `wait` |
//! | `HSM_SIM_PIN_KDF_ITERATIONS` | PBKDF2 iterations for PINs | 100000 |
//! | `HSM_SIM_CONTROL` | control file polled for fault plans | none |
//! | `HSM_SIM_CONTROL_POLL_MS` | poll interval of the control file (0: every call) | 50 |
//! | `HSM_SIM_SEED` | seed of the fault RNG | 1 |
//!
//! # Faults
//! [`faults::FaultPlan`] lists them: fail the next N operations (or a fraction) with a chosen CK_RV, unplug the
//! device for a while (CKR_DEVICE_REMOVED, then CKR_TOKEN_NOT_PRESENT, sessions gone afterwards), drop all
//! sessions, corrupt signatures. Set them in the configuration or, while a process runs, with
//! [`control::Control`], which writes the control file and reads back [`faults::Counters`].
//!
//! # Loading it
//! - As a module file: `Pkcs11::new(path_to_libhsm_sim.so)`. Cargo builds the cdylib next to the rlib
//!   (`target/<profile>/libhsm_sim.so` for this package, `target/<profile>/deps/libhsm_sim.so` when another
//!   package depends on it).
//! - Embedded in a binary: depend on this crate, reference [`C_GetFunctionList`] so the linker keeps it, and
//!   export that one symbol from the executable, e.g. in the binary's `build.rs`:
//!   `cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol=C_GetFunctionList` (GNU ld 2.35+ or lld). Then
//!   `Pkcs11::new_from_self()` finds it. Without the export it fails with "Missing PKCS#11 symbol".
//!   Only `C_GetFunctionList` is exported; the function list points at private functions, so a vendor module
//!   loaded beside it keeps its own entry points. A program that embeds hsm-sim can hand it its configuration
//!   with [`set_embedded_config`] before the first `C_Initialize`, instead of through environment variables.
//!
//! The module holds one device per process (C_Initialize / C_Finalize as PKCS#11 says). Token files are meant
//! for one process at a time: a second process sees objects created by the first only after it re-initialises.
//!
//! # Layout
//! [`token::Device`] is the whole token in safe Rust (its operations grouped in `token/`); [`registry`] the
//! process's device between C_Initialize and C_Finalize; [`crypto`] the keys and mechanisms; [`store`] the sealed
//! files; [`limiter`] the rate limit; the `ffi` module is the C ABI and the only place with `unsafe`: it converts
//! pointers and calls the registry's device.

pub mod config;
pub mod control;
pub mod crypto;
pub mod faults;
mod ffi;
pub mod limiter;
mod p256_sign;
pub mod registry;
pub mod rv;
pub mod store;
pub mod token;

/// The PKCS#11 entry point, re-exported so a binary that embeds hsm-sim links it in (see the crate docs on
/// `Pkcs11::new_from_self`).
pub use ffi::C_GetFunctionList;

pub use config::Config;
pub use control::Control;
pub use faults::{Counters, FaultPlan, OpKind};
pub use ffi::set_embedded_config;
pub use rv::Rv;
pub use token::Device;
