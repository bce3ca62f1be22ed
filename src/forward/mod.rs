//! Sending a granted request to its pod and streaming the answer back.
//!
//! The upstream exchange owns the [`Slot`] and always runs to its end: if the
//! client leaves, the exchange goes on in the background until the pod has
//! finished answering (the body is read and discarded), bounded by
//! `request_timeout`. Only then is
//! the slot freed, so a client that gives up cannot put a second generation on
//! a busy pod (Knative frees it early and overloads the pod).
//!
//! Bodies stream both ways; hop-by-hop headers are removed; `X-Forwarded-*` are
//! added; HTTP/1.1 upgrades (websockets) are tunnelled holding their slot.

pub mod answer;
pub mod quarantine;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::body::{BoxError, Buffered, ResponseBody};
use crate::error::{chain, ProxyError, UpstreamFailure};
use crate::gate::Slot;
use crate::pod::{Pool, ReplayableBody, Reply, SendError, Share};
use quarantine::Policy;

/// How an exchange with a pod ended without a response for the client.
#[derive(Debug)]
pub enum ExchangeError {
    /// The connection to the pod failed before any byte of the request was
    /// sent: safe to send the request to another pod. The upgrade handle comes
    /// back so the retry can still tunnel.
    NotSent { reason: String, upgrade: Option<OnUpgrade>, request: Box<Request<ReplayableBody>> },
    /// The pod failed after the request (or part of it) was sent.
    Failed(ProxyError),
}

/// Sends requests to pods on the pod client ([`Pool`]).
#[derive(Clone)]
pub struct Forwarder {
    pool: Arc<Pool>,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new(Pool::shared())
    }
}

impl Forwarder {
    pub fn new(pool: Arc<Pool>) -> Self {
        Self { pool }
    }

    /// Sends `request` to the slot's pod; the future gives the response head
    /// once it arrives. The exchange owns the slot and runs to its end even if
    /// the caller stops waiting (client gone): see [`FinishOnDrop`]. Not an
    /// async fn: the caller's state holds the boxed exchange, not its
    /// arguments as well.
    pub fn exchange(
        &self,
        slot: Slot,
        request: Request<ReplayableBody>,
        limits: ExchangeLimits,
        upgrade: Option<OnUpgrade>,
        on_abandon: Option<Abandon>,
    ) -> FinishOnDrop<impl Future<Output = Result<Response<ResponseBody>, ExchangeError>> + Send + 'static> {
        let mut exchange = FinishOnDrop::new(run_exchange(self.pool.clone(), slot, request, limits, upgrade));
        exchange.on_abandon = on_abandon;
        exchange
    }

    /// What to do when a client leaves before its pod answered: POST `path`
    /// to the pod (e.g. `/sdapi/v1/interrupt`) so it stops the generation.
    /// The call takes no slot; the original exchange keeps its slot until the
    /// pod has answered it.
    pub fn interrupt(&self, pod: SocketAddr, path: &str, host: Option<&HeaderValue>) -> Abandon {
        let pool = self.pool.clone();
        let uri = format!("http://{pod}{path}");
        let path = path.to_string();
        let mut headers = HeaderMap::new();
        if let Some(host) = host {
            headers.insert(header::HOST, host.clone());
        }
        Box::new(move || {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
            runtime.spawn(async move {
                let body = Some(Bytes::from_static(b"{}"));
                let timeout = Duration::from_secs(10);
                match pool.call(pod, http::Method::POST, &path, Some(&headers), body, 64 * 1024, timeout).await {
                    Reply::Answer(status, _) => {
                        tracing::info!(%uri, status = status.as_u16(), "client left: interrupted its generation")
                    }
                    Reply::Refused(error) => tracing::warn!(%uri, %error, "client left: interrupt failed"),
                    Reply::Oversized(status) => {
                        tracing::info!(%uri, status = status.as_u16(), "client left: interrupted its generation")
                    }
                    Reply::Nothing => tracing::warn!(%uri, "client left: interrupt got no answer"),
                }
            });
        })
    }
}

/// How long a pod may take, and how much of its answer sdgate reads before
/// passing it on.
#[derive(Clone, Debug)]
pub struct ExchangeLimits {
    /// Until the answer starts; then again to read a buffered answer.
    pub request_timeout: Duration,
    /// Answers up to this size are read in full before the client gets
    /// them, so the slot is freed when the pod is done, not the client.
    pub buffer_response_bytes: usize,
    /// How a pod sdgate gave up on is known to be idle again (none: its
    /// slot is freed at once). Taken from the service's config when the
    /// request is dispatched, so a reload applies to the next exchange.
    pub quarantine: Option<Arc<Policy>>,
    /// When the exchange may take a connection another thread drives.
    pub share: Share,
    /// A tunnel with no byte either way for this long is closed.
    pub tunnel_idle: Duration,
}

/// Called when a client leaves before its pod has answered.
pub type Abandon = Box<dyn FnOnce() + Send>;

/// A future that is finished even if its caller drops it: dropped before
/// completion, it is handed to the runtime to complete on its own. The
/// exchange holds the pod's slot, so a client that leaves cannot free the slot
/// before the pod has answered; on the common path (the client waits) this
/// costs no task spawn. Its output, dropped in the background, drains the
/// rest of the pod's answer (see [`SlotBody`]).
pub struct FinishOnDrop<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    inner: Option<Pin<Box<F>>>,
    /// Called if the future is dropped before it finished.
    pub on_abandon: Option<Abandon>,
}

impl<F: Future + Send + 'static> FinishOnDrop<F>
where
    F::Output: Send + 'static,
{
    pub fn new(future: F) -> Self {
        Self { inner: Some(Box::pin(future)), on_abandon: None }
    }
}

impl<F: Future + Send + 'static> Future for FinishOnDrop<F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Pending };
        let output = std::task::ready!(inner.as_mut().poll(cx));
        self.inner = None;
        Poll::Ready(output)
    }
}

impl<F: Future + Send + 'static> Drop for FinishOnDrop<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let (Some(inner), Ok(runtime)) = (self.inner.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(inner);
            if let Some(on_abandon) = self.on_abandon.take() {
                on_abandon();
            }
        }
    }
}

async fn run_exchange(
    pool: Arc<Pool>,
    slot: Slot,
    request: Request<ReplayableBody>,
    limits: ExchangeLimits,
    upgrade: Option<OnUpgrade>,
) -> Result<Response<ResponseBody>, ExchangeError> {
    let request_timeout = limits.request_timeout;
    let policy = limits.quarantine;
    let addr = slot.addr();
    // A request that named a checkpoint teaches the pod's times; a
    // generation's answer says what the pod ran on.
    let timed_since = slot.is_timed().then(tokio::time::Instant::now);
    let generation = slot.is_tracked() && request.method() == http::Method::POST;
    let body = request.body().clone();
    // One timer for the exchange: until the answer starts, then reset to
    // read a buffered answer.
    let mut deadline = std::pin::pin!(tokio::time::sleep(request_timeout));
    let sent = within(deadline.as_mut(), std::pin::pin!(pool.send(addr, request, limits.share))).await;
    let (mut response, sent) = match sent {
        Some(Ok(sent)) => sent,
        Some(Err(SendError::Connect(reason, request))) if !body.was_read() => {
            // The pod refused or is unreachable: take it out of rotation now,
            // before the slot goes back, so nobody else is sent there.
            slot.gate().set_ready(slot.endpoint(), false);
            slot.gate().observer().upstream_failed(UpstreamFailure::Connect);
            return Err(ExchangeError::NotSent { reason, upgrade, request });
        }
        Some(Err(SendError::Connect(reason, _))) => {
            quarantine::hold(slot, "failed before answering", policy);
            return Err(ExchangeError::Failed(ProxyError::Upstream {
                addr: addr.to_string(),
                reason,
                kind: Some(UpstreamFailure::Failed),
            }));
        }
        Some(Err(SendError::Http(error))) if client_body_failed(&error) => {
            // The client's upload broke off or went over the limit: the pod
            // never had a whole request. Not the pod's fault.
            drop(slot);
            return Err(ExchangeError::Failed(upstream_failure(addr, &error)));
        }
        Some(Err(SendError::Http(error))) => {
            // Sent, at least in part: the pod may be working on it.
            quarantine::hold(slot, "failed before answering", policy);
            return Err(ExchangeError::Failed(upstream_failure(addr, &error)));
        }
        None => {
            quarantine::hold(slot, "request_timeout", policy);
            return Err(ExchangeError::Failed(ProxyError::UpstreamTimeout {
                addr: addr.to_string(),
                timeout: request_timeout,
            }));
        }
    };
    let switched_to = match response.status() {
        StatusCode::SWITCHING_PROTOCOLS => response.headers().get(header::UPGRADE).cloned(),
        _ => None,
    };
    remove_hop_by_hop(response.headers_mut());
    if let (Some(client_side), Some(protocol)) = (upgrade, switched_to) {
        response.headers_mut().insert(header::UPGRADE, protocol);
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        return Ok(tunnel(slot, response, client_side, policy, limits.tunnel_idle));
    }
    if is_event_stream(response.headers()) {
        return Ok(response.map(|body| SlotBody::new(body, slot, request_timeout, policy).boxed_unsync()));
    }
    let (parts, body) = response.into_parts();
    deadline.as_mut().reset(tokio::time::Instant::now() + request_timeout);
    let read = within(deadline, std::pin::pin!(crate::body::buffer(body, limits.buffer_response_bytes))).await;
    let body = match read {
        Some(Ok(Buffered::Complete(bytes))) => {
            // What it ran on, from the answer of a request that named a checkpoint.
            if generation {
                // A gzipped answer is inflated on a blocking thread (some
                // milliseconds for an SDXL answer): the serving thread serves on.
                let gzipped = parts.status.is_success()
                    && parts.headers.get(header::CONTENT_ENCODING).is_some_and(answer::is_gzip);
                let inflated = match gzipped {
                    true => {
                        let bytes = bytes.clone();
                        tokio::task::spawn_blocking(move || answer::gunzip_tail(&bytes)).await.ok().flatten()
                    }
                    false => None,
                };
                learn_from(&slot, &parts, &bytes, inflated.as_deref(), timed_since);
            }
            // The pod has answered in full: its slot is free before the
            // client has read a byte, and its connection takes the next.
            slot.answered();
            sent.put_back(&pool, addr);
            crate::body::full(bytes)
        }
        Some(Ok(Buffered::Partial(head, rest))) => {
            crate::body::chain(head, SlotBody::new(rest, slot, request_timeout, policy))
        }
        Some(Err(error)) => {
            quarantine::hold(slot, "answer broken off", policy);
            return Err(ExchangeError::Failed(ProxyError::Upstream {
                addr: addr.to_string(),
                reason: format!("answer broken off: {}", chain(&error)),
                kind: Some(UpstreamFailure::Reset),
            }));
        }
        None => {
            quarantine::hold(slot, "answer not finished within request_timeout", policy);
            return Err(ExchangeError::Failed(ProxyError::UpstreamTimeout {
                addr: addr.to_string(),
                timeout: request_timeout,
            }));
        }
    };
    Ok(Response::from_parts(parts, body))
}

/// What a generation's answer in full teaches (see [`answer`]): only a
/// success is read (an error loaded nothing for sure), plain or gzipped
/// (the WebUI gzips for clients that accept it: `inflated` is its tail,
/// the answer is passed on as sent); only a request that named a
/// checkpoint is timed.
fn learn_from(
    slot: &Slot,
    parts: &http::response::Parts,
    bytes: &[u8],
    inflated: Option<&[u8]>,
    since: Option<tokio::time::Instant>,
) {
    let readable = match parts.headers.get(header::CONTENT_ENCODING) {
        None => Some(bytes),
        Some(encoding) if answer::is_gzip(encoding) => inflated,
        Some(_) => None,
    };
    let plain = parts.status.is_success() && readable.is_some();
    // Only a caller's meter wants the count (a search of the whole answer).
    if let Some(images) = readable.filter(|_| plain && slot.is_metered()).and_then(answer::images_in) {
        slot.generated(images);
    }
    match (plain, since) {
        (true, Some(since)) => slot.learn(readable.and_then(answer::held_in), since.elapsed()),
        (true, None) => {
            if let Some(name) = readable.and_then(answer::held_in) {
                slot.ran_on(name);
            }
        }
        (false, Some(_)) => slot.failed(),
        (false, None) => {}
    }
}

/// Runs `future` until `deadline`; None if the deadline came first. The
/// future is pinned by the caller: an async fn keeps its arguments for its
/// whole life, so one taken by value and pinned inside would be stored (and
/// copied) twice.
async fn within<F: Future>(mut deadline: Pin<&mut tokio::time::Sleep>, mut future: Pin<&mut F>) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        deadline.as_mut().poll(cx).map(|()| None)
    })
    .await
}

/// Server-sent events stream as they come (never buffered).
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Whether an exchange failed because of the client's own request body.
fn client_body_failed(error: &hyper::Error) -> bool {
    find_cause::<http_body_util::LengthLimitError>(error).is_some()
        || find_cause::<crate::body::Stalled>(error).is_some()
        || find_cause::<hyper::Error>(error).is_some_and(|e| e.is_user())
}

fn upstream_failure(addr: SocketAddr, error: &hyper::Error) -> ProxyError {
    if let Some(crate::body::Stalled(pause)) = find_cause::<crate::body::Stalled>(error) {
        return ProxyError::BodyTimeout(*pause);
    }
    if client_body_failed(error) && find_cause::<http_body_util::LengthLimitError>(error).is_none() {
        return ProxyError::BadBody(chain(error));
    }
    if find_cause::<http_body_util::LengthLimitError>(error).is_some() {
        return ProxyError::BodyOverLimit;
    }
    ProxyError::Upstream { addr: addr.to_string(), reason: chain(error), kind: Some(UpstreamFailure::Failed) }
}

fn find_cause<'a, T: std::error::Error + 'static>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// Answers the client's upgrade with the pod's 101 and joins the two
/// connections once both sides have switched. The slot is held for the life
/// of the tunnel, which ends when either side closes or after `idle` with
/// no byte either way (a websocket left open with no work holds no pod).
fn tunnel(
    slot: Slot,
    mut response: Response<Incoming>,
    client_side: OnUpgrade,
    policy: Option<Arc<Policy>>,
    idle: Duration,
) -> Response<ResponseBody> {
    let pod_side = hyper::upgrade::on(&mut response);
    tokio::spawn(async move {
        let slot = slot;
        match tokio::try_join!(pod_side, client_side) {
            Ok((pod, client)) => {
                let last = Arc::new(LastByte::new());
                let mut pod = Counted { io: TokioIo::new(pod), last: last.clone() };
                let mut client = Counted { io: TokioIo::new(client), last: last.clone() };
                let copy = tokio::io::copy_bidirectional(&mut client, &mut pod);
                tokio::pin!(copy);
                loop {
                    tokio::select! {
                        copied = &mut copy => {
                            if let Err(error) = copied {
                                // Broken off (a reset): a websocket queue may have a job running.
                                tracing::debug!(%error, "tunnel broken off");
                                quarantine::hold(slot, "tunnel broken off", policy);
                            }
                            return;
                        }
                        _ = tokio::time::sleep_until(last.at() + idle) => {
                            if last.at() + idle <= tokio::time::Instant::now() {
                                tracing::info!(pod = %slot.addr(), ?idle, "tunnel idle: closed, its pod freed");
                                return;
                            }
                        }
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "upgrade failed"),
        }
    });
    response.map(|_| crate::body::empty())
}

/// When a tunnel last moved a byte, either way.
struct LastByte {
    epoch: tokio::time::Instant,
    /// Milliseconds since `epoch`.
    millis: std::sync::atomic::AtomicU64,
}

impl LastByte {
    fn new() -> Self {
        Self { epoch: tokio::time::Instant::now(), millis: std::sync::atomic::AtomicU64::new(0) }
    }

    fn moved(&self) {
        let millis = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.millis.store(millis, std::sync::atomic::Ordering::Relaxed);
    }

    fn at(&self) -> tokio::time::Instant {
        self.epoch + Duration::from_millis(self.millis.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// One side of a tunnel, telling [`LastByte`] of every byte it moves.
struct Counted<T> {
    io: T,
    last: Arc<LastByte>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.moved();
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            if n > 0 {
                self.last.moved();
            }
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Who a client connection comes from, worked out once per connection.
#[derive(Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client's IP as an `X-Forwarded-For` entry.
    ip: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        let ip = HeaderValue::from_str(&addr.ip().to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self { addr, ip }
    }
}

/// Builds the request a pod receives: origin-form target (the connection is
/// the pod's), HTTP/1.1, the client's Host kept, hop-by-hop headers removed,
/// `X-Forwarded-*` added.
pub fn upstream_request(
    mut parts: http::request::Parts,
    host: Option<&HeaderValue>,
    peer: &Peer,
    body: ReplayableBody,
) -> Request<ReplayableBody> {
    parts.uri = Uri::from(parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
    parts.version = Version::HTTP_11;
    parts.extensions = http::Extensions::new();
    let headers = &mut parts.headers;
    // Without a hop-by-hop header there is no `Connection: upgrade` either.
    if headers.keys().any(is_hop_by_hop) {
        let upgrade = upgrade_protocol(headers).cloned();
        strip_hop_by_hop(headers);
        if let Some(protocol) = upgrade {
            headers.insert(header::UPGRADE, protocol);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    // `entry`: one lookup for each header, whether it is there or not.
    if let Some(host) = host {
        headers.entry(header::HOST).or_insert_with(|| host.clone());
        headers.entry(X_FORWARDED_HOST).or_insert_with(|| host.clone());
    }
    append_forwarded_for(headers, &peer.ip);
    headers.entry(X_FORWARDED_PROTO).or_insert_with(|| HeaderValue::from_static("http"));
    Request::from_parts(parts, body)
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

fn append_forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) {
    match headers.entry(X_FORWARDED_FOR) {
        header::Entry::Vacant(entry) => {
            entry.insert(ip.clone());
        }
        header::Entry::Occupied(mut entry) => {
            let Ok(previous) = entry.get().to_str() else {
                entry.insert(ip.clone());
                return;
            };
            let value = format!("{previous}, {}", ip.to_str().unwrap_or("unknown"));
            if let Ok(value) = HeaderValue::from_str(&value) {
                entry.insert(value);
            }
        }
    }
}

/// The protocol a request asks to upgrade to, if it asks (`Connection:
/// upgrade` and an `Upgrade` header).
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<&HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE)).flatten()
}

/// Removes the headers that describe one connection, not the message
/// (RFC 9110 7.6.1), including those the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.keys().any(is_hop_by_hop) {
        strip_hop_by_hop(headers);
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// Whether `name` is one of [`HOP_BY_HOP`]; matched on the name's text,
/// which for most headers stops at its length (it runs for every header of
/// every request and answer).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "keep-alive"
            | "proxy-connection"
    )
}

/// Headers that describe one connection only (RFC 9110 7.6.1), or that a
/// proxy must not pass on.
/// A `static`, not a `const`: built once, not at every use.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// A pod's response body that holds the pod's slot until the body has been
/// read to its end. Dropped early (client gone), it reads the rest in the
/// background, at most `drain_within`, and only then frees the slot.
pub struct SlotBody {
    inner: Option<Incoming>,
    slot: Option<Slot>,
    drain_within: Duration,
    /// How the pod is checked if its answer breaks off (the exchange's).
    quarantine: Option<Arc<Policy>>,
}

impl SlotBody {
    pub fn new(inner: Incoming, slot: Slot, drain_within: Duration, quarantine: Option<Arc<Policy>>) -> Self {
        let mut body = Self { inner: Some(inner), slot: Some(slot), drain_within, quarantine };
        if body.inner.as_ref().is_some_and(|b| b.is_end_stream()) {
            body.slot = None;
        }
        body
    }
}

impl Body for SlotBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        let finished = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
            Poll::Pending => false,
        };
        if let Poll::Ready(Some(Err(error))) = &polled {
            // The pod broke off its answer: it may be dead, or still working.
            if let Some(slot) = self.slot.take() {
                tracing::warn!(pod = %slot.addr(), %error, "pod broke off its answer");
                slot.gate().observer().upstream_failed(UpstreamFailure::Reset);
                quarantine::hold(slot, "answer broken off", self.quarantine.clone());
            }
        }
        if finished {
            // The pod has answered in full: free its slot now, not when the
            // client's connection gets around to dropping this body.
            if let Some(slot) = self.slot.take() {
                slot.answered();
            }
        }
        polled.map_err(|error| error.into())
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
}

impl Drop for SlotBody {
    fn drop(&mut self) {
        let (Some(slot), Some(mut inner)) = (self.slot.take(), self.inner.take()) else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (drain_within, policy) = (self.drain_within, self.quarantine.take());
        runtime.spawn(async move {
            let drained = tokio::time::timeout(drain_within, async {
                while let Some(frame) = inner.frame().await {
                    if frame.is_err() {
                        return false;
                    }
                }
                true
            })
            .await;
            match drained {
                Ok(true) => slot.answered(),
                Ok(false) => quarantine::hold(slot, "answer broken off", policy),
                Err(_) => {
                    tracing::warn!(pod = %slot.addr(), "pod still answering a departed client after {drain_within:?}");
                    quarantine::hold(slot, "answer not finished within request_timeout", policy);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_those_connection_names() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn the_hop_by_hop_match_and_list_agree() {
        assert!(HOP_BY_HOP.iter().all(is_hop_by_hop));
        for name in [header::CONTENT_TYPE, header::HOST, header::TRAILER, HeaderName::from_static("x-request-id")] {
            assert_eq!(is_hop_by_hop(&name), HOP_BY_HOP.contains(&name), "{name}");
        }
    }

    #[test]
    fn upgrade_is_recognised_only_with_connection_upgrade() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(upgrade_protocol(&headers).is_none());
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert_eq!(upgrade_protocol(&headers).unwrap(), "websocket");
    }

    #[test]
    fn the_pod_sees_forwarded_headers_and_the_original_host() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("sd.example.com"));
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        let body = ReplayableBody::new(crate::body::empty());
        let (mut parts, ()) = Request::post("/sdapi/v1/txt2img?x=1").body(()).unwrap().into_parts();
        parts.headers = headers;
        let request = upstream_request(
            parts,
            Some(&HeaderValue::from_static("sd.example.com")),
            &Peer::new("192.0.2.7:5555".parse().unwrap()),
            body,
        );
        assert_eq!(request.uri(), "/sdapi/v1/txt2img?x=1");
        assert_eq!(request.headers()[header::HOST], "sd.example.com");
        assert_eq!(request.headers()[X_FORWARDED_FOR], "10.0.0.1, 192.0.2.7");
        assert_eq!(request.headers()[X_FORWARDED_PROTO], "http");
        assert_eq!(request.headers()[X_FORWARDED_HOST], "sd.example.com");
        assert_eq!(request.version(), Version::HTTP_11);
    }
}
