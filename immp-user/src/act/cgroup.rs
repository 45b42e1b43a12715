//! cgroups: which CPU-capping mechanism this machine offers (cgroup v2 `cpu.max`, cgroup v1 CFS
//! quota, or neither: then only a signal duty cycle), and the file operations on them.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use immp_model::ProcId;
use serde::Serialize;

use super::journal::Placement;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum CpuController {
    /// cgroup2 with the cpu controller enabled at its root.
    V2 { root: PathBuf },
    /// cgroup v1 hierarchy with the cpu controller (cpu.cfs_quota_us).
    V1 { root: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupLayout {
    pub v2_mount: Option<PathBuf>,
    pub v2_controllers: Vec<String>,
    pub v1_cpu_mount: Option<PathBuf>,
}

impl CgroupLayout {
    pub fn detect() -> Self {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        Self::from_mountinfo(&mounts, |p| std::fs::read_to_string(p).ok())
    }

    /// `read` reads a file (injected so that the parsing is testable without cgroups).
    pub fn from_mountinfo(mountinfo: &str, read: impl Fn(&Path) -> Option<String>) -> Self {
        let mut v2_mount = None;
        let mut v1_cpu_mount = None;
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mount_point = left.split_whitespace().nth(4).map(PathBuf::from);
            let mut r = right.split_whitespace();
            let fstype = r.next().unwrap_or("");
            let super_opts = r.nth(1).unwrap_or("");
            match (fstype, mount_point) {
                ("cgroup2", Some(mp)) if v2_mount.is_none() => v2_mount = Some(mp),
                ("cgroup", Some(mp))
                    if v1_cpu_mount.is_none() && super_opts.split(',').any(|o| o == "cpu") =>
                {
                    v1_cpu_mount = Some(mp)
                }
                _ => {}
            }
        }
        let v2_controllers = v2_mount
            .as_ref()
            .and_then(|m| read(&m.join("cgroup.controllers")))
            .map(|s| s.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        Self {
            v2_mount,
            v2_controllers,
            v1_cpu_mount,
        }
    }

    /// The mechanism immp uses: v2 when its cpu controller is available, else v1.
    pub fn cpu_controller(&self) -> Option<CpuController> {
        if let Some(root) = &self.v2_mount
            && self.v2_controllers.iter().any(|c| c == "cpu")
        {
            return Some(CpuController::V2 { root: root.clone() });
        }
        self.v1_cpu_mount
            .clone()
            .map(|root| CpuController::V1 { root })
    }
}

/// The cgroup immp creates for one process under `parent` (named by pid and start time, so
/// that a reused pid never shares it).
pub fn cap_cgroup_under(parent: &str, id: ProcId) -> String {
    format!(
        "{}/immp-{}-{}",
        parent.trim_end_matches('/'),
        id.pid,
        id.start_time
    )
}

/// The cgroup directory immp created, if it created one.
pub fn cap_dir(p: &Placement) -> Option<PathBuf> {
    (!p.capped.is_empty()).then(|| p.root.join(p.capped.trim_start_matches('/')))
}

pub fn original_dir(p: &Placement) -> PathBuf {
    p.root.join(p.original.trim_start_matches('/'))
}

pub fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

/// cgroup v2: the cpu controller must be enabled in every ancestor's subtree_control.
pub fn enable_cpu_controller(root: &Path, parent: &Path) -> anyhow::Result<()> {
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

/// rmdir, retrying briefly: an exiting task can keep a cgroup busy for a moment.
pub fn remove_cgroup(dir: &Path) -> anyhow::Result<()> {
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

/// The lowest CPU limit, in percent of one CPU, that the process's original cgroup and its
/// ancestors set, and the cgroup that sets it; `None` when none is limited (or for signals).
pub fn limit_pct(p: &Placement) -> Option<(f64, String)> {
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).ok();
    let limit_of = |d: &Path| -> Option<f64> {
        match p.mechanism {
            immp_model::event::Mechanism::CgroupV1 => {
                let quota: i64 = read(d, "cpu.cfs_quota_us")?.trim().parse().ok()?;
                let period: f64 = read(d, "cpu.cfs_period_us")?.trim().parse().ok()?;
                (quota > 0).then(|| quota as f64 / period * 100.0)
            }
            immp_model::event::Mechanism::CgroupV2 => parse_cpu_max(&read(d, "cpu.max")?),
            immp_model::event::Mechanism::Signal => None,
        }
    };
    let mut best: Option<(f64, String)> = None;
    let mut rel = PathBuf::from(&p.original);
    loop {
        let dir = p.root.join(rel.strip_prefix("/").unwrap_or(&rel));
        if let Some(l) = limit_of(&dir)
            && best.as_ref().is_none_or(|b| l < b.0)
        {
            best = Some((l, rel.display().to_string()));
        }
        if !rel.pop() || rel.as_os_str().is_empty() {
            break;
        }
    }
    best
}

/// `cpu.max` ("max 100000" or "20000 100000") as percent of one CPU; `None` for no limit.
pub fn parse_cpu_max(s: &str) -> Option<f64> {
    let mut it = s.split_whitespace();
    let quota: f64 = it.next()?.parse().ok()?;
    let period: f64 = it.next().unwrap_or("100000").parse().ok()?;
    (period > 0.0).then(|| quota / period * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 23 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
33 30 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 30 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
";

    #[test]
    fn hybrid_without_v2_cpu_uses_v1() {
        let l = CgroupLayout::from_mountinfo(HYBRID, |_| Some("memory pids\n".into()));
        assert_eq!(
            l.v2_mount.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            l.v1_cpu_mount.as_deref(),
            Some(Path::new("/sys/fs/cgroup/cpu"))
        );
        assert_eq!(
            l.cpu_controller(),
            Some(CpuController::V1 {
                root: "/sys/fs/cgroup/cpu".into()
            })
        );
    }

    #[test]
    fn cpu_max_values() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("20000 100000"), Some(20.0));
        assert_eq!(parse_cpu_max("1000 200000"), Some(0.5));
    }

    #[test]
    fn v2_with_cpu_wins() {
        let mi = "31 23 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let l = CgroupLayout::from_mountinfo(mi, |_| Some("cpuset cpu io memory\n".into()));
        assert_eq!(
            l.cpu_controller(),
            Some(CpuController::V2 {
                root: "/sys/fs/cgroup".into()
            })
        );
        let none = CgroupLayout::from_mountinfo(mi, |_| Some("memory\n".into()));
        assert_eq!(none.cpu_controller(), None);
    }
}
