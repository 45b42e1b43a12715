//! `immp serve`, the real binary as root on a free loopback port next to real writers: scraped
//! over real HTTP, parsed by an OpenMetrics parser. Its own test binary: `--auto` must not see
//! the writers of other tests, and it is confined to its own workload (IMMP_TEST_AUTO_ONLY).
mod common;

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use common::{WORKLOAD, Workload, cpu_cgroup, immp_bin, wait_until};
use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue};

/// The tests here start writers that `--auto` would see: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind :0");
    l.local_addr().unwrap().port()
}

/// A running `immp serve`, its output collected; SIGTERM (caps lifted) if a test fails.
struct Serve {
    child: Child,
    port: u16,
    out: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    err: Arc<Mutex<String>>,
}

fn collect(r: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            let mut s = into.lock().unwrap();
            s.push_str(&l);
            s.push('\n');
        }
    })
}

impl Serve {
    fn start(args: &[&str], env: &[(&str, String)]) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut c = Command::new(immp_bin());
        c.args(["serve", "--listen", &listen]).args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn immp serve");
        let (out, err) = (Arc::default(), Arc::default());
        let readers = vec![
            collect(child.stdout.take().unwrap(), Arc::clone(&out)),
            collect(child.stderr.take().unwrap(), Arc::clone(&err)),
        ];
        let s = Self {
            child,
            port,
            out,
            readers,
            err,
        };
        s.wait_healthy();
        s
    }

    /// Until /healthz says it collects (probes loaded, a sample taken).
    fn wait_healthy(&self) {
        let t = Instant::now();
        loop {
            if let Ok((200, _, body)) = get(self.port, "/healthz")
                && body.starts_with("ok:")
            {
                return;
            }
            let err = self.err.lock().unwrap().clone();
            assert!(t.elapsed() < Duration::from_secs(90), "not healthy: {err}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory preconditions; the child is ours and not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Sends `sig`, waits for the exit; (exit code, stdout, stderr).
    fn stop(mut self, sig: i32) -> (Option<i32>, String, String) {
        self.signal(sig);
        let t = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no exit after signal"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let out = self.out.lock().unwrap().clone();
        let err = self.err.lock().unwrap().clone();
        (status.code(), out, err)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGTERM);
            let t = Instant::now();
            while self.child.try_wait().ok().flatten().is_none() {
                if t.elapsed() > Duration::from_secs(20) {
                    let _ = self.child.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// One HTTP/1.1 GET over a fresh connection: (status, headers, body).
fn get(port: u16, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, head.to_lowercase(), body.to_string()))
}

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

/// Scrapes /metrics and checks it: the OpenMetrics content type, a parse by a real OpenMetrics
/// parser, `# EOF` last, every family named `immp_*` with a `# TYPE`, counters sampled as
/// `_total`.
fn scrape(port: u16) -> (Exposition, String) {
    let (status, head, body) = get(port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(body.ends_with("# EOF\n"), "no # EOF at the end");
    let mut typed = BTreeSet::new();
    for l in body.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap();
            assert!(name.starts_with("immp_"), "{name}");
            typed.insert((name.to_string(), ty.to_string()));
        } else if !l.starts_with('#') {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = typed
                .iter()
                .filter(|(n, _)| name.starts_with(n.as_str()))
                .max_by_key(|(n, _)| n.len())
                .unwrap_or_else(|| panic!("{name} sampled before its # TYPE"));
            if family.1 == "counter" {
                assert_eq!(name, format!("{}_total", family.0));
            }
        }
    }
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&body)
        .unwrap_or_else(|e| panic!("not OpenMetrics ({e:?}):\n{body}"));
    (parsed, body)
}

/// The value of `family`'s sample whose labels include `want`.
fn sample(e: &Exposition, family: &str, want: &[(&str, &str)]) -> Option<f64> {
    let f = e.families.get(family)?;
    f.iter_samples().find_map(|s| {
        let l = s.get_labelset().ok()?;
        let all = want.iter().all(|(k, v)| l.get_label_value(k) == Some(*v));
        all.then(|| match &s.value {
            OpenMetricsValue::Counter(c) => c.value.as_f64(),
            OpenMetricsValue::Gauge(g) => g.as_f64(),
            OpenMetricsValue::Unknown(u) => u.as_f64(),
            v => panic!("{family}: {v:?}"),
        })
    })
}

/// The (pid, comm) label sets over every `immp_process_*` family.
fn process_series(e: &Exposition) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (name, f) in &e.families {
        if !name.starts_with("immp_process_") {
            continue;
        }
        for s in f.iter_samples() {
            let l = s.get_labelset().unwrap();
            let pid = l.get_label_value("pid").unwrap_or("").to_string();
            out.insert((pid, l.get_label_value("comm").unwrap().to_string()));
        }
    }
    out
}

#[test]
fn serves_a_real_writer_over_http_and_stops_on_sigterm() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let w = Workload::start(&["rename", "srv-writer", "writer", "256"]);
    let pid = w.pid().to_string();
    let s = Serve::start(
        &[
            "--interval",
            "500ms",
            "--bandwidth",
            "100Mbit",
            "--top-processes",
            "5",
        ],
        &[],
    );
    let me = [("pid", pid.as_str()), ("comm", "srv-writer")];
    let family = "immp_process_dirty_unique_bytes";
    let mut first = None;
    wait_until("the writer listed", Duration::from_secs(20), || {
        first = sample(&scrape(s.port).0, family, &me);
        first.is_some_and(|v| v > 0.0)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let (e, body) = scrape(s.port);
    let later = sample(&e, family, &me).expect("still listed");
    assert!(
        later > first.unwrap(),
        "{later} after {first:?}: a growing counter"
    );
    let pages = [("pid", pid.as_str()), ("class", "write_new")];
    assert!(sample(&e, "immp_process_dirty_pages", &pages).unwrap() > 0.0);
    let series = process_series(&e);
    assert!(series.len() <= 6, "top 5 + other: {series:?}");
    assert!(series.contains(&(String::new(), "other".into())));
    // Command lines never leave immp (the workload's holds its binary's path).
    assert!(!body.contains(WORKLOAD), "a command line in the metrics");
    assert!(
        sample(
            &e,
            "immp_migration_predicted_rounds",
            &[("scenario", "measured")]
        )
        .is_some()
    );
    assert_eq!(sample(&e, "immp_auto_enabled", &[]), Some(0.0));
    let (code, _, health) = get(s.port, "/healthz").unwrap();
    assert_eq!(code, 200);
    assert_eq!(health.lines().count(), 1, "{health:?}");
    assert_eq!(get(s.port, "/nope").unwrap().0, 404);
    let (code, out, err) = s.stop(libc::SIGTERM);
    assert_eq!(code, Some(0), "SIGTERM: {err}");
    assert!(!err.contains("error"), "{err}");
    assert!(out.is_empty(), "no caps, no events: {out}");
}

#[test]
fn sigint_and_sighup_stop_it_cleanly_and_systemd_hears_of_it() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = common::scratch("serve");
    for sig in [libc::SIGINT, libc::SIGHUP] {
        // systemd's side of Type=notify: a datagram socket named by NOTIFY_SOCKET.
        let path = dir.join(format!("notify-{sig}"));
        let _ = std::fs::remove_file(&path);
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let env = [("NOTIFY_SOCKET", path.display().to_string())];
        let s = Serve::start(&["--interval", "200ms"], &env);
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("READY=1");
        assert!(buf[..n].starts_with(b"READY=1"), "{:?}", &buf[..n]);
        let (code, _, err) = s.stop(sig);
        assert_eq!(code, Some(0), "signal {sig}: {err}");
        let n = sock.recv(&mut buf).expect("STOPPING=1");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}

fn one_line_exit_2(args: &[&str], needle: &str) {
    let o = Command::new(immp_bin())
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run immp serve");
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e:?}");
    assert!(e.starts_with("immp: ") && e.contains(needle), "{e:?}");
    assert!(o.stdout.is_empty());
}

#[test]
fn a_bad_listen_address_or_a_port_in_use_is_bad_input_and_changes_nothing() {
    one_line_exit_2(&["--listen", "localhost:http"], "--listen");
    one_line_exit_2(&["--listen", "127.0.0.1:99999"], "--listen");
    one_line_exit_2(&["--top-processes", "0"], "--top-processes");
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    // With --auto too: the journal directory is not even created.
    let dir = common::scratch("serve").join("port-in-use");
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let auto = ["--auto", "--bandwidth", "100Mbit", "--journal-dir", d];
    one_line_exit_2(&[&["--listen", &addr][..], &auto].concat(), "cannot listen");
    assert!(!dir.exists(), "nothing changed");
}

#[test]
fn help_has_examples() {
    let o = Command::new(immp_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(t.contains("Examples:") && t.contains("--listen"), "{t}");
}

#[test]
fn auto_caps_its_confined_writer_shows_the_cap_and_lifts_it_on_sigterm() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The writer of auto_throttle.rs: far more than 12.5 MB/s uncapped, a 64 MiB ring.
    let w = Workload::start(&["ring", "16384", "30000"]);
    let before = cpu_cgroup(w.pid());
    let dir = common::scratch("serve").join("auto");
    let _ = std::fs::remove_dir_all(&dir);
    let s = Serve::start(
        &[
            "--auto",
            "--bandwidth",
            "100Mbit",
            "--ram",
            "512MB",
            "--floor",
            "15%",
            "--format",
            "json",
            "--journal-dir",
            dir.to_str().unwrap(),
        ],
        // Confined: on this shared machine the policy may touch this writer only.
        &[("IMMP_TEST_AUTO_ONLY", w.pid().to_string())],
    );
    wait_until("writer capped", Duration::from_secs(40), || {
        cpu_cgroup(w.pid()).contains("immp-")
    });
    let pid = w.pid().to_string();
    let mut cap = None;
    wait_until("cap in the metrics", Duration::from_secs(10), || {
        let (e, _) = scrape(s.port);
        cap = sample(&e, "immp_process_cap_ratio", &[("pid", pid.as_str())]);
        cap.is_some() && sample(&e, "immp_caps_in_force", &[]) == Some(1.0)
    });
    let cap = cap.unwrap();
    assert!((0.15..1.0).contains(&cap), "cap ratio {cap}");
    let (code, out, err) = s.stop(libc::SIGTERM);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(cpu_cgroup(w.pid()), before, "lifted on SIGTERM");
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let of = |kind: &str| {
        events
            .iter()
            .filter(|e| e["event"] == kind)
            .collect::<Vec<_>>()
    };
    assert!(!of("start").is_empty(), "{out}");
    let capped = of("capped");
    assert!(!capped.is_empty(), "{out}");
    assert!(
        capped.iter().all(|e| e["pid"] == w.pid()),
        "confined: {out}"
    );
    assert!(of("lifted").iter().any(|e| e["pid"] == w.pid()), "{out}");
    // The journal was written (the cap went through it) and, everything undone, is empty:
    // nothing left for `immp restore`.
    let journal = std::fs::read_to_string(dir.join("journal")).expect("a journal");
    assert!(journal.trim().is_empty(), "journal: {journal}");
}

#[test]
fn a_panic_under_auto_still_lifts_every_cap() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let w = Workload::start(&["ring", "16384", "30000"]);
    let before = cpu_cgroup(w.pid());
    let dir = common::scratch("serve").join("panic");
    let _ = std::fs::remove_dir_all(&dir);
    let mut s = Serve::start(
        &[
            "--auto",
            "--bandwidth",
            "100Mbit",
            "--ram",
            "512MB",
            "--interval",
            "500ms",
            "--journal-dir",
            dir.to_str().unwrap(),
        ],
        &[
            ("IMMP_TEST_AUTO_ONLY", w.pid().to_string()),
            // The injected panic of cmd/run.rs, after 20 intervals (10 s).
            ("IMMP_TEST_PANIC_AFTER", "20".to_string()),
        ],
    );
    wait_until("writer capped", Duration::from_secs(9), || {
        cpu_cgroup(w.pid()).contains("immp-")
    });
    let t = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no panic");
        std::thread::sleep(Duration::from_millis(50));
    };
    for r in s.readers.drain(..) {
        let _ = r.join();
    }
    let err = s.err.lock().unwrap().clone();
    assert_eq!(status.code(), Some(101), "a panic: {err}");
    assert!(err.contains("injected panic"), "{err}");
    assert_eq!(cpu_cgroup(w.pid()), before, "lifted while unwinding");
    let journal = std::fs::read_to_string(dir.join("journal")).expect("a journal");
    assert!(
        journal.trim().is_empty(),
        "nothing left for restore: {journal}"
    );
}
