//! Loads immp's eBPF object, attaches its programs (raw tracepoints checked against BTF, or classic tracepoints as a
//! fallback), and gives typed access to the maps. Dropping `Probes` detaches everything; if the
//! process is killed, the kernel detaches them when the file descriptors close.
use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, RingBuf},
    programs::{RawTracePoint, TracePoint},
};
use immp_common::{Counters, ExitEvent, globals, maps, stats};
use serde::Serialize;

use immp_model::snapshot::{Flavour, KernelStats};

use super::btf::{self as btfinfo, FolioLayout};

/// The eBPF object, built by build.rs and embedded so that `immp` is one file.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("IMMP_EBPF_OBJECT"));

/// The hooks, each with its raw-tracepoint program (if that flavour needs it), classic
/// tracepoint program and whether it is required.
const HOOKS: &[Hook] = &[
    Hook {
        btf_prog: Some("fault_user_btf"),
        tp_prog: "fault_user_tp",
        category: "exceptions",
        name: "page_fault_user",
        required: true,
    },
    Hook {
        btf_prog: Some("fault_kernel_btf"),
        tp_prog: "fault_kernel_tp",
        category: "exceptions",
        name: "page_fault_kernel",
        required: false,
    },
    Hook {
        btf_prog: Some("dirty_folio_btf"),
        tp_prog: "dirty_folio_tp",
        category: "writeback",
        name: "writeback_dirty_folio",
        required: true,
    },
    Hook {
        btf_prog: Some("exit_btf"),
        tp_prog: "exit_tp",
        category: "sched",
        name: "sched_process_exit",
        required: true,
    },
    // The shmem class: write-family calls into tmpfs/memfd files. A raw tracepoint's exit
    // sees the call's registers; a classic exit record does not, so that flavour keeps the
    // arguments from the entry.
    Hook {
        btf_prog: Some("write_exit_btf"),
        tp_prog: "write_exit_tp",
        category: "raw_syscalls",
        name: "sys_exit",
        required: false,
    },
    Hook {
        btf_prog: None,
        tp_prog: "write_enter_tp",
        category: "raw_syscalls",
        name: "sys_enter",
        required: false,
    },
];

/// The hooks the shmem class needs, per flavour.
const SHMEM_HOOKS_BTF: &[&str] = &["sys_exit"];
const SHMEM_HOOKS_TP: &[&str] = &["sys_enter", "sys_exit"];

struct Hook {
    btf_prog: Option<&'static str>,
    tp_prog: &'static str,
    category: &'static str,
    name: &'static str,
    required: bool,
}

impl Hook {
    /// `--no-shmem` leaves the system-call hooks out; they are reported as off.
    fn left_out(
        &self,
        opts: &ProbeOptions,
        hooks: &mut BTreeMap<String, Result<(), String>>,
    ) -> bool {
        let off = !opts.shmem && self.category == "raw_syscalls";
        if off {
            hooks.insert(self.name.to_string(), Err("off (--no-shmem)".into()));
        }
        off
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlavourChoice {
    /// Raw tracepoints (BTF-checked) where they load, classic tracepoints otherwise.
    #[default]
    Auto,
    Btf,
    Tracepoint,
}

#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub flavour: FlavourChoice,
    /// Capacity of the per-process map; a process that cannot get an entry is counted.
    pub max_procs: u32,
    /// Hook system-call exits to count writes into shmem files (the `shmem` class). The hook
    /// runs on every system call of the machine (`bench overhead` measures it).
    pub shmem: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            flavour: FlavourChoice::Auto,
            max_procs: 16384,
            shmem: true,
        }
    }
}

/// What got attached, for reports (`doctor`, snapshots).
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub flavour: Flavour,
    /// Hook name -> attached or why not.
    pub hooks: BTreeMap<String, Result<(), String>>,
    /// Whether large folios are counted by their page count (BTF flavour with known layout).
    pub folio_pages_known: bool,
    /// Whether write-family calls into shmem/tmpfs/memfd files are counted (the `shmem`
    /// class): the kernel's file layout was found in its BTF and the syscall hooks attached.
    pub shmem_known: bool,
    /// Why the BTF flavour was not used, when it was not.
    pub fallback_reason: Option<String>,
    pub max_procs: u32,
    pub tracefs_mounted_by_immp: bool,
}

pub struct Probes {
    // Kept alive: dropping it detaches the programs.
    _ebpf: Ebpf,
    counters: HashMap<MapData, u32, Counters>,
    exits: RingBuf<MapData>,
    stats: Array<MapData, u64>,
    /// The current window number (repeat faults within one window are not new dirty pages).
    window: Array<MapData, u32>,
    armed: HashMap<MapData, u32, u32>,
    window_no: u32,
    pub report: ProbeReport,
}

impl Probes {
    pub fn load(opts: &ProbeOptions) -> anyhow::Result<Self> {
        raise_memlock();
        match opts.flavour {
            FlavourChoice::Btf => Self::load_btf(opts),
            FlavourChoice::Tracepoint => Self::load_tracepoints(opts, None),
            FlavourChoice::Auto => match Self::load_btf(opts) {
                Ok(p) => Ok(p),
                Err(e) => Self::load_tracepoints(opts, Some(format!("{e:#}")))
                    .with_context(|| format!("raw tracepoints failed too ({e:#})")),
            },
        }
    }

    /// aya's `EbpfLoader::new()` parses the whole kernel BTF (tens of MB of small blocks, and
    /// most of immp's start-up CPU) for CO-RE relocations this object does not have: kernel
    /// offsets come from our own BTF scan, as globals. The loader is made where that parse
    /// fails at once (a thread of its own, in a private mount namespace where
    /// /sys/kernel/btf is an empty directory), or else in a scratch scope whose pages go back
    /// as zero pages (see `crate::alloc`).
    fn new_loader<'a>() -> EbpfLoader<'a> {
        if let Some(l) = loader_without_kernel_btf() {
            return l;
        }
        crate::alloc::scratch(|| {
            let mut l = EbpfLoader::new();
            l.btf(None);
            l
        })
        .0
    }

    /// `classic`: the classic-tracepoint flavour, the only user of `PENDING`.
    fn loader(opts: &ProbeOptions, facts: &KernelFacts, classic: bool) -> anyhow::Result<Ebpf> {
        let mut loader = Self::new_loader();
        loader.map_max_entries(maps::COUNTERS, opts.max_procs.max(1));
        if !classic {
            // Every map is created, used or not; this one is preallocated (LRU), so it is
            // made as small as the kernel takes: its pages would be sent by every migration.
            loader.map_max_entries(maps::PENDING, maps::PENDING_UNUSED);
        }
        let (off, bit, index) = facts.folio.map_or((0u32, 0u32, 0u32), |f| {
            (f.nr_pages_offset, f.pg_head_bit, f.index_offset)
        });
        loader.override_global(globals::FOLIO_NR_PAGES_OFFSET, &off, true);
        loader.override_global(globals::PG_HEAD_BIT, &bit, true);
        loader.override_global(globals::FOLIO_INDEX_OFFSET, &index, true);
        let file = facts.file.unwrap_or_default();
        for (name, value) in globals::FILE_LAYOUT.iter().zip(&file) {
            loader.override_global(name, value, true);
        }
        let object = per_entry_maps(OBJECT, &kernel_release());
        loader
            .load(&object)
            .map_err(|e| anyhow!("loading the eBPF object failed: {e}"))
    }

    /// Raw tracepoints, checked against the kernel's BTF: BTF says which tracepoints exist and
    /// where a folio keeps its page count. (Raw rather than `tp_btf` programs: the same
    /// arguments, but no BTF type id to attach, so no BTF parser in memory.)
    fn load_btf(opts: &ProbeOptions) -> anyhow::Result<Self> {
        let facts = KernelFacts::read()?;
        let mut ebpf = Self::loader(opts, &facts, false)?;
        let mut hooks = BTreeMap::new();
        for (h, present) in HOOKS.iter().zip(facts.present) {
            let Some(btf_prog) = h.btf_prog else { continue };
            if h.left_out(opts, &mut hooks) {
                continue;
            }
            if !present {
                if h.required {
                    bail!("kernel has no tracepoint {} in its BTF", h.name);
                }
                hooks.insert(h.name.to_string(), Err("not in this kernel".into()));
                continue;
            }
            let res = (|| -> anyhow::Result<()> {
                let prog: &mut RawTracePoint = ebpf
                    .program_mut(btf_prog)
                    .ok_or_else(|| anyhow!("program {btf_prog} missing from object"))?
                    .try_into()?;
                prog.load()
                    .with_context(|| format!("loading raw_tp/{}", h.name))?;
                prog.attach(h.name)
                    .with_context(|| format!("attaching raw_tp/{}", h.name))?;
                Ok(())
            })();
            match res {
                Err(e) if h.required => return Err(e),
                r => {
                    hooks.insert(h.name.to_string(), r.map_err(|e| format!("{e:#}")));
                }
            }
        }
        let report = ProbeReport {
            flavour: Flavour::Btf,
            shmem_known: facts.file.is_some() && attached(&hooks, SHMEM_HOOKS_BTF),
            hooks,
            folio_pages_known: facts.folio.is_some(),
            fallback_reason: None,
            max_procs: opts.max_procs,
            tracefs_mounted_by_immp: false,
        };
        Self::finish(ebpf, report)
    }

    fn load_tracepoints(opts: &ProbeOptions, why: Option<String>) -> anyhow::Result<Self> {
        let mounted = ensure_tracefs()?;
        // Without BTF the fallback still counts faults; only the shmem class needs the file
        // layout, and it stays off where the kernel has no BTF.
        let facts = KernelFacts {
            folio: None,
            ..KernelFacts::read().unwrap_or_default()
        };
        let mut ebpf = Self::loader(opts, &facts, true)?;
        let mut hooks = BTreeMap::new();
        for h in HOOKS {
            if h.left_out(opts, &mut hooks) {
                continue;
            }
            let res = (|| -> anyhow::Result<()> {
                let prog: &mut TracePoint = ebpf
                    .program_mut(h.tp_prog)
                    .ok_or_else(|| anyhow!("program {} missing from object", h.tp_prog))?
                    .try_into()?;
                prog.load()
                    .with_context(|| format!("loading tracepoint {}", h.name))?;
                prog.attach(h.category, h.name)
                    .with_context(|| format!("attaching tracepoint {}/{}", h.category, h.name))?;
                Ok(())
            })();
            match res {
                Err(e) if h.required => return Err(e),
                r => {
                    hooks.insert(h.name.to_string(), r.map_err(|e| format!("{e:#}")));
                }
            }
        }
        let report = ProbeReport {
            flavour: Flavour::Tracepoint,
            shmem_known: facts.file.is_some() && attached(&hooks, SHMEM_HOOKS_TP),
            hooks,
            folio_pages_known: false,
            fallback_reason: why,
            max_procs: opts.max_procs,
            tracefs_mounted_by_immp: mounted,
        };
        Self::finish(ebpf, report)
    }

    fn finish(mut ebpf: Ebpf, report: ProbeReport) -> anyhow::Result<Self> {
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from object"))
        };
        let counters = HashMap::try_from(take(&mut ebpf, maps::COUNTERS)?)?;
        let exits = RingBuf::try_from(take(&mut ebpf, maps::EXITS)?)?;
        let stats = Array::try_from(take(&mut ebpf, maps::STATS)?)?;
        let window = Array::try_from(take(&mut ebpf, maps::WINDOW)?)?;
        let armed = HashMap::try_from(take(&mut ebpf, maps::ARMED)?)?;
        Ok(Self {
            _ebpf: ebpf,
            counters,
            exits,
            stats,
            window,
            armed,
            window_no: 0,
            report,
        })
    }

    /// Starts a new window: a page written again from now on is a newly dirtied page again.
    pub fn next_window(&mut self) {
        self.window_no = self.window_no.wrapping_add(1);
        let _ = self.window.set(0, self.window_no, 0);
    }

    /// Starts a window of `pid`'s own (call right before re-arming it).
    pub fn start_window_of(&mut self, pid: u32) {
        self.window_no = self.window_no.wrapping_add(1);
        let _ = self.armed.insert(pid, self.window_no, 0);
    }

    /// `pid` follows the global windows again (no longer re-armed).
    pub fn forget_window_of(&mut self, pid: u32) {
        let _ = self.armed.remove(&pid);
    }

    /// All live entries. Entries deleted while we iterate are skipped, not errors.
    pub fn read_counters(&self) -> Vec<(u32, Counters)> {
        self.counters.iter().filter_map(Result::ok).collect()
    }

    /// One process's counters (a single lookup, for window boundaries).
    pub fn counters_of(&self, pid: u32) -> Option<Counters> {
        self.counters.get(&pid, 0).ok()
    }

    /// Exit events queued since the last call.
    pub fn drain_exits(&mut self) -> Vec<ExitEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.exits.next() {
            if item.len() >= size_of::<ExitEvent>() {
                // SAFETY: the kernel wrote an ExitEvent (repr(C), any bit pattern valid); the
                // ring buffer gives no alignment promise, hence read_unaligned.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ExitEvent>()) });
            }
        }
        out
    }

    pub fn kernel_stats(&self) -> KernelStats {
        let get = |i: u32| self.stats.get(&i, 0).unwrap_or(0);
        KernelStats {
            map_full: get(stats::MAP_FULL),
            exit_lost: get(stats::EXIT_LOST),
            exits_sent: get(stats::EXITS_SENT),
            entries_created: get(stats::ENTRIES_CREATED),
        }
    }
}

impl super::source::CounterSource for Probes {
    fn read_counters(&self) -> Vec<(u32, Counters)> {
        Probes::read_counters(self)
    }
    fn counters_of(&self, pid: u32) -> Option<Counters> {
        Probes::counters_of(self, pid)
    }
    fn drain_exits(&mut self) -> Vec<ExitEvent> {
        Probes::drain_exits(self)
    }
    fn kernel_stats(&self) -> KernelStats {
        Probes::kernel_stats(self)
    }
    fn flavour(&self) -> Flavour {
        self.report.flavour
    }
    fn folio_pages_known(&self) -> bool {
        self.report.folio_pages_known
    }
    fn shmem_known(&self) -> bool {
        self.report.shmem_known
    }
    fn capacity(&self) -> u32 {
        self.report.max_procs
    }
    fn fallback_reason(&self) -> Option<String> {
        self.report.fallback_reason.clone()
    }
    fn next_window(&mut self) {
        Probes::next_window(self)
    }
    fn start_window_of(&mut self, pid: u32) {
        Probes::start_window_of(self, pid)
    }
    fn forget_window_of(&mut self, pid: u32) {
        Probes::forget_window_of(self, pid)
    }
}

/// What the kernel's BTF says: which hooks' tracepoints exist, and the struct layouts the
/// programs need as globals.
#[derive(Default)]
struct KernelFacts {
    present: [bool; HOOKS.len()],
    folio: Option<FolioLayout>,
    file: Option<btfinfo::FileLayout>,
}

impl KernelFacts {
    /// The kernel's BTF is read once, in a scratch scope: only the facts leave it.
    fn read() -> anyhow::Result<Self> {
        crate::alloc::scratch(|| -> anyhow::Result<_> {
            let kbtf = btfinfo::load_vmlinux()?;
            let mut present = [false; HOOKS.len()];
            for (p, h) in present.iter_mut().zip(HOOKS) {
                *p = btfinfo::has_tracepoint(&kbtf, h.name);
            }
            Ok(KernelFacts {
                present,
                folio: btfinfo::folio_layout(&kbtf),
                file: btfinfo::file_layout(&kbtf),
            })
        })
        .0
    }
}

fn attached(hooks: &BTreeMap<String, Result<(), String>>, names: &[&str]) -> bool {
    names
        .iter()
        .all(|n| hooks.get(*n).is_some_and(|r| r.is_ok()))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the memory cgroup):
/// lift it as aya's template does. Where it cannot be raised (no CAP_SYS_RESOURCE), newer
/// kernels do not need it, so a failure is not an error.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid, fully initialised struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// An `EbpfLoader` made in a short-lived thread that cannot see /sys/kernel/btf: its own mount
/// namespace (unshare affects this thread only), every mount private (nothing propagates to
/// the system), an empty tmpfs over the BTF directory. None where any step is refused.
fn loader_without_kernel_btf<'a>() -> Option<EbpfLoader<'a>> {
    let hide = || -> Option<()> {
        let c = |s: &str| std::ffi::CString::new(s).ok();
        let (root, dir, fs) = (c("/")?, c("/sys/kernel/btf")?, c("tmpfs")?);
        let none = std::ptr::null();
        // SAFETY: plain syscalls on this thread with valid C strings; the namespace dies with
        // the thread.
        let ok = unsafe {
            libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    none,
                    root.as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    none.cast(),
                ) == 0
                && libc::mount(
                    fs.as_ptr(),
                    dir.as_ptr(),
                    fs.as_ptr(),
                    libc::MS_RDONLY,
                    none.cast(),
                ) == 0
        };
        ok.then_some(())
    };
    std::thread::Builder::new()
        .name("immp-loader".into())
        .spawn(move || {
            hide()?;
            let mut l = EbpfLoader::new();
            l.btf(None);
            Some(l)
        })
        .ok()?
        .join()
        .ok()
        .flatten()
}

/// The hash maps that allocate an entry when one is needed where the kernel allows it: a
/// preallocated hash writes a free-list pointer into every entry, so all of it is non-zero
/// memory the next migration sends (2.5 MB for `COUNTERS` at its default 16384 entries).
const PER_ENTRY_MAPS: [&str; 2] = [maps::COUNTERS, maps::ARMED];

/// `BPF_F_NO_PREALLOC` (include/uapi/linux/bpf.h).
const BPF_F_NO_PREALLOC: u32 = 1;

/// Where `map_flags` sits in aya-ebpf's map definition (`bpf_map_def`: type, key size, value
/// size, max entries, flags, ... as u32).
const MAP_DEF_TYPE: usize = 0;
const MAP_DEF_FLAGS: usize = 16;
const BPF_MAP_TYPE_HASH: u32 = 1;

/// The running kernel's release ("6.1.0-57-amd64"); empty where it cannot be read.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Whether the kernel lets tracing programs use hash maps that allocate per entry: from 6.1
/// (they allocate from the BPF memory allocator); before, the verifier WARNs and taints the
/// kernel, and refuses on PREEMPT_RT.
fn per_entry_allowed(release: &str) -> bool {
    let mut it = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().ok());
    matches!((it.next().flatten(), it.next().flatten()), (Some(a), Some(b)) if (a, b) >= (6, 1))
}

/// The object with `PER_ENTRY_MAPS` made to allocate per entry where the kernel allows it;
/// as built (preallocated, which every kernel takes) otherwise, or where a map's definition
/// is not where and what it should be.
fn per_entry_maps(object: &[u8], release: &str) -> Vec<u8> {
    per_entry_allowed(release)
        .then(|| with_map_flags(object, &PER_ENTRY_MAPS, BPF_F_NO_PREALLOC))
        .flatten()
        .unwrap_or_else(|| object.to_vec())
}

/// A copy of the ELF `object` with `flags` set in the definitions of the hash maps `names`;
/// None if one is missing or not a hash map whose flags are 0.
fn with_map_flags(object: &[u8], names: &[&str], flags: u32) -> Option<Vec<u8>> {
    let file = object::File::parse(object).ok()?;
    let mut out = object.to_vec();
    for name in names {
        let def = map_def_offset(&file, name)?;
        let u32_at = |o: usize| -> Option<u32> {
            Some(u32::from_le_bytes(
                out.get(def + o..def + o + 4)?.try_into().ok()?,
            ))
        };
        if u32_at(MAP_DEF_TYPE)? != BPF_MAP_TYPE_HASH || u32_at(MAP_DEF_FLAGS)? != 0 {
            return None;
        }
        out[def + MAP_DEF_FLAGS..def + MAP_DEF_FLAGS + 4].copy_from_slice(&flags.to_le_bytes());
    }
    Some(out)
}

/// Where the definition of the map `name` starts in the object's file.
fn map_def_offset(file: &object::File, name: &str) -> Option<usize> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let sym = file.symbols().find(|s| s.name() == Ok(name))?;
    let section = file.section_by_index(sym.section_index()?).ok()?;
    let (start, _) = section.file_range()?;
    usize::try_from(start + sym.address() - section.address()).ok()
}

const TRACEFS: &str = "/sys/kernel/tracing";

/// Classic tracepoints need tracefs; mount it if it is not there (harmless, and what perf and
/// bpftrace need too). Returns whether immp mounted it.
pub fn ensure_tracefs() -> anyhow::Result<bool> {
    if tracefs_mounted() {
        return Ok(false);
    }
    let _ = std::fs::create_dir_all(TRACEFS);
    let ok = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs", TRACEFS])
        .status()
        .is_ok_and(|s| s.success());
    if !ok || !tracefs_mounted() {
        bail!("tracefs is not mounted and could not be mounted at {TRACEFS}");
    }
    Ok(true)
}

pub fn tracefs_mounted() -> bool {
    Path::new(TRACEFS).join("events").is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags_of(object: &[u8], name: &str) -> u32 {
        let file = object::File::parse(object).expect("ELF");
        let def = map_def_offset(&file, name).expect(name);
        u32::from_le_bytes(
            object[def + MAP_DEF_FLAGS..def + MAP_DEF_FLAGS + 4]
                .try_into()
                .unwrap(),
        )
    }

    #[test]
    fn the_table_allocates_per_entry_from_6_1_and_is_preallocated_before() {
        for (release, per_entry) in [
            ("6.1.0-57-amd64", true),
            ("6.12.48+deb13-cloud-amd64", true),
            ("6.18.44-fc-v669\n", true),
            ("6.0.12", false),
            ("5.10.0-33-amd64", false),
            ("", false),
        ] {
            assert_eq!(per_entry_allowed(release), per_entry, "{release}");
            let object = per_entry_maps(OBJECT, release);
            let want = if per_entry { BPF_F_NO_PREALLOC } else { 0 };
            for name in PER_ENTRY_MAPS {
                assert_eq!(flags_of(&object, name), want, "{name} on {release}");
            }
            // Nothing else changed: other maps keep their flags, the rest its bytes.
            assert_eq!(
                flags_of(&object, maps::STATS),
                flags_of(OBJECT, maps::STATS)
            );
            let differ = object.iter().zip(OBJECT).filter(|(a, b)| a != b).count();
            assert!(differ <= PER_ENTRY_MAPS.len(), "{differ} bytes changed");
        }
    }

    #[test]
    fn a_map_that_is_not_a_hash_with_no_flags_is_left_alone() {
        // EXITS is a ring buffer: no object comes back, and the loader uses the one as built.
        assert!(with_map_flags(OBJECT, &[maps::EXITS], BPF_F_NO_PREALLOC).is_none());
        assert!(with_map_flags(OBJECT, &["NO_SUCH_MAP"], BPF_F_NO_PREALLOC).is_none());
        let once = with_map_flags(OBJECT, &[maps::COUNTERS], BPF_F_NO_PREALLOC).unwrap();
        assert!(with_map_flags(&once, &[maps::COUNTERS], BPF_F_NO_PREALLOC).is_none());
    }
}
