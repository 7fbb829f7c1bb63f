//! Network namespaces and veth pairs made for one test and removed on drop,
//! and running code inside a namespace from a thread (setns(2) changes only
//! the calling thread's namespace).

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
};

pub fn sh(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `ip netns add NAME`, deleted on drop (which also removes its veth ends).
pub struct Netns {
    pub name: String,
}

/// Runs `f` on a new thread inside the named namespace.
pub fn spawn_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: a valid namespace fd; affects only this thread.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Runs `f` inside the named namespace and waits for it.
pub fn run_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match spawn_in(name, f).join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

impl Netns {
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        sh("ip", &["netns", "add", name]);
        sh("ip", &["-n", name, "link", "set", "lo", "up"]);
        Netns {
            name: name.to_string(),
        }
    }

    /// `ip netns exec NAME cmd args...`
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name, cmd];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Runs `f` on a new thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        spawn_in(&self.name, f)
    }

    /// Runs `f` inside this namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(&self.name, f)
    }

    /// Interface statistics as the kernel keeps them (`ip -s link`).
    pub fn link_stats(&self, dev: &str) -> LinkStats {
        let out = sh(
            "ip",
            &["-n", &self.name, "-s", "-j", "link", "show", "dev", dev],
        );
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("ip -j output is JSON");
        let s = &v[0]["stats64"];
        let n = |dir: &str, k: &str| s[dir][k].as_u64().expect("ip -s stats64 counter");
        LinkStats {
            rx_packets: n("rx", "packets"),
            rx_bytes: n("rx", "bytes"),
            tx_packets: n("tx", "packets"),
            tx_bytes: n("tx", "bytes"),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl std::ops::Sub for LinkStats {
    type Output = LinkStats;
    fn sub(self, o: LinkStats) -> LinkStats {
        LinkStats {
            rx_packets: self.rx_packets - o.rx_packets,
            rx_bytes: self.rx_bytes - o.rx_bytes,
            tx_packets: self.tx_packets - o.tx_packets,
            tx_bytes: self.tx_bytes - o.tx_bytes,
        }
    }
}

/// Two namespaces joined by a veth pair with IPv4 addresses `10.77.<net>.1`
/// (in `a`) and `.2` (in `b`). IPv6 is off and neighbours are static, so the
/// link carries only the traffic a test sends, and offloads are off, so the
/// kernel's counters count wire packets.
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
    pub dev_a: String,
    pub dev_b: String,
    pub addr_a: std::net::Ipv4Addr,
    pub addr_b: std::net::Ipv4Addr,
}

impl Pair {
    pub fn new(tag: &str, net: u8) -> Self {
        let pid = std::process::id();
        let pair = Pair {
            a: Netns::new(&format!("np-{tag}-a-{pid}")),
            b: Netns::new(&format!("np-{tag}-b-{pid}")),
            dev_a: format!("np{net}a"),
            dev_b: format!("np{net}b"),
            addr_a: std::net::Ipv4Addr::new(10, 77, net, 1),
            addr_b: std::net::Ipv4Addr::new(10, 77, net, 2),
        };
        pair.link();
        pair
    }

    /// As [`Pair::new`] under the names and subnet of the capture tests:
    /// namespaces `np6-<tag>-a|b-<pid>`, devices `np6<tag><net>a|b`,
    /// addresses 10.86.<net>.1 and .2.
    pub fn np6(tag: &str, net: u8) -> Self {
        let pid = std::process::id();
        let pair = Pair {
            a: Netns::new(&format!("np6-{tag}-a-{pid}")),
            b: Netns::new(&format!("np6-{tag}-b-{pid}")),
            dev_a: format!("np6{tag}{net}a"),
            dev_b: format!("np6{tag}{net}b"),
            addr_a: std::net::Ipv4Addr::new(10, 86, net, 1),
            addr_b: std::net::Ipv4Addr::new(10, 86, net, 2),
        };
        pair.link();
        pair
    }

    /// Deletes the veth pair (both ends go with either).
    pub fn unlink(&self) {
        sh("ip", &["-n", &self.a.name, "link", "del", &self.dev_a]);
    }

    /// Creates the veth pair, addressed and quiet as described above.
    pub fn link(&self) {
        let (a, b) = (&self.a, &self.b);
        sh(
            "ip",
            &[
                "link",
                "add",
                &self.dev_a,
                "netns",
                &a.name,
                "type",
                "veth",
                "peer",
                "name",
                &self.dev_b,
                "netns",
                &b.name,
            ],
        );
        let mac_a = mac_of(a, &self.dev_a);
        let mac_b = mac_of(b, &self.dev_b);
        for (ns, dev, me, peer, peer_mac) in [
            (a, &self.dev_a, self.addr_a, self.addr_b, &mac_b),
            (b, &self.dev_b, self.addr_b, self.addr_a, &mac_a),
        ] {
            quiet_addr(ns, dev, &me.to_string());
            static_neigh(ns, dev, &peer.to_string(), peer_mac);
        }
    }
}

/// Gives `dev` in `ns` the address `me`/24 and brings it up, quiet and
/// exact to count on: no IPv6 (no router solicitations), no offloads (one
/// segment a frame).
pub fn quiet_addr(ns: &Netns, dev: &str, me: &str) {
    ns.exec(
        "sysctl",
        &["-q", "-w", &format!("net.ipv6.conf.{dev}.disable_ipv6=1")],
    );
    ns.exec(
        "ethtool",
        &["-K", dev, "tso", "off", "gso", "off", "gro", "off"],
    );
    sh(
        "ip",
        &[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{me}/24"),
            "dev",
            dev,
        ],
    );
    sh("ip", &["-n", &ns.name, "link", "set", dev, "up"]);
}

/// A permanent neighbour entry for `peer` on `dev`: no ARP on the link.
pub fn static_neigh(ns: &Netns, dev: &str, peer: &str, mac: &str) {
    sh(
        "ip",
        &[
            "-n",
            &ns.name,
            "neigh",
            "replace",
            peer,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ],
    );
}

pub fn mac_of(ns: &Netns, dev: &str) -> String {
    let out = sh("ip", &["-n", &ns.name, "-j", "link", "show", "dev", dev]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j is JSON");
    v[0]["address"]
        .as_str()
        .expect("link has an address")
        .to_string()
}

/// A tcpdump in a namespace writing `file` (its stderr beside it, as
/// `.log`), stopped by pid.
pub struct Tcpdump(std::process::Child);

impl Tcpdump {
    pub fn start(ns: &Netns, iface: &str, file: &std::path::Path) -> Tcpdump {
        let _ = std::fs::remove_file(file);
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "tcpdump",
                "-i",
                iface,
                "--immediate-mode",
                // 64 MiB of ring: a test's bursts must not overrun it
                // (the tests that compare exact counts fail on a drop).
                "-B",
                "65536",
                "-U",
                "-n",
                "-s",
                "0",
                "-w",
            ])
            .arg(file)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(file.with_extension("log")).unwrap())
            .spawn()
            .unwrap();
        // The file header is written once the capture is live.
        let t = std::time::Instant::now();
        while std::fs::metadata(file).map_or(true, |m| m.len() < 24) {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "tcpdump did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        Tcpdump(child)
    }

    pub fn stop(mut self) {
        std::thread::sleep(std::time::Duration::from_millis(300));
        // SAFETY: signalling the child we started, by its pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let _ = self.0.wait();
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
