//! Signature algorithms and host-side hashing.

use ring::digest;

use crate::error::{Error, ErrorKind, Result};
use crate::keys::{Family, KeyType};

/// A hash computed on the host (ring), before the token signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HashAlg {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// Digest length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// Hashes `data` (ring).
    pub fn digest(self, data: &[u8]) -> digest::Digest {
        let alg = match self {
            HashAlg::Sha256 => &digest::SHA256,
            HashAlg::Sha384 => &digest::SHA384,
            HashAlg::Sha512 => &digest::SHA512,
        };
        digest::digest(alg, data)
    }
}

/// How to sign. The token always receives an already-hashed input, except for Ed25519 (EdDSA hashes
/// internally, so the whole message goes to the token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SignAlgorithm {
    /// ECDSA over SHA-256 (CKM_ECDSA on the digest); signature raw r||s.
    EcdsaSha256,
    /// ECDSA over SHA-384.
    EcdsaSha384,
    /// ECDSA over SHA-512.
    EcdsaSha512,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (CKM_RSA_PKCS on the DigestInfo).
    RsaPkcs1Sha256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RsaPkcs1Sha384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RsaPkcs1Sha512,
    /// RSASSA-PSS with SHA-256, MGF1-SHA-256, 32-byte salt (CKM_RSA_PKCS_PSS on the digest).
    RsaPssSha256,
    /// RSASSA-PSS with SHA-384, MGF1-SHA-384, 48-byte salt.
    RsaPssSha384,
    /// RSASSA-PSS with SHA-512, MGF1-SHA-512, 64-byte salt.
    RsaPssSha512,
    /// Ed25519 (CKM_EDDSA over the message; no host hashing, no `sign_digest`).
    Ed25519,
}

impl SignAlgorithm {
    /// The host-side hash, if any.
    pub fn hash(self) -> Option<HashAlg> {
        use SignAlgorithm::*;
        match self {
            EcdsaSha256 | RsaPkcs1Sha256 | RsaPssSha256 => Some(HashAlg::Sha256),
            EcdsaSha384 | RsaPkcs1Sha384 | RsaPssSha384 => Some(HashAlg::Sha384),
            EcdsaSha512 | RsaPkcs1Sha512 | RsaPssSha512 => Some(HashAlg::Sha512),
            Ed25519 => None,
        }
    }

    pub(crate) fn family(self) -> Family {
        use SignAlgorithm::*;
        match self {
            EcdsaSha256 | EcdsaSha384 | EcdsaSha512 => Family::Ec,
            RsaPkcs1Sha256 | RsaPkcs1Sha384 | RsaPkcs1Sha512 | RsaPssSha256 | RsaPssSha384
            | RsaPssSha512 => Family::Rsa,
            Ed25519 => Family::Ed25519,
        }
    }

    /// Whether `key_type` can make this signature.
    pub fn fits(self, key_type: KeyType) -> bool {
        self.family() == key_type.family()
    }

    /// The natural default algorithm for a key type (ECDSA with the curve's hash, PKCS#1 v1.5 SHA-256
    /// for RSA, Ed25519).
    pub fn default_for(key_type: KeyType) -> SignAlgorithm {
        match key_type {
            KeyType::EcP256 => SignAlgorithm::EcdsaSha256,
            KeyType::EcP384 => SignAlgorithm::EcdsaSha384,
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => SignAlgorithm::RsaPkcs1Sha256,
            KeyType::Ed25519 => SignAlgorithm::Ed25519,
        }
    }

    pub(crate) fn check_key(self, key_type: KeyType, label: &str) -> Result<()> {
        if self.fits(key_type) {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::KeyTypeMismatch,
                format!("key {label:?} is {key_type}, which cannot make a {self:?} signature"),
            ))
        }
    }
}
