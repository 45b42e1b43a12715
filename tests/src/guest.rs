//! Tests that need a kernel with soft-dirty: run inside the QEMU guest by `cargo xtask vm-test`
//! (its /init calls this). Each test prints one line:
//!     IMMP-RESULT <name> PASS|FAIL <detail>
//! and the host turns them into a table. Usage: immp-guest [TEST ...] (default: all).
use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use immp::{
    collect::{
        probes::{ProbeOptions, Probes},
        sampler::{ModeChoice, Sampler, SamplerOptions},
    },
    model::{
        rank::{RankSettings, rank},
        snapshot::{ProcId, ProcSample, Snapshot},
    },
};

#[allow(dead_code)]
#[path = "ctl.rs"]
mod ctl;
use ctl::Workload;

const WORKLOAD: &str = "/bin/immp-workload";
const IMMP: &str = "/bin/immp";

type Outcome = Result<String, String>;

fn start(args: &[&str]) -> Workload {
    Workload::start_bin(WORKLOAD, args)
}

fn sampler(mode: ModeChoice, watch: Vec<ProcId>, verify: Option<ProcId>) -> Sampler {
    let probes = Probes::load(&ProbeOptions::default()).expect("probes attach");
    Sampler::with_options(
        probes,
        watch,
        &SamplerOptions {
            mode,
            exact_max: 64,
            verify,
        },
    )
    .expect("sampler")
}

fn id(w: &Workload) -> ProcId {
    immp::collect::procfs::stat(w.pid())
        .expect("workload alive")
        .id
}

/// The process's sample in a snapshot.
fn find(s: &Snapshot, pid: u32) -> Result<&ProcSample, String> {
    s.processes
        .iter()
        .find(|p| p.pid == pid)
        .ok_or_else(|| format!("PID {pid} not in the snapshot"))
}

/// Distinct pages dirtied by `pid` in the snapshot's window.
fn pages(s: &Snapshot, pid: u32) -> f64 {
    s.processes
        .iter()
        .find(|p| p.pid == pid)
        .map_or(0.0, |p| p.rates.dirty * s.interval_s)
}

fn within(actual: f64, expected: f64, tol: f64) -> bool {
    (actual - expected).abs() <= expected * tol
}

fn check(ok: bool, detail: String) -> Outcome {
    if ok { Ok(detail) } else { Err(detail) }
}

/// A process rewriting the same N pages: fault counting sees ~0, exact mode sees N per window.
fn rewrite_exact() -> Outcome {
    const N: f64 = 4096.0;
    let w = start(&["paced", "4096", "100"]);
    let me = id(&w);
    std::thread::sleep(Duration::from_millis(500)); // first pass (new pages) done
    let bounds = {
        let mut s = sampler(ModeChoice::Bounds, vec![me], None);
        s.sample();
        std::thread::sleep(Duration::from_secs(1));
        pages(&s.sample(), me.pid)
    };
    let mut s = sampler(ModeChoice::Exact, vec![me], None);
    // One window of warm-up: loading the probes just now took the single vCPU for a while,
    // and a writer that got no CPU for part of a window really did dirty fewer pages.
    s.sample();
    std::thread::sleep(Duration::from_secs(1));
    s.sample();
    let mut windows = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        let snap = s.sample();
        let p = find(&snap, me.pid)?;
        if !p.exact {
            return Err("sample not marked exact".into());
        }
        windows.push(pages(&snap, me.pid));
    }
    let ok = windows.iter().all(|&x| within(x, N, 0.01)) && bounds < N * 0.01;
    check(
        ok,
        format!("exact windows {windows:?} for {N} pages; fault counting alone {bounds:.0}"),
    )
}

fn first_touch() -> Outcome {
    const N: usize = 16384;
    let mut w = start(&["first-touch", &N.to_string()]);
    let mut s = sampler(ModeChoice::Exact, vec![], None);
    s.sample();
    w.run();
    let snap = s.sample();
    let got = pages(&snap, w.pid());
    check(
        within(got, N as f64, 0.01),
        format!("{got:.0} pages for {N}"),
    )
}

fn file_write() -> Outcome {
    const N: usize = 8192;
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts.lines().any(|l| l.contains(" /mnt ext")) {
        return Err("no ext2 file system on /mnt".into());
    }
    let mut w = start(&["file-write", &N.to_string(), "/mnt/f", "16"]);
    let mut s = sampler(ModeChoice::Exact, vec![], None);
    s.sample();
    w.run();
    let snap = s.sample();
    let p = find(&snap, w.pid())?;
    let pc = p.rates.pagecache * snap.interval_s;
    check(
        within(pc, N as f64, 0.01),
        format!("{pc:.0} page-cache pages for {N} (ext2 on a RAM disk)"),
    )
}

fn mixed_rank() -> Outcome {
    let ws: Vec<Workload> = ["1024", "4096", "2048"]
        .iter()
        .map(|n| start(&["paced", n, "100"]))
        .collect();
    let ids: Vec<ProcId> = ws.iter().map(id).collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut s = sampler(ModeChoice::Exact, ids.clone(), None);
    s.sample();
    std::thread::sleep(Duration::from_secs(1));
    s.sample(); // warm-up window (see rewrite_exact)
    std::thread::sleep(Duration::from_secs(1));
    let snap = s.sample();
    let r = rank(&snap, &RankSettings::default());
    let order: Vec<u32> = r
        .processes
        .iter()
        .map(|p| p.proc_.pid)
        .filter(|p| ids.iter().any(|i| i.pid == *p))
        .collect();
    let want = vec![ids[1].pid, ids[2].pid, ids[0].pid];
    let counts: Vec<f64> = ids.iter().map(|i| pages(&snap, i.pid)).collect();
    let exact = counts
        .iter()
        .zip([1024.0, 4096.0, 2048.0])
        .all(|(c, n)| within(*c, n, 0.01));
    check(
        order == want && exact,
        format!("order {order:?} (want {want:?}), pages {counts:?} for 1024/4096/2048"),
    )
}

fn verify_pagemap() -> Outcome {
    // Rewrites the same 3000 pages every 100 ms: 3000 distinct pages (and a few of its stack)
    // in any 1 s window, whichever side counts them.
    const WRITTEN: f64 = 3000.0;
    let w = start(&["paced", "3000", "100"]);
    let me = id(&w);
    std::thread::sleep(Duration::from_millis(500));
    let mut s = sampler(ModeChoice::Exact, vec![me], Some(me));
    s.sample();
    let mut pairs = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        let v = s.sample().verify.ok_or("no verify result")?;
        pairs.push((v.counted_pages, v.soft_dirty_pages));
    }
    // Which side drifted from what was written, window by window.
    let drift: Vec<String> = pairs
        .iter()
        .filter(|(c, sd)| !within(*c as f64, *sd as f64, 0.01))
        .map(|(c, sd)| {
            let (dc, ds) = ((*c as f64 - WRITTEN).abs(), (*sd as f64 - WRITTEN).abs());
            let side = if dc > ds { "the count" } else { "pagemap" };
            format!("{c} vs {sd}: {side} drifted from the {WRITTEN} written")
        })
        .collect();
    check(
        drift.is_empty(),
        format!(
            "(counted, pagemap soft-dirty) per window: {pairs:?} {}",
            drift.join("; ")
        ),
    )
}

/// A process with transparent huge pages is reported as a lower bound, not as exact.
fn thp_flagged() -> Outcome {
    // The kernel turns THP off on guests under 512 MiB; turn it on for this test only.
    const THP: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
    std::fs::write(THP, "always").map_err(|e| format!("enabling THP: {e}"))?;
    let r = thp_flagged_inner();
    let _ = std::fs::write(THP, "never");
    r
}

fn thp_flagged_inner() -> Outcome {
    let w = start(&["rewrite", "4096"]); // 16 MiB, THP-eligible
    let me = id(&w);
    std::thread::sleep(Duration::from_millis(800));
    let huge = immp::collect::procfs::anon_huge_bytes(me.pid);
    let mut s = sampler(ModeChoice::Exact, vec![me], None);
    s.sample();
    std::thread::sleep(Duration::from_secs(1));
    let snap = s.sample();
    let p = find(&snap, me.pid)?;
    check(
        huge > 0 && !p.exact,
        format!("AnonHugePages {huge} B, marked exact: {}", p.exact),
    )
}

/// The guest's total dirty rate while the host asks QEMU for its own (calc-dirty-rate).
fn qemu_rate() -> Outcome {
    // 20 MiB of distinct pages rewritten every 200 ms: 20 MiB per 1 s window.
    let _w = start(&["paced", "5120", "200"]);
    std::thread::sleep(Duration::from_millis(500));
    let mut s = sampler(ModeChoice::Exact, vec![], None);
    s.sample();
    say("IMMP-QMP-START");
    let end = Instant::now() + Duration::from_secs(14);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(1));
        let snap = s.sample();
        // The guest's whole rate as immp estimates it: what processes dirtied plus the kernel
        // allocations no process explains (QEMU sees both).
        say(&format!(
            "IMMP-RATE {:.0}",
            snap.totals.guest_dirty_bytes_per_s
        ));
    }
    say("IMMP-QMP-END");
    Ok("guest rates printed; the host compares them with QEMU".into())
}

/// One class of writer in the fidelity matrix: what runs, and which process names are the
/// workload's (children inherit the name; `forks`: short-lived children too small for a row
/// of their own are in `short_lived_dirty_pages_per_s`, which nothing else adds to here).
struct Class {
    name: &'static str,
    /// Commands started in order, each up to its `ready` line; the first is watched.
    run: &'static [&'static [&'static str]],
    names: &'static [&'static str],
    forks: bool,
}

/// Every writer changes the bytes it writes each time (QEMU's page sampling compares page
/// hashes) and is paced, so that a 1 s window sees a steady number of distinct pages: about
/// 16 MiB (4096 pages) where the class allows, which QEMU's sampling resolves to ~6 %.
const CLASSES: &[Class] = &[
    // 4096 pages rewritten 4 times a window: exact mode must count each page once.
    Class {
        name: "rewriter",
        run: &[&[WORKLOAD, "rename", "fid-rewriter", "paced", "4096", "250"]],
        names: &["fid-rewriter"],
        forks: false,
    },
    // 4096 first touches a second through a 64 MiB ring (never a page twice per window).
    Class {
        name: "streamer",
        run: &[&[
            WORKLOAD,
            "rename",
            "fid-streamer",
            "stream",
            "4096",
            "16384",
        ]],
        names: &["fid-streamer"],
        forks: false,
    },
    // 4 MiB mapped, written and unmapped 4 times a window: the kernel hands the same
    // physical pages back, so the hypervisor sees about 1024 pages, not 4096.
    Class {
        name: "churner",
        run: &[&[WORKLOAD, "rename", "fid-churner", "churn", "1024", "250"]],
        names: &["fid-churner"],
        forks: false,
    },
    // 256 pages rewritten between forks, 100 forks a second.
    Class {
        name: "fork",
        run: &[&[WORKLOAD, "rename", "fid-fork", "fork-loop", "256", "10"]],
        names: &["fid-fork"],
        forks: true,
    },
    // A shell loop: /bin/true forked and executed, usleep forked (busybox runs it in a
    // forked copy of the shell), 100 times a second at most.
    Class {
        name: "fork-exec",
        run: &[&[
            "/bin/sh",
            "-c",
            "echo ready; while :; do /bin/true; usleep 10000; done",
        ]],
        names: &["sh", "true"],
        forks: true,
    },
    // pwrite() into a tmpfs file, 4096 pages 4 times a window (shmem: no fault, no
    // writeback).
    Class {
        name: "tmpfs",
        run: &[&[
            WORKLOAD,
            "rename",
            "fid-tmpfs",
            "pwrite-loop",
            FID_SHM,
            "4096",
            "250",
            "0",
        ]],
        names: &["fid-tmpfs"],
        forks: false,
    },
    // pwrite() + fdatasync() of 4096 pages twice a window, as a database would, on ext2 on
    // the virtio disk: writeback reads the page cache (QEMU's DMA dirties no guest page).
    // On the RAM disk instead, brd would copy each page into pages of its own that QEMU
    // sees too, and no process is charged for: twice the page cache the writer dirtied.
    Class {
        name: "pagecache",
        run: &[&[
            WORKLOAD,
            "rename",
            "fid-pagecache",
            "pwrite-loop",
            FID_FILE,
            "4096",
            "500",
            "1",
        ]],
        names: &["fid-pagecache"],
        forks: false,
    },
    // A MAP_SHARED mapping of a file on the same disk, 4096 pages written then msync()ed
    // twice a window (each msync cleans them: the next pass faults again).
    Class {
        name: "shared-map",
        run: &[&[
            WORKLOAD,
            "rename",
            "fid-shared-map",
            "map-loop",
            FID_MAP,
            "4096",
            "500",
        ]],
        names: &["fid-shared-map"],
        forks: false,
    },
    // 16 MiB a second over TCP on the loopback into a 64 MiB ring; attributed to the
    // receiver only (the sender rewrites one 16-page buffer). The kernel's socket buffers,
    // no process's, add about 1 MB/s: QEMU saw 17.8-18.9 MB/s with no immp loaded.
    Class {
        name: "socket",
        run: &[
            &[WORKLOAD, "rename", "fid-recv", "recv-ring", "7777", "16384"],
            &[
                WORKLOAD,
                "rename",
                "fid-send",
                "send-loop",
                "7777",
                "410",
                "100",
            ],
        ],
        names: &["fid-recv"],
        forks: false,
    },
    // No workload: immp (this process's sampler) alone against the idle guest.
    Class {
        name: "immp-alone",
        run: &[],
        names: &[],
        forks: false,
    },
];

const FID_SHM: &str = "/dev/shm/fidelity";
const FID_FILE: &str = "/disk/fidelity-pagecache";
const FID_MAP: &str = "/disk/fidelity-shared-map";
/// Windows before a class is measured (first passes allocate; a new process gets armed),
/// and windows measured.
const FID_WARM: usize = 2;
/// Classes also measured without immp loaded (see `fidelity`).
const FID_BARE: &[&str] = &["rewriter", "shared-map", "socket"];
const FID_WINDOWS: usize = 7;

/// The fidelity matrix, guest half: per class, immp's rate for the workload and its guest
/// total every 1 s window, between `IMMP-FID-BEGIN class` and `IMMP-FID-END class`, while the
/// host runs QEMU's calc-dirty-rate over the same phase; the host judges (it has QEMU's
/// figures). An idle phase (no sampler yet) comes first, then immp alone: the baselines.
fn fidelity() -> Outcome {
    fidelity_ready()?;
    let names: Vec<&str> = CLASSES.iter().map(|c| c.name).collect();
    say(&format!("IMMP-FID-CLASSES {}", names.join(",")));
    say("IMMP-FID-BEGIN idle");
    std::thread::sleep(Duration::from_secs(FID_WINDOWS as u64));
    say("IMMP-FID-END idle");
    // Some classes once more without immp loaded, for the host to show what immp's own
    // measuring (soft-dirty re-arming, the fault probes' maps) adds to what QEMU sees.
    for c in CLASSES.iter().filter(|c| FID_BARE.contains(&c.name)) {
        fidelity_bare(c);
    }
    let mut s = sampler(ModeChoice::Exact, vec![], None);
    // immp alone first: it is the baseline of every class with a workload.
    let order = CLASSES
        .iter()
        .rev()
        .take(1)
        .chain(&CLASSES[..CLASSES.len() - 1]);
    for c in order {
        fidelity_class(&mut s, c)?;
    }
    Ok(format!(
        "{} classes measured; the host judges them against QEMU",
        CLASSES.len()
    ))
}

/// What the classes need from /init: a tmpfs on /dev/shm, ext2 on the virtio disk on /disk,
/// the loopback up. Missing is a failure, never a skip.
fn fidelity_ready() -> Result<(), String> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let has = |dev: &str, at: &str, fs: &str| {
        mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[0] == dev && f[1] == at && f[2] == fs
        })
    };
    if !has("/dev/vda", "/disk", "ext2") {
        return Err("no ext2 on the virtio disk /dev/vda at /disk".into());
    }
    if !mounts.lines().any(|l| l.contains(" /dev/shm tmpfs ")) {
        return Err("no tmpfs on /dev/shm".into());
    }
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .map(drop)
        .map_err(|e| format!("loopback: {e}"))
}

/// A class's workload in phase `CLASS-bare`, with no sampler (QEMU's figure only).
fn fidelity_bare(c: &Class) {
    let ws: Vec<Workload> = c
        .run
        .iter()
        .map(|cmd| Workload::start_bin(cmd[0], &cmd[1..]))
        .collect();
    std::thread::sleep(Duration::from_secs(FID_WARM as u64));
    say(&format!("IMMP-FID-BEGIN {}-bare", c.name));
    std::thread::sleep(Duration::from_secs(FID_WINDOWS as u64));
    say(&format!("IMMP-FID-END {}-bare", c.name));
    std::thread::sleep(Duration::from_millis(500)); // as in fidelity_class
    drop(ws);
    fidelity_cleanup();
}

fn fidelity_cleanup() {
    for f in [FID_SHM, FID_FILE, FID_MAP] {
        let _ = std::fs::remove_file(f);
    }
}

fn fidelity_class(s: &mut Sampler, c: &Class) -> Result<(), String> {
    let ws: Vec<Workload> = c
        .run
        .iter()
        .map(|cmd| Workload::start_bin(cmd[0], &cmd[1..]))
        .collect();
    let root = ws.first().map(id);
    if let Some(r) = root {
        s.watch(r); // armed every window from the first
    }
    for _ in 0..FID_WARM {
        std::thread::sleep(Duration::from_secs(1));
        s.sample();
    }
    say(&format!("IMMP-FID-BEGIN {}", c.name));
    for _ in 0..FID_WINDOWS {
        std::thread::sleep(Duration::from_secs(1));
        let snap = s.sample();
        let t = &snap.totals;
        let work = if c.run.is_empty() {
            t.agent_dirty_bytes_per_s
        } else {
            workload_bytes(&snap, c)
        };
        say(&format!(
            "IMMP-FID-W {} work={work:.0} total={:.0} agent={:.0} unattributed={:.0}",
            c.name,
            t.guest_dirty_bytes_per_s,
            t.agent_dirty_bytes_per_s,
            t.unattributed_bytes_per_s
        ));
    }
    say(&format!("IMMP-FID-END {}", c.name));
    // The host keeps only QEMU windows that ended before it saw END: keep the workload
    // running a little longer, so that none of them saw it stop.
    std::thread::sleep(Duration::from_millis(500));
    if let Some(r) = root {
        s.unwatch(r);
    }
    drop(ws);
    fidelity_cleanup();
    // The processes' exits and the files' pages freed belong to no window measured.
    s.sample();
    Ok(())
}

/// immp's rate for a class's processes: its named rows plus, where it forks, the children
/// too short-lived for a row.
fn workload_bytes(snap: &Snapshot, c: &Class) -> f64 {
    let named: f64 = snap
        .processes
        .iter()
        .filter(|p| c.names.contains(&p.comm.as_str()))
        .map(|p| p.rates.dirty)
        .sum();
    let short = if c.forks {
        snap.totals.short_lived_dirty_pages_per_s
    } else {
        0.0
    };
    (named + short) * snap.page_size as f64
}

fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn share_over(pid: u32, d: Duration) -> f64 {
    let (t0, c0) = (Instant::now(), cpu_ns(pid));
    std::thread::sleep(d);
    (cpu_ns(pid) - c0) as f64 / t0.elapsed().as_nanos() as f64 * 100.0
}

/// cgroup v2 `cpu.max`: a process sharing its cgroup moves to a sibling; one alone in its
/// cgroup is capped in place; SIGKILL + `immp restore` puts both back.
fn throttle_v2() -> Outcome {
    let shared = start(&["burn"]);
    let alone = start(&["burn"]);
    std::fs::create_dir_all("/sys/fs/cgroup/svc").map_err(|e| e.to_string())?;
    std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+cpu")
        .map_err(|e| format!("+cpu: {e}"))?;
    std::fs::write("/sys/fs/cgroup/svc/cgroup.procs", alone.pid().to_string())
        .map_err(|e| e.to_string())?;
    let before = (cgroup_of(shared.pid()), cgroup_of(alone.pid()));
    let mut c = Command::new(IMMP)
        .args([
            "throttle",
            "--pid",
            &shared.pid().to_string(),
            "--pid",
            &alone.pid().to_string(),
            "--cap",
            "20%",
            "--format",
            "json",
        ])
        .env("IMMP_JOURNAL_DIR", "/tmp/journal")
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_secs(2));
    // immp starts slowly under TCG (kernel BTF parsing): wait for its caps.
    let t = Instant::now();
    while !(cgroup_of(shared.pid()).contains("/immp-")
        && std::fs::read_to_string("/sys/fs/cgroup/svc/cpu.max")
            .is_ok_and(|s| s.starts_with("20000")))
        && t.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let capped = (cgroup_of(shared.pid()), cgroup_of(alone.pid()));
    let cpu_max = std::fs::read_to_string("/sys/fs/cgroup/svc/cpu.max")
        .unwrap_or_default()
        .trim()
        .to_string();
    let shared_share = share_over(shared.pid(), Duration::from_secs(3));
    let alone_share = share_over(alone.pid(), Duration::from_secs(3));
    let _ = c.kill();
    let _ = c.wait();
    let restore = Command::new(IMMP)
        .args(["restore"])
        .env("IMMP_JOURNAL_DIR", "/tmp/journal")
        .output()
        .map_err(|e| e.to_string())?;
    let after = (cgroup_of(shared.pid()), cgroup_of(alone.pid()));
    let cpu_max_after = std::fs::read_to_string("/sys/fs/cgroup/svc/cpu.max")
        .unwrap_or_default()
        .trim()
        .to_string();
    let ok = capped.0.contains("/immp-")
        && capped.1 == before.1
        && cpu_max == "20000 100000"
        && (shared_share - 20.0).abs() <= 3.0
        && (alone_share - 20.0).abs() <= 3.0
        && restore.status.success()
        && after == before
        && cpu_max_after == "max 100000";
    check(
        ok,
        format!(
            "sibling {} / in place {} (cpu.max {cpu_max} -> {cpu_max_after}), shares {:.1}% / {alone_share:.1}%, after SIGKILL+restore {:?}",
            capped.0, capped.1, shared_share, after
        ),
    )
}

fn kcore() -> Result<immp::collect::nonzero::Kcore, String> {
    immp::collect::nonzero::Kcore::open().map_err(|e| format!("/proc/kcore: {e}"))
}

/// Round 0 from /proc/kcore. The 4096-page sample against a read of every page (within 3 %
/// of RAM: 4 standard errors); then a 64 MiB tmpfs file of changing bytes, written through a
/// 64 KiB buffer, and deleted: memory in use drops by 64 MiB, the non-zero count does not, as
/// the hypervisor would see it (freed pages keep their bytes and are sent).
fn round_zero() -> Outcome {
    use immp::collect::procfs::mem_used;
    let k = kcore()?;
    let full = || k.full_scan().map_err(|e| e.to_string());
    let full0 = full()?;
    let t = Instant::now();
    let sampled = k.estimate(4096, 7).map_err(|e| e.to_string())?.bytes;
    let sample_ms = t.elapsed().as_secs_f64() * 1e3;
    let used0 = mem_used();
    // From one 64 KiB buffer, refilled each time: the only new non-zero pages are the file's.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 64 << 10];
    let mut f = std::fs::File::create("/tmp/round-zero").map_err(|e| e.to_string())?;
    for _ in 0..1024 {
        for b in &mut buf {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8 | 1;
        }
        f.write_all(&buf).map_err(|e| e.to_string())?;
    }
    drop(f);
    let (full_mid, used_mid) = (full()?, mem_used());
    std::fs::remove_file("/tmp/round-zero").map_err(|e| e.to_string())?;
    // Freed pages reach the free lists in batches: let them settle before reading MemFree.
    std::thread::sleep(Duration::from_secs(1));
    let (full1, used1) = (full()?, mem_used());
    let mib = |b: f64| b / 1048576.0;
    let ram = mib(k.ram_bytes() as f64);
    // Deleting the file frees 64 MiB (in use drops) but leaves its bytes: non-zero stays.
    check(
        (mib(sampled - full0)).abs() <= 0.03 * ram
            // In use falls by most of the file (on 6.12 other allocations meanwhile took up
            // to a third back: 39 of 64 MiB measured), while non-zero stays where it was.
            && mib(used_mid - used1) >= 0.5 * 64.0
            && mib(full_mid - full1) <= 4.0
            && full_mid >= full0,
        format!(
            "RAM {ram:.0} MiB; non-zero {:.0} MiB (sampled {:.0} in {sample_ms:.0} ms); with a \
             64 MiB tmpfs file {:.0} MiB, deleted {:.0} MiB; in use {:.0} -> {:.0} -> {:.0} MiB",
            mib(full0),
            mib(sampled),
            mib(full_mid),
            mib(full1),
            mib(used0),
            mib(used_mid),
            mib(used1)
        ),
    )
}

/// What running immp adds to round 0 of a migration: the guest's non-zero memory (a full
/// /proc/kcore scan) before and after a 3 s `immp profile` (start-up, probes loaded, three
/// intervals, exit). Runs first in a fresh guest: pages other tests freed would be reused
/// and hide it. Goal 10 MB (it was 27 MB while immp parsed the kernel BTF).
fn own_footprint() -> Outcome {
    let k = kcore()?;
    let scan = || k.full_scan().map_err(|e| e.to_string());
    let before = scan()?;
    let t = Instant::now();
    let o = Command::new(IMMP)
        .args(["profile", "--duration", "3s", "--format", "json"])
        .env("IMMP_JOURNAL_DIR", "/tmp/journal")
        .output()
        .map_err(|e| e.to_string())?;
    let took = t.elapsed().as_secs_f64();
    let after = scan()?;
    let mb = (after - before) / 1e6;
    check(
        o.status.success() && mb < 10.0,
        format!("immp profile 3s ({took:.1}s): round 0 grew by {mb:.1} MB"),
    )
}

/// `cargo xtask vm-test footprint-parts`: round-0 growth of several immp commands, one after
/// the other, to see where immp's own footprint comes from.
fn footprint_parts() -> Outcome {
    let k = kcore()?;
    let scan = || k.full_scan().unwrap_or(f64::NAN);
    let runs: [&[&str]; 5] = [
        &["restore"],
        &["profile", "--probes", "tracepoint", "--duration", "3s"],
        &["profile", "--probes", "tracepoint", "--duration", "3s"],
        &["profile", "--duration", "3s"],
        &["profile", "--duration", "3s"],
    ];
    let mut out = Vec::new();
    for args in runs {
        let before = scan();
        let o = Command::new(IMMP)
            .args(args)
            .env("IMMP_JOURNAL_DIR", "/tmp/journal")
            .stdout(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        let mb = (scan() - before) / 1e6;
        out.push(format!("{} {}: {mb:+.1} MB", args.join(" "), o.status));
    }
    Ok(out.join("; "))
}

fn doctor() -> Outcome {
    let o = Command::new(IMMP)
        .args(["doctor", "--format", "json"])
        .output()
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
    let field = |n: &str, f: &str| {
        v["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == n))
            .and_then(|c| c[f].as_str())
            .unwrap_or("")
            .to_string()
    };
    // A probe flavour is "ok" only when its fault self-test and its shmem self-test (64
    // pages of a memfd written twice: 64 counted, at most 8 more on a busy machine) both pass.
    let names = [
        "soft-dirty",
        "probes-btf",
        "probes-tracepoint",
        "cgroup-v2-cpu",
    ];
    let got = names.map(|n| field(n, "status"));
    // A failure says why: the detail of each of these that is not ok (the self-tests' counts).
    let why: Vec<String> = names
        .iter()
        .zip(&got)
        .filter(|(_, s)| *s != "ok")
        .map(|(n, _)| format!("{n}: {}", field(n, "detail")))
        .collect();
    check(
        got.iter().all(|s| s == "ok"),
        format!(
            "soft-dirty {}, probes-btf {}, probes-tracepoint {}, cgroup-v2-cpu {}{}",
            got[0],
            got[1],
            got[2],
            got[3],
            if why.is_empty() {
                String::new()
            } else {
                format!(" ({})", why.join("; "))
            }
        ),
    )
}

/// `cargo xtask bench exact`: what exact mode costs. Prints IMMP-BENCH lines.
fn bench_exact() -> Outcome {
    // 1. Re-arm cost per GiB of RSS: clear_refs on a process with 256 MiB resident.
    let big = start(&["first-touch", "65536"]);
    let mut big = big;
    big.run();
    let rss = immp::collect::procfs::stat(big.pid()).map_or(0, |s| s.rss_bytes) as f64;
    let mut t = Vec::new();
    for _ in 0..9 {
        let t0 = Instant::now();
        immp::collect::softdirty::clear_refs(big.pid()).map_err(|e| e.to_string())?;
        t.push(t0.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    let per_gib = t[4] / (rss / 1073741824.0);
    say(&format!(
        "IMMP-BENCH rearm rss_mib={:.0} median_ms={:.2} ms_per_gib={:.1}",
        rss / 1048576.0,
        t[4] * 1e3,
        per_gib * 1e3
    ));
    drop(big);
    // 2. Slowdown of writers under 1 s windows, interleaved rounds. One sampler, loaded once
    // (probe loading is a start-up cost, not a per-window one), samples only while `active`.
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let active = Arc::new(AtomicBool::new(false));
    let quit = Arc::new(AtomicBool::new(false));
    let bg = {
        let (active, quit) = (active.clone(), quit.clone());
        let mut s = sampler(ModeChoice::Exact, vec![], None);
        std::thread::spawn(move || {
            while !quit.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                if active.load(Ordering::Relaxed) {
                    s.sample();
                }
            }
        })
    };
    for (label, pages, work) in [
        ("tight-rewriter-64MiB", "16384", "0"),
        ("decoder-like-64MiB", "16384", "3000"),
    ] {
        let mut off = Vec::new();
        let mut on = Vec::new();
        for round in 0..4 {
            for with in if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            } {
                active.store(with, Ordering::Relaxed);
                let out = Command::new(WORKLOAD)
                    .args(["rewrite-bench", pages, work, "4"])
                    .output()
                    .map_err(|e| e.to_string())?;
                active.store(false, Ordering::Relaxed);
                let v: f64 = String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .map_err(|_| "bench output")?;
                if with { on.push(v) } else { off.push(v) }
            }
        }
        let (m0, m1) = (median_of(&mut off), median_of(&mut on));
        say(&format!(
            "IMMP-BENCH slowdown {label} pages_per_s_without={m0:.0} with_exact_1s={m1:.0} ratio={:.3}",
            m0 / m1
        ));
    }
    quit.store(true, Ordering::Relaxed);
    let _ = bg.join();
    Ok("bench done".into())
}

/// The migration lab's guest side (`cargo xtask bench migrate`), driven by environment words
/// on the kernel command line:
///   IMMP_LAB_SERVICE=RATE      the latency-sensitive service (requests per second)
///   IMMP_LAB_WRITER=PAGES,WORK the ring writer (compute per page)
///   IMMP_LAB_POLICY=none | cgroup:PCT | cpulimit:PCT | immp | immp:FLOORPCT | host
///                              (host: nothing here; the host starts immp through the agent)
///   IMMP_LAB_WARM=SECS, IMMP_LAB_SETTLE=SECS  the writer under its policy before READY
///                              (a fixed one applied as the writer starts, immp already
///                              running); SETTLE is the window of the writer's rate before
/// `probe` instead runs the writer at each IMMP_LAB_PROBE=PAGES,SECS,WORK,WORK... in turn.
/// Every second it prints `IMMP-LAB-C w=PAGES s=DONE h=BUCKET:COUNT,... cg=CGROUP` (cumulative
/// counters and the writer's cgroup v2 path, so the host sees when it is capped and lifted;
/// timestamped by the host: the guest clock is no stopwatch under TCG) and forwards immp's
/// JSON events as `IMMP-LAB-EVENT {...}`. Never returns (the host stops QEMU).
fn lab(scenario: &str) -> ! {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let num = |k: &str, d: u64| env(k).parse().unwrap_or(d);
    lab_reporter();
    if scenario == "probe" {
        let spec = env("IMMP_LAB_PROBE");
        let mut it = spec.split(',');
        let pages = it.next().unwrap_or("49152").to_string();
        let secs: u64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(5);
        for work in it {
            let w = start(&["ring-count", &pages, work, LAB_WRITER]);
            say(&format!("IMMP-LAB-PROBE work={work}"));
            std::thread::sleep(Duration::from_secs(secs));
            drop(w);
        }
        say("IMMP-LAB-PROBE-DONE");
        lab_forever();
    }
    let _service = (!env("IMMP_LAB_SERVICE").is_empty())
        .then(|| start(&["service", &env("IMMP_LAB_SERVICE"), LAB_SERVICE]));
    let policy = env("IMMP_LAB_POLICY");
    let (kind, pct) = policy.split_once(':').unwrap_or((policy.as_str(), ""));
    let mut keep = Vec::new();
    // immp starts before the writer (and is running its loop when the writer appears), so
    // that the writer runs WARM + SETTLE seconds before the migration under every policy:
    // immp's start-up (BTF parsing, several seconds under TCG) must not lengthen the
    // writer's run, and with it the memory the migration has to send.
    if kind == "immp" {
        match lab_immp(pct) {
            Ok(c) => keep.push(c),
            Err(e) => say(&format!("IMMP-LAB-ERROR immp: {e}")),
        }
    }
    let writer = env("IMMP_LAB_WRITER")
        .split_once(',')
        .map(|(pages, work)| start(&["ring-count", pages, work, LAB_WRITER]));
    if let Some(w) = &writer {
        LAB_WRITER_PID.store(w.pid(), std::sync::atomic::Ordering::Relaxed);
    }
    // A fixed policy is in force from the writer's start, as immp is (it runs before the writer
    // appears): the paper's cpulimit is applied to an IMMP known in advance, and the lab
    // capped from the start. Applied after WARM instead, the writer ran ~30 MB uncapped first,
    // ~1.8 s of every fixed policy's migration that immp never paid (measured, 615039e).
    match (kind, &writer) {
        ("cgroup", Some(w)) => lab_cgroup(w.pid(), pct),
        ("cpulimit", Some(w)) => {
            let c = Command::new("/usr/bin/cpulimit")
                .args(["-p", &w.pid().to_string(), "-l", pct, "-z", "-q"])
                .stdout(Stdio::null())
                .spawn();
            match c {
                Ok(c) => {
                    say(&format!(
                        "IMMP-LAB-POLICY cpulimit -l {pct} on PID {}",
                        w.pid()
                    ));
                    keep.push(c);
                }
                Err(e) => say(&format!("IMMP-LAB-ERROR cpulimit: {e}")),
            }
        }
        ("immp" | "none" | "host" | "", _) => {}
        (k, None) => say(&format!("IMMP-LAB-ERROR policy {k} needs a writer")),
        (k, _) => say(&format!("IMMP-LAB-ERROR unknown policy {k}")),
    }
    std::thread::sleep(Duration::from_secs(num("IMMP_LAB_WARM", 5)));
    std::thread::sleep(Duration::from_secs(num("IMMP_LAB_SETTLE", 5)));
    if kind == "immp"
        && let Some(c) = keep.first()
    {
        // immp's own memory: what it touched is resent by the migration like any other page.
        let st = std::fs::read_to_string(format!("/proc/{}/status", c.id())).unwrap_or_default();
        let kb = |k: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix(k))
                .map_or("?".into(), |v| v.trim().trim_end_matches(" kB").to_string())
        };
        say(&format!(
            "IMMP-LAB-IMMP-MEM hwm_kb={} rss_kb={}",
            kb("VmHWM:"),
            kb("VmRSS:")
        ));
    }
    say("IMMP-LAB-READY");
    let _keep = (writer, keep);
    lab_forever()
}

const LAB_WRITER: &str = "/tmp/lab-writer";
/// The writer's PID once started (0 before), for the reporter's `cg=`.
static LAB_WRITER_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
const LAB_SERVICE: &str = "/tmp/lab-service";

fn lab_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Prints the writer's and the service's counters every second (cumulative, so a line lost or
/// late costs nothing but resolution).
fn lab_reporter() {
    std::thread::spawn(|| {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let read = |p: &str| -> Vec<u64> {
                std::fs::read(p)
                    .unwrap_or_default()
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect()
            };
            let (w, s) = (read(LAB_WRITER), read(LAB_SERVICE));
            let h: Vec<String> = s
                .iter()
                .enumerate()
                .skip(8)
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| format!("{}:{c}", i - 8))
                .collect();
            let pid = LAB_WRITER_PID.load(std::sync::atomic::Ordering::Relaxed);
            // cgroup v2: "0::/path"; "-" before the writer exists.
            let cg = if pid == 0 {
                "-".to_string()
            } else {
                let c = cgroup_of(pid);
                c.rsplit_once("::").map_or(c.clone(), |x| x.1.to_string())
            };
            say(&format!(
                "IMMP-LAB-C w={} s={} h={} cg={}",
                w.first().copied().unwrap_or(0),
                s.first().copied().unwrap_or(0),
                h.join(","),
                if cg.is_empty() { "?" } else { &cg }
            ));
        }
    });
}

/// A fixed cgroup v2 cap on the writer: `cpu.max` of a cgroup of its own.
fn lab_cgroup(pid: u32, pct: &str) {
    let quota = pct.parse::<f64>().unwrap_or(20.0) * 1000.0;
    let dir = "/sys/fs/cgroup/lab-cap";
    let r = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+cpu"))
        .and_then(|_| std::fs::write(format!("{dir}/cpu.max"), format!("{quota:.0} 100000")))
        .and_then(|_| std::fs::write(format!("{dir}/cgroup.procs"), pid.to_string()));
    match r {
        Ok(()) if cgroup_of(pid).contains("lab-cap") => say(&format!(
            "IMMP-LAB-POLICY cgroup cpu.max {quota:.0} 100000 on PID {pid}"
        )),
        Ok(()) => say(&format!("IMMP-LAB-ERROR PID {pid} not in {dir}")),
        Err(e) => say(&format!("IMMP-LAB-ERROR cgroup cap: {e}")),
    }
}

/// `immp throttle --auto` as an operator would start it (default floor, or `--floor PCT%`);
/// its JSON events are forwarded to the serial console. Returns once its first prediction
/// is out (probes attached, first interval measured).
fn lab_immp(floor: &str) -> std::io::Result<std::process::Child> {
    let mut args = vec![
        "throttle",
        "--auto",
        "--bandwidth",
        "100Mbit",
        "--format",
        "json",
    ];
    let floor_arg = format!("{floor}%");
    if !floor.is_empty() {
        args.extend(["--floor", &floor_arg]);
    }
    let mut c = Command::new(IMMP)
        .args(&args)
        .env("IMMP_JOURNAL_DIR", "/tmp/journal")
        .stdout(Stdio::piped())
        .spawn()?;
    say(&format!("IMMP-LAB-POLICY immp {}", args.join(" ")));
    let out = std::io::BufReader::new(c.stdout.take().expect("stdout"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(out).map_while(Result::ok) {
            // Interval lines repeat what decisions say; the console is slow under TCG.
            if !line.contains("\"event\":\"interval\"") {
                say(&format!("IMMP-LAB-EVENT {line}"));
            }
            if line.contains("\"event\":\"prediction\"") {
                let _ = tx.send(());
            }
        }
    });
    let _ = rx.recv_timeout(Duration::from_secs(120));
    Ok(c)
}

fn median_of(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn say(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{s}");
    let _ = o.flush();
}

type Test = (&'static str, fn() -> Outcome);

fn main() {
    let all: Vec<Test> = vec![
        ("own-footprint", own_footprint),
        ("doctor", doctor),
        ("rewrite-exact", rewrite_exact),
        ("first-touch", first_touch),
        ("file-write", file_write),
        ("mixed-rank", mixed_rank),
        ("verify-pagemap", verify_pagemap),
        ("thp-flagged", thp_flagged),
        ("throttle-v2", throttle_v2),
        ("qemu-rate", qemu_rate),
        ("round-zero", round_zero),
        ("fidelity", fidelity),
    ];
    let extra: Vec<Test> = vec![
        ("bench-exact", bench_exact),
        ("footprint-parts", footprint_parts),
    ];
    let want: Vec<String> = std::env::args().skip(1).collect();
    if let Some(scenario) = want.first().and_then(|w| w.strip_prefix("lab-")) {
        lab(scenario);
    }
    // Benchmarks run only when named.
    let selected = all
        .into_iter()
        .filter(|(n, _)| want.is_empty() || want.iter().any(|w| w == n));
    let extra = extra
        .into_iter()
        .filter(|(n, _)| want.iter().any(|w| w == n));
    for (name, f) in selected.chain(extra) {
        let r = std::panic::catch_unwind(f).unwrap_or_else(|e| {
            Err(e
                .downcast_ref::<String>()
                .cloned()
                .or(e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default())
        });
        match r {
            Ok(d) => say(&format!("IMMP-RESULT {name} PASS {d}")),
            Err(d) => say(&format!("IMMP-RESULT {name} FAIL {d}")),
        }
    }
    say("IMMP-DONE");
}
