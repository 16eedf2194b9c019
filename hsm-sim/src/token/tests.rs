//! Unit tests of the token logic, below the C ABI. Signatures are checked with ring, an independent verifier.

use super::*;
use crate::control::Control;
use crate::crypto::HashAlg;
use crate::faults::FaultPlan;
use der::Decode;
use ring::signature::{self as rs, UnparsedPublicKey};
use sha2::Digest;

const SO_PIN: &[u8] = b"so-secret";
const USER_PIN: &[u8] = b"1234";

fn config(dir: &std::path::Path) -> Config {
    Config {
        dir: Some(dir.to_path_buf()),
        pin_kdf_iterations: 10,
        control_poll_ms: 0,
        ..Config::default()
    }
}

/// A device with an initialised token, a user PIN, and an open R/W session logged in as the user.
fn ready(cfg: Config) -> (Device, CK_SESSION_HANDLE) {
    let d = Device::open(cfg).unwrap();
    d.init_token(SO_PIN, "test token").unwrap();
    let s = d.open_session(true).unwrap();
    d.login(s, CKU_SO, SO_PIN).unwrap();
    d.init_pin(s, USER_PIN).unwrap();
    d.logout(s).unwrap();
    d.login(s, CKU_USER, USER_PIN).unwrap();
    (d, s)
}

fn ulong(v: CK_ULONG) -> Vec<u8> {
    ulong_bytes(v)
}

type Template = Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>;

fn ec_template(curve: Curve, label: &str, token: bool) -> (CK_MECHANISM_TYPE, Template, Template) {
    let mech = if curve == Curve::Ed25519 {
        CKM_EC_EDWARDS_KEY_PAIR_GEN
    } else {
        CKM_EC_KEY_PAIR_GEN
    };
    let public = vec![
        (CKA_EC_PARAMS, curve.default_ec_params()),
        (CKA_TOKEN, b(token)),
        (CKA_LABEL, label.as_bytes().to_vec()),
        (CKA_VERIFY, b(true)),
    ];
    let private = vec![
        (CKA_TOKEN, b(token)),
        (CKA_LABEL, label.as_bytes().to_vec()),
        (CKA_SIGN, b(true)),
    ];
    (mech, public, private)
}

fn value(d: &Device, s: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE, t: CK_ATTRIBUTE_TYPE) -> Vec<u8> {
    match d.get_attributes(s, o, &[t]).unwrap().remove(0) {
        AttrValue::Value(v) => v,
        other => panic!("attribute {t:#x}: {other:?}"),
    }
}

fn ec_point(d: &Device, s: CK_SESSION_HANDLE, public: CK_OBJECT_HANDLE) -> Vec<u8> {
    let der = value(d, s, public, CKA_EC_POINT);
    der::asn1::OctetString::from_der(&der)
        .unwrap()
        .as_bytes()
        .to_vec()
}

fn sign(
    d: &Device,
    s: CK_SESSION_HANDLE,
    m: SignMechanism,
    key: CK_OBJECT_HANDLE,
    data: &[u8],
) -> CkResult<Vec<u8>> {
    d.sign_init(s, m, key)?;
    match d.sign(s, data, Some(4096))? {
        SignOutput::Signature(sig) => Ok(sig),
        other => panic!("{other:?}"),
    }
}

fn find(
    d: &Device,
    s: CK_SESSION_HANDLE,
    template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Vec<CK_OBJECT_HANDLE> {
    d.find_init(s, template).unwrap();
    let found = d.find_next(s, 100).unwrap();
    d.find_final(s).unwrap();
    found
}

#[test]
fn token_init_pins_and_login_states() {
    let dir = tempfile::tempdir().unwrap();
    let d = Device::open(config(dir.path())).unwrap();
    assert_eq!(
        d.open_session(true),
        Err(Rv(CKR_TOKEN_NOT_RECOGNIZED)),
        "no token before C_InitToken"
    );
    assert_eq!(d.init_token(b"123", "x"), Err(Rv(CKR_PIN_LEN_RANGE)));
    d.init_token(SO_PIN, "first").unwrap();
    let info = d.token_info().unwrap();
    assert_eq!(info.label, "first");
    assert_ne!(info.flags & CKF_TOKEN_INITIALIZED, 0);
    assert_eq!(info.flags & CKF_USER_PIN_INITIALIZED, 0);

    let ro = d.open_session(false).unwrap();
    assert_eq!(
        d.login(ro, CKU_USER, USER_PIN),
        Err(Rv(CKR_USER_PIN_NOT_INITIALIZED))
    );
    assert_eq!(
        d.login(ro, CKU_SO, SO_PIN),
        Err(Rv(CKR_SESSION_READ_ONLY_EXISTS))
    );
    d.close_session(ro).unwrap();

    let s = d.open_session(true).unwrap();
    assert_eq!(d.session_info(s).unwrap().state, CKS_RW_PUBLIC_SESSION);
    assert_eq!(d.login(s, CKU_SO, b"wrong-pin"), Err(Rv(CKR_PIN_INCORRECT)));
    d.login(s, CKU_SO, SO_PIN).unwrap();
    assert_eq!(d.session_info(s).unwrap().state, CKS_RW_SO_FUNCTIONS);
    assert_eq!(
        d.open_session(false),
        Err(Rv(CKR_SESSION_READ_WRITE_SO_EXISTS))
    );
    assert_eq!(
        d.login(s, CKU_USER, USER_PIN),
        Err(Rv(CKR_USER_ANOTHER_ALREADY_LOGGED_IN))
    );
    d.init_pin(s, USER_PIN).unwrap();
    d.logout(s).unwrap();
    assert_eq!(d.logout(s), Err(Rv(CKR_USER_NOT_LOGGED_IN)));

    d.login(s, CKU_USER, USER_PIN).unwrap();
    assert_eq!(
        d.login(s, CKU_USER, USER_PIN),
        Err(Rv(CKR_USER_ALREADY_LOGGED_IN))
    );
    assert_eq!(d.session_info(s).unwrap().state, CKS_RW_USER_FUNCTIONS);
    let ro = d.open_session(false).unwrap();
    assert_eq!(d.session_info(ro).unwrap().state, CKS_RO_USER_FUNCTIONS);

    // Change the user PIN, then the old one stops working.
    d.set_pin(s, USER_PIN, b"5678").unwrap();
    assert_eq!(
        d.set_pin(ro, b"5678", b"9999"),
        Err(Rv(CKR_SESSION_READ_ONLY))
    );
    d.logout(s).unwrap();
    assert_eq!(d.login(s, CKU_USER, USER_PIN), Err(Rv(CKR_PIN_INCORRECT)));
    d.login(s, CKU_USER, b"5678").unwrap();

    // Closing the last session logs out.
    d.close_session(ro).unwrap();
    d.close_session(s).unwrap();
    assert_eq!(d.login_state(), LoginState::Public);
    assert_eq!(d.close_session(s), Err(Rv(CKR_SESSION_HANDLE_INVALID)));

    // Re-initialising needs the SO PIN and wipes the user PIN.
    assert_eq!(
        d.init_token(b"not-the-so", "again"),
        Err(Rv(CKR_PIN_INCORRECT))
    );
    d.init_token(SO_PIN, "again").unwrap();
    assert_eq!(d.token_info().unwrap().flags & CKF_USER_PIN_INITIALIZED, 0);
}

#[test]
fn wrong_pins_lock_the_user_until_the_so_resets_it() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s) = ready(Config {
        max_pin_failures: 3,
        ..config(dir.path())
    });
    d.logout(s).unwrap();
    assert_eq!(d.login(s, CKU_USER, b"0000"), Err(Rv(CKR_PIN_INCORRECT)));
    assert_ne!(d.token_info().unwrap().flags & CKF_USER_PIN_COUNT_LOW, 0);
    assert_eq!(d.login(s, CKU_USER, b"0000"), Err(Rv(CKR_PIN_INCORRECT)));
    assert_ne!(d.token_info().unwrap().flags & CKF_USER_PIN_FINAL_TRY, 0);
    assert_eq!(d.login(s, CKU_USER, b"0000"), Err(Rv(CKR_PIN_INCORRECT)));
    assert_ne!(d.token_info().unwrap().flags & CKF_USER_PIN_LOCKED, 0);
    assert_eq!(
        d.login(s, CKU_USER, USER_PIN),
        Err(Rv(CKR_PIN_LOCKED)),
        "even the right PIN"
    );
    d.login(s, CKU_SO, SO_PIN).unwrap();
    d.init_pin(s, b"4321").unwrap();
    d.logout(s).unwrap();
    d.login(s, CKU_USER, b"4321").unwrap();
}

#[test]
fn ec_and_ed25519_keys_sign_and_ring_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s) = ready(config(dir.path()));
    let msg = b"a to-be-signed certificate";
    for curve in [Curve::P256, Curve::P384, Curve::Ed25519] {
        let (mech, public, private) = ec_template(curve, &format!("{curve:?}"), false);
        let (pubk, privk) = d.generate_key_pair(s, mech, &public, &private).unwrap();
        let point = ec_point(&d, s, pubk);
        assert_eq!(value(&d, s, privk, CKA_SENSITIVE), b(true));
        assert_eq!(value(&d, s, privk, CKA_EXTRACTABLE), b(false));
        assert_eq!(
            d.get_attributes(s, privk, &[CKA_VALUE]).unwrap(),
            vec![AttrValue::Sensitive]
        );
        assert_eq!(
            d.get_attributes(s, pubk, &[CKA_MODULUS]).unwrap(),
            vec![AttrValue::Invalid]
        );
        match curve {
            Curve::P256 => {
                let digest = sha2::Sha256::digest(msg);
                let sig = sign(&d, s, SignMechanism::Ecdsa, privk, &digest).unwrap();
                let pk = UnparsedPublicKey::new(&rs::ECDSA_P256_SHA256_FIXED, &point);
                pk.verify(msg, &sig).unwrap();
                let sig =
                    sign(&d, s, SignMechanism::EcdsaHash(HashAlg::Sha256), privk, msg).unwrap();
                pk.verify(msg, &sig).unwrap();
            }
            Curve::P384 => {
                let sig =
                    sign(&d, s, SignMechanism::EcdsaHash(HashAlg::Sha384), privk, msg).unwrap();
                UnparsedPublicKey::new(&rs::ECDSA_P384_SHA384_FIXED, &point)
                    .verify(msg, &sig)
                    .unwrap();
                let digest = sha2::Sha384::digest(msg);
                let sig = sign(&d, s, SignMechanism::Ecdsa, privk, &digest).unwrap();
                UnparsedPublicKey::new(&rs::ECDSA_P384_SHA384_FIXED, &point)
                    .verify(msg, &sig)
                    .unwrap();
            }
            Curve::Ed25519 => {
                let sig = sign(&d, s, SignMechanism::EdDsa, privk, msg).unwrap();
                UnparsedPublicKey::new(&rs::ED25519, &point)
                    .verify(msg, &sig)
                    .unwrap();
                assert_eq!(
                    d.sign_init(s, SignMechanism::Ecdsa, privk),
                    Err(Rv(CKR_KEY_TYPE_INCONSISTENT))
                );
            }
        }
    }
}

#[test]
fn rsa_2048_pkcs1_and_pss_verify_with_ring() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s) = ready(config(dir.path()));
    let public = vec![(CKA_MODULUS_BITS, ulong(2048)), (CKA_TOKEN, b(false))];
    let private = vec![(CKA_TOKEN, b(false)), (CKA_SIGN, b(true))];
    let (pubk, privk) = d
        .generate_key_pair(s, CKM_RSA_PKCS_KEY_PAIR_GEN, &public, &private)
        .unwrap();
    let n = value(&d, s, pubk, CKA_MODULUS);
    let e = value(&d, s, pubk, CKA_PUBLIC_EXPONENT);
    assert_eq!((n.len(), e.as_slice()), (256, &[1u8, 0, 1][..]));
    assert_eq!(
        d.get_attributes(s, privk, &[CKA_PRIVATE_EXPONENT]).unwrap(),
        vec![AttrValue::Sensitive]
    );
    let pk = rs::RsaPublicKeyComponents { n: &n, e: &e };
    let msg = b"rsa message";

    let sig = sign(
        &d,
        s,
        SignMechanism::RsaPkcsHash(HashAlg::Sha256),
        privk,
        msg,
    )
    .unwrap();
    pk.verify(&rs::RSA_PKCS1_2048_8192_SHA256, msg, &sig)
        .unwrap();

    // CKM_RSA_PKCS over a caller-built DigestInfo (SHA-256 prefix from RFC 8017 §9.2 note 1).
    let mut digest_info = hex::decode("3031300d060960864801650304020105000420").unwrap();
    digest_info.extend_from_slice(&sha2::Sha256::digest(msg));
    let sig = sign(&d, s, SignMechanism::RsaPkcs, privk, &digest_info).unwrap();
    pk.verify(&rs::RSA_PKCS1_2048_8192_SHA256, msg, &sig)
        .unwrap();

    let digest = sha2::Sha256::digest(msg);
    let sig = sign(
        &d,
        s,
        SignMechanism::RsaPss {
            hash: HashAlg::Sha256,
            salt_len: 32,
        },
        privk,
        &digest,
    )
    .unwrap();
    pk.verify(&rs::RSA_PSS_2048_8192_SHA256, msg, &sig).unwrap();
    assert_eq!(
        sign(
            &d,
            s,
            SignMechanism::RsaPss {
                hash: HashAlg::Sha256,
                salt_len: 32
            },
            privk,
            &digest[..20]
        ),
        Err(Rv(CKR_DATA_LEN_RANGE))
    );
}

#[test]
fn two_call_signing_and_multipart() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s) = ready(config(dir.path()));
    let (mech, public, private) = ec_template(Curve::P256, "k", false);
    let (pubk, privk) = d.generate_key_pair(s, mech, &public, &private).unwrap();
    let digest = [7u8; 32];
    assert_eq!(
        d.sign(s, &digest, None),
        Err(Rv(CKR_OPERATION_NOT_INITIALIZED))
    );
    d.sign_init(s, SignMechanism::Ecdsa, privk).unwrap();
    assert_eq!(
        d.sign_init(s, SignMechanism::Ecdsa, privk),
        Err(Rv(CKR_OPERATION_ACTIVE))
    );
    assert_eq!(d.sign(s, &digest, None).unwrap(), SignOutput::Length(64));
    assert_eq!(
        d.sign(s, &digest, Some(10)).unwrap(),
        SignOutput::TooSmall(64)
    );
    let SignOutput::Signature(sig) = d.sign(s, &digest, Some(64)).unwrap() else {
        panic!()
    };
    assert_eq!(sig.len(), 64);
    assert_eq!(
        d.sign(s, &digest, Some(64)),
        Err(Rv(CKR_OPERATION_NOT_INITIALIZED)),
        "the operation ended"
    );

    let msg = b"multi-part message";
    d.sign_init(s, SignMechanism::EcdsaHash(HashAlg::Sha256), privk)
        .unwrap();
    d.sign_update(s, &msg[..5]).unwrap();
    d.sign_update(s, &msg[5..]).unwrap();
    let SignOutput::Signature(sig) = d.sign_final(s, Some(64)).unwrap() else {
        panic!()
    };
    UnparsedPublicKey::new(&rs::ECDSA_P256_SHA256_FIXED, ec_point(&d, s, pubk))
        .verify(msg, &sig)
        .unwrap();

    // A public key cannot sign; a key with CKA_SIGN=false may not.
    assert_eq!(
        d.sign_init(s, SignMechanism::Ecdsa, pubk),
        Err(Rv(CKR_KEY_TYPE_INCONSISTENT))
    );
    let (mech, public, mut private) = ec_template(Curve::P256, "nosign", false);
    private.push((CKA_SIGN, b(false)));
    let (_, nosign) = d.generate_key_pair(s, mech, &public, &private).unwrap();
    assert_eq!(
        d.sign_init(s, SignMechanism::Ecdsa, nosign),
        Err(Rv(CKR_KEY_FUNCTION_NOT_PERMITTED))
    );
}

#[test]
fn token_keys_persist_across_reopen_and_need_the_pin() {
    let dir = tempfile::tempdir().unwrap();
    let point;
    {
        let (d, s) = ready(config(dir.path()));
        let (mech, public, private) = ec_template(Curve::P256, "ca-root", true);
        let (pubk, _) = d.generate_key_pair(s, mech, &public, &private).unwrap();
        point = ec_point(&d, s, pubk);
        // A session key is never written.
        let (mech, public, private) = ec_template(Curve::P256, "ephemeral", false);
        d.generate_key_pair(s, mech, &public, &private).unwrap();
        d.set_attributes(s, pubk, &[(CKA_LABEL, b"ca-root-pub".to_vec())])
            .unwrap();
        assert_eq!(
            d.set_attributes(s, pubk, &[(CKA_CLASS, ulong(CKO_DATA))]),
            Err(Rv(CKR_ATTRIBUTE_READ_ONLY))
        );
    }
    let d = Device::open(config(dir.path())).unwrap();
    assert_eq!(d.token_info().unwrap().label, "test token");
    let s = d.open_session(false).unwrap();
    let label = |l: &str| vec![(CKA_LABEL, l.as_bytes().to_vec())];
    // Before login: the public key is visible, the private key is not.
    assert_eq!(find(&d, s, &label("ca-root-pub")).len(), 1);
    assert_eq!(find(&d, s, &label("ca-root")).len(), 0);
    assert_eq!(find(&d, s, &label("ephemeral")).len(), 0);
    assert_eq!(d.login(s, CKU_USER, b"9999"), Err(Rv(CKR_PIN_INCORRECT)));
    d.login(s, CKU_USER, USER_PIN).unwrap();
    let keys = find(
        &d,
        s,
        &[
            (CKA_LABEL, b"ca-root".to_vec()),
            (CKA_CLASS, ulong(CKO_PRIVATE_KEY)),
        ],
    );
    assert_eq!(keys.len(), 1);
    let msg = b"after restart";
    let sig = sign(
        &d,
        s,
        SignMechanism::EcdsaHash(HashAlg::Sha256),
        keys[0],
        msg,
    )
    .unwrap();
    UnparsedPublicKey::new(&rs::ECDSA_P256_SHA256_FIXED, &point)
        .verify(msg, &sig)
        .unwrap();
    // A private object's label change is sealed and survives another restart (a read-only session may not).
    assert_eq!(
        d.set_attributes(s, keys[0], &[(CKA_LABEL, b"x".to_vec())]),
        Err(Rv(CKR_SESSION_READ_ONLY))
    );
    let rw = d.open_session(true).unwrap();
    d.set_attributes(rw, keys[0], &[(CKA_LABEL, b"ca-root-2026".to_vec())])
        .unwrap();
    drop(d);
    let d = Device::open(config(dir.path())).unwrap();
    let s = d.open_session(true).unwrap();
    d.login(s, CKU_USER, USER_PIN).unwrap();
    let keys = find(&d, s, &label("ca-root-2026"));
    assert_eq!(keys.len(), 1);
    // Logging out hides it again; the handle is no longer usable.
    d.logout(s).unwrap();
    assert_eq!(find(&d, s, &label("ca-root")).len(), 0);
    assert_eq!(
        d.sign_init(s, SignMechanism::Ecdsa, keys[0]),
        Err(Rv(CKR_USER_NOT_LOGGED_IN))
    );
}

#[test]
fn sealed_files_reveal_nothing_without_the_pin() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s) = ready(config(dir.path()));
    let (mech, public, private) = ec_template(Curve::Ed25519, "secret-label-xyz", true);
    let (_, privk) = d.generate_key_pair(s, mech, &public, &private).unwrap();
    let entry_key = {
        let st = d.read();
        st.objects[&privk]
            .open
            .as_ref()
            .unwrap()
            .key
            .as_ref()
            .unwrap()
            .secret_bytes()
            .unwrap()
    };
    let secret_hex = hex::encode(entry_key.as_slice());
    let mut sealed_files = 0;
    for entry in std::fs::read_dir(dir.path().join("objects")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(
            !text.contains(&secret_hex),
            "the private key is not in the clear"
        );
        if text.contains("\"sealed\"") {
            sealed_files += 1;
            assert!(
                !text.contains(&hex::encode("secret-label-xyz")),
                "a private object's label is sealed too"
            );
        }
    }
    assert_eq!(sealed_files, 1);
    let token = std::fs::read_to_string(dir.path().join("token.json")).unwrap();
    assert!(
        !token.contains(&hex::encode(USER_PIN)) && !token.contains("1234"),
        "PINs are stored hashed"
    );
    // With the wrong PIN nothing unseals: the record refuses it and the object stays hidden.
    let rec = d.read().record.clone().unwrap();
    assert!(rec.user.as_ref().unwrap().unlock(b"4321").is_none());
    assert!(rec.user.as_ref().unwrap().unlock(USER_PIN).is_some());
}

#[test]
fn session_objects_and_created_public_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s) = ready(config(dir.path()));
    let s2 = d.open_session(true).unwrap();
    let (mech, public, private) = ec_template(Curve::P256, "temp", false);
    let (pubk, _) = d.generate_key_pair(s2, mech, &public, &private).unwrap();
    let point = value(&d, s2, pubk, CKA_EC_POINT);
    // Another session of the application sees it; closing the owner destroys it.
    assert_eq!(find(&d, s, &[(CKA_LABEL, b"temp".to_vec())]).len(), 2);
    d.close_session(s2).unwrap();
    assert!(find(&d, s, &[(CKA_LABEL, b"temp".to_vec())]).is_empty());

    let imported = d
        .create_object(
            s,
            &[
                (CKA_CLASS, ulong(CKO_PUBLIC_KEY)),
                (CKA_KEY_TYPE, ulong(CKK_EC)),
                (CKA_EC_PARAMS, Curve::P256.default_ec_params()),
                (CKA_EC_POINT, point.clone()),
                (CKA_TOKEN, b(true)),
                (CKA_LABEL, b"imported".to_vec()),
            ],
        )
        .unwrap();
    assert_eq!(value(&d, s, imported, CKA_EC_POINT), point);
    assert_eq!(
        d.create_object(s, &[(CKA_CLASS, ulong(CKO_PRIVATE_KEY))]),
        Err(Rv(CKR_ATTRIBUTE_VALUE_INVALID)),
        "private keys are generated inside, never imported"
    );
    assert_eq!(
        d.create_object(
            s,
            &[
                (CKA_CLASS, ulong(CKO_PUBLIC_KEY)),
                (CKA_KEY_TYPE, ulong(CKK_EC))
            ]
        ),
        Err(Rv(CKR_TEMPLATE_INCOMPLETE))
    );
    d.destroy_object(s, imported).unwrap();
    assert_eq!(
        d.get_attributes(s, imported, &[CKA_LABEL]),
        Err(Rv(CKR_OBJECT_HANDLE_INVALID))
    );
    drop(d);
    let d = Device::open(config(dir.path())).unwrap();
    let s = d.open_session(false).unwrap();
    assert!(
        find(&d, s, &[(CKA_LABEL, b"imported".to_vec())]).is_empty(),
        "destroyed on disk too"
    );
}

#[test]
fn read_only_sessions_and_public_sessions_cannot_create_token_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s) = ready(config(dir.path()));
    let ro = d.open_session(false).unwrap();
    let (mech, public, private) = ec_template(Curve::P256, "k", true);
    assert_eq!(
        d.generate_key_pair(ro, mech, &public, &private),
        Err(Rv(CKR_SESSION_READ_ONLY))
    );
    d.logout(s).unwrap();
    assert_eq!(
        d.generate_key_pair(s, mech, &public, &private),
        Err(Rv(CKR_USER_NOT_LOGGED_IN))
    );
    let bad_curve = vec![(CKA_EC_PARAMS, Curve::Ed25519.default_ec_params())];
    d.login(s, CKU_USER, USER_PIN).unwrap();
    assert_eq!(
        d.generate_key_pair(s, CKM_EC_KEY_PAIR_GEN, &bad_curve, &[]),
        Err(Rv(CKR_TEMPLATE_INCONSISTENT))
    );
    assert_eq!(
        d.generate_key_pair(s, CKM_EC_KEY_PAIR_GEN, &[], &[]),
        Err(Rv(CKR_TEMPLATE_INCOMPLETE))
    );
    assert_eq!(
        d.generate_key_pair(
            s,
            CKM_RSA_PKCS_KEY_PAIR_GEN,
            &[(CKA_MODULUS_BITS, ulong(1024))],
            &[]
        ),
        Err(Rv(CKR_KEY_SIZE_RANGE))
    );
    assert_eq!(
        d.generate_key_pair(s, CKM_AES_KEY_GEN, &[], &[]),
        Err(Rv(CKR_MECHANISM_INVALID))
    );
}

#[test]
fn session_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s) = ready(Config {
        max_sessions: 2,
        ..config(dir.path())
    });
    let s2 = d.open_session(false).unwrap();
    assert_eq!(d.open_session(true), Err(Rv(CKR_SESSION_COUNT)));
    assert_eq!(d.token_info().unwrap().sessions, 2);
    d.close_session(s2).unwrap();
    let s3 = d.open_session(true).unwrap();
    assert_ne!(s3, s);
}

#[test]
fn rate_limit_in_reject_mode_refuses_beyond_the_burst() {
    let dir = tempfile::tempdir().unwrap();
    // One signature per 1000 s: the burst of 2 is all this test can get.
    let cfg = Config {
        max_ops_per_sec: 0.001,
        burst: 2,
        rate_limit: RateLimitMode::Reject,
        rate_limit_rv: Rv(CKR_FUNCTION_FAILED),
        ..config(dir.path())
    };
    let (d, s) = ready(cfg);
    let (mech, public, private) = ec_template(Curve::P256, "k", false);
    let (_, privk) = d.generate_key_pair(s, mech, &public, &private).unwrap();
    assert!(sign(&d, s, SignMechanism::Ecdsa, privk, &[1; 32]).is_ok());
    assert!(sign(&d, s, SignMechanism::Ecdsa, privk, &[1; 32]).is_ok());
    assert_eq!(
        sign(&d, s, SignMechanism::Ecdsa, privk, &[1; 32]),
        Err(Rv(CKR_FUNCTION_FAILED))
    );
    assert_eq!(d.counters().rate_limited, 1);
    assert_eq!(d.counters().signatures, 2);
}

fn device_with_control(
    dir: &std::path::Path,
) -> (Device, CK_SESSION_HANDLE, CK_OBJECT_HANDLE, Control) {
    let control = Control::create(dir.join("faults.toml")).unwrap();
    let cfg = Config {
        control_file: Some(control.path().to_path_buf()),
        ..config(&dir.join("token"))
    };
    let (d, s) = ready(cfg);
    let (mech, public, private) = ec_template(Curve::P256, "k", true);
    let (_, privk) = d.generate_key_pair(s, mech, &public, &private).unwrap();
    (d, s, privk, control)
}

#[test]
fn fault_fail_next_and_fail_rate_through_the_control_file() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s, key, mut control) = device_with_control(dir.path());
    control
        .fail_next(2, CKR_DEVICE_ERROR, &[OpKind::Sign])
        .unwrap();
    assert_eq!(
        sign(&d, s, SignMechanism::Ecdsa, key, &[1; 32]),
        Err(Rv(CKR_DEVICE_ERROR))
    );
    assert_eq!(
        sign(&d, s, SignMechanism::Ecdsa, key, &[1; 32]),
        Err(Rv(CKR_DEVICE_ERROR))
    );
    assert!(sign(&d, s, SignMechanism::Ecdsa, key, &[1; 32]).is_ok());
    assert_eq!(
        control.counters().unwrap().failures,
        2,
        "the status file reports the injections"
    );

    control
        .fail_next(1, CKR_PIN_EXPIRED, &[OpKind::Login])
        .unwrap();
    d.logout(s).unwrap();
    assert_eq!(d.login(s, CKU_USER, USER_PIN), Err(Rv(CKR_PIN_EXPIRED)));
    d.login(s, CKU_USER, USER_PIN).unwrap();

    control
        .fail_rate(1.0, CKR_FUNCTION_FAILED, &[OpKind::All], 3)
        .unwrap();
    assert_eq!(d.open_session(true), Err(Rv(CKR_FUNCTION_FAILED)));
    assert_eq!(
        sign(&d, s, SignMechanism::Ecdsa, key, &[1; 32]),
        Err(Rv(CKR_FUNCTION_FAILED))
    );
    control.clear().unwrap();
    assert!(sign(&d, s, SignMechanism::Ecdsa, key, &[1; 32]).is_ok());
    let counters = control.counters().unwrap();
    assert_eq!(counters.failures, 5);
    assert_eq!(counters.applied_seq, control.plan().seq);
}

#[test]
fn fault_unplug_and_return() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s, _, mut control) = device_with_control(dir.path());
    control.set_unplugged(true).unwrap();
    assert!(!d.token_present());
    assert_eq!(d.session_info(s), Err(Rv(CKR_DEVICE_REMOVED)), "first call");
    assert_eq!(d.session_info(s), Err(Rv(CKR_TOKEN_NOT_PRESENT)));
    assert_eq!(d.open_session(true), Err(Rv(CKR_TOKEN_NOT_PRESENT)));
    assert_eq!(d.token_info(), Err(Rv(CKR_TOKEN_NOT_PRESENT)));
    control.set_unplugged(false).unwrap();
    assert!(d.token_present());
    assert_eq!(
        d.session_info(s),
        Err(Rv(CKR_SESSION_HANDLE_INVALID)),
        "sessions did not survive"
    );
    assert_eq!(d.login_state(), LoginState::Public);
    let s = d.open_session(true).unwrap();
    d.login(s, CKU_USER, USER_PIN).unwrap();
    let keys = find(
        &d,
        s,
        &[
            (CKA_LABEL, b"k".to_vec()),
            (CKA_CLASS, ulong(CKO_PRIVATE_KEY)),
        ],
    );
    assert_eq!(keys.len(), 1, "the token and its keys came back");
    assert!(sign(&d, s, SignMechanism::Ecdsa, keys[0], &[1; 32]).is_ok());
    let c = control.counters().unwrap();
    assert_eq!((c.unplugs, c.calls_while_unplugged), (1, 4));
}

#[test]
fn fault_timed_unplug_in_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan {
        seq: 1,
        unplug_ms: 3_600_000,
        ..FaultPlan::default()
    };
    let (d, s) = ready(config(dir.path()));
    // Apply a long timed unplug directly to the engine: the device stays away.
    let drop_sessions = lock(&d.faults).apply(plan, Instant::now()).drop_sessions;
    assert!(drop_sessions);
    d.drop_all_sessions();
    assert_eq!(d.open_session(true), Err(Rv(CKR_DEVICE_REMOVED)));
    assert_eq!(d.session_info(s), Err(Rv(CKR_TOKEN_NOT_PRESENT)));
}

#[test]
fn fault_invalidate_sessions_and_corrupt_signatures() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s, key, mut control) = device_with_control(dir.path());
    let public = find(
        &d,
        s,
        &[
            (CKA_LABEL, b"k".to_vec()),
            (CKA_CLASS, ulong(CKO_PUBLIC_KEY)),
        ],
    )[0];
    let point = ec_point(&d, s, public);
    let pk = UnparsedPublicKey::new(&rs::ECDSA_P256_SHA256_FIXED, &point);
    let msg = b"corrupt me";
    let digest = sha2::Sha256::digest(msg);

    control.corrupt_next(1).unwrap();
    let bad = sign(&d, s, SignMechanism::Ecdsa, key, &digest).unwrap();
    assert_eq!(bad.len(), 64);
    assert!(
        pk.verify(msg, &bad).is_err(),
        "the corrupted signature does not verify"
    );
    let good = sign(&d, s, SignMechanism::Ecdsa, key, &digest).unwrap();
    pk.verify(msg, &good).unwrap();

    control.corrupt_rate(1.0).unwrap();
    assert!(
        pk.verify(
            msg,
            &sign(&d, s, SignMechanism::Ecdsa, key, &digest).unwrap()
        )
        .is_err()
    );
    control.corrupt_rate(0.0).unwrap();
    assert_eq!(control.counters().unwrap().corrupted_signatures, 2);

    control.invalidate_sessions().unwrap();
    assert_eq!(d.session_info(s), Err(Rv(CKR_SESSION_HANDLE_INVALID)));
    assert_eq!(d.login_state(), LoginState::Public);
    let s = d.open_session(true).unwrap();
    assert_eq!(
        d.session_info(s).unwrap().state,
        CKS_RW_PUBLIC_SESSION,
        "the login was lost with the sessions"
    );
    assert_eq!(control.counters().unwrap().session_invalidations, 1);
}

#[test]
fn a_bad_control_file_is_reported_and_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s, key, control) = device_with_control(dir.path());
    std::fs::write(control.path(), "fail_next = \"many\"").unwrap();
    assert!(sign(&d, s, SignMechanism::Ecdsa, key, &[1; 32]).is_ok());
    let err = control.counters().unwrap().last_error.unwrap();
    assert!(err.contains("fail_next"), "{err}");
}

#[test]
fn concurrent_sessions_sign_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let (d, s) = ready(Config {
        latency_ms: 1,
        jitter_ms: 1,
        ..config(dir.path())
    });
    let (mech, public, private) = ec_template(Curve::P256, "shared", false);
    let (pubk, privk) = d.generate_key_pair(s, mech, &public, &private).unwrap();
    let point = ec_point(&d, s, pubk);
    let d = Arc::new(d);
    let threads: Vec<_> = (0..4u8)
        .map(|i| {
            let d = Arc::clone(&d);
            std::thread::spawn(move || {
                let s = d.open_session(false).unwrap();
                (0..10u8)
                    .map(|j| {
                        let msg = vec![i, j];
                        let sig = sign(
                            &d,
                            s,
                            SignMechanism::EcdsaHash(HashAlg::Sha256),
                            privk,
                            &msg,
                        )
                        .unwrap();
                        (msg, sig)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let pk = UnparsedPublicKey::new(&rs::ECDSA_P256_SHA256_FIXED, &point);
    let mut n = 0;
    for t in threads {
        for (msg, sig) in t.join().unwrap() {
            pk.verify(&msg, &sig).unwrap();
            n += 1;
        }
    }
    assert_eq!(n, 40);
    assert_eq!(d.counters().signatures, 40);
}
