//! Any bytes as a captured frame of any link type `netpulse analyze` and
//! the pcap backend read (the first byte picks it): parsing and
//! classification never panic, a frame that parses is IP, and the report
//! counts every frame once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netpulse::{
    analyze::{self, Analyzer},
    packet::{self, Flow, Link},
};

const LINKS: [Link; 7] = [
    Link::Ethernet,
    Link::Raw,
    Link::Ipv4,
    Link::Ipv6,
    Link::Sll,
    Link::Sll2,
    Link::Null,
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frame)) = data.split_first() else {
        return;
    };
    let link = LINKS[usize::from(sel) % LINKS.len()];
    let mut flow = Flow::default();
    if packet::parse(link, frame, &mut flow).is_ok() {
        assert_ne!(flow.family, 0);
    }
    let services: Vec<String> = ["web=tcp/80", "dns=udp/53", "ping=icmp"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let Ok(svc) = analyze::services(None, &services) else {
        return;
    };
    let mut a = Analyzer::new(link, analyze::table(&svc));
    a.add(frame, frame.len() as u32, 0.0, 0);
    a.add(frame, u32::MAX, 1.0, 1_000_000);
    let r = a.report("fuzz", 0, None);
    assert_eq!(r.packets, 2);
    let counted: u64 = r
        .services
        .iter()
        .map(|s| s.ingress.packets + s.egress.packets)
        .chain(r.unclassified.iter().map(|u| u.packets))
        .sum();
    assert_eq!(counted, 2);
});
