//! Address and socket facts a listener acts on.

use std::net::IpAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// True for 127.0.0.0/8 and ::1, and for 127.0.0.0/8 mapped into IPv6 (`::ffff:127.0.0.1`,
/// what a dual-stack `[::]` listener sees from an IPv4 loopback client). The admin endpoints'
/// actions and the SDS rate limit's exemption are for peers on this host.
pub fn is_loopback(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

/// Dead-peer detection by the kernel: TCP keepalive probes after `interval` without traffic,
/// one a second, and TCP_USER_TIMEOUT of `interval + timeout`, so a connection whose packets
/// vanish (sent data unacknowledged, probes unanswered) is closed within `interval + timeout`
/// at no cost to the process. A sidecar sets it from `limits.h2.keepalive_*` on peer sockets
/// (it bounds what has no HTTP/2 PING of its own: the HTTP/1.1 fallback, WebSocket and TCP
/// forwards, the inbound side of a peer's pooled connection); the control plane on every SDS
/// connection, in place of PINGs.
#[derive(Debug, Clone, Copy)]
pub struct DeadPeer {
    /// Quiet time before the first probe (a sidecar's `limits.h2.keepalive_interval`).
    pub interval: Duration,
    /// How long probes go unanswered before the kernel closes the connection (a sidecar's
    /// `limits.h2.keepalive_timeout`).
    pub timeout: Duration,
}

impl DeadPeer {
    /// Sets the options on `tcp`. Best effort: a platform without them keeps its defaults.
    pub fn apply(&self, tcp: &TcpStream) {
        if let Err(e) = self.set(socket2::SockRef::from(tcp)) {
            tracing::debug!(error = %e, "cannot set TCP keepalive or TCP_USER_TIMEOUT");
        }
    }

    /// Sets the options on `sock`: each is tried even if the other is refused; the first
    /// refusal is returned.
    pub(crate) fn set(&self, sock: socket2::SockRef<'_>) -> std::io::Result<()> {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(self.interval.clamp(Duration::from_secs(1), MAX_KEEPIDLE))
            .with_interval(self.probe_interval())
            .with_retries(self.probes());
        let probes = sock.set_tcp_keepalive(&keepalive);
        let user_timeout = sock.set_tcp_user_timeout(Some(self.interval + self.timeout));
        probes.and(user_timeout)
    }

    /// Keepalive probes sent over `timeout` before the kernel gives up: one a second, at most
    /// ten (Linux refuses more than 127).
    fn probes(&self) -> u32 {
        u32::try_from(self.timeout.as_secs().clamp(1, 10)).unwrap_or(10)
    }

    fn probe_interval(&self) -> Duration {
        (self.timeout / self.probes()).clamp(Duration::from_secs(1), MAX_KEEPIDLE)
    }
}

/// Linux's ceiling for `TCP_KEEPIDLE` and `TCP_KEEPINTVL` (past it the whole option is refused).
const MAX_KEEPIDLE: Duration = Duration::from_secs(32_767);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dead_peer_probes_fit_the_timeout_within_kernel_limits() {
        let at = |interval, timeout| DeadPeer {
            interval: Duration::from_secs(interval),
            timeout: Duration::from_secs(timeout),
        };
        let d = at(5, 5);
        assert_eq!(
            (d.probes(), d.probe_interval()),
            (5, Duration::from_secs(1))
        );
        let d = at(30, 3600);
        assert_eq!(
            (d.probes(), d.probe_interval()),
            (10, Duration::from_secs(360))
        );
        let d = DeadPeer {
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(10),
        };
        assert_eq!(
            (d.probes(), d.probe_interval()),
            (1, Duration::from_secs(1))
        );
    }

    #[test]
    fn loopback_in_every_spelling_and_nothing_else() {
        for ip in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.0.0.7",
            "0.0.0.0",
            "::",
            "::ffff:10.0.0.7",
            "fe80::1",
            "2001:db8::1",
        ] {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }
}
