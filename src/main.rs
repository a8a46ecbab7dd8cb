//! interlude: one binary, the daemon and its control client. This file only
//! dispatches the command line into the library (`lib.rs`), and picks the
//! allocator (which must be the binary's choice).

use std::process::ExitCode;

use clap::Parser;

use interlude::cli::{Cli, Command};
use interlude::{cli, control, daemon};

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
// SAFETY: `_rjem_malloc_conf` is the one symbol jemalloc reads its options
// from, with the C type `const char *`; nothing else defines it, and the
// string it points to is static and NUL-terminated.
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
        Some(Command::Check) => cli::check(&cli.config),
        Some(Command::Completions { shell }) => {
            cli::write_completions(*shell, &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Some(client_command) => cli::client::run(client_command, &cli.config),
    }
}
