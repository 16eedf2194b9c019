//! End-to-end tests of `signet token init|keygen|list|pubkey`: runs the built binary against a
//! SoftHSM2 configuration of its own (a temporary token directory per test).

use std::process::{Command, Output, Stdio};

use signet_pkcs11::testing::{SOFTHSM_MODULE, softhsm_available, write_softhsm_conf};

const SO_PIN: &str = "87654321";
const PIN: &str = "1234";

struct Env {
    dir: tempfile::TempDir,
    conf: std::path::PathBuf,
}

impl Env {
    fn new(test: &str) -> Option<Env> {
        if !softhsm_available(test) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let conf = write_softhsm_conf(dir.path()).unwrap();
        Some(Env { dir, conf })
    }

    fn cmd(&self, pin: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_signet"))
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .env("SIGNET_PKCS11_MODULE", SOFTHSM_MODULE)
            .env("SIGNET_TOKEN", "cli-ca")
            .env("SIGNET_PIN", pin)
            .env("SIGNET_SO_PIN", SO_PIN)
            .env_remove("SIGNET_PIN_FILE")
            .env_remove("SIGNET_SO_PIN_FILE")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(PIN, args);
        assert!(
            out.status.success(),
            "signet {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn init_keygen_list_pubkey() {
    let Some(env) = Env::new("init_keygen_list_pubkey") else {
        return;
    };
    let out = env.ok(&["token", "init", "--label", "cli-ca"]);
    assert!(out.contains("initialised token \"cli-ca\""), "{out}");

    let out = env.ok(&[
        "token",
        "keygen",
        "--label",
        "ca-ec",
        "--key-type",
        "ec-p256",
    ]);
    assert!(out.contains("generated ec-p256 key \"ca-ec\""), "{out}");
    env.ok(&[
        "token",
        "keygen",
        "--label",
        "ca-rsa",
        "--key-type",
        "rsa-2048",
    ]);

    // A second key with the same label is refused (non-zero exit), unless --replace.
    let dup = env.cmd(
        PIN,
        &[
            "token",
            "keygen",
            "--label",
            "ca-ec",
            "--key-type",
            "ec-p384",
        ],
    );
    assert!(!dup.status.success());
    assert!(stderr(&dup).contains("already exists"), "{}", stderr(&dup));
    env.ok(&[
        "token",
        "keygen",
        "--label",
        "ca-ec",
        "--key-type",
        "ec-p384",
        "--replace",
    ]);

    let list = env.ok(&["token", "list"]);
    assert!(list.contains("token \"cli-ca\""), "{list}");
    assert!(list.contains("uninitialised token (free)"), "{list}");
    assert!(list.contains("ca-ec") && list.contains("ec-p384"), "{list}");
    assert!(
        list.contains("ca-rsa") && list.contains("rsa-2048"),
        "{list}"
    );

    // PEM by default; DER on request; both the same SubjectPublicKeyInfo.
    let pem_out = env.ok(&["token", "pubkey", "--label", "ca-ec"]);
    assert!(
        pem_out.starts_with("-----BEGIN PUBLIC KEY-----"),
        "{pem_out}"
    );
    let parsed = pem::parse(&pem_out).unwrap();
    assert_eq!(parsed.tag(), "PUBLIC KEY");
    let der_path = env.dir.path().join("ca-ec.der");
    env.ok(&[
        "token",
        "pubkey",
        "--label",
        "ca-ec",
        "--format",
        "der",
        "--out",
        der_path.to_str().unwrap(),
    ]);
    let der = std::fs::read(&der_path).unwrap();
    assert_eq!(parsed.contents(), &der[..]);
    let (rest, spki) = <x509_parser::x509::SubjectPublicKeyInfo as x509_parser::prelude::FromDer<
        x509_parser::error::X509Error,
    >>::from_der(&der)
    .unwrap();
    assert!(rest.is_empty());
    assert_eq!(spki.algorithm.algorithm.to_id_string(), "1.2.840.10045.2.1");

    let rsa = env.ok(&["token", "pubkey", "--label", "ca-rsa", "--format", "pem"]);
    assert!(pem::parse(&rsa).unwrap().contents().len() == 294);
}

#[test]
fn bad_pin_and_other_errors_exit_non_zero() {
    let Some(env) = Env::new("bad_pin_and_other_errors_exit_non_zero") else {
        return;
    };
    env.ok(&["token", "init", "--label", "cli-ca"]);

    let out = env.cmd(
        "0000",
        &["token", "keygen", "--label", "k", "--key-type", "ec-p256"],
    );
    assert!(!out.status.success());
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("PIN incorrect"), "{err}");
    assert!(!err.contains("0000"), "the PIN must not be echoed: {err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = env.cmd(PIN, &["token", "pubkey", "--label", "no-such-key"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-such-key"));

    let out = env.cmd(PIN, &["token", "list", "--token", "no-such-token"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    let out = env.cmd(
        PIN,
        &["token", "list", "--module", "/nonexistent/module.so"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/module.so"),
        "{}",
        stderr(&out)
    );

    let out = env.cmd(
        PIN,
        &["token", "keygen", "--label", "k", "--key-type", "ec-p521"],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap rejects an unknown key type"
    );

    // The init of a second token with the same label is refused.
    let out = env.cmd(PIN, &["token", "init", "--label", "cli-ca"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
}
