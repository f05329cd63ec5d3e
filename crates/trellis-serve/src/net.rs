//! Address facts a listener acts on.

use std::net::IpAddr;

/// True for 127.0.0.0/8 and ::1, and for 127.0.0.0/8 mapped into IPv6 (`::ffff:127.0.0.1`,
/// what a dual-stack `[::]` listener sees from an IPv4 loopback client). The admin endpoints'
/// actions and the SDS rate limit's exemption are for peers on this host.
pub fn is_loopback(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
