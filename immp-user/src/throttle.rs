//! The actuator: caps a process's CPU share live, and always undoes it.
//!
//! Every change is journaled (and synced) first; undoing reads the journal's placement. Only
//! this module (and `immp restore`, through it) changes cgroup membership, limits or signals.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde::Serialize;

use crate::{
    cgroup::{CgroupLayout, CpuController},
    journal::{Entry, Journal, Mechanism, Pending, Placement},
    procinfo,
    snapshot::ProcId,
    usage,
};

/// CFS period used for quotas (the kernel default).
const PERIOD_US: u64 = 100_000;
/// Period of the SIGSTOP/SIGCONT duty cycle.
const SIGNAL_PERIOD: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MechanismChoice {
    /// cgroup v2 cpu.max if available, else cgroup v1 CFS quota, else signals
    #[default]
    Auto,
    CgroupV2,
    CgroupV1,
    /// SIGSTOP/SIGCONT duty cycle (what cpulimit does; coarse, last resort)
    Signal,
}

pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(1) as usize
}

/// A cap is a percentage of one CPU: above 0, at most 100 x CPUs.
pub fn validate_cap(pct: f64) -> anyhow::Result<f64> {
    let max = 100.0 * online_cpus() as f64;
    if !(pct > 0.0 && pct <= max) {
        return Err(usage(format!(
            "cap {pct}% is out of range: above 0% and at most {max}% ({} CPUs)",
            online_cpus()
        )));
    }
    Ok(pct)
}

/// A process immp may cap: exists, is not PID 1, not a kernel thread, not immp itself.
pub fn validate_target(pid: u32) -> anyhow::Result<(ProcId, String)> {
    if pid == 1 {
        return Err(usage(
            "refusing PID 1 (init): capping it would stall the whole system",
        ));
    }
    if pid == std::process::id() {
        return Err(usage(format!("refusing PID {pid}: that is immp itself")));
    }
    let st = procinfo::stat(pid).ok_or_else(|| usage(format!("no process with PID {pid}")))?;
    if st.kernel_thread {
        return Err(usage(format!(
            "refusing PID {pid} ({}): a kernel thread has no user memory and cannot be capped",
            st.comm
        )));
    }
    if procinfo::is_zombie(pid) {
        return Err(usage(format!("PID {pid} ({}) has already exited", st.comm)));
    }
    Ok((st.id, st.comm))
}

#[derive(Debug, Clone, Serialize)]
pub struct Capped {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    pub cap_pct: f64,
    pub mechanism: Mechanism,
    /// The cgroup the cap lives in (absolute path), or empty for signals.
    pub cgroup: String,
}

/// What undoing one placement did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Undone {
    /// Processes moved back to the original cgroup (the capped one and its children).
    MovedBack { moved: usize, to: String },
    /// A cap set in place was reset to its previous value.
    Reset { cgroup: String, cpu_max: String },
    /// SIGCONT sent.
    Continued,
    /// The process (and any children) no longer exist; only the empty cap cgroup was removed.
    Gone,
}

/// Each undone placement and how it went.
pub type UndoReport = Vec<(Placement, anyhow::Result<Undone>)>;

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
        if procinfo::stat(id.pid).is_none_or(|s| s.id != id) {
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

/// The cgroup immp creates for one process under `parent` (named by pid and start time, so
/// that a reused pid never shares it).
fn cap_cgroup_under(parent: &str, id: ProcId) -> String {
    format!(
        "{}/immp-{}-{}",
        parent.trim_end_matches('/'),
        id.pid,
        id.start_time
    )
}

fn cgroup_line(text: &str, want: impl Fn(&str) -> bool) -> Option<String> {
    text.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        want(ctrls).then(|| path.to_string())
    })
}

fn pick_mechanism(choice: MechanismChoice) -> anyhow::Result<(Mechanism, PathBuf)> {
    let layout = CgroupLayout::detect();
    let ctl = layout.cpu_controller();
    let v1 = layout.v1_cpu_mount.clone();
    let v2 = layout
        .v2_mount
        .clone()
        .filter(|_| layout.v2_controllers.iter().any(|c| c == "cpu"));
    let no = |what: &str| {
        crate::environment(format!(
            "no usable cpu controller: {what} (see `immp doctor`)"
        ))
    };
    Ok(match choice {
        MechanismChoice::Auto => match ctl {
            Some(CpuController::V2 { root }) => (Mechanism::CgroupV2, root),
            Some(CpuController::V1 { root }) => (Mechanism::CgroupV1, root),
            None => (Mechanism::Signal, PathBuf::new()),
        },
        MechanismChoice::CgroupV2 => (
            Mechanism::CgroupV2,
            v2.ok_or_else(|| no("cgroup v2 has no cpu controller here"))?,
        ),
        MechanismChoice::CgroupV1 => (
            Mechanism::CgroupV1,
            v1.ok_or_else(|| no("no cgroup v1 cpu hierarchy here"))?,
        ),
        MechanismChoice::Signal => (Mechanism::Signal, PathBuf::new()),
    })
}

/// The cgroup directory immp created, if it created one.
fn cap_dir(p: &Placement) -> Option<PathBuf> {
    (!p.capped.is_empty()).then(|| p.root.join(p.capped.trim_start_matches('/')))
}

fn original_dir(p: &Placement) -> PathBuf {
    p.root.join(p.original.trim_start_matches('/'))
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

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

/// cgroup v2: the cpu controller must be enabled in every ancestor's subtree_control.
fn enable_cpu_controller(root: &Path, parent: &Path) -> anyhow::Result<()> {
    let mut chain = vec![];
    let mut d = parent.to_path_buf();
    while d.starts_with(root) {
        chain.push(d.clone());
        if d == root {
            break;
        }
        d = d.parent().map(Path::to_path_buf).unwrap_or_default();
    }
    for dir in chain.into_iter().rev() {
        let sc = dir.join("cgroup.subtree_control");
        let on =
            std::fs::read_to_string(&sc).is_ok_and(|s| s.split_whitespace().any(|c| c == "cpu"));
        if !on {
            write(&sc, "+cpu").with_context(|| {
                format!(
                    "enabling the cpu controller under {} (processes in it? see README)",
                    dir.display()
                )
            })?;
        }
    }
    Ok(())
}

/// Undoes one placement from its journal record. Idempotent: undoing twice is harmless.
pub fn undo(p: &Placement) -> anyhow::Result<Undone> {
    match p.mechanism {
        Mechanism::Signal => {
            if procinfo::stat(p.pid).is_some_and(|s| s.id.start_time == p.start_time) {
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

/// rmdir, retrying briefly: an exiting task can keep a cgroup busy for a moment.
fn remove_cgroup(dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
        }
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

/// The SIGSTOP/SIGCONT duty cycle, for machines without a cgroup cpu controller.
struct SignalDriver {
    targets: Arc<Mutex<BTreeMap<u32, (u64, f64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SignalDriver {
    fn start() -> Self {
        let targets: Arc<Mutex<BTreeMap<u32, (u64, f64)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (targets.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let sig = |pid: u32, sig: i32| {
                // SAFETY: kill(2); the pid's start time is checked when it is registered.
                unsafe { libc::kill(pid as i32, sig) };
            };
            while !s.load(Ordering::Relaxed) {
                let start = Instant::now();
                // A pid whose start time changed is a new process: never signal it.
                let mut list: Vec<(u32, f64)> = t
                    .lock()
                    .map(|m| {
                        m.iter()
                            .filter(|(p, (st, _))| {
                                procinfo::stat(**p).is_some_and(|s| s.id.start_time == *st)
                            })
                            .map(|(p, (_, c))| (*p, *c))
                            .collect()
                    })
                    .unwrap_or_default();
                list.sort_by(|a, b| a.1.total_cmp(&b.1));
                for (pid, _) in &list {
                    sig(*pid, libc::SIGCONT);
                }
                for (pid, pct) in &list {
                    let run = SIGNAL_PERIOD.mul_f64((pct / 100.0).min(1.0));
                    if let Some(left) = run.checked_sub(start.elapsed()) {
                        std::thread::sleep(left);
                    }
                    if *pct < 100.0 {
                        sig(*pid, libc::SIGSTOP);
                    }
                }
                if let Some(left) = SIGNAL_PERIOD.checked_sub(start.elapsed()) {
                    std::thread::sleep(left);
                }
            }
            if let Ok(m) = t.lock() {
                for pid in m.keys() {
                    sig(*pid, libc::SIGCONT);
                }
            }
        });
        Self {
            targets,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, pid: u32, start_time: u64, pct: f64) {
        if let Ok(mut m) = self.targets.lock() {
            m.insert(pid, (start_time, pct));
        }
    }

    fn remove(&self, pid: u32) {
        if let Ok(mut m) = self.targets.lock() {
            m.remove(&pid);
        }
        // SAFETY: kill(2); leaving it running is the safe state.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SignalDriver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_range_depends_on_cpus() {
        assert!(validate_cap(0.0).is_err());
        assert!(validate_cap(-5.0).is_err());
        assert!(validate_cap(20.0).is_ok());
        let max = 100.0 * online_cpus() as f64;
        assert!(validate_cap(max).is_ok());
        assert!(validate_cap(max + 50.0).is_err());
    }

    #[test]
    fn refusals() {
        assert!(
            validate_target(1)
                .unwrap_err()
                .to_string()
                .contains("PID 1")
        );
        assert!(
            validate_target(std::process::id())
                .unwrap_err()
                .to_string()
                .contains("immp itself")
        );
        assert!(
            validate_target(4_194_305)
                .unwrap_err()
                .to_string()
                .contains("no process")
        );
        if procinfo::stat(2).is_some_and(|s| s.kernel_thread) {
            assert!(
                validate_target(2)
                    .unwrap_err()
                    .to_string()
                    .contains("kernel thread")
            );
        }
    }

    #[test]
    fn cgroup_lines() {
        let t = "12:cpu,cpuacct:/a/b\n0::/user.slice\n";
        assert_eq!(
            cgroup_line(t, |c| c.split(',').any(|x| x == "cpu")).as_deref(),
            Some("/a/b")
        );
        assert_eq!(
            cgroup_line(t, str::is_empty).as_deref(),
            Some("/user.slice")
        );
    }
}
