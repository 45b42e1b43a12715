//! Helpers shared by the integration tests: real child processes with known behaviour, and
//! the real `immp` binary.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

pub const WORKLOAD: &str = env!("CARGO_BIN_EXE_immp-workload");

/// The `immp` binary next to this test's deps directory (built by `cargo build`, which
/// `cargo xtask test` runs first).
pub fn immp_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("immp");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build` first (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// A scratch directory on a real disk filesystem (tmpfs has no page-cache writeback).
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

pub struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
}

impl Workload {
    /// Spawns and waits for `ready`.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(WORKLOAD)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn workload");
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut w = Self { child, stdin, out };
        let l = w.line();
        assert_eq!(l, "ready", "workload {args:?} said {l:?}");
        w
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).expect("read workload");
        l.trim().to_string()
    }

    /// Starts the work and waits until it is done; returns the lines it printed before `done`.
    pub fn run(&mut self) -> Vec<String> {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(b"go\n").expect("go");
        stdin.flush().expect("flush");
        let mut lines = Vec::new();
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "workload ended without done");
            if l == "done" {
                return lines;
            }
            lines.push(l);
        }
    }

    /// Closes stdin: one-shot workloads exit.
    pub fn finish(mut self) {
        self.stdin.take();
        let _ = self.child.wait();
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
