//! The operator API: `trellis token create` and `trellis ca rotate` ask the running control
//! plane over a Unix socket instead of opening its database, so an operator needs access to
//! the socket, not the database credentials (SPIRE's server CLI works the same way).
//!
//! - **Socket**: `--operator-socket` (default `<state-dir>/operator.sock`), created mode 0600,
//!   so only the control plane's user (and root) can connect: in Kubernetes, whoever may
//!   `kubectl exec` into the control plane's pod. A stale socket file from an earlier run is
//!   replaced; any other file at the path is an error. The file is removed on shutdown.
//! - **Protocol**: HTTP/1.1 on `trellis-serve`'s admin-style server, JSON bodies:
//!   - `POST /v1/tokens` `{"spiffe_id","ttl_seconds"}` → `201` [`TokenCreated`];
//!   - `POST /v1/ca/rotations` `{"activate_after_seconds","material"?}` → `201`
//!     [`RotationScheduled`] (no material: a fresh self-signed root);
//!   - refusals → `400` (or `413`, `404`, `405`) with [`ErrorBody`], whose message the CLI
//!     prints as is.
//! - **Validation happens here**, once, for every client: a SPIFFE ID outside the control
//!   plane's trust domain is refused when the token is created (not later, when a workload
//!   fails to redeem it), and rotation material must build a CA of this trust domain.
//! - Every action is written to the audit log with the operator's uid (peer credentials).

use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use trellis_identity::{SpiffeId, TrustDomain};
use trellis_serve::http::{AdminAction, HttpServer, Routes, ServerLimits};
use trellis_serve::time::rfc3339;
use trellis_serve::{ConnLimit, Drain};
use zeroize::Zeroizing;

use crate::audit::{AuditEvent, AuditLog};
use crate::ca::Ca;
use crate::registry::{CaMaterial, Registry};

/// The socket's file name in the state directory when `--operator-socket` is not given.
pub const SOCKET_NAME: &str = "operator.sock";
/// `POST` here creates a join token.
pub const TOKENS_PATH: &str = "/v1/tokens";
/// `POST` here schedules a CA rotation.
pub const ROTATIONS_PATH: &str = "/v1/ca/rotations";
/// Largest request body: CA material (a chain, a key, roots) is a few KiB.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Longest join-token lifetime accepted: a token is a bearer credential until redeemed.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most operator connections open at once.
const MAX_CONNECTIONS: usize = 16;
/// Time for a request head, then for its body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The default socket path for `state_dir`.
pub fn default_socket(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// The identity the token's holder receives.
    pub spiffe_id: String,
    /// How long the token can be redeemed, in seconds.
    pub ttl_seconds: u64,
}

/// The answer to [`CreateToken`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The token, shown once.
    pub token: String,
    /// The identity it is bound to.
    pub spiffe_id: String,
    /// Until when it can be redeemed (RFC 3339).
    pub expires_at: String,
}

/// Operator-supplied CA material, PEM (checked by the CLI from its files, and again here).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationMaterial {
    /// The intermediate and any parents.
    pub chain_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// Its roots.
    pub bundle_pem: String,
}

/// `POST /v1/ca/rotations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRotation {
    /// Seconds before the new CA signs (it joins the bundle at once).
    pub activate_after_seconds: u64,
    /// The new CA; absent: a fresh self-signed root.
    #[serde(default)]
    pub material: Option<RotationMaterial>,
    /// The trust domain the operator means (`--trust-domain`); refused unless it is the
    /// control plane's.
    #[serde(default)]
    pub trust_domain: Option<String>,
}

/// The answer to [`ScheduleRotation`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotationScheduled {
    /// The rotation's id.
    pub id: i64,
    /// The new CA (subject and serial).
    pub ca: String,
    /// When it starts signing (RFC 3339).
    pub activate_at: String,
}

/// A refusal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What is wrong and what to do, for the operator.
    pub error: String,
}

/// Why the operator socket could not be served.
#[derive(Debug, Error)]
pub enum OperatorSocketError {
    /// Something other than a socket is at the path.
    #[error("{path}: exists and is not a socket; remove it or choose another --operator-socket")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A running control plane serves the socket already.
    #[error("{path}: another control plane is serving this operator socket; give this one its own --operator-socket")]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// Binding, or setting the mode, failed.
    #[error("operator socket {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// What the operator API acts on.
pub struct OperatorState {
    /// The control plane's trust domain: the only one tokens and CAs may be for.
    pub trust_domain: TrustDomain,
    /// Where tokens and rotations are stored (the control plane's own connection).
    pub registry: Arc<Registry>,
    /// Every action is recorded here.
    pub audit: Arc<AuditLog>,
    /// Opens a rotation's key when it is a PKCS#11 URI (the token stays the key's home).
    pub keys: crate::keys::Keyring,
}

/// The operator socket, serving.
pub struct OperatorSocket {
    /// Its path.
    pub path: PathBuf,
    /// The accept loop; ends (and removes the socket file) on drain.
    pub task: JoinHandle<()>,
}

/// Binds `path` (mode 0600, replacing a stale socket) and serves the operator API until
/// `drain` signals.
pub fn start(
    path: &Path,
    state: Arc<OperatorState>,
    drain: Drain,
) -> Result<OperatorSocket, OperatorSocketError> {
    let io = |source| OperatorSocketError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // Another control plane serves it: taking its name would cut its operators off.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(OperatorSocketError::InUse {
                    path: path.to_owned(),
                });
            }
            // Left by a process that did not shut down cleanly: binding needs the name.
            std::fs::remove_file(path).map_err(io)?
        }
        Ok(_) => {
            return Err(OperatorSocketError::NotASocket {
                path: path.to_owned(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    // connect(2) needs write permission on the socket: 0600 leaves the owner (and root).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    let limits = ServerLimits {
        header_read_timeout: REQUEST_TIMEOUT,
        max_header_bytes: 16 * 1024,
        max_headers: Some(32),
        idle_timeout: Some(Duration::from_secs(60)),
        max_streams_per_connection: 1,
        max_pending_resets: 1,
        max_local_error_resets: None,
    };
    let server = Arc::new(HttpServer::new(Arc::new(Api(state)), &limits).http1_only());
    let owned = path.to_owned();
    tracing::info!(path = %owned.display(), "operator socket serving");
    let task = tokio::spawn(accept_loop(listener, server, owned.clone(), drain));
    Ok(OperatorSocket { path: owned, task })
}

async fn accept_loop(
    listener: UnixListener,
    server: Arc<HttpServer<Api>>,
    path: PathBuf,
    drain: Drain,
) {
    let cap = ConnLimit::new(MAX_CONNECTIONS);
    // The HTTP server takes a peer address for its logs; a Unix peer has none.
    let peer = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = drain.signaled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "operator socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(permit) = cap.try_acquire() else {
            tracing::warn!("operator socket at {MAX_CONNECTIONS} connections; closing one");
            continue;
        };
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        let (server, drain) = (Arc::clone(&server), drain.clone());
        tokio::spawn(async move {
            let _permit = permit;
            // The uid travels with the connection into the audit log.
            OPERATOR_UID
                .scope(uid, server.serve_connection(stream, peer, drain))
                .await;
        });
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
}

tokio::task_local! {
    /// The connected operator's uid, for the audit log.
    static OPERATOR_UID: Option<u32>;
}

struct Api(Arc<OperatorState>);

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).unwrap_or_default(),
    )));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn refuse(status: StatusCode, error: impl Into<String>) -> Response<Full<Bytes>> {
    json_response(
        status,
        &ErrorBody {
            error: error.into(),
        },
    )
}

impl Routes for Api {
    async fn respond(
        &self,
        req: Request<Incoming>,
        _peer: std::net::SocketAddr,
    ) -> (Response<Full<Bytes>>, AdminAction) {
        let uid = OPERATOR_UID.try_with(|u| *u).ok().flatten();
        (handle(&self.0, req, uid).await, AdminAction::None)
    }
}

async fn handle<B>(
    state: &Arc<OperatorState>,
    req: Request<B>,
    uid: Option<u32>,
) -> Response<Full<Bytes>>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path().to_owned();
    if path != TOKENS_PATH && path != ROTATIONS_PATH {
        return refuse(
            StatusCode::NOT_FOUND,
            format!(
                "not found: the operator API serves POST {TOKENS_PATH} and POST {ROTATIONS_PATH}"
            ),
        );
    }
    if req.method() != Method::POST {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, format!("use POST {path}"));
    }
    let body = match tokio::time::timeout(
        REQUEST_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request larger than {MAX_BODY_BYTES} bytes"),
            )
        }
        Ok(Err(e)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request: {e}"),
            )
        }
        Err(_) => {
            return refuse(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            )
        }
    };
    let state = Arc::clone(state);
    // The registry blocks (SQLite, PostgreSQL); so does building and checking a CA.
    let answer = tokio::task::spawn_blocking(move || {
        if path == TOKENS_PATH {
            create_token(&state, &body, uid)
        } else {
            schedule_rotation(&state, &body, uid)
        }
    })
    .await;
    match answer {
        Ok(Ok(resp)) => resp,
        Ok(Err((status, message))) => refuse(status, message),
        Err(e) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request failed: {e}"),
        ),
    }
}

type Answer = Result<Response<Full<Bytes>>, (StatusCode, String)>;

fn bad(message: impl Into<String>) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, message.into())
}

fn record(state: &OperatorState, action: &'static str, subject: String, uid: Option<u32>) {
    let event = AuditEvent::Operator {
        action,
        subject,
        uid,
    };
    if let Err(e) = state.audit.record(&event, SystemTime::now()) {
        tracing::error!(error = %e, "cannot write audit log");
    }
}

/// Checks a token request against the control plane's trust domain and stores the token.
pub fn check_token_request(
    trust_domain: &TrustDomain,
    req: &CreateToken,
) -> Result<(SpiffeId, Duration), String> {
    let id = SpiffeId::parse(&req.spiffe_id).map_err(|e| e.to_string())?;
    if id.trust_domain_name() != trust_domain.as_str() {
        return Err(format!(
            "`{id}` is outside the trust domain {trust_domain}: this control plane only issues \
             spiffe://{trust_domain}/… identities (a token for another trust domain could never \
             be redeemed here)"
        ));
    }
    if id.path().is_empty() {
        return Err(format!(
            "`{id}` is a trust domain ID; give a workload ID such as spiffe://{trust_domain}/ns/prod/sa/web"
        ));
    }
    let ttl = Duration::from_secs(req.ttl_seconds);
    if ttl.is_zero() {
        return Err("--ttl must be positive".into());
    }
    if ttl > MAX_TOKEN_TTL {
        return Err(format!(
            "--ttl {} is longer than {}: a join token is a credential until it is redeemed",
            humantime::format_duration(ttl),
            humantime::format_duration(MAX_TOKEN_TTL)
        ));
    }
    Ok((id, ttl))
}

fn create_token(state: &OperatorState, body: &[u8], uid: Option<u32>) -> Answer {
    let req: CreateToken =
        serde_json::from_slice(body).map_err(|e| bad(format!("not a token request: {e}")))?;
    let (id, ttl) = check_token_request(&state.trust_domain, &req).map_err(bad)?;
    let now = SystemTime::now();
    let token = state
        .registry
        .create_join_token(&id, ttl, now)
        .map_err(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot store the token: {e}"),
            )
        })?;
    record(state, "token_created", id.to_string(), uid);
    tracing::info!(spiffe_id = %id, ttl = %humantime::format_duration(ttl), ?uid, "join token created over the operator socket");
    Ok(json_response(
        StatusCode::CREATED,
        &TokenCreated {
            token: token.as_str().to_owned(),
            spiffe_id: id.to_string(),
            expires_at: rfc3339(now + ttl),
        },
    ))
}

fn schedule_rotation(state: &OperatorState, body: &[u8], uid: Option<u32>) -> Answer {
    let req: ScheduleRotation =
        serde_json::from_slice(body).map_err(|e| bad(format!("not a rotation request: {e}")))?;
    let activate_after = Duration::from_secs(req.activate_after_seconds);
    if activate_after < Duration::from_secs(1) {
        return Err(bad("--activate-after must be at least 1s: workloads need time to receive the new trust bundle before the new CA signs"));
    }
    let td = &state.trust_domain;
    if let Some(asked) = req.trust_domain.as_deref() {
        if asked != td.as_str() {
            return Err(bad(format!(
                "--trust-domain {asked} is not this control plane's trust domain {td}"
            )));
        }
    }
    let now = SystemTime::now();
    let material = match req.material {
        Some(m) => CaMaterial {
            chain_pem: m.chain_pem,
            bundle_pem: m.bundle_pem,
            key_pem: Zeroizing::new(m.key_pem),
        },
        None => Ca::new_root(td, now).map_err(|e| bad(e.to_string()))?,
    };
    // The checks the control plane applies when it loads the rotation, now, so a CA of
    // another trust domain or a key that does not match is refused here.
    let ca = Ca::from_material_with(
        td,
        &material,
        Path::new("the rotation request"),
        &state.keys,
    )
    .map_err(|e| bad(format!("{e} (trust domain {td})")))?;
    let activate_at = now + activate_after;
    let id = state
        .registry
        .add_ca_rotation(&material, now, activate_at, now)
        .map_err(|e| bad(format!("cannot schedule the rotation: {e}")))?;
    record(
        state,
        "ca_rotation_scheduled",
        format!("{id} {}", ca.label()),
        uid,
    );
    tracing::info!(rotation = id, ca = %ca.label(), ?uid, "CA rotation scheduled over the operator socket");
    Ok(json_response(
        StatusCode::CREATED,
        &RotationScheduled {
            id,
            ca: ca.label().to_owned(),
            activate_at: rfc3339(activate_at),
        },
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn token_requests_outside_the_trust_domain_are_refused_naming_it() {
        let td = TrustDomain::parse("example.org").unwrap();
        let req = |id: &str, ttl| CreateToken {
            spiffe_id: id.into(),
            ttl_seconds: ttl,
        };
        let err = check_token_request(&td, &req("spiffe://other.org/web", 60)).unwrap_err();
        assert!(
            err.contains("outside the trust domain example.org"),
            "{err}"
        );
        let err = check_token_request(&td, &req("spiffe://example.org", 60)).unwrap_err();
        assert!(err.contains("trust domain ID"), "{err}");
        let err = check_token_request(&td, &req("spiffe://example.org/web", 0)).unwrap_err();
        assert!(err.contains("positive"), "{err}");
        let err =
            check_token_request(&td, &req("spiffe://example.org/web", 31 * 24 * 3600)).unwrap_err();
        assert!(err.contains("longer than"), "{err}");
        let (id, ttl) = check_token_request(&td, &req("spiffe://example.org/web", 60)).unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/web");
        assert_eq!(ttl, Duration::from_secs(60));
    }
}
