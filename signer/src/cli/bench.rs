//! `signet bench`: the load generator lives in the `signet-bench` crate; this module hands it a launcher that starts
//! an appliance in this process (on the embedded hsm-sim, a SoftHSM2 token or the TPM rig's token) and a loop of the
//! same per-certificate work without gRPC and pipeline, for the second ratio.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rcgen::{DistinguishedName, DnType};
use signet::config::{Config, ModeSetting, PinConfig, TokenSettings};
use signet::keys::token::TokenKey;
use signet::keys::{AuthorityKey, KeyType, SoftwareKey};
use signet::serve::{Appliance, EmbeddedToken as _, HsmSimEmbedded};
use signet::spiffe::TrustDomain;
use signet::x509::{Authority, LeafRequest, RootRequest, parse_and_verify_csr};
use signet_bench::ceiling::{CEILING_KEY, TokenSpec};
use signet_bench::spire::{SpireSetup, StanzaMaker};
use signet_bench::{
    BenchArgs, BoxFuture, InProcess, InProcessToken, Mode, Started, Target, WorkLoop,
};
use signet_pkcs11::{KeyGenOptions, PinSource, Token, TokenConfig};
use signet_proto::signet::v1 as pb;
use time::OffsetDateTime;

use super::CliError;

/// Runs `signet bench`.
pub fn run(args: BenchArgs) -> Result<(), CliError> {
    let result = signet_bench::run(&args, &launch)
        .map(|_| ())
        .map_err(CliError::new);
    if let Some(home) = SIM_HOME.get() {
        let _ = std::fs::remove_dir_all(home);
    }
    result
}

/// The simulated device's directory and its token's PINs for this process (removed when the bench ends).
static SIM_HOME: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn sim_home() -> &'static Path {
    SIM_HOME.get_or_init(|| {
        std::env::temp_dir().join(format!("signet-bench-sim-{}", std::process::id()))
    })
}

// The launcher's error is text because `signet_bench::Launcher` (the bench crate's interface, shared with its other
// targets) reports a failed start as the message it prints.
fn launch(spec: InProcess) -> BoxFuture<Result<Started, String>> {
    Box::pin(async move { start(spec).await })
}

/// Starts the in-process appliance; the error is the message `signet bench` prints (see [`launch`]).
async fn start(spec: InProcess) -> Result<Started, String> {
    let mut cfg = Config::embedded_default();
    cfg.data_dir = spec.data_dir.clone();
    cfg.server.listen = "127.0.0.1:0"
        .parse()
        .map_err(|e| format!("listen address: {e}"))?;
    cfg.server.metrics = None;
    // SPIRE's plug-ins get their first credentials for join tokens, exchanged on the bootstrap port.
    cfg.server.bootstrap_listen = if spec.spire_plugins {
        Some(
            "127.0.0.1:0"
                .parse()
                .map_err(|e| format!("bootstrap address: {e}"))?,
        )
    } else {
        None
    };
    cfg.pipeline.cpu_threads = spec.cpu_threads;
    cfg.server.audit_sync = spec.audit_sync;
    cfg.pipeline.verify_after_sign = spec.verify_after_sign.clone();
    cfg.authority.x509.mode = match spec.mode {
        Mode::Direct => ModeSetting::Direct,
        Mode::Delegated => ModeSetting::Delegated,
    };
    let (token, what) = match &spec.token {
        InProcessToken::HsmSim { latency_ms } => {
            // One simulated device per process (its first configuration stays): its directory and the token's
            // PINs outlive each appliance, so that the next appliance of the run (`--target cfssl` starts one per
            // mode, `--target spire` may too) logs in to the same token.
            let home = sim_home();
            let dir = home.join("hsm-sim");
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            for f in ["token.pin", "token.so-pin"] {
                if home.join(f).exists() {
                    std::fs::copy(home.join(f), spec.data_dir.join(f))
                        .map_err(|e| format!("copying the token's PIN: {e}"))?;
                }
            }
            // Configured before the embedded token is provisioned: the first configuration of the process stays.
            hsm_sim::set_embedded_config(hsm_sim::Config {
                dir: Some(dir),
                latency_ms: *latency_ms,
                ..hsm_sim::Config::default()
            });
            let mut settings = HsmSimEmbedded
                .provision(&spec.data_dir)
                .map_err(|e| e.to_string())?;
            for f in ["token.pin", "token.so-pin"] {
                if !home.join(f).exists() {
                    std::fs::copy(spec.data_dir.join(f), home.join(f))
                        .map_err(|e| format!("keeping the token's PIN: {e}"))?;
                }
            }
            settings.sessions = spec.sessions;
            let PinConfig::File(pin_file) = &settings.pin else {
                return Err("the embedded token has no PIN file".into());
            };
            let pin = PinSource::File(pin_file.clone())
                .resolve()
                .map_err(|e| format!("the embedded token's PIN: {e}"))?;
            let token = TokenSpec {
                module: settings.module.clone(),
                label: settings.token.clone().unwrap_or_default(),
                pin,
            };
            cfg.tokens = vec![settings];
            (token, format!("hsm-sim at {latency_ms} ms a signature"))
        }
        InProcessToken::Module(t) => {
            let pin_file = spec.data_dir.join("token.pin");
            signet::datadir::write_private(&pin_file, t.pin.expose().as_bytes())
                .map_err(|e| e.to_string())?;
            cfg.tokens = vec![TokenSettings {
                name: "bench".into(),
                module: t.module.clone(),
                token: Some(t.label.clone()),
                serial: None,
                pin: PinConfig::File(pin_file),
                sessions: spec.sessions,
            }];
            (t.clone(), format!("{}", t.module.display()))
        }
    };
    let app = Appliance::start(cfg)
        .await
        .map_err(|e| format!("starting the appliance: {e}"))?;
    let p = app.paths();
    let read = |f: &PathBuf| std::fs::read(f).map_err(|e| format!("reading {}: {e}", f.display()));
    let target = Target {
        addr: app.addr().to_string(),
        server_name: None,
        ca_pem: read(&p.bundle)?,
        cert_pem: read(&p.admin_cert)?,
        key_pem: read(&p.admin_key)?,
    };
    let mut description = format!(
        "in-process appliance, {:?} mode, {what}, {} sessions",
        spec.mode, spec.sessions
    )
    .to_lowercase();
    // Settings away from signet's defaults are named, so a table says what it measured.
    if !spec.audit_sync {
        description.push_str(", audit_sync = false");
    }
    if spec.verify_after_sign != "always" {
        description.push_str(&format!(
            ", verify_after_sign = {:?}",
            spec.verify_after_sign
        ));
    }
    let trust_domain = app.trust_domain().clone();
    let spire_stanza = if spec.spire_plugins {
        let embedded = EmbeddedPlugin {
            trust_domain: trust_domain.to_string(),
            sessions: spec.sessions,
            audit_sync: spec.audit_sync,
            verify_after_sign: spec.verify_after_sign.clone(),
        };
        Some(
            stanza_maker(app.addr().to_string(), p.bundle.clone(), embedded)
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    Ok(Started {
        spire_stanza,
        target,
        ceiling_token: Some(token.clone()),
        work_loop: Some(work_loop(spec.mode, token, spec.sessions, trust_domain)),
        description,
        stop: Box::new(move || {
            Box::pin(async move {
                if let Err(e) = app.shutdown().await {
                    eprintln!("stopping the appliance: {e}");
                }
            })
        }),
    })
}

/// What the `key-manager-embedded` set-up's plug-in runs: an appliance of its own, of the bench's trust domain, on
/// a fresh SoftHSM2 token of its own with as many sessions as the bench's and its audit and post-sign settings.
struct EmbeddedPlugin {
    trust_domain: String,
    sessions: usize,
    audit_sync: bool,
    verify_after_sign: String,
}

impl EmbeddedPlugin {
    /// Writes the plug-in's configuration into `dir` (its data directory beside it, on a fresh SoftHSM2 token
    /// labelled `label`; the data directory's admin credential may use the KeyManager) and returns its path.
    fn write_config(&self, dir: &Path, label: &str) -> Result<PathBuf, String> {
        let softhsm = signet_bench::softhsm::private_dir().ok_or(
            "the key-manager-embedded set-up needs the bench's own SoftHSM2 directory (--token softhsm)",
        )?;
        let token = signet_bench::softhsm::fresh_token_labelled(&softhsm, label)?;
        let pin = dir.join("embedded.pin");
        signet::datadir::write_private(&pin, token.pin.expose().as_bytes())
            .map_err(|e| e.to_string())?;
        let quoted = |p: &Path| toml::Value::String(p.to_string_lossy().into_owned()).to_string();
        let td = &self.trust_domain;
        let text = format!(
            "trust_domain = {td_q}\ndata_dir = {data}\n\n[[tokens]]\nname = \"softhsm\"\nmodule = {module}\n\
             token = {label_q}\npin = {{ file = {pin} }}\nsessions = {sessions}\n\n[[policy]]\n\
             caller = \"spiffe://{td}/signet/admin\"\nmay = [\"key-manager\"]\n\n[server]\n\
             audit_sync = {audit_sync}\n\n[pipeline]\nverify_after_sign = {verify}\n",
            td_q = toml::Value::String(td.clone()),
            data = quoted(&dir.join("embedded-data")),
            module = quoted(&token.module),
            label_q = toml::Value::String(token.label.clone()),
            pin = quoted(&pin),
            sessions = self.sessions,
            audit_sync = self.audit_sync,
            verify = toml::Value::String(self.verify_after_sign.clone()),
        );
        let path = dir.join("embedded.toml");
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(path)
    }
}

/// The plug-in stanzas of `signet spire config` for the in-process appliance at `endpoint` (bundle in `bundle`);
/// for `key-manager-embedded`, the stanza of `signet spire-plugin key-manager --embedded` on a configuration of its
/// own ([`EmbeddedPlugin`]).
fn stanza_maker(
    endpoint: String,
    bundle: PathBuf,
    embedded: EmbeddedPlugin,
) -> Result<StanzaMaker, super::CliError> {
    let (exe, checksum) = super::spire::this_program()?;
    let made = AtomicU64::new(0);
    Ok(Box::new(
        move |setup: SpireSetup, token: &pb::CreateJoinTokenResponse, cred_dir: &Path| {
            let (kind, arg) = match setup {
                SpireSetup::UpstreamAuthority => ("UpstreamAuthority", "upstream-authority"),
                SpireSetup::KeyManager => ("KeyManager", "key-manager"),
                SpireSetup::KeyManagerEmbedded => {
                    let n = made.fetch_add(1, Ordering::Relaxed);
                    let config =
                        embedded.write_config(cred_dir, &format!("signet-bench-embedded-{n}"))?;
                    return Ok(super::spire::embedded_stanza(
                        "KeyManager",
                        "key-manager",
                        &exe,
                        &checksum,
                        &config,
                    ));
                }
                SpireSetup::Memory => return Err("SPIRE alone has no signet plug-in".into()),
            };
            Ok(super::spire::Stanza {
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
            .render())
        },
    ))
}

/// The appliance's per-certificate work in a tight loop (CSR parse and verify, template, lint, sign, post-sign
/// check), on `threads` threads (at least one per session in direct mode): with the token key in direct mode, an
/// in-memory key in delegated mode.
fn work_loop(mode: Mode, token: TokenSpec, sessions: usize, td: TrustDomain) -> WorkLoop {
    Box::new(
        move |csrs: &[Vec<u8>], threads: usize, duration: Duration| {
            let key: Arc<dyn AuthorityKey> = match mode {
                Mode::Direct => {
                    let cfg = TokenConfig::new(
                        token.module.clone(),
                        token.label.clone(),
                        PinSource::Value(token.pin.clone()),
                    );
                    let t = Token::open(&cfg).map_err(|e| format!("opening the token: {e}"))?;
                    let mut s = t.session().map_err(|e| e.to_string())?;
                    if s.find_key(CEILING_KEY).is_err() {
                        s.generate_key(
                            CEILING_KEY,
                            signet_pkcs11::KeyType::EcP256,
                            KeyGenOptions::default(),
                        )
                        .map_err(|e| format!("generating a key: {e}"))?;
                    }
                    Arc::new(TokenKey::open(t, CEILING_KEY, sessions).map_err(|e| e.to_string())?)
                }
                Mode::Delegated => Arc::new(
                    SoftwareKey::generate(KeyType::EcP256)
                        .map_err(|e| e.to_string())?
                        .0,
                ),
            };
            let mut subject = DistinguishedName::new();
            subject.push(DnType::CommonName, "signet bench work loop");
            let req = RootRequest {
                trust_domain: td.clone(),
                subject,
                ttl: Duration::from_secs(3600),
                path_len: None,
            };
            let authority = Authority::self_signed_root(key, &req, OffsetDateTime::now_utc())
                .map_err(|e| e.to_string())?;
            let threads = match mode {
                Mode::Direct => threads.max(sessions),
                Mode::Delegated => threads,
            }
            .max(1);
            let done = AtomicU64::new(0);
            let failed = AtomicU64::new(0);
            let start = Instant::now();
            let end = start + duration;
            std::thread::scope(|scope| {
                for t in 0..threads {
                    let (authority, done, failed) = (&authority, &done, &failed);
                    scope.spawn(move || {
                        let mut i = t;
                        while Instant::now() < end {
                            let csr = &csrs[i % csrs.len()];
                            i += threads;
                            let ok = parse_and_verify_csr(csr)
                                .ok()
                                .and_then(|c| {
                                    LeafRequest::from_csr(&c, Duration::from_secs(600)).ok()
                                })
                                .and_then(|r| {
                                    authority
                                        .issue_x509_svid(&r, OffsetDateTime::now_utc())
                                        .ok()
                                });
                            match ok {
                                Some(cert) => {
                                    std::hint::black_box(cert);
                                    done.fetch_add(1, Ordering::Relaxed);
                                }
                                None => {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    });
                }
            });
            let secs = start.elapsed().as_secs_f64();
            if failed.load(Ordering::Relaxed) > 0 {
                return Err(format!(
                    "{} certificates of the work loop failed",
                    failed.load(Ordering::Relaxed)
                ));
            }
            Ok(done.load(Ordering::Relaxed) as f64 / secs)
        },
    )
}
