//! The state of `immp top`: everything the screen shows, and what the keys do to it.
//!
//! Pure: no terminal and no system access. Snapshots and events come in (`on_snapshot`,
//! `log_event`, `set_caps`); keys come in (`on_key`) and what needs the system goes out as a
//! `Command` that `cmd/top.rs` carries out, reporting back with `status`. Drawing only reads it.
use std::{
    cell::Cell,
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::Duration,
};

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use immp_model::{
    Event, ProcId, Snapshot,
    event::PredictionPair,
    policy::{Action, Decision},
    snapshot::ProcSample,
    text::clean,
    units::{fmt_rate, parse_bandwidth},
};

use super::{
    data::{
        CapBy, CapView, Data, GHOST_INTERVALS, Inputs, Row, Settings, SortKey, Uncapped, impact_of,
        visible,
    },
    history::History,
};

/// What a key asks of the system (carried out by `cmd/top.rs`).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Cap { id: ProcId, comm: String, pct: f64 },
    Lift { id: ProcId, comm: String },
    SetInterval(Duration),
}

/// Intervals `+` and `-` step through.
pub const INTERVALS_MS: [u64; 7] = [250, 500, 1000, 2000, 5000, 10_000, 30_000];

/// Log lines kept (the screen shows the newest that fit).
const LOG_LINES: usize = 200;

/// Policy decisions kept per process (the detail pane shows them).
const DECISIONS_KEPT: usize = 5;

/// Snapshots a status message stays before the key hints come back.
const STATUS_TICKS: u64 = 8;

/// A process that dirtied at least this much (bytes/s) in at least `NOTABLE_SLOTS` intervals
/// is named in the log when it exits; others come and go unremarked (a build or a shell loop
/// spawns thousands of short-lived processes).
const NOTABLE_RATE: f32 = 1e6;
const NOTABLE_SLOTS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    Info,
    Cap,
    Lift,
    Gone,
    Warn,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub time_ms: u64,
    pub kind: LogKind,
    pub text: String,
    /// The same line again and again is kept once, counted.
    pub repeat: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub text: String,
    pub error: bool,
    since: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    Cap,
    Bandwidth,
    Filter,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub kind: PromptKind,
    pub buf: String,
    /// The process a cap prompt is for.
    pub target: Option<(ProcId, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlay {
    None,
    Help,
    Detail,
}

/// What the screen shows when frozen (collection goes on behind it).
#[derive(Debug, Clone)]
struct Frozen {
    data: Data,
    history: History,
}

pub struct App {
    pub settings: Settings,
    last: Option<Snapshot>,
    data: Option<Data>,
    frozen: Option<Box<Frozen>>,
    history: History,
    ghosts: Vec<(ProcSample, u8)>,
    caps: BTreeMap<ProcId, CapView>,
    uncapped: BTreeMap<ProcId, Uncapped>,
    policy: Option<PredictionPair>,
    decisions: BTreeMap<ProcId, VecDeque<(u64, String)>>,
    log: VecDeque<LogLine>,
    status: Option<Status>,
    selected: Option<ProcId>,
    sel_idx: usize,
    /// First table row shown (scrolling is the drawing's business; it remembers it here).
    pub offset: Cell<usize>,
    pub sort: SortKey,
    pub invert: bool,
    pub filter: String,
    pub prompt: Option<Prompt>,
    pub overlay: Overlay,
    /// Processes whose cap the operator lifted while the policy was on: the policy leaves
    /// them alone from then on.
    exempt: BTreeSet<ProcId>,
    ticks: u64,
    pub quit: bool,
    /// Formats a log line's time (local time on screen; UTC in tests).
    pub clock: fn(u64) -> String,
    /// Colours on (`NO_COLOR` and `--monochrome` turn them off; meaning never rests on them).
    pub color: bool,
}

impl App {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            last: None,
            data: None,
            frozen: None,
            history: History::default(),
            ghosts: Vec::new(),
            caps: BTreeMap::new(),
            uncapped: BTreeMap::new(),
            policy: None,
            decisions: BTreeMap::new(),
            log: VecDeque::new(),
            status: None,
            selected: None,
            sel_idx: 0,
            offset: Cell::new(0),
            sort: SortKey::Dirty,
            invert: false,
            filter: String::new(),
            prompt: None,
            overlay: Overlay::None,
            exempt: BTreeSet::new(),
            ticks: 0,
            quit: false,
            clock: utc_clock,
            color: true,
        }
    }

    // --- what comes in from collection and the actuator ---

    /// One new snapshot: history, exited processes, warnings; the display follows unless
    /// frozen.
    pub fn on_snapshot(&mut self, snap: Snapshot) {
        self.ticks += 1;
        let caps: BTreeMap<ProcId, f64> = self.caps.iter().map(|(k, c)| (*k, c.pct)).collect();
        self.history.push(&snap, &caps, self.settings.bandwidth);
        self.note_exits(&snap);
        self.note_health(&snap);
        self.last = Some(snap);
        self.rebuild();
        if self
            .status
            .as_ref()
            .is_some_and(|s| self.ticks >= s.since + STATUS_TICKS)
        {
            self.status = None;
        }
    }

    /// Recomputes what the latest snapshot shows (after a snapshot or a settings change).
    fn rebuild(&mut self) {
        let Some(snap) = &self.last else { return };
        let inputs = Inputs {
            settings: &self.settings,
            caps: &self.caps,
            uncapped: &self.uncapped,
            ghosts: &self.ghosts,
        };
        self.data = Some(Data::build(snap, &inputs));
        self.keep_selection();
        self.refresh_impact();
    }

    /// The selected process's impact, while its detail is shown (live data only).
    fn refresh_impact(&mut self) {
        let (Some(d), Some(snap)) = (&mut self.data, &self.last) else {
            return;
        };
        let want = self.selected.filter(|_| self.overlay == Overlay::Detail);
        if d.impact.as_ref().map(|i| i.0) == want {
            return;
        }
        let link = self.settings.link();
        d.impact = want
            .zip(link)
            .and_then(|(id, l)| Some((id, impact_of(snap, &l, id)?)));
    }

    fn note_exits(&mut self, snap: &Snapshot) {
        for g in &mut self.ghosts {
            g.1 += 1;
        }
        // Shown in the interval it exited in, then GHOST_INTERVALS more.
        self.ghosts.retain(|g| g.1 <= GHOST_INTERVALS + 1);
        for p in snap.processes.iter().filter(|p| p.gone) {
            self.ghosts.retain(|g| g.0.id() != p.id());
            self.ghosts.push((p.clone(), 1));
            let notable = self.history.peak(&p.id()) >= NOTABLE_RATE
                && self.history.active_slots(&p.id()) >= NOTABLE_SLOTS;
            if notable && !self.caps.contains_key(&p.id()) {
                let name = if p.comm.is_empty() { "?" } else { &p.comm };
                let text = format!("PID {} ({}): exited", p.pid, clean(name));
                self.push_log(snap.time_unix_ms, LogKind::Gone, text);
            }
        }
    }

    fn note_health(&mut self, snap: &Snapshot) {
        let h = &snap.health;
        if h.map_full > 0 {
            let text = format!(
                "warning: {} page events not counted: the kernel's per-process table is full (--max-procs {})",
                h.map_full, h.capacity
            );
            self.push_log(snap.time_unix_ms, LogKind::Warn, text);
        }
        if h.exit_lost > 0 {
            let text = format!(
                "warning: {} exits lost (ring buffer full): their last counts are missing",
                h.exit_lost
            );
            self.push_log(snap.time_unix_ms, LogKind::Warn, text);
        }
    }

    /// The caps in force now, as the actuator reports them. A newly capped process's last
    /// uncapped measurement is remembered (what lifting the cap would bring back).
    pub fn set_caps(&mut self, caps: BTreeMap<ProcId, CapView>) {
        for id in caps.keys().filter(|id| !self.caps.contains_key(id)) {
            let row = self.data.as_ref().and_then(|d| d.row(id));
            if let Some(r) = row {
                let p = r.p();
                self.uncapped.insert(*id, Uncapped::of(p));
            }
        }
        self.uncapped.retain(|id, _| caps.contains_key(id));
        // Called after every snapshot and command: recompute only when something changed
        // (ranking and predicting 500 processes is most of the screen's cost).
        if caps != self.caps {
            self.caps = caps;
            self.rebuild();
        }
    }

    /// The policy's prediction pair of this interval (auto on), or `None`.
    pub fn set_policy(&mut self, p: Option<PredictionPair>) {
        self.policy = p;
    }

    /// An event from the actuator or the policy, into the log (and the detail pane).
    pub fn log_event(&mut self, e: &Event, time_ms: u64) {
        let kind = match e {
            Event::Capped(_) | Event::Held(_) => LogKind::Cap,
            Event::Lifted(_) | Event::RestoredLeftover(_) | Event::MovedAway(_) => LogKind::Lift,
            Event::Gone(_) => LogKind::Gone,
            Event::Warning(_) | Event::RestoreFailed(_) => LogKind::Warn,
            Event::Decision(d) => {
                self.note_decision(d, time_ms);
                match d.action {
                    Action::Keep { .. } => return,
                    Action::Cap { .. } => LogKind::Cap,
                    Action::Lift => LogKind::Lift,
                }
            }
            _ => LogKind::Info,
        };
        // Display cleans every name of control characters.
        self.push_log(time_ms, kind, e.to_string());
    }

    fn note_decision(&mut self, d: &Decision, time_ms: u64) {
        let q = self.decisions.entry(d.id()).or_default();
        q.push_back((time_ms, format!("{}: {}", d.action, clean(&d.reason))));
        while q.len() > DECISIONS_KEPT {
            q.pop_front();
        }
    }

    pub fn info(&mut self, time_ms: u64, text: impl Into<String>) {
        self.push_log(time_ms, LogKind::Info, text.into());
    }

    fn push_log(&mut self, time_ms: u64, kind: LogKind, text: String) {
        if let Some(l) = self.log.back_mut().filter(|l| l.text == text) {
            l.repeat += 1;
            l.time_ms = time_ms;
            return;
        }
        if self.log.len() == LOG_LINES {
            self.log.pop_front();
        }
        self.log.push_back(LogLine {
            time_ms,
            kind,
            text,
            repeat: 1,
        });
    }

    /// The result of an action, in the status bar (one line).
    pub fn status(&mut self, r: Result<String, String>) {
        let (text, error) = match r {
            Ok(t) => (t, false),
            Err(e) => (e, true),
        };
        self.status = Some(Status {
            text: clean(&text).replace('\n', " "),
            error,
            since: self.ticks,
        });
    }

    // --- what drawing reads ---

    /// The data on screen (frozen or live).
    pub fn data(&self) -> Option<&Data> {
        self.frozen.as_ref().map(|f| &f.data).or(self.data.as_ref())
    }

    pub fn history(&self) -> &History {
        self.frozen.as_ref().map_or(&self.history, |f| &f.history)
    }

    pub fn frozen(&self) -> bool {
        self.frozen.is_some()
    }

    pub fn caps(&self) -> &BTreeMap<ProcId, CapView> {
        &self.caps
    }

    pub fn policy(&self) -> Option<&PredictionPair> {
        self.policy.as_ref().filter(|_| self.settings.auto)
    }

    pub fn log(&self) -> &VecDeque<LogLine> {
        &self.log
    }

    pub fn current_status(&self) -> Option<&Status> {
        self.status.as_ref()
    }

    pub fn decisions(&self, id: &ProcId) -> impl Iterator<Item = &(u64, String)> {
        self.decisions.get(id).into_iter().flatten()
    }

    /// Rows shown, in order (filter and sort applied).
    pub fn rows(&self) -> Vec<&Row> {
        self.data().map_or_else(Vec::new, |d| {
            visible(d, &self.caps, self.sort, self.invert, &self.filter)
        })
    }

    /// Index of the selected row in `rows()`.
    pub fn selected_index(&self) -> Option<usize> {
        let id = self.selected?;
        self.rows().iter().position(|r| r.id() == id)
    }

    pub fn selected(&self) -> Option<&Row> {
        let id = self.selected?;
        self.data()?.row(&id)
    }

    /// The policy leaves these alone.
    pub fn exempt(&self) -> &BTreeSet<ProcId> {
        &self.exempt
    }

    // --- keys ---

    /// One key press; what needs the system comes back as a command.
    pub fn on_key(&mut self, k: KeyEvent) -> Option<Command> {
        if k.kind == KeyEventKind::Release {
            return None;
        }
        if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
            self.quit = true;
            return None;
        }
        if self.prompt.is_some() {
            return self.prompt_key(k);
        }
        if self.overlay == Overlay::Help {
            // Any key closes the help; q and Esc only close it.
            self.overlay = Overlay::None;
            return None;
        }
        self.normal_key(k)
    }

    fn normal_key(&mut self, k: KeyEvent) -> Option<Command> {
        match k.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Esc if self.overlay != Overlay::None => self.overlay = Overlay::None,
            KeyCode::Esc => self.quit = true,
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::PageUp => self.move_selection(-10),
            KeyCode::PageDown => self.move_selection(10),
            KeyCode::Home | KeyCode::Char('g') => self.move_selection(isize::MIN / 2),
            KeyCode::End | KeyCode::Char('G') => self.move_selection(isize::MAX / 2),
            KeyCode::Enter => self.toggle(Overlay::Detail),
            KeyCode::Char('?') | KeyCode::F(1) => self.toggle(Overlay::Help),
            KeyCode::Char('c') => self.ask_cap(),
            KeyCode::Char('u') => return self.lift_selected(),
            KeyCode::Char('a') => self.toggle_auto(),
            KeyCode::Char('b') => self.open_prompt(PromptKind::Bandwidth, None),
            KeyCode::Char('s') | KeyCode::Right => self.set_sort(self.sort.step(1)),
            KeyCode::Left => self.set_sort(self.sort.step(-1)),
            KeyCode::Char('I') => {
                self.invert = !self.invert;
                self.status(Ok(format!(
                    "sorted by {}, {}",
                    self.sort.name(),
                    self.order()
                )));
            }
            KeyCode::Char('/') => {
                let buf = self.filter.clone();
                self.open_prompt(PromptKind::Filter, None);
                if let Some(p) = &mut self.prompt {
                    p.buf = buf;
                }
            }
            KeyCode::Char('f') => self.toggle_freeze(),
            KeyCode::Char('+') | KeyCode::Char('=') => return self.step_interval(1),
            KeyCode::Char('-') => return self.step_interval(-1),
            _ => {}
        }
        None
    }

    fn order(&self) -> &'static str {
        if self.invert {
            "inverted"
        } else {
            "usual order"
        }
    }

    fn set_sort(&mut self, key: SortKey) {
        self.sort = key;
        self.status(Ok(format!("sorted by {}, {}", key.name(), self.order())));
    }

    fn toggle(&mut self, o: Overlay) {
        self.overlay = if self.overlay == o { Overlay::None } else { o };
        if o == Overlay::Detail && self.selected().is_none() {
            self.overlay = Overlay::None;
            self.status(Err("no process selected".into()));
        }
        self.refresh_impact();
    }

    fn move_selection(&mut self, by: isize) {
        let rows = self.rows();
        if rows.is_empty() {
            return;
        }
        let at = self.selected_index().unwrap_or(0) as isize;
        let i = (at.saturating_add(by)).clamp(0, rows.len() as isize - 1) as usize;
        self.selected = Some(rows[i].id());
        self.sel_idx = i;
        self.refresh_impact();
    }

    /// After new data or a filter change: the selected process stays selected while it is
    /// shown; else the row at the same place is.
    fn keep_selection(&mut self) {
        let rows = self.rows();
        if rows.is_empty() {
            return;
        }
        match self
            .selected
            .and_then(|id| rows.iter().position(|r| r.id() == id))
        {
            Some(i) => self.sel_idx = i,
            None => {
                let i = self.sel_idx.min(rows.len() - 1);
                self.selected = Some(rows[i].id());
                self.sel_idx = i;
            }
        }
    }

    fn toggle_freeze(&mut self) {
        match self.frozen.take() {
            Some(_) => self.status(Ok("display follows collection again".into())),
            None => {
                if let Some(d) = &self.data {
                    self.frozen = Some(Box::new(Frozen {
                        data: d.clone(),
                        history: self.history.clone(),
                    }));
                    self.status(Ok(
                        "display frozen (collection and caps go on); f to thaw".into()
                    ));
                } else {
                    self.status(Err("nothing to freeze yet".into()));
                }
            }
        }
    }

    fn toggle_auto(&mut self) {
        if self.settings.auto {
            self.settings.auto = false;
            self.policy = None;
            let n = self.caps.values().filter(|c| c.by == CapBy::Policy).count();
            self.status(Ok(format!(
                "automatic policy off; its {n} cap(s) stay until lifted (u) or quit"
            )));
        } else if self.settings.mechanism.is_none() {
            self.status(Err("read-only: caps unavailable (see the log)".into()));
        } else if let Some(a) = self.settings.auto_settings() {
            self.settings.auto = true;
            let msg = format!(
                "automatic policy on: goal {:.1}s, floor {:.1}%, headroom {:.0}%",
                a.target.as_secs_f64(),
                a.floor_pct,
                a.headroom * 100.0
            );
            self.status(Ok(msg));
        } else {
            self.status(Err(
                "the automatic policy needs the link bandwidth: press b".into(),
            ));
        }
    }

    fn step_interval(&mut self, dir: i32) -> Option<Command> {
        let now = self.settings.interval.as_millis() as u64;
        let next = if dir > 0 {
            INTERVALS_MS.iter().copied().find(|&m| m > now)
        } else {
            INTERVALS_MS.iter().rev().copied().find(|&m| m < now)
        };
        let Some(ms) = next else {
            self.status(Err(format!(
                "interval already at the {} end ({})",
                if dir > 0 { "longest" } else { "shortest" },
                immp_model::units::fmt_duration(self.settings.interval)
            )));
            return None;
        };
        let d = Duration::from_millis(ms);
        self.settings.interval = d;
        self.status(Ok(format!(
            "interval {}",
            immp_model::units::fmt_duration(d)
        )));
        Some(Command::SetInterval(d))
    }

    fn ask_cap(&mut self) {
        let Some(r) = self.selected() else {
            return self.status(Err("no process selected".into()));
        };
        if r.gone_for > 0 {
            let msg = format!("PID {} has exited", r.p().pid);
            return self.status(Err(msg));
        }
        let target = (r.id(), r.p().comm.clone());
        let now = self.caps.get(&target.0).map(|c| format!("{}", c.pct));
        self.open_prompt(PromptKind::Cap, Some(target));
        if let (Some(p), Some(now)) = (&mut self.prompt, now) {
            p.buf = now;
        }
    }

    fn lift_selected(&mut self) -> Option<Command> {
        let Some(r) = self.selected() else {
            self.status(Err("no process selected".into()));
            return None;
        };
        let (id, comm) = (r.id(), r.p().comm.clone());
        match self.caps.get(&id) {
            None => {
                let msg = format!(
                    "PID {} ({}) is not capped by this immp",
                    id.pid,
                    clean(&comm)
                );
                self.status(Err(msg));
                None
            }
            Some(_) => {
                // The operator overrules the policy for good (on now or later): it will not
                // cap this process again; `c` caps it by hand.
                self.exempt.insert(id);
                Some(Command::Lift { id, comm })
            }
        }
    }

    fn open_prompt(&mut self, kind: PromptKind, target: Option<(ProcId, String)>) {
        self.prompt = Some(Prompt {
            kind,
            buf: String::new(),
            target,
        });
    }

    fn prompt_key(&mut self, k: KeyEvent) -> Option<Command> {
        let p = self.prompt.as_mut()?;
        match k.code {
            KeyCode::Esc => {
                if p.kind == PromptKind::Filter {
                    self.filter.clear();
                    self.keep_selection();
                }
                self.prompt = None;
            }
            KeyCode::Enter => {
                let p = self.prompt.take()?;
                return self.submit(p);
            }
            KeyCode::Backspace => {
                p.buf.pop();
            }
            // Printable characters only: a prompt never holds a control character.
            KeyCode::Char(c) if !c.is_control() && p.buf.chars().count() < 64 => p.buf.push(c),
            _ => {}
        }
        if let Some(p) = self
            .prompt
            .as_ref()
            .filter(|p| p.kind == PromptKind::Filter)
        {
            self.filter = p.buf.clone();
            self.keep_selection();
        }
        None
    }

    fn submit(&mut self, p: Prompt) -> Option<Command> {
        match p.kind {
            PromptKind::Filter => {
                self.filter = p.buf;
                self.keep_selection();
                None
            }
            PromptKind::Bandwidth => {
                match parse_bandwidth(&p.buf) {
                    Ok(bw) => {
                        self.settings.bandwidth = Some(bw);
                        self.rebuild();
                        self.status(Ok(format!("link bandwidth {}", fmt_rate(bw))));
                    }
                    Err(e) => self.status(Err(format!("bandwidth: {e}"))),
                }
                None
            }
            PromptKind::Cap => {
                let (id, comm) = p.target?;
                // The same validation as `--cap`: same range, same message.
                match crate::cmd::args::cap(&p.buf) {
                    Ok(pct) => {
                        self.exempt.remove(&id);
                        Some(Command::Cap { id, comm, pct })
                    }
                    Err(e) => {
                        self.status(Err(format!("cap PID {}: {e}", id.pid)));
                        None
                    }
                }
            }
        }
    }
}

/// `HH:MM:SS` in UTC (tests; the binary shows local time).
pub fn utc_clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", s / 3600 % 24, s / 60 % 60, s % 60)
}
