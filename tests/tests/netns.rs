//! Live traffic through the real agent: two network namespaces joined by a
//! veth pair, `netpulse run` in one of them with servers beside it, a client
//! in the other. What /metrics reports must equal what was sent, and what the
//! kernel's own interface counters (`ip -s link`) saw, across a restart.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use netpulse_tests::{
    PinDir,
    agent::{Agent, Live, live_prerequisites, tc_both_ways},
    netns::{LinkStats, Pair, Tcpdump, have},
    require,
    scrape::Metrics,
};

const TCP_PORT: u16 = 7001;
const UDP_PORT: u16 = 7002;
const DISCOVERED_PORT: u16 = 7003;
const METRICS_PORT: u16 = 19477;
const UDP_DATAGRAMS: u64 = 20;
const UDP_PAYLOAD: usize = 100;
const PINGS: u64 = 5;
const TCP_UPLOAD: usize = 200_000;
const TCP_REPLY: usize = 50_000;

fn prerequisites() -> bool {
    live_prerequisites() && require("ping (iputils-ping)", have("ping"))
}

fn scrape(agent: &Agent) -> Metrics {
    agent.metrics().expect("GET /metrics")
}

/// Servers in namespace a: TCP (read all, reply), UDP echo, and a TCP
/// listener the config does not name (found through socket discovery).
fn start_servers(pair: &Pair) {
    let addr = pair.addr_a;
    pair.a.spawn(move || {
        let l = TcpListener::bind((addr, TCP_PORT)).unwrap();
        for conn in l.incoming() {
            let Ok(mut c) = conn else { break };
            let mut buf = Vec::new();
            c.read_to_end(&mut buf).unwrap();
            assert_eq!(buf.len(), TCP_UPLOAD);
            c.write_all(&vec![7u8; TCP_REPLY]).unwrap();
        }
    });
    pair.a.spawn(move || {
        let s = UdpSocket::bind((addr, UDP_PORT)).unwrap();
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            s.send_to(&buf[..n], from).unwrap();
        }
    });
    pair.a.spawn(move || {
        let l = TcpListener::bind((addr, DISCOVERED_PORT)).unwrap();
        for conn in l.incoming() {
            drop(conn);
        }
    });
}

/// One round of known traffic from namespace b.
fn send_traffic(pair: &Pair) {
    let to = pair.addr_a;
    pair.b.run(move || {
        let mut c = TcpStream::connect((to, TCP_PORT)).unwrap();
        c.write_all(&vec![1u8; TCP_UPLOAD]).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert_eq!(back.len(), TCP_REPLY);

        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..UDP_DATAGRAMS {
            u.send_to(&[9u8; UDP_PAYLOAD], (to, UDP_PORT)).unwrap();
            let (n, _) = u.recv_from(&mut buf).expect("UDP echo");
            assert_eq!(n, UDP_PAYLOAD);
        }

        drop(TcpStream::connect((to, DISCOVERED_PORT)).unwrap());
    });
    let out = pair.b.exec(
        "ping",
        &[
            "-c",
            &PINGS.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            &to.to_string(),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{PINGS} received")));
}

/// The kernel's counters of both veth ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Link {
    a: LinkStats,
    b: LinkStats,
}

impl std::ops::Sub for Link {
    type Output = Link;
    fn sub(self, o: Link) -> Link {
        Link {
            a: self.a - o.a,
            b: self.b - o.b,
        }
    }
}

/// Waits until the link has been quiet for a while (the last ACKs of the TCP
/// close), then returns its counters.
fn settled(pair: &Pair) -> Link {
    let read = || Link {
        a: pair.a.link_stats(&pair.dev_a),
        b: pair.b.link_stats(&pair.dev_b),
    };
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_millis(400));
        let now = read();
        if now == last {
            return now;
        }
        last = now;
    }
}

fn flag(m: &Metrics, service: &str, dir: &str, flag: &str) -> u64 {
    m.sum(
        "netpulse_service_tcp_flags_total",
        &[("service", service), ("direction", dir), ("flag", flag)],
    )
}

#[test]
fn live_traffic_is_counted_exactly_and_survives_a_restart() {
    if !prerequisites() {
        return;
    }
    let pair = Pair::new("live", 91);
    let pins = PinDir::mounted("live");
    let dir = netpulse_tests::scratch("live");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
listen = "127.0.0.1:{METRICS_PORT}"
pin_dir = "{pins}"
refresh_seconds = 0.2

[[service]]
name = "echo-tcp"
endpoints = [{{ proto = "tcp", port = {TCP_PORT} }}]

[[service]]
name = "echo-udp"
endpoints = [{{ proto = "udp", port = {UDP_PORT}, addr = "{a}" }}]

[[service]]
name = "ping"
endpoints = [{{ proto = "icmp", addr = "{a}" }}]

# A check for the dashboards' check panels, on loopback's port 1 (refused):
# no service's traffic.
[[check]]
name = "nothing-there"
kind = "tcp"
target = "127.0.0.1:1"
interval_seconds = 0.2
"#,
            pins = pins.path().display(),
            a = pair.addr_a,
        ),
    )
    .unwrap();
    let log = dir.join("agent.log");
    start_servers(&pair);
    // Servers run in this test process: socket discovery names the
    // undeclared one after it.
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let discovered = netpulse::identity::name_from_process(comm.trim());

    let mut agent = Agent::start(&pair.a, &[], &config, METRICS_PORT, &log);
    let m = agent.wait_for("probes and services", |m| {
        m.has(
            "netpulse_probe_attached",
            &[("interface", pair.dev_a.as_str()), ("hook", "tc")],
        ) && m.has(
            "netpulse_probe_attached",
            &[("interface", "lo"), ("hook", "tc")],
        ) && m.has(
            "netpulse_service_info",
            &[("service", discovered.as_str()), ("source", "socket")],
        ) && m.has(
            "netpulse_check_phase_duration_seconds",
            &[("check", "nothing-there")],
        )
    });
    // A veth counts ingress with TC (its XDP would copy every skb from a
    // local socket); lo has no native XDP.
    assert!(m.has(
        "netpulse_probe_attached",
        &[
            ("interface", pair.dev_a.as_str()),
            ("hook", "tc"),
            ("mode", "ingress"),
            ("zone", "host")
        ]
    ));
    assert!(!m.has(
        "netpulse_probe_attached",
        &[("interface", pair.dev_a.as_str()), ("hook", "xdp")]
    ));
    assert!(m.has(
        "netpulse_probe_attached",
        &[
            ("interface", "lo"),
            ("hook", "tc"),
            ("mode", "ingress"),
            ("zone", "host")
        ]
    ));
    for s in ["echo-tcp", "echo-udp", "ping"] {
        assert!(m.has(
            "netpulse_service_info",
            &[("service", s), ("source", "config")]
        ));
    }
    // Every metric the shipped dashboards query is one the agent serves;
    // the TCP health series appear with a service's first connection and
    // the drop series with its first drop (only non-zero reasons are
    // exported), the peer series with a named-service peer's first packet:
    // the Prometheus and service-map tests cause them and query them.
    const WITH_THEIR_FIRST_EVENT: [&str; 9] = [
        "netpulse_service_peer_packets_total",
        "netpulse_service_peer_bytes_total",
        "netpulse_service_kernel_drops_total",
        "netpulse_unattributed_kernel_drops_total",
        "netpulse_service_tcp_connections_total",
        "netpulse_service_tcp_open_connections",
        "netpulse_service_tcp_retransmits_total",
        "netpulse_service_tcp_handshake_seconds",
        "netpulse_service_tcp_rtt_seconds",
    ];
    for name in dashboard_metrics() {
        assert!(
            m.0.contains_key(&name) || WITH_THEIR_FIRST_EVENT.iter().any(|f| name.starts_with(f)),
            "dashboards query {name}, which /metrics lacks"
        );
    }

    let link0 = settled(&pair);
    let m0 = scrape(&agent);
    send_traffic(&pair);
    let link1 = settled(&pair);
    let m1 = scrape(&agent);
    check_round(&m0, &m1, link1 - link0, &discovered, 1);

    // Restart: the counters continue from the pinned maps.
    agent.stop();
    let mut agent = Agent::start(&pair.a, &[], &config, METRICS_PORT, &log);
    let m2 = agent.wait_for("the restarted agent", |m| {
        m.has(
            "netpulse_probe_attached",
            &[("interface", pair.dev_a.as_str())],
        ) && m.has("netpulse_service_info", &[("service", discovered.as_str())])
    });
    for s in ["echo-tcp", "echo-udp", "ping", discovered.as_str()] {
        for d in ["ingress", "egress"] {
            assert_eq!(m2.packets(s, d), m1.packets(s, d), "{s} {d} after restart");
            assert_eq!(m2.bytes(s, d), m1.bytes(s, d), "{s} {d} after restart");
        }
    }
    send_traffic(&pair);
    let link2 = settled(&pair);
    let m3 = scrape(&agent);
    check_round(&m0, &m3, link2 - link0, &discovered, 2);
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Checks the counters moved from `a` to `b` by `rounds` rounds of traffic,
/// which the kernel saw on the veth as `link`.
fn check_round(a: &Metrics, b: &Metrics, link: Link, discovered: &str, rounds: u64) {
    let d = |f: fn(&Metrics, &str, &str) -> u64, s: &str, dir: &str| f(b, s, dir) - f(a, s, dir);
    let services = ["echo-tcp", "echo-udp", "ping", discovered];

    // UDP and ICMP: exactly what was sent, both ways.
    let udp_frame = (14 + 20 + 8 + UDP_PAYLOAD) as u64;
    assert_eq!(
        d(Metrics::packets, "echo-udp", "ingress"),
        rounds * UDP_DATAGRAMS
    );
    assert_eq!(
        d(Metrics::packets, "echo-udp", "egress"),
        rounds * UDP_DATAGRAMS
    );
    assert_eq!(
        d(Metrics::bytes, "echo-udp", "ingress"),
        rounds * UDP_DATAGRAMS * udp_frame
    );
    assert_eq!(
        d(Metrics::bytes, "echo-udp", "egress"),
        rounds * UDP_DATAGRAMS * udp_frame
    );
    let ping_frame = 14 + 20 + 8 + 56;
    assert_eq!(d(Metrics::packets, "ping", "ingress"), rounds * PINGS);
    assert_eq!(d(Metrics::packets, "ping", "egress"), rounds * PINGS);
    assert_eq!(
        d(Metrics::bytes, "ping", "ingress"),
        rounds * PINGS * ping_frame
    );
    assert_eq!(
        d(Metrics::bytes, "ping", "egress"),
        rounds * PINGS * ping_frame
    );

    // TCP: one connection per round to each TCP service, each opened and
    // closed once in each direction.
    for s in ["echo-tcp", discovered] {
        assert_eq!(
            flag(b, s, "ingress", "syn") - flag(a, s, "ingress", "syn"),
            rounds,
            "{s} SYN in"
        );
        assert_eq!(
            flag(b, s, "egress", "syn") - flag(a, s, "egress", "syn"),
            rounds,
            "{s} SYN-ACK out"
        );
        assert_eq!(
            flag(b, s, "ingress", "fin") - flag(a, s, "ingress", "fin"),
            rounds,
            "{s} FIN in"
        );
        assert_eq!(
            flag(b, s, "egress", "fin") - flag(a, s, "egress", "fin"),
            rounds,
            "{s} FIN out"
        );
    }
    // The upload alone is at least TCP_UPLOAD bytes of payload in.
    assert!(d(Metrics::bytes, "echo-tcp", "ingress") > (rounds as usize * TCP_UPLOAD) as u64);
    assert!(d(Metrics::bytes, "echo-tcp", "egress") > (rounds as usize * TCP_REPLY) as u64);

    // Everything on the veth belongs to one of the services, and the sums
    // equal the kernel's own interface counters, packet for packet and byte
    // for byte: our bytes are whole Ethernet frames, and so are the veth's
    // (with TC on ingress it stays out of NAPI mode, which would count
    // frames without their Ethernet header).
    let sum = |f: fn(&Metrics, &str, &str) -> u64, dir: &str| {
        services.iter().map(|s| d(f, s, dir)).sum::<u64>()
    };
    let checks = [
        (
            "ingress packets = our rx",
            sum(Metrics::packets, "ingress"),
            link.a.rx_packets,
        ),
        (
            "ingress packets = peer tx",
            sum(Metrics::packets, "ingress"),
            link.b.tx_packets,
        ),
        (
            "ingress bytes = our rx",
            sum(Metrics::bytes, "ingress"),
            link.a.rx_bytes,
        ),
        (
            "ingress bytes = peer tx",
            sum(Metrics::bytes, "ingress"),
            link.b.tx_bytes,
        ),
        (
            "egress packets = our tx",
            sum(Metrics::packets, "egress"),
            link.a.tx_packets,
        ),
        (
            "egress bytes = our tx",
            sum(Metrics::bytes, "egress"),
            link.a.tx_bytes,
        ),
        (
            "egress packets = peer rx",
            sum(Metrics::packets, "egress"),
            link.b.rx_packets,
        ),
        (
            "egress bytes = peer rx",
            sum(Metrics::bytes, "egress"),
            link.b.rx_bytes,
        ),
    ];
    for (what, ours, kernel) in checks {
        assert_eq!(ours, kernel, "{what} (ip -s link): {link:?}");
    }
}

/// The `netpulse_*` metric names used in the dashboards' queries.
fn dashboard_metrics() -> std::collections::BTreeSet<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards");
    let mut names = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().extension().is_none_or(|x| x != "json") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut exprs = Vec::new();
        collect_exprs(&v, &mut exprs);
        assert!(!exprs.is_empty(), "{} has no queries", e.path().display());
        for ex in exprs {
            let mut rest = ex.as_str();
            while let Some(i) = rest.find("netpulse_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                names.insert(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    assert!(!names.is_empty());
    names
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// 802.1Q-tagged frames on a TC hook: the receiving kernel moves the outer
/// tag into the skb's metadata before TC ingress runs, so the program must
/// add its 4 bytes back to count whole frames as the wire (and tcpdump)
/// carries them. 30 single-tagged and 10 double-tagged (QinQ) UDP frames
/// from namespace b, sent raw (AF_PACKET) to the service in a.
#[test]
fn vlan_tagged_frames_count_their_whole_length_on_tc() {
    if !prerequisites() || !require("tcpdump", have("tcpdump")) {
        return;
    }
    use netpulse_tests::frames::{self, eth, ipv4, udp};
    const PORT: u16 = 7302;
    let mut live = Live::start(
        "vlan",
        96,
        19486,
        &format!(
            "[[service]]\nname = \"tagged\"\nendpoints = [{{ proto = \"udp\", port = {PORT} }}]\n"
        ),
    );
    let (agent, pair, dir) = (&mut live.agent, &live.pair, live.dir.clone());
    agent.wait_for("TC ingress on the veth", |m| tc_both_ways(m, &pair.dev_a));
    let pcap = dir.join("tagged.pcap");
    let tcpdump = Tcpdump::start(&pair.a, &pair.dev_a, &pcap);

    let dst_mac = netpulse_tests::netns::mac_of(&pair.a, &pair.dev_a);
    let src_mac = netpulse_tests::netns::mac_of(&pair.b, &pair.dev_b);
    let (src, dst) = (pair.addr_b.octets(), pair.addr_a.octets());
    let mut sent_bytes = 0u64;
    let mut wire: Vec<Vec<u8>> = Vec::new();
    for i in 0..40u16 {
        let tags: &[u16] = if i < 30 {
            &[frames::ETH_8021Q]
        } else {
            &[frames::ETH_8021AD, frames::ETH_8021Q]
        };
        let mut f = eth(
            tags,
            frames::ETH_IPV4,
            &ipv4(src, dst, 17, 0, 0, &udp(40000 + i, PORT, 10 + i as usize)),
        );
        f[..6].copy_from_slice(&parse_mac(&dst_mac));
        f[6..12].copy_from_slice(&parse_mac(&src_mac));
        sent_bytes += f.len() as u64;
        wire.push(f);
    }
    let dev_b = pair.dev_b.clone();
    pair.b.run(move || raw_send(&dev_b, &wire));

    // tcpdump's view: 40 frames, each with its tags, so 4 bytes per tag
    // over what TC's skb holds.
    let m = agent.wait_for("40 tagged frames counted", |m| {
        m.sum(
            "netpulse_service_packets_total",
            &[("service", "tagged"), ("direction", "ingress")],
        ) >= 40
    });
    std::thread::sleep(Duration::from_millis(500));
    tcpdump.stop();
    let out = std::process::Command::new("tcpdump")
        .args(["-r", pcap.to_str().unwrap(), "-n", "-e"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lengths: Vec<u64> = text
        .lines()
        .filter(|l| l.contains(&format!(".{PORT}: UDP")))
        .filter_map(|l| {
            l.split("length ")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(lengths.len(), 40, "tcpdump saw:\n{text}");
    let tcpdump_bytes: u64 = lengths.iter().sum();
    assert_eq!(
        tcpdump_bytes, sent_bytes,
        "tcpdump's bytes against what was sent"
    );
    let got = (
        m.sum(
            "netpulse_service_packets_total",
            &[("service", "tagged"), ("direction", "ingress")],
        ),
        m.sum(
            "netpulse_service_bytes_total",
            &[("service", "tagged"), ("direction", "ingress")],
        ),
    );
    assert_eq!(got, (40, tcpdump_bytes), "log:\n{}", agent.log_text());
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).unwrap();
    }
    m
}

/// Sends each frame as it is out of `dev` (AF_PACKET, in the calling
/// thread's namespace).
fn raw_send(dev: &str, frames: &[Vec<u8>]) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_ll, then the fields sendto needs.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = netpulse::probe::ifindex(dev).expect("interface") as i32;
    sll.sll_halen = 6;
    for f in frames {
        sll.sll_addr[..6].copy_from_slice(&f[..6]);
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
        assert_eq!(
            n,
            f.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}
