//! Child processes with known memory behaviour, for immp's tests and benchmarks.
//!
//! Protocol for the one-shot modes: set up (no page touched yet), print `ready`, wait for a
//! line on stdin, do the work, print `done` (and extra facts such as `child PID`), then wait
//! for stdin to close before exiting. The caller thus brackets exactly the work.
//!
//! Usage: immp-workload MODE [ARGS]
//!   first-touch N        write one byte to each of N fresh anonymous pages
//!   read-scan N          read each of N fresh anonymous pages (zero page: no dirtying)
//!   file-write N PATH [CHUNK]  write() N pages to PATH in CHUNK-page writes (page cache, no faults)
//!   shmem-write N PATH CALL PASSES  write pages 0..N of a tmpfs file (or `memfd`) through CALL
//!                        (write, pwrite, writev, pwritev, sendfile, splice, copy_file_range, 16
//!                        pages a call; write-once: one pwrite of all N pages),
//!                        PASSES times with new bytes each pass (see shmem_writer.rs)
//!   churn-once N REPS    REPS times: map N fresh pages, write each, unmap (bracketed once)
//!   syscall-bench N      ns per call of getppid, a 1-byte write to /dev/null and a one-page
//!                        pwrite into a memfd (what immp's syscall-exit hook costs each)
//!   shared-map N PATH    write one byte to each of N pages of a MAP_SHARED file mapping
//!   cow N                touch N pages, fork; the child rewrites all N (copy-on-write) and exits
//!   storm N              fork N children that each touch 4 pages and exit at once
//!   writer PAGES         forever: touch PAGES fresh pages at a new address, unmap, repeat
//!                        (CPU-bound dirtier)
//!   rewrite PAGES        forever: rewrite the same PAGES pages (no faults after the first pass)
//!   ring PAGES WORK      forever: drop and re-touch a ring of PAGES pages, WORK spins per page
//!                        (a decoder-like writer: each touch is a new-page fault, RSS stays PAGES)
//!   ring-count PAGES WORK PATH  the `ring` writer that also keeps the number of pages it has
//!                        written in the first 8 bytes of PATH (one shared page): the migration
//!                        lab reads it to measure progress in host time
//!   service RATE PATH    a request/response service over a socket pair (a server thread and a
//!                        client thread): RATE requests per second on a fixed schedule, latency
//!                        counted from each request's scheduled time (so stalls are not hidden);
//!                        completed requests and a latency histogram live in PATH (see `bucket`)
//!   paced PAGES MS       forever: rewrite the same PAGES pages, one pass every MS milliseconds
//!   rewrite-bench PAGES WORK SECS  rewrite PAGES pages (WORK spins per page) for SECS seconds;
//!                        prints pages written per second
//!   burn                 forever: spin on the CPU, no memory writes
//!   idle                 forever: touch one fresh page per second
//!   fault-bench N REPS   map N pages, touch all, unmap, REPS times; prints ns per fault
//!   mixed MIB REPS       fill MIB of fresh memory with a PRNG and sort it, REPS times; prints ms
//!   threaded             forever: like idle, with a second thread (its TID is not the PID)
//!   The fidelity matrix's writers (`immp-guest fidelity`): each changes the bytes it writes on
//!   every write (a unique counter stamped into each page), since QEMU's page sampling sees a
//!   page only when its content changed; each runs one pass every MS milliseconds, forever.
//!   stream PAGES_PER_S RING  first touches only: PAGES_PER_S fresh pages a second (in tenths)
//!                        through a ring of RING pages, dropped (MADV_DONTNEED) at each wrap
//!   churn PAGES MS       mmap PAGES, stamp them, munmap (an allocate/free churner)
//!   fork-loop PAGES MS   stamp PAGES pages, fork a child that exits at once, wait for it
//!   pwrite-loop PATH PAGES MS SYNC  pwrite() PAGES stamped pages over PATH (created), then
//!                        fdatasync() when SYNC is 1
//!   map-loop PATH PAGES MS  stamp PAGES pages of a MAP_SHARED mapping of PATH, then msync()
//!   recv-ring PORT RING  accept one TCP connection on 127.0.0.1:PORT and read it forever into
//!                        a ring of RING pages
//!   send-loop PORT PAGES MS  connect to 127.0.0.1:PORT and send PAGES stamped pages per pass
//!   rename NAME MODE ... set the process name (comm, via prctl PR_SET_NAME; any bytes, e.g.
//!                        control characters) to NAME, then run MODE
mod shmem_writer;

use std::{
    io::{BufRead, Write},
    ptr,
};

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

fn map_anon(pages: usize) -> *mut u8 {
    map_anon_at(ptr::null_mut(), pages)
}

/// `map_anon` near `hint` (a hint only, no MAP_FIXED: the kernel goes elsewhere if it is taken,
/// and nothing mapped is replaced).
fn map_anon_at(hint: *mut libc::c_void, pages: usize) -> *mut u8 {
    // SAFETY: anonymous private mapping; callers stay within `pages * page()` bytes.
    let p = unsafe {
        libc::mmap(
            hint,
            pages * page(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(p != libc::MAP_FAILED, "mmap failed");
    p.cast()
}

fn touch(p: *mut u8, pages: usize, val: u8) {
    let pg = page();
    for i in 0..pages {
        // SAFETY: within the mapping made for `pages` pages.
        unsafe { ptr::write_volatile(p.add(i * pg), val) };
    }
}

fn say(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{s}");
    let _ = o.flush();
}

fn wait_line() {
    let mut l = String::new();
    let _ = std::io::stdin().lock().read_line(&mut l);
}

fn wait_eof() {
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut sink);
}

fn arg(args: &[String], i: usize) -> usize {
    args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        eprintln!("immp-workload: argument {i} must be a number");
        std::process::exit(2)
    })
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    while args.first().map(String::as_str) == Some("rename") {
        let name = args.get(1).unwrap_or_else(|| {
            eprintln!("immp-workload: rename needs a NAME");
            std::process::exit(2)
        });
        let c = std::ffi::CString::new(name.as_str()).expect("a name without NUL");
        // SAFETY: PR_SET_NAME reads a NUL-terminated string (cut to 15 bytes by the kernel).
        let r = unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr() as libc::c_ulong, 0, 0, 0) };
        assert_eq!(r, 0, "prctl(PR_SET_NAME)");
        args.drain(..2);
    }
    let mode = args.first().map(String::as_str).unwrap_or("");
    let pg = page();
    match mode {
        "first-touch" => {
            let n = arg(&args, 1);
            let p = map_anon(n);
            bracket(|| touch(p, n, 1));
        }
        "read-scan" => {
            let n = arg(&args, 1);
            let p = map_anon(n);
            bracket(|| {
                let mut sum = 0u64;
                for i in 0..n {
                    // SAFETY: within the mapping.
                    sum += unsafe { ptr::read_volatile(p.add(i * pg)) } as u64;
                }
                assert_eq!(sum, 0);
            });
        }
        "shmem-write" => shmem_writer::run(&args, pg),
        "syscall-bench" => shmem_writer::bench(&args, pg),
        "churn-once" => shmem_writer::churn(&args, pg),
        "file-write" => {
            let n = arg(&args, 1);
            let path = args.get(2).expect("PATH");
            let mut f = std::fs::File::create(path).expect("create file");
            let chunk = if args.len() > 3 {
                arg(&args, 3).max(1)
            } else {
                1
            };
            let buf = vec![7u8; pg * chunk];
            bracket(|| {
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk);
                    f.write_all(&buf[..k * pg]).expect("write");
                    left -= k;
                }
            });
        }
        "shared-map" => {
            let n = arg(&args, 1);
            let path = args.get(2).expect("PATH");
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .expect("open file");
            f.set_len((n * pg) as u64).expect("size file");
            use std::os::fd::AsRawFd;
            // SAFETY: shared mapping of a file of exactly n pages; written within bounds.
            let p = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    n * pg,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                )
            };
            assert!(p != libc::MAP_FAILED);
            bracket(|| touch(p.cast(), n, 1));
        }
        "fork-churn" => {
            // A shell-like parent: between forks it rewrites the same N pages, which every
            // fork write-protects again (copy-on-write). The hypervisor sees N pages.
            let (n, forks) = (arg(&args, 1), arg(&args, 2));
            let p = map_anon(n);
            touch(p, n, 1);
            bracket(|| {
                for i in 0..forks {
                    // SAFETY: single-threaded; the child exits at once without touching memory.
                    let child = unsafe { libc::fork() };
                    if child == 0 {
                        // SAFETY: leave the child without running the parent's exit handlers.
                        unsafe { libc::_exit(0) };
                    }
                    let mut st = 0;
                    // SAFETY: waiting for our own child.
                    unsafe { libc::waitpid(child, &mut st, 0) };
                    touch(p, n, (i % 250) as u8 + 2);
                }
            });
        }
        "cow" => {
            let n = arg(&args, 1);
            let p = map_anon(n);
            touch(p, n, 1);
            say("ready");
            wait_line();
            // SAFETY: single-threaded program; the child only touches memory and exits.
            let child = unsafe { libc::fork() };
            if child == 0 {
                touch(p, n, 2);
                // SAFETY: leave the child without running the parent's exit handlers.
                unsafe { libc::_exit(0) };
            }
            let mut st = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(child, &mut st, 0) };
            say(&format!("child {child}"));
            say("done");
            wait_eof();
        }
        "storm" => {
            let n = arg(&args, 1);
            bracket(|| {
                for _ in 0..n {
                    // SAFETY: single-threaded; children touch fresh memory and _exit.
                    let c = unsafe { libc::fork() };
                    if c == 0 {
                        touch(map_anon(4), 4, 1);
                        // SAFETY: as above.
                        unsafe { libc::_exit(0) };
                    }
                    let mut st = 0;
                    // SAFETY: reaping our own child.
                    unsafe { libc::waitpid(c, &mut st, 0) };
                }
            });
        }
        "writer" => {
            let n = arg(&args, 1);
            say("ready");
            // A new address each time (2^16 slots from 32 TiB up, a hint: the kernel goes
            // elsewhere if one is taken): immp counts the same address faulted in twice in a
            // window once, as the hypervisor would see the recycled page, and this writer
            // stands for a process streaming through fresh memory.
            for cycle in 0usize.. {
                let hint = (0x2000_0000_0000usize + (cycle % (1 << 16)) * n * pg) as *mut _;
                let p = map_anon_at(hint, n);
                touch(p, n, 1);
                // SAFETY: unmapping what we mapped.
                unsafe { libc::munmap(p.cast(), n * pg) };
            }
        }
        "rewrite" => {
            let n = arg(&args, 1);
            let p = map_anon(n);
            say("ready");
            let mut v = 0u8;
            loop {
                v = v.wrapping_add(1);
                touch(p, n, v);
            }
        }
        "ring" => {
            let (n, work) = (arg(&args, 1), arg(&args, 2));
            let p = map_anon(n);
            say("ready");
            let mut x = 1u64;
            loop {
                // SAFETY: drops the ring's pages (they read back as zero); p spans n pages.
                unsafe { libc::madvise(p.cast(), n * pg, libc::MADV_DONTNEED) };
                for i in 0..n {
                    for _ in 0..work {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                    // SAFETY: within the ring.
                    unsafe { ptr::write_volatile(p.add(i * pg), x as u8) };
                }
            }
        }
        "ring-count" => {
            let (n, work) = (arg(&args, 1), arg(&args, 2));
            let path = args.get(3).expect("PATH");
            let counter = shared_counters(path);
            let p = map_anon(n);
            say("ready");
            let (mut x, mut written) = (1u64, 0u64);
            loop {
                // SAFETY: as in `ring`.
                unsafe { libc::madvise(p.cast(), n * pg, libc::MADV_DONTNEED) };
                for i in 0..n {
                    for _ in 0..work {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                    // SAFETY: within the ring.
                    unsafe { ptr::write_volatile(p.add(i * pg), x as u8) };
                    written += 1;
                    counter[0].store(written, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        "service" => service(arg(&args, 1), args.get(2).expect("PATH")),
        "paced" => {
            let (n, ms) = (arg(&args, 1), arg(&args, 2) as u64);
            let p = map_anon(n);
            // Small pages on purpose: see the THP note in immp's README.
            // SAFETY: advice on our own mapping.
            unsafe { libc::madvise(p.cast(), n * pg, libc::MADV_NOHUGEPAGE) };
            say("ready");
            let mut v = 0u8;
            loop {
                let t = std::time::Instant::now();
                v = v.wrapping_add(1);
                touch(p, n, v);
                if let Some(left) = std::time::Duration::from_millis(ms).checked_sub(t.elapsed()) {
                    std::thread::sleep(left);
                }
            }
        }
        "rewrite-bench" => {
            let (n, work, secs) = (arg(&args, 1), arg(&args, 2), arg(&args, 3) as u64);
            let p = map_anon(n);
            // SAFETY: advice on our own mapping (small pages: see the THP note in the README).
            unsafe { libc::madvise(p.cast(), n * pg, libc::MADV_NOHUGEPAGE) };
            touch(p, n, 1);
            let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
            let (mut written, mut x) = (0u64, 1u64);
            let t = std::time::Instant::now();
            'outer: loop {
                for i in 0..n {
                    for _ in 0..work {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                    // SAFETY: within the mapping.
                    unsafe { ptr::write_volatile(p.add(i * pg), x as u8) };
                    written += 1;
                    if written % 256 == 0 && std::time::Instant::now() >= end {
                        break 'outer;
                    }
                }
            }
            say(&format!(
                "{:.1}",
                written as f64 / t.elapsed().as_secs_f64()
            ));
        }
        "burn" => {
            say("ready");
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        "idle" => {
            say("ready");
            loop {
                touch(map_anon(1), 1, 1);
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        "threaded" => {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                tx.send(()).expect("main waits");
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            });
            rx.recv().expect("second thread started");
            say("ready");
            loop {
                touch(map_anon(1), 1, 1);
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        "fault-bench" => {
            let (n, reps) = (arg(&args, 1), arg(&args, 2));
            let t = std::time::Instant::now();
            for _ in 0..reps {
                let p = map_anon(n);
                touch(p, n, 1);
                // SAFETY: unmapping what we mapped.
                unsafe { libc::munmap(p.cast(), n * pg) };
            }
            say(&format!(
                "{:.2}",
                t.elapsed().as_nanos() as f64 / (n * reps) as f64
            ));
        }
        "mixed" => {
            // A realistic-ish job: allocation, computation and memory writes in proportion.
            let (mib, reps) = (arg(&args, 1), arg(&args, 2));
            let t = std::time::Instant::now();
            for r in 0..reps {
                let mut v: Vec<u64> = Vec::with_capacity(mib << 17);
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ r as u64;
                for _ in 0..(mib << 17) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    v.push(x);
                }
                v.sort_unstable();
                std::hint::black_box(&v);
            }
            say(&format!("{:.2}", t.elapsed().as_secs_f64() * 1e3));
        }
        "stream" | "churn" | "fork-loop" | "pwrite-loop" | "map-loop" | "recv-ring"
        | "send-loop" => fidelity(mode, &args),
        _ => {
            eprintln!("immp-workload: unknown mode '{mode}' (see the source header for modes)");
            std::process::exit(2);
        }
    }
}

fn bracket(work: impl FnOnce()) {
    say("ready");
    wait_line();
    work();
    say("done");
    wait_eof();
}

/// One shared page of u64 counters backed by PATH (created, one page long): another process
/// (the lab's reporter) reads them with plain reads of the file.
fn shared_counters(path: &str) -> &'static [std::sync::atomic::AtomicU64] {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("open counter file");
    f.set_len(page() as u64).expect("size counter file");
    // SAFETY: a shared mapping of the one-page file; it outlives the process's use of it
    // (never unmapped), and AtomicU64 has the layout of u64 at 8-byte aligned offsets.
    unsafe {
        let p = libc::mmap(
            ptr::null_mut(),
            page(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert!(p != libc::MAP_FAILED, "mmap counter file");
        std::slice::from_raw_parts(p.cast(), page() / 8)
    }
}

/// The service's latency histogram: bucket i holds latencies in [2^(i/8), 2^((i+1)/8)) µs
/// (9 % wide), from 1 µs to about 4.5 minutes. Slot 0 of the counter page is the number of
/// completed requests, slot 1 the number sent, buckets start at slot `HISTO_FIRST`.
const HISTO_FIRST: usize = 8;
const HISTO_BUCKETS: usize = 8 * 28;

fn bucket(us: f64) -> usize {
    ((us.max(1.0).log2() * 8.0) as usize).min(HISTO_BUCKETS - 1)
}

/// `service RATE PATH`: the latency-sensitive neighbour of the lab's writer.
fn service(rate: usize, path: &str) -> ! {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::{Duration, Instant};
    let c = shared_counters(path);
    let (mut client, mut server) = UnixStream::pair().expect("socketpair");
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut x = 7u64;
        loop {
            if server.read_exact(&mut buf).is_err() {
                return;
            }
            // A little work per request, as a real handler would do.
            for _ in 0..2000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            buf[..8].copy_from_slice(&x.to_le_bytes());
            if server.write_all(&buf).is_err() {
                return;
            }
        }
    });
    let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    say("ready");
    let mut next = Instant::now();
    let (mut done, mut buf) = (0u64, [0u8; 64]);
    loop {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        buf[..8].copy_from_slice(&done.to_le_bytes());
        c[1].store(done + 1, Relaxed);
        client.write_all(&buf).expect("request");
        client.read_exact(&mut buf).expect("response");
        // From the scheduled time: a request delayed by a stalled CPU counts its wait.
        let us = Instant::now().duration_since(next).as_secs_f64() * 1e6;
        c[HISTO_FIRST + bucket(us)].fetch_add(1, Relaxed);
        done += 1;
        c[0].store(done, Relaxed);
        next += period;
    }
}

/// A counter stamped into the first 8 bytes of each page written: no page is ever written
/// with the bytes it held before (QEMU's page sampling compares page hashes).
struct Stamp(u64);

impl Stamp {
    fn new() -> Self {
        // Distinct per process, so that a recycled page never gets its old bytes back.
        Self(u64::from(std::process::id()) << 40)
    }

    fn pages(&mut self, p: *mut u8, pages: usize) {
        let pg = page();
        for i in 0..pages {
            self.0 += 1;
            // SAFETY: within the `pages` pages at p; page starts are 8-byte aligned.
            unsafe { ptr::write_volatile(p.add(i * pg).cast::<u64>(), self.0) };
        }
    }
}

/// Runs `pass` every `ms` milliseconds, forever (a pass that overruns starts the next at once).
fn paced(ms: u64, mut pass: impl FnMut()) -> ! {
    let period = std::time::Duration::from_millis(ms);
    let mut next = std::time::Instant::now();
    loop {
        pass();
        next += period;
        match next.checked_duration_since(std::time::Instant::now()) {
            Some(left) => std::thread::sleep(left),
            None => next = std::time::Instant::now(),
        }
    }
}

fn fidelity(mode: &str, args: &[String]) -> ! {
    let mut st = Stamp::new();
    match mode {
        "stream" => stream(arg(args, 1), arg(args, 2), &mut st),
        "churn" => {
            let n = arg(args, 1);
            say("ready");
            paced(arg(args, 2) as u64, || {
                let p = map_anon(n);
                st.pages(p, n);
                // SAFETY: unmapping what we mapped.
                unsafe { libc::munmap(p.cast(), n * page()) };
            })
        }
        "fork-loop" => {
            let n = arg(args, 1);
            let p = map_anon(n);
            say("ready");
            paced(arg(args, 2) as u64, || {
                st.pages(p, n);
                fork_and_reap();
            })
        }
        "pwrite-loop" => pwrite_loop(args, &mut st),
        "map-loop" => map_loop(args, &mut st),
        "recv-ring" => recv_ring(arg(args, 1) as u16, arg(args, 2)),
        "send-loop" => send_loop(args, &mut st),
        _ => unreachable!("dispatched by main"),
    }
}

/// First touches at a steady rate: a tenth of the rate every 100 ms, through a ring of
/// pages. Each chunk is dropped (MADV_DONTNEED) just before it is touched again: the pages
/// freed were written a whole ring ago, so when the kernel hands the same physical pages back
/// at once (it does: last freed, first reused), no page is dirtied twice in one window.
fn stream(per_s: usize, ring: usize, st: &mut Stamp) -> ! {
    let p = map_anon(ring);
    // Small pages: a huge page would be one fault for 512 pages.
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(p.cast(), ring * page(), libc::MADV_NOHUGEPAGE) };
    let step = (per_s / 10).clamp(1, ring);
    let mut at = 0;
    say("ready");
    paced(100, || {
        if at + step > ring {
            at = 0;
        }
        // SAFETY: at + step <= ring: a chunk of our own mapping.
        let chunk = unsafe { p.add(at * page()) };
        // SAFETY: as above; its pages read back as zero (first touches again).
        unsafe { libc::madvise(chunk.cast(), step * page(), libc::MADV_DONTNEED) };
        st.pages(chunk, step);
        at += step;
    })
}

fn fork_and_reap() {
    // SAFETY: single-threaded; the child exits at once without running anything.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: leave the child without the parent's exit handlers.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(child, &mut status, 0) };
}

/// Page-sized file writes through a 64-page buffer, stamped again for every chunk.
fn pwrite_loop(args: &[String], st: &mut Stamp) -> ! {
    use std::os::unix::fs::FileExt as _;
    let path = args.get(1).expect("PATH");
    let (n, ms, sync) = (arg(args, 2), arg(args, 3) as u64, arg(args, 4) == 1);
    let f = create_rw(path);
    let mut buf = vec![0u8; 64 * page()];
    say("ready");
    paced(ms, || {
        stamped_chunks(st, &mut buf, n, |bytes, first| {
            f.write_all_at(bytes, (first * page()) as u64)
                .expect("pwrite")
        });
        if sync {
            f.sync_data().expect("fdatasync");
        }
    })
}

/// A MAP_SHARED file mapping, every page stamped, then msync(MS_SYNC) as a database would.
fn map_loop(args: &[String], st: &mut Stamp) -> ! {
    use std::os::fd::AsRawFd as _;
    let path = args.get(1).expect("PATH");
    let (n, ms) = (arg(args, 2), arg(args, 3) as u64);
    let f = create_rw(path);
    f.set_len((n * page()) as u64).expect("size file");
    // SAFETY: a shared mapping of exactly the file's n pages; written within bounds.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            n * page(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert!(p != libc::MAP_FAILED, "mmap file");
    say("ready");
    paced(ms, || {
        st.pages(p.cast(), n);
        // SAFETY: the mapping made above.
        let r = unsafe { libc::msync(p, n * page(), libc::MS_SYNC) };
        assert_eq!(r, 0, "msync");
    })
}

/// Reads one connection forever into a ring of `ring` pages: the stream's bytes land in
/// each page of the ring in turn (the sender stamps every page it sends).
fn recv_ring(port: u16, ring: usize) -> ! {
    use std::io::Read as _;
    let l = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let p = map_anon(ring);
    // SAFETY: advice on our own mapping (small pages, as the other writers).
    unsafe { libc::madvise(p.cast(), ring * page(), libc::MADV_NOHUGEPAGE) };
    // SAFETY: the ring mapping, ring * page() bytes, owned by this process for its life.
    let buf = unsafe { std::slice::from_raw_parts_mut(p, ring * page()) };
    say("ready");
    let (mut s, _) = l.accept().expect("accept");
    let mut at = 0;
    loop {
        let end = (at + 16 * page()).min(buf.len());
        match s.read(&mut buf[at..end]) {
            Ok(0) | Err(_) => std::process::exit(0),
            Ok(k) => at = (at + k) % buf.len(),
        }
    }
}

fn send_loop(args: &[String], st: &mut Stamp) -> ! {
    let (port, n, ms) = (arg(args, 1) as u16, arg(args, 2), arg(args, 3) as u64);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    // One 16-page buffer, stamped again before each send: the sender's own dirtying stays
    // 16 pages a window, the receiver's ring gets new bytes in every page.
    let mut buf = vec![0u8; 16 * page()];
    say("ready");
    paced(ms, || {
        stamped_chunks(st, &mut buf, n, |bytes, _| {
            if s.write_all(bytes).is_err() {
                std::process::exit(0); // the receiver is gone
            }
        })
    })
}

/// `n` pages handed to `put(bytes, first page)` through `buf`, stamped anew for each chunk.
fn stamped_chunks(st: &mut Stamp, buf: &mut [u8], n: usize, mut put: impl FnMut(&[u8], usize)) {
    let chunk = buf.len() / page();
    let mut done = 0;
    while done < n {
        let k = (n - done).min(chunk);
        st.pages(buf.as_mut_ptr(), k);
        put(&buf[..k * page()], done);
        done += k;
    }
}

fn create_rw(path: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("open file")
}
