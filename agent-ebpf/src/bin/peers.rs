//! Who talks to whom: per service slot and peer, packets, bytes and
//! connections, added on the same hooks that count the service (see
//! `netpulse.rs`, which calls [`count`] after classifying).
//!
//! The peer is the packet's other end in the service's view (the source of
//! what comes in, the destination of what goes out). A named peer (an
//! address the agent wrote into `NP_PEER_NAMES`) has a preallocated place
//! per slot in a per-CPU array: a few array loads to find it, one array
//! add, and nothing else can take its place. Any other address goes to a
//! bounded LRU of (slot, address) and to its (slot, /24 or /48) bucket
//! (an array position its key hashes to), which keeps the total even when
//! the LRU forgets the address; LRU inserts are counted so the agent can
//! report evictions.
//!
//! Every map is per CPU and split by path (receive, transmit), so adds are
//! plain: a program never nests into itself, and the two paths never
//! write the same value (see `SlotCounters` for the same rule).

use agent_ebpf::{parse::Flow, *};
use aya_ebpf::maps::{Array, PerCpuArray};

np_map!(
    NP_PEER_NAMES = peer_maps::NAMES,
    Array<PeerName>,
    Array::pinned(PEER_NAME_POSITIONS, 0)
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
// an entry for each (see `PeerSet`).
np_map!(
    NP_PEER_ADDRS = peer_maps::ADDRS,
    PerCpuArray<PeerSet>,
    PerCpuArray::pinned(2 * PEER_ADDR_SETS, 0)
);
// An array, not a hash map: a bucket's position is computed here, so
// counting into it is an array look-up (see `PeerKey::bucket_position`).
np_map!(
    NP_PEER_BUCKETS = peer_maps::BUCKETS,
    PerCpuArray<PeerBucket>,
    PerCpuArray::pinned(MAX_PEER_BUCKETS, 0)
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

/// Adds to `key`'s way in its LRU set, taking one (CLOCK) if it has
/// none; `true` when it took one.
#[inline(always)]
fn lru_add(key: &PeerKey, a: Add) -> bool {
    let Some(p) = NP_PEER_ADDRS.get_ptr_mut(key.addr_set()) else {
        return false;
    };
    // SAFETY: this CPU's value, in this path's half: no other program
    // writes it while this one runs.
    let s = unsafe { &mut *p };
    for w in 0..PEER_WAYS {
        if s.ways[w].key == *key {
            add(&raw mut s.ways[w].counters, a);
            s.used |= 1 << w;
            return false;
        }
    }
    let mut w = (s.hand as usize) % PEER_WAYS;
    // At most one pass clearing bits, then a way without one.
    for _ in 0..PEER_WAYS {
        if s.ways[w].key.family == 0 || s.used & (1 << w) == 0 {
            break;
        }
        s.used &= !(1 << w);
        w = (w + 1) % PEER_WAYS;
    }
    s.hand = ((w + 1) % PEER_WAYS) as u32;
    s.used &= !(1 << w);
    s.ways[w] = PeerWay {
        key: *key,
        counters: a.value(),
    };
    true
}

/// Adds to `key`'s bucket: at the first of its positions that holds it or
/// is free (then claimed, on this CPU). `false` when all hold others.
#[inline(always)]
fn bucket_add(key: &PeerKey, a: Add) -> bool {
    for probe in 0..PEER_BUCKET_PROBES {
        let Some(p) = NP_PEER_BUCKETS.get_ptr_mut(key.bucket_position(probe)) else {
            return false;
        };
        // SAFETY: this CPU's value; only this path's programs write
        // buckets of this path (the path is part of the key).
        let b = unsafe { &mut *p };
        if b.key.family == 0 {
            b.key = *key;
        } else if b.key != *key {
            continue;
        }
        add(&raw mut b.counters, a);
        return true;
    }
    false
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
    let key = PeerKey {
        slot,
        family: flow.family,
        path: path as u8 & 1,
        _pad: [0; 2],
        addr: if dir == DIR_INGRESS {
            flow.src
        } else {
            flow.dst
        },
    };
    let conns = (dir == DIR_INGRESS && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN) as u64;
    count_peer(
        &key,
        &Add {
            dir,
            packets,
            bytes,
            conns,
        },
    );
}

/// The place of a named address: its positions in the name table, each
/// an array load.
#[inline(always)]
fn named(family: u8, addr: &[u32; 4]) -> Option<u32> {
    for probe in 0..PEER_NAME_PROBES {
        if let Some(n) = NP_PEER_NAMES.get(peer_name_position(family, addr, probe))
            && n.family == u32::from(family)
            && n.place != 0
            && n.addr == *addr
        {
            return Some(n.place);
        }
    }
    None
}

/// Out of line: the programs stay small and the call costs a few ns.
#[inline(never)]
fn count_peer(key: &PeerKey, a: &Add) {
    let (a, path) = (*a, usize::from(key.path));
    if let Some(i) = named(key.family, &key.addr)
        && i < PEER_NAMED
    {
        if let Some(p) = NP_PEERS.get_ptr_mut(peer_place(path, key.slot, i)) {
            add(p, a);
        }
        return;
    }
    if lru_add(key, a) {
        meta(PEER_META_INSERTS, path);
    }
    if !bucket_add(&key.bucket(), a) {
        meta(PEER_META_BUCKETS_FULL, path);
        if let Some(p) = NP_PEERS.get_ptr_mut(peer_place(path, key.slot, PEER_UNBUCKETED)) {
            add(p, a);
        }
    }
}
