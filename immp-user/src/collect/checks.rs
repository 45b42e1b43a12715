//! `immp doctor`'s checks: what this kernel and machine allow, tested by effect, and what immp
//! will do with it.
use serde::Serialize;

use super::{
    btf,
    probes::{FlavourChoice, ProbeOptions, Probes},
    softdirty,
};
use crate::{
    act::cgroup::{CgroupLayout, CpuController},
    error::is_root,
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

/// Touch `pages` fresh anonymous pages and return how many new-page write faults the probes
/// counted for this process: proves that events flow, not only that attach returned Ok.
fn self_test(probes: &Probes, pages: usize) -> u64 {
    let me = std::process::id();
    let before = probes
        .read_counters()
        .into_iter()
        .find(|(p, _)| *p == me)
        .map_or(0, |(_, c)| c.write_new);
    let page = super::procfs::page_size() as usize;
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

/// Writes `pages` pages of a fresh memfd twice over with pwrite(), and returns how many shmem
/// pages the probes counted for this process (each page once per window: `pages`).
fn shmem_self_test(probes: &Probes, pages: usize) -> u64 {
    let me = std::process::id();
    let count = || probes.counters_of(me).map_or(0, |c| c.shmem_pages);
    let page = super::procfs::page_size() as usize;
    let before = count();
    // SAFETY: a fresh memfd we own and close; pwrite from a buffer of exactly one page.
    unsafe {
        let fd = libc::memfd_create(c"immp-doctor".as_ptr(), 0);
        if fd < 0 {
            return 0;
        }
        let buf = vec![0x5au8; page];
        for _pass in 0..2 {
            for i in 0..pages {
                libc::pwrite(fd, buf.as_ptr().cast(), page, (i * page) as i64);
            }
        }
        libc::close(fd);
    }
    count().saturating_sub(before)
}

pub fn run() -> Report {
    let kernel = super::probes::kernel_release();
    let root = is_root();
    let mut checks = vec![root_check(root), lockdown_check()];
    checks.extend(btf_checks());
    let mut usable = false;
    if root {
        let (probe_checks, ok) = probe_checks();
        checks.extend(probe_checks);
        usable = ok;
    }
    checks.push(softdirty_check());
    checks.push(round_zero_check());
    checks.extend(cgroup_checks());
    checks.push(tracefs_check());
    Report {
        kernel,
        checks,
        usable: root && usable,
    }
}

/// Round 0 of a migration: the non-zero memory a hypervisor sends first, which every
/// prediction (and `--auto`'s default goal) starts from.
fn round_zero_check() -> Check {
    use super::nonzero::{RoundZero, round_zero};
    let mb = |b: f64| b / 1e6;
    match round_zero() {
        RoundZero::Sampled(e) => check(
            "round-zero",
            Status::Ok,
            format!(
                "{:.0} MB of {:.0} MB RAM non-zero ({} of {} pages sampled from /proc/kcore)",
                mb(e.bytes),
                mb(e.ram_bytes),
                e.nonzero,
                e.samples
            ),
            "predictions start from what the hypervisor really sends first",
        ),
        RoundZero::InUse(b, why) => check(
            "round-zero",
            Status::Warn,
            format!("{why}: memory in use, {:.0} MB (a lower bound)", mb(b)),
            "predictions may run short: freed pages keep their bytes and are sent too; \
             give --ram what an idle migration of this guest sent",
        ),
    }
}

fn root_check(root: bool) -> Check {
    if root {
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
    }
}

fn lockdown_check() -> Check {
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown (securityfs not mounted)".into());
    check(
        "lockdown",
        Status::Ok,
        lockdown,
        "immp uses only tracepoints, which lockdown allows (no kprobes, no fentry)",
    )
}

fn btf_checks() -> Vec<Check> {
    let vmlinux = btf::load_vmlinux();
    let folio = vmlinux.as_ref().ok().and_then(btf::folio_layout);
    let b = match &vmlinux {
        Ok(_) => check(
            "btf",
            Status::Ok,
            btf::VMLINUX_BTF,
            "tracepoints and folio layout can be checked in BTF (raw tracepoints)",
        ),
        Err(e) => check(
            "btf",
            Status::Warn,
            format!("{e:#}"),
            "falls back to classic tracepoints",
        ),
    };
    let f = match folio {
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
    };
    vec![b, f]
}

/// Each probe flavour attached and self-tested, then what `--probes auto` picks and why.
fn probe_checks() -> (Vec<Check>, bool) {
    let mut checks = Vec::new();
    let mut usable = false;
    let mut btf_error = None;
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
        let c = match Probes::load(&opts) {
            Ok(p) => {
                let c = probe_check(name, what, &p);
                // Counting works even when only the shmem class is missing (a warning).
                usable |= c.status != Status::Fail;
                c
            }
            Err(e) => {
                if choice == FlavourChoice::Btf {
                    btf_error = Some(format!("{e:#}"));
                }
                check(
                    name,
                    Status::Warn,
                    format!("{e:#}"),
                    format!("{what}: not available"),
                )
            }
        };
        checks.push(c);
    }
    checks.push(match btf_error {
        None => check("probes-auto", Status::Ok, "raw tracepoints (BTF-checked) load", "--probes auto uses btf"),
        Some(e) => check(
            "probes-auto",
            Status::Warn,
            format!("raw tracepoints failed: {e}"),
            "--probes auto falls back to classic tracepoints (this reason is in every output's fallback_reason)",
        ),
    });
    (checks, usable)
}

fn probe_check(name: &'static str, what: &str, p: &Probes) -> Check {
    let n = self_test(p, 256);
    let (shmem, shmem_ok) = if p.report.shmem_known {
        let m = shmem_self_test(p, 64);
        // The per-window page set is bounded and shared by every process: on a busy machine
        // other processes' writes between the two passes can evict a few of ours, which are
        // then counted again (seen: 66/64 while compiling). Counting works when all 64 count;
        // rewrites are deduplicated when at most 1 in 8 comes back (none would be 128).
        let again = m.saturating_sub(64);
        let note = if again > 0 {
            format!(
                " ({again} counted again: evicted from the page set by other processes' writes)"
            )
        } else {
            String::new()
        };
        let s = format!("; shmem self-test counted {m}/64 pages written twice{note}");
        (s, (64..=72).contains(&m))
    } else {
        let s = "; shmem writes not counted (no file layout in BTF or no syscall hook)";
        (s.to_string(), false)
    };
    let hooks: Vec<String> = p
        .report
        .hooks
        .iter()
        .map(|(h, r)| format!("{h}:{}", if r.is_ok() { "attached" } else { "absent" }))
        .collect();
    let ok = n >= 256;
    check(
        name,
        match (ok, shmem_ok) {
            (false, _) => Status::Fail,
            (true, false) => Status::Warn,
            (true, true) => Status::Ok,
        },
        format!(
            "{}; self-test counted {n}/256 page faults{shmem}",
            hooks.join(", ")
        ),
        format!(
            "{what}: {}",
            if ok {
                "usable"
            } else {
                "attached but counted nothing"
            }
        ),
    )
}

fn softdirty_check() -> Check {
    let bounds = "dirty rates are lower bounds (mode: bounds)";
    match softdirty::supported() {
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
            bounds,
        ),
        Err(e) => check("soft-dirty", Status::Warn, e, bounds),
    }
}

fn cgroup_checks() -> Vec<Check> {
    let cg = CgroupLayout::detect();
    let v2 = match (&cg.v2_mount, cg.v2_controllers.iter().any(|c| c == "cpu")) {
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
    };
    let v1 = match &cg.v1_cpu_mount {
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
    };
    let mech = match cg.cpu_controller() {
        Some(CpuController::V2 { root }) => format!("cgroup v2 cpu.max under {}", root.display()),
        Some(CpuController::V1 { root }) => format!("cgroup v1 CFS quota under {}", root.display()),
        None => "SIGSTOP/SIGCONT duty cycle (no cgroup cpu controller)".into(),
    };
    vec![
        v2,
        v1,
        check(
            "cap-mechanism",
            Status::Ok,
            mech,
            "how `immp throttle` caps a process",
        ),
    ]
}

fn tracefs_check() -> Check {
    if super::probes::tracefs_mounted() {
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
    }
}
