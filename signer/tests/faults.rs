//! Fault runs through the whole appliance: gRPC + mTLS in on 127.0.0.1, SPIFFE credentials out, an hsm-sim token
//! whose faults are switched through its control file while many concurrent clients keep it busy with X509-SVIDs
//! (Issuer `BatchMintX509SVID`), JWT-SVIDs (`MintJWTSVID`) and KeyManager `SignData`.
//!
//! Each run checks that every request is answered exactly once (a credential or a gRPC status; nothing hangs; one
//! result per CSR; one audit line per request), that no credential that fails an independent verifier ever leaves
//! (leaf signatures checked with ring against the served root, the `spiffe` crate, `openssl verify -x509_strict` on a
//! sample; JWT signatures checked with ring against the bundle's JWKS read with serde_json, the `spiffe` crate on a
//! sample; SignData signatures checked with ring against GetPublicKey's key), and that the appliance serves again
//! after the fault ends. It prints the figures: requests, answers by kind and status, bad credentials, and the
//! recovery time (success rate in 100 ms buckets; from the end of the fault until a bucket is back within 10% of
//! the rate before it). Timings are printed, never asserted (a shared machine is noisy):
//! `cargo test --release -p signet --test faults -- --nocapture`.
//!
//! Faults hit the whole per-process hsm-sim token, so this file is a test binary of its own, and its four runs go
//! one after the other on one appliance.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test fixtures outside #[test] fns: a failed fixture is a failed test"
)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hsm_sim::{Control, Counters, OpKind};
use ring::signature::{self, UnparsedPublicKey};
use signet_pkcs11::testing::{HsmSim, TokenBed as _, USER_PIN};
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use signet_proto::spire::plugin::server::keymanager::v1 as km;
use signet_proto::spire::plugin::server::keymanager::v1::key_manager_client::KeyManagerClient;
use tonic::Code;
use tonic::transport::Channel;
use x509_parser::prelude::FromDer as _;

use support::bed::*;
use support::openssl_verify;

/// Longest any request may take before it counts as unanswered.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);
const BUCKET: Duration = Duration::from_millis(100);
const CSRS_PER_CALL: usize = 2;
const KM_KEY: &str = "x509-CA-A";
/// PKCS#11's CKR_DEVICE_ERROR.
const CKR_DEVICE_ERROR: u64 = 0x30;

/// When the clients stop (moved once the fault is over).
type Stop = tokio::sync::watch::Receiver<Instant>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    X509,
    Jwt,
    SignData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// A credential that every verifier accepts.
    Good,
    /// A credential that a verifier rejects (must never happen).
    Bad(String),
    /// A gRPC status.
    Refused(Code),
    /// No answer within [`ANSWER_WITHIN`] (must never happen), or a batch with the wrong number of results.
    Lost,
}

struct Answer {
    kind: Kind,
    /// When the answer came, since the start of the run.
    at: Duration,
    outcome: Outcome,
}

/// What the clients verify against: read once from the appliance before the run.
struct Judge {
    root_spki: Vec<u8>,
    roots_der: Vec<Vec<u8>>,
    /// JWT kid -> uncompressed P-256 point, from the bundle document's JWKS.
    jwks: BTreeMap<String, Vec<u8>>,
    jwt_bundle: spiffe::JwtBundleSet,
    km_point: Vec<u8>,
    km_fingerprint: String,
}

struct Csr {
    id: String,
    der: Vec<u8>,
    key_der: Vec<u8>,
}

struct Plan {
    name: &'static str,
    /// Load before the fault starts.
    before: Duration,
    /// Load after the device is back (or the fault ended).
    after: Duration,
}

fn raw_point(spki: &[u8]) -> Vec<u8> {
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).unwrap();
    info.subject_public_key.data.to_vec()
}

/// The leaf's signature checked with ring against the root's key, its SPIFFE ID, and the `spiffe` crate's parse.
fn check_x509(judge: &Judge, csr: &Csr, svid: &pb::X509svid) -> Result<(), String> {
    let leaf = svid.cert_chain.first().ok_or("empty chain")?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("leaf does not parse: {e}"))?;
    let point = raw_point(&judge.root_spki);
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &point)
        .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
        .map_err(|_| "leaf signature does not verify against the root".to_string())?;
    if svid.spiffe_id != csr.id {
        return Err(format!("SPIFFE ID {} for {}", svid.spiffe_id, csr.id));
    }
    let parsed = spiffe::X509Svid::parse_from_der(&svid.cert_chain.concat(), &csr.key_der)
        .map_err(|e| format!("spiffe crate: {e}"))?;
    if parsed.spiffe_id().to_string() != csr.id {
        return Err("spiffe crate reads another ID".into());
    }
    Ok(())
}

/// The JWS signature checked with ring against the bundle's key for its `kid`, and the claims read with serde_json.
fn check_jwt(judge: &Judge, token: &str, id: &str, check_with_spiffe: bool) -> Result<(), String> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, p, s] = parts.as_slice() else {
        return Err("not a JWS compact serialization".into());
    };
    let decode = |x: &str| URL_SAFE_NO_PAD.decode(x).map_err(|e| e.to_string());
    let header: serde_json::Value =
        serde_json::from_slice(&decode(h)?).map_err(|e| e.to_string())?;
    let claims: serde_json::Value =
        serde_json::from_slice(&decode(p)?).map_err(|e| e.to_string())?;
    if header["alg"] != "ES256" {
        return Err(format!("alg {}", header["alg"]));
    }
    let kid = header["kid"].as_str().ok_or("no kid")?;
    let point = judge.jwks.get(kid).ok_or("kid not in the bundle")?;
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
        .verify(format!("{h}.{p}").as_bytes(), &decode(s)?)
        .map_err(|_| "JWT signature does not verify against the bundle".to_string())?;
    if claims["sub"] != id {
        return Err(format!("sub {}", claims["sub"]));
    }
    if check_with_spiffe {
        spiffe::JwtSvid::parse_and_validate(token, &judge.jwt_bundle, &["faults"])
            .map_err(|e| format!("spiffe crate: {e}"))?;
    }
    Ok(())
}

fn check_sign_data(judge: &Judge, msg: &[u8], r: &km::SignDataResponse) -> Result<(), String> {
    if r.key_fingerprint != judge.km_fingerprint {
        return Err("another key's fingerprint".into());
    }
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &judge.km_point)
        .verify(msg, &r.signature)
        .map_err(|_| "SignData signature does not verify against the key".to_string())
}

fn timed_out<T>(
    r: Result<Result<tonic::Response<T>, tonic::Status>, tokio::time::error::Elapsed>,
) -> Result<T, Outcome> {
    match r {
        Err(_) => Err(Outcome::Lost),
        Ok(Err(s)) => Err(Outcome::Refused(s.code())),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

/// A client that errors back off a little, as real ones do (and so that a refusing appliance is not spun on).
async fn pause_after(outcome: &Outcome) {
    if !matches!(outcome, Outcome::Good) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn x509_client(
    ch: Channel,
    judge: Arc<Judge>,
    csrs: Arc<Vec<Csr>>,
    t0: Instant,
    stop: Stop,
    which: usize,
) -> (Vec<Answer>, Vec<Vec<u8>>) {
    let mut c = IssuerClient::new(ch);
    let mut answers = Vec::new();
    let mut sample = Vec::new();
    let mut n = which;
    let mut good = 0usize;
    while Instant::now() < *stop.borrow() {
        let picked: Vec<&Csr> = (0..CSRS_PER_CALL)
            .map(|i| &csrs[(n + i) % csrs.len()])
            .collect();
        n += CSRS_PER_CALL;
        let requests = picked
            .iter()
            .map(|c| pb::X509svidRequest {
                csr: c.der.clone(),
                ttl_seconds: 600,
            })
            .collect();
        let r = timed_out(
            tokio::time::timeout(
                ANSWER_WITHIN,
                c.batch_mint_x509svid(pb::BatchMintX509svidRequest { requests }),
            )
            .await,
        );
        let at = t0.elapsed();
        let outcomes: Vec<Outcome> = match r {
            Err(o) => vec![o; CSRS_PER_CALL],
            Ok(resp) if resp.results.len() != CSRS_PER_CALL => vec![Outcome::Lost; CSRS_PER_CALL],
            Ok(resp) => resp
                .results
                .into_iter()
                .zip(&picked)
                .map(|(r, csr)| match r.result {
                    Some(pb::x509svid_result::Result::Svid(svid)) => {
                        match check_x509(&judge, csr, &svid) {
                            Ok(()) => {
                                good += 1;
                                if good % 25 == 1 && sample.len() < 8 {
                                    sample.push(svid.cert_chain[0].clone());
                                }
                                Outcome::Good
                            }
                            Err(e) => Outcome::Bad(e),
                        }
                    }
                    Some(pb::x509svid_result::Result::Failure(f)) => {
                        Outcome::Refused(Code::from_i32(f.code))
                    }
                    None => Outcome::Lost,
                })
                .collect(),
        };
        let worst = outcomes
            .iter()
            .find(|o| !matches!(o, Outcome::Good))
            .cloned()
            .unwrap_or(Outcome::Good);
        answers.extend(outcomes.into_iter().map(|outcome| Answer {
            kind: Kind::X509,
            at,
            outcome,
        }));
        pause_after(&worst).await;
    }
    (answers, sample)
}

async fn jwt_client(
    ch: Channel,
    judge: Arc<Judge>,
    t0: Instant,
    stop: Stop,
    which: usize,
) -> Vec<Answer> {
    let mut c = IssuerClient::new(ch);
    let mut answers = Vec::new();
    let mut n = 0usize;
    while Instant::now() < *stop.borrow() {
        n += 1;
        let id = format!("spiffe://example.org/workloads/jwt-{which}-{}", n % 8);
        let r = timed_out(
            tokio::time::timeout(
                ANSWER_WITHIN,
                c.mint_jwtsvid(pb::MintJwtsvidRequest {
                    spiffe_id: id.clone(),
                    audience: vec!["faults".into()],
                    ttl_seconds: 300,
                }),
            )
            .await,
        );
        let outcome = match r {
            Err(o) => o,
            Ok(m) => match check_jwt(&judge, &m.token, &id, n % 50 == 1) {
                Ok(()) => Outcome::Good,
                Err(e) => Outcome::Bad(e),
            },
        };
        pause_after(&outcome).await;
        answers.push(Answer {
            kind: Kind::Jwt,
            at: t0.elapsed(),
            outcome,
        });
    }
    answers
}

async fn sign_data_client(
    ch: Channel,
    judge: Arc<Judge>,
    t0: Instant,
    stop: Stop,
    which: usize,
) -> Vec<Answer> {
    let mut c = KeyManagerClient::new(ch);
    let mut answers = Vec::new();
    let mut n = 0u64;
    while Instant::now() < *stop.borrow() {
        n += 1;
        let msg = format!("fault run message {which}/{n}").into_bytes();
        let digest = ring::digest::digest(&ring::digest::SHA256, &msg);
        let r = timed_out(
            tokio::time::timeout(
                ANSWER_WITHIN,
                c.sign_data(km::SignDataRequest {
                    key_id: KM_KEY.into(),
                    data: digest.as_ref().to_vec(),
                    signer_opts: Some(km::sign_data_request::SignerOpts::HashAlgorithm(
                        km::HashAlgorithm::Sha256 as i32,
                    )),
                }),
            )
            .await,
        );
        let outcome = match r {
            Err(o) => o,
            Ok(resp) => match check_sign_data(&judge, &msg, &resp) {
                Ok(()) => Outcome::Good,
                Err(e) => Outcome::Bad(e),
            },
        };
        pause_after(&outcome).await;
        answers.push(Answer {
            kind: Kind::SignData,
            at: t0.elapsed(),
            outcome,
        });
    }
    answers
}

struct Rig {
    bed: Bed,
    admin: Channel,
    /// An agent's channel, to make the token read its control file.
    poke: Channel,
    /// The token's control file.
    control_file: std::path::PathBuf,
    spire: Channel,
    judge: Arc<Judge>,
    csrs: Arc<Vec<Csr>>,
}

/// An appliance on the process's hsm-sim token (2 worker sessions) and what the clients verify against.
async fn rig() -> Rig {
    let sim = HsmSim::new();
    let prefix = sim.key_prefix().to_string();
    let (module, label) = (sim.module().to_path_buf(), sim.label().to_string());
    let control_file = sim.control_file().to_path_buf();
    let bed = Bed::start_on(Box::new(sim), |dir| {
        let mut cfg = config_on("hsm-sim", &module, &label, USER_PIN, dir);
        cfg.tokens[0].sessions = 2;
        cfg.pipeline.cpu_threads = 4;
        cfg.server.metrics = Some("127.0.0.1:0".into());
        cfg.authority.x509.key_label = format!("{prefix}root");
        cfg.authority.jwt.key_label = format!("{prefix}jwt");
        cfg
    })
    .await;
    let admin = bed.channel(Some(&bed.admin())).await;
    let agent = bed.credential_for(AGENT).await;
    let poke = bed.channel(Some(&agent)).await;
    let spire_cred = bed.credential_for(SPIRE_A).await;
    let spire = bed.channel(Some(&spire_cred)).await;
    let key = KeyManagerClient::new(spire.clone())
        .generate_key(km::GenerateKeyRequest {
            key_id: KM_KEY.into(),
            key_type: km::KeyType::EcP256 as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .public_key
        .unwrap();
    let bundle = IssuerClient::new(admin.clone())
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let doc: serde_json::Value = serde_json::from_slice(&bundle.spiffe_bundle).unwrap();
    let mut jwks = BTreeMap::new();
    for k in doc["keys"].as_array().unwrap() {
        if k["use"] == "jwt-svid" {
            assert_eq!(k["crv"], "P-256");
            let coord = |c: &str| URL_SAFE_NO_PAD.decode(k[c].as_str().unwrap()).unwrap();
            let mut point = vec![4u8];
            point.extend(coord("x"));
            point.extend(coord("y"));
            jwks.insert(k["kid"].as_str().unwrap().to_string(), point);
        }
    }
    assert!(!jwks.is_empty(), "the bundle publishes a JWT key");
    let jwt_only = serde_json::json!({
        "keys": doc["keys"].as_array().unwrap().iter().filter(|k| k["use"] == "jwt-svid").collect::<Vec<_>>()
    });
    let mut jwt_bundle = spiffe::JwtBundleSet::new();
    jwt_bundle.add_bundle(
        spiffe::JwtBundle::from_jwt_authorities(
            spiffe::TrustDomain::new(TD).unwrap(),
            jwt_only.to_string().as_bytes(),
        )
        .unwrap(),
    );
    assert_eq!(bundle.x509_authorities.len(), 1, "one root");
    let (_, root) = x509_parser::parse_x509_certificate(&bundle.x509_authorities[0]).unwrap();
    let judge = Judge {
        root_spki: root.public_key().raw.to_vec(),
        roots_der: bundle.x509_authorities.clone(),
        jwks,
        jwt_bundle,
        km_point: raw_point(&key.pkix_data),
        km_fingerprint: key.fingerprint.clone(),
    };
    let csrs = (0..16)
        .map(|i| {
            let id = format!("spiffe://example.org/workloads/fault-{i}");
            let (der, kp) = csr_for(&id);
            Csr {
                id,
                der,
                key_der: kp.serialize_der(),
            }
        })
        .collect();
    Rig {
        bed,
        admin,
        poke,
        control_file,
        spire,
        judge: Arc::new(judge),
        csrs: Arc::new(csrs),
    }
}

/// Waits (bounded) until the module has applied plan `seq`, and returns its counters. The module reads its control
/// file when the token is called, so each look pokes it with a JWT-SVID request on `poke` (another caller than the
/// load's, so that the audit counts stay the load's).
async fn applied(control: &Control, seq: u64, poke: &Channel) -> Counters {
    let until = Instant::now() + Duration::from_secs(5);
    let mut c = IssuerClient::new(poke.clone());
    loop {
        let counters = control.counters().unwrap();
        if counters.applied_seq >= seq {
            return counters;
        }
        assert!(
            Instant::now() < until,
            "hsm-sim did not apply control plan {seq} within 5 s (status: {counters:?})"
        );
        let _ = c
            .mint_jwtsvid(pb::MintJwtsvidRequest {
                spiffe_id: "spiffe://example.org/workloads/poke".into(),
                audience: vec!["poke".into()],
                ttl_seconds: 60,
            })
            .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Report {
    answers: Vec<Answer>,
    counters: Counters,
}

/// Runs the load for `plan.before`, then `fault` (which returns when the fault is over: the instant the device
/// came back, since the start), then `plan.after` more, and checks and prints the run.
async fn fault_run<F, Fut>(
    rig: &Rig,
    mut control: Control,
    plan: Plan,
    fault: F,
) -> (Report, Control)
where
    F: FnOnce(Control, Instant, Channel) -> Fut,
    Fut: std::future::Future<Output = (Control, Duration)>,
{
    let seq = control.clear().unwrap();
    let start_counters = applied(&control, seq, &rig.poke).await;
    // Audit lines the set-up wrote (the service credentials it minted with the admin's).
    let audit_before = rig.bed.audit();

    let t0 = Instant::now();
    // The clients stop when the fault is over and `after` has passed: until then they run against a far stop
    // (bounded: a fault that never ends fails the run at `applied`'s bound long before).
    let far = t0 + Duration::from_secs(60);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(far);
    let mut x509 = Vec::new();
    let mut others = Vec::new();
    for i in 0..6 {
        let (ch, judge, csrs, rx) = (
            rig.admin.clone(),
            rig.judge.clone(),
            rig.csrs.clone(),
            stop_rx.clone(),
        );
        x509.push(tokio::spawn(async move {
            x509_client(ch, judge, csrs, t0, rx, i * 5).await
        }));
    }
    for i in 0..4 {
        let (ch, judge, rx) = (rig.admin.clone(), rig.judge.clone(), stop_rx.clone());
        others.push(tokio::spawn(async move {
            jwt_client(ch, judge, t0, rx, i).await
        }));
        let (ch, judge, rx) = (rig.spire.clone(), rig.judge.clone(), stop_rx.clone());
        others.push(tokio::spawn(async move {
            sign_data_client(ch, judge, t0, rx, i).await
        }));
    }

    // The load before the fault (the rate recovery is measured against); not a synchronisation.
    tokio::time::sleep(plan.before).await;
    let fault_at = t0.elapsed();
    let (mut control, back_at) = fault(control, t0, rig.poke.clone()).await;
    stop_tx.send(t0 + back_at + plan.after).unwrap();

    let mut answers = Vec::new();
    let mut sample = Vec::new();
    for t in x509 {
        let (a, s) = t.await.unwrap();
        answers.extend(a);
        sample.extend(s);
    }
    for t in others {
        answers.extend(t.await.unwrap());
    }
    let seq = control.clear().unwrap();
    let end_counters = applied(&control, seq, &rig.poke).await;

    // openssl verify on a sample of the leaves, as a third judge.
    assert!(!sample.is_empty(), "a sample of leaves for openssl");
    for leaf in &sample {
        openssl_verify(&rig.judge.roots_der, &[], leaf)
            .unwrap_or_else(|e| panic!("openssl rejects an issued leaf: {e}"));
    }

    // Server side: one audit line per request, and as many credentials issued as the clients received.
    let audit = rig.bed.audit();
    for (method, caller, kind) in [
        ("BatchMintX509SVID", ADMIN, Kind::X509),
        ("MintJWTSVID", ADMIN, Kind::Jwt),
        ("SignData", SPIRE_A, Kind::SignData),
    ] {
        let lines = &audit_lines(&audit, caller, method)
            [audit_lines(&audit_before, caller, method).len()..];
        let sent: Vec<&Answer> = answers.iter().filter(|a| a.kind == kind).collect();
        assert_eq!(
            lines.len(),
            sent.len(),
            "{}: one audit line per {method} request",
            plan.name
        );
        let served = lines
            .iter()
            .filter(|l| l["outcome"] == "issued" || l["outcome"] == "key_used")
            .count();
        let received = sent
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Good | Outcome::Bad(_)))
            .count();
        assert_eq!(
            served, received,
            "{}: {method}: the clients received every credential the audit log says was issued, and only those",
            plan.name
        );
    }
    let counters = delta(&start_counters, &end_counters);
    let report = Report { answers, counters };
    print_report(&plan, fault_at, back_at, &report, sample.len());

    let bad: Vec<&Outcome> = report
        .answers
        .iter()
        .map(|a| &a.outcome)
        .filter(|o| matches!(o, Outcome::Bad(_)))
        .collect();
    assert!(
        bad.is_empty(),
        "{}: bad credentials left: {bad:?}",
        plan.name
    );
    let lost = report
        .answers
        .iter()
        .filter(|a| a.outcome == Outcome::Lost)
        .count();
    assert_eq!(lost, 0, "{}: requests without an answer", plan.name);
    for kind in [Kind::X509, Kind::Jwt, Kind::SignData] {
        let good_before = report
            .answers
            .iter()
            .filter(|a| a.kind == kind && a.outcome == Outcome::Good && a.at < fault_at)
            .count();
        let first_after = report
            .answers
            .iter()
            .filter(|a| a.kind == kind && a.outcome == Outcome::Good && a.at > back_at)
            .map(|a| a.at - back_at)
            .min();
        assert!(
            good_before > 0,
            "{}: {kind:?} served before the fault",
            plan.name
        );
        let first_after = first_after
            .unwrap_or_else(|| panic!("{}: {kind:?} never served after the fault", plan.name));
        // Reported, not asserted: how soon depends on the machine and its load; that it serves again is the property.
        eprintln!(
            "{}: {kind:?} served again {first_after:?} after the fault ended",
            plan.name
        );
    }
    (report, control)
}

/// What the module injected between two looks at its counters (one module instance: the appliance holds the library
/// loaded for the whole test, and re-initialising it keeps the counters).
fn delta(a: &Counters, b: &Counters) -> Counters {
    let mut d = b.clone();
    d.failures -= a.failures;
    d.corrupted_signatures -= a.corrupted_signatures;
    d.unplugs -= a.unplugs;
    d.calls_while_unplugged -= a.calls_while_unplugged;
    d.session_invalidations -= a.session_invalidations;
    d.handle_invalidations -= a.handle_invalidations;
    d.signatures -= a.signatures;
    d
}

/// Successes per bucket, the rate before the fault, and the time from `back_at` until a bucket is within 10% of it.
fn recovery(
    answers: &[Answer],
    fault_at: Duration,
    back_at: Duration,
) -> (f64, Option<Duration>, Vec<u32>) {
    let end = answers.iter().map(|a| a.at).max().unwrap_or_default();
    let n = (end.as_millis() / BUCKET.as_millis()) as usize + 1;
    let mut buckets = vec![0u32; n];
    for a in answers.iter().filter(|a| a.outcome == Outcome::Good) {
        buckets[(a.at.as_millis() / BUCKET.as_millis()) as usize] += 1;
    }
    // Before: the whole buckets of the second before the fault (skipping the first, warm-up, half second).
    let first = ((fault_at.saturating_sub(Duration::from_secs(1)))
        .max(Duration::from_millis(500))
        .as_millis()
        / BUCKET.as_millis()) as usize;
    let last = (fault_at.as_millis() / BUCKET.as_millis()) as usize;
    let before = &buckets[first.min(last)..last];
    let pre = before.iter().map(|&b| f64::from(b)).sum::<f64>() / before.len().max(1) as f64;
    // After: the first whole bucket starting at or after the device's return that is within 10% of `pre`; the
    // last bucket is partial and is not counted.
    let from = back_at.as_millis().div_ceil(BUCKET.as_millis()) as usize;
    let rec = (from..n.saturating_sub(1))
        .find(|&i| f64::from(buckets[i]) >= 0.9 * pre)
        .map(|i| BUCKET * (i as u32 + 1) - back_at);
    (pre * 10.0, rec, buckets)
}

fn print_report(plan: &Plan, fault_at: Duration, back_at: Duration, r: &Report, openssl: usize) {
    let mut by: BTreeMap<(Kind, String), usize> = BTreeMap::new();
    for a in &r.answers {
        let o = match &a.outcome {
            Outcome::Good => "ok".to_string(),
            Outcome::Bad(_) => "BAD CREDENTIAL".to_string(),
            Outcome::Refused(c) => format!("{c:?}"),
            Outcome::Lost => "NO ANSWER".to_string(),
        };
        *by.entry((a.kind, o)).or_default() += 1;
    }
    let bad = r
        .answers
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::Bad(_)))
        .count();
    let (pre, rec, buckets) = recovery(&r.answers, fault_at, back_at);
    println!("== fault run: {} ==", plan.name);
    println!(
        "  requests {} (fault at {:.2} s, device back / fault over at {:.2} s, end {:.2} s)",
        r.answers.len(),
        fault_at.as_secs_f64(),
        back_at.as_secs_f64(),
        r.answers
            .iter()
            .map(|a| a.at)
            .max()
            .unwrap_or_default()
            .as_secs_f64()
    );
    for ((kind, outcome), n) in &by {
        println!("  {kind:?} {outcome}: {n}");
    }
    println!("  bad credentials: {bad} (openssl verify sample: {openssl} leaves)");
    println!(
        "  injected: failures {}, corrupted signatures {}, unplugs {}, calls while unplugged {}, session invalidations {}, handle invalidations {}, signatures {}",
        r.counters.failures,
        r.counters.corrupted_signatures,
        r.counters.unplugs,
        r.counters.calls_while_unplugged,
        r.counters.session_invalidations,
        r.counters.handle_invalidations,
        r.counters.signatures
    );
    match rec {
        Some(d) => println!(
            "  recovery: rate before {pre:.0}/s; back within 10% {} ms after the fault ended",
            d.as_millis()
        ),
        None => {
            println!("  recovery: rate before {pre:.0}/s; not back within 10% before the run ended")
        }
    }
    println!("  successes per 100 ms: {buckets:?}");
}

async fn one_percent_device_errors(rig: &Rig, control: Control) -> Control {
    let (r, control) = fault_run(
        rig,
        control,
        Plan {
            name: "1% CKR_DEVICE_ERROR on C_Sign for 2 s (longer until 3 failed)",
            before: Duration::from_millis(1500),
            after: Duration::from_millis(1500),
        },
        |mut c, t0, poke| async move {
            let seq = c
                .fail_rate(0.01, CKR_DEVICE_ERROR, &[OpKind::Sign], 7)
                .unwrap();
            let base = applied(&c, seq, &poke).await.failures;
            // 2 s, and on until the device has failed a few signatures (a slow debug build signs few): at most 30 s.
            let since = Instant::now();
            loop {
                // The fault lasts while the load runs: its length is the thing under test (bounded at 30 s).
                tokio::time::sleep(Duration::from_millis(100)).await;
                let failed = c.counters().unwrap().failures - base;
                let held = since.elapsed();
                if (held >= Duration::from_secs(2) && failed >= 3)
                    || held >= Duration::from_secs(30)
                {
                    break;
                }
            }
            let seq = c.clear().unwrap();
            applied(&c, seq, &poke).await;
            (c, t0.elapsed())
        },
    )
    .await;
    assert!(r.counters.failures > 0, "the device failed some signatures");
    control
}

async fn device_unplugged_for_two_seconds(rig: &Rig, control: Control) -> Control {
    let (r, control) = fault_run(
        rig,
        control,
        Plan {
            name: "device unplugged for 2 s",
            before: Duration::from_millis(1500),
            after: Duration::from_millis(2000),
        },
        |mut c, t0, poke| async move {
            let seq = c.unplug_for(Duration::from_secs(2)).unwrap();
            applied(&c, seq, &poke).await;
            let gone = t0.elapsed();
            // The thing under test: the load runs on while the device is away.
            tokio::time::sleep(Duration::from_secs(2)).await;
            // The device counts the 2 s from when it applied the plan (within a poll interval of `gone`).
            (c, gone + Duration::from_secs(2))
        },
    )
    .await;
    assert_eq!(r.counters.unplugs, 1);
    assert!(
        r.counters.calls_while_unplugged > 0,
        "the appliance noticed"
    );
    control
}

async fn all_sessions_invalidated(rig: &Rig, control: Control) -> Control {
    let (r, control) = fault_run(
        rig,
        control,
        Plan {
            name: "every session invalidated, 3 times 400 ms apart",
            before: Duration::from_millis(1500),
            after: Duration::from_millis(1500),
        },
        |mut c, t0, poke| async move {
            for i in 0..3 {
                if i > 0 {
                    // The fault's shape: invalidations 400 ms apart under load.
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                let seq = c.invalidate_sessions().unwrap();
                applied(&c, seq, &poke).await;
            }
            (c, t0.elapsed())
        },
    )
    .await;
    assert_eq!(r.counters.session_invalidations, 3);
    control
}

async fn corrupted_signatures(rig: &Rig, control: Control) -> Control {
    let (r, control) = fault_run(
        rig,
        control,
        Plan {
            name: "5% of signatures corrupted for 2 s",
            before: Duration::from_millis(1500),
            after: Duration::from_millis(1500),
        },
        |mut c, t0, poke| async move {
            let seq = c.corrupt_rate(0.05).unwrap();
            applied(&c, seq, &poke).await;
            // The thing under test: the load runs on while 5% of the signatures are corrupted.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let seq = c.clear().unwrap();
            applied(&c, seq, &poke).await;
            (c, t0.elapsed())
        },
    )
    .await;
    assert!(
        r.counters.corrupted_signatures > 0,
        "the device corrupted some signatures"
    );
    let caught = r
        .answers
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::Refused(Code::Internal)))
        .count();
    assert!(
        caught > 0,
        "the post-sign checks refused what was corrupted"
    );
    control
}

/// An HSM cluster fails over to a member that numbers its objects differently: every cached key handle is
/// invalid. The workers look their keys up again and retry, so no request fails for it.
async fn key_handles_invalidated(rig: &Rig, control: Control) -> Control {
    let (r, control) = fault_run(
        rig,
        control,
        Plan {
            name: "every key handle renumbered (HSM cluster fail-over)",
            before: Duration::from_millis(1500),
            after: Duration::from_millis(1500),
        },
        |mut c, t0, poke| async move {
            let seq = c.invalidate_handles().unwrap();
            applied(&c, seq, &poke).await;
            (c, t0.elapsed())
        },
    )
    .await;
    assert_eq!(r.counters.handle_invalidations, 1);
    let failed: Vec<&Outcome> = r
        .answers
        .iter()
        .map(|a| &a.outcome)
        .filter(|o| {
            matches!(
                o,
                Outcome::Refused(Code::FailedPrecondition | Code::Internal | Code::Unavailable)
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "requests failed for stale key handles: {failed:?}"
    );
    control
}

/// GET /metrics from the appliance's Prometheus endpoint (plain HTTP on loopback).
async fn scrape(rig: &Rig) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = rig.bed.app.metrics_addr().expect("the metrics endpoint");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tcp.read_to_string(&mut body).await.unwrap();
    body
}

fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).map(|v| v.trim().parse().unwrap()))
}

/// The only token returns nothing but corrupted signatures: after `max_bad_signatures` (3) failed post-sign checks
/// it leaves rotation. Over the wire: nothing that fails a verifier is returned, callers then get UNAVAILABLE naming
/// the post-sign check, `GetStatus` and the metrics show the token out and why, the health service says NOT_SERVING;
/// once the fault is cleared a probe signature brings the token back and SignData serves good signatures again.
async fn corrupting_token_leaves_rotation(rig: &Rig, mut control: Control) -> Control {
    use signet_proto::signet::v1::admin_client::AdminClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let seq = control.clear().unwrap();
    applied(&control, seq, &rig.poke).await;
    let audit_before = audit_lines(&rig.bed.audit(), SPIRE_A, "SignData").len();
    let seq = control.corrupt_rate(1.0).unwrap();
    applied(&control, seq, &rig.poke).await;
    let mut km = KeyManagerClient::new(rig.spire.clone());
    let sign = |n: u64| {
        let msg = format!("corrupting token {n}").into_bytes();
        let digest = ring::digest::digest(&ring::digest::SHA256, &msg);
        let req = km::SignDataRequest {
            key_id: KM_KEY.into(),
            data: digest.as_ref().to_vec(),
            signer_opts: Some(km::sign_data_request::SignerOpts::HashAlgorithm(
                km::HashAlgorithm::Sha256 as i32,
            )),
        };
        (msg, req)
    };
    let mut refused_by_check = 0;
    let unavailable = loop {
        assert!(
            refused_by_check < 20,
            "the corrupting token never left rotation"
        );
        let (_, req) = sign(refused_by_check);
        match tokio::time::timeout(ANSWER_WITHIN, km.sign_data(req))
            .await
            .expect("answered")
        {
            Ok(r) => panic!(
                "a signature by a corrupting token left: {:?}",
                r.into_inner()
            ),
            Err(s) if s.code() == Code::Internal => refused_by_check += 1,
            Err(s) if s.code() == Code::Unavailable => break s,
            Err(s) => panic!("unexpected status {s:?}"),
        }
    };
    assert!(
        unavailable
            .message()
            .contains("signatures failed the post-sign check"),
        "{unavailable:?}"
    );
    // One audit line per request, none of them a key use.
    let audit = rig.bed.audit();
    let lines = &audit_lines(&audit, SPIRE_A, "SignData")[audit_before..];
    assert_eq!(lines.len(), refused_by_check as usize + 1);
    assert!(
        lines.iter().all(|l| l["outcome"] != "key_used"),
        "{lines:?}"
    );

    let status = AdminClient::new(rig.admin.clone())
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let token = &status.tokens[0];
    assert!(!token.healthy, "{token:?}");
    assert!(
        token.last_error.starts_with("out of rotation: ")
            && token
                .last_error
                .ends_with("signatures failed the post-sign check"),
        "{token:?}"
    );
    let text = scrape(rig).await;
    assert_eq!(
        metric(&text, "signet_pipeline_token_healthy{token=\"hsm-sim\"} "),
        Some(0.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "signet_pipeline_token_bad_signatures_total{token=\"hsm-sim\"} "
        )
        .is_some_and(|n| n >= 3.0),
        "{text}"
    );
    let mut health = HealthClient::new(rig.admin.clone());
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let r = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        if r.status == ServingStatus::NotServing as i32 {
            break;
        }
        assert!(Instant::now() < until, "health never said NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The fault ends: the probe's signature verifies, the token is back, and SignData serves good signatures.
    let seq = control.clear().unwrap();
    let until = Instant::now() + Duration::from_secs(15);
    let mut n = 1000;
    loop {
        assert!(Instant::now() < until, "the token never came back");
        n += 1;
        let (msg, req) = sign(n);
        match km.sign_data(req).await {
            Ok(r) => {
                check_sign_data(&rig.judge, &msg, &r.into_inner()).unwrap();
                break;
            }
            Err(s) => assert!(
                matches!(s.code(), Code::Unavailable | Code::Internal),
                "{s:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(control.counters().unwrap().applied_seq >= seq);
    let status = AdminClient::new(rig.admin.clone())
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.tokens[0].healthy, "{:?}", status.tokens[0]);
    assert!(
        !status.tokens[0].last_error.contains("out of rotation"),
        "{:?}",
        status.tokens[0]
    );
    let text = scrape(rig).await;
    assert_eq!(
        metric(&text, "signet_pipeline_token_healthy{token=\"hsm-sim\"} "),
        Some(1.0)
    );
    control
}

/// The runs one after the other on one appliance (one token, one loaded module: its fault counters carry on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_runs_through_the_whole_appliance() {
    let rig = rig().await;
    let mut control = Control::create(&rig.control_file).unwrap();
    control = one_percent_device_errors(&rig, control).await;
    control = device_unplugged_for_two_seconds(&rig, control).await;
    control = all_sessions_invalidated(&rig, control).await;
    control = key_handles_invalidated(&rig, control).await;
    control = corrupted_signatures(&rig, control).await;
    control = corrupting_token_leaves_rotation(&rig, control).await;
    control.clear().unwrap();
    rig.bed.stop().await;
}
