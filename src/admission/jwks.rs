//! Key sets fetched from `jwks_url`s over HTTPS: cached across reloads, refreshed every
//! `refresh_seconds`, refetched when a token names an unknown `kid` (at most 4 times in 30 s).
//! A failed refresh keeps the last good set; until the first fetch succeeds the route's
//! tokens get 503 `keys_unavailable` and the fetch is retried with backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use crate::policy::parse_jwks;
use crate::policy::{redact_userinfo, Key, Policy};

/// Whole fetch: connect, TLS, request, body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest key set accepted.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Unknown `kid`s trigger at most [`UNKNOWN_KID_REFETCHES`] refetches per URL in this
/// period: enough for a rotation seen right after a token signed with a key not yet
/// published, too few for random `kid`s to make the gate hammer the issuer.
pub const UNKNOWN_KID_WINDOW: Duration = Duration::from_secs(30);
pub const UNKNOWN_KID_REFETCHES: usize = 4;
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid URL")]
    Url,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("HTTP status {0}")]
    Status(StatusCode),
    #[error("body larger than {MAX_JWKS_BYTES} bytes or unreadable")]
    Body,
    #[error("{0}")]
    Parse(String),
}

/// When the last unknown-`kid` refetches of one URL ended, and how the latest went.
#[derive(Default)]
struct Refetches {
    /// A ring of end times; `next` is the oldest slot, the one written next.
    ended: [Option<Instant>; UNKNOWN_KID_REFETCHES],
    next: usize,
    latest_succeeded: bool,
}

impl Refetches {
    fn latest(&self) -> Option<Instant> {
        let newest = (self.next + UNKNOWN_KID_REFETCHES - 1) % UNKNOWN_KID_REFETCHES;
        self.ended[newest]
    }

    /// Whether one more refetch fits the budget now.
    fn allowed(&self) -> bool {
        self.ended[self.next].is_none_or(|t| t.elapsed() >= UNKNOWN_KID_WINDOW)
    }

    fn record(&mut self, succeeded: bool) {
        self.ended[self.next] = Some(Instant::now());
        self.next = (self.next + 1) % UNKNOWN_KID_REFETCHES;
        self.latest_succeeded = succeeded;
    }
}

struct Entry {
    url: String,
    keys: ArcSwapOption<Vec<Key>>,
    refresh: Mutex<Duration>,
    refetches: tokio::sync::Mutex<Refetches>,
    stop: CancellationToken,
    /// The document `keys` was parsed from, to tell a fetch that changed nothing.
    body: Mutex<Bytes>,
    /// The cache's [`JwksCache::generation`], moved on when this set changes.
    generation: Arc<AtomicU64>,
    /// Told when an unknown-`kid` refetch succeeds: the refresher's next fetch is then
    /// `refresh_seconds` after it, not a failure's retry.
    refetched: tokio::sync::Notify,
}

impl Entry {
    /// Keep a fetched set, unless its document is the one in force: a refresh (every
    /// `refresh_seconds`) or a refetch for an unknown `kid` that brings the same keys must
    /// not move the generation on, which would make every token in the table of verified
    /// tokens pay its signature check again. Returns whether the set changed.
    fn store(&self, fetched: Fetched) -> bool {
        let mut body = self.body.lock().unwrap_or_else(PoisonError::into_inner);
        if self.keys.load().is_some() && *body == fetched.body {
            return false;
        }
        self.keys.store(Some(Arc::new(fetched.keys)));
        *body = fetched.body;
        self.generation.fetch_add(1, Ordering::AcqRel);
        true
    }
}

/// A key set and the document it came from.
pub struct Fetched {
    pub keys: Vec<Key>,
    /// Members of the document that are not keys the gate can read (RFC 7517 §5).
    pub ignored: usize,
    body: Bytes,
}

/// All key sets the policy in force refers to.
pub struct JwksCache {
    tls: Arc<rustls::ClientConfig>,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    generation: Arc<AtomicU64>,
}

impl JwksCache {
    /// Server certificates are checked against the Mozilla roots plus `extra_roots`.
    pub fn new(extra_roots: Vec<CertificateDer<'static>>) -> JwksCache {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in extra_roots {
            if let Err(e) = roots.add(cert) {
                tracing::warn!(error = %e, "ignoring an extra root certificate for JWKS fetches");
            }
        }
        let mut tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        JwksCache {
            tls: Arc::new(tls),
            entries: Mutex::new(HashMap::new()),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Start fetching every URL `policy` names (on `tasks`, until the gate exits) and stop
    /// fetching the ones it no longer does.
    pub fn sync(&self, policy: &Policy, tasks: &crate::shutdown::Tasks) {
        let mut wanted: HashMap<&str, Duration> = HashMap::new();
        for route in &policy.routes {
            for source in &route.auth.jwks_urls {
                let refresh = wanted.entry(&source.url).or_insert(source.refresh);
                *refresh = (*refresh).min(source.refresh);
            }
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|url, entry| {
            let keep = wanted.contains_key(url.as_str());
            if !keep {
                entry.stop.cancel();
            }
            keep
        });
        for (url, refresh) in wanted {
            if let Some(entry) = entries.get(url) {
                *entry.refresh.lock().unwrap_or_else(PoisonError::into_inner) = refresh;
                continue;
            }
            let entry = Arc::new(Entry {
                url: url.to_owned(),
                keys: ArcSwapOption::empty(),
                refresh: Mutex::new(refresh),
                refetches: Default::default(),
                stop: tasks.exit().child_token(),
                body: Mutex::new(Bytes::new()),
                generation: self.generation.clone(),
                refetched: tokio::sync::Notify::new(),
            });
            entries.insert(url.to_owned(), entry.clone());
            tasks.spawn(refresher(entry, self.tls.clone()));
        }
    }

    /// Moved on whenever a fetch or refetch brings a key set that differs from the one in
    /// force: what was verified under an older generation is verified again.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The last good key set of `url`; `None` until a fetch has succeeded.
    pub fn keys(&self, url: &str) -> Option<Arc<Vec<Key>>> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get(url)?.keys.load_full()
    }

    /// Refetch `url` now because a token named a key it does not have, unless the budget
    /// of [`UNKNOWN_KID_REFETCHES`] per [`UNKNOWN_KID_WINDOW`] is spent. Returns whether a
    /// fetch happened (this one, or one that ended while this request waited for it) and
    /// succeeded.
    pub async fn refetch(&self, url: &str) -> bool {
        let entry = {
            let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            match entries.get(url) {
                Some(e) => e.clone(),
                None => return false,
            }
        };
        let asked = Instant::now();
        // Concurrent requests with unknown kids wait for one fetch, and take its outcome.
        let mut refetches = entry.refetches.lock().await;
        if refetches.latest().is_some_and(|ended| ended >= asked) {
            return refetches.latest_succeeded;
        }
        if !refetches.allowed() {
            return false;
        }
        let succeeded = match fetch(&entry.url, &self.tls).await {
            Ok(fetched) => {
                let (keys, ignored) = (fetched.keys.len(), fetched.ignored);
                let changed = entry.store(fetched);
                tracing::info!(url = %redact_userinfo(&entry.url), keys, ignored, changed, "JWKS refetched for an unknown kid");
                entry.refetched.notify_waiters();
                true
            }
            Err(e) => {
                let have = entry.keys.load().is_some();
                tracing::warn!(
                    url = %redact_userinfo(&entry.url), error = %e, keeping_last_good = have,
                    "JWKS refetch for an unknown kid failed"
                );
                false
            }
        };
        refetches.record(succeeded);
        succeeded
    }
}

impl Drop for JwksCache {
    fn drop(&mut self) {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        for entry in entries.values() {
            entry.stop.cancel();
        }
    }
}

async fn refresher(entry: Arc<Entry>, tls: Arc<rustls::ClientConfig>) {
    let mut backoff = RETRY_MIN;
    loop {
        let wait = match fetch(&entry.url, &tls).await {
            Ok(fetched) => {
                let (keys, ignored) = (fetched.keys.len(), fetched.ignored);
                let changed = entry.store(fetched);
                tracing::info!(url = %redact_userinfo(&entry.url), keys, ignored, changed, "JWKS fetched");
                backoff = RETRY_MIN;
                *entry.refresh.lock().unwrap_or_else(PoisonError::into_inner)
            }
            Err(e) => {
                let have = entry.keys.load().is_some();
                tracing::warn!(
                    url = %redact_userinfo(&entry.url), error = %e, retry_s = backoff.as_secs(), keeping_last_good = have,
                    "JWKS fetch failed"
                );
                let wait = backoff;
                backoff = (backoff * 2).min(RETRY_MAX);
                wait
            }
        };
        let mut until = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                () = entry.refetched.notified() => {
                    backoff = RETRY_MIN;
                    let refresh = *entry.refresh.lock().unwrap_or_else(PoisonError::into_inner);
                    until = tokio::time::Instant::now() + refresh;
                }
                () = entry.stop.cancelled() => return,
            }
        }
    }
}

/// GET a JWKS over HTTPS, all within `FETCH_TIMEOUT`.
pub async fn fetch(url: &str, tls: &Arc<rustls::ClientConfig>) -> Result<Fetched, FetchError> {
    match timeout(FETCH_TIMEOUT, fetch_inner(url, tls)).await {
        Ok(result) => result,
        Err(_) => Err(FetchError::Timeout(FETCH_TIMEOUT)),
    }
}

async fn fetch_inner(url: &str, tls: &Arc<rustls::ClientConfig>) -> Result<Fetched, FetchError> {
    let uri: Uri = url.parse().map_err(|_| FetchError::Url)?;
    let host = uri.host().ok_or(FetchError::Url)?;
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let name = ServerName::try_from(bare_host.to_owned()).map_err(|_| FetchError::Url)?;
    let tcp = TcpStream::connect((bare_host, port)).await?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    let request = Request::get(target)
        .header(header::HOST, authority)
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|_| FetchError::Url)?;
    let exchange = async {
        let response = sender.send_request(request).await?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status()));
        }
        Ok(Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|_| FetchError::Body)?
            .to_bytes())
    };
    // The connection is driven here, beside the exchange, not by a task of its own: it
    // ends with the fetch. (It ending first, the exchange fails on its closed channel.)
    tokio::pin!(conn);
    let mut exchange = std::pin::pin!(exchange);
    let mut conn_ended = false;
    let body = loop {
        tokio::select! {
            body = &mut exchange => break body?,
            _ = &mut conn, if !conn_ended => conn_ended = true,
        }
    };
    let set = parse_jwks(&body).map_err(FetchError::Parse)?;
    Ok(Fetched {
        keys: set.keys,
        ignored: set.ignored.len(),
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetched(body: &'static str) -> Fetched {
        Fetched {
            keys: parse_jwks(body.as_bytes()).unwrap().keys,
            ignored: 0,
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn only_a_changed_key_set_moves_the_generation_on() {
        let generation = Arc::new(AtomicU64::new(0));
        let entry = Entry {
            url: "https://issuer.example/jwks.json".into(),
            keys: ArcSwapOption::empty(),
            refresh: Mutex::new(Duration::from_secs(300)),
            refetches: Default::default(),
            stop: CancellationToken::new(),
            body: Mutex::new(Bytes::new()),
            generation: generation.clone(),
            refetched: tokio::sync::Notify::new(),
        };
        let seen = || generation.load(Ordering::Acquire);
        // The first set, even an empty document, is a change from none.
        assert!(entry.store(fetched(r#"{"keys": []}"#)));
        assert_eq!(seen(), 1);
        assert!(entry.keys.load().is_some());
        for _ in 0..3 {
            assert!(!entry.store(fetched(r#"{"keys": []}"#)));
        }
        assert_eq!(seen(), 1, "refreshes that changed nothing");
        assert!(entry.store(fetched(r#"{"keys": [], "rotated": 1}"#)));
        assert_eq!(seen(), 2);
    }
}
