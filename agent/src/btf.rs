//! Reading the running kernel's BTF (`/sys/kernel/btf/vmlinux`) for what
//! differs between kernels and must not be hard-coded: the names of an
//! enum's values (`enum skb_drop_reason`: which number means
//! `NETFILTER_DROP` moves from one kernel to the next).
//!
//! and the offsets of the kernel struct fields the tracing programs read
//! (`struct sock`, `struct sk_buff`, ...: they move between kernels and
//! builds).
//!
//! Only what that needs: the header, the type section walked type by type
//! (each kind's trailing data skipped by its size), and the string section.
//! The format is the kernel's `include/uapi/linux/btf.h`.

use std::collections::BTreeMap;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF (bad magic or a header past the end)")]
    NotBtf,
    #[error("BTF type {index} runs past the type section")]
    Truncated { index: usize },
    #[error("BTF type {index} has unknown kind {kind}")]
    UnknownKind { index: usize, kind: u32 },
    #[error("no enum `{0}` in the kernel's BTF")]
    NoSuchEnum(String),
    #[error("no member `{1}` in `struct {0}` of the kernel's BTF")]
    NoSuchMember(String, String),
}

/// One type of the type section: its kind, name, `size_or_type` word and
/// where its trailing data starts.
#[derive(Clone, Copy, Debug)]
struct Type {
    kind: u32,
    name: u32,
    vlen: usize,
    kind_flag: bool,
    size_or_type: u32,
    body: usize,
}

/// The type section, indexed (type ids start at 1).
pub struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    index: Vec<Type>,
}

const KIND_PTR: u32 = 2;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_TYPE_TAG: u32 = 18;

impl<'a> Btf<'a> {
    /// Walks the type section once.
    pub fn parse(btf: &'a [u8]) -> Result<Self, BtfError> {
        let magic = btf.get(0..2).map(|m| u16::from_le_bytes([m[0], m[1]]));
        if magic != Some(MAGIC) {
            return Err(BtfError::NotBtf);
        }
        let field = |i: usize| u32_at(btf, 8 + 4 * i).ok_or(BtfError::NotBtf);
        let hdr_len = u32_at(btf, 4).ok_or(BtfError::NotBtf)? as usize;
        let (type_off, type_len, str_off, str_len) = (
            field(0)? as usize,
            field(1)? as usize,
            field(2)? as usize,
            field(3)? as usize,
        );
        let types = btf
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::NotBtf)?;
        let strings = btf
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::NotBtf)?;
        let mut index = vec![Type {
            kind: 0,
            name: 0,
            vlen: 0,
            kind_flag: false,
            size_or_type: 0,
            body: 0,
        }];
        let mut at = 0usize;
        while at < types.len() {
            let i = index.len();
            let head = |o: usize| u32_at(types, at + o).ok_or(BtfError::Truncated { index: i });
            let (name, info, size_or_type) = (head(0)?, head(4)?, head(8)?);
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let body = at + 12;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_ENUM64 => 12 * vlen,
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(BtfError::UnknownKind { index: i, kind }),
            };
            if body + extra > types.len() {
                return Err(BtfError::Truncated { index: i });
            }
            index.push(Type {
                kind,
                name,
                vlen,
                kind_flag: info & (1 << 31) != 0,
                size_or_type,
                body,
            });
            at = body + extra;
        }
        Ok(Self {
            types,
            strings,
            index,
        })
    }

    fn name(&self, t: &Type) -> &str {
        str_at(self.strings, t.name)
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.index.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `member` in the struct or union `t`, looking into
    /// anonymous struct and union members (the kernel's unions and
    /// `struct_group`s).
    fn member_in(&self, t: &Type, member: &str, depth: u32) -> Option<u32> {
        if depth > 8 || !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for i in 0..t.vlen {
            let m = t.body + i * 12;
            let (name, ty, off) = (
                u32_at(self.types, m)?,
                u32_at(self.types, m + 4)?,
                u32_at(self.types, m + 8)?,
            );
            let bits = if t.kind_flag { off & 0x00ff_ffff } else { off };
            let name = str_at(self.strings, name);
            if name == member {
                return Some(bits / 8);
            }
            if name.is_empty()
                && let Some(inner) = self.resolve(ty)
                && let Some(o) = self.member_in(inner, member, depth + 1)
            {
                return Some(bits / 8 + o);
            }
        }
        None
    }

    /// Byte offset of `member` in `struct name` (or union).
    pub fn offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        self.index
            .iter()
            .filter(|t| matches!(t.kind, KIND_STRUCT | KIND_UNION) && self.name(t) == name)
            .find_map(|t| self.member_in(t, member, 0))
            .ok_or_else(|| BtfError::NoSuchMember(name.to_string(), member.to_string()))
    }

    /// The values of the enum `name`: value → enumerator name.
    pub fn enum_values(&self, name: &str) -> Result<BTreeMap<u64, String>, BtfError> {
        let (index, t) = self
            .index
            .iter()
            .enumerate()
            .find(|(_, t)| matches!(t.kind, KIND_ENUM | KIND_ENUM64) && self.name(t) == name)
            .ok_or_else(|| BtfError::NoSuchEnum(name.to_string()))?;
        let step = if t.kind == KIND_ENUM { 8 } else { 12 };
        let mut out = BTreeMap::new();
        for i in 0..t.vlen {
            let e = t.body + i * step;
            let word = |o: usize| u32_at(self.types, e + o).ok_or(BtfError::Truncated { index });
            let value = if t.kind == KIND_ENUM {
                u64::from(word(4)?)
            } else {
                u64::from(word(4)?) | (u64::from(word(8)?) << 32)
            };
            out.insert(value, str_at(self.strings, word(0)?).to_string());
        }
        Ok(out)
    }

    /// Whether the kernel has a function `name` (what fexit attaches to).
    pub fn has_func(&self, name: &str) -> bool {
        self.index
            .iter()
            .any(|t| t.kind == KIND_FUNC && self.name(t) == name)
    }

    /// The parameter type names of a tracepoint's BTF prototype
    /// (`btf_trace_<name>`, whose first parameter is the context pointer,
    /// left out), e.g. `["sk_buff", "void", "skb_drop_reason", "sock"]` for
    /// `kfree_skb`; pointers are named after what they point to. `None`
    /// when the kernel has no such tracepoint.
    pub fn tracepoint_params(&self, name: &str) -> Option<Vec<String>> {
        let want = format!("btf_trace_{name}");
        let td = self
            .index
            .iter()
            .find(|t| t.kind == KIND_TYPEDEF && self.name(t) == want)?;
        let ptr = self.resolve(td.size_or_type)?;
        let proto = (ptr.kind == KIND_PTR)
            .then(|| self.resolve(ptr.size_or_type))
            .flatten()?;
        if proto.kind != KIND_FUNC_PROTO {
            return None;
        }
        let mut out = Vec::new();
        for i in 1..proto.vlen {
            let ty = u32_at(self.types, proto.body + i * 8 + 4)?;
            let mut t = self.resolve(ty);
            while let Some(p) = t.filter(|p| p.kind == KIND_PTR) {
                t = self.resolve(p.size_or_type);
            }
            out.push(t.map(|t| self.name(t)).unwrap_or("void").to_string());
        }
        Some(out)
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn str_at(strings: &[u8], off: u32) -> &str {
    let s = strings.get(off as usize..).unwrap_or_default();
    let end = s.iter().position(|c| *c == 0).unwrap_or(s.len());
    std::str::from_utf8(&s[..end]).unwrap_or("")
}

/// The values of the enum `name` (plain or 64-bit) in `btf`: value → the
/// enumerator's name as the kernel spells it. Little-endian BTF, as on
/// every architecture netpulse runs on.
pub fn enum_values(btf: &[u8], name: &str) -> Result<BTreeMap<u64, String>, BtfError> {
    Btf::parse(btf)?.enum_values(name)
}

/// The kernel's drop reasons as netpulse exports them: value → the
/// `skb_drop_reason` name in lower case without `SKB_DROP_REASON_`
/// (`netfilter_drop`, `no_socket`, `tcp_csum`, …), read from the running
/// kernel's BTF. What is not a drop is left out: `SKB_NOT_DROPPED_YET`,
/// `SKB_CONSUMED`, and the markers `SKB_DROP_REASON_MAX` (a count) and
/// `SKB_DROP_REASON_SUBSYS_MASK`.
pub fn drop_reasons(btf: &[u8]) -> Result<BTreeMap<u64, String>, BtfError> {
    Ok(drop_reason_names(enum_values(btf, "skb_drop_reason")?))
}

/// [`drop_reasons`] from the enum's values already read.
pub fn drop_reason_names(values: BTreeMap<u64, String>) -> BTreeMap<u64, String> {
    values
        .into_iter()
        .filter_map(|(v, n)| {
            let short = n.strip_prefix("SKB_DROP_REASON_")?;
            (!matches!(short, "MAX" | "SUBSYS_MASK")).then(|| (v, short.to_ascii_lowercase()))
        })
        .collect()
}

/// Where the running kernel publishes its BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with one INT, one STRUCT of two members and one ENUM.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0colour\0RED\0GREEN\0";
        let off = |s: &str| {
            strings
                .windows(s.len() + 1)
                .position(|w| &w[..s.len()] == s.as_bytes() && w[s.len()] == 0)
                .unwrap() as u32
        };
        let mut t = Vec::new();
        let mut put = |v: u32| t.extend_from_slice(&v.to_le_bytes());
        // INT "int", size 4, encoding word.
        put(off("int"));
        put(KIND_INT << 24);
        put(4);
        put(32);
        // STRUCT "s" with members a, b (type 1, offsets 0 and 32).
        put(off("s"));
        put((KIND_STRUCT << 24) | 2);
        put(8);
        for (m, bit) in [("a", 0), ("b", 32)] {
            put(off(m));
            put(1);
            put(bit);
        }
        // ENUM "colour" { RED = 1, GREEN = 7 }.
        put(off("colour"));
        put((KIND_ENUM << 24) | 2);
        put(4);
        for (n, v) in [("RED", 1), ("GREEN", 7)] {
            put(off(n));
            put(v);
        }
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(strings);
        b
    }

    #[test]
    fn an_enum_is_found_past_other_kinds() {
        let b = sample();
        let e = enum_values(&b, "colour").unwrap();
        assert_eq!(
            e.into_iter().collect::<Vec<_>>(),
            [(1, "RED".to_string()), (7, "GREEN".to_string())]
        );
        assert_eq!(
            enum_values(&b, "shape"),
            Err(BtfError::NoSuchEnum("shape".into()))
        );
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let b = sample();
        assert_eq!(enum_values(&b[..10], "colour"), Err(BtfError::NotBtf));
        assert_eq!(enum_values(b"junk", "colour"), Err(BtfError::NotBtf));
        // Every truncation of the type section fails cleanly.
        for cut in 24..b.len() {
            let mut c = b[..cut].to_vec();
            c.resize(b.len(), 0);
            let _ = enum_values(&c, "colour");
            if let Ok(t) = Btf::parse(&c) {
                let _ = t.offset("s", "b");
                let _ = t.tracepoint_params("x");
            }
        }
    }

    #[test]
    fn member_offsets_are_found_and_a_missing_member_is_named() {
        let b = sample();
        let btf = Btf::parse(&b).unwrap();
        assert_eq!(btf.offset("s", "a"), Ok(0));
        assert_eq!(btf.offset("s", "b"), Ok(4));
        assert_eq!(
            btf.offset("s", "c"),
            Err(BtfError::NoSuchMember("s".into(), "c".into()))
        );
        assert_eq!(btf.tracepoint_params("kfree_skb"), None);
        assert!(!btf.has_func("tcp_v4_rcv"));
    }

    /// The kernel's own: `struct sock_common` starts with the address pair
    /// (daddr, rcv_saddr) on every kernel; `skc_net` sits in a union and
    /// `sk_buff`'s `protocol` inside a `struct_group`, both found.
    #[test]
    fn the_running_kernels_struct_members_are_found_through_unions() {
        let bytes = std::fs::read(VMLINUX).expect("the kernel's BTF");
        let btf = Btf::parse(&bytes).unwrap();
        assert_eq!(btf.offset("sock_common", "skc_daddr"), Ok(0));
        assert_eq!(btf.offset("sock_common", "skc_rcv_saddr"), Ok(4));
        assert!(btf.offset("sock_common", "skc_net").is_ok());
        assert!(btf.offset("sk_buff", "protocol").is_ok());
        assert_eq!(
            btf.tracepoint_params("inet_sock_set_state").as_deref(),
            Some(&["sock".to_string(), "int".into(), "int".into()][..])
        );
    }

    /// The running kernel's own BTF has the drop reasons, with the
    /// reasons every kernel since 5.17 knows.
    #[test]
    fn the_running_kernel_names_its_drop_reasons() {
        let Ok(b) = std::fs::read(VMLINUX) else {
            panic!("{VMLINUX}: the kernel has no BTF");
        };
        let r = drop_reasons(&b).unwrap();
        let names: Vec<&str> = r.values().map(String::as_str).collect();
        for want in ["not_specified", "no_socket", "tcp_csum", "netfilter_drop"] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        for not_a_drop in ["max", "subsys_mask", "skb_consumed", "consumed"] {
            assert!(!names.contains(&not_a_drop), "{not_a_drop}");
        }
    }
}
