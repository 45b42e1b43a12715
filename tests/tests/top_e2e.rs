//! `immp top` end to end: the real binary in a real terminal (tmux, on a server socket of its
//! own), driven by keys as an operator would, on a real writer. Checks what the screen says and
//! what the system shows: the cgroup the writer is in and the CPU it gets.
mod common;

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use common::{Workload, cpu_cgroup, cpu_ns, immp_bin, scratch, wait_until};

const LONG: Duration = Duration::from_secs(60);

/// One tmux server and session running `immp top`; killed when dropped.
struct Screen {
    socket: String,
    journal: PathBuf,
}

impl Screen {
    /// Runs `immp top ARGS` in a `cols` x `rows` terminal. When immp ends, the shell prints
    /// its exit code and the terminal's modes (to check that raw mode is gone), then waits.
    fn start(name: &str, env: &str, args: &str) -> Self {
        assert!(
            Command::new("tmux").arg("-V").output().is_ok(),
            "tmux is missing: apt-get install tmux (cargo xtask setup installs it)"
        );
        let socket = format!("immp-top-{name}-{}", std::process::id());
        let journal = scratch(&format!("top-e2e-{name}"));
        let cmd = format!(
            "{env} {} top --journal-dir {} {args}; echo IMMP-EXIT=$?; stty -a; echo STTY-DONE; sleep 600",
            immp_bin().display(),
            journal.display()
        );
        let s = Self { socket, journal };
        s.tmux(&["new-session", "-d", "-x", "120", "-y", "36", &cmd]);
        s
    }

    fn tmux(&self, args: &[&str]) -> Output {
        let o = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux");
        assert!(o.status.success(), "tmux {args:?}: {o:?}");
        o
    }

    fn keys(&self, keys: &[&str]) {
        for k in keys {
            self.tmux(&["send-keys", k]);
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// The screen, wrapped lines joined (-J): after a SIGKILL the terminal stays raw, the
    /// shell's lines run on past the right edge and a word can wrap in the middle.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-J"]).stdout).into_owned()
    }

    /// The screen and what scrolled off it (the shell's lines after immp ended).
    fn all_text(&self) -> String {
        let o = self.tmux(&["capture-pane", "-p", "-J", "-S", "-500"]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Waits until the screen satisfies `f`; returns it.
    fn wait(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let t = Instant::now();
        loop {
            let s = self.text();
            if f(&s) {
                return s;
            }
            assert!(
                t.elapsed() < LONG,
                "timed out waiting for {what}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The PID of immp (the pane's shell's child).
    fn immp_pid(&self) -> u32 {
        let o = self.tmux(&["display-message", "-p", "#{pane_pid}"]);
        let shell: u32 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
        let kids = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
            .unwrap_or_default();
        kids.split_whitespace()
            .filter_map(|p| p.parse().ok())
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "immp")
            })
            .expect("immp runs in the pane")
    }

    /// Waits for immp to end; checks it exited 0 and left the terminal in cooked mode.
    fn wait_exit(&self) -> String {
        self.wait("immp to exit", |s| s.contains("STTY-DONE"));
        let s = self.all_text();
        assert!(s.contains("IMMP-EXIT=0"), "{s}");
        let modes: Vec<&str> = s.split_whitespace().collect();
        assert!(
            modes.contains(&"icanon") && modes.contains(&"echo"),
            "the terminal is back in cooked mode: {s}"
        );
        s
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
        // Whatever happened, leave nothing capped behind.
        let _ = Command::new(immp_bin())
            .args(["restore", "--journal-dir"])
            .arg(&self.journal)
            .output();
    }
}

/// The table line of `pid` (a row: the PID, then the command name).
fn row_of(screen: &str, pid: u32) -> Option<(usize, String)> {
    screen.lines().enumerate().find_map(|(i, l)| {
        let mut w = l.trim_start_matches('▶').split_whitespace();
        (w.next() == Some(&pid.to_string()) && w.next() == Some("immp-workload"))
            .then(|| (i, l.to_string()))
    })
}

/// Share of one CPU `pid` gets over `d` (schedstat, precise).
fn cpu_share(pid: u32, d: Duration) -> f64 {
    let a = cpu_ns(pid);
    std::thread::sleep(d);
    (cpu_ns(pid) - a) as f64 / d.as_nanos() as f64 * 100.0
}

/// Selects the writer: filters on its PID, then moves down until its row is the selected one
/// (a PID filter also keeps longer PIDs that start with it).
fn select(s: &Screen, pid: u32) {
    // Esc in the filter prompt clears an earlier filter.
    s.keys(&["/", "Escape", "/"]);
    s.keys(&[&pid.to_string(), "Enter"]);
    for _ in 0..10 {
        let screen = s.wait("the writer's row", |t| row_of(t, pid).is_some());
        if row_of(&screen, pid).is_some_and(|(_, l)| l.starts_with('▶')) {
            return;
        }
        s.keys(&["j"]);
    }
    panic!("could not select PID {pid}:\n{}", s.text());
}

fn cap_20(s: &Screen, pid: u32, original: &str) {
    select(s, pid);
    s.keys(&["c", "2", "0", "Enter"]);
    wait_until("the writer in its cap cgroup", LONG, || {
        cpu_cgroup(pid).contains(&format!("immp-{pid}-"))
    });
    let screen = s.wait("the cap on screen", |t| {
        row_of(t, pid).is_some_and(|(_, l)| l.contains("20%")) && t.contains("capped at 20.0%")
    });
    assert_ne!(cpu_cgroup(pid), original, "{screen}");
}

#[test]
fn a_writer_is_shown_capped_with_c_lifted_with_u_and_q_restores_everything() {
    let w = Workload::start(&["writer", "4096"]);
    let pid = w.pid();
    let original = cpu_cgroup(pid);
    let s = Screen::start("keys", "", "--bandwidth 100Mbit --interval 1s");
    // It appears, with its PID, above every process that is not another test's writer.
    let screen = s.wait("the writer in the table", |t| row_of(t, pid).is_some());
    let (at, _) = row_of(&screen, pid).unwrap();
    let header = screen
        .lines()
        .position(|l| l.contains("PID") && l.contains("COMMAND"));
    for l in screen.lines().take(at).skip(header.unwrap() + 1) {
        assert!(
            l.contains("immp-workload"),
            "above the writer: {l}\n{screen}"
        );
    }
    cap_20(&s, pid, &original);
    // Its CPU share drops to near 20 % (a busy 2-core host: generous bounds).
    std::thread::sleep(Duration::from_millis(500));
    let share = cpu_share(pid, Duration::from_secs(3));
    eprintln!("writer under a 20 % cap: {share:.1} % of one CPU");
    assert!(share > 5.0 && share < 30.0, "capped at 20 %: {share:.1} %");
    s.keys(&["u"]);
    wait_until("the writer back in its cgroup", LONG, || {
        cpu_cgroup(pid) == original
    });
    s.wait("the lift in the log", |t| t.contains("cap lifted"));
    // Capped again, then q: the cap is lifted and the terminal is back.
    cap_20(&s, pid, &original);
    s.keys(&["q"]);
    let end = s.wait_exit();
    assert!(end.contains("cap lifted, moved back"), "{end}");
    assert_eq!(cpu_cgroup(pid), original);
}

#[test]
fn sigterm_lifts_the_caps_and_restores_the_terminal() {
    let w = Workload::start(&["writer", "4096"]);
    let pid = w.pid();
    let original = cpu_cgroup(pid);
    let s = Screen::start("term", "", "--bandwidth 100Mbit");
    s.wait("the writer in the table", |t| row_of(t, pid).is_some());
    cap_20(&s, pid, &original);
    // SAFETY: kill(2) on immp, a process this test started.
    unsafe { libc::kill(s.immp_pid() as i32, libc::SIGTERM) };
    let end = s.wait_exit();
    assert!(end.contains("cap lifted"), "{end}");
    assert_eq!(cpu_cgroup(pid), original);
}

#[test]
fn a_panic_restores_the_terminal_and_lifts_the_caps() {
    let w = Workload::start(&["writer", "4096"]);
    let pid = w.pid();
    let original = cpu_cgroup(pid);
    let s = Screen::start("panic", "IMMP_TEST_PANIC_AFTER=25", "--bandwidth 100Mbit");
    s.wait("the writer in the table", |t| row_of(t, pid).is_some());
    cap_20(&s, pid, &original);
    s.wait("immp to exit", |t| t.contains("STTY-DONE"));
    let end = s.all_text();
    assert!(end.contains("IMMP-EXIT=101"), "{end}");
    assert!(end.contains("injected panic"), "{end}");
    assert!(end.split_whitespace().any(|w| w == "icanon"), "{end}");
    wait_until("the writer back in its cgroup", LONG, || {
        cpu_cgroup(pid) == original
    });
}

#[test]
fn hangup_closing_the_terminal_lifts_the_caps() {
    let w = Workload::start(&["writer", "4096"]);
    let pid = w.pid();
    let original = cpu_cgroup(pid);
    let s = Screen::start("hup", "", "--bandwidth 100Mbit");
    s.wait("the writer in the table", |t| row_of(t, pid).is_some());
    cap_20(&s, pid, &original);
    // Killing the session closes the terminal: immp gets SIGHUP.
    s.tmux(&["kill-session"]);
    wait_until("the writer back in its cgroup", LONG, || {
        cpu_cgroup(pid) == original
    });
}

#[test]
fn after_sigkill_restore_puts_the_writer_back() {
    let w = Workload::start(&["writer", "4096"]);
    let pid = w.pid();
    let original = cpu_cgroup(pid);
    let s = Screen::start("kill", "", "--bandwidth 100Mbit");
    s.wait("the writer in the table", |t| row_of(t, pid).is_some());
    cap_20(&s, pid, &original);
    // SAFETY: kill(2) on immp, a process this test started.
    unsafe { libc::kill(s.immp_pid() as i32, libc::SIGKILL) };
    // Raw mode outlives a SIGKILL: no carriage returns, so match across line ends too.
    s.wait("immp to be killed", |t| {
        t.replace('\n', "").contains("IMMP-EXIT=137")
    });
    assert_ne!(cpu_cgroup(pid), original, "nothing could lift it");
    let o = Command::new(immp_bin())
        .args(["restore", "--format", "json", "--journal-dir"])
        .arg(&s.journal)
        .output()
        .expect("immp restore");
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("moved-back"),
        "{o:?}"
    );
    assert_eq!(cpu_cgroup(pid), original);
}

#[test]
fn not_a_terminal_points_at_profile() {
    let o = Command::new(immp_bin())
        .args(["top", "--bandwidth", "100Mbit"])
        .output()
        .expect("run immp");
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("needs a terminal") && err.contains("immp profile"),
        "{err}"
    );
}
