//! `tcp`: what the TCP health programs (issue 15) cost, in one network
//! namespace of the bench's own, on its loopback, with and without a
//! `netpulse run --backend ebpf` agent there (TC on `lo`, the tracing
//! programs system-wide), in paired rounds whose order alternates:
//!
//! - per connection: `--conns` sequential connect / accept / close to a
//!   listener on 127.0.0.1 (ebpf_exporter's benchmark style). The server
//!   closes first; the client reads the EOF, then closes: the whole life of
//!   a connection, 7 packets, inside the loop. Target: ≤ 1 µs added per
//!   connection.
//! - per dropped packet (the `kfree_skb` program): `--drops` 64-byte UDP
//!   datagrams, one `send` each, dropped by an nft rule, once in the output
//!   hook (before `lo`: of netpulse's programs only `kfree_skb` runs) and
//!   once in the input hook (after `lo`: TC both ways, then `kfree_skb`).
//!
//! The timed loops run with BPF run-time statistics off (they cost two
//! clock reads per program run). In each agent round a second pass of the
//! same loops runs with them on (BPF_ENABLE_STATS), and the run_time_ns /
//! run_cnt of the programs the agent holds (their ids from its
//! /proc/PID/fdinfo) give each program's share.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use agent_ebpf::programs;
use anyhow::{Context as _, Result, bail};
use netpulse_tests::{
    PinDir,
    agent::Agent,
    netns::{Netns, run_in},
    scrape::Metrics,
};

const AGENT_PORT: u16 = 19580;
const CONN_PORT: u16 = 7100;
const DROP_OUT_PORT: u16 = 7101;
const DROP_IN_PORT: u16 = 7102;
const TARGET_CONN_NS: f64 = 1000.0;

/// The packet programs and the tracing programs, by their full names.
pub const PACKET_PROGRAMS: [&str; 5] = [
    programs::XDP_INGRESS,
    programs::TC_EGRESS,
    programs::TC_INGRESS,
    programs::CT_FROM,
    programs::CT_TO,
];
pub const TRACING_PROGRAMS: [&str; 8] = [
    programs::SOCK_STATE,
    programs::DESTROY_SOCK,
    programs::RECEIVE_RESET,
    programs::SEND_RESET,
    programs::RETRANSMIT,
    programs::RETRANSMIT_SYNACK,
    programs::TCP_PROBE,
    programs::KFREE_SKB,
];

/// run_time_ns and run_cnt, summed over the programs of one name.
#[derive(Clone, Copy, Default, Debug)]
pub struct Stat {
    pub ns: u64,
    pub cnt: u64,
}

impl std::ops::Sub for Stat {
    type Output = Stat;
    fn sub(self, o: Stat) -> Stat {
        Stat {
            ns: self.ns.saturating_sub(o.ns),
            cnt: self.cnt.saturating_sub(o.cnt),
        }
    }
}

/// The ids of the BPF programs process `pid` holds: its program fds and
/// the programs of its link fds (`prog_id:` in /proc/PID/fdinfo).
pub fn held_programs(pid: u32) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        for l in text.lines() {
            if let Some(id) = l
                .strip_prefix("prog_id:")
                .and_then(|v| v.trim().parse().ok())
            {
                ids.insert(id);
            }
        }
    }
    ids
}

/// The object's name for a kernel program name (which keeps 15 bytes):
/// `netpulse_retransmit` and `netpulse_retransmit_synack` share one.
pub fn full_name(kernel: &str) -> Option<String> {
    let all = PACKET_PROGRAMS.iter().chain(TRACING_PROGRAMS.iter());
    let hits: Vec<&str> = all
        .filter(|f| {
            if f.len() <= 15 {
                **f == kernel
            } else {
                f.starts_with(kernel) && kernel.len() == 15
            }
        })
        .copied()
        .collect();
    (!hits.is_empty()).then(|| hits.join(" + "))
}

pub fn is_tracing(name: &str) -> bool {
    name.split(" + ").all(|n| TRACING_PROGRAMS.contains(&n))
}

/// Cumulative run-time statistics of the programs with these ids, by
/// (full) name.
pub fn prog_stats(ids: &BTreeSet<u32>) -> Result<BTreeMap<String, Stat>> {
    let mut out: BTreeMap<String, Stat> = BTreeMap::new();
    for p in aya::programs::loaded_programs() {
        let Ok(p) = p else { continue };
        if !ids.contains(&p.id()) {
            continue;
        }
        let kernel = p.name_as_str().unwrap_or("");
        let Some(name) = full_name(kernel) else {
            continue;
        };
        let s = out.entry(name).or_default();
        s.ns += p.run_time().as_nanos() as u64;
        s.cnt += p.run_count();
    }
    Ok(out)
}

/// Tracing programs named like netpulse's that `ours` does not hold: other
/// agents on this machine, whose programs run on this bench's events too.
pub fn foreign_tracing(ours: &BTreeSet<u32>) -> usize {
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| {
            !ours.contains(&p.id())
                && p.name_as_str()
                    .and_then(full_name)
                    .is_some_and(|n| is_tracing(&n))
        })
        .count()
}

/// Accepts connections on `addr` in `ns` and closes each at once, until
/// dropped.
pub struct Acceptor {
    stop: Arc<AtomicBool>,
    ns: String,
    addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Acceptor {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<Acceptor> {
        let listener = ns.run(move || TcpListener::bind(addr))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = ns.spawn(move || {
            for c in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                drop(c);
            }
        });
        Ok(Acceptor {
            stop,
            ns: ns.name.clone(),
            addr,
            thread: Some(thread),
        })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let addr = self.addr;
        let _ = run_in(&self.ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        });
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection's life: connect, the server's close (read to EOF), close.
pub fn one_connection(to: SocketAddr) -> std::io::Result<()> {
    let mut c = TcpStream::connect(to)?;
    let mut b = [0u8; 1];
    while c.read(&mut b)? > 0 {}
    Ok(())
}

/// `n` connections back to back (in the calling thread's namespace).
fn connections(to: SocketAddr, n: u64) -> Result<Duration> {
    let t0 = Instant::now();
    for _ in 0..n {
        one_connection(to).context("a connection of the loop")?;
    }
    Ok(t0.elapsed())
}

/// `n` 64-byte datagrams to `to`, one `send` each; a send refused by the
/// output hook's drop (EPERM) counts as sent.
fn datagrams(to: SocketAddr, n: u64) -> Result<Duration> {
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    s.connect(to)?;
    let payload = [0x5au8; 64];
    let t0 = Instant::now();
    for _ in 0..n {
        let _ = s.send(&payload);
    }
    Ok(t0.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The packets an nft chain's one counter rule has seen.
fn nft_packets(ns: &Netns, chain: &str) -> Result<u64> {
    let out = ns.exec("nft", &["list", "chain", "inet", "npbench", chain]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no counter in nft chain {chain}: {text}"))
}

/// What one condition of a round measured: ns per connection, per
/// output-hook drop, per input-hook drop.
#[derive(Default)]
struct Timed {
    conn: Vec<f64>,
    drop_out: Vec<f64>,
    drop_in: Vec<f64>,
}

/// The loops, timed, in namespace `ns`.
fn timed(ns: &Netns, conns: u64, drops: u64, t: &mut Timed) -> Result<()> {
    let lo = Ipv4Addr::LOCALHOST;
    let d = ns.run(move || connections(SocketAddr::from((lo, CONN_PORT)), conns))?;
    t.conn.push(d.as_nanos() as f64 / conns as f64);
    for (port, v) in [
        (DROP_OUT_PORT, &mut t.drop_out),
        (DROP_IN_PORT, &mut t.drop_in),
    ] {
        let d = ns.run(move || datagrams(SocketAddr::from((lo, port)), drops))?;
        v.push(d.as_nanos() as f64 / drops as f64);
    }
    Ok(())
}

/// bpf_stats of the agent's programs over each loop: name → delta.
type Deltas = BTreeMap<String, Stat>;

fn delta(a: &BTreeMap<String, Stat>, b: &BTreeMap<String, Stat>) -> Deltas {
    b.iter()
        .map(|(k, v)| (k.clone(), *v - a.get(k).copied().unwrap_or_default()))
        .collect()
}

struct Stats {
    conn: Vec<Deltas>,
    drop_out: Vec<Deltas>,
    drop_in: Vec<Deltas>,
}

/// The same loops with run-time statistics on: each program's delta.
fn with_stats(
    ns: &Netns,
    ids: &BTreeSet<u32>,
    conns: u64,
    drops: u64,
    s: &mut Stats,
) -> Result<()> {
    let lo = Ipv4Addr::LOCALHOST;
    let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("BPF_ENABLE_STATS (run-time statistics)")?;
    let a = prog_stats(ids)?;
    ns.run(move || connections(SocketAddr::from((lo, CONN_PORT)), conns))?;
    let b = prog_stats(ids)?;
    ns.run(move || datagrams(SocketAddr::from((lo, DROP_OUT_PORT)), drops))?;
    let c = prog_stats(ids)?;
    ns.run(move || datagrams(SocketAddr::from((lo, DROP_IN_PORT)), drops))?;
    let d = prog_stats(ids)?;
    drop(fd);
    s.conn.push(delta(&a, &b));
    s.drop_out.push(delta(&b, &c));
    s.drop_in.push(delta(&c, &d));
    Ok(())
}

/// Polls the agent until `ready` (20 s at most).
fn settle(agent: &Agent, what: &str, ready: impl Fn(&Metrics) -> bool) -> Result<Metrics> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(m) = agent.metrics()
            && ready(&m)
        {
            return Ok(m);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}; log:\n{}", agent.log_text());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn closed(m: &Metrics) -> u64 {
    m.sum(
        "netpulse_service_tcp_connections_total",
        &[
            ("service", "loop"),
            ("side", "server"),
            ("result", "closed"),
        ],
    )
}

/// The loop service's connections counted under a result other than
/// closed (server side).
fn other_results(m: &Metrics) -> u64 {
    m.sum(
        "netpulse_service_tcp_connections_total",
        &[("service", "loop"), ("side", "server")],
    ) - m.sum(
        "netpulse_service_tcp_connections_total",
        &[
            ("service", "loop"),
            ("side", "server"),
            ("result", "closed"),
        ],
    ) - m.sum(
        "netpulse_service_tcp_connections_total",
        &[
            ("service", "loop"),
            ("side", "server"),
            ("result", "established"),
        ],
    )
}

fn dropped(m: &Metrics, service: &str) -> u64 {
    m.sum(
        "netpulse_service_kernel_drops_total",
        &[("service", service)],
    )
}

pub fn run(conns: u64, drops: u64, rounds: usize) -> Result<()> {
    if !netpulse_tests::netns::have("nft") {
        bail!("the tcp benchmark drops packets with nft: install nftables");
    }
    let ns = Netns::new(&format!("np-tcpb-{}", std::process::id()));
    let dir = std::env::temp_dir().join(format!("netpulse-tcpb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = run_in_ns(&ns, &dir, conns, drops, rounds);
    // The table goes with the namespace; the rest here.
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in_ns(
    ns: &Netns,
    dir: &std::path::Path,
    conns: u64,
    drops: u64,
    rounds: usize,
) -> Result<()> {
    // 20,000 connections a round leave as many server sockets in
    // TIME_WAIT: the whole port range, and reuse of loopback ports.
    ns.exec(
        "sysctl",
        &["-q", "-w", "net.ipv4.ip_local_port_range=1024 65535"],
    );
    ns.exec("sysctl", &["-q", "-w", "net.ipv4.tcp_tw_reuse=1"]);
    let nft = |args: &str| ns.exec("nft", &args.split(' ').collect::<Vec<_>>());
    nft("add table inet npbench");
    nft("add chain inet npbench out { type filter hook output priority 0 ; }");
    nft("add chain inet npbench in { type filter hook input priority 0 ; }");
    nft(&format!(
        "add rule inet npbench out udp dport {DROP_OUT_PORT} counter drop"
    ));
    nft(&format!(
        "add rule inet npbench in udp dport {DROP_IN_PORT} counter drop"
    ));
    let _acceptor = Acceptor::start(ns, SocketAddr::from((Ipv4Addr::LOCALHOST, CONN_PORT)))?;

    let cfg = dir.join("config.toml");
    let (mut without, mut with) = (Timed::default(), Timed::default());
    let mut stats = Stats {
        conn: Vec::new(),
        drop_out: Vec::new(),
        drop_in: Vec::new(),
    };
    let mut foreign = 0usize;
    let mut other = 0u64;
    let (mut counted_conns, mut counted_drops) = (f64::INFINITY, f64::INFINITY);
    // A warm-up, not counted: the first connections fill caches and the
    // TIME_WAIT table.
    timed(ns, conns / 4, drops / 10, &mut Timed::default())?;
    for r in 0..rounds {
        // Alternate which goes first: drift in the machine's load falls on
        // both.
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for agent_on in order {
            if !agent_on {
                foreign = foreign.max(foreign_tracing(&BTreeSet::new()));
                timed(ns, conns, drops, &mut without)?;
                continue;
            }
            let pins = PinDir::mounted("tcpb");
            std::fs::write(
                &cfg,
                format!(
                    "[agent]\nlisten = \"127.0.0.1:{AGENT_PORT}\"\npin_dir = \"{}\"\ndiscover_sockets = false\nstate_dir = \"{}\"\ninterfaces = [\"lo\"]\n\n[docker]\nenabled = false\n\n[[service]]\nname = \"loop\"\nendpoints = [{{ proto = \"tcp\", port = {CONN_PORT} }}]\n\n[[service]]\nname = \"drop_out\"\nendpoints = [{{ proto = \"udp\", port = {DROP_OUT_PORT} }}]\n\n[[service]]\nname = \"drop_in\"\nendpoints = [{{ proto = \"udp\", port = {DROP_IN_PORT} }}]\n",
                    pins.path().display(),
                    dir.join("state").display()
                ),
            )?;
            let mut agent = Agent::start(ns, &[], &cfg, AGENT_PORT, &dir.join("agent.log"));
            let m = agent.wait_for("netpulse on lo with TCP health", |m| {
                m.has("netpulse_probe_attached", &[("interface", "lo")])
                    && ["tcp_connections", "kernel_drops"].iter().all(|f| {
                        m.value("netpulse_feature_enabled", &[("feature", f)]) == Some(1.0)
                    })
            });
            if m.sum("netpulse_backend_info", &[("backend", "ebpf")]) != 1 {
                bail!("the agent does not count with eBPF");
            }
            let ids = held_programs(agent.pid());
            foreign = foreign.max(foreign_tracing(&ids));
            let before = m;
            timed(ns, conns, drops, &mut with)?;
            // The programs attributed and counted what the loops did.
            let after = settle(&agent, "the loop's connections and drops counted", |m| {
                // All but one in a thousand: a connection's end may be
                // counted under another result (see `other`).
                closed(m) + conns / 1000 >= closed(&before) + conns
                    && dropped(m, "drop_out") >= dropped(&before, "drop_out") + drops
                    && dropped(m, "drop_in") >= dropped(&before, "drop_in") + drops
            });
            let after = match after {
                Ok(m) => m,
                Err(e) => {
                    let m = agent.metrics().unwrap_or_default();
                    bail!(
                        "{e:#}\ncounted: {} connections closed (want {conns}), drops out {} / in {} (want {drops} each)",
                        closed(&m) - closed(&before),
                        dropped(&m, "drop_out") - dropped(&before, "drop_out"),
                        dropped(&m, "drop_in") - dropped(&before, "drop_in"),
                    );
                }
            };
            // Stragglers: the last sockets are freed just after close.
            std::thread::sleep(Duration::from_secs(1));
            let after = agent.metrics().unwrap_or(after);
            counted_conns =
                counted_conns.min((closed(&after) - closed(&before)) as f64 / conns as f64);
            other += other_results(&after) - other_results(&before);
            counted_drops = counted_drops.min(
                (dropped(&after, "drop_out") - dropped(&before, "drop_out")
                    + dropped(&after, "drop_in")
                    - dropped(&before, "drop_in")) as f64
                    / (2 * drops) as f64,
            );
            with_stats(ns, &ids, conns, drops, &mut stats)?;
            agent.stop();
            drop(pins);
        }
    }
    let nft_out = nft_packets(ns, "out")?;
    let nft_in = nft_packets(ns, "in")?;
    // Warm-up, rounds × 2 conditions, and the statistics passes.
    let want = drops / 10 + drops * (3 * rounds as u64);
    if nft_out != want || nft_in != want {
        bail!("nft dropped {nft_out} (output) and {nft_in} (input), not {want} each");
    }
    nft("delete table inet npbench");

    print_tables(
        conns,
        drops,
        rounds,
        &without,
        &with,
        &stats,
        foreign,
        counted_conns,
        counted_drops,
    );
    println!(
        "connections of the loop counted under another result than closed (all agent rounds): {other}"
    );
    Ok(())
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Each program's median ns per unit (connection or drop) and per run,
/// and runs per unit, over the statistics passes.
fn per_unit(passes: &[Deltas], units: u64) -> Vec<(String, f64, f64, f64)> {
    let names: BTreeSet<&String> = passes.iter().flat_map(|d| d.keys()).collect();
    names
        .into_iter()
        .filter_map(|n| {
            let get = |d: &Deltas| d.get(n).copied().unwrap_or_default();
            let runs = median(
                passes
                    .iter()
                    .map(|d| get(d).cnt as f64 / units as f64)
                    .collect(),
            );
            if runs == 0.0 && !is_tracing(n) {
                return None;
            }
            let v: Vec<f64> = passes
                .iter()
                .map(get)
                .filter(|s| s.cnt > 0)
                .map(|s| s.ns as f64 / s.cnt as f64)
                .collect();
            let per_run = if v.is_empty() { f64::NAN } else { median(v) };
            let per_unit = median(
                passes
                    .iter()
                    .map(|d| get(d).ns as f64 / units as f64)
                    .collect(),
            );
            Some((n.clone(), runs, per_run, per_unit))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn print_tables(
    conns: u64,
    drops: u64,
    rounds: usize,
    without: &Timed,
    with: &Timed,
    stats: &Stats,
    foreign: usize,
    counted_conns: f64,
    counted_drops: f64,
) {
    let m = |v: &Vec<f64>| median(v.clone());
    // Paired rounds: the median of each round's difference too.
    let paired = |a: &Vec<f64>, b: &Vec<f64>| median(a.iter().zip(b).map(|(x, y)| y - x).collect());
    println!(
        "\nTCP health programs, cost per connection and per dropped packet: one namespace's loopback, without and with `netpulse run --backend ebpf` there (TC on lo, the tracing programs), {rounds} paired rounds, order alternating (medians; wall time of the loop over its length)\n"
    );
    println!(
        "| loop | without agent | with agent | added (difference of medians) | added (median of paired differences) | added / without | target |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    let rows: [(String, &Vec<f64>, &Vec<f64>, &str); 3] = [
        (
            format!(
                "{conns} connections (connect, accept, server close, client close), ns per connection"
            ),
            &without.conn,
            &with.conn,
            "≤ 1,000 ns",
        ),
        (
            format!(
                "{drops} UDP datagrams dropped by nft in the output hook (before lo), ns per drop"
            ),
            &without.drop_out,
            &with.drop_out,
            "",
        ),
        (
            format!(
                "{drops} UDP datagrams dropped by nft in the input hook (after lo), ns per drop"
            ),
            &without.drop_in,
            &with.drop_in,
            "",
        ),
    ];
    let mut conn_added = f64::NAN;
    for (i, (name, a, b, target)) in rows.iter().enumerate() {
        let (ma, mb) = (m(a), m(b));
        let pd = paired(a, b);
        if i == 0 {
            conn_added = pd;
        }
        println!(
            "| {name} | {} | {} | {} | {} | {:+.1}% | {target} |",
            fmt(ma),
            fmt(mb),
            fmt(mb - ma),
            fmt(pd),
            (mb / ma - 1.0) * 100.0
        );
    }
    println!(
        "\nadded per connection: {} ns (median of paired differences; target ≤ {TARGET_CONN_NS:.0} ns): {}",
        fmt(conn_added),
        if conn_added <= TARGET_CONN_NS {
            "met"
        } else {
            "missed"
        }
    );
    println!(
        "the agent counted {:.2}% of the connections (closed, server side) and {:.2}% of the drops (worst round)",
        counted_conns * 100.0,
        counted_drops * 100.0
    );
    if foreign > 0 {
        println!(
            "note: {foreign} netpulse tracing programs of another agent on this machine were loaded during the run; they run on this bench's events in both conditions"
        );
    }

    println!(
        "\nThe same loops with BPF run-time statistics on (the kernel's run_time_ns / run_cnt of the programs the agent holds), medians of {rounds} passes\n"
    );
    println!("| loop | program | hook | runs per unit | ns per run | ns per unit |");
    println!("|---|---|---|---:|---:|---:|");
    for (loop_name, passes, units) in [
        ("connection", &stats.conn, conns),
        ("drop, output hook", &stats.drop_out, drops),
        ("drop, input hook", &stats.drop_in, drops),
    ] {
        let rows = per_unit(passes, units);
        let mut total = (0.0, 0.0);
        for (name, runs, per_run, per_unit) in &rows {
            let hook = if is_tracing(name) {
                total.1 += per_unit;
                "tracing"
            } else {
                total.0 += per_unit;
                "TC on lo"
            };
            println!(
                "| {loop_name} | `{name}` | {hook} | {runs:.2} | {} | {} |",
                if per_run.is_nan() {
                    "–".to_string()
                } else {
                    fmt(*per_run)
                },
                fmt(*per_unit)
            );
        }
        println!(
            "| {loop_name} | **all** | TC {} + tracing {} | | | **{}** |",
            fmt(total.0),
            fmt(total.1),
            fmt(total.0 + total.1)
        );
    }
}
