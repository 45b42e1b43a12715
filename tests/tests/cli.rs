//! The `immp` binary as a user runs it: output formats, exit codes, one-line errors.
mod common;

use std::process::{Command, Output, Stdio};

use common::{Workload, immp_bin};

fn immp(args: &[&str]) -> Output {
    Command::new(immp_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run immp")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn assert_one_line_error(o: &Output, code: i32, needle: &str) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(code), "exit code; stderr: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e:?}");
    assert!(e.starts_with("immp: "), "{e:?}");
    assert!(e.contains(needle), "{e:?} should mention {needle:?}");
    assert!(o.stdout.is_empty(), "nothing on stdout");
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    assert_one_line_error(&immp(&["profile", "--duration", "banana"]), 2, "banana");
    assert_one_line_error(
        &immp(&["profile", "--bandwidth", "12parsecs"]),
        2,
        "12parsecs",
    );
    assert_one_line_error(
        &immp(&["profile", "--interval", "0"]),
        2,
        "greater than zero",
    );
    assert_one_line_error(
        &immp(&["profile", "--pid", "4194305"]),
        2,
        "no process with PID 4194305",
    );
    assert_one_line_error(&immp(&["profile", "--immp-share", "0%"]), 2, "above 0%");
}

#[test]
fn not_root_is_refused_with_exit_3() {
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(immp_bin())
        .args(["profile", "--duration", "1s"])
        .output()
        .expect("setpriv (util-linux)");
    assert_one_line_error(&o, 3, "must run as root");
}

#[test]
fn help_has_examples() {
    let o = immp(&["profile", "--help"]);
    assert!(o.status.success());
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains("Examples:") && t.contains("--bandwidth 100Mbit"),
        "{t}"
    );
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn profile_json_ranks_a_real_writer_with_verdict() {
    let w = Workload::start(&["writer", "256"]);
    let pid = w.pid().to_string();
    // Not a terminal: JSON lines by default.
    let o = immp(&[
        "profile",
        "--duration",
        "2s",
        "--interval",
        "500ms",
        "--bandwidth",
        "100Mbit",
        "--pid",
        &pid,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&o);
    assert!(lines.len() >= 3, "{} intervals", lines.len());
    for v in &lines {
        // Ranking is this test's business, not the mode (exact where the kernel has soft-dirty,
        // bounds elsewhere): either, with the note that goes with it.
        let note = v["mode_note"].as_str().unwrap();
        match v["mode"].as_str() {
            Some("bounds") => assert!(note.contains("lower bound"), "{note}"),
            Some("exact") => assert!(note.contains("exact"), "{note}"),
            m => panic!("mode {m:?}"),
        }
        let procs = v["processes"].as_array().unwrap();
        let rates: Vec<f64> = procs
            .iter()
            .map(|p| p["dirty_bytes_per_s"].as_f64().unwrap())
            .collect();
        assert!(
            rates.windows(2).all(|w| w[0] >= w[1]),
            "sorted by dirty rate: {rates:?}"
        );
        let me = procs
            .iter()
            .find(|p| p["pid"].as_u64() == Some(w.pid() as u64))
            .unwrap_or_else(|| panic!("watched pid {pid} missing from {v}"));
        // A CPU-bound writer of fresh pages dirties far more than 25 % of 12.5 MB/s.
        assert_eq!(me["verdict"], "immp", "{me}");
        assert!(me["rates"]["write_new"].as_f64().unwrap() > 1000.0);
        assert!(me["cpu_pct"].as_f64().unwrap() > 20.0);
        assert!(me["start_time"].as_u64().unwrap() > 0);
        // (Its rank among other tests' writers running in parallel is not this test's business:
        // ranking order is tested on bracketed workloads in kernel_counts.)
        assert!(me["dirty_bytes_per_s"].as_f64().unwrap() > 1e6, "{me}");
    }
}

#[test]
fn profile_reports_a_process_that_exits_mid_run_as_gone() {
    let mut w = Workload::start(&["first-touch", "4096"]);
    let pid = w.pid();
    let child = std::process::Command::new(immp_bin())
        .args([
            "profile",
            "--duration",
            "20s",
            "--interval",
            "300ms",
            "--format",
            "json",
            "--pid",
            &pid.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its first interval means the probes are attached: only then start the work.
    let mut child = child;
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    w.run();
    w.finish();
    let start = std::time::Instant::now();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let mut o = child.wait_with_output().unwrap();
    o.stdout = format!("{first}{rest}").into_bytes();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        start.elapsed().as_secs() < 10,
        "profile stops once every watched process is gone"
    );
    let lines = json_lines(&o);
    let last = lines.last().unwrap();
    let me = last["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap();
    assert_eq!(me["gone"], true);
    let total_new: f64 = lines
        .iter()
        .filter_map(|l| {
            l["processes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["pid"] == pid)
                .map(|p| {
                    p["rates"]["write_new"].as_f64().unwrap() * l["interval_s"].as_f64().unwrap()
                })
        })
        .sum();
    assert!(
        (total_new - 4096.0).abs() < 4096.0 * 0.05,
        "pages counted across intervals: {total_new}"
    );
}

#[test]
fn profile_csv_and_table_formats() {
    let o = immp(&[
        "profile",
        "--duration",
        "1s",
        "--format",
        "csv",
        "--top",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.starts_with("time_unix_ms,seq,mode,pid,"), "{t}");
    // The header shows the mode: asked for bounds, so that it is the same on every kernel.
    let o = immp(&[
        "profile",
        "--duration",
        "1s",
        "--format",
        "table",
        "--mode",
        "bounds",
        "--bandwidth",
        "1Gbit",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains("mode: bounds (lower bound)") && t.contains("DIRTY"),
        "{t}"
    );
    assert!(t.contains("of a 125 MB/s link"), "{t}");
}

#[test]
fn tracepoint_fallback_through_the_cli() {
    let w = Workload::start(&["writer", "64"]);
    let o = immp(&[
        "profile",
        "--probes",
        "tracepoint",
        "--duration",
        "1s",
        "--top",
        "100000",
        "--pid",
        &w.pid().to_string(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v = &json_lines(&o)[0];
    assert_eq!(v["probes"], "tracepoint");
    assert_eq!(v["folio_pages_known"], false);
    // The fallback still finds the file layout in BTF and counts shmem writes.
    assert_eq!(v["shmem_known"], true);
    let me = v["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64() == Some(w.pid() as u64))
        .unwrap_or_else(|| panic!("writer missing from {v}"));
    assert!(me["rates"]["write_new"].as_f64().unwrap() > 100.0, "{me}");
}

#[test]
fn doctor_reports_capabilities_and_succeeds_here() {
    let o = immp(&["doctor", "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["usable"], true);
    let checks = v["checks"].as_array().unwrap();
    let get = |n: &str| {
        checks
            .iter()
            .find(|c| c["name"] == n)
            .unwrap_or_else(|| panic!("check {n}"))
    };
    assert_eq!(get("probes-btf")["status"], "ok");
    assert_eq!(get("probes-tracepoint")["status"], "ok");
    // Soft-dirty, checked by effect here too: doctor must see through clear_refs' fake success
    // where the kernel lacks it, and report it usable where it works.
    let sd = get("soft-dirty");
    let works = soft_dirty_works();
    assert_eq!(
        sd["status"],
        if works { "ok" } else { "warn" },
        "this kernel's soft-dirty works: {works}; doctor says {sd}"
    );
    assert!(
        get("cap-mechanism")["detail"]
            .as_str()
            .unwrap()
            .contains("cgroup")
    );
}

/// Whether soft-dirty works on this kernel, by effect on this test process: a page written
/// after `clear_refs 4` has pagemap bit 55 set, and the clear clears it (where soft-dirty is
/// compiled out, clear_refs 4 succeeds and bit 55 is never set).
fn soft_dirty_works() -> bool {
    use std::io::{Read, Seek, SeekFrom};
    // SAFETY: sysconf has no preconditions.
    let pg = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    // SAFETY: a private anonymous page of our own, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pg,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let bit55 = || {
        let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
        f.seek(SeekFrom::Start((p as usize / pg * 8) as u64))
            .unwrap();
        let mut b = [0u8; 8];
        f.read_exact(&mut b).unwrap();
        u64::from_le_bytes(b) >> 55 & 1 == 1
    };
    // SAFETY: within the page mapped above.
    let write = |v: u8| unsafe { std::ptr::write_volatile(p.cast::<u8>(), v) };
    write(1);
    let fresh = bit55();
    std::fs::write("/proc/self/clear_refs", "4").unwrap();
    let cleared = !bit55();
    write(2);
    let again = bit55();
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(p, pg) };
    fresh && cleared && again
}
