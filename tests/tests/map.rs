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
    // Each of web's edges has its clients' handshakes (server side: from
    // the SYN the ingress hook saw to ESTABLISHED), none retransmitted.
    for e in m.edges.iter().filter(|e| e.service == "web") {
        let p50 = e.handshake_p50_seconds.unwrap_or(-1.0);
        assert!(p50 > 0.0 && p50 < 0.05, "{e:?}");
        assert_eq!(e.retransmits, 0, "{e:?}");
    }
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

/// Pins the calling thread to CPU `n` (`usize::MAX`: the last one).
fn pin_to_cpu(n: usize) {
    // Not available_parallelism: it follows this thread's own affinity.
    // SAFETY: a plain query.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let n = n.min(cpus - 1);
    // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(n, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
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
        // Half on the first CPU, half on the last: the receiving side runs
        // on the sender's CPU, so every per-CPU table is summed.
        // (The queue drained first: the CPU that runs a busy queue keeps
        // running it.)
        if i == 0 || i == FLOOD / 2 {
            std::thread::sleep(Duration::from_millis(200));
            pin_to_cpu(if i == 0 { 0 } else { usize::MAX });
        }
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
    // per packet or per address between requests. A read of the full
    // tables costs some transient memory (the allocator may keep it),
    // and reading again does not add to it.
    assert!(
        rss1 <= rss0 + 24 * 1024,
        "agent RSS grew from {rss0} to {rss1} KiB"
    );
    // Reads on a runtime thread that has not read yet warm its allocator
    // arena once: three first, then three more that must add nothing.
    for _ in 0..3 {
        map(&pair.a, port);
    }
    let rss1 = rss_kib(agent.pid());
    for _ in 0..3 {
        map(&pair.a, port);
    }
    let rss2 = rss_kib(agent.pid());
    assert!(
        rss2 <= rss1 + 4 * 1024,
        "agent RSS grew from {rss1} to {rss2} KiB over three more reads"
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

/// `TcpRetransSegs` of a namespace (nstat's source, /proc/net/snmp).
fn retrans_segs(ns: &Netns) -> u64 {
    let out = ns.exec("cat", &["/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(head), Some(vals)) = (lines.next(), lines.next()) else {
        panic!("no Tcp: lines in /proc/net/snmp");
    };
    let i = head
        .split_whitespace()
        .position(|h| h == "RetransSegs")
        .expect("RetransSegs");
    vals.split_whitespace().nth(i).unwrap().parse().unwrap()
}

#[test]
fn retransmits_per_edge_equal_the_kernels_and_go_to_the_lossy_client() {
    if !(live_prerequisites() && require("nft (nftables)", have("nft"))) {
        return;
    }
    const BULK: u16 = 7203;
    const SIZE: usize = 1 << 20;
    let pair = Pair::new("mapretx", 124);
    let a = pair.addr_a;
    let (lossy, clean) = (Ipv4Addr::new(10, 77, 124, 3), Ipv4Addr::new(10, 77, 124, 4));
    let mac_b = mac_of(&pair.b, &pair.dev_b);
    for c in [lossy, clean] {
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
    let pins = PinDir::mounted("mapretx");
    let dir = netpulse_tests::scratch("mapretx");
    let (cfg, port) = (dir.join("config.toml"), 19524);
    let services = format!(
        "[[service]]\nname = \"bulk\"\nendpoints = [{{ proto = \"tcp\", port = {BULK} }}]\n"
    );
    std::fs::write(&cfg, config(&dir, &pins, &pair.dev_a, port, 5, &services)).unwrap();
    // A server that sends SIZE bytes to each client after its first byte.
    let (tx, rx) = std::sync::mpsc::channel();
    pair.a.spawn(move || {
        let l = TcpListener::bind((a, BULK)).unwrap();
        tx.send(()).unwrap();
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            std::thread::spawn(move || {
                let mut one = [0u8; 1];
                if c.read_exact(&mut one).is_ok() {
                    let _ = c.write_all(&vec![5u8; SIZE]);
                }
            });
        }
    });
    rx.recv().unwrap();
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &dir.join("agent.log"));
    agent.wait_for("probes", |m| {
        tc_both_ways(m, &pair.dev_a) && m.has("netpulse_service_info", &[("service", "bulk")])
    });
    // In the clients' namespace, every 7th data segment to the lossy one
    // is dropped: the server retransmits to it, and only to it.
    let nft = |args: &str| {
        let out = pair.b.exec("nft", &args.split(' ').collect::<Vec<_>>());
        assert!(
            out.status.success(),
            "nft {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    nft("add table inet npmapx");
    nft("add chain inet npmapx in { type filter hook input priority 0 ; }");
    nft(&format!(
        "add rule inet npmapx in ip daddr {lossy} tcp sport {BULK} numgen inc mod 7 == 0 drop"
    ));
    let rs0 = retrans_segs(&pair.a);
    for from in [lossy, clean] {
        pair.b.run(move || {
            for _ in 0..3 {
                let mut c = connect_from(from, a, BULK);
                c.write_all(b"g").unwrap();
                let mut got = Vec::new();
                c.read_to_end(&mut got).unwrap();
                assert_eq!(got.len(), SIZE);
            }
        });
    }
    // The server's sockets close after the clients read to the end.
    std::thread::sleep(Duration::from_millis(500));
    let rs = retrans_segs(&pair.a) - rs0;
    let m = map(&pair.a, port);
    let (l, c) = (
        edge(&m, "bulk", &lossy.to_string()),
        edge(&m, "bulk", &clean.to_string()),
    );
    let service = agent.metrics().unwrap().sum(
        "netpulse_service_tcp_retransmits_total",
        &[("service", "bulk")],
    );
    eprintln!(
        "retransmitted: TcpRetransSegs {rs}, the service {service}, edge {lossy} {}, edge {clean} {}; handshake p50 {:?} / {:?}",
        l.retransmits, c.retransmits, l.handshake_p50_seconds, c.handshake_p50_seconds
    );
    assert!(rs > 0, "the rule caused retransmissions");
    assert_eq!(
        l.retransmits, rs,
        "the lossy client's edge has every retransmit"
    );
    assert_eq!(c.retransmits, 0, "the clean client's edge has none");
    // Connections are SYNs seen: the lossy client's SYN is sent again
    // when its SYN-ACK was dropped.
    assert_eq!(c.connections, 3, "{c:?}");
    assert!(l.connections >= 3, "{l:?}");
    for e in [l, c] {
        let p50 = e.handshake_p50_seconds.unwrap_or(-1.0);
        assert!(p50 > 0.0 && p50 < 0.05, "{e:?}");
    }
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The kernel half alone, on crafted IPv6 frames (BPF_PROG_TEST_RUN): a
/// named peer's SYN, an unknown peer's segments both ways (a GSO skb of 4
/// on TC), each in its place, its LRU way and its /48 bucket, with the
/// service's own counters as the reference.
#[test]
fn the_kernel_counts_ipv6_peers_named_and_unknown_gso_included() {
    use agent_ebpf::{
        EndpointKey, FAMILY_V6, FIRST_SERVICE_SLOT, PROTO_TCP, ROLE_LOCAL, ROLE_REMOTE,
    };
    use netpulse::probe::{Hook, Probe};
    use netpulse_tests::frames::{TCP_ACK, TCP_SYN, ipv6, tcp, v6};
    if !require(
        "root (CAP_BPF) for BPF_PROG_TEST_RUN",
        netpulse_tests::is_root(),
    ) {
        return;
    }
    let pins = PinDir::new("mapv6");
    let mut probe = Probe::load(pins.path()).expect("load the eBPF object");
    let (web, db) = (FIRST_SERVICE_SLOT, FIRST_SERVICE_SLOT + 1);
    let named = v6(9);
    let mut unknown = v6(7);
    unknown[2..8].copy_from_slice(&[0, 1, 0, 2, 0, 3]); // fd00:1:2:3::7
    let key = |role, addr: &[u8], port| {
        let mut k = EndpointKey {
            family: FAMILY_V6,
            proto: PROTO_TCP,
            port,
            role,
            ..Default::default()
        };
        k.set_addr(addr);
        k
    };
    // web on every address; db, a remote service, names `named`.
    probe
        .sync_table(BTreeMap::from([
            (key(ROLE_LOCAL, &[], 443), web),
            (key(ROLE_REMOTE, &named, 5432), db),
        ]))
        .unwrap();
    let local = v6(1);
    let frame = |src, dst, sport, dport, flags| {
        eth(
            &[],
            frames::ETH_IPV6,
            &ipv6(src, dst, &[], PROTO_TCP, &tcp(sport, dport, flags, 5, 100)),
        )
    };
    let syn = frame(named, local, 40000, 443, TCP_SYN);
    probe.test_run(Hook::Xdp, &syn, 0, 1).unwrap();
    let seg = frame(unknown, local, 40001, 443, TCP_ACK);
    for _ in 0..3 {
        probe.test_run(Hook::Xdp, &seg, 0, 1).unwrap();
    }
    let back = frame(local, unknown, 443, 40001, TCP_ACK);
    probe.test_run(Hook::Tc, &back, 4, 1).unwrap();

    let reader = netpulse::peers::Reader::open(probe.pin_dir().unwrap()).unwrap();
    let snap = reader.read(&[web].into_iter().collect(), true);
    let named_ip = std::net::IpAddr::from(named);
    let unknown_ip = std::net::IpAddr::from(unknown);
    let n = snap.named[&(web, named_ip)];
    assert_eq!(
        (n.packets, n.bytes, n.conns),
        ([1, 0], [syn.len() as u64, 0], 1)
    );
    let u = snap.addrs[&(web, unknown_ip)].total();
    let service = probe.counts(web).unwrap();
    // Both peers together are every packet and byte of the service.
    assert_eq!(u.packets, [3, 4]);
    assert_eq!(
        [n.bytes[0] + u.bytes[0], u.bytes[1]],
        [service.dir[0].bytes, service.dir[1].bytes]
    );
    assert_eq!(
        [n.packets[0] + u.packets[0], u.packets[1]],
        [service.dir[0].packets, service.dir[1].packets]
    );
    assert_eq!(u.conns, 0, "ACKs open no connection");
    let b = snap.buckets[&(web, netpulse::peers::bucket(&unknown_ip))];
    assert_eq!(netpulse::peers::bucket(&unknown_ip).1, 48);
    assert_eq!((b.packets, b.bytes), (u.packets, u.bytes));
    // One LRU way per path, none forgotten.
    assert_eq!((snap.inserts, snap.live, snap.evictions()), (2, 2, 0));
}
