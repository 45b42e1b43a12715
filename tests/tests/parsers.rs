//! Property tests: the unit parsers and the command line take any string without panicking.
//! Every value a user can type reaches one of them first, so a panic here is a crash (exit 101,
//! a backtrace) where the README promises a one-line error and exit 2.
use std::time::{Duration, Instant};

use clap::Parser;
use immp::{cmd::Cli, model::units};
use proptest::prelude::*;

/// Strings a parser meets: arbitrary unicode, numbers of every shape with every unit (and some
/// that are not), the floating-point specials, huge and tiny numbers, signs, spaces.
fn inputs() -> impl Strategy<Value = String> {
    let special = prop::sample::select(vec![
        "", " ", "NaN", "nan", "inf", "-inf", "+inf", "infinity", "1e400", "1e-400", "-0",
        "0", "-0.0", "+1", ".", "..", "1.", ".5", "1..2", "0x10", "١٢", "½", "１２", "%", "%%",
        "s", "ms", "/s", ",", ",,", "1,", ",1", "1s,", "1s,,2s",
        "18446744073709551616", "18446744073709551615s", "340282366920938463463374607431768211456",
        "179769313486231570000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "4000000000000000h", "99999999999999999999h", "1e19", "0.0000000000000000001ms",
    ])
    .prop_map(str::to_string);
    // Finite numbers that overflow once multiplied by their unit (1e308 GiB is not finite).
    let huge = (
        300usize..=308,
        prop::sample::select(vec!["GiB", "GB", "MiB/s", "GiB/s", "Gbit", "h", "m", "%"]),
    )
        .prop_map(|(digits, unit)| format!("{}{unit}", "9".repeat(digits)));
    let number = prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        any::<f64>().prop_map(|f| format!("{f:e}")),
        "[0-9]{1,400}(\\.[0-9]{0,400})?",
        "[-+]?[0-9.]{0,12}",
    ];
    let unit = prop::sample::select(vec![
        "", "s", "sec", "secs", "ms", "us", "µs", "m", "min", "mins", "h", "d", "%", "%%", "bit",
        "bits", "bps", "b", "B", "B/s", "kbit", "Kbit", "Mbit", "Gbit", "Tbit", "Mbps", "KB/s",
        "kB", "KB", "MB", "GB", "KiB", "MiB", "GiB", "KiB/s", "MiB/s", "GiB/s", "MB/s", "/s", "i",
        "Mi", "é", " s", "s ", "\u{0}", "\u{202e}",
    ])
    .prop_map(str::to_string);
    let with_unit = (number, unit).prop_map(|(n, u)| format!("{n}{u}"));
    let list = prop::collection::vec(with_unit.clone(), 0..6).prop_map(|v| v.join(","));
    prop_oneof![
        3 => any::<String>(),
        2 => special,
        1 => huge,
        4 => with_unit,
        2 => list,
        1 => "\\PC{0,40}",
    ]
}

fn finite_nonnegative(what: &str, s: &str, v: f64) -> Result<(), TestCaseError> {
    prop_assert!(
        v.is_finite() && v >= 0.0,
        "{what}({s:?}) = Ok({v}): not finite and >= 0"
    );
    Ok(())
}

fn duration_ok(what: &str, s: &str, d: Duration) -> Result<(), TestCaseError> {
    finite_nonnegative(what, s, d.as_secs_f64())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Every parser answers Ok or Err, never panics; Ok values are finite and >= 0.
    #[test]
    fn unit_parsers_never_panic_and_return_sane_values(s in inputs()) {
        if let Ok(d) = units::parse_duration(&s) {
            duration_ok("parse_duration", &s, d)?;
        }
        if let Ok(d) = units::parse_positive_duration(&s) {
            duration_ok("parse_positive_duration", &s, d)?;
            prop_assert!(!d.is_zero(), "parse_positive_duration({s:?}) = 0");
        }
        if let Ok(v) = units::parse_bandwidth(&s) {
            finite_nonnegative("parse_bandwidth", &s, v)?;
            prop_assert!(v > 0.0, "parse_bandwidth({s:?}) = {v}");
        }
        if let Ok(v) = units::parse_percent(&s) {
            finite_nonnegative("parse_percent", &s, v)?;
        }
        if let Ok(v) = units::parse_bytes(&s) {
            finite_nonnegative("parse_bytes", &s, v)?;
            prop_assert!(v > 0.0, "parse_bytes({s:?}) = {v}");
        }
        if let Ok(v) = units::parse_share(&s) {
            finite_nonnegative("parse_share", &s, v)?;
            prop_assert!(v > 0.0 && v <= 10.0, "parse_share({s:?}) = {v}");
        }
        if let Ok(v) = units::parse_headroom(&s) {
            finite_nonnegative("parse_headroom", &s, v)?;
            prop_assert!(v < 0.95, "parse_headroom({s:?}) = {v}");
        }
        if let Ok(ws) = units::parse_windows(&s) {
            for d in &ws {
                duration_ok("parse_windows", &s, *d)?;
                prop_assert!(!d.is_zero(), "parse_windows({s:?}) has a zero window");
            }
            prop_assert!(ws.windows(2).all(|w| w[0] < w[1]), "parse_windows({s:?}) = {ws:?}");
        }
    }

    /// A duration immp accepts is one it can use: `now + d` (every deadline, every interval
    /// timer) exists. One that does not (e.g. `4000000000000000h`, 1.4e19 s) made
    /// `immp profile --duration ...` panic with "overflow when adding duration to instant".
    #[test]
    fn accepted_durations_are_representable_as_deadlines(s in inputs()) {
        let now = Instant::now();
        for (what, d) in [
            ("parse_duration", units::parse_duration(&s).ok()),
            ("parse_positive_duration", units::parse_positive_duration(&s).ok()),
        ] {
            if let Some(d) = d {
                prop_assert!(
                    now.checked_add(d).is_some(),
                    "{what}({s:?}) = Ok({d:?}), which no deadline can hold"
                );
            }
        }
        for d in units::parse_windows(&s).unwrap_or_default() {
            prop_assert!(now.checked_add(d).is_some(), "parse_windows({s:?}) holds {d:?}");
        }
    }

    /// clap with immp's value parsers: any value of any option parses or is a clap error.
    #[test]
    fn command_line_values_never_panic(s in inputs()) {
        let runs: [&[&str]; 7] = [
            &["immp", "throttle", "--cap", &s, "--pid", "1"],
            &["immp", "throttle", "--pid", "1", "--cap", "20%", "--interval", &s],
            &["immp", "throttle", "--auto", "--bandwidth", &s],
            &["immp", "throttle", "--pid", "1", "--cap", "20%", "--duration", &s],
            &["immp", "throttle", "--auto", "--bandwidth", "100Mbit", "--floor", &s],
            &["immp", "profile", "--bandwidth", &s],
            &["immp", "profile", "--interval", &s, "--duration", &s],
        ];
        for args in runs {
            let r = std::panic::catch_unwind(|| Cli::try_parse_from(args).map(|_| ()));
            prop_assert!(r.is_ok(), "clap panicked on {args:?}");
        }
    }
}

/// The special strings the brief names, each through every parser, outside proptest's sampling.
#[test]
fn named_special_strings() {
    for s in [
        "",
        "NaN",
        "inf",
        "1e400",
        "-0",
        "-1",
        "1e19",
        "99999999999999999999999999999999s",
    ] {
        let _ = units::parse_duration(s);
        let _ = units::parse_positive_duration(s);
        let _ = units::parse_windows(s);
        for (name, r) in [
            ("bandwidth", units::parse_bandwidth(s)),
            ("percent", units::parse_percent(s)),
            ("bytes", units::parse_bytes(s)),
            ("share", units::parse_share(s)),
            ("headroom", units::parse_headroom(s)),
        ] {
            if let Ok(v) = r {
                assert!(v.is_finite() && v >= 0.0, "{name}({s:?}) = {v}");
            }
        }
    }
    // A finite number times its unit can overflow: an error, never Ok(inf).
    let big = "9".repeat(308);
    for s in [format!("{big}GiB"), format!("{big}GB")] {
        let r = units::parse_bytes(&s);
        assert!(
            r.as_ref().map_or(true, |v| v.is_finite()),
            "parse_bytes({s:?}) = {r:?}"
        );
    }
    for s in [format!("{big}GiB/s"), format!("{big}GB/s")] {
        let r = units::parse_bandwidth(&s);
        assert!(
            r.as_ref().map_or(true, |v| v.is_finite()),
            "parse_bandwidth({s:?}) = {r:?}"
        );
    }
    assert!(units::parse_percent("NaN").is_err());
    assert!(units::parse_percent("inf").is_err());
    assert!(units::parse_duration("1e400").is_err());
}
