//! The kernel half of netpulse: XDP on ingress, TC (clsact/tcx) on egress.
//!
//! Both programs parse the frame the same way, find the service it belongs
//! to in the port index and the service tables, and add to that service's per-CPU slot. They observe
//! only: every path returns XDP_PASS, or TC_ACT_UNSPEC on TC: under tcx
//! that is "next", so programs attached after ours (another tool, a second
//! netpulse) still run, and the packet passes when none is left; TC_ACT_OK
//! would end the chain at us. The agent (agent/src/probe)
//! loads them, keeps the tables current and sums the per-CPU slots.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

// A host build of this crate (clippy --workspace, doc) gets an empty binary;
// the real one is built for bpfel-unknown-none by agent/build.rs.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod kernel {
    use agent_ebpf::*;
    use aya_ebpf::{
        bindings::{TC_ACT_UNSPEC, xdp_action},
        macros::{classifier, map, xdp},
        maps::{Array, HashMap, PerCpuArray},
        programs::{TcContext, XdpContext},
    };

    // The service table and port index are rebuilt by each agent start, so
    // they are not pinned; the counters and slot names are.
    #[map(name = "NP_SERVICES4")]
    static NP_SERVICES4: HashMap<Key4, ServiceRef> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);
    #[map(name = "NP_SERVICES6")]
    static NP_SERVICES6: HashMap<Key6, ServiceRef> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);
    #[map(name = "NP_PORTS")]
    static NP_PORTS: Array<u64> = Array::with_max_entries(PORT_INDEX_LEN, 0);
    #[map(name = "NP_GROUPS4")]
    static NP_GROUPS4: Array<Group4> = Array::with_max_entries(MAX_GROUPS, 0);
    #[map(name = "NP_GROUPS6")]
    static NP_GROUPS6: Array<Group6> = Array::with_max_entries(MAX_GROUPS, 0);
    #[map(name = "NP_ADDRS4")]
    static NP_ADDRS4: HashMap<u32, ServiceRef> = HashMap::with_max_entries(MAX_ADDRS, 0);
    #[map(name = "NP_VETHS")]
    static NP_VETHS: Array<VethSlot> = Array::with_max_entries(MAX_VETHS, 0);
    #[map(name = "NP_ADDRS6")]
    static NP_ADDRS6: HashMap<[u32; 4], ServiceRef> = HashMap::with_max_entries(MAX_ADDRS, 0);
    // One counter array per path: the receive path (XDP, and TC ingress on
    // container veths, both in softirq, which never nests on a CPU) and the
    // transmit path (TC egress). They never write the same memory, so no
    // atomics are needed even where both run on one CPU.
    #[map(name = "NP_COUNTERS_XDP")]
    static NP_COUNTERS_XDP: PerCpuArray<SlotCounters> = PerCpuArray::pinned(MAX_SLOTS, 0);
    #[map(name = "NP_COUNTERS_TC")]
    static NP_COUNTERS_TC: PerCpuArray<SlotCounters> = PerCpuArray::pinned(MAX_SLOTS, 0);
    // Read and written by the agent only; lives here so it is pinned with the
    // counters it names (see SlotName).
    #[map(name = "NP_SLOT_NAMES")]
    static NP_SLOT_NAMES: Array<SlotName> = Array::pinned(MAX_SLOTS, 0);

    /// Packet offsets beyond this are never needed for headers; bounding the
    /// offset keeps the verifier's range tracking simple.
    const MAX_HDR_OFF: usize = 512;
    /// IPv6 extension headers followed before the chain counts as malformed.
    const MAX_IPV6_EXT: usize = 6;
    /// Bytes a TC program makes sure are linear before parsing.
    const TC_PULL: u32 = 128;

    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86DD;
    const ETH_P_8021Q: u16 = 0x8100;
    const ETH_P_8021AD: u16 = 0x88A8;

    const TCP_FIN: u8 = 0x01;
    const TCP_SYN: u8 = 0x02;
    const TCP_RST: u8 = 0x04;

    /// The linear packet bytes `[start, end)`.
    #[derive(Clone, Copy)]
    struct Packet {
        start: usize,
        end: usize,
    }

    /// A header of `len` bytes at `off`, bounds-checked once; reads within it
    /// need no further checks.
    #[derive(Clone, Copy)]
    struct Hdr(usize);

    impl Packet {
        #[inline(always)]
        fn hdr(&self, off: usize, len: usize) -> Option<Hdr> {
            if off > MAX_HDR_OFF {
                return None;
            }
            let p = self.start + off;
            if p + len > self.end {
                return None;
            }
            Some(Hdr(p))
        }
    }

    impl Hdr {
        // Packet memory is only 2-byte aligned after an Ethernet header; the
        // loads below are plain (not split into bytes) because BPF on the
        // architectures we run on (x86-64, arm64) handles misaligned packet
        // loads, and the verifier allows them there.
        #[inline(always)]
        fn u8(self, at: usize) -> u8 {
            // SAFETY: `at` is within the header checked by Packet::hdr.
            unsafe { *((self.0 + at) as *const u8) }
        }
        #[inline(always)]
        fn be16(self, at: usize) -> u16 {
            // SAFETY: as above.
            u16::from_be(unsafe { *((self.0 + at) as *const u16) })
        }
        #[inline(always)]
        fn word(self, at: usize) -> u32 {
            // SAFETY: as above. Raw wire bytes, no byte-order change.
            unsafe { *((self.0 + at) as *const u32) }
        }
    }

    /// What a frame says about itself, once parsed.
    struct Flow {
        family: u8,
        proto: u8,
        src: [u32; 4],
        dst: [u32; 4],
        sport: u16,
        dport: u16,
        tcp_flags: u8,
        /// Bytes of headers up to the end of L4: what each GSO segment repeats.
        hdr_len: usize,
    }

    /// Parses L2..L4. `Err(slot)` names the reserved slot for frames that
    /// cannot be classified.
    #[inline(always)]
    fn parse(p: Packet) -> Result<Flow, u32> {
        let mut off = 14usize;
        let mut ethertype = p.hdr(0, 14).ok_or(SLOT_MALFORMED)?.be16(12);
        // Up to two VLAN tags (802.1Q, or 802.1ad outer + 802.1Q inner).
        for _ in 0..2 {
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                ethertype = p.hdr(off, 4).ok_or(SLOT_MALFORMED)?.be16(2);
                off += 4;
            }
        }
        let mut flow = Flow {
            family: 0,
            proto: 0,
            src: [0; 4],
            dst: [0; 4],
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            hdr_len: 0,
        };
        let l4 = match ethertype {
            ETH_P_IP => {
                let h = p.hdr(off, 20).ok_or(SLOT_MALFORMED)?;
                let vihl = h.u8(0);
                let ihl = ((vihl & 0x0f) as usize) * 4;
                if vihl >> 4 != 4 || ihl < 20 {
                    return Err(SLOT_MALFORMED);
                }
                flow.family = FAMILY_V4;
                flow.proto = h.u8(9);
                flow.src[0] = h.word(12);
                flow.dst[0] = h.word(16);
                if h.be16(6) & 0x1fff != 0 {
                    return Err(SLOT_FRAGMENT);
                }
                off + ihl
            }
            ETH_P_IPV6 => {
                let h = p.hdr(off, 40).ok_or(SLOT_MALFORMED)?;
                if h.u8(0) >> 4 != 6 {
                    return Err(SLOT_MALFORMED);
                }
                flow.family = FAMILY_V6;
                for i in 0..4 {
                    flow.src[i] = h.word(8 + i * 4);
                    flow.dst[i] = h.word(24 + i * 4);
                }
                let mut next = h.u8(6);
                let mut o = off + 40;
                let mut done = false;
                // One pass more than the bound: the last may only find the
                // upper-layer header.
                for _ in 0..=MAX_IPV6_EXT {
                    match next {
                        // hop-by-hop, routing, destination options, mobility, HIP, shim6
                        0 | 43 | 60 | 135 | 139 | 140 => {
                            let e = p.hdr(o, 2).ok_or(SLOT_MALFORMED)?;
                            next = e.u8(0);
                            o += (e.u8(1) as usize + 1) * 8;
                        }
                        // fragment: fixed 8 bytes; only the first fragment has ports
                        44 => {
                            let e = p.hdr(o, 4).ok_or(SLOT_MALFORMED)?;
                            if e.be16(2) & 0xfff8 != 0 {
                                return Err(SLOT_FRAGMENT);
                            }
                            next = e.u8(0);
                            o += 8;
                        }
                        // authentication header: length in 4-byte units, minus 2
                        51 => {
                            let e = p.hdr(o, 2).ok_or(SLOT_MALFORMED)?;
                            next = e.u8(0);
                            o += (e.u8(1) as usize + 2) * 4;
                        }
                        _ => {
                            done = true;
                            break;
                        }
                    }
                }
                // Still an extension header after MAX_IPV6_EXT of them.
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
                let t = p.hdr(l4, 20).ok_or(SLOT_MALFORMED)?;
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
                let u = p.hdr(l4, 8).ok_or(SLOT_MALFORMED)?;
                flow.sport = u.be16(0);
                flow.dport = u.be16(2);
                flow.hdr_len = l4 + 8;
            }
            PROTO_ICMP | PROTO_ICMPV6 => {
                p.hdr(l4, 4).ok_or(SLOT_MALFORMED)?;
                flow.hdr_len = l4 + 4;
            }
            _ => flow.hdr_len = l4,
        }
        Ok(flow)
    }

    #[inline(always)]
    fn ports(family: u8, proto: u8, port: u16) -> u64 {
        match port_index(family, proto, port) {
            Some(i) => NP_PORTS.get(i).copied().unwrap_or(0),
            None => 0,
        }
    }

    /// The slot of `addr` in address group `g` of its family, if there.
    #[inline(always)]
    fn group(family: u8, g: u32, addr: &[u32; 4]) -> Option<u32> {
        if family == FAMILY_V4 {
            let grp = NP_GROUPS4.get(g)?;
            for i in 0..4 {
                if grp.slot[i] != 0 && grp.addr[i] == addr[0] {
                    return Some(grp.slot[i]);
                }
            }
        } else {
            let grp = NP_GROUPS6.get(g)?;
            for i in 0..2 {
                if grp.slot[i] != 0 && grp.addr[i] == *addr {
                    return Some(grp.slot[i]);
                }
            }
        }
        None
    }

    /// Address-specific (or remote) look-up in the family's table; a zero
    /// address is the wildcard.
    #[inline(always)]
    fn table(family: u8, proto: u8, port: u16, role: u8, addr: &[u32; 4]) -> Option<u32> {
        // SAFETY (both): values are plain integers; a concurrent update can at
        // worst give a stale slot number, which is still a valid slot.
        if family == FAMILY_V4 {
            let key = Key4 {
                addr: addr[0],
                port,
                proto,
                role,
            };
            unsafe { NP_SERVICES4.get(&key) }.map(|r| r.slot)
        } else {
            let key = Key6 {
                addr: *addr,
                port,
                proto,
                role,
            };
            unsafe { NP_SERVICES6.get(&key) }.map(|r| r.slot)
        }
    }

    /// An address-specific local service on `port` at `addr`: the port's
    /// group, else (for ports with more than a group holds) the hash table.
    #[inline(always)]
    fn exact(family: u8, proto: u8, port: u16, v: u64, addr: &[u32; 4]) -> Option<u32> {
        let g = ((v >> PORT_GROUP_SHIFT) & PORT_GROUP_MASK) as u32;
        if g != 0
            && let Some(slot) = group(family, g, addr)
        {
            return Some(slot);
        }
        if v & PORT_LOCAL_HASH != 0 {
            return table(family, proto, port, ROLE_LOCAL, addr);
        }
        None
    }

    /// Returns (slot, direction in the service's view) on a host interface.
    /// Local end first: an address-specific service, then the wildcard one
    /// from the port index; then, for ports remote services use, the other
    /// end.
    #[inline(always)]
    fn classify(flow: &Flow, hook_dir: usize) -> (u32, usize) {
        let ingress = hook_dir == DIR_INGRESS;
        let (local, lport, remote, rport) = if ingress {
            (&flow.dst, flow.dport, &flow.src, flow.sport)
        } else {
            (&flow.src, flow.sport, &flow.dst, flow.dport)
        };
        let (family, proto) = (flow.family, flow.proto);
        let v = ports(family, proto, lport);
        if let Some(slot) = exact(family, proto, lport, v, local) {
            return (slot, hook_dir);
        }
        if v & PORT_WILDCARD_MASK != 0 {
            return ((v & PORT_WILDCARD_MASK) as u32, hook_dir);
        }
        if ports(family, proto, rport) & PORT_REMOTE != 0 {
            // From the remote service's view the direction flips.
            if let Some(slot) = table(family, proto, rport, ROLE_REMOTE, remote) {
                return (slot, hook_dir ^ 1);
            }
            if let Some(slot) = table(family, proto, rport, ROLE_REMOTE, &[0; 4]) {
                return (slot, hook_dir ^ 1);
            }
        }
        (SLOT_NO_MATCH, hook_dir)
    }

    /// On a container's host-side veth, `dir` is the container's view. Only
    /// the container's end is looked at: a configured service on its
    /// address and port first, then the container behind this veth (by
    /// ifindex, an array look-up), else by address. Host
    /// and remote services are counted on the host's interfaces, so a
    /// packet between two containers, or from a container to the outside,
    /// is counted once per service.
    #[inline(always)]
    fn classify_container(flow: &Flow, dir: usize, ifindex: u32) -> Option<u32> {
        let (addr, port) = if dir == DIR_INGRESS {
            (&flow.dst, flow.dport)
        } else {
            (&flow.src, flow.sport)
        };
        let family = flow.family;
        let v = ports(family, flow.proto, port);
        if let Some(slot) = exact(family, flow.proto, port, v, addr) {
            return Some(slot);
        }
        // Unicast only: multicast the host sends down every veth (IPv6
        // neighbour discovery, MLD) is not the container's traffic. The
        // first address byte is the low byte of the first word.
        let first = (addr[0] & 0xff) as u8;
        let multicast = if family == FAMILY_V4 {
            first & 0xf0 == 0xe0
        } else {
            first == 0xff
        };
        if !multicast
            && let Some(e) = NP_VETHS.get(ifindex % MAX_VETHS)
            && e.ifindex == ifindex
            && e.slot != 0
        {
            return Some(e.slot);
        }
        // SAFETY (both): plain integers; a concurrent update can at worst
        // give a stale slot number, which is still a valid slot.
        let found = if family == FAMILY_V4 {
            unsafe { NP_ADDRS4.get(&addr[0]) }
        } else {
            unsafe { NP_ADDRS6.get(addr) }
        };
        found.map(|r| r.slot)
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
        let p = Packet {
            start: ctx.data(),
            end: ctx.data_end(),
        };
        let bytes = (p.end - p.start) as u64;
        match parse(p) {
            Ok(flow) => {
                let (slot, dir) = classify(&flow, DIR_INGRESS);
                count(&NP_COUNTERS_XDP, slot, dir, 1, bytes, flow.tcp_flags);
            }
            Err(slot) => count(&NP_COUNTERS_XDP, slot, DIR_INGRESS, 1, bytes, 0),
        }
        xdp_action::XDP_PASS
    }

    /// Bytes of one 802.1Q/802.1ad tag.
    const VLAN_TAG_LEN: u64 = 4;

    /// The TC path: makes the headers linear, parses, classifies with
    /// `classify` and counts what the wire carries.
    #[inline(always)]
    fn tc_count(
        ctx: &TcContext,
        map: &PerCpuArray<SlotCounters>,
        hook_dir: usize,
        classify: impl Fn(&Flow) -> (u32, usize),
    ) {
        let len = ctx.len() as u64;
        // SAFETY: the context pointer is the program's __sk_buff.
        let segs = unsafe { (*ctx.skb.skb).gso_segs } as u64;
        // An outer 802.1Q/802.1ad tag the kernel moved into the skb's
        // metadata (on receive, before TC ingress runs; on transmit, by a
        // VLAN device over a NIC that inserts tags) is on the wire but not
        // in the packet: 4 bytes per wire packet.
        // SAFETY: as above.
        let tag = if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
            VLAN_TAG_LEN
        } else {
            0
        };
        // Headers are almost always linear; when they are not, make the
        // first bytes linear rather than misread the packet.
        if ctx.data_end() - ctx.data() < TC_PULL as usize
            && len > (ctx.data_end() - ctx.data()) as u64
        {
            let _ = ctx.pull_data(if len < TC_PULL as u64 {
                len as u32
            } else {
                TC_PULL
            });
        }
        let p = Packet {
            start: ctx.data(),
            end: ctx.data_end(),
        };
        match parse(p) {
            Ok(flow) => {
                let (slot, dir) = classify(&flow);
                // A GSO skb is `segs` wire packets, each repeating the
                // headers: count what the wire carries.
                let (packets, bytes) = if segs > 1 {
                    (segs, len + (segs - 1) * flow.hdr_len as u64 + segs * tag)
                } else {
                    (1, len + tag)
                };
                count(map, slot, dir, packets, bytes, flow.tcp_flags);
            }
            Err(slot) => count(map, slot, hook_dir, segs.max(1), len + segs.max(1) * tag, 0),
        }
    }

    #[classifier]
    pub fn netpulse_tc(ctx: TcContext) -> i32 {
        tc_count(&ctx, &NP_COUNTERS_TC, DIR_EGRESS, |f| {
            classify(f, DIR_EGRESS)
        });
        TC_ACT_UNSPEC
    }

    /// TC ingress on a host interface without native XDP: what XDP would
    /// count, after GRO (a merged skb counts its segments).
    #[classifier]
    pub fn netpulse_tc_in(ctx: TcContext) -> i32 {
        tc_count(&ctx, &NP_COUNTERS_XDP, DIR_INGRESS, |f| {
            classify(f, DIR_INGRESS)
        });
        TC_ACT_UNSPEC
    }

    // Unclassified packets on a container veth count in the host's view
    // (arriving from the container = ingress), like those on any interface.

    /// TC ingress on a container's host-side veth: what the container sends.
    #[classifier]
    pub fn netpulse_ct_from(ctx: TcContext) -> i32 {
        // SAFETY: the context pointer is the program's __sk_buff.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        tc_count(
            &ctx,
            &NP_COUNTERS_XDP,
            DIR_INGRESS,
            |f| match classify_container(f, DIR_EGRESS, ifindex) {
                Some(slot) => (slot, DIR_EGRESS),
                None => (SLOT_NO_MATCH, DIR_INGRESS),
            },
        );
        TC_ACT_UNSPEC
    }

    /// TC egress on a container's host-side veth: what the container receives.
    #[classifier]
    pub fn netpulse_ct_to(ctx: TcContext) -> i32 {
        // SAFETY: as above.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        tc_count(
            &ctx,
            &NP_COUNTERS_TC,
            DIR_EGRESS,
            |f| match classify_container(f, DIR_INGRESS, ifindex) {
                Some(slot) => (slot, DIR_INGRESS),
                None => (SLOT_NO_MATCH, DIR_EGRESS),
            },
        );
        TC_ACT_UNSPEC
    }

    /// Empty programs: the baseline `cargo xtask bench` subtracts. Never
    /// loaded by the agent.
    #[xdp]
    pub fn netpulse_baseline_xdp(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    #[classifier]
    pub fn netpulse_baseline_tc(_ctx: TcContext) -> i32 {
        TC_ACT_UNSPEC
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
