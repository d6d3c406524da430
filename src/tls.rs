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
    #[error("{path}: a certificate in it cannot be read ({reason}); a chain served without it would fail strict clients")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: the server's certificate (the first) is X.509 version 1; rustls serves version 3 only: issue it with extensions (openssl x509 -req ... -extfile with subjectAltName)")]
    VersionOne { path: PathBuf },
    #[error("{path}: no PEM private key found")]
    NoKey { path: PathBuf },
    #[error("{path}: the private key in it cannot be read ({reason})")]
    BadKey { path: PathBuf, reason: String },
    #[error("{path}: the private key is encrypted; wsgate needs it unencrypted (openssl pkey -in {path} -out plain.key), readable only by the gate's user")]
    EncryptedKey { path: PathBuf },
    #[error("certificate and key do not make a usable pair: {0} (the certificate file must start with the server's own certificate, then its intermediates, and the key must be that certificate's)")]
    Config(#[from] rustls::Error),
}

/// Every certificate in a PEM file. A block that does not decode (a chain copied in
/// half, a corrupted intermediate) fails the whole file rather than being skipped: the
/// chain would be served short, and only strict clients would notice.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_in(path, &read(path)?)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The certificates of `bytes`, the contents of `path`.
fn certs_in(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            reason: pem_reason(&e),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// PEM labels OpenSSL reads as certificates but the gate does not: a chain holding one
/// would be served without it.
const UNREAD_LABELS: [&str; 2] = ["TRUSTED CERTIFICATE", "X509 CERTIFICATE"];

/// The longest certificate webpki parses (its DER lengths take at most two bytes).
const LONGEST_PARSED: usize = 4 + 0xFFFF;

/// The server's certificate chain: [`read_certs`], and every certificate in it an X.509
/// certificate. A block whose base64 decodes to bytes that are not one (lines lost from
/// the middle of an intermediate, a CSR) would be served, since rustls parses only the
/// first certificate itself, and every client would then fail the handshake. (CA bundles
/// are not held to this: a system bundle may hold a certificate rustls cannot parse,
/// which it skips.)
fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::BadCertificate {
        path: path.to_owned(),
        reason,
    };
    let bytes = read(path)?;
    // Before the certificates are read: a file of such blocks alone has none that is.
    let text = String::from_utf8_lossy(&bytes);
    if let Some(label) = UNREAD_LABELS
        .iter()
        .find(|label| text.contains(&format!("-----BEGIN {label}-----")))
    {
        return Err(bad(format!(
            "a \"{label}\" block is not read as part of the chain: write it as a \
             \"CERTIFICATE\" block (openssl x509 -in it -out plain.pem)"
        )));
    }
    let certs = certs_in(path, &bytes)?;
    // rustls serves a version 3 certificate only, and would say its refusal of another
    // as if the key did not match it.
    let leaf = certs.first().map(webpki::EndEntityCert::try_from);
    if let Some(Err(webpki::Error::UnsupportedCertVersion)) = leaf {
        return Err(TlsError::VersionOne {
            path: path.to_owned(),
        });
    }
    for (i, cert) in certs.iter().enumerate() {
        if cert.len() > LONGEST_PARSED {
            continue;
        }
        // As a trust anchor is parsed: version 1 certificates and unknown critical
        // extensions are taken, since OpenSSL's clients may accept them. Only what is not
        // a certificate at all is refused.
        if let Err(
            e
            @ (webpki::Error::BadDer | webpki::Error::BadDerTime | webpki::Error::TrailingData(_)),
        ) = webpki::anchor_from_trusted_cert(cert)
        {
            return Err(bad(format!(
                "certificate {} of {} is not an X.509 certificate (its DER does not parse: \
                 {e:?})",
                i + 1,
                certs.len()
            )));
        }
    }
    Ok(certs)
}

/// A PEM error in words (the library's own message shows its markers as lists of bytes).
fn pem_reason(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "no \"-----END {}-----\" line: the file is cut short",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => format!(
            "a malformed \"-----BEGIN\" line: {:?}",
            String::from_utf8_lossy(line)
        ),
        other => other.to_string(),
    }
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        // `BEGIN ENCRYPTED PRIVATE KEY` (PKCS#8) or `Proc-Type: 4,ENCRYPTED` (OpenSSL's
        // legacy PEM): a key is there, but not one that can be used without a password.
        let text = String::from_utf8_lossy(&bytes);
        let path = path.to_owned();
        if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
            TlsError::EncryptedKey { path }
        } else if matches!(e, rustls_pki_types::pem::Error::NoItemsFound) {
            TlsError::NoKey { path }
        } else {
            // A key block is there but does not decode (damaged base64, a cut file).
            TlsError::BadKey {
                path,
                reason: pem_reason(&e),
            }
        }
    })
}

/// Sessions kept for TLS 1.2 session-ID resumption (about 200 bytes each); the oldest go
/// first. TLS 1.3 resumes with tickets, which the gate does not store.
pub const SESSION_CACHE: usize = 10_000;

/// A server config for the certificate chain and key in these PEM files: TLS 1.2 and 1.3,
/// ALPN `h2` then `http/1.1` (the [`Acceptor`] drops `h2` while `http2.enabled` is false),
/// session resumption on; and the server certificate's validity.
pub fn server_config(
    cert: &Path,
    key: &Path,
) -> Result<(ServerConfig, Option<Validity>), TlsError> {
    let chain = read_chain(cert)?;
    let validity = Validity::of(&chain);
    Ok((server_config_from(chain, read_key(key)?)?, validity))
}

/// A certificate this close to its end is warned about when it is loaded.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// When a served certificate chain may be used, in Unix seconds: from the latest
/// notBefore to the earliest notAfter of its certificates (a client refuses the chain when
/// the server's certificate or an intermediate has expired). A chain outside these dates
/// is still served, as nginx and Envoy serve it, but its loading is logged as a warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// The validity of `chain`, from those of its certificates that parse (all of them,
    /// once `read_chain` has taken the file); `None` if none does.
    pub fn of(chain: &[CertificateDer<'_>]) -> Option<Validity> {
        chain
            .iter()
            .filter_map(|der| {
                let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
                let validity = cert.validity();
                Some(Validity {
                    not_before: validity.not_before.timestamp(),
                    not_after: validity.not_after.timestamp(),
                })
            })
            .reduce(|a, b| Validity {
                not_before: a.not_before.max(b.not_before),
                not_after: a.not_after.min(b.not_after),
            })
    }

    /// What is wrong with serving the certificate at `now` (Unix seconds), or about to be:
    /// expired, not valid yet, or ending within [`EXPIRY_WARNING_DAYS`].
    pub fn problem(&self, now: i64) -> Option<String> {
        let left = self.not_after - now;
        if left < 0 {
            Some(format!(
                "the certificate expired on {}: clients refuse it; install a renewed one",
                date(self.not_after)
            ))
        } else if now < self.not_before {
            Some(format!(
                "the certificate is not valid before {}: clients refuse it until then \
                 (or the clock is wrong)",
                date(self.not_before)
            ))
        } else if left < EXPIRY_WARNING_DAYS * 86_400 {
            let (n, unit) = match left / 86_400 {
                0 => (left / 3600, "hour"),
                days => (days, "day"),
            };
            let plural = if n == 1 { "" } else { "s" };
            Some(format!(
                "the certificate expires on {}, in {n} {unit}{plural}: renew it",
                date(self.not_after)
            ))
        } else {
            None
        }
    }

    /// Log [`Validity::problem`] for the certificate in `path`, as a warning.
    pub fn warn(&self, path: &Path) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if let Some(problem) = self.problem(now) {
            tracing::warn!(cert = %path.display(), "{problem}");
        }
    }
}

/// A Unix time as an HTTP date (`Tue, 01 Dec 2026 00:00:00 GMT`), or for a year HTTP
/// dates cannot write (before 1970: a certificate's dates may lie there) as OpenSSL
/// writes a certificate's dates (`Jan  1 00:00:00 1969 +00:00`).
fn date(unix: i64) -> String {
    const LAST: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z, the last date X.509 writes
    match u64::try_from(unix.min(LAST)) {
        Ok(secs) => {
            httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        }
        Err(_) => x509_parser::time::ASN1Time::from_timestamp(unix)
            .map_or_else(|_| format!("Unix time {unix}"), |t| t.to_string()),
    }
}

pub fn server_config_from(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // `http/1.0` too, as nginx lists it: a client offering only that (`curl --http1.0`)
    // would otherwise get a TLS alert instead of the gate's HTTP answer.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    config.ignore_client_order = true;
    // Resumption skips the certificate signature and the key exchange's verification on
    // both sides: a client reconnecting within the ticket's life pays a fraction of a
    // full handshake. Tickets (TLS 1.2 and 1.3) are sealed with keys that rotate every
    // 6 hours and live only in this process; a certificate reload starts new ones. No
    // early data (0-RTT): an upgrade replayed by an attacker would be admitted twice.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    Ok(config)
}

/// aws-lc-rs, as everywhere in the gate, with the key exchange groups in the order of
/// their cost: X25519 first (the cheapest, and what most clients offer first), then the
/// NIST curves, then the post-quantum hybrid X25519MLKEM768. rustls takes the first group
/// in the *client's* list that is also here, so a browser that offers the hybrid first
/// still gets it. The cipher suites are rustls's, in the gate's order: see [`SUITES`].
fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::aws_lc_rs::{self, kx_group};
    rustls::crypto::CryptoProvider {
        kx_groups: vec![
            kx_group::X25519,
            kx_group::SECP256R1,
            kx_group::SECP384R1,
            kx_group::X25519MLKEM768,
        ],
        cipher_suites: SUITES.to_vec(),
        ..aws_lc_rs::default_provider()
    }
}

/// rustls's cipher suites, AES-128-GCM first (Go's and Cloudflare's order). The gate picks
/// from this list in its own order, not the client's: OpenSSL-based clients (Python, Node,
/// curl) and rustls put AES-256-GCM with SHA-384 first, and its key schedule runs SHA-512's
/// block function where SHA-256 has instructions of its own; answering them with
/// AES-128-GCM took a sixth off the gate's CPU per full handshake (measured: 499 against
/// 417 µs). The strength is that of the X25519 or P-256 key exchange either way. A client
/// that puts ChaCha20 first (one without AES instructions, such as older phones) gets its
/// own order instead: see [`Acceptor::accept`].
const SUITES: [rustls::SupportedCipherSuite; 9] = {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    [
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
};

/// Whether the first of the client's cipher suites that the gate knows is a ChaCha20 one
/// (OpenSSL's `PrioritizeChaCha`): GREASE values and suites the gate lacks are skipped.
fn prefers_chacha(offered: &[rustls::CipherSuite]) -> bool {
    use rustls::CipherSuite::*;
    offered
        .iter()
        .find(|offer| SUITES.iter().any(|ours| ours.suite() == **offer))
        .is_some_and(|first| {
            matches!(
                first,
                TLS13_CHACHA20_POLY1305_SHA256
                    | TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                    | TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
            )
        })
}

/// The certificate in force for new handshakes.
#[derive(Clone)]
pub struct Acceptor {
    configs: Arc<ArcSwap<Configs>>,
}

/// One certificate's config four ways: with `h2` in its ALPN list and without (while the
/// policy turns HTTP/2 off), each in the gate's cipher suite order and in the client's.
/// All four share the session cache and ticket keys.
struct Configs {
    h2: Orders,
    http1: Orders,
}

/// One config in two cipher suite orders: the gate's ([`SUITES`]), for most clients, and
/// the client's own, for a client whose first known suite is ChaCha20.
struct Orders {
    gates: Arc<ServerConfig>,
    clients: Arc<ServerConfig>,
}

impl Orders {
    fn new(mut gates: ServerConfig) -> Orders {
        gates.ignore_client_order = true;
        let mut clients = gates.clone();
        clients.ignore_client_order = false;
        Orders {
            gates: Arc::new(gates),
            clients: Arc::new(clients),
        }
    }
}

impl Configs {
    fn new(config: ServerConfig) -> Configs {
        let mut http1 = config.clone();
        http1.alpn_protocols.retain(|p| p.as_slice() != b"h2");
        Configs {
            h2: Orders::new(config),
            http1: Orders::new(http1),
        }
    }
}

impl Acceptor {
    pub fn new(config: ServerConfig) -> Acceptor {
        Acceptor {
            configs: Arc::new(ArcSwap::from_pointee(Configs::new(config))),
        }
    }

    /// The TLS handshake on a new connection; `h2`: whether ALPN may choose HTTP/2. The
    /// client's hello is read first, to answer one that prefers ChaCha20 in its own order.
    pub async fn accept(
        &self,
        tcp: tokio::net::TcpStream,
        h2: bool,
    ) -> io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
        let hello = rustls::server::Acceptor::default();
        let start = tokio_rustls::LazyConfigAcceptor::new(hello, tcp).await?;
        let config = {
            let configs = self.configs.load();
            let orders = if h2 { &configs.h2 } else { &configs.http1 };
            if prefers_chacha(start.client_hello().cipher_suites()) {
                orders.clients.clone()
            } else {
                orders.gates.clone()
            }
        };
        start.into_stream(config).await
    }

    /// Use this config for handshakes from now on.
    pub fn store(&self, config: ServerConfig) {
        self.configs.store(Arc::new(Configs::new(config)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ChaCha20 counts as preferred only when it is the first suite the gate knows, after
    /// GREASE values (which browsers put first) and unknown suites.
    #[test]
    fn chacha_first_is_found_past_grease_and_unknown_suites() {
        use rustls::CipherSuite::{self, *};
        let grease = CipherSuite::Unknown(0x0a0a);
        let unknown = CipherSuite::Unknown(0x1305);
        assert!(prefers_chacha(&[
            grease,
            unknown,
            TLS13_CHACHA20_POLY1305_SHA256
        ]));
        assert!(prefers_chacha(&[
            TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        ]));
        assert!(!prefers_chacha(&[
            grease,
            TLS13_AES_128_GCM_SHA256,
            TLS13_CHACHA20_POLY1305_SHA256
        ]));
        assert!(!prefers_chacha(&[
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256
        ]));
        assert!(!prefers_chacha(&[grease]));
        assert!(!prefers_chacha(&[]));
    }

    /// A chain whose intermediate lost lines from the middle of its base64 (still valid
    /// base64, with its END line), or holds a certificate request, or a block OpenSSL's
    /// way that the gate would skip, is refused, not served for every handshake to fail.
    #[test]
    fn a_chain_holding_what_is_not_a_certificate_is_refused() {
        let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
        let leaf = std::fs::read_to_string(certs.join("localhost.pem")).unwrap();
        let ca = std::fs::read_to_string(certs.join("dev-ca.pem")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chain.pem");
        std::fs::write(&path, format!("{leaf}{ca}")).unwrap();
        assert_eq!(read_chain(&path).unwrap().len(), 2);
        let mut lines: Vec<&str> = ca.lines().collect();
        lines.drain(3..5);
        std::fs::write(&path, format!("{leaf}{}\n", lines.join("\n"))).unwrap();
        assert_eq!(read_certs(&path).unwrap().len(), 2);
        let error = read_chain(&path).unwrap_err();
        assert!(matches!(error, TlsError::BadCertificate { .. }), "{error}");
        assert!(error.to_string().contains("certificate 2 of 2"), "{error}");

        // Well-formed DER that is not a certificate: a certificate request.
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let csr = params.serialize_request(&key).unwrap();
        let block = pem_block("CERTIFICATE", csr.der());
        std::fs::write(&path, format!("{leaf}{block}")).unwrap();
        let error = read_chain(&path).unwrap_err();
        assert!(error.to_string().contains("certificate 2 of 2"), "{error}");

        // OpenSSL's "TRUSTED CERTIFICATE" form would be skipped: refused, and named.
        let trusted = ca.replace("BEGIN CERTIFICATE", "BEGIN TRUSTED CERTIFICATE");
        let trusted = trusted.replace("END CERTIFICATE", "END TRUSTED CERTIFICATE");
        std::fs::write(&path, format!("{leaf}{trusted}")).unwrap();
        let error = read_chain(&path).unwrap_err();
        assert!(error.to_string().contains("TRUSTED CERTIFICATE"), "{error}");
        std::fs::write(&path, &trusted).unwrap();
        let error = read_chain(&path).unwrap_err();
        assert!(error.to_string().contains("TRUSTED CERTIFICATE"), "{error}");
    }

    /// A certificate is warned about when it has expired, is not valid yet, or ends
    /// within the warning's days; not otherwise.
    #[test]
    fn a_certificate_outside_or_near_the_end_of_its_dates_is_a_problem() {
        let day = 86_400;
        let now = 1_800_000_000; // Fri, 15 Jan 2027 08:00:00 GMT
        let validity = |from: i64, to: i64| Validity {
            not_before: now + from * day,
            not_after: now + to * day,
        };
        let expired = validity(-90, -1).problem(now).unwrap();
        assert!(
            expired.starts_with("the certificate expired on Thu, 14 Jan 2027"),
            "{expired}"
        );
        let early = validity(2, 90).problem(now).unwrap();
        assert!(
            early.contains("not valid before Sun, 17 Jan 2027"),
            "{early}"
        );
        let soon = validity(-80, 10).problem(now).unwrap();
        assert!(soon.contains("in 10 days"), "{soon}");
        let day = Validity {
            not_before: now - 80 * day,
            not_after: now + day + 600,
        };
        assert!(day.problem(now).unwrap().contains("in 1 day: renew"));
        let hours = Validity {
            not_before: now - 80 * 86_400,
            not_after: now + 7_300,
        };
        assert!(hours.problem(now).unwrap().contains("in 2 hours"));
        assert_eq!(validity(-10, 80).problem(now), None);
        // Dates past what an HTTP date can write are not a panic.
        let far = Validity {
            not_before: -5,
            not_after: i64::MAX,
        };
        assert_eq!(far.problem(now), None);
        assert!(date(i64::MAX).contains("9999"));
        // Before 1970, written as OpenSSL writes it, not as 1 Jan 1970.
        assert_eq!(date(-3 * 365 * 86_400), "Jan  2 00:00:00 1967 +00:00");
        assert!(date(i64::MIN).contains(&i64::MIN.to_string()));
    }

    /// A chain is valid from its latest notBefore to its earliest notAfter: an
    /// intermediate that expires first is the chain's expiry.
    #[test]
    fn a_chain_expires_with_its_first_certificate_to_expire() {
        let made = |from: i32, to: i32| {
            let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
            params.not_before = rcgen::date_time_ymd(from, 1, 1);
            params.not_after = rcgen::date_time_ymd(to, 1, 1);
            let key = rcgen::KeyPair::generate().unwrap();
            params.self_signed(&key).unwrap().der().clone()
        };
        let (leaf, intermediate) = (made(2021, 2090), made(2020, 2030));
        let validity = Validity::of(&[leaf.clone(), intermediate]).unwrap();
        assert_eq!(validity.not_before, 1_609_459_200); // 2021-01-01
        assert_eq!(validity.not_after, 1_893_456_000); // 2030-01-01
        assert_eq!(Validity::of(&[leaf]).unwrap().not_after, 3_786_912_000);
        assert_eq!(Validity::of(&[CertificateDer::from(vec![0x30, 0])]), None);
    }

    /// A version 1 server certificate is named as such, not taken for a key mismatch.
    #[test]
    fn a_version_1_server_certificate_is_named() {
        let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys");
        let error = server_config(&keys.join("v1-localhost.pem"), &keys.join("ec.key"));
        let error = error.expect_err("a version 1 certificate was taken");
        assert!(matches!(error, TlsError::VersionOne { .. }), "{error}");
    }

    /// `der` as a PEM block labelled `label`.
    fn pem_block(label: &str, der: &[u8]) -> String {
        use base64::Engine;
        let text = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = text
            .as_bytes()
            .chunks(64)
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    /// A key that is there but encrypted, or damaged, says so, rather than "no key found".
    #[test]
    fn an_encrypted_key_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        for (name, pem) in [
            (
                "p8.key",
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIGbMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAgAAAAAAAAAAAICCAAw\n-----END ENCRYPTED PRIVATE KEY-----\n",
            ),
            (
                "sec1.key",
                "-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-256-CBC,00000000000000000000000000000000\n\nAAAA\n-----END EC PRIVATE KEY-----\n",
            ),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            let error = read_key(&path).unwrap_err();
            assert!(matches!(error, TlsError::EncryptedKey { .. }), "{name}: {error}");
            assert!(error.to_string().contains("encrypted"), "{error}");
        }
        let path = dir.path().join("none.key");
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(read_key(&path), Err(TlsError::NoKey { .. })));
        // A key block that does not decode is there, but cannot be read: not "no key".
        let damaged = "-----BEGIN PRIVATE KEY-----\n!!!!not base64\n-----END PRIVATE KEY-----\n";
        std::fs::write(&path, damaged).unwrap();
        assert!(matches!(read_key(&path), Err(TlsError::BadKey { .. })));
    }
}
