//! Durations as people write them: `10s`, `1m30s`, `250ms`, `1.5h`, `0`.
//!
//! The syntax is Go's `time.ParseDuration` (units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`),
//! which is what micro's `?ttl=` and iaido's config accept, so values users already have
//! keep working. A bare number other than `0` is rejected: `30` could mean seconds or
//! milliseconds, and guessing wrong is worse than asking.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A [`Duration`] that parses from and prints as a human duration string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (write it like 10s, 1m30s or 250ms)")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

/// Parses a Go-style duration string.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("it is empty"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err(err("it is negative"));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(err("a number is missing before the unit"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| err("it has a malformed number"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1e0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "" => return Err(err("a unit is missing (ms, s, m or h)")),
            _ => return Err(err("the unit is unknown (use ns, us, ms, s, m or h)")),
        };
        rest = &rest[unit_len..];
        total += value * nanos_per_unit;
    }
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err(err("it is too large"));
    }
    Ok(Duration::from_nanos(total.round() as u64))
}

/// Prints a duration the way [`parse`] reads it, in the largest units that are exact.
pub fn format(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_string();
    }
    let nanos = d.as_nanos();
    if !nanos.is_multiple_of(1_000_000) {
        return if nanos.is_multiple_of(1_000) {
            format!("{}us", nanos / 1_000)
        } else {
            format!("{nanos}ns")
        };
    }
    if !nanos.is_multiple_of(1_000_000_000) {
        return format!("{}ms", nanos / 1_000_000);
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    let h = secs / 3600;
    secs %= 3600;
    let m = secs / 60;
    secs %= 60;
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if secs > 0 {
        out.push_str(&format!("{secs}s"));
    }
    out
}

impl FromStr for Dur {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s).map(Dur)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format(self.0))
    }
}

impl From<Dur> for Duration {
    fn from(d: Dur) -> Duration {
        d.0
    }
}

impl<'de> serde::Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map(Dur).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_go_parses() {
        let cases = [
            ("10s", Duration::from_secs(10)),
            ("1m", Duration::from_secs(60)),
            ("1m30s", Duration::from_secs(90)),
            ("250ms", Duration::from_millis(250)),
            ("1.5h", Duration::from_secs(5400)),
            ("2h45m", Duration::from_secs(9900)),
            ("100us", Duration::from_micros(100)),
            ("7ns", Duration::from_nanos(7)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            (" 3s ", Duration::from_secs(3)),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejects_what_would_be_a_guess() {
        for bad in ["", "30", "-1s", "s", "1x", "1.2.3s", "ms5"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("invalid duration"), "{bad}: {e}");
        }
        assert!(parse("30")
            .unwrap_err()
            .to_string()
            .contains("unit is missing"));
    }

    #[test]
    fn format_round_trips() {
        for s in ["30s", "1m30s", "2h", "250ms", "100us", "7ns", "0s", "1h1s"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
