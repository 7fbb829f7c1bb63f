//! The frame parser, written once. The kernel programs run it over packet
//! memory, the agent (`netpulse analyze`, the pcap backend) over a byte
//! slice, and the `packet` fuzz target over anything: the code is generic
//! over how bytes are read ([`Frame`], [`Header`]).
//!
//! Every read goes through [`header`]: a header is bounds-checked once,
//! as a whole, at an offset of at most [`MAX_HDR_OFF`], and read within
//! that header only. In the kernel that is the shape the verifier
//! accepts (one packet-range check per header, then constant offsets); in
//! userspace the slice's own indexing checks it again, so a read past a
//! checked header panics under the fuzzer instead of passing unseen.

use crate::{
    ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, FAMILY_V4, FAMILY_V6, IPV6_AH,
    IPV6_DSTOPTS, IPV6_FRAGMENT, IPV6_HIP, IPV6_HOPOPTS, IPV6_MOBILITY, IPV6_ROUTING, IPV6_SHIM6,
    MAX_HDR_OFF, MAX_IPV6_EXT, MAX_VLAN_TAGS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    SLOT_FRAGMENT, SLOT_MALFORMED, SLOT_NOT_IP, VLAN_TAG_LEN,
};

/// The bytes of one header, checked once by [`Frame::header`]; reads at
/// offsets inside it need no further check.
pub trait Header: Copy {
    fn u8(self, at: usize) -> u8;
    /// A big-endian 16-bit field.
    fn be16(self, at: usize) -> u16;
    /// Four bytes as they are on the wire, as a native-endian word (how
    /// addresses are held in [`Flow`] and the map keys).
    fn word(self, at: usize) -> u32;
}

/// The bytes of a frame.
pub trait Frame: Copy {
    type Header: Header;
    /// The `len` bytes at `off`, if the frame has them.
    fn header(self, off: usize, len: usize) -> Option<Self::Header>;
}

/// A header of the frame, no further in than [`MAX_HDR_OFF`].
#[inline(always)]
pub fn header<F: Frame>(p: F, off: usize, len: usize) -> Option<F::Header> {
    if off > MAX_HDR_OFF {
        return None;
    }
    p.header(off, len)
}

impl<'a> Frame for &'a [u8] {
    type Header = &'a [u8];
    #[inline(always)]
    fn header(self, off: usize, len: usize) -> Option<&'a [u8]> {
        self.get(off..off.checked_add(len)?)
    }
}

// Indexing, not `get`: a read outside the checked header is a bug in the
// parser (the kernel's would read unchecked memory), and must panic.
impl Header for &[u8] {
    #[inline(always)]
    fn u8(self, at: usize) -> u8 {
        self[at]
    }
    #[inline(always)]
    fn be16(self, at: usize) -> u16 {
        u16::from_be_bytes([self[at], self[at + 1]])
    }
    #[inline(always)]
    fn word(self, at: usize) -> u32 {
        u32::from_ne_bytes([self[at], self[at + 1], self[at + 2], self[at + 3]])
    }
}

/// What a frame says about itself, as far as it could be parsed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// 0 until an IP header was read (not IP, or a broken IP header).
    pub family: u8,
    pub proto: u8,
    /// The addresses' wire bytes as words; IPv4 uses the first word.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    /// Bytes of headers up to the end of L4: what each GSO segment repeats.
    pub hdr_len: usize,
}

/// Parses an Ethernet frame into `flow`. `Err(slot)` names the reserved
/// slot of a frame that cannot be classified; a fragment or a frame with a
/// broken L4 header keeps what was read (its addresses: `family != 0`).
#[inline(always)]
pub fn parse_ethernet<F: Frame>(p: F, flow: &mut Flow) -> Result<(), u32> {
    *flow = Flow::default();
    let ethertype = header(p, 0, ETH_HLEN).ok_or(SLOT_MALFORMED)?.be16(12);
    parse_from(p, ethertype, ETH_HLEN, flow)
}

/// Parses what follows an ethertype (VLAN tags, IP, L4), the header
/// starting at `off`: after an Ethernet header, or a link header that names
/// the ethertype too (Linux cooked capture). Resets `flow` first.
#[inline(always)]
pub fn parse_from<F: Frame>(
    p: F,
    mut ethertype: u16,
    mut off: usize,
    flow: &mut Flow,
) -> Result<(), u32> {
    *flow = Flow::default();
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype = header(p, off, VLAN_TAG_LEN).ok_or(SLOT_MALFORMED)?.be16(2);
            off += VLAN_TAG_LEN;
        }
    }
    let l4 = match ethertype {
        ETH_P_IP => {
            let h = header(p, off, 20).ok_or(SLOT_MALFORMED)?;
            let vihl = h.u8(0);
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return Err(SLOT_MALFORMED);
            }
            flow.family = FAMILY_V4;
            flow.proto = h.u8(9);
            flow.src[0] = h.word(12);
            flow.dst[0] = h.word(16);
            // Fragment offset: only the first fragment has the L4 header.
            if h.be16(6) & 0x1fff != 0 {
                return Err(SLOT_FRAGMENT);
            }
            off + ihl
        }
        ETH_P_IPV6 => {
            let h = header(p, off, 40).ok_or(SLOT_MALFORMED)?;
            if h.u8(0) >> 4 != 6 {
                return Err(SLOT_MALFORMED);
            }
            flow.family = FAMILY_V6;
            for i in 0..4 {
                flow.src[i] = h.word(8 + i * 4);
                flow.dst[i] = h.word(24 + i * 4);
            }
            let (next, o) = ipv6_extensions(p, h.u8(6), off + 40)?;
            flow.proto = next;
            o
        }
        _ => return Err(SLOT_NOT_IP),
    };
    match flow.proto {
        PROTO_TCP => {
            let t = header(p, l4, 20).ok_or(SLOT_MALFORMED)?;
            let doff = ((t.u8(12) >> 4) as usize) * 4;
            if doff < 20 {
                return Err(SLOT_MALFORMED);
            }
            flow.sport = t.be16(0);
            flow.dport = t.be16(2);
            flow.tcp_flags = t.u8(13);
            flow.hdr_len = l4 + doff;
        }
        PROTO_UDP => {
            let u = header(p, l4, 8).ok_or(SLOT_MALFORMED)?;
            flow.sport = u.be16(0);
            flow.dport = u.be16(2);
            flow.hdr_len = l4 + 8;
        }
        PROTO_ICMP | PROTO_ICMPV6 => {
            header(p, l4, 4).ok_or(SLOT_MALFORMED)?;
            flow.hdr_len = l4 + 4;
        }
        _ => flow.hdr_len = l4,
    }
    Ok(())
}

/// Walks the IPv6 extension headers from `next` at `off`: the upper-layer
/// protocol and where its header starts. A non-first fragment is
/// [`SLOT_FRAGMENT`]; a cut header, or still an extension header after
/// [`MAX_IPV6_EXT`] of them, [`SLOT_MALFORMED`].
#[inline(always)]
fn ipv6_extensions<F: Frame>(p: F, mut next: u8, mut off: usize) -> Result<(u8, usize), u32> {
    // One pass more than the bound: the last may only find the upper-layer
    // header.
    for _ in 0..=MAX_IPV6_EXT {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_MOBILITY | IPV6_HIP | IPV6_SHIM6 => {
                let e = header(p, off, 2).ok_or(SLOT_MALFORMED)?;
                next = e.u8(0);
                off += (e.u8(1) as usize + 1) * 8;
            }
            // Fixed 8 bytes; only the first fragment has ports.
            IPV6_FRAGMENT => {
                let e = header(p, off, 4).ok_or(SLOT_MALFORMED)?;
                if e.be16(2) & 0xfff8 != 0 {
                    return Err(SLOT_FRAGMENT);
                }
                next = e.u8(0);
                off += 8;
            }
            IPV6_AH => {
                let e = header(p, off, 2).ok_or(SLOT_MALFORMED)?;
                next = e.u8(0);
                off += (e.u8(1) as usize + 2) * 4;
            }
            _ => return Ok((next, off)),
        }
    }
    Err(SLOT_MALFORMED)
}

#[cfg(all(test, not(target_arch = "bpf")))]
mod tests {
    use super::*;
    use crate::IPV6_EXT_HEADERS;

    #[test]
    fn the_walker_knows_every_listed_extension_header() {
        // Each listed header, then UDP: walked over, not taken for L4.
        for ext in IPV6_EXT_HEADERS {
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0, 0, 16, ext, 64]);
            f.extend_from_slice(&[1; 32]);
            // AH counts 4-byte units minus 2, the others 8-byte units
            // minus 1: length 0 is 8 bytes for all but AH, 1 is 12 for AH.
            let len = if ext == IPV6_AH { 1 } else { 0 };
            f.extend_from_slice(&[PROTO_UDP, len, 0, 0, 0, 0, 0, 0]);
            if ext == IPV6_AH {
                f.extend_from_slice(&[0; 4]);
            }
            f.extend_from_slice(&[0, 53, 0, 54, 0, 8, 0, 0]);
            let mut flow = Flow::default();
            assert_eq!(parse_ethernet(&f[..], &mut flow), Ok(()), "{ext}");
            assert_eq!((flow.proto, flow.sport, flow.dport), (PROTO_UDP, 53, 54));
            assert_eq!(flow.hdr_len, f.len());
        }
    }

    #[test]
    fn seven_extension_headers_are_too_many() {
        let chain = |n: usize| {
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, IPV6_DSTOPTS, 64]);
            f.extend_from_slice(&[1; 32]);
            for i in 0..n {
                let next = if i + 1 == n { PROTO_UDP } else { IPV6_DSTOPTS };
                f.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
            }
            f.extend_from_slice(&[0, 53, 0, 54, 0, 8, 0, 0]);
            f
        };
        let mut flow = Flow::default();
        assert_eq!(parse_ethernet(&chain(6)[..], &mut flow), Ok(()));
        assert_eq!(
            parse_ethernet(&chain(7)[..], &mut flow),
            Err(SLOT_MALFORMED)
        );
        // The addresses were read before the chain.
        assert_eq!(flow.family, FAMILY_V6);
    }

    #[test]
    fn headers_past_the_offset_bound_are_malformed() {
        // IPv4 with a UDP header right at MAX_HDR_OFF + 1 (behind a hop-by-
        // hop chain is not possible in IPv4, so use IPv6 options).
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, IPV6_HOPOPTS, 64]);
        f.extend_from_slice(&[1; 32]);
        // 8 * (60 + 1) = 488 bytes of options: UDP at 14 + 40 + 488 = 542.
        f.extend_from_slice(&[PROTO_UDP, 60]);
        f.resize(f.len() + 486, 0);
        f.extend_from_slice(&[0, 53, 0, 54, 0, 8, 0, 0]);
        let mut flow = Flow::default();
        assert_eq!(parse_ethernet(&f[..], &mut flow), Err(SLOT_MALFORMED));
    }
}
