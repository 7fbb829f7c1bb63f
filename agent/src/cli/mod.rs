//! What the one-shot commands print: aligned tables, coloured by state on
//! a terminal, and `netpulse status`, which reads a running agent's API.

pub mod capture;

use std::{
    io::{ErrorKind, IsTerminal, Write},
    time::Duration,
};

use hyper::{Method, Uri};
use serde::de::DeserializeOwned;

use crate::api_types::{self as t, CheckState, Services};

/// The agent's address when neither `--url` nor `NETPULSE_URL` says.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9477";

/// `--output`/`-o` of the commands that print a report (`status`,
/// `check run`, `capture list`; `analyze` adds `csv`): one spelling
/// everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Whether NO_COLOR (https://no-color.org) asks for no colour: set to
/// anything but the empty string.
fn no_color(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty())
}

/// Whether stdout gets colour: a terminal, and no NO_COLOR.
pub fn color() -> bool {
    std::io::stdout().is_terminal() && !no_color(std::env::var_os("NO_COLOR").as_deref())
}

/// Whether the logs (on stderr) get colour: a terminal, and no NO_COLOR.
/// journald, log files and pipes get plain text.
pub fn log_color() -> bool {
    std::io::stderr().is_terminal() && !no_color(std::env::var_os("NO_COLOR").as_deref())
}

/// What became of a write to stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Printed {
    Written,
    /// The reader has gone (`netpulse status | head`): stop writing and
    /// end quietly, exit code unchanged, as coreutils and ripgrep do.
    Closed,
}

/// Writes `bytes` to stdout and flushes: the one way the commands print
/// (`print!` panics on a closed pipe). A closed pipe is
/// [`Printed::Closed`], not an error.
pub fn out(bytes: impl AsRef<[u8]>) -> std::io::Result<Printed> {
    let mut stdout = std::io::stdout().lock();
    closed_is_fine(
        stdout
            .write_all(bytes.as_ref())
            .and_then(|()| stdout.flush()),
    )
}

/// `Ok` for a write that went through or hit a closed pipe (EPIPE).
pub fn closed_is_fine(r: std::io::Result<()>) -> std::io::Result<Printed> {
    match r {
        Ok(()) => Ok(Printed::Written),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(Printed::Closed),
        Err(e) => Err(e),
    }
}

/// [`out`] for the commands of `main`: a failed write is said on stderr
/// and becomes exit code 1.
pub fn print(bytes: impl AsRef<[u8]>) -> Result<Printed, u8> {
    out(bytes).map_err(|e| {
        eprintln!("netpulse: writing to stdout: {e}");
        1
    })
}

/// The ANSI colour of a state word.
fn state_color(s: &str) -> Option<&'static str> {
    match s {
        "up" | "ok" | "done" => Some("32"),
        "down" | "failed" => Some("31"),
        "degraded" | "blocked" => Some("33"),
        "unknown" => Some("90"),
        _ => None,
    }
}

/// Columns aligned to their widest cell; `right` columns are
/// right-aligned, `state` (if any) is coloured when `color`.
pub fn table(
    head: &[&str],
    rows: &[Vec<String>],
    right: &[usize],
    state: Option<usize>,
    color: bool,
) -> String {
    let n = head.len();
    let width: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>, bold: bool| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            let last = i + 1 == n;
            let text = match (color, bold, state == Some(i)) {
                (true, true, _) => format!("\x1b[1m{c}\x1b[0m"),
                (true, false, true) => match state_color(c) {
                    Some(code) => format!("\x1b[{code}m{c}\x1b[0m"),
                    None => c.to_string(),
                },
                _ => c.to_string(),
            };
            if right.contains(&i) {
                out.push_str(&" ".repeat(pad));
                out.push_str(&text);
            } else {
                out.push_str(&text);
                if !last {
                    out.push_str(&" ".repeat(pad));
                }
            }
            if !last {
                out.push_str("  ");
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(head.to_vec(), true);
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect(), false));
    }
    out
}

/// Bytes per second, in SI units as the status page shows them.
pub fn rate(bps: Option<f64>) -> String {
    let Some(mut v) = bps else {
        return "-".into();
    };
    let units = ["B/s", "kB/s", "MB/s", "GB/s", "TB/s"];
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} {}", units[i])
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn pct(u: Option<f64>) -> String {
    u.map_or("-".into(), |u| format!("{:.2}%", u * 100.0))
}

/// The rows of `netpulse status` from `/api/v1/services`.
pub fn status_rows(services: &[t::Service]) -> Vec<Vec<String>> {
    services
        .iter()
        .map(|s| {
            let r = s.rates.m1;
            let up = s
                .checks
                .iter()
                .filter(|c| c.state == CheckState::Up)
                .count();
            vec![
                s.name.clone(),
                s.state.as_str().to_string(),
                s.source.clone(),
                rate(r.map(|r| r.rx_bytes_per_second)),
                rate(r.map(|r| r.tx_bytes_per_second)),
                s.counters.ingress.packets.to_string(),
                s.counters.egress.packets.to_string(),
                if s.checks.is_empty() {
                    "-".into()
                } else {
                    format!("{up}/{}", s.checks.len())
                },
                s.latency_seconds
                    .map_or("-".into(), |l| format!("{:.1} ms", l * 1000.0)),
                pct(s.uptime.h24),
                pct(s.uptime.d7),
                s.tcp
                    .as_ref()
                    .and_then(|t| t.handshake_p99_seconds)
                    .map_or("-".into(), ms),
                s.tcp
                    .as_ref()
                    .and_then(|t| t.retransmit_ratio)
                    .map_or("-".into(), |r| format!("{:.2}%", r * 100.0)),
                s.tcp.as_ref().map_or("-".into(), |t| {
                    if t.unavailable
                        .iter()
                        .any(|u| u == "drops" || u == "kernel_drops")
                    {
                        "-".into()
                    } else {
                        t.drops.values().sum::<u64>().to_string()
                    }
                }),
            ]
        })
        .collect()
}

pub const STATUS_HEAD: [&str; 14] = [
    "SERVICE", "STATE", "SOURCE", "RX/s", "TX/s", "RX PKTS", "TX PKTS", "CHECKS", "LATENCY",
    "UP 24h", "UP 7d", "HS p99", "RETX", "DROPS",
];

/// Seconds as milliseconds, to the µs below 10 ms.
fn ms(s: f64) -> String {
    if s < 0.01 {
        format!("{:.3} ms", s * 1000.0)
    } else {
        format!("{:.1} ms", s * 1000.0)
    }
}

/// One row of `netpulse check run --output json`: a check's verdict, run
/// here, without an agent.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckRun {
    pub check: String,
    pub kind: String,
    pub target: String,
    pub state: CheckState,
    pub duration_seconds: Option<f64>,
    pub error: Option<String>,
    pub http_status: Option<u16>,
    pub cert_expiry_timestamp_seconds: Option<u64>,
    /// Seconds per phase; null if it did not run.
    pub phases: Option<std::collections::BTreeMap<String, f64>>,
    /// Why it failed, and the facts behind it (as in `/api/v1/checks`).
    pub explanation: Option<String>,
    pub evidence: Option<crate::api_types::Evidence>,
}

impl CheckRun {
    pub fn from_view(v: &crate::checks::engine::View) -> Self {
        let last = v.status.last.as_ref();
        CheckRun {
            check: v.spec.name.clone(),
            kind: v.spec.kind.as_str().to_string(),
            target: v.spec.target(),
            state: crate::web::api::check_state(v.state),
            duration_seconds: last.map(|l| l.duration.as_secs_f64()),
            error: last.and_then(|l| l.error.clone()),
            http_status: last.and_then(|l| l.http_status),
            cert_expiry_timestamp_seconds: last
                .and_then(|l| l.cert_expiry)
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            phases: last.map(|l| {
                l.phases
                    .iter()
                    .map(|(p, d)| (p.to_string(), d.as_secs_f64()))
                    .collect()
            }),
            explanation: last.and_then(|l| l.explanation.clone()),
            evidence: last.and_then(|l| l.evidence.clone()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot reach the agent at {url}: {why}\nIs `netpulse run` running there? Point the CLI at another agent with --url URL or NETPULSE_URL (default {DEFAULT_URL})."
    )]
    Unreachable { url: String, why: String },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url} did not answer JSON: {why}")]
    Json { url: String, why: String },
    #[error("`{0}` is not a URL: {1}")]
    Url(String, String),
}

/// GETs `path` from the agent at `base`: the body of a 2xx answer.
pub async fn get(base: &str, path: &str) -> Result<bytes::Bytes, StatusError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let uri: Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| StatusError::Url(url.clone(), e.to_string()))?;
    let (status, body) =
        crate::client::request(Method::GET, &uri, &[], None, Duration::from_secs(5))
            .await
            .map_err(|why| StatusError::Unreachable {
                url: url.clone(),
                why,
            })?;
    if !status.is_success() {
        return Err(StatusError::Status {
            url,
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).trim().to_string(),
        });
    }
    Ok(body)
}

/// An answer of the API, as its type ([`crate::api_types`]).
pub fn parse<T: DeserializeOwned>(base: &str, path: &str, body: &[u8]) -> Result<T, StatusError> {
    serde_json::from_slice(body).map_err(|e| StatusError::Json {
        url: format!("{}{path}", base.trim_end_matches('/')),
        why: e.to_string(),
    })
}

/// GETs `path` from the agent at `base`, as the API's type `T`.
pub async fn get_json<T: DeserializeOwned>(base: &str, path: &str) -> Result<T, StatusError> {
    parse(base, path, &get(base, path).await?)
}

/// What `netpulse status` prints of one reading of `/api/v1/services`:
/// the table, or, for `--output json`, the document as the agent sent it
/// (pretty, or one line a reading with `--watch`). Either way the answer
/// must read as [`Services`].
pub async fn status_report(
    base: &str,
    output: Output,
    watch: bool,
    color: bool,
) -> Result<String, StatusError> {
    const PATH: &str = "/api/v1/services";
    let body = get(base, PATH).await?;
    let doc: Services = parse(base, PATH, &body)?;
    Ok(match output {
        Output::Table => status_text(&doc, color),
        Output::Json => {
            // Printed as sent: fields this CLI does not know included.
            let v: serde_json::Value = parse(base, PATH, &body)?;
            let text = if watch {
                serde_json::to_string(&v)
            } else {
                serde_json::to_string_pretty(&v)
            };
            text.unwrap_or_default() + "\n"
        }
    })
}

/// The table `netpulse status` prints, with a summary line.
pub fn status_text(doc: &Services, color: bool) -> String {
    let rows = status_rows(&doc.services);
    let count = |s: &str| rows.iter().filter(|r| r[1] == s).count();
    let host = if doc.host.is_empty() { "?" } else { &doc.host };
    let mut out = format!(
        "{} services on {host}: {} up, {} down, {} degraded or blocked\n\n",
        rows.len(),
        count("up"),
        count("down"),
        count("degraded") + count("blocked"),
    );
    out.push_str(&table(
        &STATUS_HEAD,
        &rows,
        &[3, 4, 5, 6, 8, 9, 10],
        Some(1),
        color,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_colour_only_the_state() {
        let rows = vec![
            vec!["web".into(), "up".into(), "12 B/s".into()],
            vec!["database".into(), "down".into(), "1.5 kB/s".into()],
        ];
        let plain = table(&["NAME", "STATE", "RATE"], &rows, &[2], Some(1), false);
        assert_eq!(
            plain,
            "NAME      STATE      RATE\nweb       up       12 B/s\ndatabase  down   1.5 kB/s\n"
        );
        let coloured = table(&["NAME", "STATE", "RATE"], &rows, &[2], Some(1), true);
        assert!(coloured.contains("\x1b[31mdown\x1b[0m"));
        assert!(coloured.contains("\x1b[32mup\x1b[0m"));
    }

    #[test]
    fn no_color_is_any_non_empty_value() {
        use std::ffi::OsStr;
        assert!(!no_color(None));
        assert!(!no_color(Some(OsStr::new(""))));
        assert!(no_color(Some(OsStr::new("1"))));
        assert!(no_color(Some(OsStr::new("0"))));
    }

    #[test]
    fn a_closed_pipe_is_not_an_error() {
        let epipe = || Err(std::io::Error::from(ErrorKind::BrokenPipe));
        assert_eq!(closed_is_fine(epipe()).ok(), Some(Printed::Closed));
        assert_eq!(closed_is_fine(Ok(())).ok(), Some(Printed::Written));
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(closed_is_fine(Err(full)).is_err());
    }

    #[test]
    fn rates_in_si_units() {
        assert_eq!(rate(None), "-");
        assert_eq!(rate(Some(999.0)), "999 B/s");
        assert_eq!(rate(Some(1500.0)), "1.5 kB/s");
        assert_eq!(rate(Some(2.5e9)), "2.5 GB/s");
    }
}
