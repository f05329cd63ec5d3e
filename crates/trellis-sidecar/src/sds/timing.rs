//! When to retry and when to rotate: jittered exponential backoff for reconnects, and the
//! key-rotation schedule in CSR mode. Pure functions of their inputs (the jitter is passed
//! in), so they are tested without clocks.

use std::time::Duration;

use rand::Rng;

/// First reconnect delay cap.
pub const BACKOFF_START: Duration = Duration::from_millis(250);
/// Largest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The earliest a key rotation (or its retry) is scheduled.
pub const MIN_ROTATION_DELAY: Duration = Duration::from_secs(1);

/// Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And
/// Jitter": `sleep = random_between(0, min(cap, base * 2 ** attempt))`), so a fleet of
/// sidecars that lost the control plane together does not come back together.
#[derive(Debug, Clone)]
pub struct Backoff {
    start: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `start`, doubles per attempt, never above `max`.
    pub fn new(start: Duration, max: Duration) -> Self {
        Self {
            start,
            max,
            attempt: 0,
        }
    }

    /// The upper bound of the next delay.
    pub fn cap(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.start.saturating_mul(factor).min(self.max)
    }

    /// The next delay: uniform in `[0, cap]`; the cap then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.cap();
        self.attempt = self.attempt.saturating_add(1);
        cap.mul_f64(rand::rng().random_range(0.0..=1.0))
    }

    /// After a stream that delivered a valid update: start over.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A uniform jitter factor in `[0.9, 1.1]`.
pub fn rotation_jitter() -> f64 {
    rand::rng().random_range(0.9..=1.1)
}

/// How long after installing a certificate for a new key the next CSR goes out: half the
/// remaining lifetime, times `jitter` (±10%), never sooner than [`MIN_ROTATION_DELAY`].
pub fn rotation_delay(remaining: Duration, jitter: f64) -> Duration {
    (remaining / 2).mul_f64(jitter).max(MIN_ROTATION_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let mut b = Backoff::new(BACKOFF_START, BACKOFF_MAX);
        let mut caps = Vec::new();
        for _ in 0..10 {
            let cap = b.cap();
            let d = b.next_delay();
            assert!(d <= cap, "{d:?} > {cap:?}");
            caps.push(cap.as_millis());
        }
        assert_eq!(
            caps,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn backoff_reset_starts_over() {
        let mut b = Backoff::new(BACKOFF_START, BACKOFF_MAX);
        for _ in 0..5 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.cap(), BACKOFF_START);
    }

    #[test]
    fn backoff_never_overflows() {
        let mut b = Backoff::new(BACKOFF_START, BACKOFF_MAX);
        for _ in 0..200 {
            assert!(b.next_delay() <= BACKOFF_MAX);
        }
        assert_eq!(b.cap(), BACKOFF_MAX);
    }

    #[test]
    fn backoff_jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut b = Backoff::new(BACKOFF_START, BACKOFF_MAX);
            seen.insert(b.next_delay());
        }
        assert!(
            seen.len() > 1,
            "full jitter must not give every sidecar the same delay"
        );
    }

    #[test]
    fn rotation_at_half_remaining_lifetime_with_jitter() {
        let hour = Duration::from_secs(3600);
        assert_eq!(rotation_delay(hour, 1.0), hour / 2);
        assert_eq!(rotation_delay(hour, 0.9), Duration::from_secs(1620));
        assert_eq!(rotation_delay(hour, 1.1), Duration::from_secs(1980));
        for _ in 0..100 {
            let j = rotation_jitter();
            assert!((0.9..=1.1).contains(&j), "{j}");
        }
    }

    #[test]
    fn rotation_is_never_sooner_than_one_second() {
        assert_eq!(rotation_delay(Duration::ZERO, 1.0), MIN_ROTATION_DELAY);
        assert_eq!(
            rotation_delay(Duration::from_millis(900), 0.9),
            MIN_ROTATION_DELAY
        );
    }
}
