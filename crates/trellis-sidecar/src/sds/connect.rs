//! A gRPC channel to the control plane over TLS 1.3, verifying that the server is
//! `spiffe://<td>/trellis/control` under the sidecar's *current* trust bundle (which starts as
//! the bootstrap bundle and follows `ROOTCA` updates), and presenting the current SVID when
//! there is one (re-attestation without a token).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};
use trellis_identity::tls::{
    client_config, PeerMatch, SharedBundle, SpiffeServerVerifier, SvidResolver, TlsPolicy,
};
use trellis_identity::SpiffeId;

use crate::dial::{connect_tcp, TcpTarget};

/// Path of the control plane's SPIFFE ID.
pub const CONTROL_ID_PATH: &str = "/trellis/control";

/// TCP connect + TLS handshake + HTTP/2 setup must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 PING interval on the SDS channel, idle or not, and how long a PING may go
/// unanswered: a control plane behind a path that drops packets is noticed 10-30 s later (the
/// sidecar then reconnects with backoff, serving its current SVID meanwhile). Nothing waits on
/// the stream, so it may take longer than the data path's 5 s + 5 s. Answering a PING costs
/// the control plane ~25 µs, so a fleet's PINGs are most of what its idle streams cost: every
/// 10 s was 4.1–4.4% of a core per 16,667 sidecars (a quarter of a core at 100,000), every
/// 20 s 2.3–3.2%. Under 30 s, so the connection never goes quiet long enough for the
/// control plane's kernel to probe it as well (`sds::listener::DEAD_PEER` there).
pub const KEEPALIVE: (Duration, Duration) = (Duration::from_secs(20), Duration::from_secs(10));

/// Opens a channel to `address` (`host:port`).
pub async fn connect(
    address: &str,
    bundle: SharedBundle,
    server_id: SpiffeId,
    svid: Option<Arc<SvidResolver>>,
) -> Result<Channel, String> {
    let verifier = SpiffeServerVerifier::new(bundle, PeerMatch::Exact(server_id));
    let tls = client_config(svid, verifier, TlsPolicy::Tls13, &[b"h2"])
        .map_err(|e| format!("TLS setup: {e}"))?;
    let connector = TlsConnector::from(Arc::new(tls));
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("`{address}` is not a valid host:port: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        // Notice a control plane that vanished without closing the connection.
        .http2_keep_alive_interval(KEEPALIVE.0)
        .keep_alive_timeout(KEEPALIVE.1)
        .keep_alive_while_idle(true);
    let address = address.to_owned();
    let connect = endpoint.connect_with_connector(tower::service_fn(move |_uri| {
        let connector = connector.clone();
        let address = address.clone();
        async move {
            // A fresh SYN every second while unanswered: reconnects within ~1 s of a healed
            // path instead of sitting out the kernel's SYN backoff.
            let tcp = connect_tcp(TcpTarget::Name(&address), CONNECT_TIMEOUT).await?;
            // The name is not checked: the verifier checks the SPIFFE ID, not a DNS name.
            let name = rustls::pki_types::ServerName::try_from("trellis-control")
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    }));
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(clock_hint(error_chain(&e), std::time::SystemTime::now())),
        Err(_) => Err(format!("timed out after {CONNECT_TIMEOUT:?}")),
    }
}

/// rustls says `NotValidNow` (webpki: "certificate expired" / "not valid yet") when the
/// control plane's certificate is outside its validity at this host's time. The control plane
/// backdates by only 60 s, so this is almost always a clock that is off on one side: say so,
/// with the time this host believes it is.
fn clock_hint(message: String, now: std::time::SystemTime) -> String {
    let lower = message.to_ascii_lowercase();
    if lower.contains("notvalidnow")
        || lower.contains("certificate expired")
        || lower.contains("not valid yet")
    {
        format!(
            "{message} (the control plane's certificate is not valid at this host's time, {}: check this host's clock and the control plane's)",
            trellis_serve::time::rfc3339(now)
        )
    } else {
        message
    }
}

/// `e` and its sources, joined: tonic's own message ("transport error") says little.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_outside_its_validity_points_at_the_clock() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let msg = clock_hint(
            "transport error: invalid peer certificate: Other(OtherError(NotValidNow { not_before: 1, not_after: 2 }))".into(),
            now,
        );
        assert!(msg.ends_with("(the control plane's certificate is not valid at this host's time, 2027-01-15T08:00:00Z: check this host's clock and the control plane's)"), "{msg}");
        assert_eq!(
            clock_hint("connection refused".into(), now),
            "connection refused"
        );
    }
}
