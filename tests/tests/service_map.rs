//! The Service map dashboard (dashboards/netpulse-service-map.json) on a
//! real Prometheus (Debian's) scraping two agents, each on its own network
//! namespace "host" with its own interfaces, bpffs pin directory, state
//! directory and listen port, counting with eBPF.
//!
//! ```text
//!  guest "app"            host A (agent A, Prometheus)          host B (agent B)
//!  10.77.132.2 ─ np132c ═ np132a  10.77.132.1 ─ fwd ─ 10.77.131.1 np131a ═ np131b 10.77.131.2
//!  client ───────────────────────────────────────────────────────────────→ db :5432
//! ```
//!
//! The client is a guest behind host A (a routed VM or namespace, no NAT):
//! both agents name it `app` (a `remote = true` service at its address)
//! and both name the server `db` (B: its local service on port 5432; A: a
//! `remote = true` service at B's address). A client running on host A
//! itself would have A's own address, which A's map shows as `host`, a
//! peer that is not a named service and has no metric series; B would see
//! it, if B named A's address.
//!
//! So each agent exports `netpulse_service_peer_*_total{service="db",
//! peer="app"}` for the same packets (A's on its uplink as it forwards
//! them, B's as its service receives and answers them), and the dashboard's
//! queries join the two instances' series by the service's name. The
//! reference for the counts is the kernel's own counters of the guest's
//! interface (`ip -s link` on np132c): the guest talks to nobody but db
//! (IPv6 off, static neighbours, offloads off, so no ARP, no neighbour
//! discovery and one packet per wire frame), so what it transmitted is
//! db's ingress from app, and what it received db's egress to app, in
//! packets and in bytes (whole Ethernet frames, as the agents count them;
//! forwarding does not change a frame's length).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use netpulse_tests::{
    PinDir,
    agent::{Agent, live_prerequisites, tc_both_ways},
    dashboards,
    netns::{LinkStats, Netns, Pair, have, mac_of, quiet_addr, sh, static_neigh},
    prom::Prometheus,
    require, scratch,
};

const FILE: &str = "netpulse-service-map.json";

/// The node graph panel's one query is Grafana's edges frame: a table
/// (instant) whose rows carry `id`, `source` and `target` (the labels the
/// query builds) and `mainstat` (the value, renamed); the panel makes the
/// nodes from the edges. The live test checks what the query returns.
#[test]
fn the_node_graph_panel_is_fed_an_edges_frame() {
    let d = dashboards::load(FILE);
    assert_eq!(d["uid"], "netpulse-service-map");
    assert!(
        d["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t == "netpulse"))
    );
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "instance", "service"]);
    let panels = d["panels"].as_array().unwrap();
    for p in panels {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
    }
    let graphs: Vec<&serde_json::Value> =
        panels.iter().filter(|p| p["type"] == "nodeGraph").collect();
    assert_eq!(graphs.len(), 1);
    let g = graphs[0];
    let targets = g["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 1, "one frame: the edges");
    let t = &targets[0];
    assert_eq!(t["refId"], "edges");
    assert_eq!(t["format"], "table");
    assert_eq!(t["instant"], true);
    assert!(
        t["expr"]
            .as_str()
            .unwrap()
            .starts_with("max by (id, source, target) ("),
        "{}",
        t["expr"]
    );
    let organize = g["transformations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "organize")
        .expect("an organize transformation");
    assert_eq!(organize["options"]["renameByName"]["Value"], "mainstat");
    assert_eq!(organize["options"]["excludeByName"]["Time"], true);
    // The edges table: packets and bytes per second by host, service,
    // peer and direction.
    let table = panels
        .iter()
        .find(|p| p["type"] == "table")
        .expect("an edges table");
    let exprs: Vec<&str> = table["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["expr"].as_str().unwrap())
        .collect();
    assert_eq!(exprs.len(), 2);
    for (e, metric) in exprs.iter().zip([
        "netpulse_service_peer_packets_total",
        "netpulse_service_peer_bytes_total",
    ]) {
        assert!(
            e.starts_with("sum by (instance, service, peer, direction) (") && e.contains(metric),
            "{e}"
        );
    }
}

/// A veth between the guest and host A, addressed 10.77.<net>.2 (guest)
/// and .1 (A), quiet as `Pair`'s: IPv6 off, offloads off, static
/// neighbours. It goes with the guest's namespace.
fn guest_link(guest: &Netns, host: &Netns, net: u8) -> (String, String) {
    let (g, h) = (format!("np{net}c"), format!("np{net}a"));
    sh(
        "ip",
        &[
            "link",
            "add",
            &g,
            "netns",
            &guest.name,
            "type",
            "veth",
            "peer",
            "name",
            &h,
            "netns",
            &host.name,
        ],
    );
    let addr = |i: u8| format!("10.77.{net}.{i}");
    for (ns, dev, me) in [(guest, &g, addr(2)), (host, &h, addr(1))] {
        quiet_addr(ns, dev, &me);
    }
    for (ns, dev, peer, peer_dev, peer_ns) in [
        (guest, &g, addr(1), &h, host),
        (host, &h, addr(2), &g, guest),
    ] {
        static_neigh(ns, dev, &peer, &mac_of(peer_ns, peer_dev));
    }
    (g, h)
}

fn config(
    listen: &str,
    pins: &PinDir,
    state: &std::path::Path,
    ifaces: &[&str],
    svcs: &str,
) -> String {
    format!(
        "[agent]\nlisten = \"{listen}\"\npin_dir = \"{}\"\nstate_dir = \"{}\"\ninterfaces = {ifaces:?}\n\n[docker]\nenabled = false\n\n{svcs}",
        pins.path().display(),
        state.display(),
    )
}

/// The result vector of an instant query: each sample's labels and value.
fn samples(v: &serde_json::Value) -> Vec<(BTreeMap<String, String>, f64)> {
    v["data"]["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|s| {
                    let labels = s["metric"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                                .collect()
                        })
                        .unwrap_or_default();
                    let value = s["value"][1]
                        .as_str()
                        .and_then(|x| x.parse().ok())
                        .unwrap_or(f64::NAN);
                    (labels, value)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn has(s: &[(BTreeMap<String, String>, f64)], want: &[(&str, &str)]) -> bool {
    s.iter().any(|(l, v)| {
        *v > 0.0
            && want
                .iter()
                .all(|(k, x)| l.get(*k).map(String::as_str) == Some(*x))
    })
}

#[test]
fn two_hosts_one_prometheus_the_service_map_joins_a_clients_edge_by_the_services_name() {
    if !live_prerequisites() || !require("prometheus (Debian)", have("prometheus")) {
        return;
    }
    let pair = Pair::new("smap", 131);
    let guest = Netns::new(&format!("np-smap-c-{}", std::process::id()));
    let (guest_dev, a_inner) = guest_link(&guest, &pair.a, 132);
    let (guest_addr, gateway) = (Ipv4Addr::new(10, 77, 132, 2), Ipv4Addr::new(10, 77, 132, 1));
    // Routing, no NAT: the guest's default route is A, A forwards, B
    // reaches the guest's network through A.
    sh(
        "ip",
        &[
            "-n",
            &guest.name,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
        ],
    );
    pair.a
        .exec("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
    sh(
        "ip",
        &[
            "-n",
            &pair.b.name,
            "route",
            "add",
            "10.77.132.0/24",
            "via",
            &pair.addr_a.to_string(),
        ],
    );

    let dir = scratch("smap");
    let (pins_a, pins_b) = (PinDir::mounted("smap-a"), PinDir::mounted("smap-b"));
    let (port_a, port_b, prom_port) = (19611, 19612, 19613);
    let b = pair.addr_b;
    let app = format!(
        "[[service]]\nname = \"app\"\nremote = true\nendpoints = [{{ proto = \"tcp\", port = 8080, addr = \"{guest_addr}\" }}]\n\n"
    );
    let cfg_a = dir.join("a.toml");
    std::fs::write(
        &cfg_a,
        config(
            &format!("127.0.0.1:{port_a}"),
            &pins_a,
            &dir.join("a-state"),
            &[&pair.dev_a, &a_inner],
            &format!(
                "{app}[[service]]\nname = \"db\"\nremote = true\nendpoints = [{{ proto = \"tcp\", port = 5432, addr = \"{b}\" }}]\n"
            ),
        ),
    )
    .unwrap();
    let cfg_b = dir.join("b.toml");
    std::fs::write(
        &cfg_b,
        config(
            // Prometheus, in A, scrapes B over the link.
            &format!("0.0.0.0:{port_b}"),
            &pins_b,
            &dir.join("b-state"),
            &[&pair.dev_b],
            &format!(
                "{app}[[service]]\nname = \"db\"\nendpoints = [{{ proto = \"tcp\", port = 5432 }}]\n"
            ),
        ),
    )
    .unwrap();
    let mut agent_a = Agent::start(&pair.a, &[], &cfg_a, port_a, &dir.join("a.log"));
    let mut agent_b = Agent::start(&pair.b, &[], &cfg_b, port_b, &dir.join("b.log"));
    let named = |m: &netpulse_tests::scrape::Metrics| {
        ["db", "app"]
            .iter()
            .all(|s| m.has("netpulse_service_info", &[("service", s)]))
    };
    let (dev_a, dev_b) = (pair.dev_a.clone(), pair.dev_b.clone());
    let inner = a_inner.clone();
    agent_a.wait_for("agent A: probes on both interfaces, db and app", |m| {
        named(m) && tc_both_ways(m, &dev_a) && tc_both_ways(m, &inner)
    });
    agent_b.wait_for("agent B: probes on its interface, db and app", |m| {
        named(m) && tc_both_ways(m, &dev_b)
    });

    let prom_cfg = dir.join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: netpulse\n    static_configs:\n      - targets: ['127.0.0.1:{port_a}']\n        labels:\n          instance: host-a\n      - targets: ['{b}:{port_b}']\n        labels:\n          instance: host-b\n"
        ),
    )
    .unwrap();
    let prom = Prometheus::start(&pair.a, &prom_cfg, &dir, prom_port);
    let logs = || {
        format!(
            "\nagent A log:\n{}\nagent B log:\n{}\nprometheus log:\n{}",
            agent_a.log_text(),
            agent_b.log_text(),
            prom.log_text()
        )
    };

    // db on B: an echo server.
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        pair.b.spawn(move || {
            let l = TcpListener::bind((b, 5432)).unwrap();
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
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for e in echoes {
                let _ = e.join();
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));

    // The guest's interface has carried nothing yet (no ARP, no IPv6).
    let before = guest.link_stats(&guest_dev);
    // The guest "app": a short connection to db every 20 ms, 300 bytes
    // each way, until stopped.
    let conns = Arc::new(AtomicU64::new(0));
    // The client stops first, then the server: a listener closed under a
    // connection still in its accept queue resets it.
    let stop_client = Arc::new(AtomicBool::new(false));
    let client = {
        let (stop, conns) = (stop_client.clone(), conns.clone());
        guest.spawn(move || {
            let mut buf = [0u8; 300];
            while !stop.load(Ordering::Relaxed) {
                let mut c = TcpStream::connect((b, 5432)).expect("connect to db from the guest");
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                c.write_all(&[9u8; 300]).unwrap();
                c.read_exact(&mut buf).unwrap();
                drop(c);
                conns.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // Until Prometheus holds several scrapes of both agents.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = samples(&prom.query("count_over_time(netpulse_build_info[1m])"));
        if ["host-a", "host-b"].iter().all(|i| {
            s.iter()
                .any(|(l, v)| l.get("instance").map(String::as_str) == Some(*i) && *v >= 5.0)
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape both agents: {s:?}{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Every query of the dashboard returns data ("All" instances and
    // services), and the edge app -> db is in every panel: under both
    // instances where the rows carry one (the table, the time series), as
    // one arrow in the node graph's edges frame (each host alone shows it
    // too); the service variable offers both ends. The table also when the
    // service picked is app (the peer side of the edge) or db.
    let d = dashboards::load(FILE);
    let targets = |panel_type: &str| -> Vec<String> {
        d["panels"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["type"] == panel_type)
            .flat_map(|p| p["targets"].as_array().unwrap().clone())
            .map(|t| t["expr"].as_str().unwrap().to_string())
            .collect()
    };
    let graph = targets("nodeGraph").remove(0);
    let table = targets("table");
    let arrow = [("id", "app -> db"), ("source", "app"), ("target", "db")];
    let deadline = Instant::now() + Duration::from_secs(30);
    let failures = loop {
        let mut failures = Vec::new();
        for (what, q) in dashboards::queries(FILE) {
            let q = dashboards::fill(&q, ".*", ".*");
            let v = prom.query(&q);
            let s = samples(&v);
            let ok = v["status"] == "success"
                && if what.contains(": variable \"service\"") {
                    has(&s, &[("service", "db")]) && has(&s, &[("service", "app")])
                } else if what.contains(": variable ") {
                    !s.is_empty()
                } else if s.iter().any(|(l, _)| l.contains_key("instance")) {
                    ["host-a", "host-b"]
                        .iter()
                        .all(|i| has(&s, &[("instance", i), ("service", "db"), ("peer", "app")]))
                } else {
                    has(&s, &arrow)
                };
            if !ok {
                failures.push(format!("{what}: {q}\n  -> {v}"));
            }
        }
        for instance in ["host-a", "host-b"] {
            let q = dashboards::fill(&graph, instance, ".*");
            let v = prom.query(&q);
            if !has(&samples(&v), &arrow) {
                failures.push(format!(
                    "node graph, instance {instance}: no arrow {arrow:?}: {q}\n  -> {v}"
                ));
            }
        }
        for service in ["db", "app"] {
            for q in &table {
                let q = dashboards::fill(q, ".*", service);
                let s = samples(&prom.query(&q));
                for instance in ["host-a", "host-b"] {
                    for direction in ["ingress", "egress"] {
                        let want = [
                            ("instance", instance),
                            ("service", "db"),
                            ("peer", "app"),
                            ("direction", direction),
                        ];
                        if !has(&s, &want) {
                            failures.push(format!(
                                "edges table, service {service}: no row {want:?}: {q}\n  -> {s:?}"
                            ));
                        }
                    }
                }
            }
        }
        if failures.is_empty() || Instant::now() > deadline {
            break failures;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    // Both agents count the same packets: the arrow is one host's figure,
    // not the two added (the rates of the same scrapes; a scrape between
    // the two queries moves them a little).
    let arrow_rate = samples(&prom.query(&dashboards::fill(&graph, ".*", ".*")))
        .iter()
        .find(|(l, _)| l.get("id").map(String::as_str) == Some("app -> db"))
        .map_or(0.0, |(_, v)| *v);
    let host_rates: Vec<f64> = ["host-a", "host-b"]
        .iter()
        .map(|i| {
            samples(&prom.query(&dashboards::fill(&table[1], i, "db")))
                .iter()
                .filter(|(l, _)| l.get("peer").map(String::as_str) == Some("app"))
                .map(|(_, v)| v)
                .sum()
        })
        .collect();
    stop_client.store(true, Ordering::Relaxed);
    client.join().expect("the guest's client");
    stop.store(true, Ordering::Relaxed);
    server.join().expect("db's server");
    assert!(
        failures.is_empty(),
        "service map queries:\n{}{}",
        failures.join("\n"),
        logs()
    );
    eprintln!("bytes/s of app -> db: the arrow {arrow_rate}, each host's rows {host_rates:?}");
    let top = host_rates.iter().copied().fold(0.0, f64::max);
    assert!(
        top > 0.0 && arrow_rate > 0.5 * top && arrow_rate < 1.5 * top,
        "the arrow's bytes/s {arrow_rate} is not one host's ({host_rates:?})"
    );

    // The counts: the edges table's queries without their rate (the same
    // selectors and sums, over the counters), once the last connection's
    // packets are scraped, give each instance the guest's interface
    // counters.
    std::thread::sleep(Duration::from_millis(500));
    let sent: LinkStats = guest.link_stats(&guest_dev) - before;
    let want: BTreeMap<(String, String, String), u64> = ["host-a", "host-b"]
        .iter()
        .flat_map(|i| {
            [
                ("packets", "ingress", sent.tx_packets),
                ("packets", "egress", sent.rx_packets),
                ("bytes", "ingress", sent.tx_bytes),
                ("bytes", "egress", sent.rx_bytes),
            ]
            .map(|(what, dir, n)| ((i.to_string(), what.to_string(), dir.to_string()), n))
        })
        .collect();
    let totals: Vec<(&str, String)> = ["packets", "bytes"]
        .into_iter()
        .zip(&table)
        .map(|(what, q)| {
            let q = q.replace("rate(", "(").replace("[$__rate_interval]", "");
            (what, dashboards::fill(&q, ".*", "db"))
        })
        .collect();
    let seen = || -> BTreeMap<(String, String, String), u64> {
        let mut out = BTreeMap::new();
        for (what, q) in &totals {
            for (l, v) in samples(&prom.query(q)) {
                if l.get("peer").map(String::as_str) != Some("app") {
                    continue;
                }
                out.insert(
                    (
                        l.get("instance").cloned().unwrap_or_default(),
                        what.to_string(),
                        l.get("direction").cloned().unwrap_or_default(),
                    ),
                    v as u64,
                );
            }
        }
        out
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let got = loop {
        let got = seen();
        if got == want || Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let n = conns.load(Ordering::Relaxed);
    eprintln!("{n} connections from the guest; its interface: {sent:?}; Prometheus: {got:?}");
    assert!(
        n > 0 && sent.tx_packets >= 6 * n,
        "{n} connections, {sent:?}"
    );
    assert_eq!(
        got,
        want,
        "the edges table's sums over the counters ({totals:?}) by (instance, what, direction) against the guest's interface counters (ip -s link on {guest_dev}){}",
        logs()
    );

    drop(prom);
    agent_a.stop();
    agent_b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
