//! TCP health per service from the kernel, held to the kernel's own
//! numbers: the agent (eBPF backend, tracing programs) runs in namespace a
//! of a veth pair — that namespace is its "host" — with local services
//! there and `remote` services in namespace b. Real connections both ways;
//! connection results against what the clients saw, RTT against `TCP_INFO`,
//! drops against an nft rule's own counter, retransmits against `nstat`'s
//! `TcpRetransSegs`.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use netpulse_tests::{
    agent::{Agent, Live, live_prerequisites},
    netns::{Netns, have},
    require,
    scrape::Metrics,
};

const WEB: u16 = 7101;
const UPSTREAM: u16 = 7102;
const CLOSED: u16 = 7103;
const CLOSED_REMOTE: u16 = 7104;
const BLOCKED_REMOTE: u16 = 7105;
const BLOCKED: u16 = 7106;
const N: u64 = 50;

fn config(b: Ipv4Addr) -> String {
    format!(
        r#"
[[service]]
name = "web"
endpoints = [{{ proto = "tcp", port = {WEB} }}]

[[service]]
name = "closed"
endpoints = [{{ proto = "tcp", port = {CLOSED} }}]

[[service]]
name = "blocked"
endpoints = [{{ proto = "tcp", port = {BLOCKED} }}]

[[service]]
name = "upstream"
remote = true
endpoints = [{{ proto = "tcp", port = {UPSTREAM}, addr = "{b}" }}]

[[service]]
name = "upstream-closed"
remote = true
endpoints = [{{ proto = "tcp", port = {CLOSED_REMOTE}, addr = "{b}" }}]

[[service]]
name = "upstream-blocked"
remote = true
endpoints = [{{ proto = "tcp", port = {BLOCKED_REMOTE}, addr = "{b}" }}]
"#
    )
}

/// A server that reads each connection to its end, answers, and closes.
fn serve(ns: &Netns, addr: Ipv4Addr, port: u16) {
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn(move || {
        let l = TcpListener::bind((addr, port)).unwrap();
        tx.send(()).unwrap();
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let _ = c.write_all(b"ok");
                        }
                    }
                }
            });
        }
    });
    rx.recv().unwrap();
}

/// The kernel's smoothed RTT of a socket (`tcpi_rtt`, µs).
fn tcpi_rtt(s: &TcpStream) -> u32 {
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer of the length given.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "TCP_INFO");
    info.tcpi_rtt
}

/// `n` request/answer connections to `to`, closed by the client; the mean
/// `tcpi_rtt` (µs) each read just before close.
fn connect_n(ns: &Netns, to: SocketAddr, n: u64) -> f64 {
    ns.run(move || {
        let mut sum = 0u64;
        for _ in 0..n {
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
            c.write_all(&[1u8; 1000]).unwrap();
            let mut ok = [0u8; 2];
            c.read_exact(&mut ok).unwrap();
            sum += u64::from(tcpi_rtt(&c));
            drop(c);
        }
        sum as f64 / n as f64
    })
}

fn conns(m: &Metrics, service: &str, side: &str, result: &str) -> u64 {
    m.sum(
        "netpulse_service_tcp_connections_total",
        &[("service", service), ("side", side), ("result", result)],
    )
}

fn hist(m: &Metrics, name: &str, service: &str, side: &str) -> (f64, u64) {
    let labels = [("service", service), ("side", side)];
    (
        m.value(&format!("{name}_sum"), &labels).unwrap_or(0.0),
        m.sum(&format!("{name}_count"), &labels),
    )
}

fn drops(m: &Metrics, service: &str, dir: &str, reason: &str) -> u64 {
    m.sum(
        "netpulse_service_kernel_drops_total",
        &[
            ("service", service),
            ("direction", dir),
            ("drop_reason", reason),
        ],
    )
}

fn retrans(m: &Metrics, service: &str, side: &str) -> u64 {
    m.sum(
        "netpulse_service_tcp_retransmits_total",
        &[("service", service), ("side", side)],
    )
}

/// Waits until `ready` holds on a scrape (the last connections' results
/// are counted when their sockets are freed, just after close).
fn settle(agent: &mut Agent, what: &str, ready: impl Fn(&Metrics) -> bool) -> Metrics {
    agent.wait_for(what, ready)
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

/// `nft ARGS` (split on spaces) in `ns`, which must succeed.
fn nft(ns: &Netns, args: &str) {
    let out = ns.exec("nft", &args.split(' ').collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "nft {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start(tag: &str, net: u8, port: u16) -> Live {
    let pair = netns_tests_pair(tag, net);
    let b = pair.addr_b;
    let mut live = Live::start_with(pair, tag, port, &[], &config(b));
    live.agent.wait_for("TCP health on", |m| {
        m.has(
            "netpulse_feature_enabled",
            &[("feature", "tcp_connections")],
        ) && m.value("netpulse_feature_enabled", &[("feature", "kernel_drops")]) == Some(1.0)
    });
    live
}

fn netns_tests_pair(tag: &str, net: u8) -> netpulse_tests::netns::Pair {
    netpulse_tests::netns::Pair::new(tag, net)
}

#[test]
fn connections_handshakes_and_rtt_match_what_the_kernel_and_clients_saw() {
    if !live_prerequisites() {
        return;
    }
    netpulse_tests::agent::assert_ebpf_bin();
    let mut live = start("tcph", 61, 19561);
    let (a, b) = (live.pair.addr_a, live.pair.addr_b);
    for f in [
        "tcp_connections",
        "tcp_retransmits",
        "tcp_rtt_live",
        "kernel_drops",
    ] {
        let m = live.agent.metrics().unwrap();
        assert_eq!(
            m.value("netpulse_feature_enabled", &[("feature", f)]),
            Some(1.0),
            "{f} is off: {}",
            live.agent.log_text()
        );
    }
    serve(&live.pair.a, a, WEB);
    serve(&live.pair.b, b, UPSTREAM);
    let before = live.agent.metrics().unwrap();
    let started = Instant::now();
    // 50 from namespace b to the local service, 50 from the agent's
    // namespace to the remote one.
    let server_rtt = connect_n(&live.pair.b, SocketAddr::from((a, WEB)), N);
    let client_rtt = connect_n(&live.pair.a, SocketAddr::from((b, UPSTREAM)), N);
    let after = settle(&mut live.agent, "100 connections closed", |m| {
        conns(m, "web", "server", "closed") >= N && conns(m, "upstream", "client", "closed") >= N
    });
    eprintln!("100 connections in {:?}", started.elapsed());
    for (service, side, rtt_clients) in [
        ("web", "server", server_rtt),
        ("upstream", "client", client_rtt),
    ] {
        for (result, want) in [
            ("established", N),
            ("closed", N),
            ("reset", 0),
            ("refused", 0),
            ("timeout", 0),
        ] {
            assert_eq!(
                conns(&after, service, side, result) - conns(&before, service, side, result),
                want,
                "{service} {side} {result}"
            );
        }
        let (hs_sum, hs_n) = hist(
            &after,
            "netpulse_service_tcp_handshake_seconds",
            service,
            side,
        );
        let (hs_sum0, hs_n0) = hist(
            &before,
            "netpulse_service_tcp_handshake_seconds",
            service,
            side,
        );
        assert_eq!(hs_n - hs_n0, N, "{service}: one handshake per connection");
        let hs_mean = (hs_sum - hs_sum0) / N as f64;
        assert!(
            hs_mean > 0.0 && hs_mean < 0.05,
            "{service}: handshake mean {hs_mean} s over a veth"
        );
        let (rtt_sum, rtt_n) = hist(&after, "netpulse_service_tcp_rtt_seconds", service, side);
        let (rtt_sum0, rtt_n0) = hist(&before, "netpulse_service_tcp_rtt_seconds", service, side);
        assert_eq!(
            rtt_n - rtt_n0,
            N,
            "{service}: one RTT sample per short connection"
        );
        let mean_us = (rtt_sum - rtt_sum0) / (rtt_n - rtt_n0) as f64 * 1e6;
        eprintln!(
            "{service}: RTT mean {mean_us:.1} µs (clients' tcpi_rtt {rtt_clients:.1} µs), handshake mean {:.1} µs",
            hs_mean * 1e6
        );
        assert!(
            (0.5 * rtt_clients..=2.0 * rtt_clients).contains(&mean_us),
            "{service}: RTT mean {mean_us} µs against the clients' {rtt_clients} µs"
        );
        assert_eq!(
            after.value(
                "netpulse_service_tcp_open_connections",
                &[("service", service), ("side", side)]
            ),
            Some(0.0),
            "{service}: nothing open"
        );
        // The API gives the same figures, with percentiles.
        let path = format!("/api/v1/services/{service}");
        let (code, body) = live
            .pair
            .a
            .run(move || {
                netpulse_tests::scrape::get(SocketAddr::from(([127, 0, 0, 1], 19561)), &path)
            })
            .expect("GET the service");
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let tcp = &v["tcp"];
        assert_eq!(tcp["side"], side, "{tcp}");
        assert_eq!(
            tcp["connections"]["established"].as_u64(),
            Some(conns(&after, service, side, "established")),
            "{tcp}"
        );
        let p50 = tcp["handshake_p50_seconds"]
            .as_f64()
            .expect("handshake p50");
        let p99 = tcp["handshake_p99_seconds"]
            .as_f64()
            .expect("handshake p99");
        assert!(p50 > 0.0 && p50 <= p99 && p99 < 0.05, "{tcp}");
        assert!(tcp["rtt_p50_seconds"].as_f64().is_some(), "{tcp}");
        assert_eq!(tcp["unavailable"], serde_json::json!([]), "{tcp}");
    }
}

#[test]
fn refused_reset_and_firewall_drops_match_the_kernel() {
    if !live_prerequisites() || !require("nft (nftables)", have("nft")) {
        return;
    }
    netpulse_tests::agent::assert_ebpf_bin();
    let mut live = start("tcpr", 62, 19562);
    let (a, b) = (live.pair.addr_a, live.pair.addr_b);
    serve(&live.pair.a, a, WEB);
    serve(&live.pair.b, b, UPSTREAM);
    let before = live.agent.metrics().unwrap();

    // Refused: 20 connects to a configured local port nothing listens on,
    // and 20 from this host to a closed remote port.
    for (ns, to) in [
        (&live.pair.b, SocketAddr::from((a, CLOSED))),
        (&live.pair.a, SocketAddr::from((b, CLOSED_REMOTE))),
    ] {
        let refused = ns.run(move || {
            (0..20)
                .filter(|_| {
                    TcpStream::connect_timeout(&to, Duration::from_secs(2))
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
                })
                .count()
        });
        assert_eq!(refused, 20);
    }

    // Reset mid-connection (SO_LINGER 0) by the client, both ways.
    for (ns, to) in [
        (&live.pair.b, SocketAddr::from((a, WEB))),
        (&live.pair.a, SocketAddr::from((b, UPSTREAM))),
    ] {
        ns.run(move || {
            let mut c = TcpStream::connect(to).unwrap();
            c.write_all(b"x").unwrap();
            let mut ok = [0u8; 2];
            c.read_exact(&mut ok).unwrap();
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: a valid socket and option value.
            let r = unsafe {
                libc::setsockopt(
                    c.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "SO_LINGER");
        });
    }

    let m = settle(&mut live.agent, "refusals and resets", |m| {
        drops(m, "closed", "ingress", "no_socket") >= 20
            && conns(m, "closed", "server", "refused") >= 20
            && conns(m, "upstream-closed", "client", "refused") >= 20
            && conns(m, "web", "server", "reset") >= 1
            && conns(m, "upstream", "client", "reset") >= 1
    });
    let d = |m: &Metrics, s, side, r| conns(m, s, side, r) - conns(&before, s, side, r);
    assert_eq!(d(&m, "closed", "server", "refused"), 20);
    assert_eq!(d(&m, "upstream-closed", "client", "refused"), 20);
    assert_eq!(
        drops(&m, "closed", "ingress", "no_socket")
            - drops(&before, "closed", "ingress", "no_socket"),
        20,
        "the kernel drops each SYN to a closed port as no_socket"
    );
    assert_eq!(d(&m, "web", "server", "reset"), 1);
    assert_eq!(d(&m, "upstream", "client", "reset"), 1);
    assert_eq!(d(&m, "web", "server", "closed"), 0);
    assert_eq!(d(&m, "upstream", "client", "closed"), 0);

    // A firewall in the agent's namespace dropping every SYN: to a remote
    // service on output (this host's connects time out) and to a local one
    // on input. Few SYN retries so the connects give up in seconds.
    let nft = |args: &str| nft(&live.pair.a, args);
    nft("add table inet nptest");
    nft("add chain inet nptest out { type filter hook output priority 0 ; }");
    nft("add chain inet nptest in { type filter hook input priority 0 ; }");
    nft(&format!(
        "add rule inet nptest out tcp dport {BLOCKED_REMOTE} tcp flags syn counter drop"
    ));
    nft(&format!(
        "add rule inet nptest in tcp dport {BLOCKED} tcp flags syn counter drop"
    ));
    for ns in [&live.pair.a, &live.pair.b] {
        ns.exec("sysctl", &["-qw", "net.ipv4.tcp_syn_retries=1"]);
    }
    let before = live.agent.metrics().unwrap();
    let rs0 = retrans_segs(&live.pair.a);
    let timeouts = live.pair.a.run(move || {
        let hs: Vec<_> = (0..3)
            .map(|_| {
                std::thread::spawn(move || {
                    TcpStream::connect((b, BLOCKED_REMOTE))
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| h.join().ok())
            .filter(|t| *t)
            .count()
    });
    assert_eq!(timeouts, 3, "the connects time out");
    let inbound = live
        .pair
        .b
        .run(move || TcpStream::connect((a, BLOCKED)).is_err());
    assert!(inbound);
    let m = settle(&mut live.agent, "timeouts", |m| {
        conns(m, "upstream-blocked", "client", "timeout") >= 3
    });
    let rs = retrans_segs(&live.pair.a) - rs0;
    let counter = |chain: &str| -> u64 {
        let out = live
            .pair
            .a
            .exec("nft", &["list", "chain", "inet", "nptest", chain]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let i = text.find("counter packets ").expect("counter");
        text[i + 16..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (out_drops, in_drops) = (counter("out"), counter("in"));
    nft("delete table inet nptest");
    assert_eq!(conns(&m, "upstream-blocked", "client", "timeout"), 3);
    assert_eq!(
        drops(&m, "upstream-blocked", "ingress", "netfilter_drop")
            - drops(&before, "upstream-blocked", "ingress", "netfilter_drop"),
        out_drops,
        "netfilter drops on output equal the rule's counter"
    );
    assert_eq!(
        drops(&m, "blocked", "ingress", "netfilter_drop")
            - drops(&before, "blocked", "ingress", "netfilter_drop"),
        in_drops,
        "netfilter drops on input equal the rule's counter"
    );
    assert!(out_drops >= 6 && in_drops >= 2, "{out_drops} {in_drops}");
    let counted: u64 = ["upstream-blocked", "upstream", "upstream-closed"]
        .iter()
        .map(|s| retrans(&m, s, "client") - retrans(&before, s, "client"))
        .chain(
            ["web", "closed", "blocked"]
                .iter()
                .map(|s| retrans(&m, s, "server") - retrans(&before, s, "server")),
        )
        .sum();
    assert_eq!(
        counted, rs,
        "retransmits equal TcpRetransSegs of the agent's namespace"
    );
    assert_eq!(
        retrans(&m, "upstream-blocked", "client") - retrans(&before, "upstream-blocked", "client"),
        out_drops - 3,
        "every SYN but the first of each connect is a retransmit"
    );
}

#[test]
fn a_restart_counts_nothing_twice_and_resets_nothing() {
    if !live_prerequisites() {
        return;
    }
    netpulse_tests::agent::assert_ebpf_bin();
    let mut live = start("tcpk", 63, 19563);
    let a = live.pair.addr_a;
    serve(&live.pair.a, a, WEB);
    // One connection stays open across the restart.
    let to = SocketAddr::from((a, WEB));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    live.pair.b.spawn(move || {
        let mut c = TcpStream::connect(to).unwrap();
        c.write_all(b"x").unwrap();
        let mut ok = [0u8; 2];
        c.read_exact(&mut ok).unwrap();
        held_tx.send(()).unwrap();
        let _ = rx.recv();
        drop(c);
    });
    held_rx.recv().unwrap();
    connect_n(&live.pair.b, to, 10);
    let m = settle(&mut live.agent, "10 closed", |m| {
        conns(m, "web", "server", "closed") >= 10
    });
    assert_eq!(conns(&m, "web", "server", "established"), 11);
    assert_eq!(
        m.value(
            "netpulse_service_tcp_open_connections",
            &[("service", "web"), ("side", "server")]
        ),
        Some(1.0)
    );
    // SIGKILL, restart on the same pins, 10 more.
    let cfg = live.dir.join("config.toml");
    let log = live.dir.join("agent2.log");
    // SAFETY: signalling the agent this test started.
    unsafe { libc::kill(live.agent.pid() as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !live.agent.exited() {
        assert!(Instant::now() < deadline, "the agent survived SIGKILL");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(std::mem::replace(
        &mut live.agent,
        Agent::start(&live.pair.a, &[], &cfg, 19563, &log),
    ));
    let m = live.agent.wait_for("restarted", |m| {
        m.has(
            "netpulse_service_tcp_connections_total",
            &[("service", "web")],
        )
    });
    assert_eq!(
        conns(&m, "web", "server", "established"),
        11,
        "nothing reset"
    );
    assert_eq!(
        m.value(
            "netpulse_service_tcp_open_connections",
            &[("service", "web"), ("side", "server")]
        ),
        Some(1.0),
        "the open connection is seeded from the kernel"
    );
    connect_n(&live.pair.b, to, 10);
    tx.send(()).unwrap();
    let m = settle(&mut live.agent, "21 closed", |m| {
        conns(m, "web", "server", "closed") >= 21
    });
    assert_eq!(
        conns(&m, "web", "server", "established"),
        21,
        "nothing counted twice"
    );
    assert_eq!(conns(&m, "web", "server", "closed"), 21);
}

/// The same figures over IPv6, to a dual-stack (`[::]`) listener: its IPv6
/// children and the IPv4-mapped ones count for one service.
#[test]
fn ipv6_and_ipv4_mapped_connections_count_alike() {
    if !live_prerequisites() {
        return;
    }
    netpulse_tests::agent::assert_ebpf_bin();
    let mut live = start("tcp6", 64, 19565);
    let a4 = live.pair.addr_a;
    let (a6, b6): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        ("fd77:64::1".parse().unwrap(), "fd77:64::2".parse().unwrap());
    for (ns, dev, me) in [
        (&live.pair.a, live.pair.dev_a.clone(), a6),
        (&live.pair.b, live.pair.dev_b.clone(), b6),
    ] {
        ns.exec(
            "sysctl",
            &["-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=0")],
        );
        let out = ns.exec(
            "ip",
            &["addr", "add", &format!("{me}/64"), "dev", &dev, "nodad"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A dual-stack listener for the local service.
    let (tx, rx) = std::sync::mpsc::channel();
    live.pair.a.spawn(move || {
        let l = TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, WEB)).unwrap();
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
    let before = live.agent.metrics().unwrap();
    // 20 over IPv6, 20 over IPv4 to the same [::] listener.
    connect_n(&live.pair.b, SocketAddr::from((a6, WEB)), 20);
    connect_n(&live.pair.b, SocketAddr::from((a4, WEB)), 20);
    // 5 refused over IPv6.
    let to = SocketAddr::from((a6, CLOSED));
    let refused = live.pair.b.run(move || {
        (0..5)
            .filter(|_| {
                TcpStream::connect_timeout(&to, Duration::from_secs(2))
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
            })
            .count()
    });
    assert_eq!(refused, 5);
    let m = settle(&mut live.agent, "40 closed, 5 refused", |m| {
        conns(m, "web", "server", "closed") >= 40 && conns(m, "closed", "server", "refused") >= 5
    });
    let d = |s, r| conns(&m, s, "server", r) - conns(&before, s, "server", r);
    assert_eq!(d("web", "established"), 40);
    assert_eq!(d("web", "closed"), 40);
    assert_eq!(d("closed", "refused"), 5);
    let (_, hs) = hist(
        &m,
        "netpulse_service_tcp_handshake_seconds",
        "web",
        "server",
    );
    let (_, hs0) = hist(
        &before,
        "netpulse_service_tcp_handshake_seconds",
        "web",
        "server",
    );
    assert_eq!(hs - hs0, 40, "every handshake timed, IPv6 and IPv4-mapped");
    assert_eq!(
        drops(&m, "closed", "ingress", "no_socket")
            - drops(&before, "closed", "ingress", "no_socket"),
        5
    );
}

/// Data retransmissions, GSO included: the agent's side sends bulk data
/// with TSO on, and a rule in the client's namespace drops every 7th skb
/// it receives. What the agent counts for the service equals the kernel's
/// `TcpRetransSegs` of its namespace (segments, not skbs).
#[test]
fn data_retransmits_count_segments_as_the_kernel_does() {
    if !live_prerequisites() || !require("nft (nftables)", have("nft")) {
        return;
    }
    netpulse_tests::agent::assert_ebpf_bin();
    let mut live = start("tcpx", 65, 19566);
    let a = live.pair.addr_a;
    let dev_a = live.pair.dev_a.clone();
    let out = live.pair.a.exec(
        "ethtool",
        &["-K", &dev_a, "tso", "on", "gso", "on", "sg", "on"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    const BULK: usize = 4 << 20;
    let (tx, rx) = std::sync::mpsc::channel();
    live.pair.a.spawn(move || {
        let l = TcpListener::bind((a, WEB)).unwrap();
        tx.send(()).unwrap();
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            let mut one = [0u8; 1];
            if c.read_exact(&mut one).is_ok() {
                let _ = c.write_all(&vec![5u8; BULK]);
            }
        }
    });
    rx.recv().unwrap();
    let nft = |args: &str| nft(&live.pair.b, args);
    nft("add table inet nptestx");
    nft("add chain inet nptestx in { type filter hook input priority 0 ; }");
    nft(&format!(
        "add rule inet nptestx in tcp sport {WEB} numgen inc mod 7 == 0 counter drop"
    ));
    let before = live.agent.metrics().unwrap();
    let rs0 = retrans_segs(&live.pair.a);
    let to = SocketAddr::from((a, WEB));
    live.pair.b.run(move || {
        for _ in 0..3 {
            let mut c = TcpStream::connect(to).unwrap();
            c.write_all(b"g").unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            assert_eq!(got.len(), BULK);
        }
    });
    let m = settle(&mut live.agent, "3 transfers closed", |m| {
        conns(m, "web", "server", "closed") >= 3
    });
    let rs = retrans_segs(&live.pair.a) - rs0;
    nft("delete table inet nptestx");
    let counted = retrans(&m, "web", "server") - retrans(&before, "web", "server");
    eprintln!("retransmitted segments: netpulse {counted}, TcpRetransSegs {rs}");
    assert!(rs > 0, "the rule caused retransmissions");
    assert_eq!(counted, rs, "retransmits equal TcpRetransSegs");
}
