//! Throughput figures over gRPC + mTLS on loopback (ignored by default; they print numbers):
//! `cargo test --release -p signet --test appliance figures -- --ignored --nocapture`.

use std::time::Instant;

use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::issuer_client::IssuerClient;

use crate::support::bed::*;

async fn batch_rate(bed: &Bed, label: &str) {
    let ch = bed.channel(Some(&bed.admin())).await;
    let (csr, _) = csr_for("spiffe://example.org/workloads/bench");
    let batch = vec![
        pb::X509svidRequest {
            csr,
            ttl_seconds: 600
        };
        1000
    ];
    let clients = 4;
    let rounds = 5;
    // Warm-up.
    IssuerClient::new(ch.clone())
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: batch.clone(),
        })
        .await
        .unwrap();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (ch, batch) = (ch.clone(), batch.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = IssuerClient::new(ch);
            let mut n = 0;
            for _ in 0..rounds {
                let r = c
                    .batch_mint_x509svid(pb::BatchMintX509svidRequest {
                        requests: batch.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                for x in r.results {
                    expect_svid(x);
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{label}: {total} X509-SVIDs in {secs:.2} s = {:.0}/s ({clients} clients x {rounds} batches of 1000)",
        total as f64 / secs
    );
    assert_eq!(total, clients * rounds * 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a figure, not a check: run with --release --ignored --nocapture"]
async fn figures_batch_issuance() {
    let Some(bed) = Bed::start_with(|c| {
        c.pipeline.cpu_threads = 0;
        c.tokens[0].sessions = 2;
    })
    .await
    else {
        return;
    };
    batch_rate(&bed, "direct mode (SoftHSM2, 2 sessions)").await;
    bed.stop().await;
    let Some(bed) = Bed::start_with(|c| {
        c.pipeline.cpu_threads = 0;
        c.authority.x509.mode = signet::config::ModeSetting::Delegated;
    })
    .await
    else {
        return;
    };
    batch_rate(&bed, "delegated mode").await;
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a figure, not a check: run with --release --ignored --nocapture"]
async fn figures_key_manager_sign_data() {
    use signet_proto::spire::plugin::server::keymanager::v1 as km;
    use signet_proto::spire::plugin::server::keymanager::v1::key_manager_client::KeyManagerClient;
    let Some(bed) = Bed::start_with(|c| {
        c.pipeline.cpu_threads = 0;
        c.tokens[0].sessions = 2;
    })
    .await
    else {
        return;
    };
    let spire = bed.credential_for(SPIRE_A).await;
    let ch = bed.channel(Some(&spire)).await;
    KeyManagerClient::new(ch.clone())
        .generate_key(km::GenerateKeyRequest {
            key_id: "x509-CA-A".into(),
            key_type: km::KeyType::EcP256 as i32,
        })
        .await
        .unwrap();
    let (clients, per_client) = (32, 500);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = KeyManagerClient::new(ch);
            for i in 0..per_client {
                let digest = ring::digest::digest(&ring::digest::SHA256, &[i as u8; 8]);
                c.sign_data(km::SignDataRequest {
                    key_id: "x509-CA-A".into(),
                    data: digest.as_ref().to_vec(),
                    signer_opts: Some(km::sign_data_request::SignerOpts::HashAlgorithm(
                        km::HashAlgorithm::Sha256 as i32,
                    )),
                })
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let total = clients * per_client;
    println!(
        "KeyManager SignData (P-256, SoftHSM2, 2 sessions): {total} signatures in {secs:.2} s = {:.0}/s ({clients} concurrent callers, one connection)",
        total as f64 / secs
    );
    bed.stop().await;
}
