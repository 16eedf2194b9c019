//! Operations: health probes on the plain-HTTP operations listener (no credential), gRPC health and reflection
//! for authenticated clients, and an audit log that cannot be written stops issuance (UNAVAILABLE) instead of
//! issuing unaudited.

use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

use crate::support::bed::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    let Some(bed) = Bed::start_with(|c| c.server.metrics = Some("127.0.0.1:0".into())).await else {
        return;
    };
    // Orchestrators' probes need no credential: plain HTTP on the operations listener.
    let ops = bed
        .app
        .metrics_addr()
        .expect("the operations listener is on");
    for path in ["/healthz", "/readyz"] {
        let (status, body) = http_get(ops, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body.trim(), "serving", "{path}");
    }
    let (status, _) = http_get(ops, "/nothing").await;
    assert_eq!(status, 404);
    let (status, body) = http_get(ops, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    // gRPC health and reflection answer authenticated clients.
    let ch = bed.channel(Some(&bed.admin())).await;
    let mut h = HealthClient::new(ch.clone());
    for service in [
        "",
        "signet.v1.Issuer",
        "spire.plugin.server.upstreamauthority.v1.UpstreamAuthority",
    ] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = next(&mut stream).await;
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "signet.v1.Issuer",
        "signet.v1.Admin",
        "spire.plugin.server.upstreamauthority.v1.UpstreamAuthority",
        "spire.plugin.server.keymanager.v1.KeyManager",
    ] {
        assert!(names.iter().any(|n| n == s), "{s} not listed: {names:?}");
    }
    bed.stop().await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_audit_log_stops_issuance() {
    // /dev/full opens, and fails every write with ENOSPC.
    let Some(bed) = Bed::start_with(|c| c.server.audit_log = "/dev/full".into()).await else {
        return;
    };
    let mut c = IssuerClient::new(bed.channel(Some(&bed.admin())).await);
    let e = c
        .mint_jwtsvid(pb::MintJwtsvidRequest {
            spiffe_id: "spiffe://example.org/workloads/a".into(),
            audience: vec!["a".into()],
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("audit log"), "{}", e.message());
    let (csr, _) = csr_for("spiffe://example.org/workloads/b");
    let e = c
        .batch_mint_x509svid(pb::BatchMintX509svidRequest {
            requests: vec![pb::X509svidRequest {
                csr,
                ttl_seconds: 60,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    bed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_subscriptions() {
    use signet_proto::spire::plugin::server::upstreamauthority::v1 as ua;
    use signet_proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_client::UpstreamAuthorityClient;
    let Some(bed) = Bed::start().await else {
        return;
    };
    let spire = bed.credential_for(SPIRE_A).await;
    let mut c = UpstreamAuthorityClient::new(bed.channel(Some(&spire)).await);
    let mut s = c
        .subscribe_to_local_bundle(ua::SubscribeToLocalBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    next(&mut s).await;
    // The appliance stops although a subscriber is connected, and the subscriber sees its stream end.
    bed.stop().await;
    let end = tokio::time::timeout(std::time::Duration::from_secs(60), s.message())
        .await
        .expect("the stream ends after shutdown");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
}

/// GET `path` from `addr` over HTTP/1.1: the status code and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        s.read_to_string(&mut raw),
    )
    .await
    .expect("an answer within 30 s")
    .unwrap();
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {raw:?}"));
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
