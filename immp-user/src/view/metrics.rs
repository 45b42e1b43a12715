//! The Prometheus view of `immp serve`: the same `Snapshot`s and `Event`s the other views get,
//! kept as counters and gauges and written as OpenMetrics text by `prometheus-client`.
//!
//! **Bounded cardinality**, as process-exporter bounds it: at most `top` processes get series
//! of their own (labels `pid`, `comm`), the processes immp caps first, then the busiest by dirty
//! rate (smoothed over a few intervals, so that two writers of the same speed do not swap places
//! every scrape); everything else adds into one `comm="other"` series. So any scrape shows at
//! most `top + 1` process label sets, whatever runs in the guest.
//!
//! **Counters stay monotonic, and add up.** A process's counter counts what it did *while
//! listed*; what it did while outside the top goes into `other`. When it leaves the top and
//! comes back, its series continues from the value it had (never lower), and nothing is counted
//! twice: the process series plus `other` always sum to what all processes did. The price: a
//! process's counter is not its lifetime total (rate() over it is right while it is listed).
//! A process not seen for 5 minutes (exited, or idle all that time) is forgotten and its
//! series dropped; should that same (pid, start) become active again later, its series starts
//! anew from zero, which Prometheus's rate() reads as a counter reset.
//!
//! Only `comm` (cleaned of control characters) names a process: command lines never leave immp.
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use immp_model::{
    Event, ProcId, Snapshot,
    event::{Capped, Mechanism},
    policy::Action,
    predict::Prediction,
    snapshot::{Mode, ProcSample},
    text::clean,
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, text::encode},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

/// The Content-Type of OpenMetrics text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long an unseen process keeps its series.
pub const RETAIN: Duration = Duration::from_secs(300);

/// At most this many processes are remembered (a bound on memory whatever the churn: a
/// process forgotten early only loses the continuity of its counters).
const MAX_TRACKED: usize = 50_000;

/// The dirtying classes of `Rates` (page events; a page written through a shared file mapping
/// counts as a write fault and as page cache: the classes may overlap).
const CLASSES: [&str; 4] = ["write_new", "write_protect", "pagecache", "shmem"];

#[derive(Debug, Clone, Copy)]
pub struct MetricsSettings {
    /// Processes with series of their own (the rest is `other`).
    pub top: usize,
    /// Forget a process not seen for this long.
    pub retain: Duration,
    /// immp's own PID: its dirtying is also reported as `immp_self_*`.
    pub self_pid: u32,
    /// The migration link (bytes/s), when given.
    pub bandwidth: Option<f64>,
    /// `--auto`: the automatic cap policy runs.
    pub auto: bool,
}

/// What one process (or `other`) did while counted under its series.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    pages: [f64; 4],
    unique_bytes: f64,
    cpu_s: f64,
}

impl Counts {
    /// What `p` did over `dt` seconds.
    fn of(p: &ProcSample, dt: f64) -> Self {
        let r = &p.rates;
        Self {
            pages: [
                r.write_new * dt,
                r.write_protect * dt,
                r.pagecache * dt,
                r.shmem * dt,
            ],
            unique_bytes: p.dirty_bytes_per_s * dt,
            cpu_s: p.cpu_pct / 100.0 * dt,
        }
        .finite()
    }

    /// Non-finite or negative inputs never reach a counter (it would stop being monotonic).
    fn finite(mut self) -> Self {
        let fix = |v: f64| if v.is_finite() && v > 0.0 { v } else { 0.0 };
        self.pages = self.pages.map(fix);
        self.unique_bytes = fix(self.unique_bytes);
        self.cpu_s = fix(self.cpu_s);
        self
    }

    fn add(&mut self, o: &Counts) {
        for (a, b) in self.pages.iter_mut().zip(o.pages) {
            *a += b;
        }
        self.unique_bytes += o.unique_bytes;
        self.cpu_s += o.cpu_s;
    }
}

#[derive(Debug, Clone)]
struct Proc {
    comm: String,
    /// Counted while listed.
    counts: Counts,
    /// Dirty bytes/s, smoothed (the ranking key).
    score: f64,
    last_seen_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Cap {
    ratio: f64,
    mechanism: Mechanism,
}

/// Everything /metrics shows, updated once per sample.
#[derive(Debug)]
struct State {
    s: MetricsSettings,
    page_size: f64,
    procs: HashMap<ProcId, Proc>,
    /// Listed processes, in ranking order.
    listed: Vec<ProcId>,
    other: Counts,
    caps: BTreeMap<ProcId, Cap>,
    me: Counts,
    me_rss: f64,
    /// Guest dirtying, pages: by processes, unattributed, short-lived (part of processes).
    guest_pages: [f64; 3],
    guest_bytes: [f64; 2],
    active: f64,
    mode: Option<Mode>,
    probes: Option<String>,
    health: [f64; 3],
    tracked: [f64; 2],
    samples: u64,
    last_ms: u64,
    predictions: BTreeMap<&'static str, Prediction>,
    goal_s: Option<f64>,
    cap_changes: [f64; 3],
}

/// The metrics view: feed it snapshots and events, read the exposition.
#[derive(Debug)]
pub struct MetricsView {
    state: Arc<Mutex<State>>,
    registry: Registry,
}

impl MetricsView {
    pub fn new(s: MetricsSettings) -> Self {
        let state = Arc::new(Mutex::new(State::new(s)));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exposition(state.clone())));
        Self { state, registry }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The caps in force now (from the actuator), before the snapshot they apply to.
    pub fn set_caps(&mut self, caps: &[Capped]) {
        self.state().caps = caps
            .iter()
            .map(|c| {
                let id = ProcId::new(c.pid, c.start_time);
                let cap = Cap {
                    ratio: c.cap_pct / 100.0,
                    mechanism: c.mechanism,
                };
                (id, cap)
            })
            .collect();
    }

    /// One interval; `measured` is the migration predicted from it (with a bandwidth).
    pub fn on_snapshot(&mut self, snap: &Snapshot, measured: Option<Prediction>) {
        let mut st = self.state();
        st.on_snapshot(snap);
        if let Some(p) = measured {
            st.predictions.insert("measured", p);
        }
    }

    /// What the automatic policy predicted and changed.
    pub fn on_event(&mut self, e: &Event) {
        let mut st = self.state();
        match e {
            Event::Prediction(p) => {
                st.predictions.insert("uncapped", p.without_caps);
                st.predictions.insert("planned", p.with_caps);
                st.goal_s = Some(p.target_s);
            }
            Event::Capped(_) => st.cap_changes[0] += 1.0,
            // A cap decision about a process capped before this interval changed its cap (a
            // new cap is counted by its `capped` event).
            Event::Decision(d)
                if matches!(d.action, Action::Cap { .. }) && st.caps.contains_key(&d.id()) =>
            {
                st.cap_changes[1] += 1.0
            }
            Event::Lifted(_) | Event::MovedAway(_) => st.cap_changes[2] += 1.0,
            Event::Gone(g) if g.undone.is_some() => st.cap_changes[2] += 1.0,
            _ => {}
        }
    }

    /// The OpenMetrics text (ends with `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail; the collector's own errors are formatting only.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl State {
    fn new(s: MetricsSettings) -> Self {
        Self {
            s,
            page_size: 4096.0,
            procs: HashMap::new(),
            listed: Vec::new(),
            other: Counts::default(),
            caps: BTreeMap::new(),
            me: Counts::default(),
            me_rss: 0.0,
            guest_pages: [0.0; 3],
            guest_bytes: [0.0; 2],
            active: 0.0,
            mode: None,
            probes: None,
            health: [0.0; 3],
            tracked: [0.0; 2],
            samples: 0,
            last_ms: 0,
            predictions: BTreeMap::new(),
            goal_s: None,
            cap_changes: [0.0; 3],
        }
    }

    fn on_snapshot(&mut self, snap: &Snapshot) {
        let dt = if snap.interval_s.is_finite() {
            snap.interval_s.max(0.0)
        } else {
            0.0
        };
        self.page_size = snap.page_size as f64;
        let now = snap.time_unix_ms;
        for p in self.procs.values_mut() {
            p.score *= 0.5; // unseen this interval: fades
        }
        let mut done: Vec<(ProcId, Counts)> = Vec::with_capacity(snap.processes.len());
        for p in &snap.processes {
            let c = Counts::of(p, dt);
            if p.pid == self.s.self_pid {
                self.me.add(&c);
                self.me_rss = p.rss_bytes as f64;
            }
            let e = self.procs.entry(p.id()).or_insert_with(|| Proc {
                comm: String::new(),
                counts: Counts::default(),
                score: 0.0,
                last_seen_ms: now,
            });
            if e.comm != p.comm {
                e.comm = clean(&p.comm).into_owned();
            }
            // score was halved above: this makes it 0.5 old + 0.5 new.
            let rate = if p.dirty_bytes_per_s.is_finite() {
                p.dirty_bytes_per_s.max(0.0)
            } else {
                0.0
            };
            e.score += 0.5 * rate;
            e.last_seen_ms = now;
            done.push((p.id(), c));
        }
        self.forget(now);
        self.select();
        for (id, c) in done {
            match self.procs.get_mut(&id) {
                Some(p) if self.listed.contains(&id) => p.counts.add(&c),
                _ => self.other.add(&c),
            }
        }
        self.totals(snap);
    }

    /// Drops processes unseen for `retain` (a capped one stays: its cap is shown), and, should
    /// a storm of processes outgrow `MAX_TRACKED`, the least recently seen.
    fn forget(&mut self, now: u64) {
        let keep = self.s.retain.as_millis() as u64;
        let caps = &self.caps;
        self.procs
            .retain(|id, p| caps.contains_key(id) || now.saturating_sub(p.last_seen_ms) < keep);
        if self.procs.len() > MAX_TRACKED {
            let mut old: Vec<(u64, ProcId)> = self
                .procs
                .iter()
                .filter(|(id, _)| !caps.contains_key(id))
                .map(|(id, p)| (p.last_seen_ms, *id))
                .collect();
            let cut = (self.procs.len() - MAX_TRACKED).min(old.len());
            if cut > 0 {
                old.select_nth_unstable(cut - 1);
                for (_, id) in &old[..cut] {
                    self.procs.remove(id);
                }
            }
        }
    }

    /// The listed processes: capped first, then by smoothed dirty rate.
    fn select(&mut self) {
        let n = self.s.top;
        let mut listed: Vec<ProcId> = self
            .caps
            .keys()
            .filter(|id| self.procs.contains_key(id))
            .take(n)
            .copied()
            .collect();
        let mut rest: Vec<(f64, f64, ProcId)> = self
            .procs
            .iter()
            .filter(|(id, _)| !self.caps.contains_key(id))
            .map(|(id, p)| (p.score, p.counts.unique_bytes, *id))
            .collect();
        let room = n - listed.len();
        let order = |a: &(f64, f64, ProcId), b: &(f64, f64, ProcId)| {
            b.0.total_cmp(&a.0)
                .then(b.1.total_cmp(&a.1))
                .then(a.2.cmp(&b.2))
        };
        if rest.len() > room && room > 0 {
            rest.select_nth_unstable_by(room - 1, order);
        }
        rest.truncate(room);
        rest.sort_by(order);
        listed.extend(rest.into_iter().map(|(_, _, id)| id));
        self.listed = listed;
    }

    fn totals(&mut self, snap: &Snapshot) {
        let dt = snap.interval_s.max(0.0);
        let t = &snap.totals;
        let pos = |v: f64| if v.is_finite() && v > 0.0 { v } else { 0.0 };
        self.guest_pages[0] += pos(t.dirty_pages_per_s) * dt;
        self.guest_pages[1] += pos(t.unattributed_pages_per_s) * dt;
        self.guest_pages[2] += pos(t.short_lived_dirty_pages_per_s) * dt;
        self.guest_bytes[0] += pos(t.dirty_bytes_per_s) * dt;
        self.guest_bytes[1] += pos(t.unattributed_bytes_per_s) * dt;
        self.active = t.active_processes as f64;
        self.mode = Some(snap.mode);
        self.probes = Some(snap.probes.to_string());
        let h = &snap.health;
        self.health[0] += h.map_full as f64;
        self.health[1] += h.exit_lost as f64;
        self.health[2] += h.proc_read_errors as f64;
        self.tracked = [h.tracked as f64, h.capacity as f64];
        self.samples += 1;
        self.last_ms = snap.time_unix_ms;
    }
}

/// The collector `prometheus-client` calls at each render: writes the state as it is.
#[derive(Debug)]
struct Exposition(Arc<Mutex<State>>);

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        st.encode_processes(&mut enc)?;
        st.encode_guest(&mut enc)?;
        st.encode_migration(&mut enc)?;
        st.encode_agent(&mut enc)
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: its descriptor, then one sample per label set.
fn family<'l, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    series: impl IntoIterator<Item = (Labels<'l>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut series = series.into_iter().peekable();
    let Some((_, first)) = series.peek() else {
        // A family without samples says nothing: left out.
        return Ok(());
    };
    let ty = first.metric_type();
    let mut m: MetricEncoder = enc.encode_descriptor(name, help, unit.as_ref(), ty)?;
    for (labels, v) in series {
        v.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn one<M: EncodeMetric>(v: M) -> [(Labels<'static>, M); 1] {
    [(Vec::new(), v)]
}

fn counter(v: f64) -> ConstCounter<f64> {
    ConstCounter::new(v)
}

fn gauge(v: f64) -> ConstGauge<f64> {
    ConstGauge::new(v)
}

impl State {
    /// The process label sets in order: the listed processes, then `other` (whose `pid` is
    /// empty, which Prometheus reads as no pid: every sample of a family has the same label
    /// names, as strict parsers want). `pids` are the listed processes' PIDs as text.
    fn rows<'s>(&'s self, pids: &'s [String]) -> Vec<(Labels<'s>, &'s Counts)> {
        let mut rows: Vec<(Labels<'s>, &'s Counts)> = Vec::new();
        for (id, pid) in self.listed.iter().zip(pids) {
            if let Some(p) = self.procs.get(id) {
                rows.push((vec![("pid", pid), ("comm", p.comm.as_str())], &p.counts));
            }
        }
        rows.push((vec![("pid", ""), ("comm", "other")], &self.other));
        rows
    }

    fn encode_processes(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pids: Vec<String> = self.listed.iter().map(|id| id.pid.to_string()).collect();
        let rows = self.rows(&pids);
        let classed = |scale: f64| {
            rows.iter().flat_map(move |(l, c)| {
                CLASSES.iter().enumerate().map(move |(i, class)| {
                    let mut l = l.clone();
                    l.push(("class", class));
                    (l, counter(c.pages[i] * scale))
                })
            })
        };
        family(
            enc,
            "immp_process_dirty_pages",
            "Pages dirtied while listed, by class (write_new: first writes, write_protect: \
             rewrites and copy-on-write, pagecache: file pages, shmem: tmpfs/memfd pages \
             written with write() and kin; a write through a shared file mapping counts in \
             two classes); the processes outside the top are comm=\"other\"",
            None,
            classed(1.0),
        )?;
        family(
            enc,
            "immp_process_dirty",
            "Bytes dirtied while listed, by class (pages x page size)",
            Some(Unit::Bytes),
            classed(self.page_size),
        )?;
        family(
            enc,
            "immp_process_dirty_unique",
            "Bytes dirtied while listed, the classes' overlap removed, each page once per \
             window: what a pre-copy migration resends (the top is ranked by its rate)",
            Some(Unit::Bytes),
            rows.iter()
                .map(|(l, c)| (l.clone(), counter(c.unique_bytes))),
        )?;
        family(
            enc,
            "immp_process_cpu",
            "CPU time while listed (processes with page activity only)",
            Some(Unit::Seconds),
            rows.iter().map(|(l, c)| (l.clone(), counter(c.cpu_s))),
        )?;
        self.encode_caps(enc, &pids)
    }

    fn encode_caps(
        &self,
        enc: &mut DescriptorEncoder,
        pids: &[String],
    ) -> Result<(), std::fmt::Error> {
        let caps = self.listed.iter().zip(pids).filter_map(|(id, pid)| {
            let c = self.caps.get(id)?;
            // The comm the other families show for this pid: one label set per process.
            let comm = self.procs.get(id)?.comm.as_str();
            let l = vec![
                ("pid", pid.as_str()),
                ("comm", comm),
                ("mechanism", mechanism(c.mechanism)),
            ];
            Some((l, gauge(c.ratio)))
        });
        family(
            enc,
            "immp_process_cap_ratio",
            "CPU cap immp holds the process to, as a share of one CPU (0.2 = 20 %; above 1 on \
             several CPUs), and the mechanism; no sample when nothing is capped",
            None,
            caps,
        )
    }

    fn encode_guest(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let by_source = |v: [f64; 2]| {
            [
                (vec![("source", "processes")], counter(v[0])),
                (vec![("source", "unattributed")], counter(v[1])),
            ]
        };
        family(
            enc,
            "immp_guest_dirty_pages",
            "Pages the guest dirtied: by processes (counted per process), and unattributed (an \
             estimate of kernel allocations no process explains); their sum is the guest total",
            None,
            by_source([self.guest_pages[0], self.guest_pages[1]]),
        )?;
        family(
            enc,
            "immp_guest_dirty",
            "Bytes the guest dirtied, by source as immp_guest_dirty_pages_total",
            Some(Unit::Bytes),
            by_source(self.guest_bytes),
        )?;
        family(
            enc,
            "immp_guest_short_lived_dirty_pages",
            "Pages dirtied by processes born and gone between two samples (part of \
             source=\"processes\")",
            None,
            one(counter(self.guest_pages[2])),
        )?;
        family(
            enc,
            "immp_guest_active_processes",
            "Processes with page activity in the last interval",
            None,
            one(gauge(self.active)),
        )
    }

    fn encode_migration(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(bw) = self.s.bandwidth {
            family(
                enc,
                "immp_migration_bandwidth_bytes_per_second",
                "The migration link's bandwidth (--bandwidth)",
                None,
                one(gauge(bw)),
            )?;
        }
        // A value per scenario; `None` leaves the sample out.
        let each = |f: fn(&Prediction) -> Option<f64>| {
            self.predictions
                .iter()
                .filter_map(move |(k, p)| Some((vec![("scenario", *k)], gauge(f(p)?))))
        };
        let help = "Predicted pre-copy migration at --bandwidth; scenario measured: as the \
                    last interval measured it; with --auto also uncapped (each capped process \
                    at its rate before the cap) and planned (with the policy's caps)";
        family(
            enc,
            "immp_migration_predicted",
            &format!("{help}; seconds (no sample when it does not converge)"),
            Some(Unit::Seconds),
            each(|p| p.total_s.filter(|_| p.converges)),
        )?;
        family(
            enc,
            "immp_migration_predicted_rounds",
            &format!("{help}; pre-copy rounds, round 0 included"),
            None,
            each(|p| Some(p.rounds as f64)),
        )?;
        family(
            enc,
            "immp_migration_converges",
            &format!("{help}; 1 when it converges, else 0"),
            None,
            each(|p| Some(if p.converges { 1.0 } else { 0.0 })),
        )?;
        if let Some(g) = self.goal_s {
            family(
                enc,
                "immp_migration_goal",
                "The automatic policy's goal, migration time",
                Some(Unit::Seconds),
                one(gauge(g)),
            )?;
        }
        Ok(())
    }

    fn encode_agent(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let modes = [Mode::Exact, Mode::Bounds].map(|m| {
            let on = self.mode == Some(m);
            (vec![("mode", m.name())], gauge(if on { 1.0 } else { 0.0 }))
        });
        family(
            enc,
            "immp_measurement_mode",
            "1 for the measurement mode in use: exact (soft-dirty windows, distinct pages) or \
             bounds (fault counting, a lower bound)",
            None,
            modes,
        )?;
        if let Some(p) = &self.probes {
            family(
                enc,
                "immp_probes",
                "The kernel probes in use",
                None,
                one(gauge(1.0)).map(|(_, g)| (vec![("probes", p.as_str())], g)),
            )?;
        }
        self.encode_health(enc)?;
        self.encode_self(enc)?;
        self.encode_policy(enc)
    }

    fn encode_health(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let items = [
            (
                "immp_probe_map_full_events",
                "Page events not counted: the kernel's per-process table was full",
                self.health[0],
            ),
            (
                "immp_probe_exits_lost",
                "Process exits whose final counts were lost (ring buffer full)",
                self.health[1],
            ),
            (
                "immp_proc_read_errors",
                "/proc reads that failed (the process is reported live, without CPU)",
                self.health[2],
            ),
        ];
        for (name, help, v) in items {
            family(enc, name, help, None, one(counter(v)))?;
        }
        family(
            enc,
            "immp_probe_tracked_processes",
            "Entries in the kernel's per-process table",
            None,
            one(gauge(self.tracked[0])),
        )?;
        family(
            enc,
            "immp_probe_capacity_processes",
            "Capacity of the kernel's per-process table (--max-procs)",
            None,
            one(gauge(self.tracked[1])),
        )?;
        family(
            enc,
            "immp_samples",
            "Intervals sampled",
            None,
            one(counter(self.samples as f64)),
        )?;
        family(
            enc,
            "immp_last_sample_timestamp",
            "End of the last interval, Unix time",
            Some(Unit::Seconds),
            one(gauge(self.last_ms as f64 / 1000.0)),
        )
    }

    fn encode_self(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        family(
            enc,
            "immp_self_dirty",
            "Bytes immp itself dirtied (it runs in the guest it measures)",
            Some(Unit::Bytes),
            one(counter(self.me.unique_bytes)),
        )?;
        family(
            enc,
            "immp_self_cpu",
            "CPU time immp itself used in the intervals it had page activity",
            Some(Unit::Seconds),
            one(counter(self.me.cpu_s)),
        )?;
        family(
            enc,
            "immp_self_resident",
            "immp's resident set when last seen active",
            Some(Unit::Bytes),
            one(gauge(self.me_rss)),
        )
    }

    fn encode_policy(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        family(
            enc,
            "immp_auto_enabled",
            "1 when the automatic cap policy runs (--auto)",
            None,
            one(gauge(if self.s.auto { 1.0 } else { 0.0 })),
        )?;
        family(
            enc,
            "immp_caps_in_force",
            "Processes immp caps now",
            None,
            one(gauge(self.caps.len() as f64)),
        )?;
        let kinds = ["capped", "changed", "lifted"];
        family(
            enc,
            "immp_cap_changes",
            "Cap changes, each one journaled: capped (new cap), changed, lifted (incl. exits)",
            None,
            kinds
                .iter()
                .zip(self.cap_changes)
                .map(|(k, v)| (vec![("change", *k)], counter(v))),
        )
    }
}

fn mechanism(m: Mechanism) -> &'static str {
    match m {
        Mechanism::CgroupV2 => "cgroup-v2",
        Mechanism::CgroupV1 => "cgroup-v1",
        Mechanism::Signal => "signal",
    }
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
