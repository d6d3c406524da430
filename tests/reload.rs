//! Live policy: a new valid policy is in force for new upgrades within 2 s, whether the
//! file is rewritten or a Kubernetes ConfigMap swaps its `..data` symlink; an invalid one
//! is refused and the old stays; an open connection never notices.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// Poll until `/path` upgrades (or stops upgrading), at most 2 s after the change.
async fn within_two_seconds(gate: &TestGate, path: &str, want_ok: bool) -> Duration {
    let changed = Instant::now();
    loop {
        let ok = gate.connect(path).await.is_ok();
        if ok == want_ok {
            return changed.elapsed();
        }
        assert!(
            changed.elapsed() < Duration::from_secs(2),
            "{path} still {} after 2 s",
            if want_ok { "refused" } else { "accepted" }
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn assert_still_echoes(client: &mut Client, text: &str) {
    client.send(Message::text(text)).await.unwrap();
    assert_eq!(next_message(client).await, Message::text(text));
}

const SUCCESS: &str = "wsgate_policy_reloads_total{result=\"success\"}";
const FAILURE: &str = "wsgate_policy_reloads_total{result=\"failure\"}";
const TWO_SECONDS: Duration = Duration::from_secs(2);

fn with_v2(upstream: &str) -> String {
    format!("{}  - path: /v2\n", open_policy(upstream, ""))
}

#[tokio::test]
async fn rewritten_file_takes_effect_and_open_connections_stay() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (mut open, _) = gate.connect("/ws").await.unwrap();
    assert!(gate.connect("/v2").await.is_err());

    gate.write_policy(&with_v2(&upstream.url()));
    let took = within_two_seconds(&gate, "/v2", true).await;
    eprintln!("file rewrite took effect after {took:?}");
    assert_still_echoes(&mut open, "still here").await;
    // The counter is bumped just after the swap; wait for it rather than race it.
    gate.wait_metric(SUCCESS, 1.0, TWO_SECONDS, "the reload was not counted")
        .await;
    assert_eq!(gate.metric(SUCCESS).await, 1.0);
}

#[tokio::test]
async fn in_place_write_takes_effect() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    std::fs::write(&gate.policy_path, with_v2(&upstream.url())).unwrap();
    within_two_seconds(&gate, "/v2", true).await;
}

/// A writer slower than the debounce (`kubectl get cm … > policy.yaml`: truncated, then
/// written in pieces) is waited for: the half-written file, though valid YAML that leaves
/// out a route, is never swapped in, so the connection on that route stays.
#[tokio::test]
async fn a_file_still_being_written_is_not_read_half_way() {
    use std::io::Write;
    let upstream = Upstream::start().await;
    let whole = with_v2(&upstream.url());
    let gate = TestGate::start(&whole).await;
    let (mut open, _) = gate.connect("/v2").await.unwrap();
    let first = open_policy(&upstream.url(), "");
    assert!(whole.starts_with(&first));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&gate.policy_path)
        .unwrap();
    file.write_all(first.as_bytes()).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    file.write_all(&whole.as_bytes()[first.len()..]).unwrap();
    drop(file);
    gate.wait_metric(SUCCESS, 1.0, TWO_SECONDS, "the written file was not loaded")
        .await;
    assert_still_echoes(&mut open, "still here").await;
    assert_eq!(gate.metric(FAILURE).await, 0.0);
    assert!(gate.connect("/v2").await.is_ok());
}

/// `cat new.yaml > policy.yaml` truncates the file before writing it: a reload that
/// caught the empty file between the two would refuse it and count a failure. An empty
/// policy file waits for its writes; one left empty is still refused, later.
#[tokio::test]
async fn a_truncated_file_waits_for_its_writes() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    std::fs::write(&gate.policy_path, "").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    std::fs::write(&gate.policy_path, with_v2(&upstream.url())).unwrap();
    gate.wait_metric(SUCCESS, 1.0, TWO_SECONDS, "the written file was not loaded")
        .await;
    assert!(gate.connect("/v2").await.is_ok());
    assert_eq!(gate.metric(FAILURE).await, 0.0);
    std::fs::write(&gate.policy_path, "").unwrap();
    let left_empty = "an empty policy was not refused";
    gate.wait_metric(FAILURE, 1.0, Duration::from_secs(8), left_empty)
        .await;
    assert!(gate.connect("/v2").await.is_ok());
}

#[tokio::test]
async fn invalid_policy_is_refused_and_the_old_one_stays() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&with_v2(&upstream.url())).await;
    let (mut open, _) = gate.connect("/ws").await.unwrap();
    let before = gate.running.gate.policy.load().sha256.clone();

    // A syntax error, then a semantic one (the /v2 route would be gone if either loaded).
    gate.write_policy("version: 1\nroutes: [\n");
    let unnoticed = "the invalid policy was not noticed";
    gate.wait_metric(FAILURE, 1.0, TWO_SECONDS, unnoticed).await;
    gate.write_policy(&open_policy(
        &upstream.url(),
        "    ip: {deny: [10.0.0.0/33]}\n",
    ));
    gate.wait_metric(FAILURE, 2.0, TWO_SECONDS, unnoticed).await;
    assert_eq!(gate.running.gate.policy.load().sha256, before);
    assert!(
        gate.connect("/v2").await.is_ok(),
        "the old policy must stay in force"
    );
    assert_still_echoes(&mut open, "unaffected").await;
    assert_eq!(gate.metric(SUCCESS).await, 0.0);
}

#[tokio::test]
async fn a_policy_with_credentials_in_a_url_is_refused_and_the_old_one_stays() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let before = gate.running.gate.policy.load().sha256.clone();

    // The same upstream, with credentials, and a new /v2 route that would show it loaded.
    let with_credentials = format!("ws://svc:hunter2@{}", upstream.addr);
    gate.write_policy(&with_v2(&with_credentials));
    let unrefused = "the policy with credentials was not refused";
    gate.wait_metric(FAILURE, 1.0, TWO_SECONDS, unrefused).await;
    assert_eq!(gate.running.gate.policy.load().sha256, before);
    assert_eq!(gate.metric(SUCCESS).await, 0.0);
    assert!(gate.connect("/v2").await.is_err(), "the new policy loaded");
    assert!(gate.connect("/ws").await.is_ok());
    let (_, described) = admin_fetch(gate.admin, "/policy").await;
    assert!(!described.contains("hunter2"), "{described}");
}

/// Lay out a directory the way kubelet mounts a ConfigMap: `policy.yaml -> ..data/policy.yaml`,
/// `..data -> ..<timestamp>`.
fn configmap_version(dir: &Path, version: &str, policy: &str) {
    let real = dir.join(version);
    std::fs::create_dir(&real).unwrap();
    std::fs::write(real.join("policy.yaml"), policy).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    // Atomic swap, exactly as kubelet's AtomicWriter does it.
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

#[tokio::test]
async fn configmap_data_symlink_swap_takes_effect() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    configmap_version(
        dir.path(),
        "..2026_11_21_15_00_00.1",
        &open_policy(&upstream.url(), ""),
    );
    std::os::unix::fs::symlink("..data/policy.yaml", dir.path().join("policy.yaml")).unwrap();
    let policy_path = dir.path().join("policy.yaml");
    let gate = TestGate::start_at(dir, policy_path, true).await;
    let (mut open, _) = gate.connect("/ws").await.unwrap();
    assert!(gate.connect("/v2").await.is_err());

    configmap_version(
        gate.dir.path(),
        "..2026_11_21_15_01_00.2",
        &with_v2(&upstream.url()),
    );
    let took = within_two_seconds(&gate, "/v2", true).await;
    eprintln!("ConfigMap swap took effect after {took:?}");
    assert_still_echoes(&mut open, "still here").await;
}

/// The policy's directory replaced whole (the old one renamed away, a new one renamed into
/// its place, as some deploy tools do): the new file takes effect, and so does a later
/// write into the new directory, which the old directory's watch could not see.
#[tokio::test]
async fn a_directory_replaced_whole_is_watched_again() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("policies");
    std::fs::create_dir(&live).unwrap();
    std::fs::write(live.join("policy.yaml"), open_policy(&upstream.url(), "")).unwrap();
    let policy_path = live.join("policy.yaml");
    let gate = TestGate::start_at(dir, policy_path, true).await;
    assert!(gate.connect("/v2").await.is_err());

    let base = gate.dir.path();
    let next = base.join("policies.next");
    std::fs::create_dir(&next).unwrap();
    std::fs::write(next.join("policy.yaml"), with_v2(&upstream.url())).unwrap();
    std::fs::rename(base.join("policies"), base.join("policies.old")).unwrap();
    std::fs::rename(&next, base.join("policies")).unwrap();
    within_two_seconds(&gate, "/v2", true).await;

    // Written in place in the new directory: seen too.
    let without_v2 = open_policy(&upstream.url(), "");
    std::fs::write(base.join("policies/policy.yaml"), without_v2).unwrap();
    within_two_seconds(&gate, "/v2", false).await;
}

#[tokio::test]
async fn established_connections_keep_their_admitted_limits() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (mut open, _) = gate.connect("/ws").await.unwrap();
    // A new policy with a tiny message limit: new connections get it, the open one does not.
    gate.write_policy(&open_policy(
        &upstream.url(),
        "    messages: {max_frame_bytes: 100, max_message_bytes: 100}\n",
    ));
    gate.wait_metric(SUCCESS, 1.0, TWO_SECONDS, "the new policy was not loaded")
        .await;
    let big = "x".repeat(1000);
    assert_still_echoes(&mut open, &big).await;
    let (mut fresh, _) = gate.connect("/ws").await.unwrap();
    fresh.send(Message::text(big)).await.unwrap();
    assert_eq!(next_close(&mut fresh).await.0, 1009);
}

#[tokio::test]
async fn unrelated_files_in_the_directory_do_not_reload() {
    let upstream = Upstream::start().await;
    let policy = open_policy(&upstream.url(), "");
    let gate = TestGate::start(&policy).await;
    // First prove the watcher is alive: a write to the policy itself is seen.
    gate.write_policy(&policy);
    let dead = "the watcher did not see the policy file change";
    gate.wait_metric(SUCCESS, 1.0, TWO_SECONDS, dead).await;
    let log = gate.dir.path().join("wsgate.log");
    for i in 0..20 {
        std::fs::write(&log, format!("line {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nor does a chmod of the directory (seen from the directory and from its parent,
    // where it names the directory as a replacement would).
    let dir = gate.dir.path();
    let mode = std::fs::metadata(dir).unwrap().permissions();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::set_permissions(dir, mode).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Then a second policy write as a marker: events arrive in order and reloads run one
    // at a time, so once the marker's reload is counted, any reload the log writes or the
    // chmods caused (the last 400 ms before the marker, beyond the debounce) is counted too.
    gate.write_policy(&policy);
    gate.wait_metric(SUCCESS, 2.0, TWO_SECONDS, dead).await;
    let reloads = gate.metric(SUCCESS).await + gate.metric(FAILURE).await;
    assert_eq!(
        reloads, 2.0,
        "only the two policy writes may reload; the log file's writes or the chmod did too"
    );
}

/// HS256 with the key in the file `secret` beside the policy.
fn secret_file_policy(upstream: &Upstream) -> String {
    format!(
        "version: 1\ndefaults:\n  upstream: {}\n  origin: {{allow_missing: true}}\n  rate: {{burst: 100}}\n  auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\nroutes:\n  - path: /ws\n",
        upstream.url()
    )
}

#[tokio::test]
async fn a_changed_key_file_reloads_the_policy() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&secret_file_policy(&upstream)).await;
    let exp = unix_now() + 300;
    let token = |secret: &str| hs256_with(secret, serde_json::json!({"sub": "k", "exp": exp}));
    let request = |t: &str| {
        let mut r = gate.request("/ws");
        r.headers_mut()
            .insert("authorization", header_value(&format!("Bearer {t}")));
        r
    };
    assert!(gate.connect_request(request(&token(SECRET))).await.is_ok());
    let rotated = "a-rotated-secret-that-is-also-long-enough-123";
    std::fs::write(gate.dir.path().join("secret"), rotated).unwrap();
    let changed = Instant::now();
    while gate
        .connect_request(request(&token(rotated)))
        .await
        .is_err()
    {
        assert!(
            changed.elapsed() < Duration::from_secs(2),
            "the new secret is not in force after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        gate.connect_request(request(&token(SECRET))).await.is_err(),
        "the old secret must be out"
    );
}

/// A policy refused because a key file it names is not there yet (written before the
/// key, as a deploy may) is tried again when that file appears, without a SIGHUP.
#[tokio::test]
async fn a_policy_waiting_for_its_key_file_loads_when_the_file_appears() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&secret_file_policy(&upstream)).await;
    gate.write_policy(&secret_file_policy(&upstream).replace("secret}", "secret-2026}"));
    gate.wait_metric(
        FAILURE,
        1.0,
        TWO_SECONDS,
        "the policy naming a missing file was not refused",
    )
    .await;
    let rotated = "a-rotated-secret-that-is-also-long-enough-123";
    std::fs::write(gate.dir.path().join("secret-2026"), rotated).unwrap();
    gate.wait_metric(
        SUCCESS,
        1.0,
        TWO_SECONDS,
        "the policy was not loaded once its key file appeared",
    )
    .await;
    let token = hs256_with(
        rotated,
        serde_json::json!({"sub": "k", "exp": unix_now() + 300}),
    );
    let mut request = gate.request("/ws");
    request
        .headers_mut()
        .insert("authorization", header_value(&format!("Bearer {token}")));
    assert!(gate.connect_request(request).await.is_ok());
}

// ----- hostile policy files (issue 7's catalogue) -------------------------------------

#[tokio::test]
async fn a_policy_replaced_100_times_a_second_under_traffic_fails_nothing() {
    let upstream = Upstream::start().await;
    let fast = "    rate: {upgrades_per_second: 1000, burst: 1000}\n";
    let gate = TestGate::start(&open_policy(&upstream.url(), fast)).await;
    let (mut chatty, _) = gate.connect("/ws").await.unwrap();
    // Before: the round-trip time of one echo, over 50 messages.
    let mut before = Duration::ZERO;
    for i in 0..50 {
        let t = Instant::now();
        assert_still_echoes(&mut chatty, &format!("warm {i}")).await;
        before = before.max(t.elapsed());
    }
    // 200 rewrites in 2 s, alternating two valid policies (a harmless field differs).
    let writer = {
        let dir = gate.dir.path().to_owned();
        let path = gate.policy_path.clone();
        let a = open_policy(&upstream.url(), fast);
        let b = format!("{a}    timeouts: {{idle_seconds: 301}}\n");
        tokio::task::spawn_blocking(move || {
            for i in 0..200 {
                let tmp = dir.join(".policy.yaml.tmp");
                std::fs::write(&tmp, if i % 2 == 0 { &b } else { &a }).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut during = Duration::ZERO;
    let (mut upgrades, mut messages) = (0, 0);
    while !writer.is_finished() {
        let t = Instant::now();
        assert_still_echoes(&mut chatty, &format!("during {messages}")).await;
        during = during.max(t.elapsed());
        messages += 1;
        if messages % 10 == 0 {
            let (mut fresh, _) = gate.connect("/ws").await.expect("an upgrade failed");
            assert_still_echoes(&mut fresh, "fresh").await;
            upgrades += 1;
        }
    }
    writer.await.unwrap();
    eprintln!(
        "{messages} echoes and {upgrades} upgrades during 200 rewrites; worst echo {during:?} (before: {before:?}); {} reloads",
        gate.metric(SUCCESS).await
    );
    assert!(upgrades > 0 && messages > 50, "too little traffic to tell");
    // No latency spike: a reload is an atomic pointer swap, off the relay's path. The
    // bound is loose because the machine is shared; a blocking reload would take longer.
    assert!(
        during < before.max(Duration::from_millis(5)) * 20,
        "worst echo {during:?} during the rewrites, {before:?} before"
    );
    assert_eq!(gate.metric(FAILURE).await, 0.0);
    // Rewrites close together are coalesced, never lost: the last one is in force.
    gate.write_policy(&format!(
        "{}  - path: /v2\n",
        open_policy(&upstream.url(), fast)
    ));
    within_two_seconds(&gate, "/v2", true).await;
}

#[tokio::test]
async fn a_deleted_policy_file_keeps_the_policy_and_its_return_takes_effect() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    let (mut open, _) = gate.connect("/ws").await.unwrap();
    std::fs::remove_file(&gate.policy_path).unwrap();
    // The deletion is seen and the reload it starts fails (no file to read).
    let unseen = "the deletion did not start a reload";
    gate.wait_metric(FAILURE, 1.0, TWO_SECONDS, unseen).await;
    // Still the old policy: open connections and new upgrades both work.
    assert_still_echoes(&mut open, "after delete").await;
    assert!(gate.connect("/ws").await.is_ok());
    assert!(gate.connect("/v2").await.is_err());
    std::fs::write(&gate.policy_path, with_v2(&upstream.url())).unwrap();
    within_two_seconds(&gate, "/v2", true).await;
    assert_still_echoes(&mut open, "after re-create").await;
}

/// A FIFO in the policy's place is not opened (opening it would wait for a writer, and
/// every later reload with it): the reload is refused, and the regular file that replaces
/// it is loaded as usual.
#[tokio::test]
async fn a_fifo_in_place_of_the_policy_does_not_stall_reloads() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&open_policy(&upstream.url(), "")).await;
    std::fs::remove_file(&gate.policy_path).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&gate.policy_path)
        .status()
        .unwrap();
    assert!(made.success());
    let unseen = "the FIFO did not start a reload, or its reload did not fail";
    gate.wait_metric(FAILURE, 1.0, TWO_SECONDS, unseen).await;
    std::fs::remove_file(&gate.policy_path).unwrap();
    std::fs::write(&gate.policy_path, with_v2(&upstream.url())).unwrap();
    within_two_seconds(&gate, "/v2", true).await;
}

/// A key file whose read never returns (a FIFO here; a hung mount alike) fails its reload
/// after 10 s, loudly, and the next reload, once the file is put right, goes ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_never_returns_fails_the_reload_and_the_next_goes_ahead() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&secret_file_policy(&upstream)).await;
    let secret = gate.dir.path().join("secret");
    let fifo = gate.dir.path().join("stuck");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::rename(&fifo, &secret).unwrap();
    let started = Instant::now();
    gate.wait_metric(
        FAILURE,
        1.0,
        Duration::from_secs(14),
        "the stuck read did not fail the reload",
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    // The FIFO moved aside (its reader still waits on it), a regular secret in its place.
    std::fs::rename(&secret, &fifo).unwrap();
    let rotated = "a-rotated-secret-that-is-also-long-enough-123";
    std::fs::write(&secret, rotated).unwrap();
    gate.wait_metric(
        SUCCESS,
        1.0,
        TWO_SECONDS,
        "the reload after the stuck one did not go ahead",
    )
    .await;
    // Release the stuck reader, so that the runtime can end.
    drop(std::fs::OpenOptions::new().write(true).open(&fifo).unwrap());
}

#[tokio::test]
async fn a_key_file_gone_keeps_the_old_keys_until_it_returns() {
    let upstream = Upstream::start().await;
    let gate = TestGate::start(&secret_file_policy(&upstream)).await;
    let exp = unix_now() + 300;
    let token = hs256_with(SECRET, serde_json::json!({"sub": "k", "exp": exp}));
    let request = || {
        let mut r = gate.request("/ws");
        r.headers_mut()
            .insert("authorization", header_value(&format!("Bearer {token}")));
        r
    };
    let (mut open, _) = gate.connect_request(request()).await.unwrap();
    std::fs::remove_file(gate.dir.path().join("secret")).unwrap();
    gate.wait_metric(FAILURE, 1.0, TWO_SECONDS, "no reload attempt")
        .await;
    // The reload failed (unreadable key file): the old policy, with its key, stays.
    assert!(gate.connect_request(request()).await.is_ok());
    assert_still_echoes(&mut open, "key file gone").await;
    std::fs::write(gate.dir.path().join("secret"), SECRET).unwrap();
    let returned = "no reload once it returned";
    gate.wait_metric(SUCCESS, 1.0, TWO_SECONDS, returned).await;
    assert!(gate.connect_request(request()).await.is_ok());
}
