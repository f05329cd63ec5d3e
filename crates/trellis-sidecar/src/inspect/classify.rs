//! Why a handshake failed, read from what rustls and the socket said: a stable [`Reason`],
//! the side that refused, and the TLS alert if one came.

use std::io;

use rustls::{AlertDescription, PeerIncompatible, ProtocolVersion};
use trellis_identity::{IdError, SvidError};

use super::report::{Reason, Side};

/// True if `first` could start a TLS record from a server: handshake (22) or alert (21), with
/// a 3.x record version. Fewer than 3 bytes are given the benefit of the doubt.
pub(super) fn looks_like_tls(first: &[u8]) -> bool {
    match first {
        [] => true,
        [kind] => matches!(kind, 21 | 22),
        [kind, major, ..] => matches!(kind, 21 | 22) && *major == 3,
    }
}

/// A failed handshake or read, classified.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Failure {
    pub(super) reason: Reason,
    pub(super) side: Option<Side>,
    pub(super) alert: Option<AlertDescription>,
    pub(super) detail: String,
}

/// Classifies an error from the handshake or the first read; `first` is what the peer sent first.
pub(super) fn classify_io_error(err: &io::Error, first: &[u8]) -> Failure {
    if let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return classify_tls_error(tls, first);
    }
    let (reason, detail) = match err.kind() {
        _ if !looks_like_tls(first) => (Reason::NotTls, not_tls_detail(first)),
        io::ErrorKind::UnexpectedEof if first.is_empty() => (
            Reason::ConnectionClosed,
            "the peer closed the connection without answering the ClientHello".to_owned(),
        ),
        io::ErrorKind::UnexpectedEof => (
            Reason::ConnectionClosed,
            "the peer closed the connection in the middle of the handshake".to_owned(),
        ),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => (
            Reason::ConnectionClosed,
            format!("the peer reset the connection: {err}"),
        ),
        _ => (Reason::Other, err.to_string()),
    };
    let side = (reason == Reason::ConnectionClosed).then_some(Side::Server);
    Failure {
        reason,
        side,
        alert: None,
        detail,
    }
}

fn not_tls_detail(first: &[u8]) -> String {
    let printable: String = first
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                char::from(b)
            } else {
                '.'
            }
        })
        .collect();
    format!(
        "the peer answered the ClientHello with bytes that are not a TLS record: {} (\"{printable}\")",
        hex::encode(first)
    )
}

/// Classifies a rustls error seen by the client.
pub(super) fn classify_tls_error(err: &rustls::Error, first: &[u8]) -> Failure {
    let failure = |reason, side, detail: String| Failure {
        reason,
        side,
        alert: None,
        detail,
    };
    match err {
        rustls::Error::AlertReceived(alert) => Failure {
            reason: reason_for_alert(*alert),
            side: Some(Side::Server),
            alert: Some(*alert),
            detail: format!("the server sent the TLS alert {}", alert_name(*alert)),
        },
        _ if !looks_like_tls(first) => failure(Reason::NotTls, None, not_tls_detail(first)),
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. } => failure(
            Reason::NotTls,
            None,
            format!("the peer's answer is not a TLS ServerHello: {err}"),
        ),
        rustls::Error::PeerIncompatible(
            PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::Tls13RequiredForQuic
            | PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::ServerDoesNotSupportTls12Or13
            | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig,
        ) => failure(
            Reason::ProtocolVersion,
            Some(Side::Client),
            format!("the server chose a TLS version we do not offer: {err}"),
        ),
        rustls::Error::PeerIncompatible(_) => failure(
            Reason::HandshakeFailure,
            Some(Side::Client),
            err.to_string(),
        ),
        other => failure(Reason::Other, Some(Side::Client), other.to_string()),
    }
}

/// The reason a server's alert gives.
pub(super) fn reason_for_alert(alert: AlertDescription) -> Reason {
    match alert {
        AlertDescription::CertificateRequired => Reason::NoCert,
        AlertDescription::UnknownCA => Reason::UnknownCa,
        AlertDescription::CertificateExpired => Reason::Expired,
        AlertDescription::BadCertificate
        | AlertDescription::UnsupportedCertificate
        | AlertDescription::CertificateUnknown
        | AlertDescription::CertificateRevoked
        | AlertDescription::AccessDenied => Reason::BadCertificate,
        AlertDescription::ProtocolVersion => Reason::ProtocolVersion,
        AlertDescription::HandshakeFailure
        | AlertDescription::InsufficientSecurity
        | AlertDescription::NoApplicationProtocol
        | AlertDescription::IllegalParameter => Reason::HandshakeFailure,
        _ => Reason::Other,
    }
}

/// The reason our own verification of the peer's chain gives.
pub(super) fn reason_for_svid_error(
    err: &SvidError,
    leaf_not_before: Option<i64>,
    now: i64,
) -> Reason {
    match err {
        SvidError::NotValidNow { .. } if leaf_not_before.is_some_and(|nb| nb > now) => {
            Reason::NotYetValid
        }
        SvidError::NotValidNow { .. } => Reason::Expired,
        SvidError::UnknownIssuer { .. } => Reason::UnknownCa,
        SvidError::WrongIdentity { .. } | SvidError::BadId(IdError::WrongTrustDomain { .. }) => {
            Reason::WrongIdentity
        }
        // No URI SAN, or one that is not a SPIFFE ID (an ordinary web certificate).
        SvidError::UriSanCount(0) | SvidError::BadId(IdError::Invalid { .. }) => Reason::NoSpiffeId,
        SvidError::UriSanCount(_)
        | SvidError::LeafIsCa
        | SvidError::LeafCanSign
        | SvidError::MissingKeyUsage { .. }
        | SvidError::Malformed(_) => Reason::NotSvid,
        SvidError::EmptyChain => Reason::NoCert,
        SvidError::KeyMismatch | SvidError::BadKey(_) | SvidError::BadBundle(_) => Reason::Other,
    }
}

/// The RFC 8446 name of an alert (`certificate_required`), from rustls' CamelCase one.
pub fn alert_name(alert: AlertDescription) -> String {
    let Some(camel) = alert.as_str() else {
        return format!("alert_{}", u8::from(alert));
    };
    let chars: Vec<char> = camel.chars().collect();
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            let prev_lower = chars[i - 1].is_ascii_lowercase();
            let next_lower = chars.get(i + 1).is_some_and(char::is_ascii_lowercase);
            // "UnknownCA" -> unknown_ca; "UnknownPSKIdentity" -> unknown_psk_identity.
            if prev_lower || (chars[i - 1].is_ascii_uppercase() && next_lower) {
                out.push('_');
            }
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

pub(super) fn version_name(version: ProtocolVersion) -> String {
    match version {
        ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
        ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_for_our_verdict_on_the_peer() {
        let now = 1_000_000;
        let expired = SvidError::NotValidNow {
            not_before: 0,
            not_after: 10,
        };
        let cases = [
            (expired, Some(0), Reason::Expired),
            (
                SvidError::NotValidNow {
                    not_before: now + 60,
                    not_after: now + 120,
                },
                Some(now + 60),
                Reason::NotYetValid,
            ),
            (
                SvidError::UnknownIssuer {
                    trust_domain: "example.org".into(),
                    detail: "UnknownIssuer".into(),
                },
                Some(0),
                Reason::UnknownCa,
            ),
            (
                SvidError::WrongIdentity {
                    expected: "spiffe://example.org/a".into(),
                    presented: "spiffe://example.org/b".into(),
                },
                Some(0),
                Reason::WrongIdentity,
            ),
            (
                SvidError::BadId(IdError::WrongTrustDomain {
                    id: "spiffe://other.org/a".into(),
                    expected: "example.org".into(),
                }),
                Some(0),
                Reason::WrongIdentity,
            ),
            (SvidError::UriSanCount(0), Some(0), Reason::NoSpiffeId),
            (
                SvidError::BadId(IdError::Invalid {
                    input: "https://example.org".into(),
                    reason: "scheme".into(),
                }),
                Some(0),
                Reason::NoSpiffeId,
            ),
            (SvidError::UriSanCount(2), Some(0), Reason::NotSvid),
            (SvidError::LeafIsCa, Some(0), Reason::NotSvid),
            (
                SvidError::MissingKeyUsage {
                    required: "serverAuth",
                },
                Some(0),
                Reason::NotSvid,
            ),
        ];
        for (err, not_before, want) in cases {
            assert_eq!(
                reason_for_svid_error(&err, not_before, now),
                want,
                "{err:?}"
            );
        }
    }

    #[test]
    fn reasons_for_server_alerts() {
        let cases = [
            (AlertDescription::CertificateRequired, Reason::NoCert),
            (AlertDescription::UnknownCA, Reason::UnknownCa),
            (AlertDescription::CertificateExpired, Reason::Expired),
            (AlertDescription::BadCertificate, Reason::BadCertificate),
            (AlertDescription::CertificateUnknown, Reason::BadCertificate),
            (AlertDescription::ProtocolVersion, Reason::ProtocolVersion),
            (AlertDescription::HandshakeFailure, Reason::HandshakeFailure),
            (AlertDescription::DecryptError, Reason::Other),
        ];
        for (alert, want) in cases {
            let failure = classify_tls_error(&rustls::Error::AlertReceived(alert), &[21, 3, 3]);
            assert_eq!(failure.reason, want, "{alert:?}");
            assert_eq!(failure.side, Some(Side::Server));
            assert_eq!(failure.alert, Some(alert));
        }
    }

    #[test]
    fn alert_names_follow_the_rfc() {
        assert_eq!(
            alert_name(AlertDescription::CertificateRequired),
            "certificate_required"
        );
        assert_eq!(alert_name(AlertDescription::UnknownCA), "unknown_ca");
        assert_eq!(
            alert_name(AlertDescription::UnknownPSKIdentity),
            "unknown_psk_identity"
        );
        assert_eq!(alert_name(AlertDescription::BadRecordMac), "bad_record_mac");
        assert_eq!(alert_name(AlertDescription::Unknown(200)), "alert_200");
    }

    #[test]
    fn reasons_for_client_side_errors() {
        let tls = [22, 3, 3, 0, 80];
        let version = classify_tls_error(
            &rustls::Error::PeerIncompatible(
                PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig,
            ),
            &tls,
        );
        assert_eq!(
            (version.reason, version.side),
            (Reason::ProtocolVersion, Some(Side::Client))
        );
        let suites = classify_tls_error(
            &rustls::Error::PeerIncompatible(PeerIncompatible::NoCipherSuitesInCommon),
            &tls,
        );
        assert_eq!(suites.reason, Reason::HandshakeFailure);

        // "HTTP/1.1 400" in answer to a ClientHello.
        let http = classify_tls_error(
            &rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
            b"HTTP/",
        );
        assert_eq!((http.reason, http.side), (Reason::NotTls, None));
        assert!(http.detail.contains("HTTP/"), "{}", http.detail);
        // An echo server sends our own ClientHello back: TLS-shaped, but not an answer.
        let echo = classify_tls_error(
            &rustls::Error::InappropriateHandshakeMessage {
                expect_types: vec![rustls::HandshakeType::ServerHello],
                got_type: rustls::HandshakeType::ClientHello,
            },
            &[22, 3, 1, 0, 200],
        );
        assert_eq!(echo.reason, Reason::NotTls);
    }

    #[test]
    fn reasons_for_io_errors() {
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof");
        let closed = classify_io_error(&eof, &[]);
        assert_eq!(
            (closed.reason, closed.side),
            (Reason::ConnectionClosed, Some(Side::Server))
        );
        assert_eq!(classify_io_error(&eof, b"SSH-2").reason, Reason::NotTls);
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
        );
        assert_eq!(classify_io_error(&wrapped, &[]).reason, Reason::NoCert);
    }

    #[test]
    fn tls_records_look_like_tls() {
        assert!(looks_like_tls(&[]));
        assert!(looks_like_tls(&[22, 3, 3, 0, 122]));
        assert!(looks_like_tls(&[21, 3, 3, 0, 2]));
        assert!(!looks_like_tls(b"HTTP/1.1 400"));
        assert!(!looks_like_tls(&[22, 0x48]));
    }
}
