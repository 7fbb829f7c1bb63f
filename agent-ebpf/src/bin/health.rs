//! TCP health and kernel drops, from BTF tracepoints and fexit: per service
//! slot, connections by result, handshake and RTT histograms, retransmitted
//! segments; and the packets the kernel drops, by its own reason.
//!
//! Every figure is aggregated here, in per-CPU maps: there is no event
//! stream to lose. Kernel structs are read with `bpf_probe_read_kernel` at
//! the offsets the agent found in the running kernel's BTF (`NP_OFFSETS`).
//! Only sockets and packets of the network namespaces in `NP_NETNS` count:
//! the agent's own, and the known containers' (server side only there).
//!
//! These programs may nest on one CPU (a softirq interrupting a process
//! context one), but each counter field is written by one program only and a
//! program never nests into itself (see `TcpCounters`), so per-CPU adds are
//! plain.

use agent_ebpf::{
    classify::{ContainerTables, Tables, classify_file, local, remote},
    parse::{Flow, parse_from},
    *,
};
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::{btf_tracepoint, map},
    maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::BtfTracePointContext,
};

use crate::kernel::Maps;

/// Set by the agent before loading (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
static NP_OFFSETS: Offsets = Offsets::UNKNOWN;
const _: () = assert!(str_eq("NP_OFFSETS", OFFSETS_GLOBAL));

np_map!(
    NP_TCP = maps::TCP,
    PerCpuArray<TcpCounters>,
    PerCpuArray::pinned(TCP_SLOTS, 0)
);
np_map!(
    NP_DROPS = maps::DROPS,
    PerCpuHashMap<DropKey, u64>,
    PerCpuHashMap::pinned(MAX_DROP_KEYS, 0)
);
np_map!(
    NP_SOCKS = maps::SOCKS,
    LruHashMap<u64, SockState>,
    LruHashMap::pinned(MAX_SOCKS, 0)
);
np_map!(
    NP_TCP_META = maps::TCP_META,
    PerCpuArray<u64>,
    PerCpuArray::pinned(META_LEN, 0)
);
// Rebuilt by every agent start (the namespaces are the running ones).
np_map!(
    NP_NETNS = maps::NETNS,
    HashMap<u32, u32>,
    HashMap::with_max_entries(MAX_VETHS, 0)
);

macro_rules! off {
    ($f:ident) => {
        // SAFETY: a plain read of a global the loader filled in.
        unsafe { core::ptr::read_volatile(&NP_OFFSETS.$f) } as u64
    };
}

/// The `u32` at `base + off` of kernel memory, 0 when unknown or the read
/// faults. Read into a zeroed value: through `Option` the compiler may
/// test a register the failed read never set, which the verifier rejects.
#[inline(always)]
fn rd_u32_or_zero(base: u64, off: u64) -> u32 {
    let mut v = [0u8; 4];
    if base != 0 && off != u32::MAX as u64 {
        // SAFETY: the helper checks the kernel address and writes at most
        // 4 bytes into `v`.
        let _ = unsafe { bpf_probe_read_kernel_buf((base + off) as *const u8, &mut v) };
    }
    u32::from_ne_bytes(v)
}

/// `T` at `base + off` of kernel memory; `None` when the read faults or the
/// offset is unknown.
#[inline(always)]
fn rd<T>(base: u64, off: u64) -> Option<T> {
    if base == 0 || off == u32::MAX as u64 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address itself.
    unsafe { bpf_probe_read_kernel((base + off) as *const T) }.ok()
}

#[inline(always)]
fn add(p: *mut u64, n: u64) {
    // SAFETY: `p` points into a per-CPU map value this program alone writes
    // (on this CPU).
    unsafe { *p += n };
}

#[inline(always)]
fn meta(i: u32) {
    if let Some(p) = NP_TCP_META.get_ptr_mut(i) {
        add(p, 1);
    }
}

#[inline(always)]
fn tcp(slot: u32) -> Option<*mut TcpCounters> {
    NP_TCP.get_ptr_mut(slot)
}

#[inline(always)]
fn count(slot: u32, what: usize) {
    count_n(slot, what, 1);
}

#[inline(always)]
fn count_n(slot: u32, what: usize, n: u64) {
    if let Some(c) = tcp(slot)
        && what < TCP_COUNTS
    {
        // SAFETY: as above.
        add(unsafe { &raw mut (*c).counts[what] }, n);
    }
}

/// Which histogram of [`TcpCounters`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum H {
    Handshake,
    Rtt,
    RttLive,
}

#[inline(always)]
fn record(slot: u32, which: H, us: u64) {
    let Some(c) = tcp(slot) else { return };
    let b = Hist::bucket(us);
    // SAFETY: as above; `b` is a bucket index.
    let h = unsafe {
        match which {
            H::Handshake => &raw mut (*c).handshake,
            H::Rtt => &raw mut (*c).rtt,
            H::RttLive => &raw mut (*c).rtt_live,
        }
    };
    if b < HIST_BUCKETS {
        add(unsafe { &raw mut (*h).buckets[b] }, 1);
    }
    add(unsafe { &raw mut (*h).sum_us }, us);
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: no arguments.
    unsafe { bpf_ktime_get_ns() }
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

const TCP_ESTABLISHED_ST: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: u8 = 10;
const TCP_NEW_SYN_RECV: u8 = 12;

const ECONNRESET: i32 = 104;
const EPIPE: i32 = 32;
const ETIMEDOUT: i32 = 110;
const ECONNREFUSED: i32 = 111;

/// Long connections get an RTT sample at most this often (plus one at close).
const RTT_SAMPLE_NS: u64 = 5_000_000_000;

/// A socket's ends and the kind of its namespace.
struct Ends {
    family: u8,
    laddr: [u32; 4],
    lport: u16,
    raddr: [u32; 4],
    rport: u16,
    netns: u32,
}

/// The namespace kind (`NETNS_*`) of a `struct net *`, `None` for one
/// netpulse does not watch.
#[inline(always)]
fn netns_kind(net: u64) -> Option<u32> {
    let inum: u32 = rd(net, off!(net_inum))?;
    // SAFETY: a plain value.
    unsafe { NP_NETNS.get(&inum) }.copied()
}

/// Bytes of a kernel struct copied at once (see [`Win`]).
const WIN: usize = 256;

/// Per-CPU scratch buffers: programs nest on a CPU but never into
/// themselves, so each program has its own (the skb programs two: the
/// `sk_buff` at their index, its packet headers at the next).
#[map]
static NP_SCRATCH: PerCpuArray<[u8; WIN]> = PerCpuArray::with_max_entries(SCRATCH_LEN, 0);

const SCRATCH_SOCK_STATE: u32 = 0;
const SCRATCH_RETRANSMIT: u32 = 1;
const SCRATCH_SYNACK: u32 = 2;
const SCRATCH_KFREE: u32 = 3;
const SCRATCH_SEND_RESET: u32 = 5;
const SCRATCH_RECEIVE_RESET: u32 = 7;
const SCRATCH_LEN: u32 = 8;

/// The first [`WIN`] bytes of a kernel struct, read with one helper call:
/// fields within them are read from the copy, others (or all, if the copy
/// failed) one by one.
struct Win {
    base: u64,
    copy: Option<*const u8>,
}

impl Win {
    #[inline(always)]
    fn read(base: u64, scratch: u32) -> Win {
        let copy = NP_SCRATCH.get_ptr_mut(scratch).and_then(|buf| {
            // SAFETY: this program's own scratch value; the helper checks
            // the kernel address.
            let ok = unsafe { bpf_probe_read_kernel_buf(base as *const u8, &mut *buf) }.is_ok();
            ok.then_some(buf as *const u8)
        });
        Win { base, copy }
    }

    #[inline(always)]
    fn get<T: Copy>(&self, off: u64) -> Option<T> {
        let size = core::mem::size_of::<T>() as u64;
        if let Some(p) = self.copy
            && off < WIN as u64
            && off + size <= WIN as u64
        {
            // SAFETY: within the copy, checked just above.
            return Some(unsafe { core::ptr::read_unaligned(p.add(off as usize) as *const T) });
        }
        rd(self.base, off)
    }
}

/// The ends of a socket (`struct sock_common`: a full socket or a request
/// socket), read through the program's scratch window. An IPv4-mapped IPv6
/// socket reads as IPv4.
#[inline(always)]
fn ends(sk: u64, scratch: u32) -> Option<Ends> {
    let w = Win::read(sk, scratch);
    let net: u64 = w.get(off!(skc_net))?;
    let netns = netns_kind(net)?;
    let family: u16 = w.get(off!(skc_family))?;
    let lport: u16 = w.get(off!(skc_num))?;
    let rport = u16::from_be(w.get::<u16>(off!(skc_dport))?);
    let mut e = Ends {
        family: FAMILY_V4,
        laddr: [0; 4],
        lport,
        raddr: [0; 4],
        rport,
        netns,
    };
    if family == AF_INET {
        e.laddr[0] = w.get(off!(skc_rcv_saddr))?;
        e.raddr[0] = w.get(off!(skc_daddr))?;
    } else if family == AF_INET6 {
        let l: [u32; 4] = w.get(off!(skc_v6_rcv_saddr))?;
        let r: [u32; 4] = w.get(off!(skc_v6_daddr))?;
        let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        if r[0] == 0 && r[1] == 0 && r[2] == mapped {
            e.laddr[0] = l[3];
            e.raddr[0] = r[3];
        } else {
            e.family = FAMILY_V6;
            e.laddr = l;
            e.raddr = r;
        }
    } else {
        return None;
    }
    Some(e)
}

/// Whether a socket's ports can be a service's at all, from the port index
/// alone (two reads and a few array loads, before the full look-up): its
/// local port for a local service, its remote port for a remote one. Both
/// families, as an IPv4-mapped socket is classified as IPv4. Containers are
/// matched by address, not port: with any watched, always yes.
#[inline(always)]
fn may_match(sk: u64, local_side: bool, remote_side: bool) -> bool {
    // SAFETY: a plain value (key 0: how many container namespaces).
    if unsafe { NP_NETNS.get(&NETNS_CONTAINERS_KEY) }.is_some_and(|n| *n > 0) {
        return true;
    }
    let (Some(lport), Some(rport)) = (
        rd::<u16>(sk, off!(skc_num)),
        rd::<u16>(sk, off!(skc_dport)).map(u16::from_be),
    ) else {
        return true;
    };
    for family in [FAMILY_V4, FAMILY_V6] {
        if local_side && let Some(i) = port_index(family, PROTO_TCP, lport) {
            let v = PortEntry(Maps.port(i));
            if v.wildcard() != 0 || v.group() != 0 || v.local_hash() {
                return true;
            }
        }
        if remote_side
            && let Some(i) = port_index(family, PROTO_TCP, rport)
            && PortEntry(Maps.port(i)).remote()
        {
            return true;
        }
    }
    false
}

#[inline(always)]
fn tcp_slot(slot: u32) -> Option<u32> {
    (slot >= FIRST_SERVICE_SLOT && slot < TCP_SLOTS).then_some(slot)
}

/// The slot of this host's end: a local service (a container's, by its
/// address, in its namespace).
#[inline(always)]
fn server_slot(e: &Ends) -> Option<u32> {
    if let Some(s) = local(&Maps, e.family, PROTO_TCP, e.lport, &e.laddr) {
        return tcp_slot(s);
    }
    if e.netns == NETNS_CONTAINER {
        let s = if e.family == FAMILY_V4 {
            Maps.addr4(e.laddr[0])
        } else {
            Maps.addr6(&e.laddr)
        };
        return tcp_slot(s?);
    }
    None
}

/// The slot of the other end: a `remote` service this host connects to
/// (from this host's namespace only).
#[inline(always)]
fn client_slot(e: &Ends) -> Option<u32> {
    if e.netns != NETNS_HOST {
        return None;
    }
    tcp_slot(remote(&Maps, e.family, PROTO_TCP, e.rport, &e.raddr)?)
}

/// A socket netpulse did not follow from its start (opened before the
/// agent, or forgotten by the LRU): a local service first, then a remote.
#[inline(always)]
fn any_slot(e: &Ends) -> Option<(u32, u32)> {
    // In a container's namespace only connections followed from their
    // accept count: by address alone, its own connects would look served.
    if e.netns != NETNS_HOST {
        return None;
    }
    if let Some(s) = server_slot(e) {
        return Some((s, SOCK_SERVER));
    }
    client_slot(e).map(|s| (s, SOCK_CLIENT))
}

#[inline(always)]
fn is_tcp(sk: u64) -> bool {
    rd::<u16>(sk, off!(sk_protocol)) == Some(PROTO_TCP as u16)
}

#[inline(always)]
fn sock(sk: u64) -> Option<*mut SockState> {
    NP_SOCKS.get_ptr_mut(sk)
}

#[inline(always)]
fn sample_rtt(sk: u64, slot: u32, which: H) {
    if let Some(srtt) = rd::<u32>(sk, off!(srtt_us))
        && srtt > 0
    {
        record(slot, which, (srtt >> 3) as u64);
    }
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn netpulse_sock_state(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    // Only these transitions count; the others (LISTEN, SYN_RECV of a new
    // child, FIN_WAIT1 → FIN_WAIT2, ...) return before any read.
    let wanted = new == TCP_SYN_SENT
        || (new == TCP_ESTABLISHED_ST && (old == TCP_SYN_SENT || old == TCP_SYN_RECV))
        || old == TCP_ESTABLISHED_ST
        || (new == TCP_CLOSE && (old == TCP_SYN_SENT || matches!(old, 4 | 5 | 8 | 9 | 11)));
    if !wanted || !is_tcp(sk) {
        return 0;
    }
    if new == TCP_SYN_SENT {
        if !may_match(sk, false, true) {
            return 0;
        }
        let Some(slot) = ends(sk, SCRATCH_SOCK_STATE).and_then(|e| client_slot(&e)) else {
            return 0;
        };
        let st = SockState {
            start_ns: now(),
            slot,
            flags: SOCK_CLIENT,
            ..SockState::default()
        };
        let _ = NP_SOCKS.insert(sk, st, 0);
        return 0;
    }
    if new == TCP_ESTABLISHED_ST {
        if old == TCP_SYN_SENT {
            if let Some(st) = sock(sk) {
                // SAFETY: a value of the socket map.
                let st = unsafe { &mut *st };
                count(st.slot, TCP_ESTABLISHED);
                let t = now();
                if st.start_ns != 0 && t > st.start_ns {
                    record(st.slot, H::Handshake, (t - st.start_ns) / 1000);
                }
                st.flags |= SOCK_ESTABLISHED;
                st.rtt_ns = t;
            }
        } else if old == TCP_SYN_RECV {
            if !may_match(sk, true, false) {
                return 0;
            }
            let Some(e) = ends(sk, SCRATCH_SOCK_STATE) else {
                return 0;
            };
            let Some(slot) = server_slot(&e) else {
                return 0;
            };
            count(slot, TCP_ESTABLISHED);
            let t = now();
            if let Some(syn) = syn_time(&e)
                && t > syn
            {
                record(slot, H::Handshake, (t - syn) / 1000);
            }
            let st = SockState {
                slot,
                flags: SOCK_SERVER | SOCK_ESTABLISHED,
                rtt_ns: t,
                ..SockState::default()
            };
            let _ = NP_SOCKS.insert(sk, st, 0);
        }
        return 0;
    }
    if old == TCP_ESTABLISHED_ST {
        // Leaving ESTABLISHED: this side or the other started to close (or
        // reset). The RTT is sampled here, as the closing side read it; the
        // result (closed or reset) is counted when the socket is freed, as
        // a reset sent by close() (SO_LINGER 0, unread data) goes out only
        // after the socket is already CLOSE.
        end(sk, new == TCP_CLOSE, new == TCP_CLOSE);
        return 0;
    }
    if new != TCP_CLOSE {
        return 0;
    }
    if old == TCP_SYN_SENT {
        let slot = match sock(sk) {
            // SAFETY: as above.
            Some(st) => unsafe { (*st).slot },
            None => match ends(sk, SCRATCH_SOCK_STATE).and_then(|e| client_slot(&e)) {
                Some(s) => s,
                None => return 0,
            },
        };
        let err: i32 = rd(sk, off!(sk_err)).unwrap_or(0);
        let result = match err {
            ECONNREFUSED => TCP_REFUSED,
            ETIMEDOUT => TCP_TIMEOUT,
            _ => TCP_ABORTED,
        };
        count(slot, result);
        let _ = NP_SOCKS.remove(sk);
        return 0;
    }
    // CLOSE from a closing state (FIN_WAIT1/2, CLOSE_WAIT, LAST_ACK,
    // CLOSING): a reset seen now, or a connection opened before the agent.
    // (LISTEN, 10, is not a connection.)
    if matches!(old, 4 | 5 | 8 | 9 | 11) {
        end(sk, true, true);
    }
    0
}

/// A connection leaves ESTABLISHED (or, one netpulse did not see leave it,
/// reaches CLOSE): counted as ended once, its RTT sampled; a reset seen in
/// `sk_err` marked. A socket without a record is looked up by its ends only
/// at CLOSE (`fallback`), once: most sockets without one are no service's.
#[inline(always)]
fn end(sk: u64, closing: bool, fallback: bool) {
    let reset = if closing {
        let err: i32 = rd(sk, off!(sk_err)).unwrap_or(0);
        if err == ECONNRESET || err == EPIPE {
            SOCK_RESET
        } else {
            0
        }
    } else {
        0
    };
    if let Some(p) = sock(sk) {
        // SAFETY: a value of the socket map, updated in place.
        let st = unsafe { &mut *p };
        if st.flags & SOCK_ENDED == 0 {
            count(st.slot, TCP_ENDED);
            sample_rtt(sk, st.slot, H::Rtt);
        }
        st.flags |= SOCK_ENDED | reset;
        return;
    }
    // A connection not followed from its start (opened before the agent,
    // or forgotten by the LRU): attributed by its ends, remembered from here.
    if !fallback || !may_match(sk, true, true) {
        return;
    }
    let Some((slot, side)) = ends(sk, SCRATCH_SOCK_STATE).and_then(|e| any_slot(&e)) else {
        return;
    };
    count(slot, TCP_ENDED);
    sample_rtt(sk, slot, H::Rtt);
    let st = SockState {
        slot,
        flags: side | SOCK_ENDED | reset,
        ..SockState::default()
    };
    let _ = NP_SOCKS.insert(sk, st, 0);
}

/// The socket is freed: an ended connection's result.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn netpulse_destroy_sock(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let Some(p) = sock(sk) else { return 0 };
    // SAFETY: as above.
    let st = unsafe { *p };
    if st.flags & SOCK_ENDED != 0 {
        let result = if st.flags & SOCK_RESET != 0 {
            TCP_RESET
        } else {
            TCP_CLOSED
        };
        count(st.slot, result);
    }
    let _ = NP_SOCKS.remove(sk);
    0
}

#[inline(always)]
fn mark_reset(sk: u64) {
    if let Some(p) = sock(sk) {
        // SAFETY: as above.
        unsafe { (*p).flags |= SOCK_RESET };
    }
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn netpulse_receive_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    mark_reset(sk);
    if let Some(e) = ends(sk, SCRATCH_RECEIVE_RESET)
        && e.netns == NETNS_HOST
        && let Some(w) = watched(e.family, PROTO_TCP, e.lport, &e.raddr, e.rport)
    {
        // SAFETY: this CPU's value of the watched flow; written by this
        // program only.
        unsafe { (*w).resets += 1 };
    }
    0
}

/// A reset this host sends: on a connection (mark it), or with no socket,
/// in reply to a SYN to a local service's closed port (`refused`).
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn netpulse_send_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    if sk != 0 {
        let state: u8 = rd(sk, off!(skc_state)).unwrap_or(TCP_LISTEN);
        if state != TCP_TIME_WAIT && state != TCP_NEW_SYN_RECV && state != TCP_LISTEN {
            mark_reset(sk);
        }
        return 0;
    }
    let Some((flow, netns)) = skb_flow(skb, SCRATCH_SEND_RESET) else {
        return 0;
    };
    if netns == NETNS_HOST
        && flow.proto == PROTO_TCP
        && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && let Some(slot) = local(&Maps, flow.family, PROTO_TCP, flow.dport, &flow.dst)
        && let Some(slot) = tcp_slot(slot)
    {
        count(slot, TCP_REFUSED);
    }
    0
}

/// Retransmitted segments, counted as the kernel's `TcpRetransSegs`: each
/// skb's segment count (TSO/GSO).
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn netpulse_retransmit(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    let err: i64 = ctx.arg::<u64>(2) as i32 as i64;
    // -EBUSY / -EAGAIN: not sent and not counted by the kernel either.
    if err == -16 || err == -11 {
        return 0;
    }
    let slot = match sock(sk) {
        // SAFETY: as above.
        Some(p) => unsafe { (*p).slot },
        None if !may_match(sk, true, true) => return 0,
        None => match ends(sk, SCRATCH_RETRANSMIT).and_then(|e| any_slot(&e)) {
            Some((s, _)) => s,
            None => return 0,
        },
    };
    let segs: u16 = rd(skb, off!(skb_gso_segs)).unwrap_or(1);
    count_n(slot, TCP_RETRANS, if segs == 0 { 1 } else { segs as u64 });
    0
}

/// A SYN-ACK sent again (the listener and the request socket).
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn netpulse_retransmit_synack(ctx: BtfTracePointContext) -> i32 {
    let req: u64 = ctx.arg(1);
    if may_match(req, true, false)
        && let Some(slot) = ends(req, SCRATCH_SYNACK).and_then(|e| server_slot(&e))
    {
        count(slot, TCP_RETRANS_SYNACK);
    }
    0
}

/// Every segment received on an established socket: an RTT sample of long
/// connections, at most every `RTT_SAMPLE_NS`.
#[btf_tracepoint(function = "tcp_probe")]
pub fn netpulse_tcp_probe(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let Some(p) = sock(sk) else { return 0 };
    let t = now();
    // SAFETY: as above.
    let st = unsafe { &mut *p };
    if st.flags & SOCK_ESTABLISHED != 0
        && st.flags & SOCK_ENDED == 0
        && t > st.rtt_ns + RTT_SAMPLE_NS
    {
        st.rtt_ns = t;
        sample_rtt(sk, st.slot, H::RttLive);
    }
    0
}

np_map!(
    NP_SYNS = maps::SYNS,
    LruHashMap<SynKey, u64>,
    LruHashMap::with_max_entries(MAX_SYNS, 0)
);

/// A SYN to a local service, seen by an ingress hook: remembered with its
/// time, for the server-side handshake. Called on SYNs only.
#[inline(always)]
pub fn syn_seen(flow: &Flow, slot: u32) {
    if flow.proto != PROTO_TCP
        || flow.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN
        || tcp_slot(slot).is_none()
    {
        return;
    }
    let key = SynKey {
        saddr: flow.src,
        daddr: flow.dst,
        sport: flow.sport,
        dport: flow.dport,
    };
    let _ = NP_SYNS.insert(&key, &now(), 0);
}

/// When the SYN of this (passive) connection arrived, forgotten once read.
#[inline(always)]
fn syn_time(e: &Ends) -> Option<u64> {
    let key = SynKey {
        saddr: e.raddr,
        daddr: e.laddr,
        sport: e.rport,
        dport: e.lport,
    };
    // SAFETY: a plain value.
    let t = unsafe { NP_SYNS.get(&key) }.copied();
    if t.is_some() {
        let _ = NP_SYNS.remove(&key);
    }
    t
}

/// The headers of an skb and the namespace kind of its device (or, with
/// none, of its socket).
#[inline(always)]
fn skb_flow(skb: u64, scratch: u32) -> Option<(Flow, u32)> {
    skb_flow_dev(skb, scratch).map(|(f, n, _)| (f, n))
}

/// [`skb_flow`], and whether the skb was received (came in on an
/// interface) rather than sent by this host.
#[inline(always)]
fn skb_flow_dev(skb: u64, scratch: u32) -> Option<(Flow, u32, bool)> {
    let w = Win::read(skb, scratch);
    let dev: u64 = w.get(off!(skb_dev)).unwrap_or(0);
    let received = rd_u32_or_zero(skb, off!(skb_iif)) != 0;
    let net: u64 = if dev != 0 {
        rd(dev, off!(dev_nd_net))?
    } else {
        let sk: u64 = w.get(off!(skb_sk))?;
        rd(sk, off!(skc_net))?
    };
    let netns = netns_kind(net)?;
    let head: u64 = w.get(off!(skb_head))?;
    let nh: u16 = w.get(off!(skb_network_header))?;
    let proto = u16::from_be(w.get::<u16>(off!(skb_protocol))?);
    let mut flow = Flow::default();
    if nh == 0xffff {
        return Some((flow, netns, received));
    }
    // The headers, in the next scratch buffer (the struct's is `scratch`).
    let buf = NP_SCRATCH.get_ptr_mut(scratch + 1)?;
    // SAFETY: the scratch value is this CPU's; the helper checks the kernel
    // address and zeroes the buffer if the read faults.
    let bytes: &[u8] = unsafe {
        let _ = bpf_probe_read_kernel_buf((head + nh as u64) as *const u8, &mut *buf);
        &*buf
    };
    // A packet this host sends has no `protocol` before the IP output
    // routine sets it (after the output hooks): the IP version says.
    let proto = match proto {
        ETH_P_IP | ETH_P_IPV6 => proto,
        0 => match bytes.first().map(|b| b >> 4) {
            Some(4) => ETH_P_IP,
            Some(6) => ETH_P_IPV6,
            _ => return Some((flow, netns, received)),
        },
        _ => return Some((flow, netns, received)),
    };
    let _ = parse_from(bytes, proto, 0, &mut flow);
    Some((flow, netns, received))
}

/// A packet the kernel dropped, with its reason: the service it belongs
/// to (a local one at either end, then a remote one), else unattributed.
#[btf_tracepoint(function = "kfree_skb")]
pub fn netpulse_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let skb: u64 = ctx.arg(0);
    let reason = ctx.arg::<u64>(2) as u32;
    if reason == 0 || reason == off!(reason_consumed) as u32 {
        return 0;
    }
    let Some((flow, netns, received)) = skb_flow_dev(skb, SCRATCH_KFREE) else {
        return 0;
    };
    let (mut slot, mut dir) = (SLOT_NO_MATCH, DIR_INGRESS);
    if flow.family != 0 {
        if netns == NETNS_HOST {
            (slot, dir) = classify_file(&Maps, &flow);
        } else {
            let (d, s) = if flow.family == FAMILY_V4 {
                (Maps.addr4(flow.dst[0]), Maps.addr4(flow.src[0]))
            } else {
                (Maps.addr6(&flow.dst), Maps.addr6(&flow.src))
            };
            if let Some(d) = d {
                slot = d;
            } else if let Some(s) = s {
                (slot, dir) = (s, DIR_EGRESS);
            }
        }
    }
    if netns == NETNS_HOST && flow.family != 0 {
        watch_drop(&flow, reason, received);
    }
    let key = DropKey {
        slot,
        reason,
        dir: dir as u32,
    };
    match NP_DROPS.get_ptr_mut(&key) {
        Some(p) => add(p, 1),
        None => {
            if NP_DROPS.insert(&key, &1, 0).is_err() {
                meta(META_DROPS_UNRECORDED);
            }
        }
    }
    0
}

// --- The health checks' own flows -----------------------------------------

np_map!(
    NP_WATCH = maps::WATCH,
    PerCpuHashMap<WatchKey, WatchStats>,
    PerCpuHashMap::pinned(MAX_WATCH, 0)
);

/// The record of a watched flow of a health check, if this is one.
#[inline(always)]
fn watched(
    family: u8,
    proto: u8,
    lport: u16,
    raddr: &[u32; 4],
    rport: u16,
) -> Option<*mut WatchStats> {
    let key = WatchKey {
        raddr: *raddr,
        family,
        proto,
        lport,
        rport,
        _pad: 0,
    };
    NP_WATCH.get_ptr_mut(&key)
}

/// A dropped packet of a watched flow: the check's own (its source port is
/// the check's) or its peer's (its destination port is).
#[inline(always)]
fn watch_drop(flow: &Flow, reason: u32, received: bool) {
    let (p, dir) = match watched(flow.family, flow.proto, flow.sport, &flow.dst, flow.dport) {
        Some(p) => (p, WATCH_EGRESS),
        None => match watched(flow.family, flow.proto, flow.dport, &flow.src, flow.sport) {
            Some(p) => (p, WATCH_INGRESS),
            None => return,
        },
    };
    // SAFETY: this CPU's value of the watched flow; written by this
    // program only (the last reason wins).
    unsafe {
        (*p).drops[dir] += 1;
        (*p).reason[dir] = reason;
        if received {
            (*p).received |= 1 << dir;
        }
    }
}

np_programs!(
    netpulse_sock_state = programs::SOCK_STATE,
    netpulse_destroy_sock = programs::DESTROY_SOCK,
    netpulse_receive_reset = programs::RECEIVE_RESET,
    netpulse_send_reset = programs::SEND_RESET,
    netpulse_retransmit = programs::RETRANSMIT,
    netpulse_retransmit_synack = programs::RETRANSMIT_SYNACK,
    netpulse_tcp_probe = programs::TCP_PROBE,
    netpulse_kfree_skb = programs::KFREE_SKB,
);
