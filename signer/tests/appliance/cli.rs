//! `signet serve` with no configuration, then `signet mint x509-svid`, `mint jwt-svid` and `bundle` against it,
//! as processes; a second start reuses the root and the credentials.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

fn signet() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_signet"));
    c.env_remove("SOFTHSM2_CONF")
        .env_remove("SIGNET_CONFIG")
        .env_remove("SIGNET_DATA_DIR")
        .env_remove("SIGNET_ADDR");
    c
}

/// The server's log (stderr), appended to `cwd/serve.log` so a failure can show it.
fn log_file(cwd: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cwd.join("serve.log"))
        .expect("opening serve.log")
}

/// Starts `signet serve` in `cwd` and waits for its banner; returns the child and the banner.
fn serve(cwd: &Path) -> (Child, String) {
    let mut child = signet()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(log_file(cwd))
        .spawn()
        .expect("starting signet serve");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    loop {
        let mut line = String::new();
        let n = out.read_line(&mut line).unwrap();
        assert!(
            n > 0,
            "signet serve exited before serving: {banner}\n--- its log:\n{}",
            std::fs::read_to_string(cwd.join("serve.log")).unwrap_or_default()
        );
        banner.push_str(&line);
        if line.starts_with("Stop with") {
            break;
        }
    }
    (child, banner)
}

fn stop(mut child: Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(
        exit.success(),
        "signet serve did not exit cleanly on SIGTERM: {exit:?}"
    );
}

fn run(cwd: &Path, args: &[&str]) -> Output {
    signet().args(args).current_dir(cwd).output().unwrap()
}

fn metrics_text(banner: &str) -> String {
    let addr = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("metrics         http://"))
        .and_then(|s| s.strip_suffix("/metrics"))
        .expect("metrics address in the banner");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn serve_then_mint_and_bundle_as_processes() {
    if !signet_pkcs11::testing::softhsm_available("serve_then_mint_and_bundle_as_processes") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    // Before the first start, `signet doctor` checks the embedded default and says it has never run here.
    let out = run(cwd, &["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(
            "ok    data directory: signet-data does not exist: signet has never been started here"
        ),
        "{text}"
    );
    assert!(!cwd.join("signet-data").exists(), "doctor created state");
    let (child, banner) = serve(cwd);
    assert!(
        banner.contains("signet is serving trust domain example.org"),
        "{banner}"
    );
    let data = cwd.join("signet-data");
    for f in [
        "root.pem",
        "bundle.pem",
        "admin.pem",
        "admin.key",
        "server.pem",
        "server.key",
        "endpoint",
    ] {
        assert!(data.join(f).exists(), "{f} missing");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for f in ["admin.key", "server.key", "token.pin"] {
            let mode = std::fs::metadata(data.join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} is readable by others");
        }
    }

    let out = run(
        cwd,
        &[
            "mint",
            "x509-svid",
            "--spiffe-id",
            "spiffe://example.org/demo",
            "--out",
            "svid",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let minted = String::from_utf8_lossy(&out.stdout);
    assert!(
        minted.contains(", expires 20") && minted.contains("Z (in "),
        "{minted}"
    );
    let svid_dir = cwd.join("svid");
    let verify = Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "any", "-CAfile"])
        .arg(svid_dir.join("bundle.pem"))
        .arg(svid_dir.join("svid.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // The key written matches the certificate.
    let cert = pem::parse(std::fs::read(svid_dir.join("svid.pem")).unwrap()).unwrap();
    let key = pem::parse(std::fs::read(svid_dir.join("svid.key")).unwrap()).unwrap();
    assert_eq!(key.tag(), "PRIVATE KEY");
    spiffe::X509Svid::parse_from_der(cert.contents(), key.contents())
        .expect("key and certificate match");

    let out = run(
        cwd,
        &[
            "mint",
            "jwt-svid",
            "--spiffe-id",
            "spiffe://example.org/demo",
            "--audience",
            "demo",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(token.trim().split('.').count(), 3);

    let out = run(cwd, &["bundle"]);
    assert!(out.status.success());
    let doc = signet::spiffe::BundleDocument::parse(&out.stdout).expect("a SPIFFE bundle document");
    assert_eq!(doc.x509_authorities.len(), 1);
    let out = run(cwd, &["bundle", "--format", "pem"]);
    assert_eq!(out.stdout, std::fs::read(data.join("bundle.pem")).unwrap());

    let out = run(cwd, &["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("trust domain     example.org"), "{text}");
    assert!(
        text.contains("token            embedded healthy sessions=2"),
        "{text}"
    );
    // Times in RFC 3339 with a relative hint.
    let root = text
        .lines()
        .find(|l| l.starts_with("authority        x509 active"))
        .unwrap_or_else(|| panic!("no active root in {text}"));
    assert!(
        root.contains("Z (in 364 d) token=") || root.contains("Z (in 365 d) token="),
        "{root}"
    );

    // With several addresses (replicas), the first that answers serves the command; when none does, every
    // failure is named.
    let dead = format!("127.0.0.1:{}", crate::support::free_port());
    let live = std::fs::read_to_string(data.join("endpoint")).unwrap();
    let out = run(
        cwd,
        &["status", "--addr", &format!("{dead},{}", live.trim())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("trust domain     example.org"));
    let out = run(cwd, &["status", "--addr", &format!("{dead},{dead}")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches(&format!("cannot connect to {dead}")).count(),
        2,
        "{err}"
    );

    // A refusal exits non-zero with the server's reason.
    let out = run(
        cwd,
        &[
            "mint",
            "x509-svid",
            "--spiffe-id",
            "spiffe://other.org/x",
            "--out",
            "nope",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("spiffe://other.org/x"),
        "{err}"
    );
    assert!(!cwd.join("nope").exists());

    let metrics = metrics_text(&banner);
    assert!(metrics.contains("200 OK"), "{metrics}");
    assert!(metrics.contains("signet_"), "{metrics}");

    let root = std::fs::read(data.join("root.pem")).unwrap();
    let admin = std::fs::read(data.join("admin.pem")).unwrap();
    stop(child);

    // A second start reuses the token, the root and the credentials.
    let (child, _) = serve(cwd);
    assert_eq!(std::fs::read(data.join("root.pem")).unwrap(), root);
    assert_eq!(std::fs::read(data.join("admin.pem")).unwrap(), admin);
    let out = run(
        cwd,
        &[
            "mint",
            "jwt-svid",
            "--spiffe-id",
            "spiffe://example.org/demo",
            "--audience",
            "demo",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stop(child);

    // After it ran, doctor finds the embedded token, its keys, the datastore and the credentials in order.
    let out = run(cwd, &["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "ok    token embedded: login with the PIN from file",
        "ok    token embedded: key \"signet-x509-root\" (x509 authority (active)) is on the token",
        "ok    authority x509 signet-x509-root: active, expires ",
        "ok    admin certificate: ",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    assert!(!text.contains("FAIL") && !text.contains("warn"), "{text}");

    // --log-format: JSON lines for machines, plain text for people (stderr is not a terminal here: JSON by default).
    let logs = |format: Option<&str>| {
        let mut c = signet();
        if let Some(f) = format {
            c.args(["--log-format", f]);
        }
        let out = c
            .arg("doctor")
            .env("RUST_LOG", "debug")
            .current_dir(cwd)
            .output()
            .unwrap();
        assert!(out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(!err.trim().is_empty(), "no log line at debug level");
        err
    };
    for err in [logs(Some("json")), logs(None)] {
        for line in err.lines().filter(|l| !l.is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            assert!(
                v.get("level").is_some() && v.get("fields").is_some(),
                "{line}"
            );
        }
    }
    let text = logs(Some("text"));
    assert!(
        text.lines().all(|l| !l.starts_with('{')) && text.contains("DEBUG"),
        "{text}"
    );
}
