//! P-256 ECDSA signing over a 32-byte digest with a fixed-base comb, so that the simulator's own CPU per signature
//! stays small next to the latency it models.
//!
//! The `p256` crate's `sign_prehash` computes `k·G` with a generic constant-time scalar multiplication (about as
//! many instructions as a verification). `G` is fixed, so here `k·G` is a sum of 64 precomputed points, one per
//! 4-bit window of `k`: `j·16^i·G` for window `i` and digit `j` (0..=15, 0 being the identity). The nonce is secret,
//! so every lookup reads all 16 entries of its window and keeps one with a constant-time select; the additions are
//! the crate's complete formulas; no branch and no memory address depends on `k` or the key. Nonces are random (from
//! the operating system), as an HSM's are. Field and scalar arithmetic are the `p256` crate's; the unit tests hold the
//! signatures to ring's and `p256`'s verifiers.

use std::sync::OnceLock;

use p256::elliptic_curve::Field as _;
use p256::elliptic_curve::ops::{Invert, Reduce as _};
use p256::elliptic_curve::point::AffineCoordinates as _;
use p256::elliptic_curve::subtle::{ConditionallySelectable as _, ConstantTimeEq as _};
use p256::{AffinePoint, FieldBytes, NonZeroScalar, ProjectivePoint, Scalar};
use rand_core::OsRng;

const WINDOWS: usize = 64;
const DIGITS: usize = 16;

/// `j·16^i·G` for window `i` and digit `j`, affine; `[i][0]` is the identity.
type Table = [[AffinePoint; DIGITS]; WINDOWS];

fn generator_table() -> &'static Table {
    static G: OnceLock<Box<Table>> = OnceLock::new();
    G.get_or_init(|| {
        let mut table = Box::new([[AffinePoint::IDENTITY; DIGITS]; WINDOWS]);
        let mut base = ProjectivePoint::GENERATOR;
        for window in table.iter_mut() {
            let mut acc = ProjectivePoint::IDENTITY;
            for slot in window.iter_mut() {
                *slot = acc.to_affine();
                acc += base;
            }
            // acc = 16·base
            base = acc;
        }
        table
    })
}

/// `k·G` in constant time with respect to `k`.
fn mul_generator(k: &Scalar) -> ProjectivePoint {
    let table = generator_table();
    let bytes = k.to_bytes();
    let mut acc = ProjectivePoint::IDENTITY;
    for (i, window) in table.iter().enumerate() {
        let byte = bytes[31 - i / 2];
        let digit = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
        let mut point = AffinePoint::IDENTITY;
        for (j, entry) in (0u8..).zip(window.iter()) {
            point.conditional_assign(entry, j.ct_eq(&digit));
        }
        acc += point;
    }
    acc
}

/// The ECDSA signature (r || s, 64 bytes) of the 32-byte `digest` with the private scalar `d`.
pub(crate) fn sign_digest(d: &NonZeroScalar, digest: &[u8; 32]) -> [u8; 64] {
    let z = Scalar::reduce_bytes(&FieldBytes::from(*digest));
    loop {
        let k = NonZeroScalar::random(&mut OsRng);
        let r = Scalar::reduce_bytes(&mul_generator(&k).to_affine().x());
        // r = 0 or s = 0 happen with probability ~2^-256; a new nonce then.
        if bool::from(r.is_zero()) {
            continue;
        }
        let s = *Invert::invert(&k) * (z + r * **d);
        if bool::from(s.is_zero()) {
            continue;
        }
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&r.to_bytes());
        out[32..].copy_from_slice(&s.to_bytes());
        return out;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
    use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
    use rand_core::RngCore as _;

    #[test]
    fn comb_matches_the_generic_scalar_multiplication() {
        for _ in 0..64 {
            let k = NonZeroScalar::random(&mut OsRng);
            assert_eq!(
                mul_generator(&k).to_affine(),
                (ProjectivePoint::GENERATOR * *k).to_affine()
            );
        }
        // Edge digits: all-zero windows and all-fifteen windows.
        for k in [Scalar::ONE, -Scalar::ONE, Scalar::from(0xffff_u64)] {
            assert_eq!(
                mul_generator(&k).to_affine(),
                (ProjectivePoint::GENERATOR * k).to_affine()
            );
        }
    }

    #[test]
    fn signatures_verify_with_ring_and_p256() {
        for _ in 0..200 {
            let key = SigningKey::random(&mut OsRng);
            let mut digest = [0u8; 32];
            OsRng.fill_bytes(&mut digest);
            let sig = sign_digest(key.as_nonzero_scalar(), &digest);
            let vk = VerifyingKey::from(&key);
            let parsed = Signature::from_slice(&sig).unwrap();
            vk.verify_prehash(&digest, &parsed).unwrap();
            // And with ring, over a message whose SHA-256 is the digest.
            let msg = digest;
            let h: [u8; 32] = {
                use sha2::Digest as _;
                sha2::Sha256::digest(msg).into()
            };
            let sig = sign_digest(key.as_nonzero_scalar(), &h);
            let point = vk.to_encoded_point(false);
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_FIXED,
                point.as_bytes(),
            )
            .verify(&msg, &sig)
            .unwrap();
        }
    }

    #[test]
    fn a_wrong_digest_does_not_verify() {
        let key = SigningKey::random(&mut OsRng);
        let sig = sign_digest(key.as_nonzero_scalar(), &[7u8; 32]);
        let parsed = Signature::from_slice(&sig).unwrap();
        assert!(
            VerifyingKey::from(&key)
                .verify_prehash(&[8u8; 32], &parsed)
                .is_err()
        );
    }
}
