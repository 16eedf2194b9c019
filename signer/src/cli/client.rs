//! The client commands: `signet mint x509-svid`, `signet mint jwt-svid`, `signet bundle`, `signet status` and
//! `signet join-token create`.
//!
//! They connect with mTLS to the address in `<data dir>/endpoint` (written by `signet serve`), trusting
//! `<data dir>/bundle.pem` and presenting the admin credential `<data dir>/admin.pem` + `admin.key`; every one of
//! these can be overridden with flags. The appliance is checked by its SPIFFE ID (`spiffe://<trust domain of the
//! client certificate>/signet/server`, see [`signet_proto::connect`]), whatever address is dialled; `--server-name`
//! checks a DNS name instead. `mint x509-svid --join-token` needs no credential: it exchanges a one-time join token
//! on the appliance's bootstrap port (`--bootstrap-addr`) for the SVID, with a key made here. With replicas, `--addr` takes several addresses separated by commas: they are
//! tried in order and the first that answers serves the command. A refused request exits non-zero with the server's
//! reason on stderr.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use signet::config::ConfigDuration;
use signet::datadir::write_private;
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use std::sync::Arc;

use signet_proto::connect;
use tokio_rustls::rustls::client::ResolvesClientCert;
use tonic::transport::Channel;

use super::CliError;

/// How to reach the appliance.
#[derive(Debug, Args)]
pub struct Connection {
    /// The appliance's address (host:port), or several replicas' separated by commas (tried in order until one
    /// answers); default: the one in <data dir>/endpoint, else 127.0.0.1:8443.
    #[arg(long, global = true, env = "SIGNET_ADDR")]
    addr: Option<String>,
    /// The data directory of a local appliance (for its address and the admin credential).
    #[arg(
        long,
        global = true,
        env = "SIGNET_DATA_DIR",
        default_value = "signet-data"
    )]
    data_dir: PathBuf,
    /// Client certificate chain (PEM); default: <data dir>/admin.pem.
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// Client key (PKCS#8 PEM); default: <data dir>/admin.key.
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    /// The roots to trust for the server (PEM); default: <data dir>/bundle.pem.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// Check the appliance's certificate for this DNS name instead of its SPIFFE ID (for deployments that give it
    /// a name in `[server] names`). Without it, the appliance must present the X509-SVID of
    /// spiffe://<trust domain>/signet/server, whatever address is dialled.
    #[arg(long, global = true)]
    server_name: Option<String>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| {
        CliError::new(format!(
            "cannot read the {what} {}: {e} (is `signet serve` running with this data directory? see --data-dir)",
            path.display()
        ))
    })
}

impl Connection {
    /// The trust bundle's roots (DER), from --ca or the data directory.
    fn roots(&self) -> Result<Vec<Vec<u8>>, CliError> {
        let path = self
            .ca
            .clone()
            .unwrap_or_else(|| self.data_dir.join("bundle.pem"));
        let pem = read(&path, "trust bundle")?;
        connect::pem_blocks(&pem, "CERTIFICATE")
            .map_err(|e| CliError::new(format!("the trust bundle {}: {e}", path.display())))
    }

    /// The client credential's certificate and key files (the admin's by default), read as a matching pair: a
    /// running appliance renews its admin credential by replacing the two files one after the other, so a pair read
    /// across a renewal is read again (a few times, briefly) before it is called a mismatch.
    fn credential(&self) -> Result<(Vec<u8>, zeroize::Zeroizing<Vec<u8>>), CliError> {
        let d = &self.data_dir;
        let cert_path = self.cert.clone().unwrap_or_else(|| d.join("admin.pem"));
        let key_path = self.key.clone().unwrap_or_else(|| d.join("admin.key"));
        let mut tries = 0;
        loop {
            let cert = read(&cert_path, "client certificate")?;
            let key = zeroize::Zeroizing::new(read(&key_path, "client key")?);
            match connect::certified_key_pem(&cert, &key) {
                Err(e) if e.starts_with(connect::KEY_MISMATCH) && tries < 10 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                _ => return Ok((cert, key)),
            }
        }
    }

    /// The data directory.
    pub(super) fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The trust bundle file the CLI trusts (--ca, else `<data dir>/bundle.pem`).
    pub(super) fn bundle_path(&self) -> PathBuf {
        self.ca
            .clone()
            .unwrap_or_else(|| self.data_dir.join("bundle.pem"))
    }

    /// The appliance's address(es): --addr, else the one in `<data dir>/endpoint`, else 127.0.0.1:8443.
    pub(super) fn address(&self) -> String {
        match &self.addr {
            Some(a) => a.clone(),
            None => std::fs::read_to_string(self.data_dir.join("endpoint"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "127.0.0.1:8443".into()),
        }
    }

    /// The trust domain of the client credential (the admin's by default).
    pub(super) fn trust_domain(&self) -> Result<String, CliError> {
        let (cert, _) = self.credential()?;
        trust_domain_of_cert(&cert)
    }

    /// A channel presenting the configured client credential (the admin's by default).
    pub(super) async fn channel(&self) -> Result<Channel, CliError> {
        let addr = self.address();
        let (cert, key) = self.credential()?;
        let td = trust_domain_of_cert(&cert)?;
        let identity = connect::certified_key_pem(&cert, &key).map_err(CliError::new)?;
        drop(key);
        let identity: Arc<dyn ResolvesClientCert> =
            Arc::new(connect::SwappableIdentity::new(Some(identity)));
        self.connect(&addr, &td, Some(identity)).await
    }

    /// A channel to `addr` (one address or several, comma-separated) that checks the appliance of `td` (or
    /// --server-name) and presents `identity`.
    async fn connect(
        &self,
        addr: &str,
        td: &str,
        identity: Option<Arc<dyn ResolvesClientCert>>,
    ) -> Result<Channel, CliError> {
        let verifier = Arc::new(connect::ApplianceVerifier::new(
            connect::LiveRoots::new(self.roots()?),
            connect::ServerAuth::for_appliance(td, self.server_name.as_deref()),
        ));
        let tls = Arc::new(connect::client_config(verifier, identity).map_err(CliError::new)?);
        let addrs: Vec<&str> = addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        if addrs.is_empty() {
            return Err(CliError::new(format!("--addr {addr:?} names no address")));
        }
        // Replicas are tried in the order given; the first that completes the TLS handshake serves the command.
        let mut failures = Vec::new();
        for a in addrs {
            connect::check_address(a)
                .map_err(|e| CliError::new(format!("bad address {a:?}: {e}")))?;
            let made = connect::channel(a, tls.clone(), |e| {
                e.connect_timeout(CONNECT_TIMEOUT)
                    .timeout(Duration::from_secs(60))
            });
            match tokio::time::timeout(CONNECT_TIMEOUT, made).await {
                Ok(Ok(ch)) => return Ok(ch),
                Ok(Err(e)) => failures.push(format!("cannot connect to {a}: {e}")),
                Err(_) => failures.push(format!(
                    "cannot connect to {a}: no TLS handshake within {CONNECT_TIMEOUT:?}"
                )),
            }
        }
        Err(CliError::new(failures.join("; ")))
    }

    /// A channel to the bootstrap port `addr` without a client certificate (for a join token whose SPIFFE ID is
    /// `id`: the appliance is checked as the one of `id`'s trust domain).
    async fn bootstrap_channel(&self, addr: &str, id: &str) -> Result<Channel, CliError> {
        let td = connect::trust_domain_of(id)
            .ok_or_else(|| CliError::new(format!("--spiffe-id {id:?} is not a SPIFFE ID")))?
            .to_string();
        self.connect(addr, &td, None).await
    }
}

/// The trust domain of a client certificate's SPIFFE ID.
fn trust_domain_of_cert(cert: &[u8]) -> Result<String, CliError> {
    signet::plugin::settings::spiffe_id_of_pem(cert)
        .ok()
        .and_then(|id| connect::trust_domain_of(&id).map(str::to_string))
        .ok_or_else(|| {
            CliError::new(
                "the client certificate carries no SPIFFE ID: it must be an X509-SVID issued by signet",
            )
        })
}

/// How long a connection (TCP and the TLS handshake) to one address may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn status(e: tonic::Status) -> CliError {
    CliError::new(format!(
        "the server refused: {}: {}",
        signet::api::code_name(e.code()),
        e.message()
    ))
}

/// `signet mint ...`.
#[derive(Debug, Args)]
pub struct MintArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    what: MintCommand,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LocalKeyType {
    EcP256,
    EcP384,
}

#[derive(Debug, Subcommand)]
enum MintCommand {
    /// Make a key here, send a CSR, and write DIR/svid.pem (leaf, then intermediates), DIR/svid.key (PKCS#8) and
    /// DIR/bundle.pem (the trust domain's roots).
    #[command(name = "x509-svid")]
    X509Svid {
        /// The SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime (e.g. 1h, 30m); the policy may refuse a longer one.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: ConfigDuration,
        /// The key type of the SVID's key.
        #[arg(long, value_enum, default_value_t = LocalKeyType::EcP256)]
        key_type: LocalKeyType,
        /// Where to write the files.
        #[arg(long)]
        out: PathBuf,
        /// Get the SVID with this one-time join token (from `signet join-token create`) instead of a client
        /// credential, on the appliance's bootstrap port (--bootstrap-addr).
        // A token is base64url and may start with '-': taken as the value, not as another flag.
        #[arg(
            long,
            env = "SIGNET_JOIN_TOKEN",
            hide_env_values = true,
            requires = "bootstrap_addr",
            allow_hyphen_values = true
        )]
        join_token: Option<String>,
        /// The appliance's bootstrap port (host:port, `[server] bootstrap_listen`), for --join-token.
        #[arg(long)]
        bootstrap_addr: Option<String>,
    },
    /// Mint a JWT-SVID and print it.
    #[command(name = "jwt-svid")]
    JwtSvid {
        /// The SPIFFE ID (the token's `sub`).
        #[arg(long)]
        spiffe_id: String,
        /// The audience (repeat for several).
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Lifetime (e.g. 5m).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        ttl: ConfigDuration,
    },
}

pub(super) fn parse_duration(s: &str) -> Result<ConfigDuration, signet::units::UnitError> {
    ConfigDuration::parse(s)
}

/// `signet bundle`.
#[derive(Debug, Args)]
pub struct BundleArgs {
    #[command(flatten)]
    conn: Connection,
    /// Output format: the SPIFFE bundle document (JSON) or the X.509 roots as PEM.
    #[arg(long, value_enum, default_value_t = BundleFormat::Spiffe)]
    format: BundleFormat,
    /// Print the bundles fetched from federated trust domains instead (one trust domain, or all of them as a JSON
    /// object keyed by trust domain name).
    #[arg(long, value_name = "TRUST_DOMAIN", num_args = 0..=1, default_missing_value = "")]
    federated: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BundleFormat {
    Spiffe,
    Pem,
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn roots_pem(roots: &[Vec<u8>]) -> String {
    roots
        .iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
        .collect()
}

/// A new key of `key_type` and a CSR for `spiffe_id` signed with it.
fn key_and_csr(
    spiffe_id: &str,
    key_type: LocalKeyType,
) -> Result<(rcgen::KeyPair, Vec<u8>), CliError> {
    let alg = match key_type {
        LocalKeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        LocalKeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
    };
    let kp = rcgen::KeyPair::generate_for(alg)
        .map_err(|e| CliError::new(format!("cannot generate a key: {e}")))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        spiffe_id
            .to_string()
            .try_into()
            .map_err(|e| CliError::new(format!("--spiffe-id: {e}")))?,
    )];
    let csr = params
        .serialize_request(&kp)
        .map_err(|e| CliError::new(format!("cannot make the CSR: {e}")))?;
    Ok((kp, csr.der().to_vec()))
}

pub(super) fn ttl_secs(ttl: ConfigDuration) -> i64 {
    i64::try_from(ttl.0.as_secs()).unwrap_or(i64::MAX)
}

/// Writes DIR/svid.pem, DIR/svid.key (0600) and DIR/bundle.pem, and says so.
fn write_svid(
    out: &Path,
    svid: &pb::X509svid,
    kp: &rcgen::KeyPair,
    roots: &[Vec<u8>],
) -> Result<(), CliError> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("svid.pem"), roots_pem(&svid.cert_chain))?;
    write_private(&out.join("svid.key"), kp.serialize_pem().as_bytes())
        .map_err(|e| CliError::new(e.to_string()))?;
    std::fs::write(out.join("bundle.pem"), roots_pem(roots))?;
    println!(
        "{} (serial {}, expires {}) written to {}",
        svid.spiffe_id,
        svid.serial,
        super::when::when(svid.expires_at),
        out.display()
    );
    Ok(())
}

/// Runs `signet mint ...`.
pub fn mint(args: MintArgs) -> Result<(), CliError> {
    runtime()?.block_on(async move {
        if let MintCommand::X509Svid {
            spiffe_id,
            ttl,
            key_type,
            out,
            join_token: Some(token),
            bootstrap_addr,
        } = &args.what
        {
            use signet_proto::signet::v1::bootstrap_client::BootstrapClient;
            let addr = bootstrap_addr
                .as_deref()
                .ok_or_else(|| CliError::new("--join-token needs --bootstrap-addr"))?;
            let (kp, csr) = key_and_csr(spiffe_id, *key_type)?;
            let ch = args.conn.bootstrap_channel(addr, spiffe_id).await?;
            let r = BootstrapClient::new(ch)
                .exchange_join_token(pb::ExchangeJoinTokenRequest {
                    token: token.trim().to_string(),
                    csr,
                    ttl_seconds: ttl_secs(*ttl),
                })
                .await
                .map_err(status)?
                .into_inner();
            let svid = r
                .svid
                .ok_or_else(|| CliError::new("the server answered no SVID"))?;
            return write_svid(out, &svid, &kp, &r.x509_authorities);
        }
        let mut client = IssuerClient::new(args.conn.channel().await?);
        match args.what {
            MintCommand::X509Svid {
                spiffe_id,
                ttl,
                key_type,
                out,
                ..
            } => {
                let (kp, csr) = key_and_csr(&spiffe_id, key_type)?;
                let resp = client
                    .batch_mint_x509svid(pb::BatchMintX509svidRequest {
                        requests: vec![pb::X509svidRequest {
                            csr,
                            ttl_seconds: ttl_secs(ttl),
                        }],
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                let svid = match resp.results.into_iter().next().and_then(|r| r.result) {
                    Some(pb::x509svid_result::Result::Svid(s)) => s,
                    Some(pb::x509svid_result::Result::Failure(f)) => {
                        return Err(status(tonic::Status::new(f.code.into(), f.message)));
                    }
                    None => return Err(CliError::new("the server answered no result")),
                };
                let bundle = client
                    .get_bundle(pb::GetBundleRequest {})
                    .await
                    .map_err(status)?
                    .into_inner();
                write_svid(&out, &svid, &kp, &bundle.x509_authorities)
            }
            MintCommand::JwtSvid {
                spiffe_id,
                audience,
                ttl,
            } => {
                let resp = client
                    .mint_jwtsvid(pb::MintJwtsvidRequest {
                        spiffe_id,
                        audience,
                        ttl_seconds: i64::try_from(ttl.0.as_secs()).unwrap_or(i64::MAX),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                println!("{}", resp.token);
                Ok(())
            }
        }
    })
}

/// Runs `signet bundle --federated [TD]`: one trust domain's bundle document (or its roots as PEM), or every
/// federated trust domain's bundle as one JSON object keyed by name (without `spiffe_refresh_hint`, as the SPIFFE
/// standard asks of multi-trust-domain maps).
fn federated(args: &BundleArgs, td: &str) -> Result<(), CliError> {
    use signet::spiffe::BundleDocument;
    use signet_proto::signet::v1::admin_client::AdminClient;
    runtime()?.block_on(async move {
        let mut client = AdminClient::new(args.conn.channel().await?);
        let r = client
            .list_federated_bundles(pb::ListFederatedBundlesRequest {
                trust_domain: td.to_string(),
            })
            .await
            .map_err(status)?
            .into_inner();
        for b in &r.bundles {
            if !b.last_error.is_empty() {
                eprintln!(
                    "warning: {}: the last fetch from {} failed ({}): {}",
                    b.trust_domain, b.endpoint, b.last_error_reason, b.last_error
                );
            }
        }
        let parse = |b: &pb::FederatedBundle| -> Result<Option<BundleDocument>, CliError> {
            if b.spiffe_bundle.is_empty() {
                return Ok(None);
            }
            BundleDocument::parse(&b.spiffe_bundle)
                .map(Some)
                .map_err(|e| {
                    CliError::new(format!(
                        "{}: the server sent a bad bundle: {e}",
                        b.trust_domain
                    ))
                })
        };
        if !td.is_empty() {
            let Some(b) = r.bundles.first() else {
                return Err(CliError::new(format!(
                    "{td}: no such federated trust domain"
                )));
            };
            let Some(doc) = parse(b)? else {
                return Err(CliError::new(format!(
                    "{td}: no bundle yet (nothing fetched from {} so far)",
                    b.endpoint
                )));
            };
            match args.format {
                BundleFormat::Spiffe => println!("{}", String::from_utf8_lossy(&b.spiffe_bundle)),
                BundleFormat::Pem => print!("{}", doc.x509_roots_pem()),
            }
            return Ok(());
        }
        match args.format {
            BundleFormat::Spiffe => {
                let mut map = serde_json::Map::new();
                for b in &r.bundles {
                    if let Some(mut doc) = parse(b)? {
                        doc.refresh_hint_secs = None;
                        let json = doc.to_json().map_err(|e| CliError::new(e.to_string()))?;
                        let value: serde_json::Value = serde_json::from_str(&json)
                            .map_err(|e| CliError::new(e.to_string()))?;
                        map.insert(b.trust_domain.clone(), value);
                    }
                }
                let text = serde_json::to_string_pretty(&serde_json::Value::Object(map))
                    .map_err(|e| CliError::new(e.to_string()))?;
                println!("{text}");
            }
            BundleFormat::Pem => {
                for b in &r.bundles {
                    if let Some(doc) = parse(b)? {
                        print!("{}", doc.x509_roots_pem());
                    }
                }
            }
        }
        Ok(())
    })
}

/// Runs `signet bundle`.
pub fn bundle(args: BundleArgs) -> Result<(), CliError> {
    if let Some(td) = args.federated.clone() {
        return federated(&args, td.trim());
    }
    runtime()?.block_on(async move {
        let mut client = IssuerClient::new(args.conn.channel().await?);
        let b = client
            .get_bundle(pb::GetBundleRequest {})
            .await
            .map_err(status)?
            .into_inner();
        match args.format {
            BundleFormat::Spiffe => {
                println!("{}", String::from_utf8_lossy(&b.spiffe_bundle));
            }
            BundleFormat::Pem => print!("{}", roots_pem(&b.x509_authorities)),
        }
        Ok(())
    })
}

/// `signet status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Connection,
}

/// Runs `signet status`: the trust domain, the authorities, the tokens and the bundle sequence.
pub fn status_cmd(args: StatusArgs) -> Result<(), CliError> {
    use signet_proto::signet::v1::admin_client::AdminClient;
    runtime()?.block_on(async move {
        let mut client = AdminClient::new(args.conn.channel().await?);
        let s = client
            .get_status(pb::GetStatusRequest {})
            .await
            .map_err(status)?
            .into_inner();
        println!("trust domain     {}", s.trust_domain);
        println!("bundle sequence  {}", s.bundle_sequence);
        if !s.datastore.is_empty() {
            println!("datastore        {}", s.datastore);
        }
        let now = super::when::now_unix();
        for r in &s.replicas {
            let this = r.id == s.replica_id;
            println!(
                "replica          {} {} seen {} s ago{}",
                r.id,
                r.address,
                (now - r.seen_at).max(0),
                match (this, s.rotation_leader) {
                    (true, true) => " (this one; runs the rotation schedule)",
                    (true, false) => " (this one)",
                    _ => "",
                }
            );
        }
        for a in &s.authorities {
            println!(
                "authority        {} {} id={} not_after={} token={}{}",
                a.kind,
                a.state,
                a.id,
                super::when::when_or_dash(a.not_after),
                a.token,
                if a.tainted { " TAINTED" } else { "" }
            );
        }
        for t in &s.tokens {
            println!(
                "token            {} {} sessions={}{}",
                t.name,
                if t.healthy {
                    "healthy"
                } else {
                    "OUT OF ROTATION"
                },
                t.sessions,
                if t.last_error.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", t.last_error)
                }
            );
        }
        Ok(())
    })
}

/// `signet join-token ...`.
#[derive(Debug, Args)]
pub struct JoinTokenArgs {
    #[command(flatten)]
    conn: Connection,
    #[command(subcommand)]
    what: JoinTokenCommand,
}

#[derive(Debug, Subcommand)]
enum JoinTokenCommand {
    /// Create a one-time join token for a SPIFFE ID (admin credential): its holder gets one X509-SVID for that ID
    /// from the appliance's bootstrap port (`[server] bootstrap_listen`).
    Create {
        /// The SPIFFE ID the token gets (e.g. the SPIRE server's, spiffe://example.org/spire/server).
        #[arg(long)]
        spiffe_id: String,
        /// How long the token may wait to be used (at most 7 days).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: ConfigDuration,
    },
}

/// Runs `signet join-token create`: prints the token, then how to use it.
pub fn join_token(args: JoinTokenArgs) -> Result<(), CliError> {
    use signet_proto::signet::v1::admin_client::AdminClient;
    runtime()?.block_on(async move {
        let JoinTokenCommand::Create { spiffe_id, ttl } = args.what;
        let r = AdminClient::new(args.conn.channel().await?)
            .create_join_token(pb::CreateJoinTokenRequest {
                spiffe_id,
                ttl_seconds: ttl_secs(ttl),
            })
            .await
            .map_err(status)?
            .into_inner();
        println!("{}", r.token);
        let bootstrap = if r.bootstrap_address.is_empty() {
            eprintln!(
                "warning: the appliance has no bootstrap port: set [server] bootstrap_listen to exchange join tokens"
            );
            "<[server] bootstrap_listen>".to_string()
        } else {
            r.bootstrap_address.clone()
        };
        eprintln!(
            "\nA one-time join token for {} (expires at unix time {}). Its holder needs the trust bundle too \
             (bundle.pem). For the SPIRE plug-in, in plugin_data:\n  \
             spiffe_id          = \"{}\"\n  join_token         = \"{}\"\n  bootstrap_endpoint = \"{bootstrap}\"\n\
             Or by hand: signet mint x509-svid --spiffe-id {} --join-token {} --bootstrap-addr {bootstrap} --ca \
             bundle.pem --out DIR",
            r.spiffe_id, r.expires_at, r.spiffe_id, r.token, r.spiffe_id, r.token
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (String, String) {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a".into()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        (cert.pem(), kp.serialize_pem())
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_named_as_such() {
        let (cert_a, key_a) = pair();
        let (_, key_b) = pair();
        assert!(connect::certified_key_pem(cert_a.as_bytes(), key_a.as_bytes()).is_ok());
        let e = connect::certified_key_pem(cert_a.as_bytes(), key_b.as_bytes()).unwrap_err();
        assert!(e.starts_with(connect::KEY_MISMATCH), "{e}");
    }
}
