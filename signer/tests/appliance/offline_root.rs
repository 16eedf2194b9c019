//! signet's X.509 authority below an offline root that `openssl` makes and keeps (its key never reaches signet):
//! the first start waits for the ceremony, the certificate goes through `install`, X509-SVIDs and the CA SPIRE gets
//! from `MintX509CA` verify against the offline root alone (`openssl verify -x509_strict`, the `spiffe` crate), a
//! second generation of the intermediate goes through prepare -> CSR -> sign -> install -> publish -> activate over
//! the Admin API, and wrong certificates are refused with their reason while nothing changes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use signet::ca::ManualClock;
use signet::config::ParentSetting;
use signet::serve::Appliance;
use signet_pkcs11::testing::SoftHsm;
use signet_proto::signet::v1 as spb;
use signet_proto::signet::v1::admin_client::AdminClient;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as upb;
use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_client::UpstreamAuthorityClient;
use time::OffsetDateTime;
use tonic::Code;

use crate::support::bed::*;
use crate::support::{openssl_verify, pem_chain};

/// A root made by `openssl req -x509` in its own directory (the ceremony's machine).
struct OfflineRoot {
    key: PathBuf,
    cert: PathBuf,
    der: Vec<u8>,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn der_of(pem_path: &Path) -> Vec<u8> {
    pem::parse(std::fs::read(pem_path).unwrap())
        .unwrap()
        .contents()
        .to_vec()
}

fn make_root(dir: &Path, name: &str) -> OfflineRoot {
    std::fs::create_dir_all(dir).unwrap();
    let cnf = dir.join(format!("{name}.cnf"));
    std::fs::write(
        &cnf,
        format!(
            "[req]\ndistinguished_name = dn\nx509_extensions = v3_root\nprompt = no\n[dn]\nO = Example\nCN = {name}\n\
             [v3_root]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n\
             subjectKeyIdentifier = hash\n"
        ),
    )
    .unwrap();
    let (key, cert) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pem")),
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "3650",
            "-config",
            cnf.to_str().unwrap(),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    );
    let der = der_of(&cert);
    OfflineRoot { key, cert, der }
}

/// The extensions an intermediate gets from the ceremony (`pathlen` as given; `ca = false` for a wrong one).
fn extensions(path_len: Option<u8>, ca: bool) -> String {
    let bc = match (ca, path_len) {
        (false, _) => "critical, CA:FALSE".to_string(),
        (true, Some(n)) => format!("critical, CA:TRUE, pathlen:{n}"),
        (true, None) => "critical, CA:TRUE".to_string(),
    };
    let ku = if ca {
        "critical, keyCertSign, cRLSign"
    } else {
        "critical, digitalSignature"
    };
    format!(
        "[v3]\nbasicConstraints = {bc}\nkeyUsage = {ku}\nsubjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid:always\nsubjectAltName = URI:spiffe://{TD}\n"
    )
}

/// `openssl x509 -req -CA`: the root signs `csr_pem` with `ext` for `days`; the certificate's PEM.
fn sign(root: &OfflineRoot, dir: &Path, csr_pem: &str, ext: &str, days: u32) -> String {
    let n = std::fs::read_dir(dir).unwrap().count();
    let (csr, cnf, out) = (
        dir.join(format!("req{n}.csr")),
        dir.join(format!("ext{n}.cnf")),
        dir.join(format!("cert{n}.pem")),
    );
    std::fs::write(&csr, csr_pem).unwrap();
    std::fs::write(&cnf, ext).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            root.cert.to_str().unwrap(),
            "-CAkey",
            root.key.to_str().unwrap(),
            "-set_serial",
            &format!(
                "0x{:016x}{n:04x}",
                OffsetDateTime::now_utc().unix_timestamp()
            ),
            "-days",
            &days.to_string(),
            "-sha256",
            "-extfile",
            cnf.to_str().unwrap(),
            "-extensions",
            "v3",
            "-out",
            out.to_str().unwrap(),
        ],
    );
    std::fs::read_to_string(out).unwrap()
}

/// An expired certificate for the CSR's key, signed by the root's key (openssl 3.0's `x509 -req` cannot backdate).
fn expired(root: &OfflineRoot, csr_pem: &str) -> String {
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&root.key).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(&root.der.clone().into(), key).unwrap();
    let csr_der = pem::parse(csr_pem).unwrap().contents().to_vec();
    let mut csr = rcgen::CertificateSigningRequestParams::from_der(&csr_der.into()).unwrap();
    let now = OffsetDateTime::now_utc();
    csr.params.not_before = now - time::Duration::days(30);
    csr.params.not_after = now - time::Duration::days(1);
    csr.params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    csr.params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    csr.params.use_authority_key_identifier_extension = true;
    csr.signed_by(&issuer).unwrap().pem()
}

/// A CSR like signet's (same subject) for a key that is not on the token.
fn foreign_csr(subject_from: &str) -> String {
    let der = pem::parse(subject_from).unwrap().contents().to_vec();
    let mut params = rcgen::CertificateSigningRequestParams::from_der(&der.into())
        .unwrap()
        .params;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    params.serialize_request(&kp).unwrap().pem().unwrap()
}

fn spire_ca_csr() -> (Vec<u8>, rcgen::KeyPair) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "SPIFFE");
    params.subject_alt_names = vec![rcgen::SanType::URI(
        format!("spiffe://{TD}").try_into().unwrap(),
    )];
    let der = params.serialize_request(&kp).unwrap().der().to_vec();
    (der, kp)
}

fn subject_and_issuer(der: &[u8]) -> (String, String) {
    let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
    (c.subject().to_string(), c.issuer().to_string())
}

/// An X509-SVID through the Issuer API and a SPIRE CA through MintX509CA, each verified against `root` alone;
/// returns signet's intermediate as both chains carried it.
async fn issue_and_verify(bed: &Bed, root: &OfflineRoot, what: &str) -> Vec<u8> {
    let mut issuer = IssuerClient::new(bed.channel(Some(&bed.admin())).await);
    let (csr, kp) = csr_for("spiffe://example.org/workloads/w1");
    let svid = expect_svid(mint_one(&mut issuer, csr, 600).await);
    assert_eq!(
        svid.cert_chain.len(),
        2,
        "{what}: leaf and signet's intermediate, no root"
    );
    assert!(
        !svid.cert_chain.contains(&root.der),
        "{what}: the root is not sent"
    );
    let intermediate = svid.cert_chain[1].clone();
    openssl_verify(
        std::slice::from_ref(&root.der),
        &svid.cert_chain[1..],
        &svid.cert_chain[0],
    )
    .unwrap_or_else(|e| panic!("{what}: openssl verify of the X509-SVID: {e}"));
    let parsed = spiffe::X509Svid::parse_from_der(&svid.cert_chain.concat(), &kp.serialize_der())
        .unwrap_or_else(|e| panic!("{what}: the spiffe crate refuses the X509-SVID: {e}"));
    assert_eq!(
        parsed.spiffe_id().to_string(),
        "spiffe://example.org/workloads/w1"
    );
    // The oracle can refuse: another root does not verify it.
    let (foreign, _) = foreign_ca();
    assert!(
        openssl_verify(
            &[foreign.der().to_vec()],
            &svid.cert_chain[1..],
            &svid.cert_chain[0]
        )
        .is_err()
    );

    // SPIRE's CA: signet's intermediate in x509_ca_chain, the offline root alone in upstream_x509_roots.
    let spire = bed.credential_for(SPIRE_A).await;
    let mut up = UpstreamAuthorityClient::new(bed.channel(Some(&spire)).await);
    let (csr, ca_key) = spire_ca_csr();
    let mut stream = up
        .mint_x509ca_and_subscribe(upb::MintX509caRequest {
            csr,
            preferred_ttl: 3600,
        })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    let chain: Vec<Vec<u8>> = first.x509_ca_chain.iter().map(|c| c.asn1.clone()).collect();
    let roots: Vec<Vec<u8>> = first
        .upstream_x509_roots
        .iter()
        .map(|r| r.asn1.clone())
        .collect();
    assert_eq!(
        roots,
        vec![root.der.clone()],
        "{what}: upstream_x509_roots is the offline root"
    );
    assert_eq!(
        chain.len(),
        2,
        "{what}: SPIRE's CA and signet's intermediate"
    );
    assert_eq!(chain[1], intermediate, "{what}");
    openssl_verify(&roots, &chain[1..], &chain[0])
        .unwrap_or_else(|e| panic!("{what}: openssl verify of SPIRE's CA: {e}"));
    // A workload SVID SPIRE signs with it verifies to the offline root through both CAs.
    let issuer = rcgen::Issuer::from_ca_cert_der(&chain[0].clone().into(), ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/workload/spire".try_into().unwrap(),
    )];
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    let leaf = p.signed_by(&leaf_key, &issuer).unwrap().der().to_vec();
    openssl_verify(&roots, &chain, &leaf)
        .unwrap_or_else(|e| panic!("{what}: openssl verify of a SPIRE workload SVID: {e}"));
    let mut full = leaf.clone();
    for c in &chain {
        full.extend_from_slice(c);
    }
    spiffe::X509Svid::parse_from_der(&full, &leaf_key.serialize_der())
        .unwrap_or_else(|e| panic!("{what}: the spiffe crate refuses SPIRE's workload SVID: {e}"));
    // What SPIRE's CA signs is not signet's: its leaf gets no admin role even with the admin's SPIFFE ID.
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(ADMIN.try_into().unwrap())];
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    let fake_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let fake = p.signed_by(&fake_key, &issuer).unwrap().der().to_vec();
    let mut fake_chain = vec![fake];
    fake_chain.extend(chain.iter().cloned());
    let impostor = Credential {
        chain_pem: pem_chain(&fake_chain),
        key_pem: fake_key.serialize_pem(),
    };
    let e = AdminClient::new(bed.channel(Some(&impostor)).await)
        .get_rotation(spb::GetRotationRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
    intermediate
}

fn x509_rows(r: &spb::GetRotationResponse) -> Vec<(String, String, bool)> {
    r.authorities
        .iter()
        .filter(|a| a.kind == "x509")
        .map(|a| (a.label.clone(), a.state.clone(), a.awaiting_certificate))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_root_certifies_signets_intermediates() {
    let Some(hsm) = SoftHsm::new() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ceremony = dir.path().join("ceremony");
    let root = make_root(&ceremony, "offline root");
    let other = make_root(&ceremony, "another root");
    let mut cfg = config(&hsm, dir.path());
    cfg.authority.x509.parent = ParentSetting::External;
    cfg.authority.x509.upstream_roots = Some(root.cert.clone());
    cfg.authority.rotation.schedule = false;
    let clock = Arc::new(ManualClock::new(OffsetDateTime::now_utc()));

    // First start: the key is generated on the token, the CSR written, and the start waits for the certificate.
    let starting = tokio::spawn(Appliance::start_with_clock(cfg.clone(), clock.clone()));
    let csr_path = cfg.data_dir.join("authority.csr.pem");
    crate::support::wait::wait_until_async("the CSR was written", Duration::from_secs(60), || {
        assert!(
            !starting.is_finished(),
            "the start ended instead of waiting"
        );
        let there = csr_path.exists();
        async move { there }
    })
    .await;
    assert!(
        !starting.is_finished(),
        "the start waits for the certificate"
    );
    let csr_pem = std::fs::read_to_string(&csr_path).unwrap();
    openssl(
        &ceremony,
        &[
            "req",
            "-verify",
            "-noout",
            "-in",
            csr_path.to_str().unwrap(),
        ],
    );

    // The offline install refuses a certificate for another key, and writes nothing.
    let wrong = sign(
        &root,
        &ceremony,
        &foreign_csr(&csr_pem),
        &extensions(Some(1), true),
        365,
    );
    let e = signet::serve::install_offline(&cfg, wrong.as_bytes(), b"").unwrap_err();
    assert!(
        matches!(e, signet::serve::ServeError::CertificateRefused { .. }),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "the ceremony's certificate is refused: the certificate is for another key, not the key of \
         signet-x509-root on the token: have the offline root sign the CSR that `signet rotate prepare` wrote for \
         signet-x509-root"
    );
    assert!(!cfg.data_dir.join("authority.pem").exists());
    assert!(!starting.is_finished());

    // The ceremony signs the real CSR; install; the start goes on.
    let good = sign(&root, &ceremony, &csr_pem, &extensions(Some(1), true), 365);
    signet::serve::install_offline(&cfg, good.as_bytes(), b"")
        .expect("the certificate is accepted");
    let app = tokio::time::timeout(Duration::from_secs(120), starting)
        .await
        .expect("the start finishes once the certificate is installed")
        .unwrap()
        .expect("the appliance starts");
    let bed = Bed::from_started(app, dir, cfg.clone(), Box::new(hsm));
    // The bundle is the offline root alone, not signet's intermediate.
    assert_eq!(bed.roots_pem(), pem_chain(std::slice::from_ref(&root.der)));
    let first = issue_and_verify(&bed, &root, "generation 1").await;
    assert_eq!(
        first,
        pem::parse(&good).unwrap().contents(),
        "the installed certificate signs"
    );

    // Second generation over the Admin API: prepare returns the CSR; publish waits for the certificate.
    let mut admin = AdminClient::new(bed.channel(Some(&bed.admin())).await);
    let step = |s: &str| spb::RotateRequest {
        step: s.into(),
        kind: "x509".into(),
        label: String::new(),
    };
    let prepared = admin.rotate(step("prepare")).await.unwrap().into_inner();
    let label = prepared.label.clone();
    assert_eq!(label, "signet-x509-root-g2");
    assert!(
        prepared
            .csr_pem
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
    );
    let again = admin.rotate(step("csr")).await.unwrap().into_inner();
    assert_eq!(again.label, label);
    let csr2 = prepared.csr_pem.clone();
    let e = admin.rotate(step("publish")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "awaiting the authority's certificate: signet-x509-root-g2 has no certificate yet; have the offline root \
         sign its CSR (signet rotate csr), then run signet rotate install --cert FILE [--chain FILE]"
    );
    let before = admin
        .get_rotation(spb::GetRotationRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        x509_rows(&before).contains(&(label.clone(), "prepared".into(), true)),
        "{:?}",
        x509_rows(&before)
    );

    // Wrong certificates, each refused with its reason; nothing changes.
    let g2_subject = "O=signet, CN=signet intermediate example.org #2";
    let cases: Vec<(&str, String, String)> = vec![
        (
            "another key",
            sign(&root, &ceremony, &foreign_csr(&csr2), &extensions(Some(1), true), 365),
            format!(
                "the certificate is for another key, not the key of {label} on the token: have the offline root \
                 sign the CSR that `signet rotate prepare` wrote for {label}"
            ),
        ),
        (
            "not a CA",
            sign(&root, &ceremony, &csr2, &extensions(None, false), 365),
            "the certificate is not a CA: it needs basicConstraints critical, CA:TRUE to sign what signet issues"
                .into(),
        ),
        (
            "expired",
            expired(&root, &csr2),
            String::new(), // checked by prefix below (the times are the certificate's)
        ),
        (
            "pathlen 0",
            sign(&root, &ceremony, &csr2, &extensions(Some(0), true), 365),
            "the certificate's pathLenConstraint is 0: signet issues 1 level(s) of CA below its intermediate \
             (SPIRE servers' CAs, delegated mode's issuing intermediates), so it needs pathlen:1 or more, or none"
                .into(),
        ),
        (
            "another root",
            sign(&other, &ceremony, &csr2, &extensions(Some(1), true), 365),
            format!(
                "the certificate does not chain to the upstream roots ({}): neither an upstream root nor a --chain \
                 certificate signed {g2_subject} (issuer O=Example, CN=another root)",
                root.cert.display()
            ),
        ),
    ];
    for (what, cert_pem, message) in cases {
        let e = admin
            .install_authority(spb::InstallAuthorityRequest {
                certificate_pem: cert_pem.clone(),
                chain_pem: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        if what == "expired" {
            let der = pem::parse(&cert_pem).unwrap().contents().to_vec();
            let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
            let not_after = c.validity().not_after.to_datetime();
            assert!(
                e.message().starts_with(&format!(
                    "the certificate has expired: notAfter {not_after} is before now ("
                )),
                "{what}: {}",
                e.message()
            );
        } else {
            assert_eq!(e.message(), message, "{what}");
        }
        let now = admin
            .get_rotation(spb::GetRotationRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            x509_rows(&now),
            x509_rows(&before),
            "{what}: nothing changed"
        );
        let lines = bed.audit();
        let refused = audit_lines(&lines, ADMIN, "InstallAuthority");
        let last = refused.last().expect("an audit line for the refusal");
        assert_eq!(last["outcome"], "refused", "{what}: {last}");
    }
    assert_eq!(subject_and_issuer(&first).1, "O=Example, CN=offline root");

    // The right certificate: install, publish, activate (after the publish lead); the bundle does not change.
    let cert2 = sign(&root, &ceremony, &csr2, &extensions(Some(1), true), 365);
    let r = admin
        .install_authority(spb::InstallAuthorityRequest {
            certificate_pem: cert2.clone(),
            chain_pem: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.label, label);
    let seq = bed.app.bundle().current().sequence;
    admin.rotate(step("publish")).await.unwrap();
    clock.advance(Duration::from_secs(3600));
    admin.rotate(step("activate")).await.unwrap();
    assert_eq!(
        bed.app.bundle().current().x509_roots,
        vec![root.der.clone()]
    );
    assert!(bed.app.bundle().current().sequence > seq);
    // Issuers switch to the new intermediate (asynchronously, on the active set's change).
    let second = crate::support::wait::wait_for_async(
        "the issuers switched to the new intermediate",
        Duration::from_secs(30),
        || async {
            let chain = issue_and_verify(&bed, &root, "generation 2").await;
            if chain != first {
                Ok(chain)
            } else {
                Err(String::new())
            }
        },
    )
    .await;
    assert_eq!(subject_and_issuer(&second).0, g2_subject);
    assert_eq!(
        second,
        pem::parse(&cert2).unwrap().contents(),
        "the installed certificate signs"
    );
    let done = admin
        .get_rotation(spb::GetRotationRequest {})
        .await
        .unwrap()
        .into_inner();
    let rows = x509_rows(&done);
    assert!(
        rows.contains(&(label.clone(), "active".into(), false)),
        "{rows:?}"
    );
    assert!(
        rows.contains(&("signet-x509-root".into(), "superseded".into(), false)),
        "{rows:?}"
    );
    bed.stop().await;
}
