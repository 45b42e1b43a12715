//! `immp serve`: the long-running agent. The same collect -> model path as `immp profile`
//! (one `Sampler`, one `Snapshot` per interval), kept by the metrics view and served as
//! OpenMetrics text at `/metrics`; `/healthz` says whether collection goes on. With `--auto`
//! it also runs the automatic cap policy exactly as `immp throttle --auto` (the shared
//! `autocap` loop, the same journal and claims), and lifts every cap on any exit.
//!
//! Two threads: this one samples, decides and renders the exposition once per interval; the
//! HTTP thread (hyper on a current-thread tokio runtime) only hands out the last rendering, so
//! a scrape costs a copy of a few kilobytes, however many scrapers there are.
use std::{
    net::{SocketAddr, TcpListener},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::Args;
use hyper::body::Bytes;
use immp_model::{
    Event, ProcId, Snapshot,
    event::Start,
    impact::assess,
    policy::{AutoSettings, idle_time},
};

use super::{
    args::{self, EventFormat, JournalArgs, LinkArgs, MechanismArg, ModeArg, ProbeArgs},
    autocap::{AutoCap, Host, newcomer_due, release_stale},
    restore::undo_event,
    run::{Next, Ticks, run_loop, stop_requested},
};
use crate::{
    act::throttle::Throttler,
    collect::sampler::{Sampler, SamplerOptions},
    view::{
        self, Format, View,
        metrics::{MetricsSettings, MetricsView, RETAIN},
    },
};

mod http;

pub const HELP: &str = "Examples:\n  \
  immp serve --bandwidth 1Gbit\n  \
  immp serve --bandwidth 100Mbit --listen 0.0.0.0:9745 --top-processes 10\n  \
  immp serve --bandwidth 100Mbit --auto --floor 15%\n  \
  curl -s http://127.0.0.1:9745/metrics | grep immp_migration\n\n\
Serves OpenMetrics text at /metrics and a one-line health check at /healthz (200 while \
collecting). Loopback only unless --listen names another address (process names are \
visible to whoever can connect; command lines never are). The top --top-processes writers \
get series of their own, the rest add up in comm=\"other\". With --auto, caps are set as by \
`immp throttle --auto`, journaled, and lifted on SIGTERM, SIGINT, SIGHUP, any other stop \
signal and on panic; after a SIGKILL run `immp restore` (the systemd unit does, \
ExecStopPost). Events (caps, lifts, warnings) go to stdout: JSON lines unless a terminal.";

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address and port of the HTTP endpoint (loopback by default)
    #[arg(long, default_value = "127.0.0.1:9745", value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
    /// Sampling interval
    #[arg(long, default_value = "1s", value_parser = args::positive_duration)]
    pub interval: Duration,
    /// Processes with series of their own (the busiest by dirty rate; the rest is "other")
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub top_processes: u64,
    #[command(flatten)]
    pub link: LinkArgs,
    /// auto: exact where soft-dirty works; exact: refuse to run without it; bounds: faults only
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub mode: ModeArg,
    /// Re-arm at most this many of the busiest writers per window (exact mode)
    #[arg(long, default_value_t = 64)]
    pub exact_max: usize,
    /// Also run the automatic cap policy (as `immp throttle --auto`)
    #[arg(long, requires = "bandwidth")]
    pub auto: bool,
    #[command(flatten)]
    pub policy: args::PolicyArgs,
    /// Stop after this long (a deadline; default: until a stop signal)
    #[arg(long, value_parser = args::positive_duration)]
    pub duration: Option<Duration>,
    /// Format of the events on stdout (default: table on a terminal, json otherwise)
    #[arg(long, value_enum)]
    pub format: Option<EventFormat>,
    #[command(flatten)]
    pub journal: JournalArgs,
    /// How to cap (--auto)
    #[arg(long, value_enum, default_value_t = MechanismArg::Auto)]
    pub mechanism: MechanismArg,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

/// What the sampling thread publishes and the HTTP thread reads.
#[derive(Debug)]
pub struct Published {
    /// The last exposition, ready to send.
    pub metrics: Mutex<Bytes>,
    /// When the last sample was taken (ms since the Unix epoch; 0: none yet).
    pub last_sample_ms: AtomicU64,
    pub samples: AtomicU64,
    /// A sample older than this means collection has stalled.
    pub stale_after: Duration,
    /// Set by the HTTP thread if it ends by itself: the agent then stops (exit 1), rather than
    /// collect for no one.
    pub http_failed: std::sync::atomic::AtomicBool,
}

impl Published {
    /// The exposition before any sample (healthz still says "starting").
    fn set_initial(&self, text: String) {
        *self.metrics.lock().unwrap_or_else(PoisonError::into_inner) = Bytes::from(text);
    }

    fn set(&self, text: String) {
        *self.metrics.lock().unwrap_or_else(PoisonError::into_inner) = Bytes::from(text);
        self.last_sample_ms.store(now_ms(), Ordering::SeqCst);
        self.samples.fetch_add(1, Ordering::SeqCst);
    }
}

pub fn run(a: ServeArgs) -> anyhow::Result<i32> {
    crate::require_root()?;
    // The port first: a bad address or a port in use is bad input, and nothing has changed.
    let listener = TcpListener::bind(a.listen)
        .map_err(|e| crate::usage(format!("cannot listen on {}: {e}", a.listen)))?;
    if !a.listen.ip().is_loopback() {
        eprintln!(
            "immp serve: note: listening on {} (not loopback): whoever reaches it sees process \
             names (never command lines)",
            a.listen
        );
    }
    let probes = a.probe.open()?;
    let watch: Vec<ProcId> = Vec::new();
    let opts = SamplerOptions {
        mode: a.mode.into(),
        exact_max: a.exact_max,
        verify: None,
    };
    let sampler =
        Sampler::with_options(probes, watch, &opts).map_err(super::profile::mode_error)?;
    let mut out = view::for_format(Format::resolve(a.format.map(Into::into)), std::io::stdout());
    let thr = open_actuator(&a, &mut out)?;
    let published = Arc::new(Published {
        metrics: Mutex::new(Bytes::new()),
        last_sample_ms: AtomicU64::new(0),
        samples: AtomicU64::new(0),
        stale_after: a.interval * 3 + Duration::from_secs(2),
        http_failed: std::sync::atomic::AtomicBool::new(false),
    });
    let mut agent = Agent::new(&a, sampler, thr, out, published.clone());
    agent.start(); // an exposition is ready before the first request
    let server = http::Server::start(listener, published)?;
    let res = if stop_requested().is_some() {
        Ok(()) // a stop signal during start-up: straight to the end
    } else {
        run_loop(a.interval, a.duration, &mut agent)
    };
    sd_notify("STOPPING=1");
    let failed = agent.finish();
    server.stop();
    res?;
    if failed {
        anyhow::bail!("some caps could not be lifted: run `immp restore`");
    }
    Ok(crate::exit::OK)
}

/// The actuator for --auto, with leftovers of a killed immp put back first.
fn open_actuator(a: &ServeArgs, out: &mut Box<dyn View + '_>) -> anyhow::Result<Option<Throttler>> {
    if !a.auto {
        return Ok(None);
    }
    let (thr, leftovers) = Throttler::open(&a.journal.journal_dir, a.mechanism.into())?;
    for (p, r) in leftovers {
        let _ = out.render(&undo_event(&p, r, Event::RestoredLeftover));
    }
    Ok(Some(thr))
}

/// The sampling side: sampler, policy, actuator, metrics.
struct Agent<'a> {
    a: &'a ServeArgs,
    sampler: Sampler,
    thr: Option<Throttler>,
    auto: AutoCap,
    settings: Option<AutoSettings>,
    out: Box<dyn View + 'a>,
    metrics: MetricsView,
    published: Arc<Published>,
}

impl Ticks for Agent<'_> {
    fn tick(&mut self, early: bool) -> anyhow::Result<Next> {
        self.interval(early)
    }

    fn sooner(&mut self) -> bool {
        match (&self.thr, &self.settings) {
            (Some(_), Some(s)) => newcomer_due(&mut self.sampler, s),
            _ => false,
        }
    }
}

impl<'a> Agent<'a> {
    fn new(
        a: &'a ServeArgs,
        sampler: Sampler,
        thr: Option<Throttler>,
        out: Box<dyn View + 'a>,
        published: Arc<Published>,
    ) -> Self {
        let metrics = MetricsView::new(MetricsSettings {
            top: a.top_processes as usize,
            retain: RETAIN,
            self_pid: std::process::id(),
            bandwidth: a.link.bandwidth,
            auto: a.auto,
        });
        let settings = auto_settings(a, None);
        Self {
            a,
            sampler,
            thr,
            auto: AutoCap::default(),
            settings,
            out,
            metrics,
            published,
        }
    }

    /// Says what this run uses; publishes an exposition before the first sample.
    fn start(&mut self) {
        if let Some(thr) = &self.thr {
            let journal = self.a.journal.journal_dir.join("journal");
            let start = Start {
                mechanism: thr.mechanism(),
                journal: journal.display().to_string(),
                auto: true,
                cap_pct: None,
                target_s: self.settings.map(|s| s.target.as_secs_f64()),
                idle_s: self.settings.map(|s| idle_time(&s.link)),
                knee: self.settings.and_then(|s| s.knee),
            };
            let _ = self.out.render(&Event::Start(start));
        }
        eprintln!(
            "immp serve: metrics at http://{}/metrics, health at /healthz, every {}{}",
            self.a.listen,
            immp_model::units::fmt_duration(self.a.interval),
            if self.a.auto {
                "; automatic caps on"
            } else {
                ""
            }
        );
        let text = self.metrics.render();
        self.published.set_initial(text);
    }

    fn interval(&mut self, early: bool) -> anyhow::Result<Next> {
        super::run::test_panic_hook();
        if self.published.http_failed.load(Ordering::SeqCst) {
            anyhow::bail!("the HTTP server stopped (see above)");
        }
        let snap = Snapshot {
            early,
            ..self.sampler.sample()
        };
        let failed = self.auto_step(&snap);
        if let Some(thr) = &self.thr {
            self.metrics.set_caps(&thr.active());
        }
        let measured = self
            .a
            .link
            .link_at(snap.memory.as_ref())
            .map(|l| assess(&snap, &l, None, 0).prediction);
        self.metrics.on_snapshot(&snap, measured);
        self.published.set(self.metrics.render());
        if self.published.samples.load(Ordering::SeqCst) == 1 {
            sd_notify("READY=1\nSTATUS=collecting");
        }
        failed?;
        Ok(Next::After(self.a.interval))
    }

    /// Released caps of processes gone, then the policy; a cap that could not be lifted is the
    /// error (after the metrics are published: the run then ends and lifts everything).
    fn auto_step(&mut self, snap: &Snapshot) -> anyhow::Result<()> {
        // Built again each interval: round 0 (and the default goal) follow the guest's memory.
        let s = self
            .settings
            .and_then(|_| auto_settings(self.a, snap.memory.as_ref()));
        let (Some(thr), Some(s)) = (self.thr.as_mut(), s) else {
            return Ok(());
        };
        let mut host = ServeHost {
            out: &mut self.out,
            metrics: &mut self.metrics,
            sampler: &mut self.sampler,
        };
        release_stale(thr, &mut host);
        self.auto.step(thr, snap, &s, &mut host).map(|_| ())
    }

    /// Lifts every cap and says how each went; true if any could not be lifted.
    fn finish(&mut self) -> bool {
        let Some(thr) = self.thr.as_mut() else {
            return false;
        };
        let mut failed = false;
        for (p, r) in thr.lift_all() {
            failed |= r.is_err();
            let _ = self.out.render(&undo_event(&p, r, Event::Lifted));
        }
        failed
    }
}

/// What `serve --auto` lends the policy loop: the event output, the metrics, the sampler.
struct ServeHost<'a, 'v> {
    out: &'a mut Box<dyn View + 'v>,
    metrics: &'a mut MetricsView,
    sampler: &'a mut Sampler,
}

impl Host for ServeHost<'_, '_> {
    fn emit(&mut self, e: Event) {
        self.metrics.on_event(&e);
        // The prediction is a metric every interval, not a line in the log.
        if !matches!(e, Event::Prediction(_)) {
            // The log is for the operator; a closed stdout must not stop the caps' undoing.
            let _ = self.out.render(&e);
        }
    }

    fn watch(&mut self, id: ProcId) {
        self.sampler.watch(id);
    }

    fn unwatch(&mut self, id: ProcId) {
        self.sampler.unwatch(id);
    }
}

/// Tells systemd (`Type=notify`) how the service is: READY=1 once collecting, STOPPING=1 on
/// the way out. Nothing without NOTIFY_SOCKET; a failure to tell is not immp's to fail on.
fn sd_notify(state: &str) {
    use std::os::{linux::net::SocketAddrExt as _, unix::ffi::OsStrExt as _};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let msg = state.as_bytes();
    let _ = match path.as_bytes().strip_prefix(b"@") {
        // An abstract socket (systemd's usual choice).
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(msg, &a)),
        None => sock.send_to(msg, &path),
    };
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The one-line health answer: (healthy, text).
pub fn health(p: &Published, now: u64, started: Instant) -> (bool, String) {
    let last = p.last_sample_ms.load(Ordering::SeqCst);
    let n = p.samples.load(Ordering::SeqCst);
    if last == 0 {
        let up = started.elapsed().as_secs_f64();
        let ok = up < p.stale_after.as_secs_f64();
        let word = if ok { "starting" } else { "stalled" };
        return (
            ok,
            format!("{word}: no sample yet ({up:.1}s since start)\n"),
        );
    }
    let age = now.saturating_sub(last) as f64 / 1000.0;
    if age > p.stale_after.as_secs_f64() {
        return (false, format!("stalled: last sample {age:.1}s ago\n"));
    }
    (
        true,
        format!("ok: collecting, {n} samples, last {age:.1}s ago\n"),
    )
}

fn auto_settings(a: &ServeArgs, at: Option<&immp_model::snapshot::Memory>) -> Option<AutoSettings> {
    a.policy.settings(&a.link, at).filter(|_| a.auto)
}
