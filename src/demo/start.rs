//! Starting the quick start: the demo server on a loopback port, its policy and secret in
//! a temporary directory, and the gate on TLS with the development certificate in front.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use super::{banner, serve, write_policy, Demo, MintError, DEV_CERT, DEV_KEY, PRINTED_TOKEN_TTL};
use crate::{config, tls, Options, Running};

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no randomness available")]
    NoRandomness,
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mint the demo token: {0}")]
    Token(#[from] MintError),
    #[error("cannot write the demo policy in {}: {source}", dir.display())]
    Policy {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("development certificate: {0}")]
    Certificate(#[from] tls::TlsError),
    #[error("cannot start the gate: {0}")]
    Gate(#[source] std::io::Error),
}

/// A running demo: the gate (to drain), what to print, and the directory to remove.
pub struct Started {
    pub running: Running,
    /// The banner: the page's URL, the socket, a ready token and a client command.
    pub banner: String,
    dir: PathBuf,
}

impl Started {
    /// Remove the generated policy and secret (after the gate has drained).
    pub fn remove_files(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Start the demo with the gate on `listen`. Call inside a tokio runtime.
pub async fn start(listen: SocketAddr) -> Result<Started, StartError> {
    let mut secret_bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut secret_bytes).map_err(|_| StartError::NoRandomness)?;
    let secret: String = secret_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let listen_error = |addr| move |source| StartError::Listen { addr, source };
    let upstream = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(listen_error(SocketAddr::from(([127, 0, 0, 1], 0))))?;
    let listener = crate::listener::bind(listen).map_err(listen_error(listen))?;
    let upstream_addr = upstream.local_addr().map_err(StartError::Gate)?;
    let gate_addr = listener.local_addr().map_err(StartError::Gate)?;
    let server = Arc::new(Demo::new(secret.clone(), gate_addr));
    let (token, _) = server.mint(PRINTED_TOKEN_TTL)?;
    // A name no other user can guess and take first (the directory must not exist).
    let mut nonce = [0u8; 8];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| StartError::NoRandomness)?;
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let dir = std::env::temp_dir().join(format!("wsgate-demo-{}-{nonce}", std::process::id()));
    let policy_path = write_policy(&dir, gate_addr, upstream_addr, &secret).map_err(|source| {
        StartError::Policy {
            dir: dir.clone(),
            source,
        }
    })?;
    let loaded = config::load(&policy_path)?;
    let options = Options {
        policy_path: policy_path.clone(),
        listener,
        admin: None,
        tls: Some(dev_tls()?),
        tls_validity: None,
        sighup: true,
        tls_files: None,
        jwks_roots: Vec::new(),
        admin_token_file: None,
    };
    tokio::spawn(serve(upstream, server.clone()));
    let running = crate::start(loaded, options).map_err(StartError::Gate)?;
    server.set_gate(running.gate.clone());
    Ok(Started {
        running,
        banner: banner(gate_addr.port(), &policy_path, &token),
        dir,
    })
}

/// The TLS configuration with the development certificate compiled into the binary.
fn dev_tls() -> Result<rustls::ServerConfig, tls::TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<_> = CertificateDer::pem_slice_iter(DEV_CERT.as_bytes())
        .filter_map(Result::ok)
        .collect();
    let key =
        PrivateKeyDer::from_pem_slice(DEV_KEY.as_bytes()).map_err(|_| tls::TlsError::NoKey {
            path: "certs/localhost.key".into(),
        })?;
    tls::server_config_from(certs, key)
}
