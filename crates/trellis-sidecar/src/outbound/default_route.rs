//! `outbound.default_route`: a host that matches no listed upstream but one of the route's host
//! templates goes to the peer its address template names, which must present the SPIFFE ID its
//! identity template names (see [`crate::config::route`]).
//!
//! Each distinct peer (address and identity) gets its own [`PeerPool`] and TLS client configs
//! (the expected identity is part of the verifier), made on its first request and kept until
//! `max_peers` others push it out, least recently used first. A host seen before is one
//! lock-free map read (no template expansion, no allocation); only a new host takes the lock.
//! Listed upstreams never come here: their path stays a table lookup.

use super::peer_pool::PeerPool;
use super::routes::HttpUpstream;
use crate::config::{DefaultRoute, Limits};
use crate::dial::{DeadPeer, PeerTarget, TlsClient};
use crate::metrics::{RouteCounters, SidecarMetrics};
use crate::mtls;
use crate::resolve::Resolver;
use crate::svid_store::SvidStore;
use arc_swap::ArcSwap;
use http::uri::Authority;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_identity::tls::TlsPolicy;
use trellis_identity::SpiffeId;

/// The route label of every default-route peer (metrics, access log).
pub(super) const ROUTE_NAME: &str = "default_route";

struct Peer {
    upstream: Arc<HttpUpstream>,
    /// Milliseconds since [`DefaultRoutes::epoch`] at its last request.
    last_used: AtomicU64,
}

/// What a new peer's pool is built from.
pub(super) struct PeerSettings {
    pub(super) store: Arc<SvidStore>,
    pub(super) metrics: Arc<SidecarMetrics>,
    pub(super) resolver: Arc<Resolver>,
    pub(super) tls_policy: TlsPolicy,
    pub(super) connect_timeout: Duration,
    pub(super) limits: Limits,
    /// Worker threads (each has its own connections to a peer).
    pub(super) workers: usize,
}

/// The convention route and the peers it has reached.
pub(super) struct DefaultRoutes {
    route: DefaultRoute,
    trust_domain: Box<str>,
    /// `a, b` of the host templates, for `404` bodies.
    hosts_list: String,
    /// Hosts seen, each with its peer: what a request reads (copy on write, new hosts only).
    by_host: ArcSwap<HashMap<Box<str>, Arc<Peer>>>,
    /// Peers by `address identity`; also the lock new hosts take to add themselves.
    peers: Mutex<HashMap<Box<str>, Arc<Peer>>>,
    counters: Arc<RouteCounters>,
    settings: PeerSettings,
    epoch: Instant,
}

impl DefaultRoutes {
    pub(super) fn new(route: DefaultRoute, trust_domain: &str, settings: PeerSettings) -> Self {
        // The metric's identity label is the template with `*` for what varies per host
        // (`spiffe://example.org/ns/*/sa/*`): one series per route, and no braces, which some
        // Prometheus text parsers choke on.
        let wildcard = crate::config::route::Bound {
            service: "*",
            namespace: Some("*"),
        };
        let counters = Arc::new(RouteCounters::new(
            ROUTE_NAME,
            &route.templates.identity.expand(wildcard, trust_domain),
        ));
        Self {
            hosts_list: route.templates.hosts_list(),
            route,
            trust_domain: trust_domain.into(),
            by_host: ArcSwap::default(),
            peers: Mutex::new(HashMap::new()),
            counters,
            settings,
            epoch: Instant::now(),
        }
    }

    /// The host templates, as `404` bodies list them.
    pub(super) fn hosts_list(&self) -> &str {
        &self.hosts_list
    }

    /// The peer for `host` (lowercase, no port): `None` if no host template matches it, an
    /// error body if its pool cannot be built.
    pub(super) fn peer(&self, host: &str) -> Option<Result<Arc<HttpUpstream>, String>> {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(peer) = self.by_host.load().get(host) {
            peer.last_used.store(now, Ordering::Relaxed);
            return Some(Ok(peer.upstream.clone()));
        }
        self.new_host(host, now)
    }

    /// [`Self::peer`] for a host not seen yet (or whose peer was pushed out).
    fn new_host(&self, host: &str, now: u64) -> Option<Result<Arc<HttpUpstream>, String>> {
        let bound = self.route.templates.matches(host)?;
        let address = self
            .route
            .templates
            .address
            .expand(bound, &self.trust_domain);
        let identity = self
            .route
            .templates
            .identity
            .expand(bound, &self.trust_domain);
        let key = format!("{address} {identity}");
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted = None;
        let peer = match peers.get(key.as_str()) {
            Some(peer) => {
                peer.last_used.store(now, Ordering::Relaxed);
                Arc::clone(peer)
            }
            None => {
                let upstream = match self.build(host, &address, &identity) {
                    Ok(u) => Arc::new(u),
                    Err(e) => return Some(Err(e)),
                };
                if peers.len() >= self.route.max_peers {
                    // Least recently used goes; requests in flight on it keep their `Arc` and
                    // finish.
                    let oldest = peers
                        .iter()
                        .min_by_key(|(_, p)| p.last_used.load(Ordering::Relaxed))
                        .map(|(k, _)| k.clone());
                    evicted = oldest.and_then(|k| peers.remove(&k));
                }
                let peer = Arc::new(Peer {
                    upstream,
                    last_used: AtomicU64::new(now),
                });
                peers.insert(key.into(), Arc::clone(&peer));
                peer
            }
        };
        // Published under the lock, so two new hosts never overwrite each other's entry.
        let mut by_host = HashMap::clone(&self.by_host.load());
        if let Some(gone) = &evicted {
            by_host.retain(|_, p| !Arc::ptr_eq(p, gone));
        }
        by_host.insert(host.into(), Arc::clone(&peer));
        self.by_host.store(Arc::new(by_host));
        Some(Ok(peer.upstream.clone()))
    }

    fn build(&self, host: &str, address: &str, identity: &str) -> Result<HttpUpstream, String> {
        let s = &self.settings;
        let expected = SpiffeId::parse(identity).map_err(|e| {
            format!(
                "default_route: identity `{identity}` (from `{}`) is not a SPIFFE ID: {e}",
                self.route.templates.identity
            )
        })?;
        let peer = PeerTarget::new(
            ROUTE_NAME,
            address,
            expected.clone(),
            s.store.bundle(),
            s.metrics.clone(),
            s.connect_timeout,
        )
        .map_err(|e| e.to_string())?
        .describe(format!("default_route peer `{address}`"))
        .resolver(s.resolver.clone())
        .wait_for_svid(Arc::clone(&s.store))
        .dead_peer(DeadPeer {
            interval: s.limits.h2.keepalive_interval,
            timeout: s.limits.h2.keepalive_timeout,
        });
        let tls = |alpn: &[&[u8]]| {
            mtls::client_config(&s.store, &expected, s.tls_policy, alpn)
                .map(|(config, sessions)| TlsClient::new(config, sessions))
                .map_err(|e| format!("default_route peer `{address}`: {e}"))
        };
        let pool = PeerPool::new(
            peer,
            tls(mtls::ALPN_HTTP)?,
            tls(&[mtls::ALPN_HTTP11])?,
            &s.limits,
            s.workers,
        );
        Ok(HttpUpstream {
            name: ROUTE_NAME.into(),
            identity: identity.into(),
            counters: self.counters.clone(),
            pool,
            authorities: Vec::new(),
            fallback_authority: Authority::try_from(host)
                .unwrap_or_else(|_| Authority::from_static("localhost")),
        })
    }

    /// Peers held now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{DefaultRouteFile, LimitsFile};

    fn routes(max_peers: usize) -> DefaultRoutes {
        let yaml = r#"
hosts: ["{service}.{namespace}.svc.cluster.local", "{service}.{namespace}"]
address: "{service}.{namespace}.svc.cluster.local:15443"
identity: "spiffe://{trust_domain}/ns/{namespace}/sa/{service}"
"#;
        let templates: DefaultRouteFile = serde_yaml_ng::from_str(yaml).unwrap();
        let ca = trellis_identity::testca::TestCa::root("example.org");
        let metrics = Arc::new(SidecarMetrics::new());
        let store = SvidStore::new(ca.bundle(), None, metrics.clone());
        DefaultRoutes::new(
            DefaultRoute {
                templates,
                max_peers,
            },
            "example.org",
            PeerSettings {
                store,
                metrics,
                resolver: Arc::new(Resolver::new(Duration::from_secs(10), 8)),
                tls_policy: TlsPolicy::Tls13,
                connect_timeout: Duration::from_secs(1),
                limits: Limits::from_file(&LimitsFile::default()).unwrap(),
                workers: 1,
            },
        )
    }

    #[test]
    fn one_peer_per_service_whatever_the_spelling() {
        let r = routes(8);
        let a = r.peer("service-b.shop.svc.cluster.local").unwrap().unwrap();
        let b = r.peer("service-b.shop").unwrap().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a.identity, "spiffe://example.org/ns/shop/sa/service-b");
        assert_eq!(&*a.name, "default_route");
        let c = r.peer("service-c.shop").unwrap().unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(r.len(), 2);
        assert!(r.peer("example").is_none());
        assert!(r.peer("a.b.c").is_none());
    }

    #[test]
    fn peers_are_bounded_least_recently_used_first() {
        let r = routes(2);
        let a = r.peer("a.shop").unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(3));
        r.peer("b.shop").unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(3));
        r.peer("a.shop").unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(3));
        r.peer("c.shop").unwrap().unwrap();
        assert_eq!(r.len(), 2);
        std::thread::sleep(Duration::from_millis(3));
        // `b` was least recently used: `a` is still the same pool.
        assert!(Arc::ptr_eq(&a, &r.peer("a.shop").unwrap().unwrap()));
        std::thread::sleep(Duration::from_millis(3));
        // `b`'s hosts went with it: it comes back as a new pool, pushing out `c`.
        let b = r.peer("b.shop").unwrap().unwrap();
        assert!(!Arc::ptr_eq(&b, &a));
        assert_eq!(r.len(), 2);
        assert_eq!(
            r.by_host.load().len(),
            2,
            "a.shop and b.shop: c.shop left with its peer"
        );
    }
}
