//! Who may change the bundle, over the real wire: a JWT key belongs to its publisher and signet's own JWT
//! authorities belong to signet. The attack (signet's own kid and public key, read from the bundle, published with
//! `expires_at = 1` so that the next publication drops it) is refused with PERMISSION_DENIED and an audit line, and
//! JWT-SVIDs minted afterwards still verify against the bundle; another caller cannot expire, taint or re-publish a
//! key it does not own (not after a restart either); unusable publications are INVALID_ARGUMENT; and a change whose
//! audit line cannot be written (PublishJWTKey, Admin Rotate, KeyManager GenerateKey) does not happen.

use signet::spiffe::BundleDocument;
use signet_proto::signet::v1 as spb;
use signet_proto::signet::v1::admin_client::AdminClient;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use signet_proto::spire::plugin::server::keymanager::v1 as km;
use signet_proto::spire::plugin::server::keymanager::v1::key_manager_client::KeyManagerClient;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as pb;
use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_client::UpstreamAuthorityClient;
use signet_proto::spire::plugin::types::JwtKey;
use spiffe::{JwtBundle, JwtBundleSet, JwtSvid};
use tonic::Code;
use tonic::transport::Channel;

use crate::support::bed::*;

fn p256_spki() -> Vec<u8> {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::PublicKeyData::subject_public_key_info(&kp)
}

fn in_an_hour() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp() + 3600
}

fn fresh_key(kid: &str) -> JwtKey {
    JwtKey {
        public_key: p256_spki(),
        key_id: kid.into(),
        expires_at: in_an_hour(),
        tainted: false,
    }
}

async fn upstream(bed: &Bed, id: &str) -> UpstreamAuthorityClient<Channel> {
    let cred = bed.credential_for(id).await;
    UpstreamAuthorityClient::new(bed.channel(Some(&cred)).await)
}

async fn publish(
    c: &mut UpstreamAuthorityClient<Channel>,
    key: JwtKey,
) -> Result<Vec<JwtKey>, tonic::Status> {
    let mut s = c
        .publish_jwt_key_and_subscribe(pb::PublishJwtKeyRequest { jwt_key: Some(key) })
        .await?
        .into_inner();
    Ok(next(&mut s).await.upstream_jwt_keys)
}

/// The JWT keys in the bundle now, as a subscriber receives them.
async fn jwt_keys(c: &mut UpstreamAuthorityClient<Channel>) -> Vec<JwtKey> {
    let mut s = c
        .subscribe_to_local_bundle(pb::SubscribeToLocalBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    next(&mut s).await.upstream_jwt_keys
}

/// The refusal lines of `caller`'s PublishJWTKeyAndSubscribe calls for `kid`.
fn refusals(bed: &Bed, caller: &str, kid: &str) -> Vec<serde_json::Value> {
    let audit = bed.audit();
    audit_lines(&audit, caller, "PublishJWTKeyAndSubscribe")
        .into_iter()
        .filter(|l| l["outcome"] == "refused" && l["key_id"] == kid)
        .cloned()
        .collect()
}

fn published_lines(bed: &Bed, kid: &str) -> usize {
    bed.audit()
        .iter()
        .filter(|l| l["outcome"] == "published" && l["key_id"] == kid)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signets_own_jwt_key_cannot_be_expired_through_publish_jwt_key() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let mut attacker = upstream(&bed, SPIRE_A).await;
    // What the attacker sees: the bundle's JWT keys, signet's own among them.
    let before = jwt_keys(&mut attacker).await;
    assert_eq!(before.len(), 1, "signet's own JWT key: {before:?}");
    let own = before[0].clone();
    let seq = bed.app.bundle().current().sequence;

    // The attack: signet's kid and public key with an expiry in the past (and tainted, for good measure).
    for (expires_at, tainted) in [(1, false), (1, true), (in_an_hour(), false)] {
        let attack = JwtKey {
            expires_at,
            tainted,
            ..own.clone()
        };
        let e = publish(&mut attacker, attack).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("signet's own"), "{}", e.message());
    }
    let lines = refusals(&bed, SPIRE_A, &own.key_id);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines.iter().all(|l| l["code"] == "PERMISSION_DENIED"));
    assert_eq!(published_lines(&bed, &own.key_id), 0);
    assert_eq!(
        bed.app.bundle().current().sequence,
        seq,
        "the bundle did not change"
    );

    // The next publication of another key (the step that used to drop signet's key) leaves it in place.
    let other = fresh_key("spire-a-after-attack");
    let keys = publish(&mut attacker, other.clone()).await.unwrap();
    assert!(
        keys.contains(&own),
        "signet's key is still in the bundle: {keys:?}"
    );
    assert!(keys.contains(&other));

    // A JWT-SVID minted now verifies against the bundle as a relying party fetches it.
    let mut issuer = IssuerClient::new(bed.channel(Some(&bed.admin())).await);
    let minted = issuer
        .mint_jwtsvid(spb::MintJwtsvidRequest {
            spiffe_id: "spiffe://example.org/workloads/after".into(),
            audience: vec!["db".into()],
            ttl_seconds: 300,
        })
        .await
        .unwrap()
        .into_inner();
    let bundle = issuer
        .get_bundle(spb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    let doc = BundleDocument::parse(&bundle.spiffe_bundle).unwrap();
    let mut set = JwtBundleSet::new();
    set.add_bundle(
        JwtBundle::from_jwt_authorities(
            spiffe::TrustDomain::new(TD).unwrap(),
            doc.jwt_authorities_jwks().unwrap().as_bytes(),
        )
        .unwrap(),
    );
    let svid = JwtSvid::parse_and_validate(&minted.token, &set, &["db"])
        .expect("the JWT-SVID verifies against the bundle");
    assert_eq!(svid.key_id(), own.key_id);
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_publisher_changes_its_key_even_after_a_restart() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let mut a = upstream(&bed, SPIRE_A).await;
    let mut b = upstream(&bed, SPIRE_B).await;
    let key = fresh_key("spire-a-1");
    assert!(publish(&mut a, key.clone()).await.unwrap().contains(&key));

    let attempts = |key: &JwtKey| {
        [
            JwtKey {
                expires_at: 1,
                ..key.clone()
            },
            JwtKey {
                tainted: true,
                ..key.clone()
            },
            key.clone(),
            JwtKey {
                public_key: p256_spki(),
                ..key.clone()
            },
        ]
    };
    for attempt in attempts(&key) {
        let e = publish(&mut b, attempt).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains(SPIRE_A),
            "names the owner: {}",
            e.message()
        );
    }
    assert_eq!(refusals(&bed, SPIRE_B, "spire-a-1").len(), 4);
    let keys = jwt_keys(&mut a).await;
    assert!(keys.contains(&key), "unchanged: {keys:?}");

    // The owner re-publishes it (allowed), then taints it.
    assert!(publish(&mut a, key.clone()).await.unwrap().contains(&key));
    let tainted = JwtKey {
        tainted: true,
        ..key.clone()
    };
    assert!(
        publish(&mut a, tainted.clone())
            .await
            .unwrap()
            .contains(&tainted)
    );
    assert_eq!(published_lines(&bed, "spire-a-1"), 3);

    // The owner is kept in the datastore: after a restart the other caller is still refused, the owner is not.
    let bed = bed.restart().await;
    let mut a = upstream(&bed, SPIRE_A).await;
    let mut b = upstream(&bed, SPIRE_B).await;
    let e = publish(
        &mut b,
        JwtKey {
            expires_at: 1,
            ..tainted.clone()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(jwt_keys(&mut b).await.contains(&tainted));
    let later = JwtKey {
        expires_at: tainted.expires_at + 60,
        ..tainted.clone()
    };
    assert!(
        publish(&mut a, later.clone())
            .await
            .unwrap()
            .contains(&later)
    );
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_publications_are_refused() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let mut a = upstream(&bed, SPIRE_A).await;
    let before = jwt_keys(&mut a).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let cases = [
        (
            "past expiry",
            JwtKey {
                expires_at: now - 60,
                ..fresh_key("past")
            },
            "not in the future",
        ),
        (
            "zero expiry",
            JwtKey {
                expires_at: 0,
                ..fresh_key("zero")
            },
            "not in the future",
        ),
        (
            "negative expiry",
            JwtKey {
                expires_at: -1,
                ..fresh_key("neg")
            },
            "not in the future",
        ),
        (
            "garbage key",
            JwtKey {
                public_key: b"not a key".to_vec(),
                ..fresh_key("garbage")
            },
            "invalid",
        ),
        (
            "empty key",
            JwtKey {
                public_key: Vec::new(),
                ..fresh_key("nokey")
            },
            "invalid",
        ),
        ("empty kid", fresh_key(""), "empty"),
        ("long kid", fresh_key(&"k".repeat(257)), "more than 256"),
        ("kid with a space", fresh_key("a b"), "printable"),
        ("kid with a newline", fresh_key("a\nb"), "printable"),
    ];
    for (what, key, says) in cases {
        let kid = key.key_id.clone();
        let e = publish(&mut a, key).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains(says), "{what}: {}", e.message());
        let lines = refusals(&bed, SPIRE_A, &kid);
        assert_eq!(lines.len(), 1, "{what}: {lines:?}");
        assert_eq!(lines[0]["code"], "INVALID_ARGUMENT");
    }
    assert_eq!(jwt_keys(&mut a).await, before, "nothing was published");
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_cannot_be_audited_does_not_happen() {
    let Some(bed) = Bed::start_with(|c| c.authority.rotation.schedule = false).await else {
        return;
    };
    let mut a = upstream(&bed, SPIRE_A).await;
    let spire = bed.credential_for(SPIRE_A).await;
    let mut keys = KeyManagerClient::new(bed.channel(Some(&spire)).await);
    let mut admin = AdminClient::new(bed.channel(Some(&bed.admin())).await);
    let rotation = |r: spb::GetRotationResponse| {
        r.authorities
            .into_iter()
            .map(|a| (a.label, a.state))
            .collect::<Vec<_>>()
    };
    let before = rotation(
        admin
            .get_rotation(spb::GetRotationRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    let bundle_before = bed.app.bundle().current();
    let audit_before = bed.audit().len();

    bed.app.audit_log().simulate_write_failure(true);
    let e = publish(&mut a, fresh_key("unaudited")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("audit log"), "{}", e.message());
    let e = admin
        .rotate(spb::RotateRequest {
            step: "prepare".into(),
            kind: "jwt".into(),
            label: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e = keys
        .generate_key(km::GenerateKeyRequest {
            key_id: "unaudited".into(),
            key_type: km::KeyType::EcP256 as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    bed.app.audit_log().simulate_write_failure(false);

    // Nothing happened: the bundle, the rotation state and the caller's keys are as they were; nothing was
    // written while the log failed.
    assert_eq!(*bed.app.bundle().current(), *bundle_before);
    assert!(
        !jwt_keys(&mut a)
            .await
            .iter()
            .any(|k| k.key_id == "unaudited")
    );
    let after = rotation(
        admin
            .get_rotation(spb::GetRotationRequest {})
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(after, before, "no rotation step was taken");
    let e = keys
        .get_public_key(km::GetPublicKeyRequest {
            key_id: "unaudited".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let token_labels: Vec<String> = bed
        .token()
        .session()
        .unwrap()
        .list_keys()
        .unwrap()
        .into_iter()
        .map(|k| k.label)
        .collect();
    assert!(
        !token_labels.iter().any(|l| l.contains("/unaudited/")),
        "the unaudited key was destroyed: {token_labels:?}"
    );
    let audit = bed.audit();
    assert!(
        !audit[audit_before..]
            .iter()
            .any(|l| l["key_id"] == "unaudited" && l["outcome"] != "refused"),
        "{:?}",
        &audit[audit_before..]
    );

    // With the log writable again the same publication goes through, its line first.
    assert!(
        publish(&mut a, fresh_key("audited"))
            .await
            .unwrap()
            .iter()
            .any(|k| k.key_id == "audited")
    );
    assert_eq!(published_lines(&bed, "audited"), 1);
    bed.stop().await;
}
