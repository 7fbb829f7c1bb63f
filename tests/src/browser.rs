//! Headless Chromium (Debian's chromium and chromium-driver), driven over
//! WebDriver from inside a network namespace: chromedriver is started there
//! by pid and ended by pid, with a fresh profile that is removed after.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    netns::{Netns, have, run_in},
    scrape::send,
};

pub const CHROMIUM: &str = "/usr/bin/chromium";

/// chromium and chromedriver are installed (`cargo xtask setup`).
pub fn prerequisites() -> bool {
    crate::require(
        "chromium and chromedriver (apt: chromium chromium-driver)",
        Path::new(CHROMIUM).exists() && have("chromedriver"),
    )
}

pub struct Browser {
    driver: Child,
    ns: String,
    port: u16,
    session: String,
    profile: PathBuf,
}

impl Browser {
    /// chromedriver on 127.0.0.1:`port` inside `ns`, and one headless
    /// session with the browser's console log kept.
    pub fn start(ns: &Netns, port: u16) -> Browser {
        let profile =
            std::env::temp_dir().join(format!("netpulse-chromium-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let driver = Command::new("ip")
            .args(["netns", "exec", &ns.name, "chromedriver"])
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut b = Browser {
            driver,
            ns: ns.name.clone(),
            port,
            session: String::new(),
            profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while b.try_call("GET", "/status", None).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The flags a closed network needs: no background fetches, no
        // component updates, no sync (they would only log errors here).
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1200,900",
                    format!("--user-data-dir={}", b.profile.display()),
                ],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        }}});
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        b
    }

    fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> std::io::Result<Value> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let (method, path) = (method.to_string(), path.to_string());
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, text) = run_in(&self.ns, move || {
            send(
                addr,
                &method,
                &path,
                &[("Content-Type", "application/json")],
                &body,
            )
        })?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status != 200 {
            return Err(std::io::Error::other(format!("{status}: {text}")));
        }
        Ok(v["value"].clone())
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    fn s(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub fn goto(&self, url: &str) {
        self.call("POST", &self.s("/url"), Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            &self.s("/execute/sync"),
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// Evaluates `script` until it returns true; how long that took.
    pub fn wait_for(&self, what: &str, script: &str, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if self.eval(script) == Value::Bool(true) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "the page did not show {what} within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The console's entries since the last call (level, message).
    pub fn console(&self) -> Vec<(String, String)> {
        self.call(
            "POST",
            &self.s("/se/log"),
            Some(json!({ "type": "browser" })),
        )
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            (
                e["level"].as_str().unwrap_or("").to_string(),
                e["message"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
    }

    pub fn resize(&self, width: u32, height: u32) {
        self.call(
            "POST",
            &self.s("/window/rect"),
            Some(json!({ "width": width, "height": height })),
        );
    }

    /// A Chrome DevTools command, through chromedriver.
    pub fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.call(
            "POST",
            &self.s("/goog/cdp/execute"),
            Some(json!({ "cmd": cmd, "params": params })),
        )
    }

    /// Saves a PNG of the viewport to `path`.
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let b64 = self.call("GET", &self.s("/screenshot"), None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("screenshot is base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.try_call("DELETE", &self.s(""), None);
        }
        // SAFETY: signalling the chromedriver we spawned (`ip netns exec`
        // execs it, so the pid is chromedriver's).
        unsafe { libc::kill(self.driver.id() as i32, libc::SIGTERM) };
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
