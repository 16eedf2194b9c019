//! Root and JWT-key rotation on the datastore, driven by a clock the test moves (no sleeping), with keys on a real
//! SoftHSM2 token and `openssl verify -x509_strict` and the `spiffe` crate as the judges.
//!
//! The two clients of the X.509 checks: the *old-bundle client* trusts only the first root (generation 1); the
//! *new-bundle client* trusts only the second root (generation 2). Each credential is verified as it was issued:
//! its leaf, with the chain signet presented with it as `-untrusted`. Credentials issued before the new root was
//! published carry no cross-certificate (none existed); the new-bundle client gets the new -> old cross-certificate
//! from the bundle-era chain for those, which is what signet presents from publication on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{DistinguishedName, DnType};
use signet::bundle::BundleSnapshot;
use signet::ca::{
    Authorities, AuthorityKind as K, Clock, Initial, Keyring, ManualClock, RotationError,
    RotationPolicy, TokenKeyring,
};
use signet::jwt::JwtIssuer;
use signet::spiffe::{SpiffeId, TrustDomain};
use signet::store::{AuthorityState, Store};
use signet::x509::{Authority, LeafRequest, RootRequest};
use signet_pkcs11::testing::SoftHsm;
use spiffe::{JwtBundle, JwtBundleSet, JwtSvid};
use time::OffsetDateTime;

/// As long as anything a root may sign lives (the policy's bound), so the first credentials are still valid when
/// the old root is about to be retired.
const LEAF_TTL: Duration = ISSUED_TTL;
const ISSUED_TTL: Duration = Duration::from_secs(3600);
const LEAD: Duration = Duration::from_secs(1200);

fn td() -> TrustDomain {
    TrustDomain::parse("example.org").unwrap()
}

fn pem_of(ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
        .collect()
}

/// `openssl verify -x509_strict -purpose any -attime T -CAfile root [-untrusted chain] leaf`.
fn openssl_verify(
    root: &[u8],
    chain: &[Vec<u8>],
    leaf: &[u8],
    at: OffsetDateTime,
) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let w = |name: &str, ders: &[Vec<u8>]| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem_of(ders)).unwrap();
        p.to_str().unwrap().to_string()
    };
    let mut args = vec![
        "verify".to_string(),
        "-x509_strict".into(),
        "-purpose".into(),
        "any".into(),
        "-attime".into(),
        at.unix_timestamp().to_string(),
        "-CAfile".into(),
        w("root.pem", &[root.to_vec()]),
    ];
    if !chain.is_empty() {
        args.push("-untrusted".into());
        args.push(w("chain.pem", chain));
    }
    args.push(w("leaf.pem", &[leaf.to_vec()]));
    let out = Command::new("openssl")
        .args(&args)
        .output()
        .expect("openssl must be installed");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

struct Rig {
    _dir: tempfile::TempDir,
    hsm: SoftHsm,
    clock: ManualClock,
    auth: Authorities,
    keyring: Arc<TokenKeyring>,
}

fn policy() -> RotationPolicy {
    let mut p = RotationPolicy::new("root", "jwt");
    p.publish_lead = LEAD;
    p.max_x509_issued_ttl = ISSUED_TTL;
    p.max_jwt_issued_ttl = ISSUED_TTL;
    p.root_ttl = Duration::from_secs(30 * 86_400);
    p
}

async fn open(
    dir: &Path,
    hsm: &SoftHsm,
    clock: &ManualClock,
) -> Result<(Authorities, Arc<TokenKeyring>), RotationError> {
    let keyring = Arc::new(TokenKeyring::new("softhsm", hsm.open(), None));
    let store = Store::open("sqlite://state.db", dir).await?;
    let root = std::fs::read(dir.join("root.der")).unwrap();
    let auth = Authorities::open(
        td(),
        store,
        keyring.clone(),
        Arc::new(clock.clone()),
        policy(),
        Initial {
            x509_label: "root".into(),
            x509_root: root,
            x509_chain: Vec::new(),
            jwt_label: "jwt".into(),
        },
    )
    .await?;
    Ok((auth, keyring))
}

async fn rig() -> Option<Rig> {
    let hsm = SoftHsm::new()?;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(OffsetDateTime::now_utc());
    let keyring = TokenKeyring::new("softhsm", hsm.open(), None);
    keyring
        .generate("root", signet_pkcs11::KeyType::EcP256)
        .unwrap();
    keyring
        .generate("jwt", signet_pkcs11::KeyType::EcP256)
        .unwrap();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::OrganizationName, "signet");
    subject.push(DnType::CommonName, "signet root example.org");
    let root = Authority::self_signed_root(
        keyring.signer("root").unwrap(),
        &RootRequest {
            trust_domain: td(),
            subject,
            ttl: Duration::from_secs(30 * 86_400),
            path_len: None,
        },
        clock.now(),
    )
    .unwrap();
    std::fs::write(dir.path().join("root.der"), root.cert_der()).unwrap();
    let (auth, keyring) = open(dir.path(), &hsm, &clock).await.unwrap();
    Some(Rig {
        _dir: dir,
        hsm,
        clock,
        auth,
        keyring,
    })
}

/// One X509-SVID as issued: leaf and the chain presented with it.
struct Issued {
    step: &'static str,
    leaf: Vec<u8>,
    chain: Vec<Vec<u8>>,
}

fn issue(rig: &Rig, step: &'static str) -> Issued {
    let a = rig.auth.active().x509.clone();
    let key = rcgen::KeyPair::generate().unwrap();
    let req = LeafRequest::from_spki(
        SpiffeId::parse("spiffe://example.org/workload").unwrap(),
        &rcgen::PublicKeyData::subject_public_key_info(&key),
        LEAF_TTL,
    )
    .unwrap();
    let cert = a.issue_x509_svid(&req, rig.clock.now()).unwrap();
    Issued {
        step,
        leaf: cert.der,
        chain: a.chain(),
    }
}

fn jwt(rig: &Rig) -> String {
    let (_, key) = rig.auth.active().jwt.clone().unwrap();
    let issuer = JwtIssuer::new(key, td(), None, None, Duration::from_secs(3600)).unwrap();
    issuer
        .issue(
            &SpiffeId::parse("spiffe://example.org/workload").unwrap(),
            &["aud".to_string()],
            Duration::from_secs(300),
            OffsetDateTime::now_utc().max(rig.clock.now()),
        )
        .unwrap()
}

fn jwt_set(b: &BundleSnapshot) -> JwtBundleSet {
    let doc = b.document().unwrap();
    let parsed = signet::spiffe::BundleDocument::parse(doc.to_json().unwrap().as_bytes()).unwrap();
    let jwks = parsed.jwt_authorities_jwks().unwrap();
    let bundle = JwtBundle::from_jwt_authorities(
        spiffe::TrustDomain::new("example.org").unwrap(),
        jwks.as_bytes(),
    )
    .unwrap();
    let mut set = JwtBundleSet::new();
    set.add_bundle(bundle);
    set
}

/// Verifies every credential with the old-bundle client and (once it exists) the new-bundle client.
fn verify_all(
    rig: &Rig,
    issued: &[Issued],
    old_root: &[u8],
    new: Option<(&[u8], &[u8])>,
    when: &str,
) {
    let at = rig.clock.now();
    for c in issued {
        let (ok, out) = openssl_verify(old_root, &c.chain, &c.leaf, at);
        assert!(
            ok,
            "{when}: old-bundle client rejects the credential issued at {}: {out}",
            c.step
        );
        if let Some((new_root, new_to_old)) = new {
            let mut chain = c.chain.clone();
            if !chain.iter().any(|x| x == new_to_old) && c.chain.is_empty() {
                chain.push(new_to_old.to_vec());
            }
            let (ok, out) = openssl_verify(new_root, &chain, &c.leaf, at);
            assert!(
                ok,
                "{when}: new-bundle client rejects the credential issued at {}: {out}",
                c.step
            );
        }
    }
}

fn record(
    auth_list: &[signet::store::AuthorityRecord],
    label: &str,
) -> signet::store::AuthorityRecord {
    auth_list
        .iter()
        .find(|r| r.label == label)
        .cloned()
        .unwrap()
}

/// The whole life cycle of a root and a JWT key, with clients of both generations, the bundle stream and refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_rotation_keeps_both_generations_of_clients_verifying() {
    let Some(rig) = rig().await else { return };
    let mut stream = rig.auth.bundle().subscribe();
    let mut seen: Vec<BundleSnapshot> = vec![(**stream.borrow_and_update()).clone()];
    // Every change reaches the subscriber exactly once, in order; a step that changes nothing sends nothing.
    let mut expect_change = |stream: &mut tokio::sync::watch::Receiver<Arc<BundleSnapshot>>,
                             changed: bool,
                             what: &str| {
        assert_eq!(
            stream.has_changed().unwrap(),
            changed,
            "{what}: bundle change expected: {changed}"
        );
        if changed {
            let b = (**stream.borrow_and_update()).clone();
            assert!(
                b.sequence > seen.last().unwrap().sequence,
                "{what}: sequence did not increase"
            );
            assert!(!stream.has_changed().unwrap());
            seen.push(b);
        }
        seen.last().unwrap().clone()
    };
    let old_root = rig.auth.active().x509.cert_der().to_vec();
    let old_kid = rig.auth.bundle().current().jwt_keys[0].kid.clone();
    let mut issued = vec![issue(&rig, "start")];
    let mut jwts = vec![jwt(&rig)];
    verify_all(&rig, &issued, &old_root, None, "start");

    // Activating or retiring with nothing prepared is refused.
    assert!(matches!(
        rig.auth.activate(K::X509).await,
        Err(RotationError::Precondition(_))
    ));
    assert!(matches!(
        rig.auth.retire(K::X509).await,
        Err(RotationError::Precondition(_))
    ));

    // prepare: a key on the token, a root, two cross-certificates; nothing in the bundle yet.
    let new_label = rig.auth.prepare(K::X509).await.unwrap();
    let jwt_label = rig.auth.prepare(K::Jwt).await.unwrap();
    assert!(rig.keyring.public_key(&new_label).unwrap().is_some());
    expect_change(&mut stream, false, "prepare");
    assert!(
        matches!(
            rig.auth.prepare(K::X509).await,
            Err(RotationError::Precondition(_))
        ),
        "a second prepare"
    );
    let list = rig.auth.list().await;
    let new = record(&list, &new_label);
    let new_root = new.certificate.clone().unwrap();
    let new_to_old = new.cross_to_previous.clone().unwrap();
    assert_eq!(new.state, AuthorityState::Prepared);
    // Activating a prepared root that was never published is refused, state unchanged.
    let before = rig.auth.list().await;
    assert!(matches!(
        rig.auth.activate(K::X509).await,
        Err(RotationError::Precondition(_))
    ));
    assert_eq!(rig.auth.list().await, before);
    issued.push(issue(&rig, "prepared"));
    verify_all(&rig, &issued, &old_root, None, "prepared");

    // publish: the bundle gains the new root (and the new JWT key), one change each.
    rig.clock.advance(Duration::from_secs(60));
    rig.auth.publish(K::X509).await.unwrap();
    let b = expect_change(&mut stream, true, "publish x509");
    assert_eq!(b.x509_roots, vec![old_root.clone(), new_root.clone()]);
    rig.auth.publish(K::Jwt).await.unwrap();
    let b = expect_change(&mut stream, true, "publish jwt");
    assert_eq!(b.jwt_keys.len(), 2);
    issued.push(issue(&rig, "published"));
    assert_eq!(
        issued.last().unwrap().chain,
        vec![new_to_old.clone()],
        "old root's credentials carry new->old"
    );
    jwts.push(jwt(&rig));
    verify_all(
        &rig,
        &issued,
        &old_root,
        Some((&new_root, &new_to_old)),
        "published",
    );

    // activate too early: refused with the time it becomes allowed, nothing changes.
    rig.clock.advance(LEAD / 2);
    let before = rig.auth.list().await;
    match rig.auth.activate(K::X509).await {
        Err(RotationError::TooEarly {
            step: "activate",
            ready_at,
            ..
        }) => {
            assert!(ready_at > rig.clock.now())
        }
        other => panic!("activate before the publish lead passed: {other:?}"),
    }
    assert_eq!(rig.auth.list().await, before);
    expect_change(&mut stream, false, "refused activate");

    // activate after the lead: new issuance signs with the new key; the bundle's content does not change.
    rig.clock.advance(LEAD / 2);
    rig.auth.activate(K::X509).await.unwrap();
    rig.auth.activate(K::Jwt).await.unwrap();
    expect_change(&mut stream, false, "activate");
    let active = rig.auth.active();
    assert_eq!(active.x509.cert_der(), new_root.as_slice());
    assert_eq!(active.jwt.as_ref().unwrap().0, jwt_label);
    let new_rec = record(&rig.auth.list().await, &new_label);
    let old_to_new = new_rec.cross_from_previous.clone().unwrap();
    issued.push(issue(&rig, "activated"));
    assert_eq!(
        issued.last().unwrap().chain,
        vec![old_to_new.clone()],
        "new root's credentials carry old->new"
    );
    jwts.push(jwt(&rig));
    verify_all(
        &rig,
        &issued,
        &old_root,
        Some((&new_root, &new_to_old)),
        "activated",
    );

    // retire while the old root's credentials may still be valid: refused, nothing changes.
    rig.clock.advance(ISSUED_TTL / 2);
    let before = rig.auth.list().await;
    assert!(matches!(
        rig.auth.retire(K::X509).await,
        Err(RotationError::TooEarly { step: "retire", .. })
    ));
    assert_eq!(rig.auth.list().await, before);
    expect_change(&mut stream, false, "refused retire");
    // Destroying a key that is still in the bundle is refused.
    assert!(matches!(
        rig.auth.destroy("root").await,
        Err(RotationError::Precondition(_))
    ));
    issued.push(issue(&rig, "superseded"));
    verify_all(
        &rig,
        &issued,
        &old_root,
        Some((&new_root, &new_to_old)),
        "before retirement",
    );

    // JWT-SVIDs of both keys verify against the bundle of this moment (both keys published).
    let set = jwt_set(&rig.auth.bundle().current());
    for t in &jwts {
        JwtSvid::parse_and_validate(t, &set, &["aud"]).unwrap();
    }

    // retire once nothing the old root signed is valid: it leaves the bundle, one change.
    rig.clock.advance(ISSUED_TTL / 2 + Duration::from_secs(1));
    rig.auth.retire(K::X509).await.unwrap();
    let b = expect_change(&mut stream, true, "retire x509");
    assert_eq!(b.x509_roots, vec![new_root.clone()]);
    rig.auth.retire(K::Jwt).await.unwrap();
    let b = expect_change(&mut stream, true, "retire jwt");
    assert!(b.jwt_keys.iter().all(|k| k.kid != old_kid));
    // The new root's credentials verify for the new-bundle client without any cross-certificate now.
    let last = issue(&rig, "retired");
    assert!(last.chain.is_empty());
    let (ok, out) = openssl_verify(&new_root, &[], &last.leaf, rig.clock.now());
    assert!(ok, "{out}");
    // And the old-bundle client no longer verifies it without the cross-certificate (the oracle can say no).
    let (ok, _) = openssl_verify(&old_root, &[], &last.leaf, rig.clock.now());
    assert!(
        !ok,
        "the old root must not verify the new root's leaf without a cross-certificate"
    );

    // destroy the old key when asked; the token then holds exactly the keys the rows name.
    rig.auth.destroy("root").await.unwrap();
    assert!(rig.keyring.public_key("root").unwrap().is_none());
    let (orphans, lost) = rig.auth.orphans().await.unwrap();
    assert!(
        orphans.is_empty() && lost.is_empty(),
        "orphans {orphans:?}, lost {lost:?}"
    );
    // Taint: SPIRE is told (the root is marked in the bundle); one change.
    rig.auth.taint(&new_label).await.unwrap();
    let b = expect_change(&mut stream, true, "taint");
    assert_eq!(b.x509_tainted, vec![new_root.clone()]);

    // The sequence went up once per change; every version was seen once.
    let seqs: Vec<u64> = seen.iter().map(|b| b.sequence).collect();
    assert_eq!(seqs.len(), 6, "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // The journal holds every step in order.
    let steps: Vec<String> = rig
        .auth
        .store()
        .journal("example.org")
        .await
        .unwrap()
        .into_iter()
        .map(|(_, s, _)| s)
        .collect();
    assert_eq!(
        steps,
        [
            "adopt",
            "adopt",
            "prepare",
            "prepared",
            "prepare",
            "prepared",
            "publish",
            "publish",
            "activate",
            "activate",
            "retire",
            "retire",
            "destroy",
            "destroyed",
            "taint"
        ]
    );
}

/// A restart keeps the authorities, the bundle and its sequence, and what signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_rotation_state() {
    let Some(rig) = rig().await else { return };
    rig.auth.prepare(K::X509).await.unwrap();
    rig.auth.publish(K::X509).await.unwrap();
    // A JWT key a SPIRE server published is kept too.
    let spire_key = signet::bundle::JwtKey {
        kid: "spire-a".into(),
        spki: rcgen::PublicKeyData::subject_public_key_info(&rcgen::KeyPair::generate().unwrap()),
        expires_at: 0,
        tainted: false,
        owner: signet::bundle::KeyOwner::Publisher("spiffe://example.org/spire/a".into()),
    };
    assert!(
        rig.auth
            .bundle()
            .publish_jwt_key(spire_key.clone())
            .unwrap()
    );
    rig.auth.keep_published_jwt_keys().await.unwrap();
    let before = rig.auth.bundle().current();
    assert!(before.jwt_keys.contains(&spire_key));
    let list = rig.auth.list().await;
    let dir = rig._dir.path().to_path_buf();
    rig.auth.store().close().await;
    let (again, _) = open(&dir, &rig.hsm, &rig.clock).await.unwrap();
    assert!(
        again.list().await == list,
        "the authorities changed across the restart"
    );
    assert_eq!(*again.bundle().current(), *before);
    assert_eq!(again.store().schema_version().await.unwrap(), 7);
}

/// The automatic schedule: prepare+publish at half the life, activate at ~83 %, retire when nothing is valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_rotates_on_time() {
    let Some(rig) = rig().await else { return };
    assert!(
        rig.auth.tick().await.is_empty(),
        "nothing is due at the start"
    );
    let life = Duration::from_secs(30 * 86_400);
    rig.clock.advance(life / 2 + Duration::from_secs(60));
    let steps = rig.auth.tick().await;
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        ["prepare+publish", "prepare+publish"]
    );
    assert!(
        rig.auth.tick().await.is_empty(),
        "activation waits for 83 %"
    );
    rig.clock.advance(life / 3);
    let steps = rig.auth.tick().await;
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        ["activate", "activate"]
    );
    rig.clock.advance(ISSUED_TTL + Duration::from_secs(1));
    let steps = rig.auth.tick().await;
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        ["retire", "retire"]
    );
}

/// `retire` waits for every live replica to serve credentials of the new root: each replica's heartbeat (the
/// datastore's `replicas` table, here on SQLite) says which roots signed what it serves. A live replica on the old
/// root, or one that does not say, holds retire back (FAILED_PRECONDITION naming it); a replica whose heartbeat is
/// older than the live window does not. A local hold on the old root is replaced when the credential is renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_waits_for_every_live_replica_to_serve_the_new_root() {
    use signet::store::ReplicaRecord;
    use signet::x509::root_id;
    let Some(rig) = rig().await else { return };
    let old_root = rig.auth.active().x509.cert_der().to_vec();
    let old_spki = rig.auth.active().x509.key().spki_der().to_vec();
    // This process serves a credential of the old root.
    let real_now = OffsetDateTime::now_utc();
    rig.auth.hold_descendant(
        &old_spki,
        rig.clock.now() + time::Duration::days(60),
        "the test's server certificate",
    );
    rig.auth.prepare(K::X509).await.unwrap();
    rig.auth.publish(K::X509).await.unwrap();
    rig.clock.advance(LEAD + Duration::from_secs(1));
    rig.auth.activate(K::X509).await.unwrap();
    let new_root = rig.auth.active().x509.cert_der().to_vec();
    let new_spki = rig.auth.active().x509.key().spki_der().to_vec();
    assert_ne!(root_id(&old_root), root_id(&new_root));
    rig.clock.advance(ISSUED_TTL + Duration::from_secs(1));

    let store = rig.auth.store();
    let beat = |id: &str, seen_at: i64, roots: Option<&str>| ReplicaRecord {
        id: id.into(),
        address: format!("{id}.example:8443"),
        started_at: seen_at,
        seen_at,
        serving_roots: roots.map(str::to_string),
    };
    let now = real_now.unix_timestamp();
    let both = format!("{},{}", root_id(&new_root), root_id(&old_root));
    store
        .heartbeat(&beat("r-old", now, Some(&both)), 6)
        .await
        .unwrap();
    store
        .heartbeat(&beat("r-new", now, Some(&root_id(&new_root))), 6)
        .await
        .unwrap();
    store
        .heartbeat(&beat("r-silent", now, None), 6)
        .await
        .unwrap();
    // Gone for a minute: not live, not counted.
    store
        .heartbeat(&beat("r-gone", now - 60, Some(&root_id(&old_root))), 6)
        .await
        .unwrap();

    let refused = |r: Result<String, RotationError>| match r {
        Err(RotationError::Precondition(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let before = rig.auth.bundle().current();
    // The local hold first.
    let m = refused(rig.auth.retire(K::X509).await);
    assert!(m.contains("the test's server certificate"), "{m}");
    // Renewed by the new root: the hold on the old one is replaced.
    rig.auth.hold_descendant(
        &new_spki,
        rig.clock.now() + time::Duration::days(60),
        "the test's server certificate",
    );
    let m = refused(rig.auth.retire(K::X509).await);
    assert!(m.contains("r-old (r-old.example:8443)"), "{m}");
    assert!(
        m.contains("r-silent") && m.contains("does not report"),
        "{m}"
    );
    assert!(!m.contains("r-new") && !m.contains("r-gone"), "{m}");
    assert_eq!(
        *rig.auth.bundle().current(),
        *before,
        "a refused retire changes nothing"
    );
    // r-old renews, r-silent leaves: retire succeeds.
    store
        .heartbeat(&beat("r-old", now, Some(&root_id(&new_root))), 6)
        .await
        .unwrap();
    store.leave("r-silent").await.unwrap();
    rig.auth.retire(K::X509).await.unwrap();
    assert_eq!(rig.auth.bundle().current().x509_roots, vec![new_root]);
}
