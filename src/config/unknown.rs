//! Every unknown field of a policy file, every unknown value of a field with a fixed list
//! (`mode`, `http`, `compression`, `on_failure`) and every value of the wrong type or out
//! of its type's range, not only the first.
//!
//! The typed parse (`deny_unknown_fields` at every level) stops at the first field it does
//! not know or cannot read, so a file with three typos would take three rounds of `wsgate
//! check`. When the typed parse fails, the plain YAML document is walked against the
//! policy's JSON Schema (generated from the same structs, so it knows the same fields and
//! types) and every key the schema has no place for, every string none of its choices
//! names and every value none of its types takes is reported at its field path.

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

use super::FieldError;

/// The keys of `document` that the schema `root` does not allow, at their field paths.
pub fn unknown_fields(root: &Json, document: &Yaml) -> Vec<FieldError> {
    let mut found = Vec::new();
    walk(root, root, document, "", &mut found);
    found
}

/// Where a map's keys lead: the schema of each known property, the schema of any other
/// key (a map such as `require_claims`), or no other key at all.
#[derive(Default)]
struct Keys<'a> {
    properties: Vec<&'a serde_json::Map<String, Json>>,
    other: Option<&'a Json>,
    /// Some branch takes keys it does not name.
    open: bool,
    items: Option<&'a Json>,
    /// The strings the branches name (`const`, `enum`).
    variants: Vec<&'a str>,
    /// Some branch takes any string.
    any_string: bool,
    /// The JSON types the branches name; `untyped` when some branch takes any value.
    types: Vec<&'a str>,
    untyped: bool,
    /// The loosest bounds of the numeric branches (infinite where one has none; `None`
    /// when no branch is numeric).
    minimum: Option<f64>,
    maximum: Option<f64>,
}

impl Keys<'_> {
    /// Only the named properties are allowed.
    fn closed(&self) -> bool {
        !self.properties.is_empty() && !self.open && self.other.is_none()
    }
}

fn walk(root: &Json, schema: &Json, value: &Yaml, at: &str, found: &mut Vec<FieldError>) {
    let mut keys = Keys::default();
    branches(root, schema, &mut keys, 0);
    // A number or a boolean where a fixed list of names is expected (`compression: false`)
    // is an unknown variant, in the typed parse's words.
    let scalar = match value {
        Yaml::Bool(b) => Some(b.to_string()),
        Yaml::Number(n) => Some(n.to_string()),
        _ => None,
    };
    if let Some(scalar) = scalar.filter(|_| !keys.variants.is_empty() && !keys.any_string) {
        found.push(FieldError {
            field: at.to_owned(),
            message: unknown_variant(&scalar, &keys.variants),
        });
        return;
    }
    if let Some(message) = type_error(&keys, value) {
        found.push(FieldError {
            field: at.to_owned(),
            message,
        });
        return;
    }
    match value {
        Yaml::Mapping(map) => {
            for (key, child) in map {
                let Some(key) = key.as_str() else { continue };
                let path = if at.is_empty() {
                    key.to_owned()
                } else {
                    format!("{at}.{key}")
                };
                if let Some(sub) = keys.properties.iter().find_map(|p| p.get(key)) {
                    walk(root, sub, child, &path, found);
                } else if let Some(other) = keys.other {
                    walk(root, other, child, &path, found);
                } else if keys.closed() {
                    let mut names: Vec<&str> = keys
                        .properties
                        .iter()
                        .flat_map(|p| p.keys().map(String::as_str))
                        .collect();
                    names.sort_unstable();
                    names.dedup();
                    found.push(FieldError {
                        field: path,
                        message: format!(
                            "unknown field `{key}`, expected one of {}",
                            names
                                .iter()
                                .map(|n| format!("`{n}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
            }
        }
        Yaml::Sequence(items) => {
            if let Some(item) = keys.items {
                for (i, child) in items.iter().enumerate() {
                    walk(root, item, child, &format!("{at}[{i}]"), found);
                }
            }
        }
        Yaml::Tagged(tagged) => walk(root, schema, &tagged.value, at, found),
        Yaml::String(value)
            if !keys.variants.is_empty()
                && !keys.any_string
                && !keys.variants.contains(&value.as_str()) =>
        {
            found.push(FieldError {
                field: at.to_owned(),
                message: unknown_variant(value, &keys.variants),
            });
        }
        _ => {}
    }
}

/// serde's wording for a value none of a fixed list's names is.
fn unknown_variant(value: &str, variants: &[&str]) -> String {
    let names: Vec<String> = variants.iter().map(|n| format!("`{n}`")).collect();
    format!(
        "unknown variant `{value}`, expected one of {}",
        names.join(", ")
    )
}

/// Why none of the types `keys` gathered takes `value`, if none does: serde's wording
/// ("invalid type: string \"lots\", expected an integer").
fn type_error(keys: &Keys<'_>, value: &Yaml) -> Option<String> {
    let value = match value {
        Yaml::Tagged(tagged) => &tagged.value,
        other => other,
    };
    if keys.untyped || keys.types.is_empty() {
        return None;
    }
    let (kind, shown) = match value {
        Yaml::Null => ("null", "null".to_owned()),
        Yaml::Bool(b) => ("boolean", format!("boolean `{b}`")),
        Yaml::Number(n) if n.is_f64() => ("number", format!("floating point `{n}`")),
        Yaml::Number(n) => ("integer", format!("integer `{n}`")),
        Yaml::String(_) => ("string", "string".to_owned()),
        Yaml::Sequence(_) => ("array", "sequence".to_owned()),
        Yaml::Mapping(_) => ("object", "map".to_owned()),
        Yaml::Tagged(_) => return None,
    };
    let takes = |t: &str| keys.types.contains(&t);
    // The YAML parser would read any scalar into a string field (`name: 7` as the text
    // "7"); the schema takes only text there, and so does the policy (see `load_bytes`).
    let typed = takes(kind) || (kind == "integer" && takes("number"));
    if !typed {
        let mut expected: Vec<&str> = keys
            .types
            .iter()
            .filter(|t| **t != "null")
            .map(|t| match *t {
                "integer" => "an integer",
                "number" => "a number",
                "string" => "a string",
                "boolean" => "a boolean",
                "array" => "a list",
                "object" => "a map",
                _ => "a value of another type",
            })
            .collect();
        expected.sort_unstable();
        expected.dedup();
        let shown = match value {
            Yaml::String(s) if s.chars().count() <= 64 => format!("string {s:?}"),
            _ => shown,
        };
        return Some(format!(
            "invalid type: {shown}, expected {}",
            expected.join(" or ")
        ));
    }
    let Yaml::Number(n) = value else {
        return None;
    };
    let number = n.as_f64()?;
    let min = keys.minimum.unwrap_or(f64::NEG_INFINITY);
    let max = keys.maximum.unwrap_or(f64::INFINITY);
    // NaN is within no bounds, and the parser reads `.nan` into any float field.
    if number.is_nan() || (min..=max).contains(&number) {
        return None;
    }
    // A range a person set (`1 to 128`) is told whole; a number's width (`4294967295`)
    // only when the value is past it.
    let set_by_hand = max < f64::from(i32::MAX);
    let expected = match (min.is_finite(), max.is_finite()) {
        (true, true) if set_by_hand => format!("{min} to {max}"),
        (true, _) if number < min => format!("at least {min}"),
        _ => format!("at most {max}"),
    };
    Some(format!("invalid value: {n}, expected {expected}"))
}

/// Gather what `schema` allows, following `$ref` and every `anyOf`/`oneOf`/`allOf`
/// branch (an optional field, an untagged enum of key kinds). A map is closed only when
/// no branch takes other keys.
fn branches<'a>(root: &'a Json, schema: &'a Json, keys: &mut Keys<'a>, depth: usize) {
    // Refs only point at definitions, which do not refer to themselves without an object
    // in between; the bound guards a malformed schema anyway.
    if depth > 16 {
        return;
    }
    let Some(object) = schema.as_object() else {
        // `true` takes anything.
        keys.untyped |= schema.as_bool() == Some(true);
        return;
    };
    gather_types(object, keys);
    if let Some(target) = object.get("$ref").and_then(Json::as_str) {
        if let Some(resolved) = resolve(root, target) {
            branches(root, resolved, keys, depth + 1);
        }
    }
    for combinator in ["anyOf", "oneOf", "allOf"] {
        if let Some(list) = object.get(combinator).and_then(Json::as_array) {
            for branch in list {
                branches(root, branch, keys, depth + 1);
            }
        }
    }
    let properties = object.get("properties").and_then(Json::as_object);
    if let Some(properties) = properties {
        keys.properties.push(properties);
    }
    match object.get("additionalProperties") {
        Some(Json::Bool(false)) => {}
        Some(other @ Json::Object(_)) => keys.other = Some(other),
        // Properties without `additionalProperties: false` (no `deny_unknown_fields`).
        Some(_) => keys.open = true,
        None if properties.is_some() => keys.open = true,
        None => {}
    }
    if let Some(items) = object.get("items") {
        keys.items = Some(items);
    }
    let before = keys.variants.len();
    keys.variants
        .extend(constants(object).filter_map(Json::as_str));
    if named_types(object).contains(&"string") && keys.variants.len() == before {
        keys.any_string = true;
    }
}

/// The values a schema object's `const` and `enum` name.
fn constants(object: &serde_json::Map<String, Json>) -> impl Iterator<Item = &Json> {
    let listed = object.get("enum").and_then(Json::as_array);
    object
        .get("const")
        .into_iter()
        .chain(listed.into_iter().flatten())
}

/// The JSON types a schema object's `type` names.
fn named_types(object: &serde_json::Map<String, Json>) -> Vec<&str> {
    match object.get("type") {
        Some(Json::String(t)) => vec![t.as_str()],
        Some(Json::Array(types)) => types.iter().filter_map(Json::as_str).collect(),
        _ => Vec::new(),
    }
}

/// The types, and the bounds of the numeric ones, that one schema object names itself.
fn gather_types<'a>(object: &'a serde_json::Map<String, Json>, keys: &mut Keys<'a>) {
    let named = named_types(object);
    let mut constant_types: Vec<&str> = constants(object)
        .map(|c| match c {
            Json::Null => "null",
            Json::Bool(_) => "boolean",
            Json::Number(_) => "number",
            Json::String(_) => "string",
            Json::Array(_) => "array",
            Json::Object(_) => "object",
        })
        .collect();
    let composite = ["$ref", "anyOf", "oneOf", "allOf"]
        .iter()
        .any(|k| object.contains_key(*k));
    if named.is_empty() && constant_types.is_empty() {
        // A schema that names no type of its own takes anything, unless its branches say.
        keys.untyped |= !composite;
        return;
    }
    if named.iter().any(|t| *t == "integer" || *t == "number") {
        // A branch without a bound makes the loosest bound infinite.
        let bound = |name: &str, unbounded: f64| {
            object.get(name).and_then(Json::as_f64).unwrap_or(unbounded)
        };
        let (min, max) = (
            bound("minimum", f64::NEG_INFINITY),
            bound("maximum", f64::INFINITY),
        );
        keys.minimum = Some(keys.minimum.map_or(min, |m| m.min(min)));
        keys.maximum = Some(keys.maximum.map_or(max, |m| m.max(max)));
    }
    keys.types.extend(named);
    keys.types.append(&mut constant_types);
}

/// `#/$defs/Name` in `root`.
fn resolve<'a>(root: &'a Json, target: &str) -> Option<&'a Json> {
    let pointer = target.strip_prefix('#')?;
    root.pointer(pointer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown(yaml: &str) -> Vec<String> {
        let schema = serde_json::to_value(super::super::schema_value()).unwrap();
        let document: Yaml = serde_yaml::from_str(yaml).unwrap();
        unknown_fields(&schema, &document)
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn every_unknown_field_at_every_level() {
        assert_eq!(
            unknown(
                "version: 1\nmod: report\ndefaults:\n  auth: {requird: true, keys: [{hmac_secret_env: X, kidd: a}]}\n  rate: {burst: 1}\nroutes:\n  - path: /ws\n    upstrem: ws://x\n  - path: /b\n    nmae: b\n    auth: {require_claims: {role: [a]}}\n"
            ),
            [
                "mod",
                "defaults.auth.requird",
                "defaults.auth.keys[0].kidd",
                "routes[0].upstrem",
                "routes[1].nmae"
            ]
        );
    }

    #[test]
    fn every_unknown_value_of_a_fixed_list() {
        assert_eq!(
            unknown(
                "version: 1\nmode: enforcee\ndefaults:\n  messages: {types: [text], compression: of}\n  http: pass\nroutes:\n  - path: /ws\n    http: passs\n    name: report\ncluster: {redis_url_env: R, on_failure: opne}\n"
            ),
            [
                "mode",
                "defaults.messages.compression",
                "routes[0].http",
                "cluster.on_failure"
            ]
        );
    }

    #[test]
    fn every_value_of_the_wrong_type() {
        let schema = serde_json::to_value(super::super::schema_value()).unwrap();
        let document: Yaml = serde_yaml::from_str(
            "version: 1\nmax_connections: lots\ntrusted_proxies: 10.0.0.0/8\ndefaults:\n  \
             auth: {required: 'yes', leeway_seconds: 1.5, keys: [{hmac_secret_env: [X]}]}\n  \
             rate: {burst: -3, ipv6_prefix: 300, upgrades_per_second: 0.5}\n  \
             timeouts: {idle_seconds: 2.5, write_seconds: 3}\n  \
             heartbeat: {interval_seconds: null}\nroutes:\n  - path: 7\n    \
             messages: {types: text}\n    auth: {require_claims: {role: [admin, 7, true, null]}}\n    \
             name: 12\n  - path: /b\n    http: false\n    auth: {issuer: [3], keys: [{hmac_secret_env: X, kid: ~}]}\n",
        )
        .unwrap();
        let found: Vec<String> = unknown_fields(&schema, &document)
            .into_iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        assert_eq!(
            found,
            [
                "max_connections: invalid type: string \"lots\", expected an integer",
                "trusted_proxies: invalid type: string \"10.0.0.0/8\", expected a list",
                "defaults.auth.required: invalid type: string \"yes\", expected a boolean",
                "defaults.auth.leeway_seconds: invalid type: floating point `1.5`, expected an integer",
                "defaults.auth.keys[0].hmac_secret_env: invalid type: sequence, expected a string",
                "defaults.rate.burst: invalid value: -3, expected at least 1",
                "defaults.rate.ipv6_prefix: invalid value: 300, expected 1 to 128",
                "routes[0].path: invalid type: integer `7`, expected a string",
                "routes[0].messages.types: invalid type: string \"text\", expected a list",
                "routes[0].auth.require_claims.role[3]: invalid type: null, expected a boolean or a number or a string",
                "routes[0].name: invalid type: integer `12`, expected a string",
                "routes[1].http: unknown variant `false`, expected one of `reject`, `pass`",
                "routes[1].auth.issuer[0]: invalid type: integer `3`, expected a string",
            ]
        );
    }

    #[test]
    fn every_shipped_policy_has_none() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert_eq!(unknown(&text), Vec::<String>::new(), "{}", path.display());
            }
        }
    }
}
