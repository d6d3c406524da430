//! Measures the gate as a separate process against a direct connection to the same echo
//! upstream, in one run: RSS per idle connection (from /proc) and echo round trips.
//!
//! `cargo bench --bench measure` runs it in full; under `cargo test` it runs as a smoke
//! test (few connections, short durations, no thresholds).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

struct Scale {
    idle: usize,
    /// Idle connections held (with heartbeats) for the CPU measurement, and for how long.
    held: usize,
    held_for: Duration,
    echo_for: Duration,
    concurrency: usize,
    connect_for: Duration,
    flood: u32,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full {
        Scale {
            idle: 1000,
            held: 9000,
            held_for: Duration::from_secs(60),
            echo_for: Duration::from_secs(5),
            concurrency: 16,
            connect_for: Duration::from_secs(5),
            flood: 200_000,
        }
    } else {
        Scale {
            idle: 20,
            held: 50,
            held_for: Duration::from_secs(2),
            echo_for: Duration::from_millis(300),
            concurrency: 2,
            connect_for: Duration::from_millis(300),
            flood: 500,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(scale));
}

async fn run(scale: Scale) {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(wsgate::demo::echo_upstream(
        upstream,
        Arc::new(String::new()),
    ));

    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    std::fs::write(
        &policy,
        format!(
            "version: 1\nmax_connections: 100000\ntrusted_proxies: [127.0.0.0/8]\ndefaults:\n  upstream: ws://{upstream_addr}\n  auth: {{required: false}}\n  origin: {{allow_missing: true}}\n  messages: {{per_second: 10000000, burst: 10000000, max_message_bytes: 2097152}}\n  rate: {{upgrades_per_second: 1000000, burst: 1000000, max_connections_per_ip: 100000, max_connections_per_subject: 100000}}\nroutes:\n  - path: /ws\n  - path: /hs256\n    auth: {{algorithms: [HS256], keys: [{{hmac_secret_file: secret}}]}}\n  - path: /es256\n    auth: {{algorithms: [ES256], keys: [{{public_key_file: {keys}/ec.pub.pem}}]}}\n  - path: /flood\n    origin: {{allow: [\"https://only.example\"], allow_missing: false}}\n    rate: {{upgrades_per_second: 2, burst: 5}}\n"
        ),
    )
    .unwrap();
    let mut gate = Gate::start(&policy);
    println!(
        "wsgate measurement ({} idle connections, echo {:?}, C={})",
        scale.idle, scale.echo_for, scale.concurrency
    );

    // Idle memory: RSS before and after opening the connections, through the gate.
    let before = rss_kib(gate.child.id());
    let mut idle = Vec::with_capacity(scale.idle);
    for _ in 0..scale.idle {
        idle.push(connect(gate.addr).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(gate.child.id());
    let per_conn = (after.saturating_sub(before)) as f64 / scale.idle as f64;
    println!("idle: gate RSS {before} KiB -> {after} KiB with {} connections: {per_conn:.1} KiB per connection (both legs)", scale.idle);
    drop(idle);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Many idle connections with heartbeats running: RSS per connection, and the gate's
    // CPU time on them. Each client reads, so it answers the gate's pings.
    let before = rss_kib(gate.child.id());
    let mut readers = Vec::with_capacity(scale.held);
    for i in 0..scale.held {
        let source = std::net::Ipv4Addr::new(127, 0, 2, (i % 200) as u8 + 1);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source.into(), 0)).unwrap();
        let tcp = socket.connect(gate.addr).await.unwrap();
        let request = format!("ws://{}/ws", gate.addr)
            .into_client_request()
            .unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(_)) = ws.next().await {}
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(gate.child.id());
    let cpu_before = cpu_ticks(gate.child.id());
    tokio::time::sleep(scale.held_for).await;
    let cpu = cpu_ticks(gate.child.id()) - cpu_before;
    let alive = readers.iter().filter(|r| !r.is_finished()).count();
    let per_minute_ms = cpu as f64 * 10.0 * 60.0 / scale.held_for.as_secs_f64();
    println!(
        "held: {} connections with heartbeats (20 s interval): RSS {before} KiB -> {after} KiB = {:.1} KiB per connection; gate CPU {per_minute_ms:.0} ms per minute ({:.2}% of a core); {alive} still open after {:?}",
        scale.held,
        after.saturating_sub(before) as f64 / scale.held as f64,
        per_minute_ms / 600.0,
        scale.held_for
    );
    for r in readers {
        r.abort();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The established proxies in front of the same upstream, when installed (Debian's
    // nginx and haproxy), run in the foreground with configs written here.
    let proxies: Vec<Proxy> = [
        Proxy::nginx(upstream_addr, dir.path()),
        Proxy::haproxy(upstream_addr, dir.path()),
    ]
    .into_iter()
    .flatten()
    .collect();
    if proxies.is_empty() {
        println!("(nginx and haproxy not installed: comparing with a direct connection only)");
    }

    // Echo round trips, direct, through each proxy and through the gate: same upstream,
    // same client, same run.
    for size in [64usize, 16 * 1024] {
        for c in [1, scale.concurrency] {
            let direct = echo(upstream_addr, c, size, scale.echo_for).await;
            let mut line = format!("echo {size:>5} B, C={c:>2}: direct {direct:>7.0}");
            let mut best = 0f64;
            for proxy in &proxies {
                let r = echo(proxy.addr, c, size, scale.echo_for).await;
                best = best.max(r);
                line += &format!(", {} {r:>7.0}", proxy.name);
            }
            let through = echo(gate.addr, c, size, scale.echo_for).await;
            line += &format!(
                ", wsgate {through:>7.0} msg/s; wsgate/direct {:.2}",
                through / direct
            );
            if best > 0.0 {
                line += &format!(", wsgate/best proxy {:.2}", through / best);
            }
            println!("{line}");
        }
    }

    // Upgrades per second: connect, upgrade, one echo, close; C workers.
    let hs = token_hs256();
    let es = token_es256(keys);
    let direct = connects(
        upstream_addr,
        "/ws",
        None,
        scale.concurrency,
        scale.connect_for,
    )
    .await;
    for proxy in &proxies {
        let r = connects(
            proxy.addr,
            "/ws",
            None,
            scale.concurrency,
            scale.connect_for,
        )
        .await;
        println!(
            "connect C={}: {} {r:.0}/s ({:.2} of direct)",
            scale.concurrency,
            proxy.name,
            r / direct
        );
    }
    let open = connects(gate.addr, "/ws", None, scale.concurrency, scale.connect_for).await;
    let with_hs = connects(
        gate.addr,
        "/hs256",
        Some(&hs),
        scale.concurrency,
        scale.connect_for,
    )
    .await;
    let with_es = connects(
        gate.addr,
        "/es256",
        Some(&es),
        scale.concurrency,
        scale.connect_for,
    )
    .await;
    println!(
        "connect C={}: direct {direct:.0}/s; wsgate no auth {open:.0}/s ({:.2} of direct); HS256 {with_hs:.0}/s ({:.2} of no auth); ES256 {with_es:.0}/s ({:.2} of no auth)",
        scale.concurrency,
        open / direct,
        with_hs / open,
        with_es / open
    );

    // Address flood, on a fresh gate so that heap freed by the phases above does not hide
    // growth: distinct X-Forwarded-For addresses through a trusted peer, each refused at
    // Origin after the rate check, so each leaves a limiter key behind.
    gate.stop();
    let mut gate = Gate::start(&policy);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(gate.child.id());
    let started = Instant::now();
    flood(gate.addr, scale.flood).await;
    let took = started.elapsed();
    let after = rss_kib(gate.child.id());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let settled = rss_kib(gate.child.id());
    println!(
        "address flood: {} distinct addresses in {:.1} s; gate RSS {before} KiB before, {after} KiB right after, {settled} KiB 4 s later",
        scale.flood,
        took.as_secs_f64()
    );
    gate.stop();
}

/// nginx or HAProxy as a WebSocket reverse proxy in front of the same upstream.
struct Proxy {
    name: &'static str,
    addr: SocketAddr,
    child: Child,
}

impl Proxy {
    fn free_port() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
    }

    fn find(candidates: &[&'static str]) -> Option<&'static str> {
        candidates
            .iter()
            .copied()
            .find(|p| std::path::Path::new(p).exists())
    }

    /// nginx as a single process (`master_process off`), so that killing it leaves no
    /// orphaned worker behind.
    fn nginx(upstream: SocketAddr, dir: &std::path::Path) -> Option<Proxy> {
        let bin = Proxy::find(&["/usr/sbin/nginx", "/usr/bin/nginx"])?;
        let addr = Proxy::free_port();
        let prefix = dir.join("nginx");
        std::fs::create_dir_all(prefix.join("logs")).ok()?;
        let conf = prefix.join("nginx.conf");
        let p = prefix.display();
        let config = format!(
            "worker_processes 1;
daemon off;
master_process off;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {p}/body; proxy_temp_path {p}/proxy; fastcgi_temp_path {p}/fcgi;
  uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen {addr};
    location / {{
      proxy_pass http://{upstream};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 3600s;
    }}
  }}
}}
"
        );
        std::fs::write(&conf, config).ok()?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Proxy::ready("nginx", addr, child)
    }

    fn haproxy(upstream: SocketAddr, dir: &std::path::Path) -> Option<Proxy> {
        let bin = Proxy::find(&["/usr/sbin/haproxy", "/usr/bin/haproxy"])?;
        let addr = Proxy::free_port();
        let conf = dir.join("haproxy.cfg");
        let config = format!(
            "global
  maxconn 9000
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind {addr}
  default_backend be
backend be
  server s1 {upstream}
"
        );
        std::fs::write(&conf, config).ok()?;
        let child = Command::new(bin)
            .arg("-f")
            .arg(&conf)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Proxy::ready("haproxy", addr, child)
    }

    /// Wait (bounded) until it accepts connections.
    fn ready(name: &'static str, addr: SocketAddr, mut child: Child) -> Option<Proxy> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Proxy { name, addr, child })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

fn exp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600
}

fn token_hs256() -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let claims = serde_json::json!({"sub": "bench", "exp": exp()});
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn token_es256(keys: &str) -> String {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let pem = std::fs::read(format!("{keys}/ec.key")).unwrap();
    let claims = serde_json::json!({"sub": "bench", "exp": exp()});
    encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&pem).unwrap(),
    )
    .unwrap()
}

/// Closed-loop upgrades on `c` workers for `duration`: connect, upgrade, one echo, close.
async fn connects(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    c: usize,
    duration: Duration,
) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..c {
        let path = path.to_owned();
        let token = token.map(str::to_owned);
        tasks.push(tokio::spawn(async move {
            let mut count = 0u64;
            while started.elapsed() < duration {
                let tcp = TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
                if let Some(t) = &token {
                    request
                        .headers_mut()
                        .insert("authorization", format!("Bearer {t}").parse().unwrap());
                }
                let (mut ws, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
                ws.send(Message::text("x")).await.unwrap();
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() {
                        break;
                    }
                }
                let _ = ws.close(None).await;
                while let Some(Ok(_)) = ws.next().await {}
                count += 1;
            }
            count
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// `n` upgrade attempts, each from its own X-Forwarded-For address, spread over 64
/// loopback source addresses and 16 concurrent workers.
async fn flood(addr: SocketAddr, n: u32) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let workers = 16u32;
    let mut tasks = Vec::new();
    for w in 0..workers {
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut i = w;
            while i < n {
                let source = std::net::Ipv4Addr::new(127, 0, 1, (i % 64) as u8 + 1);
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::new(source.into(), 0)).unwrap();
                let mut tcp = socket.connect(addr).await.unwrap();
                let client = std::net::Ipv4Addr::from(0x0b00_0000u32 + i);
                let request = format!(
                    "GET /flood HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Forwarded-For: {client}\r\n\r\n"
                );
                tcp.write_all(request.as_bytes()).await.unwrap();
                buf.clear();
                if tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await.is_err() {
                    panic!("flood attempt {i} from {source}: no answer in 5 s; got {:?}", String::from_utf8_lossy(&buf));
                }
                assert!(buf.starts_with(b"HTTP/1.1 403"), "{}", String::from_utf8_lossy(&buf));
                i += workers;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn connect(addr: SocketAddr) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let request = format!("ws://{addr}/ws").into_client_request().unwrap();
    tokio_tungstenite::client_async(request, tcp)
        .await
        .unwrap()
        .0
}

/// Closed-loop echo on `c` connections for `duration`; messages per second.
async fn echo(addr: SocketAddr, c: usize, size: usize, duration: Duration) -> f64 {
    let mut tasks = Vec::new();
    let started = Instant::now();
    for _ in 0..c {
        tasks.push(tokio::spawn(async move {
            let mut ws = connect(addr).await;
            let payload = Message::binary(vec![42u8; size]);
            let mut count = 0u64;
            while started.elapsed() < duration {
                ws.send(payload.clone()).await.unwrap();
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Binary(_))) => break,
                        Some(Ok(_)) => continue,
                        other => panic!("echo failed: {other:?}"),
                    }
                }
                count += 1;
            }
            let _ = ws.close(None).await;
            count
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// CPU time (user + system) of a process so far, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(end) = stat.rfind(')') else { return 0 };
    let fields: Vec<&str> = stat[end + 2..].split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

struct Gate {
    child: Child,
    addr: SocketAddr,
}

impl Gate {
    fn start(policy: &std::path::Path) -> Gate {
        let mut child = Command::new(BIN)
            .args([
                "run",
                "--plaintext",
                "--admin",
                "off",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "text",
            ])
            .arg("--policy")
            .arg(policy)
            .env("RUST_LOG", "warn,wsgate=info,wsgate::http=warn")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("wsgate exited").unwrap();
            if let Some(rest) = line.split("addr=").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Gate { child, addr }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop();
    }
}
