//! Times as the admin endpoints, metrics and logs show them: unix seconds and RFC 3339 in UTC
//! with whole seconds (`2025-01-02T03:04:05Z`). One copy, so `/certs` of both binaries, the
//! audit log and the expiry gauges agree to the second.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Unix seconds; times before 1970 (a broken clock) count as 0.
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Unix milliseconds; times before 1970 count as 0.
pub fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The time `seconds` unix seconds stand for (negative: before 1970).
pub fn from_unix_seconds(seconds: i64) -> SystemTime {
    let d = Duration::from_secs(seconds.unsigned_abs());
    if seconds >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH.checked_sub(d).unwrap_or(UNIX_EPOCH)
    }
}

/// The time `millis` unix milliseconds stand for; negative counts as 1970.
pub fn from_unix_millis(millis: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

/// RFC 3339 in UTC, whole seconds: `2025-01-02T03:04:05Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// [`rfc3339`] of unix seconds (what certificates and the registry store).
pub fn rfc3339_unix(seconds: i64) -> String {
    rfc3339(from_unix_seconds(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_round_trip_and_format() {
        let t = from_unix_seconds(1_700_000_000);
        assert_eq!(unix_seconds(t), 1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_unix(0), "1970-01-01T00:00:00Z");
        // Sub-second parts are dropped, not rounded.
        assert_eq!(
            rfc3339(t + Duration::from_millis(999)),
            "2023-11-14T22:13:20Z"
        );
    }

    #[test]
    fn millis_round_trip_and_broken_clocks_count_as_1970() {
        let t = from_unix_millis(1_700_000_000_123);
        assert_eq!(unix_millis(t), 1_700_000_000_123);
        assert_eq!(unix_seconds(t), 1_700_000_000);
        let before = UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(unix_seconds(before), 0);
        assert_eq!(unix_millis(before), 0);
        assert_eq!(from_unix_millis(-5), UNIX_EPOCH);
        assert_eq!(from_unix_seconds(-5), before);
    }
}
