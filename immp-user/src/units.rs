//! Human units in, human units out: `2s`, `500ms`, `100Mbit`, `12.5MB/s`, `20%`.
//!
//! Parsers are strict: a bad string is a one-line error naming what was expected.
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UnitError {
    #[error("'{0}' is not a duration (examples: 2s, 500ms, 1.5m, 1h)")]
    Duration(String),
    #[error("'{0}' is not a bandwidth (examples: 100Mbit, 1Gbit, 12.5MB/s, 800KiB/s)")]
    Bandwidth(String),
    #[error("'{0}' is not a percentage (examples: 20%, 12.5%)")]
    Percent(String),
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
}

fn split_number(s: &str) -> Option<(f64, &str)> {
    let s = s.trim();
    let end = s
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == '.'))
        .map(|(i, _)| i)
        .unwrap_or(s.len());
    let n: f64 = s[..end].parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    Some((n, s[end..].trim()))
}

/// `2s`, `500ms`, `1.5m`, `1h`, `250us`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let err = || UnitError::Duration(s.to_string());
    let (n, unit) = split_number(s).ok_or_else(err)?;
    let secs = match unit {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" | "min" | "mins" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(err()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| err())
}

/// A duration that must be above zero (intervals, windows).
pub fn parse_positive_duration(s: &str) -> Result<Duration, UnitError> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(UnitError::Zero("the duration"));
    }
    Ok(d)
}

/// Bandwidth in bytes per second. Bits: `bit`, `bps`, `Kbit`, `Mbit`, `Gbit`, `Mbps`...
/// Bytes: `B/s`, `KB/s`, `MB/s`, `GB/s` (SI) and `KiB/s`, `MiB/s`, `GiB/s`; `/s` is optional.
pub fn parse_bandwidth(s: &str) -> Result<f64, UnitError> {
    let err = || UnitError::Bandwidth(s.to_string());
    let (n, unit) = split_number(s).ok_or_else(err)?;
    let unit = unit.strip_suffix("/s").unwrap_or(unit);
    let (prefix, rest) = match unit.char_indices().nth(1) {
        _ if unit.is_empty() => return Err(err()),
        _ if unit.starts_with("bit") || unit.starts_with("bps") || unit == "B" => ("", unit),
        Some((i, _)) => unit.split_at(i),
        None => return Err(err()),
    };
    let (mult, rest) = match (prefix, rest) {
        ("", r) => (1.0, r),
        ("k" | "K", r) => match r.strip_prefix('i') {
            Some(r) => (1024.0, r),
            None => (1e3, r),
        },
        ("M", r) => match r.strip_prefix('i') {
            Some(r) => (1024.0 * 1024.0, r),
            None => (1e6, r),
        },
        ("G", r) => match r.strip_prefix('i') {
            Some(r) => (1024.0 * 1024.0 * 1024.0, r),
            None => (1e9, r),
        },
        _ => return Err(err()),
    };
    let bytes = match rest {
        "bit" | "bits" | "bps" | "b" => n * mult / 8.0,
        "B" => n * mult,
        _ => return Err(err()),
    };
    if bytes <= 0.0 {
        return Err(UnitError::Zero("the bandwidth"));
    }
    Ok(bytes)
}

/// `20%` or `20` -> 20.0 (percent of one CPU). Range checks belong to the caller, which knows
/// how many CPUs there are.
pub fn parse_percent(s: &str) -> Result<f64, UnitError> {
    let err = || UnitError::Percent(s.to_string());
    let t = s.trim();
    let t = t.strip_suffix('%').unwrap_or(t);
    let (n, rest) = split_number(t).ok_or_else(err)?;
    if !rest.is_empty() {
        return Err(err());
    }
    Ok(n)
}

/// `12.5 MB/s`, `980 kB/s`, `0 B/s` (SI, as network links are sold).
pub fn fmt_rate(bytes_per_s: f64) -> String {
    format!("{}/s", fmt_bytes(bytes_per_s))
}

/// `1.2 GB`, `512 kB`.
pub fn fmt_bytes(b: f64) -> String {
    let (v, u) = if b >= 1e9 {
        (b / 1e9, "GB")
    } else if b >= 1e6 {
        (b / 1e6, "MB")
    } else if b >= 1e3 {
        (b / 1e3, "kB")
    } else {
        return format!("{b:.0} B");
    };
    if v >= 100.0 {
        format!("{v:.0} {u}")
    } else {
        format!("{v:.1} {u}")
    }
}

/// `1.5s`, `250ms`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.1}s")
    } else {
        format!("{:.0}ms", s * 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("banana").is_err());
        assert!(parse_duration("2 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(
            parse_positive_duration("0").unwrap_err(),
            UnitError::Zero("the duration")
        );
        assert_eq!(
            parse_duration("banana").unwrap_err().to_string(),
            "'banana' is not a duration (examples: 2s, 500ms, 1.5m, 1h)"
        );
    }

    #[test]
    fn bandwidths() {
        assert_eq!(parse_bandwidth("100Mbit").unwrap(), 12_500_000.0);
        assert_eq!(parse_bandwidth("100Mbps").unwrap(), 12_500_000.0);
        assert_eq!(parse_bandwidth("12.5MB/s").unwrap(), 12_500_000.0);
        assert_eq!(parse_bandwidth("1Gbit").unwrap(), 125_000_000.0);
        assert_eq!(parse_bandwidth("1MiB/s").unwrap(), 1_048_576.0);
        assert_eq!(parse_bandwidth("800KiB/s").unwrap(), 819_200.0);
        assert_eq!(parse_bandwidth("10kbit").unwrap(), 1250.0);
        assert_eq!(parse_bandwidth("64B/s").unwrap(), 64.0);
        assert!(parse_bandwidth("12parsecs").is_err());
        assert!(parse_bandwidth("100").is_err(), "a unit is required");
        assert!(parse_bandwidth("0Mbit").is_err());
        assert!(parse_bandwidth("Mbit").is_err());
    }

    #[test]
    fn percents() {
        assert_eq!(parse_percent("20%").unwrap(), 20.0);
        assert_eq!(parse_percent("12.5").unwrap(), 12.5);
        assert!(parse_percent("banana").is_err());
        assert!(parse_percent("20%%").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_rate(12_500_000.0), "12.5 MB/s");
        assert_eq!(fmt_rate(0.0), "0 B/s");
        assert_eq!(fmt_bytes(1_234_567_890.0), "1.2 GB");
        assert_eq!(fmt_bytes(512_000.0), "512 kB");
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250ms");
    }
}
