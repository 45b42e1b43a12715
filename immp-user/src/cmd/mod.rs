//! The one command tree. Each subcommand is a file that owns its arguments and wires
//! collect -> model -> act / view together; `args` holds what several share, `run` the loop
//! and the stop signals.
//!
//! A new command (e.g. `top`, `serve`) is a new file here plus, if it draws differently, a new
//! `view`: it reads the same `Event` stream and calls the same `collect` / `act` pieces.
use clap::{Parser, Subcommand};

pub mod args;
pub mod autocap;
pub mod doctor;
pub mod host;
pub mod profile;
pub mod restore;
pub mod run;
pub mod serve;
pub mod throttle;
pub mod top;

#[derive(Parser, Debug)]
#[command(
    name = "immp",
    version,
    about = "Find the processes whose memory writes keep a VM from live-migrating, and tame them",
    long_about = "immp counts, per process, the memory pages each one dirties (eBPF on page faults and \
page-cache dirtying), ranks them against the migration link, and caps the worst with cgroup CPU \
limits.\n\nExit codes: 0 ok, 1 failure while running, 2 bad input (nothing changed), 3 this \
machine cannot do it (not root, no probes, no cpu controller)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Measure dirty rates per process, headless (table, JSON lines or CSV)
    #[command(after_help = profile::HELP)]
    Profile(profile::ProfileArgs),
    /// Check what this kernel and machine allow, and what immp will do with it
    #[command(after_help = doctor::HELP)]
    Doctor(doctor::DoctorArgs),
    /// Cap processes' CPU live (manual or automatic), and lift the caps when done
    #[command(after_help = throttle::HELP)]
    Throttle(throttle::ThrottleArgs),
    /// Put back every process a crashed or killed immp left capped (reads only the journal)
    #[command(after_help = restore::HELP)]
    Restore(restore::RestoreArgs),
    /// The live screen: what dirties memory, whether migration converges, caps and keys to act
    #[command(after_help = top::HELP)]
    Top(top::TopArgs),
    /// On the hypervisor host: drive immp inside a guest while QEMU migrates it
    Host(host::HostArgs),
    /// The agent: serve the measurements as Prometheus metrics (optionally capping, as --auto)
    #[command(after_help = serve::HELP)]
    Serve(serve::ServeArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Profile(a) => profile::run(a),
        Command::Doctor(a) => doctor::run(a),
        Command::Throttle(a) => throttle::run(a),
        Command::Restore(a) => restore::run(a),
        Command::Top(a) => top::run(a),
        Command::Host(a) => host::run(a),
        Command::Serve(a) => serve::run(a),
    }
}
