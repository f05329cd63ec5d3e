//! Refuses to sign while the wall clock has just jumped.
//!
//! Every certificate's validity comes from the control plane's wall clock. A VM resumed after
//! hours, an NTP step from a bad server or an operator's `date -s` moves that clock at once,
//! and every SVID signed afterwards would be already expired (backwards) or not yet valid
//! (forwards) for every other host: one jump, and the fleet's next rotations all fail.
//!
//! The monotonic clock does not jump. [`ClockGuard`] keeps a baseline (wall, monotonic) pair,
//! and each check compares how far the wall clock moved with how far the monotonic one did.
//! Within [`ALLOWANCE`] (the skew every certificate's `notBefore` already allows for) the
//! baseline moves along, so NTP slewing and small steps pass. Beyond it, signing is refused
//! (clients keep serving their current SVIDs and retry) until either the clock comes back, or
//! the jump has stood for [`QUARANTINE`]: there is no third clock to say which one is right,
//! so a jump that lasts is taken to be a correction, loudly.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// A wall-clock jump smaller than this is not one: the same 60 s every `notBefore` is
/// backdated by, so a certificate signed across such a step is still valid everywhere.
pub const ALLOWANCE: Duration = crate::ca::CLOCK_SKEW;

/// How long a jump must stand before it is accepted as the new time. Shorter than any sane
/// rotation margin (clients rotate at half their SVID's life), so a refused window costs no
/// SVID; long enough for a resumed VM's NTP client to step the clock back.
pub const QUARANTINE: Duration = Duration::from_secs(300);

/// A refused check: the wall clock moved `offset` away from where the monotonic clock says it
/// should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the wall clock jumped {direction} by {secs} s (compared with the monotonic clock); not \
     signing certificates that would be {consequence} for every other host; check NTP and the \
     host's clock. The new time is accepted if it stands for {accept_in_secs} s more",
    direction = if self.forward { "forward" } else { "backwards" },
    secs = self.offset.as_secs(),
    consequence = if self.forward { "not yet valid" } else { "already expired" },
    accept_in_secs = self.accept_in.as_secs(),
)]
pub struct ClockJump {
    /// Size of the jump.
    pub offset: Duration,
    /// Whether the wall clock went forward.
    pub forward: bool,
    /// How long until the new time is accepted.
    pub accept_in: Duration,
}

#[derive(Debug)]
struct Baseline {
    wall: SystemTime,
    mono: Instant,
    /// When the current jump was first seen.
    jumped_at: Option<Instant>,
}

/// Compares the wall clock with the monotonic clock at each signature.
#[derive(Debug)]
pub struct ClockGuard {
    baseline: Mutex<Baseline>,
}

impl ClockGuard {
    /// A guard whose baseline is `(wall, mono)`, normally `(SystemTime::now(), Instant::now())`.
    pub fn new(wall: SystemTime, mono: Instant) -> Self {
        ClockGuard {
            baseline: Mutex::new(Baseline {
                wall,
                mono,
                jumped_at: None,
            }),
        }
    }

    /// Whether it is safe to sign at wall time `wall` (monotonic `mono`).
    pub fn check(&self, wall: SystemTime, mono: Instant) -> Result<(), ClockJump> {
        // A poisoned lock only means a panic elsewhere mid-check; the baseline is still a
        // pair of times, fine to go on with.
        let mut b = self
            .baseline
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let expected = b.wall + mono.saturating_duration_since(b.mono);
        let (offset, forward) = match wall.duration_since(expected) {
            Ok(ahead) => (ahead, true),
            Err(behind) => (behind.duration(), false),
        };
        if offset <= ALLOWANCE {
            *b = Baseline {
                wall,
                mono,
                jumped_at: None,
            };
            return Ok(());
        }
        let since = *b.jumped_at.get_or_insert(mono);
        let stood = mono.saturating_duration_since(since);
        if stood >= QUARANTINE {
            tracing::warn!(
                offset_seconds = offset.as_secs(),
                forward,
                "the wall clock jump has stood for {} s: accepting it as the new time and signing again",
                QUARANTINE.as_secs()
            );
            *b = Baseline {
                wall,
                mono,
                jumped_at: None,
            };
            return Ok(());
        }
        Err(ClockJump {
            offset,
            forward,
            accept_in: QUARANTINE - stood,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn start() -> (SystemTime, Instant, ClockGuard) {
        let (w, m) = (SystemTime::now(), Instant::now());
        (w, m, ClockGuard::new(w, m))
    }

    #[test]
    fn steady_time_and_small_steps_pass() {
        let (w, m, g) = start();
        g.check(w + HOUR, m + HOUR).unwrap();
        // A 50 s NTP step, then another: each within the allowance of the moving baseline.
        g.check(
            w + HOUR + Duration::from_secs(60),
            m + HOUR + Duration::from_secs(10),
        )
        .unwrap();
        g.check(
            w + HOUR + Duration::from_secs(120),
            m + HOUR + Duration::from_secs(20),
        )
        .unwrap();
    }

    #[test]
    fn a_jump_past_the_ttl_is_refused_both_ways() {
        let (w, m, g) = start();
        let fwd = g
            .check(w + 2 * HOUR, m + Duration::from_secs(1))
            .unwrap_err();
        assert!(fwd.forward);
        assert_eq!(fwd.offset, 2 * HOUR - Duration::from_secs(1));
        assert!(fwd.to_string().contains("not yet valid"), "{fwd}");
        let (w, m, g) = start();
        let back = g
            .check(w - 2 * HOUR, m + Duration::from_secs(1))
            .unwrap_err();
        assert!(!back.forward);
        assert!(back.to_string().contains("already expired"), "{back}");
    }

    #[test]
    fn a_jump_that_comes_back_is_forgotten() {
        let (w, m, g) = start();
        assert!(g.check(w + 2 * HOUR, m + Duration::from_secs(10)).is_err());
        // The clock is stepped back to the right time: signing resumes at once.
        g.check(w + Duration::from_secs(20), m + Duration::from_secs(20))
            .unwrap();
        // A later jump gets its own full quarantine.
        let again = g
            .check(w + 3 * HOUR, m + Duration::from_secs(30))
            .unwrap_err();
        assert_eq!(again.accept_in, QUARANTINE);
    }

    #[test]
    fn a_jump_that_stands_is_accepted_after_the_quarantine() {
        let (w, m, g) = start();
        let first = g.check(w + 2 * HOUR, m).unwrap_err();
        assert_eq!(first.accept_in, QUARANTINE);
        let later = g
            .check(
                w + 2 * HOUR + Duration::from_secs(100),
                m + Duration::from_secs(100),
            )
            .unwrap_err();
        assert_eq!(later.accept_in, QUARANTINE - Duration::from_secs(100));
        g.check(w + 2 * HOUR + QUARANTINE, m + QUARANTINE).unwrap();
        // The new time is the baseline now.
        g.check(w + 2 * HOUR + QUARANTINE + HOUR, m + QUARANTINE + HOUR)
            .unwrap();
    }
}
