//! P-256 signatures per second through the token layer (`TokenSession::sign`: host-side SHA-256 +
//! CKM_ECDSA) with 1 session and with 2 sessions on 2 threads, next to a bare cryptoki loop doing the
//! same work (ring SHA-256 + C_Sign with CKM_ECDSA) on the same token and the same sessions. Prints
//! the layer/bare throughput ratio for 1 and 2 sessions (goal: >= 0.95).
//!
//! Run: `cargo bench -p signet-bench --bench token_sign`. Needs SoftHSM2 (skips loudly without it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use signet_pkcs11::cryptoki::mechanism::Mechanism;
use signet_pkcs11::testing::SoftHsm;
use signet_pkcs11::{Key, KeyGenOptions, KeyType, SignAlgorithm, TokenSession};

const MSG: &[u8] =
    b"a to-be-signed certificate body of a plausible size, give or take a few hundred bytes....";

/// (iterations, time) per benchmark, summed over every sample criterion took.
static TOTALS: Mutex<Option<HashMap<&'static str, (u64, Duration)>>> = Mutex::new(None);

fn record(name: &'static str, iters: u64, took: Duration) -> Duration {
    let mut t = TOTALS.lock().unwrap();
    let e = t.get_or_insert_with(HashMap::new).entry(name).or_default();
    e.0 += iters;
    e.1 += took;
    took
}

fn rate(name: &str) -> f64 {
    let t = TOTALS.lock().unwrap();
    match t.as_ref().and_then(|m| m.get(name)) {
        Some((n, d)) if !d.is_zero() => *n as f64 / d.as_secs_f64(),
        _ => 0.0,
    }
}

fn layer_loop(s: &TokenSession, key: &Key, iters: u64) {
    for _ in 0..iters {
        let sig = s.sign(key, SignAlgorithm::EcdsaSha256, MSG).unwrap();
        std::hint::black_box(sig);
    }
}

fn bare_loop(s: &TokenSession, key: &Key, iters: u64) {
    let handle = key.private_handle();
    s.with_raw_session(|raw| {
        for _ in 0..iters {
            let digest = ring::digest::digest(&ring::digest::SHA256, MSG);
            let sig = raw
                .sign(&Mechanism::Ecdsa, handle, digest.as_ref())
                .unwrap();
            std::hint::black_box(sig);
        }
    })
    .unwrap();
}

/// Runs `f` on both sessions at once, `iters` signatures in all, and returns the wall time.
fn two_threads(
    sessions: &mut [(TokenSession, Key)],
    iters: u64,
    f: fn(&TokenSession, &Key, u64),
) -> Duration {
    let half = iters / 2;
    let start = Instant::now();
    std::thread::scope(|scope| {
        for (i, (s, k)) in sessions.iter_mut().enumerate() {
            let n = if i == 0 { iters - half } else { half };
            // `&mut TokenSession` is Send (the session moves to the thread for the batch); `&` is not.
            scope.spawn(move || f(s, k, n));
        }
    });
    start.elapsed()
}

fn main() {
    let Some(hsm) = SoftHsm::new() else {
        eprintln!("SKIP token_sign: SoftHSM2 is not available");
        return;
    };
    let token = hsm.open();
    token
        .session()
        .unwrap()
        .generate_key("bench-p256", KeyType::EcP256, KeyGenOptions::default())
        .unwrap();
    let mut sessions: Vec<(TokenSession, Key)> = (0..2)
        .map(|_| {
            let mut s = token.session().unwrap();
            let k = s.find_key("bench-p256").unwrap();
            (s, k)
        })
        .collect();

    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        .configure_from_args();
    let mut g = c.benchmark_group("p256_sign");
    g.throughput(Throughput::Elements(1));
    g.bench_function("bare/1-session", |b| {
        b.iter_custom(|iters| {
            let (s, k) = &sessions[0];
            let start = Instant::now();
            bare_loop(s, k, iters);
            record("bare1", iters, start.elapsed())
        })
    });
    g.bench_function("layer/1-session", |b| {
        b.iter_custom(|iters| {
            let (s, k) = &sessions[0];
            let start = Instant::now();
            layer_loop(s, k, iters);
            record("layer1", iters, start.elapsed())
        })
    });
    g.bench_function("bare/2-sessions", |b| {
        b.iter_custom(|iters| record("bare2", iters, two_threads(&mut sessions, iters, bare_loop)))
    });
    g.bench_function("layer/2-sessions", |b| {
        b.iter_custom(|iters| {
            record(
                "layer2",
                iters,
                two_threads(&mut sessions, iters, layer_loop),
            )
        })
    });
    g.finish();
    c.final_summary();

    println!();
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs each benchmark once to check it works: no figures then.
        println!(
            "token_sign ran in test mode: run `cargo bench -p signet-bench --bench token_sign` for figures"
        );
        return;
    }
    println!("P-256 signatures/s (SoftHSM2, host SHA-256 + CKM_ECDSA), from criterion's samples:");
    for n in ["1", "2"] {
        let (layer, bare) = (rate(&format!("layer{n}")), rate(&format!("bare{n}")));
        print_ratio(n, layer, bare);
    }
    // The machine's load drifts between criterion's benchmarks, which run one after the other; so also
    // measure in pairs: alternate bare and layer in short rounds and sum each side.
    println!("paired rounds (40 x 0.1 s each side, alternating):");
    for n in [1u64, 2] {
        let (mut layer, mut bare) = ((0u64, Duration::ZERO), (0u64, Duration::ZERO));
        for _ in 0..40 {
            for (side, f) in [
                (&mut bare, bare_loop as fn(&TokenSession, &Key, u64)),
                (&mut layer, layer_loop),
            ] {
                let start = Instant::now();
                let mut done = 0;
                while start.elapsed() < Duration::from_millis(100) {
                    done += if n == 1 {
                        let (s, k) = &sessions[0];
                        f(s, k, 16);
                        16
                    } else {
                        two_threads(&mut sessions, 128, f);
                        128
                    };
                }
                side.0 += done;
                side.1 += start.elapsed();
            }
        }
        let per_s = |(n, d): (u64, Duration)| n as f64 / d.as_secs_f64();
        print_ratio(&n.to_string(), per_s(layer), per_s(bare));
    }
}

fn print_ratio(sessions: &str, layer: f64, bare: f64) {
    let ratio = if bare > 0.0 { layer / bare } else { 0.0 };
    println!(
        "  {sessions} session(s): layer {layer:>9.0}/s  bare {bare:>9.0}/s  layer/bare {ratio:.3}{}",
        if ratio >= 0.95 {
            ""
        } else {
            "  (below the 0.95 goal)"
        }
    );
}
