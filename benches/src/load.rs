//! The load itself: simulated agents (async tasks) sending requests over a few HTTP/2 connections, closed-loop (each
//! agent sends its next request when the last one is answered) or open-loop (requests start at a fixed rate whatever
//! the answers do; latency counts from the moment a request was due, so a stalled server cannot hide its queue).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData as _, SanType};
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use signet_proto::spire::plugin::server::keymanager::v1 as km;
use signet_proto::spire::plugin::server::keymanager::v1::key_manager_client::KeyManagerClient;
use tonic::transport::Channel;

use crate::check::{Checker, Sampling};

/// The RPC a bench drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Issuer.BatchMintX509SVID: X509-SVIDs from pre-generated CSRs, `--batch` per request.
    X509,
    /// Issuer.MintJWTSVID: one JWT-SVID per request.
    Jwt,
    /// KeyManager.SignData: one SHA-256 digest signed per request (SPIRE's own CA signing path).
    SignData,
}

impl Workload {
    /// What one credential is called in reports.
    pub fn unit(self) -> &'static str {
        match self {
            Workload::X509 => "X509-SVIDs",
            Workload::Jwt => "JWT-SVIDs",
            Workload::SignData => "signatures",
        }
    }
}

/// Key types for the CSR pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CsrKeyType {
    /// ECDSA P-256 (SPIRE's default).
    EcP256,
    /// ECDSA P-384.
    EcP384,
    /// Ed25519.
    Ed25519,
}

/// Pre-generated requests, so the bench spends its CPU on the wire and the checks, not on key generation.
#[derive(Debug)]
pub struct Pool {
    /// (CSR DER, SPIFFE ID, the CSR key's SubjectPublicKeyInfo DER).
    pub csrs: Vec<(Vec<u8>, String, Vec<u8>)>,
    /// (message, SHA-256 of it) for SignData.
    pub messages: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Pool {
    /// `n` CSRs of `key_type` for `spiffe://<td>/workloads/bench/<i>`, and `n` messages.
    pub fn generate(td: &str, n: usize, key_type: CsrKeyType) -> Result<Self, String> {
        let alg = match key_type {
            CsrKeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            CsrKeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            CsrKeyType::Ed25519 => &rcgen::PKCS_ED25519,
        };
        let mut csrs = Vec::with_capacity(n);
        let mut messages = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("spiffe://{td}/workloads/bench/{i}");
            let kp = KeyPair::generate_for(alg).map_err(|e| format!("CSR key: {e}"))?;
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            let uri = id
                .clone()
                .try_into()
                .map_err(|e| format!("SPIFFE ID {id}: {e}"))?;
            params.subject_alt_names = vec![SanType::URI(uri)];
            let csr = params
                .serialize_request(&kp)
                .map_err(|e| format!("CSR: {e}"))?;
            let spki = kp.subject_public_key_info();
            csrs.push((csr.der().to_vec(), id, spki));
            let msg = format!("signet bench message {i}").into_bytes();
            let digest = ring::digest::digest(&ring::digest::SHA256, &msg)
                .as_ref()
                .to_vec();
            messages.push((msg, digest));
        }
        Ok(Pool { csrs, messages })
    }
}

/// How a run offers load.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The RPC.
    pub workload: Workload,
    /// CSRs per BatchMintX509SVID request.
    pub batch: usize,
    /// Simulated agents (closed loop) or the most requests in flight (open loop).
    pub concurrency: usize,
    /// Stop after this many requests.
    pub requests: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Open loop: credentials a second offered. None: closed loop.
    pub rate: Option<f64>,
    /// The KeyManager key id (SignData).
    pub key_id: String,
}

/// What a run saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Credentials received (X509-SVIDs, JWT-SVIDs or signatures).
    pub credentials: u64,
    /// Requests answered with success.
    pub requests: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Latency of each successful request, microseconds.
    pub latencies_us: Vec<u64>,
    /// Failures by kind (gRPC code, or the client's own reason).
    pub errors: BTreeMap<String, u64>,
    /// Credentials checked against the bundle.
    pub checked: u64,
    /// Credentials that failed the check.
    pub bad: u64,
    /// The first few reasons credentials failed.
    pub bad_examples: Vec<String>,
    /// Requests answered, by endpoint (index into [`Shared::endpoints`]).
    pub answered_by: BTreeMap<usize, u64>,
    /// Requests that failed on an endpoint for want of it (connection refused or lost) and were sent to the next.
    pub failovers: u64,
    /// X509-SVIDs whose serial number an earlier one of the run already carried (any fails the bench).
    pub duplicate_serials: u64,
}

impl Outcome {
    /// Adds `o` to this outcome.
    pub fn merge(&mut self, o: Outcome) {
        self.credentials += o.credentials;
        self.requests += o.requests;
        self.latencies_us.extend(o.latencies_us);
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.checked += o.checked;
        self.bad += o.bad;
        for (k, v) in o.answered_by {
            *self.answered_by.entry(k).or_default() += v;
        }
        self.failovers += o.failovers;
        self.duplicate_serials += o.duplicate_serials;
        for b in o.bad_examples {
            if self.bad_examples.len() < 5 {
                self.bad_examples.push(b);
            }
        }
    }

    /// Counts one failure of `kind`.
    pub fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }

    /// Counts one checked credential and, when it failed, why.
    pub fn judge(&mut self, verdict: Result<(), String>) {
        self.checked += 1;
        if let Err(e) = verdict {
            self.bad += 1;
            if self.bad_examples.len() < 5 {
                self.bad_examples.push(e);
            }
        }
    }
}

/// One appliance (replica) the bench drives: its address and the connections to it.
#[derive(Debug)]
pub struct Endpoint {
    /// host:port.
    pub addr: String,
    /// The connections; the agents whose home this endpoint is share them.
    pub channels: Vec<Channel>,
    /// Until when (milliseconds since [`Shared::epoch`]) the endpoint is passed over: set when it fails for want of
    /// a connection, so that the agents go to the next one at once.
    down_until_ms: AtomicU64,
}

impl Endpoint {
    /// An endpoint at `addr` with `channels` open to it.
    pub fn new(addr: String, channels: Vec<Channel>) -> Self {
        Self {
            addr,
            channels,
            down_until_ms: AtomicU64::new(0),
        }
    }
}

/// How long an endpoint that failed for want of a connection is passed over.
const DOWN_FOR: Duration = Duration::from_millis(500);

/// Everything the agents share.
#[derive(Debug)]
pub struct Shared {
    /// The appliances; agent `i`'s home is `endpoints[i % len]`, and a request that cannot reach its endpoint goes
    /// to the next one.
    pub endpoints: Vec<Endpoint>,
    /// The time origin of [`Endpoint`]'s marks.
    pub epoch: Instant,
    /// The serial numbers of the X509-SVIDs received so far.
    pub serials: std::sync::Mutex<std::collections::HashSet<Vec<u8>>>,
    /// Pre-generated requests.
    pub pool: Pool,
    /// The judge.
    pub checker: Checker,
    /// Which credentials to judge.
    pub sampling: Sampling,
    /// Credentials received so far (for the progress bar).
    pub progress: Arc<AtomicU64>,
}

/// The gRPC code's name, the kind an error is counted under.
fn kind(s: &tonic::Status) -> String {
    format!("{:?}", s.code())
}

/// Whether `s` says the endpoint could not be reached or the connection broke (so that another replica may answer
/// the request), rather than that the appliance refused or failed it.
fn unreachable(s: &tonic::Status) -> bool {
    match s.code() {
        // The bench never cancels a request itself: a cancelled one lost its connection.
        tonic::Code::Unavailable | tonic::Code::Cancelled => true,
        // A connection cut in the middle of a request surfaces as an unknown error from the HTTP/2 layer.
        tonic::Code::Unknown | tonic::Code::Internal => {
            let m = s.message().to_ascii_lowercase();
            [
                "transport",
                "connection",
                "broken pipe",
                "h2 protocol",
                "stream closed",
                "reset",
            ]
            .iter()
            .any(|w| m.contains(w))
        }
        _ => false,
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The endpoints to try for `agent`, in order: its home first, then the next ones; those marked down last.
    fn order(&self, agent: usize) -> Vec<usize> {
        let n = self.endpoints.len();
        let now = self.now_ms();
        let (mut up, mut down): (Vec<usize>, Vec<usize>) = (0..n)
            .map(|k| (agent + k) % n)
            .partition(|&e| self.endpoints[e].down_until_ms.load(Ordering::Relaxed) <= now);
        up.append(&mut down);
        up
    }

    fn mark_down(&self, e: usize) {
        let until = self.now_ms() + DOWN_FOR.as_millis() as u64;
        self.endpoints[e]
            .down_until_ms
            .fetch_max(until, Ordering::Relaxed);
    }

    /// Whether `leaf` (DER) carries a serial number seen before in this run.
    fn repeated_serial(&self, leaf: &[u8]) -> bool {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
            return false;
        };
        let serial = cert.raw_serial().to_vec();
        !self
            .serials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(serial)
    }
}

/// One request: sent to the agent's endpoint, and to the next ones while an endpoint cannot be reached; adds what it
/// saw to `out`.
async fn one(sh: &Shared, plan: &Plan, agent: usize, seq: u64, out: &mut Outcome) -> bool {
    let order = sh.order(agent);
    let last = order.len() - 1;
    for (i, e) in order.into_iter().enumerate() {
        let ep = &sh.endpoints[e];
        let ch = ep.channels[(agent / sh.endpoints.len()) % ep.channels.len()].clone();
        match attempt(sh, plan, agent, seq, ch, out).await {
            Ok(()) => {
                *out.answered_by.entry(e).or_default() += 1;
                return true;
            }
            Err(s) if i < last && unreachable(&s) => {
                sh.mark_down(e);
                out.failovers += 1;
            }
            Err(s) => {
                if unreachable(&s) {
                    sh.mark_down(e);
                }
                out.error(kind(&s));
                return false;
            }
        }
    }
    false
}

/// One request to one endpoint; on success, what came back is counted (and checked) in `out`.
async fn attempt(
    sh: &Shared,
    plan: &Plan,
    agent: usize,
    seq: u64,
    ch: Channel,
    out: &mut Outcome,
) -> Result<(), tonic::Status> {
    let n = sh.pool.csrs.len();
    let base = (seq as usize)
        .wrapping_mul(plan.batch.max(1))
        .wrapping_add(agent * 7919);
    match plan.workload {
        Workload::X509 => {
            let requests = (0..plan.batch)
                .map(|k| pb::X509svidRequest {
                    csr: sh.pool.csrs[(base + k) % n].0.clone(),
                    ttl_seconds: 600,
                })
                .collect();
            let r = IssuerClient::new(ch)
                .batch_mint_x509svid(pb::BatchMintX509svidRequest { requests })
                .await;
            match r {
                Ok(r) => {
                    for (k, res) in r.into_inner().results.into_iter().enumerate() {
                        match res.result {
                            Some(pb::x509svid_result::Result::Svid(svid)) => {
                                out.credentials += 1;
                                if svid
                                    .cert_chain
                                    .first()
                                    .is_some_and(|l| sh.repeated_serial(l))
                                {
                                    out.duplicate_serials += 1;
                                }
                                if sh.sampling.take() {
                                    let (_, id, spki) = &sh.pool.csrs[(base + k) % n];
                                    out.judge(sh.checker.x509_svid(&svid.cert_chain, id, spki));
                                }
                            }
                            Some(pb::x509svid_result::Result::Failure(f)) => {
                                out.error(format!("{:?}", tonic::Code::from_i32(f.code)))
                            }
                            None => out.error("empty batch result"),
                        }
                    }
                    Ok(())
                }
                Err(s) => Err(s),
            }
        }
        Workload::Jwt => {
            let id = &sh.pool.csrs[base % n].1;
            let r = IssuerClient::new(ch)
                .mint_jwtsvid(pb::MintJwtsvidRequest {
                    spiffe_id: id.clone(),
                    audience: vec![sh.checker.audience.clone()],
                    ttl_seconds: 300,
                })
                .await;
            match r {
                Ok(r) => {
                    out.credentials += 1;
                    if sh.sampling.take() {
                        out.judge(sh.checker.jwt_svid(&r.into_inner().token, id));
                    }
                    Ok(())
                }
                Err(s) => Err(s),
            }
        }
        Workload::SignData => {
            let (msg, digest) = &sh.pool.messages[base % n];
            let r = KeyManagerClient::new(ch)
                .sign_data(km::SignDataRequest {
                    key_id: plan.key_id.clone(),
                    data: digest.clone(),
                    signer_opts: Some(km::sign_data_request::SignerOpts::HashAlgorithm(
                        km::HashAlgorithm::Sha256 as i32,
                    )),
                })
                .await;
            match r {
                Ok(r) => {
                    out.credentials += 1;
                    if sh.sampling.take() {
                        out.judge(sh.checker.signature(msg, &r.into_inner().signature));
                    }
                    Ok(())
                }
                Err(s) => Err(s),
            }
        }
    }
}

/// Runs `plan` to its end (count or time, whichever comes first; at most `hard_limit` in any case), closed or open
/// loop as [`crate::drive`] offers it.
pub async fn run(sh: Arc<Shared>, plan: &Plan, hard_limit: Duration) -> Outcome {
    let offer = crate::drive::Offer {
        concurrency: plan.concurrency,
        requests: plan.requests,
        duration: plan.duration,
        rate: plan.rate,
        per_request: plan.batch,
        hard_limit,
    };
    let progress = sh.progress.clone();
    let plan = plan.clone();
    crate::drive::drive_counted(offer, progress, move |agent, seq| {
        let (sh, plan) = (sh.clone(), plan.clone());
        async move {
            let mut out = Outcome::default();
            let answered = one(&sh, &plan, agent, seq, &mut out).await;
            (answered, out)
        }
    })
    .await
}
