//! Helpers for netpulse's integration tests: frames crafted byte by byte,
//! network namespaces joined by veth pairs, scraping a running agent, and
//! bpffs pin directories that clean up after themselves.

pub mod frames;
pub mod netns;
pub mod scrape;

use std::path::{Path, PathBuf};

/// Under `CI=true` a missing prerequisite is a failure, never a skip.
pub fn require(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("prerequisite missing under CI=true: {what}");
    }
    eprintln!("SKIPPED: prerequisite missing: {what}");
    false
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A bpffs directory for one test's pinned maps, removed on drop.
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> Self {
        let p = PathBuf::from(format!(
            "/sys/fs/bpf/netpulse-test-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        PinDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
