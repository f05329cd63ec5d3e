//! Which upstream a request of the app goes to: by `Host` on the shared listener, fixed on a
//! dedicated one.

use crate::metrics::RouteCounters;
use crate::outbound::peer_pool::PeerPool;
use http::header::HeaderValue;
use http::uri::Authority;
use std::collections::HashMap;
use std::sync::Arc;

pub(super) struct HttpUpstream {
    /// The configured name (`default_route` for a convention route's peer), as access-log
    /// lines name it.
    pub(super) name: Box<str>,
    /// The SPIFFE ID the peer must present, as access-log lines name it.
    pub(super) identity: Box<str>,
    /// Requests by status class, labelled with the route (shared by every default-route peer).
    pub(super) counters: Arc<RouteCounters>,
    pub(super) pool: PeerPool,
    /// The configured host names as authorities, so the common `Host: billing` costs no parse.
    pub(super) authorities: Vec<Authority>,
    /// Used when the request carries no usable host at all.
    pub(super) fallback_authority: Authority,
}

impl HttpUpstream {
    /// The `:authority` to send: the app's own (absolute-form or h2c), else its `Host`.
    pub(super) fn authority(
        &self,
        uri_authority: Option<Authority>,
        host: Option<&HeaderValue>,
    ) -> Authority {
        if let Some(a) = uri_authority {
            return a;
        }
        let Some(host) = host else {
            return self.fallback_authority.clone();
        };
        let bytes = host.as_bytes();
        if let Some(known) = self
            .authorities
            .iter()
            .find(|a| a.as_str().as_bytes() == bytes)
        {
            return known.clone();
        }
        Authority::try_from(bytes).unwrap_or_else(|_| self.fallback_authority.clone())
    }
}

/// Host → upstream index. A short list is scanned (cheaper than hashing the host with SipHash
/// on every request); a long one is hashed.
pub(super) enum Routes {
    Few(Vec<(Box<str>, usize)>),
    Many(HashMap<Box<str>, usize>),
}

impl Routes {
    const SCAN_UP_TO: usize = 16;

    pub(super) fn new(routes: HashMap<Box<str>, usize>) -> Self {
        if routes.len() <= Self::SCAN_UP_TO {
            Routes::Few(routes.into_iter().collect())
        } else {
            Routes::Many(routes)
        }
    }

    pub(super) fn get(&self, host: &str) -> Option<usize> {
        match self {
            Routes::Few(list) => list.iter().find(|(h, _)| &**h == host).map(|(_, i)| *i),
            Routes::Many(map) => map.get(host).copied(),
        }
    }
}

#[derive(Clone, Copy)]
pub(super) enum Route {
    ByHost,
    Fixed(usize),
}
