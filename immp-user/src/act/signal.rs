//! The SIGSTOP/SIGCONT duty cycle (what cpulimit does), for machines without a cgroup cpu
//! controller: coarse, a last resort.
//!
//! Signals go through pidfds (`crate::pidfd`): never to another process that got the pid.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

pub use crate::pidfd::Pidfd;

/// Period of the SIGSTOP/SIGCONT duty cycle.
const SIGNAL_PERIOD: Duration = Duration::from_millis(100);

type Targets = Arc<Mutex<BTreeMap<u32, (Pidfd, f64)>>>;

/// The SIGSTOP/SIGCONT duty cycle, for machines without a cgroup cpu controller.
pub struct SignalDriver {
    targets: Targets,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// One period: everyone runs, then each is stopped when its share of the period is used.
fn cycle(t: &Targets) {
    let start = Instant::now();
    let Ok(m) = t.lock() else { return };
    let mut list: Vec<(&Pidfd, f64)> = m.values().map(|(fd, c)| (fd, *c)).collect();
    list.sort_by(|a, b| a.1.total_cmp(&b.1));
    for (fd, _) in &list {
        fd.signal(libc::SIGCONT);
    }
    for (fd, pct) in &list {
        let run = SIGNAL_PERIOD.mul_f64((pct / 100.0).min(1.0));
        if let Some(left) = run.checked_sub(start.elapsed()) {
            std::thread::sleep(left);
        }
        if *pct < 100.0 {
            fd.signal(libc::SIGSTOP);
        }
    }
    drop(m);
    if let Some(left) = SIGNAL_PERIOD.checked_sub(start.elapsed()) {
        std::thread::sleep(left);
    }
}

impl SignalDriver {
    pub fn start() -> Self {
        let targets: Targets = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (targets.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                cycle(&t);
            }
            if let Ok(m) = t.lock() {
                for (fd, _) in m.values() {
                    fd.signal(libc::SIGCONT);
                }
            }
        });
        Self {
            targets,
            stop,
            thread: Some(thread),
        }
    }

    /// Adds or changes a target; false when (pid, start time) no longer exists.
    pub fn set(&self, pid: u32, start_time: u64, pct: f64) -> bool {
        let Ok(mut m) = self.targets.lock() else {
            return false;
        };
        if let Some(e) = m.get_mut(&pid) {
            e.1 = pct;
            return true;
        }
        match Pidfd::open(pid, start_time) {
            Some(fd) => {
                m.insert(pid, (fd, pct));
                true
            }
            None => false,
        }
    }

    pub fn remove(&self, pid: u32) {
        let fd = self.targets.lock().ok().and_then(|mut m| m.remove(&pid));
        // Leaving it running is the safe state.
        if let Some((fd, _)) = fd {
            fd.signal(libc::SIGCONT);
        }
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SignalDriver {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::procfs;

    #[test]
    fn a_pidfd_is_bound_to_the_checked_process() {
        let me = procfs::stat(std::process::id()).unwrap().id;
        assert!(Pidfd::open(me.pid, me.start_time).is_some());
        assert!(
            Pidfd::open(me.pid, me.start_time + 1).is_none(),
            "another incarnation"
        );
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let id = procfs::stat(child.id()).unwrap().id;
        let fd = Pidfd::open(id.pid, id.start_time).unwrap();
        assert!(fd.signal(0), "alive");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            !fd.signal(0),
            "reaped: the fd never reaches a process that reuses the pid"
        );
    }
}
