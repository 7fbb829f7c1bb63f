//! The kernel's drop reasons as netpulse reads them from BTF, against the
//! kernel's own list: the `skb:kfree_skb` tracepoint's format, whose
//! `__print_symbolic` names every reason the tracepoint reports.

use std::collections::BTreeMap;

use netpulse_tests::{is_root, require};

/// `{ 2, "NOT_SPECIFIED" }, …` in the format's print fmt → value → name.
fn symbolic(format: &str) -> BTreeMap<u64, String> {
    let start = format
        .find("__print_symbolic(REC->reason")
        .expect("kfree_skb's format names its reasons");
    let mut out = BTreeMap::new();
    let mut rest = &format[start..];
    while let Some(open) = rest.find("{ ") {
        rest = &rest[open + 2..];
        let Some(comma) = rest.find(',') else { break };
        let Ok(v) = rest[..comma].trim().parse::<u64>() else {
            break;
        };
        let q1 = rest.find('"').unwrap();
        let q2 = q1 + 1 + rest[q1 + 1..].find('"').unwrap();
        out.insert(v, rest[q1 + 1..q2].to_ascii_lowercase());
        rest = &rest[q2..];
    }
    out
}

#[test]
fn drop_reason_names_match_the_kfree_skb_tracepoint() {
    if !require("root (to mount tracefs)", is_root()) {
        return;
    }
    // A private tracefs mount, gone when the test ends.
    let dir = netpulse_tests::scratch("btf-tracefs");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount -t tracefs");
    let format = std::fs::read_to_string(dir.join("events/skb/kfree_skb/format"));
    let _ = std::process::Command::new("umount").arg(&dir).status();
    let format = format.expect("skb:kfree_skb format");
    let kernel = symbolic(&format);
    assert!(kernel.len() > 50, "{kernel:?}");

    let btf = std::fs::read(netpulse::btf::VMLINUX).unwrap();
    let ours = netpulse::btf::drop_reasons(&btf).unwrap();
    // Every reason the tracepoint can report, under the same number (MAX
    // is the enum's count, not a reason).
    for (v, name) in kernel.iter().filter(|(_, n)| *n != "max") {
        assert_eq!(ours.get(v), Some(name), "reason {v}");
    }
    // And nothing the tracepoint does not know (SKB_CONSUMED and the
    // markers are no drop reasons).
    let extra: Vec<&String> = ours
        .iter()
        .filter(|(v, _)| !kernel.contains_key(v))
        .map(|(_, n)| n)
        .collect();
    assert!(extra.is_empty(), "{extra:?}");
}
