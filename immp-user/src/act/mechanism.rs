//! Choosing how to cap: cgroup v2 `cpu.max`, cgroup v1 CFS quota, or signals.
use std::path::PathBuf;

use immp_model::event::Mechanism;

use super::cgroup::{CgroupLayout, CpuController};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MechanismChoice {
    /// cgroup v2 cpu.max if available, else cgroup v1 CFS quota, else signals
    #[default]
    Auto,
    CgroupV2,
    CgroupV1,
    /// SIGSTOP/SIGCONT duty cycle (what cpulimit does; coarse, last resort)
    Signal,
}

pub fn pick_mechanism(choice: MechanismChoice) -> anyhow::Result<(Mechanism, PathBuf)> {
    let layout = CgroupLayout::detect();
    let ctl = layout.cpu_controller();
    let v1 = layout.v1_cpu_mount.clone();
    let v2 = layout
        .v2_mount
        .clone()
        .filter(|_| layout.v2_controllers.iter().any(|c| c == "cpu"));
    let no = |what: &str| {
        crate::environment(format!(
            "no usable cpu controller: {what} (see `immp doctor`)"
        ))
    };
    Ok(match choice {
        MechanismChoice::Auto => match ctl {
            Some(CpuController::V2 { root }) => (Mechanism::CgroupV2, root),
            Some(CpuController::V1 { root }) => (Mechanism::CgroupV1, root),
            None => (Mechanism::Signal, PathBuf::new()),
        },
        MechanismChoice::CgroupV2 => (
            Mechanism::CgroupV2,
            v2.ok_or_else(|| no("cgroup v2 has no cpu controller here"))?,
        ),
        MechanismChoice::CgroupV1 => (
            Mechanism::CgroupV1,
            v1.ok_or_else(|| no("no cgroup v1 cpu hierarchy here"))?,
        ),
        MechanismChoice::Signal => (Mechanism::Signal, PathBuf::new()),
    })
}
