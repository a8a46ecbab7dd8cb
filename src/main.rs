//! interlude: one binary, the daemon and its control client. This file only
//! dispatches the command line into the library (`lib.rs`).

use std::process::ExitCode;

use clap::Parser;

use interlude::cli::{Cli, Command};
use interlude::{cli, config, control, daemon};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        None | Some(Command::Run) => daemon::run(&cli.config, control::serve),
        Some(Command::Check) => check(&cli),
        Some(client_command) => cli::client::run(client_command, &cli.config),
    }
}

/// `interlude check`: every problem on stderr (exit 2), or a one-line summary.
fn check(cli: &Cli) -> ExitCode {
    match config::load(&cli.config) {
        Ok(loaded) => {
            println!("{}: ok: {}", cli.config.display(), loaded.config.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(daemon::EXIT_CONFIG)
        }
    }
}
