//! Live policy: watch the policy file's directory (so a Kubernetes ConfigMap's `..data`
//! symlink swap is seen) and SIGHUP; on either, re-read, validate fully, and swap the new
//! policy in. An invalid file is refused with its location and the old policy stays.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config;
use crate::policy::PolicyHandle;

/// Events closer together than this are one reload (editors write files in several steps).
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// Counts of reloads after start-up (`wsgate_policy_reloads_total`).
#[derive(Debug, Default)]
pub struct ReloadCounts {
    pub success: AtomicU64,
    pub failure: AtomicU64,
}

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("policy loader stopped: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Start watching `path` (and SIGHUP, when asked) and reload on each change until `stop`
/// is cancelled. The watch is in place when this returns, so no later write is missed.
pub fn spawn(
    path: PathBuf,
    policy: PolicyHandle,
    counts: Arc<ReloadCounts>,
    metrics: Arc<crate::metrics::Metrics>,
    sighup: bool,
    stop: CancellationToken,
) {
    // Capacity 1: a pending wake-up already means "reload"; more are redundant.
    let (tx, rx) = mpsc::channel::<()>(1);
    let watcher = match start_watcher(&path, policy.clone(), tx.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot watch the policy directory; reload with SIGHUP");
            None
        }
    };
    if sighup {
        spawn_sighup(tx, stop.clone());
    }
    tokio::spawn(reload_loop(
        path, policy, counts, metrics, rx, stop, watcher,
    ));
}

async fn reload_loop(
    path: PathBuf,
    policy: PolicyHandle,
    counts: Arc<ReloadCounts>,
    metrics: Arc<crate::metrics::Metrics>,
    mut rx: mpsc::Receiver<()>,
    stop: CancellationToken,
    // Kept alive for as long as the loop runs.
    _watcher: Option<RecommendedWatcher>,
) {
    loop {
        tokio::select! {
            woke = rx.recv() => if woke.is_none() { break },
            () = stop.cancelled() => break,
        }
        // Let a burst of events settle into one reload.
        tokio::time::sleep(DEBOUNCE).await;
        while rx.try_recv().is_ok() {}
        let result = reload(&path, &policy).await;
        let label = if result.is_ok() { "success" } else { "failure" };
        metrics
            .policy_reloads
            .get_or_create_owned(&crate::metrics::ResultLabel { result: label })
            .inc();
        match result {
            Ok(()) => {
                counts.success.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                counts.failure.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "policy reload refused; the previous policy stays in force");
            }
        }
    }
}

/// Load and validate `path` (and the key files it names), then swap it in.
pub async fn reload(path: &Path, policy: &PolicyHandle) -> Result<(), ReloadError> {
    let owned = path.to_owned();
    let loaded = tokio::task::spawn_blocking(move || config::load(&owned)).await??;
    tracing::info!(
        path = %path.display(), sha256 = %loaded.sha256, routes = loaded.policy.routes.len(),
        "policy reloaded"
    );
    policy.store(loaded);
    Ok(())
}

fn start_watcher(
    path: &Path,
    policy: PolicyHandle,
    tx: mpsc::Sender<()>,
) -> notify::Result<RecommendedWatcher> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_owned()).unwrap_or_default();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if !event.kind.is_access() && concerns_policy(&event.paths, &name, &policy) {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Whether a change in the watched directory can change the policy: the policy file
/// itself, Kubernetes' atomic-writer entries (`..data`, `..2026_…`), or a key, JWKS or CA
/// file the policy in force names. Anything else in the directory (a log file, say) is
/// not a reason to reload.
fn concerns_policy(
    paths: &[PathBuf],
    policy_name: &std::ffi::OsStr,
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
        name == policy_name
            || name.to_string_lossy().starts_with("..")
            || loaded
                .policy
                .files
                .iter()
                .any(|f| f.file_name() == Some(name))
    })
}

fn spawn_sighup(tx: mpsc::Sender<()>, stop: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Registered before returning, so a SIGHUP right after start-up is not lost.
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP");
            return;
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = hup.recv() => {
                        if got.is_none() { break }
                        tracing::info!("SIGHUP: reloading the policy");
                        let _ = tx.try_send(());
                    }
                    () = stop.cancelled() => break,
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (tx, stop);
}
