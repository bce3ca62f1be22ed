//! Prometheus metrics (prefix `sdgate_`, label `service`).
//!
//! Per-service handles are resolved once, so the hot path only touches
//! atomics; only `requests_total{code}` looks up a label per request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{lock, UpstreamFailure};
use crate::gate::{EndpointCounts, Observer};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets for durations from milliseconds (proxy overhead) to ten minutes
/// (a queued generation).
const DURATION_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    queue_depth: IntGaugeVec,
    queue_depth_by_priority: IntGaugeVec,
    waiting_clients: IntGaugeVec,
    queue_wait: HistogramVec,
    inflight: IntGaugeVec,
    endpoints: IntGaugeVec,
    upstream_errors: IntCounterVec,
    quarantined: IntCounterVec,
    desired_replicas: IntGaugeVec,
    cold_start: HistogramVec,
    affinity: IntCounterVec,
    route_requests: IntCounterVec,
    reloads: IntCounterVec,
    handed_over: IntCounterVec,
    checkpoint_requests: IntCounterVec,
    checkpoint_loads: IntCounterVec,
    checkpoint_queue_depth: IntGaugeVec,
    client_connections: IntGauge,
    connections_closed: IntCounterVec,
}

/// The metrics of one service, and what its status page shows of its
/// recent past (answers of the last minute, the last scale decision).
#[derive(Clone)]
pub struct ServiceMetrics {
    service: String,
    requests: IntCounterVec,
    /// `requests_total{code="200"}`, resolved once: the common case.
    ok: prometheus::IntCounter,
    upstream_errors: IntCounterVec,
    quarantined: IntCounterVec,
    endpoints: IntGaugeVec,
    pub duration: Histogram,
    pub queue_depth: IntGauge,
    /// `sdgate_queue_depth_by_priority{priority}`: interactive, batch.
    pub queue_depth_by_priority: [IntGauge; 2],
    pub waiting_clients: IntGauge,
    pub queue_wait: Histogram,
    pub inflight: IntGauge,
    pub desired_replicas: IntGauge,
    pub cold_start: Histogram,
    affinity: IntCounterVec,
    /// Recent answers, for rates and percentiles on the status page.
    pub recent: Arc<Recent>,
    /// The autoscaler's latest change, for the status page.
    last_scale: Arc<Mutex<Option<ScaleEvent>>>,
    /// The per-checkpoint series.
    checkpoints: Arc<Checkpoints>,
}

/// The checkpoint series of one service: a label of its own for each of the
/// first `limit` checkpoints seen, `other` for the rest (bounded cardinality
/// whatever clients name). Names no pod has reported (yet) take at most
/// half the labels, so names clients invent cannot take the labels of the
/// checkpoints pods hold.
struct Checkpoints {
    service: String,
    limit: std::sync::atomic::AtomicUsize,
    requests: IntCounterVec,
    loads: IntCounterVec,
    queue_depth: IntGaugeVec,
    /// Labels given so far, with their series; `other` is not among them.
    labelled: Mutex<Vec<CheckpointSeries>>,
}

struct CheckpointSeries {
    name: String,
    /// Given to a name no pod had reported.
    unreported: bool,
    requests: prometheus::IntCounter,
    loads: prometheus::IntCounter,
    queue_depth: IntGauge,
}

impl Checkpoints {
    /// The series of `name`'s label (given it now if there is room: for a
    /// name no pod has `reported`, in its half), or of `other`, for `use`.
    fn with<T>(&self, name: &str, reported: bool, use_: impl FnOnce(&CheckpointSeries) -> T) -> T {
        let mut labelled = lock(&self.labelled);
        let limit = self.limit.load(std::sync::atomic::Ordering::Relaxed);
        let room = labelled.len() < limit
            && (reported || labelled.iter().filter(|s| s.unreported).count() < limit.div_ceil(2));
        let label = match labelled.iter().position(|s| s.name == name) {
            Some(index) => index,
            None if room => {
                labelled.push(self.series(name, !reported));
                labelled.len() - 1
            }
            None => return use_(&self.series("other", false)),
        };
        use_(&labelled[label])
    }

    fn series(&self, name: &str, unreported: bool) -> CheckpointSeries {
        let labels = [self.service.as_str(), name];
        CheckpointSeries {
            name: name.to_string(),
            unreported,
            requests: self.requests.with_label_values(&labels),
            loads: self.loads.with_label_values(&labels),
            queue_depth: self.queue_depth.with_label_values(&labels),
        }
    }

    /// Sets every checkpoint's queue depth (those not named: 0).
    fn waiting(&self, waiting: &mut dyn Iterator<Item = (&str, usize)>) {
        let mut other = 0;
        let labelled = lock(&self.labelled);
        let mut depths = [0usize; 64];
        for (name, count) in waiting {
            match labelled.iter().position(|s| s.name == name).filter(|i| *i < depths.len()) {
                Some(index) => depths[index] += count,
                None => other += count,
            }
        }
        for (series, depth) in labelled.iter().zip(depths.iter().chain(std::iter::repeat(&0))) {
            series.queue_depth.set(*depth as i64);
        }
        if other > 0 || labelled.len() >= self.limit.load(std::sync::atomic::Ordering::Relaxed) {
            self.queue_depth.with_label_values(&[self.service.as_str(), "other"]).set(other as i64);
        }
    }
}

/// A change of the desired replica count and why.
#[derive(Clone, Debug)]
pub struct ScaleEvent {
    pub desired: u32,
    pub reason: &'static str,
    pub at: Instant,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let metrics = Self {
            requests: IntCounterVec::new(
                Opts::new("sdgate_requests_total", "Requests answered, by status code"),
                &["service", "code"],
            )
            .expect("static metric definition"),
            duration: histogram("sdgate_request_duration_seconds", "Time from arrival to response start"),
            queue_depth: IntGaugeVec::new(Opts::new("sdgate_queue_depth", "Requests waiting for a pod"), &["service"])
                .expect("static metric definition"),
            queue_depth_by_priority: IntGaugeVec::new(
                Opts::new("sdgate_queue_depth_by_priority", "Requests waiting for a pod, by priority class"),
                &["service", "priority"],
            )
            .expect("static metric definition"),
            waiting_clients: IntGaugeVec::new(
                Opts::new("sdgate_waiting_clients", "Clients (by fairness.key) with requests waiting for a pod"),
                &["service"],
            )
            .expect("static metric definition"),
            queue_wait: histogram("sdgate_queue_wait_seconds", "Time a request waited for a pod"),
            inflight: IntGaugeVec::new(
                Opts::new("sdgate_inflight_requests", "Requests holding a pod slot"),
                &["service"],
            )
            .expect("static metric definition"),
            endpoints: IntGaugeVec::new(
                Opts::new("sdgate_endpoints", "Endpoints by readiness state"),
                &["service", "state"],
            )
            .expect("static metric definition"),
            upstream_errors: IntCounterVec::new(
                Opts::new("sdgate_upstream_errors_total", "Failures talking to pods, by kind"),
                &["service", "kind"],
            )
            .expect("static metric definition"),
            quarantined: IntCounterVec::new(
                Opts::new(
                    "sdgate_quarantined_total",
                    "Pods taken out of rotation until an idle check passed, after sdgate gave up on an exchange",
                ),
                &["service"],
            )
            .expect("static metric definition"),
            desired_replicas: IntGaugeVec::new(
                Opts::new("sdgate_desired_replicas", "Pods the autoscaler wants"),
                &["service"],
            )
            .expect("static metric definition"),
            cold_start: histogram(
                "sdgate_cold_start_seconds",
                "From a request waiting with no pod ready to the first pod ready",
            ),
            affinity: IntCounterVec::new(
                Opts::new("sdgate_affinity_total", "Requests with session affinity, by outcome"),
                &["service", "result"],
            )
            .expect("static metric definition"),
            route_requests: IntCounterVec::new(
                Opts::new("sdgate_route_requests_total", "Requests a route sent to each of its services"),
                &["route", "service"],
            )
            .expect("static metric definition"),
            reloads: IntCounterVec::new(
                Opts::new("sdgate_config_reloads_total", "Configuration reloads, by result (ok, error)"),
                &["result"],
            )
            .expect("static metric definition"),
            checkpoint_requests: IntCounterVec::new(
                Opts::new("sdgate_checkpoint_requests_total", "Requests that named a checkpoint, by checkpoint"),
                &["service", "checkpoint"],
            )
            .expect("static metric definition"),
            checkpoint_loads: IntCounterVec::new(
                Opts::new(
                    "sdgate_checkpoint_loads_total",
                    "Requests sent to a pod that had to load their checkpoint first, by checkpoint",
                ),
                &["service", "checkpoint"],
            )
            .expect("static metric definition"),
            checkpoint_queue_depth: IntGaugeVec::new(
                Opts::new("sdgate_checkpoint_queue_depth", "Requests waiting for a pod, by the checkpoint they named"),
                &["service", "checkpoint"],
            )
            .expect("static metric definition"),
            handed_over: IntCounterVec::new(
                Opts::new(
                    "sdgate_handed_over_total",
                    "Requests this replica, a standby, handed to the active replica, by result (sent, failed)",
                ),
                &["result"],
            )
            .expect("static metric definition"),
            client_connections: IntGauge::new(
                "sdgate_client_connections",
                "Client connections open on the public listener (queued, in flight or idle)",
            )
            .expect("static metric definition"),
            connections_closed: IntCounterVec::new(
                Opts::new(
                    "sdgate_client_connections_closed_total",
                    "Client connections sdgate closed for silence, by reason (header_read_timeout, idle_timeout, send_timeout)",
                ),
                &["reason"],
            )
            .expect("static metric definition"),
            registry,
        };
        for reason in ["header_read_timeout", "idle_timeout", "send_timeout"] {
            metrics.connections_closed.with_label_values(&[reason]);
        }
        for result in ["ok", "error"] {
            metrics.reloads.with_label_values(&[result]);
        }
        for result in ["sent", "failed"] {
            metrics.handed_over.with_label_values(&[result]);
        }
        for collector in metrics.collectors() {
            // Names are distinct constants; registering them cannot clash.
            let _ = metrics.registry.register(collector);
        }
        // process_cpu_seconds_total, process_resident_memory_bytes, ...
        let _ = metrics.registry.register(Box::new(Process::default()));
        metrics
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.duration.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.queue_depth_by_priority.clone()),
            Box::new(self.waiting_clients.clone()),
            Box::new(self.queue_wait.clone()),
            Box::new(self.inflight.clone()),
            Box::new(self.endpoints.clone()),
            Box::new(self.upstream_errors.clone()),
            Box::new(self.quarantined.clone()),
            Box::new(self.desired_replicas.clone()),
            Box::new(self.cold_start.clone()),
            Box::new(self.affinity.clone()),
            Box::new(self.route_requests.clone()),
            Box::new(self.reloads.clone()),
            Box::new(self.handed_over.clone()),
            Box::new(self.checkpoint_requests.clone()),
            Box::new(self.checkpoint_loads.clone()),
            Box::new(self.checkpoint_queue_depth.clone()),
            Box::new(self.client_connections.clone()),
            Box::new(self.connections_closed.clone()),
        ]
    }

    /// `sdgate_client_connections`.
    pub fn client_connections(&self) -> IntGauge {
        self.client_connections.clone()
    }

    /// `sdgate_client_connections_closed_total{reason}`.
    pub fn connections_closed(&self) -> IntCounterVec {
        self.connections_closed.clone()
    }

    /// `sdgate_route_requests_total{route, service}`.
    pub fn route_requests(&self, route: &str, service: &str) -> prometheus::IntCounter {
        self.route_requests.with_label_values(&[route, service])
    }

    /// Counts a configuration reload (`ok` or `error`).
    pub fn reloaded(&self, result: &str) {
        self.reloads.with_label_values(&[result]).inc();
    }

    pub fn service(&self, service: &str) -> ServiceMetrics {
        // Dashboards and alerts see every error kind at 0 before the first one.
        for kind in UpstreamFailure::ALL {
            self.upstream_errors.with_label_values(&[service, kind.as_str()]);
        }
        self.quarantined.with_label_values(&[service]);
        ServiceMetrics {
            service: service.to_string(),
            requests: self.requests.clone(),
            ok: self.requests.with_label_values(&[service, "200"]),
            upstream_errors: self.upstream_errors.clone(),
            quarantined: self.quarantined.clone(),
            endpoints: self.endpoints.clone(),
            duration: self.duration.with_label_values(&[service]),
            queue_depth: self.queue_depth.with_label_values(&[service]),
            queue_depth_by_priority: ["interactive", "batch"]
                .map(|priority| self.queue_depth_by_priority.with_label_values(&[service, priority])),
            waiting_clients: self.waiting_clients.with_label_values(&[service]),
            queue_wait: self.queue_wait.with_label_values(&[service]),
            inflight: self.inflight.with_label_values(&[service]),
            desired_replicas: self.desired_replicas.with_label_values(&[service]),
            cold_start: self.cold_start.with_label_values(&[service]),
            affinity: self.affinity.clone(),
            recent: Arc::default(),
            last_scale: Arc::default(),
            checkpoints: Arc::new(Checkpoints {
                service: service.to_string(),
                limit: std::sync::atomic::AtomicUsize::new(10),
                requests: self.checkpoint_requests.clone(),
                loads: self.checkpoint_loads.clone(),
                queue_depth: self.checkpoint_queue_depth.clone(),
                labelled: Mutex::default(),
            }),
        }
    }

    /// Adds another part's collectors (the jobs') to the exposition.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        if let Err(error) = self.registry.register(collector) {
            tracing::warn!(%error, "a metric could not be registered");
        }
    }

    /// Counts a request a standby handed to the active replica.
    pub fn handed_over(&self, result: &str) {
        self.handed_over.with_label_values(&[result]).inc();
    }

    /// Counts a request answered before any service was chosen (404, 400).
    pub fn unrouted(&self, code: u16) {
        self.requests.with_label_values(&["", code_label(code)]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServiceMetrics {
    pub fn answered(&self, code: u16) {
        if code == 200 {
            return self.ok.inc();
        }
        self.requests.with_label_values(&[&self.service, code_label(code)]).inc();
    }

    /// `result`: new, hit, repinned or invalid.
    pub fn affinity(&self, result: &str) {
        self.affinity.with_label_values(&[&self.service, result]).inc();
    }

    /// The autoscaler changed the desired replica count.
    pub fn record_scale(&self, desired: u32, reason: &'static str) {
        *lock(&self.last_scale) = Some(ScaleEvent { desired, reason, at: Instant::now() });
    }

    pub fn last_scale(&self) -> Option<ScaleEvent> {
        lock(&self.last_scale).clone()
    }

    /// How many checkpoints get a label of their own (`checkpoints.metric_labels`).
    pub fn set_checkpoint_labels(&self, limit: usize) {
        self.checkpoints.limit.store(limit, std::sync::atomic::Ordering::Relaxed);
    }

    /// `sdgate_checkpoint_requests_total`: a request named `checkpoint`
    /// (`reported`: a pod has reported it; only such a name gets a label of
    /// its own, so names clients invent cannot take every label).
    pub fn checkpoint_requested(&self, checkpoint: &str, reported: bool) {
        self.checkpoints.with(checkpoint, reported, |series| series.requests.inc());
    }
}

/// The gate's numbers become the service's gauges.
impl Observer for ServiceMetrics {
    fn queue(&self, depth: usize, inflight: u32) {
        self.queue_depth.set(depth as i64);
        self.inflight.set(i64::from(inflight));
    }

    fn waiting(&self, clients: usize, by_class: [usize; 2]) {
        self.waiting_clients.set(clients as i64);
        for (gauge, depth) in self.queue_depth_by_priority.iter().zip(by_class) {
            gauge.set(depth as i64);
        }
    }

    /// `sdgate_endpoints{state}`: ready (taking requests), not_ready (starting
    /// or failing its probe), draining (finishing its requests before it
    /// goes), quarantined (maybe still busy with a job sdgate gave up on).
    fn endpoints(&self, counts: EndpointCounts) {
        let EndpointCounts { ready, not_ready, draining, quarantined } = counts;
        self.endpoints.with_label_values(&[&self.service, "ready"]).set(ready as i64);
        self.endpoints.with_label_values(&[&self.service, "not_ready"]).set(not_ready as i64);
        self.endpoints.with_label_values(&[&self.service, "draining"]).set(draining as i64);
        self.endpoints.with_label_values(&[&self.service, "quarantined"]).set(quarantined as i64);
    }

    fn cold_start(&self, took: Duration) {
        self.cold_start.observe(took.as_secs_f64());
    }

    fn upstream_failed(&self, failure: UpstreamFailure) {
        self.upstream_errors.with_label_values(&[&self.service, failure.as_str()]).inc();
    }

    /// `sdgate_quarantined_total`.
    fn quarantined(&self) {
        self.quarantined.with_label_values(&[&self.service]).inc();
    }

    /// `sdgate_checkpoint_loads_total`.
    fn checkpoint_loaded(&self, checkpoint: &str, reported: bool) {
        self.checkpoints.with(checkpoint, reported, |series| series.loads.inc());
    }

    /// `sdgate_checkpoint_queue_depth`.
    fn checkpoint_waiting(&self, waiting: &mut dyn Iterator<Item = (&str, usize)>) {
        self.checkpoints.waiting(waiting);
    }
}

/// The process metrics (memory, open files, start time, CPU), with
/// `process_cpu_seconds_total` to the microsecond (getrusage): the
/// prometheus crate counts it in whole seconds, so a gateway that used 0.9 s
/// of CPU would show 0.
struct Process(prometheus::process_collector::ProcessCollector);

impl Default for Process {
    fn default() -> Self {
        Self(prometheus::process_collector::ProcessCollector::for_self())
    }
}

impl prometheus::core::Collector for Process {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.0.collect();
        if let Some(seconds) = cpu_seconds() {
            for family in families.iter_mut().filter(|f| f.get_name() == "process_cpu_seconds_total") {
                for metric in family.mut_metric().iter_mut() {
                    let mut counter = prometheus::proto::Counter::default();
                    counter.set_value(seconds);
                    metric.set_counter(counter);
                }
            }
        }
        families
    }
}

/// User and system CPU time of this process so far.
pub fn cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

fn histogram(name: &str, help: &str) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()), &["service"])
        .expect("static metric definition")
}

/// Status codes as static strings, so counting allocates nothing.
fn code_label(code: u16) -> &'static str {
    const EXACT: &[(u16, &str)] = &[
        (101, "101"),
        (200, "200"),
        (201, "201"),
        (204, "204"),
        (206, "206"),
        (301, "301"),
        (302, "302"),
        (304, "304"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (408, "408"),
        (413, "413"),
        (422, "422"),
        (429, "429"),
        (431, "431"),
        (499, "499"),
        (500, "500"),
        (502, "502"),
        (503, "503"),
        (504, "504"),
    ];
    if let Some((_, label)) = EXACT.iter().find(|(c, _)| *c == code) {
        return label;
    }
    match code {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The answers of the last minute, for rates and percentiles on the status
/// page; Prometheus has the full history. Rates and the success rate count
/// every answer (per second of the last minute); status codes and latency
/// percentiles are those of the latest 4096.
pub struct Recent {
    /// Rates divide by the minute, or by the time since this began if less.
    started: Instant,
    answers: Mutex<Answers>,
}

struct Answers {
    samples: std::collections::VecDeque<(Instant, u16, f32)>,
    /// Answers counted by the second they came in (seconds since
    /// `started`), a ring over the last minute.
    seconds: [Second; RECENT_SECONDS],
    /// The second answers now go to, and when the next one begins (one
    /// clock subtraction a second, not one per answer).
    current: u64,
    next_at: Option<Instant>,
}

impl Default for Answers {
    fn default() -> Self {
        Self { samples: Default::default(), seconds: [Second::default(); RECENT_SECONDS], current: 0, next_at: None }
    }
}

#[derive(Clone, Copy, Default)]
struct Second {
    at: u64,
    answers: u32,
    failed: u32,
}

/// What [`Recent`] reports.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RecentSummary {
    /// The window the figures cover: 60 s, or the time since sdgate (or the
    /// service) started if less.
    pub window_seconds: f64,
    /// Answers in the window.
    pub requests: usize,
    /// `requests` / `window_seconds`.
    pub requests_per_second: f64,
    /// Share of answers that were not 5xx (1.0 with no answers).
    pub success_rate: f64,
    pub codes: std::collections::BTreeMap<u16, usize>,
    /// Latency percentiles in seconds: p50, p90, p95, p99.
    pub latency_seconds: std::collections::BTreeMap<&'static str, f64>,
}

const RECENT_WINDOW: Duration = Duration::from_secs(60);
const RECENT_MAX: usize = 4096;
/// One more than the window's seconds: the ring holds the whole minute
/// while the current second fills.
const RECENT_SECONDS: usize = 61;

impl Default for Recent {
    fn default() -> Self {
        Self { started: Instant::now(), answers: Mutex::default() }
    }
}

impl Recent {
    /// One answer with `code`, given at `now` after `took`.
    pub fn record(&self, now: Instant, code: u16, took: Duration) {
        let mut answers = lock(&self.answers);
        if answers.samples.len() == RECENT_MAX {
            answers.samples.pop_front();
        }
        answers.samples.push_back((now, code, took.as_secs_f32()));
        if answers.next_at.is_none_or(|next| now >= next) {
            answers.current = now.saturating_duration_since(self.started).as_secs();
            answers.next_at = Some(self.started + Duration::from_secs(answers.current + 1));
        }
        let second = answers.current;
        let slot = &mut answers.seconds[(second % RECENT_SECONDS as u64) as usize];
        if slot.at != second || slot.answers == 0 {
            *slot = Second { at: second, answers: 0, failed: 0 };
        }
        slot.answers += 1;
        slot.failed += u32::from(code >= 500);
    }

    pub fn summary(&self) -> RecentSummary {
        let now = Instant::now();
        let window = now.saturating_duration_since(self.started).min(RECENT_WINDOW).max(Duration::from_secs(1));
        let this_second = now.saturating_duration_since(self.started).as_secs();
        let answers = lock(&self.answers);
        // The seconds that began within the window (the current one included).
        let first_second = this_second.saturating_sub(RECENT_WINDOW.as_secs() - 1);
        let (counted, failed) = answers
            .seconds
            .iter()
            .filter(|s| s.answers > 0 && s.at >= first_second && s.at <= this_second)
            .fold((0u64, 0u64), |(n, f), s| (n + u64::from(s.answers), f + u64::from(s.failed)));
        let recent: Vec<_> =
            answers.samples.iter().filter(|(t, _, _)| now.saturating_duration_since(*t) <= RECENT_WINDOW).collect();
        let mut codes = std::collections::BTreeMap::new();
        for (_, code, _) in &recent {
            *codes.entry(*code).or_insert(0) += 1;
        }
        let mut latencies: Vec<f32> = recent.iter().map(|(_, _, took)| *took).collect();
        let mut latency_seconds = std::collections::BTreeMap::new();
        if !latencies.is_empty() {
            // Ascending quantiles, each selected in what lies above the last
            // (no full sort: this runs every second over up to RECENT_MAX).
            let mut from = 0;
            for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99)] {
                let index = ((latencies.len() - 1) as f64 * q).round() as usize;
                let (_, value, _) = latencies[from..].select_nth_unstable_by(index - from, f32::total_cmp);
                latency_seconds.insert(name, f64::from(*value));
                from = index;
            }
        }
        RecentSummary {
            window_seconds: window.as_secs_f64(),
            requests: counted as usize,
            requests_per_second: counted as f64 / window.as_secs_f64(),
            success_rate: if counted == 0 { 1.0 } else { 1.0 - failed as f64 / counted as f64 },
            codes,
            latency_seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `process_cpu_seconds_total` is the process's CPU time to the
    /// microsecond, not rounded down to whole seconds.
    #[test]
    fn process_cpu_seconds_are_not_whole_seconds() {
        let start = cpu_seconds().expect("getrusage");
        let mut spins = 0u64;
        while cpu_seconds().expect("getrusage") - start < 0.02 {
            spins = std::hint::black_box(spins.wrapping_add(1));
        }
        let scrape = String::from_utf8(Metrics::default().render()).expect("text");
        let line = scrape.lines().find(|l| l.starts_with("process_cpu_seconds_total ")).expect("the metric");
        let shown: f64 = line["process_cpu_seconds_total ".len()..].parse().expect("a number");
        let now = cpu_seconds().expect("getrusage");
        assert!(shown > start && shown <= now, "{shown} not within [{start}, {now}]");
    }

    #[test]
    fn recent_percentiles_are_those_of_the_sorted_latencies() {
        let recent = Recent::default();
        let now = Instant::now();
        let mut took: Vec<u64> = (0..1000).map(|_| fastrand::u64(1..10_000)).collect();
        for (i, millis) in took.iter().enumerate() {
            let code = if i % 10 == 0 { 503 } else { 200 };
            recent.record(now, code, Duration::from_millis(*millis));
        }
        took.sort_unstable();
        let summary = recent.summary();
        assert_eq!(summary.requests, 1000);
        assert_eq!(summary.codes.get(&503), Some(&100));
        assert!((summary.success_rate - 0.9).abs() < 1e-9);
        for (name, index) in [("p50", 500), ("p90", 899), ("p95", 949), ("p99", 989)] {
            let expected = Duration::from_millis(took[index]).as_secs_f32();
            assert_eq!(summary.latency_seconds[name], f64::from(expected), "{name}");
        }
    }
}

#[cfg(test)]
mod paused {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn recent_answers_leave_the_summary_after_a_minute() {
        let recent = Recent::default();
        recent.record(Instant::now(), 200, Duration::from_millis(500));
        assert_eq!(recent.summary().requests, 1);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(recent.summary().requests, 0, "older than the 60 s window");
    }

    /// Rates divide by the window (60 s, or the time since the start if
    /// less), not by the age of the oldest answer in it, and count every
    /// answer, beyond the 4096 kept for percentiles.
    #[tokio::test(start_paused = true)]
    async fn recent_rates_are_answers_over_the_window() {
        let recent = Recent::default();
        // Nothing for 5 s, then one answer a second for 10 s: 10 answers
        // over the 15 s there have been.
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..10 {
            recent.record(Instant::now(), 200, Duration::from_millis(900));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let summary = recent.summary();
        assert_eq!((summary.requests, summary.window_seconds), (10, 15.0));
        assert!((summary.requests_per_second - 10.0 / 15.0).abs() < 1e-9, "{summary:?}");
        // 50 answers in all, from 5 s to 54 s; at 60.5 s: 50 in the minute.
        for _ in 10..50 {
            recent.record(Instant::now(), 200, Duration::from_millis(900));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        tokio::time::advance(Duration::from_millis(5_500)).await;
        let summary = recent.summary();
        assert_eq!((summary.requests, summary.window_seconds), (50, 60.0));
        assert!((summary.requests_per_second - 50.0 / 60.0).abs() < 1e-9, "{summary:?}");
        // Four pods at one image a second for a minute: exactly 4/s.
        let recent = Recent::default();
        tokio::time::advance(Duration::from_secs(30)).await;
        for _ in 0..60 {
            for _ in 0..4 {
                recent.record(Instant::now(), 200, Duration::from_secs(1));
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let summary = recent.summary();
        assert_eq!(summary.requests, 236, "the first second's answers are a minute old: {summary:?}");
        assert!(summary.requests_per_second <= 4.0, "{summary:?}");
        // More answers than the percentiles keep: all counted, 5xx too.
        let recent = Recent::default();
        tokio::time::advance(Duration::from_secs(60)).await;
        for i in 0..5000 {
            recent.record(Instant::now(), if i % 5 == 0 { 502 } else { 200 }, Duration::from_millis(20));
        }
        let summary = recent.summary();
        assert_eq!(summary.requests, 5000);
        assert!((summary.success_rate - 0.8).abs() < 1e-9, "{summary:?}");
        assert!((summary.requests_per_second - 5000.0 / 60.0).abs() < 1e-9, "{summary:?}");
    }
}
