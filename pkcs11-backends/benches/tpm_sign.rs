//! Signatures per second through the token layer on the TPM rig (`scripts/tpm-rig`): ECDSA P-256
//! and RSA-2048 PKCS#1 v1.5, on one session and on two sessions in two threads (the layer serialises
//! the TPM's calls, so two sessions show what that costs or saves).
//!
//! `eval "$(scripts/tpm-rig start)"; cargo bench -p signet-pkcs11 --bench tpm_sign`. A bounded loop
//! (a fixed number of signatures per measurement, `TPM_BENCH_SIGNATURES`, default 300), not criterion:
//! the TPM is slow and its figure is what matters. Without `--bench` (under `cargo test`) it signs a
//! few times and verifies them, as a smoke test. Without the rig it prints SKIP.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark code: a failure is a failed run"
)]

use std::io::Write;
use std::time::Instant;

use ring::signature::{self, UnparsedPublicKey};
use signet_pkcs11::testing::{TokenBed, Tpm};
use signet_pkcs11::{KeyGenOptions, KeyType, SignAlgorithm, Token};

fn rate(token: &Token, label: &str, alg: SignAlgorithm, threads: usize, total: usize) -> f64 {
    let per_thread = total / threads;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let token = token.clone();
            let label = label.to_string();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut s = token.session().unwrap();
                let key = s.find_key(&label).unwrap();
                s.sign(&key, alg, b"warm-up").unwrap();
                barrier.wait();
                for i in 0..per_thread {
                    let msg = format!("thread {t} signature {i}");
                    s.sign(&key, alg, msg.as_bytes()).unwrap();
                }
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    (per_thread * threads) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let Some(tpm) = Tpm::from_env("tpm_sign bench") else {
        return;
    };
    let token = tpm.open();
    let total: usize = std::env::var("TPM_BENCH_SIGNATURES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut out = std::io::stdout().lock();
    for (kt, alg) in [
        (KeyType::EcP256, SignAlgorithm::EcdsaSha256),
        (KeyType::Rsa2048, SignAlgorithm::RsaPkcs1Sha256),
    ] {
        let label = format!("{}bench-{kt}", tpm.key_prefix());
        let mut s = token.session().unwrap();
        let started = Instant::now();
        s.generate_key(&label, kt, KeyGenOptions { replace: true })
            .unwrap();
        let keygen = started.elapsed();
        if bench {
            let one = rate(&token, &label, alg, 1, total);
            let two = rate(&token, &label, alg, 2, total);
            writeln!(
                out,
                "tpm2 {kt} {alg:?}: {one:.0} signatures/s on 1 session, {two:.0}/s on 2 sessions \
                 in 2 threads ({total} signatures each; key generated in {} ms)",
                keygen.as_millis()
            )
            .unwrap();
        } else {
            // Smoke test: a few signatures, verified with ring.
            let spki = s.public_key_der(&label).unwrap();
            let raw = signet_pkcs11::spki_subject_public_key(&spki).unwrap();
            let verifier: &dyn signature::VerificationAlgorithm = match kt {
                KeyType::EcP256 => &signature::ECDSA_P256_SHA256_FIXED,
                _ => &signature::RSA_PKCS1_2048_8192_SHA256,
            };
            for i in 0..3u8 {
                let sig = s.sign_by_label(&label, alg, &[i]).unwrap();
                UnparsedPublicKey::new(verifier, &raw)
                    .verify(&[i], &sig)
                    .unwrap();
            }
            writeln!(
                out,
                "tpm2 {kt}: 3 signatures verified (run with --bench to measure)"
            )
            .unwrap();
        }
        s.destroy_key(&label).unwrap();
    }
}
