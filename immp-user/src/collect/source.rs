//! What the sampler reads, behind two small traits: the kernel's counters (`Probes`) and the
//! process table (/proc). The real implementations talk to the system; the sampler's unit
//! tests use scripted ones to check counter diffs, exits and PID reuse without a kernel.
use immp_common::{Counters, ExitEvent};
use immp_model::snapshot::{Flavour, KernelStats};

use super::{procfs::ProcStat, softdirty::Frozen};
use immp_model::ProcId;

/// Per-process counters kept by the kernel programs.
pub trait CounterSource {
    /// All live entries (pid -> counters since the entry was created).
    fn read_counters(&self) -> Vec<(u32, Counters)>;
    /// One process's counters (a single lookup, for window boundaries).
    fn counters_of(&self, pid: u32) -> Option<Counters>;
    /// Exit events queued since the last call (final counts of each exited process).
    fn drain_exits(&mut self) -> Vec<ExitEvent>;
    fn kernel_stats(&self) -> KernelStats;
    fn flavour(&self) -> Flavour;
    fn folio_pages_known(&self) -> bool;
    /// Whether the shmem class is counted (write-family calls into tmpfs/memfd files).
    fn shmem_known(&self) -> bool;
    /// Capacity of the per-process table.
    fn capacity(&self) -> u32;
    /// Starts a new window for the kernel's per-window dedup of repeated write faults.
    fn next_window(&mut self) {}
    /// Starts a window of this process's own, right before it is re-armed (exact mode).
    fn start_window_of(&mut self, _pid: u32) {}
    /// The process follows the global windows again.
    fn forget_window_of(&mut self, _pid: u32) {}
    /// Why the preferred probes were not used, if they were not.
    fn fallback_reason(&self) -> Option<String> {
        None
    }
    /// Now on the clock of `Counters::first_ns` (CLOCK_BOOTTIME, nanoseconds).
    fn now_ns(&self) -> u64 {
        boot_ns()
    }
}

/// CLOCK_BOOTTIME in nanoseconds: the kernel side's `bpf_ktime_get_boot_ns`.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The process table, and the one write exact mode makes (clearing soft-dirty bits).
pub trait ProcSource {
    /// `None` when the process does not exist.
    fn stat(&self, pid: u32) -> Option<ProcStat>;
    fn cmdline(&self, pid: u32) -> String;
    fn cpu_cgroup(&self, pid: u32) -> String;
    /// Anonymous memory backed by transparent huge pages, bytes.
    fn anon_huge_bytes(&self, pid: u32) -> u64;
    /// Every pid in /proc, sorted.
    fn pids(&self) -> Vec<u32>;
    fn uptime_ticks(&self) -> u64;
    fn ticks_per_second(&self) -> u64;
    fn page_size(&self) -> u64;
    /// Re-arms soft-dirty for `pid` (`echo 4 > /proc/PID/clear_refs`).
    fn clear_refs(&self, pid: u32) -> std::io::Result<()>;
    /// Pages of `pid` with the soft-dirty bit set.
    fn count_soft_dirty(&self, pid: u32) -> Result<u64, String>;
    /// Whether soft-dirty works here (tested by effect).
    fn soft_dirty_supported(&self) -> Result<bool, String>;
    /// Whether (pid, start time) exists: `None` when it cannot be told (a read error).
    fn exists(&self, id: ProcId) -> Option<bool>;
    /// Round 0 and RAM of a migration started now (`collect::nonzero`).
    fn memory(&self) -> Option<immp_model::snapshot::Memory> {
        None
    }
    /// Pages the kernel has allocated since boot (/proc/vmstat pgalloc_*).
    fn page_allocs(&self) -> Option<u64> {
        None
    }
    /// Holds the process still until the guard drops (`--verify` window boundaries).
    fn freeze(&self, _id: ProcId) -> Frozen {
        Frozen::none()
    }
}

/// The live system's /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct LiveProcs;

impl ProcSource for LiveProcs {
    fn stat(&self, pid: u32) -> Option<ProcStat> {
        super::procfs::stat(pid)
    }
    fn cmdline(&self, pid: u32) -> String {
        super::procfs::cmdline(pid)
    }
    fn cpu_cgroup(&self, pid: u32) -> String {
        super::procfs::cpu_cgroup(pid)
    }
    fn anon_huge_bytes(&self, pid: u32) -> u64 {
        super::procfs::anon_huge_bytes(pid)
    }
    fn pids(&self) -> Vec<u32> {
        super::procfs::pids()
    }
    fn uptime_ticks(&self) -> u64 {
        super::procfs::uptime_ticks()
    }
    fn ticks_per_second(&self) -> u64 {
        super::procfs::ticks_per_second()
    }
    fn page_size(&self) -> u64 {
        super::procfs::page_size()
    }
    fn clear_refs(&self, pid: u32) -> std::io::Result<()> {
        super::softdirty::clear_refs(pid)
    }
    fn count_soft_dirty(&self, pid: u32) -> Result<u64, String> {
        super::softdirty::count_soft_dirty(pid)
    }
    fn soft_dirty_supported(&self) -> Result<bool, String> {
        super::softdirty::supported()
    }
    fn exists(&self, id: ProcId) -> Option<bool> {
        super::procfs::exists(id)
    }
    fn page_allocs(&self) -> Option<u64> {
        super::procfs::page_allocs()
    }
    fn memory(&self) -> Option<immp_model::snapshot::Memory> {
        Some(super::nonzero::memory())
    }
    fn freeze(&self, id: ProcId) -> Frozen {
        Frozen::stop(id.pid, id.start_time)
    }
}
