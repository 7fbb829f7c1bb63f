//! What counting peers (who talks to whom) adds per packet: one frame to a
//! service whose peer is named (the name table's positions, then the
//! per-CPU array), unknown (the name table misses, then the LRU and the
//! bucket, both hits after the first run), and with no peer figures at all
//! (the service's slot past `PEER_SLOTS`: one compare, the cost before
//! peers existed).

use std::collections::BTreeMap;

use agent_ebpf::{FAMILY_V4, FIRST_SERVICE_SLOT, PEER_SLOTS, PROTO_TCP, ROLE_REMOTE, programs};
use anyhow::{Context as _, Result, bail};
use netpulse::probe::{Hook, Probe};
use netpulse_tests::frames::{self, eth, ipv4, tcp};

use super::{TARGET_NS, key, median, ns, run_base};

/// Prints the table; returns the worst Δ over the empty programs.
pub fn run(object: &[u8], pin: &std::path::Path, rounds: usize, repeat: u32) -> Result<f64> {
    let mut probe = Probe::load(pin).context("loading the probes")?;
    let (probe, base) = (&mut probe, &mut super::load_baseline(object, pin)?);
    let (client, server) = ([10u8, 0, 0, 2], [10u8, 0, 0, 1]);
    // In: client → server:80 (XDP counts it); out: server:80 → client (TC).
    let frame_in = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(
            client,
            server,
            PROTO_TCP,
            0,
            0,
            &tcp(40000, 80, frames::TCP_ACK, 5, 64),
        ),
    );
    let frame_out = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(
            server,
            client,
            PROTO_TCP,
            0,
            0,
            &tcp(80, 40000, frames::TCP_ACK, 5, 64),
        ),
    );
    let web = key(FAMILY_V4, PROTO_TCP, &[], 80);
    // A remote service at the client's address (another port): what makes
    // the address a named peer.
    let mut named = key(FAMILY_V4, PROTO_TCP, &client, 9);
    named.role = ROLE_REMOTE;
    println!(
        "\nPeers (who talks to whom), IPv4/TCP client 10.0.0.2 → *:80 and back\n\n| peer of the service | XDP | empty XDP | XDP Δ | TC | empty TC | TC Δ | Δ ≤ {TARGET_NS} ns |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|:-:|");
    let mut worst: f64 = 0.0;
    let rows = [
        ("no peer figures (slot past PEER_SLOTS)", PEER_SLOTS, false),
        (
            "named (name table: 4 array loads; per-CPU array add)",
            FIRST_SERVICE_SLOT,
            true,
        ),
        (
            "unknown (name table miss; its LRU set; its bucket)",
            FIRST_SERVICE_SLOT,
            false,
        ),
    ];
    for (name, slot, is_named) in rows {
        let mut table = BTreeMap::from([(web, slot)]);
        if is_named {
            table.insert(named, FIRST_SERVICE_SLOT + 1);
        }
        probe.sync_table(table)?;
        let before = probe.counts(slot)?;
        probe.test_run(Hook::Xdp, &frame_in, 0, 1)?;
        probe.test_run(Hook::Tc, &frame_out, 0, 1)?;
        let after = probe.counts(slot)?;
        if after.dir[0].packets != before.dir[0].packets + 1
            || after.dir[1].packets != before.dir[1].packets + 1
        {
            bail!("{name}: the frames did not hit their service");
        }
        let mut cols = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..rounds {
            cols[0].push(ns(probe.test_run(Hook::Xdp, &frame_in, 0, repeat)?.1));
            cols[1].push(run_base(base, programs::BASELINE_XDP, &frame_in, repeat)?);
            cols[2].push(ns(probe.test_run(Hook::Tc, &frame_out, 0, repeat)?.1));
            cols[3].push(run_base(base, programs::BASELINE_TC, &frame_out, repeat)?);
        }
        let [x, xb, t, tb] = cols.map(median);
        let (dx, dt) = (x - xb, t - tb);
        worst = worst.max(dx).max(dt);
        let ok = if dx <= TARGET_NS && dt <= TARGET_NS {
            "yes"
        } else {
            "no"
        };
        let inserts = probe
            .pin_dir()
            .and_then(|d| netpulse::peers::Reader::open(d).ok())
            .map_or(0, |r| r.read(&Default::default(), false).inserts);
        println!("| {name} | {x:.1} | {xb:.1} | {dx:.1} | {t:.1} | {tb:.1} | {dt:.1} | {ok} |");
        eprintln!("({name}: LRU inserts so far: {inserts})");
    }
    probe.sync_table(BTreeMap::new())?;
    Ok(worst)
}
