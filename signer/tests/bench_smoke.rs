//! A short run of `signet bench` (the real binary, an in-process appliance on the embedded hsm-sim, gRPC + mTLS over
//! 127.0.0.1) for each RPC: bounded in requests and time, every credential checked against the bundle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn bench(args: &[&str]) -> (std::process::Output, Option<serde_json::Value>) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_signet"));
    cmd.arg("bench")
        .args(["--warmup", "0", "--ceiling-seconds", "0.3"])
        .arg("--json")
        .arg(&json)
        .args(args)
        .current_dir(dir.path());
    if !args.contains(&"--duration") {
        // A bound in time as well as in count.
        cmd.args(["--duration", "20"]);
    }
    let out = cmd.output().unwrap();
    let doc = std::fs::read(&json)
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap());
    (out, doc)
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The run answered `want` credentials, all checked and good, with sane percentiles and a positive ceiling ratio.
fn assert_sane(doc: &serde_json::Value, workload: &str, want: u64) {
    assert_eq!(doc["workload"], workload);
    let ceiling = f(&doc["ceiling"]["rate"]);
    assert!(ceiling > 0.0, "{doc}");
    let run = &doc["runs"][0];
    assert_eq!(run["credentials"].as_u64(), Some(want), "{run}");
    assert_eq!(
        run["checked"].as_u64(),
        Some(want),
        "every credential is checked: {run}"
    );
    assert_eq!(run["bad_credentials"].as_u64(), Some(0), "{run}");
    assert_eq!(run["errors"], serde_json::json!({}), "{run}");
    let rate = f(&run["rate"]);
    let seconds = f(&run["seconds"]);
    assert!(
        (rate * seconds - want as f64).abs() < 1.0,
        "rate x seconds = credentials: {run}"
    );
    let ratio = f(&run["ratio_to_ceiling"]);
    assert!(
        (ratio - rate / ceiling).abs() < 1e-9 && ratio > 0.0,
        "{run}"
    );
    let l = &run["latency"];
    assert!(f(&l["p50_ms"]) > 0.0);
    assert!(f(&l["p50_ms"]) <= f(&l["p90_ms"]));
    assert!(f(&l["p90_ms"]) <= f(&l["p99_ms"]));
    assert!(f(&l["p99_ms"]) <= f(&l["p999_ms"]));
    assert!(f(&l["p999_ms"]) <= f(&l["max_ms"]));
    let server = &run["server"];
    // The server's and the client's CPU (in process the client's threads are counted apart).
    let client_s = f(&server["client_cpu_us_per_credential"]) * want as f64 / 1e6;
    assert!(f(&server["cpu_seconds"]) >= 0.0 && client_s >= 0.0, "{run}");
    assert!(f(&server["cpu_seconds"]) + client_s > 0.0, "{run}");
    assert!(
        server["peak_rss_bytes"].as_u64().unwrap() > 1 << 20,
        "{run}"
    );
}

#[test]
fn bench_smoke_x509_jwt_sign_data() {
    let started = std::time::Instant::now();
    let (out, doc) = bench(&[
        "--workload",
        "x509",
        "--batch",
        "10",
        "--requests",
        "20",
        "--concurrency",
        "4",
        "--pool",
        "16",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = doc.unwrap();
    assert_sane(&doc, "x509", 200);
    assert!(f(&doc["work_loop"]["rate"]) > 0.0, "{doc}");
    // The loop is measured before and after the load; its rate is their mean, and the ratio uses it.
    let measured: Vec<f64> = doc["work_loop"]["measured"]
        .as_array()
        .unwrap()
        .iter()
        .map(f)
        .collect();
    assert_eq!(measured.len(), 2, "{doc}");
    assert!(
        (f(&doc["work_loop"]["rate"]) - (measured[0] + measured[1]) / 2.0).abs() < 1e-6,
        "{doc}"
    );
    let run = &doc["runs"][0];
    assert!(
        (f(&run["ratio_to_work_loop"]) - f(&run["rate"]) / f(&doc["work_loop"]["rate"])).abs()
            < 1e-9,
        "{doc}"
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("p99 ms") && table.contains("ceiling"),
        "{table}"
    );

    for workload in ["jwt", "sign-data"] {
        let (out, doc) = bench(&[
            "--workload",
            workload,
            "--requests",
            "50",
            "--concurrency",
            "4",
            "--pool",
            "16",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_sane(&doc.unwrap(), workload, 50);
    }
    // Reported, not asserted: the time depends on the machine and its load.
    eprintln!("the three smoke benches took {:?}", started.elapsed());
}

#[test]
fn bench_sweep_draws_a_plot_and_open_loop_keeps_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("sweep.svg");
    let (out, doc) = bench(&[
        "--workload",
        "sign-data",
        "--sweep",
        "1,4",
        "--rate",
        "200",
        "--duration",
        "1",
        "--pool",
        "16",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = doc.unwrap();
    assert_eq!(doc["loop_mode"], "open");
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs {
        // 200/s offered for one second: 200 requests due, each answered or counted as not sent (agents busy).
        let n = r["credentials"].as_u64().unwrap();
        let not_sent = r["errors"]["not sent: all agents busy"]
            .as_u64()
            .unwrap_or(0);
        assert_eq!(n + not_sent, 200, "{r}");
        assert!(n >= 20, "{r}");
        assert_eq!(r["bad_credentials"].as_u64(), Some(0));
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("p99 latency") && plot.contains("ceiling"));
}

#[test]
fn bench_refuses_bad_flags_with_a_reason() {
    for (args, says) in [
        (&["--batch", "0"][..], "--batch"),
        (&["--check-rate", "2"][..], "--check-rate"),
        (&["--plot", "x.jpg"][..], "*.svg or *.png"),
        (&["--sweep", "0,4"][..], "concurrency"),
    ] {
        let (out, _) = bench(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// `signet bench --addr` against `signet serve` in another process: the server's CPU and peak RSS come from its
/// Admin.GetStatus, the client's CPU is not mixed in, and there is no ceiling without the token's flags.
#[test]
fn bench_drives_a_running_appliance() {
    use std::io::BufRead as _;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_signet"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .env_remove("SIGNET_CONFIG")
        .env_remove("SIGNET_DATA_DIR")
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("Stop with") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "signet serve exited: {}",
            std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
        );
    }
    let addr = std::fs::read_to_string(dir.path().join("signet-data/endpoint")).unwrap();
    let data = dir.path().join("signet-data");
    let (result, doc) = bench(&[
        "--addr",
        addr.trim(),
        "--data-dir",
        data.to_str().unwrap(),
        "--workload",
        "x509",
        "--batch",
        "5",
        "--requests",
        "20",
        "--pool",
        "8",
    ]);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let doc = doc.unwrap();
    assert!(
        doc["ceiling"].is_null() && doc["work_loop"].is_null(),
        "{doc}"
    );
    let run = &doc["runs"][0];
    assert_eq!(run["credentials"].as_u64(), Some(100), "{run}");
    assert_eq!(run["checked"].as_u64(), Some(100), "{run}");
    assert_eq!(run["bad_credentials"].as_u64(), Some(0), "{run}");
    assert!(run["ratio_to_ceiling"].is_null(), "{run}");
    let server = &run["server"];
    assert!(f(&server["cpu_seconds"]) > 0.0, "{run}");
    assert!(server["client_cpu_us_per_credential"].is_null(), "{run}");
    assert!(
        server["peak_rss_bytes"].as_u64().unwrap() > 1 << 20,
        "{run}"
    );
}

/// SPIRE's binaries (v1.15.3, from scripts/spire-install), or `None` (said loudly) when Go is missing to build
/// them and SIGNET_REQUIRE_SPIRE is not 1.
fn spire_bin_dir() -> Option<std::path::PathBuf> {
    if let Some(d) = std::env::var_os("SIGNET_SPIRE_BIN_DIR") {
        return Some(d.into());
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/spire-install");
    let out = Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("running scripts/spire-install");
    match out.status.code() {
        Some(0) => Some(String::from_utf8(out.stdout).unwrap().trim().into()),
        Some(3) if std::env::var("SIGNET_REQUIRE_SPIRE").as_deref() != Ok("1") => {
            eprintln!(
                "!!!!! SKIPPED: `signet bench --target spire` needs Go to build SPIRE (scripts/spire-install)."
            );
            None
        }
        _ => panic!(
            "SPIRE is not available ({}), and SIGNET_REQUIRE_SPIRE=1 requires it",
            out.status
        ),
    }
}

/// Every run of a `--target spire` or `--target cfssl` document answered `want` credentials, each checked and
/// good, with no failure and ordered percentiles.
fn assert_runs(runs: &[serde_json::Value], want: u64) {
    for run in runs {
        assert_eq!(run["credentials"].as_u64(), Some(want), "{run}");
        assert_eq!(
            run["checked"].as_u64(),
            Some(want),
            "every credential is checked: {run}"
        );
        assert_eq!(run["bad_credentials"].as_u64(), Some(0), "{run}");
        assert_eq!(run["errors"], serde_json::json!({}), "{run}");
        let l = &run["latency"];
        assert!(
            f(&l["p50_ms"]) > 0.0 && f(&l["p50_ms"]) <= f(&l["p99_ms"]),
            "{run}"
        );
    }
}

/// A short `--target spire` run on SPIRE's binaries in `bin`: 2 agents, 3 entries each, 4 requests in all, plus
/// `extra`. It must succeed; returns its output (stdout and stderr) and its JSON document.
fn small_spire_bench(bin: &std::path::Path, extra: &[&str]) -> (String, serde_json::Value) {
    let mut args = vec![
        "--target",
        "spire",
        "--spire-bin-dir",
        bin.to_str().unwrap(),
        "--concurrency",
        "2",
        "--batch",
        "3",
        "--requests",
        "4",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let (out, doc) = bench(&args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    (text, doc.expect("the JSON document"))
}

/// `--target spire` against the real spire-server: SPIRE alone, with signet as its KeyManager and as its
/// UpstreamAuthority. 2 agents attested with join tokens ask BatchNewX509SVID 4 times in all, each time for the
/// agent's 3 entries: 12 X509-SVIDs per set-up, each checked against the bundle SPIRE publishes (with signet as UpstreamAuthority
/// that bundle is signet's root, and the SVIDs chain through SPIRE's CA to it). Ratios are to SPIRE alone, and
/// SPIRE's CPU time per SVID is read from /proc.
#[test]
fn bench_spire_issues_svids_that_verify_in_every_setup() {
    let Some(bin) = spire_bin_dir() else { return };
    let (text, doc) = small_spire_bench(&bin, &[]);
    assert_eq!(doc["workload"], "x509");
    assert!(
        doc["spire_version"].as_str().unwrap().starts_with("1.15.3"),
        "{doc}"
    );
    let runs = doc["runs"].as_array().unwrap();
    let setups: Vec<&str> = runs.iter().map(|r| r["setup"].as_str().unwrap()).collect();
    assert_eq!(setups, ["memory", "key-manager", "upstream-authority"]);
    assert_runs(runs, 12);
    assert_eq!(runs[0]["ratio_to_memory"].as_f64(), Some(1.0));
    for r in runs {
        assert!(f(&r["ratio_to_memory"]) > 0.0, "{r}");
        // Read from /proc (ticks of 10 ms: a run this short may see none).
        assert!(f(&r["spire_cpu_us_per_credential"]) >= 0.0, "{r}");
    }
    for label in [
        "SPIRE alone (KeyManager memory)",
        "SPIRE + signet KeyManager",
        "SPIRE + signet UpstreamAuthority",
    ] {
        assert!(
            text.contains(label),
            "{label} missing from the table:\n{text}"
        );
    }
}

/// `--target spire --workload jwt` with signet as SPIRE's KeyManager: SPIRE's JWT key is on signet's token, and
/// 8 JWT-SVIDs from NewJWTSVID verify against the JWT authorities of SPIRE's bundle.
#[test]
fn bench_spire_jwt_svids_verify_with_signet_as_key_manager() {
    let Some(bin) = spire_bin_dir() else { return };
    let (out, doc) = bench(&[
        "--target",
        "spire",
        "--workload",
        "jwt",
        "--spire-setups",
        "key-manager",
        "--spire-bin-dir",
        bin.to_str().unwrap(),
        "--concurrency",
        "2",
        "--requests",
        "8",
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = doc.expect("the JSON document");
    assert_eq!(doc["workload"], "jwt");
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["setup"], "key-manager");
    assert_runs(runs, 8);
}

/// `--spire-setups key-manager,key-manager-embedded --token softhsm`: SPIRE's KeyManager on the bench's appliance
/// over the network, then on the plug-in's own appliance in its process (`--embedded`, a SoftHSM2 token of its
/// own), both with the audit and post-sign settings of the flags (named in the table): the X509-SVIDs of both chain
/// to the bundle SPIRE publishes. On hsm-sim the embedded set-up is refused with a message that names the token it
/// needs, and a post-sign setting signet does not know is refused before anything starts.
#[test]
fn bench_spire_key_manager_embedded_on_softhsm() {
    let Some(bin) = spire_bin_dir() else { return };
    if !signet_pkcs11::testing::softhsm_available("bench_spire_key_manager_embedded_on_softhsm") {
        return;
    }
    let (text, doc) = small_spire_bench(
        &bin,
        &[
            "--token",
            "softhsm",
            "--spire-setups",
            "key-manager,key-manager-embedded",
            "--audit-sync",
            "false",
            "--verify-after-sign",
            "1/4",
        ],
    );
    let runs = doc["runs"].as_array().unwrap();
    let setups: Vec<&str> = runs.iter().map(|r| r["setup"].as_str().unwrap()).collect();
    assert_eq!(setups, ["key-manager", "key-manager-embedded"]);
    assert_runs(runs, 12);
    for want in [
        "SPIRE + signet KeyManager --embedded",
        "audit_sync = false, verify_after_sign = \"1/4\"",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }

    // Refused before anything starts, each with a message that says what to change.
    for (flags, want) in [
        (
            &["--spire-setups", "key-manager-embedded"][..],
            "add --token softhsm",
        ),
        (
            &["--verify-after-sign", "1/0"][..],
            "--verify-after-sign \"1/0\": use always, never or 1/N",
        ),
    ] {
        let mut args = vec!["--target", "spire", "--requests", "1", "--quiet"];
        args.extend_from_slice(&["--spire-bin-dir", bin.to_str().unwrap()]);
        args.extend_from_slice(flags);
        let (out, _) = bench(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
}

/// `--target cfssl`: Debian's `cfssl serve` (installed by scripts/test) beside signet's delegated and direct modes,
/// 30 one-CSR requests each; every certificate checked (cfssl's against its CA, without the SPIFFE ID it drops),
/// and each server's CPU time per certificate measured.
#[test]
fn bench_cfssl_side_by_side_with_signet() {
    if Command::new("cfssl").arg("version").output().is_err() {
        panic!(
            "cfssl is not installed: apt-get install -y golang-cfssl (scripts/test installs it)"
        );
    }
    let (out, doc) = bench(&[
        "--target",
        "cfssl",
        "--concurrency",
        "3",
        "--requests",
        "30",
        "--quiet",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = doc.expect("the JSON document");
    let rows = doc["rows"].as_array().unwrap();
    let servers: Vec<&str> = rows.iter().map(|r| r["server"].as_str().unwrap()).collect();
    assert_eq!(servers, ["cfssl", "signet delegated", "signet direct"]);
    assert_runs(rows, 30);
    for r in rows {
        // From /proc (ticks of 10 ms: a run this short may see none).
        assert!(f(&r["cpu_us_per_certificate"]) >= 0.0, "{r}");
    }
    assert!(
        rows[0]["notes"]
            .as_str()
            .unwrap()
            .contains("URI SAN dropped"),
        "{text}"
    );
}
