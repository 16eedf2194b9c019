//! `signet bench --target spire`: a real SPIRE server driven through its own API as many agents drive it.
//!
//! For each set-up (SPIRE alone with its `memory` KeyManager, the ceiling; SPIRE with signet as its KeyManager;
//! SPIRE with signet as its UpstreamAuthority) the bench writes a `server.conf`, starts `spire-server` from the
//! binaries of `scripts/spire-install` (or drives one given by `--spire-address` and `--spire-socket`), and then,
//! over the server's admin socket, creates one join token per agent and `--batch` registration entries per agent
//! (parented to the agent's `spiffe://<td>/spire/agent/join_token/<token>` ID). Each agent attests over
//! `spire.api.server.agent.v1.Agent/AttestAgent` (the `join_token` attestor, with its own CSR) and then, over mTLS
//! with the agent SVID it received, asks `spire.api.server.svid.v1.SVID/BatchNewX509SVID` for an X509-SVID per
//! entry (one CSR each) or `NewJWTSVID` for one JWT-SVID of an entry. Every SVID is checked against the bundle SPIRE
//! publishes (Bundle.GetBundle); a bad one fails the bench.
//!
//! signet, for the plug-in set-ups, is the in-process appliance of `signet bench` (hsm-sim, SoftHSM2 or the TPM
//! rig's token, `--sessions`), with a bootstrap port: the plug-ins get their first credentials for join tokens, as
//! `signet spire config` sets them up. The report gives each set-up's rate, its ratio to SPIRE alone at the same
//! concurrency, latency percentiles, and SPIRE's CPU time per SVID (the server and its plug-in processes, from
//! /proc).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use signet_proto::connect;
use signet_proto::spire::api::server::agent::v1 as agentpb;
use signet_proto::spire::api::server::agent::v1::agent_client::AgentClient;
use signet_proto::spire::api::server::bundle::v1 as bundlepb;
use signet_proto::spire::api::server::bundle::v1::bundle_client::BundleClient;
use signet_proto::spire::api::server::entry::v1 as entrypb;
use signet_proto::spire::api::server::entry::v1::entry_client::EntryClient;
use signet_proto::spire::api::server::svid::v1 as svidpb;
use signet_proto::spire::api::server::svid::v1::svid_client::SvidClient;
use signet_proto::spire::api::types;
use tonic::transport::{Channel, Endpoint};

use crate::check::{Checker, Sampling};
use crate::drive::{self, Offer};
use crate::load::{Outcome, Pool, Workload};
use crate::stats::{LatencySummary, per_second, ratio};

/// What SPIRE runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpireSetup {
    /// SPIRE alone: its CA key in memory (KeyManager "memory"); the ceiling.
    Memory,
    /// signet as SPIRE's KeyManager: SPIRE's CA key on signet's token, every SVID signed through SignData.
    KeyManager,
    /// signet as SPIRE's KeyManager with `--embedded`: the plug-in runs an appliance of its own in its process (on
    /// a SoftHSM2 token of its own), so SignData goes through no TLS, TCP or second gRPC server.
    KeyManagerEmbedded,
    /// signet as SPIRE's UpstreamAuthority: signet's root signs SPIRE's CA; SPIRE signs SVIDs with a key in memory.
    UpstreamAuthority,
}

impl SpireSetup {
    /// The set-up in words.
    pub fn label(self) -> &'static str {
        match self {
            SpireSetup::Memory => "SPIRE alone (KeyManager memory)",
            SpireSetup::KeyManager => "SPIRE + signet KeyManager",
            SpireSetup::KeyManagerEmbedded => "SPIRE + signet KeyManager --embedded",
            SpireSetup::UpstreamAuthority => "SPIRE + signet UpstreamAuthority",
        }
    }
}

/// The server.conf stanza of a signet plug-in, for a join token: what `signet spire config` prints.
pub type StanzaMaker = Box<
    dyn Fn(
            SpireSetup,
            &signet_proto::signet::v1::CreateJoinTokenResponse,
            &Path,
        ) -> Result<String, String>
        + Send
        + Sync,
>;

/// Where the SPIRE binaries are: `--spire-bin-dir`, else `SIGNET_SPIRE_BIN_DIR`, else `scripts/spire-install`'s
/// cache (`$XDG_CACHE_HOME` or `~/.cache`, `signet/spire-1.15.3/bin`).
pub fn bin_dir(flag: Option<&Path>) -> Result<PathBuf, String> {
    let dir = match flag {
        Some(d) => d.to_path_buf(),
        None => match std::env::var_os("SIGNET_SPIRE_BIN_DIR") {
            Some(d) => PathBuf::from(d),
            None => {
                let cache = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .ok_or("neither XDG_CACHE_HOME nor HOME is set: give --spire-bin-dir")?;
                cache.join("signet/spire-1.15.3/bin")
            }
        },
    };
    if !dir.join("spire-server").is_file() {
        return Err(format!(
            "no spire-server in {}: build SPIRE with scripts/spire-install (it prints the directory) or give \
             --spire-bin-dir",
            dir.display()
        ));
    }
    Ok(dir)
}

/// A spire-server process the bench started, stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct SpireServer {
    child: Option<Child>,
    /// host:port of its TCP API.
    pub addr: String,
    /// Its admin socket.
    pub socket: PathBuf,
    /// Its log (stdout and stderr).
    pub log: PathBuf,
}

impl SpireServer {
    /// The server.conf of a bench server in `dir` on `port`, with `plugins` beside the sqlite DataStore and the
    /// join_token NodeAttestor. Rate limits are off (every agent of the bench comes from 127.0.0.1) and the entry
    /// cache reloads every second (entries the bench creates are served soon).
    pub fn conf(dir: &Path, port: u16, trust_domain: &str, plugins: &str) -> String {
        format!(
            "server {{\n  bind_address = \"127.0.0.1\"\n  bind_port = \"{port}\"\n  socket_path = \"{sock}\"\n  \
             trust_domain = \"{trust_domain}\"\n  data_dir = \"{data}\"\n  log_level = \"WARN\"\n  \
             ca_ttl = \"2h\"\n  default_x509_svid_ttl = \"10m\"\n  default_jwt_svid_ttl = \"5m\"\n  \
             ratelimit {{\n    attestation = false\n    signing = false\n  }}\n  \
             experimental {{\n    cache_reload_interval = \"1s\"\n  }}\n}}\n\
             plugins {{\n  DataStore \"sql\" {{\n    plugin_data {{\n      database_type = \"sqlite3\"\n      \
             connection_string = \"{data}/datastore.sqlite3\"\n    }}\n  }}\n  \
             NodeAttestor \"join_token\" {{\n    plugin_data {{}}\n  }}\n{plugins}}}\n",
            sock = dir.join("api.sock").display(),
            data = dir.join("data").display(),
        )
    }

    /// Writes the configuration into `dir` and starts `spire-server run`.
    pub fn start(
        bin: &Path,
        dir: &Path,
        trust_domain: &str,
        plugins: &str,
    ) -> Result<Self, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("a free port: {e}"))?
            .port();
        let conf = dir.join("server.conf");
        std::fs::write(&conf, Self::conf(dir, port, trust_domain, plugins))
            .map_err(|e| format!("writing {}: {e}", conf.display()))?;
        let log = dir.join("server.log");
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(bin.join("spire-server"))
            .args(["run", "-config"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.join("spire-server").display()))?;
        Ok(SpireServer {
            child: Some(child),
            addr: format!("127.0.0.1:{port}"),
            socket: dir.join("api.sock"),
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits (at most `limit`) until the admin socket answers Bundle.GetBundle; the error carries the log's tail.
    pub async fn ready(&mut self, limit: Duration) -> Result<Channel, String> {
        let end = Instant::now() + limit;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "spire-server exited ({status}): {}",
                    self.log_tail()
                ));
            }
            if let Ok(ch) = admin_channel(&self.socket).await
                && get_bundle(&ch).await.is_ok()
            {
                return Ok(ch);
            }
            if Instant::now() >= end {
                return Err(format!(
                    "spire-server did not answer on {} within {limit:?}: {}",
                    self.socket.display(),
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(15).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Stops the server: SIGTERM (SPIRE stops its plug-ins), SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for SpireServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A gRPC channel over SPIRE's admin socket (unix).
pub async fn admin_channel(socket: &Path) -> Result<Channel, String> {
    let socket = socket.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|e| format!("SPIRE's admin socket: {}", connect::error_chain(&e)))
}

/// Bundle.GetBundle.
async fn get_bundle(admin: &Channel) -> Result<types::Bundle, String> {
    BundleClient::new(admin.clone())
        .get_bundle(bundlepb::GetBundleRequest::default())
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("Bundle.GetBundle: {}: {}", s.code(), s.message()))
}

/// A checker for SPIRE's bundle: its X.509 authorities and its JWT authorities (EC keys).
fn checker(bundle: &types::Bundle) -> Checker {
    use x509_parser::prelude::FromDer as _;
    let mut jwt_keys = Vec::new();
    for k in &bundle.jwt_authorities {
        let Ok((_, spki)) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&k.public_key) else {
            continue;
        };
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string());
        let alg = match curve.as_deref() {
            Some("1.2.840.10045.3.1.7") => "ES256",
            Some("1.3.132.0.34") => "ES384",
            _ => continue,
        };
        jwt_keys.push((k.key_id.clone(), alg, spki.subject_public_key.data.to_vec()));
    }
    Checker {
        roots: bundle
            .x509_authorities
            .iter()
            .map(|a| a.asn1.clone())
            .collect(),
        jwt_keys,
        audience: "signet-bench".into(),
        ..Checker::default()
    }
}

fn spiffe_id(td: &str, path: &str) -> types::Spiffeid {
    types::Spiffeid {
        trust_domain: td.to_string(),
        path: path.to_string(),
    }
}

/// One attested agent: its connection (mTLS with its agent SVID) and its entries (id, SPIFFE ID).
#[derive(Debug, Clone)]
pub struct Agent {
    /// spiffe://<td>/spire/agent/join_token/<token>.
    pub id: String,
    /// The connection to SPIRE's TCP API with the agent's SVID.
    pub channel: Channel,
    /// The agent's registration entries: (entry id, SPIFFE ID).
    pub entries: Vec<(String, String)>,
}

/// The TLS client of an agent: SPIRE's server checked by its SPIFFE ID against `roots`, `identity` presented.
fn agent_tls(
    td: &str,
    roots: Vec<Vec<u8>>,
    identity: Option<tokio_rustls::rustls::sign::CertifiedKey>,
) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    let verifier = Arc::new(connect::ApplianceVerifier::new(
        connect::LiveRoots::new(roots),
        connect::ServerAuth::Spiffe(format!("spiffe://{td}/spire/server")),
    ));
    let identity = identity.map(|k| {
        Arc::new(connect::SwappableIdentity::new(Some(k)))
            as Arc<dyn tokio_rustls::rustls::client::ResolvesClientCert>
    });
    Ok(Arc::new(connect::client_config(verifier, identity)?))
}

fn tune(e: Endpoint) -> Endpoint {
    e.connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .initial_connection_window_size(Some(8 << 20))
        .initial_stream_window_size(Some(2 << 20))
}

/// Creates `agents` join tokens and `per_agent` entries for each, attests every agent, and waits (bounded) until
/// SPIRE's entry cache serves the last agent's entries.
pub async fn prepare_agents(
    admin: &Channel,
    addr: &str,
    td: &str,
    roots: &[Vec<u8>],
    agents: usize,
    per_agent: usize,
) -> Result<Vec<Agent>, String> {
    let mut tokens = Vec::with_capacity(agents);
    for _ in 0..agents {
        let t = AgentClient::new(admin.clone())
            .create_join_token(agentpb::CreateJoinTokenRequest {
                ttl: 600,
                ..Default::default()
            })
            .await
            .map_err(|s| format!("Agent.CreateJoinToken: {}: {}", s.code(), s.message()))?
            .into_inner();
        tokens.push(t.value);
    }
    let uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(0);
    let mut wanted = Vec::with_capacity(agents * per_agent);
    for (i, token) in tokens.iter().enumerate() {
        for j in 0..per_agent {
            wanted.push((
                i,
                types::Entry {
                    spiffe_id: Some(spiffe_id(td, &format!("/bench/agent-{i}/workload-{j}"))),
                    parent_id: Some(spiffe_id(td, &format!("/spire/agent/join_token/{token}"))),
                    selectors: vec![types::Selector {
                        r#type: "unix".into(),
                        value: format!("uid:{uid}"),
                    }],
                    ..Default::default()
                },
            ));
        }
    }
    let mut entries: Vec<Vec<(String, String)>> = vec![Vec::new(); agents];
    for chunk in wanted.chunks(100) {
        let r = EntryClient::new(admin.clone())
            .batch_create_entry(entrypb::BatchCreateEntryRequest {
                entries: chunk.iter().map(|(_, e)| e.clone()).collect(),
                output_mask: None,
            })
            .await
            .map_err(|s| format!("Entry.BatchCreateEntry: {}: {}", s.code(), s.message()))?
            .into_inner();
        if r.results.len() != chunk.len() {
            return Err(format!(
                "Entry.BatchCreateEntry answered {} results for {} entries",
                r.results.len(),
                chunk.len()
            ));
        }
        for ((agent, asked), res) in chunk.iter().zip(r.results) {
            let status = res.status.unwrap_or_default();
            let Some(e) = res.entry.filter(|_| status.code == 0) else {
                return Err(format!(
                    "Entry.BatchCreateEntry refused an entry: {}",
                    status.message
                ));
            };
            let id = asked
                .spiffe_id
                .as_ref()
                .map(|s| format!("spiffe://{}{}", s.trust_domain, s.path))
                .unwrap_or_default();
            entries[*agent].push((e.id, id));
        }
    }
    // Attestation: no client certificate, the server checked against the bundle.
    let attest_ch = connect::channel(addr, agent_tls(td, roots.to_vec(), None)?, tune)
        .await
        .map_err(|e| format!("cannot connect to SPIRE at {addr}: {e}"))?;
    let mut out = Vec::with_capacity(agents);
    for (token, entries) in tokens.into_iter().zip(entries) {
        let (chain, key) = attest(&attest_ch, &token).await?;
        let identity = connect::certified_key(chain, key)?;
        let channel = connect::channel(addr, agent_tls(td, roots.to_vec(), Some(identity))?, tune)
            .await
            .map_err(|e| format!("cannot connect to SPIRE at {addr} as an agent: {e}"))?;
        out.push(Agent {
            id: format!("spiffe://{td}/spire/agent/join_token/{token}"),
            channel,
            entries,
        });
    }
    // SPIRE serves entries from a cache reloaded every second: wait until it has the last agent's.
    if let Some(last) = out.last() {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let r = SvidClient::new(last.channel.clone())
                .new_jwtsvid(svidpb::NewJwtsvidRequest {
                    entry_id: last
                        .entries
                        .first()
                        .map(|e| e.0.clone())
                        .unwrap_or_default(),
                    audience: vec!["signet-bench".into()],
                })
                .await;
            match r {
                Ok(_) => break,
                Err(s) if Instant::now() >= end => {
                    return Err(format!(
                        "SPIRE does not serve the bench's entries to {} within 60 s: {}: {}",
                        last.id,
                        s.code(),
                        s.message()
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    Ok(out)
}

/// Node attestation with a join token: the agent's X509-SVID chain (DER) and its key (PKCS#8 DER).
async fn attest(ch: &Channel, token: &str) -> Result<(Vec<Vec<u8>>, Vec<u8>), String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("agent key: {e}"))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| format!("agent CSR: {e}"))?;
    let first = agentpb::AttestAgentRequest {
        step: Some(agentpb::attest_agent_request::Step::Params(
            agentpb::attest_agent_request::Params {
                data: Some(types::AttestationData {
                    r#type: "join_token".into(),
                    payload: token.as_bytes().to_vec(),
                }),
                params: Some(agentpb::AgentX509svidParams {
                    csr: csr.der().to_vec(),
                }),
            },
        )),
    };
    let mut stream = AgentClient::new(ch.clone())
        .attest_agent(tokio_stream::iter([first]))
        .await
        .map_err(|s| format!("Agent.AttestAgent: {}: {}", s.code(), s.message()))?
        .into_inner();
    let reply = stream
        .message()
        .await
        .map_err(|s| format!("Agent.AttestAgent: {}: {}", s.code(), s.message()))?
        .ok_or("Agent.AttestAgent: the stream closed without an answer")?;
    match reply.step {
        Some(agentpb::attest_agent_response::Step::Result(r)) => {
            let svid = r
                .svid
                .ok_or("Agent.AttestAgent: a result without an SVID")?;
            Ok((svid.cert_chain, key.serialize_der()))
        }
        _ => Err("Agent.AttestAgent: a challenge for a join token (expected the result)".into()),
    }
}

/// What to measure and how.
#[derive(Debug, Clone)]
pub struct SpirePlan {
    /// X509 (BatchNewX509SVID) or Jwt (NewJWTSVID).
    pub workload: Workload,
    /// Concurrencies (= agents) to run at.
    pub levels: Vec<usize>,
    /// Entries per agent (X509-SVIDs per BatchNewX509SVID).
    pub per_agent: usize,
    /// Stop each run after this many requests.
    pub requests: Option<u64>,
    /// Stop each run after this long.
    pub duration: Option<Duration>,
    /// Open loop: SVIDs a second.
    pub rate: Option<f64>,
    /// Seconds of load before each run is measured.
    pub warmup: Duration,
    /// Which SVIDs to check.
    pub sampling: Arc<Sampling>,
    /// No progress bar.
    pub quiet: bool,
    /// The longest a run may last.
    pub hard_limit: Duration,
}

/// One run: one set-up at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct SpireRun {
    /// The set-up (`external` for a server given by address).
    pub setup: String,
    /// What it was, in words.
    pub description: String,
    /// Agents.
    pub concurrency: usize,
    /// SVIDs received.
    pub credentials: u64,
    /// Requests answered.
    pub requests: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// SVIDs a second.
    pub rate: f64,
    /// This rate over SPIRE alone's at the same concurrency.
    pub ratio_to_memory: Option<f64>,
    /// Request latency.
    pub latency: LatencySummary,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// SVIDs checked against SPIRE's bundle.
    pub checked: u64,
    /// SVIDs that failed the check.
    pub bad_credentials: u64,
    /// Why some failed.
    pub bad_examples: Vec<String>,
    /// CPU time of spire-server and its plug-in processes per SVID, microseconds.
    pub spire_cpu_us_per_credential: Option<f64>,
    /// Cores SPIRE kept busy on average.
    pub spire_cores_busy: Option<f64>,
}

/// The whole SPIRE bench.
#[derive(Debug, Clone, Serialize)]
pub struct SpireReport {
    /// The SPIRE RPC.
    pub workload: Workload,
    /// Closed or open loop.
    pub loop_mode: String,
    /// X509-SVIDs per BatchNewX509SVID (entries per agent).
    pub entries_per_agent: usize,
    /// `spire-server --version`.
    pub spire_version: String,
    /// The appliance the plug-ins used, in words.
    pub signet: Option<String>,
    /// Every run.
    pub runs: Vec<SpireRun>,
    /// Load average at the start and the end.
    pub load_average: (String, String),
    /// Cores of the machine.
    pub cores: usize,
}

impl SpireReport {
    /// The summary table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let what = match self.workload {
            Workload::X509 => format!(
                "SVID.BatchNewX509SVID, {} CSRs a request (one per entry of the agent)",
                self.entries_per_agent
            ),
            _ => "SVID.NewJWTSVID, one JWT-SVID a request".into(),
        };
        let _ = writeln!(
            s,
            "signet bench --target spire: {what}, {} loop, SPIRE {}",
            self.loop_mode, self.spire_version
        );
        if let Some(sig) = &self.signet {
            let _ = writeln!(s, "signet: {sig}");
        }
        let _ = writeln!(
            s,
            "{:<37} {:>6} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}  errors",
            "set-up",
            "agents",
            "SVIDs/s",
            "x alone",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "checked",
            "bad",
            "spire µs"
        );
        for r in &self.runs {
            let errors = crate::report::error_summary(&r.errors);
            let _ = writeln!(
                s,
                "{:<37} {:>6} {:>9.0} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>8} {:>8} {:>9}  {errors}",
                r.description,
                r.concurrency,
                r.rate,
                r.ratio_to_memory.map_or("-".into(), |v| format!("{v:.3}")),
                r.latency.p50_ms,
                r.latency.p90_ms,
                r.latency.p99_ms,
                r.checked,
                r.bad_credentials,
                r.spire_cpu_us_per_credential
                    .map_or("-".into(), |v| format!("{v:.0}")),
            );
            for b in &r.bad_examples {
                let _ = writeln!(s, "       bad SVID: {b}");
            }
        }
        let _ = writeln!(
            s,
            "x alone: the rate over SPIRE alone's at the same number of agents; spire µs: CPU of spire-server and \
             its plug-in processes per SVID"
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

    /// Draws SVIDs a second against agents, one line per set-up, into an SVG or a PNG.
    pub fn write_plot(&self, path: &Path) -> Result<(), String> {
        let series: Vec<(String, Vec<(usize, f64)>)> =
            self.runs
                .iter()
                .fold(Vec::<(String, Vec<(usize, f64)>)>::new(), |mut acc, r| {
                    match acc.iter_mut().find(|(d, _)| *d == r.description) {
                        Some((_, pts)) => pts.push((r.concurrency, r.rate)),
                        None => acc.push((r.description.clone(), vec![(r.concurrency, r.rate)])),
                    }
                    acc
                });
        crate::report::plot_series(
            path,
            "signet bench --target spire: SVIDs/s against agents",
            "agents (log scale)",
            "SVIDs/s",
            &series,
        )
    }

    /// Bad SVIDs over every run.
    pub fn bad_credentials(&self) -> u64 {
        self.runs.iter().map(|r| r.bad_credentials).sum()
    }
}

/// `spire-server --version`.
pub fn version(bin: &Path) -> String {
    Command::new(bin.join("spire-server"))
        .arg("--version")
        .output()
        .map(|o| {
            let mut t = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if t.is_empty() {
                t = String::from_utf8_lossy(&o.stderr).trim().to_string();
            }
            t
        })
        .unwrap_or_else(|_| "?".into())
}

/// Measures one SPIRE server (ready, at `addr` with its admin channel) at every level of `plan`; `pid` for its CPU.
pub async fn measure(
    setup: &str,
    description: &str,
    admin: &Channel,
    addr: &str,
    pid: Option<u32>,
    plan: &SpirePlan,
    pool: &Arc<Pool>,
) -> Result<Vec<SpireRun>, String> {
    let bundle = get_bundle(admin).await?;
    let td = bundle.trust_domain.clone();
    let roots: Vec<Vec<u8>> = bundle
        .x509_authorities
        .iter()
        .map(|a| a.asn1.clone())
        .collect();
    if roots.is_empty() {
        return Err("SPIRE's bundle has no X.509 authority".into());
    }
    let checker = Arc::new(checker(&bundle));
    let most = plan.levels.iter().copied().max().unwrap_or(1);
    let agents = Arc::new(prepare_agents(admin, addr, &td, &roots, most, plan.per_agent).await?);
    let sampling = plan.sampling.clone();
    let mut runs = Vec::new();
    for &concurrency in &plan.levels {
        let request = {
            let (agents, pool, checker, sampling) = (
                agents.clone(),
                pool.clone(),
                checker.clone(),
                sampling.clone(),
            );
            let workload = plan.workload;
            move |agent: usize, seq: u64| {
                let a = agents[agent % concurrency].clone();
                let (pool, checker, sampling) = (pool.clone(), checker.clone(), sampling.clone());
                async move { one(workload, &a, agent, seq, &pool, &checker, &sampling).await }
            }
        };
        let offer = Offer {
            concurrency,
            requests: plan.requests,
            duration: plan.duration,
            rate: plan.rate,
            per_request: if plan.workload == Workload::X509 {
                plan.per_agent
            } else {
                1
            },
            hard_limit: plan.hard_limit,
        };
        if !plan.warmup.is_zero() {
            let warm = Offer {
                requests: None,
                duration: Some(plan.warmup),
                ..offer
            };
            let _ = drive::drive(warm, Arc::new(AtomicU64::new(0)), request.clone()).await;
        }
        let progress = Arc::new(AtomicU64::new(0));
        let bar = (!plan.quiet).then(|| {
            let bar = match plan.requests {
                Some(n) => indicatif::ProgressBar::new(n * offer.per_request as u64),
                None => indicatif::ProgressBar::no_length(),
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {pos} SVIDs ({per_sec})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_prefix(format!("{setup}, {concurrency} agents"));
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
        let cpu_before = pid.and_then(drive::process_tree_cpu_seconds);
        let mut out = drive::drive(offer, progress, request).await;
        let cpu_after = pid.and_then(drive::process_tree_cpu_seconds);
        if let Some(t) = ticker {
            t.abort();
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let seconds = out.elapsed.as_secs_f64();
        let cpu = cpu_before.zip(cpu_after).map(|(b, a)| a - b);
        runs.push(SpireRun {
            setup: setup.into(),
            description: description.into(),
            concurrency,
            credentials: out.credentials,
            requests: out.requests,
            seconds,
            rate: per_second(out.credentials, seconds),
            ratio_to_memory: None,
            latency: LatencySummary::from_micros(&mut out.latencies_us),
            errors: out.errors,
            checked: out.checked,
            bad_credentials: out.bad,
            bad_examples: out.bad_examples,
            spire_cpu_us_per_credential: cpu
                .filter(|_| out.credentials > 0)
                .map(|c| c * 1e6 / out.credentials as f64),
            spire_cores_busy: cpu.filter(|_| seconds > 0.0).map(|c| c / seconds),
        });
    }
    Ok(runs)
}

/// One request of `agent` (its `seq`-th): what came back, checked.
async fn one(
    workload: Workload,
    a: &Agent,
    agent: usize,
    seq: u64,
    pool: &Pool,
    checker: &Checker,
    sampling: &Sampling,
) -> Result<Outcome, String> {
    let mut out = Outcome::default();
    let n = pool.csrs.len();
    let base = agent
        .wrapping_mul(7919)
        .wrapping_add((seq as usize).wrapping_mul(a.entries.len().max(1)));
    match workload {
        Workload::X509 => {
            let params = a
                .entries
                .iter()
                .enumerate()
                .map(|(k, (entry_id, _))| svidpb::NewX509svidParams {
                    entry_id: entry_id.clone(),
                    csr: pool.csrs[(base + k) % n].0.clone(),
                })
                .collect();
            let r = SvidClient::new(a.channel.clone())
                .batch_new_x509svid(svidpb::BatchNewX509svidRequest { params })
                .await
                .map_err(|s| format!("{:?}", s.code()))?
                .into_inner();
            for (k, res) in r.results.into_iter().enumerate() {
                let code = res.status.as_ref().map_or(0, |s| s.code);
                match res.svid.filter(|_| code == 0) {
                    Some(svid) => {
                        out.credentials += 1;
                        if sampling.take() {
                            let id = a.entries.get(k).map(|e| e.1.as_str()).unwrap_or_default();
                            let spki = &pool.csrs[(base + k) % n].2;
                            out.judge(checker.x509_svid(&svid.cert_chain, id, spki));
                        }
                    }
                    None => out.error(format!("{:?}", tonic::Code::from_i32(code))),
                }
            }
        }
        _ => {
            let (entry_id, id) = &a.entries[(seq as usize) % a.entries.len().max(1)];
            let r = SvidClient::new(a.channel.clone())
                .new_jwtsvid(svidpb::NewJwtsvidRequest {
                    entry_id: entry_id.clone(),
                    audience: vec![checker.audience.clone()],
                })
                .await
                .map_err(|s| format!("{:?}", s.code()))?
                .into_inner();
            let token = r
                .svid
                .map(|s| s.token)
                .ok_or("a JWT-SVID answer without an SVID")?;
            out.credentials += 1;
            if sampling.take() {
                out.judge(checker.jwt_svid(&token, id));
            }
        }
    }
    Ok(out)
}

/// Sets the ratios to SPIRE alone at the same concurrency.
pub fn set_ratios(runs: &mut [SpireRun]) {
    let alone: BTreeMap<usize, f64> = runs
        .iter()
        .filter(|r| r.setup == "memory")
        .map(|r| (r.concurrency, r.rate))
        .collect();
    for r in runs {
        r.ratio_to_memory = alone.get(&r.concurrency).and_then(|&m| ratio(r.rate, m));
    }
}

/// The plug-ins block of a set-up; `stanza` renders signet's.
pub fn plugins(setup: SpireSetup, stanza: Option<&str>) -> Result<String, String> {
    let memory = "  KeyManager \"memory\" {\n    plugin_data {}\n  }\n";
    let signet = || stanza.ok_or("no signet plug-in stanza").map(indent);
    Ok(match setup {
        SpireSetup::Memory => memory.to_string(),
        SpireSetup::KeyManager | SpireSetup::KeyManagerEmbedded => signet()?,
        SpireSetup::UpstreamAuthority => format!("{memory}{}", signet()?),
    })
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_turns_rate_limits_off_and_plugins_go_in() {
        let c = SpireServer::conf(
            Path::new("/tmp/x"),
            8081,
            "example.org",
            &plugins(SpireSetup::Memory, None).unwrap(),
        );
        for want in [
            "bind_port = \"8081\"",
            "attestation = false",
            "signing = false",
            "KeyManager \"memory\"",
            "NodeAttestor \"join_token\"",
        ] {
            assert!(c.contains(want), "{want} missing from\n{c}");
        }
        assert!(plugins(SpireSetup::KeyManager, None).is_err());
        let embedded = plugins(
            SpireSetup::KeyManagerEmbedded,
            Some("KeyManager \"signet\" {\n}\n"),
        )
        .unwrap();
        assert!(
            embedded.contains("  KeyManager \"signet\" {") && !embedded.contains("\"memory\""),
            "{embedded}"
        );
        let ua = plugins(
            SpireSetup::UpstreamAuthority,
            Some("UpstreamAuthority \"signet\" {\n}\n"),
        )
        .unwrap();
        assert!(
            ua.contains("KeyManager \"memory\"") && ua.contains("  UpstreamAuthority \"signet\" {")
        );
    }

    #[test]
    fn ratios_are_to_spire_alone_at_the_same_concurrency() {
        let run = |setup: &str, concurrency: usize, rate: f64| SpireRun {
            setup: setup.into(),
            description: setup.into(),
            concurrency,
            credentials: 0,
            requests: 0,
            seconds: 1.0,
            rate,
            ratio_to_memory: None,
            latency: LatencySummary::default(),
            errors: BTreeMap::new(),
            checked: 0,
            bad_credentials: 0,
            bad_examples: Vec::new(),
            spire_cpu_us_per_credential: None,
            spire_cores_busy: None,
        };
        let mut runs = vec![
            run("memory", 1, 1000.0),
            run("memory", 4, 4000.0),
            run("key-manager", 1, 500.0),
            run("key-manager", 4, 1000.0),
            run("key-manager", 8, 1000.0),
        ];
        set_ratios(&mut runs);
        assert_eq!(runs[0].ratio_to_memory, Some(1.0));
        assert_eq!(runs[2].ratio_to_memory, Some(0.5));
        assert_eq!(runs[3].ratio_to_memory, Some(0.25));
        assert_eq!(runs[4].ratio_to_memory, None);
    }
}
