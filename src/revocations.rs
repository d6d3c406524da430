//! Revoked token subjects (`sub`) and token ids (`jti`), each until its own expiry: a
//! token matching one is refused at admission (`token_revoked`). Bounded at
//! [`MAX_REVOCATIONS`]; expired entries are never enforced and are evicted by the gate's
//! upkeep loop, by each new revocation that would not fit, and before each metrics scrape.
//! Eviction walks the lists only once something has expired: until the soonest expiry, it
//! is one comparison, so that scrapes (which anyone who reaches the admin port may send)
//! never hold admission's lock for a walk of 100,000 entries.
//!
//! Admission asks on every verified token: with none in force the answer is one atomic
//! load; otherwise one lock and one or two hash lookups.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;

/// At most this many revocations are in force at once.
pub const MAX_REVOCATIONS: usize = 100_000;
/// The longest a revocation can last: 30 days.
pub const MAX_TTL_SECONDS: u64 = 2_592_000;

/// The longest `sub` or `jti` a revocation names, in bytes: with [`MAX_REVOCATIONS`] in
/// force the table then holds about 100 MiB at most. Issuers' subjects and token ids are
/// far shorter (a UUID is 36 bytes, an Auth0 `sub` about 40).
pub const MAX_REVOKED_BYTES: usize = 1024;

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    Sub(String),
    Jti(String),
}

impl Revoked {
    /// The JSON key it is listed under (`sub` or `jti`) and its value.
    pub fn parts(&self) -> (&'static str, &str) {
        match self {
            Revoked::Sub(s) => ("sub", s),
            Revoked::Jti(j) => ("jti", j),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Expiry {
    at: Instant,
    unix: u64,
    /// Known to the cluster store (made through it, or shared once made here): a reload
    /// from the store that no longer holds it lifts it (it was lifted while this gate was
    /// cut off). One made here while the store was unreachable stays until it expires.
    shared: bool,
    /// When it was added, so that a reload drops only what it could have seen.
    added: Instant,
}

#[derive(Debug, Default)]
struct Maps {
    subs: HashMap<String, Expiry>,
    jtis: HashMap<String, Expiry>,
    /// No entry expires before this (`None`: none is held). It may be earlier than the
    /// soonest entry's expiry (after a lift or a renewal), never later.
    soonest: Option<Instant>,
}

impl Maps {
    fn len(&self) -> usize {
        self.subs.len() + self.jtis.len()
    }

    fn map<'a>(&mut self, which: &'a Revoked) -> (&mut HashMap<String, Expiry>, &'a str) {
        match which {
            Revoked::Sub(s) => (&mut self.subs, s),
            Revoked::Jti(j) => (&mut self.jtis, j),
        }
    }

    fn evict(&mut self, now: Instant) {
        if self.soonest.is_none_or(|soonest| soonest > now) {
            return;
        }
        self.subs.retain(|_, e| e.at > now);
        self.jtis.retain(|_, e| e.at > now);
        self.soonest = self
            .subs
            .values()
            .chain(self.jtis.values())
            .map(|e| e.at)
            .min();
    }
}

/// The revocation list was full.
#[derive(Debug, thiserror::Error)]
#[error("{MAX_REVOCATIONS} revocations are already in force")]
pub struct Full;

/// The revocations in force on this gate.
#[derive(Debug)]
pub struct Revocations {
    maps: Mutex<Maps>,
    /// How many entries the maps hold (expired ones included until evicted): zero lets
    /// admission skip the lock.
    held: AtomicUsize,
    /// `wsgate_revocations_active`.
    active: Gauge,
}

impl Revocations {
    pub fn new(active: Gauge) -> Revocations {
        Revocations {
            maps: Mutex::new(Maps::default()),
            held: AtomicUsize::new(0),
            active,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        // Every change is one map call: a poisoned lock holds consistent maps.
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn counted(&self, maps: &Maps) {
        self.held.store(maps.len(), Ordering::Release);
        self.active.set(maps.len() as i64);
    }

    /// Revoke `which` for `ttl` from now (replacing the expiry of the same revocation if
    /// it is already in force); returns the expiry as Unix seconds.
    pub fn add(&self, which: Revoked, ttl: Duration) -> Result<u64, Full> {
        let now = Instant::now();
        let expiry = Expiry {
            at: now + ttl,
            // Rounded up: the revocation is in force at least until then.
            unix: unix_now_secs_f64().add_ceil(ttl),
            shared: false,
            added: now,
        };
        self.insert(which, expiry, now)
    }

    /// Revoke `which` until `expires_at_unix`, as the cluster store has it (shared). The
    /// store is not trusted with the bound: an expiry past the longest revocation any gate
    /// makes counts as that long from now.
    pub fn add_shared(&self, which: Revoked, expires_at_unix: u64) -> Result<u64, Full> {
        let now = Instant::now();
        let left =
            (expires_at_unix as f64 - unix_now_secs_f64().0).clamp(0.0, MAX_TTL_SECONDS as f64);
        let expiry = Expiry {
            at: now
                + Duration::try_from_secs_f64(left).unwrap_or(Duration::from_secs(MAX_TTL_SECONDS)),
            unix: expires_at_unix
                .min(unix_now_secs_f64().add_ceil(Duration::from_secs(MAX_TTL_SECONDS))),
            shared: true,
            added: now,
        };
        self.insert(which, expiry, now)
    }

    /// The store took a revocation made here: a later reload may lift it.
    pub fn mark_shared(&self, which: &Revoked) {
        let mut maps = self.lock();
        let (map, key) = maps.map(which);
        if let Some(expiry) = map.get_mut(key) {
            expiry.shared = true;
        }
    }

    /// The gate follows another store (its URL or key prefix changed): the revocations it
    /// shared with the old one are that fleet's and are lifted here, so that they are
    /// neither applied against the new fleet's view nor written into its store. Those
    /// never shared (made here while no store took them) stay. Returns how many.
    pub fn forget_shared(&self) -> usize {
        let mut maps = self.lock();
        let before = maps.len();
        maps.subs.retain(|_, e| !e.shared);
        maps.jtis.retain(|_, e| !e.shared);
        let forgotten = before - maps.len();
        self.counted(&maps);
        forgotten
    }

    /// After a full reload from the store, which found `present`: lift the shared
    /// revocations added before `since` that it no longer holds (lifted on another gate
    /// while this one was cut off). Returns how many.
    pub fn keep_only_shared(&self, present: &[Revoked], since: Instant) -> usize {
        let (mut subs, mut jtis) = (HashSet::new(), HashSet::new());
        for which in present {
            match which {
                Revoked::Sub(s) => subs.insert(s.as_str()),
                Revoked::Jti(j) => jtis.insert(j.as_str()),
            };
        }
        let mut maps = self.lock();
        let before = maps.len();
        let stale = |e: &Expiry| e.shared && e.added < since;
        maps.subs
            .retain(|k, e| !stale(e) || subs.contains(k.as_str()));
        maps.jtis
            .retain(|k, e| !stale(e) || jtis.contains(k.as_str()));
        let lifted = before - maps.len();
        self.counted(&maps);
        lifted
    }

    fn insert(&self, which: Revoked, expiry: Expiry, now: Instant) -> Result<u64, Full> {
        let mut maps = self.lock();
        let present = {
            let (map, key) = maps.map(&which);
            map.contains_key(key)
        };
        if !present && maps.len() >= MAX_REVOCATIONS {
            maps.evict(now);
            if maps.len() >= MAX_REVOCATIONS {
                self.counted(&maps);
                return Err(Full);
            }
        }
        let (map, _) = maps.map(&which);
        let key = match which {
            Revoked::Sub(s) | Revoked::Jti(s) => s,
        };
        map.insert(key, expiry);
        maps.soonest = Some(maps.soonest.map_or(expiry.at, |s| s.min(expiry.at)));
        self.counted(&maps);
        Ok(expiry.unix)
    }

    /// Lift a revocation; whether one was in force.
    pub fn lift(&self, which: &Revoked) -> bool {
        let now = Instant::now();
        let mut maps = self.lock();
        let (map, key) = maps.map(which);
        let lifted = map.remove(key).is_some_and(|e| e.at > now);
        self.counted(&maps);
        lifted
    }

    /// Whether a token with this `sub` and `jti` is revoked now.
    pub fn revoked(&self, sub: Option<&str>, jti: Option<&str>) -> bool {
        if self.held.load(Ordering::Acquire) == 0 {
            return false;
        }
        let now = Instant::now();
        let maps = self.lock();
        let live = |map: &HashMap<String, Expiry>, key: Option<&str>| {
            key.and_then(|k| map.get(k)).is_some_and(|e| e.at > now)
        };
        live(&maps.subs, sub) || live(&maps.jtis, jti)
    }

    /// Drop expired revocations (and bring the gauge up to date).
    pub fn evict(&self) {
        if self.held.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut maps = self.lock();
        maps.evict(Instant::now());
        self.counted(&maps);
    }

    /// Those in force, soonest to expire first: (what, expiry as Unix seconds).
    pub fn list(&self) -> Vec<(Revoked, u64)> {
        let now = Instant::now();
        let maps = self.lock();
        let mut all: Vec<(Revoked, Instant, u64)> = maps
            .subs
            .iter()
            .map(|(k, e)| (Revoked::Sub(k.clone()), e.at, e.unix))
            .chain(
                maps.jtis
                    .iter()
                    .map(|(k, e)| (Revoked::Jti(k.clone()), e.at, e.unix)),
            )
            .filter(|(_, at, _)| *at > now)
            .collect();
        drop(maps);
        all.sort_by_key(|(_, at, _)| *at);
        all.into_iter().map(|(r, _, unix)| (r, unix)).collect()
    }
}

/// Now as fractional Unix seconds.
struct UnixNow(f64);

fn unix_now_secs_f64() -> UnixNow {
    UnixNow(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    )
}

impl UnixNow {
    fn add_ceil(self, ttl: Duration) -> u64 {
        (self.0 + ttl.as_secs_f64()).ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An expiry from the store past anything a gate makes (a value written by hand, or
    /// by another fleet sharing the Redis) is held to the longest revocation, not an
    /// overflow.
    #[test]
    fn an_expiry_from_the_store_is_held_to_the_longest_revocation() {
        let r = Revocations::new(Gauge::default());
        let until = r
            .add_shared(Revoked::Sub("forever".into()), u64::MAX)
            .unwrap();
        assert!(r.revoked(Some("forever"), None));
        let longest = unix_now_secs_f64().add_ceil(Duration::from_secs(MAX_TTL_SECONDS));
        assert!(until <= longest, "{until} past {longest}");
        r.add_shared(Revoked::Jti("far".into()), 18_000_000_000_000_000_000)
            .unwrap();
        assert!(r.revoked(None, Some("far")));
    }

    /// A reload from the store lifts the shared revocations it no longer holds (lifted on
    /// another gate meanwhile), and keeps those made here unshared and those added since.
    #[test]
    fn a_reload_lifts_what_the_store_no_longer_holds() {
        let r = Revocations::new(Gauge::default());
        let far = unix_now_secs_f64().add_ceil(Duration::from_secs(600));
        r.add_shared(Revoked::Sub("lifted-elsewhere".into()), far)
            .unwrap();
        r.add_shared(Revoked::Jti("still-there".into()), far)
            .unwrap();
        r.add(
            Revoked::Sub("made-here-unshared".into()),
            Duration::from_secs(600),
        )
        .unwrap();
        r.add(
            Revoked::Sub("made-here-shared".into()),
            Duration::from_secs(600),
        )
        .unwrap();
        r.mark_shared(&Revoked::Sub("made-here-shared".into()));
        let since = Instant::now();
        r.add_shared(Revoked::Sub("added-during-the-load".into()), far)
            .unwrap();
        let lifted = r.keep_only_shared(&[Revoked::Jti("still-there".into())], since);
        assert_eq!(lifted, 2);
        assert!(!r.revoked(Some("lifted-elsewhere"), None));
        assert!(!r.revoked(Some("made-here-shared"), None));
        assert!(r.revoked(None, Some("still-there")));
        assert!(r.revoked(Some("made-here-unshared"), None));
        assert!(r.revoked(Some("added-during-the-load"), None));
        // The store's expiry is kept exactly (not re-rounded from a TTL).
        let listed = r.list();
        assert!(listed
            .iter()
            .all(|(_, unix)| *unix == far || *unix >= far - 1));
        assert!(listed
            .iter()
            .any(|(w, unix)| *w == Revoked::Jti("still-there".into()) && *unix == far));
    }

    #[test]
    fn add_check_lift_expire() {
        let gauge = Gauge::default();
        let r = Revocations::new(gauge.clone());
        assert!(!r.revoked(Some("alice"), None));
        r.add(Revoked::Sub("alice".into()), Duration::from_secs(60))
            .unwrap();
        r.add(Revoked::Jti("j1".into()), Duration::from_millis(1))
            .unwrap();
        assert_eq!(gauge.get(), 2);
        assert!(r.revoked(Some("alice"), None));
        assert!(!r.revoked(Some("bob"), Some("j2")));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!r.revoked(None, Some("j1")), "expired");
        assert_eq!(r.list().len(), 1);
        r.evict();
        assert_eq!(gauge.get(), 1);
        assert!(r.lift(&Revoked::Sub("alice".into())));
        assert!(!r.lift(&Revoked::Sub("alice".into())));
        assert_eq!(gauge.get(), 0);
    }

    /// Eviction waits for the soonest expiry, then drops exactly what has expired.
    #[test]
    fn eviction_waits_for_the_soonest_expiry() {
        let r = Revocations::new(Gauge::default());
        let start = Instant::now();
        for (name, seconds) in [("b", 20), ("a", 10), ("c", 30)] {
            r.add(Revoked::Sub(name.into()), Duration::from_secs(seconds))
                .unwrap();
        }
        let mut maps = r.lock();
        let soonest = maps.soonest.unwrap();
        assert!(soonest >= start + Duration::from_secs(10));
        assert!(soonest < start + Duration::from_secs(11));
        maps.evict(start + Duration::from_secs(9));
        assert_eq!(maps.len(), 3);
        maps.evict(start + Duration::from_secs(15));
        assert_eq!(maps.len(), 2);
        assert!(maps.soonest.unwrap() >= start + Duration::from_secs(20));
        maps.evict(start + Duration::from_secs(31));
        assert_eq!((maps.len(), maps.soonest), (0, None));
    }

    #[test]
    fn bounded() {
        let r = Revocations::new(Gauge::default());
        for i in 0..MAX_REVOCATIONS {
            r.add(Revoked::Jti(i.to_string()), Duration::from_secs(60))
                .unwrap();
        }
        assert!(r
            .add(Revoked::Sub("one more".into()), Duration::from_secs(60))
            .is_err());
        // Renewing one already in force still works.
        assert!(r
            .add(Revoked::Jti("7".into()), Duration::from_secs(120))
            .is_ok());
    }
}
