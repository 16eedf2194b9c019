//! Compiles the .proto files with protox (a protobuf compiler in pure Rust, so no `protoc` is needed on the
//! machine) and generates prost messages and tonic clients and servers from the result. The encoded file
//! descriptor set is written next to the generated code for gRPC server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "spire/plugin/types/x509certificate.proto",
    "spire/plugin/types/jwtkey.proto",
    "spire/plugin/server/upstreamauthority/v1/upstreamauthority.proto",
    "spire/plugin/server/keymanager/v1/keymanager.proto",
    "spire/service/common/config/v1/config.proto",
    "spire/service/private/init/v1/init.proto",
    "plugin/go_plugin.proto",
    "signet/v1/signet.proto",
];

/// SPIRE's server API, as vendored from spire-api-sdk.
const SPIRE_API: &[&str] = &[
    "spire/api/server/agent/v1/agent.proto",
    "spire/api/server/svid/v1/svid.proto",
    "spire/api/server/entry/v1/entry.proto",
    "spire/api/server/bundle/v1/bundle.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=build.rs");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&root])?;
    std::fs::write(
        out_dir.join("signet_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    // The SPIFFE Workload API, apart (not in the descriptor set signet reflects: signet does not serve it).
    let workload = root.join("spiffe/workload.proto");
    println!("cargo:rerun-if-changed={}", workload.display());
    let fds = protox::compile([&workload], [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    // SPIRE's server API (spiffe/spire-api-sdk, see proto/spire/api/README.md), clients only and apart too:
    // `signet bench --target spire` drives a SPIRE server with it; signet does not serve it.
    let spire_api: Vec<PathBuf> = SPIRE_API.iter().map(|p| root.join(p)).collect();
    for file in &spire_api {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&spire_api, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
