//! The certificate authority: holds the signing key in memory and issues X.509-SVIDs.
//!
//! X509-SVID spec: "An X.509 SVID MUST contain exactly one URI SAN" (section 2); "leaf
//! certificates MUST set the `cA` field to `false`" (4.1); "Leaf SVIDs MUST set
//! `digitalSignature`" and "MUST NOT set `keyCertSign` or `cRLSign`" (4.3); the EKU, when
//! included, has "`id-kp-serverAuth` and `id-kp-clientAuth`" (4.4), so one SVID serves both
//! directions.
//!
//! Two ways to get a signing key:
//! - the embedded default ([`Ca::load_or_create`]): a self-signed root kept in the state
//!   database; the root signs SVIDs directly, so chain = `[leaf]`, bundle = `[root]`;
//! - an operator intermediate ([`Ca::from_files`], usually made by [`Ca::init_offline`]):
//!   chain = `[leaf, intermediate, …]`, bundle = the offline root.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use thiserror::Error;
use time::OffsetDateTime;
use trellis_identity::{
    CertificateDer, PrivateKeyDer, SpiffeId, Svid, TrustBundle, TrustDomain, Usage,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use zeroize::{Zeroize as _, Zeroizing};

use crate::registry::{CaMaterial, Registry};

/// Lifetime of a root made here (embedded default and `trellis ca init`).
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the intermediate made by `trellis ca init`.
const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Backdating of notBefore, so a peer whose clock is a little behind accepts a fresh cert.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// CA setup and issuance failures; each names the file and what to do.
#[derive(Debug, Error)]
pub enum CaError {
    /// A CA file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA file could not be written.
    #[error("{path}: cannot write: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A CA file's content is wrong (not PEM, not a CA, key mismatch, …).
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
    },
    /// A certificate signing request was refused (the caller's input, not the CA's setup).
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
    /// Signing failed.
    #[error("cannot sign certificate: {0}")]
    Sign(String),
    /// The state database failed.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

/// Files written by `trellis ca init`.
#[derive(Debug, Clone)]
pub struct OfflineCaFiles {
    /// Root certificate (also the bundle).
    pub root_cert: PathBuf,
    /// Root key: keep offline.
    pub root_key: PathBuf,
    /// Intermediate certificate for `--ca-cert`.
    pub intermediate_cert: PathBuf,
    /// Intermediate key for `--ca-key`.
    pub intermediate_key: PathBuf,
    /// Trust bundle (the root), for `--ca-bundle` and sidecars.
    pub bundle: PathBuf,
}

/// A TLS serving certificate for DNS names, made by [`Ca::issue_server_cert`]: what the
/// admission webhook presents to the Kubernetes API server. Not an SVID (no URI SAN), so no
/// SPIFFE verifier accepts it as a workload identity.
pub struct ServerCert {
    /// Leaf first, then the signing certificate and its parents below the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's fresh P-256 key (PKCS#8), made here and never written anywhere.
    pub key: PrivateKeyDer<'static>,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
    /// The leaf's serial, lowercase hex.
    pub serial_hex: String,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ServerCert")
            .field("serial_hex", &self.serial_hex)
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The CA's private key. rcgen keeps a PKCS#8 copy of it, wiped when the CA is dropped
/// (ring's own expanded copy is beyond our reach).
struct CaKey(KeyPair);

impl Drop for CaKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl rcgen::PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        rcgen::PublicKeyData::der_bytes(&self.0)
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        rcgen::PublicKeyData::algorithm(&self.0)
    }
}

impl rcgen::SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        rcgen::SigningKey::sign(&self.0, msg)
    }
}

/// A signing CA: key in memory, its chain, and the bundle it chains to.
pub struct Ca {
    trust_domain: TrustDomain,
    bundle: TrustBundle,
    /// Signing certificate's subject and key identifier, and the key.
    issuer: Issuer<'static, CaKey>,
    /// What follows the leaf in an SVID chain: the signing certificate and its parents below
    /// the root. Empty when the signing certificate is itself a root in the bundle.
    chain_tail: Vec<CertificateDer<'static>>,
    /// Earliest notAfter of the signing certificate and the rest of `chain_tail`.
    not_after: SystemTime,
    /// The signing certificate's subject and serial, for logs and status.
    label: String,
}

impl Ca {
    /// The embedded default: loads the CA kept in the registry, or creates a self-signed root
    /// for `td` (P-256, 10 years) and stores it there on first start.
    pub fn load_or_create(registry: &Registry, td: &TrustDomain) -> Result<Self, CaError> {
        let material = match registry.load_ca()? {
            Some(m) => m,
            // If another process stored one meanwhile, use that: one CA per state dir.
            None => registry.store_ca_if_absent(Self::new_root(td, SystemTime::now())?)?,
        };
        Self::from_material(td, &material, registry.path())
    }

    /// A fresh self-signed root for `td` (P-256, 10 years), as storable material. Its common
    /// name carries the creation time, so operators can tell the roots of a rotation apart.
    pub fn new_root(td: &TrustDomain, now: SystemTime) -> Result<CaMaterial, CaError> {
        let (params, key) = ca_params(
            td,
            &ca_common_name("Trellis CA", td, now),
            now,
            ROOT_TTL,
            BasicConstraints::Unconstrained,
        )?;
        let cert = params.self_signed(&key).map_err(sign_err)?;
        let root_pem = cert.pem();
        let material = CaMaterial {
            chain_pem: root_pem.clone(),
            bundle_pem: root_pem,
            key_pem: Zeroizing::new(key.serialize_pem()),
        };
        let mut key = key;
        key.zeroize();
        Ok(material)
    }

    /// Builds a CA from stored material (`source` names where it came from in errors), with
    /// the same checks as [`Ca::from_files`] and a probe issuance.
    pub fn from_material(
        td: &TrustDomain,
        material: &CaMaterial,
        source: &Path,
    ) -> Result<Self, CaError> {
        let invalid = |problem: String| CaError::Invalid {
            path: source.to_path_buf(),
            problem: format!("stored CA: {problem}"),
        };
        let chain = trellis_identity::certs_from_pem(material.chain_pem.as_bytes())
            .map_err(|e| invalid(e.to_string()))?;
        let bundle = TrustBundle::from_pem(td.clone(), material.bundle_pem.as_bytes())
            .map_err(|e| invalid(e.to_string()))?;
        let key = KeyPair::from_pem(&material.key_pem).map_err(|e| invalid(e.to_string()))?;
        let ca = Self::assemble(
            td,
            source,
            source,
            chain,
            bundle,
            CaKey(key),
            SystemTime::now(),
        )?;
        ca.self_check(source)?;
        Ok(ca)
    }

    /// Reads an operator-supplied CA (as [`Ca::from_files`] checks it) into storable material,
    /// for `trellis ca rotate --ca-cert … --ca-key …`.
    pub fn material_from_files(
        td: &TrustDomain,
        cert: &Path,
        key: &Path,
        bundle: Option<&Path>,
    ) -> Result<CaMaterial, CaError> {
        Self::from_files(td, cert, key, bundle)?;
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CaError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let chain_pem = read(cert)?;
        let bundle_pem = match bundle {
            Some(b) => read(b)?,
            None => {
                // from_files accepted the last certificate of `cert` as the root.
                let certs = read_certs(cert)?;
                let last = certs.last().ok_or_else(|| no_pem(cert))?;
                trellis_identity::certs_to_pem(std::slice::from_ref(last))
            }
        };
        Ok(CaMaterial {
            chain_pem,
            bundle_pem,
            key_pem: Zeroizing::new(read(key)?),
        })
    }

    /// Signs with an operator-supplied intermediate. `cert` holds the intermediate (and
    /// optionally its parents); `bundle` the roots (defaults to the last certificate in `cert`
    /// if it is self-signed). Checks: parses, is a CA, key matches, chains to the bundle, valid now.
    pub fn from_files(
        td: &TrustDomain,
        cert: &Path,
        key: &Path,
        bundle: Option<&Path>,
    ) -> Result<Self, CaError> {
        let now = SystemTime::now();
        let certs = read_certs(cert)?;

        // A CA key other local users can read is as good as leaked: refuse it (as ssh refuses
        // such private keys) rather than quietly sign with it.
        let meta = std::fs::metadata(key).map_err(|source| CaError::Read {
            path: key.to_path_buf(),
            source,
        })?;
        // One exception, PostgreSQL's rule for its TLS key ("if owned by root, require 0640
        // or less"): a root-owned key may be readable by its group. That is how Kubernetes
        // mounts a Secret for a non-root pod: root:<fsGroup>, defaultMode plus group read.
        let mode = meta.mode() & 0o7777;
        let root_owned_group_read = meta.uid() == 0 && mode & 0o037 == 0;
        if mode & 0o077 != 0 && !root_owned_group_read {
            return Err(CaError::Invalid {
                path: key.to_path_buf(),
                problem: format!(
                    "mode {mode:04o} is readable by others; run chmod 600 {}",
                    key.display()
                ),
            });
        }
        let key_pem = Zeroizing::new(std::fs::read(key).map_err(|source| CaError::Read {
            path: key.to_path_buf(),
            source,
        })?);
        let key_pair = parse_key(&key_pem, key)?;

        let roots = match bundle {
            Some(path) => {
                TrustBundle::new(td.clone(), read_certs(path)?).map_err(|e| CaError::Invalid {
                    path: path.to_path_buf(),
                    problem: e.to_string(),
                })?
            }
            None => {
                let last = certs.last().ok_or_else(|| no_pem(cert))?;
                if !is_self_signed(last) {
                    return Err(CaError::Invalid {
                        path: cert.to_path_buf(),
                        problem: "no trust bundle: pass the root certificate with --ca-bundle \
                                  (bundle.pem from `trellis ca init`), or append it to this file"
                            .into(),
                    });
                }
                TrustBundle::new(td.clone(), vec![last.clone()]).map_err(|e| CaError::Invalid {
                    path: cert.to_path_buf(),
                    problem: format!("last certificate as trust bundle: {e}"),
                })?
            }
        };
        let ca = Self::assemble(td, cert, key, certs, roots, CaKey(key_pair), now)?;
        ca.self_check(cert)?;
        Ok(ca)
    }

    /// Checks the signing certificate (`chain[0]`) and its parents against `key` and
    /// `bundle`, and builds the CA. `source` and `key_source` name the files in errors.
    fn assemble(
        td: &TrustDomain,
        source: &Path,
        key_source: &Path,
        chain: Vec<CertificateDer<'static>>,
        bundle: TrustBundle,
        key: CaKey,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let invalid = |problem: String| CaError::Invalid {
            path: source.to_path_buf(),
            problem,
        };
        let signing_der = chain.first().ok_or_else(|| no_pem(source))?;
        let signing = parse_cert(signing_der, source)?;

        // X509-SVID spec 4.1: "Signing certificates MUST set the `cA` field to `true`".
        if !is_ca(&signing) {
            return Err(invalid(
                "is not a CA certificate (basicConstraints cA=false): pass the intermediate \
                 made by `trellis ca init`"
                    .into(),
            ));
        }
        // X509-SVID spec 4.3: "SVID signing certificates MUST set `keyCertSign`" (checked when
        // the extension is there; rustls-webpki accepts a CA without it).
        if let Ok(Some(ku)) = signing.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(invalid(
                    "CA certificate lacks the keyCertSign key usage, so it cannot sign SVIDs"
                        .into(),
                ));
            }
        }
        // X509-SVID spec 3.2: "If present, the SPIFFE ID of a signing certificate MUST NOT have
        // a path component, and SHOULD reside in the trust domain of any leaf SVIDs it issues."
        // Anything but our trust domain ID means a CA made for something else.
        let td_id = td.id();
        for uri in uri_sans(&signing) {
            if uri.starts_with("spiffe://") && uri != td_id.as_str() {
                return Err(invalid(format!(
                    "CA certificate is for `{uri}`, not trust domain `{td}`: use the matching \
                     --trust-domain or a CA made for `{td}`"
                )));
            }
        }
        if signing.public_key().subject_public_key.data.as_ref() != key.0.public_key_raw() {
            // Name the key file: the key is what is wrong or was swapped.
            return Err(CaError::Invalid {
                path: key_source.to_path_buf(),
                problem: format!(
                    "private key does not match certificate {}",
                    source.display()
                ),
            });
        }

        // Everything in `chain` that is not a root of the bundle goes after the leaf.
        let roots = bundle.roots();
        let chain_tail: Vec<CertificateDer<'static>> = chain
            .iter()
            .filter(|c| !roots.iter().any(|r| r.as_ref() == c.as_ref()))
            .cloned()
            .collect();

        // Each certificate must be signed by the next one, the last by a bundle root.
        let parsed: Vec<X509Certificate<'_>> = chain_tail
            .iter()
            .map(|c| parse_cert(c, source))
            .collect::<Result<_, _>>()?;
        let now_s = unix(now);
        let mut not_after = signing.validity().not_after.timestamp();
        for (i, c) in parsed.iter().enumerate() {
            if i > 0 && !is_ca(c) {
                return Err(invalid(format!(
                    "certificate {} in the file is not a CA certificate",
                    i + 1
                )));
            }
            let (nb, na) = (
                c.validity().not_before.timestamp(),
                c.validity().not_after.timestamp(),
            );
            if now_s < nb || now_s > na {
                return Err(invalid(format!(
                    "certificate {} ({}) is not valid now: valid from {} to {}",
                    i + 1,
                    c.subject(),
                    fmt_unix(nb),
                    fmt_unix(na)
                )));
            }
            not_after = not_after.min(na);
            let signed_by_parent = match parsed.get(i + 1) {
                Some(parent) => {
                    c.issuer().as_raw() == parent.subject().as_raw()
                        && c.verify_signature(Some(parent.public_key())).is_ok()
                }
                None => roots.iter().any(|r| {
                    parse_cert(r, source).is_ok_and(|root| {
                        c.issuer().as_raw() == root.subject().as_raw()
                            && c.verify_signature(Some(root.public_key())).is_ok()
                    })
                }),
            };
            if !signed_by_parent {
                return Err(invalid(format!(
                    "certificate {} ({}) does not chain to the trust bundle: its issuer is {}; \
                     pass the bundle.pem that goes with this CA",
                    i + 1,
                    c.subject(),
                    c.issuer()
                )));
            }
        }
        // The signing certificate is a bundle root (embedded default): check it is in date.
        if chain_tail.is_empty() {
            let (nb, na) = (
                signing.validity().not_before.timestamp(),
                signing.validity().not_after.timestamp(),
            );
            if now_s < nb || now_s > na {
                return Err(invalid(format!(
                    "CA certificate is not valid now: valid from {} to {}",
                    fmt_unix(nb),
                    fmt_unix(na)
                )));
            }
        }

        let label = format!(
            "{} (serial {})",
            signing.subject(),
            signing.raw_serial_as_string().replace(':', "")
        );
        let issuer = Issuer::from_ca_cert_der(signing_der, key)
            .map_err(|e| invalid(format!("cannot use as issuer: {e}")))?;
        Ok(Self {
            trust_domain: td.clone(),
            bundle,
            issuer,
            chain_tail,
            not_after: from_unix(not_after),
            label,
        })
    }

    /// Issues a probe SVID and verifies it against the bundle the way every peer will
    /// (rustls-webpki): catches what the field checks above cannot (name chaining, path
    /// length, name constraints) at start rather than at the first handshake.
    fn self_check(&self, source: &Path) -> Result<(), CaError> {
        let probe = SpiffeId::from_parts(&self.trust_domain, "/trellis/ca-self-check")
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let now = SystemTime::now();
        let svid = self.issue(&probe, Duration::from_secs(300), now)?;
        trellis_identity::verify_svid_chain(svid.chain(), &self.bundle, now, Usage::Either)
            .map_err(|e| CaError::Invalid {
                path: source.to_path_buf(),
                problem: format!("an SVID signed by this CA does not verify: {e}"),
            })?;
        Ok(())
    }

    /// `trellis ca init`: an offline root and an intermediate under `out` (keys 0600, dir 0700).
    pub fn init_offline(td: &TrustDomain, out: &Path) -> Result<OfflineCaFiles, CaError> {
        Self::init_with_root(td, out, None)
    }

    /// `trellis ca init --root-cert … --root-key …`: a new intermediate signed by an existing
    /// offline root (to rotate the intermediate without changing the trust bundle). The root
    /// is copied to `out` as `root.pem` and `bundle.pem`; its key is not copied.
    pub fn init_intermediate(
        td: &TrustDomain,
        out: &Path,
        root_cert: &Path,
        root_key: &Path,
    ) -> Result<OfflineCaFiles, CaError> {
        Self::init_with_root(td, out, Some((root_cert, root_key)))
    }

    fn init_with_root(
        td: &TrustDomain,
        out: &Path,
        existing_root: Option<(&Path, &Path)>,
    ) -> Result<OfflineCaFiles, CaError> {
        let files = OfflineCaFiles {
            root_cert: out.join("root.pem"),
            root_key: out.join("root-key.pem"),
            intermediate_cert: out.join("intermediate.pem"),
            intermediate_key: out.join("intermediate-key.pem"),
            bundle: out.join("bundle.pem"),
        };
        let all = [
            &files.root_cert,
            &files.root_key,
            &files.intermediate_cert,
            &files.intermediate_key,
            &files.bundle,
        ];
        // Check all first, so a refusal writes nothing.
        for p in all {
            if p.symlink_metadata().is_ok() {
                return Err(CaError::Invalid {
                    path: p.clone(),
                    problem: "already exists; refusing to overwrite a CA file (move it away or \
                              choose another --out)"
                        .into(),
                });
            }
        }

        let now = SystemTime::now();
        // The root: made here, or read (and checked) from the operator's files.
        let (root_pem, root_issuer, root_not_after, new_root_key) = match existing_root {
            None => {
                let (root_params, root_key) = ca_params(
                    td,
                    &ca_common_name("Trellis Root CA", td, now),
                    now,
                    ROOT_TTL,
                    BasicConstraints::Unconstrained,
                )?;
                let root_cert = root_params.self_signed(&root_key).map_err(sign_err)?;
                let not_after = root_params.not_after;
                let key_pem = Zeroizing::new(root_key.serialize_pem());
                let issuer =
                    Issuer::from_ca_cert_der(root_cert.der(), CaKey(root_key)).map_err(sign_err)?;
                (root_cert.pem(), issuer, not_after, Some(key_pem))
            }
            Some((cert_path, key_path)) => {
                let certs = read_certs(cert_path)?;
                let [root_der] = certs.as_slice() else {
                    return Err(CaError::Invalid {
                        path: cert_path.to_path_buf(),
                        problem: format!(
                            "expected exactly one certificate (the root), found {}",
                            certs.len()
                        ),
                    });
                };
                let root = parse_cert(root_der, cert_path)?;
                if !is_ca(&root) || !is_self_signed(root_der) {
                    return Err(CaError::Invalid {
                        path: cert_path.to_path_buf(),
                        problem: "is not a self-signed CA certificate: pass root.pem from \
                                  `trellis ca init`"
                            .into(),
                    });
                }
                let key_pem =
                    Zeroizing::new(std::fs::read(key_path).map_err(|source| CaError::Read {
                        path: key_path.to_path_buf(),
                        source,
                    })?);
                let key = parse_key(&key_pem, key_path)?;
                if root.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                    return Err(CaError::Invalid {
                        path: key_path.to_path_buf(),
                        problem: format!(
                            "private key does not match certificate {}",
                            cert_path.display()
                        ),
                    });
                }
                let not_after =
                    OffsetDateTime::from(from_unix(root.validity().not_after.timestamp()));
                let issuer = Issuer::from_ca_cert_der(root_der, CaKey(key)).map_err(|e| {
                    CaError::Invalid {
                        path: cert_path.to_path_buf(),
                        problem: format!("cannot use as issuer: {e}"),
                    }
                })?;
                let pem = trellis_identity::certs_to_pem(std::slice::from_ref(root_der));
                (pem, issuer, not_after, None)
            }
        };
        // pathLen 0: the intermediate signs leaves only.
        let (mut int_params, int_key) = ca_params(
            td,
            &ca_common_name("Trellis Intermediate CA", td, now),
            now,
            INTERMEDIATE_TTL,
            BasicConstraints::Constrained(0),
        )?;
        int_params.use_authority_key_identifier_extension = true;
        int_params.not_after = int_params.not_after.min(root_not_after);
        let int_cert = int_params
            .signed_by(&int_key, &root_issuer)
            .map_err(sign_err)?;
        drop(root_issuer);

        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out)
            .map_err(|source| CaError::Write {
                path: out.to_path_buf(),
                source,
            })?;
        let int_key_pem = Zeroizing::new(int_key.serialize_pem());
        if let Some(root_key_pem) = &new_root_key {
            write_new(&files.root_key, root_key_pem.as_bytes(), 0o600)?;
        }
        write_new(&files.intermediate_key, int_key_pem.as_bytes(), 0o600)?;
        write_new(&files.root_cert, root_pem.as_bytes(), 0o644)?;
        write_new(&files.intermediate_cert, int_cert.pem().as_bytes(), 0o644)?;
        write_new(&files.bundle, root_pem.as_bytes(), 0o644)?;
        let mut ik = int_key;
        ik.zeroize();
        Ok(files)
    }

    /// The trust domain this CA issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The bundle that verifies what this CA issues.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The signing certificate's notAfter (or an earlier one of its parents below the root).
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The signing certificate's subject and serial (`CN=…, O=Trellis (serial 4f…)`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Issues an SVID for `id` with a fresh P-256 key made here, valid from one minute before
    /// `now` (clock skew) until `now + ttl`, capped at the CA's own expiry.
    /// Chain: leaf, then the signing certificate (and its parents below the root).
    pub fn issue(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<Svid, CaError> {
        let mut key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let params = self.leaf_params(id, ttl, now)?;
        let leaf = params.signed_by(&key, &self.issuer).map_err(sign_err)?;
        let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        key.zeroize();
        Svid::new(self.chain_with(leaf.into()), key_der)
            .map_err(|e| CaError::Sign(format!("issued SVID fails its own checks: {e}")))
    }

    /// Signs a PKCS#10 CSR (PEM) for `id` with the same leaf profile as [`Ca::issue`]; the
    /// caller keeps its private key. Refused unless the CSR's self-signature verifies, its
    /// key is ECDSA P-256, and it asks for no SAN but `id` and no CA rights. Whatever else
    /// the CSR asks for (subject, key usages, EKUs) is ignored: the profile is ours.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::BadCsr(format!(
                "`{id}` is not in trust domain `{}`",
                self.trust_domain
            )));
        }
        // rcgen verifies the CSR's self-signature while parsing (proof the caller holds the
        // key) and refuses extensions it does not know.
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let requested = &csr.params;
        // X509-SVID spec 4.1: "leaf certificates MUST set the `cA` field to `false`".
        if matches!(requested.is_ca, IsCa::Ca(_))
            || requested
                .key_usages
                .iter()
                .any(|u| matches!(u, KeyUsagePurpose::KeyCertSign | KeyUsagePurpose::CrlSign))
        {
            return Err(CaError::BadCsr("CSR asks for CA rights".into()));
        }
        // X509-SVID spec 2: "An X.509 SVID MUST contain exactly one URI SAN".
        for san in &requested.subject_alt_names {
            match san {
                SanType::URI(uri) if uri.as_str() == id.as_str() => {}
                other => {
                    return Err(CaError::BadCsr(format!(
                        "CSR asks for {other:?}; only the URI SAN `{id}` may be requested"
                    )))
                }
            }
        }
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256
            || !is_p256_point(rcgen::PublicKeyData::der_bytes(&csr.public_key))
        {
            return Err(CaError::BadCsr(
                "CSR key must be ECDSA P-256 (signed with ecdsa-with-SHA256)".into(),
            ));
        }
        let params = self.leaf_params(id, ttl, now)?;
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(sign_err)?;
        let chain = self.chain_with(leaf.into());
        // Same check `issue` gets from `Svid::new`, minus the key (which we never see).
        let facts = trellis_identity::cert_facts(&chain[0])
            .map_err(|e| CaError::Sign(format!("issued certificate: {e}")))?;
        facts
            .leaf_spiffe_id()
            .map_err(|e| CaError::Sign(format!("issued certificate: {e}")))?;
        Ok(chain)
    }

    /// Issues a TLS server certificate for `dns_names` (the admission webhook's serving
    /// certificate, which the Kubernetes API server verifies against the `caBundle` of the
    /// webhook configuration, i.e. this CA's bundle, by DNS name). A fresh P-256 key; DNS SANs
    /// only; `cA=false`; key usage `digitalSignature`; EKU `serverAuth` only (it never
    /// authenticates a client); valid from one minute before `now` until `now + ttl`, capped
    /// at the CA's own expiry, like an SVID.
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<ServerCert, CaError> {
        let first = dns_names
            .first()
            .ok_or_else(|| CaError::Sign("a server certificate needs a DNS name".into()))?;
        let mut sans = Vec::with_capacity(dns_names.len());
        for name in dns_names {
            // RFC 5280 4.2.1.6: a dNSName is in the "preferred name syntax"; rustls checks it
            // the same way when it verifies, so refuse here what no client could match.
            rustls::pki_types::DnsName::try_from(name.as_str())
                .map_err(|_| CaError::Sign(format!("`{name}` is not a valid DNS name")))?;
            sans.push(SanType::DnsName(
                name.as_str()
                    .try_into()
                    .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
            ));
        }
        let not_before = whole_seconds(now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH));
        let not_after =
            whole_seconds(now.checked_add(ttl).unwrap_or(self.not_after)).min(self.not_after);
        if not_after <= now {
            return Err(CaError::Sign(format!(
                "the signing certificate expires at {}: renew the CA",
                fmt_unix(unix(self.not_after))
            )));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // Clients match the SANs (Go ignores the CN since 1.15); the CN only helps people
        // reading `openssl s_client` output.
        dn.push(DnType::CommonName, first.as_str());
        dn.push(DnType::OrganizationName, "Trellis");
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.use_authority_key_identifier_extension = true;

        let mut key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let leaf = params.signed_by(&key, &self.issuer).map_err(sign_err)?;
        let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        key.zeroize();
        let chain = self.chain_with(leaf.into());
        let facts = trellis_identity::cert_facts(&chain[0])
            .map_err(|e| CaError::Sign(format!("issued server certificate: {e}")))?;
        Ok(ServerCert {
            chain,
            key: key_der,
            not_after: facts.not_after,
            serial_hex: facts.serial_hex,
        })
    }

    fn chain_with(&self, leaf: CertificateDer<'static>) -> Vec<CertificateDer<'static>> {
        let mut chain = Vec::with_capacity(1 + self.chain_tail.len());
        chain.push(leaf);
        chain.extend(self.chain_tail.iter().cloned());
        chain
    }

    /// The X509-SVID leaf profile.
    fn leaf_params(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<CertificateParams, CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::Sign(format!(
                "`{id}` is not in trust domain `{}`",
                self.trust_domain
            )));
        }
        let not_before = whole_seconds(now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH));
        let not_after =
            whole_seconds(now.checked_add(ttl).unwrap_or(self.not_after)).min(self.not_after);
        if not_after <= now {
            return Err(CaError::Sign(format!(
                "the signing certificate expires at {}: renew the CA",
                fmt_unix(unix(self.not_after))
            )));
        }
        let mut params = CertificateParams::default();
        // No CN: the identity lives in the URI SAN only. A fixed O keeps the subject non-empty
        // for tools that mishandle empty subjects.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
        )];
        // X509-SVID spec 4.1: "leaf certificates MUST set the `cA` field to `false`";
        // ExplicitNoCa writes basicConstraints (critical) with cA=false.
        params.is_ca = IsCa::ExplicitNoCa;
        // X509-SVID spec 4.3: "Leaf SVIDs MUST set `digitalSignature`" and "MUST NOT set
        // `keyCertSign` or `cRLSign`"; rcgen marks the extension critical ("MUST be marked
        // critical").
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

/// `<kind> <td> <creation time> <8 random hex>`: operators tell the CAs of a rotation apart by
/// name, and two CAs made in the same second still get different subjects (certificate paths
/// are built by matching issuer and subject names).
fn ca_common_name(kind: &str, td: &TrustDomain, now: SystemTime) -> String {
    let mut tag = [0u8; 4];
    rand::rng().fill_bytes(&mut tag);
    format!(
        "{kind} {td} {} {}",
        humantime::format_rfc3339_seconds(now),
        hex::encode(tag)
    )
}

/// Parameters and a fresh P-256 key for a CA certificate of `td`.
fn ca_params(
    td: &TrustDomain,
    common_name: &str,
    now: SystemTime,
    ttl: Duration,
    constraints: BasicConstraints,
) -> Result<(CertificateParams, KeyPair), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Trellis");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // X509-SVID spec 3.2: "A signing certificate SHOULD itself be an SVID", its SPIFFE ID
    // without a path: the trust domain ID.
    params.subject_alt_names = vec![SanType::URI(
        td.id()
            .as_str()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
    )];
    params.serial_number = Some(random_serial());
    params.not_before = OffsetDateTime::from(whole_seconds(
        now.checked_sub(CLOCK_SKEW).unwrap_or(UNIX_EPOCH),
    ));
    params.not_after = OffsetDateTime::from(whole_seconds(now + ttl));
    Ok((params, key))
}

/// 16 random bytes, top bit clear so the DER INTEGER is positive and stays 16 bytes
/// (RFC 5280 4.1.2.2: positive, at most 20 octets).
fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[0] &= 0x7f;
    if b[0] == 0 {
        b[0] = 1;
    }
    SerialNumber::from_slice(&b)
}

fn sign_err(e: rcgen::Error) -> CaError {
    CaError::Sign(e.to_string())
}

fn no_pem(path: &Path) -> CaError {
    CaError::Invalid {
        path: path.to_path_buf(),
        problem: "expected a PEM CERTIFICATE block".into(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let bytes = std::fs::read(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = trellis_identity::certs_from_pem(&bytes).map_err(|e| CaError::Invalid {
        path: path.to_path_buf(),
        problem: format!("expected a PEM CERTIFICATE block: {e}"),
    })?;
    for c in &certs {
        parse_cert(c, path)?;
    }
    Ok(certs)
}

fn parse_key(pem: &[u8], path: &Path) -> Result<KeyPair, CaError> {
    let invalid = |problem: String| CaError::Invalid {
        path: path.to_path_buf(),
        problem,
    };
    let der = trellis_identity::key_from_pem(pem)
        .map_err(|e| invalid(format!("expected a PEM PRIVATE KEY block: {e}")))?;
    if !matches!(der, PrivateKeyDer::Pkcs8(_)) {
        return Err(invalid(format!(
            "key is not PKCS#8; convert it: openssl pkcs8 -topk8 -nocrypt -in {0} -out {0}.p8",
            path.display()
        )));
    }
    KeyPair::try_from(&der).map_err(|e| {
        invalid(format!(
            "unusable private key ({e}); expected ECDSA P-256/P-384 or RSA"
        ))
    })
}

fn parse_cert<'a>(
    der: &'a CertificateDer<'_>,
    path: &Path,
) -> Result<X509Certificate<'a>, CaError> {
    x509_parser::parse_x509_certificate(der.as_ref())
        .map(|(_, c)| c)
        .map_err(|e| CaError::Invalid {
            path: path.to_path_buf(),
            problem: format!("certificate is not valid X.509: {e}"),
        })
}

fn is_ca(c: &X509Certificate<'_>) -> bool {
    matches!(c.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

fn is_self_signed(der: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(der.as_ref()).is_ok_and(|(_, c)| {
        c.subject().as_raw() == c.issuer().as_raw() && c.verify_signature(None).is_ok()
    })
}

fn uri_sans<'a>(c: &'a X509Certificate<'_>) -> Vec<&'a str> {
    match c.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// An uncompressed SEC1 point of P-256 size. With the CSR's ecdsa-with-SHA256 signature
/// already verified by ring under the SPKI's own curve, a 65-byte point means P-256 (a P-384
/// point is 97 bytes).
fn is_p256_point(raw: &[u8]) -> bool {
    raw.len() == 65 && raw[0] == 0x04
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(contents).map_err(err)?;
    f.sync_all().map_err(err)
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    from_unix(unix(t))
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn from_unix(s: i64) -> SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::from_secs(s.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(s.unsigned_abs())
    }
}

fn fmt_unix(s: i64) -> String {
    OffsetDateTime::from_unix_timestamp(s)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| s.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};

    const DAY: Duration = Duration::from_secs(86_400);

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://example.org/ns/prod/sa/web").unwrap()
    }

    fn default_ca() -> (tempfile::TempDir, Registry, Ca) {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("trellis.db")).unwrap();
        let ca = Ca::load_or_create(&reg, &td()).unwrap();
        (dir, reg, ca)
    }

    /// A root that expires `life` from now, signing directly (like the embedded default).
    fn short_lived_ca(life: Duration) -> Ca {
        let now = SystemTime::now();
        let (mut params, key) =
            ca_params(&td(), "short", now, DAY, BasicConstraints::Unconstrained).unwrap();
        params.not_after = OffsetDateTime::from(whole_seconds(now + life));
        let cert = params.self_signed(&key).unwrap();
        let bundle = TrustBundle::new(td(), vec![cert.der().clone()]).unwrap();
        let p = Path::new("test");
        Ca::assemble(
            &td(),
            p,
            p,
            vec![cert.der().clone()],
            bundle,
            CaKey(key),
            now,
        )
        .unwrap()
    }

    fn parse<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
        x509_parser::parse_x509_certificate(der.as_ref()).unwrap().1
    }

    #[test]
    fn key_mode_rule_allows_group_read_only_for_root_owned_keys() {
        let dir = tempfile::tempdir().unwrap();
        let files = Ca::init_offline(&td(), &dir.path().join("ca")).unwrap();
        let key = &files.intermediate_key;
        let load = |mode: u32| {
            std::fs::set_permissions(key, std::os::unix::fs::PermissionsExt::from_mode(mode))
                .unwrap();
            Ca::from_files(&td(), &files.intermediate_cert, key, Some(&files.bundle))
        };
        let root_owned = std::fs::metadata(key).unwrap().uid() == 0;
        assert!(load(0o600).is_ok());
        assert!(load(0o400).is_ok());
        // Kubernetes' Secret volume with fsGroup: root:<fsGroup> 0440 (root-owned only when
        // the tests run as root, as in CI).
        assert_eq!(load(0o440).is_ok(), root_owned);
        assert_eq!(load(0o640).is_ok(), root_owned);
        for mode in [0o644, 0o604, 0o660, 0o650] {
            let err = load(mode).err().unwrap().to_string();
            assert!(err.contains("readable by others"), "{mode:o}: {err}");
        }
    }

    #[test]
    fn svid_has_exactly_one_uri_san_equal_to_the_id() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        let leaf = parse(&svid.chain()[0]);
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://example.org/ns/prod/sa/web")]
        );
        assert_eq!(svid.spiffe_id(), &id());
        // No CN: the identity lives only in the URI SAN.
        assert_eq!(leaf.subject().iter_common_name().count(), 0);
    }

    #[test]
    fn svid_is_not_a_ca_and_says_so_critically() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        let leaf = parse(&svid.chain()[0]);
        let bc = leaf.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        assert!(bc.critical);
    }

    #[test]
    fn svid_key_usage_is_digital_signature_only() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        let leaf = parse(&svid.chain()[0]);
        let ku = leaf.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign());
        assert!(!ku.value.crl_sign());
        assert!(!ku.value.key_encipherment());
    }

    #[test]
    fn svid_has_server_and_client_auth() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        let leaf = parse(&svid.chain()[0]);
        let eku = leaf.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
        assert!(!eku.value.any);
    }

    #[test]
    fn svid_key_is_p256() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        let leaf = parse(&svid.chain()[0]);
        let spki = leaf.public_key();
        assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        assert_eq!(
            spki.algorithm
                .parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap(),
            OID_EC_P256
        );
        let PrivateKeyDer::Pkcs8(k) = svid.key() else {
            panic!("key is not PKCS#8")
        };
        let kp = KeyPair::try_from(k.secret_pkcs8_der()).unwrap();
        assert_eq!(kp.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    }

    #[test]
    fn svid_times_and_serial() {
        let (_d, _r, ca) = default_ca();
        let now = SystemTime::now();
        let a = ca.issue(&id(), DAY, now).unwrap();
        let b = ca.issue(&id(), DAY, now).unwrap();
        assert_eq!(a.not_before(), whole_seconds(now - CLOCK_SKEW));
        assert_eq!(a.not_after(), whole_seconds(now + DAY));
        let leaf = parse(&a.chain()[0]);
        assert_eq!(leaf.raw_serial().len(), 16);
        assert!(leaf.raw_serial()[0] & 0x80 == 0, "serial must be positive");
        assert_ne!(a.serial_hex(), b.serial_hex());
    }

    #[test]
    fn default_chain_is_the_leaf_and_bundle_is_the_root() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        assert_eq!(svid.chain().len(), 1);
        assert_eq!(ca.bundle().roots().len(), 1);
        let root = parse(&ca.bundle().roots()[0]);
        assert!(root
            .subject()
            .to_string()
            .contains("CN=Trellis CA example.org"));
        assert_eq!(uri_sans(&root), vec!["spiffe://example.org"]);
        let bc = root.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca && bc.path_len_constraint.is_none());
        let ku = root.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && ku.digital_signature());
        let life = root.validity().not_after.timestamp() - root.validity().not_before.timestamp();
        assert!(life >= 3650 * 86_400, "root lives {life} s");
    }

    #[test]
    fn svid_verifies_against_bundle() {
        let (_d, _r, ca) = default_ca();
        let now = SystemTime::now();
        let svid = ca.issue(&id(), DAY, now).unwrap();
        for usage in [Usage::Server, Usage::Client] {
            let got =
                trellis_identity::verify_svid_chain(svid.chain(), ca.bundle(), now, usage).unwrap();
            assert_eq!(got, id());
        }
        svid.verify(ca.bundle(), now).unwrap();
    }

    #[test]
    fn svid_not_after_capped_at_ca_expiry() {
        let ca = short_lived_ca(Duration::from_secs(3600));
        let now = SystemTime::now();
        let svid = ca.issue(&id(), DAY, now).unwrap();
        assert_eq!(svid.not_after(), ca.not_after());
        assert!(svid.not_after() < now + DAY);
    }

    #[test]
    fn refuses_to_issue_after_ca_expiry() {
        let ca = short_lived_ca(Duration::from_secs(3600));
        let later = SystemTime::now() + 2 * DAY;
        let err = ca.issue(&id(), DAY, later).unwrap_err();
        assert!(err.to_string().contains("renew the CA"), "{err}");
    }

    #[test]
    fn refuses_to_issue_for_other_trust_domain() {
        let (_d, _r, ca) = default_ca();
        let other = SpiffeId::parse("spiffe://evil.org/ns/a/sa/b").unwrap();
        let err = ca.issue(&other, DAY, SystemTime::now()).unwrap_err();
        assert!(err.to_string().contains("not in trust domain"), "{err}");
    }

    #[test]
    fn ca_reused_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        let first = {
            let reg = Registry::open(&path).unwrap();
            Ca::load_or_create(&reg, &td()).unwrap().bundle().to_pem()
        };
        let reg = Registry::open(&path).unwrap();
        let ca = Ca::load_or_create(&reg, &td()).unwrap();
        assert_eq!(ca.bundle().to_pem(), first);
        // And the reloaded key still signs for that root.
        let now = SystemTime::now();
        ca.issue(&id(), DAY, now)
            .unwrap()
            .verify(ca.bundle(), now)
            .unwrap();
    }

    #[test]
    fn stored_ca_for_other_trust_domain_is_refused() {
        let (_d, reg, _ca) = default_ca();
        let other = TrustDomain::parse("other.org").unwrap();
        let err = Ca::load_or_create(&reg, &other).err().unwrap().to_string();
        assert!(err.contains("trellis.db"), "{err}");
        assert!(err.contains("not trust domain `other.org`"), "{err}");
    }

    fn csr_for(params: CertificateParams, key: &KeyPair) -> String {
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri_params(uris: &[&str]) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p
    }

    #[test]
    fn sign_csr_issues_for_the_csr_key() {
        let (_d, _r, ca) = default_ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = csr_for(uri_params(&[id().as_str()]), &key);
        let now = SystemTime::now();
        let chain = ca.sign_csr(&csr, &id(), DAY, now).unwrap();
        let leaf = parse(&chain[0]);
        assert_eq!(
            leaf.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
        let svid = Svid::new(
            chain.clone(),
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        svid.verify(ca.bundle(), now).unwrap();
        // A CSR without SANs gets the ID too.
        let bare = csr_for(CertificateParams::default(), &key);
        let chain = ca.sign_csr(&bare, &id(), DAY, now).unwrap();
        assert_eq!(uri_sans(&parse(&chain[0])), vec![id().as_str()]);
    }

    #[test]
    fn sign_csr_rejects_other_uri_san() {
        let (_d, _r, ca) = default_ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = csr_for(
            uri_params(&["spiffe://example.org/ns/kube-system/sa/admin"]),
            &key,
        );
        let err = ca
            .sign_csr(&csr, &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
    }

    #[test]
    fn sign_csr_rejects_extra_dns_san() {
        let (_d, _r, ca) = default_ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = uri_params(&[id().as_str()]);
        p.subject_alt_names
            .push(SanType::DnsName("example.com".try_into().unwrap()));
        let err = ca
            .sign_csr(&csr_for(p, &key), &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
    }

    #[test]
    fn sign_csr_rejects_ca_request() {
        let (_d, _r, ca) = default_ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = uri_params(&[id().as_str()]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let err = ca
            .sign_csr(&csr_for(p, &key), &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("CA rights"), "{err}");
        let mut p = uri_params(&[id().as_str()]);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let err = ca
            .sign_csr(&csr_for(p, &key), &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("CA rights"), "{err}");
    }

    #[test]
    fn sign_csr_rejects_bad_self_signature() {
        let (_d, _r, ca) = default_ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = uri_params(&[id().as_str()])
            .serialize_request(&key)
            .unwrap();
        let mut der = csr.der().to_vec();
        let last = der.len() - 1;
        der[last] ^= 0x01; // flip a bit of the signature
        let pem = pem_block("CERTIFICATE REQUEST", &der);
        let err = ca
            .sign_csr(&pem, &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
    }

    #[test]
    fn sign_csr_rejects_p384_key() {
        let (_d, _r, ca) = default_ca();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let csr = csr_for(uri_params(&[id().as_str()]), &key);
        let err = ca
            .sign_csr(&csr, &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("P-256"), "{err}");
    }

    #[test]
    fn sign_csr_rejects_garbage() {
        let (_d, _r, ca) = default_ca();
        let err = ca
            .sign_csr("not a csr", &id(), DAY, SystemTime::now())
            .unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
    }

    fn pem_block(label: &str, der: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    #[test]
    fn leaf_has_no_unexpected_extensions() {
        let (_d, _r, ca) = default_ca();
        let svid = ca.issue(&id(), DAY, SystemTime::now()).unwrap();
        let leaf = parse(&svid.chain()[0]);
        for ext in leaf.iter_extensions() {
            assert!(
                matches!(
                    ext.parsed_extension(),
                    ParsedExtension::SubjectAlternativeName(_)
                        | ParsedExtension::KeyUsage(_)
                        | ParsedExtension::ExtendedKeyUsage(_)
                        | ParsedExtension::BasicConstraints(_)
                        | ParsedExtension::SubjectKeyIdentifier(_)
                        | ParsedExtension::AuthorityKeyIdentifier(_)
                ),
                "unexpected extension {}",
                ext.oid
            );
        }
    }

    fn webpki_verify(
        chain: &[CertificateDer<'static>],
        bundle: &TrustBundle,
        name: &str,
    ) -> Result<(), rustls::Error> {
        use rustls::client::danger::ServerCertVerifier as _;
        let mut roots = rustls::RootCertStore::empty();
        for r in bundle.roots() {
            roots.add(r.clone()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .map(|_| ())
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn server_cert_verifies_by_dns_name_against_the_bundle() {
        let (_d, _r, ca) = default_ca();
        let dns = names(&[
            "trellis-control.trellis-system.svc",
            "trellis-control.trellis-system.svc.cluster.local",
        ]);
        let cert = ca.issue_server_cert(&dns, DAY, SystemTime::now()).unwrap();
        for name in &dns {
            webpki_verify(&cert.chain, ca.bundle(), name).unwrap();
        }
        let err = webpki_verify(&cert.chain, ca.bundle(), "evil.example.com").unwrap_err();
        assert!(format!("{err:?}").contains("NotValidForName"), "{err:?}");
    }

    #[test]
    fn server_cert_under_an_intermediate_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let files = Ca::init_offline(&td(), &dir.path().join("ca")).unwrap();
        let ca = Ca::from_files(
            &td(),
            &files.intermediate_cert,
            &files.intermediate_key,
            Some(&files.bundle),
        )
        .unwrap();
        let cert = ca
            .issue_server_cert(&names(&["webhook.example"]), DAY, SystemTime::now())
            .unwrap();
        assert_eq!(cert.chain.len(), 2, "leaf + intermediate");
        webpki_verify(&cert.chain, ca.bundle(), "webhook.example").unwrap();
    }

    #[test]
    fn server_cert_profile_is_server_auth_only_with_dns_sans() {
        let (_d, _r, ca) = default_ca();
        let now = SystemTime::now();
        let cert = ca
            .issue_server_cert(&names(&["a.example", "b.example"]), DAY, now)
            .unwrap();
        let leaf = parse(&cert.chain[0]);
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        let dns: Vec<&str> = san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => *d,
                other => panic!("unexpected SAN {other:?}"),
            })
            .collect();
        assert_eq!(dns, ["a.example", "b.example"]);
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!leaf.is_ca());
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        assert_eq!(cert.serial_hex.len(), 32);
        let life = cert.not_after.duration_since(now).unwrap();
        assert!(
            life <= DAY && life > DAY - Duration::from_secs(2),
            "{life:?}"
        );
        // Not an SVID: a SPIFFE verifier refuses it.
        assert!(
            trellis_identity::verify_svid_chain(&cert.chain, ca.bundle(), now, Usage::Either)
                .is_err()
        );
        assert!(!format!("{cert:?}").contains("PRIVATE"));
    }

    #[test]
    fn server_cert_capped_at_ca_expiry_and_refused_after() {
        let ca = short_lived_ca(Duration::from_secs(3600));
        let cert = ca
            .issue_server_cert(&names(&["a.example"]), DAY, SystemTime::now())
            .unwrap();
        assert!(cert.not_after <= ca.not_after());
        let later = SystemTime::now() + 2 * DAY;
        let err = ca
            .issue_server_cert(&names(&["a.example"]), DAY, later)
            .unwrap_err();
        assert!(err.to_string().contains("renew the CA"), "{err}");
    }

    #[test]
    fn server_cert_refuses_bad_or_missing_names() {
        let (_d, _r, ca) = default_ca();
        let now = SystemTime::now();
        assert!(ca.issue_server_cert(&[], DAY, now).is_err());
        for bad in ["", "has space.example", "under_score..example", "a/b"] {
            let err = ca.issue_server_cert(&names(&[bad]), DAY, now).unwrap_err();
            assert!(
                err.to_string().contains("not a valid DNS name"),
                "{bad}: {err}"
            );
        }
    }
}
