//! A Kubernetes service-account token issuer for tests: an ES256 key, its JWKS, and projected
//! tokens signed with it, as `trellis control --k8s-jwks` and Envoy's SDS metadata use them.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::ensure;
use base64::Engine as _;

use crate::K8sOpts;

/// The `iss` of every token.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The `aud` of every token.
pub const AUDIENCE: &str = "trellis";
const KID: &str = "trellis-e2e-key";

/// An issuer: its signing key.
pub struct K8sIssuer {
    key: rcgen::KeyPair,
}

impl K8sIssuer {
    /// A fresh ECDSA P-256 key.
    pub fn new() -> anyhow::Result<Self> {
        Ok(K8sIssuer {
            key: rcgen::KeyPair::generate()?,
        })
    }

    /// The JWKS (one key, `kid` set), as JSON.
    pub fn jwks(&self) -> anyhow::Result<String> {
        let point = self.key.public_key_raw(); // 0x04 || x || y
        ensure!(
            point.len() == 65 && point[0] == 4,
            "unexpected P-256 point encoding"
        );
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwks = serde_json::json!({
            "keys": [{
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": KID,
                "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..]),
            }]
        });
        Ok(serde_json::to_string_pretty(&jwks)?)
    }

    /// Writes the JWKS to `path` and returns the control plane settings that trust it.
    pub fn write_jwks(&self, path: &Path) -> anyhow::Result<K8sOpts> {
        std::fs::write(path, self.jwks()?)?;
        Ok(K8sOpts {
            jwks: path.to_path_buf(),
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
        })
    }

    /// A projected service-account token for `namespace/service_account`, valid for an hour.
    /// Trellis maps it to `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    pub fn token(&self, namespace: &str, service_account: &str) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = serde_json::json!({
            "iss": ISSUER,
            "aud": [AUDIENCE],
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": { "name": service_account, "uid": "0b5c3b4e-3f1a-4f39-9a51-1c8f3e0d2a77" },
            },
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(KID.to_string());
        Ok(jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_der(self.key.serialized_der()),
        )?)
    }
}
