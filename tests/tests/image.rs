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

/// The `docker run` lines of the README's "Container image" section, as
/// written there (continuation lines joined, split into words).
fn readme_docker_runs() -> Vec<Vec<String>> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme
        .split("**Container image.**")
        .nth(1)
        .expect("the README's Container image section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut runs = Vec::new();
    let mut cur: Option<String> = None;
    for line in section.lines() {
        let t = line.trim();
        if let Some(c) = cur.as_mut() {
            c.push(' ');
            c.push_str(t.trim_end_matches('\\'));
            if !t.ends_with('\\') {
                runs.push(cur.take().unwrap());
            }
        } else if t.starts_with("docker run ") {
            if t.ends_with('\\') {
                cur = Some(t.trim_end_matches('\\').to_string());
            } else {
                runs.push(t.to_string());
            }
        }
    }
    runs.iter()
        .map(|r| r.split_whitespace().map(String::from).collect())
        .collect()
}

#[test]
fn the_readme_docker_run_lines_run_the_image_and_count() {
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
    let lines = readme_docker_runs();
    assert_eq!(
        lines.len(),
        2,
        "two docker run lines in the README: {lines:?}"
    );
    let mut counted = 0;
    for (i, words) in lines.iter().enumerate() {
        assert!(
            words.iter().any(|w| w == "--cap-drop")
                && words.last().is_some_and(|w| w.starts_with("netpulse:")),
            "{words:?}"
        );
        match run_and_count(words, &image) {
            Ok(()) => counted += 1,
            // Only the first line may be refused, and only by an engine
            // that does not know the capability, as the README says.
            Err(e) => assert!(
                i == 0 && e.contains("unknown capability: \"CAP_BPF\""),
                "README line {} failed: {e}",
                i + 1
            ),
        }
    }
    assert!(counted >= 1, "no README line ran");
}

/// Runs one README line as written, with what a test must change: the
/// container's name, a bpffs of the test's own for /sys/fs/bpf, a config
/// mounted at /etc/netpulse/config.toml (lo only, `backend = "ebpf"`), and
/// the image under test. Err: docker refused to run it (its stderr).
fn run_and_count(words: &[String], image: &str) -> Result<(), String> {
    let pins = PinDir::mounted("image");
    let dir = netpulse_tests::scratch("image");
    let (port, svc_port) = (19481u16, 7400u16);
    let cfg = dir.join("config.toml");
    // Only loopback: the test's traffic stays on this host's lo.
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\ninterfaces = [\"lo\"]\nbackend = \"ebpf\"\n\n[[service]]\nname = \"echo\"\nendpoints = [{{ proto = \"udp\", port = {svc_port}, addr = \"127.0.0.1\" }}]\n"
        ),
    )
    .unwrap();
    let name = format!("netpulse-test-{}", std::process::id());
    let _ = docker(&["rm", "-f", &name]);
    let mut args: Vec<String> = Vec::new();
    let mut w = words[2..words.len() - 1].iter();
    assert_eq!(&words[..2], ["docker", "run"]);
    while let Some(a) = w.next() {
        match a.as_str() {
            "--name" => {
                w.next();
                args.extend(["--name".into(), name.clone()]);
            }
            "-v" => {
                let v = w.next().expect("-v value");
                let v = v.replace("/sys/fs/bpf:", &format!("{}:", pins.path().display()));
                args.extend(["-v".into(), v]);
            }
            _ => args.push(a.clone()),
        }
    }
    args.extend([
        "-v".into(),
        format!("{}:/etc/netpulse/config.toml:ro", cfg.display()),
        image.to_string(),
    ]);
    let mut all = vec!["run"];
    all.extend(args.iter().map(String::as_str));
    let out = docker(&all);
    if !out.status.success() {
        let _ = docker(&["rm", "-f", &name]);
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
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
            && m.sum("netpulse_backend_info", &[("backend", "ebpf")]) == 1
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
    Ok(())
}
