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
/// each stream, ~0.6 KiB, was as large as the leaf). The leaf and the key share one
/// allocation: ~545 + ~138 bytes fill jemalloc's 768-byte class, where apart they took the
/// 640- and 160-byte ones, and this struct's own allocation is 64 bytes instead of 96.
pub struct Issued {
    /// The leaf's DER, then the key's. The key's bytes are overwritten with zeros when
    /// dropped, as an [`trellis_identity::Svid`]'s key is.
    der: Box<[u8]>,
    /// Where the leaf ends and the key begins.
    leaf_len: usize,
    /// The key's encoding; `None` when there is no key (CSR mode).
    key: Option<KeyEncoding>,
    above: Arc<[CertificateDer<'static>]>,
}

/// How a key kept in [`Issued`] is encoded (its variant of [`PrivateKeyDer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyEncoding {
    Pkcs1,
    Sec1,
    Pkcs8,
}

impl Issued {
    /// The leaf with the key the control plane made for it (None: the caller's own, by CSR),
    /// and the certificates above it. The key given is zeroed once copied.
    pub fn new(
        leaf: CertificateDer<'static>,
        key: Option<PrivateKeyDer<'static>>,
        above: Arc<[CertificateDer<'static>]>,
    ) -> Self {
        let key_der = key.as_ref().map_or(&[][..], |k| k.secret_der());
        // Boxed before the key is copied in: whatever `into_boxed_slice` might move is zeros,
        // so no copy of the key is left behind in freed memory.
        let mut der = vec![0u8; leaf.len() + key_der.len()].into_boxed_slice();
        der[..leaf.len()].copy_from_slice(&leaf);
        der[leaf.len()..].copy_from_slice(key_der);
        let encoding = key.as_ref().map(|k| match k {
            PrivateKeyDer::Pkcs1(_) => KeyEncoding::Pkcs1,
            PrivateKeyDer::Sec1(_) => KeyEncoding::Sec1,
            // PKCS#8, and any encoding rustls-pki-types adds later (all PKCS#8-shaped).
            _ => KeyEncoding::Pkcs8,
        });
        if let Some(mut key) = key {
            zeroize::Zeroize::zeroize(&mut key);
        }
        Self {
            der,
            leaf_len: leaf.len(),
            key: encoding,
            above,
        }
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> CertificateDer<'_> {
        CertificateDer::from(&self.der[..self.leaf_len])
    }

    /// The key the control plane made, in the encoding it came in; `None` in CSR mode.
    fn key(&self) -> Option<PrivateKeyDer<'_>> {
        use rustls::pki_types::{PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer};
        let der = &self.der[self.leaf_len..];
        self.key.map(|encoding| match encoding {
            KeyEncoding::Pkcs1 => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der)),
            KeyEncoding::Sec1 => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der)),
            KeyEncoding::Pkcs8 => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der)),
        })
    }

    /// Whether the control plane made the key (false in CSR mode).
    pub fn has_key(&self) -> bool {
        self.key.is_some()
    }
}

/// A rotated-out key does not linger in freed heap memory.
impl Drop for Issued {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.der[self.leaf_len..]);
    }
}

/// The key never appears in `Debug` output.
impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("leaf_len", &self.leaf_len)
            .field("has_key", &self.has_key())
            .field("above_len", &self.above.len())
            .finish_non_exhaustive()
    }
}

/// `Secret{name, tls_certificate{chain PEM[, key PEM]}}`; no key in CSR mode.
pub fn svid_secret(name: &str, issued: &Issued) -> Secret {
    let mut chain = certs_to_pem(&[issued.leaf()]);
    chain.push_str(&certs_to_pem(&issued.above));
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain.into_bytes()),
            private_key: issued
                .key()
                .and_then(|k| inline(key_to_pem(&k).as_bytes().to_vec())),
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

    /// The leaf and key kept in one allocation come back out exactly as they went in, the
    /// key in its own PEM block and only when the control plane made it.
    #[test]
    fn an_issued_svid_sends_back_its_own_leaf_key_and_chain() {
        use trellis_identity::testca::TestCa;
        let ca = TestCa::root("example.org");
        let svid = ca.svid("ns/prod/sa/web");
        let (leaf, key) = (svid.chain()[0].clone(), svid.key().clone_key());
        let above: Arc<[CertificateDer<'static>]> = Arc::from(vec![ca.cert().clone()]);
        let chain_pem = |secret: &Secret| match &secret.r#type {
            Some(secret::Type::TlsCertificate(tls)) => {
                (tls.certificate_chain.clone(), tls.private_key.clone())
            }
            _ => panic!("not a TLS certificate"),
        };

        let issued = Issued::new(leaf.clone(), Some(key.clone_key()), Arc::clone(&above));
        assert_eq!(issued.leaf(), leaf);
        let (chain, private_key) = chain_pem(&svid_secret("default", &issued));
        let mut expected = certs_to_pem(std::slice::from_ref(&leaf));
        expected.push_str(&ca.cert_pem());
        assert_eq!(chain, inline(expected.into_bytes()));
        assert_eq!(
            private_key,
            inline(key_to_pem(&key).as_bytes().to_vec()),
            "the key comes back in its own encoding"
        );

        // Keys in the other two encodings (the CA makes PKCS#8) come back as they went in.
        let sec1 = PrivateKeyDer::Sec1(vec![0x30, 3, 2, 1, 1].into());
        let pkcs1 = PrivateKeyDer::Pkcs1(vec![0x30, 3, 2, 1, 0].into());
        for key in [sec1, pkcs1] {
            let issued = Issued::new(leaf.clone(), Some(key.clone_key()), Arc::clone(&above));
            assert_eq!(issued.key(), Some(key));
            assert_eq!(issued.leaf(), leaf);
        }

        let csr_mode = Issued::new(leaf.clone(), None, above);
        assert!(!csr_mode.has_key());
        assert_eq!(csr_mode.leaf(), leaf);
        assert_eq!(chain_pem(&svid_secret("default", &csr_mode)).1, None);
        // What every connected sidecar's stream keeps: 48 bytes or fewer keep it (with the
        // `Arc`'s counts) in jemalloc's 64-byte class.
        assert!(std::mem::size_of::<Issued>() <= 48);
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
