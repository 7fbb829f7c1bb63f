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

/// One HTTP/1.0 GET; returns the status line. The server closes.
pub fn http_get(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines().next().unwrap_or_default().to_string()
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
