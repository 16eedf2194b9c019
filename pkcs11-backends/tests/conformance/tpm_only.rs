//! What only makes sense on the TPM: its profile's quirks, and the TPM going away mid-run and coming
//! back (through `scripts/tpm-rig down` / `up`) without a new process.

use std::sync::mpsc;

use signet_pkcs11::testing::{TokenBed, Tpm};
use signet_pkcs11::{Error, ErrorKind, KeyGenOptions, KeyType, Profile, RvClass, SignAlgorithm};

use crate::common::{TPM_GATE, exclusive, tpm, verify_spki};

#[test]
fn tpm_profile_is_detected_and_its_limits_hold() {
    let Some(f) = tpm() else { return };
    let p = f.token.profile();
    assert_eq!(p, Profile::Tpm2, "tpm2-pkcs11 detected as {p:?}");
    assert_eq!(p.effective_sessions(), Some(1));
    assert!(!p.supports_session_objects());
    // RSA beyond 3072 bits: the profile and the token's own mechanism info agree.
    let why = f.token.unsupported_reason(KeyType::Rsa4096).unwrap();
    assert!(why.contains("3072"), "{why}");
    assert!(f.token.supports(KeyType::Rsa3072));
    let e = f
        .token
        .session()
        .unwrap()
        .generate_key(&f.label("big"), KeyType::Rsa4096, KeyGenOptions::default())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported);
    assert!(e.to_string().contains("not supported by this token"), "{e}");
}

/// What the recovery ladder did, for the test's output.
#[derive(Debug, Default)]
struct Recovery {
    reopened: u32,
    reinitialized: u32,
    retried: u32,
}

/// Signs until it works, following each error's recovery (re-open the session; when a fresh session
/// fails the same way, re-initialise the library), at most `attempts` times.
fn recover_and_sign(
    token: &signet_pkcs11::Token,
    s: &mut signet_pkcs11::TokenSession,
    label: &str,
    attempts: u32,
) -> (Vec<u8>, Recovery) {
    let mut log = Recovery::default();
    let mut last: Option<Error> = None;
    for _ in 0..attempts {
        let escalate = last.as_ref().map(|e| (e.recovery(), e.kind()));
        match escalate {
            None => {}
            Some((RvClass::Retry, _)) => {
                log.retried += 1;
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            // A fresh session did not help (or the library is gone): re-initialise it.
            Some((RvClass::Reinitialize, _)) | Some((RvClass::ReopenSession, _))
                if log.reopened > log.reinitialized =>
            {
                token.reinitialize(s.generation()).unwrap();
                log.reinitialized += 1;
                if let Err(e) = s.reopen() {
                    last = Some(e);
                    continue;
                }
            }
            Some((RvClass::ReopenSession, _)) | Some((RvClass::Reinitialize, _)) => {
                log.reopened += 1;
                if let Err(e) = s.reopen() {
                    last = Some(e);
                    continue;
                }
            }
            Some((RvClass::Permanent, _)) => {
                panic!("a permanent error during recovery: {:?}", last)
            }
        }
        match s.sign_by_label(label, SignAlgorithm::EcdsaSha256, b"after the restart") {
            Ok(sig) => return (sig, log),
            Err(e) => {
                eprintln!(
                    "[tpm2] recovery step failed: {e} (recovery {:?})",
                    e.recovery()
                );
                assert!(e.is_transient(), "{e:?}");
                last = Some(e);
            }
        }
    }
    panic!("no recovery after {attempts} attempts: {last:?} ({log:?})");
}

#[test]
fn tpm_restart_mid_run_fails_transiently_and_recovers_in_process() {
    let _exclusive = exclusive(&TPM_GATE);
    let Some(bed) = Tpm::from_env("tpm restart") else {
        return;
    };
    let rig = bed.rig().cloned().expect(
        "the rig's environment names its script and directory (TPM_RIG_SCRIPT, TPM_RIG_DIR)",
    );
    let token = bed.open();
    let label = format!("{}restart", bed.key_prefix());
    let mut s = token.session().unwrap();
    s.generate_key(&label, KeyType::EcP256, KeyGenOptions::default())
        .unwrap();
    let spki = s.public_key_der(&label).unwrap();

    // A worker signs in a loop on its own session; the TPM goes away under it.
    let (tx, rx) = mpsc::channel();
    let worker = {
        let token = token.clone();
        let label = label.clone();
        std::thread::spawn(move || {
            let mut ws = token.session().unwrap();
            let key = ws.find_key(&label).unwrap();
            let mut ok = 0u64;
            let _ = tx.send(Ok(0));
            loop {
                match ws.sign(&key, SignAlgorithm::EcdsaSha256, b"in flight") {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        let _ = tx.send(Err((ok, e)));
                        return;
                    }
                }
                if ok > 1_000_000 {
                    let _ = tx.send(Ok(ok));
                    return;
                }
            }
        })
    };
    assert!(matches!(rx.recv().unwrap(), Ok(0)), "the worker started");
    rig.down().unwrap();
    let (signed, e) = match rx.recv().unwrap() {
        Err(x) => x,
        Ok(n) => panic!("{n} signatures and no failure although the TPM was gone"),
    };
    worker.join().unwrap();
    eprintln!(
        "[tpm2] in flight after {signed} signatures: {e} (kind {:?}, rv {:?}, recovery {:?})",
        e.kind(),
        e.rv(),
        e.recovery()
    );
    assert!(e.is_transient(), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::Transient, "{e:?}");
    // The main session fails too while the TPM is away.
    let e = s
        .sign_by_label(&label, SignAlgorithm::EcdsaSha256, b"while away")
        .unwrap_err();
    assert!(e.is_transient(), "{e:?}");

    rig.up().unwrap();
    let (sig, log) = recover_and_sign(&token, &mut s, &label, 6);
    eprintln!("[tpm2] recovered in process: {log:?}");
    verify_spki(
        &spki,
        KeyType::EcP256,
        SignAlgorithm::EcdsaSha256,
        b"after the restart",
        &sig,
        false,
    );
    // Later signatures, on this session and on new ones, succeed.
    for i in 0..5u8 {
        s.sign_by_label(&label, SignAlgorithm::EcdsaSha256, &[i])
            .unwrap();
    }
    let mut fresh = token.session().unwrap();
    let sig = fresh
        .sign_by_label(&label, SignAlgorithm::EcdsaSha256, b"fresh")
        .unwrap();
    verify_spki(
        &spki,
        KeyType::EcP256,
        SignAlgorithm::EcdsaSha256,
        b"fresh",
        &sig,
        false,
    );
    s.destroy_key(&label).unwrap();
}

/// Destroying a key on one session leaves the handles other sessions cached for other keys valid.
#[test]
fn tpm_handles_survive_destroying_other_keys() {
    let Some(f) = tpm() else { return };
    let mut s = f.token.session().unwrap();
    let (a, b) = (f.label("handle-a"), f.label("handle-b"));
    for l in [&a, &b] {
        s.generate_key(l, KeyType::EcP256, KeyGenOptions::default())
            .unwrap();
    }
    let kb = s.find_key(&b).unwrap();
    let spki_b = s.public_key_der(&b).unwrap();
    let mut other = f.token.session().unwrap();
    other.destroy_key(&a).unwrap();
    assert_eq!(
        other.find_key(&b).unwrap().private_handle(),
        kb.private_handle()
    );
    let sig = s.sign(&kb, SignAlgorithm::EcdsaSha256, b"m").unwrap();
    verify_spki(
        &spki_b,
        KeyType::EcP256,
        SignAlgorithm::EcdsaSha256,
        b"m",
        &sig,
        false,
    );
}
