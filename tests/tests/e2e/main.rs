//! The end-to-end tests: real `trellis` processes (TRELLIS_BIN), stock Envoy (ENVOY_BIN),
//! OpenSSL and PostgreSQL on loopback, one module per concern.
//!
//! One test binary instead of one per file: each binary links the whole dependency tree (the
//! support crate, tonic, hyper, rustls), which on a 2-core machine cost more than compiling the
//! tests themselves. Run one module with a filter, e.g.
//! `cargo test -p trellis-tests --test e2e -- hostile_peers::`.

mod admin_status;
mod app_trust_headers;
mod app_trust_paths;
mod build_info;
mod control_sds;
mod default_route;
mod envoy_sds;
mod faults_clock;
mod faults_database;
mod faults_disk;
mod faults_network;
mod faults_slow_peers;
mod federation;
mod hostile_control;
mod hostile_control_limits;
mod hostile_peers;
mod hostile_sidecar_limits;
mod hostile_smuggling;
mod inject_cli;
mod inspect;
mod join_tokens;
mod k8s_jwks_url;
mod k8s_manifests;
mod logging;
mod observability_k8s;
mod observability_sidecar;
mod operator_socket;
mod pkcs11;
mod policy_e2e;
mod policy_reload_load;
mod policy_replay;
mod protocols;
mod protocols_tonic;
mod reliability_ca;
mod reliability_control_outage;
mod reliability_restart;
mod reliability_rotation;
mod reliability_sds_updates;
mod reliability_upstream;
mod replicas_postgres;
mod scale_sidecars;
mod sidecar_config;
mod sidecar_demo;
mod sidecar_envoy;
mod sidecar_mesh;
mod sidecar_security;
mod sidecar_worker_threads;
mod tls_key_exchange;
mod transparency_log;
mod webhook;
mod workload_api;
mod workload_api_jwt;
