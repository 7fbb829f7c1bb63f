//! Who talks to whom: per service slot and peer, packets, bytes and
//! connections, added on the same hooks that count the service (see
//! `netpulse.rs`, which calls [`count`] after classifying).
//!
//! The peer is the packet's other end in the service's view (the source of
//! what comes in, the destination of what goes out). A named peer (an
//! address the agent wrote into `NP_PEER_NAMES4/6`) has a preallocated
//! place per slot in a per-CPU array: one hash look-up and one array add,
//! and nothing else can take its place. Any other address goes to a
//! bounded LRU of (slot, address) and to its (slot, /24 or /48) bucket,
//! which keeps the total even when the LRU forgets the address; LRU
//! inserts are counted so the agent can report evictions.
//!
//! Every map is per CPU and split by path (receive, transmit), so adds are
//! plain: a program never nests into itself, and the two paths never
//! write the same value (see `SlotCounters` for the same rule).

use agent_ebpf::{parse::Flow, *};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    maps::{HashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap},
};

np_map!(
    NP_PEER_NAMES4 = peer_maps::NAMES4,
    HashMap<u32, u32>,
    HashMap::pinned(PEER_NAMED, 0)
);
np_map!(
    NP_PEER_NAMES6 = peer_maps::NAMES6,
    HashMap<[u32; 4], u32>,
    HashMap::pinned(PEER_NAMED, 0)
);
// Per CPU, a row per path (receive: XDP, TC ingress; transmit: TC
// egress): the two paths may nest on a CPU, the programs of one never do,
// so plain adds are safe.
np_map!(
    NP_PEERS = peer_maps::NAMED,
    PerCpuArray<PeerCounters>,
    PerCpuArray::pinned(PEER_PLACES, 0)
);
// Per CPU too, with the path in the key: a pair counted on both paths has
// an entry for each.
np_map!(
    NP_PEER_ADDRS = peer_maps::ADDRS,
    LruPerCpuHashMap<PeerKey, PeerCounters>,
    LruPerCpuHashMap::pinned(MAX_PEER_ADDRS, 0)
);
np_map!(
    NP_PEER_BUCKETS = peer_maps::BUCKETS,
    PerCpuHashMap<PeerKey, PeerCounters>,
    PerCpuHashMap::pinned(MAX_PEER_BUCKETS, 0)
);
np_map!(
    NP_PEER_META = peer_maps::META,
    PerCpuArray<u64>,
    PerCpuArray::pinned(PEER_META_LEN, 0)
);

/// What one packet adds.
#[derive(Clone, Copy)]
struct Add {
    dir: usize,
    packets: u64,
    bytes: u64,
    conns: u64,
}

impl Add {
    #[inline(always)]
    fn value(self) -> PeerCounters {
        let mut v = PeerCounters::default();
        v.packets[self.dir] = self.packets;
        v.bytes[self.dir] = self.bytes;
        v.conns = self.conns;
        v
    }
}

#[inline(always)]
fn meta(what: u32, path: usize) {
    if let Some(p) = NP_PEER_META.get_ptr_mut(what + (path as u32 & 1)) {
        // SAFETY: this CPU's value, this path's index.
        unsafe { *p += 1 };
    }
}

/// Adds to this CPU's value (of this path: no other program writes it
/// while this one runs).
#[inline(always)]
fn add(p: *mut PeerCounters, a: Add) {
    // SAFETY: a per-CPU map value; `a.dir` is 0 or 1.
    unsafe {
        (*p).packets[a.dir] += a.packets;
        (*p).bytes[a.dir] += a.bytes;
        if a.conns != 0 {
            (*p).conns += a.conns;
        }
    }
}

/// Adds to `key`'s entry of a per-CPU hash map, creating it if absent:
/// `Some(true)` when this packet created it, `None` when the map had no
/// room.
#[inline(always)]
fn upsert<M: PeerMap>(map: &M, key: &PeerKey, a: Add) -> Option<bool> {
    if let Some(p) = map.ptr(key) {
        add(p, a);
        return Some(false);
    }
    if map.insert_new(key, &a.value()) {
        return Some(true);
    }
    // Another CPU created it meanwhile (this CPU's value starts at zero),
    // or the map is full.
    add(map.ptr(key)?, a);
    Some(false)
}

trait PeerMap {
    fn ptr(&self, key: &PeerKey) -> Option<*mut PeerCounters>;
    fn insert_new(&self, key: &PeerKey, v: &PeerCounters) -> bool;
}

impl PeerMap for LruPerCpuHashMap<PeerKey, PeerCounters> {
    #[inline(always)]
    fn ptr(&self, key: &PeerKey) -> Option<*mut PeerCounters> {
        self.get_ptr_mut(key)
    }
    #[inline(always)]
    fn insert_new(&self, key: &PeerKey, v: &PeerCounters) -> bool {
        self.insert(key, v, BPF_NOEXIST as u64).is_ok()
    }
}

impl PeerMap for PerCpuHashMap<PeerKey, PeerCounters> {
    #[inline(always)]
    fn ptr(&self, key: &PeerKey) -> Option<*mut PeerCounters> {
        self.get_ptr_mut(key)
    }
    #[inline(always)]
    fn insert_new(&self, key: &PeerKey, v: &PeerCounters) -> bool {
        self.insert(key, v, BPF_NOEXIST as u64).is_ok()
    }
}

/// Counts a classified packet against its peer: `slot` and `dir` as the
/// classifier gave them (the service's view), `path` the hook's
/// (`DIR_INGRESS`: the receive path, `DIR_EGRESS`: the transmit path).
#[inline(always)]
pub fn count(path: usize, slot: u32, dir: usize, flow: &Flow, packets: u64, bytes: u64) {
    if !(FIRST_SERVICE_SLOT..PEER_SLOTS).contains(&slot) {
        return;
    }
    // Only these few fields, by value: handing the whole `Flow` on makes
    // the compiler zero it with a byte-wise memset call at the start of
    // every program run.
    let dir = dir & 1;
    let addr = if dir == DIR_INGRESS {
        flow.src
    } else {
        flow.dst
    };
    let conns = (dir == DIR_INGRESS && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN) as u64;
    count_peer(
        path,
        slot,
        flow.family,
        addr,
        Add {
            dir,
            packets,
            bytes,
            conns,
        },
    );
}

#[inline(never)]
fn count_peer(path: usize, slot: u32, family: u8, addr: [u32; 4], a: Add) {
    // SAFETY (both): plain integers; a concurrent update gives at worst a
    // stale index, still a valid place.
    let named = if family == FAMILY_V4 {
        unsafe { NP_PEER_NAMES4.get(&addr[0]) }
    } else {
        unsafe { NP_PEER_NAMES6.get(&addr) }
    };
    if let Some(i) = named.copied()
        && i < PEER_NAMED
    {
        if let Some(p) = NP_PEERS.get_ptr_mut(peer_place(path, slot, i)) {
            add(p, a);
        }
        return;
    }
    let key = PeerKey {
        slot,
        family,
        path: path as u8 & 1,
        _pad: [0; 2],
        addr,
    };
    if upsert(&NP_PEER_ADDRS, &key, a) == Some(true) {
        meta(PEER_META_INSERTS, path);
    }
    if upsert(&NP_PEER_BUCKETS, &key.bucket(), a).is_none() {
        meta(PEER_META_BUCKETS_FULL, path);
        if let Some(p) = NP_PEERS.get_ptr_mut(peer_place(path, slot, PEER_UNBUCKETED)) {
            add(p, a);
        }
    }
}
