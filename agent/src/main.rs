//! The `netpulse` command line: `run` (the agent), `check run` and `config check`.
// Everything printed goes through `netpulse::cli::print`: `print!` panics
// when the reader has gone (`netpulse status | head`).
#![deny(clippy::print_stdout)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use netpulse::{
    cli::{Output, Printed},
    config, run,
};

#[derive(Parser)]
#[command(
    name = "netpulse",
    version,
    long_version = concat!(
        env!("CARGO_PKG_VERSION"),
        "\neBPF programs: ",
        env!("NETPULSE_EBPF_PROGRAMS")
    ),
    about = "Per-service network counters from eBPF, for Prometheus"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the probes, attach them and serve /metrics.
    Run {
        /// Config file (default: /etc/netpulse/config.toml if present, else built-in defaults).
        #[arg(long, short, env = "NETPULSE_CONFIG")]
        config: Option<PathBuf>,
        /// What counts packets (overrides agent.backend): eBPF, libpcap, or
        /// eBPF falling back to libpcap.
        #[arg(long, value_enum)]
        backend: Option<config::Backend>,
    },
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Health checks.
    Check {
        #[command(subcommand)]
        command: CheckCommand,
    },
    /// Show the services of a running agent: state, traffic, checks, uptime.
    Status {
        /// The agent's HTTP address.
        #[arg(long, env = "NETPULSE_URL", default_value = netpulse::cli::DEFAULT_URL)]
        url: String,
        /// Redraw the table in place until interrupted.
        #[arg(long, short)]
        watch: bool,
        /// Seconds between redraws with --watch.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval: u64,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print a shell completion script (e.g. `netpulse completions bash > /etc/bash_completion.d/netpulse`).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout.
    Man,
    /// Read a pcap or pcapng file (`-` for stdin) and report packets and
    /// bytes per service, per conversation, per address and per protocol.
    /// Exits 1 if the file stops early (the report covers what was read).
    Analyze(netpulse::analyze::cli::Args),
    /// Packet captures through a running agent's API (`[api] token`).
    Capture(netpulse::cli::capture::Args),
}

#[derive(Subcommand)]
enum CheckCommand {
    /// Run checks once, without an agent, and print the results; exits 0
    /// only if every check passed (1 otherwise, 2 for a bad config).
    Run {
        /// The check to run; every check without a name (or with --all).
        name: Option<String>,
        #[arg(long, conflicts_with = "name")]
        all: bool,
        #[arg(long, short, env = "NETPULSE_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file; prints every problem as file:line:col and exits 2.
    Check {
        #[arg(long, short, env = "NETPULSE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Read a password on stdin and print its bcrypt hash, for
    /// `[web.basic_auth_users]`.
    HashPassword,
}

/// At most two malloc arenas for the agent, unless MALLOC_ARENA_MAX says.
/// glibc gives threads that allocate arenas of their own (up to 8 per
/// core) and keeps what they freed: with 1,000 services, 40 GETs each of
/// /metrics and /api/v1/services (rendered on blocking threads) left the
/// agent at 58 MB resident, 36 MB with two arenas (issue 14: ≤ 50 MB).
fn few_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt sets a tunable; no other thread runs yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// The agent's runtime: two workers (a node agent shares the host).
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("netpulse: starting the runtime: {e}");
            ExitCode::from(1)
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The agent logs what it does; one-shot commands print their results
    // and log only errors (RUST_LOG overrides both).
    let default = if matches!(cli.command, Command::Run { .. }) {
        "info"
    } else {
        "error"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // Colour for a terminal only, and not with NO_COLOR: journald and
        // log files get plain text.
        .with_ansi(netpulse::cli::log_color())
        .init();
    match cli.command {
        Command::Analyze(args) => ExitCode::from(netpulse::analyze::cli::run(args)),
        Command::Capture(args) => ExitCode::from(netpulse::cli::capture::run(args)),
        Command::Run { config, backend } => {
            few_malloc_arenas();
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match rt.block_on(run::run(config, backend)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("netpulse: {}", netpulse::error_chain(&e));
                    ExitCode::from(e.exit_code() as u8)
                }
            }
        }
        Command::Check {
            command:
                CheckCommand::Run {
                    name,
                    all: _,
                    config,
                    output,
                },
        } => check_run(name, config, output),
        Command::Status {
            url,
            watch,
            interval,
            output,
        } => status(&url, watch, Duration::from_secs(interval), output),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Into memory first: clap_complete panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "netpulse", &mut script);
            printed(netpulse::cli::print(script))
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut page = Vec::new();
            if let Err(e) = clap_mangen::Man::new(cmd).render(&mut page) {
                eprintln!("netpulse: writing the man page: {e}");
                return ExitCode::from(1);
            }
            printed(netpulse::cli::print(page))
        }
        Command::Config {
            command: ConfigCommand::HashPassword,
        } => {
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                eprintln!("netpulse: reading the password: {e}");
                return ExitCode::from(1);
            }
            let password = line.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                eprintln!("netpulse: an empty password on stdin");
                return ExitCode::from(2);
            }
            match netpulse::websec::hash(password) {
                Ok(h) => printed(netpulse::cli::print(format!("{h}\n"))),
                Err(e) => {
                    eprintln!("netpulse: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let path = run::config_path(config);
            match netpulse::settings::load(path.as_deref()) {
                Ok(l) => {
                    let n: usize = l.services.iter().map(|s| s.endpoints.len()).sum();
                    printed(netpulse::cli::print(format!(
                        "{}: ok ({} services, {} endpoints)\n",
                        path.as_deref()
                            .map_or("<embedded default>".into(), |p| p.display().to_string()),
                        l.services.len(),
                        n
                    )))
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// The exit code of a command whose last step is printing: 0 once
/// printed (or the reader has gone), else 1.
fn printed(r: Result<Printed, u8>) -> ExitCode {
    match r {
        Ok(_) => ExitCode::SUCCESS,
        Err(code) => ExitCode::from(code),
    }
}

/// `netpulse status`: the services of a running agent, once or redrawn
/// every `interval`.
fn status(url: &str, watch: bool, interval: Duration, output: Output) -> ExitCode {
    use netpulse::cli;
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let color = cli::color();
    loop {
        let text = match rt.block_on(cli::status_report(url, output, watch, color)) {
            Ok(text) => text,
            Err(e) if !watch => {
                eprintln!("netpulse: {e}");
                return ExitCode::from(1);
            }
            Err(e) => format!("netpulse: {e}\n"),
        };
        if !watch {
            return printed(cli::print(text));
        }
        let wrote = if matches!(output, Output::Table)
            && std::io::IsTerminal::is_terminal(&std::io::stdout())
        {
            // Home and clear, then the new table: redrawn in place.
            cli::print(format!(
                "\x1b[H\x1b[2J{text}\nevery {}s · Ctrl-C to quit\n",
                interval.as_secs()
            ))
        } else {
            cli::print(text)
        };
        match wrote {
            Ok(Printed::Written) => {}
            // `netpulse status --watch | head`: the reader is done.
            Ok(Printed::Closed) => return ExitCode::SUCCESS,
            Err(code) => return ExitCode::from(code),
        }
        std::thread::sleep(interval);
    }
}

/// `netpulse check run`: every selected check once, concurrently; a check
/// whose dependency failed shows as blocked (and is not run unless it
/// says `run_when_blocked`).
fn check_run(name: Option<String>, config: Option<PathBuf>, output: Output) -> ExitCode {
    use netpulse::checks::engine::{Engine, State};
    let path = run::config_path(config);
    let cfg = match netpulse::settings::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut specs = cfg.checks.clone();
    if let Some(n) = &name {
        if !specs.iter().any(|s| &s.name == n) {
            let known: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            eprintln!(
                "no check named `{n}` in {} (checks: {})",
                path.as_deref()
                    .map_or("<embedded default>".into(), |p| p.display().to_string()),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
            return ExitCode::from(2);
        }
        specs.retain(|s| &s.name == n);
        // A single check runs without its dependencies.
        for s in &mut specs {
            s.depends_on.clear();
        }
    }
    if specs.is_empty() {
        eprintln!("no checks configured");
        return ExitCode::from(2);
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // One run each, and thresholds of one: this is a verdict, not a schedule.
    for s in &mut specs {
        s.failure_threshold = 1;
        s.success_threshold = 1;
    }
    let engine = Engine::new(specs, 32, Default::default(), Default::default());
    let view = rt.block_on(async {
        // Dependencies first: a check runs once its dependencies have.
        let mut done: std::collections::BTreeSet<String> = Default::default();
        let all = engine.view();
        while done.len() < all.len() {
            let ready: Vec<_> = all
                .iter()
                .filter(|v| !done.contains(&v.spec.name))
                .filter(|v| v.spec.depends_on.iter().all(|d| done.contains(d)))
                .map(|v| v.spec.clone())
                .collect();
            if ready.is_empty() {
                break;
            }
            let mut tasks = Vec::new();
            for spec in ready {
                done.insert(spec.name.clone());
                if !spec.run_when_blocked && engine.state(&spec.name) == State::Blocked {
                    continue;
                }
                let e = engine.clone();
                tasks.push(tokio::spawn(async move { e.run_now(&spec.name).await }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        engine.view()
    });
    let ok = view.iter().all(|v| v.state == State::Up);
    let text = match output {
        Output::Json => {
            let rows: Vec<netpulse::cli::CheckRun> = view
                .iter()
                .map(netpulse::cli::CheckRun::from_view)
                .collect();
            format!(
                "{}\n",
                serde_json::to_string_pretty(&rows).unwrap_or_default()
            )
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = view
                .iter()
                .map(|v| {
                    let last = v.status.last.as_ref();
                    vec![
                        v.spec.name.clone(),
                        v.spec.kind.as_str().to_string(),
                        v.state.as_str().to_string(),
                        last.map_or("-".into(), |l| {
                            format!("{:.1} ms", l.duration.as_secs_f64() * 1000.0)
                        }),
                        match (v.state, last) {
                            (State::Blocked, _) => "a dependency is down".to_string(),
                            (_, Some(l)) => l
                                .explanation
                                .clone()
                                .or_else(|| l.error.clone())
                                .unwrap_or_else(|| v.spec.target()),
                            (_, None) => v.spec.target(),
                        },
                    ]
                })
                .collect();
            netpulse::cli::table(
                &["CHECK", "KIND", "STATE", "TIME", "DETAIL"],
                &rows,
                &[3],
                Some(2),
                netpulse::cli::color(),
            )
        }
    };
    // A closed pipe (`| head`) cuts the report short, not the verdict.
    if let Err(code) = netpulse::cli::print(text) {
        return ExitCode::from(code);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
