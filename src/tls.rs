//! TLS termination: the server certificate, loaded from PEM files, and the rustls acceptor.
//!
//! The server config sits behind an `ArcSwap`, so a new certificate pair can be swapped in
//! for new handshakes while established connections carry on with theirs.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found")]
    NoKey { path: PathBuf },
    #[error("certificate and key do not make a usable pair: {0}")]
    Config(#[from] rustls::Error),
}

/// Every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::NoKey {
        path: path.to_owned(),
    })
}

/// A server config for the certificate chain and key in these PEM files: TLS 1.2 and 1.3,
/// ALPN `http/1.1` (WebSocket upgrades are HTTP/1.1).
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    server_config_from(read_certs(cert)?, read_key(key)?)
}

pub fn server_config_from(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The certificate in force for new handshakes.
#[derive(Clone)]
pub struct Acceptor {
    config: Arc<ArcSwap<ServerConfig>>,
}

impl Acceptor {
    pub fn new(config: ServerConfig) -> Acceptor {
        Acceptor {
            config: Arc::new(ArcSwap::from_pointee(config)),
        }
    }

    pub fn current(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    /// Use this config for handshakes from now on.
    pub fn store(&self, config: ServerConfig) {
        self.config.store(Arc::new(config));
    }
}

/// Watch the certificate and key files (their directories, so a Kubernetes Secret's
/// `..data` swap is seen) and SIGHUP; on a change load the pair and use it for new
/// handshakes. An unusable pair is logged and counted, and the old one stays. The watch is
/// in place when this returns.
pub fn watch(
    cert: PathBuf,
    key: PathBuf,
    acceptor: Acceptor,
    metrics: Arc<crate::metrics::Metrics>,
    stop: tokio_util::sync::CancellationToken,
) {
    use notify::{RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let names: Vec<std::ffi::OsString> = [&cert, &key]
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_owned()))
        .collect();
    let event_tx = tx.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let relevant = !event.kind.is_access()
            && event.paths.iter().any(|p| {
                p.file_name().is_some_and(|n| {
                    names.iter().any(|name| name == n) || n.to_string_lossy().starts_with("..")
                })
            });
        if relevant {
            let _ = event_tx.try_send(());
        }
    });
    let watcher = watcher.and_then(|mut w| {
        let mut dirs: Vec<PathBuf> = [&cert, &key]
            .iter()
            .map(|p| match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
                _ => PathBuf::from("."),
            })
            .collect();
        dirs.dedup();
        for dir in &dirs {
            w.watch(dir, RecursiveMode::NonRecursive)?;
        }
        Ok(w)
    });
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the certificate files; reload them with SIGHUP");
            None
        }
    };
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        let (tx, stop) = (tx.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    got = hup.recv() => if got.is_none() { break } else { let _ = tx.try_send(()); },
                    () = stop.cancelled() => break,
                }
            }
        });
    }
    tokio::spawn(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                woke = rx.recv() => if woke.is_none() { break },
                () = stop.cancelled() => break,
            }
            tokio::time::sleep(crate::reload::DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            let (c, k) = (cert.clone(), key.clone());
            let loaded = tokio::task::spawn_blocking(move || server_config(&c, &k)).await;
            let result = match loaded {
                Ok(Ok(config)) => {
                    acceptor.store(config);
                    tracing::info!(cert = %cert.display(), "certificate reloaded: new handshakes use it");
                    "success"
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "certificate reload refused; the previous certificate stays in use");
                    "failure"
                }
                Err(e) => {
                    tracing::error!(error = %e, "certificate loader failed");
                    "failure"
                }
            };
            metrics
                .tls_reloads
                .get_or_create_owned(&crate::metrics::ResultLabel { result })
                .inc();
        }
    });
}
