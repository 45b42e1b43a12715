//! What /proc says about a process: identity, name, CPU time, memory, cgroup.
use procfs::process::Process;

use immp_model::ProcId;

/// `PF_KTHREAD` in /proc/PID/stat flags: kernel threads have no user memory to tame.
const PF_KTHREAD: u32 = 0x0020_0000;

#[derive(Debug, Clone)]
pub struct ProcStat {
    pub id: ProcId,
    pub comm: String,
    /// utime + stime, clock ticks.
    pub cpu_ticks: u64,
    pub rss_bytes: u64,
    pub kernel_thread: bool,
    pub ppid: i32,
}

pub fn ticks_per_second() -> u64 {
    procfs::ticks_per_second()
}

pub fn page_size() -> u64 {
    procfs::page_size()
}

/// `None` when the process does not exist (or is gone by the time we look).
pub fn stat(pid: u32) -> Option<ProcStat> {
    let p = Process::new(pid as i32).ok()?;
    let s = p.stat().ok()?;
    Some(ProcStat {
        id: ProcId {
            pid,
            start_time: s.starttime,
        },
        comm: s.comm.clone(),
        cpu_ticks: s.utime + s.stime,
        rss_bytes: s.rss * page_size(),
        kernel_thread: s.flags & PF_KTHREAD != 0,
        ppid: s.ppid,
    })
}

/// The thread group (process) a task id belongs to; `None` when it does not exist.
pub fn tgid(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The cap cgroup an immp put the process in (a path component `immp-<pid>-<start>`), in any
/// hierarchy; `None` when it is in none.
pub fn immp_cgroup(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .find(|path| path.split('/').any(is_cap_cgroup_name))
        .map(str::to_string)
}

/// `immp-<pid>-<start time>`: the name immp gives its cap cgroups.
pub fn is_cap_cgroup_name(name: &str) -> bool {
    name.strip_prefix("immp-")
        .and_then(|r| r.split_once('-'))
        .is_some_and(|(a, b)| {
            !a.is_empty() && !b.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
        })
}

/// An exited process its parent has not reaped yet.
pub fn is_zombie(pid: u32) -> bool {
    Process::new(pid as i32)
        .and_then(|p| p.stat())
        .is_ok_and(|s| s.state == 'Z')
}

/// The command line, arguments joined by spaces; empty for kernel threads and zombies.
pub fn cmdline(pid: u32) -> String {
    Process::new(pid as i32)
        .and_then(|p| p.cmdline())
        .map(|v| v.join(" "))
        .unwrap_or_default()
}

/// The cgroup that governs the process's CPU: the v1 hierarchy with the `cpu` controller if
/// there is one, else the unified (v2) path.
pub fn cpu_cgroup(pid: u32) -> String {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return String::new();
    };
    parse_cpu_cgroup(&text)
}

/// Every pid in /proc, sorted.
pub fn pids() -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// The path of the first line of /proc/PID/cgroup whose controller list satisfies `want`
/// (`str::is_empty` picks the unified v2 line).
pub fn cgroup_line(text: &str, want: impl Fn(&str) -> bool) -> Option<String> {
    text.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        want(ctrls).then(|| path.to_string())
    })
}

/// The cpu hierarchy's path when there is one (v1), else the unified (v2) path.
pub fn parse_cpu_cgroup(text: &str) -> String {
    cgroup_line(text, |c| c.split(',').any(|x| x == "cpu"))
        .or_else(|| cgroup_line(text, str::is_empty))
        .unwrap_or_default()
}

/// A `Key:   N kB` field of a /proc file, in bytes.
fn kb_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let v = text.lines().find_map(|l| l.strip_prefix(key))?;
    v.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// Anonymous memory backed by transparent huge pages, bytes (smaps_rollup AnonHugePages).
pub fn anon_huge_bytes(pid: u32) -> u64 {
    kb_field(&format!("/proc/{pid}/smaps_rollup"), "AnonHugePages:").unwrap_or(0)
}

/// Memory in use, bytes (MemTotal - MemFree): what an idle migration's round 0 sends (pages
/// never touched are zero pages, which cost QEMU almost nothing to send). Freed pages that
/// were written once are not zero and are sent too: on a long-running guest this is a lower
/// bound (`--ram` sets it).
pub fn mem_used() -> f64 {
    let total = kb_field("/proc/meminfo", "MemTotal:");
    let free = kb_field("/proc/meminfo", "MemFree:");
    match (total, free) {
        (Some(t), Some(f)) => t.saturating_sub(f) as f64,
        _ => mem_total(),
    }
}

/// Whether (pid, start time) exists: `Some(false)` only when it surely does not (no such pid,
/// or another process has it), `None` when /proc could not tell (a read error is not an exit).
pub fn exists(id: ProcId) -> Option<bool> {
    // SAFETY: pidfd_open(2) with no flags; the fd is closed right below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, id.pid as libc::c_int, 0) };
    if fd < 0 {
        let esrch = std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        return if esrch { Some(false) } else { None };
    }
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd as i32) };
    for _ in 0..3 {
        if let Some(s) = stat(id.pid) {
            return Some(s.id == id);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    None
}

/// Pages allocated since boot, all zones (/proc/vmstat `pgalloc_*`).
pub fn page_allocs() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/vmstat").ok()?;
    let sum = text
        .lines()
        .filter(|l| l.starts_with("pgalloc_"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    Some(sum)
}

/// This machine's RAM, bytes (inside a guest: the RAM that migration sends).
pub fn mem_total() -> f64 {
    kb_field("/proc/meminfo", "MemTotal:").map_or(1e9, |b| b as f64)
}

/// Seconds since boot (for process ages).
pub fn uptime_ticks() -> u64 {
    let secs = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    (secs * ticks_per_second() as f64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_hybrid_prefers_cpu_hierarchy() {
        let t = "12:cpu:/immp/42\n11:memory:/\n0::/user.slice\n";
        assert_eq!(parse_cpu_cgroup(t), "/immp/42");
        assert_eq!(
            parse_cpu_cgroup("0::/system.slice/x.service\n"),
            "/system.slice/x.service"
        );
        assert_eq!(parse_cpu_cgroup("3:cpu,cpuacct:/a\n"), "/a");
        assert_eq!(parse_cpu_cgroup(""), "");
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

    #[test]
    fn cap_cgroup_names() {
        assert!(is_cap_cgroup_name("immp-42-12345"));
        assert!(!is_cap_cgroup_name("immp-tests"));
        assert!(!is_cap_cgroup_name("immp-42-"));
        assert!(!is_cap_cgroup_name("user.slice"));
        assert_eq!(tgid(std::process::id()), Some(std::process::id()));
    }

    #[test]
    fn self_stat() {
        let me = stat(std::process::id()).expect("own stat");
        assert!(!me.kernel_thread);
        assert!(me.id.start_time > 0);
        assert!(
            pids()
                .into_iter()
                .any(|p| stat(p).is_some_and(|s| s.kernel_thread)),
            "kernel threads are flagged"
        );
    }
}
