//! interlude: a zero-downtime proxy daemon for TCP, UNIX sockets and
//! HTTP/1.1. The library holds the daemon and its control client; the
//! `interlude` binary (`main.rs`) only parses the command line and calls in,
//! so tests, fuzz targets and the benchmark can use the real types.

pub mod backends;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod drain;
pub mod proxy;
pub mod sockets;
pub mod telemetry;
