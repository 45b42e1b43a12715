//! The migration lab's first use: boot Debian's own kernel (soft-dirty, BTF, cgroup v2 with a
//! cpu controller) under QEMU TCG from a cpio initramfs holding immp, and run the guest tests.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{release_bin, root, run};

const GUEST_RAM_MB: u32 = 512;
const TIMEOUT: Duration = Duration::from_secs(480);

fn vm_dir() -> PathBuf {
    root().join("target/vm")
}

/// Downloads and unpacks the kernel `linux-image-amd64` depends on (cached).
pub fn kernel() -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = vm_dir().join("kernel");
    std::fs::create_dir_all(&dir)?;
    let deps = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .output()?;
    let text = String::from_utf8_lossy(&deps.stdout);
    let pkg = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Depends: ")
                .filter(|p| p.starts_with("linux-image-"))
        })
        .context("apt-cache depends linux-image-amd64 names no kernel package")?
        .to_string();
    let version = pkg.trim_start_matches("linux-image-").to_string();
    let tree = dir.join(&version);
    let vmlinuz = tree.join(format!("boot/vmlinuz-{version}"));
    if !vmlinuz.exists() {
        eprintln!("vm: downloading {pkg}");
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        run(Command::new("apt-get")
            .args(["download", &pkg])
            .current_dir(&dir)
            .stderr(Stdio::null()))?;
        let deb = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
            })
            .context("downloaded kernel package not found")?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
        let _ = std::fs::remove_file(deb);
    }
    Ok((vmlinuz, tree.join("lib/modules").join(&version)))
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

/// Shared libraries a binary needs, as ldd reports them.
fn libs(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let o = Command::new("ldd").arg(bin).output()?;
    Ok(String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect())
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t cgroup2 none /sys/fs/cgroup
for m in crc32c_generic crc16 mbcache jbd2 ext4; do insmod /modules/$m.ko; done
insmod /modules/brd.ko rd_nr=1 rd_size=65536
mke2fs -q /dev/ram0 && mount -t ext2 /dev/ram0 /mnt
echo "IMMP-BOOTED $(uname -r) thp=$(cat /sys/kernel/mm/transparent_hugepage/enabled) mnt=$(grep -c " /mnt " /proc/mounts)"
tests=$(sed -n 's/.*immp\.tests=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
lab=$(sed -n 's/.*immp\.lab=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$lab" ]; then /bin/immp-guest "lab-$lab"; fi
/bin/immp-guest $tests
sync
poweroff -f
echo o > /proc/sysrq-trigger
"#;

/// Builds the initramfs: busybox, immp, the workloads, the guest tests, their libraries, the
/// few modules a RAM-disk ext2 needs.
pub fn initramfs(modules: &Path) -> anyhow::Result<PathBuf> {
    let rootfs = vm_dir().join("rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    for d in ["bin", "proc", "sys", "dev", "tmp", "mnt", "modules"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    copy(Path::new("/bin/busybox"), &rootfs.join("bin/busybox"))?;
    for b in ["immp", "immp-workload", "immp-guest"] {
        let src = release_bin(b);
        copy(&src, &rootfs.join("bin").join(b))?;
        for lib in libs(&src)? {
            copy(&lib, &rootfs.join(lib.strip_prefix("/").unwrap_or(&lib)))?;
        }
    }
    for m in ["crc32c_generic", "crc16", "mbcache", "jbd2", "ext4", "brd"] {
        let found =
            find_module(modules, &format!("{m}.ko")).with_context(|| format!("module {m}"))?;
        copy(&found, &rootfs.join("modules").join(format!("{m}.ko")))?;
    }
    let init = rootfs.join("init");
    std::fs::write(&init, INIT)?;
    run(Command::new("chmod").arg("755").arg(&init))?;
    let out = vm_dir().join("initrd.gz");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        rootfs.display(),
        out.display()
    )))?;
    Ok(out)
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_module(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

pub struct Guest {
    child: Child,
    pub log: PathBuf,
    pub qmp: PathBuf,
}

impl Guest {
    pub fn boot(vmlinuz: &Path, initrd: &Path, tests: &[String]) -> anyhow::Result<Self> {
        Self::start(
            "test",
            vmlinuz,
            initrd,
            &format!("immp.tests={}", tests.join(",")),
            None,
        )
    }

    /// Starts QEMU; `name` keeps the log and QMP socket of several guests apart; `incoming`
    /// makes it a migration destination listening on 127.0.0.1:PORT.
    pub fn start(
        name: &str,
        vmlinuz: &Path,
        initrd: &Path,
        words: &str,
        incoming: Option<u16>,
    ) -> anyhow::Result<Self> {
        let log = vm_dir().join(format!("{name}.serial.log"));
        let qmp = vm_dir().join(format!("{name}.qmp.sock"));
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(&qmp);
        let append = format!("console=ttyS0 quiet panic=-1 {words}");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-m",
            &GUEST_RAM_MB.to_string(),
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .args(["-monitor", "none"]);
        if let Some(port) = incoming {
            cmd.args(["-incoming", &format!("tcp:127.0.0.1:{port}")]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        Ok(Self { child, log, qmp })
    }

    /// Waits until the serial log contains `marker`.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> anyhow::Result<()> {
        let t = Instant::now();
        while !self.serial().contains(marker) {
            if self.exited() {
                bail!("guest exited before {marker}; log {}", self.log.display());
            }
            if t.elapsed() > timeout {
                bail!("no {marker} after {timeout:?}; log {}", self.log.display());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(())
    }

    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP connection: greeting read, capabilities negotiated.
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> anyhow::Result<Self> {
        let s = UnixStream::connect(path).context("connecting to QMP")?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Self {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        q.read()?; // greeting
        q.cmd("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> anyhow::Result<serde_json::Value> {
        loop {
            let mut l = String::new();
            if self.r.read_line(&mut l)? == 0 {
                bail!("QMP closed");
            }
            let v: serde_json::Value = serde_json::from_str(&l)?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    pub fn cmd(
        &mut self,
        name: &str,
        args: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        writeln!(
            self.w,
            "{}",
            serde_json::json!({"execute": name, "arguments": args})
        )?;
        let v = self.read()?;
        if let Some(e) = v.get("error") {
            bail!("QMP {name}: {e}");
        }
        Ok(v["return"].clone())
    }

    /// QEMU's own estimate of the guest's dirty rate over `secs`, bytes/s (page sampling: the
    /// only mode that works under TCG).
    pub fn dirty_rate(&mut self, secs: u64) -> anyhow::Result<f64> {
        self.cmd(
            "calc-dirty-rate",
            serde_json::json!({"calc-time": secs, "sample-pages": 10000}),
        )?;
        let t = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let r = self.cmd("query-dirty-rate", serde_json::json!({}))?;
            if r["status"] == "measured" {
                // Reported in MiB/s.
                return Ok(r["dirty-rate"].as_f64().unwrap_or(0.0) * 1048576.0);
            }
            if t.elapsed() > Duration::from_secs(secs + 30) {
                bail!("calc-dirty-rate did not finish");
            }
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Boots the guest with these guest-test names and returns its serial log once it is done.
pub fn run_guest(tests: &[String]) -> anyhow::Result<String> {
    crate::setup::ensure_vm()?;
    run(crate::cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let (vmlinuz, modules) = kernel()?;
    let initrd = initramfs(&modules)?;
    let started = Instant::now();
    let mut g = Guest::boot(&vmlinuz, &initrd, tests)?;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        if g.serial().contains("IMMP-DONE") || g.exited() {
            return Ok(g.serial());
        }
        if started.elapsed() > TIMEOUT {
            bail!("guest timed out; serial log: {}", g.log.display());
        }
    }
}

/// Boots the guest, runs the tests, prints a pass/fail table; returns (passed, failed).
pub fn test(tests: Vec<String>) -> anyhow::Result<(u64, u64)> {
    crate::setup::ensure_vm()?;
    run(crate::cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let (vmlinuz, modules) = kernel()?;
    let initrd = initramfs(&modules)?;
    let started = Instant::now();
    eprintln!(
        "vm: booting {} under QEMU TCG ({GUEST_RAM_MB} MiB, 1 vCPU)",
        vmlinuz.display()
    );
    let mut g = Guest::boot(&vmlinuz, &initrd, &tests)?;
    let mut qemu_rates: Vec<f64> = Vec::new();
    let mut progress = 0usize;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let log = g.serial();
        // Progress: echo result lines as they come.
        for l in log.lines().skip(progress) {
            if l.starts_with("IMMP-RESULT") || l.starts_with("IMMP-BOOTED") {
                eprintln!("vm: {l}");
            }
        }
        progress = log.lines().count();
        if log.contains("IMMP-QMP-START") && qemu_rates.is_empty() && !log.contains("IMMP-QMP-END")
        {
            let mut q = Qmp::connect(&g.qmp)?;
            for _ in 0..3 {
                qemu_rates.push(q.dirty_rate(1)?);
            }
            if qemu_rates.is_empty() {
                qemu_rates.push(0.0);
            }
        }
        if log.contains("IMMP-DONE") || g.exited() {
            break;
        }
        if started.elapsed() > TIMEOUT {
            bail!(
                "guest timed out after {:?}; serial log: {}",
                TIMEOUT,
                g.log.display()
            );
        }
    }
    let log = g.serial();
    drop(g);
    let mut rows: Vec<(String, bool, String)> = log
        .lines()
        .filter_map(|l| l.strip_prefix("IMMP-RESULT "))
        .map(|r| {
            let mut it = r.splitn(3, ' ');
            let name = it.next().unwrap_or("").to_string();
            let pass = it.next() == Some("PASS");
            (name, pass, it.next().unwrap_or("").to_string())
        })
        .collect();
    // The QEMU comparison is judged here, where QEMU's figure is.
    if let Some(row) = rows.iter_mut().find(|r| r.0 == "qemu-rate") {
        let after = log.split("IMMP-QMP-START").nth(1).unwrap_or("");
        let mut guest: Vec<f64> = after
            .lines()
            .filter_map(|l| l.strip_prefix("IMMP-RATE ")?.trim().parse().ok())
            .collect();
        let (g, q) = (median(&mut guest), median(&mut qemu_rates.clone()));
        let err = if q > 0.0 { (g - q).abs() / q } else { 1.0 };
        *row = (
            row.0.clone(),
            row.1 && err <= 0.15,
            format!(
                "immp {:.1} MB/s vs QEMU calc-dirty-rate {:.1} MB/s ({:+.1} %; goal within 15 %)",
                g / 1e6,
                q / 1e6,
                (g - q) / q.max(1.0) * 100.0
            ),
        );
    }
    println!(
        "vm-test: {} in {:.0}s (serial log {})",
        vmlinuz.display(),
        started.elapsed().as_secs_f64(),
        vm_dir().join("test.serial.log").display()
    );
    println!("{:<16} {:<5} DETAIL", "TEST", "");
    for (n, p, d) in &rows {
        println!("{n:<16} {:<5} {d}", if *p { "PASS" } else { "FAIL" });
    }
    let failed = rows.iter().filter(|r| !r.1).count();
    println!("vm-test: {} passed, {failed} failed", rows.len() - failed);
    if rows.is_empty() {
        bail!(
            "the guest ran no test (see {})",
            vm_dir().join("test.serial.log").display()
        );
    }
    Ok(((rows.len() - failed) as u64, failed as u64))
}

/// One live migration of a fresh guest running `scenario`, at 12.5 MB/s (100 Mbit/s) over
/// 127.0.0.1, cancelled after `limit`.
pub struct Migration {
    pub scenario: String,
    pub completed: bool,
    pub total_s: f64,
    pub downtime_ms: Option<f64>,
    pub rounds: u64,
    pub transferred_mb: f64,
    pub expected_downtime_ms: Option<f64>,
    pub caps: Vec<f64>,
}

pub fn migrate_lab(
    scenarios: &[&str],
    ring: &str,
    limit: Duration,
) -> anyhow::Result<Vec<Migration>> {
    crate::setup::ensure_vm()?;
    run(crate::cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let (vmlinuz, modules) = kernel()?;
    let initrd = initramfs(&modules)?;
    let mut out = Vec::new();
    for (i, sc) in scenarios.iter().enumerate() {
        let words = format!("immp.lab={sc} IMMP_RING={ring}");
        let port = 44440 + i as u16;
        eprintln!("lab: {sc}: booting the source guest");
        let mut src = Guest::start(&format!("src-{sc}"), &vmlinuz, &initrd, &words, None)?;
        src.wait_for("IMMP-LAB-READY", Duration::from_secs(300))?;
        let dst = Guest::start(&format!("dst-{sc}"), &vmlinuz, &initrd, &words, Some(port))?;
        std::thread::sleep(Duration::from_secs(1));
        let mut q = Qmp::connect(&src.qmp)?;
        q.cmd(
            "migrate-set-parameters",
            serde_json::json!({"max-bandwidth": 12_500_000, "downtime-limit": 300}),
        )?;
        q.cmd(
            "migrate",
            serde_json::json!({"uri": format!("tcp:127.0.0.1:{port}")}),
        )?;
        eprintln!("lab: {sc}: migrating at 100 Mbit/s");
        let t = Instant::now();
        let (completed, last) = loop {
            std::thread::sleep(Duration::from_millis(500));
            let r = q.cmd("query-migrate", serde_json::json!({}))?;
            match r["status"].as_str().unwrap_or("") {
                "completed" => break (true, r),
                "failed" => bail!("{sc}: migration failed: {r}"),
                _ if t.elapsed() > limit => {
                    let _ = q.cmd("migrate_cancel", serde_json::json!({}));
                    break (false, r);
                }
                _ => {}
            }
        };
        let caps: Vec<f64> = src
            .serial()
            .lines()
            .filter(|l| l.contains("\"action\":\"cap\""))
            .filter_map(|l| {
                let v: serde_json::Value =
                    serde_json::from_str(l.trim_start_matches("IMMP-LAB-EVENT ")).ok()?;
                v["cap_pct"].as_f64()
            })
            .collect();
        let ram = &last["ram"];
        out.push(Migration {
            scenario: sc.to_string(),
            completed,
            total_s: last["total-time"]
                .as_f64()
                .map_or(t.elapsed().as_secs_f64(), |ms| ms / 1e3),
            downtime_ms: last["downtime"].as_f64(),
            rounds: ram["dirty-sync-count"].as_u64().unwrap_or(0),
            transferred_mb: ram["transferred"].as_f64().unwrap_or(0.0) / 1e6,
            expected_downtime_ms: last["expected-downtime"].as_f64(),
            caps,
        });
        drop(dst);
        drop(src);
    }
    Ok(out)
}
