//! A capture of real traffic for the analyze benchmark: two network
//! namespaces joined by a veth pair made here, servers in one, clients in
//! the other, tcpdump on the server's veth. One kind after the other, so
//! the file is their captures concatenated: ping, a DNS exchange (real DNS
//! messages over UDP, a new client port every ten queries), HTTP GETs with
//! curl (or, without curl, a client of the bench's own; a connection each,
//! bodies of 200 B to 90 kB), then a bulk TCP transfer. Everything is
//! bounded by count or bytes; the namespaces, the veth and the processes go
//! when it returns.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use netpulse_tests::netns::Pair;

pub const HTTP_PORT: u16 = 8080;
pub const DNS_PORT: u16 = 53;
pub const BULK_PORT: u16 = 5001;

/// How much of each kind.
pub struct Mix {
    pub pings: u32,
    pub dns_queries: u32,
    pub http_gets: u32,
    pub bulk_mb: u64,
}

pub struct Captured {
    pub path: PathBuf,
    /// What the file holds, for the table's heading.
    pub summary: String,
    /// What tcpdump says it dropped (the file is what it kept).
    pub dropped: u64,
}

/// `netpulse analyze --service` arguments naming what the file carries.
pub fn services() -> Vec<String> {
    vec![
        format!("web=tcp/{HTTP_PORT}"),
        format!("dns=udp/{DNS_PORT}"),
        format!("bulk=tcp/{BULK_PORT}"),
        "ping=icmp".to_string(),
    ]
}

const HTTP_SIZES: [usize; 5] = [200, 1_200, 5_000, 20_000, 90_000];

/// A listener thread in `ns` that serves until `stop` (then one connection
/// wakes it). Each connection is handled on a thread of its own.
fn serve(
    pair: &Pair,
    port: u16,
    stop: Arc<AtomicBool>,
    handle: fn(TcpStream),
) -> Result<std::thread::JoinHandle<()>> {
    let addr = pair.addr_a;
    let (tx, rx) = std::sync::mpsc::channel();
    let h = pair.a.spawn(move || {
        let l = match TcpListener::bind((addr, port)) {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        for s in l.incoming() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if let Ok(s) = s {
                std::thread::spawn(move || handle(s));
            }
        }
    });
    rx.recv()
        .context("server thread")?
        .with_context(|| format!("binding {addr}:{port}"))?;
    Ok(h)
}

fn http(s: TcpStream) {
    let mut r = BufReader::new(match s.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut first = String::new();
    if r.read_line(&mut first).unwrap_or(0) == 0 {
        return;
    }
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
            break;
        }
    }
    // GET /<n> HTTP/1.1: the body's size by n.
    let n: usize = first
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.trim_start_matches('/').parse().ok())
        .unwrap_or(0);
    let body = vec![b'x'; HTTP_SIZES[n % HTTP_SIZES.len()]];
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut s = s;
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(&body);
}

fn sink(mut s: TcpStream) {
    let mut buf = vec![0u8; 1 << 16];
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

/// A DNS query for `name`, type A, class IN.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The answer to `query`: its question and one A record.
fn dns_answer(query: &[u8], addr: [u8; 4]) -> Vec<u8> {
    let mut a = query.to_vec();
    a[2] = 0x81;
    a[3] = 0x80;
    a[6..8].copy_from_slice(&1u16.to_be_bytes());
    a.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0x0e, 0x10, 0, 4]);
    a.extend_from_slice(&addr);
    a
}

/// tcpdump on `dev` in `ns`, writing `file`, its statistics in `log`;
/// a 64 MiB kernel buffer, so the bulk transfer's burst fits.
struct Dump {
    child: std::process::Child,
    log: PathBuf,
}

impl Dump {
    fn start(ns: &str, dev: &str, file: &Path) -> Result<Dump> {
        let log = file.with_extension("log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "tcpdump", "-i", dev, "-n", "-s", "0"])
            .args(["-B", "65536", "-w"])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting tcpdump")?;
        let d = Dump { child, log };
        let t = Instant::now();
        while !std::fs::read_to_string(&d.log)
            .unwrap_or_default()
            .contains("listening on")
        {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("tcpdump did not start: {}", d.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(d)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGINT, by pid; (captured, dropped by the kernel).
    fn stop(mut self) -> Result<(u64, u64)> {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: signalling the tcpdump we started (ip netns exec execs it).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait()?;
        let text = self.log_text();
        let count = |what: &str| -> u64 {
            text.lines()
                .find(|l| l.contains(what))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        Ok((count("packets captured"), count("dropped by kernel")))
    }
}

impl Drop for Dump {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Captures `mix` into `dir/real.pcap`.
pub fn capture(dir: &Path, mix: &Mix) -> Result<Captured> {
    for tool in ["ip", "ethtool", "tcpdump", "ping"] {
        if !netpulse_tests::netns::have(tool) {
            bail!("{tool} is not installed (cargo xtask setup installs it)");
        }
    }
    let pair = Pair::new("anlz", 109);
    let stop = Arc::new(AtomicBool::new(false));
    let file = dir.join("real.pcap");
    let result = (|| -> Result<Captured> {
        let a = pair.addr_a;
        let web = serve(&pair, HTTP_PORT, stop.clone(), http)?;
        let bulk = serve(&pair, BULK_PORT, stop.clone(), sink)?;
        let dns = {
            let stop = stop.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            let h = pair.a.spawn(move || {
                let u = match UdpSocket::bind((a, DNS_PORT)) {
                    Ok(u) => u,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = u.set_read_timeout(Some(Duration::from_millis(100)));
                let _ = tx.send(Ok(()));
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(&dns_answer(&buf[..n], [10, 86, 7, 7]), from);
                    }
                }
            });
            rx.recv().context("DNS server thread")??;
            h
        };
        let dump = Dump::start(&pair.a.name, &pair.dev_a, &file)?;
        let t = Instant::now();

        // ping: echo requests and replies, as fast as they come back.
        let out = Command::new("ip")
            .args(["netns", "exec", &pair.b.name, "ping", "-q", "-f", "-c"])
            .arg(mix.pings.to_string())
            .arg(a.to_string())
            .stdout(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("ping: {}", String::from_utf8_lossy(&out.stderr));
        }

        // DNS: queries and answers; a new client socket (port) every ten.
        let n = mix.dns_queries;
        let answered = pair.b.run(move || -> Result<u32> {
            let mut ok = 0;
            let mut buf = [0u8; 512];
            let mut sock = None;
            for i in 0..n {
                if i % 10 == 0 {
                    let s = UdpSocket::bind("0.0.0.0:0")?;
                    s.set_read_timeout(Some(Duration::from_secs(1)))?;
                    s.connect((a, DNS_PORT))?;
                    sock = Some(s);
                }
                let s = sock.as_ref().context("socket")?;
                s.send(&dns_query(
                    i as u16,
                    &format!("host{i}.svc{}.example", i % 97),
                ))?;
                if s.recv(&mut buf).is_ok() {
                    ok += 1;
                }
            }
            Ok(ok)
        })?;
        if answered < n * 99 / 100 {
            bail!("only {answered} of {n} DNS queries were answered");
        }

        // HTTP: curl's URL globbing, one connection per GET; where curl
        // is not installed (`cargo xtask setup` does not install it), the
        // same GETs from a client of our own.
        let client = if netpulse_tests::netns::have("curl") {
            let out = Command::new("ip")
                .args(["netns", "exec", &pair.b.name, "curl", "-s", "-S", "--fail"])
                .arg(format!("http://{a}:{HTTP_PORT}/[1-{}]", mix.http_gets))
                .stdout(Stdio::null())
                .output()?;
            if !out.status.success() {
                bail!("curl: {}", String::from_utf8_lossy(&out.stderr));
            }
            "curl"
        } else {
            let n = mix.http_gets;
            pair.b.run(move || -> Result<()> {
                for i in 1..=n {
                    let mut s = TcpStream::connect((a, HTTP_PORT))?;
                    let req = format!(
                        "GET /{i} HTTP/1.1\r\nHost: {a}:{HTTP_PORT}\r\nUser-Agent: netpulse-bench\r\nAccept: */*\r\n\r\n"
                    );
                    s.write_all(req.as_bytes())?;
                    let mut body = Vec::new();
                    s.read_to_end(&mut body)?;
                    if !body.starts_with(b"HTTP/1.1 200") {
                        bail!("GET /{i}: no 200");
                    }
                }
                Ok(())
            })?;
            "the bench's client"
        };

        // Bulk TCP: one connection, `bulk_mb` MB one way.
        let mb = mix.bulk_mb;
        pair.b.run(move || -> Result<()> {
            let mut s = TcpStream::connect((a, BULK_PORT))?;
            let chunk = vec![0x5au8; 1 << 16];
            for _ in 0..mb * 16 {
                s.write_all(&chunk)?;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            // Wait for the server's FIN: the whole exchange is captured.
            let mut b = [0u8; 16];
            while matches!(s.read(&mut b), Ok(n) if n > 0) {}
            Ok(())
        })?;
        let secs = t.elapsed().as_secs_f64();
        let (captured, dropped) = dump.stop()?;
        eprintln!(
            "bench: captured {captured} packets of real traffic in {secs:.1} s ({dropped} dropped by the kernel)"
        );
        wake(&pair, &stop);
        let _ = (web.join(), bulk.join(), dns.join());
        Ok(Captured {
            path: file.clone(),
            summary: format!(
                "ping -f × {}, {} DNS queries over UDP, {} HTTP GETs ({client}, a connection each), {} MB bulk TCP, captured by tcpdump between two namespaces",
                mix.pings, mix.dns_queries, mix.http_gets, mix.bulk_mb
            ),
            dropped,
        })
    })();
    // On an error part-way too: the threads leave, then the namespaces.
    wake(&pair, &stop);
    drop(pair);
    result
}

/// Sets `stop` and wakes the listeners (a connection each) so they see it.
fn wake(pair: &Pair, stop: &AtomicBool) {
    stop.store(true, Ordering::Relaxed);
    let a = pair.addr_a;
    for port in [HTTP_PORT, BULK_PORT] {
        let _ = pair.b.run(move || {
            TcpStream::connect_timeout(&SocketAddr::from((a, port)), Duration::from_secs(1))
        });
    }
}
