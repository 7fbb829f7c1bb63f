//! The agent's TOML configuration as data: the schema, its defaults, the
//! validation of what config itself knows, and the diagnostics.
//!
//! Every problem is reported with file:line:col, all at once, so one edit
//! fixes one round of mistakes. Config imports no module above it: each
//! domain turns its part into runtime objects and reports its problems
//! into the same [`Diagnostics`] (`checks::from_config`,
//! `websec::TlsSettings::from_config`, ...), and `settings` runs them all.
//! `identity` turns the services declared here into service-table entries;
//! `run` reads the `[agent]` table.

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
pub const DEFAULT_STATE_DIR: &str = "/var/lib/netpulse";
/// Largest CIDR a service endpoint may name: each address is one table entry.
pub const MAX_CIDR_ADDRESSES: u32 = 1024;

/// A word from a fixed set in the file (a check's kind, an HTTP method, a
/// DNS record type, ...), read leniently: a word outside the set is kept
/// as written instead of failing the whole parse, so it is reported with
/// its place together with every other mistake (serde stops at its first
/// error), in the words of the domain that reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice<T> {
    Known(T),
    Unknown(String),
}

impl<T: Word> Choice<T> {
    /// The known value, if it is one.
    pub fn known(&self) -> Option<T> {
        match self {
            Choice::Known(t) => Some(*t),
            Choice::Unknown(_) => None,
        }
    }

    /// The word as it reads in the file (normalized if known).
    pub fn word(&self) -> &str {
        match self {
            Choice::Known(t) => t.as_str(),
            Choice::Unknown(w) => w,
        }
    }
}

/// A serde-deserialized enum of words, for [`Choice`].
pub trait Word: Copy + serde::de::DeserializeOwned + 'static {
    /// Every value, in the order messages list them.
    const ALL: &'static [Self];
    /// Whether `aaaa` reads as `AAAA`.
    const IGNORE_CASE: bool = false;
    fn as_str(self) -> &'static str;

    /// The words, for messages: "http, tcp, dns, icmp".
    fn list(sep: &str) -> String {
        Self::ALL
            .iter()
            .map(|w| w.as_str())
            .collect::<Vec<_>>()
            .join(sep)
    }
}

impl<'de, T: Word> Deserialize<'de> for Choice<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{IntoDeserializer, value::Error};
        let word = String::deserialize(d)?;
        let known = |w: &str| T::deserialize(IntoDeserializer::<Error>::into_deserializer(w)).ok();
        let found = known(&word).or_else(|| {
            T::IGNORE_CASE
                .then(|| known(&word.to_ascii_uppercase()))
                .flatten()
        });
        Ok(found.map_or(Choice::Unknown(word), Choice::Known))
    }
}

/// An enum of words: serde reads each as its word, `as_str` writes it;
/// `ignore_case` reads `aaaa` as `AAAA`.
macro_rules! words {
    ($(#[$m:meta])* $name:ident $(ignore_case $ic:literal)? { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $v),+
        }
        impl Word for $name {
            const ALL: &'static [Self] = &[$($name::$v),+];
            $(const IGNORE_CASE: bool = $ic;)?
            fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $s),+
                }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

words!(
    /// `kind` of a `[[check]]`.
    CheckKind {
        Http = "http",
        Tcp = "tcp",
        Dns = "dns",
        Icmp = "icmp",
    }
);

words!(
    /// `method` of an http check: the methods of RFC 9110 and PATCH, in
    /// capitals as on the wire.
    HttpMethod {
        Get = "GET",
        Head = "HEAD",
        Post = "POST",
        Put = "PUT",
        Delete = "DELETE",
        Patch = "PATCH",
        Options = "OPTIONS",
        Trace = "TRACE",
        Connect = "CONNECT",
    }
);

words!(
    /// `query_type` of a dns check (any case): the record types an answer
    /// can be checked for.
    DnsType ignore_case true {
        A = "A",
        Aaaa = "AAAA",
        Caa = "CAA",
        Cname = "CNAME",
        Dnskey = "DNSKEY",
        Ds = "DS",
        Https = "HTTPS",
        Mx = "MX",
        Naptr = "NAPTR",
        Ns = "NS",
        Ptr = "PTR",
        Soa = "SOA",
        Srv = "SRV",
        Sshfp = "SSHFP",
        Svcb = "SVCB",
        Tlsa = "TLSA",
        Txt = "TXT",
    }
);

words!(
    /// `kind` of a check's action.
    ActionKind {
        Webhook = "webhook",
        RestartContainer = "restart_container",
        Capture = "capture",
    }
);

words!(
    /// `client_auth_type` of `[web.tls_server_config]` (exporter-toolkit's
    /// names).
    ClientAuth {
        NoClientCert = "NoClientCert",
        VerifyClientCertIfGiven = "VerifyClientCertIfGiven",
        RequireAndVerifyClientCert = "RequireAndVerifyClientCert",
    }
);

words!(
    /// `min_version` of `[web.tls_server_config]`.
    TlsVersion {
        Tls12 = "TLS12",
        Tls13 = "TLS13",
    }
);

/// The problems found in one config text, each with its place. Config and
/// every domain that builds from the config report into one of these, so
/// all the mistakes of a file come out at once, in file order.
#[derive(Debug)]
pub struct Diagnostics<'t> {
    text: &'t str,
    problems: Vec<Problem>,
}

impl<'t> Diagnostics<'t> {
    pub fn new(text: &'t str) -> Self {
        Self {
            text,
            problems: Vec::new(),
        }
    }

    /// A problem at `span`, a byte range of the text (a `Spanned` value's
    /// `span()`; 0..0 for the file as a whole).
    pub fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, col) = self.line_col(span.start);
        self.problems.push(Problem {
            line,
            col,
            message: message.into(),
        });
    }

    /// 1-based line and column of a byte offset of the text.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        line_col(self.text, offset)
    }

    /// Ok if nothing was found, else every problem for `path`, in file
    /// order (as an editor would walk them).
    pub fn finish(mut self, path: &Path) -> Result<(), ConfigError> {
        if self.problems.is_empty() {
            return Ok(());
        }
        self.problems.sort_by_key(|p| (p.line, p.col));
        Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            problems: self.problems,
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub docker: DockerConfig,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    #[serde(default, rename = "check")]
    pub checks: Vec<CheckConfig>,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default, rename = "hook")]
    pub hooks: Vec<HookConfig>,
    #[serde(default)]
    pub web: WebConfig,
    #[serde(default)]
    pub capture: CaptureConfig,
}

/// `[web]`: TLS and basic auth on every endpoint, with the keys of
/// Prometheus exporter-toolkit's web-config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    pub tls_server_config: Option<TlsServerConfig>,
    /// User → bcrypt hash (`netpulse config hash-password`).
    pub basic_auth_users: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsServerConfig {
    pub cert_file: Spanned<PathBuf>,
    pub key_file: Spanned<PathBuf>,
    #[serde(default)]
    pub client_auth_type: Option<Spanned<Choice<ClientAuth>>>,
    #[serde(default)]
    pub client_ca_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub min_version: Option<Spanned<Choice<TlsVersion>>>,
}

/// `[capture]`: the capture folder (`<state_dir>/captures`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// All capture files together, at most (MB); the oldest go first.
    pub max_disk_mb: Spanned<f64>,
    /// One capture file, at most (MB); a capture past it starts a new part.
    pub file_mb: Spanned<f64>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            max_disk_mb: Spanned::new(0..0, 512.0),
            file_mb: Spanned::new(0..0, 64.0),
        }
    }
}

impl CaptureConfig {
    /// All capture files together, at most (validated by `validate`).
    pub fn max_disk_bytes(&self) -> u64 {
        (*self.max_disk_mb.get_ref() * 1e6) as u64
    }

    /// One capture file, at most.
    pub fn file_bytes(&self) -> u64 {
        (*self.file_mb.get_ref() * 1e6) as u64
    }
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
    /// Where the store (check history, jobs) lives.
    pub state_dir: PathBuf,
    /// Days of check results kept.
    pub history_days: Spanned<f64>,
    /// What counts packets: `ebpf`, `pcap` (libpcap, no eBPF needed), or
    /// `auto`: eBPF, else pcap with the reason logged.
    pub backend: Spanned<Choice<Backend>>,
    /// Unknown peer addresses (and prefix buckets) the service map shows
    /// per service; the rest is folded into buckets and `~other`.
    pub map_top_k: Spanned<usize>,
}

/// Most `agent.map_top_k` may be: past it the map is a list, not a picture.
pub const MAX_MAP_TOP_K: usize = 1_000;

words!(
    /// `agent.backend` / `netpulse run --backend`.
    #[derive(clap::ValueEnum)]
    Backend {
        Auto = "auto",
        Ebpf = "ebpf",
        Pcap = "pcap",
    }
);

impl AgentConfig {
    /// Validated by `validate`: finite and within bounds.
    pub fn refresh(&self) -> Duration {
        Duration::try_from_secs_f64(*self.refresh_seconds.get_ref())
            .unwrap_or(Duration::from_secs(1))
    }

    pub fn retire(&self) -> Duration {
        Duration::try_from_secs_f64(*self.retire_seconds.get_ref())
            .unwrap_or(Duration::from_secs(60))
    }

    pub fn history(&self) -> Duration {
        Duration::try_from_secs_f64(*self.history_days.get_ref() * 86400.0)
            .unwrap_or(Duration::from_secs(7 * 86400))
    }

    pub fn max_series(&self) -> usize {
        *self.max_series.get_ref()
    }

    /// Validated by `validate`.
    pub fn map_top_k(&self) -> usize {
        *self.map_top_k.get_ref()
    }

    /// Validated by `validate`.
    pub fn backend(&self) -> Backend {
        self.backend.get_ref().known().unwrap_or(Backend::Auto)
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
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            history_days: Spanned::new(0..0, 7.0),
            backend: Spanned::new(0..0, Choice::Known(Backend::Auto)),
            map_top_k: Spanned::new(0..0, 20),
        }
    }
}

/// `[[check]]`: a health check. Keys beyond the common ones belong to one
/// kind (`body_contains` to http, `send` to tcp, ...); a key of another
/// kind is an error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    pub name: Spanned<String>,
    /// http (http:// and https:// URLs), tcp, dns or icmp.
    pub kind: Spanned<Choice<CheckKind>>,
    /// http: a URL; tcp: host:port; dns: the name to query; icmp: a host.
    pub target: Spanned<String>,
    #[serde(default)]
    pub service: Option<Spanned<String>>,
    #[serde(default)]
    pub interval_seconds: Option<Spanned<f64>>,
    #[serde(default)]
    pub timeout_seconds: Option<Spanned<f64>>,
    #[serde(default)]
    pub jitter_seconds: Option<Spanned<f64>>,
    #[serde(default)]
    pub retries: Option<Spanned<i64>>,
    #[serde(default)]
    pub retry_backoff_seconds: Option<Spanned<f64>>,
    #[serde(default)]
    pub failure_threshold: Option<Spanned<i64>>,
    #[serde(default)]
    pub success_threshold: Option<Spanned<i64>>,
    #[serde(default)]
    pub depends_on: Vec<Spanned<String>>,
    #[serde(default)]
    pub run_when_blocked: bool,
    #[serde(default)]
    pub tags: Vec<Spanned<String>>,
    #[serde(default)]
    pub actions: Vec<ActionConfig>,
    // http
    #[serde(default)]
    pub method: Option<Spanned<Choice<HttpMethod>>>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Status codes and ranges: `[200, 204]`, `["200-299", 301]`.
    #[serde(default)]
    pub expect_status: Vec<Spanned<toml::Value>>,
    #[serde(default)]
    pub body_contains: Option<Spanned<String>>,
    #[serde(default)]
    pub body_regex: Option<Spanned<String>>,
    #[serde(default)]
    pub max_latency_seconds: Option<Spanned<f64>>,
    #[serde(default)]
    pub max_redirects: Option<Spanned<i64>>,
    #[serde(default)]
    pub tls_ca_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub cert_min_valid_days: Option<Spanned<f64>>,
    // tcp
    #[serde(default)]
    pub send: Option<Spanned<String>>,
    /// tcp: a substring of the answer; dns: a substring of an answer record.
    #[serde(default)]
    pub expect: Option<Spanned<String>>,
    // dns
    #[serde(default)]
    pub query_type: Option<Spanned<Choice<DnsType>>>,
    /// An address (port 53) or address:port; absent: /etc/resolv.conf.
    #[serde(default)]
    pub server: Option<Spanned<String>>,
}

/// `actions = [{ kind = "webhook", url = "...", after = 3 }]` on a check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// webhook, restart_container or capture.
    pub kind: Spanned<Choice<ActionKind>>,
    #[serde(default)]
    pub url: Option<Spanned<String>>,
    #[serde(default)]
    pub container: Option<Spanned<String>>,
    /// Consecutive failed runs before it fires (default 1).
    #[serde(default)]
    pub after: Option<Spanned<i64>>,
    /// Least seconds between two firings (default 300).
    #[serde(default)]
    pub cooldown_seconds: Option<Spanned<f64>>,
    /// capture: seconds captured after the failure (default 10).
    #[serde(default)]
    pub seconds: Option<Spanned<f64>>,
    /// capture: a BPF filter (default: the check's service's endpoints).
    #[serde(default)]
    pub filter: Option<Spanned<String>>,
    /// capture: the interface (default: any).
    #[serde(default)]
    pub interface: Option<Spanned<String>>,
    /// capture: packets kept from before the failure (default 1000).
    #[serde(default)]
    pub ring_packets: Option<Spanned<i64>>,
    /// capture: seconds kept from before the failure (default 30).
    #[serde(default)]
    pub ring_seconds: Option<Spanned<f64>>,
}

/// `[api]`: who may start work through the API.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// The bearer token of the endpoints that start work; without one
    /// (here or in `token_file`) they are off.
    pub token: Option<Spanned<String>>,
    /// A file holding the token (first line), readable by the agent only.
    pub token_file: Option<Spanned<PathBuf>>,
}

/// `[[hook]]`: `POST /api/v1/hooks/<name>` runs these checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    pub name: Spanned<String>,
    #[serde(default)]
    pub checks: Vec<Spanned<String>>,
    #[serde(default)]
    pub tags: Vec<Spanned<String>>,
}

/// A validated hook.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hook {
    pub checks: Vec<String>,
    pub tags: Vec<String>,
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
    pub proto: Spanned<Choice<Proto>>,
    /// An address or CIDR; absent = any address (both families).
    #[serde(default)]
    pub addr: Option<Spanned<String>>,
    /// Required for tcp/udp, absent for icmp.
    #[serde(default)]
    pub port: Option<Spanned<i64>>,
}

words!(
    /// `proto` of an endpoint.
    #[derive(PartialOrd, Ord)]
    Proto {
        Tcp = "tcp",
        Udp = "udp",
        Icmp = "icmp",
    }
);

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

/// The config's own data, validated. The runtime objects the domains
/// build from it (checks, TLS, ...) are in `settings::Settings`, which
/// holds one of these.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub raw: Config,
    pub services: Vec<Service>,
    pub hooks: BTreeMap<String, Hook>,
    /// The API's bearer token, from `api.token` or `api.token_file`.
    pub api_token: Option<String>,
    pub listen: SocketAddr,
    pub source: Option<PathBuf>,
}

impl Loaded {
    pub fn agent(&self) -> &AgentConfig {
        &self.raw.agent
    }
}

/// A config's text and where it came from.
#[derive(Debug, Clone)]
pub struct Source {
    pub text: String,
    /// The name messages give it (`<default>` for the embedded default).
    pub path: PathBuf,
    /// The file it was read from; None for the embedded default.
    pub file: Option<PathBuf>,
}

/// Reads `path`; `None` is the embedded default (an empty file).
pub fn read(path: Option<&Path>) -> Result<Source, ConfigError> {
    match path {
        None => Ok(Source {
            text: String::new(),
            path: PathBuf::from("<default>"),
            file: None,
        }),
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?;
            Ok(Source {
                text,
                path: p.to_path_buf(),
                file: Some(p.to_path_buf()),
            })
        }
    }
}

/// Reads and validates config's own data at `path` (`None`: the embedded
/// defaults). `settings::load` also builds and validates every domain's
/// part: the agent and `netpulse config check` use that.
pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
    let src = read(path)?;
    let mut l = parse(&src.text, &src.path)?;
    l.source = src.file;
    Ok(l)
}

/// Parses and validates config's own data (see `load`).
pub fn parse(text: &str, path: &Path) -> Result<Loaded, ConfigError> {
    let raw = deserialize(text, path)?;
    let mut d = Diagnostics::new(text);
    let loaded = validate(raw, &mut d);
    d.finish(path)?;
    let mut l = loaded.ok_or_else(|| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems: Vec::new(),
    })?;
    l.source = Some(path.to_path_buf());
    Ok(l)
}

/// Syntax and schema. A text that does not deserialize stops here, with
/// its one problem.
pub fn deserialize(text: &str, path: &Path) -> Result<Config, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, col) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        ConfigError::Invalid {
            path: path.to_path_buf(),
            problems: vec![Problem {
                line,
                col,
                message: e.message().trim().to_string(),
            }],
        }
    })
}

/// Checks what config itself knows (the `[agent]` values, services and
/// their endpoints, Docker labels, hooks, the API token, the capture
/// folder's limits); problems go to `d`. None when `listen` is unusable
/// (a problem says so). `source` is left None.
pub fn validate(raw: Config, d: &mut Diagnostics) -> Option<Loaded> {
    let listen = match raw.agent.listen.get_ref().parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            d.at(
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
        ("history_days", &a.history_days, 0.0, 3650.0),
    ] {
        let x = *v.get_ref();
        if !(x.is_finite() && (lo..=hi).contains(&x)) {
            d.at(v.span(), format!("{what} = {x} is out of range {lo}-{hi}"));
        }
    }
    for (what, v) in [
        ("max_disk_mb", &raw.capture.max_disk_mb),
        ("file_mb", &raw.capture.file_mb),
    ] {
        let x = *v.get_ref();
        if !(x.is_finite() && (0.01..=1e7).contains(&x)) {
            d.at(
                v.span(),
                format!("capture.{what} = {x} is out of range 0.01-10000000"),
            );
        }
    }
    if !(1..=MAX_MAP_TOP_K).contains(a.map_top_k.get_ref()) {
        d.at(
            a.map_top_k.span(),
            format!(
                "map_top_k = {} is out of range 1-{MAX_MAP_TOP_K}",
                a.map_top_k.get_ref()
            ),
        );
    }
    if let Choice::Unknown(w) = a.backend.get_ref() {
        d.at(
            a.backend.span(),
            format!("backend `{w}` is not one of {}", Backend::list(", ")),
        );
    }
    let mut seen_if = HashSet::new();
    for i in &raw.agent.interfaces {
        let name = i.get_ref();
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            d.at(i.span(), format!("`{name}` is not a valid interface name"));
        } else if !seen_if.insert(name.clone()) {
            d.at(i.span(), format!("interface `{name}` is listed twice"));
        }
    }

    let mut seen_label: BTreeMap<String, String> = BTreeMap::new();
    for l in &raw.docker.labels {
        let name = l.get_ref();
        let metric = label_metric_name(name);
        if name.is_empty() {
            d.at(l.span(), "an empty label name");
        } else if let Some(other) = seen_label.insert(metric.clone(), name.clone()) {
            d.at(
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
            d.at(s.name.span(), msg);
        } else if let Some(first) = names.get(name) {
            let (l, c) = d.line_col(first.start);
            d.at(
                s.name.span(),
                format!("duplicate service `{name}` (first defined at line {l}, column {c})"),
            );
        } else {
            names.insert(name.clone(), s.name.span());
        }
        if s.endpoints.is_empty() {
            d.at(s.name.span(), format!("service `{name}` has no endpoints"));
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
                                d.at(
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
                Err((span, msg)) => d.at(span, msg),
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
    let mut hooks = BTreeMap::new();
    for h in &raw.hooks {
        let name = h.name.get_ref();
        if let Some(msg) = bad_name(name) {
            d.at(h.name.span(), msg.replace("service name", "hook name"));
        }
        for c in &h.checks {
            if !raw.checks.iter().any(|k| k.name.get_ref() == c.get_ref()) {
                d.at(
                    c.span(),
                    format!(
                        "hook `{name}` names `{}`, which is not a check",
                        c.get_ref()
                    ),
                );
            }
        }
        for t in &h.tags {
            if !raw
                .checks
                .iter()
                .any(|k| k.tags.iter().any(|x| x.get_ref() == t.get_ref()))
            {
                d.at(
                    t.span(),
                    format!(
                        "hook `{name}` names tag `{}`, which no check has",
                        t.get_ref()
                    ),
                );
            }
        }
        if h.checks.is_empty() && h.tags.is_empty() {
            d.at(
                h.name.span(),
                format!("hook `{name}` names no checks and no tags"),
            );
        }
        if hooks
            .insert(
                name.clone(),
                Hook {
                    checks: h.checks.iter().map(|c| c.get_ref().clone()).collect(),
                    tags: h.tags.iter().map(|t| t.get_ref().clone()).collect(),
                },
            )
            .is_some()
        {
            d.at(h.name.span(), format!("duplicate hook `{name}`"));
        }
    }
    let api_token = match (&raw.api.token, &raw.api.token_file) {
        (Some(t), Some(_)) => {
            d.at(t.span(), "set api.token or api.token_file, not both");
            None
        }
        (Some(t), None) if t.get_ref().len() < 16 => {
            d.at(t.span(), "api.token is shorter than 16 characters");
            None
        }
        (Some(t), None) => Some(t.get_ref().clone()),
        (None, Some(f)) => match std::fs::read_to_string(f.get_ref()) {
            Ok(text) => match text.lines().next().map(str::trim) {
                Some(t) if t.len() >= 16 => Some(t.to_string()),
                _ => {
                    d.at(
                        f.span(),
                        format!(
                            "{}: the token's first line is shorter than 16 characters",
                            f.get_ref().display()
                        ),
                    );
                    None
                }
            },
            Err(e) => {
                d.at(
                    f.span(),
                    format!("api.token_file {}: {e}", f.get_ref().display()),
                );
                None
            }
        },
        (None, None) => None,
    };
    let max = agent_ebpf::MAX_ENDPOINTS as usize / 2;
    if entries > max {
        d.at(
            0..0,
            format!(
                "the services name {entries} endpoint addresses; at most {max} fit the kernel tables"
            ),
        );
    }
    let listen = listen?;
    Some(Loaded {
        raw,
        services,
        hooks,
        api_token,
        listen,
        source: None,
    })
}

fn describe(ep: &Endpoint, addr: Option<IpAddr>) -> String {
    let proto = ep.proto;
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
    let proto = match e.proto.get_ref() {
        Choice::Known(p) => *p,
        Choice::Unknown(other) => {
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
    fn words_read_as_typed_values_and_unknown_ones_are_kept_as_written() {
        use serde::de::{IntoDeserializer, value::Error};
        fn read<T: Word>(w: &str) -> Choice<T> {
            Choice::deserialize(IntoDeserializer::<Error>::into_deserializer(w)).unwrap()
        }
        fn every_word_reads_as_itself<T: Word + PartialEq + fmt::Debug>() {
            for &t in T::ALL {
                assert_eq!(read::<T>(t.as_str()), Choice::Known(t));
            }
        }
        every_word_reads_as_itself::<CheckKind>();
        every_word_reads_as_itself::<HttpMethod>();
        every_word_reads_as_itself::<DnsType>();
        every_word_reads_as_itself::<ActionKind>();
        every_word_reads_as_itself::<Backend>();
        every_word_reads_as_itself::<Proto>();
        every_word_reads_as_itself::<ClientAuth>();
        every_word_reads_as_itself::<TlsVersion>();
        // DNS types in any case; methods in capitals, as on the wire.
        assert_eq!(read::<DnsType>("aaaa"), Choice::Known(DnsType::Aaaa));
        assert_eq!(read::<HttpMethod>("get"), Choice::Unknown("get".into()));
        assert_eq!(read::<CheckKind>("HTTP").word(), "HTTP");
        assert_eq!(CheckKind::list(", "), "http, tcp, dns, icmp");
        // Not a string at all is a schema error, with its place.
        let e = errs("[[check]]\nname = \"a\"\nkind = 5\ntarget = \"h:1\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("c.toml:3:8:") && e[0].contains("expected a string"),
            "{e:?}"
        );
    }

    #[test]
    fn an_unknown_backend_is_named_with_the_choices() {
        let e = errs("[agent]\nbackend = \"xdp\"\n");
        assert_eq!(
            e,
            ["c.toml:2:11: backend `xdp` is not one of auto, ebpf, pcap"]
        );
        let l = parse("[agent]\nbackend = \"pcap\"\n", Path::new("c.toml")).unwrap();
        assert_eq!(l.agent().backend(), Backend::Pcap);
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

    #[test]
    fn bad_listen_and_names() {
        assert!(errs("[agent]\nlisten = \"nope\"")[0].starts_with("c.toml:2:10:"));
        assert!(
            errs("[[service]]\nname=\"~x\"\nendpoints=[{proto=\"tcp\",port=1}]")[0]
                .contains("reserved")
        );
    }
}
