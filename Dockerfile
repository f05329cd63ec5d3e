# syntax=docker/dockerfile:1
#
# The Trellis image: one static-ish binary for everything (`trellis control`, `trellis sidecar`,
# `trellis ca`, `trellis status`, …), plus `trellis-sidecar`, the sidecar alone, which
# `trellis sidecar` hands over to. The Kubernetes manifests in k8s/ run it as the control
# plane, and the injection webhook runs the same image as every pod's sidecar.
#
#   docker build -t registry.example/trellis:0.1.0 .
#   docker push registry.example/trellis:0.1.0
#
# BuildKit (the default builder since Docker 23; `docker buildx build` elsewhere) keeps the
# cargo registry and the target directory in cache mounts, so a rebuild after a source change
# recompiles the workspace crates only, not the ~300 dependencies.

ARG RUST_VERSION=1
ARG TRELLIS_VERSION=0.1.0
# The commit for `trellis --version` and trellis_build_info (the build context has no .git):
#   docker build --build-arg TRELLIS_COMMIT=$(git rev-parse --short=12 HEAD) .
ARG TRELLIS_COMMIT=unknown

# --- build -------------------------------------------------------------------------------------
# Debian 12 (bookworm), like the runtime image below: the binary links the same glibc (2.36)
# it runs with. The toolchain image has everything the build needs: aws-lc-rs (aws-lc-sys,
# built by the `cc` crate: no cmake or Go on x86_64/aarch64 Linux), the bundled SQLite
# (rusqlite) and the protobuf code (protox, pure Rust: no protoc) only need its gcc; jemalloc
# (tikv-jemalloc-sys) its gcc and make. `COPY . .` brings .cargo/config.toml, which sets
# jemalloc's compiled-in options (crates/trellis/src/alloc.rs).
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
ARG TRELLIS_COMMIT
ENV TRELLIS_BUILD_COMMIT=${TRELLIS_COMMIT}
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions of Cargo.lock, as tests/run.sh builds them.
# The target directory is a cache mount, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p trellis \
 && install -D -m 0755 target/release/trellis /out/trellis \
 && install -D -m 0755 target/release/trellis-sidecar /out/trellis-sidecar \
 && /out/trellis --version && /out/trellis-sidecar --version

# --- runtime -----------------------------------------------------------------------------------
# distroless "cc": glibc, libgcc_s (the binary needs libc.so.6, libm.so.6 and libgcc_s.so.1,
# nothing else: TLS is rustls with aws-lc-rs and SQLite, all compiled in), CA certificates (for a
# PostgreSQL server verified against public roots), tzdata, /etc/passwd with the nonroot user.
# No shell and no package manager. `:nonroot` runs as uid/gid 65532, which the manifests'
# securityContext also pins.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG TRELLIS_VERSION
LABEL org.opencontainers.image.title="trellis" \
      org.opencontainers.image.description="Trellis service mesh: SPIFFE control plane (Envoy SDS v3) and mTLS sidecar" \
      org.opencontainers.image.version="${TRELLIS_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=build /out/trellis /usr/local/bin/trellis
# `trellis sidecar` hands over to this one (same directory, same commit): the sidecar's code
# alone, so an idle sidecar keeps fewer executable pages resident.
COPY --from=build /out/trellis-sidecar /usr/local/bin/trellis-sidecar
USER 65532:65532
# Control plane: SDS 8443, webhook 8444, admin 9090. Sidecar: mTLS 15443, outbound 15001,
# admin 15000. (Documentation only; the manifests publish what each role uses.)
EXPOSE 8443 8444 9090 15443 15001 15000
ENTRYPOINT ["/usr/local/bin/trellis"]
CMD ["--help"]
