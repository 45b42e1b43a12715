//! `immp host watch` on the host, without a VM: a tiny QMP server in the test plays QEMU (its
//! migration status follows a script), and a real qemu-ga in unix-listen mode plays the guest
//! agent, with a fake `immp` script behind it (the real `immp throttle --auto` must never run
//! on this host). Bad input: a missing socket, a socket that speaks something else, an agent
//! that never answers, guest-exec not allowed, no immp in the "guest".
mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{immp_bin, wait_until};

const QGA: &str = "/usr/sbin/qemu-ga";

fn dir(name: &str) -> PathBuf {
    // Unix socket paths are limited to 108 bytes: a short directory under /tmp.
    let d = PathBuf::from(format!("/tmp/immp-hw-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("test dir");
    d
}

fn watch(args: &[&str]) -> Output {
    Command::new(immp_bin())
        .args(["host", "watch", "--timeout", "2s"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run immp host watch")
}

fn assert_one_line_error(o: &Output, code: i32, needle: &str) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "exit code; stderr: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e:?}");
    assert!(e.starts_with("immp: "), "{e:?}");
    assert!(e.contains(needle), "{e:?} should mention {needle:?}");
}

/// A unix-socket server answering each connection with `reply(line) -> lines to send`, after
/// `greeting` (if any).
fn server(
    path: &Path,
    greeting: Option<&'static str>,
    reply: impl Fn(&str) -> Vec<String> + Send + Sync + 'static,
) {
    let l = UnixListener::bind(path).expect("bind");
    let reply = Arc::new(reply);
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            let reply = reply.clone();
            std::thread::spawn(move || {
                let mut w = s.try_clone().expect("clone");
                if let Some(g) = greeting {
                    let _ = writeln!(w, "{g}");
                }
                for line in BufReader::new(s).split(b'\n').map_while(Result::ok) {
                    for r in reply(&String::from_utf8_lossy(&line)) {
                        let _ = writeln!(w, "{r}");
                    }
                }
            });
        }
    });
}

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;

/// A QMP server whose migration status is `script[n]` at the n-th `query-migrate` (the last
/// one repeats): QEMU as the watcher sees it when it polls.
fn fake_qmp(path: &Path, script: Vec<&'static str>) {
    let n = AtomicUsize::new(0);
    server(path, Some(GREETING), move |l| {
        let r = if l.contains("qmp_capabilities") {
            r#"{"return": {}}"#.to_string()
        } else if l.contains("query-migrate-parameters") {
            r#"{"return": {"max-bandwidth": 12500000, "downtime-limit": 300}}"#.to_string()
        } else if l.contains("query-migrate") {
            let i = n.fetch_add(1, Ordering::SeqCst).min(script.len() - 1);
            match script[i] {
                "none" => r#"{"return": {}}"#.to_string(),
                s => format!(
                    r#"{{"return": {{"status": "{s}", "total-time": 4321, "ram": {{"transferred": 52000000}}}}}}"#
                ),
            }
        } else {
            r#"{"error": {"class": "CommandNotFound", "desc": "unknown"}}"#.to_string()
        };
        vec![r]
    });
}

/// A real qemu-ga listening on a unix socket (what QEMU's chardev gives the host), `extra`
/// flags such as a block list.
struct Agent(Child);

impl Agent {
    fn start(d: &Path, extra: &[&str]) -> (Self, PathBuf) {
        let sock = d.join("qga.sock");
        let child = Command::new(QGA)
            .args(["-m", "unix-listen", "-p"])
            .arg(&sock)
            .arg("-f")
            .arg(d.join("qga.pid"))
            .arg("-t")
            .arg(d)
            .arg("-l")
            .arg(d.join("qga.log"))
            .args(extra)
            .spawn()
            .expect("qemu-ga (Debian package qemu-guest-agent; cargo xtask setup installs it)");
        wait_until("qemu-ga's socket", Duration::from_secs(10), || {
            sock.exists()
        });
        (Self(child), sock)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A stand-in for immp in the "guest": `--version`, and `throttle` printing a cap, writing its
/// arguments down, and printing the lift when SIGTERM arrives (as immp does).
fn fake_immp(d: &Path) -> PathBuf {
    let p = d.join("fake-immp");
    let args = d.join("args");
    let script = format!(
        r#"#!/bin/sh
case "$1" in
--version) echo "immp 0.0.0-fake"; exit 0 ;;
throttle)
  echo "$@" > {args}
  echo '{{"event":"start","mechanism":"cgroup-v2","journal":"/j","auto":true,"cap_pct":null}}'
  echo '{{"event":"capped","pid":4242,"start_time":1,"comm":"writer","cap_pct":15.0,"mechanism":"cgroup-v2","cgroup":"/immp-4242-1"}}'
  trap 'echo "{{\"event\":\"lifted\",\"pid\":4242,\"start_time\":1,\"comm\":\"writer\",\"undone\":{{\"result\":\"moved-back\",\"moved\":1,\"to\":\"/\"}}}}"; exit 0' TERM
  while :; do sleep 0.1; done ;;
esac
exit 9
"#,
        args = args.display()
    );
    std::fs::write(&p, script).expect("fake immp");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

#[test]
fn a_missing_socket_is_bad_input() {
    let d = dir("missing");
    let qmp = d.join("nope.qmp");
    let o = watch(&["--qmp", qmp.to_str().unwrap(), "--qga", "/nonexistent/qga"]);
    assert_one_line_error(&o, 2, "cannot connect to the QMP socket");
    fake_qmp(&d.join("q.sock"), vec!["none"]);
    let o = watch(&[
        "--qmp",
        d.join("q.sock").to_str().unwrap(),
        "--qga",
        "/nonexistent/qga",
    ]);
    assert_one_line_error(
        &o,
        2,
        "cannot connect to the guest agent socket /nonexistent/qga",
    );
}

#[test]
fn a_socket_that_speaks_something_else_is_bad_input() {
    let d = dir("garbage");
    let garbage = d.join("garbage.sock");
    server(&garbage, Some("SSH-2.0-OpenSSH_9.2"), |_| {
        vec!["what?".to_string()]
    });
    let o = watch(&["--qmp", garbage.to_str().unwrap(), "--qga", "/x"]);
    assert_one_line_error(&o, 2, "does not speak QMP");
    // QMP is fine, the "agent" answers garbage.
    let qmp = d.join("q.sock");
    fake_qmp(&qmp, vec!["none"]);
    let bad_agent = d.join("agent.sock");
    server(&bad_agent, None, |_| vec!["<html>nope</html>".to_string()]);
    let o = watch(&[
        "--qmp",
        qmp.to_str().unwrap(),
        "--qga",
        bad_agent.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, 2, "does not speak the guest agent protocol");
    // The two sockets swapped: the QMP one given as the agent's.
    let o = watch(&[
        "--qmp",
        qmp.to_str().unwrap(),
        "--qga",
        qmp.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, 2, "is a QMP socket, not a guest agent's");
}

#[test]
fn an_agent_that_never_answers_times_out() {
    let d = dir("silent");
    let qmp = d.join("q.sock");
    fake_qmp(&qmp, vec!["none"]);
    // QEMU's chardev accepts the connection even when no agent runs in the guest.
    let silent = d.join("silent.sock");
    server(&silent, None, |_| vec![]);
    let t = std::time::Instant::now();
    let o = watch(&[
        "--qmp",
        qmp.to_str().unwrap(),
        "--qga",
        silent.to_str().unwrap(),
    ]);
    assert_one_line_error(
        &o,
        3,
        "did not answer within 2s: is qemu-ga running in the guest?",
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn a_guest_without_immp_or_without_guest_exec_is_refused() {
    let d = dir("noimmp");
    let qmp = d.join("q.sock");
    fake_qmp(&qmp, vec!["none"]);
    let (_agent, qga) = Agent::start(&d, &[]);
    let o = watch(&[
        "--qmp",
        qmp.to_str().unwrap(),
        "--qga",
        qga.to_str().unwrap(),
        "--guest-immp",
        "/nonexistent/immp",
    ]);
    assert_one_line_error(
        &o,
        3,
        "cannot run `/nonexistent/immp --version` in the guest",
    );
    drop(_agent);

    let d = dir("noexec");
    let qmp = d.join("q.sock");
    fake_qmp(&qmp, vec!["none"]);
    let (_agent, qga) = Agent::start(&d, &["-b", "guest-exec"]);
    let o = watch(&[
        "--qmp",
        qmp.to_str().unwrap(),
        "--qga",
        qga.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, 3, "does not allow guest-exec");
}

/// The whole cycle through a real qemu-ga: nothing before the migration; on `active` the fake
/// immp starts with the migration's max-bandwidth; on `cancelled` it gets SIGTERM, prints its
/// lift and exits 0; the watcher says so and exits 0 (`--once`).
#[test]
fn starts_immp_on_active_and_stops_it_when_the_migration_ends() {
    let d = dir("cycle");
    let qmp = d.join("q.sock");
    let mut script = vec!["none", "none", "setup"];
    script.extend(std::iter::repeat_n("active", 8));
    script.push("cancelled");
    fake_qmp(&qmp, script);
    let (_agent, qga) = Agent::start(&d, &[]);
    let immp = fake_immp(&d);
    let o = watch(&[
        "--qmp",
        qmp.to_str().unwrap(),
        "--qga",
        qga.to_str().unwrap(),
        "--guest-immp",
        immp.to_str().unwrap(),
        "--format",
        "json",
        "--once",
        "--",
        "--floor",
        "5%",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e["status"].as_str() {
            Some(s) => format!("{}:{s}", e["event"].as_str().unwrap()),
            None => e["event"].as_str().unwrap().to_string(),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "watching:none",
            "migration:setup",
            "migration:active",
            "guest-started",
            "migration:cancelled",
            "guest-stopped"
        ],
        "{out}"
    );
    assert_eq!(events[0]["guest_immp"], "immp 0.0.0-fake");
    assert_eq!(events[2]["max_bandwidth_bytes_per_s"], 12500000.0);
    let args = std::fs::read_to_string(d.join("args")).expect("fake immp ran");
    assert!(
        args.starts_with("throttle --auto --bandwidth 12500000B/s --format json --duration 7200s")
            && args.trim_end().ends_with("--floor 5%"),
        "{args}"
    );
    let stopped = &events[5];
    assert_eq!(stopped["how"], "sigterm", "{stopped}");
    assert_eq!(stopped["exitcode"], 0, "{stopped}");
    assert_eq!(stopped["via"], "source");
    assert_eq!(stopped["caps"][0]["pid"], 4242);
    assert_eq!(stopped["caps"][0]["lifted"], true);
    assert_eq!(stopped["clean"], true);
}

/// A stop signal to the watcher while immp runs in the guest: immp is stopped (caps lifted)
/// before the watcher exits, and the migration is left alone.
#[test]
fn a_stop_signal_stops_the_guests_immp_first() {
    let d = dir("signal");
    let qmp = d.join("q.sock");
    fake_qmp(&qmp, vec!["none", "active"]);
    let (_agent, qga) = Agent::start(&d, &[]);
    let immp = fake_immp(&d);
    let mut w = Command::new(immp_bin())
        .args([
            "host",
            "watch",
            "--timeout",
            "2s",
            "--format",
            "json",
            "--qmp",
        ])
        .arg(&qmp)
        .arg("--qga")
        .arg(&qga)
        .arg("--guest-immp")
        .arg(&immp)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("immp host watch");
    let mut lines = BufReader::new(w.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for l in lines.by_ref().map_while(Result::ok) {
        let started = l.contains("\"event\":\"guest-started\"");
        seen.push(l);
        if started {
            break;
        }
    }
    // SAFETY: kill has no memory-safety preconditions; the PID is our child's.
    unsafe { libc::kill(w.id() as i32, libc::SIGTERM) };
    seen.extend(lines.map_while(Result::ok));
    let st = w.wait().expect("wait");
    assert_eq!(st.code(), Some(0), "{seen:#?}");
    let last: serde_json::Value = serde_json::from_str(seen.last().unwrap()).unwrap();
    assert_eq!(last["event"], "guest-stopped", "{seen:#?}");
    assert_eq!(last["how"], "sigterm");
    assert_eq!(last["clean"], true);
}

#[test]
fn help_has_examples() {
    let o = Command::new(immp_bin())
        .args(["host", "watch", "--help"])
        .output()
        .expect("help");
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        t.contains("Examples:") && t.contains("--dest-qga") && t.contains("Exit codes"),
        "{t}"
    );
}
