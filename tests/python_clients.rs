//! Python's `websockets` (the asyncio client, pinned in `tests/python/requirements.txt`)
//! against the gate: a slow but live reader is not taken for dead, and a client that
//! floods past its rate, then reads, gets its 1008.
//!
//! `.ci/run` makes the virtualenv `target/pyclients` with those requirements. Without it
//! the tests are skipped, except under `CI=true`.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;

/// Run one client mode; its JSON result line. Bounded by `limit`.
async fn run(python: PathBuf, args: Vec<String>, limit: Duration) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/clients.py");
    let mut command = Command::new(python);
    command.arg(script).args(args).stdout(Stdio::piped());
    let output = tokio::time::timeout(limit, tokio::task::spawn_blocking(move || command.output()))
        .await
        .expect("the Python client did not finish")
        .expect("the client task")
        .expect("python runs");
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| panic!("the client said: {text:?}"))
}

/// A reader that takes 5 ms per message while the upstream streams with backpressure is
/// alive: the gate's writes to it make progress, so no heartbeat timeout closes it, even
/// with a heartbeat of 0.3 s + 0.3 s and the client's buffer always full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_python_reader_is_not_closed_as_dead() {
    let Some(python) = python() else { return };
    let upstream = Upstream::start().await;
    let policy = open_policy(
        &upstream.url(),
        "    heartbeat: {interval_seconds: 0.3, timeout_seconds: 0.3}\n",
    );
    let gate = TestGate::start_with(&policy, false).await;
    let url = format!("ws://127.0.0.1:{}/ws", gate.addr.port());
    let result = run(
        python,
        vec!["slow_reader".into(), url, "3".into()],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(result["close"], Value::Null, "{result}");
    assert!(result["received"].as_u64().unwrap_or(0) > 100, "{result}");
}

/// A burst the socket buffers take whole (the client's kernel acknowledges all of it at
/// once, Python's client reading ahead), read slower than the heartbeat timeout allows:
/// the client's kernel took the backlog, so the client has `write_seconds` to read it out
/// and answer the ping behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_reader_slower_than_the_heartbeat_timeout_is_not_closed_as_dead() {
    let Some(python) = python() else { return };
    let upstream = Upstream::start().await;
    let policy = open_policy(
        &upstream.url(),
        "    timeouts: {write_seconds: 20}\n    heartbeat: {interval_seconds: 1, timeout_seconds: 1}\n",
    );
    let gate = TestGate::start_with(&policy, false).await;
    let url = format!("ws://127.0.0.1:{}/ws", gate.addr.port());
    let args = ["burst_reader", &url, "4000", "1000", "0.001"];
    let result = run(
        python,
        args.map(String::from).to_vec(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(result["close"], Value::Null, "{result}");
    assert_eq!(result["echo"], "still here", "{result}");
    // The burst took longer to read than two heartbeat timeouts.
    assert!(result["seconds"].as_f64().unwrap_or(0.0) > 2.0, "{result}");
}

/// Python's asyncio client floods past its message rate, then reads: it gets its 1008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_python_client_reads_its_1008() {
    let Some(python) = python() else { return };
    let upstream = Upstream::start().await;
    let policy = open_policy(
        &upstream.url(),
        "    messages: {per_second: 10, burst: 20}\n    rate: {upgrades_per_second: 1000, burst: 1000}\n",
    );
    let gate = TestGate::start_with(&policy, false).await;
    let url = format!("ws://127.0.0.1:{}/ws", gate.addr.port());
    for run_number in 0..20 {
        let result = run(
            python.clone(),
            vec!["flood_then_read".into(), url.clone()],
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(result["close"], 1008, "run {run_number}: {result}");
    }
}
