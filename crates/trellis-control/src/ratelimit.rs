//! Per-source-IP token buckets for SDS stream opens.
//!
//! Every `StreamSecrets`/`FetchSecrets` call attests its caller and, when that succeeds, makes
//! the CA sign. Without a limit one hostile client could keep the CA signing (or the JWT
//! verifier and the registry busy) in a loop. Each source IP gets a bucket of `burst` tokens
//! refilled at `per_second`; a call takes one token or is refused with `RESOURCE_EXHAUSTED`.
//! A failed attestation takes [`RateLimit::failure_cost`] more, so a client that keeps
//! presenting bad credentials slows down further (down to a debt of one burst).
//!
//! The map is sharded (16 `Mutex<HashMap>`s, picked by the IP's hash) and each lock is held
//! for a few arithmetic operations, once per stream open: never on the data plane, never
//! across an await. Buckets that have refilled completely carry no state and are pruned when
//! a shard grows, so a scan from many addresses cannot grow the map without bound.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use trellis_serve::net::is_loopback;

/// Shards of the bucket map; a power of two.
const SHARDS: usize = 16;
/// A shard is pruned when it holds more buckets than this (the threshold doubles with the
/// live set, so pruning stays amortised O(1) per call).
const PRUNE_AT: usize = 4096;

/// The limit each source IP gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second; `0` turns the limit off.
    pub per_second: f64,
    /// Bucket size: how many calls a new or idle IP may make at once.
    pub burst: f64,
    /// Extra tokens a failed attestation costs.
    pub failure_cost: f64,
    /// Whether loopback peers (`127.0.0.0/8`, `::1`) are limited too. Off by default: a
    /// process on the control plane's own host is a node agent or a test harness multiplexing
    /// thousands of streams, and it can reach the state directory's owner anyway.
    pub limit_loopback: bool,
}

impl RateLimit {
    /// The defaults: 10 per second, burst 50, a failure costs 4 more, loopback exempt.
    pub const DEFAULT: RateLimit = RateLimit {
        per_second: 10.0,
        burst: 50.0,
        failure_cost: 4.0,
        limit_loopback: false,
    };

    fn enabled(&self) -> bool {
        self.per_second > 0.0 && self.burst >= 1.0
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self, limit: &RateLimit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.per_second).min(limit.burst);
        self.last = now;
    }
}

struct Shard {
    buckets: HashMap<IpAddr, Bucket>,
    prune_at: usize,
}

/// Token buckets keyed by source IP.
pub struct PeerLimiter {
    limit: RateLimit,
    shards: Vec<Mutex<Shard>>,
}

impl PeerLimiter {
    /// A limiter applying `limit` to every source IP.
    pub fn new(limit: RateLimit) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    buckets: HashMap::new(),
                    prune_at: PRUNE_AT,
                })
            })
            .collect();
        Self { limit, shards }
    }

    /// The limit in force.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    fn applies_to(&self, ip: IpAddr) -> bool {
        self.limit.enabled() && (self.limit.limit_loopback || !is_loopback(ip))
    }

    fn shard(&self, ip: IpAddr) -> Option<&Mutex<Shard>> {
        let mut h = DefaultHasher::new();
        ip.hash(&mut h);
        self.shards.get((h.finish() as usize) % SHARDS)
    }

    /// Takes one token for a call from `ip` at `now`; `false` means refuse it.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> bool {
        if !self.applies_to(ip) {
            return true;
        }
        let Some(shard) = self.shard(ip) else {
            return true;
        };
        // A poisoned lock only means another thread panicked mid-update of plain numbers.
        let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
        if shard.buckets.len() >= shard.prune_at {
            let limit = self.limit;
            shard.buckets.retain(|_, b| {
                b.refill(&limit, now);
                b.tokens < limit.burst
            });
            shard.prune_at = PRUNE_AT.max(shard.buckets.len() * 2);
        }
        let bucket = shard.buckets.entry(ip).or_insert(Bucket {
            tokens: self.limit.burst,
            last: now,
        });
        bucket.refill(&self.limit, now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Charges `ip` for a failed attestation: its next calls wait longer.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        if !self.applies_to(ip) {
            return;
        }
        let Some(shard) = self.shard(ip) else {
            return;
        };
        let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = shard.buckets.get_mut(&ip) {
            bucket.refill(&self.limit, now);
            bucket.tokens = (bucket.tokens - self.limit.failure_cost).max(-self.limit.burst);
        }
    }

    /// Buckets held (for tests).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.buckets.len()).unwrap_or(0))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    fn limiter(per_second: f64, burst: f64) -> PeerLimiter {
        PeerLimiter::new(RateLimit {
            per_second,
            burst,
            failure_cost: 4.0,
            limit_loopback: false,
        })
    }

    #[test]
    fn burst_then_refused_then_refilled() {
        let l = limiter(10.0, 5.0);
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        for _ in 0..5 {
            assert!(l.admit(a, t0));
        }
        assert!(
            !l.admit(a, t0),
            "the sixth call in the same instant is refused"
        );
        // Another peer is unaffected.
        assert!(l.admit(ip("10.0.0.2"), t0));
        // 100 ms at 10/s buys one more call.
        assert!(l.admit(a, t0 + Duration::from_millis(100)));
        assert!(!l.admit(a, t0 + Duration::from_millis(100)));
    }

    #[test]
    fn failures_slow_a_peer_down() {
        let l = limiter(10.0, 5.0);
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        assert!(l.admit(a, t0));
        l.failed(a, t0);
        // 5 - 1 - 4 = 0 tokens left.
        assert!(!l.admit(a, t0));
        for _ in 0..10 {
            l.failed(a, t0);
        }
        // The debt is capped at one burst: -5 needs 0.6 s to reach one token again.
        assert!(!l.admit(a, t0 + Duration::from_millis(500)));
        assert!(l.admit(a, t0 + Duration::from_millis(600)));
    }

    #[test]
    fn loopback_is_exempt_unless_asked() {
        let t0 = Instant::now();
        let l = limiter(1.0, 1.0);
        for _ in 0..100 {
            assert!(l.admit(ip("127.0.0.1"), t0));
            assert!(l.admit(ip("::1"), t0));
        }
        let strict = PeerLimiter::new(RateLimit {
            limit_loopback: true,
            ..RateLimit::DEFAULT
        });
        let refused = (0..100)
            .filter(|_| !strict.admit(ip("127.0.0.1"), t0))
            .count();
        assert_eq!(refused, 50);
    }

    #[test]
    fn zero_rate_turns_the_limit_off() {
        let l = limiter(0.0, 50.0);
        let t0 = Instant::now();
        assert!((0..1000).all(|_| l.admit(ip("10.0.0.1"), t0)));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn idle_buckets_are_pruned() {
        let l = limiter(10.0, 5.0);
        let t0 = Instant::now();
        let old = SHARDS * PRUNE_AT / 2;
        for i in 0..old {
            let n = u32::try_from(i).unwrap_or(0);
            assert!(l.admit(IpAddr::from((0x0a00_0000 + n).to_be_bytes()), t0));
        }
        assert_eq!(l.tracked(), old);
        // One second later every old bucket has refilled; the new peers push each shard over
        // the threshold, and the prune drops the old ones.
        let t1 = t0 + Duration::from_secs(1);
        let new = SHARDS * PRUNE_AT * 3 / 4;
        for i in 0..new {
            let n = u32::try_from(i).unwrap_or(0);
            assert!(l.admit(IpAddr::from((0x0b00_0000 + n).to_be_bytes()), t1));
        }
        assert_eq!(l.tracked(), new, "stale buckets stayed");
    }
}
