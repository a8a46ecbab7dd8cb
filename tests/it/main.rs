//! The integration tests: one test binary (one link, one place for
//! fixtures), a module per area. Each runs the real `interlude` binary
//! against real sockets on loopback; `common` holds the fixtures.

mod common;

mod access_log;
mod backends;
mod bounded_inputs;
mod config_errors;
mod control_api;
mod first_run;
mod forwarding;
mod fuzz_regressions;
mod http;
mod lifecycle;
mod limits;
mod live_move;
mod manual;
mod operations;
mod pause;
mod proxy_protocol;
mod reload;
mod systemd_sockets;
mod tls;
mod upgrade;
