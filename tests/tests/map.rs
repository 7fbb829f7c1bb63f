//! Who talks to whom (`GET /api/v1/map`, `netpulse_service_peer_*`), held
//! to tcpdump: the agent (eBPF backend) runs in namespace a of a veth pair
//! with a local service, clients in namespace b connect from several
//! addresses (one of them a named `remote` service's), and the agent's
//! namespace connects to a remote service in b. Every edge's packets and
//! bytes each way equal what tcpdump saw on the same link for that pair.
//! Then a flood of 100,000 random source addresses: named peers and the
//! top talker keep exact counts, every packet stays accounted for (named +
//! addresses + buckets + `~other` = the service's own counter), evictions
//! are counted, and memory stays bounded.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use netpulse::api_types::{MapEdge, ServiceMap};
use netpulse_tests::{
    PinDir,
    agent::{Agent, live_prerequisites, tc_both_ways},
    frames::{self, eth, ipv4, udp},
    netns::{Netns, Pair, Tcpdump, have, mac_of, run_in},
    require,
    scrape::{Metrics, get},
};

const WEB: u16 = 7201;
const API: u16 = 7202;
const NAMED_ONLY: u16 = 7209;
const TARGET: u16 = 7700;

/// The agent's config: listen, pins and state, one interface, no Docker,
/// the top-K, and `services`.
fn config(dir: &Path, pins: &PinDir, dev: &str, port: u16, top_k: usize, services: &str) -> String {
    format!(
        "[agent]\nlisten = \"127.0.0.1:{port}\"\npin_dir = \"{}\"\nstate_dir = \"{}\"\ninterfaces = [\"{dev}\"]\ndiscover_sockets = false\nmap_top_k = {top_k}\n\n[docker]\nenabled = false\n\n{services}",
        pins.path().display(),
        dir.join("state").display(),
    )
}

fn map(ns: &Netns, port: u16) -> ServiceMap {
    let (status, body) = run_in(&ns.name, move || {
        get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), "/api/v1/map")
    })
    .expect("GET /api/v1/map");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn edge<'m>(m: &'m ServiceMap, service: &str, peer: &str) -> &'m MapEdge {
    m.edges
        .iter()
        .find(|e| e.service == service && e.peer == peer)
        .unwrap_or_else(|| panic!("no edge {service} ← {peer} in {m:#?}"))
}

/// What tcpdump saw between two ends: (packets, bytes) each way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Seen {
    packets_in: u64,
    bytes_in: u64,
    packets_out: u64,
    bytes_out: u64,
}

/// Per (source, destination, source port, destination port): frames and
/// their wire lengths, read from a classic pcap file (Ethernet, IPv4, no
/// tags, as the test's link carries).
fn pcap_pairs(file: &Path) -> BTreeMap<(Ipv4Addr, Ipv4Addr, u16, u16), (u64, u64)> {
    let b = std::fs::read(file).unwrap();
    let le = match &b[..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        m => panic!("not a pcap file: {m:?}"),
    };
    let u32_at = |o: usize| {
        let w = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    assert_eq!(u32_at(20), 1, "link type is not Ethernet");
    let mut out: BTreeMap<_, (u64, u64)> = BTreeMap::new();
    let mut o = 24;
    while o + 16 <= b.len() {
        let incl = u32_at(o + 8) as usize;
        let orig = u64::from(u32_at(o + 12));
        let f = &b[o + 16..o + 16 + incl];
        o += 16 + incl;
        if f.len() < 34 || f[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &f[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let (sport, dport) = if ip.len() >= ihl + 4 {
            (
                u16::from_be_bytes([ip[ihl], ip[ihl + 1]]),
                u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]),
            )
        } else {
            (0, 0)
        };
        let e = out.entry((src, dst, sport, dport)).or_default();
        e.0 += 1;
        e.1 += orig;
    }
    out
}

/// tcpdump's figures of a service at `svc`:`port` and its peer `peer`
/// (in: peer → service, out: service → peer).
fn seen(
    pairs: &BTreeMap<(Ipv4Addr, Ipv4Addr, u16, u16), (u64, u64)>,
    svc: Ipv4Addr,
    port: u16,
    peer: Ipv4Addr,
) -> Seen {
    let mut s = Seen::default();
    for ((src, dst, sport, dport), (n, bytes)) in pairs {
        if *src == peer && *dst == svc && *dport == port {
            s.packets_in += n;
            s.bytes_in += bytes;
        }
        if *src == svc && *sport == port && *dst == peer {
            s.packets_out += n;
            s.bytes_out += bytes;
        }
    }
    s
}

fn figures(e: &MapEdge) -> Seen {
    Seen {
        packets_in: e.packets_in,
        bytes_in: e.bytes_in,
        packets_out: e.packets_out,
        bytes_out: e.bytes_out,
    }
}

/// A server that answers each request with `ok` until the client closes.
fn serve(ns: &Netns, addr: Ipv4Addr, port: u16) {
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let l = TcpListener::bind((addr, port)).unwrap();
        tx.send(()).unwrap();
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(b"ok").is_err() {
                        break;
                    }
                }
            });
        }
    });
    rx.recv().unwrap();
}

fn sockaddr(a: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as u16;
    sa.sin_port = port.to_be();
    sa.sin_addr.s_addr = u32::from(a).to_be();
    sa
}

/// A TCP connection from `from` (port chosen by the kernel) to `to`.
fn connect_from(from: Ipv4Addr, to: Ipv4Addr, port: u16) -> TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor owned by the stream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let s = TcpStream::from_raw_fd(fd);
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        let me = sockaddr(from, 0);
        assert_eq!(
            libc::bind(fd, (&raw const me).cast(), len),
            0,
            "bind {from}"
        );
        let peer = sockaddr(to, port);
        assert_eq!(
            libc::connect(fd, (&raw const peer).cast(), len),
            0,
            "connect {to}:{port}: {}",
            std::io::Error::last_os_error()
        );
        s
    }
}

/// `n` connections from `from` to `to`, each one request and its answer;
/// returns the slowest connect().
fn connect_n(ns: &Netns, from: Ipv4Addr, to: (Ipv4Addr, u16), n: usize, size: usize) -> Duration {
    ns.run(move || {
        let mut slowest = Duration::ZERO;
        for _ in 0..n {
            let t = Instant::now();
            let mut c = connect_from(from, to.0, to.1);
            slowest = slowest.max(t.elapsed());
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(&vec![1u8; size]).unwrap();
            let mut ok = [0u8; 2];
            c.read_exact(&mut ok).unwrap();
        }
        slowest
    })
}

fn peer_series(m: &Metrics, name: &str, service: &str, peer: &str, dir: &str) -> u64 {
    m.sum(
        name,
        &[("service", service), ("peer", peer), ("direction", dir)],
    )
}

#[test]
fn edges_and_their_counts_equal_tcpdumps_per_pair_counts() {
    if !(live_prerequisites() && require("tcpdump", have("tcpdump"))) {
        return;
    }
    let pair = Pair::new("map", 121);
    let (a, b) = (pair.addr_a, pair.addr_b);
    // Three more client addresses in b, reachable from a without ARP.
    let clients: Vec<Ipv4Addr> = (3..=5).map(|i| Ipv4Addr::new(10, 77, 121, i)).collect();
    let mac_b = mac_of(&pair.b, &pair.dev_b);
    for c in &clients {
        pair.b.exec(
            "ip",
            &["addr", "add", &format!("{c}/24"), "dev", &pair.dev_b],
        );
        pair.a.exec(
            "ip",
            &[
                "neigh",
                "replace",
                &c.to_string(),
                "lladdr",
                &mac_b,
                "dev",
                &pair.dev_a,
                "nud",
                "permanent",
            ],
        );
    }
    let (named_client, top, folded) = (clients[0], clients[1], clients[2]);
    let pins = PinDir::mounted("map");
    let dir = netpulse_tests::scratch("map");
    let (cfg, port) = (dir.join("config.toml"), 19521);
    // `api` is a remote service at b; `client` names the address
    // `named_client` (a remote service the agent never sees traffic to:
    // its address is what makes the peer named).
    let services = format!(
        r#"
[[service]]
name = "web"
endpoints = [{{ proto = "tcp", port = {WEB} }}]

[[service]]
name = "api"
remote = true
endpoints = [{{ proto = "tcp", port = {API}, addr = "{b}" }}]

[[service]]
name = "client"
remote = true
endpoints = [{{ proto = "tcp", port = {NAMED_ONLY}, addr = "{named_client}" }}]
"#
    );
    std::fs::write(&cfg, config(&dir, &pins, &pair.dev_a, port, 1, &services)).unwrap();
    serve(&pair.a, Ipv4Addr::UNSPECIFIED, WEB);
    serve(&pair.b, b, API);
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &dir.join("agent.log"));
    let m0 = agent.wait_for("probes and services", |m| {
        tc_both_ways(m, &pair.dev_a)
            && m.has("netpulse_service_info", &[("service", "web")])
            && m.has("netpulse_service_info", &[("service", "client")])
    });
    assert!(
        m0.has("netpulse_backend_info", &[("backend", "ebpf")]),
        "not counting with eBPF"
    );

    let pcap = dir.join("map.pcap");
    let tcpdump = Tcpdump::start(&pair.a, &pair.dev_a, &pcap);
    // Clients of web: the named one, the busiest unknown one (top-1), a
    // quieter one (folded into its /24 bucket), and b's own address (the
    // remote service `api`'s: named too).
    let to_web = (a, WEB);
    connect_n(&pair.b, named_client, to_web, 8, 3000);
    connect_n(&pair.b, top, to_web, 6, 2000);
    connect_n(&pair.b, folded, to_web, 2, 100);
    connect_n(&pair.b, b, to_web, 3, 500);
    // This host to the remote service.
    let slowest_connect = connect_n(&pair.a, a, (b, API), 4, 700);
    // Let the closes finish on both ends before counting.
    std::thread::sleep(Duration::from_millis(500));
    tcpdump.stop();

    let m = map(&pair.a, port);
    let pairs = pcap_pairs(&pcap);
    eprintln!("{}", serde_json::to_string_pretty(&m).unwrap());
    assert_eq!(m.top_k, 1);

    // web ← client (named by the remote service at its address).
    let e = edge(&m, "web", "client");
    assert_eq!(
        (e.source.as_str(), e.target.as_str()),
        ("remote:client", "service:web")
    );
    assert_eq!(figures(e), seen(&pairs, a, WEB, named_client));
    assert_eq!(e.connections, 8, "SYNs from the named client");
    // web ← api (b's address belongs to the remote service `api`).
    let e = edge(&m, "web", "api");
    assert_eq!(figures(e), seen(&pairs, a, WEB, b));
    assert_eq!(e.connections, 3);
    // The busiest unknown address is shown by address (top-1).
    let e = edge(&m, "web", &top.to_string());
    assert_eq!(e.source, format!("address:{top}"));
    assert_eq!(figures(e), seen(&pairs, a, WEB, top));
    assert_eq!(e.connections, 6);
    // The other one past the top-K: its /24 bucket.
    let e = edge(&m, "web", "10.77.121.0/24");
    assert_eq!(e.source, "bucket:10.77.121.0/24");
    assert_eq!(figures(e), seen(&pairs, a, WEB, folded));
    // Nothing else for web: the four edges are all of its traffic.
    let web: Vec<&str> = m
        .edges
        .iter()
        .filter(|e| e.service == "web")
        .map(|e| e.peer.as_str())
        .collect();
    assert_eq!(web.len(), 4, "{web:?}");
    // api: this host is the client side.
    let e = edge(&m, "api", "host");
    assert_eq!(
        (e.source.as_str(), e.target.as_str()),
        ("host", "remote:api")
    );
    assert_eq!(figures(e), seen(&pairs, b, API, a));
    assert_eq!(e.connections, 4);
    // Its TCP figures are this host's client side of `api`: a handshake
    // over a veth, within the slowest connect() the client timed.
    let p50 = e
        .handshake_p50_seconds
        .expect("the host edge's handshake p50");
    assert!(
        p50 > 0.0 && p50 <= slowest_connect.as_secs_f64(),
        "handshake p50 {p50} s, slowest connect {slowest_connect:?}"
    );
    assert_eq!(e.retransmits, 0, "retransmits over a quiet veth");
    // Edges to local services have no per-peer TCP figures.
    assert!(
        m.edges
            .iter()
            .filter(|e| e.service == "web")
            .all(|e| e.handshake_p50_seconds.is_none() && e.retransmits == 0)
    );
    for id in ["service:web", "remote:api", "remote:client", "host"] {
        assert!(m.nodes.iter().any(|n| n.id == id), "node {id} missing");
    }
    assert_eq!(m.evictions, 0);

    // The metrics: only peers that are named services, equal to tcpdump.
    let met = agent.metrics().unwrap();
    let pk = "netpulse_service_peer_packets_total";
    let by = "netpulse_service_peer_bytes_total";
    for (peer, addr) in [("client", named_client), ("api", b)] {
        let s = seen(&pairs, a, WEB, addr);
        assert_eq!(peer_series(&met, pk, "web", peer, "ingress"), s.packets_in);
        assert_eq!(peer_series(&met, pk, "web", peer, "egress"), s.packets_out);
        assert_eq!(peer_series(&met, by, "web", peer, "ingress"), s.bytes_in);
        assert_eq!(peer_series(&met, by, "web", peer, "egress"), s.bytes_out);
    }
    let peers = met.label_values(pk, "peer");
    assert_eq!(peers, vec!["api", "client"], "peers that are no services");
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).unwrap();
    }
    m
}

const FLOOD: u64 = 100_000;
/// The named peer's frames, sent before the flood; then it is quiet, the
/// kind of peer an LRU across everything forgets first (with one frame it
/// has no second hit to protect it).
const NAMED_FIRST: u64 = 1;
/// One frame in this many is from the top talker, who keeps talking.
const TOP_EVERY: u64 = 20;

/// Sends the flood out of `dev` (the calling thread's namespace) through
/// an AF_PACKET socket: `FLOOD` UDP frames to `to`:`TARGET`: the named
/// peer's first, then from random 10.x.y.z sources with the top talker's
/// frames mixed in. Returns (frames from random sources, from named, from top).
fn flood(
    dev: &str,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    to: [u8; 4],
    named: [u8; 4],
    top: [u8; 4],
) -> (u64, u64, u64) {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let ifindex = netpulse::probe::ifindex(dev).expect("sender interface");
    // SAFETY: zeroed sockaddr_ll, then the fields sendto needs.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&dst_mac);
    let mut rng = netpulse_tests::Rng(0x9e37_79b9_7f4a_7c15);
    let (mut random, mut from_named, mut from_top) = (0, 0, 0);
    for i in 0..FLOOD {
        let r = rng.u64().to_be_bytes();
        let src = if i < NAMED_FIRST {
            from_named += 1;
            named
        } else if i % TOP_EVERY == 0 {
            from_top += 1;
            top
        } else {
            random += 1;
            // Never 10.77.x.x (the test's own link).
            [10, r[0] | 0x80, r[1], r[2]]
        };
        let mut f = eth(
            &[],
            frames::ETH_IPV4,
            &ipv4(src, to, 17, 0, 0, &udp(40000, TARGET, 18)),
        );
        f[..6].copy_from_slice(&dst_mac);
        f[6..12].copy_from_slice(&src_mac);
        loop {
            // SAFETY: f and sll outlive the call.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS), "sendto: {e}");
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    (random, from_named, from_top)
}

#[test]
fn a_flood_of_random_sources_keeps_named_peers_and_the_top_k_and_counts_evictions() {
    if !live_prerequisites() {
        return;
    }
    let pair = Pair::new("mapflood", 122);
    let named = Ipv4Addr::new(10, 77, 122, 3);
    let top = Ipv4Addr::new(10, 77, 122, 4);
    let pins = PinDir::mounted("mapflood");
    let dir = netpulse_tests::scratch("mapflood");
    let (cfg, port) = (dir.join("config.toml"), 19522);
    let top_k = 5;
    let services = format!(
        r#"
[[service]]
name = "target"
endpoints = [{{ proto = "udp", port = {TARGET} }}]

[[service]]
name = "named"
remote = true
endpoints = [{{ proto = "tcp", port = {NAMED_ONLY}, addr = "{named}" }}]
"#
    );
    std::fs::write(
        &cfg,
        config(&dir, &pins, &pair.dev_a, port, top_k, &services),
    )
    .unwrap();
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &dir.join("agent.log"));
    agent.wait_for("probes and services", |m| {
        tc_both_ways(m, &pair.dev_a)
            && m.has("netpulse_backend_info", &[("backend", "ebpf")])
            && m.has("netpulse_service_info", &[("service", "named")])
    });
    let rss0 = rss_kib(agent.pid());
    pair.b.exec(
        "tc",
        &[
            "qdisc",
            "replace",
            "dev",
            &pair.dev_b,
            "root",
            "pfifo",
            "limit",
            "1000",
        ],
    );
    let (dst, src, dev, to) = (
        mac(&mac_of(&pair.a, &pair.dev_a)),
        mac(&mac_of(&pair.b, &pair.dev_b)),
        pair.dev_b.clone(),
        pair.addr_a.octets(),
    );
    let link0 = pair.a.link_stats(&pair.dev_a);
    let (random, from_named, from_top) = pair
        .b
        .run(move || flood(&dev, dst, src, to, named.octets(), top.octets()));
    std::thread::sleep(Duration::from_millis(500));
    let link = pair.a.link_stats(&pair.dev_a) - link0;
    assert_eq!(link.rx_packets, FLOOD, "the veth dropped frames");

    let t = Instant::now();
    let m = map(&pair.a, port);
    let took = t.elapsed();
    let rss1 = rss_kib(agent.pid());
    let met = agent.metrics().unwrap();
    let target: Vec<&MapEdge> = m.edges.iter().filter(|e| e.service == "target").collect();
    eprintln!(
        "flood: {random} random sources, {from_named} from the named peer, {from_top} from the top talker; {} edges of target, evictions {}; GET /api/v1/map {took:?}; agent RSS {rss0} -> {rss1} KiB",
        target.len(),
        m.evictions
    );
    // The named peer: exact, whatever the flood did to the LRU.
    let e = edge(&m, "target", "named");
    assert_eq!(e.packets_in, from_named);
    assert_eq!(e.source, "remote:named");
    // The top talker stays in the LRU (it keeps being seen) and first
    // among the addresses, exact.
    let addrs: Vec<&&MapEdge> = target
        .iter()
        .filter(|e| e.source.starts_with("address:"))
        .collect();
    assert_eq!(addrs.first().map(|e| e.peer.as_str()), Some("10.77.122.4"));
    assert_eq!(addrs[0].packets_in, from_top);
    // Bounded: named + top-K addresses + top-K buckets + ~other.
    assert!(addrs.len() <= top_k, "{} addresses", addrs.len());
    let buckets = target
        .iter()
        .filter(|e| e.source.starts_with("bucket:"))
        .count();
    assert!(buckets <= top_k, "{buckets} buckets");
    assert!(target.len() <= 1 + 2 * top_k + 1, "{} edges", target.len());
    // Every packet is in exactly one edge: the edges add up to the
    // service's own counter, and to what the link received.
    let sum: u64 = target.iter().map(|e| e.packets_in).sum();
    let counted = met.sum(
        "netpulse_service_packets_total",
        &[("service", "target"), ("direction", "ingress")],
    );
    assert_eq!(counted, FLOOD);
    assert_eq!(sum, counted, "edges do not add up to the service's count");
    let other = edge(&m, "target", "~other");
    assert!(other.packets_in > 0, "nothing folded into ~other");
    // Evictions: ~100,000 new addresses into an LRU of 16,384.
    let lru = u64::from(agent_ebpf::MAX_PEER_ADDRS);
    assert!(
        m.evictions >= random - lru - random / 100 && m.evictions <= random,
        "evictions {} for {random} random sources",
        m.evictions
    );
    // Memory: the kernel maps are preallocated; the agent keeps nothing
    // per packet or per address between requests.
    assert!(
        rss1 <= rss0 + 16 * 1024,
        "agent RSS grew from {rss0} to {rss1} KiB"
    );
    // The named-service series are there and exact.
    assert_eq!(
        peer_series(
            &met,
            "netpulse_service_peer_packets_total",
            "target",
            "named",
            "ingress"
        ),
        from_named
    );
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restarted_agent_keeps_each_named_peers_place_and_counts() {
    if !(live_prerequisites() && require("tcpdump", have("tcpdump"))) {
        return;
    }
    let pair = Pair::new("maprestart", 123);
    let (a, client) = (pair.addr_a, Ipv4Addr::new(10, 77, 123, 3));
    let mac_b = mac_of(&pair.b, &pair.dev_b);
    pair.b.exec(
        "ip",
        &["addr", "add", &format!("{client}/24"), "dev", &pair.dev_b],
    );
    pair.a.exec(
        "ip",
        &[
            "neigh",
            "replace",
            &client.to_string(),
            "lladdr",
            &mac_b,
            "dev",
            &pair.dev_a,
            "nud",
            "permanent",
        ],
    );
    let pins = PinDir::mounted("maprestart");
    let dir = netpulse_tests::scratch("maprestart");
    let (cfg, port) = (dir.join("config.toml"), 19523);
    let services = format!(
        r#"
[[service]]
name = "web"
endpoints = [{{ proto = "tcp", port = {WEB} }}]

[[service]]
name = "client"
remote = true
endpoints = [{{ proto = "tcp", port = {NAMED_ONLY}, addr = "{client}" }}]
"#
    );
    std::fs::write(&cfg, config(&dir, &pins, &pair.dev_a, port, 5, &services)).unwrap();
    serve(&pair.a, Ipv4Addr::UNSPECIFIED, WEB);
    let pcap = dir.join("restart.pcap");
    let tcpdump = Tcpdump::start(&pair.a, &pair.dev_a, &pcap);
    let ready = |m: &Metrics| {
        tc_both_ways(m, &pair.dev_a) && m.has("netpulse_service_info", &[("service", "client")])
    };
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &dir.join("agent.log"));
    agent.wait_for("the first agent", ready);
    connect_n(&pair.b, client, (a, WEB), 3, 1000);
    std::thread::sleep(Duration::from_millis(300));
    agent.stop();
    // Between the two agents the link carries nothing: no packet goes
    // uncounted.
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &dir.join("agent.log"));
    agent.wait_for("the restarted agent", ready);
    connect_n(&pair.b, client, (a, WEB), 2, 1000);
    std::thread::sleep(Duration::from_millis(500));
    tcpdump.stop();
    let m = map(&pair.a, port);
    let e = edge(&m, "web", "client");
    assert_eq!(e.connections, 5, "connections before and after the restart");
    assert_eq!(figures(e), seen(&pcap_pairs(&pcap), a, WEB, client));
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
