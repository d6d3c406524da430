//! # wsgate — a TLS-terminating WebSocket policy sidecar
//!
//! It decides every upgrade before the backend sees a socket (token, Origin, client IP,
//! caps, route), then relays frames while enforcing sizes and deadlines, and takes live
//! policy edits without dropping a connection.
//!
//! # Layout
//!
//! Data flows top to bottom:
//!
//! - [`listener`]: accept loop → TLS ([`tls`]) or plaintext → the first head read and
//!   checked ([`head`]) → hyper HTTP/1.1 with upgrades
//! - [`http`]: one request: route, the handshake's checks ([`handshake`]), then admission and
//!   the upstream
//! - [`path`]: the request path's normal form, which is routed and sent upstream
//! - [`admission`]: the checks before the 101, in the order of docs/admission.md; [`admission::Rejection`]
//! - [`upstream`]: dial, forwarded headers, the upstream's WebSocket handshake
//! - [`relay`]: the gate's own frame engine (frames checked and forwarded as they arrive),
//!   the per-connection `select!` loop and [`relay::CloseReason`]; every socket the gate
//!   closes ends with [`linger`]'s lingering close
//! - [`proxy`]: plain HTTP on `http: pass` routes
//!
//! Policy flows [`config`] (YAML → validated [`policy::Policy`]) → [`policy::PolicyHandle`]
//! ← [`reload`]. The stop signal fans out from [`shutdown`]. [`admin`] serves health and
//! readiness, and the [`operator`] API over the [`registry`] of open connections and the
//! [`revocations`] that admission consults; [`cluster`] shares the per-IP and per-subject
//! limits and the revocations with the other gates of a fleet through Redis; [`mint`] and [`demo`] serve the CLI's `token`
//! and `demo` commands.

#![forbid(unsafe_code)]

// Public: what the binary (main.rs) and the integration tests use. The rest is the
// crate's own.
mod admin;
pub mod admission;
mod body;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod explain;
mod extensions;
mod handshake;
mod head;
mod http;
mod http2;
mod keepalive;
mod linger;
pub mod listener;
pub mod logbuf;
mod metrics;
pub mod mint;
pub mod operator;
pub mod path;
pub mod policy;
mod proxy;
pub mod registry;
pub mod relay;
mod reload;
pub mod revocations;
pub mod shutdown;
pub mod tls;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::policy::{Loaded, PolicyHandle};
use crate::shutdown::Shutdown;

/// State shared by every connection of one running gate.
pub struct Gate {
    pub policy: PolicyHandle,
    pub shutdown: Shutdown,
    pub admission: admission::State,
    /// `None` with `--plaintext`.
    pub(crate) tls: Option<tls::Acceptor>,
    pub(crate) metrics: Arc<metrics::Metrics>,
    /// The pooled upstream clients of `http: pass` routes.
    pub(crate) pass_clients: proxy::PassClients,
    /// The operator API: its token, the open connections, the revocations.
    pub operator: operator::Operator,
}

impl Gate {
    /// Readiness turns 503, the listener stops, and every relay is told to close with
    /// 1001 "going away" (a relay that starts later sees the drain begun).
    fn begin_drain(&self) {
        self.shutdown.begin();
        self.operator.registry.raise_all(registry::Signal::Drain);
    }
}

/// How to run a gate: already bound sockets, so nothing here can fail on a port.
pub struct Options {
    pub policy_path: PathBuf,
    pub listener: TcpListener,
    pub admin: Option<TcpListener>,
    pub tls: Option<rustls::ServerConfig>,
    /// The validity of `tls`'s certificate, exposed as
    /// `wsgate_tls_certificate_expiry_timestamp_seconds` when known.
    pub tls_validity: Option<tls::Validity>,
    /// Reload on SIGHUP (the binary; tests reload by writing the file).
    pub sighup: bool,
    /// The certificate and key files behind `tls`, watched for rotation (`None`: the
    /// certificate never changes, as in the demo).
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// Extra CA certificates trusted for `jwks_url` fetches (besides the Mozilla roots).
    pub jwks_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// The operator API's bearer token file (`--admin-token-file`); `None`: the operator
    /// endpoints answer 403.
    pub admin_token_file: Option<PathBuf>,
}

/// A started gate.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub gate: Arc<Gate>,
}

/// Start serving `loaded` on the sockets in `options`. Call inside a tokio runtime.
pub fn start(loaded: Loaded, options: Options) -> std::io::Result<Running> {
    let addr = options.listener.local_addr()?;
    let admin_addr = options.admin.as_ref().map(|l| l.local_addr()).transpose()?;
    http::warm_up();
    let token = options
        .admin_token_file
        .map(operator::AdminToken::load)
        .transpose()
        .map_err(std::io::Error::other)?;
    let mut metrics = metrics::Metrics::new();
    if let Some(validity) = options.tls_validity {
        metrics.expose_certificate_expiry(validity.not_after);
    }
    let metrics = Arc::new(metrics);
    let mut admission = admission::State::new(options.jwks_roots, metrics.clone());
    let registry: Arc<registry::Registry> = Arc::default();
    let cluster = Arc::new(cluster::Cluster::new(
        metrics.clone(),
        admission.revocations.clone(),
        registry.clone(),
    ));
    admission.cluster = Some(cluster.clone());
    let operator = operator::Operator {
        token,
        registry,
        revocations: admission.revocations.clone(),
        cluster: cluster.clone(),
    };
    let gate = Arc::new(Gate {
        policy: PolicyHandle::new(loaded),
        shutdown: Shutdown::new(),
        admission,
        tls: options.tls.map(tls::Acceptor::new),
        metrics,
        pass_clients: proxy::PassClients::default(),
        operator,
    });
    gate.admission
        .jwks
        .sync(&gate.policy.load().policy, &gate.shutdown.tasks);
    let tasks = &gate.shutdown.tasks;
    cluster.sync(
        gate.policy.load().policy.cluster.as_ref(),
        tasks,
        &tasks.exit(),
    );
    tasks.spawn(maintain(Arc::downgrade(&gate)));
    tasks.spawn(listener::serve(options.listener, gate.clone()));
    if let Some(admin) = options.admin {
        tasks.spawn(admin::serve(admin, gate.clone()));
    }
    let certificate = gate
        .tls
        .clone()
        .zip(options.tls_files)
        .map(|(acceptor, (cert, key))| reload::Certificate {
            in_use: std::sync::Mutex::new(reload::pair_digest(&cert, &key)),
            cert,
            key,
            acceptor,
        });
    reload::spawn(
        reload::Reloader {
            path: options.policy_path,
            policy: gate.policy.clone(),
            certificate,
            metrics: gate.metrics.clone(),
            registry: gate.operator.registry.clone(),
        },
        options.sighup,
        &gate.shutdown,
    );
    match admin_addr {
        Some(admin) => tracing::info!(%addr, tls = gate.tls.is_some(), %admin, "listening"),
        None => tracing::info!(%addr, tls = gate.tls.is_some(), admin = "off", "listening"),
    }
    Ok(Running {
        addr,
        admin_addr,
        gate,
    })
}

/// How often idle rate-limiter entries are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Keep admission state in step with the policy: start and stop JWKS fetchers on reload,
/// and sweep idle limiter keys and expired revocations. Ends with the gate.
async fn maintain(gate: std::sync::Weak<Gate>) {
    let (mut changes, stop) = match gate.upgrade() {
        Some(g) => (g.policy.subscribe(), g.shutdown.token()),
        None => return,
    };
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    loop {
        let changed = tokio::select! {
            changed = changes.changed() => changed.is_ok(),
            _ = sweep.tick() => false,
            () = stop.cancelled() => return,
        };
        let Some(gate) = gate.upgrade() else { return };
        let loaded = gate.policy.load();
        if changed {
            gate.admission.verified.clear();
            gate.admission
                .jwks
                .sync(&loaded.policy, &gate.shutdown.tasks);
            if let Some(cluster) = &gate.admission.cluster {
                let tasks = &gate.shutdown.tasks;
                cluster.sync(loaded.policy.cluster.as_ref(), tasks, &tasks.exit());
            }
        }
        gate.admission.limiters.sweep(&loaded.policy.routes);
        gate.admission.revocations.evict();
    }
}

impl Running {
    /// Readiness turns 503; the gate goes on accepting and serving (the shutdown delay).
    pub fn unready(&self) {
        self.gate.shutdown.unready();
    }

    /// The listener takes what is already queued and closes; then this waits, at most
    /// `within`, until every connection it accepted has had its first request answered,
    /// so that a connection accepted before the close is served rather than refused.
    /// Returns whether all were.
    pub async fn stop_accepting(&self, within: Duration) -> bool {
        self.gate.shutdown.stop_accepting();
        tokio::time::timeout(within, self.gate.shutdown.opened())
            .await
            .is_ok()
    }

    /// Readiness turns 503, the listener stops, every relay sends 1001 "going away".
    pub fn begin_shutdown(&self) {
        self.gate.begin_drain();
    }

    /// Wait for every connection to finish closing, at most `grace`. Returns whether all did.
    pub async fn drain(&self, grace: Duration) -> bool {
        tokio::time::timeout(grace, self.gate.shutdown.finished())
            .await
            .is_ok()
    }

    /// The drain's deadline has passed: connections still closing stop waiting for their
    /// peers and log their close; waits for them at most `within`.
    pub async fn cut(&self, within: Duration) {
        self.gate.shutdown.cut();
        let _ = tokio::time::timeout(within, self.gate.shutdown.finished()).await;
    }

    /// The last step, after the drain: stop the gate's own tasks (the admin listener
    /// included) and wait for them, at most `within`. Returns whether all ended.
    pub async fn exit(&self, within: Duration) -> bool {
        self.gate.begin_drain();
        self.gate.shutdown.tasks.end(within).await
    }
}
