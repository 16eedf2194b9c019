//! `signet serve [--config FILE] [--data-dir DIR]`: runs the appliance until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use signet::config::{ADMIN_ID_PATH, Config, PolicyRule};
use signet::serve::{Appliance, default_embedded_token};

use super::CliError;

/// Options of `signet serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The configuration file (see signet.example.toml); without it, the embedded default.
    #[arg(long, env = "SIGNET_CONFIG")]
    config: Option<PathBuf>,
    /// The data directory (overrides the configuration's data_dir).
    #[arg(long, env = "SIGNET_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The gRPC listen address (overrides server.listen; port 0 picks a free port).
    #[arg(long, env = "SIGNET_LISTEN")]
    listen: Option<SocketAddr>,
    /// The Prometheus listen address (overrides server.metrics; "" disables it).
    #[arg(long, env = "SIGNET_METRICS")]
    metrics: Option<String>,
    /// The bootstrap port for join tokens (overrides server.bootstrap_listen; e.g. 127.0.0.1:8445; the embedded
    /// default has one on a free loopback port).
    #[arg(long, env = "SIGNET_BOOTSTRAP_LISTEN")]
    bootstrap_listen: Option<SocketAddr>,
}

/// Runs `signet serve`.
pub fn run(args: ServeArgs) -> Result<(), CliError> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path).map_err(|e| CliError::new(e.to_string()))?,
        None => Config::embedded_default(),
    };
    if let Some(d) = &args.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(l) = args.listen {
        cfg.server.listen = l;
    }
    if let Some(m) = &args.metrics {
        cfg.server.metrics = Some(m.clone());
    }
    if let Some(b) = args.bootstrap_listen {
        cfg.server.bootstrap_listen = Some(b);
    }
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        CliError::new(format!(
            "cannot create the data directory {}: {e}",
            cfg.data_dir.display()
        ))
    })?;
    cfg.data_dir = std::fs::canonicalize(&cfg.data_dir)?;
    let embedded = default_embedded_token();
    if cfg.tokens.is_empty() {
        reexec_with_token_environment(&embedded.environment(&cfg.data_dir))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let td = cfg.trust_domain.clone();
        let policy = cfg.policy.clone();
        let appliance = Appliance::start_with(cfg, embedded.clone())
            .await
            .map_err(|e| CliError::new(e.to_string()))?;
        print_banner(&appliance, &td, embedded.name(), &policy);
        wait_for_signal().await?;
        tracing::info!("shutting down: finishing requests in flight");
        appliance
            .shutdown()
            .await
            .map_err(|e| CliError::new(e.to_string()))
    })
}

/// The embedded token's module reads its environment when it is loaded: if it is not what the token needs, start
/// this program again with it set (exec replaces the process; no other thread exists yet).
fn reexec_with_token_environment(env: &[(String, PathBuf)]) -> Result<(), CliError> {
    let missing: Vec<&(String, PathBuf)> = env
        .iter()
        .filter(|(k, v)| std::env::var_os(k).as_deref() != Some(v.as_os_str()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt as _;
        let exe = std::env::current_exe()?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(std::env::args_os().skip(1));
        for (k, v) in missing {
            cmd.env(k, v);
        }
        let e = cmd.exec();
        Err(CliError::new(format!(
            "cannot restart with the embedded token's environment: {e}"
        )))
    }
    #[cfg(not(unix))]
    {
        let names: Vec<&str> = missing.iter().map(|(k, _)| k.as_str()).collect();
        Err(CliError::new(format!(
            "set {} as shown by the documentation before starting signet",
            names.join(", ")
        )))
    }
}

fn print_banner(a: &Appliance, td: &str, embedded: &str, policy: &[PolicyRule]) {
    let p = a.paths();
    let token = if a.token_names() == ["embedded"] {
        format!("embedded {embedded} token in {}", p.dir.display())
    } else {
        a.token_names().join(", ")
    };
    let data_flag = format!(" --data-dir {}", p.dir.display());
    println!(
        "signet is serving trust domain {td} on {} (gRPC, mTLS)",
        a.addr()
    );
    println!("  data directory  {}", p.dir.display());
    println!("  token           {token}");
    println!("  root            {}", p.root.display());
    println!("  bundle (PEM)    {}", p.bundle.display());
    println!(
        "  admin client    {} + {} (spiffe://{td}{ADMIN_ID_PATH})",
        p.admin_cert.display(),
        p.admin_key.display()
    );
    println!("  server cert     {}", p.server_cert.display());
    println!("  audit log       {}", a.audit_path().display());
    match a.metrics_addr() {
        Some(m) => println!("  metrics         http://{m}/metrics"),
        None => println!("  metrics         off"),
    }
    match a.bootstrap_addr() {
        Some(b) => println!(
            "  bootstrap       {b} (join tokens: signet join-token create{data_flag} --spiffe-id ...)"
        ),
        None => println!("  bootstrap       off (--bootstrap-listen for join tokens)"),
    }
    for rule in policy {
        println!(
            "  policy          {} may {}",
            rule.caller,
            rule.may.join(", ")
        );
    }
    let spire_rule = policy.iter().any(|r| {
        r.may
            .iter()
            .any(|m| m == "upstream-authority" || m == "key-manager")
            && !r.caller.ends_with(ADMIN_ID_PATH)
    });
    println!("Try:");
    println!("  signet mint x509-svid{data_flag} --spiffe-id spiffe://{td}/demo --out ./svid");
    println!("  signet mint jwt-svid{data_flag} --spiffe-id spiffe://{td}/demo --audience demo");
    println!("  signet bundle{data_flag}");
    println!("  signet status{data_flag}");
    if spire_rule && a.bootstrap_addr().is_some() {
        println!(
            "  signet spire config{data_flag} --upstream-authority >> stanza.conf   # for SPIRE: its server.conf plug-in stanza"
        );
    }
    println!(
        "  grpcurl -cacert {} -cert {} -key {} localhost:{} list",
        p.bundle.display(),
        p.admin_cert.display(),
        p.admin_key.display(),
        a.addr().port()
    );
    println!("Stop with Ctrl-C (SIGINT) or SIGTERM.");
}

async fn wait_for_signal() -> Result<(), CliError> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok(())
    }
}
