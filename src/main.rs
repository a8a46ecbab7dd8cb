//! interlude: one binary, the daemon and its control client. This file only
//! dispatches the command line.

mod backends;
mod cli;
mod config;
mod daemon;
mod proxy;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None | Some(Command::Run) => daemon::run(&cli.config),
        Some(Command::Check) => check(&cli),
        Some(other) => {
            let name = format!("{other:?}");
            let name = name
                .split([' ', '{'])
                .next()
                .unwrap_or("this command")
                .to_lowercase();
            eprintln!("interlude: `{name}` is not implemented yet");
            ExitCode::from(daemon::EXIT_RUNTIME)
        }
    }
}

/// `interlude check`: every problem on stderr (exit 2), or a one-line summary.
fn check(cli: &Cli) -> ExitCode {
    match config::load(&cli.config) {
        Ok(config) => {
            println!("{}: ok: {}", cli.config.display(), config.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(daemon::EXIT_CONFIG)
        }
    }
}
