//! Benchmarks: each prints ratios measured side by side in the same run (this machine is
//! noisy; absolute times from another run mean little).
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Subcommand;

use crate::release_bin;

#[derive(Subcommand, Clone)]
pub enum Which {
    /// Cost of the probes per page fault: fault storm with and without immp, interleaved
    Overhead {
        #[arg(long, default_value_t = 12)]
        rounds: usize,
    },
    /// The agent's own cost at 1 Hz with ~500 live processes: CPU % of one core and RSS
    Agent {
        #[arg(long, default_value_t = 500)]
        procs: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Measure `immp top` (the TUI, at 1 Hz in a tmux pseudo-terminal) instead of
        /// `immp profile`
        #[arg(long)]
        top: bool,
    },
    /// Exact mode's cost, in the QEMU guest (soft-dirty): re-arm time per GiB of RSS, writer
    /// slowdown under 1 s windows
    Exact,
    /// The migration lab: live-migrate a QEMU TCG guest (512 MiB, 1 vCPU, 100 Mbit/s over
    /// loopback) idle, with a light and a heavy writer (calibrated in the run), each under
    /// every policy (none, cpulimit 20 %, fixed cgroup caps, immp --auto with the default
    /// floor and 5 %, QEMU auto-converge), a service beside them; table, CSV/JSON and plots
    /// in target/lab/ (docs/lab/ for full runs). Full: 3 repeats, about an hour; --quick: one
    /// repeat of the main policies, about 10 minutes
    Migrate {
        /// One repeat of the main policies (CI)
        #[arg(long)]
        quick: bool,
        /// Repeats per configuration (default: 3, or 1 with --quick)
        #[arg(long)]
        repeats: Option<usize>,
        /// Only these configurations (e.g. light/auto,light/cpulimit20) or workloads (light);
        /// the idle ones always run
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Give up (migrate_cancel) on idle and light-writer migrations after this many seconds
        #[arg(long, default_value_t = 120)]
        light_limit: u64,
        /// ... and on heavy-writer migrations (default 90, or 60 with --quick)
        #[arg(long)]
        heavy_limit: Option<u64>,
        /// Copy the table and plots into docs/lab/ (default: yes for full runs, no for --quick)
        #[arg(long)]
        publish: Option<bool>,
        /// Skip calibration: the writers' compute per page, LIGHT,HEAVY
        #[arg(long, value_delimiter = ',')]
        work: Option<Vec<u64>>,
    },
    /// `immp serve` under concurrent scrapers on 127.0.0.1 (paced, then flat out): scrapes,
    /// latency, the agent's CPU % of one core and RSS at the start and end (goal < 5 %, no growth)
    Serve {
        #[arg(long, default_value_t = 50)]
        scrapers: usize,
        /// Length of each phase
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Idle processes beside the agent (each touching a fresh page every second)
        #[arg(long, default_value_t = 200)]
        procs: usize,
        /// Paced phase: each scraper scrapes once per this many milliseconds
        #[arg(long, default_value_t = 1000)]
        every_ms: u64,
    },
    /// CPU caps of 10/20/50 %: share and jitter per 100 ms, immp's cgroup cap vs SIGSTOP/SIGCONT
    Cap {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

pub fn run(w: Which) -> anyhow::Result<()> {
    match w {
        Which::Overhead { rounds } => overhead(rounds),
        Which::Agent {
            procs,
            seconds,
            top: true,
        } => agent_top(procs, seconds),
        Which::Agent { procs, seconds, .. } => agent(procs, seconds),
        Which::Cap { seconds } => cap(seconds),
        Which::Serve {
            scrapers,
            seconds,
            procs,
            every_ms,
        } => crate::bench_serve::run(crate::bench_serve::Opts {
            scrapers,
            seconds,
            procs,
            every: Duration::from_millis(every_ms.max(1)),
        }),
        Which::Exact => exact(),
        Which::Migrate {
            quick,
            repeats,
            only,
            light_limit,
            heavy_limit,
            publish,
            work,
        } => crate::lab::main(crate::lab::Opts {
            quick,
            repeats,
            only,
            light_limit,
            heavy_limit: heavy_limit.unwrap_or(if quick { 60 } else { 90 }),
            publish,
            work: work.and_then(|w| Some((*w.first()?, *w.get(1)?))),
        }),
    }
}

fn workload(args: &[&str]) -> anyhow::Result<f64> {
    let o = Command::new(release_bin("immp-workload"))
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !o.status.success() {
        bail!("workload {args:?} failed");
    }
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .context("workload output")
}

/// `immp profile` in the background, returned once its probes are attached (first interval).
fn start_agent(interval: &str) -> anyhow::Result<Child> {
    let mut c = Command::new(release_bin("immp"))
        .args([
            "profile",
            "--interval",
            interval,
            "--format",
            "json",
            "--top",
            "5",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut out = BufReader::new(c.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first)?;
    if first.is_empty() {
        bail!("immp profile ended before its first interval");
    }
    // Keep draining so the agent never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while out.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    Ok(c)
}

fn stop(mut c: Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let _ = c.wait();
}

/// A forever-running `immp-workload MODE`, returned once it said `ready`.
pub(crate) fn spawn_ready(mode: &str) -> anyhow::Result<Child> {
    let mut c = Command::new(release_bin("immp-workload"))
        .arg(mode)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()?;
    let mut l = String::new();
    BufReader::new(c.stdout.as_mut().expect("stdout")).read_line(&mut l)?;
    Ok(c)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

/// Interleaved A/B rounds, order alternating, medians: `f(with_agent)` returns one figure.
fn ab(
    rounds: usize,
    mut f: impl FnMut(bool) -> anyhow::Result<f64>,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        for with in if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            let v = f(with)?;
            if with { on.push(v) } else { off.push(v) }
        }
        eprint!("\rround {}/{rounds}", r + 1);
    }
    eprintln!();
    Ok((off, on))
}

fn measured(with: bool, args: &[&str]) -> anyhow::Result<f64> {
    let agent = if with { Some(start_agent("1s")?) } else { None };
    let v = workload(args);
    if let Some(a) = agent {
        stop(a);
    }
    v
}

fn overhead(rounds: usize) -> anyhow::Result<()> {
    println!(
        "bench overhead: first-touch fault storm (16384 pages x 20 per run), {rounds} interleaved rounds, agent at 1 Hz"
    );
    let (mut off, mut on) = ab(rounds, |with| {
        measured(with, &["fault-bench", "16384", "20"])
    })?;
    let (lo0, hi0) = spread(&off);
    let (lo1, hi1) = spread(&on);
    let (m0, m1) = (median(&mut off), median(&mut on));
    println!("  without immp: median {m0:.1} ns/fault (range {lo0:.1}-{hi0:.1})");
    println!("  with immp:    median {m1:.1} ns/fault (range {lo1:.1}-{hi1:.1})");
    println!("  added per fault: {:.1} ns", m1 - m0);
    println!("  ratio: {:.3} (goal <= 1.01)", m1 / m0);
    println!(
        "  noise: spread of the baseline alone is {:.1} % of its median",
        (hi0 - lo0) / m0 * 100.0
    );

    println!("bench overhead: realistic job (fill 64 MiB with a PRNG and sort it, x3 per run)");
    let (mut off, mut on) = ab(rounds, |with| measured(with, &["mixed", "64", "3"]))?;
    let (m0, m1) = (median(&mut off), median(&mut on));
    println!("  without immp: median {m0:.0} ms; with immp: median {m1:.0} ms");
    println!("  ratio: {:.3} (goal < 1.005)", m1 / m0);
    syscalls(rounds)
}

/// The syscall-exit hook (shmem class) runs on every system call: its cost per call, for a
/// call it ignores, a write it resolves and drops, and a write it counts.
fn syscalls(rounds: usize) -> anyhow::Result<()> {
    println!("bench overhead: system calls (2 M each per run), {rounds} interleaved rounds");
    let kinds = [
        "getppid (ignored)",
        "write 1 B to /dev/null (resolved, not shmem)",
        "pwrite 4 KiB into a memfd (counted)",
    ];
    let mut figures = [
        (Vec::new(), Vec::new()),
        (Vec::new(), Vec::new()),
        (Vec::new(), Vec::new()),
    ];
    ab(rounds, |with| {
        let agent = if with { Some(start_agent("1s")?) } else { None };
        let o = Command::new(release_bin("immp-workload"))
            .args(["syscall-bench", "2000000"])
            .stdin(Stdio::null())
            .output();
        if let Some(a) = agent {
            stop(a);
        }
        let out = String::from_utf8_lossy(&o?.stdout).to_string();
        let v: Vec<f64> = out
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        anyhow::ensure!(v.len() == 3, "syscall-bench printed {out:?}");
        for (f, x) in figures.iter_mut().zip(v) {
            if with { f.1.push(x) } else { f.0.push(x) }
        }
        Ok(0.0)
    })?;
    for (kind, (off, on)) in kinds.iter().zip(figures.iter_mut()) {
        let (m0, m1) = (median(off), median(on));
        println!(
            "  {kind}: {m0:.0} -> {m1:.0} ns/call (+{:.0} ns, ratio {:.2})",
            m1 - m0,
            m1 / m0
        );
    }
    Ok(())
}

fn proc_cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &s[s.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn proc_status_kb(pid: u32, key: &str) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>())
        })
        .context("status key")?
        .context("status value")
}

/// `immp top`'s footprint: the TUI in a real pseudo-terminal (tmux) with `procs` idle
/// processes, CPU % of one core and RSS (steady and peak); goal < 2 % and < 40 MB.
fn agent_top(procs: usize, seconds: u64) -> anyhow::Result<()> {
    crate::setup::ensure()?;
    crate::run(
        std::process::Command::new("sh")
            .arg(crate::root().join("immp-user/examples/top_footprint.sh"))
            .arg(procs.to_string())
            .arg(seconds.to_string())
            .current_dir(crate::root()),
    )
}

fn agent(procs: usize, seconds: u64) -> anyhow::Result<()> {
    println!(
        "bench agent: {procs} live processes (each touching a fresh page every second), agent at 1 Hz for {seconds} s"
    );
    let mut kids = Vec::with_capacity(procs);
    for _ in 0..procs {
        kids.push(spawn_ready("idle")?);
    }
    let agent = start_agent("1s")?;
    let pid = agent.id();
    // Start measuring after the first interval (load and attach are one-off costs).
    let t0 = Instant::now();
    let c0 = proc_cpu_ticks(pid)?;
    std::thread::sleep(Duration::from_secs(seconds));
    let c1 = proc_cpu_ticks(pid)?;
    let el = t0.elapsed().as_secs_f64();
    let rss = proc_status_kb(pid, "VmRSS:")?;
    let hwm = proc_status_kb(pid, "VmHWM:")?;
    // SAFETY: sysconf has no preconditions.
    let tps = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (c1 - c0) as f64 / tps / el * 100.0;
    stop(agent);
    for mut k in kids {
        let _ = k.kill();
        let _ = k.wait();
    }
    println!("  agent CPU: {cpu:.2} % of one core (goal < 1 %)");
    println!(
        "  agent RSS: {:.1} MB steady (goal < 30 MB); peak {:.1} MB, reached while parsing kernel BTF at start",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "  ratio: {:.3} of the CPU goal, {:.3} of the RSS goal",
        cpu / 1.0,
        rss as f64 / 1024.0 / 30.0
    );
    Ok(())
}

fn schedstat_ns(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Share of one CPU in each 100 ms slice over `seconds`: (mean %, stdev in points).
fn shares(pid: u32, seconds: u64) -> (f64, f64) {
    let mut v = Vec::new();
    let mut last = (Instant::now(), schedstat_ns(pid));
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
        let now = (Instant::now(), schedstat_ns(pid));
        v.push((now.1 - last.1) as f64 / now.0.duration_since(last.0).as_nanos() as f64 * 100.0);
        last = now;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
    (mean, var.sqrt())
}

fn capped_run(method: &str, target: f64, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let mut w = spawn_ready("burn")?;
    let pid = w.id().to_string();
    let jdir = std::env::temp_dir().join(format!("immp-bench-cap-{}", std::process::id()));
    let cap = format!("{target}%");
    let mut c = match method {
        "cpulimit" => Command::new("cpulimit")
            .args(["-p", &pid, "-l", &format!("{target:.0}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
        m => Command::new(release_bin("immp"))
            .args([
                "throttle",
                "--pid",
                &pid,
                "--cap",
                &cap,
                "--mechanism",
                m,
                "--format",
                "json",
            ])
            .env("IMMP_JOURNAL_DIR", &jdir)
            .stdout(Stdio::null())
            .spawn()?,
    };
    std::thread::sleep(Duration::from_millis(1500));
    let r = shares(w.id(), seconds);
    // SAFETY: kill(2) on our own children.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let _ = c.wait();
    let _ = w.kill();
    let _ = w.wait();
    Ok(r)
}

fn cap(seconds: u64) -> anyhow::Result<()> {
    let has_cpulimit = Command::new("cpulimit").arg("--help").output().is_ok();
    let mut methods = vec![("immp cgroup", "auto"), ("immp signal", "signal")];
    if has_cpulimit {
        methods.push(("cpulimit", "cpulimit"));
    }
    println!(
        "bench cap: a CPU-bound child capped at 10/20/50 % of one CPU, share per 100 ms over {seconds} s (schedstat)"
    );
    println!(
        "  {:<12} {:>7} {:>9} {:>8} {:>12}",
        "method", "target", "measured", "error", "jitter(sd)"
    );
    let mut results: Vec<(&str, f64, f64, f64)> = Vec::new();
    for target in [10.0, 20.0, 50.0] {
        for (name, m) in &methods {
            let (mean, sd) = capped_run(m, target, seconds)?;
            println!(
                "  {name:<12} {target:>6.0}% {mean:>8.1}% {:>+7.1} {sd:>11.1}",
                mean - target
            );
            results.push((name, target, mean, sd));
        }
    }
    let by = |n: &str, t: f64| results.iter().find(|r| r.0 == n && r.1 == t).copied();
    for target in [10.0, 20.0, 50.0] {
        let Some(c) = by("immp cgroup", target) else {
            continue;
        };
        let within = (c.2 - target).abs() <= 1.0;
        let base = by("cpulimit", target)
            .or(by("immp signal", target))
            .expect("a signal method");
        println!(
            "  {target:.0}%: immp error {:+.1} points ({}), jitter ratio immp/{}: {:.2}",
            c.2 - target,
            if within {
                "within 1 point"
            } else {
                "MISSES 1 point"
            },
            base.0,
            c.3 / base.3.max(1e-9)
        );
    }
    Ok(())
}

fn exact() -> anyhow::Result<()> {
    let out = crate::vm::run_guest(&["bench-exact".to_string()])?;
    println!(
        "bench exact (Debian 6.1 guest under QEMU TCG: absolute times are TCG's, ratios are the point)"
    );
    for l in out.lines().filter_map(|l| l.strip_prefix("IMMP-BENCH ")) {
        println!("  {l}");
    }
    Ok(())
}
