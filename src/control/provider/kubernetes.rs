//! The pods of a Kubernetes Deployment, found through the API and scaled
//! through the Deployment's scale subresource (kube-rs).
//!
//! - Discovery is a watch, never a poll: pods matching the Deployment's
//!   selector become endpoints as soon as they have an IP, and are probed
//!   directly (as fixed and process backends are), so a pod gets traffic the
//!   moment it answers, before the kubelet's own probe marks it Ready.
//!   EndpointSlices add what the kubelet knows: `terminating` drains a pod,
//!   `ready` marks it ready if the probe has not yet.
//! - A pod being deleted (`deletionTimestamp`, or `terminating` in its
//!   slice) takes no new requests; those it holds finish. A deleted pod is
//!   forgotten. A watch that breaks or expires (`410 Gone`) re-lists: pods
//!   still there keep their endpoint, pods gone are removed (no duplicates,
//!   none lost).
//! - Scale-up patches `spec.replicas` at once (activation does not wait for
//!   a tick). Scale-down picks its pods with the shared drain policy, drains
//!   them, marks them with the lowest `controller.kubernetes.io/pod-deletion-cost`
//!   so the ReplicaSet deletes those and not busy ones, and lowers replicas
//!   once they are idle. Pods found running at start are not scaled away
//!   before a stable window has passed (a new leader has no demand history).
//! - `scale.mode: external`: pods are discovered, replicas never patched.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, Result};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{KubernetesBackend, PortRef, ScaleMode, ServiceConfig};
use crate::control::probe::Prober;
use crate::control::provider::{Context, Endpoints, Provider};
use crate::gate::EndpointId;

/// Every (API group, resource, verbs) this backend and leader election use:
/// the Role in `deploy/` grants exactly these (a test checks both ways).
pub const RBAC: &[(&str, &str, &[&str])] = &[
    ("", "pods", &["list", "watch", "patch"]),
    ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
    ("apps", "deployments", &["get"]),
    ("apps", "deployments/scale", &["get", "patch"]),
    ("coordination.k8s.io", "leases", &["get", "create", "update"]),
];

/// The annotation a ReplicaSet reads to choose which pods to delete first.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The cost given to pods sdgate has drained for a scale-down.
const DRAINED_COST: &str = "-1000";
const HOUSEKEEPING: Duration = Duration::from_millis(50);
const RETRY: Duration = Duration::from_secs(2);

pub struct Kubernetes {
    backend: KubernetesBackend,
}

impl Kubernetes {
    pub fn new(backend: KubernetesBackend) -> Self {
        Self { backend }
    }
}

impl Provider for Kubernetes {
    async fn run(self, cx: Context) {
        let Context { service, endpoints, mut desired, mut stop } = cx;
        loop {
            let outcome = tokio::select! {
                outcome = self.connect_and_follow(&service, &endpoints, &mut desired) => outcome,
                _ = &mut stop => return,
            };
            match outcome {
                Ok(()) => return,
                Err(error) => {
                    let message = format!("kubernetes backend: {error:#}");
                    tracing::warn!(service = %service.name, "{message}; retrying");
                    endpoints.report_error(Some(message));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = &mut stop => return,
            }
        }
    }
}

impl Kubernetes {
    /// Connects, then follows pods and the desired count until `stop`.
    async fn connect_and_follow(
        &self,
        service: &ServiceConfig,
        endpoints: &Endpoints,
        desired: &mut watch::Receiver<u32>,
    ) -> Result<()> {
        let backend = &self.backend;
        let client = client(backend.kubeconfig.as_deref()).await?;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &backend.namespace);
        let deployment = deployments
            .get(&backend.deployment)
            .await
            .with_context(|| format!("cannot read deployment {}/{}", backend.namespace, backend.deployment))?;
        let selector = match &backend.selector {
            Some(selector) => selector.clone(),
            None => selector_of(&deployment)?,
        };
        let scale = deployments
            .get_scale(&backend.deployment)
            .await
            .with_context(|| format!("cannot read the scale of deployment {}", backend.deployment))?;
        let replicas = scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32;
        endpoints.report_error(None);
        tracing::info!(service = %service.name, deployment = %backend.deployment, %selector, replicas, "watching pods");

        let pods_api: Api<Pod> = Api::namespaced(client.clone(), &backend.namespace);
        let slices_api: Api<EndpointSlice> = Api::namespaced(client, &backend.namespace);
        let mut pod_events =
            watcher(pods_api.clone(), watcher::Config::default().labels(&selector)).default_backoff().boxed();
        let mut slice_events = watcher(slices_api, watcher::Config::default()).default_backoff().boxed();
        let mut state = State {
            service: service.name.clone(),
            port: backend.port.clone(),
            endpoints: endpoints.clone(),
            prober: Prober::new(service.readiness.clone()),
            pods: BTreeMap::new(),
            listing: None,
        };
        let mut scaler = Scaler {
            deployments,
            pods: pods_api,
            name: backend.deployment.clone(),
            spec: replicas,
            external: service.scale.mode == ScaleMode::External,
            hold_down_until: Instant::now() + service.scale.stable_window,
            draining: BTreeSet::new(),
            retry_at: None,
            scaled_away: BTreeMap::new(),
        };
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut watch_failing = false;
        loop {
            tokio::select! {
                Some(event) = pod_events.next() => match event {
                    Ok(event) => {
                        if matches!(event, watcher::Event::InitDone) && watch_failing {
                            watch_failing = false;
                            endpoints.report_error(None);
                        }
                        state.on_pod_event(event);
                    }
                    Err(error) => {
                        tracing::warn!(service = %state.service, %error, "pod watch failed; retrying");
                        // Requests waiting for a pod are told why none comes (RBAC, API down...).
                        if !endpoints.any_ready() {
                            watch_failing = true;
                            endpoints.report_error(Some(format!("kubernetes backend: cannot watch pods: {error}")));
                        }
                    }
                },
                Some(event) = slice_events.next() => match event {
                    Ok(event) => state.on_slice_event(event),
                    Err(error) => tracing::debug!(service = %state.service, %error, "endpointslice watch failed; retrying"),
                },
                changed = desired.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let desired = *desired.borrow_and_update();
                    scaler.reconcile(desired, &mut state).await;
                }
                _ = housekeeping.tick() => {
                    let desired = *desired.borrow();
                    scaler.reconcile(desired, &mut state).await;
                }
            }
        }
    }
}

/// A client from the given kubeconfig file, else as `kubectl` finds one
/// (in-cluster service account, `KUBECONFIG`, `~/.kube/config`).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("invalid kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("no Kubernetes API configuration")?,
    };
    kube::Client::try_from(config).context("cannot build a Kubernetes client")
}

/// The label selector of a Deployment, as `k=v,k2=v2`.
fn selector_of(deployment: &Deployment) -> Result<String> {
    let labels = deployment
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.as_ref())
        .filter(|labels| !labels.is_empty())
        .context("the deployment has no spec.selector.matchLabels: set backend.kubernetes.selector")?;
    Ok(labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
}

/// One pod as the backend follows it.
struct PodEntry {
    addr: Option<SocketAddr>,
    endpoint: Option<(EndpointId, JoinHandle<()>)>,
    terminating: bool,
}

/// The pods and their endpoints.
struct State {
    service: String,
    port: PortRef,
    endpoints: Endpoints,
    prober: Prober,
    pods: BTreeMap<String, PodEntry>,
    /// While a (re-)list is under way: the pods it has named so far.
    listing: Option<BTreeSet<String>>,
}

impl State {
    fn on_pod_event(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => self.listing = Some(BTreeSet::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(listing), Some(name)) = (self.listing.as_mut(), pod.metadata.name.clone()) {
                    listing.insert(name);
                }
                self.apply(&pod);
            }
            watcher::Event::InitDone => {
                // A re-list after a broken or expired watch: what it did not
                // name is gone.
                if let Some(listed) = self.listing.take() {
                    let gone: Vec<String> = self.pods.keys().filter(|name| !listed.contains(*name)).cloned().collect();
                    for name in gone {
                        self.forget(&name);
                    }
                }
            }
            watcher::Event::Apply(pod) => self.apply(&pod),
            watcher::Event::Delete(pod) => {
                if let Some(name) = &pod.metadata.name {
                    self.forget(name);
                }
            }
        }
    }

    /// A pod was added or changed.
    fn apply(&mut self, pod: &Pod) {
        let Some(name) = pod.metadata.name.clone() else { return };
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let terminating = pod.metadata.deletion_timestamp.is_some() || matches!(phase, Some("Succeeded" | "Failed"));
        let addr = self.address_of(pod);
        let entry =
            self.pods.entry(name.clone()).or_insert(PodEntry { addr: None, endpoint: None, terminating: false });
        if entry.addr != addr {
            // A new IP (or none any more): the old endpoint is another pod now.
            if let Some((id, probe)) = entry.endpoint.take() {
                probe.abort();
                self.endpoints.remove(id);
            }
            entry.addr = addr;
        }
        if let (None, Some(addr), false) = (&entry.endpoint, entry.addr, terminating) {
            let id = self.endpoints.add(addr);
            tracing::info!(service = %self.service, pod = %name, %addr, "pod endpoint added");
            entry.endpoint = Some((id, self.prober.spawn(self.endpoints.clone(), id, addr)));
        }
        if terminating && !entry.terminating {
            entry.terminating = true;
            if let Some((id, _)) = &entry.endpoint {
                tracing::info!(service = %self.service, pod = %name, "pod terminating: draining");
                self.endpoints.set_draining(*id);
            }
        }
    }

    /// The address sdgate sends a pod's requests to, once it has an IP.
    fn address_of(&self, pod: &Pod) -> Option<SocketAddr> {
        let ip: IpAddr = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
        let port = match &self.port {
            PortRef::Number(port) => *port,
            PortRef::Name(name) => pod
                .spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())?,
        };
        Some(SocketAddr::new(ip, port))
    }

    fn forget(&mut self, name: &str) {
        if let Some(entry) = self.pods.remove(name) {
            if let Some((id, probe)) = entry.endpoint {
                probe.abort();
                self.endpoints.remove(id);
                tracing::info!(service = %self.service, pod = %name, "pod gone: endpoint removed");
            }
        }
    }

    /// The kubelet's view: `terminating` drains, `ready` makes ready.
    fn on_slice_event(&mut self, event: watcher::Event<EndpointSlice>) {
        let slice = match event {
            watcher::Event::Apply(slice) | watcher::Event::InitApply(slice) => slice,
            _ => return,
        };
        for endpoint in &slice.endpoints {
            let Some(pod) = endpoint.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")) else {
                continue;
            };
            let Some(entry) = pod.name.as_ref().and_then(|name| self.pods.get_mut(name)) else { continue };
            let Some((id, _)) = &entry.endpoint else { continue };
            let conditions = endpoint.conditions.as_ref();
            if conditions.and_then(|c| c.terminating) == Some(true) && !entry.terminating {
                entry.terminating = true;
                self.endpoints.set_draining(*id);
            } else if conditions.and_then(|c| c.ready) == Some(true)
                && self.endpoints.is_ready(*id) == Some(false)
                && !self.endpoints.ever_served(*id)
            {
                // Only a pod's first readiness: later, sdgate's own verdicts
                // (refused connections, passive health, the probe) stand.
                self.endpoints.set_ready(*id, true);
            }
        }
    }

    /// Pods that count toward the Deployment's replicas (not terminating).
    fn live(&self) -> impl Iterator<Item = (&String, &PodEntry)> {
        self.pods.iter().filter(|(_, p)| !p.terminating)
    }
}

/// Keeps `spec.replicas` in step with the desired count.
struct Scaler {
    deployments: Api<Deployment>,
    pods: Api<Pod>,
    name: String,
    /// The replicas sdgate last set (or found at start).
    spec: u32,
    external: bool,
    /// No scale-down of pods found at start before this.
    hold_down_until: Instant,
    /// Pods drained for a scale-down still to be patched.
    draining: BTreeSet<String>,
    /// After a failed patch, the next try waits until then.
    retry_at: Option<Instant>,
    /// Drained pods whose replicas were lowered, until the ReplicaSet
    /// deletes them (or keeps them: see `settle_scaled_away`).
    scaled_away: BTreeMap<String, Instant>,
}

/// How long a pod scaled away may stay undeleted before it serves again.
const SCALED_AWAY_GRACE: Duration = Duration::from_secs(10);

impl Scaler {
    async fn reconcile(&mut self, desired: u32, state: &mut State) {
        if self.external {
            return;
        }
        self.settle_scaled_away(state).await;
        if desired >= self.spec {
            self.cancel_scale_down(state).await;
            if desired > self.spec {
                self.hold_down_until = Instant::now();
                self.patch_replicas(desired, state).await;
            }
            return;
        }
        if Instant::now() < self.hold_down_until {
            return;
        }
        // Never drain more pods than exist beyond the desired count (a
        // Deployment short of its replicas), nor more than are surplus.
        let live = state.live().filter(|(name, _)| !self.scaled_away.contains_key(*name)).count();
        let surplus = ((self.spec - desired) as usize).min(live.saturating_sub(desired as usize));
        self.draining.retain(|name| state.pods.get(name).is_some_and(|p| !p.terminating));
        while self.draining.len() > surplus {
            // Demand came back part of the way: the last chosen serve again.
            let Some(name) = self.draining.iter().next_back().cloned() else { break };
            self.draining.remove(&name);
            self.restore(&name, state).await;
        }
        if self.draining.len() < surplus {
            self.choose_drained(surplus - self.draining.len(), state).await;
        }
        // Lower replicas by the drained pods that are idle now; busy ones
        // follow once they are.
        let idle: Vec<String> = self
            .draining
            .iter()
            .filter(|name| {
                state
                    .pods
                    .get(*name)
                    .and_then(|p| p.endpoint.as_ref())
                    .is_none_or(|(id, _)| state.endpoints.is_idle(*id))
            })
            .cloned()
            .collect();
        if idle.is_empty() {
            return;
        }
        let target = self.spec.saturating_sub(idle.len() as u32).max(desired);
        if self.patch_replicas(target, state).await {
            let now = Instant::now();
            for name in idle {
                self.draining.remove(&name);
                self.scaled_away.insert(name, now);
            }
        }
    }

    /// Pods scaled away that the ReplicaSet did not delete (it ranks
    /// not-ready pods before the deletion cost): after a grace, they serve
    /// again, so no live pod stays drained for good.
    async fn settle_scaled_away(&mut self, state: &mut State) {
        self.scaled_away.retain(|name, _| state.pods.get(name).is_some_and(|p| !p.terminating));
        let now = Instant::now();
        let kept: Vec<String> = self
            .scaled_away
            .iter()
            .filter(|(_, at)| now.duration_since(**at) > SCALED_AWAY_GRACE)
            .map(|(n, _)| n.clone())
            .collect();
        for name in kept {
            self.scaled_away.remove(&name);
            tracing::info!(service = %state.service, pod = %name, "pod kept by the ReplicaSet: serving again");
            self.restore(&name, state).await;
        }
    }

    /// Already chosen for a scale-down.
    fn taken(&self, name: &str) -> bool {
        self.draining.contains(name) || self.scaled_away.contains_key(name)
    }

    /// A drained pod serves again, at the default deletion cost.
    async fn restore(&self, name: &str, state: &mut State) {
        if let Some((id, _)) = state.pods.get(name).filter(|p| !p.terminating).and_then(|p| p.endpoint.as_ref()) {
            state.endpoints.undrain(*id);
        }
        self.set_deletion_cost(name, None).await;
    }

    /// Picks `count` more pods to scale away (shared drain policy; pods with
    /// no endpoint yet go first), drains them and lowers their deletion cost.
    async fn choose_drained(&mut self, count: usize, state: &mut State) {
        let mut order: Vec<String> = state
            .live()
            .filter(|(name, p)| p.endpoint.is_none() && !self.taken(name))
            .map(|(name, _)| name.clone())
            .collect();
        let candidates: Vec<(String, EndpointId)> = state
            .live()
            .filter(|(name, _)| !self.taken(name))
            .filter_map(|(name, p)| p.endpoint.as_ref().map(|(id, _)| (name.clone(), *id)))
            .collect();
        order.extend(state.endpoints.drain_order(&candidates));
        for name in order.into_iter().take(count) {
            if let Some((id, _)) = state.pods.get(&name).and_then(|p| p.endpoint.as_ref()) {
                state.endpoints.set_draining(*id);
            }
            self.set_deletion_cost(&name, Some(DRAINED_COST)).await;
            tracing::info!(service = %state.service, pod = %name, "draining pod for scale-down");
            self.draining.insert(name);
        }
    }

    /// Demand came back before the drained pods were scaled away: they serve again.
    async fn cancel_scale_down(&mut self, state: &mut State) {
        for name in std::mem::take(&mut self.draining) {
            self.restore(&name, state).await;
        }
    }

    async fn set_deletion_cost(&self, pod: &str, cost: Option<&str>) {
        let patch = json!({ "metadata": { "annotations": { DELETION_COST: cost } } });
        if let Err(error) = self.pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::warn!(%pod, %error, "cannot set the pod's deletion cost");
        }
    }

    /// Sets `spec.replicas`; whether it was set.
    async fn patch_replicas(&mut self, replicas: u32, state: &State) -> bool {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return false;
        }
        let patch = json!({ "spec": { "replicas": replicas } });
        match self.deployments.patch_scale(&self.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                tracing::info!(service = %state.service, deployment = %self.name, from = self.spec, to = replicas, "scaled deployment");
                self.spec = replicas;
                self.retry_at = None;
                state.endpoints.report_error(None);
                true
            }
            Err(error) => {
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                tracing::warn!(service = %state.service, deployment = %self.name, %error, "cannot scale the deployment");
                state
                    .endpoints
                    .report_error(Some(format!("kubernetes backend: cannot scale deployment {}: {error}", self.name)));
                false
            }
        }
    }
}
