//! `immp doctor`: what this kernel and machine allow, tested by effect, and what immp will do.
use serde::Serialize;

use crate::{
    cgroup::{CgroupLayout, CpuController},
    probes::{FlavourChoice, ProbeOptions, Probes},
    softdirty,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What immp does with this capability (or without it).
    pub consequence: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub kernel: String,
    pub checks: Vec<Check>,
    /// False only when immp cannot measure at all.
    pub usable: bool,
}

fn check(
    name: &'static str,
    status: Status,
    detail: impl Into<String>,
    consequence: impl Into<String>,
) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        consequence: consequence.into(),
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Touch `pages` fresh anonymous pages and return how many new-page write faults the probes
/// counted for this process: proves that events flow, not only that attach returned Ok.
fn self_test(probes: &Probes, pages: usize) -> u64 {
    let me = std::process::id();
    let before = probes
        .read_counters()
        .into_iter()
        .find(|(p, _)| *p == me)
        .map_or(0, |(_, c)| c.write_new);
    let page = crate::procinfo::page_size() as usize;
    // A fresh mapping, not the heap: malloc may hand back memory that is already faulted in.
    // SAFETY: anonymous private mapping, written only within its length, unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            pages * page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return 0;
        }
        for i in 0..pages {
            std::ptr::write_volatile((p as *mut u8).add(i * page), 1);
        }
        libc::munmap(p, pages * page);
    }
    let after = probes
        .read_counters()
        .into_iter()
        .find(|(p, _)| *p == me)
        .map_or(0, |(_, c)| c.write_new);
    after.saturating_sub(before)
}

pub fn run() -> Report {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut checks = Vec::new();
    let root = is_root();
    checks.push(if root {
        check(
            "root",
            Status::Ok,
            "running as root",
            "can load eBPF programs and move processes between cgroups",
        )
    } else {
        check(
            "root",
            Status::Fail,
            "not running as root",
            "nothing works: eBPF and cgroups need root",
        )
    });

    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown (securityfs not mounted)".into());
    checks.push(check(
        "lockdown",
        Status::Ok,
        lockdown,
        "immp uses only tracepoints, which lockdown allows (no kprobes, no fentry)",
    ));

    let btf = crate::btfinfo::load_vmlinux();
    let folio = btf.as_ref().ok().and_then(crate::btfinfo::folio_layout);
    checks.push(match &btf {
        Ok(_) => check(
            "btf",
            Status::Ok,
            crate::btfinfo::VMLINUX_BTF,
            "BTF tracepoints (tp_btf) can be used",
        ),
        Err(e) => check(
            "btf",
            Status::Warn,
            format!("{e:#}"),
            "falls back to classic tracepoints",
        ),
    });
    checks.push(match folio {
        Some(f) => check(
            "folio-size",
            Status::Ok,
            format!(
                "struct folio page count at byte {}, PG_head bit {}",
                f.nr_pages_offset, f.pg_head_bit
            ),
            "large page-cache folios count all their pages",
        ),
        None => check(
            "folio-size",
            Status::Warn,
            "layout not found in BTF",
            "each dirtied page-cache folio counts as one page (lower bound)",
        ),
    });

    let mut usable = false;
    if root {
        for (name, choice, what) in [
            ("probes-btf", FlavourChoice::Btf, "preferred probes"),
            (
                "probes-tracepoint",
                FlavourChoice::Tracepoint,
                "fallback probes",
            ),
        ] {
            let opts = ProbeOptions {
                flavour: choice,
                ..ProbeOptions::default()
            };
            checks.push(match Probes::load(&opts) {
                Ok(p) => {
                    let n = self_test(&p, 256);
                    let hooks: Vec<String> = p
                        .report
                        .hooks
                        .iter()
                        .map(|(h, r)| {
                            format!("{h}:{}", if r.is_ok() { "attached" } else { "absent" })
                        })
                        .collect();
                    let counted_ok = n >= 256;
                    usable |= counted_ok;
                    check(
                        name,
                        if counted_ok { Status::Ok } else { Status::Fail },
                        format!(
                            "{}; self-test counted {n}/256 page faults",
                            hooks.join(", ")
                        ),
                        format!(
                            "{what}: {}",
                            if counted_ok {
                                "usable"
                            } else {
                                "attached but counted nothing"
                            }
                        ),
                    )
                }
                Err(e) => check(
                    name,
                    Status::Warn,
                    format!("{e:#}"),
                    format!("{what}: not available"),
                ),
            });
        }
    }

    checks.push(match softdirty::supported() {
        Ok(true) => check(
            "soft-dirty",
            Status::Ok,
            "clear_refs 4 clears and a write sets pagemap bit 55",
            "exact dirty counting is possible",
        ),
        Ok(false) => check(
            "soft-dirty",
            Status::Warn,
            "clear_refs 4 accepted but pagemap bit 55 never set (CONFIG_MEM_SOFT_DIRTY off)",
            "dirty rates are lower bounds (mode: bounds)",
        ),
        Err(e) => check(
            "soft-dirty",
            Status::Warn,
            e,
            "dirty rates are lower bounds (mode: bounds)",
        ),
    });

    let cg = CgroupLayout::detect();
    checks.push(
        match (&cg.v2_mount, cg.v2_controllers.iter().any(|c| c == "cpu")) {
            (Some(m), true) => check(
                "cgroup-v2-cpu",
                Status::Ok,
                format!("{} has the cpu controller", m.display()),
                "caps use cpu.max",
            ),
            (Some(m), false) => check(
                "cgroup-v2-cpu",
                Status::Warn,
                format!(
                    "{} without cpu controller (controllers: {})",
                    m.display(),
                    cg.v2_controllers.join(" ")
                ),
                "cpu.max not usable",
            ),
            (None, _) => check(
                "cgroup-v2-cpu",
                Status::Warn,
                "no cgroup2 mount",
                "cpu.max not usable",
            ),
        },
    );
    checks.push(match &cg.v1_cpu_mount {
        Some(m) => check(
            "cgroup-v1-cpu",
            Status::Ok,
            format!("{} (cpu.cfs_quota_us)", m.display()),
            "CFS quota usable",
        ),
        None => check(
            "cgroup-v1-cpu",
            Status::Warn,
            "no v1 cpu hierarchy",
            "CFS quota not usable",
        ),
    });
    let mech = match cg.cpu_controller() {
        Some(CpuController::V2 { root }) => format!("cgroup v2 cpu.max under {}", root.display()),
        Some(CpuController::V1 { root }) => format!("cgroup v1 CFS quota under {}", root.display()),
        None => "SIGSTOP/SIGCONT duty cycle (no cgroup cpu controller)".into(),
    };
    checks.push(check(
        "cap-mechanism",
        Status::Ok,
        mech,
        "how `immp throttle` caps a process",
    ));

    checks.push(if crate::probes::tracefs_mounted() {
        check(
            "tracefs",
            Status::Ok,
            "/sys/kernel/tracing",
            "classic tracepoints can attach",
        )
    } else {
        check(
            "tracefs",
            Status::Warn,
            "not mounted",
            "immp mounts it if it needs the classic-tracepoint fallback",
        )
    });

    Report {
        kernel,
        checks,
        usable: root && usable,
    }
}

pub fn print_table(r: &Report, out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(out, "immp doctor: kernel {}", r.kernel)?;
    writeln!(
        out,
        "{:<18} {:<5} {:<70} WHAT IMMP DOES",
        "CHECK", "", "DETAIL"
    )?;
    for c in &r.checks {
        let s = match c.status {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        writeln!(
            out,
            "{:<18} {:<5} {:<70} {}",
            c.name, s, c.detail, c.consequence
        )?;
    }
    writeln!(
        out,
        "{}",
        if r.usable {
            "immp can work here."
        } else {
            "immp cannot work here (see FAIL rows)."
        }
    )
}
