//! The batching signer pipeline against a SoftHSM2 token, each figure next to its baseline measured in the same run:
//!
//! - R_sign: bare P-256 digests through the pipeline (many concurrent async submitters) / a bare cryptoki `C_Sign`
//!   loop on the same token with the same number of sessions;
//! - R_issue: X509-SVIDs from CSRs through the pipeline in direct mode / a tight loop doing the same per-certificate
//!   work (CSR verify + template + lint + C_Sign + post-sign verify) on the same number of threads as cores;
//! - delegated mode X509-SVIDs from CSRs / a ring-only tight loop of the same work;
//! - memory: peak RSS (VmHWM) when 100,000 jobs are offered at once (the excess is refused).
//!
//! Method. The machine may be shared, so a ratio of two rates measured seconds apart mostly measures how the load
//! changed in between. Each ratio therefore comes from paired rounds after criterion's runs: a round runs the
//! baseline and then the pipeline over the same number of operations, back to back, and the reported ratio is the
//! median of the rounds' ratios (each round also gives a CPU-per-operation ratio, from the process's CPU time, which
//! does not depend on how much of the machine the process got). Both sides use as many busy threads as the
//! baseline uses cores: the async submitters run on a tokio runtime with one worker per core, and the delegated
//! pipeline's CPU pool has one thread per core, like the tight loops (direct mode's CPU pool keeps the default size,
//! because its threads wait while the token signs). Wall-clock ratios mean what the goals mean only when the load
//! average stays below the number of cores; the load average is printed at the start and the end. Instruction
//! counts and context switches per signature, which do not depend on load, come from the `pipeline_profile`
//! example under `valgrind --tool=callgrind` and `perf stat -e context-switches,task-clock`.
//!
//! Run: `cargo bench -p signet-bench --bench pipeline`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::future::Future as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::Criterion;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use signet::keys::spki::SubjectKey;
use signet::keys::token::TokenKey;
use signet::keys::{AuthorityKey, KeyType as CoreKeyType, SoftwareKey};
use signet::pipeline::{
    DelegatedConfig, Pipeline, PipelineConfig, PipelineKey, SigningMode, TokenMember, VerifyPolicy,
    X509SvidIssuer,
};
use signet::spiffe::TrustDomain;
use signet::x509::{
    Authority, IntermediateRequest, LeafRequest, RootRequest, parse_and_verify_csr,
};
use signet_pkcs11::cryptoki::mechanism::Mechanism;
use signet_pkcs11::{KeyGenOptions, KeyType, SignAlgorithm, Token};
use time::OffsetDateTime;

/// Concurrent submitters (async tasks, on a tokio runtime with one worker per core) offering load to the pipeline.
const SUBMITTERS: u64 = 64;
const LABEL: &str = "bench-ca";

/// Paired rounds per ratio (see the module docs).
const ROUNDS: usize = 7;

/// Per ratio: the rounds' wall-clock ratios and CPU-per-operation ratios (baseline CPU/op over pipeline CPU/op).
type Paired = Vec<(&'static str, Vec<f64>, Vec<f64>)>;
static PAIRED: Mutex<Paired> = Mutex::new(Vec::new());

/// Runs `rounds` paired rounds of `iters` operations: the baseline, then the pipeline, back to back; records each
/// round's wall-clock ratio (pipeline rate / baseline rate) and CPU-per-operation ratio under `name`.
fn paired(
    name: &'static str,
    iters: u64,
    baseline: &mut dyn FnMut(u64) -> Duration,
    pipeline: &mut dyn FnMut(u64) -> Duration,
) {
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let c0 = process_cpu();
        let base = baseline(iters).as_secs_f64();
        let c1 = process_cpu();
        let pipe = pipeline(iters).as_secs_f64();
        let c2 = process_cpu();
        walls.push(base / pipe.max(1e-9));
        cpus.push((c1 - c0) / (c2 - c1).max(1e-9));
    }
    PAIRED.lock().unwrap().push((name, walls, cpus));
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The median wall-clock ratio, its range, and the median CPU-per-operation ratio of a paired measurement.
fn paired_summary(name: &str) -> String {
    let p = PAIRED.lock().unwrap();
    let Some((_, walls, cpus)) = p.iter().find(|(n, ..)| *n == name) else {
        return "not measured".into();
    };
    let lo = walls.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = walls.iter().copied().fold(0.0, f64::max);
    format!(
        "median of {} paired rounds {:.3} (range {lo:.3}-{hi:.3}); CPU/op ratio {:.3}",
        walls.len(),
        median(walls),
        median(cpus)
    )
}

/// Per measured scenario: iterations, wall seconds, process CPU seconds.
type Rates = Vec<(&'static str, u64, f64, f64)>;
static RATES: Mutex<Rates> = Mutex::new(Vec::new());

/// CPU time of the whole process so far (user + system), from /proc/self/stat (clock ticks of 10 ms).
fn process_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the full line: 11 and 12 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Measures `f` (which returns the wall time it measured) and records iterations, wall time and CPU time.
fn measured(name: &'static str, iters: u64, f: impl FnOnce() -> Duration) -> Duration {
    let cpu0 = process_cpu();
    let wall = f();
    let cpu = process_cpu() - cpu0;
    let mut r = RATES.lock().unwrap();
    match r.iter_mut().find(|(n, ..)| *n == name) {
        Some(e) => {
            e.1 += iters;
            e.2 += wall.as_secs_f64();
            e.3 += cpu;
        }
        None => r.push((name, iters, wall.as_secs_f64(), cpu)),
    }
    wall
}

/// Operations per second of wall time.
fn rate(name: &str) -> f64 {
    let r = RATES.lock().unwrap();
    r.iter()
        .find(|(n, ..)| *n == name)
        .map_or(0.0, |(_, i, s, _)| *i as f64 / s.max(1e-9))
}

/// Process CPU microseconds per operation.
fn cpu_us(name: &str) -> f64 {
    let r = RATES.lock().unwrap();
    r.iter()
        .find(|(n, ..)| *n == name)
        .map_or(0.0, |(_, i, _, c)| *c * 1e6 / (*i as f64).max(1.0))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores())
        .enable_all()
        .build()
        .unwrap()
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn digest(i: u64) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, &i.to_be_bytes())
        .as_ref()
        .to_vec()
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(120)
}

fn csrs(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(
                format!("spiffe://example.org/bench/{i}")
                    .try_into()
                    .unwrap(),
            )];
            params.serialize_request(&kp).unwrap().der().to_vec()
        })
        .collect()
}

fn root(key: Arc<dyn AuthorityKey>) -> Authority {
    let mut subject = DistinguishedName::new();
    subject.push(DnType::OrganizationName, "signet bench");
    subject.push(DnType::CommonName, "signet bench root");
    let req = RootRequest {
        trust_domain: TrustDomain::parse("example.org").unwrap(),
        subject,
        ttl: Duration::from_secs(24 * 3600),
        path_len: None,
    };
    Authority::self_signed_root(key, &req, OffsetDateTime::now_utc()).unwrap()
}

/// The per-certificate work of a tight loop: CSR verify, template, lint, sign, post-sign verify.
fn issue_one(authority: &Authority, csr: &[u8]) {
    let csr = parse_and_verify_csr(csr).unwrap();
    let req = LeafRequest::from_csr(&csr, Duration::from_secs(600)).unwrap();
    let cert = authority
        .issue_x509_svid(&req, OffsetDateTime::now_utc())
        .unwrap();
    std::hint::black_box(cert);
}

/// Runs `iters` operations split over `threads` threads, each running `op(i)`; returns the wall time.
fn threaded(iters: u64, threads: usize, op: &(dyn Fn(u64) + Sync)) -> Duration {
    let per = iters.div_ceil(threads as u64);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads as u64 {
            s.spawn(move || {
                for i in t * per..((t + 1) * per).min(iters) {
                    op(i);
                }
            });
        }
    });
    start.elapsed()
}

/// Runs `iters` futures from `SUBMITTERS` concurrent tasks; returns the wall time.
fn concurrent<F, Fut>(rt: &tokio::runtime::Runtime, iters: u64, make: F) -> Duration
where
    F: Fn(u64) -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let per = iters.div_ceil(SUBMITTERS);
    let start = Instant::now();
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for t in 0..SUBMITTERS {
            let make = make.clone();
            set.spawn(async move {
                for i in t * per..((t + 1) * per).min(iters) {
                    make(i).await;
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    });
    start.elapsed()
}

fn start_pipeline(token: &Token, sessions: usize, verify: VerifyPolicy) -> (Pipeline, PipelineKey) {
    start_pipeline_with(token, sessions, verify, 0)
}

fn start_pipeline_with(
    token: &Token,
    sessions: usize,
    verify: VerifyPolicy,
    cpu_threads: usize,
) -> (Pipeline, PipelineKey) {
    let cfg = PipelineConfig {
        verify_digests: verify,
        cpu_threads,
        ..PipelineConfig::default()
    };
    let p = Pipeline::start(
        cfg,
        vec![TokenMember::new("softhsm", token.clone(), sessions)],
    )
    .unwrap();
    let key = p.key(LABEL).unwrap();
    (p, key)
}

fn bench_sign(c: &mut Criterion, token: &Token, sessions: usize) {
    let mut g = c.benchmark_group("sign_p256_digest");
    g.throughput(criterion::Throughput::Elements(1));
    // Bare cryptoki: one session per thread, the key handle found once, C_Sign in a loop.
    let raw: Vec<_> = (0..sessions)
        .map(|_| {
            let mut s = token.session().unwrap();
            let k = s.find_key(LABEL).unwrap();
            Mutex::new((s, k))
        })
        .collect();
    let d = digest(1);
    let bare = |iters: u64| {
        let per = iters.div_ceil(sessions as u64);
        let start = Instant::now();
        std::thread::scope(|s| {
            for (t, m) in raw.iter().enumerate() {
                let d = &d;
                s.spawn(move || {
                    let g = m.lock().unwrap();
                    let n = ((t as u64 + 1) * per)
                        .min(iters)
                        .saturating_sub(t as u64 * per);
                    g.0.with_raw_session(|raw| {
                        for _ in 0..n {
                            std::hint::black_box(
                                raw.sign(&Mechanism::Ecdsa, g.1.private_handle(), d)
                                    .unwrap(),
                            );
                        }
                    })
                    .unwrap();
                });
            }
        });
        start.elapsed()
    };
    g.bench_function("bare_cryptoki_c_sign", |b| {
        b.iter_custom(|iters| measured("sign.bare", iters, || bare(iters)))
    });
    let rt = runtime();
    let through = |p: &Pipeline, key: &PipelineKey, iters: u64| {
        let (p, key) = (p.clone(), key.clone());
        concurrent(&rt, iters, move |i| {
            let f = p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(i), far());
            async move {
                std::hint::black_box(f.await.unwrap());
            }
        })
    };
    for (name, policy, tag) in [
        ("pipeline", VerifyPolicy::Sample(64), "sign.pipeline"),
        (
            "pipeline_verify_always",
            VerifyPolicy::Always,
            "sign.pipeline.verify_always",
        ),
    ] {
        let (p, key) = start_pipeline(token, sessions, policy);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| measured(tag, iters, || through(&p, &key, iters)))
        });
        if policy == VerifyPolicy::Sample(64) {
            paired("sign", 4000, &mut |n| bare(n), &mut |n| {
                through(&p, &key, n)
            });
        }
        p.shutdown();
    }
    g.finish();
}

fn bench_issue(c: &mut Criterion, token: &Token, sessions: usize, csrs: &Arc<Vec<Vec<u8>>>) {
    let mut g = c.benchmark_group("x509_svid_from_csr");
    g.throughput(criterion::Throughput::Elements(1));
    let threads = cores();
    let rt = runtime();
    let through = |issuer: &X509SvidIssuer, iters: u64| {
        let (issuer, csrs) = (issuer.clone(), csrs.clone());
        concurrent(&rt, iters, move |i| {
            let f = issuer.issue_x509_svid(
                csrs[i as usize % csrs.len()].clone(),
                Duration::from_secs(600),
                far(),
            );
            async move {
                std::hint::black_box(f.await.unwrap());
            }
        })
    };

    // Direct, tight loop: one thread per core, the token key through a session pool of the same size.
    let tk: Arc<dyn AuthorityKey> =
        Arc::new(TokenKey::open(token.clone(), LABEL, sessions).unwrap());
    let tight_root = root(tk.clone());
    let direct_tight = |iters: u64| {
        threaded(iters, threads, &|i| {
            issue_one(&tight_root, &csrs[i as usize % csrs.len()]);
        })
    };
    g.bench_function("direct_tight_loop", |b| {
        b.iter_custom(|iters| measured("issue.direct.tight", iters, || direct_tight(iters)))
    });

    // Direct, pipeline.
    let (p, key) = start_pipeline(token, sessions, VerifyPolicy::Sample(64));
    let pipe_root = root(Arc::new(key));
    let issuer = rt
        .block_on(X509SvidIssuer::start(
            pipe_root,
            SigningMode::Direct,
            p.cpu().clone(),
        ))
        .unwrap();
    g.bench_function("direct_pipeline", |b| {
        b.iter_custom(|iters| measured("issue.direct.pipeline", iters, || through(&issuer, iters)))
    });
    paired("issue.direct", 1500, &mut |n| direct_tight(n), &mut |n| {
        through(&issuer, n)
    });
    p.shutdown();

    // Delegated, ring-only tight loop: an in-memory intermediate signs the leaves.
    let (soft, _) = SoftwareKey::generate(CoreKeyType::EcP256).unwrap();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, "bench issuing CA");
    let int = tight_root
        .issue_intermediate(
            &IntermediateRequest {
                subject_key: SubjectKey::from_spki_der(soft.spki_der()).unwrap(),
                subject,
                ttl: Duration::from_secs(3600),
                path_len: Some(0),
            },
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    let soft: Arc<dyn AuthorityKey> = Arc::new(soft);
    let int_auth = Authority::new(
        int.der,
        soft,
        tight_root.trust_domain().clone(),
        tight_root.chain(),
        tight_root.roots().to_vec(),
    )
    .unwrap();
    let delegated_tight = |iters: u64| {
        threaded(iters, threads, &|i| {
            issue_one(&int_auth, &csrs[i as usize % csrs.len()]);
        })
    };
    g.bench_function("delegated_tight_loop", |b| {
        b.iter_custom(|iters| measured("issue.delegated.tight", iters, || delegated_tight(iters)))
    });

    // Delegated, pipeline: a CPU pool of one thread per core, like the tight loop (its threads never wait on the
    // token once the intermediate is minted).
    let (p, key) = start_pipeline_with(token, sessions, VerifyPolicy::Sample(64), threads);
    let del = rt
        .block_on(X509SvidIssuer::start(
            root(Arc::new(key)),
            SigningMode::Delegated(DelegatedConfig::default()),
            p.cpu().clone(),
        ))
        .unwrap();
    g.bench_function("delegated_pipeline", |b| {
        b.iter_custom(|iters| measured("issue.delegated.pipeline", iters, || through(&del, iters)))
    });
    paired(
        "issue.delegated",
        3000,
        &mut |n| delegated_tight(n),
        &mut |n| through(&del, n),
    );
    p.shutdown();
    g.finish();
}

/// Offers 100,000 digest jobs at once (no awaiting between submissions): what the queue cannot hold is refused at
/// once; peak RSS is read from VmHWM.
fn memory(token: &Token, sessions: usize) -> HashMap<&'static str, u64> {
    const OFFERED: u64 = 100_000;
    let (p, key) = start_pipeline(token, sessions, VerifyPolicy::Sample(64));
    let rt = runtime();
    let before = vm_rss_kib();
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut accepted = Vec::new();
    let mut refused = 0u64;
    let start = Instant::now();
    for i in 0..OFFERED {
        let mut f = Box::pin(p.submit_digest(&key, SignAlgorithm::EcdsaSha256, &digest(i), far()));
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(Ok(_)) => {}
            std::task::Poll::Ready(Err(e)) => {
                assert!(e.is_retryable(), "{e}");
                refused += 1;
            }
            std::task::Poll::Pending => accepted.push(f),
        }
    }
    let offer_ms = start.elapsed().as_millis() as u64;
    let n_accepted = accepted.len() as u64;
    let ok = rt.block_on(async {
        let mut ok = 0u64;
        for f in accepted {
            if f.await.is_ok() {
                ok += 1;
            }
        }
        ok
    });
    let drain_ms = start.elapsed().as_millis() as u64 - offer_ms;
    p.shutdown();
    HashMap::from([
        ("rss_before_kib", before),
        ("vm_hwm_kib", vm_hwm_kib()),
        ("accepted", n_accepted),
        ("refused", refused),
        ("signed_ok", ok),
        ("offer_ms", offer_ms),
        ("drain_ms", drain_ms),
    ])
}

fn main() {
    let Some(hsm) = signet_pkcs11::testing::SoftHsm::new() else {
        return;
    };
    let token = hsm.open();
    token
        .session()
        .unwrap()
        .generate_key(LABEL, KeyType::EcP256, KeyGenOptions::default())
        .unwrap();
    let sessions = cores();
    let load_start = loadavg();
    // First, so that VmHWM is this scenario's peak.
    let mem = memory(&token, sessions);
    let csrs = Arc::new(csrs(256));

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench_sign(&mut c, &token, sessions);
    bench_issue(&mut c, &token, sessions, &csrs);
    c.final_summary();

    let r = |a: &str, b: &str| rate(a) / rate(b).max(1e-9);
    // CPU efficiency: baseline CPU per operation / pipeline CPU per operation (what the ratio would be on cores
    // the process has to itself, when both are CPU-bound).
    let e = |a: &str, b: &str| cpu_us(b) / cpu_us(a).max(1e-9);
    println!();
    println!(
        "load average at the end: {} (start: {load_start})",
        loadavg()
    );
    let names: Vec<&str> = RATES.lock().unwrap().iter().map(|(n, ..)| *n).collect();
    for n in names {
        println!(
            "  {n:<28} {:>8.0}/s wall  {:>7.1} us CPU/op",
            rate(n),
            cpu_us(n)
        );
    }
    println!(
        "== signet pipeline (SoftHSM2, P-256, {sessions} sessions, {SUBMITTERS} concurrent submitters, {} cores) ==",
        cores()
    );
    println!(
        "R_sign    (criterion runs, seconds apart) {:>8.0}/s pipeline / {:>8.0}/s bare C_Sign = {:.3}  (goal >= 0.90)",
        rate("sign.pipeline"),
        rate("sign.bare"),
        r("sign.pipeline", "sign.bare")
    );
    println!("            the ratio, paired: {}", paired_summary("sign"));
    println!(
        "            CPU/op efficiency bare/pipeline = {:.3}",
        e("sign.pipeline", "sign.bare")
    );
    println!(
        "            verify every digest: {:>8.0}/s = {:.3} of bare (cost of VerifyPolicy::Always)",
        rate("sign.pipeline.verify_always"),
        r("sign.pipeline.verify_always", "sign.bare")
    );
    println!(
        "R_issue   (criterion runs, seconds apart) {:>8.0}/s pipeline direct / {:>8.0}/s tight loop = {:.3}  (goal >= 0.85)",
        rate("issue.direct.pipeline"),
        rate("issue.direct.tight"),
        r("issue.direct.pipeline", "issue.direct.tight")
    );
    println!(
        "            the ratio, paired: {}",
        paired_summary("issue.direct")
    );
    println!(
        "            CPU/op efficiency tight/pipeline = {:.3}",
        e("issue.direct.pipeline", "issue.direct.tight")
    );
    println!(
        "R_deleg   (criterion runs, seconds apart) {:>8.0}/s pipeline delegated / {:>8.0}/s ring tight loop = {:.3}  (goal >= 0.85)",
        rate("issue.delegated.pipeline"),
        rate("issue.delegated.tight"),
        r("issue.delegated.pipeline", "issue.delegated.tight")
    );
    println!(
        "            the ratio, paired: {}",
        paired_summary("issue.delegated")
    );
    println!(
        "            CPU/op efficiency tight/pipeline = {:.3}",
        e("issue.delegated.pipeline", "issue.delegated.tight")
    );
    println!(
        "memory    = VmHWM {:.1} MiB (RSS before offering {:.1} MiB) with 100000 jobs offered at once: {} accepted, {} refused (Overloaded), {} signed; offered in {} ms, drained in {} ms  (goal < 256 MiB)",
        mem["vm_hwm_kib"] as f64 / 1024.0,
        mem["rss_before_kib"] as f64 / 1024.0,
        mem["accepted"],
        mem["refused"],
        mem["signed_ok"],
        mem["offer_ms"],
        mem["drain_ms"],
    );
}
