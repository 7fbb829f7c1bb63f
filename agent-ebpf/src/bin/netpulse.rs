//! The kernel half of netpulse: XDP on ingress, TC (clsact/tcx) on egress.
//!
//! Both programs parse the frame with `agent_ebpf::parse`, find the service
//! it belongs to with `agent_ebpf::classify` (the same code the agent runs
//! in userspace: here over packet memory and these maps, see `Packet` and
//! `Maps`), and add to that service's per-CPU slot. They observe
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

/// A map named after its static, the name checked at compile time against
/// the agent's (`agent_ebpf::maps`).
#[cfg(target_arch = "bpf")]
macro_rules! np_map {
    ($name:ident = $shared:path, $ty:ty, $init:expr) => {
        #[aya_ebpf::macros::map]
        static $name: $ty = $init;
        const _: () = assert!(agent_ebpf::str_eq(stringify!($name), $shared));
    };
}

/// The program names the agent loads by (`agent_ebpf::programs`), checked
/// at compile time against the functions.
#[cfg(target_arch = "bpf")]
macro_rules! np_programs {
    ($($f:ident = $shared:path),* $(,)?) => {
        $(const _: () = {
            let _ = $f;
            assert!(agent_ebpf::str_eq(stringify!($f), $shared));
        };)*
    };
}

#[cfg(target_arch = "bpf")]
mod health;

#[cfg(target_arch = "bpf")]
mod peers;

#[cfg(target_arch = "bpf")]
mod kernel {
    use agent_ebpf::{
        classify::{ContainerTables, Tables, classify, classify_container},
        parse::{Flow, Frame, Header, parse_ethernet},
        *,
    };
    use aya_ebpf::{
        bindings::{TC_ACT_UNSPEC, xdp_action},
        macros::{classifier, xdp},
        maps::{Array, HashMap, PerCpuArray},
        programs::{TcContext, XdpContext},
    };

    // The service table and port index are rebuilt by each agent start, so
    // they are not pinned; the counters and slot names are.
    np_map!(
        NP_SERVICES4 = maps::SERVICES4,
        HashMap<Key4, ServiceRef>,
        HashMap::with_max_entries(MAX_ENDPOINTS, 0)
    );
    np_map!(
        NP_SERVICES6 = maps::SERVICES6,
        HashMap<Key6, ServiceRef>,
        HashMap::with_max_entries(MAX_ENDPOINTS, 0)
    );
    np_map!(
        NP_PORTS = maps::PORTS,
        Array<u64>,
        Array::with_max_entries(PORT_INDEX_LEN, 0)
    );
    np_map!(
        NP_GROUPS4 = maps::GROUPS4,
        Array<Group4>,
        Array::with_max_entries(MAX_GROUPS, 0)
    );
    np_map!(
        NP_GROUPS6 = maps::GROUPS6,
        Array<Group6>,
        Array::with_max_entries(MAX_GROUPS, 0)
    );
    np_map!(
        NP_ADDRS4 = maps::ADDRS4,
        HashMap<u32, ServiceRef>,
        HashMap::with_max_entries(MAX_ADDRS, 0)
    );
    np_map!(
        NP_VETHS = maps::VETHS,
        Array<VethSlot>,
        Array::with_max_entries(MAX_VETHS, 0)
    );
    np_map!(
        NP_ADDRS6 = maps::ADDRS6,
        HashMap<[u32; 4], ServiceRef>,
        HashMap::with_max_entries(MAX_ADDRS, 0)
    );
    // One counter array per path: the receive path (XDP, and TC ingress on
    // container veths, both in softirq, which never nests on a CPU) and the
    // transmit path (TC egress). They never write the same memory, so no
    // atomics are needed even where both run on one CPU.
    np_map!(
        NP_COUNTERS_XDP = maps::COUNTERS_XDP,
        PerCpuArray<SlotCounters>,
        PerCpuArray::pinned(MAX_SLOTS, 0)
    );
    np_map!(
        NP_COUNTERS_TC = maps::COUNTERS_TC,
        PerCpuArray<SlotCounters>,
        PerCpuArray::pinned(MAX_SLOTS, 0)
    );
    // Read and written by the agent only; lives here so it is pinned with the
    // counters it names (see SlotName).
    np_map!(
        NP_SLOT_NAMES = maps::SLOT_NAMES,
        Array<SlotName>,
        Array::pinned(MAX_SLOTS, 0)
    );

    /// Bytes a TC program makes sure are linear before parsing.
    const TC_PULL: u32 = 128;

    /// The linear packet bytes `[start, end)`: the shared parser's
    /// [`Frame`] in the kernel.
    #[derive(Clone, Copy)]
    struct Packet {
        start: usize,
        end: usize,
    }

    /// A header of `len` bytes at `off`, bounds-checked once; reads within it
    /// need no further checks.
    #[derive(Clone, Copy)]
    struct Hdr(usize);

    impl Frame for Packet {
        type Header = Hdr;
        // `parse::header` has bounded `off` by MAX_HDR_OFF before this.
        #[inline(always)]
        fn header(self, off: usize, len: usize) -> Option<Hdr> {
            let p = self.start + off;
            if p + len > self.end {
                return None;
            }
            Some(Hdr(p))
        }
    }

    impl Header for Hdr {
        // Packet memory is only 2-byte aligned after an Ethernet header; the
        // loads below are plain (not split into bytes) because BPF on the
        // architectures we run on (x86-64, arm64) handles misaligned packet
        // loads, and the verifier allows them there.
        #[inline(always)]
        fn u8(self, at: usize) -> u8 {
            // SAFETY: `at` is within the header checked by Packet::header.
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

    /// The maps: the shared classifier's [`Tables`] in the kernel.
    pub(crate) struct Maps;

    impl Tables for Maps {
        #[inline(always)]
        fn port(&self, index: u32) -> u64 {
            NP_PORTS.get(index).copied().unwrap_or(0)
        }
        #[inline(always)]
        fn group4(&self, g: u32) -> Option<&Group4> {
            NP_GROUPS4.get(g)
        }
        #[inline(always)]
        fn group6(&self, g: u32) -> Option<&Group6> {
            NP_GROUPS6.get(g)
        }
        // SAFETY (the hash maps here and below): values are plain integers;
        // a concurrent update can at worst give a stale slot number, which
        // is still a valid slot.
        #[inline(always)]
        fn service4(&self, key: &Key4) -> Option<u32> {
            unsafe { NP_SERVICES4.get(key) }.map(|r| r.slot)
        }
        #[inline(always)]
        fn service6(&self, key: &Key6) -> Option<u32> {
            unsafe { NP_SERVICES6.get(key) }.map(|r| r.slot)
        }
    }

    impl ContainerTables for Maps {
        /// An array look-up by ifindex; the ifindex stored beside the slot
        /// tells collisions apart.
        #[inline(always)]
        fn veth(&self, ifindex: u32) -> Option<u32> {
            NP_VETHS.get(VethSlot::index(ifindex))?.slot_of(ifindex)
        }
        #[inline(always)]
        fn addr4(&self, addr: u32) -> Option<u32> {
            unsafe { NP_ADDRS4.get(&addr) }.map(|r| r.slot)
        }
        #[inline(always)]
        fn addr6(&self, addr: &[u32; 4]) -> Option<u32> {
            unsafe { NP_ADDRS6.get(addr) }.map(|r| r.slot)
        }
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
        let mut flow = Flow::default();
        match parse_ethernet(p, &mut flow) {
            Ok(()) => {
                let (slot, dir) = classify(&Maps, &flow, DIR_INGRESS);
                count(&NP_COUNTERS_XDP, slot, dir, 1, bytes, flow.tcp_flags);
                crate::peers::count(DIR_INGRESS, slot, dir, &flow, 1, bytes);
                if flow.tcp_flags & TCP_SYN != 0 && dir == DIR_INGRESS {
                    crate::health::syn_seen(&flow, slot);
                }
            }
            Err(slot) => count(&NP_COUNTERS_XDP, slot, DIR_INGRESS, 1, bytes, 0),
        }
        xdp_action::XDP_PASS
    }

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
            VLAN_TAG_LEN as u64
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
        let mut flow = Flow::default();
        match parse_ethernet(p, &mut flow) {
            Ok(()) => {
                let (slot, dir) = classify(&flow);
                // A GSO skb is `segs` wire packets, each repeating the
                // headers: count what the wire carries.
                let (packets, bytes) = if segs > 1 {
                    (segs, len + (segs - 1) * flow.hdr_len as u64 + segs * tag)
                } else {
                    (1, len + tag)
                };
                count(map, slot, dir, packets, bytes, flow.tcp_flags);
                crate::peers::count(hook_dir, slot, dir, &flow, packets, bytes);
                // A SYN arriving at a local service: the server-side
                // handshake starts here (see health).
                if hook_dir == DIR_INGRESS && dir == DIR_INGRESS && flow.tcp_flags & TCP_SYN != 0 {
                    crate::health::syn_seen(&flow, slot);
                }
            }
            Err(slot) => count(map, slot, hook_dir, segs.max(1), len + segs.max(1) * tag, 0),
        }
    }

    #[classifier]
    pub fn netpulse_tc(ctx: TcContext) -> i32 {
        tc_count(&ctx, &NP_COUNTERS_TC, DIR_EGRESS, |f| {
            classify(&Maps, f, DIR_EGRESS)
        });
        TC_ACT_UNSPEC
    }

    /// TC ingress on a host interface without native XDP: what XDP would
    /// count, after GRO (a merged skb counts its segments).
    #[classifier]
    pub fn netpulse_tc_in(ctx: TcContext) -> i32 {
        tc_count(&ctx, &NP_COUNTERS_XDP, DIR_INGRESS, |f| {
            classify(&Maps, f, DIR_INGRESS)
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
            |f| match classify_container(&Maps, f, DIR_EGRESS, ifindex) {
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
            |f| match classify_container(&Maps, f, DIR_INGRESS, ifindex) {
                Some(slot) => (slot, DIR_INGRESS),
                None => (SLOT_NO_MATCH, DIR_EGRESS),
            },
        );
        TC_ACT_UNSPEC
    }

    np_programs!(
        netpulse_xdp = programs::XDP_INGRESS,
        netpulse_tc = programs::TC_EGRESS,
        netpulse_tc_in = programs::TC_INGRESS,
        netpulse_ct_from = programs::CT_FROM,
        netpulse_ct_to = programs::CT_TO,
        netpulse_baseline_xdp = programs::BASELINE_XDP,
        netpulse_baseline_tc = programs::BASELINE_TC,
    );

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
