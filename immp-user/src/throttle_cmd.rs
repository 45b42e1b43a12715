//! `immp throttle` and `immp restore`: the loop around the actuator, and what they print.
use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::json;

use crate::{
    cli::{RestoreArgs, ThrottleArgs, tick_loop},
    journal::{Journal, Placement},
    output::Format,
    policy::{Action, AutoSettings, PolicyState, decide},
    predict::Link,
    probes::Probes,
    procinfo,
    sampler::Sampler,
    snapshot::ProcId,
    throttle::{Throttler, Undone, restore_all, validate_target},
    units::fmt_rate,
};

/// Prints events as JSON lines or as human lines.
struct Emitter {
    json: bool,
}

impl Emitter {
    fn emit(&self, event: &str, v: serde_json::Value, human: impl FnOnce() -> String) {
        let mut o = std::io::stdout().lock();
        let _ = if self.json {
            let mut obj = json!({ "event": event });
            if let (Some(m), serde_json::Value::Object(extra)) = (obj.as_object_mut(), v) {
                m.extend(extra);
            }
            writeln!(o, "{obj}")
        } else {
            writeln!(o, "{}", human())
        };
        let _ = o.flush();
    }

    fn undone(&self, event: &str, p: &Placement, r: &anyhow::Result<Undone>) {
        match r {
            Ok(u) => self.emit(event, json!({"pid": p.pid, "start_time": p.start_time, "comm": p.comm, "undone": u}), || {
                format!("PID {} ({}): {}", p.pid, p.comm, describe(u))
            }),
            Err(e) => self.emit(
                "restore-failed",
                json!({"pid": p.pid, "start_time": p.start_time, "comm": p.comm, "error": format!("{e:#}")}),
                || format!("PID {} ({}): NOT restored: {e:#}", p.pid, p.comm),
            ),
        }
    }
}

fn emitter(f: Option<Format>) -> anyhow::Result<Emitter> {
    match Format::resolve(f) {
        Format::Csv => Err(crate::usage(
            "this command prints events: --format table or json",
        )),
        f => Ok(Emitter {
            json: f == Format::Json,
        }),
    }
}

fn describe(u: &Undone) -> String {
    match u {
        Undone::MovedBack { moved, to } => format!(
            "moved back to {to} ({moved} process{})",
            if *moved == 1 { "" } else { "es" }
        ),
        Undone::Reset { cgroup, cpu_max } => format!("cpu.max of {cgroup} reset to \"{cpu_max}\""),
        Undone::Continued => "resumed (SIGCONT)".into(),
        Undone::Gone => "no longer exists; its cap cgroup was removed".into(),
    }
}

/// CPU share per process between two calls, from /proc (works without probes).
#[derive(Default)]
struct CpuMeter {
    last: HashMap<ProcId, (u64, std::time::Instant)>,
}

impl CpuMeter {
    fn pct(&mut self, id: ProcId) -> Option<f64> {
        let st = procinfo::stat(id.pid).filter(|s| s.id == id)?;
        let now = std::time::Instant::now();
        let prev = self.last.insert(id, (st.cpu_ticks, now));
        prev.map(|(t, at)| {
            st.cpu_ticks.saturating_sub(t) as f64
                / procinfo::ticks_per_second() as f64
                / now.duration_since(at).as_secs_f64().max(1e-3)
                * 100.0
        })
    }
}

#[derive(Serialize)]
struct Line {
    pid: u32,
    start_time: u64,
    comm: String,
    cap_pct: f64,
    cpu_pct: Option<f64>,
    dirty_bytes_per_s: Option<f64>,
}

pub fn throttle(a: ThrottleArgs) -> anyhow::Result<i32> {
    crate::require_root()?;
    // Everything is validated before anything changes.
    let mut pids = a.pids.clone();
    pids.sort_unstable();
    pids.dedup();
    let targets: Vec<(ProcId, String)> = pids
        .iter()
        .map(|&p| validate_target(p))
        .collect::<anyhow::Result<_>>()?;
    let out = emitter(a.format)?;
    let probes = match Probes::load(&a.probe.options()) {
        Ok(p) => Some(p),
        Err(e) if a.auto => {
            return Err(crate::environment(format!(
                "--auto needs the kernel probes: {e:#}"
            )));
        }
        Err(e) => {
            eprintln!("immp: warning: no dirty rates (probes: {e:#}); capping anyway");
            None
        }
    };
    let (mut thr, leftovers) = Throttler::open(&a.journal_dir, a.mechanism)?;
    for (p, r) in &leftovers {
        out.undone("restored-leftover", p, r);
    }
    let journal = a.journal_dir.join("journal");
    out.emit(
        "start",
        json!({"mechanism": thr.mechanism(), "journal": journal, "auto": a.auto, "cap_pct": a.cap}),
        || {
            format!(
                "immp throttle: mechanism {:?}, journal {}; Ctrl-C lifts every cap",
                thr.mechanism(),
                journal.display()
            )
        },
    );
    let mut names: BTreeMap<ProcId, String> = BTreeMap::new();
    if let Some(cap) = a.cap {
        for (id, comm) in &targets {
            names.insert(*id, comm.clone());
            if thr.cap(*id, comm, cap)? {
                let c = thr.active().into_iter().find(|c| c.pid == id.pid);
                out.emit("capped", json!(c), || {
                    format!("PID {} ({comm}): capped at {cap:.0}% of one CPU", id.pid)
                });
            } else {
                out.emit("gone", json!({"pid": id.pid, "comm": comm}), || {
                    format!("PID {} ({comm}): exited before it was capped", id.pid)
                });
            }
        }
    }
    let settings = a.bandwidth.map(|bw| AutoSettings {
        link: Link {
            bandwidth: bw,
            ram: a.ram.unwrap_or_else(procinfo::mem_total),
            downtime_limit: a.downtime,
            max_rounds: 30,
        },
        floor_pct: a.floor,
        target: a.target,
        immp_share: a.immp_share,
        hysteresis_pct: 5.0,
        lift_after: 3,
        headroom: a.headroom,
    });
    let watch: Vec<ProcId> = targets.iter().map(|(id, _)| *id).collect();
    let mut sampler = probes.map(|p| Sampler::new(p, watch.clone()));
    let mut cpu = CpuMeter::default();
    let mut policy = PolicyState::default();
    for id in &watch {
        cpu.pct(*id);
    }

    // Test hook: proves that a panic mid-run still lifts every cap (the Throttler's Drop runs
    // while the panic unwinds). Only the test suite sets it.
    let panic_after: Option<u64> = std::env::var("IMMP_TEST_PANIC_AFTER")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut ticks = 0u64;
    let res = tick_loop(a.interval, a.duration, || {
        ticks += 1;
        if panic_after.is_some_and(|n| ticks > n) {
            panic!("IMMP_TEST_PANIC_AFTER: injected panic");
        }
        let snap = sampler.as_mut().map(Sampler::sample);
        if let (true, Some(snap), Some(s)) = (a.auto, &snap, &settings) {
            let caps: BTreeMap<ProcId, f64> = thr
                .active()
                .iter()
                .map(|c| {
                    (
                        ProcId {
                            pid: c.pid,
                            start_time: c.start_time,
                        },
                        c.cap_pct,
                    )
                })
                .collect();
            let o = decide(snap, s, &caps, &mut policy);
            out.emit(
                "prediction",
                json!({"without_caps": o.without_caps, "with_caps": o.with_caps}),
                || {
                    let f = |p: &crate::predict::Prediction| match p.total_s {
                        Some(t) => format!("{t:.1}s in {} rounds", p.rounds),
                        None => format!("no convergence in {} rounds", p.rounds),
                    };
                    format!(
                        "prediction: without caps {}; with caps {}",
                        f(&o.without_caps),
                        f(&o.with_caps)
                    )
                },
            );
            for d in o.decisions {
                let id = ProcId {
                    pid: d.pid,
                    start_time: d.start_time,
                };
                names.insert(id, d.comm.clone());
                let changed = match d.action {
                    Action::Cap { cap_pct } => {
                        if !thr.cap(id, &d.comm, cap_pct)? {
                            continue; // exited meanwhile
                        }
                        true
                    }
                    Action::Lift => {
                        if let Some(u) = thr.lift(&id)? {
                            out.emit("lifted", json!({"pid": d.pid, "undone": u}), || {
                                format!("PID {} ({}): cap lifted, {}", d.pid, d.comm, describe(&u))
                            });
                        }
                        true
                    }
                    Action::Keep { .. } => false,
                };
                if changed || out.json {
                    out.emit("decision", json!(d), || {
                        let what = match d.action {
                            Action::Cap { cap_pct } => format!("cap {cap_pct:.0}%"),
                            Action::Lift => "lift".into(),
                            Action::Keep { cap_pct } => format!("keep {cap_pct:.0}%"),
                        };
                        format!("decision: PID {} ({}): {what}: {}", d.pid, d.comm, d.reason)
                    });
                }
            }
        }
        // Live lines; a capped process that exited is released (not an error).
        let mut lines = Vec::new();
        for c in thr.active() {
            let id = ProcId {
                pid: c.pid,
                start_time: c.start_time,
            };
            if procinfo::stat(c.pid).is_none_or(|s| s.id != id) {
                if let Some(u) = thr.lift(&id)? {
                    out.emit(
                        "gone",
                        json!({"pid": c.pid, "comm": c.comm, "undone": u}),
                        || format!("PID {} ({}): exited while capped", c.pid, c.comm),
                    );
                }
                continue;
            }
            let seen = snap
                .as_ref()
                .and_then(|s| s.processes.iter().find(|p| p.id() == id));
            let dirty = seen
                .map(|p| p.dirty_bytes_per_s)
                .or(snap.as_ref().map(|_| 0.0));
            lines.push(Line {
                pid: c.pid,
                start_time: c.start_time,
                comm: c.comm,
                cap_pct: c.cap_pct,
                cpu_pct: cpu.pct(id).or(seen.map(|p| p.cpu_pct)),
                dirty_bytes_per_s: dirty,
            });
        }
        let ts = snap.as_ref().map_or(0, |s| s.time_unix_ms);
        out.emit(
            "interval",
            json!({"time_unix_ms": ts, "processes": lines}),
            || {
                if lines.is_empty() {
                    return "no process capped".into();
                }
                lines
                    .iter()
                    .map(|l| {
                        format!(
                            "PID {:>7} {:<16} cap {:>4.0}%  cpu {:>6}  dirty {}",
                            l.pid,
                            l.comm,
                            l.cap_pct,
                            l.cpu_pct.map_or("-".into(), |c| format!("{c:.1}%")),
                            l.dirty_bytes_per_s.map_or("-".into(), fmt_rate)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            },
        );
        // Manual mode ends when every target is gone.
        Ok(a.auto || !thr.active().is_empty())
    });

    let mut failed = false;
    for (p, r) in thr.lift_all() {
        failed |= r.is_err();
        out.undone("lifted", &p, &r);
    }
    drop(thr);
    res?;
    if failed {
        return Err(anyhow::anyhow!(
            "some caps could not be lifted: run `immp restore`"
        ));
    }
    Ok(crate::exit::OK)
}

pub fn restore(a: RestoreArgs) -> anyhow::Result<i32> {
    crate::require_root()?;
    let out = emitter(a.format)?;
    let mut j = Journal::open(&a.journal_dir).context("opening the journal")?;
    let done = restore_all(&mut j)?;
    if done.is_empty() {
        out.emit("nothing", json!({"journal": j.path()}), || {
            format!("nothing to restore ({})", j.path().display())
        });
    }
    let mut failed = false;
    for (p, r) in &done {
        failed |= r.is_err();
        out.undone("restored", p, r);
    }
    Ok(if failed {
        crate::exit::FAILURE
    } else {
        crate::exit::OK
    })
}
