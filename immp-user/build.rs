//! Builds the eBPF object (crate `immp-ebpf`) and hands its path to the binary, which embeds it.
//!
//! aya's own `aya-build` drives `rustup run nightly ... -Z build-std`; neither works here (no
//! rust-src download, no nightly new enough), so this calls Debian's rustc-web, which ships a
//! prebuilt `core` for bpfel-unknown-none. `cargo xtask setup` installs all of it.
use std::{env, path::PathBuf, process::Command};

const RUSTC: &str = "/usr/bin/rustc";
const CARGO: &str = "/usr/bin/cargo";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let root = manifest.parent().expect("workspace root").to_path_buf();
    let ebpf_dir = root.join("immp-ebpf");
    for p in ["src", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("immp-common/src").display()
    );
    println!("cargo:rerun-if-env-changed=IMMP_EBPF_OBJECT");

    // An explicit prebuilt object (e.g. built on another machine) skips the eBPF build.
    if let Some(obj) = env::var_os("IMMP_EBPF_OBJECT") {
        println!(
            "cargo:rustc-env=IMMP_EBPF_OBJECT={}",
            PathBuf::from(obj).display()
        );
        return;
    }

    let missing: Vec<&str> = [RUSTC, CARGO]
        .into_iter()
        .filter(|p| !std::path::Path::new(p).exists())
        .collect();
    if !missing.is_empty() || which("bpf-linker").is_none() {
        panic!(
            "the eBPF toolchain is missing ({}{}): run `cargo xtask setup` once",
            missing.join(", "),
            if which("bpf-linker").is_none() {
                " bpf-linker"
            } else {
                ""
            }
        );
    }

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it"));
    let target_dir = out.join("ebpf-target");
    let mut cmd = Command::new(CARGO);
    // Start from a clean slate: the outer cargo's variables (RUSTC, RUSTFLAGS, CARGO_*,
    // RUSTUP_TOOLCHAIN, ...) describe the host build and would break the BPF one.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k.starts_with("RUSTUP")
            || k.starts_with("RUSTFLAGS")
            || k.starts_with("RUSTDOC")
            || matches!(
                k.as_str(),
                "TARGET" | "HOST" | "OUT_DIR" | "OPT_LEVEL" | "PROFILE" | "DEBUG" | "NUM_JOBS"
            )
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd
        .current_dir(&ebpf_dir)
        .env("RUSTC", RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
        ])
        .arg(&target_dir)
        .status()
        .expect("spawn /usr/bin/cargo");
    if !status.success() {
        panic!("building the eBPF object failed ({status})");
    }
    let obj = target_dir.join("bpfel-unknown-none/release/immp");
    println!("cargo:rustc-env=IMMP_EBPF_OBJECT={}", obj.display());
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}
