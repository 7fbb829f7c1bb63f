//! The status page in a real headless Chromium, against a running agent in
//! a network namespace with live traffic: the page shows the API's
//! services, states and numbers, turns a service down within 5 s of its
//! check failing without a reload, logs nothing to the console, fits a
//! phone and follows the OS's dark mode. Every check is on the page (those
//! without a service in a group of their own, with their dependency), and a
//! failing check's explanation is the API's. With live traffic between
//! namespaces, the map's edges and each service's peers are the API's,
//! drawn unscaled at phone width and in the dark theme. The screenshots are
//! kept under target/test-artifacts/.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use netpulse_tests::{
    PinDir,
    agent::{Agent, live_prerequisites},
    browser::{self, Browser},
    netns::{Netns, Pair, run_in},
    scrape::get,
};
use serde_json::{Value, json};

const WEB: u16 = 19540;
const DATA: u16 = 19542;
const LISTEN: u16 = 19541;
const DRIVER: u16 = 19543;

/// A TCP server on the pair's first address that answers each connection
/// with a line, until `stop`.
fn serve(pair: &Pair, port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    serve_on(&pair.a, SocketAddr::from((pair.addr_a, port)), stop)
}

/// The same server on `addr` in `ns`.
fn serve_on(ns: &Netns, addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    ns.spawn(move || {
        let l = TcpListener::bind(addr).unwrap();
        l.set_nonblocking(true).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    let mut buf = [0u8; 64];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(b"hello\n");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

fn api(pair: &Pair) -> Value {
    api_at(pair, LISTEN, "/api/v1/services")
}

/// A GET of the agent's API on 127.0.0.1:`port` in the pair's first
/// namespace.
fn api_at(pair: &Pair, port: u16, path: &'static str) -> Value {
    let (status, body) = run_in(&pair.a.name, move || {
        get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), path).unwrap()
    });
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn artifacts() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts")
}

#[test]
fn the_status_page_shows_the_apis_numbers_and_turns_a_failing_service_down_live() {
    if !live_prerequisites() || !browser::prerequisites() {
        return;
    }
    let pair = Pair::new("page", 104);
    let pins = PinDir::mounted("page");
    let dir = netpulse_tests::scratch("page");
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[agent]
listen = "127.0.0.1:{LISTEN}"
pin_dir = "{pins}"
state_dir = "{state}"
discover_sockets = false

[[service]]
name = "web"
endpoints = [{{ proto = "tcp", port = {WEB} }}]

[[service]]
name = "data"
endpoints = [{{ proto = "tcp", port = {DATA} }}]

[[check]]
name = "web-tcp"
kind = "tcp"
target = "{a}:{WEB}"
service = "web"
interval_seconds = 1
timeout_seconds = 1
failure_threshold = 1
"#,
            pins = pins.path().display(),
            state = dir.join("state").display(),
            a = pair.addr_a,
        ),
    )
    .unwrap();
    let stop_web = Arc::new(AtomicBool::new(false));
    let stop_data = Arc::new(AtomicBool::new(false));
    let web = serve(&pair, WEB, stop_web.clone());
    let data = serve(&pair, DATA, stop_data.clone());
    let mut agent = Agent::start(&pair.a, &[], &cfg, LISTEN, &dir.join("agent.log"));
    agent.wait_for("the check to pass", |m| {
        m.has("netpulse_check_up", &[("check", "web-tcp")])
            && m.sum("netpulse_check_up", &[("check", "web-tcp")]) == 1
    });

    // Live traffic to data from the other namespace: 40 exchanges.
    let target = SocketAddr::from((pair.addr_a, DATA));
    pair.b.run(move || {
        for _ in 0..40 {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2)).unwrap();
            s.write_all(b"hi\n").unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            assert_eq!(out, "hello\n");
        }
    });
    // data's counters settle once the last FIN/ACKs are through.
    let settled = |a: &Value| {
        a["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "data")
            .unwrap()["counters"]
            .clone()
    };
    let mut last = settled(&api(&pair));
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = settled(&api(&pair));
        if now == last {
            break;
        }
        last = now;
    }
    assert!(last["ingress"]["packets"].as_u64().unwrap() >= 40 * 4);

    let b = Browser::start(&pair.a, DRIVER);
    b.goto(&format!("http://127.0.0.1:{LISTEN}/"));
    b.wait_for(
        "both services, web up",
        r#"const w = document.querySelector('.row[data-service="web"]');
           return !!document.querySelector('.row[data-service="data"]') && !!w && w.dataset.state === "up";"#,
        Duration::from_secs(10),
    );

    // The page's rows against the API's services, read after the page's
    // last update.
    let doc = api(&pair);
    b.wait_for(
        "an update newer than the API read",
        &format!(
            "return Number(document.body.dataset.generatedAt) > {}",
            doc["generated_at"]
        ),
        Duration::from_secs(5),
    );
    let rows = b.eval(
        r#"return [...document.querySelectorAll('.row[data-service]')].map(r => ({
             name: r.dataset.service,
             state: r.querySelector('.state').textContent,
             rx: r.querySelector('.rx-packets').textContent.replaceAll(',', ''),
             tx: r.querySelector('.tx-packets').textContent.replaceAll(',', ''),
           }))"#,
    );
    let rows = rows.as_array().unwrap();
    let services = doc["services"].as_array().unwrap();
    let names = |v: &[Value]| {
        let mut n: Vec<String> = v
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(rows), names(services));
    for s in services {
        let row = rows.iter().find(|r| r["name"] == s["name"]).unwrap();
        assert_eq!(row["state"], s["state"], "{}", s["name"]);
    }
    // data is quiet now: its numbers on the page are the API's, exactly.
    let row = rows.iter().find(|r| r["name"] == "data").unwrap();
    let api_data = services.iter().find(|s| s["name"] == "data").unwrap();
    assert_eq!(
        row["rx"],
        json!(api_data["counters"]["ingress"]["packets"].to_string())
    );
    assert_eq!(
        row["tx"],
        json!(api_data["counters"]["egress"]["packets"].to_string())
    );
    b.screenshot(&artifacts().join("status-page.png"));

    // web's server goes away: its check fails, and the page turns the row
    // down by itself, without reloading.
    b.eval("window.__netpulse_test = 42; return true");
    stop_web.store(true, Ordering::Relaxed);
    web.join().unwrap();
    let took = b.wait_for(
        "web down",
        r#"return document.querySelector('.row[data-service="web"]').dataset.state === "down"
                  && document.getElementById("banner").dataset.state === "down";"#,
        Duration::from_secs(5),
    );
    eprintln!("web shown down {took:?} after its server stopped");
    assert_eq!(
        b.eval("return window.__netpulse_test"),
        json!(42),
        "the page reloaded"
    );
    b.screenshot(&artifacts().join("status-page-down.png"));

    // Phone width: nothing wider than the screen.
    b.resize(390, 844);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        b.eval("return document.documentElement.scrollWidth <= window.innerWidth"),
        json!(true),
        "the page scrolls sideways at phone width"
    );
    b.screenshot(&artifacts().join("status-page-phone.png"));

    // Dark mode follows the OS.
    let bg = "return getComputedStyle(document.body).backgroundColor";
    let light = b.eval(bg);
    b.cdp(
        "Emulation.setEmulatedMedia",
        json!({ "features": [{ "name": "prefers-color-scheme", "value": "dark" }] }),
    );
    let dark = b.eval(bg);
    assert_ne!(light, dark);
    assert_eq!(dark, json!("rgb(15, 18, 23)"));
    b.screenshot(&artifacts().join("status-page-dark.png"));

    let errors: Vec<_> = b
        .console()
        .into_iter()
        .filter(|(level, _)| level == "SEVERE" || level == "WARNING")
        .collect();
    assert!(errors.is_empty(), "console: {errors:?}");

    drop(b);
    stop_data.store(true, Ordering::Relaxed);
    data.join().unwrap();
    let started = Instant::now();
    agent.stop();
    assert!(started.elapsed() < Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The checks of the API, by name.
fn checks_by_name(doc: &Value) -> std::collections::BTreeMap<String, Value> {
    doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), c.clone()))
        .collect()
}

const CHK_LISTEN: u16 = 19681;
const CHK_DRIVER: u16 = 19682;
const CHK_DB: u16 = 19683;
const CHK_SOLO: u16 = 19684;

#[test]
fn every_check_is_on_the_page_a_blocked_one_with_its_dependency_and_a_failing_ones_explanation() {
    if !live_prerequisites() || !browser::prerequisites() {
        return;
    }
    let pair = Pair::new("pgchk", 141);
    let pins = PinDir::mounted("pgchk");
    let dir = netpulse_tests::scratch("pgchk");
    let cfg = dir.join("config.toml");
    // db's port has no listener: db-tcp fails (refused), and web-via-db,
    // which has no service, is blocked behind it. solo-tcp has neither a
    // service nor a dependency and passes, after-solo passes after it;
    // ghost-tcp names a service that does not exist, so it has no row of
    // its own either.
    std::fs::write(
        &cfg,
        format!(
            r#"[agent]
listen = "127.0.0.1:{CHK_LISTEN}"
pin_dir = "{pins}"
state_dir = "{state}"
discover_sockets = false

[[service]]
name = "db"
endpoints = [{{ proto = "tcp", port = {CHK_DB} }}]

[[check]]
name = "db-tcp"
kind = "tcp"
target = "{a}:{CHK_DB}"
service = "db"
interval_seconds = 1
timeout_seconds = 1
failure_threshold = 1

[[check]]
name = "web-via-db"
kind = "tcp"
target = "{a}:{CHK_SOLO}"
depends_on = ["db-tcp"]
interval_seconds = 1
timeout_seconds = 1
failure_threshold = 1

[[check]]
name = "solo-tcp"
kind = "tcp"
target = "{a}:{CHK_SOLO}"
interval_seconds = 1
timeout_seconds = 1
failure_threshold = 1

[[check]]
name = "after-solo"
kind = "tcp"
target = "{a}:{CHK_SOLO}"
depends_on = ["solo-tcp"]
interval_seconds = 1
timeout_seconds = 1
failure_threshold = 1

[[check]]
name = "ghost-tcp"
kind = "tcp"
target = "{a}:{CHK_SOLO}"
service = "ghost"
interval_seconds = 1
timeout_seconds = 1
failure_threshold = 1
"#,
            pins = pins.path().display(),
            state = dir.join("state").display(),
            a = pair.addr_a,
        ),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let solo = serve(&pair, CHK_SOLO, stop.clone());
    let mut agent = Agent::start(&pair.a, &[], &cfg, CHK_LISTEN, &dir.join("agent.log"));
    agent.wait_for("db-tcp to fail", |m| {
        m.has("netpulse_check_up", &[("check", "db-tcp")])
            && m.sum("netpulse_check_up", &[("check", "db-tcp")]) == 0
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let settled = |doc: &Value| {
        let c = checks_by_name(doc);
        c["db-tcp"]["state"] == "down"
            && c["web-via-db"]["state"] == "blocked"
            && c["solo-tcp"]["state"] == "up"
            && c["ghost-tcp"]["state"] == "up"
            && c["after-solo"]["state"] == "up"
    };
    while !settled(&api_at(&pair, CHK_LISTEN, "/api/v1/checks")) {
        assert!(
            Instant::now() < deadline,
            "the checks did not settle: {}",
            api_at(&pair, CHK_LISTEN, "/api/v1/checks")
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let b = Browser::start(&pair.a, CHK_DRIVER);
    b.goto(&format!("http://127.0.0.1:{CHK_LISTEN}/"));
    b.wait_for(
        "the checks without a service, web-via-db blocked",
        r#"const r = document.querySelector('[data-group="checks"] .row[data-check="web-via-db"]');
           return !!r && r.dataset.state === "blocked";"#,
        Duration::from_secs(10),
    );
    // The page after the API read: the states cannot change any more
    // (nothing listens on db's port), the explanation and the incidents'
    // can only be the same text again.
    let doc = api_at(&pair, CHK_LISTEN, "/api/v1/checks");
    assert!(settled(&doc), "{doc}");
    let checks = checks_by_name(&doc);
    std::thread::sleep(Duration::from_millis(2500));
    let page = b.eval(
        r#"const text = (root, sel) => { const e = root && root.querySelector(sel); return e ? e.textContent : null; };
           const loose = [...document.querySelectorAll('[data-group="checks"] .row[data-check]')].map(r => ({
             name: r.dataset.check,
             state: text(r, '.check-state'),
             deps: text(r, '.deps'),
             explanation: text(r, '.explanation'),
           }));
           const lines = [...document.querySelectorAll('.row[data-service] .check-line')].map(l => ({
             service: l.closest('.row').dataset.service,
             name: l.dataset.check,
             state: text(l, '.check-state'),
             explanation: text(l, '.explanation'),
           }));
           const incidents = [...document.querySelectorAll('#incidents li[data-check]')].map(i => ({
             name: i.dataset.check,
             explanation: text(i, ':scope > .explanation'),
           }));
           return { loose, lines, incidents };"#,
    );
    eprintln!("page: {page:#}");

    // Every check without a service (or whose service is not among the
    // API's) has a row with the API's state; the blocked one names the
    // check it waits for.
    let services = api_at(&pair, CHK_LISTEN, "/api/v1/services");
    let services: Vec<&str> = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(!services.contains(&"ghost"));
    let loose = page["loose"].as_array().unwrap();
    let mut names: Vec<&str> = loose.iter().map(|r| r["name"].as_str().unwrap()).collect();
    names.sort();
    let mut want: Vec<&str> = checks
        .values()
        .filter(|c| c["service"].as_str().is_none_or(|s| !services.contains(&s)))
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    want.sort();
    assert_eq!(names, want);
    for r in loose {
        let c = &checks[r["name"].as_str().unwrap()];
        assert_eq!(r["state"], c["state"], "{r}");
    }
    let row = |n: &str| loose.iter().find(|r| r["name"] == n).unwrap();
    assert_eq!(row("web-via-db")["deps"], json!("blocked by db-tcp"));
    assert_eq!(row("solo-tcp")["deps"], json!("no dependencies"));
    assert_eq!(row("after-solo")["deps"], json!("depends on solo-tcp"));
    assert_eq!(want, ["after-solo", "ghost-tcp", "solo-tcp", "web-via-db"]);

    // The failing check of a service: a line under db's row, with the
    // API's explanation.
    let lines = page["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["service"], json!("db"));
    assert_eq!(lines[0]["name"], json!("db-tcp"));
    assert_eq!(lines[0]["state"], json!("down"));
    let explanation = &checks["db-tcp"]["last"]["explanation"];
    assert!(
        explanation.as_str().is_some_and(|e| !e.is_empty()),
        "db-tcp has no explanation: {}",
        checks["db-tcp"]
    );
    assert_eq!(lines[0]["explanation"], *explanation);

    // Each check's incidents, newest first, with their explanation.
    let incidents = page["incidents"].as_array().unwrap();
    let db_incidents = checks["db-tcp"]["incidents"].as_array().unwrap();
    assert!(!db_incidents.is_empty());
    let shown: Vec<&Value> = incidents.iter().filter(|i| i["name"] == "db-tcp").collect();
    assert_eq!(shown.len(), db_incidents.len());
    for (s, i) in shown.iter().zip(db_incidents.iter().rev()) {
        assert!(i["explanation"].is_string(), "{i}");
        assert_eq!(s["explanation"], i["explanation"], "{s} vs {i}");
    }

    // The map only where the agent has it (its OpenAPI document says).
    let has_map = api_at(&pair, CHK_LISTEN, "/api/v1/openapi.json")["paths"]
        .get("/api/v1/map")
        .is_some();
    assert_eq!(
        b.eval("return document.getElementById('map-section').hidden"),
        json!(!has_map)
    );

    b.resize(390, 844);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        b.eval("return document.documentElement.scrollWidth <= window.innerWidth"),
        json!(true),
        "the page scrolls sideways at phone width"
    );
    b.eval(r#"document.querySelector('[data-group="checks"]').scrollIntoView(); return true"#);
    b.cdp(
        "Emulation.setEmulatedMedia",
        json!({ "features": [{ "name": "prefers-color-scheme", "value": "dark" }] }),
    );
    b.screenshot(&artifacts().join("status-page-checks-phone-dark.png"));

    // No console errors: an agent without the map is asked nothing it
    // answers 404.
    let errors: Vec<_> = b
        .console()
        .into_iter()
        .filter(|(level, _)| level == "SEVERE" || level == "WARNING")
        .collect();
    assert!(errors.is_empty(), "console: {errors:?}");

    drop(b);
    stop.store(true, Ordering::Relaxed);
    solo.join().unwrap();
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

const MAP_LISTEN: u16 = 19691;
const MAP_DRIVER: u16 = 19692;
const MAP_WEB: u16 = 19693;
const MAP_PG: u16 = 19694;

/// `n` as the page writes counts (en-US: 1,234).
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// An edge as compared: its ends, whose counters it is, and the peer.
fn edge_key(e: &Value) -> (String, String, String, String) {
    let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
    (s("source"), s("target"), s("service"), s("peer"))
}

#[test]
fn the_map_shows_the_apis_edges_and_each_service_its_peers_at_phone_width_in_the_dark() {
    if !live_prerequisites() || !browser::prerequisites() {
        return;
    }
    let pair = Pair::new("pgmap", 142);
    let pins = PinDir::mounted("pgmap");
    let dir = netpulse_tests::scratch("pgmap");
    let cfg = dir.join("config.toml");
    // web listens here, for clients in the other namespace that come from
    // a second address there; pg is a remote service on the other
    // namespace's first address, that this host uses.
    let client = Ipv4Addr::new(10, 77, 142, 3);
    let out = pair.b.exec(
        "ip",
        &["addr", "add", &format!("{client}/24"), "dev", &pair.dev_b],
    );
    assert!(out.status.success(), "{out:?}");
    let a = format!("{}/32", pair.addr_a);
    let src = client.to_string();
    let out = pair.b.exec(
        "ip",
        &["route", "replace", &a, "dev", &pair.dev_b, "src", &src],
    );
    assert!(out.status.success(), "{out:?}");
    let pg_addr = pair.addr_b;
    std::fs::write(
        &cfg,
        format!(
            r#"[agent]
listen = "127.0.0.1:{MAP_LISTEN}"
pin_dir = "{pins}"
state_dir = "{state}"
discover_sockets = false

[[service]]
name = "web"
endpoints = [{{ proto = "tcp", port = {MAP_WEB} }}]

[[service]]
name = "pg"
remote = true
endpoints = [{{ proto = "tcp", port = {MAP_PG}, addr = "{pg_addr}" }}]
"#,
            pins = pins.path().display(),
            state = dir.join("state").display(),
        ),
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let web = serve(&pair, MAP_WEB, stop.clone());
    // pg: the same one-line server, in the other namespace.
    let pg = serve_on(
        &pair.b,
        SocketAddr::from((pair.addr_b, MAP_PG)),
        stop.clone(),
    );
    let mut agent = Agent::start(&pair.a, &[], &cfg, MAP_LISTEN, &dir.join("agent.log"));
    agent.wait_for("the agent's first scrape", |m| {
        m.has("netpulse_service_packets_total", &[("service", "web")])
    });

    // Live traffic: 20 exchanges from the other namespace to web, 10 from
    // this one to pg.
    let exchange = |to: SocketAddr, n: usize| {
        move || {
            for _ in 0..n {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
                s.write_all(b"hi\n").unwrap();
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                assert_eq!(out, "hello\n");
            }
        }
    };
    pair.b
        .run(exchange(SocketAddr::from((pair.addr_a, MAP_WEB)), 20));
    pair.a
        .run(exchange(SocketAddr::from((pair.addr_b, MAP_PG)), 10));

    // The map settles once the last FIN/ACKs are through.
    let mut last = api_at(&pair, MAP_LISTEN, "/api/v1/map");
    loop {
        std::thread::sleep(Duration::from_millis(700));
        let now = api_at(&pair, MAP_LISTEN, "/api/v1/map");
        if now == last {
            break;
        }
        last = now;
    }
    let doc = last;
    eprintln!("map: {doc:#}");
    let edges = doc["edges"].as_array().unwrap();
    // The traffic made is in the API: the client address opened 20
    // connections to web, this host 10 to pg.
    let b_addr = client.to_string();
    let to_web = edges
        .iter()
        .find(|e| e["service"] == "web" && e["peer"] == b_addr.as_str())
        .unwrap_or_else(|| panic!("no edge from {b_addr} to web: {doc}"));
    assert_eq!(to_web["connections"], json!(20), "{to_web}");
    assert_eq!(to_web["target"], json!("service:web"), "{to_web}");
    let to_pg = edges
        .iter()
        .find(|e| e["service"] == "pg")
        .unwrap_or_else(|| panic!("no edge to pg: {doc}"));
    assert_eq!(to_pg["connections"], json!(10), "{to_pg}");

    let b = Browser::start(&pair.a, MAP_DRIVER);
    b.goto(&format!("http://127.0.0.1:{MAP_LISTEN}/"));
    let read_edges = r#"return [...document.querySelectorAll('#map svg .edge')].map(e => ({
             source: e.dataset.source, target: e.dataset.target,
             service: e.dataset.service, peer: e.dataset.peer,
             title: e.querySelector('title').textContent,
             width: Number(e.getAttribute('stroke-width')),
           }))"#;
    let mut want: Vec<_> = edges.iter().map(edge_key).collect();
    want.sort();
    let want_js = serde_json::to_string(&want).unwrap();
    // The page polls every 2 s: its edges become the API's (they no longer
    // change).
    b.wait_for(
        "the API's edges on the map",
        &format!(
            r#"const key = a => JSON.stringify(a);
               const got = [...document.querySelectorAll('#map svg .edge')]
                 .map(e => key([e.dataset.source, e.dataset.target, e.dataset.service, e.dataset.peer]));
               const want = {want_js}.map(key);
               return got.length === want.length && want.every(k => got.includes(k));"#
        ),
        Duration::from_secs(10),
    );
    let shown = b.eval(read_edges);
    let shown = shown.as_array().unwrap();
    let mut got: Vec<_> = shown.iter().map(edge_key).collect();
    got.sort();
    assert_eq!(got, want);
    // Each line's tooltip gives its figures: the packets toward the
    // service before the other way's.
    for e in edges {
        let s = shown.iter().find(|s| edge_key(s) == edge_key(e)).unwrap();
        let title = s["title"].as_str().unwrap();
        let figure = |k: &str, what: &str| format!("{} {what}", grouped(e[k].as_u64().unwrap()));
        let (to_server, rest) = title
            .split_once("client → server;")
            .unwrap_or_else(|| panic!("{title}"));
        assert!(to_server.contains(&figure("packets_in", "pkts")), "{title}");
        assert!(rest.contains(&figure("packets_out", "pkts")), "{title}");
        assert!(
            rest.contains(&figure("connections", "connections")),
            "{title}"
        );
        assert!(
            rest.contains(&figure("retransmits", "retransmits")),
            "{title}"
        );
    }
    // A line's width follows its bytes: web's 20 connections draw wider
    // than pg's 10.
    let width = |service: &str| {
        shown.iter().find(|s| s["service"] == service).unwrap()["width"]
            .as_f64()
            .unwrap()
    };
    assert!(width("web") > width("pg"), "{shown:?}");
    // A tap on a line writes its figures under the map (phones have no
    // hover).
    let tapped = b.eval(
        r#"const e = document.querySelector('#map svg .edge[data-service="pg"]');
           e.dispatchEvent(new MouseEvent('click', { bubbles: true }));
           return [document.getElementById('map-info').textContent, e.querySelector('title').textContent]"#,
    );
    assert_eq!(tapped[0], tapped[1]);
    // Every node of the API is drawn once.
    let mut nodes: Vec<&str> = doc["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    nodes.sort();
    let drawn =
        b.eval("return [...document.querySelectorAll('#map svg .node')].map(n => n.dataset.id)");
    let mut drawn: Vec<String> = serde_json::from_value(drawn).unwrap();
    drawn.sort();
    assert_eq!(drawn, nodes);

    // web's row opens to its peers: the API's edges that end at web.
    let web_ids: Vec<&str> = doc["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["service"] == "web")
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    let mut web_peers: Vec<(String, String)> = edges
        .iter()
        .filter(|e| {
            web_ids.contains(&e["target"].as_str().unwrap())
                || web_ids.contains(&e["source"].as_str().unwrap())
        })
        .map(|e| {
            let (s, t, _, _) = edge_key(e);
            (s, t)
        })
        .collect();
    web_peers.sort();
    assert!(!web_peers.is_empty());
    b.eval(r#"document.querySelector('details.peers[data-service="web"] summary').click(); return true"#);
    let listed = b.eval(
        r#"const d = document.querySelector('details.peers[data-service="web"]');
           return { open: d.open, peers: [...d.querySelectorAll('li.peer')]
             .map(p => [p.dataset.source, p.dataset.target]) }"#,
    );
    assert_eq!(listed["open"], json!(true));
    let mut listed: Vec<(String, String)> =
        serde_json::from_value(listed["peers"].clone()).unwrap();
    listed.sort();
    assert_eq!(listed, web_peers);
    // It stays open across the page's next updates.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        b.eval(r#"return document.querySelector('details.peers[data-service="web"]').open"#),
        json!(true)
    );
    b.eval("document.getElementById('map-section').scrollIntoView(); return true");
    b.screenshot(&artifacts().join("status-page-map.png"));

    // Phone width, dark: the map fits the screen, drawn at its own size
    // (not scaled down to fit), with the dark theme's colours.
    b.resize(390, 844);
    b.cdp(
        "Emulation.setEmulatedMedia",
        json!({ "features": [{ "name": "prefers-color-scheme", "value": "dark" }] }),
    );
    b.wait_for(
        "the map redrawn for a phone",
        r#"const s = document.querySelector('#map svg');
           return !!s && Number(s.getAttribute('width')) <= window.innerWidth;"#,
        Duration::from_secs(5),
    );
    let look = b.eval(
        r#"const s = document.querySelector('#map svg');
           const r = s.getBoundingClientRect();
           const node = s.querySelector('.node rect'), text = s.querySelector('.node text');
           return {
             fits: document.documentElement.scrollWidth <= window.innerWidth,
             scale: r.width / Number(s.getAttribute('width')),
             font: parseFloat(getComputedStyle(text).fontSize),
             fill: getComputedStyle(node).fill,
             text: getComputedStyle(text).fill,
             edges: s.querySelectorAll('.edge').length,
           }"#,
    );
    eprintln!("phone, dark: {look}");
    assert_eq!(look["fits"], json!(true), "the page scrolls sideways");
    assert_eq!(look["scale"].as_f64(), Some(1.0), "the map is scaled down");
    assert!(look["font"].as_f64().unwrap() >= 12.0);
    assert_eq!(look["fill"], json!("rgb(23, 27, 34)"));
    assert_eq!(look["text"], json!("rgb(230, 233, 239)"));
    assert_eq!(look["edges"], json!(edges.len()));
    b.eval("document.getElementById('map-section').scrollIntoView(); return true");
    b.screenshot(&artifacts().join("status-page-map-phone-dark.png"));

    let errors: Vec<_> = b
        .console()
        .into_iter()
        .filter(|(level, _)| level == "SEVERE" || level == "WARNING")
        .collect();
    assert!(errors.is_empty(), "console: {errors:?}");

    drop(b);
    stop.store(true, Ordering::Relaxed);
    web.join().unwrap();
    pg.join().unwrap();
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
