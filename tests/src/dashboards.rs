//! The Grafana dashboards in `dashboards/`: their PromQL expressions
//! (panels and template variables), with Grafana's variables filled in,
//! for the tests that evaluate them on a real Prometheus.

use std::path::PathBuf;

/// The repository's `dashboards/` directory.
pub fn dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards"))
}

/// The dashboard JSON files, by file name.
pub fn files() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir())
        .expect("read dashboards/")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// One dashboard, parsed.
pub fn load(file: &str) -> serde_json::Value {
    let path = dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every PromQL expression of dashboard `file`, as written: (where, expr).
/// A panel target gives its `expr`; a template variable
/// `label_values(SELECTOR, label)` gives `count by (label) (SELECTOR)`,
/// which returns data only if the selector's series carry the label.
pub fn queries(file: &str) -> Vec<(String, String)> {
    let v = load(file);
    let mut out = Vec::new();
    for p in v["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            out.push((
                format!("{file}: panel {:?}", p["title"]),
                t["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    for var in v["templating"]["list"].as_array().expect("templating.list") {
        if let Some(def) = var["definition"].as_str() {
            let (sel, label) = def
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(sel, label)| (sel, label.trim().trim_end_matches(')')))
                .unwrap_or_else(|| panic!("unsupported variable query {def}"));
            out.push((
                format!("{file}: variable {:?}", var["name"]),
                format!("count by ({label}) ({sel})"),
            ));
        }
    }
    out
}

/// `expr` with Grafana's variables filled in: `$__rate_interval` as 15 s
/// (scrapes every second), `$instance` and `$service` as given (regular
/// expressions: `.*` is "All").
pub fn fill(expr: &str, instance: &str, service: &str) -> String {
    expr.replace("$__rate_interval", "15s")
        .replace("$instance", instance)
        .replace("$service", service)
}
