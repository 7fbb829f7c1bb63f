//! The agent's one HTTP client: webhooks (checks::actions) and the CLI's
//! reads of a running agent. HTTP/1 over TCP, TLS (rustls, system roots)
//! for `https://`, a deadline for the whole exchange. The TLS and HTTP/1
//! pieces here are also what the checks and /probe connect with.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri, header};

use std::sync::{Arc, OnceLock};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One request to `url`; the status and the whole body. Errors name the
/// URL and what failed (connecting, TLS, no answer in `timeout`).
pub async fn request(
    method: Method,
    url: &Uri,
    headers: &[(header::HeaderName, String)],
    body: Option<(&str, Bytes)>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    let https = match url.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(format!(
                "{url}: only http:// and https:// URLs are supported"
            ));
        }
    };
    let host = url
        .host()
        .ok_or_else(|| format!("{url}: no host"))?
        .to_string();
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let fut = async {
        let tcp = tokio::net::TcpStream::connect((
            host.trim_start_matches('[').trim_end_matches(']'),
            port,
        ))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let stream: Box<dyn Io> = if https {
            Box::new(tls_connect(&host, tcp, tls_config(None)?).await?)
        } else {
            Box::new(tcp)
        };
        let (mut sender, driver) = http1(stream).await?;
        let mut req = Request::builder()
            .method(method)
            .uri(url.path_and_query().map_or("/", |p| p.as_str()))
            .header(
                header::HOST,
                url.authority().map_or(host.clone(), |a| a.to_string()),
            )
            .header(
                header::USER_AGENT,
                concat!("netpulse/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let req = match body {
            Some((ctype, b)) => req.header(header::CONTENT_TYPE, ctype).body(Full::new(b)),
            None => req.body(Full::new(Bytes::new())),
        }
        .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        driver.abort();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
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
                note_anchor(&cert);
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
                note_anchor(&cert);
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

/// The trust anchors' notAfter (Unix seconds) by subject (DER): a trust
/// store keeps no dates, and the verified chain's expiry
/// (probe_ssl_last_chain_expiry_timestamp_seconds) includes its root's.
/// The latest per subject, as blackbox_exporter takes the latest of the
/// chains it verified.
pub(crate) fn anchors() -> &'static std::sync::Mutex<std::collections::HashMap<Vec<u8>, i64>> {
    static ANCHORS: OnceLock<std::sync::Mutex<std::collections::HashMap<Vec<u8>, i64>>> =
        OnceLock::new();
    ANCHORS.get_or_init(Default::default)
}

fn note_anchor(der: &[u8]) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return;
    };
    let t = cert.validity().not_after.timestamp();
    let mut map = anchors().lock().unwrap_or_else(|e| e.into_inner());
    let e = map.entry(cert.subject().as_raw().to_vec()).or_insert(t);
    *e = (*e).max(t);
}

/// TLS over `tcp` to `host` (a name or an address, brackets allowed).
pub(crate) async fn tls_connect(
    host: &str,
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let name = rustls_pki_types::ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
    .map_err(|e| format!("TLS server name `{host}`: {e}"))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {host}: {e}"))
}

// --- HTTP/1 ------------------------------------------------------------

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
