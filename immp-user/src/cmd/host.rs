//! `immp host ...`: commands that run on the hypervisor host, next to QEMU, and drive immp
//! inside a guest through qemu-guest-agent (no network port into the guest).
use std::{path::PathBuf, time::Duration};

use clap::{Args, Subcommand};

use super::args::{self, EventFormat};
use crate::{
    host::watch::{self, Settings},
    view::{self, Format},
};

pub const HELP: &str = "Examples:\n  \
  immp host watch --qmp /run/vm1.qmp --qga /run/vm1.qga\n  \
  immp host watch --qmp src.qmp --qga src.qga --dest-qga dst.qga --format json -- --floor 5%\n\n\
Runs on the host. When QEMU's migration of the VM becomes `active` (QMP), it starts \
`immp throttle --auto --bandwidth <the migration's max-bandwidth>` inside the guest with the \
guest agent's guest-exec; when the migration completes, fails or is cancelled it stops it \
(SIGTERM: every cap lifted; SIGKILL and `immp restore` if it does not end in time) and says \
what immp capped and whether every cap was lifted. After a completed migration the guest runs \
on the destination: --dest-qga is its agent there. The migration itself is never changed. \
See README, \"Throttling when a migration starts\", for libvirt, OpenStack and KubeVirt.\n\n\
Needs: a QMP socket of its own (QEMU accepts several -qmp), the guest agent's socket \
(virtio-serial port org.qemu.guest_agent.0) with guest-exec allowed, immp in the guest.\n\
Exit codes: 0 every cap lifted, 1 immp could not be started or its caps not confirmed lifted, \
2 a socket missing or speaking something else, 3 no agent answering, guest-exec not allowed, \
or no immp in the guest.";

#[derive(Args, Debug, Clone)]
pub struct HostArgs {
    #[command(subcommand)]
    pub command: HostCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum HostCommand {
    /// Start immp in the guest when its migration starts, stop it when it ends
    #[command(after_help = HELP)]
    Watch(WatchArgs),
}

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    /// QEMU's QMP socket of the migrating VM (the source)
    #[arg(long, value_name = "SOCKET")]
    pub qmp: PathBuf,
    /// The guest agent's socket on the source (chardev of org.qemu.guest_agent.0)
    #[arg(long, value_name = "SOCKET")]
    pub qga: PathBuf,
    /// The guest agent's socket on the destination, to stop immp after a completed migration
    #[arg(long, value_name = "SOCKET")]
    pub dest_qga: Option<PathBuf>,
    /// How long QEMU or the guest agent may take to answer
    #[arg(long, default_value = "15s", value_parser = args::positive_duration)]
    pub timeout: Duration,
    /// immp inside the guest (looked up in the agent's PATH)
    #[arg(long, default_value = "immp", value_name = "PATH")]
    pub guest_immp: String,
    /// The guest immp's journal directory (default: immp's own)
    #[arg(long, value_name = "DIR")]
    pub journal_dir: Option<String>,
    /// The guest's immp lifts its caps by itself after this long, even if never stopped
    #[arg(long, default_value = "2h", value_parser = args::positive_duration)]
    pub max_duration: Duration,
    /// Link bandwidth for immp (default: the migration's max-bandwidth)
    #[arg(long, value_parser = args::bandwidth)]
    pub bandwidth: Option<f64>,
    /// End after the first migration that fails or is cancelled too (a completed one always ends it)
    #[arg(long)]
    pub once: bool,
    /// Output format (default: table on a terminal, json otherwise)
    #[arg(long, value_enum)]
    pub format: Option<EventFormat>,
    /// More `immp throttle` arguments for the guest, after `--` (e.g. -- --floor 5%)
    #[arg(last = true, value_name = "THROTTLE-ARGS")]
    pub extra: Vec<String>,
}

pub fn run(a: HostArgs) -> anyhow::Result<i32> {
    match a.command {
        HostCommand::Watch(w) => run_watch(w),
    }
}

fn run_watch(a: WatchArgs) -> anyhow::Result<i32> {
    let s = Settings {
        qmp: a.qmp,
        qga: a.qga,
        dest_qga: a.dest_qga,
        timeout: a.timeout,
        stop_wait: Duration::from_secs(30),
        guest_immp: a.guest_immp,
        journal_dir: a.journal_dir,
        max_duration: a.max_duration,
        bandwidth: a.bandwidth,
        once: a.once,
        extra: a.extra,
    };
    let out = view::for_format(Format::resolve(a.format.map(Into::into)), std::io::stdout());
    watch::run(&s, out)
}
