//! Durations as an operator reads them in `trellis status` and `trellis inspect`.

/// A duration in its two largest units: `364d 3h`, `23h 59m`, `59m 30s`, `5s`.
pub fn span(secs: i64) -> String {
    let secs = secs.unsigned_abs();
    let units = [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut rest = secs;
    for (size, unit) in units {
        if rest >= size || (parts.is_empty() && size == 1) {
            parts.push(format!("{}{unit}", rest / size));
            rest %= size;
        } else if !parts.is_empty() {
            // Two adjacent units only: "1d 0h", never "1d 5m".
            parts.push(format!("0{unit}"));
        }
        if parts.len() == 2 {
            break;
        }
    }
    // "2h 0m" reads worse than "2h".
    if parts.len() == 2 && parts[1].starts_with('0') {
        parts.pop();
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_use_two_units() {
        assert_eq!(span(0), "0s");
        assert_eq!(span(5), "5s");
        assert_eq!(span(3570), "59m 30s");
        assert_eq!(span(86_399), "23h 59m");
        assert_eq!(span(364 * 86_400 + 3 * 3600 + 50), "364d 3h");
        assert_eq!(span(86_400 + 300), "1d");
        assert_eq!(span(-7200), "2h");
    }
}
