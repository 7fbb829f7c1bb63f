//! `GET /probe?target=…&module=…`, the way blackbox_exporter answers it, so
//! a Prometheus scrape config written for blackbox_exporter can point at
//! netpulse unchanged.
//!
//! Modules: blackbox_exporter's stock `http_2xx`, `http_post_2xx`,
//! `tcp_connect` and `icmp`, and every `[[check]]` by name (its settings,
//! the target replaced). The answer is blackbox_exporter's metric names:
//! `probe_success`, `probe_duration_seconds`,
//! `probe_dns_lookup_time_seconds`, and for HTTP
//! `probe_http_status_code`, `probe_http_duration_seconds{phase}` (resolve,
//! connect, tls, processing, transfer), `probe_http_redirects`,
//! `probe_http_ssl`, `probe_http_content_length`... as far as netpulse
//! measures them, and `probe_ssl_earliest_cert_expiry` for HTTPS.

use std::time::Duration;

use prometheus::proto::{MetricFamily, MetricType};

use super::{Kind, Outcome, Spec};
use crate::metrics;

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

/// blackbox_exporter's stock modules (its example blackbox.yml).
fn stock(name: &str) -> Result<Spec, String> {
    let http = |method: hyper::Method| -> Result<Kind, String> {
        Ok(Kind::Http(super::HttpSpec {
            url: hyper::Uri::from_static("http://localhost/"),
            method,
            headers: Default::default(),
            expect_status: vec![200..=299],
            body_contains: None,
            body_regex: None,
            max_latency: None,
            max_redirects: 10,
            cert_min_valid: None,
            tls: super::kinds::tls_config(None)?,
            ca_file: None,
        }))
    };
    let kind = match name {
        "http_2xx" => http(hyper::Method::GET)?,
        "http_post_2xx" => http(hyper::Method::POST)?,
        "tcp_connect" => Kind::Tcp(super::TcpSpec {
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
    let mut spec = Spec::new(
        name.to_string(),
        kind,
        Duration::from_secs(60),
        Duration::from_secs(5),
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

/// The exposition blackbox_exporter would give for this run.
pub fn render(spec: &Spec, o: &Outcome) -> String {
    let phase = |p: &str| {
        o.phases
            .iter()
            .filter(|(n, _)| *n == p)
            .map(|(_, d)| d.as_secs_f64())
            .fold(0.0, |a, b| a + b)
    };
    let mut out = vec![
        gauge(
            "probe_dns_lookup_time_seconds",
            "Returns the time taken for probe dns lookup in seconds",
            &[(&[], phase("dns"))],
        ),
        gauge(
            "probe_duration_seconds",
            "Returns how long the probe took to complete in seconds",
            &[(&[], o.duration.as_secs_f64())],
        ),
    ];
    if let Kind::Http(h) = &spec.kind {
        let https = o.cert_expiry.is_some() || h.url.scheme_str() == Some("https");
        out.push(gauge(
            "probe_http_duration_seconds",
            "Duration of http request by phase, summed over all redirects",
            &[
                (&[("phase", "connect")], phase("connect")),
                (&[("phase", "processing")], phase("first_byte")),
                (&[("phase", "resolve")], phase("dns")),
                (&[("phase", "tls")], phase("tls")),
                (&[("phase", "transfer")], phase("transfer")),
            ],
        ));
        out.push(gauge(
            "probe_http_ssl",
            "Indicates if SSL was used for the final redirect",
            &[(&[], f64::from(u8::from(https)))],
        ));
        out.push(gauge(
            "probe_http_status_code",
            "Response HTTP status code",
            &[(&[], f64::from(o.http_status.unwrap_or(0)))],
        ));
        if let Some(t) = o.cert_expiry {
            out.push(gauge(
                "probe_ssl_earliest_cert_expiry",
                "Returns last SSL chain expiry in unixtime",
                &[(&[], metrics::epoch(t))],
            ));
        }
    }
    out.push(gauge(
        "probe_success",
        "Displays whether or not the probe was a success",
        &[(&[], f64::from(u8::from(o.ok)))],
    ));
    metrics::encode(&out).unwrap_or_default()
}
