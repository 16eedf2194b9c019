//! `signet doctor` as a process against appliances on fresh SoftHSM2 tokens: all well after a first start, and
//! each fault found with its line and exit status 1 (wrong PIN, a missing key, a mechanism the token lacks, an
//! unreachable datastore), or as a warning with exit status 0 (an authority within its alert window).

use std::path::{Path, PathBuf};
use std::process::Output;

use signet::config::Config;
use signet::serve::Appliance;
use signet_pkcs11::testing::SoftHsm;

/// A configuration file for `hsm`'s token in `dir` (data in `dir/data`, PIN in `dir/pin`), with `extra` TOML
/// appended inside the top level (before any table) and `tables` at the end.
fn write_config(hsm: &SoftHsm, dir: &Path, top: &str, tables: &str) -> PathBuf {
    let pin = dir.join("pin");
    std::fs::write(&pin, signet_pkcs11::testing::USER_PIN).unwrap();
    let text = format!(
        r#"trust_domain = "example.org"
data_dir = "{data}"
{top}

[server]
listen = "127.0.0.1:0"

[[tokens]]
name = "softhsm"
module = "{module}"
token = "{label}"
pin = {{ file = "{pin}" }}
sessions = 2

[[policy]]
caller = "spiffe://example.org/signet/admin"
may = ["issuer", "admin"]
ids = ["spiffe://example.org/"]
max_ttl = "1h"
{tables}
"#,
        data = dir.join("data").display(),
        module = hsm.module().display(),
        label = hsm.label(),
        pin = pin.display(),
    );
    let path = dir.join("signet.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the appliance of `config` once and stops it (the datastore, the keys and the credentials exist).
async fn start_once(config: &Path) {
    let cfg = Config::load(config).unwrap();
    let app = Appliance::start(cfg).await.expect("the appliance starts");
    app.shutdown().await.unwrap();
}

fn doctor(hsm: &SoftHsm, config: &Path) -> (i32, String) {
    doctor_on(hsm.conf(), config)
}

/// `signet doctor --config config` with SoftHSM2 reading `softhsm_conf`.
fn doctor_on(softhsm_conf: &Path, config: &Path) -> (i32, String) {
    let out: Output = std::process::Command::new(env!("CARGO_BIN_EXE_signet"))
        .args(["doctor", "--config"])
        .arg(config)
        .env("SOFTHSM2_CONF", softhsm_conf)
        .env_remove("SIGNET_DATA_DIR")
        .env_remove("SIGNET_CONFIG")
        .output()
        .unwrap();
    let text = format!(
        "{}\n--- stderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn lines_with<'a>(text: &'a str, start: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(start)).collect()
}

#[tokio::test]
async fn doctor_says_all_is_well_after_a_first_start() {
    let Some(hsm) = SoftHsm::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&hsm, dir.path(), "", "");
    // Before the first start: nothing is wrong, and it says signet has never run there.
    let (code, text) = doctor(&hsm, &config);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("signet has never been started"), "{text}");
    assert!(
        text.contains("signet generates it at first start"),
        "{text}"
    );

    start_once(&config).await;
    let (code, text) = doctor(&hsm, &config);
    assert_eq!(code, 0, "{text}");
    assert!(lines_with(&text, "warn").is_empty(), "{text}");
    assert!(lines_with(&text, "FAIL").is_empty(), "{text}");
    for expected in [
        "ok    config: ",
        "ok    datastore: sqlite://state.db opens (sqlite",
        "ok    clock: local",
        "ok    token softhsm: PKCS#11 module /usr/lib/softhsm/libsofthsm2.so loads",
        "ok    token softhsm: login with the PIN from file",
        "ok    token softhsm: 2 session(s) open at once",
        "ok    token softhsm: mechanisms for ec-p256 supported (CKM_ECDSA",
        "ok    token softhsm: key \"signet-x509-root\" (x509 authority (active)) is on the token, ec-p256",
        "ok    token softhsm: key \"signet-jwt\" (jwt authority (active)) is on the token, ec-p256",
        "ok    authority x509 signet-x509-root: active, expires ",
        "ok    server certificate: ",
        "ok    admin certificate: ",
        "ok    policy: 1 rule(s), no obvious mistake",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    // Times are RFC 3339 with a relative hint.
    let root = lines_with(&text, "ok    authority x509").join("\n");
    assert!(
        root.contains("Z (in 36") || root.contains("Z (in 364 d)"),
        "{root}"
    );
}

#[tokio::test]
async fn doctor_finds_a_wrong_pin_without_printing_it() {
    let Some(hsm) = SoftHsm::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&hsm, dir.path(), "", "");
    start_once(&config).await;
    std::fs::write(dir.path().join("pin"), "wrong-pin-7319").unwrap();
    let (code, text) = doctor(&hsm, &config);
    assert_eq!(code, 1, "{text}");
    let fails = lines_with(&text, "FAIL");
    assert_eq!(fails.len(), 1, "{text}");
    assert!(
        fails[0].starts_with("FAIL  token softhsm: login with the PIN from file ")
            && fails[0].contains("refused: the PIN is incorrect"),
        "{text}"
    );
    assert!(!text.contains("wrong-pin-7319"), "{text}");
    assert!(text.contains("error: 1 check(s) failed"), "{text}");
}

#[tokio::test]
async fn doctor_finds_a_missing_key() {
    let Some(hsm) = SoftHsm::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&hsm, dir.path(), "", "");
    start_once(&config).await;
    // The active JWT authority's key disappears from the token.
    hsm.open()
        .session()
        .unwrap()
        .destroy_key("signet-jwt")
        .unwrap();
    let (code, text) = doctor(&hsm, &config);
    assert_eq!(code, 1, "{text}");
    let fails = lines_with(&text, "FAIL");
    assert_eq!(
        fails,
        vec![
            "FAIL  token softhsm: key \"signet-jwt\" (jwt authority (active)) is not on the token: restore it from \
             the token's backup, or generate it (`signet token generate`) and fix the label"
        ],
        "{text}"
    );
}

/// A copy of `hsm`'s SoftHSM2 configuration in `dir` under which its token lists only the `enabled` mechanisms
/// (SoftHSM2's `slots.mechanisms`): the same token and keys, as a token whose firmware or policy lacks the others.
fn conf_with_only(hsm: &SoftHsm, dir: &Path, enabled: &[&str]) -> PathBuf {
    let mut text = std::fs::read_to_string(hsm.conf()).unwrap();
    assert!(!text.contains("slots.mechanisms"), "{text}");
    text.push_str(&format!("slots.mechanisms = {}\n", enabled.join(",")));
    let path = dir.join(format!("softhsm2-{}.conf", enabled.join("-")));
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn doctor_finds_a_missing_mechanism() {
    let Some(hsm) = SoftHsm::new() else { return };
    let dir = tempfile::tempdir().unwrap();

    // Before the first start: the configuration asks for an RSA root, the token has no RSA.
    let rsa = tempfile::tempdir().unwrap();
    let rsa_config = write_config(
        &hsm,
        rsa.path(),
        "",
        "[authority.x509]\nkey_type = \"rsa-3072\"\n",
    );
    let (code, text) = doctor(&hsm, &rsa_config);
    assert_eq!(code, 0, "the full token has RSA: {text}");
    assert!(
        text.contains("ok    token softhsm: mechanisms for rsa-3072 supported (CKM_RSA_PKCS, CKM_RSA_PKCS_KEY_PAIR_GEN)"),
        "{text}"
    );
    let no_rsa = conf_with_only(&hsm, dir.path(), &["CKM_ECDSA", "CKM_EC_KEY_PAIR_GEN"]);
    let (code, text) = doctor_on(&no_rsa, &rsa_config);
    assert_eq!(code, 1, "{text}");
    assert_eq!(
        lines_with(&text, "FAIL"),
        vec![
            "FAIL  token softhsm: rsa-3072 keys need CKM_RSA_PKCS and CKM_RSA_PKCS_KEY_PAIR_GEN, which the token \
             does not support: choose another key_type or token"
        ],
        "{text}"
    );
    // The JWT key type (ec-p256) is still fine on that token.
    assert!(
        text.contains(
            "ok    token softhsm: mechanisms for ec-p256 supported (CKM_ECDSA, CKM_EC_KEY_PAIR_GEN)"
        ),
        "{text}"
    );
    assert!(text.contains("error: 1 check(s) failed"), "{text}");

    // After a start on EC P-256: the token stops offering ECDSA signatures; the keys are still there.
    let config = write_config(&hsm, dir.path(), "", "");
    start_once(&config).await;
    let no_ecdsa = conf_with_only(
        &hsm,
        dir.path(),
        &[
            "CKM_EC_KEY_PAIR_GEN",
            "CKM_RSA_PKCS",
            "CKM_RSA_PKCS_KEY_PAIR_GEN",
        ],
    );
    let (code, text) = doctor_on(&no_ecdsa, &config);
    assert_eq!(code, 1, "{text}");
    assert_eq!(
        lines_with(&text, "FAIL"),
        vec![
            "FAIL  token softhsm: ec-p256 keys need CKM_ECDSA, which the token does not support: choose another \
             key_type or token"
        ],
        "{text}"
    );
    assert!(
        text.contains("ok    token softhsm: key \"signet-x509-root\" (x509 authority (active)) is on the token, ec-p256"),
        "{text}"
    );
}

#[tokio::test]
async fn doctor_finds_an_unreachable_datastore() {
    let Some(hsm) = SoftHsm::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = crate::support::free_port();
    let config = write_config(
        &hsm,
        dir.path(),
        &format!("datastore = \"postgres://signet:secret-pw@127.0.0.1:{port}/signet\""),
        "",
    );
    let (code, text) = doctor(&hsm, &config);
    assert_eq!(code, 1, "{text}");
    let fails = lines_with(&text, "FAIL");
    assert_eq!(fails.len(), 1, "{text}");
    assert!(
        fails[0].starts_with("FAIL  datastore: PostgreSQL is unreachable: ")
            && fails[0].contains("refused"),
        "{text}"
    );
    assert!(!text.contains("secret-pw"), "{text}");
    // The token is still checked.
    assert!(
        text.contains("ok    token softhsm: login with the PIN"),
        "{text}"
    );
}

#[tokio::test]
async fn doctor_warns_of_an_authority_within_its_alert_window() {
    let Some(hsm) = SoftHsm::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &hsm,
        dir.path(),
        "",
        "[authority.x509]\nroot_ttl = \"5d\"\n",
    );
    start_once(&config).await;
    let (code, text) = doctor(&hsm, &config);
    assert_eq!(code, 0, "warnings only: {text}");
    let root = lines_with(
        &text,
        "warn  authority x509 signet-x509-root: active, expires ",
    );
    assert_eq!(root.len(), 1, "{text}");
    assert!(
        root[0].contains("Z (in 4 d), within the alert window")
            || root[0].contains("Z (in 5 d), within the alert window"),
        "{text}"
    );
}
