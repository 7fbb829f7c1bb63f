//! The `netpulse` binary as a user meets it: config errors with
//! file:line:col and exit code 2, a missing interface named, missing
//! capabilities named, and a new listening socket showing up in /metrics
//! within 2 s with the default refresh.

use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use netpulse_tests::{
    PinDir,
    agent::{Agent, bin, have_bin, live_prerequisites},
    is_root,
    netns::{Pair, have},
    require,
};

fn tmp(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("netpulse-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn config_check_reports_every_problem_with_position_and_exits_2() {
    if !have_bin() {
        return;
    }
    let p = tmp(
        "bad.toml",
        r#"[agent]
listen = "127.0.0.1:9477"

[[service]]
name = "web"
endpoints = [{ proto = "tcp", port = 0 }]

[[service]]
name = "db"
remote = true
endpoints = [{ proto = "tcp", port = 5432, addr = "10.0.0.0/40" }]

[[service]]
name = "web"
endpoints = [{ proto = "udp", port = 53 }]
"#,
    );
    let out = Command::new(bin())
        .args(["config", "check", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let f = p.display().to_string();
    assert!(
        err.contains(&format!("{f}:6:38: port 0 is out of range")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{f}:11:51: `10.0.0.0/40` is not a valid CIDR")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{f}:14:8: duplicate service `web`")),
        "{err}"
    );

    let p = tmp(
        "unknown.toml",
        "[agent]\nlisten = \"127.0.0.1:9477\"\nintrefaces = [\"eth0\"]\n",
    );
    let out = Command::new(bin())
        .args(["config", "check", "-c"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:3:1:", p.display())), "{err}");
    assert!(err.contains("intrefaces"), "{err}");

    // `run` refuses the same way, before touching the kernel.
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let p = tmp(
        "good.toml",
        "[[service]]\nname = \"web\"\nendpoints = [{ proto = \"tcp\", port = 80 }]\n",
    );
    let out = Command::new(bin())
        .args(["config", "check", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 services, 1 endpoints)"));
}

#[test]
fn a_missing_interface_is_named() {
    if !have_bin() || !require("root", is_root()) {
        return;
    }
    let p = tmp(
        "iface.toml",
        "[agent]\ninterfaces = [\"lo\", \"np-nosuch0\"]\nlisten = \"127.0.0.1:0\"\n",
    );
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interface `np-nosuch0` named in the config does not exist"),
        "{err}"
    );
}

#[test]
fn missing_capabilities_are_named() {
    if !have_bin()
        || !require("root", is_root())
        || !require("setpriv (util-linux)", have("setpriv"))
    {
        return;
    }
    let p = tmp("caps.toml", "[agent]\nlisten = \"127.0.0.1:0\"\n");
    // `--backend ebpf` never falls back: even with CAP_NET_RAW (all
    // libpcap needs) it names what eBPF lacks and exits 1. `auto` (the
    // default) falls back to libpcap when it has CAP_NET_RAW (the pcap
    // backend test); without it, it too names what eBPF lacks and exits 1.
    for (backend, bounding, missing) in [
        (
            "ebpf",
            "-all,+net_raw",
            "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN",
        ),
        ("ebpf", "-all,+net_raw,+net_admin", "CAP_BPF, CAP_PERFMON"),
        ("ebpf", "-all,+net_raw,+bpf,+perfmon", "CAP_NET_ADMIN"),
        ("auto", "-all", "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"),
        ("auto", "-all,+net_admin", "CAP_BPF, CAP_PERFMON"),
        ("auto", "-all,+bpf,+perfmon", "CAP_NET_ADMIN"),
    ] {
        let out = Command::new("setpriv")
            .args(["--bounding-set", bounding, "--inh-caps", "-all", "--"])
            .arg(bin())
            .args(["run", "--backend", backend, "--config"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("missing capabilities: {missing}.")),
            "--backend {backend}, bounding set {bounding}: {err}"
        );
    }
}

#[test]
fn a_new_listener_shows_up_within_two_seconds() {
    if !live_prerequisites() {
        return;
    }
    let pair = Pair::new("cli", 92);
    let pins = PinDir::mounted("cli");
    // Nothing but where to listen and pin: interfaces, discovery and the
    // refresh period are the defaults.
    let port = 19478;
    let cfg = tmp(
        "default.toml",
        &format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\npin_dir = \"{}\"\n",
            pins.path().display()
        ),
    );
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &cfg.with_extension("log"));
    agent.wait_for("probes on the veth", |m| {
        m.has(
            "netpulse_probe_attached",
            &[("interface", pair.dev_a.as_str()), ("hook", "tc")],
        )
    });

    // A new server, named after this process.
    let addr = pair.addr_a;
    let listener = pair.a.run(move || TcpListener::bind((addr, 7100)).unwrap());
    let started = Instant::now();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            let mut c = c;
            let _ = c.write_all(b"hi");
        }
    });
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let name = netpulse::identity::name_from_process(comm.trim());
    // Client traffic every 100 ms until the service shows both directions.
    let seen = loop {
        pair.b.run(move || drop(TcpStream::connect((addr, 7100))));
        let m = agent.metrics().unwrap_or_default();
        let p = |dir: &str| {
            m.sum(
                "netpulse_service_packets_total",
                &[("service", name.as_str()), ("direction", dir)],
            )
        };
        if p("ingress") > 0 && p("egress") > 0 {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(2) {
            break started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    agent.stop();
    assert!(
        seen <= Duration::from_secs(2),
        "the new listener's traffic took {seen:?} to show up"
    );
}

#[test]
fn the_series_budget_folds_the_excess_into_other() {
    if !live_prerequisites() {
        return;
    }
    let pair = Pair::new("budget", 101);
    let pins = PinDir::mounted("budget");
    let port = 19487;
    // Room for three services' series: two services and ~other.
    let mut text = format!(
        "[agent]\nlisten = \"127.0.0.1:{port}\"\npin_dir = \"{}\"\ndiscover_sockets = false\nmax_series = 33\n",
        pins.path().display()
    );
    for (name, p) in [("a", 7801), ("b", 7802), ("c", 7803), ("d", 7804)] {
        text += &format!(
            "\n[[service]]\nname = \"{name}\"\nendpoints = [{{ proto = \"udp\", port = {p} }}]\n"
        );
    }
    let cfg = tmp("budget.toml", &text);
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &cfg.with_extension("log"));
    agent.wait_for("probes", |m| {
        m.has(
            "netpulse_probe_attached",
            &[("interface", pair.dev_a.as_str())],
        )
    });
    // 3 datagrams to c, 4 to d: both beyond the budget.
    let to = pair.addr_a;
    pair.b.run(move || {
        let u = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for (p, n) in [(7803, 3), (7804, 4)] {
            for _ in 0..n {
                u.send_to(b"x", (to, p)).unwrap();
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let m = agent.metrics().unwrap();
    let services = m.label_values("netpulse_service_packets_total", "service");
    assert_eq!(services, ["a", "b", "~other"]);
    let series: usize = [
        "netpulse_service_packets_total",
        "netpulse_service_bytes_total",
        "netpulse_service_tcp_flags_total",
        "netpulse_service_info",
    ]
    .iter()
    .map(|n| m.0.get(*n).map_or(0, Vec::len))
    .sum();
    assert!(
        series <= 33,
        "{series} per-service series over a budget of 33"
    );
    assert_eq!(m.sum("netpulse_series_dropped", &[]), 2);
    assert_eq!(
        m.sum(
            "netpulse_service_packets_total",
            &[("service", "~other"), ("direction", "ingress")]
        ),
        7
    );
    // Each collector reports itself, as node_exporter's do: all five
    // succeeded, each with its duration.
    for c in ["services", "unclassified", "datapath", "checks", "agent"] {
        assert_eq!(
            m.sum("netpulse_scrape_collector_success", &[("collector", c)]),
            1,
            "collector {c}"
        );
        assert!(
            m.has(
                "netpulse_scrape_collector_duration_seconds",
                &[("collector", c)]
            ),
            "collector {c}"
        );
    }
    agent.stop();
}

#[test]
fn status_prints_a_running_agents_services_as_a_table_and_as_json() {
    if !live_prerequisites() {
        return;
    }
    let pair = Pair::new("status", 105);
    let pins = PinDir::mounted("status");
    let port = 19545;
    let cfg = tmp(
        "status.toml",
        &format!(
            r#"[agent]
listen = "127.0.0.1:{port}"
pin_dir = "{}"
discover_sockets = false
state_dir = "{}"

[[service]]
name = "web"
endpoints = [{{ proto = "tcp", port = 19544 }}]

[[service]]
name = "db"
endpoints = [{{ proto = "tcp", port = 19546 }}]

[[check]]
name = "db-tcp"
kind = "tcp"
target = "127.0.0.1:19546"
service = "db"
interval_seconds = 1
failure_threshold = 1
"#,
            pins.path().display(),
            std::env::temp_dir()
                .join(format!("netpulse-cli-status-{}", std::process::id()))
                .display()
        ),
    );
    let log = cfg.with_extension("log");
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &log);
    // Nothing listens on db's port: its check goes down.
    agent.wait_for("db's check to fail", |m| {
        m.has("netpulse_check_up", &[("check", "db-tcp")])
            && m.sum("netpulse_check_runs_total", &[("check", "db-tcp")]) > 0
    });
    // Known traffic to web: 5 SYNs from the other side (refused: RSTs back).
    let target = std::net::SocketAddr::from((pair.addr_a, 19544));
    pair.b.run(move || {
        for _ in 0..5 {
            let _ = TcpStream::connect_timeout(&target, Duration::from_secs(1));
        }
    });
    let url = format!("http://127.0.0.1:{port}");
    let status = |args: &[&str]| {
        let out = pair
            .a
            .exec(&bin(), &[&["status", "--url", &url], args].concat());
        assert!(
            out.status.success(),
            "netpulse status {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    let json: serde_json::Value = serde_json::from_str(&status(&["--output", "json"])).unwrap();
    let services = json["services"].as_array().unwrap();
    let web = services.iter().find(|s| s["name"] == "web").unwrap();
    assert_eq!(web["counters"]["ingress"]["syn"], 5);
    assert_eq!(web["counters"]["egress"]["rst"], 5);
    let db = services.iter().find(|s| s["name"] == "db").unwrap();
    assert_eq!(db["state"], "down");

    let table = status(&[]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].contains("2 services") && lines[0].contains("1 down"),
        "{table}"
    );
    let head = lines.iter().position(|l| l.starts_with("SERVICE")).unwrap();
    let cols: Vec<&str> = lines[head].split_whitespace().collect();
    assert_eq!(&cols[..3], ["SERVICE", "STATE", "SOURCE"], "{table}");
    let row = |name: &str| -> Vec<&str> {
        lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{table}"))
            .split_whitespace()
            .collect()
    };
    assert_eq!(&row("db")[1..3], ["down", "config"]);
    assert_eq!(row("web")[1], "unknown");
    // Not a terminal: no colour codes.
    assert!(!table.contains('\x1b'));

    // --watch redraws until stopped.
    let mut watch = Command::new("ip")
        .args(["netns", "exec", &pair.a.name, &bin()])
        .args(["status", "--url", &url, "--watch", "--interval", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    // SAFETY: the child we spawned (ip netns exec execs netpulse).
    unsafe { libc::kill(watch.id() as i32, libc::SIGTERM) };
    let mut out = String::new();
    std::io::Read::read_to_string(watch.stdout.as_mut().unwrap(), &mut out).unwrap();
    let _ = watch.wait();
    assert!(
        out.matches("SERVICE").count() >= 2,
        "--watch drew {} tables:\n{out}",
        out.matches("SERVICE").count()
    );
    agent.stop();
}

#[test]
fn status_says_which_url_it_tried_and_how_to_point_it_elsewhere() {
    if !have_bin() {
        return;
    }
    // Nothing listens on port 1 of loopback.
    let out = Command::new(bin())
        .arg("status")
        .env("NETPULSE_URL", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("http://127.0.0.1:1/api/v1/services")
            && err.contains("--url")
            && err.contains("NETPULSE_URL"),
        "{err}"
    );
}

#[test]
fn completions_and_the_man_page_come_from_the_cli_definition() {
    if !have_bin() {
        return;
    }
    let run = |args: &[&str]| {
        let out = Command::new(bin()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.contains("complete -F _netpulse"), "{bash}");
    for sub in ["status", "check", "config", "run"] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
    assert!(run(&["completions", "zsh"]).starts_with("#compdef netpulse"));
    let man = run(&["man"]);
    assert!(man.contains(".TH netpulse"), "{man}");
    assert!(man.contains("status"));
}

/// Capture 7 of [`fake_agent`]: with a newline, so that a line-buffered
/// stdout writes it (and meets a closed pipe) before the exit.
const FAKE_CAPTURE: &[u8] = b"pcapng\nbytes";

/// A stand-in for a running agent's API on loopback, enough for the
/// commands that read one: `/api/v1/services` (one service),
/// `/api/v1/captures` (capture 7, part 2) and capture 7's file. The URL.
fn fake_agent() -> String {
    use std::io::Read;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&req).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = match path {
                    "/api/v1/services" => (
                        "200 OK",
                        br#"{"host":"fake","services":[{"name":"web","state":"up","source":"config"}]}"#.to_vec(),
                    ),
                    "/api/v1/captures" => (
                        "200 OK",
                        br#"{"captures":[{"id":7,"state":"done","bytes":12,"plan":{"filter":"tcp port 80"},"result":{"packets":3},"parts":[{"part":2,"bytes":12}]}]}"#.to_vec(),
                    ),
                    "/api/v1/captures/7/file" | "/api/v1/captures/7/file?part=2" => {
                        ("200 OK", FAKE_CAPTURE.to_vec())
                    }
                    _ => ("404 Not Found", br#"{"error":"no such thing"}"#.to_vec()),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(&body);
            });
        }
    });
    url
}

/// Runs `netpulse` with `args` and stdout a pipe whose reader has already
/// gone (what `| head` leaves once it has its lines), so the first write
/// fails with EPIPE whatever the size of the output. Killed past 20 s (a
/// `--watch` that does not notice would loop forever).
fn with_closed_stdout(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(bin())
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("NETPULSE_URL")
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("netpulse {args:?} still running 20 s after its stdout closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    if !have_bin() {
        return;
    }
    let url = fake_agent();
    let ok_cfg = tmp("pipe-ok.toml", "");
    let checks = tmp(
        "pipe-checks.toml",
        &format!(
            "[[check]]\nname = \"up\"\nkind = \"tcp\"\ntarget = \"{}\"\n\
             [[check]]\nname = \"refused\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:1\"\n",
            url.trim_start_matches("http://")
        ),
    );
    let cfg = |p: &std::path::Path| p.to_str().unwrap().to_string();
    // (arguments, exit code): a closed pipe changes no verdict.
    let cases: Vec<(Vec<String>, i32)> = vec![
        (vec!["completions".into(), "bash".into()], 0),
        (vec!["man".into()], 0),
        (
            vec!["config".into(), "check".into(), "-c".into(), cfg(&ok_cfg)],
            0,
        ),
        (
            vec![
                "check".into(),
                "run".into(),
                "up".into(),
                "-c".into(),
                cfg(&checks),
            ],
            0,
        ),
        (
            vec![
                "check".into(),
                "run".into(),
                "--all".into(),
                "-c".into(),
                cfg(&checks),
            ],
            1,
        ),
        (
            vec![
                "check".into(),
                "run".into(),
                "--all".into(),
                "-o".into(),
                "json".into(),
                "-c".into(),
                cfg(&checks),
            ],
            1,
        ),
        (vec!["status".into(), "--url".into(), url.clone()], 0),
        (
            vec![
                "status".into(),
                "-o".into(),
                "json".into(),
                "--url".into(),
                url.clone(),
            ],
            0,
        ),
        (
            vec![
                "status".into(),
                "--watch".into(),
                "--url".into(),
                url.clone(),
            ],
            0,
        ),
        (
            vec!["capture".into(), "list".into(), "--url".into(), url.clone()],
            0,
        ),
        (
            vec![
                "capture".into(),
                "list".into(),
                "-o".into(),
                "json".into(),
                "--url".into(),
                url.clone(),
            ],
            0,
        ),
        (
            vec![
                "capture".into(),
                "get".into(),
                "7".into(),
                "--url".into(),
                url.clone(),
            ],
            0,
        ),
        (vec!["status".into(), "--help".into()], 0),
    ];
    // Every case, then one verdict: what a revert breaks, all of it.
    let mut wrong = Vec::new();
    for (args, code) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = with_closed_stdout(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(code) || !err.is_empty() {
            wrong.push(format!(
                "netpulse {args:?}: {} (want exit {code}), stderr {:?}",
                out.status,
                err.lines().take(3).collect::<Vec<_>>()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A pseudo-terminal: (the side the test reads, the side the child gets
/// as its stderr), both close-on-exec in this process.
fn pty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors, which are ours from here on.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    for fd in [master, slave] {
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: fresh descriptors, owned by nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

/// `netpulse check run --all` of one check to a refused port, its stderr a
/// terminal and the log at warn, so that the log says "check down"; with
/// `no_color` as NO_COLOR. What the terminal got.
fn check_log_on_a_terminal(no_color: Option<&str>) -> String {
    use std::io::Read;
    let cfg = tmp(
        "no-color.toml",
        "[[check]]\nname = \"refused\"\nkind = \"tcp\"\ntarget = \"127.0.0.1:1\"\n",
    );
    let (mut term, stderr) = pty();
    let mut child = {
        let mut c = Command::new(bin());
        c.args(["check", "run", "--all", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(stderr);
        match no_color {
            Some(v) => c.env("NO_COLOR", v),
            None => c.env_remove("NO_COLOR"),
        };
        c.spawn().unwrap()
        // The Command, and with it this process's copy of the terminal's
        // child side, goes here: the read below ends when the child's does.
    };
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once no process holds the child side any more.
        while let Ok(n @ 1..) = term.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    });
    assert_eq!(child.wait().unwrap().code(), Some(1));
    reader.join().unwrap()
}

#[test]
fn no_color_means_no_colour_in_the_logs_either() {
    if !have_bin() {
        return;
    }
    // On a terminal the log is coloured (else this test would prove
    // nothing), and NO_COLOR set to anything but "" turns that off.
    let coloured = check_log_on_a_terminal(None);
    assert!(
        coloured.contains("check down") && coloured.contains("\x1b["),
        "{coloured:?}"
    );
    let empty = check_log_on_a_terminal(Some(""));
    assert!(empty.contains("\x1b["), "NO_COLOR=\"\" is unset: {empty:?}");
    for v in ["1", "0", "yes"] {
        let plain = check_log_on_a_terminal(Some(v));
        assert!(plain.contains("check down"), "{plain:?}");
        assert!(!plain.contains("\x1b["), "NO_COLOR={v}: {plain:?}");
    }
}

#[test]
fn output_is_the_format_and_file_the_file_in_every_command() {
    if !have_bin() {
        return;
    }
    let help = |args: &[&str]| {
        let out = Command::new(bin())
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let list = help(&["capture", "list"]);
    assert!(list.contains("-o, --output <OUTPUT>"), "{list}");
    assert!(!list.contains("--json"), "--json is a hidden alias: {list}");
    let get = help(&["capture", "get"]);
    assert!(get.contains("-f, --file <FILE>"), "{get}");
    assert!(get.contains("-O, --remote-name"), "{get}");
    assert!(!get.contains("-o,"), "-o is the format, not a file: {get}");
    for args in [&["status"][..], &["check", "run"], &["analyze"]] {
        assert!(help(args).contains("-o, --output <OUTPUT>"), "{args:?}");
    }

    // Against a stand-in agent: --output json, -o json and the old --json
    // print the same document; get --file and -O write the file.
    let url = fake_agent();
    let run = |args: &[&str], dir: &std::path::Path| {
        let out = Command::new(bin())
            .args(["capture", "--url", &url])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let dir = std::env::temp_dir().join(format!("netpulse-cli-{}-get", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let json = run(&["list", "--output", "json"], &dir);
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(v["captures"][0]["id"], 7, "{v}");
    assert_eq!(run(&["list", "-o", "json"], &dir), json);
    assert_eq!(run(&["list", "--json"], &dir), json);
    let table = String::from_utf8(run(&["list"], &dir)).unwrap();
    assert!(table.starts_with("ID"), "{table}");
    assert_eq!(run(&["get", "7"], &dir), FAKE_CAPTURE);
    run(&["get", "7", "--file", "a.pcapng"], &dir);
    assert_eq!(std::fs::read(dir.join("a.pcapng")).unwrap(), FAKE_CAPTURE);
    run(&["get", "7", "-O"], &dir);
    assert_eq!(
        std::fs::read(dir.join("netpulse-7-2.pcapng")).unwrap(),
        FAKE_CAPTURE
    );
    let _ = std::fs::remove_dir_all(&dir);
}
