//! `cargo xtask install`: the release binary to `<prefix>/bin/immp` and the systemd unit of
//! `immp serve` (dist/immp.service, its paths pointed at that binary) to the unit directory.
//! Enabling the service is left to the operator (a line says how): it caps processes with
//! `--auto`, which is the operator's decision.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;

#[derive(Args)]
pub struct Opts {
    /// Installation prefix: the binary goes to PREFIX/bin/immp
    #[arg(long, default_value = "/usr/local")]
    prefix: PathBuf,
    /// Where the unit file goes
    #[arg(long, default_value = "/etc/systemd/system")]
    unit_dir: PathBuf,
    /// Say what would be done; build, copy and reload nothing
    #[arg(long)]
    dry_run: bool,
}

/// The path the shipped unit names; replaced by the installed binary's.
const SHIPPED_BIN: &str = "/usr/local/bin/immp";

pub fn run(o: Opts) -> anyhow::Result<()> {
    let bin = o.prefix.join("bin/immp");
    let unit = o.unit_dir.join("immp.service");
    let text = std::fs::read_to_string(crate::root().join("dist/immp.service"))
        .context("reading dist/immp.service")?;
    if !bin.is_absolute() {
        bail!("--prefix must be an absolute path (the unit names the binary by it)");
    }
    let text = text.replace(SHIPPED_BIN, &bin.display().to_string());
    let built = crate::release_bin("immp");
    let say = |what: String| println!("{}{what}", if o.dry_run { "would " } else { "" });
    say("build the release binary (cargo build --release -p immp-user)".into());
    say(format!(
        "install {} -> {} (0755)",
        built.display(),
        bin.display()
    ));
    say(format!(
        "install dist/immp.service -> {} (0644)",
        unit.display()
    ));
    if o.dry_run {
        return Ok(());
    }
    crate::setup::ensure()?;
    crate::run(crate::cargo().args(["build", "--release", "-p", "immp-user"]))?;
    copy_atomic(&std::fs::read(&built)?, &bin, 0o755)?;
    copy_atomic(text.as_bytes(), &unit, 0o644)?;
    verify(&unit);
    if Path::new("/run/systemd/system").exists() && o.unit_dir.starts_with("/etc/systemd") {
        crate::run(std::process::Command::new("systemctl").arg("daemon-reload"))?;
        println!("systemctl daemon-reload: done");
    }
    println!(
        "next: put the arguments in /etc/default/immp (IMMP_SERVE_ARGS=--bandwidth 1Gbit), then \
         `systemctl enable --now immp`; metrics at http://127.0.0.1:9745/metrics"
    );
    Ok(())
}

/// Writes `bytes` to `to` through a temporary file and a rename: a running immp keeps its old
/// binary, and no reader ever sees half a file.
fn copy_atomic(bytes: &[u8], to: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = to.parent().context("no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        to.file_name().context("no file name")?.to_string_lossy()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))?;
    println!("installed {}", to.display());
    Ok(())
}

/// `systemd-analyze verify` on the installed unit, where the tool exists (a warning only: the
/// unit is installed either way).
fn verify(unit: &Path) {
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output();
    match out {
        Ok(o) if o.status.success() && o.stderr.is_empty() => {
            println!("systemd-analyze verify {}: ok", unit.display())
        }
        Ok(o) => eprintln!(
            "systemd-analyze verify {}: {}",
            unit.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(_) => println!("systemd-analyze not found: unit not verified"),
    }
}
