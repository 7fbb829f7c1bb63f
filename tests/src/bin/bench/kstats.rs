//! The kernel's own figure on live traffic: with BPF run-time statistics on
//! (BPF_ENABLE_STATS, the switch behind `sysctl kernel.bpf_stats_enabled`,
//! held only while this runs and dropped by the kernel when its fd
//! closes), each program's run_time_ns / run_cnt (BPF_OBJ_GET_INFO_BY_FD)
//! for netpulse's TC programs on the receiving veth of a pair between two
//! namespaces, beside an empty TC program attached the same way (tcx, the
//! same veth, both directions) under the same packets. Two kinds of
//! traffic: loaded (64-byte UDP at ~200 kpps through the veth) and
//! sporadic (a TCP request/response every few ms: a few hundred packets a
//! second), and a third, SYN-heavy (new TCP connections back to back, so
//! one ingress packet in four is a SYN to a local service, the path where
//! the ingress program records the SYN's time for the handshake). Target:
//! loaded, at most 15 ns per packet above the empty program.
//!
//! In the same rounds, the agent's TCP health programs (BTF tracepoints,
//! their ids from the agent's /proc/PID/fdinfo): runs per second and ns per
//! run under each kind of traffic (under the loaded one, every datagram is
//! dropped at the sink's full receive queue, so `kfree_skb` runs once per
//! packet; under the SYN-heavy one, the connection programs run).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{SchedClassifier, TcAttachType};
use netpulse_tests::{PinDir, agent::Agent, netns::Pair};

const TARGET_NS: f64 = 15.0;
const UDP_PORT: u16 = 9;
const TCP_PORT: u16 = 7;
/// The SYN-heavy traffic's listener (accepts and closes).
const CONN_PORT: u16 = 8;
const AGENT_PORT: u16 = 19570;
const LOADED_PPS: f64 = 200_000.0;
/// Request/response exchanges per second of the sporadic case.
const SPORADIC_HZ: f64 = 150.0;

/// run_time_ns and run_cnt of the programs on one hook of the veth.
#[derive(Clone, Copy, Default, Debug)]
struct Stat {
    ns: u64,
    cnt: u64,
}

/// [netpulse ingress, empty ingress, netpulse egress, empty egress].
type Snap = [Stat; 4];

/// The programs attached (tcx) to `dev` in the calling thread's namespace.
fn snapshot(dev: &str) -> Result<Snap> {
    let mut out = [Stat::default(); 4];
    for (i, at) in [TcAttachType::Ingress, TcAttachType::Egress]
        .into_iter()
        .enumerate()
    {
        let (_, progs) = SchedClassifier::query_tcx(dev, at)?;
        for p in progs {
            let name = p.name_as_str().unwrap_or("");
            let s = Stat {
                ns: p.run_time().as_nanos() as u64,
                cnt: p.run_count(),
            };
            // The kernel keeps 15 bytes of a program's name.
            if name.starts_with("netpulse_basel") {
                out[i * 2 + 1] = s;
            } else if name.starts_with("netpulse_tc") {
                out[i * 2] = s;
            } else {
                bail!("an unexpected program on {dev} {at:?}: {name}");
            }
        }
    }
    Ok(out)
}

/// 64-byte UDP datagrams to `to` at `pps` until `stop` (sendmmsg, paced in
/// batches of 32); returns how many were sent.
fn udp_flood(to: SocketAddr, pps: f64, stop: Arc<AtomicBool>) -> u64 {
    use std::os::fd::AsRawFd;
    let Ok(sock) = UdpSocket::bind("0.0.0.0:0") else {
        return 0;
    };
    if sock.connect(to).is_err() {
        return 0;
    }
    let payload = [0x5au8; 64];
    const BATCH: usize = 32;
    let mut iov = [libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    }; BATCH];
    // SAFETY: zeroed mmsghdr is valid; each points at its own iovec.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    let start = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = start + Duration::from_secs_f64(sent as f64 / pps);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // SAFETY: msgs and their iovecs outlive the call.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
        }
    }
    sent
}

/// A 64-byte request and its echo every 1/`hz` s until `stop`.
fn tcp_sporadic(to: SocketAddr, hz: f64, stop: Arc<AtomicBool>) -> Result<u64> {
    let mut s = TcpStream::connect(to)?;
    s.set_nodelay(true)?;
    let (mut msg, mut back) = ([0x11u8; 64], [0u8; 64]);
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = start + Duration::from_secs_f64(n as f64 / hz);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        msg[0] = n as u8;
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        n += 1;
    }
    Ok(n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// ns per run over a round: (after - before) time / count.
fn per_run(a: Stat, b: Stat) -> Option<f64> {
    let cnt = b.cnt - a.cnt;
    (cnt > 0).then(|| (b.ns - a.ns) as f64 / cnt as f64)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Traffic {
    Loaded,
    Sporadic,
    Syn,
}

/// New connections to `to` back to back until `stop`; how many.
fn syn_heavy(to: SocketAddr, stop: Arc<AtomicBool>) -> Result<u64> {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        crate::tcp::one_connection(to)?;
        n += 1;
    }
    Ok(n)
}

/// One round's tracing-program deltas by name, its seconds, and what it
/// sent (datagrams, requests or connections).
type Traced = (BTreeMap<String, crate::tcp::Stat>, f64, u64);

const KINDS: [Traffic; 3] = [Traffic::Loaded, Traffic::Sporadic, Traffic::Syn];

pub fn live_cost(seconds: u64, rounds: usize) -> Result<()> {
    let pair = Pair::new("kst", 108);
    let dir = std::env::temp_dir().join(format!("netpulse-kstats-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let stop_all = Arc::new(AtomicBool::new(false));
    let result = (|| -> Result<()> {
        let a = pair.addr_a;
        // The receivers: a UDP socket that never reads (the kernel drops
        // at its queue, no ICMP), and a TCP echo server.
        let sink = pair.a.run(move || UdpSocket::bind((a, UDP_PORT)))?;
        let listener = pair.a.run(move || TcpListener::bind((a, TCP_PORT)))?;
        let st = stop_all.clone();
        let echo = std::thread::spawn(move || {
            for s in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let _ = s.set_nodelay(true);
                    let mut b = [0u8; 64];
                    while s.read_exact(&mut b).is_ok() {
                        if s.write_all(&b).is_err() {
                            break;
                        }
                    }
                });
            }
        });

        let _acceptor = crate::tcp::Acceptor::start(&pair.a, SocketAddr::from((a, CONN_PORT)))?;

        // netpulse, as it runs: eBPF, its programs on the veth.
        let pins = PinDir::mounted("kst");
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "[agent]\nlisten = \"127.0.0.1:{AGENT_PORT}\"\npin_dir = \"{}\"\ndiscover_sockets = false\nstate_dir = \"{}\"\n\n[[service]]\nname = \"sink\"\nendpoints = [{{ proto = \"udp\", port = {UDP_PORT} }}]\n\n[[service]]\nname = \"echo\"\nendpoints = [{{ proto = \"tcp\", port = {TCP_PORT} }}]\n\n[[service]]\nname = \"conn\"\nendpoints = [{{ proto = \"tcp\", port = {CONN_PORT} }}]\n",
                pins.path().display(),
                dir.join("state").display()
            ),
        )?;
        let mut agent = Agent::start(&pair.a, &[], &cfg, AGENT_PORT, &dir.join("agent.log"));
        let dev = pair.dev_a.clone();
        let m = agent.wait_for("netpulse on the veth", |m| {
            m.has("netpulse_probe_attached", &[("interface", &dev)])
        });
        if m.sum("netpulse_backend_info", &[("backend", "ebpf")]) != 1 {
            bail!("the agent does not count with eBPF");
        }
        let ids = crate::tcp::held_programs(agent.pid());
        let foreign = crate::tcp::foreign_tracing(&ids);
        let tracing = || -> Result<BTreeMap<String, crate::tcp::Stat>> {
            Ok(crate::tcp::prog_stats(&ids)?
                .into_iter()
                .filter(|(n, _)| crate::tcp::is_tracing(n))
                .collect())
        };
        // Per kind of traffic: (tracing deltas, seconds, units) per round.
        let mut traced: [Vec<Traced>; 3] = Default::default();

        // The empty program, on both hooks of the same veth.
        let empty = crate::overhead::EmptyTc::attach(
            &pair,
            &[TcAttachType::Ingress, TcAttachType::Egress],
            "kst-empty",
        )?;

        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("BPF_ENABLE_STATS (run-time statistics)")?;
        let snap = |dev: String| pair.a.run(move || snapshot(&dev));
        // Rounds interleave the two kinds of traffic.
        let mut cols: [[Vec<f64>; 5]; 3] = Default::default();
        for _ in 0..rounds {
            for (k, traffic) in KINDS.into_iter().enumerate() {
                let before = snap(pair.dev_a.clone())?;
                let tr_before = tracing()?;
                let t0 = Instant::now();
                let stop = Arc::new(AtomicBool::new(false));
                let (s, to_udp, to_tcp, to_conn) = (
                    stop.clone(),
                    SocketAddr::from((a, UDP_PORT)),
                    SocketAddr::from((a, TCP_PORT)),
                    SocketAddr::from((a, CONN_PORT)),
                );
                let sender = pair.b.spawn(move || -> Result<u64> {
                    match traffic {
                        Traffic::Loaded => Ok(udp_flood(to_udp, LOADED_PPS, s)),
                        Traffic::Sporadic => tcp_sporadic(to_tcp, SPORADIC_HZ, s),
                        Traffic::Syn => syn_heavy(to_conn, s),
                    }
                });
                std::thread::sleep(Duration::from_secs(seconds));
                stop.store(true, Ordering::Relaxed);
                let sent = sender
                    .join()
                    .map_err(|_| anyhow::anyhow!("the sender panicked"))??;
                if sent == 0 {
                    bail!("the sender sent nothing");
                }
                std::thread::sleep(Duration::from_millis(100));
                let after = snap(pair.dev_a.clone())?;
                let tr_after = tracing()?;
                let secs = t0.elapsed().as_secs_f64();
                traced[k].push((
                    tr_after
                        .iter()
                        .map(|(n, s)| {
                            (
                                n.clone(),
                                *s - tr_before.get(n).copied().unwrap_or_default(),
                            )
                        })
                        .collect(),
                    secs,
                    sent,
                ));
                let pkts = (after[1].cnt - before[1].cnt) + (after[3].cnt - before[3].cnt);
                cols[k][4].push(pkts as f64 / secs);
                for h in 0..4 {
                    if let Some(v) = per_run(before[h], after[h]) {
                        cols[k][h].push(v);
                    }
                }
                // netpulse saw what the empty program saw, hook by hook.
                for h in [0, 2] {
                    let (np, empty) = (
                        after[h].cnt - before[h].cnt,
                        after[h + 1].cnt - before[h + 1].cnt,
                    );
                    if np.abs_diff(empty) > empty / 100 {
                        bail!("netpulse ran {np} times, the empty program {empty}, on hook {h}");
                    }
                }
            }
        }
        drop(stats);
        drop(empty);
        agent.stop();
        drop(pins);
        drop(sink);
        wake(&pair, &stop_all);
        let _ = echo.join();

        let cell = |v: &Vec<f64>| (!v.is_empty()).then(|| median(v.clone()));
        let f = |x: Option<f64>| x.map_or("–".to_string(), |v| format!("{v:.1}"));
        println!(
            "\nnetpulse's TC programs on live traffic, the kernel's run_time_ns / run_cnt (bpf_stats), beside an empty TC program on the same veth; {seconds} s × {rounds} rounds each (medians, ns per packet)\n"
        );
        println!(
            "| traffic | packets/s | netpulse TC ingress | empty TC ingress | ingress Δ | netpulse TC egress | empty TC egress | egress Δ |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        let mut loaded_delta = f64::NAN;
        for (k, name) in [
            format!("loaded: 64-byte UDP, ~{:.0} kpps one way", LOADED_PPS / 1e3),
            format!("sporadic: TCP request/response, {SPORADIC_HZ:.0} a second"),
            "SYN-heavy: new TCP connections back to back (connect, accept, close)".to_string(),
        ]
        .iter()
        .enumerate()
        {
            let c: Vec<Option<f64>> = cols[k].iter().map(cell).collect();
            let d = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a - b);
            let (di, de) = (d(c[0], c[1]), d(c[2], c[3]));
            if k == 0 {
                loaded_delta = di.unwrap_or(f64::NAN);
            }
            println!(
                "| {name} | {:.0} | {} | {} | {} | {} | {} | {} |",
                c[4].unwrap_or(0.0),
                f(c[0]),
                f(c[1]),
                f(di),
                f(c[2]),
                f(c[3]),
                f(de)
            );
        }
        println!(
            "\nloaded: {loaded_delta:.1} ns per packet above the empty program (target ≤ {TARGET_NS} ns): {}",
            if loaded_delta <= TARGET_NS {
                "met"
            } else {
                "missed"
            }
        );
        if let (Some(l), Some(s)) = (
            cell(&cols[0][0]).zip(cell(&cols[0][1])).map(|(a, b)| a - b),
            cell(&cols[2][0]).zip(cell(&cols[2][1])).map(|(a, b)| a - b),
        ) {
            println!(
                "SYN-heavy: {s:.1} ns per ingress packet above the empty program, against {l:.1} ns loaded (the SYN path: one ingress packet in four records a SYN)"
            );
        }

        // The tracing programs in the same rounds.
        println!(
            "\nnetpulse's TCP health programs (BTF tracepoints; they run for the whole machine's events and keep those of watched namespaces) in the same rounds: the kernel's run_time_ns / run_cnt, medians of {rounds} rounds\n"
        );
        println!("| program | traffic | runs per second | runs per unit | ns per run |");
        println!("|---|---|---:|---:|---:|");
        let names: std::collections::BTreeSet<String> = traced
            .iter()
            .flatten()
            .flat_map(|(d, _, _)| d.keys().cloned())
            .collect();
        for name in &names {
            for (k, (kind, unit)) in [
                ("loaded", "datagram sent"),
                ("sporadic", "request"),
                ("SYN-heavy", "connection"),
            ]
            .into_iter()
            .enumerate()
            {
                let get = |d: &BTreeMap<String, crate::tcp::Stat>| {
                    d.get(name).copied().unwrap_or_default()
                };
                let per_s = median(
                    traced[k]
                        .iter()
                        .map(|(d, s, _)| get(d).cnt as f64 / s)
                        .collect(),
                );
                if per_s < 1.0 {
                    continue;
                }
                let per_unit = median(
                    traced[k]
                        .iter()
                        .map(|(d, _, n)| get(d).cnt as f64 / (*n).max(1) as f64)
                        .collect(),
                );
                let per_run: Vec<f64> = traced[k]
                    .iter()
                    .map(|(d, _, _)| get(d))
                    .filter(|s| s.cnt > 0)
                    .map(|s| s.ns as f64 / s.cnt as f64)
                    .collect();
                println!(
                    "| `{name}` | {kind} | {per_s:.0} | {per_unit:.2} per {unit} | {} |",
                    f((!per_run.is_empty()).then(|| median(per_run)))
                );
            }
        }
        if foreign > 0 {
            println!(
                "\nnote: {foreign} tracing programs of another netpulse agent were loaded on this machine during the run"
            );
        }
        Ok(())
    })();
    // On an error part-way too: the echo server leaves, then the pair.
    wake(&pair, &stop_all);
    drop(pair);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Sets `stop` and wakes the echo server's accept so it sees it.
fn wake(pair: &Pair, stop: &AtomicBool) {
    stop.store(true, Ordering::Relaxed);
    let a = pair.addr_a;
    let _ = pair.b.run(move || {
        TcpStream::connect_timeout(&SocketAddr::from((a, TCP_PORT)), Duration::from_secs(1))
    });
}
