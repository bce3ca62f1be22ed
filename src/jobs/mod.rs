//! Async jobs: a request that outlives its connection and sdgate's process.
//!
//! A request with `Prefer: respond-async` (RFC 7240), or to one of its
//! service's `async_paths`, is kept in the store (its method, path, headers
//! and body) and answered `202 Accepted` with `Location: /.sdgate/jobs/{id}`.
//! The active replica's runner takes the store's queued jobs in order and
//! sends each through the same path as any request ([`crate::proxy`]: fair
//! share, priority, checkpoint routing, `container_concurrency`), at most
//! `jobs.max_dispatched` of a service at once; the pod's answer (status,
//! headers, body) is kept until `jobs.result_ttl` after the job ended, and
//! the job's webhook, if any, is POSTed ([`webhook`]).
//!
//! States: `queued` -> `running` (a pod took it) -> `succeeded` (the pod
//! answered 2xx) | `failed` (any other answer, or sdgate's error) |
//! `cancelled` (DELETE). A replica that becomes active (at start, after a
//! restart or a takeover) finds the jobs left `running` by a replica that
//! died: each is retried once (`jobs.on_lost: retry`; it may then have run
//! twice) or failed (`fail`).

pub mod store;
pub mod webhook;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::ResponseBody;
use crate::config::{JobsConfig, OnLost};
use crate::error::lock;
use crate::gate::{SharedGate, Ticket};
use store::{Ending, Row, Store};

/// Where jobs are reached (a prefix no WebUI route uses).
pub const PREFIX: &str = "/.sdgate/jobs";
/// A job's own webhook URL, on the submitting request.
pub const CALLBACK_HEADER: &str = "sdgate-callback";

/// The largest JSON result a job's view inlines (larger: `result.url` only).
const INLINE_MAX: i64 = 8 << 20;

/// `kept_bytes` not summed yet.
const UNKNOWN: i64 = -1;

/// How often the active replica deletes expired jobs and counts the store.
const SWEEP: Duration = Duration::from_secs(2);

/// A job's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl State {
    pub const ALL: [State; 5] = [State::Queued, State::Running, State::Succeeded, State::Failed, State::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn ended(self) -> bool {
        !matches!(self, State::Queued | State::Running)
    }
}

/// A new job id: 128 bits from the OS, in hex.
pub fn new_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).context("no randomness for a job id")?;
    Ok(hex(&bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `row` belongs to `owner` (compared in constant time).
pub fn owned_by(row: &Row, owner: &str) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(row.owner.as_bytes(), owner.as_bytes()))
}

/// Whether `text` can be a job id (32 hex digits): anything else is not
/// looked up.
pub fn is_id(text: &str) -> bool {
    text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// A job's request as kept: what the runner sends again.
#[derive(Serialize, Deserialize)]
pub struct Head {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    /// The client's address, for fair share and `X-Forwarded-For`.
    pub client: Option<std::net::IpAddr>,
    /// The caller's name (`auth`: a key's name or the identity a token or
    /// forward-auth named; the credential itself is not kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Its group (`auth.groups`), whose limits its run is held to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// What the proxy tells a running job of its way through the gate.
#[derive(Default)]
pub struct Hooks {
    progress: Mutex<Progress>,
    /// The latest a queued job may still take a pod.
    pub deadline: Option<Instant>,
    took_pod: Notify,
    /// Its owner cancelled it: the pod is told to stop (not when a run is
    /// dropped for any other reason: a lost lease, the drain's end).
    cancelled: std::sync::atomic::AtomicBool,
    /// Passed when it has its place in the gate (or is out of the way):
    /// the service's next job waits for it, so jobs reach the gate in the
    /// order they were submitted.
    turn: Arc<Turn>,
    after: Option<Arc<Turn>>,
}

/// One job's turn to reach the gate.
#[derive(Default)]
pub struct Turn {
    passed: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl Turn {
    fn pass(&self) {
        self.passed.store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_waiters();
    }

    fn is_passed(&self) -> bool {
        self.passed.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_passed() {
                return;
            }
            notified.await;
        }
    }
}

/// Passes a job's turn however its run ends.
struct PassOnDrop(Arc<Turn>);

impl Drop for PassOnDrop {
    fn drop(&mut self) {
        self.0.pass();
    }
}

#[derive(Default)]
struct Progress {
    place: Option<(Arc<SharedGate>, Ticket)>,
    pod: Option<SocketAddr>,
}

impl Hooks {
    /// The job waits at `ticket` of `gate`.
    pub fn queued(&self, gate: &Arc<SharedGate>, ticket: Ticket) {
        lock(&self.progress).place = Some((gate.clone(), ticket));
        self.turn.pass();
    }

    /// The job took `pod`.
    pub fn started(&self, pod: SocketAddr) {
        let mut progress = lock(&self.progress);
        progress.pod = Some(pod);
        progress.place = None;
        drop(progress);
        self.turn.pass();
        self.took_pod.notify_one();
    }

    fn pod(&self) -> Option<SocketAddr> {
        lock(&self.progress).pod
    }

    /// Whether the job's owner cancelled it.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Requests ahead of the job in its service's queue.
    fn position(&self) -> Option<usize> {
        let progress = lock(&self.progress);
        progress.place.as_ref().and_then(|(gate, ticket)| gate.position(*ticket))
    }
}

/// What the runner needs of the proxy: a kept request sent through the
/// gate, and the progress of a pod.
pub trait Runner: Send + Sync + 'static {
    /// Runs a kept request on `service`: the answer (the pod's, or sdgate's
    /// own error, JSON), or [`Again`] when sdgate turned it away for now
    /// (queue full, this client's share of the queue full, not the active
    /// replica, shutting down): the job stays queued.
    fn run(
        &self,
        request: Request<Bytes>,
        service: &str,
        client: Option<std::net::IpAddr>,
        tenant: Option<(&str, Option<&str>)>,
        hooks: Arc<Hooks>,
    ) -> impl std::future::Future<Output = Result<Response<ResponseBody>, Again>> + Send;
    /// Requests waiting in the service's queue now.
    fn queue_depth(&self, service: &str) -> usize;
    /// Whether this gateway has a service of that name (jobs of others in a
    /// shared table are left alone).
    fn serves(&self, service: &str) -> bool;
    /// The pod's own progress answer (`/sdapi/v1/progress`), if it gives one.
    fn progress(
        &self,
        service: &str,
        pod: SocketAddr,
    ) -> impl std::future::Future<Output = Option<serde_json::Value>> + Send;
}

/// sdgate turned a job's run away for now (why): it stays queued.
#[derive(Debug)]
pub struct Again(pub String);

/// A queued job not dispatched yet: (created, id, service), so the
/// backlog is in submission order whatever order jobs come back in.
type Pending = (i64, String, String);

/// A job this replica dispatched.
struct Live {
    service: String,
    created_us: i64,
    task: tokio::task::AbortHandle,
    hooks: Arc<Hooks>,
}

/// The jobs: the store, and on the active replica the runner's state.
pub struct Jobs {
    pub config: JobsConfig,
    store: Store,
    webhooks: webhook::Sender,
    live: Mutex<HashMap<String, Live>>,
    /// Services whose jobs the gate turned away lately: none of their jobs
    /// is dispatched before then (so they go back in order).
    paused: Mutex<HashMap<String, Instant>>,
    /// Each service's last dispatched job's turn.
    turns: Mutex<HashMap<String, Arc<Turn>>>,
    /// Queued jobs not dispatched yet, oldest first (the active replica's).
    backlog: Mutex<BTreeSet<Pending>>,
    wake: Notify,
    /// Bytes kept in the store, as last summed plus submits since
    /// ([`UNKNOWN`]: to be summed).
    kept_bytes: std::sync::atomic::AtomicI64,
    /// The store's counts as last read (for `/status`).
    counted: Mutex<Vec<store::Count>>,
    /// The runner is on (this replica is active).
    running: std::sync::atomic::AtomicBool,
    metrics: JobMetrics,
}

#[derive(Clone)]
struct JobMetrics {
    jobs: IntGaugeVec,
    oldest: prometheus::GaugeVec,
    submitted: IntCounterVec,
    finished: IntCounterVec,
    lost: IntCounterVec,
    webhooks: IntCounterVec,
}

impl JobMetrics {
    fn new(metrics: &crate::observe::metrics::Metrics) -> Self {
        let made = Self {
            jobs: IntGaugeVec::new(
                Opts::new("sdgate_jobs", "Async jobs in the store, by state"),
                &["service", "state"],
            )
            .expect("static metric definition"),
            oldest: prometheus::GaugeVec::new(
                Opts::new("sdgate_job_oldest_age_seconds", "Age of the oldest async job in each state"),
                &["service", "state"],
            )
            .expect("static metric definition"),
            submitted: IntCounterVec::new(
                Opts::new("sdgate_jobs_submitted_total", "Async jobs accepted (202)"),
                &["service"],
            )
            .expect("static metric definition"),
            finished: IntCounterVec::new(
                Opts::new("sdgate_jobs_finished_total", "Async jobs ended, by state (succeeded, failed, cancelled)"),
                &["service", "state"],
            )
            .expect("static metric definition"),
            lost: IntCounterVec::new(
                Opts::new(
                    "sdgate_jobs_lost_total",
                    "Jobs found running after their replica died, by what was done (retried, failed)",
                ),
                &["service", "outcome"],
            )
            .expect("static metric definition"),
            webhooks: IntCounterVec::new(
                Opts::new(
                    "sdgate_job_webhooks_total",
                    "Job webhook attempts, by result (delivered, retried, failed, refused)",
                ),
                &["result"],
            )
            .expect("static metric definition"),
        };
        for result in ["delivered", "retried", "failed", "refused"] {
            made.webhooks.with_label_values(&[result]);
        }
        metrics.register(Box::new(made.jobs.clone()));
        metrics.register(Box::new(made.oldest.clone()));
        metrics.register(Box::new(made.submitted.clone()));
        metrics.register(Box::new(made.finished.clone()));
        metrics.register(Box::new(made.lost.clone()));
        metrics.register(Box::new(made.webhooks.clone()));
        made
    }
}

/// A job to keep: what the proxy read of the submitting request.
pub struct Submit {
    pub service: String,
    pub owner: String,
    pub head: Head,
    pub body: Bytes,
    pub webhook: Option<String>,
}

impl Jobs {
    /// Opens the store; metrics go to `metrics`.
    pub async fn open(config: &JobsConfig, metrics: &crate::observe::metrics::Metrics) -> Result<Arc<Self>> {
        let store = Store::open(&config.store).await?;
        let metrics = JobMetrics::new(metrics);
        let webhooks = webhook::Sender::new(&config.webhooks, metrics.webhooks.clone())?;
        Ok(Arc::new(Self {
            config: config.clone(),
            store,
            webhooks,
            live: Mutex::default(),
            backlog: Mutex::default(),
            turns: Mutex::default(),
            paused: Mutex::default(),
            wake: Notify::new(),
            counted: Mutex::default(),
            kept_bytes: std::sync::atomic::AtomicI64::new(UNKNOWN),
            running: std::sync::atomic::AtomicBool::new(false),
            metrics,
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Keeps a new job; its id.
    pub async fn submit(&self, submit: Submit) -> Result<Row, crate::error::ProxyError> {
        use crate::error::ProxyError;
        let unreachable = |error: anyhow::Error| ProxyError::JobStore(format!("{error:#}"));
        // The store's sum, read at most every SWEEP (not a scan per
        // submit), plus what was kept since.
        let total = match self.kept_bytes.load(std::sync::atomic::Ordering::Relaxed) {
            UNKNOWN => {
                let total = self.store.total_bytes().await.map_err(unreachable)?;
                self.kept_bytes.store(total, std::sync::atomic::Ordering::Relaxed);
                total
            }
            total => total,
        };
        if total.saturating_add(submit.body.len() as i64) > self.config.max_total_bytes as i64 {
            return Err(ProxyError::JobsFull(self.config.max_total_bytes));
        }
        let id = new_id().map_err(unreachable)?;
        let head = serde_json::to_string(&submit.head).map_err(|e| unreachable(e.into()))?;
        let row = Row {
            id: id.clone(),
            service: submit.service.clone(),
            owner: submit.owner,
            state: State::Queued,
            created_us: now_us(),
            started_us: None,
            finished_us: None,
            expires_us: None,
            attempts: 0,
            pod: None,
            error: None,
            webhook_state: submit.webhook.as_ref().map(|_| "waiting".to_string()),
            webhook: submit.webhook,
            result_status: None,
            result_headers: None,
            request_bytes: (head.len() + submit.body.len()) as i64,
            result_bytes: 0,
        };
        let new = store::New { row: row.clone(), head, body: submit.body.to_vec() };
        self.store.insert(new).await.map_err(unreachable)?;
        self.count_kept(row.request_bytes);
        self.metrics.submitted.with_label_values(&[&submit.service]).inc();
        tracing::info!(job = %id, service = %submit.service, "job queued");
        if self.running.load(std::sync::atomic::Ordering::Acquire) {
            lock(&self.backlog).insert((row.created_us, id, submit.service));
            self.wake.notify_one();
        }
        Ok(row)
    }

    /// Adds to the bytes kept (unless they are to be summed anyway).
    fn count_kept(&self, bytes: i64) {
        let _ = self.kept_bytes.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |kept| (kept != UNKNOWN).then_some(kept + bytes),
        );
    }

    /// A job by id (an id that is not well-formed is not looked up).
    pub async fn get(&self, id: &str) -> Result<Option<Row>, crate::error::ProxyError> {
        if !is_id(id) {
            return Ok(None);
        }
        self.store.get(id).await.map_err(|e| crate::error::ProxyError::JobStore(format!("{e:#}")))
    }

    /// A job in a list: its state and times, no result body or progress.
    pub fn summary(&self, row: &Row) -> serde_json::Value {
        let mut summary = basics(row);
        summary["status"] = row.result_status.into();
        summary
    }

    /// A job's state as its owner sees it (with its place in line or its
    /// pod's progress, and its result when done).
    pub async fn view<R: Runner>(&self, row: &Row, runner: &R) -> serde_json::Value {
        let hooks = lock(&self.live).get(&row.id).map(|live| live.hooks.clone());
        let position = match row.state {
            State::Queued => match hooks.as_ref().map(|h| h.position()) {
                // In the gate.
                Some(Some(ahead)) => Some(ahead),
                // On its way to the gate: behind what waits there.
                Some(None) => Some(runner.queue_depth(&row.service)),
                // Still in the store: behind what waits in the gate and
                // every job of its service before it in the backlog.
                None => {
                    let ahead = {
                        let backlog = lock(&self.backlog);
                        let mut mine = backlog.iter().filter(|(_, _, service)| *service == row.service);
                        mine.position(|(_, id, _)| *id == row.id)
                    };
                    // Not held here (another replica's, or being taken
                    // back): its place is not known.
                    ahead.map(|at| at + runner.queue_depth(&row.service))
                }
            },
            _ => None,
        };
        let progress = match (row.state, hooks.as_ref().and_then(|h| h.pod())) {
            (State::Running, Some(pod)) => runner.progress(&row.service, pod).await,
            _ => None,
        };
        let mut view = basics(row);
        view["started_at"] = seconds(row.started_us).into();
        view["expires_at"] = seconds(row.expires_us).into();
        view["attempts"] = row.attempts.into();
        if let Some(position) = position {
            view["position"] = position.into();
        }
        if let Some(progress) = progress {
            view["progress"] = progress;
        }
        if let Some(url) = &row.webhook {
            view["webhook"] = serde_json::json!({ "url": url, "state": row.webhook_state });
        }
        if let Some(status) = row.result_status {
            let headers: Vec<(String, String)> =
                row.result_headers.as_deref().and_then(|h| serde_json::from_str(h).ok()).unwrap_or_default();
            let json = headers.iter().any(|(name, value)| {
                name.eq_ignore_ascii_case("content-type") && value.to_ascii_lowercase().contains("json")
            });
            let mut result = serde_json::json!({
                "status": status,
                "headers": headers.iter().map(|(n, v)| serde_json::json!([n, v])).collect::<Vec<_>>(),
                "bytes": row.result_bytes,
                "url": format!("{PREFIX}/{}/result", row.id),
            });
            // Inlined when small (the WebUI's answers with a few images);
            // a larger one only at its URL, so a poll stays cheap.
            if json && row.result_bytes <= INLINE_MAX {
                if let Ok(Some(body)) = self.store.result_body(&row.id).await {
                    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body) {
                        result["body"] = value;
                    }
                }
            }
            view["result"] = result;
        }
        view
    }

    /// A finished job's result as the pod answered it.
    pub async fn result(&self, row: &Row) -> Result<Response<ResponseBody>, crate::error::ProxyError> {
        use crate::error::ProxyError;
        let Some(status) = row.result_status else {
            return Err(ProxyError::JobNotReady(match row.state {
                State::Queued | State::Running => "the job has not finished: its result is not there yet",
                _ => "the job ended without an answer from a pod (see its error)",
            }));
        };
        let body = self.store.result_body(&row.id).await.map_err(|e| ProxyError::JobStore(format!("{e:#}")))?;
        let mut response = Response::new(crate::body::full(body.unwrap_or_default()));
        *response.status_mut() = http::StatusCode::from_u16(status as u16).unwrap_or(http::StatusCode::OK);
        let headers: Vec<(String, String)> =
            row.result_headers.as_deref().and_then(|h| serde_json::from_str(h).ok()).unwrap_or_default();
        for (name, value) in headers {
            if let (Ok(name), Ok(value)) =
                (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_str(&value))
            {
                response.headers_mut().append(name, value);
            }
        }
        Ok(response)
    }

    /// Cancels a job not ended: out of the queue, or its pod interrupted
    /// (the pod's slot is held until it answers, as for a client that left).
    pub async fn cancel(&self, row: &Row) -> Result<bool, crate::error::ProxyError> {
        {
            // Both at once, in dispatch's order: a job leaving the backlog
            // is in `live` before either lock is let go.
            let mut backlog = lock(&self.backlog);
            let mut live = lock(&self.live);
            backlog.retain(|(_, id, _)| *id != row.id);
            if let Some(live) = live.remove(&row.id) {
                live.hooks.cancelled.store(true, std::sync::atomic::Ordering::Release);
                live.task.abort();
            }
        }
        let ended =
            self.end(&row.id, &row.service, State::Cancelled, Some("cancelled by its owner".into()), None).await;
        self.wake.notify_one();
        ended.map_err(|e| crate::error::ProxyError::JobStore(format!("{e:#}")))
    }

    /// Ends a job (if it has not ended) and sends its webhook.
    async fn end(
        &self,
        id: &str,
        service: &str,
        state: State,
        error: Option<String>,
        answer: Option<(u16, String, Vec<u8>)>,
    ) -> Result<bool> {
        let now = now_us();
        let row = self.store.get(id).await?;
        let webhook = row.as_ref().and_then(|row| row.webhook.clone());
        let (status, headers, body) = match answer {
            Some((status, headers, body)) => (Some(i64::from(status)), Some(headers), Some(body)),
            None => (None, None, None),
        };
        let ending = Ending {
            state,
            finished_us: now,
            expires_us: now + self.config.result_ttl.as_micros() as i64,
            error: error.clone(),
            status,
            headers,
            body,
            webhook_state: webhook.as_ref().map(|_| "pending".to_string()),
        };
        let result_bytes = ending.body.as_ref().map_or(0, |b| b.len() as i64);
        let ended = self.store.finish(id, ending).await?;
        if ended {
            self.count_kept(result_bytes);
            self.metrics.finished.with_label_values(&[service, state.as_str()]).inc();
            tracing::info!(job = %id, %service, state = state.as_str(), error = error.as_deref().unwrap_or(""), "job ended");
            if let Some(row) = self.store.get(id).await? {
                if row.webhook.is_some() {
                    self.webhooks.send(self.store.clone(), row);
                }
            }
        }
        Ok(ended)
    }

    /// The active replica's runner: takes over what the store holds, then
    /// dispatches queued jobs as they come, until `stop`.
    pub async fn run<R: Runner>(self: Arc<Self>, runner: Arc<R>, mut stop: tokio::sync::watch::Receiver<bool>) {
        self.running.store(true, std::sync::atomic::Ordering::Release);
        loop {
            let recovered = tokio::select! {
                recovered = self.recover(&*runner) => recovered,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            match recovered {
                Ok(()) => break,
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "jobs: cannot read the store; trying again in 1 s");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.wait_for(|stop| *stop) => return,
                    }
                }
            }
        }
        let mut next_sweep = Instant::now();
        loop {
            if Instant::now() >= next_sweep {
                next_sweep = Instant::now() + SWEEP;
                tokio::select! {
                    _ = self.sweep(&*runner) => {}
                    _ = stop.wait_for(|stop| *stop) => break,
                }
            }
            // Never a dispatch once told to stop.
            if *stop.borrow() {
                break;
            }
            self.dispatch(&runner);
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(next_sweep) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
        }
        self.running.store(false, std::sync::atomic::Ordering::Release);
    }

    /// Stops the runner's jobs: those still waiting go back to the store's
    /// queue (the next active replica takes them); running ones may finish
    /// until `deadline`, then are left to the next replica (lost).
    pub async fn stop(&self, deadline: Instant) {
        self.running.store(false, std::sync::atomic::Ordering::Release);
        lock(&self.backlog).clear();
        {
            let mut live = lock(&self.live);
            live.retain(|_, job| {
                let waiting = job.hooks.pod().is_none();
                if waiting {
                    job.task.abort();
                }
                !waiting
            });
        }
        while !lock(&self.live).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (_, live) in lock(&self.live).drain() {
            live.task.abort();
        }
    }

    /// At activation: pending webhooks sent, lost runs retried once or
    /// failed, the queue loaded.
    async fn recover<R: Runner>(&self, runner: &R) -> Result<()> {
        // Read first: a lost job failed below sends its own.
        for row in self.store.webhooks_pending().await? {
            if runner.serves(&row.service) {
                self.webhooks.send(self.store.clone(), row);
            }
        }
        let rows = self.store.unfinished().await?;
        let mut queued = BTreeSet::new();
        for row in rows {
            if lock(&self.live).contains_key(&row.id) || !runner.serves(&row.service) {
                continue;
            }
            match row.state {
                State::Running if self.config.on_lost == OnLost::Retry && row.attempts < 2 => {
                    tracing::warn!(job = %row.id, service = %row.service, "job was running when its replica stopped: retried (it may run twice)");
                    self.metrics.lost.with_label_values(&[&row.service, "retried"]).inc();
                    self.store.requeue(&row.id).await?;
                    queued.insert((row.created_us, row.id, row.service));
                }
                State::Running => {
                    self.metrics.lost.with_label_values(&[&row.service, "failed"]).inc();
                    let why = "the replica running it stopped (jobs.on_lost)";
                    self.end(&row.id, &row.service, State::Failed, Some(why.into()), None).await?;
                }
                _ => {
                    queued.insert((row.created_us, row.id, row.service));
                }
            }
        }
        tracing::info!(queued = queued.len(), "jobs: the runner takes the store's queue");
        // With the jobs submitted while the store was read.
        lock(&self.backlog).extend(queued);
        Ok(())
    }

    /// Expired jobs deleted; the gauges refreshed; the bytes kept summed;
    /// queued jobs in neither the backlog nor the gate (left there by a
    /// store that failed) back in line.
    async fn sweep<R: Runner>(&self, runner: &R) {
        if let Ok(rows) = self.store.unfinished().await {
            let mut backlog = lock(&self.backlog);
            let live = lock(&self.live);
            for row in rows {
                let known = live.contains_key(&row.id) || backlog.iter().any(|(_, id, _)| *id == row.id);
                if row.state == State::Queued && !known && runner.serves(&row.service) {
                    backlog.insert((row.created_us, row.id, row.service));
                }
            }
        }
        if let Err(error) = self.store.expire(now_us()).await {
            tracing::warn!(error = %format!("{error:#}"), "jobs: cannot delete expired jobs");
        }
        let total = self.store.total_bytes().await.unwrap_or(UNKNOWN);
        self.kept_bytes.store(total, std::sync::atomic::Ordering::Relaxed);
        self.refresh_gauges().await;
    }

    /// `sdgate_jobs` and `sdgate_job_oldest_age_seconds` from the store.
    pub async fn refresh_gauges(&self) {
        let Ok(counts) = self.store.counts().await else { return };
        *lock(&self.counted) = counts.clone();
        self.metrics.jobs.reset();
        self.metrics.oldest.reset();
        let now = now_us();
        for count in counts {
            self.metrics.jobs.with_label_values(&[&count.service, count.state.as_str()]).set(count.jobs);
            let age = (now - count.oldest_us).max(0) as f64 / 1e6;
            self.metrics.oldest.with_label_values(&[&count.service, count.state.as_str()]).set(age);
        }
    }

    /// Jobs by service and state, as last counted (for `/status`).
    pub fn status(&self) -> crate::observe::status::JobsStatus {
        let now = now_us();
        let by_state = lock(&self.counted)
            .iter()
            .map(|count| crate::observe::status::JobCount {
                service: count.service.clone(),
                state: count.state.as_str(),
                jobs: count.jobs,
                oldest_age_seconds: (now - count.oldest_us).max(0) as f64 / 1e6,
            })
            .collect();
        crate::observe::status::JobsStatus { store: self.store.engine_name(), by_state }
    }

    /// Starts backlog jobs while their service has room.
    fn dispatch<R: Runner>(self: &Arc<Self>, runner: &Arc<R>) {
        let mut backlog = lock(&self.backlog);
        let mut live = lock(&self.live);
        let mut held = Vec::new();
        let now = Instant::now();
        let paused = {
            let mut paused = lock(&self.paused);
            paused.retain(|_, until| *until > now);
            paused.keys().cloned().collect::<Vec<_>>()
        };
        while let Some((created_us, id, service)) = backlog.pop_first() {
            if live.contains_key(&id) {
                continue;
            }
            let dispatched = live.values().filter(|l| l.service == service).count();
            if dispatched >= self.config.max_dispatched || paused.contains(&service) {
                held.push((created_us, id, service));
                continue;
            }
            let left = (created_us + self.config.queue_timeout.as_micros() as i64).saturating_sub(now_us()).max(0);
            let turn = Arc::new(Turn::default());
            let after = lock(&self.turns).insert(service.clone(), turn.clone()).filter(|t| !t.is_passed());
            let hooks = Arc::new(Hooks {
                deadline: Some(Instant::now() + Duration::from_micros(left as u64)),
                turn,
                after,
                ..Hooks::default()
            });
            let task = tokio::spawn(self.clone().run_one(runner.clone(), id.clone(), service.clone(), hooks.clone()));
            live.insert(id, Live { service, created_us, task: task.abort_handle(), hooks });
        }
        backlog.extend(held);
    }

    /// One job, from the store to its end; the job's end is its own task,
    /// so a cancel (which aborts this one) cannot cut it between the
    /// store's write and the webhook.
    async fn run_one<R: Runner>(self: Arc<Self>, runner: Arc<R>, id: String, service: String, hooks: Arc<Hooks>) {
        let outcome = {
            let _turn = PassOnDrop(hooks.turn.clone());
            self.try_run(&runner, &id, &service, &hooks).await
        };
        let again = match outcome {
            Run::Ended(state, error, answer) => {
                let jobs = self.clone();
                let (id, service) = (id.clone(), service.clone());
                // Written until the store takes it (a minute at most; then
                // the job stays `running` and the next active replica
                // counts it lost).
                let ending = tokio::spawn(async move {
                    for _ in 0..60 {
                        match jobs.end(&id, &service, state, error.clone(), answer.clone()).await {
                            Ok(_) => return,
                            Err(e) => {
                                tracing::error!(job = %id, error = %format!("{e:#}"), "jobs: cannot record a job's end; trying again in 1 s");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    }
                });
                let _ = ending.await;
                false
            }
            Run::Nothing => false,
            Run::Again(why) => {
                tracing::info!(job = %id, %service, %why, "job turned away for now: it stays queued");
                true
            }
            Run::StoreDown(error) => {
                tracing::warn!(job = %id, error = %format!("{error:#}"), "jobs: the store failed during a job; it is tried again");
                true
            }
        };
        if again {
            // Back in line at once, in its order; the service's jobs wait
            // AGAIN_AFTER before the next try.
            {
                let mut backlog = lock(&self.backlog);
                if let Some(live) = lock(&self.live).remove(&id) {
                    backlog.insert((live.created_us, id, service.clone()));
                }
            }
            lock(&self.paused).insert(service, Instant::now() + AGAIN_AFTER);
            let jobs = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(AGAIN_AFTER).await;
                jobs.wake.notify_one();
            });
        } else {
            lock(&self.live).remove(&id);
        }
        self.wake.notify_one();
    }

    async fn try_run<R: Runner>(&self, runner: &Arc<R>, id: &str, service: &str, hooks: &Arc<Hooks>) -> Run {
        match self.try_run_inner(runner, id, service, hooks).await {
            Ok(run) => run,
            Err(error) => Run::StoreDown(error),
        }
    }

    async fn try_run_inner<R: Runner>(
        &self,
        runner: &Arc<R>,
        id: &str,
        service: &str,
        hooks: &Arc<Hooks>,
    ) -> Result<Run> {
        let Some(row) = self.store.get(id).await? else { return Ok(Run::Nothing) };
        match row.state {
            State::Queued => {}
            // This replica's earlier try of it set it running, then the
            // store failed: this replica is the only runner.
            State::Running => {
                self.store.requeue(id).await?;
            }
            _ => return Ok(Run::Nothing),
        }
        let deadline_us = row.created_us + self.config.queue_timeout.as_micros() as i64;
        if deadline_us <= now_us() {
            let why = format!("not started within jobs.queue_timeout ({:?})", self.config.queue_timeout);
            return Ok(Run::Ended(State::Failed, Some(why), None));
        }
        let Some((head, body)) = self.store.request(id).await? else { return Ok(Run::Nothing) };
        let Ok(head) = serde_json::from_str::<Head>(&head) else {
            return Ok(Run::Ended(State::Failed, Some("its kept request cannot be read".into()), None));
        };
        // The job before it reaches the gate first (a second at most: one
        // stuck elsewhere holds nobody up).
        if let Some(after) = &hooks.after {
            let _ = tokio::time::timeout(Duration::from_secs(1), after.wait()).await;
        }
        let mut request = Request::builder().method(head.method.as_str()).uri(head.uri.as_str());
        for (name, value) in &head.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let Ok(request) = request.body(Bytes::from(body)) else {
            return Ok(Run::Ended(State::Failed, Some("its kept request cannot be rebuilt".into()), None));
        };
        let tenant = head.tenant.as_deref().map(|name| (name, head.group.as_deref()));
        let answer = runner.run(request, service, head.client, tenant, hooks.clone());
        tokio::pin!(answer);
        let response = loop {
            tokio::select! {
                response = &mut answer => break response,
                _ = hooks.took_pod.notified() => {
                    if let Some(pod) = hooks.pod() {
                        // Only a queued job runs: one cancelled (or taken
                        // by another runner) meanwhile is dropped, its pod
                        // told to stop.
                        if !self.store.set_running(id, &pod.to_string(), now_us()).await? {
                            hooks.cancelled.store(true, std::sync::atomic::Ordering::Release);
                            return Ok(Run::Nothing);
                        }
                        tracing::info!(job = %id, %service, %pod, "job running");
                    }
                }
            }
        };
        let response = match response {
            Ok(response) => response,
            Err(Again(why)) => return Ok(Run::Again(why)),
        };
        let status = response.status();
        let headers: Vec<(String, String)> = response
            .headers()
            .iter()
            .filter(|(name, _)| !crate::forward::is_hop_by_hop(name))
            .filter_map(|(name, value)| Some((name.as_str().to_string(), value.to_str().ok()?.to_string())))
            .collect();
        let max = self.config.max_result_bytes as usize;
        let mut answer = response.into_body();
        let mut body = Vec::new();
        while let Some(frame) = answer.frame().await {
            let Ok(frame) = frame else {
                return Ok(Run::Ended(State::Failed, Some("the pod's answer broke off".into()), None));
            };
            if let Ok(data) = frame.into_data() {
                if body.len() + data.len() > max {
                    let why = format!("the answer is larger than jobs.max_result_bytes ({max} bytes)");
                    return Ok(Run::Ended(State::Failed, Some(why), None));
                }
                body.extend_from_slice(&data);
            }
        }
        let state = if status.is_success() { State::Succeeded } else { State::Failed };
        let error = (!status.is_success()).then(|| format!("answered {}", status.as_u16()));
        let headers = serde_json::to_string(&headers)?;
        Ok(Run::Ended(state, error, Some((status.as_u16(), headers, body))))
    }
}

/// How a job's run went.
enum Run {
    /// It ended so (with the answer, if one came).
    Ended(State, Option<String>, Option<(u16, String, Vec<u8>)>),
    /// Nothing to do (gone, ended, or no longer queued).
    Nothing,
    /// sdgate turned it away for now: back in line.
    Again(String),
    /// The store failed: back in line.
    StoreDown(anyhow::Error),
}

/// How long a job turned away waits before it is back in line.
const AGAIN_AFTER: Duration = Duration::from_millis(500);

/// Microseconds as Unix seconds.
fn seconds(us: Option<i64>) -> Option<f64> {
    us.map(|us| us as f64 / 1e6)
}

/// What a job's list entry and its view both say.
fn basics(row: &Row) -> serde_json::Value {
    serde_json::json!({
        "id": row.id,
        "service": row.service,
        "state": row.state,
        "url": format!("{PREFIX}/{}", row.id),
        "created_at": seconds(Some(row.created_us)),
        "finished_at": seconds(row.finished_us),
        "error": row.error,
    })
}

/// The headers of a submitted request worth keeping for its run: all but
/// hop-by-hop ones, `Prefer` and the callback.
pub fn kept_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| {
            !crate::forward::is_hop_by_hop(name) && !matches!(name.as_str(), "prefer" | "expect" | CALLBACK_HEADER)
        })
        .filter_map(|(name, value)| Some((name.as_str().to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

/// Whether a request asks to be answered at once and run later
/// (`Prefer: respond-async`, RFC 7240).
pub fn prefers_async(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',')
            .any(|pref| pref.split(';').next().is_some_and(|token| token.trim().eq_ignore_ascii_case("respond-async")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respond_async_is_read_among_other_preferences() {
        let mut headers = HeaderMap::new();
        assert!(!prefers_async(&headers));
        headers.insert("prefer", http::HeaderValue::from_static("return=minimal, Respond-Async; wait=10"));
        assert!(prefers_async(&headers));
        headers.insert("prefer", http::HeaderValue::from_static("respond-asyncx"));
        assert!(!prefers_async(&headers));
    }

    #[test]
    fn ids_are_128_bits_of_hex_and_only_such_are_looked_up() {
        let (a, b) = (new_id().unwrap(), new_id().unwrap());
        assert_ne!(a, b);
        assert!(is_id(&a) && is_id(&b));
        assert!(!is_id("../../etc/passwd"));
        assert!(!is_id(&a.to_uppercase()));
        assert!(!is_id(&a[1..]));
    }
}
