//! The automatic cap policy's apply loop, one for `throttle --auto`, `top --auto` and
//! `serve --auto`: decide on a snapshot (`immp_model::policy::decide`), then apply each decision
//! through the `Throttler` (journal first, claims), with the same refusals as `--pid`, and say
//! what happened as `Event`s. What differs between the commands (where events go, how the
//! sampler is told to watch a capped process, which processes belong to the operator) is the
//! `Host`'s.
use std::collections::{BTreeMap, BTreeSet};

use immp_model::{
    Event, ProcId, Snapshot,
    event::{Gone, Held, PredictionPair, Undo, Undone, Warning},
    policy::{Action, AutoSettings, Decision, PolicyState, decide},
};

use crate::{
    act::{
        target::validate_target,
        throttle::{CapOutcome, Throttler},
    },
    collect::{procfs, sampler::Sampler},
};

/// A newcomer must have dirtied this much before it is looked at between intervals: a small
/// program's start-up (loader, libc, stack) dirties a few hundred KiB. An interpreter's can
/// dirty megabytes; looked at early, the policy then judges it on its pace so far, as it
/// would at the next interval.
const NEWCOMER_MIN_BYTES: f64 = 1024.0 * 1024.0;

/// Whether a process the probes began counting since the last interval already dirties at an
/// IMMP's pace (`Ticks::sooner` of the commands with a policy): its interval, and its first
/// decision, then come at once rather than up to an interval later. A writer at the link's
/// speed dirties in one interval a second of link the migration must send (the lab's light
/// writer: 500-1,500 pages before its first cap).
pub fn newcomer_due(sampler: &mut Sampler, s: &AutoSettings) -> bool {
    let share = s.immp_share * s.link.bandwidth;
    // On a fast link an IMMP's start-up alone is not a peek's worth of its pace.
    let min_bytes = NEWCOMER_MIN_BYTES.max(share * super::run::PEEK.as_secs_f64());
    // As the policy plans rates: with the headroom (`blamed`).
    sampler.newcomer_rate(min_bytes) * s.margin() >= share
}

/// What a command lends the policy loop.
pub trait Host {
    /// Every event the loop produces (caps, lifts, warnings, decisions).
    fn emit(&mut self, e: Event);
    /// A process the policy capped: the sampler must report it every interval from now on,
    /// active or not (the policy needs its rate under the cap).
    fn watch(&mut self, id: ProcId);
    fn unwatch(&mut self, id: ProcId);
    /// Left alone by the policy (in `top`: caps the operator set or lifted).
    fn exempt(&self, _id: ProcId) -> bool {
        false
    }
    /// Also emit the decisions that changed nothing (`keep`): JSON output keeps them all.
    fn every_decision(&self) -> bool {
        false
    }
    /// The policy set or changed this process's cap (in `top`: who owns the cap).
    fn policy_capped(&mut self, _id: ProcId) {}
    /// The policy lifted this process's cap.
    fn policy_lifted(&mut self, _id: ProcId) {}
}

/// The policy's memory between intervals.
#[derive(Debug)]
pub struct AutoCap {
    policy: PolicyState,
    /// Processes already said to be refused, held by their own cgroup or not cappable: said
    /// once, not every interval.
    said: BTreeSet<ProcId>,
    /// IMMP_TEST_AUTO_ONLY: the only PIDs the policy may touch (see `test_confinement`).
    confined: Option<BTreeSet<u32>>,
}

impl Default for AutoCap {
    fn default() -> Self {
        Self {
            policy: PolicyState::default(),
            said: BTreeSet::new(),
            confined: test_confinement(),
        }
    }
}

impl AutoCap {
    /// One interval: decides, applies, and returns the prediction pair (also emitted). A cap
    /// that could not be lifted is the error, after every other decision was applied.
    pub fn step(
        &mut self,
        thr: &mut Throttler,
        snap: &Snapshot,
        s: &AutoSettings,
        host: &mut impl Host,
    ) -> anyhow::Result<PredictionPair> {
        let caps: BTreeMap<ProcId, f64> = thr
            .active()
            .iter()
            .map(|c| (ProcId::new(c.pid, c.start_time), c.cap_pct))
            .collect();
        let o = decide(snap, s, &caps, &mut self.policy);
        let pair = PredictionPair {
            without_caps: o.without_caps,
            with_caps: o.with_caps,
            target_s: o.target_s,
            goal_met: o.goal_met,
        };
        host.emit(Event::Prediction(pair));
        let mut failed = None;
        for d in o.decisions {
            let outside = self.confined.as_ref().is_some_and(|c| !c.contains(&d.pid));
            if outside || host.exempt(d.id()) {
                continue;
            }
            if let Err(e) = self.apply(thr, d, host) {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(pair), Err)
    }

    /// Applies one decision; the decision is emitted when it changed something (or always,
    /// if the host wants every one).
    fn apply(
        &mut self,
        thr: &mut Throttler,
        d: Decision,
        host: &mut impl Host,
    ) -> anyhow::Result<()> {
        let changed = match d.action {
            Action::Cap { cap_pct } => {
                if !self.cap(thr, &d, cap_pct, host) {
                    return Ok(());
                }
                true
            }
            Action::Lift => {
                let id = d.id();
                host.unwatch(id);
                host.policy_lifted(id);
                match thr.lift(&id)? {
                    Some(undone) => {
                        let (pid, start_time, comm) = (d.pid, d.start_time, d.comm.clone());
                        host.emit(Event::Lifted(Undo {
                            pid,
                            start_time,
                            comm,
                            undone,
                        }));
                        true
                    }
                    None => false,
                }
            }
            Action::Keep { .. } => false,
        };
        if changed || host.every_decision() {
            host.emit(Event::Decision(d));
        }
        Ok(())
    }

    /// Caps (new or changed); false when it did not (said why once).
    fn cap(&mut self, thr: &mut Throttler, d: &Decision, pct: f64, host: &mut impl Host) -> bool {
        let id = d.id();
        let new = !thr.active().iter().any(|c| c.pid == id.pid);
        // The same refusals as for --pid (PID 1, kernel threads, immp itself, a thread, a
        // process another immp caps or that lives in a cap cgroup with its parent), and the
        // PID must still be the process the policy decided about.
        if new {
            let refused = match validate_target(id.pid) {
                Ok((now, _)) if now != id => Some("it is now another process".to_string()),
                Ok(_) => None,
                Err(e) => Some(format!("{e:#}")),
            };
            if let Some(why) = refused {
                self.warn_once(id, format!("PID {} not capped: {why}", id.pid), host);
                return false;
            }
        }
        match thr.cap(id, &d.comm, pct) {
            Ok(CapOutcome::Capped) => {
                host.policy_capped(id);
                if new {
                    host.watch(id);
                    if let Some(c) = thr.active().into_iter().find(|c| c.pid == id.pid) {
                        host.emit(Event::Capped(c));
                    }
                }
                true
            }
            Ok(CapOutcome::Held { limit_pct, cgroup }) => {
                if self.said.insert(id) {
                    host.emit(Event::Held(Held {
                        pid: id.pid,
                        start_time: id.start_time,
                        comm: d.comm.clone(),
                        cap_pct: pct,
                        limit_pct,
                        cgroup,
                    }));
                }
                false
            }
            Ok(CapOutcome::Gone) => {
                host.emit(Event::Gone(Gone {
                    pid: id.pid,
                    start_time: id.start_time,
                    comm: d.comm.clone(),
                    undone: None,
                }));
                false
            }
            // One process that cannot be capped never stops the others' caps.
            Err(e) => {
                self.warn_once(id, format!("PID {}: not capped: {e:#}", id.pid), host);
                false
            }
        }
    }

    fn warn_once(&mut self, id: ProcId, message: String, host: &mut impl Host) {
        if self.said.insert(id) {
            host.emit(Event::Warning(Warning { message }));
        }
    }
}

/// A capped process that exited is released; one someone else moved out of its cap cgroup is
/// reported (its cap no longer applies) and left where it was put. A process is gone only when
/// its (pid, start time) surely no longer exists: a /proc read error keeps the cap.
pub fn release_stale(thr: &mut Throttler, host: &mut impl Host) {
    for c in thr.active() {
        let id = ProcId::new(c.pid, c.start_time);
        let alive = procfs::exists(id) != Some(false);
        if alive && thr.in_force(&id) {
            continue;
        }
        host.unwatch(id);
        host.policy_lifted(id);
        let (pid, start_time, comm) = (c.pid, c.start_time, c.comm);
        let e = match thr.lift(&id) {
            Ok(Some(undone)) if alive => {
                let undone = match undone {
                    // Moved back to where it was, by someone else: still moved away.
                    Undone::NothingToUndo => Undone::MovedAway {
                        now_in: procfs::cpu_cgroup(pid),
                    },
                    u => u,
                };
                Event::MovedAway(Undo {
                    pid,
                    start_time,
                    comm,
                    undone,
                })
            }
            Ok(undone) => Event::Gone(Gone {
                pid,
                start_time,
                comm,
                undone,
            }),
            Err(e) => {
                let message = format!("PID {pid}: cap NOT lifted: {e:#}; run `immp restore`");
                Event::Warning(Warning { message })
            }
        };
        host.emit(e);
    }
}

/// Test hook: confines the policy to the processes whose PIDs IMMP_TEST_AUTO_ONLY lists
/// (comma-separated), so that a test of `--auto` on a shared machine never caps anything but
/// its own workload (the decisions about the others are made, never applied). Only the test
/// suite sets it.
fn test_confinement() -> Option<BTreeSet<u32>> {
    let v = std::env::var("IMMP_TEST_AUTO_ONLY").ok()?;
    Some(v.split(',').filter_map(|p| p.trim().parse().ok()).collect())
}
