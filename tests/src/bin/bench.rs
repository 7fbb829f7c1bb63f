//! `cargo xtask bench`, part by part (`--only` picks some):
//!
//! - `probes`: per-packet cost of the XDP and TC programs, measured by the
//!   kernel (BPF_PROG_TEST_RUN, mean over `--repeat` runs of one frame,
//!   median over `--rounds`), next to empty XDP_PASS / TC_ACT_UNSPEC
//!   programs measured in the same run, at 1, 1,000 and 50,000 endpoints;
//!   then varied frames, one test run each (`varied`). Target (issue 2): at
//!   most 15 ns per packet above the empty program.
//! - `peers`: what counting who talks to whom adds per packet, for a named
//!   peer, an unknown one, and none (`peers`).
//! - `kstats`: the kernel's own run_time_ns / run_cnt of netpulse's TC
//!   programs on live traffic beside an empty TC program (`kstats`).
//! - `http`: /metrics under wrk load while traffic flows (issue 8); then
//!   `/api/v1/services` latency and the agent's RSS with 1,000 configured
//!   services (issue 14: ≤ 20 ms, ≤ 50 MB).
//! - `probe`: probes per CPU-second against blackbox_exporter, through
//!   `/probe` and as deployed (`probe`).
//! - `overhead`: throughput lost on a veth under each watcher (`overhead`).
//! - `tcp`: what the TCP health programs cost (issue 15): ns added per
//!   loopback connection and per packet dropped by nft (`kfree_skb`), with
//!   and without the agent, and each program's bpf_stats share (`tcp`).
//! - `analyze`: `netpulse analyze` against a bare libpcap read loop, `cat`,
//!   capinfos and tshark, on a synthetic file and on real traffic captured
//!   here (`analyze`, `traffic`).

use std::{collections::BTreeMap, time::Duration};

use agent_ebpf::{
    EndpointKey, FAMILY_V4, FAMILY_V6, FIRST_SERVICE_SLOT, PROTO_TCP, PROTO_UDP, ROLE_LOCAL,
    programs,
};
use anyhow::{Context as _, Result, bail};
use aya::{
    EbpfLoader,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use clap::Parser;
use netpulse::probe::{Hook, Probe};
use netpulse_tests::frames::{self, eth, ipv4, ipv6, tcp, udp, v6};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of wrk load on /metrics.
    #[arg(long, default_value_t = 10)]
    http_seconds: u32,
    /// Sequential /probe requests per tool and module.
    #[arg(long, default_value_t = 2000)]
    probes: u32,
    /// Seconds each tool probes as deployed (20 targets at 20 Hz).
    #[arg(long, default_value_t = 10)]
    deployed_seconds: u64,
    /// Frames per batch of the varied-frames table (one test run each).
    #[arg(long, default_value_t = 20_000)]
    batch: usize,
    /// Seconds per round and kind of traffic of the live bpf_stats table.
    #[arg(long, default_value_t = 5)]
    kstats_seconds: u64,
    /// Seconds per round of the live-overhead blast.
    #[arg(long, default_value_t = 4)]
    overhead_seconds: u64,
    /// Packets in the file `netpulse analyze` reads against tcpdump and tshark.
    #[arg(long, default_value_t = 1_000_000)]
    analyze_packets: u64,
    /// MB of the bulk TCP transfer in the analyze benchmark's real
    /// traffic (besides 5,000 pings, 20,000 DNS queries, 3,000 HTTP GETs).
    #[arg(long, default_value_t = 200)]
    real_bulk_mb: u64,
    /// Sequential loopback connections per round and condition of the
    /// `tcp` part.
    #[arg(long, default_value_t = 20_000)]
    conns: u64,
    /// UDP datagrams dropped by nft per round, condition and hook of the
    /// `tcp` part.
    #[arg(long, default_value_t = 1_000_000)]
    drops: u64,
    /// Run only these parts (comma-separated: probes, kstats, http, probe,
    /// overhead, tcp, analyze); `analyze` alone runs without root, on the
    /// synthetic file only.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write the analyze benchmark's capture file here and stop (to
    /// profile or compare by hand).
    #[arg(long)]
    write_pcap: Option<std::path::PathBuf>,
    /// Internal: the bare libpcap read loop the analyze benchmark times
    /// (`pcap_next_ex` over FILE, nothing else).
    #[arg(long, hide = true)]
    pcap_loop: Option<std::path::PathBuf>,
    /// Internal: the loop's stdio buffer in bytes (0: libpcap's own open).
    #[arg(long, hide = true, default_value_t = 1 << 20)]
    pcap_loop_buffer: usize,
}

const PARTS: [&str; 8] = [
    "probes", "peers", "kstats", "http", "probe", "overhead", "tcp", "analyze",
];

#[path = "bench/overhead.rs"]
mod overhead;

#[path = "bench/analyze.rs"]
mod analyze;

#[path = "bench/traffic.rs"]
mod traffic;

#[path = "bench/varied.rs"]
mod varied;

#[path = "bench/kstats.rs"]
mod kstats;

#[path = "bench/probe.rs"]
mod probe;

#[path = "bench/tcp.rs"]
mod tcp;

#[path = "bench/peers.rs"]
mod peers;

const TARGET_NS: f64 = 15.0;

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    /// The endpoint the frame's destination (XDP) / source (TC) hits.
    key: EndpointKey,
}

fn key(family: u8, proto: u8, addr: &[u8], port: u16) -> EndpointKey {
    let mut k = EndpointKey {
        family,
        proto,
        port,
        role: ROLE_LOCAL,
        ..Default::default()
    };
    k.set_addr(addr);
    k
}

/// The same frame serves both hooks: XDP matches its destination, TC its
/// source, so each frame has the same address and port at both ends.
fn cases() -> Vec<Case> {
    let a4 = [10, 0, 0, 1];
    let a6 = v6(1);
    let tcp4 = |vlans: &[u16], port| {
        eth(
            vlans,
            frames::ETH_IPV4,
            &ipv4(
                a4,
                a4,
                PROTO_TCP,
                0,
                0,
                &tcp(port, port, frames::TCP_ACK, 5, 64),
            ),
        )
    };
    vec![
        Case {
            name: "IPv4/TCP → *:80",
            frame: tcp4(&[], 80),
            key: key(FAMILY_V4, PROTO_TCP, &[], 80),
        },
        Case {
            name: "IPv4/TCP → 10.0.0.1:80",
            frame: tcp4(&[], 80),
            key: key(FAMILY_V4, PROTO_TCP, &a4, 80),
        },
        Case {
            name: "IPv6/UDP → [fd00::1]:53",
            frame: eth(
                &[],
                frames::ETH_IPV6,
                &ipv6(a6, a6, &[], PROTO_UDP, &udp(53, 53, 64)),
            ),
            key: key(FAMILY_V6, PROTO_UDP, &a6, 53),
        },
        Case {
            name: "VLAN/IPv4/TCP → *:443",
            frame: tcp4(&[frames::ETH_8021Q], 443),
            key: key(FAMILY_V4, PROTO_TCP, &[], 443),
        },
    ]
}

/// Deterministic address-specific endpoints (xorshift) on other ports than
/// the case's, so each row measures the path its name says.
fn filler(n: usize, case: &EndpointKey) -> Vec<EndpointKey> {
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let r = next();
        let v6 = r & 1 == 1;
        let a = next().to_be_bytes();
        let k = key(
            if v6 { FAMILY_V6 } else { FAMILY_V4 },
            if r & 2 == 0 { PROTO_TCP } else { PROTO_UDP },
            if v6 { &a[..] } else { &a[..4] },
            (r >> 8) as u16 | 1,
        );
        if (k.family, k.proto, k.port) != (case.family, case.proto, case.port) {
            out.push(k);
        }
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// One BPF_PROG_TEST_RUN of the empty program `name` of `base` on
/// `frame`, `repeat` times: the kernel's mean ns per run.
fn run_base(base: &mut aya::Ebpf, name: &str, frame: &[u8], repeat: u32) -> Result<f64> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.repeat = repeat;
    let r = match base.program_mut(name).context("program")? {
        aya::programs::Program::Xdp(p) => p.test_run(opts)?,
        aya::programs::Program::SchedClassifier(p) => p.test_run(opts)?,
        _ => bail!("unexpected program type for {name}"),
    };
    Ok(ns(r.duration))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(file) = &args.pcap_loop {
        let n = analyze::pcap_loop(file, args.pcap_loop_buffer)?;
        println!("{n}");
        return Ok(());
    }
    if let Some(path) = &args.write_pcap {
        analyze::generate(path, args.analyze_packets)?;
        return Ok(());
    }
    if let Some(p) = args.only.iter().find(|p| !PARTS.contains(&p.as_str())) {
        bail!("--only {p}: no such part (parts: {})", PARTS.join(", "));
    }
    let real = traffic::Mix {
        pings: 5_000,
        dns_queries: 20_000,
        http_gets: 3_000,
        bulk_mb: args.real_bulk_mb,
    };
    let real = netpulse_tests::is_root().then_some(&real);
    if args.only == ["analyze"] {
        return analyze::run(
            &netpulse_tests::agent::bin(),
            args.analyze_packets,
            args.rounds,
            real,
        );
    }
    let object = netpulse::probe::object();
    if object.is_empty() {
        bail!("netpulse was built with AYA_BUILD_SKIP=1: no eBPF object to measure");
    }
    let part = |p: &str| args.only.is_empty() || args.only.iter().any(|o| o == p);
    if part("probes") {
        let pin =
            std::path::PathBuf::from(format!("/sys/fs/bpf/netpulse-bench-{}", std::process::id()));
        let result = bench(&args, object, &pin);
        let _ = std::fs::remove_dir_all(&pin);
        result?;
    }
    if part("peers") {
        let pin = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/netpulse-bench-peers-{}",
            std::process::id()
        ));
        let result = peers::run(object, &pin, args.rounds, args.repeat);
        let _ = std::fs::remove_dir_all(&pin);
        result?;
    }
    if part("http") {
        http_load(args.http_seconds)?;
        api_at_scale()?;
    }
    if part("kstats") {
        kstats::live_cost(args.kstats_seconds, args.rounds)?;
    }
    if part("probe") {
        probe::probe_bench(args.probes, args.deployed_seconds)?;
    }
    if part("overhead") {
        overhead::overhead(args.overhead_seconds, args.rounds.min(5), true)?;
    }
    if part("tcp") {
        tcp::run(args.conns, args.drops, args.rounds)?;
    }
    if part("analyze") {
        analyze::run(
            &netpulse_tests::agent::bin(),
            args.analyze_packets,
            args.rounds,
            real,
        )?;
    }
    Ok(())
}

/// The empty programs of `object`, loaded (their maps pinned apart, under
/// `pin`/baseline).
fn load_baseline(object: &[u8], pin: &std::path::Path) -> Result<aya::Ebpf> {
    let base_pin = pin.join("baseline");
    std::fs::create_dir_all(&base_pin)?;
    let mut base = EbpfLoader::new()
        .default_map_pin_directory(&base_pin)
        .load(object)?;
    let p: &mut Xdp = base
        .program_mut(programs::BASELINE_XDP)
        .context("baseline xdp")?
        .try_into()?;
    p.load()?;
    let p: &mut SchedClassifier = base
        .program_mut(programs::BASELINE_TC)
        .context("baseline tc")?
        .try_into()?;
    p.load()?;
    Ok(base)
}

fn bench(args: &Args, object: &[u8], pin: &std::path::Path) -> Result<()> {
    // The programs as the agent loads them, and the table written by the
    // agent's own code; the empty programs from the same object, beside.
    let mut probe = Probe::load(pin).context("loading the probes")?;
    let mut base = load_baseline(object, pin)?;
    let repeat = args.repeat;
    let mut baseline =
        |name: &str, frame: &[u8]| -> Result<f64> { run_base(&mut base, name, frame, repeat) };

    println!(
        "netpulse per-packet cost, BPF_PROG_TEST_RUN, {} repeats, median of {} rounds (ns/packet)\n",
        args.repeat, args.rounds
    );
    println!(
        "| frame → service | endpoints | XDP | empty XDP | XDP Δ | TC | empty TC | TC Δ | Δ ≤ {TARGET_NS} ns |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|:-:|");
    let mut worst: f64 = 0.0;
    for case in cases() {
        for n in [1usize, 1_000, 50_000] {
            let mut table = BTreeMap::from([(case.key, FIRST_SERVICE_SLOT)]);
            for (i, k) in filler(n - 1, &case.key).into_iter().enumerate() {
                table.insert(k, FIRST_SERVICE_SLOT + 1 + (i as u32 % 1000));
            }
            probe.sync_table(table)?;
            // Check the row measures a hit, not a miss.
            let before = probe.counts(FIRST_SERVICE_SLOT)?;
            probe.test_run(Hook::Xdp, &case.frame, 0, 1)?;
            if probe.counts(FIRST_SERVICE_SLOT)?.dir[0].packets != before.dir[0].packets + 1 {
                bail!("{}: the frame did not hit its service", case.name);
            }
            let mut cols = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
            for _ in 0..args.rounds {
                cols[0].push(ns(probe
                    .test_run(Hook::Xdp, &case.frame, 0, args.repeat)?
                    .1));
                cols[1].push(baseline(programs::BASELINE_XDP, &case.frame)?);
                cols[2].push(ns(probe.test_run(Hook::Tc, &case.frame, 0, args.repeat)?.1));
                cols[3].push(baseline(programs::BASELINE_TC, &case.frame)?);
            }
            let [x, xb, t, tb] = cols.map(median);
            let (dx, dt) = (x - xb, t - tb);
            worst = worst.max(dx).max(dt);
            let ok = if dx <= TARGET_NS && dt <= TARGET_NS {
                "yes"
            } else {
                "no"
            };
            println!(
                "| {} | {n} | {x:.1} | {xb:.1} | {dx:.1} | {t:.1} | {tb:.1} | {dt:.1} | {ok} |",
                case.name
            );
        }
    }
    probe.sync_table(BTreeMap::new())?;

    // Container veths: TC both ways, the container found by its address.
    println!(
        "\n| frame on a container veth | containers | TC in (from it) | TC out (to it) | empty TC | from Δ | to Δ | Δ ≤ {TARGET_NS} ns |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|:-:|");
    let (ct4, peer4) = ([172u8, 17, 0, 2], [192u8, 0, 2, 7]);
    let to_ct = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(
            peer4,
            ct4,
            PROTO_TCP,
            0,
            0,
            &tcp(40000, 80, frames::TCP_ACK, 5, 64),
        ),
    );
    let from_ct = eth(
        &[],
        frames::ETH_IPV4,
        &ipv4(
            ct4,
            peer4,
            PROTO_TCP,
            0,
            0,
            &tcp(80, 40000, frames::TCP_ACK, 5, 64),
        ),
    );
    for (by, n) in [
        ("address", 1u32),
        ("address", 1_000),
        ("address", 16_000),
        ("veth", 16_000),
    ] {
        // By veth: the container behind the test run's device (lo, 1).
        let veths = if by == "veth" {
            BTreeMap::from([(1u32, FIRST_SERVICE_SLOT)])
        } else {
            BTreeMap::new()
        };
        probe.sync_veths(&veths)?;
        let mut addrs = BTreeMap::from([(std::net::IpAddr::from(ct4), FIRST_SERVICE_SLOT)]);
        for i in 1..n {
            let b = (i + 10_000).to_be_bytes();
            addrs.insert(
                std::net::IpAddr::from([10, b[1], b[2], b[3]]),
                FIRST_SERVICE_SLOT + 1 + (i % 1000),
            );
        }
        probe.sync_addrs(&addrs)?;
        let before = probe.counts(FIRST_SERVICE_SLOT)?;
        probe.test_run(Hook::CtTo, &to_ct, 0, 1)?;
        if probe.counts(FIRST_SERVICE_SLOT)?.dir[0].packets != before.dir[0].packets + 1 {
            bail!("the frame to the container did not hit it");
        }
        let mut cols = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..args.rounds {
            cols[0].push(ns(probe
                .test_run(Hook::CtFrom, &from_ct, 0, args.repeat)?
                .1));
            cols[1].push(ns(probe.test_run(Hook::CtTo, &to_ct, 0, args.repeat)?.1));
            cols[2].push(baseline(programs::BASELINE_TC, &to_ct)?);
        }
        let [f, t, b] = cols.map(median);
        let (df, dt) = (f - b, t - b);
        worst = worst.max(df).max(dt);
        let ok = if df <= TARGET_NS && dt <= TARGET_NS {
            "yes"
        } else {
            "no"
        };
        println!(
            "| IPv4/TCP, container 172.17.0.2, by {by} | {n} | {f:.1} | {t:.1} | {b:.1} | {df:.1} | {dt:.1} | {ok} |"
        );
    }
    probe.sync_addrs(&BTreeMap::new())?;
    probe.sync_veths(&BTreeMap::new())?;
    worst = worst.max(varied::run(&mut probe, &mut base, args.rounds, args.batch)?);
    println!(
        "\nworst Δ: {worst:.1} ns/packet (target ≤ {TARGET_NS} ns; 10 GbE line rate leaves 67.2 ns per packet)"
    );
    Ok(())
}

/// `/metrics` under load: wrk against an agent with 40 services while
/// traffic flows to them, both in network namespaces of our own.
fn http_load(seconds: u32) -> Result<()> {
    use netpulse_tests::{PinDir, agent::Agent, netns::Pair};
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let pair = Pair::new("bench", 102);
    let pins = PinDir::mounted("bench");
    let dir = std::env::temp_dir().join(format!("netpulse-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = 19488;
    let mut text = format!(
        "[agent]\nlisten = \"127.0.0.1:{port}\"\npin_dir = \"{}\"\n",
        pins.path().display()
    );
    for i in 0..40u16 {
        text += &format!(
            "\n[[service]]\nname = \"svc{i}\"\nendpoints = [{{ proto = \"udp\", port = {} }}]\n",
            8000 + i
        );
    }
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, text)?;
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &dir.join("agent.log"));
    agent.wait_for("the agent", |m| m.has("netpulse_probe_attached", &[]));
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, to) = (stop.clone(), pair.addr_a);
    let traffic = pair.b.spawn(move || {
        let Ok(u) = std::net::UdpSocket::bind("0.0.0.0:0") else {
            return;
        };
        let mut i = 0u16;
        while !stop2.load(Ordering::Relaxed) {
            let _ = u.send_to(&[0u8; 64], (to, 8000 + i % 40));
            i = i.wrapping_add(1);
            if i.is_multiple_of(64) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
    let wrk = |path: &str| {
        pair.a.exec(
            "wrk",
            &[
                "-t2",
                "-c16",
                &format!("-d{seconds}s"),
                "--latency",
                &format!("http://127.0.0.1:{port}{path}"),
            ],
        )
    };
    // The history ring needs a sample or two for the API's rates.
    std::thread::sleep(Duration::from_secs(6));
    let runs: Vec<(&str, std::process::Output)> = ["/metrics", "/api/v1/services"]
        .into_iter()
        .map(|p| (p, wrk(p)))
        .collect();
    stop.store(true, Ordering::Relaxed);
    let _ = traffic.join();
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\nHTTP under load: wrk -t2 -c16 -d{seconds}s per endpoint, 40 services, UDP traffic flowing\n"
    );
    println!("| endpoint | requests/s | p50 | p90 | p99 | errors |");
    println!("|---|---:|---:|---:|---:|---|");
    for (path, out) in runs {
        let report = String::from_utf8_lossy(&out.stdout);
        let field = |key: &str| {
            report
                .lines()
                .map(str::trim_start)
                .find(|l| l.starts_with(key))
                .and_then(|l| l[key.len()..].split_whitespace().next())
                .unwrap_or("-")
                .to_string()
        };
        let errors = report
            .lines()
            .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("; ");
        println!(
            "| `{path}` | {} | {} | {} | {} | {} |",
            field("Requests/sec:"),
            field("50%"),
            field("90%"),
            field("99%"),
            if errors.is_empty() {
                "none".to_string()
            } else {
                errors
            }
        );
    }
    Ok(())
}

/// Services configured in the API-at-scale benchmark.
const API_SERVICES: u16 = 1000;
/// Sequential requests per endpoint there.
const API_REQUESTS: usize = 40;

/// `/api/v1/services` and the agent's memory with 1,000 configured
/// services (issue 14: ≤ 20 ms, ≤ 50 MB RSS): the median of 40 sequential
/// GETs, then the RSS after 40 sequential GETs of `/metrics` and of
/// `/api/v1/services`.
fn api_at_scale() -> Result<()> {
    use netpulse_tests::{PinDir, agent::Agent, netns::Pair};
    let pair = Pair::new("bapi", 103);
    let pins = PinDir::mounted("bapi");
    let dir = std::env::temp_dir().join(format!("netpulse-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = 19489;
    let mut text = format!(
        "[agent]\nlisten = \"127.0.0.1:{port}\"\npin_dir = \"{}\"\nstate_dir = \"{}\"\n\n[docker]\nenabled = false\n",
        pins.path().display(),
        dir.join("state").display()
    );
    for i in 0..API_SERVICES {
        text += &format!(
            "\n[[service]]\nname = \"svc{i}\"\nendpoints = [{{ proto = \"tcp\", port = {} }}]\n",
            20000 + i
        );
    }
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, text)?;
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &dir.join("agent.log"));
    agent.wait_for("the agent", |m| m.has("netpulse_probe_attached", &[]));
    // The history ring needs a sample or two for the API's rates.
    std::thread::sleep(Duration::from_secs(6));
    let idle_kb = rss_kb(agent.pid());
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let timed = move |path: &'static str| {
        (0..API_REQUESTS)
            .map(|_| timed_get(addr, path).map(|(d, bytes)| (d.as_secs_f64() * 1e3, bytes)))
            .collect::<Result<Vec<_>>>()
    };
    let services = pair.a.run(move || timed("/api/v1/services"))?;
    let metrics = pair.a.run(move || timed("/metrics"))?;
    let again = pair.a.run(move || timed("/api/v1/services"))?;
    let after_kb = rss_kb(agent.pid());
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let ms = |v: &[(f64, usize)]| median(v.iter().map(|x| x.0).collect());
    println!(
        "\n/api/v1 at scale: {API_SERVICES} configured TCP services, {API_REQUESTS} sequential GETs each (a new connection each)\n"
    );
    println!("| measure | value | target |");
    println!("|---|---:|---:|");
    println!(
        "| `/api/v1/services` median ({} kB) | {:.1} ms | ≤ 20 ms |",
        services.first().map_or(0, |x| x.1) / 1000,
        ms(&services)
    );
    println!(
        "| `/metrics` median ({} kB) | {:.1} ms | |",
        metrics.first().map_or(0, |x| x.1) / 1000,
        ms(&metrics)
    );
    println!(
        "| `/api/v1/services` median, after `/metrics` | {:.1} ms | |",
        ms(&again)
    );
    println!(
        "| agent RSS before the requests | {:.1} MB | |",
        idle_kb as f64 / 1024.0
    );
    println!(
        "| agent RSS after them | {:.1} MB | ≤ 50 MB |",
        after_kb as f64 / 1024.0
    );
    Ok(())
}

/// One GET on a new connection, read to the end: (time, body bytes).
fn timed_get(addr: std::net::SocketAddr, path: &str) -> Result<(Duration, usize)> {
    use std::io::{Read, Write};
    let start = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::with_capacity(1 << 20);
    s.read_to_end(&mut raw)?;
    let took = start.elapsed();
    if !raw.starts_with(b"HTTP/1.1 200") {
        bail!(
            "GET {path}: {}",
            String::from_utf8_lossy(&raw[..raw.len().min(200)])
        );
    }
    let head = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |i| i + 4);
    Ok((took, raw.len() - head))
}

/// The resident set of process `pid`, in kB (VmRSS).
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
