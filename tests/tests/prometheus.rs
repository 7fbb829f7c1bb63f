//! netpulse and a real Prometheus (Debian's): the alert rules check and pass
//! their unit tests under promtool, /metrics passes `promtool check
//! metrics`, and with Prometheus scraping a live agent every query in the
//! dashboards returns data and every rule expression evaluates.
//!
//! For the TCP health panels the live agent sees, in its namespace: TCP
//! connections to a local service (established, closed), connections to a
//! `remote` service (established, held open, refused, timed out), and
//! kernel drops: a firewall rule dropping SYNs to one service's port
//! (netfilter_drop, attributed), one dropping SYNs toward the remote
//! service (egress), and connects to a port nobody serves (no_socket,
//! unattributed).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use netpulse_tests::{
    PinDir,
    agent::{Agent, live_prerequisites},
    dashboards,
    netns::{Netns, Pair, have},
    prom::Prometheus,
    require,
    scrape::get,
};

const DASHBOARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards");

#[test]
fn alert_rules_check_and_pass_their_unit_tests() {
    if !require("promtool (Debian prometheus)", have("promtool")) {
        return;
    }
    for args in [
        &["check", "rules", "alerts.yaml"][..],
        &["test", "rules", "alerts.test.yaml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(DASHBOARDS)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_scrape_config_example_is_valid() {
    if !require("promtool (Debian prometheus)", have("promtool")) {
        return;
    }
    // The example names the rules where the .deb installs them; check it
    // against the repository's copy.
    let text = std::fs::read_to_string(format!("{DASHBOARDS}/prometheus-scrape.yaml"))
        .unwrap()
        .replace(
            "/usr/share/netpulse/rules/alerts.yaml",
            &format!("{DASHBOARDS}/alerts.yaml"),
        );
    let tmp = std::env::temp_dir().join(format!("netpulse-scrape-{}.yaml", std::process::id()));
    std::fs::write(&tmp, text).unwrap();
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(&tmp)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&tmp);
    assert!(
        out.status.success(),
        "promtool check config:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every PromQL expression in the dashboards (panels and template
/// variables), with Grafana's variables filled in ("All").
///
/// The Service map dashboard's queries return data here too: `web` and
/// `echo` are served to b's address, which is the `remote` service `db`'s,
/// so the agent names their peer `db`. Its two-host view (a client's edge
/// seen by both agents) is tests/tests/service_map.rs.
fn dashboard_queries() -> Vec<(String, String)> {
    let out: Vec<(String, String)> = dashboards::files()
        .iter()
        .flat_map(|f| dashboards::queries(f))
        .map(|(w, q)| (w, dashboards::fill(&q, ".*", ".*")))
        .collect();
    assert!(!out.is_empty());
    out
}

fn rule_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("{DASHBOARDS}/alerts.yaml")).unwrap();
    // The rules file is YAML; Prometheus itself validated it above. Pull
    // each alert name and its (possibly multi-line) expr.
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        if let Some(name) = lines[i].trim().strip_prefix("- alert: ") {
            let mut j = i + 1;
            while !lines[j].trim_start().starts_with("expr:") {
                j += 1;
            }
            let first = lines[j].trim_start().trim_start_matches("expr:").trim();
            let expr = if first == "|" {
                let indent = lines[j].len() - lines[j].trim_start().len();
                let mut e = String::new();
                let mut k = j + 1;
                while k < lines.len()
                    && (lines[k].trim().is_empty()
                        || lines[k].len() - lines[k].trim_start().len() > indent)
                {
                    e.push_str(lines[k].trim());
                    e.push(' ');
                    k += 1;
                }
                e
            } else {
                first.to_string()
            };
            out.push((name.to_string(), expr));
        }
        i += 1;
    }
    assert_eq!(out.len(), 11, "{out:?}");
    out
}

/// Firewall rules (iptables, on nf_tables) in a test namespace, each with
/// its packet counter; deleted on drop (the namespace's own deletion would
/// take them too). iptables rather than nft: docker.io, which `cargo xtask
/// setup` installs, brings it.
struct Firewall<'a> {
    ns: &'a Netns,
    rules: Vec<Vec<String>>,
}

impl<'a> Firewall<'a> {
    fn new(ns: &'a Netns) -> Self {
        Firewall {
            ns,
            rules: Vec::new(),
        }
    }

    /// `iptables -A CHAIN RULE...`
    fn add(&mut self, chain: &str, rule: &[&str]) {
        let mut args = vec!["-w", "-A", chain];
        args.extend_from_slice(rule);
        self.ns.exec("iptables", &args);
        let mut kept = vec![chain.to_string()];
        kept.extend(rule.iter().map(|s| s.to_string()));
        self.rules.push(kept);
    }

    /// The chains with their counters, for failure messages.
    fn counters(&self) -> String {
        let out = self.ns.exec("iptables", &["-w", "-L", "-v", "-n", "-x"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Firewall<'_> {
    fn drop(&mut self) {
        for rule in &self.rules {
            let mut args = vec!["netns", "exec", &self.ns.name, "iptables", "-w", "-D"];
            args.extend(rule.iter().map(String::as_str));
            let _ = Command::new("ip").args(&args).output();
        }
    }
}

#[test]
fn prometheus_scrapes_the_agent_and_every_dashboard_query_returns_data() {
    if !live_prerequisites()
        || !require("prometheus (Debian)", have("prometheus"))
        || !require("promtool", have("promtool"))
        || !require("iptables", have("iptables"))
    {
        return;
    }
    let pair = Pair::new("prom", 94);
    let pins = PinDir::mounted("prom");
    let dir = netpulse_tests::scratch("prom");
    let (agent_port, prom_port) = (19480, 19490);
    let cfg = dir.join("netpulse.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{agent_port}\"\npin_dir = \"{}\"\n\n[[service]]\nname = \"echo\"\nendpoints = [{{ proto = \"udp\", port = 7300 }}]\n\n[[service]]\nname = \"web\"\nendpoints = [{{ proto = \"tcp\", port = 7301 }}]\n\n[[service]]\nname = \"fw\"\nendpoints = [{{ proto = \"tcp\", port = 7302 }}]\n\n[[service]]\nname = \"db\"\nremote = true\nendpoints = [{{ proto = \"tcp\", port = 7303, addr = \"{b}\" }}, {{ proto = \"tcp\", port = 7304, addr = \"{b}\" }}, {{ proto = \"tcp\", port = 7305, addr = \"{b}\" }}]\n\n[[check]]\nname = \"web-tcp\"\nkind = \"tcp\"\ntarget = \"{}:7301\"\nservice = \"web\"\ninterval_seconds = 1\n",
            pins.path().display(),
            pair.addr_a,
            b = pair.addr_b,
        ),
    )
    .unwrap();
    // TCP health: SYNs to fw (7302) and toward db's 7305 are dropped by
    // the firewall in the agent's namespace (kernel drops, netfilter_drop;
    // db's connects time out, their SYNs retransmitted), and a connect
    // there gives up after one SYN retransmission (about 3 s) instead of
    // six (127 s).
    let mut fw = Firewall::new(&pair.a);
    fw.add(
        "INPUT",
        &["-p", "tcp", "--dport", "7302", "--syn", "-j", "DROP"],
    );
    let b_addr = pair.addr_b.to_string();
    fw.add(
        "OUTPUT",
        &[
            "-p", "tcp", "-d", &b_addr, "--dport", "7305", "--syn", "-j", "DROP",
        ],
    );
    pair.a
        .exec("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/tcp_syn_retries"]);
    let agent = Agent::start(&pair.a, &[], &cfg, agent_port, &dir.join("agent.log"));
    let prom_cfg = dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {DASHBOARDS}/alerts.yaml\nscrape_configs:\n  - job_name: netpulse\n    static_configs:\n      - targets: ['127.0.0.1:{agent_port}']\n"
        ),
    )
    .unwrap();
    let prom = Prometheus::start(&pair.a, &prom_cfg, &dir, prom_port);
    let query = |q: String| prom.query(&q);

    // Traffic for the whole scrape window, so rates are not zero.
    let addr = pair.addr_a;
    pair.a.spawn(move || {
        let s = UdpSocket::bind((addr, 7300)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
    pair.a.spawn(move || {
        let l = std::net::TcpListener::bind((addr, 7301)).unwrap();
        for c in l.incoming().flatten() {
            drop(c);
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let stop_sender = stop.clone();
    let sender = pair.b.spawn(move || {
        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
        u.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 1500];
        let end = Instant::now() + Duration::from_secs(90);
        let mut n = 0u32;
        while !stop_sender.load(Ordering::Relaxed) && Instant::now() < end {
            let _ = u.send_to(&[5u8; 200], (addr, 7300));
            let _ = TcpStream::connect((addr, 7301));
            if n.is_multiple_of(10) {
                // A SYN the firewall drops (fw), and one to a port no
                // service claims and nobody listens on (no_socket,
                // unattributed).
                let _ = TcpStream::connect_timeout(
                    &SocketAddr::from((addr, 7302)),
                    Duration::from_millis(50),
                );
                let _ = TcpStream::connect((addr, 7399));
            }
            n += 1;
            let _ = u.recv_from(&mut buf);
            std::thread::sleep(Duration::from_millis(20));
        }
    });

    // The remote service db, on b: 7303 answers (echo), 7304 refuses
    // (nobody listens), 7305 never sees the SYN (the OUTPUT rule).
    let b = pair.addr_b;
    let db_server = {
        let stop = stop.clone();
        pair.b.spawn(move || {
            let l = TcpListener::bind((b, 7303)).unwrap();
            l.set_nonblocking(true).unwrap();
            let mut echoes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        echoes.push(std::thread::spawn(move || {
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = c.read(&mut buf) {
                                if n == 0 || c.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            drop(l);
            echoes
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    // From the agent's namespace (client side): one connection held open
    // and talking (open gauge, RTT samples while it lasts), short ones
    // (established, closed, client handshakes) and refused ones.
    let db_client = {
        let stop = stop.clone();
        pair.a.spawn(move || {
            let mut held = (0..50)
                .find_map(|_| {
                    TcpStream::connect((b, 7303))
                        .inspect_err(|_| std::thread::sleep(Duration::from_millis(100)))
                        .ok()
                })
                .expect("connect to db on b:7303");
            held.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if held.write_all(&[7u8; 512]).is_ok() {
                    let _ = held.read_exact(&mut buf);
                }
                if let Ok(mut c) = TcpStream::connect((b, 7303)) {
                    let _ = c.write_all(b"ping");
                    let _ = c.read(&mut buf);
                }
                let _ = TcpStream::connect((b, 7304));
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Connects that time out: SYN, one retransmission, ETIMEDOUT.
    let db_timeouts = {
        let stop = stop.clone();
        pair.a.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = TcpStream::connect((b, 7305));
            }
        })
    };

    // Until Prometheus holds several scrapes of the agent.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = query("count_over_time(netpulse_build_info[1m])".into());
        if v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .is_some_and(|n| n >= 5.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the agent: {v}\nprometheus log:\n{}\nagent log:\n{}",
            prom.log_text(),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // The exposition itself is clean.
    let text = pair.a.run(move || {
        get(
            SocketAddr::from((Ipv4Addr::LOCALHOST, agent_port)),
            "/metrics",
        )
        .unwrap()
        .1
    });
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Some series appear only after their first event (a timed-out
    // connect takes 3 s, a drop reason is exported once seen) and a rate
    // needs two scrapes of it: ask again for up to 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    let failures = loop {
        let mut failures = Vec::new();
        for (what, q) in dashboard_queries() {
            let v = query(q.clone());
            let ok = v["status"] == "success"
                && v["data"]["result"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty());
            if !ok {
                failures.push(format!("{what}: {q}\n  -> {v}"));
            }
        }
        for (name, q) in rule_exprs() {
            let v = query(q.clone());
            if v["status"] != "success" {
                failures.push(format!("rule {name}: {q}\n  -> {v}"));
            }
        }
        if failures.is_empty() || Instant::now() > deadline {
            break failures;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let firewall = fw.counters();
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    let _ = db_client.join();
    let _ = db_timeouts.join();
    if let Ok(echoes) = db_server.join() {
        for e in echoes {
            let _ = e.join();
        }
    }
    drop(fw);
    assert!(
        failures.is_empty(),
        "queries without data:\n{}\nfirewall in the agent's namespace:\n{firewall}\nagent log:\n{}",
        failures.join("\n"),
        agent.log_text()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
