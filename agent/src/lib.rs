//! netpulse: per-service packet counters from XDP/TC (or libpcap), named
//! from the config, listening sockets and Docker containers, checked on a
//! schedule and served to Prometheus, a JSON API and a status page.
//!
//! The modules are layers in the order data flows (ARCHITECTURE.md): base
//! (packet, store, client…) → datapath (interfaces, pcap_backend, probe) →
//! config (data) → identity (docker, identity) → domain (capture, checks,
//! websec) → handles (state, jobs) → serving (metrics, web) → wiring
//! (settings, run) → commands (analyze, cli). Nothing imports upward:
//! `cargo xtask layers` draws it and fails otherwise.

pub mod analyze;
pub mod api_types;
pub mod btf;
pub mod caps;
pub mod capture;
pub mod checks;
pub mod cli;
pub mod client;
pub mod config;
pub mod docker;
pub mod health;
pub mod history;
pub mod identity;
pub mod interfaces;
pub mod jobs;
pub mod metrics;
pub mod packet;
pub mod pcap_backend;
pub mod peers;
pub mod probe;
pub mod run;
pub mod settings;
pub mod state;
pub mod store;
pub mod tcp_track;
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
