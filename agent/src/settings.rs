//! The config, loaded and built: `config`'s data, and what each domain
//! builds from its part (checks, capture limits, TLS, basic-auth users),
//! with every problem of every part reported at once, in file order, the
//! way `config` reports its own. `netpulse config check`, `netpulse check
//! run`, `netpulse run` and its SIGHUP reload all load through here.

use std::{collections::BTreeMap, ops::Deref, path::Path};

use crate::config::{self, ConfigError, Diagnostics};

/// A config that parsed, validated and built. Derefs to config's data
/// (`raw`, `services`, `hooks`, `listen`, ...).
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: config::Loaded,
    pub checks: Vec<crate::checks::Spec>,
    /// `[capture]`: the capture folder's limits.
    pub capture: crate::capture::Settings,
    /// `[web.tls_server_config]`, validated (its files loaded once).
    pub tls: Option<crate::websec::TlsSettings>,
    /// `[web.basic_auth_users]`: user → bcrypt hash.
    pub basic_auth_users: BTreeMap<String, String>,
}

impl Deref for Settings {
    type Target = config::Loaded;

    fn deref(&self) -> &config::Loaded {
        &self.config
    }
}

/// Reads, validates and builds `path`; `None` runs the embedded defaults.
pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
    let src = config::read(path)?;
    let mut s = parse(&src.text, &src.path)?;
    s.config.source = src.file;
    Ok(s)
}

/// Parses, validates and builds `text`, named `path` in messages.
pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
    let raw = config::deserialize(text, path)?;
    let mut d = Diagnostics::new(text);
    crate::metrics::check_config(&raw.agent, &mut d);
    let checks = crate::checks::from_config(&raw.checks, &mut d);
    let capture = crate::capture::Settings::from_config(&raw.capture);
    let tls = raw
        .web
        .tls_server_config
        .as_ref()
        .and_then(|t| crate::websec::TlsSettings::from_config(t, &mut d));
    let basic_auth_users = crate::websec::users_from_config(&raw.web.basic_auth_users, &mut d);
    let loaded = config::validate(raw, &mut d);
    d.finish(path)?;
    let mut config = loaded.ok_or_else(|| ConfigError::Invalid {
        path: path.to_path_buf(),
        problems: Vec::new(),
    })?;
    config.source = Some(path.to_path_buf());
    Ok(Settings {
        config,
        checks,
        capture,
        tls,
        basic_auth_users,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::DEFAULT_LISTEN;

    fn errs(text: &str) -> Vec<String> {
        match parse(text, Path::new("c.toml")) {
            Ok(_) => Vec::new(),
            Err(e) => e.to_string().lines().map(str::to_string).collect(),
        }
    }

    #[test]
    fn checks_parse_with_defaults() {
        let l = parse(
            r#"
[[check]]
name = "web"
kind = "http"
target = "https://example.invalid:8443/healthz"
expect_status = [200, "300-399"]
body_contains = "ok"
[[check]]
name = "db"
kind = "tcp"
target = "[::1]:5432"
interval_seconds = 5
[[check]]
name = "dns"
kind = "dns"
target = "example.invalid"
query_type = "aaaa"
server = "127.0.0.1:5353"
depends_on = ["db"]
"#,
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(l.checks.len(), 3);
        let web = &l.checks[0];
        assert_eq!(web.interval, Duration::from_secs(30));
        assert_eq!(web.timeout, Duration::from_secs(10));
        match &web.kind {
            crate::checks::Kind::Http(h) => {
                assert_eq!(h.expect_status, vec![200..=200, 300..=399]);
                assert_eq!(h.max_redirects, 5);
            }
            k => panic!("{k:?}"),
        }
        let db = &l.checks[1];
        assert_eq!(
            db.timeout,
            Duration::from_secs(5),
            "timeout defaults to at most the interval"
        );
        assert_eq!(db.target(), "::1:5432");
        assert_eq!(l.checks[2].depends_on, ["db"]);
    }

    #[test]
    fn check_mistakes_are_named_with_their_place() {
        let e = errs(
            r#"
[[check]]
name = "a"
kind = "http"
target = "ftp://x/"
send = "PING"
[[check]]
name = "b"
kind = "tcp"
target = "nohost"
depends_on = ["nope"]
[[check]]
name = "c"
kind = "smtp"
target = "x"
"#,
        );
        assert_eq!(e.len(), 5, "{e:?}");
        assert!(
            e.iter()
                .any(|l| l.starts_with("c.toml:5:10:")
                    && l.contains("not an http:// or https:// URL")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("c.toml:4:8:") && l.contains("`send` applies to kind tcp")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("c.toml:10:10:") && l.contains("not host:port")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("c.toml:11:15:") && l.contains("depends on `nope`")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("c.toml:14:8:") && l.contains("kind `smtp`")),
            "{e:?}"
        );
    }

    #[test]
    fn a_dependency_cycle_is_refused_and_named() {
        let e = errs(
            r#"
[[check]]
name = "a"
kind = "tcp"
target = "h:1"
depends_on = ["b"]
[[check]]
name = "b"
kind = "tcp"
target = "h:2"
depends_on = ["a"]
"#,
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("c.toml:3:8:"), "{e:?}");
        assert!(e[0].contains("cycle: a -> b -> a"), "{e:?}");
    }

    #[test]
    fn hooks_actions_and_the_token_are_checked() {
        let e = errs(
            r#"
[api]
token = "short"
[[check]]
name = "a"
kind = "tcp"
target = "h:1"
actions = [{ kind = "exec" }, { kind = "webhook", url = "ftp://x" }, { kind = "restart_container", container = "c", after = 0 }]
[[hook]]
name = "deploy"
checks = ["a", "b"]
"#,
        );
        assert_eq!(e.len(), 5, "{e:?}");
        assert!(e[0].contains("api.token is shorter than 16"), "{e:?}");
        assert!(
            e.iter().any(|l| l.contains("there is no exec action")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|l| l.contains("`ftp://x` is not an http")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|l| l.contains("after = 0 is out of range")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.contains("hook `deploy` names `b`, which is not a check")),
            "{e:?}"
        );
    }

    /// The fuzz seeds (and any crash input kept as a regression) parse to
    /// Ok or to located errors, without panicking.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let bytes = std::fs::read(e.path()).unwrap();
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = parse(text, &e.path());
                n += 1;
            }
        }
        assert!(n >= 3, "seed corpus missing in {}", dir.display());
    }

    #[test]
    fn out_of_range_durations_and_budget_are_located() {
        let e = errs("[agent]\nrefresh_seconds = 1e-10\nretire_seconds = inf\nmax_series = 3\n");
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].starts_with("c.toml:2:19:") && e[0].contains("refresh_seconds"),
            "{e:?}"
        );
        assert!(
            e[1].starts_with("c.toml:3:18:") && e[1].contains("retire_seconds"),
            "{e:?}"
        );
        assert!(
            e[2].starts_with("c.toml:4:14:") && e[2].contains("max_series"),
            "{e:?}"
        );
    }

    #[test]
    fn map_top_k_out_of_range_is_located() {
        let e = errs("[agent]\nmap_top_k = 0\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("c.toml:2:13:") && e[0].contains("map_top_k"),
            "{e:?}"
        );
        assert!(errs("[agent]\nmap_top_k = 5\n").is_empty());
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../systemd/config.toml");
        let l = parse(text, Path::new("systemd/config.toml")).unwrap();
        assert_eq!(l.listen, DEFAULT_LISTEN.parse().unwrap());
    }

    #[test]
    fn unknown_words_are_named_with_their_place_and_the_choices() {
        let e = errs(
            r#"
[[check]]
name = "a"
kind = "http"
target = "http://x/"
method = "FETCH"
[[check]]
name = "b"
kind = "dns"
target = "example.invalid"
query_type = "ANY"
[[check]]
name = "c"
kind = "tcp"
target = "h:1"
actions = [{ kind = "page", url = "http://x/" }]
"#,
        );
        assert_eq!(
            e,
            [
                "c.toml:6:10: `FETCH` is not an HTTP method (one of GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE, CONNECT)",
                "c.toml:11:14: `ANY` is not a DNS record type (one of A, AAAA, CAA, CNAME, DNSKEY, DS, HTTPS, MX, NAPTR, NS, PTR, SOA, SRV, SSHFP, SVCB, TLSA, TXT)",
                "c.toml:16:21: action `page` is not one of webhook, restart_container, capture",
            ]
        );
    }

    #[test]
    fn tls_words_are_checked_before_any_file_is_read() {
        let e = errs(
            "[web.tls_server_config]\ncert_file = \"/nope/c.pem\"\nkey_file = \"/nope/k.pem\"\nmin_version = \"TLS11\"\n",
        );
        assert_eq!(
            e,
            ["c.toml:4:15: min_version `TLS11` is not TLS12 or TLS13"]
        );
        let e = errs(
            "[web.tls_server_config]\ncert_file = \"/nope/c.pem\"\nkey_file = \"/nope/k.pem\"\nclient_auth_type = \"RequireAndVerifyClientCert\"\n",
        );
        assert_eq!(
            e,
            ["c.toml:4:20: client_auth_type RequireAndVerifyClientCert needs client_ca_file"]
        );
    }

    #[test]
    fn the_embedded_default_has_no_file_and_builds_nothing() {
        let s = load(None).unwrap();
        assert_eq!(s.source, None);
        assert_eq!(s.listen, DEFAULT_LISTEN.parse().unwrap());
        assert!(s.checks.is_empty() && s.tls.is_none() && s.basic_auth_users.is_empty());
        assert_eq!(s.capture.max_disk_bytes, 512_000_000);
    }
}
