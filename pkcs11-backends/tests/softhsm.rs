//! Integration tests against real SoftHSM2 tokens: one test binary (to keep link time down), with
//! modules. Each test gets a fresh token from `signet_pkcs11::testing::SoftHsm`; without SoftHSM2
//! installed, each test prints SKIP and returns.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] functions
#[path = "softhsm/common.rs"]
mod common;
#[path = "softhsm/errors.rs"]
mod errors;
#[path = "softhsm/keys.rs"]
mod keys;
#[path = "softhsm/sessions.rs"]
mod sessions;
#[path = "softhsm/signing.rs"]
mod signing;
