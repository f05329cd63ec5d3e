//! rustls glue: SPIFFE verifiers for both sides of a handshake and a hot-swappable resolver.
//!
//! Verifiers check the chain against the *current* bundle (an `ArcSwap`, read once per
//! handshake) and the peer's SPIFFE ID inside the handshake, so a wrong peer never gets
//! as far as HTTP.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CertificateError, CipherSuite, DistinguishedName, NamedGroup,
    PeerIncompatible, SignatureScheme, SupportedCipherSuite, SupportedProtocolVersion,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use self::verified::VerifiedChains;
use crate::{SpiffeId, Svid, SvidError, TrustBundle, Usage};

/// The bundle shared between the updater and every handshake.
pub type SharedBundle = Arc<ArcSwap<TrustBundle>>;

/// The crypto provider Trellis uses everywhere: aws-lc-rs, with the key-exchange groups the
/// process installed by [`install_key_exchange`] (the binary does, from `tls_key_exchange`),
/// or those of [`KeyExchange::PqPreferred`] if none was installed (libraries, tests).
pub fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(provider_for(KeyExchange::default())))
}

/// The aws-lc-rs provider offering exactly the key-exchange groups of `kx`, in its order, with
/// its TLS 1.3 suites on an HKDF that extracts each secret once (same bytes on the wire, a
/// quarter of the key schedule's hashing: see `hkdf.rs`).
pub fn provider_for(kx: KeyExchange) -> CryptoProvider {
    let stock = rustls::crypto::aws_lc_rs::default_provider();
    CryptoProvider {
        kx_groups: kx.groups().to_vec(),
        cipher_suites: stock
            .cipher_suites
            .iter()
            .map(|suite| hkdf::with_extract_once_hkdf(*suite))
            .collect(),
        ..stock
    }
}

/// Makes `kx` the key-exchange setting of every TLS endpoint of this process (Trellis' own and
/// any library that builds its rustls config from the process default, such as the PostgreSQL
/// client). Called once, by the binary, before any config is built; calling it again with the
/// same setting is a no-op, with another one an error (the first one is in force).
pub fn install_key_exchange(kx: KeyExchange) -> Result<(), KeyExchangeConflict> {
    if provider_for(kx).install_default().is_ok() {
        return Ok(());
    }
    let installed = provider();
    let same = installed.kx_groups.len() == kx.groups().len()
        && installed
            .kx_groups
            .iter()
            .zip(kx.groups())
            .all(|(a, b)| a.name() == b.name());
    if same {
        Ok(())
    } else {
        Err(KeyExchangeConflict { wanted: kx })
    }
}

/// [`install_key_exchange`] was called twice with different settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tls_key_exchange {}: another key-exchange setting is already in force in this process", .wanted.as_str())]
pub struct KeyExchangeConflict {
    /// The setting that could not be installed.
    pub wanted: KeyExchange,
}

/// Which TLS key-exchange groups every Trellis endpoint offers and accepts, like a load
/// balancer's TLS policy (`tls_key_exchange` in both binaries' config).
///
/// X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem) is hybrid: the session key stays secret unless
/// *both* X25519 and ML-KEM-768 are broken, so recorded traffic cannot be decrypted later by a
/// quantum computer ("harvest now, decrypt later"), and it is no weaker than X25519 today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyExchange {
    /// X25519MLKEM768 first; X25519 and P-256 for peers without it (default).
    #[default]
    PqPreferred,
    /// X25519MLKEM768 only: a peer that cannot do it fails the handshake
    /// (reason `no_shared_group`).
    PqOnly,
    /// X25519 and P-256 only, no post-quantum group (for peers that mishandle the larger
    /// ClientHello; not needed for interoperability otherwise).
    Classical,
}

impl KeyExchange {
    /// Every setting, as spelled in config, flags and env.
    pub const ALL: [KeyExchange; 3] = [
        KeyExchange::PqPreferred,
        KeyExchange::PqOnly,
        KeyExchange::Classical,
    ];

    /// The allowed spellings, for error messages: `pq-preferred, pq-only, classical`.
    pub const ALLOWED: &'static str = "pq-preferred, pq-only, classical";

    /// The config spelling: `pq-preferred`, `pq-only` or `classical`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyExchange::PqPreferred => "pq-preferred",
            KeyExchange::PqOnly => "pq-only",
            KeyExchange::Classical => "classical",
        }
    }

    /// The groups offered (client) and accepted (server), most preferred first.
    pub fn groups(self) -> &'static [&'static dyn SupportedKxGroup] {
        use rustls::crypto::aws_lc_rs::kx_group::{SECP256R1, X25519, X25519MLKEM768};
        static PQ_PREFERRED: [&dyn SupportedKxGroup; 3] = [X25519MLKEM768, X25519, SECP256R1];
        static PQ_ONLY: [&dyn SupportedKxGroup; 1] = [X25519MLKEM768];
        static CLASSICAL: [&dyn SupportedKxGroup; 2] = [X25519, SECP256R1];
        match self {
            KeyExchange::PqPreferred => &PQ_PREFERRED,
            KeyExchange::PqOnly => &PQ_ONLY,
            KeyExchange::Classical => &CLASSICAL,
        }
    }
}

impl std::fmt::Display for KeyExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `tls_key_exchange` value that is none of [`KeyExchange::ALLOWED`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown tls_key_exchange `{0}` (expected one of: pq-preferred, pq-only, classical)")]
pub struct UnknownKeyExchange(pub String);

impl std::str::FromStr for KeyExchange {
    type Err = UnknownKeyExchange;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyExchange::ALL
            .into_iter()
            .find(|kx| kx.as_str() == s)
            .ok_or_else(|| UnknownKeyExchange(s.to_owned()))
    }
}

/// Every `group` label value [`group_label`] returns: the groups Trellis offers, and `other`.
pub const GROUP_LABELS: [&str; 5] = ["X25519MLKEM768", "X25519", "P-256", "P-384", "other"];

/// The negotiated key-exchange group as a stable label and display name: `X25519MLKEM768`,
/// `X25519`, `P-256`, `P-384`, or `other` (none, such as a TLS 1.2 resumption, or unknown).
pub fn group_label(group: Option<NamedGroup>) -> &'static str {
    match group {
        Some(NamedGroup::X25519MLKEM768) => "X25519MLKEM768",
        Some(NamedGroup::X25519) => "X25519",
        Some(NamedGroup::secp256r1) => "P-256",
        Some(NamedGroup::secp384r1) => "P-384",
        _ => "other",
    }
}

/// [`group_label`] of the group `conn` negotiated.
pub fn negotiated_group(conn: &rustls::CommonState) -> &'static str {
    group_label(conn.negotiated_key_exchange_group().map(|g| g.name()))
}

/// Writes, inside an `impl ServerCertVerifier` or `impl ClientCertVerifier` block, the three
/// handshake-signature methods: rustls' own checks with the algorithms of the verifier's
/// `Arc<CryptoProvider>` field named `$provider`. Trellis verifiers differ only in how they
/// judge the certificate; the proof that the peer holds its key is checked the same way by all
/// of them, so it is written once here (and exported for the diagnostic verifier of
/// `trellis_sidecar::inspect`). Use: `delegate_signature_checks!(provider);`; the calling crate
/// needs `rustls` as a dependency.
#[macro_export]
macro_rules! delegate_signature_checks {
    ($provider:ident) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            ::rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.$provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            ::rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.$provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<::rustls::SignatureScheme> {
            self.$provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// TLS versions a listener or client accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsPolicy {
    /// TLS 1.3 only (default).
    #[default]
    Tls13,
    /// TLS 1.2 (ECDHE-ECDSA AEAD suites) and 1.3.
    Tls12Plus,
}

/// Which peer identity a verifier accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMatch {
    /// Exactly this SPIFFE ID.
    Exact(SpiffeId),
    /// Any SPIFFE ID in the bundle's trust domain.
    AnyInTrustDomain,
}

/// Client-side verifier: chain to the bundle, serverAuth, and the expected SPIFFE ID.
/// Ignores the DNS server name (SPIFFE identities live in the URI SAN).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: SharedBundle,
    expected: PeerMatch,
    provider: Arc<CryptoProvider>,
    verified: VerifiedChains,
}

impl SpiffeServerVerifier {
    /// A verifier that accepts servers matching `expected` under the current `bundle`.
    pub fn new(bundle: SharedBundle, expected: PeerMatch) -> Arc<Self> {
        Arc::new(Self {
            bundle,
            expected,
            provider: provider(),
            verified: VerifiedChains::default(),
        })
    }
}

/// Server-side verifier: client chain to the bundle, clientAuth, SPIFFE ID in the trust domain.
/// With `optional`, a client may present no certificate (the SDS server lets token holders in).
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: SharedBundle,
    optional: bool,
    provider: Arc<CryptoProvider>,
    verified: VerifiedChains,
}

impl SpiffeClientVerifier {
    /// A verifier for client certificates under the current `bundle`.
    pub fn new(bundle: SharedBundle, optional: bool) -> Arc<Self> {
        Arc::new(Self {
            bundle,
            optional,
            provider: provider(),
            verified: VerifiedChains::default(),
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = self
            .verified
            .verify(
                end_entity,
                intermediates,
                &self.bundle,
                Usage::Server,
                system_time(now),
            )
            .map_err(to_rustls)?;
        if let PeerMatch::Exact(expected) = &self.expected {
            if *expected != presented {
                return Err(to_rustls(SvidError::WrongIdentity {
                    expected: expected.to_string(),
                    presented: presented.to_string(),
                }));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    delegate_signature_checks!(provider);
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client has one SVID and should always send it.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verified
            .verify(
                end_entity,
                intermediates,
                &self.bundle,
                Usage::Client,
                system_time(now),
            )
            .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    delegate_signature_checks!(provider);
}

fn system_time(now: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(now.as_secs())
}

/// Wraps `err` so it survives the trip through rustls: [`svid_error_of`] gets it back.
/// rustls answers the peer with a `certificate_unknown` alert.
fn to_rustls(err: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(err))))
}

/// The [`SvidError`] a Trellis verifier rejected the peer with, if that is what `err` is.
pub fn svid_error_of(err: &rustls::Error) -> Option<&SvidError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(inner))) => {
            inner.downcast_ref::<SvidError>()
        }
        _ => None,
    }
}

/// Why a handshake failed, as a stable metric label: `no_cert`, `unknown_ca`, `expired`,
/// `wrong_identity`, `protocol_version`, `no_shared_group`, `not_svid`, `bad_key` or `other`.
///
/// `no_shared_group`: the peer offered no key-exchange group this side accepts, typically a
/// classical-only client against `tls_key_exchange: pq-only`.
///
/// Works on both sides: on the side that rejected, from the [`SvidError`] inside `err`; on the
/// rejected side, from the alert the peer sent (`certificate_required`, `unknown_ca`,
/// `certificate_expired`, `protocol_version`; Trellis' own verifiers send
/// `certificate_unknown`, which reads as `other`).
pub fn handshake_failure_reason(err: &rustls::Error) -> &'static str {
    if let Some(svid_err) = svid_error_of(err) {
        return match svid_err {
            SvidError::EmptyChain => "no_cert",
            SvidError::Malformed(_)
            | SvidError::UriSanCount(_)
            | SvidError::BadId(_)
            | SvidError::LeafIsCa
            | SvidError::LeafCanSign
            | SvidError::MissingKeyUsage { .. } => "not_svid",
            SvidError::NotValidNow { .. } => "expired",
            SvidError::UnknownIssuer { .. } => "unknown_ca",
            SvidError::WrongIdentity { .. } => "wrong_identity",
            SvidError::KeyMismatch | SvidError::BadKey(_) => "bad_key",
            SvidError::BadBundle(_) => "other",
        };
    }
    match err {
        rustls::Error::NoCertificatesPresented => "no_cert",
        // rustls' own verifiers, should another crate use them.
        rustls::Error::InvalidCertificate(cert_err) => match cert_err {
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => "expired",
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "wrong_identity"
            }
            CertificateError::BadEncoding => "not_svid",
            _ => "other",
        },
        rustls::Error::PeerIncompatible(
            PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::ServerDoesNotSupportTls12Or13
            | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig,
        ) => "protocol_version",
        rustls::Error::PeerIncompatible(PeerIncompatible::NoKxGroupsInCommon) => "no_shared_group",
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => "no_cert",
            AlertDescription::UnknownCA => "unknown_ca",
            AlertDescription::CertificateExpired => "expired",
            AlertDescription::ProtocolVersion => "protocol_version",
            _ => "other",
        },
        _ => "other",
    }
}

/// What is installed: the rustls key, its expiry, and, for the admin endpoint, the SVID's
/// serial.
#[derive(Debug)]
struct Installed {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
    serial_hex: String,
}

impl Installed {
    /// RFC 5280 4.1.2.5: "the validity period for a certificate is the period of time from
    /// notBefore through notAfter, inclusive". Past notAfter no peer may accept it, so it is
    /// not offered.
    fn valid_at(&self, now: SystemTime) -> bool {
        now <= self.not_after
    }
}

/// Serves the current SVID for both client and server handshakes; swapped atomically.
///
/// Once the installed SVID's notAfter has passed it presents nothing: a server handshake
/// fails and a client handshake goes out without a certificate, rather than offering a
/// certificate every peer must refuse. Installing a fresh SVID brings it back.
#[derive(Debug)]
pub struct SvidResolver {
    current: ArcSwapOption<Installed>,
}

impl SvidResolver {
    /// A resolver with no SVID yet (handshakes fail until [`SvidResolver::install`]).
    pub fn empty() -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwapOption::empty(),
        })
    }

    /// Builds the rustls signing key from `svid` and swaps it in. New handshakes use it;
    /// established connections keep theirs.
    pub fn install(&self, svid: &Svid) -> Result<(), SvidError> {
        let signing_key = provider()
            .key_provider
            .load_private_key(svid.key().clone_key())
            .map_err(|e| SvidError::BadKey(e.to_string()))?;
        let key = Arc::new(CertifiedKey::new(svid.chain().to_vec(), signing_key));
        self.current.store(Some(Arc::new(Installed {
            key,
            not_after: svid.not_after(),
            serial_hex: svid.serial_hex().to_owned(),
        })));
        Ok(())
    }

    /// True while an SVID is installed and has not expired.
    pub fn is_ready(&self) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|installed| installed.valid_at(SystemTime::now()))
    }

    /// The serial (lowercase hex) of the installed SVID, if any, expired or not.
    pub fn current_serial(&self) -> Option<String> {
        self.current
            .load()
            .as_ref()
            .map(|installed| installed.serial_hex.clone())
    }

    /// The key new handshakes present at `now`: none before the first SVID, none once it
    /// expired. One clock read per handshake.
    fn key_at(&self, now: SystemTime) -> Option<Arc<CertifiedKey>> {
        self.current
            .load()
            .as_ref()
            .filter(|installed| installed.valid_at(now))
            .map(|installed| installed.key.clone())
    }
}

impl rustls::server::ResolvesServerCert for SvidResolver {
    fn resolve(&self, _client_hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key_at(SystemTime::now())
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.key_at(SystemTime::now())
    }

    fn has_certs(&self) -> bool {
        self.is_ready()
    }
}

/// A server config presenting `resolver`'s SVID and verifying clients with `verifier`.
/// ALPN protocols in preference order (Trellis sidecars: `h2`, then `http/1.1`); no 0-RTT,
/// and no session resumption by default: a caller that turns tickets on (the sidecar's
/// `mtls` module does) must re-verify every resumed session itself.
pub fn server_config(
    resolver: Arc<SvidResolver>,
    verifier: Arc<SpiffeClientVerifier>,
    policy: TlsPolicy,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(policy_provider(policy))
        .with_protocol_versions(policy.versions())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // 0-RTT data can be replayed and arrives before the client is authenticated.
    config.max_early_data_size = 0;
    // A resumed session skips the verifier, so a client whose CA left the bundle (or whose SVID
    // expired) could come back in. Every connection gets a full handshake instead; sidecars
    // pool their connections, so there are few.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client config presenting `resolver`'s SVID (if any) and verifying with `verifier`.
/// No 0-RTT, and no session resumption by default (every connection is checked against the
/// current bundle); a caller that enables resumption must re-verify resumed sessions.
pub fn client_config(
    resolver: Option<Arc<SvidResolver>>,
    verifier: Arc<SpiffeServerVerifier>,
    policy: TlsPolicy,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(policy_provider(policy))
        .with_protocol_versions(policy.versions())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match resolver {
        Some(resolver) => builder.with_client_cert_resolver(resolver),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_early_data = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

impl TlsPolicy {
    /// The protocol versions this policy allows.
    pub fn versions(self) -> &'static [&'static SupportedProtocolVersion] {
        static TLS13: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        static TLS12_PLUS: [&SupportedProtocolVersion; 2] =
            [&rustls::version::TLS13, &rustls::version::TLS12];
        match self {
            TlsPolicy::Tls13 => &TLS13,
            TlsPolicy::Tls12Plus => &TLS12_PLUS,
        }
    }
}

/// TLS 1.2 suites allowed by [`TlsPolicy::Tls12Plus`]: forward-secret AEADs for ECDSA keys only.
pub const TLS12_SUITES: [CipherSuite; 3] = [
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// [`provider`] with its cipher suites cut down to what `policy` allows.
pub fn policy_provider(policy: TlsPolicy) -> Arc<CryptoProvider> {
    let mut provider = CryptoProvider::clone(&provider());
    provider.cipher_suites.retain(|suite| match suite {
        SupportedCipherSuite::Tls13(_) => true,
        SupportedCipherSuite::Tls12(_) => {
            policy == TlsPolicy::Tls12Plus && TLS12_SUITES.contains(&suite.suite())
        }
    });
    Arc::new(provider)
}

/// The SPIFFE ID of a verified peer, read from the leaf rustls kept for the connection.
pub fn peer_spiffe_id(
    peer_certs: Option<&[rustls_pki_types::CertificateDer<'_>]>,
) -> Option<SpiffeId> {
    let leaf = peer_certs?.first()?;
    crate::cert_facts(leaf).ok()?.leaf_spiffe_id().ok()
}

mod hkdf;
#[cfg(test)]
mod tests;
mod verified;
