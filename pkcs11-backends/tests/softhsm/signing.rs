use signet_pkcs11::{KeyGenOptions, KeyType, SignAlgorithm, ecdsa_raw_to_der};

use crate::common::{fixture, supported, verify};

const MSG: &[u8] = b"signet: the quick brown fox signs over the lazy dog";

#[test]
fn ecdsa_p256_and_p384_verify_with_ring_raw_and_der() {
    let Some(f) = fixture() else { return };
    let mut s = f.token.session().unwrap();
    for (kt, algs) in [
        (
            KeyType::EcP256,
            &[SignAlgorithm::EcdsaSha256, SignAlgorithm::EcdsaSha384][..],
        ),
        (
            KeyType::EcP384,
            &[SignAlgorithm::EcdsaSha384, SignAlgorithm::EcdsaSha256][..],
        ),
    ] {
        assert!(supported(&f.token, kt), "SoftHSM2 must support {kt}");
        let label = format!("ec-{kt}");
        s.generate_key(&label, kt, KeyGenOptions::default())
            .unwrap();
        let key = s.find_key(&label).unwrap();
        for &alg in algs {
            let raw = s.sign(&key, alg, MSG).unwrap();
            assert_eq!(raw.len(), 2 * kt.ec_field_len().unwrap());
            let fixed_verifier_exists = matches!(
                (kt, alg),
                (KeyType::EcP256, SignAlgorithm::EcdsaSha256)
                    | (KeyType::EcP384, SignAlgorithm::EcdsaSha384)
            );
            if fixed_verifier_exists {
                verify(&mut s, &label, alg, MSG, &raw, false);
            }
            let der = ecdsa_raw_to_der(&raw).unwrap();
            verify(&mut s, &label, alg, MSG, &der, true);
            assert_eq!(
                signet_pkcs11::ecdsa_der_to_raw(&der, kt.ec_field_len().unwrap()).unwrap(),
                raw
            );
        }
        // SHA-512 digests are accepted (truncated by ECDSA), and sign_digest agrees with sign.
        let d = signet_pkcs11::HashAlg::Sha512.digest(MSG);
        assert!(
            s.sign_digest(&key, SignAlgorithm::EcdsaSha512, d.as_ref())
                .is_ok()
        );
    }
}

#[test]
fn rsa_pkcs1_and_pss_verify_with_ring() {
    let Some(f) = fixture() else { return };
    let mut s = f.token.session().unwrap();
    s.generate_key("rsa", KeyType::Rsa2048, KeyGenOptions::default())
        .unwrap();
    let key = s.find_key("rsa").unwrap();
    for alg in [
        SignAlgorithm::RsaPkcs1Sha256,
        SignAlgorithm::RsaPkcs1Sha384,
        SignAlgorithm::RsaPkcs1Sha512,
        SignAlgorithm::RsaPssSha256,
        SignAlgorithm::RsaPssSha384,
        SignAlgorithm::RsaPssSha512,
    ] {
        let sig = s.sign(&key, alg, MSG).unwrap();
        assert_eq!(sig.len(), 256);
        verify(&mut s, "rsa", alg, MSG, &sig, false);
    }
    // sign_digest with a digest computed by the caller.
    let d = signet_pkcs11::HashAlg::Sha256.digest(MSG);
    let sig = s
        .sign_digest(&key, SignAlgorithm::RsaPssSha256, d.as_ref())
        .unwrap();
    verify(&mut s, "rsa", SignAlgorithm::RsaPssSha256, MSG, &sig, false);
}

#[test]
fn rsa_3072_and_4096() {
    let Some(f) = fixture() else { return };
    let mut s = f.token.session().unwrap();
    for kt in [KeyType::Rsa3072, KeyType::Rsa4096] {
        assert!(supported(&f.token, kt));
        let label = kt.to_string();
        s.generate_key(&label, kt, KeyGenOptions::default())
            .unwrap();
        let key = s.find_key(&label).unwrap();
        assert_eq!(key.key_type(), kt);
        let sig = s.sign(&key, SignAlgorithm::RsaPkcs1Sha256, MSG).unwrap();
        assert_eq!(sig.len() * 8, kt.rsa_bits().unwrap() as usize);
        verify(
            &mut s,
            &label,
            SignAlgorithm::RsaPkcs1Sha256,
            MSG,
            &sig,
            false,
        );
        let sig = s.sign(&key, SignAlgorithm::RsaPssSha384, MSG).unwrap();
        verify(
            &mut s,
            &label,
            SignAlgorithm::RsaPssSha384,
            MSG,
            &sig,
            false,
        );
    }
}

#[test]
fn ed25519_verifies_with_ring() {
    let Some(f) = fixture() else { return };
    if !supported(&f.token, KeyType::Ed25519) {
        return;
    }
    let mut s = f.token.session().unwrap();
    s.generate_key("ed", KeyType::Ed25519, KeyGenOptions::default())
        .unwrap();
    let spki = s.public_key_der("ed").unwrap();
    assert_eq!(
        signet_pkcs11::spki_subject_public_key(&spki).unwrap().len(),
        32
    );
    let sig = s.sign_by_label("ed", SignAlgorithm::Ed25519, MSG).unwrap();
    assert_eq!(sig.len(), 64);
    verify(&mut s, "ed", SignAlgorithm::Ed25519, MSG, &sig, false);
}
