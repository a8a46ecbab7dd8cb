//! The config loader on arbitrary text: `config::parse` must answer (a
//! config, or problems), never panic, and locate what it can.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match interlude::config::parse(text, Path::new("fuzz.yaml")) {
        Ok(loaded) => {
            // What `check` prints of a valid config.
            let _ = loaded.config.summary();
        }
        Err(error) => {
            assert!(!error.problems.is_empty(), "an error without a problem");
            let _ = error.to_string();
        }
    }
    // `interlude reload` reads these from a file even when it is invalid.
    let _ = interlude::config::control_settings_from_text(text);
});
