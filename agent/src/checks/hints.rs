//! Checks from container labels: `netpulse.check.<kind>=<value>` on a
//! container asks for a check of that container, at its address (a
//! host-network container: 127.0.0.1).
//!
//! | label | check |
//! |---|---|
//! | `netpulse.check.http=/healthz`, `=8080/healthz`, `=https://…` | HTTP GET (port 80 unless given) |
//! | `netpulse.check.tcp=5432` | TCP connect |
//! | `netpulse.check.dns=example.org` | an A query to the container as a DNS server |
//! | `netpulse.check.icmp=true` | ICMP echo |
//! | `netpulse.check.interval=10`, `netpulse.check.timeout=2` | seconds, for the container's checks |
//!
//! Each check is named `<container>:<kind>` and belongs to the
//! container's service. A label that does not parse is skipped with a
//! warning naming it.

use std::{net::IpAddr, time::Duration};

use super::{DnsSpec, HttpSpec, Kind, Spec, TcpSpec};
use crate::docker::Container;

/// Checks the containers' labels ask for. `warn` hears about labels that
/// do not parse, as (container, label, why).
pub fn specs(containers: &[Container], warn: &mut dyn FnMut(&str, &str, String)) -> Vec<Spec> {
    let mut out = Vec::new();
    for c in containers {
        let hints = c.check_hints();
        if hints.is_empty() {
            continue;
        }
        let ip: IpAddr = if c.host_network {
            IpAddr::from([127, 0, 0, 1])
        } else {
            match c.addrs.iter().find(|a| a.is_ipv4()).or(c.addrs.first()) {
                Some(a) => *a,
                None => continue,
            }
        };
        let host = match ip {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        let secs = |key: &str, default: f64, warn: &mut dyn FnMut(&str, &str, String)| match hints
            .get(key)
            .map(|v| v.trim().parse::<f64>())
        {
            None => Duration::from_secs_f64(default),
            Some(Ok(x)) if x.is_finite() && (0.05..=86400.0).contains(&x) => {
                Duration::from_secs_f64(x)
            }
            Some(_) => {
                warn(&c.name, key, "not a number of seconds in 0.05-86400".into());
                Duration::from_secs_f64(default)
            }
        };
        let interval = secs("interval", 30.0, warn);
        let timeout = secs("timeout", 10.0, warn).min(interval);
        for (kind, value) in &hints {
            let value = value.trim();
            let spec = match kind.as_str() {
                "interval" | "timeout" => continue,
                "http" => http(&host, value).map(Kind::Http),
                "tcp" => match value.parse::<u16>() {
                    Ok(port) if port != 0 => Ok(Kind::Tcp(TcpSpec {
                        host: ip.to_string(),
                        port,
                        send: None,
                        expect: None,
                    })),
                    _ => Err("not a port".to_string()),
                },
                "dns" => hickory_proto::rr::Name::from_ascii(value)
                    .map(|_| {
                        Kind::Dns(DnsSpec {
                            name: value.to_string(),
                            record_type: hickory_proto::rr::RecordType::A,
                            server: Some(std::net::SocketAddr::new(ip, 53)),
                            expect: None,
                        })
                    })
                    .map_err(|e| e.to_string()),
                "icmp" => Ok(Kind::Icmp {
                    host: ip.to_string(),
                }),
                other => Err(format!("no check kind `{other}`")),
            };
            match spec {
                Ok(kind_spec) => {
                    let mut spec =
                        Spec::new(format!("{}:{kind}", c.name), kind_spec, interval, timeout);
                    spec.service = Some(c.service());
                    out.push(spec);
                }
                Err(why) => warn(&c.name, &format!("netpulse.check.{kind}"), why),
            }
        }
    }
    out
}

fn http(host: &str, value: &str) -> Result<HttpSpec, String> {
    let url = if value.starts_with("http://") || value.starts_with("https://") {
        value.to_string()
    } else {
        let (port, path) = match value.find('/') {
            Some(0) => ("80", value),
            Some(i) => (&value[..i], &value[i..]),
            None => (value, "/"),
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{value}`: not [PORT]/PATH"))?;
        format!("http://{host}:{port}{path}")
    };
    let url: hyper::Uri = url.parse().map_err(|e| format!("`{url}`: {e}"))?;
    Ok(HttpSpec {
        url,
        method: hyper::Method::GET,
        headers: Default::default(),
        expect_status: vec![200..=399],
        body_contains: None,
        body_regex: None,
        max_latency: None,
        max_redirects: 5,
        cert_min_valid: None,
        tls: super::kinds::tls_config(None)?,
        ca_file: None,
    })
}

/// What identifies a set of checks for "did it change": names, kinds,
/// targets and timings.
pub fn fingerprint(specs: &[Spec]) -> Vec<String> {
    let mut v: Vec<String> = specs
        .iter()
        .map(|s| {
            format!(
                "{}|{}|{}|{:?}|{:?}",
                s.name,
                s.kind.as_str(),
                s.target(),
                s.interval,
                s.timeout
            )
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(labels: &[(&str, &str)]) -> Container {
        Container {
            id: "a".into(),
            name: "shop-web-1".into(),
            image: "nginx".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            host_network: false,
            addrs: vec!["172.17.0.5".parse().unwrap()],
            published: vec![],
            veths: vec![],
            netns: None,
        }
    }

    #[test]
    fn labels_become_checks_of_the_container() {
        let mut warnings = Vec::new();
        let specs = specs(
            &[c(&[
                ("netpulse.check.http", "8080/healthz"),
                ("netpulse.check.tcp", "5432"),
                ("netpulse.check.interval", "5"),
                ("netpulse.check.bogus", "1"),
                ("com.docker.compose.service", "web"),
            ])],
            &mut |c, l, why| warnings.push(format!("{c} {l}: {why}")),
        );
        let got: Vec<(String, String, Option<String>, Duration)> = specs
            .iter()
            .map(|s| (s.name.clone(), s.target(), s.service.clone(), s.interval))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "shop-web-1:http".to_string(),
                    "http://172.17.0.5:8080/healthz".to_string(),
                    Some("web".to_string()),
                    Duration::from_secs(5)
                ),
                (
                    "shop-web-1:tcp".to_string(),
                    "172.17.0.5:5432".to_string(),
                    Some("web".to_string()),
                    Duration::from_secs(5)
                ),
            ]
        );
        assert_eq!(
            warnings,
            ["shop-web-1 netpulse.check.bogus: no check kind `bogus`"]
        );
        let plain = specs_of(&[("netpulse.check.http", "/")]);
        assert_eq!(plain[0].target(), "http://172.17.0.5:80/");
    }

    fn specs_of(labels: &[(&str, &str)]) -> Vec<Spec> {
        specs(&[c(labels)], &mut |_, _, _| {})
    }
}
