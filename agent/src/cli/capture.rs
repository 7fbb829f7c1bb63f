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
use crate::capture::{Request, file_name};

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
    let msg = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    // A request the agent refused as wrong is the user's to fix.
    let code = if (400..500).contains(&status) { 2 } else { 1 };
    (code, format!("HTTP {status}: {msg}"))
}

/// Queues a capture; with `wait`, polls its job and prints the result.
pub fn start(url: &str, token: Option<&str>, req: &Request, wait: bool) -> Result {
    let body = serde_json::to_string(req).map_err(|e| (1, e.to_string()))?;
    let a = http(url, "POST", "/api/v1/captures", token, Some(&body)).map_err(|e| (1, e))?;
    if a.status != 202 {
        return Err(api_error(a.status, &a.body));
    }
    let v: serde_json::Value = serde_json::from_slice(&a.body).map_err(|e| (1, e.to_string()))?;
    let id = v["job"]
        .as_i64()
        .ok_or((1, "no job id in the answer".to_string()))?;
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
        let j: serde_json::Value =
            serde_json::from_slice(&a.body).map_err(|e| (1, e.to_string()))?;
        match j["state"].as_str() {
            Some("done") => {
                let r = &j["result"];
                return print(format!(
                    "capture {id}: {} packets, {} bytes, stopped by {}, parts {}\n",
                    r["packets"], r["bytes"], r["stopped_by"], r["parts"]
                ));
            }
            Some("failed") => {
                return Err((1, format!("capture {id} failed: {}", j["result"]["error"])));
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

/// `GET /api/v1/captures`, parsed.
fn captures(url: &str) -> std::result::Result<serde_json::Value, (u8, String)> {
    let a = http(url, "GET", "/api/v1/captures", None, None).map_err(|e| (1, e))?;
    if a.status != 200 {
        return Err(api_error(a.status, &a.body));
    }
    serde_json::from_slice(&a.body).map_err(|e| (1, e.to_string()))
}

pub fn list(url: &str, output: Output) -> Result {
    let v = captures(url)?;
    if output == Output::Json {
        return print(format!(
            "{}\n",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        ));
    }
    let rows: Vec<Vec<String>> = v["captures"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            vec![
                c["id"].to_string(),
                c["state"].as_str().unwrap_or("-").to_string(),
                c["result"]["packets"]
                    .as_u64()
                    .map_or("-".into(), |n| n.to_string()),
                c["bytes"].to_string(),
                c["parts"].as_array().map_or(0, Vec::len).to_string(),
                c["plan"]["filter"].as_str().unwrap_or("").to_string(),
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
        None => captures(url)?["captures"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["id"].as_i64() == Some(id))
            .and_then(|c| c["parts"][0]["part"].as_u64())
            .and_then(|p| u32::try_from(p).ok())
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
