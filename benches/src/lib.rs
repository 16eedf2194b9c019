//! signet's benchmarks: `signet bench`, the load generator, and the criterion micro-benchmarks in `benches/`.
//!
//! # `signet bench`
//! Drives a running appliance (`--addr`) or one it starts in its own process (the default), with many simulated
//! agents over a few HTTP/2 connections: BatchMintX509SVID from pre-generated CSRs, MintJWTSVID, or KeyManager
//! SignData; closed loop (`--concurrency` agents) or open loop (`--rate`); a fixed `--requests` count or a
//! `--duration`; one concurrency or a `--sweep`. In the same run it measures the ceiling ([`ceiling`]): the bare
//! C_Sign rate of the same token with the same number of sessions, and, in process, a loop of the same
//! per-credential work without gRPC and pipeline. It reports signet's rate as a ratio of both. Every credential is
//! checked against the bundle ([`check`]; all of them up to 10,000 a second, `--check-rate` to sample); a bad one
//! fails the bench. Output: a progress bar, the summary table, `--json FILE` and `--plot FILE.svg` (or `.png`).
//!
//! CPU per credential comes from Admin.GetStatus (the server process's CPU time and peak RSS). In process the server
//! and the client share that process, so the client runs on its own tokio runtime whose threads are named
//! `bench-client`, the appliance on another, and the client's threads' CPU time is taken out of the server's.
//!
//! # The shape of the crates
//! `signet bench` is a subcommand of the `signet` binary, but its code lives here, and this library does not
//! depend on `signet`: `signet` depends on this crate and hands [`run`] a [`Launcher`], a function that starts an
//! appliance in process from an [`InProcess`] description and returns a [`Started`] (address, credentials, the
//! token for the ceiling, a loop of the same work, a stop function). The criterion benches take `signet` as a
//! dev-dependency (Cargo allows that cycle through dev-dependencies).
#![forbid(unsafe_code)]

pub mod ceiling;
pub mod cfssl;
pub mod check;
pub mod drive;
pub mod load;
pub mod report;
pub mod softhsm;
pub mod spire;
pub mod stats;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::{Args, ValueEnum};
use signet_proto::connect;
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::admin_client::AdminClient;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use signet_proto::spire::plugin::server::keymanager::v1 as km;
use signet_proto::spire::plugin::server::keymanager::v1::key_manager_client::KeyManagerClient;
use tokio_rustls::rustls;
use tonic::transport::{Channel, Endpoint};

use crate::ceiling::TokenSpec;
use crate::check::{Checker, Sampling};
use crate::load::{CsrKeyType, Plan, Pool, Shared, Workload};
use crate::report::{BenchReport, CeilingReport, RunReport, ServerUsage};
use crate::stats::{LatencySummary, per_second, ratio};

/// A boxed future (the launcher's answer).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Starts an appliance in process.
pub type Launcher = dyn Fn(InProcess) -> BoxFuture<Result<Started, String>> + Send + Sync;

/// An in-process loop of the same per-credential work as the appliance's (X509-SVIDs from these CSRs, on these
/// threads, for this long): credentials a second.
pub type WorkLoop = Box<dyn Fn(&[Vec<u8>], usize, Duration) -> Result<f64, String> + Send + Sync>;

/// The token an in-process appliance signs with.
#[derive(Debug, Clone)]
pub enum InProcessToken {
    /// signet's embedded hsm-sim, with a latency per signature.
    HsmSim {
        /// Milliseconds a signature takes.
        latency_ms: u64,
    },
    /// A token on a PKCS#11 module (a fresh SoftHSM2 token, the TPM rig's token).
    Module(TokenSpec),
}

/// X509 signing mode of an in-process appliance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum Mode {
    /// Every certificate signed by the token.
    Direct,
    /// The token signs an issuing intermediate in memory; leaves are signed in software.
    Delegated,
}

/// What to start in process.
#[derive(Debug, Clone)]
pub struct InProcess {
    /// The token.
    pub token: InProcessToken,
    /// Direct or delegated.
    pub mode: Mode,
    /// HSM sessions (workers).
    pub sessions: usize,
    /// CPU pool threads (0: signet's default).
    pub cpu_threads: usize,
    /// `[server] audit_sync`: the audit line synced to the disk before each answer (signet's default).
    pub audit_sync: bool,
    /// `[pipeline] verify_after_sign`: `always` (signet's default), `never` or `1/N`.
    pub verify_after_sign: String,
    /// A fresh data directory.
    pub data_dir: PathBuf,
    /// For SPIRE's plug-ins: a bootstrap port (join tokens), and [`Started::spire_stanza`].
    pub spire_plugins: bool,
}

/// The client side of an appliance.
#[derive(Debug, Clone)]
pub struct Target {
    /// host:port, or several separated by commas (replicas).
    pub addr: String,
    /// A DNS name to check on the server's certificate; `None`: the appliance is checked by its SPIFFE ID,
    /// `spiffe://<trust domain of the client certificate>/signet/server`.
    pub server_name: Option<String>,
    /// Roots to trust for the server (PEM).
    pub ca_pem: Vec<u8>,
    /// The client's certificate chain (PEM).
    pub cert_pem: Vec<u8>,
    /// The client's key (PEM).
    pub key_pem: Vec<u8>,
}

/// An appliance a launcher started.
pub struct Started {
    /// How to reach it.
    pub target: Target,
    /// Its token, for the ceiling.
    pub ceiling_token: Option<TokenSpec>,
    /// A loop of the same work in process (X509), for the second ratio.
    pub work_loop: Option<WorkLoop>,
    /// A line saying what runs.
    pub description: String,
    /// With [`InProcess::spire_plugins`]: the server.conf stanza of a signet plug-in for a join token.
    pub spire_stanza: Option<spire::StanzaMaker>,
    /// Stops it.
    pub stop: Box<dyn FnOnce() -> BoxFuture<()> + Send>,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("target", &self.target.addr)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

/// Which token an in-process run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenKind {
    /// The embedded simulator (nothing to install); `--latency-ms` sets its latency per signature.
    HsmSim,
    /// A fresh SoftHSM2 token (needs SoftHSM2 installed).
    Softhsm,
    /// The software TPM of `scripts/tpm-rig` (from its environment variables).
    Tpm,
}

/// What `signet bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchTarget {
    /// signet's own API (the appliance at --addr, or one in process).
    Signet,
    /// A real SPIRE server through its agent API: alone (KeyManager memory), with signet as its KeyManager and
    /// with signet as its UpstreamAuthority, side by side (see `--spire-setups`).
    Spire,
    /// cfssl (`cfssl serve`, key in memory) beside signet's delegated and direct modes, one CSR a request.
    Cfssl,
}

/// `signet bench`: issuance-rate benchmarking with the token's ceiling side by side.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// What to measure: signet's API, a SPIRE server beside signet's plug-ins, or cfssl beside signet.
    #[arg(long, value_enum, default_value_t = BenchTarget::Signet)]
    pub target: BenchTarget,
    /// --target spire: the directory of spire-server (default: $SIGNET_SPIRE_BIN_DIR, else the cache of
    /// scripts/spire-install, ~/.cache/signet/spire-1.15.3/bin).
    #[arg(long)]
    pub spire_bin_dir: Option<PathBuf>,
    /// --target spire: drive the SPIRE server at this address (host:port) instead of starting one (with
    /// --spire-socket; --spire-setups does not apply).
    #[arg(long, requires = "spire_socket")]
    pub spire_address: Option<String>,
    /// --target spire with --spire-address: its admin socket (registration entries, join tokens, the bundle).
    #[arg(long)]
    pub spire_socket: Option<PathBuf>,
    /// --target spire with --spire-address: its process id, for its CPU time per SVID.
    #[arg(long)]
    pub spire_pid: Option<u32>,
    /// --target spire: the set-ups to run, in this order (the ratios are to `memory`).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "memory,key-manager,upstream-authority"
    )]
    pub spire_setups: Vec<spire::SpireSetup>,
    /// --target cfssl: the cfssl program (default: cfssl on the PATH; Debian's golang-cfssl).
    #[arg(long)]
    pub cfssl_bin: Option<PathBuf>,

    /// Drive a running appliance at this address (host:port), or several replicas (a:8443,b:8443,...: the agents
    /// are spread over them, and a request that cannot reach its replica goes to the next); without it an appliance
    /// starts in this process.
    #[arg(long)]
    pub addr: Option<String>,
    /// With --addr: the data directory holding the admin credential and bundle (as the client commands use).
    #[arg(long, default_value = "signet-data")]
    pub data_dir: PathBuf,
    /// With --addr: client certificate chain (PEM); default <data dir>/admin.pem.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// With --addr: client key (PEM); default <data dir>/admin.key.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// With --addr: roots for the server (PEM); default <data dir>/bundle.pem.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Check this DNS name on the server's certificate instead of the appliance's SPIFFE ID.
    #[arg(long)]
    pub server_name: Option<String>,

    /// In process: the token.
    #[arg(long, value_enum, default_value_t = TokenKind::HsmSim)]
    pub token: TokenKind,
    /// In process, hsm-sim: milliseconds a signature takes.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// In process: X509 signing mode.
    #[arg(long, value_enum, default_value_t = Mode::Direct)]
    pub mode: Mode,
    /// In process: HSM sessions (and the ceiling's sessions).
    #[arg(long, default_value_t = 2)]
    pub sessions: usize,
    /// In process: CPU pool threads (0: signet's default).
    #[arg(long, default_value_t = 0)]
    pub cpu_threads: usize,
    /// In process (and the `key-manager-embedded` plug-in's appliance): `[server] audit_sync`, whether each audit
    /// line is synced to the disk (`fdatasync`) before the answer; `false` measures what that durability costs.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub audit_sync: bool,
    /// In process (and the `key-manager-embedded` plug-in's appliance): `[pipeline] verify_after_sign`, the
    /// post-sign check of KeyManager digest signatures: `always` (signet's default), `never` or `1/N` (sampled).
    #[arg(long, default_value = "always", value_name = "always|never|1/N")]
    pub verify_after_sign: String,

    /// The RPC to drive.
    #[arg(long, value_enum, default_value_t = Workload::X509)]
    pub workload: Workload,
    /// Key type of the CSRs.
    #[arg(long, value_enum, default_value_t = CsrKeyType::EcP256)]
    pub key_type: CsrKeyType,
    /// CSRs per BatchMintX509SVID request.
    #[arg(long, default_value_t = 50)]
    pub batch: usize,
    /// Pre-generated CSRs (and messages) the agents cycle through.
    #[arg(long, default_value_t = 512)]
    pub pool: usize,
    /// Simulated agents (closed loop) or the most requests in flight (open loop).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Run at each of these concurrencies in turn (e.g. 1,4,16,64,256); overrides --concurrency.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<usize>,
    /// HTTP/2 connections the agents share.
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// Stop each run after this many requests.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Stop each run after this many seconds (default 10 without --requests; 600 at most either way).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Open loop: offer this many credentials a second (requests start on schedule whatever the answers do).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds of load before each run is measured.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Fraction of credentials to check against the bundle (0..1); default: all, up to 10,000 checks a second.
    #[arg(long)]
    pub check_rate: Option<f64>,
    /// Seconds the ceiling loops run (0: no ceiling).
    #[arg(long, default_value_t = 3.0)]
    pub ceiling_seconds: f64,
    /// With --addr: the token's PKCS#11 module, for the ceiling.
    #[arg(long)]
    pub ceiling_module: Option<PathBuf>,
    /// With --addr: the token's label, for the ceiling.
    #[arg(long)]
    pub ceiling_token: Option<String>,
    /// With --addr: a file with the token's user PIN, for the ceiling.
    #[arg(long)]
    pub ceiling_pin_file: Option<PathBuf>,
    /// With --addr: sessions for the ceiling (set it to the appliance's).
    #[arg(long, default_value_t = 2)]
    pub ceiling_sessions: usize,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw throughput and p99 latency against concurrency into FILE.svg or FILE.png.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress bar (the summary table is printed all the same).
    #[arg(long)]
    pub quiet: bool,
}

/// What a bench measured (also printed, and written where asked).
#[derive(Debug, Clone)]
pub enum Report {
    /// `--target signet`.
    Signet(BenchReport),
    /// `--target spire`.
    Spire(spire::SpireReport),
    /// `--target cfssl`.
    Peers(cfssl::PeerReport),
}

/// Never longer than this per run, whatever the flags say.
const HARD_LIMIT: Duration = Duration::from_secs(600);
/// Checks a second by default.
const CHECK_BUDGET: f64 = 10_000.0;

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

impl Target {
    /// The addresses of the replicas, in the order given.
    fn addrs(&self) -> Vec<String> {
        self.addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect()
    }
}

/// The client TLS of `t`: the appliance checked by its SPIFFE ID (or `server_name`), the client's credential.
fn client_tls(t: &Target) -> Result<Arc<rustls::ClientConfig>, String> {
    let leaf = connect::pem_blocks(&t.cert_pem, "CERTIFICATE")
        .map_err(|e| format!("the client certificate: {e}"))?;
    let td = leaf
        .first()
        .and_then(|d| x509_parser::parse_x509_certificate(d).ok())
        .and_then(|(_, c)| {
            c.subject_alternative_name().ok().flatten().and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => {
                        connect::trust_domain_of(u).map(str::to_string)
                    }
                    _ => None,
                })
            })
        })
        .ok_or("the client certificate carries no SPIFFE ID")?;
    let verifier = Arc::new(connect::ApplianceVerifier::new(
        connect::LiveRoots::new(
            connect::pem_blocks(&t.ca_pem, "CERTIFICATE").map_err(|e| format!("the roots: {e}"))?,
        ),
        connect::ServerAuth::for_appliance(&td, t.server_name.as_deref()),
    ));
    let identity = connect::certified_key_pem(&t.cert_pem, &t.key_pem)?;
    let identity: Arc<dyn rustls::client::ResolvesClientCert> =
        Arc::new(connect::SwappableIdentity::new(Some(identity)));
    Ok(Arc::new(connect::client_config(verifier, Some(identity))?))
}

fn tune(e: Endpoint) -> Endpoint {
    e.connect_timeout(CONNECT_TIMEOUT)
        // A request a replica never answers (a peer that hangs rather than refuses) fails over after this.
        .timeout(REQUEST_TIMEOUT)
        .initial_connection_window_size(Some(8 << 20))
        .initial_stream_window_size(Some(2 << 20))
}

fn lazy(t: &Target, addr: &str) -> Result<Channel, String> {
    connect::lazy_channel(addr, client_tls(t)?, tune)
        .map_err(|e| format!("bad address {addr:?}: {e}"))
}

/// How long one request may wait for its answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection (TCP and the TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

async fn connect(t: &Target, addr: &str) -> Result<Channel, String> {
    // The endpoint's own connect timeout covers TCP only: a peer that accepts and never answers the handshake is
    // bounded here.
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        connect::channel(addr, client_tls(t)?, tune),
    )
    .await
    .map_err(|_| format!("cannot connect to {addr}: no TLS handshake within {CONNECT_TIMEOUT:?}"))?
    .map_err(|e| format!("cannot connect to {addr}: {e}"))
}

/// CPU seconds and peak RSS of the server, when its Admin.GetStatus reports them.
async fn server_usage(ch: &Channel) -> Option<(f64, u64)> {
    // Bounded whole (a replica's lazy connection included): a replica that does not answer leaves the usage unknown.
    let s = tokio::time::timeout(
        Duration::from_secs(5),
        AdminClient::new(ch.clone()).get_status(pb::GetStatusRequest {}),
    )
    .await
    .ok()?
    .ok()?
    .into_inner();
    (s.process_cpu_seconds > 0.0).then_some((s.process_cpu_seconds, s.peak_rss_bytes))
}

/// The servers' CPU seconds and the largest peak RSS, summed over every endpoint (each a replica's process), or
/// `None` when one does not answer.
async fn servers_usage(endpoints: &[load::Endpoint]) -> Option<(f64, u64)> {
    let mut total = (0.0, 0);
    for e in endpoints {
        let (cpu, rss) = server_usage(&e.channels[0]).await?;
        total = (total.0 + cpu, total.1.max(rss));
    }
    Some(total)
}

/// Runs `signet bench`; `launcher` starts an in-process appliance when no `--addr` is given. Returns the report
/// (also printed, and written where asked), or why the bench failed; bad credentials fail it. An in-process run on
/// SoftHSM2 runs in a child process with a token directory of its own ([`softhsm`]): then the child printed and
/// wrote the report, and this returns `None`.
pub fn run(args: &BenchArgs, launcher: &Launcher) -> Result<Option<Report>, String> {
    if args.addr.is_none() && args.token == TokenKind::Softhsm && softhsm::private_dir().is_none() {
        let dir = TempDir::new()?;
        return softhsm::run_in_child(dir.path()).map(|()| None);
    }
    // Two runtimes: the bench client's threads carry their own name, so that in process the server's CPU can be
    // told from the client's (see `client_cpu_seconds`).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(CLIENT_THREAD)
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("signet-server")
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let result = rt.block_on(run_async(args, launcher, server_rt.handle()));
    drop(rt);
    drop(server_rt);
    result.map(Some)
}

/// CPU seconds (user + system) of this whole process (Linux; clock ticks of 1/100 s).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some((field(11)? + field(12)?) as f64 / 100.0)
}

/// The name of the bench client's threads.
const CLIENT_THREAD: &str = "bench-client";

/// CPU seconds of this process's threads named [`CLIENT_THREAD`] (Linux; clock ticks of 1/100 s).
fn client_cpu_seconds() -> Option<f64> {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != CLIENT_THREAD {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ticks += field(11) + field(12);
    }
    Some(ticks as f64 / 100.0)
}

/// The token of an in-process appliance (and the SoftHSM2 token kept alive while it runs).
fn in_process_token(args: &BenchArgs) -> Result<InProcessToken, String> {
    Ok(match args.token {
        TokenKind::HsmSim => InProcessToken::HsmSim {
            latency_ms: args.latency_ms,
        },
        TokenKind::Softhsm => {
            // `run` started this process with a SoftHSM2 directory of its own.
            let dir = softhsm::private_dir().ok_or_else(|| {
                format!(
                    "{} is not set: not the bench's own SoftHSM2 process",
                    softhsm::DIR_ENV
                )
            })?;
            InProcessToken::Module(softhsm::fresh_token(&dir)?)
        }
        TokenKind::Tpm => {
            let var = |n: &str| {
                std::env::var(n).map_err(|_| {
                    format!("{n} is not set: start the TPM rig first (eval \"$(scripts/tpm-rig start)\")")
                })
            };
            InProcessToken::Module(TokenSpec {
                module: var("TPM2_PKCS11_MODULE")?.into(),
                label: var("TPM_RIG_TOKEN_LABEL")?,
                pin: signet_pkcs11::Pin::new(var("TPM_RIG_USER_PIN")?),
            })
        }
    })
}

async fn run_async(
    args: &BenchArgs,
    launcher: &Launcher,
    server_rt: &tokio::runtime::Handle,
) -> Result<Report, String> {
    match args.target {
        BenchTarget::Signet => {}
        BenchTarget::Spire => {
            return run_spire(args, launcher, server_rt)
                .await
                .map(Report::Spire);
        }
        BenchTarget::Cfssl => {
            return run_cfssl(args, launcher, server_rt)
                .await
                .map(Report::Peers);
        }
    }
    let report = run_signet(args, launcher, server_rt).await?;
    println!("{}", report.table());
    if let Some(p) = &args.json {
        report.write_json(p)?;
    }
    if let Some(p) = &args.plot {
        report.write_plot(p)?;
    }
    let bad = report.bad_credentials();
    if bad > 0 {
        return Err(format!(
            "{bad} credentials failed the check against the bundle"
        ));
    }
    let repeated: u64 = report.runs.iter().map(|r| r.duplicate_serials).sum();
    if repeated > 0 {
        return Err(format!(
            "{repeated} X509-SVIDs carried a serial number an earlier one of the run already had"
        ));
    }
    Ok(Report::Signet(report))
}

/// Checks the load flags every target shares.
fn check_load_flags(args: &BenchArgs) -> Result<(), String> {
    if args.batch == 0 || args.pool == 0 || args.connections == 0 {
        return Err("--batch, --pool and --connections must be at least 1".into());
    }
    if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        return Err("--rate must be a positive number of credentials a second".into());
    }
    if args.check_rate.is_some_and(|f| !(0.0..=1.0).contains(&f)) {
        return Err("--check-rate is a fraction between 0 and 1".into());
    }
    let sampled = args
        .verify_after_sign
        .strip_prefix("1/")
        .is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n >= 1));
    if !sampled && !matches!(args.verify_after_sign.as_str(), "always" | "never") {
        return Err(format!(
            "--verify-after-sign {:?}: use always, never or 1/N (N at least 1)",
            args.verify_after_sign
        ));
    }
    if let Some(p) = &args.plot {
        report::PlotFormat::of(p)?;
    }
    if args.sweep.contains(&0) || args.concurrency == 0 {
        return Err("concurrency must be at least 1 (--concurrency, --sweep)".into());
    }
    if args.duration.is_some_and(|d| d.is_nan() || d <= 0.0) {
        return Err("--duration must be a positive number of seconds".into());
    }
    Ok(())
}

/// signet's own API: the appliance at --addr, or one in process. The report, not printed.
async fn run_signet(
    args: &BenchArgs,
    launcher: &Launcher,
    server_rt: &tokio::runtime::Handle,
) -> Result<BenchReport, String> {
    check_load_flags(args)?;
    let load_before = loadavg();
    let data_dir = tempdir()?;
    let (target, ceiling_token, ceiling_sessions, work_loop, description, stop, in_process) =
        match &args.addr {
            Some(addr) => {
                let d = &args.data_dir;
                let target = Target {
                    addr: addr.clone(),
                    server_name: args.server_name.clone(),
                    ca_pem: read(
                        args.ca.as_deref().unwrap_or(&d.join("bundle.pem")),
                        "trust bundle",
                    )?,
                    cert_pem: read(
                        args.cert.as_deref().unwrap_or(&d.join("admin.pem")),
                        "client certificate",
                    )?,
                    key_pem: read(
                        args.key.as_deref().unwrap_or(&d.join("admin.key")),
                        "client key",
                    )?,
                };
                let ceiling = match (
                    &args.ceiling_module,
                    &args.ceiling_token,
                    &args.ceiling_pin_file,
                ) {
                    (Some(m), Some(t), Some(p)) => Some(TokenSpec {
                        module: m.clone(),
                        label: t.clone(),
                        pin: signet_pkcs11::PinSource::File(p.clone())
                            .resolve()
                            .map_err(|e| format!("the ceiling's PIN file: {e}"))?,
                    }),
                    (None, None, None) => None,
                    _ => {
                        return Err(
                            "the ceiling needs all of --ceiling-module, --ceiling-token and --ceiling-pin-file".into(),
                        );
                    }
                };
                (
                    target,
                    ceiling,
                    args.ceiling_sessions,
                    None,
                    format!("appliance at {addr}"),
                    None,
                    false,
                )
            }
            None => {
                let token = in_process_token(args)?;
                if args.sessions == 0 {
                    return Err("--sessions must be at least 1".into());
                }
                let started = server_rt
                    .spawn(launcher(InProcess {
                        token,
                        mode: args.mode,
                        sessions: args.sessions,
                        cpu_threads: args.cpu_threads,
                        audit_sync: args.audit_sync,
                        verify_after_sign: args.verify_after_sign.clone(),
                        data_dir: data_dir.path().to_path_buf(),
                        spire_plugins: false,
                    }))
                    .await
                    .map_err(|e| format!("starting the appliance: {e}"))??;
                (
                    started.target,
                    started.ceiling_token,
                    args.sessions,
                    started.work_loop,
                    started.description,
                    Some(started.stop),
                    true,
                )
            }
        };
    let result = bench(
        args,
        &target,
        ceiling_token.as_ref(),
        ceiling_sessions,
        work_loop.as_ref(),
        &description,
        in_process,
        load_before,
    )
    .await;
    if let Some(stop) = stop {
        let _ = server_rt.spawn(stop()).await;
    }
    drop(data_dir);
    result
}

fn tempdir() -> Result<TempDir, String> {
    TempDir::new()
}

/// A directory removed when dropped (the in-process appliance's data).
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "signet-bench-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).map_err(|e| format!("creating {}: {e}", p.display()))?;
        Ok(TempDir(p))
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[allow(clippy::too_many_arguments)]
async fn bench(
    args: &BenchArgs,
    target: &Target,
    ceiling_token: Option<&TokenSpec>,
    ceiling_sessions: usize,
    work_loop: Option<&WorkLoop>,
    description: &str,
    in_process: bool,
    load_before: String,
) -> Result<BenchReport, String> {
    let addrs = target.addrs();
    if addrs.is_empty() {
        return Err("--addr names no address".into());
    }
    // Replicas that cannot be reached at the start are kept (their connections are made when they come back); the
    // bench needs one that answers.
    let several = addrs.len() > 1;
    let mut endpoints = Vec::with_capacity(addrs.len());
    let mut first = None;
    let mut unreachable = Vec::new();
    for addr in addrs {
        let mut channels = Vec::with_capacity(args.connections);
        let mut connected = 0;
        for _ in 0..args.connections {
            // After a failure the replica's other connections are made lazily too (one wait per replica).
            if connected == 0 && !channels.is_empty() {
                channels.push(lazy(target, &addr)?);
                continue;
            }
            match connect(target, &addr).await {
                Ok(c) => {
                    channels.push(c);
                    connected += 1;
                }
                Err(e) if several => {
                    unreachable.push(e);
                    channels.push(lazy(target, &addr)?);
                }
                Err(e) => return Err(e),
            }
        }
        if first.is_none() && connected > 0 {
            first = Some(endpoints.len());
        }
        endpoints.push(load::Endpoint::new(addr, channels));
    }
    let Some(first) = first else {
        return Err(format!(
            "no replica can be reached: {}",
            unreachable.join("; ")
        ));
    };
    if let Some(e) = unreachable.first() {
        eprintln!("signet bench: {e}; its requests go to the other replicas until it answers");
    }
    let ch = endpoints[first].channels[0].clone();
    let bundle = IssuerClient::new(ch.clone())
        .get_bundle(pb::GetBundleRequest {})
        .await
        .map_err(|s| format!("GetBundle: {}: {}", s.code(), s.message()))?
        .into_inner();
    // The trust domain: from Admin.GetStatus, else from a root's URI SAN.
    let td = match AdminClient::new(ch.clone())
        .get_status(pb::GetStatusRequest {})
        .await
    {
        Ok(s) => s.into_inner().trust_domain,
        Err(_) => bundle
            .x509_authorities
            .iter()
            .find_map(|der| trust_domain_of(der))
            .ok_or(
                "cannot learn the trust domain: Admin.GetStatus is refused and no root names it",
            )?,
    };
    let mut checker = Checker::from_bundle(
        &bundle.spiffe_bundle,
        bundle.x509_authorities.clone(),
        "signet-bench",
    )?;
    let key_id = "signet-bench".to_string();
    if args.workload == Workload::SignData {
        if args.key_type != CsrKeyType::EcP256 {
            return Err("SignData is benched with EC P-256 keys (--key-type ec-p256)".into());
        }
        let r = KeyManagerClient::new(ch.clone())
            .generate_key(km::GenerateKeyRequest {
                key_id: key_id.clone(),
                key_type: km::KeyType::EcP256 as i32,
            })
            .await
            .map_err(|s| format!("KeyManager GenerateKey: {}: {}", s.code(), s.message()))?
            .into_inner();
        checker.sign_key_spki = r.public_key.map(|k| k.pkix_data);
    }
    let pool = Pool::generate(&td, args.pool, args.key_type)?;
    let sampling = match args.check_rate {
        Some(f) => Sampling::fraction(f),
        None => Sampling::budget(CHECK_BUDGET),
    };

    // The ceilings first, on a quiet server.
    let secs = args.ceiling_seconds;
    let ceiling = match ceiling_token {
        Some(spec) if secs > 0.0 => {
            let (spec, n) = (spec.clone(), ceiling_sessions);
            let d = Duration::from_secs_f64(secs.min(60.0));
            let cpu_before = process_cpu_seconds();
            let start = std::time::Instant::now();
            let rate = tokio::task::spawn_blocking(move || ceiling::token_ceiling(&spec, n, d))
                .await
                .map_err(|e| format!("ceiling: {e}"))??;
            // Host CPU per signature (a software token signs on this machine's cores); the idle server adds little.
            let cpu_us_per_signature =
                process_cpu_seconds()
                    .zip(cpu_before)
                    .map(|(after, before)| {
                        (after - before) * 1e6 / (rate * start.elapsed().as_secs_f64()).max(1.0)
                    });
            Some(CeilingReport {
                kind: "token".into(),
                sessions: n,
                rate,
                measured: vec![rate],
                cpu_us_per_signature,
            })
        }
        _ => None,
    };
    let work_csrs: Vec<Vec<u8>> = pool.csrs.iter().map(|c| c.0.clone()).collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let measure_loop = |f: &WorkLoop| {
        tokio::task::block_in_place(|| {
            f(&work_csrs, threads, Duration::from_secs_f64(secs.min(60.0)))
        })
    };
    let work_loop = work_loop.filter(|_| secs > 0.0 && args.workload == Workload::X509);
    let loop_before = work_loop.map(measure_loop).transpose()?;

    let addrs: Vec<String> = endpoints.iter().map(|e| e.addr.clone()).collect();
    let shared = Arc::new(Shared {
        endpoints,
        epoch: std::time::Instant::now(),
        serials: std::sync::Mutex::default(),
        pool,
        checker,
        sampling,
        progress: Arc::new(AtomicU64::new(0)),
    });
    let levels = if args.sweep.is_empty() {
        vec![args.concurrency]
    } else {
        args.sweep.clone()
    };
    let duration = match (args.duration, args.requests) {
        (Some(d), _) if d > 0.0 => Some(Duration::from_secs_f64(d)),
        (Some(_), _) => return Err("--duration must be positive".into()),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let mut runs = Vec::new();
    for &concurrency in &levels {
        let plan = Plan {
            workload: args.workload,
            batch: if args.workload == Workload::X509 {
                args.batch
            } else {
                1
            },
            concurrency,
            requests: args.requests,
            duration,
            rate: args.rate,
            key_id: key_id.clone(),
        };
        if args.warmup > 0.0 {
            let warm = Plan {
                requests: None,
                duration: Some(Duration::from_secs_f64(args.warmup.min(30.0))),
                ..plan.clone()
            };
            let _ = load::run(shared.clone(), &warm, HARD_LIMIT).await;
        }
        shared
            .serials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let usage_before = servers_usage(&shared.endpoints).await;
        let client_before = client_cpu_seconds();
        shared.progress.store(0, Ordering::Relaxed);
        let bar = progress_bar(args, &plan, concurrency);
        let ticker = bar.clone().map(|bar| {
            let sh = shared.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    bar.set_position(sh.progress.load(Ordering::Relaxed));
                }
            })
        });
        let mut out = load::run(shared.clone(), &plan, HARD_LIMIT).await;
        if let Some(t) = ticker {
            t.abort();
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let usage_after = servers_usage(&shared.endpoints).await;
        let client_cpu = client_cpu_seconds()
            .zip(client_before)
            .map(|(after, before)| after - before);
        let seconds = out.elapsed.as_secs_f64();
        let rate = per_second(out.credentials, seconds);
        let per_credential = |cpu: f64| {
            if out.credentials > 0 {
                cpu * 1e6 / out.credentials as f64
            } else {
                0.0
            }
        };
        let server = match (usage_before, usage_after) {
            (Some((c0, _)), Some((c1, rss))) => {
                // In process the process's CPU is the server's and the client's: take the client's threads out.
                let client = if in_process { client_cpu } else { None };
                let cpu = c1 - c0 - client.unwrap_or(0.0);
                Some(ServerUsage {
                    cpu_seconds: cpu,
                    cpu_us_per_credential: per_credential(cpu),
                    cores_busy: if seconds > 0.0 { cpu / seconds } else { 0.0 },
                    peak_rss_bytes: rss,
                    client_cpu_us_per_credential: client.map(per_credential),
                })
            }
            _ => None,
        };
        runs.push(RunReport {
            concurrency,
            offered_rate: args.rate,
            credentials: out.credentials,
            requests: out.requests,
            seconds,
            rate,
            ratio_to_ceiling: ceiling.as_ref().and_then(|c| ratio(rate, c.rate)),
            // Set below, once the loop has been measured again after the load.
            ratio_to_work_loop: None,
            latency: LatencySummary::from_micros(&mut out.latencies_us),
            errors: out.errors,
            checked: out.checked,
            bad_credentials: out.bad,
            bad_examples: out.bad_examples,
            answered_by: out
                .answered_by
                .iter()
                .map(|(e, n)| (addrs[*e].clone(), *n))
                .collect(),
            failovers: out.failovers,
            duplicate_serials: out.duplicate_serials,
            server,
        });
    }
    // The loop again, after the load (see `CeilingReport::measured`).
    let work = match (work_loop, loop_before) {
        (Some(f), Some(before)) => {
            let measured = vec![before, measure_loop(f)?];
            let rate = measured.iter().sum::<f64>() / measured.len() as f64;
            for r in &mut runs {
                r.ratio_to_work_loop = ratio(r.rate, rate);
            }
            Some(CeilingReport {
                kind: "work-loop".into(),
                sessions: threads,
                rate,
                measured,
                cpu_us_per_signature: None,
            })
        }
        _ => None,
    };
    Ok(BenchReport {
        workload: args.workload,
        target: description.to_string(),
        loop_mode: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        batch: args.batch,
        ceiling,
        work_loop: work,
        runs,
        load_average: (load_before, loadavg()),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
    })
}

fn progress_bar(
    args: &BenchArgs,
    plan: &Plan,
    concurrency: usize,
) -> Option<indicatif::ProgressBar> {
    if args.quiet {
        return None;
    }
    let bar = match (plan.requests, plan.duration) {
        (Some(n), _) => indicatif::ProgressBar::new(n * plan.batch as u64),
        _ => indicatif::ProgressBar::no_length(),
    };
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {wide_bar} {pos} credentials ({per_sec})",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(format!("concurrency {concurrency}"));
    Some(bar)
}

/// `spiffe://<td>` from a root certificate's URI SAN.
fn trust_domain_of(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => u
            .strip_prefix("spiffe://")
            .map(|td| td.split('/').next().unwrap_or_default().to_string()),
        _ => None,
    })
}

/// The run's length: `--duration`, else none with `--requests`, else 10 s.
fn run_duration(args: &BenchArgs) -> Option<Duration> {
    match (args.duration, args.requests) {
        (Some(d), _) => Some(Duration::from_secs_f64(d)),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    }
}

fn sampling_of(args: &BenchArgs) -> Sampling {
    match args.check_rate {
        Some(f) => Sampling::fraction(f),
        None => Sampling::budget(CHECK_BUDGET),
    }
}

/// An in-process appliance started for SPIRE's plug-ins or for the cfssl comparison.
struct Appliance {
    started: Started,
    _dir: TempDir,
}

impl Appliance {
    async fn start(
        args: &BenchArgs,
        mode: Mode,
        spire_plugins: bool,
        launcher: &Launcher,
        server_rt: &tokio::runtime::Handle,
    ) -> Result<Self, String> {
        if args.sessions == 0 {
            return Err("--sessions must be at least 1".into());
        }
        let token = in_process_token(args)?;
        let dir = tempdir()?;
        let started = server_rt
            .spawn(launcher(InProcess {
                token,
                mode,
                sessions: args.sessions,
                cpu_threads: args.cpu_threads,
                audit_sync: args.audit_sync,
                verify_after_sign: args.verify_after_sign.clone(),
                data_dir: dir.path().to_path_buf(),
                spire_plugins,
            }))
            .await
            .map_err(|e| format!("starting the appliance: {e}"))??;
        Ok(Appliance { started, _dir: dir })
    }

    async fn stop(self, server_rt: &tokio::runtime::Handle) {
        let _ = server_rt.spawn((self.started.stop)()).await;
    }
}

/// `--target spire`.
async fn run_spire(
    args: &BenchArgs,
    launcher: &Launcher,
    server_rt: &tokio::runtime::Handle,
) -> Result<spire::SpireReport, String> {
    check_load_flags(args)?;
    if !matches!(args.workload, Workload::X509 | Workload::Jwt) {
        return Err(
            "--target spire drives X509-SVIDs (--workload x509) or JWT-SVIDs (--workload jwt)"
                .into(),
        );
    }
    if args.spire_setups.is_empty() {
        return Err("--spire-setups names no set-up".into());
    }
    if args
        .spire_setups
        .contains(&spire::SpireSetup::KeyManagerEmbedded)
        && args.token != TokenKind::Softhsm
    {
        return Err(
            "--spire-setups key-manager-embedded runs the plug-in's own appliance on a SoftHSM2 token of its own: \
             add --token softhsm"
                .into(),
        );
    }
    let load_before = loadavg();
    let levels = if args.sweep.is_empty() {
        vec![args.concurrency]
    } else {
        args.sweep.clone()
    };
    let plan = spire::SpirePlan {
        workload: args.workload,
        levels,
        per_agent: args.batch,
        requests: args.requests,
        duration: run_duration(args),
        rate: args.rate,
        warmup: Duration::from_secs_f64(args.warmup.clamp(0.0, 30.0)),
        sampling: Arc::new(sampling_of(args)),
        quiet: args.quiet,
        hard_limit: HARD_LIMIT,
    };
    let mut runs;
    let mut signet_line = None;
    let version;
    if let Some(addr) = &args.spire_address {
        let socket = args
            .spire_socket
            .as_deref()
            .ok_or("--spire-address needs --spire-socket (SPIRE's admin socket)")?;
        version = "(given by address)".to_string();
        let pool = Arc::new(Pool::generate("bench.invalid", args.pool, args.key_type)?);
        let admin = spire::admin_channel(socket).await?;
        runs = spire::measure(
            "external",
            &format!("SPIRE at {addr}"),
            &admin,
            addr,
            args.spire_pid,
            &plan,
            &pool,
        )
        .await?;
    } else {
        let bin = spire::bin_dir(args.spire_bin_dir.as_deref())?;
        version = spire::version(&bin);
        let wants_signet = args
            .spire_setups
            .iter()
            .any(|s| *s != spire::SpireSetup::Memory);
        let app = if wants_signet {
            Some(Appliance::start(args, args.mode, true, launcher, server_rt).await?)
        } else {
            None
        };
        let result = async {
            // The trust domain: the appliance's (its root signs SPIRE's CA as UpstreamAuthority).
            let td = match &app {
                Some(a) => {
                    signet_line = Some(a.started.description.clone());
                    let ch = connect(&a.started.target, &a.started.target.addr).await?;
                    AdminClient::new(ch)
                        .get_status(pb::GetStatusRequest {})
                        .await
                        .map_err(|s| format!("Admin.GetStatus: {}: {}", s.code(), s.message()))?
                        .into_inner()
                        .trust_domain
                }
                None => "example.org".to_string(),
            };
            let pool = Arc::new(Pool::generate(&td, args.pool, args.key_type)?);
            let mut runs = Vec::new();
            for &setup in &args.spire_setups {
                let dir = tempdir()?;
                let stanza = match (&app, setup) {
                    (_, spire::SpireSetup::Memory) => None,
                    (None, _) => return Err("no appliance for the plug-in set-ups".to_string()),
                    (Some(a), _) => Some(
                        plugin_stanza(&a.started, setup, &dir.path().join("signet-client")).await?,
                    ),
                };
                let plugins = spire::plugins(setup, stanza.as_deref())?;
                let mut server = spire::SpireServer::start(&bin, dir.path(), &td, &plugins)?;
                let admin = server.ready(Duration::from_secs(90)).await?;
                let label = setup
                    .to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default();
                let measured = spire::measure(
                    &label,
                    setup.label(),
                    &admin,
                    &server.addr,
                    server.pid(),
                    &plan,
                    &pool,
                )
                .await;
                drop(admin);
                tokio::task::block_in_place(|| server.stop());
                runs.extend(measured?);
            }
            Ok(runs)
        }
        .await;
        if let Some(a) = app {
            a.stop(server_rt).await;
        }
        runs = result?;
    }
    spire::set_ratios(&mut runs);
    let report = spire::SpireReport {
        workload: args.workload,
        loop_mode: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        entries_per_agent: args.batch,
        spire_version: version,
        signet: signet_line,
        runs,
        load_average: (load_before, loadavg()),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
    };
    println!("{}", report.table());
    if let Some(p) = &args.json {
        report.write_json(p)?;
    }
    if let Some(p) = &args.plot {
        report.write_plot(p)?;
    }
    let bad = report.bad_credentials();
    if bad > 0 {
        return Err(format!(
            "{bad} SVIDs failed the check against SPIRE's bundle"
        ));
    }
    Ok(report)
}

/// A join token for SPIRE's server (Admin.CreateJoinToken, as `signet spire config` asks for one) and the plug-in
/// stanza for it, its credential kept in `cred_dir`.
async fn plugin_stanza(
    started: &Started,
    setup: spire::SpireSetup,
    cred_dir: &std::path::Path,
) -> Result<String, String> {
    let make = started
        .spire_stanza
        .as_ref()
        .ok_or("the appliance was started without SPIRE plug-in support")?;
    let ch = connect(&started.target, &started.target.addr).await?;
    let mut admin = AdminClient::new(ch.clone());
    let td = admin
        .get_status(pb::GetStatusRequest {})
        .await
        .map_err(|s| format!("Admin.GetStatus: {}: {}", s.code(), s.message()))?
        .into_inner()
        .trust_domain;
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            spiffe_id: format!("spiffe://{td}/spire/server"),
            ttl_seconds: 600,
        })
        .await
        .map_err(|s| format!("Admin.CreateJoinToken: {}: {}", s.code(), s.message()))?
        .into_inner();
    std::fs::create_dir_all(cred_dir)
        .map_err(|e| format!("creating {}: {e}", cred_dir.display()))?;
    make(setup, &token, cred_dir)
}

/// `--target cfssl`.
async fn run_cfssl(
    args: &BenchArgs,
    launcher: &Launcher,
    server_rt: &tokio::runtime::Handle,
) -> Result<cfssl::PeerReport, String> {
    check_load_flags(args)?;
    let load_before = loadavg();
    let bin = cfssl::binary(args.cfssl_bin.as_deref())?;
    let pool = Arc::new(Pool::generate("example.org", args.pool, args.key_type)?);
    let offer = drive::Offer {
        concurrency: args.concurrency,
        requests: args.requests,
        duration: run_duration(args),
        rate: args.rate,
        per_request: 1,
        hard_limit: HARD_LIMIT,
    };
    let warmup = Duration::from_secs_f64(args.warmup.clamp(0.0, 30.0));
    let dir = tempdir()?;
    let mut server = cfssl::Cfssl::start(&bin, dir.path())?;
    let first = cfssl::csr_pem(&pool.csrs[0].0);
    server.ready(&first, Duration::from_secs(30)).await?;
    let row = cfssl::measure(
        &server,
        offer,
        warmup,
        &pool,
        Arc::new(sampling_of(args)),
        args.quiet,
    )
    .await;
    drop(server);
    drop(dir);
    let mut rows = vec![row?];
    for mode in [Mode::Delegated, Mode::Direct] {
        let mut a = args.clone();
        a.target = BenchTarget::Signet;
        a.addr = None;
        a.mode = mode;
        a.batch = 1;
        a.workload = Workload::X509;
        a.ceiling_seconds = 0.0;
        a.sweep = Vec::new();
        a.json = None;
        a.plot = None;
        let r = Box::pin(run_signet(&a, launcher, server_rt)).await?;
        let run = r
            .runs
            .into_iter()
            .next()
            .ok_or("the signet run measured nothing")?;
        rows.push(cfssl::PeerRow {
            server: format!("signet {}", format!("{mode:?}").to_lowercase()),
            credentials: run.credentials,
            seconds: run.seconds,
            rate: run.rate,
            latency: run.latency,
            cpu_us_per_certificate: run.server.map(|u| u.cpu_us_per_credential),
            cores_busy: run.server.map(|u| u.cores_busy),
            errors: run.errors,
            checked: run.checked,
            bad_credentials: run.bad_credentials,
            bad_examples: run.bad_examples,
            notes: format!(
                "gRPC over mTLS, linted and checked, SPIFFE ID kept; {}",
                r.target
            ),
        });
    }
    let report = cfssl::PeerReport {
        concurrency: args.concurrency,
        loop_mode: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        cfssl_version: cfssl::version(&bin),
        rows,
        load_average: (load_before, loadavg()),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
    };
    println!("{}", report.table());
    if let Some(p) = &args.json {
        report.write_json(p)?;
    }
    let bad = report.bad_credentials();
    if bad > 0 {
        return Err(format!("{bad} certificates failed their check"));
    }
    Ok(report)
}
