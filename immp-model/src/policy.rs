//! Automatic caps: a pure function of a Snapshot, the settings, the caps in force and a little
//! memory between intervals (for hysteresis). It never touches the system; `throttle` applies
//! what it decides.
use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

use crate::{
    predict::{Link, Prediction, Writer, highest_cap, predict},
    snapshot::{ProcId, ProcSample, Snapshot},
    units::fmt_rate,
};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoSettings {
    pub link: Link,
    /// Never cap below this (QoS floor), percent of one CPU.
    pub floor_pct: f64,
    /// Migration time to achieve; `None`: converging at all is enough.
    pub target: Option<Duration>,
    /// Only processes dirtying at least this share of the link are capped.
    pub immp_share: f64,
    /// A cap changes only if the new one differs by at least this many points.
    pub hysteresis_pct: f64,
    /// A cap is lifted (or loosened) only after this many intervals in a row without need.
    pub lift_after: u32,
    /// Plan for this share of the link only (0.2: the prediction must converge at 80 % of the
    /// bandwidth), a margin for what the counts miss (kernel-side dirtying, noise).
    pub headroom: f64,
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
            Action::Cap { cap_pct } => write!(f, "cap {cap_pct:.0}%"),
            Action::Keep { cap_pct } => write!(f, "keep {cap_pct:.0}%"),
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
}

impl Decision {
    pub fn id(&self) -> ProcId {
        ProcId::new(self.pid, self.start_time)
    }
}

/// What the policy remembers between intervals.
#[derive(Debug, Clone, Default)]
pub struct PolicyState {
    /// CPU share before immp capped it.
    uncapped_cpu: BTreeMap<ProcId, f64>,
    /// Consecutive intervals a capped process was not needed.
    calm: BTreeMap<ProcId, u32>,
    /// Consecutive intervals a capped process could have had a looser cap.
    loosen: BTreeMap<ProcId, u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub decisions: Vec<Decision>,
    pub without_caps: Prediction,
    pub with_caps: Prediction,
}

/// The predictor's view of one process; `page` converts curve pages to bytes.
pub fn writer_for(p: &ProcSample, st: &mut PolicyState, capped: bool, page: f64) -> Writer {
    let id = p.id();
    if !capped {
        st.uncapped_cpu.insert(id, p.cpu_pct.max(1.0));
    }
    // Bytes dirtied per CPU-percent: unchanged by a cap, so a capped measurement still tells
    // the uncapped rate.
    let k = p.dirty_bytes_per_s / p.cpu_pct.max(0.5);
    let cpu = *st.uncapped_cpu.get(&id).unwrap_or(&100.0);
    Writer {
        rate: k * cpu,
        working_set: p.rss_bytes.max(4096) as f64,
        cpu_pct: cpu,
        curve: p
            .curve
            .iter()
            .map(|c| (c.window_s, c.pages * page))
            .collect(),
    }
}

/// The guest as the predictor sees it: the named writers, the rest as one background writer,
/// and the link to plan for (the real one less the headroom).
struct Planner<'a> {
    writers: Vec<(ProcId, &'a ProcSample, Writer)>,
    background: Writer,
    plan: Link,
}

impl<'a> Planner<'a> {
    fn new(
        live: &[&'a ProcSample],
        snap: &Snapshot,
        s: &AutoSettings,
        caps: &BTreeMap<ProcId, f64>,
        st: &mut PolicyState,
    ) -> Self {
        let page = snap.page_size as f64;
        let writers: Vec<(ProcId, &ProcSample, Writer)> = live
            .iter()
            .filter(|p| p.dirty_bytes_per_s > 0.0 || caps.contains_key(&p.id()))
            .map(|p| {
                (
                    p.id(),
                    *p,
                    writer_for(p, st, caps.contains_key(&p.id()), page),
                )
            })
            .collect();
        // The rest of the guest: dirtying not attributed to a live process (short-lived ones).
        let named: f64 = writers.iter().map(|(_, p, _)| p.dirty_bytes_per_s).sum();
        let rest = (snap.totals.dirty_bytes_per_s - named).max(0.0);
        Self {
            writers,
            background: Writer::linear(rest, s.link.ram, 0.0),
            plan: Link {
                bandwidth: s.link.bandwidth * (1.0 - s.headroom).clamp(0.05, 1.0),
                ..s.link
            },
        }
    }

    fn eval(&self, chosen: &BTreeMap<ProcId, f64>) -> Prediction {
        let mut v: Vec<(Writer, Option<f64>)> = self
            .writers
            .iter()
            .map(|(id, _, w)| (w.clone(), chosen.get(id).copied()))
            .collect();
        v.push((self.background.clone(), None));
        predict(&self.plan, &v)
    }

    /// The processes the prediction blames: IMMPs by share of the link, worst first.
    fn blamed(&self, s: &AutoSettings) -> Vec<(ProcId, &Writer)> {
        let mut v: Vec<(ProcId, &Writer)> = self
            .writers
            .iter()
            .filter(|(_, _, w)| w.rate >= s.immp_share * s.link.bandwidth)
            .map(|(id, _, w)| (*id, w))
            .collect();
        v.sort_by(|a, b| b.1.rate.total_cmp(&a.1.rate));
        v
    }
}

/// Caps the goal needs, worst writer first, each the highest that meets the goal with those
/// before it; stops at the first that meets it alone. Returns the caps and why each.
fn desired_caps(
    pl: &Planner,
    s: &AutoSettings,
    without_caps: &Prediction,
) -> (BTreeMap<ProcId, f64>, BTreeMap<ProcId, String>) {
    let mut desired = BTreeMap::new();
    let mut why = BTreeMap::new();
    if without_caps.within(s.target) {
        return (desired, why);
    }
    for (id, w) in pl.blamed(s) {
        let top = w.cpu_pct.min(100.0 * 64.0).floor();
        let found = highest_cap(top, s.floor_pct, |c| {
            let mut trial = desired.clone();
            trial.insert(id, c);
            let p = pl.eval(&trial);
            p.within(s.target).then_some(p)
        });
        let load = format!(
            "dirties {} ({:.0}% of the link) at {:.0}% CPU",
            fmt_rate(w.rate),
            w.rate / s.link.bandwidth * 100.0,
            w.cpu_pct
        );
        if let Some((c, p)) = found {
            desired.insert(id, c);
            why.insert(
                id,
                format!(
                    "{load}; highest cap meeting the goal: {c:.0}% -> predicted {} in {} rounds",
                    fmt_secs(p.total_s),
                    p.rounds
                ),
            );
            break;
        }
        desired.insert(id, s.floor_pct);
        why.insert(
            id,
            format!(
                "{load}; even the {:.0}% floor is not enough alone: capped at the floor",
                s.floor_pct
            ),
        );
    }
    (desired, why)
}

/// One wanted cap against the cap in force: tighten at once when needed; keep a close one;
/// loosen only after `lift_after` intervals in a row that want it (measured rates are noisy:
/// this keeps caps from flapping).
fn hysteresis(
    id: ProcId,
    want: f64,
    have: Option<f64>,
    why: &str,
    keep_ok: impl Fn(f64) -> bool,
    s: &AutoSettings,
    st: &mut PolicyState,
) -> (Action, String) {
    let keeping = |have: f64| {
        format!(
            "{why} (keeping {have:.0}%: within {:.0} points)",
            s.hysteresis_pct
        )
    };
    match have {
        None => (Action::Cap { cap_pct: want }, why.to_string()),
        Some(have) if want < have => {
            st.loosen.remove(&id);
            if have - want < s.hysteresis_pct && keep_ok(have) {
                (Action::Keep { cap_pct: have }, keeping(have))
            } else {
                (Action::Cap { cap_pct: want }, why.to_string())
            }
        }
        Some(have) if want - have < s.hysteresis_pct => {
            st.loosen.remove(&id);
            (Action::Keep { cap_pct: have }, keeping(have))
        }
        Some(have) => {
            let n = st.loosen.entry(id).or_insert(0);
            *n += 1;
            if *n >= s.lift_after {
                st.loosen.remove(&id);
                let r = format!("{why} (loosened after {} intervals)", s.lift_after);
                return (Action::Cap { cap_pct: want }, r);
            }
            let r = format!(
                "{why} (keeping {have:.0}%: {n}/{} intervals before loosening)",
                s.lift_after
            );
            (Action::Keep { cap_pct: have }, r)
        }
    }
}

/// A cap in force that the goal no longer needs: kept for `lift_after` calm intervals, then
/// lifted; lifted at once when its process is gone.
fn release(
    id: ProcId,
    have: f64,
    gone: bool,
    s: &AutoSettings,
    st: &mut PolicyState,
) -> (Action, String) {
    let n = st.calm.entry(id).or_insert(0);
    *n += 1;
    if gone || *n >= s.lift_after {
        st.calm.remove(&id);
        let why = if gone {
            "process is gone".to_string()
        } else {
            format!(
                "migration meets the goal without this cap for {} intervals",
                s.lift_after
            )
        };
        return (Action::Lift, why);
    }
    let why = format!(
        "not needed now ({n}/{} calm intervals before lifting)",
        s.lift_after
    );
    (Action::Keep { cap_pct: have }, why)
}

pub fn decide(
    snap: &Snapshot,
    s: &AutoSettings,
    caps: &BTreeMap<ProcId, f64>,
    st: &mut PolicyState,
) -> Outcome {
    let live: Vec<&ProcSample> = snap.processes.iter().filter(|p| !p.gone).collect();
    let pl = Planner::new(&live, snap, s, caps, st);
    let without_caps = pl.eval(&BTreeMap::new());
    let (desired, why) = desired_caps(&pl, s, &without_caps);
    let name = |id: &ProcId| {
        live.iter()
            .find(|p| p.id() == *id)
            .map(|p| p.comm.clone())
            .unwrap_or_default()
    };
    let mut decisions = Vec::new();
    let mut in_force: BTreeMap<ProcId, f64> = BTreeMap::new();
    let mut push =
        |id: ProcId, (action, reason): (Action, String), in_force: &mut BTreeMap<_, _>| {
            if let Action::Keep { cap_pct } | Action::Cap { cap_pct } = action {
                in_force.insert(id, cap_pct);
            }
            decisions.push(Decision {
                pid: id.pid,
                start_time: id.start_time,
                comm: name(&id),
                action,
                reason,
            });
        };
    for (id, want) in &desired {
        st.calm.remove(id);
        // A cap in force is kept when close to the new one, unless keeping it misses the goal.
        let keep_ok = |have: f64| {
            let mut trial = desired.clone();
            trial.insert(*id, have);
            pl.eval(&trial).within(s.target)
        };
        let d = hysteresis(*id, *want, caps.get(id).copied(), &why[id], keep_ok, s, st);
        push(*id, d, &mut in_force);
    }
    for (id, have) in caps.iter().filter(|(id, _)| !desired.contains_key(id)) {
        let gone = !live.iter().any(|p| p.id() == *id);
        let d = release(*id, *have, gone, s, st);
        push(*id, d, &mut in_force);
    }
    // Processes that left the snapshot: forget them.
    st.uncapped_cpu
        .retain(|id, _| live.iter().any(|p| p.id() == *id) || caps.contains_key(id));
    let with_caps = pl.eval(&in_force);
    Outcome {
        decisions,
        without_caps,
        with_caps,
    }
}

pub(crate) fn fmt_secs(s: Option<f64>) -> String {
    s.map_or("no convergence".into(), |s| format!("{s:.1}s"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{proc_, snap};

    fn settings() -> AutoSettings {
        AutoSettings {
            link: Link::new(12.5e6, 512.0 * 1048576.0, Duration::from_millis(300)),
            floor_pct: 15.0,
            target: None,
            immp_share: 0.25,
            hysteresis_pct: 5.0,
            lift_after: 3,
            headroom: 0.0,
        }
    }

    fn writer(pid: u32, bytes_per_s: f64, cpu: f64) -> ProcSample {
        let mut p = proc_(pid, bytes_per_s / 4096.0, cpu);
        p.rss_bytes = 400 << 20;
        p
    }

    #[test]
    fn idle_guest_gets_no_caps() {
        let s = snap(vec![writer(1, 10_000.0, 3.0)]);
        let o = decide(
            &s,
            &settings(),
            &BTreeMap::new(),
            &mut PolicyState::default(),
        );
        assert!(o.decisions.is_empty());
        assert!(o.without_caps.converges);
    }

    #[test]
    fn heavy_writer_gets_the_highest_cap_that_converges_and_idle_one_is_left_alone() {
        let s = snap(vec![writer(1, 20e6, 100.0), writer(2, 50_000.0, 2.0)]);
        let o = decide(
            &s,
            &settings(),
            &BTreeMap::new(),
            &mut PolicyState::default(),
        );
        assert!(!o.without_caps.converges);
        assert_eq!(o.decisions.len(), 1, "{:?}", o.decisions);
        let d = &o.decisions[0];
        assert_eq!(d.pid, 1);
        let Action::Cap { cap_pct } = d.action else {
            panic!("{d:?}")
        };
        assert!((15.0..100.0).contains(&cap_pct));
        assert!(o.with_caps.converges);
        // The next point up would not converge: it is the highest.
        let w = Writer::linear(20e6, (400 << 20) as f64, 100.0);
        let mut v = vec![(w, Some(cap_pct + 1.0))];
        v.push((Writer::linear(50_000.0, (400 << 20) as f64, 2.0), None));
        assert!(!predict(&settings().link, &v).converges);
        assert!(d.reason.contains("highest cap"), "{}", d.reason);
    }

    #[test]
    fn floor_is_respected() {
        let s = snap(vec![writer(1, 200e6, 100.0)]);
        let o = decide(
            &s,
            &settings(),
            &BTreeMap::new(),
            &mut PolicyState::default(),
        );
        assert_eq!(o.decisions[0].action, Action::Cap { cap_pct: 15.0 });
        assert!(o.decisions[0].reason.contains("floor"));
    }

    #[test]
    fn hysteresis_keeps_close_caps_and_lifts_only_after_calm_intervals() {
        let st = &mut PolicyState::default();
        let s = snap(vec![writer(1, 20e6, 100.0)]);
        let o = decide(&s, &settings(), &BTreeMap::new(), st);
        let Action::Cap { cap_pct } = o.decisions[0].action else {
            panic!()
        };
        let id = s.processes[0].id();
        // Measured while capped: CPU = cap, rate scaled accordingly.
        let mut capped = writer(1, 20e6 * cap_pct / 100.0, cap_pct);
        capped.start_time = id.start_time;
        // A slightly looser cap would miss the goal (the chosen one is the highest meeting it):
        // it is tightened despite the hysteresis.
        let looser = BTreeMap::from([(id, cap_pct + 2.0)]);
        let o = decide(&snap(vec![capped.clone()]), &settings(), &looser, st);
        assert!(
            matches!(o.decisions[0].action, Action::Cap { .. }),
            "{:?}",
            o.decisions[0]
        );
        // A slightly tighter one is kept: no flapping.
        let caps = BTreeMap::from([(id, cap_pct - 2.0)]);
        let o = decide(&snap(vec![capped.clone()]), &settings(), &caps, st);
        assert_eq!(
            o.decisions[0].action,
            Action::Keep {
                cap_pct: cap_pct - 2.0
            }
        );
        // A much tighter cap than needed is loosened only on the 3rd interval that wants it.
        let tight = BTreeMap::from([(id, cap_pct - 10.0)]);
        let st2 = &mut PolicyState::default();
        decide(&s, &settings(), &BTreeMap::new(), st2); // learn the uncapped CPU
        for i in 1..=3 {
            let o = decide(&snap(vec![capped.clone()]), &settings(), &tight, st2);
            let loosened =
                matches!(o.decisions[0].action, Action::Cap { cap_pct: c } if c > cap_pct - 10.0);
            assert_eq!(loosened, i == 3, "interval {i}: {:?}", o.decisions[0]);
        }
        // The writer calms down: kept for 2 intervals, lifted on the 3rd.
        let quiet = writer(1, 1000.0, 1.0);
        for i in 1..=3 {
            let o = decide(&snap(vec![quiet.clone()]), &settings(), &caps, st);
            let want = if i < 3 {
                Action::Keep {
                    cap_pct: cap_pct - 2.0,
                }
            } else {
                Action::Lift
            };
            assert_eq!(o.decisions[0].action, want, "interval {i}");
        }
    }
}
