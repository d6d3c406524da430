//! Admission: everything decided before the 101, in the order of docs/admission.md, cheapest first:
//! route → IP allow/deny → global cap → per-IP upgrade rate → per-IP connection cap →
//! Origin → token → required claims → per-subject connection cap → upstream handshake.
//!
//! The route is matched by `http` and the upstream handshake is `upstream`; the checks in
//! between live here, one module each. Every failure is a [`Rejection`]. In `mode: report`
//! a failure is logged and the upgrade goes on, except `server_full` and `draining`.
//! [`recheck`] applies a new policy's IP, Origin and claims rules to an open connection.

pub(crate) mod ip;
pub mod jwks;
pub mod origin;
mod rate;
mod rejection;
pub mod token;
pub mod verified;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use rustls_pki_types::CertificateDer;

pub use ip::{canonical, client_ip, peer, Peer};
pub use rejection::{Rejection, UpstreamFault, UpstreamRefusal};
pub use token::Claims;

use crate::cluster::{Cluster, IpLimits, Lease, Unavailable};
use crate::policy::{Auth, Mode, OnFailure, Policy, Route, TokenSource};
use crate::revocations::Revocations;
use rate::{CapSlot, Caps, Limiters, CAP_RETRY_AFTER};

/// `Retry-After` of `limits_unavailable`: the store is probed every half second.
const LIMITS_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Admission state shared by every connection of a gate: counters, limiters, key sets.
pub struct State {
    pub connections: Arc<Connections>,
    pub limiters: Limiters,
    pub caps: Arc<Caps>,
    pub jwks: jwks::JwksCache,
    /// Tokens already verified (cleared on reload).
    pub verified: verified::Verified,
    /// Revoked `sub`s and `jti`s (the operator API), refused after the token verifies.
    pub revocations: Arc<Revocations>,
    /// The cluster store, when this is a running gate (`wsgate explain` has none: it never
    /// contacts a store, and applies this process's own limits).
    pub cluster: Option<Arc<Cluster>>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl State {
    /// `jwks_roots`: extra CA certificates trusted for `jwks_url` fetches.
    pub fn new(
        jwks_roots: Vec<CertificateDer<'static>>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> State {
        State {
            connections: Arc::new(Connections::default()),
            limiters: Limiters::default(),
            caps: Arc::new(Caps::default()),
            jwks: jwks::JwksCache::new(jwks_roots),
            verified: verified::Verified::default(),
            revocations: Arc::new(Revocations::new(metrics.revocations_active.clone())),
            cluster: None,
            metrics,
        }
    }
}

/// Open WebSocket connections, for the global `max_connections` cap.
#[derive(Debug, Default)]
pub struct Connections {
    active: AtomicUsize,
}

impl Connections {
    /// Take a slot if fewer than `max` are taken; the slot is freed when the guard drops.
    pub fn try_acquire(self: &Arc<Self>, max: usize) -> Option<ConnectionGuard> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionGuard(self.clone()))
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

/// One open connection's slot in the global cap, released however the connection ends.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Connections>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request as admission sees it, whatever the protocol it came on: the routed path, the
/// peer, the headers (HTTP/2's lowercase names are the same `HeaderMap`), the query and the
/// offered subprotocols.
pub struct Attempt<'a> {
    /// The request's `X-Request-Id` (kept or generated), for report mode's log lines.
    pub request_id: &'a str,
    /// The path's normal form (the one that was routed, re-checked and sent upstream).
    pub path: &'a str,
    pub peer: Peer,
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    /// The offered `Sec-WebSocket-Protocol` entries, in order.
    pub protocols: &'a [&'a str],
}

/// What is being admitted: an upgrade, or a plain request on an `http: pass` route, which
/// goes through the same checks except the upgrade rate and the connection caps (a page
/// load is dozens of requests, and none of them is a connection to cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Upgrade,
    Plain,
}

/// The caps an admitted connection holds; dropping it frees them (none for a plain
/// request).
#[derive(Debug, Default)]
pub struct Slots {
    _global: Option<ConnectionGuard>,
    _ip: Option<CapSlot>,
    _subject: Option<CapSlot>,
    _shared_ip: Option<Lease>,
    _shared_subject: Option<Lease>,
}

impl Slots {
    /// Free them now, the shared ones waiting (at most `within` for both: they are queued
    /// together and go in one batch) until the store has heard: for a connection's end,
    /// and an upgrade that fails after its admission (the upstream refused or is down),
    /// whose client may try again at once.
    pub async fn release(self, within: std::time::Duration) {
        let Slots {
            _shared_ip,
            _shared_subject,
            ..
        } = self;
        let release = |lease: Option<Lease>| async move {
            if let Some(lease) = lease {
                lease.release(within).await;
            }
        };
        tokio::join!(release(_shared_ip), release(_shared_subject));
    }
}

/// Whose limits decided an upgrade's rate and caps (the upgrade log line's `limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Limits {
    /// No `cluster`: this process's own.
    #[default]
    Process,
    /// The cluster store's, shared by the fleet.
    Shared,
    /// This process's own because the store was unreachable (`on_failure: open`).
    Local,
}

impl Limits {
    pub fn as_str(self) -> &'static str {
        match self {
            Limits::Process => "process",
            Limits::Shared => "shared",
            Limits::Local => "local",
        }
    }
}

/// Admission's decision for a request it let through: everything the connection needs
/// afterwards, in one value. The HTTP/1.1 path (and any other protocol's) calls [`admit`]
/// and takes what it needs from here: the upstream request its claim headers, peer and
/// token carriers; the caps their slots; the relay the [`Standing`].
#[derive(Debug)]
pub struct Ticket {
    pub route: Arc<Route>,
    pub peer: Peer,
    /// The caps held for the connection's life (none for a plain request).
    pub slots: Slots,
    pub claim_headers: Vec<(HeaderName, HeaderValue)>,
    /// The carrier of the token that was verified (`None` without a valid token).
    pub verified_source: Option<TokenSource>,
    /// What the connection was admitted with, for the relay and the re-checks.
    pub standing: Standing,
    /// When the token expires (`exp` + leeway), if the route closes on expiry.
    pub expires_at: Option<tokio::time::Instant>,
    /// `mode: report` when it was admitted.
    pub report: bool,
    /// Whose limits decided it.
    pub limits: Limits,
}

impl Ticket {
    /// The token carriers to remove from what goes upstream: every copy of every one the
    /// route names, except the verified token's own first copy when the route forwards it
    /// (`forward_token`).
    pub fn carriers(&self) -> token::Carriers<'_> {
        let auth: &Auth = &self.route.auth;
        // A public route that forwards tokens, with none verified (a plain request there
        // is not asked for one, and an upgrade had none): the carriers go on as they came,
        // for the upstream that verifies them itself.
        if auth.forward_token && !auth.required && self.verified_source.is_none() {
            return token::Carriers::NONE;
        }
        token::Carriers {
            sources: &auth.token_sources,
            kept: self.verified_source.as_ref().filter(|_| auth.forward_token),
        }
    }
}

/// How one admission step went, as `wsgate explain` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    /// Failed, and let through because the policy is in report mode.
    Reported,
}

/// The steps of one admission in the order they ran, each with how it went and, for a
/// failure, its reason: recorded only when asked for (by `wsgate explain`).
#[derive(Debug, Default)]
pub struct Trace(std::sync::Mutex<Vec<(Step, Outcome, Option<&'static str>)>>);

/// The checks of [`admit`], named as docs/admission.md names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Ip,
    GlobalCap,
    UpgradeRate,
    IpCap,
    Origin,
    Token,
    Claims,
    SubjectCap,
}

impl Trace {
    fn record(&self, step: Step, outcome: Outcome, reason: Option<&'static str>) {
        let mut steps = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        steps.push((step, outcome, reason));
    }

    /// The steps recorded so far.
    pub fn steps(&self) -> Vec<(Step, Outcome, Option<&'static str>)> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Enforces a failed check, or in report mode logs and counts it and lets the upgrade on;
/// with a [`Trace`], records every step's outcome.
struct Verdicts<'a> {
    state: &'a State,
    report: bool,
    /// An upgrade, or a plain request on an `http: pass` route (for the log's words).
    upgrade: bool,
    request_id: &'a str,
    route: &'a Route,
    client_ip: IpAddr,
    trace: Option<&'a Trace>,
}

impl Verdicts<'_> {
    /// A rule's verdict, enforced (or only reported).
    fn check(&self, step: Step, verdict: Result<(), Rejection>) -> Result<(), Rejection> {
        match verdict {
            Ok(()) => {
                self.pass(step);
                Ok(())
            }
            Err(rejection) => self.fail(step, rejection),
        }
    }

    fn pass(&self, step: Step) {
        if let Some(trace) = self.trace {
            trace.record(step, Outcome::Pass, None);
        }
    }

    /// A failure that report mode does not let through (`server_full`).
    fn refuse(&self, step: Step, rejection: Rejection) -> Result<(), Rejection> {
        if let Some(trace) = self.trace {
            trace.record(step, Outcome::Fail, Some(rejection.reason()));
        }
        Err(rejection)
    }

    /// The store's answer: `Some` to apply, `None` to fall back to this process's own
    /// limits (`on_failure: open`, counted), or the refusal of `on_failure: closed`
    /// (let through to the local limits in report mode, like any other refusal).
    fn shared<T>(
        &self,
        step: Step,
        answer: Result<T, Unavailable>,
        limits: &mut Limits,
    ) -> Result<Option<T>, Rejection> {
        match answer {
            Ok(value) => Ok(Some(value)),
            Err(Unavailable(on_failure)) => {
                // In report mode one upgrade's `limits_unavailable` is reported once, not
                // once per call that could not be made (address, subject, revocations).
                let first = *limits != Limits::Local;
                *limits = Limits::Local;
                if on_failure == OnFailure::Closed && first {
                    let refusal = Rejection::LimitsUnavailable {
                        retry_after: LIMITS_RETRY_AFTER,
                    };
                    self.fail(step, refusal)?;
                }
                self.state.metrics.cluster_fallbacks.inc();
                Ok(None)
            }
        }
    }

    fn fail(&self, step: Step, rejection: Rejection) -> Result<(), Rejection> {
        if let Some(trace) = self.trace {
            let outcome = if self.report {
                Outcome::Reported
            } else {
                Outcome::Fail
            };
            trace.record(step, outcome, Some(rejection.reason()));
        }
        if !self.report {
            return Err(rejection);
        }
        self.report(&rejection);
        Ok(())
    }

    /// A failure let through in report mode: counted and logged.
    fn report(&self, rejection: &Rejection) {
        self.state
            .metrics
            .report_violation(&self.route.name, rejection.reason());
        let (id, route, ip) = (self.request_id, self.route.name.as_str(), self.client_ip);
        let reason = rejection.reason();
        if self.upgrade {
            tracing::warn!(request_id = %id, route, client_ip = %ip, reason,
                "report mode: this upgrade would have been refused");
        } else {
            tracing::warn!(request_id = %id, route, client_ip = %ip, reason,
                "report mode: this request would have been refused");
        }
    }
}

/// Run the checks between route and upstream, in order, stopping at the first failure.
/// A plain request (`Kind::Plain`) skips the global cap, the upgrade rate and the
/// connection caps, and is only asked for a token when the route requires one. With a
/// `trace`, each step's outcome is recorded there (`wsgate explain`).
pub async fn admit<'a>(
    state: &State,
    policy: &Policy,
    route: &'a Arc<Route>,
    attempt: &Attempt<'a>,
    kind: Kind,
    trace: Option<&Trace>,
) -> Result<Ticket, Rejection> {
    let mut shared_ip = None;
    let admitted = checks(state, policy, route, attempt, kind, trace, &mut shared_ip).await;
    if let (Err(_), Some(lease), Some(cluster)) = (&admitted, shared_ip, &state.cluster) {
        // Refused after the address's shared slot was taken (Origin, token, claims, the
        // subject's cap): the store hears of its release before the client hears the
        // refusal, so that the client's next upgrade does not find the slot still held.
        lease.release(cluster.round_trip()).await;
    }
    admitted
}

/// [`admit`]'s checks; the address's shared lease is kept in `shared_ip` until the ticket
/// takes it, so that a refusal can release it at once.
async fn checks<'a>(
    state: &State,
    policy: &Policy,
    route: &'a Arc<Route>,
    attempt: &Attempt<'a>,
    kind: Kind,
    trace: Option<&Trace>,
    shared_ip: &mut Option<Lease>,
) -> Result<Ticket, Rejection> {
    let upgrade = kind == Kind::Upgrade;
    let client_ip = attempt.peer.client_ip;
    let report = policy.mode == Mode::Report;
    let v = Verdicts {
        state,
        report,
        upgrade,
        request_id: attempt.request_id,
        route,
        client_ip,
        trace,
    };
    if route.unrouted {
        // Report mode's stand-in for no route (the route step is the caller's).
        v.report(&Rejection::NoRoute);
    }
    v.check(Step::Ip, ip_rule(route, client_ip))?;
    let mut global = None;
    let mut ip_slot = None;
    let mut shared_subject = None;
    // The store is asked only by a running gate whose policy has `cluster`.
    let cluster = state
        .cluster
        .as_ref()
        .filter(|_| policy.cluster.is_some() && upgrade);
    let mut limits_used = if cluster.is_some() {
        Limits::Shared
    } else {
        Limits::Process
    };
    if upgrade {
        global = state.connections.try_acquire(policy.max_connections);
        if global.is_none() {
            v.refuse(Step::GlobalCap, Rejection::ServerFull)?;
        }
        v.pass(Step::GlobalCap);
        let key = ip::client_key(client_ip, route.rate.ipv6_prefix);
        let shared = match cluster {
            Some(cluster) => {
                let limits = IpLimits {
                    upgrades_per_second: route.rate.upgrades_per_second,
                    burst: route.rate.burst,
                    max_connections: route.rate.max_connections_per_ip,
                };
                let answer = cluster
                    .upgrade(&route.name, &key.to_string(), limits, report)
                    .await;
                v.shared(Step::UpgradeRate, answer, &mut limits_used)?
            }
            None => None,
        };
        match shared {
            Some(verdict) => {
                let rate = verdict
                    .rate
                    .map_err(|retry_after| Rejection::RateLimited { retry_after });
                v.check(Step::UpgradeRate, rate)?;
                let ip_cap = match verdict.lease {
                    Some(_) => Ok(()),
                    None => Err(Rejection::TooManyConnections("address", CAP_RETRY_AFTER)),
                };
                v.check(Step::IpCap, ip_cap)?;
                *shared_ip = verdict.lease;
                // Counted here too, never refused here: if the store goes down, this
                // process's own cap knows its open connections.
                ip_slot = state.caps.try_ip(&route.name, key, u32::MAX);
            }
            None => {
                let rate = state
                    .limiters
                    .check(route, key)
                    .map_err(|retry_after| Rejection::RateLimited { retry_after });
                v.check(Step::UpgradeRate, rate)?;
                ip_slot = state
                    .caps
                    .try_ip(&route.name, key, route.rate.max_connections_per_ip);
                let ip_cap = match ip_slot {
                    Some(_) => Ok(()),
                    None => Err(Rejection::TooManyConnections("address", CAP_RETRY_AFTER)),
                };
                v.check(Step::IpCap, ip_cap)?;
                if let Some(cluster) = cluster {
                    *shared_ip = cluster.unregistered_ip(&route.name, &key.to_string());
                }
            }
        }
    }
    let origin = attempt
        .headers
        .get(http::header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("\u{0}"));
    // A browser sends no Origin on a navigation or a same-origin GET: a plain request is
    // checked only when it has one.
    let origin_checked = upgrade || origin.is_some();
    if origin_checked {
        v.check(Step::Origin, origin_rule(route, origin))?;
    }

    let auth = &route.auth;
    // A plain request on a public route is not asked for a token, nor is one read.
    let found = (upgrade || auth.required)
        .then(|| {
            token::extract(
                &auth.token_sources,
                attempt.headers,
                attempt.query,
                attempt.protocols,
            )
        })
        .flatten();
    let claims = match &found {
        None => {
            v.check(Step::Token, claims_rule(auth, None))?;
            None
        }
        Some(found) => {
            let verified = state.verified.verify(found.token, route, &state.jwks).await;
            // Under `cluster`, the fleet's revocations are in force here before a token is
            // judged by them (a gate just started has not read them yet): waited for at
            // most `timeout_ms`, then `on_failure` decides.
            if let (Ok(_), Some(cluster)) = (&verified, cluster) {
                v.shared(
                    Step::Token,
                    cluster.revocations_in_force().await,
                    &mut limits_used,
                )?;
            }
            match verified {
                // A revoked token is refused as an invalid one is (and in report mode, let on
                // as one that did not verify).
                Ok(claims) if revoked(&state.revocations, &claims) => {
                    v.fail(Step::Token, Rejection::TokenRevoked)?;
                    None
                }
                Ok(claims) => {
                    v.pass(Step::Token);
                    v.check(Step::Claims, claims_rule(auth, Some(&claims)))?;
                    Some(claims)
                }
                Err(rejection) => {
                    v.fail(Step::Token, rejection)?;
                    None
                }
            }
        }
    };
    let subject = claims.as_ref().and_then(|c| c.claim_str("sub"));
    let subject_slot = match subject.filter(|_| upgrade) {
        Some(sub) => {
            let max = route.rate.max_connections_per_subject;
            let shared = match cluster {
                Some(cluster) => {
                    let answer = cluster.subject(&route.name, sub, max).await;
                    v.shared(Step::SubjectCap, answer, &mut limits_used)?
                }
                None => None,
            };
            let (slot, cap) = match shared {
                Some(lease) => {
                    let full = lease.is_none();
                    shared_subject = lease;
                    // Counted, never refused here (as for the per-IP cap above).
                    let slot = state.caps.try_subject(&route.name, sub, u32::MAX);
                    (slot, !full)
                }
                None => {
                    let slot = state.caps.try_subject(&route.name, sub, max);
                    let ok = slot.is_some();
                    if let Some(cluster) = cluster.filter(|_| ok) {
                        shared_subject = cluster.unregistered_subject(&route.name, sub);
                    }
                    (slot, ok)
                }
            };
            let cap = match cap {
                true => Ok(()),
                false => Err(Rejection::TooManyConnections("subject", CAP_RETRY_AFTER)),
            };
            v.check(Step::SubjectCap, cap)?;
            slot
        }
        None => None,
    };
    let claim_headers = claims
        .as_ref()
        .map(|c| token::claim_headers(c, auth))
        .unwrap_or_default();
    let expires_at = claims
        .as_ref()
        .filter(|_| auth.close_on_expiry)
        .and_then(|c| c.expires_at(auth.leeway_seconds));
    Ok(Ticket {
        route: route.clone(),
        peer: attempt.peer,
        slots: Slots {
            _global: global,
            _ip: ip_slot,
            _subject: subject_slot,
            _shared_ip: shared_ip.take(),
            _shared_subject: shared_subject,
        },
        verified_source: claims
            .as_ref()
            .and(found.as_ref())
            .map(|f| f.source.clone()),
        claim_headers,
        standing: Standing {
            path: attempt.path.to_owned(),
            client_ip,
            origin: attempt
                .headers
                .get(http::header::ORIGIN)
                .and_then(|o| o.to_str().ok())
                .map(str::to_owned),
            claims,
        },
        expires_at,
        report,
        limits: limits_used,
    })
}

/// Whether a revocation in force names the token's `sub` or `jti`.
fn revoked(revocations: &Revocations, claims: &Claims) -> bool {
    revocations.revoked(claims.claim_str("sub"), claims.claim_str("jti"))
}

/// What an open connection was admitted with, so a new policy can be applied to it.
#[derive(Debug, Clone)]
pub struct Standing {
    pub path: String,
    pub client_ip: IpAddr,
    pub origin: Option<String>,
    pub claims: Option<Claims>,
}

/// Whether an open connection still passes `policy`'s route, IP, Origin and claims rules
/// (rates and caps are not re-applied).
pub fn recheck(policy: &Policy, standing: &Standing) -> Result<(), Rejection> {
    let route = policy.route_for(&standing.path).ok_or(Rejection::NoRoute)?;
    ip_rule(route, standing.client_ip)?;
    origin_rule(route, standing.origin.as_deref())?;
    claims_rule(&route.auth, standing.claims.as_ref())
}

// The rules an admitted connection must go on meeting, each written once: `admit` applies
// them in their places (the caps and the token's verification between them), `recheck`
// applies them to an open connection under a new policy.

/// The route's IP allow and deny lists.
fn ip_rule(route: &Route, client_ip: IpAddr) -> Result<(), Rejection> {
    if ip::allowed(route, client_ip) {
        Ok(())
    } else {
        Err(Rejection::IpDenied)
    }
}

/// The route's Origin rules (`None`: no Origin was sent).
fn origin_rule(route: &Route, origin: Option<&str>) -> Result<(), Rejection> {
    if origin::allowed(&route.origin, origin) {
        Ok(())
    } else {
        Err(Rejection::OriginNotAllowed)
    }
}

/// A token where the route requires one, and its claims as `require_claims` asks
/// (`None`: no verified token).
fn claims_rule(auth: &Auth, claims: Option<&Claims>) -> Result<(), Rejection> {
    match claims {
        None if auth.required => Err(Rejection::MissingToken),
        Some(claims)
            if !token::claims_allowed(claims, auth)
                || token::unforwardable_claim(&claims.map, auth).is_some() =>
        {
            Err(Rejection::ClaimsDenied)
        }
        _ => Ok(()),
    }
}
