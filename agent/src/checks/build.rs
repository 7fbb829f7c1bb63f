//! `[[check]]` tables into [`Spec`]s: URLs parsed, regexes compiled, TLS
//! client configs built, schedules checked against their ranges. Problems
//! go to the config's [`Diagnostics`], with their places.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    ops::Range,
    time::Duration,
};

use toml::Spanned;

use super::{DnsSpec, HttpSpec, Kind, Spec, TcpSpec};
use crate::config::{CheckConfig, CheckKind, Choice, Diagnostics, DnsType, HttpMethod, Word};

/// The checks of the `[[check]]` tables: names unique, dependencies known
/// and acyclic, each check valid; problems go to `d`.
pub fn from_config(raw: &[CheckConfig], d: &mut Diagnostics) -> Vec<Spec> {
    let mut names: BTreeMap<String, Range<usize>> = BTreeMap::new();
    for c in raw {
        let name = c.name.get_ref();
        if let Some(msg) = crate::config::bad_name(name) {
            d.at(c.name.span(), msg.replace("service name", "check name"));
        } else if let Some(first) = names.get(name) {
            let (l, col) = d.line_col(first.start);
            d.at(
                c.name.span(),
                format!("duplicate check `{name}` (first defined at line {l}, column {col})"),
            );
        } else {
            names.insert(name.clone(), c.name.span());
        }
    }
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for c in raw {
        let name = c.name.get_ref().clone();
        for dep in &c.depends_on {
            if !names.contains_key(dep.get_ref()) {
                d.at(
                    dep.span(),
                    format!(
                        "check `{name}` depends on `{}`, which is not a check",
                        dep.get_ref()
                    ),
                );
            }
        }
        deps.insert(
            name,
            c.depends_on.iter().map(|d| d.get_ref().clone()).collect(),
        );
        if let Some(spec) = Spec::from_config(c, d) {
            out.push(spec);
        }
    }
    if let Some(cycle) = super::find_cycle(&deps)
        && let Some(first) = raw.iter().find(|c| c.name.get_ref() == &cycle[0])
    {
        d.at(
            first.name.span(),
            format!(
                "checks depend on each other in a cycle: {}",
                cycle.join(" -> ")
            ),
        );
    }
    out
}

/// Seconds within `lo..=hi`, else `default` and a problem.
fn secs(
    v: &Option<Spanned<f64>>,
    what: &str,
    default: f64,
    lo: f64,
    hi: f64,
    d: &mut Diagnostics,
) -> Duration {
    let Some(v) = v else {
        return Duration::from_secs_f64(default);
    };
    let x = *v.get_ref();
    if !(x.is_finite() && (lo..=hi).contains(&x)) {
        d.at(v.span(), format!("{what} = {x} is out of range {lo}-{hi}"));
        return Duration::from_secs_f64(default);
    }
    Duration::from_secs_f64(x)
}

/// A count within `lo..=hi`, else `default` and a problem.
fn count(
    v: &Option<Spanned<i64>>,
    what: &str,
    default: u32,
    lo: i64,
    hi: i64,
    d: &mut Diagnostics,
) -> u32 {
    let Some(v) = v else { return default };
    let x = *v.get_ref();
    if !(lo..=hi).contains(&x) {
        d.at(v.span(), format!("{what} = {x} is out of range {lo}-{hi}"));
        return default;
    }
    x as u32
}

impl From<HttpMethod> for hyper::Method {
    fn from(m: HttpMethod) -> Self {
        match m {
            HttpMethod::Get => hyper::Method::GET,
            HttpMethod::Head => hyper::Method::HEAD,
            HttpMethod::Post => hyper::Method::POST,
            HttpMethod::Put => hyper::Method::PUT,
            HttpMethod::Delete => hyper::Method::DELETE,
            HttpMethod::Patch => hyper::Method::PATCH,
            HttpMethod::Options => hyper::Method::OPTIONS,
            HttpMethod::Trace => hyper::Method::TRACE,
            HttpMethod::Connect => hyper::Method::CONNECT,
        }
    }
}

impl From<DnsType> for hickory_proto::rr::RecordType {
    fn from(t: DnsType) -> Self {
        use hickory_proto::rr::RecordType as R;
        match t {
            DnsType::A => R::A,
            DnsType::Aaaa => R::AAAA,
            DnsType::Caa => R::CAA,
            DnsType::Cname => R::CNAME,
            DnsType::Dnskey => R::DNSKEY,
            DnsType::Ds => R::DS,
            DnsType::Https => R::HTTPS,
            DnsType::Mx => R::MX,
            DnsType::Naptr => R::NAPTR,
            DnsType::Ns => R::NS,
            DnsType::Ptr => R::PTR,
            DnsType::Soa => R::SOA,
            DnsType::Srv => R::SRV,
            DnsType::Sshfp => R::SSHFP,
            DnsType::Svcb => R::SVCB,
            DnsType::Tlsa => R::TLSA,
            DnsType::Txt => R::TXT,
        }
    }
}

impl Spec {
    /// One `[[check]]` table (its dependencies are checked by
    /// [`from_config`]); None if it has a problem, which goes to `d`.
    pub fn from_config(c: &CheckConfig, d: &mut Diagnostics) -> Option<Spec> {
        let name = c.name.get_ref().clone();
        let kind_name = c.kind.get_ref().word();
        // Keys that belong to one kind only.
        let only: [(&str, bool, &[CheckKind]); 12] = [
            ("method", c.method.is_some(), &[CheckKind::Http]),
            ("headers", !c.headers.is_empty(), &[CheckKind::Http]),
            (
                "expect_status",
                !c.expect_status.is_empty(),
                &[CheckKind::Http],
            ),
            (
                "body_contains",
                c.body_contains.is_some(),
                &[CheckKind::Http],
            ),
            ("body_regex", c.body_regex.is_some(), &[CheckKind::Http]),
            (
                "max_latency_seconds",
                c.max_latency_seconds.is_some(),
                &[CheckKind::Http],
            ),
            (
                "max_redirects",
                c.max_redirects.is_some(),
                &[CheckKind::Http],
            ),
            ("tls_ca_file", c.tls_ca_file.is_some(), &[CheckKind::Http]),
            (
                "cert_min_valid_days",
                c.cert_min_valid_days.is_some(),
                &[CheckKind::Http],
            ),
            ("send", c.send.is_some(), &[CheckKind::Tcp]),
            (
                "expect",
                c.expect.is_some(),
                &[CheckKind::Tcp, CheckKind::Dns],
            ),
            (
                "query_type",
                c.query_type.is_some() || c.server.is_some(),
                &[CheckKind::Dns],
            ),
        ];
        for (key, set, kinds) in only {
            let applies = c.kind.get_ref().known().is_some_and(|k| kinds.contains(&k));
            if set && !applies {
                let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                d.at(
                    c.kind.span(),
                    format!(
                        "check `{name}`: `{key}` applies to kind {}, not {kind_name}",
                        kinds.join(" and ")
                    ),
                );
            }
        }
        let kind = match c.kind.get_ref() {
            Choice::Known(CheckKind::Http) => http(c, d).map(Kind::Http),
            Choice::Known(CheckKind::Tcp) => tcp(c, d).map(Kind::Tcp),
            Choice::Known(CheckKind::Dns) => dns(c, d).map(Kind::Dns),
            Choice::Known(CheckKind::Icmp) => {
                let target = c.target.get_ref();
                if target.is_empty() {
                    d.at(c.target.span(), format!("check `{name}`: an empty host"));
                }
                Some(Kind::Icmp {
                    host: target.clone(),
                })
            }
            Choice::Unknown(other) => {
                d.at(
                    c.kind.span(),
                    format!(
                        "check `{name}`: kind `{other}` is not one of {}",
                        CheckKind::list(", ")
                    ),
                );
                None
            }
        };
        let interval = secs(
            &c.interval_seconds,
            "interval_seconds",
            30.0,
            0.05,
            86400.0,
            d,
        );
        let timeout = secs(
            &c.timeout_seconds,
            "timeout_seconds",
            10.0_f64.min(interval.as_secs_f64()),
            0.01,
            3600.0,
            d,
        );
        if timeout > interval {
            let span = c
                .timeout_seconds
                .as_ref()
                .map_or(c.name.span(), |t| t.span());
            d.at(
                span,
                format!(
                    "check `{name}`: timeout_seconds {} exceeds interval_seconds {}",
                    timeout.as_secs_f64(),
                    interval.as_secs_f64()
                ),
            );
        }
        let kind = kind?;
        Some(Spec {
            name,
            kind,
            service: c.service.as_ref().map(|s| s.get_ref().clone()),
            interval,
            timeout,
            jitter: secs(
                &c.jitter_seconds,
                "jitter_seconds",
                interval.as_secs_f64().min(86400.0) / 10.0,
                0.0,
                86400.0,
                d,
            ),
            retries: count(&c.retries, "retries", 0, 0, 10, d),
            retry_backoff: secs(
                &c.retry_backoff_seconds,
                "retry_backoff_seconds",
                1.0,
                0.0,
                600.0,
                d,
            ),
            failure_threshold: count(&c.failure_threshold, "failure_threshold", 1, 1, 100, d),
            success_threshold: count(&c.success_threshold, "success_threshold", 1, 1, 100, d),
            depends_on: c.depends_on.iter().map(|d| d.get_ref().clone()).collect(),
            run_when_blocked: c.run_when_blocked,
            tags: c.tags.iter().map(|t| t.get_ref().clone()).collect(),
            actions: super::actions::from_config(c, d),
        })
    }
}

fn http(c: &CheckConfig, d: &mut Diagnostics) -> Option<HttpSpec> {
    let (name, target) = (c.name.get_ref(), c.target.get_ref());
    let url: Option<hyper::Uri> = match target.parse::<hyper::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => Some(u),
        _ => {
            d.at(
                c.target.span(),
                format!("check `{name}`: `{target}` is not an http:// or https:// URL"),
            );
            None
        }
    };
    let method = match &c.method {
        None => Some(hyper::Method::GET),
        Some(m) => match m.get_ref() {
            Choice::Known(k) => Some(hyper::Method::from(*k)),
            Choice::Unknown(w) => {
                d.at(
                    m.span(),
                    format!(
                        "`{w}` is not an HTTP method (one of {})",
                        HttpMethod::list(", ")
                    ),
                );
                None
            }
        },
    };
    let mut expect_status = Vec::new();
    for v in &c.expect_status {
        let range = match v.get_ref() {
            toml::Value::Integer(i) => u16::try_from(*i).ok().map(|i| i..=i),
            toml::Value::String(s) => s.split_once('-').and_then(|(a, b)| {
                Some(a.trim().parse::<u16>().ok()?..=b.trim().parse::<u16>().ok()?)
            }),
            _ => None,
        };
        match range {
            Some(r) if *r.start() >= 100 && *r.end() <= 599 && r.start() <= r.end() => {
                expect_status.push(r)
            }
            _ => d.at(
                v.span(),
                "expect_status takes codes (200) and ranges (\"200-299\") within 100-599",
            ),
        }
    }
    if expect_status.is_empty() {
        expect_status.push(200..=299);
    }
    let body_regex = c.body_regex.as_ref().and_then(|r| {
        regex::Regex::new(r.get_ref())
            .map_err(|e| d.at(r.span(), format!("body_regex: {e}")))
            .ok()
    });
    let ca_file = c.tls_ca_file.as_ref().map(|p| p.get_ref().clone());
    let tls = match super::kinds::tls_config(ca_file.as_deref()) {
        Ok(t) => Some(t),
        Err(e) => {
            let span = c.tls_ca_file.as_ref().map_or(c.kind.span(), |p| p.span());
            d.at(span, format!("tls_ca_file: {e}"));
            None
        }
    };
    let max_latency = c.max_latency_seconds.as_ref().map(|_| {
        secs(
            &c.max_latency_seconds,
            "max_latency_seconds",
            1.0,
            0.0,
            3600.0,
            d,
        )
    });
    let cert_min_valid = c.cert_min_valid_days.as_ref().map(|_| {
        secs(
            &c.cert_min_valid_days,
            "cert_min_valid_days",
            0.0,
            0.0,
            3650.0,
            d,
        ) * 86400
    });
    match (url, method, tls) {
        (Some(url), Some(method), Some(tls)) => Some(HttpSpec {
            url,
            method,
            headers: c.headers.clone(),
            expect_status,
            body_contains: c.body_contains.as_ref().map(|s| s.get_ref().clone()),
            body_regex,
            max_latency,
            max_redirects: count(&c.max_redirects, "max_redirects", 5, 0, 20, d),
            cert_min_valid,
            tls,
            ca_file,
        }),
        _ => None,
    }
}

fn tcp(c: &CheckConfig, d: &mut Diagnostics) -> Option<TcpSpec> {
    let (name, target) = (c.name.get_ref(), c.target.get_ref());
    match target
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
    {
        Some((host, port)) if !host.is_empty() && port != 0 => Some(TcpSpec {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            send: c.send.as_ref().map(|s| s.get_ref().clone()),
            expect: c.expect.as_ref().map(|s| s.get_ref().clone()),
        }),
        _ => {
            d.at(
                c.target.span(),
                format!("check `{name}`: `{target}` is not host:port"),
            );
            None
        }
    }
}

fn dns(c: &CheckConfig, d: &mut Diagnostics) -> Option<DnsSpec> {
    let (name, target) = (c.name.get_ref(), c.target.get_ref());
    let record_type = match &c.query_type {
        None => Some(hickory_proto::rr::RecordType::A),
        Some(q) => match q.get_ref() {
            Choice::Known(t) => Some((*t).into()),
            Choice::Unknown(w) => {
                d.at(
                    q.span(),
                    format!(
                        "`{w}` is not a DNS record type (one of {})",
                        DnsType::list(", ")
                    ),
                );
                None
            }
        },
    };
    let server = match &c.server {
        None => Some(None),
        Some(s) => {
            let v = s.get_ref();
            match v
                .parse::<SocketAddr>()
                .ok()
                .or_else(|| v.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
            {
                Some(a) => Some(Some(a)),
                None => {
                    d.at(
                        s.span(),
                        format!("server `{v}` is not an address or address:port"),
                    );
                    None
                }
            }
        }
    };
    if hickory_proto::rr::Name::from_ascii(target).is_err() || target.is_empty() {
        d.at(
            c.target.span(),
            format!("check `{name}`: `{target}` is not a DNS name"),
        );
    }
    match (record_type, server) {
        (Some(record_type), Some(server)) => Some(DnsSpec {
            name: target.clone(),
            record_type,
            server,
            expect: c.expect.as_ref().map(|s| s.get_ref().clone()),
        }),
        _ => None,
    }
}
