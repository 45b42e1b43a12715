//! The metrics view on fixed snapshots (no kernel): the exposition text, the counters' rules,
//! and an hour of churn among 1000 processes in simulated time.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use immp_model::{
    Event, ProcId, Snapshot,
    event::{Capped, Mechanism, PredictionPair},
    fixtures::{proc_, snap},
    predict::Prediction,
    snapshot::ProcSample,
};

use super::{MetricsSettings, MetricsView, RETAIN};

fn settings(top: usize) -> MetricsSettings {
    MetricsSettings {
        top,
        retain: RETAIN,
        self_pid: 77,
        bandwidth: Some(12.5e6),
        auto: false,
    }
}

/// One sample line: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the exposition, checking the OpenMetrics text rules the view relies on: every family
/// has `# TYPE` before its samples, counters' samples end in `_total`, names are
/// `[a-zA-Z_:][a-zA-Z0-9_:]*` with the `immp_` prefix, and the text ends with `# EOF`.
fn parse(text: &str) -> Vec<Sample> {
    assert!(text.ends_with("# EOF\n"), "no # EOF at the end");
    let mut types: HashMap<String, String> = HashMap::new();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| *l != "# EOF") {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("# TYPE name type");
            assert!(name.starts_with("immp_"), "{name}");
            assert!(
                types.insert(name.into(), ty.into()).is_none(),
                "{name} twice"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment {line}");
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').expect("}")),
            None => (series, ""),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{name}"
        );
        let family = types
            .keys()
            .filter(|f| name.starts_with(f.as_str()))
            .max_by_key(|f| f.len())
            .unwrap_or_else(|| panic!("{name}: sample before its # TYPE"));
        if types[family] == "counter" {
            assert_eq!(name, format!("{family}_total"), "counter sample name");
        }
        let labels = labels
            .split("\",")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once("=\"").expect("k=\"v\"");
                (k.to_string(), unescape(v.trim_end_matches('"')))
            })
            .collect();
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value of {line}")),
        };
        out.push((name.to_string(), labels, value));
    }
    out
}

/// A label value as written, escapes undone (`\\`, `\"`, `\n`).
fn unescape(v: &str) -> String {
    let mut out = String::new();
    let mut it = v.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('n') => out.push('\n'),
            Some(e) => out.push(e),
            None => panic!("dangling escape in {v}"),
        }
    }
    out
}

fn value(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && want.len() == l.len()
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
}

/// The process label sets (pid, comm) of a scrape, over every `immp_process_*` family.
fn process_series(samples: &[Sample]) -> BTreeSet<(String, String)> {
    samples
        .iter()
        .filter(|(n, _, _)| n.starts_with("immp_process_"))
        .map(|(_, l, _)| (l.get("pid").cloned().unwrap_or_default(), l["comm"].clone()))
        .collect()
}

fn at(mut s: Snapshot, seq: u64, time_ms: u64) -> Snapshot {
    s.seq = seq;
    s.time_unix_ms = time_ms;
    s
}

fn fixed() -> (MetricsView, Snapshot) {
    let mut v = MetricsView::new(MetricsSettings {
        auto: true,
        ..settings(2)
    });
    let mut w = proc_(10, 3000.0, 95.0);
    w.comm = "ring\x1b[31m".into();
    w.cmdline = "ring --password hunter2".into();
    w.rates.write_protect = 500.0;
    w.rates.pagecache = 20.0;
    let mut me = proc_(77, 5.0, 1.0);
    me.comm = "immp".into();
    me.rss_bytes = 9_000_000;
    let mut s = snap(vec![w, proc_(11, 100.0, 50.0), proc_(12, 50.0, 2.0), me]);
    s.totals.unattributed_pages_per_s = 40.0;
    s.totals.unattributed_bytes_per_s = 40.0 * 4096.0;
    s.totals.short_lived_dirty_pages_per_s = 3.0;
    s.totals.active_processes = 4;
    s.health.map_full = 2;
    s.health.tracked = 120;
    s.health.capacity = 16384;
    v.set_caps(&[Capped {
        pid: 11,
        start_time: 1011,
        comm: "p11".into(),
        cap_pct: 20.0,
        mechanism: Mechanism::CgroupV1,
        cgroup: "/immp-11-1011".into(),
    }]);
    let p = Prediction {
        converges: false,
        rounds: 30,
        total_s: None,
        bytes_sent: 1e9,
        downtime_s: None,
    };
    let good = Prediction {
        converges: true,
        rounds: 4,
        total_s: Some(42.5),
        downtime_s: Some(0.2),
        ..p
    };
    v.on_event(&Event::Prediction(PredictionPair {
        without_caps: p,
        with_caps: good,
        target_s: 45.0,
        goal_met: true,
    }));
    v.on_snapshot(&at(s.clone(), 1, 1_700_000_000_000), Some(p));
    (v, s)
}

#[test]
fn exposition_of_a_fixed_snapshot() {
    let (v, _) = fixed();
    let text = v.render();
    let samples = parse(&text);
    insta::assert_snapshot!("metrics_fixed", text);
    // The capped process is listed first, then the busiest; the rest is `other`.
    let listed = process_series(&samples);
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed.contains(&("11".into(), "p11".into())));
    assert!(listed.contains(&("10".into(), "ring\\x1b[31m".into())));
    assert!(listed.contains(&(String::new(), "other".into())));
    // Command lines never leave immp, and no raw control character either.
    assert!(!text.contains("hunter2") && !text.contains('\x1b'));
    let pages = |pid: &str, comm: &str, class: &str| {
        value(
            &samples,
            "immp_process_dirty_pages_total",
            &[("pid", pid), ("comm", comm), ("class", class)],
        )
    };
    assert_eq!(pages("10", "ring\\x1b[31m", "write_new"), Some(3000.0));
    assert_eq!(pages("10", "ring\\x1b[31m", "write_protect"), Some(500.0));
    let other_new = value(
        &samples,
        "immp_process_dirty_pages_total",
        &[("pid", ""), ("comm", "other"), ("class", "write_new")],
    );
    assert_eq!(other_new, Some(55.0), "p12 and immp itself");
    let cap = [("pid", "11"), ("comm", "p11"), ("mechanism", "cgroup-v1")];
    assert_eq!(value(&samples, "immp_process_cap_ratio", &cap), Some(0.2));
    let unattributed = [("source", "unattributed")];
    assert_eq!(
        value(&samples, "immp_guest_dirty_pages_total", &unattributed),
        Some(40.0)
    );
    let measured = [("scenario", "measured")];
    let t = value(&samples, "immp_migration_predicted_seconds", &measured);
    assert_eq!(t, None, "no time when it does not converge");
    let planned = [("scenario", "planned")];
    assert_eq!(
        value(&samples, "immp_migration_converges", &planned),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "immp_self_dirty_bytes_total", &[]),
        Some(5.0 * 4096.0)
    );
    assert_eq!(
        value(&samples, "immp_measurement_mode", &[("mode", "bounds")]),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "immp_probe_map_full_events_total", &[]),
        Some(2.0)
    );
}

/// Process `pid` at `bytes_per_s` (1 s interval).
fn writer(pid: u32, pages: f64) -> ProcSample {
    proc_(pid, pages, 10.0)
}

#[test]
fn a_process_that_leaves_the_top_and_comes_back_keeps_its_counter_and_nothing_doubles() {
    let mut v = MetricsView::new(settings(1));
    let mut last: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut total = 0.0;
    // Two writers take turns at the top.
    for i in 0..40u64 {
        let (a, b) = if (i / 5) % 2 == 0 {
            (1000.0, 10.0)
        } else {
            (10.0, 1000.0)
        };
        total += a + b;
        let s = snap(vec![writer(1, a), writer(2, b)]);
        v.on_snapshot(&at(s, i, i * 1000), None);
        let samples = parse(&v.render());
        assert!(process_series(&samples).len() <= 2);
        let mut sum = 0.0;
        for (n, l, val) in &samples {
            if n != "immp_process_dirty_pages_total" || l["class"] != "write_new" {
                continue;
            }
            let key = (l.get("pid").cloned().unwrap_or_default(), l["comm"].clone());
            let before = last.insert(key.clone(), *val).unwrap_or(0.0);
            assert!(*val >= before, "{key:?} went from {before} to {val}");
            sum += val;
        }
        // What is not shown now was counted under a series that was shown before.
        let hidden: f64 = last
            .iter()
            .filter(|(k, _)| !process_series(&samples).contains(k))
            .map(|(_, v)| v)
            .sum();
        assert!(
            (sum + hidden - total).abs() < 1e-6,
            "{sum} + {hidden} vs {total}"
        );
    }
    assert!(last.contains_key(&("1".into(), "p1".into())));
    assert!(last.contains_key(&("2".into(), "p2".into())));
}

#[test]
fn a_process_unseen_for_five_minutes_is_dropped() {
    let mut v = MetricsView::new(settings(5));
    v.on_snapshot(&at(snap(vec![writer(1, 100.0)]), 1, 0), None);
    for i in 1..=300u64 {
        v.on_snapshot(&at(snap(vec![writer(2, 1.0)]), i + 1, i * 1000), None);
        let listed = process_series(&parse(&v.render()));
        let shown = listed.contains(&("1".into(), "p1".into()));
        assert_eq!(shown, i < 300, "at {i} s");
    }
}

/// A small deterministic generator (no dependency for a test).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn an_hour_of_churn_among_1000_processes_keeps_at_most_top_plus_one_series() {
    const TOP: usize = 20;
    let mut v = MetricsView::new(settings(TOP));
    let mut rng = Lcg(42);
    let mut live: Vec<(ProcId, f64)> = (0..1000u32)
        .map(|i| (ProcId::new(1000 + i, i as u64), 1.0))
        .collect();
    let mut next_pid = 5000u32;
    let mut last: HashMap<(String, String), f64> = HashMap::new();
    let mut seen = BTreeSet::new();
    for t in 0..3600u64 {
        // Heavy churn: 20 processes exit and 20 are born every second, and every rate moves.
        for _ in 0..20 {
            let i = (rng.next() % live.len() as u64) as usize;
            live[i] = (ProcId::new(next_pid, t), 1.0);
            next_pid += 1;
        }
        for (_, r) in live.iter_mut() {
            *r = (rng.next() % 5000) as f64;
        }
        let procs = live
            .iter()
            .map(|(id, r)| {
                let mut p = writer(id.pid, *r);
                p.start_time = id.start_time;
                p
            })
            .collect();
        v.on_snapshot(&at(snap(procs), t, t * 1000), None);
        let samples = parse(&v.render());
        let series = process_series(&samples);
        assert!(series.len() <= TOP + 1, "{} series at {t} s", series.len());
        for (n, l, val) in &samples {
            if n == "immp_process_dirty_unique_bytes_total" {
                let key = (l.get("pid").cloned().unwrap_or_default(), l["comm"].clone());
                let before = last.insert(key.clone(), *val).unwrap_or(0.0);
                assert!(*val >= before, "{key:?}: {before} -> {val} at {t} s");
                seen.insert(key);
            }
        }
    }
    // The state behind it is bounded too: what was seen in the last 5 minutes.
    let tracked = v.state().procs.len();
    assert!(tracked <= 1000 + 20 * 300, "{tracked} processes tracked");
    assert!(
        seen.len() > TOP + 1,
        "the top did change: {} series",
        seen.len()
    );
}

#[test]
fn cap_changes_are_counted_once_each() {
    use immp_model::{
        event::{Undo, Undone},
        policy::{Action, Decision},
    };
    let (mut v, s) = fixed(); // p11 capped at 20 %
    let decision = |pid: u32, action| {
        Event::Decision(Decision {
            pid,
            start_time: 1000 + pid as u64,
            comm: format!("p{pid}"),
            action,
            reason: "test".into(),
            target_s: 45.0,
            budget_bytes_per_s: None,
            measured_bytes_per_s: 0.0,
        })
    };
    let capped = Capped {
        pid: 12,
        start_time: 1012,
        comm: "p12".into(),
        cap_pct: 30.0,
        mechanism: Mechanism::CgroupV1,
        cgroup: "/immp-12-1012".into(),
    };
    // A new cap: its `capped` event and its decision; a changed cap: its decision only.
    v.on_event(&Event::Capped(capped.clone()));
    v.on_event(&decision(12, Action::Cap { cap_pct: 30.0 }));
    v.on_event(&decision(11, Action::Cap { cap_pct: 15.0 }));
    v.on_event(&decision(11, Action::Keep { cap_pct: 15.0 }));
    v.on_event(&Event::Lifted(Undo {
        pid: 11,
        start_time: 1011,
        comm: "p11".into(),
        undone: Undone::NothingToUndo,
    }));
    v.set_caps(&[capped]);
    v.on_snapshot(&at(s, 2, 1_700_000_001_000), None);
    let samples = parse(&v.render());
    for (change, n) in [("capped", 1.0), ("changed", 1.0), ("lifted", 1.0)] {
        let got = value(&samples, "immp_cap_changes_total", &[("change", change)]);
        assert_eq!(got, Some(n), "{change}");
    }
    let cap = [("pid", "12"), ("comm", "p12"), ("mechanism", "cgroup-v1")];
    assert_eq!(value(&samples, "immp_process_cap_ratio", &cap), Some(0.3));
}

#[test]
fn a_storm_of_processes_is_bounded_in_memory_too() {
    let mut v = MetricsView::new(settings(20));
    let n = super::MAX_TRACKED as u32 + 10;
    v.on_snapshot(
        &at(snap((0..n).map(|p| writer(p, 1.0)).collect()), 1, 0),
        None,
    );
    let late = snap((n..n + 10).map(|p| writer(p, 1.0)).collect());
    v.on_snapshot(&at(late, 2, 1000), None);
    let st = v.state();
    assert_eq!(st.procs.len(), super::MAX_TRACKED);
    // The most recently seen stay.
    assert!(
        st.procs
            .contains_key(&ProcId::new(n + 9, 1000 + (n + 9) as u64))
    );
}
