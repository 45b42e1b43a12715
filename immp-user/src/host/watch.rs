//! `immp host watch`: follow one VM's migration over QMP and, while it runs, run
//! `immp throttle --auto` inside the guest through qemu-guest-agent; stop it (every cap lifted)
//! when the migration completes, fails or is cancelled. The watcher only reads QMP: it never
//! changes the migration, whatever happens in the guest.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use immp_model::{
    Event,
    event::Warning,
    migration::{GuestCap, GuestStarted, GuestStopped, MigrationStatus, Side, Watching},
};
use serde::Deserialize;

use super::{
    qga::{ExecStatus, Qga},
    qmp::Qmp,
};
use crate::{cmd::run::stop_requested, view::View};

/// How often QMP is polled when QEMU sends no `MIGRATION` event (the `events` capability off).
const POLL: Duration = Duration::from_millis(500);

pub struct Settings {
    pub qmp: PathBuf,
    pub qga: PathBuf,
    /// The destination's agent: after a completed migration the guest runs there.
    pub dest_qga: Option<PathBuf>,
    /// How long an agent or QEMU may take to answer.
    pub timeout: Duration,
    /// How long immp may take to lift its caps after SIGTERM before it gets SIGKILL.
    pub stop_wait: Duration,
    /// immp in the guest (a name looked up in the agent's PATH, or a path).
    pub guest_immp: String,
    pub journal_dir: Option<String>,
    /// Passed as `--duration`: the guest's immp lifts its caps by itself after this long even
    /// if nobody stops it (the watcher killed, the destination unreachable).
    pub max_duration: Duration,
    /// Overrides the migration's `max-bandwidth` (bytes/s).
    pub bandwidth: Option<f64>,
    /// End after the first migration that ends (a completed one always ends the watch).
    pub once: bool,
    /// More `immp throttle` arguments (e.g. `--floor 5%`).
    pub extra: Vec<String>,
}

pub struct Watcher<'a> {
    s: &'a Settings,
    qmp: Qmp,
    qga: Qga,
    out: Box<dyn View + 'a>,
    /// The guest PID of the immp this watcher started, while it runs.
    running: Option<i64>,
    status: String,
    failed: bool,
}

/// Watches until a migration completes (or, with `once`, ends), or a stop signal; returns the
/// exit code: 1 if immp could not be started or its caps not confirmed lifted.
pub fn run<'a>(s: &'a Settings, out: Box<dyn View + 'a>) -> anyhow::Result<i32> {
    let mut w = Watcher::open(s, out)?;
    let r = w.watch();
    if r.is_err() && w.running.is_some() {
        // QEMU went away under us: still try to lift the caps where the guest was.
        w.stop(Side::Source);
    }
    r
}

impl<'a> Watcher<'a> {
    /// Checks everything before watching: both sockets, the agent's guest-exec, immp in the
    /// guest. Any failure here changes nothing anywhere.
    fn open(s: &'a Settings, out: Box<dyn View + 'a>) -> anyhow::Result<Self> {
        let mut qmp = Qmp::connect(&s.qmp, s.timeout)?;
        let mut qga = Qga::connect(&s.qga, s.timeout)?;
        let info = qga.info()?;
        for cmd in ["guest-exec", "guest-exec-status"] {
            if !info
                .supported_commands
                .iter()
                .any(|c| c.name == cmd && c.enabled)
            {
                return Err(crate::environment(format!(
                    "the guest agent does not allow {cmd} (see qemu-ga's --allow-rpcs or block-rpcs): immp cannot be started in the guest"
                )));
            }
        }
        let guest_immp = probe_immp(&mut qga, &s.guest_immp)?;
        if let Some(d) = &s.dest_qga {
            check_socket(d, "destination guest agent socket")?;
        }
        let status = qmp.query_migrate()?.status.unwrap_or_else(|| "none".into());
        let mut w = Self {
            s,
            qmp,
            qga,
            out,
            running: None,
            status: status.clone(),
            failed: false,
        };
        w.emit(Event::Watching(Watching {
            qmp: s.qmp.display().to_string(),
            qga: s.qga.display().to_string(),
            dest_qga: s.dest_qga.as_ref().map(|p| p.display().to_string()),
            qemu_version: w.qmp.version.clone(),
            agent_version: info.version,
            guest_immp,
            status,
        }));
        Ok(w)
    }

    fn emit(&mut self, e: Event) {
        // Output is for the operator; a closed stdout must not stop the caps from being lifted.
        let _ = self.out.render(&e);
    }

    fn warn(&mut self, message: String) {
        self.emit(Event::Warning(Warning { message }));
    }

    fn code(&self) -> i32 {
        if self.failed {
            crate::exit::FAILURE
        } else {
            crate::exit::OK
        }
    }

    fn watch(&mut self) -> anyhow::Result<i32> {
        if self.status == "active" {
            // Started during a migration: join it.
            let s = self.status.clone();
            self.on_status(s)?;
        }
        loop {
            if stop_requested().is_some() {
                self.stop(Side::Source);
                return Ok(self.code());
            }
            let status = match self.qmp.next_event(POLL)? {
                Some(s) => s,
                None => self
                    .qmp
                    .query_migrate()?
                    .status
                    .unwrap_or_else(|| "none".into()),
            };
            if status != self.status && self.on_status(status)? {
                return Ok(self.code());
            }
        }
    }

    /// Acts on a new status; true when the watch is over.
    fn on_status(&mut self, status: String) -> anyhow::Result<bool> {
        self.status = status.clone();
        let mut ev = MigrationStatus {
            status: status.clone(),
            max_bandwidth_bytes_per_s: None,
            total_time_ms: None,
            downtime_ms: None,
            transferred_bytes: None,
        };
        match status.as_str() {
            "active" => {
                let bw = match self.s.bandwidth {
                    Some(b) => Some(b),
                    None => self.qmp.max_bandwidth()?.map(|b| b as f64),
                };
                ev.max_bandwidth_bytes_per_s = bw;
                self.emit(Event::Migration(ev));
                match bw {
                    Some(bw) if bw > 0.0 && self.running.is_none() => self.start(bw),
                    Some(_) => {}
                    None => {
                        self.failed = true;
                        self.warn(
                            "QEMU reports no max-bandwidth: pass --bandwidth; immp not started"
                                .into(),
                        );
                    }
                }
                Ok(false)
            }
            "completed" | "failed" | "cancelled" => {
                let mi = self.qmp.query_migrate()?;
                ev.total_time_ms = mi.total_time;
                ev.downtime_ms = mi.downtime;
                ev.transferred_bytes = mi.ram.and_then(|r| r.transferred);
                self.emit(Event::Migration(ev));
                let completed = status == "completed";
                self.stop(if completed {
                    Side::Destination
                } else {
                    Side::Source
                });
                Ok(completed || self.s.once)
            }
            _ => {
                self.emit(Event::Migration(ev));
                Ok(false)
            }
        }
    }

    /// `immp throttle --auto --bandwidth <bytes>B/s` in the guest. A failure is reported and
    /// the migration goes on untouched.
    fn start(&mut self, bandwidth: f64) {
        let argv = throttle_argv(self.s, bandwidth);
        match self.qga.exec(&argv[0], &argv[1..]) {
            Ok(pid) => {
                self.running = Some(pid);
                self.emit(Event::GuestStarted(GuestStarted {
                    pid,
                    argv,
                    via: Side::Source,
                }));
            }
            Err(e) => {
                self.failed = true;
                self.warn(format!(
                    "could not start immp in the guest ({e:#}); the migration goes on, untouched"
                ));
            }
        }
    }

    /// Stops the guest's immp through the agent of the side the guest now runs on.
    fn stop(&mut self, side: Side) {
        let Some(pid) = self.running.take() else {
            return;
        };
        let r = match (side, &self.s.dest_qga) {
            (Side::Source, _) => stop_via(&mut self.qga, pid, side, self.s),
            (Side::Destination, Some(p)) => connect_retry(p, self.s.timeout)
                .and_then(|mut q| stop_via(&mut q, pid, side, self.s)),
            (Side::Destination, None) => Err(anyhow::anyhow!(
                "the guest now runs on the destination and no --dest-qga was given"
            )),
        };
        match r {
            Ok(ev) => {
                self.failed |= !ev.clean;
                self.emit(Event::GuestStopped(ev));
            }
            Err(e) => {
                self.failed = true;
                let secs = self.s.max_duration.as_secs();
                self.warn(format!(
                    "could not stop immp (guest PID {pid}) through the {side} agent: {e:#}; it lifts its caps by itself after {secs}s (--max-duration), or run `immp restore` in the guest"
                ));
            }
        }
    }
}

fn throttle_argv(s: &Settings, bandwidth: f64) -> Vec<String> {
    let mut v: Vec<String> = [
        s.guest_immp.as_str(),
        "throttle",
        "--auto",
        "--bandwidth",
        &format!("{:.0}B/s", bandwidth),
        "--format",
        "json",
        "--duration",
        &format!("{}s", s.max_duration.as_secs().max(1)),
    ]
    .map(String::from)
    .to_vec();
    if let Some(j) = &s.journal_dir {
        v.extend(["--journal-dir".into(), j.clone()]);
    }
    v.extend(s.extra.iter().cloned());
    v
}

/// `immp --version` in the guest: proves guest-exec works and immp is there.
fn probe_immp(q: &mut Qga, immp: &str) -> anyhow::Result<String> {
    let st = q.run(immp, &["--version".to_string()]).map_err(|e| {
        crate::environment(format!("cannot run `{immp} --version` in the guest: {e:#}"))
    })?;
    if !st.success() {
        return Err(crate::environment(format!(
            "`{immp} --version` failed in the guest (exit {:?}): {}",
            st.exitcode,
            st.stderr().trim()
        )));
    }
    Ok(st.stdout().trim().to_string())
}

fn check_socket(p: &std::path::Path, what: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::metadata(p) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(crate::usage(format!(
            "the {what} {} is not a socket",
            p.display()
        ))),
        Err(e) => Err(crate::usage(format!(
            "cannot use the {what} {}: {e}",
            p.display()
        ))),
    }
}

/// The destination's agent answers once the guest runs there: a few tries.
fn connect_retry(p: &std::path::Path, timeout: Duration) -> anyhow::Result<Qga> {
    let until = Instant::now() + timeout * 2;
    loop {
        match Qga::connect(p, timeout) {
            Ok(q) => return Ok(q),
            Err(e) if Instant::now() >= until => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// SIGTERM (then SIGKILL if it does not end in time), its exit, what it says it undid, and
/// `immp restore` when that is not all clean.
fn stop_via(q: &mut Qga, pid: i64, via: Side, s: &Settings) -> anyhow::Result<GuestStopped> {
    let mut how = "exited";
    let mut st = q.status(pid)?;
    if !st.exited {
        how = "sigterm";
        kill(q, pid, "-TERM")?;
        st = q.wait(pid, s.stop_wait)?;
        if !st.exited {
            how = "sigkill";
            kill(q, pid, "-KILL")?;
            st = q.wait(pid, s.timeout)?;
        }
    }
    let caps = guest_caps(&st.stdout());
    let all_lifted = st.out_truncated || caps.iter().all(|c| c.lifted);
    let mut ev = GuestStopped {
        pid,
        via,
        how: how.into(),
        exitcode: st.exitcode,
        signal: st.signal,
        caps,
        restore: None,
        error: last_error(&st),
        output_truncated: st.out_truncated,
        // immp exits 0 only when it lifted every cap it set.
        clean: st.success() && all_lifted,
    };
    if !ev.clean {
        let (ok, what) = restore(q, s);
        ev.restore = Some(what);
        ev.clean = ok;
    }
    Ok(ev)
}

/// `kill SIG PID` in the guest. Its own exit is not checked: immp may have exited meanwhile
/// (then `kill` fails), and immp's status says what happened either way.
fn kill(q: &mut Qga, pid: i64, sig: &str) -> anyhow::Result<()> {
    q.run("kill", &[sig.to_string(), pid.to_string()]).map(drop)
}

fn last_error(st: &ExecStatus) -> Option<String> {
    let err = st.stderr();
    err.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

/// `immp restore` in the guest: (succeeded, a one-line account).
fn restore(q: &mut Qga, s: &Settings) -> (bool, String) {
    let mut args = vec!["restore".to_string(), "--format".into(), "json".into()];
    if let Some(j) = &s.journal_dir {
        args.extend(["--journal-dir".into(), j.clone()]);
    }
    match q.run(&s.guest_immp, &args) {
        Ok(st) => {
            let lines: Vec<GuestLine> = lines(&st.stdout());
            let n = |e: &str| lines.iter().filter(|l| l.event == e).count();
            let what = format!(
                "exit {}: {} restored, {} failed",
                st.exitcode.unwrap_or(-1),
                n("restored"),
                n("restore-failed")
            );
            (st.success(), what)
        }
        Err(e) => (false, format!("could not run it: {e:#}")),
    }
}

/// The fields of immp's JSON events the watcher reads.
#[derive(Deserialize)]
struct GuestLine {
    event: String,
    #[serde(default)]
    pid: u32,
    #[serde(default)]
    comm: String,
    cap_pct: Option<f64>,
    action: Option<String>,
}

fn lines(out: &str) -> Vec<GuestLine> {
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Every process the guest's immp capped, its caps in order, and whether each was lifted.
pub fn guest_caps(out: &str) -> Vec<GuestCap> {
    let mut caps: Vec<GuestCap> = Vec::new();
    for l in lines(out) {
        let i = caps.iter().position(|c| c.pid == l.pid);
        match (l.event.as_str(), i, l.cap_pct) {
            ("capped", None, Some(p)) => caps.push(GuestCap {
                pid: l.pid,
                comm: l.comm,
                caps_pct: vec![p],
                lifted: false,
            }),
            ("capped", Some(i), Some(p)) => {
                caps[i].caps_pct.push(p);
                caps[i].lifted = false;
            }
            ("decision", Some(i), Some(p)) if l.action.as_deref() == Some("cap") => {
                caps[i].caps_pct.push(p);
            }
            ("lifted" | "gone" | "moved-away", Some(i), _) => caps[i].lifted = true,
            _ => {}
        }
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_lifts_read_from_immps_output() {
        let out = r#"{"event":"start","mechanism":"cgroup-v2"}
{"event":"capped","pid":7,"start_time":1,"comm":"w","cap_pct":15.0,"mechanism":"cgroup-v2","cgroup":"/x"}
{"event":"decision","pid":7,"start_time":1,"comm":"w","action":"cap","cap_pct":9.5,"reason":"r"}
{"event":"decision","pid":7,"start_time":1,"comm":"w","action":"keep","cap_pct":9.5,"reason":"r"}
{"event":"capped","pid":8,"start_time":1,"comm":"v","cap_pct":20.0,"mechanism":"cgroup-v2","cgroup":"/y"}
not json
{"event":"lifted","pid":7,"start_time":1,"comm":"w","undone":{"result":"moved-back","moved":1,"to":"/"}}"#;
        let caps = guest_caps(out);
        assert_eq!(caps.len(), 2);
        assert_eq!(caps[0].caps_pct, vec![15.0, 9.5]);
        assert!(caps[0].lifted);
        assert!(!caps[1].lifted, "pid 8 was never lifted");
    }

    #[test]
    fn the_guest_command_carries_the_migration_bandwidth() {
        let s = Settings {
            qmp: "q".into(),
            qga: "g".into(),
            dest_qga: None,
            timeout: Duration::from_secs(1),
            stop_wait: Duration::from_secs(1),
            guest_immp: "immp".into(),
            journal_dir: Some("/tmp/j".into()),
            max_duration: Duration::from_secs(7200),
            bandwidth: None,
            once: false,
            extra: vec!["--floor".into(), "5%".into()],
        };
        assert_eq!(
            throttle_argv(&s, 12_500_000.0).join(" "),
            "immp throttle --auto --bandwidth 12500000B/s --format json --duration 7200s --journal-dir /tmp/j --floor 5%"
        );
    }
}
