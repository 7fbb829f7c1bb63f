//! The shipped systemd unit: hardened to an exposure of at most 3.0, and the
//! capabilities it grants are enough: the agent, as a non-root user holding
//! exactly those, attaches and counts live traffic exactly.

use std::{net::UdpSocket, process::Command, time::Duration};

use netpulse_tests::{
    PinDir,
    agent::{Agent, Live, live_prerequisites, tc_both_ways},
    netns::{Pair, have},
    require,
};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/netpulse.service");

/// `Key=value` lines of the unit (a key may repeat).
fn unit_values(key: &str) -> Vec<String> {
    std::fs::read_to_string(UNIT)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

/// The capabilities the unit grants, as setpriv spells them (`bpf`, ...).
fn unit_caps() -> Vec<String> {
    let ambient = unit_values("AmbientCapabilities");
    assert_eq!(ambient.len(), 1);
    let bounding = unit_values("CapabilityBoundingSet");
    assert_eq!(bounding, ambient, "bounding set and ambient set differ");
    ambient[0]
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect()
}

#[test]
fn the_unit_is_hardened_to_an_exposure_of_at_most_3() {
    if !require("systemd-analyze", have("systemd-analyze")) {
        return;
    }
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(UNIT)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for netpulse.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(level <= 3.0, "exposure {level} > 3.0:\n{text}");

    assert_eq!(unit_values("Type"), ["notify"]);
    assert_eq!(unit_values("Restart"), ["on-failure"]);
    assert_eq!(unit_values("StateDirectory"), ["netpulse"]);
    assert_eq!(unit_values("ConfigurationDirectory"), ["netpulse"]);
    assert!(!unit_caps().contains(&"sys_admin".to_string()));
}

#[test]
fn a_non_root_agent_with_exactly_the_units_capabilities_attaches_and_counts() {
    if !live_prerequisites() || !require("setpriv (util-linux)", have("setpriv")) {
        return;
    }
    const NOBODY: &str = "65534";
    let pair = Pair::new("caps", 93);
    let pins = PinDir::mounted("caps");
    let out = Command::new("chown")
        .args([&format!("{NOBODY}:{NOBODY}")])
        .arg(pins.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let dir = netpulse_tests::scratch("caps");
    let port = 19479;
    // A Docker socket as dockerd leaves it (root's, mode 0660), of the
    // test's own, so the "no permission" path is always exercised, whether
    // or not this machine runs a dockerd.
    let sock = dir.join("docker.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o660)).unwrap();
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\npin_dir = \"{}\"\n\n[docker]\nsocket = \"{}\"\n\n[[service]]\nname = \"echo\"\nendpoints = [{{ proto = \"udp\", port = 7200 }}]\n\n[[service]]\nname = \"web\"\nendpoints = [{{ proto = \"tcp\", port = 7201 }}]\n",
            pins.path().display(),
            sock.display()
        ),
    )
    .unwrap();
    let caps = unit_caps();
    let set = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let wrapper = [
        "setpriv",
        "--reuid",
        NOBODY,
        "--regid",
        NOBODY,
        "--clear-groups",
        "--inh-caps",
        &set,
        "--ambient-caps",
        &set,
        "--bounding-set",
        &set,
    ];
    let mut agent = Agent::start(&pair.a, &wrapper, &cfg, port, &dir.join("agent.log"));
    // The kernel programs, not the libpcap fallback: the backend says so
    // and both TC hooks are on the veth.
    let m = agent.wait_for("TC programs on the veth, both ways", |m| {
        tc_both_ways(m, &pair.dev_a)
    });
    assert_eq!(
        m.sum("netpulse_backend_info", &[("backend", "ebpf")]),
        1,
        "log:\n{}",
        agent.log_text()
    );
    // Docker's socket is root's and the docker group's: without the group
    // the agent says which socket and why, and counts on.
    let m = agent.wait_for("the Docker source reported down", |m| {
        m.has("netpulse_source_up", &[("source", "docker")])
    });
    assert_eq!(m.sum("netpulse_source_up", &[("source", "docker")]), 0);
    let log = agent.log_text();
    assert!(
        log.contains(&format!(
            "permission denied on the Docker socket {}",
            sock.display()
        )),
        "{log}"
    );
    // It is who we said: uid nobody, exactly the unit's capabilities.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            .unwrap()
    };
    assert_eq!(field("Uid:"), NOBODY);
    let want_mask: u64 = caps
        .iter()
        .map(|c| match c.as_str() {
            "net_admin" => 1u64 << 12,
            "net_raw" => 1 << 13,
            "sys_ptrace" => 1 << 19,
            "dac_read_search" => 1 << 2,
            "perfmon" => 1 << 38,
            "bpf" => 1 << 39,
            other => panic!("unexpected capability {other} in the unit"),
        })
        .sum();
    assert_eq!(
        u64::from_str_radix(&field("CapEff:"), 16).unwrap(),
        want_mask
    );

    // UDP echo: exactly N in, N out.
    let addr = pair.addr_a;
    let (bound, ready) = std::sync::mpsc::channel();
    pair.a.spawn(move || {
        let s = UdpSocket::bind((addr, 7200)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        bound.send(()).unwrap();
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            s.send_to(&buf[..n], from).unwrap();
        }
    });
    ready.recv().expect("echo server bound");
    const N: u64 = 25;
    pair.b.run(move || {
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 1500];
        for _ in 0..N {
            u.send_to(&[1u8; 300], (addr, 7200)).unwrap();
            u.recv_from(&mut buf).expect("echo");
        }
    });
    let m = agent.metrics().expect("metrics");
    let p = |dir: &str| {
        m.sum(
            "netpulse_service_packets_total",
            &[("service", "echo"), ("direction", dir)],
        )
    };
    assert_eq!(
        (p("ingress"), p("egress")),
        (N, N),
        "log:\n{}",
        agent.log_text()
    );
    // TCP health too, with the unit's capabilities (CAP_BPF, CAP_PERFMON:
    // BTF tracepoints attach through bpf() links): every feature on, and a
    // connection counted from its start to its end.
    for f in [
        "tcp_connections",
        "tcp_retransmits",
        "tcp_rtt_live",
        "kernel_drops",
    ] {
        assert_eq!(
            m.sum("netpulse_feature_enabled", &[("feature", f)]),
            1,
            "{f}; log:\n{}",
            agent.log_text()
        );
    }
    let (bound, ready) = std::sync::mpsc::channel();
    pair.a.spawn(move || {
        let l = std::net::TcpListener::bind((addr, 7201)).unwrap();
        bound.send(()).unwrap();
        if let Ok((mut c, _)) = l.accept() {
            let mut buf = Vec::new();
            let _ = std::io::Read::read_to_end(&mut c, &mut buf);
        }
    });
    ready.recv().expect("TCP server bound");
    pair.b.run(move || {
        let mut c = std::net::TcpStream::connect((addr, 7201)).unwrap();
        std::io::Write::write_all(&mut c, b"hello").unwrap();
    });
    agent.wait_for("the connection closed", |m| {
        m.sum(
            "netpulse_service_tcp_connections_total",
            &[("service", "web"), ("side", "server"), ("result", "closed")],
        ) == 1
    });
    // The listener closing after it is no connection.
    std::thread::sleep(Duration::from_millis(300));
    let m = agent.metrics().expect("metrics");
    for (result, n) in [("established", 1), ("closed", 1), ("reset", 0)] {
        assert_eq!(
            m.sum(
                "netpulse_service_tcp_connections_total",
                &[("service", "web"), ("side", "server"), ("result", result)],
            ),
            n,
            "{result}"
        );
    }
    // ip netns exec and setpriv both exec: the pid is netpulse's.
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `Type=notify`: the unit is active once the agent says READY=1, and it
/// says so only once its probes are attached. systemd is not PID 1 on the
/// machines this runs on, so the test is the systemd side of sd_notify: a
/// datagram socket named by NOTIFY_SOCKET, as systemd binds it.
#[test]
fn ready_is_notified_once_the_probes_are_attached() {
    if !live_prerequisites() {
        return;
    }
    // The socket first: the agent sends READY=1 to it once.
    let sock_dir = netpulse_tests::scratch("notify-sock");
    let sock_path = sock_dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let env = format!("NOTIFY_SOCKET={}", sock_path.display());
    let live = Live::start_with(Pair::new("notify", 94), "notify", 19478, &["env", &env], "");
    let (agent, pair) = (&live.agent, &live.pair);
    let mut buf = [0u8; 256];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 within 30 s ({e}); log:\n{}", agent.log_text()));
    assert_eq!(&buf[..n], b"READY=1");
    // At that moment the probes are on the veth and /metrics answers.
    let m = agent
        .metrics()
        .expect("/metrics answers once READY=1 is sent");
    assert!(
        tc_both_ways(&m, &pair.dev_a),
        "READY=1 before TC was attached both ways; log:\n{}",
        agent.log_text()
    );
    assert_eq!(m.sum("netpulse_backend_info", &[("backend", "ebpf")]), 1);
    drop(live);
    let _ = std::fs::remove_dir_all(&sock_dir);
}

#[test]
fn the_daemonset_matches_the_unit_and_the_image() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../systemd/kubernetes/netpulse-daemonset.yaml"
    ))
    .unwrap();
    let caps_line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: "))
        .expect("capabilities add list");
    let mut ds: Vec<String> = caps_line
        .trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .map(|c| c.trim().trim_matches('"').to_ascii_lowercase())
        .collect();
    let mut unit = unit_caps();
    ds.sort();
    unit.sort();
    assert_eq!(
        ds, unit,
        "DaemonSet and systemd unit grant different capabilities"
    );
    for needle in [
        "hostNetwork: true",
        "hostPID: true",
        "path: /sys/fs/bpf",
        "drop: [\"ALL\"]",
        "readOnlyRootFilesystem: true",
        "path: /healthz",
        concat!("image: netpulse:", env!("CARGO_PKG_VERSION")),
    ] {
        assert!(text.contains(needle), "DaemonSet lacks `{needle}`");
    }
}
