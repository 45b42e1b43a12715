//! Developer workflows for immp: toolchain setup, build, run, test, benchmarks.
//! Nothing in the product depends on this crate.
mod bench;
mod bench_serve;
mod cpio;
mod install;
mod lab;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "immp developer workflows")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the eBPF build and the tests need (idempotent; seconds when all is there)
    Setup,
    /// Set up, build the release binary (eBPF object embedded)
    Build,
    /// Set up, build, and run `immp` with the given arguments, e.g. `cargo xtask run -- profile`
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the whole test suite (unit, kernel and CLI tests)
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Boot Debian's kernels under QEMU, one after another, and run the guest tests on each
    /// (soft-dirty, cgroup v2, QEMU's own dirty rate); optional test names select some
    VmTest {
        /// Kernel to test on (repeatable); default: all of them
        #[arg(long = "kernel", value_name = "NAME", value_parser = vm::kernel_names())]
        kernels: Vec<String>,
        tests: Vec<String>,
    },
    /// The host-triggered throttling test under QEMU: a heavy writer's migration started over
    /// QMP converges with `immp host watch` driving immp in the guest through
    /// qemu-guest-agent, every cap is lifted and the writer is uncapped after
    HostTest {
        /// Skip the calibration: the heavy writer's compute per page
        #[arg(long)]
        work: Option<u64>,
        /// Give up (migrate_cancel, a failure) after this many seconds
        #[arg(long, default_value_t = 150)]
        limit: u64,
    },
    /// Build the release binary and install it (PREFIX/bin/immp) with the systemd unit of
    /// `immp serve` (/etc/systemd/system/immp.service); --dry-run says what it would do
    Install(install::Opts),
    /// Benchmarks that print ratios measured side by side in one run
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The rustup cargo that runs us (not Debian's /usr/bin/cargo, which builds only the eBPF part).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

pub fn release_bin(name: &str) -> PathBuf {
    root().join("target/release").join(name)
}

/// Runs `cargo test`, passing its output through, and totals every test binary (cargo's own
/// last line is the doc-tests', often "0 passed"). A crashed test binary counts as a failure.
fn cargo_tests(cmd: &mut Command) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn()?;
    let (mut passed, mut failed, mut binaries) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            binaries += 1;
            let num = |key: &str| {
                rest.split(';')
                    .find_map(|p| {
                        p.trim()
                            .strip_suffix(key)
                            .and_then(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
                    })
                    .unwrap_or(0)
            };
            passed += num(" passed");
            failed += num(" failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        failed += 1;
    }
    let _ = binaries;
    Ok((passed, failed))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::ensure(),
        Cmd::Build => {
            setup::ensure()?;
            run(cargo().args(["build", "--release", "--workspace", "--bins"]))
        }
        Cmd::Run { args } => {
            setup::ensure()?;
            run(cargo().args(["build", "--release", "-p", "immp-user"]))?;
            let status = Command::new(release_bin("immp")).args(&args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Test { args } => {
            setup::ensure()?;
            // The CLI tests run the real binaries: build them first.
            run(cargo().args(["build", "--workspace", "--bins"]))?;
            let (mut passed, mut failed) = cargo_tests(
                cargo()
                    .args(["test", "--workspace", "--no-fail-fast"])
                    .args(&args),
            )?;
            // The guest half: soft-dirty, cgroup v2 and QEMU's own dirty rate need Debian's
            // kernels, booted under QEMU (this host kernel has no soft-dirty); all of them.
            if args.is_empty() {
                match vm::select(&[]).and_then(|k| vm::test(vec![], &k)) {
                    Ok((p, f)) => (passed, failed) = (passed + p, failed + f),
                    Err(e) => {
                        eprintln!("vm-test: {e:#}");
                        failed += 1;
                    }
                }
                // Host-triggered throttling: a migration between two QEMUs.
                match lab::host_test(None, 150) {
                    Ok((p, f)) => (passed, failed) = (passed + p, failed + f),
                    Err(e) => {
                        eprintln!("host-test: {e:#}");
                        failed += 1;
                    }
                }
            }
            println!("tests: {passed} passed, {failed} failed");
            if failed > 0 || passed == 0 {
                bail!("{failed} tests failed");
            }
            Ok(())
        }
        Cmd::VmTest { kernels, tests } => {
            setup::ensure()?;
            let (_, failed) = vm::test(tests, &vm::select(&kernels)?)?;
            if failed > 0 {
                bail!("vm-test: {failed} failed");
            }
            Ok(())
        }
        Cmd::HostTest { work, limit } => {
            setup::ensure()?;
            let (_, failed) = lab::host_test(work, limit)?;
            if failed > 0 {
                bail!("host-test: {failed} failed");
            }
            Ok(())
        }
        Cmd::Install(o) => install::run(o),
        Cmd::Bench { which } => {
            setup::ensure()?;
            run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
            bench::run(which)
        }
    }
}
