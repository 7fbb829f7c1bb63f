//! Captures on demand through the agent's API and the `netpulse capture`
//! CLI: the file a capture job writes is read by tshark with the packets
//! sent; the file endpoint wants the token and takes numbers only; and the
//! capture folder stays under its disk cap while a capture rotates parts.

use std::{
    net::UdpSocket,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use netpulse::cli::capture::http;
use netpulse_tests::{
    agent::{Agent, Backend, bin, live_prerequisites},
    netns::{Pair, have, run_in},
    pcapfile::tshark_io,
    require,
};

const ECHO: u16 = 19651;
const TOKEN: &str = "np6-capture-token";

fn config(dir: &Path, port: u16, pair: &Pair, capture: &str) -> PathBuf {
    let p = dir.join(format!("capture-{port}.toml"));
    std::fs::write(
        &p,
        format!(
            r#"
[agent]
listen = "127.0.0.1:{port}"
state_dir = "{state}"
refresh_seconds = 0.2
interfaces = ["{dev}"]
discover_sockets = false
backend = "pcap"

[api]
token = "{TOKEN}"

[capture]
{capture}

[[service]]
name = "echo"
endpoints = [{{ proto = "udp", port = {ECHO} }}]
"#,
            state = dir.join(format!("state-{port}")).display(),
            dev = pair.dev_a,
        ),
    )
    .unwrap();
    p
}

fn echo_server(pair: &Pair) {
    let addr = pair.addr_a;
    let s = pair.a.run(move || UdpSocket::bind((addr, ECHO)).unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
}

/// `n` echoes of `size` bytes from b: 2n packets on the wire.
fn echoes(pair: &Pair, n: usize, size: usize) {
    let addr = pair.addr_a;
    pair.b.run(move || {
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..n {
            u.send_to(&vec![5u8; size], (addr, ECHO)).unwrap();
            u.recv_from(&mut buf).unwrap();
        }
    });
}

/// `netpulse capture ARGS` inside the agent's namespace.
fn cli(pair: &Pair, port: u16, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", &pair.a.name])
        .arg(bin())
        .arg("capture")
        .args(["--url", &format!("http://127.0.0.1:{port}")])
        .args(args)
        .output()
        .unwrap()
}

/// A request to the agent from inside its namespace: (status, body).
fn api(pair: &Pair, port: u16, method: &'static str, path: &str, token: bool) -> (u16, Vec<u8>) {
    let path = path.to_string();
    let body = (method == "POST").then(|| "{}".to_string());
    run_in(&pair.a.name, move || {
        let a = http(
            &format!("http://127.0.0.1:{port}"),
            method,
            &path,
            token.then_some(TOKEN),
            body.as_deref(),
        )
        .unwrap();
        (a.status, a.body)
    })
}

fn job_state(pair: &Pair, port: u16, id: i64) -> serde_json::Value {
    let (s, b) = api(pair, port, "GET", &format!("/api/v1/jobs/{id}"), false);
    assert_eq!(s, 200);
    serde_json::from_slice(&b).unwrap()
}

/// `netpulse capture start` of 4 s of the echo service on the veth; the
/// capture's id.
fn start_echo_capture(pair: &Pair, port: u16) -> i64 {
    let out = cli(
        pair,
        port,
        &[
            "--token",
            TOKEN,
            "start",
            "--interface",
            &pair.dev_a,
            "--service",
            "echo",
            "--seconds",
            "4",
        ],
    );
    queued_id(&out)
}

/// `netpulse capture get ID --file FILE`, which must succeed.
fn download(pair: &Pair, port: u16, id: i64, file: &Path) {
    let out = cli(
        pair,
        port,
        &[
            "--token",
            TOKEN,
            "get",
            &id.to_string(),
            "--file",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_job(pair: &Pair, port: u16, id: i64, state: &[&str]) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = job_state(pair, port, id);
        if state.iter().any(|s| j["state"] == *s) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} never got to {state:?}: {j}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn queued_id(out: &std::process::Output) -> i64 {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.split_whitespace()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no id in {text}"))
}

/// The echo service in namespace `a` of a new pair and an agent watching
/// it, with `capture` in its `[capture]` table; None without the
/// prerequisites.
fn echo_agent(
    tag: &str,
    net: u8,
    dir_name: &str,
    port: u16,
    capture: &str,
) -> Option<(Pair, PathBuf, Agent)> {
    if !live_prerequisites() || !require("tshark (apt-get install tshark)", have("tshark")) {
        return None;
    }
    let pair = Pair::np6(tag, net);
    let dir = std::env::temp_dir().join(format!("{dir_name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir, port, &pair, capture);
    echo_server(&pair);
    let mut agent = Agent::start_with(
        &pair.a,
        &[],
        &cfg,
        port,
        &dir.join("agent.log"),
        Backend::AsConfigured,
    );
    agent.wait_for("the agent", |m| {
        m.has("netpulse_service_info", &[("service", "echo")])
    });
    Some((pair, dir, agent))
}

#[test]
fn a_capture_job_writes_a_file_tshark_reads_with_the_packets_sent() {
    let port = 19650;
    let Some((pair, dir, agent)) = echo_agent("cap", 12, "netpulse-capture", port, "") else {
        return;
    };

    // Starting a capture needs the token; the file endpoint too, and it
    // takes numbers only.
    let out = cli(&pair, port, &["start", "--service", "echo"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 401"));
    let (s, _) = api(&pair, port, "GET", "/api/v1/captures/1/file", false);
    assert_eq!(s, 401);
    for bad in ["..%2F..%2Fetc%2Fpasswd", "1.pcapng", "-1x"] {
        let (s, _) = api(
            &pair,
            port,
            "GET",
            &format!("/api/v1/captures/{bad}/file"),
            true,
        );
        assert!(s == 400 || s == 404, "{bad}: {s}");
    }
    // A bad filter or an unknown service is refused before any job.
    let out = cli(
        &pair,
        port,
        &["--token", TOKEN, "start", "--filter", "udp port"],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(
        &pair,
        port,
        &["--token", TOKEN, "start", "--service", "nope"],
    );
    assert_eq!(out.status.code(), Some(2));

    // The service's traffic, 2 × 15 packets, while the capture runs.
    let id = start_echo_capture(&pair, port);
    wait_job(&pair, port, id, &["running"]);
    std::thread::sleep(Duration::from_millis(500));
    echoes(&pair, 15, 200);
    let j = wait_job(&pair, port, id, &["done", "failed"]);
    assert_eq!(j["state"], "done", "{j}");
    assert_eq!(j["result"]["packets"], 30, "{j}");
    assert_eq!(j["result"]["stopped_by"], "seconds");

    // The file, through the CLI, as tshark reads it.
    let file = dir.join("got.pcapng");
    download(&pair, port, id, &file);
    let counts = tshark_io(&file, &[&format!("udp.port=={ECHO}"), "frame"]);
    assert_eq!(counts[0].0, 30, "tshark's count of the echo packets");
    assert_eq!(counts[1].0, 30, "nothing else was captured");
    // netpulse analyze agrees.
    let out = Command::new(bin())
        .arg("analyze")
        .arg(&file)
        .args(["--service", &format!("echo=udp/{ECHO}"), "--output", "json"])
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["services"][0]["ingress"]["packets"], 15);
    assert_eq!(r["services"][0]["egress"]["packets"], 15);

    // A packet limit stops it early; the list shows both.
    let out = cli(
        &pair,
        port,
        &[
            "--token",
            TOKEN,
            "start",
            "--interface",
            &pair.dev_a,
            "--filter",
            &format!("udp dst port {ECHO}"),
            "--packets",
            "5",
            "--seconds",
            "20",
        ],
    );
    let id2 = queued_id(&out);
    wait_job(&pair, port, id2, &["running"]);
    std::thread::sleep(Duration::from_millis(500));
    echoes(&pair, 10, 100);
    let j = wait_job(&pair, port, id2, &["done", "failed"]);
    assert_eq!(j["result"]["packets"], 5, "{j}");
    assert_eq!(j["result"]["stopped_by"], "packets", "{j}");
    let out = cli(&pair, port, &["list", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<i64> = v["captures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![id, id2]);
    let out = cli(&pair, port, &["list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("udp dst port {ECHO}")));
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_disk_cap_holds_while_a_capture_rotates() {
    let port = 19652;
    // 300 kB in all, parts of 100 kB.
    let Some((pair, dir, agent)) = echo_agent(
        "cc",
        13,
        "netpulse-capcap",
        port,
        "max_disk_mb = 0.3\nfile_mb = 0.1",
    ) else {
        return;
    };
    let captures = dir.join(format!("state-{port}")).join("captures");
    let on_disk = || -> u64 {
        std::fs::read_dir(&captures)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    let mut ids = Vec::new();
    for round in 0..2 {
        let id = start_echo_capture(&pair, port);
        ids.push(id);
        wait_job(&pair, port, id, &["running"]);
        std::thread::sleep(Duration::from_millis(300));
        // ~1,000 packets of ~1 kB: about 1 MB, three times the cap.
        echoes(&pair, 500, 1000);
        assert!(
            on_disk() <= 300_000,
            "round {round}: {} bytes on disk",
            on_disk()
        );
        let j = wait_job(&pair, port, id, &["done", "failed"]);
        assert_eq!(j["state"], "done", "{j}");
        assert_eq!(j["result"]["packets"], 1000, "{j}");
        assert!(
            on_disk() <= 300_000,
            "round {round}: {} bytes on disk",
            on_disk()
        );
    }
    // The newest parts are kept, the oldest went; every kept part is a
    // whole pcapng tshark reads.
    let mut names: Vec<String> = std::fs::read_dir(&captures)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 2, "{names:?}");
    assert!(
        names.iter().all(|n| n.starts_with(&format!("{}-", ids[1]))),
        "the first capture's files made room for the second's: {names:?}"
    );
    assert!(
        !names.contains(&format!("{}-0.pcapng", ids[1])),
        "{names:?}"
    );
    for n in &names {
        let frames = tshark_io(&captures.join(n), &["frame"])[0].0;
        assert!(frames > 0, "{n}");
    }
    let (s, _) = api(
        &pair,
        port,
        "GET",
        &format!("/api/v1/captures/{}/file?part=0", ids[0]),
        true,
    );
    assert_eq!(s, 404, "a file the cap removed is gone from the API too");
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TCP server on `addr:port` that reads what it is sent and answers;
/// it stops listening (new connections are refused) when `stop` is set.
fn stoppable_server(
    pair: &Pair,
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    let addr = pair.addr_a;
    let l = pair
        .a
        .run(move || std::net::TcpListener::bind((addr, port)).unwrap());
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            match l.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf);
                    let _ = c.write_all(b"ok");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        // The listener closes here: SYNs get RSTs from now on.
    })
}

#[test]
fn a_failing_check_leaves_a_capture_with_packets_from_before_the_failure() {
    capture_on_failure(false);
}

/// The same for a service the agent found by its listening socket (no
/// `[[service]]`): the action's filter comes from the datapath's table.
#[test]
fn capture_on_failure_works_for_a_socket_service() {
    capture_on_failure(true);
}

fn capture_on_failure(socket_service: bool) {
    if !live_prerequisites() || !require("tshark (apt-get install tshark)", have("tshark")) {
        return;
    }
    use std::sync::{Arc, atomic::AtomicBool};
    let (tag, net, port, web) = if socket_service {
        ("cs", 15, 19654, 19661)
    } else {
        ("cf", 14, 19653, 19660)
    };
    let pair = Pair::np6(tag, net);
    let dir = netpulse_tests::scratch(&format!("capfail-{tag}"));
    // A socket service is named after the process that listens: this test.
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let (service, discover, declared) = if socket_service {
        (
            netpulse::identity::name_from_process(comm.trim()),
            true,
            String::new(),
        )
    } else {
        (
            "web".to_string(),
            false,
            format!(
                "[[service]]\nname = \"web\"\nendpoints = [{{ proto = \"tcp\", port = {web} }}]\n"
            ),
        )
    };
    let cfg = dir.join("fail.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[agent]
listen = "127.0.0.1:{port}"
state_dir = "{state}"
refresh_seconds = 0.2
interfaces = ["{dev}"]
discover_sockets = {discover}
backend = "pcap"

[api]
token = "{TOKEN}"

{declared}
[[check]]
name = "web-up"
kind = "tcp"
target = "{a}:{web}"
service = "{service}"
interval_seconds = 0.3
timeout_seconds = 0.25
actions = [{{ kind = "capture", interface = "{dev}", seconds = 2, ring_packets = 500, ring_seconds = 60, cooldown_seconds = 3600 }}]
"#,
            state = dir.join("state").display(),
            dev = pair.dev_a,
            a = pair.addr_a,
        ),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let server = stoppable_server(&pair, web, stop.clone());
    let mut agent = Agent::start_with(
        &pair.a,
        &[],
        &cfg,
        port,
        &dir.join("agent.log"),
        Backend::AsConfigured,
    );
    agent.wait_for("the check up", |m| {
        m.sum("netpulse_check_up", &[("check", "web-up")]) == 1
    });
    assert!(
        agent.log_text().contains("pre-trigger ring started"),
        "{}",
        agent.log_text()
    );

    // Before the failure: five requests from b, with payload.
    let addr = pair.addr_a;
    pair.b.run(move || {
        use std::io::{Read, Write};
        for _ in 0..5 {
            let mut s = std::net::TcpStream::connect((addr, web)).unwrap();
            s.write_all(&[0x42; 700]).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    // The failure: the server stops listening; the check goes down and its
    // capture action fires. After it, b's attempts are refused.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    server.join().unwrap();
    agent.wait_for("the check down", |m| {
        m.sum("netpulse_check_up", &[("check", "web-up")]) == 0
    });
    pair.b.run(move || {
        for _ in 0..3 {
            assert!(std::net::TcpStream::connect((addr, web)).is_err());
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    // The capture job, done once its 2 s are over.
    let deadline = Instant::now() + Duration::from_secs(20);
    let capture = loop {
        let (s, b) = api(&pair, port, "GET", "/api/v1/captures", false);
        assert_eq!(s, 200);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        if let Some(c) = v["captures"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["state"] == "done"))
        {
            break c.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no finished capture: {v}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(capture["plan"]["check"], "web-up", "{capture}");
    assert!(
        capture["result"]["packets_before_trigger"]
            .as_u64()
            .unwrap()
            > 0,
        "{capture}"
    );
    let id = capture["id"].as_i64().unwrap();
    let file = dir.join("failure.pcapng");
    download(&pair, port, id, &file);
    let b = pair.addr_b.to_string();
    let counts = tshark_io(
        &file,
        &[
            // b's requests, answered: only possible before the failure.
            &format!("ip.src=={b} && tcp.dstport=={web} && tcp.len==700"),
            // b's refused attempts: after it.
            &format!("ip.dst=={b} && tcp.srcport=={web} && tcp.flags.reset==1"),
        ],
    );
    assert_eq!(
        counts[0].0, 5,
        "the requests from before the failure are in the file"
    );
    assert!(counts[1].0 >= 3, "the refusals after it too: {counts:?}");
    // Why the check failed: in the job's result and as the file's comment,
    // as capinfos reads it.
    let why = capture["result"]["explanation"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("answered RST"), "{capture}");
    let info = std::process::Command::new("capinfos")
        .arg(&file)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains(&format!("web-up failed: {why}")),
        "capinfos shows no comment with the explanation:\n{info}"
    );
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
