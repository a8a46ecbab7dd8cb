//! Unit tests of the state file: round trips, the rules a file must keep,
//! corrupt files moved aside.

use super::*;

#[test]
fn round_trip_and_corrupt_files_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(load(dir.path()).state, State::default());
    let mut state = State::default();
    let pause = RuntimePause {
        since: humantime::parse_rfc3339("2026-11-23T08:00:00Z").unwrap(),
        by: "api".into(),
    };
    state.paused.insert("web".into(), PauseRecord::from_pause(&pause));
    write_atomically(dir.path(), &state).unwrap();
    let loaded = load(dir.path()).state;
    assert_eq!(loaded, state);
    assert_eq!(loaded.paused["web"].to_pause(), Some(pause));
    std::fs::write(dir.path().join(FILE_NAME), "{not json").unwrap();
    let loaded = load(dir.path());
    assert_eq!(loaded.state, State::default());
    assert!(loaded.keep_off.is_none());
    assert!(!dir.path().join(FILE_NAME).exists(), "moved aside");
    let aside: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
}

fn refused(text: &str) -> String {
    match parse(text.as_bytes()) {
        Ok(state) => panic!("accepted {text}: {state:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn parse_applies_the_config_rules() {
    let deployed = |weight: &str, address: &str| {
        format!(
            r#"{{"backends": {{"web": {{"backends": [{{"address": "{address}", "weight": {weight}}}], "file": [{{"address": "127.0.0.1:1", "weight": 1}}]}}}}}}"#
        )
    };
    assert!(parse(deployed("5", "127.0.0.1:2").as_bytes()).is_ok());
    let message = refused(&deployed("4294967295", "127.0.0.1:2"));
    assert!(
        message.starts_with("backends.web.backends[0].weight: weight 4294967295 is out of range"),
        "{message}"
    );
    assert!(refused(&deployed("4294967296", "127.0.0.1:2")).contains("not a valid state file"));
    assert!(refused(&deployed("1", "nowhere")).contains("backends.web.backends[0].address"));
    assert!(refused("[]").contains("expected a JSON object"));
    assert!(refused(r#"{"paused": {"web": ["2026-11-23T08:00:00Z", "api"]}}"#).contains("paused.web"));
    assert!(refused("").contains("not a valid state file"));
    assert!(
        refused("{\"paused\": {\"web\": {\"since\": \"yesterday\", \"by\": \"api\"}}}")
            .contains("paused.web.since")
    );
    assert!(
        refused("{\"paused\": {\"a b\": {\"since\": \"2026-11-23T08:00:00Z\", \"by\": \"api\"}}}")
            .contains("not a proxy name")
    );
    assert!(refused("{\"pasued\": {}}").contains("unknown field"));
    assert!(
        refused(r#"{"backends": {"web": {"backends": [], "file": []}}}"#).contains("at least one backend")
    );
    assert_eq!(parse(b"{}").unwrap(), State::default());
}
