//! Bad input: malformed CSRs, empty requests, a 10,000-CSR batch and oversize messages get clear errors, and the
//! server keeps serving.

use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use signet_proto::spire::plugin::server::keymanager::v1 as km;
use signet_proto::spire::plugin::server::keymanager::v1::key_manager_client::KeyManagerClient;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as ua;
use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_client::UpstreamAuthorityClient;
use tonic::Code;

use crate::support::bed::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_empty_requests_get_clear_errors() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let admin = bed.admin();
    let ch = bed.channel(Some(&admin)).await;
    let mut c = IssuerClient::new(ch.clone());

    let r = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: vec![
                pb::X509svidRequest {
                    csr: b"not a CSR".to_vec(),
                    ttl_seconds: 60,
                },
                pb::X509svidRequest {
                    csr: Vec::new(),
                    ttl_seconds: 60,
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    for res in &r.results {
        assert_eq!(expect_failure(res).code, Code::InvalidArgument as i32);
    }
    // A larger batch (its SPIFFE IDs are read on the CPU pool, not on the request's thread) mixing good and bad
    // CSRs: each gets its own answer, in order.
    let good = |i: usize| pb::X509svidRequest {
        csr: csr_for(&format!("spiffe://example.org/workloads/mixed-{i}")).0,
        ttl_seconds: 60,
    };
    let bad = |csr: &[u8]| pb::X509svidRequest {
        csr: csr.to_vec(),
        ttl_seconds: 60,
    };
    let (no_uri, _) = {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names =
            vec![rcgen::SanType::DnsName("a.example.org".try_into().unwrap())];
        (params.serialize_request(&kp).unwrap().der().to_vec(), kp)
    };
    let r = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: vec![
                good(0),
                bad(b"not a CSR"),
                good(2),
                bad(&no_uri),
                good(4),
                good(5),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 6);
    for (i, res) in r.results.into_iter().enumerate() {
        if i == 1 || i == 3 {
            let f = expect_failure(&res);
            assert_eq!(f.code, Code::InvalidArgument as i32, "{i}: {f:?}");
            if i == 3 {
                assert!(f.message.contains("no URI SAN"), "{}", f.message);
            }
        } else {
            let svid = expect_svid(res);
            assert_eq!(
                svid.spiffe_id,
                format!("spiffe://example.org/workloads/mixed-{i}")
            );
        }
    }
    // A CSR whose signature does not verify.
    let (mut csr, _) = csr_for("spiffe://example.org/workloads/t");
    let last = csr.len() - 2;
    csr[last] ^= 0x55;
    let r = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: vec![pb::X509svidRequest {
                csr,
                ttl_seconds: 60,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        expect_failure(&r.results[0]).code,
        Code::InvalidArgument as i32
    );

    let e = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest { requests: vec![] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("empty"), "{}", e.message());
    let e = c
        .mint_jwtsvid(pb::MintJwtsvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let mut u = UpstreamAuthorityClient::new(ch.clone());
    let e = u
        .mint_x509ca_and_subscribe(ua::MintX509caRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = u
        .mint_x509ca_and_subscribe(ua::MintX509caRequest {
            csr: vec![0x30, 0x03, 1, 2, 3],
            preferred_ttl: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = u
        .publish_jwt_key_and_subscribe(ua::PublishJwtKeyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let mut k = KeyManagerClient::new(ch.clone());
    let e = k
        .generate_key(km::GenerateKeyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = k
        .generate_key(km::GenerateKeyRequest {
            key_id: "x".into(),
            key_type: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = k
        .sign_data(km::SignDataRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    still_serving(&mut c).await;
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_batches_and_oversize_messages_are_bounded() {
    let Some(bed) = Bed::start().await else {
        return;
    };
    let mut c = IssuerClient::new(bed.channel(Some(&bed.admin())).await);
    let (csr, _) = csr_for("spiffe://example.org/workloads/many");
    let requests = vec![
        pb::X509svidRequest {
            csr,
            ttl_seconds: 60
        };
        10_000
    ];
    let e = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest { requests })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("limit of 1000"), "{}", e.message());
    let audit = bed.audit();
    assert!(
        audit_lines(&audit, ADMIN, "BatchMintX509SVID")
            .iter()
            .any(|l| l["outcome"] == "refused")
    );

    // A 5 MiB message, beyond the 4 MiB limit.
    let e = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: vec![pb::X509svidRequest {
                csr: vec![0u8; 5 << 20],
                ttl_seconds: 60,
            }],
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{e:?}"
    );
    assert!(e.message().contains("too large"), "{}", e.message());

    // The full batch limit works.
    let (csr, _) = csr_for("spiffe://example.org/workloads/many");
    let r = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: vec![
                pb::X509svidRequest {
                    csr,
                    ttl_seconds: 60
                };
                200
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 200);
    let serials: std::collections::HashSet<String> = r
        .results
        .into_iter()
        .map(|x| expect_svid(x).serial)
        .collect();
    assert_eq!(serials.len(), 200, "every certificate has its own serial");
    still_serving(&mut c).await;
    bed.stop().await;
}
