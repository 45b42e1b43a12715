//! Every interval: read the kernel counters, diff them against the previous read, join /proc,
//! and emit one immutable `Snapshot`. The sampler changes nothing in the system.
use std::{
    collections::{HashMap, HashSet},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use immp_common::Counters;

use crate::{
    probes::{KernelStats, Probes},
    procinfo,
    snapshot::{Health, Mode, ProcId, ProcSample, Rates, Snapshot, Totals, Verify},
};

/// A process that lived less than one interval gets its own row when it dirtied at least
/// this many pages (else it only adds to `short_lived_dirty_pages_per_s`): a storm of tiny
/// processes must not flood the output.
const SHORT_LIVED_ROW_PAGES: u64 = 64;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
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

pub struct Sampler {
    probes: Probes,
    /// Soft-dirty arming is on (exact mode).
    exact: bool,
    exact_max: usize,
    /// Processes armed at the start of the current window.
    armed: HashSet<ProcId>,
    /// Where the round of otherwise idle processes to arm stopped (a pid).
    cursor: u32,
    verify: Option<ProcId>,
    prev: HashMap<u32, Prev>,
    names: HashMap<ProcId, Names>,
    cpu_prev: HashMap<ProcId, u64>,
    /// Processes asked for by pid: always reported, and reported as gone once they are.
    watch: Vec<ProcId>,
    last: Instant,
    last_stats: KernelStats,
    seq: u64,
    page_size: u64,
    tps: f64,
}

#[derive(Default, Clone, Copy)]
struct Delta {
    c: Counters,
}

impl Delta {
    fn between(now: &Counters, before: Option<&Counters>) -> Self {
        let Some(b) = before.filter(|b| b.first_ns == now.first_ns) else {
            return Delta { c: *now };
        };
        Delta {
            c: Counters {
                write_new: now.write_new.saturating_sub(b.write_new),
                write_protect: now.write_protect.saturating_sub(b.write_protect),
                read: now.read.saturating_sub(b.read),
                pagecache_pages: now.pagecache_pages.saturating_sub(b.pagecache_pages),
                pagecache_in_fault: now.pagecache_in_fault.saturating_sub(b.pagecache_in_fault),
                first_ns: now.first_ns,
                ..Counters::default()
            },
        }
    }

    fn add(&mut self, o: &Delta) {
        self.c.write_new += o.c.write_new;
        self.c.write_protect += o.c.write_protect;
        self.c.read += o.c.read;
        self.c.pagecache_pages += o.c.pagecache_pages;
        self.c.pagecache_in_fault += o.c.pagecache_in_fault;
    }

    fn is_zero(&self) -> bool {
        let c = &self.c;
        c.write_new + c.write_protect + c.read + c.pagecache_pages == 0
    }
}

impl Sampler {
    /// `watch`: processes to report even when idle (already validated by the caller).
    pub fn new(probes: Probes, watch: Vec<ProcId>) -> Self {
        Self::with_options(
            probes,
            watch,
            &SamplerOptions {
                mode: ModeChoice::Bounds,
                exact_max: 0,
                verify: None,
            },
        )
        .expect("bounds mode cannot fail")
    }

    pub fn with_options(
        probes: Probes,
        watch: Vec<ProcId>,
        o: &SamplerOptions,
    ) -> anyhow::Result<Self> {
        let exact = match o.mode {
            ModeChoice::Bounds => false,
            ModeChoice::Auto => crate::softdirty::supported().unwrap_or(false),
            ModeChoice::Exact => match crate::softdirty::supported() {
                Ok(true) => true,
                Ok(false) => {
                    return Err(crate::environment(
                        "--mode exact: this kernel has no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY); use --mode auto or bounds",
                    ));
                }
                Err(e) => {
                    return Err(crate::environment(format!(
                        "--mode exact: cannot test soft-dirty: {e}"
                    )));
                }
            },
        };
        if o.verify.is_some() && !exact {
            return Err(crate::environment(
                "--verify needs exact mode (soft-dirty), which is not in force",
            ));
        }
        let mut watch = watch;
        if let Some(v) = o.verify
            && !watch.contains(&v)
        {
            watch.push(v);
        }
        let mut s = Self {
            probes,
            verify: o.verify,
            exact,
            exact_max: o.exact_max,
            armed: HashSet::new(),
            cursor: 0,
            prev: HashMap::new(),
            names: HashMap::new(),
            cpu_prev: HashMap::new(),
            watch,
            last: Instant::now(),
            last_stats: KernelStats::default(),
            seq: 0,
            page_size: procinfo::page_size(),
            tps: procinfo::ticks_per_second() as f64,
        };
        // Baseline: activity before start does not count in the first interval.
        for (pid, c) in s.probes.read_counters() {
            s.prev.insert(
                pid,
                Prev {
                    counters: c,
                    id: None,
                },
            );
        }
        s.probes.drain_exits();
        s.last_stats = s.probes.kernel_stats();
        if s.exact {
            // First window: every process the kernel side has seen, busiest unknown yet.
            let mut first: Vec<(u32, u64)> = s
                .prev
                .iter()
                .map(|(pid, p)| (*pid, p.counters.dirty_pages()))
                .collect();
            first.sort_by_key(|f| std::cmp::Reverse(f.1));
            let ids: Vec<ProcId> = first
                .into_iter()
                .filter_map(|(pid, _)| {
                    procinfo::stat(pid)
                        .filter(|st| !st.kernel_thread)
                        .map(|st| st.id)
                })
                .take(s.exact_max)
                .collect();
            s.arm(ids, &HashMap::new());
        }
        s.last = Instant::now();
        Ok(s)
    }

    pub fn is_exact(&self) -> bool {
        self.exact
    }

    /// Re-arms soft-dirty for these processes plus every watched one. This is the one write the
    /// sampler makes: it clears the processes' soft-dirty bits (nothing else reads them) so the
    /// next write to each page takes one write-protect fault, which the probes count.
    ///
    /// A process that only rewrites pages it already has takes no fault until it is armed, so
    /// the slots the busiest writers leave free go round all other processes in turn: each is
    /// looked at every few windows, and kept armed once it shows writes.
    fn arm(&mut self, busiest: Vec<ProcId>, rearmed: &HashMap<u32, Counters>) {
        let previous = std::mem::take(&mut self.armed);
        let me = std::process::id();
        let budget = self.watch.len() + self.exact_max;
        let mut pids: Vec<u32> = Vec::new();
        let mut candidates: Vec<ProcId> = self.watch.iter().copied().chain(busiest).collect();
        if candidates.len() < budget {
            pids = std::fs::read_dir("/proc")
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| e.file_name().to_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            pids.sort_unstable();
        }
        let start = pids.partition_point(|&p| p <= self.cursor);
        let mut rotation = pids[start..].iter().chain(&pids[..start]);
        loop {
            if self.armed.len() >= budget {
                break;
            }
            let id = match candidates.is_empty() {
                false => candidates.remove(0),
                true => {
                    let Some(&pid) = rotation.next() else { break };
                    self.cursor = pid;
                    match procinfo::stat(pid).filter(|s| !s.kernel_thread) {
                        Some(st) => st.id,
                        None => continue,
                    }
                }
            };
            if id.pid == me || self.armed.contains(&id) {
                continue;
            }
            if previous.contains(&id) && rearmed.contains_key(&id.pid) {
                self.armed.insert(id); // already re-armed at the window boundary
                continue;
            }
            if crate::softdirty::clear_refs(id.pid).is_ok() {
                // Its next window starts now: take the baseline now too.
                if let Some(c) = self.probes.counters_of(id.pid) {
                    self.prev.insert(
                        id.pid,
                        Prev {
                            counters: c,
                            id: Some(id),
                        },
                    );
                }
                self.armed.insert(id);
            }
        }
    }

    pub fn sample(&mut self) -> Snapshot {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64().max(1e-6);
        self.last = now;
        self.seq += 1;

        let mut deltas: HashMap<u32, (Delta, bool)> = HashMap::new();
        let mut gone_ids: HashMap<u32, ProcId> = HashMap::new();
        let mut unseen_exit = Delta::default();
        let mut short_lived = Vec::new();

        // Exits first: their final counts close the previous incarnation of that pid.
        for ev in self.probes.drain_exits() {
            let prev = self.prev.remove(&ev.tgid);
            let d = Delta::between(&ev.counters, prev.as_ref().map(|p| &p.counters));
            match prev.and_then(|p| p.id) {
                Some(id) => {
                    gone_ids.insert(ev.tgid, id);
                    deltas.entry(ev.tgid).or_default().0.add(&d);
                    deltas.entry(ev.tgid).or_default().1 = true;
                }
                // Born and gone between two samples: named from the exit event when it
                // dirtied enough to matter, else only counted in the totals.
                None if d.c.dirty_pages() >= SHORT_LIVED_ROW_PAGES => {
                    let ticks = (ev.counters.first_ns as f64 / 1e9 * self.tps) as u64;
                    let id = ProcId {
                        pid: ev.tgid,
                        start_time: ticks,
                    };
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
                    short_lived.push(self.gone_sample(id, &d, dt));
                }
                None => unseen_exit.add(&d),
            }
        }

        // Exact windows end here for the armed processes: each is re-armed and its counters
        // read right away, so that the count's boundary is the window's (a gap between the two
        // would count a page written in it twice).
        // --verify reads pagemap first: re-arming clears the bits it counts.
        let verify_sd = self
            .verify
            .filter(|v| self.armed.contains(v))
            .and_then(|v| {
                crate::softdirty::count_soft_dirty(v.pid)
                    .ok()
                    .map(|sd| (v.pid, sd))
            });
        let mut boundary: HashMap<u32, Counters> = HashMap::new();
        if self.exact {
            for id in &self.armed {
                if crate::softdirty::clear_refs(id.pid).is_ok()
                    && let Some(c) = self.probes.counters_of(id.pid)
                {
                    boundary.insert(id.pid, c);
                }
            }
        }
        let mut live = self.probes.read_counters();
        for (pid, c) in &mut live {
            if let Some(b) = boundary.get(pid) {
                *c = *b;
            }
        }
        let mut present = HashSet::with_capacity(live.len());
        for (pid, c) in &live {
            present.insert(*pid);
            let prev = self.prev.get(pid);
            let d = Delta::between(c, prev.map(|p| &p.counters));
            let id = prev
                .filter(|p| p.counters.first_ns == c.first_ns)
                .and_then(|p| p.id);
            self.prev.insert(*pid, Prev { counters: *c, id });
            if !d.is_zero() {
                deltas.entry(*pid).or_default().0.add(&d);
            }
        }
        // Entries that vanished without an exit event we saw (lost or raced): forget them.
        self.prev.retain(|pid, _| present.contains(pid));

        let counted_faults: HashMap<u32, u64> = deltas
            .iter()
            .map(|(pid, (d, _))| (*pid, d.c.write_new + d.c.write_protect))
            .collect();
        let mut processes = short_lived;
        let mut seen_ids = HashSet::new();
        let mut totals = Totals::default();
        for (pid, (d, exited)) in deltas {
            let sample = if exited && !present.contains(&pid) {
                let id = gone_ids[&pid];
                self.gone_sample(id, &d, dt)
            } else {
                match procinfo::stat(pid) {
                    Some(st) => {
                        if let Some(p) = self.prev.get_mut(&pid) {
                            p.id = Some(st.id);
                        }
                        self.live_sample(&st, &d, dt)
                    }
                    // Exited after we read the map: its exit event comes next interval; count
                    // this part now, as gone.
                    None => match gone_ids
                        .get(&pid)
                        .copied()
                        .or(self.prev.get(&pid).and_then(|p| p.id))
                    {
                        Some(id) => self.gone_sample(id, &d, dt),
                        None => {
                            unseen_exit.add(&d);
                            continue;
                        }
                    },
                }
            };
            seen_ids.insert(sample.id());
            processes.push(sample);
        }
        // Processes that came and went between two samples: no name, but their pages count.
        totals.short_lived_dirty_pages_per_s = unseen_exit.c.dirty_pages() as f64 / dt;
        totals.dirty_pages_per_s += totals.short_lived_dirty_pages_per_s;
        // Watched processes are always reported.
        for id in self.watch.clone() {
            if seen_ids.contains(&id) {
                continue;
            }
            let sample = match procinfo::stat(id.pid).filter(|s| s.id == id) {
                Some(st) => self.live_sample(&st, &Delta::default(), dt),
                None => self.gone_sample(id, &Delta::default(), dt),
            };
            processes.push(sample);
        }
        // Forget CPU baselines and names of processes no longer around.
        let current: HashSet<ProcId> = processes
            .iter()
            .filter(|p| !p.gone)
            .map(|p| p.id())
            .collect();
        self.cpu_prev.retain(|id, _| current.contains(id));
        self.names
            .retain(|id, _| current.contains(id) || self.watch.contains(id));

        for p in &processes {
            totals.dirty_pages_per_s += p.rates.dirty;
            if p.rates.dirty + p.rates.read > 0.0 {
                totals.active_processes += 1;
            }
        }
        totals.dirty_bytes_per_s = totals.dirty_pages_per_s * self.page_size as f64;

        let ks = self.probes.kernel_stats();
        let health = Health {
            tracked: live.len(),
            capacity: self.probes.report.max_procs,
            map_full: ks.map_full - self.last_stats.map_full,
            exit_lost: ks.exit_lost - self.last_stats.exit_lost,
            kernel: ks,
        };
        self.last_stats = ks;

        // Samples of processes armed for this window are exact; then re-arm for the next one.
        let exact_armed = self.armed.len();
        let verify = verify_sd.map(|(pid, sd)| Verify {
            pid,
            counted_pages: counted_faults.get(&pid).copied().unwrap_or(0),
            soft_dirty_pages: sd,
        });
        if self.exact {
            for p in &mut processes {
                // A write-protect fault on a transparent huge page re-dirties 512 pages at
                // once: a process with THP-backed memory is only a lower bound.
                p.exact = self.armed.contains(&p.id())
                    && (p.gone || procinfo::anon_huge_bytes(p.pid) == 0);
            }
            let mut busiest: Vec<&ProcSample> = processes
                .iter()
                .filter(|p| !p.gone && p.rates.dirty > 0.0)
                .collect();
            busiest.sort_by(|a, b| b.rates.dirty.total_cmp(&a.rates.dirty));
            let next: Vec<ProcId> = busiest
                .into_iter()
                .take(self.exact_max)
                .map(ProcSample::id)
                .collect();
            self.arm(next, &boundary);
        }

        Snapshot {
            seq: self.seq,
            exact_armed,
            verify,
            time_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            interval_s: dt,
            mode: if self.exact {
                Mode::Exact
            } else {
                Mode::Bounds
            },
            probes: self.probes.report.flavour,
            folio_pages_known: self.probes.report.folio_pages_known,
            page_size: self.page_size,
            health,
            totals,
            processes,
        }
    }

    fn rates(&self, d: &Delta, dt: f64) -> (Rates, f64) {
        let c = &d.c;
        let r = Rates {
            write_new: c.write_new as f64 / dt,
            write_protect: c.write_protect as f64 / dt,
            read: c.read as f64 / dt,
            pagecache: c.pagecache_pages as f64 / dt,
            dirty: c.dirty_pages() as f64 / dt,
        };
        (r, r.dirty * self.page_size as f64)
    }

    fn live_sample(&mut self, st: &procinfo::ProcStat, d: &Delta, dt: f64) -> ProcSample {
        let id = st.id;
        self.names.entry(id).or_insert_with(|| Names {
            comm: st.comm.clone(),
            cmdline: procinfo::cmdline(id.pid),
        });
        // CPU share over the interval; a process first seen now gets its lifetime average.
        let cpu_pct = match self.cpu_prev.insert(id, st.cpu_ticks) {
            Some(before) => st.cpu_ticks.saturating_sub(before) as f64 / self.tps / dt * 100.0,
            None => {
                let age = procinfo::uptime_ticks().saturating_sub(id.start_time) as f64 / self.tps;
                st.cpu_ticks as f64 / self.tps / age.max(0.01) * 100.0
            }
        };
        ProcSample {
            cpu_pct,
            rss_bytes: st.rss_bytes,
            cgroup: procinfo::cpu_cgroup(id.pid),
            gone: false,
            ..self.gone_sample(id, d, dt)
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
            curve: Vec::new(),
        }
    }
}

/// Merges a sweep of snapshots (one per window length, increasing) into the last one: each
/// process gets its curve (measured window lengths) of distinct pages per window. Pure.
pub fn with_curve(sweep: Vec<Snapshot>) -> Snapshot {
    use crate::snapshot::CurvePoint;
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
