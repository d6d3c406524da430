//! The cluster store on a real `redis-server` (Debian's package; `.ci/run` installs it),
//! started by each test on a free loopback port and stopped by PID, shared by real gate
//! processes (the `wsgate` binary, so that one can be killed with SIGKILL). A test is
//! skipped, with a note, when `redis-server` is not installed, except under `CI=true`,
//! where `.ci/run` has installed it and its absence fails the test.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");
/// The lease of these tests: a killed gate's slots are free after this.
const LEASE_SECONDS: u64 = 3;
const TIMEOUT_MS: u64 = 50;

/// A `redis-server` of its own, killed (by PID) when dropped.
struct Redis {
    port: u16,
    /// Serving TLS only (`rediss://`), with the development certificate for localhost.
    tls: bool,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    /// `None` when redis-server is not installed.
    async fn start() -> Option<Redis> {
        Redis::start_with(false).await
    }

    /// [`Redis::start`], serving TLS only when `tls`.
    async fn start_with(tls: bool) -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "redis-server is not installed (CI=true: .ci/run installs Debian's redis-server)"
            );
            eprintln!("redis-server is not installed: skipping (apt-get install redis-server)");
            return None;
        }
        let mut redis = Redis {
            port: free_port(),
            tls,
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        redis.resume().await;
        Some(redis)
    }

    /// The URL the gates get (a `rediss://` one verifies the certificate: the gates
    /// trust the development CA through `SSL_CERT_FILE`).
    fn url(&self) -> String {
        match self.tls {
            true => format!("rediss://localhost:{}/", self.port),
            false => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// The test's own client, trusting the development CA for a TLS store.
    fn client(&self) -> redis::RedisResult<redis::Client> {
        match self.tls {
            true => {
                let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/dev-ca.pem");
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).unwrap()),
                };
                redis::Client::build_with_tls(self.url(), certs)
            }
            false => redis::Client::open(self.url()),
        }
    }

    /// Start (again) on the same port, and wait until it answers.
    async fn resume(&mut self) {
        let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
        let mut command = Command::new("redis-server");
        match self.tls {
            true => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(certs.join("localhost.pem"))
                .arg("--tls-key-file")
                .arg(certs.join("localhost.key"))
                .arg("--tls-ca-cert-file")
                .arg(certs.join("dev-ca.pem"))
                .args(["--tls-auth-clients", "no"]),
            false => command.args(["--port", &self.port.to_string()]),
        };
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping().await {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ping(&self) -> bool {
        let Ok(client) = self.client() else {
            return false;
        };
        let connected = tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        )
        .await;
        match connected {
            Ok(Ok(mut conn)) => redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_ok(),
            _ => false,
        }
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Stop (true) or continue (false) the server's process: its clients' commands wait
    /// in their sockets meanwhile and run when it continues.
    fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("running").id();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Kill it (SIGKILL, by PID) and wait for it.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One `wsgate run` process, killed when dropped.
struct Gate {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    policy_path: PathBuf,
    /// Its log lines (the last [`KEEP_LINES`]).
    logs: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
    _dir: tempfile::TempDir,
}

const KEEP_LINES: usize = 10_000;

fn policy(upstream: &str, prefix: &str, on_failure: &str, rate: &str) -> String {
    format!(
        "version: 1\n\
         trusted_proxies: [127.0.0.1/32]\n\
         cluster:\n  \
           redis_url_env: WSGATE_REDIS_URL\n  \
           key_prefix: \"{prefix}\"\n  \
           on_failure: {on_failure}\n  \
           timeout_ms: {TIMEOUT_MS}\n  \
           lease_seconds: {LEASE_SECONDS}\n\
         defaults:\n  \
           upstream: {upstream}\n  \
           origin: {{allow_missing: true}}\n  \
           rate: {rate}\n  \
           auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\n\
         routes:\n  \
           - path: /ws\n    name: ws\n"
    )
}

const OPEN_RATE: &str = "{upgrades_per_second: 100000, burst: 100000, max_connections_per_ip: 1000, max_connections_per_subject: 2}";

impl Gate {
    fn start(policy: &str, redis_url: &str) -> Gate {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, policy).unwrap();
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        let token = dir.path().join("admin-token");
        std::fs::write(&token, format!("{ADMIN_TOKEN}\n")).unwrap();
        Gate::spawn(&path, &token, redis_url, dir)
    }

    fn spawn(policy: &Path, token: &PathBuf, redis_url: &str, dir: tempfile::TempDir) -> Gate {
        let mut child = Command::new(BIN)
            .args(["run", "--plaintext", "--listen", "127.0.0.1:0"])
            .args(["--admin", "127.0.0.1:0", "--log-format", "text"])
            .arg("--admin-token-file")
            .arg(token)
            .arg("--policy")
            .arg(policy)
            .env("WSGATE_REDIS_URL", redis_url)
            // A rediss:// store's certificate is signed by the development CA.
            .env(
                "SSL_CERT_FILE",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/dev-ca.pem"),
            )
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if std::env::var_os("CLUSTER_TEST_LOGS").is_some() {
                    eprintln!("gate: {line}");
                }
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let line = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the gate never said it was listening");
            if line.contains("listening") {
                break line;
            }
        };
        // Keep the rest (bounded), so the gate never blocks on a full pipe.
        let logs = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
        let kept = logs.clone();
        std::thread::spawn(move || {
            while let Ok(line) = rx.recv() {
                let mut kept = kept.lock().unwrap();
                if kept.len() == KEEP_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        let field = |name: &str| -> SocketAddr {
            let rest = line.split(name).nth(1).unwrap();
            let rest = rest.trim_start_matches("Some(");
            let end = rest.find([' ', ')']).unwrap_or(rest.len());
            rest[..end].parse().unwrap()
        };
        Gate {
            addr: field(" addr="),
            admin: field(" admin="),
            policy_path: policy.to_path_buf(),
            logs,
            child,
            _dir: dir,
        }
    }

    async fn connect(
        &self,
        sub: &str,
        ip: &str,
    ) -> Result<(Client, tungstenite::handshake::client::Response), tungstenite::Error> {
        use tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://127.0.0.1:{}/ws", self.addr.port())
            .into_client_request()
            .unwrap();
        let headers = request.headers_mut();
        headers.insert(
            "authorization",
            header_value(&format!("Bearer {}", hs256(sub))),
        );
        headers.insert("x-forwarded-for", header_value(ip));
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (ws, response) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::client_async(request, ClientStream::Plain(tcp)),
        )
        .await
        .expect("handshake in time")?;
        Ok((ws, response))
    }

    async fn open(&self, sub: &str, ip: &str) -> Client {
        self.connect(sub, ip)
            .await
            .unwrap_or_else(|e| panic!("{sub} from {ip}: {e}"))
            .0
    }

    async fn metric(&self, series: &str) -> f64 {
        metric_at(self.admin, series).await
    }

    /// Wait until `wsgate_cluster_up` is `up`.
    async fn wait_up(&self, up: bool) {
        let want = if up { 1.0 } else { 0.0 };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.metric("wsgate_cluster_up").await != want {
            assert!(Instant::now() < deadline, "wsgate_cluster_up never {want}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many of its log lines so far contain `text`.
    fn logged(&self, text: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    /// Replace the policy file (write + rename); the gate reloads it.
    fn write_policy(&self, policy: &str) {
        let tmp = self.policy_path.with_extension("tmp");
        std::fs::write(&tmp, policy).unwrap();
        std::fs::rename(&tmp, &self.policy_path).unwrap();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.kill();
    }
}

fn prefix() -> String {
    format!("t{}:", std::process::id() ^ (free_port() as u32))
}

/// Retry `attempt` until it is admitted, at most `within`; how long that took.
async fn admitted_within(gate: &Gate, sub: &str, ip: &str, within: Duration) -> (Client, Duration) {
    let started = Instant::now();
    loop {
        match gate.connect(sub, ip).await {
            Ok((ws, _)) => return (ws, started.elapsed()),
            Err(e) => assert!(
                started.elapsed() < within,
                "{sub} still refused after {within:?}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_cap_holds_across_three_gates_and_frees_on_close() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let p = policy(&upstream.url(), &prefix(), "closed", OPEN_RATE);
    let gates: Vec<Gate> = (0..3).map(|_| Gate::start(&p, &redis.url())).collect();
    for g in &gates {
        g.wait_up(true).await;
    }
    let mut first = gates[0].open("alice", "10.0.0.1").await;
    let _second = gates[1].open("alice", "10.0.0.2").await;
    let (status, headers, body) = refusal(gates[2].connect("alice", "10.0.0.3").await);
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_connections"))
    );
    assert!(headers.contains_key("retry-after"));
    // Another subject is not affected.
    let _bob = gates[2].open("bob", "10.0.0.3").await;
    first.close(None).await.unwrap();
    let (_third, took) =
        admitted_within(&gates[2], "alice", "10.0.0.3", Duration::from_secs(2)).await;
    eprintln!("slot freed on another gate after the close: {took:?}");
    drop(redis);
}

/// A connection's shared slots are freed before its close handshake ends: a client that
/// reconnects the moment it has its close reply is admitted, on the same gate or another
/// (the release used to be sent a few milliseconds after the close, and such a reconnect
/// got 429).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_is_free_once_its_close_is_answered() {
    use futures_util::StreamExt;
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let rate = "{upgrades_per_second: 100000, burst: 100000, max_connections_per_ip: 1, max_connections_per_subject: 1}";
    let p = policy(&upstream.url(), &prefix(), "closed", rate);
    let gates: Vec<Gate> = (0..2).map(|_| Gate::start(&p, &redis.url())).collect();
    for g in &gates {
        g.wait_up(true).await;
    }
    for round in 0..8 {
        // Every round reconnects at once, alternately on the same gate and the other.
        let mut ws = gates[round / 2 % 2].open("alice", "10.0.2.1").await;
        ws.close(None).await.unwrap();
        let answered = async { while let Some(Ok(_)) = ws.next().await {} };
        tokio::time::timeout(Duration::from_secs(5), answered)
            .await
            .expect("the close answered");
    }
    drop(redis);
}

/// An upgrade refused after its address's shared slot was taken (here at the subject's
/// cap) frees that slot before it is answered: the client's next upgrade, at once and on
/// either gate, does not find the slot still held (it got a false 429 for the address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_frees_its_address_slot_before_the_answer() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let rate = "{upgrades_per_second: 100000, burst: 100000, max_connections_per_ip: 2, max_connections_per_subject: 1}";
    let p = policy(&upstream.url(), &prefix(), "closed", rate);
    let gates: Vec<Gate> = (0..2).map(|_| Gate::start(&p, &redis.url())).collect();
    for g in &gates {
        g.wait_up(true).await;
    }
    let mut open = Vec::new();
    for round in 0..5 {
        let ip = format!("10.0.1.{round}");
        let holder = format!("held{round}");
        open.push(gates[0].open(&holder, &ip).await);
        let (status, _, body) = refusal(gates[1].connect(&holder, &ip).await);
        assert_eq!(
            (status, body["message"].as_str()),
            (429, Some("too many open connections for this subject")),
            "round {round}"
        );
        // One of the address's two slots is in use: another subject gets the other.
        let other = gates[round % 2]
            .connect(&format!("other{round}"), &ip)
            .await;
        open.push(other.unwrap_or_else(|e| panic!("round {round}: {e}")).0);
    }
    drop(redis);
}

/// A `rediss://` store: two gates reach it over TLS, verifying its certificate (signed by
/// the development CA they trust through `SSL_CERT_FILE`), and share the per-subject cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_store_is_shared_over_rediss() {
    let Some(redis) = Redis::start_with(true).await else {
        return;
    };
    let upstream = Upstream::start().await;
    let p = policy(&upstream.url(), &prefix(), "closed", OPEN_RATE);
    let gates: Vec<Gate> = (0..2).map(|_| Gate::start(&p, &redis.url())).collect();
    for g in &gates {
        g.wait_up(true).await;
    }
    let mut first = gates[0].open("alice", "10.0.0.1").await;
    let _second = gates[0].open("alice", "10.0.0.2").await;
    let (status, _, body) = refusal(gates[1].connect("alice", "10.0.0.3").await);
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_connections"))
    );
    first.close(None).await.unwrap();
    admitted_within(&gates[1], "alice", "10.0.0.3", Duration::from_secs(2)).await;
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*sub:ws:alice")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        keys.len(),
        1,
        "the subject's leases are in the TLS store: {keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_upgrade_rate_holds_across_three_gates() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    // 3 upgrades at once, then one every 100 s: the fourth anywhere is refused.
    let rate = "{upgrades_per_second: 0.01, burst: 3, max_connections_per_ip: 1000, max_connections_per_subject: 100}";
    let p = policy(&upstream.url(), &prefix(), "closed", rate);
    let gates: Vec<Gate> = (0..3).map(|_| Gate::start(&p, &redis.url())).collect();
    for g in &gates {
        g.wait_up(true).await;
    }
    let mut open = Vec::new();
    for g in &gates {
        open.push(g.open("u", "10.1.0.1").await);
    }
    for g in &gates {
        let (status, headers, body) = refusal(g.connect("u", "10.1.0.1").await);
        assert_eq!(
            (status, body["error"].as_str()),
            (429, Some("rate_limited"))
        );
        let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((90..=101).contains(&retry), "Retry-After {retry}");
    }
    // Another address has its own bucket.
    open.push(gates[1].open("u", "10.1.0.2").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gates_slots_expire_within_the_lease() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let p = policy(&upstream.url(), &prefix(), "closed", OPEN_RATE);
    let mut a = Gate::start(&p, &redis.url());
    let b = Gate::start(&p, &redis.url());
    a.wait_up(true).await;
    b.wait_up(true).await;
    let _one = a.open("carol", "10.2.0.1").await;
    let _two = a.open("carol", "10.2.0.1").await;
    let (status, _, _) = refusal(b.connect("carol", "10.2.0.2").await);
    assert_eq!(status, 429);
    // Leases renewed by a live gate outlast their lease.
    tokio::time::sleep(Duration::from_secs(LEASE_SECONDS + 1)).await;
    let (status, _, _) = refusal(b.connect("carol", "10.2.0.2").await);
    assert_eq!(status, 429, "a live gate's leases were not renewed");
    a.kill();
    let (_c, took) = admitted_within(
        &b,
        "carol",
        "10.2.0.2",
        Duration::from_secs(LEASE_SECONDS + 2),
    )
    .await;
    eprintln!("the killed gate's slots were free after {took:?} (lease {LEASE_SECONDS} s)");
    assert!(took <= Duration::from_secs(LEASE_SECONDS + 1));
}

/// `open` admits on local limits and `closed` refuses with 503, quickly, while the store
/// is down; both use it again once it is back, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_open_falls_back_closed_refuses_and_both_recover() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let prefix = prefix();
    let open = Gate::start(
        &policy(&upstream.url(), &prefix, "open", OPEN_RATE),
        &redis.url(),
    );
    let closed = Gate::start(
        &policy(&upstream.url(), &prefix, "closed", OPEN_RATE),
        &redis.url(),
    );
    open.wait_up(true).await;
    closed.wait_up(true).await;
    let _held = open.open("dave", "10.3.0.1").await;
    redis.stop();

    let started = Instant::now();
    let (status, headers, body) = refusal(closed.connect("erin", "10.3.0.2").await);
    let took = started.elapsed();
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("limits_unavailable"))
    );
    assert_eq!(headers["retry-after"], "1");
    eprintln!("closed, store down: 503 in {took:?}");
    assert!(took < Duration::from_millis(TIMEOUT_MS + 450), "{took:?}");

    let started = Instant::now();
    let _local = open.open("erin", "10.3.0.2").await;
    let took = started.elapsed();
    eprintln!("open, store down: admitted on local limits in {took:?}");
    assert!(took < Duration::from_millis(TIMEOUT_MS + 450), "{took:?}");
    // The local per-subject cap (2) still holds: dave has one here already.
    let _dave2 = open.open("dave", "10.3.0.1").await;
    let (status, _, _) = refusal(open.connect("dave", "10.3.0.1").await);
    assert_eq!(status, 429, "the local cap applies while the store is down");
    assert!(open.metric("wsgate_cluster_fallbacks_total").await >= 1.0);
    // Counted by the operation that failed: here the upgrade's script call.
    let (_, text) = admin_fetch(open.admin, "/metrics").await;
    assert!(
        metric_sample(&text, "wsgate_cluster_errors_total{op=\"rate\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    open.wait_up(false).await;
    // The probe while the store is down (every 500 ms) is counted as `refresh`.
    let refresh = |text: &str| {
        metric_sample(text, "wsgate_cluster_errors_total{op=\"refresh\"}").unwrap_or(0.0)
    };
    let (_, before) = admin_fetch(open.admin, "/metrics").await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (_, after) = admin_fetch(open.admin, "/metrics").await;
    assert!(
        refresh(&after) >= refresh(&before) + 2.0,
        "probes not counted: {} then {}",
        refresh(&before),
        refresh(&after)
    );
    // Logged once for the change, not once per upgrade; each decision says it was local.
    // Held, each its own subject: a connection dropped here is released asynchronously
    // (after its upstream's close), and the next one under the same subject could meet
    // the local cap of 2 before that (seen once under load).
    let mut more = Vec::new();
    for i in 0..5 {
        more.push(open.open(&format!("frank{i}"), "10.3.0.9").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(open.logged("cluster store unreachable"), 1);
    assert!(
        open.logged("limits=\"local\"") >= 5,
        "the upgrade line says limits=local"
    );

    redis.resume().await;
    open.wait_up(true).await;
    closed.wait_up(true).await;
    let _back = closed.open("erin", "10.3.0.3").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(open.logged("cluster store reachable again"), 1);
    assert!(closed.logged("limits=\"shared\"") >= 1);
    // The open gate's connections were re-registered: dave's two count across gates again.
    let (status, _, body) = refusal(closed.connect("dave", "10.3.0.4").await);
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_connections"))
    );
}

/// A store that stalls for a moment (every client paused) is marked down by the upgrades
/// that time out meanwhile; once it answers again, the gate uses it within a probe or
/// two (500 ms apart), not at its next lease renewal (10 s apart here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_stalled_is_used_again_within_a_second() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let prefix = prefix();
    let policy = policy(&upstream.url(), &prefix, "closed", OPEN_RATE).replace(
        &format!("lease_seconds: {LEASE_SECONDS}"),
        "lease_seconds: 30",
    );
    let closed = Gate::start(&policy, &redis.url());
    closed.wait_up(true).await;
    let _ws = closed.open("before", "10.6.0.1").await;
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg("700")
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    let paused = Instant::now();
    for i in 0..3 {
        let (status, _, body) = refusal(closed.connect(&format!("stalled{i}"), "10.6.0.2").await);
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("limits_unavailable"))
        );
    }
    assert!(
        paused.elapsed() < Duration::from_millis(700),
        "the pause ended before the store was marked down"
    );
    closed.wait_up(false).await;
    tokio::time::sleep(Duration::from_millis(700).saturating_sub(paused.elapsed())).await;
    let back = Instant::now();
    answers_within(&closed, "after", "10.6.0.3", 101, Duration::from_secs(3)).await;
    eprintln!(
        "the store was used again {:?} after its pause",
        back.elapsed()
    );
    closed.wait_up(true).await;
}

/// A connection's end waits for the store to have its releases at most `timeout_ms` in
/// all, not once per lease (it holds two: its address's and its subject's), before the
/// close reply goes; here the store stalls for 3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_waits_at_most_timeout_ms_for_a_stalled_store() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let policy = policy(&upstream.url(), &prefix(), "open", OPEN_RATE)
        .replace(&format!("timeout_ms: {TIMEOUT_MS}"), "timeout_ms: 400");
    let gate = Gate::start(&policy, &redis.url());
    gate.wait_up(true).await;
    let mut ws = gate.open("stalled", "10.6.0.9").await;
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg("3000")
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    let closing = Instant::now();
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = futures_util::StreamExt::next(&mut ws).await {}
    let took = closing.elapsed();
    assert!(
        took < Duration::from_millis(700),
        "the close reply came {took:?} after the close (timeout_ms is 400)"
    );
}

/// In report mode with `on_failure: closed`, an upgrade the store could not decide is let
/// through on local limits and reported once, not once per call it could not make (the
/// address, the subject, the revocations).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_reports_limits_unavailable_once_per_upgrade() {
    let upstream = Upstream::start().await;
    let policy = policy(&upstream.url(), &prefix(), "closed", OPEN_RATE)
        .replace("version: 1\n", "version: 1\nmode: report\n");
    // Nothing listens there.
    let gate = Gate::start(&policy, &format!("redis://127.0.0.1:{}/", free_port()));
    let series = "wsgate_report_violations_total{route=\"ws\",reason=\"limits_unavailable\"}";
    for (i, sub) in ["first", "second"].iter().enumerate() {
        let _ws = gate.open(sub, "10.6.1.1").await;
        let reported = gate.metric(series).await;
        assert_eq!(reported, (i + 1) as f64, "after {} upgrades", i + 1);
    }
}

/// Upgrades refused while the store stalled leave no slot behind: their script calls, which
/// timed out at the gate, ran in the store once it answered again and took the address's
/// slots; the gate releases them then, not when their lease (30 s here) would expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_refused_while_the_store_stalled_leave_no_slot_behind() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let prefix = prefix();
    let rate = "{upgrades_per_second: 100000, burst: 100000, max_connections_per_ip: 2, max_connections_per_subject: 100}";
    let policy = policy(&upstream.url(), &prefix, "closed", rate).replace(
        &format!("lease_seconds: {LEASE_SECONDS}"),
        "lease_seconds: 30",
    );
    let closed = Gate::start(&policy, &redis.url());
    closed.wait_up(true).await;
    // The store has run the gate's scripts once: during the stall the calls are sent as
    // they are, by hash, and run when the store continues.
    let _before = closed.open("before", "10.7.0.9").await;
    redis.freeze(true);
    for i in 0..3 {
        let (status, _, body) = refusal(closed.connect(&format!("stalled{i}"), "10.7.0.1").await);
        if status != 503 {
            redis.freeze(false);
        }
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("limits_unavailable"))
        );
    }
    redis.freeze(false);
    closed.wait_up(true).await;
    // The address holds no connection: both of its slots are free again.
    let (_first, took) =
        admitted_within(&closed, "first", "10.7.0.1", Duration::from_secs(3)).await;
    let _second = closed.open("second", "10.7.0.1").await;
    eprintln!("the address's slots were free {took:?} after the store was back");
    let (status, _, body) = refusal(closed.connect("third", "10.7.0.1").await);
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_connections"))
    );
}

/// A connection admitted on local limits while the store stalled (not long enough to be
/// marked down), then closed, leaves no slot behind: the store runs the upgrade's
/// timed-out call once it continues, and the gate releases what it may have taken within
/// half a second, not at the next renewal (10 s here), so the address is not refused as
/// full with nothing open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_taken_late_by_a_stalled_store_is_released_soon() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let rate = "{upgrades_per_second: 100000, burst: 100000, max_connections_per_ip: 1, max_connections_per_subject: 100}";
    let policy = policy(&upstream.url(), &prefix(), "open", rate).replace(
        &format!("lease_seconds: {LEASE_SECONDS}"),
        "lease_seconds: 30",
    );
    let gate = Gate::start(&policy, &redis.url());
    gate.wait_up(true).await;
    // The scripts are loaded: during the stall the call is sent by hash and runs later.
    drop(gate.open("warm", "10.7.1.9").await);
    redis.freeze(true);
    let local = gate.open("during", "10.7.1.1").await;
    drop(local);
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.freeze(false);
    let (_after, took) = admitted_within(&gate, "after", "10.7.1.1", Duration::from_secs(3)).await;
    eprintln!("the address's slot was free {took:?} after the store continued");
}

/// A store that accepts TCP but never answers bounds an upgrade the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_never_answers_is_bounded() {
    let upstream = Upstream::start().await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // With a password: /policy must never show it.
    let url = format!("redis://:hunter2@{}/", silent.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            if held.len() < 64 {
                held.push(socket);
            }
        }
    });
    let prefix = prefix();
    let closed = Gate::start(&policy(&upstream.url(), &prefix, "closed", OPEN_RATE), &url);
    let open = Gate::start(&policy(&upstream.url(), &prefix, "open", OPEN_RATE), &url);
    for _ in 0..3 {
        let started = Instant::now();
        let (status, _, body) = refusal(closed.connect("f", "10.4.0.1").await);
        let took = started.elapsed();
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("limits_unavailable"))
        );
        assert!(took < Duration::from_millis(TIMEOUT_MS + 450), "{took:?}");
        let started = Instant::now();
        let _ws = open.open("g", "10.4.0.2").await;
        let took = started.elapsed();
        assert!(took < Duration::from_millis(TIMEOUT_MS + 450), "{took:?}");
        eprintln!("silent store: closed refused and open admitted within {took:?}");
    }
    assert_eq!(open.metric("wsgate_cluster_up").await, 0.0);
    assert_eq!(admin_get(open.admin, "/readyz").await, 200);
    assert_eq!(admin_get(closed.admin, "/readyz").await, 200);
    let (status, shown) = admin_fetch(open.admin, "/policy").await;
    assert_eq!(status, 200);
    assert!(!shown.contains("hunter2"), "{shown}");
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["cluster"]["redis_url_env"], "WSGATE_REDIS_URL");
    assert_eq!(
        shown["cluster"]["redis_url"].as_str().unwrap(),
        url.replace(":hunter2", "***")
    );
    assert_eq!(shown["cluster"]["on_failure"], "open");
    assert_eq!(shown["cluster"]["timeout_ms"], TIMEOUT_MS);
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_gate_closes_the_socket_on_another_within_a_second() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let p = policy(&upstream.url(), &prefix(), "closed", OPEN_RATE);
    let a = Gate::start(&p, &redis.url());
    let c = Gate::start(&p, &redis.url());
    a.wait_up(true).await;
    c.wait_up(true).await;
    // The subscription is set up right after the store answers: give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut victim = c.open("mallory", "10.5.0.1").await;
    let started = Instant::now();
    let (status, answer) = operator(
        a.admin,
        "POST",
        "/revocations",
        json!({"sub": "mallory", "ttl_seconds": 600}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["shared"], true);
    let (code, reason) = next_close(&mut victim).await;
    let took = started.elapsed();
    eprintln!("revoked on gate A, closed on gate C after {took:?}");
    assert_eq!((code, reason.as_str()), (1008, "revoked"));
    assert!(took < Duration::from_secs(1), "{took:?}");
    let (status, _, body) = refusal(c.connect("mallory", "10.5.0.2").await);
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_revoked"))
    );

    // A gate started later applies the revocations still in force.
    let late = Gate::start(&p, &redis.url());
    late.wait_up(true).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match late.connect("mallory", "10.5.0.3").await {
            Err(tungstenite::Error::Http(r)) if r.status() == 401 => break,
            _ => assert!(
                Instant::now() < deadline,
                "the late gate admits a revoked token"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Lifted on C: A admits again.
    let (status, _) = operator(c.admin, "DELETE", "/revocations", json!({"sub": "mallory"})).await;
    assert_eq!(status, 200);
    admitted_within(&a, "mallory", "10.5.0.4", Duration::from_secs(1)).await;
}

/// 200,000 distinct client keys through the upgrade script leave nothing in Redis once
/// their TTLs pass; the peak and the end are reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_flood_leaves_redis_memory_bounded() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let mut conn = redis.conn().await;
    let used = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = used(
        redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await
            .unwrap(),
    );
    let started = Instant::now();
    let script = &wsgate::cluster::scripts::ADMIT;
    // 50 ms emission interval, burst 100, cap 200, lease 3 s (the tests' lease).
    let lease_ms = LEASE_SECONDS * 1000;
    for batch in 0..200u32 {
        let mut pipe = redis::pipe();
        pipe.load_script(script).ignore();
        for i in 0..1000u32 {
            let n = batch * 1000 + i;
            let client = format!("10.{}.{}.{}/32", n >> 16, (n >> 8) & 255, n & 255);
            let mut call = script.prepare_invoke();
            call.key(format!("flood:rate:ws:{client}"))
                .key(format!("flood:ip:ws:{client}"))
                .arg(50_000u64)
                .arg(100u32)
                .arg(format!("gate:{n}"))
                .arg(200u32)
                .arg(lease_ms)
                .arg(0u8);
            pipe.invoke_script(&call).ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(60));
    }
    let flood_took = started.elapsed();
    let info = || async {
        let mut conn = redis.conn().await;
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await
            .unwrap();
        let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        (used(info), keys)
    };
    let (peak, peak_keys) = info().await;
    // Every key expires within the lease.
    tokio::time::sleep(Duration::from_millis(lease_ms + 1500)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let (end, end_keys) = loop {
        let (end, keys) = info().await;
        if keys == 0 || Instant::now() > deadline {
            break (end, keys);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "200,000 client keys in {flood_took:?}: Redis used_memory {before} B before, \
         {peak} B with {peak_keys} keys right after, {end} B with {end_keys} keys {} s later",
        LEASE_SECONDS + 1
    );
    assert_eq!(end_keys, 0, "keys without a TTL remain");
    assert!(
        end < before + 1024 * 1024,
        "{end} B after, {before} B before"
    );
}

/// `cluster` is hot-reloadable: a gate that starts without it shares the limits once a
/// reload adds it, and goes back to its own when a reload removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_can_be_added_and_removed_by_a_reload() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let shared = policy(&upstream.url(), &prefix(), "closed", OPEN_RATE);
    let alone = shared.split("cluster:").next().unwrap().to_owned()
        + &shared[shared.find("defaults:").unwrap()..];
    let a = Gate::start(&shared, &redis.url());
    let b = Gate::start(&alone, &redis.url());
    a.wait_up(true).await;
    let _one = a.open("zed", "10.6.0.1").await;
    let _two = a.open("zed", "10.6.0.1").await;
    // b counts only its own.
    let _three = b.open("zed", "10.6.0.2").await;
    b.write_policy(&shared);
    b.wait_up(true).await;
    // Now b's own connection is not registered (admitted before), but a's two are.
    let (status, _, body) = refusal(b.connect("zed", "10.6.0.2").await);
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_connections"))
    );
    b.write_policy(&alone);
    b.wait_up(false).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, shown) = admin_fetch(b.admin, "/policy").await;
        if shown.contains("\"cluster\":null") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reload without cluster never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _four = b.open("zed", "10.6.0.2").await;
}

/// The renewal of 9,000 leases, as a gate holding 9,000 connections sends it every
/// `lease_seconds / 3`: one pipeline of nine script calls. Reports what it costs Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_9000_leases_is_one_pipelined_batch() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let mut conn = redis.conn().await;
    let script = &wsgate::cluster::scripts::REFRESH;
    let renew = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut pipe = redis::pipe();
        pipe.load_script(script).ignore();
        for chunk in 0..9u32 {
            let mut call = script.prepare_invoke();
            call.arg(30_000u64);
            for i in 0..1000u32 {
                let n = chunk * 1000 + i;
                call.key(format!("renew:sub:ws:user{n}"))
                    .arg(format!("gate:{n}"));
            }
            pipe.invoke_script(&call).ignore();
        }
        let mut conn = conn.clone();
        async move { pipe.query_async::<()>(&mut conn).await }
    };
    renew(&mut conn).await.unwrap();
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = Instant::now();
    let rounds = 5;
    for _ in 0..rounds {
        renew(&mut conn).await.unwrap();
    }
    let took = started.elapsed() / rounds;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    let evalsha = stats
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .unwrap_or("cmdstat_evalsha: none")
        .to_owned();
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    eprintln!(
        "renewing 9,000 leases: {took:?} per batch (one pipeline: SCRIPT LOAD + 9 EVALSHA); \
         {keys} lease keys; {evalsha}"
    );
    assert_eq!(keys, 9000);
    assert!(took < Duration::from_secs(1), "{took:?}");
}

/// `wsgate check` on `cluster`: an unset variable is a warning (exit 0); a `rediss://` URL
/// is accepted unless it turns verification off, and no error repeats the URL.
#[test]
fn check_warns_about_an_unset_url_and_refuses_an_unverified_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(
        &path,
        "version: 1\ndefaults: {auth: {required: false}}\nroutes: [{path: /ws}]\n\
         cluster: {redis_url_env: WSGATE_TEST_REDIS_URL}\n",
    )
    .unwrap();
    let check = |url: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.arg("check")
            .arg(&path)
            .env_remove("WSGATE_TEST_REDIS_URL");
        if let Some(url) = url {
            cmd.env("WSGATE_TEST_REDIS_URL", url);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        (out.status.code(), text)
    };
    let (code, text) = check(None);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("cluster.redis_url_env: warning: WSGATE_TEST_REDIS_URL is not set"),
        "{text}"
    );
    let (code, text) = check(Some("rediss://:hunter2@redis:6379/0#insecure"));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("without certificate verification") && !text.contains("hunter2"),
        "{text}"
    );
    let (code, text) = check(Some("rediss://:hunter2@redis:6379/0"));
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let (code, text) = check(Some("http://:hunter2@redis:6379/0"));
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("does not hold a redis:// or rediss:// URL") && !text.contains("hunter2"),
        "{text}"
    );
    let (code, text) = check(Some("redis://:hunter2@redis:6379/0"));
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

/// `wsgate explain` with `cluster` set never contacts the store (here one that would never
/// answer) and says that the fleet's counts are not consulted.
#[test]
fn explain_does_not_contact_the_store() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    silent.set_nonblocking(true).unwrap();
    let url = format!("redis://{}/", silent.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(
        &path,
        policy("ws://127.0.0.1:9", &prefix(), "closed", OPEN_RATE).replace(
            "auth: {algorithms: [HS256], keys: [{hmac_secret_file: secret}]}",
            "auth: {required: false}",
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("explain")
        .arg("--policy")
        .arg(&path)
        .arg("--url")
        .arg("ws://gate.example/ws")
        .env("WSGATE_REDIS_URL", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("explain did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut text = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(
        text.contains("explain does not contact the store"),
        "{text}"
    );
    assert!(silent.accept().is_err(), "explain connected to the store");
}

/// A TCP relay to the store that can be cut (every connection through it dropped, new
/// ones refused) and restored: one gate cut off while the others still reach the store.
struct Cutter {
    port: u16,
    on: std::sync::Arc<std::sync::atomic::AtomicBool>,
    relays: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Cutter {
    async fn start(target: u16) -> Cutter {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let on = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let relays = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (on2, relays2) = (on.clone(), relays.clone());
        let accepting = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !on2.load(Ordering::SeqCst) {
                    continue;
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                relays2.lock().unwrap().push(relay);
            }
        });
        Cutter {
            port,
            on,
            relays,
            accepting,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn cut(&self) {
        self.on.store(false, std::sync::atomic::Ordering::SeqCst);
        for relay in self.relays.lock().unwrap().drain(..) {
            relay.abort();
        }
    }

    fn restore(&self) {
        self.on.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.cut();
        self.accepting.abort();
    }
}

/// The status `gate` answers an upgrade of `sub` from `ip` with (101 for admitted).
async fn upgrade_status(gate: &Gate, sub: &str, ip: &str) -> u16 {
    match gate.connect(sub, ip).await {
        Ok(_) => 101,
        Err(tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("{sub}: {e}"),
    }
}

/// Until `gate` answers an upgrade of `sub` with `status` (101 for admitted), at most
/// `within`.
async fn answers_within(gate: &Gate, sub: &str, ip: &str, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = upgrade_status(gate, sub, ip).await;
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sub}: still {got}, not {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A revocation lifted while a gate was cut off from the store is lifted there when it
/// reconnects (its reload finds the store no longer holds it); and a store that lost its
/// data (restarted empty) gets the revocations in force back from the gates, rather than
/// the gates lifting them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lift_reaches_a_gate_that_was_cut_off_and_a_store_that_lost_its_data_is_refilled() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let p = policy(&upstream.url(), &prefix(), "open", OPEN_RATE);
    let cutter = Cutter::start(redis.port).await;
    let a = Gate::start(&p, &redis.url());
    let b = Gate::start(&p, &cutter.url());
    a.wait_up(true).await;
    b.wait_up(true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (status, answer) = operator(
        a.admin,
        "POST",
        "/revocations",
        json!({"sub": "ivy", "ttl_seconds": 3600}),
    )
    .await;
    assert_eq!((status, &answer["shared"]), (200, &json!(true)), "{answer}");
    answers_within(&b, "ivy", "10.7.0.1", 401, Duration::from_secs(2)).await;

    cutter.cut();
    b.wait_up(false).await;
    let (status, answer) = operator(a.admin, "DELETE", "/revocations", json!({"sub": "ivy"})).await;
    assert_eq!((status, &answer["shared"]), (200, &json!(true)), "{answer}");
    answers_within(&a, "ivy", "10.7.0.2", 101, Duration::from_secs(1)).await;
    // B missed the lift; once it reaches the store again, it lifts it too.
    cutter.restore();
    b.wait_up(true).await;
    answers_within(&b, "ivy", "10.7.0.3", 101, Duration::from_secs(5)).await;

    // The store restarts empty: the gates store what is in force again, so that a gate
    // started afterwards still refuses the revoked subject, and the gates still do.
    let (status, _) = operator(
        a.admin,
        "POST",
        "/revocations",
        json!({"sub": "zed", "ttl_seconds": 3600}),
    )
    .await;
    assert_eq!(status, 200);
    answers_within(&b, "zed", "10.7.0.4", 401, Duration::from_secs(2)).await;
    redis.stop();
    a.wait_up(false).await;
    redis.resume().await;
    a.wait_up(true).await;
    b.wait_up(true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for gate in [&a, &b] {
        answers_within(gate, "zed", "10.7.0.5", 401, Duration::from_secs(1)).await;
    }
    let late = Gate::start(&p, &redis.url());
    late.wait_up(true).await;
    answers_within(&late, "zed", "10.7.0.6", 401, Duration::from_secs(3)).await;
}

/// A store that loses its data while every connection to it stays up (`FLUSHALL`, or
/// its keys evicted) gets the revocations in force back from the gates at their next
/// renewal (`lease_seconds / 3`, 1 s here), so that a gate started afterwards refuses
/// the revoked subject too (it admitted it: the gates noticed only a broken connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_flushed_while_connected_gets_the_revocations_back() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let prefix = prefix();
    let a = gate_that_revoked_bob(&redis, &upstream, &prefix).await;
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();

    let key = format!("{prefix}revoked:sub:bob");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if ttl > 3500 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{key} not stored again (TTL {ttl})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.logged("the store lost its revocation epoch"), 1);
    let late = Gate::start(
        &policy(&upstream.url(), &prefix, "open", OPEN_RATE),
        &redis.url(),
    );
    late.wait_up(true).await;
    assert_eq!(upgrade_status(&late, "bob", "10.7.2.1").await, 401);
}

/// A revocation ends when its key in the store does, whatever the clock of the gate
/// that made it said: a key whose stored expiry is long past (a gate an hour behind) but
/// whose TTL runs for ten minutes is in force on a gate that loads it, and so is a
/// published revocation whose `expires_at_unix` is past but whose `ttl_seconds` is not.
/// `GET /revocations` shows the expiry on the reading gate's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_end_by_the_stores_ttl_not_a_gates_clock() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let prefix = prefix();
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}revoked:sub:sky"))
        .arg(unix_now() - 3600)
        .arg("EX")
        .arg(600)
        .query_async(&mut conn)
        .await
        .unwrap();
    let gate = Gate::start(
        &policy(&upstream.url(), &prefix, "open", OPEN_RATE),
        &redis.url(),
    );
    gate.wait_up(true).await;
    answers_within(&gate, "sky", "10.7.3.1", 401, Duration::from_secs(2)).await;
    let (status, listed) =
        operator(gate.admin, "GET", "/revocations", serde_json::Value::Null).await;
    assert_eq!(status, 200, "{listed}");
    let expires = listed.to_string();
    let shown = listed["revocations"][0]["expires_at_unix"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        shown >= unix_now() + 590 && shown <= unix_now() + 601,
        "{expires}"
    );

    let message = json!({"op": "revoke", "sub": "sea", "expires_at_unix": unix_now() - 3600, "ttl_seconds": 600});
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("{prefix}revocations"))
        .arg(message.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    answers_within(&gate, "sea", "10.7.3.2", 401, Duration::from_secs(2)).await;
}

/// A store that answers but refuses the gate's keys (an ACL user kept from them) is down
/// and stays down: the probe reads a key of the gate's, so it does not mark the store up
/// for the next call to mark it down again (it swung twice a second on a PING).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_refusing_the_gates_keys_stays_down_without_swinging() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "kept",
                "on",
                ">kept-password",
                "~elsewhere:*",
                "&*",
                "+@all",
            ][..],
        )
        .query_async(&mut conn)
        .await
        .unwrap();
    let upstream = Upstream::start().await;
    let gate = Gate::start(
        &policy(&upstream.url(), &prefix(), "open", OPEN_RATE),
        &format!("redis://kept:kept-password@127.0.0.1:{}/", redis.port),
    );
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(gate.open(&format!("kept{i}"), "10.7.4.1").await);
    }
    gate.wait_up(false).await;
    held.clear();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(gate.metric("wsgate_cluster_up").await, 0.0);
    // (Its one "unreachable" line may come before "listening", which the test keeps.)
    assert!(gate.logged("cluster store unreachable") <= 1);
    assert_eq!(
        gate.logged("cluster store reachable again"),
        0,
        "the store swung back up"
    );
}

/// A revocation made on a gate while the store was down, stored there once the store is
/// back empty, reaches a gate that loaded the emptied store before: it is published, not
/// only stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_stored_again_reaches_a_gate_that_loaded_the_empty_store() {
    let Some(mut redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let p = policy(&upstream.url(), &prefix(), "open", OPEN_RATE);
    let cutter = Cutter::start(redis.port).await;
    let a = Gate::start(&p, &cutter.url());
    let b = Gate::start(&p, &redis.url());
    a.wait_up(true).await;
    b.wait_up(true).await;
    redis.stop();
    a.wait_up(false).await;
    let (status, answer) = operator(
        a.admin,
        "POST",
        "/revocations",
        json!({"sub": "dot", "ttl_seconds": 3600}),
    )
    .await;
    assert_eq!(
        (status, &answer["shared"]),
        (200, &json!(false)),
        "{answer}"
    );
    // The store comes back empty; B loads it (nothing) while A still cannot reach it.
    cutter.cut();
    redis.resume().await;
    b.wait_up(true).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    answers_within(&b, "dot", "10.7.1.1", 101, Duration::from_secs(1)).await;
    cutter.restore();
    a.wait_up(true).await;
    answers_within(&b, "dot", "10.7.1.2", 401, Duration::from_secs(3)).await;
}

/// A gate that starts later refuses the fleet's revoked tokens from its very first
/// upgrade: it waits (at most `timeout_ms`) for the store's revocations before judging a
/// token by them (it admitted one right after it started listening, then closed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_started_later_refuses_revoked_tokens_from_its_first_upgrade() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    // A store 20 ms away, and `timeout_ms` long enough to wait for its revocations (a
    // load is a few round trips: subscribe, the epoch, SCAN, MGET).
    let p = policy(&upstream.url(), &prefix(), "open", OPEN_RATE)
        .replace(&format!("timeout_ms: {TIMEOUT_MS}"), "timeout_ms: 1000");
    let a = Gate::start(&p, &redis.url());
    a.wait_up(true).await;
    let (status, answer) = operator(
        a.admin,
        "POST",
        "/revocations",
        json!({"sub": "bob", "ttl_seconds": 3600}),
    )
    .await;
    assert_eq!((status, &answer["shared"]), (200, &json!(true)), "{answer}");
    let (port, _relay) = slow_relay(redis.port, Duration::from_millis(20)).await;
    let slow = format!("redis://127.0.0.1:{port}");
    for round in 0..4 {
        let late = Gate::start(&p, &slow);
        let got = upgrade_status(&late, "bob", "10.9.1.1").await;
        assert_eq!(got, 401, "round {round}");
    }
}

/// A gate on `redis` under `prefix` that has revoked the subject "bob" for the fleet (its
/// upgrades refused 401).
async fn gate_that_revoked_bob(redis: &Redis, upstream: &Upstream, prefix: &str) -> Gate {
    let a = Gate::start(
        &policy(&upstream.url(), prefix, "open", OPEN_RATE),
        &redis.url(),
    );
    a.wait_up(true).await;
    let (status, answer) = operator(
        a.admin,
        "POST",
        "/revocations",
        json!({"sub": "bob", "ttl_seconds": 3600}),
    )
    .await;
    assert_eq!((status, &answer["shared"]), (200, &json!(true)), "{answer}");
    answers_within(&a, "bob", "10.9.0.1", 401, Duration::from_secs(1)).await;
    a
}

/// A reload to another `key_prefix` moves the gate to another fleet: the revocations it
/// shared with the old one are lifted there, and none is written into the new fleet's
/// keys (they were, so the new fleet's gates disagreed on whom to admit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_prefix_is_another_fleet_for_revocations() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let (old, new) = (prefix(), format!("{}x:", prefix()));
    let a = gate_that_revoked_bob(&redis, &upstream, &old).await;
    a.write_policy(&policy(&upstream.url(), &new, "open", OPEN_RATE));
    answers_within(&a, "bob", "10.9.0.1", 101, Duration::from_secs(5)).await;
    // The new store's epoch is not the old one's: no renewal takes it for data lost.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(a.logged("the store lost its revocation epoch"), 0);
    let mut conn = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{new}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !keys.iter().any(|k| k.contains("revoked")),
        "the new fleet's store got the old one's revocations: {keys:?}"
    );
}

/// The same store under other settings (`timeout_ms`, `on_failure`) is the same fleet: a
/// reload that changes only them keeps the shared revocations in force here, also while
/// the store is stalled and cannot be read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_settings_for_the_same_store_keep_its_revocations() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let prefix = prefix();
    let a = gate_that_revoked_bob(&redis, &upstream, &prefix).await;
    redis.freeze(true);
    a.write_policy(
        &policy(&upstream.url(), &prefix, "open", OPEN_RATE)
            .replace(&format!("timeout_ms: {TIMEOUT_MS}"), "timeout_ms: 70"),
    );
    let success = "wsgate_policy_reloads_total{result=\"success\"}";
    let started = Instant::now();
    while a.metric(success).await < 1.0 {
        if started.elapsed() > Duration::from_secs(3) {
            redis.freeze(false);
            panic!("the reload did not happen");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = upgrade_status(&a, "bob", "10.9.0.1").await;
    let (_, listed) = operator(a.admin, "GET", "/revocations", json!(null)).await;
    redis.freeze(false);
    assert_eq!(status, 401, "a revoked token was admitted after the reload");
    assert_eq!(listed["total"], json!(1), "{listed}");
}

/// A `key_prefix` holding glob characters (`[`, `*`) still finds its own revocations when
/// a gate that starts later loads them (the prefix is matched literally).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_with_glob_characters_loads_its_revocations() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let upstream = Upstream::start().await;
    let p = policy(
        &upstream.url(),
        &format!("{}[1]*", prefix()),
        "open",
        OPEN_RATE,
    );
    let a = Gate::start(&p, &redis.url());
    a.wait_up(true).await;
    let (status, answer) = operator(
        a.admin,
        "POST",
        "/revocations",
        json!({"sub": "quinn", "ttl_seconds": 3600}),
    )
    .await;
    assert_eq!((status, &answer["shared"]), (200, &json!(true)), "{answer}");
    let late = Gate::start(&p, &redis.url());
    late.wait_up(true).await;
    answers_within(&late, "quinn", "10.7.0.1", 401, Duration::from_secs(3)).await;
}

/// A TCP relay to `target` that holds every chunk from it for `delay` before passing it
/// on: a store slower than `timeout_ms` but within a second.
async fn slow_relay(target: u16, delay: Duration) -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepting = tokio::spawn(async move {
        let mut relays = tokio::task::JoinSet::new();
        while let Ok((inbound, _)) = listener.accept().await {
            relays.spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    return;
                };
                let (mut from_gate, mut to_gate) = inbound.into_split();
                let (mut from_store, mut to_store) = outbound.into_split();
                let up = async move {
                    let _ = tokio::io::copy(&mut from_gate, &mut to_store).await;
                };
                let down = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = from_store.read(&mut buf).await {
                        tokio::time::sleep(delay).await;
                        if to_gate.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::join!(up, down);
            });
        }
    });
    (port, accepting)
}

/// As above, with every connection closed after its upgrade: the releases (bounded at a
/// second, so they succeed in 150 ms) do not count as the store answering in time, which
/// would clear the upgrades' failures each time and keep a slow store up for good, every
/// upgrade waiting out `timeout_ms` twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_slower_than_timeout_ms_is_marked_down_while_connections_come_and_go() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let (port, relay) = slow_relay(redis.port, Duration::from_millis(150)).await;
    let upstream = Upstream::start().await;
    let gate = Gate::start(
        &policy(&upstream.url(), &prefix(), "open", OPEN_RATE),
        &format!("redis://127.0.0.1:{port}/"),
    );
    let mut slowest = Duration::ZERO;
    for i in 0..12 {
        let started = Instant::now();
        drop(gate.open(&format!("slow{i}"), "10.7.0.1").await);
        if i >= 8 {
            slowest = slowest.max(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(gate.metric("wsgate_cluster_up").await, 0.0);
    assert_eq!(gate.logged("cluster store unreachable"), 1);
    assert_eq!(gate.logged("cluster store reachable again"), 0);
    // Down, the upgrades do not wait for it (2 × timeout_ms would be 100 ms).
    assert!(
        slowest < Duration::from_millis(2 * TIMEOUT_MS),
        "an upgrade took {slowest:?} with the store down"
    );
    relay.abort();
}

/// A store that takes 600 ms per answer, within `timeout_ms: 5000`, is used: the store
/// client's own response timeout (500 ms by default) does not cut the policy's bound short.
/// (An upgrade's first call may take a few round trips: the scripts are loaded then.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_slower_than_half_a_second_but_within_timeout_ms_is_used() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let (port, relay) = slow_relay(redis.port, Duration::from_millis(600)).await;
    let upstream = Upstream::start().await;
    let p = policy(&upstream.url(), &prefix(), "closed", OPEN_RATE)
        .replace(&format!("timeout_ms: {TIMEOUT_MS}"), "timeout_ms: 5000");
    let gate = Gate::start(&p, &format!("redis://127.0.0.1:{port}/"));
    gate.wait_up(true).await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(gate.open(&format!("slow{i}"), "10.7.0.1").await);
    }
    // Log lines reach stderr in batches: wait for the third.
    let deadline = Instant::now() + Duration::from_secs(2);
    while gate.logged("limits=\"shared\"") < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gate.logged("limits=\"shared\""), 3);
    assert_eq!(gate.metric("wsgate_cluster_up").await, 1.0);
    relay.abort();
}

/// A store that answers, but slower than `timeout_ms` (150 ms against 50 here): the
/// upgrades' calls time out and mark it down, and it stays down (its probes must answer
/// within `timeout_ms`), rather than being marked up by each renewal that took 150 ms and
/// down again by the next three upgrades, logging, resubscribing and reloading each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_slower_than_timeout_ms_stays_down_without_swinging() {
    let Some(redis) = Redis::start().await else {
        return;
    };
    let (port, relay) = slow_relay(redis.port, Duration::from_millis(150)).await;
    let upstream = Upstream::start().await;
    let prefix = prefix();
    let open = Gate::start(
        &policy(&upstream.url(), &prefix, "open", OPEN_RATE),
        &format!("redis://127.0.0.1:{port}/"),
    );
    // No call of its answers within `timeout_ms`: it is never up, not even at first
    // (connecting and the first renewal are bounded by a second, and succeed).
    let mut held = Vec::new();
    for i in 0..20 {
        held.push(open.open(&format!("slow{i}"), "10.7.0.1").await);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(open.metric("wsgate_cluster_up").await, 0.0);
    assert_eq!(open.logged("cluster store unreachable"), 1);
    assert_eq!(
        open.logged("cluster store reachable again"),
        0,
        "the store swung back up"
    );
    relay.abort();
}
