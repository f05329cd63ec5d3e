//! Keys held by a PKCS#11 token (an HSM, a cloud HSM's client library, SoftHSM2 in tests).
//! The private key never leaves the token: we hash here and ask the token for `CKM_ECDSA`
//! over the digest (the mechanism every ECDSA token has; `CKM_ECDSA_SHA256` is optional).
//!
//! Sessions: PKCS#11 lets one session run one operation at a time, so each token has a pool
//! of sessions (`sessions`, a setting) and a signer borrows one. Login state belongs to the
//! application, not the session (PKCS#11 v2.40, 5.6: "all sessions that an application has
//! with a token … share the same login state"), so each newly opened session logs in and
//! takes `CKR_USER_ALREADY_LOGGED_IN` as success. A session the token closed, a lost login,
//! or a transient device error drops the session, opens (and logs in) a fresh one and tries
//! again, at most [`RETRIES`] times, each retry counted in `trellis_pkcs11_retries_total`.
//! Replicas each load the module and so hold their own sessions to the same (network) HSM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use prometheus_client::metrics::counter::Counter;
use sha2::Digest as _;
use zeroize::Zeroizing;

use super::error::KeyError;
use super::uri::Pkcs11Uri;

/// How many times a signature is retried after a transient token error.
pub const RETRIES: u32 = 3;
/// Sessions per token unless configured.
pub const DEFAULT_SESSIONS: usize = 4;
/// DER of the P-256 curve OID (1.2.840.10045.3.1.7), as CKA_EC_PARAMS holds it.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Where the PKCS#11 module and its PIN are, and how many sessions to keep per token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Settings {
    /// The module (`--pkcs11-module`), e.g. /usr/lib/softhsm/libsofthsm2.so.
    pub module: PathBuf,
    /// The file holding the user PIN (`--pkcs11-pin-file`); trailing newlines are ignored.
    pub pin_file: PathBuf,
    /// Sessions per token: how many signatures may run at once.
    pub sessions: usize,
}

/// One PKCS#11 module with its PIN: opens tokens by label and keys by URI.
pub struct Pkcs11Keyring {
    settings: Pkcs11Settings,
    ctx: Pkcs11,
    pin: AuthPin,
    tokens: Mutex<HashMap<String, Arc<Token>>>,
    retries: Counter,
}

/// Contexts by module path: `C_Initialize` may run once per process, and dropping a context
/// would `C_Finalize` the module under everyone else's sessions, so each module is loaded
/// once and kept for the life of the process.
fn module(path: &Path) -> Result<Pkcs11, KeyError> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = lock(MODULES.get_or_init(Default::default));
    if let Some(ctx) = modules.get(path) {
        return Ok(ctx.clone());
    }
    let err = |reason: String| KeyError::Module {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_file() {
        return Err(err(
            "no such file: pass the vendor's PKCS#11 library (.so)".into()
        ));
    }
    let ctx = Pkcs11::new(path).map_err(|e| err(e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(err(format!("C_Initialize: {e}"))),
    }
    modules.insert(path.to_path_buf(), ctx.clone());
    Ok(ctx)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind: keep using it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Pkcs11Keyring {
    /// Loads the module and reads the PIN; tokens are opened (and logged into) on first use.
    /// `retries` counts transient-error retries (`trellis_pkcs11_retries_total`).
    pub fn open(settings: Pkcs11Settings, retries: Counter) -> Result<Arc<Self>, KeyError> {
        let ctx = module(&settings.module)?;
        let pin = read_pin(&settings.pin_file)?;
        Ok(Arc::new(Self {
            settings,
            ctx,
            pin,
            tokens: Mutex::new(HashMap::new()),
            retries,
        }))
    }

    /// The module path.
    pub fn module(&self) -> &Path {
        &self.settings.module
    }

    /// The token labelled `label` (`None`: the module's only token), logged in.
    pub fn token(&self, label: Option<&str>) -> Result<Arc<Token>, KeyError> {
        let key = label.unwrap_or_default().to_owned();
        let mut tokens = lock(&self.tokens);
        if let Some(t) = tokens.get(&key) {
            return Ok(Arc::clone(t));
        }
        let (slot, found) = self.find_slot(label)?;
        let token = Arc::new(Token {
            ctx: self.ctx.clone(),
            slot,
            label: found,
            pin: self.pin.clone(),
            pin_file: self.settings.pin_file.clone(),
            max: self.settings.sessions.max(1),
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
            retries: self.retries.clone(),
        });
        // Log in now, so a wrong PIN stops the start rather than the first signature.
        let s = token.checkout()?;
        token.checkin(s);
        tokens.insert(key, Arc::clone(&token));
        Ok(token)
    }

    /// The private key `uri` names, with its public half read from the token.
    pub fn key(&self, uri: &Pkcs11Uri) -> Result<TokenKey, KeyError> {
        let token = self.token(uri.token.as_deref())?;
        TokenKey::find(token, uri)
    }

    fn find_slot(&self, label: Option<&str>) -> Result<(Slot, String), KeyError> {
        let module_err = |e: CkError| KeyError::Module {
            path: self.settings.module.clone(),
            reason: e.to_string(),
        };
        let mut present = Vec::new();
        for slot in self
            .ctx
            .get_slots_with_initialized_token()
            .map_err(module_err)?
        {
            let info = self.ctx.get_token_info(slot).map_err(module_err)?;
            present.push((slot, info.label().trim_end().to_owned()));
        }
        let matching: Vec<&(Slot, String)> = present
            .iter()
            .filter(|(_, l)| label.is_none_or(|want| want == l))
            .collect();
        match (label, matching.as_slice()) {
            (_, [one]) => Ok((one.0, one.1.clone())),
            (Some(want), []) | (Some(want), [_, _, ..]) => Err(KeyError::NoToken {
                module: self.settings.module.clone(),
                token: want.to_owned(),
                present: labels(&present),
            }),
            (None, _) => Err(KeyError::NoToken {
                module: self.settings.module.clone(),
                token: "(none given: name one with token=LABEL)".into(),
                present: labels(&present),
            }),
        }
    }

    /// Generates an ECDSA P-256 key pair inside the token labelled `token` (`None`: the
    /// only one), CKA_LABEL `label`, private half sensitive and never extractable. Refuses
    /// if a key with that label exists.
    pub fn generate(&self, token: Option<&str>, label: &str) -> Result<TokenKey, KeyError> {
        let t = self.token(token)?;
        let uri = Pkcs11Uri {
            token: Some(t.label.clone()),
            object: Some(label.to_owned()),
            id: None,
        };
        let mut id = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
        t.with_session("C_GenerateKeyPair", |s| {
            let existing = s.find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])?;
            if !existing.is_empty() {
                return Ok(Err(KeyError::Unsupported {
                    uri: uri.to_string(),
                    problem: "a private key with this label exists already; choose another \
                              --key-label (keys are never overwritten)"
                        .into(),
                }));
            }
            let public = [
                Attribute::Token(true),
                Attribute::Private(false),
                Attribute::Verify(true),
                Attribute::EcParams(P256_PARAMS.to_vec()),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
            ];
            let private = [
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Label(label.as_bytes().to_vec()),
                Attribute::Id(id.to_vec()),
            ];
            s.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)?;
            Ok(Ok(()))
        })??;
        TokenKey::find(t, &uri)
    }
}

fn labels(present: &[(Slot, String)]) -> String {
    if present.is_empty() {
        return "none (initialize one, e.g. softhsm2-util --init-token)".into();
    }
    present
        .iter()
        .map(|(_, l)| format!("`{l}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn read_pin(path: &Path) -> Result<AuthPin, KeyError> {
    let err = |problem: String| KeyError::PinFile {
        path: path.to_path_buf(),
        problem,
    };
    // A PIN other local users can read is as good as leaked, like a CA key file.
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read: {e}")))?;
    if let Some(problem) = crate::keys::secret_file::exposed_secret(&meta, path) {
        return Err(err(problem));
    }
    let raw = Zeroizing::new(std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?);
    let text = std::str::from_utf8(&raw).map_err(|_| err("not UTF-8 text".into()))?;
    let pin = text.trim_end_matches(['\r', '\n']);
    if pin.is_empty() {
        return Err(err("is empty: it must hold the token's user PIN".into()));
    }
    Ok(AuthPin::from(pin.to_owned()))
}

/// A logged-in token and its session pool.
pub struct Token {
    ctx: Pkcs11,
    slot: Slot,
    label: String,
    pin: AuthPin,
    pin_file: PathBuf,
    max: usize,
    pool: Mutex<Pool>,
    freed: Condvar,
    retries: Counter,
}

struct Pool {
    idle: Vec<Session>,
    /// Sessions open, idle or lent out.
    open: usize,
}

/// What happened to a token call: worth a fresh session and another try, or final.
fn is_transient(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionClosed
                | RvError::SessionHandleInvalid
                | RvError::UserNotLoggedIn
                | RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::FunctionFailed
                | RvError::GeneralError
                | RvError::ObjectHandleInvalid
                | RvError::KeyHandleInvalid,
            _
        )
    )
}

impl Token {
    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn open_session(&self) -> Result<Session, KeyError> {
        let s = self
            .ctx
            .open_rw_session(self.slot)
            .map_err(|e| self.err("C_OpenSession", &e))?;
        match s.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLenRange, _)) => {
                return Err(KeyError::WrongPin {
                    token: self.label.clone(),
                    pin_file: self.pin_file.clone(),
                    locked: "",
                })
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                return Err(KeyError::WrongPin {
                    token: self.label.clone(),
                    pin_file: self.pin_file.clone(),
                    locked: ", and the PIN is now locked (unlock it with the SO PIN)",
                })
            }
            Err(e) => return Err(self.err("C_Login", &e)),
        }
        Ok(s)
    }

    fn err(&self, op: &'static str, e: &CkError) -> KeyError {
        KeyError::Token {
            token: self.label.clone(),
            op,
            reason: e.to_string(),
        }
    }

    /// An idle session, a new one while fewer than `max` are open, else waits for one.
    fn checkout(&self) -> Result<Session, KeyError> {
        let mut pool = lock(&self.pool);
        loop {
            if let Some(s) = pool.idle.pop() {
                return Ok(s);
            }
            if pool.open < self.max {
                // Reserve the slot before the (slow) open, so concurrent callers cannot
                // overshoot `max`; give it back if the open fails.
                pool.open += 1;
                drop(pool);
                return self.open_session().inspect_err(|_| {
                    lock(&self.pool).open -= 1;
                    self.freed.notify_one();
                });
            }
            pool = self
                .freed
                .wait(pool)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn checkin(&self, s: Session) {
        lock(&self.pool).idle.push(s);
        self.freed.notify_one();
    }

    /// Closes a session the token no longer honours, making room for a fresh one.
    fn discard(&self, s: Session) {
        drop(s);
        let mut pool = lock(&self.pool);
        pool.open = pool.open.saturating_sub(1);
        drop(pool);
        self.freed.notify_one();
    }

    /// Runs `f` on a pooled session; on a transient error, drops that session and tries
    /// again on a fresh (logged-in) one, at most [`RETRIES`] times.
    fn with_session<T>(
        &self,
        op: &'static str,
        mut f: impl FnMut(&Session) -> Result<T, CkError>,
    ) -> Result<T, KeyError> {
        let mut attempt = 0;
        loop {
            let s = self.checkout()?;
            match f(&s) {
                Ok(v) => {
                    self.checkin(s);
                    return Ok(v);
                }
                Err(e) if is_transient(&e) && attempt < RETRIES => {
                    attempt += 1;
                    self.retries.inc();
                    tracing::warn!(token = %self.label, op, attempt, error = %e, "PKCS#11 call failed; retrying on a fresh session");
                    self.discard(s);
                    // Device errors get a moment to clear; a closed session does not need one.
                    if matches!(
                        e,
                        CkError::Pkcs11(
                            RvError::DeviceError
                                | RvError::DeviceMemory
                                | RvError::TokenNotPresent
                                | RvError::DeviceRemoved,
                            _
                        )
                    ) {
                        std::thread::sleep(Duration::from_millis(50 * u64::from(attempt)));
                    }
                }
                Err(e) => {
                    if is_transient(&e) {
                        self.discard(s);
                    } else {
                        self.checkin(s);
                    }
                    return Err(self.err(op, &e));
                }
            }
        }
    }

    /// Test hook: logs every session of this application out of the token, as a token
    /// restart or an HSM failover does; the next call must log in again.
    #[doc(hidden)]
    pub fn force_logout(&self) {
        if let Ok(s) = self.checkout() {
            let _ = s.logout();
            self.checkin(s);
        }
    }
}

/// An ECDSA P-256 private key in a token, with its public point.
pub struct TokenKey {
    token: Arc<Token>,
    uri: Pkcs11Uri,
    template: Vec<Attribute>,
    handle: Mutex<Option<ObjectHandle>>,
    point: Vec<u8>,
}

impl TokenKey {
    fn find(token: Arc<Token>, uri: &Pkcs11Uri) -> Result<Self, KeyError> {
        let mut template = vec![
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
        ];
        let mut what = Vec::new();
        if let Some(label) = &uri.object {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
            what.push(format!("object={label}"));
        }
        if let Some(id) = &uri.id {
            template.push(Attribute::Id(id.clone()));
            what.push(format!("id={}", hex::encode(id)));
        }
        let shown = Pkcs11Uri {
            token: Some(token.label.clone()),
            ..uri.clone()
        };
        let unsupported = |problem: &str| KeyError::Unsupported {
            uri: shown.to_string(),
            problem: problem.to_owned(),
        };
        let found = token.with_session("C_FindObjects", |s| s.find_objects(&template))?;
        let handle = match found.as_slice() {
            [] => {
                return Err(KeyError::NoObject {
                    uri: shown.to_string(),
                    token: token.label.clone(),
                    what: what.join(" and "),
                })
            }
            [h] => *h,
            _ => return Err(unsupported("matches more than one private key: add id=…")),
        };
        // The public point: from the public-key object with the same CKA_ID (or label).
        let (id, label) = token.with_session("C_GetAttributeValue", |s| {
            let attrs = s.get_attributes(handle, &[AttributeType::Id, AttributeType::Label])?;
            let mut id = None;
            let mut label = None;
            for a in attrs {
                match a {
                    Attribute::Id(v) if !v.is_empty() => id = Some(v),
                    Attribute::Label(v) if !v.is_empty() => label = Some(v),
                    _ => {}
                }
            }
            Ok((id, label))
        })?;
        let mut public = vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::EC),
        ];
        match (id, label) {
            (Some(id), _) => public.push(Attribute::Id(id)),
            (None, Some(label)) => public.push(Attribute::Label(label)),
            (None, None) => {
                return Err(unsupported(
                    "the key has neither CKA_ID nor CKA_LABEL, so its public key cannot be found",
                ))
            }
        }
        let (params, point) = token.with_session("C_GetAttributeValue", |s| {
            let Some(pk) = s.find_objects(&public)?.first().copied() else {
                return Ok((None, None));
            };
            let mut params = None;
            let mut point = None;
            for a in s.get_attributes(pk, &[AttributeType::EcParams, AttributeType::EcPoint])? {
                match a {
                    Attribute::EcParams(v) => params = Some(v),
                    Attribute::EcPoint(v) => point = Some(v),
                    _ => {}
                }
            }
            Ok((params, point))
        })?;
        let (Some(params), Some(point)) = (params, point) else {
            return Err(unsupported(
                "no public-key object with the same CKA_ID in the token: import the public \
                 key next to the private one",
            ));
        };
        if params != P256_PARAMS {
            return Err(unsupported(
                "is not an ECDSA P-256 key (CKA_EC_PARAMS); Trellis signs with P-256",
            ));
        }
        let point = uncompressed_point(&point)
            .ok_or_else(|| unsupported("CKA_EC_POINT is not an uncompressed P-256 point"))?;
        Ok(Self {
            token,
            uri: shown,
            template,
            handle: Mutex::new(Some(handle)),
            point,
        })
    }

    /// The URI naming this key (with the token label filled in).
    pub fn uri(&self) -> &Pkcs11Uri {
        &self.uri
    }

    /// The token holding the key.
    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }

    /// The uncompressed public point (65 bytes).
    pub fn public_point(&self) -> &[u8] {
        &self.point
    }

    /// ECDSA over SHA-256(`msg`), signed in the token: `r || s`.
    pub fn sign_sha256(&self, msg: &[u8]) -> Result<[u8; 64], KeyError> {
        let digest = sha2::Sha256::digest(msg);
        let sig = self.token.with_session("C_Sign", |s| {
            let cached = *lock(&self.handle);
            let handle = match cached {
                Some(h) => h,
                None => {
                    let h = s.find_objects(&self.template)?.first().copied();
                    // Gone from the token: say so as an invalid handle, retried, then final.
                    let h = h.ok_or(CkError::Pkcs11(
                        RvError::KeyHandleInvalid,
                        cryptoki::context::Function::FindObjects,
                    ))?;
                    *lock(&self.handle) = Some(h);
                    h
                }
            };
            s.sign(&Mechanism::Ecdsa, handle, &digest).inspect_err(|e| {
                if matches!(
                    e,
                    CkError::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _)
                ) {
                    *lock(&self.handle) = None;
                }
            })
        })?;
        <[u8; 64]>::try_from(sig.as_slice()).map_err(|_| KeyError::Token {
            token: self.token.label.clone(),
            op: "C_Sign",
            reason: format!(
                "returned {} bytes, not a 64-byte P-256 signature",
                sig.len()
            ),
        })
    }
}

/// CKA_EC_POINT is "DER-encoding of ANSI X9.62 ECPoint value Q" (an OCTET STRING); some
/// modules return the bare point. Either way: the 65-byte uncompressed point.
fn uncompressed_point(v: &[u8]) -> Option<Vec<u8>> {
    match v {
        [0x04, 65, rest @ ..] if rest.len() == 65 && rest[0] == 0x04 => Some(rest.to_vec()),
        [0x04, ..] if v.len() == 65 => Some(v.to_vec()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ec_point_is_read_wrapped_or_bare() {
        let mut bare = vec![0x04];
        bare.extend([7u8; 64]);
        let mut wrapped = vec![0x04, 65];
        wrapped.extend(&bare);
        assert_eq!(uncompressed_point(&bare).as_deref(), Some(&bare[..]));
        assert_eq!(uncompressed_point(&wrapped).as_deref(), Some(&bare[..]));
        assert_eq!(uncompressed_point(&bare[..33]), None);
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_pin_file_others_can_read_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "4711\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_pin(&path).err().unwrap().to_string();
        assert!(err.contains("mode 0644 is readable by others"), "{err}");
        assert!(
            err.contains(&format!("chmod 600 {}", path.display())),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_pin(&path).is_ok());
    }
}
