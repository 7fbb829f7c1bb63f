//! The `netpulse` command line: `run` (the agent) and `config check`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use netpulse::{config, run};

#[derive(Parser)]
#[command(
    name = "netpulse",
    version,
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
    },
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file; prints every problem as file:line:col and exits 2.
    Check {
        #[arg(long, short, env = "NETPULSE_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run { config } => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("netpulse: starting the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(run::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("netpulse: {}", netpulse::error_chain(&e));
                    ExitCode::from(e.exit_code() as u8)
                }
            }
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let path = run::config_path(config);
            match config::load(path.as_deref()) {
                Ok(l) => {
                    let n: usize = l.services.iter().map(|s| s.endpoints.len()).sum();
                    println!(
                        "{}: ok ({} services, {} endpoints)",
                        path.as_deref()
                            .map_or("<embedded default>".into(), |p| p.display().to_string()),
                        l.services.len(),
                        n
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
