//! Any bytes as an Ethernet frame for the kernel programs' own parser and
//! classifier (`agent_ebpf::parse`, `agent_ebpf::classify`: the code the
//! eBPF programs run), here over a byte slice. Every read stays inside a
//! header the parser bounds-checked (the slice's indexing panics
//! otherwise, where the kernel would read unchecked memory); a frame that
//! parses is IP, its headers inside the frame; one that does not goes to a
//! reserved slot; every hook's classification lands on a slot the table
//! has, in a direction there is; and `packet::parse` (the agent's wrapper)
//! agrees.
#![no_main]

use std::{collections::BTreeMap, sync::LazyLock};

use agent_ebpf::{
    ETH_HLEN, EndpointKey, FAMILY_V4, FAMILY_V6, FIRST_SERVICE_SLOT, Group4, Group6, Key4, Key6,
    MAX_HDR_OFF, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ROLE_LOCAL, ROLE_REMOTE,
    SLOT_FRAGMENT, SLOT_MALFORMED, SLOT_NO_MATCH, SLOT_NOT_IP,
    classify::{self, ContainerTables, Tables},
    parse::{self, Flow},
};
use libfuzzer_sys::fuzz_target;
use netpulse::packet::{self, Link, Table};

/// Endpoints that use every part of the layout: a wildcard service, an
/// IPv4 and an IPv6 address group, ports with more addresses than a group
/// holds (the hash tables), remote services at an address and at any.
fn endpoints() -> BTreeMap<EndpointKey, String> {
    let mut eps = BTreeMap::new();
    let mut add = |family, proto, port, role, addr: &[u8], name: &str| {
        let mut k = EndpointKey {
            family,
            proto,
            port,
            role,
            ..Default::default()
        };
        k.set_addr(addr);
        eps.insert(k, name.to_string());
    };
    add(FAMILY_V4, PROTO_TCP, 80, ROLE_LOCAL, &[0; 4], "web");
    add(FAMILY_V6, PROTO_TCP, 80, ROLE_LOCAL, &[0; 16], "web");
    add(FAMILY_V4, PROTO_ICMP, 0, ROLE_LOCAL, &[0; 4], "ping");
    for i in 1..=3 {
        add(FAMILY_V4, PROTO_TCP, 443, ROLE_LOCAL, &[10, 0, 0, i], "tls");
        add(
            FAMILY_V6,
            PROTO_UDP,
            53,
            ROLE_LOCAL,
            &[0xfd, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            "dns",
        );
    }
    for i in 1..=6 {
        add(FAMILY_V4, PROTO_UDP, 53, ROLE_LOCAL, &[10, 0, 1, i], "dns");
    }
    add(
        FAMILY_V4,
        PROTO_TCP,
        5432,
        ROLE_REMOTE,
        &[10, 0, 0, 9],
        "db",
    );
    add(FAMILY_V4, PROTO_UDP, 123, ROLE_REMOTE, &[0; 4], "ntp");
    add(FAMILY_V6, PROTO_UDP, 123, ROLE_REMOTE, &[0; 16], "ntp");
    eps
}

static TABLE: LazyLock<Table> = LazyLock::new(|| Table::new(&endpoints()));

/// The table, with a container behind veth 7 and one at 10.0.2.1.
struct Containers<'a>(&'a Table);

impl Tables for Containers<'_> {
    fn port(&self, index: u32) -> u64 {
        self.0.port(index)
    }
    fn group4(&self, g: u32) -> Option<&Group4> {
        self.0.group4(g)
    }
    fn group6(&self, g: u32) -> Option<&Group6> {
        self.0.group6(g)
    }
    fn service4(&self, key: &Key4) -> Option<u32> {
        self.0.service4(key)
    }
    fn service6(&self, key: &Key6) -> Option<u32> {
        self.0.service6(key)
    }
}

const CONTAINER_VETH: u32 = 100;
const CONTAINER_ADDR: u32 = 101;

impl ContainerTables for Containers<'_> {
    fn veth(&self, ifindex: u32) -> Option<u32> {
        (ifindex == 7).then_some(CONTAINER_VETH)
    }
    fn addr4(&self, addr: u32) -> Option<u32> {
        (addr == u32::from_ne_bytes([10, 0, 2, 1])).then_some(CONTAINER_ADDR)
    }
    fn addr6(&self, _addr: &[u32; 4]) -> Option<u32> {
        None
    }
}

fuzz_target!(|data: &[u8]| {
    let t = &*TABLE;
    let known =
        |slot: u32| slot == SLOT_NO_MATCH || (FIRST_SERVICE_SLOT..t.slots() as u32).contains(&slot);
    let mut flow = Flow::default();
    let res = parse::parse_ethernet(data, &mut flow);
    match res {
        Ok(()) => {
            assert!(flow.family == FAMILY_V4 || flow.family == FAMILY_V6);
            assert!(flow.hdr_len >= ETH_HLEN + 20);
            // The L4 header it read is inside the frame and starts no
            // further in than the bound. hdr_len counts TCP options the
            // frame may have cut (it is only used for GSO packets, whose
            // headers are whole), and past an IP header of another protocol
            // it is only where that header would start.
            let slack = match flow.proto {
                PROTO_TCP => 40,
                PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6 => 0,
                _ => usize::MAX,
            };
            if slack != usize::MAX {
                assert!(flow.hdr_len <= data.len() + slack, "{}", flow.hdr_len);
                assert!(flow.hdr_len <= MAX_HDR_OFF + 60, "{}", flow.hdr_len);
            }
            if flow.proto != PROTO_TCP {
                assert_eq!(flow.tcp_flags, 0);
            }
            for dir in 0..2 {
                let (slot, d) = classify::classify(t, &flow, dir);
                assert!(known(slot) && d < 2, "{slot} {d}");
                for ifindex in [7, 8] {
                    if let Some(slot) =
                        classify::classify_container(&Containers(t), &flow, dir, ifindex)
                    {
                        assert!(known(slot) || slot == CONTAINER_VETH || slot == CONTAINER_ADDR);
                    }
                }
            }
            let (slot, d) = classify::classify_file(t, &flow);
            assert!(known(slot) && d < 2);
        }
        Err(SLOT_NOT_IP) => assert_eq!(flow.family, 0),
        Err(SLOT_MALFORMED) => {}
        Err(SLOT_FRAGMENT) => assert_ne!(flow.family, 0),
        Err(slot) => panic!("parse gave slot {slot}"),
    }
    // The agent's wrapper: the same verdict and the same flow.
    let mut pf = packet::Flow::default();
    assert_eq!(packet::parse(Link::Ethernet, data, &mut pf), res);
    let mut back = pf.parsed();
    back.hdr_len = flow.hdr_len;
    assert_eq!(back, flow);
    if res.is_ok() {
        assert_eq!(t.classify_hook(&pf, 0), classify::classify(t, &flow, 0));
    }
});
