//! Arguments several commands share, the value enums clap shows, and the value parsers (all
//! of them one-line errors, never a panic).
use std::{path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};
use immp_model::{
    policy::{AutoSettings, KNEE, default_target},
    predict::Link,
    snapshot::Memory,
    units,
};

use crate::{
    act::mechanism::MechanismChoice,
    collect::{
        nonzero,
        probes::{FlavourChoice, ProbeOptions, Probes},
        procfs,
        sampler::ModeChoice,
    },
    view::Format,
};

/// Output of commands that print rows (one per process per interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RowsFormat {
    /// Aligned columns with human units
    Table,
    /// One JSON object per line (JSON lines)
    Json,
    /// One row per process per interval, header first
    Csv,
}

/// Output of commands that print events or a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventFormat {
    /// Human lines
    Table,
    /// One JSON object per line (JSON lines)
    Json,
}

impl From<RowsFormat> for Format {
    fn from(f: RowsFormat) -> Self {
        match f {
            RowsFormat::Table => Format::Table,
            RowsFormat::Json => Format::Json,
            RowsFormat::Csv => Format::Csv,
        }
    }
}

impl From<EventFormat> for Format {
    fn from(f: EventFormat) -> Self {
        match f {
            EventFormat::Table => Format::Table,
            EventFormat::Json => Format::Json,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProbesArg {
    /// Raw tracepoints (checked against the kernel's BTF) where they load, classic ones otherwise
    Auto,
    /// Raw tracepoints checked against BTF (folio sizes known) only
    Btf,
    /// Classic tracepoints (tracefs) only
    Tracepoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Exact where the kernel has soft-dirty, lower bounds otherwise
    Auto,
    /// Soft-dirty windows; refused on kernels without soft-dirty
    Exact,
    /// Fault counting only (writes nothing to any process)
    Bounds,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MechanismArg {
    /// cgroup v2 cpu.max if available, else cgroup v1 CFS quota, else signals
    Auto,
    CgroupV2,
    CgroupV1,
    /// SIGSTOP/SIGCONT duty cycle (what cpulimit does; coarse, last resort)
    Signal,
}

impl From<ModeArg> for ModeChoice {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Auto => ModeChoice::Auto,
            ModeArg::Exact => ModeChoice::Exact,
            ModeArg::Bounds => ModeChoice::Bounds,
        }
    }
}

impl From<MechanismArg> for MechanismChoice {
    fn from(m: MechanismArg) -> Self {
        match m {
            MechanismArg::Auto => MechanismChoice::Auto,
            MechanismArg::CgroupV2 => MechanismChoice::CgroupV2,
            MechanismArg::CgroupV1 => MechanismChoice::CgroupV1,
            MechanismArg::Signal => MechanismChoice::Signal,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ProbeArgs {
    /// Which kernel probes to use
    #[arg(long, value_enum, default_value_t = ProbesArg::Auto)]
    pub probes: ProbesArg,
    /// Capacity of the kernel's per-process table; overflows are reported, never silent
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_procs: u32,
    /// Do not count writes into tmpfs, /dev/shm and memfd files made with write() and kin
    /// (the shmem class): saves the system-call hook it needs, which runs on every system
    /// call (tens of ns each; see README)
    #[arg(long)]
    pub no_shmem: bool,
}

impl ProbeArgs {
    pub fn options(&self) -> ProbeOptions {
        ProbeOptions {
            flavour: match self.probes {
                ProbesArg::Auto => FlavourChoice::Auto,
                ProbesArg::Btf => FlavourChoice::Btf,
                ProbesArg::Tracepoint => FlavourChoice::Tracepoint,
            },
            max_procs: self.max_procs,
            shmem: !self.no_shmem,
        }
    }

    /// Loads and attaches the probes; failure means this machine cannot measure (exit 3).
    pub fn open(&self) -> anyhow::Result<Probes> {
        Probes::load(&self.options())
            .map_err(|e| crate::environment(format!("cannot attach kernel probes: {e:#}")))
    }
}

/// The migration link, for verdicts and predictions.
#[derive(Args, Debug, Clone)]
pub struct LinkArgs {
    /// Migration link bandwidth (e.g. 100Mbit, 1Gbit, 12.5MB/s)
    #[arg(long, value_parser = bandwidth)]
    pub bandwidth: Option<f64>,
    /// What an idle migration sends in its first round (e.g. 512MB); default: the guest's
    /// non-zero memory, sampled from /proc/kcore (zero pages are almost free to send; freed
    /// pages keep their bytes), or memory in use where kcore cannot be read
    #[arg(long, value_parser = bytes)]
    pub ram: Option<f64>,
    /// Downtime limit of the migration (stop-and-copy), as in QEMU
    #[arg(long, default_value = "300ms", value_parser = positive_duration)]
    pub downtime: Duration,
    /// A process dirtying at least this share of the link is an IMMP
    #[arg(long, default_value = "25%", value_parser = share)]
    pub immp_share: f64,
}

impl LinkArgs {
    /// The link now: round 0 is --ram, or the guest's non-zero memory (it grows as processes
    /// touch new memory). `at`: as a snapshot measured it (callers with one pass it every
    /// interval); None: measured here.
    pub fn link_at(&self, at: Option<&Memory>) -> Option<Link> {
        let m = at.copied().unwrap_or_else(nonzero::memory);
        let ram = self.ram.unwrap_or(m.round_zero_bytes);
        self.bandwidth
            .map(|bw| Link::new(bw, ram, self.downtime).with_memory(m.ram_bytes))
    }

    pub fn link(&self) -> Option<Link> {
        self.link_at(None)
    }

    pub fn ram_now(&self) -> f64 {
        self.ram.unwrap_or_else(|| nonzero::round_zero().bytes())
    }

    /// The default goal of `--auto` (`target` unless given): a multiple of the idle
    /// migration, with round 0 as the goal sees it (`Memory::goal_round_zero_bytes`, or --ram).
    pub fn goal_at(&self, target: Option<Duration>, at: Option<&Memory>) -> Option<Duration> {
        let m = at.copied().unwrap_or_else(nonzero::memory);
        let ram = self.ram.unwrap_or(m.goal_round_zero_bytes);
        let link = self.link_at(Some(&m))?;
        Some(target.unwrap_or_else(|| default_target(&Link { ram, ..link })))
    }
}

/// What the automatic cap policy may do: `throttle --auto`, `top` and `serve --auto` take the
/// same three options.
#[derive(Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Lowest cap the automatic policy may set (QoS floor)
    #[arg(long, default_value = "15%", value_parser = cap)]
    pub floor: f64,
    /// Migration time the automatic policy aims at (e.g. 60s); default: the knee of the
    /// time/throughput frontier, 1.1 x the time with every IMMP at the floor, at most 2 x the
    /// idle guest's migration time (its non-zero memory / bandwidth; the bound is shown at
    /// start, each decision says the goal it used)
    #[arg(long, value_parser = positive_duration)]
    pub target: Option<Duration>,
    /// Share of the dirtying the counts may miss (kernel work on a process's behalf, noise):
    /// measured rates are planned as rate / (1 - headroom)
    #[arg(long, default_value = "15%", value_parser = headroom)]
    pub headroom: f64,
}

impl PolicyArgs {
    /// The policy's settings: round 0 and the default goal as `at` measured them (ask every
    /// interval with the snapshot's `memory`; None: measured now). None without a bandwidth.
    pub fn settings(&self, link: &LinkArgs, at: Option<&Memory>) -> Option<AutoSettings> {
        let m = at.copied().unwrap_or_else(nonzero::memory);
        let base = AutoSettings::new(
            link.link_at(Some(&m))?,
            self.floor,
            link.goal_at(self.target, Some(&m)),
        );
        Some(AutoSettings {
            immp_share: link.immp_share,
            headroom: self.headroom,
            // The default goal is the knee below that bound (`policy::KNEE`).
            knee: self.target.is_none().then_some(KNEE),
            ..base
        })
    }
}

/// Where the journal and its lock live.
#[derive(Args, Debug, Clone)]
pub struct JournalArgs {
    /// Directory of the journal and its lock
    #[arg(long, env = "IMMP_JOURNAL_DIR", default_value = crate::act::journal::DEFAULT_DIR)]
    pub journal_dir: PathBuf,
}

pub fn duration(s: &str) -> Result<Duration, String> {
    units::parse_duration(s).map_err(|e| e.to_string())
}

pub fn positive_duration(s: &str) -> Result<Duration, String> {
    units::parse_positive_duration(s).map_err(|e| e.to_string())
}

pub fn bandwidth(s: &str) -> Result<f64, String> {
    units::parse_bandwidth(s).map_err(|e| e.to_string())
}

pub fn bytes(s: &str) -> Result<f64, String> {
    units::parse_bytes(s).map_err(|e| e.to_string())
}

pub fn share(s: &str) -> Result<f64, String> {
    units::parse_share(s).map_err(|e| e.to_string())
}

pub fn headroom(s: &str) -> Result<f64, String> {
    units::parse_headroom(s).map_err(|e| e.to_string())
}

pub fn cap(s: &str) -> Result<f64, String> {
    let p = units::parse_percent(s).map_err(|e| e.to_string())?;
    crate::act::target::validate_cap(p).map_err(|e| e.to_string())
}

/// Window lengths, strictly increasing.
pub fn windows(s: &str) -> Result<Vec<Duration>, String> {
    units::parse_windows(s).map_err(|e| e.to_string())
}

/// Resolves `--pid` arguments to process identities (duplicates once); unknown PIDs are bad
/// input.
pub fn resolve_pids(pids: &[u32]) -> anyhow::Result<Vec<immp_model::ProcId>> {
    let mut out = Vec::new();
    for &pid in pids {
        let id = procfs::stat(pid)
            .map(|s| s.id)
            .ok_or_else(|| crate::usage(format!("no process with PID {pid}")))?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}
