//! `immp throttle` / `immp restore` on real cgroups with real CPU-bound children.
mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{Workload, cpu_cgroup, cpu_ns, immp_bin, kernel_thread, wait_until};

fn journal_dir(name: &str) -> PathBuf {
    let d = common::scratch("journals").join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn immp(jdir: &Path, args: &[&str]) -> Output {
    Command::new(immp_bin())
        .args(args)
        .env("IMMP_JOURNAL_DIR", jdir)
        .stdin(Stdio::null())
        .output()
        .expect("run immp")
}

fn spawn_immp(jdir: &Path, args: &[&str]) -> Child {
    Command::new(immp_bin())
        .args(args)
        .env("IMMP_JOURNAL_DIR", jdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn immp")
}

/// Every cgroup directory of the v1 cpu hierarchy (the tree refusals must leave as it was).
fn cpu_tree() -> Vec<String> {
    fn walk(d: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path().display().to_string());
                    walk(&e.path(), out);
                }
            }
        }
    }
    let mut v = vec![];
    let root = immp::act::cgroup::CgroupLayout::detect();
    let root = root.v1_cpu_mount.or(root.v2_mount).expect("a cgroup mount");
    walk(&root, &mut v);
    v.sort();
    v
}

fn one_line_error(o: &Output, code: i32, needle: &str) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e:?}");
    assert!(e.contains(needle), "{e:?} should contain {needle:?}");
}

/// Other tests here use idle children so that these CPU shares are not starved on 2 cores.
#[test]
fn caps_hold_10_20_50_percent_within_2_points() {
    let caps = [10.0, 20.0, 50.0];
    let runs: Vec<_> = caps
        .iter()
        .map(|cap| {
            let w = Workload::start(&["burn"]);
            let before = cpu_cgroup(w.pid());
            let j = journal_dir(&format!("share-{cap}"));
            let c = spawn_immp(
                &j,
                &[
                    "throttle",
                    "--pid",
                    &w.pid().to_string(),
                    "--cap",
                    &format!("{cap}%"),
                    "--duration",
                    "15s",
                    "--format",
                    "json",
                ],
            );
            (w, c, *cap, before)
        })
        .collect();
    // Measure in the middle of the capped period.
    // Measure only once every cap is in force (immp's start-up varies with the load), then
    // give the quotas one more period to settle.
    for (w, _, _, _) in &runs {
        wait_until("capped", Duration::from_secs(20), || {
            cpu_cgroup(w.pid()).contains("immp-")
        });
    }
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let c0: Vec<u64> = runs.iter().map(|(w, _, _, _)| cpu_ns(w.pid())).collect();
    std::thread::sleep(Duration::from_secs(3));
    let el = t0.elapsed().as_secs_f64();
    let c1: Vec<u64> = runs.iter().map(|(w, _, _, _)| cpu_ns(w.pid())).collect();
    for (i, (w, c, cap, before)) in runs.into_iter().enumerate() {
        let share = (c1[i] - c0[i]) as f64 / 1e9 / el * 100.0;
        assert!(
            (share - cap).abs() <= 2.0,
            "cap {cap}%: measured {share:.1}%"
        );
        // SIGTERM ends it early; the cap must be lifted on the way out.
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(cpu_cgroup(w.pid()), before, "lifted at the end");
    }
}

#[test]
fn sigkill_then_restore_puts_the_process_back() {
    let w = Workload::start(&["idle"]);
    let before = cpu_cgroup(w.pid());
    let j = journal_dir("sigkill");
    let mut c = spawn_immp(
        &j,
        &[
            "throttle",
            "--pid",
            &w.pid().to_string(),
            "--cap",
            "30%",
            "--format",
            "json",
        ],
    );
    wait_until("capped", Duration::from_secs(30), || {
        cpu_cgroup(w.pid()).contains("immp-")
    });
    let capped = cpu_cgroup(w.pid());
    c.kill().unwrap(); // SIGKILL: no chance to clean up
    c.wait().unwrap();
    assert_eq!(cpu_cgroup(w.pid()), capped, "still capped after SIGKILL");
    let o = immp(&j, &["restore", "--format", "json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("moved-back"));
    assert_eq!(cpu_cgroup(w.pid()), before);
    assert!(
        !cpu_tree().iter().any(|d| d.ends_with(&capped)),
        "cap cgroup removed"
    );
    // Idempotent.
    let o = immp(&j, &["restore", "--format", "json"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("nothing"));
}

#[test]
fn restore_leaves_a_reused_pid_alone() {
    // A crashed immp capped PID X (start time S); X exited and its pid now belongs to another
    // process. Simulated with a live process and a journal entry carrying another start time.
    let w = Workload::start(&["idle"]);
    let root = immp::act::cgroup::CgroupLayout::detect()
        .v1_cpu_mount
        .expect("v1 cpu");
    // The journal says what a real cap would: the process's own cgroup, the cap under it.
    let before = cpu_cgroup(w.pid());
    let capped = format!("{}/immp-{}-1", before.trim_end_matches('/'), w.pid());
    std::fs::create_dir_all(root.join(capped.trim_start_matches('/'))).unwrap();
    let j = journal_dir("reuse");
    std::fs::create_dir_all(&j).unwrap();
    let entry = serde_json::json!({"op": "place", "pid": w.pid(), "start_time": 1, "comm": "old", "mechanism": "cgroup-v1",
        "root": root, "original": before, "capped": capped, "previous_cpu_max": null});
    std::fs::write(j.join("journal"), format!("{entry}\n")).unwrap();
    let o = immp(&j, &["restore", "--format", "json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\"gone\""),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(
        cpu_cgroup(w.pid()),
        before,
        "the new process was not touched"
    );
    assert!(!root.join(capped.trim_start_matches('/')).exists());
}

#[test]
fn corrupt_journal_is_a_clear_error_and_changes_nothing() {
    let j = journal_dir("corrupt");
    std::fs::create_dir_all(&j).unwrap();
    std::fs::write(j.join("journal"), "this is not json\n").unwrap();
    one_line_error(&immp(&j, &["restore"]), 1, "corrupt at line 1");
    assert_eq!(
        std::fs::read_to_string(j.join("journal")).unwrap(),
        "this is not json\n",
        "journal left as it was"
    );
}

#[test]
fn refusals_change_nothing() {
    let w = Workload::start(&["idle"]);
    let pid = w.pid().to_string();
    let j = journal_dir("refusals");
    let cg = cpu_cgroup(w.pid());
    // A real kernel thread, found by its PF_KTHREAD flag (PID 2 is kthreadd only outside PID
    // namespaces).
    let kthread = kernel_thread().to_string();
    one_line_error(
        &immp(&j, &["throttle", "--pid", "1", "--cap", "20%"]),
        2,
        "PID 1",
    );
    one_line_error(
        &immp(&j, &["throttle", "--pid", &kthread, "--cap", "20%"]),
        2,
        "kernel thread",
    );
    one_line_error(
        &immp(&j, &["throttle", "--pid", "4194305", "--cap", "20%"]),
        2,
        "no process with PID 4194305",
    );
    one_line_error(
        &immp(&j, &["throttle", "--pid", &pid, "--cap", "0%"]),
        2,
        "out of range",
    );
    let too_much = format!("{}%", 100 * immp::act::target::online_cpus() + 50);
    one_line_error(
        &immp(&j, &["throttle", "--pid", &pid, "--cap", &too_much]),
        2,
        "out of range",
    );
    one_line_error(
        &immp(&j, &["throttle", "--pid", &pid, "--cap", "banana"]),
        2,
        "banana",
    );
    one_line_error(
        &immp(
            &j,
            &[
                "throttle", "--pid", &pid, "--pid", "4194305", "--cap", "20%",
            ],
        ),
        2,
        "no process",
    );
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(immp_bin())
        .args(["throttle", "--pid", &pid, "--cap", "20%"])
        .env("IMMP_JOURNAL_DIR", &j)
        .output()
        .unwrap();
    one_line_error(&o, 3, "root");
    // Other tests run in parallel and make cgroups of their own: look for ours.
    for p in [pid.as_str(), "1", kthread.as_str(), "4194305"] {
        let mine = format!("immp-{p}-");
        assert!(
            !cpu_tree().iter().any(|d| d.contains(&mine)),
            "a cap cgroup for PID {p} appeared"
        );
    }
    assert_eq!(cpu_cgroup(w.pid()), cg);
}

#[test]
fn second_instance_is_refused() {
    let a = Workload::start(&["idle"]);
    let b = Workload::start(&["idle"]);
    let a_before = cpu_cgroup(a.pid());
    let j = journal_dir("second");
    let mut first = spawn_immp(
        &j,
        &[
            "throttle",
            "--pid",
            &a.pid().to_string(),
            "--cap",
            "40%",
            "--duration",
            "8s",
        ],
    );
    wait_until("first capped", Duration::from_secs(30), || {
        cpu_cgroup(a.pid()).contains("immp-")
    });
    let b_before = cpu_cgroup(b.pid());
    one_line_error(
        &immp(
            &j,
            &["throttle", "--pid", &b.pid().to_string(), "--cap", "20%"],
        ),
        1,
        "another immp",
    );
    one_line_error(&immp(&j, &["restore"]), 1, "another immp");
    assert_eq!(cpu_cgroup(b.pid()), b_before);
    assert!(
        cpu_cgroup(a.pid()).contains("immp-"),
        "first instance's cap untouched"
    );
    // SIGTERM: the first one lifts its cap.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    assert!(first.wait().unwrap().success());
    assert_eq!(cpu_cgroup(a.pid()), a_before);
}

#[test]
fn children_follow_the_cap_and_come_back_with_it() {
    let j = journal_dir("children");
    std::fs::create_dir_all(&j).unwrap();
    let flag = j.join("fork-now");
    // The shell forks only once the test has seen it capped (immp takes a moment to start).
    let script = format!(
        "while [ ! -e '{}' ]; do sleep 0.05; done; sleep 30 & echo $!; wait",
        flag.display()
    );
    let mut sh = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let sh_before = cpu_cgroup(sh.id());
    let mut c = spawn_immp(
        &j,
        &[
            "throttle",
            "--pid",
            &sh.id().to_string(),
            "--cap",
            "50%",
            "--duration",
            "8s",
        ],
    );
    wait_until("shell capped", Duration::from_secs(20), || {
        cpu_cgroup(sh.id()).contains("immp-")
    });
    std::fs::write(&flag, "").unwrap();
    let mut out = std::io::BufReader::new(sh.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let child: u32 = line.trim().parse().unwrap();
    let capped = cpu_cgroup(sh.id());
    assert!(capped.contains("immp-"), "shell capped: {capped}");
    assert_eq!(
        cpu_cgroup(child),
        capped,
        "a child forked while capped follows"
    );
    assert!(c.wait().unwrap().success());
    assert_eq!(cpu_cgroup(sh.id()), sh_before);
    assert_eq!(
        cpu_cgroup(child),
        sh_before,
        "the child comes back too (to where its parent came from)"
    );
    let _ = Command::new("kill").arg(child.to_string()).status();
    let _ = sh.kill();
    let _ = sh.wait();
}

#[test]
fn a_process_that_exits_while_capped_is_not_an_error() {
    let j = journal_dir("exits");
    let w = Workload::start(&["idle"]);
    let pid = w.pid();
    let c = spawn_immp(
        &j,
        &[
            "throttle",
            "--pid",
            &pid.to_string(),
            "--cap",
            "20%",
            "--duration",
            "30s",
            "--format",
            "json",
        ],
    );
    wait_until("capped", Duration::from_secs(30), || {
        cpu_cgroup(pid).contains("immp-")
    });
    drop(w); // kills it
    let t = Instant::now();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "ends once its only target is gone"
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("\"event\":\"gone\""), "{text}");
    assert!(
        !cpu_tree()
            .iter()
            .any(|d| d.contains(&format!("immp-{pid}-"))),
        "cap cgroup removed"
    );
}

#[test]
fn a_panic_still_lifts_the_cap() {
    let j = journal_dir("panic");
    let w = Workload::start(&["idle"]);
    let before = cpu_cgroup(w.pid());
    let o = Command::new(immp_bin())
        .args([
            "throttle",
            "--pid",
            &w.pid().to_string(),
            "--cap",
            "20%",
            "--interval",
            "300ms",
            "--format",
            "json",
        ])
        .env("IMMP_JOURNAL_DIR", &j)
        .env("IMMP_TEST_PANIC_AFTER", "2")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success(), "the injected panic ends the run");
    assert!(String::from_utf8_lossy(&o.stderr).contains("injected panic"));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("\"event\":\"capped\""), "{text}");
    assert_eq!(cpu_cgroup(w.pid()), before, "restored during unwinding");
    assert!(
        !cpu_tree()
            .iter()
            .any(|d| d.contains(&format!("immp-{}-", w.pid())))
    );
    let o = immp(&j, &["restore", "--format", "json"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("nothing"),
        "journal closed cleanly"
    );
}
