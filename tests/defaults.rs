//! `policies/default.yaml` writes out every field at its built-in default, except the four
//! its header names: resolved, it is exactly what a policy setting only those four gives.
//! So the file, the built-in defaults in `src/config` and docs/policy.md (which the file's
//! comments repeat) cannot drift apart unnoticed.

use std::path::Path;

/// The four fields the file sets away from the built-in defaults (its header says why).
const EXCEPTIONS: &str = "\
version: 1
defaults:
  auth:
    algorithms: [HS256]
    keys:
      - hmac_secret_file: secret
    forward_claims:
      sub: X-Auth-Subject
  origin:
    allow: [\"https://localhost:8443\"]
routes:
  - path: /ws
    name: ws
";

/// A directory holding the HMAC secret file the policies here name.
fn dir_with_secret() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("secret"),
        "0123456789abcdef0123456789abcdef",
    )
    .unwrap();
    dir
}

#[test]
fn the_default_policy_file_resolves_to_the_built_in_defaults() {
    let dir = dir_with_secret();
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default.yaml"),
    )
    .unwrap();
    // The same key from a file, so that the test needs no environment variable.
    let env_key = "hmac_secret_env: WSGATE_JWT_SECRET";
    assert_eq!(shipped.matches(env_key).count(), 1);
    let shipped = shipped.replace(env_key, "hmac_secret_file: secret");
    std::fs::write(dir.path().join("default.yaml"), shipped).unwrap();
    std::fs::write(dir.path().join("exceptions.yaml"), EXCEPTIONS).unwrap();

    let load = |name: &str| wsgate::config::load(&dir.path().join(name)).unwrap().policy;
    let (shipped, built_in) = (load("default.yaml"), load("exceptions.yaml"));
    // Debug shows every resolved field (keys by kid and family).
    assert_eq!(format!("{shipped:#?}"), format!("{built_in:#?}"));
}

#[test]
fn a_changed_default_would_be_caught() {
    let dir = dir_with_secret();
    std::fs::write(dir.path().join("a.yaml"), EXCEPTIONS).unwrap();
    let changed = EXCEPTIONS.replace("  origin:\n", "  rate:\n    burst: 99\n  origin:\n");
    std::fs::write(dir.path().join("b.yaml"), changed).unwrap();
    let load = |name: &str| wsgate::config::load(&dir.path().join(name)).unwrap().policy;
    assert_ne!(
        format!("{:#?}", load("a.yaml")),
        format!("{:#?}", load("b.yaml"))
    );
}

/// `messages.compression`: `pass` is the default, `off` the other value; both show in
/// what `GET /policy` describes, and any other value is refused at its line and column.
#[test]
fn compression_is_pass_unless_set_off() {
    let dir = tempfile::tempdir().unwrap();
    let head = "version: 1\ndefaults:\n  auth: {required: false}\nroutes:\n  - path: /ws\n";
    let write = |name: &str, extra: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{head}{extra}")).unwrap();
        path
    };
    let described = |name: &str, extra: &str| {
        let loaded = wsgate::config::load(&write(name, extra)).unwrap();
        loaded.describe()["routes"][0]["messages"]["compression"].clone()
    };
    assert_eq!(described("unset.yaml", ""), "pass");
    assert_eq!(
        described("pass.yaml", "    messages: {compression: pass}\n"),
        "pass"
    );
    assert_eq!(
        described("off.yaml", "    messages: {compression: off}\n"),
        "off"
    );
    let refused = wsgate::config::load(&write("gzip.yaml", "    messages: {compression: gzip}\n"));
    match refused {
        Err(wsgate::config::ConfigError::Syntax { line, message, .. }) => {
            assert_eq!(line, 6, "{message}");
            assert!(
                message.contains("compression") || message.contains("pass"),
                "{message}"
            );
        }
        other => panic!("compression: gzip was not refused at its line: {other:?}"),
    }
}

/// What `GET /policy` shows of a route is the resolved route serialized: every documented
/// key, and each key by its family and `kid` only, never its material or algorithm.
#[test]
fn a_route_is_described_by_its_documented_keys_and_keys_by_family_and_kid() {
    let dir = dir_with_secret();
    std::fs::write(dir.path().join("p.yaml"), EXCEPTIONS).unwrap();
    let described = wsgate::config::load(&dir.path().join("p.yaml"))
        .unwrap()
        .describe();
    let route = described["routes"][0].as_object().unwrap();
    let keys: Vec<&str> = route.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "auth",
            "heartbeat",
            "http",
            "ip",
            "messages",
            "name",
            "origin",
            "path",
            "rate",
            "timeouts",
            "upstream"
        ]
    );
    assert_eq!(
        route["auth"]["keys"],
        serde_json::json!([{"family": "Hmac", "kid": null}])
    );
    assert_eq!(route["timeouts"]["max_lifetime_seconds"], 0.0);
    assert_eq!(route["heartbeat"]["interval_seconds"], 20.0);
    assert_eq!(route["upstream"], "ws://127.0.0.1:8080");
}
