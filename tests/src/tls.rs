//! An HTTPS server for the check and /probe tests: rustls (ring) with the
//! certificate a test made (rcgen), a thread per connection; the request
//! head goes to the test's handler, whose answer is sent, then close_notify.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    sync::Arc,
    time::Duration,
};

/// Serves on 127.0.0.1 (a free port) with `cert` and its `key` (DER) until
/// the test process ends. `answer(head, out)` writes the whole response for
/// a request head (up to the blank line).
pub fn serve(
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    answer: impl Fn(&[u8], &mut Vec<u8>) + Send + Sync + 'static,
) -> SocketAddr {
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("the test's certificate"),
    );
    let answer = Arc::new(answer);
    let l = TcpListener::bind("127.0.0.1:0").expect("bind the HTTPS server");
    let addr = l.local_addr().expect("its address");
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let (config, answer) = (config.clone(), answer.clone());
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(conn, s);
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    match tls.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let mut out = Vec::new();
                answer(&head, &mut out);
                let _ = tls.write_all(&out);
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    addr
}
