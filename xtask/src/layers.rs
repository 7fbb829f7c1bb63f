//! `cargo xtask layers`: the agent's modules in the order data flows, who
//! imports whom, and every import that goes up a layer or closes a circle.
//! `cargo xtask test` runs the same check and fails on a violation; the
//! unit test below runs it on the tree itself.
//!
//! An import is a `crate::<module>` path anywhere in a module's files
//! (plain paths and `use crate::{a, b::c}` groups, doc comments included),
//! outside its `#[cfg(test)] mod tests`. Each top-level module has a rank
//! ([`ORDER`]); a module may import only modules of a lower rank.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// The agent's top-level modules, lowest layer first, grouped by layer
/// (ARCHITECTURE.md explains each). Within a layer the order holds too.
pub const ORDER: &[(&str, &[&str])] = &[
    (
        "base: bytes, processes, files, HTTP",
        &[
            "api_types",
            "packet",
            "tcp_track",
            "btf",
            "caps",
            "history",
            "store",
            "client",
        ],
    ),
    (
        "datapath: counting packets",
        &["interfaces", "pcap_backend", "health", "peers", "probe"],
    ),
    ("config: the schema, as data", &["config"]),
    (
        "identity: which endpoint is which service",
        &["docker", "identity"],
    ),
    (
        "domain: captures, checks, web security",
        &["capture", "checks", "websec"],
    ),
    ("handles and workers", &["state", "jobs"]),
    ("serving: /metrics, the API, the page", &["metrics", "web"]),
    (
        "wiring: the built config, netpulse run",
        &["settings", "run"],
    ),
    ("commands", &["cli", "analyze"]),
];

pub struct Report {
    /// module → modules it imports.
    pub edges: BTreeMap<String, BTreeSet<String>>,
    /// (from, to) where `to` is not below `from`.
    pub upward: Vec<(String, String)>,
    /// Modules found in the source that `ORDER` does not place.
    pub unplaced: Vec<String>,
    /// Modules `ORDER` names that do not exist.
    pub missing: Vec<String>,
    /// Strongly connected sets of more than one module.
    pub circles: Vec<Vec<String>>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.upward.is_empty()
            && self.unplaced.is_empty()
            && self.missing.is_empty()
            && self.circles.is_empty()
    }
}

fn rank(module: &str) -> Option<usize> {
    ORDER
        .iter()
        .flat_map(|(_, ms)| ms.iter())
        .position(|m| *m == module)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The text of a file without comments and without its unit tests.
fn code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let t = line.trim_start();
        // Plain comments do not count; doc comments do (their links are
        // references, and a doc that names a higher layer is read as one).
        if t.starts_with("//") && !t.starts_with("///") && !t.starts_with("//!") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    if let Some(i) = out.find("#[cfg(test)]\nmod tests") {
        out.truncate(i);
    }
    out
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first segment of every `crate::` path in `code`.
fn imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // The top-level names of the group: split at depth-0 commas.
            let mut depth = 0usize;
            let mut start = 0usize;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(group[start..j].trim()).to_string());
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(group[start..j].trim()).to_string());
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(after).to_string());
        }
        rest = after;
    }
    out.retain(|s| !s.is_empty());
    out
}

/// Reads `src` (a crate's `src/`) and checks it against [`ORDER`].
pub fn check(src: &Path) -> Report {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut by_module: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for f in files {
        let Ok(rel) = f.strip_prefix(src) else {
            continue;
        };
        let Some(first) = rel.components().next() else {
            continue;
        };
        let top = first.as_os_str().to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        if top == "lib" || top == "main" || top == "bin" {
            continue;
        }
        by_module.entry(top).or_default().push(f);
    }
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, files) in &by_module {
        let mut set = BTreeSet::new();
        for f in files {
            let text = fs::read_to_string(f).unwrap_or_default();
            set.extend(
                imports(&code(&text))
                    .into_iter()
                    .filter(|t| t != m && by_module.contains_key(t)),
            );
        }
        edges.insert(m.clone(), set);
    }
    let unplaced = by_module
        .keys()
        .filter(|m| rank(m).is_none())
        .cloned()
        .collect();
    let missing = ORDER
        .iter()
        .flat_map(|(_, ms)| ms.iter())
        .filter(|m| !by_module.contains_key(**m))
        .map(|m| m.to_string())
        .collect();
    let mut upward = Vec::new();
    for (m, to) in &edges {
        for t in to {
            if let (Some(a), Some(b)) = (rank(m), rank(t))
                && b >= a
            {
                upward.push((m.clone(), t.clone()));
            }
        }
    }
    let circles = circles(&edges);
    Report {
        edges,
        upward,
        unplaced,
        missing,
        circles,
    }
}

/// Tarjan's strongly connected components of more than one module.
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> T<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on.insert(v);
            for w in self.edges.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low[v];
                    self.low.insert(v, lv.min(lw));
                } else if self.on.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low[v];
                    self.low.insert(v, lv.min(iw));
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on.remove(w);
                    comp.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

/// The picture, as markdown: each layer, its modules and what each imports.
pub fn render(r: &Report) -> String {
    let mut s = String::from("| layer | module | imports |\n|---|---|---|\n");
    for (layer, modules) in ORDER {
        for m in *modules {
            let to: Vec<&str> = r
                .edges
                .get(*m)
                .map(|t| t.iter().map(String::as_str).collect())
                .unwrap_or_default();
            s.push_str(&format!("| {layer} | `{m}` | {} |\n", to.join(", ")));
        }
    }
    let lines = |title: &str, items: Vec<String>| {
        if items.is_empty() {
            format!("\n{title}: none\n")
        } else {
            format!("\n{title}:\n- {}\n", items.join("\n- "))
        }
    };
    s.push_str(&lines(
        "Upward imports",
        r.upward.iter().map(|(a, b)| format!("{a} → {b}")).collect(),
    ));
    s.push_str(&lines(
        "Circles",
        r.circles.iter().map(|c| c.join(" ↔ ")).collect(),
    ));
    s.push_str(&lines("Modules not placed in a layer", r.unplaced.clone()));
    s.push_str(&lines(
        "Layers naming a module that is gone",
        r.missing.clone(),
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_paths_are_read() {
        let got = imports(&code(
            "use crate::{a::{b, c}, d, e::f};\nfn x() { crate::g::h(); }\n// crate::zz\n",
        ));
        assert_eq!(
            got,
            ["a", "d", "e", "g"].iter().map(|s| s.to_string()).collect()
        );
        assert!(!imports(&code("// crate::zz\nfn y() {}\n")).contains("zz"));
    }

    #[test]
    fn a_circle_and_an_upward_import_are_found() {
        let mut edges = BTreeMap::new();
        edges.insert("probe".to_string(), BTreeSet::from(["web".to_string()]));
        edges.insert("web".to_string(), BTreeSet::from(["probe".to_string()]));
        assert_eq!(
            circles(&edges),
            vec![vec!["probe".to_string(), "web".to_string()]]
        );
    }

    /// The agent as it is: nothing imports upward, no circles.
    #[test]
    fn the_agent_keeps_its_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/src");
        let r = check(&src);
        assert!(r.ok(), "{}", render(&r));
    }
}
