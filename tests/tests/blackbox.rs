//! `/probe` against Debian's prometheus-blackbox-exporter, side by side on
//! the same loopback targets made here: an HTTP server (200 with a
//! Last-Modified, 503, a redirect, a chunked answer), an HTTPS server whose
//! certificate a CA made here (rcgen) issued, a refused port, a listener
//! that accepts and never answers, a TCP banner, ICMP to 127.0.0.1 (and
//! ::1 when loopback has IPv6). Modules: Debian's stock http_2xx,
//! http_post_2xx, tcp_connect and icmp from /etc/prometheus/blackbox.yml,
//! and modules of the test's own (a CA file, a body regex, a timeout, a
//! banner expected) that netpulse takes as `[[check]]`s of the same name.
//!
//! Both answers must have the same metric names and the same label sets,
//! both ways (one blackbox_exporter gives that netpulse lacks fails as
//! much as one netpulse adds), and the same values but for durations. With
//! `X-Prometheus-Scrape-Timeout-Seconds: 1.5` a silent target must take
//! netpulse about 1.0 s (blackbox_exporter's 0.5 s offset), not a module's
//! own timeout.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
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

const BB_PORT: u16 = 19503;
const AGENT_PORT: u16 = 19504;
/// The leaf's and the CA's notAfter: 2031-01-01 and 2030-06-01 (Unix s).
const LEAF_EXPIRY: f64 = 1_924_992_000.0;
const CA_EXPIRY: f64 = 1_906_502_400.0;
/// /ok's Last-Modified, and in Unix seconds.
const LAST_MODIFIED: &str = "Wed, 21 Oct 2015 07:28:00 GMT";
const LAST_MODIFIED_UNIX: f64 = 1_445_412_480.0;
/// Values that depend on the run, not on what was probed.
const DURATIONS: [&str; 4] = [
    "probe_duration_seconds",
    "probe_dns_lookup_time_seconds",
    "probe_http_duration_seconds",
    "probe_icmp_duration_seconds",
];

/// The answer to a request head's path: (status, extra headers, body,
/// chunked).
fn answer(path: &str) -> (&'static str, String, &'static str, bool) {
    match path {
        "/ok" => (
            "200 OK",
            format!("Last-Modified: {LAST_MODIFIED}\r\n"),
            "healthy\n",
            false,
        ),
        "/fail" => ("503 Service Unavailable", String::new(), "no\n", false),
        "/redirect" => ("302 Found", "Location: /ok\r\n".into(), "", false),
        "/chunked" => ("200 OK", String::new(), "in chunks\n", true),
        _ => ("404 Not Found", String::new(), "", false),
    }
}

/// Reads a request (head, and a body of Content-Length); writes the answer.
fn serve(mut r: impl BufRead, w: &mut impl Write) {
    let mut first = String::new();
    if r.read_line(&mut first).unwrap_or(0) == 0 {
        return;
    }
    let mut len = 0;
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let _ = r.read_exact(&mut vec![0; len]);
    let path = first.split_whitespace().nth(1).unwrap_or("/");
    let (status, extra, body, chunked) = answer(path);
    let framing = if chunked {
        format!(
            "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
    } else {
        format!("Content-Length: {}\r\n\r\n{body}", body.len())
    };
    let _ = write!(
        w,
        "HTTP/1.1 {status}\r\n{extra}Connection: close\r\n{framing}"
    );
    let _ = w.flush();
}

/// A plain HTTP server on `bind`, serving until the test ends.
fn http_server(bind: &str) -> SocketAddr {
    let l = TcpListener::bind(bind).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let r = BufReader::new(s.try_clone().unwrap());
                serve(r, &mut &s);
            });
        }
    });
    addr
}

/// A CA (CN=netpulse test CA, until 2030-06-01) written to `ca.pem`, and
/// an HTTPS server on 127.0.0.1 whose leaf it issued (for localhost and
/// 127.0.0.1, until 2031-01-01, a subject with an escaped comma and an
/// attribute Go has no name for). The server sends the leaf alone.
fn https_server(dir: &Path) -> (SocketAddr, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, DnValue, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::OrganizationName, "netpulse");
    ca.distinguished_name
        .push(DnType::CommonName, "netpulse test CA");
    ca.not_after = rcgen::date_time_ymd(2030, 6, 1);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    leaf.distinguished_name.push(DnType::CountryName, "DE");
    leaf.distinguished_name
        .push(DnType::OrganizationName, "Net, Pulse");
    leaf.distinguished_name
        .push(DnType::OrganizationalUnitName, "probes");
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.distinguished_name.push(
        DnType::CustomDnType(vec![1, 2, 840, 113549, 1, 9, 1]),
        DnValue::Ia5String("ops@netpulse.test".try_into().unwrap()),
    );
    leaf.not_after = rcgen::date_time_ymd(2031, 1, 1);
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let addr = netpulse_tests::tls::serve(
        cert.der().clone(),
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        |head, out| serve(head, out),
    );
    (addr, ca_file)
}

/// A listener that accepts and never answers (the connections held open).
fn silent_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held: Vec<TcpStream> = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    addr
}

/// A line-protocol server: `+OK netpulse ready`, then it hangs up.
fn banner_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"+OK netpulse ready\r\n");
        }
    });
    addr
}

/// Debian's blackbox_exporter; killed on drop.
struct Blackbox(Child);

impl Drop for Blackbox {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One `/probe` answer and how long it took to come.
struct Answer {
    m: Metrics,
    took: Duration,
}

/// One `/probe` over HTTP/1.0, read to the end: blackbox_exporter (Go)
/// answers HTTP/1.1 in chunks, which `scrape::request` does not decode.
fn probe(port: u16, module: &str, target: &str, scrape_timeout: Option<&str>) -> Answer {
    let what = format!("/probe?module={module}&target={target} on {port}");
    let t = Instant::now();
    let mut s =
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap_or_else(|e| panic!("{what}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let header = scrape_timeout
        .map(|t| format!("X-Prometheus-Scrape-Timeout-Seconds: {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /probe?module={module}&target={} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n{header}\r\n",
        urlencode(target)
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let took = t.elapsed();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{what}: {raw}"
    );
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{what}: {head}"
    );
    Answer {
        m: Metrics::parse(body),
        took,
    }
}

type Series = BTreeMap<BTreeMap<String, String>, f64>;

fn series(m: &Metrics, name: &str) -> Series {
    m.0.get(name)
        .map(|s| s.iter().cloned().collect())
        .unwrap_or_default()
}

fn value(m: &Metrics, name: &str) -> Option<f64> {
    m.0.get(name).and_then(|s| s.first()).map(|(_, v)| *v)
}

/// Names and label sets both ways; values of all but durations.
fn compare(what: &str, theirs: &Metrics, ours: &Metrics) {
    let names = |m: &Metrics| m.0.keys().cloned().collect::<BTreeSet<String>>();
    let lacking: Vec<_> = names(theirs).difference(&names(ours)).cloned().collect();
    assert!(
        lacking.is_empty(),
        "{what}: netpulse lacks what blackbox_exporter gives: {lacking:?}"
    );
    let extra: Vec<_> = names(ours).difference(&names(theirs)).cloned().collect();
    assert!(
        extra.is_empty(),
        "{what}: netpulse gives what blackbox_exporter does not: {extra:?}"
    );
    for name in names(theirs) {
        let (t, o) = (series(theirs, &name), series(ours, &name));
        assert_eq!(
            o.keys().collect::<Vec<_>>(),
            t.keys().collect::<Vec<_>>(),
            "{what}: label sets of {name} (left netpulse, right blackbox_exporter)"
        );
        if DURATIONS.contains(&name.as_str()) {
            continue;
        }
        for (labels, v) in &t {
            assert_eq!(
                o[labels], *v,
                "{what}: {name}{labels:?} (left netpulse, right blackbox_exporter)"
            );
        }
    }
}

/// Debian's stock blackbox.yml, the four modules that apply checked, and
/// the test's own modules appended.
fn blackbox_config(dir: &Path, ca: &Path) -> PathBuf {
    let stock = std::fs::read_to_string("/etc/prometheus/blackbox.yml")
        .expect("Debian's /etc/prometheus/blackbox.yml");
    assert!(stock.starts_with("modules:"), "{stock}");
    for (module, prober) in [
        ("http_2xx", "http"),
        ("http_post_2xx", "http"),
        ("tcp_connect", "tcp"),
        ("icmp", "icmp"),
    ] {
        assert!(
            stock.contains(&format!("\n  {module}:\n    prober: {prober}\n")),
            "stock module {module} not in /etc/prometheus/blackbox.yml"
        );
    }
    let own = format!(
        r#"
  tls_ca:
    prober: http
    timeout: 10s
    http:
      tls_config:
        ca_file: {ca}
  body_re:
    prober: http
    timeout: 10s
    http:
      fail_if_body_not_matches_regexp: ["^sick"]
  hang:
    prober: http
    timeout: 2s
  banner:
    prober: tcp
    timeout: 10s
    tcp:
      query_response:
        - expect: "^\\+OK"
  banner_ssh:
    prober: tcp
    timeout: 10s
    tcp:
      query_response:
        - expect: "^SSH-2.0"
"#,
        ca = ca.display()
    );
    let path = dir.join("blackbox.yml");
    std::fs::write(&path, format!("{}\n{own}", stock.trim_end())).unwrap();
    path
}

/// What one case expects beyond parity.
#[derive(Clone, Copy, PartialEq)]
enum Extra {
    None,
    /// Took about this long, both (seconds).
    Took(f64),
    /// The TLS family, with the leaf's and the chain's expiry.
    Tls,
    Redirected,
    Chunked,
    LastModified,
    FailedOnContent,
    HopLimit,
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
    let started = Instant::now();
    let dir = netpulse_tests::scratch("blackbox");
    let http = http_server("127.0.0.1:0");
    let (https, ca) = https_server(&dir);
    let silent = silent_server();
    let banner = banner_server();
    let refused = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let http6 = TcpListener::bind("[::1]:0")
        .is_ok()
        .then(|| http_server("[::1]:0"));
    if http6.is_none() {
        eprintln!("loopback has no ::1: the IPv6 cases are left out");
    }

    let bb = Blackbox(
        Command::new("prometheus-blackbox-exporter")
            .arg(format!(
                "--config.file={}",
                blackbox_config(&dir, &ca).display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{BB_PORT}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start blackbox_exporter"),
    );
    let pins = PinDir::new("blackbox");
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[agent]
listen = "127.0.0.1:{AGENT_PORT}"
pin_dir = "{pins}"
interfaces = ["lo"]
[docker]
enabled = false
[[check]]
name = "tls_ca"
kind = "http"
target = "https://{https}/ok"
tls_ca_file = "{ca}"
[[check]]
name = "body_re"
kind = "http"
target = "http://{http}/ok"
body_regex = "^sick"
[[check]]
name = "hang"
kind = "http"
target = "http://{silent}/"
timeout_seconds = 2
[[check]]
name = "banner"
kind = "tcp"
target = "{banner}"
expect = "+OK"
[[check]]
name = "banner_ssh"
kind = "tcp"
target = "{banner}"
expect = "SSH-2.0"
"#,
            pins = pins.path().display(),
            ca = ca.display(),
        ),
    )
    .unwrap();
    let mut agent = Agent::start_host(&cfg, AGENT_PORT, &dir.join("agent.log"));
    agent.wait_for("the agent", |m| m.has("netpulse_build_info", &[]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(SocketAddr::from((Ipv4Addr::LOCALHOST, BB_PORT)), "/").is_err() {
        assert!(Instant::now() < deadline, "blackbox_exporter did not start");
        std::thread::sleep(Duration::from_millis(100));
    }

    // (module, target, probe_success, scrape timeout, what else).
    let short = Some("1.5");
    let normal = Some("10");
    #[rustfmt::skip]
    let mut cases = vec![
        ("http_2xx", format!("http://{http}/ok"), 1, normal, Extra::LastModified),
        ("http_2xx", format!("{http}/ok"), 1, normal, Extra::None),
        ("http_2xx", format!("http://{http}/fail"), 0, normal, Extra::None),
        ("http_2xx", format!("http://{http}/redirect"), 1, normal, Extra::Redirected),
        ("http_2xx", format!("http://{http}/chunked"), 1, normal, Extra::Chunked),
        ("http_2xx", format!("http://{refused}/"), 0, normal, Extra::None),
        // A silent target: the scrape's timeout less 0.5 s, also for a
        // [[check]] with a longer timeout of its own, which holds without.
        ("hang", format!("http://{silent}/"), 0, short, Extra::Took(1.0)),
        ("http_2xx", format!("http://{silent}/"), 0, short, Extra::Took(1.0)),
        ("hang", format!("http://{silent}/"), 0, None, Extra::Took(2.0)),
        ("http_post_2xx", format!("http://{http}/ok"), 1, normal, Extra::None),
        ("http_post_2xx", format!("http://{http}/fail"), 0, normal, Extra::None),
        // Issued by a CA neither trusts: verification fails alike.
        ("http_2xx", format!("https://{https}/ok"), 0, normal, Extra::None),
        // [[check]]s as modules, blackbox_exporter's of the same name.
        ("tls_ca", format!("https://{https}/ok"), 1, normal, Extra::Tls),
        ("tls_ca", format!("https://{https}/fail"), 0, normal, Extra::Tls),
        ("body_re", format!("http://{http}/ok"), 0, normal, Extra::FailedOnContent),
        ("body_re", format!("http://{http}/fail"), 0, normal, Extra::None),
        ("tcp_connect", http.to_string(), 1, normal, Extra::None),
        ("tcp_connect", refused.to_string(), 0, normal, Extra::None),
        ("tcp_connect", silent.to_string(), 1, short, Extra::None),
        ("banner", banner.to_string(), 1, normal, Extra::None),
        ("banner_ssh", banner.to_string(), 0, normal, Extra::FailedOnContent),
        ("icmp", "127.0.0.1".to_string(), 1, normal, Extra::HopLimit),
    ];
    if let Some(h6) = http6 {
        #[rustfmt::skip]
        cases.extend([
            ("http_2xx", format!("http://{h6}/ok"), 1, normal, Extra::LastModified),
            ("tcp_connect", h6.to_string(), 1, normal, Extra::None),
            ("icmp", "::1".to_string(), 1, normal, Extra::HopLimit),
        ]);
    }
    for (module, target, success, timeout, extra) in cases {
        let what = format!(
            "{module} {target} (scrape timeout {})",
            timeout.unwrap_or("none")
        );
        // Side by side, so a timeout costs its time once.
        let (theirs, ours) = std::thread::scope(|s| {
            let t = s.spawn(|| probe(BB_PORT, module, &target, timeout));
            let o = s.spawn(|| probe(AGENT_PORT, module, &target, timeout));
            (t.join().unwrap(), o.join().unwrap())
        });
        eprintln!(
            "{what}: success {:?}, {} names; {:.3} s blackbox_exporter, {:.3} s netpulse",
            value(&ours.m, "probe_success"),
            ours.m.0.len(),
            theirs.took.as_secs_f64(),
            ours.took.as_secs_f64()
        );
        compare(&what, &theirs.m, &ours.m);
        assert_eq!(
            value(&theirs.m, "probe_success"),
            Some(f64::from(success)),
            "{what}: blackbox_exporter"
        );
        assert_eq!(
            value(&ours.m, "probe_success"),
            Some(f64::from(success)),
            "{what}"
        );
        let has = |name: &str| theirs.m.0.contains_key(name);
        // What the comparison covers: blackbox_exporter's answer has it.
        for name in [
            "probe_success",
            "probe_duration_seconds",
            "probe_dns_lookup_time_seconds",
            "probe_ip_protocol",
            "probe_ip_addr_hash",
        ] {
            assert!(has(name), "{what}: blackbox_exporter gives no {name}");
        }
        if module.starts_with("http") || ["tls_ca", "body_re", "hang"].contains(&module) {
            for name in [
                "probe_http_status_code",
                "probe_http_ssl",
                "probe_http_version",
                "probe_http_content_length",
                "probe_http_uncompressed_body_length",
                "probe_http_redirects",
                "probe_failed_due_to_regex",
            ] {
                assert!(has(name), "{what}: blackbox_exporter gives no {name}");
            }
            assert_eq!(
                series(&ours.m, "probe_http_duration_seconds").len(),
                5,
                "{what}"
            );
        }
        let ip = if target.contains("::1") { 6.0 } else { 4.0 };
        assert_eq!(value(&ours.m, "probe_ip_protocol"), Some(ip), "{what}");
        match extra {
            Extra::None => {}
            Extra::Took(secs) => {
                for (who, a) in [("blackbox_exporter", &theirs), ("netpulse", &ours)] {
                    let took = a.took.as_secs_f64();
                    assert!(
                        (secs - 0.1..secs + 0.6).contains(&took),
                        "{what}: {who} answered after {took:.3} s, not about {secs} s"
                    );
                    let d = value(&a.m, "probe_duration_seconds").unwrap();
                    assert!(
                        (secs - 0.1..secs + 0.3).contains(&d),
                        "{what}: {who}'s probe_duration_seconds {d}, not about {secs}"
                    );
                }
            }
            Extra::Tls => {
                assert_eq!(value(&ours.m, "probe_http_ssl"), Some(1.0), "{what}");
                assert_eq!(
                    value(&ours.m, "probe_ssl_earliest_cert_expiry"),
                    Some(LEAF_EXPIRY),
                    "{what}"
                );
                assert_eq!(
                    value(&ours.m, "probe_ssl_last_chain_expiry_timestamp_seconds"),
                    Some(CA_EXPIRY),
                    "{what}"
                );
                assert!(has("probe_tls_version_info"), "{what}");
                let info = series(&ours.m, "probe_ssl_last_chain_info");
                let labels = info.keys().next().expect("probe_ssl_last_chain_info");
                eprintln!("  probe_ssl_last_chain_info{labels:?}");
                assert_eq!(labels["subjectalternative"], "localhost", "{what}");
                assert!(
                    labels["subject"].starts_with("CN=localhost,"),
                    "{what}: {labels:?}"
                );
            }
            Extra::Redirected => {
                assert_eq!(value(&ours.m, "probe_http_redirects"), Some(1.0), "{what}")
            }
            Extra::Chunked => {
                assert_eq!(
                    value(&ours.m, "probe_http_content_length"),
                    Some(-1.0),
                    "{what}"
                );
                assert_eq!(
                    value(&ours.m, "probe_http_uncompressed_body_length"),
                    Some(10.0),
                    "{what}"
                );
            }
            Extra::LastModified => {
                assert_eq!(
                    value(&ours.m, "probe_http_last_modified_timestamp_seconds"),
                    Some(LAST_MODIFIED_UNIX),
                    "{what}"
                );
                assert_eq!(
                    value(&ours.m, "probe_http_content_length"),
                    Some(8.0),
                    "{what}"
                );
                assert_eq!(value(&ours.m, "probe_http_version"), Some(1.1), "{what}");
            }
            Extra::FailedOnContent => {
                assert_eq!(
                    value(&ours.m, "probe_failed_due_to_regex"),
                    Some(1.0),
                    "{what}"
                )
            }
            Extra::HopLimit => {
                assert_eq!(
                    value(&ours.m, "probe_icmp_reply_hop_limit"),
                    Some(64.0),
                    "{what}"
                );
                assert_eq!(
                    series(&ours.m, "probe_icmp_duration_seconds").len(),
                    3,
                    "{what}"
                );
            }
        }
    }
    // An unknown module is refused the way blackbox_exporter refuses it.
    let (status, body) = get(
        SocketAddr::from((Ipv4Addr::LOCALHOST, AGENT_PORT)),
        "/probe?module=nope&target=127.0.0.1:1",
    )
    .unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("Unknown module \"nope\""), "{body}");
    agent.stop();
    drop(bb);
    eprintln!("blackbox parity: {:.1} s", started.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&dir);
}
