//! The fidelity matrix, host half: QEMU's calc-dirty-rate over each phase the guest's
//! `fidelity` test announces, and the judgement of immp's figures against it (QEMU's figure is
//! here, so the verdict is made here).
//!
//! The guest prints `IMMP-FID-CLASSES a,b,...`, then per phase (`idle`, then each class)
//! `IMMP-FID-BEGIN phase`, one `IMMP-FID-W phase work=B/s total=B/s ...` line per 1 s window,
//! and `IMMP-FID-END phase`. Windows are not synchronised one to one: both sides take the
//! median of their own windows over the same steady phase, all 1 s long (a rewriter's rate
//! depends on the window length, so only equal lengths compare).
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::{Guest, Qmp, Row, median};

/// QEMU's windows per phase, in MiB/s as it reported them.
pub type Phases = HashMap<String, Vec<f64>>;

/// A phase can last no longer than this (the guest's are ~10 s): a guest that stalls must
/// not hold the host in a loop.
const PHASE_LIMIT: Duration = Duration::from_secs(60);

const MB: f64 = 1e6;
const MIB: f64 = 1048576.0;

/// A phase the guest has begun and the host has not measured yet.
pub fn open_phase(log: &str, done: &Phases) -> Option<String> {
    log.lines()
        .filter_map(|l| l.strip_prefix("IMMP-FID-BEGIN "))
        .map(str::trim)
        .find(|p| !done.contains_key(*p))
        .map(str::to_string)
}

fn has_line(log: &str, line: &str) -> bool {
    log.lines().any(|l| l.trim() == line)
}

/// QEMU's windows back to back until the guest ends the phase. A window that ended after
/// the guest printed END might have seen the workload stop: it is dropped (the guest keeps
/// the workload running 0.5 s after END, more than the serial log's delay).
pub fn measure(q: &mut Qmp, g: &Guest, phase: &str) -> anyhow::Result<Vec<f64>> {
    let end = format!("IMMP-FID-END {phase}");
    let started = Instant::now();
    let mut out = Vec::new();
    let mut took = Vec::new();
    while !has_line(&g.serial(), &end) && started.elapsed() < PHASE_LIMIT {
        let t = Instant::now();
        let r = q.dirty_rate_mib(1);
        took.push(t.elapsed().as_millis());
        // A guest done with its last phase may power off while a window is measured: that
        // window is dropped like any other that saw END, and QEMU's error with it.
        if has_line(&g.serial(), &end) {
            break;
        }
        out.push(r?);
    }
    eprintln!("vm: fidelity {phase}: QEMU {out:?} MiB/s, windows took {took:?} ms");
    Ok(out)
}

/// The goal: within 15 % of QEMU, or within 1 MB/s where QEMU's rate is below 5 MB/s.
fn meets(x: f64, reference: f64) -> bool {
    if reference < 5.0 * MB {
        (x - reference).abs() <= MB
    } else {
        (x - reference).abs() <= 0.15 * reference
    }
}

/// One class's figures: medians over its windows, bytes/s.
struct Figures {
    /// QEMU's rate for the whole guest, and with the baseline phase taken off.
    qemu: f64,
    base: f64,
    net: f64,
    total: f64,
    work: f64,
    windows: (usize, usize),
}

/// QEMU 7.2 reports whole MiB/s, rounded down (integer division in update_dirtyrate): a
/// window's figure is taken as the middle of its 1 MiB/s bin. Its own noise (~1 MiB/s at
/// 16 MiB/s with 8192 pages sampled) spreads the windows over several bins, so that the
/// median's bias is gone too. Both the class and its baseline get the same half, so the net
/// rate is free of it.
fn qemu_rate(windows: &[f64]) -> Option<f64> {
    let mut w: Vec<f64> = windows.iter().map(|r| (r + 0.5) * MIB).collect();
    (!w.is_empty()).then(|| median(&mut w))
}

/// immp's windows of one phase: (work, total) per window, bytes/s.
fn guest_windows(log: &str, phase: &str) -> Vec<(f64, f64)> {
    let prefix = format!("IMMP-FID-W {phase} ");
    log.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|rest| {
            let field = |k: &str| {
                rest.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
                    .unwrap_or(f64::NAN)
            };
            (field("work"), field("total"))
        })
        .collect()
}

fn figures(log: &str, q: &Phases, class: &str) -> Result<Figures, String> {
    // immp alone is every workload's baseline; the idle guest (no sampler) is immp's own.
    let base_phase = if class == "immp-alone" {
        "idle"
    } else {
        "immp-alone"
    };
    let rate = |p: &str| {
        qemu_rate(q.get(p).map_or(&[][..], |v| v))
            .ok_or_else(|| format!("no QEMU window in phase {p}"))
    };
    let (qemu, base) = (rate(class)?, rate(base_phase)?);
    let g = guest_windows(log, class);
    if g.is_empty() {
        return Err("no immp window".into());
    }
    let (mut work, mut total): (Vec<f64>, Vec<f64>) = g.into_iter().unzip();
    Ok(Figures {
        qemu,
        base,
        net: qemu - base,
        total: median(&mut total),
        work: median(&mut work),
        windows: (q[class].len(), work.len()),
    })
}

fn ratio(x: f64, reference: f64) -> f64 {
    if reference > 0.0 {
        x / reference
    } else {
        f64::NAN
    }
}

/// A ratio for the table: "-" where there is nothing to divide by (immp alone's net rate).
fn shown(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}")
    } else {
        "-".into()
    }
}

/// Classes outside the goal for a reason immp's design has not removed yet (README, "Known
/// limits"): the row passes while immp's figure stays within the band measured on the three
/// kernels (x - reference, MB/s), so a regression still fails it; a fix that brings the class
/// into the goal passes as "ok".
struct Limit {
    class: &'static str,
    total: bool,
    band_mb: (f64, f64),
}

const KNOWN: &[Limit] = &[
    // The kernel mostly, not always, hands an unmapped arena's pages straight back: QEMU sees
    // up to a quarter more distinct physical pages than the addresses faulted in again.
    Limit {
        class: "churner",
        total: false,
        band_mb: (-1.6, 1.0),
    },
    Limit {
        class: "churner",
        total: true,
        band_mb: (-1.6, 1.0),
    },
    // Every short-lived child counts the pages it copies and touches; physically they are the
    // same few pages, recycled from the child before (measured +2.3..+2.7 MB/s; totals +2..+6.3;
    // bands about 1.6 x the worst seen, the rate of children varies with the machine's speed).
    Limit {
        class: "fork",
        total: false,
        band_mb: (-1.0, 6.0),
    },
    Limit {
        class: "fork",
        total: true,
        band_mb: (-1.0, 10.0),
    },
    // The same for exec'd children, which also fault in a whole new image (+3.6..+4.2 MB/s;
    // totals with the kernel's allocations for exec +7..+11; a clean-clone CI run measured +6.04
    // for the workload, past a first band of 6).
    Limit {
        class: "fork-exec",
        total: false,
        band_mb: (-1.0, 10.0),
    },
    Limit {
        class: "fork-exec",
        total: true,
        band_mb: (-1.0, 18.0),
    },
    // `unattributed` counts every page allocation (/proc/vmstat); socket buffers recycle the
    // same pages many times a window (measured 1.43-1.79 x QEMU).
    Limit {
        class: "socket",
        total: true,
        band_mb: (-1.0, 20.0),
    },
    // The receiver is charged for its buffer, not for the socket buffers the kernel fills for
    // it (no process's pages): 0.85-0.88 of QEMU's net rate, -2.3..-3.0 MB/s.
    Limit {
        class: "socket",
        total: false,
        band_mb: (-4.5, 1.0),
    },
];

/// "ok" within the goal, "known limit" within a known limit's band, else "FAIL".
fn verdict(class: &str, total: bool, x: f64, reference: f64) -> &'static str {
    let excess = (x - reference) / MB;
    let known = KNOWN.iter().any(|l| {
        l.class == class && l.total == total && excess >= l.band_mb.0 && excess <= l.band_mb.1
    });
    match (meets(x, reference), known) {
        (true, _) => "ok",
        (false, true) => "known limit",
        (false, false) => "FAIL",
    }
}

/// Turns the guest's `fidelity` row into the matrix: one row per class (`fid-CLASS`), the
/// guest's row passing only when every class does; returns the table to print.
pub fn judge(rows: &mut Vec<Row>, log: &str, q: &Phases) -> Option<String> {
    let at = rows.iter().position(|r| r.test == "fidelity")?;
    let classes: Vec<&str> = log
        .lines()
        .find_map(|l| l.strip_prefix("IMMP-FID-CLASSES "))
        .map(|c| c.trim().split(',').collect())
        .unwrap_or_default();
    let mut table = vec![header()];
    let mut class_rows = Vec::new();
    for c in &classes {
        let (row, line) = judge_class(log, q, c);
        class_rows.push(row);
        table.push(line);
    }
    let all = !classes.is_empty() && class_rows.iter().all(|r| r.pass);
    let guest = &mut rows[at];
    guest.pass = guest.pass && all;
    let failed = class_rows.iter().filter(|r| !r.pass).count();
    guest.detail = format!(
        "{} ({} classes, {failed} outside the goal)",
        guest.detail,
        classes.len()
    );
    rows.splice(at + 1..at + 1, class_rows);
    table.extend(classes.iter().filter_map(|c| bare_note(log, q, c)));
    Some(table.join("\n"))
}

/// What QEMU saw of a class with no immp loaded (phase `CLASS-bare`), next to what it saw
/// with immp measuring: the difference is immp's own cost to the hypervisor for that class.
fn bare_note(log: &str, q: &Phases, class: &str) -> Option<String> {
    let bare = qemu_rate(q.get(&format!("{class}-bare"))?)?;
    let (idle, with) = (qemu_rate(q.get("idle")?)?, figures(log, q, class).ok()?);
    Some(format!(
        "{class} without immp loaded: QEMU {:.2} MB/s, {:.2} over the idle guest; with immp \
         measuring {:+.2} MB/s more",
        bare / MB,
        (bare - idle) / MB,
        (with.qemu - bare) / MB
    ))
}

fn header() -> String {
    format!(
        "{:<11} {:>6} {:>5} {:>6} {:>6} {:>6} {:>6} {:>6} {:>5}  VERDICT (MB/s = 10^6 B/s; medians of 1 s windows)",
        "CLASS", "QEMU", "BASE", "NET", "TOTAL", "T/QEMU", "WORK", "W/NET", "WIN"
    )
}

fn judge_class(log: &str, q: &Phases, class: &str) -> (Row, String) {
    let test = format!("fid-{class}");
    let f = match figures(log, q, class) {
        Ok(f) => f,
        Err(e) => {
            let line = format!("{class:<11} {e}");
            let row = Row {
                test,
                pass: false,
                detail: e,
            };
            return (row, line);
        }
    };
    let (v_w, v_t) = (
        verdict(class, false, f.work, f.net),
        verdict(class, true, f.total, f.qemu),
    );
    let v = if v_w == v_t {
        v_w.to_string()
    } else {
        format!("workload {v_w}, total {v_t}")
    };
    let m = |x: f64| x / MB;
    let line = format!(
        "{class:<11} {:>6.2} {:>5.2} {:>6.2} {:>6.2} {:>6} {:>6.2} {:>6} {:>2}/{:<2}  {v}",
        m(f.qemu),
        m(f.base),
        m(f.net),
        m(f.total),
        shown(ratio(f.total, f.qemu)),
        m(f.work),
        shown(ratio(f.work, f.net)),
        f.windows.0,
        f.windows.1
    );
    let detail = format!(
        "QEMU {:.2} MB/s ({:.2} over its baseline), immp total {:.2} ({}x), workload {:.2} \
         ({}x): {v}",
        m(f.qemu),
        m(f.net),
        m(f.total),
        shown(ratio(f.total, f.qemu)),
        m(f.work),
        shown(ratio(f.work, f.net))
    );
    let row = Row {
        test,
        pass: v_w != "FAIL" && v_t != "FAIL",
        detail,
    };
    (row, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_goal_is_15_percent_or_1_mb_below_5_mb() {
        assert!(meets(17.0 * MB, 20.0 * MB));
        assert!(!meets(16.9 * MB, 20.0 * MB));
        assert!(meets(3.9 * MB, 4.9 * MB));
        assert!(!meets(3.8 * MB, 4.9 * MB));
    }

    #[test]
    fn qemu_windows_are_taken_at_the_middle_of_their_whole_mib_bin() {
        assert_eq!(qemu_rate(&[16.0, 18.0, 17.0, 15.0]), Some(17.0 * MIB));
        assert_eq!(qemu_rate(&[]), None);
    }

    fn log(class: &str, work: f64, total: f64) -> String {
        let w = format!("IMMP-FID-W {class} work={work} total={total} agent=0\n");
        format!(
            "IMMP-FID-CLASSES {class},immp-alone\nIMMP-RESULT fidelity PASS measured\n{}\
             IMMP-FID-W immp-alone work=0 total=0 agent=0\n",
            w.repeat(3)
        )
    }

    fn phases(class_mib: f64) -> Phases {
        [("idle", 0.0), ("immp-alone", 0.0), ("socket", class_mib)]
            .into_iter()
            .map(|(p, r)| (p.to_string(), vec![r; 5]))
            .collect()
    }

    fn judged(work: f64, total: f64, class_mib: f64) -> Vec<Row> {
        let log = log("socket", work, total);
        let mut rows = super::super::result_rows(&log);
        judge(&mut rows, &log, &phases(class_mib)).expect("a table");
        rows
    }

    #[test]
    fn a_class_row_per_class_and_the_guest_row_fails_with_any() {
        // QEMU 20 MiB/s (bin centre 20.5) over a 0.5 baseline: 20 MiB/s net.
        let net = 20.0 * MIB;
        let rows = judged(net, 20.5 * MIB, 20.0);
        let names: Vec<&str> = rows.iter().map(|r| r.test.as_str()).collect();
        assert_eq!(names, ["fidelity", "fid-socket", "fid-immp-alone"]);
        assert!(rows.iter().all(|r| r.pass), "{:?}", rows[1].detail);
        let rows = judged(0.5 * net, 20.5 * MIB, 20.0);
        assert!(!rows[1].pass && !rows[0].pass);
    }

    #[test]
    fn a_known_limit_passes_within_its_band_and_fails_beyond_it() {
        assert_eq!(verdict("fork", false, 3.6 * MB, 1.05 * MB), "known limit");
        assert_eq!(verdict("fork", false, 8.0 * MB, 1.05 * MB), "FAIL");
        assert_eq!(verdict("fork", false, 1.5 * MB, 1.05 * MB), "ok");
        // A band is for its class and measure only.
        assert_eq!(verdict("rewriter", false, 3.6 * MB, 1.05 * MB), "FAIL");
        assert_eq!(verdict("socket", false, 33.0 * MB, 19.0 * MB), "FAIL");
        assert_eq!(
            verdict("socket", false, 16.4 * MB, 19.4 * MB),
            "known limit"
        );
        assert_eq!(verdict("socket", true, 33.0 * MB, 19.0 * MB), "known limit");
    }
}
