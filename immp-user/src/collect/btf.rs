//! Kernel layout facts read from the running kernel's BTF, handed to the eBPF programs as
//! globals. Rust eBPF has no CO-RE relocations, so offsets that differ between kernels are
//! looked up here at load time instead of being compiled in.
//!
//! A small scanner over the raw BTF bytes, not a parser that builds the type graph: immp
//! runs inside the guest it measures, and every page it allocates at start-up is a page the
//! migration sends (a full BTF parse peaked at tens of MB). It keeps the file's bytes and one
//! offset per type, and reads what it needs in place.
use std::path::Path;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Where a large folio keeps its page count, and which flag marks it large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolioLayout {
    /// Byte offset of `_nr_pages` (6.x recent) or `_folio_nr_pages` (6.0-6.x) in `struct folio`.
    pub nr_pages_offset: u32,
    /// Value of `PG_head` in `enum pageflags`.
    pub pg_head_bit: u32,
    /// Byte offset of `index` (the folio's page offset in its file); 0 if not found.
    pub index_offset: u32,
}

// BTF kinds (include/uapi/linux/btf.h).
const INT: u32 = 1;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FUNC_PROTO: u32 = 13;
const VAR: u32 = 14;
const DATASEC: u32 = 15;
const DECL_TAG: u32 = 17;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

/// The raw BTF of a kernel: its bytes and where each type starts.
pub struct Btf {
    data: Vec<u8>,
    types: usize,
    strings: usize,
    strings_len: usize,
    /// Byte offset (from `types`) of type id i + 1.
    offsets: Vec<u32>,
}

/// One type record's fixed part.
#[derive(Clone, Copy)]
struct Head {
    name_off: u32,
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    size_or_type: u32,
    /// Where its kind-specific data starts (absolute).
    extra: usize,
}

pub fn load_vmlinux() -> anyhow::Result<Btf> {
    anyhow::ensure!(
        Path::new(VMLINUX_BTF).exists(),
        "{VMLINUX_BTF} is missing: this kernel has no BTF"
    );
    let data = std::fs::read(VMLINUX_BTF)
        .map_err(|e| anyhow::anyhow!("cannot read {VMLINUX_BTF}: {e}"))?;
    Btf::parse(data).map_err(|e| anyhow::anyhow!("cannot parse {VMLINUX_BTF}: {e}"))
}

impl Btf {
    pub fn parse(data: Vec<u8>) -> Result<Self, String> {
        let u32_at = |o: usize| -> Result<u32, String> {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .ok_or_else(|| "truncated header".to_string())
        };
        if data.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err("not little-endian BTF (bad magic)".into());
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let mut btf = Btf {
            types: hdr_len + type_off,
            strings: hdr_len + str_off,
            strings_len: str_len,
            offsets: Vec::new(),
            data,
        };
        if btf.strings + str_len > btf.data.len() || btf.types + type_len > btf.data.len() {
            return Err("sections beyond the end".into());
        }
        let mut at = 0usize;
        while at + 12 <= type_len {
            btf.offsets.push(at as u32);
            let h = btf.head_at(btf.types + at)?;
            at = h.extra - btf.types + extra_len(h.kind, h.vlen)?;
        }
        Ok(btf)
    }

    fn u32_at(&self, o: usize) -> Result<u32, String> {
        self.data
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(|| format!("truncated at {o}"))
    }

    fn head_at(&self, o: usize) -> Result<Head, String> {
        let info = self.u32_at(o + 4)?;
        Ok(Head {
            name_off: self.u32_at(o)?,
            kind: (info >> 24) & 0x1f,
            vlen: info & 0xffff,
            kind_flag: info >> 31 == 1,
            size_or_type: self.u32_at(o + 8)?,
            extra: o + 12,
        })
    }

    /// Type `id` (1-based; 0 is void).
    fn head(&self, id: u32) -> Option<Head> {
        let off = *self.offsets.get(id.checked_sub(1)? as usize)?;
        self.head_at(self.types + off as usize).ok()
    }

    fn name(&self, off: u32) -> &str {
        let start = self.strings + off as usize;
        let end_max = (self.strings + self.strings_len).min(self.data.len());
        let bytes = self.data.get(start..end_max).unwrap_or(&[]);
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..len]).unwrap_or("")
    }

    /// Ids of the types of this kind with this name.
    fn find(&self, kind: u32, name: &str) -> impl Iterator<Item = u32> + '_ {
        let name = name.to_string();
        (1..=self.offsets.len() as u32).filter(move |&id| {
            self.head(id)
                .is_some_and(|h| h.kind == kind && self.name(h.name_off) == name)
        })
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<Head> {
        for _ in 0..16 {
            let h = self.head(id)?;
            match h.kind {
                TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG => id = h.size_or_type,
                _ => return Some(h),
            }
        }
        None
    }

    /// Depth-first search through anonymous unions/structs for a member called `name`:
    /// its bit offset from the start of `s`.
    fn member_bit_offset(&self, s: Head, name: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for i in 0..s.vlen as usize {
            let m = s.extra + i * 12;
            let (mname, mtype, moff) = (
                self.u32_at(m).ok()?,
                self.u32_at(m + 4).ok()?,
                self.u32_at(m + 8).ok()?,
            );
            // With kind_flag the high 8 bits are a bitfield size.
            let off = if s.kind_flag {
                moff & 0x00ff_ffff
            } else {
                moff
            };
            let n = self.name(mname);
            if n == name {
                return Some(off);
            }
            if n.is_empty()
                && let Some(inner) = self
                    .resolve(mtype)
                    .filter(|t| matches!(t.kind, STRUCT | UNION))
                && let Some(found) = self.member_bit_offset(inner, name, depth + 1)
            {
                return Some(off + found);
            }
        }
        None
    }

    fn enum_value(&self, enum_name: &str, member: &str) -> Option<u32> {
        self.find(ENUM, enum_name).find_map(|id| {
            let h = self.head(id)?;
            (0..h.vlen as usize).find_map(|i| {
                let m = h.extra + i * 8;
                (self.name(self.u32_at(m).ok()?) == member).then(|| self.u32_at(m + 4).ok())?
            })
        })
    }
}

/// Bytes of kind-specific data after a type's 12-byte head.
fn extra_len(kind: u32, vlen: u32) -> Result<usize, String> {
    let v = vlen as usize;
    Ok(match kind {
        INT | VAR | DECL_TAG => 4,
        ARRAY => 12,
        STRUCT | UNION | DATASEC | ENUM64 => 12 * v,
        ENUM | FUNC_PROTO => 8 * v,
        0..=19 => 0,
        k => return Err(format!("unknown BTF kind {k}")),
    })
}

/// `None` when this kernel has no such fields (then each dirtied folio counts as one page).
pub fn folio_layout(btf: &Btf) -> Option<FolioLayout> {
    let folio = btf.find(STRUCT, "folio").find_map(|id| btf.head(id))?;
    let bits = ["_nr_pages", "_folio_nr_pages"]
        .iter()
        .find_map(|name| btf.member_bit_offset(folio, name, 0))?;
    let pg_head_bit = btf.enum_value("pageflags", "PG_head")?;
    let index_offset = btf
        .member_bit_offset(folio, "index", 0)
        .filter(|b| b % 8 == 0)
        .map_or(0, |b| b / 8);
    (bits % 8 == 0).then_some(FolioLayout {
        nr_pages_offset: bits / 8,
        pg_head_bit,
        index_offset,
    })
}

/// Byte offsets the shmem class follows from a task to the magic number of the filesystem a
/// descriptor's file lives on, in the order of `immp_common::globals::FILE_LAYOUT`.
pub type FileLayout = [u32; 8];

/// `None` when any field is missing or not byte-aligned (then the shmem class is off).
pub fn file_layout(btf: &Btf) -> Option<FileLayout> {
    const PATH: [(&str, &str); 8] = [
        ("task_struct", "files"),
        ("files_struct", "fdt"),
        ("fdtable", "max_fds"),
        ("fdtable", "fd"),
        ("file", "f_inode"),
        ("file", "f_pos"),
        ("inode", "i_sb"),
        ("super_block", "s_magic"),
    ];
    let mut out = [0u32; 8];
    for (slot, (ty, field)) in out.iter_mut().zip(PATH) {
        let s = btf.find(STRUCT, ty).find_map(|id| btf.head(id))?;
        let bits = btf.member_bit_offset(s, field, 0)?;
        if bits % 8 != 0 {
            return None;
        }
        *slot = bits / 8;
    }
    Some(out)
}

/// Does this kernel have this BTF tracepoint (`btf_trace_<name>` typedef)?
pub fn has_tracepoint(btf: &Btf, name: &str) -> bool {
    btf.find(TYPEDEF, &format!("btf_trace_{name}"))
        .next()
        .is_some()
}

/// The raw bytes, for aya's own parser (one read of the file).
impl Btf {
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_has_the_tracepoints_and_the_folio_layout() {
        let Ok(btf) = load_vmlinux() else {
            panic!("this host has {VMLINUX_BTF}: the scanner must read it");
        };
        assert!(btf.offsets.len() > 10_000, "{} types", btf.offsets.len());
        assert!(has_tracepoint(&btf, "page_fault_user"));
        assert!(!has_tracepoint(&btf, "no_such_tracepoint_here"));
        let f = folio_layout(&btf).expect("6.x kernels have struct folio");
        assert!(f.nr_pages_offset > 0 && f.nr_pages_offset < 256, "{f:?}");
        assert!(f.pg_head_bit < 64, "{f:?}");
        // flags, lru (two pointers), mapping, then index.
        assert_eq!(f.index_offset, 32, "{f:?}");
    }

    #[test]
    fn this_kernel_has_the_file_layout() {
        let btf = load_vmlinux().expect("this host has kernel BTF");
        let l = file_layout(&btf).expect("every field of the shmem path exists");
        // fdtable starts with max_fds; the others are somewhere inside their structs, and
        // task_struct is the only large one.
        assert_eq!(l[2], 0, "{l:?}");
        assert!(l[0] > 256 && l[0] < 16384, "{l:?}");
        assert!(l[1..].iter().all(|&o| o < 2048), "{l:?}");
        assert!(l[4] != l[5] && l[6] != l[7], "{l:?}");
        assert!(btf.find(STRUCT, "no_such_struct").next().is_none());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Btf::parse(vec![]).is_err());
        assert!(Btf::parse(vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0]).is_err());
        let mut bad = vec![
            0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 200, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        bad.extend([0u8; 16]);
        assert!(Btf::parse(bad).is_err());
    }
}
