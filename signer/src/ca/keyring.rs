//! The token operations the life cycle needs: generate a key under a label, find out whether a label exists,
//! destroy it, list the labels, and sign with a key. [`TokenKeyring`] does them on a PKCS#11 token; signatures go
//! through the pipeline when one is given (the appliance), or through a direct session pool ([`TokenKey`]).

use std::sync::Arc;

use signet_pkcs11::{ErrorKind, KeyGenOptions, Token};

use crate::keys::AuthorityKey;
use crate::keys::token::TokenKey;
use crate::pipeline::Pipeline;

/// A token refused or failed an operation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("token {token:?}: {message}")]
pub struct KeyringError {
    /// The token's name.
    pub token: String,
    /// What went wrong (the token's own words included).
    pub message: String,
}

/// Key operations on the token that holds a trust domain's authorities.
pub trait Keyring: Send + Sync + std::fmt::Debug {
    /// The token's name (stored with each authority).
    fn token_name(&self) -> &str;
    /// Generates a key pair labelled `label`; returns its SubjectPublicKeyInfo DER.
    fn generate(
        &self,
        label: &str,
        key_type: signet_pkcs11::KeyType,
    ) -> Result<Vec<u8>, KeyringError>;
    /// The public key of `label`, or `None` when no such key is on the token.
    fn public_key(&self, label: &str) -> Result<Option<Vec<u8>>, KeyringError>;
    /// Destroys `label` (both halves); a missing key is not an error.
    fn destroy(&self, label: &str) -> Result<(), KeyringError>;
    /// The labels of the key pairs on the token.
    fn labels(&self) -> Result<Vec<String>, KeyringError>;
    /// A signer for `label`.
    fn signer(&self, label: &str) -> Result<Arc<dyn AuthorityKey>, KeyringError>;
}

/// A [`Keyring`] on a PKCS#11 token.
#[derive(Debug, Clone)]
pub struct TokenKeyring {
    name: String,
    token: Token,
    pipeline: Option<Pipeline>,
}

impl TokenKeyring {
    /// Keys on `token` (called `name`); signatures through `pipeline` when given.
    pub fn new(name: impl Into<String>, token: Token, pipeline: Option<Pipeline>) -> Self {
        Self {
            name: name.into(),
            token,
            pipeline,
        }
    }

    fn err(&self, message: impl Into<String>) -> KeyringError {
        KeyringError {
            token: self.name.clone(),
            message: message.into(),
        }
    }

    fn session(&self) -> Result<signet_pkcs11::TokenSession, KeyringError> {
        self.token
            .session()
            .map_err(|e| self.err(format!("cannot open a session: {e}")))
    }
}

impl Keyring for TokenKeyring {
    fn token_name(&self) -> &str {
        &self.name
    }

    fn generate(
        &self,
        label: &str,
        key_type: signet_pkcs11::KeyType,
    ) -> Result<Vec<u8>, KeyringError> {
        let mut s = self.session()?;
        s.generate_key(label, key_type, KeyGenOptions::default())
            .map_err(|e| self.err(format!("refused to generate key {label:?}: {e}")))?;
        s.public_key_der(label)
            .map_err(|e| self.err(format!("cannot read the public key of {label:?}: {e}")))
    }

    fn public_key(&self, label: &str) -> Result<Option<Vec<u8>>, KeyringError> {
        let mut s = self.session()?;
        match s.public_key_der(label) {
            Ok(k) => Ok(Some(k)),
            Err(e) if e.kind() == ErrorKind::KeyNotFound => Ok(None),
            Err(e) => Err(self.err(format!("cannot look up {label:?}: {e}"))),
        }
    }

    fn destroy(&self, label: &str) -> Result<(), KeyringError> {
        let mut s = self.session()?;
        match s.destroy_key(label) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::KeyNotFound => Ok(()),
            Err(e) => Err(self.err(format!("cannot destroy {label:?}: {e}"))),
        }
    }

    fn labels(&self) -> Result<Vec<String>, KeyringError> {
        let mut s = self.session()?;
        let keys = s
            .list_keys()
            .map_err(|e| self.err(format!("cannot list the keys: {e}")))?;
        Ok(keys.into_iter().map(|k| k.label).collect())
    }

    fn signer(&self, label: &str) -> Result<Arc<dyn AuthorityKey>, KeyringError> {
        match &self.pipeline {
            Some(p) => p
                .key(label)
                .map(|k| Arc::new(k) as Arc<dyn AuthorityKey>)
                .map_err(|e| self.err(format!("key {label:?}: {e}"))),
            None => TokenKey::open(self.token.clone(), label, 1)
                .map(|k| Arc::new(k) as Arc<dyn AuthorityKey>)
                .map_err(|e| self.err(format!("key {label:?}: {e}"))),
        }
    }
}
