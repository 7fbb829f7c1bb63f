//! The agent's one HTTP client: webhooks (checks::actions) and the CLI's
//! reads of a running agent. HTTP/1 over TCP, TLS (rustls, system roots)
//! for `https://`, a deadline for the whole exchange.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri, header};

use crate::checks::kinds::{Io, http1, tls_config, tls_wrap};

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
            tls_wrap(&host, tcp, tls_config(None)?).await?.0
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
