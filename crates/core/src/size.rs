//! Sizes as people write them: `1048576`, `512KiB`, `4MiB`, `1GiB` (also `KB`, `MB`,
//! `GB`, meaning powers of 1000, and `K`, `M`, `G`, meaning powers of 1024).

use std::fmt;
use std::str::FromStr;

/// A byte count that parses from and prints as a size string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {0:?}: write it like 1048576, 512KiB or 4MiB")]
pub struct SizeError(String);

pub fn parse(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| SizeError(input.into()))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(SizeError(input.into())),
    };
    n.checked_mul(mult).ok_or_else(|| SizeError(input.into()))
}

pub fn format(n: u64) -> String {
    for (unit, m) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= m && n.is_multiple_of(m) {
            return format!("{}{unit}", n / m);
        }
    }
    n.to_string()
}

impl FromStr for Size {
    type Err = SizeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s).map(Size)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format(self.0))
    }
}

impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => parse(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        assert_eq!(parse("1048576"), Ok(1 << 20));
        assert_eq!(parse("4MiB"), Ok(4 << 20));
        assert_eq!(parse("512KiB"), Ok(512 << 10));
        assert_eq!(parse("2MB"), Ok(2_000_000));
        assert_eq!(parse("1G"), Ok(1 << 30));
        for bad in ["", "MiB", "1.5MiB", "-1", "3 parsecs", "99999999999999GiB"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(format(4 << 20), "4MiB");
        assert_eq!(format(1000), "1000");
    }
}
