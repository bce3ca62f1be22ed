//! The proxy's side of async jobs: a request that becomes one (202), the
//! job API under [`crate::jobs::PREFIX`], and the run of a kept request
//! through the same path as any other ([`crate::jobs::Runner`]).
//!
//! A job belongs to whoever submitted it: the `fairness.key` header's value
//! when the service keys clients by a header and the request has it, else
//! its session (the affinity cookie; a submit without one starts a session
//! and gets its cookie), else its client's address. Only a hash of that is
//! kept. Anyone else asking for the job, with a forged id or none, gets 404.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use super::affinity::Presented;
use super::{Inbound, Proxy, Service};
use crate::body::ResponseBody;
use crate::error::ProxyError;
use crate::jobs::{self, Hooks, Jobs, PREFIX};

/// The progress API a running job's pod is asked.
const PROGRESS: &str = "/sdapi/v1/progress?skip_current_image=true";

impl Proxy {
    /// Sets the jobs (once, when the store is open).
    pub fn set_jobs(&self, jobs: Arc<Jobs>) {
        let _ = self.jobs.set(jobs);
    }

    pub fn jobs(&self) -> Option<&Arc<Jobs>> {
        self.jobs.get()
    }

    /// API keys' spend.
    pub fn usage(&self) -> &Arc<super::tenants::Usage> {
        &self.usage
    }

    /// Whether a request is for the job API or becomes a job (it then
    /// skips the lobby's early queue).
    pub(super) fn is_job_request<B>(&self, service: &Service, request: &Request<B>) -> bool {
        let path = request.uri().path();
        path.starts_with(PREFIX) || (self.jobs().is_some() && self.becomes_job(service, request))
    }

    fn becomes_job<B>(&self, service: &Service, request: &Request<B>) -> bool {
        let path = request.uri().path();
        if service.config.is_bypass(path) || service.config.is_owner_only(path) {
            return false;
        }
        jobs::prefers_async(request.headers()) || service.config.async_paths.iter().any(|p| p == path)
    }

    /// The job API, or a request that becomes a job: answered here. Any
    /// other request is given back.
    pub(super) async fn jobs_first(
        &self,
        service: &Arc<Service>,
        request: Request<Inbound>,
        client: Option<IpAddr>,
        priority: crate::gate::Priority,
    ) -> Result<Response<ResponseBody>, Request<Inbound>> {
        let name = Some(service.config.name.as_str());
        if request.uri().path().starts_with(PREFIX) {
            let Some(jobs) = self.jobs() else { return Ok(ProxyError::JobsOff.into_response(name)) };
            return Ok(self.job_api(jobs, service, &request, client).await.unwrap_or_else(|e| e.into_response(name)));
        }
        match self.jobs() {
            Some(jobs) if self.becomes_job(service, &request) => Ok(self
                .submit(jobs, service, request, client, priority)
                .await
                .unwrap_or_else(|e| e.into_response(name))),
            _ => Err(request),
        }
    }

    /// Keeps the request as a job: 202 with its URL.
    async fn submit(
        &self,
        jobs: &Jobs,
        service: &Arc<Service>,
        request: Request<Inbound>,
        client: Option<IpAddr>,
        priority: crate::gate::Priority,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        // Refused as it would be when run: limits, paths, a sleeping service.
        self.admit(service, &request, client, priority)?;
        let webhook = match request.headers().get(jobs::CALLBACK_HEADER) {
            Some(value) => {
                Some(value.to_str().map_err(|_| ProxyError::BadBody("a bad Sdgate-Callback".into()))?.to_string())
            }
            None => service.config.job_webhook.clone(),
        };
        if let Some(url) = &webhook {
            if !url.starts_with("http://") || url.parse::<http::Uri>().is_err() {
                return Err(ProxyError::BadBody(format!("Sdgate-Callback: {url:?} is not an http:// URL")));
            }
        }
        let caller = request.extensions().get::<super::tenants::Caller>().map(|c| c.0.clone());
        let (owner, new_session) = self.owner(service, request.headers(), caller.as_deref(), client, true);
        let owner = owner.ok_or(ProxyError::JobNotFound)?;
        // The run is routed by its Host (HTTP/2 has it in the URI only).
        let host = super::router::request_host_value(&request);
        let (parts, body) = request.into_parts();
        let body = self.kept_body(body, jobs.config.max_request_bytes).await?;
        let secure = parts.headers.get("x-forwarded-proto").is_some_and(|v| v == "https");
        let mut headers = jobs::kept_headers(&parts.headers);
        // The credential stays out of the store: the run is its caller's by
        // name.
        if let Some(auth) = &service.auth {
            let credentials = auth.credential_headers();
            headers.retain(|(name, _)| !credentials.iter().any(|c| c.as_str() == name.as_str()));
        }
        let caller = parts.extensions.get::<super::tenants::Caller>().map(|caller| caller.0.clone());
        let (tenant, group) = match caller {
            Some(caller) => (Some(caller.name.clone()), caller.group.clone()),
            None => (None, None),
        };
        if let (false, Some(host)) =
            (parts.headers.contains_key(header::HOST), host.and_then(|h| h.to_str().ok().map(String::from)))
        {
            headers.push(("host".into(), host));
        }
        let cookie = match (new_session, &service.affinity) {
            (Some(id), Some(affinity)) => affinity.set_cookie(&id, None, secure),
            _ => None,
        };
        // The run presents the session the submit started.
        if let Some(pair) = cookie.as_ref().and_then(|c| c.to_str().ok()).and_then(|c| c.split(';').next()) {
            headers.push(("cookie".into(), pair.to_string()));
        }
        let head = jobs::Head {
            method: parts.method.to_string(),
            uri: parts.uri.path_and_query().map_or("/".into(), |p| p.as_str().to_string()),
            headers,
            client,
            tenant,
            group,
        };
        let submit = jobs::Submit { service: service.config.name.clone(), owner, head, body, webhook };
        let row = jobs.submit(submit).await?;
        let url = format!("{PREFIX}/{}", row.id);
        let payload = serde_json::json!({
            "id": row.id,
            "state": row.state,
            "url": url,
            "result_url": format!("{url}/result"),
            "max_result_bytes": jobs.config.max_result_bytes,
            "result_ttl_seconds": jobs.config.result_ttl.as_secs(),
        });
        let mut response = json(StatusCode::ACCEPTED, &payload);
        let headers = response.headers_mut();
        if let Ok(location) = HeaderValue::from_str(&url) {
            headers.insert(header::LOCATION, location);
        }
        headers.insert("preference-applied", HeaderValue::from_static("respond-async"));
        if let Some(cookie) = cookie {
            headers.append(header::SET_COOKIE, cookie);
        }
        Ok(response)
    }

    /// The body of a request to keep, whole, within `limits.body_read_timeout`.
    async fn kept_body(&self, body: Inbound, max: u64) -> Result<Bytes, ProxyError> {
        let body = match body {
            Inbound::Kept(bytes) => return Ok(bytes),
            Inbound::Client(body) => body,
        };
        let max = self.limits.max_body_bytes.map_or(max, |limit| limit.min(max));
        let limited = http_body_util::Limited::new(body, max as usize);
        let timeout = self.limits.body_read_timeout;
        match tokio::time::timeout(timeout, limited.collect()).await {
            Err(_) => Err(ProxyError::BodyTimeout(timeout)),
            Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(ProxyError::BodyTooLarge(max)),
            Ok(Err(error)) => Err(ProxyError::BadBody(error.to_string())),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }

    /// `GET {PREFIX}` (the caller's jobs), `GET|DELETE {PREFIX}/{id}`,
    /// `GET {PREFIX}/{id}/result`.
    async fn job_api<B>(
        &self,
        jobs: &Jobs,
        service: &Service,
        request: &Request<B>,
        client: Option<IpAddr>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let rest = &request.uri().path()[PREFIX.len()..];
        let store_error = |e: anyhow::Error| ProxyError::JobStore(format!("{e:#}"));
        let secure = request.headers().get("x-forwarded-proto").is_some_and(|v| v == "https");
        if rest.is_empty() || rest == "/" {
            if request.method() != Method::GET {
                return Err(ProxyError::JobMethod);
            }
            let caller = request.extensions().get::<super::tenants::Caller>().map(|c| c.0.clone());
            let (owner, _) = self.owner(service, request.headers(), caller.as_deref(), client, false);
            let rows = match &owner {
                Some(owner) => {
                    jobs.store().list(Some((&service.config.name, owner)), 100).await.map_err(store_error)?
                }
                None => Vec::new(),
            };
            let list: Vec<_> = rows.iter().map(|row| jobs.summary(row)).collect();
            let mut response = json(StatusCode::OK, &serde_json::json!({ "jobs": list }));
            self.renew_session(service, request.headers(), secure, &mut response);
            return Ok(response);
        }
        let rest = rest.strip_prefix('/').ok_or(ProxyError::JobNotFound)?;
        let (id, result) = match rest.strip_suffix("/result") {
            Some(id) => (id, true),
            None => (rest, false),
        };
        // The job's own service decides who owns it (a weighted route may
        // have picked another service of the host for this request).
        let row = jobs.get(id).await?.ok_or(ProxyError::JobNotFound)?;
        let table = self.table();
        let owning = table.services.iter().find(|s| s.config.name == row.service).ok_or(ProxyError::JobNotFound)?;
        // The caller as the owning service's keys say (the routed service's
        // may be another's, on a weighted route).
        let caller = match &owning.auth {
            Some(auth) => {
                let asking = super::auth::Asking::of(request, client);
                match auth.caller(&asking).await {
                    Ok(called) => Some(called.tenant),
                    Err(error @ (ProxyError::AuthUnavailable(_) | ProxyError::Denied(_))) => return Err(error),
                    Err(_) => return Err(ProxyError::JobNotFound),
                }
            }
            None => None,
        };
        let (owner, _) = self.owner(owning, request.headers(), caller.as_deref(), client, false);
        let owner = owner.ok_or(ProxyError::JobNotFound)?;
        if !jobs::owned_by(&row, &owner) {
            return Err(ProxyError::JobNotFound);
        }
        let mut response = match (request.method(), result) {
            (&Method::GET, true) => jobs.result(&row).await?,
            (&Method::GET, false) => json(StatusCode::OK, &jobs.view(&row, self).await),
            (&Method::DELETE, false) => {
                if row.state.ended() || !jobs.cancel(&row).await? {
                    return Err(ProxyError::JobNotReady("the job has ended: nothing to cancel"));
                }
                let row = jobs.get(id).await?.ok_or(ProxyError::JobNotFound)?;
                json(StatusCode::OK, &jobs.view(&row, self).await)
            }
            _ => return Err(ProxyError::JobMethod),
        };
        self.renew_session(owning, request.headers(), secure, &mut response);
        Ok(response)
    }

    /// A valid session's cookie sent again (sliding, as every answer of the
    /// service renews it): an owner who only polls keeps their jobs.
    fn renew_session(
        &self,
        service: &Service,
        headers: &http::HeaderMap,
        secure: bool,
        response: &mut Response<ResponseBody>,
    ) {
        let Some(affinity) = &service.affinity else { return };
        if let Presented::Valid(id, pin) = affinity.presented(headers) {
            if let Some(cookie) = affinity.set_cookie(&id, pin, secure) {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
        }
    }

    /// Who a request is, for the jobs it owns (a hash), and a session
    /// started for it (`start`: a submit without one).
    fn owner(
        &self,
        service: &Service,
        headers: &http::HeaderMap,
        caller: Option<&super::tenants::Tenant>,
        client: Option<IpAddr>,
        start: bool,
    ) -> (Option<String>, Option<crate::gate::SessionId>) {
        let hash = |kind: &str, value: &[u8]| {
            let mut digest = Sha256::new();
            digest.update(service.config.name.as_bytes());
            digest.update([0]);
            digest.update(kind.as_bytes());
            digest.update([0]);
            digest.update(value);
            Some(jobs::hex(&digest.finalize()))
        };
        if let Some(caller) = caller {
            return (hash("api-key", caller.name.as_bytes()), None);
        }
        if let Some(key) = service.fairness.key_header(headers) {
            return (hash("key", key.as_bytes()), None);
        }
        if let Some(affinity) = &service.affinity {
            return match affinity.presented(headers) {
                Presented::Valid(id, _) => (hash("session", &id), None),
                _ if start => {
                    let id = affinity.new_session();
                    (hash("session", &id), Some(id))
                }
                _ => (None, None),
            };
        }
        // The address as fair share reads it (the last X-Forwarded-For hop
        // from a trusted proxy).
        match super::fairness::client_address(&service.fairness, headers, client) {
            Some(ip) => (hash("address", ip.to_string().as_bytes()), None),
            None => (None, None),
        }
    }
}

impl jobs::Runner for Proxy {
    async fn run(
        &self,
        request: Request<Bytes>,
        service: &str,
        client: Option<IpAddr>,
        tenant: Option<(&str, Option<&str>)>,
        hooks: Arc<Hooks>,
    ) -> Result<Response<ResponseBody>, jobs::Again> {
        let mut request = request.map(Inbound::Kept);
        // The job's own service: the split its Host picks when that is it
        // (a weighted route may pick another), else its own.
        let table = self.table();
        let split = match table.pick(&request) {
            Ok(split) if split.service.config.name == service => Some(split),
            _ => table.routes.iter().flat_map(|r| r.split.iter()).find(|s| s.service.config.name == service),
        };
        let Some(split) = split else {
            let error = ProxyError::JobServiceGone(service.to_string());
            return Ok(error.into_response(Some(service)));
        };
        // The caller who submitted it: its fair share, its pod time, its
        // GPU budget; a key revoked or expired since runs nothing.
        if let (Some((name, group)), Some(auth)) = (tenant, &split.service.auth) {
            let Some(tenant) = auth.named(name, group) else {
                let error = ProxyError::Unauthorized("the job's API key was revoked or has expired");
                return Ok(error.into_response(Some(service)));
            };
            if let Some(error) = self.usage().over_budget(service, &tenant) {
                return Ok(error.into_response(Some(service)));
            }
            request.extensions_mut().insert(super::tenants::Caller(tenant, Default::default()));
        }
        let mut record = self.start_record(split, &mut request, client);
        drop(table);
        let service = record.service.clone();
        let peer = crate::forward::Peer::new(std::net::SocketAddr::new(
            client.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
            0,
        ));
        let from = super::From { client, priority: record.priority, job: Some(&hooks) };
        let response = match self.serve(&service, request, &peer, from, &mut record.trace, None).await {
            Ok(response) => response,
            Err(
                error @ (ProxyError::QueueFull(_)
                | ProxyError::ClientQueueFull(_)
                | ProxyError::Standby
                | ProxyError::ShuttingDown),
            ) => {
                let why = error.to_string();
                record.finish(error.into_response(Some(&service.config.name)));
                return Err(jobs::Again(why));
            }
            Err(error) => {
                if let Some(failure) = error.upstream_failure() {
                    crate::gate::Observer::upstream_failed(&service.metrics, failure);
                }
                error.into_response(Some(&service.config.name))
            }
        };
        Ok(record.finish(response))
    }

    fn queue_depth(&self, service: &str) -> usize {
        let table = self.table();
        let service = table.services.iter().find(|s| s.config.name == service);
        service.map_or(0, |s| s.gate.inspect(|g| g.queue_depth()))
    }

    fn serves(&self, service: &str) -> bool {
        self.table().services.iter().any(|s| s.config.name == service)
    }

    async fn progress(&self, service: &str, pod: std::net::SocketAddr) -> Option<serde_json::Value> {
        let host = self
            .table()
            .services
            .iter()
            .find(|s| s.config.name == service)
            .and_then(|s| s.config.hosts.first().cloned());
        let mut headers = http::HeaderMap::new();
        if let Some(host) = host.and_then(|h| HeaderValue::from_str(&h).ok()) {
            headers.insert(header::HOST, host);
        }
        let pool = crate::pod::Pool::shared();
        match pool
            .call(pod, Method::GET, PROGRESS, Some(&headers), None, 1 << 20, std::time::Duration::from_secs(2))
            .await
        {
            crate::pod::Reply::Answer(status, body) if status.is_success() => serde_json::from_slice(&body).ok(),
            _ => None,
        }
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<ResponseBody> {
    let mut response = Response::new(crate::body::full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
