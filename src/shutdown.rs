//! Graceful shutdown, in three steps: readiness turns 503 ([`Shutdown::unready`]), the
//! listener closes ([`Shutdown::stop_accepting`]), and one cancellation token fans the
//! drain out to every relay ([`Shutdown::begin`]). Task trackers know when the listener
//! and the connections it accepted last have had their first answer, and when the last
//! connection has finished closing.
//!
//! hyper's own graceful shutdown does not see upgraded connections, hence the tracker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

/// When the listener closes, how long connections it already accepted get for their first
/// request to be answered before the drain begins.
pub const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(1);

/// When the listener closes, how long a connection it accepted that has not yet sent its
/// request (a TLS handshake or a request head still under way; an HTTP/2 connection with
/// no stream yet) gets before it is dropped rather than waited for: enough for one taken
/// from the accept queue as the listener closed, whose client is sending it.
pub const SILENT_GRACE: Duration = Duration::from_millis(200);

/// The gate's own tasks — the listener, the admin listener and its connections, the
/// reloader, the upkeep loop, the JWKS refreshers — on one tracker, so that at exit they
/// are told to stop and waited for, and none outlives the gate.
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    exit: CancellationToken,
}

impl Tasks {
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Cancelled when the gate exits: a task with no other end stops on it.
    pub fn exit(&self) -> CancellationToken {
        self.exit.clone()
    }

    /// Tell every task to stop and wait for them, at most `within`. Whether all ended.
    pub async fn end(&self, within: Duration) -> bool {
        self.exit.cancel();
        self.tracker.close();
        tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_ok()
    }

    /// How many are still running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }
}

/// The gate's shutdown as a relay sees it.
#[derive(Clone)]
pub struct Stop {
    /// The drain has begun: close both sides with 1001 "going away".
    pub drain: CancellationToken,
    /// The drain's deadline has passed: a close handshake still under way is given up
    /// (the close is still logged, before the process exits).
    pub cut: CancellationToken,
}

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
    /// The relays among `tracker`'s tasks (a connection's other tasks, such as an HTTP/2
    /// connection's own and its streams', are not WebSockets).
    relays: TaskTracker,
    draining: Arc<AtomicBool>,
    unready: Arc<AtomicBool>,
    accepting: CancellationToken,
    /// The listener, and each connection until its first request is answered.
    opening: TaskTracker,
    /// The gate's own tasks.
    pub tasks: Tasks,
    /// The drain's deadline has passed (see [`Shutdown::cut`]).
    cut: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Readiness turns 503; everything else goes on (the shutdown delay).
    pub fn unready(&self) {
        self.unready.store(true, Ordering::Release);
    }

    /// Whether `/readyz` answers 200: not once shutdown has begun.
    pub fn is_ready(&self) -> bool {
        !self.unready.load(Ordering::Acquire)
    }

    /// The listener accepts what is already queued, then closes. Connections go on.
    pub fn stop_accepting(&self) {
        self.unready();
        self.opening.close();
        self.accepting.cancel();
    }

    /// Cancelled once the listener is to close.
    pub fn accepting(&self) -> CancellationToken {
        self.accepting.clone()
    }

    /// Held by the listener until it has closed, and by each connection until its first
    /// request has been answered (or it ended).
    pub fn opening(&self) -> TaskTrackerToken {
        self.opening.token()
    }

    /// Resolves once the listener has closed and every connection it accepted has had its
    /// first request answered: what the listener accepted is served before the drain.
    pub async fn opened(&self) {
        self.accepting.cancelled().await;
        self.opening.wait().await;
    }

    /// Start draining: readiness turns 503, the listener stops, relays send 1001.
    pub fn begin(&self) {
        self.draining.store(true, Ordering::Release);
        self.stop_accepting();
        self.tracker.close();
        self.token.cancel();
    }

    /// Whether the listener has been told to stop (the end of `--shutdown-delay-seconds`).
    pub fn stopped_accepting(&self) -> bool {
        self.accepting.is_cancelled()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The drain's deadline has passed: relays still closing give up waiting for their
    /// peers and log their close, so that no connection ends unlogged when the process
    /// exits.
    pub fn cut(&self) {
        self.cut.cancel();
    }

    /// Whether the drain's deadline has passed (or a second signal cut it short).
    pub fn is_cut(&self) -> bool {
        self.cut.is_cancelled()
    }

    /// What a relay watches: the drain, and its deadline.
    pub fn relay_stop(&self) -> Stop {
        Stop {
            drain: self.token.clone(),
            cut: self.cut.clone(),
        }
    }

    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Run a WebSocket's relay as a task the drain waits for, counted in
    /// [`Shutdown::relays_open`].
    pub fn spawn_relay<F>(&self, relay: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(self.relays.track_future(relay));
    }

    /// WebSockets still relayed, closing and lingering ones included.
    pub fn relays_open(&self) -> usize {
        self.relays.len()
    }

    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Resolves once `begin` was called, the listener has closed and every tracked task
    /// has finished.
    pub async fn finished(&self) {
        self.token.cancelled().await;
        self.opening.wait().await;
        self.tracker.wait().await;
    }
}

/// SIGTERM and SIGINT, registered once: a second signal is seen however soon it follows
/// the first.
pub struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Registers the handlers (call inside the runtime).
    pub fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(term), Ok(int)) => Some((term, int)),
                _ => None,
            };
            Signals { streams }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Resolves on the next SIGTERM or SIGINT.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.streams {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

impl Default for Signals {
    fn default() -> Signals {
        Signals::new()
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    Signals::new().next().await;
}
