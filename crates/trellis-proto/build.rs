//! Compiles `proto/` with protox (pure Rust), so no system `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "envoy/service/secret/v3/sds.proto",
        "envoy/extensions/transport_sockets/tls/v3/secret.proto",
        // The SPIFFE Workload API: no package, so it is generated into `_.rs`.
        "spiffe/workload/workload.proto",
        // Trellis's own: JWT-SVIDs from the control plane.
        "trellis/jwt/v1/jwt.proto",
    ];
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::SdsCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
