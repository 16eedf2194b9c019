//! `signet rotate`: the root's and the JWT key's rotation on a running appliance, through `Admin.GetRotation` and
//! `Admin.Rotate` with the admin credential (like `signet status`).
//!
//! ```text
//! signet rotate status
//! signet rotate prepare  [--kind x509|jwt]
//! signet rotate publish  [--kind x509|jwt]
//! signet rotate activate [--kind x509|jwt]
//! signet rotate retire   [--kind x509|jwt] [--taint-first [--settle 60s]]
//! signet rotate taint    --label LABEL
//! signet rotate destroy  --label LABEL
//! signet rotate csr      [--out FILE]
//! signet rotate install  --cert FILE [--chain FILE]
//! signet rotate install  --offline --config FILE --cert FILE [--chain FILE]
//! ```
//! Below an offline root (`[authority.x509] parent = "external"`), `prepare` writes the new intermediate's
//! certificate signing request (`--csr FILE`, else stdout), `csr` writes it again, and `install` takes the certificate
//! the offline root signed back (checked before anything changes; then `publish` as usual). Before the very first
//! start there is no appliance to talk to: `install --offline` checks the certificate against the CSR the waiting
//! `signet serve` wrote to its data directory and the configured upstream roots, and writes it there for the start
//! to pick up.
//! Times are printed in RFC 3339 with a relative hint (`2026-12-06T10:00:00Z (in 23 h)`).
//! A refused step exits non-zero with the server's reason (e.g. `FAILED_PRECONDITION: activate is allowed from
//! ... on`) and changes nothing.
//!
//! SPIRE (v1.15) adds the roots of its UpstreamAuthority's stream to its bundle and never drops one the stream
//! stops sending, unless SPIRE recorded that root as tainted first: then the next update without it revokes it
//! (`spire-server bundle show` no longer lists it). An untainted root stays in SPIRE's bundle until SPIRE prunes it,
//! a day after it expires. So `retire` of an untainted X.509 root says so, and `retire --taint-first` taints the
//! superseded root, waits `--settle` for SPIRE servers to record the taint (SPIRE retries its side for up to a
//! minute), then retires it, which removes it from SPIRE's bundles too.

use clap::{Args, Subcommand, ValueEnum};
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::admin_client::AdminClient;

use super::CliError;
use super::client::{Connection, runtime, status};
use super::when::when_or_dash as when;

/// `signet rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(subcommand)]
    step: Step,
    #[command(flatten)]
    conn: Connection,
}

/// Which authority a step moves.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    /// The X.509 root.
    X509,
    /// The JWT signing key.
    Jwt,
}

#[derive(Debug, Args)]
struct KindArg {
    /// The X.509 root or the JWT signing key.
    #[arg(long, value_enum, default_value = "x509")]
    kind: Kind,
}

#[derive(Debug, Args)]
struct RetireArgs {
    #[command(flatten)]
    kind: KindArg,
    /// Taint the superseded authority first, wait --settle, then retire it: SPIRE servers then drop the root from
    /// their bundles (SPIRE keeps an untainted root until it expires).
    #[arg(long)]
    taint_first: bool,
    /// With --taint-first: how long SPIRE servers get to record the taint before the retire (e.g. 60s, 2m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    settle: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, signet::units::UnitError> {
    signet::config::ConfigDuration::parse(s).map(|d| d.0)
}

#[derive(Debug, Args)]
struct LabelArg {
    /// The authority's label (see `signet rotate status`).
    #[arg(long)]
    label: String,
}

#[derive(Debug, Args)]
struct PrepareArgs {
    #[command(flatten)]
    kind: KindArg,
    /// Below an offline root: write the new intermediate's CSR to this file (default: print it).
    #[arg(long)]
    csr: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct CsrArgs {
    /// Write the CSR to this file (default: print it).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct InstallArgs {
    /// The certificate the offline root signed (PEM, one certificate).
    #[arg(long = "cert", value_name = "FILE")]
    certificate: std::path::PathBuf,
    /// The CA certificates between it and the upstream root, if any (PEM).
    #[arg(long, value_name = "FILE")]
    chain: Option<std::path::PathBuf>,
    /// Before the first start: check the certificate against the data directory's CSR and the configured upstream
    /// roots and write it there, without an appliance to talk to (needs --config).
    #[arg(long, requires = "config")]
    offline: bool,
    /// The configuration file (with --offline).
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Step {
    /// Show every authority, its state and times, and the token's consistency.
    Status,
    /// Generate the next key on the token; for X.509 its root and the cross-certificates (below an offline root: its
    /// CSR).
    Prepare(PrepareArgs),
    /// Put the prepared root or key into the bundle.
    Publish(KindArg),
    /// Sign with the published root or key (allowed once the publish lead has passed).
    Activate(KindArg),
    /// Take the superseded root or key out of the bundle (allowed once nothing it signed is valid).
    Retire(RetireArgs),
    /// Mark an authority compromised: SPIRE re-mints its intermediate at once.
    Taint(LabelArg),
    /// Destroy a retired authority's key on the token.
    Destroy(LabelArg),
    /// Below an offline root: the CSR of the X.509 authority whose certificate is awaited.
    Csr(CsrArgs),
    /// Below an offline root: install the certificate the offline root signed for the awaited authority.
    Install(InstallArgs),
}

fn write_csr(pem: &str, to: Option<&std::path::Path>) -> Result<(), CliError> {
    match to {
        Some(p) => {
            std::fs::write(p, pem)
                .map_err(|e| CliError::new(format!("cannot write {}: {e}", p.display())))?;
            println!("CSR written to {}", p.display());
        }
        None => print!("{pem}"),
    }
    Ok(())
}

fn read_file(p: &std::path::Path, what: &str) -> Result<Vec<u8>, CliError> {
    std::fs::read(p)
        .map_err(|e| CliError::new(format!("cannot read the {what} {}: {e}", p.display())))
}

fn install_offline(i: &InstallArgs) -> Result<(), CliError> {
    let Some(config) = &i.config else {
        return Err(CliError::new("--offline needs --config"));
    };
    let cfg = signet::config::Config::load(config).map_err(|e| CliError::new(e.to_string()))?;
    let cert = read_file(&i.certificate, "certificate")?;
    let chain = match &i.chain {
        Some(c) => read_file(c, "chain")?,
        None => Vec::new(),
    };
    let path = signet::serve::install_offline(&cfg, &cert, &chain)
        .map_err(|e| CliError::new(format!("install refused: {e}")))?;
    println!(
        "install: the certificate is accepted and written to {}; signet serve starts serving with it",
        path.display()
    );
    Ok(())
}

fn print(r: &pb::GetRotationResponse) {
    println!("bundle sequence  {}", r.bundle_sequence);
    println!("publish lead     {} s", r.publish_lead_seconds);
    for a in &r.authorities {
        println!(
            "{:<5} {:<28} g{:<3} {:<11} id={} not_after={} published={} activated={} valid_descendants_until={}{}{}",
            a.kind,
            a.label,
            a.generation,
            a.state,
            a.id,
            when(a.not_after),
            when(a.published_at),
            when(a.activated_at),
            when(a.issued_until),
            if a.tainted { " TAINTED" } else { "" },
            if a.destroyed { " key-destroyed" } else { "" },
        );
        if a.awaiting_certificate {
            println!(
                "      certificate awaited from the offline root{} (signet rotate csr, then signet rotate install)",
                if a.certificate_awaited_by > 0 {
                    format!(" by {}", when(a.certificate_awaited_by))
                } else {
                    String::new()
                }
            );
        }
    }
    for k in &r.orphaned_keys {
        println!("orphaned key     {k} (on the token, named by no authority)");
    }
    for k in &r.lost_keys {
        println!("lost key         {k} (an authority whose key is not on the token)");
    }
}

/// The superseded authority of `kind`, as the server shows it.
async fn superseded(
    client: &mut AdminClient<tonic::transport::Channel>,
    kind: &str,
) -> Result<Option<pb::RotationAuthority>, CliError> {
    let r = client
        .get_rotation(pb::GetRotationRequest {})
        .await
        .map_err(status)?
        .into_inner();
    Ok(r.authorities
        .into_iter()
        .find(|a| a.kind == kind && a.state == "superseded"))
}

/// `signet rotate retire`, with `--taint-first` tainting (and waiting `settle`) before.
async fn retire(
    client: &mut AdminClient<tonic::transport::Channel>,
    kind: &str,
    taint_first: bool,
    settle: std::time::Duration,
) -> Result<(), CliError> {
    let before = superseded(client, kind).await?;
    if taint_first {
        let Some(a) = &before else {
            return Err(CliError::new(format!(
                "no superseded {kind} authority to taint and retire; nothing changed"
            )));
        };
        if !a.tainted {
            client
                .rotate(pb::RotateRequest {
                    step: "taint".into(),
                    kind: String::new(),
                    label: a.label.clone(),
                })
                .await
                .map_err(status)?;
            println!("taint: {}", a.label);
            eprintln!(
                "waiting {} s for SPIRE servers to record the taint (check with `spire-server bundle show -output \
                 json`: the root shows \"tainted\": true)",
                settle.as_secs()
            );
            tokio::time::sleep(settle).await;
        }
    }
    let r = client
        .rotate(pb::RotateRequest {
            step: "retire".into(),
            kind: kind.to_string(),
            label: String::new(),
        })
        .await
        .map_err(|s| {
            if taint_first {
                CliError::new(format!(
                    "{}; the authority stays tainted and in the bundle: run `signet rotate retire` again once \
                     retire is allowed",
                    status(s)
                ))
            } else {
                status(s)
            }
        })?
        .into_inner();
    println!("retire: {}", r.label);
    if let Some(v) = &r.rotation {
        print(v);
    }
    if kind == "x509" && before.as_ref().is_some_and(|a| !a.tainted) && !taint_first {
        eprintln!(
            "note: {} was not tainted, so SPIRE servers that use signet as their UpstreamAuthority keep it in their \
             bundle until a day after it expires ({}); to have them drop it at once, taint it before retiring \
             (`signet rotate retire --taint-first`)",
            r.label,
            before
                .as_ref()
                .map_or_else(|| "-".to_string(), |a| when(a.not_after))
        );
    }
    Ok(())
}

/// Runs `signet rotate`.
pub fn run(args: RotateArgs) -> Result<(), CliError> {
    if let Step::Install(i) = &args.step
        && i.offline
    {
        return install_offline(i);
    }
    runtime()?.block_on(async move {
        let mut client = AdminClient::new(args.conn.channel().await?);
        let kind = |k: &KindArg| match k.kind {
            Kind::X509 => "x509".to_string(),
            Kind::Jwt => "jwt".to_string(),
        };
        let (step, kind, label) = match &args.step {
            Step::Status => {
                let r = client
                    .get_rotation(pb::GetRotationRequest {})
                    .await
                    .map_err(status)?
                    .into_inner();
                print(&r);
                return Ok(());
            }
            Step::Install(i) => {
                let certificate_pem =
                    String::from_utf8_lossy(&read_file(&i.certificate, "certificate")?)
                        .into_owned();
                let chain_pem = match &i.chain {
                    Some(c) => String::from_utf8_lossy(&read_file(c, "chain")?).into_owned(),
                    None => String::new(),
                };
                let r = client
                    .install_authority(pb::InstallAuthorityRequest {
                        certificate_pem,
                        chain_pem,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                println!("install: {} (publish it next)", r.label);
                if let Some(v) = &r.rotation {
                    print(v);
                }
                return Ok(());
            }
            Step::Csr(_) => ("csr", "x509".to_string(), String::new()),
            Step::Prepare(p) => ("prepare", kind(&p.kind), String::new()),
            Step::Publish(k) => ("publish", kind(k), String::new()),
            Step::Activate(k) => ("activate", kind(k), String::new()),
            Step::Retire(r) => {
                return retire(&mut client, &kind(&r.kind), r.taint_first, r.settle).await;
            }
            Step::Taint(l) => ("taint", String::new(), l.label.clone()),
            Step::Destroy(l) => ("destroy", String::new(), l.label.clone()),
        };
        let r = client
            .rotate(pb::RotateRequest {
                step: step.into(),
                kind,
                label,
            })
            .await
            .map_err(status)?
            .into_inner();
        if !r.csr_pem.is_empty() {
            let to = match &args.step {
                Step::Prepare(p) => p.csr.as_deref(),
                Step::Csr(c) => c.out.as_deref(),
                _ => None,
            };
            // Printed alone when it goes to stdout, so that it can be piped to the ceremony.
            if to.is_none() {
                return write_csr(&r.csr_pem, None);
            }
            write_csr(&r.csr_pem, to)?;
        }
        println!("{step}: {}", r.label);
        if let Some(v) = &r.rotation {
            print(v);
        }
        Ok(())
    })
}
