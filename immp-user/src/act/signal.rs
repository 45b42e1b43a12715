//! The SIGSTOP/SIGCONT duty cycle (what cpulimit does), for machines without a cgroup cpu
//! controller: coarse, a last resort.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::collect::procfs;

/// Period of the SIGSTOP/SIGCONT duty cycle.
const SIGNAL_PERIOD: Duration = Duration::from_millis(100);

/// The SIGSTOP/SIGCONT duty cycle, for machines without a cgroup cpu controller.
pub struct SignalDriver {
    targets: Arc<Mutex<BTreeMap<u32, (u64, f64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SignalDriver {
    pub fn start() -> Self {
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
                                procfs::stat(**p).is_some_and(|s| s.id.start_time == *st)
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

    pub fn set(&self, pid: u32, start_time: u64, pct: f64) {
        if let Ok(mut m) = self.targets.lock() {
            m.insert(pid, (start_time, pct));
        }
    }

    pub fn remove(&self, pid: u32) {
        if let Ok(mut m) = self.targets.lock() {
            m.remove(&pid);
        }
        // SAFETY: kill(2); leaving it running is the safe state.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    }

    pub fn stop(mut self) {
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
