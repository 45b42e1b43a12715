//! A handle on one process that outlives pid reuse: a pidfd opened for a process whose start
//! time was then checked refers to that process for good, so a signal sent through it can never
//! reach another process that got its pid (`kill(pid)` after a check could, between the check
//! and the kill).
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use crate::collect::procfs;

/// A handle on one process, checked against its start time when opened.
#[derive(Debug)]
pub struct Pidfd(OwnedFd);

impl Pidfd {
    /// `None` when no process (pid, start time) exists now.
    pub fn open(pid: u32, start_time: u64) -> Option<Self> {
        // SAFETY: pidfd_open(2) with no flags returns a new fd we own, or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: fd is a freshly opened descriptor owned by nobody else.
        let fd = Pidfd(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        // Checked after opening: if this is the right process now, the fd stays bound to it.
        procfs::stat(pid)
            .is_some_and(|s| s.id.start_time == start_time)
            .then_some(fd)
    }

    /// Sends `sig`; false once the process has exited.
    pub fn signal(&self, sig: i32) -> bool {
        // SAFETY: pidfd_send_signal(2) on a pidfd we own, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        r == 0
    }
}
