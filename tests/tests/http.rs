//! The agent's HTTP endpoint against hostile or careless clients: a client
//! that trickles its headers is cut off, oversized headers are refused,
//! neither stops others from being served, and by default nothing but
//! loopback can reach it.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use netpulse_tests::{
    PinDir,
    agent::{Agent, live_prerequisites},
    netns::Pair,
    scrape::get,
};

/// Mirrors agent/src/web.rs.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

fn start(pair: &Pair, pins: &PinDir, tag: &str, listen: Option<u16>) -> (Agent, u16) {
    let dir = netpulse_tests::scratch(&format!("http-{tag}"));
    let cfg = dir.join("config.toml");
    let listen_line = listen
        .map(|p| format!("listen = \"127.0.0.1:{p}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        &cfg,
        format!(
            "[agent]\n{listen_line}pin_dir = \"{}\"\n",
            pins.path().display()
        ),
    )
    .unwrap();
    let port = listen.unwrap_or(9477);
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &dir.join("agent.log"));
    agent.wait_for("the agent", |m| m.has("netpulse_build_info", &[]));
    (agent, port)
}

#[test]
fn slow_and_oversized_requests_are_cut_off_without_blocking_others() {
    if !live_prerequisites() {
        return;
    }
    let pair = Pair::new("http", 98);
    let pins = PinDir::mounted("http");
    let (agent, port) = start(&pair, &pins, "slow", Some(19485));
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));

    // Slowloris: a byte of header every 500 ms, forever.
    let slow = pair.a.spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let started = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(500));
            if s.write_all(b"X").is_err() {
                break;
            }
            s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
            let mut buf = [0u8; 512];
            match s.read(&mut buf) {
                // Closed, or an error response before closing.
                Ok(0) | Ok(_) => break,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
            assert!(
                started.elapsed() < HEADER_TIMEOUT + Duration::from_secs(5),
                "a client trickling headers was still connected after {:?}",
                started.elapsed()
            );
        }
        started.elapsed()
    });

    // Meanwhile others are served, and a 20 KiB header is refused.
    let (served, big) = pair.a.run(move || {
        let served = get(addr, "/metrics").map(|(s, _)| s).unwrap_or(0);
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let junk = "a".repeat(20 * 1024);
        let _ = write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Junk: {junk}\r\n\r\n"
        );
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        (served, reply)
    });
    assert_eq!(served, 200);
    assert!(
        big.is_empty() || big.starts_with("HTTP/1.1 431"),
        "oversized headers were not refused: {}",
        big.lines().next().unwrap_or("")
    );
    let took = slow.join().unwrap();
    assert!(
        took >= HEADER_TIMEOUT - Duration::from_secs(1),
        "cut off too early: {took:?}"
    );
    eprintln!("slow client cut off after {took:?}");
    agent.stop();
}

#[test]
fn by_default_only_loopback_reaches_the_agent() {
    if !live_prerequisites() {
        return;
    }
    let pair = Pair::new("bind", 99);
    let pins = PinDir::mounted("bind");
    // No `listen` in the config: the default applies.
    let (agent, port) = start(&pair, &pins, "bind", None);
    assert_eq!(port, 9477);
    let from_peer = pair.b.run({
        let a = pair.addr_a;
        move || TcpStream::connect_timeout(&SocketAddr::from((a, 9477)), Duration::from_secs(2))
    });
    assert!(
        from_peer.is_err(),
        "the agent answered on {}:9477",
        pair.addr_a
    );
    agent.stop();
}

/// The p-th percentile (0..=100) of `v`, nearest rank.
fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[i.clamp(1, v.len()) - 1]
}

/// Times GETs of /metrics and /api/v1/services, in turn, from inside `ns`
/// until `until` says stop (or 4,000 requests); each must answer 200.
fn timed_gets(
    ns: &str,
    port: u16,
    until: impl Fn(usize) -> bool + Send + 'static,
) -> Vec<Duration> {
    netpulse_tests::netns::run_in(ns, move || {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut out = Vec::new();
        for i in 0..4_000 {
            if until(i) {
                break;
            }
            let path = if i % 2 == 0 {
                "/metrics"
            } else {
                "/api/v1/services"
            };
            let t = Instant::now();
            let (status, _) = get(addr, path).unwrap();
            out.push(t.elapsed());
            assert_eq!(status, 200, "{path}");
        }
        out
    })
}

/// No global lock: while the agent attaches its programs to 200 new veths
/// (each attach is netlink round trips and a program attach), /metrics and
/// the API keep answering within their usual latency. Before the agent's
/// state was split into handles, a refresh held the one lock across every
/// attach and both endpoints waited for all of them.
#[test]
fn metrics_and_api_answer_while_200_veths_attach() {
    if !live_prerequisites() {
        return;
    }
    let ns = netpulse_tests::netns::Netns::new(&format!("np-busy-{}", std::process::id()));
    let pins = PinDir::mounted("busy");
    let dir = netpulse_tests::scratch("http-busy");
    let cfg = dir.join("config.toml");
    let port = 19486;
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\npin_dir = \"{}\"\nrefresh_seconds = 0.2\n\n\
             [[service]]\nname = \"web\"\nendpoints = [{{ proto = \"tcp\", port = 80 }}]\n",
            pins.path().display()
        ),
    )
    .unwrap();
    let mut agent = Agent::start(&ns, &[], &cfg, port, &dir.join("agent.log"));
    agent.wait_for("the agent on lo", |m| {
        m.has("netpulse_probe_attached", &[("interface", "lo")])
    });

    // The usual latency: 400 requests on an idle agent.
    let before = timed_gets(&ns.name, port, |i| i >= 400);

    // 100 veth pairs, both ends in the namespace: 200 interfaces to attach to.
    let batch = dir.join("veths.batch");
    let mut lines = String::new();
    for i in 0..100 {
        lines.push_str(&format!("link add npb{i}a type veth peer name npb{i}b\n"));
    }
    for i in 0..100 {
        lines.push_str(&format!("link set npb{i}a up\nlink set npb{i}b up\n"));
    }
    std::fs::write(&batch, lines).unwrap();
    let count = {
        let name = ns.name.clone();
        move || {
            netpulse_tests::netns::run_in(&name, move || {
                get(
                    SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                    "/api/v1/interfaces",
                )
                .map(|(_, b)| b.matches("\"npb").count())
                .unwrap_or(0)
            })
        }
    };
    let started = Instant::now();
    netpulse_tests::netns::sh("ip", &["-n", &ns.name, "-batch", batch.to_str().unwrap()]);
    // Measure while the agent attaches, until all 200 are attached.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        let count = count.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while count() < 200 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let during = {
        let done = done.clone();
        timed_gets(&ns.name, port, move |_| {
            done.load(std::sync::atomic::Ordering::SeqCst)
        })
    };
    watcher.join().unwrap();
    let took = started.elapsed();
    assert_eq!(
        count(),
        200,
        "not every veth got its programs; log:\n{}",
        agent.log_text()
    );

    let (p99_before, p99_during) = (
        percentile(before.clone(), 99.0),
        percentile(during.clone(), 99.0),
    );
    let max_during = during.iter().max().copied().unwrap_or_default();
    eprintln!(
        "attaching 200 veths took {took:?}; p50/p99 before {:?}/{p99_before:?} ({} requests), during {:?}/{p99_during:?} (max {max_during:?}, {} requests)",
        percentile(before.clone(), 50.0),
        before.len(),
        percentile(during.clone(), 50.0),
        during.len(),
    );
    // Within the usual latency: the slowest 1% no worse than three times
    // the idle agent's (plus 50 ms of noise on a shared 2-core machine),
    // far below the time the attaches took.
    let bound = p99_before * 3 + Duration::from_millis(50);
    assert!(
        p99_during <= bound,
        "p99 while attaching {p99_during:?} > {bound:?} (idle p99 {p99_before:?}; attaching took {took:?})"
    );
    // The attaches took long enough that requests had to overlap them.
    assert!(
        during.len() >= 20,
        "only {} requests while attaching; the test did not overlap the attach",
        during.len()
    );
    agent.stop();
    for i in 0..100 {
        let _ = std::process::Command::new("ip")
            .args(["-n", &ns.name, "link", "del", &format!("npb{i}a")])
            .output();
    }
}
