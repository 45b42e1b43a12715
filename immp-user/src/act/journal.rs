//! The journal: every placement change is written here (and fsync'd) *before* it is made, so
//! that `immp restore` can put every process back after a crash or SIGKILL. Restore reads only
//! the journal. One JSON object per line; a lock file keeps a second immp from writing.
use std::{
    fs::{File, OpenOptions},
    io::{BufReader, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use immp_model::event::Mechanism;
use serde::{Deserialize, Serialize};

pub const DEFAULT_DIR: &str = "/var/lib/immp";

/// Where a process was and where immp put it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    pub mechanism: Mechanism,
    /// Mount point of the hierarchy (cgroup mechanisms).
    pub root: PathBuf,
    /// The process's cgroup before immp touched it, relative to `root`.
    pub original: String,
    /// The cgroup immp created for it, relative to `root` (empty: capped in place).
    pub capped: String,
    /// For a cap set in place (v2), the `cpu.max` value to put back.
    pub previous_cpu_max: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Entry {
    /// About to move/cap this process (written before the change).
    Place(Placement),
    /// Put back (written after the change was undone).
    Restored { pid: u32, start_time: u64 },
}

pub struct Journal {
    path: PathBuf,
    file: File,
    // Held for the life of the journal: flock is released by the kernel even on SIGKILL.
    _lock: File,
}

/// Outcome of reading a journal.
pub struct Pending {
    /// Placements not yet restored, in journal order.
    pub placements: Vec<Placement>,
    /// A last line cut short by a crash mid-write: that change was never made (the journal is
    /// written and synced before each change), so it is safely ignored.
    pub torn_tail: bool,
}

impl Journal {
    /// Opens (creating) the journal in `dir` and takes the lock; refuses if another immp holds it.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
            bail!(
                "another immp is managing caps (lock {} held{}); stop it first",
                lock_path.display(),
                if holder.trim().is_empty() {
                    String::new()
                } else {
                    format!(" by pid {}", holder.trim())
                }
            );
        }
        let _ = lock.set_len(0);
        let _ = (&lock).write_all(std::process::id().to_string().as_bytes());
        let path = dir.join("journal");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // Make the journal's directory entry durable too.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(Self {
            path,
            file,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry and syncs it to disk before returning.
    pub fn append(&mut self, e: &Entry) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(e)?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.file
            .sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))?;
        Ok(())
    }

    /// Everything placed and not restored. A corrupt line is an error: no guessing.
    pub fn pending(&self) -> anyhow::Result<Pending> {
        read_pending(&self.path)
    }

    /// Empties the journal once nothing is pending.
    pub fn clear(&mut self) -> anyhow::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        Ok(())
    }
}

pub fn read_pending(path: &Path) -> anyhow::Result<Pending> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Pending {
                placements: vec![],
                torn_tail: false,
            });
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let text = {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut BufReader::new(f), &mut s)
            .with_context(|| format!("reading {}", path.display()))?;
        s
    };
    parse(&text, path)
}

fn parse(text: &str, path: &Path) -> anyhow::Result<Pending> {
    let mut placements: Vec<Placement> = Vec::new();
    let mut torn_tail = false;
    let complete = text.ends_with('\n') || text.is_empty();
    let all: Vec<&str> = text.split('\n').collect();
    for (i, line) in all.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let last = i == all.len() - 1;
        match serde_json::from_str::<Entry>(line) {
            Ok(Entry::Place(p)) => {
                placements.retain(|q| !(q.pid == p.pid && q.start_time == p.start_time));
                placements.push(p);
            }
            Ok(Entry::Restored { pid, start_time }) => {
                placements.retain(|q| !(q.pid == pid && q.start_time == start_time));
            }
            Err(_) if last && !complete => torn_tail = true,
            Err(e) => bail!(
                "journal {} is corrupt at line {}: {e}; fix or move it aside by hand (nothing was changed)",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(Pending {
        placements,
        torn_tail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(pid: u32) -> Entry {
        Entry::Place(Placement {
            pid,
            start_time: 7,
            comm: "w".into(),
            mechanism: Mechanism::CgroupV1,
            root: "/sys/fs/cgroup/cpu".into(),
            original: "/".into(),
            capped: format!("/immp/{pid}-7"),
            previous_cpu_max: None,
        })
    }

    fn text(entries: &[Entry]) -> String {
        entries
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect()
    }

    #[test]
    fn restored_entries_cancel_placements() {
        let t = text(&[
            place(1),
            place(2),
            Entry::Restored {
                pid: 1,
                start_time: 7,
            },
        ]);
        let p = parse(&t, Path::new("j")).unwrap();
        assert_eq!(p.placements.len(), 1);
        assert_eq!(p.placements[0].pid, 2);
        assert!(!p.torn_tail);
    }

    #[test]
    fn torn_last_line_is_ignored_but_corruption_elsewhere_is_an_error() {
        let mut t = text(&[place(1)]);
        t.push_str("{\"op\":\"place\",\"pid\":3");
        let p = parse(&t, Path::new("j")).unwrap();
        assert!(p.torn_tail);
        assert_eq!(p.placements.len(), 1);

        let bad = format!("garbage\n{}", text(&[place(1)]));
        let e = parse(&bad, Path::new("j")).err().unwrap().to_string();
        assert!(e.contains("corrupt at line 1"), "{e}");
    }

    #[test]
    fn lock_refuses_a_second_writer() {
        let dir = std::env::temp_dir().join(format!("immp-journal-test-{}", std::process::id()));
        let mut j = Journal::open(&dir).unwrap();
        let second = Journal::open(&dir);
        assert!(second.is_err(), "second journal must be refused");
        assert!(second.err().unwrap().to_string().contains("another immp"));
        j.append(&place(9)).unwrap();
        assert_eq!(j.pending().unwrap().placements.len(), 1);
        j.clear().unwrap();
        assert!(j.pending().unwrap().placements.is_empty());
        drop(j);
        // A child another test forks in this process may hold the lock's fd for the instant
        // between its fork and its exec (close-on-exec): allow it that instant.
        let reopened = (0..50).any(|_| {
            Journal::open(&dir).is_ok() || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                false
            }
        });
        assert!(reopened, "lock released on drop");
        let _ = std::fs::remove_dir_all(dir);
    }
}
