//! hsm-sim loaded through `cryptoki` exactly like a vendor module: the built cdylib, its C ABI, its configuration
//! from the environment. Each scenario runs in a child process (this test binary re-run on one ignored test) so it
//! gets its own environment and its own copy of the module, and so a restart is a real new process.
//! Signatures are verified with ring.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;
use common::module;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::MechanismType;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use der::Decode;
use hsm_sim::control::Control;
use hsm_sim::faults::OpKind;
use ring::signature::{self as rs, UnparsedPublicKey};
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SO_PIN: &str = "so-pin-1234";
const USER_PIN: &str = "user-pin-1234";

/// Runs one of the `child_*` tests below in a new process with `env`, and fails with its output if it fails.
fn run_child(test: &str, env: &[(&str, &Path)], extra: &[(&str, &str)]) {
    let exe = std::env::current_exe().expect("path of the test binary");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        test,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd.env("HSM_SIM_PIN_KDF_ITERATIONS", "1000")
        .env("HSM_SIM_MODULE", module());
    for (k, v) in env {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the child test process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child {test} failed:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
}

/// The `child_*` tests only make sense in the process their parent test starts with the module's environment.
fn in_child() -> bool {
    let yes = std::env::var_os("HSM_SIM_MODULE").is_some();
    assert!(
        yes,
        "this test is a step of another test that runs it in a child process; run that one instead"
    );
    yes
}

fn load() -> Pkcs11 {
    let path = std::env::var_os("HSM_SIM_MODULE").expect("HSM_SIM_MODULE set by the parent test");
    let p = Pkcs11::new(path).expect("load libhsm_sim.so");
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    p
}

fn rv(e: Error) -> RvError {
    match e {
        Error::Pkcs11(rv, _) => rv,
        other => panic!("expected a PKCS#11 return value, got {other}"),
    }
}

fn slot(p: &Pkcs11) -> Slot {
    let slots = p.get_slots_with_token().expect("C_GetSlotList");
    assert_eq!(slots.len(), 1);
    slots[0]
}

fn init_token(p: &Pkcs11) -> Slot {
    let s = slot(p);
    p.init_token(s, &AuthPin::new(SO_PIN.into()), "hsm-sim test")
        .expect("C_InitToken");
    let session = p.open_rw_session(s).expect("C_OpenSession");
    session
        .login(UserType::So, Some(&AuthPin::new(SO_PIN.into())))
        .expect("SO login");
    session
        .init_pin(&AuthPin::new(USER_PIN.into()))
        .expect("C_InitPIN");
    session.logout().expect("logout");
    s
}

fn user_session(p: &Pkcs11, s: Slot) -> Session {
    let session = p.open_rw_session(s).expect("C_OpenSession");
    session
        .login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .expect("user login");
    session
}

const KEYS: [&str; 4] = ["p256", "p384", "ed25519", "rsa2048"];

fn generate(session: &Session, name: &str) -> (ObjectHandle, ObjectHandle) {
    let common = |label: &str| {
        vec![
            Attribute::Token(true),
            Attribute::Label(label.into()),
            Attribute::Id(label.into()),
        ]
    };
    let mut public = common(name);
    let mut private = common(name);
    private.extend([
        Attribute::Sign(true),
        Attribute::Sensitive(true),
        Attribute::Private(true),
    ]);
    public.push(Attribute::Verify(true));
    let mech = match name {
        "p256" | "p384" => {
            let oid = if name == "p256" {
                "06082a8648ce3d030107"
            } else {
                "06052b81040022"
            };
            public.push(Attribute::EcParams(hex::decode(oid).expect("oid")));
            Mechanism::EccKeyPairGen
        }
        "ed25519" => {
            public.push(Attribute::EcParams(hex::decode("06032b6570").expect("oid")));
            Mechanism::EccEdwardsKeyPairGen
        }
        _ => {
            public.push(Attribute::ModulusBits(2048.into()));
            public.push(Attribute::PublicExponent(vec![1, 0, 1]));
            Mechanism::RsaPkcsKeyPairGen
        }
    };
    session
        .generate_key_pair(&mech, &public, &private)
        .unwrap_or_else(|e| panic!("generate {name}: {e}"))
}

fn find(session: &Session, name: &str, class: ObjectClass) -> ObjectHandle {
    let found = session
        .find_objects(&[Attribute::Label(name.into()), Attribute::Class(class)])
        .expect("C_FindObjects");
    assert_eq!(found.len(), 1, "{name} {class:?}");
    found[0]
}

fn ec_point(session: &Session, public: ObjectHandle) -> Vec<u8> {
    let attrs = session
        .get_attributes(public, &[AttributeType::EcPoint])
        .expect("CKA_EC_POINT");
    match &attrs[..] {
        [Attribute::EcPoint(der)] => der::asn1::OctetString::from_der(der)
            .expect("DER OCTET STRING")
            .as_bytes()
            .to_vec(),
        other => panic!("{other:?}"),
    }
}

/// Signs with every mechanism the key supports and verifies each signature with ring.
fn sign_and_verify(session: &Session, name: &str) {
    let public = find(session, name, ObjectClass::PUBLIC_KEY);
    let private = find(session, name, ObjectClass::PRIVATE_KEY);
    let msg = format!("certificate signed by {name}").into_bytes();
    match name {
        "p256" => {
            let pk = ec_point(session, public);
            let v = UnparsedPublicKey::new(&rs::ECDSA_P256_SHA256_FIXED, &pk);
            let digest = sha2::Sha256::digest(&msg);
            v.verify(
                &msg,
                &session
                    .sign(&Mechanism::Ecdsa, private, &digest)
                    .expect("CKM_ECDSA"),
            )
            .expect("verify");
            v.verify(
                &msg,
                &session
                    .sign(&Mechanism::EcdsaSha256, private, &msg)
                    .expect("CKM_ECDSA_SHA256"),
            )
            .expect("verify");
        }
        "p384" => {
            let pk = ec_point(session, public);
            let v = UnparsedPublicKey::new(&rs::ECDSA_P384_SHA384_FIXED, &pk);
            let digest = sha2::Sha384::digest(&msg);
            v.verify(
                &msg,
                &session
                    .sign(&Mechanism::Ecdsa, private, &digest)
                    .expect("CKM_ECDSA"),
            )
            .expect("verify");
            v.verify(
                &msg,
                &session
                    .sign(&Mechanism::EcdsaSha384, private, &msg)
                    .expect("CKM_ECDSA_SHA384"),
            )
            .expect("verify");
        }
        "ed25519" => {
            let pk = ec_point(session, public);
            let mech = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure));
            let sig = session.sign(&mech, private, &msg).expect("CKM_EDDSA");
            UnparsedPublicKey::new(&rs::ED25519, &pk)
                .verify(&msg, &sig)
                .expect("verify");
        }
        _ => {
            let attrs = session
                .get_attributes(
                    public,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .expect("RSA public attributes");
            let (n, e) = match &attrs[..] {
                [Attribute::Modulus(n), Attribute::PublicExponent(e)] => (n.clone(), e.clone()),
                other => panic!("{other:?}"),
            };
            let pk = rs::RsaPublicKeyComponents { n: &n, e: &e };
            let sig = session
                .sign(&Mechanism::Sha256RsaPkcs, private, &msg)
                .expect("CKM_SHA256_RSA_PKCS");
            pk.verify(&rs::RSA_PKCS1_2048_8192_SHA256, &msg, &sig)
                .expect("verify PKCS#1");
            let pss = PkcsPssParams {
                hash_alg: MechanismType::SHA256,
                mgf: PkcsMgfType::MGF1_SHA256,
                s_len: 32.into(),
            };
            let digest = sha2::Sha256::digest(&msg);
            let sig = session
                .sign(&Mechanism::RsaPkcsPss(pss), private, &digest)
                .expect("CKM_RSA_PKCS_PSS");
            pk.verify(&rs::RSA_PSS_2048_8192_SHA256, &msg, &sig)
                .expect("verify PSS");
        }
    }
    // The private key never leaves the token.
    let err = session.get_attributes(private, &[AttributeType::Value]);
    assert!(
        matches!(&err, Ok(v) if v.is_empty())
            || matches!(err, Err(Error::Pkcs11(RvError::AttributeSensitive, _))),
        "CKA_VALUE of a private key is not readable"
    );
}

#[test]
fn keys_survive_finalize_and_a_new_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [("HSM_SIM_DIR", dir.path())];
    run_child("child_generate_sign_and_reinitialize", &env, &[]);
    run_child("child_find_and_sign_after_restart", &env, &[]);
}

#[test]
#[ignore = "run in a child process by keys_survive_finalize_and_a_new_process"]
fn child_generate_sign_and_reinitialize() {
    assert!(in_child());
    let p = load();
    assert_eq!(
        rv(
            p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                .unwrap_err()
        ),
        RvError::CryptokiAlreadyInitialized
    );
    let info = p.get_library_info().expect("C_GetInfo");
    assert_eq!(info.cryptoki_version().major(), 2);
    let s = init_token(&p);
    let token = p.get_token_info(s).expect("C_GetTokenInfo");
    assert_eq!(token.label(), "hsm-sim test");
    let mechs = p.get_mechanism_list(s).expect("C_GetMechanismList");
    assert!(mechs.contains(&MechanismType::ECDSA) && mechs.contains(&MechanismType::EDDSA));
    {
        let session = user_session(&p, s);
        for name in KEYS {
            generate(&session, name);
            sign_and_verify(&session, name);
        }
        let random = session.generate_random_vec(32).expect("C_GenerateRandom");
        assert_eq!(random.len(), 32);
        assert!(matches!(
            session.login(UserType::User, Some(&AuthPin::new(USER_PIN.into()))),
            Err(Error::Pkcs11(RvError::UserAlreadyLoggedIn, _))
        ));
    }
    // C_Finalize, then the same process initialises again and finds its keys.
    p.finalize().expect("C_Finalize");
    let p = load();
    let session = user_session(&p, slot(&p));
    sign_and_verify(&session, "p256");
}

#[test]
#[ignore = "run in a child process by keys_survive_finalize_and_a_new_process"]
fn child_find_and_sign_after_restart() {
    assert!(in_child());
    let p = load();
    let s = slot(&p);
    let session = p.open_ro_session(s).expect("C_OpenSession");
    assert_eq!(
        rv(session
            .login(UserType::User, Some(&AuthPin::new("wrong-pin".into())))
            .unwrap_err()),
        RvError::PinIncorrect
    );
    // Before login only public objects are visible.
    let private = session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
        .expect("find");
    assert!(private.is_empty());
    session
        .login(UserType::User, Some(&AuthPin::new(USER_PIN.into())))
        .expect("login");
    for name in KEYS {
        sign_and_verify(&session, name);
    }
}

#[test]
fn faults_are_visible_as_return_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    let control = dir.path().join("faults.toml");
    Control::create(&control).expect("control file");
    run_child(
        "child_faults",
        &[("HSM_SIM_DIR", &token), ("HSM_SIM_CONTROL", &control)],
        &[
            ("HSM_SIM_CONTROL_POLL_MS", "0"),
            ("HSM_SIM_MAX_SESSIONS", "3"),
        ],
    );
    // The child's module reported what it injected through the status file.
    let status =
        std::fs::read_to_string(hsm_sim::control::status_path(&control)).expect("status file");
    let counters: hsm_sim::Counters = serde_json::from_str(&status).expect("status JSON");
    assert_eq!((counters.failures, counters.corrupted_signatures), (2, 1));
}

#[test]
#[ignore = "run in a child process by faults_are_visible_as_return_values"]
fn child_faults() {
    assert!(in_child());
    let control_path = PathBuf::from(std::env::var_os("HSM_SIM_CONTROL").expect("HSM_SIM_CONTROL"));
    let mut control = Control::create(&control_path).expect("control");
    let p = load();
    let s = init_token(&p);
    let session = user_session(&p, s);
    let (public, private) = generate(&session, "p256");
    let point = ec_point(&session, public);
    let verifier = UnparsedPublicKey::new(&rs::ECDSA_P256_SHA256_FIXED, &point);
    let msg = b"fault injection";
    let digest = sha2::Sha256::digest(msg);

    // Fail the next two signatures.
    control
        .fail_next(2, cryptoki_sys::CKR_DEVICE_ERROR, &[OpKind::Sign])
        .expect("control");
    for _ in 0..2 {
        assert_eq!(
            rv(session
                .sign(&Mechanism::Ecdsa, private, &digest)
                .unwrap_err()),
            RvError::DeviceError
        );
    }
    verifier
        .verify(
            msg,
            &session
                .sign(&Mechanism::Ecdsa, private, &digest)
                .expect("third sign"),
        )
        .expect("verify");

    // A corrupted signature comes back as success and does not verify.
    control.corrupt_next(1).expect("control");
    let bad = session
        .sign(&Mechanism::Ecdsa, private, &digest)
        .expect("corrupted sign still succeeds");
    assert!(verifier.verify(msg, &bad).is_err());

    // The session limit.
    let s2 = p.open_ro_session(s).expect("second session");
    let s3 = p.open_ro_session(s).expect("third session");
    assert_eq!(rv(p.open_ro_session(s).unwrap_err()), RvError::SessionCount);
    drop((s2, s3));

    // Sessions invalidated.
    control.invalidate_sessions().expect("control");
    assert_eq!(
        rv(session
            .sign(&Mechanism::Ecdsa, private, &digest)
            .unwrap_err()),
        RvError::SessionHandleInvalid
    );
    let session = user_session(&p, s);

    // Unplugged: removed once, then not present; back with sessions gone.
    control.set_unplugged(true).expect("control");
    assert_eq!(
        rv(session
            .sign(&Mechanism::Ecdsa, private, &digest)
            .unwrap_err()),
        RvError::DeviceRemoved
    );
    assert_eq!(
        rv(session.get_session_info().unwrap_err()),
        RvError::TokenNotPresent
    );
    assert!(
        p.get_slots_with_token().expect("slot list").is_empty(),
        "no slot with a token while unplugged"
    );
    assert_eq!(
        rv(p.open_rw_session(s).unwrap_err()),
        RvError::TokenNotPresent
    );
    control.set_unplugged(false).expect("control");
    assert_eq!(
        rv(session.get_session_info().unwrap_err()),
        RvError::SessionHandleInvalid
    );
    let session = user_session(&p, s);
    let private = find(&session, "p256", ObjectClass::PRIVATE_KEY);
    verifier
        .verify(
            msg,
            &session
                .sign(&Mechanism::Ecdsa, private, &digest)
                .expect("sign after return"),
        )
        .expect("verify");

    // A timed unplug (its expiry is unit-tested with a synthetic clock); clearing the faults ends it early.
    control
        .unplug_for(Duration::from_secs(600))
        .expect("control");
    assert_eq!(
        rv(session.get_session_info().unwrap_err()),
        RvError::DeviceRemoved
    );
    assert_eq!(
        rv(p.open_rw_session(s).unwrap_err()),
        RvError::TokenNotPresent
    );
    // Re-initialising the library, as an application does after CKR_DEVICE_REMOVED, neither brings the device back
    // nor arms the unplug a second time (the counters below would say so), and the counters carry on.
    drop(session);
    p.finalize().expect("C_Finalize");
    let p = load();
    assert!(
        p.get_slots_with_token().expect("slot list").is_empty(),
        "still unplugged after C_Finalize and C_Initialize"
    );
    assert_eq!(
        rv(p.open_rw_session(s).unwrap_err()),
        RvError::TokenNotPresent
    );
    control.clear().expect("control");
    assert_eq!(p.get_slots_with_token().expect("slot list"), vec![s]);
    let session = user_session(&p, s);
    assert!(session.get_session_info().is_ok());

    let counters = control.counters().expect("counters");
    assert_eq!(counters.failures, 2);
    assert_eq!(counters.corrupted_signatures, 1);
    assert_eq!(counters.unplugs, 2);
    assert_eq!(counters.applied_seq, control.plan().seq);
}
