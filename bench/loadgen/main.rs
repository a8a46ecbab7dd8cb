//! Load generator and backend for `bench/run`: the command line (one clap
//! subcommand per mode) and the dispatch to the mode's file. Uses tokio and
//! std, plus the crate's own dependencies for the command line (clap), TLS
//! (tokio-rustls with ring) and signals (rustix).
//!
//! Every client mode prints exactly one `key=value ...` line on stdout
//! (`slowloris` adds progress lines after it), which `bench/run` reads field by
//! field. Timed modes run a fixed warm-up (not counted), then measure over
//! `--seconds`, then exit without waiting for in-flight operations, so a run
//! never outlasts its budget. `loadgen help MODE` describes each mode.

mod common;
mod conn;
mod connrate;
mod control;
mod floor;
mod freeports;
mod held;
mod http;
mod http_load;
mod idle;
mod procfs;
mod relay;
mod reload;
mod rr;
mod serve;
mod slowloris;
mod throughput;
mod upgrade;
mod upgrade_live;

use std::process::exit;

use clap::{Parser, Subcommand};

use crate::common::{TimedArgs, positive_count};

#[derive(Parser)]
#[command(name = "loadgen", about = "Load generator and backend for bench/run")]
struct Cli {
    /// Tokio worker threads.
    #[arg(long, global = true, default_value_t = 2, value_parser = positive_count)]
    threads: usize,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Backend: echo, sink, tag or HTTP/1.1, picked by each connection's first byte.
    ///
    /// The first byte of each connection picks what it does: 'E' echo,
    /// 'S' sink (read and discard), 'T' answer the tag byte and close (so a client
    /// can tell backends apart); 'G', 'H' or 'P' (GET, HEAD, POST/PUT) make it a
    /// keep-alive HTTP/1.1 server: `GET /small` answers a 64-byte body, `GET /1m`
    /// a 1 MiB body, anything else a 404; Content-Length framing.
    Serve(serve::Args),
    /// Bulk upload to the sink, 64 KiB writes as fast as they go; MB/s.
    Throughput(TimedArgs),
    /// 64-byte request/response on keep-alive connections (echo); req/s, latency.
    Rr(TimedArgs),
    /// Each worker loops: connect, 64-byte echo, close; conn/s.
    Connrate(TimedArgs),
    /// Keep-alive connections each looping `GET PATH` (default /small), one
    /// request at a time; req/s, latency and body MB/s.
    HttpRr(http_load::Args),
    /// As http-rr with PATH /1m by default (1 MiB bodies).
    HttpDownload(http_load::Args),
    /// Open N connections (one 1-byte echo each, so they are set up end to
    /// end), print the result line, hold them.
    Idle(idle::Args),
    /// Keep N connections sending an HTTP request head that never ends.
    Slowloris(slowloris::Args),
    /// interlude only: hold N paused connections, then time the resume.
    ///
    /// Pause interlude (POST /pause), open N connections that each
    /// send 'E' plus one byte and are held, settle, check that none reached the
    /// backend, then POST /resume and time until every client got its echo.
    Held(held::Args),
    /// interlude only: as held, with one HTTP request per connection.
    ///
    /// As held, but each connection sends one `GET /small` (the held unit is
    /// the request), and after the resume every client must get a 200 with the
    /// 64-byte body.
    HttpHeld(held::Args),
    /// The no-proxy floor of held: N clients connect to the backend at once.
    ///
    /// Create N sockets, start N client tasks and let them all go at once:
    /// each connects straight to the backend, sends 'E' plus one byte and
    /// waits for its echo; time from the start until the last echo, as the
    /// held test times a resume of N held clients.
    Floor(floor::Args),
    /// The no-proxy floor of http-held: as floor, one `GET /small` each.
    HttpFloor(floor::Args),
    /// interlude only: time config reloads by SIGHUP.
    ///
    /// Swap its config between backends tagged A and B, send SIGHUP and time
    /// until a new connection is answered by the other backend.
    ReloadLatency(reload::Args),
    /// Upgrade the proxy's process under load (interlude or HAProxy).
    ///
    /// Run a load (new connections, or keep-alive HTTP requests) through the
    /// proxy while replacing its process N times (`interlude upgrade` after a
    /// new binary was renamed over the one it runs from, or a HAProxy master
    /// CLI `reload`); count failed operations, the longest gap any client saw
    /// during a switch, and the time until the new process served.
    Upgrade(upgrade::Args),
    /// Print N free loopback TCP ports (below the ephemeral range), one line.
    Freeports(freeports::Args),
    /// The least a TCP proxy can do: a ceiling for the small-request rows.
    ///
    /// One epoll loop and one SO_REUSEPORT listener per --threads;
    /// each client's backend connected in the accept; then read once, write
    /// whole, each way. No limits, timeouts or state shared between threads.
    Relay(relay::Args),
}

fn main() {
    let cli = Cli::parse();
    if let Mode::Freeports(a) = &cli.mode {
        freeports::run(a.count);
        return;
    }
    if let Mode::Relay(a) = cli.mode {
        relay::run(a, cli.threads);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads)
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("loadgen: tokio runtime: {e}");
            exit(1)
        });
    match cli.mode {
        Mode::Serve(a) => rt.block_on(serve::run(a)),
        Mode::Throughput(a) => rt.block_on(throughput::run(a.start())),
        Mode::Rr(a) => rt.block_on(rr::run(a.start())),
        Mode::Connrate(a) => rt.block_on(connrate::run(a.start())),
        Mode::HttpRr(a) => rt.block_on(http_load::run(a, http::HTTP_SMALL_PATH)),
        Mode::HttpDownload(a) => rt.block_on(http_load::run(a, http::HTTP_LARGE_PATH)),
        Mode::Idle(a) => rt.block_on(idle::run(a)),
        Mode::Slowloris(a) => rt.block_on(slowloris::run(a)),
        Mode::Held(a) => rt.block_on(held::run(a, false)),
        Mode::HttpHeld(a) => rt.block_on(held::run(a, true)),
        Mode::Floor(a) => rt.block_on(floor::run(a, false)),
        Mode::HttpFloor(a) => rt.block_on(floor::run(a, true)),
        Mode::ReloadLatency(a) => rt.block_on(reload::run(a)),
        Mode::Upgrade(a) => rt.block_on(upgrade::run(a)),
        Mode::Freeports(_) | Mode::Relay(_) => {}
    }
    // Do not wait for tasks still blocked in I/O: the measurement is over.
    exit(0);
}
