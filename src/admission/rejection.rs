//! Every way an upgrade can be refused, as one enum: its status, its JSON `error` reason,
//! its human message and its extra headers all come from here (the table in docs/admission.md).

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, RETRY_AFTER, SEC_WEBSOCKET_VERSION, UPGRADE, WWW_AUTHENTICATE};
use http::{HeaderMap, Response, StatusCode};

use crate::body::{full, Body};

/// Why an upgrade was refused.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("{0}")]
    NotWebsocket(&'static str),
    #[error("{0}")]
    BadRequest(&'static str),
    /// A request line over 8 KiB: 414, with the JSON reason `bad_request`.
    #[error("the request line is longer than 8 KiB")]
    UriTooLong,
    /// A request head over 16 KiB or with more than 100 fields: 431, with the JSON
    /// reason `bad_request`.
    #[error("the request head is larger than 16 KiB or has more than 100 fields")]
    HeadTooLarge,
    /// A request body that stopped arriving (nginx's `client_body_timeout`): 408, with the
    /// JSON reason `bad_request`.
    #[error("the request body stopped arriving")]
    BodyTimeout,
    #[error("no route for this path")]
    NoRoute,
    #[error("client address is not allowed")]
    IpDenied,
    #[error("too many upgrade requests; retry later")]
    RateLimited { retry_after: Duration },
    #[error("too many open connections for this {0}")]
    TooManyConnections(&'static str, Duration),
    #[error("the gate is at its connection limit")]
    ServerFull,
    #[error("the gate is shutting down")]
    Draining,
    #[error("origin is not allowed")]
    OriginNotAllowed,
    #[error("a token is required")]
    MissingToken,
    #[error("the token is not valid")]
    InvalidToken,
    #[error("the token has expired")]
    TokenExpired,
    /// A revocation (the operator API) names the token's `sub` or `jti`.
    #[error("the token has been revoked")]
    TokenRevoked,
    #[error("signing keys are not available yet")]
    KeysUnavailable { retry_after: Duration },
    #[error("the token's claims do not allow this route")]
    ClaimsDenied,
    /// `cluster.on_failure: closed` and the cluster store unreachable.
    #[error("the shared limits cannot be checked right now; retry later")]
    LimitsUnavailable { retry_after: Duration },
    /// The upstream could not be reached, or its answer broke the exchange: 502. What went
    /// wrong is the refusal log line's `cause`; the client is told less.
    #[error("{}", .0.message())]
    UpstreamUnavailable(UpstreamFault),
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    /// The upstream answered the upgrade with another status: relayed as it came.
    #[error("the upstream refused the upgrade with {}", .0.status)]
    UpstreamStatus(Box<UpstreamRefusal>),
}

/// What made the upstream unusable for one upgrade or request.
#[derive(Debug)]
pub enum UpstreamFault {
    /// Connecting failed: refused, unreachable, or this process out of file descriptors
    /// (the OS error says which).
    Connect(std::io::Error),
    /// It was reached, but the connection broke or its answer broke the rules of the
    /// exchange (a wrong `Sec-WebSocket-Accept`, an extension it was not offered, …).
    Answer(Cow<'static, str>),
}

impl UpstreamFault {
    /// The refusal's `message`, for the client.
    fn message(&self) -> &'static str {
        match self {
            UpstreamFault::Connect(_) => "the upstream could not be reached",
            UpstreamFault::Answer(_) => "the upstream did not complete the exchange",
        }
    }

    /// The fault as the refusal's log line gives it.
    pub fn cause(&self) -> String {
        match self {
            UpstreamFault::Connect(e) => format!("connect: {e}"),
            UpstreamFault::Answer(what) => what.to_string(),
        }
    }
}

/// An upstream's non-101 answer to the upgrade, relayed to the client.
#[derive(Debug)]
pub struct UpstreamRefusal {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// At most `upstream::MAX_RELAYED_BODY` bytes of the upstream's body.
    pub body: Bytes,
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::NotWebsocket(_) => StatusCode::UPGRADE_REQUIRED,
            Rejection::BadRequest(_) => StatusCode::BAD_REQUEST,
            Rejection::UriTooLong => StatusCode::URI_TOO_LONG,
            Rejection::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Rejection::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Rejection::NoRoute => StatusCode::NOT_FOUND,
            Rejection::IpDenied | Rejection::OriginNotAllowed | Rejection::ClaimsDenied => {
                StatusCode::FORBIDDEN
            }
            Rejection::RateLimited { .. } | Rejection::TooManyConnections(..) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Rejection::ServerFull
            | Rejection::Draining
            | Rejection::KeysUnavailable { .. }
            | Rejection::LimitsUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::MissingToken
            | Rejection::InvalidToken
            | Rejection::TokenExpired
            | Rejection::TokenRevoked => StatusCode::UNAUTHORIZED,
            Rejection::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            Rejection::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Rejection::UpstreamStatus(refusal) => refusal.status,
        }
    }

    /// What went wrong beyond the reason, for the refusal's log line: the upstream's fault.
    pub fn cause(&self) -> Option<String> {
        match self {
            Rejection::UpstreamUnavailable(fault) => Some(fault.cause()),
            _ => None,
        }
    }

    /// The JSON `error` value, also the `result` label of `wsgate_upgrades_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NotWebsocket(_) => "not_websocket",
            Rejection::BadRequest(_)
            | Rejection::UriTooLong
            | Rejection::HeadTooLarge
            | Rejection::BodyTimeout => "bad_request",
            Rejection::NoRoute => "no_route",
            Rejection::IpDenied => "ip_denied",
            Rejection::RateLimited { .. } => "rate_limited",
            Rejection::TooManyConnections(..) => "too_many_connections",
            Rejection::ServerFull => "server_full",
            Rejection::Draining => "draining",
            Rejection::OriginNotAllowed => "origin_not_allowed",
            Rejection::MissingToken => "missing_token",
            Rejection::InvalidToken => "invalid_token",
            Rejection::TokenExpired => "token_expired",
            Rejection::TokenRevoked => "token_revoked",
            Rejection::KeysUnavailable { .. } => "keys_unavailable",
            Rejection::ClaimsDenied => "claims_denied",
            Rejection::LimitsUnavailable { .. } => "limits_unavailable",
            Rejection::UpstreamUnavailable(_) => "upstream_unavailable",
            Rejection::UpstreamTimeout => "upstream_timeout",
            Rejection::UpstreamStatus(_) => "upstream_status",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let mut builder = Response::builder().status(status);
        let headers = builder.headers_mut().expect("a fresh builder has headers");
        // A refused client gets no further use of its connection.
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        // Rounded up: a client that waits exactly this long must not be refused again.
        let retry = |d: &Duration| HeaderValue::from(d.as_secs_f64().ceil().max(1.0) as u64);
        match &self {
            Rejection::NotWebsocket(_) => {
                // RFC 9110 §7.8: whoever sends Upgrade lists it in Connection, so that no
                // intermediary forwards it.
                headers.insert(
                    http::header::CONNECTION,
                    HeaderValue::from_static("Upgrade, close"),
                );
                headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            }
            Rejection::RateLimited { retry_after }
            | Rejection::TooManyConnections(_, retry_after)
            | Rejection::KeysUnavailable { retry_after }
            | Rejection::LimitsUnavailable { retry_after } => {
                headers.insert(RETRY_AFTER, retry(retry_after));
            }
            Rejection::MissingToken => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Rejection::InvalidToken | Rejection::TokenExpired | Rejection::TokenRevoked => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            _ => {}
        }
        if let Rejection::UpstreamStatus(refusal) = self {
            // Already without hop-by-hop and framing headers (`upstream::relay_refusal`).
            let UpstreamRefusal {
                headers: relayed,
                body,
                ..
            } = *refusal;
            for (name, value) in &relayed {
                headers.append(name.clone(), value.clone());
            }
            return builder.body(full(body)).unwrap_or_default();
        }
        let json = serde_json::json!({ "error": self.reason(), "message": self.to_string() });
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        builder
            .body(full(Bytes::from(json.to_string())))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn parts(r: Rejection) -> (u16, HeaderMap, serde_json::Value) {
        let response = r.into_response();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            headers,
            serde_json::from_slice(&body).unwrap_or_default(),
        )
    }

    /// The refusals of docs/admission.md, row by row (the integration tests drive each reachable row over
    /// real sockets; `draining` is only reachable in a race with shutdown there).
    #[tokio::test]
    async fn every_row_of_the_table() {
        let d = Duration::from_secs(3);
        let rows: Vec<(Rejection, u16, &str)> = vec![
            (Rejection::NotWebsocket("x"), 426, "not_websocket"),
            (Rejection::BadRequest("x"), 400, "bad_request"),
            (Rejection::UriTooLong, 414, "bad_request"),
            (Rejection::HeadTooLarge, 431, "bad_request"),
            (Rejection::NoRoute, 404, "no_route"),
            (Rejection::IpDenied, 403, "ip_denied"),
            (
                Rejection::RateLimited { retry_after: d },
                429,
                "rate_limited",
            ),
            (
                Rejection::TooManyConnections("address", d),
                429,
                "too_many_connections",
            ),
            (Rejection::ServerFull, 503, "server_full"),
            (Rejection::Draining, 503, "draining"),
            (Rejection::OriginNotAllowed, 403, "origin_not_allowed"),
            (Rejection::MissingToken, 401, "missing_token"),
            (Rejection::InvalidToken, 401, "invalid_token"),
            (Rejection::TokenExpired, 401, "token_expired"),
            (Rejection::TokenRevoked, 401, "token_revoked"),
            (
                Rejection::KeysUnavailable { retry_after: d },
                503,
                "keys_unavailable",
            ),
            (Rejection::ClaimsDenied, 403, "claims_denied"),
            (
                Rejection::LimitsUnavailable { retry_after: d },
                503,
                "limits_unavailable",
            ),
            (
                Rejection::UpstreamUnavailable(UpstreamFault::Answer("test".into())),
                502,
                "upstream_unavailable",
            ),
            (Rejection::UpstreamTimeout, 504, "upstream_timeout"),
        ];
        for (rejection, status, reason) in rows {
            let extra = match reason {
                "rate_limited"
                | "too_many_connections"
                | "keys_unavailable"
                | "limits_unavailable" => Some(("retry-after", "3")),
                "missing_token" => Some(("www-authenticate", "Bearer")),
                "invalid_token" | "token_expired" | "token_revoked" => {
                    Some(("www-authenticate", "Bearer error=\"invalid_token\""))
                }
                "not_websocket" => Some(("sec-websocket-version", "13")),
                _ => None,
            };
            let connection = match reason {
                "not_websocket" => "Upgrade, close",
                _ => "close",
            };
            let (got, headers, body) = parts(rejection).await;
            assert_eq!(got, status, "{reason}");
            assert_eq!(body["error"], reason);
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
            if let Some((name, value)) = extra {
                assert_eq!(headers[name], value, "{reason}");
            }
            assert_eq!(headers["connection"], connection, "{reason}");
        }
    }

    #[tokio::test]
    async fn upstream_refusal_is_relayed_as_is() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        headers.insert("set-cookie", HeaderValue::from_static("internal=1"));
        let response = Rejection::UpstreamStatus(Box::new(UpstreamRefusal {
            status: StatusCode::FORBIDDEN,
            headers,
            body: Bytes::from_static(b"no"),
        }))
        .into_response();
        assert_eq!(response.status(), 403);
        assert_eq!(response.headers()["content-type"], "text/plain");
        // End to end, as on the 101 (`upstream::relay_refusal` has removed the rest).
        assert_eq!(response.headers()["set-cookie"], "internal=1");
        assert_eq!(response.headers()["connection"], "close");
    }
}
