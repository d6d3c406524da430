//! The cluster store (`cluster:` in the policy): the per-IP upgrade rate and the per-IP and
//! per-subject connection caps counted across every gate that shares one Redis and key
//! prefix, and revocations fanned out to every gate ([`fanout`]).
//!
//! - The upgrade rate and the per-IP lease are one Lua script call ([`scripts::ADMIT`]);
//!   the per-subject lease, after the token verifies, is another ([`scripts::LEASE`]).
//! - A lease is a member `gate-id:lease-id` of a sorted set per key, scored by its expiry.
//!   [`Lease`] is an RAII slot: dropping it queues its release (bounded queue), and
//!   [`Lease::release`] waits, at most a round trip's bound, until it is sent (a
//!   connection's end does, before its close handshakes). The upkeep task renews every
//!   lease this gate holds every `lease_seconds / 3` in one pipelined batch, which also
//!   re-registers them after the store lost them; a killed gate's leases expire.
//! - A release the store did not take (it was down, or the call failed) is kept, bounded,
//!   and sent with the next renewal, or as soon as the store answers again; so is the
//!   release of a lease an upgrade's call may have taken before it timed out. Its slot is
//!   then free again when the store comes back, not `lease_seconds` later.
//! - Every call on the upgrade path is bounded by `timeout_ms`; the background ones
//!   (renewal, release, revocations) by `timeout_ms` or one second, the longer.
//! - Health: every failure sets `wsgate_cluster_up` to 0 and that call falls back;
//!   [`DOWN_AFTER`] in a row mark the store down (logged once); while it is down upgrades
//!   do not wait for it (`on_failure` decides at once) and the upkeep task probes it every
//!   [`PROBE_EVERY`]; the first success marks it up again (logged once), renews the
//!   leases and reloads the revocations.

mod fanout;
pub mod scripts;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, OpLabel};
use crate::policy::{Cluster as Config, OnFailure};
use crate::registry::Registry;
use crate::revocations::Revocations;

/// While the store is down, how often the upkeep task asks it whether it is back.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// The shortest bound of a background call (renewal, release, revocations).
const BACKGROUND_BOUND: Duration = Duration::from_secs(1);
/// How long a store connection may be silent before the kernel probes it, and how long
/// data written to it may go unacknowledged before the kernel ends it.
const DEAD_SOCKET: Duration = Duration::from_secs(10);
/// Releases waiting to be sent; beyond this a release is dropped and its lease expires.
const RELEASE_QUEUE: usize = 65_536;
/// Releases sent in one pipeline.
const RELEASE_BATCH: usize = 1_000;
/// Releases kept while the store does not take them, to be sent once it answers; beyond
/// this a release is dropped and its lease expires.
const UNSENT: usize = 65_536;
/// How long the first release of a batch waits for others: under load, one round trip
/// then carries many releases instead of one each (a connection's close frames wait this
/// much longer).
const RELEASE_LINGER: Duration = Duration::from_millis(5);
/// Leases renewed by one script call (a renewal is one pipeline of such calls).
const REFRESH_CHUNK: usize = 1_000;

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the cluster store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the cluster store failed")]
    Redis(#[from] redis::RedisError),
    #[error("the cluster store's URL variable is not set")]
    NoUrl,
    #[error("the cluster store is down (probing it every {PROBE_EVERY:?})")]
    Down,
    #[error("the cluster store's subscription ended")]
    SubscriptionEnded,
}

/// The store of the policy in force, rebuilt when the policy's `cluster` changes.
struct Store {
    config: Config,
    /// `None` when the URL variable is unset.
    client: Option<redis::Client>,
    conn: Option<ConnectionManager>,
    /// Ends this store's subscriber when the store is replaced.
    stop: CancellationToken,
    /// Its revocations have been loaded once (by this gate's subscriber), and the wake-up
    /// of the upgrades waiting for that.
    revocations_loaded: AtomicBool,
    loaded: Notify,
}

impl Store {
    fn keys(&self) -> Keys<'_> {
        Keys(&self.config.key_prefix)
    }

    /// Background calls: a renewal of thousands of leases may take longer than one
    /// upgrade's round trip.
    fn background_bound(&self) -> Duration {
        self.config.timeout.max(BACKGROUND_BOUND)
    }
}

/// The key names, all under the prefix: `<prefix><kind>:<route>:<client or subject>`,
/// the route name with its `%` and `:` escaped, so that the key names one route and one
/// client (route `a` with subject `b:c` is not route `a:b` with subject `c`).
struct Keys<'a>(&'a str);

impl Keys<'_> {
    fn rate(&self, route: &str, client: &str) -> String {
        format!("{}rate:{}:{client}", self.0, key_part(route))
    }
    fn ip(&self, route: &str, client: &str) -> String {
        format!("{}ip:{}:{client}", self.0, key_part(route))
    }
    fn subject(&self, route: &str, subject: &str) -> String {
        format!("{}sub:{}:{subject}", self.0, key_part(route))
    }
}

/// A route name as a key part: `%` and `:` percent-encoded (most names have neither, and
/// are kept as they are).
fn key_part(route: &str) -> std::borrow::Cow<'_, str> {
    if !route.contains([':', '%']) {
        return route.into();
    }
    route.replace('%', "%25").replace(':', "%3A").into()
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// Consecutive failures that mark the store down. One slow answer in a burst (an
/// upgrade's call that missed `timeout_ms`) falls back alone; a store that is really gone
/// fails three calls in a row within milliseconds.
const DOWN_AFTER: u32 = 3;

/// Whether the store answers, with the metrics that say so; each change is logged once.
struct Health {
    state: AtomicU8,
    /// Failures since the last success.
    failures: AtomicU32,
    metrics: Arc<Metrics>,
    /// Woken on each down → up change (the subscriber reconnects and reloads).
    back: Notify,
    /// Woken on each change to down (the upkeep task starts probing at once, not at its
    /// next renewal).
    gone: Notify,
}

impl Health {
    fn ok(&self) {
        self.failures.store(0, Ordering::Release);
        let before = self.state.swap(UP, Ordering::AcqRel);
        self.metrics.cluster_up.set(1);
        match before {
            DOWN => {
                tracing::info!("cluster store reachable again: shared limits resume");
                self.back.notify_waiters();
            }
            UNKNOWN => tracing::info!("cluster store connected"),
            _ => {}
        }
    }

    fn failed(&self, op: &'static str, error: &StoreError) {
        self.metrics
            .cluster_errors
            .get_or_create(&OpLabel { op })
            .inc();
        self.metrics.cluster_up.set(0);
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures < DOWN_AFTER {
            return;
        }
        let before = self.state.swap(DOWN, Ordering::AcqRel);
        if before != DOWN {
            self.gone.notify_one();
            let detail = match error {
                StoreError::Redis(e) => e.to_string(),
                other => other.to_string(),
            };
            tracing::warn!(
                op,
                error = %detail,
                "cluster store unreachable: upgrades are decided by cluster.on_failure until it answers again"
            );
        }
    }

    fn down(&self) -> bool {
        self.state.load(Ordering::Acquire) == DOWN
    }

    /// No store configured: neither up nor down.
    fn reset(&self) {
        self.failures.store(0, Ordering::Release);
        self.state.store(UNKNOWN, Ordering::Release);
        self.metrics.cluster_up.set(0);
    }
}

/// A lease this gate holds in the store.
#[derive(Debug, Clone)]
struct Held {
    key: String,
    member: String,
}

/// A lease on its way out of the store, and who waits for it to be gone.
struct Release {
    held: Held,
    done: Option<oneshot::Sender<()>>,
}

/// This gate's leases, for the renewal, and the queue of releases.
struct Leases {
    gate_id: String,
    next: AtomicU64,
    held: Mutex<HashMap<u64, Held>>,
    releases: mpsc::Sender<Release>,
    /// Releases the store did not take, sent again once it answers (at most [`UNSENT`]).
    unsent: Mutex<Vec<Held>>,
    /// `wsgate_cluster_errors_total{op="release"}`: counts releases dropped on a full queue
    /// or past [`UNSENT`].
    dropped: Counter,
}

impl Leases {
    fn member(&self) -> (u64, String) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        (id, format!("{}:{id}", self.gate_id))
    }

    fn hold(self: &Arc<Self>, id: u64, key: String, member: String) -> Lease {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Held { key, member });
        Lease {
            leases: self.clone(),
            id,
        }
    }

    /// Stop renewing lease `id` and queue its release, with `done` told once it is sent.
    fn release(&self, id: u64, done: Option<oneshot::Sender<()>>) -> bool {
        let held = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        let Some(held) = held else {
            return false;
        };
        // Full queue: the lease is no longer renewed and expires by itself.
        if self.releases.try_send(Release { held, done }).is_err() {
            self.dropped.inc();
            return false;
        }
        true
    }

    /// Release a lease that an upgrade's call which failed may have taken in the store (a
    /// call that timed out may still run there): a member no one else uses, so removing
    /// it is harmless when the call never ran. Sent by the upkeep within [`PROBE_EVERY`]
    /// (on the same connection, so after the call it undoes), or once the store answers
    /// again if it is down: not at once, to a store that is failing calls already.
    fn forget(&self, key: String, member: String) {
        self.keep_unsent(vec![Held { key, member }]);
    }

    /// Keep releases the store did not take, to send once it answers.
    fn keep_unsent(&self, batch: Vec<Held>) {
        let mut unsent = self.unsent.lock().unwrap_or_else(PoisonError::into_inner);
        let room = UNSENT.saturating_sub(unsent.len());
        let over = batch.len().saturating_sub(room);
        unsent.extend(batch.into_iter().take(room));
        drop(unsent);
        if over > 0 {
            self.dropped.inc_by(over as u64);
        }
    }

    fn has_unsent(&self) -> bool {
        !self
            .unsent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    fn take_unsent(&self) -> Vec<Held> {
        std::mem::take(&mut *self.unsent.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn snapshot(&self) -> Vec<Held> {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

/// One connection's slot under a shared cap, released (asynchronously) when dropped.
pub struct Lease {
    leases: Arc<Leases>,
    id: u64,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({})", self.id)
    }
}

impl Lease {
    /// Release it now and wait, at most `within`, until the store has been told: for an
    /// upgrade refused after its slot was taken, so that the client's next upgrade does
    /// not find the slot still held (a dropped lease goes in the next batch, a few
    /// milliseconds later).
    pub async fn release(self, within: Duration) {
        let (done, sent) = oneshot::channel();
        if self.leases.release(self.id, Some(done)) {
            let _ = tokio::time::timeout(within, sent).await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.leases.release(self.id, None);
    }
}

/// The store could not decide: `cluster.on_failure` applies.
#[derive(Debug, Clone, Copy)]
pub struct Unavailable(pub OnFailure);

/// The store's answer for an upgrade: the rate's verdict (`Err`: retry after) and the
/// per-IP lease (`None`: the cap is full, or the rate refused it and it was not asked).
#[derive(Debug)]
pub struct UpgradeVerdict {
    pub rate: Result<(), Duration>,
    pub lease: Option<Lease>,
}

/// The per-IP limits of one route, as the store applies them.
#[derive(Debug, Clone, Copy)]
pub struct IpLimits {
    pub upgrades_per_second: f64,
    pub burst: u32,
    pub max_connections: u32,
}

/// The cluster store of one gate.
pub struct Cluster {
    store: ArcSwapOption<Store>,
    health: Arc<Health>,
    leases: Arc<Leases>,
    releases: Mutex<Option<mpsc::Receiver<Release>>>,
    /// Woken when the store is replaced (the upkeep task re-reads its period).
    replaced: Notify,
    revocations: Arc<Revocations>,
    registry: Arc<Registry>,
    /// The store's revocation epoch at this gate's last load (see `fanout`), and when
    /// that load had it.
    revocation_epoch: Mutex<Option<(String, tokio::time::Instant)>>,
    /// Told when a renewal finds another epoch than that (the store lost its data while
    /// the connection stayed up): the follower loads the store again. (One permit is
    /// kept if the follower is not waiting then: it is between loads, and loads again.)
    store_lost: Notify,
}

impl Cluster {
    pub fn new(
        metrics: Arc<Metrics>,
        revocations: Arc<Revocations>,
        registry: Arc<Registry>,
    ) -> Cluster {
        let (releases, receiver) = mpsc::channel(RELEASE_QUEUE);
        let dropped = metrics
            .cluster_errors
            .get_or_create(&OpLabel { op: "release" })
            .clone();
        Cluster {
            store: ArcSwapOption::empty(),
            health: Arc::new(Health {
                state: AtomicU8::new(UNKNOWN),
                failures: AtomicU32::new(0),
                metrics,
                back: Notify::new(),
                gone: Notify::new(),
            }),
            leases: Arc::new(Leases {
                gate_id: gate_id(),
                next: AtomicU64::new(0),
                held: Mutex::new(HashMap::new()),
                releases,
                unsent: Mutex::new(Vec::new()),
                dropped,
            }),
            releases: Mutex::new(Some(receiver)),
            replaced: Notify::new(),
            revocations,
            registry,
            revocation_epoch: Mutex::new(None),
            store_lost: Notify::new(),
        }
    }

    /// Follow the policy's `cluster`: a changed one gets a new store (and subscriber);
    /// `None` drops the store. Spawns the upkeep task the first time.
    pub fn sync(
        self: &Arc<Self>,
        config: Option<&Config>,
        tasks: &crate::shutdown::Tasks,
        stop: &CancellationToken,
    ) {
        if let Some(receiver) = self
            .releases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            tasks.spawn(self.clone().upkeep(receiver, stop.clone()));
        }
        let current = self.store.load();
        if current.as_ref().map(|s| &s.config) == config {
            return;
        }
        // The same store under new settings (`timeout_ms`, `on_failure`, the lease): its
        // revocations stay in force here, loaded as they were.
        let same_store = current
            .as_ref()
            .zip(config)
            .is_some_and(|(old, new)| old.config.same_store(new));
        if !same_store {
            // Another store's epoch is not this one's: a renewal must not take the
            // difference for a store that lost its data.
            *self
                .revocation_epoch
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
        }
        if let Some(old) = current.as_ref() {
            old.stop.cancel();
            // Another store is another fleet: what the old one shared is not carried over.
            if config.is_some() && !same_store {
                let forgotten = self.revocations.forget_shared();
                if forgotten > 0 {
                    tracing::info!(
                        forgotten,
                        "cluster: another store: the old store's revocations are lifted here"
                    );
                }
            }
        }
        let Some(config) = config else {
            self.store.store(None);
            self.health.reset();
            self.replaced.notify_waiters();
            return;
        };
        let client = config.url.as_ref().and_then(|url| {
            // Without TCP_NODELAY (the crate's default is off), an upgrade's script call
            // written while another's answer is due waits in the kernel for that answer.
            let info = url.expose().into_connection_info().ok()?;
            // A connection that dies silently (Redis's host gone, a NAT or load balancer
            // forgetting an idle subscription) is noticed by the kernel and replaced:
            // keep-alive probes after 10 s of silence, and data left unacknowledged for
            // 10 s ends it. Without them a timed-out call leaves the socket in use, and
            // the gate waits out TCP's retransmissions (about 15 minutes).
            use redis::io::tcp::socket2::TcpKeepalive;
            let keepalive = TcpKeepalive::new()
                .with_time(DEAD_SOCKET)
                .with_interval(Duration::from_secs(5))
                .with_retries(3);
            let tcp = redis::io::tcp::TcpSettings::default()
                .set_nodelay(true)
                .set_keepalive(keepalive)
                .set_user_timeout(DEAD_SOCKET);
            redis::Client::open(info.set_tcp_settings(tcp)).ok()
        });
        let conn = client.as_ref().and_then(|client| {
            // Reconnects by itself; each attempt is bounded, and every call is bounded
            // again by the caller.
            let settings = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.timeout.max(BACKGROUND_BOUND)))
                // The crate's own default (500 ms) would cut a `timeout_ms` above it short.
                .set_response_timeout(Some(config.timeout.max(BACKGROUND_BOUND)))
                .set_number_of_retries(1)
                .set_max_delay(PROBE_EVERY);
            ConnectionManager::new_lazy_with_config(client.clone(), settings).ok()
        });
        if conn.is_none() {
            tracing::warn!(
                env = %config.redis_url_env,
                "cluster: no store URL; upgrades are decided by cluster.on_failure"
            );
        }
        let store = Arc::new(Store {
            config: config.clone(),
            client,
            conn,
            stop: stop.child_token(),
            revocations_loaded: AtomicBool::new(
                same_store
                    && current
                        .as_ref()
                        .is_some_and(|old| old.revocations_loaded.load(Ordering::Acquire)),
            ),
            loaded: Notify::new(),
        });
        self.health.reset();
        self.store.store(Some(store.clone()));
        self.replaced.notify_waiters();
        if store.client.is_some() {
            tasks.spawn(self.clone().subscribe(store));
        }
    }

    /// Whether the fleet's revocations are in force here: the store's have been loaded
    /// once, waiting for that at most `timeout_ms` (a gate just started, or moved to
    /// another store, must not admit a token the fleet has revoked before it has read
    /// the fleet's revocations). `Err` (decided by `on_failure`) if they are not by then,
    /// or the store is down; `Ok` without a store URL, where nothing can be loaded.
    pub async fn revocations_in_force(&self) -> Result<(), Unavailable> {
        let Some(store) = self.store.load_full() else {
            return Ok(());
        };
        if store.client.is_none() || store.revocations_loaded.load(Ordering::Acquire) {
            return Ok(());
        }
        let loaded = store.loaded.notified();
        tokio::pin!(loaded);
        loaded.as_mut().enable();
        if store.revocations_loaded.load(Ordering::Acquire) {
            return Ok(());
        }
        if !self.health.down() {
            let _ = tokio::time::timeout(store.config.timeout, loaded).await;
            if store.revocations_loaded.load(Ordering::Acquire) {
                return Ok(());
            }
        }
        Err(Unavailable(store.config.on_failure))
    }

    /// The store, unless it is down (then the caller decides by `on_failure` at once).
    fn usable(&self) -> Result<(Arc<Store>, ConnectionManager), Unavailable> {
        let store = self.store.load_full().ok_or(Unavailable(OnFailure::Open))?;
        let on_failure = Unavailable(store.config.on_failure);
        if self.health.down() {
            return Err(on_failure);
        }
        match store.conn.clone() {
            Some(conn) => Ok((store, conn)),
            None => {
                self.health.failed("rate", &StoreError::NoUrl);
                Err(on_failure)
            }
        }
    }

    /// Run one store call under `within`, keeping the health up to date.
    async fn bounded<T>(
        &self,
        op: &'static str,
        within: Duration,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let started = tokio::time::Instant::now();
        let error = match tokio::time::timeout(within, call).await {
            Ok(Ok(value)) => {
                // Only an answer within an upgrade's `timeout_ms` shows the store usable.
                // A slower one (a renewal's or a release's, bounded at a second) would
                // clear the failures of the upgrades that timed out meanwhile, and a slow
                // store would never be marked down, each upgrade paying its bound twice.
                // While the store is down, only the upkeep's probe brings it back (a PING
                // within `timeout_ms`): a slower call that succeeds, such as a revocation
                // reload's next round trip, would mark it up for the next upgrades to mark
                // down again.
                let in_time = self
                    .store
                    .load()
                    .as_ref()
                    .is_none_or(|store| started.elapsed() <= store.config.timeout);
                if in_time && !self.health.down() {
                    self.health.ok();
                }
                return Ok(value);
            }
            Ok(Err(e)) => StoreError::Redis(e),
            Err(_) => StoreError::Timeout(within),
        };
        self.health.failed(op, &error);
        Err(error)
    }

    /// The upgrade's shared checks, in one round trip: the per-IP upgrade rate, then (if
    /// it passed, or `report`) a lease under the per-IP cap. `client` is the client key.
    pub async fn upgrade(
        &self,
        route: &str,
        client: &str,
        limits: IpLimits,
        report: bool,
    ) -> Result<UpgradeVerdict, Unavailable> {
        let (store, mut conn) = self.usable()?;
        let keys = store.keys();
        let (id, member) = self.leases.member();
        // In whole microseconds, rounded up, as the script counts.
        let interval_us = crate::policy::upgrade_period(limits.upgrades_per_second)
            .as_nanos()
            .div_ceil(1000)
            .max(1) as u64;
        let lease_key = keys.ip(route, client);
        let mut call = scripts::ADMIT.prepare_invoke();
        call.key(keys.rate(route, client))
            .key(&lease_key)
            .arg(interval_us)
            .arg(limits.burst)
            .arg(&member)
            .arg(limits.max_connections)
            .arg(store.config.lease.as_millis() as u64)
            .arg(u8::from(report));
        let answer: (i64, i64, i64) = match self
            .bounded("rate", store.config.timeout, call.invoke_async(&mut conn))
            .await
        {
            Ok(answer) => answer,
            Err(_) => {
                self.leases.forget(lease_key, member);
                return Err(Unavailable(store.config.on_failure));
            }
        };
        let (rate_ok, retry_us, leased) = answer;
        let rate = match rate_ok {
            1 => Ok(()),
            _ => Err(Duration::from_micros(retry_us.max(0) as u64)),
        };
        let lease = (leased == 1).then(|| self.leases.hold(id, lease_key, member));
        Ok(UpgradeVerdict { rate, lease })
    }

    /// The bound of one store round trip on the upgrade path (`timeout_ms`).
    pub fn round_trip(&self) -> Duration {
        self.store
            .load()
            .as_ref()
            .map_or(Duration::ZERO, |store| store.config.timeout)
    }

    /// A lease under the per-subject cap (`None`: the cap is full).
    pub async fn subject(
        &self,
        route: &str,
        subject: &str,
        max: u32,
    ) -> Result<Option<Lease>, Unavailable> {
        let (store, mut conn) = self.usable()?;
        let key = store.keys().subject(route, subject);
        let (id, member) = self.leases.member();
        let mut call = scripts::LEASE.prepare_invoke();
        call.key(&key)
            .arg(&member)
            .arg(max)
            .arg(store.config.lease.as_millis() as u64);
        let leased: i64 = match self
            .bounded("lease", store.config.timeout, call.invoke_async(&mut conn))
            .await
        {
            Ok(leased) => leased,
            Err(_) => {
                self.leases.forget(key, member);
                return Err(Unavailable(store.config.on_failure));
            }
        };
        Ok((leased == 1).then(|| self.leases.hold(id, key, member)))
    }

    /// A lease for a connection admitted on this process's own limits while the store was
    /// down: held here only, so that the first renewal once the store is back registers
    /// it and the shared caps count it. `None` without a store.
    pub fn unregistered_ip(&self, route: &str, client: &str) -> Option<Lease> {
        let store = self.store.load_full()?;
        let (id, member) = self.leases.member();
        Some(self.leases.hold(id, store.keys().ip(route, client), member))
    }

    /// As [`Cluster::unregistered_ip`], for the per-subject cap.
    pub fn unregistered_subject(&self, route: &str, subject: &str) -> Option<Lease> {
        let store = self.store.load_full()?;
        let (id, member) = self.leases.member();
        Some(
            self.leases
                .hold(id, store.keys().subject(route, subject), member),
        )
    }

    /// Renew every lease this gate holds, in one pipeline (chunks of [`REFRESH_CHUNK`]
    /// leases per script call), reading the revocation epoch in the same batch; with no
    /// lease held, reading the epoch alone keeps the health current.
    async fn refresh(&self, store: &Store, conn: &mut ConnectionManager) {
        let held = self.leases.snapshot();
        let within = store.background_bound();
        let epoch_key = fanout::epoch_key(&store.config.key_prefix);
        let sent = tokio::time::Instant::now();
        let mut pipe = redis::pipe();
        if held.is_empty() {
            pipe.get(&epoch_key);
            let read = pipe.query_async::<(Option<String>,)>(conn);
            if let Ok((epoch,)) = self.bounded("refresh", within, read).await {
                self.check_epoch(epoch, sent);
            }
            return;
        }
        let lease_ms = store.config.lease.as_millis() as u64;
        // Loaded in the same batch: the store may have restarted and lost the script.
        pipe.load_script(&scripts::REFRESH).ignore();
        for chunk in held.chunks(REFRESH_CHUNK) {
            let mut call = scripts::REFRESH.prepare_invoke();
            call.arg(lease_ms);
            for lease in chunk {
                call.key(&lease.key).arg(&lease.member);
            }
            pipe.invoke_script(&call).ignore();
        }
        pipe.get(&epoch_key);
        let renewed = pipe.query_async::<(Option<String>,)>(conn);
        if let Ok((epoch,)) = self.bounded("refresh", within, renewed).await {
            self.check_epoch(epoch, sent);
        }
    }

    /// A store whose revocation epoch is not the one this gate loaded under (gone, or set
    /// afresh by another gate) lost its data without a connection breaking (`FLUSHALL`, or
    /// the key evicted): the follower loads it again, storing the revocations in force
    /// here, as after a restart. The epoch this gate knew is forgotten meanwhile, so the
    /// load takes the store for a new one (and the next renewals say nothing more). Only a
    /// read `sent` after the last load had its epoch says anything: one sent earlier may
    /// have reached the store before the load set it.
    fn check_epoch(&self, epoch: Option<String>, sent: tokio::time::Instant) {
        let lost = {
            let mut last = self
                .revocation_epoch
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let lost = last
                .as_ref()
                .is_some_and(|(known, read)| *read < sent && epoch.as_ref() != Some(known));
            if lost {
                *last = None;
            }
            lost
        };
        if lost {
            tracing::warn!(
                "cluster: the store lost its revocation epoch (its data flushed or evicted); loading it again"
            );
            self.store_lost.notify_one();
        }
    }

    /// Whether the store answers within the upgrade path's bound; if it does, it is up
    /// again. The probe reads a key of the gate's (the revocation epoch), not a PING: a
    /// store that answers but refuses the gate's keys (an ACL user kept from them) stays
    /// down instead of swinging up at each probe and down at the next call.
    /// A probe that fails is counted as a `refresh` error, as a failed renewal is.
    async fn answers_in(&self, store: &Store, conn: &mut ConnectionManager) -> bool {
        let mut read = redis::cmd("GET");
        read.arg(fanout::epoch_key(&store.config.key_prefix));
        let answer = tokio::time::timeout(
            store.config.timeout,
            read.query_async::<Option<String>>(conn),
        );
        let failed = match answer.await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(StoreError::Redis(e)),
            Err(_) => Some(StoreError::Timeout(store.config.timeout)),
        };
        if let Some(error) = &failed {
            self.health.failed("refresh", error);
        }
        let answers = failed.is_none();
        if answers {
            self.health.ok();
        }
        answers
    }

    /// Send releases, in one pipeline; those the store does not take (it is down, or the
    /// call fails) are kept and sent again once it answers. Returns whether they went.
    async fn release(&self, batch: Vec<Held>) -> bool {
        let Some(store) = self.store.load_full() else {
            return false;
        };
        let Some(mut conn) = store.conn.clone() else {
            return false;
        };
        if self.health.down() {
            self.leases.keep_unsent(batch);
            return false;
        }
        let mut pipe = redis::pipe();
        for held in &batch {
            pipe.zrem(&held.key, &held.member).ignore();
        }
        let within = store.background_bound();
        let sent = self
            .bounded("release", within, pipe.query_async::<()>(&mut conn))
            .await;
        if sent.is_err() {
            self.leases.keep_unsent(batch);
            return false;
        }
        true
    }

    /// Releases, renewals every `lease_seconds / 3`, and probes while the store is down.
    /// One task does all three, so a release is never overtaken by the renewal of the
    /// lease it releases.
    async fn upkeep(
        self: Arc<Self>,
        mut releases: mpsc::Receiver<Release>,
        stop: CancellationToken,
    ) {
        let mut next_refresh = tokio::time::Instant::now();
        loop {
            let store = self.store.load_full();
            let period = store
                .as_ref()
                .map_or(Duration::from_secs(1), |s| s.config.lease / 3);
            let now = tokio::time::Instant::now();
            // Down: probe. Up with releases the store did not take (a slot an upgrade's
            // timed-out call may have taken after all): send them soon, not at the next
            // renewal (`lease_seconds / 3`), or the address is refused as full meanwhile.
            let wake = if self.health.down() || self.leases.has_unsent() {
                next_refresh.min(now + PROBE_EVERY)
            } else {
                next_refresh
            };
            tokio::select! {
                // Releases first: those of the last connections to close are sent before
                // the exit's stop is taken.
                biased;
                Some(first) = releases.recv() => {
                    // A release someone waits for goes at once.
                    if first.done.is_none() {
                        tokio::time::sleep(RELEASE_LINGER).await;
                    }
                    let mut batch = vec![first];
                    while batch.len() < RELEASE_BATCH {
                        match releases.try_recv() {
                            Ok(held) => batch.push(held),
                            Err(_) => break,
                        }
                    }
                    let (batch, waiting): (Vec<Held>, Vec<_>) =
                        batch.into_iter().map(|r| (r.held, r.done)).unzip();
                    self.release(batch).await;
                    for done in waiting.into_iter().flatten() {
                        let _ = done.send(());
                    }
                }
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(wake) => {
                    let Some(store) = store else {
                        // No store any more (a reload removed `cluster`): releases for the
                        // one before cannot be sent; its leases expire by themselves.
                        drop(self.leases.take_unsent());
                        next_refresh = tokio::time::Instant::now() + period;
                        continue;
                    };
                    let Some(mut conn) = store.conn.clone() else {
                        next_refresh = tokio::time::Instant::now() + period;
                        continue;
                    };
                    // While down, the store counts as back only once it answers within an
                    // upgrade's `timeout_ms`: one slower than that (but within the renewal's
                    // 1 s) would be marked down again by the next three upgrades, and each
                    // swing resubscribes and reloads the revocations.
                    let was_down = self.health.down();
                    if was_down && !self.answers_in(&store, &mut conn).await {
                        next_refresh = tokio::time::Instant::now() + period;
                        continue;
                    }
                    // A probe that succeeds renews (re-registers) everything at once, as a
                    // renewal that is due does; then the releases the store did not take
                    // are sent (alone, when that is all the wake was for).
                    let renew = was_down || tokio::time::Instant::now() >= next_refresh;
                    if renew {
                        self.refresh(&store, &mut conn).await;
                    }
                    let mut unsent = self.leases.take_unsent();
                    while !unsent.is_empty() {
                        let rest = unsent.split_off(unsent.len().min(RELEASE_BATCH));
                        // One batch the store did not take: the rest waits with it.
                        if !self.release(unsent).await {
                            self.leases.keep_unsent(rest);
                            break;
                        }
                        unsent = rest;
                    }
                    if renew {
                        next_refresh = tokio::time::Instant::now() + period;
                    }
                }
                () = self.replaced.notified() => {
                    next_refresh = tokio::time::Instant::now();
                }
                // Marked down by the upgrade path: probe from now on.
                () = self.health.gone.notified() => {}
            }
        }
    }
}

/// This process's id in lease members: unique per start (host name, pid, start time).
fn gate_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{host}/{}/{nanos:x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_name_with_a_colon_keeps_its_keys_apart() {
        let keys = Keys("p:");
        assert_ne!(keys.subject("a", "b:c"), keys.subject("a:b", "c"));
        assert_ne!(keys.ip("a", "b:1"), keys.ip("a:b", "1"));
        assert_eq!(keys.subject("chat", "alice"), "p:sub:chat:alice");
        assert_eq!(keys.ip("a:b%", "1.2.3.4"), "p:ip:a%3Ab%25:1.2.3.4");
        assert_eq!(keys.rate("a%3Ab", "1.2.3.4"), "p:rate:a%253Ab:1.2.3.4");
    }
}
