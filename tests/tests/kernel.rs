//! The kernel programs, run by the real kernel on crafted frames
//! (BPF_PROG_TEST_RUN). Every case checks the verdict (never a drop) and the
//! exact change of every counter slot: the one that should move by exactly
//! this much, and all the others not at all.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::Instant,
};

use agent_ebpf::{
    DIR_EGRESS, DIR_INGRESS, DirCounters, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    RESERVED_SLOTS, SLOT_FRAGMENT, SLOT_MALFORMED, SLOT_NO_MATCH, SLOT_NOT_IP, SlotCounters,
};
use netpulse::{
    config,
    docker::Container,
    identity::{self, Identity},
    probe::{Hook, Probe},
};
use netpulse_tests::{
    PinDir,
    frames::{
        self, Ext, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, eth, icmp_echo, ipv4, ipv6, tcp, udp, v6,
    },
    is_root, require,
};

const XDP_PASS: u32 = 2;
/// TC_ACT_UNSPEC (-1): tcx's "next", so later programs still run.
const TC_NEXT: u32 = u32::MAX;

const LOCAL: [u8; 4] = [10, 0, 0, 1];
const OTHER_LOCAL: [u8; 4] = [10, 0, 0, 2];
const CLIENT: [u8; 4] = [192, 0, 2, 7];
const DB: [u8; 4] = [10, 0, 0, 9];

const CONFIG: &str = frames::CLASSIFY_CONFIG;

struct Fx {
    probe: Probe,
    slots: BTreeMap<String, u32>,
    _pins: PinDir,
}

fn fixture(tag: &str) -> Option<Fx> {
    fixture_with(tag, CONFIG)
}

fn fixture_with(tag: &str, config_text: &str) -> Option<Fx> {
    fixture_full(tag, config_text, &[])
}

fn fixture_full(tag: &str, config_text: &str, containers: &[Container]) -> Option<Fx> {
    if !require("root (CAP_BPF) for BPF_PROG_TEST_RUN", is_root()) {
        return None;
    }
    let pins = PinDir::new(tag);
    let mut probe = Probe::load(pins.path()).expect("load the eBPF object");
    let cfg = config::parse(config_text, Path::new("kernel.toml")).expect("test config");
    let want = identity::desired(&identity::Sources {
        config: &cfg.services,
        listeners: &[],
        owners: &HashMap::new(),
        containers,
        labels: &[],
    });
    let mut id = Identity::restore(&probe, std::time::Duration::from_secs(60)).unwrap();
    id.apply(&mut probe, &want, Instant::now()).unwrap();
    let slots = id
        .services()
        .iter()
        .map(|(n, s)| (n.clone(), s.slot))
        .collect();
    Some(Fx {
        probe,
        slots,
        _pins: pins,
    })
}

impl Fx {
    fn slot(&self, name: &str) -> u32 {
        self.slots[name]
    }

    fn snapshot(&self) -> BTreeMap<u32, SlotCounters> {
        RESERVED_SLOTS
            .iter()
            .map(|(s, _)| *s)
            .chain(self.slots.values().copied())
            .map(|s| (s, self.probe.counts(s).unwrap()))
            .collect()
    }

    /// Runs `frame` through `hook` and returns the slots that changed.
    fn run(&mut self, hook: Hook, frame: &[u8], gso_segs: u32) -> BTreeMap<u32, SlotCounters> {
        self.try_run(hook, frame, gso_segs)
            .unwrap_or_else(|e| panic!("{hook:?} test run: {e}"))
    }

    /// Like `run`, but returns the kernel's refusal to build the test skb.
    fn try_run(
        &mut self,
        hook: Hook,
        frame: &[u8],
        gso_segs: u32,
    ) -> Result<BTreeMap<u32, SlotCounters>, String> {
        let before = self.snapshot();
        let (verdict, _) = self
            .probe
            .test_run(hook, frame, gso_segs, 1)
            .map_err(|e| e.to_string())?;
        let want = match hook {
            Hook::Xdp => XDP_PASS,
            _ => TC_NEXT,
        };
        assert_eq!(verdict, want, "{hook:?} must always pass the packet");
        let after = self.snapshot();
        Ok(after
            .into_iter()
            .filter_map(|(slot, a)| {
                let b = before[&slot];
                let mut d = SlotCounters::default();
                for i in 0..2 {
                    d.dir[i] = DirCounters {
                        packets: a.dir[i].packets - b.dir[i].packets,
                        bytes: a.dir[i].bytes - b.dir[i].bytes,
                        syn: a.dir[i].syn - b.dir[i].syn,
                        fin: a.dir[i].fin - b.dir[i].fin,
                        rst: a.dir[i].rst - b.dir[i].rst,
                    };
                }
                (d != SlotCounters::default()).then_some((slot, d))
            })
            .collect())
    }

    /// Asserts the frame moved exactly one slot by exactly `want`.
    fn expect(
        &mut self,
        hook: Hook,
        frame: &[u8],
        gso: u32,
        slot: u32,
        dir: usize,
        want: DirCounters,
    ) {
        let got = self.run(hook, frame, gso);
        let mut exp = SlotCounters::default();
        exp.dir[dir] = want;
        assert_eq!(
            got,
            BTreeMap::from([(slot, exp)]),
            "{hook:?} frame of {} bytes",
            frame.len()
        );
    }
}

/// BPF_PROG_TEST_RUN will not build an skb (EINVAL) from a frame whose
/// ethertype says IPv4 or IPv6 but which is shorter than that header; real
/// TC egress never sees one either. XDP takes them, and the tests run them
/// there.
fn kernel_refuses_test_skb(f: &[u8]) -> bool {
    let et = [f[12], f[13]];
    (et == frames::ETH_IPV4.to_be_bytes() && f.len() < 14 + 20)
        || (et == frames::ETH_IPV6.to_be_bytes() && f.len() < 14 + 40)
}

fn one(bytes: usize, flags: u8) -> DirCounters {
    DirCounters {
        packets: 1,
        bytes: bytes as u64,
        syn: (flags & TCP_SYN != 0) as u64,
        fin: (flags & TCP_FIN != 0) as u64,
        rst: (flags & TCP_RST != 0) as u64,
    }
}

fn v4_tcp(vlans: &[u16], src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    eth(
        vlans,
        frames::ETH_IPV4,
        &ipv4(src, dst, PROTO_TCP, 0, 0, &tcp(sport, dport, flags, 5, 10)),
    )
}

#[test]
fn ipv4_tcp_both_hooks_and_flags() {
    let Some(mut fx) = fixture("v4tcp") else {
        return;
    };
    let web = fx.slot("web");
    let f = v4_tcp(&[], CLIENT, LOCAL, 40000, 80, TCP_SYN);
    fx.expect(Hook::Xdp, &f, 0, web, DIR_INGRESS, one(f.len(), TCP_SYN));
    let f = v4_tcp(&[], LOCAL, CLIENT, 80, 40000, TCP_SYN | TCP_ACK);
    fx.expect(Hook::Tc, &f, 0, web, DIR_EGRESS, one(f.len(), TCP_SYN));
    let f = v4_tcp(&[], LOCAL, CLIENT, 80, 40000, TCP_FIN | TCP_ACK);
    fx.expect(Hook::Tc, &f, 0, web, DIR_EGRESS, one(f.len(), TCP_FIN));
    let f = v4_tcp(&[], CLIENT, LOCAL, 40000, 80, TCP_RST);
    fx.expect(Hook::Xdp, &f, 0, web, DIR_INGRESS, one(f.len(), TCP_RST));
    // TC ingress (no native XDP) counts as XDP would.
    fx.expect(Hook::TcIn, &f, 0, web, DIR_INGRESS, one(f.len(), TCP_RST));
    // The packet's local end decides: on egress the destination port is the
    // client's, so this is not web's traffic.
    let f = v4_tcp(&[], CLIENT, LOCAL, 40000, 80, TCP_ACK);
    fx.expect(Hook::Tc, &f, 0, SLOT_NO_MATCH, DIR_EGRESS, one(f.len(), 0));
    // Unclaimed packets keep their flags: a SYN to no service is worth seeing.
    let f = v4_tcp(&[], CLIENT, LOCAL, 40000, 80, TCP_SYN);
    fx.expect(
        Hook::Tc,
        &f,
        0,
        SLOT_NO_MATCH,
        DIR_EGRESS,
        one(f.len(), TCP_SYN),
    );
}

#[test]
fn exact_address_wins_over_wildcard() {
    let Some(mut fx) = fixture("exact") else {
        return;
    };
    let (web, any) = (fx.slot("web"), fx.slot("web-any"));
    let f = v4_tcp(&[], CLIENT, LOCAL, 40000, 80, TCP_ACK);
    fx.expect(Hook::Xdp, &f, 0, web, DIR_INGRESS, one(f.len(), 0));
    let f = v4_tcp(&[], CLIENT, OTHER_LOCAL, 40000, 80, TCP_ACK);
    fx.expect(Hook::Xdp, &f, 0, any, DIR_INGRESS, one(f.len(), 0));
}

#[test]
fn ipv4_options_are_skipped() {
    let Some(mut fx) = fixture("v4opt") else {
        return;
    };
    let web = fx.slot("web");
    for words in [1u8, 3, 10] {
        let f = eth(
            &[],
            frames::ETH_IPV4,
            &ipv4(
                CLIENT,
                LOCAL,
                PROTO_TCP,
                words,
                0,
                &tcp(40000, 80, TCP_SYN, 5, 0),
            ),
        );
        fx.expect(Hook::Xdp, &f, 0, web, DIR_INGRESS, one(f.len(), TCP_SYN));
        fx.expect(
            Hook::Tc,
            &f,
            0,
            SLOT_NO_MATCH,
            DIR_EGRESS,
            one(f.len(), TCP_SYN),
        );
    }
    // TCP options too: the flags still come from the fixed header.
    let f = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(
            CLIENT,
            LOCAL,
            PROTO_TCP,
            0,
            0,
            &tcp(40000, 80, TCP_SYN, 15, 0),
        ),
    );
    fx.expect(Hook::Xdp, &f, 0, web, DIR_INGRESS, one(f.len(), TCP_SYN));
}

#[test]
fn vlan_single_and_double_tagged() {
    let Some(mut fx) = fixture("vlan") else {
        return;
    };
    let dns = fx.slot("dns");
    for vlans in [
        &[frames::ETH_8021Q][..],
        &[frames::ETH_8021AD, frames::ETH_8021Q][..],
    ] {
        let f = eth(
            vlans,
            frames::ETH_IPV4,
            &ipv4(CLIENT, LOCAL, PROTO_UDP, 0, 0, &udp(5353, 53, 30)),
        );
        fx.expect(Hook::Xdp, &f, 0, dns, DIR_INGRESS, one(f.len(), 0));
        let f = eth(
            vlans,
            frames::ETH_IPV4,
            &ipv4(LOCAL, CLIENT, PROTO_UDP, 0, 0, &udp(53, 5353, 80)),
        );
        fx.expect(Hook::Tc, &f, 0, dns, DIR_EGRESS, one(f.len(), 0));
        let f = eth(
            vlans,
            frames::ETH_IPV6,
            &ipv6(v6(7), v6(1), &[], PROTO_UDP, &udp(5353, 53, 30)),
        );
        fx.expect(Hook::Xdp, &f, 0, dns, DIR_INGRESS, one(f.len(), 0));
    }
    // Three tags: the third is not unwrapped, so the frame is not IP to us.
    let f = eth(
        &[frames::ETH_8021AD, frames::ETH_8021Q, frames::ETH_8021Q],
        frames::ETH_IPV4,
        &ipv4(CLIENT, LOCAL, PROTO_UDP, 0, 0, &udp(5353, 53, 30)),
    );
    fx.expect(Hook::Xdp, &f, 0, SLOT_NOT_IP, DIR_INGRESS, one(f.len(), 0));
}

#[test]
fn ipv6_with_extension_headers() {
    let Some(mut fx) = fixture("v6ext") else {
        return;
    };
    let (dns, web6) = (fx.slot("dns"), fx.slot("web6"));
    let chains: [&[Ext]; 5] = [
        &[],
        &[Ext::HopByHop(0)],
        &[Ext::HopByHop(1), Ext::DestOpts(0), Ext::Routing(2)],
        &[Ext::HopByHop(0), Ext::Fragment(0), Ext::DestOpts(3)],
        // Six: the most the programs follow.
        &[
            Ext::HopByHop(0),
            Ext::DestOpts(0),
            Ext::Routing(0),
            Ext::Fragment(0),
            Ext::DestOpts(1),
            Ext::Routing(1),
        ],
    ];
    for chain in chains {
        let f = eth(
            &[],
            frames::ETH_IPV6,
            &ipv6(v6(7), v6(1), chain, PROTO_UDP, &udp(5353, 53, 20)),
        );
        fx.expect(Hook::Xdp, &f, 0, dns, DIR_INGRESS, one(f.len(), 0));
        let f = eth(
            &[],
            frames::ETH_IPV6,
            &ipv6(
                v6(1),
                v6(7),
                chain,
                PROTO_TCP,
                &tcp(443, 50000, TCP_RST, 5, 0),
            ),
        );
        fx.expect(Hook::Tc, &f, 0, web6, DIR_EGRESS, one(f.len(), TCP_RST));
    }
}

#[test]
fn icmp_and_icmpv6_by_address() {
    let Some(mut fx) = fixture("icmp") else {
        return;
    };
    let ping = fx.slot("ping");
    let f = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(CLIENT, LOCAL, PROTO_ICMP, 0, 0, &icmp_echo(false, 56)),
    );
    fx.expect(Hook::Xdp, &f, 0, ping, DIR_INGRESS, one(f.len(), 0));
    let f = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(LOCAL, CLIENT, PROTO_ICMP, 0, 0, &icmp_echo(false, 56)),
    );
    fx.expect(Hook::Tc, &f, 0, ping, DIR_EGRESS, one(f.len(), 0));
    let f = eth(
        &[],
        frames::ETH_IPV6,
        &ipv6(v6(7), v6(1), &[], PROTO_ICMPV6, &icmp_echo(true, 56)),
    );
    fx.expect(Hook::Xdp, &f, 0, ping, DIR_INGRESS, one(f.len(), 0));
    // ICMP to another local address is not this service's.
    let f = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(CLIENT, OTHER_LOCAL, PROTO_ICMP, 0, 0, &icmp_echo(false, 56)),
    );
    fx.expect(
        Hook::Xdp,
        &f,
        0,
        SLOT_NO_MATCH,
        DIR_INGRESS,
        one(f.len(), 0),
    );
}

#[test]
fn remote_service_is_matched_by_the_other_end_in_its_own_view() {
    let Some(mut fx) = fixture("remote") else {
        return;
    };
    let db = fx.slot("db");
    // We send a query to the database: toward the service = its ingress.
    let f = v4_tcp(&[], LOCAL, DB, 41000, 5432, TCP_SYN);
    fx.expect(Hook::Tc, &f, 0, db, DIR_INGRESS, one(f.len(), TCP_SYN));
    // Its answer arrives on XDP: from the service = its egress.
    let f = v4_tcp(&[], DB, LOCAL, 5432, 41000, TCP_SYN | TCP_ACK);
    fx.expect(Hook::Xdp, &f, 0, db, DIR_EGRESS, one(f.len(), TCP_SYN));
}

fn config_only(services: &[config::Service]) -> identity::Desired {
    identity::desired(&identity::Sources {
        config: services,
        listeners: &[],
        owners: &HashMap::new(),
        containers: &[],
        labels: &[],
    })
}

const CT_WEB: [u8; 4] = [172, 17, 0, 2];
const CT_OTHER: [u8; 4] = [172, 17, 0, 3];

fn ct(id: &str, name: &str, addrs: &[&str]) -> Container {
    Container {
        id: id.into(),
        name: name.into(),
        image: "busybox".into(),
        labels: Default::default(),
        host_network: false,
        addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        published: Vec::new(),
        veths: Vec::new(),
        netns: None,
    }
}

/// On a container's host-side veth only the container's end counts: all
/// of its traffic (server and client alike) is the container's, a config
/// service on its address and port comes first, and nothing is counted for
/// host or remote services (their interfaces count those), so a packet
/// between two containers is counted once for each.
#[test]
fn container_veth_programs_count_only_the_container_behind_them() {
    let config = format!(
        "{CONFIG}\n[[service]]\nname = \"pg-in-ct\"\nendpoints = [{{ proto = \"tcp\", port = 5432, addr = \"172.17.0.2\" }}]\n"
    );
    let Some(mut fx) = fixture_full(
        "ct",
        &config,
        &[
            ct("a", "web-ct", &["172.17.0.2", "fd00:c::2"]),
            ct("b", "other-ct", &["172.17.0.3"]),
        ],
    ) else {
        return;
    };
    let (web, other, pg) = (fx.slot("web-ct"), fx.slot("other-ct"), fx.slot("pg-in-ct"));
    // A request to the container, and its answer.
    let f = v4_tcp(&[], CLIENT, CT_WEB, 40000, 80, TCP_SYN);
    fx.expect(Hook::CtTo, &f, 0, web, DIR_INGRESS, one(f.len(), TCP_SYN));
    let f = v4_tcp(&[], CT_WEB, CLIENT, 80, 40000, TCP_SYN | TCP_ACK);
    fx.expect(Hook::CtFrom, &f, 0, web, DIR_EGRESS, one(f.len(), TCP_SYN));
    // The container as a client, to a port a host wildcard service (web-any)
    // and a remote service (db) use: still the container's.
    let f = v4_tcp(&[], CT_WEB, CLIENT, 41000, 80, TCP_SYN);
    fx.expect(Hook::CtFrom, &f, 0, web, DIR_EGRESS, one(f.len(), TCP_SYN));
    let f = v4_tcp(&[], CT_WEB, DB, 41000, 5432, TCP_SYN);
    fx.expect(Hook::CtFrom, &f, 0, web, DIR_EGRESS, one(f.len(), TCP_SYN));
    // A configured service on the container's address and port wins.
    let f = v4_tcp(&[], CT_OTHER, CT_WEB, 41000, 5432, TCP_SYN);
    fx.expect(Hook::CtTo, &f, 0, pg, DIR_INGRESS, one(f.len(), TCP_SYN));
    // Container to container: each veth counts its own container.
    let f = v4_tcp(&[], CT_OTHER, CT_WEB, 41001, 80, TCP_ACK);
    fx.expect(Hook::CtFrom, &f, 0, other, DIR_EGRESS, one(f.len(), 0));
    fx.expect(Hook::CtTo, &f, 0, web, DIR_INGRESS, one(f.len(), 0));
    // IPv6, by address, whatever the protocol.
    let f = eth(
        &[],
        frames::ETH_IPV6,
        &ipv6(
            v6(7),
            [0xfd, 0, 0, 0xc, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            &[],
            PROTO_ICMPV6,
            &icmp_echo(true, 56),
        ),
    );
    fx.expect(Hook::CtTo, &f, 0, web, DIR_INGRESS, one(f.len(), 0));
    // A GSO skb from the container counts its segments.
    let f = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(
            CT_WEB,
            CLIENT,
            PROTO_TCP,
            0,
            0,
            &tcp(80, 40000, TCP_ACK, 5, 3 * 500),
        ),
    );
    fx.expect(
        Hook::CtFrom,
        &f,
        3,
        web,
        DIR_EGRESS,
        DirCounters {
            packets: 3,
            bytes: (f.len() + 2 * (14 + 20 + 20)) as u64,
            ..Default::default()
        },
    );
    // An address no container has (one just starting, say): unclassified,
    // in the host's view (arriving from the veth = ingress).
    let f = v4_tcp(&[], [172, 17, 0, 99], CLIENT, 80, 40000, TCP_ACK);
    fx.expect(
        Hook::CtFrom,
        &f,
        0,
        SLOT_NO_MATCH,
        DIR_INGRESS,
        one(f.len(), 0),
    );
    let f = v4_tcp(&[], CLIENT, [172, 17, 0, 99], 40000, 80, TCP_ACK);
    fx.expect(
        Hook::CtTo,
        &f,
        0,
        SLOT_NO_MATCH,
        DIR_EGRESS,
        one(f.len(), 0),
    );
    // ARP from the container.
    let f = eth(&[], frames::ETH_ARP, &[0u8; 28]);
    fx.expect(
        Hook::CtFrom,
        &f,
        0,
        SLOT_NOT_IP,
        DIR_INGRESS,
        one(f.len(), 0),
    );
    // The host programs never count for a container: its address is seen
    // there only if routed past NAT, and then the veth counts it.
    let f = v4_tcp(&[], CLIENT, CT_WEB, 40000, 9999, TCP_ACK);
    fx.expect(
        Hook::Xdp,
        &f,
        0,
        SLOT_NO_MATCH,
        DIR_INGRESS,
        one(f.len(), 0),
    );
}

/// A container's veth in the table: everything on it is the container's,
/// whatever the address (a link-local one, one Docker has not listed), by
/// an array look-up. BPF_PROG_TEST_RUN runs on lo, ifindex 1.
#[test]
fn a_containers_veth_claims_all_its_traffic() {
    let mut c = ct("v", "veth-ct", &["172.17.0.7"]);
    c.veths = vec![1];
    let Some(mut fx) = fixture_full("veth", CONFIG, &[c]) else {
        return;
    };
    let slot = fx.slot("veth-ct");
    let f = v4_tcp(&[], [172, 17, 0, 99], CLIENT, 80, 40000, TCP_ACK);
    fx.expect(Hook::CtFrom, &f, 0, slot, DIR_EGRESS, one(f.len(), 0));
    let f = eth(
        &[],
        frames::ETH_IPV6,
        &ipv6(v6(7), v6(9), &[], PROTO_ICMPV6, &icmp_echo(true, 56)),
    );
    fx.expect(Hook::CtTo, &f, 0, slot, DIR_INGRESS, one(f.len(), 0));
    // Multicast the host sends down every veth (neighbour discovery) is
    // not the container's.
    let mut all_nodes = [0u8; 16];
    all_nodes[0] = 0xff;
    all_nodes[1] = 0x02;
    all_nodes[15] = 1;
    let f = eth(
        &[],
        frames::ETH_IPV6,
        &ipv6(v6(7), all_nodes, &[], PROTO_ICMPV6, &icmp_echo(true, 8)),
    );
    fx.expect(
        Hook::CtTo,
        &f,
        0,
        SLOT_NO_MATCH,
        DIR_EGRESS,
        one(f.len(), 0),
    );
    // Not IP is still not IP.
    let f = eth(&[], frames::ETH_ARP, &[0u8; 28]);
    fx.expect(
        Hook::CtFrom,
        &f,
        0,
        SLOT_NOT_IP,
        DIR_INGRESS,
        one(f.len(), 0),
    );
}

#[test]
fn gso_skb_counts_its_segments_and_their_headers() {
    let Some(mut fx) = fixture("gso") else { return };
    let web = fx.slot("web");
    let f = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(
            LOCAL,
            CLIENT,
            PROTO_TCP,
            0,
            0,
            &tcp(80, 40000, TCP_ACK, 8, 4 * 700),
        ),
    );
    let hdr = 14 + 20 + 32;
    fx.expect(
        Hook::Tc,
        &f,
        4,
        web,
        DIR_EGRESS,
        DirCounters {
            packets: 4,
            bytes: (f.len() + 3 * hdr) as u64,
            ..Default::default()
        },
    );
    // Test skbs are at most a page, so the segments here are small; the
    // arithmetic is the same for 64 KiB super-packets.
    // gso_segs of 1 is a plain packet.
    fx.expect(Hook::Tc, &f, 1, web, DIR_EGRESS, one(f.len(), 0));
}

#[test]
fn unclassifiable_frames_land_in_their_reserved_slot() {
    let Some(mut fx) = fixture("reserved") else {
        return;
    };
    // No service on this port.
    let f = v4_tcp(&[], CLIENT, LOCAL, 40000, 81, TCP_SYN);
    fx.expect(
        Hook::Xdp,
        &f,
        0,
        SLOT_NO_MATCH,
        DIR_INGRESS,
        one(f.len(), TCP_SYN),
    );
    // ARP is not IP.
    let f = eth(&[], frames::ETH_ARP, &[0u8; 28]);
    fx.expect(Hook::Xdp, &f, 0, SLOT_NOT_IP, DIR_INGRESS, one(f.len(), 0));
    fx.expect(Hook::Tc, &f, 0, SLOT_NOT_IP, DIR_EGRESS, one(f.len(), 0));
    // Non-first fragments carry no ports.
    let f = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(CLIENT, LOCAL, PROTO_TCP, 0, 185, &[0u8; 40]),
    );
    fx.expect(
        Hook::Xdp,
        &f,
        0,
        SLOT_FRAGMENT,
        DIR_INGRESS,
        one(f.len(), 0),
    );
    let f = eth(
        &[],
        frames::ETH_IPV6,
        &ipv6(v6(7), v6(1), &[Ext::Fragment(100)], PROTO_UDP, &[0u8; 40]),
    );
    fx.expect(
        Hook::Xdp,
        &f,
        0,
        SLOT_FRAGMENT,
        DIR_INGRESS,
        one(f.len(), 0),
    );
}

#[test]
fn malformed_frames_are_counted_never_dropped() {
    let Some(mut fx) = fixture("malformed") else {
        return;
    };
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    // Truncated at (and one byte short of) every header boundary of a
    // VLAN / IPv4 / TCP frame and of an IPv6 / UDP frame.
    let v4 = v4_tcp(&[frames::ETH_8021Q], CLIENT, LOCAL, 40000, 80, TCP_SYN);
    for cut in [14, 17, 18, 18 + 19, 18 + 20, 18 + 20 + 19] {
        cases.push((format!("vlan/ipv4/tcp cut at {cut}"), v4[..cut].to_vec()));
    }
    let v6f = eth(
        &[],
        frames::ETH_IPV6,
        &ipv6(
            v6(7),
            v6(1),
            &[Ext::HopByHop(1)],
            PROTO_UDP,
            &udp(5353, 53, 0),
        ),
    );
    for cut in [
        14,
        14 + 39,
        14 + 40,
        14 + 40 + 15,
        14 + 40 + 16,
        14 + 40 + 16 + 7,
    ] {
        cases.push((format!("ipv6/hbh/udp cut at {cut}"), v6f[..cut].to_vec()));
    }
    // IHL < 5.
    let mut bad_ihl = v4_tcp(&[], CLIENT, LOCAL, 40000, 80, TCP_SYN);
    bad_ihl[14] = 0x44;
    cases.push(("IHL 4".into(), bad_ihl));
    // IHL pointing past the end of the frame.
    let mut long_ihl = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(CLIENT, LOCAL, PROTO_TCP, 0, 0, &[0u8; 8]),
    );
    long_ihl[14] = 0x4f;
    cases.push(("IHL 15 on a short frame".into(), long_ihl));
    // Version nibble that is not 4.
    let mut bad_ver = v4_tcp(&[], CLIENT, LOCAL, 40000, 80, TCP_SYN);
    bad_ver[14] = 0x65;
    cases.push(("version 6 in an IPv4 ethertype".into(), bad_ver));
    // TCP data offset < 5.
    cases.push((
        "TCP doff 3".into(),
        eth(
            &[],
            frames::ETH_IPV4,
            &ipv4(
                CLIENT,
                LOCAL,
                PROTO_TCP,
                0,
                0,
                &tcp(40000, 80, TCP_SYN, 3, 0),
            ),
        ),
    ));
    // An IPv6 extension-header chain longer than the bound (a loop of
    // hop-by-hop headers, each pointing at the next).
    let hbh: Vec<Ext> = vec![Ext::HopByHop(0); 12];
    cases.push((
        "IPv6 chain of 12 hop-by-hop headers".into(),
        eth(
            &[],
            frames::ETH_IPV6,
            &ipv6(v6(7), v6(1), &hbh, PROTO_UDP, &udp(5353, 53, 0)),
        ),
    ));
    // An extension header whose length runs past the frame.
    let long_rt = eth(
        &[],
        frames::ETH_IPV6,
        &ipv6(v6(7), v6(1), &[Ext::Routing(255)], PROTO_UDP, &[]),
    );
    cases.push((
        "IPv6 routing header longer than the frame".into(),
        long_rt[..14 + 40 + 16].to_vec(),
    ));
    for (what, f) in cases {
        let got = fx.run(Hook::Xdp, &f, 0);
        let mut exp = SlotCounters::default();
        exp.dir[DIR_INGRESS] = one(f.len(), 0);
        assert_eq!(got, BTreeMap::from([(SLOT_MALFORMED, exp)]), "XDP: {what}");
        let got = match fx.try_run(Hook::Tc, &f, 0) {
            Ok(got) => got,
            // The XDP run above covered what the kernel will not build a
            // test skb for. Any other refusal is a failure.
            Err(e) if kernel_refuses_test_skb(&f) => {
                eprintln!("TC: {what}: kernel refused the test skb: {e}");
                continue;
            }
            Err(e) => panic!("TC: {what}: {e}"),
        };
        let mut exp = SlotCounters::default();
        exp.dir[DIR_EGRESS] = one(f.len(), 0);
        assert_eq!(got, BTreeMap::from([(SLOT_MALFORMED, exp)]), "TC: {what}");
    }
}

#[test]
fn counters_continue_across_a_reload_from_pins() {
    let Some(mut fx) = fixture("pins") else {
        return;
    };
    let web = fx.slot("web");
    let f = v4_tcp(&[], CLIENT, LOCAL, 40000, 80, TCP_SYN);
    for _ in 0..3 {
        fx.probe.test_run(Hook::Xdp, &f, 0, 1).unwrap();
    }
    let pin_root = fx._pins.path().to_path_buf();
    // A second agent on the same pins: same slots by name, same counts.
    let again = Probe::load(&pin_root).unwrap();
    let id = Identity::restore(&again, std::time::Duration::from_secs(60)).unwrap();
    assert_eq!(id.services()["web"].slot, web);
    assert_eq!(again.counts(web).unwrap().dir[DIR_INGRESS].packets, 3);
}

#[test]
fn a_vanished_service_keeps_its_counts_for_the_grace_period_then_frees_its_slot() {
    let Some(fx) = fixture("retire") else { return };
    let Fx {
        mut probe, slots, ..
    } = fx;
    let web = slots["web"];
    let f = v4_tcp(&[], CLIENT, LOCAL, 40000, 80, TCP_SYN);
    probe.test_run(Hook::Xdp, &f, 0, 1).unwrap();

    let grace = std::time::Duration::from_secs(60);
    let mut id = Identity::restore(&probe, grace).unwrap();
    let cfg = config::parse(CONFIG, Path::new("kernel.toml")).unwrap();
    let all = config_only(&cfg.services);
    let t0 = Instant::now();
    id.apply(&mut probe, &all, t0).unwrap();
    // "web" goes away: its endpoint leaves the table at once...
    let without: Vec<_> = cfg
        .services
        .iter()
        .filter(|s| s.name != "web")
        .cloned()
        .collect();
    let less = config_only(&without);
    id.apply(&mut probe, &less, t0).unwrap();
    assert!(!probe.table().values().any(|s| *s == web));
    // ...but its counts stay readable through the grace period.
    id.apply(&mut probe, &less, t0 + grace / 2).unwrap();
    assert_eq!(id.services()["web"].slot, web);
    assert!(id.services()["web"].retired_at.is_some());
    assert_eq!(probe.counts(web).unwrap().dir[DIR_INGRESS].packets, 1);
    // After it, the slot is free and a new service starts from zero in it.
    id.apply(&mut probe, &less, t0 + grace).unwrap();
    assert!(!id.services().contains_key("web"));
    let newcomer = config::parse(
        "[[service]]\nname = \"newcomer\"\nendpoints = [{ proto = \"tcp\", port = 8080 }]\n",
        Path::new("n.toml"),
    )
    .unwrap();
    let mut with_new = without.clone();
    with_new.extend(newcomer.services);
    let next = config_only(&with_new);
    id.apply(&mut probe, &next, t0 + grace).unwrap();
    assert_eq!(
        id.services()["newcomer"].slot,
        web,
        "the freed slot is reused"
    );
    assert_eq!(probe.counts(web).unwrap(), SlotCounters::default());
    // And a restarted agent knows the slot by its new name.
    assert_eq!(
        probe.slot_names().unwrap().get(&web).map(String::as_str),
        Some("newcomer")
    );
}

#[test]
fn random_and_mutated_frames_always_pass_and_every_one_is_counted_once() {
    let Some(mut fx) = fixture("property") else {
        return;
    };
    let total = |fx: &Fx| -> u64 {
        fx.snapshot()
            .values()
            .map(|c| c.dir[0].packets + c.dir[1].packets)
            .sum()
    };
    let valid = [
        v4_tcp(&[], CLIENT, LOCAL, 40000, 80, TCP_SYN),
        v4_tcp(
            &[frames::ETH_8021AD, frames::ETH_8021Q],
            LOCAL,
            DB,
            41000,
            5432,
            TCP_ACK,
        ),
        eth(
            &[],
            frames::ETH_IPV6,
            &ipv6(
                v6(7),
                v6(1),
                &[Ext::HopByHop(1), Ext::Fragment(0)],
                PROTO_UDP,
                &udp(5353, 53, 40),
            ),
        ),
        eth(
            &[],
            frames::ETH_IPV4,
            &ipv4(CLIENT, LOCAL, PROTO_ICMP, 2, 0, &icmp_echo(false, 56)),
        ),
    ];
    let mut rng = netpulse_tests::Rng(0x005e_ed0f_0e7a_u64);
    let before = total(&fx);
    let mut runs = 0u64;
    for i in 0..4000 {
        let frame: Vec<u8> = if i % 2 == 0 {
            // Random bytes, but with an IP ethertype half the time so the
            // parser goes deep.
            let len = 14 + rng.below(300);
            let mut f: Vec<u8> = (0..len).map(|_| rng.u64() as u8).collect();
            if rng.below(2) == 0 {
                let t = [frames::ETH_IPV4, frames::ETH_IPV6, frames::ETH_8021Q][rng.below(3)];
                f[12..14].copy_from_slice(&t.to_be_bytes());
            }
            f
        } else {
            // A valid frame with a few bytes flipped, cut or extended.
            let mut f = valid[rng.below(valid.len())].clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(f.len());
                f[at] = rng.u64() as u8;
            }
            match rng.below(3) {
                0 => f.truncate(14.max(rng.below(f.len() + 1))),
                1 => f.extend((0..rng.below(64)).map(|_| rng.u64() as u8)),
                _ => {}
            }
            f
        };
        for hook in [Hook::Xdp, Hook::Tc, Hook::TcIn, Hook::CtFrom, Hook::CtTo] {
            match fx.probe.test_run(hook, &frame, 0, 1) {
                Ok((verdict, _)) => {
                    let pass = if hook == Hook::Xdp { XDP_PASS } else { TC_NEXT };
                    assert_eq!(verdict, pass, "{hook:?} frame #{i}: {frame:02x?}");
                    runs += 1;
                }
                Err(_) if hook != Hook::Xdp && kernel_refuses_test_skb(&frame) => {}
                Err(e) => panic!("{hook:?} frame #{i}: {e}: {frame:02x?}"),
            }
        }
    }
    assert!(runs > 17500, "too few runs: {runs}");
    assert_eq!(total(&fx) - before, runs, "counted packets != packets run");
}

#[test]
fn address_groups_and_their_overflow_to_the_hash_table_classify_alike() {
    // Four IPv4 addresses on a port fit its group; eight do not and go to
    // the hash table; likewise two and three IPv6 addresses.
    let text = r#"
[[service]]
name = "four"
endpoints = [{ proto = "tcp", port = 9090, addr = "10.2.0.0/30" }]
[[service]]
name = "eight"
endpoints = [{ proto = "tcp", port = 8080, addr = "10.1.0.0/29" }]
[[service]]
name = "two6"
endpoints = [{ proto = "udp", port = 53, addr = "fd00::/127" }]
[[service]]
name = "three6"
endpoints = [{ proto = "udp", port = 54, addr = "fd00::10" }, { proto = "udp", port = 54, addr = "fd00::11" }, { proto = "udp", port = 54, addr = "fd00::12" }]
[[service]]
name = "any8080"
endpoints = [{ proto = "tcp", port = 8080 }]
"#;
    let Some(mut fx) = fixture_with("groups", text) else {
        return;
    };
    for (name, port, last) in [("four", 9090, 0..4u8), ("eight", 8080, 0..8u8)] {
        let slot = fx.slot(name);
        let base = if name == "four" {
            [10, 2, 0, 0]
        } else {
            [10, 1, 0, 0]
        };
        for l in last {
            let mut dst = base;
            dst[3] = l;
            let f = v4_tcp(&[], CLIENT, dst, 40000, port, TCP_SYN);
            fx.expect(Hook::Xdp, &f, 0, slot, DIR_INGRESS, one(f.len(), TCP_SYN));
            let f = v4_tcp(&[], dst, CLIENT, port, 40000, TCP_ACK);
            fx.expect(Hook::Tc, &f, 0, slot, DIR_EGRESS, one(f.len(), 0));
        }
    }
    // An address on the port outside the group falls to the wildcard
    // service, or to no one.
    let f = v4_tcp(&[], CLIENT, [10, 1, 0, 9], 40000, 8080, TCP_SYN);
    let any = fx.slot("any8080");
    fx.expect(Hook::Xdp, &f, 0, any, DIR_INGRESS, one(f.len(), TCP_SYN));
    let f = v4_tcp(&[], CLIENT, [10, 2, 0, 9], 40000, 9090, TCP_SYN);
    fx.expect(
        Hook::Xdp,
        &f,
        0,
        SLOT_NO_MATCH,
        DIR_INGRESS,
        one(f.len(), TCP_SYN),
    );
    for (name, port, lasts) in [
        ("two6", 53u16, &[0u8, 1][..]),
        ("three6", 54, &[0x10, 0x11, 0x12][..]),
    ] {
        let slot = fx.slot(name);
        for l in lasts {
            let f = eth(
                &[],
                frames::ETH_IPV6,
                &ipv6(v6(0x77), v6(*l), &[], PROTO_UDP, &udp(5000, port, 8)),
            );
            fx.expect(Hook::Xdp, &f, 0, slot, DIR_INGRESS, one(f.len(), 0));
        }
    }
    let f = eth(
        &[],
        frames::ETH_IPV6,
        &ipv6(v6(0x77), v6(0x13), &[], PROTO_UDP, &udp(5000, 54, 8)),
    );
    fx.expect(
        Hook::Xdp,
        &f,
        0,
        SLOT_NO_MATCH,
        DIR_INGRESS,
        one(f.len(), 0),
    );
}
