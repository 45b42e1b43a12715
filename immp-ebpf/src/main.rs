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
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use immp_common::{
    Counters, ExitEvent, PageKey, fault,
    maps::{ARMED_CAPACITY, SEEN_CAPACITY},
    stats,
};

/// Default capacity; the loader overrides it (`--max-procs`).
#[map]
static COUNTERS: HashMap<u32, Counters> = HashMap::with_max_entries(16384, 0);

#[map]
static EXITS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
static STATS: Array<u64> = Array::with_max_entries(stats::LEN, 0);

#[map]
static SEEN: LruHashMap<PageKey, u32> = LruHashMap::with_max_entries(SEEN_CAPACITY, 0);

#[map]
static WINDOW: Array<u32> = Array::with_max_entries(1, 0);

#[map]
static ARMED: HashMap<u32, u32> = HashMap::with_max_entries(ARMED_CAPACITY, 0);

#[unsafe(no_mangle)]
static FOLIO_NR_PAGES_OFFSET: Global<u32> = Global::new(0);

#[unsafe(no_mangle)]
static PG_HEAD_BIT: Global<u32> = Global::new(6);

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

/// Whether this process already wrote this page in the current window (then the fault is not
/// a newly dirtied page); marks it written otherwise.
#[inline(always)]
fn repeat(tgid: u32, address: u64) -> bool {
    // A process re-armed in exact mode has its own window (from its clear_refs on).
    // SAFETY: the value is copied out at once.
    let window = match unsafe { ARMED.get(&tgid) } {
        Some(w) => *w,
        None => WINDOW.get(0).copied().unwrap_or(0),
    };
    let key = PageKey { tgid, _pad: 0, page: address >> 12 };
    // SAFETY: the value is copied out at once; a concurrent update only makes it stale.
    if unsafe { SEEN.get(&key) }.is_some_and(|w| *w == window) {
        return true;
    }
    let _ = SEEN.insert(&key, &window, 0);
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
            // Only write-protect faults repeat on one page within a window (copy-on-write after
            // every fork of a shell loop); a not-present fault is a page's first touch, and
            // first-touch storms stay one map update cheaper.
            if error_code & fault::PRESENT != 0 {
                if repeat(tgid, address) {
                    add(&raw mut (*c).write_repeat, 1);
                } else {
                    add(&raw mut (*c).write_protect, 1);
                }
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

#[inline(always)]
fn on_dirty(pages: u64) {
    let id = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    let Some(c) = counters(tgid) else { return };
    // SAFETY: `c` is a live map value.
    unsafe {
        add(&raw mut (*c).pagecache_pages, pages);
        if (*c).armed_tid == tid {
            // One fault dirties at most one folio: disarm so a later write() is not matched.
            (*c).armed_tid = 0;
            add(&raw mut (*c).pagecache_in_fault, 1);
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
    on_dirty(folio_pages(ctx.arg::<u64>(0)));
    0
}

/// sched_process_exit(struct task_struct *p, ...): runs in the exiting task's context.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn exit_btf(_ctx: RawTracePointContext) -> i32 {
    on_exit();
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

/// The classic record carries no folio pointer: each event counts one page (reported).
#[tracepoint]
pub fn dirty_folio_tp(_ctx: TracePointContext) -> u32 {
    on_dirty(1);
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
