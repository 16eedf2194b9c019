//! Appliance tests over real gRPC on 127.0.0.1 (ephemeral ports) with mTLS and SoftHSM2: the SPIRE
//! UpstreamAuthority and KeyManager contracts checked with independent verifiers (the `spiffe` crate, `openssl
//! verify`, ring), signet's Issuer and Admin, the security boundary (authentication, policy, rate limits, audit), bad
//! input, a table of hostile callers and requests, and `signet serve` / `mint` / `bundle` as processes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test fixtures and helpers outside #[test] fns: a failed fixture is a failed test"
)]

mod bad_input;
mod boundary;
mod bundle_owners;
mod cli;
mod doctor;
mod figures;
mod hostile;
mod issuer;
mod join;
mod judges;
mod keymanager;
mod offline_root;
mod ops;
mod plugin;
mod renewal;
mod rotation;
mod security;
#[path = "../support/mod.rs"]
mod support;
mod token_cli;
mod tpm;
mod ttl;
mod upstream;

use support::handshake;
