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
