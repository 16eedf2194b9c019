//! signet: a signing appliance for SPIFFE identities whose CA keys live in PKCS#11 tokens.
//!
//! This library holds the SPIFFE-conformant issuance core:
//! - [`keys`]: the [`keys::AuthorityKey`] seam every signature goes through, and the ring-backed
//!   [`keys::SoftwareKey`];
//! - [`spiffe`]: SPIFFE IDs, trust domains and the bundle document;
//! - [`x509`]: CSR checks, X509-SVID / CA / root issuance and the pre-issuance lint;
//! - [`jwt`]: JWT-SVID issuance with the same lint-then-sign-then-verify discipline;
//! - [`lint`]: the lint failure type and its metric;
//! - [`keys_token`]: [`keys_token::TokenKey`], a token-backed [`keys::AuthorityKey`] for direct, non-pipelined use;
//! - [`pipeline`]: the batching signer (queue -> HSM workers -> replies), the CPU pool, [`pipeline::PipelineKey`]
//!   and X509-SVID issuance in direct and delegated mode;
//! - [`store`]: the datastore (sqlx; SQLite in the data directory, or PostgreSQL shared by replicas), and [`ca`]:
//!   the authorities' life cycle on it (prepare, publish, activate, retire, taint, destroy; crash-safe; on a
//!   schedule or by hand);
//! - [`replica`]: several replicas on one PostgreSQL datastore (following each other's changes, one running the
//!   schedule, rate limits shared);
//! - [`config`], [`policy`], [`audit`], [`api`] and [`serve`]: the appliance itself (`signet serve`): its
//!   configuration, who may do what, the audit log, the gRPC services (SPIRE UpstreamAuthority and KeyManager,
//!   signet Issuer and Admin) with mTLS, and start-up / shutdown;
//! - [`plugin`]: `signet spire-plugin`, the SPIRE external-plugin shim (go-plugin) that forwards to an appliance.
//! - [`health`]: the plain-HTTP operations listener (`/metrics`, `/healthz`, `/readyz`);
//! - [`federation`]: the SPIFFE bundle endpoint (https_web, https_spiffe) and the poller of other trust domains'.
#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod bundle;
pub mod ca;
pub mod config;
pub mod datadir;
pub mod federation;
pub mod health;
pub mod jwt;
pub mod keys;
pub mod lint;
pub mod own;
pub mod pipeline;
pub mod plugin;
pub mod policy;
pub mod replica;
pub mod serve;
pub mod shutdown;
pub mod spiffe;
pub mod store;
pub mod units;
pub mod x509;
