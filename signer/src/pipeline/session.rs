//! The worker's seam to a token: [`HsmSession`] (what a worker does with its one session) and [`SessionOpener`] (how
//! a worker gets a session, and re-initialises the library after a device was removed).
//!
//! Production code uses the token layer directly: [`TokenSession`] is an `HsmSession` and [`Token`] a
//! `SessionOpener`. The seam exists so tests can put a fault-injecting decorator between a worker and a real token.

use std::fmt;

use signet_pkcs11::{Error, Key, SignAlgorithm, Token, TokenSession};

/// One logged-in session as a worker uses it. Owned by one worker thread.
pub trait HsmSession: Send {
    /// Finds the private key labelled `label` (the worker caches the result).
    fn find_key(&mut self, label: &str) -> Result<Key, Error>;
    /// The public key labelled `label`, as SubjectPublicKeyInfo DER.
    fn public_key_der(&mut self, label: &str) -> Result<Vec<u8>, Error>;
    /// Signs a digest computed by the submitter.
    fn sign_digest(
        &mut self,
        key: &Key,
        alg: SignAlgorithm,
        digest: &[u8],
    ) -> Result<Vec<u8>, Error>;
    /// Signs a whole message (Ed25519, which hashes inside the token).
    fn sign_message(
        &mut self,
        key: &Key,
        alg: SignAlgorithm,
        message: &[u8],
    ) -> Result<Vec<u8>, Error>;
    /// Forgets any handle cached for the key labelled `label` (the token said it no longer knows it), so that
    /// the next [`find_key`](Self::find_key) looks it up on the token again.
    fn forget_key(&mut self, label: &str) {
        let _ = label;
    }
    /// Replaces the PKCS#11 session with a fresh, logged-in one; cached keys become stale.
    fn reopen(&mut self) -> Result<(), Error>;
    /// The library generation the session was opened in (for [`SessionOpener::reinitialize`]).
    fn generation(&self) -> u64;
}

impl HsmSession for TokenSession {
    fn find_key(&mut self, label: &str) -> Result<Key, Error> {
        TokenSession::find_key(self, label)
    }
    fn public_key_der(&mut self, label: &str) -> Result<Vec<u8>, Error> {
        TokenSession::public_key_der(self, label)
    }
    fn sign_digest(
        &mut self,
        key: &Key,
        alg: SignAlgorithm,
        digest: &[u8],
    ) -> Result<Vec<u8>, Error> {
        TokenSession::sign_digest(self, key, alg, digest)
    }
    fn sign_message(
        &mut self,
        key: &Key,
        alg: SignAlgorithm,
        message: &[u8],
    ) -> Result<Vec<u8>, Error> {
        TokenSession::sign(self, key, alg, message)
    }
    fn forget_key(&mut self, label: &str) {
        TokenSession::forget_key(self, label);
    }
    fn reopen(&mut self) -> Result<(), Error> {
        TokenSession::reopen(self)
    }
    fn generation(&self) -> u64 {
        TokenSession::generation(self)
    }
}

/// Opens worker sessions on one token, and re-initialises its library when a device was removed.
pub trait SessionOpener: Send + Sync + fmt::Debug {
    /// Opens a new logged-in session.
    fn open(&self) -> Result<Box<dyn HsmSession>, Error>;
    /// Re-initialises the PKCS#11 library if it is still at `seen_generation` (see
    /// [`Token::reinitialize`]).
    fn reinitialize(&self, seen_generation: u64) -> Result<(), Error>;
}

impl SessionOpener for Token {
    fn open(&self) -> Result<Box<dyn HsmSession>, Error> {
        Ok(Box::new(self.session()?))
    }
    fn reinitialize(&self, seen_generation: u64) -> Result<(), Error> {
        Token::reinitialize(self, seen_generation)
    }
}
