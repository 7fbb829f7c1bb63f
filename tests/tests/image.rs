//! The OCI image built by `cargo xtask image` (FROM scratch), run by a real
//! dockerd the way the README says: host network, bpffs mounted, only the
//! capabilities it needs. It attaches and counts live traffic exactly.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use netpulse_tests::{
    PinDir, is_root,
    netns::have,
    require,
    scrape::{Metrics, get},
};

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker").args(args).output().unwrap()
}

/// Removes the container on drop, pass or fail.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

#[test]
fn the_image_runs_with_host_network_and_counts() {
    let image = std::env::var("NETPULSE_IMAGE")
        .unwrap_or_else(|_| format!("netpulse:{}", env!("CARGO_PKG_VERSION")));
    if !require("root", is_root())
        || !require("docker", have("docker"))
        || !require(
            "a running dockerd (cargo xtask image starts one)",
            docker(&["info"]).status.success(),
        )
        || !require(
            "the netpulse image (cargo xtask image)",
            docker(&["image", "inspect", &image]).status.success(),
        )
    {
        return;
    }
    let pins = PinDir::mounted("image");
    let dir = netpulse_tests::scratch("image");
    let (port, svc_port) = (19481u16, 7400u16);
    let cfg = dir.join("config.toml");
    // Only loopback: the test's traffic stays on this host's lo.
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\ninterfaces = [\"lo\"]\n\n[[service]]\nname = \"echo\"\nendpoints = [{{ proto = \"udp\", port = {svc_port}, addr = \"127.0.0.1\" }}]\n"
        ),
    )
    .unwrap();
    let name = format!("netpulse-test-{}", std::process::id());
    let _ = docker(&["rm", "-f", &name]);
    // Docker 20.10 (Debian 12) predates CAP_BPF and CAP_PERFMON; there
    // CAP_SYS_ADMIN stands in for both. Newer engines take --cap-add BPF
    // --cap-add PERFMON instead.
    let out = docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "--cap-drop",
        "ALL",
        "--cap-add",
        "SYS_ADMIN",
        "--cap-add",
        "NET_ADMIN",
        "--cap-add",
        "NET_RAW",
        "-v",
        &format!("{}:/sys/fs/bpf", pins.path().display()),
        "-v",
        &format!("{}:/etc/netpulse/config.toml:ro", cfg.display()),
        &image,
    ]);
    assert!(
        out.status.success(),
        "docker run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _container = Container(name.clone());
    let logs = || String::from_utf8_lossy(&docker(&["logs", &name]).stderr).into_owned();

    let scrape = || {
        get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), "/metrics")
            .ok()
            .map(|(_, b)| Metrics::parse(&b))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !scrape().is_some_and(|m| {
        m.has(
            "netpulse_probe_attached",
            &[("interface", "lo"), ("hook", "tc")],
        ) && m.has("netpulse_service_info", &[("service", "echo")])
    }) {
        assert!(
            Instant::now() < deadline,
            "the container did not come up:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let server = UdpSocket::bind(("127.0.0.1", svc_port)).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            server.send_to(&buf[..n], from).unwrap();
        }
    });
    const N: u64 = 30;
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 1500];
    for _ in 0..N {
        client.send_to(&[3u8; 64], ("127.0.0.1", svc_port)).unwrap();
        client.recv_from(&mut buf).expect("echo");
    }
    let m = scrape().expect("metrics");
    let p = |dir: &str| {
        m.sum(
            "netpulse_service_packets_total",
            &[("service", "echo"), ("direction", dir)],
        )
    };
    // On lo each datagram passes TC egress and XDP ingress once; the
    // service's end is matched on exactly one of them each way.
    assert_eq!((p("ingress"), p("egress")), (N, N), "logs:\n{}", logs());
    let frame = (14 + 20 + 8 + 64) as u64;
    let b = |dir: &str| {
        m.sum(
            "netpulse_service_bytes_total",
            &[("service", "echo"), ("direction", dir)],
        )
    };
    assert_eq!((b("ingress"), b("egress")), (N * frame, N * frame));
    drop(client);
    let _ = echo.join();

    // docker stop sends SIGTERM: the agent detaches and exits 0.
    let out = docker(&["stop", "-t", "10", &name]);
    assert!(out.status.success());
    let code =
        String::from_utf8_lossy(&docker(&["inspect", "-f", "{{.State.ExitCode}}", &name]).stdout)
            .trim()
            .to_string();
    assert_eq!(code, "0", "logs:\n{}", logs());
    let _ = std::fs::remove_dir_all(&dir);
}
