//! Reporting every type error of a file, not only the first.
//!
//! serde stops at the first error. To go on, the document is parsed into a
//! YAML value, and after each error the offending node is repaired (an
//! unknown key or a bad optional value is dropped so its default applies, a
//! bad required value gets a placeholder) and deserialization runs again.
//! Each error is reported at the position its path has in the original
//! text. Rules checked after parsing then skip whatever holds a placeholder.

use serde_yaml::{Mapping, Value};

use super::locate::{Locations, Position};
use super::schema::Config;

/// More than this and the file is probably not an interlude config at all.
const MAX_ERRORS: usize = 50;

/// A type error: where (in the original text) and what.
pub struct TypeError {
    pub position: Option<Position>,
    pub message: String,
}

/// The outcome of a tolerant parse.
pub struct Recovered {
    /// The config as far as it could be read (with defaults and placeholders
    /// where errors were): only meaningful for further checks.
    pub config: Option<Config>,
    pub errors: Vec<TypeError>,
    /// Paths holding placeholders: later rule checks must skip them.
    pub placeholders: Vec<String>,
}

pub fn deserialize(text: &str, locations: &Locations) -> Recovered {
    // The first attempt reads the original text: its error positions are exact.
    let first = match serde_yaml::from_str::<Config>(text) {
        Ok(config) => {
            return Recovered {
                config: Some(config),
                errors: Vec::new(),
                placeholders: Vec::new(),
            };
        }
        Err(e) => e,
    };
    let mut errors = vec![TypeError {
        position: first.location().map(|l| (l.line(), l.column())),
        message: strip_location(&first.to_string()),
    }];
    let mut placeholders = Vec::new();
    // A syntax error leaves nothing to repair.
    let Ok(mut value) = serde_yaml::from_str::<Value>(text) else {
        return Recovered {
            config: None,
            errors,
            placeholders,
        };
    };
    let mut message = errors[0].message.clone();
    while errors.len() < MAX_ERRORS {
        let Some(repaired) = repair(&mut value, &message, placeholders.len()) else {
            break;
        };
        if let Some(placeholder) = repaired {
            placeholders.push(placeholder);
        }
        let Ok(again) = serde_yaml::to_string(&value) else {
            break;
        };
        match serde_yaml::from_str::<Config>(&again) {
            Ok(config) => {
                return Recovered {
                    config: Some(config),
                    errors,
                    placeholders,
                };
            }
            Err(e) => {
                message = strip_location(&e.to_string());
                if errors.iter().any(|known| known.message == message) {
                    break; // the repair did not take: stop rather than loop
                }
                let (path, what) = split_path(&message);
                let position = match quoted_field(what, "unknown field `") {
                    Some(key) if !path.is_empty() => locations.find_key(&format!("{path}.{key}")),
                    Some(key) => locations.find_key(key),
                    None => locations.find(path),
                };
                errors.push(TypeError {
                    position,
                    message: message.clone(),
                });
            }
        }
    }
    Recovered {
        config: None,
        errors,
        placeholders,
    }
}

/// serde_yaml appends " at line L column C" to its messages; we print the
/// location up front instead, in the `file:line:column:` form editors follow.
pub fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(cut) => message[..cut].to_string(),
        None => message.to_string(),
    }
}

/// serde_yaml prefixes a message with the path of the node (`proxies[0].listen: ...`).
fn split_path(message: &str) -> (&str, &str) {
    match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') => (path, rest),
        _ => ("", message),
    }
}

/// Repairs the node `message` complains about. `None`: nothing to repair.
/// `Some(Some(path))`: a placeholder was put at `path`.
fn repair(value: &mut Value, message: &str, serial: usize) -> Option<Option<String>> {
    let (path, what) = split_path(message);
    let segments = parse_path(path)?;
    if let Some(key) = quoted_field(what, "unknown field `") {
        node(value, &segments)?.as_mapping_mut()?.remove(key)?;
        return Some(None);
    }
    if let Some(key) = quoted_field(what, "missing field `") {
        let placeholder = placeholder(key, serial)?;
        node(value, &segments)?
            .as_mapping_mut()?
            .insert(key.into(), placeholder);
        return Some(Some(format!("{path}.{key}")));
    }
    let (last, parent) = segments.split_last()?;
    let parent_node = node(value, parent)?;
    match last {
        Segment::Key(key) => {
            let mapping: &mut Mapping = parent_node.as_mapping_mut()?;
            match placeholder(key, serial) {
                Some(placeholder) => {
                    mapping.insert(key.as_str().into(), placeholder);
                    Some(Some(path.to_string()))
                }
                None => mapping.remove(key.as_str()).map(|_| None),
            }
        }
        Segment::Index(index) => {
            let items = parent_node.as_sequence_mut()?;
            let item = items.get_mut(*index)?;
            // A list item keeps its place, so later items keep their paths.
            *item = placeholder("address", serial)?;
            Some(Some(path.to_string()))
        }
    }
}

fn quoted_field<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split_once('`').map(|(field, _)| field)
}

/// A valid stand-in for a required value, unique per repair.
fn placeholder(key: &str, serial: usize) -> Option<Value> {
    let text = match key {
        "name" => format!("invalid-{serial}"),
        "listen" | "address" => format!("unix:/invalid/{serial}"),
        "backends" => {
            return Some(Value::Sequence(vec![Value::String(format!(
                "unix:/invalid/{serial}"
            ))]));
        }
        "cert" | "key" => "/dev/null".to_string(),
        _ => return None,
    };
    Some(Value::String(text))
}

enum Segment {
    Key(String),
    Index(usize),
}

fn parse_path(path: &str) -> Option<Vec<Segment>> {
    let mut segments = Vec::new();
    if path.is_empty() {
        return Some(segments);
    }
    for part in path.split('.') {
        let (key, mut indexes) = match part.find('[') {
            Some(cut) => (&part[..cut], &part[cut..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            segments.push(Segment::Key(key.to_string()));
        }
        while let Some(rest) = indexes.strip_prefix('[') {
            let (number, after) = rest.split_once(']')?;
            segments.push(Segment::Index(number.parse().ok()?));
            indexes = after;
        }
    }
    Some(segments)
}

fn node<'a>(value: &'a mut Value, segments: &[Segment]) -> Option<&'a mut Value> {
    segments.iter().try_fold(value, |node, segment| match segment {
        Segment::Key(key) => node.as_mapping_mut()?.get_mut(key.as_str()),
        Segment::Index(index) => node.as_sequence_mut()?.get_mut(*index),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recover(text: &str) -> Recovered {
        deserialize(text, &Locations::index(text))
    }

    fn report(text: &str) -> Vec<String> {
        recover(text)
            .errors
            .into_iter()
            .map(|e| match e.position {
                Some((line, column)) => format!("{line}:{column} {}", e.message),
                None => format!("?:? {}", e.message),
            })
            .collect()
    }

    #[test]
    fn every_type_error_and_unknown_key_is_reported() {
        let text = "\
shutdown:
  grace: 5s
log:
  levle: debug
proxies:
  - name: a
    listen: 127.0.0.1
    connect_timeout: fast
    backends: [127.0.0.1:1, nope]
";
        let found = report(text);
        assert_eq!(found.len(), 5, "{found:#?}");
        assert!(found[0].starts_with("2:3 shutdown: unknown field `grace`"));
        assert!(
            found[1].starts_with("4:3 log: unknown field `levle`"),
            "{}",
            found[1]
        );
        assert!(found[2].starts_with("7:13 proxies[0].listen: invalid address"));
        assert!(found[3].starts_with("8:22 proxies[0].connect_timeout: invalid duration"));
        assert!(found[4].starts_with("9:29 proxies[0].backends[1]: invalid address"));
    }

    #[test]
    fn a_repaired_config_is_returned_with_its_placeholders() {
        let recovered = recover("proxies:\n  - listen: 127.0.0.1:1\n    backends: [127.0.0.1:2]\n");
        assert_eq!(recovered.errors.len(), 1);
        assert!(recovered.errors[0].message.contains("missing field `name`"));
        assert_eq!(recovered.placeholders, ["proxies[0].name"]);
        assert!(recovered.config.is_some());
    }

    #[test]
    fn syntax_errors_stop_at_the_first() {
        let found = report("proxies: [\n  - a: b\n");
        assert_eq!(found.len(), 1);
    }

    #[test]
    fn a_document_of_the_wrong_shape_is_one_error() {
        assert_eq!(report("- 1\n- 2\n").len(), 1);
        assert_eq!(report("proxies: 5\n").len(), 1);
    }
}
