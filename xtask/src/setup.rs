//! The toolchain recipe of shared/toolchain.md, automated and idempotent: Debian's rustc-web
//! (with a prebuilt `core` for bpfel-unknown-none) and bpf-linker 0.13 built against LLVM 22.
//! Newer aya needs rustc 1.98, which no toolchain here has: this is the generation that builds.
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

/// (package, a file it installs): present file = nothing to do.
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "/usr/bin/rustc"),
    ("cargo-web", "/usr/bin/cargo"),
    (
        "libstd-rust-web-dev-bpf",
        "/usr/lib/rustlib/bpfel-unknown-none/lib",
    ),
    (
        "llvm-22-dev",
        "/usr/include/llvm-22/llvm/Config/llvm-config.h",
    ),
    ("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    ("libzstd-dev", "/usr/include/zstd.h"),
    ("zlib1g-dev", "/usr/include/zlib.h"),
    // Benchmarks compare against the paper's tool; tests use setpriv (util-linux, always there).
    ("cpulimit", "/usr/bin/cpulimit"),
    // `immp top`'s end-to-end tests drive the real TUI in a real terminal.
    ("tmux", "/usr/bin/tmux"),
    // `immp host watch`'s tests talk to a real qemu-ga (unix-listen, a fake immp behind it).
    ("qemu-guest-agent", "/usr/sbin/qemu-ga"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    apt_install(&missing)?;
    if !bpf_linker_ok() {
        eprintln!(
            "xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        // The PATH prefix matters: /usr/bin/llvm-config on this image is LLVM 14.
        crate::run(
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .env("PATH", path)
                .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"]),
        )?;
        if !bpf_linker_ok() {
            bail!("bpf-linker {BPF_LINKER_VERSION} still not found on PATH after installing it");
        }
    }
    if missing.is_empty() {
        eprintln!(
            "xtask setup: toolchain present (rustc-web, BPF core, bpf-linker {BPF_LINKER_VERSION})"
        );
    }
    Ok(())
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

/// What the QEMU lab needs on the host.
const VM_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    // Debian's 6.12 modules are .ko.xz; the initramfs gets them decompressed.
    ("xz-utils", "/usr/bin/xz"),
    // The guest agent (copied into the guest image with its libraries): the lab's
    // `host-triggered` policy drives immp in the guest through it (`immp host watch`).
    ("qemu-guest-agent", "/usr/sbin/qemu-ga"),
];

pub fn ensure_vm() -> anyhow::Result<()> {
    let missing: Vec<&str> = VM_PACKAGES
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    apt_install(&missing)
}

/// What the migration lab needs besides the guests': cpulimit (the paper's method, copied
/// into the initramfs; also in PACKAGES) and a font for the plots' text.
const LAB_PACKAGES: &[(&str, &str)] = &[
    ("cpulimit", "/usr/bin/cpulimit"),
    (
        "fonts-dejavu-core",
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    ),
];

pub fn ensure_lab() -> anyhow::Result<()> {
    let missing: Vec<&str> = LAB_PACKAGES
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    apt_install(&missing)
}

/// Installs these Debian packages (nothing when the list is empty).
fn apt_install(missing: &[&str]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask setup: installing {} (apt)", missing.join(" "));
    crate::run(Command::new("apt-get").args(["update", "-qq"]))?;
    crate::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq"])
            .args(missing),
    )
    .with_context(|| {
        format!(
            "apt-get install {} failed (are you root? install them by hand)",
            missing.join(" ")
        )
    })
}
