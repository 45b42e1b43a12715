//! Helpers shared by the integration tests: real child processes with known behaviour, and
//! the real `immp` binary.
#![allow(dead_code)]

use std::path::PathBuf;

#[path = "../../src/ctl.rs"]
mod ctl;
pub use ctl::Workload;

impl Workload {
    /// Spawns the test build's workload binary and waits for `ready`.
    pub fn start(args: &[&str]) -> Self {
        Self::start_bin(WORKLOAD, args)
    }
}

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
