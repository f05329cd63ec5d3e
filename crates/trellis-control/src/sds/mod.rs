//! Envoy SDS v3 server (in progress).
