//! Subject public keys: classifying a SubjectPublicKeyInfo into the key kinds signet accepts in a certificate, and
//! building SPKI DER from raw public key material (rcgen writes the DER).

use x509_parser::prelude::FromDer as _;

use crate::keys::KeyType;

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";
const OID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const OID_ED25519: &str = "1.3.101.112";

/// Smallest RSA modulus accepted in a certificate.
pub const RSA_MIN_BITS: usize = 2048;
/// Largest RSA modulus accepted in a certificate.
pub const RSA_MAX_BITS: usize = 8192;

/// The kind of a subject public key signet accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubjectKeyKind {
    /// ECDSA P-256.
    EcP256,
    /// ECDSA P-384.
    EcP384,
    /// RSA with this many modulus bits (2048..=8192).
    Rsa(usize),
    /// Ed25519.
    Ed25519,
}

impl SubjectKeyKind {
    /// True for RSA keys.
    pub fn is_rsa(self) -> bool {
        matches!(self, SubjectKeyKind::Rsa(_))
    }

    fn rcgen_alg(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            SubjectKeyKind::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            SubjectKeyKind::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            SubjectKeyKind::Rsa(_) => &rcgen::PKCS_RSA_SHA256,
            SubjectKeyKind::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// Why a subject public key is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubjectKeyError {
    /// The SPKI is not valid DER.
    #[error("the subject public key is not a valid SubjectPublicKeyInfo")]
    Malformed,
    /// An algorithm other than EC, RSA or Ed25519.
    #[error(
        "subject key algorithm {0} is not accepted: use EC P-256/P-384, RSA 2048-8192 or Ed25519"
    )]
    UnsupportedAlgorithm(String),
    /// An EC key on a curve other than P-256/P-384.
    #[error("EC curve {0} is not accepted: use P-256 or P-384")]
    UnsupportedCurve(String),
    /// The EC point is not an uncompressed point of the curve's size.
    #[error("the EC public key is not an uncompressed point of the right size")]
    BadEcPoint,
    /// RSA modulus below 2048 bits.
    #[error("RSA key of {0} bits is too weak: at least 2048 bits are required")]
    WeakRsa(usize),
    /// RSA modulus above 8192 bits.
    #[error("RSA key of {0} bits is too large: at most 8192 bits are accepted")]
    RsaTooLarge(usize),
    /// RSA public exponent not in an accepted range.
    #[error("RSA public exponent is not acceptable (must be odd and at least 3)")]
    BadRsaExponent,
}

/// A checked subject public key: its SPKI DER, kind, and the raw key bits (the BIT STRING contents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectKey {
    spki: Vec<u8>,
    bits: Vec<u8>,
    kind: SubjectKeyKind,
}

impl SubjectKey {
    /// Classify and check a SubjectPublicKeyInfo DER.
    pub fn from_spki_der(spki_der: &[u8]) -> Result<Self, SubjectKeyError> {
        let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|_| SubjectKeyError::Malformed)?;
        if !rest.is_empty() {
            return Err(SubjectKeyError::Malformed);
        }
        let kind = classify(&spki)?;
        Ok(Self {
            spki: spki_der.to_vec(),
            bits: spki.subject_public_key.data.to_vec(),
            kind,
        })
    }

    /// The SPKI DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// The key's kind.
    pub fn kind(&self) -> SubjectKeyKind {
        self.kind
    }

    /// The raw public key (BIT STRING contents of the SPKI).
    pub fn raw(&self) -> &[u8] {
        &self.bits
    }

    /// The SubjectKeyIdentifier signet writes: the first 20 bytes of SHA-256 over the public key bits (RFC 7093 §2,
    /// method 1).
    pub fn key_identifier(&self) -> Vec<u8> {
        key_identifier(&self.bits)
    }
}

impl rcgen::PublicKeyData for SubjectKey {
    fn der_bytes(&self) -> &[u8] {
        &self.bits
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.kind.rcgen_alg()
    }
}

/// RFC 7093 method 1 key identifier over raw public key bits.
pub fn key_identifier(bits: &[u8]) -> Vec<u8> {
    let d = ring::digest::digest(&ring::digest::SHA256, bits);
    d.as_ref()[..20].to_vec()
}

/// Classify a parsed SPKI.
pub(crate) fn classify(
    spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
) -> Result<SubjectKeyKind, SubjectKeyError> {
    let alg = spki.algorithm.algorithm.to_id_string();
    let bits = spki.subject_public_key.data.as_ref();
    match alg.as_str() {
        OID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .ok_or_else(|| {
                    SubjectKeyError::UnsupportedCurve(
                        "(missing or implicit curve parameters)".into(),
                    )
                })?;
            let (kind, len) = match curve.as_str() {
                OID_P256 => (SubjectKeyKind::EcP256, 65),
                OID_P384 => (SubjectKeyKind::EcP384, 97),
                _ => return Err(SubjectKeyError::UnsupportedCurve(curve_name(&curve))),
            };
            if bits.len() != len || bits.first() != Some(&4) {
                return Err(SubjectKeyError::BadEcPoint);
            }
            Ok(kind)
        }
        OID_RSA_ENCRYPTION => {
            let (n, e) = rsa_components(bits).ok_or(SubjectKeyError::Malformed)?;
            let nbits = bit_len(n);
            if nbits < RSA_MIN_BITS {
                return Err(SubjectKeyError::WeakRsa(nbits));
            }
            if nbits > RSA_MAX_BITS {
                return Err(SubjectKeyError::RsaTooLarge(nbits));
            }
            let e_ok = e.last().is_some_and(|b| b & 1 == 1) && (bit_len(e) > 2);
            if !e_ok {
                return Err(SubjectKeyError::BadRsaExponent);
            }
            Ok(SubjectKeyKind::Rsa(nbits))
        }
        OID_ED25519 => {
            if bits.len() != 32 {
                return Err(SubjectKeyError::Malformed);
            }
            Ok(SubjectKeyKind::Ed25519)
        }
        other => Err(SubjectKeyError::UnsupportedAlgorithm(other.to_string())),
    }
}

fn curve_name(oid: &str) -> String {
    match oid {
        "1.3.132.0.10" => "secp256k1 (1.3.132.0.10)".into(),
        "1.3.132.0.35" => "P-521 (1.3.132.0.35)".into(),
        other => other.to_string(),
    }
}

/// Modulus and exponent (big-endian, without leading zeros) of an RSAPublicKey DER.
pub(crate) fn rsa_components(rsa_public_key_der: &[u8]) -> Option<(&[u8], &[u8])> {
    use der::{Decode as _, Reader as _};
    let mut reader = der::SliceReader::new(rsa_public_key_der).ok()?;
    let (n, e) = reader
        .sequence(|r| {
            let n = der::asn1::UintRef::decode(r)?;
            let e = der::asn1::UintRef::decode(r)?;
            Ok::<_, der::Error>((n.as_bytes(), e.as_bytes()))
        })
        .ok()?;
    reader.finish().ok()?;
    Some((n, e))
}

fn bit_len(be: &[u8]) -> usize {
    let trimmed: &[u8] = match be.iter().position(|b| *b != 0) {
        Some(i) => &be[i..],
        None => return 0,
    };
    trimmed.len() * 8 - trimmed[0].leading_zeros() as usize
}

struct RawKey {
    bits: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl rcgen::PublicKeyData for RawKey {
    fn der_bytes(&self) -> &[u8] {
        &self.bits
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

/// SPKI DER of an uncompressed EC point on P-256 or P-384.
pub(crate) fn ec_spki(key_type: KeyType, point: &[u8]) -> Vec<u8> {
    let alg = if key_type == KeyType::EcP384 {
        &rcgen::PKCS_ECDSA_P384_SHA384
    } else {
        &rcgen::PKCS_ECDSA_P256_SHA256
    };
    rcgen::PublicKeyData::subject_public_key_info(&RawKey {
        bits: point.to_vec(),
        alg,
    })
}

/// SPKI DER of an Ed25519 public key.
pub(crate) fn ed25519_spki(public: &[u8]) -> Vec<u8> {
    rcgen::PublicKeyData::subject_public_key_info(&RawKey {
        bits: public.to_vec(),
        alg: &rcgen::PKCS_ED25519,
    })
}

/// SPKI DER (rsaEncryption) of an RSAPublicKey DER.
pub(crate) fn rsa_spki(rsa_public_key_der: &[u8]) -> Vec<u8> {
    rcgen::PublicKeyData::subject_public_key_info(&RawKey {
        bits: rsa_public_key_der.to_vec(),
        alg: &rcgen::PKCS_RSA_SHA256,
    })
}

/// RSAPublicKey DER from big-endian modulus and exponent.
pub(crate) fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Option<Vec<u8>> {
    use der::Encode as _;
    let ints = vec![
        der::asn1::UintRef::new(n).ok()?,
        der::asn1::UintRef::new(e).ok()?,
    ];
    ints.to_der().ok()
}
