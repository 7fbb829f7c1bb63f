//! Faults a production agent meets: killed with SIGKILL mid-traffic and
//! started again, its interface deleted and created again, a broken config
//! sent with SIGHUP. Counts continue without reset or double count, probes
//! come back, and the running config survives.

use std::{
    net::UdpSocket,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use netpulse_tests::{
    PinDir,
    agent::{Agent, live_prerequisites},
    netns::Pair,
};

fn config(path: &Path, port: u16, pins: &PinDir, extra: &str) {
    std::fs::write(
        path,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\npin_dir = \"{}\"\nrefresh_seconds = 0.2\n\n[[service]]\nname = \"echo\"\nendpoints = [{{ proto = \"udp\", port = 7500 }}]\n{extra}",
            pins.path().display()
        ),
    )
    .unwrap();
}

/// A veth pair, its own bpffs, a config and a running agent with probes on
/// the pair's veth.
struct Setup {
    pair: Pair,
    pins: PinDir,
    dir: PathBuf,
    cfg: PathBuf,
    port: u16,
    agent: Agent,
}

fn setup(tag: &str, net: u8, port: u16) -> Setup {
    let pair = Pair::new(tag, net);
    let pins = PinDir::mounted(tag);
    let dir = netpulse_tests::scratch(&format!("chaos-{tag}"));
    let cfg = dir.join("config.toml");
    config(&cfg, port, &pins, "");
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &dir.join("agent.log"));
    agent.wait_for("probes", |m| {
        m.has(
            "netpulse_probe_attached",
            &[("interface", pair.dev_a.as_str())],
        ) && m.has("netpulse_service_info", &[("service", "echo")])
    });
    Setup {
        pair,
        pins,
        dir,
        cfg,
        port,
        agent,
    }
}

/// A UDP echo server on every address of namespace a, port 7500; it stops
/// when nothing arrives for 5 s. Returns once it is bound.
fn echo_server(pair: &Pair) {
    let (bound, ready) = std::sync::mpsc::channel();
    pair.a.spawn(move || {
        let s = UdpSocket::bind("0.0.0.0:7500").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        bound.send(()).unwrap();
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    ready.recv().expect("echo server bound");
}

/// `n` request/response exchanges from namespace b; returns how many
/// requests got an answer.
fn exchange(pair: &Pair, n: u64) -> u64 {
    let to = pair.addr_a;
    pair.b.run(move || {
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 1500];
        (0..n)
            .filter(|_| {
                u.send_to(&[7u8; 100], (to, 7500)).unwrap();
                u.recv_from(&mut buf).is_ok()
            })
            .count() as u64
    })
}

#[test]
fn sigkill_mid_traffic_then_restart_continues_without_reset_or_double_count() {
    if !live_prerequisites() {
        return;
    }
    let Setup {
        pair,
        pins: _pins,
        dir,
        cfg,
        port,
        agent,
    } = setup("kill", 95, 19482);
    let log = dir.join("agent.log");
    echo_server(&pair);

    // A steady stream from b while the agent dies and comes back.
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (sent2, stop2, to) = (sent.clone(), stop.clone(), pair.addr_a);
    let stream = pair.b.spawn(move || {
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 1500];
        let end = Instant::now() + Duration::from_secs(30);
        while !stop2.load(Ordering::Relaxed) && Instant::now() < end {
            u.send_to(&[1u8; 100], (to, 7500)).unwrap();
            sent2.fetch_add(1, Ordering::Relaxed);
            let _ = u.recv_from(&mut buf);
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    std::thread::sleep(Duration::from_millis(800));
    let before = agent.metrics().expect("metrics before the kill");
    agent.kill();
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &log);
    let after = agent.wait_for("the restarted agent", |m| {
        m.has(
            "netpulse_probe_attached",
            &[("interface", pair.dev_a.as_str())],
        ) && m.has("netpulse_service_info", &[("service", "echo")])
    });
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    stream.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let end = agent.metrics().unwrap();
    let sent = sent.load(Ordering::Relaxed);

    for dir in ["ingress", "egress"] {
        let (b, a, e) = (
            before.packets("echo", dir),
            after.packets("echo", dir),
            end.packets("echo", dir),
        );
        assert!(b > 0, "no {dir} traffic counted before the kill");
        assert!(a >= b, "{dir} reset by the restart: {b} before, {a} after");
        assert!(e > a, "{dir} not counted after the restart: {a} then {e}");
        // Packets that passed while no agent ran are not counted; none is
        // counted twice.
        assert!(e <= sent, "{dir}: {e} counted of {sent} sent");
    }

    // Quiet now: a known burst moves the counters by exactly that much, so
    // no probe of the killed agent is still attached beside the new one.
    let (i0, e0) = (
        end.packets("echo", "ingress"),
        end.packets("echo", "egress"),
    );
    assert_eq!(exchange(&pair, 40), 40);
    let m = agent.metrics().unwrap();
    assert_eq!(m.packets("echo", "ingress") - i0, 40);
    assert_eq!(m.packets("echo", "egress") - e0, 40);
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_interface_deleted_and_created_again_is_reattached_within_5_s() {
    if !live_prerequisites() {
        return;
    }
    let Setup {
        pair,
        pins: _pins,
        dir,
        agent,
        cfg: _,
        port: _,
    } = setup("relink", 96, 19483);
    echo_server(&pair);
    assert_eq!(exchange(&pair, 5), 5);
    let base = agent.metrics().unwrap().packets("echo", "ingress");
    assert_eq!(base, 5);

    pair.unlink();
    pair.link();
    let recreated = Instant::now();
    let took = loop {
        exchange(&pair, 1);
        let m = agent.metrics().unwrap();
        if m.packets("echo", "ingress") > base && m.packets("echo", "egress") > base {
            break recreated.elapsed();
        }
        assert!(
            recreated.elapsed() < Duration::from_secs(5),
            "probes not back on the new {} after 5 s; log:\n{}",
            pair.dev_a,
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("re-attached and counting {took:?} after the interface came back");
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sighup_with_a_broken_config_keeps_the_running_one_and_names_the_error() {
    if !live_prerequisites() {
        return;
    }
    // Bind every part: an unbound one would be dropped (the namespace
    // deleted) at the end of this statement.
    let Setup {
        pair: _pair,
        pins,
        dir,
        cfg,
        port,
        mut agent,
    } = setup("hup", 97, 19484);

    // Line 3 is broken (an unknown key); the running config must stay.
    std::fs::write(
        &cfg,
        "[agent]\nlisten = \"127.0.0.1:1\"\nbogus_key = true\n",
    )
    .unwrap();
    agent.hup();
    let deadline = Instant::now() + Duration::from_secs(5);
    let want = format!("{}:3:1:", cfg.display());
    while !agent.log_text().contains(&want) {
        assert!(
            Instant::now() < deadline,
            "no file:line:col in the log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent.log_text().contains("keeping the running config"));
    assert!(!agent.exited(), "the agent died on a broken config");
    let m = agent.metrics().expect("still serving on the old address");
    assert!(m.has("netpulse_service_info", &[("service", "echo")]));

    // A good config with one more service takes effect on the next SIGHUP.
    config(
        &cfg,
        port,
        &pins,
        "\n[[service]]\nname = \"added\"\nendpoints = [{ proto = \"tcp\", port = 7501 }]\n",
    );
    agent.hup();
    agent.wait_for("the added service", |m| {
        m.has(
            "netpulse_service_info",
            &[("service", "added"), ("source", "config")],
        ) && m.has("netpulse_service_info", &[("service", "echo")])
    });
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// dockerd absent: the agent retries its socket after 1 s, then 2, 4, 8 s
/// (doubling to 30 s), and counts on. The socket here is the test's own
/// listener, which hangs up on each connection: every accept is one retry,
/// timed where it lands.
#[test]
fn without_dockerd_the_docker_source_retries_with_doubling_backoff() {
    if !live_prerequisites() {
        return;
    }
    let pair = Pair::new("backoff", 67);
    let pins = PinDir::mounted("backoff");
    let dir = netpulse_tests::scratch("chaos-backoff");
    let sock = dir.join("docker.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let cfg = dir.join("config.toml");
    let port = 19517;
    config(
        &cfg,
        port,
        &pins,
        &format!("\n[docker]\nsocket = \"{}\"\n", sock.display()),
    );
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &dir.join("agent.log"));
    // Sessions, each starting at an accept after a quiet gap (one session
    // may open more than one connection back to back).
    let mut starts: Vec<Instant> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(25);
    listener.set_nonblocking(true).unwrap();
    while starts.len() < 5 {
        assert!(
            Instant::now() < deadline,
            "retries seen at {:?}; log:\n{}",
            starts.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>(),
            agent.log_text()
        );
        match listener.accept() {
            Ok((conn, _)) => {
                drop(conn);
                let now = Instant::now();
                if starts
                    .last()
                    .is_none_or(|t| now - *t > Duration::from_millis(500))
                {
                    starts.push(now);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    let gaps: Vec<f64> = starts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    for (i, gap) in gaps.iter().enumerate() {
        let want = f64::from(1u32 << i);
        assert!(
            (want - 0.05..want + 0.6).contains(gap),
            "retry {} came {gap:.2} s after the one before, want {want} s (all gaps {gaps:?})",
            i + 1
        );
    }
    let m = agent.metrics().expect("metrics");
    assert_eq!(m.sum("netpulse_source_up", &[("source", "docker")]), 0);
    assert!(!agent.exited());
    let log = agent.log_text();
    assert_eq!(
        log.matches("retrying with backoff").count(),
        1,
        "one warning per outage:\n{log}"
    );
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
