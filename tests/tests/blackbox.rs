//! `/probe` against Debian's prometheus-blackbox-exporter: both probe the
//! same targets (an HTTP server made here, a refused port, a TCP server)
//! with the same stock modules, and netpulse's answer must use
//! blackbox_exporter's names, with the same labels and the same verdicts.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use netpulse_tests::{
    PinDir,
    agent::{Agent, have_bin},
    is_root,
    netns::have,
    require,
    scrape::{Metrics, get, urlencode},
};

/// A small HTTP server: `/ok` answers 200, anything else 503.
fn http_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                let _ = r.read_line(&mut first);
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                        break;
                    }
                }
                let ok = first.split_whitespace().nth(1) == Some("/ok");
                let (status, body) = if ok {
                    ("200 OK", "fine\n")
                } else {
                    ("503 Service Unavailable", "no\n")
                };
                let _ = write!(
                    &s,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

/// Debian's blackbox_exporter with its stock modules; killed on drop.
struct Blackbox(Child, u16);

impl Drop for Blackbox {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn probe(port: u16, module: &str, target: &str) -> Metrics {
    let (status, body) = get(
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        &format!("/probe?module={module}&target={}", urlencode(target)),
    )
    .unwrap_or_else(|e| panic!("/probe on {port}: {e}"));
    assert_eq!(status, 200, "{body}");
    Metrics::parse(&body)
}

#[test]
fn probe_answers_like_blackbox_exporter() {
    if !require("root", is_root())
        || !require(
            "prometheus-blackbox-exporter",
            have("prometheus-blackbox-exporter"),
        )
        || !have_bin()
    {
        return;
    }
    let dir = netpulse_tests::scratch("blackbox");
    let bb_cfg = dir.join("blackbox.yml");
    std::fs::write(
        &bb_cfg,
        "modules:\n  http_2xx:\n    prober: http\n  tcp_connect:\n    prober: tcp\n",
    )
    .unwrap();
    let bb_port = 19503;
    let bb = Blackbox(
        Command::new("prometheus-blackbox-exporter")
            .arg(format!("--config.file={}", bb_cfg.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{bb_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start blackbox_exporter"),
        bb_port,
    );
    let pins = PinDir::new("blackbox");
    let port = 19504;
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\npin_dir = \"{}\"\ninterfaces = [\"lo\"]\n[docker]\nenabled = false\n",
            pins.path().display()
        ),
    )
    .unwrap();
    let mut agent = Agent::start_host(&cfg, port, &dir.join("agent.log"));
    agent.wait_for("the agent", |m| m.has("netpulse_build_info", &[]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(SocketAddr::from((Ipv4Addr::LOCALHOST, bb.1)), "/").is_err() {
        assert!(Instant::now() < deadline, "blackbox_exporter did not start");
        std::thread::sleep(Duration::from_millis(100));
    }

    let http = http_server();
    let refused = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let cases = [
        ("http_2xx", format!("http://{http}/ok"), 1),
        ("http_2xx", format!("http://{http}/fail"), 0),
        ("http_2xx", format!("{http}/ok"), 1),
        ("tcp_connect", http.to_string(), 1),
        ("tcp_connect", refused.to_string(), 0),
    ];
    for (module, target, success) in cases {
        let theirs = probe(bb.1, module, &target);
        let ours = probe(port, module, &target);
        let what = format!("{module} {target}");
        let names = |m: &Metrics| m.0.keys().cloned().collect::<BTreeSet<String>>();
        let extra: Vec<String> = names(&ours).difference(&names(&theirs)).cloned().collect();
        assert!(
            extra.is_empty(),
            "{what}: names blackbox_exporter does not use: {extra:?}"
        );
        for must in [
            "probe_success",
            "probe_duration_seconds",
            "probe_dns_lookup_time_seconds",
        ] {
            assert!(ours.0.contains_key(must), "{what}: no {must}");
        }
        for (name, samples) in &ours.0 {
            // Same series (label sets) as blackbox_exporter's.
            let labels = |s: &[(BTreeMap<String, String>, f64)]| {
                s.iter().map(|(l, _)| l.clone()).collect::<BTreeSet<_>>()
            };
            assert_eq!(
                labels(samples),
                labels(&theirs.0[name]),
                "{what}: labels of {name}"
            );
        }
        // The verdicts blackbox_exporter gives, each given by netpulse too
        // and equal (one it gives that netpulse lacks is a failure).
        for verdict in ["probe_success", "probe_http_status_code", "probe_http_ssl"] {
            if let Some(v) = theirs.0.get(verdict) {
                let mine = ours.0.get(verdict).unwrap_or_else(|| {
                    panic!("{what}: blackbox_exporter gives {verdict}, netpulse does not")
                });
                assert_eq!(mine[0].1, v[0].1, "{what}: {verdict}");
            }
        }
        assert_eq!(ours.0["probe_success"][0].1, f64::from(success), "{what}");
        if module == "http_2xx" {
            assert!(ours.0.contains_key("probe_http_status_code"), "{what}");
            assert_eq!(ours.0["probe_http_duration_seconds"].len(), 5, "{what}");
        }
    }
    // An unknown module is refused the way blackbox_exporter refuses it.
    let (status, body) = get(
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        "/probe?module=nope&target=127.0.0.1:1",
    )
    .unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("Unknown module \"nope\""), "{body}");
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
