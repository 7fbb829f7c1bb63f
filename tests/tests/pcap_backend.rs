//! The pcap backend next to the eBPF programs: two agents in one network
//! namespace, one per backend, watch the same veth and loopback while
//! known traffic flows; every per-service counter must come out equal. And
//! `backend = "auto"` without the capabilities eBPF needs counts with
//! libpcap, saying why.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use netpulse_tests::{
    PinDir,
    agent::{Agent, Backend, live_prerequisites},
    netns::{Pair, have},
    require,
    scrape::Metrics,
};

const WEB: u16 = 19620;
const DNS: u16 = 19621;
const CONNS: usize = 10;
const UPLOAD: usize = 50_000;
const REPLY: usize = 10_000;
const DATAGRAMS: u64 = 20;
const PINGS: u64 = 4;
/// Over loopback, from beside the servers.
const LO_CONNS: u64 = 3;
const LO_DATAGRAMS: u64 = 5;

fn config(dir: &Path, name: &str, port: u16, backend: &str, pins: &Path, pair: &Pair) -> PathBuf {
    config_on(dir, name, port, backend, pins, pair, &[&pair.dev_a])
}

fn config_on(
    dir: &Path,
    name: &str,
    port: u16,
    backend: &str,
    pins: &Path,
    pair: &Pair,
    interfaces: &[&str],
) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            r#"
[agent]
listen = "127.0.0.1:{port}"
pin_dir = "{pins}"
state_dir = "{state}"
refresh_seconds = 0.2
interfaces = {interfaces:?}
discover_sockets = false
backend = "{backend}"

[[service]]
name = "web"
endpoints = [{{ proto = "tcp", port = {WEB} }}]

[[service]]
name = "dns"
endpoints = [{{ proto = "udp", port = {DNS}, addr = "{a}" }}]

[[service]]
name = "ping"
endpoints = [{{ proto = "icmp", addr = "{a}" }}]
"#,
            pins = pins.display(),
            state = dir.join(format!("state-{name}")).display(),
            a = pair.addr_a,
        ),
    )
    .unwrap();
    p
}

/// Servers in namespace a: TCP (read all, reply), UDP echo.
fn start_servers(pair: &Pair) {
    let addr = pair.addr_a;
    let (tcp, udp) = pair.a.run(move || {
        (
            TcpListener::bind((addr, WEB)).unwrap(),
            UdpSocket::bind((addr, DNS)).unwrap(),
        )
    });
    std::thread::spawn(move || {
        for conn in tcp.incoming() {
            let Ok(mut c) = conn else { break };
            let mut buf = Vec::new();
            if c.read_to_end(&mut buf).is_ok() {
                let _ = c.write_all(&vec![7u8; REPLY]);
            }
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from);
        }
    });
}

/// Known traffic from b to a: TCP uploads with replies, UDP echoes, pings.
fn traffic(pair: &Pair) {
    let addr = pair.addr_a;
    pair.b.run(move || {
        for _ in 0..CONNS {
            let mut s = TcpStream::connect((addr, WEB)).unwrap();
            s.write_all(&vec![1u8; UPLOAD]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).unwrap();
            assert_eq!(buf.len(), REPLY);
        }
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 2048];
        for i in 0..DATAGRAMS as usize {
            u.send_to(&vec![3u8; 20 + i], (addr, DNS)).unwrap();
            u.recv_from(&mut buf).unwrap();
        }
    });
    pair.b.exec(
        "ping",
        &[
            "-c",
            &PINGS.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            &addr.to_string(),
        ],
    );
}

/// (metric, labels, value).
type Sample = (String, Vec<(String, String)>, u64);

/// Every per-service sample, by its labels. (Not the unclassified ones:
/// loopback carries the scrapes themselves, which land there at moments
/// that differ between the two agents.)
fn counters(m: &Metrics) -> Vec<Sample> {
    let mut out = Vec::new();
    for name in [
        "netpulse_service_packets_total",
        "netpulse_service_bytes_total",
        "netpulse_service_tcp_flags_total",
    ] {
        for (labels, v) in m.0.get(name).into_iter().flatten() {
            let l: Vec<(String, String)> =
                labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            out.push((name.to_string(), l, *v as u64));
        }
    }
    out.sort();
    out
}

#[test]
fn pcap_and_ebpf_backends_count_the_same_traffic_alike() {
    if !live_prerequisites() || !require("ping (iputils-ping)", have("ping")) {
        return;
    }
    let pair = Pair::np6("pb", 10);
    let pins = PinDir::mounted("np6pb");
    let dir = netpulse_tests::scratch("pcap");
    let (p_ebpf, p_pcap) = (19640, 19641);
    // The veth and loopback (where the kernel runs both TC hooks on each
    // packet and libpcap shows it once). Offloads off on lo too: a GSO
    // super-packet is one packet to libpcap, its segments to TC.
    pair.a.exec(
        "ethtool",
        &["-K", "lo", "tso", "off", "gso", "off", "gro", "off"],
    );
    let ifs = [pair.dev_a.as_str(), "lo"];
    let c_ebpf = config_on(&dir, "ebpf.toml", p_ebpf, "ebpf", pins.path(), &pair, &ifs);
    let c_pcap = config_on(&dir, "pcap.toml", p_pcap, "pcap", pins.path(), &pair, &ifs);
    start_servers(&pair);
    let mut ebpf = Agent::start_with(
        &pair.a,
        &[],
        &c_ebpf,
        p_ebpf,
        &dir.join("ebpf.log"),
        Backend::AsConfigured,
    );
    let mut pcap = Agent::start_with(
        &pair.a,
        &[],
        &c_pcap,
        p_pcap,
        &dir.join("pcap.log"),
        Backend::AsConfigured,
    );
    let dev = pair.dev_a.clone();
    let attached = |hook: &'static str| {
        let dev = dev.clone();
        move |m: &Metrics| {
            m.has(
                "netpulse_probe_attached",
                &[("interface", dev.as_str()), ("hook", hook)],
            ) && m.has("netpulse_service_info", &[("service", "web")])
        }
    };
    ebpf.wait_for("the eBPF agent attached", attached("tc"));
    let m = pcap.wait_for("the pcap agent capturing", attached("pcap"));
    assert!(m.has("netpulse_backend_info", &[("backend", "pcap")]));
    // A quiet link (no IPv6, static neighbours): both start from zero.
    for a in [&ebpf, &pcap] {
        let before = counters(&a.metrics().unwrap());
        assert!(
            before.iter().all(|(_, _, v)| *v == 0),
            "nothing flowed yet: {before:?}"
        );
    }

    traffic(&pair);
    // And over loopback: a client beside the servers.
    let addr = pair.addr_a;
    pair.a.run(move || {
        for _ in 0..LO_CONNS {
            let mut s = TcpStream::connect((addr, WEB)).unwrap();
            s.write_all(&[9u8; 5000]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).unwrap();
        }
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..LO_DATAGRAMS {
            u.send_to(&[4u8; 64], (addr, DNS)).unwrap();
            u.recv_from(&mut buf).unwrap();
        }
    });

    // Both settle on the same numbers; the captures may trail by a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (e, p) = loop {
        let e = counters(&ebpf.metrics().unwrap());
        let p = counters(&pcap.metrics().unwrap());
        if e == p || Instant::now() > deadline {
            break (e, p);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let m_e = ebpf.metrics().unwrap();
    let m_p = pcap.metrics().unwrap();
    // The eBPF agent counted from zero too (a fresh pin dir): the two
    // tables must be equal, sample for sample.
    assert_eq!(e, p, "eBPF (left) and pcap (right) disagree");
    // And they are the traffic sent.
    assert_eq!(m_p.packets("dns", "ingress"), DATAGRAMS + LO_DATAGRAMS);
    assert_eq!(m_p.packets("dns", "egress"), DATAGRAMS + LO_DATAGRAMS);
    assert_eq!(m_p.packets("ping", "ingress"), PINGS);
    assert_eq!(
        m_p.sum(
            "netpulse_service_tcp_flags_total",
            &[
                ("service", "web"),
                ("direction", "ingress"),
                ("flag", "syn")
            ]
        ),
        CONNS as u64 + LO_CONNS
    );
    assert!(m_p.bytes("web", "ingress") > (CONNS * UPLOAD) as u64);
    assert!(m_e.has("netpulse_backend_info", &[("backend", "ebpf")]));
    // TCP health: the kernel's view (eBPF) and the headers' (pcap) agree
    // on every connection's handshake and normal close.
    let want = CONNS as u64 + LO_CONNS;
    let result = |m: &netpulse_tests::scrape::Metrics, r: &str| {
        m.sum(
            "netpulse_service_tcp_connections_total",
            &[("service", "web"), ("side", "server"), ("result", r)],
        )
    };
    let mut retransmits = Vec::new();
    for (backend, agent) in [("ebpf", &mut ebpf), ("pcap", &mut pcap)] {
        let m = agent.wait_for("every connection closed", |m| result(m, "closed") >= want);
        for r in ["established", "closed"] {
            assert_eq!(result(&m, r), want, "{backend}: {r}");
        }
        assert_eq!(result(&m, "reset"), 0, "{backend}");
        assert_eq!(
            m.sum(
                "netpulse_service_tcp_handshake_seconds_count",
                &[("service", "web"), ("side", "server")]
            ),
            want,
            "{backend}: a handshake time per connection"
        );
        retransmits.push(m.sum(
            "netpulse_service_tcp_retransmits_total",
            &[("service", "web"), ("side", "server")],
        ));
    }
    // The server's own retransmissions: what the kernel sent again (none,
    // on this quiet link) and no more: no packet read twice on loopback,
    // no segment taken for one because the other capture's ACK was read
    // first.
    assert_eq!(retransmits[1], retransmits[0], "retransmits (pcap, eBPF)");
    assert!(m_p.has(
        "netpulse_capture_dropped_packets_total",
        &[("interface", pair.dev_a.as_str())]
    ));
    ebpf.stop();
    pcap.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn auto_falls_back_to_pcap_without_bpf_capabilities_and_says_why() {
    if !live_prerequisites() || !require("setpriv (util-linux)", have("setpriv")) {
        return;
    }
    let pair = Pair::np6("fb", 11);
    let dir = netpulse_tests::scratch("fallback");
    let port = 19642;
    let cfg = config(
        &dir,
        "auto.toml",
        port,
        "auto",
        &dir.join("no-bpffs"),
        &pair,
    );
    start_servers(&pair);
    // Root without CAP_BPF, CAP_PERFMON or CAP_SYS_ADMIN: no eBPF, but
    // packet sockets.
    let mut agent = Agent::start_with(
        &pair.a,
        &[
            "setpriv",
            "--bounding-set",
            "-all,+net_admin,+net_raw",
            "--inh-caps",
            "-all",
            "--",
        ],
        &cfg,
        port,
        &dir.join("auto.log"),
        Backend::AsConfigured,
    );
    let dev = pair.dev_a.clone();
    agent.wait_for("the fallback capturing", move |m| {
        m.has(
            "netpulse_probe_attached",
            &[("interface", dev.as_str()), ("hook", "pcap")],
        ) && m.has("netpulse_backend_info", &[("backend", "pcap")])
    });
    let log = agent.log_text();
    assert!(
        log.contains("eBPF is not available: counting with the pcap backend")
            && log.contains("missing capabilities: CAP_BPF, CAP_PERFMON"),
        "the fallback and its reason are logged:\n{log}"
    );
    traffic(&pair);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = agent.metrics().unwrap();
        if m.packets("dns", "egress") == DATAGRAMS || Instant::now() > deadline {
            assert_eq!(m.packets("dns", "ingress"), DATAGRAMS);
            assert_eq!(m.packets("dns", "egress"), DATAGRAMS);
            assert_eq!(m.packets("ping", "ingress"), PINGS);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
