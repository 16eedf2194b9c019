//! signet plugged into the real SPIRE (v1.15.x, built by `scripts/spire-install` into a cache outside the tree):
//! `spire-server` and `spire-agent` on 127.0.0.1 and unix sockets, with a signet appliance on SoftHSM2 behind the
//! `signet spire-plugin` shim.
//!
//! - UpstreamAuthority: the server starts, its X.509 CA chains to signet's root, an agent attests with a join token,
//!   a workload's X509-SVID from `spire-agent api fetch x509` verifies against signet's root with `openssl verify`,
//!   its JWT-SVID verifies (spiffe crate) against SPIRE's bundle and against signet's; the appliance restarts and a
//!   `signet rotate` prepares and publishes a new root, which reaches `spire-server bundle show` without restarting
//!   SPIRE, and activates it while SPIRE keeps serving.
//! - KeyManager: the same server and agent with signet keeping SPIRE's CA and JWT keys: SVIDs verify against
//!   SPIRE's bundle, and the keys SPIRE signs with are the ones on the token.
//!
//! Without Go (so without SPIRE) the tests say loudly that they are skipped; with `SIGNET_REQUIRE_SPIRE=1` (the test
//! script sets it where Go exists) a missing SPIRE fails them instead.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test fixtures and helpers outside #[test] fns: a failed fixture is a failed test"
)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use signet::config::ConfigDuration;
use spiffe::{JwtBundle, JwtBundleSet, JwtSvid};
use support::bed::*;
use support::{free_port, openssl_verify, pem_chain};

/// The SPIRE binaries, or `None` (loudly) where Go is missing. Built once per test process (the tests run in
/// parallel and would otherwise build into the same cache at once).
fn spire_bin() -> Option<PathBuf> {
    static BIN: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    BIN.get_or_init(find_spire).clone()
}

fn find_spire() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SIGNET_SPIRE_BIN_DIR") {
        return Some(PathBuf::from(d));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/spire-install");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("running scripts/spire-install");
    match out.status.code() {
        Some(0) => Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())),
        Some(3) if std::env::var("SIGNET_REQUIRE_SPIRE").as_deref() != Ok("1") => {
            eprintln!(
                "!!!!! SKIPPED: the real-SPIRE end-to-end test needs Go to build SPIRE (scripts/spire-install)."
            );
            None
        }
        Some(3) => panic!(
            "Go is missing, so SPIRE cannot be built, and SIGNET_REQUIRE_SPIRE=1 requires it"
        ),
        _ => panic!("scripts/spire-install failed ({})", out.status),
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Retries `f` every 500 ms until it gives `Some`, failing after `limit` with `what` and the logs in `logs`.
fn eventually<T>(
    limit: Duration,
    what: &str,
    logs: &[&Path],
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > limit {
            let mut msg = format!("{what}: not within {limit:?}");
            for l in logs {
                let log = std::fs::read_to_string(l).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                msg.push_str(&format!("\n--- {} (last lines):\n", l.display()));
                for line in tail.into_iter().rev() {
                    msg.push_str(line);
                    msg.push('\n');
                }
            }
            panic!("{msg}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sha256_hex(path: &Path) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        &std::fs::read(path).unwrap(),
    ))
}

fn pem_ders(text: &[u8]) -> Vec<Vec<u8>> {
    pem::parse_many(text)
        .unwrap()
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.contents().to_vec())
        .collect()
}

/// A private copy of the signet binary for SPIRE's plugin_cmd, made once per test process: SPIRE checks its
/// plugin_checksum at every start, and the copy cannot change under a running test when the build tree does.
fn plugin_binary() -> &'static Path {
    static COPY: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    &COPY
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("signet");
            std::fs::copy(env!("CARGO_BIN_EXE_signet"), &path).unwrap();
            (dir, path)
        })
        .1
}

/// The plug-in stanza of server.conf for signet.
fn plugin_stanza(kind: &str, arg: &str, data: &str) -> String {
    let signet = plugin_binary();
    format!(
        "  {kind} \"signet\" {{\n    plugin_cmd = \"{}\"\n    plugin_args = [\"spire-plugin\", \"{arg}\"]\n    \
         plugin_checksum = \"{}\"\n    plugin_data {{\n{data}    }}\n  }}\n",
        signet.display(),
        sha256_hex(signet)
    )
}

/// A SPIRE server and agent in `dir`.
struct Spire {
    bin: PathBuf,
    dir: PathBuf,
    server_sock: PathBuf,
    agent_sock: PathBuf,
    server_log: PathBuf,
    agent_log: PathBuf,
    _server: Killed,
    _agent: Option<Killed>,
}

impl Spire {
    fn conf(dir: &Path, port: u16, plugins: &str) -> String {
        format!(
            "server {{\n  bind_address = \"127.0.0.1\"\n  bind_port = \"{port}\"\n  socket_path = \"{sock}\"\n  \
             trust_domain = \"example.org\"\n  data_dir = \"{data}\"\n  log_level = \"DEBUG\"\n  log_format = \"text\"\n  ca_ttl = \"2h\"\n  \
             default_x509_svid_ttl = \"10m\"\n  default_jwt_svid_ttl = \"5m\"\n}}\n\
             plugins {{\n  DataStore \"sql\" {{\n    plugin_data {{\n      database_type = \"sqlite3\"\n      \
             connection_string = \"{data}/datastore.sqlite3\"\n    }}\n  }}\n  \
             NodeAttestor \"join_token\" {{\n    plugin_data {{}}\n  }}\n{plugins}}}\n",
            sock = dir.join("server.sock").display(),
            data = dir.join("server").display(),
        )
    }

    /// `spire-server validate` of a configuration with `plugins`.
    fn validate(bin: &Path, dir: &Path, plugins: &str) -> Output {
        let path = dir.join("validate.conf");
        std::fs::write(&path, Self::conf(dir, free_port(), plugins)).unwrap();
        run(Command::new(bin.join("spire-server"))
            .args(["validate", "-config"])
            .arg(path))
    }

    /// Starts spire-server with `plugins` (besides the sql DataStore and join_token) and waits until it is healthy.
    fn start_server(bin: &Path, dir: &Path, plugins: &str) -> Spire {
        let port = free_port();
        let server_sock = dir.join("server.sock");
        let conf = Self::conf(dir, port, plugins);
        std::fs::write(dir.join("server.conf"), &conf).unwrap();
        let v = run(Command::new(bin.join("spire-server"))
            .args(["validate", "-config"])
            .arg(dir.join("server.conf")));
        assert!(
            v.status.success(),
            "spire-server validate: {}\n{conf}",
            text(&v)
        );
        let server_log = dir.join("server.log");
        let server = Command::new(bin.join("spire-server"))
            .args(["run", "-config"])
            .arg(dir.join("server.conf"))
            .stdout(std::fs::File::create(&server_log).unwrap())
            .stderr(std::fs::File::create(dir.join("server.err")).unwrap())
            .spawn()
            .expect("starting spire-server");
        let server = Killed(server);
        let s = Spire {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            server_sock,
            agent_sock: dir.join("agent.sock"),
            agent_log: dir.join("agent.log"),
            server_log,
            _server: server,
            _agent: None,
        };
        let logs = [s.server_log.as_path(), &dir.join("server.err")];
        eventually(
            Duration::from_secs(90),
            "spire-server healthy",
            &logs,
            || s.server(&["healthcheck"]).status.success().then_some(()),
        );
        s
    }

    /// The port the server listens on (from its server.conf).
    fn port(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.conf"))
            .unwrap()
            .lines()
            .find_map(|l| l.trim().strip_prefix("bind_port = "))
            .unwrap()
            .trim_matches('"')
            .to_string()
    }

    fn server(&self, args: &[&str]) -> Output {
        run(Command::new(self.bin.join("spire-server"))
            .args(args)
            .arg("-socketPath")
            .arg(&self.server_sock))
    }

    /// `spire-server bundle show` as DER roots.
    fn bundle_roots(&self) -> Vec<Vec<u8>> {
        let o = self.server(&["bundle", "show"]);
        assert!(o.status.success(), "bundle show: {}", text(&o));
        pem_ders(&o.stdout)
    }

    /// Starts an agent attested with a join token and registers a workload for this test's uid.
    fn start_agent(&mut self) {
        self.start_agent_with(&["-spiffeID", "spiffe://example.org/workload/e2e"]);
    }

    /// Starts an agent attested with a join token and registers, for this test's uid, the entry `entry` names
    /// (`entry create` arguments besides the parent and the selector).
    fn start_agent_with(&mut self, entry: &[&str]) {
        let o = self.server(&[
            "token",
            "generate",
            "-spiffeID",
            "spiffe://example.org/agent1",
        ]);
        assert!(o.status.success(), "token generate: {}", text(&o));
        let token = String::from_utf8_lossy(&o.stdout)
            .trim()
            .trim_start_matches("Token:")
            .trim()
            .to_string();
        let bundle = self.dir.join("spire-bundle.pem");
        let o = self.server(&["bundle", "show"]);
        std::fs::write(&bundle, &o.stdout).unwrap();
        let port = self.port();
        let conf = format!(
            "agent {{\n  data_dir = \"{data}\"\n  log_level = \"DEBUG\"\n  server_address = \"127.0.0.1\"\n  \
             server_port = \"{port}\"\n  socket_path = \"{sock}\"\n  trust_bundle_path = \"{bundle}\"\n  \
             trust_domain = \"example.org\"\n}}\nplugins {{\n  NodeAttestor \"join_token\" {{\n    plugin_data {{}}\n  }}\n  \
             KeyManager \"memory\" {{\n    plugin_data {{}}\n  }}\n  WorkloadAttestor \"unix\" {{\n    plugin_data {{}}\n  }}\n}}\n",
            data = self.dir.join("agent").display(),
            sock = self.agent_sock.display(),
            bundle = bundle.display(),
        );
        std::fs::write(self.dir.join("agent.conf"), conf).unwrap();
        let agent = Command::new(self.bin.join("spire-agent"))
            .args(["run", "-config"])
            .arg(self.dir.join("agent.conf"))
            .args(["-joinToken", &token])
            .stdout(std::fs::File::create(&self.agent_log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting spire-agent");
        self._agent = Some(Killed(agent));
        use std::os::unix::fs::MetadataExt as _;
        let uid = std::fs::metadata(&self.dir).unwrap().uid();
        let selector = format!("unix:uid:{uid}");
        let mut args = vec![
            "entry",
            "create",
            "-parentID",
            "spiffe://example.org/agent1",
            "-selector",
            &selector,
        ];
        args.extend_from_slice(entry);
        let o = self.server(&args);
        assert!(o.status.success(), "entry create: {}", text(&o));
    }

    /// Starts bench agent `i` (`i >= 1`), attested with a join token, with its own data directory and socket; no
    /// workload entry of its own (the bench entries name it as parent).
    fn start_bench_agent(&self, i: usize) -> Killed {
        let id = bench_agent_id(i);
        let o = self.server(&["token", "generate", "-spiffeID", &id]);
        assert!(o.status.success(), "token generate: {}", text(&o));
        let token = String::from_utf8_lossy(&o.stdout)
            .trim()
            .trim_start_matches("Token:")
            .trim()
            .to_string();
        let bundle = self.dir.join("spire-bundle.pem");
        let o = self.server(&["bundle", "show"]);
        std::fs::write(&bundle, &o.stdout).unwrap();
        let port = std::fs::read_to_string(self.dir.join("server.conf"))
            .unwrap()
            .lines()
            .find_map(|l| l.trim().strip_prefix("bind_port = "))
            .unwrap()
            .trim_matches('"')
            .to_string();
        let conf = format!(
            "agent {{\n  data_dir = \"{data}\"\n  log_level = \"WARN\"\n  server_address = \"127.0.0.1\"\n  \
             server_port = \"{port}\"\n  socket_path = \"{sock}\"\n  trust_bundle_path = \"{bundle}\"\n  \
             trust_domain = \"example.org\"\n}}\nplugins {{\n  NodeAttestor \"join_token\" {{\n    plugin_data {{}}\n  }}\n  \
             KeyManager \"memory\" {{\n    plugin_data {{}}\n  }}\n  WorkloadAttestor \"unix\" {{\n    plugin_data {{}}\n  }}\n}}\n",
            data = self.dir.join(format!("agent-{i}")).display(),
            sock = self.dir.join(format!("agent-{i}.sock")).display(),
            bundle = bundle.display(),
        );
        let path = self.dir.join(format!("agent-{i}.conf"));
        std::fs::write(&path, conf).unwrap();
        Killed(
            Command::new(self.bin.join("spire-agent"))
                .args(["run", "-config"])
                .arg(&path)
                .args(["-joinToken", &token])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting spire-agent"),
        )
    }

    /// The workload's X509-SVID through the agent's Workload API: (chain, bundle roots).
    fn fetch_x509(&self) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let out = self.dir.join("svid");
        std::fs::create_dir_all(&out).unwrap();
        let logs = [self.agent_log.as_path(), self.server_log.as_path()];
        eventually(
            Duration::from_secs(90),
            "an X509-SVID from the agent",
            &logs,
            || {
                run(Command::new(self.bin.join("spire-agent"))
                    .args(["api", "fetch", "x509", "-socketPath"])
                    .arg(&self.agent_sock)
                    .arg("-write")
                    .arg(&out))
                .status
                .success()
                .then_some(())
            },
        );
        (
            pem_ders(&std::fs::read(out.join("svid.0.pem")).unwrap()),
            pem_ders(&std::fs::read(out.join("bundle.0.pem")).unwrap()),
        )
    }

    /// The workload's JWT-SVID for audience `e2e` through the agent's Workload API.
    fn fetch_jwt(&self) -> String {
        let logs = [self.agent_log.as_path(), self.server_log.as_path()];
        eventually(
            Duration::from_secs(60),
            "a JWT-SVID from the agent",
            &logs,
            || {
                let o = run(Command::new(self.bin.join("spire-agent"))
                    .args(["api", "fetch", "jwt", "-audience", "e2e", "-socketPath"])
                    .arg(&self.agent_sock));
                if !o.status.success() {
                    return None;
                }
                let out = String::from_utf8_lossy(&o.stdout).to_string();
                let mut lines = out.lines();
                lines.find(|l| l.starts_with("token("))?;
                lines.next().map(|t| t.trim().to_string())
            },
        )
    }

    /// SPIRE's bundle as a SPIFFE bundle document (JWKS).
    fn bundle_jwks(&self) -> String {
        let o = self.server(&["bundle", "show", "-format", "spiffe"]);
        assert!(o.status.success(), "bundle show: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    }
}

fn jwt_verifies(token: &str, jwks: &str) -> Result<(), String> {
    // The JWT authorities of the bundle (the x509-svid entries carry no kid).
    let mut doc: serde_json::Value = serde_json::from_str(jwks).map_err(|e| e.to_string())?;
    let keys: Vec<serde_json::Value> = doc["keys"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|k| k["use"] == "jwt-svid")
        .collect();
    assert!(!keys.is_empty(), "no JWT authority in {jwks}");
    doc = serde_json::json!({ "keys": keys });
    let jwks = doc.to_string();
    let mut set = JwtBundleSet::new();
    set.add_bundle(
        JwtBundle::from_jwt_authorities(spiffe::TrustDomain::new(TD).unwrap(), jwks.as_bytes())
            .map_err(|e| e.to_string())?,
    );
    let svid = JwtSvid::parse_and_validate(token, &set, &["e2e"]).map_err(|e| e.to_string())?;
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/workload/e2e"
    );
    Ok(())
}

/// The SPIRE server's credential for the appliance and plugin_data pointing at it.
async fn plugin_data(bed: &Bed, dir: &Path) -> String {
    let spire = bed.credential_for(SPIRE_A).await;
    std::fs::write(dir.join("client.pem"), &spire.chain_pem).unwrap();
    std::fs::write(dir.join("client.key"), &spire.key_pem).unwrap();
    std::fs::write(dir.join("bundle.pem"), bed.roots_pem()).unwrap();
    format!(
        "      endpoint = \"{}\"\n      server_name = \"localhost\"\n      trust_bundle_path = \"{}\"\n      \
         client_cert_path = \"{}\"\n      client_key_path = \"{}\"\n      max_backoff = \"2s\"\n",
        bed.app.addr(),
        dir.join("bundle.pem").display(),
        dir.join("client.pem").display(),
        dir.join("client.key").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_with_signet_as_upstream_authority() {
    let Some(bin) = spire_bin() else { return };
    let port = free_port();
    let Some(bed) = Bed::start_with(|c| {
        c.server.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        // A short refresh hint, so that a rotation's publish lead (3 hints) fits in the test.
        c.authority.bundle_refresh_hint = ConfigDuration(Duration::from_secs(1));
        c.authority.rotation.publish_lead = ConfigDuration(Duration::from_secs(3));
        c.authority.rotation.schedule = false;
    })
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let data = plugin_data(&bed, &d).await;
    let signet_root = pem_ders(bed.roots_pem().as_bytes());
    let plugins = format!(
        "  KeyManager \"memory\" {{\n    plugin_data {{}}\n  }}\n{}",
        plugin_stanza("UpstreamAuthority", "upstream-authority", &data)
    );
    let mut spire = tokio::task::block_in_place(|| Spire::start_server(&bin, &d, &plugins));

    // The server's bundle holds signet's root.
    let roots = spire.bundle_roots();
    assert!(
        roots.contains(&signet_root[0]),
        "spire-server bundle show lacks signet's root"
    );
    tokio::task::block_in_place(|| spire.start_agent());
    let (chain, agent_bundle) = tokio::task::block_in_place(|| spire.fetch_x509());
    assert!(chain.len() >= 2, "leaf and SPIRE's intermediate CA");
    assert!(agent_bundle.contains(&signet_root[0]));
    // SPIRE's X.509 CA chains to signet's root, and so does the workload's SVID.
    openssl_verify(&signet_root, &[], &chain[1]).expect("SPIRE's CA chains to signet's root");
    openssl_verify(&signet_root, &chain[1..], &chain[0])
        .expect("the workload X509-SVID verifies against signet's root (openssl)");

    // The JWT-SVID verifies against SPIRE's bundle and against signet's, which holds SPIRE's published JWT key.
    let token = tokio::task::block_in_place(|| spire.fetch_jwt());
    jwt_verifies(&token, &spire.bundle_jwks()).expect("JWT-SVID verifies against SPIRE's bundle");
    let signet_doc = bed.app.bundle().current().document().unwrap();
    jwt_verifies(&token, &signet_doc.jwt_authorities_jwks().unwrap())
        .expect("JWT-SVID verifies against signet's bundle (SPIRE published its key upstream)");

    // The appliance restarts; SPIRE keeps running. Then a new root reaches SPIRE's bundle without a SPIRE restart.
    let bed = bed.restart().await;
    root_rotation_reaches_spire(&bed, &spire).await;
    drop(spire);
    bed.stop().await;
}

/// The root-rotation step, through `signet rotate`'s Admin API: `prepare` + `publish` put a new root in signet's
/// bundle and it shows up in `spire-server bundle show` without restarting SPIRE; `activate` (once the publish lead
/// has passed) moves issuance to the new root while SPIRE keeps serving: a workload SVID fetched afterwards still
/// verifies against SPIRE's bundle, which holds both roots.
async fn root_rotation_reaches_spire(bed: &Bed, spire: &Spire) {
    use signet_proto::signet::v1 as spb;
    use signet_proto::signet::v1::admin_client::AdminClient;
    let mut admin = AdminClient::new(bed.channel(Some(&bed.admin())).await);
    let step = |step: &str| spb::RotateRequest {
        step: step.into(),
        kind: "x509".into(),
        label: String::new(),
    };
    let old_roots = pem_ders(bed.roots_pem().as_bytes());
    let label = admin
        .rotate(step("prepare"))
        .await
        .expect("rotate prepare")
        .into_inner()
        .label;
    admin.rotate(step("publish")).await.expect("rotate publish");
    let published = Instant::now();
    let rotation = admin
        .get_rotation(spb::GetRotationRequest {})
        .await
        .unwrap()
        .into_inner();
    let next = rotation
        .authorities
        .iter()
        .find(|a| a.label == label)
        .expect("the prepared root in GetRotation");
    assert_eq!(next.state, "published");
    let bundle = bed.app.bundle().current();
    let next_root = bundle
        .x509_roots
        .iter()
        .find(|r| !old_roots.contains(r))
        .expect("the new root in signet's bundle after publish")
        .clone();
    let logs = [spire.server_log.as_path()];
    tokio::task::block_in_place(|| {
        eventually(
            Duration::from_secs(60),
            "the new root in spire-server bundle show",
            &logs,
            || spire.bundle_roots().contains(&next_root).then_some(()),
        )
    });
    // Activate once the publish lead has passed (the test configures a short one).
    let lead = Duration::from_secs(u64::try_from(rotation.publish_lead_seconds).unwrap());
    if let Some(left) = lead.checked_sub(published.elapsed()) {
        tokio::time::sleep(left + Duration::from_millis(200)).await;
    }
    admin
        .rotate(step("activate"))
        .await
        .expect("rotate activate");
    let roots = spire.bundle_roots();
    assert!(
        roots.contains(&next_root) && old_roots.iter().all(|r| roots.contains(r)),
        "SPIRE's bundle holds the old and the new root after activate"
    );
    // The agent syncs its bundle from the server every few seconds.
    let (chain, agent_bundle) = tokio::task::block_in_place(|| {
        eventually(
            Duration::from_secs(60),
            "the new root in the agent's bundle",
            &logs,
            || {
                let (chain, bundle) = spire.fetch_x509();
                bundle.contains(&next_root).then_some((chain, bundle))
            },
        )
    });
    openssl_verify(&agent_bundle, &chain[1..], &chain[0])
        .expect("a workload SVID after activate verifies against SPIRE's bundle (openssl)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_with_signet_as_key_manager() {
    let Some(bin) = spire_bin() else { return };
    let Some(bed) = Bed::start().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    // The plug-in is given two replicas, the first of which is down: SPIRE's calls go to the second.
    let data = plugin_data(&bed, &d).await.replace(
        &format!("endpoint = \"{}\"", bed.app.addr()),
        &format!(
            "endpoints = [\"127.0.0.1:{}\", \"{}\"]",
            free_port(),
            bed.app.addr()
        ),
    );
    assert!(data.contains("endpoints = ["), "{data}");
    // A plugin_data mistake is shown by `spire-server validate`, in signet's words.
    let bad = plugin_stanza(
        "KeyManager",
        "key-manager",
        &data.replace("endpoint", "endpont"),
    );
    let v = tokio::task::block_in_place(|| Spire::validate(&bin, &d, &bad));
    assert!(!v.status.success());
    assert!(
        text(&v).contains("endpont") && text(&v).contains("plugin_data"),
        "spire-server validate names the bad field: {}",
        text(&v)
    );
    let plugins = plugin_stanza("KeyManager", "key-manager", &data);
    let mut spire = tokio::task::block_in_place(|| Spire::start_server(&bin, &d, &plugins));
    let spire_roots = spire.bundle_roots();
    assert_eq!(spire_roots.len(), 1, "SPIRE's own self-signed CA");
    tokio::task::block_in_place(|| spire.start_agent());
    let (chain, _) = tokio::task::block_in_place(|| spire.fetch_x509());
    openssl_verify(&spire_roots, &chain[1..], &chain[0])
        .expect("the workload X509-SVID verifies against SPIRE's bundle (openssl)");
    let token = tokio::task::block_in_place(|| spire.fetch_jwt());
    let jwks = spire.bundle_jwks();
    jwt_verifies(&token, &jwks).expect("JWT-SVID verifies against SPIRE's bundle");

    // The keys SPIRE signs with are on the token: its CA's key and its JWT key.
    let token_keys: Vec<(String, Vec<u8>)> = {
        let t = bed.token();
        let mut s = t.session().unwrap();
        s.list_keys()
            .unwrap()
            .into_iter()
            .filter(|k| k.label.starts_with("spire-km/"))
            .map(|k| {
                let spki = s.public_key_der(&k.label).unwrap();
                (k.label, spki)
            })
            .collect()
    };
    let (_, ca) = x509_parser::parse_x509_certificate(&spire_roots[0]).unwrap();
    let ca_spki = ca.public_key().raw.to_vec();
    assert!(
        token_keys
            .iter()
            .any(|(l, k)| l.contains("/x509-CA-") && *k == ca_spki),
        "SPIRE's CA key is a token key: {:?}",
        token_keys.iter().map(|(l, _)| l).collect::<Vec<_>>()
    );
    let doc = signet::spiffe::BundleDocument::parse(jwks.as_bytes()).unwrap();
    let jwt_spkis: Vec<&[u8]> = doc.jwt_authorities.iter().map(|a| a.spki_der()).collect();
    assert!(
        token_keys
            .iter()
            .any(|(l, k)| l.contains("/JWT-Signer-") && jwt_spkis.contains(&k.as_slice())),
        "SPIRE's JWT key is a token key"
    );
    drop(spire);
    bed.stop().await;
}

/// The downstream SPIRE server's SPIFFE ID (registered with `-downstream` on the upstream SPIRE server).
const DOWNSTREAM: &str = "spiffe://example.org/downstream/spire-b";

/// Nested SPIRE below signet, and what a credential from a SPIRE agent's Workload API may do on signet.
///
/// signet <- upstream spire-server (signet's UpstreamAuthority plug-in; its rule sets `spire_ca_path_len = 1`) with
/// an agent <- downstream spire-server (SPIRE's built-in `spire` UpstreamAuthority: the upstream server's address and
/// its agent's Workload API socket, through a `-downstream` entry) with its own agent. A workload's X509-SVID from the
/// downstream agent (root -> upstream SPIRE CA, pathLen 1, minted by signet -> downstream SPIRE CA -> leaf) verifies
/// with `openssl verify -x509_strict` against signet's root alone, and the `spiffe` crate's Workload API client gets
/// the same SVID and a bundle that is signet's root.
///
/// The downstream server's signet KeyManager plug-in with `workload_api_socket` takes its X509-SVID from the upstream
/// agent, as SPIRE's `spire` UpstreamAuthority does: SPIRE's CA signed it, so signet refuses it for the KeyManager
/// (PERMISSION_DENIED naming that CA; audited) even though the caller's rule opts in to downstream credentials,
/// which admit the Issuer alone: the same credential mints an X509-SVID through the Issuer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_spire_below_signet() {
    let Some(bin) = spire_bin() else { return };
    let Some(bed) = Bed::start_with(|c| {
        let a = c.policy.iter_mut().find(|r| r.caller == SPIRE_A).unwrap();
        a.spire_ca_path_len = Some(1);
        c.policy.push(signet::config::PolicyRule {
            caller: DOWNSTREAM.into(),
            may: vec!["issuer".into()],
            ids: vec!["spiffe://example.org/workloads/".into()],
            max_ttl: Some(ConfigDuration(Duration::from_secs(3600))),
            jwt_max_ttl: None,
            rate: None,
            burst: None,
            downstream_credentials: true,
            spire_ca_path_len: None,
        });
    })
    .await
    else {
        return;
    };
    let signet_root = pem_ders(bed.roots_pem().as_bytes());
    let up_dir = tempfile::tempdir().unwrap();
    let u = up_dir.path().to_path_buf();
    let data = plugin_data(&bed, &u).await;
    let plugins = format!(
        "  KeyManager \"memory\" {{\n    plugin_data {{}}\n  }}\n{}",
        plugin_stanza("UpstreamAuthority", "upstream-authority", &data)
    );
    let mut up = tokio::task::block_in_place(|| Spire::start_server(&bin, &u, &plugins));
    tokio::task::block_in_place(|| up.start_agent_with(&["-spiffeID", DOWNSTREAM, "-downstream"]));
    // The upstream agent serves the downstream server's X509-SVID (once it synced the entry).
    let socket = format!("unix://{}", up.agent_sock.display());
    let logs = [up.agent_log.as_path(), up.server_log.as_path()];
    tokio::task::block_in_place(|| {
        eventually(
            Duration::from_secs(60),
            "the downstream server's SVID from the upstream agent",
            &logs,
            || {
                let o = run(Command::new(bin.join("spire-agent"))
                    .args(["api", "fetch", "x509", "-socketPath"])
                    .arg(&up.agent_sock));
                (o.status.success() && text(&o).contains(DOWNSTREAM)).then_some(())
            },
        )
    });
    let source = spiffe::X509Source::builder()
        .endpoint(&socket)
        .build()
        .await
        .expect("the spiffe crate's Workload API client reaches the upstream agent");
    let svid = source.svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), DOWNSTREAM);
    let downstream_cred = Credential {
        chain_pem: pem_chain(
            &svid
                .cert_chain()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect::<Vec<_>>(),
        ),
        key_pem: pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            svid.private_key().as_bytes().to_vec(),
        )),
    };
    // The upstream SPIRE server's CA, which signed that SVID, was minted by signet with the rule's pathLen.
    let up_ca = svid.cert_chain()[1].as_bytes().to_vec();
    openssl_verify(&signet_root, &[], &up_ca)
        .expect("the upstream SPIRE CA chains to signet's root");
    let (_, parsed) = x509_parser::parse_x509_certificate(&up_ca).unwrap();
    assert_eq!(
        parsed
            .basic_constraints()
            .unwrap()
            .unwrap()
            .value
            .path_len_constraint,
        Some(1)
    );
    drop(source);

    let down_dir = tempfile::tempdir().unwrap();
    let d = down_dir.path().to_path_buf();
    let spire_ua = format!(
        "  UpstreamAuthority \"spire\" {{\n    plugin_data {{\n      server_address = \"127.0.0.1\"\n      \
         server_port = \"{}\"\n      workload_api_socket = \"{}\"\n    }}\n  }}\n",
        up.port(),
        up.agent_sock.display()
    );

    // First run: signet's KeyManager plug-in with its credential from the upstream agent's Workload API.
    let km = plugin_stanza(
        "KeyManager",
        "key-manager",
        &format!(
            "      endpoint = \"{}\"\n      workload_api_socket = \"{socket}\"\n      max_backoff = \"2s\"\n",
            bed.app.addr()
        ),
    );
    let conf = Spire::conf(&d, free_port(), &format!("{km}{spire_ua}"));
    std::fs::write(d.join("server.conf"), &conf).unwrap();
    let refused_run = Killed(
        Command::new(bin.join("spire-server"))
            .args(["run", "-config"])
            .arg(d.join("server.conf"))
            .stdout(std::fs::File::create(d.join("refused.log")).unwrap())
            .stderr(std::fs::File::create(d.join("refused.err")).unwrap())
            .spawn()
            .expect("starting spire-server"),
    );
    let refused_logs = [d.join("refused.log"), d.join("refused.err")];
    let line = tokio::task::block_in_place(|| {
        eventually(
            Duration::from_secs(60),
            "signet refusing the KeyManager plug-in's Workload API credential",
            &[refused_logs[0].as_path(), refused_logs[1].as_path()],
            || {
                bed.audit()
                    .into_iter()
                    .find(|l| l["caller"] == DOWNSTREAM && l["outcome"] == "refused")
            },
        )
    });
    assert_eq!(line["code"], "PERMISSION_DENIED", "{line}");
    let reason = line["reason"].as_str().unwrap();
    assert!(
        reason.contains("a CA below signet") && reason.contains("key-manager"),
        "{reason}"
    );
    // SPIRE says why, in signet's words.
    tokio::task::block_in_place(|| {
        eventually(
            Duration::from_secs(30),
            "spire-server reporting the refusal",
            &[refused_logs[0].as_path(), refused_logs[1].as_path()],
            || {
                let log = refused_logs
                    .iter()
                    .map(|p| std::fs::read_to_string(p).unwrap_or_default())
                    .collect::<String>();
                (log.contains("PermissionDenied") && log.contains("a CA below signet"))
                    .then_some(())
            },
        )
    });
    drop(refused_run);
    assert!(
        !bed.audit()
            .iter()
            .any(|l| l["caller"] == DOWNSTREAM && l["outcome"] != "refused"),
        "nothing done on signet for the downstream credential through the KeyManager"
    );
    // The same credential, which the rule admits for the Issuer alone, mints there.
    let mut issuer = signet_proto::signet::v1::issuer_client::IssuerClient::new(
        bed.channel(Some(&downstream_cred)).await,
    );
    let (csr, _) = csr_for("spiffe://example.org/workloads/from-downstream");
    expect_svid(mint_one(&mut issuer, csr, 600).await);

    // Second run: the downstream server with SPIRE's memory KeyManager, and an agent of its own.
    let _ = std::fs::remove_dir_all(d.join("server"));
    let plugins = format!("  KeyManager \"memory\" {{\n    plugin_data {{}}\n  }}\n{spire_ua}");
    let mut down = tokio::task::block_in_place(|| Spire::start_server(&bin, &d, &plugins));
    assert_eq!(
        down.bundle_roots(),
        signet_root,
        "the downstream server's bundle is signet's root"
    );
    tokio::task::block_in_place(|| down.start_agent());
    let (chain, agent_bundle) = tokio::task::block_in_place(|| down.fetch_x509());
    assert_eq!(agent_bundle, signet_root);
    assert_eq!(
        chain.len(),
        3,
        "leaf, downstream SPIRE CA, upstream SPIRE CA"
    );
    assert_eq!(chain[2], up_ca, "the upstream SPIRE CA signet minted");
    openssl_verify(&signet_root, &chain[1..], &chain[0])
        .expect("the downstream workload's X509-SVID verifies against signet's root alone");

    // The spiffe crate's Workload API client at the downstream agent: the same chain, and signet's root as bundle.
    let source = spiffe::X509Source::builder()
        .endpoint(format!("unix://{}", down.agent_sock.display()))
        .build()
        .await
        .expect("the spiffe crate's Workload API client reaches the downstream agent");
    let svid = source.svid().unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/workload/e2e"
    );
    let fetched: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(fetched.len(), 3);
    let bundle: Vec<Vec<u8>> = source
        .bundle_set()
        .unwrap()
        .get(&spiffe::TrustDomain::new(TD).unwrap())
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    assert_eq!(bundle, signet_root);
    openssl_verify(&bundle, &fetched[1..], &fetched[0])
        .expect("the spiffe crate's SVID verifies against its bundle, signet's root");
    drop(source);
    drop(down);
    drop(up);
    bed.stop().await;
}

/// Entries for `spire-server entry create -data`: `n` workloads spread over `agents` bench agents
/// (`spiffe://example.org/agent1`, `.../bench-agent-<i>`), all for this uid.
fn entries_json(n: usize, agents: usize, uid: u32) -> String {
    let entries: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "spiffe_id": format!("spiffe://example.org/bench/w{i}"),
                "parent_id": bench_agent_id(i % agents.max(1)),
                "selectors": [{ "type": "unix", "value": format!("uid:{uid}") }],
            })
        })
        .collect();
    serde_json::json!({ "entries": entries }).to_string()
}

/// Timestamps (Unix seconds) of SPIRE's "Signed X509 SVID" lines for the bench workloads, from its log.
fn signing_times(logs: &[PathBuf]) -> Vec<f64> {
    let mut out = Vec::new();
    for l in logs {
        for line in std::fs::read_to_string(l).unwrap_or_default().lines() {
            if !(line.contains("Signed X509 SVID") && line.contains("spiffe://example.org/bench/"))
            {
                continue;
            }
            let Some(ts) = line
                .split("time=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
            else {
                continue;
            };
            if let Ok(t) =
                time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
            {
                out.push(t.unix_timestamp_nanos() as f64 / 1e9);
            }
        }
    }
    out.sort_by(f64::total_cmp);
    out
}

/// The SPIFFE ID of bench agent `i` (the first is the test agent of [`Spire::start_agent`]).
fn bench_agent_id(i: usize) -> String {
    if i == 0 {
        "spiffe://example.org/agent1".into()
    } else {
        format!("spiffe://example.org/bench-agent-{i}")
    }
}

/// SPIRE with `plugins` issues X509-SVIDs for `n` registered workloads spread over `agents` agents started at once
/// (each sends its share as one batch of CSRs, and SPIRE serves the agents concurrently); the rate is measured
/// between SPIRE's first and last "Signed X509 SVID" log lines (with several agents, between the 5th and the 95th
/// percentile of those lines, so that the agents' staggered attestation does not count).
fn svid_rate(bin: &Path, plugins: &str, n: usize, agents: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let mut spire = Spire::start_server(bin, dir.path(), plugins);
    use std::os::unix::fs::MetadataExt as _;
    let uid = std::fs::metadata(dir.path()).unwrap().uid();
    let data = dir.path().join("entries.json");
    std::fs::write(&data, entries_json(n, agents, uid)).unwrap();
    let o = spire.server(&["entry", "create", "-data", data.to_str().unwrap()]);
    assert!(o.status.success(), "entry create: {}", text(&o));
    let extra: Vec<Killed> = (1..agents).map(|i| spire.start_bench_agent(i)).collect();
    spire.start_agent();
    let logs = vec![spire.server_log.clone(), dir.path().join("server.err")];
    let times = eventually(
        Duration::from_secs(180),
        "SPIRE signing every bench SVID",
        &[&logs[0], &logs[1]],
        || {
            let t = signing_times(&logs);
            (t.len() >= n).then_some(t)
        },
    );
    drop(extra);
    let (a, b) = if agents > 1 {
        (times.len() / 20, times.len() - 1 - times.len() / 20)
    } else {
        (0, times.len() - 1)
    };
    (b - a) as f64 / (times[b] - times[a]).max(1e-9)
}

/// A `signet serve` process on hsm-sim with `latency_ms` per signature, and plugin_data for SPIRE to reach it.
struct SimAppliance {
    _child: Killed,
    _dir: tempfile::TempDir,
    plugin_data: String,
}

fn sim_appliance(latency_ms: u32, sessions: u32) -> SimAppliance {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let module = signet_pkcs11::testing::hsm_sim_module().expect("the hsm-sim module is built");
    let signet = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_signet"));
        c.args(args)
            .env("HSM_SIM_DIR", d.join("sim"))
            .env("HSM_SIM_LATENCY_MS", latency_ms.to_string())
            .env("SIGNET_PKCS11_MODULE", &module)
            .env("SIGNET_SO_PIN", "87654321")
            .env("SIGNET_PIN", "1234")
            .env_remove("SIGNET_CONFIG")
            .env_remove("SIGNET_DATA_DIR");
        c
    };
    std::fs::create_dir_all(d.join("sim")).unwrap();
    let o = run(&mut signet(&["token", "init", "--label", "signet"]));
    assert!(o.status.success(), "token init: {}", text(&o));
    let port = free_port();
    let cfg = format!(
        "trust_domain = \"example.org\"\ndata_dir = \"{data}\"\n[server]\nlisten = \"127.0.0.1:{port}\"\n\
         [[tokens]]\nname = \"sim\"\nmodule = \"{module}\"\ntoken = \"signet\"\npin = {{ env = \"SIGNET_PIN\" }}\n\
         sessions = {sessions}\n\
         [[policy]]\ncaller = \"{ADMIN}\"\nmay = [\"issuer\", \"admin\"]\nids = [\"spiffe://example.org/\"]\n\
         max_ttl = \"24h\"\n\
         [[policy]]\ncaller = \"{SPIRE_A}\"\nmay = [\"key-manager\"]\n",
        data = d.join("data").display(),
        module = module.display(),
    );
    std::fs::write(d.join("signet.toml"), cfg).unwrap();
    let mut child = signet(&[
        "serve",
        "--config",
        d.join("signet.toml").to_str().unwrap(),
        "--metrics",
        "",
    ])
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(d.join("serve.log")).unwrap())
    .spawn()
    .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let child = Killed(child);
    loop {
        use std::io::BufRead as _;
        let mut line = String::new();
        let n = out.read_line(&mut line).unwrap();
        assert!(
            n > 0,
            "signet serve exited: {}",
            std::fs::read_to_string(d.join("serve.log")).unwrap_or_default()
        );
        if line.starts_with("Stop with") {
            break;
        }
    }
    let cred = d.join("cred");
    let o = run(&mut signet(&[
        "mint",
        "x509-svid",
        "--data-dir",
        d.join("data").to_str().unwrap(),
        "--spiffe-id",
        SPIRE_A,
        "--ttl",
        "2h",
        "--out",
        cred.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "mint: {}", text(&o));
    let plugin_data = format!(
        "      endpoint = \"127.0.0.1:{port}\"\n      server_name = \"localhost\"\n      trust_bundle_path = \"{}\"\n      \
         client_cert_path = \"{}\"\n      client_key_path = \"{}\"\n",
        cred.join("bundle.pem").display(),
        cred.join("svid.pem").display(),
        cred.join("svid.key").display()
    );
    SimAppliance {
        _child: child,
        _dir: dir,
        plugin_data,
    }
}

/// A `signet spire-plugin --embedded` configuration on a fresh SoftHSM2 token (2 sessions) in `dir`: the admin
/// credential of its data directory may use the KeyManager.
fn embedded_softhsm_config(dir: &Path) -> (signet_pkcs11::testing::SoftHsm, PathBuf) {
    let hsm = signet_pkcs11::testing::SoftHsm::new().expect("SoftHSM2");
    let pin = dir.join("pin");
    std::fs::write(&pin, signet_pkcs11::testing::USER_PIN).unwrap();
    let path = dir.join("signet.toml");
    std::fs::write(
        &path,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{data}\"\n\n[[tokens]]\nname = \"softhsm\"\n\
             module = \"{module}\"\ntoken = \"{label}\"\npin = {{ file = \"{pin}\" }}\nsessions = 2\n\n\
             [[policy]]\ncaller = \"{ADMIN}\"\nmay = [\"key-manager\"]\n",
            data = dir.join("data").display(),
            module = hsm.module().display(),
            label = hsm.label(),
            pin = pin.display(),
        ),
    )
    .unwrap();
    (hsm, path)
}

/// The plug-in stanza of an embedded appliance from the configuration `config`.
fn embedded_stanza(kind: &str, arg: &str, config: &Path) -> String {
    let signet = plugin_binary();
    format!(
        "  {kind} \"signet\" {{\n    plugin_cmd = \"{}\"\n    plugin_args = [\"spire-plugin\", \"{arg}\", \"--embedded\", \"{}\"]\n    \
         plugin_checksum = \"{}\"\n    plugin_data {{}}\n  }}\n",
        signet.display(),
        config.display(),
        sha256_hex(signet)
    )
}

/// C_Sign calls a second on hsm-sim at `latency_ms` with `concurrency` sessions signing back to back (the token's
/// bare rate at that concurrency: what signet and SPIRE can at best reach with as many requests in flight).
fn hsm_sim_bare_rate(latency_ms: u32, concurrency: usize) -> f64 {
    // SAFETY: the measurement runs alone in its process and loads hsm-sim here for the first time (the module
    // reads its latency at C_Initialize); no other thread reads the environment meanwhile.
    #[allow(
        unsafe_code,
        clippy::disallowed_methods,
        reason = "hsm-sim reads its latency from the environment when it loads, before any other thread runs"
    )]
    unsafe {
        std::env::set_var("HSM_SIM_LATENCY_MS", latency_ms.to_string());
    }
    let sim = signet_pkcs11::testing::HsmSim::new();
    let token = sim.open();
    token
        .session()
        .unwrap()
        .generate_key("bare", signet_pkcs11::KeyType::EcP256, Default::default())
        .unwrap();
    let per = 100usize.max(2000 / concurrency.max(1));
    let started = Instant::now();
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let token = token.clone();
            std::thread::spawn(move || {
                let mut s = token.session().unwrap();
                let key = s.find_key("bare").unwrap();
                for _ in 0..per {
                    s.sign_digest(&key, signet_pkcs11::SignAlgorithm::EcdsaSha256, &[7u8; 32])
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    (per * concurrency) as f64 / started.elapsed().as_secs_f64()
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// X509-SVIDs per second SPIRE issues to its agents, side by side in one run: SPIRE alone (its built-in `memory`
/// KeyManager), SPIRE with signet as its KeyManager on SoftHSM2 over the network and with `--embedded`, SPIRE with
/// signet as its UpstreamAuthority (the key in memory, SPIRE's CA signed by signet), and signet's KeyManager on
/// hsm-sim at 5 ms a signature with 32 sessions. Knobs: `SIGNET_SPIRE_BENCH_SVIDS` (400), `SIGNET_SPIRE_BENCH_AGENTS`
/// (1; agents started at once, SPIRE serves them concurrently), `SIGNET_SPIRE_BENCH_ROUNDS` (1; medians of the
/// rounds), `SIGNET_SPIRE_BENCH_ONLY` (comma-separated subset of `memory,network,embedded,upstream,sim`). Run:
/// `cargo test --release -p signet --test spire_e2e spire_svid_rate -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture, in release"]
async fn spire_svid_rate() {
    let Some(bin) = spire_bin() else { return };
    let knob = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let n = knob("SIGNET_SPIRE_BENCH_SVIDS", 400);
    let agents = knob("SIGNET_SPIRE_BENCH_AGENTS", 1).max(1);
    let rounds = knob("SIGNET_SPIRE_BENCH_ROUNDS", 1).max(1);
    let only = std::env::var("SIGNET_SPIRE_BENCH_ONLY").unwrap_or_default();
    let wanted = |what: &str| only.is_empty() || only.split(',').any(|w| w.trim() == what);
    let mut results: Vec<(&str, Vec<f64>)> = Vec::new();
    let mut push = |name: &'static str, v: f64| match results.iter_mut().find(|(n, _)| *n == name) {
        Some((_, all)) => all.push(v),
        None => results.push((name, vec![v])),
    };
    for _ in 0..rounds {
        if wanted("memory") {
            let r = tokio::task::block_in_place(|| {
                svid_rate(
                    &bin,
                    "  KeyManager \"memory\" {\n    plugin_data {}\n  }\n",
                    n,
                    agents,
                )
            });
            push("KeyManager memory (SPIRE alone)", r);
        }
        if wanted("network") {
            let Some(bed) = Bed::start_with(|c| c.tokens[0].sessions = 2).await else {
                return;
            };
            let dir = tempfile::tempdir().unwrap();
            let data = plugin_data(&bed, dir.path()).await;
            let plugins = plugin_stanza("KeyManager", "key-manager", &data);
            let r = tokio::task::block_in_place(|| svid_rate(&bin, &plugins, n, agents));
            bed.stop().await;
            push("KeyManager signet, SoftHSM2, network", r);
        }
        if wanted("embedded") {
            let dir = tempfile::tempdir().unwrap();
            let (_hsm, config) = embedded_softhsm_config(dir.path());
            let plugins = embedded_stanza("KeyManager", "key-manager", &config);
            let r = tokio::task::block_in_place(|| svid_rate(&bin, &plugins, n, agents));
            push("KeyManager signet, SoftHSM2, --embedded", r);
        }
        if wanted("upstream") {
            let Some(bed) = Bed::start().await else {
                return;
            };
            let dir = tempfile::tempdir().unwrap();
            let data = plugin_data(&bed, dir.path()).await;
            let plugins = format!(
                "  KeyManager \"memory\" {{\n    plugin_data {{}}\n  }}\n{}",
                plugin_stanza("UpstreamAuthority", "upstream-authority", &data)
            );
            let r = tokio::task::block_in_place(|| svid_rate(&bin, &plugins, n, agents));
            bed.stop().await;
            push("UpstreamAuthority signet (key in memory)", r);
        }
        if wanted("sim") {
            let r = tokio::task::block_in_place(|| {
                let app = sim_appliance(5, 32);
                svid_rate(
                    &bin,
                    &plugin_stanza("KeyManager", "key-manager", &app.plugin_data),
                    n,
                    agents,
                )
            });
            push("KeyManager signet, hsm-sim 5 ms, 32 sessions", r);
        }
    }
    let bare = wanted("sim").then(|| tokio::task::block_in_place(|| hsm_sim_bare_rate(5, agents)));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "SPIRE v1.15.3, {agents} agent(s), {n} X509-SVIDs, {rounds} round(s), medians (load average: {})",
        load.trim()
    );
    let memory = results
        .iter()
        .find(|(n, _)| n.starts_with("KeyManager memory"))
        .map(|(_, v)| median_of(v.clone()));
    for (name, all) in &results {
        let m = median_of(all.clone());
        let ratio = memory.map_or(String::new(), |mem| format!("{:.2} of memory", m / mem));
        let runs: Vec<String> = all.iter().map(|v| format!("{v:.0}")).collect();
        println!(
            "  {name:48} {m:8.0} SVIDs/s  {ratio:16} runs: {}",
            runs.join(" ")
        );
        assert!(m > 0.0);
    }
    if let Some(bare) = bare {
        let sim = results
            .iter()
            .find(|(n, _)| n.contains("hsm-sim"))
            .map(|(_, v)| median_of(v.clone()))
            .unwrap_or(0.0);
        println!(
            "  hsm-sim 5 ms, C_Sign alone on {agents} session(s) at once: {bare:.0}/s; signet + SPIRE: {:.2} of it",
            sim / bare
        );
    }
}

/// The serial number of the first certificate in the PEM file `path`, if it holds one.
fn first_serial(path: &Path) -> Option<Vec<u8>> {
    let text = std::fs::read(path).ok()?;
    let der = pem_ders(&text).into_iter().next()?;
    let (_, c) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(c.raw_serial().to_vec())
}

/// SPIRE as it would be set up from the README: signet running, join tokens created, the stanzas pasted. The
/// plug-ins (signet as UpstreamAuthority and as KeyManager) get their first credentials for join tokens (no key file
/// copied), check the appliance by its SPIFFE ID at `127.0.0.1:<port>`, and renew their credentials (20 s) three
/// times each while SPIRE keeps signing through signet, with no restart. Every round is followed by an X509-SVID that
/// `spire-server x509 mint` signs with its CA key on signet's token, under a CA that chains to signet's root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_joins_with_a_token_and_renews_its_credential() {
    use signet_proto::signet::v1 as spb;
    use signet_proto::signet::v1::admin_client::AdminClient;
    let Some(bin) = spire_bin() else { return };
    let Some(bed) = Bed::start_with(|c| {
        c.server.bootstrap_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await
    else {
        panic!("the SoftHSM2 test bed is required");
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::write(d.join("bundle.pem"), bed.roots_pem()).unwrap();
    let mut admin = AdminClient::new(bed.channel(Some(&bed.admin())).await);
    let mut stanzas = String::new();
    let mut files = Vec::new();
    for (kind, arg) in [
        ("UpstreamAuthority", "upstream-authority"),
        ("KeyManager", "key-manager"),
    ] {
        let token = admin
            .create_join_token(spb::CreateJoinTokenRequest {
                spiffe_id: SPIRE_A.into(),
                ttl_seconds: 600,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!token.bootstrap_address.is_empty());
        let (cert, key) = (d.join(format!("{arg}.pem")), d.join(format!("{arg}.key")));
        let data = format!(
            "      endpoint = \"{}\"\n      trust_bundle_path = \"{}\"\n      client_cert_path = \"{}\"\n      \
             client_key_path = \"{}\"\n      spiffe_id = \"{SPIRE_A}\"\n      join_token = \"{}\"\n      \
             bootstrap_endpoint = \"{}\"\n      svid_ttl = \"20s\"\n      max_backoff = \"2s\"\n",
            bed.app.addr(),
            d.join("bundle.pem").display(),
            cert.display(),
            key.display(),
            token.token,
            token.bootstrap_address,
        );
        stanzas.push_str(&plugin_stanza(kind, arg, &data));
        files.push((cert, key));
    }
    let mut spire = tokio::task::block_in_place(|| Spire::start_server(&bin, &d, &stanzas));
    let signet_root = pem_ders(bed.roots_pem().as_bytes());
    assert!(
        spire.bundle_roots().contains(&signet_root[0]),
        "spire-server bundle show lacks signet's root"
    );
    tokio::task::block_in_place(|| spire.start_agent());
    let (chain, _) = tokio::task::block_in_place(|| spire.fetch_x509());
    openssl_verify(&signet_root, &chain[1..], &chain[0])
        .expect("the workload X509-SVID verifies against signet's root (openssl)");
    // Each token was exchanged once, for exactly SPIRE's ID.
    let exchanged: Vec<serde_json::Value> = bed
        .audit()
        .into_iter()
        .filter(|l| l["method"] == "ExchangeJoinToken" && l["outcome"] == "issued")
        .collect();
    assert_eq!(exchanged.len(), 2, "{exchanged:?}");
    assert!(exchanged.iter().all(|l| l["spiffe_id"] == SPIRE_A));

    let logs = [spire.server_log.clone(), d.join("server.err")];
    let log_refs: Vec<&Path> = logs.iter().map(PathBuf::as_path).collect();
    let mut serials: Vec<Vec<u8>> = files
        .iter()
        .map(|(cert, _)| {
            first_serial(cert).expect("the plug-in keeps its credential in client_cert_path")
        })
        .collect();
    for round in 1..=3 {
        for (i, (cert, _)) in files.iter().enumerate() {
            let before = serials[i].clone();
            serials[i] = tokio::task::block_in_place(|| {
                eventually(
                    Duration::from_secs(120),
                    &format!("renewal {round} of {}", cert.display()),
                    &log_refs,
                    || first_serial(cert).filter(|s| *s != before),
                )
            });
        }
        // SPIRE keeps signing with its CA key on signet's token, through the renewed credentials, under a CA
        // signet's root signed.
        let used_before = audit_lines(&bed.audit(), SPIRE_A, "SignData").len();
        let out = d.join(format!("minted-{round}"));
        std::fs::create_dir_all(&out).unwrap();
        let o = spire.server(&[
            "x509",
            "mint",
            "-spiffeID",
            &format!("spiffe://example.org/minted/{round}"),
            "-write",
            out.to_str().unwrap(),
        ]);
        assert!(
            o.status.success(),
            "x509 mint after round {round}: {}",
            text(&o)
        );
        let svid = pem_ders(&std::fs::read(out.join("svid.pem")).unwrap());
        openssl_verify(&signet_root, &svid[1..], &svid[0])
            .unwrap_or_else(|e| panic!("minted SVID after round {round}: {e}"));
        assert!(
            audit_lines(&bed.audit(), SPIRE_A, "SignData").len() > used_before,
            "SPIRE signed through signet after round {round}"
        );
    }
    // Every renewal is audited as signet's, and the key files stayed private.
    let renewed = bed
        .audit()
        .into_iter()
        .filter(|l| {
            l["caller"] == SPIRE_A && l["method"] == "RenewX509SVID" && l["outcome"] == "issued"
        })
        .count();
    assert!(renewed >= 6, "{renewed} renewals audited");
    use std::os::unix::fs::PermissionsExt as _;
    for (_, key) in &files {
        assert_eq!(
            std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    drop(spire);
    bed.stop().await;
}

/// The README's "SPIRE in three commands", as processes and word for word: `signet serve` on the embedded default in
/// an empty directory, `signet spire config --upstream-authority` beside it, its stdout pasted into server.conf's
/// plugins block, then spire-server and an agent. The workload's X509-SVID chains to signet's root. The only
/// difference from the README is the environment moving signet's gRPC and metrics ports to free ones
/// (`SIGNET_LISTEN`, `SIGNET_METRICS`, which the README names for that), so the test never meets a taken port.
#[test]
fn spire_from_the_readme_in_three_commands() {
    const SERVE: &str = "signet serve";
    const CONFIG: &str = "signet spire config --upstream-authority";
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    assert!(
        readme.lines().any(|l| l.starts_with(&format!("{SERVE} ")))
            && readme
                .lines()
                .any(|l| l.starts_with(&format!("{CONFIG} >> stanza.conf"))),
        "the README's SPIRE quick start runs `{SERVE}` and `{CONFIG} >> stanza.conf`"
    );
    // Skipped loudly without Go; with SIGNET_REQUIRE_SPIRE=1 a missing SPIRE fails here.
    let Some(bin) = spire_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().join("signet");
    let spire_dir = dir.path().join("spire");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::create_dir_all(&spire_dir).unwrap();
    let signet = |line: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_signet"));
        c.args(line.split_whitespace().skip(1))
            .current_dir(&cwd)
            .env("SIGNET_LISTEN", "127.0.0.1:0")
            .env("SIGNET_METRICS", "127.0.0.1:0")
            .env_remove("SIGNET_CONFIG")
            .env_remove("SIGNET_DATA_DIR")
            .env_remove("SIGNET_ADDR")
            .env_remove("SIGNET_BOOTSTRAP_LISTEN")
            .env_remove("SOFTHSM2_CONF");
        c
    };

    // 1. signet serve: its banner names the SPIRE server's rule and the bootstrap port.
    let serve_log = dir.path().join("serve.log");
    let mut child = signet(SERVE)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&serve_log).unwrap())
        .spawn()
        .expect("starting signet serve");
    let out = child.stdout.take().unwrap();
    let _serve = Killed(child);
    let mut banner = String::new();
    {
        use std::io::BufRead as _;
        let mut out = std::io::BufReader::new(out);
        loop {
            let mut line = String::new();
            let n = out.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "signet serve exited before serving: {banner}\n--- its log:\n{}",
                std::fs::read_to_string(&serve_log).unwrap_or_default()
            );
            banner.push_str(&line);
            if line.starts_with("Stop with") {
                break;
            }
        }
    }
    assert!(
        banner.contains(
            "policy          spiffe://example.org/spire/server may upstream-authority, key-manager"
        ),
        "{banner}"
    );
    assert!(banner.contains("  bootstrap       127.0.0.1:"), "{banner}");

    // 2. signet spire config --upstream-authority: stdout is the stanza, nothing else.
    let o = run(&mut signet(CONFIG));
    assert!(o.status.success(), "{CONFIG}: {}", text(&o));
    let stanza = String::from_utf8(o.stdout).unwrap();
    assert!(
        stanza.starts_with("UpstreamAuthority \"signet\" {\n") && stanza.ends_with("}\n"),
        "{stanza}"
    );
    let data = std::fs::canonicalize(cwd.join("signet-data")).unwrap();
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_signet")).unwrap();
    for want in [
        format!("plugin_cmd      = \"{}\"", exe.display()),
        "plugin_args     = [\"spire-plugin\", \"upstream-authority\"]".to_string(),
        format!("plugin_checksum = \"{}\"", sha256_hex(&exe)),
        format!(
            "endpoint           = \"{}\"",
            std::fs::read_to_string(data.join("endpoint"))
                .unwrap()
                .trim()
        ),
        format!(
            "trust_bundle_path  = \"{}\"",
            data.join("bundle.pem").display()
        ),
        format!(
            "client_cert_path   = \"{}\"",
            data.join("spire-client/upstream-authority.pem").display()
        ),
        "spiffe_id          = \"spiffe://example.org/spire/server\"".to_string(),
        "bootstrap_endpoint = \"127.0.0.1:".to_string(),
    ] {
        assert!(stanza.contains(&want), "{want} in:\n{stanza}");
    }

    // 3. The stanza in server.conf's plugins block (beside the KeyManager every server.conf has), spire-server.
    let plugins = format!("  KeyManager \"memory\" {{\n    plugin_data {{}}\n  }}\n{stanza}");
    let mut spire = Spire::start_server(&bin, &spire_dir, &plugins);
    let signet_root = pem_ders(&std::fs::read(data.join("bundle.pem")).unwrap());
    assert!(
        spire.bundle_roots().contains(&signet_root[0]),
        "spire-server bundle show lacks signet's root"
    );
    spire.start_agent();
    let (chain, _) = spire.fetch_x509();
    assert!(chain.len() >= 2, "leaf and SPIRE's intermediate CA");
    openssl_verify(&signet_root, &chain[1..], &chain[0])
        .expect("the workload X509-SVID verifies against signet's root (openssl)");
    // The plug-in keeps the credential it got for the token where the stanza says.
    assert!(
        first_serial(&data.join("spire-client/upstream-authority.pem")).is_some(),
        "the plug-in's credential in signet-data/spire-client/"
    );
    drop(spire);
}

/// `spire-server x509 mint` on `spire`: an X509-SVID signed by SPIRE's CA (whose key is signet's KeyManager key),
/// checked with openssl against SPIRE's bundle.
fn mint_and_verify(spire: &Spire, what: &str) {
    let out = spire.dir.join(format!("mint-{what}"));
    std::fs::create_dir_all(&out).unwrap();
    let o = spire.server(&[
        "x509",
        "mint",
        "-spiffeID",
        "spiffe://example.org/minted",
        "-write",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{what}: x509 mint: {}", text(&o));
    let chain = pem_ders(&std::fs::read(out.join("svid.pem")).unwrap());
    let roots = pem_ders(&std::fs::read(out.join("bundle.pem")).unwrap());
    openssl_verify(&roots, &chain[1..], &chain[0])
        .unwrap_or_else(|e| panic!("{what}: the minted X509-SVID does not verify: {e}"));
}

/// The KeyManager labels on the token, by namespace.
fn km_labels_in(bed: &Bed, ns: &str) -> Vec<String> {
    let prefix = format!("spire-km/{ns}/");
    let mut l: Vec<String> = bed
        .token()
        .session()
        .unwrap()
        .list_keys()
        .unwrap()
        .into_iter()
        .map(|k| k.label)
        .filter(|l| l.starts_with(&prefix))
        .collect();
    l.sort();
    l
}

/// Two spire-servers of one SPIFFE ID (an HA pair), with different key identifiers (one from a file made on first
/// start, one given), both keep their CA and JWT keys in signet: each signs SVIDs (an agent's workload SVID, `x509
/// mint`), one rotates its CA key (`localauthority x509 prepare`) without touching the other's; then one server is
/// gone for good and its namespace is swept off the token once unused past the window (on a clock the test moves),
/// while the other keeps its keys and keeps signing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_ha_pair_with_key_identifiers() {
    use signet::api::keymanager::namespace;
    let Some(bin) = spire_bin() else { return };
    let clock = signet::ca::ManualClock::new(time::OffsetDateTime::now_utc());
    let Some(bed) = Bed::start_clocked(
        |c| {
            c.authority.rotation.schedule = false;
            c.key_manager.sweep_after = ConfigDuration(Duration::from_secs(3600));
            c.key_manager.sweep_every = ConfigDuration(Duration::from_millis(500));
        },
        std::sync::Arc::new(clock.clone()),
    )
    .await
    else {
        return;
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (da, db) = (da.path().to_path_buf(), db.path().to_path_buf());
    let id_file = da.join("key-identifier");
    let data_a = format!(
        "{}      key_identifier_file = \"{}\"\n",
        plugin_data(&bed, &da).await,
        id_file.display()
    );
    let data_b = format!(
        "{}      key_identifier_value = \"spire-b\"\n",
        plugin_data(&bed, &db).await
    );
    // Both at once is refused by `spire-server validate`, in signet's words.
    let both = format!(
        "{data_b}      key_identifier_file = \"{}\"\n",
        id_file.display()
    );
    let v = tokio::task::block_in_place(|| {
        Spire::validate(
            &bin,
            &db,
            &plugin_stanza("KeyManager", "key-manager", &both),
        )
    });
    assert!(!v.status.success());
    assert!(text(&v).contains("not both"), "{}", text(&v));

    let mut a = tokio::task::block_in_place(|| {
        Spire::start_server(
            &bin,
            &da,
            &plugin_stanza("KeyManager", "key-manager", &data_a),
        )
    });
    let b = tokio::task::block_in_place(|| {
        Spire::start_server(
            &bin,
            &db,
            &plugin_stanza("KeyManager", "key-manager", &data_b),
        )
    });
    // A's identifier: a UUID the plug-in wrote on its first start.
    let uuid = std::fs::read_to_string(&id_file).unwrap();
    assert_eq!(uuid.len(), 36, "{uuid:?}");
    let (ns_a, ns_b) = (
        namespace(SPIRE_A, Some(&uuid)),
        namespace(SPIRE_A, Some("spire-b")),
    );
    let (keys_a, keys_b) = (km_labels_in(&bed, &ns_a), km_labels_in(&bed, &ns_b));
    for (who, keys) in [("A", &keys_a), ("B", &keys_b)] {
        assert!(
            keys.iter().any(|l| l.contains("/x509-CA-"))
                && keys.iter().any(|l| l.contains("/JWT-Signer-")),
            "{who}'s CA and JWT keys in its own namespace: {keys:?}"
        );
    }
    assert!(
        km_labels_in(&bed, &namespace(SPIRE_A, None)).is_empty(),
        "nothing in the SPIFFE ID's own namespace"
    );
    assert_ne!(a.bundle_roots(), b.bundle_roots(), "each server its own CA");

    // Both sign: a workload SVID through A's agent, `x509 mint` on each.
    tokio::task::block_in_place(|| a.start_agent());
    let (chain, bundle) = tokio::task::block_in_place(|| a.fetch_x509());
    openssl_verify(&bundle, &chain[1..], &chain[0]).expect("A's workload SVID verifies");
    tokio::task::block_in_place(|| {
        mint_and_verify(&a, "a1");
        mint_and_verify(&b, "b1");
    });
    // B prepares its next CA key: a new key in B's namespace; A's keys are untouched and A keeps signing.
    let o = b.server(&["localauthority", "x509", "prepare"]);
    assert!(
        o.status.success(),
        "localauthority x509 prepare: {}",
        text(&o)
    );
    let keys_b2 = km_labels_in(&bed, &ns_b);
    assert!(keys_b2.len() > keys_b.len(), "{keys_b:?} -> {keys_b2:?}");
    assert_eq!(km_labels_in(&bed, &ns_a), keys_a);
    tokio::task::block_in_place(|| mint_and_verify(&a, "a2"));

    // B is gone for good. 40 minutes on A signs again; 30 more, B's namespace has been unused for 70 minutes
    // (window 60, plus 5 of recording slack) and is swept; A's, used 30 minutes ago, is kept.
    drop(b);
    clock.advance(Duration::from_secs(40 * 60));
    tokio::task::block_in_place(|| mint_and_verify(&a, "a3"));
    clock.advance(Duration::from_secs(30 * 60));
    let logs = [a.server_log.as_path()];
    tokio::task::block_in_place(|| {
        eventually(
            Duration::from_secs(30),
            "B's namespace swept off the token",
            &logs,
            || km_labels_in(&bed, &ns_b).is_empty().then_some(()),
        )
    });
    assert_eq!(km_labels_in(&bed, &ns_a), keys_a, "A's keys are kept");
    tokio::task::block_in_place(|| mint_and_verify(&a, "a4"));
    let audit = bed.audit();
    let swept = audit_lines(&audit, SPIRE_A, "Sweep");
    assert_eq!(swept.len(), 1, "{swept:?}");
    let reason = swept[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&ns_b) && reason.contains("spire-b"),
        "{reason}"
    );
    drop(a);
    bed.stop().await;
}

/// What SPIRE does with a root signet retires, with the real binaries: signet rotates to a new root; `signet rotate
/// retire --taint-first` taints the old one (SPIRE records the taint from the UpstreamAuthority stream, moving its
/// own CA off it), waits, then retires it: SPIRE revokes it and `spire-server bundle show` no longer lists it, while
/// the new root stays and workloads keep getting SVIDs that verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_root_leaves_spires_bundle_after_taint() {
    use signet_proto::signet::v1 as spb;
    use signet_proto::signet::v1::admin_client::AdminClient;
    let Some(bin) = spire_bin() else { return };
    let clock = signet::ca::ManualClock::new(time::OffsetDateTime::now_utc());
    let Some(bed) = Bed::start_clocked(
        |c| {
            c.authority.bundle_refresh_hint = ConfigDuration(Duration::from_secs(1));
            c.authority.rotation.publish_lead = ConfigDuration(Duration::from_secs(3));
            c.authority.rotation.schedule = false;
        },
        std::sync::Arc::new(clock.clone()),
    )
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let data = plugin_data(&bed, &d).await;
    let plugins = format!(
        "  KeyManager \"memory\" {{\n    plugin_data {{}}\n  }}\n{}",
        plugin_stanza("UpstreamAuthority", "upstream-authority", &data)
    );
    let spire = tokio::task::block_in_place(|| Spire::start_server(&bin, &d, &plugins));
    let old_root = pem_ders(bed.roots_pem().as_bytes()).remove(0);
    assert!(spire.bundle_roots().contains(&old_root));

    // Rotate to a new root: prepare, publish (SPIRE gets it), activate once the publish lead has passed.
    let admin_of = || {
        let p = bed.app.paths();
        Credential {
            chain_pem: std::fs::read_to_string(&p.admin_cert).unwrap(),
            key_pem: std::fs::read_to_string(&p.admin_key).unwrap(),
        }
    };
    let mut admin = AdminClient::new(bed.channel(Some(&admin_of())).await);
    let step = |step: &str| spb::RotateRequest {
        step: step.into(),
        kind: "x509".into(),
        label: String::new(),
    };
    admin.rotate(step("prepare")).await.expect("prepare");
    admin.rotate(step("publish")).await.expect("publish");
    let new_root = bed
        .app
        .bundle()
        .current()
        .x509_roots
        .iter()
        .find(|r| **r != old_root)
        .unwrap()
        .clone();
    let logs = [spire.server_log.as_path()];
    tokio::task::block_in_place(|| {
        eventually(
            Duration::from_secs(30),
            "the new root in SPIRE's bundle",
            &logs,
            || spire.bundle_roots().contains(&new_root).then_some(()),
        )
    });
    clock.advance(Duration::from_secs(4));
    admin.rotate(step("activate")).await.expect("activate");
    // signet's own credentials move to the new root right after activate; then nothing of the old root is in use
    // here, and the clock goes past what the old root signed.
    let signed_by_new = |path: &Path| {
        let chain = pem_ders(&std::fs::read(path).unwrap());
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(&new_root).unwrap();
        leaf.verify_signature(Some(root.public_key())).is_ok()
    };
    let paths = bed.app.paths().clone();
    tokio::task::block_in_place(|| {
        eventually(
            Duration::from_secs(30),
            "signet's own credentials renewed",
            &logs,
            || {
                (signed_by_new(&paths.server_cert) && signed_by_new(&paths.admin_cert))
                    .then_some(())
            },
        )
    });
    let rotation = admin
        .get_rotation(spb::GetRotationRequest {})
        .await
        .unwrap()
        .into_inner();
    let old = rotation
        .authorities
        .iter()
        .find(|a| a.kind == "x509" && a.state == "superseded")
        .expect("the old root is superseded")
        .clone();
    clock.set(time::OffsetDateTime::from_unix_timestamp(old.issued_until + 1).unwrap());

    // The CLI: taint, settle, retire.
    let o = run(Command::new(env!("CARGO_BIN_EXE_signet"))
        .args([
            "rotate",
            "retire",
            "--taint-first",
            "--settle",
            "5s",
            "--data-dir",
        ])
        .arg(&paths.dir));
    assert!(
        o.status.success(),
        "signet rotate retire --taint-first: {}",
        text(&o)
    );
    let out = text(&o);
    assert!(
        out.contains(&format!("taint: {}", old.label))
            && out.contains(&format!("retire: {}", old.label)),
        "{out}"
    );
    assert!(!bed.app.bundle().current().x509_roots.contains(&old_root));
    // SPIRE revokes the tainted root once the stream no longer carries it.
    tokio::task::block_in_place(|| {
        eventually(
            Duration::from_secs(30),
            "the old root gone from spire-server bundle show",
            &logs,
            || (!spire.bundle_roots().contains(&old_root)).then_some(()),
        )
    });
    assert!(
        spire.bundle_roots().contains(&new_root),
        "the new root stays"
    );
    let log = std::fs::read_to_string(&spire.server_log).unwrap();
    assert!(
        log.contains("X.509 authority tainted") && log.contains("X.509 authority revoked"),
        "SPIRE's log tells the taint and the revocation"
    );
    // SPIRE keeps issuing, under the new root.
    tokio::task::block_in_place(|| mint_and_verify(&spire, "after"));
    let out = spire.dir.join("mint-after");
    let chain = pem_ders(&std::fs::read(out.join("svid.pem")).unwrap());
    openssl_verify(std::slice::from_ref(&new_root), &chain[1..], &chain[0])
        .expect("an SVID after the retire chains to the new root");
    drop(spire);
    bed.stop().await;
}
