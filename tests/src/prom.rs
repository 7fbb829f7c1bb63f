//! A real Prometheus (Debian's) started inside a test's network namespace,
//! queried over its HTTP API there, and stopped by pid on drop.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::{
    netns::{Netns, run_in},
    scrape::{get, urlencode},
};

pub struct Prometheus {
    child: Child,
    ns: String,
    port: u16,
    pub log: PathBuf,
}

impl Prometheus {
    /// `prometheus --config.file=CONFIG` in `ns`, listening on
    /// 127.0.0.1:`port`, its data and log under `dir`.
    pub fn start(ns: &Netns, config: &Path, dir: &Path, port: u16) -> Prometheus {
        let log = dir.join("prometheus.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("prometheus log"))
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            ns: ns.name.clone(),
            port,
            log,
        }
    }

    /// An instant query; the API's JSON (or its error as `status`).
    pub fn query(&self, q: &str) -> serde_json::Value {
        let (port, q) = (self.port, q.to_string());
        run_in(&self.ns, move || {
            let (status, body) = get(
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                &format!("/api/v1/query?query={}", urlencode(&q)),
            )
            .unwrap_or((0, String::new()));
            serde_json::from_str(&body)
                .unwrap_or(serde_json::json!({"status": format!("http {status}"), "body": body}))
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: the child we spawned (ip netns exec execs prometheus).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
