//! JWT-SVIDs (SPIFFE JWT-SVID spec): the ES256 keys that sign them, JWT bundles (JWKS), the
//! token format, and validation with a precise reason for every refusal.
//!
//! Shared by the control plane (which signs), the sidecar (Workload API `ValidateJWTSVID`) and
//! `trellis jwt inspect`, so all three refuse the same tokens for the same reasons.
//!
//! Only ES256 (P-256) is produced and accepted: it is what the control plane signs with, and
//! accepting fewer algorithms leaves fewer ways to confuse a verifier (no `none`, no HMAC).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde_json::{Map, Value};

use crate::{SpiffeId, TrustDomain};

/// The JWK `use` of a JWT authority in a SPIFFE bundle (Trust Domain and Bundle spec §4.2.1).
pub const JWT_SVID_USE: &str = "jwt-svid";
/// The only signature algorithm Trellis signs and accepts.
pub const ES256: &str = "ES256";
/// Most audiences one JWT-SVID may carry.
pub const MAX_AUDIENCES: usize = 16;
/// Longest audience value, in bytes.
pub const MAX_AUDIENCE_BYTES: usize = 256;
/// Longest token accepted for validation: a JWT-SVID is a few hundred bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Clock skew tolerated on `exp`, `nbf` and `iat` when validating.
pub const DEFAULT_SKEW: Duration = Duration::from_secs(30);

/// A P-256 public key that verifies JWT-SVIDs, with its key ID.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtKey {
    kid: String,
    /// Uncompressed SEC1 point: `04 || x || y`.
    point: [u8; 65],
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JwtKey({})", self.kid)
    }
}

impl JwtKey {
    /// A key from its uncompressed SEC1 point (what aws-lc-rs gives as the public key).
    pub fn from_point(kid: impl Into<String>, point: &[u8]) -> Result<Self, JwtBundleError> {
        let point: [u8; 65] = point
            .try_into()
            .ok()
            .filter(|p: &[u8; 65]| p[0] == 4)
            .ok_or_else(|| JwtBundleError("not an uncompressed P-256 point".into()))?;
        Ok(Self {
            kid: kid.into(),
            point,
        })
    }

    /// The key ID (`kid`): the RFC 7638 thumbprint of the public key.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// RFC 7638 JWK thumbprint of a P-256 point: what Trellis uses as `kid`, so every replica
    /// and every reader derives the same ID from the key itself.
    pub fn thumbprint(point: &[u8]) -> Result<String, JwtBundleError> {
        let key = Self::from_point("", point)?;
        // RFC 7638 §3.2: the required members in lexicographic order, no whitespace.
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            B64.encode(&key.point[1..33]),
            B64.encode(&key.point[33..65])
        );
        use sha2::Digest as _;
        Ok(B64.encode(sha2::Sha256::digest(canonical.as_bytes())))
    }

    /// The JWK: `kty`, `crv`, `x`, `y`, `kid` and `use: jwt-svid`.
    pub fn to_jwk(&self) -> Value {
        serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": B64.encode(&self.point[1..33]),
            "y": B64.encode(&self.point[33..65]),
            "kid": self.kid,
            "use": JWT_SVID_USE,
        })
    }

    fn from_jwk(jwk: &Map<String, Value>) -> Result<Option<Self>, JwtBundleError> {
        let field = |name: &str| jwk.get(name).and_then(Value::as_str);
        // A SPIFFE bundle also lists X.509 authorities (`use: x509-svid`): not ours to read.
        match field("use") {
            None | Some(JWT_SVID_USE) => {}
            Some(_) => return Ok(None),
        }
        let kid = field("kid")
            .filter(|k| !k.is_empty())
            .ok_or_else(|| JwtBundleError("a JWT authority has no `kid`".into()))?;
        if field("kty") != Some("EC") || field("crv") != Some("P-256") {
            // Other key types (RSA from another implementation's bundle) verify nothing here.
            return Ok(None);
        }
        let coord = |name: &str| -> Result<Vec<u8>, JwtBundleError> {
            let v =
                field(name).ok_or_else(|| JwtBundleError(format!("key `{kid}`: no `{name}`")))?;
            let bytes = B64.decode(v).map_err(|e| {
                JwtBundleError(format!("key `{kid}`: `{name}` is not base64url: {e}"))
            })?;
            if bytes.len() != 32 {
                return Err(JwtBundleError(format!(
                    "key `{kid}`: `{name}` is {} bytes, want 32",
                    bytes.len()
                )));
            }
            Ok(bytes)
        };
        let mut point = vec![4u8];
        point.extend(coord("x")?);
        point.extend(coord("y")?);
        Self::from_point(kid, &point).map(Some)
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.point[..])
            .verify(message, signature)
            .is_ok()
    }
}

/// A JWT bundle could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JWT bundle: {0}")]
pub struct JwtBundleError(pub String);

/// The JWT authorities of one trust domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtBundle {
    trust_domain: TrustDomain,
    keys: Vec<JwtKey>,
}

impl JwtBundle {
    /// A bundle of `keys`.
    pub fn new(trust_domain: TrustDomain, keys: Vec<JwtKey>) -> Self {
        Self { trust_domain, keys }
    }

    /// Reads a JWKS or a SPIFFE bundle (`{"keys": [...]}`, X.509 authorities ignored). ES256
    /// keys are kept; keys of other types are skipped, since nothing here can verify with them.
    pub fn parse(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, JwtBundleError> {
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| JwtBundleError(format!("not JSON: {e}")))?;
        let keys = doc.get("keys").and_then(Value::as_array).ok_or_else(|| {
            JwtBundleError("no `keys` array (want a JWKS or SPIFFE bundle)".into())
        })?;
        let mut out = Vec::new();
        for key in keys {
            let key = key
                .as_object()
                .ok_or_else(|| JwtBundleError("a key is not a JSON object".into()))?;
            if let Some(k) = JwtKey::from_jwk(key)? {
                out.push(k);
            }
        }
        Ok(Self::new(trust_domain, out))
    }

    /// The JWKS document (`{"keys": [...]}`): what `FetchJWTBundles` carries per trust domain.
    pub fn to_jwks(&self) -> Vec<u8> {
        let keys: Vec<Value> = self.keys.iter().map(JwtKey::to_jwk).collect();
        serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap_or_default()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The keys.
    pub fn keys(&self) -> &[JwtKey] {
        &self.keys
    }

    /// The key with ID `kid`.
    pub fn key(&self, kid: &str) -> Option<&JwtKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }
}

/// An audience list was refused (when minting or fetching a JWT-SVID).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AudienceError(pub String);

/// JWT-SVID spec §3.2: "The aud claim MUST be present, containing one or more values."
/// Trellis also refuses values no relying party could mean: empty, longer than
/// [`MAX_AUDIENCE_BYTES`], with whitespace or control characters, and more than
/// [`MAX_AUDIENCES`] of them.
pub fn check_audiences<S: AsRef<str>>(audiences: &[S]) -> Result<(), AudienceError> {
    if audiences.is_empty() {
        return Err(AudienceError(
            "no audience: a JWT-SVID needs at least one (JWT-SVID spec §3.2)".into(),
        ));
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(AudienceError(format!(
            "{} audiences: at most {MAX_AUDIENCES}",
            audiences.len()
        )));
    }
    for a in audiences {
        let a = a.as_ref();
        if a.is_empty() {
            return Err(AudienceError("an audience is empty".into()));
        }
        if a.len() > MAX_AUDIENCE_BYTES {
            return Err(AudienceError(format!(
                "an audience is {} bytes: at most {MAX_AUDIENCE_BYTES}",
                a.len()
            )));
        }
        if a.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(AudienceError(format!(
                "audience {a:?} contains whitespace or control characters"
            )));
        }
    }
    Ok(())
}

/// The claims Trellis puts in a JWT-SVID.
#[derive(Clone, Debug)]
pub struct NewJwtSvid<'a> {
    /// `sub`.
    pub subject: &'a SpiffeId,
    /// `aud`.
    pub audiences: &'a [String],
    /// `iat`.
    pub issued_at: SystemTime,
    /// `exp`.
    pub expires_at: SystemTime,
}

impl NewJwtSvid<'_> {
    /// `base64url(header) "." base64url(claims)`: the bytes the signature covers. The header
    /// holds exactly `alg`, `kid` and `typ` (what strict verifiers such as the Rust `spiffe`
    /// crate allow).
    pub fn signing_input(&self, kid: &str) -> String {
        let header = serde_json::json!({ "alg": ES256, "kid": kid, "typ": "JWT" });
        let claims = serde_json::json!({
            "sub": self.subject.as_str(),
            "aud": self.audiences,
            "iat": unix(self.issued_at),
            "exp": unix(self.expires_at),
        });
        format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        )
    }
}

/// `signing_input "." base64url(signature)`; `signature` is ES256's fixed `r || s`.
pub fn assemble(signing_input: &str, signature: &[u8]) -> String {
    format!("{signing_input}.{}", B64.encode(signature))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Why a JWT-SVID was refused. `reason()` is a short stable label (metrics, scripts); the
/// `Display` text says exactly what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtRefusal {
    /// Not three base64url parts of JSON.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `alg` is not ES256.
    #[error("algorithm `{0}` is not accepted (only ES256)")]
    Algorithm(String),
    /// `typ` is present and not `JWT` or `JOSE` (JWT-SVID spec §2.3).
    #[error("header `typ` is `{0}`, want `JWT` or `JOSE`")]
    Type(String),
    /// No `kid` in the header (JWT-SVID spec §2.2: "MUST" be set).
    #[error("header has no `kid`")]
    NoKeyId,
    /// The bundle has no key with that ID.
    #[error("key `{kid}` is not in the bundle of trust domain `{trust_domain}` (signed by another key, or a key retired long ago)")]
    UnknownKey {
        /// The token's `kid`.
        kid: String,
        /// Whose bundle was searched.
        trust_domain: String,
    },
    /// The signature does not verify with the key `kid` names.
    #[error("signature does not verify with key `{0}`")]
    Signature(String),
    /// A required claim is missing or of the wrong type.
    #[error("claim `{0}` is missing or not of the right type")]
    Claim(&'static str),
    /// `sub` is not a SPIFFE ID.
    #[error("`sub` is not a SPIFFE ID: {0}")]
    Subject(String),
    /// `sub` is in another trust domain than the bundle's.
    #[error("`sub` {sub} is not in trust domain `{trust_domain}`, whose bundle was used")]
    TrustDomain {
        /// The subject.
        sub: String,
        /// The bundle's trust domain.
        trust_domain: String,
    },
    /// `exp` is in the past (beyond the skew).
    #[error("expired at {exp} (unix seconds), {ago}s ago")]
    Expired {
        /// The `exp` claim.
        exp: u64,
        /// How long ago.
        ago: u64,
    },
    /// `nbf` or `iat` is in the future (beyond the skew).
    #[error("not valid before {0} (unix seconds): in the future")]
    NotYetValid(u64),
    /// The wanted audience is not in `aud`.
    #[error("audience `{want}` is not in `aud` {got:?}")]
    Audience {
        /// The audience asked for.
        want: String,
        /// What the token carries.
        got: Vec<String>,
    },
}

impl JwtRefusal {
    /// A short label: `malformed`, `algorithm`, `type`, `no_kid`, `unknown_key`, `signature`,
    /// `claim`, `subject`, `trust_domain`, `expired`, `not_yet_valid`, `audience`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Algorithm(_) => "algorithm",
            Self::Type(_) => "type",
            Self::NoKeyId => "no_kid",
            Self::UnknownKey { .. } => "unknown_key",
            Self::Signature(_) => "signature",
            Self::Claim(_) => "claim",
            Self::Subject(_) => "subject",
            Self::TrustDomain { .. } => "trust_domain",
            Self::Expired { .. } => "expired",
            Self::NotYetValid(_) => "not_yet_valid",
            Self::Audience { .. } => "audience",
        }
    }
}

/// A token split and decoded, nothing verified yet.
#[derive(Clone, Debug)]
pub struct DecodedJwt {
    /// The JOSE header.
    pub header: Map<String, Value>,
    /// The claims.
    pub claims: Map<String, Value>,
    signing_input: String,
    signature: Vec<u8>,
}

impl DecodedJwt {
    /// Splits `token` into header, claims and signature (JWS compact serialization).
    pub fn decode(token: &str) -> Result<Self, JwtRefusal> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwtRefusal::Malformed(format!(
                "{} bytes, at most {MAX_TOKEN_BYTES}",
                token.len()
            )));
        }
        let token = token.trim();
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtRefusal::Malformed(
                "want three base64url parts separated by `.`".into(),
            ));
        };
        let json = |part: &str, what: &str| -> Result<Map<String, Value>, JwtRefusal> {
            let bytes = B64
                .decode(part)
                .map_err(|e| JwtRefusal::Malformed(format!("{what} is not base64url: {e}")))?;
            match serde_json::from_slice(&bytes) {
                Ok(Value::Object(m)) => Ok(m),
                Ok(_) => Err(JwtRefusal::Malformed(format!(
                    "{what} is not a JSON object"
                ))),
                Err(e) => Err(JwtRefusal::Malformed(format!("{what} is not JSON: {e}"))),
            }
        };
        Ok(Self {
            header: json(h, "header")?,
            claims: json(c, "claims")?,
            signing_input: format!("{h}.{c}"),
            signature: B64
                .decode(s)
                .map_err(|e| JwtRefusal::Malformed(format!("signature is not base64url: {e}")))?,
        })
    }

    /// The `aud` claim as a list (RFC 7519 §4.1.3: a string or an array of strings).
    pub fn audiences(&self) -> Result<Vec<String>, JwtRefusal> {
        match self.claims.get("aud") {
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or(JwtRefusal::Claim("aud"))
                })
                .collect(),
            _ => Err(JwtRefusal::Claim("aud")),
        }
    }
}

/// A JWT-SVID that passed [`validate`].
#[derive(Clone, Debug)]
pub struct ValidJwtSvid {
    /// `sub`.
    pub spiffe_id: SpiffeId,
    /// `aud`.
    pub audiences: Vec<String>,
    /// `exp`, unix seconds.
    pub expires_at: u64,
    /// The `kid` that verified it.
    pub kid: String,
    /// Every claim, as signed.
    pub claims: Map<String, Value>,
}

/// Validates `token` against `bundle` at `now`, as the JWT-SVID spec §4 asks: ES256 signature
/// by a key of the bundle named by `kid`; `exp` required and not past, `nbf`/`iat` not in the
/// future (each with `skew`); `sub` a SPIFFE ID in the bundle's trust domain; `aud` present
/// and, when `audience` is given, containing it.
pub fn validate(
    token: &str,
    bundle: &JwtBundle,
    audience: Option<&str>,
    now: SystemTime,
    skew: Duration,
) -> Result<ValidJwtSvid, JwtRefusal> {
    let jwt = DecodedJwt::decode(token)?;
    let alg = jwt.header.get("alg").and_then(Value::as_str).unwrap_or("");
    if alg != ES256 {
        return Err(JwtRefusal::Algorithm(alg.to_owned()));
    }
    match jwt.header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(other) => {
            return Err(JwtRefusal::Type(
                other
                    .as_str()
                    .map_or_else(|| other.to_string(), str::to_owned),
            ))
        }
    }
    let kid = jwt
        .header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(JwtRefusal::NoKeyId)?;
    let key = bundle.key(kid).ok_or_else(|| JwtRefusal::UnknownKey {
        kid: kid.to_owned(),
        trust_domain: bundle.trust_domain().to_string(),
    })?;
    if !key.verify(jwt.signing_input.as_bytes(), &jwt.signature) {
        return Err(JwtRefusal::Signature(kid.to_owned()));
    }
    // Only now are the claims the signer's: check them.
    let time = |name: &'static str| -> Result<Option<u64>, JwtRefusal> {
        match jwt.claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .map(Some)
                .ok_or(JwtRefusal::Claim(name)),
        }
    };
    let now_s = unix(now);
    let skew_s = skew.as_secs();
    let exp = time("exp")?.ok_or(JwtRefusal::Claim("exp"))?;
    if now_s >= exp.saturating_add(skew_s) {
        return Err(JwtRefusal::Expired {
            exp,
            ago: now_s - exp,
        });
    }
    for name in ["nbf", "iat"] {
        if let Some(t) = time(name)? {
            if t > now_s.saturating_add(skew_s) {
                return Err(JwtRefusal::NotYetValid(t));
            }
        }
    }
    let sub = jwt
        .claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or(JwtRefusal::Claim("sub"))?;
    let spiffe_id = SpiffeId::parse(sub).map_err(|e| JwtRefusal::Subject(e.to_string()))?;
    if !spiffe_id.is_member_of(bundle.trust_domain()) {
        return Err(JwtRefusal::TrustDomain {
            sub: sub.to_owned(),
            trust_domain: bundle.trust_domain().to_string(),
        });
    }
    let audiences = jwt.audiences()?;
    if let Some(want) = audience {
        if !audiences.iter().any(|a| a == want) {
            return Err(JwtRefusal::Audience {
                want: want.to_owned(),
                got: audiences,
            });
        }
    }
    Ok(ValidJwtSvid {
        spiffe_id,
        audiences,
        expires_at: exp,
        kid: kid.to_owned(),
        claims: jwt.claims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    fn keypair() -> (EcdsaKeyPair, JwtKey) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let point = pair.public_key().as_ref().to_vec();
        let kid = JwtKey::thumbprint(&point).unwrap();
        (pair, JwtKey::from_point(kid, &point).unwrap())
    }

    fn sign(pair: &EcdsaKeyPair, kid: &str, sub: &str, aud: &[&str], iat: u64, exp: u64) -> String {
        let id = SpiffeId::parse(sub).unwrap();
        let aud: Vec<String> = aud.iter().map(|s| s.to_string()).collect();
        let input = NewJwtSvid {
            subject: &id,
            audiences: &aud,
            issued_at: UNIX_EPOCH + Duration::from_secs(iat),
            expires_at: UNIX_EPOCH + Duration::from_secs(exp),
        }
        .signing_input(kid);
        let sig = pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        assemble(&input, sig.as_ref())
    }

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    const SUB: &str = "spiffe://example.org/ns/a/sa/b";

    #[test]
    fn valid_token_round_trips_through_the_jwks() {
        let (pair, key) = keypair();
        let bundle = JwtBundle::new(td(), vec![key.clone()]);
        let parsed = JwtBundle::parse(td(), &bundle.to_jwks()).unwrap();
        assert_eq!(parsed, bundle);
        let token = sign(&pair, key.kid(), SUB, &["db", "api"], 1000, 1300);
        let ok = validate(&token, &parsed, Some("api"), at(1100), DEFAULT_SKEW).unwrap();
        assert_eq!(ok.spiffe_id.as_str(), SUB);
        assert_eq!(ok.audiences, vec!["db", "api"]);
        assert_eq!(ok.kid, key.kid());
        // The JWK carries what SPIFFE bundles need.
        let jwk = key.to_jwk();
        assert_eq!(jwk["use"], "jwt-svid");
        assert_eq!(jwk["kty"], "EC");
    }

    #[test]
    fn refuses_other_audience() {
        let (pair, key) = keypair();
        let bundle = JwtBundle::new(td(), vec![key.clone()]);
        let token = sign(&pair, key.kid(), SUB, &["db"], 1000, 1300);
        let err = validate(&token, &bundle, Some("web"), at(1100), DEFAULT_SKEW).unwrap_err();
        assert_eq!(err.reason(), "audience");
        assert!(err.to_string().contains("`web`"), "{err}");
    }

    #[test]
    fn refuses_token_signed_by_another_key() {
        let (_, key) = keypair();
        let (other, _) = keypair();
        let bundle = JwtBundle::new(td(), vec![key.clone()]);
        // Same kid, wrong key: the signature fails.
        let token = sign(&other, key.kid(), SUB, &["db"], 1000, 1300);
        let err = validate(&token, &bundle, None, at(1100), DEFAULT_SKEW).unwrap_err();
        assert_eq!(err.reason(), "signature");
        // Its own kid: not in the bundle.
        let token = sign(&other, "other", SUB, &["db"], 1000, 1300);
        let err = validate(&token, &bundle, None, at(1100), DEFAULT_SKEW).unwrap_err();
        assert_eq!(err.reason(), "unknown_key");
    }

    #[test]
    fn refuses_expired_and_future_tokens_beyond_the_skew() {
        let (pair, key) = keypair();
        let bundle = JwtBundle::new(td(), vec![key.clone()]);
        let token = sign(&pair, key.kid(), SUB, &["db"], 1000, 1300);
        assert!(validate(&token, &bundle, None, at(1320), DEFAULT_SKEW).is_ok());
        let err = validate(&token, &bundle, None, at(1330), DEFAULT_SKEW).unwrap_err();
        assert_eq!(err, JwtRefusal::Expired { exp: 1300, ago: 30 });
        let err = validate(&token, &bundle, None, at(900), DEFAULT_SKEW).unwrap_err();
        assert_eq!(err, JwtRefusal::NotYetValid(1000));
    }

    #[test]
    fn refuses_subject_of_another_trust_domain_and_non_spiffe_subject() {
        let (pair, key) = keypair();
        let bundle = JwtBundle::new(td(), vec![key.clone()]);
        let token = sign(
            &pair,
            key.kid(),
            "spiffe://other.org/x",
            &["db"],
            1000,
            1300,
        );
        let err = validate(&token, &bundle, None, at(1100), DEFAULT_SKEW).unwrap_err();
        assert_eq!(err.reason(), "trust_domain");
    }

    #[test]
    fn refuses_alg_none_and_hmac_and_garbage() {
        let (_, key) = keypair();
        let bundle = JwtBundle::new(td(), vec![key.clone()]);
        for alg in ["none", "HS256", "RS256"] {
            let h = B64.encode(format!(r#"{{"alg":"{alg}","kid":"{}"}}"#, key.kid()));
            let c = B64.encode(format!(r#"{{"sub":"{SUB}","aud":"x","exp":9999999999}}"#));
            let err =
                validate(&format!("{h}.{c}."), &bundle, None, at(1), DEFAULT_SKEW).unwrap_err();
            assert_eq!(err, JwtRefusal::Algorithm(alg.into()));
        }
        for garbage in ["", "a.b", "a.b.c.d", "!!.!!.!!"] {
            let err = validate(garbage, &bundle, None, at(1), DEFAULT_SKEW).unwrap_err();
            assert_eq!(err.reason(), "malformed", "{garbage:?}: {err}");
        }
    }

    #[test]
    fn bundle_parse_skips_x509_and_rsa_keys_and_needs_kid() {
        let (_, key) = keypair();
        let mut jwk = key.to_jwk();
        let doc = serde_json::json!({"keys": [
            {"kty": "EC", "use": "x509-svid", "x5c": ["AAAA"]},
            {"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"},
            jwk.clone(),
        ], "spiffe_sequence": 1});
        let b = JwtBundle::parse(td(), doc.to_string().as_bytes()).unwrap();
        assert_eq!(b.keys(), std::slice::from_ref(&key));
        jwk.as_object_mut().unwrap().remove("kid");
        let doc = serde_json::json!({ "keys": [jwk] });
        assert!(JwtBundle::parse(td(), doc.to_string().as_bytes()).is_err());
        assert!(JwtBundle::parse(td(), b"[]").is_err());
    }

    #[test]
    fn audiences_are_checked() {
        assert!(check_audiences(&["db"]).is_ok());
        assert!(check_audiences::<&str>(&[]).is_err());
        assert!(check_audiences(&[""]).is_err());
        assert!(check_audiences(&["a b"]).is_err());
        assert!(check_audiences(&["a\u{0}"]).is_err());
        assert!(check_audiences(&["x".repeat(257)]).is_err());
        assert!(check_audiences(&vec!["a"; 17]).is_err());
    }

    #[test]
    fn thumbprint_matches_rfc7638_example_shape() {
        let (_, key) = keypair();
        // 32 bytes of SHA-256, base64url without padding.
        assert_eq!(key.kid().len(), 43);
    }
}
