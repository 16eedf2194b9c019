//! SPIRE's KeyManager v1 over gRPC: keys on the token per calling server, signatures verified with ring against
//! GetPublicKey's key, replacement, NOT_FOUND, and digest checks.

use ring::signature::{self, UnparsedPublicKey};
use signet_proto::spire::plugin::server::keymanager::v1 as pb;
use signet_proto::spire::plugin::server::keymanager::v1::key_manager_client::KeyManagerClient;
use tonic::Code;
use x509_parser::prelude::FromDer as _;

use crate::common::*;

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
