//! Claims: one file per capped process in a directory every immp shares, whatever its journal
//! directory, so that two immp never cap the same process (nested cap cgroups, or one
//! "restoring" the process into the other's cap). Created with O_EXCL before the journal
//! entry, removed once the cap is undone. /run is a tmpfs: claims vanish at reboot, as caps do.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use immp_model::ProcId;

pub const DEFAULT_DIR: &str = "/run/immp/claims";

/// Who holds a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The immp process that capped it.
    pub pid: u32,
    pub journal_dir: String,
    /// That immp is still running (else it was killed: its journal still knows).
    pub alive: bool,
}

pub fn dir() -> PathBuf {
    std::env::var_os("IMMP_CLAIMS_DIR").map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from)
}

fn path(id: ProcId) -> PathBuf {
    dir().join(format!("{}-{}", id.pid, id.start_time))
}

/// The holder of `id`'s claim, if another immp (or a killed one) holds it.
pub fn holder(id: ProcId) -> Option<Holder> {
    let text = std::fs::read_to_string(path(id)).ok()?;
    let mut it = text.splitn(2, '\n');
    let pid: u32 = it.next()?.trim().parse().ok()?;
    let journal_dir = it.next().unwrap_or("").trim().to_string();
    let alive = pid == std::process::id()
        || std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "immp");
    Some(Holder {
        pid,
        journal_dir,
        alive,
    })
}

/// Why a claim cannot be taken, as one line.
pub fn refusal(id: ProcId, h: &Holder) -> String {
    if h.alive {
        format!(
            "PID {} is already capped by another immp (pid {}, journal {}); stop that one first",
            id.pid, h.pid, h.journal_dir
        )
    } else {
        format!(
            "PID {} was left capped by an immp that was killed; run `immp restore --journal-dir {}` first",
            id.pid, h.journal_dir
        )
    }
}

/// Takes the claim on `id` for this immp; an error names the holder.
pub fn take(id: ProcId, journal_dir: &Path) -> anyhow::Result<()> {
    let d = dir();
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let p = path(id);
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(mut f) => {
                writeln!(f, "{}\n{}", std::process::id(), journal_dir.display())?;
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match holder(id) {
                // Ours (a cap changed or re-taken after a crash of ours): fine.
                Some(h) if h.pid == std::process::id() => return Ok(()),
                Some(h) if !h.alive && Path::new(&h.journal_dir) == journal_dir => {
                    // Our own journal's leftover, already restored at start: stale.
                    let _ = std::fs::remove_file(&p);
                }
                Some(h) => anyhow::bail!(crate::error::ExitError {
                    code: crate::exit::USAGE,
                    msg: refusal(id, &h)
                }),
                None => {
                    let _ = std::fs::remove_file(&p); // unreadable or half-written: stale
                }
            },
            Err(e) => return Err(e).with_context(|| format!("creating {}", p.display())),
        }
    }
    anyhow::bail!("cannot claim PID {} in {}", id.pid, d.display())
}

/// Releases the claim on `id` once its cap is undone (also by `immp restore`).
pub fn release(id: ProcId) {
    let _ = std::fs::remove_file(path(id));
}
