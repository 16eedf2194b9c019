//! DER encodings: SubjectPublicKeyInfo of token keys, ECDSA signatures raw (r||s) <-> ASN.1, and the
//! PKCS#1 v1.5 DigestInfo. Built with the RustCrypto `der`/`spki` crates.

use der::asn1::{AnyRef, BitString, Null, ObjectIdentifier, OctetStringRef, UintRef};
use der::{Decode, DecodeValue, Encode, EncodeValue, Header, Length, Reader, Sequence, Writer};
use spki::{AlgorithmIdentifier, AlgorithmIdentifierRef, SubjectPublicKeyInfo};

use crate::error::{Error, ErrorKind, Result};
use crate::sign::HashAlg;

/// id-ecPublicKey.
pub const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// secp256r1 (P-256).
pub const OID_SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
/// secp384r1 (P-384).
pub const OID_SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
/// rsaEncryption.
pub const OID_RSA_ENCRYPTION: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// id-Ed25519.
pub const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
/// id-sha256.
pub const OID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
/// id-sha384.
pub const OID_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
/// id-sha512.
pub const OID_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");

/// A SEQUENCE of two unsigned INTEGERs: both ECDSA's Ecdsa-Sig-Value {r, s} and PKCS#1's
/// RSAPublicKey {modulus, publicExponent}.
struct TwoUints<'a> {
    a: UintRef<'a>,
    b: UintRef<'a>,
}

impl<'a> DecodeValue<'a> for TwoUints<'a> {
    type Error = der::Error;
    fn decode_value<R: Reader<'a>>(reader: &mut R, _header: Header) -> der::Result<Self> {
        let a = UintRef::decode(reader)?;
        let b = UintRef::decode(reader)?;
        Ok(TwoUints { a, b })
    }
}

impl EncodeValue for TwoUints<'_> {
    fn value_len(&self) -> der::Result<Length> {
        self.a.encoded_len()? + self.b.encoded_len()?
    }
    fn encode_value(&self, writer: &mut impl Writer) -> der::Result<()> {
        self.a.encode(writer)?;
        self.b.encode(writer)
    }
}

impl<'a> Sequence<'a> for TwoUints<'a> {}

/// Re-encodes a raw ECDSA signature (r||s, each half the field size) as ASN.1 DER Ecdsa-Sig-Value.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("raw ECDSA signature has odd or zero length {}", raw.len()),
        ));
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    Ok(TwoUints {
        a: UintRef::new(r)?,
        b: UintRef::new(s)?,
    }
    .to_der()?)
}

/// Re-encodes an ASN.1 DER Ecdsa-Sig-Value as raw r||s, each left-padded to `field_len` bytes (32 for
/// P-256, 48 for P-384).
pub fn ecdsa_der_to_raw(der_sig: &[u8], field_len: usize) -> Result<Vec<u8>> {
    let sig = TwoUints::from_der(der_sig)?;
    let mut out = vec![0u8; field_len * 2];
    for (i, v) in [sig.a.as_bytes(), sig.b.as_bytes()].into_iter().enumerate() {
        if v.len() > field_len {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "ECDSA signature component longer than the field",
            ));
        }
        let end = (i + 1) * field_len;
        out[end - v.len()..end].copy_from_slice(v);
    }
    Ok(out)
}

/// PKCS#1 v1.5 DigestInfo ::= SEQUENCE { digestAlgorithm AlgorithmIdentifier, digest OCTET STRING }.
struct DigestInfo<'a> {
    alg: AlgorithmIdentifierRef<'a>,
    digest: &'a OctetStringRef,
}

impl EncodeValue for DigestInfo<'_> {
    fn value_len(&self) -> der::Result<Length> {
        self.alg.encoded_len()? + self.digest.encoded_len()?
    }
    fn encode_value(&self, writer: &mut impl Writer) -> der::Result<()> {
        self.alg.encode(writer)?;
        self.digest.encode(writer)
    }
}

impl<'a> Sequence<'a> for DigestInfo<'a> {}

/// The DER DigestInfo that PKCS#1 v1.5 signs (RFC 8017 §9.2), with NULL parameters.
pub fn digest_info(hash: HashAlg, digest: &[u8]) -> Result<Vec<u8>> {
    let oid = match hash {
        HashAlg::Sha256 => OID_SHA256,
        HashAlg::Sha384 => OID_SHA384,
        HashAlg::Sha512 => OID_SHA512,
    };
    let info = DigestInfo {
        alg: AlgorithmIdentifier {
            oid,
            parameters: Some(AnyRef::NULL),
        },
        digest: OctetStringRef::new(digest)?,
    };
    Ok(info.to_der()?)
}

/// The DER of a named-curve OID, as CKA_EC_PARAMS wants it.
pub(crate) fn oid_der(oid: ObjectIdentifier) -> Result<Vec<u8>> {
    Ok(oid.to_der()?)
}

/// Parses CKA_EC_PARAMS as a named-curve OID.
pub(crate) fn parse_oid(der_bytes: &[u8]) -> Option<ObjectIdentifier> {
    ObjectIdentifier::from_der(der_bytes).ok()
}

/// CKA_EC_POINT is specified as a DER OCTET STRING wrapping the point, but some modules return the raw
/// point: accept both.
pub(crate) fn unwrap_ec_point(point: &[u8]) -> Vec<u8> {
    match <&OctetStringRef>::from_der(point) {
        Ok(os) => os.as_bytes().to_vec(),
        Err(_) => point.to_vec(),
    }
}

/// SubjectPublicKeyInfo DER for an EC key on a named curve, from the uncompressed point.
pub(crate) fn spki_ec(curve: ObjectIdentifier, point: &[u8]) -> Result<Vec<u8>> {
    let spki = SubjectPublicKeyInfo {
        algorithm: AlgorithmIdentifier {
            oid: OID_EC_PUBLIC_KEY,
            parameters: Some(der::Any::encode_from(&curve)?),
        },
        subject_public_key: BitString::from_bytes(point)?,
    };
    Ok(spki.to_der()?)
}

/// SubjectPublicKeyInfo DER for an RSA key.
pub(crate) fn spki_rsa(modulus: &[u8], exponent: &[u8]) -> Result<Vec<u8>> {
    let rsa = TwoUints {
        a: UintRef::new(modulus)?,
        b: UintRef::new(exponent)?,
    }
    .to_der()?;
    let spki = SubjectPublicKeyInfo {
        algorithm: AlgorithmIdentifier {
            oid: OID_RSA_ENCRYPTION,
            parameters: Some(der::Any::encode_from(&Null)?),
        },
        subject_public_key: BitString::from_bytes(&rsa)?,
    };
    Ok(spki.to_der()?)
}

/// SubjectPublicKeyInfo DER for an Ed25519 key (RFC 8410: no parameters).
pub(crate) fn spki_ed25519(key: &[u8]) -> Result<Vec<u8>> {
    let spki: SubjectPublicKeyInfo<der::Any, BitString> = SubjectPublicKeyInfo {
        algorithm: AlgorithmIdentifier {
            oid: OID_ED25519,
            parameters: None,
        },
        subject_public_key: BitString::from_bytes(key)?,
    };
    Ok(spki.to_der()?)
}

/// The raw key bytes inside a SubjectPublicKeyInfo (the point, the RSAPublicKey DER, or the Ed25519
/// key), as ring's verifiers want them.
pub fn spki_subject_public_key(spki_der: &[u8]) -> Result<Vec<u8>> {
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der)?;
    spki.subject_public_key
        .as_bytes()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Encoding,
                "SubjectPublicKeyInfo bit string has unused bits",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_info_matches_rfc8017_prefixes() {
        // RFC 8017 §9.2, note 1.
        let cases: [(HashAlg, &str, usize); 3] = [
            (
                HashAlg::Sha256,
                "3031300d060960864801650304020105000420",
                32,
            ),
            (
                HashAlg::Sha384,
                "3041300d060960864801650304020205000430",
                48,
            ),
            (
                HashAlg::Sha512,
                "3051300d060960864801650304020305000440",
                64,
            ),
        ];
        for (h, prefix, len) in cases {
            let d = vec![0xabu8; len];
            let out = digest_info(h, &d).unwrap();
            let hex: String = out[..out.len() - len]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(hex, prefix, "{h:?}");
            assert_eq!(&out[out.len() - len..], &d[..]);
        }
    }

    #[test]
    fn ecdsa_roundtrip_with_high_bits_and_leading_zeros() {
        let mut raw = vec![0u8; 64];
        raw[0] = 0x00;
        raw[1] = 0x7f;
        raw[31] = 1;
        raw[32] = 0xff; // needs a 0x00 pad in DER
        raw[63] = 2;
        let der_sig = ecdsa_raw_to_der(&raw).unwrap();
        assert_eq!(der_sig[0], 0x30);
        assert_eq!(ecdsa_der_to_raw(&der_sig, 32).unwrap(), raw);
        assert_eq!(
            ecdsa_raw_to_der(&[1, 2, 3]).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert!(ecdsa_der_to_raw(&der_sig, 16).is_err());
        assert!(ecdsa_der_to_raw(b"garbage", 32).is_err());
    }

    #[test]
    fn ec_point_wrapping() {
        let mut p = vec![4u8; 65];
        p[1] = 0x41;
        assert_eq!(unwrap_ec_point(&p), p);
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend_from_slice(&p);
        assert_eq!(unwrap_ec_point(&wrapped), p);
    }
}
