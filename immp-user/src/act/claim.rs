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
    let text = format!("{}\n{}\n", std::process::id(), journal_dir.display());
    for _ in 0..2 {
        match publish(&p, &text) {
            Ok(()) => return Ok(()),
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
                    // Unreadable (a claim is never seen half-written: `publish`): stale.
                    let _ = std::fs::remove_file(&p);
                }
            },
            Err(e) => return Err(e).with_context(|| format!("creating {}", p.display())),
        }
    }
    anyhow::bail!("cannot claim PID {} in {}", id.pid, d.display())
}

/// Creates `p` holding `text`, or fails with AlreadyExists, in one step: the text goes to a
/// file of our own first, then is linked to `p` (link never replaces). A claim created empty
/// and written after could be read in between by an immp started at the same instant, taken
/// for a stale one, removed, and both would cap the process (seen in a CI run).
fn publish(p: &Path, text: &str) -> std::io::Result<()> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = p.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".new-{}-{n}", std::process::id()));
    let tmp = p.with_file_name(name);
    let r = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .and_then(|()| std::fs::hard_link(&tmp, p));
    let _ = std::fs::remove_file(&tmp);
    r
}

/// Releases the claim on `id` once its cap is undone (also by `immp restore`).
pub fn release(id: ProcId) {
    let _ = std::fs::remove_file(path(id));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Racing immps: while many threads try to publish one claim, readers polling it never see
    /// it empty or half-written, exactly one publisher wins, and no private file is left.
    #[test]
    fn a_claim_is_never_seen_half_written_and_only_one_wins() {
        let dir = std::env::temp_dir().join(format!("immp-claim-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for round in 0..50 {
            let p = dir.join(format!("4242-{round}"));
            let text = format!(
                "{}\n/var/lib/immp/{}\n",
                std::process::id(),
                "x".repeat(4000)
            );
            let stop = std::sync::atomic::AtomicBool::new(false);
            let wins = std::thread::scope(|s| {
                let reader = s.spawn(|| {
                    let mut seen = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok(t) = std::fs::read_to_string(&p) {
                            assert_eq!(t, text, "a claim seen half-written");
                            seen += 1;
                        }
                    }
                    seen
                });
                let writers: Vec<_> = (0..4).map(|_| s.spawn(|| publish(&p, &text))).collect();
                let results: Vec<_> = writers.into_iter().map(|w| w.join()).collect();
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                reader.join().unwrap();
                results
                    .into_iter()
                    .map(|r| r.unwrap())
                    .filter(|r| match r {
                        Ok(()) => true,
                        Err(e) => {
                            assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
                            false
                        }
                    })
                    .count()
            });
            assert_eq!(
                wins, 1,
                "round {round}: exactly one publisher creates the claim"
            );
        }
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains(".new-"))
            .collect();
        assert!(left.is_empty(), "private files left: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
