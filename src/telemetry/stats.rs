//! The periodic stats line: every `stats.interval`, one line per proxy with
//! its gauges and what its counters did since the last line (and in total).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

use crate::backends::Role;
use crate::config::Mode;
use crate::proxy::Proxy;

#[derive(Default, Clone, Copy)]
struct Totals {
    accepted: u64,
    rejected: u64,
    bytes_in: u64,
    bytes_out: u64,
    responses_5xx: u64,
}

/// Remembers the totals of the last line, per proxy name.
#[derive(Default)]
pub struct StatsLog {
    last: HashMap<String, Totals>,
}

impl StatsLog {
    pub fn log(&mut self, proxies: &[&Proxy]) {
        let mut seen = HashMap::with_capacity(proxies.len());
        for proxy in proxies {
            let stats = &proxy.stats;
            let mut now = Totals {
                accepted: stats.accepted.load(Relaxed),
                rejected: stats.rejected.load(Relaxed),
                bytes_in: stats.bytes_in.load(Relaxed),
                bytes_out: stats.bytes_out.load(Relaxed),
                responses_5xx: 0,
            };
            let before = self.last.get(&*proxy.name).copied().unwrap_or_default();
            let settings = proxy.settings.borrow().clone();
            let serving: Vec<_> = settings
                .backends
                .backends
                .iter()
                .filter(|b| b.role() == Role::Serving)
                .collect();
            let up = serving.iter().filter(|b| b.is_up()).count();
            // The same line for every proxy, with the request counts of
            // mode http added.
            macro_rules! stats_line {
                ($($http:tt)*) => {
                    tracing::info!(
                        proxy = %proxy.name,
                        paused = proxy.gate.state().paused(),
                        active = stats.active.load(Relaxed),
                        held = proxy.gate.held(),
                        accepted = now.accepted - before.accepted,
                        accepted_total = now.accepted,
                        rejected = now.rejected - before.rejected,
                        rejected_total = now.rejected,
                        bytes_in = now.bytes_in - before.bytes_in,
                        bytes_in_total = now.bytes_in,
                        bytes_out = now.bytes_out - before.bytes_out,
                        bytes_out_total = now.bytes_out,
                        backends_up = %format!("{up}/{}", serving.len()),
                        $($http)*
                        "stats"
                    )
                };
            }
            if settings.mode == Mode::Http {
                let errors = stats.responses[4].load(Relaxed);
                stats_line!(
                    requests = now.accepted - before.accepted,
                    responses_5xx = errors - before.responses_5xx,
                );
                now.responses_5xx = errors;
            } else {
                stats_line!();
            }
            seen.insert(proxy.name.to_string(), now);
        }
        self.last = seen;
    }
}

/// The one-line summary systemd shows: "3 proxies, 1 paused, 42 active, 7 held".
pub fn summary(proxies: &[&Proxy]) -> String {
    let paused = proxies.iter().filter(|p| p.gate.state().paused()).count();
    let active: u64 = proxies.iter().map(|p| p.stats.active.load(Relaxed)).sum();
    let held: u64 = proxies.iter().map(|p| p.gate.held()).sum();
    format!(
        "{} prox{}, {paused} paused, {active} active, {held} held",
        proxies.len(),
        if proxies.len() == 1 { "y" } else { "ies" }
    )
}
