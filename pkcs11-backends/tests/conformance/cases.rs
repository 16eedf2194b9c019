//! The conformance cases: each takes a [`Fixture`] (a token from some provider) and proves one
//! behaviour of the layer on it. What the token cannot do is asked of the token (mechanism list,
//! profile) and skipped with a SKIP line, never guessed from the provider's name.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType as CkKeyType, ObjectClass,
};
use signet_pkcs11::{
    Error, ErrorKind, KeyGenOptions, KeyType, Pin, PinSource, SignAlgorithm, Token, TokenConfig,
    TokenSelector, ecdsa_der_to_raw, ecdsa_raw_to_der,
};

use crate::common::{Fixture, verify};

const MSG: &[u8] = b"signet: the quick brown fox signs over the lazy dog";

/// The algorithms a key type is exercised with (PSS only when the token lists CKM_RSA_PKCS_PSS).
fn algorithms(f: &Fixture, key_type: KeyType) -> Vec<SignAlgorithm> {
    use SignAlgorithm::*;
    match key_type {
        KeyType::EcP256 => vec![EcdsaSha256],
        KeyType::EcP384 => vec![EcdsaSha384],
        KeyType::Ed25519 => vec![Ed25519],
        _ => {
            let mut algs = vec![RsaPkcs1Sha256, RsaPkcs1Sha384, RsaPkcs1Sha512];
            if f.token.has_mechanism(MechanismType::RSA_PKCS_PSS) {
                algs.extend([RsaPssSha256, RsaPssSha384, RsaPssSha512]);
            } else {
                f.skip(
                    &format!("{key_type} PSS"),
                    "the token does not list CKM_RSA_PKCS_PSS",
                );
            }
            algs
        }
    }
}

/// Generates a `key_type` key, signs with every algorithm that fits it, verifies with ring against
/// the exported public key, and checks the signature's size.
pub fn key_type_signs_and_verifies(f: &Fixture, key_type: KeyType) {
    if !f.supports("generate+sign+verify", key_type) {
        return;
    }
    let mut s = f.token.session().unwrap();
    let label = f.label(key_type.name());
    let started = std::time::Instant::now();
    let info = s
        .generate_key(&label, key_type, KeyGenOptions::default())
        .unwrap();
    eprintln!(
        "[{}] generated {key_type} in {} ms",
        f.provider(),
        started.elapsed().as_millis()
    );
    assert_eq!(info.id.len(), 16);
    let key = s.find_key(&label).unwrap();
    assert_eq!(key.key_type(), key_type);
    for alg in algorithms(f, key_type) {
        let sig = s.sign(&key, alg, MSG).unwrap();
        if let Some(field) = key_type.ec_field_len() {
            assert_eq!(sig.len(), 2 * field, "{alg:?}");
        } else if let Some(bits) = key_type.rsa_bits() {
            assert_eq!(sig.len() * 8, bits as usize, "{alg:?}");
        } else {
            assert_eq!(sig.len(), 64, "{alg:?}");
        }
        verify(&mut s, &label, alg, MSG, &sig, false);
        // A digest the caller computed signs the same way.
        if let Some(h) = alg.hash() {
            let sig = s.sign_digest(&key, alg, h.digest(MSG).as_ref()).unwrap();
            verify(&mut s, &label, alg, MSG, &sig, false);
        }
    }
}

/// ECDSA raw r||s re-encoded as DER verifies with ring's ASN.1 verifiers, and back.
pub fn der_reencoding(f: &Fixture) {
    let mut s = f.token.session().unwrap();
    let mut ran = false;
    for (kt, algs) in [
        (
            KeyType::EcP256,
            [SignAlgorithm::EcdsaSha256, SignAlgorithm::EcdsaSha384],
        ),
        (
            KeyType::EcP384,
            [SignAlgorithm::EcdsaSha384, SignAlgorithm::EcdsaSha256],
        ),
    ] {
        if !f.supports("DER re-encoding", kt) {
            continue;
        }
        ran = true;
        let label = f.label(&format!("der-{kt}"));
        s.generate_key(&label, kt, KeyGenOptions::default())
            .unwrap();
        let key = s.find_key(&label).unwrap();
        let field = kt.ec_field_len().unwrap();
        for alg in algs {
            // Many signatures, so that short r or s (leading zero bytes) turn up now and then.
            for i in 0..8u8 {
                let msg = [MSG, &[i]].concat();
                let raw = s.sign(&key, alg, &msg).unwrap();
                let der = ecdsa_raw_to_der(&raw).unwrap();
                assert_eq!(der[0], 0x30);
                verify(&mut s, &label, alg, &msg, &der, true);
                assert_eq!(ecdsa_der_to_raw(&der, field).unwrap(), raw);
            }
        }
    }
    if !ran {
        f.skip("DER re-encoding", "the token has no ECDSA key type");
    }
}

/// The first EC (else RSA) key type the token supports, for cases that need any key.
fn any_key_type(f: &Fixture) -> KeyType {
    [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048]
        .into_iter()
        .find(|k| f.token.supports(*k))
        .unwrap_or_else(|| panic!("[{}] supports no EC P-256/P-384 or RSA-2048", f.provider()))
}

/// A key is found by label (and id) through a new `Token` and a re-opened session, with the same
/// public key.
pub fn find_by_label_after_reopen(f: &Fixture) {
    let kt = any_key_type(f);
    let label = f.label("persist");
    let (id, spki) = {
        let mut s = f.token.session().unwrap();
        let info = s
            .generate_key(&label, kt, KeyGenOptions::default())
            .unwrap();
        (info.id, s.public_key_der(&label).unwrap())
    };
    // A new Token on the same module (the module stays loaded and initialised once per process).
    let token = Token::open(&f.bed.config()).unwrap();
    let mut s = token.session().unwrap();
    let key = s.find_key(&label).unwrap();
    assert_eq!(key.id(), &id[..]);
    assert_eq!(key.key_type(), kt);
    assert!(key.public_handle().is_some());
    assert_eq!(s.public_key_der(&label).unwrap(), spki);
    assert_eq!(s.find_key_by_id(&id).unwrap().label(), label);
    // And after re-opening the session itself.
    s.reopen().unwrap();
    let alg = SignAlgorithm::default_for(kt);
    let sig = s.sign_by_label(&label, alg, MSG).unwrap();
    verify(&mut s, &label, alg, MSG, &sig, false);
}

/// Private keys refuse export and carry the attributes the layer asks for.
pub fn private_key_not_exportable(f: &Fixture) {
    let mut s = f.token.session().unwrap();
    for kt in [KeyType::EcP256, KeyType::Rsa2048] {
        if !f.supports("private key not exportable", kt) {
            continue;
        }
        let label = f.label(&format!("secret-{kt}"));
        s.generate_key(&label, kt, KeyGenOptions::default())
            .unwrap();
        let e = s.export_private_key(&label).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Sensitive, "{e}");
        let key = s.find_key(&label).unwrap();
        s.with_raw_session(|raw| {
            let value = if kt == KeyType::EcP256 {
                AttributeType::Value
            } else {
                AttributeType::PrivateExponent
            };
            let info = raw
                .get_attribute_info(key.private_handle(), &[value])
                .unwrap();
            // Refused as sensitive, or not there at all (a TPM holds only a wrapped blob).
            assert!(
                matches!(
                    info[0],
                    AttributeInfo::Sensitive
                        | AttributeInfo::Unavailable
                        | AttributeInfo::TypeInvalid
                ),
                "{info:?}"
            );
            let attrs = raw
                .get_attributes(
                    key.private_handle(),
                    &[
                        AttributeType::Token,
                        AttributeType::Private,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::Sign,
                    ],
                )
                .unwrap();
            assert_eq!(attrs.len(), 5, "{attrs:?}");
            for a in attrs {
                match a {
                    Attribute::Token(v)
                    | Attribute::Private(v)
                    | Attribute::Sensitive(v)
                    | Attribute::Sign(v) => assert!(v, "{a:?}"),
                    Attribute::Extractable(v) => assert!(!v),
                    _ => {}
                }
            }
        })
        .unwrap();
    }
}

/// Two sessions on two threads sign with one key; every tenth signature is verified.
pub fn two_sessions_on_two_threads(f: &Fixture) {
    let kt = any_key_type(f);
    let alg = SignAlgorithm::default_for(kt);
    let label = f.label("shared");
    f.token
        .session()
        .unwrap()
        .generate_key(&label, kt, KeyGenOptions::default())
        .unwrap();
    if let Some(n) = f.token.profile().effective_sessions() {
        eprintln!(
            "[{}] the token signs on {n} session(s) at a time: the two threads take turns",
            f.provider()
        );
    }
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let token = f.token.clone();
            let label = label.clone();
            std::thread::spawn(move || {
                let mut s = token.session().unwrap();
                let key = s.find_key(&label).unwrap();
                for i in 0..30 {
                    let msg = format!("thread {t} message {i}");
                    let sig = s.sign(&key, alg, msg.as_bytes()).unwrap();
                    if i % 10 == 0 {
                        verify(&mut s, &label, alg, msg.as_bytes(), &sig, false);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// A wrong PIN is a clear, permanent error that does not show the PIN.
pub fn wrong_pin(f: &Fixture) {
    let mut cfg = f.bed.config();
    cfg.pin = PinSource::Value(Pin::new("0000"));
    let e = Token::open(&cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PinIncorrect, "{e}");
    assert!(!e.is_transient());
    assert!(e.to_string().contains("logging in"), "{e}");
    assert!(!format!("{e:?}").contains("0000"));
    // While a session of this process is logged in, C_Login answers USER_ALREADY_LOGGED_IN without
    // looking at the PIN: the layer must still refuse the wrong one.
    let held = f.token.session().unwrap();
    let e = Token::open(&cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PinIncorrect, "{e}");
    assert!(!e.is_transient());
    assert!(e.to_string().contains("logging in"), "{e}");
    drop(held);
    // The right PIN still works afterwards.
    Token::open(&f.bed.config()).unwrap();
}

/// An unknown token label or serial is TokenNotFound, naming what was asked for.
pub fn unknown_token_label(f: &Fixture) {
    let cfg = TokenConfig {
        token: TokenSelector::Label("no-such-token".into()),
        ..f.bed.config()
    };
    let e = Token::open(&cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TokenNotFound, "{e}");
    assert!(e.to_string().contains("no-such-token"), "{e}");
    assert!(!e.is_transient());
    let cfg = TokenConfig {
        token: TokenSelector::Serial("no-such-serial".into()),
        ..cfg
    };
    assert_eq!(
        Token::open(&cfg).unwrap_err().kind(),
        ErrorKind::TokenNotFound
    );
}

/// Unknown key labels and ids are KeyNotFound everywhere.
pub fn unknown_key_label(f: &Fixture) {
    let mut s = f.token.session().unwrap();
    let nope = f.label("nope");
    assert_eq!(
        s.find_key(&nope).unwrap_err().kind(),
        ErrorKind::KeyNotFound
    );
    assert_eq!(
        s.public_key_der(&nope).unwrap_err().kind(),
        ErrorKind::KeyNotFound
    );
    assert_eq!(
        s.sign_by_label(&nope, SignAlgorithm::EcdsaSha256, b"x")
            .unwrap_err()
            .kind(),
        ErrorKind::KeyNotFound
    );
    assert_eq!(
        s.destroy_key(&nope).unwrap_err().kind(),
        ErrorKind::KeyNotFound
    );
    assert_eq!(
        s.find_key_by_id(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
            .unwrap_err()
            .kind(),
        ErrorKind::KeyNotFound
    );
}

/// What the token cannot do fails clearly ("not supported by this token", permanent): key types it
/// lacks, a mechanism it does not list, and key-type mismatches (refused by the layer itself).
pub fn unsupported_mechanism(f: &Fixture) {
    let mut s = f.token.session().unwrap();
    let mut refused = 0;
    for kt in KeyType::ALL {
        if let Some(why) = f.token.unsupported_reason(kt) {
            let e = s
                .generate_key(&f.label("refused"), kt, KeyGenOptions::default())
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NotSupported, "{kt}: {e}");
            assert!(!e.is_transient());
            assert!(e.to_string().contains("not supported by this token"), "{e}");
            eprintln!("[{}] {kt} refused: {e} ({why})", f.provider());
            refused += 1;
        }
    }
    if refused == 0 {
        f.skip(
            "unsupported key types",
            "the token supports every key type the layer has",
        );
    }

    let kt = any_key_type(f);
    let label = f.label("mech");
    s.generate_key(&label, kt, KeyGenOptions::default())
        .unwrap();
    let key = s.find_key(&label).unwrap();
    // The layer refuses a key type mismatch itself.
    for alg in [
        SignAlgorithm::EcdsaSha256,
        SignAlgorithm::RsaPkcs1Sha256,
        SignAlgorithm::Ed25519,
    ] {
        if alg.fits(kt) {
            continue;
        }
        let e = s.sign(&key, alg, b"x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::KeyTypeMismatch, "{e}");
        assert!(!e.is_transient());
    }
    // A signing mechanism the token does not list, straight to the token.
    let candidates = [
        Mechanism::AesCMac,
        Mechanism::Sha224Hmac,
        Mechanism::EcdsaSha224,
        Mechanism::Sha224RsaPkcs,
    ];
    match candidates
        .iter()
        .find(|m| !f.token.has_mechanism(m.mechanism_type()))
    {
        Some(m) => {
            let e = s
                .with_raw_session(|raw| raw.sign(m, key.private_handle(), &[0u8; 32]))
                .unwrap()
                .map_err(|e| Error::pkcs11("raw sign", e))
                .unwrap_err();
            eprintln!("[{}] {} at C_Sign: {e}", f.provider(), m.mechanism_type());
            assert!(!e.is_transient(), "{e:?}");
            assert_eq!(e.kind(), ErrorKind::NotSupported, "{e:?}");
            assert!(e.to_string().contains("not supported by this token"), "{e}");
        }
        None => f.skip(
            "unlisted mechanism",
            "the token lists every candidate mechanism",
        ),
    }
    // Wrong digest lengths are the caller's error.
    let alg = SignAlgorithm::default_for(kt);
    assert_eq!(
        s.sign_digest(&key, alg, &[0u8; 20]).unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

/// Destroying a key removes both halves; a second destroy is KeyNotFound.
pub fn destroy(f: &Fixture) {
    let kt = any_key_type(f);
    let mut s = f.token.session().unwrap();
    let (a, b) = (f.label("doomed"), f.label("kept"));
    s.generate_key(&a, kt, KeyGenOptions::default()).unwrap();
    s.generate_key(&b, kt, KeyGenOptions::default()).unwrap();
    s.find_key(&a).unwrap();
    s.destroy_key(&a).unwrap();
    assert_eq!(s.find_key(&a).unwrap_err().kind(), ErrorKind::KeyNotFound);
    assert_eq!(
        s.destroy_key(&a).unwrap_err().kind(),
        ErrorKind::KeyNotFound
    );
    // Neither half is left, also for another session.
    let other = f.token.session().unwrap();
    let left = other
        .with_raw_session(|raw| raw.find_objects(&[Attribute::Label(a.as_bytes().to_vec())]))
        .unwrap()
        .unwrap();
    assert!(left.is_empty(), "{} objects left", left.len());
    // The other key is untouched.
    let mine: Vec<_> = s
        .list_keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.label.starts_with(f.bed.key_prefix()))
        .map(|k| k.label)
        .collect();
    assert_eq!(mine, std::slice::from_ref(&b));
    s.sign_by_label(&b, SignAlgorithm::default_for(kt), MSG)
        .unwrap();
}

/// An existing label is KeyExists unless replacing is asked for; a replaced key is a new key.
pub fn replace(f: &Fixture) {
    let kt = any_key_type(f);
    let other = [KeyType::EcP384, KeyType::EcP256, KeyType::Rsa2048]
        .into_iter()
        .find(|k| *k != kt && f.token.supports(*k))
        .unwrap_or(kt);
    let mut s = f.token.session().unwrap();
    let label = f.label("dup");
    let first = s
        .generate_key(&label, kt, KeyGenOptions::default())
        .unwrap();
    let old_spki = s.public_key_der(&label).unwrap();
    let e = s
        .generate_key(&label, other, KeyGenOptions::default())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::KeyExists, "{e}");
    assert!(!e.is_transient());
    let second = s
        .generate_key(&label, other, KeyGenOptions { replace: true })
        .unwrap();
    assert_ne!(first.id, second.id);
    let key = s.find_key(&label).unwrap();
    assert_eq!(key.key_type(), other);
    assert_eq!(key.id(), &second.id[..]);
    assert_ne!(s.public_key_der(&label).unwrap(), old_spki);
    let mine: Vec<_> = s
        .list_keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.label == label)
        .map(|k| (k.key_type, k.has_public))
        .collect();
    assert_eq!(mine, [(Some(other), true)]);
    let alg = SignAlgorithm::default_for(other);
    let sig = s.sign(&key, alg, MSG).unwrap();
    verify(&mut s, &label, alg, MSG, &sig, false);
}

/// Session objects (CKA_TOKEN=false): the layer never makes them, and the profile says whether the
/// token can hold them. Where it says no, the token must indeed refuse them.
pub fn session_objects_match_the_profile(f: &Fixture) {
    let profile = f.token.profile();
    let s = f.token.session().unwrap();
    let label = f.label("ephemeral");
    let result = s
        .with_raw_session(|raw| {
            raw.generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &[
                    Attribute::Token(false),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::EcParams(vec![
                        0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
                    ]),
                    Attribute::Verify(true),
                ],
                &[
                    Attribute::Token(false),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Sign(true),
                    Attribute::Sensitive(true),
                    Attribute::Private(true),
                ],
            )
        })
        .unwrap();
    if profile.supports_session_objects() {
        if !f.token.has_mechanism(MechanismType::ECC_KEY_PAIR_GEN) {
            f.skip("session objects", "the token cannot generate EC keys");
            return;
        }
        let (public, private) = result.unwrap_or_else(|e| {
            panic!(
                "[{}] profile {profile:?} says session objects work: {e}",
                f.provider()
            )
        });
        s.with_raw_session(|raw| {
            for h in [public, private] {
                let attrs = raw
                    .get_attributes(h, &[AttributeType::Token, AttributeType::Class])
                    .unwrap();
                assert!(attrs.contains(&Attribute::Token(false)), "{attrs:?}");
                assert!(
                    attrs.contains(&Attribute::Class(ObjectClass::PRIVATE_KEY))
                        || attrs.contains(&Attribute::Class(ObjectClass::PUBLIC_KEY))
                );
                raw.destroy_object(h).unwrap();
            }
        })
        .unwrap();
    } else {
        let e = result
            .map_err(|e| Error::pkcs11("session key pair", e))
            .expect_err(
                "the profile says the token holds token objects only, but it made session objects",
            );
        eprintln!(
            "[{}] profile {profile:?}: session objects refused as expected: {e}",
            f.provider()
        );
        assert!(!e.is_transient(), "{e:?}");
        f.skip(
            "session objects",
            "the token holds token objects only (profile)",
        );
    }
    // The layer's own keys are token objects.
    let kt = any_key_type(f);
    let mut s = s;
    let label = f.label("token-object");
    s.generate_key(&label, kt, KeyGenOptions::default())
        .unwrap();
    let key = s.find_key(&label).unwrap();
    let attrs = s
        .with_raw_session(|raw| {
            raw.get_attributes(
                key.private_handle(),
                &[AttributeType::Token, AttributeType::KeyType],
            )
        })
        .unwrap()
        .unwrap();
    assert!(attrs.contains(&Attribute::Token(true)), "{attrs:?}");
    assert!(attrs.iter().any(
        |a| matches!(a, Attribute::KeyType(k) if *k == CkKeyType::EC || *k == CkKeyType::RSA)
    ));
}
