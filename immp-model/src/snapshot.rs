//! The immutable value that collection hands to everything else (rank, views, policy).
//! Nothing in here touches the system.
use serde::Serialize;

/// How the dirty numbers were obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Fault and page-cache events only: a lower bound of pages dirtied, since a process that
    /// rewrites pages it already dirtied takes no new fault.
    Bounds,
    /// Soft-dirty windows: exact distinct pages dirtied per window (later issue).
    Exact,
}

impl Mode {
    /// The name used in JSON, CSV and tables alike.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Bounds => "bounds",
            Mode::Exact => "exact",
        }
    }

    pub fn explain(self) -> &'static str {
        match self {
            Mode::Bounds => {
                "lower bound: counts write faults and page-cache pages dirtied; rewrites of pages \
                 already dirty are invisible without soft-dirty"
            }
            Mode::Exact => "exact: distinct pages dirtied per soft-dirty window",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which kind of kernel probes measured a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// Raw tracepoints checked against the kernel's BTF: the tracepoints' own arguments,
    /// folio sizes known.
    Btf,
    /// Classic tracepoints (perf events on tracefs): no folio size, each dirtied folio = 1 page.
    Tracepoint,
}

impl std::fmt::Display for Flavour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Flavour::Btf => "btf",
            Flavour::Tracepoint => "tracepoint",
        })
    }
}

/// Health counters from the kernel side; all totals since load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KernelStats {
    pub map_full: u64,
    pub exit_lost: u64,
    pub exits_sent: u64,
    pub entries_created: u64,
}

/// A process is (pid, start time): pids are reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ProcId {
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    pub start_time: u64,
}

/// Per-second rates over the interval, in pages per second (base pages).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    pub write_new: f64,
    pub write_protect: f64,
    pub read: f64,
    pub pagecache: f64,
    /// Pages of shmem/tmpfs/memfd files written through write(), pwrite() and kin (distinct
    /// per window); mapped shmem counts in the fault classes.
    pub shmem: f64,
    /// Write faults on pages it had already dirtied in the window (fork churn): not counted.
    pub write_repeat: f64,
    /// Pages dirtied per second (write faults + page-cache pages, overlap removed), at most
    /// the pages it has (`clamped` says when that bound applied).
    pub dirty: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcSample {
    pub pid: u32,
    pub start_time: u64,
    pub comm: String,
    pub cmdline: String,
    pub rates: Rates,
    pub dirty_bytes_per_s: f64,
    /// Share of one CPU over the interval, in percent (can exceed 100 for threaded processes).
    pub cpu_pct: f64,
    pub rss_bytes: u64,
    /// The cgroup that governs this process's CPU (v2 path, or the v1 cpu hierarchy's path).
    pub cgroup: String,
    /// Exited during the interval (its last counts are included) or before (asked for by pid).
    pub gone: bool,
    /// Soft-dirty was armed for it during this window: `dirty` is the exact number of distinct
    /// pages it wrote (else a lower bound).
    pub exact: bool,
    /// Its fault count exceeded the pages it has (resident set) and was cut to them: a process
    /// cannot dirty more distinct pages than exist (left-over repeats the kernel could not tell).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub clamped: bool,
    /// Born during the interval: the seconds its counts cover (shorter than the interval).
    /// Its rates stay per interval second, so that rate x interval is the pages it wrote; its
    /// own pace is rate x interval / `young_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub young_s: Option<f64>,
    /// Distinct pages dirtied per window length (`profile --curve`), shortest window first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub curve: Vec<CurvePoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    pub window_s: f64,
    pub pages: f64,
}

impl ProcSample {
    pub fn id(&self) -> ProcId {
        ProcId::new(self.pid, self.start_time)
    }
}

impl ProcId {
    pub fn new(pid: u32, start_time: u64) -> Self {
        Self { pid, start_time }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Totals {
    pub dirty_bytes_per_s: f64,
    pub dirty_pages_per_s: f64,
    /// Part of the total from processes that started and exited between two samples.
    pub short_lived_dirty_pages_per_s: f64,
    /// Processes with any fault or dirtying activity in the interval.
    pub active_processes: usize,
    /// Pages the guest's kernel allocated (every one is written: zeroed or filled) that no
    /// process's count explains (page tables, slab, socket and pipe buffers, immp's own
    /// start-up...), per second: /proc/vmstat page allocations minus the new pages counted per
    /// process. An estimate of the dirtying immp cannot pin on a process.
    pub unattributed_pages_per_s: f64,
    pub unattributed_bytes_per_s: f64,
    /// The guest's whole dirty rate as immp estimates it: attributed plus unattributed.
    pub guest_dirty_bytes_per_s: f64,
    /// immp's own dirtying (part of the totals: a migration resends it too), shown apart and
    /// never a verdict.
    pub agent_dirty_bytes_per_s: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Health {
    /// Entries the kernel map holds now, and its capacity.
    pub tracked: usize,
    pub capacity: u32,
    /// Page events (faults, dirtied folios) not counted because the per-process table was full
    /// and their process had no entry (this interval). Events, not processes.
    pub map_full: u64,
    /// Exits whose final counts were lost (ring buffer full, this interval).
    pub exit_lost: u64,
    pub kernel: KernelStats,
    /// Processes whose /proc files could not be read this interval (reported as live: a read
    /// error is not an exit).
    pub proc_read_errors: u64,
}

/// The guest's memory as a migration sees it, measured with the sample (so that no view
/// reads physical memory on its own thread).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Memory {
    /// What round 0 of a migration started now would send: the non-zero memory (or memory in
    /// use where it cannot be sampled).
    pub round_zero_bytes: f64,
    /// The round 0 the default goal is a multiple of: its lowest figure of the last minutes
    /// (a writer's first pass must not raise its own budget).
    pub goal_round_zero_bytes: f64,
    /// The whole RAM: the most a later round can resend.
    pub ram_bytes: f64,
    /// Round 0 was sampled from physical memory (false: memory in use, a lower bound).
    pub sampled: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    pub seq: u64,
    /// Wall-clock end of the interval, ms since the Unix epoch.
    pub time_unix_ms: u64,
    pub interval_s: f64,
    pub mode: Mode,
    pub probes: Flavour,
    /// Why the BTF-checked raw tracepoints were not used, when classic tracepoints were chosen for want of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes_fallback: Option<String>,
    /// Whether large folios count all their pages (else each dirtied folio counts one page).
    pub folio_pages_known: bool,
    /// Whether write()s and kin into shmem/tmpfs/memfd files are counted (class `shmem`):
    /// the kernel's file layout was found and the syscall hooks attached.
    pub shmem_known: bool,
    /// Round 0 and RAM at this sample (None where the source cannot tell: tests).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    pub page_size: u64,
    pub health: Health,
    pub totals: Totals,
    /// Processes armed with soft-dirty for this window (exact mode).
    pub exact_armed: usize,
    /// `--verify`: the counted pages of one process against its pagemap soft-dirty bits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verify>,
    /// Every process with activity in the interval, plus every one asked for; unsorted
    /// (ranking is `rank`'s job).
    pub processes: Vec<ProcSample>,
    /// The PID of the immp that took this snapshot: measured like any process, never an
    /// IMMP, never capped by the policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_pid: Option<u32>,
    /// Taken between two intervals because a new process already dirtied at an IMMP's pace
    /// (`interval_s` is then short): the policy decides on new processes only.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub early: bool,
}

impl Snapshot {
    /// Is this process the immp that measured?
    pub fn is_agent(&self, p: &ProcSample) -> bool {
        self.agent_pid == Some(p.pid)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Verify {
    pub pid: u32,
    /// Write faults (new + write-protect) counted for it in the window.
    pub counted_pages: u64,
    /// Pages with the soft-dirty bit set at the end of the window (pagemap bit 55).
    pub soft_dirty_pages: u64,
}
