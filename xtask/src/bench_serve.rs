//! `cargo xtask bench serve`: `immp serve`'s own cost under scrapers. The release agent at
//! 1 Hz on 127.0.0.1 beside `procs` idle processes (so /metrics lists a full top and `other`),
//! then N concurrent scrapers on keep-alive connections for a bounded time, in two phases:
//! paced (each scraper once per `every`, the realistic case the goal is about) and flat out
//! (as fast as the agent answers: its capacity, no goal). Prints a table: scrapes, errors,
//! latency, the agent's CPU % of one core and its RSS at the start and the end of each phase;
//! a first phase without scrapers gives the sampling's own cost.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::release_bin;

#[derive(Clone, Copy)]
pub struct Opts {
    pub scrapers: usize,
    pub seconds: u64,
    pub procs: usize,
    pub every: Duration,
}

/// One phase's figures.
struct Row {
    phase: String,
    scrapes: u64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_pct: f64,
    rss_start_mb: f64,
    rss_end_mb: f64,
}

pub fn run(o: Opts) -> anyhow::Result<()> {
    println!(
        "bench serve: immp serve at 1 Hz beside {} idle processes, {} concurrent scrapers on \
         127.0.0.1 for {} s per phase",
        o.procs, o.scrapers, o.seconds
    );
    let mut kids = Vec::with_capacity(o.procs);
    for _ in 0..o.procs {
        kids.push(super::bench::spawn_ready("idle")?);
    }
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let agent = start(port)?;
    let res = phases(&o, port, agent.id());
    stop(agent);
    for mut k in kids {
        let _ = k.kill();
        let _ = k.wait();
    }
    let rows = res?;
    table(&rows);
    let paced = &rows[1];
    println!(
        "  goal (paced): CPU < 5 % of a core: {:.2} % ({}); no RSS growth: {:.1} -> {:.1} MB ({})",
        paced.cpu_pct,
        if paced.cpu_pct < 5.0 { "met" } else { "missed" },
        paced.rss_start_mb,
        paced.rss_end_mb,
        if paced.rss_end_mb <= paced.rss_start_mb * 1.05 + 0.5 {
            "met"
        } else {
            "missed"
        }
    );
    Ok(())
}

fn phases(o: &Opts, port: u16, pid: u32) -> anyhow::Result<Vec<Row>> {
    // A few intervals first: the start-up (BTF parsing, first samples) is not the steady cost.
    std::thread::sleep(Duration::from_secs(3));
    let every = o.every.as_secs_f64();
    // The agent alone (sampling at 1 Hz), to tell the scrapes' cost from the sampling's.
    let idle = Opts { scrapers: 0, ..*o };
    let alone = phase(&idle, port, pid, None, "no scrapers".to_string())?;
    let name = format!("paced, 1 per {every}s each");
    let paced = phase(o, port, pid, Some(o.every), name)?;
    let flat = phase(o, port, pid, None, "flat out".to_string())?;
    Ok(vec![alone, paced, flat])
}

fn phase(
    o: &Opts,
    port: u16,
    pid: u32,
    every: Option<Duration>,
    name: String,
) -> anyhow::Result<Row> {
    let rss_start = rss_mb(pid)?;
    let c0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..o.scrapers)
        .map(|i| {
            let stop = stop.clone();
            // Spread the paced scrapers over the period instead of all at once.
            let offset = every.map(|e| e.mul_f64(i as f64 / o.scrapers as f64));
            std::thread::spawn(move || scraper(port, every, offset, &stop))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(o.seconds));
    stop.store(true, Ordering::SeqCst);
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in threads {
        let (l, e) = t.join().map_err(|_| anyhow::anyhow!("scraper panicked"))?;
        lat.extend(l);
        errors += e;
    }
    let el = t0.elapsed().as_secs_f64();
    let c1 = cpu_ticks(pid)?;
    // SAFETY: sysconf has no preconditions.
    let tps = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| lat.get(((lat.len() as f64 - 1.0) * q) as usize).copied();
    Ok(Row {
        phase: name,
        scrapes: lat.len() as u64,
        errors,
        p50_ms: pct(0.5).unwrap_or(f64::NAN),
        p99_ms: pct(0.99).unwrap_or(f64::NAN),
        cpu_pct: (c1 - c0) as f64 / tps / el * 100.0,
        rss_start_mb: rss_start,
        rss_end_mb: rss_mb(pid)?,
    })
}

/// Scrapes until told to stop (paced or flat out) on one keep-alive connection, reconnecting
/// after an error; the latencies in ms and the errors.
fn scraper(
    port: u16,
    every: Option<Duration>,
    offset: Option<Duration>,
    stop: &AtomicBool,
) -> (Vec<f64>, u64) {
    let (mut lat, mut errors) = (Vec::new(), 0);
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut next = Instant::now() + offset.unwrap_or_default();
    while !stop.load(Ordering::Relaxed) {
        if let Some(e) = every {
            let now = Instant::now();
            if now < next {
                std::thread::sleep((next - now).min(Duration::from_millis(100)));
                continue;
            }
            next += e;
        }
        let t = Instant::now();
        match scrape(&mut conn, port) {
            Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
            Err(_) => {
                errors += 1;
                conn = None;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    (lat, errors)
}

/// One GET /metrics on the connection (opened if needed); the body is read and checked.
fn scrape(conn: &mut Option<BufReader<TcpStream>>, port: u16) -> anyhow::Result<()> {
    if conn.is_none() {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        *conn = Some(BufReader::new(s));
    }
    let r = conn.as_mut().expect("connected");
    r.get_mut()
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut len = None;
    let mut status = String::new();
    r.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        bail!("status {status:?}");
    }
    loop {
        let mut l = String::new();
        r.read_line(&mut l)?;
        if l == "\r\n" || l.is_empty() {
            break;
        }
        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
            len = Some(v.trim().parse::<usize>()?);
        }
    }
    let mut body = vec![0; len.context("no content-length")?];
    r.read_exact(&mut body)?;
    if !body.ends_with(b"# EOF\n") {
        bail!("truncated exposition");
    }
    Ok(())
}

/// The release `immp serve`, returned once /healthz says it collects.
fn start(port: u16) -> anyhow::Result<Child> {
    let listen = format!("127.0.0.1:{port}");
    let mut c = Command::new(release_bin("immp"))
        .args(["serve", "--listen", &listen, "--bandwidth", "1Gbit"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let t = Instant::now();
    loop {
        if healthy(port) {
            return Ok(c);
        }
        if let Some(s) = c.try_wait()? {
            bail!("immp serve exited at start ({s})");
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = c.kill();
            bail!("immp serve not healthy after 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let req = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let mut out = String::new();
    s.write_all(req).is_ok()
        && s.read_to_string(&mut out).is_ok()
        && out.starts_with("HTTP/1.1 200")
        && out.contains("ok:")
}

fn stop(mut c: Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let _ = c.wait();
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &s[s.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

fn table(rows: &[Row]) {
    println!(
        "  | {:<24} | {:>8} | {:>6} | {:>8} | {:>8} | {:>11} | {:>12} | {:>10} |",
        "phase",
        "scrapes",
        "errors",
        "p50 ms",
        "p99 ms",
        "CPU % core",
        "RSS start MB",
        "RSS end MB"
    );
    println!(
        "  |{:-<26}|{:->10}|{:->8}|{:->10}|{:->10}|{:->13}|{:->14}|{:->12}|",
        "", "", "", "", "", "", "", ""
    );
    for r in rows {
        let ms = |v: f64| {
            if v.is_nan() {
                "-".to_string()
            } else {
                format!("{v:.2}")
            }
        };
        println!(
            "  | {:<24} | {:>8} | {:>6} | {:>8} | {:>8} | {:>11.2} | {:>12.1} | {:>10.1} |",
            r.phase,
            r.scrapes,
            r.errors,
            ms(r.p50_ms),
            ms(r.p99_ms),
            r.cpu_pct,
            r.rss_start_mb,
            r.rss_end_mb
        );
    }
}
