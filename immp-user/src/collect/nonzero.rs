//! What an idle migration sends in round 0: the guest's non-zero pages.
//!
//! Pre-copy sends every page once, but a page of zeros costs a few bytes of header (QEMU checks
//! each page and sends zero pages as a flag). So round 0 is the guest's non-zero memory, which
//! is neither "memory in use" nor MemTotal: pages freed by the kernel keep their old bytes (a
//! dropped page cache, a process that exited, an unpacked initramfs) and are sent like used ones.
//! In a 512 MiB Debian guest just booted, MemTotal - MemFree said 57 MB; QEMU sent 105 MB.
//!
//! The only place a guest can see that is its own physical memory. /proc/kcore exposes it
//! read-only as an ELF core (root; refused under lockdown `confidentiality`); we read a
//! stratified random sample of pages (4096 of them: 16 MiB read, a few ms, no page written but
//! our one buffer) and scale the non-zero share to the RAM segments. The standard error is at
//! most 0.8 % of RAM (binomial, p = 0.5). Without kcore the caller falls back to memory in use.
use std::{
    fs::File,
    io,
    os::unix::fs::FileExt,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Pages read per estimate.
pub const SAMPLES: usize = 4096;
/// An estimate is reused this long: a long-running agent should not read 16 MiB of RAM every
/// second, but a writer's first pass over a buffer grows round 0 by MB a second (in the lab,
/// 30 MB between immp's start and the migration's).
const REFRESH: Duration = Duration::from_secs(5);
const PAGE: u64 = 4096;

/// One estimate of the guest's non-zero memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Non-zero bytes, scaled from the sample.
    pub bytes: f64,
    /// Bytes of RAM kcore exposes (the population sampled).
    pub ram_bytes: f64,
    pub samples: usize,
    pub nonzero: usize,
}

/// A RAM segment of /proc/kcore: `len` bytes at file offset `offset`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Segment {
    offset: u64,
    len: u64,
}

/// /proc/kcore opened, its RAM segments found.
pub struct Kcore {
    file: File,
    ram: Vec<Segment>,
}

impl Kcore {
    pub fn open() -> io::Result<Self> {
        let file = File::open("/proc/kcore")?;
        let mut head = vec![0u8; 64];
        file.read_exact_at(&mut head, 0)?;
        let (phoff, phentsize, phnum) = elf_header(&head)?;
        let mut table = vec![0u8; phentsize * phnum];
        file.read_exact_at(&mut table, phoff)?;
        let ram = ram_segments(&table, phentsize);
        if ram.is_empty() {
            return Err(io::Error::other("/proc/kcore lists no RAM segment"));
        }
        Ok(Self { file, ram })
    }

    /// Bytes of RAM exposed.
    pub fn ram_bytes(&self) -> u64 {
        self.ram.iter().map(|s| s.len).sum()
    }

    /// The exact count: every page of RAM read once (a check of `estimate`; 512 MiB read for
    /// a 512 MiB guest, not for use every interval).
    pub fn full_scan(&self) -> io::Result<f64> {
        self.estimate((self.ram_bytes() / PAGE) as usize, 1)
            .map(|e| e.bytes)
    }

    /// Reads `n` pages, one at a random place in each of `n` equal strata of RAM (`n` = all
    /// pages reads every page once: the exact count).
    pub fn estimate(&self, n: usize, seed: u64) -> io::Result<Estimate> {
        let total: u64 = self.ram.iter().map(|s| s.len).sum();
        let pages = total / PAGE;
        if n == 0 || pages == 0 {
            return Err(io::Error::other("nothing to sample"));
        }
        let mut rng = XorShift(seed | 1);
        let mut buf = vec![0u8; PAGE as usize];
        let mut nonzero = 0;
        for i in 0..n as u64 {
            let lo = pages * i / n as u64;
            let hi = (pages * (i + 1) / n as u64).max(lo + 1);
            let page = lo + rng.next() % (hi - lo);
            self.file
                .read_exact_at(&mut buf, self.offset_of(page * PAGE))?;
            nonzero += usize::from(buf.iter().any(|&b| b != 0));
        }
        Ok(Estimate {
            bytes: total as f64 * nonzero as f64 / n as f64,
            ram_bytes: total as f64,
            samples: n,
            nonzero,
        })
    }

    /// The file offset of byte `at` of RAM (segments laid end to end).
    fn offset_of(&self, mut at: u64) -> u64 {
        for s in &self.ram {
            if at < s.len {
                return s.offset + at;
            }
            at -= s.len;
        }
        unreachable!("sampled past the end of RAM")
    }
}

/// e_phoff, e_phentsize, e_phnum of a little-endian ELF64 header.
fn elf_header(h: &[u8]) -> io::Result<(u64, usize, usize)> {
    if h.len() < 64 || &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        return Err(io::Error::other(
            "/proc/kcore is not a little-endian ELF64 core",
        ));
    }
    let phoff = u64::from_le_bytes(h[32..40].try_into().unwrap());
    let phentsize = u16::from_le_bytes([h[54], h[55]]) as usize;
    let phnum = u16::from_le_bytes([h[56], h[57]]) as usize;
    if phentsize < 56 || phnum == 0 || phnum > 4096 {
        return Err(io::Error::other(
            "/proc/kcore has no usable program headers",
        ));
    }
    Ok((phoff, phentsize, phnum))
}

/// The PT_LOAD segments that are RAM. kcore gives RAM (and only RAM and the kernel text) a
/// physical address; the text lives in the top 2 GiB of the address space, RAM in the direct
/// map below it. Both are in /proc/iomem's "System RAM", but the text is also inside RAM, so
/// counting it would count it twice.
/// The direct map is one linear mapping, so every RAM segment has the same vaddr - paddr: the
/// largest segment's offset keeps out anything else a kernel might give an address.
fn ram_segments(table: &[u8], phentsize: usize) -> Vec<Segment> {
    const PT_LOAD: u32 = 1;
    const KERNEL_TEXT_BASE: u64 = 0xffff_ffff_8000_0000;
    let u64_at = |e: &[u8], o: usize| u64::from_le_bytes(e[o..o + 8].try_into().unwrap());
    let candidates: Vec<&[u8]> = table
        .chunks_exact(phentsize)
        .filter(|e| u32::from_le_bytes(e[..4].try_into().unwrap()) == PT_LOAD)
        .filter(|e| u64_at(e, 24) != u64::MAX && u64_at(e, 16) < KERNEL_TEXT_BASE)
        .collect();
    let map = |e: &[u8]| u64_at(e, 16).wrapping_sub(u64_at(e, 24));
    let Some(largest) = candidates.iter().max_by_key(|e| u64_at(e, 32)) else {
        return Vec::new();
    };
    let direct = map(largest);
    candidates
        .iter()
        .filter(|e| map(e) == direct)
        .map(|e| Segment {
            offset: u64_at(e, 8),
            len: u64_at(e, 32) / PAGE * PAGE,
        })
        .filter(|s| s.len > 0)
        .collect()
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Where a round-0 figure came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RoundZero {
    /// Sampled from /proc/kcore.
    Sampled(Estimate),
    /// kcore unreadable (why): memory in use, a lower bound.
    InUse(f64, &'static str),
}

impl RoundZero {
    pub fn bytes(&self) -> f64 {
        match self {
            Self::Sampled(e) => e.bytes,
            Self::InUse(b, _) => *b,
        }
    }
}

static CACHE: Mutex<Option<(Instant, RoundZero)>> = Mutex::new(None);

/// Round-0 figures of the last `GOAL_MEMORY`, for the goal (see `goal_round_zero`).
static HISTORY: Mutex<Vec<(Instant, f64)>> = Mutex::new(Vec::new());
const GOAL_MEMORY: Duration = Duration::from_secs(300);

/// Round 0 as the default goal sees it: its lowest figure over the last 5 minutes. The goal is
/// a multiple of an idle migration; a writer's first pass over a new buffer grows round 0 by
/// the very pages it dirties, and a goal that followed at once would let the writer raise its
/// own budget (in the lab the light writer's cap went from 31 % to 44 % that way). Lasting
/// growth (a page cache filling over hours) reaches the goal after 5 minutes.
pub fn goal_round_zero() -> f64 {
    let now = round_zero().bytes();
    let mut h = HISTORY.lock().unwrap_or_else(|p| p.into_inner());
    lowest_recent(&mut h, Instant::now(), now)
}

/// Records `value` at `now` (one figure per refresh) and returns the lowest of the last
/// `GOAL_MEMORY`.
fn lowest_recent(h: &mut Vec<(Instant, f64)>, now: Instant, value: f64) -> f64 {
    h.retain(|(at, _)| now.duration_since(*at) < GOAL_MEMORY);
    if h.last()
        .is_none_or(|(at, _)| now.duration_since(*at) >= REFRESH)
    {
        h.push((now, value));
    }
    h.iter().map(|(_, b)| *b).fold(value, f64::min)
}

/// Round 0 of an idle migration now, sampled at most every 5 s (process-wide: every command
/// and view asks the same question of the same memory). A sample that fails after one that
/// worked keeps the last good one: the goal must not drop to the in-use lower bound for a
/// moment.
pub fn round_zero() -> RoundZero {
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, r)) = *cache
        && at.elapsed() < REFRESH
    {
        return r;
    }
    let r = match (measure(), *cache) {
        (RoundZero::InUse(..), Some((_, last @ RoundZero::Sampled(_)))) => last,
        (r, _) => r,
    };
    *cache = Some((Instant::now(), r));
    r
}

/// Round 0, the goal's round 0 and the RAM, now (the sampler puts this in every snapshot).
pub fn memory() -> immp_model::snapshot::Memory {
    let r = round_zero();
    immp_model::snapshot::Memory {
        round_zero_bytes: r.bytes(),
        goal_round_zero_bytes: goal_round_zero(),
        ram_bytes: ram_bytes(),
        sampled: matches!(r, RoundZero::Sampled(_)),
    }
}

/// The guest's RAM as kcore exposes it (what a round can dirty at most), else MemTotal.
pub fn ram_bytes() -> f64 {
    match round_zero() {
        RoundZero::Sampled(e) => e.ram_bytes,
        RoundZero::InUse(..) => super::procfs::mem_total(),
    }
}

fn measure() -> RoundZero {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    match Kcore::open().and_then(|k| k.estimate(SAMPLES, seed)) {
        Ok(e) => RoundZero::Sampled(e),
        Err(e) => RoundZero::InUse(super::procfs::mem_used(), reason(&e)),
    }
}

fn reason(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::NotFound => "no /proc/kcore in this kernel",
        io::ErrorKind::PermissionDenied => "/proc/kcore refused (not root, or lockdown)",
        _ => "/proc/kcore unreadable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phdr(kind: u32, offset: u64, vaddr: u64, paddr: u64, len: u64) -> Vec<u8> {
        let mut e = vec![0u8; 56];
        e[..4].copy_from_slice(&kind.to_le_bytes());
        e[8..16].copy_from_slice(&offset.to_le_bytes());
        e[16..24].copy_from_slice(&vaddr.to_le_bytes());
        e[24..32].copy_from_slice(&paddr.to_le_bytes());
        e[32..40].copy_from_slice(&len.to_le_bytes());
        e
    }

    #[test]
    fn only_direct_map_ram_is_sampled() {
        let table = [
            phdr(4, 0x1000, 0, 0, 0x1000), // PT_NOTE
            phdr(1, 0x2000, 0xffff_ffff_8100_0000, 0x100_0000, 0x20_0000), // kernel text
            phdr(1, 0x3000, 0xffff_c900_0000_0000, u64::MAX, 0x100_0000), // vmalloc
            phdr(1, 0x4000, 0xffff_8880_0000_0000, 0, 0x9_f000), // RAM below 640 KiB
            phdr(1, 0x5000, 0xffff_8880_0010_0000, 0x10_0000, 0x1000_0000), // RAM
            phdr(1, 0x6000, 0xffff_ea00_0000_0000, 0x2000, 0x40_0000), // not direct-mapped
        ]
        .concat();
        let ram = ram_segments(&table, 56);
        assert_eq!(
            ram,
            vec![
                Segment {
                    offset: 0x4000,
                    len: 0x9_f000
                },
                Segment {
                    offset: 0x5000,
                    len: 0x1000_0000
                },
            ]
        );
    }

    #[test]
    fn offsets_run_across_segments() {
        let k = Kcore {
            file: File::open("/dev/null").unwrap(),
            ram: vec![
                Segment {
                    offset: 100,
                    len: 2 * PAGE,
                },
                Segment {
                    offset: 9000,
                    len: PAGE,
                },
            ],
        };
        assert_eq!(k.offset_of(0), 100);
        assert_eq!(k.offset_of(PAGE + 5), 100 + PAGE + 5);
        assert_eq!(k.offset_of(2 * PAGE), 9000);
    }

    #[test]
    fn the_goal_sees_the_lowest_round_zero_of_the_last_five_minutes() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut h = Vec::new();
        assert_eq!(lowest_recent(&mut h, at(0), 100.0), 100.0);
        // A writer's first pass: round 0 grows, the goal does not follow.
        assert_eq!(lowest_recent(&mut h, at(10), 300.0), 100.0);
        assert_eq!(lowest_recent(&mut h, at(200), 320.0), 100.0);
        // Five minutes later the growth has lasted: the goal follows.
        assert_eq!(lowest_recent(&mut h, at(305), 320.0), 300.0);
        assert_eq!(lowest_recent(&mut h, at(520), 320.0), 320.0);
        // A drop is followed at once.
        assert_eq!(lowest_recent(&mut h, at(525), 90.0), 90.0);
    }

    #[test]
    fn not_an_elf_core_is_refused() {
        assert!(elf_header(&[0u8; 64]).is_err());
        let mut h = vec![0u8; 64];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        assert!(elf_header(&h).is_err(), "no program headers");
    }

    /// A file laid out like kcore (an ELF header, one RAM segment) with a known share of
    /// non-zero pages: the estimate must land within 4 standard errors of it.
    #[test]
    fn the_estimate_scales_the_non_zero_share() {
        let pages = 8192u64;
        let dir = std::env::temp_dir().join(format!("immp-kcore-{}", std::process::id()));
        let mut img = vec![0u8; 4096 + (pages * PAGE) as usize];
        img[..6].copy_from_slice(b"\x7fELF\x02\x01");
        img[32..40].copy_from_slice(&64u64.to_le_bytes());
        img[54..56].copy_from_slice(&56u16.to_le_bytes());
        img[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = phdr(1, 4096, 0xffff_8880_0000_0000, 0, pages * PAGE);
        img[64..120].copy_from_slice(&ph);
        // Every third page holds one non-zero byte, at a varying place.
        for p in (0..pages).step_by(3) {
            img[(4096 + p * PAGE + (p * 7) % PAGE) as usize] = 1;
        }
        std::fs::write(&dir, &img).unwrap();
        let file = File::open(&dir).unwrap();
        let mut head = vec![0u8; 64];
        file.read_exact_at(&mut head, 0).unwrap();
        let (phoff, size, n) = elf_header(&head).unwrap();
        let mut table = vec![0u8; size * n];
        file.read_exact_at(&mut table, phoff).unwrap();
        let k = Kcore {
            file,
            ram: ram_segments(&table, size),
        };
        let e = k.estimate(SAMPLES, 42).unwrap();
        std::fs::remove_file(&dir).unwrap();
        let truth = (pages.div_ceil(3) * PAGE) as f64;
        let sd = (pages * PAGE) as f64 * (1.0f64 / 3.0 * 2.0 / 3.0 / SAMPLES as f64).sqrt();
        assert_eq!(e.ram_bytes, (pages * PAGE) as f64);
        assert!((e.bytes - truth).abs() < 4.0 * sd, "{e:?} vs {truth}");
    }
}
