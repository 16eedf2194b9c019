//! Fixtures shared by every case: a token from a provider's bed, the per-provider gate, ring
//! verification, and SKIP lines.

use std::io::Write;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use signet_pkcs11::testing::{HsmSim, SoftHsm, TokenBed, Tpm};
use signet_pkcs11::{KeyType, SignAlgorithm, Token, TokenSession};

/// Re-initialising a module (C_Finalize + C_Initialize) disturbs every session on it in the process,
/// and taking the TPM away disturbs every test on it: such tests take their provider's gate
/// exclusively, every other test of that provider shares it.
pub static SOFTHSM_GATE: RwLock<()> = RwLock::new(());
pub static HSM_SIM_GATE: RwLock<()> = RwLock::new(());
pub static TPM_GATE: RwLock<()> = RwLock::new(());

/// One test's token: the bed it came from and the opened token.
pub struct Fixture {
    pub bed: Box<dyn TokenBed>,
    pub token: Token,
    _gate: RwLockReadGuard<'static, ()>,
}

impl Fixture {
    fn new(bed: Box<dyn TokenBed>, gate: &'static RwLock<()>) -> Fixture {
        let gate = gate.read().unwrap_or_else(|p| p.into_inner());
        let token = Token::open(&bed.config())
            .unwrap_or_else(|e| panic!("opening the {} test token: {e}", bed.provider()));
        Fixture {
            bed,
            token,
            _gate: gate,
        }
    }

    /// This test's key label for `name` (prefixed on shared tokens).
    pub fn label(&self, name: &str) -> String {
        format!("{}{name}", self.bed.key_prefix())
    }

    /// The provider's name.
    pub fn provider(&self) -> &str {
        self.bed.provider()
    }

    /// Prints a SKIP line for what this token cannot do, straight to stderr (not captured by the
    /// test harness, so it shows in every run).
    pub fn skip(&self, case: &str, why: &str) {
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIP [{}] {case}: {why}",
            self.provider()
        );
    }

    /// Whether the token supports `key_type`, asking it; a SKIP line when it does not.
    pub fn supports(&self, case: &str, key_type: KeyType) -> bool {
        match self.token.unsupported_reason(key_type) {
            None => true,
            Some(why) => {
                self.skip(
                    case,
                    &format!("{key_type}: not supported by this token ({why})"),
                );
                false
            }
        }
    }
}

/// A fresh SoftHSM2 token, or None (after a loud SKIP) without SoftHSM2.
pub fn softhsm() -> Option<Fixture> {
    let bed = SoftHsm::new()?;
    Some(Fixture::new(Box::new(bed), &SOFTHSM_GATE))
}

/// This test's share of the per-process hsm-sim token.
pub fn hsm_sim() -> Option<Fixture> {
    Some(Fixture::new(Box::new(HsmSim::new()), &HSM_SIM_GATE))
}

/// This test's share of the TPM rig's token, or None (after a loud SKIP) without a rig.
pub fn tpm() -> Option<Fixture> {
    let bed = Tpm::from_env("tpm2 conformance")?;
    Some(Fixture::new(Box::new(bed), &TPM_GATE))
}

pub fn exclusive(gate: &'static RwLock<()>) -> RwLockWriteGuard<'static, ()> {
    gate.write().unwrap_or_else(|p| p.into_inner())
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

/// Verifies `sig` over `msg` with ring against the public key `spki` (SubjectPublicKeyInfo DER).
pub fn verify_spki(
    spki: &[u8],
    key_type: KeyType,
    alg: SignAlgorithm,
    msg: &[u8],
    sig: &[u8],
    der: bool,
) {
    let raw = signet_pkcs11::spki_subject_public_key(spki).expect("spki");
    UnparsedPublicKey::new(verifier(key_type, alg, der), &raw)
        .verify(msg, sig)
        .unwrap_or_else(|_| panic!("ring rejects the {alg:?} signature of a {key_type} key"));
}

/// Verifies `sig` over `msg` with ring against the token's exported public key of `label`.
pub fn verify(
    session: &mut TokenSession,
    label: &str,
    alg: SignAlgorithm,
    msg: &[u8],
    sig: &[u8],
    der: bool,
) {
    let spki = session.public_key_der(label).expect("public key");
    let key_type = session.find_key(label).expect("key").key_type();
    verify_spki(&spki, key_type, alg, msg, sig, der);
}
