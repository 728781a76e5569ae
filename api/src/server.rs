//! The HTTP server around the routes: hyper with the limits warp's own server lacks (it builds
//! hyper's connection without a timer, so no header timeout ever fires). Slow or silent clients
//! are cut off, connections are capped below the open-file limit, and shutdown closes idle and
//! half-sent connections at once while in-flight requests finish.

use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use catalog_pipeline::trace::SPAN_TARGET;
use futures_util::future::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use tracing::Instrument;
use warp::http::{Request, StatusCode, header};

use crate::http::ApiError;
use crate::metrics::ApiMetrics;
use crate::routes::Routes;

pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Descriptors kept free of client connections: sled's files, the log, outgoing AWS calls.
pub const RESERVED_DESCRIPTORS: usize = 256;

/// Requests per second one client may make, when limited: governor's GCRA per client key.
#[derive(Debug, Clone)]
pub struct ClientRateLimit {
    pub per_second: NonZeroU32,
    /// Requests a client may make at once after a quiet spell.
    pub burst: NonZeroU32,
    /// Where the client's key comes from: the first address in this header (set by a trusted
    /// load balancer, e.g. `x-forwarded-for`), else the connection's peer address.
    pub key_header: Option<header::HeaderName>,
}

/// Paths never limited: probes and scrapes must see the service as it is.
const UNLIMITED_PATHS: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/openapi.json"];
/// How often keys not seen for a while are forgotten, so the table stays the size of the
/// clients actually calling.
const FORGET_EVERY: Duration = Duration::from_secs(60);

type KeyedLimiter = governor::DefaultKeyedRateLimiter<String>;

/// The per-client limiter the connections share.
#[derive(Clone)]
struct ClientLimiter {
    limiter: Arc<KeyedLimiter>,
    key_header: Option<header::HeaderName>,
}

impl ClientLimiter {
    fn new(limit: &ClientRateLimit) -> Self {
        let quota = governor::Quota::per_second(limit.per_second).allow_burst(limit.burst);
        Self { limiter: Arc::new(governor::RateLimiter::keyed(quota)), key_header: limit.key_header.clone() }
    }

    /// `Err(wait)` when this request is over its client's budget.
    fn check(&self, request: &Request<Incoming>, peer: IpAddr) -> Result<(), Duration> {
        if UNLIMITED_PATHS.contains(&request.uri().path()) {
            return Ok(());
        }
        let from_header = self.key_header.as_ref().and_then(|name| request.headers().get(name)).and_then(|v| v.to_str().ok());
        let key = match from_header.and_then(|v| v.split(',').next()).map(str::trim).filter(|k| !k.is_empty()) {
            Some(key) => key.to_owned(),
            None => peer.to_string(),
        };
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default())))
    }
}

fn too_many_requests(wait: Duration) -> warp::reply::Response {
    // Whole seconds, rounded up: a client that waits that long is let through.
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("over this client's request rate; retry in {secs} s"),
    )
    .into_response();
    response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs.max(1)));
    response
}

/// What one client may hold and for how long.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// From the first byte of a request to the end of its headers.
    pub header_read_timeout: Duration,
    /// A kept-alive connection with no request in progress.
    pub idle_timeout: Duration,
    /// From the end of the headers to the end of the body and the answer.
    pub body_timeout: Duration,
    /// Open client connections; more are closed as soon as they are accepted.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// The soft open-file limit of this process (`/proc/self/limits`), where the system says.
pub fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Where one connection is between requests: what the watchdog reads.
#[derive(Debug)]
struct Phase {
    /// A request is being answered (its headers have arrived).
    in_request: bool,
    /// When the first byte of the next request's headers arrived, if it has.
    head_started: Option<Instant>,
    /// When the connection last finished a request, or opened.
    idle_since: Instant,
}

impl Phase {
    /// When the connection must be closed if nothing changes, or `None` while a request is in
    /// progress (the body timeout bounds that).
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        if self.in_request {
            return None;
        }
        Some(match self.head_started {
            Some(started) => started + limits.header_read_timeout,
            None => self.idle_since + limits.idle_timeout,
        })
    }
}

type SharedPhase = Arc<Mutex<Phase>>;

fn lock(phase: &SharedPhase) -> std::sync::MutexGuard<'_, Phase> {
    phase.lock().unwrap_or_else(|p| p.into_inner())
}

/// The socket, noting when a request's first bytes arrive.
struct Watched {
    stream: TcpStream,
    phase: SharedPhase,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let mut phase = lock(&self.phase);
            if !phase.in_request && phase.head_started.is_none() {
                phase.head_started = Some(Instant::now());
            }
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Serves `routes` on `listener` until `stop` fires, then stops accepting, closes every
/// connection with no request in progress, and lets the others finish their request.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    limits: ConnectionLimits,
    client_rate: Option<ClientRateLimit>,
    metrics: ApiMetrics,
    stop: CancellationToken,
) {
    let service = warp::service(routes.filters.clone());
    let limiter = client_rate.as_ref().map(ClientLimiter::new);
    if let Some(limiter) = &limiter {
        let (limiter, stop) = (limiter.limiter.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(FORGET_EVERY) => {
                        limiter.retain_recent();
                        limiter.shrink_to_fit();
                    }
                }
            }
        });
    }
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors (EMFILE) most likely: wait for some to close.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            // Reap finished connection tasks as we go, so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            tracing::debug!(limit = limits.max_connections, "connection refused: at the connection limit");
            drop(stream);
            continue;
        };
        let (service, routes, metrics, stop) = (service.clone(), routes.clone(), metrics.clone(), stop.clone());
        let limiter = limiter.clone().map(|l| (l, peer.ip()));
        connections.spawn(async move {
            metrics.connections_open.inc();
            serve_connection(stream, (service, routes), limits, limiter, &metrics, stop).await;
            metrics.connections_open.dec();
            drop(permit);
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn serve_connection<S>(
    stream: TcpStream,
    (service, routes): (S, Routes),
    limits: ConnectionLimits,
    limiter: Option<(ClientLimiter, IpAddr)>,
    metrics: &ApiMetrics,
    stop: CancellationToken,
) where
    S: Service<Request<Incoming>, Response = warp::reply::Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let phase: SharedPhase = Arc::new(Mutex::new(Phase { in_request: false, head_started: None, idle_since: Instant::now() }));
    let io = TokioIo::new(Watched { stream, phase: phase.clone() });
    // One handle per connection: every request clones a single Arc, not each metric's.
    let shared = Arc::new((phase.clone(), metrics.clone(), limiter, routes));
    let handler = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (mut service, shared) = (service.clone(), shared.clone());
        let logged =
            tracing::enabled!(tracing::Level::DEBUG).then(|| (request.method().clone(), request.uri().clone(), Instant::now()));
        // A request with no body (every GET) has nothing to time out on: no timer for it.
        let has_body = !hyper::body::Body::is_end_stream(request.body());
        let by_hand = if has_body { None } else { shared.3.product(&request) };
        let span = server_span(&request);
        let traced = span.clone();
        let answer = async move {
            let (phase, metrics, limiter, _) = &*shared;
            if let Some((limiter, peer)) = limiter
                && let Err(wait) = limiter.check(&request, *peer)
            {
                metrics.count_response(StatusCode::TOO_MANY_REQUESTS.as_u16());
                return Ok::<_, Infallible>(too_many_requests(wait));
            }
            {
                let mut p = lock(phase);
                p.in_request = true;
                p.head_started = None;
            }
            let response = if let Some(by_hand) = by_hand {
                by_hand.await
            } else if has_body {
                match tokio::time::timeout(limits.body_timeout, service.call(request)).await {
                    Ok(Ok(response)) => response,
                    Ok(Err(never)) => match never {},
                    Err(_) => body_timed_out(limits.body_timeout),
                }
            } else {
                match service.call(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            };
            {
                let mut p = lock(phase);
                p.in_request = false;
                p.idle_since = Instant::now();
            }
            metrics.count_response(response.status().as_u16());
            if let Some((method, uri, started)) = logged {
                tracing::debug!(%method, %uri, status = response.status().as_u16(), micros = started.elapsed().as_micros() as u64, "request");
            }
            if let Some(traced) = traced {
                let status = response.status();
                traced.record("http.response.status_code", status.as_u16());
                if status.is_server_error() {
                    traced.record("otel.status_code", "ERROR");
                }
            }
            Ok::<_, Infallible>(response)
        };
        // Untraced, the request's future is exactly what it was before spans existed.
        match span {
            None => Either::Left(answer),
            Some(span) => Either::Right(answer.instrument(span)),
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The watchdog below owns every timeout: hyper's header timer would also count idle time.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(None);
    let connection = builder.serve_connection(io, handler);
    tokio::pin!(connection);
    let mut stopping = false;
    loop {
        // While a request runs, look again after an idle period: it may have finished by then.
        let wake = lock(&phase).deadline(&limits).unwrap_or_else(|| Instant::now() + limits.idle_timeout);
        tokio::select! {
            // The connection first: it is what wakes this task for every request.
            biased;
            result = connection.as_mut() => {
                if let Err(e) = result {
                    // hyper answers a request it cannot parse itself (400, or 431 for huge
                    // headers) and ends the connection: count that answer too.
                    if let Some(status) = e.downcast_ref::<hyper::Error>().and_then(refused_by_hyper) {
                        metrics.count_response(status);
                    }
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(wake) => {
                let expired = lock(&phase).deadline(&limits).is_some_and(|d| d <= Instant::now());
                if expired {
                    metrics.connections_timed_out.inc();
                    return; // dropping the connection closes the socket
                }
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                if !lock(&phase).in_request {
                    return;
                }
                // Answer the request in progress, then close.
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The server span of one request (HTTP semantic conventions), continuing the caller's trace
/// when it sent a `traceparent`. `None`, and free, unless traces are exported.
fn server_span(request: &Request<Incoming>) -> Option<tracing::Span> {
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "HTTP request",
        otel.name = tracing::field::Empty,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = request.method().as_str(),
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        url.path = request.uri().path(),
        url.query = tracing::field::Empty,
    );
    if span.is_disabled() {
        return None;
    }
    let route = route_template(request.uri().path());
    match route {
        Some(route) => {
            span.record("http.route", route);
            span.record("otel.name", format!("{} {route}", request.method()));
        }
        None => {
            span.record("otel.name", request.method().as_str());
        }
    }
    if let Some(query) = request.uri().query() {
        span.record("url.query", query);
    }
    let parent = request
        .headers()
        .get(catalog_pipeline::trace::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(catalog_pipeline::trace::parse_traceparent);
    catalog_pipeline::trace::follow(&span, parent.as_ref());
    Some(span)
}

/// The route a path matched, as its template (`http.route`); `None` for unknown paths.
fn route_template(path: &str) -> Option<&'static str> {
    Some(match path {
        "/products" => "/products",
        "/events" => "/events",
        "/admin/rebuild" => "/admin/rebuild",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/openapi.json" => "/openapi.json",
        p if crate::routes::product_segment(p).is_some() => "/products/{id}",
        _ => return None,
    })
}

/// The status hyper sent for a request it refused before our service saw it.
fn refused_by_hyper(e: &hyper::Error) -> Option<u16> {
    if e.is_parse_too_large() {
        Some(431)
    } else if e.is_parse() {
        Some(400)
    } else {
        None
    }
}

fn body_timed_out(limit: Duration) -> warp::reply::Response {
    let mut response = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!("the request body did not arrive within {} s", limit.as_secs()),
    )
    .into_response();
    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_follows_the_phase() {
        let limits = ConnectionLimits::default();
        let now = Instant::now();
        let idle = Phase { in_request: false, head_started: None, idle_since: now };
        assert_eq!(idle.deadline(&limits), Some(now + limits.idle_timeout));
        let half_sent = Phase { in_request: false, head_started: Some(now), idle_since: now };
        assert_eq!(half_sent.deadline(&limits), Some(now + limits.header_read_timeout));
        let busy = Phase { in_request: true, head_started: None, idle_since: now };
        assert_eq!(busy.deadline(&limits), None);
    }

    #[test]
    fn routes_are_named_by_their_template() {
        assert_eq!(route_template("/products/P123"), Some("/products/{id}"));
        assert_eq!(route_template("/products"), Some("/products"));
        assert_eq!(route_template("/products/"), None);
        assert_eq!(route_template("/products/a/b"), None);
        assert_eq!(route_template("/nope"), None);
    }

    #[test]
    fn the_open_file_limit_is_read_where_proc_has_it() {
        if std::path::Path::new("/proc/self/limits").exists() {
            assert!(open_file_limit().is_some_and(|n| n > 0));
        }
    }
}
