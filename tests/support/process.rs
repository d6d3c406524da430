//! The real `wsgate` binary as a child process, for what only a process shows: exit
//! codes, signals, open-file limits and its own memory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{Client, ClientStream, DEADLINE};

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// A child's stderr, read to its end by a thread of its own, line by line: the thread reads
/// on after the `Log` is dropped, so that the child never blocks on a full pipe.
pub struct Log(mpsc::Receiver<String>, Arc<AtomicBool>);

impl Log {
    /// Take `child`'s stderr, which must be piped.
    pub fn follow(child: &mut Child) -> Log {
        let stderr = child.stderr.take().expect("a piped stderr");
        let (tx, lines) = mpsc::channel();
        let paused = Arc::new(AtomicBool::new(false));
        let reading = paused.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                while reading.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = tx.send(line);
            }
        });
        Log(lines, paused)
    }

    /// Stop reading the child's stderr (after at most one more line), as a log pipe
    /// nobody drains: the pipe fills and the child's writes to it block.
    pub fn stop_reading(&self) {
        self.1.store(true, Ordering::Relaxed);
    }

    /// Read the child's stderr again after [`Log::stop_reading`].
    pub fn resume_reading(&self) {
        self.1.store(false, Ordering::Relaxed);
    }

    /// The next line, if one comes within `within`.
    pub fn next_line(&self, within: Duration) -> Option<String> {
        self.0.recv_timeout(within).ok()
    }

    /// The next line containing `needle`; panics after [`DEADLINE`] without one.
    pub fn wait_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => panic!("no log line containing {needle:?}"),
            }
        }
    }

    /// Watch the log for `window` and fail if a line containing `needle` arrives in it.
    pub fn no_line(&self, needle: &str, window: Duration) {
        let end = Instant::now() + window;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) if line.contains(needle) => {
                    panic!("unexpected log line containing {needle:?}: {line}")
                }
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => return,
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the process's log ended"),
            }
        }
    }
}

/// `wsgate run --plaintext` (TLS when `extra` gives `--tls-cert` and `--tls-key`) with
/// text logs at `info` unless `extra` sets a format, under an open-file limit of
/// `max_files` if given, and the follower of its stderr; nothing is waited for.
pub fn spawn_run(
    policy: &Path,
    listen: &str,
    admin: &str,
    extra: &[&str],
    max_files: Option<u32>,
) -> (Child, Log) {
    let mut command = match max_files {
        Some(n) => {
            let mut c = Command::new("bash");
            c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), BIN]);
            c
        }
        None => Command::new(BIN),
    };
    // Plaintext unless `extra` gives a certificate.
    let plaintext = match extra.contains(&"--tls-cert") {
        true => &[][..],
        false => &["--plaintext"][..],
    };
    let mut child = command
        .arg("run")
        .args(plaintext)
        .args(["--admin", admin, "--listen", listen])
        // Text logs unless `extra` asks for another format.
        .args(match extra.contains(&"--log-format") {
            true => &[][..],
            false => &["--log-format", "text"][..],
        })
        .args(extra)
        .arg("--policy")
        .arg(policy)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let log = Log::follow(&mut child);
    (child, log)
}

/// A gate process (`extra` flags) in front of an upstream that accepts connections and
/// never answers, given up on after `upstream_connect_seconds`; the policy's directory and
/// the upstream's task (abort it to let its sockets go) come with it.
pub async fn gate_before_a_silent_upstream(
    upstream_connect_seconds: u32,
    extra: &[&str],
) -> (Proc, tempfile::TempDir, tokio::task::JoinHandle<()>) {
    let (url, held) = super::silent_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    let route = format!("    timeouts: {{upstream_connect_seconds: {upstream_connect_seconds}}}\n");
    std::fs::write(&policy, super::open_policy(&url, &route)).unwrap();
    (Proc::start(&policy, extra), dir, held)
}

/// A `wsgate run --plaintext` child on 127.0.0.1:0; its stderr lines are collected.
pub struct Proc {
    pub child: Child,
    log: Log,
    pub addr: SocketAddr,
    /// The admin listener's address, when it has one.
    pub admin: Option<SocketAddr>,
}

impl Proc {
    pub fn start(policy: &Path, extra: &[&str]) -> Proc {
        Proc::start_limited(policy, extra, None)
    }

    /// Start with `ulimit -n` set to `max_files`, when given.
    pub fn start_limited(policy: &Path, extra: &[&str], max_files: Option<u32>) -> Proc {
        Proc::spawn(policy, "127.0.0.1:0", "off", extra, max_files)
    }

    /// [`Proc::start_limited`] with an admin listener on 127.0.0.1.
    pub fn start_limited_with_admin(policy: &Path, max_files: u32) -> Proc {
        Proc::spawn(policy, "127.0.0.1:0", "127.0.0.1:0", &[], Some(max_files))
    }

    /// Start listening on `listen`, with the admin listener on `admin` (or "off").
    pub fn start_at(policy: &Path, listen: &str, admin: &str, extra: &[&str]) -> Proc {
        Proc::spawn(policy, listen, admin, extra, None)
    }

    fn spawn(
        policy: &Path,
        listen: &str,
        admin: &str,
        extra: &[&str],
        max_files: Option<u32>,
    ) -> Proc {
        let (child, log) = spawn_run(policy, listen, admin, extra, max_files);
        let mut proc = Proc {
            child,
            log,
            addr: "0.0.0.0:0".parse().unwrap(),
            admin: None,
        };
        let line = proc.wait_line("listening");
        if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
            let field = |name: &str| event[name].as_str().and_then(|s| s.parse().ok());
            proc.addr = field("addr").expect("the listening line's addr");
            proc.admin = field("admin");
            return proc;
        }
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap();
        proc.addr = addr.parse().unwrap();
        proc.admin = line
            .split("admin=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok());
        proc
    }

    pub fn wait_line(&mut self, needle: &str) -> String {
        self.log.wait_line(needle)
    }

    /// See [`Log::stop_reading`].
    pub fn stop_reading_log(&self) {
        self.log.stop_reading()
    }

    /// See [`Log::resume_reading`].
    pub fn resume_reading_log(&self) {
        self.log.resume_reading()
    }

    /// Watch the log for `window` and fail if a line containing `needle` arrives in it.
    pub fn no_line(&mut self, needle: &str, window: Duration) {
        self.log.no_line(needle, window)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub fn wait_exit(&mut self, within: Duration) -> (i32, Duration) {
        let started = Instant::now();
        loop {
            if let Some(exit) = self.exit_by(started, within) {
                return exit;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `wait_exit` without blocking the runtime's thread.
    pub async fn exited(&mut self, within: Duration) -> (i32, Duration) {
        let started = Instant::now();
        loop {
            if let Some(exit) = self.exit_by(started, within) {
                return exit;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The exit code and time since `started` if the process has exited; panics once
    /// `within` has passed without an exit.
    fn exit_by(&mut self, started: Instant, within: Duration) -> Option<(i32, Duration)> {
        if let Some(status) = self.child.try_wait().unwrap() {
            return Some((status.code().unwrap_or(-1), started.elapsed()));
        }
        assert!(
            started.elapsed() < within,
            "the process did not exit within {within:?}"
        );
        None
    }

    pub async fn connect(
        &self,
        path: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let request = format!("ws://{}{path}", self.addr)
            .into_client_request()
            .unwrap();
        tokio_tungstenite::client_async(request, ClientStream::Plain(tcp))
            .await
            .map(|(c, _)| c)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The resident set of process `pid`, in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Stop `child` as kubelet stops a container: SIGTERM, then SIGKILL if it is still there
/// after `grace`. What it cleans up on the way out (the demo's temporary directory and
/// the secret in it, a browser's profile) is then not left behind in /tmp.
pub fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(None) = child.try_wait() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}
