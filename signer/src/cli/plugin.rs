//! `signet spire-plugin upstream-authority|key-manager [--embedded CONFIG]`: the process SPIRE starts for
//! `plugin_cmd` (see `signet::plugin`). Run by hand, it explains itself and exits with status 2.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use signet::plugin::{PluginError, PluginKind, PluginOptions, check_launch, log::HclogLayer};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Options of `signet spire-plugin`.
#[derive(Debug, Args)]
pub struct PluginArgs {
    /// The plug-in point SPIRE loads it as.
    kind: Kind,
    /// Run the appliance inside the plug-in from this `signet serve` configuration (single host), instead of
    /// forwarding to the appliance that plugin_data names.
    #[arg(long, value_name = "CONFIG")]
    embedded: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    UpstreamAuthority,
    KeyManager,
}

/// Runs the plug-in process.
pub fn run(args: PluginArgs) -> ExitCode {
    let kind = match args.kind {
        Kind::UpstreamAuthority => PluginKind::UpstreamAuthority,
        Kind::KeyManager => PluginKind::KeyManager,
    };
    if let Err(e) = check_launch(kind, |k| std::env::var(k).ok()) {
        eprintln!("signet spire-plugin: {e}");
        return ExitCode::from(2);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIGNET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(HclogLayer)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(signet::plugin::run(PluginOptions {
        kind,
        embedded: args.embedded,
    }));
    // Streams relayed to an appliance may still be winding down: don't wait for them.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(PluginError::NotLaunchedBySpire(m)) => {
            eprintln!("signet spire-plugin: {m}");
            ExitCode::from(2)
        }
        Err(e) => {
            tracing::error!(error = %e, "the plug-in stopped");
            ExitCode::FAILURE
        }
    }
}
