//! `signet spire config --upstream-authority|--key-manager`: plugs a SPIRE server into a running appliance.
//!
//! With the admin credential of the data directory (like the other client commands, see `client`), it creates a
//! one-time join token for the SPIRE server's SPIFFE ID (default `spiffe://<trust domain>/spire/server`) for each
//! plug-in asked for, and prints on stdout exactly the `server.conf` stanza(s) to paste into SPIRE's `plugins { }`
//! block: `plugin_cmd` (this binary, by absolute path), `plugin_args`, `plugin_checksum` (its SHA-256) and a
//! `plugin_data` with the appliance's address, its trust bundle, where the plug-in keeps (and renews) its credential
//! (`--credential-dir`, default `<data dir>/spire-client/`), and the join token with the bootstrap port to exchange
//! it on. Notes go to stderr, so `signet spire config --upstream-authority >> stanza.conf` keeps only the stanza.

use std::path::{Path, PathBuf};

use clap::{ArgGroup, Args, Subcommand};
use signet::config::{ConfigDuration, SPIRE_SERVER_ID_PATH};
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::admin_client::AdminClient;

use super::CliError;
use super::client::{Connection, parse_duration, runtime, status, ttl_secs};

/// `signet spire ...`.
#[derive(Debug, Args)]
pub struct SpireArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    what: SpireCommand,
}

#[derive(Debug, Subcommand)]
enum SpireCommand {
    /// Create a join token for the SPIRE server and print the plug-in stanza(s) for its server.conf (stdout: the
    /// stanza only; notes on stderr).
    Config(ConfigArgs),
}

/// Options of `signet spire config`.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("plugin")
        .required(true)
        .multiple(true)
        .args(["upstream_authority", "key_manager"])
))]
struct ConfigArgs {
    /// Print the UpstreamAuthority stanza (signet's root signs SPIRE's CA).
    #[arg(long)]
    upstream_authority: bool,
    /// Print the KeyManager stanza (SPIRE's CA and JWT keys on signet's token).
    #[arg(long)]
    key_manager: bool,
    /// The SPIRE server's SPIFFE ID (default: spiffe://<trust domain>/spire/server); the policy must let it use the
    /// plug-in's service.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// How long the join token(s) may wait for SPIRE's first start (at most 7 days).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    ttl: ConfigDuration,
    /// Where the plug-in keeps (and renews) its credential, <plug-in>.pem and <plug-in>.key (default:
    /// <data dir>/spire-client/); made here (0700) if missing.
    #[arg(long)]
    credential_dir: Option<PathBuf>,
}

/// Runs `signet spire ...`.
pub fn run(args: SpireArgs) -> Result<(), CliError> {
    let SpireCommand::Config(c) = args.what;
    config(&args.conn, c)
}

/// A string as an HCL quoted string.
fn hcl(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An absolute form of `p` (canonical when it exists).
fn absolute(p: &Path) -> Result<PathBuf, CliError> {
    std::fs::canonicalize(p).or_else(|_| {
        std::path::absolute(p)
            .map_err(|e| CliError::new(format!("cannot make {} absolute: {e}", p.display())))
    })
}

/// Makes `dir` (0700 on Unix) if it does not exist.
fn make_private_dir(dir: &Path) -> Result<(), CliError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        b.mode(0o700);
    }
    b.create(dir)
        .map_err(|e| CliError::new(format!("cannot create {}: {e}", dir.display())))
}

/// The plug-in stanza for SPIRE's `plugins { }` block.
pub(super) struct Stanza<'a> {
    /// `UpstreamAuthority` or `KeyManager`.
    pub(super) kind: &'a str,
    /// `upstream-authority` or `key-manager`.
    pub(super) arg: &'a str,
    /// This program, by absolute path.
    pub(super) exe: &'a Path,
    /// Its SHA-256 (hex).
    pub(super) checksum: &'a str,
    /// The appliance's address(es).
    pub(super) endpoint: &'a str,
    /// Its trust bundle (PEM), by absolute path.
    pub(super) bundle: &'a Path,
    /// Where the plug-in keeps its certificate.
    pub(super) cert: PathBuf,
    /// Where the plug-in keeps its key.
    pub(super) key: PathBuf,
    /// The join token.
    pub(super) token: &'a pb::CreateJoinTokenResponse,
}

/// This program's absolute path and its SHA-256 (hex), for plugin_cmd and plugin_checksum.
pub(super) fn this_program() -> Result<(PathBuf, String), CliError> {
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .map_err(|e| CliError::new(format!("cannot find this program's path: {e}")))?;
    let binary = std::fs::read(&exe)
        .map_err(|e| CliError::new(format!("cannot read {}: {e}", exe.display())))?;
    let checksum = hex::encode(ring::digest::digest(&ring::digest::SHA256, &binary));
    Ok((exe, checksum))
}

impl Stanza<'_> {
    /// The stanza's text.
    pub(super) fn render(&self) -> String {
        let addrs: Vec<&str> = self
            .endpoint
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        let endpoint = if addrs.len() > 1 {
            let list: Vec<String> = addrs.iter().map(|a| hcl(a)).collect();
            format!("    endpoints          = [{}]\n", list.join(", "))
        } else {
            format!("    endpoint           = {}\n", hcl(self.endpoint.trim()))
        };
        let path = |p: &Path| hcl(&p.to_string_lossy());
        format!(
            "{kind} \"signet\" {{\n  plugin_cmd      = {exe}\n  plugin_args     = [\"spire-plugin\", {arg}]\n  \
             plugin_checksum = {sum}\n  plugin_data {{\n{endpoint}    trust_bundle_path  = {bundle}\n    \
             client_cert_path   = {cert}\n    client_key_path    = {key}\n    spiffe_id          = {id}\n    \
             join_token         = {token}\n    bootstrap_endpoint = {boot}\n  }}\n}}\n",
            kind = self.kind,
            exe = path(self.exe),
            arg = hcl(self.arg),
            sum = hcl(self.checksum),
            bundle = path(self.bundle),
            cert = path(&self.cert),
            key = path(&self.key),
            id = hcl(&self.token.spiffe_id),
            token = hcl(&self.token.token),
            boot = hcl(&self.token.bootstrap_address),
        )
    }
}

/// The stanza of a plug-in running its own appliance (`signet spire-plugin <arg> --embedded <config>`): no
/// endpoint, credential or join token (the appliance in the plug-in's process is its own).
pub(super) fn embedded_stanza(
    kind: &str,
    arg: &str,
    exe: &Path,
    checksum: &str,
    config: &Path,
) -> String {
    let path = |p: &Path| hcl(&p.to_string_lossy());
    format!(
        "{kind} \"signet\" {{\n  plugin_cmd      = {exe}\n  plugin_args     = [\"spire-plugin\", {arg}, \"--embedded\", \
         {config}]\n  plugin_checksum = {sum}\n  plugin_data {{}}\n}}\n",
        exe = path(exe),
        arg = hcl(arg),
        config = path(config),
        sum = hcl(checksum),
    )
}

fn config(conn: &Connection, args: ConfigArgs) -> Result<(), CliError> {
    let (exe, checksum) = this_program()?;
    let spiffe_id = match args.spiffe_id {
        Some(id) => id,
        None => format!("spiffe://{}{SPIRE_SERVER_ID_PATH}", conn.trust_domain()?),
    };
    let bundle = absolute(&conn.bundle_path())?;
    if !bundle.is_file() {
        return Err(CliError::new(format!(
            "the trust bundle {} does not exist (is `signet serve` running with this data directory? see --data-dir)",
            bundle.display()
        )));
    }
    let cred_dir = args
        .credential_dir
        .clone()
        .unwrap_or_else(|| conn.data_dir().join("spire-client"));
    make_private_dir(&cred_dir)?;
    let cred_dir = absolute(&cred_dir)?;
    let endpoint = conn.address();
    let mut kinds = Vec::new();
    if args.upstream_authority {
        kinds.push(("UpstreamAuthority", "upstream-authority"));
    }
    if args.key_manager {
        kinds.push(("KeyManager", "key-manager"));
    }
    let stanzas = runtime()?.block_on(async {
        let mut admin = AdminClient::new(conn.channel().await?);
        let mut out = Vec::new();
        // One token per plug-in: a token works once, and each plug-in keeps its own credential.
        for (kind, arg) in kinds {
            let token = admin
                .create_join_token(pb::CreateJoinTokenRequest {
                    spiffe_id: spiffe_id.clone(),
                    ttl_seconds: ttl_secs(args.ttl),
                })
                .await
                .map_err(status)?
                .into_inner();
            if token.bootstrap_address.is_empty() {
                return Err(CliError::new(
                    "the appliance has no bootstrap port to exchange join tokens on: start it with \
                     --bootstrap-listen 127.0.0.1:8445 or set [server] bootstrap_listen",
                ));
            }
            out.push((kind, arg, token));
        }
        Ok::<_, CliError>(out)
    })?;
    let mut text = String::new();
    for (kind, arg, token) in &stanzas {
        text.push_str(
            &Stanza {
                kind,
                arg,
                exe: &exe,
                checksum: &checksum,
                endpoint: &endpoint,
                bundle: &bundle,
                cert: cred_dir.join(format!("{arg}.pem")),
                key: cred_dir.join(format!("{arg}.key")),
                token,
            }
            .render(),
        );
    }
    print!("{text}");
    let expires = stanzas
        .first()
        .map(|(_, _, t)| super::when::when(t.expires_at))
        .unwrap_or_default();
    eprintln!(
        "Paste the stanza above into the plugins {{ }} block of SPIRE's server.conf (the server's trust_domain must be \
         {td}), then start spire-server. The join token works once, until {expires}: at its first start the plug-in \
         exchanges it for the credential of {spiffe_id}, keeps it in {dir} and renews it itself. plugin_checksum is \
         this binary's ({exe}): run this command again after replacing or rebuilding it.",
        td = signet_proto::connect::trust_domain_of(&spiffe_id).unwrap_or("?"),
        dir = cred_dir.display(),
        exe = exe.display(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hcl_strings_are_escaped() {
        assert_eq!(hcl("/a/b"), "\"/a/b\"");
        assert_eq!(hcl("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    /// The embedded stanza is HCL SPIRE reads: the plug-in's arguments end with `--embedded` and the configuration,
    /// whatever characters its path holds.
    #[test]
    fn embedded_stanza_is_hcl_with_the_config_as_last_argument() {
        let text = embedded_stanza(
            "KeyManager",
            "key-manager",
            Path::new("/opt/signet/bin/signet"),
            "ab12",
            Path::new("/tmp/a \"b\"/embedded.toml"),
        );
        let body: hcl::Body = hcl::from_str(&text).unwrap();
        let block = body.blocks().next().unwrap();
        assert_eq!(block.identifier(), "KeyManager");
        let args = block
            .body()
            .attributes()
            .find(|a| a.key() == "plugin_args")
            .unwrap();
        let hcl::Expression::Array(args) = args.expr() else {
            panic!("plugin_args is not a list: {text}");
        };
        let args: Vec<String> = args
            .iter()
            .map(|e| match e {
                hcl::Expression::String(s) => s.clone(),
                other => panic!("{other:?} in plugin_args: {text}"),
            })
            .collect();
        assert_eq!(
            args,
            [
                "spire-plugin",
                "key-manager",
                "--embedded",
                "/tmp/a \"b\"/embedded.toml"
            ]
        );
        assert!(text.contains("plugin_data {}"), "{text}");
    }
}
