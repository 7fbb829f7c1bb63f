//! TCP health from headers alone, for where the tracing programs do not
//! run: `netpulse analyze` (files) and the pcap backend (live). Each TCP
//! segment of a service, with the slot and direction the shared classifier
//! gave it, moves its connection through the handshake and the close, and
//! is checked for a retransmission; the results go into the same figures
//! the kernel programs keep ([`TcpCounters`]).
//!
//! What headers tell, per connection:
//! - **handshake** (µs, into [`TcpCounters::handshake`]): from the client's
//!   SYN (the last one, if it was sent again) to its first segment with
//!   ACK and without SYN (in time order the first such segment either
//!   way), as seen at the capture point: Wireshark's
//!   `tcp.analysis.initial_rtt`, recorded when the connection is
//!   established. Seen at the server it is close to the server's SYN-ACK →
//!   ACK time; at the client, to its connect time.
//! - **established**: the client (the end that sent the SYN) sends a
//!   segment with ACK and without SYN or RST after its SYN. It cannot do
//!   that without having had the SYN-ACK, so a SYN-ACK that was not
//!   captured (or was read after the ACK, by the backend's other thread)
//!   does not matter.
//! - **refused**: an RST from the server answering the SYN, with no
//!   SYN-ACK before it (the answer to a SYN on a closed port).
//! - **reset**: an RST either way after it was established, before it
//!   closed; **closed**: a FIN each way. Either ends it (`ended`, for the
//!   open gauge); so does being evicted from the table while established,
//!   and a new connection on the same ports.
//! - **retransmits**: Wireshark's `tcp.analysis.retransmission` (its
//!   retransmissions, fast retransmissions and spurious retransmissions;
//!   not its out-of-order segments, keep-alives or zero-window probes),
//!   decided the way `tcp_analyze_sequence_number` does: a segment with
//!   data, SYN or FIN whose sequence number is below the highest seen in
//!   its direction. SYN and SYN-ACK retransmissions count. Both directions
//!   count, each into its own figure ([`Sink::retransmit`]).
//!
//! Each direction must be read in order, but the two may be read
//! interleaved any way: the pcap backend reads them with two captures, and
//! one can fall behind the other by a whole connection. So the server's
//! SYN-ACK, FIN or RST read before the client's SYN or ACK still counts
//! (FINs and RSTs are kept until the client's ACK establishes it; a
//! server's answer read before the SYN is tied to it by its
//! acknowledgement number, so an earlier connection's segments on the
//! same ports do not), and the other direction's acknowledgements only
//! tell a retransmission when captured before the segment.
//!
//! Not from headers: RTT samples, connect timeouts, aborts and kernel
//! drops ([`UNAVAILABLE`]). Connections are not followed before their SYN
//! for results (a capture that starts mid-connection counts only its
//! retransmissions).
//!
//! The table is bounded ([`Tracker::new`]): when it is full, finished
//! connections go first, then the least recently seen, in batches, so the
//! cost per segment stays constant; [`Tracker::evicted`] counts them.

use agent_ebpf::{
    DIR_INGRESS, HIST_BOUNDS_US, Hist, TCP_CLOSED, TCP_ENDED, TCP_ESTABLISHED, TCP_FIN,
    TCP_REFUSED, TCP_RESET, TCP_RETRANS, TCP_RST, TCP_SYN, TcpCounters,
};
use rustc_hash::FxHashMap;

use crate::packet::TcpHeader;

const TCP_ACK: u8 = 0x10;

/// The figures headers give (the `TcpCounters` results and fields, by
/// their metric names).
pub const AVAILABLE: &[&str] = &[
    "established",
    "refused",
    "reset",
    "closed",
    "ended",
    "retransmits",
    "handshake",
];

/// The figures only the tracing programs have: left at zero here.
pub const UNAVAILABLE: &[&str] = &["timeout", "aborted", "rtt", "drops"];

/// Connections followed at once by default (as the tracing programs'
/// socket map).
pub const DEFAULT_CAPACITY: usize = agent_ebpf::MAX_SOCKS as usize;

/// Wireshark's out-of-order window when the handshake's RTT is unknown.
const OOO_DEFAULT_US: u64 = 3_000;
/// Wireshark's window for a fast retransmission after duplicate ACKs.
const FAST_RETRANS_US: u64 = 20_000;

/// One TCP segment of a service: when, which connection, and what the
/// classifier said (slot, and direction in the service's view:
/// [`DIR_INGRESS`] is toward the service).
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub ts_us: u64,
    pub slot: u32,
    pub dir: usize,
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub tcp: TcpHeader,
}

impl Segment {
    /// A segment of the parsed `flow`, seen at `ts_us`, of `slot` in
    /// direction `dir` (the service's view).
    pub fn new(
        flow: &crate::packet::Flow,
        ts_us: u64,
        slot: u32,
        dir: usize,
        tcp: TcpHeader,
    ) -> Self {
        Segment {
            ts_us,
            slot,
            dir,
            family: flow.family,
            src: flow.src,
            dst: flow.dst,
            sport: flow.sport,
            dport: flow.dport,
            tcp,
        }
    }
}

/// Where the tracker's findings go.
pub trait Sink {
    /// One more of `TcpCounters::counts[index]` for `slot`.
    fn count(&mut self, slot: u32, index: usize);
    /// A handshake time, µs.
    fn handshake(&mut self, slot: u32, us: u64);
    /// A retransmitted segment going `dir` (service's view).
    fn retransmit(&mut self, slot: u32, dir: usize);
    /// Connections dropped from a full table.
    fn evicted(&mut self, _n: u64) {}
}

/// The connection, keyed from the service's end: (family, service address
/// and port, peer address and port), so both directions find it without a
/// comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    family: u8,
    sport: u16,
    pport: u16,
    service: [u8; 16],
    peer: [u8; 16],
}

/// Wireshark's per-direction sequence analysis state (absolute numbers;
/// 0 is "unknown", as there).
#[derive(Debug, Clone, Copy, Default)]
struct Half {
    nextseq: u32,
    nextseq_ts: u64,
    lastack: u32,
    lastack_ts: u64,
    window: u16,
    dupacks: u32,
}

const SYN_SEEN: u16 = 1;
const ESTABLISHED: u16 = 2;
/// A FIN (an RST) went toward the service ([`DIR_INGRESS`]); the `_OUT`
/// bit is the other way: bit << direction.
const FIN_IN: u16 = 4;
const FIN_OUT: u16 = 8;
const RST_IN: u16 = 16;
const RST_OUT: u16 = 32;
/// A SYN-ACK answering the SYN.
const SYNACK: u16 = 64;
/// Before any SYN: `answer` holds the acknowledgement number of the first
/// SYN-ACK or RST read (the SYN it answers may be read later).
const ANSWER: u16 = 128;
/// A result (refused, reset, closed) was counted.
const DONE: u16 = 256;

#[derive(Debug, Clone, Copy)]
struct Conn {
    slot: u32,
    last_ts: u64,
    /// The most recent SYN (without ACK), µs; 0 = none (Wireshark's
    /// `ts_mru_syn`).
    syn_ts: u64,
    /// The client's ISN, to tell a new connection on the same ports, and
    /// the data its SYN carried (TCP Fast Open): a SYN-ACK or an RST
    /// answering it acknowledges `isn + 1` or `isn + 1 + syn_len`.
    isn: u32,
    syn_len: u32,
    /// See [`ANSWER`].
    answer: u32,
    /// SYN → first ACK (Wireshark's `ts_first_rtt`).
    irtt: Option<u64>,
    state: u16,
    /// The direction the SYN went (the client's), service's view; before
    /// the SYN, the other way from the answer's.
    client: u8,
    half: [Half; 2],
}

impl Conn {
    fn new(slot: u32, ts: u64) -> Conn {
        Conn {
            slot,
            last_ts: ts,
            syn_ts: 0,
            isn: 0,
            syn_len: 0,
            answer: 0,
            irtt: None,
            state: 0,
            client: DIR_INGRESS as u8,
            half: [Half::default(); 2],
        }
    }
}

/// Does `ack` (of a SYN-ACK or an RST) answer a SYN with sequence number
/// `isn` carrying `len` bytes?
#[inline]
fn answers(ack: u32, isn: u32, len: u32) -> bool {
    let next = isn.wrapping_add(1);
    ack == next || ack == next.wrapping_add(len)
}

/// A new connection on the same ports: an established one before it ended.
#[inline]
fn renew(c: &mut Conn, s: &Segment, sink: &mut impl Sink) {
    if c.state & (ESTABLISHED | DONE) == ESTABLISHED {
        sink.count(c.slot, TCP_ENDED);
    }
    *c = Conn::new(s.slot, s.ts_us);
}

#[inline]
fn lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[inline]
fn le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

/// The bounded connection table and the state machine.
pub struct Tracker {
    conns: FxHashMap<Key, Conn>,
    cap: usize,
    evicted: u64,
}

impl Tracker {
    /// A table of at most `cap` connections (at least 16).
    pub fn new(cap: usize) -> Tracker {
        Tracker {
            conns: FxHashMap::default(),
            cap: cap.max(16),
            evicted: 0,
        }
    }

    /// Connections followed now.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Connections dropped because the table was full.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Makes room: finished connections first, then the least recently
    /// seen, down to 3/4 of the cap, so the next sweep is cap/4 inserts
    /// away. An established connection that goes counts as ended.
    fn sweep(&mut self, sink: &mut impl Sink) {
        let before = self.conns.len();
        self.conns.retain(|_, c| c.state & DONE == 0);
        let target = self.cap * 3 / 4;
        if self.conns.len() > target {
            let mut ages: Vec<u64> = self.conns.values().map(|c| c.last_ts).collect();
            let n = self.conns.len() - target;
            let (_, cut, _) = ages.select_nth_unstable(n - 1);
            let cut = *cut;
            let mut left = n;
            self.conns.retain(|_, c| {
                if left > 0 && c.last_ts <= cut {
                    left -= 1;
                    if c.state & ESTABLISHED != 0 {
                        sink.count(c.slot, TCP_ENDED);
                    }
                    false
                } else {
                    true
                }
            });
        }
        let gone = (before - self.conns.len()) as u64;
        self.evicted += gone;
        sink.evicted(gone);
    }

    /// One segment.
    pub fn segment(&mut self, s: &Segment, sink: &mut impl Sink) {
        let key = if s.dir == DIR_INGRESS {
            Key {
                family: s.family,
                sport: s.dport,
                pport: s.sport,
                service: s.dst,
                peer: s.src,
            }
        } else {
            Key {
                family: s.family,
                sport: s.sport,
                pport: s.dport,
                service: s.src,
                peer: s.dst,
            }
        };
        if self.conns.len() >= self.cap && !self.conns.contains_key(&key) {
            self.sweep(sink);
        }
        let c = self
            .conns
            .entry(key)
            .or_insert_with(|| Conn::new(s.slot, s.ts_us));
        step(c, s, sink);
    }
}

/// The state machine and the sequence analysis for one segment.
fn step(c: &mut Conn, s: &Segment, sink: &mut impl Sink) {
    let t = &s.tcp;
    let (ts, dir) = (s.ts_us, s.dir & 1);
    let syn = t.flags & TCP_SYN != 0;
    let ack = t.flags & TCP_ACK != 0;
    let rst = t.flags & TCP_RST != 0;
    let fin = t.flags & TCP_FIN != 0;
    // Which connection the segment is of. Each direction is read in
    // order, but the two may be read interleaved any way (the pcap
    // backend's two captures of an interface): the server's SYN-ACK, data,
    // FIN or RST can come before the client's SYN. So a connection is the
    // client's SYN (its ISN), and the server's answer to it (a SYN-ACK or
    // an RST acknowledging that ISN), whichever is read first; the results
    // below wait for the client's side.
    if syn && !ack {
        let same = if c.state & SYN_SEEN != 0 {
            t.seq == c.isn
        } else {
            c.state & ANSWER != 0
                && dir == usize::from(c.client)
                && answers(c.answer, t.seq, t.payload)
        };
        if !same {
            renew(c, s, sink);
        } else if c.state & SYN_SEEN == 0 {
            // The server's answer and what followed it stay; what went
            // the client's way before its SYN was an earlier connection's.
            c.state &= !((FIN_IN | RST_IN) << dir);
        }
        if c.state & SYN_SEEN == 0 {
            c.state |= SYN_SEEN;
            c.isn = t.seq;
            c.syn_len = t.payload;
            c.client = dir as u8;
        }
        c.syn_ts = ts;
    } else if syn {
        let same = if c.state & SYN_SEEN != 0 {
            answers(t.ack, c.isn, c.syn_len)
        } else {
            c.state & ANSWER != 0 && t.ack == c.answer
        };
        if !same {
            renew(c, s, sink);
        }
        c.state |= SYNACK;
    }
    if c.state & (SYN_SEEN | ANSWER) == 0 && (syn || (rst && ack)) {
        c.state |= ANSWER;
        c.answer = t.ack;
        c.client = (dir ^ 1) as u8;
    }
    c.slot = s.slot;
    c.last_ts = c.last_ts.max(ts);
    if c.state & DONE == 0 {
        if fin {
            c.state |= FIN_IN << dir;
        }
        if rst {
            c.state |= RST_IN << dir;
        }
    }

    // The connection's results.
    let from_client = dir == usize::from(c.client);
    if !syn && ack && from_client && c.syn_ts != 0 && c.irtt.is_none() {
        c.irtt = Some(ts.saturating_sub(c.syn_ts));
    }
    if c.state & (SYN_SEEN | DONE) == SYN_SEEN {
        if c.state & ESTABLISHED == 0 {
            let server_rst = RST_IN << (usize::from(c.client) ^ 1);
            if from_client && ack && !syn && !rst {
                c.state |= ESTABLISHED;
                sink.count(c.slot, TCP_ESTABLISHED);
                if let Some(us) = c.irtt {
                    sink.handshake(c.slot, us);
                }
            } else if c.state & (server_rst | SYNACK) == server_rst {
                // No SYN-ACK before it: the answer to the SYN.
                c.state |= DONE;
                sink.count(c.slot, TCP_REFUSED);
            }
        }
        // An RST or the FINs may have been read before the client's ACK.
        if c.state & ESTABLISHED != 0 {
            if c.state & (RST_IN | RST_OUT) != 0 {
                c.state |= DONE;
                sink.count(c.slot, TCP_RESET);
                sink.count(c.slot, TCP_ENDED);
            } else if c.state & (FIN_IN | FIN_OUT) == FIN_IN | FIN_OUT {
                c.state |= DONE;
                sink.count(c.slot, TCP_CLOSED);
                sink.count(c.slot, TCP_ENDED);
            }
        }
    }

    // Wireshark's tcp_analyze_sequence_number, as far as
    // `tcp.analysis.retransmission` depends on it.
    let (seq, seglen, window) = (t.seq, t.payload, t.window);
    let ooo_us = match c.irtt {
        Some(us) if us != 0 => us,
        _ => OOO_DEFAULT_US,
    };
    let (fwd, rev) = if dir == DIR_INGRESS {
        let [a, b] = &mut c.half;
        (a, &*b)
    } else {
        let [a, b] = &mut c.half;
        (b, &*a)
    };
    let zero_window_probe = seglen == 1 && seq == fwd.nextseq && rev.window == 0;
    // The other direction's acknowledgements count only if captured before
    // this segment: read after it, they may still be earlier in the
    // other capture (this one's reader fell behind), and data they cover
    // is then no spurious retransmission.
    let rev_before = rev.lastack_ts <= ts;
    let mut dupack = false;
    let mut retrans = false;
    if !zero_window_probe {
        let keep_alive = seglen <= 1
            && seq == fwd.nextseq.wrapping_sub(1)
            && t.flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0;
        dupack = seglen == 0
            && window != 0
            && window == fwd.window
            && seq == fwd.nextseq
            && t.ack == fwd.lastack
            && t.flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0;
        if (seglen > 0 || syn || fin) && !keep_alive {
            let mut not_advanced = fwd.nextseq != 0 && lt(seq, fwd.nextseq);
            if seglen > 1 && fwd.nextseq.wrapping_sub(1) == seq {
                not_advanced = false;
            }
            let fast = not_advanced
                && rev_before
                && rev.dupacks >= 2
                && rev.lastack == seq
                && ts.saturating_sub(rev.lastack_ts) < FAST_RETRANS_US;
            let out_of_order = not_advanced
                && ts.saturating_sub(fwd.nextseq_ts) < ooo_us
                && fwd.nextseq != seq.wrapping_add(seglen);
            let spurious = seglen > 0
                && rev_before
                && rev.lastack != 0
                && le(seq.wrapping_add(seglen), rev.lastack);
            retrans = fast || (!out_of_order && (spurious || not_advanced));
        }
    }
    if dupack {
        fwd.dupacks += 1;
    }
    if t.ack != fwd.lastack {
        fwd.dupacks = 0;
    }
    let mut next = seq.wrapping_add(seglen);
    if syn || fin {
        next = next.wrapping_add(1);
    }
    if (lt(fwd.nextseq, next) || fwd.nextseq == 0) && !zero_window_probe {
        fwd.nextseq = next;
        fwd.nextseq_ts = ts;
    }
    fwd.window = window;
    fwd.lastack = t.ack;
    fwd.lastack_ts = ts;
    if retrans {
        sink.count(c.slot, TCP_RETRANS);
        sink.retransmit(c.slot, dir);
    }
}

/// One slot's figures as [`Totals`] keeps them.
#[derive(Debug, Clone, Default)]
pub struct SlotTcp {
    pub tcp: TcpCounters,
    /// Retransmissions by direction (service's view).
    pub retrans: [u64; 2],
    /// Every handshake time, µs, for exact percentiles.
    pub handshakes: Vec<u32>,
}

/// Per-slot figures in memory: `netpulse analyze`'s sink.
#[derive(Debug, Default)]
pub struct Totals {
    pub slots: FxHashMap<u32, SlotTcp>,
    pub evicted: u64,
}

impl Sink for Totals {
    fn count(&mut self, slot: u32, index: usize) {
        if let Some(c) = self
            .slots
            .entry(slot)
            .or_default()
            .tcp
            .counts
            .get_mut(index)
        {
            *c += 1;
        }
    }
    fn handshake(&mut self, slot: u32, us: u64) {
        let s = self.slots.entry(slot).or_default();
        s.tcp.handshake.record(us);
        s.handshakes.push(us.min(u64::from(u32::MAX)) as u32);
    }
    fn retransmit(&mut self, slot: u32, dir: usize) {
        self.slots.entry(slot).or_default().retrans[dir & 1] += 1;
    }
    fn evicted(&mut self, n: u64) {
        self.evicted += n;
    }
}

/// The `q` quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// The `q` quantile of a histogram as the upper bound of its bucket
/// (Prometheus' `le`; `None` past the last bound, or when empty).
pub fn hist_quantile(h: &Hist, q: f64) -> Option<u64> {
    let n = h.count();
    if n == 0 {
        return None;
    }
    let rank = ((q * n as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, b) in h.buckets.iter().enumerate() {
        seen += b;
        if seen >= rank {
            return HIST_BOUNDS_US.get(i).copied();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_ebpf::DIR_EGRESS;

    const SVC: [u8; 16] = [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    const CLI: [u8; 16] = [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    const SLOT: u32 = 9;
    const S: u8 = TCP_SYN;
    const A: u8 = TCP_ACK;
    const F: u8 = TCP_FIN;
    const R: u8 = TCP_RST;

    /// A connection from CLI:port to SVC:80 and the segments sent on it.
    struct Conv {
        t: Tracker,
        sink: Totals,
        port: u16,
    }

    impl Conv {
        fn new() -> Conv {
            Conv {
                t: Tracker::new(1024),
                sink: Totals::default(),
                port: 40000,
            }
        }
        /// A segment at `ts` µs; `to` = toward the service.
        fn seg(&mut self, ts: u64, to: bool, flags: u8, seq: u32, ack: u32, len: u32) {
            let (src, dst, sport, dport, dir) = if to {
                (CLI, SVC, self.port, 80, DIR_INGRESS)
            } else {
                (SVC, CLI, 80, self.port, DIR_EGRESS)
            };
            let s = Segment {
                ts_us: ts,
                slot: SLOT,
                dir,
                family: 4,
                src,
                dst,
                sport,
                dport,
                tcp: TcpHeader {
                    seq,
                    ack,
                    flags,
                    window: 500,
                    payload: len,
                },
            };
            self.t.segment(&s, &mut self.sink);
        }
        fn figures(&self) -> SlotTcp {
            self.sink.slots.get(&SLOT).cloned().unwrap_or_default()
        }
        fn count(&self, i: usize) -> u64 {
            self.figures().tcp.counts[i]
        }
        /// SYN at 1000, SYN-ACK at 1040, ACK at 1100.
        fn handshake(&mut self) {
            self.seg(1000, true, S, 100, 0, 0);
            self.seg(1040, false, S | A, 500, 101, 0);
            self.seg(1100, true, A, 101, 501, 0);
        }
    }

    #[test]
    fn handshake_is_syn_to_the_first_ack_and_counts_established() {
        let mut c = Conv::new();
        c.handshake();
        let f = c.figures();
        assert_eq!(f.tcp.counts[TCP_ESTABLISHED], 1);
        assert_eq!(f.handshakes, vec![100]);
        assert_eq!(f.tcp.handshake.count(), 1);
        assert_eq!(f.tcp.handshake.sum_us, 100);
        assert_eq!(f.tcp.counts[TCP_ENDED], 0);
        // Data and its ACK do not count again.
        c.seg(1200, true, A, 101, 501, 10);
        c.seg(1300, false, A, 501, 111, 0);
        assert_eq!(c.count(TCP_ESTABLISHED), 1);
        assert_eq!(c.count(TCP_RETRANS), 0);
    }

    #[test]
    fn a_retransmitted_syn_counts_and_the_handshake_starts_at_the_last_one() {
        let mut c = Conv::new();
        c.seg(1000, true, S, 100, 0, 0);
        c.seg(1_001_000, true, S, 100, 0, 0);
        c.seg(1_001_050, false, S | A, 500, 101, 0);
        // The SYN-ACK sent again too.
        c.seg(2_001_050, false, S | A, 500, 101, 0);
        c.seg(2_001_080, true, A, 101, 501, 0);
        let f = c.figures();
        assert_eq!(f.retrans, [1, 1]);
        assert_eq!(f.tcp.counts[TCP_RETRANS], 2);
        // Wireshark's iRTT: from the last SYN to the first ACK.
        assert_eq!(f.handshakes, vec![1_000_080]);
    }

    #[test]
    fn an_rst_answering_a_syn_is_refused() {
        let mut c = Conv::new();
        c.seg(1000, true, S, 100, 0, 0);
        c.seg(1010, false, R | A, 0, 101, 0);
        let f = c.figures();
        assert_eq!(f.tcp.counts[TCP_REFUSED], 1);
        assert_eq!(f.tcp.counts[TCP_ESTABLISHED], 0);
        assert_eq!(f.tcp.counts[TCP_ENDED], 0);
        assert!(f.handshakes.is_empty());
    }

    #[test]
    fn an_rst_after_the_handshake_is_a_reset_and_ends_it() {
        for from_client in [true, false] {
            let mut c = Conv::new();
            c.handshake();
            c.seg(2000, true, A, 101, 501, 100);
            let (seq, ack) = if from_client { (201, 501) } else { (501, 201) };
            c.seg(2100, from_client, R | A, seq, ack, 0);
            assert_eq!(c.count(TCP_RESET), 1, "from client: {from_client}");
            assert_eq!(c.count(TCP_ENDED), 1);
            assert_eq!(c.count(TCP_CLOSED), 0);
            // One result per connection.
            c.seg(2200, from_client, R, seq, 0, 0);
            assert_eq!(c.count(TCP_RESET), 1);
        }
    }

    #[test]
    fn a_fin_each_way_closes() {
        let mut c = Conv::new();
        c.handshake();
        c.seg(2000, true, F | A, 101, 501, 0);
        assert_eq!(c.count(TCP_CLOSED), 0);
        c.seg(2010, false, F | A, 501, 102, 0);
        c.seg(2020, true, A, 102, 502, 0);
        assert_eq!(c.count(TCP_CLOSED), 1);
        assert_eq!(c.count(TCP_ENDED), 1);
        // A FIN sent again is a retransmission, not a second close.
        c.seg(300_000, false, F | A, 501, 102, 0);
        assert_eq!(c.count(TCP_CLOSED), 1);
        assert_eq!(c.figures().retrans, [0, 1]);
        // The RST after it is no reset.
        c.seg(300_010, true, R, 102, 0, 0);
        assert_eq!(c.count(TCP_RESET), 0);
    }

    // The pcap backend reads an interface's two directions with two
    // captures: each in order, the two interleaved any way.

    #[test]
    fn the_servers_side_read_before_the_clients_still_closes() {
        let mut c = Conv::new();
        // The server's SYN-ACK, reply and FIN first, as a reader that fell
        // a connection behind leaves them.
        c.seg(1040, false, S | A, 500, 101, 0);
        c.seg(2100, false, A, 501, 201, 100);
        c.seg(2110, false, F | A, 601, 202, 0);
        assert_eq!(c.count(TCP_CLOSED), 0);
        c.seg(1000, true, S, 100, 0, 0);
        c.seg(1100, true, A, 101, 501, 0);
        c.seg(2000, true, A, 101, 501, 100);
        c.seg(2050, true, F | A, 201, 501, 0);
        c.seg(2120, true, A, 202, 602, 0);
        let f = c.figures();
        assert_eq!(f.tcp.counts[TCP_ESTABLISHED], 1);
        assert_eq!(f.tcp.counts[TCP_CLOSED], 1);
        assert_eq!(f.tcp.counts[TCP_ENDED], 1);
        // SYN to the client's ACK, not to the server's segments read
        // in between.
        assert_eq!(f.handshakes, vec![100]);
        // The client's data was acknowledged before it was read: that
        // does not make it a spurious retransmission.
        assert_eq!(f.retrans, [0, 0]);
        assert_eq!(f.tcp.counts[TCP_RETRANS], 0);
    }

    #[test]
    fn the_clients_fin_read_first_closes_with_the_servers() {
        let mut c = Conv::new();
        c.seg(1000, true, S, 100, 0, 0);
        c.seg(1100, true, A, 101, 501, 0);
        c.seg(2000, true, F | A, 101, 501, 0);
        c.seg(1040, false, S | A, 500, 101, 0);
        c.seg(2010, false, F | A, 501, 102, 0);
        assert_eq!(c.count(TCP_CLOSED), 1);
        assert_eq!(c.figures().retrans, [0, 0]);
    }

    #[test]
    fn an_rst_read_before_the_syn_it_answers_is_refused() {
        let mut c = Conv::new();
        c.seg(1010, false, R | A, 0, 101, 0);
        assert_eq!(c.count(TCP_REFUSED), 0);
        c.seg(1000, true, S, 100, 0, 0);
        assert_eq!(c.count(TCP_REFUSED), 1);
        assert_eq!(c.count(TCP_ESTABLISHED), 0);
        // One answering another SYN is not this one's.
        let mut c = Conv::new();
        c.seg(1010, false, R | A, 0, 7001, 0);
        c.seg(1000, true, S, 100, 0, 0);
        assert_eq!(c.count(TCP_REFUSED), 0);
    }

    #[test]
    fn an_rst_after_the_syn_ack_read_before_the_clients_ack_is_a_reset() {
        let mut c = Conv::new();
        c.seg(1000, true, S, 100, 0, 0);
        c.seg(1040, false, S | A, 500, 101, 0);
        c.seg(1200, false, R | A, 501, 101, 0);
        assert_eq!(c.count(TCP_REFUSED), 0);
        c.seg(1100, true, A, 101, 501, 0);
        let f = c.figures();
        assert_eq!(f.tcp.counts[TCP_ESTABLISHED], 1);
        assert_eq!(f.tcp.counts[TCP_RESET], 1);
        assert_eq!(f.tcp.counts[TCP_ENDED], 1);
        assert_eq!(f.tcp.counts[TCP_REFUSED], 0);
    }

    #[test]
    fn an_earlier_connections_fins_do_not_close_the_next() {
        // Caught mid-connection: its FINs, then a new one on the same ports.
        let mut c = Conv::new();
        c.seg(1000, false, F | A, 9000, 8000, 0);
        c.seg(1010, true, F | A, 8000, 9001, 0);
        c.seg(5000, true, S, 100, 0, 0);
        c.seg(5040, false, S | A, 500, 101, 0);
        c.seg(5100, true, A, 101, 501, 0);
        assert_eq!(c.count(TCP_ESTABLISHED), 1);
        assert_eq!(c.count(TCP_CLOSED), 0);
        c.seg(6000, true, F | A, 101, 501, 0);
        assert_eq!(c.count(TCP_CLOSED), 0);
        c.seg(6010, false, F | A, 501, 102, 0);
        assert_eq!(c.count(TCP_CLOSED), 1);
        assert_eq!(c.figures().retrans, [0, 0]);
    }

    #[test]
    fn the_next_connections_server_side_read_before_its_syn() {
        let mut c = Conv::new();
        c.handshake();
        c.seg(2000, true, F | A, 101, 501, 0);
        c.seg(2010, false, F | A, 501, 102, 0);
        assert_eq!(c.count(TCP_CLOSED), 1);
        // The same ports again; the server's side of it read first, while
        // the finished connection is still in the table.
        c.seg(9_040, false, S | A, 7000, 3001, 0);
        c.seg(9_500, false, F | A, 7001, 3002, 0);
        c.seg(9_000, true, S, 3000, 0, 0);
        c.seg(9_070, true, A, 3001, 7001, 0);
        c.seg(9_400, true, F | A, 3001, 7001, 0);
        let f = c.figures();
        assert_eq!(f.tcp.counts[TCP_ESTABLISHED], 2);
        assert_eq!(f.tcp.counts[TCP_CLOSED], 2);
        assert_eq!(f.tcp.counts[TCP_ENDED], 2);
        assert_eq!(f.handshakes, vec![100, 70]);
        assert_eq!(f.retrans, [0, 0]);
    }

    #[test]
    fn retransmissions_as_wireshark_tells_them() {
        let mut c = Conv::new();
        c.handshake();
        // Three segments; the second is sent again 200 ms later (RTO).
        c.seg(2000, true, A, 101, 501, 100);
        c.seg(2001, true, A, 201, 501, 100);
        c.seg(2002, true, A, 301, 501, 100);
        c.seg(202_000, true, A, 201, 501, 100);
        assert_eq!(c.figures().retrans, [1, 0]);
        // Soon after the highest sequence number (under the iRTT of 100 µs)
        // and not ending where it does: out of order, not counted.
        c.seg(202_050, true, A, 401, 501, 100);
        c.seg(202_060, true, A, 301, 501, 50);
        assert_eq!(c.figures().retrans, [1, 0]);
        // New data is not a retransmission; a keep-alive (one byte before
        // the next sequence number) is not one either.
        c.seg(400_000, true, A, 501, 501, 100);
        c.seg(500_000, true, A, 600, 501, 0);
        c.seg(600_000, true, A, 600, 501, 1);
        assert_eq!(c.figures().retrans, [1, 0]);
        // A segment all of whose bytes were acknowledged: spurious, counted.
        c.seg(700_000, false, A, 501, 601, 0);
        c.seg(800_000, true, A, 401, 501, 100);
        assert_eq!(c.figures().retrans, [2, 0]);
        // Fast retransmission: two duplicate ACKs for 601, then 601 again
        // within 20 ms, right after new data (so not out of order first).
        c.seg(900_000, true, A, 601, 501, 100);
        c.seg(900_001, true, A, 701, 501, 100);
        c.seg(900_010, false, A, 501, 601, 0);
        c.seg(900_011, false, A, 501, 601, 0);
        c.seg(900_020, true, A, 601, 501, 100);
        assert_eq!(c.figures().retrans, [3, 0]);
        assert_eq!(c.count(TCP_RETRANS), 3);
    }

    #[test]
    fn a_new_syn_on_the_same_ports_is_a_new_connection() {
        let mut c = Conv::new();
        c.handshake();
        c.seg(5_000_000, true, S, 9_000, 0, 0);
        // The old one ended (the gauge does not leak), no retransmission.
        assert_eq!(c.count(TCP_ENDED), 1);
        assert_eq!(c.count(TCP_RETRANS), 0);
        c.seg(5_000_030, false, S | A, 7_000, 9_001, 0);
        c.seg(5_000_070, true, A, 9_001, 7_001, 0);
        assert_eq!(c.count(TCP_ESTABLISHED), 2);
        assert_eq!(c.figures().handshakes, vec![100, 70]);
    }

    #[test]
    fn the_table_is_bounded_and_counts_what_it_drops() {
        let mut t = Tracker::new(64);
        let mut sink = Totals::default();
        for i in 0..1000u32 {
            let mut src = CLI;
            src[2] = (i >> 8) as u8;
            src[3] = i as u8;
            for (k, flags) in [(0, S), (1, S | A), (2, A)] {
                let to = k != 1;
                let s = Segment {
                    ts_us: u64::from(i) * 1000 + k,
                    slot: SLOT,
                    dir: if to { DIR_INGRESS } else { DIR_EGRESS },
                    family: 4,
                    src: if to { src } else { SVC },
                    dst: if to { SVC } else { src },
                    sport: if to { 1000 } else { 80 },
                    dport: if to { 80 } else { 1000 },
                    tcp: TcpHeader {
                        seq: if to { 1 } else { 5 },
                        ack: if k == 2 {
                            6
                        } else if k == 1 {
                            2
                        } else {
                            0
                        },
                        flags,
                        window: 100,
                        payload: 0,
                    },
                };
                t.segment(&s, &mut sink);
            }
            assert!(t.len() <= 64);
        }
        let f = &sink.slots[&SLOT];
        assert_eq!(f.tcp.counts[TCP_ESTABLISHED], 1000);
        assert!(t.evicted() >= 1000 - 64, "{}", t.evicted());
        assert_eq!(sink.evicted, t.evicted());
        // Evicted established connections ended: the gauge is what is held.
        assert_eq!(
            f.tcp.counts[TCP_ESTABLISHED] - f.tcp.counts[TCP_ENDED],
            t.len() as u64
        );
    }

    #[test]
    fn quantiles() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[5], 0.99), Some(5));
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), Some(50));
        assert_eq!(quantile(&v, 0.99), Some(99));
        let mut h = Hist::default();
        for us in [10, 20, 30, 5_000_000_000] {
            h.record(us);
        }
        assert_eq!(hist_quantile(&h, 0.25), Some(16));
        assert_eq!(hist_quantile(&h, 0.5), Some(32));
        assert_eq!(hist_quantile(&h, 1.0), None);
    }
}
