//! What a conformance test needs from a token provider.

use std::fmt;

use crate::token::TokenConfig;

/// A token a test may use: how to open it, and which of its keys belong to the test.
///
/// What the token *can* do is not part of the bed: tests ask the opened [`Token`](crate::Token)
/// (its mechanism list, [`Token::unsupported_reason`](crate::Token::unsupported_reason), its
/// [`Profile`](crate::Profile)), exactly as production code does.
pub trait TokenBed: fmt::Debug + Send + Sync {
    /// A short name of the provider for test output ("softhsm2", "hsm-sim", "tpm2").
    fn provider(&self) -> &str;

    /// A configuration that opens the token with the right PIN (profile detected).
    fn config(&self) -> TokenConfig;

    /// The prefix every key label of this test starts with. A token shared with other tests of the
    /// process (one token per process, or per machine) gives each test its own prefix; a fresh token
    /// gives "".
    fn key_prefix(&self) -> &str;

    /// Whether the token belongs to this test alone (created for it, empty at first).
    fn fresh(&self) -> bool;
}
