//! The one event stream: every command emits `Event`s, every view renders them. JSON comes
//! from the serde tags (`{"event": "capped", ...}`), text from `Display` (names cleaned of
//! control characters). New views (TUI, Prometheus) read the same stream.
use std::fmt::{self, Display, Formatter};

use serde::Serialize;

use crate::{
    migration::{GuestStarted, GuestStopped, MigrationStatus, Watching},
    policy::Decision,
    predict::Prediction,
    rank::{Ranked, Ranking},
    snapshot::{Flavour, Health, Mode, Snapshot, Totals, Verify},
    text::{clean, column},
    units::{fmt_bytes, fmt_rate},
};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// `profile`: one interval, ranked.
    Sample(Box<Sample>),
    /// `throttle`: what it will use.
    Start(Start),
    Capped(Capped),
    Prediction(PredictionPair),
    Decision(Decision),
    /// A cap lifted by this run.
    Lifted(Undo),
    /// A cap a crashed run left, put back before this run starts.
    RestoredLeftover(Undo),
    /// `restore`: a cap put back from the journal.
    Restored(Undo),
    RestoreFailed(RestoreFailed),
    Gone(Gone),
    /// A process already held at or below the cap by its own cgroup: left as it is.
    Held(Held),
    /// Someone else moved a capped process out of immp's cgroup: the cap no longer applies.
    MovedAway(Undo),
    /// `throttle`: the caps in force and what the capped processes do.
    Interval(CapInterval),
    /// `restore` with nothing pending.
    Nothing(Nothing),
    Warning(Warning),
    /// `host watch`: both sockets answered, waiting for a migration.
    Watching(Watching),
    /// `host watch`: the migration's status changed.
    Migration(MigrationStatus),
    /// `host watch`: immp started inside the guest.
    GuestStarted(GuestStarted),
    /// `host watch`: immp stopped inside the guest, and what it undid.
    GuestStopped(GuestStopped),
}

/// One profiled interval: the snapshot's facts plus the ranking (top N).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    pub seq: u64,
    pub time_unix_ms: u64,
    pub interval_s: f64,
    pub mode: Mode,
    pub mode_note: &'static str,
    pub probes: Flavour,
    /// Why the BTF-checked raw tracepoints were not used (classic tracepoints in their place).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes_fallback: Option<String>,
    pub folio_pages_known: bool,
    pub shmem_known: bool,
    /// Round 0 (non-zero memory) and RAM at this sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::snapshot::Memory>,
    pub page_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_share: Option<f64>,
    pub totals: Totals,
    pub health: Health,
    pub exact_armed: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verify>,
    /// Predicted pre-copy migration (with --bandwidth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction: Option<Prediction>,
    pub processes: Vec<Ranked>,
}

/// How a cap is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mechanism {
    /// Moved into a cgroup of the v1 cpu hierarchy with a CFS quota.
    CgroupV1,
    /// cgroup v2 `cpu.max`, either on a cgroup immp created or set in place.
    CgroupV2,
    /// SIGSTOP/SIGCONT duty cycle (no cgroup cpu controller).
    Signal,
}

impl Display for Mechanism {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mechanism::CgroupV1 => "cgroup-v1",
            Mechanism::CgroupV2 => "cgroup-v2",
            Mechanism::Signal => "signal",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Start {
    pub mechanism: Mechanism,
    pub journal: String,
    pub auto: bool,
    pub cap_pct: Option<f64>,
    /// `--auto`: the goal, seconds of migration (with `knee`, the bound on it), and what an
    /// idle guest's would take.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_s: Option<f64>,
    /// No --target: each interval's goal is this many times the migration with every IMMP at
    /// the floor, within `target_s` (each decision carries the goal it used).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knee: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Capped {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    pub cap_pct: f64,
    pub mechanism: Mechanism,
    /// The cgroup the cap lives in (absolute path), or empty for signals.
    pub cgroup: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PredictionPair {
    pub without_caps: Prediction,
    pub with_caps: Prediction,
    /// The goal (seconds of migration) and whether the caps decided meet it.
    pub target_s: f64,
    pub goal_met: bool,
}

/// What undoing one cap did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Undone {
    /// Processes moved back to the original cgroup (the capped one and its children).
    MovedBack { moved: usize, to: String },
    /// A cap set in place was reset to its previous value.
    Reset { cgroup: String, cpu_max: String },
    /// SIGCONT sent.
    Continued,
    /// The process (and any children) no longer exist; only the empty cap cgroup was removed.
    Gone,
    /// Someone else moved the process out of immp's cgroup: its cap was no longer in force;
    /// it was left where it is now.
    MovedAway { now_in: String },
    /// The process is in its original cgroup already (the journaled move never happened).
    NothingToUndo,
}

impl Display for Undone {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Undone::MovedBack { moved, to } => {
                let s = if *moved == 1 { "" } else { "es" };
                write!(f, "moved back to {} ({moved} process{s})", clean(to))
            }
            Undone::Reset { cgroup, cpu_max } => {
                write!(f, "cpu.max of {} reset to \"{cpu_max}\"", clean(cgroup))
            }
            Undone::Continued => f.write_str("resumed (SIGCONT)"),
            Undone::Gone => f.write_str("no longer exists; its cap cgroup was removed"),
            Undone::MovedAway { now_in } => write!(
                f,
                "moved out of immp's cgroup by someone else (now in {}): left there",
                clean(now_in)
            ),
            Undone::NothingToUndo => f.write_str("already in its original cgroup: nothing to undo"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Undo {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    pub undone: Undone,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestoreFailed {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gone {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    /// Set when it exited while capped (its cap was released).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undone: Option<Undone>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Held {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    pub cap_pct: f64,
    /// The limit its cgroup (or an ancestor) already sets, percent of one CPU.
    pub limit_pct: f64,
    pub cgroup: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapLine {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    pub cap_pct: f64,
    pub cpu_pct: Option<f64>,
    pub dirty_bytes_per_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CapInterval {
    pub time_unix_ms: u64,
    pub processes: Vec<CapLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Nothing {
    pub journal: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Warning {
    pub message: String,
}

fn who(pid: u32, comm: &str) -> String {
    format!("PID {pid} ({})", clean(comm))
}

impl Display for Event {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Event::Sample(s) => s.fmt(f),
            Event::Start(s) => {
                write!(
                    f,
                    "immp throttle: mechanism {}, journal {}",
                    s.mechanism,
                    clean(&s.journal)
                )?;
                match (s.target_s, s.idle_s, s.knee) {
                    (Some(t), Some(idle), Some(k)) => write!(
                        f,
                        "; goal: {k} x the migration with the IMMPs at the floor, at most \
                         {t:.1}s (idle guest: {idle:.1}s)"
                    )?,
                    (Some(t), Some(idle), None) => {
                        write!(f, "; goal: migration in {t:.1}s (idle guest: {idle:.1}s)")?
                    }
                    _ => {}
                }
                write!(f, "; Ctrl-C lifts every cap")
            }
            Event::Capped(c) => {
                write!(
                    f,
                    "{}: capped at {:.1}% of one CPU ({})",
                    who(c.pid, &c.comm),
                    c.cap_pct,
                    c.mechanism
                )
            }
            Event::Prediction(p) => write!(
                f,
                "prediction: without caps {}; with caps {} (goal {:.1}s: {})",
                brief(&p.without_caps),
                brief(&p.with_caps),
                p.target_s,
                if p.goal_met { "met" } else { "NOT met" }
            ),
            Event::Decision(d) => {
                write!(
                    f,
                    "decision: {}: {}: {}",
                    who(d.pid, &d.comm),
                    d.action,
                    clean(&d.reason)
                )
            }
            Event::Lifted(u) => write!(f, "{}: cap lifted, {}", who(u.pid, &u.comm), u.undone),
            Event::RestoredLeftover(u) => {
                write!(
                    f,
                    "{}: left capped by an earlier run, {}",
                    who(u.pid, &u.comm),
                    u.undone
                )
            }
            Event::Restored(u) => write!(f, "{}: {}", who(u.pid, &u.comm), u.undone),
            Event::RestoreFailed(r) => {
                write!(
                    f,
                    "{}: NOT restored: {}",
                    who(r.pid, &r.comm),
                    clean(&r.error)
                )
            }
            Event::Gone(g) => match g.undone {
                Some(_) => write!(f, "{}: exited while capped", who(g.pid, &g.comm)),
                None => write!(f, "{}: exited before it was capped", who(g.pid, &g.comm)),
            },
            Event::Held(h) => write!(
                f,
                "{}: already held at {:.1}% of one CPU by its cgroup {}; a {:.1}% cap would change nothing: left as is",
                who(h.pid, &h.comm),
                h.limit_pct,
                clean(&h.cgroup),
                h.cap_pct
            ),
            Event::MovedAway(u) => write!(
                f,
                "{}: {}; its cap no longer applies",
                who(u.pid, &u.comm),
                u.undone
            ),
            Event::Interval(i) => i.fmt(f),
            Event::Nothing(n) => write!(f, "nothing to restore ({})", clean(&n.journal)),
            Event::Warning(w) => write!(f, "warning: {}", clean(&w.message)),
            Event::Watching(w) => w.fmt(f),
            Event::Migration(m) => m.fmt(f),
            Event::GuestStarted(g) => g.fmt(f),
            Event::GuestStopped(g) => g.fmt(f),
        }
    }
}

fn brief(p: &Prediction) -> String {
    match p.total_s {
        Some(t) => format!("{t:.1}s in {} rounds", p.rounds),
        None => format!("no convergence in {} rounds", p.rounds),
    }
}

impl Display for CapInterval {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if self.processes.is_empty() {
            return f.write_str("no process capped");
        }
        for (i, l) in self.processes.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "PID {:>7} {:<16} cap {:>5.1}%  cpu {:>6}  dirty {}",
                l.pid,
                column(&l.comm, 16),
                l.cap_pct,
                l.cpu_pct.map_or("-".into(), |c| format!("{c:.1}%")),
                l.dirty_bytes_per_s.map_or("-".into(), fmt_rate)
            )?;
        }
        Ok(())
    }
}

impl Sample {
    /// The sample of `snap`, its ranking cut to the `top` processes.
    pub fn new(
        snap: &Snapshot,
        mut ranking: Ranking,
        bandwidth: Option<f64>,
        prediction: Option<Prediction>,
        top: usize,
    ) -> Self {
        ranking.processes.truncate(top);
        Self {
            seq: snap.seq,
            time_unix_ms: snap.time_unix_ms,
            interval_s: snap.interval_s,
            mode: snap.mode,
            mode_note: snap.mode.explain(),
            probes: snap.probes,
            probes_fallback: snap.probes_fallback.clone(),
            folio_pages_known: snap.folio_pages_known,
            shmem_known: snap.shmem_known,
            memory: snap.memory,
            page_size: snap.page_size,
            bandwidth_bytes_per_s: bandwidth,
            link_share: ranking.link_share,
            totals: snap.totals,
            health: snap.health,
            exact_armed: snap.exact_armed,
            verify: snap.verify,
            prediction,
            processes: ranking.processes,
        }
    }

    fn header(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let quality = match self.mode {
            Mode::Bounds => "lower bound",
            Mode::Exact => "exact",
        };
        writeln!(
            f,
            "#{} {:.2}s  mode: {} ({quality})  probes: {}",
            self.seq, self.interval_s, self.mode, self.probes
        )?;
        let link = match (self.bandwidth_bytes_per_s, self.link_share) {
            (Some(bw), Some(share)) => {
                let faster = share >= 1.0 && self.prediction.is_none();
                let note = if faster { ": faster than the link" } else { "" };
                format!(" = {:.0}% of a {} link{note}", share * 100.0, fmt_rate(bw))
            }
            _ => String::new(),
        };
        if let Some(why) = &self.probes_fallback {
            writeln!(
                f,
                "probes: classic tracepoints because raw tracepoints failed: {}",
                clean(why)
            )?;
        }
        writeln!(
            f,
            "total dirty {}{link}; not attributed to a process: {} (kernel allocations); \
             immp itself: {}",
            fmt_rate(self.totals.dirty_bytes_per_s),
            fmt_rate(self.totals.unattributed_bytes_per_s),
            fmt_rate(self.totals.agent_dirty_bytes_per_s)
        )?;
        if let Some(p) = self.prediction {
            match p.total_s {
                Some(t) => writeln!(
                    f,
                    "prediction: migration converges in {t:.1}s ({} rounds, downtime {:.0}ms, {} sent)",
                    p.rounds,
                    p.downtime_s.unwrap_or(0.0) * 1e3,
                    fmt_bytes(p.bytes_sent)
                )?,
                None => writeln!(
                    f,
                    "prediction: migration does NOT converge ({} rounds tried)",
                    p.rounds
                )?,
            }
        }
        if let Some(v) = self.verify {
            writeln!(
                f,
                "verify PID {}: counted {} pages, pagemap soft-dirty {} pages",
                v.pid, v.counted_pages, v.soft_dirty_pages
            )?;
        }
        let h = &self.health;
        if h.map_full > 0 || h.exit_lost > 0 {
            writeln!(
                f,
                "warning: {} page events not counted: the kernel's per-process table is full (--max-procs {}); {} exits lost",
                h.map_full, h.capacity, h.exit_lost
            )?;
        }
        Ok(())
    }

    fn row(&self, f: &mut Formatter<'_>, r: &Ranked) -> fmt::Result {
        let p = &r.proc_;
        let name = if p.gone {
            format!("{} (gone)", p.comm)
        } else {
            p.comm.clone()
        };
        writeln!(
            f,
            "{:>7} {:<16} {:>11} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>6.1} {:>9} {:>6} {:<7} {:>7} {}",
            p.pid,
            column(&name, 16),
            fmt_rate(p.dirty_bytes_per_s),
            p.rates.write_new,
            p.rates.write_protect,
            p.rates.pagecache,
            p.rates.read,
            p.cpu_pct,
            fmt_bytes(p.rss_bytes as f64),
            r.link_share
                .map_or_else(|| "-".into(), |s| format!("{:.0}", s * 100.0)),
            r.verdict.map_or_else(|| "-".into(), |v| v.to_string()),
            r.impact
                .and_then(|i| i.cap_to_converge)
                .map_or_else(|| "-".into(), |c| format!("{c:.0}%")),
            clean(&p.cgroup)
        )?;
        if !p.curve.is_empty() {
            let pts: Vec<String> = p
                .curve
                .iter()
                .map(|c| {
                    format!(
                        "{:.2}s {}",
                        c.window_s,
                        fmt_bytes(c.pages * self.page_size as f64)
                    )
                })
                .collect();
            writeln!(
                f,
                "{:>7} curve (dirtied per window): {}",
                "",
                pts.join(", ")
            )?;
        }
        Ok(())
    }
}

impl Display for Sample {
    /// The `profile` table: a header, one row per process, a blank line.
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        self.header(f)?;
        writeln!(
            f,
            "{:>7} {:<16} {:>11} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>6} {:<7} {:>7} CGROUP",
            "PID",
            "COMM",
            "DIRTY",
            "NEW/s",
            "WP/s",
            "PCACHE/s",
            "READ/s",
            "CPU%",
            "RSS",
            "LINK%",
            "VERDICT",
            "CAP-OK"
        )?;
        for r in &self.processes {
            self.row(f, r)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        fixtures::{proc_, snap},
        rank::{RankSettings, rank},
    };

    fn sample(procs: Vec<crate::snapshot::ProcSample>) -> Sample {
        let s = snap(procs);
        let r = rank(
            &s,
            &RankSettings {
                bandwidth: Some(12.5e6),
                immp_share: 0.25,
            },
        );
        Sample::new(&s, r, Some(12.5e6), None, 20)
    }

    #[test]
    fn json_has_the_event_tag_and_the_fields_scripts_read() {
        let e = Event::Sample(Box::new(sample(vec![proc_(8, 900.0, 80.0)])));
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "sample");
        assert_eq!(v["mode"], "bounds");
        assert_eq!(v["probes"], "btf");
        assert_eq!(v["processes"][0]["pid"], 8);
        assert_eq!(v["processes"][0]["verdict"], "immp");
        let u = Event::Lifted(Undo {
            pid: 1,
            start_time: 2,
            comm: "w".into(),
            undone: Undone::MovedBack {
                moved: 1,
                to: "/a".into(),
            },
        });
        let v = serde_json::to_value(&u).unwrap();
        assert_eq!(v["event"], "lifted");
        assert_eq!(v["undone"]["result"], "moved-back");
    }

    #[test]
    fn table_uses_json_names_and_keeps_columns_with_hostile_names() {
        let mut evil = proc_(9, 10.0, 1.0);
        evil.comm = "\x1b[31mRED-and-a-very-long-name".into();
        let text = sample(vec![proc_(8, 900.0, 80.0), evil]).to_string();
        assert!(
            text.contains("mode: bounds (lower bound)  probes: btf"),
            "{text}"
        );
        assert!(!text.contains('\x1b'), "{text}");
        let rows: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.contains("COMM"))
            .skip(1)
            .collect();
        assert_eq!(rows.len(), 2);
        // Fixed columns: PID (7) + COMM (16) + DIRTY (11, right-aligned) on every row.
        for r in &rows {
            let dirty: String = r.chars().skip(25).take(11).collect();
            assert!(dirty.ends_with("B/s"), "{r:?}");
        }
        assert!(
            rows.iter()
                .all(|r| r.find("immp").is_some() || r.contains("writer"))
        );
    }

    #[test]
    fn every_text_line_is_free_of_control_characters() {
        let comm = "\x1b]0;pwned\x07".to_string();
        let events = [
            Event::Capped(Capped {
                pid: 1,
                start_time: 1,
                comm: comm.clone(),
                cap_pct: 20.0,
                mechanism: Mechanism::CgroupV1,
                cgroup: "/x".into(),
            }),
            Event::Gone(Gone {
                pid: 1,
                start_time: 1,
                comm: comm.clone(),
                undone: None,
            }),
            Event::RestoreFailed(RestoreFailed {
                pid: 1,
                start_time: 1,
                comm: comm.clone(),
                error: "e\x1b".into(),
            }),
            Event::Interval(CapInterval {
                time_unix_ms: 0,
                processes: vec![CapLine {
                    pid: 1,
                    start_time: 1,
                    comm,
                    cap_pct: 20.0,
                    cpu_pct: None,
                    dirty_bytes_per_s: None,
                }],
            }),
        ];
        for e in events {
            let t = e.to_string();
            assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
        }
    }
}
