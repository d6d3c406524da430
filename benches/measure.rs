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
    echo_for: Duration,
    concurrency: usize,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full {
        Scale {
            idle: 1000,
            echo_for: Duration::from_secs(5),
            concurrency: 16,
        }
    } else {
        Scale {
            idle: 20,
            echo_for: Duration::from_millis(300),
            concurrency: 2,
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
    std::fs::write(
        &policy,
        format!(
            "version: 1\nmax_connections: 100000\ndefaults:\n  upstream: ws://{upstream_addr}\n  auth: {{required: false}}\n  origin: {{allow_missing: true}}\nroutes:\n  - path: /ws\n"
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

    // Echo round trips, direct then through the gate, same upstream, same client.
    for size in [64usize, 16 * 1024] {
        for c in [1, scale.concurrency] {
            let direct = echo(upstream_addr, c, size, scale.echo_for).await;
            let through = echo(gate.addr, c, size, scale.echo_for).await;
            println!(
                "echo {size:>5} B, C={c:>2}: direct {direct:>8.0} msg/s, through wsgate {through:>8.0} msg/s, ratio {:.2}",
                through / direct
            );
        }
    }
    gate.stop();
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
