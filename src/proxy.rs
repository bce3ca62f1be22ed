//! The request path: router -> gate -> forward, and one log line per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant as TokioInstant;

use crate::affinity::{Affinity, Presented, SessionId, Signer};
use crate::body::{Buffered, ResponseBody};
use crate::config::{AffinityMode, Config, Limits, ServiceConfig};
use crate::error::ProxyError;
use crate::forward::{self, ExchangeError, Forwarder, Peer, ReplayableBody, RequestBody};
use crate::gate::{EndpointId, Pin};
use crate::metrics::Metrics;
use crate::router::{self, Router};
use crate::slot::{SharedGate, Slot};

/// One configured service, its gate and its session affinity.
pub struct Service {
    pub config: ServiceConfig,
    pub gate: Arc<SharedGate>,
    pub affinity: Option<Arc<Affinity>>,
}

/// The session a request belongs to, for a service with affinity.
struct SessionRequest {
    id: SessionId,
    presented: Presented,
    pinned: Option<EndpointId>,
}

impl SessionRequest {
    /// The request's session: the one it presents, or a new one (none for a
    /// `bypass` request that presents none: progress polls do not start sessions).
    fn of(affinity: &Affinity, headers: &http::HeaderMap, bypass: bool) -> Option<Self> {
        let presented = affinity.presented(headers);
        let (id, pinned) = match presented {
            Presented::Valid(id) => (id, affinity.sessions.get(&id, tokio::time::Instant::now().into_std())),
            _ if bypass => return None,
            _ => (affinity.new_session(), None),
        };
        Some(Self { id, presented, pinned })
    }

    /// Records where the request went; returns the `sdgate_affinity_total` result.
    fn settle(&self, affinity: &Affinity, endpoint: EndpointId) -> &'static str {
        affinity.sessions.set(self.id, endpoint, tokio::time::Instant::now().into_std());
        match (self.presented, self.pinned) {
            (Presented::Invalid, _) => "invalid",
            (Presented::Nothing, _) => "new",
            (Presented::Valid(_), Some(pinned)) if pinned == endpoint => "hit",
            (Presented::Valid(_), _) => "repinned",
        }
    }
}

/// Everything a request needs, shared by all connections.
pub struct Proxy {
    router: Router,
    services: Vec<Service>,
    /// One pod connection pool per serving thread, so a request and its
    /// pod connection live on the same thread.
    forwarders: Vec<Forwarder>,
    limits: Limits,
    metrics: Metrics,
    /// Dispatches to pods (false on a standby replica: see `leader`).
    active: std::sync::atomic::AtomicBool,
}

/// What the log line of a request says of the request itself (taken only
/// when the line will be written: the hot path allocates nothing for logs).
struct LogLine {
    method: http::Method,
    uri: http::Uri,
    host: String,
}

impl LogLine {
    fn of(request: &Request<Incoming>) -> Self {
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            host: router::request_host(request).unwrap_or("").to_string(),
        }
    }
}

/// What the log line of a request reports besides its status.
#[derive(Default)]
struct Trace {
    /// When the request joined the queue.
    arrived: Option<Instant>,
    queue_wait: Option<Duration>,
    upstream: Option<Duration>,
    endpoint: Option<SocketAddr>,
}

impl Proxy {
    pub fn new(config: &Config, metrics: Metrics) -> anyhow::Result<Self> {
        let router = Router::new(config.services.iter().map(|s| s.hosts.as_slice()));
        let services = config
            .services
            .iter()
            .map(|service| {
                let affinity = match &service.affinity {
                    Some(affinity) => {
                        let signer = Signer::from_environment(affinity, &service.name)?;
                        Some(Arc::new(Affinity::new(affinity.clone(), signer)))
                    }
                    None => None,
                };
                let gate = SharedGate::with_sessions(
                    service.container_concurrency,
                    service.queue.max_depth,
                    metrics.service(&service.name),
                    affinity.as_ref().map(|a| a.sessions.clone()),
                );
                gate.set_quarantine_policy(crate::quarantine::Policy::of(service));
                Ok(Service { config: service.clone(), gate, affinity })
            })
            .collect::<anyhow::Result<_>>()?;
        let forwarders = (0..crate::threads::count(config.threads)).map(|_| Forwarder::new()).collect();
        let active = std::sync::atomic::AtomicBool::new(config.leader_election.is_none());
        Ok(Self { router, services, forwarders, limits: config.limits.clone(), metrics, active })
    }

    /// The pod connection pool of the serving thread this runs on.
    fn forwarder(&self) -> &Forwarder {
        &self.forwarders[crate::threads::current() % self.forwarders.len()]
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether this replica dispatches to pods (holds the lease, or runs alone).
    pub fn is_active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set_active(&self, active: bool) {
        self.active.store(active, std::sync::atomic::Ordering::Release);
    }

    /// Answers one client request; never fails (errors become JSON responses).
    pub async fn handle(self: Arc<Self>, mut request: Request<Incoming>, peer: Arc<Peer>) -> Response<ResponseBody> {
        let start = Instant::now();
        let request_id = request_id(&mut request);
        let line = tracing::enabled!(tracing::Level::INFO).then(|| LogLine::of(&request));
        let index = match self.router.route(&request) {
            Ok(index) => index,
            Err(error) => {
                let mut response = error.into_response(None);
                response.headers_mut().insert(X_REQUEST_ID, request_id);
                self.metrics.unrouted(response.status().as_u16());
                if let Some(line) = line {
                    tracing::info!(method = %line.method, host = %line.host, path = line.uri.path(), status = response.status().as_u16(), "unrouted");
                }
                return response;
            }
        };
        let service = &self.services[index];
        // Counts the request even if its client leaves before the answer
        // (then the future is dropped and the record says 499).
        let mut record = Record { service, start, line, request_id, trace: Trace::default(), done: false };
        let response = match self.serve(service, request, &peer, &mut record.trace).await {
            Ok(response) => response,
            Err(error) => {
                if let Some(kind) = error.upstream_kind() {
                    service.gate.metrics().upstream_error(kind);
                }
                error.into_response(Some(&service.config.name))
            }
        };
        record.finish(response)
    }

    async fn serve(
        &self,
        service: &Service,
        mut request: Request<Incoming>,
        peer: &Peer,
        trace: &mut Trace,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        if !self.is_active() {
            return Err(ProxyError::Standby);
        }
        self.check_limits(&request)?;
        let mut upgrade =
            forward::upgrade_protocol(request.headers()).is_some().then(|| hyper::upgrade::on(&mut request));
        let bypass = service.config.is_bypass(request.uri().path());
        let host = router::request_host_value(&request);
        let (mut parts, body) = request.into_parts();
        let session = service.affinity.as_deref().and_then(|a| SessionRequest::of(a, &parts.headers, bypass));
        if let Some(affinity) = &service.affinity {
            affinity.strip_cookie(&mut parts.headers);
        }
        let pinned = session.as_ref().and_then(|s| s.pinned);
        let pin = pinned.map(|endpoint| Pin { endpoint, strict: self.strict(service) });
        let body = self.read_body(body).await?;
        let gate = &service.gate;
        if !bypass && !service.config.may_wake(parts.uri.path()) && gate.inspect(|g| g.endpoints().is_empty()) {
            return Err(ProxyError::Asleep);
        }
        let ticket = gate.arrive();
        let arrived = TokioInstant::now();
        trace.arrived = Some(arrived.into_std());
        let deadline = arrived + service.config.queue.timeout;
        let mut attempt = 0;
        loop {
            let slot = if bypass {
                trace.queue_wait = Some(Duration::ZERO);
                let grant = gate.any_ready(pinned).ok_or(ProxyError::NoReadyEndpoint)?;
                Slot::bypass(gate.clone(), grant)
            } else {
                let left = deadline.saturating_duration_since(TokioInstant::now());
                let acquired = gate.acquire_pinned(ticket, pin, left).await;
                trace.queue_wait = Some(arrived.elapsed());
                match acquired {
                    Err(ProxyError::QueueTimeout { cause, .. }) => {
                        return Err(ProxyError::QueueTimeout { timeout: service.config.queue.timeout, cause })
                    }
                    other => other?,
                }
            };
            trace.endpoint = Some(slot.addr());
            // The session lives where it was last sent (pinned at dispatch, so
            // a later request's move is not undone by an earlier one's answer).
            let affinity_result = match (&service.affinity, &session) {
                (Some(affinity), Some(session)) if !bypass => Some(session.settle(affinity, slot.endpoint())),
                _ => None,
            };
            let upstream = forward::upstream_request(
                &parts.method,
                &parts.uri,
                &parts.headers,
                host.as_ref(),
                peer,
                slot.addr(),
                body.clone(),
            )?;
            let sent = Instant::now();
            let on_abandon = match (&service.config.interrupt_on_disconnect, bypass) {
                (Some(path), false) => Some(self.forwarder().interrupt(slot.addr(), path, host.as_ref())),
                _ => None,
            };
            let outcome = self
                .forwarder()
                .exchange(slot, upstream, self.exchange_limits(service), upgrade.take(), on_abandon)
                .await;
            trace.upstream = Some(sent.elapsed());
            match outcome {
                Ok(mut response) => {
                    if let (Some(affinity), Some(session)) = (&service.affinity, &session) {
                        if let Some(result) = affinity_result {
                            service.gate.metrics().affinity(result);
                        }
                        let secure = parts.headers.get("x-forwarded-proto").is_some_and(|v| v == "https");
                        if let Some(cookie) = affinity.set_cookie(&session.id, secure) {
                            response.headers_mut().append(http::header::SET_COOKIE, cookie);
                        }
                    }
                    return Ok(response);
                }
                Err(ExchangeError::NotSent { reason, upgrade: returned })
                    if attempt < service.config.connect_retries =>
                {
                    tracing::warn!(endpoint = ?trace.endpoint, %reason, "connect failed; trying another pod");
                    upgrade = returned;
                    attempt += 1;
                }
                Err(ExchangeError::NotSent { reason, .. }) => {
                    let addr = trace.endpoint.map(|a| a.to_string()).unwrap_or_default();
                    return Err(ProxyError::Upstream { addr, reason });
                }
                Err(ExchangeError::Failed(error)) => return Err(error),
            }
        }
    }

    /// The request body, read in full before the request takes a pod when it
    /// is small enough (`limits.buffer_body_bytes`), within
    /// `limits.body_read_timeout`; a larger one streams the rest. A broken
    /// body is the client's fault (400), never the pod's.
    async fn read_body(&self, body: Incoming) -> Result<ReplayableBody, ProxyError> {
        if http_body::Body::is_end_stream(&body) {
            return Ok(ReplayableBody::empty());
        }
        let limited: RequestBody = match self.limits.max_body_bytes {
            Some(max) => Limited::new(body, max as usize).boxed_unsync(),
            None => body.map_err(Into::into).boxed_unsync(),
        };
        let timeout = self.limits.body_read_timeout;
        let read = tokio::time::timeout(timeout, crate::body::buffer(limited, self.limits.buffer_body_bytes)).await;
        match read {
            Err(_) => Err(ProxyError::BodyTimeout(timeout)),
            Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(ProxyError::BodyOverLimit),
            Ok(Err(error)) => Err(ProxyError::BadBody(error.to_string())),
            Ok(Ok(Buffered::Complete(bytes))) => Ok(ReplayableBody::new(crate::body::full(bytes))),
            Ok(Ok(Buffered::Partial(head, rest))) => Ok(ReplayableBody::new(crate::body::chain(head, rest))),
        }
    }

    fn exchange_limits(&self, service: &Service) -> forward::ExchangeLimits {
        forward::ExchangeLimits {
            request_timeout: service.config.request_timeout,
            buffer_response_bytes: self.limits.buffer_response_bytes,
        }
    }

    fn strict(&self, service: &Service) -> bool {
        service.affinity.as_ref().is_some_and(|a| a.config.mode == AffinityMode::Strict)
    }

    /// Refuses oversized input before it takes a place in the queue.
    fn check_limits(&self, request: &Request<Incoming>) -> Result<(), ProxyError> {
        let head_bytes = request.uri().path_and_query().map_or(0, |p| p.as_str().len())
            + request.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>();
        if head_bytes > self.limits.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge(self.limits.max_header_bytes));
        }
        if let Some(max) = self.limits.max_body_bytes {
            let declared = request
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|length| length > max) {
                return Err(ProxyError::BodyTooLarge(max));
            }
        }
        Ok(())
    }
}

/// Status recorded for a request whose client left before its answer
/// (nginx's "client closed request").
const CLIENT_LEFT: u16 = 499;

/// Counts and logs one routed request exactly once: when it is answered, or
/// when its client leaves first.
struct Record<'a> {
    service: &'a Service,
    start: Instant,
    line: Option<LogLine>,
    request_id: http::HeaderValue,
    trace: Trace,
    done: bool,
}

impl Record<'_> {
    fn finish(mut self, mut response: Response<ResponseBody>) -> Response<ResponseBody> {
        self.record(response.status().as_u16());
        response.headers_mut().insert(X_REQUEST_ID, self.request_id.clone());
        response
    }

    fn record(&mut self, status: u16) {
        self.done = true;
        let gate = &self.service.gate;
        let metrics = gate.metrics();
        let took = self.start.elapsed();
        metrics.answered(status);
        metrics.duration.observe(took.as_secs_f64());
        gate.recent.record(status, took);
        // A request that left while queued waited until it left.
        let queue_wait = self.trace.queue_wait.or_else(|| self.trace.arrived.map(|t| t.elapsed()));
        metrics.queue_wait.observe(queue_wait.unwrap_or_default().as_secs_f64());
        let Some(line) = &self.line else { return };
        let trace = &self.trace;
        tracing::info!(
            method = %line.method,
            host = %line.host,
            path = line.uri.path(),
            status,
            service = %self.service.config.name,
            queue_ms = millis(queue_wait),
            upstream_ms = millis(trace.upstream),
            endpoint = trace.endpoint.map(|a| a.to_string()).unwrap_or_default(),
            request_id = self.request_id.to_str().unwrap_or(""),
            "{}",
            if status == CLIENT_LEFT { "client left" } else { "request" }
        );
    }
}

impl Drop for Record<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.record(CLIENT_LEFT);
        }
    }
}

const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The request's id: the client's `X-Request-Id` if it sent one, else a new
/// random one; set on the request so the pod sees it too.
fn request_id<B>(request: &mut Request<B>) -> http::HeaderValue {
    if let Some(id) = request.headers().get(&X_REQUEST_ID) {
        return id.clone();
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    for (i, byte) in fastrand::u128(..).to_be_bytes().into_iter().enumerate() {
        id[2 * i] = HEX[usize::from(byte >> 4)];
        id[2 * i + 1] = HEX[usize::from(byte & 0xf)];
    }
    let value = http::HeaderValue::from_bytes(&id).unwrap_or_else(|_| http::HeaderValue::from_static("0"));
    request.headers_mut().insert(X_REQUEST_ID, value.clone());
    value
}

fn millis(duration: Option<Duration>) -> f64 {
    duration.map_or(0.0, |d| (d.as_secs_f64() * 1e4).round() / 10.0)
}
