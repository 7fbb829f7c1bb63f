//! Why a check failed. A run keeps a [`Trace`] of its own flows: each
//! socket is bound before it connects (so its 5-tuple is known even when
//! the connect fails), asks for ICMP errors (`IP_RECVERR`: the kernel
//! matches an ICMP error to the socket by the headers it quotes), and is
//! put on the kernel's watch list (`health::Watch`), where the drop and
//! reset programs report on it. When the run is over, the trace reads what
//! each socket and the kernel saw, and [`explain`] turns it into
//! `evidence` (with its `cause`) and one line for a person.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    time::Duration,
};

use agent_ebpf::{PROTO_TCP, PROTO_UDP, WATCH_EGRESS, WATCH_INGRESS, WatchKey};
use tokio::net::{TcpSocket, TcpStream};

use super::{Kind, Spec, kinds::Outcome};
use crate::api_types::{Cause, DropEvidence, Evidence, IcmpError};

/// How far a run got: where a timeout or an error struck.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    #[default]
    Resolve,
    Connect,
    Tls,
    /// Connected (and TLS done): the request sent, the answer awaited.
    Exchange,
    /// An answer came; the check judged it.
    Judged,
}

/// One flow of the run.
struct Flow {
    /// A duplicate of the check's socket, to read it after the socket
    /// itself is gone (a failed connect consumes it).
    fd: OwnedFd,
    key: Option<WatchKey>,
    proto: u8,
    target: SocketAddr,
    connected: bool,
}

/// What a run learns about its own flows, as it goes.
#[derive(Default)]
pub struct Trace {
    flows: Vec<Flow>,
    pub ev: Evidence,
    pub stage: Stage,
    /// The OS error of the failed connect or exchange.
    pub errno: Option<i32>,
    /// The run's own timeout struck.
    pub timed_out: bool,
    /// How long the connect of the last flow took, if it succeeded.
    pub handshake: Option<Duration>,
    /// A target on this host: its port, and `ListenOverflows` before.
    local_listener: Option<(SocketAddr, Option<u64>)>,
}

impl Trace {
    pub fn new() -> Self {
        let mut t = Trace::default();
        t.ev.kernel_drops_watched = crate::health::watch().is_some();
        t
    }

    /// A TCP connect to `addr`, from a socket bound (port 0) first and
    /// watched.
    pub async fn connect(&mut self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        self.stage = self.stage.max(Stage::Connect);
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        recv_errors(sock.as_raw_fd(), addr.is_ipv6());
        let any: IpAddr = if addr.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        };
        sock.bind(SocketAddr::new(any, 0))?;
        let local = sock.local_addr()?;
        let fd = sock.as_fd().try_clone_to_owned()?;
        self.add(fd, PROTO_TCP, local.port(), addr);
        if self.local_listener.is_none() && is_local(addr.ip()) {
            self.local_listener = Some((addr, listen_overflows()));
        }
        let t = std::time::Instant::now();
        match sock.connect(addr).await {
            Ok(s) => {
                self.handshake = Some(t.elapsed());
                if let Some(f) = self.flows.last_mut() {
                    f.connected = true;
                }
                if let Ok(l) = s.local_addr() {
                    self.ev.local = Some(l.to_string());
                }
                self.errno = None;
                Ok(s)
            }
            Err(e) => {
                self.errno = e.raw_os_error();
                Err(e)
            }
        }
    }

    /// A UDP socket of the run (bound, about to send to `server`): watched.
    pub fn udp(&mut self, sock: &tokio::net::UdpSocket, server: SocketAddr) {
        recv_errors(sock.as_raw_fd(), server.is_ipv6());
        let (Ok(local), Ok(fd)) = (sock.local_addr(), sock.as_fd().try_clone_to_owned()) else {
            return;
        };
        self.add(fd, PROTO_UDP, local.port(), server);
    }

    fn add(&mut self, fd: OwnedFd, proto: u8, lport: u16, target: SocketAddr) {
        let key = crate::health::watch().and_then(|w| {
            let k = crate::health::watch_key(proto, lport, target);
            w.add(&k).then_some(k)
        });
        if key.is_none() {
            // A flow the kernel does not watch: "nothing dropped" unknown.
            self.ev.kernel_drops_watched = false;
        }
        self.ev.target = Some(target.to_string());
        self.ev.local = None;
        self.flows.push(Flow {
            fd,
            key,
            proto,
            target,
            connected: false,
        });
    }

    /// Reads what the sockets and the kernel saw of every flow, and stops
    /// watching them. Drops add up over the flows; the rest is the last
    /// flow's.
    pub fn finish(&mut self) {
        let watch = crate::health::watch();
        let mut drops: Vec<DropEvidence> = Vec::new();
        let n = self.flows.len();
        for (i, f) in self.flows.iter().enumerate() {
            let last = i + 1 == n;
            if let (Some(w), Some(k)) = (watch, &f.key)
                && let Some(st) = w.take(k)
            {
                for (dir, name) in [(WATCH_EGRESS, "egress"), (WATCH_INGRESS, "ingress")] {
                    if st.drops[dir] == 0 {
                        continue;
                    }
                    let reason = w.reason(st.reason[dir]);
                    let path = if st.received & (1 << dir) != 0 {
                        "input"
                    } else {
                        "output"
                    };
                    match drops
                        .iter_mut()
                        .find(|d| d.reason == reason && d.direction == name && d.path == path)
                    {
                        Some(d) => d.count += st.drops[dir],
                        None => drops.push(DropEvidence {
                            reason,
                            direction: name.into(),
                            path: path.into(),
                            count: st.drops[dir],
                        }),
                    }
                }
                if last && f.proto == PROTO_TCP {
                    self.ev.resets_received = Some(st.resets);
                }
            }
            if !last {
                continue;
            }
            self.ev.target = Some(f.target.to_string());
            if self.ev.local.is_none()
                && let Ok(Some(l)) = socket2::SockRef::from(&f.fd)
                    .local_addr()
                    .map(|a| a.as_socket())
                && !l.ip().is_unspecified()
            {
                self.ev.local = Some(l.to_string());
            }
            if let Some(icmp) = icmp_error(f.fd.as_raw_fd()) {
                self.ev.icmp = Some(icmp);
            }
            if f.proto == PROTO_TCP {
                self.ev.synack_received = Some(f.connected);
                if !f.connected
                    && let Some(info) = tcp_info(f.fd.as_raw_fd())
                {
                    // Nothing left the host when the route refused.
                    let never_sent = matches!(
                        self.errno,
                        Some(libc::EINVAL | libc::EACCES | libc::ENETUNREACH | libc::EHOSTUNREACH)
                    ) && self.ev.icmp.is_none()
                        && info.tcpi_total_retrans == 0
                        && info.tcpi_state == TCP_CLOSE;
                    self.ev.syns_sent = Some(if never_sent {
                        0
                    } else {
                        1 + info.tcpi_total_retrans
                    });
                }
            }
        }
        self.ev.drops = drops;
        if let Some(e) = self.errno {
            self.ev.errno = Some(errno_name(e));
        }
        if let Some((addr, before)) = self.local_listener {
            let after = listen_overflows();
            if let (Some(b), Some(a)) = (before, after) {
                self.ev.listen_overflows = Some(a.saturating_sub(b));
            }
            self.ev.accept_queue = accept_queue(addr);
        }
        // Closing the duplicates now ends a connect still in flight.
        self.flows.clear();
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        if let Some(w) = crate::health::watch() {
            for f in &self.flows {
                if let Some(k) = &f.key {
                    let _ = w.take(k);
                }
            }
        }
    }
}

const TCP_CLOSE: u8 = 7;

/// Asks the kernel to queue ICMP errors about this socket's packets.
fn recv_errors(fd: RawFd, v6: bool) {
    let on: libc::c_int = 1;
    let (level, opt) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
    } else {
        (libc::IPPROTO_IP, libc::IP_RECVERR)
    };
    // SAFETY: a valid fd and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn tcp_info(fd: RawFd) -> Option<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; the kernel fills at most `len`.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        );
        (rc == 0).then_some(info)
    }
}

/// The last ICMP error queued on the socket (`MSG_ERRQUEUE`), if any.
fn icmp_error(fd: RawFd) -> Option<IcmpError> {
    let mut found = None;
    // A few at most: each read takes one.
    for _ in 0..8 {
        let mut data = [0u8; 256];
        let mut control = [0u64; 64];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: msghdr is plain data, filled below with buffers that
        // outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: as above.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n < 0 {
            break;
        }
        // SAFETY: the control buffer as the kernel filled it, walked with
        // the CMSG macros within msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
                let ours = (level == libc::IPPROTO_IP && ty == libc::IP_RECVERR)
                    || (level == libc::IPPROTO_IPV6 && ty == libc::IPV6_RECVERR);
                if ours {
                    let ee = libc::CMSG_DATA(c) as *const libc::sock_extended_err;
                    let e = std::ptr::read_unaligned(ee);
                    let v6 = match e.ee_origin {
                        libc::SO_EE_ORIGIN_ICMP => Some(false),
                        libc::SO_EE_ORIGIN_ICMP6 => Some(true),
                        _ => None,
                    };
                    if let Some(v6) = v6 {
                        let from = offender(ee);
                        found = Some(IcmpError {
                            icmp_type: e.ee_type,
                            code: e.ee_code,
                            from: from.map(|a| a.to_string()),
                            text: icmp_text(v6, e.ee_type, e.ee_code).to_string(),
                        });
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
    found
}

/// The address that sent the ICMP error (`SO_EE_OFFENDER`: right after the
/// extended error).
///
/// # Safety
/// `ee` points into a control message the kernel wrote with room for
/// the offender's address.
unsafe fn offender(ee: *const libc::sock_extended_err) -> Option<IpAddr> {
    // SAFETY: per the function's contract.
    unsafe {
        let sa = ee.add(1) as *const libc::sockaddr;
        match i32::from(std::ptr::read_unaligned(sa).sa_family) {
            libc::AF_INET => {
                let a = std::ptr::read_unaligned(sa as *const libc::sockaddr_in);
                Some(IpAddr::from(a.sin_addr.s_addr.to_ne_bytes()))
            }
            libc::AF_INET6 => {
                let a = std::ptr::read_unaligned(sa as *const libc::sockaddr_in6);
                Some(IpAddr::from(a.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

pub(crate) fn icmp_text(v6: bool, ty: u8, code: u8) -> &'static str {
    if v6 {
        return match (ty, code) {
            (1, 0) => "no route to destination",
            (1, 1) => "communication administratively prohibited",
            (1, 3) => "address unreachable",
            (1, 4) => "port unreachable",
            (1, 5) => "source address failed policy",
            (1, 6) => "reject route to destination",
            (1, _) => "destination unreachable",
            (2, _) => "packet too big",
            (3, _) => "time exceeded",
            (4, _) => "parameter problem",
            _ => "ICMPv6 error",
        };
    }
    match (ty, code) {
        (3, 0) => "network unreachable",
        (3, 1) => "host unreachable",
        (3, 2) => "protocol unreachable",
        (3, 3) => "port unreachable",
        (3, 4) => "fragmentation needed",
        (3, 9 | 10 | 13) => "communication administratively prohibited",
        (3, _) => "destination unreachable",
        (11, _) => "time exceeded",
        (12, _) => "parameter problem",
        _ => "ICMP error",
    }
}

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EINVAL => "EINVAL",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EPIPE => "EPIPE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EMSGSIZE => "EMSGSIZE",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

/// Whether `ip` is this host's (in the agent's namespace): it binds.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The kernel's `TcpExt ListenOverflows` in this namespace.
fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines();
    while let Some(head) = lines.next() {
        let values = lines.next()?;
        if !head.starts_with("TcpExt:") {
            continue;
        }
        let i = head
            .split_whitespace()
            .position(|f| f == "ListenOverflows")?;
        return values.split_whitespace().nth(i)?.parse().ok();
    }
    None
}

/// Connections waiting in the accept queue of the listener on `addr`'s
/// port (`/proc/net/tcp*`: a listener's receive queue).
fn accept_queue(addr: SocketAddr) -> Option<u64> {
    let mut best: Option<u64> = None;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(queues)) = (f.get(1), f.get(3), f.get(4)) else {
                continue;
            };
            let port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state != "0A" || port != Some(addr.port()) {
                continue;
            }
            let rx = queues
                .split(':')
                .nth(1)
                .and_then(|q| u64::from_str_radix(q, 16).ok());
            best = best.max(rx);
        }
    }
    best
}

/// The cause and the line for a person of a failed run, from what it
/// found; fills `out.evidence` and `out.explanation`.
pub fn explain(spec: &Spec, out: &mut Outcome, mut trace: Trace) {
    if out.ok {
        return;
    }
    let mut ev = std::mem::take(&mut trace.ev);
    ev.phases = out
        .phases
        .iter()
        .map(|(p, d)| (p.to_string(), d.as_secs_f64()))
        .collect();
    ev.http_status = ev.http_status.or(out.http_status);
    let target = ev.target.clone().unwrap_or_else(|| spec.target());
    let error = out.error.clone().unwrap_or_default();
    // A cause the check itself set (an answer it judged) stands.
    let (cause, line) = if ev.cause != Cause::Unknown {
        (ev.cause, judged(out, &ev, &error))
    } else {
        flow_cause(spec, &trace, &mut ev, &target, &error)
    };
    ev.cause = cause;
    out.explanation = Some(line);
    out.evidence = Some(ev);
}

/// "3 ms", "2.1 s".
fn took(d: f64) -> String {
    if d < 1.0 {
        let ms = d * 1000.0;
        if ms < 10.0 {
            format!("{ms:.1} ms")
        } else {
            format!("{ms:.0} ms")
        }
    } else {
        format!("{d:.1} s")
    }
}

/// The phase that took most of a run, as words, when it took most of it.
fn slowest(ev: &Evidence, total: f64) -> Option<String> {
    let (name, d) = ev
        .phases
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(n, d)| (n.as_str(), *d))?;
    if total <= 0.0 || d < total * 0.5 || d < 0.05 {
        return None;
    }
    let who = match name {
        "dns" => "name resolution was slow",
        "connect" => "the TCP handshake was slow",
        "tls" => "the TLS handshake was slow",
        "first_byte" => "the server was slow",
        "transfer" => "the transfer was slow",
        _ => return None,
    };
    let label = name.replace('_', " ");
    Some(format!("{label} {}: {who}", took(d)))
}

/// The line for a failure the check judged from an answer.
fn judged(out: &Outcome, ev: &Evidence, error: &str) -> String {
    let total = out.duration.as_secs_f64();
    let with_slowest = |s: String| match slowest(ev, total) {
        Some(p) => format!("{s} ({p})"),
        None => s,
    };
    match ev.cause {
        Cause::HttpStatus => with_slowest(format!(
            "HTTP {} after {}",
            ev.http_status.unwrap_or(0),
            took(total)
        )),
        Cause::Slow => {
            let max = ev.max_latency_seconds.unwrap_or(0.0);
            let what = match ev.http_status {
                Some(s) => format!("HTTP {s}"),
                None => "the answer".into(),
            };
            with_slowest(format!(
                "{what} after {}, more than the {} allowed",
                took(total),
                took(max)
            ))
        }
        Cause::DnsRcode => format!(
            "DNS answer {} from {} in {}",
            ev.dns_rcode.as_deref().unwrap_or("?"),
            ev.dns_server.as_deref().unwrap_or("the server"),
            took(total)
        ),
        Cause::Tls => format!("TLS: {}", ev.tls.as_deref().unwrap_or(error)),
        Cause::Resolve => format!("the name did not resolve: {error}"),
        _ => error.to_string(),
    }
}

/// The cause of a failure of the flow itself (no answer judged).
fn flow_cause(
    spec: &Spec,
    trace: &Trace,
    ev: &mut Evidence,
    target: &str,
    error: &str,
) -> (Cause, String) {
    let udp = matches!(spec.kind, Kind::Dns(_));
    let what = if udp { "query" } else { "SYN" };
    let tries = ev.syns_sent.unwrap_or(0);
    let tries_text = |n: u32| {
        if n == 1 {
            "1 try".to_string()
        } else {
            format!("{n} tries")
        }
    };
    // 1. An ICMP error quoting our packet.
    if let Some(icmp) = &ev.icmp {
        let from = icmp.from.as_deref().unwrap_or("?");
        return (
            Cause::IcmpUnreachable,
            format!("ICMP {} from {from} ({what} to {target})", icmp.text),
        );
    }
    // 2. A reset answered the SYN.
    if trace.errno == Some(libc::ECONNREFUSED) && !ev.synack_received.unwrap_or(false) {
        return (
            Cause::Refused,
            format!(
                "{target} answered RST: nothing listens there (or a firewall rejects with a reset)"
            ),
        );
    }
    // 3. This host's routing refused.
    if trace.stage == Stage::Connect && ev.syns_sent == Some(0) {
        let route = match trace.errno {
            Some(libc::EINVAL) => "blackhole",
            Some(libc::EHOSTUNREACH) => "unreachable",
            Some(libc::EACCES) => "prohibit",
            _ => "none",
        };
        let ip = target.rsplit_once(':').map_or(target, |(h, _)| h);
        let line = match route {
            "none" => format!("this host has no route to {ip}"),
            "unreachable" => {
                format!(
                    "this host's routing table has an unreachable route to {ip}: nothing was sent"
                )
            }
            r => format!("this host's routing table has a {r} route to {ip}: nothing was sent"),
        };
        if route == "none" && trace.errno != Some(libc::ENETUNREACH) {
            return (
                Cause::LocalError,
                format!("connecting to {target} failed before sending: {error}"),
            );
        }
        ev.route = Some(route.to_string());
        return (Cause::NoRoute, line);
    }
    // 4. The kernel dropped the flow's packets here.
    // The firewall's drops first, then the most.
    if let Some(d) = ev
        .drops
        .iter()
        .max_by_key(|d| (d.reason == "netfilter_drop", d.count))
    {
        let firewall = d.reason == "netfilter_drop";
        let whose = if d.direction == "egress" {
            format!("{what} to {target}")
        } else if udp {
            format!("the answer from {target}")
        } else {
            format!("the SYN-ACK from {target}")
        };
        let by = match (firewall, d.path.as_str()) {
            (true, "input") => "this host's firewall on input",
            (true, _) => "this host's firewall on output",
            (false, _) => "this host's kernel",
        };
        let answer = if udp { "no answer" } else { "no SYN-ACK" };
        let tail = if ev.synack_received == Some(true) {
            String::new()
        } else {
            format!("; {answer}")
        };
        return (
            if firewall {
                Cause::LocalFirewallDrop
            } else {
                Cause::LocalDrop
            },
            format!(
                "{whose} dropped by {by} ({}, {}){tail}",
                d.reason,
                tries_text(d.count.try_into().unwrap_or(u32::MAX))
            ),
        );
    }
    // 5. The listener here had no room.
    if ev.listen_overflows.is_some_and(|n| n > 0) && ev.accept_queue.is_some_and(|q| q > 0) {
        return (
            Cause::AcceptQueueFull,
            format!(
                "the listener on {target} is not accepting: its accept queue is full ({} waiting; the kernel counted {} ListenOverflows during the check)",
                ev.accept_queue.unwrap_or(0),
                ev.listen_overflows.unwrap_or(0)
            ),
        );
    }
    let connected = ev.synack_received == Some(true);
    // 6. Connected, then the peer reset or closed.
    if connected && trace.stage >= Stage::Tls {
        let reset = ev.resets_received.unwrap_or(0) > 0
            || trace.errno == Some(libc::ECONNRESET)
            || error.contains("reset");
        let closed =
            error.contains("closed") || error.contains("incomplete") || error.contains("EOF");
        if (reset || closed) && !trace.timed_out {
            let hs = trace
                .handshake
                .map(|d| took(d.as_secs_f64()))
                .unwrap_or_default();
            let how = if reset { "reset" } else { "closed" };
            let when = if trace.stage >= Stage::Exchange {
                "after the request"
            } else {
                "during the TLS handshake"
            };
            return (
                Cause::ResetAfterRequest,
                format!("handshake ok in {hs}, then {how} by the server {when}"),
            );
        }
        if trace.timed_out {
            let hs = trace
                .handshake
                .map(|d| took(d.as_secs_f64()))
                .unwrap_or_default();
            return (
                Cause::Slow,
                format!(
                    "handshake ok in {hs}, then no answer within the {} timeout: the server was slow",
                    took(spec.timeout.as_secs_f64())
                ),
            );
        }
    }
    // 7. Sent, never answered, nothing dropped here.
    if !connected && trace.stage == Stage::Connect || udp && trace.stage >= Stage::Connect {
        let n = if udp { tries.max(1) } else { tries };
        let sent = if n == 1 {
            format!("no answer to 1 {what}")
        } else if n == 0 {
            format!("no answer to the {what}")
        } else {
            format!("no answer to {n} {what}s")
        };
        if ev.kernel_drops_watched {
            return (
                Cause::LostBeyondHost,
                format!("{sent} to {target}; nothing dropped on this host: lost beyond it"),
            );
        }
        return (
            Cause::Timeout,
            format!(
                "{sent} to {target} (this host's drops are not watched: the eBPF backend is off)"
            ),
        );
    }
    if trace.timed_out {
        return (Cause::Timeout, error.to_string());
    }
    if matches!(trace.errno, Some(libc::EPERM | libc::EACCES)) {
        return (Cause::LocalError, error.to_string());
    }
    (Cause::Unknown, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_spec() -> Spec {
        Spec::new(
            "db".into(),
            Kind::Tcp(super::super::TcpSpec {
                host: "10.0.3.7".into(),
                port: 5432,
                send: None,
                expect: None,
            }),
            Duration::from_secs(10),
            Duration::from_secs(3),
        )
    }

    fn failed(trace: Trace) -> Outcome {
        let mut out = Outcome {
            error: Some("timed out after 3.0 s".into()),
            ..Default::default()
        };
        explain(&tcp_spec(), &mut out, trace);
        out
    }

    fn connect_trace(watched: bool) -> Trace {
        let mut t = Trace::default();
        t.stage = Stage::Connect;
        t.ev.kernel_drops_watched = watched;
        t.ev.target = Some("10.0.3.7:5432".into());
        t.ev.synack_received = Some(false);
        t.ev.syns_sent = Some(3);
        t
    }

    #[test]
    fn silence_is_lost_beyond_the_host_only_when_drops_are_watched() {
        let out = failed(connect_trace(true));
        let ev = out.evidence.unwrap();
        assert_eq!(ev.cause, Cause::LostBeyondHost);
        assert_eq!(
            out.explanation.unwrap(),
            "no answer to 3 SYNs to 10.0.3.7:5432; nothing dropped on this host: lost beyond it"
        );
        assert_eq!(
            failed(connect_trace(false)).evidence.unwrap().cause,
            Cause::Timeout
        );
    }

    #[test]
    fn a_firewall_drop_here_beats_silence_and_names_the_reason() {
        let mut t = connect_trace(true);
        t.ev.drops = vec![DropEvidence {
            reason: "netfilter_drop".into(),
            direction: "egress".into(),
            path: "output".into(),
            count: 3,
        }];
        let out = failed(t);
        assert_eq!(out.evidence.unwrap().cause, Cause::LocalFirewallDrop);
        assert_eq!(
            out.explanation.unwrap(),
            "SYN to 10.0.3.7:5432 dropped by this host's firewall on output (netfilter_drop, 3 tries); no SYN-ACK"
        );
    }

    #[test]
    fn icmp_then_reset_then_route() {
        let mut t = connect_trace(true);
        t.errno = Some(libc::ECONNREFUSED);
        t.ev.icmp = Some(IcmpError {
            icmp_type: 3,
            code: 3,
            from: Some("10.0.3.1".into()),
            text: "port unreachable".into(),
        });
        let out = failed(t);
        assert_eq!(out.evidence.unwrap().cause, Cause::IcmpUnreachable);
        assert_eq!(
            out.explanation.unwrap(),
            "ICMP port unreachable from 10.0.3.1 (SYN to 10.0.3.7:5432)"
        );
        let mut t = connect_trace(true);
        t.errno = Some(libc::ECONNREFUSED);
        assert_eq!(failed(t).evidence.unwrap().cause, Cause::Refused);
        let mut t = connect_trace(true);
        t.errno = Some(libc::EINVAL);
        t.ev.syns_sent = Some(0);
        let ev = failed(t).evidence.unwrap();
        assert_eq!(
            (ev.cause, ev.route.as_deref()),
            (Cause::NoRoute, Some("blackhole"))
        );
    }

    #[test]
    fn a_good_handshake_then_silence_is_a_slow_server() {
        let mut t = connect_trace(true);
        t.stage = Stage::Exchange;
        t.timed_out = true;
        t.ev.synack_received = Some(true);
        t.handshake = Some(Duration::from_micros(200));
        let out = failed(t);
        assert_eq!(out.evidence.unwrap().cause, Cause::Slow);
        assert_eq!(
            out.explanation.unwrap(),
            "handshake ok in 0.2 ms, then no answer within the 3.0 s timeout: the server was slow"
        );
    }
}
