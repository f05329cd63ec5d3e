//! What an inspection learnt, as `trellis inspect --json` prints it and as a sidecar's
//! `POST /inspect` answers it: the verdict, the stable [`Reason`] and refusing [`Side`] when it
//! failed, the negotiated parameters and the peer's chain.

use std::fmt;

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use trellis_identity::{rfc3339, unix_secs, SpiffeId};

use super::options::{InspectOptions, Target, TrustDomainSource};

/// Who ended the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// We did: the server's certificate or parameters were not acceptable.
    Client,
    /// The server did: it refused our certificate (or its absence) or the handshake.
    Server,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Server => "server",
        })
    }
}

/// Why an inspection failed: a stable snake_case label for scripts and alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reason {
    /// The host name did not resolve.
    ResolveFailed,
    /// Nothing listens on the port.
    ConnectRefused,
    /// The TCP connection failed otherwise (unreachable, reset).
    ConnectFailed,
    /// No answer within the timeout.
    Timeout,
    /// The peer answered with something that is not TLS.
    NotTls,
    /// No TLS version in common.
    ProtocolVersion,
    /// No cipher suite, group or signature scheme in common, or a generic handshake_failure.
    HandshakeFailure,
    /// The certificate does not chain to the bundle (or the server does not know our CA).
    UnknownCa,
    /// The certificate's notAfter has passed.
    Expired,
    /// The certificate's notBefore is in the future.
    NotYetValid,
    /// The peer's SPIFFE ID is not the expected one, or not in the trust domain.
    WrongIdentity,
    /// The peer's certificate carries no SPIFFE ID.
    NoSpiffeId,
    /// The peer's certificate breaks another X509-SVID rule (CA flag, key usage, two URI SANs).
    NotSvid,
    /// The server requires a client certificate and we sent none.
    NoCert,
    /// The server refused our certificate without saying more.
    BadCertificate,
    /// The peer closed the connection without a TLS alert.
    ConnectionClosed,
    /// Anything else; `detail` says what. A reason this build does not know (a report from a
    /// newer sidecar) reads as this one.
    #[serde(other)]
    Other,
}

impl Reason {
    /// The snake_case label, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::ResolveFailed => "resolve_failed",
            Reason::ConnectRefused => "connect_refused",
            Reason::ConnectFailed => "connect_failed",
            Reason::Timeout => "timeout",
            Reason::NotTls => "not_tls",
            Reason::ProtocolVersion => "protocol_version",
            Reason::HandshakeFailure => "handshake_failure",
            Reason::UnknownCa => "unknown_ca",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::WrongIdentity => "wrong_identity",
            Reason::NoSpiffeId => "no_spiffe_id",
            Reason::NotSvid => "not_svid",
            Reason::NoCert => "no_cert",
            Reason::BadCertificate => "bad_certificate",
            Reason::ConnectionClosed => "connection_closed",
            Reason::Other => "other",
        }
    }

    /// One sentence for an operator, from the point of view of the side that refused.
    pub fn describe(self, refused_by: Option<Side>) -> &'static str {
        let server = refused_by == Some(Side::Server);
        match self {
            Reason::ResolveFailed => "the host name does not resolve",
            Reason::ConnectRefused => "nothing is listening there (connection refused)",
            Reason::ConnectFailed => "the TCP connection failed",
            Reason::Timeout => "no answer within the timeout",
            Reason::NotTls => "the peer does not speak TLS",
            Reason::ProtocolVersion => "the two sides have no TLS version in common",
            Reason::HandshakeFailure => {
                "the two sides have no cipher suite, group or signature scheme in common"
            }
            Reason::UnknownCa if server => {
                "the server does not trust the CA that signed our certificate"
            }
            Reason::UnknownCa => "the peer's certificate is signed by a CA not in the bundle",
            Reason::Expired if server => "the server says our certificate has expired",
            Reason::Expired => "the peer's certificate has expired",
            Reason::NotYetValid => "the peer's certificate is not valid yet",
            Reason::WrongIdentity => "the peer's SPIFFE ID is not the expected one",
            Reason::NoSpiffeId => "the peer's certificate carries no SPIFFE ID",
            Reason::NotSvid => "the peer's certificate is not a valid X509-SVID",
            Reason::NoCert => "the server requires a client certificate and we sent none",
            Reason::BadCertificate => "the server refused our certificate",
            Reason::ConnectionClosed => "the peer closed the connection without a TLS alert",
            Reason::Other => "the handshake failed",
        }
    }

    /// A server's refusal of our certificate (or of its absence).
    pub(super) fn is_about_client_cert(self) -> bool {
        matches!(
            self,
            Reason::NoCert | Reason::UnknownCa | Reason::Expired | Reason::BadCertificate
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One certificate of the peer's chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertInfo {
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// notBefore, RFC 3339 UTC.
    pub not_before: String,
    /// notAfter, RFC 3339 UTC.
    pub not_after: String,
    /// notBefore, unix seconds.
    pub not_before_unix: i64,
    /// notAfter, unix seconds.
    pub not_after_unix: i64,
    /// URI SANs that are SPIFFE IDs (`spiffe://…`).
    pub spiffe_ids: Vec<String>,
    /// basicConstraints cA.
    pub is_ca: bool,
}

impl CertInfo {
    pub(super) fn of(der: &CertificateDer<'_>) -> Option<Self> {
        let facts = trellis_identity::cert_facts(der).ok()?;
        let not_before_unix = unix_secs(facts.not_before);
        let not_after_unix = unix_secs(facts.not_after);
        Some(CertInfo {
            subject: facts.subject,
            issuer: facts.issuer,
            serial: facts.serial_hex,
            not_before: rfc3339(not_before_unix),
            not_after: rfc3339(not_after_unix),
            not_before_unix,
            not_after_unix,
            spiffe_ids: facts
                .uri_sans
                .into_iter()
                .filter(|u| u.starts_with("spiffe://"))
                .collect(),
            is_ca: facts.is_ca,
        })
    }
}

/// What we learnt about our own certificate's fate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientCertReport {
    /// The certificate we would present (its SPIFFE ID or subject); `None`: we have none.
    pub presented: Option<String>,
    /// The server asked for a client certificate.
    pub requested: bool,
    /// The server accepted our certificate (or its absence); `None` when the handshake ended
    /// before the server could say.
    pub accepted: Option<bool>,
}

/// Everything one inspection learnt. `ok` is the verdict; the rest explains it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InspectReport {
    /// `HOST:PORT` as given.
    pub target: String,
    /// The address connected to.
    pub address: Option<String>,
    /// The handshake completed, the peer verified and the server accepted us.
    pub ok: bool,
    /// The peer's chain verified against the bundle, with the expected SPIFFE ID.
    pub verified: bool,
    /// Why it failed.
    pub reason: Option<Reason>,
    /// Which side refused, when one did.
    pub refused_by: Option<Side>,
    /// The precise error (verifier message, rustls error, OS error).
    pub detail: Option<String>,
    /// The TLS alert the server sent, e.g. `certificate_required`.
    pub alert: Option<String>,
    /// Time to establish TCP, in milliseconds.
    pub tcp_connect_ms: Option<f64>,
    /// Time of the TLS handshake (after TCP), in milliseconds.
    pub handshake_ms: Option<f64>,
    /// `TLSv1.3` or `TLSv1.2`.
    pub tls_version: Option<String>,
    /// IANA name of the cipher suite, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher_suite: Option<String>,
    /// The key-exchange group, e.g. `X25519MLKEM768` (post-quantum hybrid) or `X25519`
    /// (`trellis_identity::tls::group_label`). Absent from older sidecars' reports.
    #[serde(default)]
    pub key_exchange: Option<String>,
    /// The protocol the server chose by ALPN, if it chose one.
    pub alpn: Option<String>,
    /// The trust domain the peer was checked against.
    pub trust_domain: Option<String>,
    /// Where [`InspectReport::trust_domain`] came from.
    pub trust_domain_source: Option<TrustDomainSource>,
    /// The exact SPIFFE ID required; `None`: any ID in the trust domain.
    pub expected_spiffe_id: Option<String>,
    /// The peer leaf's SPIFFE ID, verified or not.
    pub peer_spiffe_id: Option<String>,
    /// The chain the peer presented, leaf first.
    pub peer_chain: Vec<CertInfo>,
    /// Our side of client authentication.
    pub client_cert: ClientCertReport,
}

impl InspectReport {
    pub(super) fn new(target: &Target, opts: &InspectOptions) -> Self {
        let td = opts.known_trust_domain();
        InspectReport {
            target: target.to_string(),
            address: None,
            ok: false,
            verified: false,
            reason: None,
            refused_by: None,
            detail: None,
            alert: None,
            tcp_connect_ms: None,
            handshake_ms: None,
            tls_version: None,
            cipher_suite: None,
            key_exchange: None,
            alpn: None,
            trust_domain: td.as_ref().map(|(td, _)| td.to_string()),
            trust_domain_source: td.map(|(_, source)| source),
            expected_spiffe_id: opts.expected.as_ref().map(SpiffeId::to_string),
            peer_spiffe_id: None,
            peer_chain: Vec::new(),
            client_cert: ClientCertReport {
                presented: opts.client.as_ref().map(|c| c.name.clone()),
                ..ClientCertReport::default()
            },
        }
    }

    /// Records the first failure; a later one (the server refusing us after we already refused
    /// its certificate) does not replace it.
    pub(super) fn fail(&mut self, reason: Reason, refused_by: Option<Side>, detail: String) {
        if self.reason.is_none() {
            self.reason = Some(reason);
            self.refused_by = refused_by;
            self.detail = Some(detail);
        }
    }
}
