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
