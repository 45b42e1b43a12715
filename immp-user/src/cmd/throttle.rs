//! `immp throttle`: cap processes' CPU live (manual or automatic), lift every cap at the end.
use std::{collections::BTreeSet, time::Duration};

use clap::Args;
use immp_model::{
    Event, ProcId, Snapshot,
    event::{CapInterval, CapLine, Gone, Held, Start, Undo, Undone, Warning},
    policy::{AutoSettings, idle_time},
};

use super::{
    args::{self, EventFormat, JournalArgs, LinkArgs, MechanismArg, ProbeArgs},
    autocap::{AutoCap, Host, newcomer_due},
    restore::undo_event,
    run::{Next, Ticks, run_loop, stop_requested},
};
use crate::{
    act::{
        target::validate_target,
        throttle::{CapOutcome, Throttler},
    },
    collect::{cpu::CpuMeter, procfs, sampler::Sampler},
    view::{self, Format, View},
};

pub const HELP: &str = "Examples:\n  \
  immp throttle --pid 4242 --cap 20% --duration 5m\n  \
  immp throttle --pid 4242 --pid 4243 --cap 15% --format json\n  \
  immp throttle --auto --bandwidth 100Mbit --floor 15% --duration 10m\n  \
  immp throttle --auto --bandwidth 1Gbit --target 60s\n\n\
A cap is a percentage of one CPU (above 0, at most 100 x CPUs). Caps are lifted on normal exit, \
on every catchable stop signal (Ctrl-C, Ctrl-\\, SIGTERM, SIGHUP, ...) and on panic; after a \
SIGKILL or a crash run `immp restore`. Every change is written to the journal (--journal-dir) \
before it is made. Refused, with nothing changed: PID 1, kernel threads, immp itself, unknown \
PIDs. A process that exits while capped is not an error.";

#[derive(Args, Debug, Clone)]
pub struct ThrottleArgs {
    /// Process to cap (repeatable; needed with --cap)
    #[arg(long = "pid", value_name = "PID", required_unless_present = "auto")]
    pub pids: Vec<u32>,
    /// Manual cap, percent of one CPU (e.g. 20%; needed unless --auto)
    #[arg(long, value_parser = args::cap, required_unless_present = "auto", conflicts_with = "auto")]
    pub cap: Option<f64>,
    /// Pick the IMMPs and their caps from the profiler and the migration predictor
    #[arg(long, requires = "bandwidth")]
    pub auto: bool,
    #[command(flatten)]
    pub link: LinkArgs,
    #[command(flatten)]
    pub policy: args::PolicyArgs,
    /// Lift all caps after this long (e.g. 10m): a deadline; default: until Ctrl-C
    #[arg(long, value_parser = args::positive_duration)]
    pub duration: Option<Duration>,
    /// Interval of the live lines and of automatic re-evaluation
    #[arg(long, default_value = "1s", value_parser = args::positive_duration)]
    pub interval: Duration,
    /// Output format (default: table on a terminal, json otherwise)
    #[arg(long, value_enum)]
    pub format: Option<EventFormat>,
    #[command(flatten)]
    pub journal: JournalArgs,
    /// How to cap
    #[arg(long, value_enum, default_value_t = MechanismArg::Auto)]
    pub mechanism: MechanismArg,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

/// One throttle run: the actuator, what it measures, what it prints.
struct Run<'a> {
    a: &'a ThrottleArgs,
    thr: Throttler,
    out: Box<dyn View + 'a>,
    sampler: Option<Sampler>,
    settings: Option<AutoSettings>,
    auto: AutoCap,
    cpu: CpuMeter,
    /// Processes already reported as held by their own cgroup's limit (manual caps).
    held: BTreeSet<ProcId>,
}

/// What `throttle --auto` lends the policy loop: its output and its sampler.
struct ThrottleHost<'a, 'v> {
    out: &'a mut Box<dyn View + 'v>,
    sampler: &'a mut Option<Sampler>,
    json: bool,
}

impl Host for ThrottleHost<'_, '_> {
    fn emit(&mut self, e: Event) {
        // Output is for the operator; a closed stdout must not stop caps from being lifted.
        let _ = self.out.render(&e);
    }

    fn watch(&mut self, id: ProcId) {
        if let Some(s) = self.sampler.as_mut() {
            s.watch(id);
        }
    }

    fn unwatch(&mut self, id: ProcId) {
        if let Some(s) = self.sampler.as_mut() {
            s.unwatch(id);
        }
    }

    /// JSON keeps every decision, text only the changes.
    fn every_decision(&self) -> bool {
        self.json
    }
}

pub fn run(a: ThrottleArgs) -> anyhow::Result<i32> {
    crate::require_root()?;
    // Everything is validated before anything changes.
    let mut pids = a.pids.clone();
    pids.sort_unstable();
    pids.dedup();
    let targets: Vec<(ProcId, String)> = pids
        .iter()
        .map(|&p| validate_target(p))
        .collect::<anyhow::Result<_>>()?;
    let mut out = view::for_format(Format::resolve(a.format.map(Into::into)), std::io::stdout());
    let sampler = open_sampler(&a, &targets, &mut out)?;
    let (thr, leftovers) = Throttler::open(&a.journal.journal_dir, a.mechanism.into())?;
    for (p, r) in leftovers {
        let _ = out.render(&undo_event(&p, r, Event::RestoredLeftover));
    }
    let mut run = Run {
        settings: a.policy.settings(&a.link, None),
        a: &a,
        thr,
        out,
        sampler,
        auto: AutoCap::default(),
        cpu: CpuMeter::default(),
        held: BTreeSet::new(),
    };
    run.start(&targets)?;
    let res = if stop_requested().is_some() {
        Ok(()) // a stop signal during start-up: straight to lifting
    } else {
        run_loop(a.interval, a.duration, &mut run)
    };
    let failed = run.finish();
    res?;
    if failed {
        anyhow::bail!("some caps could not be lifted: run `immp restore`");
    }
    Ok(crate::exit::OK)
}

/// The probes (needed by --auto; without them manual caps still work, with no dirty rates).
fn open_sampler(
    a: &ThrottleArgs,
    targets: &[(ProcId, String)],
    out: &mut Box<dyn View + '_>,
) -> anyhow::Result<Option<Sampler>> {
    let watch: Vec<ProcId> = targets.iter().map(|(id, _)| *id).collect();
    match a.probe.open() {
        Ok(p) => Ok(Some(Sampler::new(p, watch))),
        Err(e) if a.auto => Err(crate::environment(format!(
            "--auto needs the kernel probes: {e:#}"
        ))),
        Err(e) => {
            let message = format!("no dirty rates ({e:#}); capping anyway");
            let _ = out.render(&Event::Warning(Warning { message }));
            Ok(None)
        }
    }
}

impl Ticks for Run<'_> {
    fn tick(&mut self, early: bool) -> anyhow::Result<Next> {
        self.interval(early)
    }

    fn sooner(&mut self) -> bool {
        match (self.a.auto, &self.settings, &mut self.sampler) {
            (true, Some(s), Some(sampler)) => newcomer_due(sampler, s),
            _ => false,
        }
    }
}

impl Run<'_> {
    fn emit(&mut self, e: Event) {
        // Output is for the operator; a closed stdout must not stop caps from being lifted.
        let _ = self.out.render(&e);
    }

    fn start(&mut self, targets: &[(ProcId, String)]) -> anyhow::Result<()> {
        let journal = self
            .a
            .journal
            .journal_dir
            .join("journal")
            .display()
            .to_string();
        let start = Start {
            mechanism: self.thr.mechanism(),
            journal,
            auto: self.a.auto,
            cap_pct: self.a.cap,
            target_s: self
                .settings
                .filter(|_| self.a.auto)
                .map(|s| s.target.as_secs_f64()),
            idle_s: self
                .settings
                .filter(|_| self.a.auto)
                .map(|s| idle_time(&s.link)),
            knee: self.settings.filter(|_| self.a.auto).and_then(|s| s.knee),
        };
        self.emit(Event::Start(start));
        let Some(cap) = self.a.cap else { return Ok(()) };
        for (id, comm) in targets {
            if stop_requested().is_some() {
                break;
            }
            let outcome = self.thr.cap(*id, comm, cap)?;
            self.report(*id, comm, cap, outcome);
            self.cpu.pct(*id);
        }
        Ok(())
    }

    /// Says what asking for a cap did (a held process once, not every interval).
    fn report(&mut self, id: ProcId, comm: &str, cap_pct: f64, outcome: CapOutcome) {
        let (pid, start_time, comm) = (id.pid, id.start_time, comm.to_string());
        match outcome {
            CapOutcome::Capped => {
                let c = self.thr.active().into_iter().find(|c| c.pid == pid);
                if let Some(c) = c {
                    self.emit(Event::Capped(c));
                }
            }
            CapOutcome::Held { limit_pct, cgroup } => {
                if self.held.insert(id) {
                    let h = Held {
                        pid,
                        start_time,
                        comm,
                        cap_pct,
                        limit_pct,
                        cgroup,
                    };
                    self.emit(Event::Held(h));
                }
            }
            CapOutcome::Gone => self.emit(Event::Gone(Gone {
                pid,
                start_time,
                comm,
                undone: None,
            })),
        }
    }

    fn interval(&mut self, early: bool) -> anyhow::Result<Next> {
        super::run::test_panic_hook();
        let snap = self.sampler.as_mut().map(|s| Snapshot {
            early,
            ..s.sample()
        });
        if let (true, Some(snap)) = (self.a.auto, &snap) {
            self.auto_step(snap)?;
        }
        let lines = self.live_lines(snap.as_ref())?;
        let time_unix_ms = snap.as_ref().map_or(0, |s| s.time_unix_ms);
        self.emit(Event::Interval(CapInterval {
            time_unix_ms,
            processes: lines,
        }));
        // Manual mode ends when every target is gone.
        Ok(if self.a.auto || !self.thr.active().is_empty() {
            Next::After(self.a.interval)
        } else {
            Next::Stop
        })
    }

    fn auto_step(&mut self, snap: &Snapshot) -> anyhow::Result<()> {
        // Built again each interval: round 0 (and the default goal) follow the guest's memory.
        let Some(s) = self
            .settings
            .and_then(|_| self.a.policy.settings(&self.a.link, snap.memory.as_ref()))
        else {
            return Ok(());
        };
        let mut host = ThrottleHost {
            out: &mut self.out,
            sampler: &mut self.sampler,
            json: Format::resolve(self.a.format.map(Into::into)) == Format::Json,
        };
        self.auto.step(&mut self.thr, snap, &s, &mut host)?;
        Ok(())
    }

    /// One line per cap in force; a capped process that exited is released (not an error).
    fn live_lines(&mut self, snap: Option<&Snapshot>) -> anyhow::Result<Vec<CapLine>> {
        let mut lines = Vec::new();
        for c in self.thr.active() {
            let id = ProcId::new(c.pid, c.start_time);
            // Gone only when (pid, start time) surely no longer exists: a /proc read error
            // keeps the cap (and its line).
            let alive = procfs::exists(id) != Some(false);
            if alive && !self.thr.in_force(&id) {
                // Someone else moved it out of its cap cgroup: the cap no longer applies.
                if let Some(undone) = self.thr.lift(&id)? {
                    let undone = match undone {
                        // Moved back to where it was, by someone else: still moved away.
                        Undone::NothingToUndo => Undone::MovedAway {
                            now_in: procfs::cpu_cgroup(c.pid),
                        },
                        u => u,
                    };
                    let u = Undo {
                        pid: c.pid,
                        start_time: c.start_time,
                        comm: c.comm,
                        undone,
                    };
                    self.emit(Event::MovedAway(u));
                }
                continue;
            }
            if !alive {
                if let Some(s) = self.sampler.as_mut() {
                    s.unwatch(id);
                }
                if let Some(u) = self.thr.lift(&id)? {
                    let g = Gone {
                        pid: c.pid,
                        start_time: c.start_time,
                        comm: c.comm,
                        undone: Some(u),
                    };
                    self.emit(Event::Gone(g));
                }
                continue;
            }
            let seen = snap.and_then(|s| s.processes.iter().find(|p| p.id() == id));
            let dirty = seen.map(|p| p.dirty_bytes_per_s).or(snap.map(|_| 0.0));
            lines.push(CapLine {
                pid: c.pid,
                start_time: c.start_time,
                comm: c.comm,
                cap_pct: c.cap_pct,
                cpu_pct: self.cpu.pct(id).or(seen.map(|p| p.cpu_pct)),
                dirty_bytes_per_s: dirty,
            });
        }
        Ok(lines)
    }

    /// Lifts every cap and says how each went; true if any could not be lifted.
    fn finish(&mut self) -> bool {
        let mut failed = false;
        for (p, r) in self.thr.lift_all() {
            failed |= r.is_err();
            let e = undo_event(&p, r, Event::Lifted);
            self.emit(e);
        }
        failed
    }
}
