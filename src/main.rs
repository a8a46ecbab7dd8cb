//! interlude: one binary, the daemon and its control client. This file only
//! dispatches the command line into the library (`lib.rs`).

use std::process::ExitCode;

use clap::Parser;

use interlude::cli::{Cli, Command};
use interlude::{cli, config, control, daemon};

/// jemalloc rather than glibc's malloc, so that memory a burst of
/// connections took (say, the read buffers of a flood of unfinished
/// request heads) goes back to the system once they are gone: glibc keeps
/// freed memory in its arenas, jemalloc's background thread returns pages
/// unused for about a second (`MALLOC_CONF` below).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start: a background thread purges
/// freed pages (without it, purging waits for allocations that an idle
/// daemon does not make), dirty pages are purged after about 1 s rather
/// than 10 s, and straight away rather than kept as "muzzy" (MADV_FREE
/// pages still count in RSS until the kernel needs them).
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string pointer jemalloc reads (`const char *malloc_conf`).
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a static, immutable string.
unsafe impl Sync for MallocConf {}

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
