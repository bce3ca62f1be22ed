//! An in-process stand-in for the Kubernetes API server, for tests: real HTTP
//! on 127.0.0.1, enough of the API for the real `kube` client (list, watch with
//! resourceVersion, bookmarks and 410 Gone, the scale subresource, pod patch,
//! EndpointSlices, Leases), and a ReplicaSet-like controller whose pods are
//! in-process `sdgate sim` workers on their own loopback addresses
//! (127.0.1.N) at one port, as real pods are.
//!
//! Include it with `#[path = "support/kube_api.rs"] mod kube_api;`.
//!
//! Fidelity notes (what a real cluster does that this does not, or differently):
//! - one namespace (`default`) holds every object; lists in another namespace
//!   are empty, named objects there are 404;
//! - `limit`/`continue` are ignored (one page), list `resourceVersion` is
//!   always answered with the latest state;
//! - a watch whose object leaves its label selector gets no DELETED event;
//! - scale-down picks pods in the order of the real ReplicaSet controller
//!   (`ActivePodsWithRanks`): unscheduled, then Pending before Running, then
//!   not-ready before ready, then the lowest `pod-deletion-cost`, then the most
//!   recently ready, then the newest;
//! - a terminating pod's worker stops accepting connections at once (SIGTERM)
//!   but keeps serving the connections it has, new requests on them included,
//!   until `termination_grace` ends; then every connection is closed.

// Times real work (wall clock), not sdgate's runtime: the std clock is right here.
#![allow(clippy::disallowed_types)]
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::api::autoscaling::v1::{Scale, ScaleSpec, ScaleStatus};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ContainerState, ContainerStateRunning, ContainerStatus, ObjectReference, Pod,
    PodCondition, PodIP, PodSpec, PodStatus, PodTemplateSpec, Probe, TCPSocketAction,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, ListMeta, MicroTime, ObjectMeta, OwnerReference, Status, StatusDetails, Time,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use sdgate::tools::sim::{SimHandle, SimOptions, SimStats};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

pub const NAMESPACE: &str = "default";
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The pod-template-hash of the Deployment's one ReplicaSet.
pub const TEMPLATE_HASH: &str = "5d8f7c9b6";
const MAX_BODY: usize = 4 << 20;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// How the fake cluster behaves.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The Deployment's name; its pods carry `app: <name>`, its EndpointSlice
    /// `kubernetes.io/service-name: <name>`.
    pub deployment: String,
    /// `spec.replicas` at start.
    pub replicas: i32,
    /// The pods' container port (named `http`); 0 picks a free one.
    pub port: u16,
    /// From pod creation to the pod having a node and an IP.
    pub schedule_delay: Duration,
    /// From the pod having an IP to its port opening (a model loading).
    pub startup_delay: Duration,
    /// From the port opening to the pod's Ready condition (the kubelet's probe).
    pub kubelet_ready_delay: Duration,
    /// From a pod's deletion to its worker stopping and the pod's DELETED event.
    pub termination_grace: Duration,
    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
    pub bookmark_interval: Duration,
    /// The workers' behaviour (`name` defaults to the pod's name: the `X-Worker` header).
    pub sim: SimOptions,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            deployment: "stable-diffusion".into(),
            replicas: 0,
            port: 0,
            schedule_delay: Duration::from_millis(50),
            startup_delay: Duration::from_millis(200),
            kubelet_ready_delay: Duration::from_secs(1),
            termination_grace: Duration::from_secs(2),
            bookmark_interval: Duration::from_secs(1),
            sim: SimOptions { step_time: Duration::from_millis(10), image_bytes: 1024, ..SimOptions::default() },
        }
    }
}

/// One API request as the fake saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The RBAC verb: get, list, watch, create, update, patch, delete.
    pub verb: String,
    /// The RBAC resource: `pods`, `endpointslices`, `deployments`,
    /// `deployments/scale`, `leases` (or the path, for unknown ones).
    pub resource: String,
    pub name: Option<String>,
    pub method: String,
    pub path: String,
    /// The raw query string.
    pub query: String,
    pub content_type: Option<String>,
    /// The answer's status code (200 for a watch, whatever it then streams).
    pub status: u16,
    /// When the request head arrived.
    pub at: Instant,
}

impl RecordedRequest {
    /// The value of one query parameter, percent-decoded.
    pub fn param(&self, key: &str) -> Option<String> {
        parse_query(&self.query).remove(key)
    }
}

/// A pod as the test sees it.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub name: String,
    pub uid: String,
    pub ip: Option<Ipv4Addr>,
    /// `ip:port` of its worker, once it has an IP.
    pub addr: Option<SocketAddr>,
    pub phase: String,
    /// The Ready condition.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// Gone from the API (DELETED sent).
    pub deleted: bool,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub resource_version: String,
    pub created_at: Instant,
    pub scheduled_at: Option<Instant>,
    pub port_open_at: Option<Instant>,
    /// When the port opened on the sims' clock ([`sdgate::tools::sim::micros_since_origin`]),
    /// comparable with the worker's `JobRecord::arrived_us`.
    pub port_open_us: Option<u64>,
    pub ready_at: Option<Instant>,
    pub terminating_at: Option<Instant>,
    pub deleted_at: Option<Instant>,
    /// The worker process is running (false before it starts, after it
    /// stops, and after `kill_pod_worker`).
    pub worker_alive: bool,
    /// Why the worker could not start (e.g. its address was taken).
    pub worker_error: Option<String>,
    /// The worker's counters (overlaps, max_inflight, served...), once its port opened.
    pub stats: Option<SimStats>,
    /// The pod object as the API serves it.
    pub object: Pod,
}

// ---------------------------------------------------------------------------
// State

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Pods,
    EndpointSlices,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::Pods => "v1",
            Kind::EndpointSlices => "discovery.k8s.io/v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Pods => "Pod",
            Kind::EndpointSlices => "EndpointSlice",
        }
    }
}

struct Event {
    rv: u64,
    kind: Kind,
    typ: &'static str,
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    object: Value,
}

enum WorkerCmd {
    StopAccepting,
}

struct PodRec {
    pod: Pod,
    seq: u64,
    created_at: Instant,
    ip: Option<Ipv4Addr>,
    scheduled_at: Option<Instant>,
    port_open_at: Option<Instant>,
    port_open_us: Option<u64>,
    ready_at: Option<Instant>,
    terminating_at: Option<Instant>,
    deleted_at: Option<Instant>,
    /// Dropping it stops the worker (its runtime, and every connection).
    worker: Option<mpsc::UnboundedSender<WorkerCmd>>,
    thread: Option<std::thread::JoinHandle<()>>,
    sim: Arc<Mutex<Option<Arc<SimHandle>>>>,
    worker_error: Arc<Mutex<Option<String>>>,
}

impl PodRec {
    fn ready(&self) -> bool {
        pod_ready(&self.pod)
    }

    fn info(&self, port: u16) -> PodInfo {
        let meta = &self.pod.metadata;
        let worker_alive = self.worker.is_some()
            && self.port_open_at.is_some()
            && self.thread.as_ref().is_some_and(|t| !t.is_finished());
        PodInfo {
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            ip: self.ip,
            addr: self.ip.map(|ip| SocketAddr::from((ip, port))),
            phase: self.pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default(),
            ready: self.ready(),
            terminating: meta.deletion_timestamp.is_some(),
            deleted: self.deleted_at.is_some(),
            annotations: meta.annotations.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            created_at: self.created_at,
            scheduled_at: self.scheduled_at,
            port_open_at: self.port_open_at,
            port_open_us: self.port_open_us,
            ready_at: self.ready_at,
            terminating_at: self.terminating_at,
            deleted_at: self.deleted_at,
            worker_alive,
            worker_error: lock(&self.worker_error).clone(),
            stats: lock(&self.sim).as_ref().map(|s| s.stats()),
            object: self.pod.clone(),
        }
    }
}

struct State {
    rv: u64,
    /// A watch from a resourceVersion below this gets 410 Gone.
    floor: u64,
    cut_gen: u64,
    uid: u64,
    seq: u64,
    next_ip: u32,
    history: Vec<Event>,
    deployment: Deployment,
    pods: BTreeMap<String, PodRec>,
    gone: Vec<PodRec>,
    slice: EndpointSlice,
    leases: BTreeMap<String, Lease>,
    requests: Vec<RecordedRequest>,
    tasks: Vec<AbortHandle>,
    stopped: bool,
}

impl State {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn new_uid(&mut self) -> String {
        self.uid += 1;
        format!("6f0e5d4c-0000-4000-8000-{:012x}", self.uid)
    }

    fn replicas(&self) -> i32 {
        self.deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
    }

    fn push_event(
        &mut self,
        kind: Kind,
        typ: &'static str,
        meta: &ObjectMeta,
        object: Result<Value, serde_json::Error>,
    ) {
        match object {
            Ok(object) => self.history.push(Event {
                rv: self.rv,
                kind,
                typ,
                namespace: meta.namespace.clone().unwrap_or_default(),
                name: meta.name.clone().unwrap_or_default(),
                labels: meta.labels.clone().unwrap_or_default(),
                object,
            }),
            Err(e) => eprintln!("kube_api: cannot serialise a {kind:?} event: {e}"),
        }
    }

    /// Gives pod `name` a new resourceVersion and records the event.
    fn touch_pod(&mut self, name: &str, typ: &'static str) {
        let rv = self.bump();
        let Some(rec) = self.pods.get_mut(name) else { return };
        rec.pod.metadata.resource_version = Some(rv.to_string());
        let meta = rec.pod.metadata.clone();
        let object = serde_json::to_value(&rec.pod);
        self.push_event(Kind::Pods, typ, &meta, object);
    }

    /// Brings the EndpointSlice in step with the pods (an event if it changed).
    fn sync_slice(&mut self) {
        let mut recs: Vec<&PodRec> = self.pods.values().filter(|r| r.ip.is_some()).collect();
        recs.sort_by_key(|r| r.seq);
        let endpoints: Vec<Endpoint> = recs
            .iter()
            .map(|r| {
                let ready = r.ready();
                let terminating = r.pod.metadata.deletion_timestamp.is_some();
                Endpoint {
                    addresses: vec![r.ip.map(|ip| ip.to_string()).unwrap_or_default()],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready && !terminating),
                        serving: Some(ready),
                        terminating: Some(terminating),
                    }),
                    node_name: r.pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: r.pod.metadata.name.clone(),
                        namespace: Some(NAMESPACE.into()),
                        uid: r.pod.metadata.uid.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            })
            .collect();
        if endpoints == self.slice.endpoints {
            return;
        }
        let rv = self.bump();
        self.slice.endpoints = endpoints;
        self.slice.metadata.resource_version = Some(rv.to_string());
        let meta = self.slice.metadata.clone();
        let object = serde_json::to_value(&self.slice);
        self.push_event(Kind::EndpointSlices, "MODIFIED", &meta, object);
    }

    fn update_deployment_status(&mut self) {
        let active: Vec<&PodRec> = self.pods.values().filter(|r| r.terminating_at.is_none()).collect();
        let ready = active.iter().filter(|r| r.ready()).count() as i32;
        let total = active.len() as i32;
        let status = self.deployment.status.get_or_insert_with(Default::default);
        status.replicas = Some(total);
        status.updated_replicas = Some(total);
        status.ready_replicas = Some(ready);
        status.available_replicas = Some(ready);
        status.unavailable_replicas = Some(total - ready);
        status.observed_generation = self.deployment.metadata.generation;
    }
}

struct Inner {
    opts: ClusterOptions,
    port: u16,
    addr: SocketAddr,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    open_watches: AtomicUsize,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn spawn_task<F>(&self, st: &mut State, future: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if st.stopped {
            return;
        }
        st.tasks.retain(|t| !t.is_finished());
        st.tasks.push(tokio::spawn(future).abort_handle());
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_time() -> Time {
    Time(Timestamp::now())
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn deletion_cost(pod: &Pod) -> i32 {
    pod.metadata.annotations.as_ref().and_then(|a| a.get(DELETION_COST)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn ip_for(n: u32) -> Ipv4Addr {
    // 127.0.1.1 ... 127.0.1.254, then 127.0.2.1 ...
    let n = n.saturating_sub(1);
    Ipv4Addr::new(127, 0, (1 + n / 254).min(255) as u8, (n % 254 + 1) as u8)
}

fn set_condition(pod: &mut Pod, type_: &str, value: bool) {
    let status = pod.status.get_or_insert_with(Default::default);
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    let value = if value { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == value => {}
        Some(c) => {
            c.status = value.into();
            c.last_transition_time = Some(now_time());
        }
        None => conditions.push(PodCondition {
            type_: type_.into(),
            status: value.into(),
            last_transition_time: Some(now_time()),
            ..Default::default()
        }),
    }
}

// ---------------------------------------------------------------------------
// Objects at start

fn container(opts: &ClusterOptions, port: u16) -> Container {
    Container {
        name: "sd".into(),
        image: Some("sdgate-sim:test".into()),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: i32::from(port),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction { port: IntOrString::String("http".into()), ..Default::default() }),
            period_seconds: Some(opts.kubelet_ready_delay.as_secs().max(1) as i32),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn app_labels(opts: &ClusterOptions) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), opts.deployment.clone())])
}

fn initial_deployment(opts: &ClusterOptions, port: u16, uid: String, rv: u64) -> Deployment {
    let mut template_labels = app_labels(opts);
    template_labels.insert("pod-template-hash".into(), TEMPLATE_HASH.into());
    Deployment {
        metadata: ObjectMeta {
            name: Some(opts.deployment.clone()),
            namespace: Some(NAMESPACE.into()),
            uid: Some(uid),
            resource_version: Some(rv.to_string()),
            generation: Some(1),
            creation_timestamp: Some(now_time()),
            labels: Some(app_labels(opts)),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(opts.replicas.max(0)),
            selector: LabelSelector { match_labels: Some(app_labels(opts)), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(app_labels(opts)), ..Default::default() }),
                spec: Some(PodSpec {
                    containers: vec![container(opts, port)],
                    termination_grace_period_seconds: Some(opts.termination_grace.as_secs().max(1) as i64),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: Some(DeploymentStatus { observed_generation: Some(1), replicas: Some(0), ..Default::default() }),
    }
}

fn initial_slice(opts: &ClusterOptions, port: u16, uid: String, rv: u64) -> EndpointSlice {
    EndpointSlice {
        address_type: "IPv4".into(),
        endpoints: Vec::new(),
        metadata: ObjectMeta {
            name: Some(format!("{}-x7k2q", opts.deployment)),
            generate_name: Some(format!("{}-", opts.deployment)),
            namespace: Some(NAMESPACE.into()),
            uid: Some(uid),
            resource_version: Some(rv.to_string()),
            creation_timestamp: Some(now_time()),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_string(), opts.deployment.clone()),
                ("endpointslice.kubernetes.io/managed-by".to_string(), "endpointslice-controller.k8s.io".to_string()),
            ])),
            ..Default::default()
        },
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(i32::from(port)),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

/// Ports handed to clusters of this process, so two clusters never share one.
fn taken_ports() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A port free on the first few pod addresses.
fn pick_pod_port() -> u16 {
    for _ in 0..200 {
        let Ok(probe) = std::net::TcpListener::bind((ip_for(1), 0)) else { continue };
        let Ok(port) = probe.local_addr().map(|a| a.port()) else { continue };
        drop(probe);
        let free = (1..=16).all(|n| std::net::TcpListener::bind((ip_for(n), port)).is_ok());
        if free && lock(taken_ports()).insert(port) {
            return port;
        }
    }
    panic!("kube_api: no free pod port found on 127.0.1.x");
}

// ---------------------------------------------------------------------------
// The cluster

/// The API-server stand-in and its pods. Dropping it stops everything.
pub struct FakeCluster {
    inner: Arc<Inner>,
    server: Option<JoinHandle<()>>,
    kubeconfig: PathBuf,
}

impl FakeCluster {
    /// Starts the API on 127.0.0.1 (port 0) with one Deployment at `opts.replicas`.
    pub async fn start(opts: ClusterOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("kube_api: bind the API listener");
        let addr = listener.local_addr().expect("kube_api: API address");
        let port = if opts.port == 0 { pick_pod_port() } else { opts.port };
        let mut state = State {
            rv: 1000,
            floor: 0,
            cut_gen: 0,
            uid: 0,
            seq: 0,
            next_ip: 1,
            history: Vec::new(),
            deployment: Deployment::default(),
            pods: BTreeMap::new(),
            gone: Vec::new(),
            slice: EndpointSlice::default(),
            leases: BTreeMap::new(),
            requests: Vec::new(),
            tasks: Vec::new(),
            stopped: false,
        };
        let (uid, rv) = (state.new_uid(), state.bump());
        state.deployment = initial_deployment(&opts, port, uid, rv);
        let (uid, rv) = (state.new_uid(), state.bump());
        state.slice = initial_slice(&opts, port, uid, rv);
        let meta = state.slice.metadata.clone();
        let object = serde_json::to_value(&state.slice);
        state.push_event(Kind::EndpointSlices, "ADDED", &meta, object);
        let (changed, _) = watch::channel(0);
        let inner =
            Arc::new(Inner { opts, port, addr, state: Mutex::new(state), changed, open_watches: AtomicUsize::new(0) });
        {
            let mut st = inner.lock();
            reconcile(&inner, &mut st);
        }
        let server = tokio::spawn(serve(listener, inner.clone()));
        let kubeconfig = write_kubeconfig(addr);
        Self { inner, server: Some(server), kubeconfig }
    }

    /// The API's address (127.0.0.1:PORT).
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// A kubeconfig file (removed on drop): `server: http://127.0.0.1:PORT`, no
    /// auth, namespace `default`, current-context set.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.kubeconfig.clone()
    }

    pub fn deployment_name(&self) -> &str {
        &self.inner.opts.deployment
    }

    /// The pods' container port (every pod listens on it, each on its own IP).
    pub fn pod_port(&self) -> u16 {
        self.inner.port
    }

    /// Pods in the API now (terminating ones included), oldest first.
    pub fn pods(&self) -> Vec<PodInfo> {
        let st = self.inner.lock();
        let mut recs: Vec<&PodRec> = st.pods.values().collect();
        recs.sort_by_key(|r| r.seq);
        recs.iter().map(|r| r.info(self.inner.port)).collect()
    }

    /// Every pod this cluster ever had, deleted ones included, oldest first
    /// (for overlap checks over a whole run).
    pub fn all_pods(&self) -> Vec<PodInfo> {
        let st = self.inner.lock();
        let mut recs: Vec<&PodRec> = st.pods.values().chain(st.gone.iter()).collect();
        recs.sort_by_key(|r| r.seq);
        recs.iter().map(|r| r.info(self.inner.port)).collect()
    }

    pub fn pod(&self, name: &str) -> Option<PodInfo> {
        self.all_pods().into_iter().find(|p| p.name == name)
    }

    /// Every worker's stats, deleted pods' included.
    pub fn worker_stats(&self) -> Vec<SimStats> {
        self.all_pods().into_iter().filter_map(|p| p.stats).collect()
    }

    /// The Deployment's `spec.replicas`.
    pub fn replicas(&self) -> i32 {
        self.inner.lock().replicas()
    }

    /// Sets `spec.replicas` as `kubectl scale` would (not recorded as a request).
    pub fn set_replicas(&self, replicas: i32) {
        set_replicas(&self.inner, replicas.max(0));
    }

    /// Every request so far, in the order they were answered.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.lock().requests.clone()
    }

    /// When the first `verb` on `resource` arrived (e.g. "patch", "deployments/scale").
    pub fn first_request_at(&self, verb: &str, resource: &str) -> Option<Instant> {
        self.requests_of(verb, resource).iter().map(|r| r.at).min()
    }

    pub fn requests_of(&self, verb: &str, resource: &str) -> Vec<RecordedRequest> {
        self.requests().into_iter().filter(|r| r.verb == verb && r.resource == resource).collect()
    }

    /// The distinct (verb, resource) pairs used so far (what RBAC must grant).
    pub fn verbs(&self) -> BTreeSet<(String, String)> {
        self.requests().into_iter().map(|r| (r.verb, r.resource)).collect()
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().rv
    }

    /// Watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.inner.open_watches.load(Ordering::SeqCst)
    }

    /// Deletes a pod as `kubectl delete pod` does (graceful); the ReplicaSet
    /// replaces it at once. False if no such live pod.
    pub fn delete_pod(&self, name: &str) -> bool {
        let deleted = {
            let mut st = self.inner.lock();
            let found = st.pods.get(name).is_some_and(|r| r.terminating_at.is_none());
            if found {
                begin_termination(&self.inner, &mut st, name);
                reconcile(&self.inner, &mut st);
            }
            found
        };
        self.inner.notify();
        deleted
    }

    /// Stops a pod's worker without notice (every connection closed); the
    /// API still shows the pod as it was. False if it had no running worker.
    pub fn kill_pod_worker(&self, name: &str) -> bool {
        let (sender, thread) = {
            let mut st = self.inner.lock();
            match st.pods.get_mut(name) {
                Some(rec) => (rec.worker.take(), rec.thread.take()),
                None => (None, None),
            }
        };
        let killed = sender.is_some();
        drop(sender);
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        killed
    }

    /// Makes every watch position so far too old (an etcd compaction): open
    /// watches get an ERROR event (410 Expired) and end; a new watch from an
    /// older resourceVersion gets the same.
    pub fn expire_watches(&self) {
        {
            let mut st = self.inner.lock();
            st.floor = st.bump();
        }
        self.inner.notify();
    }

    /// Ends every open watch abruptly (the connection drops mid-stream, no event).
    pub fn cut_watches(&self) {
        self.inner.lock().cut_gen += 1;
        self.inner.notify();
    }

    /// Creates or replaces Lease `name` (as another replica would).
    pub fn set_lease(&self, name: &str, holder: Option<&str>, renew_time: Option<Timestamp>, duration_seconds: i32) {
        let mut st = self.inner.lock();
        let rv = st.bump();
        let uid = st.new_uid();
        let lease = st.leases.entry(name.to_string()).or_insert_with(|| Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(NAMESPACE.into()),
                uid: Some(uid),
                creation_timestamp: Some(now_time()),
                ..Default::default()
            },
            spec: None,
        });
        lease.metadata.resource_version = Some(rv.to_string());
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != holder {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.acquire_time = renew_time.map(MicroTime);
        }
        spec.holder_identity = holder.map(str::to_string);
        spec.renew_time = renew_time.map(MicroTime);
        spec.lease_duration_seconds = Some(duration_seconds);
    }

    pub fn lease(&self, name: &str) -> Option<Lease> {
        self.inner.lock().leases.get(name).cloned()
    }

    /// Polls `check` every 5 ms until it holds; panics after `limit`.
    pub async fn wait_for(&self, what: &str, limit: Duration, check: impl Fn(&FakeCluster) -> bool) {
        let deadline = Instant::now() + limit;
        while !check(self) {
            assert!(Instant::now() < deadline, "kube_api: timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the API, every controller task and every worker (waits for them).
    pub async fn shutdown(mut self) {
        let threads = self.stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn stop(&mut self) -> Vec<std::thread::JoinHandle<()>> {
        if let Some(server) = self.server.take() {
            server.abort();
        }
        let mut st = self.inner.lock();
        st.stopped = true;
        for task in st.tasks.drain(..) {
            task.abort();
        }
        let mut threads = Vec::new();
        let State { pods, gone, .. } = &mut *st;
        for rec in pods.values_mut().chain(gone.iter_mut()) {
            rec.worker = None;
            threads.extend(rec.thread.take());
        }
        drop(st);
        self.inner.notify();
        threads
    }
}

impl Drop for FakeCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.kubeconfig);
        lock(taken_ports()).remove(&self.inner.port);
    }
}

fn write_kubeconfig(addr: SocketAddr) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "sdgate-kubeconfig-{}-{}.yaml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {NAMESPACE}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\npreferences: {{}}\n"
    );
    std::fs::write(&path, yaml).expect("kube_api: write kubeconfig");
    path
}

// ---------------------------------------------------------------------------
// The ReplicaSet controller, the scheduler and the kubelet

fn set_replicas(inner: &Arc<Inner>, replicas: i32) -> bool {
    let changed = {
        let mut st = inner.lock();
        if st.replicas() == replicas {
            false
        } else {
            let rv = st.bump();
            let meta = &mut st.deployment.metadata;
            meta.resource_version = Some(rv.to_string());
            meta.generation = Some(meta.generation.unwrap_or(1) + 1);
            if let Some(spec) = st.deployment.spec.as_mut() {
                spec.replicas = Some(replicas);
            }
            reconcile(inner, &mut st);
            true
        }
    };
    inner.notify();
    changed
}

fn reconcile(inner: &Arc<Inner>, st: &mut State) {
    if st.stopped {
        return;
    }
    let want = st.replicas().max(0) as usize;
    let mut active: Vec<&PodRec> = st.pods.values().filter(|r| r.terminating_at.is_none()).collect();
    if active.len() < want {
        for _ in active.len()..want {
            create_pod(inner, st);
        }
    } else if active.len() > want {
        // The ReplicaSet controller's ranking (ActivePodsWithRanks), most deletable first.
        active.sort_by_key(|r| {
            let phase = match r.pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
                Some("Pending") => 0,
                Some("Unknown") => 1,
                Some("Running") => 2,
                _ => 3,
            };
            (
                r.scheduled_at.is_some(),
                phase,
                r.ready(),
                deletion_cost(&r.pod),
                std::cmp::Reverse(r.ready_at),
                std::cmp::Reverse(r.seq),
            )
        });
        let victims: Vec<String> =
            active.iter().take(active.len() - want).filter_map(|r| r.pod.metadata.name.clone()).collect();
        for name in victims {
            begin_termination(inner, st, &name);
        }
    }
    st.update_deployment_status();
}

fn create_pod(inner: &Arc<Inner>, st: &mut State) {
    let opts = &inner.opts;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let name = loop {
        let suffix: String = (0..5).map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char).collect();
        let name = format!("{}-{TEMPLATE_HASH}-{suffix}", opts.deployment);
        if !st.pods.contains_key(&name) && !st.gone.iter().any(|r| r.pod.metadata.name.as_deref() == Some(&name)) {
            break name;
        }
    };
    let mut labels = app_labels(opts);
    labels.insert("pod-template-hash".into(), TEMPLATE_HASH.into());
    let owner_uid = format!("{}-rs", st.deployment.metadata.uid.clone().unwrap_or_default());
    let uid = st.new_uid();
    st.seq += 1;
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            generate_name: Some(format!("{}-{TEMPLATE_HASH}-", opts.deployment)),
            namespace: Some(NAMESPACE.into()),
            uid: Some(uid),
            creation_timestamp: Some(now_time()),
            labels: Some(labels),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "ReplicaSet".into(),
                name: format!("{}-{TEMPLATE_HASH}", opts.deployment),
                uid: owner_uid,
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![container(opts, inner.port)],
            restart_policy: Some("Always".into()),
            termination_grace_period_seconds: Some(opts.termination_grace.as_secs().max(1) as i64),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Pending".into()),
            qos_class: Some("BestEffort".into()),
            ..Default::default()
        }),
    };
    st.pods.insert(
        name.clone(),
        PodRec {
            pod,
            seq: st.seq,
            created_at: Instant::now(),
            ip: None,
            scheduled_at: None,
            port_open_at: None,
            port_open_us: None,
            ready_at: None,
            terminating_at: None,
            deleted_at: None,
            worker: None,
            thread: None,
            sim: Arc::new(Mutex::new(None)),
            worker_error: Arc::new(Mutex::new(None)),
        },
    );
    st.touch_pod(&name, "ADDED");
    inner.spawn_task(st, pod_lifecycle(inner.clone(), name));
}

/// Scheduling, the worker's start, and the kubelet's readiness.
async fn pod_lifecycle(inner: Arc<Inner>, name: String) {
    tokio::time::sleep(inner.opts.schedule_delay).await;
    let opened = {
        let mut st = inner.lock();
        if st.stopped {
            return;
        }
        let n = st.next_ip;
        st.next_ip += 1;
        let Some(rec) = st.pods.get_mut(&name) else { return };
        if rec.terminating_at.is_some() {
            return;
        }
        let ip = ip_for(n);
        rec.ip = Some(ip);
        rec.scheduled_at = Some(Instant::now());
        if let Some(spec) = rec.pod.spec.as_mut() {
            spec.node_name = Some("fake-node".into());
        }
        let status = rec.pod.status.get_or_insert_with(Default::default);
        status.phase = Some("Running".into());
        status.host_ip = Some("127.0.0.1".into());
        status.pod_ip = Some(ip.to_string());
        status.pod_ips = Some(vec![PodIP { ip: ip.to_string() }]);
        status.start_time = Some(now_time());
        status.container_statuses = Some(vec![ContainerStatus {
            name: "sd".into(),
            image: "sdgate-sim:test".into(),
            image_id: "sdgate-sim@sha256:0".into(),
            container_id: Some(format!("containerd://{name}")),
            ready: false,
            restart_count: 0,
            started: Some(true),
            state: Some(ContainerState {
                running: Some(ContainerStateRunning { started_at: Some(now_time()) }),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        set_condition(&mut rec.pod, "PodScheduled", true);
        set_condition(&mut rec.pod, "Initialized", true);
        set_condition(&mut rec.pod, "ContainersReady", false);
        set_condition(&mut rec.pod, "Ready", false);
        let mut options = inner.opts.sim.clone();
        options.name = options.name.or_else(|| Some(name.clone()));
        let (opened_tx, opened_rx) = oneshot::channel();
        let addr = SocketAddr::from((ip, inner.port));
        match start_worker(addr, inner.opts.startup_delay, options, rec.sim.clone(), opened_tx) {
            Ok((sender, thread)) => {
                rec.worker = Some(sender);
                rec.thread = Some(thread);
            }
            Err(e) => *lock(&rec.worker_error) = Some(e),
        }
        st.touch_pod(&name, "MODIFIED");
        st.sync_slice();
        opened_rx
    };
    inner.notify();
    let (opened_at, opened_us) = match opened.await {
        Ok(Ok(at)) => at,
        Ok(Err(e)) => {
            eprintln!("kube_api: pod {name}: worker did not start: {e}");
            if let Some(rec) = inner.lock().pods.get(&name) {
                *lock(&rec.worker_error) = Some(e);
            }
            return;
        }
        Err(_) => return,
    };
    if let Some(rec) = inner.lock().pods.get_mut(&name) {
        rec.port_open_at = Some(opened_at);
        rec.port_open_us = Some(opened_us);
    }
    tokio::time::sleep_until((opened_at + inner.opts.kubelet_ready_delay).into()).await;
    {
        let mut st = inner.lock();
        let Some(rec) = st.pods.get_mut(&name) else { return };
        if rec.terminating_at.is_some() || rec.worker.is_none() {
            return;
        }
        set_condition(&mut rec.pod, "ContainersReady", true);
        set_condition(&mut rec.pod, "Ready", true);
        if let Some(cs) = rec.pod.status.as_mut().and_then(|s| s.container_statuses.as_mut()) {
            cs.iter_mut().for_each(|c| c.ready = true);
        }
        rec.ready_at = Some(Instant::now());
        st.touch_pod(&name, "MODIFIED");
        st.sync_slice();
        st.update_deployment_status();
    }
    inner.notify();
}

/// Starts a worker on its own thread and runtime, so that stopping it closes
/// every connection it holds (as a process exiting does).
fn start_worker(
    addr: SocketAddr,
    startup_delay: Duration,
    options: SimOptions,
    slot: Arc<Mutex<Option<Arc<SimHandle>>>>,
    opened: oneshot::Sender<Result<(Instant, u64), String>>,
) -> Result<(mpsc::UnboundedSender<WorkerCmd>, std::thread::JoinHandle<()>), String> {
    let (sender, mut commands) = mpsc::unbounded_channel::<WorkerCmd>();
    let thread = std::thread::Builder::new()
        .name(format!("pod-{addr}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = opened.send(Err(format!("runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                // A SIGTERM or a kill while the model loads: the process exits.
                tokio::select! {
                    () = tokio::time::sleep(startup_delay) => {}
                    _ = commands.recv() => return,
                }
                let listener = match TcpListener::bind(addr).await {
                    Ok(listener) => listener,
                    Err(e) => {
                        let _ = opened.send(Err(format!("bind {addr}: {e}")));
                        return;
                    }
                };
                let handle = match sdgate::tools::sim::spawn(listener, options) {
                    Ok(handle) => Arc::new(handle),
                    Err(e) => {
                        let _ = opened.send(Err(format!("sim: {e}")));
                        return;
                    }
                };
                *lock(&slot) = Some(handle.clone());
                let _ = opened.send(Ok((Instant::now(), sdgate::tools::sim::micros_since_origin())));
                while let Some(command) = commands.recv().await {
                    match command {
                        WorkerCmd::StopAccepting => handle.stop(),
                    }
                }
            });
            // Dropping the runtime drops every connection task: sockets close.
            drop(runtime);
        })
        .map_err(|e| format!("thread: {e}"))?;
    Ok((sender, thread))
}

/// Starts a pod's graceful deletion (deletionTimestamp, SIGTERM, grace, DELETED).
fn begin_termination(inner: &Arc<Inner>, st: &mut State, name: &str) {
    let grace = inner.opts.termination_grace;
    let Some(rec) = st.pods.get_mut(name) else { return };
    if rec.terminating_at.is_some() {
        return;
    }
    rec.terminating_at = Some(Instant::now());
    if rec.ip.is_none() {
        // Never scheduled: no kubelet to wait for.
        finish_pod(st, name);
        return;
    }
    let deadline = Timestamp::now().checked_add(SignedDuration::try_from(grace).unwrap_or_default());
    rec.pod.metadata.deletion_timestamp = Some(Time(deadline.unwrap_or_else(|_| Timestamp::now())));
    rec.pod.metadata.deletion_grace_period_seconds = Some(grace.as_secs() as i64);
    if let Some(worker) = rec.worker.as_ref() {
        let _ = worker.send(WorkerCmd::StopAccepting);
    }
    st.touch_pod(name, "MODIFIED");
    st.sync_slice();
    let task_inner = inner.clone();
    let name = name.to_string();
    inner.spawn_task(st, async move {
        tokio::time::sleep(grace).await;
        let thread = {
            let mut st = task_inner.lock();
            let thread = st.pods.get_mut(&name).and_then(|r| r.thread.take());
            finish_pod(&mut st, &name);
            thread
        };
        task_inner.notify();
        drop(thread);
    });
}

/// The pod is gone: its worker stops, DELETED is sent.
fn finish_pod(st: &mut State, name: &str) {
    let rv = st.bump();
    let Some(mut rec) = st.pods.remove(name) else { return };
    rec.worker = None;
    rec.deleted_at = Some(Instant::now());
    rec.pod.metadata.resource_version = Some(rv.to_string());
    set_condition(&mut rec.pod, "Ready", false);
    set_condition(&mut rec.pod, "ContainersReady", false);
    let meta = rec.pod.metadata.clone();
    let object = serde_json::to_value(&rec.pod);
    st.push_event(Kind::Pods, "DELETED", &meta, object);
    st.gone.push(rec);
    st.sync_slice();
    st.update_deployment_status();
}

// ---------------------------------------------------------------------------
// HTTP

async fn serve(listener: TcpListener, inner: Arc<Inner>) {
    // Dropping this task drops the set: every connection (and watch) ends.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let inner = inner.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(handle(inner, request).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), service).await;
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

#[derive(Debug)]
enum Route {
    Pods(String, Option<String>),
    Slices(String, Option<String>),
    Deployment(String, String),
    Scale(String, String),
    Leases(String, Option<String>),
    Version,
    Unknown,
}

impl Route {
    fn parse(path: &str) -> Route {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let s = |i: usize| parts[i].to_string();
        match parts.as_slice() {
            ["version"] => Route::Version,
            ["api", "v1", "namespaces", _, "pods"] => Route::Pods(s(3), None),
            ["api", "v1", "namespaces", _, "pods", _] => Route::Pods(s(3), Some(s(5))),
            ["apis", "discovery.k8s.io", "v1", "namespaces", _, "endpointslices"] => Route::Slices(s(4), None),
            ["apis", "discovery.k8s.io", "v1", "namespaces", _, "endpointslices", _] => Route::Slices(s(4), Some(s(6))),
            ["apis", "apps", "v1", "namespaces", _, "deployments", _] => Route::Deployment(s(4), s(6)),
            ["apis", "apps", "v1", "namespaces", _, "deployments", _, "scale"] => Route::Scale(s(4), s(6)),
            ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases"] => Route::Leases(s(4), None),
            ["apis", "coordination.k8s.io", "v1", "namespaces", _, "leases", _] => Route::Leases(s(4), Some(s(6))),
            _ => Route::Unknown,
        }
    }

    fn resource(&self, path: &str) -> String {
        match self {
            Route::Pods(..) => "pods",
            Route::Slices(..) => "endpointslices",
            Route::Deployment(..) => "deployments",
            Route::Scale(..) => "deployments/scale",
            Route::Leases(..) => "leases",
            Route::Version => "version",
            Route::Unknown => path,
        }
        .to_string()
    }

    fn name(&self) -> Option<String> {
        match self {
            Route::Pods(_, n) | Route::Slices(_, n) | Route::Leases(_, n) => n.clone(),
            Route::Deployment(_, n) | Route::Scale(_, n) => Some(n.clone()),
            Route::Version | Route::Unknown => None,
        }
    }
}

fn verb(method: &Method, named: bool, watch: bool) -> &'static str {
    match (method.as_str(), named) {
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", false) => "deletecollection",
        ("DELETE", true) => "delete",
        _ => "unknown",
    }
}

async fn handle(inner: Arc<Inner>, request: Request<Incoming>) -> Response<Body> {
    let at = Instant::now();
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let query_text = parts.uri.query().unwrap_or("").to_string();
    let query = parse_query(&query_text);
    let route = Route::parse(&path);
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = verb(&parts.method, route.name().is_some(), watching);
    let content_type =
        parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(|v| v.to_ascii_lowercase());
    let body = if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
        match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                let response = status_response(400, "BadRequest", &format!("cannot read the body: {e}"), None);
                record(&inner, at, verb, &route, &parts.method, &path, &query_text, &content_type, &response);
                return response;
            }
        }
    } else {
        Bytes::new()
    };
    let call = Call { verb, query: &query, content_type: content_type.as_deref(), body: &body };
    let response = dispatch(&inner, &route, &call);
    record(&inner, at, verb, &route, &parts.method, &path, &query_text, &content_type, &response);
    response
}

struct Call<'a> {
    verb: &'static str,
    query: &'a BTreeMap<String, String>,
    content_type: Option<&'a str>,
    body: &'a Bytes,
}

#[allow(clippy::too_many_arguments)]
fn record(
    inner: &Inner,
    at: Instant,
    verb: &str,
    route: &Route,
    method: &Method,
    path: &str,
    query: &str,
    content_type: &Option<String>,
    response: &Response<Body>,
) {
    let recorded = RecordedRequest {
        verb: verb.to_string(),
        resource: route.resource(path),
        name: route.name(),
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        content_type: content_type.clone(),
        status: response.status().as_u16(),
        at,
    };
    inner.lock().requests.push(recorded);
}

fn dispatch(inner: &Arc<Inner>, route: &Route, call: &Call<'_>) -> Response<Body> {
    let name_of = |n: &Option<String>| n.clone().unwrap_or_default();
    match (route, call.verb) {
        (Route::Version, "list") => json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "35", "gitVersion": "v1.35.0-sdgate-fake", "platform": "linux/amd64"}),
        ),
        (Route::Pods(ns, _), "list") => list(inner, Kind::Pods, ns, call.query),
        (Route::Pods(ns, _), "watch") => watch_response(inner, Kind::Pods, ns, call.query),
        (Route::Slices(ns, _), "list") => list(inner, Kind::EndpointSlices, ns, call.query),
        (Route::Slices(ns, _), "watch") => watch_response(inner, Kind::EndpointSlices, ns, call.query),
        (Route::Pods(ns, n), "get") => get_pod(inner, ns, &name_of(n)),
        (Route::Pods(ns, n), "patch") => patch_pod(inner, ns, &name_of(n), call),
        (Route::Pods(ns, n), "delete") => delete_pod(inner, ns, &name_of(n)),
        (Route::Slices(ns, n), "get") => {
            let st = inner.lock();
            if ns == NAMESPACE && st.slice.metadata.name == *n {
                json_response(StatusCode::OK, &st.slice)
            } else {
                not_found("endpointslices", "discovery.k8s.io", &name_of(n))
            }
        }
        (Route::Deployment(ns, n), "get") => {
            let st = inner.lock();
            if ns == NAMESPACE && *n == inner.opts.deployment {
                json_response(StatusCode::OK, &st.deployment)
            } else {
                not_found("deployments", "apps", n)
            }
        }
        (Route::Scale(ns, n), "get" | "patch" | "update") => {
            if ns != NAMESPACE || *n != inner.opts.deployment {
                return not_found("deployments", "apps", n);
            }
            match call.verb {
                "get" => json_response(StatusCode::OK, &scale_of(&inner.lock().deployment)),
                _ => write_scale(inner, call),
            }
        }
        (Route::Leases(ns, None), "list") => {
            let st = inner.lock();
            let items: Vec<Value> = st
                .leases
                .values()
                .filter(|l| l.metadata.namespace.as_deref() == Some(ns.as_str()))
                .filter_map(|l| serde_json::to_value(l).ok())
                .collect();
            list_body("coordination.k8s.io/v1", "LeaseList", st.rv, items)
        }
        (Route::Leases(ns, None), "create") => create_lease(inner, ns, call),
        (Route::Leases(ns, Some(n)), "get") => match inner.lock().leases.get(n) {
            Some(lease) if ns == NAMESPACE => json_response(StatusCode::OK, lease),
            _ => not_found("leases", "coordination.k8s.io", n),
        },
        (Route::Leases(ns, Some(n)), "update" | "patch") => write_lease(inner, ns, n, call),
        (Route::Leases(ns, Some(n)), "delete") => {
            let removed = if ns == NAMESPACE { inner.lock().leases.remove(n) } else { None };
            match removed {
                Some(_) => json_response(StatusCode::OK, &success_status()),
                None => not_found("leases", "coordination.k8s.io", n),
            }
        }
        (Route::Unknown, _) => {
            status_response(404, "NotFound", "the server could not find the requested resource", None)
        }
        _ => status_response(405, "MethodNotAllowed", &format!("{} is not supported here", call.verb), None),
    }
}

// --- responses

fn json_response<T: Serialize + ?Sized>(code: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => bytes_response(code, Bytes::from(bytes)),
        Err(e) => bytes_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            Bytes::from(
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": format!("serialisation: {e}"), "reason": "InternalError", "code": 500})
                .to_string(),
            ),
        ),
    }
}

fn bytes_response(code: StatusCode, bytes: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(bytes).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = code;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn failure(code: u16, reason: &str, message: &str, details: Option<StatusDetails>) -> Status {
    Status {
        code: Some(i32::from(code)),
        details,
        message: Some(message.to_string()),
        metadata: ListMeta::default(),
        reason: Some(reason.to_string()),
        status: Some("Failure".into()),
    }
}

fn success_status() -> Status {
    Status { code: Some(200), status: Some("Success".into()), ..Default::default() }
}

fn status_response(code: u16, reason: &str, message: &str, details: Option<StatusDetails>) -> Response<Body> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, &failure(code, reason, message, details))
}

fn details(kind: &str, group: &str, name: &str) -> StatusDetails {
    StatusDetails {
        name: Some(name.to_string()),
        group: (!group.is_empty()).then(|| group.to_string()),
        kind: Some(kind.to_string()),
        ..Default::default()
    }
}

fn qualified(kind: &str, group: &str) -> String {
    if group.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}.{group}")
    }
}

fn not_found(kind: &str, group: &str, name: &str) -> Response<Body> {
    let message = format!("{} \"{name}\" not found", qualified(kind, group));
    status_response(404, "NotFound", &message, Some(details(kind, group, name)))
}

fn conflict(kind: &str, group: &str, name: &str) -> Response<Body> {
    let message = format!(
        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
        qualified(kind, group)
    );
    status_response(409, "Conflict", &message, Some(details(kind, group, name)))
}

fn list_body(api_version: &str, kind: &str, rv: u64, items: Vec<Value>) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
    )
}

// --- query strings and selectors

fn percent_decode(text: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(pair), String::new()),
        })
        .collect()
}

#[derive(Clone, Debug, Default)]
struct Selector {
    terms: Vec<Term>,
}

#[derive(Clone, Debug)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

impl Selector {
    fn parse(text: Option<&String>) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for raw in text.map(String::as_str).unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = raw.strip_prefix('!') {
                Term::Absent(k.trim().into())
            } else if raw.contains(' ') || raw.contains('(') {
                return Err(format!("unsupported selector term {raw:?} (set-based selectors are not implemented)"));
            } else {
                Term::Exists(raw.into())
            };
            terms.push(term);
        }
        Ok(Selector { terms })
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::Ne(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
            Term::Absent(k) => !labels.contains_key(k),
        })
    }
}

/// `metadata.name=X` / `metadata.namespace=X` field selectors; others match everything.
fn field_matches(query: &BTreeMap<String, String>, namespace: &str, name: &str) -> bool {
    let Some(fields) = query.get("fieldSelector") else { return true };
    fields.split(',').filter_map(|t| t.split_once('=')).all(|(k, v)| {
        let v = v.trim_start_matches('=');
        match k.trim_end_matches('!') {
            "metadata.name" if k.ends_with('!') => name != v,
            "metadata.name" => name == v,
            "metadata.namespace" if k.ends_with('!') => namespace != v,
            "metadata.namespace" => namespace == v,
            _ => true,
        }
    })
}

// --- lists and objects

/// The current objects of `kind` in `namespace` matching the query's selectors.
fn current_objects(
    st: &State,
    kind: Kind,
    namespace: &str,
    selector: &Selector,
    query: &BTreeMap<String, String>,
) -> Vec<Value> {
    let metas: Vec<(ObjectMeta, Result<Value, serde_json::Error>)> = match kind {
        Kind::Pods => {
            let mut recs: Vec<&PodRec> = st.pods.values().collect();
            recs.sort_by_key(|r| r.seq);
            recs.iter().map(|r| (r.pod.metadata.clone(), serde_json::to_value(&r.pod))).collect()
        }
        Kind::EndpointSlices => vec![(st.slice.metadata.clone(), serde_json::to_value(&st.slice))],
    };
    metas
        .into_iter()
        .filter(|(meta, _)| {
            meta.namespace.as_deref() == Some(namespace)
                && selector.matches(&meta.labels.clone().unwrap_or_default())
                && field_matches(query, namespace, meta.name.as_deref().unwrap_or(""))
        })
        .filter_map(|(_, value)| value.ok())
        .collect()
}

fn list(inner: &Inner, kind: Kind, namespace: &str, query: &BTreeMap<String, String>) -> Response<Body> {
    let selector = match Selector::parse(query.get("labelSelector")) {
        Ok(selector) => selector,
        Err(e) => return status_response(400, "BadRequest", &e, None),
    };
    let st = inner.lock();
    let items = current_objects(&st, kind, namespace, &selector, query);
    list_body(kind.api_version(), &format!("{}List", kind.kind()), st.rv, items)
}

fn get_pod(inner: &Inner, namespace: &str, name: &str) -> Response<Body> {
    let st = inner.lock();
    match st.pods.get(name) {
        Some(rec) if namespace == NAMESPACE => json_response(StatusCode::OK, &rec.pod),
        _ => not_found("pods", "", name),
    }
}

fn delete_pod(inner: &Arc<Inner>, namespace: &str, name: &str) -> Response<Body> {
    let response = {
        let mut st = inner.lock();
        if namespace != NAMESPACE || !st.pods.contains_key(name) {
            return not_found("pods", "", name);
        }
        begin_termination(inner, &mut st, name);
        reconcile(inner, &mut st);
        match st.pods.get(name).or_else(|| st.gone.iter().rev().find(|r| r.pod.metadata.name.as_deref() == Some(name)))
        {
            Some(rec) => json_response(StatusCode::OK, &rec.pod),
            None => json_response(StatusCode::OK, &success_status()),
        }
    };
    inner.notify();
    response
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(map) = target {
        for (key, value) in patch {
            if value.is_null() {
                map.remove(key);
            } else {
                merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// A refused request, answered as a Status (kept small for `Result`s).
struct Refusal {
    code: u16,
    reason: &'static str,
    message: String,
}

impl Refusal {
    fn response(self) -> Response<Body> {
        status_response(self.code, self.reason, &self.message, None)
    }
}

/// The request body as JSON: for PATCH, only the patch types treated as merge
/// patches (merge, strategic-merge, apply).
fn body_json(call: &Call<'_>) -> Result<Value, Refusal> {
    if call.verb == "patch" {
        let media = call.content_type.unwrap_or("").split(';').next().unwrap_or("").trim();
        let merge_like = matches!(
            media,
            "application/merge-patch+json"
                | "application/strategic-merge-patch+json"
                | "application/apply-patch+yaml"
                | "application/apply-patch+json"
                | "application/json"
        );
        if !merge_like {
            return Err(Refusal {
                code: 415,
                reason: "UnsupportedMediaType",
                message: format!(
                    "the fake API treats merge, strategic-merge and apply patches as merge patches; {media:?} is not supported"
                ),
            });
        }
    }
    serde_json::from_slice::<Value>(call.body).map_err(|e| Refusal {
        code: 400,
        reason: "BadRequest",
        message: format!("the body is not JSON: {e}"),
    })
}

/// A body's `metadata.resourceVersion` that does not match `current`: 409.
fn stale(value: &Value, current: Option<&str>) -> bool {
    match value.pointer("/metadata/resourceVersion").and_then(Value::as_str) {
        Some(rv) if !rv.is_empty() => Some(rv) != current,
        _ => false,
    }
}

fn patch_pod(inner: &Arc<Inner>, namespace: &str, name: &str, call: &Call<'_>) -> Response<Body> {
    let patch = match body_json(call) {
        Ok(patch) => patch,
        Err(refusal) => return refusal.response(),
    };
    let response = {
        let mut st = inner.lock();
        let Some(rec) = st.pods.get_mut(name).filter(|_| namespace == NAMESPACE) else {
            return not_found("pods", "", name);
        };
        if stale(&patch, rec.pod.metadata.resource_version.as_deref()) {
            return conflict("pods", "", name);
        }
        let before = match serde_json::to_value(&rec.pod) {
            Ok(value) => value,
            Err(e) => return status_response(500, "InternalError", &e.to_string(), None),
        };
        let mut after = before.clone();
        merge_patch(&mut after, &patch);
        let patched: Pod = match serde_json::from_value(after) {
            Ok(pod) => pod,
            Err(e) => return status_response(422, "Invalid", &format!("the patched pod is invalid: {e}"), None),
        };
        // Only labels, annotations and finalizers are writable here (spec is
        // immutable, status is a subresource).
        let mut pod = rec.pod.clone();
        pod.metadata.labels = patched.metadata.labels;
        pod.metadata.annotations = patched.metadata.annotations;
        pod.metadata.finalizers = patched.metadata.finalizers;
        if serde_json::to_value(&pod).ok().as_ref() != Some(&before) {
            rec.pod = pod;
            st.touch_pod(name, "MODIFIED");
        }
        match st.pods.get(name) {
            Some(rec) => json_response(StatusCode::OK, &rec.pod),
            None => not_found("pods", "", name),
        }
    };
    inner.notify();
    response
}

fn scale_of(deployment: &Deployment) -> Scale {
    let selector = deployment
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.as_ref())
        .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","));
    Scale {
        metadata: ObjectMeta {
            name: deployment.metadata.name.clone(),
            namespace: deployment.metadata.namespace.clone(),
            uid: deployment.metadata.uid.clone(),
            resource_version: deployment.metadata.resource_version.clone(),
            creation_timestamp: deployment.metadata.creation_timestamp.clone(),
            ..Default::default()
        },
        spec: Some(ScaleSpec { replicas: deployment.spec.as_ref().and_then(|s| s.replicas) }),
        status: Some(ScaleStatus {
            replicas: deployment.status.as_ref().and_then(|s| s.replicas).unwrap_or(0),
            selector,
        }),
    }
}

fn write_scale(inner: &Arc<Inner>, call: &Call<'_>) -> Response<Body> {
    let name = inner.opts.deployment.clone();
    let (current, current_rv) = {
        let st = inner.lock();
        (scale_of(&st.deployment), st.deployment.metadata.resource_version.clone())
    };
    let body = match body_json(call) {
        Ok(body) => body,
        Err(refusal) => return refusal.response(),
    };
    if stale(&body, current_rv.as_deref()) {
        return conflict("deployments", "apps", &name);
    }
    let mut value = match serde_json::to_value(&current) {
        Ok(value) => value,
        Err(e) => return status_response(500, "InternalError", &e.to_string(), None),
    };
    if call.verb == "patch" {
        merge_patch(&mut value, &body);
    } else {
        value = body;
    }
    let replicas = match value.pointer("/spec/replicas") {
        None | Some(Value::Null) => 0,
        Some(v) => match v.as_i64().and_then(|n| i32::try_from(n).ok()) {
            Some(n) if n >= 0 => n,
            _ => {
                return status_response(
                    422,
                    "Invalid",
                    &format!("Scale.autoscaling \"{name}\" is invalid: spec.replicas: Invalid value: {v}"),
                    None,
                )
            }
        },
    };
    set_replicas(inner, replicas);
    json_response(StatusCode::OK, &scale_of(&inner.lock().deployment))
}

fn create_lease(inner: &Inner, namespace: &str, call: &Call<'_>) -> Response<Body> {
    let mut lease: Lease = match serde_json::from_slice(call.body) {
        Ok(lease) => lease,
        Err(e) => return status_response(400, "BadRequest", &format!("not a Lease: {e}"), None),
    };
    let Some(name) = lease.metadata.name.clone().filter(|n| !n.is_empty()) else {
        return status_response(422, "Invalid", "metadata.name: Required value (generateName is not supported)", None);
    };
    if lease.metadata.namespace.as_deref().is_some_and(|ns| ns != namespace) || namespace != NAMESPACE {
        return status_response(400, "BadRequest", "the namespace of the object does not match the request", None);
    }
    let mut st = inner.lock();
    if st.leases.contains_key(&name) {
        let message = format!("leases.coordination.k8s.io \"{name}\" already exists");
        return status_response(409, "AlreadyExists", &message, Some(details("leases", "coordination.k8s.io", &name)));
    }
    let rv = st.bump();
    lease.metadata.namespace = Some(NAMESPACE.into());
    lease.metadata.uid = Some(st.new_uid());
    lease.metadata.resource_version = Some(rv.to_string());
    lease.metadata.creation_timestamp = Some(now_time());
    st.leases.insert(name, lease.clone());
    json_response(StatusCode::CREATED, &lease)
}

fn write_lease(inner: &Inner, namespace: &str, name: &str, call: &Call<'_>) -> Response<Body> {
    let body = match body_json(call) {
        Ok(body) => body,
        Err(refusal) => return refusal.response(),
    };
    let mut st = inner.lock();
    let Some(current) = st.leases.get(name).filter(|_| namespace == NAMESPACE).cloned() else {
        return not_found("leases", "coordination.k8s.io", name);
    };
    if stale(&body, current.metadata.resource_version.as_deref()) {
        return conflict("leases", "coordination.k8s.io", name);
    }
    let value = if call.verb == "patch" {
        let mut value = match serde_json::to_value(&current) {
            Ok(value) => value,
            Err(e) => return status_response(500, "InternalError", &e.to_string(), None),
        };
        merge_patch(&mut value, &body);
        value
    } else {
        body
    };
    let mut lease: Lease = match serde_json::from_value(value) {
        Ok(lease) => lease,
        Err(e) => return status_response(400, "BadRequest", &format!("not a Lease: {e}"), None),
    };
    if lease.metadata.name.as_deref() != Some(name) {
        return status_response(400, "BadRequest", "the name of the object does not match the name in the URL", None);
    }
    let rv = st.bump();
    lease.metadata.namespace = current.metadata.namespace.clone();
    lease.metadata.uid = current.metadata.uid.clone();
    lease.metadata.creation_timestamp = current.metadata.creation_timestamp.clone();
    lease.metadata.resource_version = Some(rv.to_string());
    st.leases.insert(name.to_string(), lease.clone());
    json_response(StatusCode::OK, &lease)
}

// --- watch

struct Cursor {
    inner: Arc<Inner>,
    kind: Kind,
    namespace: String,
    selector: Selector,
    query: BTreeMap<String, String>,
    pos: u64,
    cut_gen: u64,
    pending: VecDeque<Bytes>,
    /// End the stream once `pending` is sent (after a 410).
    finish: bool,
    done: bool,
    deadline: tokio::time::Instant,
    bookmarks: Option<Duration>,
    next_bookmark: tokio::time::Instant,
    changed: watch::Receiver<u64>,
}

impl Drop for Cursor {
    fn drop(&mut self) {
        self.inner.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

fn event_line(typ: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": typ, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn expired_line(pos: u64, current: u64) -> Bytes {
    let status = failure(410, "Expired", &format!("too old resource version: {pos} ({current})"), None);
    match serde_json::to_value(&status) {
        Ok(object) => event_line("ERROR", &object),
        Err(_) => event_line("ERROR", &json!({"kind": "Status", "apiVersion": "v1", "code": 410, "reason": "Expired"})),
    }
}

fn bookmark_line(kind: Kind, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line("BOOKMARK", &json!({"kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": metadata}))
}

fn watch_response(inner: &Arc<Inner>, kind: Kind, namespace: &str, query: &BTreeMap<String, String>) -> Response<Body> {
    let selector = match Selector::parse(query.get("labelSelector")) {
        Ok(selector) => selector,
        Err(e) => return status_response(400, "BadRequest", &e, None),
    };
    let timeout = query.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).unwrap_or(1800);
    let bookmarks = matches!(query.get("allowWatchBookmarks").map(String::as_str), Some("true" | "1"))
        .then_some(inner.opts.bookmark_interval);
    let initial_events = matches!(query.get("sendInitialEvents").map(String::as_str), Some("true" | "1"));
    let now = tokio::time::Instant::now();
    let mut cursor = {
        let st = inner.lock();
        inner.open_watches.fetch_add(1, Ordering::SeqCst);
        let mut cursor = Cursor {
            inner: inner.clone(),
            kind,
            namespace: namespace.to_string(),
            selector,
            query: query.clone(),
            pos: st.rv,
            cut_gen: st.cut_gen,
            pending: VecDeque::new(),
            finish: false,
            done: false,
            deadline: now + Duration::from_secs(timeout),
            bookmarks,
            next_bookmark: now + bookmarks.unwrap_or_default(),
            changed: inner.changed.subscribe(),
        };
        match query.get("resourceVersion").map(String::as_str).unwrap_or("") {
            "" | "0" => {
                // "Any"/"most recent": synthetic ADDED events for what exists now.
                for object in current_objects(&st, kind, namespace, &cursor.selector, query) {
                    cursor.pending.push_back(event_line("ADDED", &object));
                }
                if initial_events {
                    cursor.pending.push_back(bookmark_line(kind, st.rv, true));
                }
            }
            rv => match rv.parse::<u64>() {
                Ok(rv) if rv < st.floor => {
                    cursor.pending.push_back(expired_line(rv, st.rv));
                    cursor.finish = true;
                }
                Ok(rv) => cursor.pos = rv,
                Err(_) => {
                    drop(st);
                    drop(cursor);
                    return status_response(400, "BadRequest", &format!("invalid resourceVersion {rv:?}"), None);
                }
            },
        }
        cursor
    };
    cursor.changed.borrow_and_update();
    let stream = futures_util::stream::unfold(cursor, next_chunk);
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn next_chunk(mut c: Cursor) -> Option<(Result<Frame<Bytes>, BoxError>, Cursor)> {
    loop {
        if c.done {
            return None;
        }
        if let Some(line) = c.pending.pop_front() {
            return Some((Ok(Frame::data(line)), c));
        }
        if c.finish {
            return None;
        }
        if tokio::time::Instant::now() >= c.deadline {
            return None;
        }
        c.changed.borrow_and_update();
        {
            let st = c.inner.lock();
            if st.stopped {
                return None;
            }
            if st.cut_gen != c.cut_gen {
                drop(st);
                c.done = true;
                return Some((Err("the fake API cut this watch".into()), c));
            }
            if c.pos < st.floor {
                c.pending.push_back(expired_line(c.pos, st.rv));
                c.finish = true;
                continue;
            }
            let start = st.history.partition_point(|e| e.rv <= c.pos);
            for event in &st.history[start..] {
                if event.kind == c.kind
                    && event.namespace == c.namespace
                    && c.selector.matches(&event.labels)
                    && field_matches(&c.query, &event.namespace, &event.name)
                {
                    c.pending.push_back(event_line(event.typ, &event.object));
                }
            }
            c.pos = st.rv;
        }
        if !c.pending.is_empty() {
            continue;
        }
        let (deadline, next_bookmark) = (c.deadline, c.next_bookmark);
        let bookmarks = c.bookmarks;
        tokio::select! {
            changed = c.changed.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
            () = tokio::time::sleep_until(deadline) => return None,
            () = tokio::time::sleep_until(next_bookmark), if bookmarks.is_some() => {
                c.next_bookmark = tokio::time::Instant::now() + bookmarks.unwrap_or_default();
                c.pending.push_back(bookmark_line(c.kind, c.pos, false));
            }
        }
    }
}
