//! Helpers shared by signer's test binaries: loopback ports, `openssl verify`, the independent judges (Go's
//! crypto/x509, Python `cryptography`), and [`required`], which turns a missing dependency into a failure when the
//! suite demands it. A test binary at `tests/NAME.rs` takes it with `mod support;`, one in a directory with
//! `#[path = "../support/mod.rs"] mod support;`.
#![allow(
    dead_code,
    reason = "each test binary uses the part of the shared helpers it needs"
)]

pub mod bed;
pub mod handshake;
pub mod judges;
pub mod wait;

use std::path::PathBuf;
use std::process::Command;

/// Whether a dependency a test needs is present. When it is not: with `require_env` set in the environment the
/// test fails (a suite that ran without it can never pass); without, prints a loud SKIP line naming `test` and
/// answers false (the caller returns).
pub fn required(test: &str, what: &str, require_env: &str, present: Result<(), String>) -> bool {
    match present {
        Ok(()) => true,
        Err(why) if std::env::var_os(require_env).is_some() => {
            panic!("{test}: {what} is required ({require_env} is set) but {why}")
        }
        Err(why) => {
            eprintln!(
                "SKIP {test}: {what} is missing ({why}); set {require_env}=1 to make this a failure"
            );
            false
        }
    }
}

/// Whether `cmd args` runs and succeeds: Ok, or why not.
pub fn tool_runs(cmd: &str, args: &[&str]) -> Result<(), String> {
    match Command::new(cmd).args(args).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("`{cmd}` cannot run: {e}")),
    }
}

/// A loopback port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// PEM of DER certificates, in order.
pub fn pem_chain(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
        .collect()
}

/// `openssl verify -x509_strict -purpose any` of `leaf` against `roots` with `untrusted` intermediates: Ok, or
/// openssl's words.
pub fn openssl_verify(roots: &[Vec<u8>], untrusted: &[Vec<u8>], leaf: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, ders: &[Vec<u8>]| -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, pem_chain(ders)).unwrap();
        path
    };
    let root = write("root.pem", roots);
    let leaf = write("leaf.pem", &[leaf.to_vec()]);
    let mut cmd = Command::new("openssl");
    cmd.args(["verify", "-x509_strict", "-purpose", "any", "-CAfile"])
        .arg(&root);
    if !untrusted.is_empty() {
        cmd.arg("-untrusted").arg(write("chain.pem", untrusted));
    }
    let out = cmd.arg(&leaf).output().expect("running openssl");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `der` with one byte of its signature value flipped (the last byte of a certificate is the signature's last
/// byte, for ECDSA, Ed25519 and RSA alike): still parses, must no longer verify.
pub fn corrupt_signature(der: &[u8]) -> Vec<u8> {
    let mut bad = der.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    bad
}
