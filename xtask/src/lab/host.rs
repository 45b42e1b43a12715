//! The `host-triggered` policy: the writer runs uncapped until the migration starts; then
//! `immp host watch` (on the host, the release binary) starts `immp throttle --auto` in the
//! guest through qemu-guest-agent and stops it when the migration ends. The lab records when
//! immp ran, what it capped, the watcher's exit, and the writer's cgroup before the migration
//! and after it (from the guest's own counter lines: `cg=`), i.e. whether it is uncapped.
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{Point, Run};
use crate::vm::{self, Guest};

/// What the watcher did in one run.
#[derive(Clone, Debug, Serialize)]
pub struct HostWatch {
    pub exit_code: Option<i32>,
    /// Seconds from the migration's start (host clock): immp started and stopped in the guest,
    /// and the watcher exited.
    pub started_s: Option<f64>,
    pub stopped_s: Option<f64>,
    pub exited_s: Option<f64>,
    /// The watcher's `guest-stopped` event (immp's exit, its caps, whether all were lifted).
    pub stopped: Option<serde_json::Value>,
    pub clean: bool,
    pub writer_cgroup_before: Option<String>,
    pub writer_cgroup_after: Option<String>,
    /// The writer was in an immp cap cgroup at some point during the migration.
    pub capped_during: Option<bool>,
    /// The writer is back in its cgroup of before the migration, seen after the watcher ended.
    pub uncapped_after: Option<bool>,
    pub stderr: String,
    pub events: Vec<(f64, serde_json::Value)>,
}

/// The running watcher, its JSON lines timestamped on arrival.
pub struct Watch {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    log: std::path::PathBuf,
}

impl Watch {
    /// `immp host watch` on the source's second QMP socket and both guests' agents.
    pub fn spawn(src: &Guest, dst: &Guest) -> anyhow::Result<Self> {
        let log = vm::vm_dir().join("lab-watch.log");
        let mut child = Command::new(crate::release_bin("immp"))
            .args(["host", "watch", "--qmp"])
            .arg(&src.watch_qmp)
            .arg("--qga")
            .arg(&src.qga)
            .arg("--dest-qga")
            .arg(&dst.qga)
            .args(["--format", "json", "--once", "--timeout", "30s"])
            .args(["--journal-dir", "/tmp/journal"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting immp host watch")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (l, out) = (lines.clone(), child.stdout.take().context("stdout")?);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().expect("watch lines").push((Instant::now(), line));
            }
        });
        Ok(Self { child, lines, log })
    }

    fn has(&self, event: &str) -> bool {
        let tag = format!("\"event\":\"{event}\"");
        self.lines
            .lock()
            .expect("watch lines")
            .iter()
            .any(|(_, l)| l.contains(&tag))
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Until the watcher says it is watching (both agents answered, immp found in the guest).
    pub fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let t = Instant::now();
        while !self.has("watching") {
            vm::check_interrupted()?;
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "immp host watch exited ({st}) before watching: {}",
                    self.stderr()
                );
            }
            if t.elapsed() > limit {
                bail!(
                    "immp host watch not watching after {limit:?}: {}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Waits for the watcher to stop immp and exit (killed after `limit`).
    pub fn finish(mut self, t0: Instant, limit: Duration) -> HostWatch {
        let t = Instant::now();
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if t.elapsed() < limit && !vm::interrupted() => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => {
                    let _ = self.child.kill();
                    break self.child.wait().ok();
                }
            }
        };
        let exited = Instant::now();
        std::thread::sleep(Duration::from_millis(200)); // the reader thread's last lines
        let rel = |i: Instant| i.saturating_duration_since(t0).as_secs_f64();
        let events: Vec<(f64, serde_json::Value)> = self
            .lines
            .lock()
            .expect("watch lines")
            .iter()
            .filter_map(|(i, l)| Some((rel(*i), serde_json::from_str(l).ok()?)))
            .collect();
        let at = |e: &str| events.iter().find(|(_, v)| v["event"] == e);
        let stopped = at("guest-stopped").map(|(_, v)| v.clone());
        HostWatch {
            exit_code: status.and_then(|s| s.code()),
            started_s: at("guest-started").map(|(t, _)| *t),
            stopped_s: at("guest-stopped").map(|(t, _)| *t),
            exited_s: Some(rel(exited)),
            clean: stopped.as_ref().is_some_and(|v| v["clean"] == true),
            stopped,
            writer_cgroup_before: None,
            writer_cgroup_after: None,
            capped_during: None,
            uncapped_after: None,
            stderr: self.stderr(),
            events,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The writer's cgroup from a counter line (`cg=PATH`).
fn cgroup_of(line: &str) -> Option<String> {
    line.strip_prefix("IMMP-LAB-C ")?
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("cg="))
        .map(str::to_string)
}

/// Adds the watcher's account to the run: its caps, and the writer's cgroup before the
/// migration and once the watcher was done (the guest's own lines, timestamped by the host).
pub fn record(run: &mut Run, mut w: HostWatch, lines: &[(f64, String)]) {
    let cg = |from: f64, to: f64| {
        lines
            .iter()
            .filter(|(t, _)| *t > from && *t <= to)
            .filter_map(|(_, l)| cgroup_of(l))
            .next_back()
    };
    w.writer_cgroup_before = cg(f64::NEG_INFINITY, 0.0);
    let end = w.stopped_s.unwrap_or(f64::INFINITY);
    w.capped_during = Some(
        lines
            .iter()
            .filter(|(t, _)| *t > 0.0 && *t <= end)
            .filter_map(|(_, l)| cgroup_of(l))
            .any(|c| c.contains("/immp-")),
    );
    let done = w.exited_s.unwrap_or(f64::INFINITY);
    w.writer_cgroup_after = cg(done, f64::INFINITY);
    w.uncapped_after = match (&w.writer_cgroup_before, &w.writer_cgroup_after) {
        (Some(b), Some(a)) => Some(a == b),
        _ => None,
    };
    let start = w.started_s.unwrap_or(0.0);
    if let Some(caps) = w.stopped.as_ref().and_then(|s| s["caps"].as_array()) {
        for c in caps {
            for p in c["caps_pct"].as_array().into_iter().flatten() {
                if let Some(v) = p.as_f64() {
                    run.caps.push(Point { t: start, v });
                }
            }
        }
    }
    if let Some(t) = w.stopped_s {
        run.caps.push(Point { t, v: 0.0 });
    }
    run.host_watch = Some(w);
}

/// The assertions of `cargo xtask host-test` on one heavy host-triggered run: (name, passed,
/// detail) rows.
pub fn checks(run: &Run) -> Vec<(&'static str, bool, String)> {
    let Some(w) = &run.host_watch else {
        return vec![("watcher", false, "no watcher result".into())];
    };
    let stopped = w.stopped.as_ref();
    vec![
        (
            "converged",
            run.completed,
            format!(
                "{} after {:.1} s (limit {:.0} s)",
                if run.completed {
                    "completed"
                } else {
                    "NOT converged"
                },
                run.total_s,
                run.limit_s
            ),
        ),
        (
            "immp-started",
            w.started_s.is_some(),
            format!("immp started in the guest at {:?} s", w.started_s),
        ),
        (
            "caps-lifted",
            w.clean,
            format!(
                "guest-stopped: {}",
                stopped.map_or("none".into(), |s| s.to_string())
            ),
        ),
        (
            "watcher-exit",
            w.exit_code == Some(0),
            format!("exit {:?}; stderr: {}", w.exit_code, w.stderr),
        ),
        (
            "writer-capped",
            w.capped_during == Some(true),
            "the writer was in an immp cap cgroup during the migration".into(),
        ),
        (
            "writer-uncapped",
            w.uncapped_after == Some(true),
            format!(
                "writer cgroup before {:?}, after {:?}",
                w.writer_cgroup_before, w.writer_cgroup_after
            ),
        ),
    ]
}
