//! Which processes and caps immp accepts, checked before anything changes.
use immp_model::ProcId;

use crate::{collect::procfs, error::usage};

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
    let st = procfs::stat(pid).ok_or_else(|| usage(format!("no process with PID {pid}")))?;
    if st.kernel_thread {
        return Err(usage(format!(
            "refusing PID {pid} ({}): a kernel thread has no user memory and cannot be capped",
            st.comm
        )));
    }
    if procfs::is_zombie(pid) {
        return Err(usage(format!("PID {pid} ({}) has already exited", st.comm)));
    }
    Ok((st.id, st.comm))
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
        if procfs::stat(2).is_some_and(|s| s.kernel_thread) {
            assert!(
                validate_target(2)
                    .unwrap_err()
                    .to_string()
                    .contains("kernel thread")
            );
        }
    }
}
