//! Automatic caps: a pure function of a Snapshot, the settings, the caps in force and a little
//! memory between intervals (for hysteresis). It never touches the system; `throttle` applies
//! what it decides.
use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

use crate::{
    predict::{Link, Prediction, Writer, predict},
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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    #[serde(flatten)]
    pub action: Action,
    pub reason: String,
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

pub fn decide(
    snap: &Snapshot,
    s: &AutoSettings,
    caps: &BTreeMap<ProcId, f64>,
    st: &mut PolicyState,
) -> Outcome {
    let live: Vec<&ProcSample> = snap.processes.iter().filter(|p| !p.gone).collect();
    let writers: Vec<(ProcId, &ProcSample, Writer)> = live
        .iter()
        .filter(|p| p.dirty_bytes_per_s > 0.0 || caps.contains_key(&p.id()))
        .map(|p| {
            (
                p.id(),
                *p,
                writer_for(p, st, caps.contains_key(&p.id()), snap.page_size as f64),
            )
        })
        .collect();
    // The rest of the guest: dirtying not attributed to a live process (short-lived ones).
    let named: f64 = writers.iter().map(|(_, p, _)| p.dirty_bytes_per_s).sum();
    let rest = (snap.totals.dirty_bytes_per_s - named).max(0.0);
    let background = Writer::linear(rest, s.link.ram, 0.0);
    let plan = Link {
        bandwidth: s.link.bandwidth * (1.0 - s.headroom).clamp(0.05, 1.0),
        ..s.link
    };

    let eval = |chosen: &BTreeMap<ProcId, f64>| -> Prediction {
        let mut v: Vec<(Writer, Option<f64>)> = writers
            .iter()
            .map(|(id, _, w)| (w.clone(), chosen.get(id).copied()))
            .collect();
        v.push((background.clone(), None));
        predict(&plan, &v)
    };
    let without_caps = eval(&BTreeMap::new());

    // The processes the prediction blames: IMMPs by share of the link, worst first.
    let mut blamed: Vec<&(ProcId, &ProcSample, Writer)> = writers
        .iter()
        .filter(|(_, _, w)| w.rate >= s.immp_share * s.link.bandwidth)
        .collect();
    blamed.sort_by(|a, b| b.2.rate.total_cmp(&a.2.rate));

    let mut desired: BTreeMap<ProcId, f64> = BTreeMap::new();
    let mut why: BTreeMap<ProcId, String> = BTreeMap::new();
    if !without_caps.within(s.target) {
        for (id, _, w) in &blamed {
            let top = w.cpu_pct.min(100.0 * 64.0).floor();
            // Highest cap (1-point steps) that makes the prediction meet the goal.
            let mut found = None;
            let mut c = top;
            while c >= s.floor_pct {
                let mut trial = desired.clone();
                trial.insert(*id, c);
                let p = eval(&trial);
                if p.within(s.target) {
                    found = Some((c, p));
                    break;
                }
                c -= 1.0;
            }
            match found {
                Some((c, p)) => {
                    desired.insert(*id, c);
                    why.insert(*id, format!(
                        "dirties {} ({:.0}% of the link) at {:.0}% CPU; highest cap meeting the goal: {:.0}% -> predicted {} in {} rounds",
                        fmt_rate(w.rate), w.rate / s.link.bandwidth * 100.0, w.cpu_pct, c, fmt_secs(p.total_s), p.rounds
                    ));
                    break;
                }
                None => {
                    desired.insert(*id, s.floor_pct);
                    why.insert(*id, format!(
                        "dirties {} ({:.0}% of the link) at {:.0}% CPU; even the {:.0}% floor is not enough alone: capped at the floor",
                        fmt_rate(w.rate), w.rate / s.link.bandwidth * 100.0, w.cpu_pct, s.floor_pct
                    ));
                }
            }
        }
    }

    // Hysteresis against the caps in force.
    let mut decisions = Vec::new();
    let mut in_force: BTreeMap<ProcId, f64> = BTreeMap::new();
    let name = |id: &ProcId| {
        live.iter()
            .find(|p| p.id() == *id)
            .map(|p| p.comm.clone())
            .unwrap_or_default()
    };
    for (id, want) in &desired {
        st.calm.remove(id);
        // A cap in force is kept when close to the new one, unless keeping it misses the goal.
        let keep_ok = |have: f64| {
            let mut trial = desired.clone();
            trial.insert(*id, have);
            eval(&trial).within(s.target)
        };
        // Tighten at once when needed; loosen only after `lift_after` intervals in a row that
        // want it (measured rates are noisy: this keeps caps from flapping).
        let (action, reason) = match caps.get(id).copied() {
            None => (Action::Cap { cap_pct: *want }, why[id].clone()),
            Some(have) if *want < have => {
                st.loosen.remove(id);
                if have - want < s.hysteresis_pct && keep_ok(have) {
                    (
                        Action::Keep { cap_pct: have },
                        format!(
                            "{} (keeping {have:.0}%: within {:.0} points)",
                            why[id], s.hysteresis_pct
                        ),
                    )
                } else {
                    (Action::Cap { cap_pct: *want }, why[id].clone())
                }
            }
            Some(have) if want - have < s.hysteresis_pct => {
                st.loosen.remove(id);
                (
                    Action::Keep { cap_pct: have },
                    format!(
                        "{} (keeping {have:.0}%: within {:.0} points)",
                        why[id], s.hysteresis_pct
                    ),
                )
            }
            Some(have) => {
                let n = st.loosen.entry(*id).or_insert(0);
                *n += 1;
                if *n >= s.lift_after {
                    st.loosen.remove(id);
                    (
                        Action::Cap { cap_pct: *want },
                        format!("{} (loosened after {} intervals)", why[id], s.lift_after),
                    )
                } else {
                    let n = *n;
                    (
                        Action::Keep { cap_pct: have },
                        format!(
                            "{} (keeping {have:.0}%: {n}/{} intervals before loosening)",
                            why[id], s.lift_after
                        ),
                    )
                }
            }
        };
        in_force.insert(
            *id,
            match action {
                Action::Keep { cap_pct } | Action::Cap { cap_pct } => cap_pct,
                Action::Lift => 0.0,
            },
        );
        decisions.push(Decision {
            pid: id.pid,
            start_time: id.start_time,
            comm: name(id),
            action,
            reason,
        });
    }
    for (id, have) in caps {
        if desired.contains_key(id) {
            continue;
        }
        let n = st.calm.entry(*id).or_insert(0);
        *n += 1;
        let gone = !live.iter().any(|p| p.id() == *id);
        if gone || *n >= s.lift_after {
            st.calm.remove(id);
            decisions.push(Decision {
                pid: id.pid,
                start_time: id.start_time,
                comm: name(id),
                action: Action::Lift,
                reason: if gone {
                    "process is gone".into()
                } else {
                    format!(
                        "migration meets the goal without this cap for {} intervals",
                        s.lift_after
                    )
                },
            });
        } else {
            in_force.insert(*id, *have);
            decisions.push(Decision {
                pid: id.pid,
                start_time: id.start_time,
                comm: name(id),
                action: Action::Keep { cap_pct: *have },
                reason: format!(
                    "not needed now ({n}/{} calm intervals before lifting)",
                    s.lift_after
                ),
            });
        }
    }
    // Processes that left the snapshot: forget them.
    let known: Vec<ProcId> = live.iter().map(|p| p.id()).collect();
    st.uncapped_cpu
        .retain(|id, _| known.contains(id) || caps.contains_key(id));
    let with_caps = eval(&in_force);
    Outcome {
        decisions,
        without_caps,
        with_caps,
    }
}

fn fmt_secs(s: Option<f64>) -> String {
    s.map_or("no convergence".into(), |s| format!("{s:.1}s"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rank::tests::{proc_, snap};

    fn settings() -> AutoSettings {
        AutoSettings {
            link: Link {
                bandwidth: 12.5e6,
                ram: 512.0 * 1048576.0,
                downtime_limit: Duration::from_millis(300),
                max_rounds: 30,
            },
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

/// What one process does to the predicted migration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Impact {
    /// Share of the predicted migration due to it: the prediction without its dirtying.
    pub without_it: Prediction,
    /// Highest cap (percent of one CPU) that, applied to it alone, meets the goal; `None` when
    /// no cap is needed or none would do.
    pub cap_to_converge: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assessment {
    pub prediction: Prediction,
    #[serde(skip)]
    pub impacts: BTreeMap<ProcId, Impact>,
}

/// The migration predicted from a snapshot, and each of the `top` busiest writers' part in it.
pub fn assess(snap: &Snapshot, link: &Link, target: Option<Duration>, top: usize) -> Assessment {
    let st = &mut PolicyState::default();
    let page = snap.page_size as f64;
    let mut writers: Vec<(ProcId, Writer)> = snap
        .processes
        .iter()
        .filter(|p| !p.gone && p.dirty_bytes_per_s > 0.0)
        .map(|p| (p.id(), writer_for(p, st, false, page)))
        .collect();
    writers.sort_by(|a, b| b.1.rate.total_cmp(&a.1.rate));
    let named: f64 = writers.iter().map(|(_, w)| w.rate).sum();
    let rest = (snap.totals.dirty_bytes_per_s - named).max(0.0);
    let eval = |skip: Option<ProcId>, cap: Option<(ProcId, f64)>| {
        let mut v: Vec<(Writer, Option<f64>)> = writers
            .iter()
            .filter(|(id, _)| Some(*id) != skip)
            .map(|(id, w)| (w.clone(), cap.filter(|c| c.0 == *id).map(|c| c.1)))
            .collect();
        v.push((Writer::linear(rest, link.ram, 0.0), None));
        predict(link, &v)
    };
    let prediction = eval(None, None);
    let mut impacts = BTreeMap::new();
    for (id, w) in writers.iter().take(top) {
        let cap_to_converge = if prediction.within(target) {
            None
        } else {
            let mut c = w.cpu_pct.floor();
            let mut found = None;
            while c >= 1.0 {
                if eval(None, Some((*id, c))).within(target) {
                    found = Some(c);
                    break;
                }
                c -= 1.0;
            }
            found
        };
        impacts.insert(
            *id,
            Impact {
                without_it: eval(Some(*id), None),
                cap_to_converge,
            },
        );
    }
    Assessment {
        prediction,
        impacts,
    }
}
