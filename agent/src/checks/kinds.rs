//! One run of one check, by kind: HTTP(S) with per-phase timings, TCP
//! connect (with optional send/expect), DNS over UDP, ICMP echo over a raw
//! socket. Each returns an [`Outcome`]; nothing here panics or retries (the
//! scheduler retries).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, Uri, header};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

pub use crate::client::tls_config;
use crate::client::{Io, anchors, http1};

use super::{
    DnsSpec, HttpSpec, Kind, Spec, TcpSpec,
    evidence::{self, Stage, Trace},
};
use crate::api_types::Cause;

/// Largest HTTP body read for body checks.
const MAX_BODY: usize = 1 << 20;
/// Largest TCP answer read for `expect`.
const MAX_TCP_READ: usize = 64 << 10;

/// What one run found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub ok: bool,
    /// Why it failed, in words.
    pub error: Option<String>,
    pub duration: Duration,
    /// Per-phase durations, in order (HTTP: dns, connect, tls, first_byte,
    /// transfer; TCP: dns, connect).
    pub phases: Vec<(&'static str, Duration)>,
    pub http_status: Option<u16>,
    /// The earliest notAfter of the peer's certificate chain (HTTPS).
    pub cert_expiry: Option<SystemTime>,
    /// What else the run saw, for blackbox_exporter's metrics on /probe.
    pub seen: Seen,
    /// Why it failed, in one line, and the facts behind it (failed runs).
    pub explanation: Option<String>,
    pub evidence: Option<crate::api_types::Evidence>,
}

/// What a run saw besides its verdict: what blackbox_exporter reports
/// (`checks::blackbox`). Kept on failure as far as the run got.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    /// The address probed (of the first request, for HTTP): the one
    /// connected to, else the first the name resolved to; None if the
    /// name did not resolve.
    pub ip: Option<IpAddr>,
    /// The first name resolution.
    pub resolve: Duration,
    /// HTTP: the final response, if one came.
    pub http: Option<HttpSeen>,
    /// HTTP: redirects followed.
    pub redirects: u32,
    /// Failed on what the answer holds: HTTP body_contains / body_regex,
    /// TCP expect (blackbox_exporter's probe_failed_due_to_regex).
    pub failed_on_content: bool,
    /// HTTP: the TLS session of the final response, if it came over TLS.
    pub tls: Option<TlsSeen>,
    /// ICMP: making the socket and the packet, and the round trip (zero
    /// without a reply).
    pub icmp_setup: Duration,
    pub icmp_rtt: Duration,
    /// ICMP: the reply's TTL (IPv4) or hop limit (IPv6).
    pub hop_limit: Option<u8>,
}

/// The final HTTP response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpSeen {
    /// 1.0, 1.1, 2.0.
    pub version: f64,
    /// As announced: Content-Length, -1 when the body runs to the end or
    /// is chunked, 0 when there can be none (1xx, 204, 304).
    pub content_length: i64,
    /// Body bytes read.
    pub body_length: u64,
    /// Last-Modified, in Unix seconds, when it parses as an HTTP date.
    pub last_modified: Option<i64>,
}

/// A TLS session, as blackbox_exporter describes it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsSeen {
    /// "TLS 1.2", "TLS 1.3".
    pub version: &'static str,
    /// Unix seconds: the earliest notAfter of the certificates the server
    /// sent, and of the verified chain (those, from the leaf up, and the
    /// trust anchor they chain to).
    pub earliest_expiry: i64,
    pub chain_expiry: i64,
    /// The leaf: SHA-256 of its DER (hex), subject and issuer as Go
    /// prints an X.509 name (RFC 2253 order), its DNS names joined by ",".
    pub fingerprint_sha256: String,
    pub subject: String,
    pub issuer: String,
    pub dns_names: String,
}

impl Outcome {
    fn fail(error: String, started: Instant) -> Self {
        Outcome {
            ok: false,
            error: Some(error),
            duration: started.elapsed(),
            ..Default::default()
        }
    }
}

/// Runs `spec` once, within its timeout.
pub async fn run(spec: &Spec) -> Outcome {
    let started = Instant::now();
    let mut seen = Seen::default();
    let mut trace = Trace::new();
    let fut = async {
        match &spec.kind {
            Kind::Http(h) => http(h, started, &mut seen, &mut trace).await,
            Kind::Tcp(t) => tcp(t, started, &mut seen, &mut trace).await,
            Kind::Dns(d) => dns(d, started, &mut trace).await,
            // Its own deadline inside the run's, so a silent host is
            // reported as such rather than as a timeout.
            Kind::Icmp { host } => {
                let out = icmp(host, spec.timeout.mul_f64(0.9), started, &mut seen).await;
                if let Some(e) = &out.error {
                    trace.ev.target = seen.ip.map(|ip| ip.to_string());
                    trace.ev.cause = if e.contains("CAP_NET_RAW") {
                        Cause::LocalError
                    } else if e.starts_with("ICMP ") {
                        Cause::IcmpUnreachable
                    } else if seen.ip.is_none() {
                        Cause::Resolve
                    } else {
                        Cause::Timeout
                    };
                }
                out
            }
        }
    };
    let mut out = match tokio::time::timeout(spec.timeout, fut).await {
        Ok(o) => o,
        Err(_) => {
            trace.timed_out = true;
            Outcome::fail(
                format!("timed out after {:.1} s", spec.timeout.as_secs_f64()),
                started,
            )
        }
    };
    // As far as it got, a timed-out run included.
    out.seen = seen;
    if !out.ok {
        trace.finish();
        evidence::explain(spec, &mut out, trace);
    }
    out
}

/// Resolves `host:port`: an address literal as is, a name through the
/// system resolver. All addresses, in the resolver's order.
async fn resolve(host: &str, port: u16, trace: &mut Trace) -> Result<Vec<SocketAddr>, String> {
    let r = resolve_name(host, port).await;
    if r.is_err() {
        trace.ev.cause = Cause::Resolve;
    }
    r
}

async fn resolve_name(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| format!("resolving {bare}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("resolving {bare}: no addresses"));
    }
    Ok(addrs)
}

/// Connects to the first address that answers; the stream and that
/// address.
async fn connect(
    addrs: &[SocketAddr],
    trace: &mut Trace,
) -> Result<(TcpStream, SocketAddr), String> {
    let mut last = String::from("no address");
    for a in addrs {
        match trace.connect(*a).await {
            Ok(s) => return Ok((s, *a)),
            Err(e) => last = format!("connecting to {a}: {e}"),
        }
    }
    Err(last)
}

// --- TLS ---------------------------------------------------------------

/// notAfter of a DER certificate.
fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let t = cert.validity().not_after.timestamp();
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(t).ok()?))
}

/// blackbox_exporter's view of a verified session: version, expiries,
/// the leaf's fingerprint, names and DNS names.
fn tls_seen(conn: &rustls::ClientConnection) -> Option<TlsSeen> {
    use x509_parser::prelude::*;
    let version = match conn.protocol_version()? {
        rustls::ProtocolVersion::TLSv1_0 => "TLS 1.0",
        rustls::ProtocolVersion::TLSv1_1 => "TLS 1.1",
        rustls::ProtocolVersion::TLSv1_2 => "TLS 1.2",
        rustls::ProtocolVersion::TLSv1_3 => "TLS 1.3",
        _ => "unknown",
    };
    let ders = conn.peer_certificates()?;
    let certs: Vec<X509Certificate<'_>> = ders
        .iter()
        .filter_map(|d| parse_x509_certificate(d).ok().map(|(_, c)| c))
        .collect();
    let leaf = certs.first()?;
    let expiry = |c: &X509Certificate<'_>| c.validity().not_after.timestamp();
    let earliest_expiry = certs.iter().map(expiry).min()?;
    // The chain from the leaf up, through what the server sent, to a
    // self-signed certificate or the trust anchor that issued the last.
    let mut chain = vec![leaf];
    loop {
        let last = chain[chain.len() - 1];
        if last.issuer().as_raw() == last.subject().as_raw() || chain.len() > certs.len() {
            break;
        }
        match certs
            .iter()
            .find(|c| c.subject().as_raw() == last.issuer().as_raw() && !chain.contains(c))
        {
            Some(next) => chain.push(next),
            None => break,
        }
    }
    let top = chain[chain.len() - 1];
    let anchor = (top.issuer().as_raw() != top.subject().as_raw())
        .then(|| {
            anchors()
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(top.issuer().as_raw())
                .copied()
        })
        .flatten();
    let chain_expiry = chain.iter().map(|c| expiry(c)).chain(anchor).min()?;
    let dns_names = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(*d),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA256, &ders[0]);
    Some(TlsSeen {
        version,
        earliest_expiry,
        chain_expiry,
        fingerprint_sha256: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
        subject: go_name(leaf.subject()),
        issuer: go_name(leaf.issuer()),
        dns_names,
    })
}

/// An X.509 name as Go's `pkix.Name.String()` prints it (what
/// blackbox_exporter puts in probe_ssl_last_chain_info): the attributes it
/// knows in its own order, most specific first (SERIALNUMBER, CN, OU, O,
/// POSTALCODE, STREET, L, ST, C; several values of one type joined by
/// `+`), then any others as `OID=#` and the hex DER of the value as Go
/// would encode it; `,` between, RFC 4514 escapes.
fn go_name(name: &x509_parser::x509::X509Name<'_>) -> String {
    use x509_parser::asn1_rs::Tag;
    // Go's string types: all as text, T.61 as Latin-1, BMP as UTF-16.
    let text = |a: &x509_parser::x509::AttributeTypeAndValue<'_>| -> Option<String> {
        let v = a.attr_value();
        match v.tag() {
            Tag::NumericString | Tag::PrintableString | Tag::Utf8String | Tag::Ia5String => {
                std::str::from_utf8(v.data).ok().map(String::from)
            }
            Tag::T61String => Some(v.data.iter().map(|b| char::from(*b)).collect()),
            Tag::BmpString => {
                let units: Vec<u16> = v
                    .data
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16(&units).ok()
            }
            _ => None,
        }
    };
    let escape = |v: &str| -> String {
        let n = v.chars().count();
        let mut out = String::with_capacity(v.len());
        for (i, c) in v.chars().enumerate() {
            let esc = match c {
                ',' | '+' | '"' | '\\' | '<' | '>' | ';' => true,
                ' ' => i == 0 || i + 1 == n,
                '#' => i == 0,
                _ => false,
            };
            if esc {
                out.push('\\');
            }
            out.push(c);
        }
        out
    };
    // (last arc under 2.5.4, Go's name), in Go's order.
    const KNOWN: [(u64, &str); 9] = [
        (6, "C"),
        (8, "ST"),
        (7, "L"),
        (9, "STREET"),
        (17, "POSTALCODE"),
        (10, "O"),
        (11, "OU"),
        (3, "CN"),
        (5, "SERIALNUMBER"),
    ];
    let arc = |a: &x509_parser::x509::AttributeTypeAndValue<'_>| -> Option<u64> {
        let arcs: Vec<u64> = a.attr_type().iter()?.collect();
        match arcs.as_slice() {
            [2, 5, 4, x] => Some(*x),
            _ => None,
        }
    };
    let attrs: Vec<_> = name.iter().flat_map(|rdn| rdn.iter()).collect();
    // Others first, each its own RDN, then the known ones; printed last
    // RDN first.
    let mut rdns: Vec<String> = attrs
        .iter()
        .filter(|a| !arc(a).is_some_and(|x| KNOWN.iter().any(|(k, _)| *k == x)))
        .map(|a| {
            let oid = a.attr_type().to_id_string();
            match text(a) {
                Some(t) => format!("{oid}=#{}", go_der_string(&t)),
                None => format!("{oid}=#{}", hex(&der_of(a.attr_value()))),
            }
        })
        .collect();
    for (k, label) in KNOWN {
        let mut values: Vec<String> = attrs
            .iter()
            .filter(|a| arc(a) == Some(k))
            .filter_map(|a| text(a))
            .collect();
        // Go keeps one CN and one serial number: the last.
        if matches!(k, 3 | 5) && values.len() > 1 {
            values = values.split_off(values.len() - 1);
        }
        if values.is_empty() {
            continue;
        }
        rdns.push(
            values
                .iter()
                .map(|v| format!("{label}={}", escape(v)))
                .collect::<Vec<_>>()
                .join("+"),
        );
    }
    rdns.reverse();
    rdns.join(",")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A DER length.
fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        // Fits one byte: shown by the branch.
        return vec![u8::try_from(n).unwrap_or(0)];
    }
    let bytes: Vec<u8> = n
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    let mut out = vec![0x80 | u8::try_from(bytes.len()).unwrap_or(0)];
    out.extend(bytes);
    out
}

/// A string as Go's `asn1.Marshal` encodes it: PrintableString when its
/// characters allow, else UTF8String; as hex.
fn go_der_string(s: &str) -> String {
    let printable = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b" '()+,-./:=?".contains(&b));
    let mut der = vec![if printable { 0x13 } else { 0x0c }];
    der.extend(der_len(s.len()));
    der.extend_from_slice(s.as_bytes());
    hex(&der)
}

/// The DER of a value that is not a string (tag, length, content).
fn der_of(v: &x509_parser::asn1_rs::Any<'_>) -> Vec<u8> {
    let tag = u8::try_from(v.tag().0).unwrap_or(0x1f);
    let class = u8::try_from(v.class() as u32).unwrap_or(0);
    let constructed = u8::from(v.header.is_constructed());
    let mut der = vec![(class << 6) | (constructed << 5) | (tag & 0x1f)];
    der.extend(der_len(v.data.len()));
    der.extend_from_slice(v.data);
    der
}

// --- HTTP --------------------------------------------------------------

/// TLS over `tcp` to `host`; the stream, the earliest expiry of the
/// chain the server sent (as blackbox_exporter's
/// probe_ssl_earliest_cert_expiry) and the session as blackbox_exporter
/// describes it.
pub(crate) async fn tls_wrap(
    host: &str,
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
) -> Result<(Box<dyn Io>, Option<SystemTime>, Option<TlsSeen>), String> {
    let tls = crate::client::tls_connect(host, tcp, config).await?;
    let expiry = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.iter().filter_map(|c| not_after(c)).min());
    let seen = tls_seen(tls.get_ref().1);
    Ok((Box::new(tls), expiry, seen))
}

async fn http(spec: &HttpSpec, started: Instant, seen: &mut Seen, trace: &mut Trace) -> Outcome {
    let mut uri = spec.url.clone();
    let mut out = Outcome::default();
    let mut redirects = 0;
    loop {
        match http_once(spec, &uri, &mut out, seen, trace, redirects == 0).await {
            Err(e) => return Outcome::fail(e, started),
            Ok((status, location, body)) => {
                let is_redirect = matches!(status, 301 | 302 | 303 | 307 | 308);
                if is_redirect && let Some(loc) = location {
                    if redirects >= spec.max_redirects {
                        // blackbox_exporter counts the one refused.
                        seen.redirects = redirects + 1;
                        return Outcome::fail(
                            format!("more than {} redirects", spec.max_redirects),
                            started,
                        );
                    }
                    redirects += 1;
                    seen.redirects = redirects;
                    uri = match join(&uri, &loc) {
                        Some(u) => u,
                        None => {
                            return Outcome::fail(
                                format!("redirect to an unusable location `{loc}`"),
                                started,
                            );
                        }
                    };
                    continue;
                }
                out.http_status = Some(status);
                out.duration = started.elapsed();
                trace.stage = Stage::Judged;
                out.error = judge_http(spec, status, &body, out.duration, out.cert_expiry, trace);
                seen.failed_on_content =
                    status_ok(spec, status) && body_fails(spec, &body).is_some();
                out.ok = out.error.is_none();
                return out;
            }
        }
    }
}

/// The OS error somewhere in an error's chain of sources.
fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if let Some(io) = x.downcast_ref::<std::io::Error>()
            && let Some(n) = io.raw_os_error()
        {
            return Some(n);
        }
        cur = x.source();
    }
    None
}

/// What failed in a TLS handshake, in words, from rustls' error; None if
/// it was not the TLS layer (the connection went first).
fn tls_failure(e: &str) -> Option<String> {
    if let Some(i) = e.find("certificate expired") {
        // "… not valid after T (N seconds ago)"
        let ago = e[i..]
            .split('(')
            .filter_map(|p| {
                p.strip_suffix(" seconds ago)")
                    .or(p.split(" seconds ago").next())
            })
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .next_back();
        return Some(match ago {
            Some(s) if s >= 2 * 86400 => format!("certificate expired {} days ago", s / 86400),
            Some(s) if s >= 7200 => format!("certificate expired {} hours ago", s / 3600),
            Some(s) => format!("certificate expired {s} seconds ago"),
            None => "certificate expired".into(),
        });
    }
    if e.contains("Expired") {
        return Some("certificate expired".into());
    }
    if let Some(i) = e.find("certificate not valid for name") {
        return Some(e[i..].to_string());
    }
    if e.contains("NotValidForName") {
        return Some("certificate not valid for this name".into());
    }
    if e.contains("UnknownIssuer") || e.contains("unknown issuer") {
        return Some("certificate signed by an unknown issuer".into());
    }
    if e.contains("NotValidYet") {
        return Some("certificate not valid yet".into());
    }
    if e.contains("invalid peer certificate")
        || e.contains("AlertReceived")
        || e.contains("received fatal alert")
    {
        let i = e
            .find("TLS handshake")
            .map_or(0, |_| e.find(": ").map_or(0, |j| j + 2));
        return Some(e[i..].to_string());
    }
    None
}

fn status_ok(spec: &HttpSpec, status: u16) -> bool {
    spec.expect_status.iter().any(|r| r.contains(&status))
}

/// Why the body fails body_contains / body_regex, if it does.
fn body_fails(spec: &HttpSpec, body: &[u8]) -> Option<String> {
    if let Some(want) = &spec.body_contains
        && !String::from_utf8_lossy(body).contains(want.as_str())
    {
        return Some(format!("body does not contain `{want}`"));
    }
    if let Some(re) = &spec.body_regex
        && !re.is_match(&String::from_utf8_lossy(body))
    {
        return Some(format!("body does not match /{}/", re.as_str()));
    }
    None
}

/// Why an HTTP answer fails the check, if it does.
fn judge_http(
    spec: &HttpSpec,
    status: u16,
    body: &[u8],
    took: Duration,
    expiry: Option<SystemTime>,
    trace: &mut Trace,
) -> Option<String> {
    trace.ev.http_status = Some(status);
    trace.ev.max_latency_seconds = spec.max_latency.map(|d| d.as_secs_f64());
    if !status_ok(spec, status) {
        trace.ev.cause = Cause::HttpStatus;
        return Some(format!(
            "status {status}, expected {}",
            spec.expect_status_text()
        ));
    }
    if let Some(why) = body_fails(spec, body) {
        trace.ev.cause = Cause::Content;
        return Some(why);
    }
    if let Some(max) = spec.max_latency
        && took > max
    {
        trace.ev.cause = Cause::Slow;
        return Some(format!(
            "took {:.3} s, more than the {:.3} s allowed",
            took.as_secs_f64(),
            max.as_secs_f64()
        ));
    }
    if let (Some(min), Some(exp)) = (spec.cert_min_valid, expiry) {
        let left = exp.duration_since(SystemTime::now()).unwrap_or_default();
        if left < min {
            trace.ev.cause = Cause::CertExpiring;
            return Some(format!(
                "certificate expires in {:.1} days, less than {:.1}",
                left.as_secs_f64() / 86400.0,
                min.as_secs_f64() / 86400.0
            ));
        }
    }
    None
}

/// A redirect's `Location` against the URL it came from.
fn join(base: &Uri, loc: &str) -> Option<Uri> {
    let u: Uri = loc.parse().ok()?;
    if u.scheme().is_some() {
        return Some(u);
    }
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(if loc.starts_with('/') {
        loc.parse().ok()?
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        format!("{dir}{loc}").parse().ok()?
    });
    Uri::from_parts(parts).ok()
}

/// One request: (status, Location, body). Fills the phases of `out`, and
/// `seen` (the address on the `first` request).
async fn http_once(
    spec: &HttpSpec,
    uri: &Uri,
    out: &mut Outcome,
    seen: &mut Seen,
    trace: &mut Trace,
    first: bool,
) -> Result<(u16, Option<String>, Bytes), String> {
    // Of the final response only.
    seen.http = None;
    seen.tls = None;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        other => return Err(format!("unsupported URL scheme {other:?}")),
    };
    let host = uri.host().ok_or("URL without a host")?.to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    out.phases.clear();
    trace.stage = Stage::Resolve;
    let t = Instant::now();
    let addrs = resolve(&host, port, trace).await?;
    out.phases.push(("dns", t.elapsed()));
    if first {
        seen.resolve = t.elapsed();
        seen.ip = addrs.first().map(SocketAddr::ip);
    }
    let t = Instant::now();
    let (tcp, peer) = connect(&addrs, trace).await?;
    if first {
        seen.ip = Some(peer.ip());
    }
    out.phases.push(("connect", t.elapsed()));
    let t = Instant::now();
    let mut session = None;
    let stream: Box<dyn Io> = if https {
        trace.stage = Stage::Tls;
        let (tls, expiry, s) = match tls_wrap(&host, tcp, spec.tls.clone()).await {
            Ok(x) => x,
            Err(e) => {
                if let Some(what) = tls_failure(&e) {
                    trace.ev.cause = Cause::Tls;
                    trace.ev.tls = Some(what);
                }
                return Err(e);
            }
        };
        out.cert_expiry = expiry;
        session = s;
        out.phases.push(("tls", t.elapsed()));
        tls
    } else {
        Box::new(tcp)
    };
    trace.stage = Stage::Exchange;
    let t = Instant::now();
    let (mut sender, driver) = http1(stream).await?;
    let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
    let mut req = Request::builder()
        .method(spec.method.clone())
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, authority)
        .header(
            header::USER_AGENT,
            concat!("netpulse/", env!("CARGO_PKG_VERSION")),
        );
    for (k, v) in &spec.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| {
        trace.errno = os_error(&e);
        format!("HTTP request: {e}")
    })?;
    out.phases.push(("first_byte", t.elapsed()));
    let t = Instant::now();
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    seen.tls = session;
    seen.http = Some(HttpSeen {
        version: match resp.version() {
            hyper::Version::HTTP_09 => 0.9,
            hyper::Version::HTTP_10 => 1.0,
            hyper::Version::HTTP_11 => 1.1,
            hyper::Version::HTTP_2 => 2.0,
            hyper::Version::HTTP_3 => 3.0,
            _ => 0.0,
        },
        content_length: content_length(&spec.method, status, resp.headers()),
        body_length: 0,
        last_modified: resp
            .headers()
            .get(header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(http_date),
    });
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            trace.errno = os_error(e.as_ref());
            format!("reading the body: {e}")
        })?
        .to_bytes();
    if let Some(h) = &mut seen.http {
        h.body_length = body.len() as u64;
    }
    out.phases.push(("transfer", t.elapsed()));
    driver.abort();
    Ok((status, location, body))
}

/// The body length a response announces, as Go's net/http reads it: none
/// can follow 1xx, 204 and 304 (0); a HEAD answer's is its header's;
/// chunked or without Content-Length it is unknown (-1).
fn content_length(method: &hyper::Method, status: u16, headers: &hyper::HeaderMap) -> i64 {
    let declared = || {
        headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    if *method == hyper::Method::HEAD {
        return declared().unwrap_or(-1);
    }
    if status / 100 == 1 || status == 204 || status == 304 {
        return 0;
    }
    let chunked = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        return -1;
    }
    declared().unwrap_or(-1)
}

/// An HTTP date (RFC 9110: IMF-fixdate, RFC 850, asctime) in Unix
/// seconds, as Go's `http.ParseTime` reads it.
fn http_date(s: &str) -> Option<i64> {
    let month = |m: &str| {
        [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ]
        .iter()
        .position(|x| *x == m)
        .and_then(|i| u32::try_from(i + 1).ok())
    };
    let num = |v: &str| v.parse::<u32>().ok();
    let hms = |v: &str| -> Option<(u32, u32, u32)> {
        let mut p = v.split(':');
        let r = (num(p.next()?)?, num(p.next()?)?, num(p.next()?)?);
        p.next().is_none().then_some(r)
    };
    let f: Vec<&str> = s.split_whitespace().collect();
    let (y, mo, d, (h, mi, se)) = match f.as_slice() {
        // Sun, 06 Nov 1994 08:49:37 GMT
        [wd, d, m, y, t, "GMT"] if wd.ends_with(',') && d.len() == 2 && y.len() == 4 => {
            (num(y)?, month(m)?, num(d)?, hms(t)?)
        }
        // Sunday, 06-Nov-94 08:49:37 GMT
        [wd, dmy, t, zone] if wd.ends_with(',') && zone.chars().all(|c| c.is_ascii_uppercase()) => {
            let mut p = dmy.split('-');
            let (d, m, y) = (p.next()?, p.next()?, p.next()?);
            let y = num(y)?;
            let y = if y >= 69 { 1900 + y } else { 2000 + y };
            (y, month(m)?, num(d)?, hms(t)?)
        }
        // Sun Nov  6 08:49:37 1994
        [_, m, d, t, y] => (num(y)?, month(m)?, num(d)?, hms(t)?),
        _ => return None,
    };
    if !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from the civil date (proleptic Gregorian).
    let (y, mo, d) = (i64::from(y), i64::from(mo), i64::from(d));
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(se))
}

// --- TCP ---------------------------------------------------------------

async fn tcp(spec: &TcpSpec, started: Instant, seen: &mut Seen, trace: &mut Trace) -> Outcome {
    let mut out = Outcome::default();
    let r = async {
        let t = Instant::now();
        let addrs = resolve(&spec.host, spec.port, trace).await?;
        out.phases.push(("dns", t.elapsed()));
        seen.resolve = t.elapsed();
        seen.ip = addrs.first().map(SocketAddr::ip);
        let t = Instant::now();
        let (mut s, peer) = connect(&addrs, trace).await?;
        seen.ip = Some(peer.ip());
        out.phases.push(("connect", t.elapsed()));
        trace.stage = Stage::Exchange;
        if let Some(send) = &spec.send {
            s.write_all(send.as_bytes()).await.map_err(|e| {
                trace.errno = e.raw_os_error();
                format!("sending: {e}")
            })?;
        }
        if let Some(want) = &spec.expect {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                if String::from_utf8_lossy(&got).contains(want.as_str()) {
                    break;
                }
                let n = s.read(&mut buf).await.map_err(|e| {
                    trace.errno = e.raw_os_error();
                    format!("reading: {e}")
                })?;
                if n == 0 || got.len() > MAX_TCP_READ {
                    seen.failed_on_content = true;
                    trace.stage = Stage::Judged;
                    trace.ev.cause = Cause::Content;
                    return Err(format!(
                        "answer does not contain `{want}` (got {:?})",
                        String::from_utf8_lossy(&got[..got.len().min(80)])
                    ));
                }
                got.extend_from_slice(&buf[..n]);
            }
        }
        Ok::<(), String>(())
    }
    .await;
    out.duration = started.elapsed();
    out.ok = r.is_ok();
    out.error = r.err();
    out
}

// --- DNS ---------------------------------------------------------------

/// The first nameserver of /etc/resolv.conf: the system resolver.
/// An rcode's mnemonic as dig prints it (RFC 1035, 2136, 6895).
fn rcode_name(code: u16) -> String {
    match code {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        16 => "BADVERS",
        n => return format!("RCODE{n}"),
    }
    .to_string()
}

fn system_nameserver() -> Result<SocketAddr, String> {
    let text = std::fs::read_to_string("/etc/resolv.conf")
        .map_err(|e| format!("/etc/resolv.conf: {e}"))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .ok_or_else(|| "/etc/resolv.conf names no nameserver".to_string())
}

async fn dns(spec: &DnsSpec, started: Instant, trace: &mut Trace) -> Outcome {
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    let r = async {
        let server = match spec.server {
            Some(s) => s,
            None => system_nameserver().inspect_err(|_| trace.ev.cause = Cause::LocalError)?,
        };
        trace.ev.dns_server = Some(server.ip().to_string());
        let name = hickory_proto::rr::Name::from_ascii(&spec.name)
            .map_err(|e| format!("query name `{}`: {e}", spec.name))?;
        let id: u16 = fastrand::u16(..);
        let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(name, spec.record_type));
        let bytes = msg
            .to_vec()
            .map_err(|e| format!("encoding the query: {e}"))?;
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().map_err(|_| "bind")?
        } else {
            "[::]:0".parse().map_err(|_| "bind")?
        };
        let sock = tokio::net::UdpSocket::bind(bind)
            .await
            .map_err(|e| format!("UDP socket: {e}"))?;
        trace.udp(&sock, server);
        trace.stage = Stage::Connect;
        sock.connect(server).await.map_err(|e| {
            trace.errno = e.raw_os_error();
            format!("{server}: {e}")
        })?;
        sock.send(&bytes).await.map_err(|e| {
            trace.errno = e.raw_os_error();
            format!("sending to {server}: {e}")
        })?;
        let mut buf = vec![0u8; 4096];
        let answer = loop {
            let n = sock.recv(&mut buf).await.map_err(|e| {
                trace.errno = e.raw_os_error();
                format!("from {server}: {e}")
            })?;
            let Ok(m) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if m.metadata.id == id {
                break m;
            }
        };
        trace.stage = Stage::Judged;
        if answer.metadata.response_code != ResponseCode::NoError {
            trace.ev.cause = Cause::DnsRcode;
            trace.ev.dns_rcode = Some(rcode_name(u16::from(answer.metadata.response_code)));
            return Err(format!(
                "{server} answered {} for {} {}",
                answer.metadata.response_code, spec.record_type, spec.name
            ));
        }
        let records: Vec<String> = answer
            .answers
            .iter()
            .filter(|r| r.record_type() == spec.record_type)
            .map(|r| r.data.to_string())
            .collect();
        if records.is_empty() {
            trace.ev.cause = Cause::DnsNoAnswer;
            return Err(format!(
                "{server} has no {} record for {}",
                spec.record_type, spec.name
            ));
        }
        if let Some(want) = &spec.expect
            && !records.iter().any(|r| r.contains(want.as_str()))
        {
            trace.ev.cause = Cause::DnsNoAnswer;
            return Err(format!(
                "no {} answer contains `{want}` (got {})",
                spec.record_type,
                records.join(", ")
            ));
        }
        Ok(())
    }
    .await;
    Outcome {
        ok: r.is_ok(),
        error: r.err(),
        duration: started.elapsed(),
        ..Default::default()
    }
}

// --- ICMP --------------------------------------------------------------

async fn icmp(host: &str, timeout: Duration, started: Instant, seen: &mut Seen) -> Outcome {
    let r = async {
        let t = Instant::now();
        let addr = resolve_name(host, 0).await?[0].ip();
        seen.resolve = t.elapsed();
        seen.ip = Some(addr);
        let (setup, r) = tokio::task::spawn_blocking(move || echo(addr, timeout))
            .await
            .map_err(|e| format!("ICMP task: {e}"))?;
        seen.icmp_setup = setup;
        let (rtt, hop_limit) = r?;
        seen.icmp_rtt = rtt;
        seen.hop_limit = hop_limit;
        Ok::<(), String>(())
    }
    .await;
    Outcome {
        ok: r.is_ok(),
        error: r.err(),
        duration: started.elapsed(),
        ..Default::default()
    }
}

/// One echo request to `addr`, and its reply within `timeout`, over a raw
/// socket (blocking: run it off the async threads). How long making the
/// socket and the packet took, and the round trip with the reply's TTL or
/// hop limit.
#[allow(clippy::type_complexity)]
fn echo(addr: IpAddr, timeout: Duration) -> (Duration, Result<(Duration, Option<u8>), String>) {
    let setup = Instant::now();
    match echo_socket(addr) {
        Err(e) => (setup.elapsed(), Err(e)),
        Ok((sock, packet, id, seq)) => {
            let setup = setup.elapsed();
            (setup, echo_exchange(&sock, addr, &packet, id, seq, timeout))
        }
    }
}

/// The raw socket (asking for hop limits on IPv6) and the echo request:
/// (socket, packet, id, seq).
fn echo_socket(addr: IpAddr) -> Result<(socket2::Socket, Vec<u8>, u16, u16), String> {
    use socket2::{Domain, Protocol, Socket, Type};
    let (domain, proto) = match addr {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let sock = Socket::new(domain, Type::RAW, Some(proto)).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            "ICMP checks need CAP_NET_RAW (a raw socket): run netpulse as root or grant it CAP_NET_RAW".to_string()
        } else {
            format!("raw ICMP socket: {e}")
        }
    })?;
    if addr.is_ipv6() {
        // The reply's hop limit, in a control message.
        let on: libc::c_int = 1;
        // SAFETY: a valid socket, option and int-sized value.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVHOPLIMIT,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(format!(
                "raw ICMPv6 socket: IPV6_RECVHOPLIMIT: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    let id: u16 = fastrand::u16(..);
    let seq: u16 = 1;
    let payload = *b"netpulse-echo-01";
    let packet = match addr {
        IpAddr::V4(_) => {
            let h = etherparse::Icmpv4Header::with_checksum(
                etherparse::Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id, seq }),
                &payload,
            );
            let mut v = h.to_bytes().to_vec();
            v.extend_from_slice(&payload);
            v
        }
        // The kernel fills in the ICMPv6 checksum on raw ICMPv6 sockets.
        IpAddr::V6(_) => {
            let mut v = vec![128, 0, 0, 0];
            v.extend_from_slice(&id.to_be_bytes());
            v.extend_from_slice(&seq.to_be_bytes());
            v.extend_from_slice(&payload);
            v
        }
    };
    Ok((sock, packet, id, seq))
}

/// Sends the request and waits for its reply: (round trip, TTL / hop
/// limit).
fn echo_exchange(
    sock: &socket2::Socket,
    addr: IpAddr,
    packet: &[u8],
    id: u16,
    seq: u16,
    timeout: Duration,
) -> Result<(Duration, Option<u8>), String> {
    let deadline = Instant::now() + timeout;
    let sent = Instant::now();
    sock.send_to(packet, &socket2::SockAddr::from(SocketAddr::new(addr, 0)))
        .map_err(|e| format!("sending an echo request to {addr}: {e}"))?;
    let silent = || {
        format!(
            "no echo reply from {addr} within {:.1} s",
            timeout.as_secs_f64()
        )
    };
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(silent());
        }
        sock.set_read_timeout(Some(left))
            .map_err(|e| format!("raw ICMP socket: {e}"))?;
        let (n, from, hop_limit) = match recv_with_hop_limit(sock, &mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(silent());
            }
            Err(e) => return Err(format!("receiving from {addr}: {e}")),
        };
        let bytes = &buf[..n];
        if let Some(from) = from
            && let Some((ty, code)) = echo_error(addr, bytes, id, seq)
        {
            let text = super::evidence::icmp_text(addr.is_ipv6(), ty, code);
            return Err(format!("ICMP {text} from {from} (echo request to {addr})"));
        }
        if from != Some(addr) {
            continue;
        }
        let reply = match addr {
            // A raw IPv4 socket hands over the IP header too: the TTL.
            IpAddr::V4(_) => etherparse::Ipv4Slice::from_slice(bytes)
                .ok()
                .and_then(|ip| {
                    let ttl = ip.header().ttl();
                    etherparse::Icmpv4Slice::from_slice(ip.payload().payload)
                        .ok()
                        .and_then(|icmp| match icmp.icmp_type() {
                            etherparse::Icmpv4Type::EchoReply(h) => Some((h, Some(ttl))),
                            _ => None,
                        })
                }),
            IpAddr::V6(_) => (bytes.len() >= 8 && bytes[0] == 129).then(|| {
                (
                    etherparse::IcmpEchoHeader {
                        id: u16::from_be_bytes([bytes[4], bytes[5]]),
                        seq: u16::from_be_bytes([bytes[6], bytes[7]]),
                    },
                    hop_limit,
                )
            }),
        };
        if let Some((h, hops)) = reply
            && h.id == id
            && h.seq == seq
        {
            return Ok((sent.elapsed(), hops));
        }
    }
}

/// An ICMP error (destination unreachable, time exceeded) quoting our echo
/// request to `addr` with `id` and `seq`: its type and code. `bytes` is
/// what the raw socket read (IPv4: from the IP header; IPv6: the ICMPv6
/// message).
fn echo_error(addr: IpAddr, bytes: &[u8], id: u16, seq: u16) -> Option<(u8, u8)> {
    let (icmp, errors, quoted_ip_len, echo_type): (&[u8], [u8; 2], usize, u8) = match addr {
        IpAddr::V4(_) => {
            let ihl = usize::from(bytes.first()? & 0x0f) * 4;
            (bytes.get(ihl..)?, [3, 11], 0, 8)
        }
        IpAddr::V6(_) => (bytes, [1, 3], 40, 128),
    };
    let (ty, code) = (*icmp.first()?, *icmp.get(1)?);
    if !errors.contains(&ty) {
        return None;
    }
    let quoted = icmp.get(8..)?;
    let (dst, l4): (IpAddr, &[u8]) = match addr {
        IpAddr::V4(_) => {
            let ihl = usize::from(quoted.first()? & 0x0f) * 4;
            let d: [u8; 4] = quoted.get(16..20)?.try_into().ok()?;
            (IpAddr::from(d), quoted.get(ihl..)?)
        }
        IpAddr::V6(_) => {
            let d: [u8; 16] = quoted.get(24..40)?.try_into().ok()?;
            (IpAddr::from(d), quoted.get(quoted_ip_len..)?)
        }
    };
    let echo = l4.get(..8)?;
    (dst == addr
        && echo[0] == echo_type
        && u16::from_be_bytes([echo[4], echo[5]]) == id
        && u16::from_be_bytes([echo[6], echo[7]]) == seq)
        .then_some((ty, code))
}

/// recvmsg(2) on a raw socket: (bytes, sender, the IPV6_HOPLIMIT control
/// message if one came).
fn recv_with_hop_limit(
    sock: &socket2::Socket,
    buf: &mut [u8],
) -> std::io::Result<(usize, Option<IpAddr>, Option<u8>)> {
    // SAFETY: all-zero is a valid sockaddr_storage and msghdr; the
    // pointers set below outlive the call; the control messages are read
    // with the CMSG_* macros within msg_controllen.
    unsafe {
        let mut from: libc::sockaddr_storage = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 16];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&raw mut from).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = libc::recvmsg(std::os::fd::AsRawFd::as_raw_fd(sock), &raw mut msg, 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut hop_limit = None;
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IPV6 && (*c).cmsg_type == libc::IPV6_HOPLIMIT {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                hop_limit = u8::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
        let addr = match i32::from(from.ss_family) {
            libc::AF_INET => {
                let a = std::ptr::read_unaligned((&raw const from).cast::<libc::sockaddr_in>());
                Some(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()))
            }
            libc::AF_INET6 => {
                let a = std::ptr::read_unaligned((&raw const from).cast::<libc::sockaddr_in6>());
                Some(IpAddr::from(a.sin6_addr.s6_addr))
            }
            _ => None,
        };
        Ok((n as usize, addr, hop_limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_in_words() {
        assert_eq!(
            tls_failure(
                "TLS handshake with x: invalid peer certificate: certificate expired: verification time 1800000000 (UNIX), but certificate is not valid after 1799827200 (172800 seconds ago)"
            )
            .as_deref(),
            Some("certificate expired 2 days ago")
        );
        assert_eq!(
            tls_failure(
                "TLS handshake with x: invalid peer certificate: certificate not valid for name \"x\"; certificate is only valid for DnsName(\"y\")"
            )
            .as_deref(),
            Some("certificate not valid for name \"x\"; certificate is only valid for DnsName(\"y\")")
        );
        assert_eq!(
            tls_failure("TLS handshake with x: connection reset by peer"),
            None
        );
    }

    #[test]
    fn http_dates_parse_as_go_reads_them() {
        // RFC 9110's three forms of one instant.
        for s in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(http_date(s), Some(784_111_777), "{s}");
        }
        assert_eq!(
            http_date("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(1_445_412_480)
        );
        assert_eq!(
            http_date("Thu, 29 Feb 2024 23:59:59 GMT"),
            Some(1_709_251_199)
        );
        assert_eq!(http_date("yesterday"), None);
        assert_eq!(http_date("Sun, 06 Nov 1994 25:49:37 GMT"), None);
    }

    #[test]
    fn content_length_is_read_as_go_reads_it() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = hyper::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(
                    hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        let get = hyper::Method::GET;
        assert_eq!(content_length(&get, 200, &h(&[("content-length", "8")])), 8);
        assert_eq!(content_length(&get, 200, &h(&[])), -1);
        assert_eq!(
            content_length(&get, 200, &h(&[("transfer-encoding", "chunked")])),
            -1
        );
        assert_eq!(content_length(&get, 204, &h(&[("content-length", "8")])), 0);
        assert_eq!(
            content_length(&hyper::Method::HEAD, 200, &h(&[("content-length", "8")])),
            8
        );
    }

    #[test]
    fn strings_encode_as_go_marshals_them() {
        assert_eq!(go_der_string("DE"), "13024445");
        assert_eq!(go_der_string("a@b"), "0c03614062");
        assert_eq!(der_len(0x7f), vec![0x7f]);
        assert_eq!(der_len(0x80), vec![0x81, 0x80]);
        assert_eq!(der_len(0x1234), vec![0x82, 0x12, 0x34]);
    }

    #[test]
    fn redirect_locations_resolve_against_the_request() {
        let base: Uri = "http://h:8080/a/b?x=1".parse().unwrap();
        assert_eq!(join(&base, "/c").unwrap().to_string(), "http://h:8080/c");
        assert_eq!(join(&base, "d").unwrap().to_string(), "http://h:8080/a/d");
        assert_eq!(
            join(&base, "https://other/x").unwrap().to_string(),
            "https://other/x"
        );
    }
}
