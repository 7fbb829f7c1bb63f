//! One run of one check, by kind: HTTP(S) with per-phase timings, TCP
//! connect (with optional send/expect), DNS over UDP, ICMP echo over a raw
//! socket. Each returns an [`Outcome`]; nothing here panics or retries (the
//! scheduler retries).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, OnceLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, Uri, header};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{DnsSpec, HttpSpec, Kind, Spec, TcpSpec};

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
    let fut = async {
        match &spec.kind {
            Kind::Http(h) => http(h, started).await,
            Kind::Tcp(t) => tcp(t, started).await,
            Kind::Dns(d) => dns(d, started).await,
            // Its own deadline inside the run's, so a silent host is
            // reported as such rather than as a timeout.
            Kind::Icmp { host } => icmp(host, spec.timeout.mul_f64(0.9), started).await,
        }
    };
    match tokio::time::timeout(spec.timeout, fut).await {
        Ok(o) => o,
        Err(_) => Outcome::fail(
            format!("timed out after {:.1} s", spec.timeout.as_secs_f64()),
            started,
        ),
    }
}

/// Resolves `host:port`: an address literal as is, a name through the
/// system resolver. All addresses, in the resolver's order.
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
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

/// Connects to the first address that answers.
async fn connect(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut last = String::from("no address");
    for a in addrs {
        match TcpStream::connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("connecting to {a}: {e}"),
        }
    }
    Err(last)
}

// --- TLS ---------------------------------------------------------------

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system's trust anchors (/etc/ssl/certs), read once.
fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = store.add(cert);
            }
            Arc::new(store)
        })
        .clone()
}

/// The client config for a check: the system roots, or the check's own
/// CA file.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    // The common case, built once: every check and /probe without a CA
    // file of its own shares it.
    static SYSTEM: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    if ca_file.is_none()
        && let Some(c) = SYSTEM.get()
    {
        return Ok(c.clone());
    }
    let roots = match ca_file {
        None => system_roots(),
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut store = rustls::RootCertStore::empty();
            let mut n = 0;
            for cert in <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                store
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!("{}: no PEM certificate", path.display()));
            }
            Arc::new(store)
        }
    };
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let cfg = Arc::new(cfg);
    if ca_file.is_none() {
        return Ok(SYSTEM.get_or_init(|| cfg).clone());
    }
    Ok(cfg)
}

/// notAfter of a DER certificate.
fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let t = cert.validity().not_after.timestamp();
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(t).ok()?))
}

// --- HTTP --------------------------------------------------------------

/// TLS over `tcp` to `host`; the stream and the earliest expiry of the
/// chain the server sent (as blackbox_exporter's
/// probe_ssl_earliest_cert_expiry).
pub(crate) async fn tls_wrap(
    host: &str,
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
) -> Result<(Box<dyn Io>, Option<SystemTime>), String> {
    let name = rustls_pki_types::ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
    .map_err(|e| format!("TLS server name `{host}`: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {host}: {e}"))?;
    let expiry = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.iter().filter_map(|c| not_after(c)).min());
    Ok((Box::new(tls), expiry))
}

/// An HTTP/1 client connection over `stream`, its driver spawned (abort
/// it when done).
pub(crate) async fn http1<B>(
    stream: Box<dyn Io>,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<B>,
        tokio::task::JoinHandle<()>,
    ),
    String,
>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, driver))
}

pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

async fn http(spec: &HttpSpec, started: Instant) -> Outcome {
    let mut uri = spec.url.clone();
    let mut out = Outcome::default();
    let mut redirects = 0;
    loop {
        match http_once(spec, &uri, &mut out).await {
            Err(e) => return Outcome::fail(e, started),
            Ok((status, location, body)) => {
                let is_redirect = matches!(status, 301 | 302 | 303 | 307 | 308);
                if is_redirect && let Some(loc) = location {
                    if redirects >= spec.max_redirects {
                        return Outcome::fail(
                            format!("more than {} redirects", spec.max_redirects),
                            started,
                        );
                    }
                    redirects += 1;
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
                out.error = judge_http(spec, status, &body, out.duration, out.cert_expiry);
                out.ok = out.error.is_none();
                return out;
            }
        }
    }
}

/// Why an HTTP answer fails the check, if it does.
fn judge_http(
    spec: &HttpSpec,
    status: u16,
    body: &[u8],
    took: Duration,
    expiry: Option<SystemTime>,
) -> Option<String> {
    if !spec.expect_status.iter().any(|r| r.contains(&status)) {
        return Some(format!(
            "status {status}, expected {}",
            spec.expect_status_text()
        ));
    }
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
    if let Some(max) = spec.max_latency
        && took > max
    {
        return Some(format!(
            "took {:.3} s, more than the {:.3} s allowed",
            took.as_secs_f64(),
            max.as_secs_f64()
        ));
    }
    if let (Some(min), Some(exp)) = (spec.cert_min_valid, expiry) {
        let left = exp.duration_since(SystemTime::now()).unwrap_or_default();
        if left < min {
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

/// One request: (status, Location, body). Fills the phases of `out`.
async fn http_once(
    spec: &HttpSpec,
    uri: &Uri,
    out: &mut Outcome,
) -> Result<(u16, Option<String>, Bytes), String> {
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        other => return Err(format!("unsupported URL scheme {other:?}")),
    };
    let host = uri.host().ok_or("URL without a host")?.to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    out.phases.clear();
    let t = Instant::now();
    let addrs = resolve(&host, port).await?;
    out.phases.push(("dns", t.elapsed()));
    let t = Instant::now();
    let tcp = connect(&addrs).await?;
    out.phases.push(("connect", t.elapsed()));
    let t = Instant::now();
    let stream: Box<dyn Io> = if https {
        let (tls, expiry) = tls_wrap(&host, tcp, spec.tls.clone()).await?;
        out.cert_expiry = expiry;
        out.phases.push(("tls", t.elapsed()));
        tls
    } else {
        Box::new(tcp)
    };
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
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP request: {e}"))?;
    out.phases.push(("first_byte", t.elapsed()));
    let t = Instant::now();
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    out.phases.push(("transfer", t.elapsed()));
    driver.abort();
    Ok((status, location, body))
}

// --- TCP ---------------------------------------------------------------

async fn tcp(spec: &TcpSpec, started: Instant) -> Outcome {
    let mut out = Outcome::default();
    let r = async {
        let t = Instant::now();
        let addrs = resolve(&spec.host, spec.port).await?;
        out.phases.push(("dns", t.elapsed()));
        let t = Instant::now();
        let mut s = connect(&addrs).await?;
        out.phases.push(("connect", t.elapsed()));
        if let Some(send) = &spec.send {
            s.write_all(send.as_bytes())
                .await
                .map_err(|e| format!("sending: {e}"))?;
        }
        if let Some(want) = &spec.expect {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                if String::from_utf8_lossy(&got).contains(want.as_str()) {
                    break;
                }
                let n = s
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("reading: {e}"))?;
                if n == 0 || got.len() > MAX_TCP_READ {
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
fn system_nameserver() -> Result<SocketAddr, String> {
    let text = std::fs::read_to_string("/etc/resolv.conf")
        .map_err(|e| format!("/etc/resolv.conf: {e}"))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .ok_or_else(|| "/etc/resolv.conf names no nameserver".to_string())
}

async fn dns(spec: &DnsSpec, started: Instant) -> Outcome {
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    let r = async {
        let server = match spec.server {
            Some(s) => s,
            None => system_nameserver()?,
        };
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
        sock.connect(server)
            .await
            .map_err(|e| format!("{server}: {e}"))?;
        sock.send(&bytes)
            .await
            .map_err(|e| format!("sending to {server}: {e}"))?;
        let mut buf = vec![0u8; 4096];
        let answer = loop {
            let n = sock
                .recv(&mut buf)
                .await
                .map_err(|e| format!("from {server}: {e}"))?;
            let Ok(m) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if m.metadata.id == id {
                break m;
            }
        };
        if answer.metadata.response_code != ResponseCode::NoError {
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
            return Err(format!(
                "{server} has no {} record for {}",
                spec.record_type, spec.name
            ));
        }
        if let Some(want) = &spec.expect
            && !records.iter().any(|r| r.contains(want.as_str()))
        {
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

async fn icmp(host: &str, timeout: Duration, started: Instant) -> Outcome {
    let r = async {
        let addr = resolve(host, 0).await?[0].ip();
        tokio::task::spawn_blocking(move || echo(addr, timeout))
            .await
            .map_err(|e| format!("ICMP task: {e}"))?
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
/// socket (blocking: run it off the async threads).
fn echo(addr: IpAddr, timeout: Duration) -> Result<(), String> {
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
    let deadline = Instant::now() + timeout;
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
    sock.send_to(&packet, &socket2::SockAddr::from(SocketAddr::new(addr, 0)))
        .map_err(|e| format!("sending an echo request to {addr}: {e}"))?;
    let silent = || {
        format!(
            "no echo reply from {addr} within {:.1} s",
            timeout.as_secs_f64()
        )
    };
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(silent());
        }
        sock.set_read_timeout(Some(left))
            .map_err(|e| format!("raw ICMP socket: {e}"))?;
        let (n, from) = match sock.recv_from(&mut buf) {
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
        if from.as_socket().map(|s| s.ip()) != Some(addr) {
            continue;
        }
        // SAFETY: recv_from initialised the first n bytes.
        let bytes: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        let reply = match addr {
            // A raw IPv4 socket hands over the IP header too.
            IpAddr::V4(_) => etherparse::Ipv4Slice::from_slice(&bytes)
                .ok()
                .and_then(|ip| etherparse::Icmpv4Slice::from_slice(ip.payload().payload).ok())
                .and_then(|icmp| match icmp.icmp_type() {
                    etherparse::Icmpv4Type::EchoReply(h) => Some(h),
                    _ => None,
                }),
            IpAddr::V6(_) => {
                (bytes.len() >= 8 && bytes[0] == 129).then(|| etherparse::IcmpEchoHeader {
                    id: u16::from_be_bytes([bytes[4], bytes[5]]),
                    seq: u16::from_be_bytes([bytes[6], bytes[7]]),
                })
            }
        };
        if reply.is_some_and(|h| h.id == id && h.seq == seq) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
