//! `cargo xtask <cmd>`: the workflows around the build.
//!
//! - `setup`: installs what a fresh machine of this kind lacks (apt packages,
//!   nightly rust-src, bpf-linker against LLVM 22); skips what is there.
//! - `run`:   setup + release build + `netpulse run` with the embedded defaults.
//! - `test`:  setup + fmt/clippy + cargo deny/audit + every test, on the
//!   real kernel.
//! - `bench`: per-packet cost of the probes with BPF_PROG_TEST_RUN.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

mod layers;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces a fresh machine lacks (idempotent).
    Setup,
    /// Build the agent with its eBPF programs.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Setup, build, and run the agent in the foreground (Ctrl-C stops it).
    Run {
        /// Extra arguments for `netpulse run`, e.g. `-- --config FILE`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, lint, scan dependencies, and run every test (needs root:
    /// eBPF, netns, veth).
    Test,
    /// Build the .deb (target/debian/netpulse_*.deb).
    Package,
    /// The agent's modules by layer and who imports whom (markdown); fails
    /// on an upward import or a circle.
    Layers,
    /// Run the cargo-fuzz targets (config parser, /proc/net parser, frames,
    /// the kernel programs' parser and classifier).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Build the OCI image `netpulse:<version>` FROM scratch (starts dockerd
    /// if it is not running).
    Image,
    /// Per-packet cost of the programs vs an empty program (crafted frames
    /// and the kernel's own stats on live traffic), /metrics under wrk
    /// load, /probe and scheduled checks vs blackbox_exporter, live
    /// overhead, the TCP health programs' cost per connection and per
    /// dropped packet, `netpulse analyze` vs bare libpcap reads, capinfos
    /// and tshark (markdown tables).
    Bench {
        /// BPF_PROG_TEST_RUN repeat count per measurement.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
        /// Measurements per cell; the table shows the median.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Only these parts, comma-separated: probes (BPF_PROG_TEST_RUN,
        /// one frame and varied frames), kstats (the kernel's own run time
        /// of the TC programs on live traffic), http (wrk), probe
        /// (blackbox_exporter), overhead (live, on a veth pair), tcp (ns
        /// added per loopback connection and per nft drop by the TCP health
        /// programs, with and without the agent), analyze (vs
        /// bare libpcap loops, capinfos and tshark; without root, only the
        /// synthetic file).
        #[arg(long)]
        only: Option<String>,
    },
}

/// Debian packages: LLVM 22 for bpf-linker, libpcap for the capture path
/// (tcpdump and tshark, the references `analyze` is tested and benched against),
/// iproute2/iputils-ping/ethtool for the network-namespace tests, systemd
/// (systemd-analyze) and util-linux (setpriv) for the unit's tests,
/// prometheus (and promtool) for the rules and the scrape test, docker.io
/// and busybox-static for the container tests (images FROM scratch),
/// dnsmasq-base for the DNS checks' test server, nftables and iptables for
/// the TCP health tests' firewall rules (their counters are the drop
/// reference), and
/// prometheus-blackbox-exporter, the peer /probe is held to, and
/// chromium with chromium-driver for the status page's browser test.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libpcap-dev",
    "tcpdump",
    "tshark",
    "iproute2",
    "iputils-ping",
    "ethtool",
    "systemd",
    "util-linux",
    "prometheus",
    "docker.io",
    "wrk",
    "busybox-static",
    "dnsmasq-base",
    "nftables",
    "iptables",
    "prometheus-blackbox-exporter",
    "chromium",
    "chromium-driver",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Supply-chain scanners, installed by `setup`, run by `test`.
const CARGO_TOOLS: &[(&str, &str)] = &[
    ("cargo-deny", "0.20.2"),
    ("cargo-audit", "0.22.2"),
    ("cargo-deb", "3.8.0"),
    ("cargo-fuzz", "0.13.2"),
];

/// The fuzz targets in agent/fuzz; seeds in agent/fuzz/corpus/<target>.
const FUZZ_TARGETS: &[&str] = &["config", "proc_net", "packet", "parse"];

/// The directory cargo-deny derives for the default advisory-db URL under
/// its `db-path` (deny.toml).
const DENY_DB_DIR: &str = "target/advisory-db/advisory-db-3157b0e258782691";

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: {shown}");
    let status = cmd.status().with_context(|| format!("spawning {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn ok(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

fn stdout(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn is_root() -> bool {
    stdout(Command::new("id").arg("-u")).trim() == "0"
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !stdout(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: apt packages present");
    } else {
        let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
        let apt = |args: &[&str]| {
            let mut all: Vec<&str> = sudo.to_vec();
            all.push("apt-get");
            all.extend_from_slice(args);
            let mut c = Command::new(all[0]);
            c.args(&all[1..]).env("DEBIAN_FRONTEND", "noninteractive");
            c
        };
        run(&mut apt(&["update", "-q"]))?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(missing.iter().copied());
        run(&mut apt(&args))?;
    }

    let installed = stdout(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: nightly rust-src present");
    } else {
        // `component add`, not `toolchain install`: the latter would move the
        // image's nightly (LLVM 22, matching bpf-linker) to a newer one.
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    for (tool, version) in CARGO_TOOLS {
        let sub = tool.trim_start_matches("cargo-");
        if stdout(cargo().args([sub, "--version"])).contains(version) {
            eprintln!("xtask: {tool} {version} present");
        } else {
            run(cargo().args(["install", tool, "--version", version, "--locked"]))?;
        }
    }

    let linker = stdout(Command::new("bpf-linker").arg("--version"));
    if linker.contains(BPF_LINKER_VERSION) {
        eprintln!("xtask: bpf-linker {BPF_LINKER_VERSION} present");
    } else {
        // The default feature wants LLVM 23; the machine's nightly is LLVM 22.
        run(cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"))?;
    }
    Ok(())
}

fn build(release: bool) -> Result<()> {
    let mut c = cargo();
    c.args(["build", "--package", "netpulse"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

/// Puts the advisory-db snapshot from ../shared where cargo-deny and
/// cargo-audit look for it: a git checkout dated as the snapshot.
fn advisory_db() -> Result<PathBuf> {
    let src = root().join("../shared/advisory-db");
    if !src.join("crates").is_dir() {
        bail!(
            "no advisory-db snapshot at {} (the shared folder beside the repository)",
            src.display()
        );
    }
    let date = std::fs::read_to_string(src.join("SNAPSHOT"))
        .ok()
        .and_then(|s| {
            s.split(['(', ')'])
                .find(|w| w.len() == 10 && w.chars().nth(4) == Some('-'))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "2026-01-01".into());
    let dst = root().join(DENY_DB_DIR);
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst)?;
    run(Command::new("cp").arg("-r").arg(src.join(".")).arg(&dst))?;
    let stamp = format!("{date}T00:00:00Z");
    let git = |args: &[&str]| {
        let mut c = Command::new("git");
        c.current_dir(&dst)
            .args([
                "-c",
                "user.name=netpulse-xtask",
                "-c",
                "user.email=xtask@netpulse.invalid",
            ])
            .args(args)
            .env("GIT_AUTHOR_DATE", &stamp)
            .env("GIT_COMMITTER_DATE", &stamp);
        c
    };
    run(&mut git(&["init", "-q"]))?;
    run(&mut git(&["add", "-A"]))?;
    run(&mut git(&["commit", "-q", "-m", "advisory-db snapshot"]))?;
    Ok(dst)
}

/// Downloads every crate the workspace and the fuzz workspace lock, so that
/// what runs `--offline` afterwards (cargo deny) finds them on a machine
/// whose cargo registry is empty. The lock files are the contract:
/// `--locked` fails rather than resolve anew.
fn fetch() -> Result<()> {
    run(cargo().args(["fetch", "--locked"]))?;
    run(cargo()
        .args(["fetch", "--locked", "--manifest-path"])
        .arg(root().join("agent/fuzz/Cargo.toml")))?;
    Ok(())
}

fn supply_chain() -> Result<()> {
    let db = advisory_db()?;
    run(cargo().args(["deny", "--offline", "check"]))?;
    run(cargo().args(["audit", "--no-fetch", "--db"]).arg(&db))?;
    Ok(())
}

/// Runs each fuzz target for `seconds` (nightly, libFuzzer). New inputs go
/// to target/fuzz-corpus/; the committed seeds are read, never rewritten. A
/// crash stops the run; its input lands in agent/fuzz/artifacts/: fix it and
/// add the input to the target's corpus, which the unit tests replay.
fn fuzz(seconds: u64) -> Result<()> {
    for t in FUZZ_TARGETS {
        let work = root().join("target/fuzz-corpus").join(t);
        std::fs::create_dir_all(&work)?;
        // The rustup proxy, not $CARGO: `+nightly` must pick the toolchain.
        run(Command::new("cargo")
            .current_dir(root().join("agent"))
            .args(["+nightly", "fuzz", "run", t])
            .arg(&work)
            .arg(format!("fuzz/corpus/{t}"))
            .args(["--", &format!("-max_total_time={seconds}")])
            // The parsers need no eBPF object.
            .env("AYA_BUILD_SKIP", "1"))?;
    }
    Ok(())
}

/// Release build, then cargo-deb on it. Returns the .deb's path.
fn package() -> Result<PathBuf> {
    build(true)?;
    // The man page and shell completions, from the binary's own clap
    // definitions (the .deb's assets list them).
    let bin = root().join("target/release/netpulse");
    let gen_dir = root().join("target/generated");
    std::fs::create_dir_all(&gen_dir)?;
    for (args, file) in [
        (&["man"][..], "netpulse.1"),
        (&["completions", "bash"][..], "netpulse.bash"),
        (&["completions", "zsh"][..], "_netpulse"),
        (&["completions", "fish"][..], "netpulse.fish"),
    ] {
        let out = Command::new(&bin)
            .args(args)
            .output()
            .with_context(|| format!("netpulse {}", args.join(" ")))?;
        if !out.status.success() {
            bail!("netpulse {} failed", args.join(" "));
        }
        std::fs::write(gen_dir.join(file), out.stdout)?;
    }
    let out = cargo()
        .args(["deb", "--package", "netpulse", "--no-build"])
        .output()
        .context("running cargo deb")?;
    if !out.status.success() {
        bail!(
            "cargo deb failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let path = PathBuf::from(path.lines().last().unwrap_or_default());
    if !path.exists() {
        bail!("cargo deb did not report its output ({})", path.display());
    }
    eprintln!("xtask: built {}", path.display());
    Ok(path)
}

/// Makes sure a Docker daemon answers; starts Debian's dockerd in the
/// background if none does (it keeps running after xtask exits).
fn ensure_dockerd() -> Result<()> {
    if ok(Command::new("docker").arg("info")) {
        return Ok(());
    }
    let log_path = root().join("target/dockerd.log");
    std::fs::create_dir_all(root().join("target"))?;
    let log = std::fs::File::create(&log_path)?;
    eprintln!("xtask: starting dockerd (log: {})", log_path.display());
    let child = Command::new("dockerd")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning dockerd")?;
    // It keeps running after xtask exits, for the next run; the test that
    // kills a dockerd starts one of its own.
    drop(child);
    for _ in 0..120 {
        if ok(Command::new("docker").arg("info")) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    bail!("dockerd did not come up; see {}", log_path.display())
}

/// The shared libraries `bin` loads, as absolute paths (from ldd).
fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!("ldd {} failed", bin.display());
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if libs.is_empty() {
        bail!("ldd found no libraries for {}", bin.display());
    }
    Ok(libs)
}

/// Builds `netpulse:<version>` FROM scratch: the release binary, the shared
/// libraries it links, and the documented default config.
fn image() -> Result<String> {
    build(true)?;
    ensure_dockerd()?;
    let bin = root().join("target/release/netpulse");
    let ctx = root().join("target/image");
    let _ = std::fs::remove_dir_all(&ctx);
    let rootfs = ctx.join("rootfs");
    let put = |src: &Path, dst: &str| -> Result<()> {
        let to = rootfs.join(dst.trim_start_matches('/'));
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // fs::copy follows symlinks: the image gets the files themselves.
        std::fs::copy(src, &to).with_context(|| format!("copying {}", src.display()))?;
        Ok(())
    };
    put(&bin, "/usr/bin/netpulse")?;
    for lib in shared_libs(&bin)? {
        put(&lib, &lib.to_string_lossy())?;
    }
    put(
        &root().join("systemd/config.toml"),
        "/etc/netpulse/config.toml",
    )?;
    let version = env!("CARGO_PKG_VERSION");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM scratch\n\
             COPY rootfs/ /\n\
             LABEL org.opencontainers.image.title=\"netpulse\" \\\n\
             \x20     org.opencontainers.image.version=\"{version}\" \\\n\
             \x20     org.opencontainers.image.licenses=\"MIT\"\n\
             ENTRYPOINT [\"/usr/bin/netpulse\"]\n\
             CMD [\"run\"]\n"
        ),
    )?;
    let tag = format!("netpulse:{version}");
    // The classic builder: FROM scratch needs nothing from a registry.
    run(Command::new("docker")
        .args(["build", "--quiet", "-t", &tag, "-t", "netpulse:latest"])
        .arg(&ctx)
        .env("DOCKER_BUILDKIT", "0"))?;
    eprintln!("xtask: built image {tag}");
    Ok(tag)
}

/// Prints the layer picture; an error if an import goes up or circles.
fn layers() -> Result<()> {
    let r = layers::check(&root().join("agent/src"));
    print!("{}", layers::render(&r));
    if !r.ok() {
        bail!("the agent's modules break their layers (see above and ARCHITECTURE.md)");
    }
    Ok(())
}

fn test() -> Result<()> {
    setup()?;
    if !is_root() {
        bail!(
            "cargo xtask test loads eBPF programs and creates network namespaces: run it as root"
        );
    }
    fetch()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    layers()?;
    supply_chain()?;
    // A short run keeps the fuzz targets building and the seeds passing;
    // `cargo xtask fuzz` is the long one.
    fuzz(10)?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The netns tests start the real binary, the package test installs the
    // .deb: build both before they look for them.
    build(false)?;
    let deb = package()?;
    let image = image()?;
    let bin = root().join("target/debug/netpulse");
    // Each test that skips (a missing prerequisite, outside CI) appends a
    // line here; the summary below reads it back, since libtest shows a
    // skipped test as passed.
    let skips = root().join(SKIPS_FILE);
    let _ = std::fs::remove_file(&skips);
    // --no-fail-fast: a failing test file must not hide the ones after it.
    let tested = run(cargo()
        .args([
            "test",
            "--workspace",
            "--no-fail-fast",
            "--",
            "--test-threads=1",
        ])
        .env("NETPULSE_BIN", &bin)
        .env("NETPULSE_DEB", &deb)
        .env("NETPULSE_IMAGE", &image)
        .env("NETPULSE_SKIPS", &skips));
    summarise_skips(&skips);
    tested
}

/// Where the tests record what they skipped (tests/src/lib.rs `require`).
const SKIPS_FILE: &str = "target/test-skips.txt";

/// Prints how many tests skipped and why, from the file the tests wrote.
fn summarise_skips(file: &Path) {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        eprintln!("xtask: no test skipped");
        return;
    }
    let mut reasons: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for l in &lines {
        let (test, why) = l.split_once('\t').unwrap_or(("?", l));
        reasons.entry(why).or_default().push(test);
    }
    eprintln!(
        "xtask: {} test(s) SKIPPED, so not tested here (under CI=true each would fail):",
        lines.len()
    );
    for (why, tests) in reasons {
        eprintln!("  {why}: {}", tests.join(", "));
    }
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::Build { release } => {
            setup()?;
            build(release)
        }
        Cmd::Run { args } => {
            setup()?;
            build(true)?;
            let bin = root().join("target/release/netpulse");
            let mut c = Command::new(&bin);
            c.arg("run").args(args.iter().map(OsStr::new));
            if !is_root() {
                eprintln!(
                    "xtask: netpulse needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN; not root, so it may refuse to start"
                );
            }
            eprintln!(
                "xtask: the status page at http://127.0.0.1:9477/, metrics at /metrics (Ctrl-C to stop)"
            );
            run(&mut c)
        }
        Cmd::Test => test(),
        Cmd::Layers => layers(),
        Cmd::Image => {
            setup()?;
            image().map(|t| println!("{t}"))
        }
        Cmd::Fuzz { seconds } => {
            setup()?;
            fuzz(seconds)
        }
        Cmd::Package => {
            setup()?;
            package().map(|p| println!("{}", p.display()))
        }
        Cmd::Bench {
            repeat,
            rounds,
            only,
        } => {
            setup()?;
            if only.is_none() && !ok(Command::new("test").args(["-w", "/sys/fs/bpf"])) && !is_root()
            {
                bail!("the benchmark runs eBPF programs in the kernel: run it as root");
            }
            build(true)?;
            // The agent the HTTP and /probe benchmarks start: the release
            // build, as shipped.
            run(cargo()
                .env("NETPULSE_BIN", root().join("target/release/netpulse"))
                .args([
                    "run",
                    "--quiet",
                    "--release",
                    "--package",
                    "netpulse-tests",
                    "--bin",
                    "bench",
                    "--",
                    "--repeat",
                    &repeat.to_string(),
                    "--rounds",
                    &rounds.to_string(),
                ])
                .args(only.iter().flat_map(|o| ["--only", o.as_str()])))
        }
    }
}
