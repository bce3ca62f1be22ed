//! The `/status` snapshot: per service, its endpoints, queue, replicas, last
//! scale decision and recent request figures. The dashboard page renders it.
//!
//! [`History`] keeps the last five minutes of the figures the dashboard
//! charts (`/status/history`), so a page opened now starts with them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::error::lock;
use crate::gate::{EndpointId, Sessions, SharedGate};
use crate::observe::metrics::{RecentSummary, ServiceMetrics};

/// What the status page is taken of: the proxy's services and routes as they
/// stand. The proxy implements it, so observers read the request path
/// without depending on it.
pub trait Observed: Send + Sync {
    /// The services in force, in config order.
    fn services(&self) -> Vec<ServiceView>;
    /// The config's routes (a service's own hosts are not listed).
    fn routes(&self) -> Vec<RouteStatus>;
    /// The latest config reload, if any.
    fn last_reload(&self) -> Option<Reloaded>;
    /// Whether this replica dispatches to pods (holds the Lease, or runs
    /// alone); a standby hands its requests to the one that does.
    fn active(&self) -> bool;
    /// Async jobs, when `jobs` is configured (as the store said lately).
    fn jobs(&self) -> Option<JobsStatus> {
        None
    }
    /// What each caller `auth` named spent this UTC hour and day.
    fn tenants(&self) -> Vec<TenantStatus> {
        Vec::new()
    }
}

/// One caller's spend on one service (services with `auth`).
#[derive(Serialize, Clone, Debug)]
pub struct TenantStatus {
    pub service: String,
    pub tenant: String,
    pub this_hour: SpendStatus,
    pub today: SpendStatus,
}

/// Requests admitted, pod time, images made and checkpoint loads caused.
#[derive(Serialize, Clone, Debug, Default)]
pub struct SpendStatus {
    pub requests: i64,
    pub gpu_seconds: f64,
    pub images: i64,
    pub checkpoint_loads: i64,
}

/// The jobs store's counts (refreshed every 2 s by the active replica).
#[derive(Serialize, Clone, Debug, Default)]
pub struct JobsStatus {
    /// `sqlite` or `postgres`.
    pub store: &'static str,
    pub by_state: Vec<JobCount>,
}

#[derive(Serialize, Clone, Debug)]
pub struct JobCount {
    pub service: String,
    pub state: &'static str,
    pub jobs: i64,
    /// Age of the oldest job in this state.
    pub oldest_age_seconds: f64,
}

/// One service as the status page reads it.
pub struct ServiceView {
    pub name: String,
    pub hosts: Vec<String>,
    pub container_concurrency: u32,
    pub gate: Arc<SharedGate>,
    pub metrics: ServiceMetrics,
    /// Its pins, when it has session affinity.
    pub sessions: Option<Arc<Sessions>>,
}

/// A reload's outcome, for /status.
#[derive(Clone, Debug, Serialize)]
pub struct Reloaded {
    /// Unix seconds.
    pub at: u64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct Status {
    pub uptime_seconds: f64,
    /// This replica dispatches to pods (false: a standby).
    pub active: bool,
    pub services: Vec<ServiceStatus>,
    /// The config's `routes` (a service's own hosts are not listed here).
    pub routes: Vec<RouteStatus>,
    /// The latest config reload, if any.
    pub last_reload: Option<Reloaded>,
    /// Async jobs by service and state (absent without `jobs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jobs: Option<JobsStatus>,
    /// Each caller's spend this UTC hour and day (services with `auth`;
    /// the active replica's, read back from the jobs store when it has one).
    pub tenants: Vec<TenantStatus>,
}

#[derive(Serialize)]
pub struct RouteStatus {
    pub name: String,
    pub split: Vec<SplitStatus>,
}

#[derive(Serialize)]
pub struct SplitStatus {
    pub service: String,
    pub weight: u32,
    /// Requests the route sent this service over the last minute, and their
    /// share of the route's.
    pub requests_last_minute: u64,
    pub share_last_minute: f64,
}

#[derive(Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub hosts: Vec<String>,
    pub container_concurrency: u32,
    pub queue_depth: usize,
    /// Waiting requests by class.
    pub queue_depth_by_priority: ByPriority,
    /// Clients (by `fairness.key`) with requests waiting.
    pub waiting_clients: usize,
    /// How long the longest-waiting request has waited.
    pub oldest_wait_seconds: Option<f64>,
    pub inflight: u32,
    pub desired_replicas: i64,
    pub ready_replicas: usize,
    pub last_scale: Option<LastScale>,
    pub endpoints: Vec<EndpointStatus>,
    /// Requests waiting per checkpoint (those that named one).
    pub checkpoint_queue: std::collections::BTreeMap<String, usize>,
    /// Endpoints removed lately (scaled away), as they were when removed;
    /// one per address not in `endpoints` (at most 16).
    pub gone_endpoints: Vec<GoneEndpoint>,
    pub recent: RecentSummary,
    /// Set while no pod can start (every start failed and none is ready or
    /// starting): why. Requests are answered 503 with it meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_down: Option<String>,
}

#[derive(Serialize)]
pub struct GoneEndpoint {
    pub address: String,
    pub served: u64,
    pub failed: u64,
}

#[derive(Serialize)]
pub struct ByPriority {
    pub interactive: usize,
    pub batch: usize,
}

#[derive(Serialize)]
pub struct LastScale {
    pub desired: u32,
    pub reason: &'static str,
    pub seconds_ago: f64,
}

#[derive(Serialize)]
pub struct EndpointStatus {
    pub address: String,
    /// `ready`, `not_ready` (starting or failing its probe) or `draining`.
    pub state: &'static str,
    pub inflight: u32,
    pub sessions: usize,
    pub served: u64,
    /// Exchanges that ended abnormally (timeout, reset, failed) over its life.
    pub failed: u64,
    /// The checkpoint it holds (its model name), if known.
    pub checkpoint: Option<String>,
    /// Checkpoint loads sdgate's requests caused on it.
    pub checkpoint_loads: u64,
    /// What it has shown of its timings: a generation, and a load on top.
    pub generation_seconds: Option<f64>,
    pub load_seconds: Option<f64>,
    /// What its last readiness probe saw (none before its first probe).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeStatus>,
}

/// An endpoint's last probe: passed, or why not, and for how long.
#[derive(Serialize, Clone, Debug)]
pub struct ProbeStatus {
    pub ok: bool,
    /// "ok", or what the probe got ("GET /internal/ping -> 400 Invalid
    /// HTTP request received.", "refused", "no answer within 300ms").
    pub result: String,
    /// Probes in a row with this result, over how many seconds.
    pub times: u64,
    pub for_seconds: f64,
    pub seconds_ago: f64,
}

impl ProbeStatus {
    fn of(note: crate::gate::ProbeNote, now: Instant) -> Self {
        Self {
            ok: note.failure.is_none(),
            result: note.failure.unwrap_or_else(|| "ok".to_string()),
            times: note.times,
            for_seconds: note.at.saturating_duration_since(note.since).as_secs_f64(),
            seconds_ago: now.saturating_duration_since(note.at).as_secs_f64(),
        }
    }
}

impl Status {
    pub fn of(observed: &dyn Observed, started: Instant) -> Self {
        Self {
            uptime_seconds: started.elapsed().as_secs_f64(),
            active: observed.active(),
            services: observed.services().iter().map(ServiceStatus::of).collect(),
            routes: observed.routes(),
            last_reload: observed.last_reload(),
            jobs: observed.jobs(),
            tenants: observed.tenants(),
        }
    }
}

impl ServiceStatus {
    fn of(service: &ServiceView) -> Self {
        let gate = &service.gate;
        let now = Instant::now();
        let (by_priority, waiting_clients) = gate.inspect(|g| {
            let by_priority = ByPriority {
                interactive: g.depth_of(crate::gate::Priority::Interactive),
                batch: g.depth_of(crate::gate::Priority::Batch),
            };
            (by_priority, g.waiting_clients())
        });
        let (queue_depth, oldest_wait_seconds, inflight, ready_replicas, endpoints) = gate.inspect(|g| {
            let endpoints = g
                .endpoints()
                .iter()
                .map(|e| {
                    let status = EndpointStatus {
                        address: e.addr.to_string(),
                        state: if e.draining {
                            "draining"
                        } else if e.ready {
                            "ready"
                        } else {
                            "not_ready"
                        },
                        inflight: e.inflight,
                        sessions: service.sessions.as_ref().map_or(0, |s| s.count_for(e.id, now)),
                        served: e.served,
                        failed: e.failed,
                        checkpoint: e.model.holds.map(|m| g.checkpoint_name(m).to_string()),
                        checkpoint_loads: e.model.loads,
                        generation_seconds: e.model.generation.map(|d| d.as_secs_f64()),
                        load_seconds: e.model.load.map(|d| d.as_secs_f64()),
                        probe: None,
                    };
                    (status, e.id)
                })
                .collect::<Vec<_>>();
            (g.queue_depth(), g.oldest_wait(now).map(|d| d.as_secs_f64()), g.inflight(), g.ready_count(), endpoints)
        });
        // Read after the gate's lock is let go (the notes have their own).
        let endpoints: Vec<EndpointStatus> = endpoints
            .into_iter()
            .map(|(mut status, id)| {
                status.probe = gate.probe_note(id).map(|note| ProbeStatus::of(note, now));
                status
            })
            .collect();
        let checkpoint_queue = gate.inspect(|g| g.checkpoint_demand().map(|(name, n)| (name.to_string(), n)).collect());
        let gone_endpoints = gate.inspect(|g| {
            g.retired()
                .filter(|gone| !g.endpoints().iter().any(|e| e.addr == gone.addr))
                .map(|e| GoneEndpoint { address: e.addr.to_string(), served: e.served, failed: e.failed })
                .collect()
        });
        Self {
            name: service.name.clone(),
            hosts: service.hosts.clone(),
            container_concurrency: service.container_concurrency,
            queue_depth,
            checkpoint_queue,
            queue_depth_by_priority: by_priority,
            waiting_clients,
            oldest_wait_seconds,
            inflight,
            desired_replicas: service.metrics.desired_replicas.get(),
            ready_replicas,
            last_scale: service.metrics.last_scale().map(|event| LastScale {
                desired: event.desired,
                reason: event.reason,
                seconds_ago: event.at.elapsed().as_secs_f64(),
            }),
            endpoints,
            gone_endpoints,
            recent: service.metrics.recent.summary(),
            backend_down: gate.down_cause(),
        }
    }
}

/// How often [`History::run`] samples every service.
pub const HISTORY_PERIOD: Duration = Duration::from_secs(2);
/// How far back [`History`] reaches.
pub const HISTORY_SPAN: Duration = Duration::from_secs(300);

/// The last [`HISTORY_SPAN`] of each service's charted figures, one sample
/// every [`HISTORY_PERIOD`], so the dashboard's charts start with the recent
/// past instead of empty.
///
/// Cost: one task samples every service (a gate lock and the recent-answers
/// summary each, as one `/status` read does); nothing on the request path.
/// Equal consecutive samples are stored once with a count, so an idle
/// service keeps one entry however long it idles, and a busy one at most
/// `HISTORY_SPAN / HISTORY_PERIOD + 1`.
pub struct History {
    tracks: Mutex<Vec<Track>>,
}

/// One service's samples, oldest first.
struct Track {
    name: String,
    runs: VecDeque<Run>,
}

/// `count` equal samples in a row, from `first` to `last`.
struct Run {
    figures: Figures,
    first: Instant,
    last: Instant,
    count: u32,
}

/// What the dashboard charts of one service at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Figures {
    /// Answers per second over the last minute (as `/status`'s `recent`).
    pub requests_per_second: f32,
    /// Answers pods finished per second since the previous sample (null on
    /// the first one).
    pub served_per_second: Option<f32>,
    pub queue_depth: u32,
    pub inflight: u32,
    pub desired_replicas: u32,
    pub ready_replicas: u32,
    /// Over the last minute; empty without answers.
    pub latency_seconds: Latency,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p95: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99: Option<f32>,
}

/// `/status/history`.
#[derive(Serialize)]
pub struct HistoryReport {
    pub period_seconds: f64,
    pub span_seconds: f64,
    pub services: Vec<ServiceHistory>,
}

#[derive(Serialize)]
pub struct ServiceHistory {
    pub name: String,
    /// Oldest first.
    pub samples: Vec<HistorySample>,
}

#[derive(Serialize)]
pub struct HistorySample {
    /// How long before this answer the sample was taken (a clock-free time,
    /// so a browser on another machine places it right).
    pub age_seconds: f64,
    #[serde(flatten)]
    pub figures: Figures,
}

impl History {
    pub fn new(observed: &dyn Observed) -> Self {
        let tracks = observed
            .services()
            .into_iter()
            .map(|service| Track { name: service.name, runs: VecDeque::new() })
            .collect();
        Self { tracks: Mutex::new(tracks) }
    }

    /// Samples every service each [`HISTORY_PERIOD`], the first one at once;
    /// runs until aborted.
    pub async fn run(self: Arc<Self>, observed: Arc<dyn Observed>) {
        let mut sampler = Sampler::default();
        let mut tick = tokio::time::interval(HISTORY_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let figures = sampler.measure(&*observed, now);
            self.record(&figures, now);
        }
    }

    /// Adds one sample per service (in the order of [`History::new`]).
    pub fn record(&self, figures: &[Figures], now: Instant) {
        let mut tracks = lock(&self.tracks);
        for (track, figures) in tracks.iter_mut().zip(figures) {
            match track.runs.back_mut() {
                Some(run) if run.figures == *figures => {
                    run.last = now;
                    run.count += 1;
                }
                _ => track.runs.push_back(Run { figures: *figures, first: now, last: now, count: 1 }),
            }
            let oldest = now.checked_sub(HISTORY_SPAN);
            while track.runs.front().is_some_and(|run| oldest.is_some_and(|oldest| run.last < oldest)) {
                track.runs.pop_front();
            }
        }
    }

    /// The samples of the last [`HISTORY_SPAN`], as of `now`.
    pub fn report(&self, now: Instant) -> HistoryReport {
        let tracks = lock(&self.tracks);
        let services = tracks
            .iter()
            .map(|track| ServiceHistory { name: track.name.clone(), samples: track.samples(now) })
            .collect();
        HistoryReport {
            period_seconds: HISTORY_PERIOD.as_secs_f64(),
            span_seconds: HISTORY_SPAN.as_secs_f64(),
            services,
        }
    }
}

impl Track {
    /// Every sample, a run's spread evenly from its first to its last.
    fn samples(&self, now: Instant) -> Vec<HistorySample> {
        let mut samples = Vec::new();
        for run in &self.runs {
            let spread = run.last.duration_since(run.first);
            for i in 0..run.count {
                let at = if run.count == 1 { run.first } else { run.first + spread * i / (run.count - 1) };
                let age = now.saturating_duration_since(at);
                if age <= HISTORY_SPAN {
                    // Milliseconds are plenty, and keep the JSON short.
                    let age_seconds = (age.as_secs_f64() * 1000.0).round() / 1000.0;
                    samples.push(HistorySample { age_seconds, figures: run.figures });
                }
            }
        }
        samples
    }
}

/// What the sampler remembers between samples: each endpoint's `served`
/// count, to turn it into a rate.
#[derive(Default)]
struct Sampler {
    served: Vec<Vec<(EndpointId, u64)>>,
    at: Option<Instant>,
}

impl Sampler {
    fn measure(&mut self, observed: &dyn Observed, now: Instant) -> Vec<Figures> {
        let elapsed = self.at.map(|at| now.saturating_duration_since(at).as_secs_f64()).filter(|s| *s > 0.0);
        self.at = Some(now);
        let services = observed.services();
        self.served.resize_with(services.len(), Vec::new);
        let mut figures = Vec::with_capacity(services.len());
        for (service, served) in services.iter().zip(&mut self.served) {
            figures.push(measure(service, served, elapsed));
        }
        figures
    }
}

/// One service's figures; `served` (the endpoints' counts at the previous
/// sample, sorted by id) is replaced by the current counts.
fn measure(service: &ServiceView, served: &mut Vec<(EndpointId, u64)>, elapsed: Option<f64>) -> Figures {
    let gate = &service.gate;
    let (queue_depth, inflight, ready_replicas, mut now_served) = gate.inspect(|g| {
        let counts: Vec<(EndpointId, u64)> = g.endpoints().iter().map(|e| (e.id, e.served)).collect();
        (g.queue_depth(), g.inflight(), g.ready_count(), counts)
    });
    now_served.sort_unstable_by_key(|(id, _)| *id);
    let served_per_second = elapsed.map(|elapsed| {
        // An endpoint added since the previous sample served all its count since then.
        let grown: u64 = now_served
            .iter()
            .map(|(id, count)| {
                let before = served.binary_search_by_key(id, |(id, _)| *id).map_or(0, |at| served[at].1);
                count.saturating_sub(before)
            })
            .sum();
        (grown as f64 / elapsed) as f32
    });
    *served = now_served;
    let recent = service.metrics.recent.summary();
    let latency = |name: &str| recent.latency_seconds.get(name).map(|s| *s as f32);
    Figures {
        requests_per_second: recent.requests_per_second as f32,
        served_per_second,
        queue_depth: u32::try_from(queue_depth).unwrap_or(u32::MAX),
        inflight,
        desired_replicas: u32::try_from(service.metrics.desired_replicas.get()).unwrap_or(0),
        ready_replicas: u32::try_from(ready_replicas).unwrap_or(u32::MAX),
        latency_seconds: Latency { p50: latency("p50"), p95: latency("p95"), p99: latency("p99") },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track() -> History {
        History { tracks: Mutex::new(vec![Track { name: "sd".into(), runs: VecDeque::new() }]) }
    }

    fn queue(depth: u32) -> Figures {
        Figures {
            requests_per_second: 0.0,
            served_per_second: Some(0.0),
            queue_depth: depth,
            inflight: 0,
            desired_replicas: 0,
            ready_replicas: 0,
            latency_seconds: Latency::default(),
        }
    }

    fn depths(history: &History, now: Instant) -> Vec<(f64, u32)> {
        let report = history.report(now);
        report.services[0].samples.iter().map(|s| (s.age_seconds, s.figures.queue_depth)).collect()
    }

    #[test]
    fn equal_samples_in_a_row_are_kept_once_and_reported_one_per_period() {
        let history = track();
        let start = Instant::now();
        for i in 0..100 {
            history.record(&[queue(0)], start + HISTORY_PERIOD * i);
        }
        assert_eq!(history.tracks.lock().unwrap()[0].runs.len(), 1, "an idle service keeps one entry");
        history.record(&[queue(3)], start + HISTORY_PERIOD * 100);
        let now = start + HISTORY_PERIOD * 100;
        let samples = depths(&history, now);
        assert_eq!(samples.len(), 101);
        assert_eq!(samples[0], (200.0, 0), "oldest first, aged from now");
        assert_eq!(samples[99], (2.0, 0));
        assert_eq!(samples[100], (0.0, 3));
    }

    #[test]
    fn samples_older_than_the_span_are_forgotten() {
        let history = track();
        let start = Instant::now();
        let periods = (HISTORY_SPAN.as_secs() / HISTORY_PERIOD.as_secs()) as u32;
        // Alternating figures: no two in a row are equal, the worst case.
        for i in 0..3 * periods {
            history.record(&[queue(i % 2)], start + HISTORY_PERIOD * i);
        }
        let now = start + HISTORY_PERIOD * (3 * periods - 1);
        assert!(history.tracks.lock().unwrap()[0].runs.len() <= periods as usize + 1, "bounded");
        let samples = depths(&history, now);
        assert_eq!(samples.len(), periods as usize + 1);
        assert_eq!(samples[0].0, HISTORY_SPAN.as_secs_f64());
        // A long idle run that began before the span is clipped to it.
        let history = track();
        for i in 0..2 * periods {
            history.record(&[queue(0)], start + HISTORY_PERIOD * i);
        }
        let samples = depths(&history, start + HISTORY_PERIOD * (2 * periods - 1));
        assert_eq!(samples.len(), periods as usize + 1);
        assert!(samples.iter().all(|(age, _)| *age <= HISTORY_SPAN.as_secs_f64()));
    }

    #[test]
    fn the_report_is_the_json_the_dashboard_reads() {
        let history = track();
        let now = Instant::now();
        let mut figures = queue(2);
        figures.served_per_second = None;
        figures.latency_seconds.p50 = Some(0.5);
        history.record(&[figures], now);
        let json = serde_json::to_value(history.report(now + Duration::from_millis(1500))).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "period_seconds": 2.0,
                "span_seconds": 300.0,
                "services": [{ "name": "sd", "samples": [{
                    "age_seconds": 1.5, "requests_per_second": 0.0, "served_per_second": null, "queue_depth": 2,
                    "inflight": 0, "desired_replicas": 0, "ready_replicas": 0, "latency_seconds": { "p50": 0.5 }
                }]}]
            })
        );
    }
}
