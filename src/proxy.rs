//! Plain HTTP on an `http: pass` route: reverse-proxied to the route's upstream with the
//! hyper-util client (pooled, streamed bodies both ways, hop-by-hop headers removed).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::admission::Rejection;
use crate::body::Body;
use crate::policy::{Route, Upstream};
use crate::upstream::{self, UpstreamStream};

/// How long the upstream may take to send a response head (nginx's proxy_read_timeout).
pub const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an unused pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

pub type PassClient = Client<Connector, Incoming>;

/// The pooled clients of the `http: pass` routes, one per route, made on first use. The
/// gate owns them; a route replaced by a reload keeps its client while a request it
/// admitted is in flight, and the entry is dropped on the next miss after that.
#[derive(Default)]
pub struct PassClients(Mutex<Vec<(Weak<Route>, PassClient)>>);

impl PassClients {
    /// The client of `route` (a reload's new routes get new clients, so an edited
    /// upstream is dialled from the first request on).
    fn of(&self, route: &Arc<Route>) -> PassClient {
        let mut clients = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let found = clients.iter().find(|(known, _)| {
            known
                .upgrade()
                .is_some_and(|known| Arc::ptr_eq(&known, route))
        });
        if let Some((_, client)) = found {
            return client.clone();
        }
        clients.retain(|(known, _)| known.strong_count() > 0);
        let made = client(route);
        clients.push((Arc::downgrade(route), made.clone()));
        made
    }
}

fn client(route: &Route) -> PassClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(32)
        .build(Connector {
            upstream: route.upstream.clone(),
            timeout: route.timeouts.upstream_connect,
        })
}

/// Forward a plain HTTP request whose headers were already rewritten for the upstream, to
/// `target`: the routed form of its path (see `crate::path`) and its query without the
/// token parameters.
pub async fn forward(
    clients: &PassClients,
    route: &Arc<Route>,
    target: &str,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, Rejection> {
    let scheme = if route.upstream.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = Uri::try_from(format!("{scheme}://{}{target}", route.upstream.authority))
        .map_err(|_| Rejection::BadRequest("invalid request target"))?;
    *request.uri_mut() = uri;
    // The upstream is always reached over HTTP/1.1, whatever the client spoke.
    *request.version_mut() = http::Version::HTTP_11;
    if let Ok(host) = HeaderValue::from_str(&route.upstream.host_header) {
        request.headers_mut().insert(header::HOST, host);
    }
    let client = clients.of(route);
    let response = match tokio::time::timeout(RESPONSE_HEAD_TIMEOUT, client.request(request)).await
    {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            tracing::debug!(upstream = %route.upstream.url, error = %e, "pass-through request failed");
            let timed_out = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<io::Error>())
                .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut);
            return Err(if timed_out {
                Rejection::UpstreamTimeout
            } else {
                Rejection::UpstreamUnavailable
            });
        }
        Err(_) => return Err(Rejection::UpstreamTimeout),
    };
    // A 101 to a request that asked for no upgrade opens nothing the gate would relay.
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        tracing::debug!(upstream = %route.upstream.url, "upstream answered a plain request with 101");
        return Err(Rejection::UpstreamUnavailable);
    }
    let (mut parts, body) = response.into_parts();
    upstream::strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// Dials the route's upstream whatever the URI says (the URI only keys the pool).
#[derive(Clone)]
pub struct Connector {
    upstream: Upstream,
    timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = PassConn;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PassConn>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let upstream = self.upstream.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, upstream::dial(&upstream)).await {
                Ok(stream) => Ok(PassConn(TokioIo::new(stream?))),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "upstream connect timed out",
                )),
            }
        })
    }
}

/// A pooled pass-through connection.
pub struct PassConn(TokioIo<UpstreamStream>);

impl Connection for PassConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for PassConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for PassConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
