//! A token-backed [`AuthorityKey`] for direct, non-pipelined use (the CLI, tests, one-off signatures).
//!
//! [`TokenKey`] signs with a key that lives in a PKCS#11 token, through a small pool of logged-in sessions: each
//! `sign` takes a session from the pool (opening one if fewer than the pool's size are open, else waiting for one to
//! come back), so every session is used by one thread at a time. Transient token failures are retried a bounded
//! number of times on a fresh session (re-initialising the library first when the device was removed); permanent ones
//! are reported. The token layer's transience becomes [`KeyError::is_transient`].
//!
//! The high-throughput path is the batching pipeline ([`crate::pipeline`]); this type is for callers that sign now
//! and then.

use std::sync::{Condvar, Mutex, MutexGuard};

use signet_pkcs11::{Key, RvClass, SignAlgorithm, Token, TokenSession};

use crate::keys::KeySchemes as _;
use crate::keys::{AuthorityKey, KeyError, KeyType, SignatureScheme};

/// How many times a transient failure is retried before it is reported.
const MAX_ATTEMPTS: u32 = 3;

/// The token layer's algorithm for a signature scheme.
pub fn sign_algorithm(scheme: SignatureScheme) -> SignAlgorithm {
    match scheme {
        SignatureScheme::EcdsaP256Sha256 => SignAlgorithm::EcdsaSha256,
        SignatureScheme::EcdsaP384Sha384 => SignAlgorithm::EcdsaSha384,
        SignatureScheme::RsaPkcs1Sha256 => SignAlgorithm::RsaPkcs1Sha256,
        SignatureScheme::RsaPkcs1Sha384 => SignAlgorithm::RsaPkcs1Sha384,
        SignatureScheme::RsaPkcs1Sha512 => SignAlgorithm::RsaPkcs1Sha512,
        SignatureScheme::RsaPssSha256 => SignAlgorithm::RsaPssSha256,
        SignatureScheme::RsaPssSha384 => SignAlgorithm::RsaPssSha384,
        SignatureScheme::Ed25519 => SignAlgorithm::Ed25519,
    }
}

/// A token-layer error as a [`KeyError`], keeping its transience and the error itself as the source.
pub fn key_error(what: &str, err: signet_pkcs11::Error) -> KeyError {
    KeyError::Signing {
        message: format!("{what}: {err}"),
        transient: err.is_transient(),
        source: Some(Box::new(err)),
    }
}

struct Pool {
    idle: Vec<(TokenSession, Key)>,
    open: usize,
}

/// An [`AuthorityKey`] whose private half is a key on a PKCS#11 token (see the module docs).
pub struct TokenKey {
    token: Token,
    label: String,
    key_type: KeyType,
    spki: Vec<u8>,
    max_sessions: usize,
    pool: Mutex<Pool>,
    returned: Condvar,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("token", &self.token)
            .field("label", &self.label)
            .field("key_type", &self.key_type)
            .field("max_sessions", &self.max_sessions)
            .finish_non_exhaustive()
    }
}

impl TokenKey {
    /// Opens the key labelled `label` on `token`, with a pool of up to `max_sessions` sessions (at least 1). Reads
    /// the public key once; the first session stays in the pool.
    pub fn open(token: Token, label: &str, max_sessions: usize) -> Result<Self, KeyError> {
        let mut session = token
            .session()
            .map_err(|e| key_error("opening a session", e))?;
        let key = session
            .find_key(label)
            .map_err(|e| key_error("finding the key", e))?;
        let key_type = key.key_type();
        let spki = session
            .public_key_der(label)
            .map_err(|e| key_error("reading the public key", e))?;
        Ok(Self {
            token,
            label: label.to_string(),
            key_type,
            spki,
            max_sessions: max_sessions.max(1),
            pool: Mutex::new(Pool {
                idle: vec![(session, key)],
                open: 1,
            }),
            returned: Condvar::new(),
        })
    }

    /// The key's label on the token.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The token.
    pub fn token(&self) -> &Token {
        &self.token
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes an idle session, opens a new one if the pool has room, or waits for one to come back.
    fn checkout(&self) -> Result<(TokenSession, Key), KeyError> {
        let mut pool = self.lock();
        loop {
            if let Some(s) = pool.idle.pop() {
                return Ok(s);
            }
            if pool.open < self.max_sessions {
                pool.open += 1;
                drop(pool);
                let opened = self.token.session().and_then(|mut s| {
                    let k = s.find_key(&self.label)?;
                    Ok((s, k))
                });
                if opened.is_err() {
                    self.lock().open -= 1;
                    self.returned.notify_one();
                }
                return opened.map_err(|e| key_error("opening a session", e));
            }
            pool = self.returned.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn checkin(&self, session: Option<(TokenSession, Key)>) {
        let mut pool = self.lock();
        match session {
            Some(s) => pool.idle.push(s),
            None => pool.open -= 1,
        }
        drop(pool);
        self.returned.notify_one();
    }

    /// Recovers `session` after a transient failure, as the error says: re-initialise the library (when the device
    /// went away), then re-open the session and find the key again.
    fn recover(
        &self,
        session: &mut TokenSession,
        key: &mut Key,
        err: &signet_pkcs11::Error,
    ) -> Result<(), signet_pkcs11::Error> {
        match err.recovery() {
            RvClass::Retry => Ok(()),
            RvClass::Reinitialize => {
                self.token.reinitialize(session.generation())?;
                session.reopen()?;
                *key = session.find_key(&self.label)?;
                Ok(())
            }
            _ => {
                session.reopen()?;
                *key = session.find_key(&self.label)?;
                Ok(())
            }
        }
    }
}

impl AuthorityKey for TokenKey {
    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        if !self.key_type.supports(scheme) {
            return Err(KeyError::UnsupportedScheme {
                key_type: self.key_type,
                scheme,
            });
        }
        let alg = sign_algorithm(scheme);
        let (mut session, mut key) = self.checkout()?;
        let mut attempt = 1;
        let mut relooked = false;
        loop {
            match session.sign(&key, alg, message) {
                Ok(sig) => {
                    self.checkin(Some((session, key)));
                    return Ok(sig);
                }
                // The token forgot the cached handle (an HSM cluster failed over): find the key again, retry once.
                Err(e) if e.is_stale_handle() && !relooked => {
                    relooked = true;
                    tracing::warn!(label = %self.label, error = %e, "stale key handle: looking the key up again");
                    session.forget_key(&self.label);
                    match session.find_key(&self.label) {
                        Ok(k) => key = k,
                        Err(fe) => {
                            self.checkin(None);
                            return Err(key_error("finding the key again", fe));
                        }
                    }
                }
                Err(e) if e.is_transient() && attempt < MAX_ATTEMPTS => {
                    attempt += 1;
                    tracing::warn!(label = %self.label, error = %e, attempt, "transient token failure; retrying");
                    if let Err(re) = self.recover(&mut session, &mut key, &e) {
                        // The session is unusable: drop it (the pool opens a fresh one next time).
                        self.checkin(None);
                        return Err(key_error("recovering the session", re));
                    }
                }
                Err(e) => {
                    let keep = !e.is_transient();
                    self.checkin(keep.then_some((session, key)));
                    return Err(key_error("the token failed to sign", e));
                }
            }
        }
    }
}
