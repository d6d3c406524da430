//! Revocations shared by the fleet: each is stored as a key with its TTL
//! (`<prefix>revoked:sub:<value>` or `…:jti:<value>`, holding its expiry as Unix seconds)
//! and published on `<prefix>revocations`. Every gate subscribes (its own connection,
//! re-established after a failure or when the store comes back), loads the revocations
//! still in force each time it (re)subscribes, and applies each message: revoke and close
//! the matching connections, or lift.
//!
//! A gate that was cut off from the store misses the lifts made meanwhile; its reload
//! lifts the shared revocations the store no longer holds. Unless the store itself lost
//! them (restarted empty): `<prefix>revocations:epoch`, a value the first gate to load sets,
//! tells the two apart. When it is not the value this gate saw at its last load, the store
//! is new to it, and the revocations in force here are stored again instead of lifted. A
//! store that loses its data while its connections stay up (`FLUSHALL`) is found by the
//! renewals, which read the epoch too, and loaded again at once.
//!
//! When a revocation ends is the store's TTL, not the clock of the gate that made it: a
//! message carries the time left, and a load reads each key's TTL, so gates whose clocks
//! disagree still agree on it. (The expiry each key holds, and each message's
//! `expires_at_unix`, are kept for gates that read them.)

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{Cluster, Store, StoreError};
use crate::registry::Filter;
use crate::revocations::Revoked;

/// How long the epoch key lives without a load refreshing it (every gate refreshes it at
/// each load): the longest a revocation can last.
const EPOCH_SECONDS: u64 = crate::revocations::MAX_TTL_SECONDS;

/// Keys read per SCAN while loading the revocations in force.
const SCAN_COUNT: usize = 1_000;
/// After the subscription fails, how long before it is tried again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// One message on the channel.
#[derive(Debug, Serialize, Deserialize)]
struct Message {
    op: Op,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at_unix: Option<u64>,
    /// Seconds left, from the store's TTL: what a receiving gate goes by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttl_seconds: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Op {
    Revoke,
    Lift,
}

impl Message {
    /// A revocation until `expires_at_unix` on this gate's clock, `ttl_seconds` from now
    /// (`None` for a lift).
    fn new(op: Op, which: &Revoked, until: Option<(u64, u64)>) -> Message {
        let (sub, jti) = match which {
            Revoked::Sub(s) => (Some(s.clone()), None),
            Revoked::Jti(j) => (None, Some(j.clone())),
        };
        Message {
            op,
            sub,
            jti,
            expires_at_unix: until.map(|(unix, _)| unix),
            ttl_seconds: until.map(|(_, ttl)| ttl),
        }
    }

    /// When the revocation ends on this gate's clock: `now` plus the time left, or (from
    /// a gate that sends no `ttl_seconds`) the sender's expiry.
    fn expires(&self, now: u64) -> Option<u64> {
        match self.ttl_seconds {
            Some(ttl) => Some(now.saturating_add(ttl)),
            None => self.expires_at_unix,
        }
    }

    fn which(&self) -> Option<Revoked> {
        match (&self.sub, &self.jti) {
            (Some(s), None) => Some(Revoked::Sub(s.clone())),
            (None, Some(j)) => Some(Revoked::Jti(j.clone())),
            _ => None,
        }
    }
}

fn key(prefix: &str, which: &Revoked) -> String {
    let (kind, value) = which.parts();
    format!("{prefix}revoked:{kind}:{value}")
}

fn channel(prefix: &str) -> String {
    format!("{prefix}revocations")
}

/// The key of the store's revocation epoch.
pub(super) fn epoch_key(prefix: &str) -> String {
    format!("{prefix}revocations:epoch")
}

/// Add the publication of `message` on the channel of `prefix` to `pipe`.
fn publish_in(pipe: &mut redis::Pipeline, prefix: &str, message: &Message) {
    let payload = serde_json::to_string(message).unwrap_or_default();
    pipe.publish(channel(prefix), payload).ignore();
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Cluster {
    /// Whether a store is configured (revocations are then shared).
    pub fn configured(&self) -> bool {
        self.store.load().is_some()
    }

    /// Store a revocation made on this gate and publish it to the others.
    pub async fn share_revocation(
        &self,
        which: &Revoked,
        ttl: Duration,
        expires_at_unix: u64,
    ) -> Result<(), StoreError> {
        let message = Message::new(Op::Revoke, which, Some((expires_at_unix, ttl.as_secs())));
        self.publish(message, |pipe, prefix| {
            pipe.set_ex(key(prefix, which), expires_at_unix, ttl.as_secs())
                .ignore();
        })
        .await
    }

    /// Remove a revocation from the store and tell the other gates.
    pub async fn share_lift(&self, which: &Revoked) -> Result<(), StoreError> {
        let message = Message::new(Op::Lift, which, None);
        self.publish(message, |pipe, prefix| {
            pipe.del(key(prefix, which)).ignore();
        })
        .await
    }

    async fn publish(
        &self,
        message: Message,
        write: impl FnOnce(&mut redis::Pipeline, &str),
    ) -> Result<(), StoreError> {
        let store = self.store.load_full().ok_or(StoreError::NoUrl)?;
        let mut conn = store.conn.clone().ok_or(StoreError::NoUrl)?;
        let prefix = &store.config.key_prefix;
        let mut pipe = redis::pipe();
        pipe.atomic();
        write(&mut pipe, prefix);
        publish_in(&mut pipe, prefix, &message);
        self.bounded(
            "revocation",
            store.background_bound(),
            pipe.query_async::<()>(&mut conn),
        )
        .await
    }

    /// Follow the channel of `store` until the store is replaced or the gate stops.
    pub(super) async fn subscribe(self: Arc<Self>, store: Arc<Store>) {
        loop {
            match self.follow(&store).await {
                Ok(()) => {}
                Err(e) => self.health.failed("revocation", &e),
            }
            tokio::select! {
                () = store.stop.cancelled() => return,
                () = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
            }
        }
    }

    /// Subscribe, load what is in force, then apply messages; returns when the
    /// subscription ends, or `Ok` when the store comes back after being down (so that a
    /// subscription that silently died is replaced) or is replaced.
    async fn follow(&self, store: &Store) -> Result<(), StoreError> {
        let client = store.client.as_ref().ok_or(StoreError::NoUrl)?;
        let within = store.background_bound();
        let bounded = |e: tokio::time::error::Elapsed| {
            let _ = e;
            StoreError::Timeout(within)
        };
        let mut pubsub = tokio::time::timeout(within, client.get_async_pubsub())
            .await
            .map_err(bounded)??;
        tokio::time::timeout(within, pubsub.subscribe(channel(&store.config.key_prefix)))
            .await
            .map_err(bounded)??;
        // After subscribing: a revocation published meanwhile is both loaded and received.
        self.load(store).await?;
        if !store.revocations_loaded.swap(true, Ordering::AcqRel) {
            store.loaded.notify_waiters();
        }
        // From here on (the load's own success may have been the store's way back up): the
        // next time the store comes back after being down, this subscription, which may
        // have died silently with it, is replaced.
        let back = self.health.back.notified();
        tokio::pin!(back);
        back.as_mut().enable();
        let lost = self.store_lost.notified();
        tokio::pin!(lost);
        lost.as_mut().enable();
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                () = store.stop.cancelled() => return Ok(()),
                () = &mut back => return Ok(()),
                () = &mut lost => return Ok(()),
                message = messages.next() => match message {
                    Some(message) => self.apply(message.get_payload_bytes()),
                    None => return Err(StoreError::SubscriptionEnded),
                },
            }
        }
    }

    /// Apply every revocation the store holds (SCAN, then the TTL of each key found).
    async fn load(&self, store: &Store) -> Result<(), StoreError> {
        let Some(mut conn) = store.conn.clone() else {
            return Err(StoreError::NoUrl);
        };
        let within = store.background_bound();
        let prefix = &store.config.key_prefix;
        let pattern = format!("{}revoked:*", glob_escape(prefix));
        let now = unix_now();
        let started = std::time::Instant::now();
        let epoch = self.epoch(store, &mut conn, within).await?;
        let answered = tokio::time::Instant::now();
        let known_store = {
            let mut last = self
                .revocation_epoch
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let known = last.as_ref().is_some_and(|(known, _)| *known == epoch);
            *last = Some((epoch, answered));
            known
        };
        let mut cursor: u64 = 0;
        let mut loaded = 0usize;
        let mut present = Vec::new();
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT);
            let scanned = scan.query_async::<(u64, Vec<Vec<u8>>)>(&mut conn);
            let (next, keys) = self.bounded("revocation", within, scanned).await?;
            if !keys.is_empty() {
                let mut ttls = redis::pipe();
                for key in &keys {
                    ttls.pttl(key);
                }
                let got = ttls.query_async::<Vec<i64>>(&mut conn);
                // Each ends when its key does: now plus its TTL, rounded up to the second
                // (a key gone since the SCAN, -2, or one without a TTL, -1, is none).
                let expiries = self
                    .bounded("revocation", within, got)
                    .await?
                    .into_iter()
                    .map(|ms| (ms > 0).then(|| now + (ms as u64).div_ceil(1000)));
                // The batch's revocations first, then one pass over the open connections
                // for all of them (not one per revocation: 100,000 of them against 10,000
                // connections would hold a worker for seconds).
                let (mut subs, mut jtis) = (HashSet::new(), HashSet::new());
                let mut full = false;
                for (key, expiry) in keys.iter().zip(expiries) {
                    let Some(expires) = expiry else {
                        continue;
                    };
                    let Some(which) = parse_key(prefix, key) else {
                        continue;
                    };
                    present.push(which.clone());
                    if self.revocations.add_shared(which.clone(), expires).is_err() {
                        full = true;
                        break;
                    }
                    match which {
                        Revoked::Sub(sub) => subs.insert(sub),
                        Revoked::Jti(jti) => jtis.insert(jti),
                    };
                    loaded += 1;
                }
                let closed = self.registry.close_revoked(&subs, &jtis);
                if closed > 0 {
                    tracing::info!(
                        closed,
                        "cluster: revocations loaded from the store; connections closed"
                    );
                }
                if full {
                    tracing::warn!("cluster: the revocation list is full; not all shared revocations are applied");
                    return Ok(());
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        if loaded > 0 {
            tracing::info!(
                loaded,
                "cluster: revocations in force loaded from the store"
            );
        }
        if known_store {
            // What the store no longer holds was lifted (or expired) while this gate was
            // not following it: lifted here too. Revocations made here while it was
            // unreachable were never shared, and stay.
            let lifted = self.revocations.keep_only_shared(&present, started);
            if lifted > 0 {
                tracing::info!(
                    lifted,
                    "cluster: revocations lifted on another gate while this one was cut off are lifted here"
                );
            }
            return Ok(());
        }
        // A store this gate has not loaded from before (its first load, or the store lost
        // its data): what is in force here and missing there is stored again, and
        // published, since gates that loaded the emptied store before this one found
        // nothing to load.
        let missing: Vec<(Revoked, u64)> = self
            .revocations
            .list()
            .into_iter()
            .filter(|(which, unix)| *unix > now && !present.contains(which))
            .collect();
        if !missing.is_empty() {
            let mut pipe = redis::pipe();
            for (which, unix) in &missing {
                pipe.set_ex(key(prefix, which), *unix, unix - now).ignore();
                publish_in(
                    &mut pipe,
                    prefix,
                    &Message::new(Op::Revoke, which, Some((*unix, unix - now))),
                );
            }
            let stored = pipe.query_async::<()>(&mut conn);
            self.bounded("revocation", within, stored).await?;
            for (which, _) in &missing {
                self.revocations.mark_shared(which);
            }
            tracing::info!(
                stored = missing.len(),
                "cluster: revocations in force here stored again (and published) in a store that had lost them"
            );
        }
        Ok(())
    }

    /// The store's revocation epoch: set (to a fresh value) by the first gate to ask, and
    /// kept alive by every load.
    async fn epoch(
        &self,
        store: &Store,
        conn: &mut redis::aio::ConnectionManager,
        within: Duration,
    ) -> Result<String, StoreError> {
        let name = epoch_key(&store.config.key_prefix);
        // Unique enough: host, process and the time to the nanosecond.
        let fresh = super::gate_id();
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&name)
            .arg(&fresh)
            .arg("NX")
            .arg("EX")
            .arg(EPOCH_SECONDS)
            .ignore()
            .expire(&name, EPOCH_SECONDS as i64)
            .ignore()
            .get(&name);
        let got = pipe.query_async::<(Option<String>,)>(conn);
        let (epoch,) = self.bounded("revocation", within, got).await?;
        Ok(epoch.unwrap_or(fresh))
    }

    /// Apply one message from the channel (a malformed one is ignored).
    fn apply(&self, payload: &[u8]) {
        let Ok(message) = serde_json::from_slice::<Message>(payload) else {
            tracing::warn!("cluster: ignoring a malformed revocation message");
            return;
        };
        let Some(which) = message.which() else {
            return;
        };
        match message.op {
            Op::Revoke => {
                let now = unix_now();
                let Some(expires) = message.expires(now).filter(|e| *e > now) else {
                    return;
                };
                if self
                    .revoke(
                        which,
                        expires,
                        "cluster: revoked on another gate; connections closed",
                    )
                    .is_err()
                {
                    tracing::warn!(
                        "cluster: the revocation list is full; a shared revocation is not applied"
                    );
                }
            }
            Op::Lift => {
                self.revocations.lift(&which);
            }
        }
    }

    /// Revoke here until `expires_at_unix` (the store's expiry, kept exactly) and close the
    /// matching connections, logging `said` when some were.
    fn revoke(
        &self,
        which: Revoked,
        expires_at_unix: u64,
        said: &'static str,
    ) -> Result<(), crate::revocations::Full> {
        self.revocations
            .add_shared(which.clone(), expires_at_unix)?;
        let closed = self.registry.close(&Filter::revoked(&which));
        if closed > 0 {
            let (kind, value) = which.parts();
            tracing::info!(kind, value = %crate::path::for_log(value), closed, "{said}");
        }
        Ok(())
    }
}

/// `text` matched literally in a SCAN pattern: Redis's glob characters escaped, so that
/// a `key_prefix` such as `ws[1]:` matches itself.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The revocation a stored key names.
fn parse_key(prefix: &str, key: &[u8]) -> Option<Revoked> {
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix(prefix)?.strip_prefix("revoked:")?;
    if let Some(sub) = rest.strip_prefix("sub:") {
        return Some(Revoked::Sub(sub.to_owned()));
    }
    rest.strip_prefix("jti:")
        .map(|jti| Revoked::Jti(jti.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_of_a_prefix_are_escaped() {
        assert_eq!(glob_escape("wsgate:"), "wsgate:");
        assert_eq!(glob_escape("ws[1]*?\\:"), "ws\\[1\\]\\*\\?\\\\:");
    }

    #[test]
    fn keys_round_trip() {
        let which = Revoked::Sub("a:b".into());
        let k = key("wsgate:", &which);
        assert_eq!(parse_key("wsgate:", k.as_bytes()), Some(which));
        assert_eq!(parse_key("other:", k.as_bytes()), None);
        let m = Message::new(Op::Revoke, &Revoked::Jti("j".into()), Some((5, 60)));
        let json = serde_json::to_string(&m).unwrap();
        let back: Message = serde_json::from_slice(json.as_bytes()).unwrap();
        assert_eq!(back.which(), Some(Revoked::Jti("j".into())));
        // The time left decides, whatever the sender's clock said.
        assert_eq!(back.expires(1_000), Some(1_060));
        // A message without it (from a gate before `ttl_seconds`): its expiry.
        let old: Message =
            serde_json::from_str(r#"{"op":"revoke","jti":"j","expires_at_unix":5}"#).unwrap();
        assert_eq!(old.expires(1_000), Some(5));
    }
}
