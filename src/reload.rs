//! Live policy and certificate: one watcher over the policy file's directory and the
//! certificate's (directories, so a Kubernetes ConfigMap's or Secret's `..data` symlink swap
//! is seen) and over their parents (so a directory replaced whole is seen, and watched
//! again), and SIGHUP. On a change, what changed is re-read, validated fully, and swapped
//! in: the policy into the [`PolicyHandle`], the certificate pair into the TLS acceptor for
//! new handshakes. Anything invalid is refused with its location, and the old one stays.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::metrics::{Metrics, ResultLabel};
use crate::policy::PolicyHandle;
use crate::shutdown::{Shutdown, Tasks};
use crate::tls;

/// Events closer together than this are one reload (editors write files in several steps).
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// The longest a burst of events postpones its reload.
const SETTLE_MAX: Duration = Duration::from_secs(1);

/// The longest a reload waits for a writer that has the policy file open (written in place,
/// `kubectl get cm … > policy.yaml`) to close it: a file read half-way could be a valid
/// policy without the routes still to come, and its re-check would close their connections.
const WRITER_WAIT: Duration = Duration::from_secs(5);

/// The longest a reload's reads (the policy and the files it names, or the certificate
/// pair) may take: a FIFO or a hung mount in their place must not stall every later
/// reload without a word.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("policy loader stopped: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("reading took longer than {READ_TIMEOUT:?} (a FIFO or a hung mount?): abandoned")]
    TimedOut,
    #[error(
        "{STUCK_MAX} earlier reads that took too long have not returned (a FIFO or a hung mount?)"
    )]
    StillReading,
}

/// How many reads that outlived [`READ_TIMEOUT`] may still be blocked before reloads of
/// their kind are refused instead of started.
const STUCK_MAX: usize = 4;

/// Blocking reads that outlived [`READ_TIMEOUT`] and have not returned (a thread stuck in
/// a FIFO's or a hung mount's `open`): a reload still starts beside them, since the file
/// may have been put right since, but at most [`STUCK_MAX`] are left blocked, not one per
/// reload.
struct Pending<T>(Vec<tokio::task::JoinHandle<T>>);

impl<T: Send + 'static> Pending<T> {
    /// `read` on the blocking pool, for at most [`READ_TIMEOUT`].
    async fn run(&mut self, read: impl FnOnce() -> T + Send + 'static) -> Result<T, ReloadError> {
        self.0.retain(|h| !h.is_finished());
        if self.0.len() >= STUCK_MAX {
            return Err(ReloadError::StillReading);
        }
        let mut handle = tokio::task::spawn_blocking(read);
        match tokio::time::timeout(READ_TIMEOUT, &mut handle).await {
            Ok(done) => Ok(done?),
            Err(_) => {
                self.0.push(handle);
                Err(ReloadError::TimedOut)
            }
        }
    }
}

/// The server certificate kept current: its files, and the acceptor that new handshakes
/// take it from.
pub struct Certificate {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub acceptor: tls::Acceptor,
    /// The digest of the pair in use ([`pair_digest`]): a re-read that finds the same
    /// bytes (a SIGHUP for a policy key file, a `touch`) keeps the config, and with it the
    /// clients' sessions.
    pub in_use: std::sync::Mutex<Option<String>>,
}

/// What changed since the last reload (bits, set by the watcher and SIGHUP).
const POLICY: u8 = 1;
const CERTIFICATE: u8 = 2;
/// A watched directory was replaced: watch the new one.
const REWATCH: u8 = 4;

/// What the reloader keeps current.
pub struct Reloader {
    pub path: PathBuf,
    pub policy: PolicyHandle,
    pub certificate: Option<Certificate>,
    pub metrics: Arc<Metrics>,
    /// The open connections, each re-checked against a new policy.
    pub registry: Arc<crate::registry::Registry>,
}

/// Start watching (and listening for SIGHUP, when asked) and reload on each change until
/// `stop` is cancelled. The watches are in place when this returns, so no later write is
/// missed.
pub fn spawn(reloader: Reloader, sighup: bool, shutdown: &Shutdown) {
    let (tasks, stop) = (&shutdown.tasks, shutdown.token());
    // Capacity 1: a pending wake-up already means "reload"; `changed` says what.
    let (tx, rx) = mpsc::channel::<()>(1);
    let changed = Arc::new(AtomicU8::new(0));
    let writing = Arc::new(AtomicBool::new(false));
    let awaited = Awaited::default();
    let watcher = start_watcher(
        &reloader,
        tx.clone(),
        changed.clone(),
        writing.clone(),
        awaited.clone(),
    );
    // The start loaded the policy before these watches were in place: a write in between
    // (or the SIGHUP sent for it) would go unseen until the next one. Compare the file now.
    tasks.spawn(reload_if_written_since(
        reloader.path.clone(),
        reloader.policy.load().sha256.clone(),
        tx.clone(),
        changed.clone(),
    ));
    if sighup {
        spawn_sighup(tasks, tx, changed.clone(), stop.clone());
    }
    tasks.spawn(reload_loop(
        reloader, changed, writing, awaited, rx, stop, watcher,
    ));
}

/// Wake the reloader if the policy file's bytes are no longer those of `loaded_sha256`.
async fn reload_if_written_since(
    path: PathBuf,
    loaded_sha256: String,
    tx: mpsc::Sender<()>,
    changed: Arc<AtomicU8>,
) {
    let read = tokio::task::spawn_blocking(move || {
        config::regular_file(&path)?;
        config::read_policy(&path)
    })
    .await;
    let Ok(Ok(bytes)) = read else {
        return;
    };
    if config::sha256_hex(&bytes) != loaded_sha256 {
        tracing::info!("the policy file changed while the gate started: reloading it");
        changed.fetch_or(POLICY, Ordering::AcqRel);
        let _ = tx.try_send(());
    }
}

/// The names of the files a refused policy named (a key file it waits for, say): their
/// appearing or changing tries the reload again. Empty once a reload succeeds.
#[derive(Clone, Default)]
struct Awaited(Arc<std::sync::Mutex<Vec<OsString>>>);

impl Awaited {
    fn set(&self, files: &[PathBuf]) {
        let names = files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_owned()))
            .collect();
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = names;
    }

    fn contains(&self, name: &std::ffi::OsStr) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|n| n == name)
    }
}

#[allow(clippy::too_many_arguments)]
async fn reload_loop(
    reloader: Reloader,
    changed: Arc<AtomicU8>,
    writing: Arc<AtomicBool>,
    awaited: Awaited,
    mut rx: mpsc::Receiver<()>,
    stop: CancellationToken,
    // Kept alive for as long as the loop runs.
    mut watching: Option<Watching>,
) {
    let mut policy_read = Pending(Vec::new());
    let mut certificate_read = Pending(Vec::new());
    loop {
        tokio::select! {
            woke = rx.recv() => if woke.is_none() { break },
            () = stop.cancelled() => break,
        }
        // Let a burst of events settle into one reload: DEBOUNCE after the last of them
        // (at most SETTLE_MAX after the first), and not while a writer has the policy
        // file open or has just truncated it to write it anew (at most WRITER_WAIT).
        let first = tokio::time::Instant::now();
        let written = || async {
            if writing.load(Ordering::Acquire) {
                return false;
            }
            let policy_changed = changed.load(Ordering::Acquire) & POLICY != 0;
            !policy_changed || !truncated(&reloader.path).await
        };
        loop {
            tokio::select! {
                () = tokio::time::sleep(DEBOUNCE) => {
                    if first.elapsed() >= WRITER_WAIT || written().await {
                        break;
                    }
                }
                woke = rx.recv() => {
                    if woke.is_none() {
                        return;
                    }
                    if first.elapsed() >= SETTLE_MAX && written().await {
                        break;
                    }
                }
                () = stop.cancelled() => return,
            }
        }
        writing.store(false, Ordering::Release);
        while rx.try_recv().is_ok() {}
        let what = changed.swap(0, Ordering::AcqRel);
        if what & REWATCH != 0 {
            if let Some(watching) = watching.as_mut() {
                watching.rewatch();
            }
        }
        let reloads = async {
            if what & POLICY != 0 {
                reload_policy(&reloader, &awaited, &mut policy_read).await;
            }
            if let Some(certificate) = reloader.certificate.as_ref() {
                if what & CERTIFICATE != 0 {
                    reload_certificate(certificate, &reloader.metrics, &mut certificate_read).await;
                }
            }
        };
        // A reload still reading when the gate stops is abandoned (a read of a FIFO, say,
        // may never return); the exit does not wait for it.
        tokio::select! {
            () = reloads => {}
            () = stop.cancelled() => break,
        }
    }
}

/// Whether the policy file is empty: no policy, but a writer that truncated it
/// (`cat new.yaml > policy.yaml`) a moment before its first write, which the reload waits
/// for as for an open writer. A file that stays empty is read, and refused, at WRITER_WAIT.
async fn truncated(path: &Path) -> bool {
    let metadata = tokio::time::timeout(DEBOUNCE, tokio::fs::metadata(path)).await;
    matches!(metadata, Ok(Ok(m)) if m.is_file() && m.len() == 0)
}

async fn reload_policy(
    reloader: &Reloader,
    awaited: &Awaited,
    read: &mut Pending<Result<crate::policy::Loaded, config::ConfigError>>,
) {
    let result = reload(&reloader.path, &reloader.policy, read).await;
    if result.is_ok() {
        reloader.registry.raise_all(crate::registry::Signal::Policy);
    }
    match &result {
        Err(ReloadError::Config(config::ConfigError::Invalid { files, .. })) => awaited.set(files),
        _ => awaited.set(&[]),
    }
    let label = if result.is_ok() { "success" } else { "failure" };
    reloader
        .metrics
        .policy_reloads
        .get_or_create_owned(&ResultLabel { result: label })
        .inc();
    if let Err(e) = result {
        // One line per event, in text logs too: the errors after the first follow "; ".
        let error = e.to_string().replace('\n', "; ");
        tracing::error!(%error, "policy reload refused; the previous policy stays in force");
    }
}

/// Load and validate `path` (and the key files it names), then swap it in.
async fn reload(
    path: &Path,
    policy: &PolicyHandle,
    read: &mut Pending<Result<crate::policy::Loaded, config::ConfigError>>,
) -> Result<(), ReloadError> {
    let owned = path.to_owned();
    let loaded = read.run(move || config::load_file(&owned)).await??;
    tracing::info!(
        path = %path.display(), sha256 = %loaded.sha256, routes = loaded.policy.routes.len(),
        "policy reloaded"
    );
    policy.store(loaded);
    Ok(())
}

/// A digest of the certificate and key files' bytes, to tell a re-read of the same pair;
/// `None` when either cannot be read.
pub fn pair_digest(cert: &Path, key: &Path) -> Option<String> {
    let mut both = std::fs::read(cert).ok()?;
    both.extend_from_slice(b"\0");
    both.extend_from_slice(&std::fs::read(key).ok()?);
    Some(config::sha256_hex(&both))
}

/// A pair read for a reload: `None` when it is the pair in use; else its config, its
/// certificate's validity and its digest.
type CertificateRead =
    Result<Option<(rustls::ServerConfig, Option<tls::Validity>, Option<String>)>, tls::TlsError>;

/// Load the certificate pair and use it for new handshakes; an unusable pair is logged
/// and counted, and the old one stays.
async fn reload_certificate(
    certificate: &Certificate,
    metrics: &Metrics,
    read: &mut Pending<CertificateRead>,
) {
    let (cert, key) = (certificate.cert.clone(), certificate.key.clone());
    let in_use = lock(&certificate.in_use).clone();
    let loaded = read
        .run(move || {
            let digest = pair_digest(&cert, &key);
            if digest.is_some() && digest == in_use {
                return Ok(None);
            }
            tls::server_config(&cert, &key)
                .map(|(config, validity)| Some((config, validity, digest)))
        })
        .await;
    let result = match loaded {
        Ok(Ok(None)) => {
            tracing::info!(cert = %certificate.cert.display(), "certificate unchanged: kept, with its sessions");
            "success"
        }
        Ok(Ok(Some((config, validity, digest)))) => {
            certificate.acceptor.store(config);
            *lock(&certificate.in_use) = digest;
            tracing::info!(cert = %certificate.cert.display(), "certificate reloaded: new handshakes use it");
            if let Some(validity) = validity {
                validity.warn(&certificate.cert);
                metrics.tls_certificate_expiry.set(validity.not_after);
            }
            "success"
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "certificate reload refused; the previous certificate stays in use");
            "failure"
        }
        Err(e) => {
            tracing::error!(error = %e, "certificate reload refused; the previous certificate stays in use");
            "failure"
        }
    };
    metrics
        .tls_reloads
        .get_or_create_owned(&ResultLabel { result })
        .inc();
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The watcher and the directories it watches for files.
struct Watching {
    watcher: RecommendedWatcher,
    dirs: Vec<PathBuf>,
}

impl Watching {
    /// Watch the directories again: one replaced whole (renamed over) is a new directory,
    /// which the old watch does not see.
    fn rewatch(&mut self) {
        for dir in &self.dirs {
            let _ = self.watcher.unwatch(dir);
            match self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                Ok(()) => tracing::info!(dir = %dir.display(), "watching a replaced directory"),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a replaced directory; reload with SIGHUP")
                }
            }
        }
    }
}

/// One watcher over every directory that holds a watched file, and over their parents. A
/// directory that cannot be watched is logged (its file is then reloaded by SIGHUP only);
/// `None` if none can be.
fn start_watcher(
    reloader: &Reloader,
    tx: mpsc::Sender<()>,
    changed: Arc<AtomicU8>,
    writing: Arc<AtomicBool>,
    awaited: Awaited,
) -> Option<Watching> {
    let policy_name = reloader
        .path
        .file_name()
        .map(|n| n.to_owned())
        .unwrap_or_default();
    let certificate_names: Vec<OsString> = reloader
        .certificate
        .iter()
        .flat_map(|c| [&c.cert, &c.key])
        .filter_map(|p| p.file_name().map(|n| n.to_owned()))
        .collect();
    let policy = reloader.policy.clone();
    // Absolute (not resolved: a symlinked directory stays the link), so that the parent's
    // events, which name the directory, compare equal.
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let policy_dir = absolute(parent_dir(&reloader.path));
    let mut certificate_dirs: Vec<PathBuf> = reloader
        .certificate
        .iter()
        .flat_map(|c| [absolute(parent_dir(&c.cert)), absolute(parent_dir(&c.key))])
        .collect();
    certificate_dirs.dedup();
    let (policy_home, certificate_homes) = (policy_dir.clone(), certificate_dirs.clone());
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        // The policy file written in place: open until its writer closes it.
        let the_policy_file = || {
            event
                .paths
                .iter()
                .any(|p| p.file_name() == Some(&policy_name) && in_dir(p, &policy_home))
        };
        match event.kind {
            EventKind::Modify(ModifyKind::Data(_)) if the_policy_file() => {
                writing.store(true, Ordering::Release);
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write)) if the_policy_file() => {
                writing.store(false, Ordering::Release);
                // Closed after writing: the reload the writes began may go now.
                let _ = tx.try_send(());
                return;
            }
            _ if event.kind.is_access() => return,
            _ => {}
        }
        let mut what = 0;
        // A watched directory itself, replaced or removed (seen from its parent); not its
        // mode or times changed (a chmod is no reason to reload).
        let metadata = matches!(event.kind, EventKind::Modify(ModifyKind::Metadata(_)));
        let replaced = |dir: &PathBuf| !metadata && event.paths.iter().any(|p| p == dir);
        // Independent: a directory the policy and the certificate share is both.
        if replaced(&policy_home) {
            what |= POLICY | REWATCH;
        }
        if certificate_homes.iter().any(replaced) {
            what |= CERTIFICATE | REWATCH;
        }
        if what == 0 {
            if concerns_policy(&event.paths, &policy_name, &policy_home, &policy)
                || event
                    .paths
                    .iter()
                    .any(|p| p.file_name().is_some_and(|n| awaited.contains(n)))
            {
                what |= POLICY;
            }
            if !certificate_names.is_empty()
                && concerns(&event.paths, &certificate_names, &certificate_homes)
            {
                what |= CERTIFICATE;
            }
        }
        if what != 0 {
            changed.fetch_or(what, Ordering::AcqRel);
            let _ = tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch files; reload the policy and certificate with SIGHUP");
            return None;
        }
    };
    if let Err(e) = watcher.watch(&policy_dir, RecursiveMode::NonRecursive) {
        tracing::warn!(path = %reloader.path.display(), error = %e, "cannot watch the policy directory; reload with SIGHUP");
    }
    for dir in certificate_dirs.iter().filter(|d| **d != policy_dir) {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(error = %e, "cannot watch the certificate files; reload them with SIGHUP");
        }
    }
    let mut dirs = vec![policy_dir];
    dirs.extend(certificate_dirs);
    dirs.dedup();
    // Their parents, for a directory replaced whole; not watched if it is one of them, or
    // the directory has none.
    let mut parents: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| d.parent().map(Path::to_path_buf))
        .filter(|p| !dirs.contains(p))
        .collect();
    parents.sort();
    parents.dedup();
    for parent in &parents {
        if let Err(e) = watcher.watch(parent, RecursiveMode::NonRecursive) {
            tracing::debug!(dir = %parent.display(), error = %e, "cannot watch a parent directory: a directory replaced whole is seen on SIGHUP only");
        }
    }
    Some(Watching { watcher, dirs })
}

/// Whether a change in a watched directory can change the policy: the policy file
/// itself or Kubernetes' atomic-writer entries (`..data`, `..2026_…`) in the policy's
/// directory, or a key, JWKS or CA file the policy in force names. Anything else (a log
/// file, a Secret's swap in the certificate's directory) is not a reason to reload.
fn concerns_policy(
    paths: &[PathBuf],
    policy_name: &std::ffi::OsStr,
    home: &Path,
    policy: &PolicyHandle,
) -> bool {
    if paths.is_empty() {
        return true;
    }
    let loaded = policy.load();
    paths.iter().any(|p| {
        let Some(name) = p.file_name() else {
            return true;
        };
        ((name == policy_name || is_atomic_writer_entry(name)) && in_dir(p, home))
            || loaded
                .policy
                .files
                .iter()
                .any(|f| f.file_name() == Some(name))
    })
}

/// Whether a change concerns one of `names`, or Kubernetes' atomic-writer entries, in
/// one of `homes` (the certificate's directories).
fn concerns(paths: &[PathBuf], names: &[OsString], homes: &[PathBuf]) -> bool {
    paths.iter().any(|p| {
        p.file_name().is_some_and(|n| {
            (names.iter().any(|name| name == n) || is_atomic_writer_entry(n))
                && homes.iter().any(|home| in_dir(p, home))
        })
    })
}

/// `..data`, `..data_tmp`, `..2026_11_21_16_00_00.1`: what kubelet swaps in a ConfigMap's
/// or Secret's volume.
fn is_atomic_writer_entry(name: &std::ffi::OsStr) -> bool {
    name.to_string_lossy().starts_with("..")
}

/// Whether `path` is an entry of `dir` (the watcher reports paths under the directory as
/// it was watched, so they compare as written).
fn in_dir(path: &Path, dir: &Path) -> bool {
    path.parent() == Some(dir)
}

/// SIGHUP reloads the policy and the certificate.
fn spawn_sighup(
    tasks: &Tasks,
    tx: mpsc::Sender<()>,
    changed: Arc<AtomicU8>,
    stop: CancellationToken,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Registered before returning, so a SIGHUP right after start-up is not lost.
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP");
            return;
        };
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    got = hup.recv() => {
                        if got.is_none() { break }
                        tracing::info!("SIGHUP: reloading the policy and the certificate");
                        changed.fetch_or(POLICY | CERTIFICATE, Ordering::AcqRel);
                        let _ = tx.try_send(());
                    }
                    () = stop.cancelled() => break,
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (tasks, tx, changed, stop);
}
