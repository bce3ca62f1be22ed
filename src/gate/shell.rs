//! The gate shared by a service's requests and its control loop, and the
//! [`Slot`] that carries a pod's capacity.
//!
//! A [`Slot`] is the right to have one request on one pod. It is returned by
//! `Drop`, never by remembering to call a release function (tower's
//! `ConcurrencyLimit` permit, but owned by the upstream exchange rather than
//! the client's future, because the pod stays busy after a client leaves).
//! Dropping a slot hands the room straight to the next waiter, under the same
//! lock, so no pod sits idle while a request it could take waits.
//!
//! Waiting is cancel-safe: a waiter that gives up leaves the queue, and a slot
//! granted at the instant it gave up is dropped with its channel and so comes
//! back; in-flight always returns to 0 when traffic stops.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::error::ProxyError;
use crate::gate::{EndpointId, Gate, Grant, Pin, Ticket};
use crate::observe::metrics::{Recent, ServiceMetrics};
use crate::proxy::affinity::Sessions;

/// What a queued request waits on: the channel its slot arrives by.
pub type Waiter = oneshot::Sender<Slot>;

/// One service's gate, shared by its requests, probes and provider.
pub struct SharedGate {
    gate: Mutex<Gate<Waiter>>,
    /// Why pods are not coming up, if the provider knows (told to requests
    /// that time out waiting).
    backend_error: Mutex<Option<String>>,
    metrics: ServiceMetrics,
    /// Woken when a request has to wait (the autoscaler's activation signal).
    pub demand: Notify,
    /// When a request first waited with no pod ready (a cold start under way).
    cold_since: Mutex<Option<Instant>>,
    /// The autoscaler's latest change, for the status page.
    last_scale: Mutex<Option<ScaleEvent>>,
    /// Recent answers, for rates and percentiles on the status page.
    pub recent: Recent,
    /// The service's session pins, when it has affinity (the status page and
    /// scale-down count live sessions per pod).
    pub sessions: Option<Arc<Sessions>>,
    /// How a pod sdgate gave up on is known to be idle again (none: freed at once).
    quarantine: std::sync::OnceLock<Arc<crate::forward::quarantine::Policy>>,
}

/// A change of the desired replica count and why.
#[derive(Clone, Debug)]
pub struct ScaleEvent {
    pub desired: u32,
    pub reason: &'static str,
    pub at: Instant,
}

impl SharedGate {
    pub fn new(capacity: u32, max_depth: usize, metrics: ServiceMetrics) -> Arc<Self> {
        Self::with_sessions(capacity, max_depth, metrics, None)
    }

    pub fn with_sessions(
        capacity: u32,
        max_depth: usize,
        metrics: ServiceMetrics,
        sessions: Option<Arc<Sessions>>,
    ) -> Arc<Self> {
        // Every state has a series from the start, zero endpoints included.
        metrics.set_endpoints(0, 0, 0, 0);
        Arc::new(Self {
            gate: Mutex::new(Gate::new(capacity, max_depth)),
            backend_error: Mutex::new(None),
            metrics,
            demand: Notify::new(),
            cold_since: Mutex::new(None),
            last_scale: Mutex::new(None),
            recent: Recent::default(),
            sessions,
            quarantine: std::sync::OnceLock::new(),
        })
    }

    /// Sets the quarantine policy (once, when the service is built).
    pub fn set_quarantine_policy(&self, policy: Option<Arc<crate::forward::quarantine::Policy>>) {
        if let Some(policy) = policy {
            let _ = self.quarantine.set(policy);
        }
    }

    pub fn quarantine_policy(&self) -> Option<Arc<crate::forward::quarantine::Policy>> {
        self.quarantine.get().cloned()
    }

    /// Locks the gate. A panic while holding the lock cannot leave the gate
    /// half-updated (its methods do not panic), so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, Gate<Waiter>> {
        lock(&self.gate)
    }

    /// Reads the gate (for status pages and tests).
    pub fn inspect<T>(&self, f: impl FnOnce(&Gate<Waiter>) -> T) -> T {
        f(&self.lock())
    }

    /// A place in line for a new request.
    pub fn arrive(&self) -> Ticket {
        self.lock().arrive()
    }

    /// Waits, at `ticket`'s place in line, until a pod has room, at most
    /// `timeout`.
    pub async fn acquire(self: &Arc<Self>, ticket: Ticket, timeout: Duration) -> Result<Slot, ProxyError> {
        self.acquire_pinned(ticket, None, timeout).await
    }

    /// A slot for `ticket` now, if a pod has room and nobody is ahead of
    /// it; else the ticket keeps its place for [`SharedGate::acquire_pinned`].
    pub fn try_acquire(self: &Arc<Self>, ticket: Ticket, pin: Option<Pin>) -> Option<Slot> {
        self.dispatch(&mut self.lock(), ticket, pin)
    }

    /// A slot for `ticket` from the locked gate, if it can have one now.
    fn dispatch(self: &Arc<Self>, gate: &mut Gate<Waiter>, ticket: Ticket, pin: Option<Pin>) -> Option<Slot> {
        let grant = gate.try_dispatch_pinned(ticket, pin)?;
        self.publish(gate);
        Some(Slot::new(self.clone(), grant))
    }

    /// [`SharedGate::acquire`] for a request that may be pinned to a pod.
    pub async fn acquire_pinned(
        self: &Arc<Self>,
        ticket: Ticket,
        pin: Option<Pin>,
        timeout: Duration,
    ) -> Result<Slot, ProxyError> {
        let mut rx = {
            let mut gate = self.lock();
            if let Some(slot) = self.dispatch(&mut gate, ticket, pin) {
                return Ok(slot);
            }
            let (tx, rx) = oneshot::channel();
            let now = tokio::time::Instant::now().into_std();
            if gate.enqueue_pinned(ticket, pin, tx, now).is_err() {
                return Err(ProxyError::QueueFull(gate.queue_depth()));
            }
            if gate.ready_count() == 0 {
                lock(&self.cold_since).get_or_insert(now);
            }
            self.publish(&gate);
            rx
        };
        self.demand.notify_one();
        let mut leave = LeaveQueueOnDrop { gate: self, ticket: Some(ticket) };
        match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok(slot)) => {
                leave.ticket = None;
                Ok(slot)
            }
            // The gate dropped the waiter without a slot: only when closing.
            Ok(Err(_)) => Err(ProxyError::ShuttingDown),
            Err(_) => {
                if leave.leave() {
                    return Err(self.timed_out(timeout));
                }
                // Granted in the same instant the timer fired: use the slot.
                rx.try_recv().map_err(|_| self.timed_out(timeout))
            }
        }
    }

    fn timed_out(&self, timeout: Duration) -> ProxyError {
        ProxyError::QueueTimeout { timeout, cause: lock(&self.backend_error).clone() }
    }

    /// Records why pods fail to come up (None once one is ready).
    pub fn set_backend_error(&self, error: Option<String>) {
        *lock(&self.backend_error) = error;
    }

    /// A first pod became ready: if requests were waiting for one, that was a
    /// cold start (`sdgate_cold_start_seconds`, from the first waiting request).
    fn cold_start_ended(&self) {
        if let Some(since) = lock(&self.cold_since).take() {
            self.metrics.cold_start.observe(since.elapsed().as_secs_f64());
        }
    }

    pub fn record_scale(&self, desired: u32, reason: &'static str) {
        *lock(&self.last_scale) = Some(ScaleEvent { desired, reason, at: tokio::time::Instant::now().into_std() });
    }

    pub fn last_scale(&self) -> Option<ScaleEvent> {
        lock(&self.last_scale).clone()
    }

    /// Stops giving an endpoint new requests (scale-down); waiters pinned to
    /// it may now go elsewhere.
    pub fn set_draining(self: &Arc<Self>, id: EndpointId) {
        self.change_endpoints(|gate| gate.set_draining(id));
    }

    /// See [`Gate::quarantine`]; an endpoint out of quarantine takes waiters at once.
    pub fn quarantine(self: &Arc<Self>, id: EndpointId, on: bool) {
        self.change_endpoints(|gate| gate.quarantine(id, on));
    }

    /// See [`Gate::set_limits`]; a raised capacity takes waiters at once.
    pub fn set_limits(self: &Arc<Self>, capacity: u32, max_depth: usize) {
        self.change_endpoints(|gate| gate.set_limits(capacity, max_depth));
    }

    /// Takes a drained endpoint back; it takes waiters at once.
    pub fn undrain(self: &Arc<Self>, id: EndpointId) {
        self.change_endpoints(|gate| gate.undrain(id));
    }

    /// Changes the endpoints, then gives any room that frees to waiters (or
    /// moves waiters pinned to a pod that stopped serving) and publishes.
    fn change_endpoints(self: &Arc<Self>, change: impl FnOnce(&mut Gate<Waiter>)) {
        let mut gate = self.lock();
        change(&mut gate);
        self.hand_out(&mut gate);
        self.publish(&gate);
        self.publish_endpoints(&gate);
    }

    /// An endpoint for a request that skips the gate (no slot): the pinned
    /// one if it may take requests, else any ready one.
    pub fn any_ready(&self, pin: Option<EndpointId>) -> Option<Grant> {
        let gate = self.lock();
        let pinned = pin.and_then(|id| gate.endpoint(id)).filter(|e| e.is_serving());
        pinned.map(|e| Grant { endpoint: e.id, addr: e.addr }).or_else(|| gate.any_ready())
    }

    pub fn add_endpoint(&self, addr: SocketAddr) -> EndpointId {
        let mut gate = self.lock();
        let id = gate.add_endpoint(addr);
        self.publish_endpoints(&gate);
        id
    }

    /// Forgets an endpoint; waiters pinned to it may now go elsewhere.
    pub fn remove_endpoint(self: &Arc<Self>, id: EndpointId) {
        self.change_endpoints(|gate| {
            gate.remove_endpoint(id);
        });
    }

    /// Marks an endpoint ready or not; a newly ready one takes waiters at once.
    pub fn set_ready(self: &Arc<Self>, id: EndpointId, ready: bool) -> bool {
        let mut gate = self.lock();
        let changed = gate.set_ready(id, ready);
        if changed {
            if ready {
                if gate.ready_count() == 1 {
                    self.cold_start_ended();
                }
                self.set_backend_error(None);
            }
            // Ready: it takes waiters. Not ready: waiters pinned to it move.
            self.hand_out(&mut gate);
            self.publish(&gate);
            self.publish_endpoints(&gate);
        }
        changed
    }

    /// Records one more abnormal exchange in a row on `id`; returns how many.
    pub fn record_failure(&self, id: EndpointId) -> u32 {
        self.lock().record_failure(id)
    }

    fn release(self: &Arc<Self>, endpoint: EndpointId, answered: bool) {
        let mut gate = self.lock();
        if answered {
            gate.release_answered(endpoint);
        } else {
            gate.release(endpoint);
        }
        self.hand_out(&mut gate);
        self.publish(&gate);
    }

    /// Gives free room to waiters, in order, until one or the other runs out.
    fn hand_out(self: &Arc<Self>, gate: &mut Gate<Waiter>) {
        while let Some((waiter, grant)) = gate.next_grant() {
            if let Err(mut slot) = waiter.send(Slot::new(self.clone(), grant)) {
                // The waiter left: the room goes to the next one. The slot must
                // not release itself (we hold the lock); release it here.
                slot.armed = false;
                gate.release(grant.endpoint);
            }
        }
    }

    fn publish(&self, gate: &Gate<Waiter>) {
        self.metrics.queue_depth.set(gate.queue_depth() as i64);
        self.metrics.inflight.set(i64::from(gate.inflight()));
    }

    fn publish_endpoints(&self, gate: &Gate<Waiter>) {
        let ready = gate.ready_count();
        let draining = gate.endpoints().iter().filter(|e| e.draining).count();
        let quarantined = gate.endpoints().iter().filter(|e| !e.draining && e.quarantined > 0).count();
        let not_ready = gate.endpoints().len() - ready - draining - quarantined;
        self.metrics.set_endpoints(ready, not_ready, draining, quarantined);
    }

    pub fn metrics(&self) -> &ServiceMetrics {
        &self.metrics
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes a waiter from the queue if its future is dropped (client gone).
struct LeaveQueueOnDrop<'a> {
    gate: &'a SharedGate,
    ticket: Option<Ticket>,
}

impl LeaveQueueOnDrop<'_> {
    /// True if the waiter was still queued (so no slot was granted).
    fn leave(&mut self) -> bool {
        let Some(ticket) = self.ticket.take() else { return false };
        let mut gate = self.gate.lock();
        let was_queued = gate.cancel(ticket).is_some();
        if gate.queue_depth() == 0 {
            // Nobody waits for the cold start any more: a pod that becomes
            // ready later ends no cold start a client saw.
            lock(&self.gate.cold_since).take();
        }
        self.gate.publish(&gate);
        was_queued
    }
}

impl Drop for LeaveQueueOnDrop<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// The right to have one request on one pod; dropping it frees the room.
pub struct Slot {
    gate: Arc<SharedGate>,
    grant: Grant,
    armed: bool,
    /// The pod answered in full (ends a run of failures on release).
    answered: bool,
}

impl Slot {
    fn new(gate: Arc<SharedGate>, grant: Grant) -> Self {
        Self { gate, grant, armed: true, answered: false }
    }

    /// A slot-less stand-in for requests that skip the gate.
    pub fn bypass(gate: Arc<SharedGate>, grant: Grant) -> Self {
        Self { gate, grant, armed: false, answered: false }
    }

    pub fn addr(&self) -> SocketAddr {
        self.grant.addr
    }

    /// Holds a pod's room (false for a bypass request's stand-in).
    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// Frees the slot of an exchange the pod answered in full.
    pub fn answered(mut self) {
        self.answered = true;
    }

    pub fn endpoint(&self) -> EndpointId {
        self.grant.endpoint
    }

    pub fn gate(&self) -> &Arc<SharedGate> {
        &self.gate
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.gate.release(self.grant.endpoint, self.answered);
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("grant", &self.grant).field("armed", &self.armed).finish()
    }
}
