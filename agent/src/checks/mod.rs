//! Health checks: what to probe (`[[check]]` in the config, built by
//! `build`), how one run goes (`kinds`), and the scheduler that runs them
//! with retries, thresholds and dependencies (`engine`).
//!
//! A check's state is `up` or `down` after its thresholds, `unknown` until
//! it has run, and `blocked` while a check it depends on is down or
//! blocked: the root cause is down, its dependents are not "down" too.

pub mod actions;
pub mod build;
pub mod engine;
pub mod evidence;
pub mod hints;
pub mod kinds;

use std::{
    collections::BTreeMap, net::SocketAddr, ops::RangeInclusive, path::PathBuf, sync::Arc,
    time::Duration,
};

pub use build::from_config;
pub use kinds::Outcome;

/// A validated check.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub kind: Kind,
    /// The service it watches, for the status page.
    pub service: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// The first run waits a stable fraction of this, so checks spread out.
    pub jitter: Duration,
    /// Extra attempts, with doubling backoff, before a run counts as failed.
    pub retries: u32,
    pub retry_backoff: Duration,
    /// Consecutive failed runs before `down`, successful ones before `up`.
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub depends_on: Vec<String>,
    /// Whether a blocked check still runs (its result is kept, its state
    /// stays `blocked`).
    pub run_when_blocked: bool,
    /// Labels for running checks together (`POST /api/v1/tags/{tag}/run`,
    /// hooks).
    pub tags: Vec<String>,
    /// What to do after consecutive failures.
    pub actions: Vec<actions::Action>,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Http(HttpSpec),
    Tcp(TcpSpec),
    Dns(DnsSpec),
    Icmp { host: String },
}

impl Kind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Http(_) => "http",
            Kind::Tcp(_) => "tcp",
            Kind::Dns(_) => "dns",
            Kind::Icmp { .. } => "icmp",
        }
    }
}

#[derive(Debug, Clone)]
pub struct HttpSpec {
    pub url: hyper::Uri,
    pub method: hyper::Method,
    pub headers: BTreeMap<String, String>,
    pub expect_status: Vec<RangeInclusive<u16>>,
    pub body_contains: Option<String>,
    pub body_regex: Option<regex::Regex>,
    pub max_latency: Option<Duration>,
    pub max_redirects: u32,
    /// Fail when the certificate expires sooner than this.
    pub cert_min_valid: Option<Duration>,
    pub tls: Arc<rustls::ClientConfig>,
    pub ca_file: Option<PathBuf>,
}

impl HttpSpec {
    pub fn expect_status_text(&self) -> String {
        self.expect_status
            .iter()
            .map(|r| {
                if r.start() == r.end() {
                    r.start().to_string()
                } else {
                    format!("{}-{}", r.start(), r.end())
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[derive(Debug, Clone)]
pub struct TcpSpec {
    pub host: String,
    pub port: u16,
    pub send: Option<String>,
    pub expect: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DnsSpec {
    pub name: String,
    pub record_type: hickory_proto::rr::RecordType,
    /// None: the system resolver (/etc/resolv.conf).
    pub server: Option<SocketAddr>,
    pub expect: Option<String>,
}

impl Spec {
    /// A check of `kind` with the schedule's defaults (no retries,
    /// thresholds of one, no dependencies, tags or actions).
    pub fn new(name: String, kind: Kind, interval: Duration, timeout: Duration) -> Self {
        Spec {
            name,
            kind,
            service: None,
            interval,
            timeout,
            jitter: interval / 10,
            retries: 0,
            retry_backoff: Duration::from_secs(1),
            failure_threshold: 1,
            success_threshold: 1,
            depends_on: Vec::new(),
            run_when_blocked: false,
            tags: Vec::new(),
            actions: Vec::new(),
        }
    }

    /// Where it points, as shown in tables.
    pub fn target(&self) -> String {
        match &self.kind {
            Kind::Http(h) => h.url.to_string(),
            Kind::Tcp(t) => format!("{}:{}", t.host, t.port),
            Kind::Dns(d) => format!("{} {}", d.record_type, d.name),
            Kind::Icmp { host } => host.clone(),
        }
    }
}

/// The first dependency cycle among `deps` (check → what it depends on),
/// as the names around it, first repeated at the end; None if acyclic.
pub fn find_cycle(deps: &BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        n: &str,
        deps: &BTreeMap<String, Vec<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(n).copied().unwrap_or(Mark::New) {
            Mark::Done => return None,
            Mark::Open => {
                let start = path.iter().position(|p| p == n).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            Mark::New => {}
        }
        marks.insert(n.to_string(), Mark::Open);
        path.push(n.to_string());
        for d in deps.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, deps, marks, path) {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(n.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for n in deps.keys() {
        let mut path = Vec::new();
        if let Some(c) = visit(n, deps, &mut marks, &mut path) {
            return Some(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deps(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn cycles_are_found_and_named() {
        assert_eq!(
            find_cycle(&deps(&[("a", &["b"]), ("b", &["c"]), ("c", &[])])),
            None
        );
        assert_eq!(
            find_cycle(&deps(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])])),
            Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        assert_eq!(
            find_cycle(&deps(&[("a", &["a"])])),
            Some(vec!["a".into(), "a".into()])
        );
        // A diamond is not a cycle.
        assert_eq!(
            find_cycle(&deps(&[
                ("a", &["b", "c"]),
                ("b", &["d"]),
                ("c", &["d"]),
                ("d", &[])
            ])),
            None
        );
    }
}
