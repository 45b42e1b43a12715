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
    #[error("'{0}' is not a size (examples: 512MB, 4GiB)")]
    Size(String),
    #[error("'{0}' must be {1}")]
    Range(String, &'static str),
    #[error("'{0}': window lengths must be strictly increasing")]
    Windows(String),
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
    // Bounded so that every duration can be added to a clock reading (a deadline).
    if secs > MAX_DURATION_S {
        return Err(UnitError::Range(s.to_string(), "at most 366 days"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| err())
}

/// The longest duration accepted: a year (and a day).
pub const MAX_DURATION_S: f64 = 366.0 * 86400.0;

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
    if !bytes.is_finite() {
        return Err(err());
    }
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

/// `512MB`, `4GiB`, `1000` (bytes); above zero.
pub fn parse_bytes(s: &str) -> Result<f64, UnitError> {
    let err = || UnitError::Size(s.to_string());
    let (n, unit) = split_number(s).ok_or_else(err)?;
    let mult = match unit {
        "" | "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1048576.0,
        "GiB" => 1073741824.0,
        _ => return Err(err()),
    };
    if n <= 0.0 || !(n * mult).is_finite() {
        return Err(err());
    }
    Ok(n * mult)
}

/// A share of the link as a fraction: `25%` -> 0.25; above 0 % and at most 1000 %.
pub fn parse_share(s: &str) -> Result<f64, UnitError> {
    let p = parse_percent(s)?;
    if p <= 0.0 || p > 1000.0 {
        return Err(UnitError::Range(
            s.to_string(),
            "above 0% and at most 1000%",
        ));
    }
    Ok(p / 100.0)
}

/// Headroom as a fraction: `20%` -> 0.2; at least 0 % and below 95 %.
pub fn parse_headroom(s: &str) -> Result<f64, UnitError> {
    let p = parse_percent(s)?;
    if !(0.0..95.0).contains(&p) {
        return Err(UnitError::Range(s.to_string(), "at least 0% and below 95%"));
    }
    Ok(p / 100.0)
}

/// `0.1s,0.5s,1s`: window lengths above zero, strictly increasing.
pub fn parse_windows(s: &str) -> Result<Vec<Duration>, UnitError> {
    let v: Vec<Duration> = s
        .split(',')
        .map(|w| parse_positive_duration(w.trim()))
        .collect::<Result<_, _>>()?;
    if v.windows(2).any(|p| p[1] <= p[0]) {
        return Err(UnitError::Windows(s.to_string()));
    }
    Ok(v)
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
        assert!(
            parse_duration("4000000000000000h").is_err(),
            "not a deadline"
        );
        assert!(parse_duration("366d").is_err());
        assert!(parse_bandwidth(&format!("{}GiB/s", "9".repeat(400))).is_err());
        assert!(parse_bytes(&format!("{}GiB", "9".repeat(400))).is_err());
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
    fn sizes_shares_windows() {
        assert_eq!(parse_bytes("512MB").unwrap(), 512e6);
        assert_eq!(parse_bytes("4GiB").unwrap(), 4.0 * 1073741824.0);
        assert!(parse_bytes("0MB").is_err());
        assert!(parse_bytes("12 parsecs").is_err());
        assert_eq!(parse_share("25%").unwrap(), 0.25);
        assert!(parse_share("0%").is_err());
        assert_eq!(parse_headroom("20%").unwrap(), 0.2);
        assert!(parse_headroom("95%").is_err());
        assert_eq!(parse_windows("0.1s, 1s").unwrap().len(), 2);
        assert!(parse_windows("1s,0.5s").is_err());
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
