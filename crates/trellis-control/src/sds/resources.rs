//! SDS resource names and the `Secret` messages Trellis serves.
//!
//! Names: `default` (the caller's SVID), `ROOTCA` (the trust bundle), and as aliases the
//! caller's own SPIFFE ID (= `default`) and the trust domain ID `spiffe://<td>` (= `ROOTCA`);
//! and `trellis-log-head`, the transparency log's latest signed head for sidecars to witness
//! (a `generic_secret` stock Envoys never ask for).
//! The response echoes the name the client asked for: Envoy matches secrets by name.

use std::sync::Arc;

use prost::Message;
use tonic::Status;
use trellis_identity::{
    certs_to_pem, key_to_pem, CertificateDer, PrivateKeyDer, SpiffeId, TrustBundle,
};
use trellis_proto::{
    data_source, secret, spiffe_cert_validator_config, CertificateValidationContext, DataSource,
    GenericSecret, Secret, SpiffeCertValidatorConfig, TlsCertificate, TypedExtensionConfig,
    SECRET_TYPE_URL, SPIFFE_VALIDATOR_NAME, SPIFFE_VALIDATOR_TYPE_URL,
};
use trellis_transparency::LOG_HEAD_RESOURCE;

/// The SVID resource name.
pub const DEFAULT: &str = "default";
/// The trust bundle resource name.
pub const ROOTCA: &str = "ROOTCA";

/// What a resource name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    /// The caller's X.509-SVID and key.
    Svid,
    /// The trust bundle.
    Bundle,
    /// The transparency log's latest signed head (`trellis-log-head`).
    LogHead,
}

/// Why a name cannot be served; becomes a gRPC status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// Another workload's identity.
    NotYours {
        /// Requested.
        name: String,
        /// The caller.
        caller: String,
    },
    /// No such secret.
    Unknown(String),
}

impl NameError {
    /// Stable metric reason.
    pub fn reason(&self) -> &'static str {
        match self {
            NameError::NotYours { .. } => "not_yours",
            NameError::Unknown(_) => "unknown_resource",
        }
    }

    /// The gRPC status a client gets.
    pub fn to_status(&self) -> Status {
        match self {
            NameError::NotYours { name, caller } => Status::permission_denied(format!(
                "secret `{name}` is another workload's identity; caller `{caller}` may only ask for `default`, `{caller}`, or `ROOTCA`"
            )),
            NameError::Unknown(name) => Status::not_found(format!(
                "unknown secret `{name}`: Trellis serves `default` (your SVID), `ROOTCA` (the trust bundle), your SPIFFE ID, the trust domain ID and `{LOG_HEAD_RESOURCE}`"
            )),
        }
    }
}

/// Resolves one requested name for `caller`.
pub fn resolve(name: &str, caller: &SpiffeId) -> Result<ResourceKind, NameError> {
    if name == DEFAULT || name == caller.as_str() {
        return Ok(ResourceKind::Svid);
    }
    if name == ROOTCA {
        return Ok(ResourceKind::Bundle);
    }
    if name == LOG_HEAD_RESOURCE {
        return Ok(ResourceKind::LogHead);
    }
    if let Ok(id) = SpiffeId::parse(name) {
        if id.path().is_empty() && id.trust_domain_name() == caller.trust_domain_name() {
            return Ok(ResourceKind::Bundle);
        }
        if id.trust_domain_name() == caller.trust_domain_name() {
            return Err(NameError::NotYours {
                name: name.to_owned(),
                caller: caller.to_string(),
            });
        }
    }
    Err(NameError::Unknown(name.to_owned()))
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
    })
}

/// What the control plane issued on a stream, as the stream keeps it to send again (a bundle
/// or log head push carries every subscribed resource): the leaf, its key when the control
/// plane made it (stock Envoy; in CSR mode the key never travels) and the chain above it.
///
/// Only what a response needs, as every connected sidecar's stream keeps one for its life:
/// the leaf's facts (SPIFFE ID, serial, notAfter), which [`trellis_identity::Svid`] keeps
/// beside its chain, were ~0.2 KiB a stream no response reads. The certificates above the
/// leaf are the issuing CA's, shared with everything it issued (a copy of the intermediate in
/// each stream, ~0.6 KiB, was as large as the leaf).
pub struct Issued {
    leaf: CertificateDer<'static>,
    /// Overwritten with zeros when dropped, as an [`trellis_identity::Svid`]'s key is.
    key: Option<PrivateKeyDer<'static>>,
    above: Arc<[CertificateDer<'static>]>,
}

impl Issued {
    /// The leaf with the key the control plane made for it (None: the caller's own, by CSR),
    /// and the certificates above it.
    pub fn new(
        leaf: CertificateDer<'static>,
        key: Option<PrivateKeyDer<'static>>,
        above: Arc<[CertificateDer<'static>]>,
    ) -> Self {
        Self { leaf, key, above }
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.leaf
    }

    /// Whether the control plane made the key (false in CSR mode).
    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }
}

/// A rotated-out key does not linger in freed heap memory.
impl Drop for Issued {
    fn drop(&mut self) {
        if let Some(key) = self.key.as_mut() {
            zeroize::Zeroize::zeroize(key);
        }
    }
}

/// The key never appears in `Debug` output.
impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("leaf_len", &self.leaf.len())
            .field("has_key", &self.has_key())
            .field("above_len", &self.above.len())
            .finish_non_exhaustive()
    }
}

/// `Secret{name, tls_certificate{chain PEM[, key PEM]}}`; no key in CSR mode.
pub fn svid_secret(name: &str, issued: &Issued) -> Secret {
    let mut chain = certs_to_pem(std::slice::from_ref(&issued.leaf));
    chain.push_str(&certs_to_pem(&issued.above));
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain.into_bytes()),
            private_key: issued
                .key
                .as_ref()
                .and_then(|k| inline(key_to_pem(k).as_bytes().to_vec())),
        })),
    }
}

/// `Secret{name, validation_context{trusted_ca = bundle PEM}}`.
///
/// With federation, the validation context also carries `custom_validator_config`: Envoy's
/// SPIFFE certificate validator (`envoy.tls.cert_validator.spiffe`) with one `trust_domains`
/// entry per trusted trust domain (own first, then the federated ones by name), so a stock
/// Envoy verifies each peer against its own domain's CAs only. Trellis sidecars read the same
/// entries. Without federation the secret is exactly the single-domain one.
pub fn bundle_secret(name: &str, bundle: &TrustBundle) -> Secret {
    let custom_validator_config = bundle.is_federated().then(|| spiffe_validator(bundle));
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(bundle.to_pem().into_bytes()),
                custom_validator_config,
            },
        )),
    }
}

/// `Secret{name, generic_secret{secret = the JSON of a HeadForWitness}}`.
pub fn log_head_secret(name: &str, json: &[u8]) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::GenericSecret(GenericSecret {
            secret: inline(json.to_vec()),
        })),
    }
}

/// The `envoy.tls.cert_validator.spiffe` extension for `bundle` and its federated bundles.
fn spiffe_validator(bundle: &TrustBundle) -> TypedExtensionConfig {
    let trust_domains = std::iter::once(bundle)
        .chain(bundle.federated())
        .map(|b| spiffe_cert_validator_config::TrustDomain {
            name: b.trust_domain().as_str().to_owned(),
            trust_bundle: inline(b.to_pem().into_bytes()),
        })
        .collect();
    let config = SpiffeCertValidatorConfig { trust_domains };
    TypedExtensionConfig {
        name: SPIFFE_VALIDATOR_NAME.to_owned(),
        typed_config: Some(prost_types::Any {
            type_url: SPIFFE_VALIDATOR_TYPE_URL.to_owned(),
            value: config.encode_to_vec(),
        }),
    }
}

/// Wraps a `Secret` in `Any`.
pub fn to_any(secret: &Secret) -> prost_types::Any {
    prost_types::Any {
        type_url: SECRET_TYPE_URL.to_owned(),
        value: secret.encode_to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> SpiffeId {
        SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap()
    }

    #[test]
    fn aliases_resolve() {
        assert_eq!(resolve("default", &caller()), Ok(ResourceKind::Svid));
        assert_eq!(
            resolve("spiffe://example.org/ns/prod/sa/web", &caller()),
            Ok(ResourceKind::Svid)
        );
        assert_eq!(resolve("ROOTCA", &caller()), Ok(ResourceKind::Bundle));
        assert_eq!(
            resolve("trellis-log-head", &caller()),
            Ok(ResourceKind::LogHead)
        );
        assert_eq!(
            resolve("spiffe://example.org", &caller()),
            Ok(ResourceKind::Bundle)
        );
    }

    #[test]
    fn single_domain_bundle_secret_has_no_validator() {
        let ca = trellis_identity::testca::TestCa::root("example.org");
        let secret = bundle_secret(ROOTCA, &ca.bundle());
        let Some(secret::Type::ValidationContext(vc)) = secret.r#type else {
            panic!("not a validation context")
        };
        assert!(vc.custom_validator_config.is_none());
    }

    #[test]
    fn federated_bundle_secret_lists_each_trust_domain() {
        use trellis_identity::testca::TestCa;
        let (a, b, c) = (
            TestCa::root("a.org"),
            TestCa::root("b.org"),
            TestCa::root("c.org"),
        );
        let bundle = a.bundle().with_federated([c.bundle(), b.bundle()]);
        let secret = bundle_secret(ROOTCA, &bundle);
        let Some(secret::Type::ValidationContext(vc)) = secret.r#type else {
            panic!("not a validation context")
        };
        assert_eq!(vc.trusted_ca, inline(a.bundle_pem().into_bytes()));
        let ext = vc.custom_validator_config.unwrap();
        assert_eq!(ext.name, "envoy.tls.cert_validator.spiffe");
        let any = ext.typed_config.unwrap();
        assert_eq!(any.type_url, SPIFFE_VALIDATOR_TYPE_URL);
        let config = SpiffeCertValidatorConfig::decode(any.value.as_slice()).unwrap();
        let names: Vec<_> = config
            .trust_domains
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(names, ["a.org", "b.org", "c.org"]);
        assert_eq!(
            config.trust_domains[1].trust_bundle,
            inline(b.bundle_pem().into_bytes())
        );
    }

    #[test]
    fn another_workloads_id_is_denied() {
        let err = resolve("spiffe://example.org/ns/prod/sa/db", &caller()).unwrap_err();
        assert_eq!(err.reason(), "not_yours");
        assert_eq!(err.to_status().code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn unknown_name_is_not_found() {
        for name in ["rootca", "", "spiffe://other.org", "spiffe://other.org/x"] {
            let err = resolve(name, &caller()).unwrap_err();
            assert_eq!(err.to_status().code(), tonic::Code::NotFound, "{name}");
        }
    }
}
