//! Envoy SDS v3 server: attests each stream, issues SVIDs, pushes rotations and bundle changes.
//!
//! One stream serves one attested caller. The stream's protocol state lives in
//! [`stream::StreamState`] (pure, unit-tested); this module drives it with the request stream,
//! a rotation timer and the bundle's changes ([`SdsBundle`]).
//!
//! The response stream tonic sends *is* the driver ([`StreamDriver::into_responses`]): no task
//! and no channel per stream. A control plane holds one stream per workload for as long as
//! the workload runs, so each per-stream allocation is multiplied by the fleet: a task plus a
//! bounded channel (whose first block has room for 32 responses) cost several KiB each.

pub mod limits;
pub mod listener;
pub mod resources;
pub mod stream;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Sleep;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use trellis_identity::{SpiffeId, TrustBundle};
use trellis_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use trellis_proto::{DiscoveryRequest, DiscoveryResponse, SecretDiscoveryService, SECRET_TYPE_URL};
use trellis_serve::watermark::{Reached, Watermark};

use crate::attest::{AttestError, Attested, Attestor, AttestorKind, Credential};
use crate::audit::{AuditEvent, AuditLog};
use arc_swap::ArcSwap;

use crate::ca::{Ca, CaError};
use crate::metrics::{AttestorLabel, ControlMetrics};
use crate::recorder::IssuanceRecorder;
use crate::registry::IssuanceRecord;
use resources::{bundle_secret, log_head_secret, svid_secret, to_any, Issued, ResourceKind};
use stream::{Decision, StreamState};

/// Who is on the other end of an SDS connection, filled in by the TLS accept loop and read
/// from the request extensions.
#[derive(Clone, Debug)]
pub struct SdsPeer {
    /// Remote address.
    pub addr: SocketAddr,
    /// The client SVID's SPIFFE ID, when the client presented one that verified.
    pub svid: Option<SpiffeId>,
}

/// Issuance settings.
#[derive(Clone, Copy, Debug)]
pub struct IssuePolicy {
    /// SVID lifetime.
    pub svid_ttl: Duration,
    /// How often each stream gets a fresh SVID (jittered down by up to 10%).
    pub rotate_every: Duration,
}

impl IssuePolicy {
    /// When the next SVID is due: `rotate_every` minus up to 10% jitter, and never later than
    /// half the SVID's lifetime, so a client always holds a cert with time left.
    pub fn next_rotation(&self) -> Duration {
        let base = self.rotate_every.min(self.svid_ttl / 2);
        let jitter = rand::rng().random_range(0.0..0.1);
        base.mul_f64(1.0 - jitter).max(Duration::from_millis(100))
    }
}

/// Everything the SDS service needs, shared by every stream.
pub struct SdsCore {
    /// The signing CA; swapped by the CA rotator when a rotation activates.
    pub ca: Arc<ArcSwap<Ca>>,
    /// The current trust bundle; a change is pushed to every stream that subscribed to it.
    pub bundle: SdsBundle,
    /// Attestors.
    pub attestor: Arc<Attestor>,
    /// Issuance records, written in batches by a background thread.
    pub recorder: IssuanceRecorder,
    /// The audit log.
    pub audit: Arc<AuditLog>,
    /// Metrics.
    pub metrics: Arc<ControlMetrics>,
    /// TTL and rotation.
    pub policy: IssuePolicy,
    /// Per-source-IP rate of stream opens (attestations).
    pub limiter: Arc<crate::ratelimit::PeerLimiter>,
    /// Refuses to sign right after a wall-clock jump.
    pub clock: Arc<crate::clock_guard::ClockGuard>,
    /// The transparency log, whose latest head goes to witnesses (`trellis-log-head`).
    pub log: Option<Arc<crate::translog::IssuanceLog>>,
}

/// The trust bundle the streams push, and what each waits on for the next one.
///
/// Not the bundle's `watch` itself: every connected workload's stream waits for the next
/// bundle for as long as it is connected, and a watch's wait future is 120 bytes of each
/// stream's state. One task follows the watch and raises a [`Watermark`] at each change; a
/// stream waits for it to pass the last level it pushed (40 bytes), then reads the bundle.
pub struct SdsBundle {
    current: watch::Receiver<Arc<TrustBundle>>,
    /// Raised by one at every change of `current`; [`BUNDLE_GONE`] once its sender is gone.
    changes: Arc<Watermark>,
}

/// The level of [`SdsBundle::changes`] once the bundle's sender is gone (shutting down).
const BUNDLE_GONE: u64 = u64::MAX;

impl SdsBundle {
    /// Follows `bundle` from a task of its own (which ends with the bundle's sender).
    pub fn follow(mut bundle: watch::Receiver<Arc<TrustBundle>>) -> Self {
        let changes = Arc::new(Watermark::new());
        let current = bundle.clone();
        let raise = Arc::clone(&changes);
        tokio::spawn(async move {
            let mut level = 0;
            while bundle.changed().await.is_ok() {
                level += 1;
                raise.raise_to(level);
            }
            raise.raise_to(BUNDLE_GONE);
        });
        Self { current, changes }
    }

    /// The bundle now.
    fn current(&self) -> Arc<TrustBundle> {
        self.current.borrow().clone()
    }

    /// The number of changes so far; read before [`SdsBundle::current`], so that a change
    /// between the two is pushed again rather than missed.
    fn level(&self) -> u64 {
        self.changes.level()
    }

    /// Resolves at the next change after `level` (or when the bundle's sender goes).
    fn changed_after(&self, level: u64) -> Reached {
        self.changes.reached(level.saturating_add(1))
    }
}

/// One `trellis-log-head` resource, ready to send.
struct LogHeadOut {
    /// The JSON of a [`trellis_transparency::HeadForWitness`].
    json: Vec<u8>,
    /// It carries the inclusion proof of the SVID the client reported holding.
    proven: bool,
}

impl SdsCore {
    /// The `trellis-log-head` resource for a witness that last accepted a head of `witnessed`
    /// entries and holds the SVID with serial `held`: the latest signed head, the log key,
    /// the consistency proof from the witness's size, and the held SVID's entry with its
    /// inclusion proof once the head covers it. `None` before the first head.
    async fn log_head(
        &self,
        witnessed: Option<u64>,
        held: Option<&Arc<str>>,
        caller: &SpiffeId,
    ) -> Option<LogHeadOut> {
        let log = self.log.as_ref()?;
        let head = log.latest_head()?;
        let size = head.head.tree_size;
        let consistency = match witnessed.filter(|&w| w > 0 && w < size) {
            Some(w) => log.consistency_proof_async(w, size).await.map(|proof| {
                trellis_transparency::ConsistencyFrom {
                    from_size: w,
                    proof,
                }
            }),
            None => None,
        };
        let own_svid = match held {
            None => None,
            Some(serial) => {
                let (log, serial, caller, at) = (
                    Arc::clone(log),
                    Arc::clone(serial),
                    caller.to_string(),
                    head.head,
                );
                // Two indexed registry reads: off the async workers.
                let found =
                    tokio::task::spawn_blocking(move || log.own_svid_proof(&serial, &caller, &at))
                        .await;
                match found {
                    Ok(Ok(proof)) => proof,
                    Ok(Err(e)) => {
                        // The next update tries again; the sidecar counts it `missing`.
                        tracing::debug!(error = %e, "cannot prove a workload's SVID in the log now");
                        None
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "log proof task failed");
                        None
                    }
                }
            }
        };
        let proven = own_svid.is_some();
        let msg = trellis_transparency::HeadForWitness {
            head: (*head).clone(),
            public_key: log.public_key().to_pem(),
            consistency,
            own_svid,
        };
        serde_json::to_vec(&msg)
            .ok()
            .map(|json| LogHeadOut { json, proven })
    }

    fn audit(&self, event: AuditEvent) {
        if let Err(e) = self.audit.record(&event, SystemTime::now()) {
            self.metrics.audit_write_errors.inc();
            tracing::error!(error = %e, "cannot write audit log");
        }
    }

    /// Attests the caller of `request` from its `authorization` metadata or client SVID.
    pub async fn attest<T>(
        self: &Arc<Self>,
        request: &Request<T>,
    ) -> Result<(Attested, Option<SocketAddr>), Status> {
        let peer = request.extensions().get::<SdsPeer>().cloned();
        let addr = peer.as_ref().map(|p| p.addr);
        // The rate limit comes first: a refused call costs a map lookup, no parsing, no
        // blocking-pool slot and no signature.
        if let Some(ip) = addr.map(|a| a.ip()) {
            if !self.limiter.admit(ip, std::time::Instant::now()) {
                self.metrics.sds_rate_limited.inc();
                tracing::debug!(peer = %ip, "SDS stream refused: rate limit");
                let limit = self.limiter.limit();
                return Err(Status::resource_exhausted(format!(
                    "too many SDS streams from {ip}: at most {}/s (burst {}); retry with backoff",
                    limit.per_second, limit.burst
                )));
            }
        }
        let auth = match request.metadata().get("authorization") {
            // Checked before the value is even copied: a huge header costs nothing more.
            Some(v) if v.len() > self.attestor.max_credential_len() => {
                let err = AttestError::Oversized("authorization metadata");
                self.refused(&err, addr);
                return Err(attest_status(&err));
            }
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| Status::unauthenticated("authorization metadata is not ASCII"))?
                    .to_owned(),
            ),
            None => None,
        };
        let svid = peer.and_then(|p| p.svid);
        let core = Arc::clone(self);
        // Join-token redemption commits to SQLite (fsync): keep it off the async workers.
        let result = tokio::task::spawn_blocking(move || {
            let cred = match (&auth, &svid) {
                (Some(a), _) => Credential::Authorization(a),
                (None, Some(id)) => Credential::PeerSvid(id),
                (None, None) => Credential::None,
            };
            core.attestor.attest(cred, addr, SystemTime::now())
        })
        .await
        .map_err(|e| Status::internal(format!("attestation task failed: {e}")))?;
        match result {
            Ok(attested) => Ok((attested, addr)),
            Err(err) => {
                self.refused(&err, addr);
                Err(attest_status(&err))
            }
        }
    }

    /// Counts, logs and audits a refused attestation, and charges the peer's rate limit so a
    /// client presenting bad credentials slows down.
    fn refused(&self, err: &AttestError, addr: Option<SocketAddr>) {
        if let Some(a) = addr {
            if !matches!(err, AttestError::Internal(_) | AttestError::Unavailable(_)) {
                self.limiter.failed(a.ip(), std::time::Instant::now());
            }
        }
        self.metrics.attestation_failed(err.reason());
        tracing::warn!(peer = ?addr, reason = err.reason(), error = %err, "attestation refused");
        self.audit(AuditEvent::Rejected {
            reason: err.reason(),
            detail: err.to_string(),
            attestor: err.attestor().map(AttestorKind::as_str),
            peer: addr,
        });
    }

    /// Issues an SVID for `who` (for the public key in `csr` when given), records it and
    /// writes the audit line.
    pub async fn issue(
        self: &Arc<Self>,
        who: &Attested,
        peer: Option<SocketAddr>,
        csr: Option<Arc<str>>,
    ) -> Result<Arc<Issued>, Status> {
        let core = Arc::clone(self);
        let id = who.spiffe_id.clone();
        let attestor = who.attestor.as_str();
        let (issued, serial_hex) = tokio::task::spawn_blocking(move || {
            let now = SystemTime::now();
            core.clock
                .check(now, std::time::Instant::now())
                .map_err(IssueFail::Clock)?;
            let ttl = core.policy.svid_ttl;
            // The serial and notAfter go to the records; the stream keeps only the leaf, its
            // key and the shared chain above it.
            let (issued, serial_hex, not_after) = match csr {
                None => {
                    let (svid, above) = core.ca.load().issue_leaf(&id, ttl, now)?;
                    let (serial_hex, not_after) = (svid.serial_hex().to_owned(), svid.not_after());
                    let (chain, key) = svid.into_parts();
                    let leaf = chain
                        .into_iter()
                        .next()
                        .ok_or_else(|| CaError::Sign("issued an empty chain".into()))?;
                    (Issued::new(leaf, Some(key), above), serial_hex, not_after)
                }
                Some(csr) => {
                    let (leaf, above) = core.ca.load().sign_csr_leaf(&csr, &id, ttl, now)?;
                    let facts = trellis_identity::cert_facts(&leaf)
                        .map_err(|e| CaError::Sign(e.to_string()))?;
                    (
                        Issued::new(leaf, None, above),
                        facts.serial_hex,
                        facts.not_after,
                    )
                }
            };
            // No SVID without its log entry: one that cannot be described is not handed out.
            let log = crate::translog::issuance_body(&issued.leaf(), attestor)
                .map_err(CaError::Sign)?;
            // Audit completeness beats availability: the line is written before the SVID
            // leaves, and an SVID whose line cannot be written is never handed out.
            let event = AuditEvent::Issued {
                spiffe_id: id.to_string(),
                serial_hex: serial_hex.clone(),
                not_after,
                attestor,
                peer,
            };
            if let Err(e) = core.audit.record(&event, now) {
                return Err(IssueFail::Audit(e));
            }
            let serial_for_log = serial_hex.clone();
            core.recorder.record(IssuanceRecord {
                spiffe_id: id,
                serial_hex,
                not_after,
                attestor,
                peer,
                issued_at: now,
                log,
            });
            Ok::<_, IssueFail>((issued, serial_for_log))
        })
        .await
        .map_err(|e| Status::internal(format!("issuance task failed: {e}")))?
        .map_err(|e| match e {
            IssueFail::Ca(CaError::BadCsr(why)) => {
                self.metrics.request_error("bad_csr");
                Status::invalid_argument(format!(
                    "CSR in node.metadata[\"{CSR_METADATA_KEY}\"] refused: {why}"
                ))
            }
            IssueFail::Ca(e) => {
                tracing::error!(error = %e, "cannot issue SVID");
                Status::internal("cannot issue SVID; see control plane logs")
            }
            IssueFail::Clock(jump) => {
                self.metrics
                    .issuances_refused
                    .get_or_create(&crate::metrics::ReasonLabel {
                        reason: "clock_jump",
                    })
                    .inc();
                tracing::error!(spiffe_id = %who.spiffe_id, "{jump}");
                Status::unavailable(jump.to_string())
            }
            IssueFail::Audit(e) => {
                self.metrics.audit_write_errors.inc();
                self.metrics
                    .issuances_refused
                    .get_or_create(&crate::metrics::ReasonLabel {
                        reason: "audit_write",
                    })
                    .inc();
                let why = format!(
                    "cannot record the issuance in the audit log {}: {e}; no SVID is handed out without its record (is the state directory full, read-only or gone?)",
                    self.audit.path().display()
                );
                tracing::error!(spiffe_id = %who.spiffe_id, "{why}");
                Status::unavailable(why)
            }
        })?;
        let spiffe_id = &who.spiffe_id;
        self.metrics
            .svids_issued
            .get_or_create(&AttestorLabel { attestor })
            .inc();
        let csr_mode = !issued.has_key();
        tracing::info!(%spiffe_id, serial = %serial_hex, attestor, csr_mode, peer = peer.map(tracing::field::display), "issued SVID");
        Ok(Arc::new(issued))
    }
}

/// Why an issuance failed: the clock, signing, or recording it.
enum IssueFail {
    Clock(crate::clock_guard::ClockJump),
    Ca(CaError),
    Audit(std::io::Error),
}

impl From<CaError> for IssueFail {
    fn from(e: CaError) -> Self {
        IssueFail::Ca(e)
    }
}

/// `node.metadata` key under which a client sends a PEM CSR (keys never leave the workload).
pub const CSR_METADATA_KEY: &str = "trellis.io/csr";

/// The value of `node.metadata[key]` in a request, if there is one.
fn node_metadata<'a>(req: &'a DiscoveryRequest, key: &str) -> Option<&'a prost_types::value::Kind> {
    req.node
        .as_ref()?
        .metadata
        .as_ref()?
        .fields
        .get(key)?
        .kind
        .as_ref()
}

/// The CSR a request carries, if any.
fn request_csr(req: &DiscoveryRequest) -> Option<&str> {
    match node_metadata(req, CSR_METADATA_KEY)? {
        prost_types::value::Kind::StringValue(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The log size a witness reports in `node.metadata` (a number), if any.
fn request_witnessed_size(req: &DiscoveryRequest) -> Option<u64> {
    match node_metadata(req, trellis_transparency::WITNESSED_SIZE_METADATA_KEY)? {
        // JSON numbers are doubles: exact up to 2^53 entries, far beyond any log.
        prost_types::value::Kind::NumberValue(n) if *n >= 0.0 && n.fract() == 0.0 => {
            Some(*n as u64)
        }
        _ => None,
    }
}

/// The serial a witness reports holding in `node.metadata` (hex, at most 20 bytes as RFC 5280
/// allows a serial), as sent; anything else is ignored. Compare it ignoring case; store it
/// with [`held_serial`].
fn request_held_serial(req: &DiscoveryRequest) -> Option<&str> {
    match node_metadata(req, trellis_transparency::HELD_SERIAL_METADATA_KEY)? {
        prost_types::value::Kind::StringValue(s)
            if (1..=40).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Some(s)
        }
        _ => None,
    }
}

/// A reported serial as the log looks it up: lowercase.
fn held_serial(reported: &str) -> Arc<str> {
    Arc::from(reported.to_ascii_lowercase())
}

/// How long a stream waits for a signed head to cover the SVID its client reported holding
/// before it gives up (the next rotation carries the proof then). An entry is normally
/// covered about one head interval after the SVID is issued.
const PROOF_WAIT: Duration = Duration::from_secs(60);

/// A stream waiting for a head that covers its client's SVID.
struct ProofWait {
    heads: watch::Receiver<u64>,
    until: tokio::time::Instant,
}

/// Resolves when the log's head moves (`false`: the log is gone). Polled only while a wait
/// is set (the `select!` branch is guarded), so `None` never resolves. The watch's wait is
/// boxed: this future sits in every stream's idle state, and a wait is set only in the minute
/// after an issuance.
async fn head_moved(reports: &mut Option<Box<Reports>>) -> bool {
    match reports.as_mut().and_then(|r| r.proof_wait.as_mut()) {
        Some(w) => Box::pin(w.heads.changed()).await.is_ok(),
        None => std::future::pending().await,
    }
}

fn attest_status(err: &AttestError) -> Status {
    match err {
        // gRPC: "UNAVAILABLE: The service is currently unavailable. This is most likely a
        // transient condition, which can be corrected by retrying with a backoff."
        AttestError::Unavailable(_) => Status::unavailable(err.to_string()),
        AttestError::Internal(_) => Status::internal(err.to_string()),
        AttestError::Oversized(_) => Status::invalid_argument(err.to_string()),
        _ => Status::unauthenticated(err.to_string()),
    }
}

/// The tonic service.
pub struct SdsService {
    core: Arc<SdsCore>,
}

impl SdsService {
    /// Wraps the shared core.
    pub fn new(core: Arc<SdsCore>) -> Self {
        Self { core }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "Trellis serves State-of-the-World SDS: use StreamSecrets or FetchSecrets",
        ))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (attested, peer) = self.core.attest(&request).await?;
        let driver =
            StreamDriver::new(Arc::clone(&self.core), attested, peer, request.into_inner());
        Ok(Response::new(Box::pin(driver.into_responses())))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let (attested, peer) = self.core.attest(&request).await?;
        let req = request.into_inner();
        let mut state = StreamState::new();
        if let Err(e) = state.on_request(&attested.spiffe_id, &req) {
            self.core.metrics.request_error(e.reason());
            return Err(e.to_status());
        }
        let svid = if state.wants(ResourceKind::Svid) {
            let csr = request_csr(&req).map(Arc::from);
            Some(self.core.issue(&attested, peer, csr).await?)
        } else {
            None
        };
        let bundle = self.core.bundle.current();
        let held = request_held_serial(&req).map(held_serial);
        let log_head = if state.wants(ResourceKind::LogHead) {
            self.core
                .log_head(
                    request_witnessed_size(&req),
                    held.as_ref(),
                    &attested.spiffe_id,
                )
                .await
        } else {
            None
        };
        let envelope = state.next_envelope();
        self.core.metrics.pushed("fetch");
        Ok(Response::new(build_response(
            &state,
            envelope,
            svid.as_deref(),
            &bundle,
            log_head.as_ref().map(|h| h.json.as_slice()),
        )))
    }
}

fn build_response(
    state: &StreamState,
    envelope: stream::Envelope,
    svid: Option<&Issued>,
    bundle: &TrustBundle,
    log_head: Option<&[u8]>,
) -> DiscoveryResponse {
    let resources = state
        .names()
        .iter()
        .filter_map(|(name, kind)| match kind {
            ResourceKind::Svid => svid.map(|s| to_any(&svid_secret(name, s))),
            ResourceKind::Bundle => Some(to_any(&bundle_secret(name, bundle))),
            ResourceKind::LogHead => log_head.map(|h| to_any(&log_head_secret(name, h))),
        })
        .collect();
    DiscoveryResponse {
        version_info: envelope.version,
        resources,
        canary: false,
        type_url: SECRET_TYPE_URL.to_owned(),
        nonce: envelope.nonce,
    }
}

/// The push reason of a log head re-sent with the held SVID's inclusion proof.
const LOG_PROOF: &str = "log_proof";

/// What the driver does next on its stream.
enum Step {
    /// Send this response, then keep going.
    Send(DiscoveryResponse),
    /// Send this error status and end the stream, for the given reason.
    Fail(Status, Ended),
    /// End the stream (OK status), for the given reason.
    End(Ended),
}

/// Why a stream ended (a byte, not a `&str`: every stream holds one).
#[derive(Clone, Copy, Debug)]
enum Ended {
    ClientGone,
    ClientClosed,
    ClientError,
    RequestRefused,
    IssuanceFailed,
    ShuttingDown,
}

impl Ended {
    fn as_str(self) -> &'static str {
        match self {
            Ended::ClientGone => "client gone",
            Ended::ClientClosed => "client closed",
            Ended::ClientError => "client error",
            Ended::RequestRefused => "request refused",
            Ended::IssuanceFailed => "issuance failed",
            Ended::ShuttingDown => "shutting down",
        }
    }
}

/// One SDS stream's state, driven by tonic polling the response stream.
struct StreamDriver {
    core: Arc<SdsCore>,
    attested: Attested,
    peer: Option<SocketAddr>,
    inbound: Streaming<DiscoveryRequest>,
    state: StreamState,
    /// The bundle's level ([`SdsBundle::level`]) when this stream last pushed it, or opened.
    bundle_level: u64,
    svid: Option<Arc<Issued>>,
    /// What the client reported beyond stock SDS, once it reports any of it.
    reports: Option<Box<Reports>>,
    rotation: Pin<Box<Sleep>>,
    /// Why the stream ended, for the debug line when it is dropped; tonic drops it without a
    /// word when the client goes away.
    ended: Ended,
    /// An error status was the last item: the stream ends after it.
    failed: bool,
}

/// What a Trellis sidecar adds to stock SDS on its stream, and the proof wait that follows.
/// Boxed, and made only once a client reports any of it: a stock Envoy's stream never has it,
/// and every stream's idle state is 80 bytes smaller for it (with tonic's boxed trailers,
/// jemalloc's 640-byte class instead of 768).
#[derive(Default)]
struct Reports {
    /// The CSR the client's SVIDs are for (its own key).
    csr: Option<Arc<str>>,
    /// The size of the last log head the client says it accepted.
    witnessed: Option<std::num::NonZeroU64>,
    /// The serial of the SVID the client says it holds.
    held_serial: Option<Arc<str>>,
    /// The held serial whose inclusion proof this stream sent last.
    proven_serial: Option<Arc<str>>,
    /// Set while the held SVID's proof is due and no head covered it yet.
    proof_wait: Option<ProofWait>,
}

/// Keeps `trellis_sds_streams` right however a stream ends (counted up in `new`).
impl Drop for StreamDriver {
    fn drop(&mut self) {
        self.core.metrics.sds_streams.dec();
        tracing::debug!(spiffe_id = %self.attested.spiffe_id, peer = ?self.peer, reason = self.ended.as_str(), "SDS stream closed");
    }
}

impl StreamDriver {
    fn new(
        core: Arc<SdsCore>,
        attested: Attested,
        peer: Option<SocketAddr>,
        inbound: Streaming<DiscoveryRequest>,
    ) -> Self {
        tracing::debug!(spiffe_id = %attested.spiffe_id, peer = ?peer, "SDS stream opened");
        core.metrics.sds_streams.inc();
        Self {
            state: StreamState::new(),
            bundle_level: core.bundle.level(),
            rotation: Box::pin(tokio::time::sleep(Duration::MAX / 4)),
            svid: None,
            reports: None,
            ended: Ended::ClientGone,
            failed: false,
            core,
            attested,
            peer,
            inbound,
        }
    }

    /// The responses, until the client goes away or a request is refused (then that error is
    /// the last item). Nothing runs unless tonic polls: a client that stops reading holds up
    /// only its own stream, exactly as a full channel did.
    fn into_responses(self) -> impl Stream<Item = Result<DiscoveryResponse, Status>> + Send {
        // The driver is used where the closure's future captured it: moved into a local (as
        // an `Option` unwrapped would be), it would sit in the stream twice for the stream's
        // life (rust-lang/rust#62958).
        futures::stream::unfold(self, |mut driver| async move {
            if driver.failed {
                return None;
            }
            match driver.next().await {
                Step::Send(response) => Some((Ok(response), driver)),
                Step::Fail(status, reason) => {
                    driver.ended = reason;
                    driver.failed = true;
                    Some((Err(status), driver))
                }
                Step::End(reason) => {
                    driver.ended = reason;
                    // Dropped now: its `Drop` logs why the stream closed.
                    drop(driver);
                    None
                }
            }
        })
    }

    /// Waits for the next thing to send: an answer to a request, a rotation or a bundle change.
    async fn next(&mut self) -> Step {
        loop {
            let push_reason = tokio::select! {
                msg = self.inbound.next() => {
                    let req = match msg {
                        None => return Step::End(Ended::ClientClosed),
                        Some(Err(status)) => {
                            tracing::debug!(%status, "SDS stream error from client");
                            // E.g. a request over sds_max_message_bytes: tell the client why.
                            return Step::Fail(status, Ended::ClientError);
                        }
                        Some(Ok(req)) => req,
                    };
                    match self.on_request(&req) {
                        Ok(Some(reason)) => reason,
                        Ok(None) => continue,
                        Err(status) => return Step::Fail(status, Ended::RequestRefused),
                    }
                }
                () = &mut self.rotation, if self.svid.is_some() && self.state.wants(ResourceKind::Svid) => {
                    self.svid = None;
                    "rotation"
                }
                () = self.core.bundle.changed_after(self.bundle_level) => {
                    self.bundle_level = self.core.bundle.level();
                    if self.bundle_level == BUNDLE_GONE {
                        return Step::End(Ended::ShuttingDown);
                    }
                    if !self.state.wants(ResourceKind::Bundle) {
                        continue;
                    }
                    "bundle"
                }
                moved = head_moved(&mut self.reports), if self.proof_wait().is_some() => {
                    let expired = self
                        .proof_wait()
                        .is_some_and(|w| tokio::time::Instant::now() >= w.until);
                    if !moved || expired {
                        if let Some(r) = self.reports.as_mut() {
                            r.proof_wait = None;
                        }
                        continue;
                    }
                    LOG_PROOF
                }
            };
            // A log head already built with the held SVID's proof (the `log_proof` push).
            let mut prepared = None;
            if push_reason == LOG_PROOF {
                // The SVID just pushed is in a signed head about a second later: send the head
                // again then, with its proof, rather than an hour later with the next rotation.
                // Nothing else changes (the client installs nothing new). Awaited here, not in
                // the `select!` arm: there the select's output (which can hold a whole request)
                // would be kept across the await, in every idle stream's state. Boxed, as is
                // `issue` below: a future is as large as its largest await point, and these
                // rare ones must not size the idle one.
                match Box::pin(self.core.log_head(
                    self.witnessed(),
                    self.unproven_serial(),
                    &self.attested.spiffe_id,
                ))
                .await
                {
                    Some(head) if head.proven => prepared = Some(head),
                    _ => continue,
                }
            }

            if self.state.wants(ResourceKind::Svid) && self.svid.is_none() {
                let csr = self.reports.as_ref().and_then(|r| r.csr.clone());
                match Box::pin(self.core.issue(&self.attested, self.peer, csr)).await {
                    Ok(s) => {
                        self.svid = Some(s);
                        let next = tokio::time::Instant::now() + self.core.policy.next_rotation();
                        self.rotation.as_mut().reset(next);
                    }
                    Err(status) => return Step::Fail(status, Ended::IssuanceFailed),
                }
            }
            // The level first: a change after it is pushed again, never missed.
            self.bundle_level = self.core.bundle.level();
            let bundle = self.core.bundle.current();
            let log_head = match prepared {
                Some(head) => Some(head),
                None if self.state.wants(ResourceKind::LogHead) => {
                    Box::pin(self.core.log_head(
                        self.witnessed(),
                        self.unproven_serial(),
                        &self.attested.spiffe_id,
                    ))
                    .await
                }
                None => None,
            };
            if log_head.as_ref().is_some_and(|h| h.proven) {
                if let Some(r) = self.reports.as_mut() {
                    r.proven_serial = r.held_serial.clone();
                    r.proof_wait = None;
                }
            }
            let envelope = self.state.next_envelope();
            let response = build_response(
                &self.state,
                envelope,
                self.svid.as_deref(),
                &bundle,
                log_head.as_ref().map(|h| h.json.as_slice()),
            );
            self.core.metrics.pushed(push_reason);
            return Step::Send(response);
        }
    }

    /// Applies one request: `Some(reason)` when a response is due, `None` when not, an error
    /// status when the request is refused (which ends the stream).
    fn on_request(&mut self, req: &DiscoveryRequest) -> Result<Option<&'static str>, Status> {
        // A new CSR (the client rotating its key) is honoured whatever the nonce: the client
        // repeats its CSR on every request until it holds a certificate for it.
        if let Some(size) = request_witnessed_size(req) {
            // A size of 0 proves nothing, as no report does (`log_head` skips both).
            self.reports_mut().witnessed = std::num::NonZeroU64::new(size);
        }
        let held_csr = self.reports.as_ref().and_then(|r| r.csr.as_deref());
        let new_csr = match request_csr(req) {
            Some(c) if held_csr != Some(c) => Some(Arc::<str>::from(c)),
            _ => None,
        };
        let mut reason = match self.state.on_request(&self.attested.spiffe_id, req) {
            Err(e) => {
                self.core.metrics.request_error(e.reason());
                tracing::warn!(caller = %self.attested.spiffe_id, peer = ?self.peer, reason = e.reason(), "SDS request refused");
                return Err(e.to_status());
            }
            Ok(Decision::Respond) => Some("request"),
            Ok(Decision::Quiet) | Ok(Decision::Stale) => None,
            Ok(Decision::Nack { detail, respond }) => {
                self.core.metrics.sds_nacks.inc();
                tracing::warn!(caller = %self.attested.spiffe_id, peer = ?self.peer, detail, "SDS client rejected an update (NACK)");
                respond.then_some("request")
            }
        };
        if let Some(c) = new_csr {
            self.reports_mut().csr = Some(c);
            if self.state.wants(ResourceKind::Svid) {
                self.svid = None;
                reason = reason.or(Some("csr"));
            }
        }
        // Every ACK repeats the serial: allocate only when it changes.
        if let Some(serial) = request_held_serial(req) {
            if !self
                .reports
                .as_ref()
                .and_then(|r| r.held_serial.as_deref())
                .is_some_and(|held| held.eq_ignore_ascii_case(serial))
            {
                self.reports_mut().held_serial = Some(held_serial(serial));
                self.await_proof();
            }
        }
        Ok(reason)
    }

    /// The held SVID's serial while this stream has not yet sent its inclusion proof: once
    /// sent, later heads go without it (the client checks each head's consistency with the
    /// one it proved against), which spares two registry reads per stream and push.
    fn unproven_serial(&self) -> Option<&Arc<str>> {
        let r = self.reports.as_deref()?;
        r.held_serial
            .as_ref()
            .filter(|held| r.proven_serial.as_ref() != Some(*held))
    }

    /// The size of the last log head the client says it accepted.
    fn witnessed(&self) -> Option<u64> {
        self.reports
            .as_ref()
            .and_then(|r| r.witnessed)
            .map(std::num::NonZeroU64::get)
    }

    /// The wait for the held SVID's proof, while one is set.
    fn proof_wait(&self) -> Option<&ProofWait> {
        self.reports.as_ref().and_then(|r| r.proof_wait.as_ref())
    }

    /// The client's reports, made on its first.
    fn reports_mut(&mut self) -> &mut Reports {
        self.reports.get_or_insert_with(Box::default)
    }

    /// Starts waiting for a head that covers the held SVID, unless its proof was sent.
    fn await_proof(&mut self) {
        let due = self.unproven_serial().is_some() && self.state.wants(ResourceKind::LogHead);
        let Some(log) = self.core.log.as_ref().filter(|_| due) else {
            if let Some(r) = self.reports.as_mut() {
                r.proof_wait = None;
            }
            return;
        };
        let mut heads = log.watch_heads();
        // The head may cover it already: look once before waiting for the next one.
        heads.mark_changed();
        self.reports_mut().proof_wait = Some(ProofWait {
            heads,
            until: tokio::time::Instant::now() + PROOF_WAIT,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned<A, R>(_: fn(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// A fresh root CA's bundle.
    fn bundle() -> Arc<TrustBundle> {
        Arc::new(trellis_identity::testca::TestCa::root("example.org").bundle())
    }

    /// A stream waits for the level after the one it pushed: every change wakes it, and the
    /// bundle's sender going away (shutdown) does too.
    #[tokio::test]
    async fn every_bundle_change_wakes_the_streams_and_so_does_shutdown() {
        let (tx, rx) = watch::channel(bundle());
        let sds = SdsBundle::follow(rx);
        let pushed = sds.level();
        let first = sds.current();
        let wait = sds.changed_after(pushed);
        let next = bundle();
        tx.send(Arc::clone(&next)).unwrap();
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("a bundle change wakes a waiting stream");
        assert!(sds.level() > pushed);
        assert_eq!(sds.current().roots(), next.roots());
        assert_ne!(first.roots(), next.roots());
        // Nothing changed since: a wait from the current level stays pending.
        let idle = sds.changed_after(sds.level());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), idle)
                .await
                .is_err(),
            "woken with no change"
        );
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), sds.changed_after(sds.level()))
            .await
            .expect("the bundle's sender going away wakes a waiting stream");
        assert_eq!(sds.level(), BUNDLE_GONE);
    }

    /// Every connected workload keeps one of these streams (boxed, for tonic) for as long as it
    /// is connected, nearly always idle in its `select!`. Its size is its state at its largest
    /// await point: 1,296 bytes (jemalloc's 1,536-byte class) when a log-head query was awaited
    /// inside a `select!` arm, which kept the select's output, a whole request, alive; 768
    /// with a Trellis sidecar's reports and tonic's trailers inline; 600 with the bundle's
    /// `watch` wait (120 bytes) in place of a watermark's (40). At most 512 bytes keeps it in
    /// jemalloc's 512-byte class.
    #[test]
    fn an_idle_stream_fits_in_512_bytes() {
        let size = returned(StreamDriver::into_responses);
        assert!(size <= 512, "an SDS response stream is {size} bytes");
    }

    /// tonic boxes each open stream's response body (the SDS codec's encoder around the boxed
    /// response stream) for as long as the stream lives: 192 bytes with a client's
    /// cancellation wait inline, 128 in the patched tonic (third_party/README.md), jemalloc's
    /// 128-byte class.
    #[test]
    fn a_response_body_fits_in_128_bytes() {
        type Responses = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
        type Encoder = trellis_proto::codec::SdsEncoder<DiscoveryResponse>;
        let size = std::mem::size_of::<tonic::codec::EncodeBody<Encoder, Responses>>();
        assert!(size <= 128, "an SDS response body is {size} bytes");
    }
}
