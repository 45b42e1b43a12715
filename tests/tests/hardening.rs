//! Hardening: `immp` against what happens to a tool run as root on a real machine: signals at
//! any moment, a second immp, deadlines, parent cgroup limits, hostile process names, extreme
//! caps, mistyped arguments, other tools moving processes, closed pipes.
mod common;

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::{
    CpuHierarchy, Workload, cap_dirs_of, cpu_cgroup, immp_bin, kernel_thread, start_time,
    wait_until,
};
use serde_json::Value;

/// A name no other test (nor an earlier run of this one) uses.
fn unique(what: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{what}-{}-{n}", std::process::id())
}

/// A fresh, empty journal directory of this test binary's own.
fn journal_dir(name: &str) -> PathBuf {
    let d = common::scratch("hardening").join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn immp(args: &[&str]) -> Output {
    Command::new(immp_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run immp")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Exit `code`, exactly one line on stderr (`immp: ...`) containing `needle`, nothing on stdout.
fn one_line_error(o: &Output, code: i32, needle: &str) {
    let e = text(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "exit code; stderr: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e:?}");
    assert!(e.starts_with("immp: "), "{e:?}");
    assert!(e.contains(needle), "{e:?} should mention {needle:?}");
    assert!(
        o.stdout.is_empty(),
        "nothing on stdout: {}",
        text(&o.stdout)
    );
}

/// A running `immp`: its stdout lines (with the time each arrived) and its stderr, read as
/// they come, so that the test can time events and watch the process while it runs.
struct Running {
    child: Child,
    spawned: Instant,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    stderr: Option<std::thread::JoinHandle<String>>,
    status: Option<ExitStatus>,
    exited: Option<Instant>,
}

impl Running {
    fn spawn(args: &[&str]) -> Self {
        let spawned = Instant::now();
        let mut child = Command::new(immp_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn immp");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let (lines, out) = (lines.clone(), child.stdout.take().unwrap());
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push((Instant::now(), l));
                }
            })
        };
        let stderr = {
            let mut e = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = e.read_to_string(&mut s);
                s
            })
        };
        Self {
            child,
            spawned,
            lines,
            reader: Some(reader),
            stderr: Some(stderr),
            status: None,
            exited: None,
        }
    }

    fn signal(&self, sig: i32) {
        if self.status.is_some() {
            return; // reaped: its pid may belong to another process now
        }
        // SAFETY: kill(2) on our own child, not yet reaped: its pid cannot have been reused.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Polls for the exit (every 5 ms: exit times are measured); None if still running.
    fn wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if t.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(s) = self.child.try_wait().expect("try_wait")
        {
            self.status = Some(s);
            self.exited = Some(Instant::now());
        }
        self.status
    }

    /// Waits for the exit and for all of its output.
    fn finish(&mut self, timeout: Duration) -> ExitStatus {
        let s = self.wait_for(timeout).unwrap_or_else(|| {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "immp still running after {timeout:?}; output so far:\n{}",
                self.stdout()
            )
        });
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        s
    }

    fn stderr(&mut self) -> String {
        self.stderr
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default()
    }

    fn stdout(&self) -> String {
        let l = self.lines.lock().unwrap();
        l.iter()
            .map(|(_, s)| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn timed_events(&self) -> Vec<(Instant, Value)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(t, l)| {
                let v = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
                (*t, v)
            })
            .collect()
    }

    fn events(&self) -> Vec<Value> {
        self.timed_events().into_iter().map(|(_, v)| v).collect()
    }

    /// When the first event `name` arrived.
    fn event_time(&self, name: &str) -> Option<Instant> {
        self.timed_events()
            .into_iter()
            .find(|(_, v)| v["event"] == name)
            .map(|(t, _)| t)
    }
}

impl Drop for Running {
    /// A test that fails midway still leaves nothing capped: SIGTERM (immp lifts its caps),
    /// SIGKILL only if that does not end it.
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.signal(libc::SIGTERM);
            if self.wait_for(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// A small LCG (Knuth's MMIX constants): reproducible random delays from a printed seed.
struct Lcg(u64);

impl Lcg {
    fn from_time() -> Self {
        let seed = std::env::var("IMMP_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("random delays: seed {seed} (IMMP_TEST_SEED={seed} repeats them)");
        Self(seed)
    }

    /// Uniform in [lo, hi).
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (self.0 >> 33) % (hi - lo)
    }
}

fn signal_name(sig: i32) -> String {
    let named = [
        (libc::SIGHUP, "HUP"),
        (libc::SIGINT, "INT"),
        (libc::SIGQUIT, "QUIT"),
        (libc::SIGTERM, "TERM"),
        (libc::SIGUSR1, "USR1"),
        (libc::SIGUSR2, "USR2"),
        (libc::SIGALRM, "ALRM"),
        (libc::SIGPIPE, "PIPE"),
        (libc::SIGVTALRM, "VTALRM"),
        (libc::SIGPROF, "PROF"),
        (libc::SIGXCPU, "XCPU"),
        (libc::SIGXFSZ, "XFSZ"),
        (libc::SIGPWR, "PWR"),
        (libc::SIGIO, "IO"),
        (libc::SIGSTKFLT, "STKFLT"),
        (libc::SIGSYS, "SYS"),
        (libc::SIGTRAP, "TRAP"),
    ];
    match named.iter().find(|(n, _)| *n == sig) {
        Some((_, name)) => name.to_string(),
        None => format!("RTMIN+{}", sig - libc::SIGRTMIN()),
    }
}

/// `immp restore` with the journal in `dir`: clean-up after a failed check, so that one
/// failure does not leave a capped writer behind.
fn restore(dir: &Path) {
    let _ = immp(&["restore", "--journal-dir", dir.to_str().unwrap()]);
}

/// When a stop signal arrives.
#[derive(Debug, Clone, Copy)]
enum When {
    /// This long after spawning immp (start-up, before or while it caps).
    AfterSpawn(u64),
    /// This long after the cap is seen in force.
    AfterCap(u64),
}

#[test]
fn every_stop_signal_at_any_moment_lifts_the_cap_without_restore() {
    // The signals a user sends to stop a program: each at three moments (start-up, the rest of
    // the first second, once capped).
    let signals = [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGTERM,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGPIPE,
    ];
    // The other signals whose default action ends a process (the README says they are caught
    // too): each at one moment picked at random.
    let others = [
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGPWR,
        libc::SIGIO,
        libc::SIGSTKFLT,
        libc::SIGSYS,
        libc::SIGTRAP,
        libc::SIGRTMIN(),
        libc::SIGRTMAX(),
    ];
    let mut rng = Lcg::from_time();
    let phases = |rng: &mut Lcg| {
        [
            When::AfterSpawn(rng.between(0, 300)),
            When::AfterSpawn(rng.between(300, 1000)),
            When::AfterCap(rng.between(0, 200)),
        ]
    };
    let mut plan: Vec<(i32, When)> = vec![];
    for sig in signals {
        plan.extend(phases(&mut rng).map(|w| (sig, w)));
    }
    for sig in others {
        let i = rng.between(0, 3) as usize;
        plan.push((sig, phases(&mut rng)[i]));
    }
    let runs = plan.len();
    // Two at a time (each run its own writer and journal): about half a minute in all.
    let queue = Mutex::new(plan.into_iter().enumerate());
    let failures: Vec<Vec<String>> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                sc.spawn(|| {
                    let mut out = vec![];
                    loop {
                        let next = queue.lock().unwrap().next();
                        let Some((i, (sig, when))) = next else {
                            return out;
                        };
                        let f = signal_run(i, sig, when);
                        if !f.is_empty() {
                            out.push(f.join("; "));
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let failures: Vec<String> = failures.into_iter().flatten().collect();
    assert!(
        failures.is_empty(),
        "{} of {runs} runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// One throttle run stopped by `sig` at `when`; what went wrong, if anything.
fn signal_run(i: usize, sig: i32, when: When) -> Vec<String> {
    let name = signal_name(sig);
    let w = Workload::start(&["writer", "64"]);
    let pid = w.pid();
    let before = cpu_cgroup(pid);
    let j = journal_dir(&format!("signal-{i}"));
    let mut r = Running::spawn(&[
        "throttle",
        "--pid",
        &pid.to_string(),
        "--cap",
        "20%",
        "--duration",
        "30s",
        "--format",
        "json",
        "--journal-dir",
        j.to_str().unwrap(),
    ]);
    let at = match when {
        When::AfterSpawn(ms) => r.spawned + Duration::from_millis(ms),
        When::AfterCap(ms) => {
            let t = Instant::now();
            while !cpu_cgroup(pid).contains("immp-") && r.try_wait().is_none() {
                if t.elapsed() > Duration::from_secs(30) {
                    return vec![format!("SIG{name}: immp never capped PID {pid}")];
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Instant::now() + Duration::from_millis(ms)
        }
    };
    std::thread::sleep(at.saturating_duration_since(Instant::now()));
    let was_capped = cpu_cgroup(pid).contains("immp-");
    r.signal(sig);
    let sent = Instant::now();
    let what = format!("SIG{name} {when:?} (capped when sent: {was_capped})");
    let Some(status) = r.wait_for(Duration::from_secs(5)) else {
        drop(r);
        restore(&j);
        return vec![format!("{what}: immp still running 5 s later")];
    };
    let took = sent.elapsed();
    let now = cpu_cgroup(pid);
    let left = cap_dirs_of(&before, pid);
    eprintln!("{what}: exit {status} after {took:?}, cgroup {now}");
    let mut failures = vec![];
    if now != before {
        failures.push(format!(
            "{what}: exit {status}; PID {pid} left in {now}, not back in {before}; stderr: {}",
            r.stderr().trim()
        ));
    }
    if !left.is_empty() {
        failures.push(format!("{what}: exit {status}; cap cgroups left: {left:?}"));
    }
    if !failures.is_empty() {
        restore(&j);
    }
    failures
}

/// One pair of journal directories for two immp on the same process.
struct Pair {
    name: &'static str,
    first: PathBuf,
    second: PathBuf,
    /// Both use one journal (its lock may refuse the second, exit 1); else only the claim on
    /// the process can (exit 2, "already capped").
    same_journal: bool,
}

/// `tag`: each test its own directories (tests run in parallel).
fn pairs(tag: &str) -> Vec<Pair> {
    let a = journal_dir(&format!("{tag}-a"));
    let b = journal_dir(&format!("{tag}-b"));
    let spelled = journal_dir(&format!("{tag}-spelled"));
    std::fs::create_dir_all(&spelled).unwrap();
    let link = journal_dir(&format!("{tag}-link"));
    std::os::unix::fs::symlink(&spelled, &link).unwrap();
    vec![
        Pair {
            name: "same directory",
            first: a.clone(),
            second: a,
            same_journal: true,
        },
        Pair {
            name: "same directory, spelled another way (symlink, ./)",
            first: spelled.clone(),
            second: link.join("."),
            same_journal: true,
        },
        Pair {
            name: "different directories",
            first: journal_dir(&format!("{tag}-c")),
            second: b,
            same_journal: false,
        },
    ]
}

#[test]
fn a_second_immp_on_a_capped_process_is_refused_whatever_its_journal() {
    for p in pairs("second") {
        let w = Workload::start(&["idle"]);
        let pid = w.pid().to_string();
        let before = cpu_cgroup(w.pid());
        let mut first = Running::spawn(&[
            "throttle",
            "--pid",
            &pid,
            "--cap",
            "40%",
            "--duration",
            "60s",
            "--format",
            "json",
            "--journal-dir",
            p.first.to_str().unwrap(),
        ]);
        wait_until("first capped", Duration::from_secs(30), || {
            cpu_cgroup(w.pid()).contains("immp-")
        });
        let capped = cpu_cgroup(w.pid());
        let h = CpuHierarchy::detect();
        let limit = h.limit(&capped);
        let o = immp(&[
            "throttle",
            "--pid",
            &pid,
            "--cap",
            "20%",
            "--duration",
            "2s",
            "--format",
            "json",
            "--journal-dir",
            p.second.to_str().unwrap(),
        ]);
        eprintln!("{}: second immp: {}", p.name, text(&o.stderr).trim());
        // Same journal: the lock refuses it (exit 1), or, checked first, the claim on the
        // process (exit 2: the README refuses a process another immp caps "whatever its journal
        // directory"). Different journals: only the claim can, with exit 2.
        if p.same_journal && o.status.code() == Some(1) {
            one_line_error(&o, 1, "another immp");
        } else {
            one_line_error(&o, 2, "already capped");
        }
        assert_eq!(
            cpu_cgroup(w.pid()),
            capped,
            "{}: the first cap is untouched",
            p.name
        );
        assert_eq!(h.limit(&capped), limit, "{}: its limit too", p.name);
        first.signal(libc::SIGTERM);
        let s = first.finish(Duration::from_secs(10));
        assert!(s.success(), "{}: {}", p.name, first.stderr());
        assert_eq!(cpu_cgroup(w.pid()), before, "{}: back after both", p.name);
        assert!(
            cap_dirs_of(&before, w.pid()).is_empty(),
            "{}: {:?} left",
            p.name,
            cap_dirs_of(&before, w.pid())
        );
    }
}

#[test]
fn two_immp_started_at_once_on_one_process_cap_it_once_and_both_undo() {
    for p in pairs("at-once") {
        let w = Workload::start(&["idle"]);
        let pid = w.pid().to_string();
        let before = cpu_cgroup(w.pid());
        let args = |dir: &Path| {
            [
                "throttle",
                "--pid",
                &pid,
                "--cap",
                "30%",
                "--duration",
                "4s",
                "--format",
                "json",
                "--journal-dir",
                dir.to_str().unwrap(),
            ]
            .map(str::to_string)
        };
        let (a1, a2) = (args(&p.first), args(&p.second));
        let mut one = Running::spawn(&a1.each_ref().map(String::as_str));
        let mut two = Running::spawn(&a2.each_ref().map(String::as_str));
        let s1 = one.finish(Duration::from_secs(30));
        let s2 = two.finish(Duration::from_secs(30));
        let (e1, e2) = (one.stderr(), two.stderr());
        eprintln!("{}: {s1} {e1:?} / {s2} {e2:?}", p.name);
        let outs = [one.stdout(), two.stdout()];
        let both = format!(
            "{s1} {e1:?}\n{}\n-- and --\n{s2} {e2:?}\n{}",
            outs[0], outs[1]
        );
        let capped: Vec<bool> = [&one, &two]
            .iter()
            .map(|r| {
                r.events()
                    .iter()
                    .any(|e| e["event"] == "capped" && e["pid"] == w.pid())
            })
            .collect();
        assert_eq!(
            capped.iter().filter(|&&c| c).count(),
            1,
            "{}: exactly one of them caps it:\n{both}",
            p.name
        );
        let (winner, loser, err) = if capped[0] {
            (s1, s2, e2)
        } else {
            (s2, s1, e1)
        };
        assert!(winner.success(), "{}: the one that capped:\n{both}", p.name);
        // The other is refused, as if it had come second: never a success that merely saw the
        // winner's cap cgroup as a parent limit ("held").
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{}: the one that did not cap is refused with one line:\n{both}",
            p.name
        );
        match loser.code() {
            Some(1) if p.same_journal => {
                assert!(err.contains("another immp"), "{}:\n{both}", p.name)
            }
            Some(2) => assert!(err.contains("already capped"), "{}:\n{both}", p.name),
            c => panic!("{}: the one that did not cap exited {c:?}:\n{both}", p.name),
        }
        assert_eq!(cpu_cgroup(w.pid()), before, "{}: back after both", p.name);
        assert!(
            cap_dirs_of(&before, w.pid()).is_empty(),
            "{}: {:?} left",
            p.name,
            cap_dirs_of(&before, w.pid())
        );
    }
}

#[test]
fn throttle_duration_2s_ends_between_2_and_3s_even_with_a_10s_interval() {
    let w = Workload::start(&["idle"]);
    let pid = w.pid().to_string();
    let before = cpu_cgroup(w.pid());
    let j = journal_dir("duration-2s");
    let mut r = Running::spawn(&[
        "throttle",
        "--pid",
        &pid,
        "--cap",
        "30%",
        "--interval",
        "10s",
        "--duration",
        "2s",
        "--format",
        "json",
        "--journal-dir",
        j.to_str().unwrap(),
    ]);
    wait_until("capped", Duration::from_secs(30), || {
        cpu_cgroup(w.pid()).contains("immp-") || r.try_wait().is_some()
    });
    let s = r.finish(Duration::from_secs(30));
    assert!(s.success(), "{}", r.stderr());
    let start = r.event_time("start").expect("a start event");
    let end = r.exited.unwrap();
    let (since_start, since_spawn) = (end - start, end - r.spawned);
    eprintln!("exit {since_start:?} after the start event, {since_spawn:?} after spawn");
    assert!(r.event_time("capped").is_some(), "{}", r.stdout());
    assert!(
        since_spawn >= Duration::from_secs(2),
        "ended {since_spawn:?} after spawn, before its 2 s"
    );
    assert!(
        since_start <= Duration::from_secs(3),
        "ended {since_start:?} after its start (2 s asked, 10 s interval)"
    );
    assert_eq!(cpu_cgroup(w.pid()), before, "uncapped at the end");
}

#[test]
fn throttle_duration_4s_with_a_3s_interval_ends_at_4s_not_3s() {
    let w = Workload::start(&["idle"]);
    let pid = w.pid().to_string();
    let before = cpu_cgroup(w.pid());
    let j = journal_dir("duration-4s");
    let mut r = Running::spawn(&[
        "throttle",
        "--pid",
        &pid,
        "--cap",
        "30%",
        "--interval",
        "3s",
        "--duration",
        "4s",
        "--format",
        "json",
        "--journal-dir",
        j.to_str().unwrap(),
    ]);
    let s = r.finish(Duration::from_secs(30));
    assert!(s.success(), "{}", r.stderr());
    let start = r.event_time("start").expect("a start event");
    let end = r.exited.unwrap();
    let (since_start, since_spawn) = (end - start, end - r.spawned);
    eprintln!("exit {since_start:?} after the start event, {since_spawn:?} after spawn");
    assert!(r.event_time("capped").is_some(), "{}", r.stdout());
    assert!(
        since_spawn >= Duration::from_secs(4),
        "ended {since_spawn:?} after spawn: before its 4 s (at the 3 s interval?)"
    );
    assert!(
        since_start <= Duration::from_secs(5),
        "ended {since_start:?} after its start (4 s asked)"
    );
    assert_eq!(cpu_cgroup(w.pid()), before, "uncapped at the end");
}

/// Start-up (probes loaded and attached) before `profile`'s deadline starts; generous for a
/// loaded 2-core machine and a debug build.
const START_UP: Duration = Duration::from_secs(4);

#[test]
fn profile_duration_1s_with_a_1h_interval_prints_one_sample_and_ends() {
    let mut r = Running::spawn(&[
        "profile",
        "--interval",
        "1h",
        "--duration",
        "1s",
        "--format",
        "json",
        "--top",
        "3",
    ]);
    let s = r.finish(Duration::from_secs(60));
    assert!(s.success(), "{}", r.stderr());
    let ev = r.timed_events();
    assert_eq!(ev.len(), 1, "one sample:\n{}", r.stdout());
    let (at, v) = &ev[0];
    let secs = v["interval_s"].as_f64().unwrap();
    let end = r.exited.unwrap();
    eprintln!(
        "sample of {secs:.3}s, exit {:?} after spawn, {:?} after the sample",
        end - r.spawned,
        end - *at
    );
    assert!(
        (0.95..=1.5).contains(&secs),
        "the sample covers the 1 s asked: {secs}"
    );
    assert!(
        end - *at <= Duration::from_secs(1),
        "exits once its one sample is out"
    );
    assert!(
        end - r.spawned <= START_UP + Duration::from_secs(1),
        "took {:?}",
        end - r.spawned
    );
}

#[test]
fn profile_duration_4s_with_a_3s_interval_covers_4s_not_3s() {
    let mut r = Running::spawn(&[
        "profile",
        "--interval",
        "3s",
        "--duration",
        "4s",
        "--format",
        "json",
        "--top",
        "3",
    ]);
    let s = r.finish(Duration::from_secs(60));
    assert!(s.success(), "{}", r.stderr());
    let secs: Vec<f64> = r
        .events()
        .iter()
        .map(|v| v["interval_s"].as_f64().unwrap())
        .collect();
    let total: f64 = secs.iter().sum();
    let end = r.exited.unwrap();
    eprintln!("samples {secs:?}, exit {:?} after spawn", end - r.spawned);
    assert!(
        (3.9..=4.5).contains(&total),
        "samples cover {total:.2}s of the 4 s asked: {secs:?}"
    );
    assert!(end - r.spawned >= Duration::from_secs(4));
    assert!(end - r.spawned <= START_UP + Duration::from_secs(4));
}

/// A cpu cgroup of the test's own with a CPU limit, removed (its processes moved back to
/// where they came from) on drop.
struct LimitedCgroup {
    h: CpuHierarchy,
    /// What /proc/PID/cgroup shows for it.
    path: String,
    /// The cgroup created (the parent of `path` on cgroup v2, `path` itself on v1).
    made: String,
    back_to: String,
}

impl LimitedCgroup {
    /// A cgroup limited to `quota`/`period` µs, with `pid` moved into it.
    fn new(pid: u32, quota: u64, period: u64) -> Self {
        let h = CpuHierarchy::detect();
        let back_to = cpu_cgroup(pid);
        let made = format!("/{}", unique("hardening-limit"));
        let dir = h.dir(&made);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut g = Self {
            path: made.clone(),
            made,
            h: h.clone(),
            back_to,
        };
        match &h {
            CpuHierarchy::V1(_) => {
                std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string()).unwrap();
                std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string()).unwrap();
            }
            CpuHierarchy::V2(m) => {
                // The limit on a parent, the process in a leaf below it (no internal processes).
                let _ = std::fs::write(m.join("cgroup.subtree_control"), "+cpu");
                std::fs::write(dir.join("cpu.max"), format!("{quota} {period}")).unwrap();
                std::fs::write(dir.join("cgroup.subtree_control"), "+cpu").unwrap();
                g.path = format!("{}/leaf", g.made);
                std::fs::create_dir(h.dir(&g.path)).unwrap();
            }
        }
        std::fs::write(h.dir(&g.path).join("cgroup.procs"), pid.to_string()).unwrap();
        assert_eq!(cpu_cgroup(pid), g.path, "moved into the limited cgroup");
        g
    }
}

impl Drop for LimitedCgroup {
    fn drop(&mut self) {
        let mut dirs = vec![self.h.dir(&self.path)];
        if self.path != self.made {
            dirs.push(self.h.dir(&self.made));
        }
        for d in &dirs {
            // Anything in it (and in cap cgroups under it) goes back where it came from.
            let mut all = vec![d.clone()];
            if let Ok(rd) = std::fs::read_dir(d) {
                all.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            for g in all.iter().rev() {
                let procs = std::fs::read_to_string(g.join("cgroup.procs")).unwrap_or_default();
                for p in procs.lines() {
                    let _ =
                        std::fs::write(self.h.dir(&self.back_to).join("cgroup.procs"), p.trim());
                }
                if g != d {
                    let _ = std::fs::remove_dir(g);
                }
            }
        }
        for d in &dirs {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn a_process_held_below_the_cap_by_its_parent_cgroup_is_left_where_it_is() {
    let w = Workload::start(&["writer", "64"]);
    let pid = w.pid();
    let g = LimitedCgroup::new(pid, 10_000, 100_000); // 10 % of one CPU
    let j = journal_dir("held");
    let mut r = Running::spawn(&[
        "throttle",
        "--pid",
        &pid.to_string(),
        "--cap",
        "15%",
        "--duration",
        "3s",
        "--format",
        "json",
        "--journal-dir",
        j.to_str().unwrap(),
    ]);
    // Where the process is, all along.
    let mut seen = vec![];
    while r.try_wait().is_none() {
        let cg = cpu_cgroup(pid);
        if seen.last() != Some(&cg) {
            seen.push(cg);
        }
        assert!(r.spawned.elapsed() < Duration::from_secs(60), "immp hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = r.finish(Duration::from_secs(1));
    let (out, err) = (r.stdout(), r.stderr());
    assert!(
        !out.contains("Invalid argument") && !err.contains("Invalid argument"),
        "a child quota above the parent's (EINVAL) reached the user:\n{out}\n{err}"
    );
    assert!(s.success(), "exit {s}: {err}\n{out}");
    let held: Vec<Value> = r
        .events()
        .into_iter()
        .filter(|e| e["event"] == "held")
        .collect();
    assert!(
        held.iter().any(|e| e["pid"] == pid
            && e["limit_pct"]
                .as_f64()
                .is_some_and(|l| (l - 10.0).abs() < 0.01)),
        "no held event for PID {pid} at 10 %:\n{out}"
    );
    assert_eq!(
        seen,
        vec![g.path.clone()],
        "the process stays in its cgroup all along"
    );
    assert_eq!(cpu_cgroup(pid), g.path);
    assert!(cap_dirs_of(&g.path, pid).is_empty());
}

#[test]
fn control_characters_in_a_process_name_never_reach_the_terminal() {
    let w = Workload::start(&["rename", "\x1b[31mRED", "writer", "64"]);
    let pid = w.pid().to_string();
    let comm = std::fs::read(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm, b"\x1b[31mRED\n", "the workload renamed itself");
    let before = cpu_cgroup(w.pid());
    let j = journal_dir("names");
    let runs: [(&str, Vec<&str>); 2] = [
        (
            "profile",
            vec![
                "profile",
                "--pid",
                &pid,
                "--format",
                "table",
                "--duration",
                "1s",
                "--top",
                "100000",
            ],
        ),
        (
            "throttle",
            vec![
                "throttle",
                "--pid",
                &pid,
                "--cap",
                "50%",
                "--duration",
                "1s",
                "--format",
                "table",
                "--journal-dir",
                j.to_str().unwrap(),
            ],
        ),
    ];
    for (what, args) in runs {
        let o = immp(&args);
        let (out, err) = (text(&o.stdout), text(&o.stderr));
        assert!(o.status.success(), "{what}: {err}");
        assert!(
            !o.stdout.contains(&0x1b) && !o.stderr.contains(&0x1b),
            "{what}: an ESC byte reached the terminal:\n{out:?}\n{err:?}"
        );
        assert!(
            out.contains("\\x1b") && out.contains("RED"),
            "{what}: the name shown with a visible escape:\n{out}"
        );
    }
    assert_eq!(cpu_cgroup(w.pid()), before);
}

#[test]
fn a_cap_of_half_a_percent_is_held_with_a_longer_period_and_a_twentieth_is_refused() {
    let w = Workload::start(&["burn"]);
    let pid = w.pid();
    let before = cpu_cgroup(pid);
    let h = CpuHierarchy::detect();
    let j = journal_dir("tiny");
    let mut r = Running::spawn(&[
        "throttle",
        "--pid",
        &pid.to_string(),
        "--cap",
        "0.5%",
        "--duration",
        "60s",
        "--format",
        "json",
        "--journal-dir",
        j.to_str().unwrap(),
    ]);
    wait_until("capped (or immp ended)", Duration::from_secs(30), || {
        r.event_time("capped").is_some() || r.try_wait().is_some()
    });
    assert!(
        r.try_wait().is_none(),
        "immp ended: {}\n{}",
        r.stdout(),
        r.stderr()
    );
    let capped = cpu_cgroup(pid);
    if let CpuHierarchy::V1(_) = h {
        let expected = format!(
            "{}/immp-{pid}-{}",
            before.trim_end_matches('/'),
            start_time(pid)
        );
        assert_eq!(capped, expected, "cap cgroup under its own cgroup");
    }
    let (quota, period) = h.limit(&capped);
    let quota = quota.expect("a quota");
    eprintln!("0.5 %: quota {quota} µs per {period} µs");
    assert!(
        (quota as f64 / period as f64 - 0.005).abs() < 1e-9,
        "quota {quota} / period {period} is not 0.5 %"
    );
    r.signal(libc::SIGTERM);
    assert!(
        r.finish(Duration::from_secs(10)).success(),
        "{}",
        r.stderr()
    );
    assert_eq!(cpu_cgroup(pid), before);

    let o = immp(&[
        "throttle",
        "--pid",
        &pid.to_string(),
        "--cap",
        "0.05%",
        "--duration",
        "5s",
        "--journal-dir",
        j.to_str().unwrap(),
    ]);
    let e = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "0.05 % refused: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e:?}");
    assert_eq!(cpu_cgroup(pid), before, "nothing changed");
    assert!(cap_dirs_of(&before, pid).is_empty());
}

#[test]
fn restore_with_a_journal_dir_that_does_not_exist_is_bad_input_and_creates_nothing() {
    let top = PathBuf::from("/tmp").join(unique("immp-hardening-absent"));
    assert!(!top.exists());
    let dir = top.join("does/not/exist");
    let o = immp(&["restore", "--journal-dir", dir.to_str().unwrap()]);
    let e = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e:?}");
    assert!(e.starts_with("immp: "), "{e:?}");
    assert!(!top.exists(), "{} was created", top.display());
}

#[test]
fn throttle_without_pid_names_the_missing_argument_in_one_line() {
    let o = immp(&["throttle", "--cap", "20%"]);
    one_line_error(&o, 2, "--pid");
}

#[test]
fn profile_top_0_is_bad_input() {
    let o = immp(&["profile", "--top", "0", "--duration", "1s"]);
    let e = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e:?}");
    assert!(o.stdout.is_empty());
}

#[test]
fn profile_with_a_repeated_pid_shows_it_once() {
    let w = Workload::start(&["writer", "64"]);
    let pid = w.pid().to_string();
    let o = immp(&[
        "profile",
        "--pid",
        &pid,
        "--pid",
        &pid,
        "--duration",
        "2s",
        "--interval",
        "500ms",
        "--format",
        "json",
        "--top",
        "100000",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    let samples: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!samples.is_empty());
    for s in &samples {
        let rows = s["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["pid"].as_u64() == Some(w.pid() as u64))
            .count();
        assert_eq!(rows, 1, "rows for PID {pid} in {s}");
    }
}

#[test]
fn a_thread_id_given_as_pid_is_refused() {
    let w = Workload::start(&["threaded"]);
    let tid = std::fs::read_dir(format!("/proc/{}/task", w.pid()))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&t| t != w.pid())
        .expect("a second thread");
    let before = cpu_cgroup(w.pid());
    let j = journal_dir("thread");
    let o = immp(&[
        "throttle",
        "--pid",
        &tid.to_string(),
        "--cap",
        "20%",
        "--duration",
        "2s",
        "--journal-dir",
        j.to_str().unwrap(),
    ]);
    one_line_error(&o, 2, "thread");
    assert_eq!(cpu_cgroup(w.pid()), before);
    assert!(cap_dirs_of(&before, w.pid()).is_empty());
    assert!(cap_dirs_of(&before, tid).is_empty());
}

#[test]
fn a_process_moved_out_of_its_cap_by_another_tool_is_reported_moved_away_not_gone() {
    let w = Workload::start(&["idle"]);
    let pid = w.pid();
    let before = cpu_cgroup(pid);
    let h = CpuHierarchy::detect();
    let j = journal_dir("moved");
    let mut r = Running::spawn(&[
        "throttle",
        "--pid",
        &pid.to_string(),
        "--cap",
        "30%",
        "--interval",
        "500ms",
        "--duration",
        "6s",
        "--format",
        "json",
        "--journal-dir",
        j.to_str().unwrap(),
    ]);
    wait_until("capped", Duration::from_secs(30), || {
        cpu_cgroup(pid).contains("immp-")
    });
    let capped = cpu_cgroup(pid);
    // Another tool (systemd, a container runtime, an admin) puts it back where it was.
    std::fs::write(h.dir(&before).join("cgroup.procs"), pid.to_string()).unwrap();
    assert_eq!(cpu_cgroup(pid), before);
    let s = r.finish(Duration::from_secs(30));
    let out = r.stdout();
    assert!(s.success(), "{}\n{out}", r.stderr());
    let events = r.events();
    let mine = |e: &&Value| e["pid"] == pid;
    let moved = events
        .iter()
        .position(|e| e["event"] == "moved-away" && e["pid"] == pid)
        .unwrap_or_else(|| panic!("no moved-away event for PID {pid}:\n{out}"));
    assert!(
        !events.iter().filter(mine).any(|e| e["event"] == "gone"),
        "reported gone while alive:\n{out}"
    );
    for e in &events[moved..] {
        if e["event"] == "interval" {
            let still = e["processes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["pid"] == pid && !p["cap_pct"].is_null());
            assert!(!still, "cap still shown after moved-away: {e}\n{out}");
        }
    }
    for e in events.iter().filter(mine) {
        assert_ne!(
            e["undone"]["result"], "gone",
            "an undo result says gone for a live process: {e}"
        );
    }
    assert_eq!(cpu_cgroup(pid), before, "left where the other tool put it");
    assert!(
        !h.dir(&capped).exists(),
        "the empty cap cgroup {capped} was not removed"
    );
}

#[test]
fn doctor_into_a_closed_pipe_exits_0_without_broken_pipe() {
    // `immp doctor | head -1`: read one line, close the pipe, wait.
    let mut c = Command::new(immp_bin())
        .args(["doctor", "--format", "table"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(!first.is_empty());
    let o = c.wait_with_output().unwrap();
    let e = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "`doctor | head -1`: {e}");
    assert!(!e.to_lowercase().contains("broken pipe"), "{e}");
    // `immp doctor | true`: the pipe is closed before doctor writes anything (EPIPE for sure).
    let mut c = Command::new(immp_bin())
        .args(["doctor", "--format", "table"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(c.stdout.take());
    let o = c.wait_with_output().unwrap();
    let e = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "`doctor | true`: {e}");
    assert!(!e.to_lowercase().contains("broken pipe"), "{e}");
}

#[test]
fn profile_into_a_closed_pipe_stops_quietly() {
    // `immp profile --format table | head -1`: lines keep coming after head has gone.
    let spawned = Instant::now();
    let mut c = Command::new(immp_bin())
        .args([
            "profile",
            "--format",
            "table",
            "--interval",
            "200ms",
            "--duration",
            "60s",
            "--top",
            "3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(!first.is_empty(), "a first line");
    // The BufReader (our read end) is dropped: every later write gets EPIPE.
    let status = loop {
        if let Some(s) = c.try_wait().unwrap() {
            break s;
        }
        if spawned.elapsed() > Duration::from_secs(30) {
            let _ = c.kill();
            let _ = c.wait();
            panic!("still running 30 s after its reader left (60 s asked)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut e = String::new();
    c.stderr.take().unwrap().read_to_string(&mut e).unwrap();
    assert_eq!(status.code(), Some(0), "{e}");
    assert!(!e.to_lowercase().contains("broken pipe"), "{e}");
}

#[test]
fn a_real_kernel_thread_is_seen_as_one() {
    // What a unit test assumed of PID 2 (kthreadd only outside PID namespaces): checked on a
    // kernel thread found by its PF_KTHREAD flag.
    let k = kernel_thread();
    let st = immp::collect::procfs::stat(k).expect("stat of a kernel thread");
    assert!(st.kernel_thread, "PID {k} ({}) has PF_KTHREAD", st.comm);
    let me = immp::collect::procfs::stat(std::process::id()).unwrap();
    assert!(!me.kernel_thread);
}

/// Huge durations are bad input or "forever", never a panic (`Instant + d` overflowing).
#[test]
fn huge_durations_never_panic() {
    for args in [
        vec![
            "profile",
            "--duration",
            "4000000000000000h",
            "--interval",
            "200ms",
            "--format",
            "json",
            "--top",
            "1",
        ],
        vec![
            "profile",
            "--interval",
            "4000000000000000h",
            "--duration",
            "1s",
            "--format",
            "json",
            "--top",
            "1",
        ],
    ] {
        let mut r = Running::spawn(&args);
        // Accepted as "a very long time": it samples; refused: it exits at once.
        wait_until("a sample or an exit", Duration::from_secs(30), || {
            !r.lines.lock().unwrap().is_empty() || r.try_wait().is_some()
        });
        match r.wait_for(Duration::from_secs(3)) {
            None => {} // still running: accepted, and Drop ends it
            Some(s) => {
                let err = r.stderr();
                assert!(!err.contains("panicked"), "{args:?}: {err}");
                assert_ne!(s.code(), Some(101), "{args:?}: {err}");
                assert!(
                    s.code() == Some(0) || s.code() == Some(2),
                    "{args:?}: exit {s}: {err}"
                );
                if s.code() == Some(2) {
                    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err:?}");
                }
            }
        }
    }
}
