//! The JWT-SVID signing keys: ES256 (P-256), one `kid` each (the RFC 7638 thumbprint), kept
//! in the registry so every replica on a shared PostgreSQL signs with the same keys and
//! publishes the same bundle.
//!
//! Rotation, with overlap on both sides (JWT-SVID spec §4: a validator needs the key a token
//! names, so a key must be in bundles before its first token and after its last):
//!
//! ```text
//!   key A  ──published──[====== signs ======)──published until A's last token expired──
//!   key B                 ·  stored+published [====== signs ======)──…
//!                         ·  (half a period before it signs)
//! ```
//!
//! Each key signs for `jwt_key_rotate_every`. Half-way through, the next key is stored with
//! the window that starts where the current one ends, and is published from then on. After
//! its window a key stays published for `jwt_svid_ttl` plus the validators' skew, then is
//! deleted. Replicas racing to add the next key agree through the table's unique window
//! start: the first insert wins and every replica reads it back.
//!
//! [`JwtSigner`] is the one type that holds a private key and signs: a PKCS#11 key source
//! can replace what builds it without touching issuance.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use tokio::sync::watch;
use trellis_identity::jwt::{self as jwt_svid, JwtBundle, JwtKey, NewJwtSvid};
use trellis_identity::TrustDomain;
use trellis_serve::time::unix_millis;
use zeroize::Zeroizing;

use crate::metrics::ControlMetrics;
use crate::registry::{JwtKeyRow, Registry, RegistryError};

/// A JWT signing key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum JwtKeyError {
    /// The stored key is not a P-256 PKCS#8 key.
    #[error("JWT signing key `{kid}` in the registry is unusable: {problem}")]
    BadKey {
        /// Its stored ID.
        kid: String,
        /// What is wrong.
        problem: String,
    },
    /// Signing failed.
    #[error("cannot sign a JWT-SVID: {0}")]
    Sign(String),
    /// A new signing key could not be made.
    #[error("cannot create a JWT-SVID signing key: {0}")]
    Generate(String),
    /// The registry could not be read or written.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// One ES256 private key and its `kid`: loads and signs, nothing else. The key is a
/// [`SigningKey`](crate::keys::SigningKey), the one key type of the control plane, so it can
/// live in memory or in a PKCS#11 token like the CA and log keys.
pub struct JwtSigner {
    key: crate::keys::SigningKey,
    public: JwtKey,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtSigner({})", self.public.kid())
    }
}

impl JwtSigner {
    /// A fresh key: the signer and its PKCS#8 DER (to store).
    pub fn generate() -> Result<(Self, Zeroizing<Vec<u8>>), JwtKeyError> {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|e| JwtKeyError::Generate(e.to_string()))?;
        let pkcs8 = Zeroizing::new(pkcs8.as_ref().to_vec());
        let signer = Self::from_pkcs8(&pkcs8).map_err(|e| JwtKeyError::Sign(e.to_string()))?;
        Ok((signer, pkcs8))
    }

    /// Loads a P-256 PKCS#8 DER key; its `kid` is its public key's thumbprint.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, JwtKeyError> {
        // Checked here for the message; `SigningKey` would take other algorithms too.
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8).map_err(|e| {
            JwtKeyError::BadKey {
                kid: String::new(),
                problem: format!("not a P-256 PKCS#8 key: {e}"),
            }
        })?;
        let key =
            crate::keys::SigningKey::from_pkcs8_der(pkcs8).map_err(|e| JwtKeyError::BadKey {
                kid: String::new(),
                problem: e.to_string(),
            })?;
        Self::from_key(key)
    }

    /// Any P-256 signing key, in memory or in a PKCS#11 token; its `kid` is its public key's
    /// thumbprint.
    pub fn from_key(key: crate::keys::SigningKey) -> Result<Self, JwtKeyError> {
        let bad = |problem: String| JwtKeyError::BadKey {
            kid: String::new(),
            problem,
        };
        let point = key.public_key_raw();
        let kid = JwtKey::thumbprint(point).map_err(|e| bad(e.to_string()))?;
        let public = JwtKey::from_point(kid, point).map_err(|e| bad(e.to_string()))?;
        Ok(Self { key, public })
    }

    /// The key ID (`kid` header).
    pub fn kid(&self) -> &str {
        self.public.kid()
    }

    /// The public key, as published.
    pub fn public_key(&self) -> &JwtKey {
        &self.public
    }

    /// Signs `claims` into a compact JWS with header `{alg: ES256, kid, typ: JWT}`.
    pub fn sign(&self, claims: &NewJwtSvid<'_>) -> Result<String, JwtKeyError> {
        let input = claims.signing_input(self.kid());
        let sig = self
            .key
            .sign_fixed(input.as_bytes())
            .map_err(|e| JwtKeyError::Sign(e.to_string()))?;
        Ok(jwt_svid::assemble(&input, &sig))
    }
}

/// How keys rotate.
#[derive(Clone, Copy, Debug)]
pub struct JwtKeyPolicy {
    /// How long each key signs (`jwt_key_rotate_every`).
    pub rotate_every: Duration,
    /// JWT-SVID lifetime (`jwt_svid_ttl`): how long a key stays published after it signed.
    pub token_ttl: Duration,
}

impl JwtKeyPolicy {
    fn period_ms(&self) -> i64 {
        ms(self.rotate_every).max(1)
    }

    /// After its window a key stays published this long: its last token's lifetime plus the
    /// skew validators allow.
    fn retain_ms(&self) -> i64 {
        ms(self.token_ttl + jwt_svid::DEFAULT_SKEW)
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What the stored rows mean at `now_ms`.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// The row that signs now (latest window start covering now).
    signing: Option<usize>,
    /// A key to create: its window `(from, until)`.
    create: Option<(i64, i64)>,
    /// Rows still published.
    published: Vec<usize>,
    /// Rows past retention (to delete).
    expired: bool,
}

/// The pure rotation rule (module docs), unit-tested without a database or a clock.
fn plan(rows: &[JwtKeyRow], now_ms: i64, policy: JwtKeyPolicy) -> Plan {
    let period = policy.period_ms();
    let signing = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.sign_from_ms <= now_ms && now_ms < r.sign_until_ms)
        .max_by_key(|(_, r)| r.sign_from_ms)
        .map(|(i, _)| i);
    let create = match signing.map(|i| &rows[i]) {
        // First start, or every key's window is over (a long outage): one that signs now.
        None => Some((now_ms, now_ms.saturating_add(period))),
        Some(cur) => {
            let half = (cur.sign_until_ms - cur.sign_from_ms) / 2;
            let has_next = rows.iter().any(|r| r.sign_from_ms >= cur.sign_until_ms);
            (now_ms >= cur.sign_from_ms + half && !has_next)
                .then(|| (cur.sign_until_ms, cur.sign_until_ms.saturating_add(period)))
        }
    };
    let retain = policy.retain_ms();
    let published = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.sign_until_ms.saturating_add(retain) > now_ms)
        .map(|(i, _)| i)
        .collect::<Vec<_>>();
    Plan {
        signing,
        create,
        expired: published.len() < rows.len(),
        published,
    }
}

/// Where new JWT-SVID keys are made when the CA key lives in a PKCS#11 token: the same token,
/// so no private key of the control plane is ever on its disk or in its database.
#[derive(Clone, Debug)]
pub struct JwtKeyToken {
    /// Opens the keys.
    pub keyring: crate::keys::Keyring,
    /// The token's label (`None`: the module's only token).
    pub token: Option<String>,
}

/// A stored key that is a PKCS#11 URI rather than PKCS#8 (the row's `pkcs8` column holds
/// the URI's text, which starts with this).
const TOKEN_KEY_PREFIX: &[u8] = b"pkcs11:";

/// The keys in force, refreshed from the registry: the signer, and the bundle as a watch
/// (every change is pushed to `WatchJwtBundle` streams).
pub struct JwtKeys {
    registry: Arc<Registry>,
    token: Option<JwtKeyToken>,
    policy: JwtKeyPolicy,
    trust_domain: TrustDomain,
    signer: ArcSwapOption<JwtSigner>,
    bundle: watch::Sender<Arc<JwtBundle>>,
    /// Parsed keys by `kid`, so a refresh parses only new rows.
    parsed: Mutex<HashMap<String, Arc<JwtSigner>>>,
    metrics: Arc<ControlMetrics>,
}

impl JwtKeys {
    /// Loads (creating on first start) the keys; fails if the registry cannot be read.
    pub fn load(
        registry: Arc<Registry>,
        trust_domain: TrustDomain,
        policy: JwtKeyPolicy,
        metrics: Arc<ControlMetrics>,
    ) -> Result<Arc<Self>, JwtKeyError> {
        Self::load_with_token(registry, trust_domain, policy, metrics, None)
    }

    /// [`JwtKeys::load`], making new keys inside `token` when given.
    pub fn load_with_token(
        registry: Arc<Registry>,
        trust_domain: TrustDomain,
        policy: JwtKeyPolicy,
        metrics: Arc<ControlMetrics>,
        token: Option<JwtKeyToken>,
    ) -> Result<Arc<Self>, JwtKeyError> {
        let (bundle, _) = watch::channel(Arc::new(JwtBundle::new(trust_domain.clone(), vec![])));
        let keys = Arc::new(Self {
            registry,
            token,
            policy,
            trust_domain,
            signer: ArcSwapOption::empty(),
            bundle,
            parsed: Mutex::new(HashMap::new()),
            metrics,
        });
        keys.refresh(SystemTime::now())?;
        Ok(keys)
    }

    /// The key that signs now, if any.
    pub fn signer(&self) -> Option<Arc<JwtSigner>> {
        self.signer.load_full()
    }

    /// The published bundle, now and on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<JwtBundle>> {
        self.bundle.subscribe()
    }

    /// The JWT-SVID lifetime.
    pub fn token_ttl(&self) -> Duration {
        self.policy.token_ttl
    }

    /// Applies the rotation rule at `now`: creates the next key when due, deletes keys past
    /// retention, installs the signer and publishes the bundle if it changed.
    pub fn refresh(&self, now: SystemTime) -> Result<(), JwtKeyError> {
        let now_ms = unix_millis(now);
        let mut rows = self.registry.jwt_keys()?;
        let mut p = plan(&rows, now_ms, self.policy);
        if let Some((from, until)) = p.create {
            let (signer, pkcs8) = self.generate(from)?;
            let row = JwtKeyRow {
                kid: signer.kid().to_owned(),
                pkcs8,
                sign_from_ms: from,
                sign_until_ms: until,
            };
            if self.registry.insert_jwt_key(&row)? {
                tracing::info!(
                    kid = signer.kid(),
                    sign_from_ms = from,
                    sign_until_ms = until,
                    "new JWT-SVID signing key published"
                );
            }
            // Another replica's key may have won the window: read back what is stored.
            rows = self.registry.jwt_keys()?;
            p = plan(&rows, now_ms, self.policy);
        }
        if p.expired {
            let before = now_ms.saturating_sub(self.policy.retain_ms());
            let n = self.registry.prune_jwt_keys(before)?;
            if n > 0 {
                tracing::info!(deleted = n, "retired JWT-SVID signing keys deleted");
            }
        }
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        let mut load = |row: &JwtKeyRow| -> Result<Arc<JwtSigner>, JwtKeyError> {
            if let Some(s) = parsed.get(&row.kid) {
                return Ok(Arc::clone(s));
            }
            let s = self.open(&row.pkcs8).map_err(|e| match e {
                JwtKeyError::BadKey { problem, .. } => JwtKeyError::BadKey {
                    kid: row.kid.clone(),
                    problem,
                },
                other => other,
            })?;
            let s = Arc::new(s);
            parsed.insert(row.kid.clone(), Arc::clone(&s));
            Ok(s)
        };
        let mut published = Vec::with_capacity(p.published.len());
        for &i in &p.published {
            published.push(load(&rows[i])?.public_key().clone());
        }
        let signer = p.signing.map(|i| load(&rows[i])).transpose()?;
        parsed.retain(|kid, _| rows.iter().any(|r| &r.kid == kid));
        drop(parsed);
        // Publish before signing with a new key: a bundle that lacks the signer's key would
        // make its first tokens unverifiable.
        let bundle = JwtBundle::new(self.trust_domain.clone(), published);
        self.bundle.send_if_modified(|current| {
            if **current == bundle {
                false
            } else {
                *current = Arc::new(bundle);
                true
            }
        });
        self.metrics
            .jwt_keys
            .set(i64::try_from(p.published.len()).unwrap_or(i64::MAX));
        let changed = match (&signer, self.signer.load().as_ref()) {
            (Some(a), Some(b)) => a.kid() != b.kid(),
            (None, None) => false,
            _ => true,
        };
        if changed {
            if let Some(s) = &signer {
                tracing::info!(kid = s.kid(), "JWT-SVID signing key now in use");
            }
            self.signer.store(signer);
        }
        Ok(())
    }

    /// A new key for the window starting at `from_ms`: inside the token when there is one
    /// (what is stored is then its URI), else in memory (stored as PKCS#8).
    fn generate(&self, from_ms: i64) -> Result<(JwtSigner, Zeroizing<Vec<u8>>), JwtKeyError> {
        let Some(t) = &self.token else {
            return JwtSigner::generate();
        };
        let ring = t.keyring.pkcs11().ok_or_else(|| {
            JwtKeyError::Generate(
                "the CA key is in a PKCS#11 token but no module is loaded: pass --pkcs11-module and --pkcs11-pin-file".into(),
            )
        })?;
        // Unique per window and per replica: racing replicas each make one; the registry
        // keeps the first, and the other stays unused in the token.
        let mut suffix = [0u8; 4];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut suffix);
        let label = format!("trellis-jwt-{from_ms}-{}", hex::encode(suffix));
        let key = ring.generate(t.token.as_deref(), &label).map_err(|e| {
            JwtKeyError::Generate(format!("in the PKCS#11 token, as `{label}`: {e}"))
        })?;
        let stored = Zeroizing::new(key.uri().to_string().into_bytes());
        let signer = JwtSigner::from_key(crate::keys::SigningKey::token(key))?;
        Ok((signer, stored))
    }

    /// Opens a stored key: PKCS#8, or the URI of a key in the token.
    fn open(&self, stored: &[u8]) -> Result<JwtSigner, JwtKeyError> {
        if !stored.starts_with(TOKEN_KEY_PREFIX) {
            return JwtSigner::from_pkcs8(stored);
        }
        let bad = |problem: String| JwtKeyError::BadKey {
            kid: String::new(),
            problem,
        };
        let text = std::str::from_utf8(stored).map_err(|e| bad(e.to_string()))?;
        let uri = crate::keys::Pkcs11Uri::parse(text).map_err(|e| bad(e.to_string()))?;
        // Without a module, the keyring's own error names the URI and the flags to pass.
        let no_module = crate::keys::Keyring::default();
        let keyring = self.token.as_ref().map_or(&no_module, |t| &t.keyring);
        let key = keyring.token_key(&uri).map_err(|e| bad(e.to_string()))?;
        JwtSigner::from_key(key)
    }

    /// Refreshes every `every` until `shutdown`; a failed refresh keeps the keys in force.
    pub async fn run(self: Arc<Self>, every: Duration, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            let keys = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || keys.refresh(SystemTime::now())).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot refresh the JWT signing keys; keeping the keys in force")
                }
                Err(e) => tracing::error!(error = %e, "JWT key refresh task failed"),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const POLICY: JwtKeyPolicy = JwtKeyPolicy {
        rotate_every: Duration::from_secs(100),
        token_ttl: Duration::from_secs(10),
    };

    fn row(kid: &str, from_s: i64, until_s: i64) -> JwtKeyRow {
        JwtKeyRow {
            kid: kid.into(),
            pkcs8: Zeroizing::new(vec![]),
            sign_from_ms: from_s * 1000,
            sign_until_ms: until_s * 1000,
        }
    }

    #[test]
    fn first_start_creates_a_key_that_signs_now() {
        let p = plan(&[], 5_000, POLICY);
        assert_eq!(p.create, Some((5_000, 105_000)));
        assert_eq!(p.signing, None);
    }

    #[test]
    fn next_key_is_published_half_a_period_before_it_signs() {
        let rows = [row("a", 0, 100)];
        // Before half-way: nothing to do.
        let p = plan(&rows, 49_999, POLICY);
        assert_eq!((p.signing, p.create), (Some(0), None));
        // Half-way: the next key, for the window after A's.
        let p = plan(&rows, 50_000, POLICY);
        assert_eq!(p.create, Some((100_000, 200_000)));
        // Once stored, A still signs and both are published.
        let rows = [row("a", 0, 100), row("b", 100, 200)];
        let p = plan(&rows, 60_000, POLICY);
        assert_eq!((p.signing, p.create), (Some(0), None));
        assert_eq!(p.published, vec![0, 1]);
        // At A's end, B signs; A stays published for the token lifetime plus skew.
        let p = plan(&rows, 100_000, POLICY);
        assert_eq!(p.signing, Some(1));
        assert_eq!(p.published, vec![0, 1]);
        let p = plan(&rows, 100_000 + 39_999, POLICY);
        assert_eq!(p.published, vec![0, 1]);
        let p = plan(&rows, 100_000 + 40_000, POLICY);
        assert_eq!(p.published, vec![1]);
        assert!(p.expired);
    }

    #[test]
    fn after_a_long_outage_a_fresh_key_signs_at_once() {
        let rows = [row("a", 0, 100), row("b", 100, 200)];
        let p = plan(&rows, 500_000, POLICY);
        assert_eq!(p.signing, None);
        assert_eq!(p.create, Some((500_000, 600_000)));
        assert!(p.published.is_empty());
    }

    #[test]
    fn signer_round_trips_and_kid_is_the_thumbprint() {
        let (signer, pkcs8) = JwtSigner::generate().unwrap();
        let again = JwtSigner::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(signer.kid(), again.kid());
        let id = trellis_identity::SpiffeId::parse("spiffe://example.org/a").unwrap();
        let aud = vec!["x".to_owned()];
        let now = SystemTime::now();
        let token = signer
            .sign(&NewJwtSvid {
                subject: &id,
                audiences: &aud,
                issued_at: now,
                expires_at: now + Duration::from_secs(60),
            })
            .unwrap();
        let bundle = JwtBundle::new(
            TrustDomain::parse("example.org").unwrap(),
            vec![again.public_key().clone()],
        );
        let ok =
            jwt_svid::validate(&token, &bundle, Some("x"), now, jwt_svid::DEFAULT_SKEW).unwrap();
        assert_eq!(ok.kid, signer.kid());
        assert!(JwtSigner::from_pkcs8(b"junk").is_err());
    }

    #[test]
    fn replicas_share_keys_through_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(Registry::open(&dir.path().join("t.db")).unwrap());
        let td = TrustDomain::parse("example.org").unwrap();
        let metrics = Arc::new(ControlMetrics::new());
        let a = JwtKeys::load(
            Arc::clone(&registry),
            td.clone(),
            POLICY,
            Arc::clone(&metrics),
        )
        .unwrap();
        let b = JwtKeys::load(Arc::clone(&registry), td, POLICY, metrics).unwrap();
        let (sa, sb) = (a.signer().unwrap(), b.signer().unwrap());
        assert_eq!(sa.kid(), sb.kid());
        assert_eq!(*a.subscribe().borrow(), *b.subscribe().borrow());
        // Half-way, one next key for both, published before it signs.
        let t = SystemTime::now() + Duration::from_secs(60);
        a.refresh(t).unwrap();
        b.refresh(t).unwrap();
        assert_eq!(registry.jwt_keys().unwrap().len(), 2);
        assert_eq!(a.subscribe().borrow().keys().len(), 2);
        assert_eq!(a.signer().unwrap().kid(), sa.kid());
        // After the window: the new key signs, in both.
        let t = SystemTime::now() + Duration::from_secs(101);
        a.refresh(t).unwrap();
        b.refresh(t).unwrap();
        assert_ne!(a.signer().unwrap().kid(), sa.kid());
        assert_eq!(a.signer().unwrap().kid(), b.signer().unwrap().kid());
        // Long after: the first key is gone from the bundle and the table.
        let t = SystemTime::now() + Duration::from_secs(190);
        a.refresh(t).unwrap();
        assert!(a.subscribe().borrow().key(sa.kid()).is_none());
        assert!(registry
            .jwt_keys()
            .unwrap()
            .iter()
            .all(|r| r.kid != sa.kid()));
    }
}
