//! JWT-SVIDs: the signing keys ([`keys`]) and `trellis.jwt.v1.JwtSvidService`, served next to
//! SDS on the same mTLS listener.
//!
//! Who gets a token: the SPIFFE ID of the client certificate the caller presented, verified
//! against the trust bundle in the handshake (the same [`SdsPeer`] SDS re-attests with). A
//! sidecar has that certificate once SDS gave it its X.509-SVID; nothing in the request names
//! an identity. Every issuance is rate-limited per source IP, written to the audit log before
//! the token leaves (never the token itself), and counted.

pub mod keys;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use trellis_identity::jwt::{check_audiences, NewJwtSvid};
use trellis_identity::{SpiffeId, TrustDomain};
use trellis_proto::trellis::jwt::v1::jwt_svid_service_server::JwtSvidService;
use trellis_proto::trellis::jwt::v1::{
    JwtBundleUpdate, MintJwtSvidRequest, MintJwtSvidResponse, WatchJwtBundleRequest,
};
use trellis_serve::time::unix_seconds;

use crate::audit::{AuditEvent, AuditLog};
use crate::metrics::ControlMetrics;
use crate::ratelimit::PeerLimiter;
use crate::sds::SdsPeer;
pub use keys::{JwtKeyError, JwtKeyPolicy, JwtKeys, JwtSigner};

/// The JWT-SVID service.
pub struct JwtService {
    /// The signing keys and the bundle.
    pub keys: Arc<JwtKeys>,
    /// Only this trust domain's IDs get tokens.
    pub trust_domain: TrustDomain,
    /// The audit log.
    pub audit: Arc<AuditLog>,
    /// Metrics.
    pub metrics: Arc<ControlMetrics>,
    /// Per-source-IP rate of mint calls.
    pub limiter: Arc<PeerLimiter>,
    /// Ends bundle streams when the control plane shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// A token's `iat`/`exp` come from the wall clock too: none right after it jumped.
    pub clock: Arc<crate::clock_guard::ClockGuard>,
}

impl JwtService {
    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.metrics.jwt_refused(reason);
        status
    }

    /// The caller's SPIFFE ID: its verified client certificate's.
    fn caller<T>(&self, request: &Request<T>) -> Result<(SpiffeId, Option<SocketAddr>), Status> {
        let peer = request.extensions().get::<SdsPeer>();
        let addr = peer.map(|p| p.addr);
        match peer.and_then(|p| p.svid.clone()) {
            Some(id) if id.is_member_of(&self.trust_domain) => Ok((id, addr)),
            Some(id) => Err(self.refuse(
                "no_svid",
                Status::permission_denied(format!(
                    "`{id}` is not in trust domain `{}`",
                    self.trust_domain
                )),
            )),
            None => Err(self.refuse(
                "no_svid",
                Status::unauthenticated(
                    "JWT-SVIDs are issued to callers presenting their X.509-SVID as TLS client certificate; none was presented",
                ),
            )),
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl JwtSvidService for JwtService {
    type WatchJwtBundleStream = BoxStream<JwtBundleUpdate>;

    async fn mint_jwt_svid(
        &self,
        request: Request<MintJwtSvidRequest>,
    ) -> Result<Response<MintJwtSvidResponse>, Status> {
        // The rate limit first: a refused call costs a map lookup and no signature.
        let addr = request.extensions().get::<SdsPeer>().map(|p| p.addr);
        if let Some(ip) = addr.map(|a| a.ip()) {
            if !self.limiter.admit(ip, Instant::now()) {
                let limit = self.limiter.limit();
                return Err(self.refuse(
                    "rate_limited",
                    Status::resource_exhausted(format!(
                        "too many JWT-SVID requests from {ip}: at most {}/s (burst {}); retry with backoff",
                        limit.per_second, limit.burst
                    )),
                ));
            }
        }
        let (id, peer) = self.caller(&request)?;
        let audiences = request.into_inner().audiences;
        if let Err(e) = check_audiences(&audiences) {
            return Err(self.refuse("bad_audience", Status::invalid_argument(e.to_string())));
        }
        let signer = self.keys.signer().ok_or_else(|| {
            self.refuse(
                "no_key",
                Status::unavailable("no JWT signing key in force yet; retry shortly"),
            )
        })?;
        let now = SystemTime::now();
        if let Err(jump) = self.clock.check(now, std::time::Instant::now()) {
            tracing::error!("{jump}");
            return Err(self.refuse("clock_jump", Status::unavailable(jump.to_string())));
        }
        let expires = now + self.keys.token_ttl();
        // Signing (a PKCS#11 token may be slow or retrying) and the audit write block: off the
        // async workers, as for X.509-SVIDs.
        let audit = Arc::clone(&self.audit);
        let key = Arc::clone(&signer);
        let minted = tokio::task::spawn_blocking(move || {
            let token = key
                .sign(&NewJwtSvid {
                    subject: &id,
                    audiences: &audiences,
                    issued_at: now,
                    expires_at: expires,
                })
                .map_err(MintFail::Sign)?;
            // Audit completeness beats availability, as for X.509-SVIDs: no token leaves
            // without its line. The line names the token by kid and expiry, never carries it.
            let event = AuditEvent::JwtIssued {
                spiffe_id: id.to_string(),
                audiences: audiences.clone(),
                kid: key.kid().to_owned(),
                expires_at: expires,
                peer,
            };
            audit.record(&event, now).map_err(MintFail::Audit)?;
            Ok((token, id, audiences))
        })
        .await
        .map_err(|e| Status::internal(format!("JWT-SVID issuance task failed: {e}")))?;
        let (token, id, audiences) = match minted {
            Ok(m) => m,
            Err(MintFail::Sign(e)) => {
                tracing::error!(error = %e, "cannot sign a JWT-SVID");
                return Err(self.refuse(
                    "sign",
                    Status::internal("cannot sign; see control plane logs"),
                ));
            }
            Err(MintFail::Audit(e)) => {
                self.metrics.audit_write_errors.inc();
                let why = format!(
                    "cannot record the JWT-SVID issuance in the audit log {}: {e}; no token is handed out without its record",
                    self.audit.path().display()
                );
                tracing::error!("{why}");
                return Err(self.refuse("audit_write", Status::unavailable(why)));
            }
        };
        self.metrics.jwt_svids_issued.inc();
        tracing::info!(spiffe_id = %id, kid = signer.kid(), audiences = ?audiences, peer = peer.map(tracing::field::display), "issued JWT-SVID");
        Ok(Response::new(MintJwtSvidResponse {
            token,
            spiffe_id: id.to_string(),
            expires_at: unix_seconds(expires),
            issued_at: unix_seconds(now),
        }))
    }

    async fn watch_jwt_bundle(
        &self,
        request: Request<WatchJwtBundleRequest>,
    ) -> Result<Response<Self::WatchJwtBundleStream>, Status> {
        // Public keys, but served to the mesh only, like everything on this listener.
        self.caller(&request)?;
        let bundles = self.keys.subscribe();
        let shutdown = self.shutdown.clone();
        let stream = futures::stream::unfold(
            (bundles, shutdown, true),
            |(mut bundles, mut shutdown, first)| async move {
                if !first {
                    tokio::select! {
                        changed = bundles.changed() => changed.ok()?,
                        _ = shutdown.wait_for(|s| *s) => return None,
                    }
                }
                let bundle = bundles.borrow_and_update().clone();
                let update = JwtBundleUpdate {
                    trust_domain: bundle.trust_domain().to_string(),
                    jwks: bundle.to_jwks(),
                };
                Some((Ok(update), (bundles, shutdown, false)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Why minting failed after the checks: signing, or recording it.
enum MintFail {
    Sign(JwtKeyError),
    Audit(std::io::Error),
}
