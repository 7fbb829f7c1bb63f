//! Containers against a real dockerd: the agent in the host's namespace
//! names their traffic (label, compose service, container name), counts
//! each packet once per host whichever way it comes in (the container's
//! address, a published port through docker-proxy, DNAT, another
//! container), describes them on `netpulse_service_info`, retires removed
//! ones after the grace period, follows host-network containers through
//! their sockets, and keeps counting while dockerd is gone.
//!
//! The exact oracle is the container's own kernel: the IPv4 packets and
//! bytes its IP layer received and sent (`/proc/net/snmp`, `netstat`),
//! which sees every packet once, however it came.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use netpulse_tests::{
    PinDir,
    agent::{Agent, have_bin},
    docker::{
        Container, IpCounters, Outside, OwnDockerd, SocketProxy, TEST_IMAGE, docker, docker_ok,
        http_get, prerequisites, test_image, try_http_get,
    },
    scrape::Metrics,
};

struct Fx {
    agent: Agent,
    port: u16,
    dir: PathBuf,
    _pins: PinDir,
}

impl Drop for Fx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An agent in the host's namespace (where dockerd's veths are), on
/// 127.0.0.1:`port`, with `extra` appended to its config.
fn agent(tag: &str, port: u16, extra: &str) -> Option<Fx> {
    agent_with(tag, port, "refresh_seconds = 0.25\n", extra)
}

/// As [`agent`], with `agent_lines` in its `[agent]` table.
fn agent_with(tag: &str, port: u16, agent_lines: &str, extra: &str) -> Option<Fx> {
    if !prerequisites() || !have_bin() {
        return None;
    }
    test_image();
    let pins = PinDir::new(tag);
    let dir = netpulse_tests::scratch(&format!("docker-{tag}"));
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\npin_dir = \"{}\"\n{agent_lines}retire_seconds = 3\n{extra}",
            pins.path().display()
        ),
    )
    .unwrap();
    let agent = Agent::start_host(&cfg, port, &dir.join("agent.log"));
    Some(Fx {
        agent,
        port,
        dir,
        _pins: pins,
    })
}

fn docker_up(m: &Metrics) -> bool {
    m.sum("netpulse_source_up", &[("source", "docker")]) == 1
}

/// The container programs on `veth` (a veth is attached as a host
/// interface for the moment before Docker puts it in the bridge).
fn on_container_veth(m: &Metrics, veth: &str) -> bool {
    m.has(
        "netpulse_probe_attached",
        &[("interface", veth), ("hook", "tc"), ("mode", "ingress")],
    )
}

fn has_service(m: &Metrics, name: &str) -> bool {
    m.has("netpulse_service_info", &[("service", name)])
}

/// The agent's counts for `service` as [`IpCounters`]: frames carry 14
/// bytes of Ethernet header the IP layer does not see.
fn as_ip(m: &Metrics, service: &str) -> IpCounters {
    let (pi, pe) = (m.packets(service, "ingress"), m.packets(service, "egress"));
    IpCounters {
        in_packets: pi,
        out_packets: pe,
        in_octets: m.bytes(service, "ingress") - 14 * pi,
        out_octets: m.bytes(service, "egress") - 14 * pe,
    }
}

fn delta(a: IpCounters, b: IpCounters) -> IpCounters {
    IpCounters {
        in_packets: b.in_packets - a.in_packets,
        out_packets: b.out_packets - a.out_packets,
        in_octets: b.in_octets - a.in_octets,
        out_octets: b.out_octets - a.out_octets,
    }
}

/// Sends requests to `target` until `service` has at least `want` ingress
/// packets (20 s at most), checking its counts never go back. For a
/// service that keeps its name through a change (grace period, dockerd
/// outage) and so is in /metrics before Docker has listed the new
/// container.
fn until_counted(agent: &Agent, service: &str, target: SocketAddr, want: u64) {
    let start = agent
        .metrics()
        .expect("metrics")
        .packets(service, "ingress");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = try_http_get(target);
        let now = agent
            .metrics()
            .expect("metrics")
            .packets(service, "ingress");
        assert!(
            now >= start,
            "{service}'s counts went back: {start} -> {now}"
        );
        if now >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service} not counted: {now} of {want}; log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

#[test]
fn containers_are_named_described_and_counted_once_per_host() {
    let pid = std::process::id();
    let Some(mut fx) = agent("named", 19491, "[docker]\nlabels = [\"team\"]\n") else {
        return;
    };
    // A client host outside, behind a veth into this host: its requests to
    // a published port cross that veth (an uplink, to the agent), the
    // bridge and the container's veth.
    let outside = Outside::new("named", 1);
    fx.agent.wait_for("probes on the outside host's link", |m| {
        m.has(
            "netpulse_probe_attached",
            &[
                ("interface", &outside.host_dev),
                ("mode", "ingress"),
                ("zone", "host"),
            ],
        )
    });
    fx.agent.wait_for("the Docker source", docker_up);
    // A second agent: its TC programs run after the first's on each veth
    // (tcx), which must pass the packet on to them, not end the chain.
    let Some(mut second) = agent("second", 19492, "") else {
        return;
    };
    second.agent.wait_for("the second agent", docker_up);

    let (web_name, labelled_name, compose_name) = (
        format!("np-web-{pid}"),
        format!("np-labelled-{pid}"),
        format!("np-compose-{pid}"),
    );
    let (labelled_svc, compose_svc, project) = (
        format!("np-by-label-{pid}"),
        format!("np-by-compose-{pid}"),
        format!("np-proj-{pid}"),
    );
    let gateway = netpulse_tests::docker::bridge_gateway();
    let web = Container::httpd(
        &web_name,
        &[
            "--label",
            "team=payments",
            "--label",
            "secret=hunter2",
            "--label",
            "netpulse.check.http=/",
            "-p",
            "127.0.0.1:19493:80",
            "-p",
            &format!("{gateway}:19493:80"),
        ],
    );
    let labelled = Container::run(
        &labelled_name,
        &[
            "--label",
            &format!("netpulse.service={labelled_svc}"),
            "--label",
            "com.docker.compose.service=not-this-one",
            TEST_IMAGE,
            "sleep",
            "600",
        ],
    );
    let _compose = Container::run(
        &compose_name,
        &[
            "--label",
            &format!("com.docker.compose.service={compose_svc}"),
            "--label",
            &format!("com.docker.compose.project={project}"),
            TEST_IMAGE,
            "sleep",
            "600",
        ],
    );
    // docker run returns once the container runs: from then on, 2 s.
    let started = Instant::now();
    let m = fx.agent.wait_for("the three containers' services", |m| {
        [&web_name, &labelled_svc, &compose_svc]
            .iter()
            .all(|s| has_service(m, s))
    });
    let took = started.elapsed();
    eprintln!("the last container named {took:?} after it started");
    assert!(took < Duration::from_secs(2), "naming took {took:?}");
    assert!(!has_service(&m, "not-this-one"));
    assert!(m.has(
        "netpulse_service_info",
        &[
            ("service", &web_name),
            ("source", "container"),
            ("container", &web_name),
            ("image", TEST_IMAGE),
            ("label_team", "payments"),
        ],
    ));
    assert!(m.has(
        "netpulse_service_info",
        &[
            ("service", &compose_svc),
            ("container", &compose_name),
            ("compose_project", &project),
            ("compose_service", &compose_svc),
        ],
    ));
    // The API groups it under its compose project, with its container.
    let (code, body) = netpulse_tests::scrape::get(
        SocketAddr::from(([127, 0, 0, 1], fx.port)),
        &format!("/api/v1/services/{compose_svc}"),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let svc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(svc["source"], "container");
    assert_eq!(svc["compose_project"], project.as_str());
    assert_eq!(svc["containers"][0]["name"], compose_name.as_str());
    assert_eq!(svc["containers"][0]["image"], TEST_IMAGE);
    // Its `netpulse.check.http=/` label became a check of the container.
    let check = format!("{web_name}:http");
    fx.agent.wait_for("the check its label asks for, up", |m| {
        m.sum(
            "netpulse_check_state",
            &[("check", &check), ("state", "up")],
        ) == 1
    });
    let leaked = m.0.values().flatten().any(|(l, _)| {
        l.iter()
            .any(|(k, v)| k.contains("secret") || v.contains("hunter2"))
    });
    assert!(!leaked, "a label outside the allow-list was exported");

    // Every way in, once: the container's address, the published port on
    // loopback (docker-proxy) and on the bridge address (DNAT from the
    // host), and another container.
    let veth = web.host_veth();
    for a in [&mut fx.agent, &mut second.agent] {
        a.wait_for("probes on the web container's veth", |m| {
            on_container_veth(m, &veth) && has_service(m, &web_name)
        });
    }
    // Its veth is known as its own (the array path of the veth programs).
    fx.agent
        .wait_for("the web container's veth in NP_VETHS", |m| {
            m.sum("netpulse_map_entries", &[("map", "NP_VETHS")]) >= 1
        });
    let web_ip = web.ip();
    let settle = || std::thread::sleep(Duration::from_millis(500));
    settle();
    let web0 = web.ip_counters();
    let web_accepts0 = web.tcp_passive_opens();
    let lab0 = labelled.ip_counters();
    let m0 = fx.agent.metrics().expect("metrics");
    let s0 = second.agent.metrics().expect("metrics");
    const N: usize = 10;
    for target in [
        addr(&web_ip, 80),
        addr("127.0.0.1", 19493),
        addr(&gateway, 19493),
    ] {
        for _ in 0..N {
            let status = http_get(target);
            assert!(status.contains(" 200 "), "GET {target}: {status}");
        }
    }
    let published = addr(&gateway, 19493);
    for _ in 0..N {
        let status = outside.ns.run(move || http_get(published));
        assert!(
            status.contains(" 200 "),
            "GET {published} from outside: {status}"
        );
    }
    for _ in 0..N {
        docker_ok(&[
            "exec",
            &labelled_name,
            "/bin/busybox",
            "wget",
            "-q",
            "-O",
            "/dev/null",
            &format!("http://{web_ip}/"),
        ]);
    }
    settle();
    let web1 = web.ip_counters();
    let web_accepts1 = web.tcp_passive_opens();
    let lab1 = labelled.ip_counters();
    let m1 = fx.agent.metrics().expect("metrics");
    let s1 = second.agent.metrics().expect("metrics");
    let want = delta(web0, web1);
    eprintln!("web container, its own kernel: {want:?}");
    assert!(want.in_packets >= (5 * N * 5) as u64, "{want:?}");
    assert_eq!(
        delta(as_ip(&m0, &web_name), as_ip(&m1, &web_name)),
        want,
        "the web container's counts against its own kernel's"
    );
    assert_eq!(
        delta(as_ip(&s0, &web_name), as_ip(&s1, &web_name)),
        want,
        "the second agent's counts"
    );
    assert_eq!(
        delta(as_ip(&m0, &labelled_svc), as_ip(&m1, &labelled_svc)),
        delta(lab0, lab1),
        "the client container's counts against its own kernel's"
    );
    // Each connection, whichever way in (docker-proxy's included), counted
    // once, by the container's own socket in its namespace: as many as its
    // kernel accepted.
    let established = |m: &Metrics| {
        m.sum(
            "netpulse_service_tcp_connections_total",
            &[
                ("service", &web_name),
                ("side", "server"),
                ("result", "established"),
            ],
        )
    };
    let accepted = web_accepts1 - web_accepts0;
    assert!(accepted >= (5 * N) as u64, "{accepted}");
    assert_eq!(
        established(&m1) - established(&m0),
        accepted,
        "TCP connections of the container"
    );
    assert_eq!(
        established(&s1) - established(&s0),
        accepted,
        "the second agent's"
    );
    // docker-proxy's socket is the container's traffic, not a service.
    assert!(
        !m1.label_values("netpulse_service_info", "service")
            .iter()
            .any(|s| s.contains("docker-proxy")),
        "docker-proxy named as a service"
    );
    drop(labelled);
    drop(web);
}

#[test]
fn a_removed_container_leaves_after_the_grace_period_and_one_back_continues() {
    let pid = std::process::id();
    let Some(mut fx) = agent("retire", 19496, "") else {
        return;
    };
    fx.agent.wait_for("the Docker source", docker_up);
    let name = format!("np-retire-{pid}");
    let svc = format!("np-retiring-{pid}");
    let run = || Container::httpd(&name, &["--label", &format!("netpulse.service={svc}")]);
    let c = run();
    let veth = c.host_veth();
    fx.agent.wait_for("the container's service and veth", |m| {
        has_service(m, &svc) && on_container_veth(m, &veth)
    });
    for _ in 0..5 {
        http_get(addr(&c.ip(), 80));
    }
    std::thread::sleep(Duration::from_millis(300));
    let before = fx.agent.metrics().unwrap().packets(&svc, "ingress");
    assert!(before >= 5 * 4, "{before}");
    drop(c);
    // Gone from Docker, still readable through the grace period.
    let m = fx.agent.metrics().unwrap();
    assert_eq!(m.packets(&svc, "ingress"), before);
    // Back under the same name within the grace period: it continues.
    let c = run();
    let veth = c.host_veth();
    fx.agent.wait_for("the container back", |m| {
        has_service(m, &svc) && on_container_veth(m, &veth)
    });
    // Still in its grace period, so in /metrics before Docker lists it
    // again: requests until they are counted, on top of the old counts.
    until_counted(&fx.agent, &svc, addr(&c.ip(), 80), before + 5 * 4);
    drop(c);
    let gone = Instant::now();
    fx.agent
        .wait_for("the service retired", |m| !has_service(m, &svc));
    let took = gone.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "retired after {took:?}, before the 3 s grace period"
    );
}

#[test]
fn a_host_network_container_is_named_through_its_sockets() {
    let pid = std::process::id();
    let Some(mut fx) = agent("hostnet", 19497, "") else {
        return;
    };
    fx.agent.wait_for("the Docker source", docker_up);
    let name = format!("np-hostnet-{pid}");
    let _c = Container::run(
        &name,
        &[
            "--network",
            "host",
            TEST_IMAGE,
            "httpd",
            "-f",
            "-p",
            "127.0.0.1:19494",
            "-h",
            "/www",
        ],
    );
    // Not after the process (httpd), after the container it runs in.
    fx.agent
        .wait_for("the host-network container's service", |m| {
            m.has(
                "netpulse_service_info",
                &[
                    ("service", &name),
                    ("source", "container"),
                    ("container", &name),
                ],
            )
        });
    for _ in 0..5 {
        let status = http_get(addr("127.0.0.1", 19494));
        assert!(status.contains(" 200 "), "{status}");
    }
    fx.agent.wait_for("its traffic counted", |m| {
        m.packets(&name, "ingress") >= 5 * 4 && m.packets(&name, "egress") >= 5 * 4
    });
}

#[test]
fn without_dockerd_the_agent_counts_on_and_reconnects_when_it_returns() {
    let pid = std::process::id();
    if !prerequisites() {
        return;
    }
    let sock = std::env::temp_dir().join(format!("netpulse-dockerd-{pid}.sock"));
    let _ = std::fs::remove_file(&sock);
    let Some(mut fx) = agent(
        "dockerd",
        19498,
        &format!("[docker]\nsocket = \"{}\"\n", sock.display()),
    ) else {
        return;
    };
    let name = format!("np-outage-{pid}");
    let c = Container::httpd(&name, &[]);
    // No socket at start: the agent runs, says so once, and reports the
    // source down.
    let m = fx.agent.wait_for("the agent up without dockerd", |m| {
        m.has("netpulse_source_up", &[("source", "docker")])
    });
    assert!(!docker_up(&m));
    assert!(!has_service(&m, &name));
    let log = fx.agent.log_text();
    assert!(
        log.contains(&format!("no Docker socket at {}", sock.display())),
        "{log}"
    );

    // dockerd appears: within the backoff the container is named.
    let proxy = SocketProxy::start(&sock, Path::new("/var/run/docker.sock"));
    let veth = c.host_veth();
    fx.agent
        .wait_for("the source up and the container named", |m| {
            docker_up(m) && has_service(m, &name) && on_container_veth(m, &veth)
        });

    // dockerd goes away: the source is down, the container keeps its name
    // and its traffic is still counted.
    proxy.stop();
    fx.agent.wait_for("the source down", |m| !docker_up(m));
    let before = fx.agent.metrics().unwrap().packets(&name, "ingress");
    for _ in 0..5 {
        http_get(addr(&c.ip(), 80));
    }
    fx.agent.wait_for("counting through the outage", |m| {
        has_service(m, &name) && m.packets(&name, "ingress") >= before + 5 * 4
    });
    let warnings = fx
        .agent
        .log_text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("retrying with backoff"))
        .count();
    assert_eq!(
        warnings,
        2,
        "one warning per outage:\n{}",
        fx.agent.log_text()
    );

    // And back.
    let _proxy = SocketProxy::start(&sock, Path::new("/var/run/docker.sock"));
    fx.agent.wait_for("the source up again", docker_up);
}

/// A user-defined network, removed on drop.
struct Network(String);

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.0]);
    }
}

#[test]
fn a_container_given_a_new_address_keeps_its_service_and_counts() {
    let pid = std::process::id();
    let Some(mut fx) = agent("newip", 19500, "") else {
        return;
    };
    fx.agent.wait_for("the Docker source", docker_up);
    let net = Network(format!("np-net-{pid}"));
    let _ = docker(&["network", "rm", &net.0]);
    docker_ok(&["network", "create", "--subnet", "10.79.0.0/24", &net.0]);
    let (name, svc) = (format!("np-newip-{pid}"), format!("np-moving-{pid}"));
    let c = Container::httpd(
        &name,
        &[
            "--network",
            &net.0,
            "--ip",
            "10.79.0.10",
            "--label",
            &format!("netpulse.service={svc}"),
        ],
    );
    let veth = c.host_veth();
    fx.agent.wait_for("the container on its network", |m| {
        has_service(m, &svc) && on_container_veth(m, &veth)
    });
    for _ in 0..5 {
        http_get(addr("10.79.0.10", 80));
    }
    let first = fx.agent.wait_for("its first requests", |m| {
        m.packets(&svc, "ingress") >= 5 * 5
    });
    let before = as_ip(&first, &svc);

    // Stopped, moved to another address, started: a new veth, a new
    // address, the same service.
    docker_ok(&["stop", "-t", "1", &name]);
    docker_ok(&["network", "disconnect", &net.0, &name]);
    docker_ok(&["network", "connect", "--ip", "10.79.0.11", &net.0, &name]);
    docker_ok(&["start", &name]);
    let veth = c.host_veth();
    fx.agent.wait_for("the container at its new address", |m| {
        on_container_veth(m, &veth)
    });
    let target = addr("10.79.0.11", 80);
    until_counted(&fx.agent, &svc, target, before.in_packets + 5);
    std::thread::sleep(Duration::from_millis(500));
    let k0 = c.ip_counters();
    let m0 = fx.agent.metrics().unwrap();
    for _ in 0..5 {
        let status = http_get(target);
        assert!(status.contains(" 200 "), "{status}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let k1 = c.ip_counters();
    let m1 = fx.agent.metrics().unwrap();
    assert_eq!(
        delta(as_ip(&m0, &svc), as_ip(&m1, &svc)),
        delta(k0, k1),
        "at the new address, against the container's own counts"
    );
    // The counts went on from where they were.
    let now = as_ip(&m1, &svc);
    assert!(
        now.in_packets >= before.in_packets + 25,
        "{before:?} -> {now:?}"
    );
    drop(c);
}

#[test]
fn dockerd_killed_mid_traffic_and_restarted_the_agent_counts_on_and_names_come_back() {
    let pid = std::process::id();
    if !prerequisites() {
        return;
    }
    // A test kills only a dockerd it started: its own, beside the
    // machine's (own socket, data and exec roots, bridge), so this runs
    // whether or not the machine already runs one.
    let mut own = OwnDockerd::start(9);
    let _selected = own.select();
    let socket = own.socket.display().to_string();
    let Some(mut fx) = agent(
        "dockerd-kill",
        19501,
        &format!("[docker]\nsocket = \"{socket}\"\n"),
    ) else {
        return;
    };
    fx.agent.wait_for("the Docker source", docker_up);
    let (name, svc) = (
        format!("np-survivor-{pid}"),
        format!("np-survivor-svc-{pid}"),
    );
    let c = Container::httpd(
        &name,
        &[
            "--restart",
            "always",
            "--label",
            &format!("netpulse.service={svc}"),
        ],
    );
    let veth = c.host_veth();
    let ip = c.ip();
    fx.agent.wait_for("the container named", |m| {
        has_service(m, &svc) && on_container_veth(m, &veth)
    });

    // Traffic all along: a request every 50 ms for at most 60 s.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, target) = (stop.clone(), addr(&ip, 80));
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(60);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < end {
                let _ = try_http_get(target);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    own.kill();
    let m = fx
        .agent
        .wait_for("the Docker source down", |m| !docker_up(m));
    let during = m.packets(&svc, "ingress");
    fx.agent
        .wait_for("counting on, under the container's name", |m| {
            m.packets(&svc, "ingress") >= during + 20
        });
    assert!(!fx.agent.exited(), "the agent died with dockerd");

    own.restart();
    fx.agent.wait_for("the Docker source back", docker_up);
    // The container is (re)started by the new dockerd: named again, on
    // its (possibly new) veth, and counted.
    let veth = c.host_veth();
    let back = fx.agent.wait_for("the container named again", |m| {
        has_service(m, &svc) && on_container_veth(m, &veth)
    });
    let after = back.packets(&svc, "ingress");
    until_counted(&fx.agent, &svc, addr(&c.ip(), 80), after + 5 * 5);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    traffic.join().unwrap();
    drop(c);
}

/// The README: with the default `refresh_seconds` (1), a container started
/// or removed shows up, or leaves, within a second of dockerd's event.
#[test]
fn at_the_default_refresh_a_container_is_named_within_a_second() {
    let pid = std::process::id();
    let Some(mut fx) = agent_with("prompt", 19502, "", "") else {
        return;
    };
    fx.agent.wait_for("the Docker source", docker_up);
    let (name, svc) = (format!("np-prompt-{pid}"), format!("np-prompt-svc-{pid}"));
    let mut worst = Duration::ZERO;
    for round in 0..3 {
        // `docker run -d` returns once the container started, after the
        // start event: the clock starts there.
        let c = Container::httpd(&name, &["--label", &format!("netpulse.service={svc}")]);
        let t = Instant::now();
        fx.agent
            .wait_for("the container named", |m| has_service(m, &svc));
        let took = t.elapsed();
        worst = worst.max(took);
        assert!(
            took < Duration::from_millis(1000),
            "round {round}: named {took:?} after docker run returned"
        );
        let veth = c.host_veth();
        drop(c);
        // Leaving is applied as promptly: its veth's programs go.
        let t = Instant::now();
        fx.agent.wait_for("the container's veth gone", |m| {
            !on_container_veth(m, &veth)
        });
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "round {round}: the veth left {:?} after docker rm returned",
            t.elapsed()
        );
    }
    eprintln!("named at most {worst:?} after docker run");
}
