//! The SPIFFE bundle document: the JWK Set a bundle endpoint serves (SPIFFE Trust Domain and
//! Bundle, section 4), written for our own trust domain and read for a federated one.
//!
//! ```json
//! {"keys": [{"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "…", "y": "…",
//!            "x5c": ["<base64 DER>"]}],
//!  "spiffe_sequence": 3, "spiffe_refresh_hint": 300}
//! ```

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;
use trellis_identity::{CertificateDer, TrustBundle, TrustDomain};

/// `use` of an X.509 authority (SPIFFE Trust Domain and Bundle 4.2.2).
pub const USE_X509_SVID: &str = "x509-svid";
/// `use` of a JWT authority; not served yet (see [`BundleDocument::to_json`]).
pub const USE_JWT_SVID: &str = "jwt-svid";

/// Why a bundle document was refused; the bundle in force stays.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DocumentError {
    /// Not JSON, or not a JWK Set.
    #[error("not a SPIFFE bundle (JWK Set): {0}")]
    NotJwks(String),
    /// An `x509-svid` key is unusable.
    #[error("keys[{index}] (x509-svid): {problem}")]
    BadKey {
        /// Index in `keys`.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// No `x509-svid` key at all.
    #[error("no x509-svid key: a bundle must carry at least one X.509 authority")]
    NoX509Authority,
    /// A CA names another trust domain.
    #[error("a CA names `{found}`, not trust domain `{expected}`")]
    WrongTrustDomain {
        /// The trust domain fetched.
        expected: String,
        /// The SPIFFE ID the CA carries.
        found: String,
    },
    /// The CA certificates do not make a bundle.
    #[error("{0}")]
    BadBundle(String),
}

/// A parsed bundle document.
#[derive(Debug, Clone)]
pub struct BundleDocument {
    /// The X.509 authorities, as a bundle of the expected trust domain.
    pub bundle: TrustBundle,
    /// `spiffe_sequence`, if present.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint`, if present.
    pub refresh_hint: Option<Duration>,
}

#[derive(Deserialize)]
struct RawDocument {
    keys: Vec<Map<String, Value>>,
    #[serde(default)]
    spiffe_sequence: Option<u64>,
    #[serde(default)]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Serialize)]
struct OutDocument {
    keys: Vec<Map<String, Value>>,
    spiffe_sequence: u64,
    spiffe_refresh_hint: u64,
}

impl BundleDocument {
    /// Parses `body` as trust domain `td`'s bundle. Keys of another `use` are skipped (spec
    /// 4.2.2: "Keys with an unknown use value MUST be ignored"; JWT authorities are for the
    /// JWT-SVID work). Every `x509-svid` key must carry exactly one CA certificate in `x5c`.
    pub fn parse(td: &TrustDomain, body: &[u8]) -> Result<Self, DocumentError> {
        let raw: RawDocument =
            serde_json::from_slice(body).map_err(|e| DocumentError::NotJwks(e.to_string()))?;
        let mut roots = Vec::new();
        for (index, key) in raw.keys.iter().enumerate() {
            if key.get("use").and_then(Value::as_str) != Some(USE_X509_SVID) {
                continue;
            }
            let bad = |problem: &str| DocumentError::BadKey {
                index,
                problem: problem.to_owned(),
            };
            // Spec 4.2.2.1: "The x5c parameter MUST include exactly one certificate".
            let x5c = key
                .get("x5c")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("no x5c"))?;
            let [cert] = x5c.as_slice() else {
                return Err(bad(&format!(
                    "x5c holds {} certificates, exactly one is required",
                    x5c.len()
                )));
            };
            let der = cert
                .as_str()
                .and_then(|b64| STANDARD.decode(b64).ok())
                .ok_or_else(|| bad("x5c[0] is not base64 DER"))?;
            roots.push(CertificateDer::from(der));
        }
        if roots.is_empty() {
            return Err(DocumentError::NoX509Authority);
        }
        let bundle = TrustBundle::new(td.clone(), roots)
            .map_err(|e| DocumentError::BadBundle(e.to_string()))?;
        // X509-SVID 4.1: a signing certificate's URI SAN, when present, is its trust domain's
        // ID. A CA naming another domain is not this domain's authority.
        let want = td.id().to_string();
        if let Some(other) = bundle
            .summary()
            .into_iter()
            .filter_map(|ca| ca.spiffe_id)
            .find(|id| *id != want)
        {
            return Err(DocumentError::WrongTrustDomain {
                expected: td.to_string(),
                found: other,
            });
        }
        Ok(BundleDocument {
            bundle,
            sequence: raw.spiffe_sequence,
            refresh_hint: raw.spiffe_refresh_hint.map(Duration::from_secs),
        })
    }

    /// The document for `bundle`'s own CAs (never its federated ones: federation is not
    /// transitive), and the JWT authorities of `jwt` (`use: jwt-svid`, with their `kid`).
    pub fn to_json(
        bundle: &TrustBundle,
        jwt: Option<&trellis_identity::jwt::JwtBundle>,
        sequence: u64,
        refresh_hint: Duration,
    ) -> String {
        let mut keys = keys_for(bundle);
        if let Some(jwt) = jwt {
            keys.extend(jwt.keys().iter().filter_map(|k| match k.to_jwk() {
                Value::Object(m) => Some(m),
                _ => None,
            }));
        }
        let doc = OutDocument {
            keys,
            spiffe_sequence: sequence,
            spiffe_refresh_hint: refresh_hint.as_secs().max(1),
        };
        serde_json::to_string_pretty(&doc).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// One JWK per CA of `bundle`: `use: x509-svid`, the public key parameters and `x5c`.
pub fn keys_for(bundle: &TrustBundle) -> Vec<Map<String, Value>> {
    bundle
        .roots()
        .iter()
        .map(|der| {
            let mut key = public_key_params(der);
            key.insert("use".into(), USE_X509_SVID.into());
            key.insert(
                "x5c".into(),
                Value::Array(vec![STANDARD.encode(der).into()]),
            );
            key
        })
        .collect()
}

/// `kty` and its parameters (RFC 7518 6.2 EC, 6.3 RSA) for the certificate's key; only `kty`
/// is left out for a key type JWK has no name for.
fn public_key_params(der: &CertificateDer<'_>) -> Map<String, Value> {
    use x509_parser::public_key::PublicKey;
    let mut key = Map::new();
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return key;
    };
    let b64 = |bytes: &[u8]| Value::from(URL_SAFE_NO_PAD.encode(bytes));
    match cert.public_key().parsed() {
        Ok(PublicKey::EC(point)) => {
            let data = point.data();
            // Uncompressed point: 0x04 || X || Y.
            let crv = match data.len() {
                65 => Some(("P-256", 32)),
                97 => Some(("P-384", 48)),
                133 => Some(("P-521", 66)),
                _ => None,
            };
            if let (Some((crv, n)), Some(0x04)) = (crv, data.first()) {
                key.insert("kty".into(), "EC".into());
                key.insert("crv".into(), crv.into());
                key.insert("x".into(), b64(&data[1..=n]));
                key.insert("y".into(), b64(&data[1 + n..]));
            }
        }
        Ok(PublicKey::RSA(rsa)) => {
            let trim = |b: &[u8]| -> Vec<u8> {
                b.iter()
                    .copied()
                    .skip_while(|&x| x == 0)
                    .collect::<Vec<u8>>()
            };
            key.insert("kty".into(), "RSA".into());
            key.insert("n".into(), b64(&trim(rsa.modulus)));
            key.insert("e".into(), b64(&trim(rsa.exponent)));
        }
        _ => {}
    }
    key
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use trellis_identity::testca::TestCa;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::parse(name).unwrap()
    }

    #[test]
    fn round_trips_our_document() {
        let (a, b) = (TestCa::root("b.org"), TestCa::root("b.org"));
        let bundle =
            TrustBundle::new(td("b.org"), vec![a.cert().clone(), b.cert().clone()]).unwrap();
        let (signer, _) = crate::jwt::keys::JwtSigner::generate().unwrap();
        let jwt =
            trellis_identity::jwt::JwtBundle::new(td("b.org"), vec![signer.public_key().clone()]);
        let json = BundleDocument::to_json(&bundle, Some(&jwt), 7, Duration::from_secs(300));
        let v: Value = serde_json::from_str(&json).unwrap();
        // The JWT authority too, with its kid; the X.509 reading skips it.
        assert_eq!(v["keys"][2]["use"], "jwt-svid");
        assert_eq!(v["keys"][2]["kid"], signer.kid());
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
        assert_eq!(v["keys"][0]["use"], "x509-svid");
        assert_eq!(v["keys"][0]["kty"], "EC");
        assert_eq!(v["keys"][0]["crv"], "P-256");
        let doc = BundleDocument::parse(&td("b.org"), json.as_bytes()).unwrap();
        assert_eq!(doc.bundle.roots(), bundle.roots());
        assert_eq!(doc.sequence, Some(7));
        assert_eq!(doc.refresh_hint, Some(Duration::from_secs(300)));
    }

    #[test]
    fn skips_keys_of_other_uses() {
        let ca = TestCa::root("b.org");
        let json = format!(
            r#"{{"keys":[{{"use":"jwt-svid","kty":"EC","kid":"k"}},{{"use":"x509-svid","kty":"EC","x5c":["{}"]}}]}}"#,
            STANDARD.encode(ca.cert())
        );
        let doc = BundleDocument::parse(&td("b.org"), json.as_bytes()).unwrap();
        assert_eq!(doc.bundle.roots().len(), 1);
        assert_eq!(doc.sequence, None);
    }

    #[test]
    fn refuses_garbage_and_empty_and_two_certs() {
        let ca = TestCa::root("b.org");
        let err = BundleDocument::parse(&td("b.org"), b"<html>").unwrap_err();
        assert!(matches!(err, DocumentError::NotJwks(_)), "{err}");
        let err = BundleDocument::parse(&td("b.org"), br#"{"keys":[]}"#).unwrap_err();
        assert_eq!(err, DocumentError::NoX509Authority);
        let c = STANDARD.encode(ca.cert());
        let two = format!(r#"{{"keys":[{{"use":"x509-svid","x5c":["{c}","{c}"]}}]}}"#);
        let err = BundleDocument::parse(&td("b.org"), two.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
        let other = TestCa::root("c.org");
        let wrong = format!(
            r#"{{"keys":[{{"use":"x509-svid","x5c":["{}"]}}]}}"#,
            STANDARD.encode(other.cert())
        );
        let err = BundleDocument::parse(&td("b.org"), wrong.as_bytes()).unwrap_err();
        assert!(
            matches!(err, DocumentError::WrongTrustDomain { .. }),
            "{err}"
        );
        let tampered = format!(
            r#"{{"keys":[{{"use":"x509-svid","x5c":["{}"]}}]}}"#,
            &c[..c.len() - 8]
        );
        assert!(BundleDocument::parse(&td("b.org"), tampered.as_bytes()).is_err());
    }
}
