//! Wire facts of the SPIRE plug-in API that must never drift: full method paths, field numbers and field
//! types, read back from the compiled descriptors; byte-level encodings of a few messages; and a round trip
//! of the generated client and server over loopback gRPC.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: a failed expectation is the test failing

use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorSet};
use signet_proto::spire::plugin::server::keymanager::v1 as km;
use signet_proto::spire::plugin::server::upstreamauthority::v1 as ua;
use signet_proto::spire::plugin::types;

fn descriptors() -> FileDescriptorSet {
    FileDescriptorSet::decode(signet_proto::FILE_DESCRIPTOR_SET).expect("descriptor set decodes")
}

fn find_message<'a>(fds: &'a FileDescriptorSet, full_name: &str) -> &'a DescriptorProto {
    let (package, name) = full_name.rsplit_once('.').expect("qualified name");
    for file in &fds.file {
        if file.package() != package {
            continue;
        }
        for msg in &file.message_type {
            if msg.name() == name {
                return msg;
            }
        }
    }
    panic!("message {full_name} is not in the descriptor set");
}

#[test]
fn method_paths_match_spire() {
    let fds = descriptors();
    let mut paths = Vec::new();
    for file in &fds.file {
        for svc in &file.service {
            for method in &svc.method {
                paths.push((
                    format!("/{}.{}/{}", file.package(), svc.name(), method.name()),
                    method.server_streaming(),
                    method.client_streaming(),
                ));
            }
        }
    }
    let expected = [
        (
            "/spire.plugin.server.upstreamauthority.v1.UpstreamAuthority/MintX509CAAndSubscribe",
            true,
            false,
        ),
        (
            "/spire.plugin.server.upstreamauthority.v1.UpstreamAuthority/PublishJWTKeyAndSubscribe",
            true,
            false,
        ),
        (
            "/spire.plugin.server.upstreamauthority.v1.UpstreamAuthority/SubscribeToLocalBundle",
            true,
            false,
        ),
        (
            "/spire.plugin.server.keymanager.v1.KeyManager/GenerateKey",
            false,
            false,
        ),
        (
            "/spire.plugin.server.keymanager.v1.KeyManager/GetPublicKey",
            false,
            false,
        ),
        (
            "/spire.plugin.server.keymanager.v1.KeyManager/GetPublicKeys",
            false,
            false,
        ),
        (
            "/spire.plugin.server.keymanager.v1.KeyManager/SignData",
            false,
            false,
        ),
        (
            "/spire.service.common.config.v1.Config/Configure",
            false,
            false,
        ),
        (
            "/spire.service.common.config.v1.Config/Validate",
            false,
            false,
        ),
        ("/spire.service.private.init.v1.Init/Init", false, false),
        ("/spire.service.private.init.v1.Init/Deinit", false, false),
        ("/plugin.GRPCBroker/StartStream", true, true),
        ("/plugin.GRPCController/Shutdown", false, false),
        ("/plugin.GRPCStdio/StreamStdio", true, false),
    ];
    for (path, server_streaming, client_streaming) in expected {
        let found = paths.iter().find(|(p, _, _)| p == path);
        let Some((_, s, c)) = found else {
            panic!("method {path} is missing");
        };
        assert_eq!(
            (*s, *c),
            (server_streaming, client_streaming),
            "streaming shape of {path}"
        );
    }
}

#[test]
fn field_numbers_and_types_match_spire() {
    use Type::*;
    let fds = descriptors();
    let table: &[(&str, &str, i32, Type)] = &[
        ("spire.plugin.types.X509Certificate", "asn1", 1, Bytes),
        ("spire.plugin.types.X509Certificate", "tainted", 2, Bool),
        ("spire.plugin.types.JWTKey", "public_key", 1, Bytes),
        ("spire.plugin.types.JWTKey", "key_id", 2, String),
        ("spire.plugin.types.JWTKey", "expires_at", 3, Int64),
        ("spire.plugin.types.JWTKey", "tainted", 4, Bool),
        (
            "spire.plugin.server.upstreamauthority.v1.MintX509CARequest",
            "csr",
            1,
            Bytes,
        ),
        (
            "spire.plugin.server.upstreamauthority.v1.MintX509CARequest",
            "preferred_ttl",
            2,
            Int32,
        ),
        (
            "spire.plugin.server.upstreamauthority.v1.MintX509CAResponse",
            "x509_ca_chain",
            1,
            Message,
        ),
        (
            "spire.plugin.server.upstreamauthority.v1.MintX509CAResponse",
            "upstream_x509_roots",
            2,
            Message,
        ),
        (
            "spire.plugin.server.upstreamauthority.v1.PublishJWTKeyRequest",
            "jwt_key",
            1,
            Message,
        ),
        (
            "spire.plugin.server.upstreamauthority.v1.PublishJWTKeyResponse",
            "upstream_jwt_keys",
            1,
            Message,
        ),
        (
            "spire.plugin.server.upstreamauthority.v1.SubscribeToLocalBundleResponse",
            "upstream_x509_roots",
            1,
            Message,
        ),
        (
            "spire.plugin.server.upstreamauthority.v1.SubscribeToLocalBundleResponse",
            "upstream_jwt_keys",
            2,
            Message,
        ),
        (
            "spire.plugin.server.keymanager.v1.PublicKey",
            "id",
            1,
            String,
        ),
        (
            "spire.plugin.server.keymanager.v1.PublicKey",
            "type",
            2,
            Enum,
        ),
        (
            "spire.plugin.server.keymanager.v1.PublicKey",
            "pkix_data",
            3,
            Bytes,
        ),
        (
            "spire.plugin.server.keymanager.v1.PublicKey",
            "fingerprint",
            4,
            String,
        ),
        (
            "spire.plugin.server.keymanager.v1.GenerateKeyRequest",
            "key_id",
            1,
            String,
        ),
        (
            "spire.plugin.server.keymanager.v1.GenerateKeyRequest",
            "key_type",
            2,
            Enum,
        ),
        (
            "spire.plugin.server.keymanager.v1.SignDataRequest",
            "key_id",
            1,
            String,
        ),
        (
            "spire.plugin.server.keymanager.v1.SignDataRequest",
            "data",
            2,
            Bytes,
        ),
        (
            "spire.plugin.server.keymanager.v1.SignDataRequest",
            "hash_algorithm",
            3,
            Enum,
        ),
        (
            "spire.plugin.server.keymanager.v1.SignDataRequest",
            "pss_options",
            4,
            Message,
        ),
        (
            "spire.plugin.server.keymanager.v1.SignDataResponse",
            "signature",
            1,
            Bytes,
        ),
        (
            "spire.plugin.server.keymanager.v1.SignDataResponse",
            "key_fingerprint",
            2,
            String,
        ),
        (
            "spire.service.common.config.v1.ConfigureRequest",
            "core_configuration",
            1,
            Message,
        ),
        (
            "spire.service.common.config.v1.ConfigureRequest",
            "hcl_configuration",
            2,
            String,
        ),
        (
            "spire.service.common.config.v1.ValidateResponse",
            "valid",
            1,
            Bool,
        ),
        (
            "spire.service.common.config.v1.ValidateResponse",
            "notes",
            2,
            String,
        ),
        (
            "spire.service.common.config.v1.CoreConfiguration",
            "trust_domain",
            1,
            String,
        ),
        (
            "spire.service.private.init.v1.InitRequest",
            "host_service_names",
            1,
            String,
        ),
        (
            "spire.service.private.init.v1.InitResponse",
            "plugin_service_names",
            1,
            String,
        ),
        ("plugin.ConnInfo", "service_id", 1, Uint32),
        ("plugin.ConnInfo", "network", 2, String),
        ("plugin.ConnInfo", "address", 3, String),
        ("plugin.ConnInfo", "knock", 4, Message),
        ("plugin.StdioData", "channel", 1, Enum),
        ("plugin.StdioData", "data", 2, Bytes),
    ];
    for &(message, field, number, ty) in table {
        let msg = find_message(&fds, message);
        let Some(f) = msg.field.iter().find(|f| f.name() == field) else {
            panic!("{message}.{field} is missing");
        };
        assert_eq!(f.number(), number, "field number of {message}.{field}");
        assert_eq!(f.r#type(), ty, "type of {message}.{field}");
    }
    // The oneof that carries the signer options.
    let sign = find_message(&fds, "spire.plugin.server.keymanager.v1.SignDataRequest");
    assert_eq!(sign.oneof_decl.len(), 1);
    assert_eq!(sign.oneof_decl[0].name(), "signer_opts");
}

#[test]
fn enum_values_match_go_crypto_hash() {
    assert_eq!(km::HashAlgorithm::Sha256 as i32, 5);
    assert_eq!(km::HashAlgorithm::Sha384 as i32, 6);
    assert_eq!(km::HashAlgorithm::Sha512 as i32, 7);
    assert_eq!(km::HashAlgorithm::Sha3256 as i32, 11);
    assert_eq!(km::HashAlgorithm::Sha512256 as i32, 15);
    assert_eq!(km::KeyType::EcP256 as i32, 1);
    assert_eq!(km::KeyType::EcP384 as i32, 2);
    assert_eq!(km::KeyType::Rsa2048 as i32, 3);
    assert_eq!(km::KeyType::Rsa4096 as i32, 4);
}

#[test]
fn encodings_are_byte_exact() {
    // MintX509CARequest { csr: [0xde, 0xad], preferred_ttl: 3600 }
    let req = ua::MintX509caRequest {
        csr: vec![0xde, 0xad],
        preferred_ttl: 3600,
    };
    assert_eq!(
        req.encode_to_vec(),
        [0x0a, 0x02, 0xde, 0xad, 0x10, 0x90, 0x1c]
    );
    // SignDataRequest { key_id: "k", data: [1], hash_algorithm: SHA256 }
    let sign = km::SignDataRequest {
        key_id: "k".into(),
        data: vec![1],
        signer_opts: Some(km::sign_data_request::SignerOpts::HashAlgorithm(
            km::HashAlgorithm::Sha256 as i32,
        )),
    };
    assert_eq!(
        sign.encode_to_vec(),
        [0x0a, 0x01, b'k', 0x12, 0x01, 0x01, 0x18, 0x05]
    );
    // JWTKey { public_key: [7], key_id: "a", expires_at: 1, tainted: true }
    let key = types::JwtKey {
        public_key: vec![7],
        key_id: "a".into(),
        expires_at: 1,
        tainted: true,
    };
    assert_eq!(
        key.encode_to_vec(),
        [0x0a, 0x01, 0x07, 0x12, 0x01, b'a', 0x18, 0x01, 0x20, 0x01]
    );
}

mod loopback {
    use super::*;
    use std::pin::Pin;
    use tokio_stream::{Stream, StreamExt, wrappers::TcpListenerStream};
    use tonic::{Request, Response, Status};
    use ua::upstream_authority_client::UpstreamAuthorityClient;
    use ua::upstream_authority_server::{UpstreamAuthority, UpstreamAuthorityServer};

    type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    /// Answers a mint with the CSR bytes echoed as the "CA" and then one root update, so the test can see the
    /// generated stream types carry data both ways.
    struct Echo;

    #[tonic::async_trait]
    impl UpstreamAuthority for Echo {
        type MintX509CAAndSubscribeStream = Stream_<ua::MintX509caResponse>;
        type PublishJWTKeyAndSubscribeStream = Stream_<ua::PublishJwtKeyResponse>;
        type SubscribeToLocalBundleStream = Stream_<ua::SubscribeToLocalBundleResponse>;

        async fn mint_x509ca_and_subscribe(
            &self,
            request: Request<ua::MintX509caRequest>,
        ) -> Result<Response<Self::MintX509CAAndSubscribeStream>, Status> {
            let csr = request.into_inner().csr;
            let cert = |asn1: Vec<u8>| types::X509Certificate {
                asn1,
                tainted: false,
            };
            let first = ua::MintX509caResponse {
                x509_ca_chain: vec![cert(csr)],
                upstream_x509_roots: vec![cert(vec![1])],
            };
            let update = ua::MintX509caResponse {
                x509_ca_chain: vec![],
                upstream_x509_roots: vec![cert(vec![2])],
            };
            Ok(Response::new(Box::pin(tokio_stream::iter([
                Ok(first),
                Ok(update),
            ]))))
        }

        async fn publish_jwt_key_and_subscribe(
            &self,
            _request: Request<ua::PublishJwtKeyRequest>,
        ) -> Result<Response<Self::PublishJWTKeyAndSubscribeStream>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn subscribe_to_local_bundle(
            &self,
            _request: Request<ua::SubscribeToLocalBundleRequest>,
        ) -> Result<Response<Self::SubscribeToLocalBundleStream>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    #[tokio::test]
    async fn generated_client_and_server_talk_over_loopback() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(UpstreamAuthorityServer::new(Echo))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let mut client = UpstreamAuthorityClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        let mut stream = client
            .mint_x509ca_and_subscribe(ua::MintX509caRequest {
                csr: vec![9, 9],
                preferred_ttl: 0,
            })
            .await
            .expect("mint")
            .into_inner();
        let first = stream.next().await.expect("first").expect("ok");
        assert_eq!(first.x509_ca_chain[0].asn1, vec![9, 9]);
        assert_eq!(first.upstream_x509_roots[0].asn1, vec![1]);
        let update = stream.next().await.expect("update").expect("ok");
        assert!(update.x509_ca_chain.is_empty());
        assert_eq!(update.upstream_x509_roots[0].asn1, vec![2]);
        assert!(stream.next().await.is_none());
        let err = client
            .subscribe_to_local_bundle(ua::SubscribeToLocalBundleRequest {})
            .await
            .expect_err("unimplemented");
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        server.abort();
    }
}
