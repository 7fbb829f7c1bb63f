//! Health checks against real servers made in the test: HTTP (with a
//! redirect, a failing status and a server that hangs), HTTPS with a
//! self-signed certificate made here (rcgen), TCP with send/expect and a
//! refused port, DNS against Debian's dnsmasq, ICMP to a host in a network
//! namespace; `netpulse check run` with its exit code, and the agent's
//! schedule turning a dependent check `blocked` while its parent is down.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use netpulse_tests::{
    PinDir,
    agent::{Agent, bin, have_bin},
    is_root,
    netns::{Pair, have},
    require,
    scrape::Metrics,
};

fn dir(tag: &str) -> PathBuf {
    netpulse_tests::scratch(&format!("checks-{tag}"))
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads a request head; returns its path.
fn read_path(r: &mut impl BufRead) -> Option<String> {
    let mut first = String::new();
    r.read_line(&mut first).ok()?;
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).ok()? == 0 || l == "\r\n" {
            break;
        }
    }
    first.split_whitespace().nth(1).map(String::from)
}

fn respond(w: &mut impl Write, path: &str) {
    let (status, extra, body) = match path {
        "/ok" => ("200 OK", "", "healthy\n"),
        "/fail" => ("503 Service Unavailable", "", "down\n"),
        "/redirect" => ("302 Found", "Location: /ok\r\n", ""),
        "/hang" => {
            std::thread::sleep(Duration::from_secs(3));
            ("200 OK", "", "late\n")
        }
        _ => ("404 Not Found", "", ""),
    };
    let _ = write!(
        w,
        "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// A plain HTTP server on loopback, serving until the test ends.
fn http_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                if let Some(p) = read_path(&mut r) {
                    respond(&mut &s, &p);
                }
            });
        }
    });
    addr
}

/// An HTTPS server with a self-signed certificate for `localhost`, valid
/// until 2031-01-01; returns its address and the certificate's PEM file.
fn https_server(d: &Path) -> (SocketAddr, PathBuf) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(2031, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let ca = d.join("ca.pem");
    std::fs::write(&ca, cert.pem()).unwrap();
    let addr = netpulse_tests::tls::serve(
        cert.der().clone(),
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        |head, out| {
            let path = String::from_utf8_lossy(head)
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .to_string();
            respond(out, &path);
        },
    );
    (addr, ca)
}

/// A line-protocol server: greets with `+OK netpulse ready`.
fn tcp_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"+OK netpulse ready\r\n");
        }
    });
    addr
}

/// Debian's dnsmasq answering `svc.netpulse.test` = 10.1.2.3 on loopback;
/// killed by pid on drop.
struct Dnsmasq(Child, u16);

impl Dnsmasq {
    fn start(d: &Path) -> Option<Self> {
        if !require("dnsmasq (dnsmasq-base)", have("dnsmasq")) {
            return None;
        }
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                &format!("--port={port}"),
                "--address=/svc.netpulse.test/10.1.2.3",
                &format!("--pid-file={}", d.join("dnsmasq.pid").display()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        std::thread::sleep(Duration::from_millis(300));
        Some(Dnsmasq(child, port))
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `netpulse check run --output json` (optionally through `wrapper`):
/// exit code and the rows by check name.
fn check_run(
    wrapper: &[&str],
    cfg: &Path,
    extra: &[&str],
) -> (i32, std::collections::BTreeMap<String, serde_json::Value>) {
    let (cmd, pre) = match wrapper.split_first() {
        Some((c, rest)) => (c.to_string(), rest.iter().map(|s| s.to_string()).collect()),
        None => (bin(), Vec::new()),
    };
    let mut c = Command::new(cmd);
    c.args(pre);
    if !wrapper.is_empty() {
        c.arg(bin());
    }
    let out = c
        .args(["check", "run", "--output", "json", "--config"])
        .arg(cfg)
        .args(extra)
        .output()
        .expect("run netpulse check run");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        out.status.code().unwrap_or(-1),
        rows.into_iter()
            .map(|r| (r["check"].as_str().unwrap().to_string(), r))
            .collect(),
    )
}

#[test]
fn check_run_against_real_servers() {
    if !have_bin() {
        return;
    }
    let d = dir("run");
    let http = http_server();
    let (https, ca) = https_server(&d);
    let tcp = tcp_server();
    let refused = free_port();
    let Some(dns) = Dnsmasq::start(&d) else {
        return;
    };
    let cfg = d.join("checks.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[[check]]
name = "http-ok"
kind = "http"
target = "http://{http}/redirect"
body_contains = "healthy"
[[check]]
name = "http-503"
kind = "http"
target = "http://{http}/fail"
[[check]]
name = "http-503-expected"
kind = "http"
target = "http://{http}/fail"
expect_status = ["500-599"]
body_regex = "^do+wn\\s*$"
[[check]]
name = "http-hang"
kind = "http"
target = "http://{http}/hang"
timeout_seconds = 0.5
[[check]]
name = "https-ok"
kind = "http"
target = "https://localhost:{https_port}/ok"
tls_ca_file = "{ca}"
[[check]]
name = "https-untrusted"
kind = "http"
target = "https://localhost:{https_port}/ok"
[[check]]
name = "https-expiring"
kind = "http"
target = "https://localhost:{https_port}/ok"
tls_ca_file = "{ca}"
cert_min_valid_days = 3650
[[check]]
name = "tcp-expect"
kind = "tcp"
target = "{tcp}"
expect = "+OK"
[[check]]
name = "tcp-wrong-greeting"
kind = "tcp"
target = "{tcp}"
expect = "SSH-2.0"
timeout_seconds = 1
[[check]]
name = "tcp-refused"
kind = "tcp"
target = "127.0.0.1:{refused}"
[[check]]
name = "behind-refused"
kind = "http"
target = "http://{http}/ok"
depends_on = ["tcp-refused"]
[[check]]
name = "dns-a"
kind = "dns"
target = "svc.netpulse.test"
server = "127.0.0.1:{dns_port}"
expect = "10.1.2.3"
[[check]]
name = "dns-wrong-answer"
kind = "dns"
target = "svc.netpulse.test"
server = "127.0.0.1:{dns_port}"
expect = "10.9.9.9"
"#,
            https_port = https.port(),
            ca = ca.display(),
            dns_port = dns.1,
        ),
    )
    .unwrap();
    let started = Instant::now();
    let (code, rows) = check_run(&[], &cfg, &["--all"]);
    let took = started.elapsed();
    let state = |n: &str| rows[n]["state"].as_str().unwrap().to_string();
    let error = |n: &str| rows[n]["error"].as_str().unwrap_or("").to_string();
    assert_eq!(code, 1, "some checks fail: exit 1; {rows:#?}");
    for up in [
        "http-ok",
        "http-503-expected",
        "https-ok",
        "tcp-expect",
        "dns-a",
    ] {
        assert_eq!(state(up), "up", "{up}: {:#}", rows[up]);
    }
    for (down, why, cause) in [
        ("http-503", "status 503, expected 200-299", "http_status"),
        ("http-hang", "timed out after 0.5 s", "slow"),
        ("https-untrusted", "TLS handshake", "tls"),
        ("https-expiring", "certificate expires in", "cert_expiring"),
        (
            "tcp-wrong-greeting",
            "does not contain `SSH-2.0`",
            "content",
        ),
        ("tcp-refused", "Connection refused", "refused"),
        ("dns-wrong-answer", "10.1.2.3", "dns_no_answer"),
    ] {
        assert_eq!(state(down), "down", "{down}: {:#}", rows[down]);
        assert!(error(down).contains(why), "{down}: {}", error(down));
        // Why, from the evidence, and a line for a person.
        assert_eq!(
            rows[down]["evidence"]["cause"], cause,
            "{down}: {:#}",
            rows[down]
        );
        assert!(
            !rows[down]["explanation"].as_str().unwrap_or("").is_empty(),
            "{down}: {:#}",
            rows[down]
        );
    }
    assert!(rows["http-ok"]["explanation"].is_null());
    assert!(rows["http-ok"]["evidence"].is_null());
    assert_eq!(state("behind-refused"), "blocked");
    assert!(
        rows["behind-refused"]["duration_seconds"].is_null(),
        "a blocked check is not run"
    );
    // The redirect was followed to the page, phase by phase.
    assert_eq!(rows["http-ok"]["http_status"], 200);
    let phases = rows["https-ok"]["phases"].as_object().unwrap();
    let names: Vec<&str> = phases.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["connect", "dns", "first_byte", "tls", "transfer"],
        "{phases:?}"
    );
    // The certificate's notAfter, 2031-01-01T00:00:00Z.
    assert_eq!(
        rows["https-ok"]["cert_expiry_timestamp_seconds"],
        1_924_992_000
    );
    // Checks run concurrently: the hang costs its timeout once.
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // One passing check by name: exit 0.
    let (code, rows) = check_run(&[], &cfg, &["tcp-expect"]);
    assert_eq!((code, rows.len()), (0, 1), "{rows:#?}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn icmp_checks_need_cap_net_raw_and_reach_a_host_in_a_namespace() {
    if !require("root", is_root())
        || !require("ip (iproute2)", have("ip"))
        || !require("setpriv (util-linux)", have("setpriv"))
        || !have_bin()
    {
        return;
    }
    let pair = Pair::new("icmp", 103);
    let d = dir("icmp");
    let cfg = d.join("icmp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[check]]\nname = \"peer\"\nkind = \"icmp\"\ntarget = \"{}\"\n\n[[check]]\nname = \"nobody-there\"\nkind = \"icmp\"\ntarget = \"10.77.103.9\"\ntimeout_seconds = 0.5\n\n[[check]]\nname = \"beyond-b\"\nkind = \"icmp\"\ntarget = \"10.177.103.9\"\ntimeout_seconds = 2\n",
            pair.addr_b
        ),
    )
    .unwrap();
    // b routes for a, and has no route on to 10.177.103.0/24: it answers
    // a's echo there with an ICMP host unreachable.
    let ok = |out: std::process::Output| assert!(out.status.success(), "{out:?}");
    ok(pair.b.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]));
    ok(pair
        .b
        .exec("ip", &["route", "add", "unreachable", "10.177.103.0/24"]));
    let via = pair.addr_b.to_string();
    ok(pair.a.exec(
        "ip",
        &["route", "add", "10.177.103.0/24", "via", via.as_str()],
    ));
    let ns = ["ip", "netns", "exec", pair.a.name.as_str()];
    let (code, rows) = check_run(&ns, &cfg, &["--all"]);
    assert_eq!(rows["peer"]["state"], "up", "{rows:#?}");
    assert_eq!(rows["nobody-there"]["state"], "down");
    let err = rows["nobody-there"]["error"].as_str().unwrap_or("");
    assert!(err.contains("no echo reply from 10.77.103.9"), "{err}");
    assert_eq!(rows["nobody-there"]["evidence"]["cause"], "timeout");
    assert_eq!(
        rows["nobody-there"]["explanation"].as_str(),
        Some(err),
        "{rows:#?}"
    );
    assert_eq!(code, 1);
    // The router's ICMP error, matched to the echo it quotes.
    assert_eq!(rows["beyond-b"]["evidence"]["cause"], "icmp_unreachable");
    assert_eq!(
        rows["beyond-b"]["explanation"].as_str(),
        Some(format!("ICMP host unreachable from {via} (echo request to 10.177.103.9)").as_str()),
        "{rows:#?}"
    );
    // Without CAP_NET_RAW: the error says which capability.
    let unprivileged = [
        "ip",
        "netns",
        "exec",
        pair.a.name.as_str(),
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ];
    let (code, rows) = check_run(&unprivileged, &cfg, &["peer"]);
    assert_eq!(code, 1);
    let err = rows["peer"]["error"].as_str().unwrap_or("");
    assert!(err.contains("CAP_NET_RAW"), "{err}");
    assert_eq!(rows["peer"]["evidence"]["cause"], "local_error");
    let _ = std::fs::remove_dir_all(&d);
}

/// A TCP listener the test can close and open again on one port.
struct Switch {
    port: u16,
    on: Arc<AtomicBool>,
}

impl Switch {
    fn new() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let s = Switch {
            port,
            on: Arc::new(AtomicBool::new(false)),
        };
        s.set(true);
        s
    }

    fn set(&self, on: bool) {
        if !on {
            self.on.store(false, Ordering::SeqCst);
            // Wake the accept loop so it closes the listener.
            let _ = TcpStream::connect(("127.0.0.1", self.port));
            std::thread::sleep(Duration::from_millis(100));
            return;
        }
        let l = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        self.on.store(true, Ordering::SeqCst);
        let on = self.on.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                if !on.load(Ordering::SeqCst) {
                    return;
                }
                drop(s);
            }
        });
    }
}

#[test]
fn the_agent_schedules_checks_and_blocks_dependents_of_a_down_check() {
    if !require("root", is_root()) || !have_bin() {
        return;
    }
    let d = dir("agent");
    let pins = PinDir::new("checks");
    let http = http_server();
    let db = Switch::new();
    let port = 19502;
    let cfg = d.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[agent]
listen = "127.0.0.1:{port}"
pin_dir = "{pins}"
interfaces = ["lo"]
[docker]
enabled = false

[[check]]
name = "db"
kind = "tcp"
target = "127.0.0.1:{db}"
interval_seconds = 0.2
[[check]]
name = "app"
kind = "http"
target = "http://{http}/ok"
interval_seconds = 0.2
depends_on = ["db"]
"#,
            pins = pins.path().display(),
            db = db.port,
        ),
    )
    .unwrap();
    let mut agent = Agent::start_host(&cfg, port, &d.join("agent.log"));
    let state = |m: &Metrics, check: &str, s: &str| {
        m.sum("netpulse_check_state", &[("check", check), ("state", s)]) == 1
    };
    let m = agent.wait_for("both checks up", |m| {
        state(m, "db", "up") && state(m, "app", "up")
    });
    assert_eq!(
        m.sum("netpulse_check_up", &[("check", "app"), ("kind", "http")]),
        1
    );
    assert_eq!(
        m.sum("netpulse_check_http_status_code", &[("check", "app")]),
        200
    );
    assert!(m.has(
        "netpulse_check_phase_duration_seconds",
        &[("check", "app"), ("phase", "first_byte")]
    ));
    assert!(m.sum("netpulse_check_duration_seconds_count", &[("check", "app")]) >= 1);

    // The database goes away: it is down, the app behind it blocked (not
    // down), within a few intervals.
    db.set(false);
    let went = Instant::now();
    let m = agent.wait_for("db down, app blocked", |m| {
        state(m, "db", "down") && state(m, "app", "blocked")
    });
    assert!(
        went.elapsed() < Duration::from_secs(3),
        "{:?}",
        went.elapsed()
    );
    assert_eq!(m.sum("netpulse_check_up", &[("check", "app")]), 0);
    let log = agent.log_text();
    assert!(
        log.contains("check down") && log.contains("check=db"),
        "{log}"
    );
    assert!(
        log.contains("check blocked by a dependency") && log.contains("check=app"),
        "{log}"
    );

    // Back: both up again.
    db.set(true);
    agent.wait_for("both up again", |m| {
        state(m, "db", "up") && state(m, "app", "up")
    });
    agent.stop();
    let _ = std::fs::remove_dir_all(&d);
}
