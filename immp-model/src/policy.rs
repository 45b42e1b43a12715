//! Automatic caps: closed-loop control of each capped process's *measured* dirty rate against
//! the budget the migration goal leaves it.
//!
//! Each interval: the goal is a migration time (default: the knee of the time/throughput
//! frontier, `KNEE` x the time with every IMMP at the floor, within `TARGET_FACTOR` x the idle
//! guest's);
//! the predictor, fed with measured rates (each process's uncapped rate as measured before it
//! was capped, and its rate under each cap it has run under), picks the highest cap per IMMP
//! that meets the goal. A cap in force is then corrected from measurement, aiming at the
//! budget (at the knee) or just under it (at a bound), along the learned response scaled to
//! what the process does under its cap now:
//! tightened at once when the process dirties far more than its budget (a whole window when
//! only a little more), loosened only after `patience` intervals in a row well under it, never
//! more than `max_changes_per_min` times a minute (its first cap aside), and lifted only when
//! the process has gone quiet. Pure: no system access; `throttle` applies the decisions.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use serde::Serialize;

use crate::{
    predict::{Link, Prediction, Writer, predict},
    snapshot::{ProcId, ProcSample, Snapshot},
    units::fmt_rate,
};

/// Default bound on the goal: a migration at most this many times as long as the idle guest's
/// (the guest may dirty half the link, T = T_idle / (1 - w/B)). The goal itself is the knee
/// below it (`KNEE`); the bound matters for writers so heavy that even the floor leaves a
/// long migration: their goal is then this bound, and immp says which floor would meet it.
pub const TARGET_FACTOR: f64 = 2.0;

/// Default goal: at most this many times the migration time with every IMMP held at the floor.
/// Along the frontier the time is flat while the writers' throughput grows (T = R0 / (B - w):
/// a writer at 10 % of the link costs 11 % more time than none, at 20 % 25 % more), then it
/// climbs ever faster; the goal is the end of the flat part. Measured from the floor, not from
/// an idle guest: the floor is the operator's statement of what each process must keep, and a
/// time the floor cannot beat is no goal at all. Why 1.1: flat is what a fixed cap of the
/// paper's size costs. In the lab cpulimit 20 % took 1.08 x a 20 % cgroup cap's time
/// and a cap stayed within 5 % of that up to 30 % (+14 % at 40 %). In ours, with every fixed
/// policy in force from the writer's start, cpulimit 20 % took 10.9 s and immp at 1.1 x took
/// 11.0 s (a 30 % cap 11.9 s); at 1.2 x immp's goal lands ~10 % past cpulimit's time. The lab
/// that picked 1.2 let the writer run 5 s uncapped before any fixed policy (~1.8 s of
/// migration that cpulimit paid and immp did not).
pub const KNEE: f64 = 1.1;

/// Default headroom: the margin for dirtying the counts miss. 15 %: round 0 comes from the
/// guest's non-zero memory and the kernel's unattributed allocations are in the guest total,
/// so the margin covers noise, not whole classes of dirtying (predictions in the lab landed
/// within 15 % of the measured migrations).
pub const DEFAULT_HEADROOM: f64 = 0.15;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoSettings {
    /// The migration link; `ram` is the guest's non-zero memory (round 0 without new pages).
    pub link: Link,
    /// Never cap below this (QoS floor), percent of one CPU.
    pub floor_pct: f64,
    /// Migration time to achieve (with `knee`, the bound on it).
    pub target: Duration,
    /// The default goal: the migration time with every IMMP at the floor, times this (and
    /// within `target`); None: `target` as given.
    pub knee: Option<f64>,
    /// Only processes dirtying at least this share of the link are capped.
    pub immp_share: f64,
    /// Share of the dirtying the counts may miss (kernel work on a process's behalf, noise):
    /// measured rates are planned as rate / (1 - headroom).
    pub headroom: f64,
    /// Intervals in a row a cap must be unneeded before it is loosened or lifted.
    pub patience: u32,
    /// At most this many cap changes per process per minute (tightening and lifting included;
    /// its first cap is not a change). Loosening leaves one of them for a tightening.
    pub max_changes_per_min: u32,
    /// Half the width of the band a measured rate is on target in, as a share of the budget.
    /// The band is centred on the budget when the goal is the knee, and lies just under it
    /// when the goal is a bound (see `aim_share`).
    pub tolerance: f64,
}

impl AutoSettings {
    /// Settings with the defaults the CLI documents.
    pub fn new(link: Link, floor_pct: f64, target: Option<Duration>) -> Self {
        Self {
            link,
            floor_pct,
            target: target.unwrap_or_else(|| default_target(&link)),
            knee: target.is_none().then_some(KNEE),
            immp_share: 0.25,
            headroom: DEFAULT_HEADROOM,
            patience: 3,
            max_changes_per_min: 3,
            tolerance: 0.1,
        }
    }

    /// Measured rates are planned as rate x this: 1 / (1 - headroom).
    pub fn margin(&self) -> f64 {
        1.0 / (1.0 - self.headroom.clamp(0.0, 0.9))
    }
}

/// The idle guest's migration time: round 0 alone.
pub fn idle_time(link: &Link) -> f64 {
    link.ram / link.bandwidth
}

/// `TARGET_FACTOR` x the idle time.
pub fn default_target(link: &Link) -> Duration {
    Duration::from_secs_f64(TARGET_FACTOR * idle_time(link))
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Action {
    Cap { cap_pct: f64 },
    Keep { cap_pct: f64 },
    Lift,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Cap { cap_pct } => write!(f, "cap {cap_pct:.1}%"),
            Action::Keep { cap_pct } => write!(f, "keep {cap_pct:.1}%"),
            Action::Lift => f.write_str("lift"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    #[serde(flatten)]
    pub action: Action,
    pub reason: String,
    /// The goal, seconds of migration.
    pub target_s: f64,
    /// The dirty rate the goal leaves this process (bytes/s, as measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_bytes_per_s: Option<f64>,
    /// Its dirty rate measured this interval (under its cap, if capped).
    pub measured_bytes_per_s: f64,
}

impl Decision {
    pub fn id(&self) -> ProcId {
        ProcId::new(self.pid, self.start_time)
    }
}

/// What the policy has learned about one process.
#[derive(Debug, Clone, Default)]
struct Track {
    /// Dirty rate while uncapped (smoothed), bytes/s, and its CPU share then.
    uncapped: Option<(f64, f64)>,
    /// Dirty rate measured under each cap it ran under: cap in tenths of a percent ->
    /// (cap, smoothed bytes/s).
    response: BTreeMap<i64, (f64, f64)>,
    /// Rates measured under the current cap since it was set (whole intervals only).
    under_cap: Vec<f64>,
    /// Intervals in a row its cap could have been looser (or lifted).
    calm: u32,
    /// Snapshot times (ms) of its cap changes (setting its first cap is none: what the rate
    /// limit stops is a cap that wanders, and a first cap counted would leave the control of
    /// a process two corrections in its first minute, when it needs them most).
    changes: Vec<u64>,
    /// It has been capped (a later cap, even after a lift, is a change).
    capped_once: bool,
    /// Sequence number of the snapshot that decided its last change: the snapshots after it
    /// measure the new cap (it is applied right after the decision).
    changed_seq: Option<u64>,
}

/// What the policy remembers between intervals.
#[derive(Debug, Clone, Default)]
pub struct PolicyState {
    tracks: BTreeMap<ProcId, Track>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub decisions: Vec<Decision>,
    pub without_caps: Prediction,
    pub with_caps: Prediction,
    pub target_s: f64,
    /// The prediction with the caps decided meets the goal.
    pub goal_met: bool,
}

const ALPHA: f64 = 0.5;

/// Intervals under a cap the control averages: one interval of a TCG guest's writer swings by
/// +-20 % (the lab's light writer under one 26 % cap: 1.5-2.5 MB/s).
const WINDOW: usize = 3;

/// Over the top of its band by more than this share, a cap is tightened after one interval; by
/// less, only once a whole `WINDOW` says so. A mild excess costs the
/// migration little, and a change spent on noise is missing when the rate really moves.
const URGENT: f64 = 0.25;

fn smooth(old: f64, new: f64) -> f64 {
    old + ALPHA * (new - old)
}

/// Records what this snapshot measured (of the processes in `only`, when given).
fn observe(
    snap: &Snapshot,
    caps: &BTreeMap<ProcId, f64>,
    st: &mut PolicyState,
    only: Option<&BTreeSet<ProcId>>,
) {
    let wanted = |p: &&ProcSample| !p.gone && only.is_none_or(|o| o.contains(&p.id()));
    for p in snap.processes.iter().filter(wanted) {
        let t = st.tracks.entry(p.id()).or_default();
        match caps.get(&p.id()) {
            None => {
                // A process born during the interval wrote its pages in less time: its first
                // rate over the whole interval understated its pace (in the lab a writer's
                // first interval said 4.2 MB/s where it did about 5.5).
                let rate = p
                    .young_s
                    .filter(|a| *a > 0.0)
                    .map_or(p.dirty_bytes_per_s, |a| {
                        p.dirty_bytes_per_s * (snap.interval_s / a).max(1.0)
                    });
                let (r, c) = t.uncapped.unwrap_or((rate, p.cpu_pct));
                let cpu = smooth(c, p.cpu_pct).max(1.0);
                t.uncapped = Some((smooth(r, rate), cpu));
                t.under_cap.clear();
            }
            // Only whole intervals under this cap tell its effect.
            Some(&cap) if t.changed_seq.is_none_or(|c| snap.seq > c) => {
                let key = (cap * 10.0).round() as i64;
                let e = t.response.entry(key).or_insert((cap, p.dirty_bytes_per_s));
                e.1 = smooth(e.1, p.dirty_bytes_per_s);
                t.under_cap.push(p.dirty_bytes_per_s);
                if t.under_cap.len() > WINDOW {
                    t.under_cap.remove(0);
                }
            }
            Some(_) => {}
        }
    }
    // Processes neither live in the snapshot nor capped are forgotten.
    let live: Vec<ProcId> = snap
        .processes
        .iter()
        .filter(|p| !p.gone)
        .map(|p| p.id())
        .collect();
    if only.is_some() {
        return; // a short snapshot's absentees were only quiet for a moment
    }
    // A process lifted within the minute is remembered with its changes: a quiet process
    // drops out of the snapshots, and forgetting it would let lift/recap cycles go unlimited.
    let now = snap.time_unix_ms;
    st.tracks.retain(|id, t| {
        live.contains(id) || caps.contains_key(id) || t.changes.iter().any(|&c| c + 60_000 > now)
    });
}

/// The guest as the predictor sees it: each writer from what was measured of it, the rest as
/// one background writer, all inflated by the headroom.
struct Planner {
    writers: Vec<(ProcId, Writer, f64)>,
    agent: Option<u32>,
    background: Writer,
    link: Link,
    target: Duration,
}

impl Planner {
    fn new(
        snap: &Snapshot,
        s: &AutoSettings,
        caps: &BTreeMap<ProcId, f64>,
        st: &PolicyState,
    ) -> Self {
        let margin = s.margin();
        let page = snap.page_size as f64;
        let mut writers = Vec::new();
        let mut named = 0.0;
        for p in snap.processes.iter().filter(|p| !p.gone) {
            let cap = caps.get(&p.id()).copied();
            if p.dirty_bytes_per_s <= 0.0 && cap.is_none() {
                continue;
            }
            named += p.dirty_bytes_per_s;
            let t = st.tracks.get(&p.id()).cloned().unwrap_or_default();
            writers.push((
                p.id(),
                writer_of(p, &t, cap, margin, page),
                p.dirty_bytes_per_s,
            ));
        }
        // Dirtying not attributed to a live process: short-lived ones, and what the kernel
        // allocated for nobody in particular (its estimate when there is one).
        let guest = snap
            .totals
            .dirty_bytes_per_s
            .max(snap.totals.guest_dirty_bytes_per_s);
        let rest = (guest - named).max(0.0) * margin;
        Self {
            writers,
            agent: snap.agent_pid,
            background: Writer::linear(rest, s.link.memory, 0.0),
            link: s.link,
            target: s.target,
        }
    }

    /// The prediction with these caps (and, optionally, one process dirtying at a fixed rate).
    fn eval(&self, caps: &BTreeMap<ProcId, f64>, fixed: Option<(ProcId, f64)>) -> Prediction {
        let mut v: Vec<(Writer, Option<f64>)> = self
            .writers
            .iter()
            .map(|(id, w, _)| match fixed.filter(|f| f.0 == *id) {
                // At another rate the same mix of first touches and rewrites: its growth
                // scales too (without it a writer in its first pass looked bounded by its RSS
                // and got a budget above its uncapped rate).
                Some((_, rate)) => {
                    let growth = if w.rate > 0.0 {
                        w.growth * rate / w.rate
                    } else {
                        0.0
                    };
                    (
                        Writer {
                            growth,
                            ..Writer::linear(rate, w.working_set, 0.0)
                        },
                        None,
                    )
                }
                None => (w.clone(), caps.get(id).copied()),
            })
            .collect();
        v.push((self.background.clone(), None));
        predict(&self.link, &v)
    }

    fn meets(&self, p: &Prediction) -> bool {
        p.within(Some(self.target))
    }

    fn writer(&self, id: ProcId) -> Option<&Writer> {
        self.writers.iter().find(|w| w.0 == id).map(|w| &w.1)
    }

    /// The highest rate `id` may dirty (in planned units) with the others under `caps` while
    /// the goal is met; 0 when nothing would do.
    fn budget(&self, id: ProcId, caps: &BTreeMap<ProcId, f64>) -> f64 {
        let ok = |r: f64| self.meets(&self.eval(caps, Some((id, r))));
        if !ok(0.0) {
            return 0.0;
        }
        let (mut lo, mut hi) = (0.0, self.link.bandwidth);
        if ok(hi) {
            return hi;
        }
        for _ in 0..30 {
            let mid = (lo + hi) / 2.0;
            if ok(mid) { lo = mid } else { hi = mid }
        }
        lo
    }
}

/// The predictor's view of one process: uncapped rate and CPU as measured before any cap (or,
/// never seen uncapped, extrapolated in proportion from what it does under its cap), and its
/// measured response to caps.
fn writer_of(p: &ProcSample, t: &Track, cap: Option<f64>, margin: f64, page: f64) -> Writer {
    let (rate, cpu) = match (t.uncapped, cap) {
        (Some(u), _) => u,
        (None, None) => (p.dirty_bytes_per_s, p.cpu_pct.max(1.0)),
        (None, Some(c)) => (p.dirty_bytes_per_s * 100.0 / c.max(0.1), 100.0),
    };
    Writer {
        rate: rate * margin,
        working_set: p.rss_bytes.max(4096) as f64,
        // The share of its writes that touch new pages, measured now, applied to its
        // uncapped rate (a rate measured under a cap would be slowed by the cap twice), with
        // the same headroom as the rate: it feeds both later rounds and round 0's new pages.
        growth: rate * margin * new_share(p, page),
        cpu_pct: cpu,
        curve: p
            .curve
            .iter()
            .map(|c| (c.window_s, c.pages * page * margin))
            .collect(),
        response: t.response.values().map(|(c, r)| (*c, r * margin)).collect(),
    }
}

/// The share of a process's dirtying that touches pages for the first time (0..=1).
fn new_share(p: &ProcSample, page: f64) -> f64 {
    if p.dirty_bytes_per_s > 0.0 {
        (p.rates.write_new * page / p.dirty_bytes_per_s).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// Caps from `top` down to `floor`: whole points above 10 %, half points below.
fn caps_down(top: f64, floor: f64) -> impl Iterator<Item = f64> {
    let mut c = top.floor().max(floor);
    let mut first = true;
    std::iter::from_fn(move || {
        if !first {
            c -= if c > 10.0 { 1.0 } else { 0.5 };
        }
        first = false;
        (c >= floor - 1e-9).then_some(c)
    })
}

/// The IMMPs a cap would help, worst first.
fn blamed<'a>(pl: &'a Planner, s: &AutoSettings) -> Vec<&'a (ProcId, Writer, f64)> {
    let mut blamed: Vec<&(ProcId, Writer, f64)> = pl
        .writers
        .iter()
        // immp's own dirtying counts in the prediction, but immp never caps itself.
        .filter(|(id, _, _)| Some(id.pid) != pl.agent)
        .filter(|(_, w, _)| w.rate >= s.immp_share * s.link.bandwidth)
        // A cap at or above the CPU a process uses changes nothing.
        .filter(|(_, w, _)| w.cpu_pct > s.floor_pct)
        .collect();
    blamed.sort_by(|a, b| b.1.rate.total_cmp(&a.1.rate));
    blamed
}

/// This interval's goal.
struct Goal {
    time: Duration,
    /// What it is, for the decision log.
    why: String,
    /// The knee (a point on the frontier, `tolerance` or more below the bound), not a bound:
    /// the operator's `--target`, or the default bound where the knee lies beyond it.
    knee: bool,
}

/// This interval's goal: `target` as given, or (default) the knee: `KNEE` x the time with
/// every IMMP at the floor, within the bound `target`.
fn goal(pl: &Planner, s: &AutoSettings) -> Goal {
    let bound = s.target;
    let as_bound = |why: String| Goal {
        time: bound,
        why,
        knee: false,
    };
    let Some(k) = s.knee else {
        return as_bound(format!("goal {:.1}s", bound.as_secs_f64()));
    };
    let at_floor: BTreeMap<ProcId, f64> = blamed(pl, s)
        .iter()
        .map(|(id, _, _)| (*id, s.floor_pct))
        .collect();
    let t_floor = (!at_floor.is_empty())
        .then(|| pl.eval(&at_floor, None).total_s)
        .flatten();
    match t_floor {
        Some(t) if t * k < bound.as_secs_f64() => Goal {
            time: Duration::from_secs_f64(t * k),
            why: format!(
                "goal {:.1}s ({k} x {t:.1}s with the IMMPs at the {:.0}% floor; bound {:.1}s)",
                t * k,
                s.floor_pct,
                bound.as_secs_f64()
            ),
            // Held on its budget only with room to the bound (see `aim_share`): a knee just
            // under the bound is aimed at as a bound is.
            knee: t * k <= bound.as_secs_f64() * (1.0 - s.tolerance),
        },
        _ => as_bound(format!("goal {:.1}s (the bound)", bound.as_secs_f64())),
    }
}

/// What the goal asks of each IMMP, worst first: the highest cap meeting it with the caps
/// chosen before; the first that meets it ends the search. Returns caps and reasons.
fn desired_caps(
    pl: &Planner,
    s: &AutoSettings,
) -> (BTreeMap<ProcId, f64>, BTreeMap<ProcId, String>) {
    let mut desired = BTreeMap::new();
    let mut why = BTreeMap::new();
    let blamed = blamed(pl, s);
    if pl.meets(&pl.eval(&desired, None)) {
        return (desired, why);
    }
    for (id, w, _) in blamed {
        let load = format!(
            "dirties {} uncapped ({:.0}% of the link) at {:.0}% CPU",
            fmt_rate(w.rate),
            w.rate / s.link.bandwidth * 100.0,
            w.cpu_pct
        );
        let mut trial = desired.clone();
        let mut try_cap = |c: f64| {
            trial.insert(*id, c);
            let p = pl.eval(&trial, None);
            pl.meets(&p).then_some((c, p))
        };
        if let Some((c, p)) = caps_down(w.cpu_pct.min(6400.0), s.floor_pct).find_map(&mut try_cap) {
            desired.insert(*id, c);
            why.insert(
                *id,
                format!(
                    "{load}; highest cap meeting the goal: {c:.1}% -> predicted {} in {} rounds",
                    fmt_secs(p.total_s),
                    p.rounds
                ),
            );
            break;
        }
        let needed = caps_down(s.floor_pct - 0.5, 0.5)
            .find_map(&mut try_cap)
            .map(|(c, _)| c);
        desired.insert(*id, s.floor_pct);
        let at_floor = pl.eval(
            &{
                let mut t = desired.clone();
                t.insert(*id, s.floor_pct);
                t
            },
            None,
        );
        why.insert(
            *id,
            format!(
                "{load}; the {:.1}% floor prevents the goal (predicted {} at the floor): {}",
                s.floor_pct,
                fmt_secs(at_floor.total_s),
                needed.map_or("no cap of this process alone would meet it".into(), |c| {
                    format!("a floor of {c:.1}% would meet it")
                })
            ),
        );
    }
    (desired, why)
}

fn changes_last_minute(t: &Track, now_ms: u64) -> u32 {
    t.changes.iter().filter(|&&c| c + 60_000 > now_ms).count() as u32
}

/// Everything the control of one capped process needs.
struct Ctl<'a> {
    s: &'a AutoSettings,
    now_ms: u64,
    want: f64,
    have: f64,
    budget: f64,
    why: &'a str,
    /// The goal is the knee, not a bound (`Goal::knee`).
    knee: bool,
    /// The predictor's view of the process (its learned response to caps), if it has one.
    writer: Option<&'a Writer>,
}

/// The share of its budget a capped process is held at. At a bound, `tolerance` under it: a
/// loop that holds a process *at* its budget lands the migration on its goal, and the
/// predictor's error (-5..+2 % in the lab) and the rate's noise would miss a bound one time
/// in two (the heavy writer at 5 %: 16.6 s against its goal of 16.4 s). At the knee, the
/// budget itself: the knee is already a choice on the flat part of the frontier, at least
/// `tolerance` within the bound (`Goal::knee`), and aiming under it as well stacked a second
/// margin on the first (the lab's
/// light writer sat at 0.8-0.9 x its budget, 1.1 MB/s where a fixed 30 % cap gave 1.24 at
/// the same migration time).
fn aim_share(c: &Ctl) -> f64 {
    if c.knee { 1.0 } else { 1.0 - c.s.tolerance }
}

/// The band a measured rate is on target in: `tolerance` of the budget either side of the aim.
fn band(c: &Ctl) -> (f64, f64) {
    let aim = aim_share(c);
    (
        c.budget * (aim - c.s.tolerance),
        c.budget * (aim + c.s.tolerance),
    )
}

/// The factor from the rate measured to the one aimed at (`aim_share` of the budget).
fn aim_ratio(c: &Ctl, measured: f64) -> f64 {
    c.budget * aim_share(c) / measured.max(1.0)
}

/// The cap within `lo..=hi` that brings a process dirtying `measured` under `have` to its
/// budget, aiming under it (`aim_ratio`). The shape of its response is the one
/// learned (a writer whose rate falls faster than its CPU share is stepped more gently than
/// in proportion); its level is what it does under its cap *now*: the learned points mix
/// older intervals, and a TCG guest's writer slows under the same cap once a migration takes
/// host CPU (the lab's light writer: 2.4 -> 1.7 MB/s under 26 %).
fn aimed_cap(c: &Ctl, measured: f64, lo: f64, hi: f64) -> f64 {
    let ratio = aim_ratio(c, measured);
    let speed = |cap: f64| c.writer.map_or(cap, |w| w.speed(Some(cap)));
    let goal = speed(c.have) * ratio;
    // A budget of nothing (or no measure of it) asks for the lowest cap allowed.
    if goal.is_nan() || goal <= 0.0 || speed(lo) >= goal {
        return lo;
    }
    if speed(hi) <= goal {
        return hi;
    }
    // The response is non-decreasing in the cap: bisect for the highest cap at the aim.
    let (mut a, mut b) = (lo, hi);
    for _ in 0..40 {
        let m = (a + b) / 2.0;
        if speed(m) <= goal { a = m } else { b = m }
    }
    a
}

/// Corrects a cap in force from its measured rate against its budget.
/// Over budget: a local correction from what the process really does under its cap (no
/// model involved), unless it is at the floor or has had its changes this minute.
fn over_budget(c: &Ctl, measured: f64, room: bool, report: String) -> (Action, String) {
    let s = c.s;
    let keep = Action::Keep { cap_pct: c.have };
    if c.have <= s.floor_pct + 1e-9 {
        return (
            keep,
            format!("{report}; at the floor, which prevents the goal"),
        );
    }
    if !room {
        let n = s.max_changes_per_min;
        return (
            keep,
            format!("{report}; over budget, but {n} changes this minute already"),
        );
    }
    // From measurement alone, like loosening: clamped to the model's cap, a cap loosened past
    // a lagging model would snap back below its budget and flap.
    let next = aimed_cap(c, measured, s.floor_pct, c.have);
    let cap = Action::Cap {
        cap_pct: round_cap(next),
    };
    (cap, format!("{report}: over budget, tightened"))
}

fn control(c: &Ctl, t: &mut Track) -> (Action, String) {
    let s = c.s;
    let settled = !t.under_cap.is_empty();
    let measured = t.under_cap.iter().sum::<f64>() / t.under_cap.len().max(1) as f64;
    let used = changes_last_minute(t, c.now_ms);
    let room = used < s.max_changes_per_min;
    let report = format!(
        "measured {} under {:.1}% against a budget of {}",
        fmt_rate(measured),
        c.have,
        fmt_rate(c.budget)
    );
    let (low, high) = band(c);
    if settled && measured > high {
        t.calm = 0;
        let urgent = measured > high * (1.0 + URGENT);
        if urgent || t.under_cap.len() >= WINDOW {
            return over_budget(c, measured, room, report);
        }
        return (
            Action::Keep { cap_pct: c.have },
            format!(
                "{report}; over budget ({}/{WINDOW} intervals before tightening)",
                t.under_cap.len()
            ),
        );
    }
    if !settled && c.want < c.have - 0.5 {
        // Just set and the model already asks for less (another writer grew): tighten.
        return (
            Action::Cap { cap_pct: c.want },
            format!("{}; tightened", c.why),
        );
    }
    if settled && measured <= (c.budget * 0.1).max(4096.0) {
        // Gone quiet under its cap: a cap that holds nothing back is lifted (and set again
        // from a fresh uncapped measurement if the process comes back).
        t.calm += 1;
        if t.calm >= s.patience && room {
            return (
                Action::Lift,
                format!("{report}: quiet for {} intervals, cap lifted", s.patience),
            );
        }
        return (
            Action::Keep { cap_pct: c.have },
            format!(
                "{report}; quiet ({}/{} intervals before lifting)",
                t.calm.min(s.patience),
                s.patience
            ),
        );
    }
    // Loosened on what it measures, not on the model's cap (`want`): the model maps caps to
    // rates through the learned response, which lags a process that has slowed.
    if settled && measured < low {
        t.calm += 1;
        let keep = |why: String| (Action::Keep { cap_pct: c.have }, format!("{report}; {why}"));
        if t.calm < s.patience {
            return keep(format!(
                "under budget ({}/{} intervals before loosening)",
                t.calm, s.patience
            ));
        }
        // Never above the CPU it used uncapped (such a cap holds nothing back), and only
        // with a change left after it for a tightening should the looser cap prove too loose.
        let top = (c.have * 1.5)
            .min(c.have + 20.0)
            .min(c.writer.map_or(f64::INFINITY, |w| w.cpu_pct));
        let top = top.max(c.have);
        let shaped = aimed_cap(c, measured, c.have, top);
        // The learned shape alone under-steps a writer that slowed everywhere (its uncapped
        // point is from before); proportion alone over-steps one whose rate falls faster
        // than its CPU. Their geometric mean does neither by much.
        let proportional = (c.have * aim_ratio(c, measured)).min(top);
        let next = round_cap((shaped * proportional).sqrt());
        if next <= c.have {
            return keep("under budget, but no looser cap by a whole step would stay in it".into());
        }
        if used + 1 >= s.max_changes_per_min {
            return keep(format!(
                "under budget; loosening waits for a change to spare ({used} this minute, one \
                 kept for a tightening)"
            ));
        }
        t.calm = 0;
        return (
            Action::Cap { cap_pct: next },
            format!(
                "{report}: under budget for {} intervals, loosened",
                s.patience
            ),
        );
    }
    t.calm = 0;
    (
        Action::Keep { cap_pct: c.have },
        format!("{report}: on target"),
    )
}

fn round_cap(c: f64) -> f64 {
    if c > 10.0 {
        c.floor()
    } else {
        (c * 2.0).floor() / 2.0
    }
    .max(0.5)
}

/// A cap the goal no longer asks for: lifted only once its process has gone quiet (dirtying
/// under a tenth of its budget) for `patience` intervals, or is gone. Its uncapped rate is
/// what made it an IMMP; lifting while it still writes would bring that rate back.
fn release(c: &Ctl, t: &mut Track, measured: f64, gone: bool) -> (Action, String) {
    if gone {
        return (Action::Lift, "process is gone".into());
    }
    let quiet = measured <= (c.budget * 0.1).max(4096.0);
    t.calm = if quiet { t.calm + 1 } else { 0 };
    let room = changes_last_minute(t, c.now_ms) < c.s.max_changes_per_min;
    if t.calm >= c.s.patience && room {
        return (
            Action::Lift,
            format!(
                "quiet for {} intervals ({}): cap lifted",
                c.s.patience,
                fmt_rate(measured)
            ),
        );
    }
    let why = if quiet {
        format!(
            "quiet ({}): {}/{} intervals before lifting",
            fmt_rate(measured),
            t.calm,
            c.s.patience
        )
    } else {
        format!(
            "still dirties {}: kept (lifting would bring back its uncapped rate)",
            fmt_rate(measured)
        )
    };
    (Action::Keep { cap_pct: c.have }, why)
}

/// Remembers a change (for the rate limit and for which measurements count) and keeps the
/// caps in force up to date for the next process's budget.
fn record(
    a: &Action,
    t: &mut Track,
    snap: &Snapshot,
    id: ProcId,
    in_force: &mut BTreeMap<ProcId, f64>,
) {
    match a {
        Action::Cap { cap_pct } => {
            if t.capped_once {
                t.changes.push(snap.time_unix_ms);
            }
            t.capped_once = true;
            t.changes.retain(|&c| c + 60_000 > snap.time_unix_ms);
            t.changed_seq = Some(snap.seq);
            t.under_cap.clear();
            in_force.insert(id, *cap_pct);
        }
        Action::Lift => {
            t.changes.push(snap.time_unix_ms);
            t.changed_seq = Some(snap.seq);
            t.uncapped = None; // measured afresh if it comes back
            t.calm = 0;
            in_force.remove(&id);
        }
        Action::Keep { .. } => {}
    }
}

pub fn decide(
    snap: &Snapshot,
    s: &AutoSettings,
    caps: &BTreeMap<ProcId, f64>,
    st: &mut PolicyState,
) -> Outcome {
    // An early snapshot (taken between intervals for a new writer) is short: it decides on
    // the processes the policy has not seen yet; the others' tracks and caps wait for a whole
    // interval (patience and the window under a cap count intervals, and a short window's
    // rates swing more).
    let fresh: BTreeSet<ProcId> = snap
        .processes
        .iter()
        .filter(|p| !p.gone)
        .map(ProcSample::id)
        .filter(|id| !st.tracks.contains_key(id) && !caps.contains_key(id))
        .collect();
    observe(snap, caps, st, snap.early.then_some(&fresh));
    let mut pl = Planner::new(snap, s, caps, st);
    let Goal {
        time: target,
        why: goal_why,
        knee,
    } = goal(&pl, s);
    pl.target = target;
    let s = &AutoSettings { target, ..*s };
    let without_caps = pl.eval(&BTreeMap::new(), None);
    let (desired, why) = desired_caps(&pl, s);
    let margin = s.margin();
    let sample = |id: &ProcId| snap.processes.iter().find(|p| p.id() == *id);
    let mut in_force: BTreeMap<ProcId, f64> = caps.clone();
    for (id, c) in &desired {
        in_force.entry(*id).or_insert(*c);
    }
    let mut decisions = Vec::new();
    let ids: Vec<ProcId> = desired
        .keys()
        .chain(caps.keys())
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for id in ids {
        if snap.early && !fresh.contains(&id) {
            continue;
        }
        let p = sample(&id);
        let measured = p.map_or(0.0, |p| p.dirty_bytes_per_s);
        let budget = pl
            .writer(id)
            .map_or(f64::INFINITY, |_| pl.budget(id, &in_force))
            / margin;
        let t = st.tracks.entry(id).or_default();
        let why_id = why.get(&id).map_or("", String::as_str);
        let (action, reason) = match (desired.get(&id), caps.get(&id)) {
            (Some(&want), None) => (Action::Cap { cap_pct: want }, why_id.to_string()),
            (want, Some(&have)) => {
                let c = Ctl {
                    s,
                    now_ms: snap.time_unix_ms,
                    want: want.copied().unwrap_or(have),
                    have,
                    budget,
                    why: why_id,
                    knee,
                    writer: pl.writer(id),
                };
                if want.is_some() {
                    control(&c, t)
                } else {
                    release(&c, t, measured, p.is_some_and(|p| p.gone))
                }
            }
            (None, None) => continue,
        };
        record(&action, t, snap, id, &mut in_force);
        let reason = format!("{reason}; {goal_why}");
        decisions.push(Decision {
            pid: id.pid,
            start_time: id.start_time,
            comm: p.map(|p| p.comm.clone()).unwrap_or_default(),
            action,
            reason,
            target_s: s.target.as_secs_f64(),
            budget_bytes_per_s: budget.is_finite().then_some(budget),
            measured_bytes_per_s: measured,
        });
    }
    let with_caps = pl.eval(&in_force, None);
    Outcome {
        goal_met: pl.meets(&with_caps),
        decisions,
        without_caps,
        with_caps,
        target_s: s.target.as_secs_f64(),
    }
}

pub(crate) fn fmt_secs(s: Option<f64>) -> String {
    s.map_or("no convergence".into(), |s| format!("{s:.1}s"))
}

/// The predictor's view of one process without any history (for `impact`): its measured rate
/// and CPU, a cap assumed to slow it in proportion.
pub fn writer_for(p: &ProcSample, page: f64) -> Writer {
    writer_of(p, &Track::default(), None, 1.0, page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{proc_, snap};

    const MB: f64 = 1e6;

    /// The lab's link: 100 Mbit/s, 96 MB sent by an idle guest (7.7 s). The goal is the bound
    /// alone (the mechanics below do not depend on where it comes from; the knee has tests of
    /// its own).
    fn settings() -> AutoSettings {
        AutoSettings {
            knee: None,
            ..knee_settings()
        }
    }

    /// As the CLI's defaults have it: the goal is the knee below the bound.
    fn knee_settings() -> AutoSettings {
        let link = Link::new(12.5e6, 96e6, Duration::from_millis(300));
        AutoSettings {
            headroom: 0.0,
            ..AutoSettings::new(link, 15.0, None)
        }
    }

    fn writer(pid: u32, bytes_per_s: f64, cpu: f64) -> ProcSample {
        let mut p = proc_(pid, bytes_per_s / 4096.0, cpu);
        p.rss_bytes = 200 << 20;
        p
    }

    fn at(mut s: Snapshot, t_s: u64) -> Snapshot {
        s.time_unix_ms = 1_000_000 + t_s * 1000;
        s.seq = t_s;
        s
    }

    fn cap_of(o: &Outcome, pid: u32) -> Option<f64> {
        o.decisions
            .iter()
            .find(|d| d.pid == pid)
            .and_then(|d| match d.action {
                Action::Cap { cap_pct } | Action::Keep { cap_pct } => Some(cap_pct),
                Action::Lift => None,
            })
    }

    /// A young writer in its first pass over a buffer (every write a new page, 4 MB resident
    /// so far): its budget is the rate the goal allows, not "anything" as if its RSS bounded
    /// each round (the lab's light writer got 7.7 MB/s of budget at 6.2 MB/s uncapped).
    #[test]
    fn a_first_pass_writer_gets_a_budget_below_its_rate() {
        let s = AutoSettings {
            target: Duration::from_secs_f64(1.5 * 7.68),
            ..settings()
        };
        let mut p = proc_(7, 6e6 / 4096.0, 90.0);
        p.rss_bytes = 4 << 20;
        let mut st = PolicyState::default();
        let o = decide(&at(snap(vec![p]), 1), &s, &BTreeMap::new(), &mut st);
        let d = o.decisions.iter().find(|d| d.pid == 7).expect("a decision");
        let budget = d.budget_bytes_per_s.expect("a budget");
        // Goal 1.5 x 7.68 s: the guest may dirty a third of the link, 4.2 MB/s, first touches
        // and the headroom included.
        assert!(budget > 2.5e6 && budget < 5e6, "budget {budget}");
        assert!(budget < 6e6, "below its uncapped 6 MB/s: {budget}");
        assert!(cap_of(&o, 7).is_some_and(|c| c < 75.0), "{d:?}");
    }

    /// A writer born half-way through the interval wrote its pages in half the interval: its
    /// pace uncapped, which every later cap is planned from, is twice its interval's rate.
    #[test]
    fn a_writer_born_during_the_interval_is_anchored_on_its_own_pace() {
        let mut st = PolicyState::default();
        let mut young = writer(7, 3e6, 90.0);
        young.young_s = Some(0.5);
        let s = snap(vec![young]);
        decide(&at(s, 1), &settings(), &BTreeMap::new(), &mut st);
        let (rate, _) = st.tracks[&ProcId::new(7, 1007)].uncapped.expect("tracked");
        assert!((rate - 6e6).abs() < 1.0, "anchored at {rate}, not 3 MB/s");
        // Its next, whole interval is what it is.
        let mut st = PolicyState::default();
        decide(
            &at(snap(vec![writer(7, 3e6, 90.0)]), 1),
            &settings(),
            &BTreeMap::new(),
            &mut st,
        );
        let (rate, _) = st.tracks[&ProcId::new(7, 1007)].uncapped.expect("tracked");
        assert!((rate - 3e6).abs() < 1.0, "{rate}");
    }

    /// An early snapshot (a new writer seen between intervals) caps the newcomer, and leaves
    /// the capped process alone: a short window's rate of it (here far over its budget) is
    /// neither a correction nor one of the intervals its control averages.
    #[test]
    fn an_early_snapshot_decides_on_new_processes_only() {
        let mut st = PolicyState::default();
        let s = settings();
        let o = decide(
            &at(snap(vec![writer(1, 9.0 * MB, 90.0)]), 1),
            &s,
            &BTreeMap::new(),
            &mut st,
        );
        let first = cap_of(&o, 1).expect("capped");
        let caps = BTreeMap::from([(ProcId::new(1, 1001), first)]);
        let mut e = at(
            snap(vec![writer(1, 9.0 * MB, 90.0), writer(2, 9.0 * MB, 90.0)]),
            2,
        );
        e.early = true;
        e.interval_s = 0.25;
        let o = decide(&e, &s, &caps, &mut st);
        assert!(
            cap_of(&o, 2).is_some(),
            "the newcomer is capped: {:?}",
            o.decisions
        );
        assert!(o.decisions.iter().all(|d| d.pid != 1), "{:?}", o.decisions);
        assert!(st.tracks[&ProcId::new(1, 1001)].under_cap.is_empty());
        // The same rates in a whole interval: the capped writer is over its budget, tightened.
        let mut caps = caps;
        caps.insert(ProcId::new(2, 1002), cap_of(&o, 2).unwrap_or(15.0));
        let o = decide(
            &at(
                snap(vec![writer(1, 9.0 * MB, 90.0), writer(2, 9.0 * MB, 90.0)]),
                3,
            ),
            &s,
            &caps,
            &mut st,
        );
        assert!(
            cap_of(&o, 1).is_some_and(|c| c < first),
            "tightened from {first}: {:?}",
            o.decisions
        );
    }

    /// Under a cap a first-pass writer's growth is its uncapped rate times the share of new
    /// pages, not the capped figure (which the cap would slow a second time).
    #[test]
    fn growth_under_a_cap_comes_from_the_uncapped_rate() {
        let mut p = proc_(5, 2e6 / 4096.0, 20.0); // all new pages, 2 MB/s under a 20 % cap
        p.rss_bytes = 4 << 20;
        let t = Track {
            uncapped: Some((10e6, 100.0)),
            ..Track::default()
        };
        let w = writer_of(&p, &t, Some(20.0), 1.0, 4096.0);
        assert_eq!(w.rate, 10e6);
        assert_eq!(w.growth, 10e6);
        // In 5 s under the cap it touches 5 s x 10 MB/s x 0.2 of new pages, plus its RSS.
        assert!((w.dirtied(5.0, Some(20.0)) - 10e6).abs() < 1.0);
    }

    /// immp's own dirtying counts in the prediction but immp never caps itself.
    #[test]
    fn the_agent_is_never_capped() {
        let s = settings();
        let mut snap = snap(vec![writer(3, 30e6, 90.0)]);
        snap.agent_pid = Some(3);
        let o = decide(
            &at(snap, 1),
            &s,
            &BTreeMap::new(),
            &mut PolicyState::default(),
        );
        assert!(o.decisions.is_empty(), "{:?}", o.decisions);
        assert!(!o.without_caps.converges, "its 30 MB/s still counts");
    }

    /// The default goal is the knee: 1.2 x the time with the IMMP at the floor, below the
    /// bound; the cap is the highest that meets it, one point more would not.
    #[test]
    fn the_default_goal_is_the_knee_of_the_frontier_below_the_bound() {
        let s = knee_settings();
        let o = decide(
            &at(snap(vec![writer(1, 9.0 * MB, 90.0)]), 1),
            &s,
            &BTreeMap::new(),
            &mut PolicyState::default(),
        );
        let w = Writer::linear(9.0 * MB, (200 << 20) as f64, 90.0);
        let t_at = |cap: f64| {
            predict(&s.link, &[(w.clone(), Some(cap))])
                .total_s
                .expect("converges")
        };
        let knee = KNEE * t_at(15.0);
        assert!(knee < s.target.as_secs_f64(), "the knee is below the bound");
        assert!((o.target_s - knee).abs() < 0.01, "{} vs {knee}", o.target_s);
        let cap = cap_of(&o, 1).expect("capped");
        assert!(t_at(cap) <= knee && t_at(cap + 1.0) > knee, "cap {cap}");
        let why = &o.decisions[0].reason;
        assert!(why.contains("with the IMMPs at the 15% floor"), "{why}");
    }

    /// A writer so heavy that the floor alone leaves a long migration: its goal is the bound,
    /// not a knee beyond it.
    #[test]
    fn a_heavy_writer_s_goal_is_the_bound() {
        let s = knee_settings();
        let o = decide(
            &at(snap(vec![writer(1, 60.0 * MB, 95.0)]), 1),
            &s,
            &BTreeMap::new(),
            &mut PolicyState::default(),
        );
        assert!((o.target_s - s.target.as_secs_f64()).abs() < 1e-9);
        assert!(o.decisions[0].reason.contains("(the bound)"));
    }

    #[test]
    fn the_default_goal_is_a_multiple_of_the_idle_migration() {
        let s = settings();
        assert!((idle_time(&s.link) - 7.68).abs() < 0.01);
        assert!((s.target.as_secs_f64() - 7.68 * TARGET_FACTOR).abs() < 0.01);
    }

    #[test]
    fn an_idle_guest_gets_no_caps() {
        let s = at(snap(vec![writer(1, 10_000.0, 3.0)]), 1);
        let o = decide(
            &s,
            &settings(),
            &BTreeMap::new(),
            &mut PolicyState::default(),
        );
        assert!(o.decisions.is_empty());
        assert!(o.goal_met);
    }

    #[test]
    fn an_immp_gets_the_highest_cap_that_meets_the_goal() {
        let s = at(
            snap(vec![writer(1, 9.0 * MB, 90.0), writer(2, 50_000.0, 2.0)]),
            1,
        );
        let o = decide(
            &s,
            &settings(),
            &BTreeMap::new(),
            &mut PolicyState::default(),
        );
        assert!(
            !o.without_caps.within(Some(settings().target)),
            "uncapped misses the goal"
        );
        assert_eq!(o.decisions.len(), 1, "{:?}", o.decisions);
        let cap = cap_of(&o, 1).unwrap();
        assert!(o.goal_met, "{o:?}");
        // One point more would miss it: it is the highest.
        let w = Writer::linear(9.0 * MB, (200 << 20) as f64, 90.0);
        let bg = Writer::linear(50_000.0, (200 << 20) as f64, 2.0);
        let p = predict(&settings().link, &[(w, Some(cap + 1.0)), (bg, None)]);
        assert!(!p.within(Some(settings().target)), "cap {cap}: {p:?}");
        assert!(
            o.decisions[0].reason.contains("highest cap"),
            "{}",
            o.decisions[0].reason
        );
    }

    #[test]
    fn a_floor_that_prevents_the_goal_is_said_with_the_floor_that_would_not() {
        let s = at(snap(vec![writer(1, 60.0 * MB, 95.0)]), 1);
        let o = decide(
            &s,
            &settings(),
            &BTreeMap::new(),
            &mut PolicyState::default(),
        );
        let d = &o.decisions[0];
        assert_eq!(d.action, Action::Cap { cap_pct: 15.0 });
        assert!(
            d.reason.contains("floor prevents the goal") && d.reason.contains("a floor of"),
            "{}",
            d.reason
        );
        assert!(!o.goal_met);
    }

    /// A writer whose dirty rate falls faster than its CPU share (as measured in the lab:
    /// 16-20 MB/s uncapped at 55-96 % CPU, 3.5-5 MB/s under a 24 % cap).
    fn sub_proportional(cap: Option<f64>) -> f64 {
        let c = cap.unwrap_or(90.0).min(90.0);
        18.0 * MB * (c / 90.0).powf(1.5)
    }

    /// Runs the policy against a simulated writer for `secs` one-second intervals; returns the
    /// cap each second and the decisions.
    fn simulate(
        secs: u64,
        rate: impl Fn(Option<f64>) -> f64,
        s: &AutoSettings,
    ) -> (Vec<Option<f64>>, Vec<Decision>) {
        simulate_in_time(secs, |cap, _| rate(cap), s)
    }

    /// `simulate` with a writer whose response also changes with time (second `t`).
    fn simulate_in_time(
        secs: u64,
        rate: impl Fn(Option<f64>, u64) -> f64,
        s: &AutoSettings,
    ) -> (Vec<Option<f64>>, Vec<Decision>) {
        let mut st = PolicyState::default();
        let mut caps: BTreeMap<ProcId, f64> = BTreeMap::new();
        let id = writer(1, 0.0, 0.0).id();
        let (mut trace, mut all) = (Vec::new(), Vec::new());
        for t in 1..=secs {
            let cap = caps.get(&id).copied();
            let cpu = cap.unwrap_or(90.0).min(90.0);
            let o = decide(
                &at(snap(vec![writer(1, rate(cap, t), cpu)]), t),
                s,
                &caps,
                &mut st,
            );
            for d in &o.decisions {
                match d.action {
                    Action::Cap { cap_pct } => {
                        caps.insert(d.id(), cap_pct);
                    }
                    Action::Lift => {
                        caps.remove(&d.id());
                    }
                    Action::Keep { .. } => {}
                }
            }
            all.extend(o.decisions);
            trace.push(caps.get(&id).copied());
        }
        (trace, all)
    }

    #[test]
    fn closed_loop_settles_on_the_measured_budget_without_flapping() {
        let s = settings();
        let (trace, decisions) = simulate(120, sub_proportional, &s);
        assert!(
            trace.iter().all(Option::is_some),
            "never lifted while needed: {trace:?}"
        );
        let last = trace.last().unwrap().unwrap();
        // The truth: the highest cap whose real rate meets the goal.
        let meets = |c: f64| {
            let w = Writer::linear(sub_proportional(Some(c)), (200 << 20) as f64, 0.0);
            predict(&s.link, &[(w, None)]).within(Some(s.target))
        };
        let best = (10..=90).rev().map(f64::from).find(|&c| meets(c)).unwrap();
        assert!(
            meets(last),
            "settled on {last}%, which misses the goal (best {best}%)"
        );
        assert!(
            last >= best * 0.8,
            "settled on {last}%, far below the best {best}%: {trace:?}"
        );
        // At most 3 changes in any minute.
        let changes: Vec<usize> = trace
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[0] != w[1])
            .map(|(i, _)| i)
            .collect();
        for (k, &i) in changes.iter().enumerate() {
            let in_minute = changes[k..].iter().take_while(|&&j| j < i + 60).count();
            assert!(in_minute <= 3, "changes at {changes:?}");
        }
        let d = decisions.last().unwrap();
        assert!(
            d.budget_bytes_per_s.is_some() && d.reason.contains("budget"),
            "{d:?}"
        );
    }

    /// The lab's light writer under `--auto` (full run, 6b175ad, repeat 3): capped at 26 %
    /// on its rate before the migration, it slowed under that cap once the migration began
    /// (2.4 -> 1.6-1.8 MB/s: the migration takes host CPU from a TCG guest), with +-20 %
    /// noise from one interval to the next. The loop loosened to the model's cap, overshot,
    /// tightened back, and with 3 changes in the minute spent sat 25 % under its budget for
    /// the rest of the migration. A loop that aims from what it measures keeps the writer in
    /// the band around its aim and its changes for when they are needed. Returns the
    /// measured / budget ratios from 20 s on, and the goal of the last interval.
    fn slowing_writer(s: &AutoSettings) -> (Vec<f64>, f64) {
        let rate = |cap: Option<f64>, t: u64| {
            let slow = if t >= 8 { 0.7 } else { 1.0 };
            let noise = [1.0, 1.2, 1.2, 0.8, 0.8, 1.0, 0.9, 1.1][t as usize % 8];
            let c = cap.unwrap_or(90.0).min(90.0);
            10.9 * MB * c / 90.0 * slow * noise
        };
        let (trace, decisions) = simulate_in_time(60, rate, s);
        let caps: Vec<f64> = decisions
            .iter()
            .filter_map(|d| match d.action {
                Action::Cap { cap_pct } => Some(cap_pct),
                _ => None,
            })
            .collect();
        assert!(
            caps.iter().skip(1).any(|&c| c > caps[0]),
            "loosened: {caps:?}"
        );
        // Its first cap is not a change.
        assert!(caps.len() - 1 <= 3, "{caps:?} in a minute");
        let late: Vec<f64> = decisions[20..]
            .iter()
            .map(|d| d.measured_bytes_per_s / d.budget_bytes_per_s.unwrap())
            .collect();
        eprintln!("caps {trace:?}; measured / budget {late:.2?}");
        (late, decisions.last().expect("decisions").target_s)
    }

    fn mean(v: &[f64]) -> f64 {
        v.iter().sum::<f64>() / v.len() as f64
    }

    /// At the knee (the default goal) the loop holds the writer on its budget: the knee is
    /// the margin, a second one under it would waste the writer's throughput.
    #[test]
    fn at_the_knee_a_writer_that_slows_under_its_cap_is_loosened_to_its_budget_not_past_it() {
        let s = knee_settings();
        let (late, goal) = slowing_writer(&s);
        assert!(
            goal < s.target.as_secs_f64() * (1.0 - s.tolerance),
            "the goal was the knee, well below the bound: {goal}"
        );
        let m = mean(&late);
        // Higher than at a bound, where the same writer is held a tolerance under its budget.
        let (at_bound, _) = slowing_writer(&AutoSettings {
            knee: None,
            ..knee_settings()
        });
        assert!(
            m >= mean(&at_bound) + 0.05,
            "knee {m:.2} vs bound {:.2}",
            mean(&at_bound)
        );
        assert!(
            (1.0 - s.tolerance..=1.0 + s.tolerance).contains(&m),
            "measured / budget from 20 s on: mean {m:.2}"
        );
        // Not past it: no window of the control's width over the band by more than its noise.
        for w in late.windows(WINDOW) {
            assert!(
                mean(w) <= 1.0 + 2.0 * s.tolerance,
                "window at {:.2}",
                mean(w)
            );
        }
    }

    /// At a bound (`--target`) the loop holds the writer under its budget, so that the
    /// predictor's error and the rate's noise do not make the migration miss it.
    #[test]
    fn at_a_bound_a_writer_that_slows_under_its_cap_is_held_under_its_budget() {
        let s = AutoSettings {
            knee: None,
            ..knee_settings()
        };
        let (late, _) = slowing_writer(&s);
        let m = mean(&late);
        assert!(
            (1.0 - 2.0 * s.tolerance..=1.0).contains(&m),
            "measured / budget from 20 s on: mean {m:.2}"
        );
        for w in late.windows(WINDOW) {
            assert!(mean(w) <= 1.0 + s.tolerance, "window at {:.2}", mean(w));
        }
    }

    /// A process that used 40 % CPU uncapped and now dirties well under its budget: a cap
    /// above 40 % would hold nothing back, so the loop stops there, however long it waits.
    #[test]
    fn a_cap_is_never_loosened_past_the_cpu_its_process_used_uncapped() {
        let s = knee_settings();
        let mut st = PolicyState::default();
        let first = writer(1, 11.0 * MB, 40.0);
        let o = decide(&at(snap(vec![first]), 1), &s, &BTreeMap::new(), &mut st);
        let mut cap = cap_of(&o, 1).expect("capped");
        for t in 2..=200 {
            let slow = writer(1, 0.6 * MB, cap.min(40.0));
            let caps = BTreeMap::from([(slow.id(), cap)]);
            let o = decide(&at(snap(vec![slow]), t), &s, &caps, &mut st);
            cap = cap_of(&o, 1).expect("still capped: it still writes");
            assert!(cap <= 40.0, "interval {t}: {:?}", o.decisions[0]);
        }
        assert!(cap > 30.0, "loosened toward what it used: {cap}%");
    }

    #[test]
    fn a_proportional_model_would_have_been_too_gentle_here() {
        // Under the proportional model the first cap is set; the measurement then shows the
        // real (lower) rate and the loop loosens to use what the goal leaves.
        let s = settings();
        let (trace, _) = simulate(60, sub_proportional, &s);
        let first = trace[0].unwrap();
        let last = trace.last().unwrap().unwrap();
        assert!(
            last > first,
            "loosened from {first}% to {last}% on measured rates"
        );
    }

    #[test]
    fn a_capped_process_missing_from_a_snapshot_keeps_its_cap_and_a_gone_one_is_lifted() {
        let s = settings();
        let mut st = PolicyState::default();
        let w = writer(1, 9.0 * MB, 90.0);
        let caps = BTreeMap::from([(w.id(), 30.0)]);
        let o = decide(&at(snap(vec![]), 1), &s, &caps, &mut st);
        assert_eq!(cap_of(&o, 1), Some(30.0), "no sample is no news: {o:?}");
        let mut gone = w.clone();
        gone.gone = true;
        let o = decide(&at(snap(vec![gone]), 2), &s, &caps, &mut st);
        assert_eq!(o.decisions[0].action, Action::Lift);
    }

    #[test]
    fn a_cap_is_lifted_only_after_its_process_went_quiet() {
        let s = settings();
        let mut st = PolicyState::default();
        let busy = writer(1, 9.0 * MB, 90.0);
        decide(
            &at(snap(vec![busy.clone()]), 1),
            &s,
            &BTreeMap::new(),
            &mut st,
        );
        let caps = BTreeMap::from([(busy.id(), 30.0)]);
        let quiet = writer(1, 0.0, 0.5);
        for t in 2..=4 {
            let o = decide(&at(snap(vec![quiet.clone()]), t), &s, &caps, &mut st);
            let lifted = o.decisions[0].action == Action::Lift;
            assert_eq!(lifted, t == 4, "interval {t}: {:?}", o.decisions[0]);
        }
    }
}
