//! The state file loader on arbitrary bytes, then what start-up does with
//! what it accepted: restore pauses, and put a deployed backend set whose
//! file list still matches into service (its balancing schedule).
#![no_main]

use interlude::backends::balance::smooth_schedule;
use interlude::config::{Address, BackendConfig};
use interlude::daemon::state;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(saved) = state::parse(data) else {
        return;
    };
    for record in saved.paused.values() {
        let _ = record.to_pause();
    }
    for record in saved.backends.values() {
        // The config file's list as the record remembers it: start-up
        // compares it with the file's and keeps the deployed set if equal.
        let file: Option<Vec<BackendConfig>> = record
            .file
            .iter()
            .map(|b| {
                Some(BackendConfig {
                    address: Address::parse(&b.address).ok()?,
                    weight: b.weight,
                })
            })
            .collect();
        let Some(file) = file else { continue };
        if let Some(deployed) = record.applies_to(&file) {
            let weights: Vec<u32> = deployed.iter().map(|b| b.weight).collect();
            let _ = smooth_schedule(&weights);
        }
    }
});
