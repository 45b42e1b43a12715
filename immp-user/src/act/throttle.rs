//! The actuator: caps a process's CPU share live, and always undoes it.
//!
//! Every change is journaled (and synced) first; undoing reads the journal's placement. Only
//! `act` (and `immp restore`, through it) changes cgroup membership, limits or signals.
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
    cgroup::{cap_cgroup_under, cap_dir, enable_cpu_controller, original_dir, write},
    journal::{Entry, Journal, Placement},
    mechanism::{MechanismChoice, pick_mechanism},
    signal::SignalDriver,
    target::validate_cap,
    undo::{UndoReport, restore_all, undo},
};
use crate::collect::procfs::{self, cgroup_line};

/// CFS period used for quotas (the kernel default).
const PERIOD_US: u64 = 100_000;

pub struct Throttler {
    journal: Journal,
    mechanism: Mechanism,
    root: PathBuf,
    active: BTreeMap<ProcId, (Placement, f64)>,
    signals: Option<SignalDriver>,
}

impl Throttler {
    /// Takes the journal lock and restores leftovers of a crashed run first (returned).
    pub fn open(dir: &Path, choice: MechanismChoice) -> anyhow::Result<(Self, UndoReport)> {
        let (mechanism, root) = pick_mechanism(choice)?;
        let mut journal = Journal::open(dir)?;
        let leftovers = restore_all(&mut journal)?;
        Ok((
            Self {
                journal,
                mechanism,
                root,
                active: BTreeMap::new(),
                signals: None,
            },
            leftovers,
        ))
    }

    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    pub fn active(&self) -> Vec<Capped> {
        self.active
            .iter()
            .map(|(id, (p, pct))| Capped {
                pid: id.pid,
                start_time: id.start_time,
                comm: p.comm.clone(),
                cap_pct: *pct,
                mechanism: p.mechanism,
                cgroup: cap_dir(p)
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Caps `id` at `pct` % of one CPU, or changes its cap. `Ok(false)` if it exited meanwhile.
    pub fn cap(&mut self, id: ProcId, comm: &str, pct: f64) -> anyhow::Result<bool> {
        validate_cap(pct)?;
        if let Some((p, old)) = self.active.get_mut(&id) {
            if (*old - pct).abs() > f64::EPSILON {
                set_limit(p, pct, self.signals.as_ref())?;
                *old = pct;
            }
            return Ok(true);
        }
        if procfs::stat(id.pid).is_none_or(|s| s.id != id) {
            return Ok(false);
        }
        let placement = self.plan(id, comm)?;
        self.journal.append(&Entry::Place(placement.clone()))?;
        let applied = self.apply(&placement, pct);
        if let Ok(true) = applied {
            self.active.insert(id, (placement, pct));
            return Ok(true);
        }
        // Vanished meanwhile, or failed half-way: undo whatever part was done.
        let _ = undo(&placement);
        self.journal.append(&Entry::Restored {
            pid: id.pid,
            start_time: id.start_time,
        })?;
        applied
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
            Mechanism::CgroupV2 => {
                let original = cgroup_line(&text, str::is_empty)
                    .ok_or_else(|| anyhow!("PID {} is in no cgroup v2 cgroup", id.pid))?;
                let dir = self.root.join(original.trim_start_matches('/'));
                let alone = std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|s| {
                    s.split_whitespace().collect::<Vec<_>>() == [id.pid.to_string()]
                });
                let has_cpu = std::fs::read_to_string(dir.join("cgroup.controllers"))
                    .is_ok_and(|s| s.split_whitespace().any(|c| c == "cpu"));
                if alone && has_cpu && original != "/" {
                    // Alone in its cgroup (a typical service): cap that cgroup in place, so
                    // nothing moves and every other controller's limits stay exactly as set.
                    let prev = std::fs::read_to_string(dir.join("cpu.max"))
                        .context("reading cpu.max")?
                        .trim()
                        .to_string();
                    Ok(Placement {
                        original,
                        previous_cpu_max: Some(prev),
                        ..base
                    })
                } else {
                    // Not alone: the no-internal-process rule forbids a child of its cgroup, so
                    // it gets a sibling under the parent (the parent's limits still apply).
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
            }
        }
    }

    /// Makes the change the placement describes. `Ok(false)`: the process vanished.
    fn apply(&mut self, p: &Placement, pct: f64) -> anyhow::Result<bool> {
        match p.mechanism {
            Mechanism::Signal => {
                let d = self.signals.get_or_insert_with(SignalDriver::start);
                d.set(p.pid, p.start_time, pct);
                Ok(true)
            }
            Mechanism::CgroupV1 | Mechanism::CgroupV2 => {
                let Some(dir) = cap_dir(p) else {
                    set_limit(p, pct, None)?; // in place (v2)
                    return Ok(true);
                };
                if p.mechanism == Mechanism::CgroupV2 {
                    enable_cpu_controller(&p.root, dir.parent().unwrap_or(&p.root))?;
                }
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                set_limit(p, pct, None)?;
                match std::fs::write(dir.join("cgroup.procs"), p.pid.to_string()) {
                    Ok(()) => Ok(true),
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
                    Err(e) => Err(e)
                        .with_context(|| format!("moving PID {} into {}", p.pid, dir.display())),
                }
            }
        }
    }

    /// Lifts one cap and journals it.
    pub fn lift(&mut self, id: &ProcId) -> anyhow::Result<Option<Undone>> {
        let Some((p, _)) = self.active.remove(id) else {
            return Ok(None);
        };
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
            let p = self.active[&id].0.clone();
            let r = self.lift(&id).map(|o| o.unwrap_or(Undone::Gone));
            out.push((p, r));
        }
        if self.active.is_empty()
            && self
                .journal
                .pending()
                .is_ok_and(|p| p.placements.is_empty())
        {
            let _ = self.journal.clear();
        }
        out
    }
}

impl Drop for Throttler {
    /// Normal exit, Ctrl-C/SIGTERM (the loops return) and panics (unwinding) all end here.
    fn drop(&mut self) {
        for (p, r) in self.lift_all() {
            if let Err(e) = r {
                eprintln!(
                    "immp: error: could not restore PID {} ({}): {e:#}; run `immp restore`",
                    p.pid, p.comm
                );
            }
        }
    }
}

fn set_limit(p: &Placement, pct: f64, signals: Option<&SignalDriver>) -> anyhow::Result<()> {
    let quota = (pct / 100.0 * PERIOD_US as f64).round().max(1000.0) as u64;
    match p.mechanism {
        Mechanism::Signal => {
            if let Some(s) = signals {
                s.set(p.pid, p.start_time, pct);
            }
            Ok(())
        }
        Mechanism::CgroupV1 => {
            let dir = cap_dir(p).context("v1 placement without a cgroup")?;
            write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())
        }
        Mechanism::CgroupV2 => {
            let dir = cap_dir(p).unwrap_or_else(|| original_dir(p));
            write(&dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))
        }
    }
}
