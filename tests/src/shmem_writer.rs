//! `immp-workload shmem-write N PATH CALL PASSES`: writes pages 0..N of a shmem file through
//! one of the write family of calls, PASSES times over within the bracket, with new bytes each
//! pass. PATH is a file on a tmpfs, or `memfd` for an anonymous memfd. The writer never maps
//! the file: no page fault sees these pages, only the shmem class can.
use std::{
    fs::File,
    io::Write,
    os::fd::{AsRawFd, FromRawFd},
};

/// Pages per call (the kernel side checks a call in at most 8 aligned units; 16-page calls at
/// multiples of 16 are pairs, rewritten exactly).
const CHUNK: usize = 16;

const CALLS: &str =
    "write|write-once|pwrite|pwrite-sync|writev|pwritev|sendfile|splice|copy_file_range";

pub fn run(args: &[String], pg: usize) {
    let (n, passes) = (super::arg(args, 1), super::arg(args, 4));
    let path = args.get(2).expect("PATH");
    let call = args.get(3).map(String::as_str).unwrap_or("");
    if !CALLS.split('|').any(|c| c == call) {
        eprintln!("immp-workload: CALL must be one of {CALLS}");
        std::process::exit(2);
    }
    let dest = open(path);
    let pass_bytes = |pass: usize| vec![pass as u8 ^ 0x5a; n * pg];
    // The calls that copy from a file read each pass's bytes from a source filled before the
    // bracket (on a tmpfs: copy_file_range refuses to cross filesystem types).
    let source = source_file(&(0..passes).flat_map(pass_bytes).collect::<Vec<u8>>());
    super::bracket(|| {
        for pass in 0..passes {
            let at = (pass * n * pg) as i64;
            write_pass(call, &dest, (&source, at), &pass_bytes(pass), pg);
        }
    });
}

fn open(path: &str) -> File {
    if path == "memfd" {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"immp-shmem".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: a fresh descriptor we own.
        return unsafe { File::from_raw_fd(fd) };
    }
    super::create_rw(path)
}

/// An unlinked /dev/shm file holding `bytes`.
fn source_file(bytes: &[u8]) -> File {
    let p = format!("/dev/shm/immp-src-{}", std::process::id());
    let mut f = open(&p);
    let _ = std::fs::remove_file(&p);
    f.write_all(bytes).expect("fill source");
    f
}

/// One pass: `bytes` into pages 0.. of `dest`; the copying calls take them from the source
/// file at the given offset instead.
fn write_pass(call: &str, dest: &File, (source, at): (&File, i64), bytes: &[u8], pg: usize) {
    let (d, s) = (dest.as_raw_fd(), source.as_raw_fd());
    let len = bytes.len();
    // SAFETY (all calls below): valid descriptors, buffers and lengths; results are checked.
    unsafe {
        match call {
            "write" => {
                libc::lseek(d, 0, libc::SEEK_SET);
                for chunk in bytes.chunks(CHUNK * pg) {
                    (&*dest).write_all(chunk).expect("write");
                }
            }
            "write-once" => {
                let r = libc::pwrite(d, bytes.as_ptr().cast(), len, 0);
                assert_eq!(r, len as isize, "one pwrite of everything");
            }
            "pwrite-sync" => {
                // A database's pattern: rewrite, then make it durable (written back: clean).
                for (i, page) in bytes.chunks(pg).enumerate() {
                    let r = libc::pwrite(d, page.as_ptr().cast(), pg, (i * pg) as i64);
                    assert_eq!(r, pg as isize, "pwrite");
                }
                assert_eq!(libc::fdatasync(d), 0, "fdatasync");
            }
            "pwrite" => {
                for (i, page) in bytes.chunks(pg).enumerate() {
                    let r = libc::pwrite(d, page.as_ptr().cast(), pg, (i * pg) as i64);
                    assert_eq!(r, pg as isize, "pwrite");
                }
            }
            "writev" | "pwritev" => {
                libc::lseek(d, 0, libc::SEEK_SET);
                for chunk in bytes.chunks(CHUNK * pg) {
                    let iov: Vec<libc::iovec> = chunk
                        .chunks(pg)
                        .map(|p| libc::iovec {
                            iov_base: p.as_ptr() as *mut _,
                            iov_len: p.len(),
                        })
                        .collect();
                    let r = if call == "writev" {
                        libc::writev(d, iov.as_ptr(), iov.len() as i32)
                    } else {
                        let at = chunk.as_ptr().offset_from(bytes.as_ptr()) as i64;
                        libc::pwritev(d, iov.as_ptr(), iov.len() as i32, at)
                    };
                    assert_eq!(r, chunk.len() as isize, "{call}");
                }
            }
            "sendfile" | "copy_file_range" => {
                libc::lseek(d, 0, libc::SEEK_SET);
                let (mut done, mut off) = (0usize, at);
                while done < len {
                    let r = if call == "sendfile" {
                        libc::sendfile(d, s, &mut off, (len - done).min(CHUNK * pg))
                    } else {
                        let n = (len - done).min(CHUNK * pg);
                        libc::copy_file_range(s, &mut off, d, std::ptr::null_mut(), n, 0)
                    };
                    assert!(r > 0, "{call}: {}", std::io::Error::last_os_error());
                    done += r as usize;
                }
            }
            "splice" => splice_pass(d, bytes),
            _ => unreachable!(),
        }
    }
}

/// Through a pipe: write a pipe's worth, splice it into the file at an explicit offset.
fn splice_pass(d: i32, bytes: &[u8]) {
    let mut fds = [0i32; 2];
    // SAFETY: a two-element array for pipe(2); every call's result is checked.
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0, "pipe");
        let mut off: i64 = 0;
        for chunk in bytes.chunks(16 * 4096) {
            let w = libc::write(fds[1], chunk.as_ptr().cast(), chunk.len());
            assert_eq!(w, chunk.len() as isize, "fill pipe");
            let mut left = chunk.len();
            while left > 0 {
                let r = libc::splice(fds[0], std::ptr::null_mut(), d, &mut off, left, 0);
                assert!(r > 0, "splice: {}", std::io::Error::last_os_error());
                left -= r as usize;
            }
        }
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

/// `immp-workload syscall-bench N`: the cost the syscall-exit hook adds, in ns per call, for a
/// call it ignores at once (getppid), a write it resolves and drops (one byte to /dev/null),
/// and a write it counts (one page pwrite() into a memfd). Prints the three figures.
pub fn bench(args: &[String], pg: usize) {
    let n = super::arg(args, 1).max(1);
    let per_call = |f: &mut dyn FnMut()| {
        let t = std::time::Instant::now();
        for _ in 0..n {
            f();
        }
        t.elapsed().as_nanos() as f64 / n as f64
    };
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("/dev/null");
    let memfd = open("memfd");
    let page = vec![1u8; pg];
    let mut i = 0usize;
    // SAFETY (the closures): plain syscalls on descriptors we own, buffers within bounds.
    let ignored = per_call(&mut || unsafe {
        libc::getppid();
    });
    let dropped = per_call(&mut || unsafe {
        libc::write(null.as_raw_fd(), page.as_ptr().cast(), 1);
    });
    let counted = per_call(&mut || unsafe {
        i = (i + 1) % 256;
        libc::pwrite(memfd.as_raw_fd(), page.as_ptr().cast(), pg, (i * pg) as i64);
    });
    println!("{ignored:.1} {dropped:.1} {counted:.1}");
}

/// `immp-workload churn-once N REPS`: within the bracket, REPS times: map N fresh anonymous
/// pages, write each, unmap (an allocator returning its arena and taking it again).
pub fn churn(args: &[String], pg: usize) {
    let (n, reps) = (super::arg(args, 1), super::arg(args, 2));
    super::bracket(|| {
        for rep in 0..reps {
            let p = super::map_anon(n);
            super::touch(p, n, rep as u8 + 1);
            // SAFETY: unmapping exactly what was mapped.
            unsafe { libc::munmap(p.cast(), n * pg) };
        }
    });
}
