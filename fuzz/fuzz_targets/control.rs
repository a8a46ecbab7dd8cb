//! The control API's request parsing on arbitrary bytes: the deploy body
//! (`api::parse_deploy_body`, then the balancing schedule a deploy puts
//! into service), the query string (`api::Query`: `?proxy=`, `?timeout=`
//! through `Dur::parse` as `/wait-idle` reads it) and the percent-decoded
//! proxy name of `PUT /proxies/NAME/backends`.
#![no_main]

use interlude::backends::balance::smooth_schedule;
use interlude::config::Dur;
use interlude::control::api::{Query, parse_deploy_body, percent_decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(deploy) = parse_deploy_body(data) {
        assert!(!deploy.backends.is_empty());
        assert!(!deploy.timeout.is_zero());
        let weights: Vec<u32> = deploy.backends.iter().map(|b| b.weight).collect();
        let _ = smooth_schedule(&weights);
    }
    let text = String::from_utf8_lossy(data);
    let query = Query::parse(&text);
    let _ = query.all("proxy");
    if let Some(timeout) = query.first("timeout") {
        let _ = Dur::parse(timeout).map(Dur::non_zero);
    }
    let decoded = percent_decode(&text);
    if !text.contains(['%', '+']) {
        assert_eq!(decoded, text, "decoding changed text without escapes");
    }
});
