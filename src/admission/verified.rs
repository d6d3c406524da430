//! Tokens already verified, so that a reconnect storm (every client of a pod coming back at
//! once, each with the token it had) pays one signature check per token, not one per
//! upgrade.
//!
//! An entry is a token's claims, kept under the SHA-256 of the route's name and the token
//! (never the token itself), and it answers only while all of these hold:
//! - the route is the very one it was verified for: a reload makes new routes (and clears
//!   the table as well), so a changed key, issuer, audience or leeway is never bypassed;
//! - the route's fetched key sets have not changed since: every JWKS fetch or refetch
//!   moves [`JwksCache::generation`](super::jwks::JwksCache::generation) on;
//! - `exp` plus the leeway has not passed; the full verification then answers
//!   `token_expired`, as it would have.
//!
//! Only the signature and the standard claims are taken from here: everything decided
//! after them (required claims, the per-subject cap, …) is decided on every upgrade.
//! Failures are never kept.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use lru::LruCache;

use super::jwks::JwksCache;
use super::token::{self, Claims, MAX_TOKEN_BYTES};
use super::Rejection;
use crate::policy::Route;

/// Most entries kept; the least recently used goes first. A token's claims are a few
/// hundred bytes, so a full table is about a megabyte.
pub const CAPACITY: usize = 4096;

/// SHA-256 of the route's name, a zero byte and the token.
pub type Key = [u8; 32];

struct Entry {
    /// Held weakly: the route's memory is not reused while the entry exists, so comparing
    /// addresses is sound, and the entry keeps nothing of an old policy alive but that.
    route: Weak<Route>,
    /// The key-set generation the token was verified under.
    keys: u64,
    claims: Claims,
}

struct Inner {
    entries: LruCache<Key, Entry>,
    /// Moved on by every [`Verified::clear`]: a verification that began before a clear
    /// does not put its (possibly stale) answer in afterwards.
    epoch: u64,
}

/// The table; one per gate, shared by every route.
pub struct Verified {
    inner: Mutex<Inner>,
}

impl Default for Verified {
    fn default() -> Verified {
        let capacity = NonZeroUsize::new(CAPACITY).unwrap_or(NonZeroUsize::MIN);
        Verified {
            inner: Mutex::new(Inner {
                entries: LruCache::new(capacity),
                epoch: 0,
            }),
        }
    }
}

/// Where a verification began: the key it will be kept under and the generations it
/// began with.
pub struct Lookup {
    key: Key,
    keys: u64,
    epoch: u64,
}

impl Verified {
    /// [`token::verify`], answered from the table when this route already verified this
    /// token under the same key sets and it has not expired since.
    pub async fn verify(
        &self,
        token: &str,
        route: &Arc<Route>,
        jwks: &JwksCache,
    ) -> Result<Claims, Rejection> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Rejection::InvalidToken);
        }
        // The key-set generation is read before the keys are: a change during the
        // verification leaves an entry that the next lookup will not take.
        let lookup = match self.get(route, token, jwks.generation(), token::unix_now()) {
            Ok(claims) => return Ok(claims),
            Err(lookup) => lookup,
        };
        let claims = token::verify(token, &route.auth, jwks).await?;
        self.insert(lookup, route, &claims);
        Ok(claims)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The claims of `token` if it was verified for this `route`, under key-set
    /// generation `keys`, and has not expired by `now_unix`; otherwise where to keep the
    /// answer of the verification that must be done.
    pub fn get(
        &self,
        route: &Arc<Route>,
        token: &str,
        keys: u64,
        now_unix: u64,
    ) -> Result<Claims, Lookup> {
        let key = key(&route.name, token);
        let mut inner = self.lock();
        let lookup = Lookup {
            key,
            keys,
            epoch: inner.epoch,
        };
        let Some(entry) = inner.entries.get(&key) else {
            return Err(lookup);
        };
        let current = Weak::as_ptr(&entry.route) == Arc::as_ptr(route)
            && entry.keys == keys
            && entry.claims.exp.saturating_add(route.auth.leeway_seconds) > now_unix;
        if current {
            return Ok(entry.claims.clone());
        }
        inner.entries.pop(&key);
        Err(lookup)
    }

    /// Keep what a verification that began at `lookup` found, unless the table was
    /// cleared meanwhile.
    pub fn insert(&self, lookup: Lookup, route: &Arc<Route>, claims: &Claims) {
        let mut inner = self.lock();
        if inner.epoch != lookup.epoch {
            return;
        }
        inner.entries.put(
            lookup.key,
            Entry {
                route: Arc::downgrade(route),
                keys: lookup.keys,
                claims: claims.clone(),
            },
        );
    }

    /// Forget every entry (on a policy reload).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.entries.clear();
        inner.epoch += 1;
    }
}

fn key(route: &str, token: &str) -> Key {
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    digest.update(route.as_bytes());
    digest.update(&[0]);
    digest.update(token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.finish().as_ref());
    key
}
