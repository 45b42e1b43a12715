//! Every interval: read the kernel counters, diff them against the previous read, join /proc,
//! and emit one immutable `Snapshot`. The only write is soft-dirty arming in exact mode.
use std::{
    collections::{HashMap, HashSet},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use immp_common::Counters;
use immp_model::snapshot::{
    Health, KernelStats, Mode, ProcId, ProcSample, Rates, Snapshot, Totals, Verify,
};

use super::{
    probes::Probes,
    procfs::ProcStat,
    source::{CounterSource, LiveProcs, ProcSource},
};

/// A process that lived less than one interval gets its own row when it dirtied at least
/// this many pages (else it only adds to `short_lived_dirty_pages_per_s`): a storm of tiny
/// processes must not flood the output.
const SHORT_LIVED_ROW_PAGES: u64 = 64;

#[derive(Default)]
struct Newcomers {
    created: u64,
    small: Vec<u32>,
}

struct Prev {
    counters: Counters,
    /// Identity seen in /proc for this incarnation (filled once we looked).
    id: Option<ProcId>,
}

struct Names {
    comm: String,
    cmdline: String,
}

/// Which measurement to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModeChoice {
    /// Exact where the kernel has soft-dirty, lower bounds otherwise
    #[default]
    Auto,
    /// Soft-dirty windows; refused on kernels without soft-dirty
    Exact,
    /// Fault counting only (writes nothing to any process)
    Bounds,
}

#[derive(Debug, Clone)]
pub struct SamplerOptions {
    pub mode: ModeChoice,
    /// At most this many processes are re-armed per window (the busiest writers), plus every
    /// watched one: re-arming walks a process's page tables, a cost that grows with its RSS.
    pub exact_max: usize,
    /// Cross-check this process's counts against pagemap every window (exact mode only).
    pub verify: Option<ProcId>,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            mode: ModeChoice::Auto,
            exact_max: 64,
            verify: None,
        }
    }
}

/// Why a mode cannot be used; the caller maps it to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error(
        "--mode exact: this kernel has no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY); use --mode auto or bounds"
    )]
    NoSoftDirty,
    #[error("--mode exact: cannot test soft-dirty: {0}")]
    Untestable(String),
    #[error("--verify needs exact mode (soft-dirty), which is not in force")]
    VerifyNeedsExact,
}

/// Soft-dirty windows: which processes are armed, and the rotation through the others.
#[derive(Default)]
struct Exact {
    on: bool,
    max: usize,
    /// Processes armed at the start of the current window.
    armed: HashSet<ProcId>,
    /// Where the round of otherwise idle processes to arm stopped (a pid).
    cursor: u32,
    verify: Option<ProcId>,
}

pub struct Sampler<C: CounterSource = Probes, P: ProcSource = LiveProcs> {
    counters: C,
    procs: P,
    exact: Exact,
    prev: HashMap<u32, Prev>,
    names: HashMap<ProcId, Names>,
    cpu_prev: HashMap<ProcId, u64>,
    /// Processes asked for by pid: always reported, and reported as gone once they are.
    watch: Vec<ProcId>,
    last: Instant,
    last_stats: KernelStats,
    /// Between samples (`newcomer_rate`): the kernel's count of table entries created when
    /// the table was last read, and the new processes then still too small to matter.
    newcomers: Newcomers,
    /// Kernel page allocations at the last sample.
    last_allocs: Option<u64>,
    seq: u64,
    page_size: u64,
    tps: f64,
}

/// Counts over one interval.
#[derive(Default, Clone, Copy)]
struct Delta {
    c: Counters,
}

impl Delta {
    /// `now - before` for the same incarnation (same `first_ns`), else all of `now`.
    fn between(now: &Counters, before: Option<&Counters>) -> Self {
        let Some(b) = before.filter(|b| b.first_ns == now.first_ns) else {
            return Delta { c: *now };
        };
        Delta {
            c: Counters {
                write_new: now.write_new.saturating_sub(b.write_new),
                write_protect: now.write_protect.saturating_sub(b.write_protect),
                read: now.read.saturating_sub(b.read),
                write_repeat: now.write_repeat.saturating_sub(b.write_repeat),
                pagecache_pages: now.pagecache_pages.saturating_sub(b.pagecache_pages),
                pagecache_in_fault: now.pagecache_in_fault.saturating_sub(b.pagecache_in_fault),
                shmem_pages: now.shmem_pages.saturating_sub(b.shmem_pages),
                shmem_repeat: now.shmem_repeat.saturating_sub(b.shmem_repeat),
                first_ns: now.first_ns,
                ..Counters::default()
            },
        }
    }

    fn add(&mut self, o: &Delta) {
        self.c.write_new += o.c.write_new;
        self.c.write_protect += o.c.write_protect;
        self.c.read += o.c.read;
        self.c.write_repeat += o.c.write_repeat;
        self.c.pagecache_pages += o.c.pagecache_pages;
        self.c.pagecache_in_fault += o.c.pagecache_in_fault;
        self.c.shmem_pages += o.c.shmem_pages;
        self.c.shmem_repeat += o.c.shmem_repeat;
    }

    fn is_zero(&self) -> bool {
        let c = &self.c;
        c.write_new + c.write_protect + c.read + c.pagecache_pages + c.shmem_pages == 0
    }
}

/// What one interval's reads found, before /proc is joined.
#[derive(Default)]
struct Reads {
    /// pid -> counts in the interval of the entry in the kernel table now.
    deltas: HashMap<u32, Delta>,
    /// pid -> the incarnation (seen in /proc) whose exit event came in, and its last counts.
    exited: HashMap<u32, (ProcId, Delta)>,
    /// Counts of processes born and gone unseen, too small for a row of their own.
    unseen_exit: Delta,
    short_lived: Vec<ProcSample>,
    /// Pids with a live entry in the kernel table.
    present: HashSet<u32>,
    /// Soft-dirty window boundaries taken this interval (pid -> counters at the re-arm).
    boundary: HashMap<u32, Counters>,
    verify_sd: Option<(u32, u64)>,
    /// Processes /proc could not be read for (not counted as exits).
    read_errors: u64,
}

impl Sampler {
    /// `watch`: processes to report even when idle (already validated by the caller).
    pub fn new(probes: Probes, watch: Vec<ProcId>) -> Self {
        let o = SamplerOptions {
            mode: ModeChoice::Bounds,
            exact_max: 0,
            verify: None,
        };
        Self::with_options(probes, watch, &o).expect("bounds mode cannot fail")
    }

    pub fn with_options(
        probes: Probes,
        watch: Vec<ProcId>,
        o: &SamplerOptions,
    ) -> Result<Self, ModeError> {
        Self::with_sources(probes, LiveProcs, watch, o)
    }
}

impl<C: CounterSource, P: ProcSource> Sampler<C, P> {
    pub fn with_sources(
        counters: C,
        procs: P,
        mut watch: Vec<ProcId>,
        o: &SamplerOptions,
    ) -> Result<Self, ModeError> {
        let on = exact_mode(&procs, o)?;
        if let Some(v) = o.verify
            && !watch.contains(&v)
        {
            watch.push(v);
        }
        let mut s = Self {
            page_size: procs.page_size(),
            tps: procs.ticks_per_second() as f64,
            counters,
            procs,
            exact: Exact {
                on,
                max: o.exact_max,
                verify: o.verify,
                ..Exact::default()
            },
            prev: HashMap::new(),
            names: HashMap::new(),
            cpu_prev: HashMap::new(),
            watch,
            last: Instant::now(),
            last_stats: KernelStats::default(),
            newcomers: Newcomers::default(),
            last_allocs: None,
            seq: 0,
        };
        s.baseline();
        s.last = Instant::now();
        Ok(s)
    }

    /// Activity before start does not count in the first interval; in exact mode the first
    /// window arms every process the kernel side has seen, busiest first.
    fn baseline(&mut self) {
        self.newcomers_from_here();
        for (pid, c) in self.counters.read_counters() {
            self.prev.insert(
                pid,
                Prev {
                    counters: c,
                    id: None,
                },
            );
        }
        self.counters.drain_exits();
        self.last_allocs = self.procs.page_allocs();
        self.counters.next_window();
        self.last_stats = self.counters.kernel_stats();
        // Watched processes are named now: one that exits before its first sample still has
        // its name in the output.
        for id in self.watch.clone() {
            if let Some(st) = self.procs.stat(id.pid).filter(|s| s.id == id) {
                let n = Names {
                    comm: st.comm,
                    cmdline: self.procs.cmdline(id.pid),
                };
                self.names.insert(id, n);
            }
        }
        if !self.exact.on {
            return;
        }
        let mut first: Vec<(u32, u64)> = self
            .prev
            .iter()
            .map(|(pid, p)| (*pid, p.counters.dirty_pages()))
            .collect();
        first.sort_by_key(|f| std::cmp::Reverse(f.1));
        let ids: Vec<ProcId> = first
            .into_iter()
            .filter_map(|(pid, _)| {
                self.procs
                    .stat(pid)
                    .filter(|st| !st.kernel_thread)
                    .map(|st| st.id)
            })
            .take(self.exact.max)
            .collect();
        self.arm(ids, &HashMap::new());
    }

    pub fn is_exact(&self) -> bool {
        self.exact.on
    }

    /// Re-arms soft-dirty for these processes plus every watched one. This is the one write the
    /// sampler makes: it clears the processes' soft-dirty bits (nothing else reads them) so the
    /// next write to each page takes one write-protect fault, which the probes count.
    ///
    /// A process that only rewrites pages it already has takes no fault until it is armed, so
    /// the slots the busiest writers leave free go round all other processes in turn: each is
    /// looked at every few windows, and kept armed once it shows writes.
    fn arm(&mut self, busiest: Vec<ProcId>, rearmed: &HashMap<u32, Counters>) {
        let previous = std::mem::take(&mut self.exact.armed);
        let budget = self.watch.len() + self.exact.max;
        let mut candidates: Vec<ProcId> = self.watch.iter().copied().chain(busiest).collect();
        let pids = if candidates.len() < budget {
            self.procs.pids()
        } else {
            Vec::new()
        };
        let start = pids.partition_point(|&p| p <= self.exact.cursor);
        let mut rotation = pids[start..].iter().chain(&pids[..start]);
        while self.exact.armed.len() < budget {
            let id = if candidates.is_empty() {
                let Some(&pid) = rotation.next() else { break };
                self.exact.cursor = pid;
                match self.procs.stat(pid).filter(|s| !s.kernel_thread) {
                    Some(st) => st.id,
                    None => continue,
                }
            } else {
                candidates.remove(0)
            };
            self.arm_one(id, previous.contains(&id) && rearmed.contains_key(&id.pid));
        }
        // Processes no longer armed follow the global windows again.
        for gone in previous.difference(&self.exact.armed) {
            self.counters.forget_window_of(gone.pid);
        }
    }

    fn arm_one(&mut self, id: ProcId, already: bool) {
        if id.pid == std::process::id() || self.exact.armed.contains(&id) {
            return;
        }
        if already {
            self.exact.armed.insert(id); // re-armed at the window boundary
            return;
        }
        let _boundary = super::softdirty::Realtime::enter();
        // --verify's process is held still for its boundary (see `close_windows`).
        let _still = (Some(id) == self.exact.verify).then(|| self.procs.freeze(id));
        self.counters.start_window_of(id.pid);
        if self.procs.clear_refs(id.pid).is_ok() {
            // Its next window starts now: take the baseline now too.
            if let Some(c) = self.counters.counters_of(id.pid) {
                self.prev.insert(
                    id.pid,
                    Prev {
                        counters: c,
                        id: Some(id),
                    },
                );
            }
            self.exact.armed.insert(id);
        }
    }

    pub fn sample(&mut self) -> Snapshot {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64().max(1e-6);
        self.last = now;
        self.seq += 1;
        let mut reads = Reads::default();
        self.newcomers_from_here();
        self.read_exits(&mut reads, dt);
        self.close_windows(&mut reads);
        let tracked = self.read_live(&mut reads);
        let counted_faults: HashMap<u32, u64> = reads
            .deltas
            .iter()
            .map(|(pid, d)| (*pid, d.c.write_new + d.c.write_protect))
            .collect();
        let mut processes = self.join_proc(&mut reads, dt);
        self.add_watched(&mut processes, dt, &mut reads);
        self.forget_departed(&processes);
        let mut totals = self.totals(&processes, &reads.unseen_exit, dt);
        self.unattributed(&mut totals, &processes, dt);
        let health = Health {
            proc_read_errors: reads.read_errors,
            ..self.health(tracked)
        };
        let exact_armed = self.exact.armed.len();
        let verify = reads.verify_sd.map(|(pid, sd)| Verify {
            pid,
            counted_pages: counted_faults.get(&pid).copied().unwrap_or(0),
            soft_dirty_pages: sd,
        });
        if self.exact.on {
            self.mark_exact_and_rearm(&mut processes, &reads.boundary);
        }
        self.counters.next_window();
        Snapshot {
            seq: self.seq,
            exact_armed,
            verify,
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            interval_s: dt,
            mode: if self.exact.on {
                Mode::Exact
            } else {
                Mode::Bounds
            },
            probes: self.counters.flavour(),
            probes_fallback: self.counters.fallback_reason(),
            folio_pages_known: self.counters.folio_pages_known(),
            shmem_known: self.counters.shmem_known(),
            memory: self.procs.memory(),
            page_size: self.page_size,
            health,
            totals,
            processes,
            agent_pid: Some(std::process::id()),
            early: false,
        }
    }

    /// Exits first: their final counts close the previous incarnation of that pid.
    fn read_exits(&mut self, r: &mut Reads, dt: f64) {
        for ev in self.counters.drain_exits() {
            let prev = self.prev.remove(&ev.tgid);
            let d = Delta::between(&ev.counters, prev.as_ref().map(|p| &p.counters));
            match prev.and_then(|p| p.id) {
                Some(id) => {
                    r.exited
                        .entry(ev.tgid)
                        .or_insert((id, Delta::default()))
                        .1
                        .add(&d);
                }
                // Born and gone between two samples: named from the exit event when it
                // dirtied enough to matter, else only counted in the totals.
                None if d.c.dirty_pages() >= SHORT_LIVED_ROW_PAGES => {
                    let ticks = (ev.counters.first_ns as f64 / 1e9 * self.tps) as u64;
                    let id = ProcId::new(ev.tgid, ticks);
                    let comm = String::from_utf8_lossy(&ev.comm)
                        .trim_end_matches('\0')
                        .to_string();
                    self.names.insert(
                        id,
                        Names {
                            comm,
                            cmdline: String::new(),
                        },
                    );
                    r.short_lived.push(self.gone_sample(id, &d, dt));
                }
                None => r.unseen_exit.add(&d),
            }
        }
    }

    /// Exact windows end here for the armed processes: each is re-armed and its counters read
    /// right away, so that the count's boundary is the window's (a gap between the two would
    /// count a page written in it twice). --verify's process is held still while pagemap is
    /// read (re-arming clears the bits it counts), re-armed and counted: its two counts then
    /// cover exactly the same window.
    fn close_windows(&mut self, r: &mut Reads) {
        if !self.exact.on {
            return;
        }
        let _boundary = super::softdirty::Realtime::enter();
        if let Some(v) = self.exact.verify.filter(|v| self.exact.armed.contains(v)) {
            let _still = self.procs.freeze(v);
            r.verify_sd = self
                .procs
                .count_soft_dirty(v.pid)
                .ok()
                .map(|sd| (v.pid, sd));
            self.rearm_boundary(v, r);
        }
        let verify = self.exact.verify;
        let armed: Vec<ProcId> = self.exact.armed.iter().copied().collect();
        for id in armed.into_iter().filter(|id| Some(*id) != verify) {
            self.rearm_boundary(id, r);
        }
    }

    fn rearm_boundary(&mut self, id: ProcId, r: &mut Reads) {
        // Its next window starts here, for the kernel's dedup of repeated faults too.
        self.counters.start_window_of(id.pid);
        if self.procs.clear_refs(id.pid).is_ok()
            && let Some(c) = self.counters.counters_of(id.pid)
        {
            r.boundary.insert(id.pid, c);
        }
    }

    /// Diffs every live entry against the last read; returns how many entries there are.
    fn read_live(&mut self, r: &mut Reads) -> usize {
        let live = self.counters.read_counters();
        for (pid, c) in &live {
            let c = r.boundary.get(pid).unwrap_or(c);
            r.present.insert(*pid);
            let prev = self.prev.get(pid);
            let d = Delta::between(c, prev.map(|p| &p.counters));
            let id = prev
                .filter(|p| p.counters.first_ns == c.first_ns)
                .and_then(|p| p.id);
            self.prev.insert(*pid, Prev { counters: *c, id });
            if !d.is_zero() {
                r.deltas.entry(*pid).or_default().add(&d);
            }
        }
        // Entries that vanished without an exit event we saw (lost or raced): forget them.
        self.prev.retain(|pid, _| r.present.contains(pid));
        live.len()
    }

    /// One sample per process with activity: live ones joined with /proc, exited ones as gone.
    fn join_proc(&mut self, r: &mut Reads, dt: f64) -> Vec<ProcSample> {
        let mut processes = std::mem::take(&mut r.short_lived);
        for (pid, (id, d)) in std::mem::take(&mut r.exited) {
            // The exit event of a thread-group leader that left before its other threads: the
            // same process goes on under a new kernel entry; its counts are one process's.
            let same = r.present.contains(&pid) && self.procs.stat(pid).is_some_and(|s| s.id == id);
            if same {
                r.deltas.entry(pid).or_default().add(&d);
            } else {
                processes.push(self.gone_sample(id, &d, dt)); // a reused pid is another process
            }
        }
        for (pid, d) in std::mem::take(&mut r.deltas) {
            let sample = if let Some(st) = self.procs.stat(pid) {
                if let Some(p) = self.prev.get_mut(&pid) {
                    p.id = Some(st.id);
                }
                self.live_sample(&st, &d, dt)
            } else {
                // Exited after we read the map (its exit event comes next interval: count this
                // part now, as gone), or /proc could not be read.
                match self.prev.get(&pid).and_then(|p| p.id) {
                    Some(id) => self.unread_sample(id, &d, dt, r),
                    None => {
                        r.unseen_exit.add(&d);
                        continue;
                    }
                }
            };
            processes.push(sample);
        }
        processes
    }

    /// Watched processes are always reported.
    fn add_watched(&mut self, processes: &mut Vec<ProcSample>, dt: f64, r: &mut Reads) {
        for id in self.watch.clone() {
            if processes.iter().any(|p| p.id() == id) {
                continue;
            }
            let sample = match self.procs.stat(id.pid).filter(|s| s.id == id) {
                Some(st) => self.live_sample(&st, &Delta::default(), dt),
                None => self.unread_sample(id, &Delta::default(), dt, r),
            };
            processes.push(sample);
        }
    }

    /// A process /proc did not show: gone only when (pid, start time) surely no longer
    /// exists; a read error is retried, counted in `health.proc_read_errors`, and the process
    /// reported as live (its name as last seen, no CPU or RSS this interval).
    fn unread_sample(&mut self, id: ProcId, d: &Delta, dt: f64, r: &mut Reads) -> ProcSample {
        if let Some(st) = self.procs.stat(id.pid).filter(|s| s.id == id) {
            return self.live_sample(&st, d, dt);
        }
        match self.procs.exists(id) {
            Some(false) => self.gone_sample(id, d, dt),
            _ => {
                r.read_errors += 1;
                ProcSample {
                    gone: false,
                    ..self.gone_sample(id, d, dt)
                }
            }
        }
    }

    /// Newcomers are counted from here: call right before the table is read (an entry created
    /// meanwhile is then new to the next `newcomer_rate`).
    fn newcomers_from_here(&mut self) {
        self.newcomers = Newcomers {
            created: self.counters.kernel_stats().entries_created,
            small: Vec::new(),
        };
    }

    /// The fastest dirtying, bytes per second over its life so far (at least 0.1 s of it:
    /// a start-up's burst is not a pace), among the processes the kernel side began counting
    /// since the last sample that have dirtied at least `min_bytes` (0 when none has). Reads
    /// the kernel's count of created entries, the whole table only when that moved since the
    /// last read, else only the new processes still under `min_bytes`. Lets a loop look again
    /// before its interval is out when a writer appears.
    pub fn newcomer_rate(&mut self, min_bytes: f64) -> f64 {
        const MIN_AGE_NS: u64 = 100_000_000;
        let created = self.counters.kernel_stats().entries_created;
        let entries: Vec<(u32, Counters)> = if created != self.newcomers.created {
            self.newcomers.created = created;
            self.counters.read_counters()
        } else {
            let small = &self.newcomers.small;
            small
                .iter()
                .filter_map(|&pid| Some((pid, self.counters.counters_of(pid)?)))
                .collect()
        };
        let now = self.counters.now_ns();
        let page = self.page_size as f64;
        let mut small = Vec::new();
        let mut best: f64 = 0.0;
        for (pid, c) in entries {
            let new = self
                .prev
                .get(&pid)
                .is_none_or(|p| p.counters.first_ns != c.first_ns);
            let bytes = c.dirty_pages() as f64 * page;
            if !new {
                continue;
            } else if bytes < min_bytes {
                small.push(pid);
            } else {
                let age_ns = now.saturating_sub(c.first_ns).max(MIN_AGE_NS);
                best = best.max(bytes / (age_ns as f64 / 1e9));
            }
        }
        self.newcomers.small = small;
        best
    }

    /// Starts reporting `id` every interval (e.g. once it is capped).
    pub fn watch(&mut self, id: ProcId) {
        if !self.watch.contains(&id) {
            self.watch.push(id);
        }
    }

    pub fn unwatch(&mut self, id: ProcId) {
        self.watch.retain(|w| *w != id);
    }

    /// Forget CPU baselines and names of processes no longer around.
    fn forget_departed(&mut self, processes: &[ProcSample]) {
        let current: HashSet<ProcId> = processes
            .iter()
            .filter(|p| !p.gone)
            .map(|p| p.id())
            .collect();
        self.cpu_prev.retain(|id, _| current.contains(id));
        let watch = &self.watch;
        self.names
            .retain(|id, _| current.contains(id) || watch.contains(id));
    }

    fn totals(&self, processes: &[ProcSample], unseen_exit: &Delta, dt: f64) -> Totals {
        // Processes that came and went between two samples: no name, but their pages count.
        let short = unseen_exit.c.dirty_pages() as f64 / dt;
        let mut t = Totals {
            short_lived_dirty_pages_per_s: short,
            dirty_pages_per_s: short,
            ..Totals::default()
        };
        for p in processes {
            if p.pid == std::process::id() {
                t.agent_dirty_bytes_per_s = p.rates.dirty * self.page_size as f64;
            }
            t.dirty_pages_per_s += p.rates.dirty;
            if p.rates.dirty + p.rates.read > 0.0 {
                t.active_processes += 1;
            }
        }
        t.dirty_bytes_per_s = t.dirty_pages_per_s * self.page_size as f64;
        t
    }

    /// Kernel page allocations the per-process new-page, page-cache and shmem counts do not
    /// explain. (A shmem page written again allocates nothing, so counting all shmem pages
    /// as explained can hide as many unattributed pages; not counting them would count every
    /// new tmpfs page twice, which is worse for a streaming writer.)
    fn unattributed(&mut self, t: &mut Totals, processes: &[ProcSample], dt: f64) {
        let now = self.procs.page_allocs();
        let allocs = match (now, self.last_allocs) {
            (Some(n), Some(b)) => n.saturating_sub(b) as f64 / dt,
            _ => 0.0,
        };
        self.last_allocs = now;
        let explained: f64 = processes
            .iter()
            // Repeat faults allocate too (a page mapped in again, a copy-on-write copy), on pages
            // the kernel mostly hands straight back: already counted, not unattributed.
            .map(|p| p.rates.write_new + p.rates.write_repeat + p.rates.pagecache + p.rates.shmem)
            .sum::<f64>()
            + t.short_lived_dirty_pages_per_s;
        t.unattributed_pages_per_s = (allocs - explained).max(0.0);
        t.unattributed_bytes_per_s = t.unattributed_pages_per_s * self.page_size as f64;
        t.guest_dirty_bytes_per_s = t.dirty_bytes_per_s + t.unattributed_bytes_per_s;
    }

    fn health(&mut self, tracked: usize) -> Health {
        let ks = self.counters.kernel_stats();
        let h = Health {
            tracked,
            capacity: self.counters.capacity(),
            map_full: ks.map_full - self.last_stats.map_full,
            exit_lost: ks.exit_lost - self.last_stats.exit_lost,
            kernel: ks,
            proc_read_errors: 0,
        };
        self.last_stats = ks;
        h
    }

    /// Samples of processes armed for this window are exact; then re-arm for the next one.
    fn mark_exact_and_rearm(
        &mut self,
        processes: &mut [ProcSample],
        boundary: &HashMap<u32, Counters>,
    ) {
        for p in processes.iter_mut() {
            // A write-protect fault on a transparent huge page re-dirties 512 pages at once:
            // a process with THP-backed memory is only a lower bound.
            p.exact = self.exact.armed.contains(&p.id())
                && (p.gone || self.procs.anon_huge_bytes(p.pid) == 0);
        }
        let mut busiest: Vec<&ProcSample> = processes
            .iter()
            .filter(|p| !p.gone && p.rates.dirty > 0.0)
            .collect();
        busiest.sort_by(|a, b| b.rates.dirty.total_cmp(&a.rates.dirty));
        let next: Vec<ProcId> = busiest
            .into_iter()
            .take(self.exact.max)
            .map(ProcSample::id)
            .collect();
        self.arm(next, boundary);
    }

    fn rates(&self, d: &Delta, dt: f64) -> (Rates, f64) {
        let c = &d.c;
        let r = Rates {
            write_new: c.write_new as f64 / dt,
            write_protect: c.write_protect as f64 / dt,
            read: c.read as f64 / dt,
            pagecache: c.pagecache_pages as f64 / dt,
            shmem: c.shmem_pages as f64 / dt,
            write_repeat: c.write_repeat as f64 / dt,
            dirty: c.dirty_pages() as f64 / dt,
        };
        (r, r.dirty * self.page_size as f64)
    }

    fn live_sample(&mut self, st: &ProcStat, d: &Delta, dt: f64) -> ProcSample {
        let id = st.id;
        if !self.names.contains_key(&id) {
            let n = Names {
                comm: st.comm.clone(),
                cmdline: self.procs.cmdline(id.pid),
            };
            self.names.insert(id, n);
        }
        // CPU share over the interval; a process first seen now gets its lifetime average, and
        // one born during the interval says so: its counts cover its age, not the interval.
        let mut young_s = None;
        let cpu_pct = match self.cpu_prev.insert(id, st.cpu_ticks) {
            Some(before) => st.cpu_ticks.saturating_sub(before) as f64 / self.tps / dt * 100.0,
            None => {
                let age = self.procs.uptime_ticks().saturating_sub(id.start_time) as f64 / self.tps;
                // Under a tick's resolution (and a fifth of the interval) the age says little.
                if age < dt * 0.9 {
                    young_s = Some(age.max(dt * 0.2));
                }
                st.cpu_ticks as f64 / self.tps / age.max(0.01) * 100.0
            }
        };
        let mut p = ProcSample {
            cpu_pct,
            young_s,
            rss_bytes: st.rss_bytes,
            cgroup: self.procs.cpu_cgroup(id.pid),
            gone: false,
            ..self.gone_sample(id, d, dt)
        };
        self.clamp_to_resident(&mut p, dt);
        p
    }

    /// A process cannot re-dirty more distinct pages it already has in a window than it has:
    /// write-protect faults the kernel's dedup missed (its page set overflowed) are cut to the
    /// resident set, and flagged. (First touches and page-cache pages are other pages.)
    fn clamp_to_resident(&self, p: &mut ProcSample, dt: f64) {
        let resident = p.rss_bytes as f64 / self.page_size as f64;
        let wp = p.rates.write_protect * dt;
        if resident > 0.0 && wp > resident {
            p.rates.dirty -= (wp - resident) / dt;
            p.dirty_bytes_per_s = p.rates.dirty * self.page_size as f64;
            p.clamped = true;
        }
    }

    /// A process that is no longer there: its name as last seen, its counts, nothing else.
    fn gone_sample(&self, id: ProcId, d: &Delta, dt: f64) -> ProcSample {
        let (comm, cmdline) = self
            .names
            .get(&id)
            .map(|n| (n.comm.clone(), n.cmdline.clone()))
            .unwrap_or_default();
        let (rates, bps) = self.rates(d, dt);
        ProcSample {
            pid: id.pid,
            start_time: id.start_time,
            comm,
            cmdline,
            rates,
            dirty_bytes_per_s: bps,
            cpu_pct: 0.0,
            rss_bytes: 0,
            cgroup: String::new(),
            gone: true,
            exact: false,
            clamped: false,
            young_s: None,
            curve: Vec::new(),
        }
    }
}

/// Whether exact mode is on, given the choice and what the kernel can do.
fn exact_mode(procs: &impl ProcSource, o: &SamplerOptions) -> Result<bool, ModeError> {
    let on = match o.mode {
        ModeChoice::Bounds => false,
        ModeChoice::Auto => procs.soft_dirty_supported().unwrap_or(false),
        ModeChoice::Exact => match procs.soft_dirty_supported() {
            Ok(true) => true,
            Ok(false) => return Err(ModeError::NoSoftDirty),
            Err(e) => return Err(ModeError::Untestable(e)),
        },
    };
    if o.verify.is_some() && !on {
        return Err(ModeError::VerifyNeedsExact);
    }
    Ok(on)
}

/// Merges a sweep of snapshots (one per window length, increasing) into the last one: each
/// process gets its curve (measured window lengths) of distinct pages per window. Pure.
pub fn with_curve(sweep: Vec<Snapshot>) -> Snapshot {
    use immp_model::snapshot::CurvePoint;
    let mut points: HashMap<ProcId, Vec<CurvePoint>> = HashMap::new();
    for snap in &sweep {
        for p in &snap.processes {
            points.entry(p.id()).or_default().push(CurvePoint {
                window_s: snap.interval_s,
                pages: p.rates.dirty * snap.interval_s,
            });
        }
    }
    let mut last = sweep.into_iter().last().expect("a sweep has windows");
    for p in &mut last.processes {
        p.curve = points.remove(&p.id()).unwrap_or_default();
    }
    last
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap};

    use immp_common::ExitEvent;
    use immp_model::snapshot::Flavour;

    use super::*;

    /// The kernel table, scripted by the test.
    #[derive(Default)]
    struct FakeCounters {
        live: BTreeMap<u32, Counters>,
        exits: Vec<ExitEvent>,
        created: u64,
        now_ns: u64,
    }

    impl CounterSource for FakeCounters {
        fn read_counters(&self) -> Vec<(u32, Counters)> {
            self.live.iter().map(|(p, c)| (*p, *c)).collect()
        }
        fn counters_of(&self, pid: u32) -> Option<Counters> {
            self.live.get(&pid).copied()
        }
        fn drain_exits(&mut self) -> Vec<ExitEvent> {
            std::mem::take(&mut self.exits)
        }
        fn kernel_stats(&self) -> KernelStats {
            KernelStats {
                entries_created: self.created,
                ..KernelStats::default()
            }
        }
        fn now_ns(&self) -> u64 {
            self.now_ns
        }
        fn flavour(&self) -> Flavour {
            Flavour::Btf
        }
        fn folio_pages_known(&self) -> bool {
            true
        }
        fn shmem_known(&self) -> bool {
            true
        }
        fn capacity(&self) -> u32 {
            16
        }
    }

    /// /proc, scripted: pid -> start time; `unreadable` fails the next reads of stat.
    #[derive(Default)]
    struct FakeProcs {
        procs: RefCell<BTreeMap<u32, u64>>,
        unreadable: RefCell<u32>,
        allocs: RefCell<u64>,
    }

    impl ProcSource for FakeProcs {
        fn stat(&self, pid: u32) -> Option<ProcStat> {
            if *self.unreadable.borrow() > 0 {
                *self.unreadable.borrow_mut() -= 1;
                return None;
            }
            let st = *self.procs.borrow().get(&pid)?;
            Some(ProcStat {
                id: ProcId::new(pid, st),
                comm: format!("c{pid}-{st}"),
                cpu_ticks: 0,
                rss_bytes: 1 << 20,
                kernel_thread: false,
                ppid: 1,
            })
        }
        fn cmdline(&self, _: u32) -> String {
            String::new()
        }
        fn cpu_cgroup(&self, _: u32) -> String {
            "/".into()
        }
        fn anon_huge_bytes(&self, _: u32) -> u64 {
            0
        }
        fn pids(&self) -> Vec<u32> {
            self.procs.borrow().keys().copied().collect()
        }
        fn uptime_ticks(&self) -> u64 {
            1_000_000
        }
        fn ticks_per_second(&self) -> u64 {
            100
        }
        fn page_size(&self) -> u64 {
            4096
        }
        fn clear_refs(&self, _: u32) -> std::io::Result<()> {
            Ok(())
        }
        fn count_soft_dirty(&self, _: u32) -> Result<u64, String> {
            Ok(0)
        }
        fn soft_dirty_supported(&self) -> Result<bool, String> {
            Ok(false)
        }
        fn page_allocs(&self) -> Option<u64> {
            Some(*self.allocs.borrow())
        }
        fn exists(&self, id: ProcId) -> Option<bool> {
            if *self.unreadable.borrow() > 0 {
                return None;
            }
            Some(self.procs.borrow().get(&id.pid) == Some(&id.start_time))
        }
    }

    fn counters(first_ns: u64, write_new: u64) -> Counters {
        Counters {
            write_new,
            first_ns,
            ..Counters::default()
        }
    }

    fn exit(pid: u32, c: Counters, comm: &str) -> ExitEvent {
        let mut e = ExitEvent {
            tgid: pid,
            counters: c,
            ..ExitEvent::default()
        };
        e.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        e
    }

    fn sampler(
        k: FakeCounters,
        p: FakeProcs,
        watch: Vec<ProcId>,
    ) -> Sampler<FakeCounters, FakeProcs> {
        let o = SamplerOptions {
            mode: ModeChoice::Bounds,
            ..SamplerOptions::default()
        };
        Sampler::with_sources(k, p, watch, &o).unwrap()
    }

    fn row(s: &Snapshot, id: ProcId) -> &ProcSample {
        s.processes
            .iter()
            .find(|p| p.id() == id)
            .unwrap_or_else(|| panic!("{id:?} in {s:?}"))
    }

    #[test]
    fn counts_only_what_happened_since_the_last_read() {
        let k = FakeCounters {
            live: BTreeMap::from([(10, counters(1, 500))]),
            ..Default::default()
        };
        let p = FakeProcs::default();
        p.procs.borrow_mut().insert(10, 77);
        let mut s = sampler(k, p, vec![]);
        s.counters.live.insert(10, counters(1, 800));
        let snap = s.sample();
        let pages = row(&snap, ProcId::new(10, 77)).rates.write_new * snap.interval_s;
        assert!(
            (pages - 300.0).abs() < 1e-6,
            "the 500 before start do not count: {pages}"
        );
        let snap = s.sample();
        assert!(snap.processes.is_empty(), "no activity, no row: {snap:?}");
    }

    #[test]
    fn a_process_born_during_the_interval_says_how_long_its_counts_cover() {
        let k = FakeCounters::default();
        let p = FakeProcs::default();
        p.procs.borrow_mut().insert(20, 1); // old
        let mut s = sampler(k, p, vec![]);
        std::thread::sleep(std::time::Duration::from_millis(400));
        // Born 0.1 s ago (uptime 1_000_000 ticks at 100 per second).
        s.procs.procs.borrow_mut().insert(21, 1_000_000 - 10);
        s.counters.live.insert(20, counters(1, 100));
        s.counters.live.insert(21, counters(2, 100));
        let snap = s.sample();
        assert!(snap.interval_s >= 0.39, "{}", snap.interval_s);
        assert_eq!(row(&snap, ProcId::new(20, 1)).young_s, None);
        let young = row(&snap, ProcId::new(21, 1_000_000 - 10));
        let a = young.young_s.expect("born during the interval");
        assert!((0.09..0.11).contains(&a), "{a}");
        // Its rates stay per interval second: rate x interval is the pages it wrote.
        let pages = young.rates.write_new * snap.interval_s;
        assert!((pages - 100.0).abs() < 1e-6, "{pages}");
    }

    #[test]
    fn a_new_writer_is_seen_before_the_next_sample_and_only_a_new_one() {
        const S: u64 = 1_000_000_000;
        let k = FakeCounters {
            live: BTreeMap::from([(10, counters(1, 500))]),
            created: 1,
            now_ns: 10 * S,
            ..Default::default()
        };
        let mut s = sampler(k, FakeProcs::default(), vec![]);
        const MIB: f64 = 1048576.0;
        // An old process writing fast is the sample's business, not a newcomer.
        s.counters.live.insert(10, counters(1, 100_000));
        assert_eq!(s.newcomer_rate(MIB), 0.0);
        // A newcomer whose entry the kernel's count does not show yet is not looked for: the
        // table is read only when that count moves.
        s.counters.live.insert(20, counters(10 * S - S / 2, 1000));
        assert_eq!(s.newcomer_rate(MIB), 0.0, "no entry created: no table read");
        s.counters.created = 3;
        // Born 0.5 s ago with 1000 pages (8 MB/s); another with 100 pages (start-up only).
        s.counters.live.insert(21, counters(10 * S - S / 100, 100));
        let r = s.newcomer_rate(MIB);
        assert!((r - 1000.0 * 4096.0 / 0.5).abs() < 1.0, "{r}");
        // The small one is followed without a table read (the count has not moved): 300
        // pages 10 ms after its first fault, over at least 0.1 s, not 10 ms.
        s.counters.live.insert(21, counters(10 * S - S / 100, 300));
        let r = s.newcomer_rate(MIB);
        assert!((r - 300.0 * 4096.0 / 0.1).abs() < 1.0, "{r}");
        // Once sampled, they are no longer new.
        s.sample();
        s.counters.created = 4;
        assert_eq!(s.newcomer_rate(MIB), 0.0);
    }

    #[test]
    fn a_reused_pid_is_two_processes() {
        let k = FakeCounters {
            live: BTreeMap::from([(5, counters(1, 100))]),
            ..Default::default()
        };
        let p = FakeProcs::default();
        p.procs.borrow_mut().insert(5, 40);
        let mut s = sampler(k, p, vec![]);
        s.sample(); // sees (5, 40) in /proc
        s.counters.live.insert(5, counters(1, 120));
        s.sample();
        // (5, 40) exits with 150 in all; a new process gets pid 5 and writes 30.
        s.counters.exits.push(exit(5, counters(1, 150), "old"));
        s.counters.live.insert(5, counters(2, 30));
        s.procs.procs.borrow_mut().insert(5, 90);
        let snap = s.sample();
        let old = row(&snap, ProcId::new(5, 40));
        let new = row(&snap, ProcId::new(5, 90));
        assert!(old.gone && !new.gone);
        assert!(
            (old.rates.write_new * snap.interval_s - 30.0).abs() < 1e-6,
            "150 - 120"
        );
        assert!(
            (new.rates.write_new * snap.interval_s - 30.0).abs() < 1e-6,
            "new incarnation from 0"
        );
        assert_eq!(new.comm, "c5-90");
    }

    #[test]
    fn short_lived_processes_get_a_row_only_when_they_matter() {
        let mut s = sampler(FakeCounters::default(), FakeProcs::default(), vec![]);
        s.counters.exits.push(exit(7, counters(1, 64), "big"));
        s.counters.exits.push(exit(8, counters(1, 10), "tiny"));
        let snap = s.sample();
        assert_eq!(snap.processes.len(), 1);
        assert_eq!(snap.processes[0].comm, "big");
        assert!(snap.processes[0].gone);
        let short = snap.totals.short_lived_dirty_pages_per_s * snap.interval_s;
        assert!((short - 10.0).abs() < 1e-6);
        let total = snap.totals.dirty_pages_per_s * snap.interval_s;
        assert!(
            (total - 74.0).abs() < 1e-6,
            "both count in the total: {total}"
        );
    }

    #[test]
    fn a_process_whose_proc_files_cannot_be_read_is_not_gone() {
        let p = FakeProcs::default();
        p.procs.borrow_mut().insert(3, 5);
        let id = ProcId::new(3, 5);
        let mut s = sampler(FakeCounters::default(), p, vec![id]);
        s.sample();
        *s.procs.unreadable.borrow_mut() = 10; // every read fails this interval
        let snap = s.sample();
        assert!(!row(&snap, id).gone, "a read error is not an exit");
        assert_eq!(snap.health.proc_read_errors, 1);
        *s.procs.unreadable.borrow_mut() = 1; // fails once, then reads fine: retried
        let snap = s.sample();
        assert!(!row(&snap, id).gone);
        assert_eq!(snap.health.proc_read_errors, 0, "the retry read it");
    }

    #[test]
    fn kernel_allocations_no_process_explains_are_unattributed() {
        let k = FakeCounters {
            live: BTreeMap::from([(10, counters(1, 0))]),
            ..Default::default()
        };
        let p = FakeProcs::default();
        p.procs.borrow_mut().insert(10, 77);
        let mut s = sampler(k, p, vec![]);
        // 300 new pages counted for the process; the kernel allocated 1000.
        s.counters.live.insert(10, counters(1, 300));
        *s.procs.allocs.borrow_mut() += 1000;
        let snap = s.sample();
        let t = snap.totals;
        let unattributed = t.unattributed_pages_per_s * snap.interval_s;
        assert!((unattributed - 700.0).abs() < 1e-6, "{t:?}");
        let guest = t.guest_dirty_bytes_per_s * snap.interval_s / 4096.0;
        assert!((guest - 1000.0).abs() < 1e-6, "{t:?}");
    }

    #[test]
    fn a_watched_process_is_always_reported_and_then_gone() {
        let p = FakeProcs::default();
        p.procs.borrow_mut().insert(3, 5);
        let id = ProcId::new(3, 5);
        let mut s = sampler(FakeCounters::default(), p, vec![id]);
        let snap = s.sample();
        assert!(!row(&snap, id).gone, "idle but watched");
        s.procs.procs.borrow_mut().remove(&3);
        let snap = s.sample();
        assert!(row(&snap, id).gone);
        assert_eq!(row(&snap, id).comm, "c3-5", "named as last seen");
    }
}
