//! The kernel half of netpulse: XDP on ingress, TC (clsact/tcx) on egress.
//!
//! Both programs parse the frame the same way, find the service it belongs
//! to in `NP_SERVICES`, and add to that service's per-CPU slot. They observe
//! only: every path returns XDP_PASS / TC_ACT_OK. The agent (agent/src/probe)
//! loads them, keeps `NP_SERVICES` current and sums the per-CPU slots.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

// A host build of this crate (clippy --workspace, doc) gets an empty binary;
// the real one is built for bpfel-unknown-none by agent/build.rs.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod kernel {
    use agent_ebpf::*;
    use aya_ebpf::{
        bindings::{TC_ACT_OK, xdp_action},
        macros::{classifier, map, xdp},
        maps::{Array, HashMap, PerCpuArray},
        programs::{TcContext, XdpContext},
    };
    use core::mem::size_of;

    #[map(name = "NP_SERVICES")]
    static NP_SERVICES: HashMap<EndpointKey, ServiceRef> = HashMap::pinned(MAX_ENDPOINTS, 0);
    // One counter array per hook: the two hooks never write the same memory,
    // so no atomics are needed even where XDP and TC run on one CPU.
    #[map(name = "NP_COUNTERS_XDP")]
    static NP_COUNTERS_XDP: PerCpuArray<SlotCounters> = PerCpuArray::pinned(MAX_SLOTS, 0);
    #[map(name = "NP_COUNTERS_TC")]
    static NP_COUNTERS_TC: PerCpuArray<SlotCounters> = PerCpuArray::pinned(MAX_SLOTS, 0);
    #[map(name = "NP_SETTINGS")]
    static NP_SETTINGS: Array<Settings> = Array::pinned(1, 0);
    // Read and written by the agent only; lives here so it is pinned with the
    // counters it names (see SlotName).
    #[map(name = "NP_SLOT_NAMES")]
    static NP_SLOT_NAMES: Array<SlotName> = Array::pinned(MAX_SLOTS, 0);

    /// Packet offsets beyond this are never needed for headers; bounding the
    /// offset keeps the verifier's range tracking simple.
    const MAX_HDR_OFF: usize = 512;
    /// IPv6 extension headers followed before the chain counts as malformed.
    const MAX_IPV6_EXT: usize = 6;

    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86DD;
    const ETH_P_8021Q: u16 = 0x8100;
    const ETH_P_8021AD: u16 = 0x88A8;

    const TCP_FIN: u8 = 0x01;
    const TCP_SYN: u8 = 0x02;
    const TCP_RST: u8 = 0x04;

    /// Bounds-checked reads at an offset from the start of the frame.
    trait Packet {
        fn read<T: Copy>(&self, off: usize) -> Option<T>;
    }

    #[inline(always)]
    fn direct<T: Copy>(start: usize, end: usize, off: usize) -> Option<T> {
        if off > MAX_HDR_OFF {
            return None;
        }
        let p = start + off;
        if p + size_of::<T>() > end {
            return None;
        }
        // SAFETY: [p, p + size_of::<T>()) lies within the packet, checked above.
        Some(unsafe { (p as *const T).read_unaligned() })
    }

    impl Packet for XdpContext {
        #[inline(always)]
        fn read<T: Copy>(&self, off: usize) -> Option<T> {
            direct(self.data(), self.data_end(), off)
        }
    }

    impl Packet for TcContext {
        #[inline(always)]
        fn read<T: Copy>(&self, off: usize) -> Option<T> {
            // Headers are almost always in the linear part; a paged skb falls
            // back to bpf_skb_load_bytes rather than being misread.
            match direct(self.data(), self.data_end(), off) {
                Some(v) => Some(v),
                None if off <= MAX_HDR_OFF => self.load::<T>(off).ok(),
                None => None,
            }
        }
    }

    /// What a frame says about itself, once parsed.
    struct Flow {
        family: u8,
        proto: u8,
        src: [u8; 16],
        dst: [u8; 16],
        sport: u16,
        dport: u16,
        tcp_flags: u8,
        /// Bytes of headers up to the end of L4: what each GSO segment repeats.
        hdr_len: usize,
    }

    #[inline(always)]
    fn be16(v: [u8; 2]) -> u16 {
        u16::from_be_bytes(v)
    }

    /// Parses L2..L4. `Err(slot)` names the reserved slot for frames that
    /// cannot be classified.
    #[inline(always)]
    fn parse<P: Packet>(p: &P) -> Result<Flow, u32> {
        let mut off = 12usize;
        let mut ethertype = be16(p.read::<[u8; 2]>(off).ok_or(SLOT_MALFORMED)?);
        off += 2;
        // Up to two VLAN tags (802.1Q, or 802.1ad outer + 802.1Q inner).
        for _ in 0..2 {
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                ethertype = be16(p.read::<[u8; 2]>(off + 2).ok_or(SLOT_MALFORMED)?);
                off += 4;
            }
        }
        let mut flow = Flow {
            family: 0,
            proto: 0,
            src: [0; 16],
            dst: [0; 16],
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            hdr_len: 0,
        };
        let l4 = match ethertype {
            ETH_P_IP => {
                let h = p.read::<[u8; 20]>(off).ok_or(SLOT_MALFORMED)?;
                let ihl = ((h[0] & 0x0f) as usize) * 4;
                if h[0] >> 4 != 4 || ihl < 20 {
                    return Err(SLOT_MALFORMED);
                }
                flow.family = FAMILY_V4;
                flow.proto = h[9];
                flow.src[..4].copy_from_slice(&h[12..16]);
                flow.dst[..4].copy_from_slice(&h[16..20]);
                if be16([h[6], h[7]]) & 0x1fff != 0 {
                    return Err(SLOT_FRAGMENT);
                }
                off + ihl
            }
            ETH_P_IPV6 => {
                let h = p.read::<[u8; 40]>(off).ok_or(SLOT_MALFORMED)?;
                if h[0] >> 4 != 6 {
                    return Err(SLOT_MALFORMED);
                }
                flow.family = FAMILY_V6;
                flow.src.copy_from_slice(&h[8..24]);
                flow.dst.copy_from_slice(&h[24..40]);
                let mut next = h[6];
                let mut o = off + 40;
                let mut done = false;
                for _ in 0..MAX_IPV6_EXT {
                    match next {
                        // hop-by-hop, routing, destination options, mobility, HIP, shim6
                        0 | 43 | 60 | 135 | 139 | 140 => {
                            let e = p.read::<[u8; 2]>(o).ok_or(SLOT_MALFORMED)?;
                            next = e[0];
                            o += (e[1] as usize + 1) * 8;
                        }
                        // fragment: fixed 8 bytes; only the first fragment has ports
                        44 => {
                            let e = p.read::<[u8; 4]>(o).ok_or(SLOT_MALFORMED)?;
                            if be16([e[2], e[3]]) & 0xfff8 != 0 {
                                return Err(SLOT_FRAGMENT);
                            }
                            next = e[0];
                            o += 8;
                        }
                        // authentication header: length in 4-byte units, minus 2
                        51 => {
                            let e = p.read::<[u8; 2]>(o).ok_or(SLOT_MALFORMED)?;
                            next = e[0];
                            o += (e[1] as usize + 2) * 4;
                        }
                        _ => {
                            done = true;
                            break;
                        }
                    }
                }
                if !done {
                    return Err(SLOT_MALFORMED);
                }
                flow.proto = next;
                o
            }
            _ => return Err(SLOT_NOT_IP),
        };
        match flow.proto {
            PROTO_TCP => {
                let t = p.read::<[u8; 20]>(l4).ok_or(SLOT_MALFORMED)?;
                let doff = ((t[12] >> 4) as usize) * 4;
                if doff < 20 {
                    return Err(SLOT_MALFORMED);
                }
                flow.sport = be16([t[0], t[1]]);
                flow.dport = be16([t[2], t[3]]);
                flow.tcp_flags = t[13];
                flow.hdr_len = l4 + doff;
            }
            PROTO_UDP => {
                let u = p.read::<[u8; 8]>(l4).ok_or(SLOT_MALFORMED)?;
                flow.sport = be16([u[0], u[1]]);
                flow.dport = be16([u[2], u[3]]);
                flow.hdr_len = l4 + 8;
            }
            PROTO_ICMP | PROTO_ICMPV6 => {
                p.read::<[u8; 4]>(l4).ok_or(SLOT_MALFORMED)?;
                flow.hdr_len = l4 + 4;
            }
            _ => flow.hdr_len = l4,
        }
        Ok(flow)
    }

    /// Exact address first, then the family's wildcard.
    #[inline(always)]
    fn lookup(key: &mut EndpointKey, addr: &[u8; 16]) -> Option<u32> {
        key.addr = *addr;
        // SAFETY: values are plain integers; a concurrent update can at worst
        // give a stale slot number, which is still a valid slot.
        if let Some(r) = unsafe { NP_SERVICES.get(&*key) } {
            return Some(r.slot);
        }
        key.addr = [0; 16];
        unsafe { NP_SERVICES.get(&*key) }.map(|r| r.slot)
    }

    /// Returns (slot, direction in the service's view).
    #[inline(always)]
    fn classify(flow: &Flow, hook_dir: usize) -> (u32, usize) {
        let ingress = hook_dir == DIR_INGRESS;
        let (local, lport, remote, rport) = if ingress {
            (&flow.dst, flow.dport, &flow.src, flow.sport)
        } else {
            (&flow.src, flow.sport, &flow.dst, flow.dport)
        };
        let mut key = EndpointKey {
            family: flow.family,
            proto: flow.proto,
            port: lport,
            role: ROLE_LOCAL,
            _pad: [0; 3],
            addr: [0; 16],
        };
        if let Some(slot) = lookup(&mut key, local) {
            return (slot, hook_dir);
        }
        let has_remote = NP_SETTINGS
            .get(0)
            .is_some_and(|s| s.flags & SETTINGS_HAS_REMOTE != 0);
        if has_remote {
            key.port = rport;
            key.role = ROLE_REMOTE;
            if let Some(slot) = lookup(&mut key, remote) {
                // From the remote service's view the direction flips.
                return (slot, hook_dir ^ 1);
            }
        }
        (SLOT_NO_MATCH, hook_dir)
    }

    #[inline(always)]
    fn count(
        map: &PerCpuArray<SlotCounters>,
        slot: u32,
        dir: usize,
        packets: u64,
        bytes: u64,
        flags: u8,
    ) {
        let Some(c) = map.get_ptr_mut(slot) else {
            return;
        };
        // SAFETY: per-CPU slot, written only by this hook on this CPU.
        let d = unsafe { &mut (*c).dir[dir & 1] };
        d.packets += packets;
        d.bytes += bytes;
        d.syn += (flags & TCP_SYN != 0) as u64;
        d.fin += (flags & TCP_FIN != 0) as u64;
        d.rst += (flags & TCP_RST != 0) as u64;
    }

    #[xdp]
    pub fn netpulse_xdp(ctx: XdpContext) -> u32 {
        let bytes = (ctx.data_end() - ctx.data()) as u64;
        match parse(&ctx) {
            Ok(flow) => {
                let (slot, dir) = classify(&flow, DIR_INGRESS);
                count(&NP_COUNTERS_XDP, slot, dir, 1, bytes, flow.tcp_flags);
            }
            Err(slot) => count(&NP_COUNTERS_XDP, slot, DIR_INGRESS, 1, bytes, 0),
        }
        xdp_action::XDP_PASS
    }

    #[classifier]
    pub fn netpulse_tc(ctx: TcContext) -> i32 {
        let len = ctx.len() as u64;
        // SAFETY: the context pointer is the program's __sk_buff.
        let segs = unsafe { (*ctx.skb.skb).gso_segs } as u64;
        match parse(&ctx) {
            Ok(flow) => {
                let (slot, dir) = classify(&flow, DIR_EGRESS);
                // A GSO skb leaves as `segs` wire packets, each repeating the
                // headers: count what the wire carries.
                let (packets, bytes) = if segs > 1 {
                    (segs, len + (segs - 1) * flow.hdr_len as u64)
                } else {
                    (1, len)
                };
                count(&NP_COUNTERS_TC, slot, dir, packets, bytes, flow.tcp_flags);
            }
            Err(slot) => {
                count(&NP_COUNTERS_TC, slot, DIR_EGRESS, segs.max(1), len, 0);
            }
        }
        TC_ACT_OK
    }

    /// Empty programs: the baseline `cargo xtask bench` subtracts. Never
    /// loaded by the agent.
    #[xdp]
    pub fn netpulse_baseline_xdp(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    #[classifier]
    pub fn netpulse_baseline_tc(_ctx: TcContext) -> i32 {
        TC_ACT_OK
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // No code path above can panic; the verifier would reject one anyway.
        unsafe { core::hint::unreachable_unchecked() }
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}
