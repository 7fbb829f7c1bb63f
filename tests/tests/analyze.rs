//! `netpulse analyze` on capture files: real traffic captured by tcpdump
//! in network namespaces made here, and files written byte by byte (VLAN,
//! IPv6, Linux cooked SLL/SLL2, raw IP, pcapng, short snaplen, cut
//! records, random bytes). Per-conversation, per-address and per-service
//! counts are held to tshark's on the same file.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use netpulse_tests::{
    agent::{bin, have_bin},
    frames::{self, Ext, eth, ipv4, ipv6, tcp, udp},
    is_root,
    netns::{Netns, Tcpdump, have, mac_of, sh},
    pcapfile::{self, Rec, tshark_conv, tshark_endpoints},
    require,
};
use serde_json::Value;

fn base() -> PathBuf {
    std::env::temp_dir().join(format!("netpulse-analyze-{}", std::process::id()))
}

/// This test's own folder (tests run in parallel, one thread each).
fn dir() -> PathBuf {
    let name = std::thread::current()
        .name()
        .unwrap_or("main")
        .replace("::", "-");
    let d = base().join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Removes this test's folder (and the common one once empty).
fn cleanup() {
    let _ = std::fs::remove_dir_all(dir());
    let _ = std::fs::remove_dir(base());
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

struct Run {
    code: i32,
    json: Value,
    stderr: String,
}

/// `netpulse analyze FILE --output json --top 0 ARGS...`
fn analyze(file: &Path, args: &[&str]) -> Run {
    let out = Command::new(bin())
        .arg("analyze")
        .arg(file)
        .args(["--output", "json", "--top", "0"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "netpulse analyze panicked: {stderr}"
    );
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Run {
        code: out.status.code().unwrap_or(-1),
        json,
        stderr,
    }
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Service name → (packets, bytes) over both directions.
fn services(r: &Value) -> BTreeMap<String, (u64, u64)> {
    r["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let (i, e) = (&s["ingress"], &s["egress"]);
            (
                s["service"].as_str().unwrap().to_string(),
                (
                    n(&i["packets"]) + n(&e["packets"]),
                    n(&i["bytes"]) + n(&e["bytes"]),
                ),
            )
        })
        .collect()
}

fn unclassified(r: &Value, reason: &str) -> u64 {
    r["unclassified"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["reason"] == reason)
        .map_or(0, |u| n(&u["packets"]))
}

type End = (String, u16);

/// tshark's frames and exact bytes summed, and the rows it rounded.
type Summed = (u64, u64, Vec<pcapfile::Bytes>);

/// A link-layer wrapper: (name, linktype, wrap(ethertype, ip packet)).
type Wrap = (&'static str, u32, fn(u16, &[u8]) -> Vec<u8>);

/// Conversations of `proto` as {a→b: (packets, bytes)} over both
/// orientations, keyed by the unordered pair of ends.
fn convs(r: &Value, proto: &str) -> BTreeMap<(End, End), [(u64, u64); 2]> {
    let mut out = BTreeMap::new();
    for c in r["conversations"].as_array().unwrap() {
        if c["proto"] != proto {
            continue;
        }
        let a = (c["a"].as_str().unwrap().to_string(), n(&c["a_port"]) as u16);
        let b = (c["b"].as_str().unwrap().to_string(), n(&c["b_port"]) as u16);
        let ab = (n(&c["a_to_b_packets"]), n(&c["a_to_b_bytes"]));
        let ba = (n(&c["b_to_a_packets"]), n(&c["b_to_a_bytes"]));
        // The report puts the lower end first; key the same way here.
        out.insert((a, b), [ab, ba]);
    }
    out
}

/// Every TCP and UDP conversation and every IPv4 address, as netpulse and
/// tshark count them on `file`; returns netpulse's report.
fn assert_matches_tshark(file: &Path, args: &[&str]) -> Value {
    let run = analyze(file, args);
    assert_eq!(run.code, 0, "analyze {}: {}", file.display(), run.stderr);
    let r = run.json;
    for proto in ["tcp", "udp"] {
        let ours = convs(&r, proto);
        // tshark splits a 5-tuple into several rows when a port is reused
        // by a new connection; sum them per pair of ends.
        let mut theirs: BTreeMap<(End, End), [Summed; 2]> = BTreeMap::new();
        for t in tshark_conv(file, proto) {
            let (lo, hi, fwd) = if t.a <= t.b {
                (t.a.clone(), t.b.clone(), true)
            } else {
                (t.b.clone(), t.a.clone(), false)
            };
            let e = theirs.entry((lo, hi)).or_default();
            let (lo_hi, hi_lo) = if fwd {
                (t.a_to_b, t.b_to_a)
            } else {
                (t.b_to_a, t.a_to_b)
            };
            for (slot, (frames, bytes)) in [(0, lo_hi), (1, hi_lo)] {
                e[slot].0 += frames;
                if bytes.unit == 1 {
                    e[slot].1 += bytes.value;
                } else {
                    e[slot].2.push(bytes);
                }
            }
        }
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{proto} conversations of {}",
            file.display()
        );
        for (k, t) in &theirs {
            let o = ours[k];
            for d in 0..2 {
                assert_eq!(o[d].0, t[d].0, "{proto} {k:?} frames, direction {d}");
                if t[d].2.is_empty() {
                    assert_eq!(o[d].1, t[d].1, "{proto} {k:?} bytes, direction {d}");
                } else {
                    // Rounded by tshark: ours must print the same.
                    assert!(
                        t[d].2.len() == 1 && t[d].1 == 0 && t[d].2[0].matches(o[d].1),
                        "{proto} {k:?} bytes {} vs tshark {:?}",
                        o[d].1,
                        t[d]
                    );
                }
            }
        }
    }
    let ours: BTreeMap<String, [u64; 6]> = r["top_talkers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["address"].as_str().unwrap().parse::<Ipv4Addr>().is_ok())
        .map(|t| {
            (
                t["address"].as_str().unwrap().to_string(),
                [
                    n(&t["packets"]),
                    n(&t["bytes"]),
                    n(&t["tx_packets"]),
                    n(&t["tx_bytes"]),
                    n(&t["rx_packets"]),
                    n(&t["rx_bytes"]),
                ],
            )
        })
        .collect();
    assert_eq!(
        ours,
        tshark_endpoints(file),
        "IPv4 endpoints of {}",
        file.display()
    );
    r
}

/// Per service (one protocol and port): what tshark counts for the
/// display filter `PROTO.port == PORT`.
fn tshark_port_total(file: &Path, proto: &str, port: u16) -> (u64, u64) {
    pcapfile::tshark_io(file, &[&format!("{proto}.port=={port}")])[0]
}

fn tools() -> bool {
    have_bin()
        && require("tshark (apt-get install tshark)", have("tshark"))
        && require("tcpdump (apt-get install tcpdump)", have("tcpdump"))
}

// --- synthetic files --------------------------------------------------------

const A: [u8; 4] = [10, 86, 2, 1];
const B: [u8; 4] = [10, 86, 2, 2];
const C: [u8; 4] = [10, 86, 2, 3];

/// IP packets (ethertype, bytes) covering the cases: a TCP handshake,
/// data, FIN and RST to 19610; UDP to 19611; IPv6 TCP to 19612 behind a
/// hop-by-hop header and IPv6 UDP; an ICMP echo; a later IPv4 fragment.
fn ip_packets() -> Vec<(u16, Vec<u8>)> {
    let v4 = |s, d, proto, payload: &[u8]| (frames::ETH_IPV4, ipv4(s, d, proto, 0, 0, payload));
    let a6 = frames::v6(1);
    let b6 = frames::v6(2);
    vec![
        v4(A, B, 6, &tcp(40000, 19610, frames::TCP_SYN, 5, 0)),
        v4(
            B,
            A,
            6,
            &tcp(19610, 40000, frames::TCP_SYN | frames::TCP_ACK, 5, 0),
        ),
        v4(A, B, 6, &tcp(40000, 19610, frames::TCP_ACK, 5, 0)),
        v4(A, B, 6, &tcp(40000, 19610, frames::TCP_ACK, 5, 700)),
        v4(B, A, 6, &tcp(19610, 40000, frames::TCP_ACK, 5, 1200)),
        v4(
            A,
            B,
            6,
            &tcp(40000, 19610, frames::TCP_FIN | frames::TCP_ACK, 5, 0),
        ),
        v4(B, A, 6, &tcp(19610, 40000, frames::TCP_RST, 5, 0)),
        v4(A, C, 17, &udp(40001, 19611, 100)),
        v4(C, A, 17, &udp(19611, 40001, 300)),
        v4(A, C, 17, &udp(40002, 19611, 50)),
        (
            frames::ETH_IPV6,
            ipv6(
                a6,
                b6,
                &[Ext::HopByHop(0)],
                6,
                &tcp(40003, 19612, frames::TCP_SYN, 5, 0),
            ),
        ),
        (
            frames::ETH_IPV6,
            ipv6(
                b6,
                a6,
                &[],
                6,
                &tcp(19612, 40003, frames::TCP_SYN | frames::TCP_ACK, 5, 0),
            ),
        ),
        (
            frames::ETH_IPV6,
            ipv6(a6, b6, &[], 17, &udp(40004, 19613, 40)),
        ),
        v4(A, B, 1, &frames::icmp_echo(false, 56)),
        (frames::ETH_IPV4, ipv4(A, B, 17, 0, 100, &[0xab; 64])),
    ]
}

const SERVICES: [&str; 8] = [
    "--service",
    "web=tcp/19610",
    "--service",
    "dns=udp/19611",
    "--service",
    "web6=tcp/19612",
    "--service",
    "ping=icmp",
];

/// Packets per service in `ip_packets`, whatever the link layer.
fn expected_packets() -> BTreeMap<String, u64> {
    [("web", 7), ("dns", 3), ("web6", 2), ("ping", 1)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn packets_of(r: &Value) -> BTreeMap<String, u64> {
    services(r).into_iter().map(|(k, v)| (k, v.0)).collect()
}

#[test]
fn synthetic_ethernet_vlan_ipv6_and_short_snaplen_match_tshark() {
    if !have_bin() || !require("tshark (apt-get install tshark)", have("tshark")) {
        return;
    }
    let mut recs = Vec::new();
    for (i, (et, p)) in ip_packets().into_iter().enumerate() {
        // Every third frame behind one VLAN tag, every fifth behind two.
        let vlans: &[u16] = match i % 15 {
            3 | 6 | 9 | 12 => &[frames::ETH_8021Q],
            5 | 10 => &[frames::ETH_8021AD, frames::ETH_8021Q],
            _ => &[],
        };
        recs.push(Rec::new(eth(vlans, et, &p), i));
    }
    // A full-size frame captured with a 64-byte snaplen: counted at its
    // wire length.
    let big = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(B, A, 6, 0, 0, &tcp(19610, 40000, frames::TCP_ACK, 5, 1400)),
    );
    recs.push(Rec::new(big, recs.len()).snapped(64));
    // ARP, and an IPv4 header with IHL 3.
    recs.push(Rec::new(eth(&[], frames::ETH_ARP, &[0; 28]), recs.len()));
    recs.push(Rec::new(
        eth(
            &[],
            frames::ETH_IPV4,
            &[0x43, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0],
        ),
        recs.len(),
    ));
    let f = write(
        "synthetic.pcap",
        &pcapfile::pcap(pcapfile::LINKTYPE_ETHERNET, &recs),
    );
    let r = assert_matches_tshark(&f, &SERVICES);
    let mut want = expected_packets();
    *want.get_mut("web").unwrap() += 1;
    assert_eq!(packets_of(&r), want);
    // The snapped frame counts 14 + 20 + 20 + 1400 bytes.
    let web = &services(&r)["web"];
    let wire: u64 = recs[..7].iter().map(|r| u64::from(r.wire_len)).sum::<u64>() + 1454;
    assert_eq!(web.1, wire);
    assert_eq!(web.1, tshark_port_total(&f, "tcp", 19610).1);
    assert_eq!(services(&r)["dns"], tshark_port_total(&f, "udp", 19611));
    assert_eq!(unclassified(&r, "not_ip"), 1);
    assert_eq!(unclassified(&r, "malformed"), 1);
    assert_eq!(unclassified(&r, "fragment"), 1);
    assert_eq!(unclassified(&r, "no_match"), 1, "the IPv6 UDP packet");
    assert_eq!(n(&r["packets"]), recs.len() as u64);
    // TCP flags of web: 2 SYN, 1 FIN, 1 RST, both ways.
    let web = r["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "web")
        .unwrap();
    let flag = |k: &str| n(&web["ingress"][k]) + n(&web["egress"][k]);
    assert_eq!((flag("syn"), flag("fin"), flag("rst")), (2, 1, 1));
    assert_eq!(n(&web["ingress"]["packets"]), 4, "toward tcp/19610");
    // The same frames as pcapng: the same report.
    let ng = write(
        "synthetic.pcapng",
        &pcapfile::pcapng(pcapfile::LINKTYPE_ETHERNET, &recs),
    );
    let r2 = assert_matches_tshark(&ng, &SERVICES);
    for k in [
        "services",
        "conversations",
        "top_talkers",
        "protocols",
        "unclassified",
    ] {
        assert_eq!(r[k], r2[k], "{k}: pcap vs pcapng");
    }
    cleanup();
}

#[test]
fn synthetic_sll_sll2_and_raw_ip_give_the_same_services() {
    if !have_bin() || !require("tshark (apt-get install tshark)", have("tshark")) {
        return;
    }
    let wrap: [Wrap; 3] = [
        ("sll", pcapfile::LINKTYPE_LINUX_SLL, pcapfile::sll),
        ("sll2", pcapfile::LINKTYPE_LINUX_SLL2, pcapfile::sll2),
        ("raw", pcapfile::LINKTYPE_RAW, |_, p| p.to_vec()),
    ];
    for (name, linktype, f) in wrap {
        let recs: Vec<Rec> = ip_packets()
            .into_iter()
            .enumerate()
            .map(|(i, (et, p))| Rec::new(f(et, &p), i))
            .collect();
        let file = write(&format!("{name}.pcap"), &pcapfile::pcap(linktype, &recs));
        let r = assert_matches_tshark(&file, &SERVICES);
        assert_eq!(packets_of(&r), expected_packets(), "{name}");
        assert_eq!(
            services(&r)["dns"],
            tshark_port_total(&file, "udp", 19611),
            "{name}"
        );
        assert_eq!(unclassified(&r, "fragment"), 1, "{name}");
        let ng = write(
            &format!("{name}.pcapng"),
            &pcapfile::pcapng(linktype, &recs),
        );
        assert_eq!(
            packets_of(&analyze(&ng, &SERVICES).json),
            expected_packets()
        );
    }
    cleanup();
}

/// The IP packets of `ip_packets`, each in an Ethernet frame.
fn eth_recs() -> Vec<Rec> {
    ip_packets()
        .into_iter()
        .enumerate()
        .map(|(i, (et, p))| Rec::new(eth(&[], et, &p), i))
        .collect()
}

#[test]
fn cut_files_report_what_was_read_and_where_they_stopped() {
    if !have_bin() {
        return;
    }
    let recs = eth_recs();
    let whole = pcapfile::pcap(pcapfile::LINKTYPE_ETHERNET, &recs);
    let last = recs.len() - 1;
    let at = pcapfile::pcap_offset(&recs, last);
    // Cut inside the last record's data, then inside its header.
    for cut in [at + 16 + 10, at + 8] {
        let f = write("cut.pcap", &whole[..cut]);
        let run = analyze(&f, &SERVICES);
        assert_eq!(run.code, 1, "a cut file exits 1: {}", run.stderr);
        let r = &run.json;
        assert_eq!(r["complete"], false);
        assert_eq!(n(&r["packets"]), last as u64);
        assert_eq!(n(&r["stopped"]["after_packets"]), last as u64);
        assert_eq!(n(&r["stopped"]["offset"]), at as u64);
        assert!(
            run.stderr
                .contains(&format!("stopped after packet {last} at byte offset {at}")),
            "{}",
            run.stderr
        );
        // What was read is still counted.
        assert_eq!(packets_of(r)["web"], 7);
    }
    // The table says it too.
    let f = write("cut.pcap", &whole[..at + 20]);
    let out = Command::new(bin()).arg("analyze").arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("INCOMPLETE: stopped after packet"));
    // A cut pcapng.
    let ng = pcapfile::pcapng(pcapfile::LINKTYPE_ETHERNET, &recs);
    let f = write("cut.pcapng", &ng[..ng.len() - 30]);
    let run = analyze(&f, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(n(&run.json["packets"]), last as u64);
    cleanup();
}

/// xorshift: random enough bytes, the same on every run.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn random_bytes_are_an_error_never_a_panic() {
    if !have_bin() {
        return;
    }
    for seed in 1..=20u64 {
        let f = write("noise.pcap", &noise(seed, 4096 * seed as usize));
        let run = analyze(&f, &[]);
        assert_eq!(run.code, 1, "seed {seed}: {}", run.stderr);
        assert!(
            run.stderr.starts_with("netpulse analyze: "),
            "{}",
            run.stderr
        );
        // A valid header, then noise: records that make no sense.
        let mut bytes = pcapfile::pcap(pcapfile::LINKTYPE_ETHERNET, &[]);
        bytes.extend(noise(seed, 2000));
        let f = write("noise-body.pcap", &bytes);
        let run = analyze(&f, &[]);
        assert!(matches!(run.code, 0 | 1), "seed {seed}: {}", run.stderr);
        if run.code == 1 {
            assert_eq!(run.json["complete"], false, "{}", run.stderr);
        }
        // The same for pcapng.
        let mut bytes = pcapfile::pcapng(pcapfile::LINKTYPE_ETHERNET, &[]);
        bytes.extend(noise(seed, 2000));
        let f = write("noise-body.pcapng", &bytes);
        let run = analyze(&f, &[]);
        assert!(matches!(run.code, 0 | 1), "seed {seed}: {}", run.stderr);
    }
    // Empty, missing, a directory, an unsupported link type.
    for (f, what) in [
        (write("empty.pcap", &[]), "cannot read"),
        (dir().join("missing.pcap"), "cannot read"),
        (dir(), "is a directory"),
        (
            write("usb.pcap", &pcapfile::pcap(189, &[])),
            "is not supported",
        ),
    ] {
        let run = analyze(&f, &[]);
        assert_eq!(run.code, 1, "{}: {}", f.display(), run.stderr);
        assert!(run.stderr.contains(what), "{}", run.stderr);
    }
    // A bad --service is a usage error.
    let f = write("ok.pcap", &pcapfile::pcap(pcapfile::LINKTYPE_ETHERNET, &[]));
    let run = analyze(&f, &["--service", "web=tcp/99999"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("web=tcp/99999"), "{}", run.stderr);
    cleanup();
}

#[test]
fn stdin_csv_table_and_config_services() {
    if !have_bin() {
        return;
    }
    let recs = eth_recs();
    let bytes = pcapfile::pcapng(pcapfile::LINKTYPE_ETHERNET, &recs);
    let cfg = write(
        "analyze.toml",
        b"[[service]]\nname = \"web\"\nendpoints = [{ proto = \"tcp\", port = 19610 }]\n",
    );
    let mut child = Command::new(bin())
        .args(["analyze", "-", "--output", "json", "--config"])
        .arg(&cfg)
        .args(["--service", "dns=udp/10.86.2.3:19611"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["input"], "<stdin>");
    let got = packets_of(&r);
    assert_eq!((got["web"], got["dns"]), (7, 3));
    // CSV: one header, a row per service with its totals.
    let f = write(
        "csv.pcap",
        &pcapfile::pcap(pcapfile::LINKTYPE_ETHERNET, &recs),
    );
    let out = Command::new(bin())
        .arg("analyze")
        .arg(&f)
        .args(["--output", "csv", "--service", "web=tcp/19610"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("section,name,proto,a,a_port")
    );
    let web: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("service,web,"))
        .unwrap()
        .split(',')
        .collect();
    assert_eq!(web[7], "7");
    assert!(
        text.lines()
            .any(|l| l.starts_with("conversation,web,tcp,10.86.2.1,40000,10.86.2.2,19610,7,"))
    );
    // The table names services, conversations, talkers and protocols.
    let out = Command::new(bin())
        .arg("analyze")
        .arg(&f)
        .args(["--service", "web=tcp/19610"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for s in [
        "SERVICES",
        "CONVERSATIONS",
        "TOP TALKERS",
        "PROTOCOLS",
        "ipv4/tcp",
        "10.86.2.2:19610",
    ] {
        assert!(text.contains(s), "{s} missing from:\n{text}");
    }
    cleanup();
}

// --- real traffic -----------------------------------------------------------

/// Two namespaces joined by a veth pair, 10.86.<net>.1 and .2.
struct Pair {
    a: Netns,
    b: Netns,
    dev_b: String,
}

fn pair(tag: &str, net: u8) -> Pair {
    let pid = std::process::id();
    let a = Netns::new(&format!("np6-{tag}-a-{pid}"));
    let b = Netns::new(&format!("np6-{tag}-b-{pid}"));
    let (dev_a, dev_b) = (format!("np6{tag}{net}a"), format!("np6{tag}{net}b"));
    sh(
        "ip",
        &[
            "link", "add", &dev_a, "netns", &a.name, "type", "veth", "peer", "name", &dev_b,
            "netns", &b.name,
        ],
    );
    for (ns, dev, me) in [(&a, &dev_a, 1), (&b, &dev_b, 2)] {
        ns.exec(
            "sysctl",
            &["-q", "-w", &format!("net.ipv6.conf.{dev}.disable_ipv6=1")],
        );
        sh(
            "ip",
            &[
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("10.86.{net}.{me}/24"),
                "dev",
                dev,
            ],
        );
        sh("ip", &["-n", &ns.name, "link", "set", dev, "up"]);
    }
    let _ = mac_of(&a, &dev_a);
    Pair { a, b, dev_b }
}

const CONNS: usize = 12;
const DATAGRAMS: usize = 30;

/// Known traffic from a to b: CONNS TCP connections to 19601 (each sends
/// i KB and gets 100 bytes back) and DATAGRAMS UDP exchanges on 19602.
fn traffic(p: &Pair, net: u8) {
    let server = Ipv4Addr::new(10, 86, net, 2);
    let (tcp_l, udp_s) = p.b.run(move || {
        (
            TcpListener::bind((server, 19601)).unwrap(),
            UdpSocket::bind((server, 19602)).unwrap(),
        )
    });
    let tcp_srv = std::thread::spawn(move || {
        for _ in 0..CONNS {
            let (mut s, _) = tcp_l.accept().unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).unwrap();
            s.write_all(&[7u8; 100]).unwrap();
        }
    });
    let udp_srv = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for _ in 0..DATAGRAMS {
            let (n, from) = udp_s.recv_from(&mut buf).unwrap();
            udp_s.send_to(&buf[..n], from).unwrap();
        }
    });
    p.a.run(move || {
        for i in 0..CONNS {
            let mut s = TcpStream::connect((server, 19601)).unwrap();
            s.write_all(&vec![1u8; 1024 * (i + 1)]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).unwrap();
            assert_eq!(buf.len(), 100);
        }
        let u = UdpSocket::bind((Ipv4Addr::new(10, 86, net, 1), 0)).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 2048];
        for i in 0..DATAGRAMS {
            u.send_to(&vec![2u8; 10 + i * 20], (server, 19602)).unwrap();
            u.recv_from(&mut buf).unwrap();
        }
    });
    tcp_srv.join().unwrap();
    udp_srv.join().unwrap();
}

#[test]
fn real_traffic_captured_by_tcpdump_matches_tshark() {
    if !tools() || !require("root (network namespaces)", is_root()) {
        return;
    }
    let net = 3;
    let p = pair("an", net);
    let eth_file = dir().join("real-eth.pcap");
    let any_file = dir().join("real-any.pcap");
    let on_dev = Tcpdump::start(&p.b, &p.dev_b, &eth_file);
    // `-i any` writes Linux cooked v2 (SLL2) records.
    let on_any = Tcpdump::start(&p.b, "any", &any_file);
    traffic(&p, net);
    on_dev.stop();
    on_any.stop();
    let svc = ["--service", "web=tcp/19601", "--service", "dns=udp/19602"];
    for f in [&eth_file, &any_file] {
        let r = assert_matches_tshark(f, &svc);
        let got = services(&r);
        assert_eq!(
            got["web"],
            tshark_port_total(f, "tcp", 19601),
            "{}",
            f.display()
        );
        assert_eq!(
            got["dns"],
            tshark_port_total(f, "udp", 19602),
            "{}",
            f.display()
        );
        let web = r["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == "web")
            .unwrap();
        let flag = |k: &str| n(&web["ingress"][k]) + n(&web["egress"][k]);
        let want = pcapfile::tshark_io(
            f,
            &[
                "tcp.port==19601 && tcp.flags.syn==1",
                "tcp.port==19601 && tcp.flags.fin==1",
                "tcp.port==19601 && tcp.flags.reset==1",
                "tcp.dstport==19601",
            ],
        );
        assert_eq!(
            (flag("syn"), flag("fin"), flag("rst")),
            (want[0].0, want[1].0, want[2].0),
            "{}",
            f.display()
        );
        assert_eq!(
            (n(&web["ingress"]["packets"]), n(&web["ingress"]["bytes"])),
            want[3],
            "toward the service: {}",
            f.display()
        );
        // Where tcpdump lost nothing, the counts are the traffic sent: a
        // SYN and a FIN each way per connection, every datagram and reply.
        // A drop would make these exact counts unknowable: under CI that is
        // a failure with tcpdump's own report, elsewhere a recorded skip of
        // these four assertions.
        let log = std::fs::read_to_string(f.with_extension("log")).unwrap();
        if require(
            &format!(
                "tcpdump losing no packet on {} (its report: {})",
                f.display(),
                log.lines()
                    .filter(|l| l.contains("dropped"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            log.contains("\n0 packets dropped by kernel"),
        ) {
            assert_eq!(got["dns"].0, 2 * DATAGRAMS as u64, "{}", f.display());
            assert_eq!(flag("syn"), 2 * CONNS as u64, "{}", f.display());
            assert_eq!(flag("fin"), 2 * CONNS as u64, "{}", f.display());
            assert!(
                n(&web["ingress"]["bytes"]) > (1024 * CONNS * (CONNS + 1) / 2) as u64,
                "the uploads are toward the service"
            );
        }
    }
    let any = analyze(&any_file, &svc).json;
    assert_eq!(any["link_type"], "linux-sll2");
    // tshark's pcapng of the same capture: the same counts.
    let ng = dir().join("real-eth.pcapng");
    sh(
        "tshark",
        &[
            "-r",
            eth_file.to_str().unwrap(),
            "-F",
            "pcapng",
            "-w",
            ng.to_str().unwrap(),
        ],
    );
    let a = analyze(&eth_file, &svc).json;
    let b = assert_matches_tshark(&ng, &svc);
    assert_eq!(a["services"], b["services"]);
    assert_eq!(a["conversations"], b["conversations"]);
    cleanup();
}

// --- TCP health from headers ------------------------------------------------

const TCP_CONNS: usize = 8;
const TCP_REFUSED: usize = 3;
const TCP_RESETS: usize = 2;
/// Services: `web` (segments dropped, so retransmitted), `closed` (nothing
/// listens: refused), `rst` (the client resets with SO_LINGER 0).
const TCP_SERVICES: [&str; 6] = [
    "--service",
    "web=tcp/19621",
    "--service",
    "closed=tcp/19622",
    "--service",
    "rst=tcp/19623",
];

/// `iptables` in a namespace.
fn iptables(ns: &Netns, rule: &str) {
    let args: Vec<&str> = rule.split(' ').collect();
    ns.exec("iptables", &args);
}

/// Known TCP traffic from a to b, with losses the capture on b sees
/// before they happen: b drops every 4th SYN and every 9th segment to
/// 19621 after tcpdump's tap (netfilter INPUT), a every 9th segment from
/// it, so both sides retransmit (SYNs and SYN-ACKs included). Then
/// connections to a closed port, and resets.
fn tcp_health_traffic(p: &netpulse_tests::netns::Pair) {
    let server = p.addr_b;
    for rule in [
        "-A INPUT -p tcp --dport 19621 --syn -m statistic --mode nth --every 4 --packet 0 -j DROP",
        "-A INPUT -p tcp --dport 19621 -m statistic --mode nth --every 9 --packet 0 -j DROP",
    ] {
        iptables(&p.b, rule);
    }
    iptables(
        &p.a,
        "-A INPUT -p tcp --sport 19621 -m statistic --mode nth --every 9 --packet 4 -j DROP",
    );
    let (web_l, rst_l) = p.b.run(move || {
        (
            TcpListener::bind((server, 19621)).unwrap(),
            TcpListener::bind((server, 19623)).unwrap(),
        )
    });
    let web = std::thread::spawn(move || {
        for _ in 0..TCP_CONNS {
            let (mut s, _) = web_l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).unwrap();
            s.write_all(&[7u8; 20_000]).unwrap();
        }
    });
    let rst = std::thread::spawn(move || {
        for _ in 0..TCP_RESETS {
            let (mut s, _) = rst_l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 64];
            assert_eq!(s.read(&mut buf).unwrap(), 5);
            // The reset.
            assert!(s.read(&mut buf).is_err());
        }
    });
    p.a.run(move || {
        for i in 0..TCP_CONNS {
            let to = std::net::SocketAddr::from((server, 19621));
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(30)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            s.write_all(&vec![1u8; 20_000 + i * 1000]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).unwrap();
            assert_eq!(buf.len(), 20_000);
        }
        for _ in 0..TCP_REFUSED {
            let e = TcpStream::connect((server, 19622)).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        }
        for _ in 0..TCP_RESETS {
            let mut s = TcpStream::connect((server, 19623)).unwrap();
            s.write_all(b"hello").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid socket and a linger struct of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0);
            drop(s);
        }
    });
    web.join().unwrap();
    rst.join().unwrap();
}

/// tshark's fields of the packets `filter` matches, one Vec per packet.
fn tshark_fields(file: &Path, filter: &str, fields: &[&str]) -> Vec<Vec<String>> {
    let mut args = vec!["-r", file.to_str().unwrap(), "-Y", filter, "-T", "fields"];
    for f in fields {
        args.extend_from_slice(&["-e", f]);
    }
    let out = sh("tshark", &args);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// Frames `filter` matches, as tshark counts them.
fn tshark_count(file: &Path, filter: &str) -> u64 {
    pcapfile::tshark_io(file, &[filter])[0].0
}

#[test]
fn tcp_figures_match_tshark_retransmissions_and_initial_rtt() {
    if !tools()
        || !require("root (network namespaces)", is_root())
        || !require("iptables (its statistic match)", have("iptables"))
    {
        return;
    }
    let p = netpulse_tests::netns::Pair::np6("tt", 21);
    let file = dir().join("tcp.pcap");
    let cap = Tcpdump::start(&p.b, &p.dev_b, &file);
    tcp_health_traffic(&p);
    cap.stop();
    let r = analyze(&file, &TCP_SERVICES);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let tcp = |svc: &str| -> Value {
        r.json["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == svc)
            .unwrap_or_else(|| panic!("no service {svc}"))["tcp"]
            .clone()
    };
    let (web, closed, rst) = (tcp("web"), tcp("closed"), tcp("rst"));
    eprintln!("web {web}\nclosed {closed}\nrst {rst}");

    // Retransmissions: tshark's count, per service and per direction.
    for (svc, t, port) in [
        ("web", &web, 19621),
        ("closed", &closed, 19622),
        ("rst", &rst, 19623),
    ] {
        let all = format!("tcp.analysis.retransmission && tcp.port=={port}");
        let to = format!("tcp.analysis.retransmission && tcp.dstport=={port}");
        assert_eq!(
            n(&t["retransmits"]),
            tshark_count(&file, &all),
            "{svc}: {t}"
        );
        assert_eq!(
            n(&t["retransmits_ingress"]),
            tshark_count(&file, &to),
            "{svc}: {t}"
        );
    }
    // The drops made retransmissions both ways, SYNs among them.
    assert!(n(&web["retransmits_ingress"]) > 0, "{web}");
    assert!(n(&web["retransmits_egress"]) > 0, "{web}");
    assert!(
        tshark_count(
            &file,
            "tcp.analysis.retransmission && tcp.port==19621 && tcp.flags.syn==1"
        ) > 0,
        "no SYN was retransmitted"
    );

    // Results.
    assert_eq!(n(&web["established"]), TCP_CONNS as u64, "{web}");
    assert_eq!(n(&web["closed"]), TCP_CONNS as u64, "{web}");
    assert_eq!(n(&web["open"]), 0, "{web}");
    assert_eq!((n(&web["refused"]), n(&web["reset"])), (0, 0), "{web}");
    assert_eq!(n(&closed["refused"]), TCP_REFUSED as u64, "{closed}");
    assert_eq!(n(&closed["established"]), 0, "{closed}");
    assert_eq!(
        tshark_count(&file, "tcp.port==19622 && tcp.flags.reset==1"),
        TCP_REFUSED as u64
    );
    assert_eq!(n(&rst["established"]), TCP_RESETS as u64, "{rst}");
    assert_eq!(n(&rst["reset"]), TCP_RESETS as u64, "{rst}");
    assert_eq!(n(&rst["closed"]), 0, "{rst}");
    assert_eq!(n(&rst["open"]), 0, "{rst}");

    // Handshakes: tshark's initial RTT of each established stream (it
    // gives refused ones one too, SYN to RST-ACK: not handshakes). The
    // capture has microsecond timestamps and tshark prints nanoseconds,
    // so the values are the same to the microsecond: the same count, sum,
    // buckets and median.
    let bounds: Vec<u64> = r.json["tcp"]["handshake_bounds_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(n)
        .collect();
    for (svc, t, port) in [("web", &web, 19621), ("rst", &rst, 19623)] {
        let established: std::collections::BTreeSet<String> = tshark_fields(
            &file,
            &format!("tcp.port=={port} && tcp.flags.syn==1 && tcp.flags.ack==1"),
            &["tcp.stream"],
        )
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
        let mut irtt: BTreeMap<String, u64> = BTreeMap::new();
        for row in tshark_fields(
            &file,
            &format!("tcp.port=={port} && tcp.analysis.initial_rtt"),
            &["tcp.stream", "tcp.analysis.initial_rtt"],
        ) {
            if established.contains(&row[0]) {
                let s: f64 = row[1].parse().unwrap();
                irtt.entry(row[0].clone())
                    .or_insert((s * 1e6).round() as u64);
            }
        }
        assert_eq!(irtt.len(), established.len(), "{svc}: {irtt:?}");
        let mut want: Vec<u64> = irtt.values().copied().collect();
        want.sort_unstable();
        let mut buckets = vec![0u64; bounds.len() + 1];
        for v in &want {
            buckets[bounds.iter().position(|b| v <= b).unwrap_or(bounds.len())] += 1;
        }
        assert_eq!(n(&t["handshakes"]), want.len() as u64, "{svc}: {t}");
        assert_eq!(
            n(&t["handshake_sum_us"]),
            want.iter().sum::<u64>(),
            "{svc}: {t}"
        );
        let got: Vec<u64> = t["handshake_buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(n)
            .collect();
        assert_eq!(got, buckets, "{svc}: {t}, tshark {want:?}");
        let median = want[want.len().div_ceil(2) - 1];
        assert_eq!(n(&t["handshake_p50_us"]), median, "{svc}: {t}");
    }
    // The table output has the TCP section.
    let out = Command::new(bin())
        .arg("analyze")
        .arg(&file)
        .args(TCP_SERVICES)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\nTCP (from headers"), "{text}");
    assert!(text.contains("HANDSHAKE P50"), "{text}");
    assert_eq!(r.json["tcp"]["unavailable"][0], "timeout");
    cleanup();
}
