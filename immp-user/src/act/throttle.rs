//! The actuator: caps a process's CPU share live, and always undoes it.
//!
//! Every change is claimed and journaled (and synced) first; undoing reads the journal's
//! placement. Only `act` (and `immp restore`, through it) changes cgroup membership, limits or
//! signals.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use immp_model::{
    ProcId,
    event::{Capped, Mechanism, Undone},
};

use super::{
    cgroup::{cap_cgroup_under, cap_dir, enable_cpu_controller, limit_pct, original_dir, write},
    claim,
    journal::{Entry, Journal, Placement},
    mechanism::{MechanismChoice, pick_mechanism},
    signal::SignalDriver,
    target::validate_cap,
    undo::{UndoReport, restore_all, still_capped, undo},
};
use crate::collect::procfs::{self, cgroup_line};

/// What asking for a cap did.
#[derive(Debug, Clone, PartialEq)]
pub enum CapOutcome {
    /// The cap is in force (new, changed or unchanged).
    Capped,
    /// The process's own cgroup (or an ancestor) already holds it at or below the cap: nothing
    /// was changed (a cap above that limit would do nothing; cgroup v1 even refuses it).
    Held { limit_pct: f64, cgroup: String },
    /// The process exited before it could be capped.
    Gone,
}

/// A placement and its cgroup's own limit, or why no cap is needed.
type PlanOrHeld = Result<(Placement, Option<(f64, String)>), CapOutcome>;

struct Active {
    placement: Placement,
    cap_pct: f64,
    /// The lowest limit of its original cgroup and ancestors (a cap is never set above it).
    limit_pct: Option<f64>,
}

pub struct Throttler {
    journal: Journal,
    journal_dir: PathBuf,
    mechanism: Mechanism,
    root: PathBuf,
    active: BTreeMap<ProcId, Active>,
    signals: Option<SignalDriver>,
}

impl Throttler {
    /// Takes the journal lock and restores leftovers of a crashed run first (returned).
    pub fn open(dir: &Path, choice: MechanismChoice) -> anyhow::Result<(Self, UndoReport)> {
        let (mechanism, root) = pick_mechanism(choice)?;
        let mut journal = Journal::open(dir)?;
        let leftovers = restore_all(&mut journal)?;
        let t = Self {
            journal,
            journal_dir: dir.to_path_buf(),
            mechanism,
            root,
            active: BTreeMap::new(),
            signals: None,
        };
        Ok((t, leftovers))
    }

    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    pub fn active(&self) -> Vec<Capped> {
        self.active
            .iter()
            .map(|(id, a)| Capped {
                pid: id.pid,
                start_time: id.start_time,
                comm: a.placement.comm.clone(),
                cap_pct: a.cap_pct,
                mechanism: a.placement.mechanism,
                cgroup: cap_dir(&a.placement)
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Caps `id` at `pct` % of one CPU, or changes its cap.
    pub fn cap(&mut self, id: ProcId, comm: &str, pct: f64) -> anyhow::Result<CapOutcome> {
        validate_cap(pct)?;
        if let Some(a) = self.active.get_mut(&id) {
            if (a.cap_pct - pct).abs() > f64::EPSILON {
                // Never above what its cgroup allows (v1 refuses a child quota above it).
                let applied = a.limit_pct.map_or(pct, |l| pct.min(l));
                set_limit(&a.placement, applied, self.signals.as_ref())?;
                a.cap_pct = applied;
            }
            return Ok(CapOutcome::Capped);
        }
        if procfs::stat(id.pid).is_none_or(|s| s.id != id) {
            return Ok(CapOutcome::Gone);
        }
        // The claim first: of two immp starting on one process at once, one wins here, and
        // the other never mistakes the winner's cap cgroup for the process's own.
        claim::take(id, &self.journal_dir)?;
        let (placement, limit) = match self.plan_unclaimed(id, comm, pct) {
            Ok(Ok(p)) => p,
            Ok(Err(held)) => {
                claim::release(id);
                return Ok(held);
            }
            Err(e) => {
                claim::release(id);
                return Err(e);
            }
        };
        self.journal.append(&Entry::Place(placement.clone()))?;
        let applied = self.apply(&placement, pct);
        if let Ok(true) = applied {
            let a = Active {
                placement,
                cap_pct: pct,
                limit_pct: limit.map(|l| l.0),
            };
            self.active.insert(id, a);
            return Ok(CapOutcome::Capped);
        }
        // Vanished meanwhile, or failed half-way: undo whatever part was done.
        let _ = undo(&placement);
        self.journal.append(&Entry::Restored {
            pid: id.pid,
            start_time: id.start_time,
        })?;
        claim::release(id);
        applied.map(|_| CapOutcome::Gone)
    }

    /// The placement for a new cap, or `Err(Held)` when its cgroup already holds it below the
    /// cap; a process in an immp cap cgroup is refused (another immp got there first).
    fn plan_unclaimed(&self, id: ProcId, comm: &str, pct: f64) -> anyhow::Result<PlanOrHeld> {
        if let Some(cg) = procfs::immp_cgroup(id.pid) {
            return Err(crate::usage(format!(
                "PID {} is already capped: it is in immp's cap cgroup {cg}; lift that cap first",
                id.pid
            )));
        }
        let placement = self.plan(id, comm)?;
        let limit = limit_pct(&placement);
        if let Some((l, cgroup)) = limit.clone().filter(|(l, _)| *l <= pct) {
            return Ok(Err(CapOutcome::Held {
                limit_pct: l,
                cgroup,
            }));
        }
        Ok(Ok((placement, limit)))
    }

    fn plan(&self, id: ProcId, comm: &str) -> anyhow::Result<Placement> {
        let base = Placement {
            pid: id.pid,
            start_time: id.start_time,
            comm: comm.to_string(),
            mechanism: self.mechanism,
            root: self.root.clone(),
            original: String::new(),
            capped: String::new(),
            previous_cpu_max: None,
        };
        let text = std::fs::read_to_string(format!("/proc/{}/cgroup", id.pid))
            .with_context(|| format!("reading /proc/{}/cgroup", id.pid))?;
        match self.mechanism {
            Mechanism::Signal => Ok(base),
            Mechanism::CgroupV2 => self.plan_v2(id, &text, base),
            Mechanism::CgroupV1 => {
                let original = cgroup_line(&text, |c| c.split(',').any(|x| x == "cpu"))
                    .ok_or_else(|| anyhow!("PID {} is in no v1 cpu cgroup", id.pid))?;
                // Nested under its own cgroup: every ancestor's cpu limit still applies, and
                // only the cpu hierarchy changes (memory, pids, ... stay where they were).
                let capped = cap_cgroup_under(&original, id);
                Ok(Placement {
                    original,
                    capped,
                    ..base
                })
            }
        }
    }

    /// cgroup v2: in place when the process is alone in its cgroup, else a sibling.
    fn plan_v2(&self, id: ProcId, text: &str, base: Placement) -> anyhow::Result<Placement> {
        let original = cgroup_line(text, str::is_empty)
            .ok_or_else(|| anyhow!("PID {} is in no cgroup v2 cgroup", id.pid))?;
        let dir = self.root.join(original.trim_start_matches('/'));
        let alone = std::fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|s| s.split_whitespace().collect::<Vec<_>>() == [id.pid.to_string()]);
        let has_cpu = std::fs::read_to_string(dir.join("cgroup.controllers"))
            .is_ok_and(|s| s.split_whitespace().any(|c| c == "cpu"));
        if alone && has_cpu && original != "/" {
            // Alone in its cgroup (a typical service): cap that cgroup in place, so nothing
            // moves and every other controller's limits stay exactly as set.
            let prev = std::fs::read_to_string(dir.join("cpu.max"))
                .context("reading cpu.max")?
                .trim()
                .to_string();
            return Ok(Placement {
                original,
                previous_cpu_max: Some(prev),
                ..base
            });
        }
        // Not alone: the no-internal-process rule forbids a child of its cgroup, so it gets a
        // sibling under the parent (the parent's limits still apply).
        let parent = Path::new(&original)
            .parent()
            .map_or("/".to_string(), |p| p.display().to_string());
        let capped = cap_cgroup_under(&parent, id);
        Ok(Placement {
            original,
            capped,
            ..base
        })
    }

    /// Makes the change the placement describes. `Ok(false)`: the process vanished.
    fn apply(&mut self, p: &Placement, pct: f64) -> anyhow::Result<bool> {
        if p.mechanism == Mechanism::Signal {
            let d = self.signals.get_or_insert_with(SignalDriver::start);
            return Ok(d.set(p.pid, p.start_time, pct));
        }
        let Some(dir) = cap_dir(p) else {
            set_limit(p, pct, None)?; // in place (v2)
            return Ok(true);
        };
        if p.mechanism == Mechanism::CgroupV2 {
            enable_cpu_controller(&p.root, dir.parent().unwrap_or(&p.root))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        set_limit(p, pct, None)?;
        match std::fs::write(dir.join("cgroup.procs"), p.pid.to_string()) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
            Err(e) => {
                Err(e).with_context(|| format!("moving PID {} into {}", p.pid, dir.display()))
            }
        }
    }

    /// Whether `id`'s cap still applies: false once someone else moved it out of its cap
    /// cgroup (or it exited).
    pub fn in_force(&self, id: &ProcId) -> bool {
        self.active
            .get(id)
            .is_some_and(|a| still_capped(&a.placement))
    }

    /// Lifts one cap and journals it.
    pub fn lift(&mut self, id: &ProcId) -> anyhow::Result<Option<Undone>> {
        let Some(a) = self.active.remove(id) else {
            return Ok(None);
        };
        let p = a.placement;
        if p.mechanism == Mechanism::Signal
            && let Some(d) = &self.signals
        {
            d.remove(p.pid);
        }
        let r = undo(&p)?;
        self.journal.append(&Entry::Restored {
            pid: p.pid,
            start_time: p.start_time,
        })?;
        claim::release(*id);
        Ok(Some(r))
    }

    /// Lifts every cap; errors are collected, never stop the others.
    pub fn lift_all(&mut self) -> UndoReport {
        if let Some(d) = self.signals.take() {
            d.stop();
        }
        let ids: Vec<ProcId> = self.active.keys().copied().collect();
        let mut out = Vec::new();
        for id in ids {
            let p = self.active[&id].placement.clone();
            let r = self.lift(&id).map(|o| o.unwrap_or(Undone::Gone));
            out.push((p, r));
        }
        let nothing_pending = self
            .journal
            .pending()
            .is_ok_and(|p| p.placements.is_empty());
        if self.active.is_empty() && nothing_pending {
            let _ = self.journal.clear();
        }
        out
    }
}

impl Drop for Throttler {
    /// Normal exit, stop signals (the loops return) and panics (unwinding) all end here.
    fn drop(&mut self) {
        for (p, r) in self.lift_all() {
            if let Err(e) = r {
                eprintln!(
                    "immp: error: could not restore PID {} ({}): {e:#}; run `immp restore`",
                    p.pid,
                    immp_model::text::clean(&p.comm)
                );
            }
        }
    }
}

/// CFS period for a cap: the kernel default (100 ms), longer for caps so small that their
/// quota would fall below the kernel's 1 ms minimum (0.5 % -> 200 ms), at most 1 s.
pub fn period_for(pct: f64) -> (u64, u64) {
    const MIN_QUOTA_US: f64 = 1000.0;
    let period = (MIN_QUOTA_US * 100.0 / pct)
        .ceil()
        .clamp(100_000.0, 1_000_000.0) as u64;
    let quota = (pct / 100.0 * period as f64).round().max(MIN_QUOTA_US) as u64;
    (quota, period)
}

fn set_limit(p: &Placement, pct: f64, signals: Option<&SignalDriver>) -> anyhow::Result<()> {
    let (quota, period) = period_for(pct);
    match p.mechanism {
        Mechanism::Signal => {
            if let Some(s) = signals {
                s.set(p.pid, p.start_time, pct);
            }
            Ok(())
        }
        Mechanism::CgroupV1 => {
            let dir = cap_dir(p).context("v1 placement without a cgroup")?;
            // Unlimited for a moment, so that no intermediate quota/period pair can exceed the
            // parent's limit (the kernel refuses such a pair with EINVAL).
            write(&dir.join("cpu.cfs_quota_us"), "-1")?;
            write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
            write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())
        }
        Mechanism::CgroupV2 => {
            let dir = cap_dir(p).unwrap_or_else(|| original_dir(p));
            write(&dir.join("cpu.max"), &format!("{quota} {period}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_caps_get_a_longer_period() {
        assert_eq!(period_for(20.0), (20_000, 100_000));
        assert_eq!(period_for(0.5), (1000, 200_000));
        assert_eq!(period_for(0.1), (1000, 1_000_000));
        assert_eq!(period_for(150.0), (150_000, 100_000));
        for pct in [0.1, 0.3, 0.7, 1.0, 2.5, 33.3] {
            let (q, p) = period_for(pct);
            assert!(q >= 1000, "{pct}");
            assert!(
                ((q as f64 / p as f64) * 100.0 - pct).abs() / pct < 0.01,
                "{pct}: {q}/{p}"
            );
        }
    }
}
