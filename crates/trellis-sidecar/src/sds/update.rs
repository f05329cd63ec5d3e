//! One SDS response, taken apart and checked at the edge: the `default` secret must be a
//! `TlsCertificate`, `ROOTCA` a `ValidationContext`, both inline. What comes out is typed
//! (certificates, key, [`TrustBundle`]); what does not is a [`Rejection`] that becomes the
//! NACK's `error_detail`, the metric label and the log line.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use trellis_identity::{
    certs_from_pem, key_from_pem, CertificateDer, PemError, PrivateKeyDer, SvidError, TrustBundle,
    TrustDomain,
};
use trellis_proto::{data_source, secret, DataSource, DiscoveryResponse, Secret, SECRET_TYPE_URL};
use trellis_transparency::LOG_HEAD_RESOURCE;

use crate::svid_store::UpdateError;

/// The SVID resource name.
pub const DEFAULT: &str = "default";
/// The trust bundle resource name.
pub const ROOTCA: &str = "ROOTCA";

/// Why an update was refused: `reason` labels `trellis_sds_updates_total{result}`; `message`
/// goes into the NACK's `error_detail.message` and the log. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stable label.
    pub reason: &'static str,
    /// What was wrong, naming the secret and field.
    pub message: String,
}

impl Rejection {
    pub(crate) fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// An SVID check failed on the `default` secret.
    pub(crate) fn svid(e: &SvidError) -> Self {
        Self::svid_at(e, SystemTime::now())
    }

    fn svid_at(e: &SvidError, now: SystemTime) -> Self {
        match validity_window(e, now) {
            Some((reason, why)) => Self::new(reason, format!("secret `{DEFAULT}`: {e}: {why}")),
            None => Self::new(e.reason(), format!("secret `{DEFAULT}`: {e}")),
        }
    }

    /// The store refused the update.
    pub(crate) fn update(e: &UpdateError) -> Self {
        Self::update_at(e, SystemTime::now())
    }

    fn update_at(e: &UpdateError, now: SystemTime) -> Self {
        match e {
            UpdateError::Svid(inner) => Self::svid_at(inner, now),
            UpdateError::WrongTrustDomain { .. } => {
                Self::new(e.reason(), format!("secret `{ROOTCA}`: {e}"))
            }
            UpdateError::WrongIdentity { .. } => {
                Self::new(e.reason(), format!("secret `{DEFAULT}`: {e}"))
            }
        }
    }
}

/// An SVID outside its validity window is either expired (a stale certificate) or not valid
/// yet (almost always clock skew between its issuer and this host): different fixes, so a different label (`expired`, `not_yet_valid`) and a clause for
/// the message saying by how much. `None` for any other error.
pub(crate) fn validity_window(e: &SvidError, now: SystemTime) -> Option<(&'static str, String)> {
    let SvidError::NotValidNow {
        not_before,
        not_after,
    } = e
    else {
        return None;
    };
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    let human = |secs: i64| {
        humantime::format_duration(Duration::from_secs(secs.unsigned_abs())).to_string()
    };
    if now > *not_after {
        Some((
            "expired",
            format!("it expired {} ago", human(now - not_after)),
        ))
    } else if now < *not_before {
        Some((
            "not_yet_valid",
            format!(
                "it is not valid for another {}; is the control plane's clock ahead of this host's?",
                human(not_before - now)
            ),
        ))
    } else {
        // Inside the window now: the clock moved between the check and this message.
        None
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Where the SVID's private key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// We made it and sent a CSR: a key in the response is refused (keys must not travel).
    Ours,
    /// The control plane made it (stock-Envoy mode): the response must carry it.
    Response,
}

/// A response's content, parsed but not yet validated as an SVID.
pub struct Decoded {
    /// `default`'s certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// `default`'s private key ([`KeySource::Response`] only).
    pub key: Option<PrivateKeyDer<'static>>,
    /// `ROOTCA`.
    pub bundle: TrustBundle,
    /// `trellis-log-head`'s JSON, when the control plane sent it (never a reason to refuse
    /// the update: the witness judges it separately).
    pub log_head: Option<Vec<u8>>,
}

/// Takes a response apart. State of the World: every response carries every subscribed
/// resource, so both `default` and `ROOTCA` must be present.
pub fn decode(
    resp: &DiscoveryResponse,
    td: &TrustDomain,
    keys: KeySource,
) -> Result<Decoded, Rejection> {
    if !resp.type_url.is_empty() && resp.type_url != SECRET_TYPE_URL {
        return Err(Rejection::new(
            "wrong_type",
            format!(
                "response type_url is `{}`, expected `{SECRET_TYPE_URL}`",
                clip(&resp.type_url)
            ),
        ));
    }
    let mut default = None;
    let mut rootca = None;
    let mut log_head = None;
    for (i, any) in resp.resources.iter().enumerate() {
        if any.type_url != SECRET_TYPE_URL {
            return Err(Rejection::new(
                "wrong_type",
                format!(
                    "resource #{i} has type_url `{}`, expected `{SECRET_TYPE_URL}`",
                    clip(&any.type_url)
                ),
            ));
        }
        let s = Secret::decode(any.value.as_slice()).map_err(|e| {
            Rejection::new("malformed", format!("resource #{i} is not a Secret: {e}"))
        })?;
        let slot = match s.name.as_str() {
            DEFAULT => &mut default,
            ROOTCA => &mut rootca,
            LOG_HEAD_RESOURCE => {
                // Malformed or not, it goes to the witness, which says what is wrong with it.
                log_head = match s.r#type {
                    Some(secret::Type::GenericSecret(g)) => {
                        g.secret.and_then(|ds| match ds.specifier {
                            Some(data_source::Specifier::InlineBytes(b)) => Some(b),
                            Some(data_source::Specifier::InlineString(t)) => Some(t.into_bytes()),
                            _ => None,
                        })
                    }
                    _ => None,
                }
                .or(Some(Vec::new()));
                continue;
            }
            // Not asked for; a SotW server only sends subscribed names, so ignore extras.
            _ => continue,
        };
        if slot.is_some() {
            return Err(Rejection::new(
                "malformed",
                format!("secret `{}` appears twice in one response", s.name),
            ));
        }
        *slot = Some(s);
    }
    let missing = |name: &str| {
        Rejection::new(
            "missing_secret",
            format!("response is missing secret `{name}`"),
        )
    };
    let default = default.ok_or_else(|| missing(DEFAULT))?;
    let rootca = rootca.ok_or_else(|| missing(ROOTCA))?;

    let tls = match default.r#type {
        Some(secret::Type::TlsCertificate(t)) => t,
        other => return Err(wrong_kind(DEFAULT, "tls_certificate", other.as_ref())),
    };
    let chain_pem =
        inline(DEFAULT, "certificate_chain", tls.certificate_chain)?.ok_or_else(|| {
            Rejection::new(
                "malformed",
                format!("secret `{DEFAULT}` has no certificate_chain"),
            )
        })?;
    let chain = certs_from_pem(&chain_pem).map_err(|e| {
        Rejection::new(
            "malformed",
            format!("secret `{DEFAULT}`: certificate_chain: {e}"),
        )
    })?;
    let key_pem = inline(DEFAULT, "private_key", tls.private_key)?.filter(|k| !k.is_empty());
    let key = match (keys, key_pem) {
        (KeySource::Ours, None) => None,
        (KeySource::Ours, Some(_)) => {
            return Err(Rejection::new(
                "key_in_response",
                format!("secret `{DEFAULT}` carries a private_key, but this sidecar sent a CSR: keys must not leave the workload, so the response is refused"),
            ))
        }
        (KeySource::Response, None) => {
            return Err(Rejection::new(
                "no_key",
                format!("secret `{DEFAULT}` has no private_key (this sidecar runs with csr: false and needs the control plane's key)"),
            ))
        }
        (KeySource::Response, Some(pem)) => Some(key_from_pem(&pem).map_err(|e| {
            // Never echo the key's text: name the problem only.
            let what = match e {
                PemError::Missing { .. } => "no PRIVATE KEY block found",
                PemError::Malformed(_) => "malformed PEM",
            };
            Rejection::new("bad_key", format!("secret `{DEFAULT}`: private_key: {what}"))
        })?),
    };

    let vc = match rootca.r#type {
        Some(secret::Type::ValidationContext(v)) => v,
        other => return Err(wrong_kind(ROOTCA, "validation_context", other.as_ref())),
    };
    let bundle_pem = inline(ROOTCA, "trusted_ca", vc.trusted_ca)?.unwrap_or_default();
    let bundle = TrustBundle::from_pem(td.clone(), &bundle_pem)
        .map_err(|e| Rejection::new("bad_bundle", format!("secret `{ROOTCA}`: trusted_ca: {e}")))?;
    Ok(Decoded {
        chain,
        key,
        bundle,
        log_head,
    })
}

fn wrong_kind(name: &str, want: &str, got: Option<&secret::Type>) -> Rejection {
    let got = match got {
        Some(secret::Type::TlsCertificate(_)) => "tls_certificate",
        Some(secret::Type::ValidationContext(_)) => "validation_context",
        Some(secret::Type::GenericSecret(_)) => "generic_secret",
        None => "nothing",
    };
    Rejection::new(
        "wrong_type",
        format!("secret `{name}` must be a {want}, got {got}"),
    )
}

/// The bytes of an inline `DataSource`. A file name or environment variable is refused: the
/// control plane must not make the sidecar read local files.
fn inline(secret: &str, field: &str, ds: Option<DataSource>) -> Result<Option<Vec<u8>>, Rejection> {
    match ds.and_then(|d| d.specifier) {
        None => Ok(None),
        Some(data_source::Specifier::InlineBytes(b)) => Ok(Some(b)),
        Some(data_source::Specifier::InlineString(s)) => Ok(Some(s.into_bytes())),
        Some(data_source::Specifier::Filename(_)) | Some(data_source::Specifier::EnvironmentVariable(_)) => Err(Rejection::new(
            "not_inline",
            format!("secret `{secret}`: {field} must be inline_bytes or inline_string (a file name or environment variable is not accepted)"),
        )),
    }
}

/// Fuzzing entry point (`fuzz/fuzz_targets/sds_update.rs`, run on stable by
/// `tests/fuzz_bodies.rs`): bytes → a protobuf `DiscoveryResponse` → [`decode`] in both key
/// modes, then the checks `apply` makes before installing (SVID rules, key match, chain
/// against the bundle, trust domain, via [`crate::SvidStore::validate`]). Must never panic,
/// and every rejection's `reason` must be a metric-label-shaped word. Not API.
#[doc(hidden)]
pub fn fuzz_response(data: &[u8]) {
    use std::sync::Arc;
    use trellis_identity::{cert_facts, Svid};

    let Ok(resp) = DiscoveryResponse::decode(data) else {
        return;
    };
    let Ok(td) = TrustDomain::parse("example.org") else {
        return;
    };
    let label_shaped = |r: &Rejection| {
        assert!(
            !r.reason.is_empty()
                && r.reason
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
            "reason {:?}",
            r.reason
        );
    };
    for keys in [KeySource::Ours, KeySource::Response] {
        let decoded = match decode(&resp, &td, keys) {
            Ok(d) => d,
            Err(r) => {
                label_shaped(&r);
                continue;
            }
        };
        assert!(!decoded.chain.is_empty());
        assert_eq!(decoded.key.is_some(), keys == KeySource::Response);
        let Some(key) = decoded.key else {
            // CSR mode pairs the chain with our own key; without it, parse the leaf only.
            if let Ok(facts) = cert_facts(&decoded.chain[0]) {
                let _ = facts.leaf_spiffe_id();
            }
            continue;
        };
        let svid = match Svid::new(decoded.chain, key) {
            Ok(s) => s,
            Err(e) => {
                label_shaped(&Rejection::svid(&e));
                continue;
            }
        };
        // Inside the leaf's window, so a good chain is accepted deterministically.
        let now = svid
            .not_after()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or(svid.not_after());
        let store = crate::SvidStore::new(
            decoded.bundle.clone(),
            None,
            Arc::new(crate::metrics::SidecarMetrics::new()),
        );
        if let Err(e) = store.validate(&svid, &decoded.bundle, now) {
            label_shaped(&Rejection::update_at(&e, now));
        }
    }
}

/// The first 128 characters of a peer-supplied string, for NACK messages and logs: the
/// control plane may be hostile, and its strings must not grow our logs without bound.
fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 128;
    match s.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &s[..end]).into(),
        None => s.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_identity::testca::TestCa;
    use trellis_identity::{certs_to_pem, key_to_pem, Svid};
    use trellis_proto::{CertificateValidationContext, TlsCertificate};

    fn bytes(b: impl Into<Vec<u8>>) -> Option<DataSource> {
        Some(DataSource {
            specifier: Some(data_source::Specifier::InlineBytes(b.into())),
        })
    }

    fn any(s: &Secret) -> prost_types::Any {
        prost_types::Any {
            type_url: SECRET_TYPE_URL.into(),
            value: s.encode_to_vec(),
        }
    }

    fn tls_secret(chain: Option<DataSource>, key: Option<DataSource>) -> Secret {
        Secret {
            name: DEFAULT.into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: chain,
                private_key: key,
            })),
        }
    }

    fn bundle_secret(pem: Option<DataSource>) -> Secret {
        Secret {
            name: ROOTCA.into(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext { trusted_ca: pem },
            )),
        }
    }

    fn response(secrets: &[Secret]) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: "v1".into(),
            resources: secrets.iter().map(any).collect(),
            canary: false,
            type_url: SECRET_TYPE_URL.into(),
            nonce: "n1".into(),
        }
    }

    fn good(ca: &TestCa, svid: &Svid) -> (Secret, Secret) {
        (
            tls_secret(
                bytes(certs_to_pem(svid.chain())),
                bytes(key_to_pem(svid.key()).as_bytes()),
            ),
            bundle_secret(bytes(ca.bundle().to_pem())),
        )
    }

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    #[test]
    fn decodes_inline_bytes_and_strings() {
        let ca = TestCa::root("example.org");
        let svid = ca.svid("/web");
        let (d, b) = good(&ca, &svid);
        let out = decode(&response(&[d, b]), &td(), KeySource::Response).unwrap();
        assert_eq!(out.chain, svid.chain());
        assert_eq!(out.key.unwrap().secret_der(), svid.key().secret_der());
        let strings = tls_secret(
            Some(DataSource {
                specifier: Some(data_source::Specifier::InlineString(certs_to_pem(
                    svid.chain(),
                ))),
            }),
            None,
        );
        let out = decode(
            &response(&[bundle_secret(bytes(ca.bundle().to_pem())), strings]),
            &td(),
            KeySource::Ours,
        )
        .unwrap();
        assert!(out.key.is_none());
        assert_eq!(out.bundle.roots(), ca.bundle().roots());
    }

    #[test]
    fn rejects_response_missing_rootca() {
        let ca = TestCa::root("example.org");
        let (d, _) = good(&ca, &ca.svid("/web"));
        let err = decode(&response(&[d]), &td(), KeySource::Response)
            .err()
            .unwrap();
        assert_eq!(err.reason, "missing_secret");
        assert!(err.message.contains("`ROOTCA`"), "{err}");
    }

    #[test]
    fn rejects_response_missing_default() {
        let ca = TestCa::root("example.org");
        let (_, b) = good(&ca, &ca.svid("/web"));
        let err = decode(&response(&[b]), &td(), KeySource::Response)
            .err()
            .unwrap();
        assert_eq!(err.reason, "missing_secret");
        assert!(err.message.contains("`default`"), "{err}");
    }

    #[test]
    fn rejects_key_in_response_in_csr_mode() {
        let ca = TestCa::root("example.org");
        let (d, b) = good(&ca, &ca.svid("/web"));
        let err = decode(&response(&[d, b]), &td(), KeySource::Ours)
            .err()
            .unwrap();
        assert_eq!(err.reason, "key_in_response");
        assert!(
            err.message.contains("keys must not leave the workload"),
            "{err}"
        );
    }

    #[test]
    fn rejects_missing_key_without_csr() {
        let ca = TestCa::root("example.org");
        let svid = ca.svid("/web");
        let d = tls_secret(bytes(certs_to_pem(svid.chain())), None);
        let err = decode(
            &response(&[d, bundle_secret(bytes(ca.bundle().to_pem()))]),
            &td(),
            KeySource::Response,
        )
        .err()
        .unwrap();
        assert_eq!(err.reason, "no_key");
    }

    #[test]
    fn rejects_garbage_pem_chain() {
        let ca = TestCa::root("example.org");
        let d = tls_secret(bytes("garbage"), None);
        let err = decode(
            &response(&[d, bundle_secret(bytes(ca.bundle().to_pem()))]),
            &td(),
            KeySource::Ours,
        )
        .err()
        .unwrap();
        assert_eq!(err.reason, "malformed");
        assert!(err.message.contains("certificate_chain"), "{err}");
    }

    #[test]
    fn garbage_key_is_refused_without_echoing_it() {
        let ca = TestCa::root("example.org");
        let svid = ca.svid("/web");
        let d = tls_secret(
            bytes(certs_to_pem(svid.chain())),
            bytes("-----BEGIN PRIVATE KEY-----\nSECRETSTUFF!!\n-----END PRIVATE KEY-----\n"),
        );
        let err = decode(
            &response(&[d, bundle_secret(bytes(ca.bundle().to_pem()))]),
            &td(),
            KeySource::Response,
        )
        .err()
        .unwrap();
        assert_eq!(err.reason, "bad_key");
        assert!(!err.message.contains("SECRETSTUFF"), "{err}");
    }

    #[test]
    fn rejects_empty_bundle() {
        let ca = TestCa::root("example.org");
        let (d, _) = good(&ca, &ca.svid("/web"));
        let err = decode(
            &response(&[d, bundle_secret(bytes(""))]),
            &td(),
            KeySource::Response,
        )
        .err()
        .unwrap();
        assert_eq!(err.reason, "bad_bundle");
        assert!(
            err.message.starts_with("secret `ROOTCA`: trusted_ca:"),
            "{err}"
        );
    }

    #[test]
    fn rejects_swapped_secret_types() {
        let ca = TestCa::root("example.org");
        let mut b = bundle_secret(bytes(ca.bundle().to_pem()));
        b.name = DEFAULT.into();
        let mut b2 = b.clone();
        b2.name = ROOTCA.into();
        let err = decode(&response(&[b, b2]), &td(), KeySource::Ours)
            .err()
            .unwrap();
        assert_eq!(err.reason, "wrong_type");
        assert!(
            err.message
                .contains("must be a tls_certificate, got validation_context"),
            "{err}"
        );
    }

    #[test]
    fn rejects_file_name_data_source() {
        let ca = TestCa::root("example.org");
        let d = tls_secret(
            Some(DataSource {
                specifier: Some(data_source::Specifier::Filename("/etc/shadow".into())),
            }),
            None,
        );
        let err = decode(
            &response(&[d, bundle_secret(bytes(ca.bundle().to_pem()))]),
            &td(),
            KeySource::Ours,
        )
        .err()
        .unwrap();
        assert_eq!(err.reason, "not_inline");
    }

    #[test]
    fn clips_peer_strings_in_messages() {
        let long = "x".repeat(10_000);
        assert_eq!(clip(&long).chars().count(), 129);
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn rejects_wrong_type_url() {
        let ca = TestCa::root("example.org");
        let (d, b) = good(&ca, &ca.svid("/web"));
        let mut r = response(&[d, b]);
        r.resources[0].type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert_eq!(
            decode(&r, &td(), KeySource::Response).err().unwrap().reason,
            "wrong_type"
        );
    }

    #[test]
    fn rejects_undecodable_secret() {
        let ca = TestCa::root("example.org");
        let (_, b) = good(&ca, &ca.svid("/web"));
        let mut r = response(&[b]);
        r.resources.push(prost_types::Any {
            type_url: SECRET_TYPE_URL.into(),
            value: vec![0xff, 0xff, 0xff],
        });
        assert_eq!(
            decode(&r, &td(), KeySource::Response).err().unwrap().reason,
            "malformed"
        );
    }

    fn not_valid_now(not_before: i64, not_after: i64) -> SvidError {
        SvidError::NotValidNow {
            not_before,
            not_after,
        }
    }

    fn at(unix: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix)
    }

    #[test]
    fn expired_svid_is_labelled_expired_and_says_how_long_ago() {
        let r = Rejection::svid_at(&not_valid_now(1_000, 5_000), at(5_090));
        assert_eq!(r.reason, "expired");
        assert!(
            r.message
                .starts_with("secret `default`: certificate expired or not yet valid"),
            "{r}"
        );
        assert!(r.message.ends_with("it expired 1m 30s ago"), "{r}");
    }

    #[test]
    fn future_svid_is_not_yet_valid_and_points_at_the_clock() {
        let r = Rejection::svid_at(&not_valid_now(10_000, 20_000), at(6_400));
        assert_eq!(r.reason, "not_yet_valid");
        assert!(r.message.contains("not valid for another 1h"), "{r}");
        assert!(r.message.contains("clock"), "{r}");
    }

    #[test]
    fn store_refusals_name_the_secret_and_keep_their_label() {
        let now = at(10_000);
        let expired = UpdateError::Svid(not_valid_now(1_000, 5_000));
        assert_eq!(Rejection::update_at(&expired, now).reason, "expired");
        let early = UpdateError::Svid(not_valid_now(20_000, 30_000));
        assert_eq!(Rejection::update_at(&early, now).reason, "not_yet_valid");
        let other = UpdateError::Svid(SvidError::KeyMismatch);
        let r = Rejection::update_at(&other, now);
        assert_eq!(
            (r.reason, r.message.as_str()),
            (
                "bad_key",
                "secret `default`: private key does not match the certificate's public key"
            )
        );
        let td = UpdateError::WrongTrustDomain {
            expected: td(),
            got: TrustDomain::parse("evil.org").unwrap(),
        };
        let r = Rejection::update_at(&td, now);
        assert_eq!(r.reason, "wrong_trust_domain");
        assert!(r.message.starts_with("secret `ROOTCA`: "), "{r}");
        let id = UpdateError::WrongIdentity {
            expected: trellis_identity::SpiffeId::parse("spiffe://example.org/web").unwrap(),
            got: trellis_identity::SpiffeId::parse("spiffe://example.org/db").unwrap(),
        };
        let r = Rejection::update_at(&id, now);
        assert_eq!(r.reason, "wrong_identity");
        assert!(r.message.starts_with("secret `default`: "), "{r}");
    }

    #[test]
    fn not_yet_valid_svid_from_the_store_is_labelled_so() {
        use crate::metrics::SidecarMetrics;
        use crate::svid_store::SvidStore;
        use trellis_identity::testca::LeafSpec;
        let ca = TestCa::root("example.org");
        let store = SvidStore::new(
            ca.bundle(),
            None,
            std::sync::Arc::new(SidecarMetrics::new()),
        );
        let mut spec = LeafSpec::new("spiffe://example.org/web");
        spec.not_before = SystemTime::now() + Duration::from_secs(3600);
        spec.not_after = SystemTime::now() + Duration::from_secs(7200);
        let (chain, key) = ca.issue(&spec);
        let svid = Svid::new(chain, key).unwrap();
        let err = store
            .install(svid, ca.bundle(), SystemTime::now())
            .unwrap_err();
        let r = Rejection::update(&err);
        assert_eq!(r.reason, "not_yet_valid", "{r}");
        assert!(store.current().is_none());
    }

    #[test]
    fn rejects_duplicate_secret() {
        let ca = TestCa::root("example.org");
        let (d, b) = good(&ca, &ca.svid("/web"));
        let err = decode(&response(&[d.clone(), d, b]), &td(), KeySource::Response)
            .err()
            .unwrap();
        assert!(err.message.contains("appears twice"), "{err}");
    }
}
