//! Which processes and caps immp accepts, checked before anything changes.
use immp_model::ProcId;

use immp_model::text::clean;

use super::claim;
use crate::{collect::procfs, error::usage};

pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(1) as usize
}

/// The smallest cap any mechanism holds: the kernel's smallest CFS quota (1 ms) over its
/// longest period (1 s).
pub const MIN_CAP_PCT: f64 = 0.1;

/// A cap is a percentage of one CPU: at least 0.1 %, at most 100 x CPUs.
pub fn validate_cap(pct: f64) -> anyhow::Result<f64> {
    let max = 100.0 * online_cpus() as f64;
    if !(pct >= MIN_CAP_PCT && pct <= max) {
        return Err(usage(format!(
            "cap {pct}% is out of range: at least {MIN_CAP_PCT}% (the kernel's 1 ms quota per 1 s period) and at most {max}% ({} CPUs)",
            online_cpus()
        )));
    }
    Ok(pct)
}

/// A process immp may cap: exists, is a process (not a thread of one), is not PID 1, not a
/// kernel thread, not immp itself, not capped already by another immp.
pub fn validate_target(pid: u32) -> anyhow::Result<(ProcId, String)> {
    if pid == 1 {
        return Err(usage(
            "refusing PID 1 (init): capping it would stall the whole system",
        ));
    }
    if pid == std::process::id() {
        return Err(usage(format!("refusing PID {pid}: that is immp itself")));
    }
    let st = procfs::stat(pid).ok_or_else(|| usage(format!("no process with PID {pid}")))?;
    let name = clean(&st.comm).into_owned();
    if st.kernel_thread {
        return Err(usage(format!(
            "refusing PID {pid} ({name}): a kernel thread has no user memory and cannot be capped"
        )));
    }
    if let Some(tgid) = procfs::tgid(pid).filter(|&t| t != pid) {
        return Err(usage(format!(
            "PID {pid} is a thread of process {tgid}; caps apply to whole processes: use --pid {tgid}"
        )));
    }
    if procfs::is_zombie(pid) {
        return Err(usage(format!("PID {pid} ({name}) has already exited")));
    }
    if let Some(cg) = procfs::immp_cgroup(pid) {
        return Err(usage(format!(
            "PID {pid} ({name}) is already capped: it is in immp's cap cgroup {cg} (its own, or its parent's); lift that cap first"
        )));
    }
    if let Some(h) = claim::holder(st.id).filter(|h| h.pid != std::process::id()) {
        return Err(usage(claim::refusal(st.id, &h)));
    }
    Ok((st.id, st.comm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_range_depends_on_cpus() {
        assert!(validate_cap(0.0).is_err());
        assert!(
            validate_cap(0.05).is_err(),
            "below the kernel's smallest quota"
        );
        assert!(validate_cap(0.1).is_ok());
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
        let kthread = procfs::pids()
            .into_iter()
            .find(|&p| procfs::stat(p).is_some_and(|s| s.kernel_thread))
            .expect("a Linux system has kernel threads");
        let e = validate_target(kthread).unwrap_err().to_string();
        assert!(e.contains("kernel thread"), "{e}");
    }
}
