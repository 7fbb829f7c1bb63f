//! The JSON API, the status page's assets and the badges, through the
//! agent's real router (tower's `oneshot`, no socket) over a real probe:
//! counters come from frames run through the XDP program in the kernel.
//! The OpenAPI document is held to the routes in both directions.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::Arc,
    time::Instant,
};

use axum::{
    body::Body,
    http::{Method, Request, StatusCode, header},
};
use http_body_util::BodyExt;
use netpulse::{
    checks::{engine::Engine, kinds::Outcome},
    identity,
    identity::Identity,
    probe::{Hook, Probe},
    settings,
    state::{AppState, Datapath, Reloadable},
    store::Store,
    web,
};
use netpulse_tests::{
    PinDir,
    frames::{ETH_IPV4, TCP_SYN, eth, ipv4, tcp},
    is_root, require,
};
use serde_json::Value;
use tower::ServiceExt;

const CONFIG: &str = r#"
[[service]]
name = "web"
endpoints = [{ proto = "tcp", port = 19530 }]

[[service]]
name = "db"
endpoints = [{ proto = "tcp", port = 19531 }]

[[check]]
name = "web-tcp"
kind = "tcp"
target = "127.0.0.1:19530"
service = "web"
tags = ["edge"]
failure_threshold = 1

[[check]]
name = "web-page"
kind = "http"
target = "http://127.0.0.1:19530/"
service = "web"
"#;

const PROTO_TCP: u8 = 6;

struct Fx {
    state: AppState,
    _pins: PinDir,
    dir: std::path::PathBuf,
}

impl Drop for Fx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An agent's state as `netpulse run` builds it, on a real probe, with a
/// store when `with_store`.
fn fixture(tag: &str, with_store: bool) -> Option<Fx> {
    if !require("root (CAP_BPF) for the probe", is_root()) {
        return None;
    }
    let pins = PinDir::new(&format!("api-{tag}"));
    let dir = std::env::temp_dir().join(format!("netpulse-api-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = settings::parse(CONFIG, Path::new("api.toml")).expect("test config");
    let mut probe = Probe::load(pins.path()).expect("load the eBPF object");
    let want = identity::desired(&identity::Sources {
        config: &cfg.services,
        listeners: &[],
        owners: &HashMap::new(),
        containers: &[],
        labels: &[],
    });
    let mut id = Identity::restore(&probe, std::time::Duration::from_secs(60)).unwrap();
    id.apply(&mut probe, &want, Instant::now()).unwrap();
    let store = with_store.then(|| Arc::new(Store::open(&dir).expect("store")));
    let state = AppState::new(
        Datapath::new(probe, id).unwrap(),
        Reloadable {
            max_series: 10_000,
            capture: cfg.capture,
            ..Default::default()
        },
        Engine::new(
            cfg.checks.clone(),
            4,
            Default::default(),
            Default::default(),
        ),
        store,
    );
    Some(Fx {
        state,
        _pins: pins,
        dir,
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One request through the router: (status, content type, body).
fn call(fx: &Fx, method: Method, uri: &str) -> (StatusCode, String, Vec<u8>) {
    let app = web::router(fx.state.clone());
    rt().block_on(async {
        let resp = app
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, ctype, body)
    })
}

fn json(fx: &Fx, uri: &str) -> (StatusCode, Value) {
    let (status, ctype, body) = call(fx, Method::GET, uri);
    assert!(
        ctype.starts_with("application/json"),
        "{uri}: content type {ctype}"
    );
    (status, serde_json::from_slice(&body).unwrap())
}

fn record(fx: &Fx, check: &str, ok: bool) {
    let checks = fx.state.checks();
    let spec = checks
        .specs()
        .into_iter()
        .find(|s| s.name == check)
        .unwrap();
    checks.record(
        &spec,
        &Outcome {
            ok,
            error: (!ok).then(|| "connection refused".into()),
            ..Default::default()
        },
    );
}

#[test]
fn services_report_exact_counters_checks_and_state() {
    let Some(fx) = fixture("services", true) else {
        return;
    };
    // 3 SYNs to web, as the XDP program sees them on the wire.
    let frame = eth(
        &[],
        ETH_IPV4,
        &ipv4(
            [10, 0, 0, 2],
            [10, 0, 0, 1],
            PROTO_TCP,
            0,
            0,
            &tcp(40000, 19530, TCP_SYN, 5, 10),
        ),
    );
    {
        fx.state.datapath.write(|w| {
            for _ in 0..3 {
                w.probe.test_run(Hook::Xdp, &frame, 0, 1).unwrap();
            }
        });
    }
    let (status, doc) = json(&fx, "/api/v1/services");
    assert_eq!(status, StatusCode::OK);
    let services = doc["services"].as_array().unwrap();
    let names: BTreeSet<&str> = services
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from(["db", "web"]));
    let web = services.iter().find(|s| s["name"] == "web").unwrap();
    assert_eq!(web["source"], "config");
    assert_eq!(web["counters"]["ingress"]["packets"], 3);
    assert_eq!(web["counters"]["ingress"]["bytes"], 3 * frame.len() as u64);
    assert_eq!(web["counters"]["ingress"]["syn"], 3);
    assert_eq!(web["counters"]["egress"]["packets"], 0);
    let checks: BTreeSet<&str> = web["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(checks, BTreeSet::from(["web-page", "web-tcp"]));
    // No check has run: the service's state is unknown, db (no checks,
    // config only) too.
    assert_eq!(web["state"], "unknown");
    let db = services.iter().find(|s| s["name"] == "db").unwrap();
    assert_eq!(db["state"], "unknown");
    assert_eq!(db["checks"].as_array().unwrap().len(), 0);

    // One of web's two checks fails, the other has not run: down; the
    // service read alone is the same object as in the list.
    record(&fx, "web-tcp", false);
    let (status, one) = json(&fx, "/api/v1/services/web");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["state"], "down", "the only check that ran is down");
    assert_eq!(one["counters"], web["counters"]);
    let tcp = one["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "web-tcp")
        .unwrap()
        .clone();
    assert_eq!(tcp["state"], "down");
    // The other one passes: degraded.
    record(&fx, "web-page", true);
    let (_, one) = json(&fx, "/api/v1/services/web");
    assert_eq!(one["state"], "degraded");

    // Badges follow the state.
    let (status, ctype, body) = call(&fx, Method::GET, "/badge/web.svg");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ctype, "image/svg+xml");
    let svg = String::from_utf8(body).unwrap();
    assert!(svg.contains(">web<") && svg.contains(">degraded<"), "{svg}");
    let (status, ctype, body) = call(&fx, Method::GET, "/badge/nope.svg");
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(ctype, "image/svg+xml");
    assert!(String::from_utf8(body).unwrap().contains("not found"));
}

#[test]
fn errors_are_json_with_a_message() {
    let Some(fx) = fixture("errors", false) else {
        return;
    };
    for (uri, code, says) in [
        (
            "/api/v1/services/nope",
            StatusCode::NOT_FOUND,
            "no service named `nope`",
        ),
        (
            "/api/v1/nothing-here",
            StatusCode::NOT_FOUND,
            "no such endpoint: GET /api/v1/nothing-here",
        ),
        (
            "/badge/web.png",
            StatusCode::NOT_FOUND,
            "badges are at /badge/<service>.svg",
        ),
        ("/api/v1/jobs/x", StatusCode::BAD_REQUEST, "not a job id"),
        // No store: jobs are off, and say why.
        (
            "/api/v1/jobs",
            StatusCode::SERVICE_UNAVAILABLE,
            "job store is not available",
        ),
    ] {
        let (status, doc) = json(&fx, uri);
        assert_eq!(status, code, "{uri}: {doc}");
        let msg = doc["error"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{uri}: {msg}");
    }
}

#[test]
fn the_page_is_self_contained() {
    let Some(fx) = fixture("page", false) else {
        return;
    };
    let (status, ctype, body) = call(&fx, Method::GET, "/");
    assert_eq!(status, StatusCode::OK);
    assert!(ctype.starts_with("text/html"));
    let html = String::from_utf8(body).unwrap();
    assert!(html.contains("api/v1/services"));
    // Nothing from elsewhere: no external scripts, styles, fonts or images
    // (the SVG namespace is a name, not a fetch).
    let external: Vec<&str> = html
        .match_indices("http")
        .map(|(i, _)| &html[i..(i + 40).min(html.len())])
        .filter(|s| !s.starts_with("http://www.w3.org/2000/svg"))
        .collect();
    assert!(external.is_empty(), "external references: {external:?}");
    assert!(!html.contains("<script src") && !html.contains("stylesheet"));
}

/// Every route of the router is in the OpenAPI document with its method,
/// and every documented operation reaches a handler (never the 404
/// fallback or a 405).
#[test]
fn the_openapi_document_matches_the_routes() {
    let Some(fx) = fixture("openapi", true) else {
        return;
    };
    let (status, doc) = json(&fx, "/api/v1/openapi.json");
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();

    // The routes as the source declares them: `.route("<path>", get(..))`.
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src");
    let mut routed = BTreeSet::new();
    let mut files = Vec::new();
    let mut dirs = vec![src_dir];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, _) in text.match_indices(".route(\"") {
            let rest = &text[i + 8..];
            let end = rest.find('"').unwrap();
            let route = &rest[..end];
            // The rest of the `.route(` call, to its closing parenthesis:
            // `get(a).post(b)` routes two methods.
            let mut depth = 1;
            let close = rest
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .unwrap()
                .0;
            let call = &rest[end..close];
            for m in ["get", "post", "put", "delete", "patch"] {
                if call.contains(&format!("{m}(")) {
                    routed.insert((m.to_uppercase(), route.to_string()));
                }
            }
        }
    }
    assert!(routed.len() >= 10, "found too few routes: {routed:?}");
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the OpenAPI document (#[utoipa::path] on the handler, listed in agent/src/web/openapi.rs): {undocumented:?}"
    );
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        unrouted.is_empty(),
        "documented but not routed: {unrouted:?}"
    );

    // And each documented operation is served by a handler.
    for (method, path) in &documented {
        let uri = path
            .replace("{name}", "web")
            .replace("{file}", "web.svg")
            .replace("{tag}", "edge")
            .replace("{id}", "1")
            + if path == "/probe" {
                "?target=127.0.0.1:1&module=tcp_connect"
            } else {
                ""
            };
        let (status, _, body) = call(&fx, Method::from_bytes(method.as_bytes()).unwrap(), &uri);
        let text = String::from_utf8_lossy(&body);
        assert!(
            status != StatusCode::METHOD_NOT_ALLOWED && !text.contains("no such endpoint"),
            "{method} {uri}: {status} {text}"
        );
    }
}
