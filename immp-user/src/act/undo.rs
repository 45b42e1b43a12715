//! Undoing caps from their journal records: used when a cap is lifted, by `immp restore`
//! and at start-up for the leftovers of a crashed run.
use anyhow::{Context as _, bail};
use immp_model::event::{Mechanism, Undone};

use super::{
    cgroup::{cap_dir, original_dir, remove_cgroup, write},
    journal::{Entry, Journal, Pending, Placement},
};
use crate::collect::procfs;

/// Each undone placement and how it went.
pub type UndoReport = Vec<(Placement, anyhow::Result<Undone>)>;

/// Undoes one placement from its journal record. Idempotent: undoing twice is harmless.
pub fn undo(p: &Placement) -> anyhow::Result<Undone> {
    match p.mechanism {
        Mechanism::Signal => {
            if procfs::stat(p.pid).is_some_and(|s| s.id.start_time == p.start_time) {
                // SAFETY: kill(2) with a pid whose start time we just checked.
                unsafe { libc::kill(p.pid as i32, libc::SIGCONT) };
                Ok(Undone::Continued)
            } else {
                Ok(Undone::Gone)
            }
        }
        Mechanism::CgroupV1 | Mechanism::CgroupV2 => match cap_dir(p) {
            None => {
                let prev = p.previous_cpu_max.clone().unwrap_or_else(|| "max".into());
                let dir = original_dir(p);
                let value = prev.split_whitespace().collect::<Vec<_>>().join(" ");
                write(&dir.join("cpu.max"), &value)?;
                Ok(Undone::Reset {
                    cgroup: dir.display().to_string(),
                    cpu_max: value,
                })
            }
            Some(dir) => {
                if !dir.exists() {
                    return Ok(Undone::Gone);
                }
                let orig = original_dir(p);
                if !orig.is_dir() {
                    bail!(
                        "original cgroup {} no longer exists; PID {} left in {}",
                        orig.display(),
                        p.pid,
                        dir.display()
                    );
                }
                // Everything in the cap cgroup goes back: the process and any children it
                // forked while capped. A reused PID elsewhere is never touched.
                let mut moved = 0;
                for _ in 0..5 {
                    let procs =
                        std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                    let pids: Vec<&str> = procs.split_whitespace().collect();
                    if pids.is_empty() {
                        break;
                    }
                    for pid in pids {
                        match std::fs::write(orig.join("cgroup.procs"), pid) {
                            Ok(()) => moved += 1,
                            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                            Err(e) => {
                                return Err(e).with_context(|| {
                                    format!("moving PID {pid} back to {}", orig.display())
                                });
                            }
                        }
                    }
                }
                remove_cgroup(&dir)?;
                if moved == 0 {
                    return Ok(Undone::Gone);
                }
                Ok(Undone::MovedBack {
                    moved,
                    to: orig.display().to_string(),
                })
            }
        },
    }
}

/// Restores every pending placement of the journal (used by `immp restore` and at start-up).
pub fn restore_all(journal: &mut Journal) -> anyhow::Result<UndoReport> {
    let Pending {
        placements,
        torn_tail,
    } = journal.pending()?;
    if torn_tail {
        eprintln!(
            "immp: note: the journal's last line was cut short by a crash; that change was never made"
        );
    }
    let mut out = Vec::new();
    for p in placements {
        let r = undo(&p);
        if r.is_ok() {
            journal.append(&Entry::Restored {
                pid: p.pid,
                start_time: p.start_time,
            })?;
        }
        out.push((p, r));
    }
    if out.iter().all(|(_, r)| r.is_ok()) {
        journal.clear()?;
    }
    Ok(out)
}
