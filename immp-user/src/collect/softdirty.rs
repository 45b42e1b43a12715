//! Soft-dirty support, tested by its effect: on kernels without CONFIG_MEM_SOFT_DIRTY,
//! writing `4` to clear_refs still "succeeds" and does nothing, so the return code proves nothing.
use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
};

const SOFT_DIRTY_BIT: u64 = 1 << 55;

/// Clears soft-dirty bits of *this* process only (harmless: nobody else reads them) and checks
/// that a write sets the bit again.
pub fn supported() -> Result<bool, String> {
    let page = super::procfs::page_size() as usize;
    // SAFETY: anonymous private mapping of one page, unmapped below; no aliasing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err("mmap failed".into());
    }
    let res = (|| {
        // SAFETY: p is a live, writable mapping of `page` bytes.
        unsafe { std::ptr::write_volatile(p as *mut u8, 1) };
        clear_refs_self()?;
        let after_clear = pagemap_self(p as usize)? & SOFT_DIRTY_BIT != 0;
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(p as *mut u8, 2) };
        let after_write = pagemap_self(p as usize)? & SOFT_DIRTY_BIT != 0;
        Ok(!after_clear && after_write)
    })();
    // SAFETY: unmapping the mapping created above.
    unsafe { libc::munmap(p, page) };
    res
}

fn clear_refs_self() -> Result<(), String> {
    OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .and_then(|mut f| f.write_all(b"4"))
        .map_err(|e| format!("clear_refs: {e}"))
}

/// Clears a process's soft-dirty bits (`echo 4 > /proc/PID/clear_refs`): harmless to it (only
/// soft-dirty readers such as CRIU care), and the only write exact mode makes.
pub fn clear_refs(pid: u32) -> std::io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/clear_refs"))?
        .write_all(b"4")
}

/// Pages of `pid` whose soft-dirty bit is set (pagemap bit 55), over all its mappings.
pub fn count_soft_dirty(pid: u32) -> Result<u64, String> {
    let page = super::procfs::page_size();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("PID {pid}: {e}"))?;
    let mut pm =
        File::open(format!("/proc/{pid}/pagemap")).map_err(|e| format!("PID {pid}: {e}"))?;
    let mut n = 0u64;
    let mut buf = Vec::new();
    for line in maps.lines() {
        let Some(range) = line.split_whitespace().next() else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        if line.ends_with("[vsyscall]") {
            continue;
        }
        let pages = ((b - a) / page) as usize;
        buf.resize(pages * 8, 0);
        if pm.seek(SeekFrom::Start(a / page * 8)).is_err() || pm.read_exact(&mut buf).is_err() {
            continue;
        }
        n += buf
            .chunks_exact(8)
            .filter(|c| u64::from_le_bytes((*c).try_into().unwrap_or([0; 8])) & SOFT_DIRTY_BIT != 0)
            .count() as u64;
    }
    Ok(n)
}

fn pagemap_self(addr: usize) -> Result<u64, String> {
    let page = super::procfs::page_size() as usize;
    let mut f = File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    f.seek(SeekFrom::Start((addr / page * 8) as u64))
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; 8];
    f.read_exact(&mut b).map_err(|e| format!("pagemap: {e}"))?;
    Ok(u64::from_le_bytes(b))
}

/// The calling thread at real-time priority until dropped. Re-arming a process and reading its
/// counters must not be split by that process running (its faults in between would land in
/// the wrong window): on a single vCPU, a SCHED_FIFO thread is not preempted by ordinary
/// tasks, so the boundary is one instant for them. Best effort: without the privilege,
/// nothing changes.
pub struct Realtime(Option<(libc::c_int, libc::sched_param)>);

impl Realtime {
    pub fn enter() -> Self {
        // SAFETY: reading and setting this thread's own scheduling policy.
        unsafe {
            let policy = libc::sched_getscheduler(0);
            let mut old: libc::sched_param = std::mem::zeroed();
            if policy < 0 || libc::sched_getparam(0, &mut old) != 0 {
                return Realtime(None);
            }
            let rt = libc::sched_param { sched_priority: 1 };
            if libc::sched_setscheduler(0, libc::SCHED_FIFO, &rt) != 0 {
                return Realtime(None);
            }
            Realtime(Some((policy, old)))
        }
    }
}

impl Drop for Realtime {
    fn drop(&mut self) {
        if let Some((policy, old)) = self.0 {
            // SAFETY: restoring this thread's own policy as it was.
            unsafe { libc::sched_setscheduler(0, policy, &old) };
        }
    }
}

/// A process held stopped (SIGSTOP) for a window boundary; SIGCONT when dropped. Only
/// `--verify` uses it: with the process still, reading pagemap, re-arming and reading the
/// counters happen at one instant of its life, so the two counts cover the same window.
pub struct Frozen(Option<crate::pidfd::Pidfd>);

impl Frozen {
    /// Nothing frozen (the process was already stopped, or cannot be).
    pub fn none() -> Self {
        Frozen(None)
    }

    /// Stops (pid, start time) and waits until every thread of it is stopped (at most 500 ms).
    pub fn stop(pid: u32, start_time: u64) -> Self {
        let Some(fd) = crate::pidfd::Pidfd::open(pid, start_time) else {
            return Frozen(None);
        };
        if all_threads_stopped(pid) {
            return Frozen(None); // stopped by someone else: leave it as it is
        }
        if !fd.signal(libc::SIGSTOP) {
            return Frozen(None);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
        while !all_threads_stopped(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        Frozen(Some(fd))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Some(fd) = &self.0 {
            fd.signal(libc::SIGCONT);
        }
    }
}

/// Every thread of `pid` is in a stopped state (`T`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    rd.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('T')))
            .unwrap_or(true) // a thread gone meanwhile does not write
    })
}
