//! Kubernetes projected service-account token attestation (JWT verified against the issuer's JWKS).
//!
//! SPIFFE ID: `spiffe://<td>/ns/<namespace>/sa/<serviceaccount>` from the token's
//! `kubernetes.io` claim (`{"namespace": …, "serviceaccount": {"name": …}}`).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::Validation;
use trellis_identity::{SpiffeId, TrustDomain};

use crate::attest::error::AttestError;
use crate::attest::jwks::{b64, JwksError, JwksKeyStore, JwksKeys, ALLOWED_ALGS, MAX_JWKS_BYTES};

/// `limits.k8s.max_jwt_bytes` when not configured: Kubernetes tokens are about 1 KiB (a few
/// more with many audiences or a long issuer URL).
pub const MAX_JWT_BYTES: usize = 8 * 1024;

/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECS: f64 = 60.0;

/// Verifies Kubernetes service-account JWTs.
pub struct K8sAttestor {
    trust_domain: TrustDomain,
    issuer: String,
    audience: String,
    // Read once per attestation (`load`), replaced whole by a refresh (`store`): no lock on
    // the attestation path.
    keys: JwksKeyStore,
    /// Longer tokens are refused before any parsing (`max_jwt_bytes`).
    max_token_bytes: usize,
}

impl K8sAttestor {
    /// An attestor verifying with `keys`, which [`K8sAttestor::key_store`] can replace later.
    pub fn new(keys: JwksKeys, issuer: &str, audience: &str, td: &TrustDomain) -> Self {
        Self {
            trust_domain: td.clone(),
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            keys: JwksKeyStore::new(keys),
            max_token_bytes: MAX_JWT_BYTES,
        }
    }

    /// Refuses tokens longer than `max` bytes (`max_jwt_bytes`) instead of the default 8 KiB.
    pub fn with_max_token_bytes(mut self, max: usize) -> Self {
        self.max_token_bytes = max;
        self
    }

    /// Loads the issuer's public keys from a JWKS JSON file. Only RSA and EC keys are accepted.
    pub fn from_jwks_file(
        path: &Path,
        issuer: &str,
        audience: &str,
        td: &TrustDomain,
    ) -> Result<Self, JwksError> {
        Ok(Self::new(
            JwksKeys::from_file(path, MAX_JWKS_BYTES)?,
            issuer,
            audience,
            td,
        ))
    }

    /// Same, from JWKS JSON text (`source` names it in errors).
    pub fn from_jwks_json(
        json: &str,
        source: &Path,
        issuer: &str,
        audience: &str,
        td: &TrustDomain,
    ) -> Result<Self, JwksError> {
        Ok(Self::new(
            JwksKeys::parse(json, source, MAX_JWKS_BYTES)?,
            issuer,
            audience,
            td,
        ))
    }

    /// The handle a refresher swaps new keys in with.
    pub fn key_store(&self) -> JwksKeyStore {
        self.keys.clone()
    }

    /// Verifies `token` at `now`: header `alg` is RS256/384/512, PS*, ES256/384 (never `none`
    /// or HS*), `kid` known, signature, `iss`, `aud` contains the audience, `exp`/`nbf` (60 s
    /// leeway), then derives the SPIFFE ID.
    pub fn attest(&self, token: &str, now: SystemTime) -> Result<SpiffeId, AttestError> {
        if token.len() > self.max_token_bytes {
            return Err(AttestError::Oversized("JWT"));
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(_sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AttestError::Malformed(
                "JWT must have three dot-separated parts".into(),
            ));
        };

        // Read `alg` ourselves rather than through jsonwebtoken's typed header: its Algorithm
        // enum cannot hold `none` (or any unknown name), so such a header would only surface
        // as a JSON error and we want the precise reason.
        let header: serde_json::Value = b64(header_b64)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(serde_json::Value::is_object)
            .ok_or_else(|| AttestError::Malformed("JWT header is not base64url JSON".into()))?;
        let alg_name = header
            .get("alg")
            .and_then(|a| a.as_str())
            .ok_or_else(|| AttestError::Malformed("JWT header has no `alg`".into()))?;
        let Some(alg) = ALLOWED_ALGS
            .iter()
            .find(|(n, _)| *n == alg_name)
            .map(|(_, a)| *a)
        else {
            return Err(AttestError::AlgNotAllowed(clip(alg_name, 32)));
        };
        // RFC 7515 4.1.11: "If any of the listed extension Header Parameters are not understood
        // and supported by the recipient, then the JWS is invalid." We support none.
        if header.get("crit").is_some() {
            return Err(AttestError::Malformed(
                "JWT header lists `crit` extensions; none are supported".into(),
            ));
        }
        let kid = header
            .get("kid")
            .and_then(|k| k.as_str())
            .ok_or_else(|| AttestError::UnknownKid("<none>".into()))?;
        let keys = self.keys.load();
        let issuer_key = keys
            .get(kid)
            .ok_or_else(|| AttestError::UnknownKid(clip(kid, 64)))?;
        // The key decides the algorithm family, never the token: an RS256 header naming an EC
        // key (or the reverse) is refused before any verification.
        if !issuer_key.algs.contains(&alg) {
            return Err(AttestError::AlgNotAllowed(format!(
                "{alg_name} with key `{}`",
                clip(kid, 64)
            )));
        }

        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        // Without these, a token lacking `iss` or `aud` would skip those checks.
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        // jsonwebtoken checks times against the system clock; we check them below against
        // `now`, so tests and callers control the clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 60;
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &issuer_key.key, &validation)
            .map_err(|e| self.map_jwt_error(e, alg_name, kid, payload_b64))?
            .claims;

        // RFC 7519 4.1.4: the token "MUST NOT be accepted for processing" on or after `exp`;
        // 4.1.5: "MUST NOT be accepted for processing" before `nbf`. Both with leeway.
        let now_s = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let exp = numeric_date(&claims, "exp")?
            .ok_or_else(|| AttestError::Malformed("JWT lacks the `exp` claim".into()))?;
        if now_s > exp + LEEWAY_SECS {
            return Err(AttestError::Expired);
        }
        if let Some(nbf) = numeric_date(&claims, "nbf")? {
            if nbf > now_s + LEEWAY_SECS {
                return Err(AttestError::NotYetValid);
            }
        }

        let k8s = claims.get("kubernetes.io");
        let namespace = k8s
            .and_then(|k| k.get("namespace"))
            .and_then(|n| n.as_str());
        let service_account = k8s
            .and_then(|k| k.get("serviceaccount"))
            .and_then(|sa| sa.get("name"))
            .and_then(|n| n.as_str());
        let (Some(ns), Some(sa)) = (namespace, service_account) else {
            return Err(AttestError::MissingClaims);
        };
        // Each name must stay one path segment: a `/` would let a name forge a different
        // path (`ns/a/sa/b/ns/c`). Kubernetes names are DNS labels/subdomains anyway.
        for (what, v) in [("namespace", ns), ("service account", sa)] {
            if !is_segment(v) {
                return Err(AttestError::BadIdentity(format!(
                    "{what} `{}` is not a valid SPIFFE ID path segment",
                    clip(v, 64)
                )));
            }
        }
        SpiffeId::from_parts(&self.trust_domain, &format!("/ns/{ns}/sa/{sa}"))
            .map_err(|e| AttestError::BadIdentity(e.to_string()))
    }

    fn map_jwt_error(
        &self,
        e: jsonwebtoken::errors::Error,
        alg: &str,
        kid: &str,
        payload_b64: &str,
    ) -> AttestError {
        match e.kind() {
            ErrorKind::InvalidSignature => AttestError::BadSignature,
            ErrorKind::InvalidIssuer => {
                // The signature verified before claims are checked, so this `iss` was written
                // by a trusted key: safe (and useful) to show.
                let iss = b64(payload_b64)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|c| c.get("iss").map(|i| i.to_string()))
                    .unwrap_or_default();
                AttestError::WrongIssuer(clip(iss.trim_matches('"'), 128))
            }
            ErrorKind::InvalidAudience => AttestError::WrongAudience(self.audience.clone()),
            ErrorKind::MissingRequiredClaim(c) if c == "iss" => {
                AttestError::WrongIssuer("<none>".into())
            }
            ErrorKind::MissingRequiredClaim(c) if c == "aud" => {
                AttestError::WrongAudience(self.audience.clone())
            }
            ErrorKind::MissingRequiredClaim(c) => {
                AttestError::Malformed(format!("JWT lacks the `{c}` claim"))
            }
            ErrorKind::InvalidAlgorithm => AttestError::AlgNotAllowed(alg.to_string()),
            ErrorKind::ExpiredSignature => AttestError::Expired,
            ErrorKind::ImmatureSignature => AttestError::NotYetValid,
            // The key passed the load-time checks but the crypto library refuses it: our
            // configuration, not the caller's token.
            ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat => {
                AttestError::Internal(format!("JWKS key `{}` is unusable", clip(kid, 64)))
            }
            _ => AttestError::Malformed(format!("JWT is not well-formed: {e}")),
        }
    }
}

/// A NumericDate claim (RFC 7519 2: seconds, possibly fractional), if present.
fn numeric_date(claims: &serde_json::Value, name: &str) -> Result<Option<f64>, AttestError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| AttestError::Malformed(format!("JWT `{name}` is not a number"))),
    }
}

/// SPIFFE-ID spec 2.2: path segments are `[A-Za-z0-9._-]`, not empty, not `.` or `..`.
fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// At most `max` characters of caller-supplied text, for error messages and the audit log.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Fuzzing entry point (`fuzz/fuzz_targets/jwks_parse.rs`, run on stable by
/// `tests/fuzz_bodies.rs`): text → [`JwksKeys::parse`] must not panic; a set that parses is
/// not empty, and a token naming each of its keys with every allowed algorithm (and a junk
/// signature) is refused without panicking, whatever odd key material the set holds. Not API.
#[doc(hidden)]
pub fn fuzz_jwks(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(keys) = JwksKeys::parse(&text, Path::new("fuzz.json"), MAX_JWKS_BYTES) else {
        return;
    };
    assert!(!keys.is_empty());
    let ids = keys.key_ids();
    assert_eq!(ids.len(), keys.len());
    let Ok(td) = TrustDomain::parse("example.org") else {
        return;
    };
    let attestor = K8sAttestor::new(keys, FUZZ_ISSUER, "trellis", &td);
    let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let payload = enc(br#"{"iss":"x","aud":"trellis","exp":1}"#);
    for kid in ids.iter().take(4) {
        for (alg, _) in ALLOWED_ALGS {
            let header = serde_json::json!({"alg": alg, "kid": kid}).to_string();
            let token = format!("{}.{payload}.{}", enc(header.as_bytes()), enc(&[1; 64]));
            assert!(attestor.attest(&token, UNIX_EPOCH).is_err());
        }
    }
}

/// The issuer [`fuzz_attest`] expects.
#[doc(hidden)]
pub const FUZZ_ISSUER: &str = "https://kubernetes.default.svc";
/// The instant [`fuzz_attest`] verifies at (seconds since the epoch).
#[doc(hidden)]
pub const FUZZ_NOW: u64 = 1_700_000_000;

/// Fuzzing entry point (`fuzz/fuzz_targets/jwt_attest.rs`, run on stable by
/// `tests/fuzz_bodies.rs`) for [`K8sAttestor::attest`] against a fixed JWKS holding one
/// P-256 key, `k1`. The first byte picks the mode: even, the rest is the token as is; odd,
/// the rest is `header JSON NUL claims JSON`, which is signed with `k1`'s private key, so the
/// fuzzer reaches the claim checks behind the signature. Must never panic; an accepted token
/// is ES256, names `k1`, and yields `spiffe://example.org/ns/<segment>/sa/<segment>`.
/// Returns whether the token was accepted. Not API.
#[doc(hidden)]
pub fn fuzz_attest(data: &[u8]) -> bool {
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
    use std::sync::OnceLock;

    struct Fixture {
        key: EcdsaKeyPair,
        attestor: K8sAttestor,
    }
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let fixture = FIXTURE.get_or_init(|| {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).ok()?;
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).ok()?;
        let point = key.public_key().as_ref();
        let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
            "use": "sig", "x": enc(point.get(1..33)?), "y": enc(point.get(33..65)?)}]});
        let td = TrustDomain::parse("example.org").ok()?;
        let attestor = K8sAttestor::from_jwks_json(
            &jwks.to_string(),
            Path::new("fuzz.json"),
            FUZZ_ISSUER,
            "trellis",
            &td,
        )
        .ok()?;
        Some(Fixture { key, attestor })
    });
    let (Some(fixture), Some((&mode, rest))) = (fixture, data.split_first()) else {
        return false;
    };
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let (header, claims) = match rest.iter().position(|&b| b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (&br#"{"alg":"ES256","kid":"k1"}"#[..], rest),
        };
        let input = format!("{}.{}", enc(header), enc(claims));
        let Ok(sig) = fixture.key.sign(&rng, input.as_bytes()) else {
            return false;
        };
        format!("{input}.{}", enc(sig.as_ref()))
    };
    let now = UNIX_EPOCH + std::time::Duration::from_secs(FUZZ_NOW);
    let Ok(id) = fixture.attestor.attest(&token, now) else {
        return false;
    };
    let header: Option<serde_json::Value> = token
        .split('.')
        .next()
        .and_then(|h| b64(h).ok())
        .and_then(|h| serde_json::from_slice(&h).ok());
    assert_eq!(
        header.as_ref().and_then(|h| h.get("alg")?.as_str()),
        Some("ES256")
    );
    assert_eq!(
        header.as_ref().and_then(|h| h.get("kid")?.as_str()),
        Some("k1")
    );
    let path = id.as_str().strip_prefix("spiffe://example.org/ns/");
    let parts: Vec<&str> = path.map(|p| p.split('/').collect()).unwrap_or_default();
    assert!(
        matches!(parts.as_slice(), [ns, "sa", sa] if is_segment(ns) && is_segment(sa)),
        "{id}"
    );
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::Algorithm;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::pkcs8::{EncodePublicKey as _, LineEnding};
    use rsa::traits::PublicKeyParts as _;
    use serde_json::json;
    use std::sync::OnceLock;
    use std::time::Duration;

    pub(crate) const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
    pub(crate) const NOW: u64 = 1_700_000_000;

    pub(crate) struct TestKeys {
        rsa_pkcs1_der: Vec<u8>,
        rsa_public_pem: String,
        ec_pkcs8_der: Vec<u8>,
        pub(crate) jwks: String,
    }

    /// RSA-2048 generation is slow in debug builds: once per test binary.
    pub(crate) fn keys() -> &'static TestKeys {
        static KEYS: OnceLock<TestKeys> = OnceLock::new();
        KEYS.get_or_init(|| {
            let rsa = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
            let public = rsa.to_public_key();
            let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let point = ec.public_key_raw();
            let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            let jwks = json!({"keys": [
                {"use": "sig", "kty": "RSA", "kid": "rsa-1", "alg": "RS256",
                 "n": enc(&public.n().to_bytes_be()), "e": enc(&public.e().to_bytes_be())},
                {"kty": "EC", "kid": "ec-1", "crv": "P-256",
                 "x": enc(&point[1..33]), "y": enc(&point[33..65])},
            ]})
            .to_string();
            TestKeys {
                rsa_pkcs1_der: rsa.to_pkcs1_der().unwrap().as_bytes().to_vec(),
                rsa_public_pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
                ec_pkcs8_der: ec.serialize_der(),
                jwks,
            }
        })
    }

    pub(crate) fn td() -> TrustDomain {
        TrustDomain::parse("td.example").unwrap()
    }

    pub(crate) fn attestor() -> K8sAttestor {
        K8sAttestor::from_jwks_json(
            &keys().jwks,
            Path::new("jwks.json"),
            ISSUER,
            "trellis",
            &td(),
        )
        .unwrap()
    }

    pub(crate) fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    /// Claims as a projected service-account token carries them.
    pub(crate) fn claims(ns: &str, sa: &str) -> serde_json::Value {
        json!({
            "aud": ["trellis"],
            "exp": NOW + 3600,
            "iat": NOW - 10,
            "nbf": NOW - 10,
            "iss": ISSUER,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "kubernetes.io": {
                "namespace": ns,
                "pod": {"name": "web-0", "uid": "0b0c"},
                "serviceaccount": {"name": sa, "uid": "9f3e"},
            },
        })
    }

    fn header(alg: Algorithm, kid: &str) -> Header {
        let mut h = Header::new(alg);
        h.kid = Some(kid.to_string());
        h
    }

    pub(crate) fn rs256(claims: &serde_json::Value) -> String {
        sign_rs(Algorithm::RS256, "rsa-1", claims)
    }

    fn sign_rs(alg: Algorithm, kid: &str, claims: &serde_json::Value) -> String {
        let key = EncodingKey::from_rsa_der(&keys().rsa_pkcs1_der);
        encode(&header(alg, kid), claims, &key).unwrap()
    }

    fn es256(kid: &str, claims: &serde_json::Value) -> String {
        let key = EncodingKey::from_ec_der(&keys().ec_pkcs8_der);
        encode(&header(Algorithm::ES256, kid), claims, &key).unwrap()
    }

    /// A token whose header is exactly `header_json`, with the given signature part.
    fn raw_token(header_json: &serde_json::Value, claims: &serde_json::Value, sig: &str) -> String {
        let enc = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        format!("{}.{}.{sig}", enc(header_json), enc(claims))
    }

    fn sa_id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://td.example/ns/{ns}/sa/{sa}")).unwrap()
    }

    #[test]
    fn accepts_valid_sa_token() {
        let got = attestor().attest(&rs256(&claims("prod", "web")), now());
        assert_eq!(got, Ok(sa_id("prod", "web")));
    }

    #[test]
    fn accepts_es256_token() {
        let got = attestor().attest(&es256("ec-1", &claims("prod", "api")), now());
        assert_eq!(got, Ok(sa_id("prod", "api")));
    }

    #[test]
    fn accepts_ps256_with_rsa_key_without_alg_hint() {
        // Same RSA key published without `alg`: any RSA algorithm may verify with it.
        let k = keys();
        let mut jwks: serde_json::Value = serde_json::from_str(&k.jwks).unwrap();
        jwks["keys"][0].as_object_mut().unwrap().remove("alg");
        let a = K8sAttestor::from_jwks_json(
            &jwks.to_string(),
            Path::new("jwks.json"),
            ISSUER,
            "trellis",
            &td(),
        )
        .unwrap();
        let tok = sign_rs(Algorithm::PS256, "rsa-1", &claims("prod", "web"));
        assert_eq!(a.attest(&tok, now()), Ok(sa_id("prod", "web")));
    }

    #[test]
    fn rsa_key_pinned_to_rs256_refuses_ps256() {
        let tok = sign_rs(Algorithm::PS256, "rsa-1", &claims("prod", "web"));
        assert!(matches!(
            attestor().attest(&tok, now()),
            Err(AttestError::AlgNotAllowed(_))
        ));
    }

    #[test]
    fn accepts_string_audience() {
        let mut c = claims("prod", "web");
        c["aud"] = json!("trellis");
        assert_eq!(
            attestor().attest(&rs256(&c), now()),
            Ok(sa_id("prod", "web"))
        );
    }

    #[test]
    fn same_token_opens_several_streams() {
        // Envoy opens one stream per secret name with the same token: nothing is consumed.
        let a = attestor();
        let tok = rs256(&claims("prod", "web"));
        for _ in 0..3 {
            assert_eq!(a.attest(&tok, now()), Ok(sa_id("prod", "web")));
        }
    }

    #[test]
    fn rejects_alg_none() {
        let tok = raw_token(
            &json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"}),
            &claims("prod", "web"),
            "",
        );
        assert_eq!(
            attestor().attest(&tok, now()),
            Err(AttestError::AlgNotAllowed("none".into()))
        );
    }

    #[test]
    fn rejects_hs256_keyed_with_public_key() {
        // Algorithm confusion: HMAC "signed" with the issuer's public key, which anyone has.
        let secret = EncodingKey::from_secret(keys().rsa_public_pem.as_bytes());
        let tok = encode(
            &header(Algorithm::HS256, "rsa-1"),
            &claims("prod", "web"),
            &secret,
        )
        .unwrap();
        assert_eq!(
            attestor().attest(&tok, now()),
            Err(AttestError::AlgNotAllowed("HS256".into()))
        );
    }

    #[test]
    fn rejects_rs256_header_naming_ec_key() {
        let tok = sign_rs(Algorithm::RS256, "ec-1", &claims("prod", "web"));
        assert!(matches!(
            attestor().attest(&tok, now()),
            Err(AttestError::AlgNotAllowed(_))
        ));
    }

    #[test]
    fn rejects_es256_header_naming_rsa_key() {
        let tok = es256("rsa-1", &claims("prod", "web"));
        assert!(matches!(
            attestor().attest(&tok, now()),
            Err(AttestError::AlgNotAllowed(_))
        ));
    }

    #[test]
    fn rejects_expired() {
        let mut c = claims("prod", "web");
        c["exp"] = json!(NOW - 61);
        assert_eq!(
            attestor().attest(&rs256(&c), now()),
            Err(AttestError::Expired)
        );
    }

    #[test]
    fn accepts_expiry_within_leeway() {
        let mut c = claims("prod", "web");
        c["exp"] = json!(NOW - 30);
        assert!(attestor().attest(&rs256(&c), now()).is_ok());
    }

    #[test]
    fn rejects_not_yet_valid() {
        let mut c = claims("prod", "web");
        c["nbf"] = json!(NOW + 120);
        assert_eq!(
            attestor().attest(&rs256(&c), now()),
            Err(AttestError::NotYetValid)
        );
    }

    #[test]
    fn rejects_token_without_exp() {
        let mut c = claims("prod", "web");
        c.as_object_mut().unwrap().remove("exp");
        assert!(matches!(
            attestor().attest(&rs256(&c), now()),
            Err(AttestError::Malformed(m)) if m.contains("exp")
        ));
    }

    #[test]
    fn rejects_wrong_audience() {
        let mut c = claims("prod", "web");
        c["aud"] = json!(["https://kubernetes.default.svc"]);
        assert_eq!(
            attestor().attest(&rs256(&c), now()),
            Err(AttestError::WrongAudience("trellis".into()))
        );
    }

    #[test]
    fn rejects_missing_audience() {
        let mut c = claims("prod", "web");
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(
            attestor().attest(&rs256(&c), now()),
            Err(AttestError::WrongAudience("trellis".into()))
        );
    }

    #[test]
    fn rejects_wrong_issuer() {
        let mut c = claims("prod", "web");
        c["iss"] = json!("https://evil.example");
        assert_eq!(
            attestor().attest(&rs256(&c), now()),
            Err(AttestError::WrongIssuer("https://evil.example".into()))
        );
    }

    #[test]
    fn rejects_missing_issuer() {
        let mut c = claims("prod", "web");
        c.as_object_mut().unwrap().remove("iss");
        assert!(matches!(
            attestor().attest(&rs256(&c), now()),
            Err(AttestError::WrongIssuer(_))
        ));
    }

    #[test]
    fn rejects_unknown_kid() {
        let tok = sign_rs(Algorithm::RS256, "rotated-away", &claims("prod", "web"));
        assert_eq!(
            attestor().attest(&tok, now()),
            Err(AttestError::UnknownKid("rotated-away".into()))
        );
    }

    #[test]
    fn rejects_token_without_kid() {
        let key = EncodingKey::from_rsa_der(&keys().rsa_pkcs1_der);
        let tok = encode(&Header::new(Algorithm::RS256), &claims("prod", "web"), &key).unwrap();
        assert!(matches!(
            attestor().attest(&tok, now()),
            Err(AttestError::UnknownKid(_))
        ));
    }

    #[test]
    fn rejects_bad_signature() {
        // Re-point a valid token at another service account, keeping the signature.
        let tok = rs256(&claims("prod", "web"));
        let sig = tok.rsplit('.').next().unwrap();
        let forged = raw_token(
            &json!({"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}),
            &claims("kube-system", "admin"),
            sig,
        );
        assert_eq!(
            attestor().attest(&forged, now()),
            Err(AttestError::BadSignature)
        );
    }

    #[test]
    fn rejects_crit_header() {
        let tok = raw_token(
            &json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}),
            &claims("prod", "web"),
            "AAAA",
        );
        assert!(matches!(
            attestor().attest(&tok, now()),
            Err(AttestError::Malformed(m)) if m.contains("crit")
        ));
    }

    #[test]
    fn rejects_missing_kubernetes_claims() {
        let mut c = claims("prod", "web");
        c.as_object_mut().unwrap().remove("kubernetes.io");
        assert_eq!(
            attestor().attest(&rs256(&c), now()),
            Err(AttestError::MissingClaims)
        );
    }

    #[test]
    fn rejects_namespace_with_slash() {
        let c = claims("prod/sa/admin/ns/x", "web");
        assert!(matches!(
            attestor().attest(&rs256(&c), now()),
            Err(AttestError::BadIdentity(_))
        ));
    }

    #[test]
    fn rejects_oversized_token() {
        let tok = "a".repeat(MAX_JWT_BYTES + 1);
        assert!(matches!(
            attestor().attest(&tok, now()),
            Err(AttestError::Oversized(_))
        ));
        // A configured limit applies: a real token over it is refused unparsed.
        let good = rs256(&claims("prod", "web"));
        assert!(attestor().attest(&good, now()).is_ok());
        let small = attestor().with_max_token_bytes(good.len() - 1);
        assert!(matches!(
            small.attest(&good, now()),
            Err(AttestError::Oversized(_))
        ));
    }

    #[test]
    fn rejects_garbage_tokens() {
        let a = attestor();
        for tok in ["", "abc", "a.b", "a.b.c.d", "!!!.e30.x", "e30.e30.x"] {
            assert!(
                matches!(a.attest(tok, now()), Err(AttestError::Malformed(_))),
                "{tok:?}"
            );
        }
    }

    #[test]
    fn symmetric_key_beside_rsa_key_is_never_used() {
        // Even with an `oct` key under the token's kid, HS256 is refused.
        let k = keys();
        let mut jwks: serde_json::Value = serde_json::from_str(&k.jwks).unwrap();
        jwks["keys"]
            .as_array_mut()
            .unwrap()
            .push(json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}));
        let a = K8sAttestor::from_jwks_json(
            &jwks.to_string(),
            Path::new("jwks.json"),
            ISSUER,
            "trellis",
            &td(),
        )
        .unwrap();
        let tok = encode(
            &header(Algorithm::HS256, "hmac"),
            &claims("prod", "web"),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert_eq!(
            a.attest(&tok, now()),
            Err(AttestError::AlgNotAllowed("HS256".into()))
        );
    }

    /// The same test EC key republished under another kid, as a JWKS with only that key.
    fn ec_only_jwks(kid: &str) -> String {
        let mut jwks: serde_json::Value = serde_json::from_str(&keys().jwks).unwrap();
        let mut ec = jwks["keys"][1].clone();
        ec["kid"] = json!(kid);
        jwks["keys"] = json!([ec]);
        jwks.to_string()
    }

    #[test]
    fn swapped_keys_verify_from_the_next_attestation_on() {
        let a = attestor();
        let store = a.key_store();
        assert_eq!(store.key_ids(), ["ec-1", "rsa-1"]);
        let old = rs256(&claims("prod", "web"));
        let new = es256("ec-2", &claims("prod", "api"));
        assert_eq!(a.attest(&old, now()), Ok(sa_id("prod", "web")));
        assert_eq!(
            a.attest(&new, now()),
            Err(AttestError::UnknownKid("ec-2".into()))
        );

        // The issuer rotated: only `ec-2` is published now.
        store.store(
            JwksKeys::parse(
                &ec_only_jwks("ec-2"),
                Path::new("https://jwks"),
                MAX_JWKS_BYTES,
            )
            .unwrap(),
        );
        assert_eq!(store.key_ids(), ["ec-2"]);
        assert_eq!(a.attest(&new, now()), Ok(sa_id("prod", "api")));
        assert_eq!(
            a.attest(&old, now()),
            Err(AttestError::UnknownKid("rsa-1".into()))
        );
    }

    #[test]
    fn a_bad_key_set_is_never_stored() {
        // parse → validate → swap: a body that does not parse never reaches the store, so the
        // keys in force stay.
        let a = attestor();
        let source = Path::new("https://kubernetes.default.svc/openid/v1/jwks");
        for body in [
            "<html>oops</html>",
            r#"{"keys":[]}"#,
            "",
            r#"{"keys":[{"kty":"oct","kid":"k","k":"c2VjcmV0"}]}"#,
        ] {
            let err = JwksKeys::parse(body, source, MAX_JWKS_BYTES)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(source.to_str().unwrap()), "{err}");
        }
        assert_eq!(a.key_store().key_ids(), ["ec-1", "rsa-1"]);
        assert!(a.attest(&rs256(&claims("prod", "web")), now()).is_ok());
    }

    #[test]
    fn key_store_is_shared_with_concurrent_attestations() {
        let a = std::sync::Arc::new(attestor());
        let store = a.key_store();
        let tok = es256("ec-1", &claims("prod", "web"));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let a = a.clone();
                let tok = tok.clone();
                std::thread::spawn(move || {
                    // Every attestation sees a whole set: either the old one or the new one
                    // (both hold `ec-1` with the same key), never a half-built one.
                    (0..200).all(|_| a.attest(&tok, now()).is_ok())
                })
            })
            .collect();
        for _ in 0..50 {
            store.store(
                JwksKeys::parse(&ec_only_jwks("ec-1"), Path::new("j"), MAX_JWKS_BYTES).unwrap(),
            );
            store.store(JwksKeys::parse(&keys().jwks, Path::new("j"), MAX_JWKS_BYTES).unwrap());
        }
        for r in readers {
            assert!(r.join().unwrap());
        }
    }
}
