use cryptoki::mechanism::Mechanism;
use signet_pkcs11::testing::{SOFTHSM_MODULE, SoftHsm};
use signet_pkcs11::{
    Error, ErrorKind, KeyGenOptions, KeyType, Pin, PinSource, Profile, SignAlgorithm, Token,
    TokenConfig, TokenSelector,
};

use crate::common::fixture;

#[test]
fn wrong_pin_is_a_clear_permanent_error() {
    let Some(f) = fixture() else { return };
    let mut cfg = f.hsm.config();
    cfg.pin = PinSource::Value(Pin::new("0000"));
    let e = Token::open(&cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PinIncorrect, "{e}");
    assert!(!e.is_transient());
    assert!(e.to_string().contains("logging in"), "{e}");
    assert!(!format!("{e:?}").contains("0000"));
}

#[test]
fn unknown_token_label() {
    let Some(_f) = fixture() else { return };
    let cfg = TokenConfig::new(
        SOFTHSM_MODULE,
        "no-such-token",
        PinSource::Value(Pin::new("1234")),
    );
    let e = Token::open(&cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TokenNotFound, "{e}");
    assert!(e.to_string().contains("no-such-token"), "{e}");
    let mut cfg = cfg;
    cfg.token = TokenSelector::Serial("0000000000000000".into());
    assert_eq!(
        Token::open(&cfg).unwrap_err().kind(),
        ErrorKind::TokenNotFound
    );
}

#[test]
fn missing_module_path() {
    let cfg = TokenConfig::new(
        "/nonexistent/libpkcs11.so",
        "x",
        PinSource::Value(Pin::new("1234")),
    );
    let e = Token::open(&cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ModuleLoad, "{e}");
    assert!(e.to_string().contains("/nonexistent/libpkcs11.so"), "{e}");
    // A file that is not a PKCS#11 module.
    let cfg = TokenConfig::new("/etc/hostname", "x", PinSource::Value(Pin::new("1234")));
    if std::path::Path::new("/etc/hostname").exists() {
        assert_eq!(Token::open(&cfg).unwrap_err().kind(), ErrorKind::ModuleLoad);
    }
}

#[test]
fn unknown_key_label() {
    let Some(f) = fixture() else { return };
    let mut s = f.token.session().unwrap();
    assert_eq!(
        s.find_key("nope").unwrap_err().kind(),
        ErrorKind::KeyNotFound
    );
    assert_eq!(
        s.public_key_der("nope").unwrap_err().kind(),
        ErrorKind::KeyNotFound
    );
    assert_eq!(
        s.sign_by_label("nope", SignAlgorithm::EcdsaSha256, b"x")
            .unwrap_err()
            .kind(),
        ErrorKind::KeyNotFound
    );
    assert_eq!(
        s.find_key_by_id(&[1, 2, 3]).unwrap_err().kind(),
        ErrorKind::KeyNotFound
    );
}

#[test]
fn mechanisms_the_token_lacks_and_key_type_mismatches() {
    let Some(f) = fixture() else { return };
    // The tpm2 profile caps RSA at 3072 bits: refused before reaching the token.
    let mut cfg = f.hsm.config();
    cfg.profile = Some(Profile::Tpm2);
    let tpm = Token::open(&cfg).unwrap();
    let e = tpm
        .session()
        .unwrap()
        .generate_key("big", KeyType::Rsa4096, KeyGenOptions::default())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
    assert!(e.to_string().contains("not supported by this token"), "{e}");

    let mut s = f.token.session().unwrap();
    s.generate_key("ec", KeyType::EcP256, KeyGenOptions::default())
        .unwrap();
    let key = s.find_key("ec").unwrap();
    // The layer refuses a key type mismatch itself...
    for alg in [
        SignAlgorithm::RsaPkcs1Sha256,
        SignAlgorithm::RsaPssSha256,
        SignAlgorithm::Ed25519,
    ] {
        let e = s.sign(&key, alg, b"x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::KeyTypeMismatch, "{e}");
    }
    // (The layer must check: SoftHSM2 itself answers a key-type mismatch at C_Sign with
    // CKR_GENERAL_ERROR, not CKR_KEY_TYPE_INCONSISTENT.)

    // A mechanism SoftHSM2 lacks, straight to the token: CKR_MECHANISM_INVALID, classified as
    // NotSupported and permanent.
    let e = s
        .with_raw_session(|raw| raw.sign(&Mechanism::AesEcb, key.private_handle(), &[0u8; 32]))
        .unwrap()
        .map_err(|e| Error::pkcs11("raw sign", e))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported, "{e:?}");
    assert_eq!(e.rv(), Some(signet_pkcs11::RvError::MechanismInvalid));
    assert!(!e.is_transient());
    assert!(e.to_string().contains("not supported by this token"), "{e}");
    assert!(
        !f.token
            .has_mechanism(cryptoki::mechanism::MechanismType::ECC_MONTGOMERY_KEY_PAIR_GEN)
    );
    // Bad digests.
    assert_eq!(
        s.sign_digest(&key, SignAlgorithm::EcdsaSha256, &[0u8; 20])
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    let ed = s
        .sign_digest(&key, SignAlgorithm::Ed25519, &[0u8; 32])
        .unwrap_err();
    assert!(matches!(
        ed.kind(),
        ErrorKind::KeyTypeMismatch | ErrorKind::InvalidInput
    ));
}

#[test]
fn empty_pin_and_missing_pin_env() {
    let Some(f) = fixture() else { return };
    let mut cfg = f.hsm.config();
    cfg.pin = PinSource::Env("SIGNET_TEST_UNSET_PIN_VAR".into());
    assert_eq!(
        Token::open(&cfg).unwrap_err().kind(),
        ErrorKind::PinUnavailable
    );
    cfg.pin = PinSource::Value(Pin::new(""));
    assert_eq!(
        Token::open(&cfg).unwrap_err().kind(),
        ErrorKind::PinUnavailable
    );
}

#[test]
fn init_token_refuses_duplicate_labels() {
    let Some(hsm) = SoftHsm::new() else { return };
    let e = signet_pkcs11::init_token(
        hsm.module(),
        hsm.label(),
        &Pin::new("12345678"),
        &Pin::new("1234"),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}
