//! The SPIFFE Workload API on a Unix socket: SPIFFE-aware apps (go-spiffe, py-spiffe, the
//! Rust `spiffe` crate, anything that reads `SPIFFE_ENDPOINT_SOCKET`) get the sidecar's own
//! X.509-SVID, key and bundle, pushed again on every rotation.
//!
//! Which identity: the sidecar's, that is the pod's. Every process that can open the socket
//! gets it (no per-process attestation, unlike SPIRE's agent); the socket's mode and
//! directory are the boundary ([`socket`], SECURITY.md).
//!
//! Spec rules quoted where they are enforced: the security header (Workload Endpoint §4),
//! full-state stream messages (Workload API §4.3), mandatory fields (§4.5), PKCS#8 keys
//! (§5.1).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::io::DuplexStream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use trellis_identity::jwt::check_audiences;
use trellis_identity::SpiffeId;
use trellis_identity::{Svid, TrustBundle};
use trellis_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use trellis_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};

use crate::metrics::SidecarMetrics;
use crate::svid_store::SvidStore;

mod authority;
pub mod jwt;
pub mod socket;

pub use socket::{SocketError, SocketFile};

#[doc(hidden)]
pub use authority::fuzz_rewrite;

/// The metadata key every Workload API request must carry, with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Open connections at once: a pod's SPIFFE clients keep one or two each, so this bounds
/// what a runaway process in the pod can make the sidecar hold (a task and a relay buffer each).
const MAX_CONNECTIONS: usize = 256;

/// Bytes in flight between a client connection's relay and the gRPC server.
const RELAY_BUFFER: usize = 64 * 1024;

/// Requests larger than this are refused (every request message is empty or a few audiences).
const MAX_REQUEST_BYTES: usize = 64 * 1024;

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The `SpiffeWorkloadAPI` service over the sidecar's [`SvidStore`].
#[derive(Clone)]
pub struct WorkloadApi {
    store: Arc<SvidStore>,
    metrics: Arc<SidecarMetrics>,
    /// JWT-SVIDs from the control plane; `None` (identity from files) serves X.509 only.
    jwt: Option<Arc<jwt::JwtClient>>,
}

impl WorkloadApi {
    /// Serves what `store` holds; counts in `metrics`.
    pub fn new(store: Arc<SvidStore>, metrics: Arc<SidecarMetrics>) -> Self {
        Self {
            store,
            metrics,
            jwt: None,
        }
    }

    /// Serves the JWT-SVID profile too, from `client`.
    pub fn with_jwt(mut self, client: Arc<jwt::JwtClient>) -> Self {
        self.jwt = Some(client);
        self
    }

    fn jwt(&self) -> Result<&Arc<jwt::JwtClient>, Status> {
        self.jwt.as_ref().ok_or_else(jwt_not_served)
    }

    /// The tonic service.
    pub fn into_service(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Serves on `listener` until the task is dropped (streams are endless by design, so the
    /// sidecar ends this task rather than waiting for them). Each connection goes through
    /// [`authority::relay`], which lets grpc-core and grpc-java clients in.
    pub async fn serve(self, listener: tokio::net::UnixListener) {
        let (conns, incoming) = tokio::sync::mpsc::channel::<std::io::Result<DuplexStream>>(16);
        let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let accept = async move {
            loop {
                // Past the cap, further connections wait in the listen backlog.
                let Ok(permit) = Arc::clone(&open).acquire_owned().await else {
                    return;
                };
                let client = match listener.accept().await {
                    Ok((client, _)) => client,
                    Err(e) => {
                        // Out of file descriptors and the like: say so, and do not spin.
                        tracing::warn!(error = %e, "workload API socket: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (server_end, relay_end) = tokio::io::duplex(RELAY_BUFFER);
                tokio::spawn(async move {
                    if let Err(e) = authority::relay(client, relay_end).await {
                        tracing::debug!(error = %e, "workload API connection ended");
                    }
                    drop(permit);
                });
                if conns.send(Ok(server_end)).await.is_err() {
                    return;
                }
            }
        };
        let grpc = tonic::transport::Server::builder()
            .add_service(self.into_service())
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(incoming));
        tokio::select! {
            () = accept => {}
            result = grpc => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "workload API server stopped");
                }
            }
        }
    }

    /// Counts one call and, when refused, why (`trellis_workload_api_requests_total`).
    fn count(&self, method: &'static str, result: &'static str) {
        self.metrics.workload_api_request(method, result);
    }

    /// Workload Endpoint spec §4: "All gRPC requests made to the SPIFFE Workload Endpoint
    /// MUST include the metadata key `workload.spiffe.io` with a value of `true`. Requests
    /// not including this metadata key/value MUST be rejected with the InvalidArgument gRPC
    /// status code." It proves the caller is a gRPC client, not a browser or a proxy that
    /// was tricked into forwarding a request (SSRF).
    fn check_header<T>(&self, method: &'static str, req: &Request<T>) -> Result<(), Status> {
        let ok = req
            .metadata()
            .get(SECURITY_HEADER)
            .is_some_and(|v| v.as_bytes() == b"true");
        if ok {
            self.count(method, "ok");
            Ok(())
        } else {
            self.count(method, "missing_security_header");
            Err(Status::invalid_argument(
                "security header missing from request: set metadata `workload.spiffe.io: true`",
            ))
        }
    }
}

/// The DER of every certificate in `bundle`, concatenated: the spec's "ASN.1 DER encoded"
/// bundle (and what every SPIFFE library parses as a sequence of certificates).
fn bundle_der(bundle: &TrustBundle) -> Vec<u8> {
    bundle
        .roots()
        .iter()
        .flat_map(|c| c.as_ref().iter().copied())
        .collect()
}

/// The key as unencrypted PKCS#8 DER (spec §5.1: "ASN.1 DER encoded PKCS#8 private key.
/// MUST be unencrypted."). SVIDs made by this sidecar (CSR) and by the control plane are
/// PKCS#8 already; a SEC1 EC key from `identity.files` is converted.
fn pkcs8_key(svid: &Svid) -> Result<Vec<u8>, Status> {
    use rustls::pki_types::PrivateKeyDer;
    match svid.key() {
        PrivateKeyDer::Pkcs8(k) => Ok(k.secret_pkcs8_der().to_vec()),
        PrivateKeyDer::Sec1(k) => {
            use aws_lc_rs::signature::{
                EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING,
            };
            [
                &ECDSA_P256_SHA256_ASN1_SIGNING,
                &ECDSA_P384_SHA384_ASN1_SIGNING,
            ]
            .into_iter()
            .find_map(|alg| EcdsaKeyPair::from_private_key_der(alg, k.secret_sec1_der()).ok())
            .and_then(|pair| pair.to_pkcs8v1().ok())
            .map(|doc| doc.as_ref().to_vec())
            .ok_or_else(|| Status::internal("the SVID's SEC1 key cannot be converted to PKCS#8"))
        }
        _ => Err(Status::internal(
            "the SVID's key is not PKCS#8 or SEC1 EC (RSA PKCS#1 keys are not served)",
        )),
    }
}

/// One `X509SVIDResponse`: the full state (spec §4.3: "Every stream response message sent
/// by the server MUST include the full set of information").
fn x509_response(svid: &Svid, bundle: &TrustBundle) -> Result<X509svidResponse, Status> {
    Ok(X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.spiffe_id().to_string(),
            x509_svid: svid
                .chain()
                .iter()
                .flat_map(|c| c.as_ref().iter().copied())
                .collect(),
            x509_svid_key: pkcs8_key(svid)?,
            bundle: bundle_der(bundle),
            hint: String::new(),
        }],
        crl: Vec::new(),
        // SPIFFE federation: the foreign trust domains the control plane federates with.
        federated_bundles: bundle
            .federated()
            .map(|b| (b.trust_domain().id().to_string(), bundle_der(b)))
            .collect(),
    })
}

/// Follows the store: yields each new state once, the first as soon as there is one.
struct Follow {
    store: Arc<SvidStore>,
    changes: watch::Receiver<u64>,
    sent: Option<u64>,
}

impl Follow {
    fn new(store: Arc<SvidStore>) -> Self {
        let changes = store.subscribe();
        Self {
            store,
            changes,
            sent: None,
        }
    }

    /// The next state not yet sent: the bundle, and the SVID if `need_svid` (waits for the
    /// first SVID). `None` when the store is gone.
    async fn next(&mut self, need_svid: bool) -> Option<(Option<Arc<Svid>>, Arc<TrustBundle>)> {
        loop {
            // Marks the generation seen *before* reading the state: an install after this
            // line wakes `changed()` below, so no rotation is missed.
            let generation = *self.changes.borrow_and_update();
            if self.sent != Some(generation) {
                let svid = self.store.current();
                if svid.is_some() || !need_svid {
                    self.sent = Some(generation);
                    return Some((svid, self.store.bundle().load_full()));
                }
            }
            self.changes.changed().await.ok()?;
        }
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream_<X509svidResponse>;
    type FetchX509BundlesStream = Stream_<X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream_<JwtBundlesResponse>;

    /// Spec §5.2.1. Before the first SVID the stream waits (the sidecar is still attesting;
    /// it will have one), rather than answering PermissionDenied, which tells a client it is
    /// not entitled to any identity.
    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.check_header("FetchX509SVID", &request)?;
        let follow = Follow::new(Arc::clone(&self.store));
        let stream = futures::stream::unfold(Some(follow), |follow| async move {
            let mut follow = follow?;
            let (svid, bundle) = follow.next(true).await?;
            let svid = svid?;
            match x509_response(&svid, &bundle) {
                Ok(r) => Some((Ok(r), Some(follow))),
                // The error ends the stream (the client reconnects after a backoff).
                Err(status) => Some((Err(status), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    /// Spec §5.2.2: "MUST contain at least the trust bundle for the trust domain in which the
    /// server resides". The bundle is there from the start (the bootstrap bundle), so the
    /// first message goes out at once.
    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.check_header("FetchX509Bundles", &request)?;
        let follow = Follow::new(Arc::clone(&self.store));
        let stream = futures::stream::unfold(follow, |mut follow| async move {
            let (_, bundle) = follow.next(false).await?;
            let response = X509BundlesResponse {
                crl: Vec::new(),
                // Every trusted trust domain: the own one and each federated one.
                bundles: std::iter::once(&*bundle)
                    .chain(bundle.federated())
                    .map(|b| (b.trust_domain().id().to_string(), bundle_der(b)))
                    .collect(),
            };
            Some((Ok(response), follow))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    /// Spec §6.2.1 (FetchJWTSVID): "The audience field MUST be set"; when `spiffe_id` is
    /// set, only that identity may be returned. The sidecar has one identity, the pod's: any
    /// other is `PermissionDenied` (the spec's code for an identity the caller is not entitled
    /// to). Before the first X.509-SVID, or while the control plane is unreachable:
    /// `Unavailable` (retry).
    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        self.check_header("FetchJWTSVID", &request)?;
        let client = self.jwt()?;
        let req = request.into_inner();
        check_audiences(&req.audience)
            .map_err(|e| Status::invalid_argument(format!("audience: {e}")))?;
        if !req.spiffe_id.is_empty() {
            let wanted = SpiffeId::parse(&req.spiffe_id).map_err(|e| {
                Status::invalid_argument(format!("spiffe_id `{}`: {e}", req.spiffe_id))
            })?;
            let ours = self.store.spiffe_id();
            if ours.as_ref() != Some(&wanted) {
                return Err(Status::permission_denied(format!(
                    "no JWT-SVID for `{wanted}`: this workload's identity is {}",
                    ours.map_or_else(|| "not issued yet".to_owned(), |id| format!("`{id}`"))
                )));
            }
        }
        let token = client.fetch(&req.audience).await?;
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: token.spiffe_id,
                svid: token.token,
                hint: String::new(),
            }],
        }))
    }

    /// Spec §6.2.2 (FetchJWTBundles): a stream of the JWT bundles, keyed by trust domain ID,
    /// each message the full set; pushed again on every key change. Waits for the first bundle
    /// (the sidecar gets it once it has its X.509-SVID).
    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.check_header("FetchJWTBundles", &request)?;
        let bundles = self.jwt()?.bundle();
        let stream = futures::stream::unfold((bundles, true), |(mut bundles, first)| async move {
            if !first {
                bundles.changed().await.ok()?;
            }
            // Marks the value seen, so the next round waits for a change.
            let bundle = bundles.wait_for(Option::is_some).await.ok()?.clone()?;
            let response = JwtBundlesResponse {
                bundles: [(bundle.trust_domain().id().to_string(), bundle.to_jwks())]
                    .into_iter()
                    .collect(),
            };
            Some((Ok(response), (bundles, false)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    /// Spec §6.2.3 (ValidateJWTSVID): validates with the JWT bundle and the audience; an
    /// invalid token is `InvalidArgument` with the reason (JWT-SVID spec §4 checks, see
    /// `trellis_identity::jwt::validate`).
    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.check_header("ValidateJWTSVID", &request)?;
        let client = self.jwt()?;
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be set"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be set"));
        }
        let Some(bundle) = client.bundle().borrow().clone() else {
            return Err(Status::unavailable(
                "no JWT bundle yet (the sidecar is still attesting); retry shortly",
            ));
        };
        let valid = trellis_identity::jwt::validate(
            &req.svid,
            &bundle,
            Some(&req.audience),
            std::time::SystemTime::now(),
            trellis_identity::jwt::DEFAULT_SKEW,
        )
        .map_err(|e| Status::invalid_argument(format!("JWT-SVID refused ({}): {e}", e.reason())))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: valid.spiffe_id.to_string(),
            claims: Some(to_struct(valid.claims)),
        }))
    }
}

/// JSON claims as a `google.protobuf.Struct`.
fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s),
        J::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        J::Object(m) => Kind::StructValue(to_struct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Workload API spec §1: "operators MAY administratively disable a specific profile"; a
/// sidecar whose identity comes from files has no control plane to sign JWT-SVIDs.
fn jwt_not_served() -> Status {
    Status::unimplemented(
        "this sidecar takes its identity from files (identity.files): no control plane signs JWT-SVIDs, so only the X.509-SVID profile is served",
    )
}
