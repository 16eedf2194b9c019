//! What only makes sense on SoftHSM2 (a fresh token per test, many slots): re-initialising the
//! library, forcing a profile onto a token, keys tied to their session, token administration.

use signet_pkcs11::testing::SoftHsm;
use signet_pkcs11::{
    ErrorKind, KeyGenOptions, KeyType, Pin, PinSource, Profile, RvClass, SignAlgorithm, Token,
    TokenConfig,
};

use crate::common::{SOFTHSM_GATE, exclusive, softhsm};

#[test]
fn tpm2_profile_forced_onto_softhsm_refuses_rsa_4096() {
    let Some(f) = softhsm() else { return };
    // The tpm2 profile caps RSA at 3072 bits: refused before reaching the token, even though this
    // token could.
    let mut cfg = f.bed.config();
    cfg.profile = Some(Profile::Tpm2);
    let tpm = Token::open(&cfg).unwrap();
    assert!(f.token.supports(KeyType::Rsa4096));
    let e = tpm
        .session()
        .unwrap()
        .generate_key("big", KeyType::Rsa4096, KeyGenOptions::default())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
    assert!(e.to_string().contains("not supported by this token"), "{e}");
}

#[test]
fn spki_is_the_classic_x509_encoding() {
    let Some(f) = softhsm() else { return };
    let mut s = f.token.session().unwrap();
    s.generate_key("p256", KeyType::EcP256, KeyGenOptions::default())
        .unwrap();
    let spki = s.public_key_der("p256").unwrap();
    // 30 59 30 13 06 07 2a8648ce3d0201 06 08 2a8648ce3d030107 03 42 00 04 ...
    assert_eq!(spki.len(), 91);
    assert_eq!(&spki[..2], &[0x30, 0x59]);
    assert_eq!(spki[26], 0x04);
    s.generate_key("rsa", KeyType::Rsa2048, KeyGenOptions::default())
        .unwrap();
    let spki = s.public_key_der("rsa").unwrap();
    assert_eq!(&spki[..4], &[0x30, 0x82, 0x01, 0x22]); // the classic 294-byte RSA-2048 SPKI
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
fn empty_pin_and_missing_pin_env() {
    let Some(f) = softhsm() else { return };
    let mut cfg = f.bed.config();
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

#[test]
fn keys_are_tied_to_their_session() {
    let Some(f) = softhsm() else { return };
    let mut a = f.token.session().unwrap();
    a.generate_key("k", KeyType::EcP256, KeyGenOptions::default())
        .unwrap();
    let key = a.find_key("k").unwrap();
    let b = f.token.session().unwrap();
    let e = b.sign(&key, SignAlgorithm::EcdsaSha256, b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Stale);
    assert!(e.is_transient());
    a.reopen().unwrap();
    assert_eq!(
        a.sign(&key, SignAlgorithm::EcdsaSha256, b"x")
            .unwrap_err()
            .kind(),
        ErrorKind::Stale
    );
    let key = a.find_key("k").unwrap();
    a.sign(&key, SignAlgorithm::EcdsaSha256, b"x").unwrap();
}

#[test]
fn reinitialize_makes_sessions_stale_and_reopen_recovers() {
    let _exclusive = exclusive(&SOFTHSM_GATE);
    let Some(hsm) = signet_pkcs11::testing::SoftHsm::new() else {
        return;
    };
    let token = Token::open(&hsm.config()).unwrap();
    let mut s = token.session().unwrap();
    s.generate_key("k", KeyType::EcP256, KeyGenOptions::default())
        .unwrap();
    let generation = s.generation();
    token.reinitialize(generation).unwrap();
    // A second call with the old generation is a no-op (another thread already did it).
    token.reinitialize(generation).unwrap();
    let e = s
        .sign_by_label("k", SignAlgorithm::EcdsaSha256, b"x")
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Stale);
    assert_eq!(e.recovery(), RvClass::ReopenSession);
    s.reopen().unwrap();
    assert!(s.generation() > generation);
    s.sign_by_label("k", SignAlgorithm::EcdsaSha256, b"x")
        .unwrap();
    // New sessions work too.
    token
        .session()
        .unwrap()
        .sign_by_label("k", SignAlgorithm::EcdsaSha256, b"y")
        .unwrap();
}
