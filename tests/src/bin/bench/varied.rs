//! Per-packet cost with the caches as varied traffic leaves them: one
//! BPF_PROG_TEST_RUN per frame (repeat = 1) over a batch of different
//! frames, the kernel's time per frame summed over the batch, beside the
//! empty programs run the same way over the same batch. The batches: one
//! frame over and over (the control: what repeat = 1 itself adds), the
//! parity test's corpus (VLAN and QinQ, IPv6 extension headers, fragments,
//! ICMP, remote services, the unclassifiable), and random 5-tuples to (and
//! past) 50,000 endpoints.

use std::{collections::BTreeMap, path::Path};

use agent_ebpf::{
    EndpointKey, FAMILY_V4, FAMILY_V6, FIRST_SERVICE_SLOT, PROTO_TCP, PROTO_UDP, ROLE_LOCAL,
    SLOT_NO_MATCH, programs,
};
use anyhow::{Context as _, Result, bail};
use aya::Ebpf;
use netpulse::probe::{Hook, Probe};
use netpulse_tests::frames::{
    self, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, corpus::LOCAL, eth, ipv4, ipv6, tcp, udp,
};

use crate::{TARGET_NS, median, run_base};

/// The classification tests' services (frames::CLASSIFY_CONFIG) as the
/// agent turns them into endpoints, a slot per service.
fn classify_endpoints() -> Result<BTreeMap<EndpointKey, u32>> {
    let cfg = netpulse::config::parse(frames::CLASSIFY_CONFIG, Path::new("classify.toml"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let d = netpulse::identity::desired(&netpulse::identity::Sources {
        config: &cfg.services,
        listeners: &[],
        owners: &Default::default(),
        containers: &[],
        labels: &[],
    });
    let names: Vec<&String> = d.services.keys().collect();
    Ok(d.endpoints
        .iter()
        .map(|(k, name)| {
            let i = names.iter().position(|n| *n == name).unwrap_or(0);
            (*k, FIRST_SERVICE_SLOT + i as u32)
        })
        .collect())
}

/// Ports the classify services use: kept out of the random endpoints.
const TAKEN: [u16; 4] = [80, 443, 53, 5432];

/// `n` random local endpoints, one in ten a wildcard (any address), on
/// 1,000 slots after the classify services'.
fn random_endpoints(n: usize, rng: &mut netpulse_tests::Rng) -> BTreeMap<EndpointKey, u32> {
    let mut out = BTreeMap::new();
    while out.len() < n {
        let r = rng.u64();
        let v6 = r & 1 == 1;
        let proto = if r & 2 == 0 { PROTO_TCP } else { PROTO_UDP };
        let port = (r >> 8) as u16 | 1;
        if TAKEN.contains(&port) {
            continue;
        }
        let a = rng.u64().to_be_bytes();
        let wildcard = (r >> 32).is_multiple_of(10);
        let mut k = EndpointKey {
            family: if v6 { FAMILY_V6 } else { FAMILY_V4 },
            proto,
            port,
            role: ROLE_LOCAL,
            ..Default::default()
        };
        if !wildcard {
            let mut addr = [0u8; 16];
            addr[..8].copy_from_slice(&a);
            if v6 {
                addr[0] = 0xfd;
                addr[8..].copy_from_slice(&rng.u64().to_be_bytes());
                k.set_addr(&addr);
            } else {
                addr[0] = 10;
                k.set_addr(&addr[..4]);
            }
        }
        let slot = FIRST_SERVICE_SLOT + 16 + (out.len() as u32 % 1000);
        out.insert(k, slot);
    }
    out
}

/// A frame from `src` to `dst` of the key's family and protocol, with a
/// size and flags as a busy server sees them (70% bare ACKs), one in
/// twenty VLAN-tagged.
fn frame(
    rng: &mut netpulse_tests::Rng,
    family: u8,
    proto: u8,
    src: (&[u8], u16),
    dst: (&[u8], u16),
) -> Vec<u8> {
    let r = rng.u64();
    let payload = match r % 10 {
        0..=6 => 0,
        7 | 8 => 1400,
        _ => ((r >> 8) % 1000) as usize,
    };
    let flags = match (r >> 20) % 32 {
        0 => TCP_SYN,
        1 => TCP_FIN | TCP_ACK,
        2 => TCP_RST,
        _ => TCP_ACK,
    };
    let l4 = if proto == PROTO_TCP {
        tcp(src.1, dst.1, flags, 5, payload)
    } else {
        udp(src.1, dst.1, payload)
    };
    let vlans: &[u16] = if (r >> 30).is_multiple_of(20) {
        &[frames::ETH_8021Q]
    } else {
        &[]
    };
    if family == FAMILY_V6 {
        let (mut s, mut d) = ([0u8; 16], [0u8; 16]);
        s.copy_from_slice(&src.0[..16]);
        d.copy_from_slice(&dst.0[..16]);
        eth(vlans, frames::ETH_IPV6, &ipv6(s, d, &[], proto, &l4))
    } else {
        let (mut s, mut d) = ([0u8; 4], [0u8; 4]);
        s.copy_from_slice(&src.0[..4]);
        d.copy_from_slice(&dst.0[..4]);
        eth(vlans, frames::ETH_IPV4, &ipv4(s, d, proto, 0, 0, &l4))
    }
}

/// A random client address of `family` (outside every endpoint's range).
fn client(rng: &mut netpulse_tests::Rng, family: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&rng.u64().to_be_bytes());
    if family == FAMILY_V6 {
        a[0] = 0x20;
        a[1] = 0x01;
        a[8..].copy_from_slice(&rng.u64().to_be_bytes());
    } else {
        a[0] = 198;
    }
    a
}

/// `n` frames to random endpoints of `table` (XDP: the endpoint is the
/// destination; TC: the source), or with `miss`, to random addresses and
/// ports no endpoint has.
fn random_frames(
    table: &BTreeMap<EndpointKey, u32>,
    n: usize,
    miss: bool,
    tc: bool,
    rng: &mut netpulse_tests::Rng,
) -> Vec<Vec<u8>> {
    let keys: Vec<&EndpointKey> = table
        .keys()
        .filter(|k| k.port != 0 && k.role == ROLE_LOCAL)
        .collect();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let (family, proto, port, local) = if miss {
            let r = rng.u64();
            let family = if r & 1 == 1 { FAMILY_V6 } else { FAMILY_V4 };
            let proto = if r & 2 == 0 { PROTO_TCP } else { PROTO_UDP };
            let port = (r >> 8) as u16;
            let mut addr = client(rng, family);
            addr[0] = if family == FAMILY_V6 { 0xfd } else { 10 };
            let mut k = EndpointKey {
                family,
                proto,
                port,
                role: ROLE_LOCAL,
                ..Default::default()
            };
            if table.contains_key(&k) || TAKEN.contains(&port) {
                continue;
            }
            k.set_addr(if family == FAMILY_V6 {
                &addr[..]
            } else {
                &addr[..4]
            });
            if table.contains_key(&k) {
                continue;
            }
            (family, proto, port, addr)
        } else {
            let k = keys[rng.below(keys.len())];
            let mut addr = k.addr_bytes();
            if addr == [0; 16] {
                // A wildcard: any local address.
                addr = client(rng, k.family);
                addr[0] = if k.family == FAMILY_V6 { 0xfd } else { 10 };
            }
            (k.family, k.proto, k.port, addr)
        };
        let peer = client(rng, family);
        let peer_port = 32768 + rng.below(28000) as u16;
        out.push(if tc {
            frame(rng, family, proto, (&local, port), (&peer, peer_port))
        } else {
            frame(rng, family, proto, (&peer, peer_port), (&local, port))
        });
    }
    out
}

/// Packets counted as matching no service, both hooks and directions.
fn no_match(probe: &Probe) -> Result<u64> {
    let c = probe.counts(SLOT_NO_MATCH)?;
    Ok(c.dir[0].packets + c.dir[1].packets)
}

/// Mean ns per frame of one pass of `hook` (netpulse) or the empty program
/// over `batch`, a BPF_PROG_TEST_RUN with repeat = 1 each.
fn pass(
    probe: &mut Probe,
    base: &mut Ebpf,
    hook: Option<Hook>,
    tc: bool,
    batch: &[Vec<u8>],
) -> Result<f64> {
    let mut total = 0.0;
    for f in batch {
        total += match hook {
            Some(h) => probe.test_run(h, f, 0, 1)?.1.as_nanos() as f64,
            None => run_base(
                base,
                if tc {
                    programs::BASELINE_TC
                } else {
                    programs::BASELINE_XDP
                },
                f,
                1,
            )?,
        };
    }
    Ok(total / batch.len() as f64)
}

/// A table row: its name, the XDP batch, the TC batch, what the frames
/// must do (`Some(true)` all hit, `Some(false)` all miss), and the table
/// to load before it (None: as it is).
type Row = (
    String,
    Vec<Vec<u8>>,
    Vec<Vec<u8>>,
    Option<bool>,
    Option<BTreeMap<EndpointKey, u32>>,
);

/// Prints the varied-frames table; returns the worst Δ.
pub fn run(probe: &mut Probe, base: &mut Ebpf, rounds: usize, batch: usize) -> Result<f64> {
    let mut rng = netpulse_tests::Rng(0x2545_f491_4f6c_dd1d);
    let classify = classify_endpoints()?;
    let mut table = random_endpoints(50_000, &mut rng);
    table.extend(classify.iter().map(|(k, s)| (*k, *s)));
    probe.sync_table(table.clone())?;
    let endpoints = table.len();
    // The last row's: 1,000 random endpoints and the same services.
    let mut small = random_endpoints(1_000, &mut rng);
    small.extend(classify.iter().map(|(k, s)| (*k, *s)));

    let one = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(LOCAL, LOCAL, PROTO_TCP, 0, 0, &tcp(80, 80, TCP_ACK, 5, 64)),
    );
    let mut c = netpulse_tests::frames::corpus::frames();
    let corpus_len = c.len();
    // The corpus repeated to the batch's length, shuffled (Fisher-Yates).
    let mut corpus_batch: Vec<Vec<u8>> = (0..batch).map(|i| c[i % corpus_len].clone()).collect();
    for i in (1..corpus_batch.len()).rev() {
        corpus_batch.swap(i, rng.below(i + 1));
    }
    c.clear();
    // BPF_PROG_TEST_RUN builds no skb from a frame shorter than its IP
    // ethertype's header (real TC never sees one): those go to XDP only.
    let mut corpus_tc = Vec::new();
    for f in &corpus_batch {
        if run_base(base, programs::BASELINE_TC, f, 1).is_ok() {
            corpus_tc.push(f.clone());
        }
    }
    let rows: Vec<Row> = vec![
        (
            "one frame (IPv4/TCP → 10.0.0.1:80), over and over: the control".into(),
            vec![one.clone(); batch],
            vec![one; batch],
            None,
            None,
        ),
        (
            format!(
                "the parity corpus ({corpus_len} frames: VLAN, QinQ, IPv6 extension headers, fragments, ICMP, remote, malformed), shuffled"
            ),
            corpus_batch,
            corpus_tc,
            None,
            None,
        ),
        (
            "random 5-tuples to random endpoints (all hit)".into(),
            random_frames(&table, batch, false, false, &mut rng),
            random_frames(&table, batch, false, true, &mut rng),
            Some(true),
            None,
        ),
        (
            "random 5-tuples to no endpoint (all miss)".into(),
            random_frames(&table, batch, true, false, &mut rng),
            random_frames(&table, batch, true, true, &mut rng),
            Some(false),
            None,
        ),
        (
            format!(
                "random 5-tuples to random endpoints, the table cut to {} (all hit)",
                small.len()
            ),
            random_frames(&small, batch, false, false, &mut rng),
            random_frames(&small, batch, false, true, &mut rng),
            Some(true),
            Some(small.clone()),
        ),
    ];

    println!(
        "\nVaried frames: one BPF_PROG_TEST_RUN per frame (repeat = 1) over a batch of {batch}, {endpoints} endpoints in the table (50,000 random, one in ten a wildcard, and the classification tests' services); mean ns per frame, median of {rounds} rounds\n"
    );
    println!("| batch | XDP | empty XDP | XDP Δ | TC | empty TC | TC Δ | Δ ≤ {TARGET_NS} ns |");
    println!("|---|---:|---:|---:|---:|---:|---:|:-:|");
    let mut worst: f64 = 0.0;
    for (name, xdp, tc, expect, load) in rows {
        if let Some(t) = load {
            probe.sync_table(t)?;
        }
        // Check the batch is what its name says.
        if let Some(hit) = expect {
            for (hook, b) in [(Hook::Xdp, &xdp), (Hook::Tc, &tc)] {
                let before = no_match(probe)?;
                for f in b.iter() {
                    probe.test_run(hook, f, 0, 1)?;
                }
                let missed = no_match(probe)? - before;
                let want = if hit { 0 } else { b.len() as u64 };
                if missed != want {
                    bail!(
                        "{name}: {missed} of {} frames matched no service on {hook:?}",
                        b.len()
                    );
                }
            }
        }
        let mut cols = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..rounds {
            cols[0].push(pass(probe, base, Some(Hook::Xdp), false, &xdp)?);
            cols[1].push(pass(probe, base, None, false, &xdp)?);
            cols[2].push(pass(probe, base, Some(Hook::Tc), true, &tc)?);
            cols[3].push(pass(probe, base, None, true, &tc)?);
        }
        let [x, xb, t, tb] = cols.map(median);
        let (dx, dt) = (x - xb, t - tb);
        worst = worst.max(dx).max(dt);
        println!(
            "| {name} | {x:.1} | {xb:.1} | {dx:.1} | {t:.1} | {tb:.1} | {dt:.1} | {} |",
            if dx <= TARGET_NS && dt <= TARGET_NS {
                "yes"
            } else {
                "no"
            }
        );
    }
    probe
        .sync_table(BTreeMap::new())
        .context("emptying the table")?;
    Ok(worst)
}
