//! Token profiles: what we know about a family of tokens' quirks.

use std::time::Duration;

use crate::keys::KeyType;

/// A family of tokens with known quirks. Chosen explicitly in [`TokenConfig`](crate::TokenConfig) or
/// detected from the library's and token's manufacturer information ([`Profile::detect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Profile {
    /// SoftHSM2 (`/usr/lib/softhsm/libsofthsm2.so`): software token, everything fast, many sessions.
    SoftHsm2,
    /// tpm2-pkcs11: no session objects, RSA up to 3072 bits, one effective session (the TPM serialises
    /// everything, and concurrent logins corrupt the module's TPM context, so the layer serialises
    /// every call on the module itself), slow key generation (tens of seconds for RSA on a real TPM).
    Tpm2,
    /// Any other (vendor) module: trust its mechanism list, assume nothing else.
    Generic,
}

impl Profile {
    /// Guesses the profile from C_GetInfo's manufacturer/description and C_GetTokenInfo's
    /// manufacturer/model.
    pub fn detect(
        library_manufacturer: &str,
        library_description: &str,
        token_manufacturer: &str,
        token_model: &str,
    ) -> Profile {
        let all = format!(
            "{library_manufacturer} {library_description} {token_manufacturer} {token_model}"
        )
        .to_ascii_lowercase();
        if all.contains("softhsm") {
            Profile::SoftHsm2
        } else if all.contains("tpm2") || all.contains("tpm 2") {
            Profile::Tpm2
        } else {
            Profile::Generic
        }
    }

    /// A short name ("softhsm2", "tpm2", "generic").
    pub fn name(self) -> &'static str {
        match self {
            Profile::SoftHsm2 => "softhsm2",
            Profile::Tpm2 => "tpm2",
            Profile::Generic => "generic",
        }
    }

    /// Whether the token can hold session (non-CKA_TOKEN) objects.
    pub fn supports_session_objects(self) -> bool {
        !matches!(self, Profile::Tpm2)
    }

    /// The number of sessions that actually sign in parallel (`None`: no known limit). A signing
    /// pipeline should not open more worker sessions than this. With `Some(1)` the layer serialises
    /// every call of every session on the module.
    pub fn effective_sessions(self) -> Option<usize> {
        match self {
            Profile::Tpm2 => Some(1),
            _ => None,
        }
    }

    /// The largest RSA modulus the token family handles, if limited.
    pub fn max_rsa_bits(self) -> Option<u32> {
        match self {
            Profile::Tpm2 => Some(3072),
            _ => None,
        }
    }

    /// How long key generation may take before a caller should worry.
    pub fn keygen_timeout(self) -> Duration {
        match self {
            Profile::Tpm2 => Duration::from_secs(120),
            _ => Duration::from_secs(30),
        }
    }

    /// Why this profile refuses `key_type`, if it does (known limits beyond the mechanism list).
    pub fn refuses(self, key_type: KeyType) -> Option<String> {
        if let (Some(max), Some(bits)) = (self.max_rsa_bits(), key_type.rsa_bits())
            && bits > max
        {
            return Some(format!(
                "{} tokens support RSA up to {max} bits",
                self.name()
            ));
        }
        None
    }
}

impl std::str::FromStr for Profile {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "softhsm2" | "softhsm" => Ok(Profile::SoftHsm2),
            "tpm2" | "tpm2-pkcs11" => Ok(Profile::Tpm2),
            "generic" => Ok(Profile::Generic),
            _ => Err(crate::Error::new(
                crate::ErrorKind::InvalidInput,
                format!("unknown token profile {s:?} (softhsm2, tpm2, generic)"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection() {
        assert_eq!(
            Profile::detect(
                "SoftHSM",
                "Implementation of PKCS11",
                "SoftHSM project",
                "SoftHSM v2"
            ),
            Profile::SoftHsm2
        );
        assert_eq!(
            Profile::detect(
                "tpm2-software.github.io",
                "TPM2.0 Cryptoki",
                "IBM",
                "SW   TPM"
            ),
            Profile::Tpm2
        );
        assert_eq!(
            Profile::detect("Acme", "HSM", "Acme", "X1"),
            Profile::Generic
        );
    }

    #[test]
    fn tpm2_limits() {
        assert!(Profile::Tpm2.refuses(KeyType::Rsa4096).is_some());
        assert!(Profile::Tpm2.refuses(KeyType::Rsa3072).is_none());
        assert!(Profile::SoftHsm2.refuses(KeyType::Rsa4096).is_none());
        assert_eq!(Profile::Tpm2.effective_sessions(), Some(1));
        assert!(!Profile::Tpm2.supports_session_objects());
    }
}
