//! The userspace classifier (`packet`: `netpulse analyze` and the pcap
//! backend) against the kernel programs (BPF_PROG_TEST_RUN) on the same
//! frames, through the same service table: every frame must land in the
//! same slot, direction, bytes and TCP flags, on both hooks.

use std::{collections::HashMap, path::Path, time::Instant};

use agent_ebpf::{
    DIR_EGRESS, DIR_INGRESS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, RESERVED_SLOTS,
    SlotCounters,
};
use netpulse::{
    config,
    identity::{self, Identity},
    packet::{self, Flow, Link, Table},
    probe::{Hook, Probe},
};
use netpulse_tests::{
    PinDir,
    frames::{
        self, Ext, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, eth, icmp_echo, ipv4, ipv6, tcp, udp, v6,
    },
    is_root, require,
};

const CONFIG: &str = frames::CLASSIFY_CONFIG;

const LOCAL: [u8; 4] = [10, 0, 0, 1];
const OTHER: [u8; 4] = [10, 0, 0, 2];
const CLIENT: [u8; 4] = [192, 0, 2, 7];
const DB: [u8; 4] = [10, 0, 0, 9];

fn local6() -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[15] = 1;
    a
}

/// Frames both ways of every kind the kernel tests cover: services by
/// address, by wildcard, remote, ICMP, VLAN and QinQ, IPv6 extension
/// headers, fragments, and the unclassifiable.
fn frames() -> Vec<Vec<u8>> {
    let v4 = |vl: &[u16], s, d, proto, payload: &[u8]| {
        eth(vl, frames::ETH_IPV4, &ipv4(s, d, proto, 0, 0, payload))
    };
    let mut out = Vec::new();
    for (a, b) in [
        (CLIENT, LOCAL),
        (LOCAL, CLIENT),
        (CLIENT, OTHER),
        (OTHER, CLIENT),
    ] {
        for vl in [
            &[][..],
            &[frames::ETH_8021Q],
            &[frames::ETH_8021AD, frames::ETH_8021Q],
        ] {
            for flags in [TCP_SYN, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST] {
                out.push(v4(vl, a, b, PROTO_TCP, &tcp(40000, 80, flags, 5, 10)));
                out.push(v4(vl, b, a, PROTO_TCP, &tcp(80, 40000, flags, 8, 100)));
            }
            out.push(v4(vl, a, b, PROTO_UDP, &udp(5353, 53, 30)));
            out.push(v4(vl, b, a, PROTO_UDP, &udp(53, 5353, 300)));
            out.push(v4(vl, a, b, PROTO_ICMP, &icmp_echo(false, 56)));
        }
        // The remote database, from either end.
        out.push(v4(&[], a, DB, PROTO_TCP, &tcp(41000, 5432, TCP_SYN, 5, 0)));
        out.push(v4(&[], DB, a, PROTO_TCP, &tcp(5432, 41000, TCP_ACK, 5, 40)));
        // IPv4 options, a later fragment, a first fragment.
        out.push(eth(
            &[],
            frames::ETH_IPV4,
            &ipv4(a, b, PROTO_TCP, 3, 0, &tcp(40000, 80, TCP_SYN, 5, 0)),
        ));
        out.push(eth(
            &[],
            frames::ETH_IPV4,
            &ipv4(a, b, PROTO_UDP, 0, 185, &udp(53, 53, 8)),
        ));
        out.push(eth(
            &[],
            frames::ETH_IPV4,
            &ipv4(a, b, PROTO_UDP, 0, 0x2000, &udp(5353, 53, 8)),
        ));
    }
    let (l6, c6) = (local6(), v6(7));
    for (a, b) in [(c6, l6), (l6, c6)] {
        for exts in [
            &[][..],
            &[Ext::HopByHop(0)],
            &[Ext::HopByHop(1), Ext::DestOpts(0), Ext::Routing(2)],
            &[Ext::HopByHop(0), Ext::Fragment(0), Ext::DestOpts(3)],
            &[Ext::Fragment(90)],
        ] {
            out.push(eth(
                &[],
                frames::ETH_IPV6,
                &ipv6(a, b, exts, PROTO_TCP, &tcp(40000, 443, TCP_SYN, 5, 20)),
            ));
            out.push(eth(
                &[],
                frames::ETH_IPV6,
                &ipv6(b, a, exts, PROTO_TCP, &tcp(443, 40000, TCP_ACK, 5, 20)),
            ));
            out.push(eth(
                &[],
                frames::ETH_IPV6,
                &ipv6(a, b, exts, PROTO_UDP, &udp(5353, 53, 40)),
            ));
            out.push(eth(
                &[],
                frames::ETH_IPV6,
                &ipv6(a, b, exts, PROTO_ICMPV6, &icmp_echo(true, 8)),
            ));
        }
    }
    // Unclassifiable: ARP, a cut TCP header, a TCP data offset below 5,
    // an IPv4 header length below 5, a cut IPv6 header.
    out.push(eth(&[], frames::ETH_ARP, &[0; 28]));
    out.push(eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(CLIENT, LOCAL, PROTO_TCP, 0, 0, &tcp(1, 80, 0, 5, 0)[..12]),
    ));
    out.push(eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(CLIENT, LOCAL, PROTO_TCP, 0, 0, &tcp(1, 80, 0, 4, 0)),
    ));
    let mut bad_ihl = ipv4(CLIENT, LOCAL, PROTO_UDP, 0, 0, &udp(1, 53, 8));
    bad_ihl[0] = 0x44;
    out.push(eth(&[], frames::ETH_IPV4, &bad_ihl));
    out.push(eth(&[], frames::ETH_IPV6, &[0x60; 20]));
    out
}

/// (slot, direction, packets, bytes, syn, fin, rst) of one counted frame.
type Landing = (u32, usize, u64, u64, u64, u64, u64);

fn landing(before: &[(u32, SlotCounters)], after: &[(u32, SlotCounters)]) -> Vec<Landing> {
    let mut out = Vec::new();
    for ((slot, b), (_, a)) in before.iter().zip(after) {
        for d in 0..2 {
            let (x, y) = (&a.dir[d], &b.dir[d]);
            if x.packets != y.packets {
                out.push((
                    *slot,
                    d,
                    x.packets - y.packets,
                    x.bytes - y.bytes,
                    x.syn - y.syn,
                    x.fin - y.fin,
                    x.rst - y.rst,
                ));
            }
        }
    }
    out
}

#[test]
fn userspace_and_kernel_classify_every_frame_alike() {
    if !require("root (CAP_BPF) for BPF_PROG_TEST_RUN", is_root()) {
        return;
    }
    let pins = PinDir::new("np6-parity");
    let mut probe = Probe::load(pins.path()).expect("load the eBPF object");
    let cfg = config::parse(CONFIG, Path::new("parity.toml")).unwrap();
    let want = identity::desired(&identity::Sources {
        config: &cfg.services,
        listeners: &[],
        owners: &HashMap::new(),
        containers: &[],
        labels: &[],
    });
    let mut id = Identity::restore(&probe, std::time::Duration::from_secs(60)).unwrap();
    id.apply(&mut probe, &want, Instant::now()).unwrap();
    let slots: Vec<u32> = RESERVED_SLOTS
        .iter()
        .map(|(s, _)| *s)
        .chain(id.services().values().map(|s| s.slot))
        .collect();
    let table = Table::with_slots(probe.table().iter().map(|(k, s)| (*k, *s)));
    let snapshot = |p: &Probe| -> Vec<(u32, SlotCounters)> {
        slots.iter().map(|s| (*s, p.counts(*s).unwrap())).collect()
    };
    let all = frames();
    assert!(all.len() > 150);
    let mut compared = 0;
    for f in &all {
        for (hook, dir) in [(Hook::Xdp, DIR_INGRESS), (Hook::Tc, DIR_EGRESS)] {
            let before = snapshot(&probe);
            // BPF_PROG_TEST_RUN builds no skb from a frame shorter than
            // its IP ethertype's header (real TC never sees one): XDP only.
            if let Err(e) = probe.test_run(hook, f, 0, 1) {
                assert_eq!(hook, Hook::Tc, "{e}");
                continue;
            }
            let kernel = landing(&before, &snapshot(&probe));
            let mut flow = Flow::default();
            let (slot, d, flags) = match packet::parse(Link::Ethernet, f, &mut flow) {
                Ok(()) => {
                    let (s, d) = table.classify_hook(&flow, dir);
                    (s, d, flow.tcp_flags)
                }
                Err(s) => (s, dir, 0),
            };
            let ours: Vec<Landing> = vec![(
                slot,
                d,
                1,
                f.len() as u64,
                u64::from(flags & TCP_SYN != 0),
                u64::from(flags & TCP_FIN != 0),
                u64::from(flags & TCP_RST != 0),
            )];
            assert_eq!(kernel, ours, "{hook:?}, frame {:02x?}", f);
            compared += 1;
        }
    }
    assert!(compared >= 2 * all.len() - 2, "{compared}");
}
