//! Where a CA comes from: the embedded default (a self-signed root kept in the registry,
//! [`Ca::load_or_create`]), an operator's intermediate read from files ([`Ca::from_files`]),
//! and `trellis ca init` ([`Ca::init_offline`]), each checked before it signs anything.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use trellis_identity::{CertificateDer, PrivateKeyDer, SpiffeId, TrustBundle, TrustDomain, Usage};
use trellis_serve::time::{
    from_unix_seconds as from_unix, rfc3339_unix as fmt_unix, unix_seconds as unix,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use zeroize::{Zeroize as _, Zeroizing};

use crate::keys::{Keyring, Pkcs11Uri, SigningKey};
use crate::registry::{CaMaterial, Registry};

use super::{
    is_ca, random_serial, sign_err, whole_seconds, Ca, CaError, OfflineCaFiles, CLOCK_SKEW,
};

/// Lifetime of a root made here (embedded default and `trellis ca init`).
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the intermediate made by `trellis ca init`.
const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
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
        Self::from_material_with(td, material, source, &Keyring::default())
    }

    /// [`Ca::from_material`] for material whose key may be a PKCS#11 URI (a rotation to a
    /// token key stores the URI, never the key): `keys` opens it.
    pub fn from_material_with(
        td: &TrustDomain,
        material: &CaMaterial,
        source: &Path,
        keys: &Keyring,
    ) -> Result<Self, CaError> {
        let invalid = |problem: String| CaError::Invalid {
            path: source.to_path_buf(),
            problem: format!("stored CA: {problem}"),
        };
        let chain = trellis_identity::certs_from_pem(material.chain_pem.as_bytes())
            .map_err(|e| invalid(e.to_string()))?;
        let bundle = TrustBundle::from_pem(td.clone(), material.bundle_pem.as_bytes())
            .map_err(|e| invalid(e.to_string()))?;
        let key = match keys.stored(&material.key_pem) {
            Ok(k) => k,
            // Token problems (PIN, missing object) say what to fix on their own.
            Err(e @ crate::keys::KeyError::Software(_)) => return Err(invalid(e.to_string())),
            Err(e) => return Err(e.into()),
        };
        let ca = Self::assemble(td, source, source, chain, bundle, key, SystemTime::now())?;
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
        let (chain_pem, bundle_pem) = cert_material(cert, bundle)?;
        let key_pem =
            Zeroizing::new(
                std::fs::read_to_string(key).map_err(|source| CaError::Read {
                    path: key.to_path_buf(),
                    source,
                })?,
            );
        Ok(CaMaterial {
            chain_pem,
            bundle_pem,
            key_pem,
        })
    }

    /// Rotation material for an intermediate whose key is in a PKCS#11 token: the database
    /// keeps the URI, never the key. With `keys`, checked here as [`Ca::from_token`] does;
    /// without (the operator has no module at hand), the control plane checks it.
    pub fn material_from_token(
        td: &TrustDomain,
        cert: &Path,
        uri: &Pkcs11Uri,
        bundle: Option<&Path>,
        keys: Option<&Keyring>,
    ) -> Result<CaMaterial, CaError> {
        if let Some(keys) = keys {
            Self::from_token(td, cert, uri, bundle, keys)?;
        }
        let (chain_pem, bundle_pem) = cert_material(cert, bundle)?;
        Ok(CaMaterial {
            chain_pem,
            bundle_pem,
            key_pem: Zeroizing::new(uri.to_string()),
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
        // The certificate's problems first: they are the likelier mistake.
        read_certs(cert)?;

        // A CA key other local users can read is as good as leaked: refuse it (as ssh refuses
        // such private keys) rather than quietly sign with it.
        let meta = std::fs::metadata(key).map_err(|source| CaError::Read {
            path: key.to_path_buf(),
            source,
        })?;
        if let Some(problem) = crate::keys::secret_file::exposed_secret(&meta, key) {
            return Err(CaError::Invalid {
                path: key.to_path_buf(),
                problem,
            });
        }
        let key_pem = Zeroizing::new(std::fs::read(key).map_err(|source| CaError::Read {
            path: key.to_path_buf(),
            source,
        })?);
        let key_pair = parse_key(&key_pem, key)?;
        Self::from_cert_and_key(td, cert, SigningKey::memory(key_pair), key, bundle)
    }

    /// Signs with the intermediate in `cert` and the PKCS#11 key `uri` opens through `keys`,
    /// with the checks of [`Ca::from_files`] (the key must match the certificate) and a
    /// probe signature made by the token.
    pub fn from_token(
        td: &TrustDomain,
        cert: &Path,
        uri: &Pkcs11Uri,
        bundle: Option<&Path>,
        keys: &Keyring,
    ) -> Result<Self, CaError> {
        let key = keys.token_key(uri)?;
        Self::from_cert_and_key(td, cert, key, Path::new(&uri.to_string()), bundle)
    }

    /// The part of [`Ca::from_files`] after the key is open, wherever it lives; `key_source`
    /// names it in errors.
    fn from_cert_and_key(
        td: &TrustDomain,
        cert: &Path,
        key_pair: SigningKey,
        key: &Path,
        bundle: Option<&Path>,
    ) -> Result<Self, CaError> {
        let now = SystemTime::now();
        let certs = read_certs(cert)?;
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
        let ca = Self::assemble(td, cert, key, certs, roots, key_pair, now)?;
        ca.self_check(cert)?;
        Ok(ca)
    }

    /// Checks the signing certificate (`chain[0]`) and its parents against `key` and
    /// `bundle`, and builds the CA. `source` and `key_source` name the files in errors.
    pub(super) fn assemble(
        td: &TrustDomain,
        source: &Path,
        key_source: &Path,
        chain: Vec<CertificateDer<'static>>,
        bundle: TrustBundle,
        key: SigningKey,
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
        if signing.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
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
        let signing_cert = signing_der.clone().into_owned();
        Ok(Self {
            trust_domain: td.clone(),
            bundle,
            issuer,
            signing_cert,
            chain_tail: chain_tail.into(),
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
        Self::init_with_root(td, out, None, None)
    }

    /// Refuses an `--out` directory that already holds any file `trellis ca init` writes, so
    /// a refusal comes before anything is made (a token key included).
    pub fn check_init_out(out: &Path) -> Result<(), CaError> {
        for name in [
            "root.pem",
            "root-key.pem",
            "intermediate.pem",
            "intermediate-key.pem",
            "intermediate.csr",
            "bundle.pem",
        ] {
            let p = out.join(name);
            if p.symlink_metadata().is_ok() {
                return Err(CaError::Invalid {
                    path: p,
                    problem: "already exists; refusing to overwrite a CA file (move it away or \
                              choose another --out)"
                        .into(),
                });
            }
        }
        Ok(())
    }

    /// `trellis ca init --pkcs11-module … --key-label …`: like [`Ca::init_offline`] (or
    /// [`Ca::init_intermediate`] with `root`), but the intermediate's key is `key`, made
    /// inside a token; nothing of it is written, and `intermediate.csr` (signed by the
    /// token) lets another root sign the same key instead.
    pub fn init_with_token_key(
        td: &TrustDomain,
        out: &Path,
        root: Option<(&Path, &Path)>,
        key: SigningKey,
    ) -> Result<OfflineCaFiles, CaError> {
        Self::init_with_root(td, out, root, Some(key))
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
        Self::init_with_root(td, out, Some((root_cert, root_key)), None)
    }

    fn init_with_root(
        td: &TrustDomain,
        out: &Path,
        existing_root: Option<(&Path, &Path)>,
        token_key: Option<SigningKey>,
    ) -> Result<OfflineCaFiles, CaError> {
        let key_uri = token_key
            .as_ref()
            .filter(|k| k.is_token())
            .map(SigningKey::source);
        let files = OfflineCaFiles {
            intermediate_key_uri: key_uri,
            intermediate_csr: out.join("intermediate.csr"),
            root_cert: out.join("root.pem"),
            root_key: out.join("root-key.pem"),
            intermediate_cert: out.join("intermediate.pem"),
            intermediate_key: out.join("intermediate-key.pem"),
            bundle: out.join("bundle.pem"),
        };
        // Check all first, so a refusal writes nothing.
        Self::check_init_out(out)?;

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
                    Issuer::from_ca_cert_der(root_cert.der(), SigningKey::memory(root_key))
                        .map_err(sign_err)?;
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
                let issuer =
                    Issuer::from_ca_cert_der(root_der, SigningKey::memory(key)).map_err(|e| {
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
        let (mut int_params, soft_key) = ca_params(
            td,
            &ca_common_name("Trellis Intermediate CA", td, now),
            now,
            INTERMEDIATE_TTL,
            BasicConstraints::Constrained(0),
        )?;
        int_params.use_authority_key_identifier_extension = true;
        int_params.not_after = int_params.not_after.min(root_not_after);
        let (int_key, int_key_pem) = match token_key {
            Some(k) => (k, None),
            None => {
                let pem = Zeroizing::new(soft_key.serialize_pem());
                (SigningKey::memory(soft_key), Some(pem))
            }
        };
        if int_key.public_key_raw().len() != 65 {
            return Err(CaError::Sign(
                "the intermediate key must be ECDSA P-256".into(),
            ));
        }
        let int_cert = int_params
            .signed_by(&int_key, &root_issuer)
            .map_err(sign_err)?;
        // A CSR only for a token key: a file key can simply be signed again by whoever holds
        // the root, a token key cannot be moved to them.
        let csr_pem = if int_key_pem.is_none() {
            // What a CSR can carry: the serial and the issuer's key identifier are the
            // signing CA's to choose.
            let mut req = int_params.clone();
            req.serial_number = None;
            req.use_authority_key_identifier_extension = false;
            Some(
                req.serialize_request(&int_key)
                    .and_then(|c| c.pem())
                    .map_err(sign_err)?,
            )
        } else {
            None
        };
        drop(root_issuer);

        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out)
            .map_err(|source| CaError::Write {
                path: out.to_path_buf(),
                source,
            })?;
        if let Some(root_key_pem) = &new_root_key {
            write_new(&files.root_key, root_key_pem.as_bytes(), 0o600)?;
        }
        if let Some(pem) = &int_key_pem {
            write_new(&files.intermediate_key, pem.as_bytes(), 0o600)?;
        }
        if let Some(csr) = &csr_pem {
            write_new(&files.intermediate_csr, csr.as_bytes(), 0o644)?;
        }
        write_new(&files.root_cert, root_pem.as_bytes(), 0o644)?;
        write_new(&files.intermediate_cert, int_cert.pem().as_bytes(), 0o644)?;
        write_new(&files.bundle, root_pem.as_bytes(), 0o644)?;
        Ok(files)
    }
}

/// The chain and bundle PEM of an operator's intermediate (`bundle` absent: the last
/// certificate of `cert`, which the checks accepted as the root).
fn cert_material(cert: &Path, bundle: Option<&Path>) -> Result<(String, String), CaError> {
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
            let certs = read_certs(cert)?;
            let last = certs.last().ok_or_else(|| no_pem(cert))?;
            trellis_identity::certs_to_pem(std::slice::from_ref(last))
        }
    };
    Ok((chain_pem, bundle_pem))
}

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
pub(super) fn ca_params(
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

fn is_self_signed(der: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(der.as_ref()).is_ok_and(|(_, c)| {
        c.subject().as_raw() == c.issuer().as_raw() && c.verify_signature(None).is_ok()
    })
}

pub(super) fn uri_sans<'a>(c: &'a X509Certificate<'_>) -> Vec<&'a str> {
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
/// already verified by aws-lc-rs under the SPKI's own curve, a 65-byte point means P-256 (a P-384
/// point is 97 bytes).
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ca::tests::{default_ca, id, intermediate_ca, td, DAY};

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
        let root_owned = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(key).unwrap()) == 0;
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

    /// With an intermediate, every SVID's chain is its leaf and the one shared copy of the
    /// CA's intermediate (not a copy per SVID), and the two parts make the chain `issue` and
    /// `sign_csr` give, which verifies against the bundle.
    #[test]
    fn issued_leaves_share_the_intermediate() {
        let (_dir, ca) = intermediate_ca();
        let now = SystemTime::now();
        let (first, above) = ca.issue_leaf(&id(), DAY, now).unwrap();
        let (second, above_too) = ca.issue_leaf(&id(), DAY, now).unwrap();
        assert_eq!(first.chain().len(), 1);
        assert_eq!(above.len(), 1);
        assert_eq!(above[0].as_ref(), ca.signing_cert().as_ref());
        assert!(std::sync::Arc::ptr_eq(&above, &above_too));
        assert_ne!(first.serial_hex(), second.serial_hex());
        let whole = ca.issue(&id(), DAY, now).unwrap();
        assert_eq!(whole.chain().len(), 2);
        assert_eq!(whole.chain()[1].as_ref(), above[0].as_ref());
        whole.verify(ca.bundle(), now).unwrap();

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id().as_str().try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let (leaf, above_csr) = ca.sign_csr_leaf(&csr, &id(), DAY, now).unwrap();
        assert!(std::sync::Arc::ptr_eq(&above, &above_csr));
        let chain = ca.sign_csr(&csr, &id(), DAY, now).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1].as_ref(), above[0].as_ref());
        assert_ne!(
            chain[0].as_ref(),
            leaf.as_ref(),
            "each call signs a new leaf"
        );
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
}
