//! The batching signer pipeline against real SoftHSM2 tokens.
//!
//! Faults are injected at the worker's session seam by [`rig::FaultyOpener`], a thin decorator over real token
//! sessions that also counts the signatures that reached the token. Signatures are checked with ring / the `p256`
//! crate; certificates with `openssl verify -x509_strict`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

/// The pipeline's own test rig: tokens behind a fault injector, the configuration, digests.
mod rig {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    use signet::pipeline::{
        HsmSession, Pipeline, PipelineConfig, PipelineKey, SessionOpener, TokenMember,
    };
    use signet_pkcs11::cryptoki::context::Function;
    use signet_pkcs11::cryptoki::error::{Error as CkError, RvError};
    use signet_pkcs11::{Error, Key, KeyGenOptions, KeyType, SignAlgorithm, Token, TokenSession};

    /// What the decorator injects, and what it counted.
    #[derive(Debug, Default)]
    pub struct Faults {
        /// C_Sign calls that reached the real token.
        pub signs: AtomicU64,
        /// Session re-opens.
        pub reopens: AtomicU64,
        /// Library re-initialisations asked for (counted, not performed: it would disturb the other tests' tokens).
        pub reinits: AtomicU64,
        /// Sign calls currently held at the gate.
        pub held: AtomicU64,
        /// Errors for the next sign calls, one each.
        pub next_errors: Mutex<VecDeque<RvError>>,
        /// While set, the device is "removed": sign, open and reopen fail with CKR_DEVICE_REMOVED.
        pub down: AtomicBool,
        /// While set, every signature comes back with one bit flipped (the call succeeds).
        pub corrupt: AtomicBool,
        /// Test-only panic injection at the session seam: when N > 0, the Nth sign call from now panics.
        pub panic_in: AtomicU64,
        /// Key look-ups by label.
        pub finds: AtomicU64,
        /// Sessions opened.
        pub opens: AtomicU64,
        gate: Mutex<bool>,
        gate_cv: Condvar,
    }

    fn rv_error(rv: RvError) -> Error {
        Error::pkcs11("injected fault", CkError::Pkcs11(rv, Function::Sign))
    }

    impl Faults {
        pub fn hold(&self) {
            *self.gate.lock().unwrap() = true;
        }
        pub fn release(&self) {
            *self.gate.lock().unwrap() = false;
            self.gate_cv.notify_all();
        }
        pub fn inject(&self, rv: RvError) {
            self.next_errors.lock().unwrap().push_back(rv);
        }
        /// Waits (bounded) until `n` sign calls are held at the gate.
        pub fn wait_held(&self, n: u64) {
            crate::support::wait::wait_until(
                "the workers reached the token",
                Duration::from_secs(30),
                || self.held.load(Ordering::SeqCst) >= n,
            );
        }
        fn before_sign(&self) -> Result<(), Error> {
            let mut g = self.gate.lock().unwrap();
            if *g {
                self.held.fetch_add(1, Ordering::SeqCst);
                while *g {
                    g = self.gate_cv.wait(g).unwrap();
                }
                self.held.fetch_sub(1, Ordering::SeqCst);
            }
            drop(g);
            if self
                .panic_in
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                == Ok(1)
            {
                panic!("injected by the test: the HSM worker panics inside C_Sign");
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(rv_error(RvError::DeviceRemoved));
            }
            if let Some(rv) = self.next_errors.lock().unwrap().pop_front() {
                return Err(rv_error(rv));
            }
            Ok(())
        }
    }

    pub struct FaultySession {
        inner: TokenSession,
        faults: Arc<Faults>,
    }

    impl HsmSession for FaultySession {
        fn find_key(&mut self, label: &str) -> Result<Key, Error> {
            self.faults.finds.fetch_add(1, Ordering::SeqCst);
            self.inner.find_key(label)
        }
        fn public_key_der(&mut self, label: &str) -> Result<Vec<u8>, Error> {
            self.inner.public_key_der(label)
        }
        fn forget_key(&mut self, label: &str) {
            self.inner.forget_key(label);
        }
        fn sign_digest(
            &mut self,
            key: &Key,
            alg: SignAlgorithm,
            digest: &[u8],
        ) -> Result<Vec<u8>, Error> {
            self.faults.before_sign()?;
            let mut r = self.inner.sign_digest(key, alg, digest);
            self.faults.signs.fetch_add(1, Ordering::SeqCst);
            if self.faults.corrupt.load(Ordering::SeqCst)
                && let Ok(sig) = r.as_mut()
                && let Some(b) = sig.get_mut(10)
            {
                *b ^= 1;
            }
            r
        }
        fn sign_message(
            &mut self,
            key: &Key,
            alg: SignAlgorithm,
            message: &[u8],
        ) -> Result<Vec<u8>, Error> {
            self.faults.before_sign()?;
            let mut r = self.inner.sign(key, alg, message);
            self.faults.signs.fetch_add(1, Ordering::SeqCst);
            if self.faults.corrupt.load(Ordering::SeqCst)
                && let Ok(sig) = r.as_mut()
                && let Some(b) = sig.get_mut(10)
            {
                *b ^= 1;
            }
            r
        }
        fn reopen(&mut self) -> Result<(), Error> {
            self.faults.reopens.fetch_add(1, Ordering::SeqCst);
            if self.faults.down.load(Ordering::SeqCst) {
                return Err(rv_error(RvError::DeviceRemoved));
            }
            self.inner.reopen()
        }
        fn generation(&self) -> u64 {
            self.inner.generation()
        }
    }

    #[derive(Debug)]
    pub struct FaultyOpener {
        pub token: Token,
        pub faults: Arc<Faults>,
    }

    impl SessionOpener for FaultyOpener {
        fn open(&self) -> Result<Box<dyn HsmSession>, Error> {
            if self.faults.down.load(Ordering::SeqCst) {
                return Err(rv_error(RvError::DeviceRemoved));
            }
            self.faults.opens.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(FaultySession {
                inner: self.token.session()?,
                faults: self.faults.clone(),
            }))
        }
        fn reinitialize(&self, _seen_generation: u64) -> Result<(), Error> {
            self.faults.reinits.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A fresh SoftHSM2 token with a P-256 key `label`; `None` (test skipped loudly) without SoftHSM2.
    pub fn token_with_key(label: &str, key_type: KeyType) -> Option<Token> {
        let hsm = signet_pkcs11::testing::SoftHsm::new()?;
        let token = hsm.open();
        token
            .session()
            .unwrap()
            .generate_key(label, key_type, KeyGenOptions::default())
            .unwrap();
        Some(token)
    }

    /// A member over `token` behind the fault decorator.
    pub fn member(name: &str, token: Token, sessions: usize) -> (TokenMember, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        let m = TokenMember {
            name: name.into(),
            opener: Arc::new(FaultyOpener {
                token,
                faults: faults.clone(),
            }),
            sessions,
        };
        (m, faults)
    }

    pub fn config() -> PipelineConfig {
        PipelineConfig {
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            cpu_threads: 4,
            ..PipelineConfig::default()
        }
    }

    /// Imports the same P-256 private key (and its public half) into `tokens` under `label`, so several tokens can
    /// stand behind one authority. Returns the SEC1 public point.
    pub fn import_shared_p256(tokens: &[&Token], label: &str) -> Vec<u8> {
        use ring::rand::SecureRandom as _;
        use signet_pkcs11::cryptoki::object::{Attribute, KeyType as CkKeyType, ObjectClass};
        let mut d = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut d).unwrap();
        let secret = p256::SecretKey::from_slice(&d).unwrap();
        let point = secret.public_key().to_sec1_bytes().to_vec();
        let mut ec_point = vec![0x04, point.len() as u8];
        ec_point.extend_from_slice(&point);
        let params = vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        let id = b"shared-key-id".to_vec();
        for t in tokens {
            let s = t.session().unwrap();
            s.with_raw_session(|raw| {
                raw.create_object(&[
                    Attribute::Class(ObjectClass::PRIVATE_KEY),
                    Attribute::KeyType(CkKeyType::EC),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Sign(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Id(id.clone()),
                    Attribute::EcParams(params.clone()),
                    Attribute::Value(d.to_vec()),
                ])
                .unwrap();
                raw.create_object(&[
                    Attribute::Class(ObjectClass::PUBLIC_KEY),
                    Attribute::KeyType(CkKeyType::EC),
                    Attribute::Token(true),
                    Attribute::Verify(true),
                    Attribute::Label(label.as_bytes().to_vec()),
                    Attribute::Id(id.clone()),
                    Attribute::EcParams(params.clone()),
                    Attribute::EcPoint(ec_point.clone()),
                ])
                .unwrap();
            })
            .unwrap();
        }
        point
    }

    pub fn digest(i: u64) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, &i.to_be_bytes())
            .as_ref()
            .to_vec()
    }

    /// Checks a raw r||s P-256 signature over a SHA-256 digest (independent of the pipeline's own check).
    pub fn verify_digest(spki: &[u8], digest: &[u8], sig: &[u8]) -> bool {
        use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
        let point = signet_pkcs11::spki_subject_public_key(spki).unwrap();
        let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
        let sig = p256::ecdsa::Signature::from_slice(sig).unwrap();
        vk.verify_prehash(digest, &sig).is_ok()
    }

    pub fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    /// The set-up most tests share: a SoftHSM2 token holding `label` (a `key_type` key), one worker session behind
    /// a fault injector, a pipeline started with [`config`], the key and a runtime. `None` when SoftHSM2 is missing.
    pub fn single_token(
        label: &str,
        key_type: KeyType,
    ) -> Option<(Pipeline, PipelineKey, Arc<Faults>, tokio::runtime::Runtime)> {
        let token = token_with_key(label, key_type)?;
        let (m, faults) = member("a", token, 1);
        let p = Pipeline::start(config(), vec![m]).unwrap();
        let key = p.key(label).unwrap();
        Some((p, key, faults, runtime()))
    }

    /// Waits (bounded) until `p` refuses new work because its shutdown has begun. Each look submits a digest whose
    /// deadline has already passed, which is refused at once: `ShuttingDown` once the pipeline is closed,
    /// `DeadlineExceeded` before; so a look is never queued nor signed.
    pub fn wait_closed(p: &Pipeline, key: &PipelineKey, rt: &tokio::runtime::Runtime) {
        let past = Instant::now();
        crate::support::wait::wait_until(
            "the pipeline's shutdown began (new work refused)",
            Duration::from_secs(30),
            || {
                let look =
                    rt.block_on(p.submit_digest(key, SignAlgorithm::EcdsaSha256, &digest(0), past));
                matches!(look, Err(signet::pipeline::PipelineError::ShuttingDown))
            },
        );
    }

    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }
}

mod token_key {
    use std::sync::Arc;

    use signet::keys::token::TokenKey;
    use signet::keys::{AuthorityKey, KeyError, SignatureScheme, verify_signature};
    use signet_pkcs11::KeyType;

    #[test]
    fn signs_from_many_threads_through_a_small_session_pool() {
        let Some(token) = super::rig::token_with_key("tk", KeyType::EcP256) else {
            return;
        };
        let key = Arc::new(TokenKey::open(token, "tk", 2).unwrap());
        let threads: Vec<_> = (0..6)
            .map(|t| {
                let key = key.clone();
                std::thread::spawn(move || {
                    for i in 0..20 {
                        let msg = format!("message {t}/{i}");
                        let sig = key
                            .sign(SignatureScheme::EcdsaP256Sha256, msg.as_bytes())
                            .unwrap();
                        verify_signature(
                            key.spki_der(),
                            SignatureScheme::EcdsaP256Sha256,
                            msg.as_bytes(),
                            &sig,
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let e = key
            .sign(SignatureScheme::EcdsaP384Sha384, b"x")
            .unwrap_err();
        assert!(matches!(e, KeyError::UnsupportedScheme { .. }), "{e}");
        assert!(!e.is_transient());
        assert!(TokenKey::open(key.token().clone(), "missing", 1).is_err());
    }
}

mod queue {
    use std::collections::HashSet;
    use std::future::Future as _;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use signet::keys::{AuthorityKey, SignatureScheme, verify_signature};
    use signet::pipeline::{Pipeline, PipelineConfig, PipelineError};
    use signet_pkcs11::{KeyType, SignAlgorithm};

    use super::rig::{
        config, digest, far, member, runtime, single_token, token_with_key, verify_digest,
    };

    /// Concurrent digest signatures spread over every session of the token: with C_Sign held at the gate, N
    /// submissions made at once are all seen inside C_Sign together, one per session. A worker that drained the
    /// queue into one batch would sign them one after another on its own session while the others idle (fewer calls
    /// at the gate). Counted, not timed.
    #[test]
    fn concurrent_signatures_spread_over_every_session() {
        const N: usize = 8;
        let Some(token) = token_with_key("spread", KeyType::EcP256) else {
            return;
        };
        let (m, faults) = member("a", token, N);
        let p = Pipeline::start(config(), vec![m]).unwrap();
        let key = p.key("spread").unwrap();
        let rt = runtime();
        crate::support::wait::wait_until(
            &format!("the {N} workers waited for jobs"),
            Duration::from_secs(30),
            || p.idle_workers() >= N,
        );
        faults.hold();
        let tasks: Vec<_> = (0..N as u64)
            .map(|i| rt.spawn(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(i), far())))
            .collect();
        faults.wait_held(N as u64);
        assert_eq!(faults.held.load(Ordering::SeqCst), N as u64);
        faults.release();
        for t in tasks {
            rt.block_on(t).unwrap().unwrap();
        }
        assert_eq!(faults.signs.load(Ordering::SeqCst), N as u64);
        p.shutdown();
    }

    /// Many threads (sync `sign`) and many async tasks (`submit_digest`) at once: every job gets exactly one answer,
    /// every answer is a valid signature, and the token made exactly as many signatures as there were jobs.
    #[test]
    fn every_job_answered_exactly_once_under_concurrency() {
        let Some(token) = token_with_key("k", KeyType::EcP256) else {
            return;
        };
        let (m, faults) = member("a", token, 2);
        let cfg = PipelineConfig {
            verify_digests: signet::pipeline::VerifyPolicy::Always,
            ..config()
        };
        let p = Pipeline::start(cfg, vec![m]).unwrap();
        let key = p.key("k").unwrap();

        const THREADS: u64 = 6;
        const PER_THREAD: u64 = 60;
        let sync_threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let key = key.clone();
                std::thread::spawn(move || {
                    let mut ok = 0u64;
                    for i in 0..PER_THREAD {
                        let msg = format!("sync {t} {i}");
                        let sig = key
                            .sign(SignatureScheme::EcdsaP256Sha256, msg.as_bytes())
                            .unwrap();
                        verify_signature(
                            key.spki_der(),
                            SignatureScheme::EcdsaP256Sha256,
                            msg.as_bytes(),
                            &sig,
                        )
                        .unwrap();
                        ok += 1;
                    }
                    ok
                })
            })
            .collect();

        const TASKS: u64 = 100;
        const PER_TASK: u64 = 5;
        let rt = runtime();
        let async_ok = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for t in 0..TASKS {
                let (p, key) = (p.clone(), key.clone());
                set.spawn(async move {
                    let mut answers = Vec::new();
                    for i in 0..PER_TASK {
                        let d = digest(t * 1000 + i);
                        let sig = p
                            .submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far())
                            .await
                            .unwrap();
                        assert!(verify_digest(key.spki_der(), &d, &sig));
                        answers.push((t, i));
                    }
                    answers
                });
            }
            let mut seen = HashSet::new();
            while let Some(r) = set.join_next().await {
                for a in r.unwrap() {
                    assert!(seen.insert(a), "answer {a:?} twice");
                }
            }
            seen.len() as u64
        });
        let sync_ok: u64 = sync_threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(sync_ok, THREADS * PER_THREAD);
        assert_eq!(async_ok, TASKS * PER_TASK);
        // No job was signed twice, none was lost.
        let total = THREADS * PER_THREAD + TASKS * PER_TASK;
        assert_eq!(faults.signs.load(Ordering::SeqCst), total);
        assert_eq!(p.token_status()[0].signatures, total);
        assert_eq!(p.digests_verified(), TASKS * PER_TASK);
        p.shutdown();
    }

    /// Sampled post-sign checks let corrupted digest signatures through until one check fails; from then on every
    /// signature is checked, so nothing corrupted leaves again. The default checks every one.
    #[test]
    fn a_failed_sampled_check_turns_checking_on_for_every_signature() {
        let Some(token) = token_with_key("k", KeyType::EcP256) else {
            return;
        };
        assert_eq!(
            PipelineConfig::default().verify_digests,
            signet::pipeline::VerifyPolicy::Always
        );
        let (m, faults) = member("a", token, 1);
        let cfg = PipelineConfig {
            verify_digests: signet::pipeline::VerifyPolicy::Sample(16),
            // This test is about sampling: the only token must stay in rotation whatever it returns.
            max_bad_signatures: u32::MAX,
            ..config()
        };
        let p = Pipeline::start(cfg, vec![m]).unwrap();
        let key = p.key("k").unwrap();
        faults.corrupt.store(true, Ordering::SeqCst);
        let rt = runtime();
        let (leaked, refused, leaked_after_first_refusal) = rt.block_on(async {
            let (mut leaked, mut refused, mut after) = (0u64, 0u64, 0u64);
            for i in 0..64u64 {
                let d = digest(i);
                match p
                    .submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far())
                    .await
                {
                    Ok(sig) => {
                        assert!(!verify_digest(key.spki_der(), &d, &sig), "corrupted");
                        leaked += 1;
                        if refused > 0 {
                            after += 1;
                        }
                    }
                    Err(PipelineError::PostSignCheck(_)) => refused += 1,
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            (leaked, refused, after)
        });
        assert!(
            leaked > 0 && leaked < 32,
            "sampling let {leaked} through before a check"
        );
        assert_eq!(leaked + refused, 64);
        assert_eq!(leaked_after_first_refusal, 0, "checking stays on");
        p.shutdown();
    }

    /// Every key type's digest signatures are checked, not only P-256's: a good signature passes, a corrupted one is
    /// refused. P-384 with SHA-384, RSA PKCS#1 v1.5 and PSS, Ed25519 (over the message).
    #[test]
    fn corrupted_signatures_of_every_key_type_are_refused() {
        let cases = [
            (KeyType::EcP384, vec![SignAlgorithm::EcdsaSha384]),
            (
                KeyType::Rsa2048,
                vec![SignAlgorithm::RsaPkcs1Sha256, SignAlgorithm::RsaPssSha256],
            ),
            (KeyType::Ed25519, vec![SignAlgorithm::Ed25519]),
        ];
        for (key_type, algs) in cases {
            let Some(token) = token_with_key("k", key_type) else {
                return;
            };
            let (m, faults) = member("a", token, 1);
            let p = Pipeline::start(config(), vec![m]).unwrap();
            let key = p.key("k").unwrap();
            let rt = runtime();
            for alg in algs {
                let data = match alg.hash() {
                    Some(h) => h.digest(b"a message").as_ref().to_vec(),
                    None => b"a message".to_vec(),
                };
                for corrupt in [false, true] {
                    faults.corrupt.store(corrupt, Ordering::SeqCst);
                    let r = rt.block_on(p.submit_digest(&key, alg, &data, far()));
                    match (corrupt, r) {
                        (false, Ok(_)) | (true, Err(PipelineError::PostSignCheck(_))) => {}
                        (c, other) => panic!("{key_type:?} {alg:?} corrupt={c}: {other:?}"),
                    }
                }
            }
            p.shutdown();
        }
    }

    /// Jobs whose deadline passed, or whose caller gave up, never reach the token.
    #[test]
    fn expired_and_abandoned_jobs_never_reach_the_token() {
        let Some((p, key, faults, rt)) = single_token("k", KeyType::EcP256) else {
            return;
        };

        faults.hold();
        let blocker =
            rt.spawn(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(0), far()));
        faults.wait_held(1);
        // Short deadlines, queued behind the held worker.
        let short = Instant::now() + Duration::from_millis(50);
        let expiring: Vec<_> = (1..=20)
            .map(|i| rt.spawn(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(i), short)))
            .collect();
        // Callers that give up: their futures are dropped.
        for i in 21..=30 {
            drop(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(i), far()));
        }
        // The thing under test: the short deadlines pass while their jobs wait in the queue.
        std::thread::sleep(
            short.saturating_duration_since(Instant::now()) + Duration::from_millis(1),
        );
        assert!(Instant::now() > short);
        faults.release();

        assert!(rt.block_on(blocker).unwrap().is_ok());
        for j in expiring {
            assert_eq!(
                rt.block_on(j).unwrap(),
                Err(PipelineError::DeadlineExceeded)
            );
        }
        // Only the blocker was signed.
        assert_eq!(faults.signs.load(Ordering::SeqCst), 1);
        // A job submitted past its deadline is refused at once.
        let past = Instant::now();
        let e = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(99), past))
            .unwrap_err();
        assert_eq!(e, PipelineError::DeadlineExceeded);
        assert!(e.is_retryable());
        // The pipeline still works.
        let d = digest(100);
        let sig = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far()))
            .unwrap();
        assert!(verify_digest(key.spki_der(), &d, &sig));
        assert_eq!(faults.signs.load(Ordering::SeqCst), 2);
        p.shutdown();
    }

    /// A full queue answers at once with a retryable `Overloaded`; what was accepted is signed.
    #[test]
    fn full_queue_refuses_with_overloaded() {
        let Some(token) = token_with_key("k", KeyType::EcP256) else {
            return;
        };
        let (m, faults) = member("a", token, 1);
        let cfg = PipelineConfig {
            queue_capacity: 16,
            batch: 4,
            ..config()
        };
        let p = Pipeline::start(cfg, vec![m]).unwrap();
        let key = p.key("k").unwrap();
        let rt = runtime();
        faults.hold();
        let first = rt.spawn(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(0), far()));
        faults.wait_held(1);
        // Poll each submission once: a refused one is ready at once (it never waits for the held worker), an
        // accepted one is pending.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut waiting = Vec::new();
        let mut refused = 0;
        for i in 1..=100u64 {
            let mut f =
                Box::pin(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(i), far()));
            match f.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(r) => {
                    let e = r.unwrap_err();
                    assert!(
                        matches!(e, PipelineError::Overloaded { capacity: 16 }),
                        "{e}"
                    );
                    assert!(e.is_retryable());
                    refused += 1;
                }
                std::task::Poll::Pending => waiting.push(f),
            }
        }
        // The queue holds 16 and the worker is held on the first job: everything else was refused.
        assert_eq!(waiting.len(), 16);
        assert_eq!(refused, 100 - 16);
        faults.release();
        assert!(rt.block_on(first).unwrap().is_ok());
        for f in waiting {
            assert!(rt.block_on(f).is_ok());
        }
        assert_eq!(faults.signs.load(Ordering::SeqCst), 17);
        p.shutdown();
    }

    /// Shutdown lets the batch in hand finish, answers everything still queued with `ShuttingDown`, and refuses
    /// new work; every job is answered exactly once.
    #[test]
    fn shutdown_answers_everything() {
        let Some((p, key, faults, rt)) = single_token("k", KeyType::EcP256) else {
            return;
        };
        faults.hold();
        let first = rt.spawn(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(0), far()));
        faults.wait_held(1);
        let queued: Vec<_> = (1..=50)
            .map(|i| rt.spawn(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(i), far())))
            .collect();
        let sync_waiters: Vec<_> = (0..4)
            .map(|i| {
                let key = key.clone();
                std::thread::spawn(move || key.sign(SignatureScheme::EcdsaP256Sha256, &[i]))
            })
            .collect();
        crate::support::wait::wait_until("54 jobs queued", Duration::from_secs(30), || {
            p.queued() >= 54
        });
        let stopper = {
            let p = p.clone();
            std::thread::spawn(move || p.shutdown())
        };
        super::rig::wait_closed(&p, &key, &rt);
        faults.release();
        stopper.join().unwrap();

        assert!(rt.block_on(first).unwrap().is_ok());
        let (mut ok, mut down) = (0, 0);
        for j in queued {
            match rt.block_on(j).unwrap() {
                Ok(_) => ok += 1,
                Err(PipelineError::ShuttingDown) => down += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        for t in sync_waiters {
            match t.join().unwrap() {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert_eq!(
                        PipelineError::in_chain(&e),
                        Some(PipelineError::ShuttingDown),
                        "{e}"
                    );
                    down += 1;
                }
            }
        }
        assert_eq!(ok + down, 54);
        assert_eq!(faults.signs.load(Ordering::SeqCst), 1 + ok);
        let e = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(7), far()))
            .unwrap_err();
        assert_eq!(e, PipelineError::ShuttingDown);
        // Idempotent.
        p.shutdown();
    }

    /// Requests that cannot be signed are refused before they are queued.
    #[test]
    fn malformed_requests_are_refused() {
        let Some((p, key, faults, rt)) = single_token("k", KeyType::EcP256) else {
            return;
        };
        let e = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &[0u8; 20], far()))
            .unwrap_err();
        assert!(matches!(e, PipelineError::InvalidRequest(_)), "{e}");
        assert!(!e.is_retryable());
        let e = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::RsaPkcs1Sha256, &[0u8; 32], far()))
            .unwrap_err();
        assert!(matches!(e, PipelineError::InvalidRequest(_)), "{e}");
        assert!(matches!(p.key("nope"), Err(PipelineError::Key(_))));
        assert_eq!(faults.signs.load(Ordering::SeqCst), 0);
        p.shutdown();
    }

    /// Ed25519 ships the message (the token hashes); checked with ring.
    #[test]
    fn ed25519_signs_the_message() {
        let Some((p, key, _faults, rt)) = single_token("ed", KeyType::Ed25519) else {
            return;
        };
        let msg = b"an Ed25519 message of any length".to_vec();
        let sig = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::Ed25519, &msg, far()))
            .unwrap();
        verify_signature(key.spki_der(), SignatureScheme::Ed25519, &msg, &sig).unwrap();
        let sig = key.sign(SignatureScheme::Ed25519, &msg).unwrap();
        verify_signature(key.spki_der(), SignatureScheme::Ed25519, &msg, &sig).unwrap();
        p.shutdown();
    }
}

mod faults {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use signet::keys::AuthorityKey;
    use signet::pipeline::{Pipeline, PipelineError};
    use signet_pkcs11::cryptoki::error::RvError;
    use signet_pkcs11::{KeyType, SignAlgorithm};

    use super::rig::{
        config, digest, far, import_shared_p256, member, runtime, single_token, verify_digest,
    };

    /// A transient error injected into one session is retried on a fresh session and the job succeeds.
    #[test]
    fn transient_error_is_retried_on_a_fresh_session() {
        let Some((p, key, faults, rt)) = single_token("k", KeyType::EcP256) else {
            return;
        };
        faults.inject(RvError::SessionHandleInvalid);
        let d = digest(1);
        let sig = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far()))
            .unwrap();
        assert!(verify_digest(key.spki_der(), &d, &sig));
        assert_eq!(faults.reopens.load(Ordering::SeqCst), 1);
        assert_eq!(p.token_status()[0].failures, 1);
        assert!(p.token_status()[0].healthy);

        // Device removed: the library is re-initialised (counted by the decorator), the session re-opened.
        faults.inject(RvError::DeviceRemoved);
        let sig = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far()))
            .unwrap();
        assert!(verify_digest(key.spki_der(), &d, &sig));
        assert_eq!(faults.reinits.load(Ordering::SeqCst), 1);
        assert_eq!(faults.reopens.load(Ordering::SeqCst), 2);
        p.shutdown();
    }

    /// A permanent error fails the job with a clear, non-retryable error, and the worker keeps serving.
    #[test]
    fn permanent_error_is_reported() {
        let Some((p, key, faults, rt)) = single_token("k", KeyType::EcP256) else {
            return;
        };
        faults.inject(RvError::KeyFunctionNotPermitted);
        let e = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(1), far()))
            .unwrap_err();
        assert!(matches!(e, PipelineError::Key(_)), "{e}");
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("cannot sign"), "{e}");
        assert_eq!(faults.reopens.load(Ordering::SeqCst), 0);
        let d = digest(2);
        let sig = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far()))
            .unwrap();
        assert!(verify_digest(key.spki_der(), &d, &sig));
        p.shutdown();
    }

    /// Two tokens hold the same key. One fails (device removed, sessions cannot be re-opened): it is taken out of
    /// rotation, its jobs go to the other, every job succeeds; when it comes back it is probed back into rotation.
    #[test]
    fn failing_token_is_taken_out_and_the_rest_carry_the_load() {
        let Some(ta) = signet_pkcs11::testing::SoftHsm::new().map(|h| h.open()) else {
            return;
        };
        let Some(tb) = signet_pkcs11::testing::SoftHsm::new().map(|h| h.open()) else {
            return;
        };
        import_shared_p256(&[&ta, &tb], "shared");
        let (ma, fa) = member("a", ta, 2);
        let (mb, fb) = member("b", tb, 2);
        let p = Pipeline::start(config(), vec![ma, mb]).unwrap();
        let key = p.key("shared").unwrap();
        let rt = runtime();
        let run = |from: u64, n: u64| {
            rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for i in from..from + n {
                    let (p, key) = (p.clone(), key.clone());
                    set.spawn(async move {
                        let d = digest(i);
                        let sig = p
                            .submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far())
                            .await
                            .unwrap();
                        assert!(verify_digest(key.spki_der(), &d, &sig));
                    });
                }
                while let Some(r) = set.join_next().await {
                    r.unwrap();
                }
            })
        };
        run(0, 200);
        let a_before = fa.signs.load(Ordering::SeqCst);
        fa.down.store(true, Ordering::SeqCst);
        run(1000, 400);
        let status = p.token_status();
        assert!(!status[0].healthy, "{status:?}");
        assert!(status[1].healthy, "{status:?}");
        // Token a made no good signature while down: every job was carried by b.
        assert_eq!(status[0].signatures, a_before);
        assert_eq!(
            status[0].signatures + status[1].signatures,
            200 + 400,
            "{status:?}"
        );
        assert!(fb.signs.load(Ordering::SeqCst) >= 400);

        // The device comes back: a probe puts the token back into rotation.
        fa.down.store(false, Ordering::SeqCst);
        crate::support::wait::wait_until("token a came back", Duration::from_secs(30), || {
            p.token_status()[0].healthy
        });
        // Both down: jobs are answered Unavailable at once rather than queued forever.
        fa.down.store(true, Ordering::SeqCst);
        fb.down.store(true, Ordering::SeqCst);
        let e = loop {
            match rt.block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(5), far()))
            {
                Ok(_) => continue, // a worker had not noticed yet
                Err(e) => break e,
            }
        };
        assert!(matches!(e, PipelineError::Unavailable { .. }), "{e}");
        assert!(e.is_retryable());
        p.shutdown();
    }
}

mod issuance {
    use std::io::Write as _;
    use std::process::Command;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
    use signet::keys::AuthorityKey;
    use signet::pipeline::{
        DelegatedConfig, Pipeline, SigningMode, SvidError, X509Svid, X509SvidIssuer,
    };
    use signet::spiffe::TrustDomain;
    use signet::x509::{Authority, RootRequest};
    use signet_pkcs11::KeyType;

    use super::rig::{config, member, runtime, token_with_key};

    fn csr(path: &str) -> Vec<u8> {
        csr_and_key(path).0
    }

    /// A CSR for `spiffe://example.org/<path>` and its PKCS#8 private key.
    fn csr_and_key(path: &str) -> (Vec<u8>, Vec<u8>) {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://example.org/{path}").try_into().unwrap(),
        )];
        let der = params.serialize_request(&kp).unwrap().der().to_vec();
        (der, kp.serialize_der())
    }

    /// The `spiffe` crate's view of the SVID (SAN, KeyUsage, BasicConstraints, ID syntax, key match).
    fn spiffe_check(svid: &X509Svid, key_pkcs8: &[u8], path: &str) {
        let mut chain = svid.cert_der.clone();
        for c in &svid.chain {
            chain.extend_from_slice(c);
        }
        let parsed = spiffe::X509Svid::parse_from_der(&chain, key_pkcs8).unwrap();
        assert_eq!(
            parsed.spiffe_id().to_string(),
            format!("spiffe://example.org/{path}")
        );
    }

    fn pem(der: &[u8]) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
    }

    /// `openssl verify -x509_strict` of the SVID against the roots, with its chain as untrusted intermediates.
    fn openssl_verify(roots: &[Vec<u8>], svid: &X509Svid) {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, ders: &[Vec<u8>]| {
            let path = dir.path().join(name);
            let mut f = std::fs::File::create(&path).unwrap();
            for d in ders {
                f.write_all(pem(d).as_bytes()).unwrap();
            }
            path
        };
        let root = write("root.pem", roots);
        let leaf = write("leaf.pem", std::slice::from_ref(&svid.cert_der));
        let mut cmd = Command::new("openssl");
        cmd.args(["verify", "-x509_strict", "-purpose", "any", "-CAfile"])
            .arg(&root);
        if !svid.chain.is_empty() {
            cmd.arg("-untrusted").arg(write("chain.pem", &svid.chain));
        }
        let out = cmd.arg(&leaf).output().expect("running openssl");
        assert!(
            out.status.success(),
            "openssl verify failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn root_through_pipeline(p: &Pipeline) -> Authority {
        let key: Arc<dyn AuthorityKey> = Arc::new(p.key("root").unwrap());
        let mut subject = DistinguishedName::new();
        subject.push(DnType::OrganizationName, "signet test");
        subject.push(DnType::CommonName, "signet test root");
        let req = RootRequest {
            trust_domain: TrustDomain::parse("example.org").unwrap(),
            subject,
            ttl: Duration::from_secs(24 * 3600),
            path_len: None,
        };
        // PipelineKey::sign blocks its thread: run it off the test's async runtime.
        Authority::self_signed_root(key, &req, time::OffsetDateTime::now_utc()).unwrap()
    }

    fn in_60s() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    /// A CSR for `path` whose signature does not verify.
    fn bad_csr(path: &str) -> Vec<u8> {
        let mut bad = csr(path);
        let n = bad.len();
        bad[n - 5] ^= 0x01;
        bad
    }

    /// A direct-mode issuer on a fresh SoftHSM2 token with `sessions` worker sessions, its root signed through the
    /// pipeline; `None` without SoftHSM2.
    fn direct_issuer(
        sessions: usize,
    ) -> Option<(
        Pipeline,
        Arc<super::rig::Faults>,
        tokio::runtime::Runtime,
        X509SvidIssuer,
    )> {
        let token = token_with_key("root", KeyType::EcP256)?;
        let (m, faults) = member("a", token, sessions);
        let p = Pipeline::start(config(), vec![m]).unwrap();
        let root = root_through_pipeline(&p);
        let rt = runtime();
        let issuer = rt
            .block_on(X509SvidIssuer::start(
                root,
                SigningMode::Direct,
                p.cpu().clone(),
            ))
            .unwrap();
        Some((p, faults, rt, issuer))
    }

    #[test]
    fn direct_mode_svids_verify_with_openssl() {
        let Some((p, faults, rt, issuer)) = direct_issuer(2) else {
            return;
        };
        let svids = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..40 {
                let issuer = issuer.clone();
                set.spawn(async move {
                    let path = format!("w/{i}");
                    let (der, key) = csr_and_key(&path);
                    let svid = issuer
                        .issue_x509_svid(der, Duration::from_secs(600), in_60s())
                        .await;
                    (svid, key, path)
                });
            }
            let mut out = Vec::new();
            while let Some(r) = set.join_next().await {
                let (svid, key, path) = r.unwrap();
                let svid = svid.unwrap();
                spiffe_check(&svid, &key, &path);
                out.push(svid);
            }
            out
        });
        assert_eq!(svids.len(), 40);
        // The root and every leaf were signed by the token.
        assert_eq!(faults.signs.load(std::sync::atomic::Ordering::SeqCst), 41);
        for s in &svids {
            assert!(s.chain.is_empty());
        }
        for s in svids.iter().take(5) {
            openssl_verify(&issuer.roots(), s);
        }
        // A CSR whose signature does not verify is refused, not signed.
        let e = rt
            .block_on(issuer.issue_x509_svid(bad_csr("w/bad"), Duration::from_secs(600), in_60s()))
            .unwrap_err();
        assert!(matches!(e, SvidError::Issue(_)), "{e}");
        assert!(!e.is_retryable());
        assert_eq!(faults.signs.load(std::sync::atomic::Ordering::SeqCst), 41);
        p.shutdown();
    }

    /// Direct mode holds no CPU thread while the token signs: the certificate is built, its signature queued, and
    /// the certificate finished when the signature arrives. A batch answers every request, in order, with its own
    /// outcome; faults of the token reach the request they hit; a shutdown loses no signature made.
    #[test]
    fn direct_mode_batch_answers_each_request_in_order() {
        use signet::pipeline::PipelineError;
        use signet::x509::IssueError;
        use signet_pkcs11::cryptoki::error::RvError;
        use std::sync::atomic::Ordering;

        // One session, so that a held signature holds the whole batch behind it.
        let Some((p, faults, rt, issuer)) = direct_issuer(1) else {
            return;
        };
        let ttl = Duration::from_secs(600);
        let bad = bad_csr("w/bad");
        let (good0, key0) = csr_and_key("w/0");
        let (good3, key3) = csr_and_key("w/3");
        let signs_before = faults.signs.load(Ordering::SeqCst);
        let results = rt.block_on(issuer.issue_x509_svids(
            vec![
                (good0, ttl),
                (bad, ttl),
                (csr("w/2"), Duration::from_secs(100 * 3600)),
                (good3, ttl),
            ],
            in_60s(),
        ));
        assert_eq!(results.len(), 4);
        let mut results = results.into_iter();
        let first = results.next().unwrap().unwrap();
        spiffe_check(&first, &key0, "w/0");
        openssl_verify(&issuer.roots(), &first);
        match results.next().unwrap() {
            Err(SvidError::Issue(IssueError::Csr(_))) => {}
            other => panic!("a CSR with a bad signature: {other:?}"),
        }
        // A TTL beyond the root's life: cut at the root's NotAfter (the TTL rule, as in delegated mode).
        let long = results.next().unwrap().unwrap();
        let root_not_after = x509_parser::parse_x509_certificate(&issuer.roots()[0])
            .unwrap()
            .1
            .validity()
            .not_after
            .timestamp();
        assert_eq!(long.not_after.unix_timestamp(), root_not_after);
        openssl_verify(&issuer.roots(), &long);
        let last = results.next().unwrap().unwrap();
        spiffe_check(&last, &key3, "w/3");
        openssl_verify(&issuer.roots(), &last);
        // Only the three good requests reached the token.
        assert_eq!(faults.signs.load(Ordering::SeqCst), signs_before + 3);

        // A token that corrupts signatures: the post-sign check refuses every certificate.
        faults.corrupt.store(true, Ordering::SeqCst);
        let results = rt.block_on(issuer.issue_x509_svids(
            (0..3).map(|i| (csr(&format!("c/{i}")), ttl)).collect(),
            in_60s(),
        ));
        for r in results {
            match r {
                Err(SvidError::Issue(IssueError::PostSignCheck(_))) => {}
                other => panic!("a corrupted signature: {other:?}"),
            }
        }
        faults.corrupt.store(false, Ordering::SeqCst);
        // Three failed checks (the default threshold) took the token out of rotation; with the fault gone, its
        // probe signature verifies and brings it back.
        let st = &p.token_status()[0];
        assert_eq!(st.bad_signatures, 3, "{st:?}");
        crate::support::wait::wait_until(
            "the token came back after its probe",
            Duration::from_secs(30),
            || p.token_status()[0].healthy,
        );

        // A permanent token error fails the request it hit, as a pipeline error; the next one is issued.
        faults.inject(RvError::KeyFunctionNotPermitted);
        let e = rt
            .block_on(issuer.issue_x509_svid(csr("p/0"), ttl, in_60s()))
            .unwrap_err();
        assert!(
            matches!(e, SvidError::Pipeline(PipelineError::Key(_))),
            "{e}"
        );
        assert!(!e.is_retryable());
        let ok = rt.block_on(issuer.issue_x509_svid(csr("p/1"), ttl, in_60s()));
        assert!(ok.is_ok(), "{ok:?}");

        // Shutdown while the token holds a signature: every request is answered, and every signature the token
        // made becomes a certificate.
        let signs_before = faults.signs.load(Ordering::SeqCst);
        faults.hold();
        let batch = rt.spawn(issuer.issue_x509_svids(
            (0..20).map(|i| (csr(&format!("s/{i}")), ttl)).collect(),
            in_60s(),
        ));
        faults.wait_held(1);
        let stopper = {
            let p = p.clone();
            std::thread::spawn(move || p.shutdown())
        };
        super::rig::wait_closed(&p, &p.key("root").unwrap(), &rt);
        faults.release();
        stopper.join().unwrap();
        let results = rt.block_on(batch).unwrap();
        assert_eq!(results.len(), 20);
        let mut issued = 0;
        for r in &results {
            match r {
                Ok(svid) => {
                    issued += 1;
                    openssl_verify(&issuer.roots(), svid);
                }
                Err(SvidError::Pipeline(PipelineError::ShuttingDown)) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(issued >= 1, "the held signature was lost");
        assert_eq!(
            faults.signs.load(Ordering::SeqCst) - signs_before,
            issued,
            "every signature made became a certificate"
        );
    }

    #[test]
    fn delegated_mode_svids_chain_through_a_rotating_intermediate() {
        let Some(token) = token_with_key("root", KeyType::EcP256) else {
            return;
        };
        let (m, faults) = member("a", token, 1);
        let p = Pipeline::start(config(), vec![m]).unwrap();
        let root = root_through_pipeline(&p);
        let rt = runtime();
        let cfg = DelegatedConfig {
            intermediate_ttl: Duration::from_secs(3600),
            ..DelegatedConfig::default()
        };
        let issuer = rt
            .block_on(X509SvidIssuer::start(
                root,
                SigningMode::Delegated(cfg),
                p.cpu().clone(),
            ))
            .unwrap();
        let signs = || faults.signs.load(std::sync::atomic::Ordering::SeqCst);
        // Root + first intermediate.
        assert_eq!(signs(), 2);
        let first_int = issuer.current_intermediate().unwrap();
        let (a_csr, a_key) = csr_and_key("w/a");
        let a = rt
            .block_on(issuer.issue_x509_svid(a_csr, Duration::from_secs(600), in_60s()))
            .unwrap();
        assert_eq!(a.chain, vec![first_int.clone()]);
        spiffe_check(&a, &a_key, "w/a");
        // Leaves are signed in software: the token signed nothing more.
        assert_eq!(signs(), 2);
        openssl_verify(&issuer.roots(), &a);

        // Rotation while requests are in flight: none fails, each chains to the intermediate that signed it.
        let svids = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..60 {
                let issuer = issuer.clone();
                set.spawn(async move {
                    issuer
                        .issue_x509_svid(csr(&format!("w/{i}")), Duration::from_secs(600), in_60s())
                        .await
                });
            }
            issuer.rotate().await.unwrap();
            let mut out = Vec::new();
            while let Some(r) = set.join_next().await {
                out.push(r.unwrap().unwrap());
            }
            out
        });
        let second_int = issuer.current_intermediate().unwrap();
        assert_ne!(first_int, second_int);
        assert_eq!(signs(), 3);
        for s in svids.iter().take(3) {
            openssl_verify(&issuer.roots(), s);
        }
        let b = rt
            .block_on(issuer.issue_x509_svid(csr("w/b"), Duration::from_secs(600), in_60s()))
            .unwrap();
        assert_eq!(b.chain, vec![second_int]);
        openssl_verify(&issuer.roots(), &b);
        // Leaf TTLs are capped at the intermediate's remaining life.
        let c = rt
            .block_on(issuer.issue_x509_svid(csr("w/c"), Duration::from_secs(100 * 3600), in_60s()))
            .unwrap();
        assert!(c.not_after <= time::OffsetDateTime::now_utc() + Duration::from_secs(3600));
        openssl_verify(&issuer.roots(), &c);
        p.shutdown();
    }

    /// With `rotate_at = 0`, the intermediate is due at once: the next request starts a background rotation.
    #[test]
    fn delegated_mode_rotates_on_its_own_when_due() {
        let Some(token) = token_with_key("root", KeyType::EcP256) else {
            return;
        };
        let (m, _faults) = member("a", token, 1);
        let p = Pipeline::start(config(), vec![m]).unwrap();
        let root = root_through_pipeline(&p);
        let rt = runtime();
        let cfg = DelegatedConfig {
            rotate_at: 0.0,
            ..DelegatedConfig::default()
        };
        let issuer = rt
            .block_on(X509SvidIssuer::start(
                root,
                SigningMode::Delegated(cfg),
                p.cpu().clone(),
            ))
            .unwrap();
        let first = issuer.current_intermediate().unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        let mut i = 0;
        while issuer.current_intermediate().unwrap() == first {
            assert!(Instant::now() < until, "no rotation happened");
            let s = rt
                .block_on(issuer.issue_x509_svid(
                    csr(&format!("w/{i}")),
                    Duration::from_secs(60),
                    in_60s(),
                ))
                .unwrap();
            openssl_verify(&issuer.roots(), &s);
            i += 1;
            // Paces the load while the rotation clock (real time, a short lifetime) runs; not a synchronisation.
            std::thread::sleep(Duration::from_millis(5));
        }
        p.shutdown();
    }
}

/// A token that returns bad signatures, a worker that panics, a reply held past its deadline, a key handle the token
/// forgot: every request is answered, nothing that fails an independent verifier leaves, and the pipeline signs on.
mod hardening {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, OnceLock};
    use std::time::{Duration, Instant};

    use signet::keys::{AuthorityKey, SignatureScheme};
    use signet::pipeline::{Pipeline, PipelineConfig, PipelineError, PipelineKey, TokenStatus};
    use signet_pkcs11::cryptoki::error::RvError;
    use signet_pkcs11::{KeyType, SignAlgorithm};

    use super::rig::{
        config, digest, far, import_shared_p256, member, runtime, single_token, verify_digest,
    };

    /// The process's metrics, rendered in the Prometheus text format (a recorder installed once per test binary).
    fn metrics_text() -> String {
        static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
        HANDLE
            .get_or_init(|| {
                let recorder =
                    metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
                let handle = recorder.handle();
                metrics::set_global_recorder(recorder).expect("the only recorder of this binary");
                handle
            })
            .render()
    }

    /// The value of the sample `name{token="<token>"}` in the rendered metrics.
    fn sample(name: &str, token: &str) -> Option<f64> {
        let prefix = format!("{name}{{token=\"{token}\"}} ");
        metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().parse().unwrap()))
    }

    fn wait_for(what: &str, cond: impl FnMut() -> bool) {
        crate::support::wait::wait_until(what, Duration::from_secs(30), cond);
    }

    fn status_of(p: &Pipeline, name: &str) -> TokenStatus {
        p.token_status()
            .into_iter()
            .find(|t| t.name == name)
            .unwrap()
    }

    /// `n` concurrent digest signatures; each answer is a signature that verifies with the `p256` crate or a
    /// refusal by the post-sign check (anything else fails the test). Returns (good, refused).
    fn load(
        rt: &tokio::runtime::Runtime,
        p: &Pipeline,
        key: &PipelineKey,
        from: u64,
        n: u64,
    ) -> (u64, u64) {
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for i in from..from + n {
                let (p, key) = (p.clone(), key.clone());
                set.spawn(async move {
                    let d = digest(i);
                    match p
                        .submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far())
                        .await
                    {
                        Ok(sig) => {
                            assert!(
                                verify_digest(key.spki_der(), &d, &sig),
                                "a signature that does not verify left the pipeline"
                            );
                            true
                        }
                        Err(PipelineError::PostSignCheck(_)) => false,
                        Err(e) => panic!("unexpected answer: {e}"),
                    }
                });
            }
            let (mut good, mut refused) = (0, 0);
            while let Some(r) = set.join_next().await {
                if r.unwrap() {
                    good += 1;
                } else {
                    refused += 1;
                }
            }
            (good, refused)
        })
    }

    /// Two tokens hold the same key; one starts returning corrupted signatures. After `max_bad_signatures` failed
    /// post-sign checks it leaves rotation (status, metrics and the refusal reason say why), no bad signature ever
    /// leaves, the healthy token carries the load, and when the fault is cleared a probe signature brings it back.
    /// With both tokens bad, callers get `Unavailable` naming the post-sign check.
    #[test]
    fn a_token_returning_bad_signatures_leaves_rotation_until_a_probe_verifies() {
        let Some(ta) = signet_pkcs11::testing::SoftHsm::new().map(|h| h.open()) else {
            return;
        };
        let Some(tb) = signet_pkcs11::testing::SoftHsm::new().map(|h| h.open()) else {
            return;
        };
        import_shared_p256(&[&ta, &tb], "shared");
        let (ma, fa) = member("corrupting", ta, 2);
        let (mb, fb) = member("healthy", tb, 2);
        metrics_text();
        let cfg = PipelineConfig {
            max_bad_signatures: 3,
            ..config()
        };
        let p = Pipeline::start(cfg, vec![ma, mb]).unwrap();
        let key = p.key("shared").unwrap();
        let rt = runtime();
        let (good, refused) = load(&rt, &p, &key, 0, 100);
        assert_eq!((good, refused), (100, 0));
        assert_eq!(
            sample("signet_pipeline_token_healthy", "corrupting"),
            Some(1.0)
        );

        fa.corrupt.store(true, Ordering::SeqCst);
        // Load until the corrupting token is out (bounded): every answer verifies or is refused.
        let mut from = 1000;
        let mut refused_total = 0;
        while status_of(&p, "corrupting").healthy {
            assert!(
                from < 1000 + 50 * 100,
                "the corrupting token never left rotation"
            );
            let (_, refused) = load(&rt, &p, &key, from, 100);
            refused_total += refused;
            from += 100;
        }
        let st = status_of(&p, "corrupting");
        assert!(st.bad_signatures >= 3, "{st:?}");
        assert_eq!(
            refused_total, st.bad_signatures,
            "each refusal counted once"
        );
        let reason = st.reason.clone().unwrap();
        assert!(
            reason.contains("signatures failed the post-sign check"),
            "{reason}"
        );
        assert!(status_of(&p, "healthy").healthy);
        assert_eq!(
            sample("signet_pipeline_token_healthy", "corrupting"),
            Some(0.0)
        );
        assert_eq!(
            sample("signet_pipeline_token_bad_signatures_total", "corrupting"),
            Some(st.bad_signatures as f64)
        );
        assert_eq!(
            sample("signet_pipeline_token_healthy", "healthy"),
            Some(1.0)
        );

        // Out of rotation it signs no job: the healthy token carries all of them, and every one verifies.
        let a_jobs = status_of(&p, "corrupting").signatures;
        let b_jobs = status_of(&p, "healthy").signatures;
        let (good, refused) = load(&rt, &p, &key, 100_000, 300);
        assert_eq!((good, refused), (300, 0));
        assert_eq!(status_of(&p, "corrupting").signatures, a_jobs);
        assert_eq!(status_of(&p, "healthy").signatures, b_jobs + 300);
        // Its probes keep failing while the fault lasts: it stays out.
        let probes = fa.signs.load(Ordering::SeqCst);
        wait_for("a failed probe", || {
            fa.signs.load(Ordering::SeqCst) > probes
        });
        assert!(!status_of(&p, "corrupting").healthy);

        // Certificates and JWTs count too: signatures checked by the issuance core, here a JWT-SVID signer on the
        // same key, whose check fails when the healthy token also turns bad.
        fb.corrupt.store(true, Ordering::SeqCst);
        let jwt = signet::jwt::JwtIssuer::new(
            Arc::new(key.clone()),
            signet::spiffe::TrustDomain::parse("example.org").unwrap(),
            Some("kid".into()),
            None,
            Duration::from_secs(300),
        )
        .unwrap();
        let id = signet::spiffe::SpiffeId::parse("spiffe://example.org/w").unwrap();
        let mut jwt_refused = 0;
        let e = loop {
            assert!(jwt_refused < 100, "the second token never left rotation");
            match jwt.issue(&id, &["aud".into()], Duration::from_secs(60), time_now()) {
                Err(signet::jwt::JwtError::PostSignCheck(_)) => jwt_refused += 1,
                Err(e) => break e,
                Ok(token) => panic!("a JWT signed by a corrupting token left: {token}"),
            }
        };
        assert_eq!(jwt_refused, 3, "the threshold, counted from the JWT checks");
        let st = status_of(&p, "healthy");
        assert_eq!(st.bad_signatures, 3, "{st:?}");
        assert!(e.to_string().contains("out of rotation"), "{e}");
        // Every token out: callers are refused at once, told why.
        let e = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(7), far()))
            .unwrap_err();
        assert!(matches!(e, PipelineError::Unavailable { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("signatures failed the post-sign check"),
            "{e}"
        );

        // The faults are cleared: the probes verify and bring both back; both sign again.
        fa.corrupt.store(false, Ordering::SeqCst);
        fb.corrupt.store(false, Ordering::SeqCst);
        wait_for("both tokens back in rotation", || {
            p.token_status()
                .iter()
                .all(|t| t.healthy && t.reason.is_none())
        });
        assert_eq!(
            sample("signet_pipeline_token_healthy", "corrupting"),
            Some(1.0)
        );
        let (good, refused) = load(&rt, &p, &key, 200_000, 300);
        assert_eq!((good, refused), (300, 0));
        assert!(
            status_of(&p, "corrupting").signatures > a_jobs,
            "the probed token signs again"
        );
        p.shutdown();
    }

    fn time_now() -> ::time::OffsetDateTime {
        ::time::OffsetDateTime::now_utc()
    }

    /// A worker that panics inside C_Sign answers every job it held (`Internal`), none hangs, and a replacement
    /// worker with a new session keeps signing. A sync signer (a CPU thread in `AuthorityKey::sign`) is answered
    /// too.
    #[test]
    fn a_panicking_worker_answers_every_job_and_is_replaced() {
        let Some((p, key, faults, rt)) = single_token("k", KeyType::EcP256) else {
            return;
        };
        let opens = faults.opens.load(Ordering::SeqCst);
        // Hold the worker at the token with one job, queue 63 more behind it, then make the 4th sign of the next
        // batch panic.
        faults.hold();
        let request = |i: u64| {
            let (p, key) = (p.clone(), key.clone());
            async move {
                let d = digest(i);
                let r = tokio::time::timeout(
                    Duration::from_secs(60),
                    p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far()),
                )
                .await
                .expect("a request hung");
                if let Ok(sig) = &r {
                    assert!(verify_digest(key.spki_der(), &d, sig));
                }
                r.map(|_| ())
            }
        };
        let blocker = rt.spawn(request(0));
        faults.wait_held(1);
        let rest: Vec<_> = (1..64u64).map(|i| rt.spawn(request(i))).collect();
        wait_for("63 jobs queued behind the held one", || p.queued() == 63);
        // The held call is the 1st; the worker then takes the other 63 as one batch, and its 4th sign panics.
        faults.panic_in.store(5, Ordering::SeqCst);
        faults.release();
        let answers = rt.block_on(async move {
            let mut out = vec![blocker.await.unwrap()];
            for t in rest {
                out.push(t.await.unwrap());
            }
            out
        });
        assert_eq!(answers.len(), 64, "one answer per request");
        let internal = answers
            .iter()
            .filter(|r| matches!(r, Err(PipelineError::Internal(_))))
            .count();
        // The job in the panicking call, and the batch's jobs not yet signed (59), are answered Internal.
        assert!(internal >= 60, "{internal} answered Internal");
        for r in &answers {
            assert!(
                matches!(r, Ok(()) | Err(PipelineError::Internal(_))),
                "{r:?}"
            );
        }
        // The replacement worker opened a new session and signs on.
        wait_for("a new session", || {
            faults.opens.load(Ordering::SeqCst) > opens
        });
        let d = digest(1000);
        let sig = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far()))
            .unwrap();
        assert!(verify_digest(key.spki_der(), &d, &sig));

        // A sync signer whose job is in the panicking call gets an error, not a hang.
        faults.panic_in.store(1, Ordering::SeqCst);
        let k = key.clone();
        let e = std::thread::spawn(move || k.sign(SignatureScheme::EcdsaP256Sha256, b"message"))
            .join()
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(
                PipelineError::in_chain(&e),
                Some(PipelineError::Internal(_))
            ),
            "{e}"
        );
        let sig = key
            .sign(SignatureScheme::EcdsaP256Sha256, b"message")
            .unwrap();
        signet::keys::verify_signature(
            key.spki_der(),
            SignatureScheme::EcdsaP256Sha256,
            b"message",
            &sig,
        )
        .unwrap();
        assert!(p.token_status()[0].healthy);
        p.shutdown();
    }

    /// A reply that does not come (the worker is stuck in C_Sign) is given up at the job's deadline: the caller
    /// gets `DeadlineExceeded` while the worker is still stuck.
    #[test]
    fn a_reply_that_does_not_come_ends_at_the_deadline() {
        let Some((p, key, faults, rt)) = single_token("k", KeyType::EcP256) else {
            return;
        };
        faults.hold();
        let deadline = Instant::now() + Duration::from_secs(3);
        let reply =
            rt.spawn(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(1), deadline));
        // The worker has the job in C_Sign, and stays there.
        faults.wait_held(1);
        let r = rt.block_on(reply).unwrap();
        assert_eq!(r, Err(PipelineError::DeadlineExceeded));
        assert_eq!(
            faults.held.load(Ordering::SeqCst),
            1,
            "the worker is still stuck"
        );
        faults.release();
        let d = digest(2);
        let sig = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far()))
            .unwrap();
        assert!(verify_digest(key.spki_der(), &d, &sig));
        p.shutdown();
    }

    /// CKR_KEY_HANDLE_INVALID / CKR_OBJECT_HANDLE_INVALID (an HSM cluster failed over): the cached handle is dropped,
    /// the key found again by label and the signature retried once; a handle error that persists fails the job.
    #[test]
    fn a_stale_key_handle_is_looked_up_again() {
        let Some((p, key, faults, rt)) = single_token("k", KeyType::EcP256) else {
            return;
        };
        let d = digest(1);
        rt.block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far()))
            .unwrap();
        for rv in [RvError::KeyHandleInvalid, RvError::ObjectHandleInvalid] {
            let finds = faults.finds.load(Ordering::SeqCst);
            let signs = faults.signs.load(Ordering::SeqCst);
            faults.inject(rv);
            let sig = rt
                .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far()))
                .unwrap();
            assert!(verify_digest(key.spki_der(), &d, &sig));
            assert_eq!(
                faults.finds.load(Ordering::SeqCst),
                finds + 1,
                "{rv:?}: looked up again"
            );
            assert_eq!(faults.signs.load(Ordering::SeqCst), signs + 1);
        }
        // Twice in a row: retried once only, then reported as a key error.
        faults.inject(RvError::KeyHandleInvalid);
        faults.inject(RvError::KeyHandleInvalid);
        let e = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far()))
            .unwrap_err();
        assert!(matches!(e, PipelineError::Key(_)), "{e}");
        // The session is not reopened for it, the token stays in rotation, and the next job signs.
        assert_eq!(faults.reopens.load(Ordering::SeqCst), 0);
        assert!(p.token_status()[0].healthy);
        let sig = rt
            .block_on(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &d, far()))
            .unwrap();
        assert!(verify_digest(key.spki_der(), &d, &sig));
        p.shutdown();
    }
}
