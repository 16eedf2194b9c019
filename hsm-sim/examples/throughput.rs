//! Measures signatures per second through the built module, the way signet drives a token: one session per
//! thread, a P-256 key looked up once, CKM_ECDSA over a digest.
//!
//! ```sh
//! cargo build -p hsm-sim --examples
//! HSM_SIM_DIR=$(mktemp -d) HSM_SIM_LATENCY_MS=5 cargo run -p hsm-sim --example throughput -- 8 3
//! ```
//! Arguments: threads (default 4), seconds (default 3), module path (default: `libhsm_sim.so` in the target
//! directory or its `deps/`). An uninitialised token is initialised with throw-away PINs; use an empty directory.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a measuring tool: any failure ends the run with its message"
)]

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args
        .get(1)
        .map(|a| a.parse().expect("threads"))
        .unwrap_or(4);
    let seconds: u64 = args
        .get(2)
        .map(|a| a.parse().expect("seconds"))
        .unwrap_or(3);
    let module = args.get(3).map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("exe");
        let target = exe.parent().and_then(|p| p.parent()).expect("target dir");
        let beside = target.join("libhsm_sim.so");
        if beside.exists() {
            beside
        } else {
            target.join("deps/libhsm_sim.so")
        }
    });
    let p = Pkcs11::new(&module).unwrap_or_else(|e| panic!("load {}: {e}", module.display()));
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slot = p.get_slots_with_token().expect("slots")[0];
    let pin = AuthPin::new("bench-pin".into());
    if !p
        .get_token_info(slot)
        .expect("token info")
        .token_initialized()
    {
        let so = AuthPin::new("bench-so-pin".into());
        p.init_token(slot, &so, "bench").expect("C_InitToken");
        let s = p.open_rw_session(slot).expect("session");
        s.login(UserType::So, Some(&so)).expect("SO login");
        s.init_pin(&pin).expect("C_InitPIN");
    }
    let s = p.open_rw_session(slot).expect("session");
    s.login(UserType::User, Some(&pin)).expect("login");
    let public = [
        Attribute::EcParams(vec![6, 8, 0x2a, 0x86, 0x48, 0xce, 0x3d, 3, 1, 7]),
        Attribute::Token(false),
    ];
    let private = [
        Attribute::Token(false),
        Attribute::Sign(true),
        Attribute::Label(b"bench".to_vec()),
    ];
    s.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        .expect("keygen");

    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (p, done, count, errors) = (p.clone(), done.clone(), count.clone(), errors.clone());
            std::thread::spawn(move || {
                let s = p.open_ro_session(slot).expect("session");
                let key = s
                    .find_objects(&[
                        Attribute::Label(b"bench".to_vec()),
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                    ])
                    .expect("find")[0];
                while !done.load(Ordering::Relaxed) {
                    match s.sign(&Mechanism::Ecdsa, key, &[7u8; 32]) {
                        Ok(_) => count.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    done.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = count.load(Ordering::Relaxed);
    println!(
        "{threads} sessions, {elapsed:.1} s: {n} signatures, {:.0}/s, {} errors",
        n as f64 / elapsed,
        errors.load(Ordering::Relaxed)
    );
}
