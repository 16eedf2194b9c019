//! The independent judges: Go's crypto/x509 (the parser and chain builder SPIRE and go-spiffe use) and Python
//! `cryptography`'s RFC 5280 client verifier, each run over a directory of cases (`case-NN/root.der`,
//! `inter-N.der`, `leaf.der`; [`write_case`]). A judge that is not installed fails the test under its REQUIRE
//! variable ([`Judge::require_env`]; `scripts/test` sets them), else the test says SKIP loudly.

use std::path::Path;
use std::process::Command;

/// One independent verifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judge {
    /// Go's crypto/x509 (`go run`, offline, no modules).
    Go,
    /// Python `cryptography` (>= 42: `cryptography.x509.verification`).
    Python,
}

impl Judge {
    /// The judge's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Judge::Go => "Go crypto/x509",
            Judge::Python => "Python cryptography",
        }
    }

    /// The variable that makes a missing judge a failure.
    pub fn require_env(self) -> &'static str {
        match self {
            Judge::Go => "SIGNET_REQUIRE_GO",
            Judge::Python => "SIGNET_REQUIRE_PYTHON_CRYPTOGRAPHY",
        }
    }

    /// Whether the judge can run here; fails the test when it cannot and [`Self::require_env`] is set.
    pub fn available(self, test: &str) -> bool {
        let present = match self {
            Judge::Go => super::tool_runs("go", &["version"]),
            Judge::Python => {
                super::tool_runs("python3", &["-c", "import cryptography.x509.verification"])
            }
        };
        super::required(test, self.name(), self.require_env(), present)
    }

    /// Runs the judge over the cases in `cases`: (every case accepted, its output: `ok case-NN` or `FAIL ...` a
    /// case).
    pub fn judge(self, cases: &Path) -> (bool, String) {
        let work = tempfile::tempdir().unwrap();
        let mut cmd = match self {
            Judge::Go => {
                let src = work.path().join("verify.go");
                std::fs::write(&src, GO_VERIFIER).unwrap();
                let mut c = Command::new("go");
                c.arg("run")
                    .arg(&src)
                    .arg(cases)
                    .env("GOTOOLCHAIN", "local")
                    .env("GOPROXY", "off")
                    .env("GOFLAGS", "")
                    .env("GO111MODULE", "off");
                c
            }
            Judge::Python => {
                let script = work.path().join("verify.py");
                std::fs::write(&script, PY_VERIFIER).unwrap();
                let mut c = Command::new("python3");
                c.arg(&script).arg(cases);
                c
            }
        };
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

/// Writes case `n` under `dir`: the first of `roots`, the intermediates `chain` (leaf's issuer first) and `leaf`.
pub fn write_case(dir: &Path, n: usize, roots: &[Vec<u8>], chain: &[Vec<u8>], leaf: &[u8]) {
    let d = dir.join(format!("case-{n:02}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("root.der"), &roots[0]).unwrap();
    for (i, c) in chain.iter().enumerate() {
        std::fs::write(d.join(format!("inter-{i}.der")), c).unwrap();
    }
    std::fs::write(d.join("leaf.der"), leaf).unwrap();
}

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
