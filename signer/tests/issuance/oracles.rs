//! More independent verifiers, run over the same chains: Go's crypto/x509 (the parser and chain builder SPIRE and
//! go-spiffe use) and Python cryptography's RFC 5280 client verifier. Each runs only if its tool is present on the
//! machine (asked, not guessed); openssl and the spiffe crate in the other modules are always required.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rcgen::PublicKeyData as _;
use signet::keys::{AuthorityKey, KeyType, SoftwareKey};
use signet::spiffe::SpiffeId;
use signet::x509::{Authority, LeafRequest};

use crate::common::*;

const GO_VERIFIER: &str = r#"package main

import (
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

func load(p string) *x509.Certificate {
	b, err := os.ReadFile(p)
	if err != nil { panic(err) }
	c, err := x509.ParseCertificate(b)
	if err != nil { fmt.Printf("FAIL %s: parse: %v\n", p, err); os.Exit(1) }
	return c
}

func main() {
	dirs, _ := filepath.Glob(filepath.Join(os.Args[1], "case-*"))
	sort.Strings(dirs)
	failed := false
	for _, d := range dirs {
		roots := x509.NewCertPool()
		roots.AddCert(load(filepath.Join(d, "root.der")))
		inter := x509.NewCertPool()
		ims, _ := filepath.Glob(filepath.Join(d, "inter-*.der"))
		for _, p := range ims {
			c := load(p)
			if !c.BasicConstraintsValid || !c.IsCA { fmt.Printf("FAIL %s: %s is not a CA\n", d, p); failed = true }
			inter.AddCert(c)
		}
		leaf := load(filepath.Join(d, "leaf.der"))
		_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		if err != nil { fmt.Printf("FAIL %s: verify: %v\n", d, err); failed = true; continue }
		if len(leaf.URIs) != 1 || leaf.URIs[0].Scheme != "spiffe" || leaf.IsCA || strings.ToLower(leaf.URIs[0].Host) != leaf.URIs[0].Host {
			fmt.Printf("FAIL %s: not an X509-SVID leaf\n", d); failed = true; continue
		}
		fmt.Printf("ok %s\n", filepath.Base(d))
	}
	if failed || len(dirs) == 0 { os.Exit(1) }
}
"#;

const PY_VERIFIER: &str = r#"
import glob, os, sys
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
bad = 0
dirs = sorted(glob.glob(os.path.join(sys.argv[1], "case-*")))
for d in dirs:
    load = lambda p: x509.load_der_x509_certificate(open(p, "rb").read())
    root = load(os.path.join(d, "root.der"))
    inters = [load(p) for p in sorted(glob.glob(os.path.join(d, "inter-*.der")))]
    leaf = load(os.path.join(d, "leaf.der"))
    try:
        PolicyBuilder().store(Store([root])).build_client_verifier().verify(leaf, inters)
        print("ok", os.path.basename(d))
    except Exception as e:
        print("FAIL", d, repr(e)); bad += 1
sys.exit(1 if bad or not dirs else 0)
"#;

fn write_case(dir: &Path, n: usize, roots: &[Vec<u8>], chain: &[Vec<u8>], leaf: &[u8]) {
    let d = dir.join(format!("case-{n:02}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("root.der"), &roots[0]).unwrap();
    for (i, c) in chain.iter().enumerate() {
        std::fs::write(d.join(format!("inter-{i}.der")), c).unwrap();
    }
    std::fs::write(d.join("leaf.der"), leaf).unwrap();
}

fn leaf_under(a: &Authority, path: &str) -> Vec<u8> {
    let wl = workload_key(KeyType::EcP256);
    let id = SpiffeId::parse(&format!("spiffe://example.org/{path}")).unwrap();
    let req = LeafRequest::from_spki(id, &wl.subject_public_key_info(), Duration::from_secs(300))
        .unwrap();
    a.issue_x509_svid(&req, now()).unwrap().der
}

/// Chains for every authority key type: root -> leaf, and root -> SPIRE CA -> leaf. Returns the key type per case.
fn build_cases(factory: &dyn KeyFactory, dir: &Path) -> Vec<KeyType> {
    let mut kinds = Vec::new();
    for kt in KeyType::ALL {
        let Some(root) = root(factory, kt) else {
            continue;
        };
        let leaf = leaf_under(&root, "direct");
        write_case(dir, kinds.len(), root.roots(), &root.chain(), &leaf);
        kinds.push(kt);

        let (spire_key, pkcs8) = SoftwareKey::generate(KeyType::EcP256).unwrap();
        let kp = rcgen::KeyPair::try_from(pkcs8.0.as_slice()).unwrap();
        let csr_der = csr(&kp, &["spiffe://example.org"], &[], spire_subject());
        let minted = root.mint_spire_ca(&csr_der, 3600, None, now()).unwrap();
        let spire = Authority::new(
            minted.x509_ca_chain[0].clone(),
            Arc::new(spire_key) as Arc<dyn AuthorityKey>,
            td(),
            minted.x509_ca_chain[1..].to_vec(),
            minted.upstream_x509_roots.clone(),
        )
        .unwrap();
        let leaf = leaf_under(&spire, "under-spire");
        write_case(dir, kinds.len(), spire.roots(), &spire.chain(), &leaf);
        kinds.push(kt);
    }
    kinds
}

/// One chain whose leaf was issued by a different root than the one presented: every oracle must refuse it.
fn mismatched_case(dir: &Path) {
    let a = root(&SoftwareKeys, KeyType::EcP256).unwrap();
    let b = root(&SoftwareKeys, KeyType::EcP256).unwrap();
    write_case(dir, 0, a.roots(), &[], &leaf_under(&b, "w"));
}

/// Run a verifier command over a directory of cases: (success, output).
fn run_over(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn tool_works(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn go_crypto_x509_accepts_every_chain() {
    if !tool_works("go", &["version"]) {
        eprintln!("go is not installed: Go crypto/x509 oracle not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    build_cases(&SoftwareKeys, dir.path());
    let src = dir.path().join("verify.go");
    std::fs::write(&src, GO_VERIFIER).unwrap();
    let go = |cases: &Path| {
        let mut c = Command::new("go");
        c.args(["run", src.to_str().unwrap(), cases.to_str().unwrap()])
            .env("GOTOOLCHAIN", "local")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("GO111MODULE", "off");
        run_over(&mut c)
    };
    let (ok, text) = go(dir.path());
    assert!(ok, "Go crypto/x509 rejects a chain:\n{text}");
    assert_eq!(
        text.matches("ok case-").count(),
        2 * KeyType::ALL.len(),
        "{text}"
    );
    let bad = tempfile::tempdir().unwrap();
    mismatched_case(bad.path());
    let (ok, text) = go(bad.path());
    assert!(
        !ok && text.contains("FAIL"),
        "Go accepted a leaf under the wrong root: {text}"
    );
}

#[test]
fn python_cryptography_accepts_every_chain_it_supports() {
    if !tool_works("python3", &["-c", "import cryptography.x509.verification"]) {
        eprintln!("python3 cryptography (>= 42) is not installed: its RFC 5280 oracle not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kinds = build_cases(&SoftwareKeys, dir.path());
    // cryptography's verifier implements the Web PKI's algorithm list, which has no Ed25519: leave those out.
    for (i, kt) in kinds.iter().enumerate() {
        if *kt == KeyType::Ed25519 {
            std::fs::remove_dir_all(dir.path().join(format!("case-{i:02}"))).unwrap();
        }
    }
    let script = dir.path().join("verify.py");
    std::fs::write(&script, PY_VERIFIER).unwrap();
    let py = |cases: &Path| {
        run_over(Command::new("python3").args([script.to_str().unwrap(), cases.to_str().unwrap()]))
    };
    let (ok, text) = py(dir.path());
    assert!(ok, "Python cryptography rejects a chain:\n{text}");
    assert_eq!(
        text.matches("ok case-").count(),
        2 * (KeyType::ALL.len() - 1),
        "{text}"
    );
    let bad = tempfile::tempdir().unwrap();
    mismatched_case(bad.path());
    let (ok, text) = py(bad.path());
    assert!(
        !ok && text.contains("FAIL"),
        "Python accepted a leaf under the wrong root: {text}"
    );
}
