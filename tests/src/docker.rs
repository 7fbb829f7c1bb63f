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

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("spawn docker")
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
    let dir = std::env::temp_dir().join(format!("netpulse-busybox-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("www")).expect("image context");
    std::fs::copy(BUSYBOX, dir.join("busybox")).expect("copy busybox");
    std::fs::write(dir.join("www/index.html"), "netpulse test page\n").expect("page");
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\nENTRYPOINT [\"/bin/busybox\"]\n",
    )
    .expect("Dockerfile");
    let out = Command::new("docker")
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

/// The workspace's `target/`, where `cargo xtask` records the dockerd it
/// started (`dockerd.owned`) and logs it (`dockerd.log`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")
}

/// Where dockerd's own containerd records its pid.
const CONTAINERD_PID: &str = "/var/run/docker/containerd/containerd.pid";

/// The pid of a dockerd the test harness started (`cargo xtask` records
/// it), if that process still runs: the only dockerd a test may kill.
pub fn owned_dockerd() -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(target_dir().join("dockerd.owned"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "dockerd").then_some(pid)
}

/// SIGKILLs the harness's dockerd (`pid`, from [`owned_dockerd`]), waits
/// for it to go, and returns a closure that starts it again the way
/// `cargo xtask` does (recording the new pid) and waits until it answers.
pub fn kill_owned_dockerd(pid: i32) -> impl FnOnce() {
    // The containerd dockerd runs dies with it (parent-death signal); a new
    // dockerd that finds it still exiting waits for it in vain.
    let containerd: Option<i32> = std::fs::read_to_string(CONTAINERD_PID)
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .filter(|c| parent_of(*c) == Some(pid));
    // SAFETY: signalling a process the harness started, by pid.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let gone = |p: i32| {
        std::fs::read_to_string(format!("/proc/{p}/stat")).map_or(true, |s| s.contains(") Z "))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !gone(pid) || containerd.is_some_and(|c| !gone(c)) {
        assert!(
            std::time::Instant::now() < deadline,
            "dockerd {pid} (or its containerd) did not go"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    move || {
        // A killed dockerd leaves its pid file, and a new one refuses to
        // start beside it.
        let pidfile = Path::new("/var/run/docker.pid");
        if std::fs::read_to_string(pidfile).is_ok_and(|p| p.trim() == pid.to_string()) {
            let _ = std::fs::remove_file(pidfile);
        }
        // Likewise its containerd's, which a dead but unreaped containerd
        // (a zombie, where nothing reaps orphans) would keep "running".
        if containerd.is_some() {
            let _ = std::fs::remove_file(CONTAINERD_PID);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(target_dir().join("dockerd.log"))
            .expect("dockerd log");
        // dockerd outlives the test, as the one the harness started does:
        // never waited for here.
        #[allow(clippy::zombie_processes)]
        let child = Command::new("dockerd")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        std::fs::write(target_dir().join("dockerd.owned"), child.id().to_string())
            .expect("record dockerd");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !docker(&["info"]).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "dockerd did not come back"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
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
