//! The migration lab's first use: boot Debian's own kernels (soft-dirty, BTF, cgroup v2 with a
//! cpu controller) under QEMU TCG from a cpio initramfs holding immp, and run the guest tests
//! on each kernel of the matrix in turn.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use flate2::Compression;

use crate::{release_bin, root, run};

mod fidelity;

pub const GUEST_RAM_MB: u32 = 512;
const TIMEOUT: Duration = Duration::from_secs(480);
/// The test guests' scratch disk (sparse on the host).
const DISK_BYTES: u64 = 256 << 20;

pub fn vm_dir() -> PathBuf {
    root().join("target/vm")
}

/// A guest kernel of the test matrix: the name `--kernel` takes, and the Debian package that
/// always depends on the newest image of that line (so the matrix follows security updates).
pub struct Kernel {
    pub name: &'static str,
    meta: &'static str,
}

/// Debian 12's generic 6.1, its cloud flavour (what cloud VMs run; other built-ins), and 6.12
/// (bookworm's newer line). The first is the default of the benchmarks.
pub static KERNELS: [Kernel; 3] = [
    Kernel {
        name: "6.1",
        meta: "linux-image-amd64",
    },
    Kernel {
        name: "6.1-cloud",
        meta: "linux-image-cloud-amd64",
    },
    Kernel {
        name: "6.12",
        meta: "linux-image-6.12-amd64",
    },
];

/// `--kernel`'s values, for clap to check and to list in --help.
pub fn kernel_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(KERNELS.iter().map(|k| k.name))
}

/// The kernels with these names, in matrix order; all of them when `names` is empty.
pub fn select(names: &[String]) -> anyhow::Result<Vec<&'static Kernel>> {
    if let Some(bad) = names.iter().find(|n| !KERNELS.iter().any(|k| k.name == *n)) {
        let known: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        bail!("unknown kernel {bad:?} (known: {})", known.join(", "));
    }
    Ok(KERNELS
        .iter()
        .filter(|k| names.is_empty() || names.iter().any(|n| n == k.name))
        .collect())
}

/// A kernel package unpacked in its own cache directory.
pub struct Unpacked {
    package: String,
    vmlinuz: PathBuf,
    tree: PathBuf,
    release: String,
}

impl Unpacked {
    fn modules(&self) -> PathBuf {
        self.tree.join("lib/modules").join(&self.release)
    }
}

impl Kernel {
    /// Downloads and unpacks the image package the meta package depends on (cached per
    /// release under target/vm/kernel/).
    pub fn fetch(&self) -> anyhow::Result<Unpacked> {
        let pkg = image_package(self.meta)?;
        let release = pkg.trim_start_matches("linux-image-").to_string();
        let dir = vm_dir().join("kernel");
        let tree = dir.join(&release);
        let vmlinuz = tree.join(format!("boot/vmlinuz-{release}"));
        if !vmlinuz.exists() {
            eprintln!("vm: {}: downloading {pkg}", self.name);
            download(&pkg, &dir, &tree).with_context(|| format!("kernel {}", self.name))?;
        }
        if !vmlinuz.exists() {
            bail!("{pkg} unpacked, but it has no {}", vmlinuz.display());
        }
        Ok(Unpacked {
            package: pkg,
            vmlinuz,
            tree,
            release,
        })
    }
}

/// The `linux-image-*` package a meta package depends on, e.g. linux-image-6.1.0-56-amd64.
fn image_package(meta: &str) -> anyhow::Result<String> {
    let deps = Command::new("apt-cache")
        .args(["depends", meta])
        .output()
        .context("running apt-cache")?;
    let text = String::from_utf8_lossy(&deps.stdout);
    let pkg = text.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Depends: ")
            .filter(|p| p.starts_with("linux-image-"))
    });
    Ok(pkg
        .with_context(|| format!("apt-cache depends {meta} names no kernel package"))?
        .to_string())
}

/// `apt-get download` into `dir`, then `dpkg-deb -x` into `tree`; the .deb is removed.
fn download(pkg: &str, dir: &Path, tree: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    run(Command::new("apt-get")
        .args(["download", pkg])
        .current_dir(dir)
        .stderr(Stdio::null()))?;
    let prefix = format!("{pkg}_");
    let deb = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        })
        .with_context(|| format!("downloaded {pkg} not found in {}", dir.display()))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(tree))?;
    let _ = std::fs::remove_file(deb);
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
while read m args; do
    insmod /modules/$m.ko $args || echo "IMMP-INSMOD-FAILED $m"
done < /modules/load
mke2fs -q /dev/ram0 && mount -t ext2 /dev/ram0 /mnt
# The fidelity matrix's tmpfs, disk (ext2 on virtio-blk: its writeback dirties no guest page,
# unlike the RAM disk's copy into pages of its own) and loopback.
mkdir -p /dev/shm /disk && mount -t tmpfs shm /dev/shm
for i in 1 2 3 4 5; do [ -b /dev/vda ] && break; sleep 1; done
[ -b /dev/vda ] && mke2fs -q /dev/vda && mount -t ext2 /dev/vda /disk
ifconfig lo 127.0.0.1 up
# qemu-guest-agent on its virtio-serial port, when QEMU has one (the lab's guests). Without
# udev there is no /dev/virtio-ports/NAME link: the port is found by its name in sysfs.
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
    PATH=/bin:/usr/bin:/usr/sbin /usr/sbin/qemu-ga -d -m virtio-serial -p /dev/${p##*/} -f /tmp/qemu-ga.pid -t /tmp -l /tmp/qemu-ga.log && echo "IMMP-QGA started on /dev/${p##*/}"
done
echo "IMMP-BOOTED $(uname -r) thp=$(cat /sys/kernel/mm/transparent_hugepage/enabled) mnt=$(grep -c " /mnt " /proc/mounts) disk=$(grep -c " /disk " /proc/mounts)"
tests=$(sed -n 's/.*immp\.tests=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
lab=$(sed -n 's/.*immp\.lab=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$lab" ]; then /bin/immp-guest "lab-$lab"; fi
/bin/immp-guest $tests
sync
poweroff -f
echo o > /proc/sysrq-trigger
"#;

/// What a RAM-disk ext2 on /mnt needs, in load order, with module parameters.
/// crc32c_generic comes first: ext4 and jbd2 ask the crypto API for "crc32c" (a soft
/// dependency that insmod does not follow).
const MODULES: &[(&str, &str)] = &[
    ("crc32c_generic", ""),
    ("crc16", ""),
    ("mbcache", ""),
    ("jbd2", ""),
    ("ext4", ""),
    ("brd", "rd_nr=1 rd_size=65536"),
    // The guest agent's virtio-serial port (the migration lab's `host-triggered` policy).
    ("virtio_ring", ""),
    ("virtio", ""),
    ("virtio_pci_modern_dev", ""),
    ("virtio_pci_legacy_dev", ""),
    ("virtio_pci", ""),
    ("virtio_console", ""),
    // The fidelity matrix's disk (vm-test guests only).
    ("virtio_blk", ""),
];

/// How MODULES reach one kernel: built-in ones need nothing but their parameters on the
/// kernel command line, the others are copied (uncompressed) and loaded by /init.
#[derive(Default)]
struct ModulePlan {
    files: Vec<(String, Vec<u8>)>,
    load: String,
    cmdline: Vec<String>,
    builtin: Vec<&'static str>,
}

fn module_plan(k: &Unpacked) -> anyhow::Result<ModulePlan> {
    let dir = k.modules();
    let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
        .with_context(|| format!("reading modules.builtin of {}", k.release))?;
    let mut plan = ModulePlan::default();
    for (m, params) in MODULES {
        let ko = format!("{m}.ko");
        if builtin
            .lines()
            .any(|l| l.rsplit('/').next() == Some(ko.as_str()))
        {
            plan.builtin.push(m);
            // Built-in modules take their parameters as MODULE.PARAM=VALUE words.
            let words = params.split_whitespace().map(|p| format!("{m}.{p}"));
            plan.cmdline.extend(words);
            continue;
        }
        let found = find_module(&dir, m).with_context(|| {
            format!(
                "{}: module {m} is neither built in nor in {}",
                k.release,
                dir.display()
            )
        })?;
        plan.files
            .push((format!("modules/{ko}"), module_bytes(&found)?));
        plan.load.push_str(&format!("{m} {params}\n"));
    }
    Ok(plan)
}

/// A module file as the kernel's init_module takes it. Debian's 6.12 ships them
/// xz-compressed; decompressing here keeps the guest independent of whether busybox's insmod
/// was built with xz support.
fn module_bytes(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let o = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .context("running xz")?;
        if !o.status.success() {
            bail!("xz -dc {} failed ({})", path.display(), o.status);
        }
        return Ok(o.stdout);
    }
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// NAME.ko or NAME.ko.xz under `dir`.
fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_module(&p, name) {
                return Some(f);
            }
        } else if p
            .file_name()
            .and_then(|n| n.to_str()?.strip_prefix(name))
            .is_some_and(|ext| ext == ".ko" || ext == ".ko.xz")
        {
            return Some(p);
        }
    }
    None
}

/// A kernel ready to boot: its image, an initramfs built for it, and the words its command
/// line needs (parameters of built-in modules).
pub struct Boot {
    package: String,
    vmlinuz: PathBuf,
    initrd: PathBuf,
    words: String,
}

/// Fetches the kernel and builds its initramfs: busybox, immp, the workloads, the guest
/// tests, their libraries, and the modules a RAM-disk ext2 needs on this kernel.
pub fn prepare(k: &'static Kernel) -> anyhow::Result<Boot> {
    prepare_as(k, "")
}

/// `prepare`, the initramfs named with `tag` (the lab's own, so that a vm-test started
/// meanwhile never rewrites the file a lab guest is booting from).
pub fn prepare_as(k: &'static Kernel, tag: &str) -> anyhow::Result<Boot> {
    let unpacked = k.fetch()?;
    let plan = module_plan(&unpacked)?;
    if !plan.builtin.is_empty() {
        eprintln!("vm: {}: built in: {}", k.name, plan.builtin.join(" "));
    }
    let initrd = vm_dir().join(format!("initrd-{tag}{}.gz", k.name));
    initramfs(&plan, &initrd).with_context(|| format!("initramfs for {}", k.name))?;
    Ok(Boot {
        package: unpacked.package,
        vmlinuz: unpacked.vmlinuz,
        initrd,
        words: plan.cmdline.join(" "),
    })
}

/// Writes the gzip-compressed newc archive straight from memory (no staging directory).
fn initramfs(plan: &ModulePlan, out: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    // Level 1, as `gzip -1` before: the archive is rebuilt every run, and speed wins.
    let gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(file), Compression::fast());
    let mut w = crate::cpio::Writer::new(gz);
    for d in [
        "bin", "proc", "sys", "dev", "tmp", "mnt", "disk", "modules", "usr", "usr/bin", "usr/sbin",
    ] {
        w.dir(d)?;
    }
    w.file("init", 0o755, INIT.as_bytes())?;
    add_file(&mut w, Path::new("/bin/busybox"), "bin/busybox")?;
    for b in ["immp", "immp-workload", "immp-guest"] {
        let src = release_bin(b);
        add_file(&mut w, &src, &format!("bin/{b}"))?;
        for lib in libs(&src)? {
            add_file(&mut w, &lib, &lib.to_string_lossy())?;
        }
    }
    // The paper's method, and the guest agent `immp host watch` drives immp through, for
    // the migration lab (both installed by `cargo xtask setup`).
    for tool in ["/usr/bin/cpulimit", "/usr/sbin/qemu-ga"] {
        let tool = Path::new(tool);
        if tool.exists() {
            add_file(&mut w, tool, &tool.to_string_lossy()[1..])?;
            for lib in libs(tool)? {
                add_file(&mut w, &lib, &lib.to_string_lossy())?;
            }
        }
    }
    for (path, data) in &plan.files {
        w.file(path, 0o644, data)?;
    }
    w.file("modules/load", 0o644, plan.load.as_bytes())?;
    w.finish()?.finish()?.flush()?;
    Ok(())
}

/// Copies a host file into the archive, keeping its permission bits. Libraries that several
/// binaries need are written once.
fn add_file<W: Write>(w: &mut crate::cpio::Writer<W>, from: &Path, to: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if w.has(to) {
        return Ok(());
    }
    let data = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    let perm = std::fs::metadata(from)?.permissions().mode();
    w.file(to, perm, &data)
}

pub struct Guest {
    child: Child,
    pub log: PathBuf,
    pub qmp: PathBuf,
    /// With an agent: its socket, and a second QMP socket for `immp host watch` (the lab
    /// keeps the first one).
    pub qga: PathBuf,
    pub watch_qmp: PathBuf,
    slot: Option<usize>,
}

impl Guest {
    /// Boots `boot` to run these guest tests (all when empty); `name` keeps logs apart.
    /// A test guest also gets a blank scratch disk (virtio-blk, formatted by /init) for the
    /// fidelity matrix's file writers.
    pub fn boot(name: &str, boot: &Boot, tests: &[String]) -> anyhow::Result<Self> {
        let words = format!("immp.tests={}", tests.join(","));
        let disk = vm_dir().join(format!("{name}.disk.img"));
        let f =
            std::fs::File::create(&disk).with_context(|| format!("creating {}", disk.display()))?;
        f.set_len(DISK_BYTES)?; // sparse: blocks only where the guest writes
        Self::start_with(name, boot, &words, None, false, Some(&disk))
    }

    /// Starts QEMU; `name` keeps the log and QMP socket of several guests apart; `words` go
    /// on the kernel command line after the kernel's own; `incoming` makes it a migration
    /// destination listening on 127.0.0.1:PORT; `agent` adds qemu-guest-agent's
    /// virtio-serial port (socket `qga`) and a second QMP socket (`watch_qmp`).
    pub fn start(
        name: &str,
        boot: &Boot,
        words: &str,
        incoming: Option<u16>,
        agent: bool,
    ) -> anyhow::Result<Self> {
        Self::start_with(name, boot, words, incoming, agent, None)
    }

    fn start_with(
        name: &str,
        boot: &Boot,
        words: &str,
        incoming: Option<u16>,
        agent: bool,
        disk: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let log = vm_dir().join(format!("{name}.serial.log"));
        let qmp = vm_dir().join(format!("{name}.qmp.sock"));
        let qga = vm_dir().join(format!("{name}.qga.sock"));
        let watch_qmp = vm_dir().join(format!("{name}.watch.qmp.sock"));
        for f in [&log, &qmp, &qga, &watch_qmp] {
            let _ = std::fs::remove_file(f);
        }
        let append = format!("console=ttyS0 quiet panic=-1 {} {words}", boot.words);
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
        .arg(&boot.vmlinuz)
        .arg("-initrd")
        .arg(&boot.initrd)
        .args(["-append", &append])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .args(["-monitor", "none"]);
        if let Some(d) = disk {
            // cache=unsafe: the guest's fdatasync() need not reach this host's disk (scratch).
            cmd.arg("-drive").arg(format!(
                "file={},format=raw,if=virtio,cache=unsafe",
                d.display()
            ));
        }
        if agent {
            // Source and destination get the same devices (migration needs it).
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", watch_qmp.display()))
                .args(["-device", "virtio-serial-pci,id=vser0", "-chardev"])
                .arg(format!(
                    "socket,id=qga0,path={},server=on,wait=off",
                    qga.display()
                ))
                .args([
                    "-device",
                    "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
                ]);
        }
        if let Some(port) = incoming {
            cmd.args(["-incoming", &format!("tcp:127.0.0.1:{port}")]);
        }
        use std::os::unix::process::CommandExt as _;
        // SAFETY: prctl is async-signal-safe; the child dies with us (even on SIGKILL).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // QEMU's own messages (a cancelled migration's destination complains) go to a file.
        let stderr = std::fs::File::create(vm_dir().join(format!("{name}.qemu.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting qemu-system-x86_64 (Debian package qemu-system-x86)")?;
        let slot = live::register(child.id(), &qmp);
        Ok(Self {
            child,
            log,
            qmp,
            qga,
            watch_qmp,
            slot,
        })
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
        live::unregister(self.slot);
        for f in [&self.qmp, &self.qga, &self.watch_qmp] {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Sockets a killed run left (`prefix`: the guests' names).
pub fn remove_stale_sockets(prefix: &str) {
    for e in std::fs::read_dir(vm_dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(prefix) && name.ends_with(".sock") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// An error once Ctrl-C (or SIGTERM, SIGHUP) arrived; the handler has killed every QEMU and
/// removed their sockets already.
pub fn check_interrupted() -> anyhow::Result<()> {
    if live::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// True once Ctrl-C (or SIGTERM, SIGHUP) arrived.
pub fn interrupted() -> bool {
    live::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// The QEMU processes alive, for the signal handler: Ctrl-C kills them, removes their QMP
/// sockets and exits (128 + signal). QEMU also gets PR_SET_PDEATHSIG, for a SIGKILL of xtask.
mod live {
    use std::{
        ffi::CString,
        path::Path,
        sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering},
    };

    const SLOTS: usize = 16;
    static PIDS: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];
    static SOCKS: [AtomicPtr<libc::c_char>; SLOTS] =
        [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];
    pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_signal(sig: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
        for i in 0..SLOTS {
            let pid = PIDS[i].swap(0, Ordering::SeqCst);
            if pid > 0 {
                // SAFETY: kill and unlink are async-signal-safe; the path is a leaked CString.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let p = SOCKS[i].swap(std::ptr::null_mut(), Ordering::SeqCst);
            if !p.is_null() {
                // SAFETY: as above.
                unsafe { libc::unlink(p) };
            }
        }
        let msg = b"\nxtask: interrupted: QEMU stopped, sockets removed\n";
        // SAFETY: write and _exit are async-signal-safe.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(128 + sig);
        }
    }

    pub fn register(pid: u32, sock: &Path) -> Option<usize> {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                // SAFETY: installs a handler that only calls async-signal-safe functions.
                unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
            }
        });
        let i = PIDS.iter().position(|p| {
            p.compare_exchange(0, pid as i32, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        })?;
        // Leaked on purpose: the handler may read it at any time (a few bytes per guest).
        let c = CString::new(sock.to_string_lossy().as_bytes()).ok()?;
        SOCKS[i].store(c.into_raw(), Ordering::SeqCst);
        Some(i)
    }

    pub fn unregister(slot: Option<usize>) {
        if let Some(i) = slot {
            SOCKS[i].store(std::ptr::null_mut(), Ordering::SeqCst);
            PIDS[i].store(0, Ordering::SeqCst);
        }
    }
}

/// QEMU's most sampled pages per GiB (see `Qmp::dirty_rate_mib`).
const SAMPLE_PAGES_PER_GIB: u32 = 16384;

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
    /// only mode that works under TCG). QEMU reports whole MiB/s rounded down: the middle of
    /// that bin is returned (see `fidelity::qemu_rate`).
    pub fn dirty_rate(&mut self, secs: u64) -> anyhow::Result<f64> {
        Ok((self.dirty_rate_mib(secs)? + 0.5) * 1048576.0)
    }

    /// `calc-dirty-rate` in page-sampling mode, as QEMU reports it (whole MiB/s, rounded
    /// down). `sample-pages` counts pages per GiB of guest RAM (QEMU 7.2 takes 128-16384;
    /// RAM blocks under 128 MiB are skipped): 16384, the most, samples 8192 of the 512 MiB
    /// guest's 131072 pages, each dirty one worth 0.0625 MiB/s over 1 s.
    pub fn dirty_rate_mib(&mut self, secs: u64) -> anyhow::Result<f64> {
        self.cmd(
            "calc-dirty-rate",
            serde_json::json!({"calc-time": secs, "sample-pages": SAMPLE_PAGES_PER_GIB}),
        )?;
        let t = Instant::now();
        // Not asked before the window can be over; then often, so that back-to-back windows
        // leave little of the phase unmeasured.
        std::thread::sleep(Duration::from_secs(secs));
        loop {
            let r = self.cmd("query-dirty-rate", serde_json::json!({}))?;
            if r["status"] == "measured" {
                return Ok(r["dirty-rate"].as_f64().unwrap_or(0.0));
            }
            if t.elapsed() > Duration::from_secs(secs + 30) {
                bail!("calc-dirty-rate did not finish");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The middle value; of an even count, the mean of the two middle ones (not the upper one:
/// the fidelity matrix's QEMU windows come in whole MiB/s, where the upper one is 1 MiB/s off).
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Builds the release binaries once for every guest that follows.
pub fn build() -> anyhow::Result<()> {
    crate::setup::ensure_vm()?;
    run(crate::cargo().args(["build", "--release", "--workspace", "--bins"]))
}

/// Boots the default kernel with these guest-test names and returns its serial log once it
/// is done (the benchmarks).
pub fn run_guest(tests: &[String]) -> anyhow::Result<String> {
    build()?;
    let boot = prepare(&KERNELS[0])?;
    let started = Instant::now();
    let mut g = Guest::boot("test", &boot, tests)?;
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

/// One line of a kernel's results: a guest test, or the harness's own finding
/// (names in parentheses), which counts as a failure like any other.
struct Row {
    test: String,
    pass: bool,
    detail: String,
}

impl Row {
    fn harness(what: &str, detail: String) -> Self {
        Self {
            test: format!("({what})"),
            pass: false,
            detail,
        }
    }
}

/// The results of one kernel of the matrix.
struct KernelRun {
    kernel: &'static str,
    package: String,
    rows: Vec<Row>,
    /// The fidelity matrix's table, when it ran.
    table: Option<String>,
    secs: f64,
}

/// Runs the guest tests on each kernel in turn, prints each kernel's table, then the matrix;
/// returns (passed, failed) over every kernel's rows.
pub fn test(tests: Vec<String>, kernels: &[&'static Kernel]) -> anyhow::Result<(u64, u64)> {
    build()?;
    let mut runs = Vec::new();
    for k in kernels {
        let started = Instant::now();
        let (package, rows, table) = match test_kernel(k, &tests) {
            Ok(r) => r,
            Err(e) => (
                String::from("not booted"),
                vec![Row::harness("harness", format!("{e:#}"))],
                None,
            ),
        };
        let run = KernelRun {
            kernel: k.name,
            package,
            rows,
            table,
            secs: started.elapsed().as_secs_f64(),
        };
        print_kernel(&run);
        runs.push(run);
    }
    Ok(print_matrix(&runs))
}

/// Boots one kernel and turns its serial log into rows; a guest that stopped early, timed
/// out or could not load a module gets a harness row saying so.
fn test_kernel(
    k: &'static Kernel,
    tests: &[String],
) -> anyhow::Result<(String, Vec<Row>, Option<String>)> {
    let boot = prepare(k)?;
    eprintln!(
        "vm: {}: booting {} under QEMU TCG ({GUEST_RAM_MB} MiB, 1 vCPU)",
        k.name,
        boot.vmlinuz.display()
    );
    let mut g = Guest::boot(&format!("test-{}", k.name), &boot, tests)?;
    let (log, qemu_rates, phases) = watch(&mut g, k.name)?;
    let mut rows = result_rows(&log);
    judge_qemu_rate(&mut rows, &log, qemu_rates);
    let table = fidelity::judge(&mut rows, &log, &phases);
    let exited = g.exited();
    rows.extend(harness_rows(&log, exited, tests, &rows));
    Ok((boot.package, rows, table))
}

/// What the guest's own results cannot say: modules that did not load, a guest that stopped
/// or timed out before IMMP-DONE, tests asked for by name that never reported.
fn harness_rows(log: &str, exited: bool, tests: &[String], rows: &[Row]) -> Vec<Row> {
    let mut out = Vec::new();
    let failed_insmod: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("IMMP-INSMOD-FAILED "))
        .collect();
    if !failed_insmod.is_empty() {
        let detail = format!("insmod failed: {}", failed_insmod.join(" "));
        out.push(Row::harness("modules", detail));
    }
    if !log.contains("IMMP-DONE") {
        let last = log.lines().rev().find(|l| !l.trim().is_empty());
        let why = if exited { "stopped" } else { "timed out" };
        let detail = format!(
            "guest {why} before IMMP-DONE; last serial line: {}",
            last.unwrap_or("").trim()
        );
        out.push(Row::harness("guest", detail));
        return out;
    }
    for t in tests.iter().filter(|t| !rows.iter().any(|r| r.test == **t)) {
        out.push(Row {
            test: t.clone(),
            pass: false,
            detail: "asked for, never reported (no such guest test?)".into(),
        });
    }
    if rows.is_empty() && tests.is_empty() {
        out.push(Row::harness("guest", "ran no test".into()));
    }
    out
}

/// Follows the guest until IMMP-DONE, exit or TIMEOUT, echoing result lines, and measures
/// QEMU's dirty rate while the guest's qemu-rate test asks for it and over each phase of the
/// fidelity matrix. Returns the serial log and QEMU's figures.
fn watch(g: &mut Guest, kernel: &str) -> anyhow::Result<(String, Vec<f64>, fidelity::Phases)> {
    let started = Instant::now();
    let mut qemu_rates: Vec<f64> = Vec::new();
    let mut phases = fidelity::Phases::new();
    // QEMU's QMP socket takes one client at a time: one connection for the whole run.
    let mut qmp: Option<Qmp> = None;
    let mut progress = 0usize;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let log = g.serial();
        for l in log.lines().skip(progress) {
            if l.starts_with("IMMP-RESULT") || l.starts_with("IMMP-BOOTED") {
                eprintln!("vm: {kernel}: {l}");
            }
        }
        progress = log.lines().count();
        if log.contains("IMMP-QMP-START") && qemu_rates.is_empty() && !log.contains("IMMP-QMP-END")
        {
            let q = connected(&mut qmp, g)?;
            for _ in 0..3 {
                qemu_rates.push(q.dirty_rate(1)?);
            }
        }
        if let Some(phase) = fidelity::open_phase(&log, &phases) {
            let windows = fidelity::measure(connected(&mut qmp, g)?, g, &phase)?;
            phases.insert(phase, windows);
            continue;
        }
        if log.contains("IMMP-DONE") || g.exited() || started.elapsed() > TIMEOUT {
            return Ok((log, qemu_rates, phases));
        }
    }
}

fn connected<'a>(qmp: &'a mut Option<Qmp>, g: &Guest) -> anyhow::Result<&'a mut Qmp> {
    if qmp.is_none() {
        *qmp = Some(Qmp::connect(&g.qmp)?);
    }
    Ok(qmp.as_mut().expect("connected above"))
}

fn result_rows(log: &str) -> Vec<Row> {
    log.lines()
        .filter_map(|l| l.strip_prefix("IMMP-RESULT "))
        .map(|r| {
            let mut it = r.splitn(3, ' ');
            Row {
                test: it.next().unwrap_or("").to_string(),
                pass: it.next() == Some("PASS"),
                detail: it.next().unwrap_or("").to_string(),
            }
        })
        .collect()
}

/// The QEMU comparison is judged here, where QEMU's figure is.
fn judge_qemu_rate(rows: &mut [Row], log: &str, mut qemu_rates: Vec<f64>) {
    let Some(row) = rows.iter_mut().find(|r| r.test == "qemu-rate") else {
        return;
    };
    let after = log.split("IMMP-QMP-START").nth(1).unwrap_or("");
    let mut guest: Vec<f64> = after
        .lines()
        .filter_map(|l| l.strip_prefix("IMMP-RATE ")?.trim().parse().ok())
        .collect();
    let (g, q) = (median(&mut guest), median(&mut qemu_rates));
    let err = if q > 0.0 { (g - q).abs() / q } else { 1.0 };
    row.pass = row.pass && err <= 0.15;
    row.detail = format!(
        "immp {:.1} MB/s vs QEMU calc-dirty-rate {:.1} MB/s ({:+.1} %; goal within 15 %)",
        g / 1e6,
        q / 1e6,
        (g - q) / q.max(1.0) * 100.0
    );
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "FAIL" }
}

/// One kernel's table, with every detail (as soon as that kernel is done).
fn print_kernel(run: &KernelRun) {
    println!(
        "vm-test: kernel {} ({}) in {:.0}s (serial log {})",
        run.kernel,
        run.package,
        run.secs,
        vm_dir()
            .join(format!("test-{}.serial.log", run.kernel))
            .display()
    );
    println!("{:<16} {:<5} DETAIL", "TEST", "");
    for r in &run.rows {
        println!("{:<16} {:<5} {}", r.test, verdict(r.pass), r.detail);
    }
    if let Some(t) = &run.table {
        println!(
            "\nfidelity matrix on {} (QEMU: calc-dirty-rate page sampling, {SAMPLE_PAGES_PER_GIB} pages/GiB, 1 s windows; BASE: immp alone, for immp alone the idle guest)\n{t}",
            run.kernel
        );
    }
}

/// The kernel x test matrix, the details of every failure, and the totals.
fn print_matrix(runs: &[KernelRun]) -> (u64, u64) {
    let mut tests: Vec<&str> = Vec::new();
    for r in runs.iter().flat_map(|k| &k.rows) {
        if !tests.contains(&r.test.as_str()) {
            tests.push(&r.test);
        }
    }
    println!("\nvm-test matrix");
    print!("{:<16}", "TEST");
    runs.iter().for_each(|k| print!(" {:<10}", k.kernel));
    println!();
    for t in &tests {
        print!("{t:<16}");
        for k in runs {
            let cell = k
                .rows
                .iter()
                .find(|r| r.test == *t)
                .map_or("-", |r| verdict(r.pass));
            print!(" {cell:<10}");
        }
        println!();
    }
    let (mut passed, mut failed) = (0, 0);
    print!("{:<16}", "passed/total");
    for k in runs {
        let p = k.rows.iter().filter(|r| r.pass).count();
        (passed, failed) = (passed + p, failed + k.rows.len() - p);
        print!(" {:<10}", format!("{p}/{}", k.rows.len()));
    }
    print!("\n{:<16}", "seconds");
    runs.iter().for_each(|k| print!(" {:<10.0}", k.secs));
    println!();
    for k in runs {
        for r in k.rows.iter().filter(|r| !r.pass) {
            println!("FAIL {} {}: {}", k.kernel, r.test, r.detail);
        }
    }
    println!(
        "vm-test: {passed} passed, {failed} failed on {} kernels",
        runs.len()
    );
    (passed as u64, failed as u64)
}
