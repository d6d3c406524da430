//! A route's `upstream` (ws:// or wss://, no credentials, a real port) and, for wss://,
//! its `upstream_tls`: the CA bundle and the name checked on the upstream's certificate.

use super::*;

impl Validator<'_> {
    pub(super) fn upstream(&mut self, p: &Pick<'_>) -> Option<Upstream> {
        let (url, field): (&str, String) = match (p.route.upstream, p.defaults.upstream) {
            (Some(u), _) => (u, format!("{}.upstream", p.at)),
            (None, Some(u)) => (u, "defaults.upstream".to_owned()),
            (None, None) => (DEFAULT_UPSTREAM, p.path("upstream")),
        };
        let tls_section = match (p.route.upstream_tls, p.defaults.upstream_tls) {
            (Some(_), _) => Some(format!("{}.upstream_tls", p.at)),
            (None, Some(_)) => Some("defaults.upstream_tls".to_owned()),
            (None, None) => None,
        };

        let uri = match Uri::from_str(url) {
            Ok(uri) => uri,
            Err(e) => {
                self.err(field, format!("not a URL: {e}"));
                return None;
            }
        };
        // Credentials are refused, and the rest of the upstream still checked, so that
        // one `check` names every mistake in it (an `upstream_tls` beside a ws:// URL too).
        let credentials = has_userinfo(&uri);
        if credentials {
            self.err(field.as_str(), NO_CREDENTIALS);
        }
        // The form the messages below, the logs and /policy show.
        let url = redact_userinfo(url);
        if let Some(error) = port_error(&uri) {
            self.err(field, format!("{url:?} {error}"));
            return None;
        }
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => {
                self.err(field, format!("{url:?} must be a ws:// or wss:// URL"));
                return None;
            }
        };
        let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
            self.err(field, format!("{url:?} has no host"));
            return None;
        };
        // A bracketed host must be an IPv6 address (a zone id, `[fe80::1%25eth0]`, would
        // be looked up as a name and fail every upgrade).
        if let Some(inner) = host.strip_prefix('[') {
            let address = inner.strip_suffix(']').unwrap_or(inner);
            if address.parse::<std::net::Ipv6Addr>().is_err() {
                self.err(
                    field,
                    format!("{url:?}: the host in brackets is not an IPv6 address (zone ids are not supported)"),
                );
                return None;
            }
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            self.err(
                field,
                format!("{url:?} must not have a path or query: the client's path is forwarded"),
            );
            return None;
        }
        let default_port = if secure { 443 } else { 80 };
        let port = uri.port_u16().unwrap_or(default_port);
        let authority = format!("{host}:{port}");
        let host_header = if port == default_port {
            host.to_owned()
        } else {
            authority.clone()
        };

        // An `upstream_tls` whose fields are all null or absent says nothing, and is no
        // error beside a ws:// upstream (the policy's reference form shows it so).
        let tls_says_something = pick!(p, upstream_tls.ca_file).is_some()
            || pick!(p, upstream_tls.server_name).is_some();
        let tls = match (secure, tls_section.filter(|_| tls_says_something)) {
            (false, Some(tls_field)) => {
                // Name the upstream too: an inherited `upstream_tls` may meet a route's own
                // ws:// upstream, and the route is the place to look.
                self.err(
                    tls_field,
                    format!("upstream_tls is only for wss:// upstreams, and {field} is {url:?}"),
                );
                return None;
            }
            (false, None) => None,
            (true, _) => {
                let bare_host = host.trim_start_matches('[').trim_end_matches(']');
                Some(self.upstream_tls(p, bare_host)?)
            }
        };
        if credentials {
            return None;
        }
        Some(Upstream {
            authority,
            tls,
            url: url.into_owned(),
            resolved: Default::default(),
            handshake_lines: crate::policy::handshake_lines(&host_header),
            host_header,
        })
    }

    /// The TLS client config for a `wss://` upstream; `ca_file` and `server_name` are
    /// picked per field like everything else.
    fn upstream_tls(&mut self, p: &Pick<'_>, host: &str) -> Option<UpstreamTls> {
        let mut roots = rustls::RootCertStore::empty();
        let ca_file = pick!(p, upstream_tls.ca_file).map(|(ca, _)| ca.clone());
        match pick!(p, upstream_tls.ca_file) {
            Some((ca, ca_field)) => {
                let certs = match crate::tls::read_certs(&self.resolve(ca)) {
                    Ok(certs) => certs,
                    Err(e) => {
                        self.err(ca_field, e.to_string());
                        return None;
                    }
                };
                for cert in certs {
                    if let Err(e) = roots.add(cert) {
                        self.err(&ca_field, format!("bad CA certificate: {e}"));
                        return None;
                    }
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let (name, field) = match pick!(p, upstream_tls.server_name) {
            Some((name, field)) => (name.clone(), field),
            None => (host.to_owned(), p.path("upstream")),
        };
        let server_name = match rustls_pki_types::ServerName::try_from(name.clone()) {
            Ok(n) => n,
            Err(_) => {
                self.err(field, format!("{name:?} is not a DNS name or IP"));
                return None;
            }
        };
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(UpstreamTls {
            config: Arc::new(config),
            server_name,
            ca_file,
        })
    }
}
