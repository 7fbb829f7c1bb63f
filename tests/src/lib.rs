//! Helpers for netpulse's integration tests: frames crafted byte by byte,
//! network namespaces joined by veth pairs, scraping a running agent, and
//! bpffs pin directories that clean up after themselves.

pub mod agent;
pub mod browser;
pub mod dashboards;
pub mod docker;
pub mod frames;
pub mod netns;
pub mod pcapfile;
pub mod prom;
pub mod scrape;
pub mod tls;

use std::path::{Path, PathBuf};

/// Under `CI=true` a missing prerequisite is a failure, never a skip.
pub fn require(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("prerequisite missing under CI=true: {what}");
    }
    skipped(&format!("prerequisite missing: {what}"));
    false
}

/// Says that the running test skips, on stderr and, for `cargo xtask
/// test`'s summary, as a line `<test file>::<test>\t<why>` in the file
/// `NETPULSE_SKIPS` names (libtest shows a skipped test as passed).
pub fn skipped(why: &str) {
    eprintln!("SKIPPED: {why}");
    let Some(file) = std::env::var_os("NETPULSE_SKIPS") else {
        return;
    };
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| {
            s.rsplit_once('-')
                .map_or(s.clone(), |(name, _hash)| name.to_string())
        })
        .unwrap_or_default();
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    let line = format!("{binary}::{test}\t{}\n", why.replace(['\n', '\t'], " "));
    use std::io::Write as _;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// xorshift64: the same sequence from the same seed, so a random test
/// case can be replayed and a generated benchmark file is the same on every
/// run.
pub struct Rng(pub u64);

impl Rng {
    pub fn u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// In `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A fresh directory for one test's files, `$TMPDIR/netpulse-<tag>-<pid>`
/// (emptied if a previous run left it).
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("netpulse-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create a scratch directory");
    d
}

/// A bpffs directory for one test's pinned maps, removed on drop.
pub struct PinDir(PathBuf, bool);

impl PinDir {
    pub fn new(tag: &str) -> Self {
        let p = PathBuf::from(format!(
            "/sys/fs/bpf/netpulse-test-{tag}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        PinDir(p, false)
    }

    /// A bpffs of its own, mounted outside /sys: `ip netns exec` remounts
    /// /sys for the namespace, which hides /sys/fs/bpf from an agent started
    /// through it, so pins there would not outlive the agent.
    pub fn mounted(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("netpulse-bpffs-{tag}-{}", std::process::id()));
        let _ = std::process::Command::new("umount").arg(&p).output();
        std::fs::create_dir_all(&p).expect("create bpffs mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&p)
            .output()
            .expect("spawn mount");
        assert!(
            out.status.success(),
            "mount -t bpf: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PinDir(p, true)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        if self.1 {
            let _ = std::process::Command::new("umount").arg(&self.0).output();
            let _ = std::fs::remove_dir(&self.0);
        }
    }
}
