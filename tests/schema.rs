//! `wsgate schema`: the policy's JSON Schema, generated from the structs that parse the
//! policy. It is draft 2020-12, the copy committed as `schema/policy.schema.json` is
//! exactly what the binary prints, every shipped policy names that copy on its first line
//! and passes it, and the schema refuses what the parser refuses (an unknown field, a
//! wrong type) and accepts what the parser accepts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// What editors read from the first line of every shipped policy.
const MODELINE: &str = "# yaml-language-server: $schema=../schema/policy.schema.json";

const REGENERATE: &str = "cargo run -- schema > schema/policy.schema.json";

/// `wsgate schema`'s stdout, run once.
fn printed() -> &'static str {
    static PRINTED: OnceLock<String> = OnceLock::new();
    PRINTED.get_or_init(|| {
        let out = Command::new(BIN).arg("schema").output().unwrap();
        assert!(
            out.status.success(),
            "wsgate schema: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    })
}

fn validator() -> &'static jsonschema::Validator {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    VALIDATOR.get_or_init(|| {
        let schema: Value = serde_json::from_str(printed()).unwrap();
        jsonschema::draft202012::new(&schema).unwrap()
    })
}

/// The schema's complaints about a YAML document, one line each, `instance path: message`
/// (empty: valid). An optional field is "its type or null" (`anyOf`), so what is wrong
/// inside one is reported under the `anyOf`: its branches' complaints are listed too, the
/// way editors show them.
fn schema_errors(yaml: &str) -> Vec<String> {
    let document: Value = serde_yaml::from_str(yaml).unwrap();
    let mut lines = Vec::new();
    for e in validator().iter_errors(&document) {
        flatten(&e, &mut lines);
    }
    lines
}

fn flatten(e: &jsonschema::ValidationError<'_>, lines: &mut Vec<String>) {
    use jsonschema::error::ValidationErrorKind as Kind;
    lines.push(format!("{}: {e}", e.instance_path()));
    if let Kind::AnyOf { context } | Kind::OneOfNotValid { context } = e.kind() {
        for inner in context.iter().flatten() {
            flatten(inner, lines);
        }
    }
}

/// Whether one of `errors` is at `at` and says `says`.
fn complains(errors: &[String], at: &str, says: &str) -> bool {
    errors
        .iter()
        .any(|e| e.starts_with(&format!("{at}: ")) && e.contains(says))
}

fn policies() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    paths.sort();
    paths
}

#[test]
fn wsgate_schema_prints_a_draft_2020_12_schema() {
    let schema: Value = serde_json::from_str(printed()).expect("wsgate schema prints JSON");
    assert_eq!(
        schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
        "{schema:#}"
    );
    // A schema the draft's own meta-schema accepts.
    if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
        panic!("not a valid draft 2020-12 schema: {e}");
    }
    assert_eq!(schema["additionalProperties"], false);
    assert_eq!(schema["properties"]["version"]["const"], 1);
    assert_eq!(schema["required"], serde_json::json!(["version"]));
    // The doc comments are the descriptions editors show, on every field.
    let mut undescribed = Vec::new();
    undescribed_fields(&schema, "", &mut undescribed);
    assert!(undescribed.is_empty(), "no description: {undescribed:?}");
}

/// Every property (of the root and of each definition) without a description.
fn undescribed_fields(schema: &Value, at: &str, out: &mut Vec<String>) {
    if let Some(properties) = schema["properties"].as_object() {
        for (name, field) in properties {
            if field["description"].as_str().is_none_or(str::is_empty) {
                out.push(format!("{at}.{name}"));
            }
        }
    }
    if let Some(defs) = schema["$defs"].as_object() {
        for (name, def) in defs {
            undescribed_fields(def, name, out);
        }
    }
}

#[test]
fn the_committed_schema_is_what_wsgate_schema_prints() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/policy.schema.json");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == printed(),
        "{} differs from what `wsgate schema` prints; regenerate it with\n    {REGENERATE}",
        path.display()
    );
}

#[test]
fn every_shipped_policy_names_the_schema_and_passes_it() {
    let paths = policies();
    assert!(paths.len() >= 4, "{paths:?}");
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().next(),
            Some(MODELINE),
            "{}: the first line tells editors where the schema is",
            path.display()
        );
        let errors = schema_errors(&text);
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
    }
}

/// A small valid policy, with `{}` where a case puts its field.
const BASE: &str = "\
version: 1
defaults:
  upstream: ws://127.0.0.1:9000
{}
routes:
  - path: /ws
";

fn with(line: &str) -> String {
    BASE.replace("{}\n", &format!("{line}\n"))
}

/// Whether wsgate's own parser (not its validation) refuses the document: the parser's
/// errors carry a line and column, validation's a field path.
fn parser_refuses(yaml: &str) -> bool {
    match wsgate::config::load_bytes(Path::new("policy.yaml"), yaml.as_bytes()) {
        Err(wsgate::config::ConfigError::Syntax { .. }) => true,
        Err(wsgate::config::ConfigError::SyntaxNoLocation { .. }) => true,
        Ok(_) | Err(_) => false,
    }
}

#[test]
fn the_schema_rejects_an_unknown_field() {
    let route = format!("{}    upsteam: ws://127.0.0.1:9000\n", with(""));
    for (yaml, at, field) in [
        (with("max_conections: 10"), "", "max_conections"),
        (with("  auth_required: true"), "/defaults", "auth_required"),
        (
            with("  rate: {burst: 5, brust: 5}"),
            "/defaults/rate",
            "brust",
        ),
        (route, "/routes/0", "upsteam"),
    ] {
        let errors = schema_errors(&yaml);
        assert!(
            complains(&errors, at, &format!("'{field}' was unexpected")),
            "{field} at {at:?}: {errors:#?}"
        );
        assert!(parser_refuses(&yaml), "{yaml}");
    }
}

#[test]
fn the_schema_rejects_a_wrong_type() {
    for (line, at, says) in [
        (
            "max_connections: \"many\"",
            "/max_connections",
            "\"many\" is not of type",
        ),
        (
            "max_connections: -1",
            "/max_connections",
            "less than the minimum",
        ),
        ("mode: strict", "/mode", "\"strict\""),
        ("  http: proxy", "/defaults/http", "\"proxy\""),
        (
            "  messages: {compression: deflate}",
            "/defaults/messages/compression",
            "\"deflate\"",
        ),
        (
            "  timeouts: {idle_seconds: soon}",
            "/defaults/timeouts/idle_seconds",
            "\"soon\" is not of type",
        ),
        (
            "  origin: {allow: \"https://a.example\"}",
            "/defaults/origin/allow",
            "\"https://a.example\" is not of type",
        ),
        (
            "  auth: {require_claims: {role: admin}}",
            "/defaults/auth/require_claims/role",
            "\"admin\" is not of type \"array\"",
        ),
        (
            "trusted_proxies: [{cidr: 10.0.0.0/8}]",
            "/trusted_proxies/0",
            "is not of type \"string\"",
        ),
    ] {
        let yaml = with(line);
        let errors = schema_errors(&yaml);
        assert!(complains(&errors, at, says), "{line:?}: {errors:#?}");
        assert!(parser_refuses(&yaml), "{line:?}");
    }
    // `version` is a number the parser takes and validation holds to 1; the schema says 1.
    let errors = schema_errors(&BASE.replace("version: 1", "version: 2").replace("{}\n", ""));
    assert!(
        complains(&errors, "/version", "1 was expected"),
        "{errors:#?}"
    );
    let errors = schema_errors(&BASE.replace("version: 1\n", "").replace("{}\n", ""));
    assert!(
        complains(&errors, "", "\"version\" is a required property"),
        "{errors:#?}"
    );
}

#[test]
fn the_schema_accepts_what_the_parser_accepts() {
    for line in [
        "",
        "mode: report",
        "mode: null",
        "max_connections: 5",
        "http2: {enabled: false, max_concurrent_streams: 8}",
        "  http: pass",
        "  upstream_tls: null",
        "  timeouts: {idle_seconds: 0.5, max_lifetime_seconds: 0}",
        "  messages: {compression: off, types: [text]}",
        "  auth: {required: false, require_claims: {role: [a, b]}, forward_claims: {sub: X-Sub}}",
        // YAML numbers and booleans as claim values (compared as text).
        "  auth: {required: false, require_claims: {email_verified: [true], level: [5, 2.5]}, deny_claims: {banned: [true]}}",
    ] {
        let yaml = with(line);
        let errors = schema_errors(&yaml);
        assert!(errors.is_empty(), "{line:?}: {errors:?}");
        assert!(!parser_refuses(&yaml), "{line:?}");
    }
}
