//! immp's kernel side: per-TGID counters of write faults (new page / write-protect), read faults
//! and page-cache pages dirtied, reaped at process exit.
//!
//! Two attach flavours of the same handlers: raw tracepoints (preferred: the tracepoint's own
//! arguments, so a folio's size can be read; user space checks them against the kernel's BTF)
//! and classic tracepoints (fallback: the trace record only). Not `tp_btf`: attaching one
//! needs the kernel BTF parsed in the agent, tens of MB a migration would then resend. kprobes
//! and fentry are deliberately not used: hardened kernels (lockdown) refuse them.
#![no_std]
#![no_main]
// atomic_xadd is the one atomic the BPF target lowers (AtomicU64 has no fetch_add there).
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    Global,
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_ktime_get_boot_ns, bpf_probe_read_kernel, bpf_probe_read_user,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use immp_common::{
    Counters, ExitEvent, PendingWrite, fault, maps::ARMED_CAPACITY, seen, stats, syscalls,
};

/// Default capacity; the loader overrides it (`--max-procs`). Preallocated here, as every
/// kernel takes it; on kernels >= 6.1 the loader makes it allocate per process instead
/// (`collect::probes`): a preallocated table writes a free-list pointer into every entry, 2.5
/// MB at 16384 entries that the next migration sends whether a process uses them or not.
#[map]
static COUNTERS: HashMap<u32, Counters> = HashMap::with_max_entries(16384, 0);

#[map]
static EXITS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
static STATS: Array<u64> = Array::with_max_entries(stats::LEN, 0);

#[map]
static SEEN: Array<u64> = Array::with_max_entries(seen::SLOTS, 0);

#[map]
static WINDOW: Array<u32> = Array::with_max_entries(1, 0);

/// Allocated per entry on kernels >= 6.1, like `COUNTERS`: it holds only the processes
/// re-armed in exact mode.
#[map]
static ARMED: HashMap<u32, u32> = HashMap::with_max_entries(ARMED_CAPACITY, 0);

#[unsafe(no_mangle)]
static FOLIO_NR_PAGES_OFFSET: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
static PG_HEAD_BIT: Global<u32> = Global::new(6);

/// Byte offset of `index` in `struct folio` (0: unknown, page-cache pages are not deduplicated).
#[unsafe(no_mangle)]
static FOLIO_INDEX_OFFSET: Global<u32> = Global::new(0);

/// Used by the classic tracepoints only; the loader shrinks it otherwise (an LRU map is
/// always preallocated, and its free list writes a pointer into every entry).
#[map]
static PENDING: LruHashMap<u32, PendingWrite> = LruHashMap::with_max_entries(4096, 0);

// Kernel struct offsets for the shmem class (see `immp_common::globals::FILE_LAYOUT`).
#[unsafe(no_mangle)]
static TASK_FILES: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FILES_FDT: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FDT_MAX_FDS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FDT_FD: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FILE_INODE: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static FILE_POS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static INODE_SB: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SB_MAGIC: Global<u32> = Global::new(0);

#[inline(always)]
fn add(slot: *mut u64, n: u64) {
    // SAFETY: `slot` points into a live map value (from a successful lookup); the verifier
    // checks the access, and the atomic makes concurrent CPUs safe.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, n) };
}

#[inline(always)]
fn stat(slot: u32) {
    if let Some(p) = STATS.get_ptr_mut(slot) {
        add(p, 1);
    }
}

/// The counters of the current process, created on first use. `None` only when the map is
/// full, and that is counted in `STATS[MAP_FULL]`.
#[inline(always)]
fn counters(tgid: u32) -> Option<*mut Counters> {
    if let Some(p) = COUNTERS.get_ptr_mut(tgid) {
        return Some(p);
    }
    let fresh = Counters {
        // SAFETY: helper without preconditions.
        first_ns: unsafe { bpf_ktime_get_boot_ns() },
        ..Counters::default()
    };
    // NOEXIST: another CPU may have created it meanwhile; then its entry wins.
    if COUNTERS.insert(tgid, fresh, BPF_NOEXIST as u64).is_ok() {
        stat(stats::ENTRIES_CREATED);
    }
    let p = COUNTERS.get_ptr_mut(tgid);
    if p.is_none() {
        stat(stats::MAP_FULL);
    }
    p
}

/// Whether this process already wrote this page (a virtual page number, or a
/// `seen::file_page`) in the current window; marks it written otherwise. See `immp_common::seen`.
#[inline(always)]
fn repeat(tgid: u32, page: u64) -> bool {
    // A process re-armed in exact mode has its own window (from its clear_refs on).
    // SAFETY: the value is copied out at once.
    let window = match unsafe { ARMED.get(&tgid) } {
        Some(w) => *w,
        None => WINDOW.get(0).copied().unwrap_or(0),
    };
    let h = seen::hash(tgid, page);
    let (set, tag) = (seen::set(h), seen::tag(window, h));
    let mut victim = set + (h % seen::WAYS as u64) as u32;
    for i in 0..seen::WAYS {
        let Some(slot) = SEEN.get_ptr_mut(set + i) else { return false };
        // SAFETY: a live array slot; a racing CPU at worst makes one page count twice.
        let t = unsafe { *slot };
        if t == tag {
            return true;
        }
        if seen::window_of(t) != window {
            victim = set + i;
        }
    }
    if let Some(slot) = SEEN.get_ptr_mut(victim) {
        // SAFETY: as above.
        unsafe { *slot = tag };
    }
    false
}

#[inline(always)]
fn on_fault(address: u64, error_code: u64) {
    if address >= fault::USER_ADDR_LIMIT {
        return;
    }
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    let Some(c) = counters(tgid) else { return };
    // SAFETY: `c` is a live map value; we only take field addresses.
    unsafe {
        if error_code & fault::WRITE != 0 {
            // A page faults again within one window after every fork of a shell loop
            // (write-protect: copy-on-write) or every munmap/mmap of an allocator's arena (not
            // present: a fresh page, which the kernel mostly hands back from the pages just
            // freed): the hypervisor resends it once.
            if repeat(tgid, address >> 12) {
                add(&raw mut (*c).write_repeat, 1);
            } else if error_code & fault::PRESENT != 0 {
                add(&raw mut (*c).write_protect, 1);
            } else {
                add(&raw mut (*c).write_new, 1);
            }
            // A write fault on a shared file page dirties that folio inside this fault.
            (*c).armed_tid = tid;
        } else {
            add(&raw mut (*c).read, 1);
        }
    }
}

/// A page-cache folio of `pages` pages went from clean to dirty; `page`: its
/// `seen::file_page` when known. Written back and dirtied again within one window (a database
/// that fsyncs twice a second), it is still one page to resend: counted once per window.
#[inline(always)]
fn on_dirty(pages: u64, page: Option<u64>) {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    let Some(c) = counters(tgid) else { return };
    let fresh = !page.is_some_and(|p| repeat(tgid, p));
    // SAFETY: `c` is a live map value.
    unsafe {
        if fresh {
            add(&raw mut (*c).pagecache_pages, pages);
        }
        if (*c).armed_tid == tid {
            // One fault dirties at most one folio: disarm so a later write() is not matched.
            (*c).armed_tid = 0;
            if fresh {
                add(&raw mut (*c).pagecache_in_fault, 1);
            }
        }
    }
}

#[inline(always)]
fn on_exit() {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    if tgid != tid {
        return; // a thread, not the process
    }
    let Some(c) = COUNTERS.get_ptr(tgid) else {
        return;
    };
    match EXITS.reserve::<ExitEvent>(0) {
        Some(mut entry) => {
            // SAFETY: `c` is a live map value of the right type.
            let counters = unsafe { *c };
            entry.write(ExitEvent {
                tgid,
                _pad: 0,
                counters,
                comm: bpf_get_current_comm().unwrap_or([0; 16]),
            });
            entry.submit(0);
            stat(stats::EXITS_SENT);
        }
        None => stat(stats::EXIT_LOST),
    }
    let _ = COUNTERS.remove(tgid);
}

/// Pages in a folio: 1 unless it is a large folio and we know where its page count lives.
#[inline(always)]
fn folio_pages(folio: u64) -> u64 {
    let off = FOLIO_NR_PAGES_OFFSET.load();
    if off == 0 || folio == 0 {
        return 1;
    }
    // SAFETY: bpf_probe_read_kernel tolerates any address; it fails cleanly on a bad one.
    let flags: u64 = match unsafe { bpf_probe_read_kernel(folio as *const u64) } {
        Ok(f) => f,
        Err(_) => return 1,
    };
    if flags & (1u64 << (PG_HEAD_BIT.load() & 63)) == 0 {
        return 1;
    }
    // SAFETY: as above; the offset comes from the running kernel's BTF.
    match unsafe { bpf_probe_read_kernel((folio + off as u64) as *const u32) } {
        Ok(n) if n > 0 && n <= 1 << 18 => n as u64,
        _ => 1,
    }
}

// ---- shmem written through the write family of calls ----

/// Reads a kernel value; `None` on a bad address.
#[inline(always)]
fn kread<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel tolerates any address; it fails cleanly on a bad one.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// The `struct file` behind this process's descriptor `fd`:
/// current->files->fdt->fd[fd], offsets from the running kernel's BTF.
#[inline(always)]
fn fd_file(fd: u64) -> Option<u64> {
    // SAFETY: helper without preconditions.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = kread(task + TASK_FILES.load() as u64)?;
    let fdt: u64 = kread(files + FILES_FDT.load() as u64)?;
    let max: u32 = kread(fdt + FDT_MAX_FDS.load() as u64)?;
    if fd >= max as u64 {
        return None;
    }
    let table: u64 = kread(fdt + FDT_FD.load() as u64)?;
    let file: u64 = kread(table + fd * 8)?;
    (file != 0).then_some(file)
}

/// Where a write-family call put its bytes: the destination descriptor, and how to find the
/// end of what it wrote once it returned.
enum End {
    /// An explicit position (pwrite): end = pos + written.
    From(u64),
    /// A user pointer to the position, which the kernel advanced (splice, copy_file_range).
    UserPtr(u64),
    /// The file's own position, which the kernel advanced (write, writev, sendfile).
    FilePos,
}

#[inline(always)]
fn destination(nr: u64, a: &[u64; 4]) -> Option<(u64, End)> {
    use syscalls::*;
    Some(match nr {
        WRITE | WRITEV | SENDFILE => (a[0], End::FilePos),
        PWRITE64 | PWRITEV => (a[0], End::From(a[3])),
        PWRITEV2 if a[3] as i64 == -1 => (a[0], End::FilePos),
        PWRITEV2 => (a[0], End::From(a[3])),
        SPLICE | COPY_FILE_RANGE if a[3] != 0 => (a[2], End::UserPtr(a[3])),
        SPLICE | COPY_FILE_RANGE => (a[2], End::FilePos),
        _ => return None,
    })
}

/// A write-family call returned `written > 0` bytes: if its file is shmem (tmpfs, /dev/shm,
/// memfd), count the distinct pages it wrote this window. No other event sees them: the
/// writer never faults on them, and shmem does not account its pages dirty.
#[inline(always)]
fn on_write_done(nr: u64, args: &[u64; 4], written: u64) {
    if FILE_INODE.load() == 0 {
        return; // layout unknown on this kernel: class off (reported by the agent)
    }
    let Some((fd, end)) = destination(nr, args) else { return };
    let Some(file) = fd_file(fd) else { return };
    let Some(inode) = kread::<u64>(file + FILE_INODE.load() as u64) else { return };
    let Some(sb) = kread::<u64>(inode + INODE_SB.load() as u64) else { return };
    if kread::<u64>(sb + SB_MAGIC.load() as u64) != Some(syscalls::TMPFS_MAGIC) {
        return;
    }
    let end: u64 = match end {
        End::From(pos) => pos + written,
        // SAFETY: bpf_probe_read_user fails cleanly on a bad user address.
        End::UserPtr(p) => match unsafe { bpf_probe_read_user(p as *const u64) } {
            Ok(e) => e,
            Err(_) => return,
        },
        End::FilePos => match kread::<u64>(file + FILE_POS.load() as u64) {
            Some(e) => e,
            None => return,
        },
    };
    let Some(start) = end.checked_sub(written) else { return };
    let (first, last) = (start >> 12, (end - 1) >> 12);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(c) = counters(tgid) else { return };
    let pages = last - first + 1;
    // Checked in aligned units (see `seen::UNITS`).
    let fresh = seen::new_pages(first, last, |unit, shift| {
        repeat(tgid, seen::file_unit(inode, unit, shift))
    });
    // SAFETY: `c` is a live map value.
    unsafe {
        add(&raw mut (*c).shmem_pages, fresh);
        add(&raw mut (*c).shmem_repeat, pages - fresh);
    }
}

// ---- raw tracepoints (preferred) ----

/// page_fault_user(unsigned long address, struct pt_regs *regs, unsigned long error_code)
#[raw_tracepoint(tracepoint = "page_fault_user")]
pub fn fault_user_btf(ctx: RawTracePointContext) -> i32 {
    on_fault(ctx.arg::<u64>(0), ctx.arg::<u64>(2));
    0
}

/// page_fault_kernel: the kernel touching user memory on a process's behalf (read() into a
/// fresh buffer, copy_to_user) dirties that process's pages too.
#[raw_tracepoint(tracepoint = "page_fault_kernel")]
pub fn fault_kernel_btf(ctx: RawTracePointContext) -> i32 {
    on_fault(ctx.arg::<u64>(0), ctx.arg::<u64>(2));
    0
}

/// writeback_dirty_folio(struct folio *folio, struct address_space *mapping)
#[raw_tracepoint(tracepoint = "writeback_dirty_folio")]
pub fn dirty_folio_btf(ctx: RawTracePointContext) -> i32 {
    let (folio, mapping) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1));
    let off = FOLIO_INDEX_OFFSET.load();
    let page = (off != 0)
        .then(|| kread::<u64>(folio + off as u64))
        .flatten()
        .map(|index| seen::file_page(mapping, index));
    on_dirty(folio_pages(folio), page);
    0
}

/// sched_process_exit(struct task_struct *p, ...): runs in the exiting task's context.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn exit_btf(_ctx: RawTracePointContext) -> i32 {
    on_exit();
    0
}

/// raw_syscalls sys_exit(struct pt_regs *regs, long ret): a raw tracepoint sees the syscall's
/// saved registers, so the exit alone tells which call wrote where (x86-64 `pt_regs`).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn write_exit_btf(ctx: RawTracePointContext) -> i32 {
    let ret: i64 = ctx.arg(1);
    if ret <= 0 {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    // orig_ax, di, si, dx, r10 in struct pt_regs (arch/x86/include/asm/ptrace.h).
    let Some(nr) = kread::<u64>(regs + 120) else { return 0 };
    if !syscalls::is_write(nr) {
        return 0;
    }
    let mut args = [0u64; 4];
    for (a, off) in args.iter_mut().zip([112u64, 104, 96, 56]) {
        match kread::<u64>(regs + off) {
            Some(v) => *a = v,
            None => return 0,
        }
    }
    on_write_done(nr, &args, ret as u64);
    0
}

// ---- classic tracepoints (fallback) ----
// Record layout after the 8-byte common header: see events/<category>/<name>/format.

#[tracepoint]
pub fn fault_user_tp(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from events/exceptions/page_fault_user/format (address @8, error_code @24).
    let (address, code) = unsafe { (ctx.read_at::<u64>(8), ctx.read_at::<u64>(24)) };
    if let (Ok(a), Ok(c)) = (address, code) {
        on_fault(a, c);
    }
    0
}

#[tracepoint]
pub fn fault_kernel_tp(ctx: TracePointContext) -> u32 {
    // SAFETY: same record layout as page_fault_user.
    let (address, code) = unsafe { (ctx.read_at::<u64>(8), ctx.read_at::<u64>(24)) };
    if let (Ok(a), Ok(c)) = (address, code) {
        on_fault(a, c);
    }
    0
}

/// The classic record carries no folio pointer: each event counts one page (reported). It
/// names the page by inode number and index (events/writeback/writeback_dirty_folio/format:
/// ino @40, index @48).
#[tracepoint]
pub fn dirty_folio_tp(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from the format file above.
    let (ino, index) = unsafe { (ctx.read_at::<u64>(40), ctx.read_at::<u64>(48)) };
    let page = match (ino, index) {
        (Ok(i), Ok(x)) => Some(seen::file_page(i, x)),
        _ => None,
    };
    on_dirty(1, page);
    0
}

/// raw_syscalls/sys_enter: id @8, args[6] @16. Keeps a write-family call's arguments for its
/// exit, whose record has only the return value.
#[tracepoint]
pub fn write_enter_tp(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from events/raw_syscalls/sys_enter/format.
    let Ok(nr) = (unsafe { ctx.read_at::<u64>(8) }) else { return 0 };
    if !syscalls::is_write(nr) {
        return 0;
    }
    // SAFETY: as above.
    let Ok(args) = (unsafe { ctx.read_at::<[u64; 4]>(16) }) else { return 0 };
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = PENDING.insert(&tid, &PendingWrite { nr, args }, 0);
    0
}

/// raw_syscalls/sys_exit: id @8, ret @16.
#[tracepoint]
pub fn write_exit_tp(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from events/raw_syscalls/sys_exit/format.
    let Ok(nr) = (unsafe { ctx.read_at::<u64>(8) }) else { return 0 };
    if !syscalls::is_write(nr) {
        return 0;
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: the value is copied out at once.
    let Some(p) = (unsafe { PENDING.get(&tid) }).copied() else { return 0 };
    let _ = PENDING.remove(&tid);
    // SAFETY: as above.
    let ret = unsafe { ctx.read_at::<i64>(16) }.unwrap_or(0);
    if p.nr == nr && ret > 0 {
        on_write_done(nr, &p.args, ret as u64);
    }
    0
}

#[tracepoint]
pub fn exit_tp(_ctx: TracePointContext) -> u32 {
    on_exit();
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
