//! The agent's TOML configuration: parsing, defaults and validation.
//!
//! Every problem is reported with file:line:col, all at once, so one edit
//! fixes one round of mistakes. `identity` turns the services declared here
//! into service-table entries; `run` reads the `[agent]` table.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

/// Where a config without a file (or without these keys) points.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/netpulse";
pub const DEFAULT_PATH: &str = "/etc/netpulse/config.toml";
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Largest CIDR a service endpoint may name: each address is one table entry.
pub const MAX_CIDR_ADDRESSES: u32 = 1024;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub docker: DockerConfig,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Interfaces to attach to; empty = every interface that is up, `lo` included.
    pub interfaces: Vec<Spanned<String>>,
    /// Address of /metrics, /healthz and the API.
    pub listen: Spanned<String>,
    /// bpffs directory; maps are pinned in `<pin_dir>/v<layout>/`.
    pub pin_dir: PathBuf,
    /// Name services after the host's listening sockets.
    pub discover_sockets: bool,
    /// Seconds between refreshes of sockets and interfaces.
    pub refresh_seconds: Spanned<f64>,
    /// Seconds a service that disappeared stays in /metrics with its counts.
    pub retire_seconds: Spanned<f64>,
    /// Most per-service series /metrics serves; services beyond it are
    /// summed into `service="~other"`.
    pub max_series: Spanned<usize>,
}

impl AgentConfig {
    /// Validated by `parse`: finite and within bounds.
    pub fn refresh(&self) -> Duration {
        Duration::try_from_secs_f64(*self.refresh_seconds.get_ref())
            .unwrap_or(Duration::from_secs(1))
    }

    pub fn retire(&self) -> Duration {
        Duration::try_from_secs_f64(*self.retire_seconds.get_ref())
            .unwrap_or(Duration::from_secs(60))
    }

    pub fn max_series(&self) -> usize {
        *self.max_series.get_ref()
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            listen: Spanned::new(0..0, DEFAULT_LISTEN.to_string()),
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            discover_sockets: true,
            refresh_seconds: Spanned::new(0..0, 1.0),
            retire_seconds: Spanned::new(0..0, 60.0),
            max_series: Spanned::new(0..0, 10_000),
        }
    }
}

/// `[docker]`: naming traffic after Docker containers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// Watch dockerd. Harmless where there is none: the source reports
    /// itself down and retries with backoff.
    pub enabled: bool,
    /// The Engine API socket.
    pub socket: PathBuf,
    /// Container labels exported on `netpulse_service_info` as
    /// `label_<name>` (dots and dashes become underscores). Only these:
    /// labels can hold anything, and environment variables are never read.
    pub labels: Vec<Spanned<String>>,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: PathBuf::from(DEFAULT_DOCKER_SOCKET),
            labels: Vec::new(),
        }
    }
}

/// `label_<name>` for a container label: a valid, distinct Prometheus
/// label name.
pub fn label_metric_name(label: &str) -> String {
    let mut s = String::from("label_");
    s.extend(
        label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
    );
    s
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: Spanned<String>,
    /// A peer this host talks to (a database, an upstream), matched by the
    /// packet's other end, instead of a service on this host.
    #[serde(default)]
    pub remote: bool,
    pub endpoints: Vec<EndpointConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub proto: Spanned<String>,
    /// An address or CIDR; absent = any address (both families).
    #[serde(default)]
    pub addr: Option<Spanned<String>>,
    /// Required for tcp/udp, absent for icmp.
    #[serde(default)]
    pub port: Option<Spanned<i64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

/// A validated endpoint matcher: one address (None = wildcard) or a CIDR
/// expanded to its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub proto: Proto,
    pub addrs: Vec<IpAddr>,
    pub wildcard: bool,
    pub port: u16,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub remote: bool,
    pub endpoints: Vec<Endpoint>,
}

/// One problem in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render(.path, .problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render(path: &Path, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}:{}:{}: {}", path.display(), p.line, p.col, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.chars().count(), |nl| {
        before[nl + 1..].chars().count()
    }) + 1;
    (line, col)
}

/// A config that parsed and validated.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub raw: Config,
    pub services: Vec<Service>,
    pub listen: SocketAddr,
    pub source: Option<PathBuf>,
}

impl Loaded {
    pub fn agent(&self) -> &AgentConfig {
        &self.raw.agent
    }
}

/// Reads and validates `path`; `None` runs the embedded defaults.
pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
    match path {
        None => parse("", Path::new("<default>")).map(|mut l| {
            l.source = None;
            l
        }),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?;
            parse(&text, p)
        }
    }
}

pub fn parse(text: &str, path: &Path) -> Result<Loaded, ConfigError> {
    let invalid = |problems| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems,
    };
    let raw: Config = toml::from_str(text).map_err(|e| {
        let (line, col) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        invalid(vec![Problem {
            line,
            col,
            message: e.message().trim().to_string(),
        }])
    })?;
    let mut problems = Vec::new();
    let mut at = |span: Range<usize>, message: String| {
        let (line, col) = line_col(text, span.start);
        problems.push(Problem { line, col, message });
    };

    let listen = match raw.agent.listen.get_ref().parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            at(
                raw.agent.listen.span(),
                format!(
                    "listen: `{}` is not an address:port such as {DEFAULT_LISTEN}",
                    raw.agent.listen.get_ref()
                ),
            );
            None
        }
    };
    let a = &raw.agent;
    for (what, v, lo, hi) in [
        ("refresh_seconds", &a.refresh_seconds, 0.05, 3600.0),
        ("retire_seconds", &a.retire_seconds, 0.0, 7.0 * 86400.0),
    ] {
        let x = *v.get_ref();
        if !(x.is_finite() && (lo..=hi).contains(&x)) {
            at(v.span(), format!("{what} = {x} is out of range {lo}-{hi}"));
        }
    }
    let min_series = 2 * crate::metrics::SERIES_PER_SERVICE;
    if !(min_series..=10_000_000).contains(a.max_series.get_ref()) {
        at(
            a.max_series.span(),
            format!(
                "max_series = {} is out of range {min_series}-10000000 (at least two services' series)",
                a.max_series.get_ref()
            ),
        );
    }
    let mut seen_if = HashSet::new();
    for i in &raw.agent.interfaces {
        let name = i.get_ref();
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            at(i.span(), format!("`{name}` is not a valid interface name"));
        } else if !seen_if.insert(name.clone()) {
            at(i.span(), format!("interface `{name}` is listed twice"));
        }
    }

    let mut seen_label: BTreeMap<String, String> = BTreeMap::new();
    for l in &raw.docker.labels {
        let name = l.get_ref();
        let metric = label_metric_name(name);
        if name.is_empty() {
            at(l.span(), "an empty label name".to_string());
        } else if let Some(other) = seen_label.insert(metric.clone(), name.clone()) {
            at(
                l.span(),
                format!("label `{name}` would be exported as `{metric}`, like `{other}`"),
            );
        }
    }

    let mut names: BTreeMap<String, Range<usize>> = BTreeMap::new();
    let mut claimed: BTreeMap<(bool, Proto, Option<IpAddr>, u16), String> = BTreeMap::new();
    let mut services = Vec::new();
    for s in &raw.services {
        let name = s.name.get_ref();
        if let Some(msg) = bad_name(name) {
            at(s.name.span(), msg);
        } else if let Some(first) = names.get(name) {
            let (l, c) = line_col(text, first.start);
            at(
                s.name.span(),
                format!("duplicate service `{name}` (first defined at line {l}, column {c})"),
            );
        } else {
            names.insert(name.clone(), s.name.span());
        }
        if s.endpoints.is_empty() {
            at(s.name.span(), format!("service `{name}` has no endpoints"));
        }
        let mut endpoints = Vec::new();
        for e in &s.endpoints {
            match endpoint(e) {
                Ok(ep) => {
                    let addrs: Vec<Option<IpAddr>> = if ep.wildcard {
                        vec![None]
                    } else {
                        ep.addrs.iter().copied().map(Some).collect()
                    };
                    for a in addrs {
                        let key = (s.remote, ep.proto, a, ep.port);
                        if let Some(other) = claimed.get(&key) {
                            if other != name {
                                at(
                                    e.proto.span(),
                                    format!(
                                        "endpoint {} is already claimed by service `{other}`",
                                        describe(&ep, a)
                                    ),
                                );
                                break;
                            }
                        } else {
                            claimed.insert(key, name.clone());
                        }
                    }
                    endpoints.push(ep);
                }
                Err((span, msg)) => at(span, msg),
            }
        }
        services.push(Service {
            name: name.clone(),
            remote: s.remote,
            endpoints,
        });
    }
    // Each address is one entry of a kernel table (a wildcard, two).
    let entries: usize = services
        .iter()
        .flat_map(|s| &s.endpoints)
        .map(|e| if e.wildcard { 2 } else { e.addrs.len() })
        .sum();
    let max = agent_ebpf::MAX_ENDPOINTS as usize / 2;
    if entries > max {
        at(
            0..0,
            format!(
                "the services name {entries} endpoint addresses; at most {max} fit the kernel tables"
            ),
        );
    }
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    let listen = listen.ok_or_else(|| invalid(Vec::new()))?;
    Ok(Loaded {
        raw,
        services,
        listen,
        source: Some(path.to_path_buf()),
    })
}

fn describe(ep: &Endpoint, addr: Option<IpAddr>) -> String {
    let proto = match ep.proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
    };
    match (addr, ep.proto) {
        (None, Proto::Icmp) => format!("{proto}/*"),
        (Some(a), Proto::Icmp) => format!("{proto}/{a}"),
        (None, _) => format!("{proto}/*:{}", ep.port),
        (Some(a), _) => format!("{proto}/{}", SocketAddr::new(a, ep.port)),
    }
}

/// Service names become label values and pinned slot names.
pub fn bad_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("service name is empty".into());
    }
    if name.len() >= agent_ebpf::NAME_LEN {
        return Some(format!(
            "service name `{name}` is longer than {} bytes",
            agent_ebpf::NAME_LEN - 1
        ));
    }
    if name.starts_with('~') {
        return Some(format!(
            "service name `{name}`: names starting with `~` are reserved"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
    {
        return Some(format!(
            "service name `{name}` may only contain letters, digits and - _ . : /"
        ));
    }
    None
}

fn endpoint(e: &EndpointConfig) -> Result<Endpoint, (Range<usize>, String)> {
    let proto = match e.proto.get_ref().as_str() {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "icmp" => Proto::Icmp,
        other => {
            return Err((
                e.proto.span(),
                format!("unknown proto `{other}` (expected tcp, udp or icmp)"),
            ));
        }
    };
    let port = match (proto, &e.port) {
        (Proto::Icmp, None) => 0,
        (Proto::Icmp, Some(p)) => {
            return Err((p.span(), "icmp endpoints take no port".into()));
        }
        (_, None) => {
            return Err((e.proto.span(), "tcp and udp endpoints need a port".into()));
        }
        (_, Some(p)) => match u16::try_from(*p.get_ref()) {
            Ok(v) if v > 0 => v,
            _ => {
                return Err((
                    p.span(),
                    format!("port {} is out of range 1-65535", p.get_ref()),
                ));
            }
        },
    };
    let (addrs, wildcard) = match &e.addr {
        None => (Vec::new(), true),
        Some(a) => (expand(a.get_ref()).map_err(|m| (a.span(), m))?, false),
    };
    Ok(Endpoint {
        proto,
        addrs,
        wildcard,
        port,
    })
}

/// An address, or a CIDR expanded into its addresses (at most
/// [`MAX_CIDR_ADDRESSES`]). Host bits set in a CIDR are an error: they are
/// almost always a typo for a different network.
pub fn expand(s: &str) -> Result<Vec<IpAddr>, String> {
    let addrs = expand_raw(s)?;
    // "Any address" is said by leaving `addr` out; an unspecified address
    // here would silently become the wildcard.
    if addrs.iter().any(IpAddr::is_unspecified) {
        return Err(format!(
            "`{s}` is or contains the unspecified address; leave `addr` out to match any address"
        ));
    }
    // An IPv4-mapped IPv6 address is the IPv4 address on the wire.
    Ok(addrs.into_iter().map(|a| a.to_canonical()).collect())
}

fn expand_raw(s: &str) -> Result<Vec<IpAddr>, String> {
    let Some((addr, len)) = s.split_once('/') else {
        return s
            .parse::<IpAddr>()
            .map(|a| vec![a])
            .map_err(|_| format!("`{s}` is not an IP address or CIDR"));
    };
    let bad = || format!("`{s}` is not a valid CIDR");
    let ip: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u32 = len.parse().map_err(|_| bad())?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    if len > bits {
        return Err(bad());
    }
    let host_bits = bits - len;
    if host_bits > MAX_CIDR_ADDRESSES.ilog2() {
        return Err(format!(
            "CIDR `{s}` covers more than {MAX_CIDR_ADDRESSES} addresses; name a smaller range"
        ));
    }
    let n = 1u128 << host_bits;
    let base: u128 = match ip {
        IpAddr::V4(v) => u32::from(v).into(),
        IpAddr::V6(v) => u128::from(v),
    };
    if base & (n - 1) != 0 {
        return Err(format!("CIDR `{s}` has host bits set"));
    }
    Ok((0..n)
        .map(|i| match ip {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from((base + i) as u32)),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(base + i)),
        })
        .collect())
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(text: &str) -> Vec<String> {
        match parse(text, Path::new("c.toml")) {
            Ok(_) => Vec::new(),
            Err(e) => e.to_string().lines().map(str::to_string).collect(),
        }
    }

    #[test]
    fn empty_config_is_the_documented_default() {
        let l = parse("", Path::new("c.toml")).unwrap();
        assert_eq!(l.listen, DEFAULT_LISTEN.parse().unwrap());
        assert!(l.agent().interfaces.is_empty());
        assert!(l.agent().discover_sockets);
        assert_eq!(l.agent().pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
    }

    #[test]
    fn docker_defaults_and_label_names() {
        let l = parse("", Path::new("c.toml")).unwrap();
        assert!(l.raw.docker.enabled);
        assert_eq!(l.raw.docker.socket, PathBuf::from(DEFAULT_DOCKER_SOCKET));
        assert_eq!(
            label_metric_name("com.example.team-name"),
            "label_com_example_team_name"
        );
        // Two labels that would export under one name are refused.
        let e = errs("[docker]\nlabels = [\"team.name\", \"team-name\"]\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("c.toml:2:24:"), "{e:?}");
        assert!(e[0].contains("label_team_name"), "{e:?}");
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../systemd/config.toml");
        let l = parse(text, Path::new("systemd/config.toml")).unwrap();
        assert_eq!(l.listen, DEFAULT_LISTEN.parse().unwrap());
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let e = errs("[agent]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("c.toml:3:1:"), "{e:?}");
        assert!(e[0].contains("bogus"), "{e:?}");
    }

    #[test]
    fn bad_port_cidr_and_duplicate_are_all_reported() {
        let text = r#"
[[service]]
name = "a"
endpoints = [{ proto = "tcp", port = 70000 }]

[[service]]
name = "b"
endpoints = [{ proto = "udp", port = 53, addr = "10.0.0.0/33" }]

[[service]]
name = "a"
endpoints = [{ proto = "tcp", port = 80 }]
"#;
        let e = errs(text);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].starts_with("c.toml:4:38:") && e[0].contains("70000"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("c.toml:8:49:") && e[1].contains("CIDR"),
            "{e:?}"
        );
        assert!(
            e[2].starts_with("c.toml:11:8:") && e[2].contains("duplicate service `a`"),
            "{e:?}"
        );
    }

    #[test]
    fn same_endpoint_in_two_services_is_an_error() {
        let text = r#"
[[service]]
name = "a"
endpoints = [{ proto = "tcp", port = 80 }]
[[service]]
name = "b"
endpoints = [{ proto = "tcp", port = 80 }]
"#;
        let e = errs(text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("already claimed by service `a`"), "{e:?}");
    }

    #[test]
    fn cidr_expands_and_rejects_host_bits_and_huge_ranges() {
        assert_eq!(expand("10.0.0.0/30").unwrap().len(), 4);
        assert_eq!(expand("fd00::/126").unwrap().len(), 4);
        assert!(expand("10.0.0.1/30").unwrap_err().contains("host bits"));
        assert!(expand("10.0.0.0/8").unwrap_err().contains("more than"));
        assert!(expand("10.0.0.0/x").is_err());
        assert!(expand("nonsense").is_err());
    }

    #[test]
    fn aliases_of_one_address_are_one_endpoint() {
        let e = errs(
            "[[service]]\nname=\"a\"\nendpoints=[{proto=\"tcp\",port=1,addr=\"10.0.0.1\"}]\n[[service]]\nname=\"b\"\nendpoints=[{proto=\"tcp\",port=1,addr=\"::ffff:10.0.0.1\"}]\n",
        );
        assert!(
            e.len() == 1 && e[0].contains("already claimed by service `a`"),
            "{e:?}"
        );
        for any in ["0.0.0.0", "::", "0.0.0.0/30"] {
            let e = errs(&format!(
                "[[service]]\nname=\"a\"\nendpoints=[{{proto=\"tcp\",port=1,addr=\"{any}\"}}]\n"
            ));
            assert!(e.len() == 1 && e[0].contains("unspecified"), "{any}: {e:?}");
        }
    }

    #[test]
    fn icmp_takes_no_port_and_tcp_needs_one() {
        assert!(
            errs("[[service]]\nname=\"p\"\nendpoints=[{proto=\"icmp\",port=1}]")[0]
                .contains("no port")
        );
        assert!(
            errs("[[service]]\nname=\"p\"\nendpoints=[{proto=\"tcp\"}]")[0].contains("need a port")
        );
        assert!(
            errs("[[service]]\nname=\"p\"\nendpoints=[{proto=\"sctp\",port=1}]")[0]
                .contains("unknown proto")
        );
    }

    /// The fuzz seeds (and any crash input kept as a regression) parse to
    /// Ok or to located errors, without panicking.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let bytes = std::fs::read(e.path()).unwrap();
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = parse(text, &e.path());
                n += 1;
            }
        }
        assert!(n >= 3, "seed corpus missing in {}", dir.display());
    }

    #[test]
    fn out_of_range_durations_and_budget_are_located() {
        let e = errs("[agent]\nrefresh_seconds = 1e-10\nretire_seconds = inf\nmax_series = 3\n");
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].starts_with("c.toml:2:19:") && e[0].contains("refresh_seconds"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("c.toml:3:18:") && e[1].contains("retire_seconds"),
            "{e:?}"
        );
        assert!(
            e[2].starts_with("c.toml:4:14:") && e[2].contains("max_series"),
            "{e:?}"
        );
    }

    #[test]
    fn bad_listen_and_names() {
        assert!(errs("[agent]\nlisten = \"nope\"")[0].starts_with("c.toml:2:10:"));
        assert!(
            errs("[[service]]\nname=\"~x\"\nendpoints=[{proto=\"tcp\",port=1}]")[0]
                .contains("reserved")
        );
    }
}
