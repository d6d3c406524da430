//! The real `wsgate` binary: `check` exit codes and messages, start-up refusal of a bad
//! policy, SIGHUP reload and SIGTERM drain.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::process::{gate_before_a_silent_upstream, rss_kib, spawn_run, Log, Proc};
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

fn check(path: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("check")
        .arg(path)
        .env(
            "WSGATE_JWT_SECRET",
            "a-development-secret-that-is-long-enough",
        )
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text)
}

/// Every file in `policies/`, whatever its name, is a policy that passes `wsgate check`
/// (the schema and the example keys live elsewhere).
#[test]
fn every_shipped_policy_passes_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let (code, text) = check(&path);
        assert_eq!(code, 0, "{}: {text}", path.display());
        checked += 1;
    }
    assert!(
        checked >= 3,
        "policies/ should hold default.yaml and worked examples"
    );
}

/// The output docs/running.md shows for `wsgate check policies/default.yaml` is what it
/// prints for the shipped file, sha256 included (operators compare that hash across pods).
#[test]
fn the_documented_check_output_is_the_shipped_policys() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = std::fs::read_to_string(root.join("docs/running.md")).unwrap();
    let shown = docs
        .lines()
        .find(|line| line.starts_with("policies/default.yaml: valid ("))
        .expect("docs/running.md shows the output of checking policies/default.yaml");
    let out = Command::new(BIN)
        .arg("check")
        .arg("policies/default.yaml")
        .current_dir(root)
        .env(
            "WSGATE_JWT_SECRET",
            "a-development-secret-that-is-long-enough",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), shown);
}

/// `wsgate check` usually runs where the gate's secrets are not (CI, a laptop): every
/// shipped policy passes it without `WSGATE_JWT_SECRET`, with a warning naming the
/// variable; `wsgate run` still refuses a policy whose secret variable is unset.
#[test]
fn check_passes_without_the_secret_variable_and_run_does_not() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            continue;
        }
        let out = Command::new(BIN)
            .arg("check")
            .arg(&path)
            .env_remove("WSGATE_JWT_SECRET")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{}: {stderr}", path.display());
        let names_secret = std::fs::read_to_string(&path)
            .unwrap()
            .contains("hmac_secret_env: WSGATE_JWT_SECRET");
        if names_secret {
            assert!(
                stderr.contains("warning") && stderr.contains("WSGATE_JWT_SECRET is not set"),
                "{}: {stderr}",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(checked >= 3);
    let out = Command::new(BIN)
        .args([
            "run",
            "--plaintext",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "off",
        ])
        .arg("--policy")
        .arg(dir.join("default.yaml"))
        .env_remove("WSGATE_JWT_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WSGATE_JWT_SECRET is not set"), "{stderr}");
}

#[test]
fn check_warns_about_a_key_no_algorithm_uses_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    let rsa = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys/rsa.pub.pem");
    std::fs::write(
        &path,
        format!(
            "version: 1\ndefaults:\n  auth: {{algorithms: [RS256], keys: [{{public_key_file: \"{}\"}}]}}\nroutes:\n  - path: /ws\n    auth:\n      keys:\n        - public_key_file: \"{}\"\n        - hmac_secret_env: WSGATE_JWT_SECRET\n",
            rsa.display(),
            rsa.display()
        ),
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");
    let expected = format!(
        "{}: routes[0].auth.keys[1].hmac_secret_env: warning: ",
        path.display()
    );
    assert!(text.contains(&expected), "{text}");
    assert!(text.contains("valid (1 routes"), "{text}");
}

/// `none` is the route label of requests that matched no route: a route named so is valid,
/// with a warning that its series mix with those.
#[test]
fn check_warns_about_a_route_named_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(
        &path,
        "version: 1\ndefaults: {auth: {required: false}}\nroutes:\n  - path: /ws\n  - path: /other\n    name: none\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");
    let expected = format!("{}: routes[1].name: warning: ", path.display());
    assert!(text.contains(&expected), "{text}");
    assert!(text.contains("matched no route"), "{text}");
}

#[test]
fn check_reports_syntax_errors_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "version: 1\nroutes:\n  - path: /ws\n    name: [unclosed\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&format!("{}:", path.display())), "{text}");
    let location = text.split(':').nth(1).unwrap_or("");
    assert!(
        location.parse::<usize>().is_ok(),
        "no line number in {text}"
    );
}

/// `wsgate run` on a policy path that is a FIFO exits 2 at once (opening it would wait for
/// a writer, the gate neither serving nor saying why), as it does on an unreadable one.
#[test]
fn run_refuses_a_policy_that_is_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("policy.yaml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--plaintext",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "off",
        ])
        .arg("--policy")
        .arg(&fifo)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("wsgate run waited on a FIFO");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(2));
}

/// A short operator token is warned about once at start-up, not once per read of it.
#[tokio::test]
async fn a_short_admin_token_is_warned_about_once() {
    let upstream = Upstream::start().await;
    let (dir, policy) = open_policy_file(&upstream, "");
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "short\n").unwrap();
    let (mut child, log) = spawn_run(
        &policy,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--admin-token-file", token.to_str().unwrap()],
        None,
    );
    let mut warned = 0;
    loop {
        let line = log
            .next_line(Duration::from_secs(10))
            .expect("the gate never said it was listening");
        warned += usize::from(line.contains("the admin token is short"));
        if line.contains("listening") {
            break;
        }
    }
    log.no_line("the admin token is short", Duration::from_millis(300));
    support::process::terminate(&mut child, Duration::from_secs(3));
    assert_eq!(warned, 1);
}

/// A stdout that cannot be written (a full disk, a pipe closed early) is an error said on
/// stderr with an exit code, never a panic: for `token`, `check`, `explain` and `schema`.
#[test]
fn an_unwritable_stdout_is_an_error_not_a_panic() {
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default.yaml");
    let runs: [(&[&str], i32); 4] = [
        (
            &["token", "--secret-env", "WSGATE_TEST_SECRET", "--sub", "a"],
            1,
        ),
        (&["check", policy.to_str().unwrap()], 1),
        (
            &[
                "explain",
                "--policy",
                policy.to_str().unwrap(),
                "--url",
                "wss://localhost:8443/ws",
            ],
            2,
        ),
        (&["schema"], 1),
    ];
    for (args, code) in runs {
        let out = Command::new(BIN)
            .args(args)
            .env("WSGATE_TEST_SECRET", SECRET)
            .env("WSGATE_JWT_SECRET", SECRET)
            .stdout(full())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(stderr.contains("cannot write"), "{args:?}: {stderr}");
    }
}

/// A key given twice in one map is reported where it is repeated (the YAML parser marks
/// the map's start), at the top level, under `defaults` and in a route.
/// A policy ending with `---` (as `helm template` and `kubectl` output do) is one policy;
/// a file nested absurdly deep is refused at once with its place, before the YAML parser
/// spends a minute on it.
#[test]
fn check_reads_a_trailing_document_marker_and_refuses_deep_nesting_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    let policy = "version: 1\ndefaults: {auth: {required: false}}\nroutes:\n  - path: /ws\n";
    for tail in ["---\n", "---", "--- # the end\n\n# more\n"] {
        std::fs::write(&path, format!("{policy}{tail}")).unwrap();
        let (code, out) = check(&path);
        assert_eq!(code, 0, "{tail:?}: {out}");
    }
    // A second document that is not empty is still refused.
    std::fs::write(&path, format!("{policy}---\n{policy}")).unwrap();
    assert_eq!(check(&path).0, 1);

    let n = 100_000;
    let deep = format!(
        "version: 1\nx: {}1{}\nroutes: [{{path: /ws}}]\n",
        "{a: ".repeat(n),
        "}".repeat(n)
    );
    std::fs::write(&path, deep).unwrap();
    let started = Instant::now();
    let (code, out) = check(&path);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("p.yaml:2:"), "{out}");
    assert!(out.contains("nested more than 64 deep"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn check_reports_a_repeated_key_where_it_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dup.yaml");
    for (text, at) in [
        (
            "version: 1\ndefaults:\n  messages:\n    per_second: 100\n    max_message_bytes: 10\n    max_message_bytes: 20\nroutes:\n  - path: /ws\n",
            ":6:5: defaults.messages: duplicate entry with key \"max_message_bytes\"",
        ),
        (
            "version: 1\nroutes:\n  - path: /a\n  - path: /ws\n    name: a\n    name: b\n",
            ":6:5: routes[1]: duplicate entry with key \"name\"",
        ),
        (
            "version: 1\ndefaults: {}\nroutes:\n  - path: /ws\ndefaults: {}\n",
            ":5:1: duplicate entry with key \"defaults\"",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let (code, out) = check(&path);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(&format!("{}{at}", path.display())), "{out}");
    }
}

/// The errors after the first state the ranges `check` enforces (taken from the schema,
/// which states them too), not those of the integer types underneath.
#[test]
fn check_states_the_real_ranges_of_whole_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.yaml");
    std::fs::write(
        &path,
        "version: 1\ndefaults:\n  rate: {burst: x, ipv6_prefix: 300, max_connections_per_ip: -1}\nroutes: [{path: /ws}]\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("defaults.rate.ipv6_prefix: invalid value: 300, expected 1 to 128"),
        "{text}"
    );
    assert!(
        text.contains(
            "defaults.rate.max_connections_per_ip: invalid value: -1, expected at least 1"
        ),
        "{text}"
    );
    // The parser's first error speaks of the policy, not of Rust types.
    assert!(
        text.contains("defaults.rate.burst: invalid type: string \"x\", expected a whole number"),
        "{text}"
    );
    // A negative number is a whole number too: the message states the range.
    std::fs::write(
        &path,
        "version: 1\ndefaults:\n  auth: {leeway_seconds: -1}\nroutes: [{path: /ws}]\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("defaults.auth.leeway_seconds: invalid value: -1, expected 0 to 3600"),
        "{text}"
    );
    std::fs::write(&path, "version: 1\nroutes:\n  - /ws\n").unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("expected a route (a map with `path`)"),
        "{text}"
    );
    // A number past its width is named with the limit, beside an earlier error.
    std::fs::write(
        &path,
        "version: 1\nmode: Report\nroutes:\n  - path: /ws\n    rate: {burst: 4294967296, max_connections_per_ip: 4294967296}\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("mode: unknown variant `Report`"), "{text}");
    for field in ["burst", "max_connections_per_ip"] {
        assert!(
            text.contains(&format!(
                "routes[0].rate.{field}: invalid value: 4294967296, expected at most 4294967295"
            )),
            "{text}"
        );
    }
    // Past 64 bits the YAML parser stops: its place, and what to do.
    std::fs::write(
        &path,
        "version: 1\nroutes:\n  - path: /ws\n    auth: {require_claims: {id: [18446744073709551616]}}\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("r.yaml:4:"), "{text}");
    assert!(text.contains("a number past 64 bits"), "{text}");
    assert!(text.contains("goes in quotes"), "{text}");
}

#[test]
fn check_reports_unknown_fields_with_their_location() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.yaml");
    std::fs::write(
        &path,
        "version: 1\nroutes:\n  - path: /ws\n    auth: {requried: false}\n  - path: /b\n    nmae: b\ndefaults:\n  rate: {burts: 3}\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&format!("{}:4:", path.display())), "{text}");
    assert!(text.contains("unknown field `requried`"), "{text}");
    // Every other unknown field too, at its field path, each once.
    for field in ["routes[1].nmae", "defaults.rate.burts"] {
        assert_eq!(
            text.matches(&format!(": {field}: unknown field")).count(),
            1,
            "{field}: {text}"
        );
    }
    assert_eq!(text.matches("`requried`").count(), 1, "{text}");
    // Each at its key's line and column.
    for at in [":6:5: routes[1].nmae", ":8:10: defaults.rate.burts"] {
        assert!(
            text.contains(&format!("{}{at}", path.display())),
            "{at}: {text}"
        );
    }
}

/// An unknown field whose name holds a `.` is named once, not a second time at a field
/// path read as a deeper key; bytes that are not UTF-8 are an error at their line and
/// column, not at 1:1.
#[test]
fn check_names_a_dotted_unknown_field_once_and_locates_bad_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dotted.yaml");
    std::fs::write(
        &path,
        "version: 1\nroutes:\n  - path: /ws\n    \"a.b\": 1\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&format!("{}:4:5:", path.display())), "{text}");
    assert_eq!(text.matches("unknown field `a.b`").count(), 1, "{text}");
    let path = dir.path().join("latin1.yaml");
    std::fs::write(&path, b"version: 1\nroutes:\n  - path: /\xe9t\xe9\n").unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!(
            "{}:3:12: invalid UTF-8 (byte 0xE9)",
            path.display()
        )),
        "{text}"
    );
}

/// Values of the wrong type are all named in one run, not one per run.
#[test]
fn check_reports_every_value_of_the_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("types.yaml");
    std::fs::write(
        &path,
        "version: 1\nmax_connections: lots\ndefaults:\n  upstream: ws://127.0.0.1:9\n  \
         auth: {required: false, leeway_seconds: soon}\n  rate: {burst: -3}\nroutes:\n  \
         - path: /ws\n    messages: {types: text}\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!(
            "{}:2:18: max_connections: invalid type",
            path.display()
        )),
        "{text}"
    );
    for field in [
        ":5:43: defaults.auth.leeway_seconds: invalid type",
        ":6:17: defaults.rate.burst: invalid value",
        ":9:23: routes[0].messages.types: invalid type",
    ] {
        assert_eq!(text.matches(field).count(), 1, "{field}: {text}");
    }
    assert_eq!(text.matches("max_connections").count(), 1, "{text}");
}

#[test]
fn check_reports_every_semantic_error_with_its_field_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("semantic.yaml");
    std::fs::write(
        &path,
        "version: 1\ndefaults:\n  auth: {required: false}\nroutes:\n  - path: /ws\n  - path: /b\n    upstream: http://x\n    ip: {deny: [10.0.0.0/8, not-a-cidr]}\n    auth: {algorithms: [none]}\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("routes[1].ip.deny[1]"), "{text}");
    assert!(text.contains("routes[1].upstream"), "{text}");
    assert!(text.contains("routes[1].auth.algorithms[0]"), "{text}");
    // A relative key file that cannot be read: where it was looked for (beside the
    // policy file, not in the working directory).
    std::fs::write(
        &path,
        "version: 1\ndefaults:\n  auth: {algorithms: [RS256], keys: [{public_key_file: nokey.pem}]}\nroutes: [{path: /ws}]\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    let looked = dir.path().join("nokey.pem");
    assert!(
        text.contains(&format!("cannot read nokey.pem ({})", looked.display())),
        "{text}"
    );
    // Without routes, `defaults` is still checked: its errors beside the missing routes.
    for routes in ["routes: []\n", ""] {
        std::fs::write(
            &path,
            format!("version: 1\ndefaults:\n  upstream: http://x:1\n  ip: {{deny: [nope]}}\n  auth: {{algorithms: [none]}}\n{routes}"),
        )
        .unwrap();
        let (code, text) = check(&path);
        assert_eq!(code, 1, "{text}");
        for field in [
            "routes: at least one route",
            "defaults.upstream:",
            "defaults.ip.deny[0]:",
            "defaults.auth.algorithms[0]:",
        ] {
            assert!(
                text.contains(field),
                "{routes:?}: {field} missing in {text}"
            );
        }
    }
    // An upstream whose bracketed host is no IPv6 address (a zone id) is refused, not
    // left to fail every upgrade with a name lookup.
    std::fs::write(
        &path,
        "version: 1\ndefaults: {auth: {required: false}, upstream: \"ws://[::1%25lo]:9\"}\nroutes: [{path: /ws}]\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("not an IPv6 address"), "{text}");
    // A frame limit in `defaults` above one route's own message limit names the route.
    std::fs::write(
        &path,
        "version: 1\ndefaults:\n  auth: {required: false}\n  messages: {max_frame_bytes: 5000}\nroutes:\n  - path: /a\n  - path: /b\n    messages: {max_message_bytes: 100}\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("defaults.messages.max_frame_bytes: must not exceed messages.max_message_bytes: routes[1] inherits it"),
        "{text}"
    );
}

#[test]
fn a_misspelt_algorithm_is_one_error_not_a_cascade() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alg.yaml");
    std::fs::write(
        dir.path().join("secret"),
        "0123456789abcdef0123456789abcdef",
    )
    .unwrap();
    for algorithms in ["[HS257]", "[none]"] {
        std::fs::write(
            &path,
            format!("version: 1\ndefaults:\n  upstream: ws://127.0.0.1:9\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\nroutes:\n  - path: /ws\n    auth: {{algorithms: {algorithms}}}\n"),
        )
        .unwrap();
        let (code, text) = check(&path);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("routes[0].auth.algorithms[0]"), "{text}");
        // Not "no configured key verifies an algorithm auth.algorithms names", nor a warning
        // that the secret is never used: which family was meant is unknown.
        assert_eq!(text.trim().lines().count(), 1, "{text}");
    }
}

#[test]
fn check_refuses_credentials_in_urls_without_printing_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("credentials.yaml");
    std::fs::write(
        &path,
        "version: 1\n\
         defaults:\n  \
           auth: {keys: [{jwks_url: \"https://u:hunter2@keys.example/jwks.json\"}]}\n\
         routes:\n  \
           - path: /ws\n    \
             upstream: ws://svc:hunter2@127.0.0.1:8080\n  \
           - path: /tls\n    \
             upstream: ws://svc:hunter2@127.0.0.1:8080\n    \
             upstream_tls: {server_name: svc.internal}\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    // The URL's other mistakes are still named: the credentials do not hide them.
    assert!(
        text.contains(": routes[1].upstream_tls: upstream_tls is only for wss:// upstreams"),
        "{text}"
    );
    for field in [
        "routes[0].upstream",
        "routes[1].upstream",
        "defaults.auth.keys[0].jwks_url",
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!(": {field}: ")))
            .unwrap_or_else(|| panic!("no error at {field}: {text}"));
        assert!(
            line.contains("credentials in a URL are not supported"),
            "{text}"
        );
    }
    assert!(!text.contains("hunter2"), "{text}");

    // A URL with a password pasted into a field that takes something else: the value is
    // echoed in its error, with the password masked, whether the error is the validator's
    // or the YAML parser's (a wrong type, an unknown name).
    let url = "http://user:hunter2@h.example";
    for (field, policy) in [
        (
            "trusted_proxies[0]",
            format!("version: 1\ntrusted_proxies: [\"{url}\"]\nroutes:\n  - path: /ws\n"),
        ),
        (
            "defaults.auth.token_sources[0]",
            format!("version: 1\ndefaults:\n  auth: {{token_sources: [\"{url}\"]}}\nroutes:\n  - path: /ws\n"),
        ),
        (
            "mode",
            format!("version: 1\nmode: \"{url}\"\nroutes:\n  - path: /ws\n"),
        ),
        (
            "defaults.auth.required",
            format!("version: 1\ndefaults:\n  auth: {{required: \"{url}\"}}\nroutes:\n  - path: /ws\n"),
        ),
    ] {
        std::fs::write(&path, policy).unwrap();
        let (code, text) = check(&path);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains(&format!("{field}: ")), "{field}: {text}");
        assert!(text.contains("http://***@h.example"), "{field}: {text}");
        assert!(!text.contains("hunter2"), "{field}: {text}");
    }
}

#[test]
fn check_refuses_route_paths_no_request_could_match() {
    // Requests are routed on their normal form, so a route spelled otherwise never matches.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("paths.yaml");
    std::fs::write(
        &path,
        "version: 1\n\
         defaults: {auth: {required: false}, origin: {allow_missing: true}}\n\
         routes:\n  \
           - path: /a//b\n  \
           - path: /%61pi\n  \
           - path: /x;y\n  \
           - path: /ok/%c3%a9\n  \
           - path: /fine/%C3%A9\n  \
           - path: /w\u{df}\n  \
           - path: /a b\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    for (field, says) in [
        ("routes[0].path", "must be written in normal form: \"/a/b\""),
        ("routes[1].path", "must be written in normal form: \"/api\""),
        (
            "routes[2].path",
            "is not a path a request could be routed to",
        ),
        (
            "routes[3].path",
            "must be written in normal form: \"/ok/%C3%A9\"",
        ),
        // What a client sends for them (`/w%C3%9F`, `/a%20b`) never matches a raw spelling.
        ("routes[5].path", "percent-encoded: \"/w%C3%9F\""),
        ("routes[6].path", "percent-encoded: \"/a%20b\""),
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!(": {field}: ")))
            .unwrap_or_else(|| panic!("no error at {field}: {text}"));
        assert!(line.contains(says), "{field}: {line}");
    }
    assert!(!text.contains("routes[4]"), "{text}");
}

/// A text field takes text only, as the schema says (the YAML parser alone would read
/// `kid: 7` as "7" and `~` as "~"), and a value outside a fixed list is named whatever its
/// type, also after another error.
#[test]
fn check_refuses_numbers_and_booleans_where_text_or_a_name_is_expected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("types.yaml");
    std::fs::write(
        &path,
        "version: 1\n\
         defaults:\n  \
           auth: {algorithms: [HS256], keys: [{hmac_secret_env: S, kid: 7}], require_claims: {role: [~]}}\n\
         routes:\n  - path: /ws\n    name: 123\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    for (at, field) in [
        (
            ":3:",
            "defaults.auth.keys[0].kid: invalid type: integer `7`",
        ),
        (
            ":3:",
            "defaults.auth.require_claims.role[0]: invalid type: null",
        ),
        (":6:", "routes[0].name: invalid type: integer `123`"),
    ] {
        assert!(
            text.lines().any(|l| l.contains(at) && l.contains(field)),
            "{field}: {text}"
        );
    }
    // Quoted, the same values are text and the file is valid.
    std::fs::write(
        &path,
        "version: 1\n\
         defaults:\n  \
           auth: {algorithms: [HS256], keys: [{hmac_secret_env: S, kid: \"7\"}], require_claims: {role: [\"~\", 5, true]}}\n\
         routes:\n  - path: /ws\n    name: \"123\"\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");
    // A boolean or a number in a fixed list, behind another error, is still named.
    std::fs::write(
        &path,
        "version: 1\nmode: false\nmax_connections: -5\n\
         defaults: {http: true, messages: {compression: 1}}\n\
         routes:\n  - path: /ws\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    for field in [
        "mode: unknown variant `false`",
        "defaults.http: unknown variant `true`",
        "defaults.messages.compression: unknown variant `1`",
    ] {
        assert!(text.contains(field), "{field}: {text}");
    }
}

/// A wrong value a route inherits is reported once, where it is written; a key that fails
/// to load is not followed by a misleading "no keys"; a byte-order mark is not content.
#[test]
fn check_reports_an_inherited_error_once_at_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inherited.yaml");
    std::fs::write(
        &path,
        "\u{feff}version: 1\n\
         defaults:\n  \
           auth: {leeway_seconds: 5000, algorithms: [HS256], keys: [{hmac_secret_file: no-such-secret}]}\n  \
           rate: {upgrades_per_second: 0, ipv6_prefix: 0}\n  \
           messages: {per_second: 0}\n\
         routes:\n  - path: /a\n  - path: /b\n  - path: /c\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    for field in [
        "defaults.auth.leeway_seconds",
        "defaults.rate.upgrades_per_second",
        "defaults.rate.ipv6_prefix",
        "defaults.messages.per_second",
        "defaults.auth.keys[0].hmac_secret_file",
    ] {
        assert_eq!(
            text.matches(&format!(": {field}: ")).count(),
            1,
            "{field}: {text}"
        );
    }
    assert!(!text.contains("routes["), "{text}");
    assert!(!text.contains("no keys are configured"), "{text}");
}

/// A URL written where a field names something else (the variable that holds the Redis
/// URL, an origin) is refused without its password appearing in the error.
#[test]
fn check_does_not_print_a_password_in_a_value_it_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("misplaced.yaml");
    std::fs::write(
        &path,
        "version: 1\n\
         cluster: {redis_url_env: \"redis://admin:S3cretPass@redis:6379/0\"}\n\
         defaults:\n  \
           upstream: ws://127.0.0.1:9\n  \
           auth: {required: false}\n  \
           origin: {allow: [\"https://u:originpw@a.example\"]}\n\
         routes:\n  \
           - path: /ws\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("cluster.redis_url_env"), "{text}");
    assert!(text.contains("origin.allow"), "{text}");
    for secret in ["S3cretPass", "originpw"] {
        assert!(!text.contains(secret), "{text}");
    }
}

/// A variable name no process can have is an error, not a warning that it is unset.
#[test]
fn check_refuses_what_cannot_name_an_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blank.yaml");
    std::fs::write(
        &path,
        "version: 1\ndefaults:\n  upstream: ws://127.0.0.1:9\n  \
         auth: {algorithms: [HS256], keys: [{hmac_secret_env: ''}]}\nroutes:\n  - path: /ws\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("hmac_secret_env: is empty: it must name an environment variable"),
        "{text}"
    );

    // A secret pasted where its variable's name belongs is refused, and not printed.
    let secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==";
    std::fs::write(
        &path,
        format!(
            "version: 1\ndefaults:\n  upstream: ws://127.0.0.1:9\n  \
             auth: {{algorithms: [HS256], keys: [{{hmac_secret_env: '{secret}'}}]}}\n\
             routes:\n  - path: /ws\n"
        ),
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("is not an environment variable name"),
        "{text}"
    );
    assert!(!text.contains(secret), "{text}");

    // Names Kubernetes lets a container have ('-', '.') are names: unset, only a warning.
    std::fs::write(
        &path,
        "version: 1\ncluster: {redis_url_env: redis-url.prod}\ndefaults:\n  \
         upstream: ws://127.0.0.1:9\n  auth: {algorithms: [HS256], \
         keys: [{hmac_secret_env: jwt-secret.v2}]}\nroutes:\n  - path: /ws\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("redis-url.prod is not set"), "{text}");
    assert!(text.contains("jwt-secret.v2 is not set here"), "{text}");

    // A secret without '=' reads as a name, but one that looks like a secret is not shown.
    let secret = "q8ZfT3mW9xLp2RkV7nBy4CsD6hJ";
    std::fs::write(
        &path,
        format!(
            "version: 1\ndefaults:\n  upstream: ws://127.0.0.1:9\n  \
             auth: {{algorithms: [HS256], keys: [{{hmac_secret_env: {secret}}}]}}\n\
             routes:\n  - path: /ws\n"
        ),
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("looks like a secret"), "{text}");
    assert!(!text.contains(secret), "{text}");
}

/// YAML merge keys share a block between routes, as hand-written YAML does.
#[test]
fn check_applies_yaml_merge_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("merge.yaml");
    std::fs::write(
        &path,
        "version: 1\n\
         defaults:\n  \
           upstream: ws://127.0.0.1:9\n\
         routes:\n  \
           - path: /a\n    \
             auth: &open {required: false}\n    \
             messages: &small {max_message_bytes: 4096}\n  \
           - path: /b\n    \
             auth: *open\n    \
             messages: {<<: *small, max_frame_bytes: 1024}\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 0, "{text}");
    // A wrong type behind a merge key is still an error.
    std::fs::write(
        &path,
        "version: 1\ndefaults:\n  upstream: ws://127.0.0.1:9\n  auth: {required: false}\n\
         routes:\n  - path: /a\n    messages: &small {max_message_bytes: lots}\n  \
         - path: /b\n    messages: {<<: *small}\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("invalid type: string \"lots\""), "{text}");
    assert!(text.contains("merge keys"), "{text}");
    // Every place it reaches is named, with the line and column where the text has it.
    let shown = path.display();
    assert!(
        text.contains(&format!(
            "{shown}:7:42: routes[0].messages.max_message_bytes: invalid type"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{shown}: routes[1].messages.max_message_bytes: invalid type"
        )),
        "{text}"
    );
}

/// A file far larger than any policy is refused without being read whole.
#[test]
fn check_refuses_a_file_larger_than_16_mib() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.yaml");
    let mut text = String::from("version: 1\nroutes:\n  - path: /ws\n");
    text.push_str(&format!("# {}\n", "x".repeat(17 << 20)));
    std::fs::write(&path, text).unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("larger than 16 MiB"), "{text}");
    let (code, text) = check(Path::new("/dev/zero"));
    assert_eq!(code, 1, "{text}");
}

#[test]
fn check_exits_2_when_unreadable() {
    let (code, text) = check(Path::new("/nonexistent/policy.yaml"));
    assert_eq!(code, 2, "{text}");
}

/// `--version` answers on every subcommand exactly as on the binary (`wsgate run
/// --version` prints `wsgate 0.1.0`, not clap's `wsgate-run 0.1.0`).
#[test]
fn every_subcommand_answers_version() {
    let expected = format!("wsgate {}\n", env!("CARGO_PKG_VERSION"));
    for command in [
        None,
        Some("run"),
        Some("check"),
        Some("token"),
        Some("explain"),
        Some("schema"),
        Some("demo"),
    ] {
        let out = Command::new(BIN)
            .args(command)
            .arg("--version")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{command:?}: {out:?}");
        assert_eq!(stdout, expected, "{command:?}");
    }
}

#[test]
fn run_refuses_a_bad_policy_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "version: 1\nroutes: [{path: ws}]\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(BIN)
        .args(["run", "--plaintext", "--admin", "off", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--policy")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("routes[0].path"), "{stderr}");
    assert!(!stderr.contains("listening"), "{stderr}");
}

/// The admin listener on the gate's own address would share it (both set SO_REUSEPORT)
/// and take half its requests: refused before anything is bound.
#[test]
fn run_refuses_the_admin_listener_on_the_gate_s_address() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(
        &path,
        "version: 1\ndefaults:\n  auth: {required: false}\nroutes: [{path: /ws}]\n",
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (listen, admin) in [
        (format!("127.0.0.1:{port}"), format!("127.0.0.1:{port}")),
        (format!("0.0.0.0:{port}"), format!("127.0.0.1:{port}")),
    ] {
        let out = Command::new(BIN)
            .args(["run", "--plaintext", "--listen", &listen, "--admin", &admin])
            .arg("--policy")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{listen} {admin}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("same address"), "{stderr}");
        assert!(!stderr.contains("listening"), "{stderr}");
    }
}

#[test]
fn run_needs_tls_or_plaintext() {
    let out = Command::new(BIN)
        .args(["run", "--admin", "off"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert"));
}

/// A policy with one open route and an upstream nobody listens on, written in `dir`.
fn open_policy_in(dir: &Path) -> std::path::PathBuf {
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\ndefaults:\n  upstream: ws://127.0.0.1:9\n  auth: {required: false}\nroutes:\n  - path: /ws\n",
    )
    .unwrap();
    policy
}

#[test]
fn plaintext_takes_the_usual_boolean_spellings_from_its_variable() {
    let dir = tempfile::tempdir().unwrap();
    let policy = open_policy_in(dir.path());
    let start = |value: &str| {
        Command::new(BIN)
            .args(["run", "--listen", "127.0.0.1:0", "--admin", "off"])
            .arg("--policy")
            .arg(&policy)
            .env("WSGATE_PLAINTEXT", value)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // As Kubernetes manifests write them.
    for on in ["1", "yes", "on", "true"] {
        let mut child = start(on);
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let listening = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(10)).ok())
            .any(|line| line.contains("listening"));
        support::process::terminate(&mut child, Duration::from_secs(3));
        assert!(
            listening,
            "WSGATE_PLAINTEXT={on} did not start a plaintext gate"
        );
    }
    for off in ["0", "no", "off", "false"] {
        let out = start(off).wait_with_output().unwrap();
        assert!(!out.status.success(), "WSGATE_PLAINTEXT={off}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--tls-cert"),
            "WSGATE_PLAINTEXT={off}"
        );
    }
}

/// Choosing between TLS and `--plaintext`: a flag beats a variable, as for every other
/// setting (the container image names its certificate in `ENV`, and `wsgate run
/// --plaintext` after the image name must still serve ws://); both from the same source
/// is a usage error.
#[test]
fn a_flag_beats_a_variable_when_choosing_between_tls_and_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let policy = open_policy_in(dir.path());
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    let (cert, key) = (certs.join("localhost.pem"), certs.join("localhost.key"));
    let gate = |flags: &[&std::ffi::OsStr], env: &[(&str, &std::ffi::OsStr)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--listen", "127.0.0.1:0", "--admin", "off"])
            .arg("--policy")
            .arg(&policy)
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for var in ["WSGATE_PLAINTEXT", "WSGATE_TLS_CERT", "WSGATE_TLS_KEY"] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        cmd
    };
    // The start-up lines up to "listening", or every line of a process that exited.
    let start_up = |mut cmd: Command| -> (Vec<String>, Option<i32>) {
        let mut child = cmd.spawn().unwrap();
        let log = Log::follow(&mut child);
        let mut lines = Vec::new();
        while let Some(line) = log.next_line(Duration::from_secs(10)) {
            let listening = line.contains("listening");
            lines.push(line);
            if listening {
                break;
            }
        }
        if lines.last().is_some_and(|l| l.contains("listening")) {
            support::process::terminate(&mut child, Duration::from_secs(3));
            return (lines, None);
        }
        // Its stderr closed: it is exiting.
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                support::process::terminate(&mut child, Duration::from_secs(3));
                panic!("neither listening nor exited: {lines:#?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (lines, status.code())
    };
    let plaintext_flag = [std::ffi::OsStr::new("--plaintext")];
    let tls_flags = [
        std::ffi::OsStr::new("--tls-cert"),
        cert.as_os_str(),
        std::ffi::OsStr::new("--tls-key"),
        key.as_os_str(),
    ];
    let tls_env = [
        ("WSGATE_TLS_CERT", cert.as_os_str()),
        ("WSGATE_TLS_KEY", key.as_os_str()),
    ];
    let plaintext_env = [("WSGATE_PLAINTEXT", std::ffi::OsStr::new("true"))];

    let (lines, code) = start_up(gate(&plaintext_flag, &tls_env));
    assert_eq!(code, None, "--plaintext with TLS variables: {lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("serving ws://")),
        "--plaintext with TLS variables did not serve plaintext: {lines:#?}"
    );

    let (lines, code) = start_up(gate(&tls_flags, &plaintext_env));
    assert_eq!(code, None, "TLS flags with WSGATE_PLAINTEXT: {lines:#?}");
    assert!(
        lines.last().is_some_and(|l| l.contains("listening")),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("serving ws://")),
        "TLS flags with WSGATE_PLAINTEXT served plaintext: {lines:#?}"
    );

    // Empty variables are unset: the way to serve plaintext from an image whose ENV
    // names a certificate, with variables only.
    let emptied = [
        ("WSGATE_PLAINTEXT", std::ffi::OsStr::new("true")),
        ("WSGATE_TLS_CERT", std::ffi::OsStr::new("")),
        ("WSGATE_TLS_KEY", std::ffi::OsStr::new("")),
    ];
    let (lines, code) = start_up(gate(&[], &emptied));
    assert_eq!(code, None, "emptied TLS variables: {lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("serving ws://")),
        "emptied TLS variables did not serve plaintext: {lines:#?}"
    );

    let both_flags: Vec<_> = plaintext_flag.iter().chain(&tls_flags).copied().collect();
    let both_env: Vec<_> = plaintext_env.iter().chain(&tls_env).copied().collect();
    for (flags, env, what) in [
        (&both_flags[..], &[][..], "both as flags"),
        (&[][..], &both_env[..], "both as variables"),
    ] {
        let (lines, code) = start_up(gate(flags, env));
        assert_eq!(code, Some(2), "{what}: {lines:#?}");
        assert!(
            lines.iter().any(|l| l.contains("exclude each other")),
            "{what}: {lines:#?}"
        );
    }
}

/// The binary running in the background; killed when dropped.

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_policy() {
    let upstream = Upstream::start().await;
    // The policy path is a symlink into a directory the gate does not watch, so only the
    // signal can make it notice the change.
    let watched = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let real = elsewhere.path().join("policy.yaml");
    std::fs::write(&real, open_policy(&upstream.url(), "")).unwrap();
    let link = watched.path().join("policy.yaml");
    std::os::unix::fs::symlink(&real, &link).unwrap();

    let mut gate = Proc::start(&link, &[]);
    let mut open = gate.connect("/ws").await.unwrap();
    assert!(gate.connect("/v2").await.is_err());
    // The watcher is alive: re-pointing the link (in the watched directory) at the same
    // file is seen and reloads it, so the silence below is not a dead watcher's.
    let relink = watched.path().join(".policy.yaml.tmp");
    std::os::unix::fs::symlink(&real, &relink).unwrap();
    std::fs::rename(&relink, &link).unwrap();
    gate.wait_line("policy reloaded");
    std::fs::write(
        &real,
        format!("{}  - path: /v2\n", open_policy(&upstream.url(), "")),
    )
    .unwrap();
    // Well past the debounce (150 ms) that the watched change above was seen within.
    gate.no_line("policy reloaded", Duration::from_millis(500));
    assert!(
        gate.connect("/v2").await.is_err(),
        "nothing watched changed: no reload yet"
    );

    gate.signal("HUP");
    let changed = Instant::now();
    while gate.connect("/v2").await.is_err() {
        assert!(
            changed.elapsed() < Duration::from_secs(2),
            "SIGHUP did not reload within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    gate.wait_line("policy reloaded");
    open.send(Message::text("still open")).await.unwrap();
    assert_eq!(next_message(&mut open).await, Message::text("still open"));

    // A policy that no longer admits it: the line that says so names the connection's
    // request id, as its close line does, so the two can be tied together.
    std::fs::write(
        &real,
        open_policy(&upstream.url(), "    ip: {deny: [127.0.0.0/8]}\n"),
    )
    .unwrap();
    gate.signal("HUP");
    assert_eq!(next_close(&mut open).await, (1008, "policy changed".into()));
    let request_id = |line: &str| {
        let id = line.split("request_id=").nth(1).unwrap_or_default();
        id.split_whitespace().next().unwrap_or_default().to_owned()
    };
    let cut = request_id(&gate.wait_line("no longer admits"));
    let closed = request_id(&gate.wait_line("policy_changed"));
    assert!(!cut.is_empty());
    assert_eq!(cut, closed);

    // A refused policy's errors are one event, so one line, in text logs too.
    std::fs::write(
        &real,
        open_policy(&upstream.url(), "    ip: {deny: [nope, 10.0.0.0/33]}\n"),
    )
    .unwrap();
    gate.signal("HUP");
    let refused = gate.wait_line("policy reload refused");
    assert!(refused.contains("deny[0]"), "{refused}");
    assert!(refused.contains("deny[1]"), "{refused}");
}

/// Text logs are one line per event: a route name with a line break or quotes in it is
/// quoted on the close line as on the upgrade line.
#[tokio::test(flavor = "multi_thread")]
async fn text_logs_quote_a_route_name_on_every_line() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    let yaml = open_policy(&upstream.url(), "").replace("name: ws", "name: \"a\\nb x=\\\"y\"");
    std::fs::write(&policy, yaml).unwrap();
    let mut gate = Proc::start(&policy, &[]);
    let mut client = gate.connect("/ws").await.unwrap();
    client.close(None).await.unwrap();
    let upgrade = gate.wait_line("accepted");
    assert!(upgrade.contains(r#"route="a\nb x=\"y""#), "{upgrade}");
    let close = gate.wait_line("client_closed");
    assert!(close.contains(r#"route="a\nb x=\"y""#), "{close}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_with_1001_and_exits_0() {
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "");
    let mut gate = Proc::start(&policy, &["--drain-seconds", "5"]);
    let mut a = gate.connect("/ws").await.unwrap();
    let mut b = gate.connect("/ws").await.unwrap();

    gate.signal("TERM");
    assert_eq!(next_close(&mut a).await, (1001, "going away".into()));
    assert_eq!(next_close(&mut b).await, (1001, "going away".into()));
    // Both clients answered: the process exits at once, well before the drain deadline.
    let (code, took) = gate.wait_exit(Duration::from_secs(5));
    assert_eq!(code, 0);
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
    for i in 0..2 {
        assert_eq!(
            upstream.wait_ended(i).await,
            Ended::Close(1001, "going away".into())
        );
    }
}

/// Connections that have sent no request when the listener stops (one that sent nothing at
/// all, an HTTP/2 one with its preface and no stream) are let go after a moment, not waited
/// for as first requests are (up to 1 s): they do not hold back the WebSockets' 1001, nor
/// the exit.
#[tokio::test(flavor = "multi_thread")]
async fn connections_that_sent_no_request_do_not_hold_the_drain_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "");
    let mut gate = Proc::start(&policy, &["--drain-seconds", "5"]);
    let mut ws = gate.connect("/ws").await.unwrap();
    let mut silent = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let mut h2 = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    // The h2c preface and an empty SETTINGS frame: an HTTP/2 connection with no stream.
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    gate.signal("TERM");
    assert_eq!(next_close(&mut ws).await, (1001, "going away".into()));
    let took = signalled.elapsed();
    assert!(took < Duration::from_millis(700), "1001 after {took:?}");
    // Both were closed by the gate (the HTTP/2 one after its SETTINGS and GOAWAY).
    for (name, tcp) in [("silent", &mut silent), ("h2", &mut h2)] {
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "{name}: still open");
    }
    // Nor do they hold the exit (the HTTP/2 one is not given the lingering close's 2 s
    // to answer its GOAWAY's PING).
    assert_eq!(gate.wait_exit(Duration::from_secs(5)).0, 0);
    let took = signalled.elapsed();
    assert!(took < Duration::from_millis(1500), "exit after {took:?}");
}

/// Once the listener has stopped, a later request on a kept-alive connection gets 503
/// `draining`, also while the drain still waits for another connection's first answer: it
/// is not upgraded only to be sent 1001 at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_later_request_on_a_kept_alive_connection_gets_503_draining() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    // An upstream that answers the handshake after 800 ms: an upgrade to it is a first
    // answer the drain waits for.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(head) = wire::read_head(&mut tcp).await else {
                    return;
                };
                tokio::time::sleep(Duration::from_millis(800)).await;
                let accept = wire::accept_value(&head);
                let answer = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
                let _ = tcp.write_all(answer.as_bytes()).await;
                let mut rest = [0u8; 1024];
                while matches!(tcp.read(&mut rest).await, Ok(n) if n > 0) {}
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "{}  - path: /slow\n    upstream: ws://{slow}\n",
            open_policy(&upstream.url(), "    http: pass\n")
        ),
    )
    .unwrap();
    let mut gate = Proc::start(&policy, &["--drain-seconds", "5"]);
    let mut kept = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    kept.write_all(b"GET /ws/page HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    while !String::from_utf8_lossy(&answer).contains("pass GET /ws/page") {
        let mut chunk = [0u8; 1024];
        let n = kept.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&chunk[..n]);
    }
    let slow_upgrade = tokio::spawn(wire::upgrade_raw_path(gate.addr, "/slow"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.signal("TERM");
    gate.wait_line("draining connections");
    kept.write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut refused = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), kept.read_to_end(&mut refused)).await;
    let refused = String::from_utf8_lossy(&refused);
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("\"draining\""), "{refused}");
    // The first answer the drain waited for was given, and the gate then exits.
    drop(slow_upgrade.await.unwrap());
    let (code, _) = gate.wait_exit(Duration::from_secs(6));
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_at_the_drain_deadline_when_a_client_never_answers() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    // The write/close deadline is longer than the drain: only --drain-seconds can end it.
    std::fs::write(
        &policy,
        open_policy(&upstream.url(), "    timeouts: {write_seconds: 30}\n"),
    )
    .unwrap();
    let mut gate = Proc::start(&policy, &["--drain-seconds", "1"]);
    let _silent = gate.connect("/ws").await.unwrap(); // never reads, never answers the close
    let sent = Instant::now();
    gate.signal("TERM");
    // Its close is given up at the deadline and logged before the exit: no connection
    // ends unlogged.
    let line = gate.wait_line("duration_ms=");
    assert!(
        line.contains("reason=\"shutdown\"") || line.contains("reason=shutdown"),
        "{line}"
    );
    let (code, _) = gate.wait_exit(Duration::from_secs(4));
    assert_eq!(code, 0);
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "exit after {took:?}"
    );
}

/// A second SIGTERM (or SIGINT) during the drain ends it at once, as a second Ctrl-C does
/// for nginx and Envoy: the connection still closing is given up, logged, and the process
/// exits 0 long before `--drain-seconds`.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_during_the_drain_exits_at_once() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        open_policy(&upstream.url(), "    timeouts: {write_seconds: 30}\n"),
    )
    .unwrap();
    let mut gate = Proc::start(&policy, &["--drain-seconds", "20"]);
    let _silent = gate.connect("/ws").await.unwrap(); // never reads, never answers the close
    gate.signal("TERM");
    gate.wait_line("draining connections");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    gate.signal("INT");
    let cut = gate.wait_line("the drain is cut short");
    // The connection given up is counted, although its close has begun.
    assert!(cut.contains("open=1"), "{cut}");
    let line = gate.wait_line("duration_ms=");
    assert!(
        line.contains("reason=\"shutdown\"") || line.contains("reason=shutdown"),
        "{line}"
    );
    let (code, _) = gate.wait_exit(Duration::from_secs(4));
    assert_eq!(code, 0);
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "exit {:?} after the second signal",
        sent.elapsed()
    );
}

/// Every flag of `run` read from its environment variable (`WSGATE_` + the flag in upper
/// snake case), with no flag on the command line: the policy, the TLS pair, the listen and
/// admin addresses, the admin token file, the log format, the shutdown delay and the
/// drain's deadline each show in what the gate does.
#[tokio::test(flavor = "multi_thread")]
async fn every_run_flag_reads_its_environment_variable() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        open_policy(&upstream.url(), "    timeouts: {write_seconds: 30}\n"),
    )
    .unwrap();
    let pki = Pki::generate();
    let (cert, key) = pki.write(dir.path());
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .arg("run")
        .env("WSGATE_POLICY", &policy)
        .env("WSGATE_LISTEN", "127.0.0.1:0")
        .env("WSGATE_ADMIN", "127.0.0.1:0")
        .env("WSGATE_TLS_CERT", &cert)
        .env("WSGATE_TLS_KEY", &key)
        .env("WSGATE_ADMIN_TOKEN_FILE", &token_file)
        .env("WSGATE_LOG_FORMAT", "json")
        .env("WSGATE_SHUTDOWN_DELAY_SECONDS", "1")
        .env("WSGATE_DRAIN_SECONDS", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _kill = KillPid(child.id());
    let log = Log::follow(&mut child);
    let wait_line = |needle: &str| log.wait_line(needle);
    // JSON lines, the listener and the admin listener where the variables put them.
    let listening: serde_json::Value = serde_json::from_str(&wait_line("listening")).unwrap();
    let addr: std::net::SocketAddr = listening["addr"].as_str().unwrap().parse().unwrap();
    let admin: std::net::SocketAddr = listening["admin"].as_str().unwrap().parse().unwrap();
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    // TLS with the pair named by the variables.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.client.clone())
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("a TLS handshake with the certificate from WSGATE_TLS_CERT");
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("wss://localhost:{}/ws", addr.port()),
        ClientStream::Tls(Box::new(tls)),
    )
    .await
    .unwrap();
    ws.send(Message::text("env")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("env"));
    // The operator API takes the token from the file the variable names.
    let (status, _) = operator(admin, "GET", "/connections", serde_json::Value::Null).await;
    assert_eq!(status, 200);
    // SIGTERM: 1 s of delay (still serving), then 1 s of drain for a client that never
    // answers its close.
    let sent = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    wait_line("not ready, still serving");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "exit {took:?} after SIGTERM: delay 1 s + drain 1 s"
    );
    drop(ws);
}

/// Kills a process by its id when dropped (for a child whose handle is waited on
/// elsewhere), so that a failing test leaves nothing running.
struct KillPid(u32);

impl Drop for KillPid {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// CPU time (user + system) of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// An open-file limit below what `max_connections` needs (two descriptors a connection)
/// is a warning at start-up that names both numbers.
#[tokio::test(flavor = "multi_thread")]
async fn an_open_file_limit_below_max_connections_is_a_warning() {
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "");
    let (mut child, log) = spawn_run(&policy, "127.0.0.1:0", "off", &[], Some(200));
    let mut lines = Vec::new();
    while let Some(line) = log.next_line(DEADLINE) {
        let listening = line.contains("listening");
        lines.push(line);
        if listening {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let warning = lines
        .iter()
        .find(|l| l.contains("open-file limit"))
        .unwrap_or_else(|| panic!("no warning in {lines:?}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("open_files_limit=200"), "{warning}");
    assert!(warning.contains("max_connections=10000"), "{warning}");
}

/// Clients holding every descriptor the process may have do not silence the admin
/// listener: `/healthz` and `/readyz` answer from descriptors kept in reserve, again and
/// again, so the kubelet does not restart a gate that is merely full.
#[tokio::test(flavor = "multi_thread")]
async fn health_probes_answer_while_clients_hold_every_descriptor() {
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "");
    let mut gate = Proc::start_limited_with_admin(&policy, 64);
    let admin = gate.admin.unwrap();
    let mut held = Vec::new();
    for _ in 0..120 {
        held.push(tokio::net::TcpStream::connect(gate.addr).await.unwrap());
    }
    gate.wait_line("accept failed");
    for path in ["/healthz", "/readyz", "/healthz", "/readyz", "/healthz"] {
        let (status, _) = tokio::time::timeout(Duration::from_secs(3), admin_fetch(admin, path))
            .await
            .unwrap_or_else(|_| panic!("{path} unanswered while out of descriptors"));
        assert_eq!(status, 200, "{path}");
    }
    // Idle admin connections (someone else's) hold the reserve: each probe closes the
    // oldest of them to take its descriptor, as the connection cap does.
    let mut idle = Vec::new();
    for _ in 0..6 {
        idle.push(tokio::net::TcpStream::connect(admin).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for path in ["/readyz", "/healthz", "/readyz"] {
        let (status, _) = tokio::time::timeout(Duration::from_secs(3), admin_fetch(admin, path))
            .await
            .unwrap_or_else(|_| panic!("{path} unanswered behind idle admin connections"));
        assert_eq!(status, 200, "{path}");
    }
    drop(held);
}

/// An upgrade refused for the upstream's fault (502 `upstream_unavailable`) says which fault
/// in its log line, beside the request id: a connection refused (or the gate out of file
/// descriptors) is not an upstream whose answer broke the handshake.
#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_fault_is_logged_with_its_cause() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A port nothing listens on, and an upstream whose 101 has a wrong accept key.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let wrong = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let _ = tcp.read(&mut head).await;
                let _ = tcp
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                          Connection: Upgrade\r\nSec-WebSocket-Accept: d3Jvbmc=\r\n\r\n",
                    )
                    .await;
                let _ = tcp.read(&mut head).await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "{}  - path: /down\n    upstream: ws://{closed}\n  - path: /wrong\n    upstream: ws://{wrong}\n  - path: /pass\n    http: pass\n    upstream: ws://{closed}\n",
            open_policy(&format!("ws://{closed}"), "")
        ),
    )
    .unwrap();
    let mut gate = Proc::start(&policy, &[]);
    for (path, message, cause) in [
        (
            "/down",
            "the upstream could not be reached",
            "cause=\"connect: Connection refused",
        ),
        (
            "/wrong",
            "the upstream did not complete the exchange",
            "cause=\"a 101 with a wrong Sec-WebSocket-Accept\"",
        ),
    ] {
        let (status, _, body) = refusal(gate.connect(path).await.map(|c| (c, Default::default())));
        assert_eq!(
            (status, body["error"].as_str(), body["message"].as_str()),
            (502, Some("upstream_unavailable"), Some(message)),
            "{path}"
        );
        let line = gate.wait_line("upgrade refused");
        assert!(line.contains(&format!("path={path}")), "{line}");
        assert!(line.contains("request_id="), "{line}");
        assert!(line.contains(cause), "{line}");
    }
    // A plain request on a pass route says it in the same words.
    let mut tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    tcp.write_all(b"GET /pass/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer)).await;
    assert!(answer.starts_with(b"HTTP/1.1 502"), "{answer:?}");
    let line = gate.wait_line("request refused");
    assert!(
        line.contains("cause=\"connect: Connection refused (os error 111)\""),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn accept_backs_off_when_out_of_file_descriptors_and_recovers() {
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "");
    let mut gate = Proc::start_limited(&policy, &[], Some(64));

    // Far more connections than the gate has descriptors for.
    let mut held = Vec::new();
    for _ in 0..120 {
        held.push(tokio::net::TcpStream::connect(gate.addr).await.unwrap());
    }
    gate.wait_line("accept failed");
    let pid = gate.child.id();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    // Clock ticks are 1/100 s: a spinning accept loop would burn ~100 in that second.
    assert!(
        used < 30,
        "the accept loop used {used} ticks in 1 s while out of descriptors"
    );

    drop(held);
    let started = Instant::now();
    loop {
        if let Ok(mut client) = gate.connect("/ws").await {
            client.send(Message::text("back")).await.unwrap();
            assert_eq!(next_message(&mut client).await, Message::text("back"));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the gate did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_serves_its_page_and_echoes_with_the_printed_token() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = StopOnDrop(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut port = None;
    let mut token = None;
    let mut printed = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    // Up to the client command's URL, the last line printed.
    while !printed.iter().any(|l: &String| l.contains("access_token=")) {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("demo printed no URL, token and client command");
        printed.push(line.clone());
        if let Some(rest) = line.trim().strip_prefix("socket:") {
            port = rest
                .trim()
                .trim_end_matches("/ws")
                .rsplit(':')
                .next()
                .map(|p| p.parse::<u16>().unwrap());
        }
        if let Some(rest) = line.trim().strip_prefix("token:") {
            token = Some(rest.trim().to_owned());
        }
    }
    let (port, token) = (port.unwrap(), token.unwrap());

    // The client command installs into a virtual environment (Debian 12 refuses a bare
    // `pip install`) and quotes its URL (a `?` is a glob in zsh).
    let printed = printed.join("\n");
    assert!(
        printed.contains(
            "\n  python3 -m venv /tmp/wsgate-venv && /tmp/wsgate-venv/bin/pip install websockets\n"
        ),
        "{printed}"
    );
    assert!(
        printed
            .contains("SSL_CERT_FILE=certs/dev-ca.pem /tmp/wsgate-venv/bin/python -m websockets"),
        "{printed}"
    );
    assert!(
        printed.ends_with(&format!(
            "\n    'wss://localhost:{port}/ws?access_token={token}'"
        )),
        "{printed}"
    );

    // The development CA from certs/ verifies the demo's certificate.
    let ca = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/dev-ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    use rustls_pki_types::pem::PemObject;
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tls = |c: tokio_rustls::TlsConnector| async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        c.connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
    };

    // One plain request over TLS, the whole answer read.
    let fetch = |head: String| {
        let connecting = tls(connector.clone());
        async move {
            let mut stream = connecting.await;
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        }
    };
    // An upgrade on /ws offering `protocols` (a browser's token entry among them).
    let upgrade = |protocols: String| {
        let connecting = tls(connector.clone());
        async move {
            let mut request = format!("wss://localhost:{port}/ws")
                .into_client_request()
                .unwrap();
            request
                .headers_mut()
                .insert("sec-websocket-protocol", header_value(&protocols));
            tokio_tungstenite::client_async(request, connecting.await)
                .await
                .unwrap()
        }
    };

    // The page comes through the gate from the demo upstream (an `http: pass` route).
    let body = fetch("GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".into()).await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("wsgate demo"), "{body}");

    // A browser passes its token as a subprotocol; the gate keeps it from the upstream
    // and returns the real subprotocol the upstream chose.
    let (mut ws, response) = upgrade(format!("bearer.{token}, echo")).await;
    assert_eq!(response.headers()["sec-websocket-protocol"], "echo");
    ws.send(Message::text("hello demo")).await.unwrap();
    assert_eq!(next_message_any(&mut ws).await, Message::text("hello demo"));

    // GET /demo/token mints a new token on each call (what the page does on each
    // connect), and the gate accepts it.
    let mut fresh = Vec::new();
    for _ in 0..2 {
        let answer = fetch(
            "GET /demo/token HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".into(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["expires_in"], 600, "{body}");
        let page_token = body["token"].as_str().unwrap().to_owned();
        let (mut ws, _) = upgrade(format!("bearer.{page_token}")).await;
        ws.send(Message::text("fresh")).await.unwrap();
        assert_eq!(next_message_any(&mut ws).await, Message::text("fresh"));
        fresh.push(page_token);
    }
    assert_ne!(fresh[0], fresh[1], "the same token twice");
    assert_ne!(fresh[0], token);
    // Not for a name other than a loopback one (a page on a rebound DNS name).
    let answer = fetch(
        "GET /demo/token HTTP/1.1\r\nHost: rebound.example:8443\r\nConnection: close\r\n\r\n"
            .into(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.contains("answer only requests for localhost"),
        "{answer}"
    );

    // Without the token: 401.
    let stream = tls(connector).await;
    let refused =
        tokio_tungstenite::client_async(format!("wss://localhost:{port}/ws"), stream).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
}

struct StopOnDrop(Child);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        support::process::terminate(&mut self.0, Duration::from_secs(3));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_stays_bounded_while_a_client_that_reads_nothing_is_flooded() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        open_policy(&upstream.url(), "    timeouts: {write_seconds: 3}\n"),
    )
    .unwrap();
    let gate = Proc::start(&policy, &[]);
    let pid = gate.child.id();
    let mut client = gate.connect("/ws").await.unwrap();
    // The relay is up both ways before the baseline is taken.
    client.send(Message::text("warm")).await.unwrap();
    assert_eq!(next_message(&mut client).await, Message::text("warm"));
    let baseline = rss_kib(pid);
    // 256 MiB in 64 KiB messages towards a client that never reads.
    client
        .send(Message::text("flood 4096 65536"))
        .await
        .unwrap();
    let started = Instant::now();
    let mut peak = baseline;
    while started.elapsed() < Duration::from_millis(2500) {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let growth = peak.saturating_sub(baseline);
    eprintln!("gate RSS {baseline} KiB, peak {peak} KiB while flooding a stalled client");
    assert!(
        growth < 8 * 1024,
        "the gate grew by {growth} KiB: it is buffering for a stalled client"
    );
    // And after write_seconds the stalled client is dropped and the upstream closed.
    let ended = upstream.wait_ended(0).await;
    assert!(
        matches!(ended, Ended::Close(1001, _) | Ended::Dropped),
        "{ended:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
}

/// A port nothing listens on (for tests that need the same address twice).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `/readyz`'s status, polled until it is `want`; returns how long that took.
async fn readyz_becomes(admin: std::net::SocketAddr, want: u16, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if admin_get(admin, "/readyz").await == want {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "/readyz is not {want}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_delay_keeps_serving_while_readiness_is_503() {
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "");
    let mut gate = Proc::start_at(
        &policy,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--shutdown-delay-seconds", "2", "--drain-seconds", "5"],
    );
    let admin = gate.admin.unwrap();
    let mut open = gate.connect("/ws").await.unwrap();
    assert_eq!(admin_get(admin, "/readyz").await, 200);

    gate.signal("TERM");
    let sent = Instant::now();
    let took = readyz_becomes(admin, 503, Duration::from_secs(2)).await;
    assert!(
        took < Duration::from_millis(200),
        "/readyz 503 after {took:?}"
    );
    // A second into the delay: new upgrades are accepted and served, open ones relay.
    tokio::time::sleep_until((sent + Duration::from_secs(1)).into()).await;
    let mut late = gate.connect("/ws").await.expect("upgrade during the delay");
    late.send(Message::text("late")).await.unwrap();
    assert_eq!(next_message(&mut late).await, Message::text("late"));
    open.send(Message::text("open")).await.unwrap();
    assert_eq!(next_message(&mut open).await, Message::text("open"));
    assert_eq!(admin_get(admin, "/readyz").await, 503);

    // Then the drain: 1001 to both, and exit 0 once they have answered.
    assert_eq!(next_close(&mut open).await, (1001, "going away".into()));
    let closed = sent.elapsed();
    assert!(
        closed >= Duration::from_millis(1900),
        "closed after {closed:?}"
    );
    assert_eq!(next_close(&mut late).await, (1001, "going away".into()));
    drop((open, late));
    let (code, _) = gate.exited(Duration::from_secs(5)).await;
    assert_eq!(code, 0);
    assert!(
        sent.elapsed() < Duration::from_secs(4),
        "{:?}",
        sent.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_cuts_the_shutdown_delay_short() {
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "");
    let mut gate = Proc::start_at(
        &policy,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--shutdown-delay-seconds", "60"],
    );
    gate.signal("TERM");
    readyz_becomes(gate.admin.unwrap(), 503, Duration::from_secs(2)).await;
    let second = Instant::now();
    gate.signal("INT");
    let (code, _) = gate.exited(Duration::from_secs(5)).await;
    assert_eq!(code, 0);
    let took = second.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "exit {took:?} after the second signal"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_gate_exits_promptly_on_sigterm() {
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "");
    let mut gate = Proc::start_at(&policy, "127.0.0.1:0", "127.0.0.1:0", &[]);
    // It has served, and nothing is open now.
    let mut client = gate.connect("/ws").await.unwrap();
    client.close(None).await.unwrap();
    while client.next().await.is_some() {}
    drop(client);
    let series = "wsgate_connections_active{route=\"ws\"}";
    let admin = gate.admin.unwrap();
    wait_metric_at(
        admin,
        series,
        DEADLINE,
        "the closed connection is still open",
        |v| v == 0.0,
    )
    .await;
    gate.signal("TERM");
    let (code, took) = gate.exited(Duration::from_secs(5)).await;
    assert_eq!(code, 0);
    eprintln!("idle gate exited {took:?} after SIGTERM");
    assert!(took < Duration::from_secs(1), "exit took {took:?}");
}

/// A log pipe nobody reads (a stalled log collector) holds neither the gate's work nor
/// its exit: only the log thread waits on it, lines past its buffer are dropped (and
/// counted in a line of the log's own format once stderr takes lines again), and the
/// exit's last flush waits a bounded time.
#[tokio::test(flavor = "multi_thread")]
async fn a_stderr_nobody_reads_holds_neither_the_gate_nor_its_exit() {
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "");
    let json = ["--log-format", "json"];
    let mut gate = Proc::start_at(&policy, "127.0.0.1:0", "127.0.0.1:0", &json);
    gate.stop_reading_log();
    let admin = gate.admin.unwrap();
    // Each refusal logs a line of about 4.3 KB: 500 are 2 MB, far past what the pipe
    // (64 KiB) and the buffer (1 MiB) hold.
    let long = format!("/nowhere/{}", "x".repeat(4000));
    for _ in 0..500 {
        let (status, _) = admin_fetch(gate.addr, &long).await;
        assert_eq!(status, 404);
    }
    let (status, _) = tokio::time::timeout(DEADLINE, admin_fetch(admin, "/healthz"))
        .await
        .expect("/healthz answers while stderr takes nothing");
    assert_eq!(status, 200);
    let mut client = gate.connect("/ws").await.unwrap();
    client.send(Message::text("still relaying")).await.unwrap();
    assert_eq!(
        next_message(&mut client).await,
        Message::text("still relaying")
    );
    drop(client);
    gate.resume_reading_log();
    let line = gate.wait_line("log lines dropped");
    let event: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(event["level"], "WARN", "{line}");
    assert!(event["dropped"].as_u64() > Some(0), "{line}");
    gate.stop_reading_log();
    gate.signal("TERM");
    let (code, took) = gate.exited(Duration::from_secs(10)).await;
    assert_eq!(code, 0);
    eprintln!("exited {took:?} after SIGTERM with its log pipe full");
}

/// A gate whose key file is a FIFO nobody has written yet: its start waits in the policy
/// load, where signals come as they may.
fn start_held_in_its_policy_load(dir: &Path) -> (Child, Log, std::path::PathBuf) {
    let fifo = dir.join("secret");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\ndefaults:\n  upstream: ws://127.0.0.1:9\n  auth: {algorithms: [HS256], keys: [{hmac_secret_file: secret}]}\nroutes:\n  - path: /ws\n",
    )
    .unwrap();
    let (mut child, log) = spawn_run(&policy, "127.0.0.1:0", "off", &[], None);
    // Let it reach the FIFO.
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "exited before loading");
    (child, log, fifo)
}

/// Signals that come while the policy loads: SIGHUP does not kill the starting gate (its
/// default action would), and SIGTERM ends the start with exit 0.
#[test]
fn signals_during_start_up_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, log, fifo) = start_held_in_its_policy_load(dir.path());
    let signal = |child: &Child, sig: &str| {
        let sent = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
    };
    signal(&child, "HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP during start-up killed the gate"
    );
    std::fs::write(&fifo, "a-development-secret-that-is-long-enough-0123").unwrap();
    log.wait_line("listening");
    signal(&child, "TERM");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));

    let dir = tempfile::tempdir().unwrap();
    let (mut child, _log, _fifo) = start_held_in_its_policy_load(dir.path());
    signal(&child, "TERM");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0), "SIGTERM during start-up");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "SIGTERM did not end the start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A policy written while the gate starts (after its load read the file, before the watch
/// was in place) is loaded once it serves, not at the next write.
#[test]
fn a_policy_written_during_start_up_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, log, fifo) = start_held_in_its_policy_load(dir.path());
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        dir.path().join("secret2"),
        "another-development-secret-that-is-long-enough",
    )
    .unwrap();
    let v2 = "version: 1\ndefaults:\n  upstream: ws://127.0.0.1:9\n  auth: {algorithms: [HS256], keys: [{hmac_secret_file: secret2}]}\nroutes:\n  - path: /v2\n";
    std::fs::write(&policy, v2).unwrap();
    // The load, which read the first policy, now finishes.
    std::fs::write(&fifo, "a-development-secret-that-is-long-enough-0123").unwrap();
    log.wait_line("listening");
    let reloaded = log.wait_line("policy reloaded");
    support::process::terminate(&mut child, Duration::from_secs(3));
    let sha = wsgate::config::sha256_hex(v2.as_bytes());
    assert!(reloaded.contains(&sha), "{reloaded}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_stuck_reading_a_file_does_not_hold_the_exit() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\ndefaults:\n  upstream: {}\n  origin: {{allow_missing: true}}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\nroutes:\n  - path: /ws\n",
            upstream.url()
        ),
    )
    .unwrap();
    let mut gate = Proc::start(&policy, &[]);
    // A FIFO renamed over the key file (a policy file that is not a regular file is not
    // read): the reload blocks in it for good (opening it until a writer comes, then
    // reading, since the writer never writes).
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    std::fs::rename(&fifo, &secret).unwrap();
    // Wait until the reload has the FIFO open: only then does a non-blocking open for
    // writing succeed (ENXIO before). The writer is held and never writes, so the reload
    // stays blocked reading.
    let started = Instant::now();
    let _writer = loop {
        use std::os::unix::fs::OpenOptionsExt;
        const O_NONBLOCK: i32 = 0o4000; // Linux
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(O_NONBLOCK)
            .open(&secret)
        {
            Ok(writer) => break writer,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(2),
                "no reload opened the FIFO within 2 s: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    gate.signal("TERM");
    let (code, took) = gate.exited(Duration::from_secs(5)).await;
    assert_eq!(code, 0);
    assert!(took < Duration::from_secs(1), "exit took {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_connection_does_not_hold_the_exit_for_its_handshake_timeout() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    // handshake_seconds is 10 by default: the silent socket would hold the drain that long.
    std::fs::write(&policy, open_policy(&upstream.url(), "")).unwrap();
    let mut gate = Proc::start(&policy, &[]);
    let _silent = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.signal("TERM");
    let (code, took) = gate.exited(Duration::from_secs(12)).await;
    assert_eq!(code, 0);
    assert!(took < Duration::from_millis(2500), "exit took {took:?}");
}

/// One upgrade, one echo and a close through `addr`. An upgrade answered 101 that is then
/// closed 1001 "going away" (its gate began to drain) counts as served.
async fn one_upgrade(addr: std::net::SocketAddr, n: u32) -> Result<(), String> {
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = format!("ws://{addr}/ws").into_client_request().unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(request, tcp)
            .await
            .map_err(|e| format!("upgrade: {e}"))?;
        let text = format!("n{n}");
        ws.send(Message::text(text.clone()))
            .await
            .map_err(|e| format!("send: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str() == text => break,
                Some(Ok(Message::Close(Some(f)))) if u16::from(f.code) == 1001 => break,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => return Err(format!("echo: {other:?}")),
            }
        }
        let _ = ws.close(None).await;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replacement_binds_beside_a_draining_gate_and_no_client_is_refused() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    // The held connection never answers the close: only --drain-seconds ends A's drain.
    std::fs::write(
        &policy,
        open_policy(
            &upstream.url(),
            "    timeouts: {write_seconds: 30}\n    rate: {upgrades_per_second: 1000, burst: 1000}\n",
        ),
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let args = ["--shutdown-delay-seconds", "1", "--drain-seconds", "2"];
    let mut a = Proc::start_at(&policy, &listen, &admin, &args);
    let addr = a.addr;
    let _held = a.connect("/ws").await.unwrap();

    // A new upgrade every 20 ms for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let clients = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let next = tokio::time::Instant::now() + Duration::from_millis(20);
                n += 1;
                match one_upgrade(addr, n).await {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(format!("#{n}: {e}")),
                }
                tokio::time::sleep_until(next).await;
            }
            (ok, failed)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    a.signal("TERM");
    // The replacement, same command line, while A is in its delay and then draining.
    let b = Proc::start_at(&policy, &listen, &admin, &[]);
    let (code, took) = a.exited(Duration::from_secs(8)).await;
    assert_eq!(code, 0);
    assert!(took > Duration::from_secs(2), "A exited after {took:?}");
    // B alone serves.
    let before = upstream.seen_count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = clients.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} upgrades failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(10)]
    );
    assert!(ok > 50, "only {ok} upgrades");
    assert!(
        upstream.seen_count() > before,
        "B served nothing after A exited"
    );
    let mut last = b.connect("/ws").await.unwrap();
    last.send(Message::text("b")).await.unwrap();
    assert_eq!(next_message(&mut last).await, Message::text("b"));
}

/// `open_policy` in front of `upstream`, written to a fresh directory (kept alive by the
/// returned guard).
/// A head refused before it is parsed (431 here) is logged like every other refusal: a
/// request id, the client, the reason and status, the latency and the protocol.
#[tokio::test(flavor = "multi_thread")]
async fn a_head_refused_unparsed_is_logged_with_every_field() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "");
    let mut gate = Proc::start_at(&policy, "127.0.0.1:0", "off", &[]);
    let mut tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let huge = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let _ = tcp.write_all(huge.as_bytes()).await;
    let mut answer = vec![0; 64];
    let n = tcp.read(&mut answer).await.unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 431"),
        "{:?}",
        &answer[..n]
    );
    let line = gate.wait_line("request refused");
    for field in [
        "request_id=",
        "client_ip=127.0.0.1",
        "status=431",
        "latency_ms=",
        "protocol=",
    ] {
        assert!(line.contains(field), "{field}: {line}");
    }
}

/// The open policy of [`open_policy_file`] in report mode.
fn report_policy_file(
    upstream: &Upstream,
    route_extra: &str,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let (dir, policy) = open_policy_file(upstream, route_extra);
    let text = std::fs::read_to_string(&policy).unwrap();
    let report = text.replacen("version: 1\n", "version: 1\nmode: report\n", 1);
    std::fs::write(&policy, report).unwrap();
    (dir, policy)
}

/// A report-mode violation's warn line carries the request id, as the upgrade line the
/// same request then gets does.
#[tokio::test(flavor = "multi_thread")]
async fn a_report_mode_line_names_its_request() {
    let upstream = Upstream::start().await;
    let extra = "    http: pass\n    ip: {deny: [127.0.0.0/8]}\n";
    let (_dir, policy) = report_policy_file(&upstream, extra);
    let mut gate = Proc::start_at(&policy, "127.0.0.1:0", "off", &[]);
    let _ws = gate.connect("/ws").await.unwrap();
    let warned = gate.wait_line("this upgrade would have been refused");
    assert!(warned.contains("reason=\"ip_denied\""), "{warned}");
    let id = |line: &str| {
        let at = line.find("request_id=").expect("a request_id") + "request_id=".len();
        line[at..].split_whitespace().next().unwrap().to_owned()
    };
    let upgraded = gate.wait_line("result=\"accepted\"");
    assert_eq!(id(&warned), id(&upgraded), "{warned}\n{upgraded}");
    // A plain request on the `http: pass` route is a request, not an upgrade.
    let mut tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let get =
        "GET /ws/page HTTP/1.1\r\nHost: x\r\nX-Request-Id: plain-1\r\nConnection: close\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut tcp, get.as_bytes())
        .await
        .unwrap();
    let warned = gate.wait_line("this request would have been refused");
    assert_eq!(id(&warned), "plain-1", "{warned}");
}

/// A report-mode message violation's warn line carries the connection's request id, as its
/// upgrade line does.
#[tokio::test(flavor = "multi_thread")]
async fn a_report_mode_message_line_names_its_request() {
    let upstream = Upstream::start().await;
    let (_dir, policy) = report_policy_file(&upstream, "    messages: {types: [text]}\n");
    let mut gate = Proc::start_at(&policy, "127.0.0.1:0", "off", &[]);
    let mut ws = gate.connect("/ws").await.unwrap();
    ws.send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(
        matches!(echoed, Ok(Some(Ok(Message::Binary(_))))),
        "{echoed:?}"
    );
    let upgraded = gate.wait_line("result=\"accepted\"");
    let warned = gate.wait_line("would have closed the connection");
    assert!(
        warned.contains("reason=\"message_type_not_allowed\""),
        "{warned}"
    );
    let id = |line: &str| {
        let at = line.find("request_id=").expect("a request_id") + "request_id=".len();
        line[at..].split_whitespace().next().unwrap().to_owned()
    };
    assert_eq!(id(&warned), id(&upgraded), "{warned}\n{upgraded}");
}

/// An accepted upgrade's line names the client, the route, the result and the latency;
/// its close line counts the messages and payload bytes each way.
#[tokio::test(flavor = "multi_thread")]
async fn the_upgrade_and_close_lines_carry_their_fields() {
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "");
    let mut gate = Proc::start_at(&policy, "127.0.0.1:0", "off", &[]);
    let mut ws = gate.connect("/ws").await.unwrap();
    let line = gate.wait_line("result=\"accepted\"");
    for field in [
        "request_id=",
        "client_ip=127.0.0.1",
        "route=\"ws\"",
        "path=/ws",
        "latency_ms=",
        "protocol=\"http/1.1\"",
    ] {
        assert!(line.contains(field), "{field}: {line}");
    }
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("hello"));
    ws.send(Message::binary(vec![1u8; 300])).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::binary(vec![1u8; 300]));
    ws.close(None).await.unwrap();
    let line = gate.wait_line("duration_ms=");
    for field in [
        "client_ip=127.0.0.1",
        "route=\"ws\"",
        "messages_in=2",
        "bytes_in=305",
        "messages_out=2",
        "bytes_out=305",
    ] {
        assert!(line.contains(field), "{field}: {line}");
    }
}

/// A plain request proxied on an `http: pass` route gets nginx's access line: who, what,
/// the upstream's status and the time to its head; never the query (it may hold a token).
#[tokio::test(flavor = "multi_thread")]
async fn a_passed_request_is_logged_like_an_access_line() {
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "    http: pass\n");
    let mut gate = Proc::start_at(&policy, "127.0.0.1:0", "off", &[]);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    tcp.write_all(
        b"GET /ws/page?access_token=secret-ish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let line = gate.wait_line("request passed");
    for field in [
        "request_id=",
        "client_ip=127.0.0.1",
        "route=\"ws\"",
        "method=GET",
        "path=/ws/page",
        "result=\"passed\"",
        "status=200",
        "latency_ms=",
        "protocol=\"http/1.1\"",
    ] {
        assert!(line.contains(field), "{field}: {line}");
    }
    assert!(!line.contains("secret-ish"), "{line}");
}

/// An `upstream_tls` with every field null (as the policy's reference form shows it) says
/// nothing and is no error beside a ws:// upstream; one field set is.
#[test]
fn an_upstream_tls_of_nulls_fits_a_ws_upstream_and_one_field_set_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tls.yaml");
    for (tls, expected) in [
        ("{ca_file: null, server_name: null}", 0),
        ("{}", 0),
        ("{ca_file: null, server_name: gate.example}", 1),
    ] {
        std::fs::write(
            &path,
            format!("version: 1\ndefaults:\n  auth: {{required: false}}\n  upstream: ws://127.0.0.1:8080\n  upstream_tls: {tls}\nroutes:\n  - path: /ws\n"),
        )
        .unwrap();
        let (code, text) = check(&path);
        assert_eq!(code, expected, "{tls}: {text}");
        if expected == 1 {
            assert!(text.contains("defaults.upstream_tls"), "{text}");
        }
    }
}

/// An inherited `upstream_tls` that meets a route's own ws:// upstream names that route.
#[test]
fn check_names_the_route_whose_upstream_an_inherited_upstream_tls_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tls.yaml");
    std::fs::write(
        &path,
        "version: 1\ndefaults:\n  auth: {required: false}\n  upstream: wss://secure.example:443\n  upstream_tls: {server_name: secure.example}\nroutes:\n  - path: /ok\n  - path: /plain\n    upstream: ws://127.0.0.1:8080\n",
    )
    .unwrap();
    let (code, text) = check(&path);
    assert_eq!(code, 1, "{text}");
    let line = text
        .lines()
        .find(|l| l.contains(": defaults.upstream_tls: "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("routes[1].upstream"), "{line}");
}

/// An operator request refused for its token is logged with the caller's address (and
/// never the token presented); a change is logged with it too.
#[tokio::test(flavor = "multi_thread")]
async fn operator_requests_are_logged_with_the_callers_address() {
    let upstream = Upstream::start().await;
    let (dir, policy) = open_policy_file(&upstream, "");
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    let mut gate = Proc::start_at(
        &policy,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--admin-token-file", token_file.to_str().unwrap()],
    );
    let admin = gate.admin.unwrap();
    let guess = "guessed-admin-token-0123456789";
    let (status, _, _) = admin_request(
        admin,
        "GET",
        "/connections",
        &[&format!("Authorization: Bearer {guess}")],
        b"",
    )
    .await;
    assert_eq!(status, 401);
    let line = gate.wait_line("request refused without a valid admin token");
    assert!(line.contains("peer=127.0.0.1"), "{line}");
    assert!(line.contains("/connections"), "{line}");
    assert!(!line.contains(guess), "{line}");

    let body = br#"{"sub": "mallory", "ttl_seconds": 60}"#;
    let (status, _, _) = admin_request(
        admin,
        "POST",
        "/revocations",
        &[&format!("Authorization: Bearer {ADMIN_TOKEN}")],
        body,
    )
    .await;
    assert_eq!(status, 200);
    let line = gate.wait_line("operator: token revoked");
    assert!(line.contains("peer=127.0.0.1"), "{line}");

    // A token pasted as the `sub` by mistake is a token: never written to the log.
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLW9mLWEtdG9rZW4";
    let sub = format!(r#"{{"sub": "{jwt}"}}"#);
    let revoke = format!(r#"{{"sub": "{jwt}", "ttl_seconds": 60}}"#);
    for (method, path, body, said) in [
        (
            "POST",
            "/connections/close",
            &sub,
            "operator: connections closed",
        ),
        ("POST", "/revocations", &revoke, "operator: token revoked"),
        (
            "DELETE",
            "/revocations",
            &sub,
            "operator: revocation lifted",
        ),
    ] {
        let auth = format!("Authorization: Bearer {ADMIN_TOKEN}");
        let (status, _, _) = admin_request(admin, method, path, &[&auth], body.as_bytes()).await;
        assert_eq!(status, 200, "{method} {path}");
        let line = gate.wait_line(said);
        assert!(!line.contains("c2lnbmF0dXJl"), "{line}");
        assert!(line.contains("***"), "{line}");
    }
}

/// The longest `--drain-seconds` there is drains like any other: with nothing open, the
/// exit is at once and clean, not a panic on the deadline's arithmetic.
#[tokio::test(flavor = "multi_thread")]
async fn the_largest_drain_seconds_exits_cleanly() {
    let upstream = Upstream::start().await;
    let (_dir, policy) = open_policy_file(&upstream, "");
    let mut gate = Proc::start(
        &policy,
        &[
            "--drain-seconds",
            "18446744073709551615",
            "--shutdown-delay-seconds",
            "0",
        ],
    );
    gate.signal("TERM");
    let (code, _) = gate.exited(Duration::from_secs(5)).await;
    assert_eq!(code, 0);
}

/// rustls warns about what a client sent (here an IP address as SNI, which RFC 6066
/// forbids): with the default log filter none of it reaches the log, where any client
/// could otherwise write a line per handshake.
#[test]
fn a_client_sending_an_ip_as_sni_writes_no_log_line() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("openssl missing: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, open_policy("ws://127.0.0.1:9", "")).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["run", "--admin", "off", "--log-format", "json", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--tls-cert")
        .arg(root.join("certs/localhost.pem"))
        .arg("--tls-key")
        .arg(root.join("certs/localhost.key"))
        .arg("--policy")
        .arg(&policy)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let log = Log::follow(&mut child);
    log.wait_line("listening");
    for _ in 0..3 {
        let out = Command::new("openssl")
            .args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-servername", "10.0.0.1"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"),
            "no handshake"
        );
    }
    log.no_line("SNI", Duration::from_millis(500));
    let _ = child.kill();
    let _ = child.wait();
}

/// A certificate cut short refuses the start (exit 1) with an error a JSON log pipeline
/// sees, in words: the missing end line, not the parser's list of bytes.
#[test]
fn a_certificate_cut_short_is_an_error_line_in_words() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, open_policy("ws://127.0.0.1:9", "")).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pem = std::fs::read(root.join("certs/localhost.pem")).unwrap();
    let cut = dir.path().join("cut.pem");
    std::fs::write(&cut, &pem[..300]).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--admin", "off", "--log-format", "json"])
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cut)
        .arg("--tls-key")
        .arg(root.join("certs/localhost.key"))
        .arg("--policy")
        .arg(&policy)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let error = json_error_line(&out.stderr);
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.contains("-----END CERTIFICATE-----"), "{message}");
    assert!(message.contains("cut.pem"), "{message}");
}

/// `check` (and `explain`) read a pipe (`wsgate check <(kubectl get cm …)`), but a FIFO no
/// one writes to is unreadable after 10 s (exit 2), not a wait without end.
#[test]
fn check_gives_up_on_a_fifo_with_no_writer() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("policy.yaml");
    if !Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("mkfifo missing: skipped");
        return;
    }
    let started = Instant::now();
    let (code, text) = check(&fifo);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("a FIFO with no writer?"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// An address already taken refuses the start (exit 1) with an error a JSON log pipeline
/// sees, not only a plain line: for the listener and for the admin listener.
#[test]
fn an_address_in_use_is_a_json_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, open_policy("ws://127.0.0.1:9", "")).unwrap();
    // A socket without SO_REUSEPORT: the gate's own cannot share its port.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    for (listen, admin, addr) in [
        (taken.as_str(), "off", taken.as_str()),
        ("127.0.0.1:0", taken.as_str(), taken.as_str()),
    ] {
        let out = Command::new(BIN)
            .args(["run", "--plaintext", "--log-format", "json"])
            .args(["--listen", listen, "--admin", admin, "--policy"])
            .arg(&policy)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "--listen {listen} --admin {admin}"
        );
        let error = json_error_line(&out.stderr);
        assert!(
            error["message"]
                .as_str()
                .unwrap_or_default()
                .contains("cannot listen"),
            "{error}"
        );
        assert_eq!(error["addr"], addr, "{error}");
    }
}

/// An HMAC secret from a variable is judged without the whitespace around it, as one from
/// a file is: 40 spaces are no secret.
#[test]
fn a_whitespace_secret_from_a_variable_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\ndefaults:\n  upstream: ws://127.0.0.1:9\n  auth: {algorithms: [HS256], keys: [{hmac_secret_env: WS_TEST_SECRET}]}\nroutes:\n  - path: /ws\n",
    )
    .unwrap();
    for (secret, refused) in [
        (" ".repeat(40), true),
        (format!("  {}  ", "s".repeat(31)), true),
        (format!("  {}  ", "s".repeat(32)), false),
    ] {
        let out = Command::new(BIN)
            .arg("check")
            .arg(&policy)
            .env("WS_TEST_SECRET", &secret)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(if refused { 1 } else { 0 }),
            "{stderr}"
        );
        if refused {
            assert!(
                stderr.contains("without the whitespace around it"),
                "{stderr}"
            );
        }
    }
}

/// The first JSON log line at level ERROR in `stderr` (a start-up refusal's).
fn json_error_line(stderr: &[u8]) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(stderr);
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no JSON error line: {stderr}"))
}

/// A file that holds a second YAML document is refused where that document starts: a
/// `---` or `...` marker, or a line indented less than the first key (the YAML parser says
/// only that there is more than one document).
#[test]
fn check_locates_where_a_second_document_starts() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, at) in [
        (
            "indented.yaml",
            " version: 1\nroutes:\n  - path: /ws\n    upstream: ws://127.0.0.1:9\n",
            "2:1: this line is indented less than the file's first key",
        ),
        (
            "two.yaml",
            "# a comment\n---\nversion: 1\nroutes:\n  - path: /ws\n    upstream: ws://127.0.0.1:9\n---\nversion: 1\n",
            "7:1: a second YAML document starts here",
        ),
        (
            "bom.yaml",
            "\u{feff} version: 1\nroutes:\n  - path: /ws\n    upstream: ws://127.0.0.1:9\n",
            "2:1: this line is indented less than the file's first key",
        ),
        (
            "ended.yaml",
            "version: 1\nroutes:\n  - path: /ws\n    upstream: ws://127.0.0.1:9\n...\n\nroutes: []\n",
            "7:1: a second YAML document starts here, after the `...`",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let (code, out) = check(&path);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(&format!("{}:{at}", path.display())), "{out}");
    }
}

/// A self-signed `localhost` certificate valid from `not_before` to `not_after`, and its
/// key, as PEM.
fn certificate_valid(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// An expired certificate is served (as nginx serves it) but its loading is a warning
/// with the date it expired; `wsgate_tls_certificate_expiry_timestamp_seconds` shows the
/// served certificate's notAfter and follows a rotation; a plaintext gate has no such
/// series.
#[tokio::test(flavor = "multi_thread")]
async fn the_certificate_expiry_is_warned_about_and_exposed() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, open_policy("ws://127.0.0.1:9", "")).unwrap();
    let (cert_pem, key_pem) = certificate_valid((2020, 1, 1), (2025, 1, 1));
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let tls = [
        "--log-format",
        "json",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let (mut child, log) = spawn_run(&policy, "127.0.0.1:0", &admin.to_string(), &tls, None);
    let line = log.wait_line("the certificate expired");
    assert!(line.contains("Wed, 01 Jan 2025 00:00:00 GMT"), "{line}");
    assert!(line.contains("\"WARN\""), "{line}");
    log.wait_line("listening");
    let series = "wsgate_tls_certificate_expiry_timestamp_seconds";
    assert_eq!(metric_at(admin, series).await, 1_735_689_600.0);

    // Renewed: the gauge follows, and the load warns about nothing.
    let (cert_pem, key_pem) = certificate_valid((2020, 1, 1), (2090, 1, 1));
    let tmp = dir.path().join("renewed.tmp");
    std::fs::write(&tmp, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    std::fs::rename(&tmp, &cert).unwrap();
    log.wait_line("certificate reloaded");
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_at(admin, series).await != 3_786_912_000.0 {
        assert!(
            Instant::now() < deadline,
            "the gauge did not follow the rotation"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    log.no_line("the certificate", Duration::from_millis(300));
    let _ = child.kill();
    let _ = child.wait();

    let plain = Proc::start_at(&policy, "127.0.0.1:0", "127.0.0.1:0", &[]);
    let (_, metrics) = admin_fetch(plain.admin.unwrap(), "/metrics").await;
    assert!(!metrics.contains(series), "{metrics}");
}

/// An upgrade still waiting for its upstream when SIGTERM comes gets its answer (here
/// the 504 of an upstream that never answers) before the process exits, also when the
/// answer comes after the drain has begun: the connection's graceful shutdown lets the
/// answer be written (it closed about half of them unanswered), and the exit waits for it.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_awaiting_its_upstream_at_sigterm_gets_its_answer_before_the_exit() {
    use tokio::io::AsyncReadExt;
    // The 504s come after the drain has begun (1 s after the signal).
    let (mut gate, _dir, held) = gate_before_a_silent_upstream(2, &["--drain-seconds", "5"]).await;
    // Several, since an answer decided and not yet written was lost only now and then.
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(wire::send_upgrade(gate.addr, "/ws", "").await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.signal("TERM");
    for (i, tcp) in clients.iter_mut().enumerate() {
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer));
        assert!(read.await.is_ok(), "client {i}: no end");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 504"), "client {i}: {answer:?}");
        assert!(
            answer.contains("upstream_timeout"),
            "client {i}: {answer:?}"
        );
    }
    assert_eq!(gate.wait_exit(Duration::from_secs(5)).0, 0);
    held.abort();
}

/// An upgrade still waiting for its upstream when the drain's deadline passes is dropped by
/// the gate, and logged as such (`result="shutdown"`), not as abandoned by its client.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_unanswered_at_the_drain_deadline_is_logged_as_the_gates() {
    let (mut gate, _dir, held) = gate_before_a_silent_upstream(10, &["--drain-seconds", "1"]).await;
    let _waiting = wire::send_upgrade(gate.addr, "/ws", "X-Request-Id: at-deadline\r\n").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.signal("TERM");
    let line = gate.wait_line("request_id=at-deadline");
    assert!(
        line.contains("upgrade unanswered: the drain's deadline passed"),
        "{line}"
    );
    assert!(line.contains("result=\"shutdown\""), "{line}");
    assert_eq!(gate.wait_exit(Duration::from_secs(5)).0, 0);
    held.abort();
}
