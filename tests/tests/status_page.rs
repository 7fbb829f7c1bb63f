//! The status page in a real headless Chromium, against a running agent in
//! a network namespace with live traffic: the page shows the API's
//! services, states and numbers, turns a service down within 5 s of its
//! check failing without a reload, logs nothing to the console, fits a
//! phone and follows the OS's dark mode. The screenshots are kept under
//! target/test-artifacts/.

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
    netns::{Pair, run_in},
    scrape::get,
};
use serde_json::{Value, json};

const WEB: u16 = 19540;
const DATA: u16 = 19542;
const LISTEN: u16 = 19541;
const DRIVER: u16 = 19543;

/// A TCP server that answers each connection with a line, until `stop`.
fn serve(pair: &Pair, port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let addr = SocketAddr::from((pair.addr_a, port));
    pair.a.spawn(move || {
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
    let (status, body) = run_in(&pair.a.name, || {
        get(
            SocketAddr::from((Ipv4Addr::LOCALHOST, LISTEN)),
            "/api/v1/services",
        )
        .unwrap()
    });
    assert_eq!(status, 200, "{body}");
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
