//! Why a check failed, row by row, on real traffic: the agent (eBPF
//! backend) runs in namespace a of a veth pair — its "host" — and checks
//! targets in namespace b (the "server host") or on its own host. Each row
//! makes one failure happen for real (a closed port, a firewall rule on
//! either side, a blackholed route, a full accept queue, dnsmasq's error
//! answers, bad certificates, a slow or failing or resetting server),
//! checks the failure against an independent reference (the test's own
//! connect and its errno, the rule's counter, the kernel's
//! `ListenOverflows`, dnsmasq's rcode to the test's own query), and then
//! asserts that the first `GET /api/v1/checks` read at least one second
//! after the failing result carries the row's `evidence.cause` and a
//! non-empty `explanation`.
//!
//! Every check runs every 4 s with a 2 s timeout and no jitter, so the
//! result read a second later is still the check's last one.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, RawFd},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use netpulse_tests::{
    agent::{Live, assert_ebpf_bin, live_prerequisites},
    netns::{Netns, Pair, have},
    require,
    scrape::get,
};

/// The port the rows' servers (or nothing) listen on.
const PORT: u16 = 7301;
const CHECK: &str = "row";

fn ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Addresses of the pair `net` makes: 10.77.<net>.1 (the agent's host)
/// and .2 (the server host).
fn addrs(net: u8) -> (Ipv4Addr, Ipv4Addr) {
    (Ipv4Addr::new(10, 77, net, 1), Ipv4Addr::new(10, 77, net, 2))
}

/// One `[[check]]` named `row`: every 4 s, 2 s timeout, no jitter, `keys`
/// (kind, target and the kind's own keys) as TOML lines.
fn check(keys: &str) -> String {
    format!(
        "[[check]]\nname = \"{CHECK}\"\ninterval_seconds = 4\ntimeout_seconds = 2\njitter_seconds = 0\n{keys}\n"
    )
}

/// The agent in namespace a of a new pair `net`, with `check`, once its
/// kernel programs are attached (drops and TCP health on).
fn start(tag: &str, net: u8, port: u16, check: &str) -> Live {
    assert_ebpf_bin();
    let mut live = Live::start_with(Pair::new(tag, net), tag, port, &[], check);
    live.agent.wait_for("the kernel programs attached", |m| {
        m.value("netpulse_feature_enabled", &[("feature", "kernel_drops")]) == Some(1.0)
            && m.value(
                "netpulse_feature_enabled",
                &[("feature", "tcp_connections")],
            ) == Some(1.0)
    });
    live
}

/// `GET /api/v1/checks` from inside the agent's namespace: the `row`
/// check's entry.
fn read_check(live: &Live, port: u16) -> serde_json::Value {
    let (code, body) = live
        .pair
        .a
        .run(move || {
            get(
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                "/api/v1/checks",
            )
        })
        .expect("GET /api/v1/checks");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    v["checks"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == CHECK))
        .cloned()
        .unwrap_or_else(|| panic!("no check `{CHECK}` in {v:#}"))
}

/// Waits for a failed run of the check that started after this call
/// (the row's failure set up, the programs attached), then reads the
/// checks once, at least one second after that result was stored, and
/// returns the check's entry (its `last` is that failed run).
fn failed_run(live: &mut Live, port: u16) -> serde_json::Value {
    let since = ms_now();
    let deadline = Instant::now() + Duration::from_secs(20);
    let at = loop {
        let c = read_check(live, port);
        let r = &c["recent"][0];
        if r["ok"] == false
            && let (Some(at), Some(took)) = (r["at_ms"].as_i64(), r["duration_ms"].as_f64())
            && at - took as i64 >= since
        {
            break at;
        }
        assert!(
            Instant::now() < deadline && !live.agent.exited(),
            "no failed run of the check since {since}: {c:#}\nlog:\n{}",
            live.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let wait = at + 1000 - ms_now();
    if wait > 0 {
        std::thread::sleep(Duration::from_millis(wait as u64));
    }
    let c = read_check(live, port);
    let last = &c["last"];
    eprintln!(
        "last: ok {} error {} explanation {}\nevidence {:#}",
        last["ok"], last["error"], last["explanation"], last["evidence"]
    );
    assert_eq!(last["ok"], false, "{c:#}");
    assert_eq!(
        c["recent"][0]["at_ms"].as_i64(),
        Some(at),
        "the failed run is still the last one a second later: {c:#}"
    );
    c
}

/// The row's cause is in `last.evidence.cause` and in the newest of
/// `recent`, with an explanation; returns the evidence.
fn assert_cause(c: &serde_json::Value, cause: &str) -> serde_json::Value {
    let last = &c["last"];
    assert_eq!(
        last["evidence"]["cause"], cause,
        "evidence.cause (error {}): {last:#}",
        last["error"]
    );
    let explanation = last["explanation"].as_str().unwrap_or("");
    assert!(
        !explanation.trim().is_empty(),
        "an explanation for {cause}: {last:#}"
    );
    eprintln!("{cause}: {explanation}");
    assert_eq!(c["recent"][0]["cause"], cause, "recent[0]: {c:#}");
    assert_eq!(
        c["recent"][0]["explanation"].as_str(),
        Some(explanation),
        "recent[0]: {c:#}"
    );
    last["evidence"].clone()
}

/// A listener in a namespace with a handler per connection (each on its
/// own thread); stopped on drop (shutdown wakes the accept loop).
struct Server {
    fd: RawFd,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(
        ns: &Netns,
        addr: SocketAddr,
        handle: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Server {
        let l = ns.run(move || TcpListener::bind(addr).expect("bind the row's server"));
        let fd = l.as_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let handle = Arc::new(handle);
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::spawn(move || {
                for c in l.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(c) = c else { return };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let handle = handle.clone();
                    std::thread::spawn(move || handle(c));
                }
            })
        };
        Server {
            fd,
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: the listener's fd, open until its thread returns (it
        // returns only once accept fails, after this).
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads a request head (to the blank line); false if the peer closed
/// first.
fn read_head(r: &mut impl Read) -> bool {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match r.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return false,
        }
    }
    true
}

/// A handler answering `status` after `delay`.
fn http(status: &'static str, delay: Duration) -> impl Fn(TcpStream) + Send + Sync + 'static {
    move |mut c| {
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        if read_head(&mut c) {
            std::thread::sleep(delay);
            let body = "netpulse test\n";
            let _ = write!(
                c,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    }
}

/// SO_LINGER 0: closing sends a RST.
fn linger0(c: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and option value.
    let r = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER");
}

/// The test's own connect from `ns`: the errno it failed with, or None.
fn connect_errno(ns: &Netns, to: SocketAddr) -> Option<i32> {
    ns.run(move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .err()
            .map(|e| e.raw_os_error().unwrap_or(libc::ETIMEDOUT))
    })
}

/// An nft table of one family made in a namespace for a row, deleted on
/// drop.
struct Nft {
    ns: String,
    family: &'static str,
    table: &'static str,
}

impl Nft {
    /// The table with one base chain `c` on `hook` and one rule in it:
    /// `matches`, a counter, `verdict`.
    fn rule(ns: &Netns, family: &'static str, hook: &str, matches: &str, verdict: &str) -> Nft {
        let t = Nft {
            ns: ns.name.clone(),
            family,
            table: "npexplain",
        };
        t.nft(&format!("add table {family} npexplain"));
        t.nft(&format!(
            "add chain {family} npexplain c {{ type filter hook {hook} priority 0 ; }}"
        ));
        t.nft(&format!(
            "add rule {family} npexplain c {matches} counter {verdict}"
        ));
        t
    }

    fn nft(&self, args: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft"])
            .args(args.split(' '))
            .output()
            .expect("spawn nft");
        assert!(
            out.status.success(),
            "nft {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Packets the rule matched (its counter).
    fn packets(&self) -> u64 {
        let text = self.nft(&format!("list chain {} {} c", self.family, self.table));
        let i = text.find("counter packets ").expect("the rule's counter");
        text[i + 16..]
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a count")
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "delete", "table"])
            .args([self.family, self.table])
            .output();
    }
}

/// `ip route add <spec>` in a namespace, deleted on drop.
struct Route {
    ns: String,
    spec: Vec<String>,
}

impl Route {
    fn add(ns: &Netns, spec: &str) -> Route {
        let spec: Vec<String> = spec.split(' ').map(String::from).collect();
        let mut args = vec!["-n", &ns.name, "route", "add"];
        args.extend(spec.iter().map(String::as_str));
        netpulse_tests::netns::sh("ip", &args);
        Route {
            ns: ns.name.clone(),
            spec,
        }
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.ns, "route", "del"])
            .args(&self.spec)
            .output();
    }
}

/// A counter of `/proc/net/netstat` (`TcpExt`, ...) in a namespace.
fn netstat(ns: &Netns, group: &str, name: &str) -> u64 {
    let out = ns.exec("cat", &["/proc/net/netstat"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(head), Some(vals)) = (lines.next(), lines.next()) else {
        panic!("no {group} lines in /proc/net/netstat");
    };
    let i = head
        .split_whitespace()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("no {group} {name}"));
    vals.split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .expect("a counter")
}

// --- TCP: refused, dropped here or beyond, rejected, no route, full queue ---

#[test]
fn closed_port_is_refused() {
    if !live_prerequisites() {
        return;
    }
    let (net, port) = (160, 19700);
    let (_, b) = addrs(net);
    let mut live = start(
        "xclosed",
        net,
        port,
        &check(&format!("kind = \"tcp\"\ntarget = \"{b}:{PORT}\"")),
    );
    let to = SocketAddr::from((b, PORT));
    assert_eq!(
        connect_errno(&live.pair.a, to),
        Some(libc::ECONNREFUSED),
        "nothing listens there"
    );
    let c = failed_run(&mut live, port);
    let ev = assert_cause(&c, "refused");
    assert_eq!(ev["target"], to.to_string(), "{ev:#}");
    assert_eq!(ev["errno"], "ECONNREFUSED", "{ev:#}");
    assert!(ev["resets_received"].as_u64() >= Some(1), "{ev:#}");
}

/// A listener in namespace b that completes handshakes and holds them.
fn holder(ns: &Netns, addr: Ipv4Addr) -> Server {
    Server::start(ns, SocketAddr::from((addr, PORT)), |mut c| {
        let mut buf = [0u8; 512];
        while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
    })
}

/// SYNs to a listener dropped by a rule on this host's `hook` (output: the
/// listener is on the server host; input: on this host, reached at its
/// veth address): local_firewall_drop, with a netfilter_drop of the
/// check's own packets on that path for every SYN the check sent, no more
/// than the rule's counter.
fn local_firewall_row(tag: &str, net: u8, port: u16, hook: &str) {
    if !live_prerequisites() || !require("nft (nftables)", have("nft")) {
        return;
    }
    let (a, b) = addrs(net);
    let dst = if hook == "input" { a } else { b };
    let mut live = start(
        tag,
        net,
        port,
        &check(&format!("kind = \"tcp\"\ntarget = \"{dst}:{PORT}\"")),
    );
    let server = holder(
        if hook == "input" {
            &live.pair.a
        } else {
            &live.pair.b
        },
        dst,
    );
    let to = SocketAddr::from((dst, PORT));
    assert_eq!(connect_errno(&live.pair.a, to), None, "reachable before");
    let fw = Nft::rule(
        &live.pair.a,
        "inet",
        hook,
        &format!("ip daddr {dst} tcp dport {PORT} tcp flags syn"),
        "drop",
    );
    let accepted = server.accepted();
    let c = failed_run(&mut live, port);
    let dropped = fw.packets();
    assert!(dropped >= 1, "the rule dropped the check's SYNs");
    assert_eq!(server.accepted(), accepted, "no SYN got through the rule");
    let ev = assert_cause(&c, "local_firewall_drop");
    let drops = ev["drops"].as_array().cloned().unwrap_or_default();
    // The check's own SYNs (egress), dropped on the path of the hook:
    // output while this host sends them, input once they come back in.
    let n = drops
        .iter()
        .find(|d| d["reason"] == "netfilter_drop" && d["direction"] == "egress" && d["path"] == hook)
        .and_then(|d| d["count"].as_u64())
        .unwrap_or_else(|| {
            panic!("a netfilter_drop of the check's SYNs on {hook} ({dropped} by the rule's counter): {ev:#}")
        });
    assert!(
        c["last"]["explanation"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("dropped by this host's firewall on {hook}")),
        "{c:#}"
    );
    assert!(
        (1..=dropped).contains(&n),
        "{n} drops, {dropped} by the rule's counter: {ev:#}"
    );
    assert_eq!(ev["syns_sent"], n, "every SYN sent was dropped: {ev:#}");
    assert_eq!(ev["synack_received"], false, "{ev:#}");
}

#[test]
fn syns_dropped_by_this_hosts_output_firewall() {
    local_firewall_row("xout", 161, 19701, "output");
}

#[test]
fn syns_dropped_by_this_hosts_input_firewall() {
    local_firewall_row("xin", 162, 19702, "input");
}

#[test]
fn syns_dropped_on_the_server_host_are_lost_beyond_this_one() {
    if !live_prerequisites() || !require("nft (nftables)", have("nft")) {
        return;
    }
    let (net, port) = (163, 19703);
    let (_, b) = addrs(net);
    let mut live = start(
        "xbeyond",
        net,
        port,
        &check(&format!("kind = \"tcp\"\ntarget = \"{b}:{PORT}\"")),
    );
    let fw = Nft::rule(
        &live.pair.b,
        "inet",
        "input",
        &format!("tcp dport {PORT} tcp flags syn"),
        "drop",
    );
    let server = holder(&live.pair.b, b);
    let c = failed_run(&mut live, port);
    let dropped = fw.packets();
    assert!(dropped >= 1, "the server host's rule dropped the SYNs");
    assert_eq!(server.accepted(), 0);
    let ev = assert_cause(&c, "lost_beyond_host");
    assert!(
        ev["drops"].as_array().is_none_or(|d| d.is_empty()),
        "nothing dropped on this host: {ev:#}"
    );
    let sent = ev["syns_sent"].as_u64().unwrap_or(0);
    assert!(
        (1..=dropped).contains(&sent),
        "{sent} SYNs sent, {dropped} dropped by the server host's rule: {ev:#}"
    );
}

/// A listener on the server host behind a rule there rejecting its
/// connections with `verdict` (tables of `family`): the test's own
/// connect fails with ECONNREFUSED (TCP reports a port unreachable so
/// too), the check's run has `cause`; its evidence.
fn reject_row(
    tag: &str,
    net: u8,
    port: u16,
    family: &'static str,
    verdict: &str,
    cause: &str,
) -> Option<serde_json::Value> {
    if !live_prerequisites() || !require("nft (nftables)", have("nft")) {
        return None;
    }
    let (_, b) = addrs(net);
    let mut live = start(
        tag,
        net,
        port,
        &check(&format!("kind = \"tcp\"\ntarget = \"{b}:{PORT}\"")),
    );
    let fw = Nft::rule(
        &live.pair.b,
        family,
        "input",
        &format!("tcp dport {PORT}"),
        verdict,
    );
    let server = holder(&live.pair.b, b);
    let to = SocketAddr::from((b, PORT));
    assert_eq!(connect_errno(&live.pair.a, to), Some(libc::ECONNREFUSED));
    let c = failed_run(&mut live, port);
    assert!(fw.packets() >= 2, "the rule answered the check's SYN");
    assert_eq!(server.accepted(), 0);
    let ev = assert_cause(&c, cause);
    assert_eq!(ev["errno"], "ECONNREFUSED", "{ev:#}");
    assert_eq!(ev["synack_received"], false, "{ev:#}");
    Some(ev)
}

#[test]
fn reject_with_tcp_reset_is_refused() {
    if let Some(ev) = reject_row(
        "xrst",
        164,
        19704,
        "inet",
        "reject with tcp reset",
        "refused",
    ) {
        assert!(ev["resets_received"].as_u64() >= Some(1), "{ev:#}");
    }
}

#[test]
fn reject_with_icmp_port_unreachable() {
    if let Some(ev) = reject_row(
        "xicmp",
        165,
        19705,
        "ip",
        "reject with icmp type port-unreachable",
        "icmp_unreachable",
    ) {
        let (_, b) = addrs(165);
        assert_eq!(ev["icmp"]["from"], b.to_string(), "{ev:#}");
    }
}

/// A route of `kind` (blackhole, unreachable) to 10.99.<net>.0/24 on
/// this host; the check's connect to an address there fails with `errno`.
fn no_route(tag: &str, net: u8, port: u16, kind: &str, errno: i32) {
    if !live_prerequisites() {
        return;
    }
    let target = Ipv4Addr::new(10, 99, net, 5);
    let mut live = start(
        tag,
        net,
        port,
        &check(&format!("kind = \"tcp\"\ntarget = \"{target}:{PORT}\"")),
    );
    let _route = Route::add(&live.pair.a, &format!("{kind} 10.99.{net}.0/24"));
    let to = SocketAddr::from((target, PORT));
    assert_eq!(connect_errno(&live.pair.a, to), Some(errno), "{kind}");
    let c = failed_run(&mut live, port);
    let ev = assert_cause(&c, "no_route");
    assert_eq!(ev["route"], kind, "{ev:#}");
    assert_eq!(ev["syns_sent"], 0, "nothing left this host: {ev:#}");
}

#[test]
fn blackholed_route_is_no_route() {
    no_route("xblack", 166, 19706, "blackhole", libc::EINVAL);
}

#[test]
fn unreachable_route_is_no_route() {
    no_route("xunreach", 167, 19707, "unreachable", libc::EHOSTUNREACH);
}

#[test]
fn full_accept_queue_on_this_host() {
    if !live_prerequisites() {
        return;
    }
    let (net, port) = (168, 19708);
    let (a, _) = addrs(net);
    let mut live = start(
        "xqueue",
        net,
        port,
        &check(&format!("kind = \"tcp\"\ntarget = \"{a}:{PORT}\"")),
    );
    // A listener on this host with a backlog of 1 that never accepts.
    let to = SocketAddr::from((a, PORT));
    let listener = live.pair.a.run(move || {
        let l = TcpListener::bind(to).expect("bind");
        // SAFETY: a listening socket; listen again sets its backlog.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 1) }, 0);
        l
    });
    // The queue holds backlog + 1 = 2 handshaken connections; fill it
    // from the server host's side, until a connect no longer completes.
    let overflows0 = netstat(&live.pair.a, "TcpExt", "ListenOverflows");
    let fillers = live.pair.b.run(move || {
        let mut held = Vec::new();
        while let Ok(c) = TcpStream::connect_timeout(&to, Duration::from_millis(1500)) {
            held.push(c);
            assert!(held.len() <= 4, "the queue does not fill");
        }
        held
    });
    assert_eq!(fillers.len(), 2, "backlog 1 holds two connections");
    let c = failed_run(&mut live, port);
    assert!(
        netstat(&live.pair.a, "TcpExt", "ListenOverflows") > overflows0,
        "the kernel counted the overflows"
    );
    let overflows = netstat(&live.pair.a, "TcpExt", "ListenOverflows") - overflows0;
    let ev = assert_cause(&c, "accept_queue_full");
    let n = ev["listen_overflows"].as_u64().unwrap_or(0);
    assert!(
        (1..=overflows).contains(&n),
        "{n} overflows in evidence, {overflows} by the kernel's count: {ev:#}"
    );
    drop(fillers);
    drop(listener);
}

// --- DNS -------------------------------------------------------------------

/// Two dnsmasqs in the server host, killed by pid on drop: the one the
/// check asks, on <b>:53, answers NXDOMAIN for nx.netpulse.test and
/// forwards sf.netpulse.test to the other (127.0.0.1:53 there), whose
/// unsigned answer fails its DNSSEC validation against a trust anchor made
/// up for the domain: SERVFAIL.
struct Dnsmasq(Vec<Child>);

impl Dnsmasq {
    fn start(ns: &Netns, b: Ipv4Addr) -> Dnsmasq {
        let spawn = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &ns.name, "dnsmasq"])
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--user=root",
                    "--port=53",
                    "--pid-file=",
                ])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start dnsmasq")
        };
        let anchor = "E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D";
        let upstream = spawn(&[
            "--listen-address=127.0.0.1",
            "--address=/sf.netpulse.test/10.1.2.3",
        ]);
        let front = spawn(&[
            &format!("--listen-address={b}"),
            "--address=/nx.netpulse.test/",
            "--server=/sf.netpulse.test/127.0.0.1",
            "--dnssec",
            &format!("--trust-anchor=.,20326,8,2,{anchor}"),
            &format!("--trust-anchor=sf.netpulse.test,12345,8,2,{anchor}"),
        ]);
        Dnsmasq(vec![upstream, front])
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The rcode of the server's answer to the test's own query for `name`
/// (type A), asked from `ns`; None without an answer.
fn rcode(ns: &Netns, server: SocketAddr, name: &str) -> Option<u8> {
    let mut q = vec![0x4e, 0x50, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        s.send_to(&q, server).ok()?;
        let mut buf = [0u8; 512];
        let (n, _) = s.recv_from(&mut buf).ok()?;
        (n >= 4 && buf[..2] == q[..2]).then_some(buf[3] & 0x0f)
    })
}

fn dns_row(tag: &str, net: u8, port: u16, name: &str, want: u8, rcode_name: &str) {
    if !live_prerequisites() || !require("dnsmasq (dnsmasq-base)", have("dnsmasq")) {
        return;
    }
    let (_, b) = addrs(net);
    let mut live = start(
        tag,
        net,
        port,
        &check(&format!(
            "kind = \"dns\"\ntarget = \"{name}\"\nserver = \"{b}:53\""
        )),
    );
    let _dns = Dnsmasq::start(&live.pair.b, b);
    let server = SocketAddr::from((b, 53));
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        if let Some(r) = rcode(&live.pair.a, server, name) {
            break r;
        }
        assert!(Instant::now() < deadline, "dnsmasq does not answer");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(got, want, "dnsmasq answers {name} with {rcode_name}");
    let c = failed_run(&mut live, port);
    let ev = assert_cause(&c, "dns_rcode");
    assert_eq!(ev["dns_rcode"], rcode_name, "{ev:#}");
}

#[test]
fn dns_nxdomain_from_dnsmasq() {
    dns_row("xnx", 169, 19709, "gone.nx.netpulse.test", 3, "NXDOMAIN");
}

#[test]
fn dns_servfail_from_dnsmasq() {
    dns_row("xsf", 170, 19710, "api.sf.netpulse.test", 2, "SERVFAIL");
}

// --- TLS and HTTP ------------------------------------------------------------

/// An HTTPS check of <b>:PORT, trusting (`tls_ca_file`) the self-signed
/// certificate the server there presents: for `names`, valid from January
/// 1st of `years.0` to January 1st of `years.1`. The cause is `tls`, and
/// `evidence.tls` mentions one of `want`.
fn https_row(tag: &str, net: u8, port: u16, names: &[&str], years: (i32, i32), want: &[&str]) {
    if !live_prerequisites() {
        return;
    }
    let (_, b) = addrs(net);
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("certificate parameters");
    params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
    params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
    let key = rcgen::KeyPair::generate().expect("a key");
    let cert = params.self_signed(&key).expect("a certificate");
    let dir = Scratch(netpulse_tests::scratch(&format!("{tag}-ca")));
    let ca = dir.0.join("ca.pem");
    std::fs::write(&ca, cert.pem()).expect("write the certificate");
    let mut live = start(
        tag,
        net,
        port,
        &check(&format!(
            "kind = \"http\"\ntarget = \"https://{b}:{PORT}/\"\ntls_ca_file = \"{}\"",
            ca.display()
        )),
    );
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("the key"),
        )
        .expect("the test's certificate"),
    );
    let handshakes = Arc::new(AtomicUsize::new(0));
    let done = handshakes.clone();
    let _server = Server::start(&live.pair.b, SocketAddr::from((b, PORT)), move |c| {
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
            return;
        };
        let mut tls = rustls::StreamOwned::new(conn, c);
        if read_head(&mut tls) {
            done.fetch_add(1, Ordering::SeqCst);
            let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let c = failed_run(&mut live, port);
    assert_eq!(
        handshakes.load(Ordering::SeqCst),
        0,
        "no request got through the handshake"
    );
    let ev = assert_cause(&c, "tls");
    let tls = ev["tls"].as_str().unwrap_or("").to_lowercase();
    assert!(
        want.iter().any(|w| tls.contains(w)),
        "evidence.tls {tls:?} mentions one of {want:?}: {ev:#}"
    );
}

/// A scratch directory removed on drop.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn expired_certificate() {
    let (_, b) = addrs(171);
    https_row(
        "xexpired",
        171,
        19711,
        &[&b.to_string()],
        (2020, 2021),
        &["expired"],
    );
}

#[test]
fn certificate_for_another_host() {
    https_row(
        "xname",
        172,
        19712,
        &["wrong.netpulse.test"],
        (2024, 2031),
        &["name"],
    );
}

/// An HTTP check of <b>:PORT/ (with `extra` check keys) against a server
/// in the server host running `handle`: the check's entry once a run
/// failed, and how many connections the server accepted.
fn http_row(
    tag: &str,
    net: u8,
    port: u16,
    extra: &str,
    handle: impl Fn(TcpStream) + Send + Sync + 'static,
) -> Option<(serde_json::Value, usize)> {
    if !live_prerequisites() {
        return None;
    }
    let (_, b) = addrs(net);
    let mut live = start(
        tag,
        net,
        port,
        &check(&format!(
            "kind = \"http\"\ntarget = \"http://{b}:{PORT}/\"\n{extra}"
        )),
    );
    let server = Server::start(&live.pair.b, SocketAddr::from((b, PORT)), handle);
    let c = failed_run(&mut live, port);
    Some((c, server.accepted()))
}

#[test]
fn http_503() {
    let Some((c, accepted)) = http_row(
        "x503",
        173,
        19713,
        "",
        http("503 Service Unavailable", Duration::ZERO),
    ) else {
        return;
    };
    assert!(accepted >= 1);
    assert_eq!(c["last"]["http_status"], 503, "{c:#}");
    let ev = assert_cause(&c, "http_status");
    assert_eq!(ev["http_status"], 503, "{ev:#}");
}

#[test]
fn answer_slower_than_max_latency() {
    let Some((c, accepted)) = http_row(
        "xslow",
        174,
        19714,
        "max_latency_seconds = 0.4",
        http("200 OK", Duration::from_millis(1000)),
    ) else {
        return;
    };
    assert!(accepted >= 1);
    let last = &c["last"];
    assert_eq!(last["http_status"], 200, "{c:#}");
    let took = last["duration_seconds"].as_f64().unwrap_or(0.0);
    assert!((1.0..2.0).contains(&took), "answered in {took} s: {c:#}");
    let ev = assert_cause(&c, "slow");
    assert_eq!(ev["max_latency_seconds"], 0.4, "{ev:#}");
}

#[test]
fn reset_by_the_server_after_the_request() {
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    let Some((c, accepted)) = http_row("xreset", 175, 19715, "", move |mut c| {
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        if read_head(&mut c) {
            seen.fetch_add(1, Ordering::SeqCst);
            linger0(&c);
        }
    }) else {
        return;
    };
    assert!(accepted >= 1);
    assert!(
        requests.load(Ordering::SeqCst) >= 1,
        "the server read the request"
    );
    let ev = assert_cause(&c, "reset_after_request");
    assert_eq!(ev["synack_received"], true, "{ev:#}");
    assert!(ev["resets_received"].as_u64() >= Some(1), "{ev:#}");
}
