//! `immp profile`: measure dirty rates per process, headless.
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use immp_model::{
    Event, Snapshot,
    event::Sample,
    impact::assess,
    rank::{RankSettings, rank},
    snapshot::Flavour,
    text::clean,
    units,
};

use super::{
    args::{self, LinkArgs, ModeArg, ProbeArgs, RowsFormat},
    run::{Next, run_loop},
};
use crate::{
    collect::sampler::{ModeError, Sampler, SamplerOptions, with_curve},
    view::{self, Format, is_broken_pipe},
};

pub const HELP: &str = "Examples:\n  \
  immp profile --duration 10s --bandwidth 100Mbit\n  \
  immp profile --pid 4242 --interval 500ms --format json | jq .processes[0]\n  \
  immp profile --top 5 --format csv > rates.csv\n\n\
Without soft-dirty (mode \"bounds\") the numbers are lower bounds: a process that rewrites pages \
it already dirtied takes no new fault. JSON is the default when stdout is not a terminal.";

#[derive(Args, Debug, Clone)]
pub struct ProfileArgs {
    /// Always report this process (repeatable); without --pid every active process is shown
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Stop after this long (e.g. 30s, 2m): a deadline, even within an interval; default: until Ctrl-C
    #[arg(long, value_parser = args::positive_duration)]
    pub duration: Option<Duration>,
    /// Sampling interval = measurement window (e.g. 1s, 500ms)
    #[arg(long, visible_alias = "window", default_value = "1s", value_parser = args::positive_duration)]
    pub interval: Duration,
    #[command(flatten)]
    pub link: LinkArgs,
    /// Show at most N processes per interval (at least 1)
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub top: u64,
    /// Output format (default: table on a terminal, json otherwise)
    #[arg(long, value_enum)]
    pub format: Option<RowsFormat>,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub exact: ExactArgs,
    /// Measure the dirty curve: distinct pages per window, for these increasing window lengths
    /// (e.g. 0.1s,0.25s,0.5s,1s,2s,4s); one output per sweep
    #[arg(long, value_parser = args::windows)]
    pub curve: Option<Vec<Duration>>,
}

/// Exact mode: soft-dirty windows.
#[derive(Args, Debug, Clone)]
pub struct ExactArgs {
    /// auto: exact where soft-dirty works; exact: refuse to run without it; bounds: faults only.
    /// Exact mode writes one thing: it clears the soft-dirty bits of the processes it measures
    /// (`echo 4 > /proc/PID/clear_refs`), harmless to them
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub mode: ModeArg,
    /// Re-arm at most this many of the busiest writers per window (plus every --pid)
    #[arg(long, default_value_t = 64)]
    pub exact_max: usize,
    /// Cross-check one process's exact count against its pagemap soft-dirty bits every window
    #[arg(long, value_name = "PID")]
    pub verify: Option<u32>,
}

pub fn run(a: ProfileArgs) -> anyhow::Result<i32> {
    crate::require_root()?;
    let watch = super::args::resolve_pids(&a.pids)?;
    let verify = match a.exact.verify {
        Some(_) if a.exact.mode == ModeArg::Bounds => {
            return Err(crate::usage("--verify needs --mode exact or auto"));
        }
        Some(pid) => Some(super::args::resolve_pids(&[pid])?[0]),
        None => None,
    };
    let probes = a.probe.open()?;
    let flavour = probes.report.flavour;
    let fallback = probes.report.fallback_reason.clone();
    let opts = SamplerOptions {
        mode: a.exact.mode.into(),
        exact_max: a.exact.exact_max,
        verify,
    };
    let mut sampler = Sampler::with_options(probes, watch.clone(), &opts).map_err(mode_error)?;
    let format = Format::resolve(a.format.map(Into::into));
    if format == Format::Table {
        eprintln!(
            "{}",
            banner(&a, sampler.is_exact(), flavour, fallback.as_deref())
        );
    } else if let Some(why) = fallback {
        eprintln!("immp: note: classic tracepoints in use: {why}");
    }
    let mut out = view::for_format(format, std::io::stdout().lock());
    let mut sweep: Vec<Snapshot> = Vec::new();
    let windows = a.curve.clone();
    let first = windows.as_ref().map_or(a.interval, |w| w[0]);
    run_loop(first, a.duration, &mut || {
        let snap = sampler.sample();
        // With a curve, one output per sweep: sample at the end of each window (each sample
        // re-arms, so each window is measured on its own) and attach the curve to the last.
        let snap = match &windows {
            None => snap,
            Some(w) => {
                sweep.push(snap);
                if sweep.len() < w.len() {
                    return Ok(Next::After(w[sweep.len()]));
                }
                with_curve(std::mem::take(&mut sweep))
            }
        };
        match out.render(&event(&a, &snap)) {
            Err(e) if is_broken_pipe(&e) => return Ok(Next::Stop), // e.g. `| head`
            r => r.context("writing output")?,
        }
        // Every watched process is gone: nothing left to watch.
        let all_gone = !watch.is_empty()
            && snap
                .processes
                .iter()
                .filter(|p| watch.contains(&p.id()))
                .all(|p| p.gone);
        Ok(if all_gone {
            Next::Stop
        } else {
            Next::After(first)
        })
    })?;
    Ok(crate::exit::OK)
}

pub(crate) fn mode_error(e: ModeError) -> anyhow::Error {
    crate::environment(e.to_string())
}

/// One sample event: the ranking, and with a bandwidth the prediction and each writer's part.
fn event(a: &ProfileArgs, snap: &Snapshot) -> Event {
    let settings = RankSettings {
        bandwidth: a.link.bandwidth,
        immp_share: a.link.immp_share,
    };
    let mut ranking = rank(snap, &settings);
    let top = a.top as usize;
    let assessment = a
        .link
        .link_at(snap.memory.as_ref())
        .map(|l| assess(snap, &l, None, top));
    if let Some(asmt) = &assessment {
        for r in &mut ranking.processes {
            r.impact = asmt.impacts.get(&r.proc_.id()).copied();
        }
    }
    let prediction = assessment.map(|x| x.prediction);
    Event::Sample(Box::new(Sample::new(
        snap,
        ranking,
        a.link.bandwidth,
        prediction,
        top,
    )))
}

fn banner(a: &ProfileArgs, exact: bool, flavour: Flavour, fallback: Option<&str>) -> String {
    let mode = if exact {
        "exact: soft-dirty windows"
    } else {
        "lower bounds: no soft-dirty"
    };
    let probes = match fallback {
        None => format!("{flavour} probes"),
        Some(why) => format!("tracepoint probes, because BTF failed: {}", clean(why)),
    };
    let every = a.curve.as_ref().map_or_else(
        || units::fmt_duration(a.interval),
        |w| format!("curve sweep of {} windows", w.len()),
    );
    let dur = a
        .duration
        .map(|d| format!(" for {}", units::fmt_duration(d)))
        .unwrap_or_default();
    format!("immp: profiling ({mode}, {probes}) every {every}{dur}; Ctrl-C to stop")
}
