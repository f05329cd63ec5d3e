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

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ProtocolVersion, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use trellis_identity::tls::{svid_error_of, PeerMatch, SpiffeServerVerifier};
use trellis_identity::{unix_secs, SpiffeId, TrustBundle, TrustDomain};

use super::classify::{alert_name, classify_io_error, reason_for_svid_error, version_name};
use super::options::{placeholder_trust_domain, InspectOptions, Target, TrustDomainSource};
use super::report::{CertInfo, InspectReport, Reason, Side};

/// ALPN protocols offered, as a Trellis sidecar offers them.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

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
    report.key_exchange = conn
        .negotiated_key_exchange_group()
        .map(|g| trellis_identity::tls::group_label(Some(g.name())).to_owned());
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
    let mut config = rustls::ClientConfig::builder_with_provider(trellis_identity::tls::provider())
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
            provider: trellis_identity::tls::provider(),
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
            let leaf_id = trellis_identity::cert_facts(end_entity)
                .ok()?
                .leaf_spiffe_id()
                .ok()?;
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

    trellis_identity::delegate_signature_checks!(provider);
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
    unix_secs(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::PrivateKeyDer;
    use trellis_identity::testca::{LeafSpec, TestCa};
    use trellis_identity::tls::SpiffeClientVerifier;
    use trellis_identity::Svid;

    use super::*;
    use crate::inspect::options::ClientIdentity;

    const HOUR: Duration = Duration::from_secs(3600);
    const SERVER: &str = "spiffe://example.org/server";
    /// A TLS 1.3 server on loopback presenting `server` (whatever it is: expired, rogue) and
    /// requiring a client certificate under `client_ca`, as a sidecar's inbound does. It holds
    /// each connection open after the handshake.
    async fn serve(
        server: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
        client_ca: &TestCa,
    ) -> std::net::SocketAddr {
        let mut config =
            rustls::ServerConfig::builder_with_provider(trellis_identity::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_client_cert_verifier(SpiffeClientVerifier::new(
                    client_ca.shared_bundle(),
                    false,
                ))
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

    fn identity(svid: &Svid) -> ClientIdentity {
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
        // Both ends on Trellis' provider: the post-quantum hybrid wins.
        assert_eq!(report.key_exchange.as_deref(), Some("X25519MLKEM768"));
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
