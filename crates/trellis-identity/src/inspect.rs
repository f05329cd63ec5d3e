//! One diagnostic TLS handshake with a peer, reported in full: the engine of `trellis inspect`
//! ("the `openssl s_client` of the mesh").
//!
//! [`inspect`] connects, shakes hands as a Trellis sidecar would (TLS 1.3, ALPN `h2` and
//! `http/1.1`, optionally presenting an SVID) and returns an [`InspectReport`]: timings, the
//! negotiated parameters, the peer's chain and SPIFFE ID, whether that chain verifies against the
//! bundle with the real [`SpiffeServerVerifier`], and on failure a stable [`Reason`] and which
//! side refused ([`Side`]).
//!
//! To report the peer's chain even when it does not verify, the handshake runs with a recording
//! verifier that keeps the chain and the real verifier's verdict but lets the handshake go on, so
//! that we also learn whether the server accepts *our* certificate. Nothing is ever written to
//! the peer beyond the handshake and a close_notify: no application data, verified or not.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, PeerIncompatible, ProtocolVersion, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::tls::{svid_error_of, PeerMatch, SpiffeServerVerifier};
use crate::{IdError, SpiffeId, SvidError, TrustBundle, TrustDomain};

/// ALPN protocols offered, as a Trellis sidecar offers them.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
/// How long to wait after a TLS 1.3 handshake for the server's verdict on our certificate.
const DEFAULT_SETTLE: Duration = Duration::from_secs(1);
/// Stands in for the trust domain while it is unknown (no `--trust-domain`, nothing in the
/// bundle): it only reaches the verifier when the peer has no SPIFFE ID to take one from, and
/// then the verdict is `no_spiffe_id` before any trust-domain check.
const UNKNOWN_TRUST_DOMAIN: &str = "unknown.invalid";

/// Bad input to an inspection, found before any connection is made.
#[derive(Debug, Error)]
pub enum InspectError {
    /// The target is not `HOST:PORT`.
    #[error("`{0}` is not HOST:PORT (IPv6 addresses go in brackets: [::1]:15443)")]
    BadTarget(String),
    /// The bundle holds no certificate, or one that is not a CA.
    #[error("{0}")]
    BadBundle(SvidError),
    /// The bundle's CAs name more than one trust domain.
    #[error("the bundle's CAs belong to several trust domains ({0}); pass --trust-domain")]
    MixedTrustDomains(String),
    /// The client certificate and key cannot be used together.
    #[error("client certificate: {0}")]
    BadClientCert(String),
}

/// Where to connect: a host name or IP address and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    host: String,
    port: u16,
}

impl Target {
    /// Parses `HOST:PORT`, `IPV4:PORT` or `[IPV6]:PORT`.
    pub fn parse(input: &str) -> Result<Self, InspectError> {
        let bad = || InspectError::BadTarget(input.to_owned());
        let (host, port) = if let Some(rest) = input.strip_prefix('[') {
            let (host, port) = rest.split_once("]:").ok_or_else(bad)?;
            (host, port)
        } else {
            input.rsplit_once(':').ok_or_else(bad)?
        };
        // A bare IPv6 address without brackets has colons in its "host".
        if host.is_empty() || (host.contains(':') && !input.starts_with('[')) {
            return Err(bad());
        }
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        let target = Target {
            host: host.to_owned(),
            port,
        };
        // A host that is neither an IP address nor a DNS name cannot go into the handshake.
        target.server_name()?;
        Ok(target)
    }

    /// The host name or IP address.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What rustls puts in SNI: a DNS name is sent, an IP address is not.
    fn server_name(&self) -> Result<ServerName<'static>, InspectError> {
        ServerName::try_from(self.host.clone())
            .map_err(|_| InspectError::BadTarget(self.to_string()))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// A client certificate chain and its key, checked to belong together.
#[derive(Clone)]
pub struct ClientIdentity {
    key: Arc<CertifiedKey>,
    /// The leaf's URI SAN (or subject when it has none), for the report.
    name: String,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("ClientIdentity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// `chain` (leaf first) and its private key. The leaf need not be a valid SVID: presenting
    /// a deliberately odd certificate is a legitimate diagnosis.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, InspectError> {
        let leaf = chain
            .first()
            .ok_or_else(|| InspectError::BadClientCert("no certificate".to_owned()))?;
        let facts =
            crate::cert_facts(leaf).map_err(|e| InspectError::BadClientCert(e.to_string()))?;
        let name = facts
            .uri_sans
            .first()
            .cloned()
            .unwrap_or_else(|| facts.subject.clone());
        let key = CertifiedKey::from_der(chain, key, &crate::tls::provider()).map_err(|e| {
            InspectError::BadClientCert(match e {
                rustls::Error::InconsistentKeys(_) => {
                    "the private key does not match the certificate".to_owned()
                }
                other => format!("unusable private key: {other}"),
            })
        })?;
        Ok(ClientIdentity {
            key: Arc::new(key),
            name,
        })
    }

    /// An already-loaded signing key and chain, e.g. the one a running sidecar presents: no key
    /// bytes are copied or re-parsed, so a borrowed identity never leaves its process.
    pub fn from_certified_key(key: Arc<CertifiedKey>) -> Result<Self, InspectError> {
        let leaf = key
            .cert
            .first()
            .ok_or_else(|| InspectError::BadClientCert("no certificate".to_owned()))?;
        let facts =
            crate::cert_facts(leaf).map_err(|e| InspectError::BadClientCert(e.to_string()))?;
        let name = facts
            .uri_sans
            .first()
            .cloned()
            .unwrap_or_else(|| facts.subject.clone());
        Ok(ClientIdentity { key, name })
    }

    /// A validated SVID (whose key [`Svid::new`](crate::Svid::new) already matched to its leaf).
    pub fn from_svid(svid: &crate::Svid) -> Result<Self, InspectError> {
        let signing_key = crate::tls::provider()
            .key_provider
            .load_private_key(svid.key().clone_key())
            .map_err(|e| InspectError::BadClientCert(format!("unusable private key: {e}")))?;
        Ok(ClientIdentity {
            key: Arc::new(CertifiedKey::new(svid.chain().to_vec(), signing_key)),
            name: svid.spiffe_id().to_string(),
        })
    }

    /// The leaf's SPIFFE ID (its first URI SAN) or, without one, its subject.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Where the trust domain the peer is checked against came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustDomainSource {
    /// Given explicitly (`--trust-domain`).
    Flag,
    /// The URI SAN (`spiffe://<td>`) of the bundle's CA certificates.
    Bundle,
    /// The expected SPIFFE ID (`--spiffe-id`).
    ExpectedId,
    /// The peer's own SPIFFE ID: nothing else named one, so membership proves little.
    Peer,
    /// The trust domain of the running sidecar whose identity the inspection borrowed
    /// (`trellis inspect --admin`), when its bundle's CAs name none.
    Sidecar,
}

/// What to check and present. Built with [`InspectOptions::new`] and the setters.
#[derive(Debug, Clone)]
pub struct InspectOptions {
    roots: Vec<CertificateDer<'static>>,
    trust_domain: Option<(TrustDomain, TrustDomainSource)>,
    expected: Option<SpiffeId>,
    client: Option<ClientIdentity>,
    tls12: bool,
    timeout: Duration,
    settle: Duration,
}

impl InspectOptions {
    /// Checks the peer against these CA certificates. Fails if there are none, if one is not a
    /// CA, or if their URI SANs name different trust domains. The trust domain is taken from
    /// those SANs until [`InspectOptions::trust_domain`] says otherwise.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, InspectError> {
        if roots.is_empty() {
            return Err(InspectError::BadBundle(SvidError::BadBundle(
                "no CA certificates".to_owned(),
            )));
        }
        let bundle_td = bundle_trust_domain(&roots)?;
        // Validates now (CA flag, parse) so a bad bundle is a usage error, not a failed probe.
        let placeholder = placeholder_trust_domain();
        TrustBundle::new(bundle_td.clone().unwrap_or(placeholder), roots.clone())
            .map_err(InspectError::BadBundle)?;
        Ok(InspectOptions {
            roots,
            trust_domain: bundle_td.map(|td| (td, TrustDomainSource::Bundle)),
            expected: None,
            client: None,
            tls12: false,
            timeout: Duration::from_secs(5),
            settle: DEFAULT_SETTLE,
        })
    }

    /// The trust domain the peer must belong to, overriding the bundle's.
    pub fn trust_domain(mut self, td: TrustDomain) -> Self {
        self.trust_domain = Some((td, TrustDomainSource::Flag));
        self
    }

    /// The trust domain of the sidecar running this inspection, used only when neither
    /// [`InspectOptions::trust_domain`] nor the bundle named one.
    pub fn sidecar_trust_domain(mut self, td: TrustDomain) -> Self {
        if self.trust_domain.is_none() {
            self.trust_domain = Some((td, TrustDomainSource::Sidecar));
        }
        self
    }

    /// The exact SPIFFE ID the peer must present (default: any ID in the trust domain).
    pub fn expect(mut self, id: SpiffeId) -> Self {
        self.expected = Some(id);
        self
    }

    /// Presents this certificate when the server asks for one (default: none).
    pub fn client(mut self, identity: ClientIdentity) -> Self {
        self.client = Some(identity);
        self
    }

    /// Offers TLS 1.2 as well as 1.3 (with every TLS 1.2 suite rustls has, to diagnose peers
    /// Trellis would not talk to).
    pub fn tls12(mut self, on: bool) -> Self {
        self.tls12 = on;
        self
    }

    /// The deadline for resolving, connecting and the handshake together (default 5 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long to wait after a TLS 1.3 handshake for an alert refusing our certificate
    /// (default 1 s). In TLS 1.3 the server judges the client's certificate after the client
    /// has finished its handshake, so silence for this long counts as acceptance.
    pub fn settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// The trust domain and where it came from, before the peer is seen.
    fn known_trust_domain(&self) -> Option<(TrustDomain, TrustDomainSource)> {
        self.trust_domain.clone().or_else(|| {
            self.expected.as_ref().and_then(|id| {
                TrustDomain::parse(id.trust_domain_name())
                    .ok()
                    .map(|td| (td, TrustDomainSource::ExpectedId))
            })
        })
    }
}

fn placeholder_trust_domain() -> TrustDomain {
    TrustDomain::parse(UNKNOWN_TRUST_DOMAIN).unwrap_or_else(|_| unreachable!("valid constant"))
}

/// The trust domain the CA certificates name in their `spiffe://<td>` URI SANs (X509-SVID 3.2:
/// a signing certificate's SPIFFE ID has no path), if any do.
fn bundle_trust_domain(
    roots: &[CertificateDer<'static>],
) -> Result<Option<TrustDomain>, InspectError> {
    let mut found: Vec<TrustDomain> = Vec::new();
    for root in roots {
        let Ok(facts) = crate::cert_facts(root) else {
            continue; // TrustBundle::new reports it with its index.
        };
        for uri in &facts.uri_sans {
            let Some(rest) = uri.strip_prefix("spiffe://") else {
                continue;
            };
            let name = rest.split('/').next().unwrap_or_default();
            if let Ok(td) = TrustDomain::parse(name) {
                if !found.contains(&td) {
                    found.push(td);
                }
            }
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(InspectError::MixedTrustDomains(
            found
                .iter()
                .map(TrustDomain::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

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
    fn is_about_client_cert(self) -> bool {
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
    fn of(der: &CertificateDer<'_>) -> Option<Self> {
        let facts = crate::cert_facts(der).ok()?;
        let not_before_unix = crate::cert::unix_secs(facts.not_before);
        let not_after_unix = crate::cert::unix_secs(facts.not_after);
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
    fn new(target: &Target, opts: &InspectOptions) -> Self {
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
    fn fail(&mut self, reason: Reason, refused_by: Option<Side>, detail: String) {
        if self.reason.is_none() {
            self.reason = Some(reason);
            self.refused_by = refused_by;
            self.detail = Some(detail);
        }
    }
}

/// Connects to `target`, shakes hands, and reports. Never fails: every failure is a
/// [`Reason`] in the report.
pub async fn inspect(target: &Target, opts: &InspectOptions) -> InspectReport {
    let mut report = InspectReport::new(target, opts);
    let deadline = Instant::now() + opts.timeout;
    let timeout = humanize(opts.timeout);

    let addrs: Vec<_> = match tokio::time::timeout_at(
        deadline,
        tokio::net::lookup_host((target.host.as_str(), target.port)),
    )
    .await
    {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(e)) => {
            report.fail(Reason::ResolveFailed, None, format!("{}: {e}", target.host));
            return report;
        }
        Err(_) => {
            report.fail(
                Reason::Timeout,
                None,
                format!("resolving {} took longer than {timeout}", target.host),
            );
            return report;
        }
    };

    // TCP: the first address that accepts; if none does, the last one's error.
    let mut tcp = None;
    let mut failure = (
        Reason::ResolveFailed,
        format!("{} has no addresses", target.host),
    );
    for addr in &addrs {
        let started = Instant::now();
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                report.tcp_connect_ms = Some(millis(started.elapsed()));
                report.address = Some(addr.to_string());
                tcp = Some(stream);
                break;
            }
            Ok(Err(e)) => {
                let reason = if e.kind() == io::ErrorKind::ConnectionRefused {
                    Reason::ConnectRefused
                } else {
                    Reason::ConnectFailed
                };
                failure = (reason, format!("connect to {addr}: {e}"));
            }
            Err(_) => {
                failure = (
                    Reason::Timeout,
                    format!("TCP connect to {addr} did not finish within {timeout}"),
                );
                break;
            }
        }
    }
    let Some(tcp) = tcp else {
        report.fail(failure.0, None, failure.1);
        return report;
    };
    let _ = tcp.set_nodelay(true);

    handshake(tcp, target, opts, deadline, &mut report).await;
    report
}

async fn handshake(
    tcp: TcpStream,
    target: &Target,
    opts: &InspectOptions,
    deadline: Instant,
    report: &mut InspectReport,
) {
    let recorder = Arc::new(Recorder::new(opts));
    let resolver = Arc::new(RecordingResolver {
        key: opts.client.as_ref().map(|c| c.key.clone()),
        requested: Mutex::new(false),
    });
    let config = match client_config(opts, recorder.clone(), resolver.clone()) {
        Ok(config) => config,
        Err(e) => {
            report.fail(Reason::Other, None, format!("TLS configuration: {e}"));
            return;
        }
    };
    let server_name = match target.server_name() {
        Ok(name) => name,
        Err(e) => {
            report.fail(Reason::Other, None, e.to_string());
            return;
        }
    };
    let first_bytes = Arc::new(Mutex::new(Vec::new()));
    let stream = Peek {
        inner: tcp,
        first: first_bytes.clone(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let started = Instant::now();
    let result = tokio::time::timeout_at(deadline, connector.connect(server_name, stream)).await;
    let elapsed = started.elapsed();

    // Whatever happened, report what the verifier saw and what the server asked for.
    let verdict = recorder.take();
    report.client_cert.requested = *lock(&resolver.requested);
    if let Some(verdict) = &verdict {
        report.peer_chain = verdict.chain.iter().filter_map(CertInfo::of).collect();
        report.peer_spiffe_id = report
            .peer_chain
            .first()
            .and_then(|leaf| leaf.spiffe_ids.first().cloned());
        if let Some((td, source)) = &verdict.trust_domain {
            report.trust_domain = Some(td.to_string());
            report.trust_domain_source = Some(*source);
        }
        match &verdict.result {
            Ok(_) => report.verified = true,
            // Our refusal comes first: a real client would have stopped at this certificate.
            Err(err) => {
                let not_before = report.peer_chain.first().map(|leaf| leaf.not_before_unix);
                let (reason, detail) = match svid_error_of(err) {
                    Some(svid) => (
                        reason_for_svid_error(svid, not_before, now_unix()),
                        svid.to_string(),
                    ),
                    None => (Reason::Other, err.to_string()),
                };
                report.fail(reason, Some(Side::Client), detail);
            }
        }
    }
    let first = lock(&first_bytes).clone();

    let mut tls = match result {
        Err(_) => {
            let detail = if first.is_empty() {
                format!(
                    "the peer accepted TCP but did not answer the ClientHello within {}",
                    humanize(opts.timeout)
                )
            } else {
                format!(
                    "the TLS handshake did not finish within {}",
                    humanize(opts.timeout)
                )
            };
            report.fail(Reason::Timeout, None, detail);
            return;
        }
        Ok(Err(e)) => {
            report.handshake_ms = Some(millis(elapsed));
            let failure = classify_io_error(&e, &first);
            if let Some(alert) = failure.alert {
                report.alert = Some(alert_name(alert));
                // TLS 1.2 servers refuse a client certificate inside the handshake.
                if failure.reason.is_about_client_cert() {
                    report.client_cert.accepted = Some(false);
                }
            }
            report.fail(failure.reason, failure.side, failure.detail);
            return;
        }
        Ok(Ok(tls)) => tls,
    };
    report.handshake_ms = Some(millis(elapsed));
    let (_, conn) = tls.get_ref();
    let version = conn.protocol_version();
    report.tls_version = version.map(version_name);
    report.cipher_suite = conn.negotiated_cipher_suite().map(|s| {
        let suite = s.suite();
        suite
            .as_str()
            .map_or_else(|| format!("{suite:?}"), str::to_owned)
    });
    report.alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());

    // TLS 1.2 servers judge our certificate inside the handshake; TLS 1.3 servers only after
    // our Finished, so their verdict is the first thing we read. Only the read: we never send
    // application data, least of all to a peer that failed verification.
    if version == Some(ProtocolVersion::TLSv1_3) && report.client_cert.requested {
        let settle = opts.settle.min(opts.timeout);
        let mut buf = [0u8; 512];
        match tokio::time::timeout(settle, tls.read(&mut buf)).await {
            // Silence, or the server speaking first (an h2 SETTINGS frame): it took us.
            Err(_) | Ok(Ok(1..)) => report.client_cert.accepted = Some(true),
            Ok(Ok(0)) => {
                report.client_cert.accepted = Some(false);
                report.fail(
                    Reason::ConnectionClosed,
                    Some(Side::Server),
                    "the server closed the connection right after the handshake".to_owned(),
                );
            }
            Ok(Err(e)) => {
                report.client_cert.accepted = Some(false);
                let failure = classify_io_error(&e, &first);
                if let Some(alert) = failure.alert {
                    report.alert = Some(alert_name(alert));
                }
                report.fail(failure.reason, failure.side, failure.detail);
            }
        }
    } else {
        report.client_cert.accepted = Some(true);
    }
    report.ok = report.verified && report.reason.is_none();
    // close_notify, best effort: the peer's logs then show a clean close, not a reset.
    let _ = tokio::time::timeout(Duration::from_millis(200), tls.shutdown()).await;
}

fn client_config(
    opts: &InspectOptions,
    recorder: Arc<Recorder>,
    resolver: Arc<RecordingResolver>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    static TLS13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    static TLS12_PLUS: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    let versions: &[&rustls::SupportedProtocolVersion] =
        if opts.tls12 { &TLS12_PLUS } else { &TLS13 };
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(recorder)
        .with_client_cert_resolver(resolver);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    config.enable_early_data = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// What the recording verifier saw.
#[derive(Debug)]
struct Verdict {
    chain: Vec<CertificateDer<'static>>,
    trust_domain: Option<(TrustDomain, TrustDomainSource)>,
    /// The real [`SpiffeServerVerifier`]'s verdict, with its [`SvidError`] inside.
    result: Result<(), rustls::Error>,
}

/// A [`ServerCertVerifier`] that runs the real [`SpiffeServerVerifier`], records its verdict
/// and the chain, and lets the handshake continue either way. Signatures are still checked for
/// real: a peer that cannot prove it holds the key fails the handshake.
#[derive(Debug)]
struct Recorder {
    roots: Vec<CertificateDer<'static>>,
    trust_domain: Option<(TrustDomain, TrustDomainSource)>,
    expected: Option<SpiffeId>,
    provider: Arc<CryptoProvider>,
    verdict: Mutex<Option<Verdict>>,
}

impl Recorder {
    fn new(opts: &InspectOptions) -> Self {
        Recorder {
            roots: opts.roots.clone(),
            trust_domain: opts.known_trust_domain(),
            expected: opts.expected.clone(),
            provider: crate::tls::provider(),
            verdict: Mutex::new(None),
        }
    }

    fn take(&self) -> Option<Verdict> {
        lock(&self.verdict).take()
    }

    fn judge(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> (
        Option<(TrustDomain, TrustDomainSource)>,
        Result<(), rustls::Error>,
    ) {
        // Without a trust domain from the flags or the bundle, take the peer's own: then the
        // check says "chains to the bundle, is an SVID", not "belongs where it should".
        let trust_domain = self.trust_domain.clone().or_else(|| {
            let leaf_id = crate::cert_facts(end_entity).ok()?.leaf_spiffe_id().ok()?;
            let td = TrustDomain::parse(leaf_id.trust_domain_name()).ok()?;
            Some((td, TrustDomainSource::Peer))
        });
        let td = trust_domain
            .as_ref()
            .map_or_else(placeholder_trust_domain, |(td, _)| td.clone());
        let bundle = match TrustBundle::new(td, self.roots.clone()) {
            Ok(bundle) => bundle,
            // Checked in InspectOptions::new; kept as a failure rather than a panic.
            Err(e) => return (trust_domain, Err(rustls::Error::General(e.to_string()))),
        };
        let expected = match &self.expected {
            Some(id) => PeerMatch::Exact(id.clone()),
            None => PeerMatch::AnyInTrustDomain,
        };
        let verifier = SpiffeServerVerifier::new(Arc::new(ArcSwap::from_pointee(bundle)), expected);
        let result = verifier
            .verify_server_cert(end_entity, intermediates, server_name, &[], now)
            .map(|_| ());
        (trust_domain, result)
    }
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (trust_domain, result) = self.judge(end_entity, intermediates, server_name, now);
        let mut chain = vec![end_entity.clone().into_owned()];
        chain.extend(intermediates.iter().map(|c| c.clone().into_owned()));
        *lock(&self.verdict) = Some(Verdict {
            chain,
            trust_domain,
            result,
        });
        // Diagnostic only: the verdict is reported, and nothing but the handshake is sent.
        Ok(ServerCertVerified::assertion())
    }

    crate::tls::delegate_signature_checks!(provider);
}

/// Presents our certificate (if any) and remembers whether the server asked for one: rustls
/// calls `resolve` only on a CertificateRequest.
#[derive(Debug)]
struct RecordingResolver {
    key: Option<Arc<CertifiedKey>>,
    requested: Mutex<bool>,
}

impl ResolvesClientCert for RecordingResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        *lock(&self.requested) = true;
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// The TCP stream, keeping the first bytes the peer sent: they tell TLS from not-TLS after
/// rustls has given up on them.
struct Peek {
    inner: TcpStream,
    first: Arc<Mutex<Vec<u8>>>,
}

/// A TLS record header is 5 bytes: content type, version (2), length (2).
const RECORD_HEADER: usize = 5;

impl AsyncRead for Peek {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let mut first = lock(&self.first);
            let want = RECORD_HEADER.saturating_sub(first.len());
            let new = &buf.filled()[before..];
            first.extend_from_slice(&new[..want.min(new.len())]);
        }
        polled
    }
}

impl AsyncWrite for Peek {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// True if `first` could start a TLS record from a server: handshake (22) or alert (21), with
/// a 3.x record version. Fewer than 3 bytes are given the benefit of the doubt.
fn looks_like_tls(first: &[u8]) -> bool {
    match first {
        [] => true,
        [kind] => matches!(kind, 21 | 22),
        [kind, major, ..] => matches!(kind, 21 | 22) && *major == 3,
    }
}

/// A failed handshake or read, classified.
#[derive(Debug, PartialEq, Eq)]
struct Failure {
    reason: Reason,
    side: Option<Side>,
    alert: Option<AlertDescription>,
    detail: String,
}

/// Classifies an error from the handshake or the first read; `first` is what the peer sent first.
fn classify_io_error(err: &io::Error, first: &[u8]) -> Failure {
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
fn classify_tls_error(err: &rustls::Error, first: &[u8]) -> Failure {
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
fn reason_for_alert(alert: AlertDescription) -> Reason {
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
fn reason_for_svid_error(err: &SvidError, leaf_not_before: Option<i64>, now: i64) -> Reason {
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

fn version_name(version: ProtocolVersion) -> String {
    match version {
        ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
        ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
        other => format!("{other:?}"),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn millis(d: Duration) -> f64 {
    // Two decimals are plenty and keep the JSON readable.
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

fn humanize(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn now_unix() -> i64 {
    crate::cert::unix_secs(SystemTime::now())
}

/// `unix` seconds as RFC 3339 UTC (`2026-01-31T12:00:00Z`). Hand-rolled because a peer's
/// certificate may carry any date from year 0 to 9999, which must print, never panic.
pub fn rfc3339(unix: i64) -> String {
    // X.509 times span years 0000..=9999.
    let unix = unix.clamp(-62_167_219_200, 253_402_300_799);
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testca::{LeafSpec, TestCa};
    use crate::tls::SpiffeClientVerifier;

    const HOUR: Duration = Duration::from_secs(3600);
    const SERVER: &str = "spiffe://example.org/server";

    #[test]
    fn client_identity_from_a_loaded_svid() {
        let ca = TestCa::root("example.org");
        let svid = ca.svid("/web");
        let identity = ClientIdentity::from_svid(&svid).unwrap();
        assert_eq!(identity.name(), "spiffe://example.org/web");
        let borrowed = ClientIdentity::from_certified_key(identity.key.clone()).unwrap();
        assert_eq!(borrowed.name(), "spiffe://example.org/web");
        assert!(Arc::ptr_eq(&borrowed.key, &identity.key));
        assert!(!format!("{borrowed:?}").contains("PRIVATE"));
    }

    #[test]
    fn parses_targets() {
        let t = Target::parse("127.0.0.1:15443").unwrap();
        assert_eq!((t.host(), t.port()), ("127.0.0.1", 15443));
        let t = Target::parse("service-b.prod.svc:443").unwrap();
        assert_eq!((t.host(), t.port()), ("service-b.prod.svc", 443));
        let t = Target::parse("[::1]:8443").unwrap();
        assert_eq!((t.host(), t.port()), ("::1", 8443));
        assert_eq!(t.to_string(), "[::1]:8443");
        for bad in [
            "127.0.0.1",
            ":443",
            "host:",
            "host:0",
            "host:99999",
            "::1:443",
            "[::1]",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

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

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(i64::MIN), "0000-01-01T00:00:00Z");
    }

    #[test]
    fn trust_domain_comes_from_the_bundle() {
        let ca = TestCa::root("example.org");
        let opts = InspectOptions::new(vec![ca.cert().clone()]).unwrap();
        assert_eq!(
            opts.known_trust_domain(),
            Some((
                TrustDomain::parse("example.org").unwrap(),
                TrustDomainSource::Bundle
            ))
        );
        let other = TestCa::root("other.org");
        let err = InspectOptions::new(vec![ca.cert().clone(), other.cert().clone()]).unwrap_err();
        assert!(matches!(err, InspectError::MixedTrustDomains(_)), "{err}");
        assert!(InspectOptions::new(vec![]).is_err());
        // A leaf is not a CA.
        let leaf = ca.svid("/web").chain()[0].clone();
        let err = InspectOptions::new(vec![leaf]).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn client_identity_needs_a_matching_key() {
        let ca = TestCa::root("example.org");
        let a = ca.svid("/a");
        let b = ca.svid("/b");
        let ok = ClientIdentity::new(a.chain().to_vec(), a.key().clone_key()).unwrap();
        assert_eq!(ok.name(), "spiffe://example.org/a");
        let err = ClientIdentity::new(a.chain().to_vec(), b.key().clone_key()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    /// A TLS 1.3 server on loopback presenting `server` (whatever it is: expired, rogue) and
    /// requiring a client certificate under `client_ca`, as a sidecar's inbound does. It holds
    /// each connection open after the handshake.
    async fn serve(
        server: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
        client_ca: &TestCa,
    ) -> std::net::SocketAddr {
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(SpiffeClientVerifier::new(client_ca.shared_bundle(), false))
            .with_single_cert(server.0, server.1)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let mut buf = [0u8; 16];
                        let _ = tokio::time::timeout(HOUR, tls.read(&mut buf)).await;
                    }
                });
            }
        });
        addr
    }

    fn leaf(
        ca: &TestCa,
        spec: &LeafSpec,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        ca.issue(spec)
    }

    fn target(addr: std::net::SocketAddr) -> Target {
        Target::parse(&addr.to_string()).unwrap()
    }

    fn identity(svid: &crate::Svid) -> ClientIdentity {
        ClientIdentity::new(svid.chain().to_vec(), svid.key().clone_key()).unwrap()
    }

    #[tokio::test]
    async fn verifies_a_trellis_server() {
        let ca = TestCa::root("example.org");
        let addr = serve(leaf(&ca, &LeafSpec::new(SERVER)), &ca).await;
        let opts = InspectOptions::new(vec![ca.cert().clone()])
            .unwrap()
            .client(identity(&ca.svid("/client")))
            .expect(SpiffeId::parse("spiffe://example.org/server").unwrap())
            .settle(Duration::from_millis(300));
        let report = inspect(&target(addr), &opts).await;
        assert!(report.ok, "{report:#?}");
        assert!(report.verified);
        assert_eq!(report.tls_version.as_deref(), Some("TLSv1.3"));
        assert_eq!(report.alpn.as_deref(), Some("h2"));
        assert_eq!(
            report.peer_spiffe_id.as_deref(),
            Some("spiffe://example.org/server")
        );
        assert_eq!(report.peer_chain.len(), 1);
        assert!(report.client_cert.requested);
        assert_eq!(report.client_cert.accepted, Some(true));
        assert_eq!(report.trust_domain_source, Some(TrustDomainSource::Bundle));
    }

    #[tokio::test]
    async fn server_refuses_a_missing_client_certificate() {
        let ca = TestCa::root("example.org");
        let addr = serve(leaf(&ca, &LeafSpec::new(SERVER)), &ca).await;
        let opts = InspectOptions::new(vec![ca.cert().clone()]).unwrap();
        let report = inspect(&target(addr), &opts).await;
        assert!(!report.ok);
        assert!(report.verified, "the server itself is fine: {report:#?}");
        assert_eq!(report.reason, Some(Reason::NoCert), "{report:#?}");
        assert_eq!(report.refused_by, Some(Side::Server));
        assert_eq!(report.alert.as_deref(), Some("certificate_required"));
        assert_eq!(report.client_cert.accepted, Some(false));
    }

    #[tokio::test]
    async fn client_refuses_a_server_from_another_ca_and_still_learns_our_fate() {
        let ours = TestCa::root("example.org");
        let rogue = TestCa::root("example.org");
        // The rogue server trusts our CA, so it accepts our certificate.
        let addr = serve(leaf(&rogue, &LeafSpec::new(SERVER)), &ours).await;
        let opts = InspectOptions::new(vec![ours.cert().clone()])
            .unwrap()
            .client(identity(&ours.svid("/client")))
            .settle(Duration::from_millis(300));
        let report = inspect(&target(addr), &opts).await;
        assert!(!report.ok && !report.verified);
        assert_eq!(report.reason, Some(Reason::UnknownCa), "{report:#?}");
        assert_eq!(report.refused_by, Some(Side::Client));
        assert_eq!(report.peer_chain.len(), 1, "the chain is reported anyway");
        assert_eq!(report.client_cert.accepted, Some(true));
    }

    #[tokio::test]
    async fn client_refuses_an_expired_server_certificate() {
        let ca = TestCa::root("example.org");
        let mut spec = LeafSpec::new(SERVER);
        spec.not_before = SystemTime::now() - 3 * HOUR;
        spec.not_after = SystemTime::now() - HOUR;
        let addr = serve(leaf(&ca, &spec), &ca).await;
        let opts = InspectOptions::new(vec![ca.cert().clone()]).unwrap();
        let report = inspect(&target(addr), &opts).await;
        assert_eq!(report.reason, Some(Reason::Expired), "{report:#?}");
        assert_eq!(report.refused_by, Some(Side::Client));
        assert!(report
            .detail
            .as_deref()
            .unwrap_or_default()
            .contains("expired"));
    }

    #[tokio::test]
    async fn client_refuses_a_server_certificate_not_valid_yet() {
        let ca = TestCa::root("example.org");
        let mut spec = LeafSpec::new(SERVER);
        spec.not_before = SystemTime::now() + HOUR;
        spec.not_after = SystemTime::now() + 3 * HOUR;
        let addr = serve(leaf(&ca, &spec), &ca).await;
        let opts = InspectOptions::new(vec![ca.cert().clone()]).unwrap();
        let report = inspect(&target(addr), &opts).await;
        assert_eq!(report.reason, Some(Reason::NotYetValid), "{report:#?}");
    }

    #[tokio::test]
    async fn trust_domain_falls_back_to_the_peers() {
        // A bundle whose CA names no trust domain.
        let ca = TestCa::root("example.org");
        let addr = serve(leaf(&ca, &LeafSpec::new(SERVER)), &ca).await;
        let mut opts = InspectOptions::new(vec![ca.cert().clone()]).unwrap();
        opts.trust_domain = None;
        let report = inspect(&target(addr), &opts).await;
        assert!(report.verified, "{report:#?}");
        assert_eq!(report.trust_domain.as_deref(), Some("example.org"));
        assert_eq!(report.trust_domain_source, Some(TrustDomainSource::Peer));
    }

    #[tokio::test]
    async fn nothing_listening_is_connect_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let ca = TestCa::root("example.org");
        let opts = InspectOptions::new(vec![ca.cert().clone()]).unwrap();
        let report = inspect(&target(addr), &opts).await;
        assert_eq!(report.reason, Some(Reason::ConnectRefused), "{report:#?}");
        assert_eq!(report.refused_by, None);
    }
}
