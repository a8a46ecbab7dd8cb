//! The command line: one clap definition that is the single source of
//! `--help`, the dispatch in `main.rs` and the man page consistency test;
//! `client` runs the client commands against the control API, and `check`
//! is `interlude check`.

pub mod client;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "interlude",
    version,
    propagate_version = true,
    about = "Zero-downtime proxy for TCP, UNIX sockets and HTTP/1.1: pause, hold, resume, reload, deploy",
    long_about = "\
interlude is a zero-downtime proxy daemon.

It forwards TCP and UNIX socket connections to backends, in any mix.
In HTTP mode it is an HTTP/1.1 reverse proxy that holds requests, not
connections, and serves virtual hosts on a shared listener.
While a proxy is paused it accepts and holds new clients without contacting
any backend; on resume every held client carries on as if nothing happened.
A reload (a config file change, SIGHUP or `interlude reload`) applies the
file without dropping a connection.
A deploy (`interlude deploy`) replaces a proxy's backends once the new ones
are healthy and lets the old ones drain.
An upgrade (`interlude upgrade`) replaces the running daemon by the binary
now on disk without a restart: the new process takes over the listening
sockets, the run-time state and the held clients, and no connection is refused.

Without a subcommand it runs the daemon (same as `interlude run`).
Read more in `man interlude` (commands, signals, files) and
`man interlude.yaml` (every config key)."
)]
pub struct Cli {
    /// Configuration file
    #[arg(
        short = 'c',
        long = "config",
        global = true,
        env = "INTERLUDE_CONFIG",
        value_name = "FILE",
        default_value = crate::config::DEFAULT_CONFIG_PATH
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (the default)
    Run,
    /// Validate the configuration file; print each problem as file:line:column
    Check,
    /// Show what the daemon is doing
    Status {
        /// Print the /status JSON document
        #[arg(long)]
        json: bool,
        /// Only this proxy
        proxy: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Pause all proxies, or the named ones
    Pause {
        proxies: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Resume all proxies, or the named ones
    Resume {
        proxies: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Block until no forwarded connection is open; exit 1 on timeout
    WaitIdle {
        proxies: Vec<String>,
        /// Give up after this long (e.g. 30s)
        #[arg(long, value_name = "DUR")]
        timeout: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Reload the configuration file and report whether it was applied
    Reload {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Replace a proxy's backends: add the new, wait until healthy, drain the old
    Deploy {
        /// How long the new backends may take to become healthy
        #[arg(long, value_name = "DUR", default_value = crate::control::DEFAULT_DEPLOY_TIMEOUT)]
        timeout: String,
        proxy: String,
        #[arg(required = true, value_name = "ADDR")]
        addresses: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Replace the running daemon by the binary now on disk, handing over
    /// its sockets, run-time state and held clients
    #[command(long_about = "\
Replace the running daemon by the binary now on disk, handing over its
sockets, run-time state and held clients: no connection is refused.

The daemon starts the binary now at the path it was started from (after a
package upgrade, the new version) with the same arguments. Once the new
process has checked the config and is ready, the old one stops accepting
and hands over its held clients, and this command exits 0. If the new
process fails or is not ready within --timeout, it is ended, the old one
serves on unchanged, and this command exits 1 with its error.
Connections already forwarded finish in the old process, within
shutdown.grace_period. See UPGRADE in `man interlude`.")]
    Upgrade {
        /// How long the new process may take to serve
        #[arg(long, value_name = "DUR", default_value = crate::control::api::DEFAULT_UPGRADE_TIMEOUT)]
        timeout: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add backends to a proxy
    Add {
        proxy: String,
        #[arg(required = true, value_name = "ADDR")]
        addresses: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove backends from a proxy (their connections drain)
    Rm {
        proxy: String,
        #[arg(required = true, value_name = "ADDR")]
        addresses: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List backends: proxy, address, state, active connections
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
        /// Only this proxy
        proxy: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a shell completion script (the packages install them)
    #[command(hide = true)]
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

/// Writes the completion script for `shell`, generated from this very
/// definition, so it always knows every command and option.
pub fn write_completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "interlude", out);
}

/// How a client command reaches the daemon.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Control socket address (default: the config's control.listen)
    #[arg(long, value_name = "ADDR")]
    pub control: Option<String>,
    /// Bearer token for a TCP control listener (default: the config's control.token)
    #[arg(long, env = "INTERLUDE_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `interlude check`: every problem on stderr (exit 2), or a one-line
/// summary. Beyond the file itself it tries what `run` needs from this
/// machine (log file, state directory) and leaves nothing behind.
pub fn check(config_path: &Path) -> ExitCode {
    let checked = crate::config::read(config_path).and_then(|text| {
        let loaded = crate::config::parse(&text, config_path)?;
        let problems = crate::daemon::preflight::check(&loaded.config);
        if problems.is_empty() {
            Ok(loaded)
        } else {
            Err(crate::config::locate_problems(&text, config_path, problems))
        }
    });
    match checked {
        Ok(loaded) => {
            println!("{}: ok: {}", config_path.display(), loaded.config.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(crate::daemon::EXIT_CONFIG)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn completions_name_every_subcommand() {
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| c.get_name().to_string())
            .collect();
        assert!(names.len() >= 11, "{names:?}");
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            write_completions(shell, &mut script);
            let script = String::from_utf8(script).unwrap();
            for name in &names {
                assert!(script.contains(name.as_str()), "{shell}: no {name}");
            }
        }
    }

    #[test]
    fn no_subcommand_means_run() {
        let cli = Cli::try_parse_from(["interlude", "-c", "/x.yaml"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.config, PathBuf::from("/x.yaml"));
    }
}
