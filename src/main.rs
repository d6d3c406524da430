//! The `wsgate` binary: parse the command line, set up logging, load and validate the
//! policy *before* binding any port, start the gate, wait for SIGTERM/SIGINT, drain.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use wsgate::{config, demo, mint, shutdown, tls, Options};

#[derive(Parser)]
#[command(
    name = "wsgate",
    version,
    propagate_version = true,
    about = "TLS-terminating WebSocket policy sidecar"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// `display_name`: each command's `--version` prints `wsgate 0.1.0`, as `wsgate --version`
// does, not clap's `wsgate-run 0.1.0`.
#[derive(Subcommand)]
enum Command {
    /// Run the gate.
    #[command(display_name = "wsgate")]
    Run(RunArgs),
    /// Validate a policy file: exit 0 valid, 1 invalid, 2 unreadable.
    #[command(display_name = "wsgate")]
    Check { path: PathBuf },
    /// Print the policy file's JSON Schema (draft 2020-12), for editors and validators.
    #[command(display_name = "wsgate")]
    Schema,
    /// Mint an HS256 token for local testing.
    #[command(display_name = "wsgate")]
    Token(TokenArgs),
    /// Put one upgrade request through a policy's admission, step by step, without opening
    /// a socket: exit 0 admitted, 1 refused, 2 bad input.
    #[command(display_name = "wsgate")]
    Explain(ExplainArgs),
    /// The quick start: the gate on TLS with the development certificate, in front of a
    /// built-in echo upstream that also serves a browser demo page.
    #[command(display_name = "wsgate")]
    Demo {
        #[arg(long, env = "WSGATE_LISTEN", default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, env = "WSGATE_POLICY", default_value = "policies/default.yaml")]
    policy: PathBuf,
    #[arg(long, env = "WSGATE_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// PEM certificate chain (with --tls-key).
    #[arg(long, env = "WSGATE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key (with --tls-cert).
    #[arg(long, env = "WSGATE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve ws:// without TLS (TLS done by a mesh).
    #[arg(long, env = "WSGATE_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new())]
    plaintext: bool,
    /// Admin listener address, or "off".
    #[arg(long, env = "WSGATE_ADMIN", default_value = "127.0.0.1:9901")]
    admin: String,
    /// How long open connections get to close on SIGTERM/SIGINT.
    #[arg(long, env = "WSGATE_DRAIN_SECONDS", default_value_t = 25)]
    drain_seconds: u64,
    /// After SIGTERM/SIGINT, how long /readyz says 503 while the gate still accepts and
    /// serves, before it stops accepting and drains; a second signal ends it early.
    #[arg(long, env = "WSGATE_SHUTDOWN_DELAY_SECONDS", default_value_t = 0)]
    shutdown_delay_seconds: u64,
    /// text on a terminal, json otherwise.
    #[arg(long, env = "WSGATE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// File holding the bearer token of the operator API (/connections, /revocations on
    /// the admin listener); re-read when it changes. Without it those endpoints answer 403.
    #[arg(long, env = "WSGATE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ExplainArgs {
    #[arg(long, env = "WSGATE_POLICY")]
    policy: PathBuf,
    /// The URL the client opens (ws://, wss://, http:// or https://).
    #[arg(long, env = "WSGATE_URL")]
    url: String,
    /// A request header, 'Name: value' (repeatable); replaces the handshake header of the
    /// same name.
    #[arg(long = "header", env = "WSGATE_HEADER")]
    headers: Vec<String>,
    /// The TCP peer's address.
    #[arg(long, env = "WSGATE_PEER", default_value = "127.0.0.1")]
    peer: std::net::IpAddr,
    /// Print JSON instead of text.
    #[arg(long, env = "WSGATE_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    json: bool,
}

#[derive(clap::Args)]
struct TokenArgs {
    /// Environment variable holding the HMAC secret.
    #[arg(long, env = "WSGATE_SECRET_ENV")]
    secret_env: String,
    #[arg(long, env = "WSGATE_SUB")]
    sub: String,
    #[arg(long, env = "WSGATE_TTL", default_value = "1h", value_parser = mint::parse_ttl)]
    ttl: Duration,
    #[arg(long, env = "WSGATE_AUD")]
    aud: Option<String>,
    #[arg(long, env = "WSGATE_ISS")]
    iss: Option<String>,
    /// Extra claim, k=v (repeatable).
    #[arg(long = "claim", env = "WSGATE_CLAIM", value_parser = parse_claim)]
    claims: Vec<(String, String)>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_claim(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("", _)) => Err(format!("{s:?} has no claim name before '='")),
        Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
        None => Err(format!("{s:?} is not k=v")),
    }
}

/// An empty `WSGATE_*` variable of a flag is unset, as `-e WSGATE_TLS_CERT=` or an empty
/// `value:` in a manifest means: clap would take it as a flag given without its value.
/// (Before any thread exists: nothing else reads the environment concurrently.)
fn unset_empty_flag_variables(cli: &clap::Command) {
    for arg in cli
        .get_subcommands()
        .flat_map(|c| c.get_arguments())
        .chain(cli.get_arguments())
    {
        if let Some(name) = arg.get_env() {
            if std::env::var_os(name).is_some_and(|v| v.is_empty()) {
                std::env::remove_var(name);
            }
        }
    }
}

fn main() -> ExitCode {
    unset_empty_flag_variables(&Cli::command());
    // A second `Command`: clap reads each flag's variable when the `Command` is built, so
    // the first one still holds the empty values just removed.
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let (Command::Run(args), Some(("run", run))) = (&mut cli.command, matches.subcommand()) {
        args.prefer_command_line(run);
    }
    match cli.command {
        Command::Check { path } => match config::check(&path) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    eprintln!("{}: {}: warning: {}", path.display(), w.field, w.message);
                }
                let valid = format!(
                    "{}: valid ({} routes, sha256 {})\n",
                    path.display(),
                    loaded.policy.routes.len(),
                    loaded.sha256
                );
                print_or(&valid, ExitCode::FAILURE)
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(e.exit_code())
            }
        },
        Command::Schema => print_or(&config::schema(), ExitCode::FAILURE),
        Command::Token(args) => token(args),
        Command::Explain(args) => explain(args),
        Command::Run(args) => {
            init_tracing(args.log_format);
            let runtime = runtime();
            let code = runtime.block_on(run(args));
            runtime.shutdown_timeout(EXIT_WAIT);
            wsgate::logbuf::Batched::stderr().flush_within(LOG_EXIT_WAIT);
            code
        }
        Command::Demo { listen } => {
            init_tracing(None);
            let runtime = runtime();
            let code = runtime.block_on(run_demo(listen));
            runtime.shutdown_timeout(EXIT_WAIT);
            wsgate::logbuf::Batched::stderr().flush_within(LOG_EXIT_WAIT);
            code
        }
    }
}

/// Descriptors the gate needs beside its connections: listeners, the runtime, the
/// watcher, the admin listener's reserve, key files and the store.
const FILES_HEADROOM: usize = 64;

/// Warn, as nginx does about `worker_connections`, when the open-file limit cannot hold
/// `max_connections` proxied connections (two descriptors each, client and upstream):
/// clients past it wait in the accept queue instead of getting 503 `server_full`.
fn warn_if_files_short(max_connections: usize) {
    let Some(limit) = open_files_limit() else {
        return;
    };
    let needed = max_connections
        .saturating_mul(2)
        .saturating_add(FILES_HEADROOM);
    if needed > limit {
        tracing::warn!(
            max_connections,
            open_files_limit = limit,
            needed,
            "the open-file limit is below what max_connections needs (two descriptors per \
             connection and {FILES_HEADROOM} more): raise it (ulimit -n, LimitNOFILE) or \
             lower max_connections"
        );
    }
}

/// The process's soft limit on open files, from `/proc/self/limits` (Linux).
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// How long the exit waits for stderr to take the last log lines (a pipe nobody reads
/// must not hold the process once it has drained).
const LOG_EXIT_WAIT: Duration = Duration::from_secs(2);

/// How long the exit waits for the gate's own tasks (the admin listener, the reloader,
/// JWKS refreshers) to stop once the connections have drained.
const TASKS_EXIT: Duration = Duration::from_secs(1);

/// How long the exit waits, once the drain's deadline has passed, for the connections
/// still closing to give up and log their close.
const CUT_WAIT: Duration = Duration::from_millis(500);

/// How long the exit waits for blocking work still under way once the gate has drained.
/// Dropping the runtime would wait for it without a bound: a policy reload stuck opening a
/// file (a FIFO, a hung network mount) or a slow DNS lookup would hold the exit forever.
const EXIT_WAIT: Duration = Duration::from_millis(100);

/// One worker per CPU the process may use (affinity and cgroup quota, as std sees them);
/// on a single CPU, tokio's current-thread scheduler: no work-stealing bookkeeping and no
/// cross-thread wake-ups on the per-message path.
fn runtime() -> tokio::runtime::Runtime {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cpus);
        b
    };
    builder
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

fn init_tracing(format: Option<LogFormat>) {
    use tracing_subscriber::EnvFilter;
    let terminal = std::io::stderr().is_terminal();
    // rustls warns about what a client sent (an IP address as SNI, a handshake it
    // failed): anyone could fill the log with those; the gate logs failed handshakes at
    // debug itself.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(wsgate::logbuf::Timestamp)
        .with_writer(wsgate::logbuf::Batched::stderr());
    match format.unwrap_or(if terminal {
        LogFormat::Text
    } else {
        LogFormat::Json
    }) {
        LogFormat::Text => builder.with_ansi(terminal).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn explain(args: ExplainArgs) -> ExitCode {
    let loaded = match config::load(&args.policy) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let request = wsgate::explain::Request {
        url: args.url,
        headers: args.headers,
        peer: args.peer,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let explained = runtime.block_on(wsgate::explain::explain(&loaded.policy, &request));
    match explained {
        Ok(explanation) => {
            let text = if args.json {
                let mut json = serde_json::to_string_pretty(&explanation).unwrap_or_default();
                json.push('\n');
                json
            } else {
                wsgate::explain::to_text(&explanation)
            };
            if !write_stdout(&text) {
                return ExitCode::from(2);
            }
            if explanation.decision.admitted {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn token(args: TokenArgs) -> ExitCode {
    let Ok(secret) = std::env::var(&args.secret_env) else {
        eprintln!("environment variable {} is not set", args.secret_env);
        return ExitCode::from(2);
    };
    let spec = mint::TokenSpec {
        sub: &args.sub,
        ttl: args.ttl,
        audience: args.aud.as_deref(),
        issuer: args.iss.as_deref(),
        extra: &args.claims,
    };
    match mint::hs256(secret.as_bytes(), &spec) {
        Ok(token) => print_or(&format!("{token}\n"), ExitCode::FAILURE),
        Err(e @ mint::MintError::Sign(_)) => {
            eprintln!("cannot mint a token: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cannot mint a token: {e}");
            ExitCode::from(2)
        }
    }
}

impl RunArgs {
    /// TLS files and `--plaintext` chosen from different sources: the command line beats
    /// the environment, as it does for every other flag, so that
    /// `podman run -e WSGATE_TLS_CERT=… wsgate run --plaintext` (or an image whose `ENV`
    /// names its certificate) serves plaintext. Both from the same source stays a usage
    /// error (see `run`).
    fn prefer_command_line(&mut self, matches: &clap::ArgMatches) {
        let from_env = |id: &str| matches.value_source(id) == Some(ValueSource::EnvVariable);
        let from_cli = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        if !self.plaintext || self.tls_cert.is_none() {
            return;
        }
        if from_cli("plaintext") && from_env("tls_cert") && from_env("tls_key") {
            self.tls_cert = None;
            self.tls_key = None;
        } else if from_env("plaintext") && from_cli("tls_cert") {
            self.plaintext = false;
        }
    }
}

async fn run(args: RunArgs) -> ExitCode {
    // Checked here rather than with a clap group: WSGATE_PLAINTEXT=false must not count
    // as choosing plaintext.
    match (args.plaintext, args.tls_cert.is_some()) {
        (false, false) => {
            eprintln!("either --tls-cert and --tls-key, or --plaintext, is required");
            return ExitCode::from(2);
        }
        (true, true) => {
            eprintln!(
                "--plaintext and --tls-cert/--tls-key exclude each other (to serve plaintext \
                 where WSGATE_TLS_CERT and WSGATE_TLS_KEY are set, as in the container \
                 image, give them empty values)"
            );
            return ExitCode::from(2);
        }
        _ => {}
    }
    // The signals first: one that comes while the policy loads (key files on a slow mount)
    // must not kill the process with its default action. SIGTERM or SIGINT then ends the
    // start (exit 0, nothing served yet); a SIGHUP is ignored, as the start reads every
    // file anyway.
    let mut signals = shutdown::Signals::new();
    #[cfg(unix)]
    let _hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    // 1. The policy, before any port is bound.
    let policy_path = args.policy.clone();
    let loading = tokio::task::spawn_blocking(move || config::load_file(&policy_path));
    let loaded = tokio::select! {
        loaded = loading => loaded,
        () = signals.next() => {
            tracing::info!("signal while starting: exiting before serving");
            return ExitCode::SUCCESS;
        }
    };
    let loaded = match loaded {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(e)) => {
            let error = e.to_string().replace('\n', "; ");
            tracing::error!(%error, "invalid policy, not starting");
            eprintln!("{e}");
            return ExitCode::from(e.exit_code());
        }
        Err(e) => {
            tracing::error!("policy loader failed, not starting: {e}");
            eprintln!("policy loader failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    warn_if_files_short(loaded.policy.max_connections);
    // The operator API's token, read once now so that a bad file stops the start.
    if let Some(path) = &args.admin_token_file {
        if let Err(e) = wsgate::operator::AdminToken::check(path) {
            tracing::error!("unusable --admin-token-file, not starting: {e}");
            eprintln!("--admin-token-file: {e}");
            return ExitCode::from(2);
        }
    }
    // 2. TLS.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match tls::server_config(cert, key) {
            Ok((config, validity)) => {
                if let Some(validity) = validity {
                    validity.warn(cert);
                }
                Some((config, validity))
            }
            Err(e) => {
                // As an invalid policy: a JSON log pipeline sees the error too.
                tracing::error!("unusable TLS certificate or key, not starting: {e}");
                eprintln!("TLS: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => {
            tracing::warn!(
                "--plaintext: serving ws:// without TLS; TLS must be done in front of wsgate"
            );
            None
        }
    };
    // 3. Bind.
    let admin = match args.admin.as_str() {
        "off" => None,
        addr => match addr.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                eprintln!("--admin: {addr:?} is not an address or \"off\"");
                return ExitCode::from(2);
            }
        },
    };
    // Both listeners set SO_REUSEPORT (a replacement process can bind beside this one), so
    // the kernel would let them share an address and split its requests between them.
    if let Some(admin) = admin {
        let overlap = admin.ip() == args.listen.ip()
            || admin.ip().is_unspecified()
            || args.listen.ip().is_unspecified();
        if admin.port() != 0 && admin.port() == args.listen.port() && overlap {
            eprintln!(
                "--admin {admin} and --listen {} are the same address: give the admin listener a port of its own",
                args.listen
            );
            return ExitCode::from(2);
        }
    }
    let listener = match wsgate::listener::bind(args.listen) {
        Ok(l) => l,
        Err(e) => {
            // Every fatal start-up error is a log line too (JSON with `--log-format json`),
            // beside the plain one for a person reading the terminal.
            tracing::error!(addr = %args.listen, error = %e, "cannot listen, not starting");
            eprintln!("cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    // Port reuse on the admin listener too, so that a replacement started with the same
    // command line can bind while this process drains.
    let admin = match admin {
        Some(addr) => match wsgate::listener::bind(addr) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot listen on the admin address, not starting");
                eprintln!("cannot listen on {addr} (admin): {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // 4. Serve until SIGTERM/SIGINT, then drain.
    let options = Options {
        policy_path: args.policy,
        listener,
        admin,
        tls_validity: tls.as_ref().and_then(|(_, validity)| *validity),
        tls: tls.map(|(config, _)| config),
        sighup: true,
        tls_files: args.tls_cert.clone().zip(args.tls_key.clone()),
        jwks_roots: extra_roots(),
        admin_token_file: args.admin_token_file.clone(),
    };
    let running = match wsgate::start(loaded, options) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    signals.next().await;
    running.unready();
    let delay = Duration::from_secs(args.shutdown_delay_seconds);
    if !delay.is_zero() {
        tracing::info!(
            delay_s = delay.as_secs(),
            "shutting down: not ready, still serving until the delay ends"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = signals.next() => tracing::info!("second signal: the rest of the shutdown delay is skipped"),
        }
    }
    drain(
        &running,
        Duration::from_secs(args.drain_seconds),
        &mut signals,
    )
    .await
}

/// Stop accepting, serve what was accepted, then close every connection with 1001 and
/// wait for them, `grace` in all; another signal meanwhile ends the wait at once (as a
/// second Ctrl-C does for nginx and Envoy).
async fn drain(
    running: &wsgate::Running,
    grace: Duration,
    signals: &mut shutdown::Signals,
) -> ExitCode {
    // `--drain-seconds 18446744073709551615` waits as long as a clock can say, not panics.
    let deadline = tokio::time::Instant::now()
        .checked_add(grace)
        .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400));
    let open = running.gate.admission.connections.active();
    tracing::info!(
        open,
        grace_s = grace.as_secs(),
        "shutting down: draining connections"
    );
    running
        .stop_accepting(shutdown::FIRST_ANSWER_WAIT.min(grace))
        .await;
    running.begin_shutdown();
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    // WebSockets still relayed, closing ones included (an admitted connection leaves the
    // admission count as its close begins).
    let open = || running.gate.shutdown.relays_open();
    let drained = tokio::select! {
        drained = running.drain(left) => drained,
        () = signals.next() => {
            tracing::warn!(open = open(), "another signal: the drain is cut short; exiting");
            false
        }
    };
    if drained {
        tracing::info!("drained; exiting");
    } else {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(open = open(), "drain deadline reached; exiting");
        }
        running.cut(CUT_WAIT).await;
    }
    if !running.exit(TASKS_EXIT).await {
        tracing::warn!(
            running = running.gate.shutdown.tasks.running(),
            "the gate's own tasks did not all stop"
        );
    }
    ExitCode::SUCCESS
}

/// Write `text` to stdout; whether it could be. Not `print!`, which panics when stdout is
/// closed early (`wsgate token | head -c 10`, `> /dev/full`): the error is said on stderr.
fn write_stdout(text: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("cannot write to stdout: {e}");
            false
        }
    }
}

/// Success once `text` is on stdout; `failed` if it could not be written.
fn print_or(text: &str, failed: ExitCode) -> ExitCode {
    if write_stdout(text) {
        ExitCode::SUCCESS
    } else {
        failed
    }
}

async fn run_demo(listen: SocketAddr) -> ExitCode {
    let demo = match demo::start(listen).await {
        Ok(demo) => demo,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // The demo serves on whether or not its banner could be shown.
    write_stdout(&format!("{}\n", demo.banner));
    let mut signals = shutdown::Signals::new();
    signals.next().await;
    let code = drain(&demo.running, Duration::from_secs(5), &mut signals).await;
    demo.remove_files();
    code
}

/// CA certificates in `SSL_CERT_FILE`, trusted for `jwks_url` fetches besides the
/// Mozilla roots (for an issuer behind a private CA).
fn extra_roots() -> Vec<rustls_pki_types::CertificateDer<'static>> {
    let Some(path) = std::env::var_os("SSL_CERT_FILE") else {
        return Vec::new();
    };
    match tls::read_certs(std::path::Path::new(&path)) {
        Ok(certs) => certs,
        Err(e) => {
            tracing::warn!(error = %e, "SSL_CERT_FILE not used");
            Vec::new()
        }
    }
}
