use signet_pkcs11::{ErrorKind, KeyGenOptions, KeyType, RvClass, SignAlgorithm, Token};

use crate::common::{exclusive, fixture, verify};

#[test]
fn two_sessions_on_two_threads_sign_concurrently() {
    let Some(f) = fixture() else { return };
    f.token
        .session()
        .unwrap()
        .generate_key("shared", KeyType::EcP256, KeyGenOptions::default())
        .unwrap();
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let token = f.token.clone();
            std::thread::spawn(move || {
                let mut s = token.session().unwrap();
                let key = s.find_key("shared").unwrap();
                for i in 0..100 {
                    let msg = format!("thread {t} message {i}");
                    let sig = s
                        .sign(&key, SignAlgorithm::EcdsaSha256, msg.as_bytes())
                        .unwrap();
                    if i % 25 == 0 {
                        verify(
                            &mut s,
                            "shared",
                            SignAlgorithm::EcdsaSha256,
                            msg.as_bytes(),
                            &sig,
                            false,
                        );
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn keys_are_tied_to_their_session() {
    let Some(f) = fixture() else { return };
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
    let _exclusive = exclusive();
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
