//! TLS and basic auth on every endpoint, configured like exporter-toolkit's
//! web-config: a real Prometheus scrapes over mutual TLS with a password,
//! plain HTTP and clients without a certificate or password are refused,
//! the API token still opens the API, a rotated certificate is served
//! without a restart, and bad settings are config errors with a place.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use netpulse_tests::{
    PinDir,
    agent::{Agent, bin, have_bin, live_prerequisites},
    netns::{Pair, have},
    prom::Prometheus,
    require,
    scrape::get,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

const AGENT: u16 = 19550;
const PROM: u16 = 19551;
const TOKEN: &str = "websec-token-0123456789";
const PASSWORD: &str = "correct horse battery staple";

struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "netpulse test CA");
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki {
            dir: dir.to_path_buf(),
            ca,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for 127.0.0.1 signed by the CA, written as `<name>.pem` and
    /// `<name>.key`; its DER.
    fn leaf(&self, name: &str, cn: &str) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        // Written whole, then renamed: as a certificate manager does.
        for (ext, text) in [("pem", cert.pem()), ("key", key.serialize_pem())] {
            let tmp = self.dir.join(format!("{name}.{ext}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.dir.join(format!("{name}.{ext}"))).unwrap();
        }
        cert.der().to_vec()
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }
}

/// One HTTPS request to the agent from inside `ns`: (status, head, body),
/// or the error.
fn https(
    ns: &str,
    pki: &Pki,
    with_cert: bool,
    req: String,
) -> Result<(u16, String, Vec<u8>), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = if with_cert {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(pki.dir.join("client.pem"))
                .unwrap()
                .map(Result::unwrap)
                .collect();
        let key = PrivateKeyDer::from_pem_file(pki.dir.join("client.key")).unwrap();
        builder.with_client_auth_cert(chain, key).unwrap()
    } else {
        builder.with_no_client_auth()
    };
    netpulse_tests::netns::run_in(ns, move || {
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, AGENT)).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        match tls.read_to_end(&mut raw) {
            Ok(_) => {}
            // The agent closes without close_notify after Connection: close.
            Err(e) if !raw.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e.to_string()),
        }
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, _) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body_at = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(raw.len(), |i| i + 4);
        Ok((status, head.to_string(), raw[body_at..].to_vec()))
    })
}

fn req(method: &str, path: &str, auth: Option<String>) -> String {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// The server's certificate as a new TLS connection sees it.
fn served_cert(ns: &str, pki: &Pki) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    netpulse_tests::netns::run_in(ns, move || {
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, AGENT)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        while conn.is_handshaking() && conn.peer_certificates().is_none() {
            if conn.complete_io(&mut tcp).is_err() {
                break;
            }
        }
        conn.peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default()
    })
}

fn hash_password(password: &str) -> String {
    let mut child = Command::new(bin())
        .args(["config", "hash-password"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let h = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(h.starts_with("$2"), "{h}");
    h
}

#[test]
fn prometheus_scrapes_over_mutual_tls_with_a_password_and_nobody_else_gets_in() {
    if !live_prerequisites() || !require("prometheus (Debian)", have("prometheus")) {
        return;
    }
    let pair = Pair::new("websec", 106);
    let pins = PinDir::mounted("websec");
    let dir = netpulse_tests::scratch("websec");
    let pki = Pki::new(&dir);
    let first = pki.leaf("server", "netpulse one");
    pki.leaf("client", "prometheus");
    let hash = hash_password(PASSWORD);
    let cfg = dir.join("netpulse.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[agent]
listen = "127.0.0.1:{AGENT}"
pin_dir = "{pins}"
discover_sockets = false
state_dir = "{state}"

[api]
token = "{TOKEN}"

[[service]]
name = "web"
endpoints = [{{ proto = "tcp", port = 19552 }}]

[[check]]
name = "web-tcp"
kind = "tcp"
target = "127.0.0.1:19552"
service = "web"

[web.tls_server_config]
cert_file = "{cert}"
key_file = "{key}"
client_auth_type = "RequireAndVerifyClientCert"
client_ca_file = "{ca}"

[web.basic_auth_users]
prom = "{hash}"
"#,
            pins = pins.path().display(),
            state = dir.join("state").display(),
            cert = pki.path("server.pem"),
            key = pki.path("server.key"),
            ca = pki.path("ca.pem"),
        ),
    )
    .unwrap();
    let agent = Agent::start(&pair.a, &[], &cfg, AGENT, &dir.join("agent.log"));
    let ns = pair.a.name.clone();
    let good = || Some(basic("prom", PASSWORD));
    let deadline = Instant::now() + Duration::from_secs(20);
    while https(&ns, &pki, true, req("GET", "/healthz", good())).map(|r| r.0) != Ok(200) {
        assert!(
            Instant::now() < deadline,
            "the agent never answered over TLS; log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Plain HTTP gets no HTTP answer.
    let plain = pair
        .a
        .run(|| get(SocketAddr::from((Ipv4Addr::LOCALHOST, AGENT)), "/metrics"));
    assert!(
        plain.as_ref().map_or(true, |(s, _)| *s == 0),
        "plain HTTP was answered: {plain:?}"
    );
    // No client certificate: the handshake is refused.
    let r = https(&ns, &pki, false, req("GET", "/metrics", good()));
    assert!(r.is_err(), "served without a client certificate: {r:?}");
    // A certificate but no password, or a wrong one: 401 with a challenge.
    for auth in [
        None,
        Some(basic("prom", "wrong")),
        Some(basic("nobody", PASSWORD)),
    ] {
        let (status, head, _) =
            https(&ns, &pki, true, req("GET", "/metrics", auth.clone())).unwrap();
        assert_eq!(status, 401, "{auth:?}");
        assert!(
            head.contains("www-authenticate: Basic realm=\"netpulse\""),
            "{head}"
        );
    }
    // The password opens every endpoint.
    for path in [
        "/metrics",
        "/api/v1/services",
        "/",
        "/badge/web.svg",
        "/api/v1/openapi.json",
    ] {
        let (status, _, body) = https(&ns, &pki, true, req("GET", path, good())).unwrap();
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    }
    // The API token opens it too, and still guards the POSTs.
    let bearer = || Some(format!("Bearer {TOKEN}"));
    let (status, _, _) = https(&ns, &pki, true, req("GET", "/api/v1/checks", bearer())).unwrap();
    assert_eq!(status, 200);
    let (status, _, _) = https(
        &ns,
        &pki,
        true,
        req("POST", "/api/v1/checks/web-tcp/run", bearer()),
    )
    .unwrap();
    assert_eq!(status, 202);
    let (status, _, _) = https(
        &ns,
        &pki,
        true,
        req("POST", "/api/v1/checks/web-tcp/run", good()),
    )
    .unwrap();
    assert_eq!(status, 401, "a password alone must not start work");

    // A real Prometheus: one job with the right settings, one with a wrong
    // password.
    let prom_cfg = dir.join("prometheus.yml");
    let job = |name: &str, password: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n      cert_file: {cert}\n      key_file: {key}\n    basic_auth:\n      username: prom\n      password: '{password}'\n    static_configs:\n      - targets: ['127.0.0.1:{AGENT}']\n",
            ca = pki.path("ca.pem"),
            cert = pki.path("client.pem"),
            key = pki.path("client.key"),
        )
    };
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n{}{}",
            job("netpulse", PASSWORD),
            job("intruder", "guess")
        ),
    )
    .unwrap();
    let prom = Prometheus::start(&pair.a, &prom_cfg, &dir, PROM);
    let query = |q: &str| prom.query(q);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = query("up");
        let up = |job: &str| {
            v["data"]["result"]
                .as_array()
                .and_then(|r| r.iter().find(|s| s["metric"]["job"] == job))
                .map(|s| s["value"][1].as_str().unwrap_or("").to_string())
        };
        if up("netpulse").as_deref() == Some("1") && up("intruder").is_some() {
            assert_eq!(up("intruder").as_deref(), Some("0"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape over TLS: {v}\n{}",
            prom.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let v = query("netpulse_build_info");
    assert_eq!(v["data"]["result"].as_array().map(Vec::len), Some(1), "{v}");

    // A rotated certificate is served to new connections, no restart.
    assert_eq!(served_cert(&ns, &pki), first);
    let second = pki.leaf("server", "netpulse two");
    let deadline = Instant::now() + Duration::from_secs(5);
    while served_cert(&ns, &pki) != second {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_web_settings_are_config_errors_with_a_place() {
    if !have_bin() {
        return;
    }
    let dir = netpulse_tests::scratch("websec-cfg");
    let cfg = dir.join("bad.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[web.tls_server_config]
cert_file = "{missing}"
key_file = "{missing}"
client_auth_type = "Sometimes"

[web.basic_auth_users]
alice = "plaintext-password"
"#,
            missing = dir.join("nope.pem").display()
        ),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["config", "check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let f = cfg.display().to_string();
    assert!(
        err.contains(&format!(
            "{f}:4:20: client_auth_type `Sometimes` is not one of"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{f}:7:9: basic_auth_users.alice: not a bcrypt hash"
        )),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
