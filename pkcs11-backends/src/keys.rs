//! Key types and key descriptions.

use std::fmt;

use cryptoki::object::ObjectHandle;

use crate::error::{Error, ErrorKind};

/// The family of key an algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    Ec,
    Rsa,
    Ed25519,
}

/// The key types signet generates and signs with: the one key type of the whole workspace (the issuance core
/// re-exports it as `signet::keys::KeyType` and adds the signature schemes each signs with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// ECDSA on P-256.
    EcP256,
    /// ECDSA on P-384.
    EcP384,
    /// RSA, 2048-bit modulus.
    Rsa2048,
    /// RSA, 3072-bit modulus.
    Rsa3072,
    /// RSA, 4096-bit modulus.
    Rsa4096,
    /// Ed25519.
    Ed25519,
}

impl KeyType {
    /// Every key type, in a stable order.
    pub const ALL: [KeyType; 6] = [
        KeyType::EcP256,
        KeyType::EcP384,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
        KeyType::Ed25519,
    ];

    /// The CLI name (`ec-p256`, `rsa-3072`, `ed25519`, ...).
    pub fn name(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
            KeyType::Ed25519 => "ed25519",
        }
    }

    /// The RSA modulus size, for RSA types.
    pub fn rsa_bits(self) -> Option<u32> {
        match self {
            KeyType::Rsa2048 => Some(2048),
            KeyType::Rsa3072 => Some(3072),
            KeyType::Rsa4096 => Some(4096),
            _ => None,
        }
    }

    /// True for the RSA key types.
    pub fn is_rsa(self) -> bool {
        matches!(self, KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096)
    }

    /// The EC field size in bytes (half a raw ECDSA signature), for ECDSA types.
    pub fn ec_field_len(self) -> Option<usize> {
        match self {
            KeyType::EcP256 => Some(32),
            KeyType::EcP384 => Some(48),
            _ => None,
        }
    }

    pub(crate) fn family(self) -> Family {
        match self {
            KeyType::EcP256 | KeyType::EcP384 => Family::Ec,
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => Family::Rsa,
            KeyType::Ed25519 => Family::Ed25519,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KeyType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "unknown key type {s:?} (one of: {})",
                        KeyType::ALL.map(KeyType::name).join(", ")
                    ),
                )
            })
    }
}

/// Options for key generation.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyGenOptions {
    /// Destroy an existing key pair with the same label first (otherwise that is a `KeyExists` error).
    pub replace: bool,
}

/// A key pair on the token, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// CKA_LABEL.
    pub label: String,
    /// CKA_ID, shared by both halves.
    pub id: Vec<u8>,
    /// The key type, if it is one the layer knows.
    pub key_type: Option<KeyType>,
    /// Whether the public half is on the token too.
    pub has_public: bool,
}

/// A private key found on a session, ready to sign with. Cheap to clone; tied to the session (and
/// session epoch) that found it: using it on another session, or after `reopen`, is a `Stale` error.
#[derive(Debug, Clone)]
pub struct Key {
    pub(crate) label: String,
    pub(crate) id: Vec<u8>,
    pub(crate) key_type: KeyType,
    pub(crate) private: ObjectHandle,
    pub(crate) public: Option<ObjectHandle>,
    pub(crate) session_epoch: u64,
}

impl Key {
    /// CKA_LABEL.
    pub fn label(&self) -> &str {
        &self.label
    }
    /// CKA_ID.
    pub fn id(&self) -> &[u8] {
        &self.id
    }
    /// The key type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }
    /// The private key's object handle, for callers that drive cryptoki directly (benchmarks).
    pub fn private_handle(&self) -> ObjectHandle {
        self.private
    }
    /// The public key's object handle, if the token holds the public half.
    pub fn public_handle(&self) -> Option<ObjectHandle> {
        self.public
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip() {
        for k in KeyType::ALL {
            assert_eq!(k.name().parse::<KeyType>().unwrap(), k);
        }
        let e = "ec-p521".parse::<KeyType>().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("ec-p256"));
    }
}
