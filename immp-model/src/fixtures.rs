//! Fixed snapshots for tests of the model and of every view (no kernel needed). Public behind
//! the `fixtures` feature so that the views' tests in `immp-user` build the same values.
use crate::snapshot::{Flavour, Health, Mode, ProcSample, Rates, Snapshot, Totals};

/// A live process that dirtied `dirty_pages` new pages per second at `cpu` % of one CPU.
pub fn proc_(pid: u32, dirty_pages: f64, cpu: f64) -> ProcSample {
    ProcSample {
        pid,
        start_time: 1000 + pid as u64,
        comm: format!("p{pid}"),
        cmdline: String::new(),
        rates: Rates {
            write_new: dirty_pages,
            dirty: dirty_pages,
            ..Rates::default()
        },
        dirty_bytes_per_s: dirty_pages * 4096.0,
        cpu_pct: cpu,
        rss_bytes: 0,
        cgroup: "/".into(),
        gone: false,
        exact: false,
        clamped: false,
        young_s: None,
        curve: Vec::new(),
    }
}

/// A one-second bounds-mode snapshot of these processes, totals summed.
pub fn snap(processes: Vec<ProcSample>) -> Snapshot {
    let total: f64 = processes.iter().map(|p| p.dirty_bytes_per_s).sum();
    Snapshot {
        seq: 1,
        time_unix_ms: 0,
        interval_s: 1.0,
        mode: Mode::Bounds,
        probes: Flavour::Btf,
        probes_fallback: None,
        folio_pages_known: true,
        shmem_known: true,
        memory: None,
        page_size: 4096,
        health: Health::default(),
        exact_armed: 0,
        verify: None,
        totals: Totals {
            dirty_bytes_per_s: total,
            dirty_pages_per_s: total / 4096.0,
            ..Totals::default()
        },
        processes,
        agent_pid: None,
        early: false,
    }
}
