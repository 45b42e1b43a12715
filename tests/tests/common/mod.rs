//! Helpers shared by the integration tests: real child processes with known behaviour, and
//! the real `immp` binary.
#![allow(dead_code)]

use std::path::PathBuf;

#[path = "../../src/ctl.rs"]
mod ctl;
pub use ctl::Workload;

impl Workload {
    /// Spawns the test build's workload binary and waits for `ready`.
    pub fn start(args: &[&str]) -> Self {
        Self::start_bin(WORKLOAD, args)
    }
}

pub const WORKLOAD: &str = env!("CARGO_BIN_EXE_immp-workload");

/// The `immp` binary next to this test's deps directory (built by `cargo build`, which
/// `cargo xtask test` runs first).
pub fn immp_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("immp");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build` first (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// A scratch directory on a real disk filesystem (tmpfs has no page-cache writeback).
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// The cpu cgroup of `pid` (v1 `cpu` line, else the v2 line); empty once it is gone.
pub fn cpu_cgroup(pid: u32) -> String {
    let t = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    immp::collect::procfs::parse_cpu_cgroup(&t)
}

/// Nanoseconds on CPU (schedstat: precise, unlike clock ticks).
pub fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub fn wait_until(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The fields of /proc/PID/stat after the command name (field 3, the state, is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Field 9 of /proc/PID/stat.
pub fn stat_flags(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(6)?.parse().ok()
}

/// Field 22 of /proc/PID/stat: start time in clock ticks since boot.
pub fn start_time(pid: u32) -> u64 {
    stat_fields(pid)
        .and_then(|f| f.get(19)?.parse().ok())
        .unwrap_or_else(|| panic!("no start time for PID {pid}"))
}

pub const PF_KTHREAD: u64 = 0x0020_0000;

/// A real kernel thread (PF_KTHREAD in /proc/PID/stat flags), found by scanning /proc rather
/// than assumed to be PID 2. Fails loudly when there is none (a PID namespace without one).
pub fn kernel_thread() -> u32 {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.into_iter()
        .find(|&p| stat_flags(p).is_some_and(|f| f & PF_KTHREAD != 0))
        .expect("no kernel thread visible in /proc (PF_KTHREAD 0x00200000 in no /proc/PID/stat)")
}

/// The hierarchy immp caps with: cgroup v2 when its cpu controller is available, else the v1
/// `cpu` hierarchy (the order immp itself prefers).
#[derive(Debug, Clone)]
pub enum CpuHierarchy {
    V1(PathBuf),
    V2(PathBuf),
}

impl CpuHierarchy {
    pub fn detect() -> Self {
        let l = immp::act::cgroup::CgroupLayout::detect();
        match (l.v2_mount, l.v1_cpu_mount) {
            (Some(m), _) if l.v2_controllers.iter().any(|c| c == "cpu") => Self::V2(m),
            (_, Some(m)) => Self::V1(m),
            _ => panic!("no cgroup cpu controller (neither v2 cpu nor a v1 cpu hierarchy)"),
        }
    }

    pub fn mount(&self) -> &std::path::Path {
        match self {
            Self::V1(m) | Self::V2(m) => m,
        }
    }

    /// The directory of a cgroup path as /proc/PID/cgroup shows it.
    pub fn dir(&self, cgroup: &str) -> PathBuf {
        self.mount().join(cgroup.trim_start_matches('/'))
    }

    /// (quota, period) in microseconds of the cgroup `cgroup`; quota None = unlimited.
    pub fn limit(&self, cgroup: &str) -> (Option<u64>, u64) {
        let d = self.dir(cgroup);
        let read = |f: &str| {
            std::fs::read_to_string(d.join(f))
                .unwrap_or_else(|e| panic!("{}: {e}", d.join(f).display()))
        };
        match self {
            Self::V1(_) => {
                let q: i64 = read("cpu.cfs_quota_us").trim().parse().unwrap();
                let p: u64 = read("cpu.cfs_period_us").trim().parse().unwrap();
                ((q >= 0).then_some(q as u64), p)
            }
            Self::V2(_) => {
                let t = read("cpu.max");
                let mut it = t.split_whitespace();
                let q = it.next().unwrap();
                let p: u64 = it.next().unwrap().parse().unwrap();
                ((q != "max").then(|| q.parse().unwrap()), p)
            }
        }
    }
}

/// The `immp-PID-*` cgroup directories a cap of PID could leave, given the cgroup it came
/// from: under it (v1), or beside it (v2 sibling caps).
pub fn cap_dirs_of(original: &str, pid: u32) -> Vec<PathBuf> {
    let h = CpuHierarchy::detect();
    let d = h.dir(original);
    let prefix = format!("immp-{pid}-");
    let mut out = vec![];
    for dir in [Some(d.as_path()), d.parent()].into_iter().flatten() {
        if let Ok(rd) = std::fs::read_dir(dir) {
            out.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| n.starts_with(&prefix))
                    })
                    .map(|e| e.path()),
            );
        }
    }
    out.sort();
    out.dedup();
    out
}
