//! Kernel layout facts read from the running kernel's BTF, handed to the eBPF programs as
//! globals. Rust eBPF has no CO-RE relocations, so offsets that differ between kernels are
//! looked up here at load time instead of being compiled in.
use std::path::Path;

use btf_rs::{Btf, Type};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Where a large folio keeps its page count, and which flag marks it large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolioLayout {
    /// Byte offset of `_nr_pages` (6.x recent) or `_folio_nr_pages` (6.0-6.x) in `struct folio`.
    pub nr_pages_offset: u32,
    /// Value of `PG_head` in `enum pageflags`.
    pub pg_head_bit: u32,
}

pub fn load_vmlinux() -> anyhow::Result<Btf> {
    anyhow::ensure!(
        Path::new(VMLINUX_BTF).exists(),
        "{VMLINUX_BTF} is missing: this kernel has no BTF"
    );
    Btf::from_file(VMLINUX_BTF).map_err(|e| anyhow::anyhow!("cannot parse {VMLINUX_BTF}: {e}"))
}

/// `None` when this kernel has no such fields (then each dirtied folio counts as one page).
pub fn folio_layout(btf: &Btf) -> Option<FolioLayout> {
    let folio = btf
        .resolve_types_by_name("folio")
        .ok()?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })?;
    let bits = ["_nr_pages", "_folio_nr_pages"]
        .iter()
        .find_map(|name| member_bit_offset(btf, &folio, name, 0, 0))?;
    let pg_head_bit = enum_value(btf, "pageflags", "PG_head")?;
    (bits % 8 == 0).then_some(FolioLayout {
        nr_pages_offset: bits / 8,
        pg_head_bit,
    })
}

/// Depth-first search through anonymous unions/structs for a member called `name`.
fn member_bit_offset(
    btf: &Btf,
    s: &btf_rs::Struct,
    name: &str,
    base: u32,
    depth: u32,
) -> Option<u32> {
    if depth > 8 {
        return None;
    }
    for m in &s.members {
        let off = base + m.bit_offset();
        let mname = btf.resolve_name(m).unwrap_or_default();
        if mname == name {
            return Some(off);
        }
        if mname.is_empty()
            && let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m)
            && let Some(found) = member_bit_offset(btf, &inner, name, off, depth + 1)
        {
            return Some(found);
        }
    }
    None
}

fn enum_value(btf: &Btf, enum_name: &str, member: &str) -> Option<u32> {
    btf.resolve_types_by_name(enum_name)
        .ok()?
        .into_iter()
        .find_map(|t| match t {
            Type::Enum(e) => e
                .members
                .iter()
                .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == member))
                .map(|m| m.val()),
            _ => None,
        })
}

/// Does this kernel have this BTF tracepoint (`btf_trace_<name>` typedef)?
pub fn has_tracepoint(btf: &Btf, name: &str) -> bool {
    btf.resolve_ids_by_name(&format!("btf_trace_{name}"))
        .is_ok_and(|v| !v.is_empty())
}
