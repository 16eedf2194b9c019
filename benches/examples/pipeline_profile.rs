//! A bounded run of the pipeline bench's sign scenario, for profilers whose counts do not depend on a quiet machine
//! (`valgrind --tool=callgrind`, `perf stat -e context-switches,task-clock`): N bare P-256 digest signatures either
//! through a bare cryptoki `C_Sign` loop or through the pipeline, on a fresh SoftHSM2 token.
//!
//! Run: `cargo run --release -p signet-bench --example pipeline_profile -- <bare|pipeline|verify> [N]`, then divide
//! the profiler's totals by N (the set-up, a few hundred thousand instructions, is the same in every mode).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use signet::pipeline::{Pipeline, PipelineConfig, TokenMember, VerifyPolicy};
use signet_pkcs11::cryptoki::mechanism::Mechanism;
use signet_pkcs11::{KeyGenOptions, KeyType, SignAlgorithm};

const LABEL: &str = "profile-ca";
const SUBMITTERS: u64 = 64;

fn digest(i: u64) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, &i.to_be_bytes())
        .as_ref()
        .to_vec()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "pipeline".into());
    let n: u64 = args.next().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let Some(hsm) = signet_pkcs11::testing::SoftHsm::new() else {
        println!("SoftHSM2 is not installed");
        return;
    };
    let token = hsm.open();
    token
        .session()
        .unwrap()
        .generate_key(LABEL, KeyType::EcP256, KeyGenOptions::default())
        .unwrap();
    let sessions = std::thread::available_parallelism().map_or(2, |c| c.get());
    let start = Instant::now();
    match mode.as_str() {
        "bare" => {
            let per = n.div_ceil(sessions as u64);
            std::thread::scope(|s| {
                for t in 0..sessions as u64 {
                    let token = token.clone();
                    s.spawn(move || {
                        let mut session = token.session().unwrap();
                        let key = session.find_key(LABEL).unwrap();
                        let count = ((t + 1) * per).min(n).saturating_sub(t * per);
                        let d = digest(1);
                        session
                            .with_raw_session(|raw| {
                                for _ in 0..count {
                                    std::hint::black_box(
                                        raw.sign(&Mechanism::Ecdsa, key.private_handle(), &d)
                                            .unwrap(),
                                    );
                                }
                            })
                            .unwrap();
                    });
                }
            });
        }
        "pipeline" | "verify" => {
            let verify = if mode == "verify" {
                VerifyPolicy::Always
            } else {
                PipelineConfig::default().verify_digests
            };
            let cfg = PipelineConfig {
                verify_digests: verify,
                ..PipelineConfig::default()
            };
            let p = Pipeline::start(
                cfg,
                vec![TokenMember::new("softhsm", token.clone(), sessions)],
            )
            .unwrap();
            let key = Arc::new(p.key(LABEL).unwrap());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(sessions)
                .enable_all()
                .build()
                .unwrap();
            let per = n.div_ceil(SUBMITTERS);
            rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for t in 0..SUBMITTERS {
                    let (p, key) = (p.clone(), key.clone());
                    set.spawn(async move {
                        for i in t * per..((t + 1) * per).min(n) {
                            let deadline = Instant::now() + Duration::from_secs(600);
                            let f = p.submit_digest(
                                &key,
                                SignAlgorithm::EcdsaSha256,
                                &digest(i),
                                deadline,
                            );
                            std::hint::black_box(f.await.unwrap());
                        }
                    });
                }
                while let Some(r) = set.join_next().await {
                    r.unwrap();
                }
            });
            println!("digests verified: {}", p.digests_verified());
            print_switches();
            p.shutdown();
        }
        other => {
            println!("unknown mode {other:?}: bare, pipeline or verify");
            return;
        }
    }
    let wall = start.elapsed();
    println!(
        "{mode}: {n} signatures in {:.3} s ({:.0}/s)",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64()
    );
}

/// Context switches per thread (voluntary: the thread blocked; involuntary: it was preempted), from /proc.
fn print_switches() {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for task in dir.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map_or("", str::trim)
                .to_string()
        };
        println!(
            "  {:<20} voluntary {:>7}  involuntary {:>7}",
            field("Name:"),
            field("voluntary_ctxt_switches:"),
            field("nonvoluntary_ctxt_switches:")
        );
    }
}
