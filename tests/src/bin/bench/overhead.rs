//! Live overhead: the most packets/s a sender gets through a veth pair to a
//! receiver in another network namespace, with nothing watching, with
//! netpulse's eBPF programs attached, with `tcpdump -w /dev/null` on the
//! receiving interface, and with netpulse's pcap backend, in one run. Reports delivered pps (the
//! kernel's rx counter of the receiving veth), CPU per packet (all CPUs'
//! busy time over the packets) and the share each watcher counted.
//!
//! The eBPF agent runs twice: as it ships (the packet programs and the TCP
//! health programs, whose `kfree_skb` runs once per datagram here: the
//! sink never reads, so each is dropped at its full receive queue), and
//! with the packet programs only (the kernel's BTF hidden from it by a
//! bind mount over /sys/kernel/btf/vmlinux in a mount namespace of its
//! own: the TCP health features are off, as on a kernel without BTF).

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use netpulse_tests::{
    PinDir,
    agent::{Agent, Backend},
    netns::{LinkStats, Pair},
    scrape::{Metrics, get},
};

const PORT: u16 = 9;
const AGENT_PORT: u16 = 19560;

/// Busy and total jiffies of all CPUs (/proc/stat).
fn cpu() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().take(8).sum();
    (total - idle, total)
}

fn jiffy() -> f64 {
    // SAFETY: sysconf has no preconditions.
    1.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Sends 64-byte UDP payloads to `to` as fast as one thread can
/// (sendmmsg, 64 at a time) until `stop`; returns how many were sent.
fn blast(to: SocketAddr, stop: Arc<AtomicBool>) -> u64 {
    use std::os::fd::AsRawFd;
    let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") else {
        return 0;
    };
    if sock.connect(to).is_err() {
        return 0;
    }
    let payload = [0x5au8; 64];
    const BATCH: usize = 64;
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
    // One CPU for the sender: the receive path runs in its softirq, so
    // per-packet work a watcher adds there comes out of its throughput.
    // SAFETY: a zeroed cpu_set_t with CPU 0 set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: msgs and their iovecs outlive the call.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
        }
    }
    sent
}

struct Run {
    pps: f64,
    cpu_ns: f64,
    counted: Option<f64>,
    /// The share of the packets the agent counted as kernel drops.
    drops: Option<f64>,
}

/// One timed blast; `watched` reads what the watcher counted so far.
fn measure(pair: &Pair, seconds: u64, watched: &dyn Fn() -> Option<u64>) -> Run {
    let before_count = watched();
    let before = pair.a.link_stats(&pair.dev_a);
    let (busy0, _) = cpu();
    let stop = Arc::new(AtomicBool::new(false));
    let to = SocketAddr::from((pair.addr_a, PORT));
    let s = stop.clone();
    let sender = pair.b.spawn(move || blast(to, s));
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    let secs = started.elapsed().as_secs_f64();
    // Let queued packets drain before reading the counters.
    std::thread::sleep(Duration::from_millis(300));
    let (busy1, _) = cpu();
    let got: LinkStats = pair.a.link_stats(&pair.dev_a) - before;
    let counted = match (before_count, watched()) {
        (Some(a), Some(b)) => Some((b - a) as f64 / got.rx_packets.max(1) as f64),
        _ => None,
    };
    Run {
        pps: got.rx_packets as f64 / secs,
        cpu_ns: (busy1 - busy0) as f64 * jiffy() * 1e9 / got.rx_packets.max(1) as f64,
        counted,
        drops: None,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    name: &'static str,
    pps: f64,
    cpu_ns: f64,
    counted: Option<f64>,
    drops: Option<f64>,
}

/// The sink service's ingress packets as the agent in `ns` reports them.
fn service_packets(ns: &str) -> Option<u64> {
    scrape(ns).map(|m| m.packets("sink", "ingress"))
}

fn scrape(ns: &str) -> Option<Metrics> {
    netpulse_tests::netns::run_in(ns, || {
        get(
            SocketAddr::from((Ipv4Addr::LOCALHOST, AGENT_PORT)),
            "/metrics",
        )
        .ok()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| Metrics::parse(&b))
    })
}

/// The sink's kernel drops as the agent in `ns` reports them.
fn service_drops(ns: &str) -> Option<u64> {
    scrape(ns).map(|m| {
        m.sum(
            "netpulse_service_kernel_drops_total",
            &[("service", "sink")],
        )
    })
}

/// The wrapper that hides the kernel's BTF from the agent (see the module
/// doc): `ip netns exec` mounts a sysfs of the namespace's own; a private
/// mount namespace inside it covers that sysfs's vmlinux.
const NO_BTF: [&str; 6] = [
    "unshare",
    "-m",
    "sh",
    "-c",
    "mount --bind /dev/null /sys/kernel/btf/vmlinux && exec \"$@\"",
    "sh",
];

/// What watches the receiving interface during a round.
#[derive(Clone, Copy)]
enum Watcher {
    Nothing,
    /// `netpulse run` with this backend (`ebpf` or `pcap`).
    Netpulse(&'static str),
    /// `netpulse run --backend ebpf` with the packet programs only.
    NetpulsePacketOnly,
    Tcpdump,
    /// An empty TC program on the receiving veth's ingress: what the hook
    /// itself costs, whatever runs in it.
    EmptyTc,
}

impl Watcher {
    fn name(self) -> &'static str {
        match self {
            Watcher::Nothing => "no monitoring",
            Watcher::Netpulse("pcap") => "netpulse pcap backend",
            Watcher::Netpulse(_) => "netpulse eBPF (packet + TCP health programs)",
            Watcher::NetpulsePacketOnly => {
                "netpulse eBPF, packet programs only (TCP health off: no kernel BTF)"
            }
            Watcher::Tcpdump => "tcpdump -w /dev/null",
            Watcher::EmptyTc => "empty TC program (the hook alone)",
        }
    }
}

/// One round under `w`: the blast, and the share `w` counted.
fn round(pair: &Pair, w: Watcher, seconds: u64, dir: &std::path::Path) -> Result<Run> {
    match w {
        Watcher::Nothing => Ok(measure(pair, seconds, &|| None)),
        Watcher::Netpulse(_) | Watcher::NetpulsePacketOnly => {
            let backend = match w {
                Watcher::Netpulse(b) => b,
                _ => "ebpf",
            };
            let pins = PinDir::mounted("ovh");
            let cfg = dir.join("config.toml");
            let backend_line = if backend == "pcap" {
                "backend = \"pcap\"\n"
            } else {
                ""
            };
            std::fs::write(
                &cfg,
                format!(
                    "[agent]\nlisten = \"127.0.0.1:{AGENT_PORT}\"\npin_dir = \"{}\"\ndiscover_sockets = false\nstate_dir = \"{}\"\n{backend_line}\n[[service]]\nname = \"sink\"\nendpoints = [{{ proto = \"udp\", port = {PORT} }}]\n",
                    pins.path().display(),
                    dir.join("state").display()
                ),
            )?;
            // eBPF: Agent::start, which passes `--backend ebpf` (the
            // kernel programs or a failed start, never libpcap); pcap: the
            // config's `backend = "pcap"`, which that flag would override.
            let log = dir.join("agent.log");
            let mut agent = if backend == "pcap" {
                Agent::start_with(&pair.a, &[], &cfg, AGENT_PORT, &log, Backend::AsConfigured)
            } else if matches!(w, Watcher::NetpulsePacketOnly) {
                Agent::start(&pair.a, &NO_BTF, &cfg, AGENT_PORT, &log)
            } else {
                Agent::start(&pair.a, &[], &cfg, AGENT_PORT, &log)
            };
            let dev = pair.dev_a.clone();
            let m = agent.wait_for("netpulse watching the veth", |m| {
                m.has("netpulse_probe_attached", &[("interface", &dev)])
            });
            // The row measures the backend its name says.
            if m.sum("netpulse_backend_info", &[("backend", backend)]) != 1 {
                bail!(
                    "{}: the agent does not report netpulse_backend_info{{backend=\"{backend}\"}} 1",
                    w.name()
                );
            }
            // And with the TCP health programs on, or off, as it says.
            if backend == "ebpf" {
                let want = if matches!(w, Watcher::NetpulsePacketOnly) {
                    0.0
                } else {
                    1.0
                };
                let m = agent.wait_for("the TCP health features named", |m| {
                    m.has("netpulse_feature_enabled", &[("feature", "kernel_drops")])
                });
                for f in ["tcp_connections", "kernel_drops"] {
                    let on = m.value("netpulse_feature_enabled", &[("feature", f)]);
                    if on != Some(want) {
                        bail!(
                            "{}: netpulse_feature_enabled{{feature=\"{f}\"}} is {on:?}",
                            w.name()
                        );
                    }
                }
            }
            let ns = pair.a.name.clone();
            let drops0 = service_drops(&ns);
            let mut r = measure(pair, seconds, &|| service_packets(&ns));
            if backend == "ebpf"
                && let (Some(a), Some(b)) = (drops0, service_drops(&ns))
            {
                // Delivered to the veth, dropped at the sink's queue.
                r.drops = Some((b - a) as f64 / (r.pps * seconds as f64).max(1.0));
            }
            agent.stop();
            Ok(r)
        }
        Watcher::EmptyTc => {
            let empty =
                EmptyTc::attach(pair, &[aya::programs::TcAttachType::Ingress], "ovh-empty")?;
            let r = measure(pair, seconds, &|| None);
            drop(empty);
            Ok(r)
        }
        Watcher::Tcpdump => {
            // What it captured is in its exit statistics.
            let td = Command::new("ip")
                .args(["netns", "exec", &pair.a.name, "tcpdump", "-i", &pair.dev_a])
                .args(["-w", "/dev/null", "-n", "-q"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting tcpdump")?;
            std::thread::sleep(Duration::from_millis(1500));
            let mut r = measure(pair, seconds, &|| None);
            // SAFETY: the tcpdump we spawned (ip netns exec execs it).
            unsafe { libc::kill(td.id() as i32, libc::SIGINT) };
            let out = td.wait_with_output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            let captured: u64 = err
                .lines()
                .find(|l| l.contains("packets captured"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .context("tcpdump printed no capture statistics")?;
            // The capture outlived the blast: of the blast it saw at most
            // the blast.
            r.counted = Some((captured as f64 / (r.pps * seconds as f64)).min(1.0));
            Ok(r)
        }
    }
}

/// `pcap`: also measure the netpulse pcap backend.
pub fn overhead(seconds: u64, n: usize, pcap: bool) -> Result<()> {
    let pair = Pair::new("ovh", 107);
    // A socket that never reads: the kernel drops at its queue, no ICMP.
    let sink = pair.a.run({
        let addr = pair.addr_a;
        move || std::net::UdpSocket::bind((addr, PORT))
    })?;
    let dir = std::env::temp_dir().join(format!("netpulse-ovh-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut watchers = vec![
        Watcher::Nothing,
        Watcher::EmptyTc,
        Watcher::Netpulse("ebpf"),
        Watcher::NetpulsePacketOnly,
        Watcher::Tcpdump,
    ];
    if pcap {
        watchers.push(Watcher::Netpulse("pcap"));
    }
    // Rounds interleave the conditions, so drift in the machine's load
    // spreads over all of them.
    let mut runs: Vec<Vec<Run>> = watchers.iter().map(|_| Vec::new()).collect();
    for _ in 0..n {
        for (i, w) in watchers.iter().enumerate() {
            runs[i].push(round(&pair, *w, seconds, &dir)?);
        }
    }
    let rows: Vec<Row> = watchers
        .iter()
        .zip(runs)
        .map(|(w, runs)| Row {
            name: w.name(),
            pps: median(runs.iter().map(|r| r.pps).collect()),
            cpu_ns: median(runs.iter().map(|r| r.cpu_ns).collect()),
            counted: runs
                .iter()
                .map(|r| r.counted)
                .collect::<Option<Vec<f64>>>()
                .map(|v| v.into_iter().fold(f64::INFINITY, f64::min)),
            drops: runs
                .iter()
                .map(|r| r.drops)
                .collect::<Option<Vec<f64>>>()
                .map(median),
        })
        .collect();
    drop(sink);
    let _ = std::fs::remove_dir_all(&dir);

    let base = rows[0].pps;
    println!(
        "\nLive overhead: one sender, 64-byte UDP over a veth pair between namespaces, {seconds} s × {n} rounds each (medians); pps = the receiving veth's rx counter\n"
    );
    println!(
        "| condition | pps | throughput lost | CPU ns/packet | counted | counted as kernel drops |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.1}% | {:.0} | {} | {} |",
            r.name,
            r.pps,
            (1.0 - r.pps / base) * 100.0,
            r.cpu_ns,
            r.counted
                .map_or("-".to_string(), |c| format!("{:.2}%", c * 100.0)),
            r.drops
                .map_or("-".to_string(), |c| format!("{:.1}%", c * 100.0))
        );
    }
    println!(
        "\nThe sink never reads: nearly every datagram is dropped at its receive queue, which runs the kfree_skb program once per packet in the first eBPF row; the second has no tracing programs (the kernel's BTF hidden from it)."
    );
    let row = |w: Watcher| rows.iter().find(|r| r.name == w.name());
    let loss = |w: Watcher| row(w).map_or(0.0, |r| (1.0 - r.pps / base).max(0.0));
    let (ebpf, tcpdump) = (loss(Watcher::Netpulse("ebpf")), loss(Watcher::Tcpdump));
    println!(
        "\nnetpulse eBPF loses {:.1}% of the throughput, tcpdump {:.1}%: {} (target: at most 1/5 of tcpdump's loss, and 100% counted)",
        ebpf * 100.0,
        tcpdump * 100.0,
        if ebpf <= tcpdump / 5.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    let counted = row(Watcher::Netpulse("ebpf")).and_then(|r| r.counted);
    if counted.is_some_and(|c| c < 1.0) {
        bail!("netpulse eBPF counted less than every packet: {counted:?}");
    }
    Ok(())
}

/// The empty TC program (`BASELINE_TC`) on the pair's veth in namespace a,
/// one object per hook given (so each has its own run counts), loaded and
/// attached by a thread in that namespace which holds the links until this
/// drops: the hook's own cost, beside which netpulse's is measured.
pub struct EmptyTc {
    done: Option<std::sync::mpsc::Sender<()>>,
    holder: Option<std::thread::JoinHandle<()>>,
    _pins: PinDir,
}

impl EmptyTc {
    pub fn attach(
        pair: &Pair,
        hooks: &[aya::programs::TcAttachType],
        tag: &str,
    ) -> Result<EmptyTc> {
        use aya::programs::SchedClassifier;
        let (dev, pins, hooks) = (pair.dev_a.clone(), PinDir::new(tag), hooks.to_vec());
        let pin = pins.path().to_path_buf();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = pair.a.spawn(move || {
            let attached = (|| -> Result<Vec<aya::Ebpf>> {
                std::fs::create_dir_all(&pin)?;
                let mut held = Vec::new();
                for at in hooks {
                    let mut e = aya::EbpfLoader::new()
                        .default_map_pin_directory(&pin)
                        .load(netpulse::probe::object())?;
                    let p: &mut SchedClassifier = e
                        .program_mut(agent_ebpf::programs::BASELINE_TC)
                        .context("baseline tc")?
                        .try_into()?;
                    p.load()?;
                    p.attach(&dev, at)?;
                    held.push(e);
                }
                Ok(held)
            })();
            match attached {
                Ok(held) => {
                    let _ = ready_tx.send(Ok(()));
                    let _ = done_rx.recv();
                    drop(held);
                }
                Err(err) => {
                    let _ = ready_tx.send(Err(format!("{err:#}")));
                }
            }
        });
        let empty = EmptyTc {
            done: Some(done_tx),
            holder: Some(holder),
            _pins: pins,
        };
        ready_rx
            .recv()
            .context("the empty program's thread")?
            .map_err(anyhow::Error::msg)?;
        Ok(empty)
    }
}

impl Drop for EmptyTc {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(h) = self.holder.take() {
            let _ = h.join();
        }
    }
}
