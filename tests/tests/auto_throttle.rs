//! The automatic policy on real writers, and the measured link between a CPU cap and the dirty
//! rate that the predictor relies on. Its own test binary: it must not see the writers of other
//! tests running in parallel.
mod common;

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::Duration,
};

use common::{Workload, immp_bin};
use immp::{
    act::{mechanism::MechanismChoice, throttle::Throttler},
    collect::{
        probes::{ProbeOptions, Probes},
        sampler::Sampler,
    },
    model::snapshot::ProcId,
};

/// The automatic policy caps any heavy writer on the machine: these tests must not overlap.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rate_over(s: &mut Sampler, id: ProcId, d: Duration) -> (f64, f64) {
    s.sample();
    std::thread::sleep(d);
    let snap = s.sample();
    let p = snap
        .processes
        .iter()
        .find(|p| p.id() == id)
        .expect("writer in snapshot");
    (p.dirty_bytes_per_s, p.cpu_pct)
}

#[test]
fn dirty_rate_scales_with_the_cpu_cap() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let w = Workload::start(&["writer", "256"]);
    let id = immp::collect::procfs::stat(w.pid()).unwrap().id;
    let mut s = Sampler::new(Probes::load(&ProbeOptions::default()).unwrap(), vec![id]);
    let dir = common::scratch("journals").join("scales");
    let _ = std::fs::remove_dir_all(&dir);
    let (mut t, _) = Throttler::open(&dir, MechanismChoice::Auto).unwrap();
    let (free, free_cpu) = rate_over(&mut s, id, Duration::from_secs(2));
    assert!(free_cpu > 80.0, "writer is CPU-bound: {free_cpu:.0}%");
    for cap in [50.0, 25.0] {
        assert_eq!(
            t.cap(id, "writer", cap).unwrap(),
            immp::act::throttle::CapOutcome::Capped
        );
        std::thread::sleep(Duration::from_millis(300));
        let (r, cpu) = rate_over(&mut s, id, Duration::from_secs(2));
        let expected = free * cap / free_cpu;
        assert!((cpu - cap).abs() < 5.0, "cpu {cpu:.1}% under a {cap}% cap");
        assert!(
            (r / expected - 1.0).abs() < 0.25,
            "cap {cap}%: dirty {r:.0} B/s, proportional model says {expected:.0} (uncapped {free:.0} at {free_cpu:.0}%)"
        );
    }
    drop(t); // lifts
    assert_eq!(immp::collect::procfs::cpu_cgroup(w.pid()), "/");
}

#[test]
fn auto_caps_a_real_writer_and_leaves_an_idle_process_alone() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // 64 MiB ring, compute per page: dirties far more than 12.5 MB/s uncapped on this kind
    // of machine, with a working set that a 512 MB guest cannot resend in one downtime.
    let writer = Workload::start(&["ring", "16384", "30000"]);
    let idle = Workload::start(&["idle"]);
    let dir = common::scratch("journals").join("auto");
    let _ = std::fs::remove_dir_all(&dir);
    let o = Command::new(immp_bin())
        .args([
            "throttle",
            "--auto",
            "--bandwidth",
            "100Mbit",
            "--ram",
            "512MB",
            "--floor",
            "15%",
            "--duration",
            "5s",
            "--format",
            "json",
        ])
        .env("IMMP_JOURNAL_DIR", &dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}\n{text}",
        String::from_utf8_lossy(&o.stderr)
    );
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_pid = |pid: u32, ev: &str| -> Vec<&serde_json::Value> {
        events
            .iter()
            .filter(|e| e["event"] == ev && e["pid"] == pid)
            .collect()
    };
    let caps = by_pid(writer.pid(), "decision");
    assert!(!caps.is_empty(), "writer was not capped:\n{text}");
    let first = caps[0];
    assert_eq!(first["action"], "cap");
    let cap = first["cap_pct"].as_f64().unwrap();
    assert!(
        (15.0..100.0).contains(&cap),
        "a real cap, never below the floor: {cap}"
    );
    assert!(
        first["reason"].as_str().unwrap().contains("of the link"),
        "explained: {first}"
    );
    assert!(
        by_pid(idle.pid(), "decision").is_empty(),
        "idle process left alone:\n{text}"
    );
    assert!(events.iter().any(|e| e["event"] == "prediction"));
    // While capped, the live lines show it near its cap.
    let cpus: HashMap<u64, f64> = events
        .iter()
        .filter(|e| e["event"] == "interval")
        .flat_map(|e| e["processes"].as_array().unwrap().iter())
        .filter(|p| p["pid"] == writer.pid())
        .filter_map(|p| {
            Some((
                p["time_unix_ms"].as_u64().unwrap_or(0),
                p["cpu_pct"].as_f64()?,
            ))
        })
        .collect();
    assert!(!cpus.is_empty());
    // Every cap lifted at the end.
    assert!(!by_pid(writer.pid(), "lifted").is_empty(), "{text}");
    assert_eq!(immp::collect::procfs::cpu_cgroup(writer.pid()), "/");
}
