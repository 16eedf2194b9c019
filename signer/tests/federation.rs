//! SPIFFE federation end to end: two appliances with different trust domains serve their bundle endpoints
//! (https_web and https_spiffe) and fetch each other's bundles over 127.0.0.1; `curl` and the `spiffe` crate read
//! the endpoint independently; a foreign endpoint that misbehaves is refused with the last good bundle kept.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test fixtures and shared test code outside #[test] fns: a failed fixture is a failed test"
)]

mod support;

use std::convert::Infallible;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::Full;
use hyper::body::Bytes;
use signet::bundle::JwtKey;
use signet::config::{
    Config, ConfigDuration, EndpointProfile, FederatedTrustDomain, PinConfig, TokenSettings,
};
use signet::federation::FederatedBundle;
use signet::serve::Appliance;
use signet::spiffe::{BundleDocument, JwtAuthority, TrustDomain, X509Authority};
use signet_pkcs11::testing::SoftHsm;
use support::free_port;
use tokio_rustls::rustls;

/// The refresh hint both appliances publish in these tests.
const HINT: Duration = Duration::from_secs(2);

struct Node {
    app: Appliance,
    dir: tempfile::TempDir,
    _hsm: SoftHsm,
}

fn config(td: &str, hsm: &SoftHsm, dir: &Path) -> Config {
    let pin = dir.join("pin");
    std::fs::write(&pin, signet_pkcs11::testing::USER_PIN).unwrap();
    let mut cfg = Config::embedded_default();
    cfg.trust_domain = td.into();
    cfg.data_dir = dir.join("data");
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.metrics = None;
    cfg.pipeline.cpu_threads = 2;
    cfg.tokens = vec![TokenSettings {
        name: "softhsm".into(),
        module: hsm.module().to_path_buf(),
        token: Some(hsm.label().to_string()),
        serial: None,
        pin: PinConfig::File(pin),
        sessions: 1,
    }];
    cfg.policy[0].caller = format!("spiffe://{td}/signet/admin");
    cfg.policy[0].ids = vec![format!("spiffe://{td}/")];
    cfg.policy.truncate(1);
    cfg.server.bootstrap_listen = None;
    cfg.federation.refresh_hint = ConfigDuration(HINT);
    cfg.federation.refresh_floor = ConfigDuration(Duration::from_secs(1));
    cfg.federation.fetch_timeout = ConfigDuration(Duration::from_secs(5));
    cfg
}

async fn start(td: &str, tweak: impl FnOnce(&mut Config, &Path)) -> Option<Node> {
    let hsm = SoftHsm::new()?;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(td, &hsm, dir.path());
    tweak(&mut cfg, dir.path());
    let app = Appliance::start(cfg).await.expect("the appliance starts");
    Some(Node {
        app,
        dir,
        _hsm: hsm,
    })
}

/// A web PKI for https_web: a CA and a server certificate for 127.0.0.1, written as PEM files in `dir`
/// (`ca.pem`, `web.pem`, `web.key`).
fn web_pki(dir: &Path, name: &str) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("web.pem"), leaf_cert.pem()).unwrap();
    std::fs::write(dir.join("web.key"), leaf_key.serialize_pem()).unwrap();
}

/// Waits (at most `limit`) until `f` holds for the federated bundle of `td` in `node`.
async fn wait_for(
    node: &Node,
    td: &str,
    limit: Duration,
    f: impl Fn(&FederatedBundle) -> bool,
) -> FederatedBundle {
    let td = TrustDomain::parse(td).unwrap();
    support::wait::wait_for_async(
        &format!("the federated bundle of {td} reached the state the test waits for"),
        limit,
        || {
            let e = node
                .app
                .federated_bundles()
                .get(&td)
                .expect("the trust domain is configured");
            let found = if f(&e) { Ok(e) } else { Err(format!("{e:?}")) };
            async move { found }
        },
    )
    .await
}

fn roots_of(doc: &BundleDocument) -> Vec<Vec<u8>> {
    doc.x509_authorities
        .iter()
        .map(|a| a.cert_der().to_vec())
        .collect()
}

fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl runs (install the Debian package curl)");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Parses a bundle endpoint's JSON with serde_json and the `spiffe` crate only (not signet's parser): returns the
/// X.509 roots, the JWT kids, the sequence and the refresh hint.
fn independent_read(td: &str, json: &str) -> (Vec<Vec<u8>>, Vec<String>, u64, u64) {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let td = spiffe::TrustDomain::new(td).unwrap();
    let mut ders = Vec::new();
    let mut jwt = Vec::new();
    for k in v["keys"].as_array().expect("keys is an array") {
        match k["use"].as_str().unwrap() {
            "x509-svid" => {
                assert!(k.get("kid").is_none(), "x509-svid entries carry no kid");
                let x5c = k["x5c"].as_array().unwrap();
                assert_eq!(x5c.len(), 1);
                ders.push(
                    base64::engine::general_purpose::STANDARD
                        .decode(x5c[0].as_str().unwrap())
                        .unwrap(),
                );
            }
            "jwt-svid" => jwt.push(k.clone()),
            other => panic!("unexpected use {other}"),
        }
    }
    let refs: Vec<&[u8]> = ders.iter().map(Vec::as_slice).collect();
    let x = spiffe::X509Bundle::from_x509_authorities(td.clone(), &refs).unwrap();
    assert_eq!(x.authorities().len(), ders.len());
    let jwks = serde_json::json!({ "keys": jwt }).to_string();
    let j = spiffe::JwtBundle::from_jwt_authorities(td, jwks.as_bytes()).unwrap();
    let kids: Vec<String> = jwt
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    for kid in &kids {
        assert!(j.find_jwt_authority(kid).is_some(), "kid {kid} lost");
    }
    (
        ders,
        kids,
        v["spiffe_sequence"].as_u64().expect("spiffe_sequence"),
        v["spiffe_refresh_hint"]
            .as_u64()
            .expect("spiffe_refresh_hint"),
    )
}

/// Builds SPIRE's bundle endpoint client (tests/oracles/spire_bundle_client.go) from the local Go module cache, or
/// says why not and returns `None` (Go or the SPIRE module missing: this oracle is then not run), failing the test
/// instead under SIGNET_REQUIRE_GO.
fn spire_bundle_client(dir: &Path) -> Option<std::path::PathBuf> {
    let src = dir.join("spire-client");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("go.mod"),
        "module signetoracle\n\ngo 1.25\n\nrequire (\n\tgithub.com/spiffe/go-spiffe/v2 v2.8.1\n\tgithub.com/spiffe/spire v1.15.3\n)\n",
    )
    .unwrap();
    std::fs::write(
        src.join("main.go"),
        include_str!("oracles/spire_bundle_client.go"),
    )
    .unwrap();
    let bin = dir.join("spire-bundle-client");
    let out = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(&src)
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOSUMDB", "off")
        .env("GOFLAGS", "-mod=mod")
        .output();
    let present = match out {
        Ok(o) if o.status.success() => return Some(bin),
        Ok(o) => Err(format!(
            "it cannot be built offline (SPIRE v1.15.3 not in the Go module cache?): {}",
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("go is not installed ({e})")),
    };
    support::required(
        "federation",
        "SPIRE's bundle endpoint client",
        "SIGNET_REQUIRE_GO",
        present,
    );
    None
}

fn fresh_jwt_key(kid: &str) -> JwtKey {
    let kp = rcgen::KeyPair::generate().unwrap();
    JwtKey {
        kid: kid.into(),
        spki: rcgen::PublicKeyData::subject_public_key_info(&kp),
        expires_at: 0,
        tainted: false,
        owner: signet::bundle::KeyOwner::Publisher("spiffe://test/spire".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trust_domains_federate_and_a_bundle_change_arrives_within_two_hints() {
    // alpha serves https_web on a port chosen now (beta needs its URL before alpha exists); beta serves
    // https_spiffe, and alpha authenticates it with beta's bundle as the bootstrap bundle.
    let alpha_port = free_port();
    let web_dir = tempfile::tempdir().unwrap();
    web_pki(web_dir.path(), "alpha");
    let ca = web_dir.path().join("ca.pem");
    let Some(beta) = start("beta.test", |c, _| {
        c.federation.listen = Some("127.0.0.1:0".parse().unwrap());
        c.federation.profile = EndpointProfile::HttpsSpiffe;
        c.federation.trust_domains = vec![FederatedTrustDomain {
            trust_domain: "alpha.test".into(),
            endpoint: format!("https://127.0.0.1:{alpha_port}"),
            profile: EndpointProfile::HttpsWeb,
            ca: Some(ca.clone()),
            endpoint_spiffe_id: None,
            bootstrap_bundle: None,
        }];
    })
    .await
    else {
        return;
    };
    let beta_addr = beta
        .app
        .federation_addr()
        .expect("beta serves its endpoint");
    let beta_bundle = beta
        .app
        .bundle()
        .current()
        .document()
        .unwrap()
        .to_json()
        .unwrap();
    let bootstrap = web_dir.path().join("beta-bootstrap.json");
    std::fs::write(&bootstrap, &beta_bundle).unwrap();
    let web = web_dir.path().to_path_buf();
    let Some(alpha) = start("alpha.test", |c, _| {
        c.federation.listen = Some(format!("127.0.0.1:{alpha_port}").parse().unwrap());
        c.federation.profile = EndpointProfile::HttpsWeb;
        c.federation.cert = Some(web.join("web.pem"));
        c.federation.key = Some(web.join("web.key"));
        c.federation.trust_domains = vec![FederatedTrustDomain {
            trust_domain: "beta.test".into(),
            endpoint: format!("https://{beta_addr}"),
            profile: EndpointProfile::HttpsSpiffe,
            ca: None,
            endpoint_spiffe_id: Some("spiffe://beta.test/signet/server".into()),
            bootstrap_bundle: Some(bootstrap.clone()),
        }];
    })
    .await
    else {
        return;
    };

    // Each fetches the other's bundle.
    let limit = Duration::from_secs(30);
    let a_in_b = wait_for(&beta, "alpha.test", limit, |e| {
        e.bundle.as_ref().is_some_and(|b| b.source == "endpoint")
    })
    .await;
    let b_in_a = wait_for(&alpha, "beta.test", limit, |e| {
        e.bundle.as_ref().is_some_and(|b| b.source == "endpoint")
    })
    .await;
    let a_doc = &a_in_b.bundle.unwrap().document;
    let b_doc = &b_in_a.bundle.unwrap().document;
    assert_eq!(roots_of(a_doc), alpha.app.bundle().current().x509_roots);
    assert_eq!(roots_of(b_doc), beta.app.bundle().current().x509_roots);
    assert_eq!(a_doc.sequence, alpha.app.bundle().current().sequence);
    assert_eq!(a_doc.refresh_hint_secs, Some(HINT.as_secs()));
    // Never merged: each appliance's own bundle holds its own root only.
    assert_eq!(alpha.app.bundle().current().x509_roots.len(), 1);
    assert_eq!(beta.app.bundle().current().x509_roots.len(), 1);

    // SPIRE's own bundle endpoint client reads both endpoints: alpha's https_web (the test CA as the system roots)
    // and beta's https_spiffe (beta's roots, endpoint ID spiffe://beta.test/signet/server).
    if let Some(spire) = spire_bundle_client(web_dir.path()) {
        let out = Command::new(&spire)
            .args(["alpha.test", &format!("https://127.0.0.1:{alpha_port}")])
            .env("SSL_CERT_FILE", &ca)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "SPIRE cannot read the https_web endpoint: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let now = alpha.app.bundle().current();
        assert_eq!(
            text.trim(),
            format!(
                "x509=1 jwt={} refresh_hint={}s",
                now.jwt_keys.len(),
                HINT.as_secs()
            )
        );
        let beta_roots = web_dir.path().join("beta-roots.pem");
        std::fs::write(
            &beta_roots,
            std::fs::read(&beta.app.paths().bundle).unwrap(),
        )
        .unwrap();
        let spiffe_auth = |id: &str| {
            Command::new(&spire)
                .args(["beta.test", &format!("https://{beta_addr}"), id])
                .arg(&beta_roots)
                .output()
                .unwrap()
        };
        let out = spiffe_auth("spiffe://beta.test/signet/server");
        assert!(
            out.status.success(),
            "SPIRE cannot read the https_spiffe endpoint: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("x509=1 "));
        // The oracle can fail: another endpoint SPIFFE ID is refused.
        assert!(!spiffe_auth("spiffe://beta.test/other").status.success());

        // And it judges what the appliance issued from its token: beta's endpoint X509-SVID (and its bundle),
        // presented by a stand-in endpoint, is accepted as it is and refused with one byte of its signature
        // flipped.
        let (chain, _) = signet::federation::endpoint::load_pem(
            &beta.app.paths().server_cert,
            &beta.app.paths().server_key,
        )
        .unwrap();
        let presenting = |chain: Vec<Vec<u8>>| {
            let (_, key) = signet::federation::endpoint::load_pem(
                &beta.app.paths().server_cert,
                &beta.app.paths().server_key,
            )
            .unwrap();
            Arc::new(signet::federation::endpoint::tls_config(chain, key).unwrap())
        };
        let stand_in = Fake {
            body: Arc::new(Mutex::new(beta_bundle.clone().into_bytes())),
            status: Arc::new(Mutex::new(200)),
            hang: Arc::default(),
            tls: Arc::new(Mutex::new(presenting(chain.clone()))),
        };
        let stand_in_addr = fake_endpoint(stand_in.clone()).await;
        let judge = || {
            Command::new(&spire)
                .args([
                    "beta.test",
                    &format!("https://{stand_in_addr}"),
                    "spiffe://beta.test/signet/server",
                ])
                .arg(&beta_roots)
                .output()
                .unwrap()
        };
        let out = judge();
        assert!(
            out.status.success(),
            "SPIRE refuses beta's own X509-SVID: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut broken = chain.clone();
        broken[0] = support::corrupt_signature(&chain[0]);
        *stand_in.tls.lock().unwrap() = presenting(broken);
        let out = judge();
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "SPIRE accepted an endpoint X509-SVID with a corrupted signature: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            why.contains("certificate") || why.contains("x509"),
            "SPIRE refused for another reason than the certificate: {why}"
        );
    }

    // An unchanged bundle is re-validated with a conditional request (304): fetches go on, the sequence stays.
    let seen = a_in_b.unchanged;
    let later = wait_for(&beta, "alpha.test", limit, |e| e.unchanged >= seen + 2).await;
    assert_eq!(later.bundle.unwrap().document.sequence, a_doc.sequence);
    assert!(later.last_failure.is_none(), "{:?}", later.last_failure);

    // A change of alpha's bundle (a new JWT key, as a SPIRE server publishing its key or a rotation would make)
    // reaches beta (waited for, within a generous bound; the time it took is reported, not asserted: it is about
    // one or two refresh hints).
    let changed_at = Instant::now();
    assert!(
        alpha
            .app
            .bundle()
            .publish_jwt_key(fresh_jwt_key("rotated-1"))
            .unwrap()
    );
    let want = alpha.app.bundle().current().sequence;
    let got = wait_for(&beta, "alpha.test", limit, |e| {
        e.bundle
            .as_ref()
            .is_some_and(|b| b.document.sequence == want)
    })
    .await;
    let took = changed_at.elapsed();
    let doc = got.bundle.unwrap().document;
    assert!(doc.jwt_authorities.iter().any(|a| a.kid() == "rotated-1"));
    println!(
        "bundle change reached the other trust domain in {took:?} = {:.2} refresh hints (hint {HINT:?})",
        took.as_secs_f64() / HINT.as_secs_f64()
    );

    // `signet bundle --federated` (the binary, through the Admin API) shows the federated bundles.
    let data = alpha.dir.path().join("data");
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_signet"))
            .args(["bundle", "--data-dir"])
            .arg(&data)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "signet bundle {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let one = cli(&["--federated", "beta.test"]);
    let (roots, _, _, _) = independent_read("beta.test", one.trim());
    assert_eq!(roots, beta.app.bundle().current().x509_roots);
    let all: serde_json::Value = serde_json::from_str(&cli(&["--federated"])).unwrap();
    let obj = all.as_object().unwrap();
    assert_eq!(obj.keys().collect::<Vec<_>>(), vec!["beta.test"]);
    assert!(obj["beta.test"].get("spiffe_refresh_hint").is_none());
    let pem_out = cli(&["--federated", "beta.test", "--format", "pem"]);
    assert_eq!(pem::parse_many(pem_out).unwrap().len(), 1);
    let out = Command::new(env!("CARGO_BIN_EXE_signet"))
        .args(["bundle", "--data-dir"])
        .arg(&data)
        .args(["--federated", "gamma.test"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("gamma.test"));

    // A root rotation on alpha (`signet rotate prepare` + `publish`, the real binary, through the Admin API)
    // reaches beta (waited for; the time is reported, not asserted): beta's copy of alpha's bundle then holds the old and the new root.
    let rotate = |step: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_signet"))
            .args(["rotate", step, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "signet rotate {step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    rotate("prepare");
    let rotated_at = Instant::now();
    rotate("publish");
    let mut roots_now = alpha.app.bundle().current().x509_roots.clone();
    roots_now.sort();
    assert_eq!(roots_now.len(), 2, "alpha's bundle holds both roots");
    let got = wait_for(&beta, "alpha.test", limit, |e| {
        e.bundle.as_ref().is_some_and(|b| {
            let mut r = roots_of(&b.document);
            r.sort();
            r == roots_now
        })
    })
    .await;
    let took = rotated_at.elapsed();
    assert!(got.last_failure.is_none(), "{:?}", got.last_failure);
    println!(
        "root rotation (publish) reached the other trust domain in {took:?} = {:.2} refresh hints (hint {HINT:?})",
        took.as_secs_f64() / HINT.as_secs_f64()
    );

    alpha.app.shutdown().await.unwrap();
    beta.app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_the_spiffe_crate_read_the_https_web_endpoint() {
    let web_dir = tempfile::tempdir().unwrap();
    web_pki(web_dir.path(), "alpha");
    let web = web_dir.path().to_path_buf();
    let Some(node) = start("alpha.test", |c, _| {
        c.federation.listen = Some("127.0.0.1:0".parse().unwrap());
        c.federation.cert = Some(web.join("web.pem"));
        c.federation.key = Some(web.join("web.key"));
    })
    .await
    else {
        return;
    };
    let addr = node.app.federation_addr().unwrap();
    let url = format!("https://127.0.0.1:{}/", addr.port());
    let ca = web.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let (body, _) = curl(&["--cacert", ca, &url]);
    let (roots, kids, seq, hint) = independent_read("alpha.test", &body);
    let now = node.app.bundle().current();
    assert_eq!(roots, now.x509_roots);
    assert_eq!(kids.len(), now.jwt_keys.len());
    assert_eq!(seq, now.sequence);
    assert_eq!(hint, HINT.as_secs());

    // Headers: JSON content type and an ETag; If-None-Match with it gives 304 and no body.
    let (head, _) = curl(&["--cacert", ca, "-D", "-", "-o", "/dev/null", &url]);
    let lower = head.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200"), "{head}");
    assert!(lower.contains("content-type: application/json"), "{head}");
    let etag = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("etag:")
                .then(|| l[5..].trim().to_string())
        })
        .expect("an ETag header");
    let inm = format!("If-None-Match: {etag}");
    let (out, _) = curl(&[
        "--cacert",
        ca,
        "-H",
        &inm,
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &url,
    ]);
    assert_eq!(out, "304");
    // A change gives a new tag and a 200 again.
    node.app
        .bundle()
        .publish_jwt_key(fresh_jwt_key("k2"))
        .unwrap();
    let (out, _) = curl(&[
        "--cacert",
        ca,
        "-H",
        &inm,
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &url,
    ]);
    assert_eq!(out, "200");
    // Other paths and methods are refused; a client that does not trust the CA fails the handshake.
    let (out, _) = curl(&[
        "--cacert",
        ca,
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &format!("{url}x"),
    ]);
    assert_eq!(out, "404");
    let (out, _) = curl(&[
        "--cacert",
        ca,
        "-X",
        "POST",
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &url,
    ]);
    assert_eq!(out, "405");
    let refused = Command::new("curl")
        .args(["-sS", "--max-time", "10", &url])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    // Mozilla "intermediate": TLS 1.0/1.1 are refused, TLS 1.2 works.
    let (out, _) = curl(&[
        "--cacert",
        ca,
        "--tlsv1.2",
        "--tls-max",
        "1.2",
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &url,
    ]);
    assert_eq!(out, "200");
    let old = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            ca,
            "--tlsv1.0",
            "--tls-max",
            "1.1",
            &url,
        ])
        .output()
        .unwrap();
    assert!(!old.status.success());
    node.app.shutdown().await.unwrap();
}

/// The log lines of this test process (the appliances log through `tracing`).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

fn logs() -> &'static Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let l = Logs::default();
        let _ = tracing_subscriber::fmt()
            .with_writer(l.clone())
            .with_ansi(false)
            .with_env_filter("signet=info")
            .try_init();
        l
    })
}

/// A foreign bundle endpoint the test controls: what it answers and which certificate it presents.
#[derive(Clone)]
struct Fake {
    body: Arc<Mutex<Vec<u8>>>,
    status: Arc<Mutex<u16>>,
    hang: Arc<std::sync::atomic::AtomicBool>,
    tls: Arc<Mutex<Arc<rustls::ServerConfig>>>,
}

fn fake_tls(dir: &Path) -> Arc<rustls::ServerConfig> {
    let (chain, key) =
        signet::federation::endpoint::load_pem(&dir.join("web.pem"), &dir.join("web.key")).unwrap();
    Arc::new(signet::federation::endpoint::tls_config(chain, key).unwrap())
}

async fn fake_endpoint(fake: Fake) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let fake = fake.clone();
            tokio::spawn(async move {
                let cfg = fake.tls.lock().unwrap().clone();
                let Ok(tls) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| {
                    let body = fake.body.lock().unwrap().clone();
                    let status = *fake.status.lock().unwrap();
                    let hang = fake.hang.load(std::sync::atomic::Ordering::SeqCst);
                    async move {
                        if hang {
                            // The thing under test: an endpoint that never answers (the poller's timeout ends it).
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// A bundle of `td` with one root (its URI SAN names `td`) and refresh hint 1 s.
fn foreign_bundle(td: &str, sequence: u64) -> String {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(format!("spiffe://{td}")).unwrap(),
    )];
    let kp = rcgen::KeyPair::generate().unwrap();
    let cert = p.self_signed(&kp).unwrap();
    BundleDocument {
        sequence,
        refresh_hint_secs: Some(1),
        x509_authorities: vec![X509Authority::new(cert.der().to_vec()).unwrap()],
        jwt_authorities: Vec::new(),
    }
    .to_json()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_endpoint_is_refused_and_the_last_good_bundle_kept() {
    let logs = logs();
    let good_pki = tempfile::tempdir().unwrap();
    web_pki(good_pki.path(), "gamma");
    let other_pki = tempfile::tempdir().unwrap();
    web_pki(other_pki.path(), "stranger");
    let good = foreign_bundle("gamma.test", 7);
    let fake = Fake {
        body: Arc::new(Mutex::new(good.clone().into_bytes())),
        status: Arc::new(Mutex::new(200)),
        hang: Arc::default(),
        tls: Arc::new(Mutex::new(fake_tls(good_pki.path()))),
    };
    let addr = fake_endpoint(fake.clone()).await;
    let ca = good_pki.path().join("ca.pem");
    let Some(node) = start("alpha.test", |c, _| {
        c.server.metrics = Some("127.0.0.1:0".into());
        c.federation.max_bundle_bytes = 4096;
        c.federation.fetch_timeout = ConfigDuration(Duration::from_secs(2));
        c.federation.trust_domains = vec![FederatedTrustDomain {
            trust_domain: "gamma.test".into(),
            endpoint: format!("https://{addr}"),
            profile: EndpointProfile::HttpsWeb,
            ca: Some(ca.clone()),
            endpoint_spiffe_id: None,
            bootstrap_bundle: None,
        }];
    })
    .await
    else {
        return;
    };
    let limit = Duration::from_secs(20);
    let first = wait_for(&node, "gamma.test", limit, |e| e.bundle.is_some()).await;
    let kept = first.bundle.unwrap().document;
    assert_eq!(kept.sequence, 7);

    // A bundle that passes itself off as gamma's but holds our own JWT key (JWT keys name no trust domain).
    let own_jwt = node.app.bundle().current().jwt_keys[0].clone();
    let mut ours = BundleDocument::parse(good.as_bytes()).unwrap();
    ours.sequence = 8;
    ours.jwt_authorities = vec![JwtAuthority::new(own_jwt.kid, own_jwt.spki).unwrap()];
    let ours = ours.to_json().unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"<html>this is not a bundle</html>".to_vec()),
        ("garbage", br#"{"spiffe_sequence": 9}"#.to_vec()),
        (
            "wrong_trust_domain",
            foreign_bundle("delta.test", 10).into_bytes(),
        ),
        ("wrong_trust_domain", ours.into_bytes()),
        ("too_large", vec![b' '; 5000]),
    ];
    for (reason, body) in cases {
        *fake.body.lock().unwrap() = body;
        let before = node
            .app
            .federated_bundles()
            .get(&TrustDomain::parse("gamma.test").unwrap())
            .unwrap()
            .failures;
        let e = wait_for(&node, "gamma.test", limit, |e| {
            e.failures > before && e.last_failure.as_ref().is_some_and(|f| f.reason == reason)
        })
        .await;
        assert_eq!(
            e.bundle.unwrap().document,
            kept,
            "{reason}: the last good bundle is kept"
        );
    }
    // An error status, then an endpoint that accepts the request and never answers.
    *fake.body.lock().unwrap() = good.clone().into_bytes();
    *fake.status.lock().unwrap() = 500;
    let e = wait_for(&node, "gamma.test", limit, |e| {
        e.last_failure
            .as_ref()
            .is_some_and(|f| f.reason == "status")
    })
    .await;
    assert!(e.last_failure.unwrap().message.contains("500"));
    *fake.status.lock().unwrap() = 200;
    fake.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = wait_for(&node, "gamma.test", limit, |e| {
        e.last_failure
            .as_ref()
            .is_some_and(|f| f.reason == "timeout")
    })
    .await;
    assert_eq!(e.bundle.unwrap().document, kept);
    fake.hang.store(false, std::sync::atomic::Ordering::SeqCst);
    // A TLS failure: the endpoint now presents a certificate from a CA the configuration does not trust.
    *fake.body.lock().unwrap() = good.clone().into_bytes();
    *fake.tls.lock().unwrap() = fake_tls(other_pki.path());
    let e = wait_for(&node, "gamma.test", limit, |e| {
        e.last_failure.as_ref().is_some_and(|f| f.reason == "tls")
    })
    .await;
    assert!(e.last_failure.unwrap().message.contains("TLS"));
    assert_eq!(e.bundle.unwrap().document, kept);

    // Each refusal is a warning in the log that names the trust domain, the reason and what was wrong.
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    for (reason, detail) in [
        ("garbage", "not a SPIFFE bundle document"),
        (
            "wrong_trust_domain",
            "belongs to trust domain delta.test, not gamma.test",
        ),
        (
            "wrong_trust_domain",
            "is one of our own trust domain's keys",
        ),
        (
            "too_large",
            "larger than federation.max_bundle_bytes = 4096",
        ),
        ("tls", "TLS with"),
    ] {
        assert!(
            text.lines().any(|l| l.contains("WARN")
                && l.contains("federated bundle fetch failed; the last good bundle is kept")
                && l.contains("gamma.test")
                && l.contains(reason)
                && l.contains(detail)),
            "no log line for {reason} ({detail}) in:\n{text}"
        );
    }

    // The failures are counted by reason on /metrics.
    let metrics_url = format!("http://{}/metrics", node.app.metrics_addr().unwrap());
    let (text, _) = curl(&[&metrics_url]);
    for reason in [
        "ok",
        "garbage",
        "wrong_trust_domain",
        "too_large",
        "status",
        "timeout",
        "tls",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("signet_federation_fetches_total")
                    && l.contains("trust_domain=\"gamma.test\"")
                    && l.contains(&format!("outcome=\"{reason}\""))),
            "no {reason} count in:\n{text}"
        );
    }
    // And through the Admin API: the CLI reports the last failure and still prints the kept bundle.
    let out = Command::new(env!("CARGO_BIN_EXE_signet"))
        .args(["bundle", "--data-dir"])
        .arg(node.dir.path().join("data"))
        .args(["--federated", "gamma.test"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("(tls)"));
    let printed = BundleDocument::parse(&out.stdout).unwrap();
    assert_eq!(printed, kept);
    node.app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_spiffe_refuses_an_endpoint_with_another_spiffe_id() {
    // beta serves https_spiffe; alpha expects another SPIFFE ID, so it never accepts beta's endpoint.
    let Some(beta) = start("beta.test", |c, _| {
        c.federation.listen = Some("127.0.0.1:0".parse().unwrap());
        c.federation.profile = EndpointProfile::HttpsSpiffe;
    })
    .await
    else {
        return;
    };
    let beta_addr = beta.app.federation_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bootstrap = dir.path().join("beta.json");
    std::fs::write(
        &bootstrap,
        beta.app
            .bundle()
            .current()
            .document()
            .unwrap()
            .to_json()
            .unwrap(),
    )
    .unwrap();
    let Some(alpha) = start("alpha.test", |c, _| {
        c.federation.trust_domains = vec![FederatedTrustDomain {
            trust_domain: "beta.test".into(),
            endpoint: format!("https://{beta_addr}"),
            profile: EndpointProfile::HttpsSpiffe,
            ca: None,
            endpoint_spiffe_id: Some("spiffe://beta.test/somebody-else".into()),
            bootstrap_bundle: Some(bootstrap.clone()),
        }];
    })
    .await
    else {
        return;
    };
    let e = wait_for(&alpha, "beta.test", Duration::from_secs(20), |e| {
        e.last_failure.is_some()
    })
    .await;
    let f = e.last_failure.unwrap();
    assert_eq!(f.reason, "tls");
    assert!(
        f.message.contains("spiffe://beta.test/somebody-else"),
        "{}",
        f.message
    );
    assert_eq!(e.bundle.unwrap().source, "bootstrap");
    alpha.app.shutdown().await.unwrap();
    beta.app.shutdown().await.unwrap();
}
