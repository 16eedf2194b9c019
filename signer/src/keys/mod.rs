//! The private half of an authority, as the issuance core sees it.
//!
//! Everything signet signs goes through [`AuthorityKey`]: the PKCS#11 token layer implements it for keys that live
//! in a token, the batching pipeline implements it for keys it drives, and [`SoftwareKey`] implements it with ring
//! for keys held in process memory (delegated mode's short-lived issuing key, and tests).
//!
//! The contract mirrors what PKCS#11 returns: the implementation hashes on the host where the scheme has a hash and
//! returns the raw signature (r||s for ECDSA, the PKCS#1 v1.5 / PSS block for RSA, 64 bytes for Ed25519). Callers
//! re-encode where a format wants something else ([`ecdsa_raw_to_der`] for X.509).
//!
//! [`verify_signature`] is the independent (ring) check every returned signature passes before a credential leaves;
//! The `verify` module checks signatures over bare digests (the KeyManager's), which ring cannot.

pub mod spki;
pub mod token;
pub(crate) mod verify;

use std::fmt;

use der::Encode as _;
use ring::rand::SystemRandom;
use ring::signature::{self as rsig, KeyPair as _};

pub use signet_pkcs11::KeyType;

/// What the issuance core adds to the token layer's [`KeyType`]: the signature schemes a key of each type signs
/// with.
pub trait KeySchemes {
    /// The scheme signet uses for X.509 signatures made with this key.
    fn x509_scheme(self) -> SignatureScheme;
    /// Whether a key of this type can produce signatures of `scheme`.
    fn supports(self, scheme: SignatureScheme) -> bool;
}

impl KeySchemes for KeyType {
    fn x509_scheme(self) -> SignatureScheme {
        match self {
            KeyType::EcP256 => SignatureScheme::EcdsaP256Sha256,
            KeyType::EcP384 => SignatureScheme::EcdsaP384Sha384,
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                SignatureScheme::RsaPkcs1Sha256
            }
            KeyType::Ed25519 => SignatureScheme::Ed25519,
        }
    }

    fn supports(self, scheme: SignatureScheme) -> bool {
        match self {
            KeyType::EcP256 => scheme == SignatureScheme::EcdsaP256Sha256,
            KeyType::EcP384 => scheme == SignatureScheme::EcdsaP384Sha384,
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => scheme.is_rsa(),
            KeyType::Ed25519 => scheme == SignatureScheme::Ed25519,
        }
    }
}

/// A signature scheme: the algorithm, its hash and (for RSA) its padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SignatureScheme {
    /// ECDSA P-256 with SHA-256; raw r||s (64 bytes).
    EcdsaP256Sha256,
    /// ECDSA P-384 with SHA-384; raw r||s (96 bytes).
    EcdsaP384Sha384,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RsaPkcs1Sha256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RsaPkcs1Sha384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RsaPkcs1Sha512,
    /// RSASSA-PSS with SHA-256, MGF1-SHA-256, salt length 32.
    RsaPssSha256,
    /// RSASSA-PSS with SHA-384, MGF1-SHA-384, salt length 48.
    RsaPssSha384,
    /// Ed25519 (pure; no host-side hash).
    Ed25519,
}

impl SignatureScheme {
    /// True for the RSA schemes.
    pub fn is_rsa(self) -> bool {
        matches!(
            self,
            SignatureScheme::RsaPkcs1Sha256
                | SignatureScheme::RsaPkcs1Sha384
                | SignatureScheme::RsaPkcs1Sha512
                | SignatureScheme::RsaPssSha256
                | SignatureScheme::RsaPssSha384
        )
    }

    fn ring_verifier(self) -> &'static dyn rsig::VerificationAlgorithm {
        match self {
            SignatureScheme::EcdsaP256Sha256 => &rsig::ECDSA_P256_SHA256_FIXED,
            SignatureScheme::EcdsaP384Sha384 => &rsig::ECDSA_P384_SHA384_FIXED,
            SignatureScheme::RsaPkcs1Sha256 => &rsig::RSA_PKCS1_2048_8192_SHA256,
            SignatureScheme::RsaPkcs1Sha384 => &rsig::RSA_PKCS1_2048_8192_SHA384,
            SignatureScheme::RsaPkcs1Sha512 => &rsig::RSA_PKCS1_2048_8192_SHA512,
            SignatureScheme::RsaPssSha256 => &rsig::RSA_PSS_2048_8192_SHA256,
            SignatureScheme::RsaPssSha384 => &rsig::RSA_PSS_2048_8192_SHA384,
            SignatureScheme::Ed25519 => &rsig::ED25519,
        }
    }
}

/// Why a key could not be loaded or could not sign.
///
/// [`KeyError::is_transient`] tells the caller whether retrying the same operation may succeed (a token that was
/// briefly unreachable) or not (a wrong PIN, a missing key, a scheme the key cannot do).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The key cannot produce signatures of the requested scheme.
    #[error(
        "a {key_type} key cannot sign with {scheme:?}: pick a scheme that matches the key type"
    )]
    UnsupportedScheme {
        /// The key's type.
        key_type: KeyType,
        /// The scheme asked for.
        scheme: SignatureScheme,
    },
    /// The key material was rejected (malformed, unsupported algorithm or size).
    #[error("key material rejected: {0}")]
    InvalidKey(String),
    /// The signing operation failed.
    #[error("signing failed ({}): {message}", if *transient { "transient, may be retried" } else { "permanent" })]
    Signing {
        /// What went wrong, for the operator.
        message: String,
        /// Whether a retry of the same operation may succeed.
        transient: bool,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl KeyError {
    /// A signing failure with no underlying error value.
    pub fn signing(message: impl Into<String>, transient: bool) -> Self {
        KeyError::Signing {
            message: message.into(),
            transient,
            source: None,
        }
    }

    /// A signing failure caused by `source` (e.g. a PKCS#11 return value), classified by the caller.
    pub fn signing_with_source(
        message: impl Into<String>,
        transient: bool,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        KeyError::Signing {
            message: message.into(),
            transient,
            source: Some(Box::new(source)),
        }
    }

    /// Whether retrying the same operation may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            KeyError::Signing {
                transient: true,
                ..
            }
        )
    }
}

/// The private half of an authority. `sign` is blocking; implementations hash on the host where the scheme has a
/// hash and return the raw signature as PKCS#11 produces it: r||s for ECDSA, the PKCS#1/PSS block for RSA, 64 bytes
/// for Ed25519.
pub trait AuthorityKey: Send + Sync + fmt::Debug {
    /// The key's type.
    fn key_type(&self) -> KeyType;
    /// The public key as SubjectPublicKeyInfo DER.
    fn spki_der(&self) -> &[u8];
    /// Sign `message` (the whole message, not a digest) with `scheme`.
    fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// Sign `message` and hand the result to `then`, exactly once. The default signs now, on this thread; a key
    /// behind the signing pipeline queues the signature and returns at once, and `then` runs on the thread that
    /// answers (see [`SignThen`]), so the caller's thread does not wait for the token.
    fn sign_then(&self, scheme: SignatureScheme, message: &[u8], then: Box<dyn SignThen>) {
        then.resume(self.sign(scheme, message));
    }
    /// The issuance core's post-sign check of `signature` (just returned by this key, checked on the thread that
    /// received it) passed or failed. A key spread over several tokens counts failures against the token that
    /// made the signature and takes it out of rotation after enough of them; the default does nothing.
    fn post_sign_checked(&self, signature: &[u8], passed: bool) {
        let _ = (signature, passed);
    }
}

/// What to do with a signature made by [`AuthorityKey::sign_then`]. `resume` may run on a token's worker thread:
/// it should hand any real work on (to the CPU pool) rather than do it there.
pub trait SignThen: Send {
    /// Whether the result is no longer wanted (the caller gave up): a queued signature is then not made, and
    /// `resume` is still called, with an error.
    fn abandoned(&self) -> bool {
        false
    }
    /// Receives the raw signature (as [`AuthorityKey::sign`] returns it) or the error.
    fn resume(self: Box<Self>, result: Result<Vec<u8>, KeyError>);
}

impl<K: AuthorityKey + ?Sized> AuthorityKey for std::sync::Arc<K> {
    fn key_type(&self) -> KeyType {
        (**self).key_type()
    }
    fn spki_der(&self) -> &[u8] {
        (**self).spki_der()
    }
    fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        (**self).sign(scheme, message)
    }
    fn sign_then(&self, scheme: SignatureScheme, message: &[u8], then: Box<dyn SignThen>) {
        (**self).sign_then(scheme, message, then);
    }
    fn post_sign_checked(&self, signature: &[u8], passed: bool) {
        (**self).post_sign_checked(signature, passed);
    }
}

enum SoftwareInner {
    Ecdsa(rsig::EcdsaKeyPair),
    Ed25519(rsig::Ed25519KeyPair),
    Rsa(rsig::RsaKeyPair),
}

/// A ring-backed [`AuthorityKey`] held in process memory: EC P-256/P-384 (fixed r||s output), Ed25519 and RSA
/// (2048/3072/4096) loaded from PKCS#8.
pub struct SoftwareKey {
    inner: SoftwareInner,
    key_type: KeyType,
    spki: Vec<u8>,
    rng: SystemRandom,
}

impl fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftwareKey")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl SoftwareKey {
    /// Generate a new key and return it with its PKCS#8 DER (to persist it, if the caller wants to).
    ///
    /// ring cannot generate RSA keys: for RSA, generate the key elsewhere and load it with [`Self::from_pkcs8`].
    pub fn generate(key_type: KeyType) -> Result<(Self, zeroizing::Pkcs8), KeyError> {
        let rng = SystemRandom::new();
        let doc = match key_type {
            KeyType::EcP256 => rsig::EcdsaKeyPair::generate_pkcs8(&rsig::ECDSA_P256_SHA256_FIXED_SIGNING, &rng),
            KeyType::EcP384 => rsig::EcdsaKeyPair::generate_pkcs8(&rsig::ECDSA_P384_SHA384_FIXED_SIGNING, &rng),
            KeyType::Ed25519 => rsig::Ed25519KeyPair::generate_pkcs8(&rng),
            other => {
                return Err(KeyError::InvalidKey(format!(
                    "{other} keys cannot be generated in software here; generate one (e.g. with openssl genpkey) and \
                     load it as PKCS#8"
                )));
            }
        }
        .map_err(|_| KeyError::InvalidKey("the system random generator failed".into()))?;
        let pkcs8 = zeroizing::Pkcs8(doc.as_ref().to_vec());
        let key = Self::from_pkcs8(&pkcs8.0)?;
        Ok((key, pkcs8))
    }

    /// Load a key from PKCS#8 DER (v1 or v2): EC P-256/P-384, Ed25519, or RSA 2048/3072/4096.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        if let Ok(k) =
            rsig::EcdsaKeyPair::from_pkcs8(&rsig::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
        {
            let spki = crate::keys::spki::ec_spki(KeyType::EcP256, k.public_key().as_ref());
            return Ok(Self {
                inner: SoftwareInner::Ecdsa(k),
                key_type: KeyType::EcP256,
                spki,
                rng,
            });
        }
        if let Ok(k) =
            rsig::EcdsaKeyPair::from_pkcs8(&rsig::ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8, &rng)
        {
            let spki = crate::keys::spki::ec_spki(KeyType::EcP384, k.public_key().as_ref());
            return Ok(Self {
                inner: SoftwareInner::Ecdsa(k),
                key_type: KeyType::EcP384,
                spki,
                rng,
            });
        }
        if let Ok(k) = rsig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8) {
            let spki = crate::keys::spki::ed25519_spki(k.public_key().as_ref());
            return Ok(Self {
                inner: SoftwareInner::Ed25519(k),
                key_type: KeyType::Ed25519,
                spki,
                rng,
            });
        }
        match rsig::RsaKeyPair::from_pkcs8(pkcs8) {
            Ok(k) => {
                let key_type = match k.public().modulus_len() * 8 {
                    2048 => KeyType::Rsa2048,
                    3072 => KeyType::Rsa3072,
                    4096 => KeyType::Rsa4096,
                    bits => {
                        return Err(KeyError::InvalidKey(format!(
                            "RSA keys of {bits} bits are not supported: use 2048, 3072 or 4096"
                        )));
                    }
                };
                let spki = crate::keys::spki::rsa_spki(k.public().as_ref());
                Ok(Self {
                    inner: SoftwareInner::Rsa(k),
                    key_type,
                    spki,
                    rng,
                })
            }
            Err(e) => Err(KeyError::InvalidKey(format!(
                "not a PKCS#8 EC P-256/P-384, Ed25519 or RSA private key ({e})"
            ))),
        }
    }
}

impl AuthorityKey for SoftwareKey {
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
        let failed = |what: &str| KeyError::signing(format!("ring {what} signing failed"), false);
        match &self.inner {
            SoftwareInner::Ecdsa(k) => k
                .sign(&self.rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| failed("ECDSA")),
            SoftwareInner::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
            SoftwareInner::Rsa(k) => {
                let padding: &'static dyn rsig::RsaEncoding = match scheme {
                    SignatureScheme::RsaPkcs1Sha256 => &rsig::RSA_PKCS1_SHA256,
                    SignatureScheme::RsaPkcs1Sha384 => &rsig::RSA_PKCS1_SHA384,
                    SignatureScheme::RsaPkcs1Sha512 => &rsig::RSA_PKCS1_SHA512,
                    SignatureScheme::RsaPssSha256 => &rsig::RSA_PSS_SHA256,
                    SignatureScheme::RsaPssSha384 => &rsig::RSA_PSS_SHA384,
                    _ => {
                        return Err(KeyError::UnsupportedScheme {
                            key_type: self.key_type,
                            scheme,
                        });
                    }
                };
                let mut out = vec![0u8; k.public().modulus_len()];
                k.sign(padding, &self.rng, message, &mut out)
                    .map_err(|_| failed("RSA"))?;
                Ok(out)
            }
        }
    }
}

/// PKCS#8 bytes that are wiped when dropped.
pub mod zeroizing {
    /// PKCS#8 DER of a private key; zeroed on drop.
    #[derive(zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
    pub struct Pkcs8(pub Vec<u8>);

    impl std::fmt::Debug for Pkcs8 {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Pkcs8([redacted])")
        }
    }
}

/// A signature failed the independent check against the public key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The SubjectPublicKeyInfo could not be parsed.
    #[error("the public key (SubjectPublicKeyInfo) could not be parsed")]
    BadPublicKey,
    /// The signature does not verify.
    #[error("the signature does not verify against the public key with {0:?}")]
    Mismatch(SignatureScheme),
}

/// Verify a raw signature (as [`AuthorityKey::sign`] returns it) over `message` with ring.
pub fn verify_signature(
    spki_der: &[u8],
    scheme: SignatureScheme,
    message: &[u8],
    signature: &[u8],
) -> Result<(), VerifyError> {
    use x509_parser::prelude::FromDer as _;
    let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|_| VerifyError::BadPublicKey)?;
    if !rest.is_empty() {
        return Err(VerifyError::BadPublicKey);
    }
    rsig::UnparsedPublicKey::new(
        scheme.ring_verifier(),
        spki.subject_public_key.data.as_ref(),
    )
    .verify(message, signature)
    .map_err(|_| VerifyError::Mismatch(scheme))
}

/// Re-encode a raw ECDSA signature (r||s, each half `len/2` bytes) as the DER `ECDSA-Sig-Value` X.509 wants.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>, KeyError> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return Err(KeyError::signing(
            format!(
                "an ECDSA signature of {} bytes is not r||s of two equal halves",
                raw.len()
            ),
            false,
        ));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let ints = [der::asn1::UintRef::new(r), der::asn1::UintRef::new(s)];
    let mut seq = Vec::with_capacity(2);
    for int in ints {
        seq.push(
            int.map_err(|e| KeyError::signing(format!("ECDSA signature integer: {e}"), false))?,
        );
    }
    seq.to_der()
        .map_err(|e| KeyError::signing(format!("ECDSA signature DER encoding: {e}"), false))
}
