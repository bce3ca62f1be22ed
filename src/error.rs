//! The one place where failures become client responses.
//!
//! Every error a client sees is JSON `{"error": "...", "service": "..."}` with
//! the status docs/behaviour.md lists; `Retry-After` is set where retrying helps.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, ResponseBody};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request has no Host header")]
    MissingHost,
    #[error("no generation of this session is running")]
    NoJob,
    #[error("this client already has {0} requests waiting (fairness.max_queued, or its auth limit queued)")]
    ClientQueueFull(usize),
    #[error("CONNECT is not proxied: sdgate forwards HTTP requests to Stable Diffusion pods")]
    MethodNotAllowed,
    #[error("{0}")]
    BadHost(&'static str),
    #[error("bad path: {0}")]
    BadPath(String),
    #[error("no service for host {0:?}")]
    UnknownHost(String),
    #[error("request headers larger than {0} bytes")]
    HeadersTooLarge(usize),
    #[error("request body larger than the limit of {0} bytes")]
    BodyTooLarge(u64),
    #[error("request body larger than the configured limit")]
    BodyOverLimit,
    #[error("only Transfer-Encoding: chunked is supported")]
    TransferCoding,
    #[error("request body not received within {0:?}")]
    BodyTimeout(Duration),
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    #[error("queue full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("no pod became free within the queue timeout of {}{}", humantime::format_duration(*timeout), cause.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    QueueTimeout { timeout: Duration, cause: Option<String> },
    #[error("no ready pod for this request")]
    NoReadyEndpoint,
    #[error("no pod can start: {cause}")]
    BackendDown { cause: String, retry_after: u32 },
    #[error("pod {addr} did not start its response within {timeout:?}")]
    UpstreamTimeout { addr: String, timeout: Duration },
    /// `kind`: how `sdgate_upstream_errors_total` counts it when the
    /// request ends (none: already counted where it happened, as each failed
    /// connect is).
    #[error("pod {addr} failed before answering: {reason}")]
    Upstream { addr: String, reason: String, kind: Option<UpstreamFailure> },
    #[error("sdgate is shutting down")]
    ShuttingDown,
    #[error("this sdgate replica is a standby; another one is active")]
    Standby,
    #[error("the service has no pod, and this path does not wake it (see `wake`)")]
    Asleep,
    #[error("route {0:?} has weight 0 for every service")]
    NoWeight(String),
    #[error("no such job")]
    JobNotFound,
    #[error("async jobs are not enabled (config key `jobs`)")]
    JobsOff,
    #[error(
        "the jobs store holds its limit of {0} bytes (jobs.max_total_bytes); try again when older jobs have expired"
    )]
    JobsFull(u64),
    #[error("the jobs store cannot be reached: {0}")]
    JobStore(String),
    #[error("{0}")]
    JobNotReady(&'static str),
    #[error("method not allowed on a job")]
    JobMethod,
    #[error("the job's service {0:?} is no longer configured")]
    JobServiceGone(String),
    #[error("{0}: send `Authorization: Bearer <key>` (or the service's auth.header)")]
    Unauthorized(&'static str),
    #[error("this key is over its limit {limit}")]
    OverLimit { limit: &'static str, retry_after: u32 },
    #[error("this listener takes only requests a standby replica hands over (tls.relay_listen)")]
    NotARelay,
    /// The JWKS or forward-auth service could not say who is calling.
    #[error("cannot check who is calling: {0}")]
    AuthUnavailable(String),
    /// The forward-auth service said no: its status (3xx or 4xx) and the
    /// headers that tell the client what to do (`WWW-Authenticate`,
    /// `Location`, `Set-Cookie`).
    #[error("the service's forward-auth refused this request")]
    Denied(Box<(StatusCode, http::HeaderMap)>),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::MissingHost | ProxyError::BadHost(_) | ProxyError::BadPath(_) | ProxyError::BadBody(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UnknownHost(_)
            | ProxyError::JobNotFound
            | ProxyError::JobsOff
            | ProxyError::JobServiceGone(_) => StatusCode::NOT_FOUND,
            ProxyError::JobsFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            ProxyError::JobNotReady(_) => StatusCode::CONFLICT,
            ProxyError::JobMethod => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::NoJob => StatusCode::CONFLICT,
            ProxyError::ClientQueueFull(_) | ProxyError::OverLimit { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::TransferCoding => StatusCode::NOT_IMPLEMENTED,
            ProxyError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BodyTooLarge(_) | ProxyError::BodyOverLimit => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::QueueFull(_)
            | ProxyError::NoReadyEndpoint
            | ProxyError::BackendDown { .. }
            | ProxyError::ShuttingDown
            | ProxyError::Standby
            | ProxyError::Asleep
            | ProxyError::NoWeight(_)
            | ProxyError::JobStore(_)
            | ProxyError::AuthUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Denied(denial) => denial.0,
            ProxyError::NotARelay => StatusCode::FORBIDDEN,
            ProxyError::QueueTimeout { .. } | ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// Seconds after which a retry may succeed, for errors where one may.
    fn retry_after(&self) -> Option<u32> {
        match self {
            ProxyError::QueueFull(_)
            | ProxyError::ClientQueueFull(_)
            | ProxyError::NoReadyEndpoint
            | ProxyError::Asleep => Some(5),
            ProxyError::ShuttingDown
            | ProxyError::Standby
            | ProxyError::JobStore(_)
            | ProxyError::AuthUnavailable(_) => Some(1),
            ProxyError::JobsFull(_) => Some(60),
            ProxyError::OverLimit { retry_after, .. } => Some(*retry_after),
            ProxyError::BackendDown { retry_after, .. } => Some((*retry_after).max(1)),
            _ => None,
        }
    }

    /// The pod-side fault behind this error, if it is one.
    pub fn upstream_failure(&self) -> Option<UpstreamFailure> {
        match self {
            ProxyError::UpstreamTimeout { .. } => Some(UpstreamFailure::Timeout),
            ProxyError::Upstream { kind, .. } => *kind,
            _ => None,
        }
    }

    pub fn into_response(self, service: Option<&str>) -> Response<ResponseBody> {
        self.into_response_with(service, |_| {})
    }

    /// [`ProxyError::into_response`] with more fields in the JSON body.
    pub fn into_response_with(
        self,
        service: Option<&str>,
        more: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    ) -> Response<ResponseBody> {
        let mut payload = serde_json::json!({ "error": self.to_string(), "service": service });
        if let Some(fields) = payload.as_object_mut() {
            more(fields);
        }
        if let ProxyError::NoWeight(route) = &self {
            payload["route"] = serde_json::Value::from(route.as_str());
        }
        if let ProxyError::OverLimit { limit, retry_after } = &self {
            payload["limit"] = serde_json::Value::from(*limit);
            payload["retry_after"] = serde_json::Value::from(*retry_after);
        }
        let mut response = Response::new(body::full(Bytes::from(payload.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let ProxyError::Unauthorized(_) = self {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"sdgate\""));
        }
        if let ProxyError::Denied(denial) = &self {
            for (name, value) in &denial.1 {
                headers.append(name, value.clone());
            }
        }
        if let ProxyError::JobMethod = self {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET, DELETE"));
        }
        if let ProxyError::MethodNotAllowed = self {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"));
        }
        if let Some(seconds) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Why an exchange with a pod ended without a full answer: one value feeds
/// the log, `sdgate_upstream_errors_total{kind}` and the decision to
/// quarantine the pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamFailure {
    /// No connection: nothing was sent (the pod is taken out of rotation).
    Connect,
    /// The pod failed before answering, with the request sent.
    Failed,
    /// The pod did not start its answer within `request_timeout`.
    Timeout,
    /// The pod broke off its answer.
    Reset,
}

impl UpstreamFailure {
    /// Every kind, each with a metric series from the start.
    pub const ALL: [UpstreamFailure; 4] =
        [UpstreamFailure::Connect, UpstreamFailure::Failed, UpstreamFailure::Timeout, UpstreamFailure::Reset];

    /// The `kind` label.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Connect => "connect",
            UpstreamFailure::Failed => "failed",
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Reset => "reset",
        }
    }
}

/// Locks `mutex`, recovering it from a panic elsewhere: every lock in sdgate
/// guards state whose methods leave it whole, so a poisoned lock is used as
/// it is rather than taking the gateway down with it.
pub fn lock<T: ?Sized>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An error and its sources, as one line ("handshake: connection reset: ...").
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
