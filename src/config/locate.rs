//! Where each node of a YAML document starts, keyed by the same path syntax
//! serde_yaml uses in its errors (`proxies[1].backends[0]`).
//!
//! serde reports type errors with a location, but rules that span several
//! values (duplicate names, overlapping listeners) are checked after parsing,
//! when locations are gone; this index gives them back.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser};

/// 1-based line and column.
pub type Position = (usize, usize);

/// The deepest nesting of mappings and lists a config may have; a real one
/// needs 5 or 6. The limit keeps every later pass linear in the file size.
pub const MAX_DEPTH: usize = 64;

/// Refuses a document nested deeper than `MAX_DEPTH`, located at the node
/// that goes too deep. One streaming pass that stops there, so it costs at
/// most the first `MAX_DEPTH` levels however deep the file goes. The
/// scanner's own limit on flow nesting (`[[[[...`, about 256 levels, hit
/// while it looks ahead) is the same problem and reported alike; any other
/// syntax error is left to the full parse, which reports it with its
/// location.
pub fn check_depth(text: &str) -> Result<(), (Position, String)> {
    let too_deep = || format!("nested more than {MAX_DEPTH} levels deep");
    let mut depth = 0usize;
    for item in Parser::new_from_str(text) {
        let (event, span) = match item {
            Ok(item) => item,
            Err(e) if e.info().contains("recursion limit") => {
                let at = e.marker();
                return Err(((at.line(), at.col() + 1), too_deep()));
            }
            Err(_) => return Ok(()),
        };
        match event {
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(((span.start.line(), span.start.col() + 1), too_deep()));
                }
            }
            Event::MappingEnd | Event::SequenceEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
pub struct Locations {
    by_path: HashMap<String, Position>,
    /// Where the key of each mapping entry is (an unknown key is reported there).
    keys: HashMap<String, Position>,
}

enum Frame {
    Mapping { path: String, key: Option<String> },
    Sequence { path: String, next_index: usize },
}

impl Locations {
    /// Indexes `text`; a document that does not parse yields an empty index
    /// (serde has already reported why, with its own location).
    pub fn index(text: &str) -> Locations {
        let mut by_path = HashMap::new();
        let mut keys = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else { break };
            let position = (span.start.line(), span.start.col() + 1);
            let starts_node = matches!(
                event,
                Event::Scalar(..) | Event::Alias(_) | Event::SequenceStart(..) | Event::MappingStart(..)
            );
            if starts_node {
                let path = match stack.last_mut() {
                    None => String::new(),
                    Some(Frame::Sequence { path, next_index }) => {
                        *next_index += 1;
                        format!("{path}[{}]", *next_index - 1)
                    }
                    Some(Frame::Mapping { path, key }) => match key.take() {
                        Some(key) if path.is_empty() => key,
                        Some(key) => format!("{path}.{key}"),
                        None => {
                            // This node is a key: remember it; a complex key gets a
                            // placeholder so its own children do not pollute the index.
                            let name = match &event {
                                Event::Scalar(value, ..) => value.to_string(),
                                _ => "?".to_string(),
                            };
                            let entry = if path.is_empty() {
                                name.clone()
                            } else {
                                format!("{path}.{name}")
                            };
                            keys.entry(entry).or_insert(position);
                            *key = Some(name);
                            if let Event::MappingStart(..) | Event::SequenceStart(..) = event {
                                stack.push(placeholder_frame(&event));
                            }
                            continue;
                        }
                    },
                };
                by_path.entry(path.clone()).or_insert(position);
                match event {
                    Event::MappingStart(..) => stack.push(Frame::Mapping { path, key: None }),
                    Event::SequenceStart(..) => stack.push(Frame::Sequence { path, next_index: 0 }),
                    _ => {}
                }
            } else if matches!(event, Event::MappingEnd | Event::SequenceEnd) {
                stack.pop();
            }
        }
        Locations { by_path, keys }
    }

    /// The position of the key of the mapping entry at `path`.
    pub fn find_key(&self, path: &str) -> Option<Position> {
        self.keys.get(path).copied().or_else(|| self.find(path))
    }

    /// The position of `path`, or of its nearest ancestor present in the file
    /// (a key left to its default has no position of its own).
    pub fn find(&self, path: &str) -> Option<Position> {
        let mut path = path;
        loop {
            if let Some(position) = self.by_path.get(path) {
                return Some(*position);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

fn placeholder_frame(event: &Event) -> Frame {
    let path = "\u{0}complex-key".to_string();
    match event {
        Event::SequenceStart(..) => Frame::Sequence { path, next_index: 0 },
        _ => Frame::Mapping { path, key: None },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
log:
  level: info
proxies:
  - name: web
    listen: 127.0.0.1:80
    backends:
      - tcp://127.0.0.1:1
      - address: unix:/x.sock
        weight: 2
  - {name: db, listen: '127.0.0.1:81', backends: [a:1]}
";

    #[test]
    fn finds_block_and_flow_nodes() {
        let locations = Locations::index(DOC);
        assert_eq!(locations.find("log.level"), Some((2, 10)));
        assert_eq!(locations.find("proxies[0]"), Some((4, 5)));
        assert_eq!(locations.find("proxies[0].listen"), Some((5, 13)));
        assert_eq!(locations.find("proxies[0].backends[1].weight"), Some((9, 17)));
        assert_eq!(locations.find("proxies[1].name"), Some((10, 12)));
        assert_eq!(locations.find("proxies[1].backends[0]"), Some((10, 51)));
        assert_eq!(locations.find_key("proxies[0].backends[1].weight"), Some((9, 9)));
        assert_eq!(locations.find_key("log"), Some((1, 1)));
    }

    #[test]
    fn missing_keys_fall_back_to_their_parent() {
        let locations = Locations::index(DOC);
        assert_eq!(locations.find("proxies[0].health_check.interval"), Some((4, 5)));
        assert_eq!(locations.find("stats.interval"), None);
    }

    #[test]
    fn depth_is_limited_and_located() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(check_depth(&ok).is_ok());
        let deep = format!("a:\n  {}", "[".repeat(100));
        let ((line, column), message) = check_depth(&deep).unwrap_err();
        assert_eq!((line, column), (2, 2 + MAX_DEPTH), "{message}");
        assert!(message.contains("64 levels"), "{message}");
        let deeper = format!("a:\n  {}", "[".repeat(100_000));
        let ((line, _), message) = check_depth(&deeper).unwrap_err();
        assert_eq!(line, 2, "{message}");
        assert!(message.contains("64 levels"), "{message}");
        let mut block = String::new();
        for level in 0..70 {
            block.push_str(&format!("{}k{level}:\n", "  ".repeat(level)));
        }
        block.push_str(&format!("{}end: 1\n", "  ".repeat(70)));
        assert_eq!(check_depth(&block).unwrap_err().0.0, 65);
    }

    #[test]
    fn broken_documents_index_what_they_can() {
        let locations = Locations::index("a: [1, 2\nb: 3");
        assert_eq!(locations.find("b"), None);
    }
}
