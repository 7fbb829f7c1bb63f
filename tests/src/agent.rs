//! A `netpulse run` started for a test inside a network namespace, read
//! over HTTP from inside that namespace, and stopped (or killed) by pid.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    netns::{Netns, run_in},
    scrape::{Metrics, get},
};

/// The binary under test: `NETPULSE_BIN` (set by `cargo xtask test`), else
/// the workspace's debug build.
pub fn bin() -> String {
    std::env::var("NETPULSE_BIN")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/netpulse").into())
}

/// The binary exists (else a skip, a failure under CI) and is not older
/// than the sources it is built from (else a failure: a stale binary would
/// be tested in place of the code).
pub fn have_bin() -> bool {
    let bin = bin();
    if !crate::require(
        "the netpulse binary (cargo build -p netpulse, or NETPULSE_BIN)",
        Path::new(&bin).exists(),
    ) {
        return false;
    }
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .expect("the binary's mtime");
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Some((newest, path)) = newest_source(&ws)
        && newest > built
    {
        panic!(
            "{bin} is older than {}: a stale binary would be tested, not this code; rebuild it (cargo build -p netpulse)",
            path.display()
        );
    }
    true
}

/// The newest file the binary is built from: the agent's and the kernel
/// programs' sources, manifests and build script, and the lock file.
fn newest_source(ws: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    fn walk(p: &Path, best: &mut Option<(std::time::SystemTime, PathBuf)>) {
        let Ok(meta) = std::fs::metadata(p) else {
            return;
        };
        if meta.is_dir() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                walk(&e.path(), best);
            }
        } else if let Ok(t) = meta.modified()
            && best.as_ref().is_none_or(|(b, _)| t > *b)
        {
            *best = Some((t, p.to_path_buf()));
        }
    }
    let mut best = None;
    for p in [
        "agent/src",
        "agent/build.rs",
        "agent/Cargo.toml",
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "Cargo.lock",
    ] {
        walk(&ws.join(p), &mut best);
    }
    best
}

/// The binary carries the kernel programs (`netpulse --version` says so;
/// an `AYA_BUILD_SKIP=1` build does not). A test of eBPF with a binary
/// without them fails: under `backend = "auto"` it would quietly count
/// with libpcap and pass.
pub fn assert_ebpf_bin() {
    let out = Command::new(bin())
        .arg("--version")
        .output()
        .expect("netpulse --version");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("eBPF programs: built in"),
        "{} lacks its eBPF programs, so it cannot be tested as eBPF (rebuild without AYA_BUILD_SKIP=1); --version says:\n{text}",
        bin()
    );
}

/// What counts packets in an agent a test starts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    /// `--backend ebpf`: the kernel programs or a failed start, never the
    /// libpcap fallback.
    Ebpf,
    /// Whatever the config's `agent.backend` says (the backend tests).
    AsConfigured,
}

pub struct Agent {
    child: Child,
    /// The namespace it runs in; None for the host's own.
    ns: Option<String>,
    port: u16,
    pub log: PathBuf,
}

impl Agent {
    /// `ip netns exec NS [wrapper...] netpulse run --config CONFIG`, its
    /// stderr appended to `log`. `port` is the config's listen port.
    /// Counts with eBPF (`--backend ebpf`).
    pub fn start(ns: &Netns, wrapper: &[&str], config: &Path, port: u16, log: &Path) -> Agent {
        Self::start_with(ns, wrapper, config, port, log, Backend::Ebpf)
    }

    /// As [`Agent::start`], with the backend given.
    pub fn start_with(
        ns: &Netns,
        wrapper: &[&str],
        config: &Path,
        port: u16,
        log: &Path,
        backend: Backend,
    ) -> Agent {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .args(wrapper)
            .arg(bin());
        Self::spawn(cmd, Some(ns.name.clone()), config, port, log, backend)
    }

    /// `netpulse run --config CONFIG --backend ebpf` in the host's own
    /// namespace (for what lives there: dockerd's containers and their
    /// veths).
    pub fn start_host(config: &Path, port: u16, log: &Path) -> Agent {
        Self::spawn(Command::new(bin()), None, config, port, log, Backend::Ebpf)
    }

    fn spawn(
        mut cmd: Command,
        ns: Option<String>,
        config: &Path,
        port: u16,
        log: &Path,
        backend: Backend,
    ) -> Agent {
        cmd.args(["run", "--config"]).arg(config);
        if backend == Backend::Ebpf {
            assert_ebpf_bin();
            cmd.args(["--backend", "ebpf"]);
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("agent log");
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start netpulse");
        Agent {
            child,
            ns,
            port,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One scrape from inside the namespace; None if it does not answer.
    pub fn metrics(&self) -> Option<Metrics> {
        let port = self.port;
        let scrape = move || {
            get(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), "/metrics")
                .ok()
                .filter(|(s, _)| *s == 200)
                .map(|(_, b)| Metrics::parse(&b))
        };
        match &self.ns {
            Some(ns) => run_in(ns, scrape),
            None => scrape(),
        }
    }

    /// Scrapes until `ready` holds (20 s at most), failing with the log if
    /// the agent exits or never gets there.
    pub fn wait_for(&mut self, what: &str, ready: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "netpulse exited early with {status}; log:\n{}",
                    self.log_text()
                );
            }
            if let Some(m) = self.metrics()
                && ready(&m)
            {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling the child we spawned (`ip netns exec` execs
        // the command, so the pid is netpulse's).
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM, then wait: the agent detaches and exits 0.
    pub fn stop(mut self) {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().expect("wait for netpulse");
        assert!(
            status.success(),
            "netpulse exited with {status}; log:\n{}",
            self.log_text()
        );
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    pub fn hup(&self) {
        self.signal(libc::SIGHUP);
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// What every test that runs the agent between namespaces needs: root, ip,
/// ethtool and the binary. Under `CI=true` a missing one fails the test.
pub fn live_prerequisites() -> bool {
    crate::require("root", crate::is_root())
        && crate::require("ip (iproute2)", crate::netns::have("ip"))
        && crate::require("ethtool", crate::netns::have("ethtool"))
        && have_bin()
}

/// An agent counting with eBPF in namespace a of a new veth pair, on its
/// own bpffs, with a scratch directory: `[agent]` listens on `port`,
/// watches only the pair's veth, keeps its state in the scratch directory,
/// and Docker is off; `extra` is appended to the config (services, checks,
/// tables). The directory is removed on drop.
pub struct Live {
    pub agent: Agent,
    pub dir: PathBuf,
    pub pair: crate::netns::Pair,
    _pins: crate::PinDir,
}

impl Live {
    pub fn start(tag: &str, net: u8, port: u16, extra: &str) -> Live {
        Self::start_with(crate::netns::Pair::new(tag, net), tag, port, &[], extra)
    }

    /// As [`Live::start`], on a pair made beforehand (servers already in
    /// it), `wrapper` before the binary (`env X=Y`, `setpriv …`).
    pub fn start_with(
        pair: crate::netns::Pair,
        tag: &str,
        port: u16,
        wrapper: &[&str],
        extra: &str,
    ) -> Live {
        let pins = crate::PinDir::mounted(tag);
        let dir = crate::scratch(tag);
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "[agent]\nlisten = \"127.0.0.1:{port}\"\npin_dir = \"{}\"\nstate_dir = \"{}\"\ninterfaces = [\"{}\"]\n\n[docker]\nenabled = false\n\n{extra}",
                pins.path().display(),
                dir.join("state").display(),
                pair.dev_a
            ),
        )
        .expect("write the config");
        let agent = Agent::start(&pair.a, wrapper, &cfg, port, &dir.join("agent.log"));
        Live {
            agent,
            dir,
            pair,
            _pins: pins,
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Both TC programs (ingress and egress) are on `dev`.
pub fn tc_both_ways(m: &Metrics, dev: &str) -> bool {
    ["ingress", "egress"].iter().all(|mode| {
        m.has(
            "netpulse_probe_attached",
            &[("interface", dev), ("hook", "tc"), ("mode", mode)],
        )
    })
}
