//! `GET /probe?target=…&module=…`, the way blackbox_exporter answers it, so
//! a Prometheus scrape config written for blackbox_exporter can point at
//! netpulse unchanged.
//!
//! Modules: blackbox_exporter's stock `http_2xx`, `http_post_2xx`,
//! `tcp_connect` and `icmp`, and every `[[check]]` by name (its settings,
//! the target replaced). The answer is blackbox_exporter's (0.23, Debian's):
//! the same metric names and label sets, and the same values but for
//! durations; see [`render`]. tests/tests/blackbox.rs holds it to Debian's
//! prometheus-blackbox-exporter, both ways.

use std::{net::IpAddr, time::Duration};

use prometheus::proto::{MetricFamily, MetricType};

use crate::{
    checks::{self, Kind, Outcome, Spec},
    metrics,
};

/// The module `name` applied to `target`, or why not.
pub fn module(name: &str, target: &str, checks: &[Spec]) -> Result<Spec, String> {
    let mut spec = match checks.iter().find(|c| c.name == name) {
        Some(c) => c.clone(),
        None => stock(name)?,
    };
    spec.kind = match spec.kind {
        Kind::Http(mut h) => {
            let url = if target.contains("://") {
                target.to_string()
            } else {
                format!("http://{target}")
            };
            h.url = url
                .parse::<hyper::Uri>()
                .ok()
                .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
                .ok_or_else(|| format!("target `{target}` is not a URL"))?;
            Kind::Http(h)
        }
        Kind::Tcp(mut t) => {
            let (host, port) = target
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .ok_or_else(|| format!("target `{target}` is not host:port"))?;
            t.host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            t.port = port;
            Kind::Tcp(t)
        }
        Kind::Dns(mut d) => {
            d.server = Some(
                target
                    .parse()
                    .or_else(|_| target.parse().map(|ip| std::net::SocketAddr::new(ip, 53)))
                    .map_err(|_| format!("target `{target}` is not a DNS server address"))?,
            );
            Kind::Dns(d)
        }
        Kind::Icmp { .. } => Kind::Icmp {
            host: target.to_string(),
        },
    };
    Ok(spec)
}

/// blackbox_exporter's stock modules (Debian's /etc/prometheus/blackbox.yml).
fn stock(name: &str) -> Result<Spec, String> {
    let http = |method: hyper::Method| -> Result<Kind, String> {
        Ok(Kind::Http(checks::HttpSpec {
            url: hyper::Uri::from_static("http://localhost/"),
            method,
            headers: Default::default(),
            expect_status: vec![200..=299],
            body_contains: None,
            body_regex: None,
            max_latency: None,
            max_redirects: 10,
            cert_min_valid: None,
            tls: checks::kinds::tls_config(None)?,
            ca_file: None,
        }))
    };
    let kind = match name {
        "http_2xx" => http(hyper::Method::GET)?,
        "http_post_2xx" => http(hyper::Method::POST)?,
        "tcp_connect" => Kind::Tcp(checks::TcpSpec {
            host: String::new(),
            port: 0,
            send: None,
            expect: None,
        }),
        "icmp" => Kind::Icmp {
            host: String::new(),
        },
        other => return Err(format!("Unknown module \"{other}\"")),
    };
    // No timeout of their own, as in blackbox_exporter: the scrape's
    // (X-Prometheus-Scrape-Timeout-Seconds) less 0.5 s, 119.5 s without.
    let mut spec = Spec::new(
        name.to_string(),
        kind,
        Duration::from_secs(120),
        Duration::from_secs_f64(119.5),
    );
    spec.jitter = Duration::ZERO;
    Ok(spec)
}

/// One gauge family of a single series per label set.
fn gauge(name: &str, help: &str, samples: &[(&[(&str, &str)], f64)]) -> MetricFamily {
    let mut mf = metrics::family(name, help, MetricType::GAUGE);
    for (labels, v) in samples {
        metrics::gauge_sample(&mut mf, labels, *v);
    }
    mf
}

/// blackbox_exporter's probe_ip_addr_hash: FNV-1a (32 bits) of the
/// address's bytes (4 for IPv4, 16 for IPv6).
fn ip_hash(ip: IpAddr) -> f64 {
    let bytes = match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a
            .to_ipv4_mapped()
            .map_or(a.octets().to_vec(), |v4| v4.octets().to_vec()),
    };
    let h = bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    });
    f64::from(h)
}

/// The exposition blackbox_exporter (0.23, as Debian ships it) would give
/// for this run: the same names, label sets and, but for durations, the
/// same values. Per prober:
///
/// - all: `probe_success`, `probe_duration_seconds`, and for HTTP, TCP
///   and ICMP the address's `probe_dns_lookup_time_seconds`,
///   `probe_ip_protocol` (4, 6; 0 unresolved), `probe_ip_addr_hash`;
/// - HTTP: `probe_http_duration_seconds{phase}` (only `resolve` when the
///   name did not resolve), `probe_http_status_code`,
///   `probe_http_version`, `probe_http_ssl`, `probe_http_content_length`,
///   `probe_http_uncompressed_body_length`, `probe_http_redirects`,
///   `probe_failed_due_to_regex` (body_contains / body_regex), and
///   `probe_http_last_modified_timestamp_seconds` when the answer has a
///   Last-Modified; when the final answer came over TLS,
///   `probe_ssl_earliest_cert_expiry`,
///   `probe_ssl_last_chain_expiry_timestamp_seconds`,
///   `probe_ssl_last_chain_info{fingerprint_sha256,subject,issuer,subjectalternative}`
///   and `probe_tls_version_info{version}`;
/// - TCP: `probe_failed_due_to_regex` (expect);
/// - ICMP: `probe_icmp_duration_seconds{phase}` (resolve, setup, rtt) and
///   `probe_icmp_reply_hop_limit` once a reply came.
pub fn render(spec: &Spec, o: &Outcome) -> String {
    let seen = &o.seen;
    let phase = |p: &str| {
        o.phases
            .iter()
            .filter(|(n, _)| *n == p)
            .map(|(_, d)| d.as_secs_f64())
            .fold(0.0, |a, b| a + b)
    };
    let flag = |b: bool| f64::from(u8::from(b));
    let mut out = vec![gauge(
        "probe_duration_seconds",
        "Returns how long the probe took to complete in seconds",
        &[(&[], o.duration.as_secs_f64())],
    )];
    let resolve = seen.resolve.as_secs_f64();
    if !matches!(spec.kind, Kind::Dns(_)) {
        out.push(gauge(
            "probe_ip_protocol",
            "Specifies whether probe ip protocol is IP4 or IP6",
            &[(
                &[],
                match seen.ip {
                    Some(IpAddr::V4(_)) => 4.0,
                    Some(IpAddr::V6(_)) => 6.0,
                    None => 0.0,
                },
            )],
        ));
        out.push(gauge(
            "probe_ip_addr_hash",
            "Specifies the hash of IP address. It's useful to detect if the IP address changes.",
            &[(&[], seen.ip.map_or(0.0, ip_hash))],
        ));
    }
    out.push(gauge(
        "probe_dns_lookup_time_seconds",
        "Returns the time taken for probe dns lookup in seconds",
        &[(&[], resolve)],
    ));
    match &spec.kind {
        Kind::Http(_) => {
            let http = seen.http.clone().unwrap_or_default();
            let phases: &[(&[(&str, &str)], f64)] = if seen.ip.is_some() {
                &[
                    (&[("phase", "connect")], phase("connect")),
                    (&[("phase", "processing")], phase("first_byte")),
                    (
                        &[("phase", "resolve")],
                        if o.phases.is_empty() {
                            resolve
                        } else {
                            phase("dns")
                        },
                    ),
                    (&[("phase", "tls")], phase("tls")),
                    (&[("phase", "transfer")], phase("transfer")),
                ]
            } else {
                &[(&[("phase", "resolve")], resolve)]
            };
            out.push(gauge(
                "probe_http_duration_seconds",
                "Duration of http request by phase, summed over all redirects",
                phases,
            ));
            out.push(gauge(
                "probe_http_content_length",
                "Length of http content response",
                &[(&[], http.content_length as f64)],
            ));
            out.push(gauge(
                "probe_http_uncompressed_body_length",
                "Length of uncompressed response body",
                &[(&[], http.body_length as f64)],
            ));
            out.push(gauge(
                "probe_http_redirects",
                "The number of redirects",
                &[(&[], f64::from(seen.redirects))],
            ));
            out.push(gauge(
                "probe_http_ssl",
                "Indicates if SSL was used for the final redirect",
                &[(&[], flag(seen.tls.is_some()))],
            ));
            out.push(gauge(
                "probe_http_status_code",
                "Response HTTP status code",
                &[(&[], f64::from(o.http_status.unwrap_or(0)))],
            ));
            out.push(gauge(
                "probe_http_version",
                "Returns the version of HTTP of the probe response",
                &[(&[], http.version)],
            ));
            out.push(gauge(
                "probe_failed_due_to_regex",
                "Indicates if probe failed due to regex",
                &[(&[], flag(seen.failed_on_content))],
            ));
            if let Some(t) = http.last_modified {
                out.push(gauge(
                    "probe_http_last_modified_timestamp_seconds",
                    "Returns the Last-Modified HTTP response header in unixtime",
                    &[(&[], t as f64)],
                ));
            }
            if let Some(tls) = &seen.tls {
                out.push(gauge(
                    "probe_ssl_earliest_cert_expiry",
                    "Returns last SSL chain expiry in unixtime",
                    &[(&[], tls.earliest_expiry as f64)],
                ));
                out.push(gauge(
                    "probe_ssl_last_chain_expiry_timestamp_seconds",
                    "Returns last SSL chain expiry in timestamp",
                    &[(&[], tls.chain_expiry as f64)],
                ));
                out.push(gauge(
                    "probe_ssl_last_chain_info",
                    "Contains SSL leaf certificate information",
                    &[(
                        &[
                            ("fingerprint_sha256", tls.fingerprint_sha256.as_str()),
                            ("subject", tls.subject.as_str()),
                            ("issuer", tls.issuer.as_str()),
                            ("subjectalternative", tls.dns_names.as_str()),
                        ],
                        1.0,
                    )],
                ));
                out.push(gauge(
                    "probe_tls_version_info",
                    "Returns the TLS version used or NaN when unknown",
                    &[(&[("version", tls.version)], 1.0)],
                ));
            }
        }
        Kind::Tcp(_) => out.push(gauge(
            "probe_failed_due_to_regex",
            "Indicates if probe failed due to regex",
            &[(&[], flag(seen.failed_on_content))],
        )),
        Kind::Icmp { .. } => {
            out.push(gauge(
                "probe_icmp_duration_seconds",
                "Duration of icmp request by phase",
                &[
                    (&[("phase", "resolve")], resolve),
                    (&[("phase", "rtt")], seen.icmp_rtt.as_secs_f64()),
                    (&[("phase", "setup")], seen.icmp_setup.as_secs_f64()),
                ],
            ));
            if let Some(h) = seen.hop_limit {
                out.push(gauge(
                    "probe_icmp_reply_hop_limit",
                    "Replied packet hop limit (TTL for ipv4)",
                    &[(&[], f64::from(h))],
                ));
            }
        }
        Kind::Dns(_) => {}
    }
    out.push(gauge(
        "probe_success",
        "Displays whether or not the probe was a success",
        &[(&[], flag(o.ok))],
    ));
    out.sort_by(|a, b| a.name().cmp(b.name()));
    metrics::encode(&out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_hash_is_blackbox_exporters() {
        // What blackbox_exporter 0.23 gives for 127.0.0.1.
        assert_eq!(ip_hash("127.0.0.1".parse().unwrap()), 3_668_918_509.0);
        assert_eq!(
            ip_hash("::ffff:127.0.0.1".parse().unwrap()),
            ip_hash("127.0.0.1".parse().unwrap())
        );
        assert_ne!(
            ip_hash("::1".parse().unwrap()),
            ip_hash("127.0.0.1".parse().unwrap())
        );
    }
}
