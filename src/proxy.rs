//! The request path: router -> gate -> forward, and one log line per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant as TokioInstant;

use crate::body::ResponseBody;
use crate::config::{Config, Limits, ServiceConfig};
use crate::error::ProxyError;
use crate::forward::{self, ExchangeError, Forwarder, ReplayableBody};
use crate::metrics::Metrics;
use crate::router::{self, Router};
use crate::slot::{SharedGate, Slot};

/// One configured service and its gate.
pub struct Service {
    pub config: ServiceConfig,
    pub gate: Arc<SharedGate>,
}

/// Everything a request needs, shared by all connections.
pub struct Proxy {
    router: Router,
    services: Vec<Service>,
    forwarder: Forwarder,
    limits: Limits,
    metrics: Metrics,
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
    queue_wait: Option<Duration>,
    upstream: Option<Duration>,
    endpoint: Option<SocketAddr>,
}

impl Proxy {
    pub fn new(config: &Config, metrics: Metrics) -> Self {
        let router = Router::new(config.services.iter().map(|s| s.hosts.as_slice()));
        let services = config
            .services
            .iter()
            .map(|service| Service {
                config: service.clone(),
                gate: SharedGate::new(
                    service.container_concurrency,
                    service.queue.max_depth,
                    metrics.service(&service.name),
                ),
            })
            .collect();
        Self { router, services, forwarder: Forwarder::new(), limits: config.limits.clone(), metrics }
    }

    pub fn services(&self) -> &[Service] {
        &self.services
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Answers one client request; never fails (errors become JSON responses).
    pub async fn handle(self: Arc<Self>, mut request: Request<Incoming>, client: SocketAddr) -> Response<ResponseBody> {
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
        let mut trace = Trace::default();
        let mut response = match self.serve(service, request, client, &mut trace).await {
            Ok(response) => response,
            Err(error) => {
                if let Some(kind) = error.upstream_kind() {
                    service.gate.metrics().upstream_error(kind);
                }
                error.into_response(Some(&service.config.name))
            }
        };
        let status = response.status().as_u16();
        let metrics = service.gate.metrics();
        let took = start.elapsed();
        metrics.answered(status);
        metrics.duration.observe(took.as_secs_f64());
        service.gate.recent.record(status, took);
        metrics.queue_wait.observe(trace.queue_wait.unwrap_or_default().as_secs_f64());
        let Some(line) = line else { return response };
        tracing::info!(
            method = %line.method,
            host = %line.host,
            path = line.uri.path(),
            status,
            service = %service.config.name,
            queue_ms = millis(trace.queue_wait),
            upstream_ms = millis(trace.upstream),
            endpoint = trace.endpoint.map(|a| a.to_string()).unwrap_or_default(),
            request_id = request_id.to_str().unwrap_or(""),
            "request"
        );
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        response
    }

    async fn serve(
        &self,
        service: &Service,
        mut request: Request<Incoming>,
        client: SocketAddr,
        trace: &mut Trace,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        self.check_limits(&request)?;
        let mut upgrade =
            forward::upgrade_protocol(request.headers()).is_some().then(|| hyper::upgrade::on(&mut request));
        let bypass = service.config.is_bypass(request.uri().path());
        let host = router::request_host(&request).map(str::to_string);
        let (parts, body) = request.into_parts();
        let body = match self.limits.max_body_bytes {
            Some(max) => Limited::new(body, max as usize).boxed_unsync(),
            None => body.map_err(Into::into).boxed_unsync(),
        };
        let body = ReplayableBody::new(body);
        let gate = &service.gate;
        let ticket = gate.arrive();
        let arrived = TokioInstant::now();
        let deadline = arrived + service.config.queue.timeout;
        let mut attempt = 0;
        loop {
            let slot = if bypass {
                let grant = gate.any_ready().ok_or(ProxyError::NoReadyEndpoint)?;
                Slot::bypass(gate.clone(), grant)
            } else {
                let left = deadline.saturating_duration_since(TokioInstant::now());
                let acquired = gate.acquire(ticket, left).await;
                trace.queue_wait = Some(arrived.elapsed());
                match acquired {
                    Err(ProxyError::QueueTimeout { cause, .. }) => {
                        return Err(ProxyError::QueueTimeout { timeout: service.config.queue.timeout, cause })
                    }
                    other => other?,
                }
            };
            trace.endpoint = Some(slot.addr());
            let upstream = forward::upstream_request(
                &parts.method,
                &parts.uri,
                &parts.headers,
                host.as_deref(),
                client,
                slot.addr(),
                body.clone(),
            )?;
            let sent = Instant::now();
            let outcome = self.forwarder.exchange(slot, upstream, service.config.request_timeout, upgrade.take()).await;
            trace.upstream = Some(sent.elapsed());
            match outcome {
                Ok(response) => return Ok(response),
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

const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The request's id: the client's `X-Request-Id` if it sent one, else a new
/// random one; set on the request so the pod sees it too.
fn request_id<B>(request: &mut Request<B>) -> http::HeaderValue {
    if let Some(id) = request.headers().get(&X_REQUEST_ID) {
        return id.clone();
    }
    let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let value = http::HeaderValue::from_str(&id).unwrap_or_else(|_| http::HeaderValue::from_static("0"));
    request.headers_mut().insert(X_REQUEST_ID, value.clone());
    value
}

fn millis(duration: Option<Duration>) -> f64 {
    duration.map_or(0.0, |d| (d.as_secs_f64() * 1e4).round() / 10.0)
}
