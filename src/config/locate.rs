//! Where a field path's value sits in a policy file's text, for the errors that the schema
//! walk finds by field path after the typed parse has stopped at its first.
//!
//! The plain YAML document keeps no positions, but the parser marks every error raised
//! while it reads a node with that node's line and column. So the text is read again with
//! a visitor that follows the path (`routes[1].messages.types`: key, index, key, key),
//! skips everything else, and raises an error on the node it was looking for: that
//! error's mark is the answer. One read per reading of the path; a path that goes through
//! a merge key, or a key with a `.` in it outside the claim maps, is not found and keeps
//! only its field path.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The error raised on the node found; anything else means it was not.
const FOUND: &str = "\u{0}wsgate: the node looked for";

#[derive(Clone)]
enum Step<'p> {
    Key(&'p str),
    Index(usize),
}

/// The maps whose keys are the file's own claim names, which may hold `.`, `[` and `]`
/// (`https://app.example.com/roles`, as Auth0 names its claims).
const CLAIM_MAPS: [&str; 3] = [".require_claims.", ".deny_claims.", ".forward_claims."];

/// The ways to read `path` as steps, most likely first: a claim name is the rest of the
/// path, or the rest but a last `[n]` (an element of `require_claims`' value list).
fn readings(path: &str) -> Vec<Vec<Step<'_>>> {
    let Some((map_end, _)) = CLAIM_MAPS
        .iter()
        .filter_map(|map| path.find(map).map(|at| (at + map.len() - 1, at)))
        .min_by_key(|&(_, at)| at)
    else {
        return steps(path).into_iter().collect();
    };
    let (map, claim) = (&path[..map_end], &path[map_end + 1..]);
    let Some(to_map) = steps(map) else {
        return Vec::new();
    };
    let with = |name, index: Option<usize>| {
        let mut steps = to_map.clone();
        steps.push(Step::Key(name));
        steps.extend(index.map(Step::Index));
        steps
    };
    let mut readings = vec![with(claim, None)];
    if let Some((name, index)) = claim.strip_suffix(']').and_then(|c| c.rsplit_once('[')) {
        if let Ok(index) = index.parse() {
            readings.push(with(name, Some(index)));
        }
    }
    readings
}

/// `routes[1].messages.types` as its steps; `None` for what is not a field path.
fn steps(path: &str) -> Option<Vec<Step<'_>>> {
    let mut steps = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        if key.is_empty() {
            return None;
        }
        steps.push(Step::Key(key));
        while let Some(index) = rest.strip_prefix('[') {
            let end = index.find(']')?;
            steps.push(Step::Index(index[..end].parse().ok()?));
            rest = &index[end + 1..];
        }
        if !rest.is_empty() {
            return None;
        }
    }
    Some(steps)
}

/// The line and column (1-based) where the value at `path` starts in `text`, or with
/// `key`, where the key that names it is (an unknown field is its key).
pub fn locate(text: &[u8], path: &str, key: bool) -> Option<(usize, usize)> {
    find(text, path, key, 0)
}

/// Where the second occurrence of the key that ends `path` is, in the map `path` leads
/// to: the place to edit for a "duplicate entry" error, which the parser marks at the
/// map's start.
pub fn locate_repeated_key(text: &[u8], path: &str) -> Option<(usize, usize)> {
    find(text, path, true, 1)
}

fn find(text: &[u8], path: &str, key: bool, skip: usize) -> Option<(usize, usize)> {
    readings(path).into_iter().find_map(|steps| {
        let error = Locator {
            steps: &steps,
            key,
            skip,
        }
        .deserialize(serde_yaml::Deserializer::from_slice(text))
        .err()?;
        if !error.to_string().contains(FOUND) {
            return None;
        }
        let at = error.location()?;
        Some((at.line(), at.column()))
    })
}

#[derive(Clone, Copy)]
struct Locator<'s, 'p> {
    steps: &'s [Step<'p>],
    /// The last step's key is the node looked for, not its value.
    key: bool,
    /// With `key`, how many occurrences of the last key to pass over first.
    skip: usize,
}

impl<'de> DeserializeSeed<'de> for Locator<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Locator<'_, '_> {
    /// A scalar: the node looked for when the path ends here, or a dead end.
    fn scalar<E: de::Error>(self) -> Result<(), E> {
        match self.steps {
            [] => Err(E::custom(FOUND)),
            _ => Ok(()),
        }
    }
}

impl<'de> Visitor<'de> for Locator<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (key, rest) = match self.steps {
            [] => return Err(de::Error::custom(FOUND)),
            [Step::Key(key), rest @ ..] => (*key, rest),
            [Step::Index(_), ..] => return Ok(()),
        };
        let last = self.key && rest.is_empty();
        let mut skip = self.skip;
        loop {
            let seed = Key {
                name: key,
                found: last && skip == 0,
            };
            let Some(matched) = map.next_key_seed(seed)? else {
                break;
            };
            if matched && last {
                // An occurrence passed over.
                skip = skip.saturating_sub(1);
                map.next_value::<IgnoredAny>()?;
            } else if matched {
                map.next_value_seed(Locator {
                    steps: rest,
                    ..self
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (index, rest) = match self.steps {
            [] => return Err(de::Error::custom(FOUND)),
            [Step::Index(index), rest @ ..] => (*index, rest),
            [Step::Key(_), ..] => return Ok(()),
        };
        let mut at = 0;
        loop {
            let more = if at == index {
                seq.next_element_seed(Locator {
                    steps: rest,
                    ..self
                })?
            } else {
                seq.next_element::<IgnoredAny>()?.map(|_| ())
            };
            if more.is_none() {
                return Ok(());
            }
            at += 1;
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.scalar()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        // A tagged node (`!tag value`): where the path ends, it is the node.
        self.scalar()
    }
}

/// A map's key: whether it is `name`; with `found`, a key that is raises the error that
/// marks it.
#[derive(Clone, Copy)]
struct Key<'p> {
    name: &'p str,
    found: bool,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map's key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        match key == self.name {
            true if self.found => Err(E::custom(FOUND)),
            matched => Ok(matched),
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        IgnoredAny.visit_map(map).map(|_| false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<bool, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_is_found_at_its_second_occurrence() {
        let text = b"version: 1\ndefaults:\n  messages:\n    per_second: 100\n    max_message_bytes: 1\n    burst: 3\n    max_message_bytes: 2\nroutes:\n  - path: /a\n  - {path: /b, name: x, name: y}\ndefaults: {}\n";
        let text = &text[..];
        assert_eq!(
            locate_repeated_key(text, "defaults.messages.max_message_bytes"),
            Some((7, 5))
        );
        assert_eq!(locate_repeated_key(text, "routes[1].name"), Some((10, 25)));
        assert_eq!(locate_repeated_key(text, "defaults"), Some((11, 1)));
        assert_eq!(locate_repeated_key(text, "version"), None);
    }

    #[test]
    fn finds_each_kind_of_node_in_block_and_flow_style() {
        let text = b"version: 1\nmax_connections: lots\ndefaults:\n  auth: {required: false, leeway_seconds: soon}\n  rate:\n    burst: -3\nroutes:\n  - path: /a\n  - path: /b\n    messages:\n      types: text\n    ip: {deny: [10.0.0.0/8, x]}\n";
        let text = &text[..];
        for (path, at) in [
            ("max_connections", Some((2, 18))),
            ("defaults.auth.leeway_seconds", Some((4, 43))),
            ("defaults.rate.burst", Some((6, 12))),
            ("defaults.rate", Some((6, 5))),
            ("routes[1].messages.types", Some((11, 14))),
            ("routes[1].ip.deny[1]", Some((12, 29))),
            ("routes[1]", Some((9, 5))),
            ("routes[2]", None),
            ("routes.x", None),
            ("defaults.auth.keys", None),
            ("", None),
            ("routes[x]", None),
        ] {
            assert_eq!(locate(text, path, false), at, "{path}");
        }
        // An unknown field is its key.
        assert_eq!(
            locate(text, "defaults.auth.leeway_seconds", true),
            Some((4, 27))
        );
        assert_eq!(locate(text, "routes[1].messages", true), Some((10, 5)));
        assert_eq!(locate(text, "version", true), Some((1, 1)));
        assert_eq!(locate(text, "routes[1].nmae", true), None);
    }

    #[test]
    fn a_claim_name_is_one_key_whatever_it_holds() {
        let text = b"version: 1\ndefaults:\n  auth:\n    forward_claims:\n      \"https://app.example.com/roles\": 0\n      routes[0]: 1\n    require_claims:\n      a.b[0]: [x, 2]\n      a.b: 3\nroutes:\n  - path: /a\n    auth: {deny_claims: {x.y: [1, 2]}}\n";
        let text = &text[..];
        for (path, at) in [
            (
                "defaults.auth.forward_claims.https://app.example.com/roles",
                Some((5, 40)),
            ),
            ("defaults.auth.forward_claims.routes[0]", Some((6, 18))),
            ("defaults.auth.require_claims.a.b[0][1]", Some((8, 19))),
            ("defaults.auth.require_claims.a.b", Some((9, 12))),
            ("defaults.auth.require_claims.a.b[0]", Some((8, 15))),
            ("routes[0].auth.deny_claims.x.y[1]", Some((12, 35))),
            ("defaults.auth.forward_claims.none", None),
        ] {
            assert_eq!(locate(text, path, false), at, "{path}");
        }
    }
}
