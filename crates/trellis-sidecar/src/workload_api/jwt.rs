//! The sidecar's JWT-SVID client: asks the control plane's `JwtSvidService` over an mTLS
//! channel (the sidecar's X.509-SVID as client certificate: that SVID's SPIFFE ID is what the
//! token says), caches tokens per audience set until half their lifetime, and follows the JWT
//! bundle stream.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Code, Status};
use trellis_identity::jwt::JwtBundle;
use trellis_identity::SpiffeId;
use trellis_proto::trellis::jwt::v1::jwt_svid_service_client::JwtSvidServiceClient;
use trellis_proto::trellis::jwt::v1::{MintJwtSvidRequest, WatchJwtBundleRequest};

use crate::sds::timing::{BACKOFF_MAX, BACKOFF_START};
use crate::svid_store::SvidStore;

/// Most audience sets cached at once: a pod asks for a handful.
const MAX_CACHED: usize = 64;

/// A token handed out, kept until half its lifetime.
#[derive(Clone, Debug)]
pub struct CachedToken {
    /// The JWT-SVID.
    pub token: String,
    /// Its `sub`.
    pub spiffe_id: String,
    issued_at: SystemTime,
    expires_at: SystemTime,
}

impl CachedToken {
    /// Reused until half its lifetime has passed, so a caller always gets at least half.
    fn fresh(&self, now: SystemTime) -> bool {
        let life = self
            .expires_at
            .duration_since(self.issued_at)
            .unwrap_or_default();
        now < self.issued_at + life / 2
    }
}

/// JWT-SVIDs and the JWT bundle from the control plane.
pub struct JwtClient {
    control_plane: String,
    control_id: SpiffeId,
    store: Arc<SvidStore>,
    channel: tokio::sync::Mutex<Option<Channel>>,
    cache: Mutex<HashMap<BTreeSet<String>, CachedToken>>,
    bundle: watch::Sender<Option<Arc<JwtBundle>>>,
}

impl JwtClient {
    /// A client of the control plane at `control_plane` (`host:port`), verified as
    /// `control_id`, authenticating with the SVID in `store`.
    pub fn new(control_plane: String, control_id: SpiffeId, store: Arc<SvidStore>) -> Arc<Self> {
        Arc::new(Self {
            control_plane,
            control_id,
            store,
            channel: tokio::sync::Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
            bundle: watch::channel(None).0,
        })
    }

    /// The JWT bundle: `None` until the control plane sent it, then every change.
    pub fn bundle(&self) -> watch::Receiver<Option<Arc<JwtBundle>>> {
        self.bundle.subscribe()
    }

    async fn channel(&self) -> Result<Channel, Status> {
        if self.store.current().is_none() {
            return Err(Status::unavailable(
                "this sidecar has no X.509-SVID yet (still attesting); retry shortly",
            ));
        }
        let mut slot = self.channel.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        // The channel reconnects by itself; each handshake presents the SVID current then.
        let c = crate::sds::connect::connect(
            &self.control_plane,
            self.store.bundle(),
            self.control_id.clone(),
            Some(self.store.resolver()),
        )
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach the control plane: {e}")))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// A JWT-SVID for `audiences` (checked by the caller): the cached one while it has more
    /// than half its lifetime left, else a fresh one from the control plane.
    pub async fn fetch(&self, audiences: &[String]) -> Result<CachedToken, Status> {
        let key: BTreeSet<String> = audiences.iter().cloned().collect();
        let now = SystemTime::now();
        if let Some(t) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .filter(|t| t.fresh(now))
        {
            return Ok(t.clone());
        }
        let mut client = JwtSvidServiceClient::new(self.channel().await?);
        let resp = client
            .mint_jwt_svid(MintJwtSvidRequest {
                audiences: key.iter().cloned().collect(),
            })
            .await
            .map_err(|s| match s.code() {
                // The control plane's verdict on the audience is the caller's to fix.
                Code::InvalidArgument | Code::ResourceExhausted | Code::PermissionDenied => s,
                _ => Status::unavailable(format!("control plane: {}", s.message())),
            })?
            .into_inner();
        let at =
            |s: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap_or(0));
        let token = CachedToken {
            token: resp.token,
            spiffe_id: resp.spiffe_id,
            issued_at: at(resp.issued_at),
            expires_at: at(resp.expires_at),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, t| t.fresh(now));
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, token.clone());
        Ok(token)
    }

    /// Follows `WatchJwtBundle` until `shutdown`, reconnecting with backoff. A bundle for
    /// another trust domain, or one that does not parse, is refused and the current one kept.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.store.subscribe();
        let mut backoff = BACKOFF_START;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let attempt = async {
                let mut client = JwtSvidServiceClient::new(self.channel().await?);
                let mut stream = client
                    .watch_jwt_bundle(WatchJwtBundleRequest {})
                    .await?
                    .into_inner();
                while let Some(update) = stream.message().await? {
                    let td = self.store.trust_domain();
                    if update.trust_domain != td.as_str() {
                        tracing::warn!(got = %update.trust_domain, want = %td, "JWT bundle for another trust domain refused");
                        continue;
                    }
                    match JwtBundle::parse(td.clone(), &update.jwks) {
                        Ok(b) => {
                            tracing::debug!(keys = b.keys().len(), "JWT bundle updated");
                            self.bundle.send_replace(Some(Arc::new(b)));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "JWT bundle refused; keeping the current one")
                        }
                    }
                }
                Ok::<(), Status>(())
            };
            let result = tokio::select! {
                r = attempt => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match result {
                Ok(()) => backoff = BACKOFF_START,
                Err(s) => {
                    tracing::debug!(error = %s, "JWT bundle stream ended");
                    if s.code() != Code::Unavailable {
                        // Drop the channel: the next attempt handshakes again.
                        *self.channel.lock().await = None;
                    }
                }
            }
            // Before the first SVID there is nothing to connect with: wait for one (or the
            // backoff), whichever comes first.
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = changes.changed() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_reused_until_half_its_lifetime() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let t = CachedToken {
            token: String::new(),
            spiffe_id: String::new(),
            issued_at: t0,
            expires_at: t0 + Duration::from_secs(300),
        };
        assert!(t.fresh(t0 + Duration::from_secs(149)));
        assert!(!t.fresh(t0 + Duration::from_secs(150)));
    }
}
