//! The open connections of this gate, for the operator API: who holds a socket (route,
//! client IP, `sub`, protocol, when it opened, what it has relayed), and a way to close
//! some of them now.
//!
//! Nothing here is on the message path. A connection is registered once, when its upgrade
//! is admitted, and removed once, when its relay ends (a sharded `Mutex<HashMap>`, touched
//! only then and by the operator's requests). The relay publishes its message and byte
//! counts into the entry's atomics once per read from a socket — plain relaxed stores of
//! the counts it already keeps.
//!
//! The entry is also how the relay hears of what it seldom waits for: the operator's close
//! request, the shutdown and a policy change are [`Signal`]s raised on it (the last two on
//! every entry at once), which wake the relay's task. An idle connection so holds one
//! waker slot for all three instead of a waiter on each of their sources, and its relay
//! checks one atomic when it wakes for a message.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use ipnet::IpNet;

/// Shards of the registry's map: concurrent opens and closes rarely wait on each other.
const SHARDS: usize = 16;

/// Messages and bytes relayed in one direction, as last published by the relay.
#[derive(Debug, Default)]
pub struct LiveCounts {
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
}

impl LiveCounts {
    /// Publish the relay's running totals (relaxed: readers want a recent value, not an
    /// ordering with anything else).
    pub fn publish(&self, messages: u64, bytes: u64) {
        self.messages.store(messages, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    fn read(&self) -> (u64, u64) {
        (
            self.messages.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// What an open connection is, for the listing and for matching close requests.
#[derive(Debug, Clone)]
pub struct Opened {
    pub route: String,
    pub client_ip: IpAddr,
    /// The verified token's `sub`, if any.
    pub sub: Option<String>,
    /// The verified token's `jti`, if any (matched by revocations, never listed).
    pub jti: Option<String>,
    /// `http/1.1` or `h2`.
    pub protocol: &'static str,
}

/// What a connection's relay is asked to do besides relaying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The operator closed it (1008 "revoked"). Stays raised.
    Revoked,
    /// The gate is shutting down (1001 "going away"). Stays raised.
    Drain,
    /// A new policy is in force: re-check the connection against it. Taken once per raise.
    Policy,
}

impl Signal {
    fn bit(self) -> u8 {
        match self {
            Signal::Revoked => 1,
            Signal::Drain => 2,
            Signal::Policy => 4,
        }
    }
}

/// The signals raised on an entry, as its relay took them.
#[derive(Debug, Clone, Copy)]
pub struct Raised(u8);

impl Raised {
    pub fn has(self, signal: Signal) -> bool {
        self.0 & signal.bit() != 0
    }
}

/// One open connection: what it is, its live counts, and the signals for its relay.
#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    pub opened: Opened,
    pub opened_at_unix: u64,
    /// Client → upstream ("in").
    pub inbound: LiveCounts,
    /// Upstream → client ("out").
    pub outbound: LiveCounts,
    /// [`Signal`] bits raised and not yet taken.
    signals: AtomicU8,
    /// The relay's task, woken when a signal is raised.
    task: AtomicWaker,
}

impl Entry {
    fn new(id: u64, opened: Opened) -> Entry {
        Entry {
            id,
            opened,
            opened_at_unix: unix_now(),
            inbound: LiveCounts::default(),
            outbound: LiveCounts::default(),
            signals: AtomicU8::new(0),
            task: AtomicWaker::new(),
        }
    }

    /// Raise `signal` and wake the relay; whether it was not raised already.
    pub fn raise(&self, signal: Signal) -> bool {
        let before = self.signals.fetch_or(signal.bit(), Ordering::AcqRel);
        self.task.wake();
        before & signal.bit() == 0
    }

    /// Whether `signal` is raised (and not taken).
    pub fn is_raised(&self, signal: Signal) -> bool {
        Raised(self.signals.load(Ordering::Acquire)).has(signal)
    }

    /// The signals raised, taking [`Signal::Policy`]; pending, with the task woken at the
    /// next raise, while there are none. One atomic load when none is raised.
    pub fn poll_raised(&self, cx: &mut Context<'_>) -> Poll<Raised> {
        self.task.register(cx.waker());
        if self.signals.load(Ordering::Acquire) == 0 {
            return Poll::Pending;
        }
        let raised = self
            .signals
            .fetch_and(!Signal::Policy.bit(), Ordering::AcqRel);
        Poll::Ready(Raised(raised))
    }

    /// Ask the relay to close this connection; whether this request was the first.
    fn revoke(&self) -> bool {
        self.raise(Signal::Revoked)
    }

    pub fn listing(&self) -> serde_json::Value {
        let (messages_in, bytes_in) = self.inbound.read();
        let (messages_out, bytes_out) = self.outbound.read();
        serde_json::json!({
            "id": self.id,
            "route": self.opened.route,
            "client_ip": self.opened.client_ip.to_string(),
            "sub": self.opened.sub,
            "protocol": self.opened.protocol,
            "opened_at_unix": self.opened_at_unix,
            "messages_in": messages_in,
            "bytes_in": bytes_in,
            "messages_out": messages_out,
            "bytes_out": bytes_out,
        })
    }
}

/// Which connections a listing or a close request is about. Every field set must match.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub id: Option<u64>,
    pub route: Option<String>,
    pub sub: Option<String>,
    pub jti: Option<String>,
    pub ip: Option<IpNet>,
}

impl Filter {
    /// What the filter matches on, for a log line: its first field that is set (an
    /// operator's close sets exactly one), as `("sub", "alice")`.
    pub fn parts(&self) -> (&'static str, String) {
        if let Some(id) = self.id {
            ("id", id.to_string())
        } else if let Some(route) = &self.route {
            ("route", route.clone())
        } else if let Some(sub) = &self.sub {
            ("sub", sub.clone())
        } else if let Some(jti) = &self.jti {
            ("jti", jti.clone())
        } else if let Some(ip) = &self.ip {
            ("ip", ip.to_string())
        } else {
            ("all", String::new())
        }
    }

    /// The connections whose token a revocation of `which` matches.
    pub fn revoked(which: &crate::revocations::Revoked) -> Filter {
        use crate::revocations::Revoked;
        match which {
            Revoked::Sub(s) => Filter {
                sub: Some(s.clone()),
                ..Filter::default()
            },
            Revoked::Jti(j) => Filter {
                jti: Some(j.clone()),
                ..Filter::default()
            },
        }
    }

    pub fn matches(&self, entry: &Entry) -> bool {
        let o = &entry.opened;
        self.id.is_none_or(|id| id == entry.id)
            && self.route.as_ref().is_none_or(|r| *r == o.route)
            && self.sub.as_ref().is_none_or(|s| o.sub.as_ref() == Some(s))
            && self.jti.as_ref().is_none_or(|j| o.jti.as_ref() == Some(j))
            && self.ip.is_none_or(|net| net.contains(&o.client_ip))
    }
}

/// The open connections of one gate.
#[derive(Debug)]
pub struct Registry {
    next_id: AtomicU64,
    shards: [Mutex<HashMap<u64, Arc<Entry>>>; SHARDS],
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            next_id: AtomicU64::new(1),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }
}

impl Registry {
    fn shard(&self, id: u64) -> MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        // Ids are sequential: the id itself spreads them over the shards.
        let shard = &self.shards[(id as usize) % SHARDS];
        // A panic while holding a shard cannot leave the map half-changed (insert and
        // remove are single calls): a poisoned shard is used as it is.
        shard.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register an open connection; it leaves the registry when the returned guard drops.
    pub fn register(self: &Arc<Self>, opened: Opened) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry::new(id, opened));
        self.shard(id).insert(id, entry.clone());
        Registered {
            registry: self.clone(),
            entry,
        }
    }

    /// Every open connection matching `filter`.
    pub fn matching(&self, filter: &Filter) -> Vec<Arc<Entry>> {
        let mut found = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            found.extend(shard.values().filter(|e| filter.matches(e)).cloned());
        }
        found
    }

    /// Ask every open connection matching `filter` to close (1008 "revoked"); how many
    /// were not already closing.
    pub fn close(&self, filter: &Filter) -> usize {
        self.matching(filter).iter().filter(|e| e.revoke()).count()
    }

    /// [`Registry::close`] for many revocations at once, in one pass over the connections:
    /// those whose token's `sub` is in `subs` or whose `jti` is in `jtis`.
    pub fn close_revoked(&self, subs: &HashSet<String>, jtis: &HashSet<String>) -> usize {
        if subs.is_empty() && jtis.is_empty() {
            return 0;
        }
        let listed = |value: &Option<String>, set: &HashSet<String>| {
            value.as_ref().is_some_and(|v| set.contains(v))
        };
        let mut found = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            found.extend(
                shard
                    .values()
                    .filter(|e| listed(&e.opened.sub, subs) || listed(&e.opened.jti, jtis))
                    .cloned(),
            );
        }
        found.iter().filter(|e| e.revoke()).count()
    }

    /// Raise `signal` on every open connection (the shutdown, a new policy).
    pub fn raise_all(&self, signal: Signal) {
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for entry in shard.values() {
                entry.raise(signal);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection's place in the registry, held for the connection's life.
#[derive(Debug)]
pub struct Registered {
    registry: Arc<Registry>,
    entry: Arc<Entry>,
}

impl Registered {
    pub fn entry(&self) -> &Arc<Entry> {
        &self.entry
    }

    /// Close this connection now (it was revoked before its relay started).
    pub fn revoke(&self) {
        self.entry.revoke();
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.shard(self.entry.id).remove(&self.entry.id);
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(sub: &str, ip: &str) -> Opened {
        Opened {
            route: "ws".into(),
            client_ip: ip.parse().unwrap(),
            sub: Some(sub.into()),
            jti: None,
            protocol: "http/1.1",
        }
    }

    #[test]
    fn register_match_close_and_leave() {
        let registry = Arc::new(Registry::default());
        let a = registry.register(opened("alice", "10.0.0.1"));
        let b = registry.register(opened("bob", "10.0.1.1"));
        assert_eq!(registry.len(), 2);
        let alice = Filter {
            sub: Some("alice".into()),
            ..Filter::default()
        };
        assert_eq!(registry.matching(&alice).len(), 1);
        let net = Filter {
            ip: Some("10.0.0.0/24".parse().unwrap()),
            ..Filter::default()
        };
        assert_eq!(registry.matching(&net)[0].id, a.entry().id);
        assert_eq!(registry.close(&alice), 1);
        assert_eq!(registry.close(&alice), 0, "already closing");
        assert!(a.entry().is_raised(Signal::Revoked));
        assert!(!b.entry().is_raised(Signal::Revoked));
        drop(a);
        assert_eq!(registry.len(), 1);
        drop(b);
        assert!(registry.is_empty());
    }

    /// A relay sees each raise: a policy change once per raise, the drain and a close for
    /// good; the raise wakes the task that last polled.
    #[test]
    fn signals_wake_the_relay_and_a_policy_change_is_taken_once() {
        use std::sync::atomic::AtomicUsize;
        use std::task::{Wake, Waker};
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);

        let registry = Arc::new(Registry::default());
        let a = registry.register(opened("alice", "10.0.0.1"));
        let entry = a.entry().clone();
        assert!(entry.poll_raised(&mut cx).is_pending());

        registry.raise_all(Signal::Policy);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        let Poll::Ready(raised) = entry.poll_raised(&mut cx) else {
            panic!("a policy change not seen");
        };
        assert!(raised.has(Signal::Policy) && !raised.has(Signal::Drain));
        assert!(entry.poll_raised(&mut cx).is_pending(), "taken once");

        registry.raise_all(Signal::Drain);
        assert_eq!(woken.0.load(Ordering::SeqCst), 2);
        for _ in 0..2 {
            let Poll::Ready(raised) = entry.poll_raised(&mut cx) else {
                panic!("the drain not seen");
            };
            assert!(raised.has(Signal::Drain) && !raised.has(Signal::Policy));
        }
        assert!(entry.raise(Signal::Revoked), "a first close");
        assert!(!entry.raise(Signal::Revoked), "already closing");
    }
}
