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
//!   syscall-bench N      ns per call of getppid, a 1-byte write to /dev/null and a one-page
//!                        pwrite into a memfd (what immp's syscall-exit hook costs each)
//!   shared-map N PATH    write one byte to each of N pages of a MAP_SHARED file mapping
//!   cow N                touch N pages, fork; the child rewrites all N (copy-on-write) and exits
//!   storm N              fork N children that each touch 4 pages and exit at once
//!   writer PAGES         forever: touch PAGES fresh pages, unmap, repeat (CPU-bound dirtier)
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
    // SAFETY: anonymous private mapping; callers stay within `pages * page()` bytes.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
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
            loop {
                let p = map_anon(n);
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
