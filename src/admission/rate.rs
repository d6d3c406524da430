//! Upgrade rates (a token bucket per route and client key, governor) and connection caps
//! (per client key and per token subject, RAII slots). Both tables are bounded: limiter
//! entries are evicted once their bucket is full again, cap entries when their count
//! drops to zero, so a flood of distinct addresses cannot grow them without limit.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use ipnet::IpNet;

use crate::policy::Route;

/// A limiter tracking more keys than this sweeps out its idle ones before counting a new one.
pub const MAX_TRACKED_KEYS: usize = 65_536;

/// At most one such inline sweep per this long, gate-wide: keys that are all recent (a
/// slow quota, many clients) would otherwise make every upgrade walk the whole table.
const INLINE_SWEEP_EVERY: Duration = Duration::from_millis(100);

/// `Retry-After` for a refused connection over a cap.
pub const CAP_RETRY_AFTER: Duration = Duration::from_secs(5);

#[derive(Clone, PartialEq, Eq, Hash)]
struct LimiterId {
    route: String,
    period_nanos: u128,
    burst: u32,
}

/// Upgrade-rate limiters by route. A limiter survives a reload that keeps its route's
/// quota, so reloading never hands a client a fresh bucket.
#[derive(Default)]
pub struct Limiters {
    by_route: Mutex<HashMap<LimiterId, Arc<DefaultKeyedRateLimiter<IpNet>>>>,
    /// When the last inline sweep ran.
    swept: Mutex<Option<Instant>>,
    inline_sweeps: AtomicU64,
}

impl Limiters {
    /// Count an upgrade from `key` on `route`; `Err` carries how long until one is allowed.
    pub fn check(&self, route: &Route, key: IpNet) -> Result<(), Duration> {
        let limiter = self.limiter(route);
        if limiter.len() >= MAX_TRACKED_KEYS && self.inline_sweep_due() {
            limiter.retain_recent();
            self.inline_sweeps.fetch_add(1, Ordering::Relaxed);
        }
        limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    fn limiter(&self, route: &Route) -> Arc<DefaultKeyedRateLimiter<IpNet>> {
        let period = crate::policy::upgrade_period(route.rate.upgrades_per_second);
        let id = LimiterId {
            route: route.name.clone(),
            period_nanos: period.as_nanos(),
            burst: route.rate.burst,
        };
        let mut map = self.by_route.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(id)
            .or_insert_with(|| {
                let burst = NonZeroU32::new(route.rate.burst).unwrap_or(NonZeroU32::MIN);
                let quota = Quota::with_period(period)
                    .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
                    .allow_burst(burst);
                Arc::new(DefaultKeyedRateLimiter::dashmap(quota))
            })
            .clone()
    }

    /// Drop idle keys everywhere, and limiters of routes the policy no longer has.
    pub fn sweep(&self, routes: &[Arc<Route>]) {
        let mut map = self.by_route.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|id, _| routes.iter().any(|r| r.name == id.route));
        for limiter in map.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    fn inline_sweep_due(&self) -> bool {
        // Another upgrade is deciding right now: that one sweeps, if it is time.
        let Ok(mut last) = self.swept.try_lock() else {
            return false;
        };
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < INLINE_SWEEP_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Inline sweeps so far (for tests).
    pub fn inline_sweeps(&self) -> u64 {
        self.inline_sweeps.load(Ordering::Relaxed)
    }

    /// Keys tracked across all limiters (for tests and the flood measurement).
    pub fn tracked_keys(&self) -> usize {
        let map = self.by_route.lock().unwrap_or_else(PoisonError::into_inner);
        map.values().map(|l| l.len()).sum()
    }
}

/// Open connections per (route, client key) and per (route, subject).
#[derive(Default)]
pub struct Caps {
    per_ip: Mutex<HashMap<(String, IpNet), u32>>,
    per_subject: Mutex<HashMap<(String, String), u32>>,
}

impl Caps {
    pub fn try_ip(self: &Arc<Self>, route: &str, key: IpNet, max: u32) -> Option<CapSlot> {
        let key = (route.to_owned(), key);
        acquire(&self.per_ip, &key, max).then(|| CapSlot {
            caps: self.clone(),
            key: CapKey::Ip(key),
        })
    }

    pub fn try_subject(self: &Arc<Self>, route: &str, subject: &str, max: u32) -> Option<CapSlot> {
        let key = (route.to_owned(), subject.to_owned());
        acquire(&self.per_subject, &key, max).then(|| CapSlot {
            caps: self.clone(),
            key: CapKey::Subject(key),
        })
    }

    /// Entries in both tables (each is a key with at least one open connection).
    pub fn tracked_keys(&self) -> usize {
        self.per_ip
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
            + self
                .per_subject
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len()
    }
}

fn acquire<K: Hash + Eq + Clone>(table: &Mutex<HashMap<K, u32>>, key: &K, max: u32) -> bool {
    let mut table = table.lock().unwrap_or_else(PoisonError::into_inner);
    match table.get_mut(key) {
        Some(count) if *count >= max => false,
        Some(count) => {
            *count += 1;
            true
        }
        None if max == 0 => false,
        None => {
            table.insert(key.clone(), 1);
            true
        }
    }
}

fn release<K: Hash + Eq>(table: &Mutex<HashMap<K, u32>>, key: &K) {
    let mut table = table.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(count) = table.get_mut(key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            table.remove(key);
        }
    }
}

enum CapKey {
    Ip((String, IpNet)),
    Subject((String, String)),
}

/// One connection's place under a cap, released however the connection ends.
pub struct CapSlot {
    caps: Arc<Caps>,
    key: CapKey,
}

impl std::fmt::Debug for CapSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CapSlot")
    }
}

impl Drop for CapSlot {
    fn drop(&mut self) {
        match &self.key {
            CapKey::Ip(key) => release(&self.caps.per_ip, key),
            CapKey::Subject(key) => release(&self.caps.per_subject, key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past `MAX_TRACKED_KEYS` keys that are all recent (a slow quota), the inline sweep
    /// finds nothing to drop: it runs at most once per `INLINE_SWEEP_EVERY`, not on every
    /// upgrade.
    #[test]
    fn a_full_table_of_recent_keys_is_not_swept_on_every_upgrade() {
        let yaml = "version: 1\ndefaults: {auth: {required: false}, rate: {upgrades_per_second: 0.01, burst: 1}}\nroutes:\n  - path: /ws\n";
        let loaded =
            crate::config::load_bytes(std::path::Path::new("p.yaml"), yaml.as_bytes()).unwrap();
        let route = &loaded.policy.routes[0];
        let limiters = Limiters::default();
        for i in 0..=MAX_TRACKED_KEYS as u32 {
            let key = IpNet::from(std::net::IpAddr::from((0x0a00_0000 + i).to_be_bytes()));
            let _ = limiters.check(route, key);
        }
        let started = Instant::now();
        let key: IpNet = "192.0.2.1/32".parse().unwrap();
        let before = limiters.inline_sweeps();
        for _ in 0..500 {
            let _ = limiters.check(route, key);
        }
        let allowed =
            1 + started.elapsed().as_millis() as u64 / INLINE_SWEEP_EVERY.as_millis() as u64;
        let swept = limiters.inline_sweeps() - before;
        assert!(
            swept <= allowed,
            "{swept} sweeps for 500 upgrades, at most {allowed}"
        );
        assert!(limiters.tracked_keys() > MAX_TRACKED_KEYS);
    }

    #[test]
    fn caps_release_and_evict() {
        let caps = Arc::new(Caps::default());
        let key: IpNet = "10.0.0.1/32".parse().unwrap();
        let a = caps.try_ip("r", key, 2).unwrap();
        let b = caps.try_ip("r", key, 2).unwrap();
        assert!(caps.try_ip("r", key, 2).is_none());
        drop(a);
        let c = caps.try_ip("r", key, 2).unwrap();
        drop((b, c));
        assert_eq!(caps.tracked_keys(), 0);
    }
}
