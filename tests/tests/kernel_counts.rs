//! Real eBPF programs on the running kernel, real child processes with known page counts.
mod common;

use common::{Workload, scratch};
use immp::{
    collect::{
        probes::{FlavourChoice, ProbeOptions, Probes},
        sampler::Sampler,
    },
    model::{
        rank::{RankSettings, rank},
        snapshot::{ProcSample, Snapshot},
    },
};

fn sampler(flavour: FlavourChoice, max_procs: u32) -> Sampler {
    let opts = ProbeOptions {
        flavour,
        max_procs,
        ..ProbeOptions::default()
    };
    let probes = Probes::load(&opts).expect("probes attach");
    Sampler::new(probes, vec![])
}

fn find(snap: &Snapshot, pid: u32) -> &ProcSample {
    snap.processes
        .iter()
        .find(|p| p.pid == pid)
        .unwrap_or_else(|| {
            panic!(
                "pid {pid} not in snapshot ({} processes)",
                snap.processes.len()
            )
        })
}

/// Counts over the snapshot's interval, from its per-second rates.
struct Counts {
    write_new: f64,
    write_protect: f64,
    read: f64,
    pagecache: f64,
    dirty: f64,
}

fn counts(snap: &Snapshot, p: &ProcSample) -> Counts {
    let t = snap.interval_s;
    Counts {
        write_new: p.rates.write_new * t,
        write_protect: p.rates.write_protect * t,
        read: p.rates.read * t,
        pagecache: p.rates.pagecache * t,
        dirty: p.rates.dirty * t,
    }
}

/// Brackets exactly the workload's work between two samples.
fn measure(flavour: FlavourChoice, args: &[&str]) -> (Snapshot, u32, Vec<String>) {
    let mut s = sampler(flavour, 16384);
    let mut w = Workload::start(args);
    s.sample(); // baseline after the workload's own start-up faults
    let lines = w.run();
    let snap = s.sample();
    let pid = w.pid();
    w.finish();
    (snap, pid, lines)
}

fn within(actual: f64, expected: f64, tol: f64) -> bool {
    (actual - expected).abs() <= expected * tol
}

const N: usize = 16384;

fn first_touch(flavour: FlavourChoice) {
    let (snap, pid, _) = measure(flavour, &["first-touch", &N.to_string()]);
    let c = counts(&snap, find(&snap, pid));
    assert!(
        within(c.write_new, N as f64, 0.01),
        "new-page writes {} for {N} pages",
        c.write_new
    );
    assert!(
        c.write_protect < N as f64 * 0.01,
        "write-protect {}",
        c.write_protect
    );
    assert!(within(c.dirty, N as f64, 0.01), "dirty {}", c.dirty);
}

#[test]
fn first_touch_counts_new_pages_btf() {
    first_touch(FlavourChoice::Btf);
}

#[test]
fn first_touch_counts_new_pages_tracepoint_fallback() {
    first_touch(FlavourChoice::Tracepoint);
}

#[test]
fn fork_churn_counts_each_page_once_per_window() {
    // 64 pages rewritten after each of 400 forks: 25 600 write-protect faults on 64 pages.
    let (snap, pid, _) = measure(FlavourChoice::Btf, &["fork-churn", "64", "400"]);
    let p = find(&snap, pid);
    let c = counts(&snap, p);
    let repeats = p.rates.write_repeat * snap.interval_s;
    // The 64 pages, plus the few of its stack and heap that fork and waitpid touch.
    assert!(
        c.dirty >= 64.0 && c.dirty <= 64.0 + 32.0,
        "dirty {} pages for 64 distinct (write-protect {}, repeats {repeats})",
        c.dirty,
        c.write_protect
    );
    assert!(
        repeats > 64.0 * 300.0,
        "the repeats are seen and set apart: {repeats}"
    );
}

#[test]
fn read_scan_counts_reads_not_dirty() {
    let (snap, pid, _) = measure(FlavourChoice::Btf, &["read-scan", &N.to_string()]);
    let c = counts(&snap, find(&snap, pid));
    assert!(within(c.read, N as f64, 0.01), "read faults {}", c.read);
    assert!(
        c.dirty < N as f64 * 0.01,
        "a read-only scan dirtied {}",
        c.dirty
    );
}

#[test]
fn file_write_counts_page_cache_pages_small_and_large_folios() {
    let dir = scratch("file-write");
    for chunk in ["1", "256"] {
        let path = dir.join(format!("f{chunk}"));
        let (snap, pid, _) = measure(
            FlavourChoice::Btf,
            &["file-write", &N.to_string(), path.to_str().unwrap(), chunk],
        );
        let c = counts(&snap, find(&snap, pid));
        assert!(
            within(c.pagecache, N as f64, 0.01),
            "chunk {chunk}: page-cache pages {}",
            c.pagecache
        );
        assert!(
            within(c.dirty, N as f64, 0.01),
            "chunk {chunk}: dirty {}",
            c.dirty
        );
        assert!(
            c.write_new < 100.0,
            "write() takes no faults on the file, got {}",
            c.write_new
        );
        let _ = std::fs::remove_file(path);
    }
}

#[test]
fn shared_file_mapping_counts_each_page_once() {
    let path = scratch("shared-map").join("m");
    let (snap, pid, _) = measure(
        FlavourChoice::Btf,
        &["shared-map", &N.to_string(), path.to_str().unwrap()],
    );
    let c = counts(&snap, find(&snap, pid));
    // Faults are fewer than pages here (whole folios get mapped), page-cache dirtying is not,
    // and a page dirtied inside a write fault must not count twice.
    assert!(
        within(c.dirty, N as f64, 0.02),
        "dirty {} (faults {}, page cache {})",
        c.dirty,
        c.write_new + c.write_protect,
        c.pagecache
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn fork_then_write_counts_copy_on_write_in_child() {
    let (snap, _, lines) = measure(FlavourChoice::Btf, &["cow", &N.to_string()]);
    let child: u32 = lines
        .iter()
        .find_map(|l| l.strip_prefix("child ").and_then(|p| p.parse().ok()))
        .expect("child pid");
    let p = find(&snap, child);
    let c = counts(&snap, p);
    assert!(
        within(c.write_protect, N as f64, 0.01),
        "CoW faults in child {}",
        c.write_protect
    );
    assert!(
        c.write_new < N as f64 * 0.01,
        "child new-page writes {}",
        c.write_new
    );
}

#[test]
fn ranking_follows_dirty_volume() {
    let mut s = sampler(FlavourChoice::Btf, 16384);
    let sizes = [2000usize, 32000, 8000];
    let mut ws: Vec<Workload> = sizes
        .iter()
        .map(|n| Workload::start(&["first-touch", &n.to_string()]))
        .collect();
    s.sample();
    for w in &mut ws {
        w.run();
    }
    let snap = s.sample();
    let pids: Vec<u32> = ws.iter().map(Workload::pid).collect();
    let r = rank(&snap, &RankSettings::default());
    let order: Vec<u32> = r
        .processes
        .iter()
        .map(|p| p.proc_.pid)
        .filter(|p| pids.contains(p))
        .collect();
    assert_eq!(order, vec![pids[1], pids[2], pids[0]]);
    for w in ws {
        w.finish();
    }
}

#[test]
fn process_storm_neither_breaks_sampling_nor_leaks_entries() {
    let mut s = sampler(FlavourChoice::Btf, 16384);
    let mut w = Workload::start(&["storm", "3000"]);
    let before = s.sample();
    let k0 = before.health.kernel;
    w.run();
    let mid = s.sample();
    w.finish();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let after = s.sample();
    let k1 = after.health.kernel;
    assert!(
        k1.exits_sent - k0.exits_sent >= 3000,
        "exits seen {}",
        k1.exits_sent - k0.exits_sent
    );
    assert_eq!(k1.exit_lost, 0, "exit events lost");
    assert_eq!(k1.map_full, 0);
    // Entries are reaped at exit: the table is not 3000 entries bigger.
    assert!(
        after.health.tracked < before.health.tracked + 100,
        "tracked {} -> {}",
        before.health.tracked,
        after.health.tracked
    );
    // The children's pages were counted (4 each) even though none lived to be sampled.
    assert!(
        mid.totals.dirty_pages_per_s * mid.interval_s >= 3000.0 * 4.0,
        "total dirty {}",
        mid.totals.dirty_pages_per_s * mid.interval_s
    );
}

#[test]
fn full_table_is_reported_not_silent() {
    let mut s = sampler(FlavourChoice::Btf, 4);
    let mut ws: Vec<Workload> = (0..12)
        .map(|_| Workload::start(&["first-touch", "64"]))
        .collect();
    for w in &mut ws {
        w.run();
    }
    let snap = s.sample();
    assert!(
        snap.health.map_full > 0,
        "a 4-entry table with 12+ processes must report overflow"
    );
    assert!(snap.health.tracked <= 4);
    for w in ws {
        w.finish();
    }
}

/// Pages of a tmpfs/memfd file written through each write-family call, twice over within one
/// window with new bytes: the shmem class counts each page once (the writer never faults on
/// them, so no other class sees them).
fn shmem_writes(flavour: FlavourChoice) {
    const PAGES: usize = 256;
    assert_eq!(
        fs_magic("/dev/shm"),
        0x0102_1994,
        "/dev/shm is a tmpfs here"
    );
    let calls = [
        "write",
        "pwrite",
        "writev",
        "pwritev",
        "sendfile",
        "splice",
        "copy_file_range",
    ];
    let mut failures = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        let path = if i % 2 == 0 {
            format!("/dev/shm/immp-test-{}-{call}", std::process::id())
        } else {
            "memfd".to_string()
        };
        let (snap, pid, _) = measure(
            flavour,
            &["shmem-write", &PAGES.to_string(), &path, call, "2"],
        );
        let _ = std::fs::remove_file(&path);
        let p = find(&snap, pid);
        let shmem = p.rates.shmem * snap.interval_s;
        if !within(shmem, PAGES as f64, 0.01) {
            failures.push(format!("{call} into {path}: {shmem:.0} shmem pages"));
        }
    }
    assert!(
        failures.is_empty(),
        "{PAGES} pages written twice each, expected {PAGES} shmem pages: {failures:?}"
    );
}

fn fs_magic(path: &str) -> i64 {
    let c = std::ffi::CString::new(path).expect("path");
    // SAFETY: statfs fills a zeroed struct we own.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::statfs(c.as_ptr(), &mut s) },
        0,
        "statfs {path}"
    );
    s.f_type as i64
}

#[test]
fn shmem_writes_count_each_page_once_per_window_btf() {
    shmem_writes(FlavourChoice::Btf);
}

#[test]
fn shmem_writes_count_each_page_once_per_window_tracepoint_fallback() {
    shmem_writes(FlavourChoice::Tracepoint);
}

/// One call larger than the kernel side's per-call check still counts every page (never
/// fewer than were written), and writes to an ordinary file are not shmem.
#[test]
fn one_large_shmem_write_counts_all_its_pages_and_disk_files_are_not_shmem() {
    const PAGES: usize = 1024;
    let path = format!("/dev/shm/immp-test-{}-once", std::process::id());
    let (snap, pid, _) = measure(
        FlavourChoice::Btf,
        &["shmem-write", &PAGES.to_string(), &path, "write-once", "1"],
    );
    let _ = std::fs::remove_file(&path);
    let shmem = find(&snap, pid).rates.shmem * snap.interval_s;
    assert!(
        within(shmem, PAGES as f64, 0.01),
        "one pwrite of {PAGES} pages: {shmem:.0} shmem pages"
    );
    let dir = scratch("not-shmem");
    let disk = dir.join("file");
    assert_ne!(fs_magic(dir.to_str().expect("utf-8")), 0x0102_1994);
    let (snap, pid, _) = measure(
        FlavourChoice::Btf,
        &[
            "shmem-write",
            "256",
            disk.to_str().expect("utf-8"),
            "pwrite",
            "1",
        ],
    );
    let shmem = find(&snap, pid).rates.shmem * snap.interval_s;
    assert!(shmem < 1.0, "pwrite to a disk file: {shmem:.0} shmem pages");
}

/// A file rewritten and fdatasync'd twice within one window (written back in between, so its
/// pages go clean -> dirty twice): one page to resend each, counted once, in both flavours.
#[test]
fn page_cache_rewritten_after_writeback_counts_once_per_window() {
    const PAGES: usize = 256;
    let dir = scratch("pagecache-twice");
    assert_ne!(
        fs_magic(dir.to_str().expect("utf-8")),
        0x0102_1994,
        "a disk filesystem"
    );
    for flavour in [FlavourChoice::Btf, FlavourChoice::Tracepoint] {
        let file = dir.join(format!("{flavour:?}"));
        let (snap, pid, _) = measure(
            flavour,
            &[
                "shmem-write",
                &PAGES.to_string(),
                file.to_str().expect("utf-8"),
                "pwrite-sync",
                "2",
            ],
        );
        let cache = find(&snap, pid).rates.pagecache * snap.interval_s;
        assert!(
            within(cache, PAGES as f64, 0.02),
            "{flavour:?}: {cache:.0} page-cache pages for {PAGES} written twice"
        );
    }
}

/// An allocator's churn: the same 256 pages mapped, written and unmapped 8 times within one
/// window fault in at the same addresses, on pages the kernel mostly hands straight back: the
/// hypervisor sees them about once, so they count once (the rest are repeats).
#[test]
fn map_touch_unmap_churn_counts_its_pages_once_per_window() {
    const PAGES: usize = 256;
    let (snap, pid, _) = measure(FlavourChoice::Btf, &["churn-once", &PAGES.to_string(), "8"]);
    let p = find(&snap, pid);
    let c = counts(&snap, p);
    let repeats = p.rates.write_repeat * snap.interval_s;
    assert!(
        within(c.write_new, PAGES as f64, 0.05),
        "{:.0} new pages for {PAGES} pages churned 8 times",
        c.write_new
    );
    assert!(
        within(repeats, 7.0 * PAGES as f64, 0.05),
        "{repeats:.0} repeats"
    );
}
