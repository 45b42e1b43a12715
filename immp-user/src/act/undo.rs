//! Undoing caps from their journal records: used when a cap is lifted, by `immp restore`
//! and at start-up for the leftovers of a crashed run.
use std::path::Path;

use anyhow::{Context as _, bail};
use immp_model::{
    ProcId,
    event::{Mechanism, Undone},
};

use super::{
    cgroup::{cap_dir, original_dir, remove_cgroup, write},
    claim,
    journal::{Entry, Journal, Pending, Placement},
    signal::Pidfd,
};
use crate::collect::procfs::{self, cgroup_line};

/// Each undone placement and how it went.
pub type UndoReport = Vec<(Placement, anyhow::Result<Undone>)>;

/// Undoes one placement from its journal record. Idempotent: undoing twice is harmless.
pub fn undo(p: &Placement) -> anyhow::Result<Undone> {
    match p.mechanism {
        Mechanism::Signal => Ok(match Pidfd::open(p.pid, p.start_time) {
            Some(fd) if fd.signal(libc::SIGCONT) => Undone::Continued,
            _ => Undone::Gone,
        }),
        Mechanism::CgroupV1 | Mechanism::CgroupV2 => match cap_dir(p) {
            None => reset_in_place(p),
            Some(dir) => move_back(p, &dir),
        },
    }
}

/// A cap set in place (cgroup v2): put the journaled `cpu.max` back.
fn reset_in_place(p: &Placement) -> anyhow::Result<Undone> {
    let prev = p.previous_cpu_max.clone().unwrap_or_else(|| "max".into());
    let dir = original_dir(p);
    let value = prev.split_whitespace().collect::<Vec<_>>().join(" ");
    write(&dir.join("cpu.max"), &value)?;
    Ok(Undone::Reset {
        cgroup: dir.display().to_string(),
        cpu_max: value,
    })
}

/// Everything in the cap cgroup goes back to the original: the process and any children it
/// forked while capped. A reused PID elsewhere is never touched (it is not in the cap cgroup).
fn move_back(p: &Placement, dir: &Path) -> anyhow::Result<Undone> {
    let mut moved = 0;
    if dir.exists() {
        let orig = original_dir(p);
        if !orig.is_dir() {
            bail!(
                "original cgroup {} no longer exists; PID {} left in {}",
                orig.display(),
                p.pid,
                dir.display()
            );
        }
        for _ in 0..5 {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
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
        remove_cgroup(dir)?;
    }
    if moved > 0 {
        let to = original_dir(p).display().to_string();
        return Ok(Undone::MovedBack { moved, to });
    }
    Ok(not_in_cap_cgroup(p))
}

/// The cap cgroup held nothing: say why, from where the process is now.
fn not_in_cap_cgroup(p: &Placement) -> Undone {
    let alive = procfs::stat(p.pid).is_some_and(|s| s.id.start_time == p.start_time);
    let text = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid)).unwrap_or_default();
    let now = match p.mechanism {
        Mechanism::CgroupV1 => cgroup_line(&text, |c| c.split(',').any(|x| x == "cpu")),
        _ => cgroup_line(&text, str::is_empty),
    };
    match now {
        _ if !alive => Undone::Gone,
        // Journaled, then a crash before the move; or someone moved it back for us.
        Some(c) if c == p.original => Undone::NothingToUndo,
        Some(c) => Undone::MovedAway { now_in: c },
        None => Undone::Gone,
    }
}

/// Whether a capped process still lives in its cap cgroup (false: someone moved it out, or
/// it exited). In-place and signal caps follow the process: always true.
pub fn still_capped(p: &Placement) -> bool {
    if p.capped.is_empty() {
        return true;
    }
    // Unreadable (a read error, or exited): no evidence that anyone moved it.
    let Ok(text) = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid)) else {
        return true;
    };
    let now = match p.mechanism {
        Mechanism::CgroupV1 => cgroup_line(&text, |c| c.split(',').any(|x| x == "cpu")),
        _ => cgroup_line(&text, str::is_empty),
    };
    now.is_none_or(|c| c == p.capped)
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
            claim::release(ProcId::new(p.pid, p.start_time));
        }
        out.push((p, r));
    }
    if out.iter().all(|(_, r)| r.is_ok()) {
        journal.clear()?;
    }
    Ok(out)
}
