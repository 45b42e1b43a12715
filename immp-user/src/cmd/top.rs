//! `immp top`: the live screen for a maintenance window.
//!
//! Three threads, in bottom's shape: collection (owns the `Sampler`, sends whole snapshots),
//! input (crossterm key and resize events), and this one, which owns the state, the actuator
//! and the terminal: every message updates the state, then the screen is drawn from it. Caps
//! go through the same `Throttler` (journal first, claims) as `immp throttle`, and the
//! automatic policy is the same `decide`. Every cap set here is lifted on the way out (quit,
//! stop signals, a panic while unwinding), or kept with `--keep-caps` for `immp restore`.
use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::Args;
use crossterm::{
    event::{self as ct, KeyEvent},
    execute,
    terminal::{
        Clear, ClearType, EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode,
        enable_raw_mode,
    },
};
use immp_model::{
    Event, ProcId, Snapshot,
    event::{Held, Undo, Warning},
    text::clean,
    units::fmt_duration,
};
use ratatui::{Terminal, backend::CrosstermBackend};

use super::{
    args::{self, JournalArgs, LinkArgs, MechanismArg, ModeArg, ProbeArgs},
    autocap::{AutoCap, Host},
    restore::undo_event,
    run::stop_requested,
};
use crate::{
    act::{
        target::validate_target,
        throttle::{CapOutcome, Throttler},
    },
    collect::{
        nonzero,
        sampler::{Sampler, SamplerOptions},
    },
    view::tui::{App, CapBy, CapView, Command, Settings, draw::draw},
};

pub const HELP: &str = "Examples:\n  \
  immp top --bandwidth 100Mbit\n  \
  immp top --bandwidth 1Gbit --auto --floor 20%\n  \
  immp top --pid 4242 --interval 2s --monochrome\n\n\
Keys: ? help, q quit, c cap the selected process, u lift its cap, a automatic policy on/off, \
b bandwidth, s sort, / filter, f freeze, +/- interval. Every cap set here is lifted on quit, \
Ctrl-C, SIGTERM, SIGHUP and on panic (--keep-caps keeps them; `immp restore` lifts them later). \
Needs a terminal: for headless output use `immp profile`.";

#[derive(Args, Debug, Clone)]
pub struct TopArgs {
    /// Always show this process, even idle (repeatable)
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Sampling interval (+ and - change it live)
    #[arg(long, default_value = "1s", value_parser = args::positive_duration)]
    pub interval: Duration,
    #[command(flatten)]
    pub link: LinkArgs,
    /// auto: exact where soft-dirty works; exact: refuse to run without it; bounds: faults only
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub mode: ModeArg,
    /// Re-arm at most this many of the busiest writers per window (exact mode)
    #[arg(long, default_value_t = 64)]
    pub exact_max: usize,
    /// Start with the automatic cap policy on (`a` toggles it)
    #[arg(long, requires = "bandwidth")]
    pub auto: bool,
    #[command(flatten)]
    pub policy: args::PolicyArgs,
    #[command(flatten)]
    pub journal: JournalArgs,
    /// How to cap
    #[arg(long, value_enum, default_value_t = MechanismArg::Auto)]
    pub mechanism: MechanismArg,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// Leave the caps in force on exit (`immp restore` lifts them)
    #[arg(long)]
    pub keep_caps: bool,
    /// No colours (also when NO_COLOR is set): words and symbols carry every meaning
    #[arg(long)]
    pub monochrome: bool,
}

/// What the main loop waits for.
enum Msg {
    Snapshot(Box<Snapshot>),
    Key(KeyEvent),
    Resize,
    /// The terminal can no longer be read (closed: SIGHUP's usual company).
    InputGone(String),
    CollectorGone(String),
}

/// What the collection thread is asked to do.
enum Ctl {
    Interval(Duration),
    Watch(ProcId),
    Unwatch(ProcId),
    Stop,
}

pub fn run(a: TopArgs) -> anyhow::Result<i32> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(crate::usage(
            "immp top needs a terminal; for headless output use `immp profile` (table, JSON lines or CSV)",
        ));
    }
    crate::require_root()?;
    let watch = args::resolve_pids(&a.pids)?;
    let probes = a.probe.open()?;
    let fallback = probes.report.fallback_reason.clone();
    let opts = SamplerOptions {
        mode: a.mode.into(),
        exact_max: a.exact_max,
        verify: None,
    };
    let sampler =
        Sampler::with_options(probes, watch, &opts).map_err(super::profile::mode_error)?;
    let mut app = App::new(settings(&a, sampler.is_exact()));
    app.color = !a.monochrome && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    app.clock = local_clock;
    let act = open_actuator(&a, &mut app)?;
    if let Some(why) = fallback {
        let text = format!(
            "probes: classic tracepoints, because BTF failed: {}",
            clean(&why)
        );
        app.info(now_ms(), text);
    }
    if stop_requested().is_some() {
        return Ok(crate::exit::OK); // a stop signal during start-up: nothing was capped
    }
    let (tx, rx) = mpsc::channel();
    let ctl = spawn_collector(sampler, a.interval, tx.clone())?;
    spawn_input(tx)?;
    let mut actor = Actor::new(act, ctl.clone());
    actor.fresh_ram = a.link.ram.is_none();
    let res = screen(&mut app, &rx, &mut actor);
    let _ = ctl.send(Ctl::Stop);
    let failed = actor.finish(a.keep_caps, &a.journal.journal_dir);
    res?;
    if failed {
        anyhow::bail!("some caps could not be lifted: run `immp restore`");
    }
    Ok(crate::exit::OK)
}

fn settings(a: &TopArgs, exact: bool) -> Settings {
    let mode_why = match (exact, a.mode) {
        (true, _) => "soft-dirty windows",
        (false, ModeArg::Bounds) => "--mode bounds",
        (false, _) => "no soft-dirty in this kernel",
    };
    Settings {
        bandwidth: a.link.bandwidth,
        ram: a.link.ram_now(),
        memory: nonzero::ram_bytes(),
        goal_ram: None,
        downtime: a.link.downtime,
        immp_share: a.link.immp_share,
        floor_pct: a.policy.floor,
        headroom: a.policy.headroom,
        target: a.policy.target,
        auto: a.auto,
        interval: a.interval,
        mode_why: mode_why.to_string(),
        mechanism: None,
        journal: a.journal.journal_dir.join("journal").display().to_string(),
        keep_caps: a.keep_caps,
    }
}

/// The actuator, with leftovers of a killed immp put back first. Without it (another immp
/// holds the journal, no way to cap) the screen still works, read-only; `--auto` needs it.
fn open_actuator(a: &TopArgs, app: &mut App) -> anyhow::Result<Option<Throttler>> {
    match Throttler::open(&a.journal.journal_dir, a.mechanism.into()) {
        Ok((thr, leftovers)) => {
            for (p, r) in leftovers {
                app.log_event(&undo_event(&p, r, Event::RestoredLeftover), now_ms());
            }
            app.settings.mechanism = Some(thr.mechanism());
            let text = format!(
                "immp top: caps by {}, journal {}; quitting lifts every cap set here{}",
                thr.mechanism(),
                clean(&app.settings.journal),
                if a.keep_caps {
                    " (unless --keep-caps)"
                } else {
                    ""
                }
            );
            app.info(now_ms(), text);
            if let Some(s) = app.settings.auto_settings().filter(|_| a.auto) {
                let text = format!(
                    "automatic policy on: goal {:.1}s (idle guest {:.1}s), floor {:.1}%",
                    s.target.as_secs_f64(),
                    immp_model::policy::idle_time(&s.link),
                    s.floor_pct
                );
                app.info(now_ms(), text);
            }
            Ok(Some(thr))
        }
        Err(e) if a.auto => Err(e.context("--auto needs to cap processes")),
        Err(e) => {
            let message = format!("read-only: caps unavailable: {e:#}");
            app.log_event(&Event::Warning(Warning { message }), now_ms());
            Ok(None)
        }
    }
}

// --- threads ---

/// The collection thread: samples every interval and sends each whole snapshot; takes
/// interval changes and (un)watch requests between samples.
fn spawn_collector(
    mut sampler: Sampler,
    every: Duration,
    tx: Sender<Msg>,
) -> anyhow::Result<Sender<Ctl>> {
    let (ctl_tx, ctl_rx) = mpsc::channel();
    let died = tx.clone();
    let body = move || {
        let mut every = every;
        let mut next = Instant::now() + every;
        loop {
            match ctl_rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(Ctl::Interval(d)) => {
                    next = (next - every + d).max(Instant::now());
                    every = d;
                    continue;
                }
                Ok(Ctl::Watch(id)) => sampler.watch(id),
                Ok(Ctl::Unwatch(id)) => sampler.unwatch(id),
                Ok(Ctl::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() < next {
                continue;
            }
            let snap = sampler.sample();
            if tx.send(Msg::Snapshot(Box::new(snap))).is_err() {
                return;
            }
            next = (next + every).max(Instant::now());
        }
    };
    std::thread::Builder::new()
        .name("immp-collect".into())
        .spawn(move || {
            // A panic here ends the screen (and lifts the caps) instead of freezing it.
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                let why = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                let _ = died.send(Msg::CollectorGone(why));
            }
        })?;
    Ok(ctl_tx)
}

/// The input thread: key presses and resizes (raw mode makes Ctrl-C a key too).
fn spawn_input(tx: Sender<Msg>) -> anyhow::Result<()> {
    let body = move || {
        loop {
            let m = match ct::read() {
                Ok(ct::Event::Key(k)) => Msg::Key(k),
                Ok(ct::Event::Resize(..)) => Msg::Resize,
                Ok(_) => continue,
                Err(e) => Msg::InputGone(e.to_string()),
            };
            let gone = matches!(m, Msg::InputGone(_));
            if tx.send(m).is_err() || gone {
                return;
            }
        }
    };
    std::thread::Builder::new()
        .name("immp-input".into())
        .spawn(body)?;
    Ok(())
}

// --- the terminal ---

static SCREEN_ON: AtomicBool = AtomicBool::new(false);

/// Leaves raw mode and the alternate screen (idempotent: the guard, the panic hook and the
/// normal path may all call it).
fn restore_terminal() {
    if SCREEN_ON.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(
            std::io::stdout(),
            LeaveAlternateScreen,
            crossterm::cursor::Show
        );
    }
}

/// Restores the terminal when dropped (normal exit, errors, unwinding).
struct ScreenGuard;

impl Drop for ScreenGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// A panic first gives the terminal back, so that its message is readable (then unwinding
/// drops the actuator, which lifts every cap).
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        previous(info);
    }));
}

/// Runs the screen until quit, a stop signal or an error; the terminal is restored after.
fn screen(app: &mut App, rx: &Receiver<Msg>, actor: &mut Actor) -> anyhow::Result<()> {
    install_panic_hook();
    let _guard = ScreenGuard;
    SCREEN_ON.store(true, Ordering::SeqCst);
    enable_raw_mode()?;
    execute!(
        std::io::stdout(),
        EnterAlternateScreen,
        crossterm::cursor::Hide
    )?;
    // Cleared by crossterm, not `Terminal::clear`, which asks the terminal for the cursor
    // position and would race the input thread for the answer.
    execute!(std::io::stdout(), Clear(ClearType::All))?;
    let mut term = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    main_loop(&mut term, app, rx, actor)
}

fn main_loop<B: ratatui::backend::Backend>(
    term: &mut Terminal<B>,
    app: &mut App,
    rx: &Receiver<Msg>,
    actor: &mut Actor,
) -> anyhow::Result<()>
where
    B::Error: Send + Sync + 'static,
{
    let mut redraw = true;
    while !app.quit {
        if stop_requested().is_some() {
            return Ok(());
        }
        if redraw {
            term.draw(|f| draw(f, app))?;
            redraw = false;
        }
        // Wake at least every 100 ms to see stop signals.
        let first = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => anyhow::bail!("collection stopped"),
        };
        // Everything waiting is applied before one redraw.
        for m in std::iter::once(first).chain(rx.try_iter()) {
            handle(m, app, actor)?;
        }
        redraw = true;
    }
    Ok(())
}

fn handle(m: Msg, app: &mut App, actor: &mut Actor) -> anyhow::Result<()> {
    match m {
        Msg::Snapshot(s) => {
            super::run::test_panic_hook();
            actor.on_snapshot(&s, app);
            app.on_snapshot(*s);
        }
        Msg::Key(k) => {
            if let Some(c) = app.on_key(k) {
                actor.command(c, app);
            }
        }
        Msg::Resize => {}
        Msg::InputGone(e) => anyhow::bail!("the terminal went away: {e}"),
        Msg::CollectorGone(e) => anyhow::bail!("collection stopped: {e}"),
    }
    Ok(())
}

// --- the actuator ---

/// Applies caps from keys and from the policy, and says what happened (log and status bar).
struct Actor {
    thr: Option<Throttler>,
    ctl: Sender<Ctl>,
    auto: AutoCap,
    owners: BTreeMap<ProcId, CapBy>,
    /// No --ram: round 0 follows the guest's non-zero memory.
    fresh_ram: bool,
}

/// What the screen lends the policy loop: the log, who owns each cap, the collector.
struct TopHost<'a> {
    app: &'a mut App,
    owners: &'a mut BTreeMap<ProcId, CapBy>,
    ctl: &'a Sender<Ctl>,
}

impl Host for TopHost<'_> {
    fn emit(&mut self, e: Event) {
        // The prediction is drawn in the header (set_policy), not logged.
        if !matches!(e, Event::Prediction(_)) {
            self.app.log_event(&e, now_ms());
        }
    }

    fn watch(&mut self, id: ProcId) {
        let _ = self.ctl.send(Ctl::Watch(id));
    }

    fn unwatch(&mut self, id: ProcId) {
        let _ = self.ctl.send(Ctl::Unwatch(id));
    }

    fn exempt(&self, id: ProcId) -> bool {
        self.owners.get(&id) == Some(&CapBy::Operator) || self.app.exempt().contains(&id)
    }

    /// Kept decisions too: the detail pane shows them (the log skips them).
    fn every_decision(&self) -> bool {
        true
    }

    fn policy_capped(&mut self, id: ProcId) {
        self.owners.insert(id, CapBy::Policy);
    }

    fn policy_lifted(&mut self, id: ProcId) {
        self.owners.remove(&id);
    }
}

impl Actor {
    fn new(thr: Option<Throttler>, ctl: Sender<Ctl>) -> Self {
        Self {
            thr,
            ctl,
            auto: AutoCap::default(),
            owners: BTreeMap::new(),
            fresh_ram: false,
        }
    }

    fn command(&mut self, c: Command, app: &mut App) {
        let r = match c {
            Command::Cap { id, comm, pct } => self.cap(id, &comm, pct, app),
            Command::Lift { id, comm } => self.lift(id, &comm, app),
            Command::SetInterval(d) => {
                let _ = self.ctl.send(Ctl::Interval(d));
                Ok(format!("interval {} from the next sample", fmt_duration(d)))
            }
        };
        app.status(r);
        self.sync(app);
    }

    /// Caps `id` for the operator (new or changed); the one-line result for the status bar.
    fn cap(&mut self, id: ProcId, comm: &str, pct: f64, app: &mut App) -> Result<String, String> {
        let thr = self
            .thr
            .as_mut()
            .ok_or("read-only: caps unavailable (see the log)")?;
        let new = !self.owners.contains_key(&id);
        if new {
            // The same refusals as `--pid` (PID 1, kernel threads, immp itself, threads, a
            // process another immp caps), and the PID must still be the process shown.
            let (now, _) = validate_target(id.pid).map_err(|e| format!("{e:#}"))?;
            if now != id {
                return Err(format!("PID {} is now another process", id.pid));
            }
        }
        let who = format!("PID {} ({})", id.pid, clean(comm));
        match thr.cap(id, comm, pct) {
            Ok(CapOutcome::Capped) => {
                self.owners.insert(id, CapBy::Operator);
                let mech = thr.mechanism();
                if new {
                    let _ = self.ctl.send(Ctl::Watch(id));
                    if let Some(c) = thr.active().into_iter().find(|c| c.pid == id.pid) {
                        app.log_event(&Event::Capped(c), now_ms());
                    }
                } else {
                    let text = format!("{who}: cap changed to {pct:.1}% of one CPU");
                    app.info(now_ms(), text);
                }
                Ok(format!("{who} capped at {pct:.1}% of one CPU ({mech})"))
            }
            Ok(CapOutcome::Held { limit_pct, cgroup }) => {
                let h = Held {
                    pid: id.pid,
                    start_time: id.start_time,
                    comm: comm.into(),
                    cap_pct: pct,
                    limit_pct,
                    cgroup,
                };
                app.log_event(&Event::Held(h), now_ms());
                Err(format!(
                    "{who} is already held at {limit_pct:.1}% by its cgroup: left as is"
                ))
            }
            Ok(CapOutcome::Gone) => Err(format!("{who} exited before it could be capped")),
            Err(e) => Err(format!("{who}: not capped: {e:#}")),
        }
    }

    fn lift(&mut self, id: ProcId, comm: &str, app: &mut App) -> Result<String, String> {
        let thr = self.thr.as_mut().ok_or("read-only: caps unavailable")?;
        self.owners.remove(&id);
        let _ = self.ctl.send(Ctl::Unwatch(id));
        match thr.lift(&id) {
            Ok(Some(undone)) => {
                let text = format!("PID {} ({}): cap lifted, {undone}", id.pid, clean(comm));
                let u = Undo {
                    pid: id.pid,
                    start_time: id.start_time,
                    comm: comm.into(),
                    undone,
                };
                app.log_event(&Event::Lifted(u), now_ms());
                Ok(text)
            }
            Ok(None) => Err(format!("PID {} is not capped by this immp", id.pid)),
            Err(e) => Err(format!(
                "PID {}: cap NOT lifted: {e:#} (immp restore)",
                id.pid
            )),
        }
    }

    /// Tells the state which caps are in force.
    fn sync(&self, app: &mut App) {
        let Some(thr) = &self.thr else { return };
        let caps = thr
            .active()
            .into_iter()
            .map(|c| {
                let id = ProcId::new(c.pid, c.start_time);
                let by = self.owners.get(&id).copied().unwrap_or(CapBy::Operator);
                let v = CapView {
                    pct: c.cap_pct,
                    mechanism: c.mechanism,
                    cgroup: c.cgroup,
                    by,
                };
                (id, v)
            })
            .collect();
        app.set_caps(caps);
    }

    fn on_snapshot(&mut self, snap: &Snapshot, app: &mut App) {
        // From the snapshot: the collection thread measured it (a kcore sample is tens of ms
        // under TCG, not for the drawing thread).
        if let Some(m) = snap.memory.filter(|_| self.fresh_ram) {
            app.settings.ram = m.round_zero_bytes;
            app.settings.goal_ram = Some(m.goal_round_zero_bytes);
            app.settings.memory = m.ram_bytes;
        }
        self.check_caps(app);
        if app.settings.auto {
            self.auto_step(snap, app);
        } else {
            app.set_policy(None);
        }
        self.sync(app);
    }

    /// A capped process that exited is released; one moved out of its cap cgroup by someone
    /// else is reported (its cap no longer applies). As `immp throttle` does.
    fn check_caps(&mut self, app: &mut App) {
        let Some(thr) = self.thr.as_mut() else { return };
        let mut host = TopHost {
            app,
            owners: &mut self.owners,
            ctl: &self.ctl,
        };
        super::autocap::release_stale(thr, &mut host);
    }

    /// The automatic policy, as `immp throttle --auto` runs it (the shared loop of
    /// `autocap`); caps the operator set or lifted are the operator's (the policy's decisions
    /// about them are not applied).
    fn auto_step(&mut self, snap: &Snapshot, app: &mut App) {
        let (Some(s), Some(thr)) = (app.settings.auto_settings(), self.thr.as_mut()) else {
            return;
        };
        let mut host = TopHost {
            app,
            owners: &mut self.owners,
            ctl: &self.ctl,
        };
        let r = self.auto.step(thr, snap, &s, &mut host);
        match r {
            Ok(pair) => app.set_policy(Some(pair)),
            Err(e) => {
                let message = format!("automatic policy: cap NOT lifted: {e:#} (immp restore)");
                app.log_event(&Event::Warning(Warning { message }), now_ms());
            }
        }
    }

    /// Lifts every cap set here (or keeps them with `--keep-caps`) and says so on stderr,
    /// the terminal being restored by now. True if any could not be lifted.
    fn finish(mut self, keep: bool, journal_dir: &std::path::Path) -> bool {
        let Some(mut thr) = self.thr.take() else {
            return false;
        };
        let mut err = std::io::stderr();
        let signals = thr.mechanism() == immp_model::event::Mechanism::Signal;
        if keep && !signals && !thr.active().is_empty() {
            for c in thr.active() {
                let _ = writeln!(err, "immp top: kept: {}", Event::Capped(c));
            }
            let _ = writeln!(
                err,
                "immp top: caps kept (--keep-caps): `immp restore --journal-dir {}` lifts them",
                journal_dir.display()
            );
            // Dropping the Throttler would lift them: its journal and claims stay for restore.
            std::mem::forget(thr);
            return false;
        }
        if keep && signals {
            let _ = writeln!(
                err,
                "immp top: signal caps cannot outlive immp: lifting them"
            );
        }
        let mut failed = false;
        for (p, r) in thr.lift_all() {
            failed |= r.is_err();
            let _ = writeln!(err, "immp top: {}", undo_event(&p, r, Event::Lifted));
        }
        failed
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `HH:MM:SS` in local time (the operator's clock).
fn local_clock(ms: u64) -> String {
    let t = (ms / 1000) as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value; localtime_r only writes into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return crate::view::tui::state::utc_clock(ms);
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}
