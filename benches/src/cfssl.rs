//! `signet bench --target cfssl`: a peer CA side by side with signet, in the same run, one CSR a request.
//!
//! The bench makes a P-256 CA (certificate and key in files that `cfssl serve` loads into memory), starts Debian's
//! `cfssl serve` (package `golang-cfssl`) on 127.0.0.1, and drives its `/api/v1/cfssl/sign` endpoint over HTTP/1.1
//! keep-alive connections (one per agent; cfssl serves no TLS), one CSR from the bench's pool a request. Every
//! certificate is checked (signed by the CA, for the CSR's key, valid now); whether cfssl kept the CSR's SPIFFE ID
//! (URI SAN) is reported, not required: cfssl leaves it out. The server's CPU time per certificate comes from
//! /proc/<pid>/stat. signet's delegated and direct modes are then measured in the same run by the regular bench
//! (an in-process appliance, BatchMintX509SVID with one CSR a request).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::BodyExt as _;
use hyper::body::Bytes;
use serde::Serialize;

use crate::check::{Checker, Sampling};
use crate::drive::{self, Offer};
use crate::load::{Outcome, Pool};
use crate::stats::{LatencySummary, per_second};

/// The `cfssl` program: `--cfssl-bin`, else `cfssl` on the PATH.
pub fn binary(flag: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("cfssl"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "cfssl is not installed: apt-get install -y golang-cfssl (or give --cfssl-bin)"
                .to_string()
        })
}

/// A `cfssl serve` the bench started, killed when dropped.
#[derive(Debug)]
pub struct Cfssl {
    child: Child,
    /// host:port.
    pub addr: String,
    /// The CA certificate (DER).
    pub ca_der: Vec<u8>,
    log: PathBuf,
}

impl Cfssl {
    /// Makes a P-256 CA in `dir` and starts `cfssl serve` with it on a free port of 127.0.0.1.
    pub fn start(bin: &Path, dir: &Path) -> Result<Self, String> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| format!("CA key: {e}"))?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "signet bench cfssl CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = params
            .self_signed(&key)
            .map_err(|e| format!("CA certificate: {e}"))?;
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| format!("writing {}: {e}", p.display()))?;
            Ok::<_, String>(p)
        };
        let ca_pem = write("ca.pem", &ca.pem())?;
        let ca_key = write("ca-key.pem", &key.serialize_pem())?;
        let config = write(
            "config.json",
            r#"{"signing":{"default":{"expiry":"1h","usages":["digital signature","key encipherment","server auth","client auth"]}}}"#,
        )?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("a free port: {e}"))?
            .port();
        let log = dir.join("cfssl.log");
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(bin)
            .args(["serve", "-address", "127.0.0.1", "-port", &port.to_string()])
            .arg("-ca")
            .arg(&ca_pem)
            .arg("-ca-key")
            .arg(&ca_key)
            .arg("-config")
            .arg(&config)
            // Errors only: a log line per request would be CPU spent on what signet does not do either.
            .args(["-loglevel", "3"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        Ok(Cfssl {
            child,
            addr: format!("127.0.0.1:{port}"),
            ca_der: ca.der().to_vec(),
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most `limit`) until cfssl signs `csr_pem`; the certificate's DER.
    pub async fn ready(&mut self, csr_pem: &str, limit: Duration) -> Result<Vec<u8>, String> {
        let end = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "cfssl exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ));
            }
            let attempt = async {
                let mut c = Client::connect(&self.addr).await?;
                c.sign(csr_pem).await
            };
            match attempt.await {
                Ok(der) => return Ok(der),
                Err(e) if Instant::now() >= end => {
                    return Err(format!(
                        "cfssl at {} does not sign within {limit:?}: {e}",
                        self.addr
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

impl Drop for Cfssl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 keep-alive connection to cfssl.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    host: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `addr` (host:port).
    pub async fn connect(addr: &str) -> Result<Self, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to cfssl at {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| format!("HTTP/1.1 to {addr}: {e}"))?;
        tokio::spawn(conn);
        Ok(Client {
            sender,
            host: addr.to_string(),
        })
    }

    /// POST /api/v1/cfssl/sign with one CSR (PEM): the certificate's DER.
    pub async fn sign(&mut self, csr_pem: &str) -> Result<Vec<u8>, String> {
        let body = serde_json::json!({ "certificate_request": csr_pem }).to_string();
        let req = hyper::Request::post("/api/v1/cfssl/sign")
            .header(hyper::header::HOST, &self.host)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("HTTP {}", status.as_u16()));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("the answer is not JSON: {e}"))?;
        let pem = v["result"]["certificate"]
            .as_str()
            .ok_or("the answer has no result.certificate")?;
        signet_proto::connect::pem_blocks(pem.as_bytes(), "CERTIFICATE")?
            .into_iter()
            .next()
            .ok_or_else(|| "the answer's certificate is not PEM".to_string())
    }
}

/// A CSR (DER) as PEM.
pub fn csr_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(line));
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE REQUEST-----\n");
    s
}

/// Whether the certificate (DER) carries a URI SAN.
pub fn has_uri_san(der: &[u8]) -> bool {
    use x509_parser::prelude::*;
    X509Certificate::from_der(der).is_ok_and(|(_, c)| {
        c.subject_alternative_name()
            .ok()
            .flatten()
            .is_some_and(|s| {
                s.value
                    .general_names
                    .iter()
                    .any(|n| matches!(n, GeneralName::URI(_)))
            })
    })
}

/// One server of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct PeerRow {
    /// cfssl, signet delegated, signet direct.
    pub server: String,
    /// Certificates received.
    pub credentials: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Certificates a second.
    pub rate: f64,
    /// Request latency.
    pub latency: LatencySummary,
    /// The server's CPU time per certificate, microseconds.
    pub cpu_us_per_certificate: Option<f64>,
    /// Cores the server kept busy.
    pub cores_busy: Option<f64>,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Certificates checked.
    pub checked: u64,
    /// Certificates that failed the check.
    pub bad_credentials: u64,
    /// Why some failed.
    pub bad_examples: Vec<String>,
    /// What the server is and does.
    pub notes: String,
}

/// cfssl against signet.
#[derive(Debug, Clone, Serialize)]
pub struct PeerReport {
    /// Agents (closed loop) or in-flight cap (open loop).
    pub concurrency: usize,
    /// Closed or open.
    pub loop_mode: String,
    /// `cfssl version`.
    pub cfssl_version: String,
    /// One row per server.
    pub rows: Vec<PeerRow>,
    /// Load average at the start and the end.
    pub load_average: (String, String),
    /// Cores.
    pub cores: usize,
}

impl PeerReport {
    /// The summary table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "signet bench --target cfssl: one CSR a request, {} loop, {} agents; cfssl {}",
            self.loop_mode, self.concurrency, self.cfssl_version
        );
        let _ = writeln!(
            s,
            "{:<16} {:>9} {:>8} {:>8} {:>8} {:>10} {:>6} {:>8} {:>5}  errors; notes",
            "server",
            "certs/s",
            "p50 ms",
            "p99 ms",
            "p99.9",
            "CPU µs/crt",
            "cores",
            "checked",
            "bad"
        );
        for r in &self.rows {
            let errors = crate::report::error_summary(&r.errors);
            let _ = writeln!(
                s,
                "{:<16} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>10} {:>6} {:>8} {:>5}  {errors}; {}",
                r.server,
                r.rate,
                r.latency.p50_ms,
                r.latency.p99_ms,
                r.latency.p999_ms,
                r.cpu_us_per_certificate
                    .map_or("-".into(), |v| format!("{v:.0}")),
                r.cores_busy.map_or("-".into(), |v| format!("{v:.2}")),
                r.checked,
                r.bad_credentials,
                r.notes
            );
            for b in &r.bad_examples {
                let _ = writeln!(s, "       bad certificate: {b}");
            }
        }
        let _ = writeln!(
            s,
            "CPU µs/crt: the server process's CPU time (/proc) per certificate; signet runs in the bench's process, \
             its client threads' CPU taken out"
        );
        let _ = writeln!(
            s,
            "load average {} -> {} on {} cores",
            self.load_average.0, self.load_average.1, self.cores
        );
        s
    }

    /// Writes the JSON document.
    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        crate::report::write_json_file(self, path)
    }

    /// Bad certificates over every row.
    pub fn bad_credentials(&self) -> u64 {
        self.rows.iter().map(|r| r.bad_credentials).sum()
    }
}

/// `cfssl version`, first line.
pub fn version(bin: &Path) -> String {
    Command::new(bin)
        .arg("version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("Version:").trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

/// Measures a started, ready cfssl with `offer` (warm-up first): its row of the report.
pub async fn measure(
    cfssl: &Cfssl,
    offer: Offer,
    warmup: Duration,
    pool: &Arc<Pool>,
    sampling: Arc<Sampling>,
    quiet: bool,
) -> Result<PeerRow, String> {
    let mut clients = Vec::with_capacity(offer.concurrency);
    for _ in 0..offer.concurrency.max(1) {
        clients.push(tokio::sync::Mutex::new(Client::connect(&cfssl.addr).await?));
    }
    let clients = Arc::new(clients);
    let checker = Arc::new(Checker {
        roots: vec![cfssl.ca_der.clone()],
        ..Checker::default()
    });
    let pems: Arc<Vec<String>> = Arc::new(pool.csrs.iter().map(|c| csr_pem(&c.0)).collect());
    let uri_kept = Arc::new(AtomicBool::new(false));
    let request = {
        let (clients, checker, pool, pems, uri_kept) = (
            clients.clone(),
            checker.clone(),
            pool.clone(),
            pems,
            uri_kept.clone(),
        );
        move |agent: usize, seq: u64| {
            let (clients, checker, pool, pems, sampling, uri_kept) = (
                clients.clone(),
                checker.clone(),
                pool.clone(),
                pems.clone(),
                sampling.clone(),
                uri_kept.clone(),
            );
            async move {
                let k = (agent.wrapping_mul(7919).wrapping_add(seq as usize)) % pems.len();
                let der = clients[agent % clients.len()]
                    .lock()
                    .await
                    .sign(&pems[k])
                    .await?;
                let mut out = Outcome {
                    credentials: 1,
                    ..Outcome::default()
                };
                if sampling.take() {
                    if has_uri_san(&der) {
                        uri_kept.store(true, Ordering::Relaxed);
                    }
                    out.judge(checker.x509_chain(&[der], None, &pool.csrs[k].2));
                }
                Ok(out)
            }
        }
    };
    if !warmup.is_zero() {
        let warm = Offer {
            requests: None,
            duration: Some(warmup),
            ..offer
        };
        let _ = drive::drive(warm, Arc::new(AtomicU64::new(0)), request.clone()).await;
    }
    let progress = Arc::new(AtomicU64::new(0));
    let bar = (!quiet).then(|| {
        let bar = indicatif::ProgressBar::no_length();
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {pos} certificates ({per_sec})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix("cfssl");
        bar
    });
    let ticker = bar.clone().map(|bar| {
        let p = progress.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                bar.set_position(p.load(Ordering::Relaxed));
            }
        })
    });
    let before = drive::process_tree_cpu_seconds(cfssl.pid());
    let mut out = drive::drive(offer, progress, request).await;
    let after = drive::process_tree_cpu_seconds(cfssl.pid());
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let seconds = out.elapsed.as_secs_f64();
    let cpu = before.zip(after).map(|(b, a)| a - b);
    Ok(PeerRow {
        server: "cfssl".into(),
        credentials: out.credentials,
        seconds,
        rate: per_second(out.credentials, seconds),
        latency: LatencySummary::from_micros(&mut out.latencies_us),
        cpu_us_per_certificate: cpu
            .filter(|_| out.credentials > 0)
            .map(|c| c * 1e6 / out.credentials as f64),
        cores_busy: cpu.filter(|_| seconds > 0.0).map(|c| c / seconds),
        errors: out.errors,
        checked: out.checked,
        bad_credentials: out.bad,
        bad_examples: out.bad_examples,
        notes: format!(
            "HTTP/1.1 without TLS, key in memory, URI SAN {}",
            if uri_kept.load(Ordering::Relaxed) {
                "kept"
            } else {
                "dropped"
            }
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_pem_round_trips() {
        let der: Vec<u8> = (0..200u16).map(|i| i as u8).collect();
        let pem = csr_pem(&der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let back =
            signet_proto::connect::pem_blocks(pem.as_bytes(), "CERTIFICATE REQUEST").unwrap();
        assert_eq!(back, vec![der]);
    }
}
