//! A flood through a veth pair: over a million frames from random source
//! addresses and ports, with a known stream to one service mixed in. The
//! service's count stays exact, every frame the interface received is
//! counted somewhere, and the agent's memory and maps do not grow with it.

use std::{os::fd::AsRawFd, time::Duration};

use netpulse_tests::{
    PinDir,
    agent::{Agent, live_prerequisites},
    frames::{self, eth, ipv4, udp},
    netns::{Pair, mac_of},
    scrape::Metrics,
};

const FLOOD: u64 = 1_000_000;
/// One frame in this many goes to the service.
const EVERY: u64 = 100;
const SERVICE_PORT: u16 = 7700;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).unwrap();
    }
    m
}

/// Sends `FLOOD` frames out of `dev` (in the calling thread's namespace)
/// through an AF_PACKET socket, as fast as the queue on `dev` takes them.
/// Returns how many went to the service.
fn flood(dev: &str, dst_mac: [u8; 6], src_mac: [u8; 6], to: [u8; 4]) -> u64 {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh, valid descriptor we own.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let ifindex = netpulse::probe::ifindex(dev).expect("sender interface");
    // SAFETY: zeroed sockaddr_ll, then the fields sendto needs.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&dst_mac);

    let mut rng = netpulse_tests::Rng(0x2545_f491_4f6c_dd1d);
    let mut to_service = 0;
    let mut frame = Vec::with_capacity(128);
    for i in 0..FLOOD {
        let r = rng.u64().to_be_bytes();
        let src = [10, 200, r[0], r[1]];
        let sport = u16::from_be_bytes([r[2], r[3]]) | 1024;
        let dport = if i % EVERY == 0 {
            to_service += 1;
            SERVICE_PORT
        } else {
            // Random, but never the service's.
            (u16::from_be_bytes([r[4], r[5]]) % 50_000) + 10_000
        };
        frame.clear();
        frame.extend_from_slice(&eth(
            &[],
            frames::ETH_IPV4,
            &ipv4(src, to, 17, 0, 0, &udp(sport, dport, 18)),
        ));
        frame[..6].copy_from_slice(&dst_mac);
        frame[6..12].copy_from_slice(&src_mac);
        loop {
            // SAFETY: frame and sll outlive the call.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::ENOBUFS), "sendto: {e}");
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    to_service
}

fn counted(m: &Metrics) -> u64 {
    m.sum(
        "netpulse_service_packets_total",
        &[("direction", "ingress")],
    ) + m.sum(
        "netpulse_unclassified_packets_total",
        &[("direction", "ingress")],
    )
}

#[test]
fn a_million_random_frames_leave_the_service_count_exact_and_memory_flat() {
    if !live_prerequisites() {
        return;
    }
    let pair = Pair::new("flood", 100);
    let pins = PinDir::mounted("flood");
    let dir = netpulse_tests::scratch("flood");
    let (cfg, port) = (dir.join("config.toml"), 19486);
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nlisten = \"127.0.0.1:{port}\"\npin_dir = \"{}\"\ninterfaces = [\"{}\"]\ndiscover_sockets = false\n\n[[service]]\nname = \"target\"\nendpoints = [{{ proto = \"udp\", port = {SERVICE_PORT} }}]\n",
            pins.path().display(),
            pair.dev_a
        ),
    )
    .unwrap();
    let mut agent = Agent::start(&pair.a, &[], &cfg, port, &dir.join("agent.log"));
    let m0 = agent.wait_for("probes", |m| {
        m.has(
            "netpulse_probe_attached",
            &[("interface", pair.dev_a.as_str())],
        )
    });
    let rss0 = rss_kib(agent.pid());
    let link0 = pair.a.link_stats(&pair.dev_a);

    let (dst, src, dev, to) = (
        mac(&mac_of(&pair.a, &pair.dev_a)),
        mac(&mac_of(&pair.b, &pair.dev_b)),
        pair.dev_b.clone(),
        pair.addr_a.octets(),
    );
    // A queue on the sending veth: with it, a full receive ring pushes back
    // on the sender (kernels since 6.16) instead of dropping.
    pair.b.exec(
        "tc",
        &[
            "qdisc",
            "replace",
            "dev",
            &pair.dev_b,
            "root",
            "pfifo",
            "limit",
            "1000",
        ],
    );
    let to_service = pair.b.run(move || flood(&dev, dst, src, to));
    std::thread::sleep(Duration::from_millis(500));

    let link = pair.a.link_stats(&pair.dev_a) - link0;
    let m1 = agent.metrics().unwrap();
    let rss1 = rss_kib(agent.pid());
    let service = m1.sum(
        "netpulse_service_packets_total",
        &[("service", "target"), ("direction", "ingress")],
    ) - m0.sum(
        "netpulse_service_packets_total",
        &[("service", "target"), ("direction", "ingress")],
    );
    eprintln!(
        "flood: {} frames received by the veth, {to_service} to the service; agent RSS {rss0} -> {rss1} KiB",
        link.rx_packets
    );
    assert_eq!(
        link.rx_packets, FLOOD,
        "the veth dropped frames: the pacing is too fast here"
    );
    assert_eq!(
        service, to_service,
        "the service's count is not exact under the flood"
    );
    assert_eq!(
        counted(&m1) - counted(&m0),
        link.rx_packets,
        "frames received but not counted"
    );
    // Nothing per packet lives in userspace, and the maps are fixed-size:
    // a million new peers leave the agent's memory and tables as they were.
    assert!(
        rss1 <= rss0 + 4 * 1024,
        "agent RSS grew from {rss0} to {rss1} KiB"
    );
    assert_eq!(
        m1.0.get("netpulse_map_entries"),
        m0.0.get("netpulse_map_entries"),
        "map use changed under the flood"
    );
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
