//! OpenSC's `pkcs11-tool` drives the built module as separate processes, as an operator would: list slots,
//! initialise the token and the user PIN, log in, generate EC P-256, Ed25519 and RSA keys, sign, export the public
//! key; `openssl` verifies the signatures.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;
use common::module;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SO_PIN: &str = "12345678";
const PIN: &str = "4321";

struct Tool {
    module: PathBuf,
    dir: tempfile::TempDir,
}

impl Tool {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("pkcs11-tool")
            .arg("--module")
            .arg(&self.module)
            .args(args)
            .env("HSM_SIM_DIR", self.dir.path().join("token"))
            .env("HSM_SIM_PIN_KDF_ITERATIONS", "1000")
            .current_dir(self.dir.path())
            .output()
            .expect("pkcs11-tool must be installed (OpenSC): scripts/test installs it")
    }

    /// Runs pkcs11-tool, fails the test with its output if it fails, returns stdout and stderr together.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pkcs11-tool {args:?} failed:\n{text}");
        text
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn openssl(args: &[&str], dir: &Path) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openssl {args:?} failed:\n{text}");
    text
}

/// Exports the public key with `id` and converts it to PEM (pkcs11-tool writes DER or, for Ed25519, PEM).
fn public_pem(tool: &Tool, id: &str) -> String {
    let raw = format!("pub-{id}.out");
    tool.ok(&[
        "--read-object",
        "--type",
        "pubkey",
        "--id",
        id,
        "--output-file",
        &raw,
    ]);
    let bytes = std::fs::read(tool.path(&raw)).expect("exported public key");
    let pem = format!("pub-{id}.pem");
    let inform = if bytes.starts_with(b"-----BEGIN") {
        "PEM"
    } else {
        "DER"
    };
    openssl(
        &[
            "pkey", "-pubin", "-inform", inform, "-in", &raw, "-out", &pem,
        ],
        tool.dir.path(),
    );
    pem
}

#[test]
fn pkcs11_tool_initialises_generates_and_signs() {
    let tool = Tool {
        module: module(),
        dir: tempfile::tempdir().expect("tempdir"),
    };

    let slots = tool.ok(&["--list-slots"]);
    assert!(
        slots.contains("hsm-sim slot 0") && slots.contains("uninitialized"),
        "{slots}"
    );
    let init = tool.ok(&["--init-token", "--label", "signet", "--so-pin", SO_PIN]);
    assert!(init.contains("Token successfully initialized"), "{init}");
    let pin = tool.ok(&["--init-pin", "--so-pin", SO_PIN, "--pin", PIN]);
    assert!(pin.contains("User PIN successfully initialized"), "{pin}");
    let slots = tool.ok(&["--list-slots"]);
    assert!(
        slots.contains("signet") && slots.contains("PIN initialized"),
        "{slots}"
    );

    let wrong = tool.run(&["--login", "--pin", "0000", "--list-objects"]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("CKR_PIN_INCORRECT"));

    // EC P-256: generate, sign with hashing done by the token, verify with openssl.
    let generated = tool.ok(&[
        "--login",
        "--pin",
        PIN,
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "ec",
        "--id",
        "01",
    ]);
    assert!(generated.contains("EC_POINT 256 bits"), "{generated}");
    std::fs::write(
        tool.path("data"),
        b"signed by pkcs11-tool through hsm-sim\n",
    )
    .expect("data");
    tool.ok(&[
        "--login",
        "--pin",
        PIN,
        "--sign",
        "--mechanism",
        "ECDSA-SHA256",
        "--signature-format",
        "openssl",
        "--id",
        "01",
        "--input-file",
        "data",
        "--output-file",
        "ec.sig",
    ]);
    let pem = public_pem(&tool, "01");
    let v = openssl(
        &[
            "dgst",
            "-sha256",
            "-verify",
            &pem,
            "-signature",
            "ec.sig",
            "data",
        ],
        tool.dir.path(),
    );
    assert!(v.contains("Verified OK"), "{v}");

    // Ed25519.
    tool.ok(&[
        "--login",
        "--pin",
        PIN,
        "--keypairgen",
        "--key-type",
        "EC:edwards25519",
        "--label",
        "ed",
        "--id",
        "02",
    ]);
    tool.ok(&[
        "--login",
        "--pin",
        PIN,
        "--sign",
        "--mechanism",
        "EDDSA",
        "--id",
        "02",
        "--input-file",
        "data",
        "--output-file",
        "ed.sig",
    ]);
    let pem = public_pem(&tool, "02");
    let v = openssl(
        &[
            "pkeyutl", "-verify", "-pubin", "-inkey", &pem, "-rawin", "-in", "data", "-sigfile",
            "ed.sig",
        ],
        tool.dir.path(),
    );
    assert!(v.contains("Signature Verified Successfully"), "{v}");

    // RSA-2048 with PSS.
    tool.ok(&[
        "--login",
        "--pin",
        PIN,
        "--keypairgen",
        "--key-type",
        "rsa:2048",
        "--label",
        "rsa",
        "--id",
        "03",
    ]);
    tool.ok(&[
        "--login",
        "--pin",
        PIN,
        "--sign",
        "--mechanism",
        "SHA256-RSA-PKCS-PSS",
        "--id",
        "03",
        "--input-file",
        "data",
        "--output-file",
        "rsa.sig",
    ]);
    let pem = public_pem(&tool, "03");
    let v = openssl(
        &[
            "dgst",
            "-sha256",
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:-1",
            "-verify",
            &pem,
            "-signature",
            "rsa.sig",
            "data",
        ],
        tool.dir.path(),
    );
    assert!(v.contains("Verified OK"), "{v}");

    // Every key is still there for the next process; private keys only after login.
    let public_only = tool.ok(&["--list-objects"]);
    assert!(!public_only.contains("Private Key Object"), "{public_only}");
    let all = tool.ok(&["--login", "--pin", PIN, "--list-objects"]);
    assert_eq!(all.matches("Private Key Object").count(), 3, "{all}");
    assert!(all.contains("never extractable"), "{all}");
}
