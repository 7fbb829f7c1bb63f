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

pub fn have_bin() -> bool {
    crate::require(
        "the netpulse binary (cargo build -p netpulse, or NETPULSE_BIN)",
        Path::new(&bin()).exists(),
    )
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
    pub fn start(ns: &Netns, wrapper: &[&str], config: &Path, port: u16, log: &Path) -> Agent {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .args(wrapper)
            .arg(bin());
        Self::spawn(cmd, Some(ns.name.clone()), config, port, log)
    }

    /// `netpulse run --config CONFIG` in the host's own namespace (for
    /// what lives there: dockerd's containers and their veths).
    pub fn start_host(config: &Path, port: u16, log: &Path) -> Agent {
        Self::spawn(Command::new(bin()), None, config, port, log)
    }

    fn spawn(mut cmd: Command, ns: Option<String>, config: &Path, port: u16, log: &Path) -> Agent {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("agent log");
        let child = cmd
            .args(["run", "--config"])
            .arg(config)
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
