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
        Some(Command::Completions { shell }) => {
            interlude::cli::write_completions(*shell, &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Some(client_command) => cli::client::run(client_command, &cli.config),
    }
}

/// `interlude check`: every problem on stderr (exit 2), or a one-line
/// summary. Beyond the file itself it tries what `run` needs from this
/// machine (log file, state directory) and leaves nothing behind.
fn check(cli: &Cli) -> ExitCode {
    let checked = config::read(&cli.config).and_then(|text| {
        let loaded = config::parse(&text, &cli.config)?;
        let problems = daemon::preflight::check(&loaded.config);
        if problems.is_empty() {
            Ok(loaded)
        } else {
            Err(config::locate_problems(&text, &cli.config, problems))
        }
    });
    match checked {
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
