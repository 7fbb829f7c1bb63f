//! The .deb built by `cargo xtask package`: dpkg installs it, every file is
//! where the unit and the docs say, the config is a conffile, the installed
//! binary works, and a purge removes it all.

use std::{path::PathBuf, process::Command};

use netpulse_tests::{is_root, netns::have, require};

fn deb() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NETPULSE_DEB") {
        return Some(PathBuf::from(p));
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debian");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd).args(args).output().unwrap()
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_deb_installs_works_and_purges_cleanly() {
    let deb = deb();
    if !require("root", is_root())
        || !require("dpkg", have("dpkg"))
        || !require(
            "a .deb (cargo xtask package, or NETPULSE_DEB)",
            deb.as_ref().is_some_and(|p| p.exists()),
        )
    {
        return;
    }
    let Some(deb) = deb else { return };
    assert!(
        !run("dpkg", &["-s", "netpulse"]).status.success(),
        "netpulse is already installed on this machine; the test will not touch it"
    );
    let user_existed = run("getent", &["passwd", "netpulse"]).status.success();

    ok("dpkg", &["-i", deb.to_str().unwrap()]);
    let installed = std::panic::catch_unwind(|| {
        let files = [
            "/usr/bin/netpulse",
            "/lib/systemd/system/netpulse.service",
            "/etc/netpulse/config.toml",
            "/usr/share/netpulse/dashboards/netpulse-overview.json",
            "/usr/share/netpulse/dashboards/provisioning.yaml",
            "/usr/share/netpulse/rules/alerts.yaml",
            "/usr/share/doc/netpulse/README.md",
            "/usr/share/man/man1/netpulse.1.gz",
            "/usr/share/bash-completion/completions/netpulse",
            "/usr/share/zsh/vendor-completions/_netpulse",
            "/usr/share/fish/vendor_completions.d/netpulse.fish",
        ];
        for f in files {
            assert!(
                std::path::Path::new(f).is_file(),
                "{f} missing after install"
            );
        }
        let unit = std::fs::read_to_string("/lib/systemd/system/netpulse.service").unwrap();
        let ours = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../systemd/netpulse.service"
        ))
        .unwrap();
        assert_eq!(unit, ours);
        let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}", "netpulse"]);
        assert!(
            conffiles.contains("/etc/netpulse/config.toml"),
            "{conffiles}"
        );
        let version = ok("/usr/bin/netpulse", &["--version"]);
        assert_eq!(
            version.trim(),
            format!(
                "netpulse {}\neBPF programs: built in",
                env!("CARGO_PKG_VERSION")
            )
        );
        let check = ok(
            "/usr/bin/netpulse",
            &["config", "check", "--config", "/etc/netpulse/config.toml"],
        );
        assert!(check.contains(": ok"), "{check}");
        assert!(
            run("getent", &["passwd", "netpulse"]).status.success(),
            "postinst did not create the netpulse user"
        );
    });

    ok("dpkg", &["--purge", "netpulse"]);
    if !user_existed {
        let _ = run("deluser", &["--system", "netpulse"]);
        let _ = run("delgroup", &["--system", "netpulse"]);
    }
    if let Err(p) = installed {
        std::panic::resume_unwind(p);
    }
    assert!(!run("dpkg", &["-s", "netpulse"]).status.success());
    for gone in [
        "/usr/bin/netpulse",
        "/lib/systemd/system/netpulse.service",
        "/etc/netpulse",
        "/usr/share/netpulse",
        "/usr/share/doc/netpulse",
    ] {
        assert!(
            !std::path::Path::new(gone).exists(),
            "{gone} left after purge"
        );
    }
}
