//! netpulse: per-service packet counters from XDP/TC, named from config and
//! listening sockets, served to Prometheus. One module per stage of the data
//! path in DESIGN.md: probe (kernel programs and maps) → identity (which
//! endpoint is which service) → metrics/web (what is served), driven by run.

pub mod analyze;
pub mod caps;
pub mod capture;
pub mod checks;
pub mod cli;
pub mod client;
pub mod config;
pub mod docker;
pub mod history;
pub mod identity;
pub mod interfaces;
pub mod jobs;
pub mod metrics;
pub mod packet;
pub mod pcap_backend;
pub mod probe;
pub mod run;
pub mod settings;
pub mod state;
pub mod store;
pub mod web;
pub mod websec;

/// An error and its causes on one line: "a: b: c". aya's errors keep the
/// errno in their source, which a plain `{}` would drop.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}
