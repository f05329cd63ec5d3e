//! Peer names through the system resolver (`getaddrinfo`, via tokio's `lookup_host`), cached.
//!
//! The system resolver says nothing about a record's TTL, so each answer is reused for a
//! configured bound (`outbound.resolve_ttl`, 10 s by default): a Service that moves is found
//! again within it, and new connections after the first lookup cost none (concurrent misses
//! of one name each look it up: they are not merged). A failed lookup is
//! remembered for [`NEGATIVE_TTL`] only, so a Service created a moment ago is found soon. The
//! cache holds at most `max_names` names; when full, expired entries go first, then the one
//! closest to expiry. Only connection setup resolves: a request on a pooled connection never
//! touches this.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How long a failed lookup is answered from the cache.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(1);

/// What a lookup gave: the addresses, or why there are none.
type Answer = Result<Arc<[SocketAddr]>, Arc<str>>;

type LookupFuture = Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;

/// The lookup itself, replaceable in tests.
type Lookup = Box<dyn Fn(String) -> LookupFuture + Send + Sync>;

struct Entry {
    answer: Answer,
    until: Instant,
}

/// A `host:port` name did not resolve.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot resolve `{name}`: {detail}")]
pub struct ResolveError {
    /// The `host:port` asked for.
    pub name: Arc<str>,
    /// What the resolver said.
    pub detail: Arc<str>,
}

/// A shared, bounded cache in front of the system resolver.
pub struct Resolver {
    ttl: Duration,
    max_names: usize,
    cache: Mutex<HashMap<Arc<str>, Entry>>,
    lookup: Lookup,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("ttl", &self.ttl)
            .field("max_names", &self.max_names)
            .finish_non_exhaustive()
    }
}

impl Resolver {
    /// Answers are reused for `ttl`; at most `max_names` (at least 1) are kept.
    pub fn new(ttl: Duration, max_names: usize) -> Self {
        Self::with_lookup(
            ttl,
            max_names,
            Box::new(|name| {
                Box::pin(async move { Ok(tokio::net::lookup_host(name).await?.collect()) })
            }),
        )
    }

    fn with_lookup(ttl: Duration, max_names: usize, lookup: Lookup) -> Self {
        Self {
            ttl,
            max_names: max_names.max(1),
            cache: Mutex::new(HashMap::new()),
            lookup,
        }
    }

    fn cached(&self, name: &str, now: Instant) -> Option<Answer> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(name)
            .filter(|e| e.until > now)
            .map(|e| e.answer.clone())
    }

    fn store(&self, name: &str, answer: Answer, now: Instant) {
        let ttl = if answer.is_ok() {
            self.ttl
        } else {
            NEGATIVE_TTL.min(self.ttl)
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.max_names && !cache.contains_key(name) {
            cache.retain(|_, e| e.until > now);
            if cache.len() >= self.max_names {
                let soonest = cache
                    .iter()
                    .min_by_key(|(_, e)| e.until)
                    .map(|(k, _)| k.clone());
                if let Some(k) = soonest {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            name.into(),
            Entry {
                answer,
                until: now + ttl,
            },
        );
    }

    /// The addresses of `name` (`host:port`), from the cache while fresh.
    pub async fn resolve(&self, name: &str) -> Result<Arc<[SocketAddr]>, ResolveError> {
        let answer = match self.cached(name, Instant::now()) {
            Some(answer) => answer,
            None => {
                let answer: Answer = match (self.lookup)(name.to_owned()).await {
                    Ok(addrs) if addrs.is_empty() => Err("no addresses".into()),
                    Ok(addrs) => Ok(addrs.into()),
                    Err(e) => Err(e.to_string().into()),
                };
                self.store(name, answer.clone(), Instant::now());
                answer
            }
        };
        answer.map_err(|detail| ResolveError {
            name: name.into(),
            detail,
        })
    }

    /// Names held (fresh or not).
    pub fn len(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A resolver whose lookups are counted: `ok.*` names resolve to 10.0.0.1, others fail.
    fn counted(ttl: Duration, max: usize) -> (Resolver, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let r = Resolver::with_lookup(
            ttl,
            max,
            Box::new(move |name| {
                c.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    if name.starts_with("ok") {
                        Ok(vec!["10.0.0.1:15443".parse().unwrap()])
                    } else {
                        Err(std::io::Error::other(
                            "failed to lookup address information",
                        ))
                    }
                })
            }),
        );
        (r, calls)
    }

    #[tokio::test(start_paused = true)]
    async fn answers_are_reused_for_the_ttl_then_looked_up_again() {
        let (r, calls) = counted(Duration::from_secs(10), 8);
        for _ in 0..5 {
            r.resolve("ok.shop:15443").await.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(9)).await;
        r.resolve("ok.shop:15443").await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        r.resolve("ok.shop:15443").await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_name_the_name_and_are_remembered_briefly() {
        let (r, calls) = counted(Duration::from_secs(10), 8);
        let e = r.resolve("nope.shop:15443").await.unwrap_err();
        assert!(
            e.to_string().contains("cannot resolve `nope.shop:15443`"),
            "{e}"
        );
        r.resolve("nope.shop:15443").await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(NEGATIVE_TTL + Duration::from_millis(1)).await;
        r.resolve("nope.shop:15443").await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn cache_size_is_bounded() {
        let (r, _) = counted(Duration::from_secs(10), 3);
        for i in 0..10 {
            r.resolve(&format!("ok{i}:1")).await.unwrap();
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert_eq!(r.len(), 3);
    }

    #[tokio::test]
    async fn system_resolver_finds_localhost() {
        let r = Resolver::new(Duration::from_secs(10), 8);
        let addrs = r.resolve("localhost:15443").await.unwrap();
        assert!(addrs
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 15443));
    }
}
