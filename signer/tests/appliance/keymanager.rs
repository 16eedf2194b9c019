//! SPIRE's KeyManager v1 over gRPC: keys on the token per calling server, signatures verified with ring against
//! GetPublicKey's key, replacement, NOT_FOUND, and digest checks.

use ring::signature::{self, UnparsedPublicKey};
use signet_proto::spire::plugin::server::keymanager::v1 as pb;
use signet_proto::spire::plugin::server::keymanager::v1::key_manager_client::KeyManagerClient;
use tonic::Code;
use x509_parser::prelude::FromDer as _;

use crate::support::bed::*;

fn raw_key(spki: &[u8]) -> Vec<u8> {
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).unwrap();
    info.subject_public_key.data.to_vec()
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// SignData over the SHA-256 digest of `msg`, with the hash named in the request.
async fn sign_sha256(
    c: &mut KeyManagerClient<tonic::transport::Channel>,
    id: &str,
    msg: &[u8],
) -> pb::SignDataResponse {
    c.sign_data(pb::SignDataRequest {
        key_id: id.into(),
        data: sha256(msg),
        signer_opts: Some(pb::sign_data_request::SignerOpts::HashAlgorithm(
            pb::HashAlgorithm::Sha256 as i32,
        )),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn generate(
    c: &mut KeyManagerClient<tonic::transport::Channel>,
    id: &str,
    t: pb::KeyType,
) -> pb::PublicKey {
    c.generate_key(pb::GenerateKeyRequest {
        key_id: id.into(),
        key_type: t as i32,
    })
    .await
    .unwrap()
    .into_inner()
    .public_key
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_sign_verifiably_and_are_distinct_per_caller() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let a = bed.credential_for(SPIRE_A).await;
    let b = bed.credential_for(SPIRE_B).await;
    let mut ka = KeyManagerClient::new(bed.channel(Some(&a)).await);
    let mut kb = KeyManagerClient::new(bed.channel(Some(&b)).await);

    let pa = generate(&mut ka, "x509-CA-A", pb::KeyType::EcP256).await;
    assert_eq!(pa.id, "x509-CA-A");
    assert_eq!(pa.r#type, pb::KeyType::EcP256 as i32);
    assert_eq!(pa.fingerprint, hex::encode(sha256(&pa.pkix_data)));
    let got = ka
        .get_public_key(pb::GetPublicKeyRequest {
            key_id: "x509-CA-A".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .public_key
        .unwrap();
    assert_eq!(got, pa);

    // SignData: a SHA-256 digest, an ASN.1 DER ECDSA signature that ring verifies over the message.
    let msg = b"to be signed by the SPIRE server's CA key";
    let resp = sign_sha256(&mut ka, "x509-CA-A", msg).await;
    assert_eq!(resp.key_fingerprint, pa.fingerprint);
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, raw_key(&pa.pkix_data))
        .verify(msg, &resp.signature)
        .expect("ring verifies the signature");
    assert!(
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, raw_key(&pa.pkix_data))
            .verify(b"another message", &resp.signature)
            .is_err()
    );

    // Another server's key with the same id is another key; it cannot see or use A's keys.
    let pb_ = generate(&mut kb, "x509-CA-A", pb::KeyType::EcP256).await;
    assert_ne!(pb_.pkix_data, pa.pkix_data);
    assert_ne!(pb_.fingerprint, pa.fingerprint);
    let e = kb
        .get_public_key(pb::GetPublicKeyRequest {
            key_id: "JWT-Signer-A".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    generate(&mut ka, "JWT-Signer-A", pb::KeyType::EcP384).await;
    let listed_a = ka
        .get_public_keys(pb::GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    let listed_b = kb
        .get_public_keys(pb::GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed_a.public_keys.len(), 2);
    assert_eq!(listed_b.public_keys.len(), 1);
    let e = kb
        .sign_data(pb::SignDataRequest {
            key_id: "JWT-Signer-A".into(),
            data: sha256(msg),
            signer_opts: Some(pb::sign_data_request::SignerOpts::HashAlgorithm(
                pb::HashAlgorithm::Sha384 as i32,
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // GenerateKey on an existing id: a new key and fingerprint; signatures now come from the new key.
    let pa2 = generate(&mut ka, "x509-CA-A", pb::KeyType::EcP256).await;
    assert_ne!(pa2.fingerprint, pa.fingerprint);
    let resp = sign_sha256(&mut ka, "x509-CA-A", msg).await;
    assert_eq!(resp.key_fingerprint, pa2.fingerprint);
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, raw_key(&pa2.pkix_data))
        .verify(msg, &resp.signature)
        .expect("signed by the new key");

    // Digest length and hash are checked.
    for (data, opts) in [
        (vec![0u8; 20], pb::HashAlgorithm::Sha256),
        (sha256(msg), pb::HashAlgorithm::Sha384),
        (sha256(msg), pb::HashAlgorithm::Sha3256),
    ] {
        let e = ka
            .sign_data(pb::SignDataRequest {
                key_id: "x509-CA-A".into(),
                data,
                signer_opts: Some(pb::sign_data_request::SignerOpts::HashAlgorithm(
                    opts as i32,
                )),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    let audit = bed.audit();
    assert!(
        audit_lines(&audit, SPIRE_A, "SignData")
            .iter()
            .any(|l| l["outcome"] == "key_used")
    );

    // After a restart the keys are found on the token again, with the same fingerprints (the replaced key is gone).
    let root_before = bed.app.bundle().current().x509_roots.clone();
    let bed = bed.restart().await;
    assert_eq!(
        bed.app.bundle().current().x509_roots,
        root_before,
        "the root is reused"
    );
    let mut ka = KeyManagerClient::new(bed.channel(Some(&a)).await);
    let after = ka
        .get_public_keys(pb::GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    let fps: Vec<&str> = after
        .public_keys
        .iter()
        .map(|k| k.fingerprint.as_str())
        .collect();
    assert_eq!(after.public_keys.len(), 2);
    assert!(fps.contains(&pa2.fingerprint.as_str()));
    assert!(!fps.contains(&pa.fingerprint.as_str()));
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_keys_sign_pkcs1_and_pss() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let a = bed.credential_for(SPIRE_A).await;
    let mut ka = KeyManagerClient::new(bed.channel(Some(&a)).await);
    let p = generate(&mut ka, "JWT-Signer-B", pb::KeyType::Rsa2048).await;
    let msg = b"rsa message";
    let pkcs1 = sign_sha256(&mut ka, "JWT-Signer-B", msg).await;
    UnparsedPublicKey::new(
        &signature::RSA_PKCS1_2048_8192_SHA256,
        raw_key(&p.pkix_data),
    )
    .verify(msg, &pkcs1.signature)
    .expect("PKCS#1 v1.5 verifies");
    let pss = ka
        .sign_data(pb::SignDataRequest {
            key_id: "JWT-Signer-B".into(),
            data: sha256(msg),
            signer_opts: Some(pb::sign_data_request::SignerOpts::PssOptions(
                pb::sign_data_request::PssOptions {
                    salt_length: -1,
                    hash_algorithm: pb::HashAlgorithm::Sha256 as i32,
                },
            )),
        })
        .await
        .unwrap()
        .into_inner();
    UnparsedPublicKey::new(&signature::RSA_PSS_2048_8192_SHA256, raw_key(&p.pkix_data))
        .verify(msg, &pss.signature)
        .expect("PSS verifies");
    bed.stop().await;
}

/// Bad KeyManager requests get the status that says what is wrong (never UNAVAILABLE, which SPIRE retries without
/// end), make no key, and each leave an audit line with that code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status_and_make_nothing() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let a = bed.credential_for(SPIRE_A).await;
    let mut ka = KeyManagerClient::new(bed.channel(Some(&a)).await);
    let keys_before = bed.token().session().unwrap().list_keys().unwrap().len();

    // An unknown key-type enum value, and the unspecified one.
    for t in [99, 0] {
        let e = ka
            .generate_key(pb::GenerateKeyRequest {
                key_id: "x509-CA-A".into(),
                key_type: t,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "key type {t}: {e:?}");
        assert!(
            e.message().contains("key type") || e.message().contains("key_type"),
            "{}",
            e.message()
        );
    }
    assert_eq!(
        bed.token().session().unwrap().list_keys().unwrap().len(),
        keys_before,
        "no key was made"
    );
    let e = ka
        .get_public_key(pb::GetPublicKeyRequest {
            key_id: "x509-CA-A".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // SignData with an unknown key id.
    let sha256_opts = Some(pb::sign_data_request::SignerOpts::HashAlgorithm(
        pb::HashAlgorithm::Sha256 as i32,
    ));
    let e = ka
        .sign_data(pb::SignDataRequest {
            key_id: "no-such-key".into(),
            data: sha256(b"m"),
            signer_opts: sha256_opts,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // On a real key: an empty digest, a SHA-384-long digest named SHA-256, no signer options, an unknown hash enum
    // value, PSS options on an EC key.
    generate(&mut ka, "k", pb::KeyType::EcP256).await;
    let pss = Some(pb::sign_data_request::SignerOpts::PssOptions(
        pb::sign_data_request::PssOptions {
            salt_length: 32,
            hash_algorithm: pb::HashAlgorithm::Sha256 as i32,
        },
    ));
    for (what, data, opts) in [
        ("empty digest", vec![], sha256_opts),
        ("48-byte digest named SHA256", vec![7u8; 48], sha256_opts),
        ("no signer options", sha256(b"m"), None),
        (
            "unknown hash",
            sha256(b"m"),
            Some(pb::sign_data_request::SignerOpts::HashAlgorithm(1234)),
        ),
        ("PSS on EC", sha256(b"m"), pss),
    ] {
        let e = ka
            .sign_data(pb::SignDataRequest {
                key_id: "k".into(),
                data,
                signer_opts: opts,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }

    let audit = bed.audit();
    let gen_lines = audit_lines(&audit, SPIRE_A, "GenerateKey");
    assert_eq!(
        gen_lines
            .iter()
            .filter(|l| l["code"] == "INVALID_ARGUMENT")
            .count(),
        2,
        "{gen_lines:?}"
    );
    let sign_lines = audit_lines(&audit, SPIRE_A, "SignData");
    assert!(
        sign_lines.iter().any(|l| l["code"] == "NOT_FOUND"),
        "{sign_lines:?}"
    );
    assert_eq!(
        sign_lines
            .iter()
            .filter(|l| l["code"] == "INVALID_ARGUMENT")
            .count(),
        5,
        "{sign_lines:?}"
    );
    assert!(
        !audit.iter().any(|l| l["code"] == "UNAVAILABLE"),
        "nothing was answered UNAVAILABLE"
    );
    bed.stop().await;
}

/// `msg` as a request that carries `key_identifier` (when given) in the plug-in's header.
fn with_id<T>(msg: T, key_identifier: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(k) = key_identifier {
        r.metadata_mut()
            .insert("signet-key-identifier", k.parse().unwrap());
    }
    r
}

async fn generate_as(
    c: &mut KeyManagerClient<tonic::transport::Channel>,
    key_identifier: Option<&str>,
    id: &str,
) -> Result<pb::PublicKey, tonic::Status> {
    c.generate_key(with_id(
        pb::GenerateKeyRequest {
            key_id: id.into(),
            key_type: pb::KeyType::EcP256 as i32,
        },
        key_identifier,
    ))
    .await
    .map(|r| r.into_inner().public_key.unwrap())
}

async fn sign_as(
    c: &mut KeyManagerClient<tonic::transport::Channel>,
    key_identifier: Option<&str>,
    id: &str,
    msg: &[u8],
) -> Result<pb::SignDataResponse, tonic::Status> {
    c.sign_data(with_id(
        pb::SignDataRequest {
            key_id: id.into(),
            data: sha256(msg),
            signer_opts: Some(pb::sign_data_request::SignerOpts::HashAlgorithm(
                pb::HashAlgorithm::Sha256 as i32,
            )),
        },
        key_identifier,
    ))
    .await
    .map(|r| r.into_inner())
}

async fn ids_as(
    c: &mut KeyManagerClient<tonic::transport::Channel>,
    key_identifier: Option<&str>,
) -> Vec<(String, String)> {
    c.get_public_keys(with_id(pb::GetPublicKeysRequest {}, key_identifier))
        .await
        .unwrap()
        .into_inner()
        .public_keys
        .into_iter()
        .map(|k| (k.id, k.fingerprint))
        .collect()
}

fn km_labels(bed: &Bed) -> Vec<String> {
    let mut l: Vec<String> = bed
        .token()
        .session()
        .unwrap()
        .list_keys()
        .unwrap()
        .into_iter()
        .map(|k| k.label)
        .filter(|l| l.starts_with("spire-km/"))
        .collect();
    l.sort();
    l
}

fn verifies(pk: &pb::PublicKey, msg: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, raw_key(&pk.pkix_data))
        .verify(msg, sig)
        .is_ok()
}

/// Two SPIRE servers with one SPIFFE ID and different key identifiers (an HA pair), and one without: three
/// namespaces. Neither sees, signs with nor replaces another's keys, over the wire; a bad identifier is
/// INVALID_ARGUMENT, audited, and makes nothing; no identifier keeps the namespace keys had before identifiers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_identifiers_keep_servers_of_one_spiffe_id_apart() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let cred = bed.credential_for(SPIRE_A).await;
    let mut c = KeyManagerClient::new(bed.channel(Some(&cred)).await);

    let a = generate_as(&mut c, Some("spire-a"), "x509-CA-A")
        .await
        .unwrap();
    let b = generate_as(&mut c, Some("spire-b"), "x509-CA-A")
        .await
        .unwrap();
    let none = generate_as(&mut c, None, "x509-CA-A").await.unwrap();
    assert_ne!(a.fingerprint, b.fingerprint, "each server its own key");
    assert_ne!(a.fingerprint, none.fingerprint);
    assert_ne!(b.fingerprint, none.fingerprint);
    // Without an identifier the label's namespace is the SPIFFE ID's alone, as keys had before identifiers.
    let legacy_ns = hex::encode(&sha256(SPIRE_A.as_bytes())[..8]);
    assert_eq!(signet::api::keymanager::namespace(SPIRE_A, None), legacy_ns);
    let labels = km_labels(&bed);
    assert_eq!(labels.len(), 3, "{labels:?}");
    assert_eq!(
        labels
            .iter()
            .filter(|l| l.starts_with(&format!("spire-km/{legacy_ns}/x509-CA-A/")))
            .count(),
        1,
        "{labels:?}"
    );

    // Each sees only its own key.
    for (k, want) in [(Some("spire-a"), &a), (Some("spire-b"), &b), (None, &none)] {
        assert_eq!(
            ids_as(&mut c, k).await,
            vec![("x509-CA-A".to_string(), want.fingerprint.clone())],
            "{k:?}"
        );
        let s = sign_as(&mut c, k, "x509-CA-A", b"m").await.unwrap();
        assert_eq!(s.key_fingerprint, want.fingerprint, "{k:?}");
        assert!(verifies(want, b"m", &s.signature), "{k:?}");
    }

    // B replaces its key: A's is untouched and still signs; B's old key is gone from the token.
    let b2 = generate_as(&mut c, Some("spire-b"), "x509-CA-A")
        .await
        .unwrap();
    assert_ne!(b2.fingerprint, b.fingerprint);
    let s = sign_as(&mut c, Some("spire-a"), "x509-CA-A", b"after")
        .await
        .unwrap();
    assert_eq!(s.key_fingerprint, a.fingerprint);
    assert!(verifies(&a, b"after", &s.signature));
    assert_eq!(km_labels(&bed).len(), 3);

    // A key only A has is NOT_FOUND for B, whichever call B makes.
    generate_as(&mut c, Some("spire-a"), "JWT-Signer-A")
        .await
        .unwrap();
    let e = sign_as(&mut c, Some("spire-b"), "JWT-Signer-A", b"m")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .get_public_key(with_id(
            pb::GetPublicKeyRequest {
                key_id: "JWT-Signer-A".into(),
            },
            Some("spire-b"),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(ids_as(&mut c, Some("spire-b")).await.len(), 1);

    // Bad identifiers: refused, audited, nothing made.
    let before = km_labels(&bed);
    let long = "x".repeat(129);
    for bad in ["a/b", "a b", "", long.as_str(), "spire-a;drop"] {
        let e = generate_as(&mut c, Some(bad), "x509-CA-B")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
        assert!(
            e.message().contains("signet-key-identifier"),
            "{}",
            e.message()
        );
        let e = sign_as(&mut c, Some(bad), "x509-CA-A", b"m")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
    }
    assert_eq!(km_labels(&bed), before, "no key was made");
    let audit = bed.audit();
    assert_eq!(
        audit_lines(&audit, SPIRE_A, "GenerateKey")
            .iter()
            .filter(|l| l["code"] == "INVALID_ARGUMENT")
            .count(),
        5
    );
    bed.stop().await;
}

/// The sweep, on a clock the test moves: a namespace unused for `sweep_after` loses its keys on the token (audit
/// line), one used within the window keeps them and keeps signing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_namespaces_are_swept_and_used_ones_kept() {
    use signet::ca::ManualClock;
    use std::time::Duration;
    let clock = ManualClock::new(time::OffsetDateTime::now_utc());
    let Some(bed) = Bed::start_clocked(
        |c| {
            c.authority.rotation.schedule = false;
            c.key_manager.sweep_after = signet::config::ConfigDuration(Duration::from_secs(3600));
            c.key_manager.sweep_every = signet::config::ConfigDuration(Duration::from_millis(200));
        },
        std::sync::Arc::new(clock.clone()),
    )
    .await
    else {
        return;
    };
    let cred = bed.credential_for(SPIRE_A).await;
    let mut c = KeyManagerClient::new(bed.channel(Some(&cred)).await);
    let live = generate_as(&mut c, Some("live"), "x509-CA-A")
        .await
        .unwrap();
    generate_as(&mut c, Some("gone"), "x509-CA-A")
        .await
        .unwrap();
    generate_as(&mut c, Some("gone"), "JWT-Signer-A")
        .await
        .unwrap();
    let gone_ns = signet::api::keymanager::namespace(SPIRE_A, Some("gone"));
    let live_ns = signet::api::keymanager::namespace(SPIRE_A, Some("live"));
    let on_token = |ns: &str| {
        km_labels(&bed)
            .into_iter()
            .filter(|l| l.starts_with(&format!("spire-km/{ns}/")))
            .count()
    };
    assert_eq!((on_token(&gone_ns), on_token(&live_ns)), (2, 1));

    // 40 minutes on, "live" is used; 30 more, "gone" has been unused for 70 minutes (window 60 + 5 of slack),
    // "live" for 30.
    clock.advance(Duration::from_secs(40 * 60));
    sign_as(&mut c, Some("live"), "x509-CA-A", b"m")
        .await
        .unwrap();
    clock.advance(Duration::from_secs(30 * 60));
    crate::support::wait::wait_until_async(
        "the unused namespace was swept",
        Duration::from_secs(30),
        || {
            let gone = on_token(&gone_ns) == 0;
            async move { gone }
        },
    )
    .await;
    assert_eq!(
        on_token(&live_ns),
        1,
        "the namespace used within the window keeps its key"
    );
    let s = sign_as(&mut c, Some("live"), "x509-CA-A", b"still")
        .await
        .unwrap();
    assert!(verifies(&live, b"still", &s.signature));
    let e = sign_as(&mut c, Some("gone"), "x509-CA-A", b"m")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let audit = bed.audit();
    let swept = audit_lines(&audit, SPIRE_A, "Sweep");
    assert_eq!(swept.len(), 1, "{swept:?}");
    assert_eq!(swept[0]["outcome"], "destroyed");
    assert_eq!(swept[0]["service"], "key-manager");
    assert_eq!(swept[0]["key_id"], "JWT-Signer-A,x509-CA-A");
    let reason = swept[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&gone_ns)
            && reason.contains("\"gone\"")
            && reason.contains("2 key(s) destroyed"),
        "{reason}"
    );

    // The swept server comes back: a fresh namespace, new keys.
    let again = generate_as(&mut c, Some("gone"), "x509-CA-A")
        .await
        .unwrap();
    assert_eq!(on_token(&gone_ns), 1);
    let s = sign_as(&mut c, Some("gone"), "x509-CA-A", b"back")
        .await
        .unwrap();
    assert!(verifies(&again, b"back", &s.signature));
    bed.stop().await;
}
