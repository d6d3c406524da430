//! The `auth` section of a route: token sources, algorithms, keys (each loaded and
//! checked against the algorithms' families), issuers, audiences and claims.

use super::*;

/// Smallest HMAC secret accepted: RFC 7518 §3.2 asks for a key at least as long as the hash.
const MIN_HMAC_SECRET_BYTES: usize = crate::mint::MIN_SECRET_BYTES;

/// The key families a route's `auth.algorithms` names, for the keys it lists.
struct Families<'a> {
    names: HashSet<KeyFamily>,
    /// The algorithms themselves, for a key pinned to one by its `alg` (`None` when one of
    /// them did not parse: which it meant is unknown).
    algorithms: Option<Vec<Algorithm>>,
    /// Where the algorithms were set, and the route (`routes[i]`) they apply to.
    field: String,
    route: &'a str,
}

impl Families<'_> {
    /// The warning for a key no algorithm of the route can use.
    fn unused(&self, family: KeyFamily) -> String {
        let what = match family {
            KeyFamily::Hmac => "an HMAC secret, but no HS* algorithm",
            KeyFamily::Rsa => "an RSA key, but no RS*/PS* algorithm",
            KeyFamily::Ec => "an EC key, but no ES* algorithm",
            KeyFamily::Ed => "an Ed25519 key, but no EdDSA algorithm",
        };
        format!(
            "{what} is in {} (for {}): the key is never used",
            self.field, self.route
        )
    }

    /// Whether a key of `family`, pinned to `alg` if it names one, verifies any algorithm
    /// of the route; if not, the warning to give.
    fn judge(&self, family: KeyFamily, alg: Option<Algorithm>) -> Result<(), String> {
        if !self.names.contains(&family) {
            return Err(self.unused(family));
        }
        match (alg, &self.algorithms) {
            (Some(alg), Some(algorithms)) if !algorithms.contains(&alg) => Err(format!(
                "a key whose alg is {alg:?}, which is not in {} (for {}): the key is never used",
                self.field, self.route
            )),
            _ => Ok(()),
        }
    }
}

impl Validator<'_> {
    pub(super) fn auth(&mut self, p: &Pick<'_>) -> Auth {
        let required = pick!(p, auth.required).map(|(b, _)| *b).unwrap_or(true);

        let picked = pick!(p, auth.token_sources);
        let token_sources = match &picked {
            Some((list, field)) => self.token_sources(field, list),
            None => DEFAULT_TOKEN_SOURCES
                .iter()
                .filter_map(|s| parse_token_source(s).ok())
                .collect(),
        };
        if required && token_sources.is_empty() {
            self.err(
                picked.map_or_else(|| p.path("auth.token_sources"), |(_, field)| field),
                "auth is required but no token source is listed",
            );
        }

        let errors_before = self.errors.len();
        let (algorithms, alg_field) = match pick!(p, auth.algorithms) {
            Some((list, field)) => (self.algorithms(&field, list), field),
            None => (
                DEFAULT_ALGORITHMS
                    .iter()
                    .filter_map(|a| Algorithm::from_str(a).ok())
                    .collect(),
                p.path("auth.algorithms"),
            ),
        };
        // HMAC and public-key algorithms may be listed together (an issuer moving from
        // HS256 to RS256): a token is only ever tried against keys of its `alg`'s family,
        // so a public key never serves as an HMAC secret (admission::token::try_keys).
        // With a misspelt algorithm, which family it meant is unknown: the keys are not
        // judged by the rest (its error is the one to read, not "no key of a family").
        let misspelt = self.errors.len() > errors_before;
        let families = Families {
            algorithms: (!misspelt).then(|| algorithms.clone()),
            names: if misspelt {
                HashSet::from([
                    KeyFamily::Hmac,
                    KeyFamily::Rsa,
                    KeyFamily::Ec,
                    KeyFamily::Ed,
                ])
            } else {
                algorithms.iter().map(|a| KeyFamily::of(*a)).collect()
            },
            field: alg_field,
            route: p.at,
        };

        let mut keys = Vec::new();
        let mut jwks_urls = Vec::new();
        let mut unusable = 0;
        let keys_field = pick!(p, auth.keys).map(|(list, field)| {
            for (i, k) in list.iter().enumerate() {
                unusable += self.key(
                    &format!("{field}[{i}]"),
                    k,
                    &families,
                    &mut keys,
                    &mut jwks_urls,
                );
            }
            field
        });
        // A listed key that failed to load, or an algorithm that did not parse, has its own
        // error; "no keys" would only mislead.
        let failed_keys = self.errors.len() > errors_before;
        if required && keys.is_empty() && jwks_urls.is_empty() && !failed_keys {
            let field = keys_field.unwrap_or_else(|| p.path("auth.keys"));
            if unusable > 0 {
                // Keys of the wrong family are a warning, however many: the route loads
                // and refuses every token (fail closed), as a route whose keys all
                // rotated away would.
                self.warn(
                    field,
                    format!(
                        "auth is required but no configured key verifies an algorithm \
                         auth.algorithms names: every token on {} is refused",
                        p.at
                    ),
                );
            } else {
                self.err(field, "auth is required but no keys are configured");
            }
        }

        let issuer = pick!(p, auth.issuer)
            .map(|(l, _)| l.clone())
            .unwrap_or_default();
        let audience = pick!(p, auth.audience)
            .map(|(l, _)| l.clone())
            .unwrap_or_default();
        let (leeway_seconds, field) = pick_or!(p, auth.leeway_seconds, DEFAULT_LEEWAY_SECONDS);
        if leeway_seconds > 3600 {
            self.err(field, "must be at most 3600");
        }

        let require_claims = self.claim_values(pick!(p, auth.require_claims), "accepted");
        let deny_claims = self.claim_values(pick!(p, auth.deny_claims), "denied");
        let mut forward_claims: Vec<(String, HeaderName)> = Vec::new();
        if let Some((map, field)) = pick!(p, auth.forward_claims) {
            for (claim, header) in map {
                let at = format!("{field}.{claim}");
                let Ok(h) = HeaderName::from_str(header) else {
                    self.err(at, format!("{header:?} is not a valid header name"));
                    continue;
                };
                let why = if header.contains('_') {
                    // A client header with an underscore is dropped, but its dash spelling
                    // is not: CGI, WSGI and Rack servers read both as one variable, so a
                    // client could set the identity the gate vouches for.
                    format!(
                        "{header:?} has an underscore, which servers behind CGI, WSGI or Rack \
                         read as {:?}, a header any client can send: write that",
                        header.replace('_', "-")
                    )
                } else if let Some((other, _)) = forward_claims.iter().find(|(_, o)| *o == h) {
                    format!("{header:?} is already the header of the claim {other:?}: one of them would be lost")
                } else if h == http::header::CONTENT_LENGTH {
                    // Content-Length frames the request: from a claim it would make the
                    // upstream read the first frames' bytes as a body.
                    format!("{header:?} frames the request; a claim cannot set it")
                } else if crate::upstream::is_reserved_header(&h) {
                    format!("{header:?} is a header wsgate sets itself")
                } else {
                    forward_claims.push((claim.clone(), h));
                    continue;
                };
                self.err(at, why);
            }
        }
        let close_on_expiry = pick!(p, auth.close_on_expiry)
            .map(|(b, _)| *b)
            .unwrap_or(true);
        let forward_token = pick!(p, auth.forward_token)
            .map(|(b, _)| *b)
            .unwrap_or(false);

        Auth {
            required,
            token_sources,
            algorithms,
            keys,
            jwks_urls,
            issuer,
            audience,
            leeway_seconds,
            require_claims,
            deny_claims,
            forward_claims,
            close_on_expiry,
            forward_token,
        }
    }

    /// `require_claims` or `deny_claims`: claim → values, each with at least one value.
    fn claim_values(
        &mut self,
        picked: Option<(&BTreeMap<String, Vec<String>>, String)>,
        kind: &str,
    ) -> Vec<(String, Vec<String>)> {
        let Some((map, field)) = picked else {
            return Vec::new();
        };
        map.iter()
            .map(|(claim, values)| {
                if values.is_empty() {
                    self.err(
                        format!("{field}.{claim}"),
                        format!("needs at least one {kind} value"),
                    );
                }
                (claim.clone(), values.clone())
            })
            .collect()
    }

    fn token_sources(&mut self, field: &str, list: &[String]) -> Vec<TokenSource> {
        let mut out = Vec::new();
        for (i, s) in list.iter().enumerate() {
            match parse_token_source(s) {
                Ok(src) => out.push(src),
                Err(e) => self.err(format!("{field}[{i}]"), e),
            }
        }
        out
    }

    fn algorithms(&mut self, field: &str, list: &[String]) -> Vec<Algorithm> {
        let mut out = Vec::new();
        for (i, name) in list.iter().enumerate() {
            if name.eq_ignore_ascii_case("none") {
                self.err(
                    format!("{field}[{i}]"),
                    "\"none\" is never accepted: tokens must be signed",
                );
                continue;
            }
            match Algorithm::from_str(name) {
                Ok(a) => out.push(a),
                Err(_) => self.err(
                    format!("{field}[{i}]"),
                    format!(
                        "unknown algorithm {name:?} (known: HS256 HS384 HS512 RS256 RS384 RS512 \
                         PS256 PS384 PS512 ES256 ES384 EdDSA)"
                    ),
                ),
            }
        }
        out
    }

    /// Load one `auth.keys` entry into `keys` (or `jwks_urls`). Returns how many of its
    /// keys were left out, with a warning, for being of a family no algorithm names.
    fn key(
        &mut self,
        at: &str,
        k: &file::KeyFile,
        families: &Families<'_>,
        keys: &mut Vec<Key>,
        jwks_urls: &mut Vec<JwksUrl>,
    ) -> usize {
        let sources = [
            k.hmac_secret_env.is_some(),
            k.hmac_secret_file.is_some(),
            k.public_key_file.is_some(),
            k.jwks_file.is_some(),
            k.jwks_url.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            self.err(
                at,
                "exactly one of hmac_secret_env, hmac_secret_file, public_key_file, jwks_file, \
                 jwks_url must be set",
            );
            return 0;
        }
        if k.refresh_seconds.is_some() && k.jwks_url.is_none() {
            self.err(format!("{at}.refresh_seconds"), "only applies to jwks_url");
        }
        if k.kid.is_some() && (k.jwks_file.is_some() || k.jwks_url.is_some()) {
            self.err(format!("{at}.kid"), "a JWKS names its keys itself");
        }
        let mut unusable = 0;
        let mut check_family =
            |v: &mut Self, field: &str, family: KeyFamily, alg| match families.judge(family, alg) {
                Ok(()) => true,
                Err(warning) => {
                    unusable += 1;
                    v.warn(field, warning);
                    false
                }
            };

        if let Some(var) = &k.hmac_secret_env {
            let field = format!("{at}.hmac_secret_env");
            // A name no deployment can set: `check` would only warn that it is not set,
            // and every `run` would refuse the policy.
            if let Some(why) = values::env_name_error(var) {
                self.err(field, why);
                return 0;
            }
            let shown = values::env_name_shown(var);
            match std::env::var(var) {
                Ok(secret) => {
                    self.hmac_key(&field, secret.into_bytes(), k, keys, &mut check_family)
                }
                Err(_) if self.purpose == super::Purpose::Check => {
                    self.warn(
                        &field,
                        format!(
                            "environment variable {shown} is not set here: `wsgate run` refuses \
                             this policy where it is not"
                        ),
                    );
                    // Judged as the key that will be there.
                    let placeholder = vec![0; MIN_HMAC_SECRET_BYTES];
                    self.hmac_key(&field, placeholder, k, keys, &mut check_family)
                }
                Err(_) => self.err(field, format!("environment variable {shown} is not set")),
            }
        } else if let Some(path) = &k.hmac_secret_file {
            let field = format!("{at}.hmac_secret_file");
            let resolved = self.resolve(path);
            match std::fs::read(&resolved) {
                Ok(mut secret) => {
                    while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
                        secret.pop();
                    }
                    self.hmac_key(&field, secret, k, keys, &mut check_family)
                }
                Err(e) => self.err(field, cannot_read(path, &resolved, &e)),
            }
        } else if let Some(path) = &k.public_key_file {
            let field = format!("{at}.public_key_file");
            let resolved = self.resolve(path);
            let pem = match std::fs::read(&resolved) {
                Ok(pem) => pem,
                Err(e) => {
                    self.err(field, cannot_read(path, &resolved, &e));
                    return 0;
                }
            };
            // jsonwebtoken takes an RSA private key's PEM as a key, which then verifies
            // nothing: every token would be refused, and a signing key be mounted in the
            // gate that has no use for it.
            if pem
                .windows(b"PRIVATE KEY-----".len())
                .any(|w| w == b"PRIVATE KEY-----")
            {
                self.err(
                    field,
                    format!(
                        "{path} is a private key: give the public key (openssl pkey -in {path} -pubout); \
                         the gate only verifies tokens"
                    ),
                );
                return 0;
            }
            let parsed = DecodingKey::from_rsa_pem(&pem)
                .map(|k| (KeyFamily::Rsa, k))
                .or_else(|_| DecodingKey::from_ec_pem(&pem).map(|k| (KeyFamily::Ec, k)))
                .or_else(|_| DecodingKey::from_ed_pem(&pem).map(|k| (KeyFamily::Ed, k)));
            match parsed {
                Ok((family, decoding)) => {
                    if check_family(self, &field, family, None) {
                        keys.push(Key {
                            kid: k.kid.clone(),
                            family,
                            alg: None,
                            decoding,
                        });
                    }
                }
                Err(_) => self.err(
                    field,
                    format!("{path} is not an RSA, EC or Ed25519 public key PEM"),
                ),
            }
        } else if let Some(path) = &k.jwks_file {
            let field = format!("{at}.jwks_file");
            let resolved = self.resolve(path);
            let text = match std::fs::read(&resolved) {
                Ok(text) => text,
                Err(e) => {
                    self.err(field, cannot_read(path, &resolved, &e));
                    return 0;
                }
            };
            match parse_jwks(&text) {
                Ok(set) => {
                    for ignored in &set.ignored {
                        self.warn(&field, format!("{ignored}; ignored"));
                    }
                    if set.keys.is_empty() {
                        self.err(&field, "the key set has no usable keys");
                    }
                    for key in set.keys {
                        if check_family(self, &field, key.family, key.alg) {
                            keys.push(key);
                        }
                    }
                }
                Err(e) => self.err(field, e),
            }
        } else if let Some(url) = &k.jwks_url {
            let not_https = "must be an https:// URL";
            let problem = match Uri::from_str(url) {
                Ok(uri) if has_userinfo(&uri) => Some(NO_CREDENTIALS),
                Ok(uri) if uri.host().is_none_or(str::is_empty) => Some("has no host"),
                Ok(uri) => {
                    port_error(&uri).or_else(|| (!url.starts_with("https://")).then_some(not_https))
                }
                Err(_) => Some(not_https),
            };
            if let Some(problem) = problem {
                self.err(format!("{at}.jwks_url"), problem);
            }
            let refresh = k.refresh_seconds.unwrap_or(DEFAULT_JWKS_REFRESH_SECONDS);
            if refresh == 0 {
                self.err(format!("{at}.refresh_seconds"), "must be at least 1");
            }
            jwks_urls.push(JwksUrl {
                url: url.clone(),
                refresh: Duration::from_secs(refresh),
            });
        }
        unusable
    }

    fn hmac_key(
        &mut self,
        field: &str,
        secret: Vec<u8>,
        k: &file::KeyFile,
        keys: &mut Vec<Key>,
        check_family: &mut impl FnMut(&mut Self, &str, KeyFamily, Option<Algorithm>) -> bool,
    ) {
        if secret.len() < MIN_HMAC_SECRET_BYTES {
            self.err(
                field,
                format!(
                    "HMAC secret is {} bytes; at least {MIN_HMAC_SECRET_BYTES} are required",
                    secret.len()
                ),
            );
            return;
        }
        // Whitespace around it is no secret: 32 spaces in a variable would pass the length
        // (a secret file is trimmed before this, and such a file is refused).
        let meaningful = secret.trim_ascii().len();
        if meaningful < MIN_HMAC_SECRET_BYTES {
            self.err(
                field,
                format!(
                    "HMAC secret is {meaningful} bytes without the whitespace around it; at least \
                     {MIN_HMAC_SECRET_BYTES} are required"
                ),
            );
            return;
        }
        if check_family(self, field, KeyFamily::Hmac, None) {
            keys.push(Key {
                kid: k.kid.clone(),
                family: KeyFamily::Hmac,
                alg: None,
                decoding: DecodingKey::from_secret(&secret),
            });
        }
    }
}

fn parse_token_source(s: &str) -> Result<TokenSource, String> {
    let named = |rest: &str, kind: &str| {
        if rest.is_empty() {
            Err(format!(
                "{kind}: needs a name, e.g. \"{kind}:access_token\""
            ))
        } else {
            Ok(rest.to_owned())
        }
    };
    if s == "header" {
        Ok(TokenSource::Header)
    } else if let Some(rest) = s.strip_prefix("query:") {
        named(rest, "query").map(TokenSource::Query)
    } else if let Some(rest) = s.strip_prefix("cookie:") {
        named(rest, "cookie").map(TokenSource::Cookie)
    } else if let Some(rest) = s.strip_prefix("subprotocol:") {
        named(rest, "subprotocol").map(TokenSource::Subprotocol)
    } else {
        Err(format!(
            "unknown token source {s:?} (header, query:NAME, cookie:NAME, subprotocol:PREFIX)"
        ))
    }
}

/// A key file that cannot be read: as written, and where a relative path led (beside the
/// policy file).
fn cannot_read(path: &str, resolved: &std::path::Path, e: &std::io::Error) -> String {
    if std::path::Path::new(path) == resolved {
        format!("cannot read {path}: {e}")
    } else {
        format!("cannot read {path} ({}): {e}", resolved.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_sources() {
        assert_eq!(
            parse_token_source("query:t"),
            Ok(TokenSource::Query("t".into()))
        );
        assert!(parse_token_source("query:").is_err());
        assert!(parse_token_source("body").is_err());
    }
}
