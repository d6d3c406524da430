//! wsload: the load generator (and echo upstream) of wsgate's benchmark harness.
//!
//! `serve` is the echo upstream every target fronts; `echo`, `connect`, `hold` and `big` are
//! the four loads of `benches/run.py` (`serve`, `echo` and `hold` with `--deflate` its
//! compressed rows; `echo` and `connect` with `--h2` its HTTP/2 rows); `sessions`,
//! `attack`, `storm`, `exhaust` and `soak` are the healthy traffic and the hostile clients
//! of `benches/soak.py`. Each load prints one
//! JSON object on stdout (progress, if any, goes to stderr). It runs on a current-thread
//! runtime: the harness pins it to one CPU.
#![forbid(unsafe_code)]

mod basic;
mod deflate;
mod dial;
mod h2;
mod hostile;
mod measure;
mod soak;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use basic::{autobahn, big, connect, echo, hold, serve};
use h2::H2End;
use hostile::{attack, exhaust, sessions, storm, AttackPlan};
use soak::{soak, SoakPlan};

#[derive(Parser)]
#[command(about = "WebSocket load generator and echo upstream for wsgate's benchmarks")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Mint N tokens (one per line, subjects `bench-0` …) for `--tokens`: HS256 with the
    /// secret in $BENCH_SECRET, or ES256/RS256 with a PEM private key.
    Tokens {
        #[arg(long, default_value = "HS256")]
        alg: String,
        /// The private key (PEM) for ES256 and RS256.
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(short = 'n', long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 7200)]
        ttl: u64,
        /// Where to write them.
        #[arg(long)]
        out: PathBuf,
    },
    /// Echo upstream: sends every text and binary message back; prints its address.
    Serve {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Accept permessage-deflate (answering any offer it can honour with no context
        /// takeover either way) and send every frame back as it came, RSV1 and payload
        /// unchanged, from a raw-frame loop instead of tungstenite (which refuses RSV1).
        #[arg(long)]
        deflate: bool,
    },
    /// C connections in a closed loop, one message of S bytes in flight each.
    Echo {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'c', long, default_value_t = 50)]
        connections: usize,
        #[arg(short = 's', long, default_value_t = 64)]
        size: usize,
        /// Measured seconds, after the warm-up.
        #[arg(short = 'd', long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Offer permessage-deflate (no context takeover) and send S-byte JSON-like text
        /// messages compressed; fails unless every 101 accepts the extension. Reports
        /// wire_mb_per_s (compressed) beside mb_per_s (message bytes).
        #[arg(long)]
        deflate: bool,
        /// With --deflate, how many different messages are sent in turn (compressed
        /// before the load). 8 by default; more than a proxy could remember makes every
        /// message one it has not seen.
        #[arg(long, value_name = "N", default_value_t = deflate::DISTINCT)]
        distinct: usize,
        /// Open the C WebSockets as RFC 8441 streams over N HTTP/2 connections (stream i
        /// on connection i mod N): h2c with prior knowledge for ws://, ALPN h2 for wss://.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        h2: Option<u16>,
        /// With --h2: when a client ends its half of the stream as it closes.
        #[arg(long, value_enum, default_value_t = H2End::Early)]
        h2_end: H2End,
        /// A process whose CPU over the measured window is reported (the proxy).
        #[arg(long)]
        pid: Option<u32>,
    },
    /// C workers each looping connect, [TLS], upgrade, one echo, close; with --h2 N,
    /// extended CONNECT on a new stream of one of N HTTP/2 connections opened beforehand,
    /// one echo, close.
    Connect {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'c', long, default_value_t = 16)]
        connections: usize,
        #[arg(short = 'd', long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Upgrade over N HTTP/2 connections (worker w's on connection w mod N), opened
        /// before the load: the rate of WebSocket streams, without TCP (or TLS) setup.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        h2: Option<u16>,
        /// With --h2: when a client ends its half of the stream as it closes.
        #[arg(long, value_enum, default_value_t = H2End::Early)]
        h2_end: H2End,
        /// A process whose CPU over the measured window is reported (the proxy).
        #[arg(long)]
        pid: Option<u32>,
    },
    /// N idle connections (answering pings) held for a while; RSS and CPU of --pid.
    Hold {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'n', long, default_value_t = 9000)]
        connections: usize,
        /// How long the connections are held once all are open.
        #[arg(short = 'd', long, default_value_t = 30.0)]
        seconds: f64,
        /// The process whose RSS and CPU are measured (the proxy).
        #[arg(long)]
        pid: Option<u32>,
        /// Negotiate permessage-deflate and echo one compressed JSON-like message of
        /// --size bytes on each connection before it idles.
        #[arg(long)]
        deflate: bool,
        /// With --deflate, the size of that message.
        #[arg(short = 's', long, default_value_t = 16384)]
        size: usize,
    },
    /// One connection sends N messages of S bytes, one at a time, reading each echo; each
    /// round trip is timed, and the RSS of --pid sampled while it is under way.
    Big {
        #[command(flatten)]
        target: Target,
        #[arg(short = 's', long, default_value_t = 16 << 20)]
        size: usize,
        #[arg(short = 'n', long, default_value_t = 3)]
        messages: usize,
        /// The process whose RSS is sampled (the proxy).
        #[arg(long)]
        pid: Option<u32>,
    },
    /// N healthy sessions, each sending one S-byte message every --interval-ms and timing
    /// its echo; latency is reported separately for the "alone" window and for the
    /// "attack" window that follows it (after --ramp seconds that are not measured).
    /// Prints "wsload: attack phase begins" on stderr when the alone window ends.
    Sessions {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'n', long, default_value_t = 1000)]
        connections: usize,
        #[arg(short = 's', long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 20.0)]
        alone: f64,
        #[arg(long, default_value_t = 5.0)]
        ramp: f64,
        #[arg(long, default_value_t = 20.0)]
        attack: f64,
    },
    /// Hostile clients for --seconds, each reconnecting when the gate cuts it: slowloris
    /// sockets trickling a request head that never ends, upgraded connections that declare
    /// a frame of --frame-bytes and never send its payload, and ping floods.
    Attack {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 2000)]
        slowloris: usize,
        /// One more byte of the request head every this many milliseconds.
        #[arg(long, default_value_t = 500)]
        trickle_ms: u64,
        #[arg(long, default_value_t = 200)]
        stalled: usize,
        /// The length the stalled connections' frame header declares.
        #[arg(long, default_value_t = 65535)]
        frame_bytes: u64,
        #[arg(long, default_value_t = 10)]
        ping_flood: usize,
        /// The first connections are spread over this many seconds.
        #[arg(long, default_value_t = 1.0)]
        ramp: f64,
        #[arg(short = 'd', long, default_value_t = 20.0)]
        seconds: f64,
    },
    /// N upgrade attempts spread evenly over --seconds, each timed from connect to the
    /// response head; accepted ones are held until the storm is over (+ --hold).
    Storm {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'n', long, default_value_t = 5000)]
        attempts: usize,
        #[arg(short = 'd', long, default_value_t = 1.0)]
        seconds: f64,
        /// Send "X-Forwarded-For: A+i" on attempt i (distinct addresses from A on).
        #[arg(long)]
        xff_from: Option<Ipv4Addr>,
        #[arg(long, default_value_t = 0.5)]
        hold: f64,
        /// Each attempt gets this long for connect and response head.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// Opens N upgrades at once (more than the target can hold), holds the ones that
    /// succeed for --seconds, closes everything, then probes until an upgrade succeeds
    /// again and reports how long that took.
    Exhaust {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'n', long, default_value_t = 400)]
        connections: usize,
        #[arg(long, default_value_t = 3.0)]
        timeout: f64,
        #[arg(short = 'd', long, default_value_t = 3.0)]
        seconds: f64,
        /// Give up probing after this many seconds.
        #[arg(long, default_value_t = 30.0)]
        recover_within: f64,
    },
    /// The soak: N sessions sending mixed-size messages every --interval seconds, R new
    /// short connections per second, and a --malformed fraction of messages and new
    /// connections replaced by bad frames (the session then reconnects) or bad upgrades.
    Soak {
        #[command(flatten)]
        target: Target,
        #[arg(short = 'n', long, default_value_t = 2000)]
        sessions: usize,
        #[arg(long, default_value_t = 50.0)]
        new_per_second: f64,
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[arg(long, default_value_t = 0.01)]
        malformed: f64,
        /// The target's max_frame_bytes: the "oversize" bad frame declares one more.
        #[arg(long, default_value_t = 65536)]
        max_frame: u64,
        #[arg(short = 'd', long, default_value_t = 1800.0)]
        seconds: f64,
    },
    /// The Autobahn testee client: runs every case of a `wstest -m fuzzingserver` at
    /// --url (its base, reached directly or through a gate), echoing each message.
    Autobahn {
        #[command(flatten)]
        target: Target,
        /// The agent name the report files the results under.
        #[arg(long, default_value = "wsload")]
        agent: String,
    },
}

#[derive(Args, Clone)]
struct Target {
    /// ws:// or wss:// URL.
    #[arg(long)]
    url: String,
    /// CA certificate (PEM) that signs a wss:// server's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Extra request header, "Name: value" (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Spread connections over 127.0.0.1 ..= 127.0.0.N as source addresses.
    #[arg(long, default_value_t = 200)]
    sources: u8,
    /// A file of tokens, one per line: connection i sends `Authorization: Bearer` with
    /// line i mod N (a pool of clients, each with its own token).
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Let TLS clients resume sessions (tickets); by default every handshake is full.
    #[arg(long)]
    resume: bool,
    /// Do not verify the server's certificate or handshake signature: the load generator
    /// then spends its CPU on the key exchange only, so the server is what is measured.
    #[arg(long)]
    no_verify: bool,
}

/// Write `count` tokens to `out_path`, one per line, and report how many.
fn tokens(
    alg: &str,
    key: Option<&std::path::Path>,
    count: usize,
    ttl: u64,
    out_path: &std::path::Path,
) -> Result<serde_json::Value, String> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let alg: Algorithm = alg.parse().map_err(|e| format!("--alg {alg}: {e}"))?;
    let pem = || {
        let path = key.ok_or("--key is required for ES256 and RS256")?;
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
    };
    let encoding = match alg {
        Algorithm::HS256 => {
            let secret = std::env::var("BENCH_SECRET").map_err(|_| "BENCH_SECRET is not set")?;
            EncodingKey::from_secret(secret.as_bytes())
        }
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem()?).map_err(|e| e.to_string())?,
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem()?).map_err(|e| e.to_string())?,
        other => return Err(format!("--alg {other:?}: HS256, ES256 or RS256")),
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs()
        + ttl;
    let mut out = String::new();
    for i in 0..count {
        let claims = serde_json::json!({"sub": format!("bench-{i}"), "exp": exp});
        let token = jsonwebtoken::encode(&Header::new(alg), &claims, &encoding)
            .map_err(|e| e.to_string())?;
        out.push_str(&token);
        out.push('\n');
    }
    std::fs::write(out_path, out).map_err(|e| format!("{}: {e}", out_path.display()))?;
    Ok(serde_json::json!({"tokens": count}))
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(format!("runtime: {e}")),
    };
    let report = rt.block_on(async {
        match cli.mode {
            Mode::Tokens {
                alg,
                key,
                count,
                ttl,
                out,
            } => tokens(&alg, key.as_deref(), count, ttl, &out),
            Mode::Serve { listen, deflate } => serve(listen, deflate).await,
            Mode::Echo {
                target,
                connections,
                size,
                seconds,
                warmup,
                deflate,
                distinct,
                h2,
                h2_end,
                pid,
            } => {
                let (seconds, warmup) = (secs(seconds), secs(warmup));
                let h2 = h2.map(|n| (usize::from(n), h2_end));
                match (deflate, h2) {
                    (true, Some(_)) => Err("--deflate is HTTP/1.1 only (no --h2)".into()),
                    (true, None) => {
                        deflate::echo(target, connections, size, seconds, warmup, distinct).await
                    }
                    (false, _) => echo(target, connections, size, seconds, warmup, h2, pid).await,
                }
            }
            Mode::Connect {
                target,
                connections,
                seconds,
                warmup,
                h2,
                h2_end,
                pid,
            } => {
                let h2 = h2.map(|n| (usize::from(n), h2_end));
                connect(target, connections, secs(seconds), secs(warmup), h2, pid).await
            }
            Mode::Hold {
                target,
                connections,
                seconds,
                pid,
                deflate,
                size,
            } => {
                hold(
                    target,
                    connections,
                    secs(seconds),
                    pid,
                    deflate.then_some(size),
                )
                .await
            }
            Mode::Big {
                target,
                size,
                messages,
                pid,
            } => big(target, size, messages, pid).await,
            Mode::Autobahn { target, agent } => autobahn(target, &agent).await,
            Mode::Sessions {
                target,
                connections,
                size,
                interval_ms,
                alone,
                ramp,
                attack,
            } => {
                let phases = [secs(alone), secs(ramp), secs(attack)];
                let interval = Duration::from_millis(interval_ms.max(1));
                sessions(target, connections, size, interval, phases).await
            }
            Mode::Attack {
                target,
                slowloris,
                trickle_ms,
                stalled,
                frame_bytes,
                ping_flood,
                ramp,
                seconds,
            } => {
                let plan = AttackPlan {
                    slowloris,
                    trickle: Duration::from_millis(trickle_ms.max(1)),
                    stalled,
                    frame_bytes,
                    ping_flood,
                    ramp: secs(ramp),
                    seconds: secs(seconds),
                };
                attack(target, plan).await
            }
            Mode::Storm {
                target,
                attempts,
                seconds,
                xff_from,
                hold,
                timeout,
            } => {
                storm(
                    target,
                    attempts,
                    secs(seconds),
                    xff_from,
                    secs(hold),
                    secs(timeout),
                )
                .await
            }
            Mode::Exhaust {
                target,
                connections,
                timeout,
                seconds,
                recover_within,
            } => {
                let limits = [secs(timeout), secs(seconds), secs(recover_within)];
                exhaust(target, connections, limits).await
            }
            Mode::Soak {
                target,
                sessions,
                new_per_second,
                interval,
                malformed,
                max_frame,
                seconds,
            } => {
                let plan = SoakPlan {
                    sessions,
                    new_per_second,
                    interval: secs(interval).max(Duration::from_millis(1)),
                    malformed: malformed.clamp(0.0, 1.0),
                    max_frame,
                    seconds: secs(seconds),
                };
                soak(target, plan).await
            }
        }
    });
    match report {
        Ok(value) => println!("{value}"),
        Err(e) => fail(e),
    }
}

fn fail(message: String) -> ! {
    eprintln!("wsload: {message}");
    std::process::exit(1)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}
