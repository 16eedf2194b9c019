use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use signet_pkcs11::testing::SoftHsm;
use signet_pkcs11::{KeyType, SignAlgorithm, Token, TokenSession};

/// Re-initialising the library (one test does) finalises SoftHSM2 for the whole process: that test
/// takes this gate exclusively, every other test shares it.
static GATE: RwLock<()> = RwLock::new(());

pub struct Fixture {
    pub hsm: SoftHsm,
    pub token: Token,
    _gate: RwLockReadGuard<'static, ()>,
}

/// A fresh token, or None (after a loud SKIP) without SoftHSM2.
pub fn fixture() -> Option<Fixture> {
    let gate = GATE.read().unwrap_or_else(|p| p.into_inner());
    let hsm = SoftHsm::new()?;
    let token = hsm.open();
    Some(Fixture {
        hsm,
        token,
        _gate: gate,
    })
}

pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    GATE.write().unwrap_or_else(|p| p.into_inner())
}

/// The ring verifier for a signature made with `alg` by a `key_type` key, in raw (fixed) form for
/// ECDSA when `der` is false.
pub fn verifier(
    key_type: KeyType,
    alg: SignAlgorithm,
    der: bool,
) -> &'static dyn VerificationAlgorithm {
    use SignAlgorithm::*;
    match (key_type, alg, der) {
        (KeyType::EcP256, EcdsaSha256, false) => &signature::ECDSA_P256_SHA256_FIXED,
        (KeyType::EcP256, EcdsaSha256, true) => &signature::ECDSA_P256_SHA256_ASN1,
        (KeyType::EcP256, EcdsaSha384, true) => &signature::ECDSA_P256_SHA384_ASN1,
        (KeyType::EcP384, EcdsaSha384, false) => &signature::ECDSA_P384_SHA384_FIXED,
        (KeyType::EcP384, EcdsaSha384, true) => &signature::ECDSA_P384_SHA384_ASN1,
        (KeyType::EcP384, EcdsaSha256, true) => &signature::ECDSA_P384_SHA256_ASN1,
        (_, RsaPkcs1Sha256, _) => &signature::RSA_PKCS1_2048_8192_SHA256,
        (_, RsaPkcs1Sha384, _) => &signature::RSA_PKCS1_2048_8192_SHA384,
        (_, RsaPkcs1Sha512, _) => &signature::RSA_PKCS1_2048_8192_SHA512,
        (_, RsaPssSha256, _) => &signature::RSA_PSS_2048_8192_SHA256,
        (_, RsaPssSha384, _) => &signature::RSA_PSS_2048_8192_SHA384,
        (_, RsaPssSha512, _) => &signature::RSA_PSS_2048_8192_SHA512,
        (KeyType::Ed25519, Ed25519, _) => &signature::ED25519,
        other => panic!("no ring verifier for {other:?}"),
    }
}

/// Verifies `sig` over `msg` with ring against the token's exported public key.
pub fn verify(
    session: &mut TokenSession,
    label: &str,
    alg: SignAlgorithm,
    msg: &[u8],
    sig: &[u8],
    der: bool,
) {
    let spki = session.public_key_der(label).expect("public key");
    let raw = signet_pkcs11::spki_subject_public_key(&spki).expect("spki");
    let key_type = session.find_key(label).expect("key").key_type();
    UnparsedPublicKey::new(verifier(key_type, alg, der), &raw)
        .verify(msg, sig)
        .unwrap_or_else(|_| panic!("ring rejects the {alg:?} signature of {key_type} key {label}"));
}

/// Skips loudly when the token lacks a key type.
pub fn supported(token: &Token, key_type: KeyType) -> bool {
    match token.unsupported_reason(key_type) {
        None => true,
        Some(why) => {
            eprintln!("SKIP {key_type}: {why}");
            false
        }
    }
}
