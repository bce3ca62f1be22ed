//! The narrow handle a provider (and its probes) gets on its service's gate.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::control::provider::drain::{self, Candidate};
use crate::gate::{EndpointId, Sessions, SharedGate};

/// Add, remove, mark ready or draining, report a backend error, and pick
/// what to drain: all a provider may do to the gate.
#[derive(Clone)]
pub struct Endpoints {
    gate: Arc<SharedGate>,
    /// The service's pins, when it has affinity: scale-down keeps the pods
    /// that hold the most live sessions.
    sessions: Option<Arc<Sessions>>,
    /// The service's idle-check path: a pod sdgate has never used must pass
    /// it before its first request.
    idle_check: Option<Arc<str>>,
    /// Where a pod says what checkpoint it is set to (asked before its first request).
    checkpoint_options: Option<Arc<str>>,
}

impl Endpoints {
    pub fn new(gate: Arc<SharedGate>) -> Self {
        Self { gate, sessions: None, idle_check: None, checkpoint_options: None }
    }

    /// Counts `sessions` when choosing what to drain.
    pub fn with_sessions(mut self, sessions: Option<Arc<Sessions>>) -> Self {
        self.sessions = sessions;
        self
    }

    /// Checks a pod never used before at `path` before its first request.
    pub fn with_idle_check(mut self, path: Option<&str>) -> Self {
        self.idle_check = path.map(Arc::from);
        self
    }

    /// A new endpoint, not ready until a probe says so.
    pub fn add(&self, addr: SocketAddr) -> EndpointId {
        self.gate.add_endpoint(addr)
    }

    /// Forgets an endpoint; its in-flight requests finish or fail on their own.
    pub fn remove(&self, id: EndpointId) {
        self.gate.remove_endpoint(id);
    }

    /// Returns whether the state changed.
    pub fn set_ready(&self, id: EndpointId, ready: bool) -> bool {
        self.gate.set_ready(id, ready)
    }

    /// No new requests, for good; those it holds finish.
    pub fn set_draining(&self, id: EndpointId) {
        self.gate.set_draining(id);
    }

    /// Serves again after a drain that was called off.
    pub fn undrain(&self, id: EndpointId) {
        self.gate.undrain(id);
    }

    /// Whether the endpoint is ready; `None` once it is gone.
    pub fn is_ready(&self, id: EndpointId) -> Option<bool> {
        self.gate.inspect(|g| g.endpoint(id).map(|e| e.ready))
    }

    /// Holds no request (or is gone).
    pub fn is_idle(&self, id: EndpointId) -> bool {
        self.gate.inspect(|g| g.endpoint(id).is_none_or(|e| e.inflight == 0))
    }

    /// Has been ready or served (so a death is not a failure to start).
    pub fn ever_served(&self, id: EndpointId) -> bool {
        self.gate.inspect(|g| g.endpoint(id).is_some_and(|e| e.ready || e.served > 0))
    }

    /// Asks a pod that becomes ready at `path` what checkpoint it is set to.
    pub fn with_checkpoint_options(mut self, path: Option<&str>) -> Self {
        self.checkpoint_options = path.map(Arc::from);
        self
    }

    /// Where a pod says what checkpoint it is set to, if the service asks.
    pub fn checkpoint_options_path(&self) -> Option<Arc<str>> {
        self.checkpoint_options.clone()
    }

    /// What a pod says it is set to.
    pub fn set_checkpoint(&self, id: EndpointId, name: &str) {
        self.gate.set_checkpoint(id, name);
    }

    /// The service's idle-check path, if it has one.
    pub fn idle_check_path(&self) -> Option<Arc<str>> {
        self.idle_check.clone()
    }

    /// Some endpoint may take requests.
    pub fn any_ready(&self) -> bool {
        self.gate.inspect(|g| g.ready_count() > 0)
    }

    /// Why pods are not coming up (told to requests that time out waiting);
    /// `None` once the cause is gone.
    pub fn report_error(&self, error: Option<String>) {
        self.gate.set_backend_error(error);
    }

    /// The backend cannot start a pod now (`Some`: waiting and new requests
    /// get 503 with the cause), or may again (`None`).
    pub fn set_down(&self, down: Option<crate::gate::Down>) {
        self.gate.set_down(down);
    }

    /// Records what a probe of `id` saw (see [`SharedGate::note_probe`]).
    pub fn note_probe(&self, id: EndpointId, failure: Option<&str>) -> crate::gate::ProbeNote {
        self.gate.note_probe(id, failure, tokio::time::Instant::now())
    }

    /// How long the oldest waiting request has waited, if any waits.
    pub fn oldest_wait(&self) -> Option<std::time::Duration> {
        self.gate.inspect(|g| g.oldest_wait(tokio::time::Instant::now()))
    }

    /// The shared drain policy over `(key, endpoint)` pairs: the keys ordered
    /// cheapest to lose first (idle, not ready, fewest sessions, highest key).
    pub fn drain_order<K: Ord + Clone>(&self, candidates: &[(K, EndpointId)]) -> Vec<K> {
        let now = tokio::time::Instant::now();
        let sessions = |id| self.sessions.as_ref().map_or(0, |s| s.count_for(id, now));
        let states: Vec<(K, EndpointId, bool, bool)> = self.gate.inspect(|g| {
            candidates
                .iter()
                .map(|(key, id)| {
                    let e = g.endpoint(*id);
                    (key.clone(), *id, e.is_none_or(|e| e.inflight == 0), e.is_none_or(|e| !e.ready))
                })
                .collect()
        });
        drain::order(states.into_iter().map(|(key, id, idle, not_ready)| Candidate {
            key,
            idle,
            not_ready,
            sessions: sessions(id),
        }))
    }
}
