//! The agent's HTTP server: hyper HTTP/1.1 with keep-alive, and bounds on what a client can
//! hold: the request head's size, the time to send it (also the idle time of a kept-alive
//! connection), the body's size and time, a connection's life, and connections per listener.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body as _, Incoming},
    header::{self, HeaderValue},
    http::request::Parts,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};

use super::{
    Exposure, PinnedReaders, SharedView, read,
    render::{self, TextFormat, VerdictSource},
};
use crate::{AgentError, datapath::PinLayout};

/// How long the loop may be silent before `/healthz` fails.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);

/// No path takes a body: one is read up to this size (so that the connection can be kept
/// alive), a larger one is refused.
const MAX_BODY: usize = 4 * 1024;

/// After a failed accept (out of descriptors, most likely), let connections end first.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What one listener allows its clients.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Connections served at once; one more is closed as soon as it is accepted.
    connections: usize,
    /// To send a request head (the first, or the next one on a kept-alive connection, so an
    /// idle connection ends after it too) and to send a body.
    read_timeout: Duration,
    /// Request line and headers; hyper answers 431 beyond.
    max_head: usize,
    /// A connection's whole life, after which it is shut down gracefully: a client that
    /// never reads its answer cannot hold a connection slot.
    lifetime: Duration,
}

const LIMITS: Limits = Limits { connections: 32, read_timeout: Duration::from_secs(5), max_head: 16 * 1024, lifetime: Duration::from_secs(60) };

/// Binds `addr` for [`serve`]; a listener that must show everything (`--status-addr`) must
/// be on loopback.
pub async fn bind(addr: &str, flag: &'static str, full_only: bool) -> Result<(TcpListener, Exposure), AgentError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| AgentError::Serve { addr: addr.to_owned(), source })?;
    let local = listener.local_addr().map_err(|source| AgentError::Serve { addr: addr.to_owned(), source })?;
    let exposure = Exposure::of(local);
    if full_only && exposure != Exposure::Full {
        return Err(AgentError::Usage { flag, what: format!("{addr} is not a loopback address (it serves pod names, addresses and policies)") });
    }
    Ok((listener, exposure))
}

/// Serves `/healthz`, `/readyz`, `/metrics` and (with [`Exposure::Full`]) `/status` until
/// the process ends.
pub async fn serve(listener: TcpListener, exposure: Exposure, view: SharedView, pins: PinLayout) {
    let source = Arc::new(Mutex::new(PinnedReaders::open(&pins)));
    serve_with(listener, Arc::new(Endpoints::new(view, source, exposure)), LIMITS).await;
}

async fn serve_with(listener: TcpListener, endpoints: Arc<Endpoints>, limits: Limits) {
    let permits = Arc::new(Semaphore::new(limits.connections));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Over the limit: closed without reading the request.
            drop(stream);
            continue;
        };
        tokio::spawn(connection(stream, endpoints.clone(), limits, permit));
    }
}

/// Serves one connection; its slot is given back when this returns.
async fn connection(stream: TcpStream, endpoints: Arc<Endpoints>, limits: Limits, _permit: OwnedSemaphorePermit) {
    let service = service_fn(move |request| {
        let endpoints = endpoints.clone();
        async move { Ok::<_, Infallible>(endpoints.answer(request, limits.read_timeout).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.read_timeout)
        .max_buf_size(limits.max_head)
        .max_header_size(limits.max_head);
    let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), service));
    if tokio::time::timeout(limits.lifetime, conn.as_mut()).await.is_err() {
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(limits.read_timeout, conn).await;
    }
}

type Answer = Response<Full<Bytes>>;

/// What a listener serves.
#[derive(Debug)]
struct Endpoints {
    view: SharedView,
    registry: Registry,
    exposure: Exposure,
}

impl Endpoints {
    fn new(view: SharedView, source: Arc<dyn VerdictSource>, exposure: Exposure) -> Self {
        Self { registry: render::registry(view.clone(), source, exposure), view, exposure }
    }

    async fn answer(&self, request: Request<Incoming>, read_timeout: Duration) -> Answer {
        let (head, body) = request.into_parts();
        if let Err(refusal) = read_small_body(body, read_timeout).await {
            return refusal;
        }
        if head.method != Method::GET && head.method != Method::HEAD {
            let mut answer = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
            answer.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return answer;
        }
        match head.uri.path() {
            "/metrics" => self.metrics(&head),
            "/healthz" => self.health(),
            "/readyz" => self.readiness(),
            "/status" if self.exposure == Exposure::Full => self.status(),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn metrics(&self, head: &Parts) -> Answer {
        let format = TextFormat::negotiate(head.headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
        match render::render(&self.registry, format) {
            Ok(body) => answer(StatusCode::OK, format.content_type(), body),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics\n"),
        }
    }

    fn health(&self) -> Answer {
        // Healthy before the first pass too: the kubelet must not restart a starting agent.
        if read(&self.view).last_loop.is_none_or(|t| t.elapsed() < HEALTH_TIMEOUT) {
            text(StatusCode::OK, "ok\n")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "sync loop stalled\n")
        }
    }

    fn readiness(&self) -> Answer {
        if read(&self.view).ready { text(StatusCode::OK, "ready\n") } else { text(StatusCode::SERVICE_UNAVAILABLE, "waiting for the first sync\n") }
    }

    fn status(&self) -> Answer {
        match serde_json::to_string_pretty(&*read(&self.view)) {
            Ok(body) => answer(StatusCode::OK, "application/json", body),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the status\n"),
        }
    }
}

/// Reads a request body up to [`MAX_BODY`] and `timeout`; past either, the answer refuses
/// it and closes the connection, since the rest of the body is left unread.
async fn read_small_body(body: Incoming, timeout: Duration) -> Result<(), Answer> {
    if body.is_end_stream() {
        return Ok(());
    }
    let refuse = |status, why| {
        let mut answer = text(status, why);
        answer.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        answer
    };
    if body.size_hint().lower() > MAX_BODY as u64 {
        return Err(refuse(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"));
    }
    match tokio::time::timeout(timeout, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(refuse(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")),
        Ok(Err(_)) => Err(refuse(StatusCode::BAD_REQUEST, "bad request body\n")),
        Err(_) => Err(refuse(StatusCode::REQUEST_TIMEOUT, "request body too slow\n")),
    }
}

fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut answer = Response::new(Full::new(body.into()));
    *answer.status_mut() = status;
    answer.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    answer
}

fn text(status: StatusCode, body: &'static str) -> Answer {
    answer(status, "text/plain; charset=utf-8", body)
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, RwLock},
        time::Instant,
    };

    use hyper::client::conn::http1::SendRequest;
    use tokio::io::AsyncReadExt as _;

    use super::*;
    use crate::metrics::AgentView;

    /// Limits small enough for a test to reach (each request of [`get`] is a connection
    /// closed as it returns, but its slot is given back a moment later: 32 slots).
    const TEST_LIMITS: Limits =
        Limits { connections: 32, read_timeout: Duration::from_millis(500), max_head: 16 * 1024, lifetime: Duration::from_secs(30) };

    /// A server for `view` on a loopback port (shown as `exposure`), without a counters map.
    async fn start(view: AgentView, exposure: Exposure, limits: Limits) -> (std::net::SocketAddr, SharedView) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let view = Arc::new(RwLock::new(view));
        let source = Arc::new(Mutex::new(PinnedReaders { counters: None }));
        tokio::spawn(serve_with(listener, Arc::new(Endpoints::new(view.clone(), source, exposure)), limits));
        (addr, view)
    }

    /// A client connection; the task driving it ends when the server closes it.
    async fn connect(addr: std::net::SocketAddr) -> (SendRequest<Full<Bytes>>, tokio::task::JoinHandle<()>) {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        (sender, tokio::spawn(async move { connection.await.unwrap_or_default() }))
    }

    async fn send(sender: &mut SendRequest<Full<Bytes>>, method: Method, path: &str, body: &'static [u8]) -> (StatusCode, hyper::HeaderMap, String) {
        let request = Request::builder().method(method).uri(path).header(header::HOST, "test").body(Full::new(Bytes::from_static(body))).unwrap();
        let response = sender.send_request(request).await.unwrap();
        let (head, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (head.status, head.headers, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> (StatusCode, hyper::HeaderMap, String) {
        let (mut sender, _connection) = connect(addr).await;
        send(&mut sender, Method::GET, path, b"").await
    }

    #[tokio::test]
    async fn status_codes() {
        let (addr, view) = start(AgentView::new("n"), Exposure::Full, TEST_LIMITS).await;
        assert_eq!(get(addr, "/nope").await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(addr, "/healthz").await.0, StatusCode::OK, "healthy before the first pass");
        assert_eq!(get(addr, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        let (mut sender, _connection) = connect(addr).await;
        let (status, headers, _) = send(&mut sender, Method::POST, "/metrics", b"x=1").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers.get(header::ALLOW).map(HeaderValue::as_bytes), Some(&b"GET, HEAD"[..]));
        let (status, headers, body) = send(&mut sender, Method::HEAD, "/metrics", b"").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, ""), "HEAD answers without a body");
        assert!(headers.contains_key(header::CONTENT_LENGTH));

        crate::metrics::write(&view).last_loop = Instant::now().checked_sub(HEALTH_TIMEOUT * 2);
        assert_eq!(get(addr, "/healthz").await.0, StatusCode::SERVICE_UNAVAILABLE, "a stalled loop");
        crate::metrics::write(&view).ready = true;
        crate::metrics::write(&view).last_loop = Some(Instant::now());
        assert_eq!(get(addr, "/readyz").await.0, StatusCode::OK);
        assert_eq!(get(addr, "/healthz").await.0, StatusCode::OK);
        let (status, headers, body) = get(addr, "/status?x=1").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes), Some(&b"application/json"[..]));
        assert!(body.contains("\"node\": \"n\""), "{body}");
    }

    #[tokio::test]
    async fn the_node_listener_has_no_status() {
        let (addr, _view) = start(AgentView::new("n"), Exposure::Counters, TEST_LIMITS).await;
        assert_eq!(get(addr, "/status").await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(addr, "/metrics").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_speak_prometheus_text_or_openmetrics() {
        let (addr, _view) = start(AgentView::new("n"), Exposure::Full, TEST_LIMITS).await;
        let (status, headers, body) = get(addr, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/plain; version=0.0.4; charset=utf-8");
        assert!(body.contains("# TYPE policy_syncs_total counter\n"), "{body}");
        let (mut sender, _connection) = connect(addr).await;
        let accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5";
        let request = Request::get("/metrics").header(header::HOST, "t").header(header::ACCEPT, accept).body(Full::default()).unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/openmetrics-text; version=1.0.0; charset=utf-8");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.ends_with(b"# EOF\n"));
    }

    #[tokio::test]
    async fn a_connection_is_kept_alive_then_closed_when_idle() {
        let (addr, _view) = start(AgentView::new("n"), Exposure::Full, TEST_LIMITS).await;
        let (mut sender, connection) = connect(addr).await;
        assert_eq!(send(&mut sender, Method::GET, "/healthz", b"").await.0, StatusCode::OK);
        // A small body is read and does not end the connection.
        assert_eq!(send(&mut sender, Method::GET, "/metrics", b"ignored").await.0, StatusCode::OK);
        assert_eq!(send(&mut sender, Method::GET, "/readyz", b"").await.0, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!connection.is_finished(), "the same connection served three requests");
        let closed = tokio::time::timeout(TEST_LIMITS.read_timeout * 4, connection).await;
        assert!(closed.is_ok(), "an idle connection is closed after the header read timeout");
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_at_once() {
        let (addr, _view) =
            start(AgentView::new("n"), Exposure::Full, Limits { connections: 2, read_timeout: Duration::from_secs(30), ..TEST_LIMITS }).await;
        let (mut first, _c1) = connect(addr).await;
        let (second, _c2) = connect(addr).await;
        assert_eq!(send(&mut first, Method::GET, "/healthz", b"").await.0, StatusCode::OK);
        let mut third = TcpStream::connect(addr).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(2), third.read(&mut [0; 64])).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "the third connection is closed: {read:?}");
        assert_eq!(send(&mut first, Method::GET, "/healthz", b"").await.0, StatusCode::OK, "the first two are served");

        drop(second);
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let (mut next, _c) = connect(addr).await;
            let request = Request::get("/healthz").header(header::HOST, "t").body(Full::default()).unwrap();
            if next.send_request(request).await.is_ok_and(|r| r.status() == StatusCode::OK) {
                break;
            }
            assert!(Instant::now() < deadline, "a closed connection gives its slot back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn oversize_heads_and_bodies_are_refused() {
        let (addr, _view) = start(AgentView::new("n"), Exposure::Full, TEST_LIMITS).await;
        let (mut sender, _connection) = connect(addr).await;
        let huge = "a".repeat(TEST_LIMITS.max_head + 1);
        let request = Request::get("/metrics").header(header::HOST, "t").header("x-padding", huge).body(Full::default()).unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

        let (mut sender, _connection) = connect(addr).await;
        let (status, headers, _) = send(&mut sender, Method::GET, "/metrics", &[b'x'; MAX_BODY + 1]).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(headers[header::CONNECTION], "close");
    }

    #[tokio::test]
    async fn a_large_status_is_served_whole() {
        let mut view = AgentView::new("n");
        view.problems = (0..5000).map(|i| format!("NetworkPolicy ns/p{i}: a problem long enough to fill the answer")).collect();
        let (addr, _view) = start(view, Exposure::Full, TEST_LIMITS).await;
        let (status, _, body) = get(addr, "/status").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.len() > 10 * TEST_LIMITS.max_head, "{}", body.len());
        assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_status_client_reads_a_200_and_fails_otherwise() {
        let (addr, _view) = start(AgentView::new("n"), Exposure::Full, TEST_LIMITS).await;
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().to_string();
        let addr = addr.to_string();
        let fetch = |addr: &str, path: &str| crate::status::fetch(addr, path);
        let (health, ready, missing, refused, bad) = tokio::task::spawn_blocking(move || {
            (fetch(&addr, "/healthz"), fetch(&addr, "/readyz"), fetch(&addr, "/nope"), fetch(&closed, "/healthz"), fetch("localhost", "/healthz"))
        })
        .await
        .unwrap();
        assert_eq!(health.unwrap(), "ok\n");
        assert!(ready.unwrap_err().to_string().contains("503"));
        assert!(missing.unwrap_err().to_string().contains("404"));
        assert_eq!(refused.unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!(bad.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    }
}
