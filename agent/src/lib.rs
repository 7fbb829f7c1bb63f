//! netpulse: per-service packet counters from XDP/TC, named from config and
//! listening sockets, served to Prometheus. One module per stage of the data
//! path in DESIGN.md: probe (kernel programs and maps) → identity (which
//! endpoint is which service) → metrics/web (what is served), driven by run.

pub mod caps;
pub mod config;
pub mod identity;
pub mod interfaces;
pub mod metrics;
pub mod probe;
pub mod run;
pub mod web;
