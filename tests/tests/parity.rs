//! The userspace classifier (`packet`: `netpulse analyze` and the pcap
//! backend) against the kernel programs (BPF_PROG_TEST_RUN) on the same
//! frames, through the same service table: every frame must land in the
//! same slot, direction, bytes and TCP flags, on both hooks.
//!
//! Both sides run the same parser and classifier (`agent_ebpf::parse`,
//! `agent_ebpf::classify`), so what this holds equal is the rest: that the
//! shared code, compiled for BPF, loads and passes the verifier, and that
//! each side's own parts (the kernel's packet reads and map look-ups, the
//! agent's slices and `packet::Table`, both written from
//! `agent_ebpf::layout`) give the same answers. The kernel test
//! (`kernel.rs`) holds the shared code itself to frames and counts built
//! independently of it.

use std::{collections::HashMap, path::Path, time::Instant};

use agent_ebpf::{DIR_EGRESS, DIR_INGRESS, RESERVED_SLOTS, SlotCounters};
use netpulse::{
    config,
    identity::{self, Identity},
    packet::{self, Flow, Link, Table},
    probe::{Hook, Probe},
};
use netpulse_tests::{
    PinDir,
    frames::{self, TCP_FIN, TCP_RST, TCP_SYN},
    is_root, require,
};

const CONFIG: &str = frames::CLASSIFY_CONFIG;

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
    let all = frames::corpus::frames();
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
