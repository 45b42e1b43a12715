//! The typed boundary between immp's kernel programs and its userspace agent.
//!
//! Everything here is `#[repr(C)]` and plain old data: the eBPF side writes these values into
//! maps, the user side reads them back with the same layout. Map names and stat slots live here
//! too, so neither side spells a magic string or offset of its own.
#![cfg_attr(not(test), no_std)]

/// Per-process (per TGID) counters kept in the `COUNTERS` hash map.
///
/// All counts are monotonic for the life of one process incarnation; userspace diffs them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Write faults on not-present pages: first touch of anonymous memory, first write to a
    /// mapped file page, swap-in for write.
    pub write_new: u64,
    /// Write faults on present pages: copy-on-write after fork, write-protect (soft-dirty
    /// re-arm, uffd-wp), first write to a clean shared file page.
    pub write_protect: u64,
    /// Read (and instruction fetch) faults: not dirtying, reported for context.
    pub read: u64,
    /// Write faults on a page this process already dirtied in the current window (the window
    /// number is `WINDOW[0]`, advanced by the agent every sample): fork churn write-protects
    /// the same few pages again after every fork, an allocator that unmaps and maps its arena
    /// faults the same addresses in again (on pages the kernel mostly hands straight back), and
    /// the hypervisor resends a page at most once per round, so these are not dirty pages.
    /// Reported, not counted as dirtying.
    pub write_repeat: u64,
    /// Page-cache pages this process marked dirty (`writeback_dirty_folio`), counted in base
    /// pages (a large folio counts all its pages).
    pub pagecache_pages: u64,
    /// Page-cache dirtying events that happened inside one of this process's own write faults:
    /// that page was already counted as a fault, so the dirty estimate subtracts it once.
    pub pagecache_in_fault: u64,
    /// Pages of shmem/tmpfs/memfd files this process wrote through the write family of calls
    /// (write, pwrite, writev, pwritev, splice, copy_file_range, sendfile): those pages are
    /// never faulted by the writer and shmem does not account them dirty, so no other event
    /// sees them. Counted once per page per window, like write-protect faults.
    pub shmem_pages: u64,
    /// Write-family calls into shmem that wrote a page again within the window: not counted.
    pub shmem_repeat: u64,
    /// `bpf_ktime_get_boot_ns()` when this entry was created: tells one incarnation of a TGID
    /// from the next when pids are reused between two samples.
    pub first_ns: u64,
    /// Thread id of this process's latest write fault, cleared once a page-cache dirtying
    /// event is matched to it (kept in the entry itself: no second map lookup on the hot path).
    pub armed_tid: u32,
    pub _pad: u32,
}

impl Counters {
    /// Pages dirtied as far as the kernel events can tell (a lower bound without soft-dirty).
    pub const fn dirty_pages(&self) -> u64 {
        (self.write_new + self.write_protect + self.pagecache_pages + self.shmem_pages)
            .saturating_sub(self.pagecache_in_fault)
    }
}

/// Sent through the `EXITS` ring buffer when a process exits: its final counters, after which
/// the kernel side deletes the map entry (so exits never leak entries).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitEvent {
    pub tgid: u32,
    pub _pad: u32,
    pub counters: Counters,
    /// The task's name (`comm`), so that a process born and gone between two samples can
    /// still be named.
    pub comm: [u8; 16],
}

/// Map names, shared so that the loader cannot drift from the programs.
pub mod maps {
    pub const COUNTERS: &str = "COUNTERS";
    pub const EXITS: &str = "EXITS";
    pub const STATS: &str = "STATS";
    /// Array of `seen::SLOTS` u64 tags: the per-window set of (tgid, page) written.
    pub const SEEN: &str = "SEEN";
    /// One u32: the current window number.
    pub const WINDOW: &str = "WINDOW";
    /// tgid -> window number, for processes whose windows start when they are re-armed
    /// (exact mode: at their own `clear_refs`, not at the global sample).
    pub const ARMED: &str = "ARMED";
    pub const ARMED_CAPACITY: u32 = 4096;
    /// Thread id -> `PendingWrite` (classic tracepoints only).
    pub const PENDING: &str = "PENDING";
    /// `PENDING`'s size where it is not used (every map in the object is created; a small
    /// one keeps its preallocated entries few).
    pub const PENDING_UNUSED: u32 = 64;
}

/// The per-window set of pages each process wrote (`maps::SEEN`), as a set-associative table:
/// a page may sit in any of the `seen::WAYS` slots of set `seen::set(h)` (h = `seen::hash(tgid, page)`),
/// which holds `seen::tag(window, h)`; a new page takes a slot whose tag is from an older
/// window, else the one its hash picks. Not a hash map: every insert into a kernel hash map writes an
/// element (and its LRU neighbours) scattered over megabytes, pages the migration then resends
/// (measured: 1-4.7 MB/s of immp's own dirtying in the fidelity matrix). This table is
/// `seen::SLOTS` x 8 bytes.
pub mod seen {
    /// 128 KiB: at most 32 pages change per window (128 kB/s at 1 Hz, 1 % of a 100 Mbit
    /// link, and only while some process writes thousands of pages a second). A quarter full
    /// (4096 pages written in a window), under 1 % of the pages written again come back as
    /// new; a smaller table recounted 19 % of a tmpfs writer rewriting 4096 pages 4 times a
    /// window.
    pub const SLOTS: u32 = 1 << 14;
    /// Slots per set (one 32-byte run): a page is forgotten only when more than this many
    /// others of its set were written in the same window.
    pub const WAYS: u32 = 4;

    /// splitmix64's finalizer over (tgid, page): slot and fingerprint from independent bits.
    pub const fn hash(tgid: u32, page: u64) -> u64 {
        let mut z = page ^ ((tgid as u64) << 40) ^ ((tgid as u64) >> 24);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// The first of the set's `WAYS` slots (the others follow it).
    pub const fn set(h: u64) -> u32 {
        (h >> 40) as u32 & (SLOTS - WAYS)
    }

    /// The window a tag was written in.
    pub const fn window_of(tag: u64) -> u32 {
        (tag >> 32) as u32
    }

    /// The window in the high half, 32 other bits of the hash in the low half: a slot whose tag
    /// matches saw this page this window (a different page that hashed to the same slot
    /// overwrites it, and the first may count again: an over-count, never an under-count).
    pub const fn tag(window: u32, h: u64) -> u64 {
        ((window as u64) << 32) | (h & 0xffff_ffff)
    }

    /// A page of a file (shmem written with write() and kin, or the page cache), named by the
    /// kernel object that holds it (inode, mapping or inode number) and its index: bit 63
    /// keeps it apart from user virtual page numbers.
    pub const fn file_page(object: u64, index: u64) -> u64 {
        (1 << 63) | (object.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index)
    }

    /// A write-family call into shmem is checked against the window's set in aligned units of
    /// 2^`unit_shift` pages, at most `UNITS` whole ones: single pages for a call of up to
    /// `UNITS` pages, pairs up to twice that, and so on. A call that rewrites the range an
    /// earlier one wrote with calls of the same size finds every unit seen; the pages of a unit
    /// it covers only in part (at its two ends) count as new, unchecked and unmarked (an
    /// over-count at the edges of a misaligned call, never an under-count). Why units and not
    /// pages: the check is a bounded loop the verifier walks once per iteration, and its
    /// states for 64 pages (61,000 instructions) were 2.5 MiB of kernel memory freed with its
    /// bytes, which the next migration of the guest sends (at 8 units, about 10,000
    /// instructions: immp's start left 1.1 MiB more non-zero memory in the lab's guest,
    /// against 3.4 before). The cost of 8 rather than 16 (about twice the instructions): a
    /// misaligned call rewritten counts up to 2 x (unit - 1) pages again, a quarter of a call
    /// of 9-16 pages at worst.
    pub const UNITS: u64 = 8;

    /// log2 of the unit for a call of `pages` pages: the smallest `s` with `pages <= UNITS << s`.
    /// Without a loop or a branch (the verifier would walk every step): ceil(log2(units of
    /// `UNITS` pages)).
    pub const fn unit_shift(pages: u64) -> u32 {
        let per = pages.div_ceil(UNITS);
        64 - per.saturating_sub(1).leading_zeros()
    }

    /// The units of the call over pages `first..=last`: their shift (`unit_shift`), the first
    /// whole one, and how many whole ones (at most `UNITS`).
    pub const fn whole_units(first: u64, last: u64) -> (u32, u64, u64) {
        let shift = unit_shift(last - first + 1);
        let start = (first + (1 << shift) - 1) >> shift;
        let end = (last + 1) >> shift;
        (shift, start, end.saturating_sub(start))
    }

    /// How many of the pages `first..=last` one call wrote are new this window: the whole units
    /// `seen(unit, shift)` says were not seen yet (it marks them), and every page of a unit
    /// covered only in part. The kernel side runs exactly this (with its window set as `seen`).
    #[inline(always)]
    pub fn new_pages(first: u64, last: u64, mut seen: impl FnMut(u64, u32) -> bool) -> u64 {
        let (shift, whole, units) = whole_units(first, last);
        let mut new = last - first + 1 - (units << shift);
        // A constant bound for the verifier; `units` never exceeds it.
        for k in 0..UNITS {
            if k >= units {
                break;
            }
            if !seen(whole + k, shift) {
                new += 1 << shift;
            }
        }
        new
    }

    /// The name a whole unit has in the set: its first page's index, with the unit size kept
    /// apart (a pair and a single page starting at one index are different units).
    pub const fn file_unit(object: u64, unit: u64, shift: u32) -> u64 {
        file_page(object, (unit << 6) | shift as u64)
    }
}

/// Global variables the loader overrides at load time.
pub mod globals {
    /// Byte offset of the folio's page count (`_nr_pages` or `_folio_nr_pages`) inside
    /// `struct folio`; 0 means unknown, and every dirtied folio then counts as one page.
    pub const FOLIO_NR_PAGES_OFFSET: &str = "FOLIO_NR_PAGES_OFFSET";
    /// Bit number of `PG_head` in `folio->flags` (set on large folios).
    pub const PG_HEAD_BIT: &str = "PG_HEAD_BIT";
    /// Byte offset of `index` in `struct folio`: page-cache pages are counted once per window
    /// by (mapping, index); 0 means unknown, and each dirtying counts.
    pub const FOLIO_INDEX_OFFSET: &str = "FOLIO_INDEX_OFFSET";
    /// Where a write-family call's file lives, for the shmem class: byte offsets of
    /// `task_struct.files`, `files_struct.fdt`, `fdtable.max_fds`, `fdtable.fd`,
    /// `file.f_inode`, `file.f_pos`, `inode.i_sb`, `super_block.s_magic`, in this order.
    /// All 0 (unknown kernel layout) turns the shmem class off.
    pub const FILE_LAYOUT: [&str; 8] = [
        "TASK_FILES",
        "FILES_FDT",
        "FDT_MAX_FDS",
        "FDT_FD",
        "FILE_INODE",
        "FILE_POS",
        "INODE_SB",
        "SB_MAGIC",
    ];
}

/// The write-family system calls whose destination file the kernel side resolves (x86-64
/// numbers; the programs compare the syscall number against these).
pub mod syscalls {
    pub const WRITE: u64 = 1;
    pub const PWRITE64: u64 = 18;
    pub const WRITEV: u64 = 20;
    pub const SENDFILE: u64 = 40;
    pub const SPLICE: u64 = 275;
    pub const PWRITEV: u64 = 296;
    pub const COPY_FILE_RANGE: u64 = 326;
    pub const PWRITEV2: u64 = 328;
    /// `statfs.f_type` of tmpfs, /dev/shm, memfd and SysV shm files.
    pub const TMPFS_MAGIC: u64 = 0x0102_1994;

    pub const fn is_write(nr: u64) -> bool {
        matches!(
            nr,
            WRITE | PWRITE64 | WRITEV | SENDFILE | SPLICE | PWRITEV | COPY_FILE_RANGE | PWRITEV2
        )
    }
}

/// A write-family call's arguments, kept between its entry and its exit (classic
/// tracepoints: the exit record has no arguments).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingWrite {
    pub nr: u64,
    pub args: [u64; 4],
}

/// Slots of the `STATS` array: health counters that make losses visible, never silent.
pub mod stats {
    /// A new process could not get an entry: the `COUNTERS` map was full.
    pub const MAP_FULL: u32 = 0;
    /// An exit event could not be queued (ring buffer full): that process's last counts are lost.
    pub const EXIT_LOST: u32 = 1;
    /// Exit events sent.
    pub const EXITS_SENT: u32 = 2;
    /// Entries created.
    pub const ENTRIES_CREATED: u32 = 3;
    pub const LEN: u32 = 4;
}

/// Bits of the x86 page fault error code.
pub mod fault {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    /// Highest user-space address on x86-64 (4-level paging); faults the kernel takes on user
    /// memory (e.g. `read()` into a fresh buffer) count, faults on kernel memory do not.
    pub const USER_ADDR_LIMIT: u64 = 0x0000_8000_0000_0000;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both are #[repr(C)] structs of integers with no padding holes that matter
    // (explicit `_pad`), valid for any bit pattern.
    unsafe impl aya::Pod for super::Counters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ExitEvent {}
}

#[cfg(test)]
mod tests {
    use super::seen;

    /// Two passes over `n` pages through the table as the kernel program uses it: how many
    /// pages of the second pass were taken for new (over-counted).
    fn recounted(n: u64, tgid: u32, page_of: impl Fn(u64) -> u64) -> u64 {
        let mut table = vec![0u64; seen::SLOTS as usize];
        let window = 7;
        let mut seen_page = |page: u64| {
            let h = seen::hash(tgid, page);
            let (s, t) = (seen::set(h) as usize, seen::tag(window, h));
            let ways = s..s + seen::WAYS as usize;
            if ways.clone().any(|i| table[i] == t) {
                return true;
            }
            let free = ways.clone().find(|&i| seen::window_of(table[i]) != window);
            table[free.unwrap_or(s + (h % u64::from(seen::WAYS)) as usize)] = t;
            false
        };
        for i in 0..n {
            assert!(!seen_page(page_of(i)), "a new page is new");
        }
        (0..n).filter(|&i| !seen_page(page_of(i))).count() as u64
    }

    #[test]
    fn a_page_written_again_in_its_window_is_seen() {
        // 256 pages, as in the host tests: none recounted.
        assert_eq!(recounted(256, 42, |i| 0x7f00_0000 + i), 0);
        assert_eq!(
            recounted(256, 42, |i| seen::file_page(0xffff_8880_1234_5600, i)),
            0
        );
        // A quarter of the table's slots written twice in one window (a writer rewriting 4096
        // pages): under 1 % come back as new; half the table, under 8 %.
        let n = u64::from(seen::SLOTS / 4);
        let r = recounted(n, 9, |i| 0x5555_0000 + i * 3);
        assert!(r < n / 100, "{r} of {n} recounted");
        let r = recounted(2 * n, 9, |i| 0x5555_0000 + i * 3);
        assert!(r < 2 * n * 8 / 100, "{r} of {} recounted", 2 * n);
    }

    /// The kernel side's count, over a set of units seen this window.
    fn new_pages(set: &mut std::collections::BTreeSet<u64>, first: u64, last: u64) -> u64 {
        let (_, _, units) = seen::whole_units(first, last);
        assert!(
            units <= seen::UNITS,
            "{first}..={last}: {units} whole units"
        );
        seen::new_pages(first, last, |u, s| !set.insert(seen::file_unit(7, u, s)))
    }

    #[test]
    fn a_shmem_call_is_checked_in_at_most_units_whole_units_and_every_page_counts() {
        for pages in [1, 2, 15, 16, 17, 32, 33, 64, 100, 1000, 1 << 20] {
            let s = seen::unit_shift(pages);
            assert!(pages <= seen::UNITS << s, "{pages} pages, shift {s}");
            assert!(s == 0 || pages > seen::UNITS << (s - 1), "smallest shift");
            for first in [0, 1, 5, 63, 64, 1_000_003] {
                let last = first + pages - 1;
                // Written once: every page new, none missed.
                let mut set = Default::default();
                assert_eq!(
                    new_pages(&mut set, first, last),
                    pages,
                    "{pages} at {first}"
                );
            }
        }
    }

    #[test]
    fn a_range_rewritten_by_calls_of_the_same_size_counts_once_and_misaligned_edges_over_count() {
        let mut set = Default::default();
        // 4096 pages in 64-page calls, twice (the fidelity matrix's tmpfs writer).
        let pass = |set: &mut _| {
            (0..64)
                .map(|c| new_pages(set, c * 64, c * 64 + 63))
                .sum::<u64>()
        };
        assert_eq!(pass(&mut set), 4096);
        assert_eq!(pass(&mut set), 0, "rewritten: nothing new");
        // A misaligned call rewritten: only the pages of its two partial units count again,
        // fewer than two units' worth.
        for pages in [seen::UNITS + 1, 2 * seen::UNITS + 4, 100, 1000] {
            let unit = 1 << seen::unit_shift(pages);
            let (first, last) = (101, 100 + pages);
            let mut set = Default::default();
            assert_eq!(new_pages(&mut set, first, last), pages);
            let again = new_pages(&mut set, first, last);
            assert!(
                again < 2 * unit,
                "{pages} pages: {again} again (unit {unit})"
            );
            let (_, _, units) = seen::whole_units(first, last);
            assert_eq!(again, pages - units * unit);
        }
        // Up to UNITS pages a call: page by page, exact.
        let mut set = Default::default();
        let n = seen::UNITS;
        assert_eq!(new_pages(&mut set, 3, 2 + n), n);
        assert_eq!(
            new_pages(&mut set, 10, 9 + n),
            7,
            "only the 7 pages past the first call"
        );
    }

    #[test]
    fn file_pages_never_collide_with_virtual_pages() {
        let v = 0x7fff_ffff_f000u64 >> 12;
        assert_ne!(seen::file_page(0, 0), 0);
        assert!(seen::file_page(1, v) >> 63 == 1 && v >> 63 == 0);
    }
}
