//! The one command tree: `profile`, `doctor` (and later `throttle`, `restore`, `top`).
use std::{io::Write as _, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::{
    doctor,
    output::{Format, Printer},
    probes::{FlavourChoice, ProbeOptions, Probes},
    procinfo,
    rank::{RankSettings, rank},
    sampler::{ModeChoice, Sampler, SamplerOptions},
    snapshot::{ProcId, Snapshot},
    throttle::MechanismChoice,
    units, usage,
};

#[derive(Parser, Debug)]
#[command(
    name = "immp",
    version,
    about = "Find the processes whose memory writes keep a VM from live-migrating, and tame them",
    long_about = "immp counts, per process, the memory pages each one dirties (eBPF on page faults and \
page-cache dirtying), ranks them against the migration link, and caps the worst with cgroup CPU \
limits.\n\nExit codes: 0 ok, 1 failure while running, 2 bad input (nothing changed), 3 this \
machine cannot do it (not root, no probes, no cpu controller)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Measure dirty rates per process, headless (table, JSON lines or CSV)
    #[command(after_help = "Examples:\n  \
  immp profile --duration 10s --bandwidth 100Mbit\n  \
  immp profile --pid 4242 --interval 500ms --format json | jq .processes[0]\n  \
  immp profile --top 5 --format csv > rates.csv\n\n\
Without soft-dirty (mode \"bounds\") the numbers are lower bounds: a process that rewrites pages \
it already dirtied takes no new fault. JSON is the default when stdout is not a terminal.")]
    Profile(ProfileArgs),
    /// Check what this kernel and machine allow, and what immp will do with it
    #[command(
        after_help = "Examples:\n  immp doctor\n  immp doctor --format json\n\n\
Exits non-zero only when immp cannot work at all."
    )]
    Doctor(DoctorArgs),
    /// Cap processes' CPU live (manual or automatic), and lift the caps when done
    #[command(after_help = "Examples:\n  \
  immp throttle --pid 4242 --cap 20% --duration 5m\n  \
  immp throttle --pid 4242 --pid 4243 --cap 15% --format json\n  \
  immp throttle --auto --bandwidth 100Mbit --floor 15% --duration 10m\n  \
  immp throttle --auto --bandwidth 1Gbit --target 60s\n\n\
A cap is a percentage of one CPU (above 0, at most 100 x CPUs). Caps are lifted on normal exit, \
Ctrl-C, SIGTERM and panic; after a SIGKILL or a crash run `immp restore`. Every change is written \
to the journal (--journal-dir) before it is made. Refused, with nothing changed: PID 1, kernel \
threads, immp itself, unknown PIDs. A process that exits while capped is not an error.")]
    Throttle(ThrottleArgs),
    /// Put back every process a crashed or killed immp left capped (reads only the journal)
    #[command(
        after_help = "Examples:\n  immp restore\n  immp restore --journal-dir /var/lib/immp --format json\n\n\
Idempotent: running it twice is harmless. Exit 0 when everything pending was restored."
    )]
    Restore(RestoreArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ProbeArgs {
    /// Which kernel probes to use
    #[arg(long, value_enum, default_value_t = FlavourChoice::Auto)]
    pub probes: FlavourChoice,
    /// Capacity of the kernel's per-process table; overflows are reported, never silent
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_procs: u32,
}

impl ProbeArgs {
    pub fn options(&self) -> ProbeOptions {
        ProbeOptions {
            flavour: self.probes,
            max_procs: self.max_procs,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ProfileArgs {
    /// Always report this process (repeatable); without --pid every active process is shown
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Stop after this long (e.g. 30s, 2m); default: until Ctrl-C
    #[arg(long, value_parser = units::parse_positive_duration)]
    pub duration: Option<Duration>,
    /// Sampling interval = measurement window (e.g. 1s, 500ms)
    #[arg(long, visible_alias = "window", default_value = "1s", value_parser = units::parse_positive_duration)]
    pub interval: Duration,
    /// Migration link bandwidth (e.g. 100Mbit, 1Gbit, 12.5MB/s): enables IMMP verdicts
    #[arg(long, value_parser = units::parse_bandwidth)]
    pub bandwidth: Option<f64>,
    /// A process dirtying at least this share of the link is an IMMP
    #[arg(long, default_value = "25%", value_parser = parse_share)]
    pub immp_share: f64,
    /// Show at most N processes per interval
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Output format (default: table on a terminal, json otherwise)
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub exact: ExactArgs,
    /// Guest RAM for the migration prediction (e.g. 512MB); default: MemTotal
    #[arg(long, value_parser = parse_bytes)]
    pub ram: Option<f64>,
    /// Downtime limit of the migration (stop-and-copy), as in QEMU
    #[arg(long, default_value = "300ms", value_parser = units::parse_positive_duration)]
    pub downtime: Duration,
    /// Measure the dirty curve: distinct pages per window, for these increasing window lengths
    /// (e.g. 0.1s,0.25s,0.5s,1s,2s,4s); one output per sweep
    #[arg(long, value_parser = parse_windows)]
    pub curve: Option<Windows>,
}

/// Exact mode: soft-dirty windows.
#[derive(Args, Debug, Clone)]
pub struct ExactArgs {
    /// auto: exact where soft-dirty works; exact: refuse to run without it; bounds: faults only.
    /// Exact mode writes one thing: it clears the soft-dirty bits of the processes it measures
    /// (`echo 4 > /proc/PID/clear_refs`), harmless to them
    #[arg(long, value_enum, default_value_t = ModeChoice::Auto)]
    pub mode: ModeChoice,
    /// Re-arm at most this many of the busiest writers per window (plus every --pid)
    #[arg(long, default_value_t = 64)]
    pub exact_max: usize,
    /// Cross-check one process's exact count against its pagemap soft-dirty bits every window
    #[arg(long, value_name = "PID")]
    pub verify: Option<u32>,
}

/// Window lengths, strictly increasing.
#[derive(Debug, Clone)]
pub struct Windows(pub Vec<Duration>);

fn parse_windows(s: &str) -> Result<Windows, String> {
    let v: Vec<Duration> = s
        .split(',')
        .map(|w| units::parse_positive_duration(w.trim()).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    if v.windows(2).any(|p| p[1] <= p[0]) {
        return Err(format!("'{s}': window lengths must be strictly increasing"));
    }
    Ok(Windows(v))
}

#[derive(Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Output format (table or json)
    #[arg(long, value_enum)]
    pub format: Option<Format>,
}

#[derive(Args, Debug, Clone)]
pub struct ThrottleArgs {
    /// Process to cap (repeatable)
    #[arg(long = "pid", value_name = "PID", required_unless_present = "auto")]
    pub pids: Vec<u32>,
    /// Manual cap, percent of one CPU (e.g. 20%)
    #[arg(long, value_parser = parse_cap, required_unless_present = "auto", conflicts_with = "auto")]
    pub cap: Option<f64>,
    /// Pick the IMMPs and their caps from the profiler and the migration predictor
    #[arg(long, requires = "bandwidth")]
    pub auto: bool,
    /// Migration link bandwidth (e.g. 100Mbit, 12.5MB/s)
    #[arg(long, value_parser = units::parse_bandwidth)]
    pub bandwidth: Option<f64>,
    /// Lowest cap the automatic policy may set (QoS floor)
    #[arg(long, default_value = "15%", value_parser = parse_cap)]
    pub floor: f64,
    /// Migration time to achieve (e.g. 60s); default: converging at all
    #[arg(long, value_parser = units::parse_positive_duration)]
    pub target: Option<Duration>,
    /// Downtime limit of the migration (stop-and-copy), as in QEMU
    #[arg(long, default_value = "300ms", value_parser = units::parse_positive_duration)]
    pub downtime: Duration,
    /// Guest RAM to migrate (e.g. 512MB); default: this machine's MemTotal
    #[arg(long, value_parser = parse_bytes)]
    pub ram: Option<f64>,
    /// A process dirtying at least this share of the link may be capped
    #[arg(long, default_value = "25%", value_parser = parse_share)]
    pub immp_share: f64,
    /// Plan caps so that migration converges using only (100 % - this) of the link: a margin
    /// for dirtying the counts do not see (kernel work on the process's behalf, noise)
    #[arg(long, default_value = "20%", value_parser = parse_headroom)]
    pub headroom: f64,
    /// Lift all caps after this long (e.g. 10m); default: until Ctrl-C
    #[arg(long, value_parser = units::parse_positive_duration)]
    pub duration: Option<Duration>,
    /// Interval of the live lines and of automatic re-evaluation
    #[arg(long, default_value = "1s", value_parser = units::parse_positive_duration)]
    pub interval: Duration,
    /// Output format (default: table on a terminal, json otherwise)
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Where the journal and its lock live
    #[arg(long, env = "IMMP_JOURNAL_DIR", default_value = crate::journal::DEFAULT_DIR)]
    pub journal_dir: PathBuf,
    /// How to cap
    #[arg(long, value_enum, default_value_t = MechanismChoice::Auto)]
    pub mechanism: MechanismChoice,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    /// Where the journal and its lock live
    #[arg(long, env = "IMMP_JOURNAL_DIR", default_value = crate::journal::DEFAULT_DIR)]
    pub journal_dir: PathBuf,
    /// Output format (default: table on a terminal, json otherwise)
    #[arg(long, value_enum)]
    pub format: Option<Format>,
}

fn parse_headroom(s: &str) -> Result<f64, String> {
    let p = units::parse_percent(s).map_err(|e| e.to_string())?;
    if !(0.0..95.0).contains(&p) {
        return Err(format!("'{s}' must be at least 0% and below 95%"));
    }
    Ok(p / 100.0)
}

fn parse_cap(s: &str) -> Result<f64, String> {
    let p = units::parse_percent(s).map_err(|e| e.to_string())?;
    crate::throttle::validate_cap(p).map_err(|e| e.to_string())
}

fn parse_bytes(s: &str) -> Result<f64, String> {
    let err = || format!("'{s}' is not a size (examples: 512MB, 4GiB)");
    let t = s.trim();
    let idx = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let n: f64 = t[..idx].parse().map_err(|_| err())?;
    let mult = match t[idx..].trim() {
        "" | "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1048576.0,
        "GiB" => 1073741824.0,
        _ => return Err(err()),
    };
    if n <= 0.0 {
        return Err(err());
    }
    Ok(n * mult)
}

fn parse_share(s: &str) -> Result<f64, String> {
    let p = units::parse_percent(s).map_err(|e| e.to_string())?;
    if p <= 0.0 || p > 1000.0 {
        return Err(format!("'{s}' must be above 0% and at most 1000%"));
    }
    Ok(p / 100.0)
}

pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Profile(a) => profile(a),
        Command::Doctor(a) => doctor_cmd(a),
        Command::Throttle(a) => crate::throttle_cmd::throttle(a),
        Command::Restore(a) => crate::throttle_cmd::restore(a),
    }
}

/// Resolve `--pid` arguments to process identities; unknown PIDs are bad input.
pub fn resolve_pids(pids: &[u32]) -> anyhow::Result<Vec<ProcId>> {
    pids.iter()
        .map(|&pid| {
            procinfo::stat(pid)
                .map(|s| s.id)
                .ok_or_else(|| usage(format!("no process with PID {pid}")))
        })
        .collect()
}

/// Runs `f` on every tick until the duration ends, or Ctrl-C / SIGTERM; `f` returns false to stop.
pub fn tick_loop(
    interval: Duration,
    duration: Option<Duration>,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    run_loop(interval, duration, || Ok(f()?.then_some(interval)))
}

/// Like `tick_loop`, but `f` says how long to wait before its next call (`None`: stop).
pub fn run_loop(
    first: Duration,
    duration: Option<Duration>,
    mut f: impl FnMut() -> anyhow::Result<Option<Duration>>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let start = tokio::time::Instant::now();
        let mut next = start + first;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    let Some(wait) = f()? else { return Ok(()) };
                    if duration.is_some_and(|d| start.elapsed() + wait / 2 >= d) { return Ok(()); }
                    next += wait;
                    let now = tokio::time::Instant::now();
                    if next < now { next = now; }
                }
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                _ = hup.recv() => return Ok(()),
            }
        }
    })
}

fn profile(a: ProfileArgs) -> anyhow::Result<i32> {
    crate::require_root()?;
    let watch = resolve_pids(&a.pids)?;
    let verify = match a.exact.verify {
        Some(pid) => Some(
            procinfo::stat(pid)
                .map(|s| s.id)
                .ok_or_else(|| usage(format!("--verify: no process with PID {pid}")))?,
        ),
        None => None,
    };
    if a.exact.verify.is_some() && a.exact.mode == ModeChoice::Bounds {
        return Err(usage("--verify needs --mode exact or auto"));
    }
    let probes = Probes::load(&a.probe.options())
        .map_err(|e| crate::environment(format!("cannot attach kernel probes: {e:#}")))?;
    let flavour = probes.report.flavour;
    let opts = SamplerOptions {
        mode: a.exact.mode,
        exact_max: a.exact.exact_max,
        verify,
    };
    let mut sampler = Sampler::with_options(probes, watch.clone(), &opts)?;
    let format = Format::resolve(a.format);
    if format == Format::Table {
        eprintln!(
            "immp: profiling ({}, {:?} probes) every {}{}; Ctrl-C to stop",
            if sampler.is_exact() {
                "exact: soft-dirty windows"
            } else {
                "lower bounds: no soft-dirty"
            },
            flavour,
            a.curve.as_ref().map_or_else(
                || units::fmt_duration(a.interval),
                |w| format!("curve sweep of {} windows", w.0.len())
            ),
            a.duration
                .map(|d| format!(" for {}", units::fmt_duration(d)))
                .unwrap_or_default()
        );
    }
    let settings = RankSettings {
        bandwidth: a.bandwidth,
        immp_share: a.immp_share,
    };
    let link = a.bandwidth.map(|bw| crate::predict::Link {
        bandwidth: bw,
        ram: a.ram.unwrap_or_else(crate::procinfo::mem_total),
        downtime_limit: a.downtime,
        max_rounds: 30,
    });
    let mut printer = Printer::new(std::io::stdout().lock(), format, a.top.max(1));
    let windows = a.curve.map(|w| w.0);
    // With a curve, one output per sweep: sample at the end of each window (each sample
    // re-arms, so each window is measured on its own) and attach the curve to the last one.
    let mut sweep: Vec<Snapshot> = Vec::new();
    let first = windows.as_ref().map_or(a.interval, |w| w[0]);
    let res = run_loop(first, a.duration, || {
        let snap = sampler.sample();
        let snap = match &windows {
            None => snap,
            Some(w) => {
                sweep.push(snap);
                if sweep.len() < w.len() {
                    return Ok(Some(w[sweep.len()]));
                }
                crate::sampler::with_curve(std::mem::take(&mut sweep))
            }
        };
        let mut ranking = rank(&snap, &settings);
        let assessment = link
            .as_ref()
            .map(|l| crate::policy::assess(&snap, l, None, a.top.max(1)));
        if let Some(asmt) = &assessment {
            for r in &mut ranking.processes {
                r.impact = asmt.impacts.get(&r.proc_.id()).copied();
            }
        }
        if let Err(e) = printer.interval_with(
            &snap,
            &ranking,
            a.bandwidth,
            assessment.map(|x| x.prediction),
        ) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(None); // reader went away (e.g. `| head`): a normal end
            }
            return Err(e).context("writing output");
        }
        // Every watched process is gone: nothing left to watch.
        let all_gone = !watch.is_empty()
            && snap
                .processes
                .iter()
                .filter(|p| watch.contains(&p.id()))
                .all(|p| p.gone);
        Ok((!all_gone).then(|| windows.as_ref().map_or(a.interval, |w| w[0])))
    });
    res.map(|_| crate::exit::OK)
}

fn doctor_cmd(a: DoctorArgs) -> anyhow::Result<i32> {
    let r = doctor::run();
    let mut out = std::io::stdout().lock();
    match Format::resolve(a.format) {
        Format::Json => {
            serde_json::to_writer(&mut out, &r)?;
            writeln!(out)?;
        }
        Format::Table => doctor::print_table(&r, &mut out)?,
        Format::Csv => return Err(usage("doctor supports --format table or json")),
    }
    Ok(if r.usable {
        crate::exit::OK
    } else {
        crate::exit::ENVIRONMENT
    })
}
