//! Reading a running agent over HTTP, and the Prometheus text it serves.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// GET `path` from `addr`; returns (status, body). Plain HTTP/1.1, one request.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    request(addr, "GET", path, &[])
}

/// One HTTP/1.1 request without a body: (status, body).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    send(addr, method, path, headers, "")
}

/// One HTTP/1.1 request with `body`: (status, body).
pub fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // Up to Content-Length when there is one (some servers, chromedriver
    // among them, keep the connection open after `Connection: close`),
    // else to the end.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            if len.is_some_and(|len| body.len() >= len) {
                break;
            }
        }
    }
    let raw = String::from_utf8_lossy(&raw);
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// One sample: its labels and value.
pub type Sample = (BTreeMap<String, String>, f64);

/// Samples of one exposition: `name` → samples.
#[derive(Debug, Default)]
pub struct Metrics(pub BTreeMap<String, Vec<Sample>>);

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut m: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut lm = BTreeMap::new();
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                if let Some((k, v)) = pair.split_once("=\"") {
                    lm.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
            }
            m.entry(name.to_string()).or_default().push((lm, value));
        }
        Metrics(m)
    }

    /// A service's packets in one direction.
    pub fn packets(&self, service: &str, direction: &str) -> u64 {
        self.sum(
            "netpulse_service_packets_total",
            &[("service", service), ("direction", direction)],
        )
    }

    /// A service's bytes in one direction.
    pub fn bytes(&self, service: &str, direction: &str) -> u64 {
        self.sum(
            "netpulse_service_bytes_total",
            &[("service", service), ("direction", direction)],
        )
    }

    /// Sum of the samples of `name` whose labels include all of `want`.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> u64 {
        self.0
            .get(name)
            .map(|v| {
                v.iter()
                    .filter(|(l, _)| {
                        want.iter()
                            .all(|(k, x)| l.get(*k).map(String::as_str) == Some(*x))
                    })
                    .map(|(_, v)| *v as u64)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The value of the first sample of `name` whose labels include all of
    /// `want`, as exposed (not rounded).
    pub fn value(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        self.0.get(name)?.iter().find_map(|(l, v)| {
            want.iter()
                .all(|(k, x)| l.get(*k).map(String::as_str) == Some(*x))
                .then_some(*v)
        })
    }

    pub fn has(&self, name: &str, want: &[(&str, &str)]) -> bool {
        self.0.get(name).is_some_and(|v| {
            v.iter().any(|(l, _)| {
                want.iter()
                    .all(|(k, x)| l.get(*k).map(String::as_str) == Some(*x))
            })
        })
    }

    /// Every value of label `label` on series of `name`.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .0
            .get(name)
            .map(|v| {
                v.iter()
                    .filter_map(|(l, _)| l.get(label).cloned())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out.dedup();
        out
    }
}

/// Percent-encodes a query-string value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
