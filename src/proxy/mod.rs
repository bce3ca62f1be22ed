//! The request path: router -> gate -> forward, and one log line per request.

pub mod affinity;
pub mod auth;
pub mod checkpoint;
pub(crate) mod fairness;
mod job_api;
pub(crate) mod owners;
pub mod path;
pub mod relay;
pub mod router;
pub(crate) mod routes;
pub mod tenants;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::{Buffered, ResponseBody};
use crate::config::{AffinityMode, Config, Limits, ServiceConfig};
use crate::error::{ProxyError, UpstreamFailure};
use crate::forward::quarantine::Policy;
use crate::forward::{self, ExchangeError, Forwarder, Peer};
use crate::gate::{EndpointId, Jobs, Pin, Ticket, Waiting};
use crate::gate::{SharedGate, Slot};
use crate::observe::metrics::Metrics;
use crate::observe::metrics::ServiceMetrics;
use crate::observe::status::{Observed, Reloaded, RouteStatus, ServiceView, SplitStatus};
use crate::pod::{ReplayableBody, RequestBody};
use crate::proxy::affinity::{Affinity, Presented, SessionId, Signer};
use crate::proxy::router::Router;
use crate::proxy::routes::{Route, Split, Window};

/// One configured service: its gate, its metrics, its session affinity and
/// how its pods are checked after sdgate gave up on an exchange.
pub struct Service {
    pub config: ServiceConfig,
    pub gate: Arc<SharedGate>,
    pub metrics: ServiceMetrics,
    pub affinity: Option<Arc<Affinity>>,
    /// The quarantine policy each exchange takes with it.
    pub quarantine: Option<Arc<Policy>>,
    /// Whose job runs on each pod (for `owner_only` paths).
    pub jobs: Arc<Jobs>,
    /// How its clients are told apart for fair share.
    pub fairness: fairness::Fairness,
    /// How its requests are read for the checkpoint they want.
    checkpoints: Arc<checkpoint::Reader>,
    /// Who may call it (`auth`): keys, JWTs or forward-auth.
    pub auth: Option<Arc<auth::Auth>>,
}

/// The session a request belongs to, for a service with affinity.
struct SessionRequest {
    id: SessionId,
    presented: Presented,
    /// Where the session was pinned when the request came (the table's
    /// entry, else its cookie's pin); after dispatch, where it went.
    pinned: Option<EndpointId>,
}

impl SessionRequest {
    /// The request's session: the one it presents, or a new one (none for a
    /// `bypass` request that presents none: progress polls do not start sessions).
    fn of(affinity: &Affinity, headers: &http::HeaderMap, bypass: bool) -> Option<Self> {
        let presented = affinity.presented(headers);
        let (id, pinned) = match presented {
            Presented::Valid(id, pin) => (id, affinity.sessions.get(&id, Instant::now()).or(pin)),
            _ if bypass => return None,
            _ => (affinity.new_session(), None),
        };
        Some(Self { id, presented, pinned })
    }

    /// The session of a caller `auth` named (its cookie does not matter).
    fn of_caller(affinity: &Affinity, name: &str) -> Self {
        let id = affinity.caller_session(name);
        let pinned = affinity.sessions.get(&id, Instant::now());
        Self { id, presented: Presented::Valid(id, pinned), pinned }
    }

    /// Records where the request went; returns the `sdgate_affinity_total`
    /// result. Only a session whose cookie came back takes a place in the
    /// pin table; a new one is pinned by the cookie it is given.
    fn settle(&mut self, affinity: &Affinity, endpoint: EndpointId) -> &'static str {
        let result = match (self.presented, self.pinned) {
            (Presented::Invalid, _) => "invalid",
            (Presented::Nothing, _) => "new",
            (Presented::Valid(..), Some(pinned)) if pinned == endpoint => "hit",
            (Presented::Valid(..), _) => "repinned",
        };
        if let Presented::Valid(..) = self.presented {
            affinity.sessions.set(self.id, endpoint, Instant::now());
        }
        self.pinned = Some(endpoint);
        result
    }
}

/// Everything a request needs, shared by all connections.
pub struct Proxy {
    /// Routes and services; replaced whole by a reload.
    table: std::sync::RwLock<Arc<Table>>,
    /// Sends requests to pods, on the pod client shared by all threads.
    forwarder: Forwarder,
    limits: Limits,
    metrics: Metrics,
    /// Dispatches to pods (false on a standby replica: see `leader`).
    active: std::sync::atomic::AtomicBool,
    /// The latest reload: when, and its error if it was refused.
    last_reload: std::sync::Mutex<Option<Reloaded>>,
    /// Hand-overs between replicas (a standby's target; this one's token).
    relay: relay::Relay,
    /// Spend and rates of API keys, kept across reloads.
    usage: Arc<tenants::Usage>,
    tenant_metrics: tenants::TenantMetrics,
    /// Async jobs, when `jobs` is configured (set once the store is open).
    jobs: std::sync::OnceLock<Arc<crate::jobs::Jobs>>,
    /// Whether requests may come handed over by a standby (leader election
    /// is on): only then are they looked at for it.
    relays: bool,
}

/// What requests are routed by: the routes (a config's `routes`, then each
/// service's own `hosts` as a route of one) and the services.
pub struct Table {
    router: Router,
    /// The hosts an unknown host's 404 lists (none: it lists none).
    hosts: Option<Vec<String>>,
    pub routes: Vec<Route>,
    pub services: Vec<Arc<Service>>,
}

/// What a reload changed, for the control loop.
#[derive(Default)]
pub struct Changes {
    /// New services: their pods and autoscaler start.
    pub added: Vec<Arc<Service>>,
    /// Services whose settings changed (same pods, gate and sessions).
    pub changed: Vec<Arc<Service>>,
    /// Services no longer in the config: they take no new requests and finish
    /// their queued and in-flight ones.
    pub removed: Vec<Arc<Service>>,
}

impl Table {
    /// The table for `config`; services of `previous` with the same name keep
    /// their gate (queue, pods) and sessions.
    fn build(config: &Config, metrics: &Metrics, previous: Option<&Table>) -> anyhow::Result<(Self, Changes)> {
        let mut changes = Changes::default();
        let mut services = Vec::with_capacity(config.services.len());
        for service in &config.services {
            let kept = previous.and_then(|p| p.services.iter().find(|s| s.config.name == service.name));
            let built = match kept {
                Some(old) => {
                    old.gate.set_limits(service.container_concurrency, service.queue.max_depth);
                    old.gate.set_batch_delay(service.fairness.batch_delay);
                    old.gate.set_model_policy(model_policy(service));
                    old.metrics.set_checkpoint_labels(service.checkpoints.metric_labels);
                    let affinity = match (&old.affinity, &service.affinity) {
                        (Some(old), Some(new)) => Some(Arc::new(old.reconfigured(new.clone()))),
                        _ => None,
                    };
                    let built = Arc::new(Service {
                        config: service.clone(),
                        gate: old.gate.clone(),
                        metrics: old.metrics.clone(),
                        affinity,
                        quarantine: Policy::of(service),
                        jobs: old.jobs.clone(),
                        fairness: fairness::Fairness::of(&service.fairness),
                        checkpoints: Arc::new(checkpoint::Reader::new(&service.checkpoints)),
                        auth: match (&old.auth, service.auth == old.config.auth) {
                            // Unchanged and without a keys file to read
                            // again: the JWKS and callers met are kept.
                            (Some(auth), true) if service.auth.as_ref().is_some_and(|a| a.keys_path().is_none()) => {
                                Some(auth.clone())
                            }
                            _ => auth_of(service)?,
                        },
                    });
                    changes.changed.push(built.clone());
                    built
                }
                None => {
                    let built = Arc::new(Service::new(service, metrics)?);
                    changes.added.push(built.clone());
                    built
                }
            };
            services.push(built);
        }
        if let Some(previous) = previous {
            changes.removed = previous
                .services
                .iter()
                .filter(|old| !config.services.iter().any(|s| s.name == old.config.name))
                .cloned()
                .collect();
        }
        let by_name = |name: &str| services.iter().find(|s| s.config.name == name).cloned();
        let mut routes = Vec::new();
        let mut hosts: Vec<&[String]> = Vec::new();
        for route in &config.routes {
            let name = route.name().to_string();
            let split = route
                .split
                .iter()
                .filter_map(|split| {
                    let service = by_name(&split.service)?;
                    let requests = metrics.route_requests(&name, &split.service);
                    let recent = previous.and_then(|p| p.window(&name, &split.service)).unwrap_or_default();
                    let priority = fairness::priority(route.priority.unwrap_or(service.config.priority));
                    Some(Split { service, weight: split.weight, requests, recent, priority })
                })
                .collect();
            routes.push(Route::new(name, split));
            hosts.push(&route.hosts);
        }
        for service in &services {
            let requests = metrics.route_requests(&service.config.name, &service.config.name);
            let recent =
                previous.and_then(|p| p.window(&service.config.name, &service.config.name)).unwrap_or_default();
            let priority = fairness::priority(service.config.priority);
            let split = vec![Split { service: service.clone(), weight: 1, requests, recent, priority }];
            routes.push(Route::new(service.config.name.clone(), split));
            hosts.push(&service.config.hosts);
        }
        let router = Router::new(hosts);
        let hosts = config.lists_hosts().then(|| config.host_names());
        Ok((Self { router, hosts, routes, services }, changes))
    }
}

impl Table {
    /// The last-minute counts of `service` in route `route`, if it has one.
    fn window(&self, route: &str, service: &str) -> Option<Arc<Window>> {
        let route = self.routes.iter().find(|r| r.name == route)?;
        route.split.iter().find(|s| s.service.config.name == service).map(|s| s.recent.clone())
    }

    /// The answer to a request with no route: for a missing or unknown
    /// host, how to name one, and the hosts where the config lets it say.
    fn unrouted(&self, error: ProxyError) -> Response<ResponseBody> {
        if !matches!(error, ProxyError::UnknownHost(_) | ProxyError::MissingHost) {
            return error.into_response(None);
        }
        let hosts = self.hosts.as_ref();
        let example = hosts.and_then(|h| h.first()).map_or("<a service's host>", String::as_str);
        error.into_response_with(None, |fields| {
            let hint =
                format!("sdgate routes by the Host header: send one it serves, e.g. curl -H \"Host: {example}\" ...");
            fields.insert("hint".into(), hint.into());
            if let Some(hosts) = hosts {
                fields.insert("hosts".into(), hosts.clone().into());
            }
        })
    }

    /// The route of a request's host, and the service it picks.
    fn pick<B>(&self, request: &Request<B>) -> Result<&Split, ProxyError> {
        self.routes[self.router.route(request)?].pick(request.headers())
    }
}

impl Service {
    fn new(service: &ServiceConfig, metrics: &Metrics) -> anyhow::Result<Self> {
        let affinity = match &service.affinity {
            Some(affinity) => {
                let signer = Signer::from_environment(affinity, &service.name)?.for_service(&service.name);
                Some(Arc::new(Affinity::new(affinity.clone(), signer)))
            }
            None => None,
        };
        let metrics = metrics.service(&service.name);
        metrics.set_checkpoint_labels(service.checkpoints.metric_labels);
        let observer: Arc<dyn crate::gate::Observer> = Arc::new(metrics.clone());
        let gate = SharedGate::new(service.container_concurrency, service.queue.max_depth, observer);
        gate.set_batch_delay(service.fairness.batch_delay);
        gate.set_model_policy(model_policy(service));
        Ok(Self {
            config: service.clone(),
            gate,
            metrics,
            affinity,
            quarantine: Policy::of(service),
            jobs: Jobs::new(),
            fairness: fairness::Fairness::of(&service.fairness),
            checkpoints: Arc::new(checkpoint::Reader::new(&service.checkpoints)),
            auth: auth_of(service)?,
        })
    }
}

/// A service's `auth` (its keys file read).
fn auth_of(service: &ServiceConfig) -> anyhow::Result<Option<Arc<auth::Auth>>> {
    let Some(config) = &service.auth else { return Ok(None) };
    let auth = auth::Auth::load(config).map_err(|e| e.context(format!("service {}", service.name)))?;
    Ok(Some(Arc::new(auth)))
}

/// Bodies at least this large are searched for a checkpoint off the serving thread.
const OFF_THREAD_BODY: usize = 256 * 1024;

/// How a service's gate weighs checkpoints.
fn model_policy(service: &ServiceConfig) -> crate::gate::ModelPolicy {
    crate::gate::ModelPolicy {
        aware: service.checkpoints.route,
        switch_cost: service.checkpoints.switch_cost,
        max_idle: match service.checkpoints.max_pod_idle {
            Some(crate::config::PodIdle::For(bound)) => bound.min(service.checkpoints.max_wait_for_match),
            _ => service.checkpoints.max_wait_for_match,
        },
        idle_by_load: service.checkpoints.max_pod_idle == Some(crate::config::PodIdle::Load),
    }
}

impl Service {
    /// The checkpoint a request wants, if it names one (counted per
    /// checkpoint); None also once the service's table of names is full.
    #[inline]
    fn want(&self, headers: &http::HeaderMap, body: Option<&[u8]>) -> Option<crate::gate::Want> {
        // Most requests name none: no body (a GET), and no header to look at.
        if !self.checkpoints.may_name(body.is_some()) {
            return None;
        }
        self.named(headers, body)
    }

    fn named(&self, headers: &http::HeaderMap, body: Option<&[u8]>) -> Option<crate::gate::Want> {
        let (name, keep) = self.checkpoints.wanted(headers, body)?;
        self.want_named(&name, keep)
    }

    fn want_named(&self, name: &str, keep: bool) -> Option<crate::gate::Want> {
        let (want, reported) = self.gate.want_reported(name, keep);
        self.metrics.checkpoint_requested(name, reported);
        want
    }

    /// [`Service::want`] for a request whose body is read; a large body is
    /// searched on a blocking thread, so its serving thread keeps serving
    /// (a 16 MiB body takes tens of milliseconds to walk).
    async fn want_of_body(&self, headers: &http::HeaderMap, body: Option<&bytes::Bytes>) -> Option<crate::gate::Want> {
        if !self.checkpoints.may_name(body.is_some()) {
            return None;
        }
        if let Some(named) = self.checkpoints.from_header(headers) {
            let (name, keep) = named?;
            return self.want_named(&name, keep);
        }
        let body = body?;
        let (name, keep) = if body.len() < OFF_THREAD_BODY {
            self.checkpoints.from_body(body)?
        } else {
            let (reader, body) = (self.checkpoints.clone(), body.clone());
            tokio::task::spawn_blocking(move || reader.from_body(&body)).await.ok()??
        };
        self.want_named(&name, keep)
    }
}

/// What the log line of a request says of the request itself (taken only
/// when the line will be written: the hot path allocates nothing for logs).
struct LogLine {
    method: http::Method,
    uri: http::Uri,
    host: String,
    /// The client's address: the peer's, or the one a trusted proxy
    /// forwarded (`fairness.trusted_proxies`).
    client: Option<std::net::IpAddr>,
    /// Who called (`auth`): a key's name, or the identity a token or
    /// forward-auth named.
    tenant: Option<String>,
}

impl LogLine {
    fn of<B>(request: &Request<B>, client: Option<std::net::IpAddr>) -> Self {
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            host: router::request_host(request).unwrap_or("").to_string(),
            client,
            tenant: None,
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
        let (table, _) = Table::build(config, &metrics, None)?;
        let forwarder = Forwarder::default();
        let active = std::sync::atomic::AtomicBool::new(config.election().is_none());
        let table = std::sync::RwLock::new(Arc::new(table));
        let last_reload = std::sync::Mutex::new(None);
        let relay = relay::Relay::default();
        let relays = config.election().is_some();
        let tenant_metrics = tenants::TenantMetrics::new(&metrics);
        Ok(Self {
            table,
            forwarder,
            limits: config.limits.clone(),
            metrics,
            active,
            last_reload,
            relay,
            usage: Arc::default(),
            tenant_metrics,
            jobs: std::sync::OnceLock::new(),
            relays,
        })
    }

    /// Counts a reload (`sdgate_config_reloads_total`) and keeps it for /status.
    pub fn record_reload(&self, error: Option<String>) {
        self.metrics.reloaded(if error.is_none() { "ok" } else { "error" });
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let record = Reloaded { at, ok: error.is_none(), error };
        *crate::error::lock(&self.last_reload) = Some(record);
    }

    pub fn last_reload(&self) -> Option<Reloaded> {
        crate::error::lock(&self.last_reload).clone()
    }

    /// The routes and services in force.
    pub fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Puts `config`'s routes and services in force (see [`Table::build`]);
    /// requests already routed finish where they were routed.
    pub fn reload(&self, config: &Config) -> anyhow::Result<Changes> {
        let mut table = self.table.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (next, changes) = Table::build(config, &self.metrics, Some(&table))?;
        *table = Arc::new(next);
        Ok(changes)
    }

    pub fn services(&self) -> Vec<Arc<Service>> {
        self.table().services.clone()
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

    /// Hand-overs: this replica's token, and a standby's target.
    pub fn relay(&self) -> &relay::Relay {
        &self.relay
    }

    /// Whether this replica takes requests: it is active, or a standby that
    /// knows the active replica to hand them to.
    pub fn is_ready(&self) -> bool {
        self.is_active() || self.relay.target().is_some()
    }

    /// A standby's part of a request: hands it to the active replica and
    /// answers what that one answered. Waits (at most `handover_wait`) while
    /// no active replica can be reached, as during a hand-over of the Lease;
    /// gives the request back if this replica becomes active meanwhile.
    async fn hand_over(
        &self,
        mut request: Request<Incoming>,
        peer: &Peer,
    ) -> Result<Response<ResponseBody>, Request<Incoming>> {
        // Handed over once already (two standbys), or an upgrade (not relayed).
        if request.headers().contains_key(&relay::RELAY_TOKEN) || forward::upgrade_protocol(request.headers()).is_some()
        {
            return Ok(ProxyError::Standby.into_response(None));
        }
        let deadline = Instant::now() + HANDOVER_WAIT;
        let (target, stream) = loop {
            if self.is_active() {
                return Err(request);
            }
            if let Some(target) = self.relay.target() {
                let connect = tokio::net::TcpStream::connect(target.addr);
                if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
                    break (target, stream);
                }
            }
            if Instant::now() >= deadline {
                self.metrics.handed_over("failed");
                return Ok(ProxyError::Standby.into_response(None));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = stream.set_nodelay(true);
        let client = {
            let table = self.table();
            let split = table.pick(&request).ok();
            if let Some(split) = split {
                // The active replica believes what this standby sends on.
                strip_forwarded(&split.service, &mut request, peer.addr.ip());
            }
            split.and_then(|split| {
                fairness::client_address(&split.service.fairness, request.headers(), Some(peer.addr.ip()))
            })
        };
        // An HTTP/2 request's host is in its URI, which HTTP/1.1 leaves out.
        let host = router::request_host_value(&request);
        let (mut parts, body) = request.into_parts();
        if let (false, Some(host)) = (parts.headers.contains_key(http::header::HOST), host) {
            parts.headers.insert(http::header::HOST, host);
        }
        parts.headers.insert(relay::RELAY_TOKEN, target.token.clone());
        let client = client.unwrap_or(peer.addr.ip()).to_string();
        if let Ok(client) = http::HeaderValue::from_str(&client) {
            parts.headers.insert(relay::RELAY_CLIENT, client);
        }
        parts.uri =
            parts.uri.path_and_query().map_or_else(|| http::Uri::from_static("/"), |p| http::Uri::from(p.clone()));
        parts.version = http::Version::HTTP_11;
        let request = Request::from_parts(parts, body);
        let sent = async {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            sender.send_request(request).await
        };
        match sent.await {
            Ok(response) => {
                self.metrics.handed_over("sent");
                Ok(response.map(|body| body.map_err(Into::into).boxed_unsync()))
            }
            Err(error) => {
                self.metrics.handed_over("failed");
                let reason = crate::error::chain(&error);
                tracing::warn!(active = %target.addr, %reason, "handing a request to the active replica failed");
                Ok(ProxyError::Upstream { addr: target.addr.to_string(), reason, kind: None }.into_response(None))
            }
        }
    }

    /// A standby's request: handed over, or served here if this replica
    /// became active meanwhile.
    async fn standby(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: Arc<Peer>,
        early: Option<Early>,
    ) -> Response<ResponseBody> {
        match self.hand_over(request, &peer).await {
            Ok(response) => response,
            Err(back) => Box::pin(self.handle(back, peer, early)).await,
        }
    }

    /// The client's address: the peer's, or the one a standby of ours named
    /// on a request it handed over.
    fn client_ip(&self, headers: &http::HeaderMap, peer: Option<std::net::IpAddr>) -> Option<std::net::IpAddr> {
        if !self.relays {
            return peer;
        }
        self.relay.relayed_client(headers).or(peer)
    }

    /// Answers one client request; never fails (errors become JSON responses).
    /// `early` is what the lobby already did for it: routed it, queued it and
    /// waited for its slot (see [`crate::serve::lobby`]).
    pub async fn handle(
        self: Arc<Self>,
        mut request: Request<Incoming>,
        peer: Arc<Peer>,
        early: Option<Early>,
    ) -> Response<ResponseBody> {
        if !self.is_active() {
            // Boxed: a standby's path, kept out of every request's future.
            return Box::pin(self.standby(request, peer, early)).await;
        }
        // A standby's hand-over headers are for this replica, never the
        // pod, whether this replica takes hand-overs or not.
        let token = request.headers_mut().remove(&relay::RELAY_TOKEN);
        let named = request.headers_mut().remove(&relay::RELAY_CLIENT);
        let relayed = token.filter(|_| self.relays).and_then(|token| self.relay.client_named(&token, named.as_ref()));
        let peer_ip = Some(relayed.unwrap_or(peer.addr.ip()));
        // The pod's X-Forwarded-For names the client a standby handed over,
        // not the standby.
        let peer = match relayed {
            Some(client) => Arc::new(forward::Peer::new(std::net::SocketAddr::new(client, peer.addr.port()))),
            None => peer,
        };
        let (mut record, admitted) = match early {
            Some(Early { record, admitted }) => {
                request.headers_mut().insert(X_REQUEST_ID, record.request_id.clone());
                (record, Some(admitted))
            }
            None => match self.record(&mut request, peer_ip) {
                Ok(record) => (record, None),
                Err(response) => return *response,
            },
        };
        let service = record.service.clone();
        // A standby of ours already did this for the client it names.
        if relayed.is_none() {
            strip_forwarded(&service, &mut request, peer.addr.ip());
        }
        // Who is calling, before anything is queued.
        let mut set_cookies = Vec::new();
        if let Some(auth) = &service.auth {
            let path = request.uri().path();
            let limited = !path.starts_with(crate::jobs::PREFIX)
                && !service.config.is_bypass(path)
                && !service.config.is_owner_only(path);
            // Forward-auth is told the client as fair share reads it (a
            // trusted proxy's X-Forwarded-For), not the proxy.
            let client = fairness::client_address(&service.fairness, request.headers(), peer_ip);
            match self.authenticate(&service, auth, &request, client, limited).await {
                Ok((caller, cookies)) => {
                    if let Some(line) = &mut record.line {
                        line.tenant = Some(caller.0.name.clone());
                    }
                    request.extensions_mut().insert(caller);
                    set_cookies = cookies;
                }
                Err(error) => return record.finish(error.into_response(Some(&service.config.name))),
            }
        }
        let request = request.map(Inbound::Client);
        let with_cookies = |mut response: Response<ResponseBody>| {
            for cookie in &set_cookies {
                response.headers_mut().append(http::header::SET_COOKIE, cookie.clone());
            }
            response
        };
        let request = if admitted.is_none() {
            match self.jobs_first(&service, request, peer_ip, record.priority).await {
                Ok(response) => return record.finish(with_cookies(response)),
                Err(request) => request,
            }
        } else {
            request
        };
        let from = From { client: peer_ip, priority: record.priority, job: None };
        let response = match self.serve(&service, request, &peer, from, &mut record.trace, admitted).await {
            Ok(response) => response,
            Err(error) => {
                if let Some(failure) = error.upstream_failure() {
                    crate::gate::Observer::upstream_failed(&service.metrics, failure);
                }
                error.into_response(Some(&service.config.name))
            }
        };
        record.finish(with_cookies(response))
    }

    /// The answer to a request whose Host is ambiguous (see
    /// [`router::normalize_host`]): 400, counted and logged as unrouted.
    pub fn bad_host<B>(&self, request: &mut Request<B>, reason: &'static str) -> Response<ResponseBody> {
        self.metrics.unrouted(400);
        tracing::info!(method = %request.method(), path = request.uri().path(), status = 400, reason, "unrouted");
        let request_id = request_id(request);
        let mut response = ProxyError::BadHost(reason).into_response(None);
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        response
    }

    /// The answer to a connection's first request whose body did not come
    /// within `body_read_timeout` while the lobby read it: 408, counted and
    /// logged (an unrouted one gets its routing error).
    pub fn body_timed_out<B>(
        &self,
        request: &mut Request<B>,
        peer: Option<std::net::IpAddr>,
    ) -> Response<ResponseBody> {
        match self.record(request, peer) {
            Ok(record) => {
                let error = ProxyError::BodyTimeout(self.limits.body_read_timeout);
                let response = error.into_response(Some(&record.service.config.name));
                record.finish(response)
            }
            Err(response) => *response,
        }
    }

    /// Routes a request and starts its record (which counts it even if its
    /// client leaves before the answer: the record then says 499); an
    /// unrouted request's answer is the error.
    fn record<B>(
        &self,
        request: &mut Request<B>,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Record, Box<Response<ResponseBody>>> {
        let table = self.table();
        match table.pick(request) {
            Ok(split) => Ok(self.start_record(split, request, peer)),
            Err(error) => {
                let request_id = request_id(request);
                let mut response = table.unrouted(error);
                response.headers_mut().insert(X_REQUEST_ID, request_id);
                self.metrics.unrouted(response.status().as_u16());
                if tracing::enabled!(tracing::Level::INFO) {
                    let line = LogLine::of(request, peer);
                    let client = line.client.map(|ip| ip.to_string()).unwrap_or_default();
                    tracing::info!(method = %line.method, host = ?line.host, path = line.uri.path(), status = response.status().as_u16(), %client, "unrouted");
                }
                Err(Box::new(response))
            }
        }
    }

    fn start_record<B>(&self, split: &Split, request: &mut Request<B>, peer: Option<std::net::IpAddr>) -> Record {
        let start = Instant::now();
        split.requests.inc();
        split.recent.record(start);
        let service = &split.service;
        let request_id = request_id(request);
        let line = tracing::enabled!(tracing::Level::INFO)
            .then(|| LogLine::of(request, fairness::client_address(&service.fairness, request.headers(), peer)));
        let priority = split.priority;
        Record { service: service.clone(), priority, start, line, request_id, trace: Trace::default(), done: false }
    }

    /// The lobby's part of a connection's first request (a head without a
    /// body stream): routes and admits it, for [`EarlyWait::wait`]. None,
    /// with nothing counted or logged, when the request takes the ordinary
    /// path instead: it is not routed, is refused before the queue, or does
    /// not queue (`bypass`); that path then gives the same answer.
    pub fn admit_early(
        &self,
        request: &mut Request<()>,
        body: &[u8],
        peer: Option<std::net::IpAddr>,
    ) -> Option<EarlyWait> {
        let peer = self.client_ip(request.headers(), peer);
        let table = self.table();
        let split = table.pick(request).ok()?;
        if self.is_job_request(&split.service, request) || split.service.auth.is_some() {
            return None;
        }
        let mut admitted = self.admit(&split.service, request, peer, split.priority).ok()?;
        if admitted.bypass {
            return None;
        }
        admitted.origin.want = split.service.want(request.headers(), Some(body));
        Some(EarlyWait { record: self.start_record(split, request, peer), admitted })
    }

    /// What is decided of a request before it may queue: it is not refused
    /// (standby, oversized, a path that may not wake a sleeping service), and
    /// its session and pin.
    fn admit<B>(
        &self,
        service: &Service,
        request: &Request<B>,
        peer: Option<std::net::IpAddr>,
        priority: crate::gate::Priority,
    ) -> Result<Admitted, ProxyError> {
        if request.method() == http::Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed);
        }
        if !self.is_active() {
            return Err(ProxyError::Standby);
        }
        self.check_limits(request)?;
        let raw = request.uri().path();
        let routed = path::routed(raw).map_err(|why| ProxyError::BadPath(why.to_string()))?;
        let owner_only = service.config.is_owner_only(&routed);
        let bypass = owner_only || service.config.is_bypass(&routed);
        if *routed != *raw {
            // Matched on the path as the pod will read it: a protected path
            // reached only in disguise, or a disguise that changes whether
            // the request skips the gate, is not passed on.
            if owner_only && !service.config.is_owner_only(raw) {
                return Err(ProxyError::BadPath(format!("{raw} is {routed} in disguise: send it as {routed}")));
            }
            if bypass != (service.config.is_owner_only(raw) || service.config.is_bypass(raw)) {
                return Err(ProxyError::BadPath(format!("{raw} is read as {routed}: send it as {routed}")));
            }
        }
        if !bypass && !service.config.may_wake(&routed) && service.gate.inspect(|g| g.endpoints().is_empty()) {
            return Err(ProxyError::Asleep);
        }
        let caller = request.extensions().get::<tenants::Caller>();
        let session = service.affinity.as_deref().and_then(|a| match caller {
            Some(tenants::Caller(tenant, _)) => Some(SessionRequest::of_caller(a, &tenant.name)),
            None => SessionRequest::of(a, request.headers(), bypass),
        });
        let pin =
            session.as_ref().and_then(|s| s.pinned).map(|endpoint| Pin { endpoint, strict: self.strict(service) });
        // Only a session whose cookie came back names a client.
        let returned = session.as_ref().filter(|s| matches!(s.presented, Presented::Valid(..))).map(|s| &s.id);
        let mut origin = fairness::origin(service, request.headers(), peer, returned, priority);
        // A caller auth named is its own client for fair share, with its
        // own bound on waiting requests if it has one.
        if let Some(tenants::Caller(tenant, _)) = caller {
            origin.client = Some(fairness::client_named(&tenant.name));
            if tenant.limits.queued > 0 {
                origin.max_queued = tenant.limits.queued;
            }
        }
        Ok(Admitted { bypass, owner_only, session, pin, origin, queued: None })
    }

    async fn serve(
        &self,
        service: &Service,
        mut request: Request<Inbound>,
        peer: &Peer,
        from: From<'_>,
        trace: &mut Trace,
        admitted: Option<Admitted>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let Admitted { bypass, owner_only, mut session, pin, mut origin, queued } = match admitted {
            Some(admitted) => admitted,
            None => self.admit(service, &request, from.client, from.priority)?,
        };
        // The pod this session's job runs on, for a path only its owner may reach.
        let owner = match owner_only {
            false => None,
            true => match session.as_ref().and_then(|s| service.jobs.running_on(&s.id)) {
                Some(endpoint) => Some(endpoint),
                None => {
                    let routed = path::routed(request.uri().path()).unwrap_or_default();
                    return Ok(owners::no_job(service, &routed, session.as_ref().map(|s| &s.id)));
                }
            },
        };
        let protocol =
            forward::upgrade_protocol(request.headers()).map(|p| service.config.allows_upgrade(p.as_bytes()));
        if protocol == Some(false) {
            // Not an upgrade this service allows (h2c, ...): a plain request.
            request.headers_mut().remove(http::header::UPGRADE);
        }
        let mut upgrade = (protocol == Some(true)).then(|| hyper::upgrade::on(&mut request));
        // A caller's pod time is metered on its slot.
        let spender = request.extensions().get::<tenants::Caller>().map(|tenants::Caller(tenant, admission)| {
            let spender = tenants::Spender::new(self.usage.clone(), &self.tenant_metrics, &service.config.name, tenant);
            (Arc::new(spender), admission.clone())
        });
        // The key or token is the gateway's business, not the pod's.
        if let Some(header) = service.auth.as_ref().and_then(|auth| auth.header()) {
            request.headers_mut().remove(header);
        }
        let host = router::request_host_value(&request);
        let (mut parts, body) = request.into_parts();
        if let Some(affinity) = &service.affinity {
            affinity.strip_cookie(&mut parts.headers);
        }
        let (body, whole) = self.read_body(body).await?;
        if queued.is_none() && !bypass {
            origin.want = service.want_of_body(&parts.headers, whole.as_ref()).await;
        }
        let secure = parts.headers.get("x-forwarded-proto").is_some_and(|v| v == "https");
        // Made once: a request whose connection failed before sending comes
        // back with its error and goes to the next pod as it is.
        let mut upstream = Some(forward::upstream_request(parts, host.as_ref(), peer, body));
        let gate = &service.gate;
        let (mut queued, mut first) = match queued {
            Some(queued) => {
                let Queued { place, acquired } = *queued;
                (Some(place), Some(acquired?))
            }
            None if bypass => (None, None),
            None => {
                let deadline = from.job.and_then(|job| job.deadline);
                let (place, slot) = Place::take(service, origin, pin, trace, deadline);
                if let Some(job) = from.job {
                    job.queued(&service.gate, place.ticket);
                }
                (Some(place), slot)
            }
        };
        let mut attempt = 0;
        loop {
            let slot = match queued.as_mut() {
                None => {
                    trace.queue_wait = Some(Duration::ZERO);
                    let grant = match owner {
                        Some(endpoint) => gate.grant_of(endpoint),
                        None => gate.any_ready(pin.map(|p| p.endpoint)),
                    };
                    Slot::bypass(gate.clone(), grant.ok_or(ProxyError::NoReadyEndpoint)?)
                }
                Some(place) => match first.take() {
                    Some(slot) => slot,
                    None => place.wait(service, pin, session.as_ref().map(|s| s.id), origin, trace).await?,
                },
            };
            trace.endpoint = Some(slot.addr());
            if let Some(job) = from.job {
                job.started(slot.addr());
            }
            let mut slot = slot;
            if let (Some((spender, admission)), true) = (&spender, slot.is_armed()) {
                let loads = slot.loads();
                slot.hold(Box::new(spender.start(admission, loads)));
            }
            if let (Some(session), true) = (&session, slot.is_armed()) {
                slot.own(service.jobs.run(session.id, slot.endpoint()));
            }
            if let Some(place) = queued.as_mut() {
                place.waiting = None;
            }
            // The session lives where it was last sent (pinned at dispatch, so
            // a later request's move is not undone by an earlier one's answer).
            let affinity_result = match (&service.affinity, &mut session) {
                (Some(affinity), Some(session)) if !bypass => Some(session.settle(affinity, slot.endpoint())),
                _ => None,
            };
            let Some(request) = upstream.take() else {
                return Err(ProxyError::Upstream {
                    addr: slot.addr().to_string(),
                    reason: "no request to resend".into(),
                    kind: Some(UpstreamFailure::Failed),
                });
            };
            // Only the log line says how long the pod took.
            let sent = tracing::enabled!(tracing::Level::INFO).then(Instant::now);
            let on_abandon = match (&service.config.interrupt_on_disconnect, bypass) {
                (Some(path), false) => Some(self.forwarder.interrupt(slot.addr(), path, host.as_ref())),
                // A job its owner cancelled interrupts its pod, where one
                // pod runs one generation (an interrupt stops whatever the
                // pod runs); a run dropped for another reason (a lost
                // lease, the drain's end) does not.
                (None, false) if service.config.container_concurrency == 1 => from.job.map(|job| {
                    let interrupt = self.forwarder.interrupt(slot.addr(), JOB_INTERRUPT, host.as_ref());
                    let job = job.clone();
                    Box::new(move || {
                        if job.is_cancelled() {
                            interrupt();
                        }
                    }) as forward::Abandon
                }),
                _ => None,
            };
            let outcome =
                self.forwarder.exchange(slot, request, self.exchange_limits(service), upgrade.take(), on_abandon).await;
            trace.upstream = sent.map(|sent| sent.elapsed());
            match outcome {
                Ok(mut response) => {
                    if let (Some(affinity), Some(session)) = (&service.affinity, &session) {
                        if let Some(result) = affinity_result {
                            service.metrics.affinity(result);
                        }
                        // An error answer (the pod's 4xx or 5xx) starts no
                        // session and renews none.
                        let error = response.status().is_client_error() || response.status().is_server_error();
                        if let Some(cookie) =
                            (!error).then(|| affinity.set_cookie(&session.id, session.pinned, secure)).flatten()
                        {
                            response.headers_mut().append(http::header::SET_COOKIE, cookie);
                        }
                    }
                    return Ok(response);
                }
                Err(ExchangeError::NotSent { reason, upgrade: returned, request })
                    if attempt < service.config.connect_retries =>
                {
                    tracing::warn!(endpoint = ?trace.endpoint, %reason, "connect failed; trying another pod");
                    upgrade = returned;
                    upstream = Some(*request);
                    attempt += 1;
                }
                Err(ExchangeError::NotSent { reason, .. }) => {
                    let addr = trace.endpoint.map(|a| a.to_string()).unwrap_or_default();
                    // Each failed connect was counted as it happened.
                    return Err(ProxyError::Upstream { addr, reason, kind: None });
                }
                Err(ExchangeError::Failed(error)) => return Err(error),
            }
        }
    }

    /// The request body, read in full before the request takes a pod when it
    /// is small enough (`limits.buffer_body_bytes`), within
    /// `limits.body_read_timeout`; a larger one streams the rest. A broken
    /// body is the client's fault (400), never the pod's.
    /// With the body, its bytes when it was read in full.
    async fn read_body(&self, body: Inbound) -> Result<(ReplayableBody, Option<bytes::Bytes>), ProxyError> {
        let body = match body {
            Inbound::Client(body) => body,
            Inbound::Kept(bytes) if bytes.is_empty() => return Ok((ReplayableBody::empty(), None)),
            Inbound::Kept(bytes) => return Ok((ReplayableBody::new(crate::body::full(bytes.clone())), Some(bytes))),
        };
        if http_body::Body::is_end_stream(&body) {
            return Ok((ReplayableBody::empty(), None));
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
            Ok(Ok(Buffered::Complete(bytes))) => {
                Ok((ReplayableBody::new(crate::body::full(bytes.clone())), Some(bytes)))
            }
            Ok(Ok(Buffered::Partial(head, rest))) => {
                let rest = crate::body::PauseLimit::new(rest, timeout);
                Ok((ReplayableBody::new(crate::body::chain(head, rest)), None))
            }
        }
    }

    fn exchange_limits(&self, service: &Service) -> forward::ExchangeLimits {
        forward::ExchangeLimits {
            request_timeout: service.config.request_timeout,
            buffer_response_bytes: self.limits.buffer_response_bytes,
            quarantine: service.quarantine.clone(),
            tunnel_idle: self.limits.tunnel_idle_timeout,
            share: match service.config.container_concurrency {
                0 => crate::pod::Share::Never,
                cc => crate::pod::Share::Above(cc as usize + 1),
            },
        }
    }

    fn strict(&self, service: &Service) -> bool {
        service.affinity.as_ref().is_some_and(|a| a.config.mode == AffinityMode::Strict)
    }

    /// Refuses oversized input before it takes a place in the queue.
    fn check_limits<B>(&self, request: &Request<B>) -> Result<(), ProxyError> {
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
        // A transfer coding other than chunked alone (RFC 9112 6.1: 501);
        // the pods' servers refuse it too, each in its own way.
        let mut codings = request.headers().get_all(header::TRANSFER_ENCODING).iter();
        if let Some(first) = codings.next() {
            if codings.next().is_some() || !first.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(ProxyError::TransferCoding);
            }
        }
        Ok(())
    }
}

/// Who sent a request (the client's address) and its class, for
/// [`Proxy::admit`]; for a job's run, what it tells the job.
#[derive(Clone, Copy)]
struct From<'a> {
    client: Option<std::net::IpAddr>,
    priority: crate::gate::Priority,
    job: Option<&'a Arc<crate::jobs::Hooks>>,
}

/// A request's body: the client's stream, or a job's kept bytes.
pub enum Inbound {
    Client(Incoming),
    Kept(bytes::Bytes),
}

/// What a cancelled job's pod is told (unless `interrupt_on_disconnect`
/// names another path).
const JOB_INTERRUPT: &str = "/sdapi/v1/interrupt";

/// What [`Proxy::admit`] decided of a request; for one the lobby queued,
/// also its place in line and what its wait gave.
pub struct Admitted {
    bypass: bool,
    /// An `owner_only` path: it reaches only the pod its session's job runs on.
    owner_only: bool,
    session: Option<SessionRequest>,
    pin: Option<Pin>,
    /// Who sent it, for fair share.
    origin: crate::gate::Origin,
    /// Boxed: only the lobby's first requests have one.
    queued: Option<Box<Queued>>,
}

struct Queued {
    place: Place,
    acquired: Result<Slot, ProxyError>,
}

/// A request's place in its service's queue, and when its wait ends.
struct Place {
    ticket: Ticket,
    /// A job's own deadline (`jobs.queue_timeout` from its submission),
    /// instead of `queue.timeout` from when it began to wait.
    deadline: Option<Instant>,
    /// When it began to wait, and until when it may: read from the clock
    /// only once it has to wait (most requests never do).
    waited: Option<(Instant, Instant)>,
    /// The session's wait, known while it lasts (for its progress polls);
    /// boxed, as it is rare and a place is moved with every request.
    waiting: Option<Box<Waiting>>,
}

impl Place {
    /// A place in line, and a slot at once when a pod has room and nobody
    /// is ahead (else [`Place::wait`]).
    fn take(
        service: &Service,
        origin: crate::gate::Origin,
        pin: Option<Pin>,
        trace: &mut Trace,
        deadline: Option<Instant>,
    ) -> (Self, Option<Slot>) {
        let (ticket, slot) = service.gate.arrive_and_try(origin, pin);
        if slot.is_some() {
            trace.queue_wait = Some(Duration::ZERO);
        }
        (Self { ticket, deadline, waited: None, waiting: None }, slot)
    }

    /// Waits at this place until a pod has room, at most until the deadline.
    /// A strict pin waits for its pod at most `affinity.max_wait`, then takes
    /// any pod with room (keeping its place in line).
    async fn wait(
        &mut self,
        service: &Service,
        pin: Option<Pin>,
        session: Option<SessionId>,
        origin: crate::gate::Origin,
        trace: &mut Trace,
    ) -> Result<Slot, ProxyError> {
        if let Some(slot) = service.gate.try_acquire(self.ticket, pin, origin) {
            trace.queue_wait = Some(Duration::ZERO);
            return Ok(slot);
        }
        let own_deadline = self.deadline;
        let (arrived, deadline) = *self.waited.get_or_insert_with(|| {
            let now = Instant::now();
            (now, own_deadline.unwrap_or(now + service.config.queue.timeout))
        });
        trace.arrived = Some(arrived);
        self.waiting = session.map(|session| Box::new(service.jobs.wait(session, self.ticket)));
        // A wait for a pod that holds its checkpoint ends after
        // `checkpoints.max_wait_for_match` (in place); a strict pin loosens
        // after `affinity.max_wait` (it waits again at its place in line).
        // (Ending it after a load's time instead was measured and not kept:
        // benches/README.md, "Idle pods while requests wait".)
        let patient_until = match origin.want {
            Some(_) if service.config.checkpoints.route => {
                Some(arrived + service.config.checkpoints.max_wait_for_match)
            }
            _ => None,
        };
        let patience = || patient_until.map(|at| at.saturating_duration_since(Instant::now()));
        let gate = &service.gate;
        let strict_for = match (pin, &service.affinity) {
            (Some(pin), Some(affinity)) if pin.strict => Some(affinity.config.max_wait),
            _ => None,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let acquired = match strict_for {
            Some(max_wait) if max_wait < left => {
                match gate.acquire_patient(self.ticket, pin, origin, max_wait, patience()).await {
                    Err(ProxyError::QueueTimeout { .. }) => {
                        let loose = pin.map(|pin| Pin { strict: false, ..pin });
                        let left = deadline.saturating_duration_since(Instant::now());
                        gate.acquire_patient(self.ticket, loose, origin, left, patience()).await
                    }
                    other => other,
                }
            }
            _ => gate.acquire_patient(self.ticket, pin, origin, left, patience()).await,
        };
        trace.queue_wait = Some(arrived.elapsed());
        match acquired {
            Err(ProxyError::QueueTimeout { cause, .. }) => {
                Err(ProxyError::QueueTimeout { timeout: service.config.queue.timeout, cause })
            }
            other => other,
        }
    }
}

/// A connection's first request, routed and admitted by the lobby, about to
/// queue (see [`Proxy::admit_early`]). Dropping it (the client left) takes it
/// out of the queue and records it as 499.
pub struct EarlyWait {
    record: Record,
    admitted: Admitted,
}

impl EarlyWait {
    /// Queues the request and waits for its slot, or its error.
    pub async fn wait(mut self) -> Early {
        let service = self.record.service.clone();
        let session = self.admitted.session.as_ref().map(|s| s.id);
        let origin = self.admitted.origin;
        let pin = self.admitted.pin;
        let (mut place, slot) = Place::take(&service, origin, pin, &mut self.record.trace, None);
        let acquired = match slot {
            Some(slot) => Ok(slot),
            None => place.wait(&service, pin, session, origin, &mut self.record.trace).await,
        };
        self.admitted.queued = Some(Box::new(Queued { place, acquired }));
        Early { record: self.record, admitted: self.admitted }
    }
}

/// A connection's first request with the slot its wait gave (or the error),
/// for hyper to read again and [`Proxy::handle`] to forward.
pub struct Early {
    record: Record,
    admitted: Admitted,
}

/// How long a standby holds a request while no active replica can be
/// reached (a hand-over of the Lease: the old holder draining, the new one
/// not yet elected), before it answers 503.
const HANDOVER_WAIT: Duration = Duration::from_secs(30);

/// Status recorded for a request whose client left before its answer
/// (nginx's "client closed request").
const CLIENT_LEFT: u16 = 499;

/// Counts and logs one routed request exactly once: when it is answered, or
/// when its client leaves first.
struct Record {
    service: Arc<Service>,
    /// The class of the request (its route's, else its service's).
    priority: crate::gate::Priority,
    start: Instant,
    line: Option<LogLine>,
    request_id: http::HeaderValue,
    trace: Trace,
    done: bool,
}

impl Record {
    fn finish(mut self, mut response: Response<ResponseBody>) -> Response<ResponseBody> {
        self.record(response.status().as_u16());
        response.headers_mut().insert(X_REQUEST_ID, self.request_id.clone());
        response
    }

    fn record(&mut self, status: u16) {
        self.done = true;
        let metrics = &self.service.metrics;
        let now = Instant::now();
        let took = now.saturating_duration_since(self.start);
        metrics.answered(status);
        metrics.duration.observe(took.as_secs_f64());
        metrics.recent.record(now, status, took);
        // A request that left while queued waited until it left.
        let queue_wait = self.trace.queue_wait.or_else(|| self.trace.arrived.map(|t| t.elapsed()));
        metrics.queue_wait.observe(queue_wait.unwrap_or_default().as_secs_f64());
        let Some(line) = &self.line else { return };
        let trace = &self.trace;
        if status == CLIENT_LEFT && trace.endpoint.is_none() {
            // Left before reaching a pod (a reset HTTP/2 stream, a client
            // giving up in the queue): counted above, summarised in the log.
            static LEFT: crate::observe::flood::Flood =
                crate::observe::flood::Flood::new("requests ended by their client before reaching a pod");
            return LEFT.hit();
        }
        tracing::info!(
            method = %line.method,
            host = ?line.host,
            path = line.uri.path(),
            status,
            service = %self.service.config.name,
            total_ms = millis(Some(took)),
            queue_ms = millis(queue_wait),
            upstream_ms = millis(trace.upstream),
            client = %line.client.map(|ip| ip.to_string()).unwrap_or_default(),
            tenant = ?line.tenant.as_deref().unwrap_or(""),
            endpoint = trace.endpoint.map(|a| a.to_string()).unwrap_or_default(),
            request_id = self.request_id.to_str().unwrap_or(""),
            "{}",
            if status == CLIENT_LEFT { "client left" } else { "request" }
        );
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.done {
            self.record(CLIENT_LEFT);
        }
    }
}

const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
const X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: http::HeaderName = http::HeaderName::from_static("x-forwarded-host");

/// A request extension: it came over sdgate's own TLS (its
/// `X-Forwarded-Proto: https` is sdgate's word).
#[derive(Clone, Copy, Debug)]
pub struct ViaTls;

/// A client's `X-Forwarded-Proto` and `-Host` (a Secure cookie, what
/// forward-auth and the pod are told) are believed only from the service's
/// trusted proxies; over sdgate's own TLS, Proto is sdgate's word.
fn strip_forwarded<B>(service: &Service, request: &mut Request<B>, peer: std::net::IpAddr) {
    let headers = request.headers();
    if !(headers.contains_key(X_FORWARDED_PROTO) || headers.contains_key(X_FORWARDED_HOST))
        || fairness::trusts(&service.fairness, peer)
    {
        return;
    }
    if request.extensions().get::<ViaTls>().is_none() {
        request.headers_mut().remove(X_FORWARDED_PROTO);
    }
    request.headers_mut().remove(X_FORWARDED_HOST);
}

/// The request's id: the client's `X-Request-Id` if it sent one, else a new
/// random one; set on the request so the pod sees it too.
fn request_id<B>(request: &mut Request<B>) -> http::HeaderValue {
    if let Some(id) = request.headers().get(&X_REQUEST_ID) {
        return id.clone();
    }
    // Room for this header and the three `X-Forwarded-*` the pod's request
    // gets: the map grows once, not header by header.
    request.headers_mut().reserve(4);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    for (i, byte) in fastrand::u128(..).to_be_bytes().into_iter().enumerate() {
        id[2 * i] = HEX[usize::from(byte >> 4)];
        id[2 * i + 1] = HEX[usize::from(byte & 0xf)];
    }
    // One allocation, shared by the request, the record and the answer
    // (from a copied slice, the first clone would allocate again).
    let value = http::HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(id))
        .unwrap_or_else(|_| http::HeaderValue::from_static("0"));
    request.headers_mut().insert(X_REQUEST_ID, value.clone());
    value
}

fn millis(duration: Option<Duration>) -> f64 {
    duration.map_or(0.0, |d| (d.as_secs_f64() * 1e4).round() / 10.0)
}

/// What the status page reads of the proxy.
impl Observed for Proxy {
    fn active(&self) -> bool {
        self.is_active()
    }

    fn services(&self) -> Vec<ServiceView> {
        self.table()
            .services
            .iter()
            .map(|service| ServiceView {
                name: service.config.name.clone(),
                hosts: service.config.hosts.clone(),
                container_concurrency: service.config.container_concurrency,
                gate: service.gate.clone(),
                metrics: service.metrics.clone(),
                sessions: service.affinity.as_ref().map(|a| a.sessions.clone()),
            })
            .collect()
    }

    fn routes(&self) -> Vec<RouteStatus> {
        let table = self.table();
        // Routes of one (a service's own hosts) come after the config's.
        let configured = table.routes.len().saturating_sub(table.services.len());
        table.routes[..configured]
            .iter()
            .map(|route| {
                let counts: Vec<u64> = route.split.iter().map(|s| s.recent.last_minute()).collect();
                let total = counts.iter().sum::<u64>().max(1) as f64;
                let split = route
                    .split
                    .iter()
                    .zip(counts)
                    .map(|(split, count)| SplitStatus {
                        service: split.service.config.name.clone(),
                        weight: split.weight,
                        requests_last_minute: count,
                        share_last_minute: count as f64 / total,
                    })
                    .collect();
                RouteStatus { name: route.name.clone(), split }
            })
            .collect()
    }

    fn jobs(&self) -> Option<crate::observe::status::JobsStatus> {
        self.jobs().map(|jobs| jobs.status())
    }

    fn tenants(&self) -> Vec<crate::observe::status::TenantStatus> {
        use crate::observe::status::{SpendStatus, TenantStatus};
        let view = |spend: crate::jobs::store::Spend| SpendStatus {
            requests: spend.requests,
            gpu_seconds: spend.gpu_us as f64 / 1e6,
            images: spend.images,
            checkpoint_loads: spend.loads,
        };
        // The 100 that spent the most pod time today.
        let mut summary = self.usage.summary();
        summary.sort_by_key(|(_, _, _, today)| std::cmp::Reverse(today.gpu_us));
        summary.truncate(100);
        summary
            .into_iter()
            .map(|(service, tenant, this_hour, today)| TenantStatus {
                service,
                tenant,
                this_hour: view(this_hour),
                today: view(today),
            })
            .collect()
    }

    fn last_reload(&self) -> Option<Reloaded> {
        Proxy::last_reload(self)
    }
}
