//! Every key the config file accepts, read off the serde definitions
//! themselves: the field lists that `#[derive(Deserialize)]` generates
//! (renames applied, skipped fields left out). Documentation checks (the
//! manual-page test) compare against this, so a new key cannot go
//! undocumented and no copy of the schema has to be kept by hand.
//!
//! How: a deserializer that holds no data walks the schema. Asked for a
//! struct, it notes the struct's fields; to look inside one field it offers
//! a map with only that key. A struct read through a hand-written
//! `Deserialize` (a backend given as a string or a mapping) reveals its
//! fields through the "unknown field" error that `deny_unknown_fields`
//! raises for a key no struct has.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;
use serde::de::value::StrDeserializer;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::Config;

/// Deeper than any key path of the schema; bounds the walk.
const MAX_DEPTH: usize = 8;
/// A key no struct has, to make a struct name its fields.
const PROBE_KEY: &str = "\u{1}probe";

/// Every key of the config file, at any depth, as written in YAML.
pub fn all() -> BTreeSet<&'static str> {
    let found = RefCell::new(Found::default());
    let mut paths: Vec<Vec<&'static str>> = vec![Vec::new()];
    while let Some(path) = paths.pop() {
        // Every walk ends in a `Stop`: only what it noted matters.
        let _ = Config::deserialize(Walker {
            path: &path,
            found: &found,
        });
        let structs = std::mem::take(&mut found.borrow_mut().structs);
        for fields in structs {
            for field in fields {
                if path.len() < MAX_DEPTH {
                    let mut deeper = path.clone();
                    deeper.push(field);
                    paths.push(deeper);
                }
            }
        }
    }
    found.into_inner().keys
}

#[derive(Default)]
struct Found {
    keys: BTreeSet<&'static str>,
    /// Field lists of the structs at the end of the current path.
    structs: Vec<&'static [&'static str]>,
}

impl Found {
    fn note(&mut self, fields: &'static [&'static str]) {
        self.keys.extend(fields.iter().copied());
        self.structs.push(fields);
    }
}

/// Ends every walk; carries a struct's field list out of `unknown_field`.
#[derive(Debug)]
struct Stop(Option<&'static [&'static str]>);

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("walk ended")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Stop {
        Stop(None)
    }

    fn unknown_field(_: &str, expected: &'static [&'static str]) -> Stop {
        Stop(Some(expected))
    }
}

/// Follows `path` (field names; sequences and options are see-through)
/// and notes the fields of the struct found at its end.
#[derive(Clone, Copy)]
struct Walker<'a> {
    path: &'a [&'static str],
    found: &'a RefCell<Found>,
}

impl<'de> Deserializer<'de> for Walker<'_> {
    type Error = Stop;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        match self.path.split_first() {
            None => {
                self.found.borrow_mut().note(fields);
                Err(Stop(None))
            }
            Some((first, _)) if !fields.contains(first) => Err(Stop(None)),
            Some(_) => visitor.visit_map(OneKey {
                walker: self,
                key_given: false,
            }),
        }
    }

    /// A hand-written `Deserialize` that accepts a mapping: offer the next
    /// key, or at the path's end a probe that makes the struct name its
    /// fields. Scalars' visitors refuse a map, which ends the walk.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        if self.path.is_empty() {
            visitor.visit_map(Probe { found: self.found })
        } else {
            visitor.visit_map(OneKey {
                walker: self,
                key_given: false,
            })
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_seq(OneElement { walker: Some(self) })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// A mapping with one key: the next field of the path.
struct OneKey<'a> {
    walker: Walker<'a>,
    key_given: bool,
}

impl<'de> MapAccess<'de> for OneKey<'_> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Stop> {
        let Some((first, _)) = self.walker.path.split_first() else {
            return Ok(None);
        };
        if std::mem::replace(&mut self.key_given, true) {
            return Ok(None);
        }
        seed.deserialize(StrDeserializer::<Stop>::new(first)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        let rest = self.walker.path.get(1..).unwrap_or_default();
        seed.deserialize(Walker {
            path: rest,
            found: self.walker.found,
        })
    }
}

/// A mapping whose one key no struct has: a struct that denies unknown
/// fields answers with its field list.
struct Probe<'a> {
    found: &'a RefCell<Found>,
}

impl<'de> MapAccess<'de> for Probe<'_> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Stop> {
        match seed.deserialize(StrDeserializer::<Stop>::new(PROBE_KEY)) {
            Err(Stop(Some(fields))) => {
                self.found.borrow_mut().note(fields);
                Err(Stop(None))
            }
            Err(stop) => Err(stop),
            // A mapping that takes any key (none in the schema today) has
            // no fields to note.
            Ok(_) => Err(Stop(None)),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, _seed: V) -> Result<V::Value, Stop> {
        Err(Stop(None))
    }
}

/// A sequence of one element, walked further along the same path.
struct OneElement<'a> {
    walker: Option<Walker<'a>>,
}

impl<'de> SeqAccess<'de> for OneElement<'_> {
    type Error = Stop;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Stop> {
        match self.walker.take() {
            Some(walker) => seed.deserialize(walker).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_at_every_depth_and_through_hand_written_impls() {
        let keys = all();
        for key in [
            "log",
            "proxies",
            "grace_period",
            "when_paused",
            "bypass",
            "user_agents",
            "handshake_timeout",
            "expect_status",
            "address",
            "weight",
        ] {
            assert!(keys.contains(key), "missing {key}: {keys:?}");
        }
        assert!(!keys.contains(PROBE_KEY));
    }
}
