//! TLS and basic auth for every endpoint, configured as Prometheus
//! exporter-toolkit's web-config is (`[web.tls_server_config]` with
//! `cert_file`, `key_file`, `client_auth_type`, `client_ca_file`,
//! `min_version`; `[web.basic_auth_users]` with bcrypt hashes), in the
//! agent's TOML.
//!
//! As in exporter-toolkit, the certificate and key are read again when
//! their files change (checked at most once a second, on a new
//! connection), so a rotated certificate needs no restart; a pair that
//! does not load is logged and the previous one kept. Successful basic-auth
//! checks are cached (by a SHA-256 of user, password and hash), because
//! bcrypt is slow on purpose and Prometheus scrapes with the same
//! credentials every time.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};

use crate::config::{Choice, ClientAuth, Diagnostics, TlsServerConfig, TlsVersion, Word};

/// `[web.tls_server_config]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_auth_type: ClientAuth,
    pub client_ca_file: Option<PathBuf>,
    /// TLS12 (the default) or TLS13.
    pub min_version: TlsVersion,
}

impl TlsSettings {
    /// `[web.tls_server_config]`, checked and loaded once, so a bad file is
    /// a config error with a place; problems go to `d`.
    pub fn from_config(t: &TlsServerConfig, d: &mut Diagnostics) -> Option<Self> {
        let kind = match &t.client_auth_type {
            None => ClientAuth::NoClientCert,
            Some(k) => match k.get_ref() {
                Choice::Known(k) => *k,
                Choice::Unknown(w) => {
                    d.at(
                        k.span(),
                        format!(
                            "client_auth_type `{w}` is not one of {}",
                            ClientAuth::list(", ")
                        ),
                    );
                    return None;
                }
            },
        };
        if kind != ClientAuth::NoClientCert && t.client_ca_file.is_none() {
            let span = t.client_auth_type.as_ref().map_or(0..0, |k| k.span());
            d.at(
                span,
                format!("client_auth_type {kind} needs client_ca_file"),
            );
            return None;
        }
        let min = match &t.min_version {
            None => TlsVersion::Tls12,
            Some(v) => match v.get_ref() {
                Choice::Known(v) => *v,
                Choice::Unknown(w) => {
                    d.at(
                        v.span(),
                        format!("min_version `{w}` is not {}", TlsVersion::list(" or ")),
                    );
                    return None;
                }
            },
        };
        let settings = TlsSettings {
            cert_file: t.cert_file.get_ref().clone(),
            key_file: t.key_file.get_ref().clone(),
            client_auth_type: kind,
            client_ca_file: t.client_ca_file.as_ref().map(|f| f.get_ref().clone()),
            min_version: min,
        };
        match server_config(&settings) {
            Ok(_) => Some(settings),
            Err(e) => {
                let file =
                    |f: &toml::Spanned<PathBuf>| e.contains(&f.get_ref().display().to_string());
                let span = if file(&t.key_file) && !file(&t.cert_file) {
                    t.key_file.span()
                } else if t.client_ca_file.as_ref().is_some_and(file) {
                    t.client_ca_file.as_ref().map_or(0..0, |f| f.span())
                } else {
                    t.cert_file.span()
                };
                d.at(span, format!("web.tls_server_config: {e}"));
                None
            }
        }
    }
}

/// `[web.basic_auth_users]`: user → bcrypt hash; a value that is not a
/// bcrypt hash is a problem in `d`.
pub fn users_from_config(
    users: &BTreeMap<String, toml::Spanned<String>>,
    d: &mut Diagnostics,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (user, hash) in users {
        if valid_hash(hash.get_ref()) {
            out.insert(user.clone(), hash.get_ref().clone());
        } else {
            d.at(
                hash.span(),
                format!(
                    "basic_auth_users.{user}: not a bcrypt hash (make one with `netpulse config hash-password`)"
                ),
            );
        }
    }
    out
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate chain and key in two PEM files, ready to serve.
fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate", cert.display()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let ck = CertifiedKey::from_der(chain, key_der, &provider())
        .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))?;
    Ok(Arc::new(ck))
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Serves the pair in the files, reloading it when they change.
#[derive(Debug)]
struct Rotating {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
    current: Arc<CertifiedKey>,
}

impl ResolvesServerCert for Rotating {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.checked.elapsed() >= Duration::from_secs(1) {
            s.checked = Instant::now();
            let stamps = (mtime(&self.cert), mtime(&self.key));
            if stamps != s.stamps {
                match load_pair(&self.cert, &self.key) {
                    Ok(ck) => {
                        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                        s.current = ck;
                        s.stamps = stamps;
                    }
                    // Mid-rotation (one file written, not the other) or
                    // broken: keep serving the old pair, try again later.
                    Err(e) => tracing::warn!(error = %e, "TLS certificate not reloaded"),
                }
            }
        }
        Some(s.current.clone())
    }
}

/// The server side of `[web.tls_server_config]`.
pub fn server_config(t: &TlsSettings) -> Result<Arc<ServerConfig>, String> {
    let current = load_pair(&t.cert_file, &t.key_file)?;
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version {
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?;
    let builder = match (t.client_auth_type, &t.client_ca_file) {
        (ClientAuth::NoClientCert, _) => builder.with_no_client_auth(),
        (kind, Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in
                CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))?
            {
                let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
                roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let v = if kind == ClientAuth::VerifyClientCertIfGiven {
                v.allow_unauthenticated()
            } else {
                v
            };
            builder.with_client_cert_verifier(v.build().map_err(|e| e.to_string())?)
        }
        (kind, None) => return Err(format!("client_auth_type {kind} needs client_ca_file")),
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(Rotating {
        cert: t.cert_file.clone(),
        key: t.key_file.clone(),
        state: Mutex::new(Loaded {
            stamps: (mtime(&t.cert_file), mtime(&t.key_file)),
            checked: Instant::now(),
            current,
        }),
    }));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A bcrypt hash no password matches, checked against for unknown users
/// so they take as long to refuse as known ones.
const DUMMY_HASH: &str = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi";
/// Successful checks remembered, at most (then the cache starts over).
const CACHE_MAX: usize = 1024;

/// `[web.basic_auth_users]`: user → bcrypt hash.
#[derive(Debug, Default)]
pub struct Users {
    hashes: BTreeMap<String, String>,
    ok: Mutex<HashSet<[u8; 32]>>,
}

impl Users {
    pub fn new(hashes: BTreeMap<String, String>) -> Self {
        Users {
            hashes,
            ok: Mutex::new(HashSet::new()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Whether `user` may in with `password`. Slow (bcrypt) unless the
    /// same pair passed before: call it off the async threads.
    pub fn check(&self, user: &str, password: &str) -> bool {
        let hash = self.hashes.get(user);
        let key = {
            let mut d = ring::digest::Context::new(&ring::digest::SHA256);
            for part in [user, "\0", password, "\0", hash.map_or("", String::as_str)] {
                d.update(part.as_bytes());
            }
            let mut k = [0u8; 32];
            k.copy_from_slice(d.finish().as_ref());
            k
        };
        let cached = self.lock().contains(&key);
        if cached {
            return true;
        }
        let ok = match hash {
            Some(h) => bcrypt::verify(password, h).unwrap_or(false),
            None => {
                let _ = bcrypt::verify(password, DUMMY_HASH);
                false
            }
        };
        if ok {
            let mut c = self.lock();
            if c.len() >= CACHE_MAX {
                c.clear();
            }
            c.insert(key);
        }
        ok
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
        self.ok.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `hash` is a bcrypt hash (`$2a$`, `$2b$`, `$2y$`).
pub fn valid_hash(hash: &str) -> bool {
    bcrypt::verify("", hash).is_ok()
}

/// A bcrypt hash of `password` for `[web.basic_auth_users]` (cost 10, as
/// exporter-toolkit's documentation suggests).
pub fn hash(password: &str) -> Result<String, String> {
    bcrypt::hash(password, 10).map_err(|e| e.to_string())
}

/// The user and password of an `Authorization: Basic` value.
pub fn basic_credentials(header: &str) -> Option<(String, String)> {
    use base64::Engine;
    let b64 = header.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_users_and_the_cache() {
        let h = hash("s3cret-pass").unwrap();
        assert!(valid_hash(&h) && valid_hash(DUMMY_HASH));
        assert!(!valid_hash("plaintext"));
        let users = Users::new(BTreeMap::from([("alice".to_string(), h)]));
        assert!(users.check("alice", "s3cret-pass"));
        // Cached now, and still right.
        assert!(users.check("alice", "s3cret-pass"));
        assert!(!users.check("alice", "wrong"));
        assert!(!users.check("bob", "s3cret-pass"));
        assert!(!users.check("alice", ""));
    }

    #[test]
    fn basic_header() {
        // "alice:pa:ss" — a password may hold colons.
        assert_eq!(
            basic_credentials("Basic YWxpY2U6cGE6c3M="),
            Some(("alice".into(), "pa:ss".into()))
        );
        assert_eq!(basic_credentials("Bearer x"), None);
        assert_eq!(basic_credentials("Basic !!!"), None);
    }
}
