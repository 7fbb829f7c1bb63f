//! `netpulse capture start|list|get`: the captures API from the command
//! line. Errors carry the exit code: 2 for what the user must fix, 1
//! otherwise.
//!
//! Everything printed goes through `crate::cli::out`: `print!` panics when
//! the reader has gone (`netpulse capture list | head`).
#![deny(clippy::print_stdout)]

use std::time::Duration;

use clap::Subcommand;

use super::{Output, Printed};
use crate::{
    api_types::{self as t, ErrorBody},
    capture::{Request, file_name},
};

pub type Result = std::result::Result<(), (u8, String)>;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
    /// The agent's address.
    #[arg(
        long,
        global = true,
        env = "NETPULSE_URL",
        default_value = "http://127.0.0.1:9477"
    )]
    url: String,
    /// The API token.
    #[arg(long, global = true, env = "NETPULSE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Start a capture: an interface (default: any), a BPF filter or a
    /// service, and limits (default: 10 seconds).
    Start {
        #[arg(long, short)]
        interface: Option<String>,
        #[arg(long, short, conflicts_with = "service")]
        filter: Option<String>,
        #[arg(long, short)]
        service: Option<String>,
        #[arg(long)]
        seconds: Option<f64>,
        #[arg(long)]
        packets: Option<u64>,
        #[arg(long)]
        bytes: Option<u64>,
        /// Wait for the capture to finish and print its result.
        #[arg(long)]
        wait: bool,
    },
    /// List the captures on disk.
    List {
        /// A table, or the API's JSON document.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// The old spelling of `--output json`.
        #[arg(long, hide = true, conflicts_with = "output")]
        json: bool,
    },
    /// Download a capture file (to stdout unless --file or -O).
    Get {
        id: i64,
        /// The part, for captures that rotated (default: the first left).
        #[arg(long)]
        part: Option<u32>,
        /// Where to write it; `-` for stdout.
        #[arg(long, short, value_name = "FILE", conflicts_with = "remote_name")]
        file: Option<String>,
        /// Write it to the file the agent names it,
        /// `netpulse-ID-PART.pcapng`, in the current directory (as
        /// curl -O does).
        #[arg(short = 'O', long)]
        remote_name: bool,
    },
}

/// Runs a `netpulse capture` command; the exit code.
pub fn run(args: Args) -> u8 {
    let (url, token) = (args.url.as_str(), args.token.as_deref());
    let r = match args.command {
        Command::Start {
            interface,
            filter,
            service,
            seconds,
            packets,
            bytes,
            wait,
        } => start(
            url,
            token,
            &Request {
                interface,
                filter,
                service,
                seconds,
                packets,
                bytes,
            },
            wait,
        ),
        Command::List { output, json } => list(url, if json { Output::Json } else { output }),
        Command::Get {
            id,
            part,
            file,
            remote_name,
        } => {
            if remote_name {
                get_named(url, token, id, part)
            } else {
                get(url, token, id, part, file.as_deref().unwrap_or("-"))
            }
        }
    };
    match r {
        Ok(()) => 0,
        Err((code, msg)) => {
            eprintln!("netpulse capture: {msg}");
            code
        }
    }
}

fn api_error(status: u16, body: &[u8]) -> (u8, String) {
    let msg = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .filter(|e| !e.error.is_empty())
        .map_or_else(|| String::from_utf8_lossy(body).into_owned(), |e| e.error);
    // A request the agent refused as wrong is the user's to fix.
    let code = if (400..500).contains(&status) { 2 } else { 1 };
    (code, format!("HTTP {status}: {msg}"))
}

/// An answer's body as the API's type `T`.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> std::result::Result<T, (u8, String)> {
    serde_json::from_slice(body).map_err(|e| (1, format!("the agent's answer: {e}")))
}

/// Queues a capture; with `wait`, polls its job and prints the result.
pub fn start(url: &str, token: Option<&str>, req: &Request, wait: bool) -> Result {
    let body = serde_json::to_string(req).map_err(|e| (1, e.to_string()))?;
    let a = http(url, "POST", "/api/v1/captures", token, Some(&body)).map_err(|e| (1, e))?;
    if a.status != 202 {
        return Err(api_error(a.status, &a.body));
    }
    let queued: t::Queued = parse(&a.body)?;
    let id = queued.job;
    if id <= 0 {
        return Err((1, "no job id in the answer".to_string()));
    }
    if !wait {
        return print(format!(
            "capture {id} queued: netpulse capture get {id} -O once it is done\n"
        ));
    }
    loop {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let a = http(url, "GET", &format!("/api/v1/jobs/{id}"), token, None).map_err(|e| (1, e))?;
        if a.status != 200 {
            return Err(api_error(a.status, &a.body));
        }
        let j: t::Job = parse(&a.body)?;
        match j.state {
            t::JobState::Done => {
                let r: t::CaptureOutcome = j
                    .result
                    .map(serde_json::from_value)
                    .transpose()
                    .map_err(|e| (1, format!("capture {id}'s result: {e}")))?
                    .unwrap_or_default();
                return print(format!(
                    "capture {id}: {} packets, {} bytes, stopped by {}, parts {:?}\n",
                    r.packets, r.bytes, r.stopped_by, r.parts
                ));
            }
            t::JobState::Failed => {
                let why = j
                    .result
                    .and_then(|r| serde_json::from_value::<ErrorBody>(r).ok())
                    .map_or_else(|| "no reason given".to_string(), |e| e.error);
                return Err((1, format!("capture {id} failed: {why}")));
            }
            _ => {}
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not a failure.
fn print(bytes: impl AsRef<[u8]>) -> Result {
    crate::cli::out(bytes)
        .map(|_: Printed| ())
        .map_err(|e| (1, format!("writing to stdout: {e}")))
}

/// `GET /api/v1/captures`: the body as sent, and as its type.
fn captures(url: &str) -> std::result::Result<(Vec<u8>, t::Captures), (u8, String)> {
    let a = http(url, "GET", "/api/v1/captures", None, None).map_err(|e| (1, e))?;
    if a.status != 200 {
        return Err(api_error(a.status, &a.body));
    }
    let doc = parse(&a.body)?;
    Ok((a.body, doc))
}

pub fn list(url: &str, output: Output) -> Result {
    let (body, doc) = captures(url)?;
    if output == Output::Json {
        // The API's document as sent, pretty.
        let v: serde_json::Value = parse(&body)?;
        return print(format!(
            "{}\n",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        ));
    }
    let rows: Vec<Vec<String>> = doc
        .captures
        .iter()
        .map(|c| {
            // A finished capture's result is its outcome (a failed one's
            // is an error).
            let packets = c
                .result
                .clone()
                .filter(|_| c.state == Some(t::JobState::Done))
                .and_then(|r| serde_json::from_value::<t::CaptureOutcome>(r).ok())
                .map(|o| o.packets);
            vec![
                c.id.to_string(),
                c.state.map_or("-", t::JobState::as_str).to_string(),
                packets.map_or("-".into(), |n| n.to_string()),
                c.bytes.to_string(),
                c.parts.len().to_string(),
                c.plan
                    .as_ref()
                    .map_or("", |p| p.filter.as_str())
                    .to_string(),
            ]
        })
        .collect();
    print(crate::cli::table(
        &["ID", "STATE", "PACKETS", "BYTES ON DISK", "PARTS", "FILTER"],
        &rows,
        &[0, 2, 3, 4],
        Some(1),
        crate::cli::color(),
    ))
}

/// Downloads a capture file to `out` (`-`: stdout).
pub fn get(url: &str, token: Option<&str>, id: i64, part: Option<u32>, out: &str) -> Result {
    let path = match part {
        Some(p) => format!("/api/v1/captures/{id}/file?part={p}"),
        None => format!("/api/v1/captures/{id}/file"),
    };
    let a = http(url, "GET", &path, token, None).map_err(|e| (1, e))?;
    if a.status != 200 {
        return Err(api_error(a.status, &a.body));
    }
    if out == "-" {
        print(&a.body)
    } else {
        std::fs::write(out, &a.body).map_err(|e| (1, format!("writing {out}: {e}")))?;
        eprintln!("{out}: {} bytes", a.body.len());
        Ok(())
    }
}

/// `get -O`: to `netpulse-ID-PART.pcapng`, the name the agent gives the
/// file (Content-Disposition). Without `part`, the first part left,
/// looked up first so that the name and the bytes agree.
pub fn get_named(url: &str, token: Option<&str>, id: i64, part: Option<u32>) -> Result {
    let part = match part {
        Some(p) => p,
        None => captures(url)?
            .1
            .captures
            .iter()
            .find(|c| c.id == id)
            .and_then(|c| c.parts.first())
            .map(|p| p.part)
            .ok_or((2, format!("no capture {id}")))?,
    };
    let name = format!("netpulse-{}", file_name(id, part));
    get(url, token, id, Some(part), &name)
}

/// A response: status and body.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One request to the agent at `base` (`http://host:port`, or https),
/// through the agent's HTTP client.
pub fn http(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::result::Result<Answer, String> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let uri: hyper::Uri = url.parse().map_err(|e| format!("`{url}`: {e}"))?;
    let method = hyper::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let headers: Vec<(hyper::header::HeaderName, String)> = token
        .map(|t| (hyper::header::AUTHORIZATION, format!("Bearer {t}")))
        .into_iter()
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (status, body) = rt.block_on(crate::client::request(
        method,
        &uri,
        &headers,
        body.map(|b| ("application/json", bytes::Bytes::from(b.to_string()))),
        Duration::from_secs(120),
    ))?;
    Ok(Answer {
        status: status.as_u16(),
        body: body.to_vec(),
    })
}
