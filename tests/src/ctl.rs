//! Driving `immp-workload` children (shared by the integration tests and the guest tests).
use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

pub struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
}

impl Workload {
    /// Spawns `bin` and waits for `ready`.
    pub fn start_bin(bin: &str, args: &[&str]) -> Self {
        let mut child = Command::new(bin)
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
