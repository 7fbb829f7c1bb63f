//! The requests and answers of `/api/v1`, as types: the agent serializes
//! them (the `web` module), the CLI reads them back (`cli`), and the
//! OpenAPI document is derived from them (`utoipa`). They import nothing
//! from the crate, so both layers may use them.
//!
//! The JSON is the API's contract: field names, nesting, numbers and
//! nulls stay as they are (`None` is `null`, never a missing field). Each
//! answer reads with `#[serde(default)]`, so the CLI takes an older or a
//! partial answer (a field it lacks reads as empty) and a state word it
//! does not know reads as `unknown`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every error answer: `{"error": "..."}`, with the HTTP status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    pub error: String,
}

/// A job was queued (202, with `Location` the job's URL).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Queued {
    /// The job's id.
    pub job: i64,
    /// `/api/v1/jobs/{id}`.
    pub url: String,
}

// --- /api/v1/services ----------------------------------------------------

/// A service's state: from its checks, or, without checks, from whether
/// its source still sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    Up,
    Down,
    Degraded,
    Blocked,
    #[default]
    #[serde(other)]
    Unknown,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Up => "up",
            ServiceState::Down => "down",
            ServiceState::Degraded => "degraded",
            ServiceState::Blocked => "blocked",
            ServiceState::Unknown => "unknown",
        }
    }
}

/// A check's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CheckState {
    Up,
    Down,
    Blocked,
    #[default]
    #[serde(other)]
    Unknown,
}

impl CheckState {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckState::Up => "up",
            CheckState::Down => "down",
            CheckState::Blocked => "blocked",
            CheckState::Unknown => "unknown",
        }
    }
}

/// Where a service's name comes from. (`Service.source` is a string in
/// Rust, so that a reader takes a source it does not know yet.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    Socket,
    Container,
    /// Restored from the probes' pinned maps; not seen since the start.
    Restored,
}

/// `GET /api/v1/services`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Services {
    /// Seconds since the epoch.
    pub generated_at: f64,
    /// The agent's host name.
    pub host: String,
    pub services: Vec<Service>,
}

/// One service: counters, 1m/5m rates, the 15-minute sparkline, source,
/// containers and checks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Service {
    pub name: String,
    #[schema(value_type = Source)]
    pub source: String,
    pub state: ServiceState,
    /// Its source no longer sees it; its counters stay for a while.
    pub retired: bool,
    pub remote: bool,
    /// The containers' compose projects, comma-separated.
    pub compose_project: String,
    /// The containers' compose services, comma-separated.
    pub compose_service: String,
    pub containers: Vec<Container>,
    pub counters: Counters,
    pub rates: RateWindows,
    pub sparkline: Sparkline,
    pub checks: Vec<ServiceCheck>,
    /// The slowest of its checks' last runs.
    pub latency_seconds: Option<f64>,
    /// The lowest of its checks' uptimes.
    pub uptime: Uptime,
    /// TCP health of its one side, from the kernel (or, on the pcap
    /// backend, from headers); null before its first connection or where
    /// this host cannot follow TCP.
    pub tcp: Option<TcpHealth>,
}

/// A service's TCP health and the kernel's drops of its packets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct TcpHealth {
    /// `server` (connections to a local service) or `client` (this host
    /// connecting to a remote one).
    pub side: String,
    /// Connections by result: established, refused, timeout, aborted,
    /// reset, closed (since the service's slot was assigned).
    pub connections: BTreeMap<String, u64>,
    /// Connections open now.
    pub open: u64,
    pub handshake_p50_seconds: Option<f64>,
    pub handshake_p99_seconds: Option<f64>,
    pub rtt_p50_seconds: Option<f64>,
    pub rtt_p99_seconds: Option<f64>,
    /// Segments this host retransmitted.
    pub retransmits: u64,
    /// Retransmitted segments per packet this host sent to or for the
    /// service; null before any was sent.
    pub retransmit_ratio: Option<f64>,
    /// Kernel drops of its packets by `skb_drop_reason`, both directions.
    pub drops: BTreeMap<String, u64>,
    /// Figures this backend or kernel cannot give (`rtt`, `timeout`,
    /// `aborted`, `drops` on the pcap backend; a feature the kernel lacks),
    /// reported as zero or null above.
    pub unavailable: Vec<String>,
}

/// A container behind a service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Container {
    /// The short (12-character) id.
    pub id: String,
    pub name: String,
    pub image: String,
}

/// A service's counters since its slot was assigned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Counters {
    pub ingress: Direction,
    pub egress: Direction,
}

/// The counters of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Direction {
    pub packets: u64,
    pub bytes: u64,
    pub syn: u64,
    pub fin: u64,
    pub rst: u64,
}

/// Rates over the last minute and the last 5 minutes; null until the
/// history covers the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct RateWindows {
    #[serde(rename = "1m")]
    pub m1: Option<Rates>,
    #[serde(rename = "5m")]
    pub m5: Option<Rates>,
}

/// Per-second rates over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Rates {
    pub rx_packets_per_second: f64,
    pub rx_bytes_per_second: f64,
    pub tx_packets_per_second: f64,
    pub tx_bytes_per_second: f64,
}

/// Bytes per second over the last 15 minutes, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Sparkline {
    pub interval_seconds: u64,
    pub rx_bytes_per_second: Vec<f64>,
    pub tx_bytes_per_second: Vec<f64>,
}

/// One check of a service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ServiceCheck {
    pub name: String,
    pub kind: String,
    pub state: CheckState,
    /// Its last run's duration.
    pub latency_seconds: Option<f64>,
    pub uptime: Uptime,
}

/// The share of successful runs (0 to 1) over 24 hours and 7 days; null
/// without a store or without runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Uptime {
    #[serde(rename = "24h")]
    pub h24: Option<f64>,
    #[serde(rename = "7d")]
    pub d7: Option<f64>,
}

// --- /api/v1/interfaces --------------------------------------------------

/// `GET /api/v1/interfaces`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Interfaces {
    pub interfaces: Vec<Interface>,
}

/// Where an interface sits: the host's own, or a container's veth.
/// (`Interface.zone` is a string in Rust, as `Service.source`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Zone {
    Host,
    Container,
}

/// An interface with probes attached.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    #[schema(value_type = Zone)]
    pub zone: String,
    pub hooks: Vec<Hook>,
    pub counters: InterfaceCounters,
}

/// One attached program: `xdp`/`tc_ingress`/`tc_egress` and its mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Hook {
    pub hook: String,
    pub mode: String,
}

/// The kernel's counters of the interface (`/sys/class/net/<if>/statistics`);
/// null where unreadable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct InterfaceCounters {
    pub rx_bytes: Option<u64>,
    pub rx_dropped: Option<u64>,
    pub rx_packets: Option<u64>,
    pub tx_bytes: Option<u64>,
    pub tx_dropped: Option<u64>,
    pub tx_packets: Option<u64>,
}

// --- /api/v1/checks --------------------------------------------------------

/// `GET /api/v1/checks`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Checks {
    pub checks: Vec<Check>,
}

/// A check: its state, last result, uptime, recent results and incidents.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Check {
    pub name: String,
    pub kind: String,
    pub target: String,
    pub service: Option<String>,
    pub tags: Vec<String>,
    pub depends_on: Vec<String>,
    pub state: CheckState,
    /// A dependency is down.
    pub blocked: bool,
    pub last: Option<LastRun>,
    pub uptime: Uptime,
    /// The last 20 stored results, newest first.
    pub recent: Vec<RecentResult>,
    /// Down → up intervals of the last 7 days.
    pub incidents: Vec<Incident>,
}

/// A check's last run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct LastRun {
    pub ok: bool,
    pub error: Option<String>,
    pub duration_seconds: f64,
    pub http_status: Option<u16>,
    /// Seconds per phase (`dns`, `connect`, `tls`, `first_byte`,
    /// `transfer`).
    pub phases: BTreeMap<String, f64>,
    /// Why it failed, in one line, from the evidence; null when it passed.
    pub explanation: Option<String>,
    /// The facts behind the explanation; null when it passed.
    pub evidence: Option<Evidence>,
}

/// Why a check failed, as found from its own flows and the kernel's view
/// of them (`evidence.cause`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A TCP reset answered the SYN: nothing listens there, or a firewall
    /// rejects with a reset.
    Refused,
    /// An ICMP destination-unreachable quoting the check's packet came back
    /// (`evidence.icmp`).
    IcmpUnreachable,
    /// This host's firewall dropped the check's packets or their answers
    /// (kernel drop reason `netfilter_drop`, `evidence.drops`).
    LocalFirewallDrop,
    /// This host's kernel dropped them for another reason (`evidence.drops`).
    LocalDrop,
    /// Sent, never answered, and nothing dropped on this host: lost beyond
    /// it (a firewall or a dead host on the way).
    LostBeyondHost,
    /// The target listens on this host and its accept queue overflowed.
    AcceptQueueFull,
    /// This host's routing table refused the destination (`evidence.route`).
    NoRoute,
    /// The name did not resolve.
    Resolve,
    /// The DNS server answered with an error code (`evidence.dns_rcode`).
    DnsRcode,
    /// The DNS answer lacks the wanted record or value.
    DnsNoAnswer,
    /// The TLS handshake failed (`evidence.tls`).
    Tls,
    /// The certificate is valid but expires sooner than allowed.
    CertExpiring,
    /// An HTTP status the check does not accept (`evidence.http_status`).
    HttpStatus,
    /// The answer's content did not match.
    Content,
    /// The answer came later than `max_latency_seconds`.
    Slow,
    /// The connection was set up, then reset or closed by the peer after
    /// the request.
    ResetAfterRequest,
    /// The run timed out with nothing else known.
    Timeout,
    /// The check could not even try (a socket, a permission).
    LocalError,
    /// None of the above.
    #[default]
    #[serde(other)]
    Unknown,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Refused => "refused",
            Cause::IcmpUnreachable => "icmp_unreachable",
            Cause::LocalFirewallDrop => "local_firewall_drop",
            Cause::LocalDrop => "local_drop",
            Cause::LostBeyondHost => "lost_beyond_host",
            Cause::AcceptQueueFull => "accept_queue_full",
            Cause::NoRoute => "no_route",
            Cause::Resolve => "resolve",
            Cause::DnsRcode => "dns_rcode",
            Cause::DnsNoAnswer => "dns_no_answer",
            Cause::Tls => "tls",
            Cause::CertExpiring => "cert_expiring",
            Cause::HttpStatus => "http_status",
            Cause::Content => "content",
            Cause::Slow => "slow",
            Cause::ResetAfterRequest => "reset_after_request",
            Cause::Timeout => "timeout",
            Cause::LocalError => "local_error",
            Cause::Unknown => "unknown",
        }
    }
}

/// The facts behind a failed check's explanation. A field that is null
/// was not known or does not apply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Evidence {
    pub cause: Cause,
    /// The far end of the check's last flow, `ip:port` (ICMP: the address).
    pub target: Option<String>,
    /// Its near end, `ip:port`, once the kernel chose it.
    pub local: Option<String>,
    /// The error the socket reported (`ECONNREFUSED`, …).
    pub errno: Option<String>,
    /// SYNs (or DNS queries) sent, first one included.
    pub syns_sent: Option<u32>,
    /// Whether the handshake completed (a SYN-ACK came).
    pub synack_received: Option<bool>,
    /// TCP resets the check's socket received (kernel: `tcp_receive_reset`).
    pub resets_received: Option<u32>,
    /// An ICMP error quoting the check's packet.
    pub icmp: Option<IcmpError>,
    /// Packets of the check's flows this host's kernel dropped.
    pub drops: Vec<DropEvidence>,
    /// Whether the kernel's drop view was on for this run (eBPF backend with
    /// the `kernel_drops` feature): without it, "nothing dropped" is unknown.
    pub kernel_drops_watched: bool,
    /// The route type that refused the destination: `blackhole`,
    /// `unreachable`, `prohibit`, `none`.
    pub route: Option<String>,
    /// The listener on this host: connections waiting in its accept queue,
    /// and the kernel's `ListenOverflows` during the run.
    pub accept_queue: Option<u64>,
    pub listen_overflows: Option<u64>,
    /// DNS: the answer's rcode (`NXDOMAIN`, `SERVFAIL`, …) and the server.
    pub dns_rcode: Option<String>,
    pub dns_server: Option<String>,
    /// TLS: what failed (`certificate expired`, …).
    pub tls: Option<String>,
    pub http_status: Option<u16>,
    /// Seconds per phase, as far as the run got.
    pub phases: BTreeMap<String, f64>,
    pub max_latency_seconds: Option<f64>,
    /// The check's service, as the kernel counted it during the run.
    pub service: Option<ServiceWindow>,
}

/// What a check's service went through during one run of the check (all
/// of its traffic, not only the check's): counts added in that window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ServiceWindow {
    pub name: String,
    /// Kernel drops by reason (lower case).
    pub drops: BTreeMap<String, u64>,
    /// Connections refused, reset, timed out; retransmitted segments.
    pub refused: u64,
    pub reset: u64,
    pub timeout: u64,
    pub retransmits: u64,
}

impl ServiceWindow {
    /// Whether anything happened.
    pub fn is_quiet(&self) -> bool {
        self.drops.values().all(|n| *n == 0)
            && self.refused == 0
            && self.reset == 0
            && self.timeout == 0
            && self.retransmits == 0
    }
}

/// An ICMP error about the check's packet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct IcmpError {
    /// ICMP (or ICMPv6) type and code.
    #[serde(rename = "type")]
    pub icmp_type: u8,
    pub code: u8,
    /// Who sent it.
    pub from: Option<String>,
    /// `port unreachable`, `host unreachable`, …
    pub text: String,
}

/// Packets of a check's flow the kernel dropped on this host, by reason.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct DropEvidence {
    /// The kernel's `skb_drop_reason`, without `SKB_DROP_REASON_`, in lower
    /// case (as in `netpulse_service_kernel_drops_total`).
    pub reason: String,
    /// `egress`: the check's own packets; `ingress`: the answers.
    pub direction: String,
    /// Where: `output` (a packet this host was sending: the output and
    /// postrouting hooks, the qdisc) or `input` (one it received, loopback
    /// included: prerouting, input, the TCP stack).
    pub path: String,
    pub count: u64,
}

/// One stored result of a check.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct RecentResult {
    /// Milliseconds since the epoch.
    pub at_ms: i64,
    pub ok: bool,
    pub duration_ms: f64,
    pub error: Option<String>,
    pub explanation: Option<String>,
    /// `evidence.cause` of that run.
    pub cause: Option<Cause>,
}

/// A down → up interval of a check (`end_ms` null: still down).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Incident {
    pub check: String,
    pub start_ms: i64,
    pub end_ms: Option<i64>,
    pub error: Option<String>,
    /// The explanation of the failure that opened it.
    pub explanation: Option<String>,
}

// --- /api/v1/jobs ----------------------------------------------------------

/// `GET /api/v1/jobs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Jobs {
    pub jobs: Vec<Job>,
}

/// A job's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    #[default]
    Pending,
    Running,
    Done,
    Failed,
    /// The agent stopped while it ran (or a state this CLI does not know).
    #[serde(other)]
    Interrupted,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Interrupted => "interrupted",
        }
    }
}

/// A queued piece of work: `check` (`arg` the check's name), `tag`,
/// `hook` or `capture` (`arg` the capture's plan, JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Job {
    pub id: i64,
    pub kind: String,
    pub arg: String,
    pub state: JobState,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    /// What the job reports once finished; its shape depends on the kind
    /// (a capture: [`CaptureOutcome`]; a failure: `{"error": "..."}`).
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
}

// --- /api/v1/captures ------------------------------------------------------

/// `POST /api/v1/captures`: what to capture and when to stop. With no
/// limit the capture stops after 10 seconds.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    /// Default: `any` (every interface, Linux cooked headers).
    #[serde(default)]
    pub interface: Option<String>,
    /// A BPF filter (tcpdump syntax).
    #[serde(default)]
    pub filter: Option<String>,
    /// A service: its endpoints become the filter.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub seconds: Option<f64>,
    #[serde(default)]
    pub packets: Option<u64>,
    #[serde(default)]
    pub bytes: Option<u64>,
}

/// `GET /api/v1/captures`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Captures {
    pub captures: Vec<Capture>,
}

/// A capture on disk, with its job where the store still has it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Capture {
    /// The capture's (and its job's) id.
    pub id: i64,
    pub state: Option<JobState>,
    pub plan: Option<CapturePlan>,
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    /// Bytes of all its parts.
    pub bytes: u64,
    pub parts: Vec<CapturePart>,
}

/// A checked capture request: what the job runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct CapturePlan {
    pub interface: String,
    pub filter: String,
    pub seconds: f64,
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
    /// A capture a failing check started (`[[check]] on_failure`): the
    /// check. Absent for captures started through the API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// Why it started (`check failed`); absent as `check`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
}

/// One file of a capture (a capture rotates into parts).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct CapturePart {
    pub part: u32,
    pub bytes: u64,
    /// Seconds since the epoch.
    pub modified: Option<u64>,
    /// `/api/v1/captures/{id}/file?part={part}`.
    pub url: String,
}

/// A finished capture job's result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct CaptureOutcome {
    pub packets: u64,
    pub bytes: u64,
    pub parts: Vec<u32>,
    /// `seconds`, `packets`, `bytes` or `disk cap`.
    pub stopped_by: String,
    /// An API capture's packets dropped by the kernel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// A check's capture: the packets of the pre-trigger ring.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packets_before_trigger: Option<u64>,
    /// A check's capture: the check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
}

// --- /api/v1/map -----------------------------------------------------------

/// The `peer` of the edge that sums a service's peers past the top-K.
pub const MAP_OTHER: &str = "~other";

/// A node of the service map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MapNode {
    /// `service:web`, `container:db`, `remote:api`, `host`,
    /// `address:10.0.0.5`, `bucket:10.0.0.0/24` or `other:web`.
    pub id: String,
    /// service, container, remote, host, address, bucket or other.
    pub kind: String,
    /// The service's name, the address, the prefix; `~other` for other.
    pub name: String,
    /// The netpulse service this node is (or, for `other`, whose peers it
    /// sums); null for the host, addresses and buckets.
    pub service: Option<String>,
}

/// An edge: a service and one of its peers, with the service's counters of
/// that peer (`in`: toward the service, `out`: from it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct MapEdge {
    /// The client side's node id (the peer).
    pub source: String,
    /// The server side's node id (the service).
    pub target: String,
    /// Whose counters these are.
    pub service: String,
    /// The peer: a name (`db`, `host`), an address, a prefix or `~other`.
    pub peer: String,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Connections the peer opened: SYNs (without ACK) toward the service
    /// seen on the packet path.
    pub connections: u64,
    /// The TCP handshake's median, on edges from this host (`host`) to a
    /// `remote` service (its client side, from the TCP health programs);
    /// null on other edges (not measured per peer).
    pub handshake_p50_seconds: Option<f64>,
    /// Segments this host retransmitted to a `remote` service, on the
    /// `host` edge; 0 on other edges (not measured per peer).
    pub retransmits: u64,
}

/// `GET /api/v1/map`: who talks to whom.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ServiceMap {
    pub nodes: Vec<MapNode>,
    pub edges: Vec<MapEdge>,
    /// Unknown addresses (and buckets) shown per service (`[agent]
    /// map_top_k`); the rest is folded into buckets and `~other`.
    pub top_k: u64,
    /// Unknown (service, address) pairs the kernel's LRU forgot to make
    /// room for others (their counts stay in their bucket).
    pub evictions: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nulls_stay_and_windows_keep_their_names() {
        let s = Service::default();
        let v = serde_json::to_value(&s).unwrap();
        assert!(v["latency_seconds"].is_null() && v.get("latency_seconds").is_some());
        assert!(v["rates"].get("1m").is_some() && v["rates"]["5m"].is_null());
        assert!(v["uptime"].get("24h").is_some() && v["uptime"].get("7d").is_some());
        assert_eq!(v["state"], "unknown");
    }

    #[test]
    fn partial_answers_and_new_states_read() {
        let s: Services = serde_json::from_str(
            r#"{"host":"h","services":[{"name":"web","state":"sleepy","source":"config"}]}"#,
        )
        .unwrap();
        assert_eq!(s.host, "h");
        assert_eq!(s.services[0].state, ServiceState::Unknown);
        assert_eq!(s.services[0].counters.ingress.packets, 0);
        let j: Job = serde_json::from_str(r#"{"id":3,"state":"paused"}"#).unwrap();
        assert_eq!((j.id, j.state), (3, JobState::Interrupted));
    }

    #[test]
    fn capture_plans_of_both_sources_keep_their_fields() {
        let api =
            r#"{"interface":"any","filter":"tcp","seconds":10.0,"packets":null,"bytes":null}"#;
        let check = r#"{"interface":"eth0","filter":"tcp","seconds":2.0,"packets":null,"bytes":null,"check":"web-up","trigger":"check failed"}"#;
        for text in [api, check] {
            let plan: CapturePlan = serde_json::from_str(text).unwrap();
            let back: serde_json::Value = serde_json::to_value(&plan).unwrap();
            let want: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(back, want);
        }
    }
}
