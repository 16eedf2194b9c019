//! Issuance tests: leaves, SPIRE CAs, roots and JWT-SVIDs issued with every key type, checked by independent
//! verifiers (the `spiffe` crate, `openssl verify`), bundle round-trips, table-driven negative cases and property
//! tests of the parsers. Everything runs against a pluggable key factory ([`common::KeyFactory`]).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test fixtures and helpers outside #[test] fns: a failed fixture is a failed test"
)]

mod bundle;
mod common;
mod ids;
mod jwt;
mod keys;
mod lint_metric;
mod negative;
mod oracles;
mod props;
#[path = "../support/mod.rs"]
mod support;
mod x509;
