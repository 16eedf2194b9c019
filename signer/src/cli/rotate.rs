//! `signet rotate`: the root's and the JWT key's rotation on a running appliance, through `Admin.GetRotation` and
//! `Admin.Rotate` with the admin credential (like `signet status`).
//!
//! ```text
//! signet rotate status
//! signet rotate prepare  [--kind x509|jwt]
//! signet rotate publish  [--kind x509|jwt]
//! signet rotate activate [--kind x509|jwt]
//! signet rotate retire   [--kind x509|jwt]
//! signet rotate taint    --label LABEL
//! signet rotate destroy  --label LABEL
//! ```
//! Times are printed in RFC 3339 with a relative hint (`2026-12-06T10:00:00Z (in 23 h)`).
//! A refused step exits non-zero with the server's reason (e.g. `FAILED_PRECONDITION: activate is allowed from
//! ... on`) and changes nothing.

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
struct LabelArg {
    /// The authority's label (see `signet rotate status`).
    #[arg(long)]
    label: String,
}

#[derive(Debug, Subcommand)]
enum Step {
    /// Show every authority, its state and times, and the token's consistency.
    Status,
    /// Generate the next key on the token; for X.509 its root and the cross-certificates.
    Prepare(KindArg),
    /// Put the prepared root or key into the bundle.
    Publish(KindArg),
    /// Sign with the published root or key (allowed once the publish lead has passed).
    Activate(KindArg),
    /// Take the superseded root or key out of the bundle (allowed once nothing it signed is valid).
    Retire(KindArg),
    /// Mark an authority compromised: SPIRE re-mints its intermediate at once.
    Taint(LabelArg),
    /// Destroy a retired authority's key on the token.
    Destroy(LabelArg),
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
    }
    for k in &r.orphaned_keys {
        println!("orphaned key     {k} (on the token, named by no authority)");
    }
    for k in &r.lost_keys {
        println!("lost key         {k} (an authority whose key is not on the token)");
    }
}

/// Runs `signet rotate`.
pub fn run(args: RotateArgs) -> Result<(), CliError> {
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
            Step::Prepare(k) => ("prepare", kind(k), String::new()),
            Step::Publish(k) => ("publish", kind(k), String::new()),
            Step::Activate(k) => ("activate", kind(k), String::new()),
            Step::Retire(k) => ("retire", kind(k), String::new()),
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
        println!("{step}: {}", r.label);
        if let Some(v) = &r.rotation {
            print(v);
        }
        Ok(())
    })
}
