//! The SDS client: attests to `trellis control`, keeps one `StreamSecrets` stream for
//! `default` and `ROOTCA`, validates every update before installing it in the [`SvidStore`],
//! NACKs bad ones, and reconnects with jittered exponential backoff while the sidecar keeps
//! serving on its current SVID.
//!
//! Two key modes:
//! - **CSR** (`csr: true`, the default): keys never leave the workload. The sidecar makes a
//!   P-256 key, sends its CSR in `node.metadata["trellis.io/csr"]` on every request, and the
//!   control plane answers with a certificate chain only. A response carrying a private key is
//!   refused. The sidecar rotates its key by sending a fresh CSR on the same stream at about
//!   half the remaining lifetime of the first certificate it got for the current key;
//!   server-initiated rotations in between renew the certificate for the current key.
//! - **Server key** (`csr: false`, what a stock Envoy gets): the control plane makes the key
//!   and sends it with the chain.
//!
//! Attestation: while the store holds an unexpired SVID the sidecar presents it as its TLS
//! client certificate and sends no `authorization` header (so a single-use join token is never
//! needed twice); otherwise it sends `authorization: Bearer <token>`, re-reading a token file
//! on every connect (kubelet rotates it).

pub(crate) mod connect;
pub mod timing;

/// The SDS channel's PING interval and how long a PING may go unanswered ([`connect::KEEPALIVE`]).
pub use connect::KEEPALIVE as SDS_KEEPALIVE;
pub mod update;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::Code;
use trellis_identity::{CertificateDer, SpiffeId, Svid, SvidError, TrustBundle, TrustDomain};
use trellis_proto::envoy::config::core::v3::node::UserAgentVersionType;
use trellis_proto::google::rpc::Status as RpcStatus;
use trellis_proto::{
    DiscoveryRequest, DiscoveryResponse, Node, SecretDiscoveryServiceClient, SECRET_TYPE_URL,
};
use trellis_transparency::{
    HELD_SERIAL_METADATA_KEY, LOG_HEAD_RESOURCE, WITNESSED_SIZE_METADATA_KEY,
};
use zeroize::Zeroizing;

use crate::config::{ControlBundle, Credential, SdsSettings};
use crate::csr::{KeyAndCsr, CSR_METADATA_KEY};
use crate::metrics::SidecarMetrics;
use crate::svid_store::SvidStore;
use timing::{rotation_delay, rotation_jitter, Backoff, BACKOFF_MAX, BACKOFF_START};
use update::{KeySource, Rejection, DEFAULT, ROOTCA};

/// `google.rpc.Code.INVALID_ARGUMENT`, the code of every NACK's `error_detail`.
const NACK_CODE: i32 = 3;

/// The client could not be set up (bad bootstrap files).
#[derive(Debug, thiserror::Error)]
pub enum SdsClientError {
    /// The control bundle or token file is unusable.
    #[error("{path}: {problem}")]
    Bootstrap {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The inline control bundle (`control_bundle_pem`) is unusable.
    #[error("identity.sds.control_bundle_pem (--control-bundle-pem, TRELLIS_CONTROL_BUNDLE_PEM): {problem}")]
    InlineBundle {
        /// What is wrong.
        problem: String,
    },
    /// `control_plane` is not `host:port`.
    #[error("control plane address `{address}`: {problem}")]
    ControlPlane {
        /// As configured.
        address: String,
        /// What is wrong.
        problem: String,
    },
}

/// A long-running SDS client.
pub struct SdsClient {
    /// Whether the control plane serves `trellis-log-head` (one that predates the
    /// transparency log answers NOT_FOUND for it; we then stop asking and do not witness).
    log_head_served: std::sync::atomic::AtomicBool,
    settings: SdsSettings,
    store: Arc<SvidStore>,
    metrics: Arc<SidecarMetrics>,
    control_id: SpiffeId,
    hostname: String,
}

/// The keys of CSR mode: the one the installed SVID uses, and the one whose CSR is out.
#[derive(Default)]
struct KeyRing {
    current: Option<KeyAndCsr>,
    pending: Option<KeyAndCsr>,
}

impl KeyRing {
    /// The CSR every request carries until a certificate for it is installed.
    fn wanted_csr(&self) -> Option<&str> {
        self.pending
            .as_ref()
            .or(self.current.as_ref())
            .map(|k| k.csr_pem.as_str())
    }

    fn ensure_pending(&mut self, id: Option<&SpiffeId>) -> Result<(), rcgen::Error> {
        if self.pending.is_none() {
            self.pending = Some(crate::csr::generate(id)?);
        }
        Ok(())
    }

    /// Pairs a chain with the key it certifies: the pending key (the answer to our CSR), or
    /// the current one (a server-initiated renewal). `true` when it is the pending key.
    fn svid_for(&self, chain: Vec<CertificateDer<'static>>) -> Result<(Svid, bool), Rejection> {
        for (key, is_pending) in [(&self.pending, true), (&self.current, false)] {
            let Some(key) = key else { continue };
            match Svid::new(chain.clone(), key.key.clone_key()) {
                Ok(svid) => return Ok((svid, is_pending)),
                Err(SvidError::KeyMismatch) => continue,
                Err(e) => return Err(Rejection::svid(&e)),
            }
        }
        Err(Rejection::new(
            SvidError::KeyMismatch.reason(),
            format!("secret `{DEFAULT}`: the certificate is not for the key of any CSR this sidecar sent"),
        ))
    }

    fn promote(&mut self) {
        if let Some(k) = self.pending.take() {
            self.current = Some(k);
        }
    }
}

/// Why a stream ended.
enum Cause {
    /// No connection (TCP, TLS, HTTP/2).
    Connect(String),
    /// The credential could not be read.
    Credential(String),
    /// The control plane answered with an error status.
    Status(tonic::Status),
    /// The control plane ended the stream.
    Closed,
    /// Something on our side (CSR generation).
    Internal(String),
}

struct SessionEnd {
    /// At least one valid update was installed on this stream.
    delivered: bool,
    /// The attempt re-attested with the SVID (no token).
    used_svid: bool,
    cause: Cause,
}

/// Per-stream xDS bookkeeping.
#[derive(Default)]
struct StreamState {
    /// `version_info` of the last response we accepted.
    acked_version: String,
    /// `nonce` of the last response we received.
    last_nonce: String,
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "trellis-sidecar".to_owned())
}

/// Reads and validates the bundle that verifies the control plane (and seeds the trust
/// bundle), from its file or from inline PEM text. Errors name the file or the setting.
pub fn read_control_bundle(
    source: &ControlBundle,
    td: &TrustDomain,
) -> Result<TrustBundle, SdsClientError> {
    let usable = |pem: &[u8]| {
        TrustBundle::from_pem(td.clone(), pem)
            .map_err(|e| format!("not a usable trust bundle for trust domain `{td}`: {e}"))
    };
    match source {
        ControlBundle::File(path) => {
            let bootstrap = |problem: String| SdsClientError::Bootstrap {
                path: path.clone(),
                problem,
            };
            let pem = std::fs::read(path).map_err(|e| {
                bootstrap(format!(
                    "cannot read the control plane's bundle (identity.sds.control_bundle, --control-bundle): {e}"
                ))
            })?;
            usable(&pem).map_err(bootstrap)
        }
        ControlBundle::Pem(pem) => {
            if pem.trim().is_empty() {
                return Err(SdsClientError::InlineBundle {
                    problem: "empty: set it to the control plane's bundle.pem text".into(),
                });
            }
            usable(pem.as_bytes()).map_err(|problem| SdsClientError::InlineBundle { problem })
        }
    }
}

impl SdsClient {
    /// Checks the bootstrap (control bundle readable and valid; token file readable).
    pub fn new(
        settings: SdsSettings,
        store: Arc<SvidStore>,
        metrics: Arc<SidecarMetrics>,
    ) -> Result<Self, SdsClientError> {
        let td = store.trust_domain().clone();
        read_control_bundle(&settings.control_bundle, &td)?;
        if let Credential::TokenFile(p) = &settings.credential {
            let token = Zeroizing::new(std::fs::read_to_string(p).map_err(|e| {
                SdsClientError::Bootstrap {
                    path: p.clone(),
                    problem: format!("cannot read the token file: {e}"),
                }
            })?);
            if token.trim().is_empty() {
                return Err(SdsClientError::Bootstrap {
                    path: p.clone(),
                    problem: "the token file is empty".into(),
                });
            }
        }
        let address = &settings.control_plane;
        let bad_address = |problem: &str| SdsClientError::ControlPlane {
            address: address.clone(),
            problem: problem.into(),
        };
        match address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
            }
            _ => return Err(bad_address("expected host:port, e.g. trellis-control:8443")),
        }
        let control_id = SpiffeId::from_parts(&td, connect::CONTROL_ID_PATH).map_err(|e| {
            SdsClientError::ControlPlane {
                address: address.clone(),
                problem: e.to_string(),
            }
        })?;
        Ok(Self {
            log_head_served: std::sync::atomic::AtomicBool::new(true),
            settings,
            store,
            metrics,
            control_id,
            hostname: hostname(),
        })
    }

    /// Runs until `shutdown` flips: connect, attest, stream, validate, install, ACK/NACK,
    /// rotate the key by sending a fresh CSR ahead of expiry, back off and reconnect.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(BACKOFF_START, BACKOFF_MAX);
        let mut keys = KeyRing::default();
        let mut rotate_at: Option<Instant> = None;
        let mut svid_attempt_failed = false;
        while !*shutdown.borrow() {
            // A token file is a standing credential: if the SVID did not get us in last time
            // (say the control plane's bundle no longer holds our CA), try the token once
            // before the SVID again. A join token is spent after its first use; no point.
            let allow_svid = !(svid_attempt_failed
                && matches!(self.settings.credential, Credential::TokenFile(_)));
            let end = tokio::select! {
                end = self.session(&mut keys, &mut rotate_at, allow_svid) => end,
                () = stopped(&mut shutdown) => break,
            };
            self.metrics.sds_connected.set(0);
            if let Cause::Status(s) = &end.cause {
                if s.code() == Code::NotFound && s.message().contains(LOG_HEAD_RESOURCE) {
                    self.log_head_served
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(
                        "the control plane does not serve `{LOG_HEAD_RESOURCE}` (an older version): not witnessing its transparency log"
                    );
                }
            }
            svid_attempt_failed = end.used_svid && !end.delivered;
            if end.delivered {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            self.log_end(&end.cause, delay);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(&mut shutdown) => break,
            }
        }
        self.metrics.sds_connected.set(0);
        tracing::info!("SDS client stopped");
    }

    fn log_end(&self, cause: &Cause, retry_in: Duration) {
        let control_plane = self.settings.control_plane.as_str();
        let serving = self
            .store
            .current()
            .is_some_and(|s| s.not_after() > SystemTime::now());
        match cause {
            Cause::Status(s)
                if matches!(
                    s.code(),
                    Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument
                ) =>
            {
                tracing::error!(control_plane, code = ?s.code(), message = s.message(), ?retry_in, serving, "control plane refused this sidecar")
            }
            Cause::Status(s) => {
                tracing::warn!(control_plane, code = ?s.code(), message = s.message(), ?retry_in, serving, "SDS stream to the control plane failed; reconnecting")
            }
            Cause::Connect(e) => {
                tracing::warn!(control_plane, error = %e, ?retry_in, serving, "cannot reach the control plane; reconnecting")
            }
            Cause::Closed => {
                tracing::warn!(
                    control_plane,
                    ?retry_in,
                    serving,
                    "control plane closed the SDS stream; reconnecting"
                )
            }
            Cause::Credential(e) => {
                tracing::error!(control_plane, error = %e, ?retry_in, serving, "cannot read the SDS credential")
            }
            Cause::Internal(e) => {
                tracing::error!(control_plane, error = %e, ?retry_in, serving, "SDS client error")
            }
        }
    }

    /// The `authorization` header value, from the configured credential. The token never
    /// appears in an error or a log line.
    async fn authorization(
        &self,
    ) -> Result<(MetadataValue<tonic::metadata::Ascii>, &'static str), String> {
        let (token, kind) = match &self.settings.credential {
            Credential::TokenFile(path) => {
                // Re-read on every connect: kubelet rotates projected tokens.
                let raw =
                    Zeroizing::new(tokio::fs::read_to_string(path).await.map_err(|e| {
                        format!("{}: cannot read the token file: {e}", path.display())
                    })?);
                let token = Zeroizing::new(raw.trim().to_owned());
                if token.is_empty() {
                    return Err(format!("{}: the token file is empty", path.display()));
                }
                (token, "token_file")
            }
            Credential::JoinToken(t) => (Zeroizing::new(t.trim().to_owned()), "join_token"),
        };
        let header = Zeroizing::new(format!("Bearer {}", token.as_str()));
        let mut value = MetadataValue::try_from(header.as_str())
            .map_err(|_| format!("the {kind} is not valid header text (printable ASCII only)"))?;
        value.set_sensitive(true);
        Ok((value, kind))
    }

    fn node(&self, keys: &KeyRing) -> Node {
        let mut fields = std::collections::BTreeMap::new();
        if let (true, Some(csr)) = (self.settings.csr, keys.wanted_csr()) {
            fields.insert(
                CSR_METADATA_KEY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(csr.to_owned())),
                },
            );
        }
        // The size of the last log head we accepted, so the next one comes with its proof.
        if let Some(size) = self.store.log_witness().witnessed_size() {
            fields.insert(
                WITNESSED_SIZE_METADATA_KEY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(size as f64)),
                },
            );
        }
        // The serial of the SVID we hold, so the next head comes with its inclusion proof.
        if let Some(svid) = self.store.current() {
            fields.insert(
                HELD_SERIAL_METADATA_KEY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(
                        svid.serial_hex().to_owned(),
                    )),
                },
            );
        }
        let metadata = (!fields.is_empty()).then_some(prost_types::Struct { fields });
        Node {
            id: self
                .store
                .spiffe_id()
                .map(|id| id.to_string())
                .unwrap_or_else(|| self.hostname.clone()),
            cluster: "trellis".to_owned(),
            metadata,
            user_agent_name: "trellis-sidecar".to_owned(),
            client_features: Vec::new(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").to_owned(),
            )),
        }
    }

    /// A request for both secrets. In CSR mode every request repeats the CSR we want signed.
    fn request(
        &self,
        keys: &KeyRing,
        st: &StreamState,
        error: Option<&Rejection>,
    ) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: st.acked_version.clone(),
            node: Some(self.node(keys)),
            resource_names: if self
                .log_head_served
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                vec![
                    DEFAULT.to_owned(),
                    ROOTCA.to_owned(),
                    LOG_HEAD_RESOURCE.to_owned(),
                ]
            } else {
                vec![DEFAULT.to_owned(), ROOTCA.to_owned()]
            },
            type_url: SECRET_TYPE_URL.to_owned(),
            response_nonce: st.last_nonce.clone(),
            error_detail: error.map(|r| RpcStatus {
                code: NACK_CODE,
                message: r.message.clone(),
                details: Vec::new(),
            }),
        }
    }

    fn schedule_rotation(&self, rotate_at: &mut Option<Instant>, not_after: SystemTime) {
        let remaining = not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let delay = rotation_delay(remaining, rotation_jitter());
        tracing::debug!(?delay, "next key rotation scheduled");
        *rotate_at = Some(Instant::now() + delay);
    }

    /// Decodes, validates and installs one response.
    fn apply(
        &self,
        resp: &DiscoveryResponse,
        keys: &mut KeyRing,
        rotate_at: &mut Option<Instant>,
    ) -> Result<(), Rejection> {
        let source = if self.settings.csr {
            KeySource::Ours
        } else {
            KeySource::Response
        };
        let decoded = update::decode(resp, self.store.trust_domain(), source)?;
        if let Some(head) = &decoded.log_head {
            self.store.log_witness().observe(head);
        }
        let (svid, new_key) = match decoded.key {
            Some(key) => (
                Svid::new(decoded.chain, key).map_err(|e| Rejection::svid(&e))?,
                false,
            ),
            None => keys.svid_for(decoded.chain)?,
        };
        // An identity never changes under a running sidecar, whatever the control plane says.
        if let Some(current) = self.store.current() {
            if current.spiffe_id() != svid.spiffe_id() {
                return Err(Rejection::new(
                    "wrong_identity",
                    format!(
                        "secret `{DEFAULT}`: SVID is for `{}`, but this sidecar is `{}`",
                        svid.spiffe_id(),
                        current.spiffe_id()
                    ),
                ));
            }
        }
        let not_after = svid.not_after();
        self.store
            .install(svid, decoded.bundle, SystemTime::now())
            .map_err(|e| Rejection::update(&e))?;
        if new_key {
            keys.promote();
            tracing::info!("installed a certificate for a new key");
            self.schedule_rotation(rotate_at, not_after);
        } else if self.settings.csr && rotate_at.is_none() {
            self.schedule_rotation(rotate_at, not_after);
        }
        Ok(())
    }

    /// One connection and one stream, until it fails. With `allow_svid` and an unexpired SVID,
    /// attests with the SVID as TLS client certificate; otherwise with the credential.
    async fn session(
        &self,
        keys: &mut KeyRing,
        rotate_at: &mut Option<Instant>,
        allow_svid: bool,
    ) -> SessionEnd {
        let mut delivered = false;
        let reattest = allow_svid
            && self
                .store
                .current()
                .is_some_and(|s| s.not_after() > SystemTime::now());
        let end = |delivered: bool, cause: Cause| SessionEnd {
            delivered,
            used_svid: reattest,
            cause,
        };
        let auth = if reattest {
            None
        } else {
            match self.authorization().await {
                Ok(a) => Some(a),
                Err(e) => return end(false, Cause::Credential(e)),
            }
        };
        let resolver = reattest.then(|| self.store.resolver());
        let channel = match connect::connect(
            &self.settings.control_plane,
            self.store.bundle(),
            self.control_id.clone(),
            resolver,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => return end(false, Cause::Connect(e)),
        };
        if self.settings.csr {
            let due = rotate_at.is_some_and(|t| t <= Instant::now());
            if keys.current.is_none() || due {
                if let Err(e) = keys.ensure_pending(self.store.spiffe_id().as_ref()) {
                    return end(
                        false,
                        Cause::Internal(format!("cannot make a key and CSR: {e}")),
                    );
                }
            }
        }

        let mut st = StreamState::default();
        let (tx, rx) = mpsc::channel(8);
        if tx.try_send(self.request(keys, &st, None)).is_err() {
            return end(false, Cause::Internal("request queue full".into()));
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let how = match auth {
            Some((value, kind)) => {
                request.metadata_mut().insert("authorization", value);
                kind
            }
            None => "svid",
        };
        let mut client = SecretDiscoveryServiceClient::new(channel);
        let mut inbound = match client.stream_secrets(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return end(false, Cause::Status(status)),
        };
        self.metrics.sds_connected.set(1);
        tracing::info!(control_plane = %self.settings.control_plane, attestation = how, csr = self.settings.csr, "SDS stream open");

        loop {
            let deadline = if self.settings.csr { *rotate_at } else { None };
            let rotation = async move {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = inbound.message() => {
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return end(delivered, Cause::Closed),
                        Err(status) => return end(delivered, Cause::Status(status)),
                    };
                    // xDS: an ACK carries the response's nonce and version_info; a NACK the
                    // response's nonce, the previous good version_info, and error_detail.
                    st.last_nonce = resp.nonce.clone();
                    let reply = match self.apply(&resp, keys, rotate_at) {
                        Ok(()) => {
                            delivered = true;
                            st.acked_version = resp.version_info.clone();
                            self.metrics.sds_update("ok");
                            self.request(keys, &st, None)
                        }
                        Err(rejection) => {
                            self.metrics.sds_update(rejection.reason);
                            tracing::warn!(
                                reason = rejection.reason,
                                error = %rejection,
                                version = %resp.version_info,
                                "refused an SDS update (NACK); keeping the current SVID"
                            );
                            self.request(keys, &st, Some(&rejection))
                        }
                    };
                    if tx.send(reply).await.is_err() {
                        return end(delivered, Cause::Closed);
                    }
                }
                () = rotation => {
                    if let Err(e) = keys.ensure_pending(self.store.spiffe_id().as_ref()) {
                        return end(delivered, Cause::Internal(format!("cannot make a key and CSR: {e}")));
                    }
                    tracing::info!("rotating the key: sending a new CSR");
                    // If no certificate for it arrives, ask again at half the time left.
                    let not_after = self.store.current().map(|s| s.not_after()).unwrap_or_else(SystemTime::now);
                    self.schedule_rotation(rotate_at, not_after);
                    if tx.send(self.request(keys, &st, None)).await.is_err() {
                        return end(delivered, Cause::Closed);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use trellis_identity::testca::TestCa;

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    #[test]
    fn inline_bundle_is_read_like_a_file() {
        let ca = TestCa::root("example.org");
        let pem = ca.bundle().to_pem();
        let inline = read_control_bundle(&ControlBundle::Pem(pem.clone()), &td()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.pem");
        std::fs::write(&path, &pem).unwrap();
        let file = read_control_bundle(&ControlBundle::File(path), &td()).unwrap();
        assert_eq!(inline.roots(), file.roots());
    }

    #[test]
    fn bad_inline_bundle_names_the_setting() {
        for (pem, want) in [
            ("", "empty"),
            ("  \n", "empty"),
            ("garbage", "not a usable trust bundle"),
        ] {
            let err = read_control_bundle(&ControlBundle::Pem(pem.into()), &td())
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("identity.sds.control_bundle_pem (--control-bundle-pem, TRELLIS_CONTROL_BUNDLE_PEM): "),
                "{err}"
            );
            assert!(err.contains(want), "{err}");
        }
    }
}
