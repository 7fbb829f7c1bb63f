//! The job queue, the API that starts work, and actions, on a running
//! agent: the bearer token (missing, wrong, right, none configured), jobs
//! run and stored, a webhook received by a server of the test's, history
//! with uptime and incidents, jobs surviving a SIGKILL of the agent, a
//! full disk under the store, and `restart_container` on a real dockerd.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use netpulse_tests::{
    PinDir,
    agent::{Agent, have_bin},
    docker::{Container, docker, docker_ok, prerequisites, test_image},
    is_root, require,
    scrape::request,
};

fn dir(tag: &str) -> PathBuf {
    netpulse_tests::scratch(&format!("jobs-{tag}"))
}

/// An HTTP server: `/ok` 200, `/hang` after 4 s, anything else 404; POSTs
/// are sent to the returned channel as (path, body).
fn server() -> (SocketAddr, mpsc::Receiver<(String, String)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut first = String::new();
                let _ = r.read_line(&mut first);
                let mut len = 0usize;
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                        break;
                    }
                    if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut parts = first.split_whitespace();
                let (method, path) = (
                    parts.next().unwrap_or(""),
                    parts.next().unwrap_or("").to_string(),
                );
                if method == "POST" {
                    let mut body = vec![0u8; len];
                    let _ = r.read_exact(&mut body);
                    let _ = tx.send((path.clone(), String::from_utf8_lossy(&body).into_owned()));
                }
                let status = match path.as_str() {
                    "/ok" | "/alert" => "200 OK",
                    "/hang" => {
                        std::thread::sleep(Duration::from_secs(4));
                        "200 OK"
                    }
                    _ => "404 Not Found",
                };
                let _ = write!(
                    &s,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            });
        }
    });
    (addr, rx)
}

fn api(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let (status, body) = request(
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        method,
        path,
        &headers,
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let v = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    (status, v)
}

/// Polls a job until it is no longer pending or running.
fn finished(port: u16, id: i64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, j) = api(port, "GET", &format!("/api/v1/jobs/{id}"), None);
        assert_eq!(s, 200, "{j}");
        if j["state"] != "pending" && j["state"] != "running" {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} not finished: {j}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_config(
    path: &Path,
    port: u16,
    pins: &Path,
    state: &Path,
    token: Option<&str>,
    http: SocketAddr,
) {
    std::fs::write(
        path,
        format!(
            r#"[agent]
listen = "127.0.0.1:{port}"
pin_dir = "{pins}"
state_dir = "{state}"
interfaces = ["lo"]
[docker]
enabled = false
{api}

[[check]]
name = "web"
kind = "http"
target = "http://{http}/ok"
interval_seconds = 3600
jitter_seconds = 0
tags = ["deploy"]

[[check]]
name = "slow"
kind = "http"
target = "http://{http}/hang"
interval_seconds = 3600
jitter_seconds = 0
timeout_seconds = 10

[[check]]
name = "flaky"
kind = "tcp"
target = "127.0.0.1:1"
interval_seconds = 0.2
actions = [{{ kind = "webhook", url = "http://{http}/alert", after = 3, cooldown_seconds = 3600 }}]

[[hook]]
name = "deploy"
tags = ["deploy"]
"#,
            pins = pins.display(),
            state = state.display(),
            api = token.map_or(String::new(), |t| format!("[api]\ntoken = \"{t}\"")),
        ),
    )
    .unwrap();
}

#[test]
fn jobs_api_token_history_webhook_and_restart_survival() {
    if !require("root", is_root()) || !have_bin() {
        return;
    }
    let d = dir("api");
    let pins = PinDir::new("jobs");
    let state = d.join("state");
    let (http, posts) = server();
    let port = 19505;
    let cfg = d.join("config.toml");
    let token = "s3cret-token-of-the-test";
    write_config(&cfg, port, pins.path(), &state, Some(token), http);
    let mut agent = Agent::start_host(&cfg, port, &d.join("agent.log"));
    agent.wait_for("the agent", |m| {
        m.has("netpulse_check_up", &[("check", "web")])
    });

    // The token: missing, wrong, right.
    let (s, body) = api(port, "POST", "/api/v1/checks/web/run", None);
    assert_eq!(s, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
    let (s, _) = api(
        port,
        "POST",
        "/api/v1/checks/web/run",
        Some("s3cret-token-of-the-tesT"),
    );
    assert_eq!(s, 401);
    let (s, body) = api(port, "POST", "/api/v1/checks/nope/run", Some(token));
    assert_eq!(s, 404);
    assert_eq!(body["error"], "no check named `nope`");
    let (s, body) = api(port, "POST", "/api/v1/checks/web/run", Some(token));
    assert_eq!(s, 202, "{body}");
    let job = finished(port, body["job"].as_i64().unwrap());
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["result"]["checks"]["web"]["ok"], true, "{job}");
    assert_eq!(job["result"]["checks"]["web"]["http_status"], 200);

    // The deploy pipeline's webhook runs the checks tagged `deploy`.
    let (s, body) = api(port, "POST", "/api/v1/hooks/deploy", Some(token));
    assert_eq!(s, 202, "{body}");
    let job = finished(port, body["job"].as_i64().unwrap());
    assert_eq!(job["kind"], "hook");
    assert_eq!(
        job["result"]["checks"].as_object().unwrap().len(),
        1,
        "{job}"
    );

    // `flaky` fails every 0.2 s: its webhook fires once, after 3 failures.
    let (path, body) = posts
        .recv_timeout(Duration::from_secs(10))
        .expect("the webhook");
    assert_eq!(path, "/alert");
    let event: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["check"], "flaky", "{event}");
    assert_eq!(event["state"], "down", "{event}");
    assert!(
        event["consecutive_failures"].as_u64().unwrap() >= 3,
        "{event}"
    );
    assert!(
        event["error"].as_str().unwrap().contains("127.0.0.1:1"),
        "{event}"
    );
    // Why, from the evidence: a reset answered the SYN.
    assert_eq!(event["evidence"]["cause"], "refused", "{event}");
    assert!(
        event["explanation"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:1 answered RST"),
        "{event}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(posts.try_recv().is_err(), "the cooldown holds");

    // History: uptime and incidents from the stored results.
    let (s, body) = api(port, "GET", "/api/v1/checks", None);
    assert_eq!(s, 200);
    let by_name = |n: &str| {
        body["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_name("web")["uptime"]["24h"], 1.0, "{body}");
    let flaky = by_name("flaky");
    assert_eq!(flaky["uptime"]["7d"], 0.0);
    assert_eq!(flaky["state"], "down");
    let incidents = flaky["incidents"].as_array().unwrap();
    assert_eq!(incidents.len(), 1, "{flaky}");
    assert!(incidents[0]["end_ms"].is_null(), "still open");

    // Six jobs on a check that takes 4 s: four run, two wait. A SIGKILL:
    // the running ones are marked interrupted, the waiting ones run after
    // the restart.
    let ids: Vec<i64> = (0..6)
        .map(|_| {
            let (s, b) = api(port, "POST", "/api/v1/checks/slow/run", Some(token));
            assert_eq!(s, 202, "{b}");
            b["job"].as_i64().unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    agent.kill();
    let mut agent = Agent::start_host(&cfg, port, &d.join("agent.log"));
    agent.wait_for("the agent back", |m| {
        m.has("netpulse_check_up", &[("check", "web")])
    });
    let states: Vec<String> = ids
        .iter()
        .map(|id| finished(port, *id)["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        states.iter().filter(|s| *s == "interrupted").count(),
        4,
        "{states:?}"
    );
    assert_eq!(
        states.iter().filter(|s| *s == "done").count(),
        2,
        "{states:?}"
    );
    agent.stop();

    // No token configured: starting work is off, and the answer says why.
    write_config(&cfg, port, pins.path(), &state, None, http);
    let mut agent = Agent::start_host(&cfg, port, &d.join("agent.log"));
    agent.wait_for("the agent without a token", |m| {
        m.has("netpulse_check_up", &[])
    });
    let (s, body) = api(port, "POST", "/api/v1/checks/web/run", Some(token));
    assert_eq!(s, 403);
    assert!(
        body["error"].as_str().unwrap().contains("api.token"),
        "{body}"
    );
    agent.stop();
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_full_disk_under_the_store_is_logged_once_and_recovered_from() {
    if !require("root", is_root()) || !have_bin() {
        return;
    }
    let d = dir("disk");
    let state = d.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).output();
        }
    }
    let _mount = Unmount(state.clone());
    let pins = PinDir::new("disk");
    let (http, _posts) = server();
    let port = 19506;
    let cfg = d.join("config.toml");
    write_config(&cfg, port, pins.path(), &state, None, http);
    let mut agent = Agent::start_host(&cfg, port, &d.join("agent.log"));
    agent.wait_for("the agent", |m| {
        m.has("netpulse_check_up", &[("check", "flaky")])
    });
    // Fill the disk.
    let filler = state.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    drop(f);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.log_text().contains("store write failed") {
        assert!(
            Instant::now() < deadline,
            "no store error logged:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let full_ms = netpulse::store::now_ms();
    // Still serving and checking, and said once.
    std::thread::sleep(Duration::from_secs(2));
    let m = agent.metrics().expect("metrics while the disk is full");
    assert!(m.sum("netpulse_check_runs_total", &[("check", "flaky")]) > 10);
    let said = agent.log_text().matches("store write failed").count();
    assert_eq!(said, 1, "{}", agent.log_text());
    // Space again: writes resume.
    std::fs::remove_file(&filler).unwrap();
    let free_ms = netpulse::store::now_ms();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.log_text().contains("store writes work again") {
        assert!(
            Instant::now() < deadline,
            "no recovery logged:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let runs = agent
        .metrics()
        .expect("metrics")
        .sum("netpulse_check_runs_total", &[("check", "flaky")]);
    agent.stop();
    // Read back from the store itself: the results of the runs while the
    // disk was full were kept and written once there was space, and the
    // ones after it were written too: every run counted has its row.
    let store = netpulse::store::Store::open(&state).expect("open the store");
    let rows = store.recent("flaky", 100_000);
    let during = rows
        .iter()
        .filter(|r| (full_ms..free_ms).contains(&r.at_ms))
        .count();
    let after = rows.iter().filter(|r| r.at_ms > free_ms).count();
    assert!(during > 5, "{during} results kept from the full-disk time");
    assert!(after > 0, "no result written after space returned");
    assert!(
        rows.len() as u64 >= runs,
        "{} rows in the store for {runs} runs",
        rows.len()
    );
    drop(store);
    drop(_mount);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn restart_container_acts_on_a_real_container() {
    if !prerequisites() || !have_bin() {
        return;
    }
    test_image();
    let d = dir("restart");
    let name = format!("np-restart-{}", std::process::id());
    let c = Container::httpd(&name, &[]);
    let started = |n: &str| docker_ok(&["inspect", "-f", "{{.State.StartedAt}}", n]);
    let first = started(&name);
    let pins = PinDir::new("restart");
    let port = 19507;
    let cfg = d.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[agent]
listen = "127.0.0.1:{port}"
pin_dir = "{pins}"
state_dir = "{state}"
interfaces = ["lo"]

[[check]]
name = "web-missing-page"
kind = "http"
target = "http://{ip}/missing"
interval_seconds = 0.3
actions = [{{ kind = "restart_container", container = "{name}", after = 2, cooldown_seconds = 3600 }}]
"#,
            pins = pins.path().display(),
            state = d.join("state").display(),
            ip = c.ip(),
        ),
    )
    .unwrap();
    let mut agent = Agent::start_host(&cfg, port, &d.join("agent.log"));
    agent.wait_for("the check down", |m| {
        m.sum(
            "netpulse_check_state",
            &[("check", "web-missing-page"), ("state", "down")],
        ) == 1
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while started(&name) == first {
        assert!(
            Instant::now() < deadline,
            "not restarted (started at {first}; now {}; logs: {}):\n{}",
            docker_ok(&[
                "inspect",
                "-f",
                "{{.State.Status}} exit {{.State.ExitCode}} error {{.State.Error}} started {{.State.StartedAt}} finished {{.State.FinishedAt}}",
                &name
            ]),
            String::from_utf8_lossy(&docker(&["logs", &name]).stderr),
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = agent.log_text();
    assert!(
        log.contains("action done") && log.contains("restart_container"),
        "{log}"
    );
    agent.stop();
    drop(c);
    let _ = std::fs::remove_dir_all(&d);
}
