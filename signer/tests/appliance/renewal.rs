//! signet renews its own credentials while it runs: the server certificate changes under clients that keep calling
//! (on one connection and on new ones) without one failed request, the admin credential's files are replaced and
//! still accepted, a root rotation needs no restart (the served credential chains to the new root right after
//! activate, and retire succeeds), and while the old root's credential is still served retire is refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use signet::ca::{Clock as _, ManualClock};
use signet::config::ConfigDuration;
use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::admin_client::AdminClient;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use time::OffsetDateTime;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::handshake::{ders, serial, served_chain, signed_by};
use crate::support::bed::*;
use crate::support::{openssl_verify, pem_chain};

fn tls_for(roots_pem: &str, who: &Credential) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(roots_pem))
        .domain_name("localhost")
        .identity(Identity::from_pem(&who.chain_pem, &who.key_pem))
}

/// The certificate chain the server presents to a new TLS handshake (verified against `roots_pem` for
/// `localhost`), or why the handshake failed.
async fn served(
    addr: std::net::SocketAddr,
    roots_pem: &str,
    who: &Credential,
) -> Result<Vec<Vec<u8>>, String> {
    served_chain(&addr.to_string(), roots_pem, &who.chain_pem, &who.key_pem).await
}

/// The admin credential from the data directory, read until the certificate and the key are a pair (a renewal may
/// replace the two files between two reads).
fn admin_pair(bed: &Bed) -> Credential {
    for _ in 0..50 {
        let c = bed.admin();
        let kp = rcgen::KeyPair::from_pem(&c.key_pem).unwrap();
        let leaf = ders(&c.chain_pem).remove(0);
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        if cert.public_key().raw == rcgen::PublicKeyData::subject_public_key_info(&kp) {
            return c;
        }
    }
    panic!("the admin certificate and key never matched");
}

async fn mint_one(c: &mut IssuerClient<Channel>) -> Result<(), tonic::Status> {
    let (csr, _) = csr_for("spiffe://example.org/workloads/w1");
    let r = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: vec![pb::X509svidRequest {
                csr,
                ttl_seconds: 60,
            }],
        })
        .await?
        .into_inner();
    match r.results.into_iter().next().and_then(|r| r.result) {
        Some(pb::x509svid_result::Result::Svid(_)) => Ok(()),
        other => Err(tonic::Status::internal(format!("{other:?}"))),
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
}

impl Tally {
    fn count(&self, r: Result<(), String>, what: &str) {
        match r {
            Ok(()) => self.ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                eprintln!("{what} failed: {e}");
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Three renewals of the server certificate (a 4 s life, renewed every 2 s) under a client calling on one
/// connection and one connecting anew for every call: no call fails, the connection is never re-made, each new
/// handshake sees the current certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_credentials_renew_live_without_a_failed_request() {
    let Some(bed) =
        Bed::start_with(|c| c.server.service_svid_ttl = ConfigDuration(Duration::from_secs(4)))
            .await
    else {
        return;
    };
    let addr = bed.app.addr();
    let roots = bed.roots_pem();
    let root = ders(&roots).remove(0);
    let agent = bed.credential_for(AGENT).await;
    let admin_before = ders(&bed.admin().chain_pem).remove(0);

    // One connection for the whole test: the connector counts how often it is made.
    let connects = Arc::new(AtomicUsize::new(0));
    let counted = connects.clone();
    let one = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls_for(&roots, &agent))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::TcpStream::connect(addr).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let on_one = Arc::new(Tally::default());
    let on_new = Arc::new(Tally::default());
    let steady = {
        let (stop, tally) = (stop.clone(), on_one.clone());
        let mut c = IssuerClient::new(one);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tally.count(
                    mint_one(&mut c).await.map_err(|e| e.to_string()),
                    "a call on the open connection",
                );
                // Paces the steady load (a call every 20 ms) while the certificate renews; not a synchronisation.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let fresh = {
        let (stop, tally, roots, agent) =
            (stop.clone(), on_new.clone(), roots.clone(), agent.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = async {
                    let ch = Endpoint::from_shared(format!("https://{addr}"))
                        .unwrap()
                        .tls_config(tls_for(&roots, &agent))
                        .unwrap()
                        .connect()
                        .await
                        .map_err(|e| format!("{e:?}"))?;
                    mint_one(&mut IssuerClient::new(ch))
                        .await
                        .map_err(|e| e.to_string())
                }
                .await;
                tally.count(r, "a call on a new connection");
                // Paces the new connections (one every 50 ms); not a synchronisation.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // Watch the served certificate through new handshakes until it changed three times.
    let first = served(addr, &roots, &agent).await.unwrap();
    let mut serials = vec![serial(&first[0])];
    let handshakes = Tally::default();
    for _ in 0..600 {
        if serials.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        match served(addr, &roots, &agent).await {
            Ok(chain) => {
                assert!(
                    signed_by(&chain[0], &root),
                    "the served certificate chains to the root"
                );
                let s = serial(&chain[0]);
                if serials.last() != Some(&s) {
                    serials.push(s);
                }
                handshakes.count(Ok(()), "a handshake");
            }
            Err(e) => handshakes.count(Err(e), "a handshake"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    steady.await.unwrap();
    fresh.await.unwrap();
    assert!(
        serials.len() >= 4,
        "the server certificate changed {} times, not 3",
        serials.len() - 1
    );
    let (ok1, failed1) = (
        on_one.ok.load(Ordering::Relaxed),
        on_one.failed.load(Ordering::Relaxed),
    );
    let (ok2, failed2) = (
        on_new.ok.load(Ordering::Relaxed),
        on_new.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "one connection: {ok1} ok / {failed1} failed; new connections: {ok2} ok / {failed2} failed; handshakes: {} \
         ok / {} failed",
        handshakes.ok.load(Ordering::Relaxed),
        handshakes.failed.load(Ordering::Relaxed)
    );
    assert_eq!(failed1, 0, "calls failed on the open connection");
    assert_eq!(failed2, 0, "calls failed on new connections");
    assert_eq!(handshakes.failed.load(Ordering::Relaxed), 0);
    assert!(ok1 > 0 && ok2 > 0);
    assert_eq!(
        connects.load(Ordering::Relaxed),
        1,
        "the open connection was never re-made"
    );

    // The files: the server's is the one served (or a later one), keys stay private, the admin's was renewed
    // and is accepted.
    let p = bed.app.paths();
    #[cfg(unix)]
    for key in [&p.server_key, &p.admin_key] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }
    let admin = admin_pair(&bed);
    let admin_now = ders(&admin.chain_pem).remove(0);
    assert_ne!(
        serial(&admin_now),
        serial(&admin_before),
        "the admin certificate was renewed"
    );
    assert!(signed_by(&admin_now, &root));
    let mut a = AdminClient::new(bed.channel(Some(&admin)).await);
    a.get_status(pb::GetStatusRequest {}).await.unwrap();
    // Nothing was left aside in the data directory.
    let aside: Vec<_> = std::fs::read_dir(&p.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".new"))
        .collect();
    assert!(aside.is_empty(), "{aside:?}");
    bed.stop().await;
}

fn step(step: &str) -> pb::RotateRequest {
    pb::RotateRequest {
        step: step.into(),
        kind: "x509".into(),
        label: String::new(),
    }
}

async fn rotation(admin: &mut AdminClient<Channel>) -> pb::GetRotationResponse {
    admin
        .get_rotation(pb::GetRotationRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// prepare, publish, (the clock past the publish lead), activate; returns the new root.
async fn rotate_to_new_root(bed: &Bed, clock: &ManualClock) -> Vec<u8> {
    let mut admin = AdminClient::new(bed.channel(Some(&bed.admin())).await);
    admin.rotate(step("prepare")).await.unwrap();
    admin.rotate(step("publish")).await.unwrap();
    let lead = rotation(&mut admin).await.publish_lead_seconds;
    clock.advance(Duration::from_secs(u64::try_from(lead).unwrap() + 1));
    admin.rotate(step("activate")).await.unwrap();
    let r = rotation(&mut admin).await;
    let active = r
        .authorities
        .iter()
        .find(|a| a.kind == "x509" && a.state == "active")
        .unwrap();
    assert_eq!(active.generation, 2);
    // The new root, from the bundle file once it has both.
    crate::support::wait::wait_for_async(
        "bundle.pem held both roots",
        Duration::from_secs(30),
        || {
            let roots = ders(&bed.roots_pem());
            let found = if roots.len() == 2 {
                let first =
                    ders(&std::fs::read_to_string(&bed.app.paths().root).unwrap()).remove(0);
                Ok(roots.into_iter().find(|r| *r != first).unwrap_or_default())
            } else {
                Err(format!("{} roots", roots.len()))
            };
            async move { found }
        },
    )
    .await
}

/// A root rotation without a restart: right after activate the server presents (and the admin files hold) a
/// credential of the new root, which clients of either root verify; a connection opened before keeps working; once
/// nothing else the old root signed is valid, retire succeeds and the server is trusted with the new root alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_needs_no_restart() {
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let Some(bed) = Bed::start_clocked(
        |c| c.authority.rotation.schedule = false,
        Arc::new(clock.clone()),
    )
    .await
    else {
        return;
    };
    let addr = bed.app.addr();
    let old_root = ders(&bed.roots_pem()).remove(0);
    let agent = bed.credential_for(AGENT).await;
    let mut before = IssuerClient::new(bed.channel(Some(&agent)).await);
    mint_one(&mut before).await.unwrap();
    let first = served(addr, &bed.roots_pem(), &agent).await.unwrap();
    assert!(signed_by(&first[0], &old_root));

    let new_root = rotate_to_new_root(&bed, &clock).await;
    // The served credential chains to the new root (renewed right after activate, no restart).
    let mut chain = Vec::new();
    for _ in 0..200 {
        chain = served(addr, &bed.roots_pem(), &agent).await.unwrap();
        if signed_by(&chain[0], &new_root) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        signed_by(&chain[0], &new_root),
        "the server still presents a credential of the old root"
    );
    // Clients holding only the new root, and only the old one (through the old -> new cross-certificate), verify it.
    openssl_verify(std::slice::from_ref(&new_root), &chain[1..], &chain[0]).unwrap();
    openssl_verify(std::slice::from_ref(&old_root), &chain[1..], &chain[0]).unwrap();
    // The admin credential was renewed by the new root too.
    let mut admin_ok = false;
    for _ in 0..200 {
        let a = admin_pair(&bed);
        if signed_by(&ders(&a.chain_pem)[0], &new_root) {
            admin_ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        admin_ok,
        "the admin credential was not renewed after activate"
    );
    // The connection opened before the rotation still works.
    mint_one(&mut before).await.unwrap();

    // Once nothing else the old root signed can be valid, retire succeeds: no replica serves its credentials.
    let mut admin = AdminClient::new(bed.channel(Some(&admin_pair(&bed))).await);
    let r = rotation(&mut admin).await;
    let old = r
        .authorities
        .iter()
        .find(|a| a.kind == "x509" && a.state == "superseded")
        .unwrap();
    clock.set(OffsetDateTime::from_unix_timestamp(old.issued_until + 1).unwrap());
    assert!(clock.now() > OffsetDateTime::now_utc());
    let r = admin.rotate(step("retire")).await.unwrap().into_inner();
    assert_eq!(r.label, old.label);
    // The bundle holds the new root alone; the server is trusted with it alone, on a new connection.
    for _ in 0..100 {
        if ders(&bed.roots_pem()).len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ders(&bed.roots_pem()), vec![new_root.clone()]);
    let only_new = pem_chain(std::slice::from_ref(&new_root));
    let chain = served(addr, &only_new, &agent).await;
    // The agent's credential is of the old root: take a new one for the call.
    assert!(chain.is_ok(), "{chain:?}");
    let agent2 = bed.credential_for(AGENT).await;
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls_for(&only_new, &agent2))
        .unwrap()
        .connect()
        .await
        .unwrap();
    mint_one(&mut IssuerClient::new(ch)).await.unwrap();
    bed.stop().await;
}

/// With renewal off, the server keeps presenting the old root's credential after activate: retire is refused
/// (FAILED_PRECONDITION naming the credential), the old root stays in the bundle, and the refusal is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_is_refused_while_the_old_roots_credential_is_served() {
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let Some(bed) = Bed::start_clocked(
        |c| {
            c.authority.rotation.schedule = false;
            c.server.renew_own_credentials = false;
        },
        Arc::new(clock.clone()),
    )
    .await
    else {
        return;
    };
    let addr = bed.app.addr();
    let old_root = ders(&bed.roots_pem()).remove(0);
    let agent = bed.credential_for(AGENT).await;
    rotate_to_new_root(&bed, &clock).await;
    let chain = served(addr, &bed.roots_pem(), &agent).await.unwrap();
    assert!(
        signed_by(&chain[0], &old_root),
        "renewal is off: the old root's credential is still served"
    );
    let mut admin = AdminClient::new(bed.channel(Some(&bed.admin())).await);
    let e = admin.rotate(step("retire")).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .contains("still has a valid descendant in use here")
            && e.message().contains("signet's server certificate"),
        "{}",
        e.message()
    );
    // Nothing changed: the old root is superseded, still in the bundle.
    let r = rotation(&mut admin).await;
    assert!(
        r.authorities
            .iter()
            .any(|a| a.kind == "x509" && a.state == "superseded"),
        "{r:?}"
    );
    assert_eq!(ders(&bed.roots_pem()).len(), 2);
    let lines = bed.audit();
    let refused: Vec<_> = audit_lines(&lines, ADMIN, "Rotate")
        .into_iter()
        .filter(|l| l["outcome"] == "refused")
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    bed.stop().await;
}

/// A renewal that fails (the server certificate's file cannot be replaced: a directory sits where it is written
/// aside) is retried and does not stop the task: the server keeps presenting its certificate, the admin credential
/// is still renewed, and once the obstacle is gone the server's renewal succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_renewal_is_retried() {
    let Some(bed) =
        Bed::start_with(|c| c.server.service_svid_ttl = ConfigDuration(Duration::from_secs(8)))
            .await
    else {
        return;
    };
    let addr = bed.app.addr();
    let roots = bed.roots_pem();
    let agent = bed.credential_for(AGENT).await;
    let p = bed.app.paths().clone();
    let obstacle = p.dir.join(".server.pem.new");
    std::fs::create_dir(&obstacle).unwrap();
    let server0 = serial(&served(addr, &roots, &agent).await.unwrap()[0]);
    let admin0 = serial(&ders(&bed.admin().chain_pem)[0]);
    // The admin credential is renewed (at half its life, like the server's, which fails at the same moment).
    let mut renewed = false;
    for _ in 0..200 {
        if serial(&ders(&admin_pair(&bed).chain_pem)[0]) != admin0 {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(renewed, "the admin credential was not renewed");
    let now = served(addr, &roots, &agent).await.unwrap();
    assert_eq!(
        serial(&now[0]),
        server0,
        "the server certificate could not be renewed"
    );
    // The pair on disk is untouched: nothing was replaced.
    let kp = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&p.server_key).unwrap()).unwrap();
    let on_disk = ders(&std::fs::read_to_string(&p.server_cert).unwrap()).remove(0);
    assert_eq!(serial(&on_disk), server0);
    assert_eq!(
        x509_parser::parse_x509_certificate(&on_disk)
            .unwrap()
            .1
            .public_key()
            .raw,
        rcgen::PublicKeyData::subject_public_key_info(&kp).as_slice()
    );
    std::fs::remove_dir(&obstacle).unwrap();
    let mut changed = false;
    for _ in 0..200 {
        if serial(&served(addr, &roots, &agent).await.unwrap()[0]) != server0 {
            changed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(changed, "the server's renewal was not retried");
    let files = ders(&std::fs::read_to_string(&p.server_cert).unwrap());
    assert_ne!(serial(&files[0]), server0);
    bed.stop().await;
}
