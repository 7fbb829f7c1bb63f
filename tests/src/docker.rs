//! A real dockerd for the tests: the busybox test image (built `FROM
//! scratch`, no registry), containers removed on drop, a container's own
//! kernel counters, and a socket proxy a test can cut to make dockerd "go
//! away" without touching the real one.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// The image every container test runs: busybox-static and a page.
pub const TEST_IMAGE: &str = "netpulse-test-busybox:1";
const BUSYBOX: &str = "/bin/busybox";

/// The dockerd the helpers here talk to: None for the machine's own
/// (`DOCKER_HOST` or the default socket), else a test's own
/// ([`OwnDockerd::select`]).
static HOST: Mutex<Option<String>> = Mutex::new(None);

/// `docker` with `-H` for the selected daemon.
fn docker_cmd() -> Command {
    let mut c = Command::new("docker");
    if let Some(h) = HOST.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        c.args(["-H", h]);
    }
    c
}

pub fn docker(args: &[&str]) -> Output {
    docker_cmd().args(args).output().expect("spawn docker")
}

/// `docker ARGS`, failing the test with its stderr unless it succeeds;
/// returns stdout, trimmed.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What a Docker test needs: root, the docker CLI, a dockerd that answers
/// and busybox-static. Under `CI=true` a missing one fails the test.
pub fn prerequisites() -> bool {
    crate::require("root", crate::is_root())
        && crate::require("docker (docker.io)", crate::netns::have("docker"))
        && crate::require(
            "a running dockerd (cargo xtask test starts one)",
            docker(&["info"]).status.success(),
        )
        && crate::require(
            "busybox-static at /bin/busybox",
            Path::new(BUSYBOX).exists(),
        )
}

/// Builds [`TEST_IMAGE`] unless present: `FROM scratch` with the static
/// busybox and /www/index.html, so no registry is needed.
pub fn test_image() {
    if docker(&["image", "inspect", TEST_IMAGE]).status.success() {
        return;
    }
    let dir = std::env::temp_dir().join(format!(
        "netpulse-busybox-{}-{}",
        std::process::id(),
        HOST.lock().map_or(0, |h| h.as_ref().map_or(0, String::len))
    ));
    std::fs::create_dir_all(dir.join("www")).expect("image context");
    std::fs::copy(BUSYBOX, dir.join("busybox")).expect("copy busybox");
    std::fs::write(dir.join("www/index.html"), "netpulse test page\n").expect("page");
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\nENTRYPOINT [\"/bin/busybox\"]\n",
    )
    .expect("Dockerfile");
    let out = docker_cmd()
        .args(["build", "-q", "-t", TEST_IMAGE])
        .arg(&dir)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("spawn docker build");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "docker build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A container removed (with `rm -f`) on drop, pass or fail.
pub struct Container(pub String);

impl Container {
    /// `docker run -d --name NAME ARGS...`.
    pub fn run(name: &str, args: &[&str]) -> Self {
        let _ = docker(&["rm", "-f", name]);
        let mut all = vec!["run", "-d", "--name", name];
        all.extend_from_slice(args);
        docker_ok(&all);
        Container(name.to_string())
    }

    /// `docker run -d --name NAME OPTS... TEST_IMAGE httpd` serving /www
    /// on port 80.
    pub fn httpd(name: &str, opts: &[&str]) -> Self {
        let mut args = opts.to_vec();
        args.extend_from_slice(&[TEST_IMAGE, "httpd", "-f", "-p", "80", "-h", "/www"]);
        Self::run(name, &args)
    }

    pub fn ip(&self) -> String {
        docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &self.0,
        ])
    }

    /// The host-side end of the container's eth0.
    pub fn host_veth(&self) -> String {
        let iflink = docker_ok(&[
            "exec",
            &self.0,
            BUSYBOX,
            "cat",
            "/sys/class/net/eth0/iflink",
        ]);
        for e in std::fs::read_dir("/sys/class/net")
            .expect("/sys/class/net")
            .flatten()
        {
            let idx = std::fs::read_to_string(e.path().join("ifindex")).unwrap_or_default();
            if idx.trim() == iflink {
                return e.file_name().to_string_lossy().into_owned();
            }
        }
        panic!("no host interface with ifindex {iflink} for {}", self.0);
    }

    /// The container's own IPv4 counters (its network namespace's
    /// /proc/net/snmp and netstat): what its IP layer received and sent.
    pub fn ip_counters(&self) -> IpCounters {
        let text = docker_ok(&[
            "exec",
            &self.0,
            BUSYBOX,
            "cat",
            "/proc/net/snmp",
            "/proc/net/netstat",
        ]);
        let table = proc_tables(&text);
        let get = |t: &str, k: &str| -> u64 {
            table
                .get(&(t.to_string(), k.to_string()))
                .copied()
                .unwrap_or_else(|| panic!("{t} {k} missing in /proc/net of {}", self.0))
        };
        IpCounters {
            in_packets: get("Ip", "InReceives"),
            out_packets: get("Ip", "OutRequests"),
            in_octets: get("IpExt", "InOctets"),
            out_octets: get("IpExt", "OutOctets"),
        }
    }
}

impl Container {
    /// TCP connections the container accepted (its namespace's
    /// `Tcp: PassiveOpens`).
    pub fn tcp_passive_opens(&self) -> u64 {
        let text = docker_ok(&["exec", &self.0, BUSYBOX, "cat", "/proc/net/snmp"]);
        proc_tables(&text)
            .get(&("Tcp".to_string(), "PassiveOpens".to_string()))
            .copied()
            .unwrap_or_else(|| panic!("Tcp PassiveOpens missing in /proc/net/snmp of {}", self.0))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

/// IPv4 packets and bytes (IP header onwards) a network namespace's IP
/// layer received and sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpCounters {
    pub in_packets: u64,
    pub out_packets: u64,
    pub in_octets: u64,
    pub out_octets: u64,
}

/// `Proto: name name ...` / `Proto: value value ...` line pairs.
fn proc_tables(text: &str) -> HashMap<(String, String), u64> {
    let mut out = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((t, names)), Some((_, values))) = (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Ok(v) = v.parse() {
                out.insert((t.to_string(), n.to_string()), v);
            }
        }
    }
    out
}

/// The default bridge's gateway address (docker0's IPv4 address). A
/// freshly started dockerd can answer `network inspect` with an empty
/// gateway for a moment; an empty address in `-p ADDR:PORT:PORT` would bind
/// every address, so this waits for a real one (10 s), then fails saying so.
pub fn bridge_gateway() -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let from_docker = docker_ok(&[
            "network",
            "inspect",
            "bridge",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
        ]);
        let from_link = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-4", "-o", "addr", "show", "dev", "docker0"])
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default(),
        )
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .unwrap_or_default()
        .to_string();
        let found = from_docker
            .split_whitespace()
            .chain([from_link.as_str()])
            .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
            .map(str::to_string);
        if let Some(a) = found {
            return a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the default bridge has no IPv4 gateway (docker network inspect bridge: {from_docker:?}; docker0: {from_link:?})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A dockerd of the test's own, beside whatever dockerd the machine runs:
/// its own API socket, data root, exec root (and so its own containerd),
/// pid file and bridge (`np-dk<net>`, `10.79.<net>.1/24`), no iptables.
/// So a test can kill a dockerd without touching one it did not start.
/// Stopped, and everything removed, on drop.
pub struct OwnDockerd {
    dir: PathBuf,
    pub bridge: String,
    pub socket: PathBuf,
    child: Option<std::process::Child>,
}

impl OwnDockerd {
    pub fn start(net: u8) -> Self {
        // Short paths: containerd's sockets live under the exec root and a
        // unix socket path has 108 bytes.
        let dir = PathBuf::from(format!("/tmp/np-dk{net}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dockerd directory");
        let bridge = format!("np-dk{net}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        for args in [
            vec!["link", "add", &bridge, "type", "bridge"],
            vec!["addr", "add", &format!("10.79.{net}.1/24"), "dev", &bridge],
            vec!["link", "set", &bridge, "up"],
        ] {
            let out = Command::new("ip").args(&args).output().expect("spawn ip");
            assert!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut d = OwnDockerd {
            socket: dir.join("docker.sock"),
            dir,
            bridge,
            child: None,
        };
        d.restart();
        d
    }

    /// `unix://SOCKET`, for `docker -H`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Points this module's helpers (containers, the test image) at this
    /// daemon until the guard drops.
    pub fn select(&self) -> Selected {
        *HOST.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.host());
        Selected(())
    }

    /// Starts dockerd (again) and waits until it answers.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .expect("dockerd log");
        let child = Command::new("dockerd")
            .arg("--host")
            .arg(self.host())
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("docker.pid"))
            .args(["--bridge", &self.bridge])
            .args(["--iptables=false", "--ip6tables=false", "--ip-masq=false"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let up = Command::new("docker")
                .args(["-H", &self.host(), "info"])
                .output()
                .is_ok_and(|o| o.status.success());
            if up {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the test's dockerd did not answer; its log:\n{}",
                std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILL, as a crash: dockerd and the containerd it started (which a
    /// new dockerd would otherwise wait for in vain). The containers'
    /// shims live on.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as i32;
        let containerd: Option<i32> =
            std::fs::read_to_string(self.dir.join("exec/containerd/containerd.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .filter(|c| parent_of(*c) == Some(pid));
        // SAFETY: signalling the dockerd this test started, by pid.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = child.wait();
        if let Some(c) = containerd {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::fs::read_to_string(format!("/proc/{c}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "containerd {c} did not go"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = std::fs::remove_file(self.dir.join("docker.pid"));
        let _ = std::fs::remove_file(self.dir.join("exec/containerd/containerd.pid"));
    }
}

impl Drop for OwnDockerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Its containers first, while it answers.
            let host = self.host();
            let ids = Command::new("docker")
                .args(["-H", &host, "ps", "-aq"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for id in ids.split_whitespace() {
                let _ = Command::new("docker")
                    .args(["-H", &host, "rm", "-f", id])
                    .output();
            }
            if let Some(mut child) = self.child.take() {
                // SAFETY: the dockerd this test started, by pid.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let _ = child.wait();
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        // dockerd bind-mounts its data root onto itself (and its exec
        // root's netns files); lazily, as anything left may still be busy.
        for sub in ["exec", "data"] {
            let _ = Command::new("umount")
                .args(["-R", "-l"])
                .arg(self.dir.join(sub))
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// While held, this module's helpers talk to an [`OwnDockerd`].
pub struct Selected(());

impl Drop for Selected {
    fn drop(&mut self) {
        *HOST.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A host outside: a network namespace joined to the host's own namespace
/// by a veth (`10.78.<net>.2` there, `10.78.<net>.1` on the host's end),
/// routed through the host. Removed (with its veth) on drop.
pub struct Outside {
    pub ns: crate::netns::Netns,
    pub host_dev: String,
}

impl Outside {
    pub fn new(tag: &str, net: u8) -> Self {
        let ns = crate::netns::Netns::new(&format!("np-{tag}-{}", std::process::id()));
        let (host_dev, dev) = (format!("npo{net}h"), format!("npo{net}n"));
        let _ = Command::new("ip").args(["link", "del", &host_dev]).output();
        let (host_addr, addr, via) = (
            format!("10.78.{net}.1/24"),
            format!("10.78.{net}.2/24"),
            format!("10.78.{net}.1"),
        );
        let n = ns.name.as_str();
        for args in [
            &[
                "link", "add", &host_dev, "type", "veth", "peer", "name", &dev, "netns", n,
            ][..],
            &["addr", "add", &host_addr, "dev", &host_dev],
            &["link", "set", &host_dev, "up"],
            &["-n", n, "addr", "add", &addr, "dev", &dev],
            &["-n", n, "link", "set", &dev, "up"],
            &["-n", n, "route", "add", "default", "via", &via],
        ] {
            crate::netns::sh("ip", args);
        }
        Outside { ns, host_dev }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_dev])
            .output();
    }
}

/// One HTTP/1.0 GET; the status line, or the error. The server closes.
pub fn try_http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body.lines().next().unwrap_or_default().to_string())
}

/// Like [`try_http_get`], failing the test on an error.
pub fn http_get(addr: SocketAddr) -> String {
    try_http_get(addr).unwrap_or_else(|e| panic!("GET {addr}: {e}"))
}

/// Forwards a unix socket to dockerd's until stopped, when it closes every
/// connection at once, the way a dockerd that stops would.
pub struct SocketProxy {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl SocketProxy {
    pub fn start(path: &Path, target: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind the proxy socket");
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let (s, c, target) = (stop.clone(), conns.clone(), target.to_path_buf());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                let Ok(upstream) = UnixStream::connect(&target) else {
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let mut list = c.lock().unwrap();
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                list.push(client);
                list.push(upstream);
            }
        });
        SocketProxy {
            path: path.to_path_buf(),
            stop,
            conns,
            thread: Some(thread),
        }
    }

    fn shut(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// Closes the socket and every connection through it.
    pub fn stop(mut self) {
        self.shut();
    }
}

impl Drop for SocketProxy {
    fn drop(&mut self) {
        self.shut();
    }
}
