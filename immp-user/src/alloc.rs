//! immp's allocator: immp runs inside the guest it measures, so every page it touches and gives
//! back is a page the next migration sends. A freed page goes back to the guest's free memory
//! with its bytes (the kernel does not clear it); only a page of zeros is nearly free to send.
//!
//! - Every block is zeroed when freed (`ZeroOnFree`).
//! - That is not enough for bursts of small blocks: the C allocator writes its own list
//!   pointers into each freed chunk, so a parsed kernel BTF (tens of MB of small blocks, which
//!   aya's loader builds whether asked or not) leaves a page with a pointer on it nearly
//!   everywhere. `scratch(f)` runs `f` with this thread's allocations in a private mapping of
//!   their own (bump-allocated, no metadata inside); when `f` returns and nothing allocated in
//!   it is still alive, the mapping is zeroed and unmapped: the guest gets back zero pages.
//!   Anything still alive keeps the mapping (correct, only not free).
use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::atomic::{AtomicUsize, Ordering::SeqCst},
};

/// Address space reserved for one scratch scope (MAP_NORESERVE: costs nothing until touched).
const RESERVE: usize = 1 << 30;

pub struct ZeroOnFree;

/// The scratch mapping: base (0: none), bytes handed out, blocks alive.
static BASE: AtomicUsize = AtomicUsize::new(0);
static USED: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static IN_SCRATCH: Cell<bool> = const { Cell::new(false) };
}

fn in_arena(p: *mut u8) -> bool {
    let base = BASE.load(SeqCst);
    base != 0 && (p as usize) >= base && (p as usize) < base + RESERVE
}

/// A bump allocation from the scratch mapping, or None (not in a scope, or full).
fn arena_alloc(layout: Layout) -> Option<*mut u8> {
    if !IN_SCRATCH.with(Cell::get) {
        return None;
    }
    let base = BASE.load(SeqCst);
    let used = USED.load(SeqCst);
    let start = (base + used).next_multiple_of(layout.align()) - base;
    let end = start.checked_add(layout.size())?;
    if base == 0 || end > RESERVE {
        return None;
    }
    // Only the scope's own thread allocates here, so a plain store is enough.
    USED.store(end, SeqCst);
    LIVE.fetch_add(1, SeqCst);
    Some((base + start) as *mut u8)
}

// SAFETY: delegates to the system allocator or hands out disjoint ranges of a private mapping;
// zeroing writes only within the block being freed.
unsafe impl GlobalAlloc for ZeroOnFree {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match arena_alloc(layout) {
            Some(p) => p,
            // SAFETY: same contract as the caller's.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_arena(ptr) {
            // Zeroed now too: should something made in the scope outlive it, the mapping is
            // kept, and what is freed in it later must still leave zero pages.
            // SAFETY: the block is ours until this call returns.
            unsafe { std::ptr::write_bytes(ptr, 0, layout.size()) };
            LIVE.fetch_sub(1, SeqCst);
            return;
        }
        // SAFETY: `ptr` points to `layout.size()` bytes we own until this call returns.
        unsafe {
            std::ptr::write_bytes(ptr, 0, layout.size());
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // A fresh mapping reads as zeros.
        match arena_alloc(layout) {
            Some(p) => p,
            // SAFETY: same contract as the caller's.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }
}

/// Runs `f` with this thread's allocations in a scratch mapping given back as zero pages
/// afterwards (see the module). Nested or concurrent scopes just run `f`. Returns whether
/// the mapping was given back.
pub fn scratch<T>(f: impl FnOnce() -> T) -> (T, bool) {
    let Some(base) = open_arena() else {
        return (f(), false);
    };
    let scope = Scope { base };
    let out = f();
    (out, scope.close())
}

/// This thread allocates in the arena while a `Scope` lives; dropped (also on a panic), it
/// stops, and gives the mapping back if nothing in it is alive.
struct Scope {
    base: usize,
}

impl Scope {
    fn close(self) -> bool {
        let given_back = self.end();
        std::mem::forget(self);
        given_back
    }

    fn end(&self) -> bool {
        IN_SCRATCH.with(|c| c.set(false));
        if LIVE.load(SeqCst) != 0 {
            // Something made in the scope is still in use: keep the mapping for good (every
            // block freed in it is zeroed as it goes).
            return false;
        }
        let used = USED.load(SeqCst);
        // Unregistered first: once the range is unmapped the kernel may hand it to someone
        // else, whose frees must not look like ours.
        BASE.store(0, SeqCst);
        // SAFETY: [base, base + used) is our mapping and nothing in it is alive; zero, then
        // unmap.
        unsafe {
            std::ptr::write_bytes(self.base as *mut u8, 0, used);
            libc::munmap(self.base as *mut libc::c_void, RESERVE);
        }
        true
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        self.end();
    }
}

fn open_arena() -> Option<usize> {
    if BASE.load(SeqCst) != 0 {
        return None;
    }
    // SAFETY: a fresh private anonymous mapping, owned by this module.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RESERVE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    if BASE
        .compare_exchange(0, p as usize, SeqCst, SeqCst)
        .is_err()
    {
        // SAFETY: our own mapping, unused.
        unsafe { libc::munmap(p, RESERVE) };
        return None;
    }
    USED.store(0, SeqCst);
    LIVE.store(0, SeqCst);
    IN_SCRATCH.with(|c| c.set(true));
    Some(p as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary's allocator is the system one; these check the arena logic directly.
    #[test]
    fn scope_allocations_come_from_the_arena_and_are_given_back() {
        let ((inside, addr), given_back) = scratch(|| {
            let a = arena_alloc(Layout::from_size_align(100, 8).unwrap()).unwrap();
            let b = arena_alloc(Layout::from_size_align(10, 64).unwrap()).unwrap();
            assert_eq!(b as usize % 64, 0);
            assert!(b as usize >= a as usize + 100);
            let inside = in_arena(a) && in_arena(b);
            // SAFETY: blocks from the arena, freed once.
            unsafe {
                ZeroOnFree.dealloc(a, Layout::from_size_align(100, 8).unwrap());
                ZeroOnFree.dealloc(b, Layout::from_size_align(10, 64).unwrap());
            }
            (inside, a as usize)
        });
        assert!(inside);
        assert!(given_back, "nothing alive: unmapped");
        assert!(!in_arena(addr as *mut u8));
    }

    #[test]
    fn outside_a_scope_nothing_comes_from_the_arena() {
        assert!(arena_alloc(Layout::from_size_align(8, 8).unwrap()).is_none());
    }
}
