//! Capability check before loading anything, so a missing privilege reads as
//! "missing CAP_BPF" instead of a bare EPERM from the bpf() syscall.

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// The capabilities the probes need that this process lacks, by name.
pub fn missing_for_probes() -> Vec<&'static str> {
    missing_in(effective().unwrap_or(0))
}

/// Whether this process may open packet sockets (the pcap backend).
pub fn can_capture() -> bool {
    effective().unwrap_or(0) & (1u64 << CAP_NET_RAW) != 0
}

pub fn missing_in(eff: u64) -> Vec<&'static str> {
    let has = |c: u32| eff & (1u64 << c) != 0;
    let mut out = Vec::new();
    // CAP_SYS_ADMIN implies what CAP_BPF and CAP_PERFMON grant.
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        out.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        out.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        out.push("CAP_NET_ADMIN");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing() {
        assert_eq!(missing_in(0), ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
        assert!(missing_in((1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN)).is_empty());
        assert_eq!(
            missing_in((1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN)),
            Vec::<&str>::new()
        );
        assert_eq!(missing_in(1 << CAP_NET_ADMIN), ["CAP_BPF", "CAP_PERFMON"]);
    }
}
