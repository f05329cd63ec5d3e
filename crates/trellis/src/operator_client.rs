//! The client side of the control plane's operator socket (`trellis_control::operator`):
//! one JSON request over HTTP/1.1 on a Unix socket, the JSON answer or the server's refusal
//! as the error.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use trellis_control::operator::ErrorBody;

/// The socket of a control plane run with the default `--state-dir` (`/var/lib/trellis`,
/// also where the Kubernetes manifests put it), so `kubectl exec` finds it without flags.
pub const DEFAULT_SOCKET: &str = "/var/lib/trellis/operator.sock";

/// How long one request may take: the server answers within seconds (a database write).
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `POST path` with `body` on the socket at `socket`; the decoded answer, or the server's
/// refusal as the error message.
pub fn post<Req: Serialize, Resp: DeserializeOwned>(
    socket: &Path,
    path: &str,
    body: &Req,
) -> anyhow::Result<Resp> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let body = serde_json::to_vec(body)?;
    let (status, bytes) = runtime.block_on(async {
        tokio::time::timeout(TIMEOUT, exchange(socket, path, body))
            .await
            .map_err(|_| {
                anyhow!(
                    "the control plane did not answer on {} within {TIMEOUT:?}",
                    socket.display()
                )
            })?
    })?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "unexpected answer from the operator socket {}",
                socket.display()
            )
        });
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(e) => bail!("{}", e.error),
        Err(_) => bail!(
            "the control plane answered {status}: {}",
            String::from_utf8_lossy(&bytes).trim()
        ),
    }
}

async fn exchange(
    socket: &Path,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<(http::StatusCode, Bytes)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| connect_error(socket, &e))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("operator socket handshake")?;
    tokio::spawn(conn);
    let req = http::Request::post(path)
        .header(http::header::HOST, "trellis-operator")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = send
        .send_request(req)
        .await
        .with_context(|| format!("request to the operator socket {}", socket.display()))?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}

/// What to do when the socket cannot be reached: name the path and the flag.
fn connect_error(socket: &Path, e: &std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::NotFound => "no control plane serves an operator socket there",
        std::io::ErrorKind::PermissionDenied => {
            "the socket is mode 0600: run as the control plane's user (in Kubernetes: \
             kubectl exec deploy/trellis-control -- trellis …)"
        }
        std::io::ErrorKind::ConnectionRefused => "the control plane that made it is not running",
        _ => "is `trellis control` running?",
    };
    anyhow!(
        "cannot connect to the operator socket {} ({e}): {hint}; pass the control plane's \
         socket with --socket PATH (or TRELLIS_OPERATOR_SOCKET; `trellis control \
         --operator-socket`, default <state-dir>/operator.sock), or use --state-dir/--database \
         to write to a stopped control plane's state directly",
        socket.display()
    )
}

/// `--socket` (or `TRELLIS_OPERATOR_SOCKET`), else where `trellis control` puts it by
/// default: `operator.sock` in `TRELLIS_STATE_DIR` when that is set (as for the control
/// plane), else [`DEFAULT_SOCKET`].
pub fn socket_or_default(socket: Option<PathBuf>) -> PathBuf {
    socket
        .or_else(|| {
            std::env::var_os("TRELLIS_STATE_DIR")
                .filter(|d| !d.is_empty())
                .map(|d| trellis_control::operator::default_socket(Path::new(&d)))
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}
