//! Exit codes scripts can test, and errors that carry them.

/// Exit codes scripts can test.
pub mod exit {
    pub const OK: i32 = 0;
    /// Something failed while running.
    pub const FAILURE: i32 = 1;
    /// Bad input: arguments, unknown PID, refused target. Nothing was changed.
    pub const USAGE: i32 = 2;
    /// This machine cannot do it: not root, no usable probes, no cgroup cpu controller.
    pub const ENVIRONMENT: i32 = 3;
}

/// An error that carries its exit code; anything else exits with `exit::FAILURE`.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct ExitError {
    pub code: i32,
    pub msg: String,
}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    ExitError {
        code: exit::USAGE,
        msg: msg.into(),
    }
    .into()
}

pub fn environment(msg: impl Into<String>) -> anyhow::Error {
    ExitError {
        code: exit::ENVIRONMENT,
        msg: msg.into(),
    }
    .into()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root() -> anyhow::Result<()> {
    if !is_root() {
        return Err(environment(
            "immp must run as root (it loads eBPF programs and manages cgroups)",
        ));
    }
    Ok(())
}
