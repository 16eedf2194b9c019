//! X.509 issuance: CSR checks ([`csr`]), certificate templates and signing ([`issue`]), and the pre-issuance lint
//! ([`lint`]) that every to-be-signed certificate passes before an authority key signs it.

pub mod csr;
pub mod issue;
pub mod lint;
pub mod names;

pub use csr::{CsrError, VerifiedCsr, parse_and_verify_csr, parse_csr_unverified};
pub use issue::{
    Authority, IntermediateRequest, IssueError, IssuedCertificate, LeafRequest, MintedCa,
    RootRequest,
};
pub use lint::{LintContext, Profile, lint_tbs};
