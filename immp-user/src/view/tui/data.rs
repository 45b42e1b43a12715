//! What one snapshot shows once the model has looked at it: the ranked rows (exited processes
//! kept a few intervals), the predicted migration with and without the caps in force, and each
//! busy writer's part in it. Pure functions of a snapshot and the settings.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use immp_model::{
    ProcId, Snapshot,
    event::Mechanism,
    impact::{Impact, assess},
    policy::{AutoSettings, KNEE, default_target},
    predict::{Link, Prediction},
    rank::{RankSettings, Ranked, rank},
    snapshot::ProcSample,
};

/// Intervals an exited process stays on screen (greyed).
pub const GHOST_INTERVALS: u8 = 3;

/// What the operator set (start options, changed live by keys).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub bandwidth: Option<f64>,
    /// What round 0 of a migration sends (bytes).
    pub ram: f64,
    /// The guest's whole memory (bytes): the most a round can resend.
    pub memory: f64,
    /// Round 0 the default goal is a multiple of (slower to follow than `ram`: see
    /// `collect::nonzero::goal_round_zero`); None: `ram`.
    pub goal_ram: Option<f64>,
    pub downtime: Duration,
    pub immp_share: f64,
    pub floor_pct: f64,
    pub headroom: f64,
    pub target: Option<Duration>,
    pub auto: bool,
    pub interval: Duration,
    /// Why the measurement mode is what it is (shown in the header).
    pub mode_why: String,
    pub mechanism: Option<Mechanism>,
    pub journal: String,
    pub keep_caps: bool,
}

impl Settings {
    pub fn link(&self) -> Option<Link> {
        self.bandwidth
            .map(|bw| Link::new(bw, self.ram, self.downtime).with_memory(self.memory))
    }

    /// The automatic policy's settings, as `immp throttle --auto` builds them.
    pub fn auto_settings(&self) -> Option<AutoSettings> {
        let link = self.link()?;
        let goal = Link {
            ram: self.goal_ram.unwrap_or(self.ram),
            ..link
        };
        let target = self.target.unwrap_or_else(|| default_target(&goal));
        let base = AutoSettings::new(link, self.floor_pct, Some(target));
        Some(AutoSettings {
            immp_share: self.immp_share,
            headroom: self.headroom,
            // No --target (and none typed in): the knee below the bound, as throttle has it.
            knee: self.target.is_none().then_some(KNEE),
            ..base
        })
    }
}

/// Who set a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapBy {
    Operator,
    Policy,
}

/// A cap in force, as the actuator reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct CapView {
    pub pct: f64,
    pub mechanism: Mechanism,
    /// Where the cap lives (empty for signals).
    pub cgroup: String,
    pub by: CapBy,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub r: Ranked,
    /// 0: live; n: exited n intervals ago (1: during this one).
    pub gone_for: u8,
}

impl Row {
    pub fn id(&self) -> ProcId {
        self.r.proc_.id()
    }

    pub fn p(&self) -> &ProcSample {
        &self.r.proc_
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Data {
    /// The snapshot's facts (its processes are in `rows`).
    pub snap: Snapshot,
    /// Ranked by dirty rate; exited processes after the live ones' order by their last rate.
    pub rows: Vec<Row>,
    pub link_share: Option<f64>,
    /// The migration predicted from what was measured (the caps in force included).
    pub now: Option<Prediction>,
    /// The same with every cap lifted (capped processes at their rate before the cap); only
    /// when caps are in force.
    pub uncapped: Option<Prediction>,
    /// The selected process's part in the prediction (computed while its detail is open).
    pub impact: Option<(ProcId, Impact)>,
}

/// A capped process as measured just before its cap: what lifting the cap brings back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Uncapped {
    pub dirty_bytes_per_s: f64,
    pub cpu_pct: f64,
    /// Its resident set then (a cap can shrink a writer's working set, which bounds what it
    /// dirties per round).
    pub rss_bytes: u64,
}

impl Uncapped {
    pub fn of(p: &ProcSample) -> Self {
        Self {
            dirty_bytes_per_s: p.dirty_bytes_per_s,
            cpu_pct: p.cpu_pct,
            rss_bytes: p.rss_bytes,
        }
    }
}

/// Everything `Data::build` reads besides the snapshot.
pub struct Inputs<'a> {
    pub settings: &'a Settings,
    pub caps: &'a BTreeMap<ProcId, CapView>,
    /// Each capped process's (dirty bytes/s, CPU %) measured before its cap.
    pub uncapped: &'a BTreeMap<ProcId, Uncapped>,
    pub ghosts: &'a [(ProcSample, u8)],
}

impl Data {
    pub fn build(snap: &Snapshot, i: &Inputs) -> Self {
        let s = i.settings;
        let settings = RankSettings {
            bandwidth: s.bandwidth,
            immp_share: s.immp_share,
        };
        let mut all = snap.clone();
        let live: BTreeSet<ProcId> = snap.processes.iter().map(ProcSample::id).collect();
        all.processes.extend(
            i.ghosts
                .iter()
                .filter(|(p, _)| !live.contains(&p.id()))
                .map(|(p, _)| p.clone()),
        );
        let ranking = rank(&all, &settings);
        let age = |id: ProcId, gone: bool| match i.ghosts.iter().find(|(p, _)| p.id() == id) {
            Some((_, n)) if !live.contains(&id) => *n,
            _ => u8::from(gone),
        };
        let rows = ranking
            .processes
            .into_iter()
            .map(|r| Row {
                gone_for: age(r.proc_.id(), r.proc_.gone),
                r,
            })
            .collect();
        let link = s.link();
        // The prediction alone: each process's impact costs up to a hundred more (a search
        // for its cap), so only the selected one's is computed (`impact_of`).
        let now = link.map(|l| assess(snap, &l, None, 0).prediction);
        let uncapped = link
            .filter(|_| !i.caps.is_empty())
            .map(|l| assess(&without_caps(snap, i), &l, None, 0).prediction);
        all.processes.clear();
        Self {
            snap: all,
            rows,
            link_share: ranking.link_share,
            now,
            uncapped,
            impact: None,
        }
    }

    pub fn row(&self, id: &ProcId) -> Option<&Row> {
        self.rows.iter().find(|r| r.id() == *id)
    }
}

/// What `immp_model::impact::assess` computes for each of the busiest writers, for one
/// process (converging at all is the goal, as in `profile`).
pub fn impact_of(snap: &Snapshot, link: &Link, id: ProcId) -> Option<Impact> {
    immp_model::impact::impact_of(snap, link, None, id)
}

/// `snap` as it would be without the caps: each capped process at the rate, CPU and resident
/// set measured before its cap (a cap slows it; lifting it brings them back).
fn without_caps(snap: &Snapshot, i: &Inputs) -> Snapshot {
    let mut s = snap.clone();
    let mut extra = 0.0;
    for p in &mut s.processes {
        let Some(u) = i
            .uncapped
            .get(&p.id())
            .filter(|_| i.caps.contains_key(&p.id()))
        else {
            continue;
        };
        // The predictor reads the rate, CPU and resident set (no curve in `top`).
        if u.dirty_bytes_per_s > p.dirty_bytes_per_s {
            extra += u.dirty_bytes_per_s - p.dirty_bytes_per_s;
            p.dirty_bytes_per_s = u.dirty_bytes_per_s;
            p.cpu_pct = p.cpu_pct.max(u.cpu_pct);
            p.rss_bytes = p.rss_bytes.max(u.rss_bytes);
        }
    }
    s.totals.dirty_bytes_per_s += extra;
    s
}

/// Table columns the operator can sort by (`s`, Left/Right), in screen order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Pid,
    Command,
    Dirty,
    New,
    WriteProtect,
    PageCache,
    Cpu,
    Cap,
}

impl SortKey {
    pub const ALL: [SortKey; 8] = [
        SortKey::Pid,
        SortKey::Command,
        SortKey::Dirty,
        SortKey::New,
        SortKey::WriteProtect,
        SortKey::PageCache,
        SortKey::Cpu,
        SortKey::Cap,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SortKey::Pid => "PID",
            SortKey::Command => "command",
            SortKey::Dirty => "dirty",
            SortKey::New => "new pages",
            SortKey::WriteProtect => "write-protect",
            SortKey::PageCache => "page cache",
            SortKey::Cpu => "CPU",
            SortKey::Cap => "cap",
        }
    }

    pub fn step(self, by: isize) -> SortKey {
        let n = Self::ALL.len() as isize;
        let i = Self::ALL.iter().position(|k| *k == self).unwrap_or(0) as isize;
        Self::ALL[((i + by).rem_euclid(n)) as usize]
    }
}

/// The rows `filter` keeps, in `key` order (`invert` reverses it); ties keep the ranking.
pub fn visible<'a>(
    d: &'a Data,
    caps: &BTreeMap<ProcId, CapView>,
    key: SortKey,
    invert: bool,
    filter: &str,
) -> Vec<&'a Row> {
    let f = filter.trim().to_lowercase();
    let mut v: Vec<&Row> = d.rows.iter().filter(|r| matches(r, &f)).collect();
    let num = |r: &Row| -> f64 {
        let p = r.p();
        let page = d.snap.page_size as f64;
        match key {
            SortKey::Dirty => p.dirty_bytes_per_s,
            SortKey::New => p.rates.write_new * page,
            SortKey::WriteProtect => p.rates.write_protect * page,
            SortKey::PageCache => (p.rates.pagecache + p.rates.shmem) * page,
            SortKey::Cpu => p.cpu_pct,
            SortKey::Cap => caps.get(&r.id()).map_or(f64::INFINITY, |c| c.pct),
            SortKey::Pid | SortKey::Command => 0.0,
        }
    };
    // Numbers biggest first; PID and names ascending (as htop does); tightest cap first.
    v.sort_by(|a, b| {
        let o = match key {
            SortKey::Pid => a.p().pid.cmp(&b.p().pid),
            SortKey::Command => a.p().comm.to_lowercase().cmp(&b.p().comm.to_lowercase()),
            SortKey::Cap => num(a).total_cmp(&num(b)),
            _ => num(b).total_cmp(&num(a)),
        };
        if invert { o.reverse() } else { o }
    });
    v
}

fn matches(r: &Row, f: &str) -> bool {
    if f.is_empty() {
        return true;
    }
    let p = r.p();
    p.pid.to_string().starts_with(f)
        || p.comm.to_lowercase().contains(f)
        || p.cmdline.to_lowercase().contains(f)
}
