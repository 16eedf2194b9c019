//! The post-sign check of a signature over a bare digest (the KeyManager's `SignData`): P-256 with a key's
//! precomputed tables, the other key types with their RustCrypto crates ([`DigestVerifier`]).
//!
//! ring verifies ECDSA over whole messages only, and the `p256` crate's `verify_prehash` computes `u1·G + u2·Q`
//! with two constant-time scalar multiplications (about 250 µs on the reference machine, four `C_Sign`s on a
//! SoftHSM2 token). Verification handles public data only, so it may run in variable time, and `G` and the key `Q`
//! are fixed: [`P256Verifier`] precomputes, once per key, `d·256^i·P` for every byte `i` (32) and digit `d`
//! (1..=128) of both points. A scalar's bytes are recoded into signed digits (-127..=128, a digit above 128 borrowing
//! from the next byte; `-d·P` is `d·P` with `y` negated), so a check is at most 66 mixed point additions, no
//! doublings, a scalar inversion and one field inversion: about 37 µs (56 µs with 4-bit windows, 45 µs with 6-bit
//! ones), for about 300 KiB of table per key built in about 30 ms when the key is registered. The group arithmetic,
//! scalar parsing and reduction are the `p256` crate's; the unit tests hold every decision to `p256`'s own
//! `verify_prehash`, and the tables' multiples to its scalar multiplication.

use std::sync::OnceLock;

use p256::elliptic_curve::Group as _;
use p256::elliptic_curve::ops::{Invert as _, Reduce as _};
use p256::elliptic_curve::point::AffineCoordinates as _;
use p256::elliptic_curve::sec1::FromEncodedPoint as _;
use p256::{AffinePoint, EncodedPoint, FieldBytes, ProjectivePoint, Scalar};
use signet_pkcs11::SignAlgorithm;

use crate::keys::KeyType;

/// Bits of the scalar per window: one byte.
const WINDOW_BITS: usize = 8;
/// Windows of a 256-bit scalar.
const WINDOWS: usize = 256usize.div_ceil(WINDOW_BITS);
/// The largest digit magnitude: windows are recoded into signed digits in `-(HALF-1)..=HALF`, and `-d·P` is `d·P`
/// with its `y` negated, so a window needs the points of `1..=HALF` only.
const HALF: usize = 1 << (WINDOW_BITS - 1);
/// A window's mask.
const MASK: usize = (1 << WINDOW_BITS) - 1;

/// `d·2^(WINDOW_BITS·i)·P` for window `i` and digit `d` (1..=HALF) at `i·HALF + d - 1`, affine; then the carry out
/// of the last window, `2^(WINDOW_BITS·WINDOWS)·P`.
struct Table(Vec<AffinePoint>);

impl Table {
    fn new(point: ProjectivePoint) -> Self {
        let mut points = Vec::with_capacity(WINDOWS * HALF + 1);
        let mut base = point;
        for _ in 0..WINDOWS {
            let mut acc = base;
            for _ in 0..HALF {
                points.push(acc.to_affine());
                acc += base;
            }
            // acc = (HALF + 1)·base; the next window's base is 2^WINDOW_BITS·base.
            base = (acc - base).double();
        }
        points.push(base.to_affine());
        Self(points)
    }

    /// Adds `k·P` to `acc`, with `k` as big-endian bytes: one mixed addition per non-zero signed digit.
    fn add_multiple(&self, acc: &mut ProjectivePoint, k: &FieldBytes) {
        let mut carry = 0;
        for i in 0..WINDOWS {
            let d = digit(k, i) + carry;
            carry = usize::from(d > HALF);
            let (magnitude, negative) = if d > HALF {
                ((MASK + 1) - d, true)
            } else {
                (d, false)
            };
            if let Some(p) = magnitude
                .checked_sub(1)
                .and_then(|m| self.0.get(i * HALF + m))
            {
                if negative {
                    *acc += -*p;
                } else {
                    *acc += p;
                }
            }
        }
        if carry == 1
            && let Some(p) = self.0.get(WINDOWS * HALF)
        {
            *acc += p;
        }
    }
}

/// Window `i` of the big-endian 256-bit scalar `k`: its bits `WINDOW_BITS·i ..` counted from the least significant.
fn digit(k: &FieldBytes, i: usize) -> usize {
    let bit = i * WINDOW_BITS;
    // The (up to) two bytes the window spans, little-endian.
    let byte = |n: usize| usize::from(k.get(31usize.wrapping_sub(n)).copied().unwrap_or(0));
    let two = byte(bit / 8) | (byte(bit / 8 + 1) << 8);
    (two >> (bit % 8)) & MASK
}

fn generator_table() -> &'static Table {
    static G: OnceLock<Table> = OnceLock::new();
    G.get_or_init(|| Table::new(ProjectivePoint::GENERATOR))
}

/// Checks P-256 ECDSA signatures over 32-byte digests for one public key (see the module docs). About 300 KiB of
/// table per key, plus one shared table for the generator.
pub(crate) struct P256Verifier {
    q: Table,
}

impl P256Verifier {
    /// A verifier for the public key given as a SEC1 point; `None` if it is not a point on P-256.
    pub(crate) fn from_sec1(point: &[u8]) -> Option<Self> {
        let encoded = EncodedPoint::from_bytes(point).ok()?;
        let affine = Option::<AffinePoint>::from(AffinePoint::from_encoded_point(&encoded))?;
        if bool::from(p256::elliptic_curve::Group::is_identity(
            &ProjectivePoint::from(affine),
        )) {
            return None;
        }
        generator_table();
        Some(Self {
            q: Table::new(ProjectivePoint::from(affine)),
        })
    }

    /// Whether `sig` (raw r||s, 64 bytes) is a valid signature over the 32-byte `digest`.
    pub(crate) fn verify(&self, digest: &[u8], sig: &[u8]) -> bool {
        let Ok(digest) = <[u8; 32]>::try_from(digest) else {
            return false;
        };
        // Rejects r or s that are zero or not below the group order.
        let Ok(sig) = p256::ecdsa::Signature::from_slice(sig) else {
            return false;
        };
        let (r, s) = sig.split_scalars();
        let z = <Scalar as p256::elliptic_curve::ops::Reduce<p256::U256>>::reduce_bytes(
            &FieldBytes::from(digest),
        );
        let Some(s_inv) = Option::<Scalar>::from((*s).invert_vartime()) else {
            return false;
        };
        let u1 = z * s_inv;
        let u2 = *r * s_inv;
        let mut acc = ProjectivePoint::IDENTITY;
        generator_table().add_multiple(&mut acc, &u1.to_bytes());
        self.q.add_multiple(&mut acc, &u2.to_bytes());
        let x = acc.to_affine().x();
        *r == Scalar::reduce_bytes(&x)
    }
}

/// The post-sign check of one registered key's bare-digest signatures: P-256 with [`P256Verifier`]'s tables,
/// P-384 with the `p384` crate (over the prehash), RSA PKCS#1 v1.5 and PSS with the `rsa` crate (over the digest),
/// Ed25519 with ring (over the message, which is what an Ed25519 job carries).
pub(crate) enum DigestVerifier {
    P256(P256Verifier),
    P384(p384::ecdsa::VerifyingKey),
    Rsa(rsa::RsaPublicKey),
    Ed25519(Vec<u8>),
}

impl DigestVerifier {
    /// A verifier for the key with SubjectPublicKeyInfo `spki`; `None` if the key does not parse as `key_type`.
    pub(crate) fn new(key_type: KeyType, spki: &[u8]) -> Option<Self> {
        use rsa::pkcs8::DecodePublicKey as _;
        match key_type {
            KeyType::EcP256 => {
                let point = signet_pkcs11::spki_subject_public_key(spki).ok()?;
                P256Verifier::from_sec1(&point).map(Self::P256)
            }
            KeyType::EcP384 => {
                let point = signet_pkcs11::spki_subject_public_key(spki).ok()?;
                p384::ecdsa::VerifyingKey::from_sec1_bytes(&point)
                    .ok()
                    .map(Self::P384)
            }
            KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
                rsa::RsaPublicKey::from_public_key_der(spki)
                    .ok()
                    .map(Self::Rsa)
            }
            KeyType::Ed25519 => signet_pkcs11::spki_subject_public_key(spki)
                .ok()
                .map(Self::Ed25519),
        }
    }

    /// Whether `sig` (as the token returned it: raw r||s for ECDSA) is a valid signature by `alg` over `data` (the
    /// digest; for Ed25519 the message).
    pub(crate) fn verify(&self, alg: SignAlgorithm, data: &[u8], sig: &[u8]) -> bool {
        use SignAlgorithm as A;
        use p384::ecdsa::signature::hazmat::PrehashVerifier as _;
        use sha2::{Sha256, Sha384, Sha512};
        match self {
            Self::P256(v) => v.verify(data, sig),
            Self::P384(v) => p384::ecdsa::Signature::from_slice(sig)
                .is_ok_and(|s| v.verify_prehash(data, &s).is_ok()),
            Self::Rsa(k) => {
                let r = match alg {
                    A::RsaPkcs1Sha256 => k.verify(rsa::Pkcs1v15Sign::new::<Sha256>(), data, sig),
                    A::RsaPkcs1Sha384 => k.verify(rsa::Pkcs1v15Sign::new::<Sha384>(), data, sig),
                    A::RsaPkcs1Sha512 => k.verify(rsa::Pkcs1v15Sign::new::<Sha512>(), data, sig),
                    A::RsaPssSha256 => k.verify(rsa::Pss::new_with_salt::<Sha256>(32), data, sig),
                    A::RsaPssSha384 => k.verify(rsa::Pss::new_with_salt::<Sha384>(48), data, sig),
                    A::RsaPssSha512 => k.verify(rsa::Pss::new_with_salt::<Sha512>(64), data, sig),
                    _ => return false,
                };
                r.is_ok()
            }
            Self::Ed25519(key) => {
                ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
                    .verify(data, sig)
                    .is_ok()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::signature::hazmat::{PrehashSigner as _, PrehashVerifier as _};
    use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
    use p256::elliptic_curve::PrimeField as _;

    use super::*;

    fn key(seed: u8) -> SigningKey {
        let mut bytes = [seed; 32];
        bytes[0] = 1;
        SigningKey::from_slice(&bytes).expect("a valid scalar")
    }

    fn verifier(vk: &VerifyingKey) -> P256Verifier {
        P256Verifier::from_sec1(vk.to_encoded_point(false).as_bytes()).expect("a P-256 point")
    }

    fn digest(i: u32) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, &i.to_be_bytes());
        <[u8; 32]>::try_from(d.as_ref()).expect("32 bytes")
    }

    /// Every decision equals p256's `verify_prehash` (the oracle), on valid signatures and on altered ones.
    #[test]
    fn agrees_with_p256_on_valid_and_altered_signatures() {
        for seed in 0..4u8 {
            let sk = key(seed);
            let vk = *sk.verifying_key();
            let v = verifier(&vk);
            for i in 0..32u32 {
                let d = digest(i);
                let sig: Signature = sk.sign_prehash(&d).expect("signs");
                let raw = sig.to_bytes();
                assert!(vk.verify_prehash(&d, &sig).is_ok());
                assert!(v.verify(&d, &raw), "a valid signature is accepted");

                // The other s (n - s) is valid too, to both.
                let (r, s) = sig.split_scalars();
                let high = Signature::from_scalars(*r, -*s).expect("scalars");
                assert_eq!(
                    v.verify(&d, &high.to_bytes()),
                    vk.verify_prehash(&d, &high).is_ok()
                );

                // A flipped bit in the digest, in r, in s.
                let mut bad_digest = d;
                bad_digest[(i % 32) as usize] ^= 1 << (i % 8);
                assert!(!v.verify(&bad_digest, &raw));
                assert!(vk.verify_prehash(&bad_digest, &sig).is_err());
                for at in [i % 32, 32 + i % 32] {
                    let mut bad = raw;
                    bad[at as usize] ^= 1 << (i % 8);
                    let oracle = Signature::from_slice(&bad)
                        .map(|s| vk.verify_prehash(&d, &s).is_ok())
                        .unwrap_or(false);
                    assert_eq!(v.verify(&d, &bad), oracle);
                    assert!(!oracle);
                }

                // Another key's signature.
                let other: Signature = key(seed + 100).sign_prehash(&d).expect("signs");
                assert!(!v.verify(&d, &other.to_bytes()));
            }
        }
    }

    /// The signed-digit recoding (digits above half a window become negative with a carry into the next, and
    /// the carry out of the last window uses the table's last point) gives `k·P` for the scalars where it turns:
    /// zero, digits at and around the half, all-ones bytes, and the largest scalar, `n - 1`.
    #[test]
    fn table_multiples_equal_scalar_multiplication() {
        let mut edges: Vec<[u8; 32]> = vec![[0; 32], [0x80; 32], [0x81; 32], [0x7f; 32]];
        for b in [1u8, 0x7f, 0x80, 0x81, 0xfe, 0xff] {
            let mut low = [0u8; 32];
            low[31] = b;
            edges.push(low);
            let mut high = [0u8; 32];
            high[0] = b;
            edges.push(high);
        }
        let mut n_minus_1 = hex_n();
        n_minus_1[31] -= 1;
        edges.push(n_minus_1);
        // Below n with every byte but the top ones 0xff: a carry through every window.
        let mut ones = [0xffu8; 32];
        ones[0] = 0x7f;
        edges.push(ones);
        let point = ProjectivePoint::GENERATOR * Scalar::from(7u64);
        let table = Table::new(point);
        for k in edges {
            let scalar = Option::<Scalar>::from(Scalar::from_repr(FieldBytes::from(k)))
                .unwrap_or_else(|| panic!("{k:02x?} is below n"));
            let mut acc = ProjectivePoint::IDENTITY;
            table.add_multiple(&mut acc, &FieldBytes::from(k));
            assert_eq!(acc.to_affine(), (point * scalar).to_affine(), "{k:02x?}");
        }
    }

    #[test]
    fn refuses_malformed_input() {
        let sk = key(7);
        let v = verifier(sk.verifying_key());
        let d = digest(1);
        let sig: Signature = sk.sign_prehash(&d).expect("signs");
        let raw = sig.to_bytes();
        assert!(!v.verify(&d[..31], &raw), "a short digest");
        assert!(!v.verify(&d, &raw[..63]), "a short signature");
        assert!(!v.verify(&d, &[0u8; 64]), "r = s = 0");
        let mut r_is_n = raw;
        r_is_n[..32].copy_from_slice(&hex_n());
        assert!(!v.verify(&d, &r_is_n), "r = n");
        let mut s_all_ones = raw;
        s_all_ones[32..].copy_from_slice(&[0xff; 32]);
        assert!(!v.verify(&d, &s_all_ones), "s > n");
        assert!(P256Verifier::from_sec1(&[4u8; 65]).is_none(), "not a point");
        assert!(P256Verifier::from_sec1(&[0u8]).is_none(), "the identity");
    }

    fn hex_n() -> [u8; 32] {
        let n = "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551";
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&n[2 * i..2 * i + 2], 16).expect("hex");
        }
        out
    }
}
