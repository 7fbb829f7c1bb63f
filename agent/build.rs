//! Builds the kernel programs (agent-ebpf's bin) with aya-build and leaves the
//! object in OUT_DIR, where `probe` embeds it. With AYA_BUILD_SKIP=1 an empty
//! placeholder is written instead: the userspace builds and tests, and
//! `netpulse run` says the binary carries no eBPF programs.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let manifest = PathBuf::from(
        env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR not set"))?,
    );
    let ebpf_dir = manifest.join("../agent-ebpf");
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("agent-ebpf not found at {}", ebpf_dir.display()))?;
    let object = out.join("netpulse");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        if !object.exists() {
            fs::write(&object, b"").context("writing the empty eBPF placeholder")?;
        }
        announce(&object);
        return Ok(());
    }
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    announce(&object);
    Ok(())
}

/// `netpulse --version` says whether the binary carries its programs (the
/// tests refuse to test eBPF with one that does not).
fn announce(object: &std::path::Path) {
    let size = fs::metadata(object).map_or(0, |m| m.len());
    let what = if size > 0 {
        "built in".to_string()
    } else {
        "absent (built with AYA_BUILD_SKIP=1)".to_string()
    };
    println!("cargo:rustc-env=NETPULSE_EBPF_PROGRAMS={what}");
}
