//! Key material held inside the token and the signing mechanisms it serves: key generation (EC P-256/P-384,
//! Ed25519, RSA), the public attributes a client reads (CKA_EC_POINT, CKA_MODULUS, ...), signing, and the
//! serialised form sealed on disk. Nothing here touches raw pointers; the FFI layer hands parsed mechanisms in.

use crate::rv::{CkResult, Rv};
use cryptoki_sys::*;
use der::asn1::{ObjectIdentifier, OctetStringRef};
use der::{Decode, Encode};
use p256::ecdsa::signature::hazmat::PrehashSigner;
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256, Sha384, Sha512};
use zeroize::Zeroizing;

/// id-ecPublicKey curve OID for NIST P-256 (prime256v1).
pub const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
/// Curve OID for NIST P-384 (secp384r1).
pub const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
/// id-Ed25519 (RFC 8410).
pub const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
/// The curve OID some older clients use for Ed25519 (GnuPG's "Ed25519" arc).
const OID_ED25519_GNU: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.11591.15.1");

/// Smallest and largest RSA modulus the token generates.
pub const RSA_MIN_BITS: usize = 2048;
/// Largest RSA modulus the token generates.
pub const RSA_MAX_BITS: usize = 4096;

/// The curve an EC key lives on, as named by CKA_EC_PARAMS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    /// NIST P-256.
    P256,
    /// NIST P-384.
    P384,
    /// Edwards 25519 (EdDSA).
    Ed25519,
}

impl Curve {
    /// Reads CKA_EC_PARAMS: a DER OID, or the PrintableString `edwards25519` some clients send.
    pub fn from_ec_params(params: &[u8]) -> CkResult<Curve> {
        if let Ok(oid) = ObjectIdentifier::from_der(params) {
            return match oid {
                o if o == OID_P256 => Ok(Curve::P256),
                o if o == OID_P384 => Ok(Curve::P384),
                o if o == OID_ED25519 || o == OID_ED25519_GNU => Ok(Curve::Ed25519),
                _ => Err(Rv(CKR_CURVE_NOT_SUPPORTED)),
            };
        }
        if let Ok(name) = der::asn1::PrintableStringRef::from_der(params) {
            return match name.as_str() {
                "edwards25519" | "Ed25519" | "ed25519" => Ok(Curve::Ed25519),
                "prime256v1" | "secp256r1" => Ok(Curve::P256),
                "secp384r1" => Ok(Curve::P384),
                _ => Err(Rv(CKR_CURVE_NOT_SUPPORTED)),
            };
        }
        Err(Rv(CKR_DOMAIN_PARAMS_INVALID))
    }

    /// The DER OID this token reports in CKA_EC_PARAMS when the caller gave none.
    pub fn default_ec_params(self) -> Vec<u8> {
        let oid = match self {
            Curve::P256 => OID_P256,
            Curve::P384 => OID_P384,
            Curve::Ed25519 => OID_ED25519,
        };
        oid.to_der().unwrap_or_default()
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    /// An ECDSA key on P-256 or P-384, or an Ed25519 key.
    Ec(Curve),
    /// An RSA key of `bits` with the given public exponent (big-endian).
    Rsa {
        /// Modulus size.
        bits: usize,
        /// Public exponent, big-endian bytes.
        exponent: Vec<u8>,
    },
}

/// A hash function named by a mechanism or by PSS parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// Maps CKM_SHA256 / CKM_SHA384 / CKM_SHA512.
    pub fn from_ckm(m: CK_MECHANISM_TYPE) -> CkResult<HashAlg> {
        match m {
            CKM_SHA256 => Ok(HashAlg::Sha256),
            CKM_SHA384 => Ok(HashAlg::Sha384),
            CKM_SHA512 => Ok(HashAlg::Sha512),
            _ => Err(Rv(CKR_MECHANISM_PARAM_INVALID)),
        }
    }

    /// Maps CKG_MGF1_SHA256 / 384 / 512.
    pub fn from_mgf(m: CK_RSA_PKCS_MGF_TYPE) -> CkResult<HashAlg> {
        match m {
            CKG_MGF1_SHA256 => Ok(HashAlg::Sha256),
            CKG_MGF1_SHA384 => Ok(HashAlg::Sha384),
            CKG_MGF1_SHA512 => Ok(HashAlg::Sha512),
            _ => Err(Rv(CKR_MECHANISM_PARAM_INVALID)),
        }
    }

    /// Output length in bytes.
    pub fn output_len(self) -> usize {
        match self {
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            HashAlg::Sha256 => Sha256::digest(data).to_vec(),
            HashAlg::Sha384 => Sha384::digest(data).to_vec(),
            HashAlg::Sha512 => Sha512::digest(data).to_vec(),
        }
    }
}

/// A signing mechanism with its parameters, already parsed from CK_MECHANISM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignMechanism {
    /// CKM_ECDSA: the caller hands in the digest; the result is raw r||s.
    Ecdsa,
    /// CKM_ECDSA_SHA256/384/512: the token hashes the data.
    EcdsaHash(HashAlg),
    /// CKM_EDDSA (pure Ed25519).
    EdDsa,
    /// CKM_RSA_PKCS: the caller hands in a DigestInfo (or any data up to k-11 bytes).
    RsaPkcs,
    /// CKM_SHA256_RSA_PKCS and friends: the token hashes and builds the DigestInfo.
    RsaPkcsHash(HashAlg),
    /// CKM_RSA_PKCS_PSS: the caller hands in the digest.
    RsaPss {
        /// Hash named by the parameters (the digest's length must match).
        hash: HashAlg,
        /// Salt length in bytes.
        salt_len: usize,
    },
    /// CKM_SHA256_RSA_PKCS_PSS and friends: the token hashes the data.
    RsaPssHash {
        /// Hash of the mechanism.
        hash: HashAlg,
        /// Salt length in bytes.
        salt_len: usize,
    },
}

/// The mechanisms this token lists, with their key-size range and flags.
pub const MECHANISMS: &[(CK_MECHANISM_TYPE, CK_ULONG, CK_ULONG, CK_FLAGS)] = &[
    (
        CKM_EC_KEY_PAIR_GEN,
        256,
        384,
        CKF_HW | CKF_GENERATE_KEY_PAIR | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
    ),
    (
        CKM_EC_EDWARDS_KEY_PAIR_GEN,
        255,
        255,
        CKF_HW | CKF_GENERATE_KEY_PAIR | CKF_EC_NAMEDCURVE,
    ),
    (
        CKM_RSA_PKCS_KEY_PAIR_GEN,
        RSA_MIN_BITS as CK_ULONG,
        RSA_MAX_BITS as CK_ULONG,
        CKF_HW | CKF_GENERATE_KEY_PAIR,
    ),
    (
        CKM_ECDSA,
        256,
        384,
        CKF_HW | CKF_SIGN | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
    ),
    (
        CKM_ECDSA_SHA256,
        256,
        384,
        CKF_HW | CKF_SIGN | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
    ),
    (
        CKM_ECDSA_SHA384,
        256,
        384,
        CKF_HW | CKF_SIGN | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
    ),
    (
        CKM_ECDSA_SHA512,
        256,
        384,
        CKF_HW | CKF_SIGN | CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS,
    ),
    (CKM_EDDSA, 255, 255, CKF_HW | CKF_SIGN),
    (
        CKM_RSA_PKCS,
        RSA_MIN_BITS as CK_ULONG,
        RSA_MAX_BITS as CK_ULONG,
        CKF_HW | CKF_SIGN,
    ),
    (
        CKM_SHA256_RSA_PKCS,
        RSA_MIN_BITS as CK_ULONG,
        RSA_MAX_BITS as CK_ULONG,
        CKF_HW | CKF_SIGN,
    ),
    (
        CKM_SHA384_RSA_PKCS,
        RSA_MIN_BITS as CK_ULONG,
        RSA_MAX_BITS as CK_ULONG,
        CKF_HW | CKF_SIGN,
    ),
    (
        CKM_SHA512_RSA_PKCS,
        RSA_MIN_BITS as CK_ULONG,
        RSA_MAX_BITS as CK_ULONG,
        CKF_HW | CKF_SIGN,
    ),
    (
        CKM_RSA_PKCS_PSS,
        RSA_MIN_BITS as CK_ULONG,
        RSA_MAX_BITS as CK_ULONG,
        CKF_HW | CKF_SIGN,
    ),
    (
        CKM_SHA256_RSA_PKCS_PSS,
        RSA_MIN_BITS as CK_ULONG,
        RSA_MAX_BITS as CK_ULONG,
        CKF_HW | CKF_SIGN,
    ),
    (
        CKM_SHA384_RSA_PKCS_PSS,
        RSA_MIN_BITS as CK_ULONG,
        RSA_MAX_BITS as CK_ULONG,
        CKF_HW | CKF_SIGN,
    ),
    (
        CKM_SHA512_RSA_PKCS_PSS,
        RSA_MIN_BITS as CK_ULONG,
        RSA_MAX_BITS as CK_ULONG,
        CKF_HW | CKF_SIGN,
    ),
];

/// A private key held by the token.
pub enum KeyMaterial {
    /// ECDSA P-256.
    P256(p256::ecdsa::SigningKey),
    /// ECDSA P-384.
    P384(p384::ecdsa::SigningKey),
    /// Ed25519.
    Ed25519(ed25519_dalek::SigningKey),
    /// RSA.
    Rsa(Box<rsa::RsaPrivateKey>),
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "KeyMaterial({})", self.kind())
    }
}

/// Wraps a public EC point (or Ed25519 public key) as the DER OCTET STRING PKCS#11 puts in CKA_EC_POINT.
fn octet_string_der(bytes: &[u8]) -> CkResult<Vec<u8>> {
    OctetStringRef::new(bytes)
        .and_then(|o| o.to_der())
        .map_err(|_| Rv(CKR_GENERAL_ERROR))
}

impl KeyMaterial {
    /// Generates a fresh key from the operating system's RNG.
    pub fn generate(spec: &KeySpec) -> CkResult<KeyMaterial> {
        match spec {
            KeySpec::Ec(Curve::P256) => Ok(KeyMaterial::P256(p256::ecdsa::SigningKey::random(
                &mut OsRng,
            ))),
            KeySpec::Ec(Curve::P384) => Ok(KeyMaterial::P384(p384::ecdsa::SigningKey::random(
                &mut OsRng,
            ))),
            KeySpec::Ec(Curve::Ed25519) => {
                let mut seed = Zeroizing::new([0u8; 32]);
                OsRng.fill_bytes(seed.as_mut());
                Ok(KeyMaterial::Ed25519(ed25519_dalek::SigningKey::from_bytes(
                    &seed,
                )))
            }
            KeySpec::Rsa { bits, exponent } => {
                if *bits < RSA_MIN_BITS || *bits > RSA_MAX_BITS || bits % 8 != 0 {
                    return Err(Rv(CKR_KEY_SIZE_RANGE));
                }
                let e = rsa::BigUint::from_bytes_be(exponent);
                let key = rsa::RsaPrivateKey::new_with_exp(&mut OsRng, *bits, &e)
                    .map_err(|_| Rv(CKR_TEMPLATE_INCONSISTENT))?;
                Ok(KeyMaterial::Rsa(Box::new(key)))
            }
        }
    }

    /// Short name used in the sealed file format.
    pub fn kind(&self) -> &'static str {
        match self {
            KeyMaterial::P256(_) => "p256",
            KeyMaterial::P384(_) => "p384",
            KeyMaterial::Ed25519(_) => "ed25519",
            KeyMaterial::Rsa(_) => "rsa",
        }
    }

    /// The secret in a stable encoding: the scalar for EC keys, the seed for Ed25519, PKCS#1 DER for RSA.
    pub fn secret_bytes(&self) -> CkResult<Zeroizing<Vec<u8>>> {
        Ok(match self {
            KeyMaterial::P256(k) => Zeroizing::new(k.to_bytes().to_vec()),
            KeyMaterial::P384(k) => Zeroizing::new(k.to_bytes().to_vec()),
            KeyMaterial::Ed25519(k) => Zeroizing::new(k.to_bytes().to_vec()),
            KeyMaterial::Rsa(k) => {
                use rsa::pkcs1::EncodeRsaPrivateKey;
                let doc = k.to_pkcs1_der().map_err(|_| Rv(CKR_GENERAL_ERROR))?;
                Zeroizing::new(doc.as_bytes().to_vec())
            }
        })
    }

    /// Rebuilds a key from [`KeyMaterial::kind`] and [`KeyMaterial::secret_bytes`].
    pub fn from_secret(kind: &str, bytes: &[u8]) -> CkResult<KeyMaterial> {
        let bad = |_| Rv(CKR_GENERAL_ERROR);
        match kind {
            "p256" => p256::ecdsa::SigningKey::from_slice(bytes)
                .map(KeyMaterial::P256)
                .map_err(bad),
            "p384" => p384::ecdsa::SigningKey::from_slice(bytes)
                .map(KeyMaterial::P384)
                .map_err(bad),
            "ed25519" => {
                let seed: [u8; 32] = bytes.try_into().map_err(|_| Rv(CKR_GENERAL_ERROR))?;
                Ok(KeyMaterial::Ed25519(ed25519_dalek::SigningKey::from_bytes(
                    &seed,
                )))
            }
            "rsa" => {
                use rsa::pkcs1::DecodeRsaPrivateKey;
                rsa::RsaPrivateKey::from_pkcs1_der(bytes)
                    .map(|k| KeyMaterial::Rsa(Box::new(k)))
                    .map_err(|_| Rv(CKR_GENERAL_ERROR))
            }
            _ => Err(Rv(CKR_GENERAL_ERROR)),
        }
    }

    /// CKA_KEY_TYPE.
    pub fn key_type(&self) -> CK_KEY_TYPE {
        match self {
            KeyMaterial::P256(_) | KeyMaterial::P384(_) => CKK_EC,
            KeyMaterial::Ed25519(_) => CKK_EC_EDWARDS,
            KeyMaterial::Rsa(_) => CKK_RSA,
        }
    }

    /// Length of a signature in bytes (raw r||s for ECDSA).
    pub fn signature_len(&self) -> usize {
        match self {
            KeyMaterial::P256(_) => 64,
            KeyMaterial::P384(_) => 96,
            KeyMaterial::Ed25519(_) => 64,
            KeyMaterial::Rsa(k) => {
                use rsa::traits::PublicKeyParts;
                k.size()
            }
        }
    }

    /// Key size in bits as CKA_MODULUS_BITS / mechanism info count it.
    pub fn bits(&self) -> usize {
        match self {
            KeyMaterial::P256(_) => 256,
            KeyMaterial::P384(_) => 384,
            KeyMaterial::Ed25519(_) => 255,
            KeyMaterial::Rsa(k) => {
                use rsa::traits::PublicKeyParts;
                k.n().bits()
            }
        }
    }

    /// The public attributes both halves of the pair carry: CKA_EC_POINT (public key only, see
    /// `public_only`), or CKA_MODULUS, CKA_MODULUS_BITS and CKA_PUBLIC_EXPONENT.
    pub fn public_attributes(
        &self,
        public_only: bool,
    ) -> CkResult<Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>> {
        let mut out = Vec::new();
        match self {
            KeyMaterial::P256(k) => {
                if public_only {
                    let point = k.verifying_key().to_encoded_point(false);
                    out.push((CKA_EC_POINT, octet_string_der(point.as_bytes())?));
                }
            }
            KeyMaterial::P384(k) => {
                if public_only {
                    let point = k.verifying_key().to_encoded_point(false);
                    out.push((CKA_EC_POINT, octet_string_der(point.as_bytes())?));
                }
            }
            KeyMaterial::Ed25519(k) => {
                if public_only {
                    out.push((
                        CKA_EC_POINT,
                        octet_string_der(k.verifying_key().as_bytes())?,
                    ));
                }
            }
            KeyMaterial::Rsa(k) => {
                use rsa::traits::PublicKeyParts;
                out.push((CKA_MODULUS, k.n().to_bytes_be()));
                out.push((CKA_PUBLIC_EXPONENT, k.e().to_bytes_be()));
                if public_only {
                    out.push((CKA_MODULUS_BITS, ulong_bytes(k.n().bits() as CK_ULONG)));
                }
            }
        }
        Ok(out)
    }

    /// Whether `mechanism` may be used with this key.
    pub fn accepts(&self, mechanism: &SignMechanism) -> bool {
        matches!(
            (self, mechanism),
            (
                KeyMaterial::P256(_) | KeyMaterial::P384(_),
                SignMechanism::Ecdsa | SignMechanism::EcdsaHash(_)
            ) | (KeyMaterial::Ed25519(_), SignMechanism::EdDsa)
                | (
                    KeyMaterial::Rsa(_),
                    SignMechanism::RsaPkcs
                        | SignMechanism::RsaPkcsHash(_)
                        | SignMechanism::RsaPss { .. }
                        | SignMechanism::RsaPssHash { .. }
                )
        )
    }

    /// Signs `data` as `mechanism` prescribes. Errors are the PKCS#11 values a token returns for bad input.
    pub fn sign(&self, mechanism: &SignMechanism, data: &[u8]) -> CkResult<Vec<u8>> {
        if !self.accepts(mechanism) {
            return Err(Rv(CKR_KEY_TYPE_INCONSISTENT));
        }
        match (self, mechanism) {
            (KeyMaterial::P256(k), m) => {
                let digest = ec_digest(m, data);
                if let Ok(d) = <&[u8; 32]>::try_from(digest.as_slice()) {
                    return Ok(crate::p256_sign::sign_digest(k.as_nonzero_scalar(), d).to_vec());
                }
                let sig: p256::ecdsa::Signature = k
                    .sign_prehash(&digest)
                    .map_err(|_| Rv(CKR_DATA_LEN_RANGE))?;
                Ok(sig.to_bytes().to_vec())
            }
            (KeyMaterial::P384(k), m) => {
                let digest = ec_digest(m, data);
                let sig: p384::ecdsa::Signature = k
                    .sign_prehash(&digest)
                    .map_err(|_| Rv(CKR_DATA_LEN_RANGE))?;
                Ok(sig.to_bytes().to_vec())
            }
            (KeyMaterial::Ed25519(k), _) => {
                use ed25519_dalek::Signer;
                Ok(k.sign(data).to_bytes().to_vec())
            }
            (KeyMaterial::Rsa(k), SignMechanism::RsaPkcs) => {
                use rsa::traits::PublicKeyParts;
                if data.len() + 11 > k.size() {
                    return Err(Rv(CKR_DATA_LEN_RANGE));
                }
                k.sign(rsa::Pkcs1v15Sign::new_unprefixed(), data)
                    .map_err(|_| Rv(CKR_DATA_INVALID))
            }
            (KeyMaterial::Rsa(k), SignMechanism::RsaPkcsHash(h)) => {
                let digest = h.digest(data);
                let scheme = match h {
                    HashAlg::Sha256 => rsa::Pkcs1v15Sign::new::<Sha256>(),
                    HashAlg::Sha384 => rsa::Pkcs1v15Sign::new::<Sha384>(),
                    HashAlg::Sha512 => rsa::Pkcs1v15Sign::new::<Sha512>(),
                };
                k.sign(scheme, &digest).map_err(|_| Rv(CKR_DATA_INVALID))
            }
            (KeyMaterial::Rsa(k), SignMechanism::RsaPss { hash, salt_len }) => {
                if data.len() != hash.output_len() {
                    return Err(Rv(CKR_DATA_LEN_RANGE));
                }
                rsa_pss(k, *hash, *salt_len, data)
            }
            (KeyMaterial::Rsa(k), SignMechanism::RsaPssHash { hash, salt_len }) => {
                let digest = hash.digest(data);
                rsa_pss(k, *hash, *salt_len, &digest)
            }
            _ => Err(Rv(CKR_KEY_TYPE_INCONSISTENT)),
        }
    }
}

fn ec_digest(m: &SignMechanism, data: &[u8]) -> Vec<u8> {
    match m {
        SignMechanism::EcdsaHash(h) => h.digest(data),
        _ => data.to_vec(),
    }
}

fn rsa_pss(
    k: &rsa::RsaPrivateKey,
    hash: HashAlg,
    salt_len: usize,
    digest: &[u8],
) -> CkResult<Vec<u8>> {
    let scheme = match hash {
        HashAlg::Sha256 => rsa::Pss::new_with_salt::<Sha256>(salt_len),
        HashAlg::Sha384 => rsa::Pss::new_with_salt::<Sha384>(salt_len),
        HashAlg::Sha512 => rsa::Pss::new_with_salt::<Sha512>(salt_len),
    };
    k.sign_with_rng(&mut OsRng, scheme, digest)
        .map_err(|_| Rv(CKR_MECHANISM_PARAM_INVALID))
}

/// A CK_ULONG in the byte layout PKCS#11 attributes use on this platform.
pub fn ulong_bytes(v: CK_ULONG) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

/// Reads a CK_ULONG attribute value.
pub fn ulong_from(bytes: &[u8]) -> Option<CK_ULONG> {
    let arr: [u8; std::mem::size_of::<CK_ULONG>()] = bytes.try_into().ok()?;
    Some(CK_ULONG::from_ne_bytes(arr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{self as rs, UnparsedPublicKey};

    fn ec_point(k: &KeyMaterial) -> Vec<u8> {
        let attrs = k.public_attributes(true).unwrap();
        let der = &attrs.iter().find(|(t, _)| *t == CKA_EC_POINT).unwrap().1;
        der::asn1::OctetString::from_der(der)
            .unwrap()
            .as_bytes()
            .to_vec()
    }

    #[test]
    fn p256_prehash_and_hashing_mechanisms_verify_with_ring() {
        let k = KeyMaterial::generate(&KeySpec::Ec(Curve::P256)).unwrap();
        let point = ec_point(&k);
        assert_eq!(point.len(), 65);
        let msg = b"to be signed";
        let digest = Sha256::digest(msg);
        let sig = k.sign(&SignMechanism::Ecdsa, &digest).unwrap();
        assert_eq!(sig.len(), 64);
        let pk = UnparsedPublicKey::new(&rs::ECDSA_P256_SHA256_FIXED, &point);
        pk.verify(msg, &sig).unwrap();
        let sig2 = k
            .sign(&SignMechanism::EcdsaHash(HashAlg::Sha256), msg)
            .unwrap();
        pk.verify(msg, &sig2).unwrap();
        assert!(pk.verify(b"other", &sig2).is_err());
    }

    #[test]
    fn p384_verifies_with_ring() {
        let k = KeyMaterial::generate(&KeySpec::Ec(Curve::P384)).unwrap();
        let msg = b"p384 message";
        let sig = k
            .sign(&SignMechanism::EcdsaHash(HashAlg::Sha384), msg)
            .unwrap();
        assert_eq!(sig.len(), 96);
        UnparsedPublicKey::new(&rs::ECDSA_P384_SHA384_FIXED, ec_point(&k))
            .verify(msg, &sig)
            .unwrap();
    }

    #[test]
    fn ed25519_verifies_with_ring_and_round_trips() {
        let k = KeyMaterial::generate(&KeySpec::Ec(Curve::Ed25519)).unwrap();
        let msg = b"ed message";
        let sig = k.sign(&SignMechanism::EdDsa, msg).unwrap();
        let point = ec_point(&k);
        assert_eq!(point.len(), 32);
        UnparsedPublicKey::new(&rs::ED25519, &point)
            .verify(msg, &sig)
            .unwrap();
        let again = KeyMaterial::from_secret(k.kind(), &k.secret_bytes().unwrap()).unwrap();
        assert_eq!(ec_point(&again), point);
        assert!(k.sign(&SignMechanism::Ecdsa, msg).is_err());
    }

    #[test]
    fn curves_from_ec_params() {
        assert_eq!(
            Curve::from_ec_params(&Curve::P256.default_ec_params()).unwrap(),
            Curve::P256
        );
        assert_eq!(
            Curve::from_ec_params(&Curve::P384.default_ec_params()).unwrap(),
            Curve::P384
        );
        assert_eq!(
            Curve::from_ec_params(&Curve::Ed25519.default_ec_params()).unwrap(),
            Curve::Ed25519
        );
        let printable = der::asn1::PrintableStringRef::new("edwards25519")
            .unwrap()
            .to_der()
            .unwrap();
        assert_eq!(Curve::from_ec_params(&printable).unwrap(), Curve::Ed25519);
        let secp256k1 = ObjectIdentifier::new_unwrap("1.3.132.0.10")
            .to_der()
            .unwrap();
        assert_eq!(
            Curve::from_ec_params(&secp256k1),
            Err(Rv(CKR_CURVE_NOT_SUPPORTED))
        );
        assert_eq!(
            Curve::from_ec_params(b"junk"),
            Err(Rv(CKR_DOMAIN_PARAMS_INVALID))
        );
    }
}
