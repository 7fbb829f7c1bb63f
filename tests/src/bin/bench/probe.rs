//! Probes per CPU-second: netpulse against Debian's
//! prometheus-blackbox-exporter, the same modules on the same targets, both
//! measured the same two ways, all on the loopback of a network namespace
//! of the bench's own:
//!
//! - through `/probe`: sequential requests to each tool's `/probe`;
//! - as deployed: 20 targets probed at 20 Hz each, blackbox_exporter
//!   scraped by a real Prometheus (Debian's, a config and a TSDB of the
//!   bench's own, scrape interval 50 ms), netpulse running the same probes
//!   as scheduled checks.
//!
//! CPU is each whole process's user + system time (/proc/PID/stat), over
//! the probes; probes are counted at the targets (an HTTP request or a TCP
//! connection each), so both tools are counted alike. Prometheus's own CPU
//! is shown apart, and added to blackbox_exporter's in a row of its own.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use netpulse_tests::{
    PinDir,
    agent::Agent,
    netns::Netns,
    scrape::{Metrics, get, urlencode},
};

const TARGET_RATIO: f64 = 5.0;
/// Targets per module, and how often each is probed as deployed.
const TARGETS: usize = 20;
const INTERVAL_MS: u64 = 50;
const BB_PORT: u16 = 19508;
const NP_PORT: u16 = 19509;
const SCHED_PORT: u16 = 19511;
const PROM_PORT: u16 = 19510;

/// A child process stopped by pid on drop (SIGTERM, then wait).
struct Proc(Child);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signalling the child we spawned (ip netns exec execs
            // the command, so the pid is the tool's).
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU seconds (user + system) of the whole process `pid`.
fn cpu(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from 1 before the ')'.
    let (u, s): (f64, f64) = (f[11].parse()?, f[12].parse()?);
    Ok((u + s) / tck())
}

/// The targets, in the namespace: an HTTP server (20 paths) and 20 TCP
/// listeners, each counting what it is sent. They live as long as the
/// namespace's threads: until the process ends or `stop` (and a wake-up).
struct Targets {
    http: SocketAddr,
    tcp: Vec<SocketAddr>,
    http_hits: Arc<AtomicU64>,
    tcp_hits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Targets {
    fn start(ns: &Netns) -> Result<Targets> {
        let stop = Arc::new(AtomicBool::new(false));
        let (http_hits, tcp_hits) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (hits, st) = (http_hits.clone(), stop.clone());
        let http = ns.run(move || -> Result<SocketAddr> {
            let l = TcpListener::bind("127.0.0.1:0")?;
            let a = l.local_addr()?;
            std::thread::spawn(move || {
                for s in l.incoming() {
                    if st.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(s) = s else { continue };
                    let hits = hits.clone();
                    std::thread::spawn(move || {
                        let mut r = BufReader::new(match s.try_clone() {
                            Ok(c) => c,
                            Err(_) => return,
                        });
                        loop {
                            let mut l = String::new();
                            if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                                break;
                            }
                        }
                        hits.fetch_add(1, Ordering::Relaxed);
                        let _ = (&s).write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                        );
                    });
                }
            });
            Ok(a)
        })?;
        let mut tcp = Vec::new();
        for _ in 0..TARGETS {
            let (hits, st) = (tcp_hits.clone(), stop.clone());
            tcp.push(ns.run(move || -> Result<SocketAddr> {
                let l = TcpListener::bind("127.0.0.1:0")?;
                let a = l.local_addr()?;
                std::thread::spawn(move || {
                    for s in l.incoming() {
                        if st.load(Ordering::Relaxed) {
                            break;
                        }
                        if s.is_ok() {
                            hits.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                Ok(a)
            })?);
        }
        Ok(Targets {
            http,
            tcp,
            http_hits,
            tcp_hits,
            stop,
        })
    }

    /// The module's targets as the tools are given them.
    fn of(&self, module: &str) -> Vec<String> {
        if module == "http_2xx" {
            (0..TARGETS)
                .map(|i| format!("http://{}/t{i}", self.http))
                .collect()
        } else {
            self.tcp.iter().map(|a| a.to_string()).collect()
        }
    }

    fn hits(&self, module: &str) -> u64 {
        if module == "http_2xx" {
            self.http_hits.load(Ordering::Relaxed)
        } else {
            self.tcp_hits.load(Ordering::Relaxed)
        }
    }

    fn stop(&self, ns: &Netns) {
        self.stop.store(true, Ordering::Relaxed);
        let all: Vec<SocketAddr> = std::iter::once(self.http)
            .chain(self.tcp.iter().copied())
            .collect();
        ns.run(move || {
            for a in all {
                let _ = std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1));
            }
        });
    }
}

/// Waits (20 s at most) until `GET path` on the namespace's loopback
/// answers 200.
fn wait_http(ns: &Netns, port: u16, path: &str, what: &str, child: &mut Proc) -> Result<()> {
    let started = Instant::now();
    loop {
        let p = path.to_string();
        let ok = ns.run(move || {
            get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), &p).is_ok_and(|(s, _)| s == 200)
        });
        if ok {
            return Ok(());
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            bail!("{what} exited with {status}");
        }
        if started.elapsed() > Duration::from_secs(20) {
            bail!("{what} did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct ModuleResult {
    module: &'static str,
    /// Probes per CPU-second through `/probe`: blackbox, netpulse.
    probe: (f64, f64),
    /// As deployed: blackbox_exporter, Prometheus (CPU-s per s), netpulse.
    bb_deployed: f64,
    prom_cpu_per_s: f64,
    bb_cpu_per_s: f64,
    bb_plus_prom: f64,
    np_deployed: f64,
    np_cpu_per_s: f64,
    rate: (f64, f64),
}

pub fn probe_bench(probes: u32, seconds: u64) -> Result<()> {
    for tool in ["prometheus-blackbox-exporter", "prometheus", "ip"] {
        if !netpulse_tests::netns::have(tool) {
            bail!("{tool} is not installed (cargo xtask setup installs it)");
        }
    }
    let ns = Netns::new(&format!("np-prb-{}", std::process::id()));
    let dir = std::env::temp_dir().join(format!("netpulse-probe-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let targets = Targets::start(&ns)?;
    let result = (|| -> Result<Vec<ModuleResult>> {
        let bb_cfg = dir.join("blackbox.yml");
        // Stock probers; a timeout of their own, which blackbox_exporter
        // takes when Prometheus's scrape timeout (50 ms) leaves nothing
        // after its 0.5 s offset.
        std::fs::write(
            &bb_cfg,
            "modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n  tcp_connect:\n    prober: tcp\n    timeout: 5s\n",
        )?;
        let mut bb = Proc(
            Command::new("ip")
                .args(["netns", "exec", &ns.name, "prometheus-blackbox-exporter"])
                .arg(format!("--config.file={}", bb_cfg.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{BB_PORT}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("blackbox.log"))?)
                .spawn()?,
        );
        wait_http(&ns, BB_PORT, "/", "blackbox_exporter", &mut bb)?;
        let pins = PinDir::mounted("probe-bench");
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            agent_config(NP_PORT, pins.path(), &dir.join("state"), ""),
        )?;
        let mut agent = Agent::start(&ns, &[], &cfg, NP_PORT, &dir.join("agent.log"));
        agent.wait_for("the agent", |m| m.has("netpulse_build_info", &[]));
        let mut out = Vec::new();
        for module in ["http_2xx", "tcp_connect"] {
            let target = targets.of(module)[0].clone();
            let theirs = via_probe(&ns, &targets, module, &target, BB_PORT, bb.pid(), probes)?;
            let ours = via_probe(&ns, &targets, module, &target, NP_PORT, agent.pid(), probes)?;
            let d = deployed_blackbox(&ns, &dir, &targets, module, bb.pid(), seconds)?;
            let s = scheduled(&ns, &dir, &targets, module, seconds)?;
            out.push(ModuleResult {
                module,
                probe: (theirs, ours),
                bb_deployed: d.probes / d.bb_cpu,
                prom_cpu_per_s: d.prom_cpu / d.secs,
                bb_cpu_per_s: d.bb_cpu / d.secs,
                bb_plus_prom: d.probes / (d.bb_cpu + d.prom_cpu),
                np_deployed: s.probes / s.cpu,
                np_cpu_per_s: s.cpu / s.secs,
                rate: (d.probes / d.secs, s.probes / s.secs),
            });
        }
        agent.stop();
        drop(pins);
        Ok(out)
    })();
    targets.stop(&ns);
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;

    println!(
        "\nProbe cost: probes per CPU-second of each tool's whole process (/proc/PID/stat user + system), the same modules and targets, on the loopback of a namespace of the bench's own; probes counted at the targets\n"
    );
    println!(
        "| module | how | blackbox_exporter probes/CPU-s | netpulse probes/CPU-s | netpulse ÷ blackbox | ≥ {TARGET_RATIO}× |"
    );
    println!("|---|---|---:|---:|---:|:-:|");
    let yes = |r: f64| if r >= TARGET_RATIO { "met" } else { "missed" };
    let hz = 1000 / INTERVAL_MS;
    for r in &rows {
        let (b, n) = r.probe;
        println!(
            "| {} | `/probe`: {probes} sequential GETs to each tool (CPU of the exporter / the agent) | {b:.0} | {n:.0} | {:.1}× | {} |",
            r.module,
            n / b,
            yes(n / b)
        );
        println!(
            "| {} | as deployed: {TARGETS} targets × {hz} Hz for {seconds} s; blackbox_exporter scraped by Prometheus, netpulse's scheduled checks (CPU of the exporter / the agent) | {:.0} | {:.0} | {:.1}× | {} |",
            r.module,
            r.bb_deployed,
            r.np_deployed,
            r.np_deployed / r.bb_deployed,
            yes(r.np_deployed / r.bb_deployed)
        );
        println!(
            "| {} | as deployed, blackbox_exporter + Prometheus (both processes' CPU) against the agent | {:.0} | {:.0} | {:.1}× | {} |",
            r.module,
            r.bb_plus_prom,
            r.np_deployed,
            r.np_deployed / r.bb_plus_prom,
            yes(r.np_deployed / r.bb_plus_prom)
        );
    }
    println!("\nAs deployed, CPU per second of wall time (1.0 = one core):\n");
    println!(
        "| module | probes/s blackbox (via Prometheus) | probes/s netpulse | blackbox_exporter | Prometheus (scraping it) | netpulse |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} |",
            r.module, r.rate.0, r.rate.1, r.bb_cpu_per_s, r.prom_cpu_per_s, r.np_cpu_per_s
        );
    }
    Ok(())
}

fn agent_config(port: u16, pins: &Path, state: &Path, extra: &str) -> String {
    format!(
        "[agent]\nlisten = \"127.0.0.1:{port}\"\npin_dir = \"{}\"\nstate_dir = \"{}\"\ninterfaces = [\"lo\"]\ndiscover_sockets = false\n[docker]\nenabled = false\n{extra}",
        pins.display(),
        state.display()
    )
}

/// Probes per CPU-second of process `pid` through its `/probe` on `port`:
/// `probes` sequential GETs from the namespace.
fn via_probe(
    ns: &Netns,
    targets: &Targets,
    module: &'static str,
    target: &str,
    port: u16,
    pid: u32,
    probes: u32,
) -> Result<f64> {
    let path = format!("/probe?module={module}&target={}", urlencode(target));
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // Warm up, and check the probe succeeds.
    let p = path.clone();
    let (s, body) = ns.run(move || get(addr, &p))?;
    if s != 200 || !body.contains("probe_success 1") {
        bail!("{module} {target} on :{port} did not succeed: {body}");
    }
    let (h0, c0) = (targets.hits(module), cpu(pid)?);
    ns.run(move || -> std::io::Result<()> {
        for _ in 0..probes {
            get(addr, &path)?;
        }
        Ok(())
    })?;
    let used = cpu(pid)? - c0;
    let hits = targets.hits(module) - h0;
    if hits != u64::from(probes) {
        bail!("{module} on :{port}: the target saw {hits} probes of {probes}");
    }
    Ok(f64::from(probes) / used.max(1.0 / tck()))
}

struct Deployed {
    probes: f64,
    secs: f64,
    bb_cpu: f64,
    prom_cpu: f64,
}

/// blackbox_exporter as deployed: a Prometheus of the bench's own scrapes
/// its `/probe` for each of the module's targets every 50 ms; CPU of both
/// over `seconds`, after Prometheus has settled.
fn deployed_blackbox(
    ns: &Netns,
    dir: &Path,
    targets: &Targets,
    module: &'static str,
    bb: u32,
    seconds: u64,
) -> Result<Deployed> {
    let pdir = dir.join(format!("prometheus-{module}"));
    std::fs::create_dir_all(&pdir)?;
    let list = targets
        .of(module)
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let cfg = pdir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: {INTERVAL_MS}ms\n  scrape_timeout: {INTERVAL_MS}ms\n  evaluation_interval: 1m\nscrape_configs:\n  - job_name: blackbox\n    metrics_path: /probe\n    params:\n      module: [{module}]\n    static_configs:\n      - targets: [{list}]\n    relabel_configs:\n      - source_labels: [__address__]\n        target_label: __param_target\n      - source_labels: [__param_target]\n        target_label: instance\n      - target_label: __address__\n        replacement: 127.0.0.1:{BB_PORT}\n"
        ),
    )?;
    let mut prom = Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "prometheus"])
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                pdir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{PROM_PORT}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(pdir.join("prometheus.log"))?)
            .spawn()
            .context("starting prometheus")?,
    );
    wait_http(ns, PROM_PORT, "/-/ready", "prometheus", &mut prom)?;
    let query = |q: &str| -> Result<f64> {
        let path = format!("/api/v1/query?query={}", urlencode(q));
        let (s, body) =
            ns.run(move || get(SocketAddr::from((Ipv4Addr::LOCALHOST, PROM_PORT)), &path))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("prometheus answered {s}: {body}"))?;
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|x| x.parse().ok())
            .with_context(|| format!("{q}: {body}"))
    };
    // Every target scraped, and a few seconds for Prometheus to settle.
    let started = Instant::now();
    while query("count(probe_success)").unwrap_or(0.0) < TARGETS as f64 {
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "Prometheus did not scrape blackbox_exporter's {TARGETS} targets; its log:\n{}",
                std::fs::read_to_string(pdir.join("prometheus.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let (h0, b0, p0, t0) = (
        targets.hits(module),
        cpu(bb)?,
        cpu(prom.pid())?,
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(seconds));
    let (h1, b1, p1, secs) = (
        targets.hits(module),
        cpu(bb)?,
        cpu(prom.pid())?,
        t0.elapsed().as_secs_f64(),
    );
    // Every scrape in the window succeeded.
    let window = format!("{seconds}s");
    let failed = query(&format!(
        "sum(count_over_time(probe_success[{window}])) - sum(sum_over_time(probe_success[{window}]))"
    ))?;
    if failed > 0.0 {
        bail!("{failed} of blackbox_exporter's {module} probes failed as Prometheus scraped them");
    }
    drop(prom);
    let _ = std::fs::remove_dir_all(&pdir);
    Ok(Deployed {
        probes: (h1 - h0) as f64,
        secs,
        bb_cpu: (b1 - b0).max(1.0 / tck()),
        prom_cpu: p1 - p0,
    })
}

struct Scheduled {
    probes: f64,
    secs: f64,
    cpu: f64,
}

/// netpulse as deployed: the module's targets as scheduled checks, every
/// 50 ms each; CPU of the agent over `seconds` (its history writes and
/// refreshes included).
fn scheduled(
    ns: &Netns,
    dir: &Path,
    targets: &Targets,
    module: &'static str,
    seconds: u64,
) -> Result<Scheduled> {
    let kind = if module == "http_2xx" { "http" } else { "tcp" };
    let pins = PinDir::mounted("probe-bench-sched");
    let mut checks = String::new();
    for (i, t) in targets.of(module).iter().enumerate() {
        checks.push_str(&format!(
            "[[check]]\nname = \"c{i}\"\nkind = \"{kind}\"\ntarget = \"{t}\"\ninterval_seconds = {}\n",
            INTERVAL_MS as f64 / 1000.0
        ));
    }
    let cfg = dir.join("sched.toml");
    std::fs::write(
        &cfg,
        agent_config(SCHED_PORT, pins.path(), &dir.join("state-sched"), &checks),
    )?;
    let mut a = Agent::start(ns, &[], &cfg, SCHED_PORT, &dir.join("sched.log"));
    let runs = |m: &Metrics| m.sum("netpulse_check_runs_total", &[]);
    a.wait_for("checks running", |m| runs(m) > 100);
    std::thread::sleep(Duration::from_secs(3));
    let m0 = a.metrics().context("metrics")?;
    let (h0, c0, t0) = (targets.hits(module), cpu(a.pid())?, Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let (h1, c1, secs) = (
        targets.hits(module),
        cpu(a.pid())?,
        t0.elapsed().as_secs_f64(),
    );
    let m1 = a.metrics().context("metrics")?;
    let failed = m1.sum("netpulse_check_runs_total", &[("result", "failure")])
        - m0.sum("netpulse_check_runs_total", &[("result", "failure")]);
    if failed > 0 {
        bail!("{failed} scheduled {module} checks failed");
    }
    a.stop();
    drop(pins);
    Ok(Scheduled {
        probes: (h1 - h0) as f64,
        secs,
        cpu: (c1 - c0).max(1.0 / tck()),
    })
}
