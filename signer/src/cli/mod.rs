//! signet's command line (clap derive).
//!
//! Logs go to stderr, as text for people (`--log-format text`) or JSON lines for log pipelines (`--log-format json`);
//! the default is text when stderr is a terminal and JSON otherwise. `RUST_LOG` sets the filter (default `info` for
//! `serve`, `warn` for the other commands). The SPIRE plug-in keeps SPIRE's hclog format whatever the flag says.
//! Times are printed in RFC 3339 with a relative hint (see `when`).

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod bench;
mod client;
mod doctor;
mod plugin;
mod rotate;
mod serve;
mod spire;
mod token;
mod when;

/// signet: a high-throughput signing appliance for SPIFFE identities, CA keys in PKCS#11 tokens.
#[derive(Debug, Parser)]
#[command(name = "signet", version, about)]
struct Cli {
    /// Log format on stderr: text for people, json for log pipelines (default: text on a terminal, else json).
    #[arg(long, global = true, value_enum, env = "SIGNET_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The format when none is asked for: text for a person at a terminal, JSON for whatever collects the output.
    fn default_for_stderr() -> Self {
        use std::io::IsTerminal as _;
        if std::io::stderr().is_terminal() {
            LogFormat::Text
        } else {
            LogFormat::Json
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage PKCS#11 tokens and the keys on them.
    Token(token::TokenCli),
    /// Run the appliance (gRPC APIs with mTLS); without --config, the embedded default in ./signet-data/.
    Serve(serve::ServeArgs),
    /// Mint an X509-SVID or a JWT-SVID from a running appliance.
    Mint(client::MintArgs),
    /// One-time join tokens: a client's first X509-SVID without copying a key (admin credential).
    JoinToken(client::JoinTokenArgs),
    /// Print the trust domain's bundle.
    Bundle(client::BundleArgs),
    /// Show the appliance's authorities, tokens and bundle sequence.
    Status(client::StatusArgs),
    /// Measure issuance rates and latency under load, beside the token's bare signing rate.
    Bench(Box<signet_bench::BenchArgs>),
    /// Plug a SPIRE server into this appliance: `signet spire config --upstream-authority` prints its server.conf
    /// stanza, with a join token.
    Spire(spire::SpireArgs),
    /// The SPIRE plug-in process (SPIRE's server starts it: plugin_cmd in server.conf).
    SpirePlugin(plugin::PluginArgs),
    /// Rotate the root or the JWT key: status, prepare, publish, activate, retire, taint, destroy.
    Rotate(rotate::RotateArgs),
    /// Check the configuration, tokens, keys, datastore, expiries and policy offline (exit 1 when a check fails).
    Doctor(doctor::DoctorArgs),
}

/// Parses the command line, runs it, and reports errors on stderr with a non-zero exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::SpirePlugin(p) = cli.command {
        // Its own logging (hclog JSON for SPIRE) and exit codes.
        return plugin::run(p);
    }
    let serving = matches!(cli.command, Command::Serve(_));
    // cryptoki logs an error for each vendor mechanism of a token's list it has no name for: not an error of
    // signet's (the token layer reads the list for the mechanisms it knows), so silenced by default.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if serving {
            "info,cryptoki::mechanism=off"
        } else {
            "warn,cryptoki::mechanism=off"
        })
    });
    let format = cli.log_format.unwrap_or_else(LogFormat::default_for_stderr);
    let _ = match format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .try_init(),
        LogFormat::Text => tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .try_init(),
    };
    let result = match cli.command {
        Command::Token(t) => token::run(t),
        Command::Serve(s) => serve::run(s),
        Command::Mint(m) => client::mint(m),
        Command::Bundle(b) => client::bundle(b),
        Command::JoinToken(j) => client::join_token(j),
        Command::Status(s) => client::status_cmd(s),
        Command::Bench(b) => bench::run(*b),
        Command::Spire(s) => spire::run(s),
        Command::SpirePlugin(_) => Ok(()),
        Command::Rotate(r) => rotate::run(r),
        Command::Doctor(d) => doctor::run(d),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// A CLI failure: a message and an exit status.
#[derive(Debug)]
pub struct CliError {
    message: String,
    code: u8,
}

impl CliError {
    fn new(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 1,
        }
    }

    fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<signet_pkcs11::Error> for CliError {
    fn from(e: signet_pkcs11::Error) -> Self {
        use signet_pkcs11::ErrorKind;
        // 2 is clap's usage error; 3: authentication (PIN); 4: not found; 1: anything else.
        let code = match e.kind() {
            ErrorKind::PinIncorrect | ErrorKind::PinLocked | ErrorKind::PinUnavailable => 3,
            ErrorKind::TokenNotFound | ErrorKind::KeyNotFound => 4,
            _ => 1,
        };
        CliError {
            message: e.to_string(),
            code,
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::new(format!("I/O error: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::Cli;

    #[test]
    fn a_join_token_that_starts_with_a_hyphen_is_a_value() {
        // Join tokens are base64url: one in 64 starts with '-'.
        let parsed = Cli::try_parse_from([
            "signet",
            "mint",
            "x509-svid",
            "--spiffe-id",
            "spiffe://example.org/spire/server",
            "--join-token",
            "-aBc_dEf",
            "--bootstrap-addr",
            "127.0.0.1:8445",
            "--out",
            "svid",
        ]);
        assert!(parsed.is_ok(), "{:?}", parsed.err());
    }
}
