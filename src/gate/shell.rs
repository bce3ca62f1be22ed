//! The gate shared by a service's requests and its control loop: the pure
//! [`Gate`] behind a lock, the waiters' channels, the demand signal and the
//! backend's error. Metrics and status observe it through [`Observer`].
//!
//! A [`Slot`] is granted from here; dropping it hands the room straight to
//! the next waiter, under the same lock, so no pod sits idle while a request
//! it could take waits.
//!
//! Waiting is cancel-safe: a waiter that gives up leaves the queue, and a slot
//! granted at the instant it gave up is dropped with its channel and so comes
//! back; in-flight always returns to 0 when traffic stops.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use super::core::{ClientKey, EndpointId, Gate, Grant, Pin, Priority, Queued, Ticket};
use super::models::{ModelPolicy, Want};
use super::slot::Slot;
use crate::error::{lock, ProxyError, UpstreamFailure};

/// What the gate tells those who watch it (the service's metrics). The gate
/// calls it under its lock: implementations only store numbers.
pub trait Observer: Send + Sync {
    /// Requests waiting, and requests on pods.
    fn queue(&self, depth: usize, inflight: u32);
    /// Clients with requests waiting, and the requests waiting per class
    /// (interactive, batch).
    fn waiting(&self, _clients: usize, _by_class: [usize; 2]) {}
    /// Endpoints by state.
    fn endpoints(&self, counts: EndpointCounts);
    /// A cold start ended: the first waiting request waited this long for a pod.
    fn cold_start(&self, took: Duration);
    /// An exchange with a pod ended without a full answer.
    fn upstream_failed(&self, failure: UpstreamFailure);
    /// A pod went into quarantine.
    fn quarantined(&self);
    /// A request was sent to a pod that must load `checkpoint` first
    /// (`reported`: a pod has reported that name, so it is no client's
    /// invention and may be given a metric label of its own).
    fn checkpoint_loaded(&self, _checkpoint: &str, _reported: bool) {}
    /// Requests waiting per checkpoint (those with none waiting left out),
    /// told whenever the queue changes while a checkpoint is known.
    fn checkpoint_waiting(&self, _waiting: &mut dyn Iterator<Item = (&str, usize)>) {}
}

/// Endpoints by state: ready (taking requests), not ready (starting or
/// failing its probe), draining, quarantined (maybe still busy with a job
/// sdgate gave up on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounts {
    pub ready: usize,
    pub not_ready: usize,
    pub draining: usize,
    pub quarantined: usize,
}

/// An observer that keeps nothing (tests, benchmarks).
pub struct Unobserved;

impl Observer for Unobserved {
    fn queue(&self, _: usize, _: u32) {}
    fn endpoints(&self, _: EndpointCounts) {}
    fn cold_start(&self, _: Duration) {}
    fn upstream_failed(&self, _: UpstreamFailure) {}
    fn quarantined(&self) {}
}

/// What a queued request waits on: the channel its slot arrives by.
pub type Waiter = oneshot::Sender<Slot>;

/// Who a request comes from, for fair share: its client, its class, and how
/// many requests the client may have waiting (0: no bound); and the
/// checkpoint it wants.
#[derive(Clone, Copy, Debug, Default)]
pub struct Origin {
    /// Its client's key (a hash never 0, so the field is 8 bytes: an origin
    /// is carried by every request).
    pub client: Option<std::num::NonZeroU64>,
    pub priority: Priority,
    pub max_queued: u32,
    pub want: Option<Want>,
}

impl Origin {
    fn client_key(&self) -> Option<ClientKey> {
        self.client.map(std::num::NonZeroU64::get)
    }
}

/// One service's gate, shared by its requests, probes and provider.
pub struct SharedGate {
    gate: Mutex<Gate<Waiter>>,
    /// Why pods are not coming up, if the provider knows (told to requests
    /// that time out waiting).
    backend_error: Mutex<Option<String>>,
    observer: Arc<dyn Observer>,
    /// Woken when a request has to wait (the autoscaler's activation
    /// signal: the control plane's read-only view of demand).
    pub demand: Notify,
    /// When a request first waited with no pod ready (a cold start under way).
    cold_since: Mutex<Option<Instant>>,
    /// The observer was told of waiting clients and classes, not yet of an
    /// empty queue (written under the gate's lock).
    waiting_told: std::sync::atomic::AtomicBool,
    /// What each endpoint's last probe saw (for /status and the log).
    probes: Mutex<std::collections::BTreeMap<EndpointId, ProbeNote>>,
    /// Set while the backend cannot start any pod (every start failed and
    /// none is ready or starting): waiting requests are answered 503 with
    /// the cause at once, and so are new ones, instead of each waiting out
    /// the queue timeout.
    down: tokio::sync::watch::Sender<Option<Down>>,
    /// When the timer that ends pods' idle spells is set to go off (see
    /// [`Gate::note_idle`]).
    idle_timer: Mutex<Option<Instant>>,
}

/// Why the backend cannot start a pod, and when it tries again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Down {
    pub cause: String,
    /// When the next start is due (the 503's `Retry-After` counts down to it).
    pub retry_at: Instant,
}

impl Down {
    fn error(&self) -> ProxyError {
        let left = self.retry_at.saturating_duration_since(Instant::now());
        let retry_after = u32::try_from(left.as_secs_f64().ceil() as u64).unwrap_or(u32::MAX).max(1);
        ProxyError::BackendDown { cause: self.cause.clone(), retry_after }
    }
}

/// What the last probe of an endpoint saw, and for how long.
#[derive(Clone, Debug)]
pub struct ProbeNote {
    /// None: the probe passed; else what it got ("GET /internal/ping -> 400
    /// Invalid HTTP request received.", "refused", ...).
    pub failure: Option<String>,
    /// Probes in a row with this outcome.
    pub times: u64,
    /// When the first of them was taken, and the last.
    pub since: Instant,
    pub at: Instant,
}

impl SharedGate {
    pub fn new(capacity: u32, max_depth: usize, observer: Arc<dyn Observer>) -> Arc<Self> {
        // Every state has a series from the start, zero endpoints included.
        observer.endpoints(EndpointCounts::default());
        Arc::new(Self {
            gate: Mutex::new(Gate::new(capacity, max_depth)),
            backend_error: Mutex::new(None),
            observer,
            demand: Notify::new(),
            cold_since: Mutex::new(None),
            waiting_told: std::sync::atomic::AtomicBool::new(false),
            probes: Mutex::default(),
            down: tokio::sync::watch::Sender::new(None),
            idle_timer: Mutex::new(None),
        })
    }

    /// Who watches this gate (the service's metrics).
    pub fn observer(&self) -> &dyn Observer {
        &*self.observer
    }

    /// Locks the gate (see [`lock`]: its methods do not panic).
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

    /// See [`Gate::set_batch_delay`].
    pub fn set_batch_delay(&self, units: u64) {
        self.lock().set_batch_delay(units);
    }

    /// See [`Gate::set_model_policy`].
    pub fn set_model_policy(&self, policy: ModelPolicy) {
        self.lock().set_model_policy(policy);
    }

    /// What a request wants, by checkpoint name (already normalised); None
    /// when the service's table of names is full.
    pub fn want(&self, name: &str, keep: bool) -> Option<Want> {
        self.want_reported(name, keep).0
    }

    /// [`SharedGate::want`], and whether a pod has reported that name.
    pub fn want_reported(&self, name: &str, keep: bool) -> (Option<Want>, bool) {
        let mut gate = self.lock();
        let model = gate.checkpoint(name);
        (model.map(|model| Want { model, keep }), model.is_some_and(|model| gate.checkpoint_reported(model)))
    }

    /// What a pod says it is set to (see [`Gate::set_checkpoint`]).
    pub fn set_checkpoint(&self, id: EndpointId, name: &str) {
        let name = super::models::normalize_checkpoint(name);
        if !name.is_empty() {
            self.lock().set_checkpoint(id, &name);
        }
    }

    /// What a pod's answer says it holds (see [`Gate::set_held`]).
    pub fn set_held(&self, id: EndpointId, name: &str) -> Option<super::models::ModelId> {
        let name = super::models::normalize_checkpoint(name);
        if name.is_empty() {
            return None;
        }
        self.lock().set_held(id, &name)
    }

    /// See [`Gate::forget_held`].
    pub fn forget_held(&self, id: EndpointId) {
        self.lock().forget_held(id);
    }

    /// A place in line for a new request from `origin` (see [`Gate::arrive_from`]).
    pub fn arrive_from(&self, origin: Origin) -> Ticket {
        self.lock().arrive_from(origin.client_key(), origin.priority)
    }

    /// [`SharedGate::arrive_from`] and [`SharedGate::try_acquire`] under one
    /// lock: a place in line, and a slot at once if a pod has room and
    /// nobody is ahead (the common case, so it takes the lock once).
    pub fn arrive_and_try(self: &Arc<Self>, origin: Origin, pin: Option<Pin>) -> (Ticket, Option<Slot>) {
        let mut gate = self.lock();
        let ticket = gate.arrive_from(origin.client_key(), origin.priority);
        let slot = self.dispatch(&mut gate, ticket, pin, origin);
        (ticket, slot)
    }

    /// Waits, at `ticket`'s place in line, until a pod has room, at most
    /// `timeout`.
    pub async fn acquire(self: &Arc<Self>, ticket: Ticket, timeout: Duration) -> Result<Slot, ProxyError> {
        self.acquire_pinned(ticket, None, timeout).await
    }

    /// A slot for `ticket` now, if a pod has room and nobody is ahead of
    /// it; else the ticket keeps its place for [`SharedGate::acquire_pinned`].
    pub fn try_acquire(self: &Arc<Self>, ticket: Ticket, pin: Option<Pin>, origin: Origin) -> Option<Slot> {
        self.dispatch(&mut self.lock(), ticket, pin, origin)
    }

    /// A slot for `ticket` from the locked gate, if it can have one now.
    fn dispatch(
        self: &Arc<Self>,
        gate: &mut Gate<Waiter>,
        ticket: Ticket,
        pin: Option<Pin>,
        origin: Origin,
    ) -> Option<Slot> {
        let grant = gate.try_dispatch_for(ticket, pin, origin.want, true)?;
        let slot = self.slot(gate, grant);
        if grant.load.is_some() {
            // The pod now holds another checkpoint: waiters for it may take
            // its other slots (cc > 1).
            self.hand_out(gate);
        }
        self.publish(gate);
        Some(slot)
    }

    /// The slot of a grant (told to the observer if it loads a checkpoint).
    fn slot(self: &Arc<Self>, gate: &Gate<Waiter>, grant: Grant) -> Slot {
        if let Some(model) = grant.load {
            self.observer.checkpoint_loaded(gate.checkpoint_name(model), gate.checkpoint_reported(model));
        }
        Slot::new(self.clone(), grant)
    }

    /// [`SharedGate::acquire`] for a request that may be pinned to a pod.
    pub async fn acquire_pinned(
        self: &Arc<Self>,
        ticket: Ticket,
        pin: Option<Pin>,
        timeout: Duration,
    ) -> Result<Slot, ProxyError> {
        self.acquire_from(ticket, pin, Origin::default(), timeout).await
    }

    /// [`SharedGate::acquire_pinned`] for a request from `origin`: refused
    /// (429) when its client already has `max_queued` requests waiting.
    pub async fn acquire_from(
        self: &Arc<Self>,
        ticket: Ticket,
        pin: Option<Pin>,
        origin: Origin,
        timeout: Duration,
    ) -> Result<Slot, ProxyError> {
        self.acquire_patient(ticket, pin, origin, timeout, None).await
    }

    /// [`SharedGate::acquire_from`] for a request that, after `patience`,
    /// stops waiting for a pod that holds its checkpoint and takes any pod
    /// (in place: it keeps its place in line and its wait goes on).
    pub async fn acquire_patient(
        self: &Arc<Self>,
        ticket: Ticket,
        pin: Option<Pin>,
        origin: Origin,
        timeout: Duration,
        patience: Option<Duration>,
    ) -> Result<Slot, ProxyError> {
        let mut down = self.down.subscribe();
        let mut rx = {
            let mut gate = self.lock();
            if let Some(slot) = self.dispatch(&mut gate, ticket, pin, origin) {
                return Ok(slot);
            }
            if let Some(down) = down.borrow_and_update().as_ref().filter(|_| gate.ready_count() == 0) {
                return Err(down.error());
            }
            if let (Some(client), max) = (origin.client_key(), origin.max_queued as usize) {
                if max > 0 && gate.waiting_of(client) >= max {
                    return Err(ProxyError::ClientQueueFull(max));
                }
            }
            let (tx, rx) = oneshot::channel();
            let now = Instant::now();
            let queued = Queued {
                pin,
                client: origin.client_key(),
                priority: origin.priority,
                want: origin.want,
                patient: true,
            };
            if gate.enqueue_request(ticket, queued, tx, now).is_err() {
                return Err(ProxyError::QueueFull(gate.queue_depth()));
            }
            if gate.ready_count() == 0 {
                lock(&self.cold_since).get_or_insert(now);
            }
            // A pod with room it chose not to take starts (or goes on with)
            // an idle spell; one idle too long takes the first it can.
            let (overdue, next) = gate.note_idle(|| now);
            if let Some(due) = next {
                self.end_idle_spell_at(due);
            }
            if overdue {
                self.hand_out(&mut gate);
            }
            self.publish(&gate);
            rx
        };
        self.demand.notify_one();
        let mut leave = LeaveQueueOnDrop { gate: self, ticket: Some(ticket) };
        let patience = patience.filter(|patience| *patience < timeout);
        let waited = async {
            if let Some(patience) = patience {
                tokio::select! {
                    got = &mut rx => return got,
                    () = tokio::time::sleep(patience) => self.lose_patience(ticket),
                }
            }
            (&mut rx).await
        };
        let gave_up = async {
            let Ok(down) = down.wait_for(Option::is_some).await else { return std::future::pending().await };
            down.clone().unwrap_or_else(|| Down { cause: String::new(), retry_at: Instant::now() })
        };
        let waited = async {
            tokio::select! {
                got = waited => Ok(got),
                down = gave_up => Err(down),
            }
        };
        match tokio::time::timeout(timeout, waited).await {
            Ok(Err(down)) => {
                if leave.leave() {
                    return Err(down.error());
                }
                // Granted in the same instant: use the slot.
                rx.try_recv().map_err(|_| down.error())
            }
            Ok(Ok(Ok(slot))) => {
                leave.ticket = None;
                Ok(slot)
            }
            // The gate dropped the waiter without a slot: only when closing.
            Ok(Ok(Err(_))) => Err(ProxyError::ShuttingDown),
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

    /// A waiter stops waiting for a pod that holds its checkpoint: it takes
    /// any pod with room from now on, this one at once if there is one.
    fn lose_patience(self: &Arc<Self>, ticket: Ticket) {
        let mut gate = self.lock();
        if gate.lose_patience(ticket) {
            self.hand_out(&mut gate);
            self.publish(&gate);
        }
    }

    /// Records why pods fail to come up (None once one is ready).
    pub fn set_backend_error(&self, error: Option<String>) {
        *lock(&self.backend_error) = error;
    }

    /// The backend cannot start a pod (`Some`), or may again (`None`): see
    /// [`SharedGate::down`]'s field doc. Waiting requests get the 503 at once.
    pub fn set_down(&self, down: Option<Down>) {
        self.down.send_if_modified(|now| {
            let changed = *now != down;
            *now = down;
            changed
        });
    }

    /// Whether the backend is down (see [`SharedGate::set_down`]).
    pub fn is_down(&self) -> bool {
        self.down.borrow().is_some()
    }

    /// Why the backend cannot start a pod, while it cannot.
    pub fn down_cause(&self) -> Option<String> {
        self.down.borrow().as_ref().map(|down| down.cause.clone())
    }

    /// Records what a probe of `id` saw (`None`: it passed); returns the
    /// note as it stands after it.
    pub fn note_probe(&self, id: EndpointId, failure: Option<&str>, now: Instant) -> ProbeNote {
        let mut probes = lock(&self.probes);
        let note = probes.entry(id).or_insert_with(|| ProbeNote { failure: None, times: 0, since: now, at: now });
        if note.times == 0 || note.failure.as_deref() != failure {
            *note = ProbeNote { failure: failure.map(str::to_string), times: 0, since: now, at: now };
        }
        note.times += 1;
        note.at = now;
        note.clone()
    }

    /// What the last probe of `id` saw, if it was probed.
    pub fn probe_note(&self, id: EndpointId) -> Option<ProbeNote> {
        lock(&self.probes).get(&id).cloned()
    }

    /// A first pod became ready: if requests were waiting for one, that was a
    /// cold start (`sdgate_cold_start_seconds`, from the first waiting request).
    fn cold_start_ended(&self) {
        if let Some(since) = lock(&self.cold_since).take() {
            self.observer.cold_start(since.elapsed());
        }
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
    /// A grant (without a slot) on exactly `id`, whatever its state, while
    /// the gate knows it: for requests that must reach the pod a job runs on.
    pub fn grant_of(&self, id: EndpointId) -> Option<Grant> {
        self.lock().endpoint(id).map(|e| Grant::plain(e.id, e.addr))
    }

    /// How many waiters are ahead of `ticket`; None when it is not waiting.
    pub fn position(&self, ticket: Ticket) -> Option<usize> {
        self.lock().position(ticket)
    }

    pub fn any_ready(&self, pin: Option<EndpointId>) -> Option<Grant> {
        let gate = self.lock();
        let pinned = pin.and_then(|id| gate.endpoint(id)).filter(|e| e.is_serving());
        pinned.map(|e| Grant::plain(e.id, e.addr)).or_else(|| gate.any_ready())
    }

    pub fn add_endpoint(&self, addr: SocketAddr) -> EndpointId {
        let mut gate = self.lock();
        let id = gate.add_endpoint(addr);
        self.publish_endpoints(&gate);
        id
    }

    /// Forgets an endpoint; waiters pinned to it may now go elsewhere.
    pub fn remove_endpoint(self: &Arc<Self>, id: EndpointId) {
        lock(&self.probes).remove(&id);
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
                self.set_down(None);
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

    /// See [`Gate::learn`].
    pub(super) fn learn(&self, endpoint: EndpointId, took: Duration, loaded: bool) {
        self.lock().learn(endpoint, took, loaded);
    }

    pub(super) fn release(self: &Arc<Self>, endpoint: EndpointId, answered: bool) {
        let mut gate = self.lock();
        if answered {
            gate.release_answered(endpoint);
        } else {
            gate.release(endpoint);
        }
        self.hand_out(&mut gate);
        self.publish(&gate);
    }

    /// Gives free room to waiters, in order, until one or the other runs
    /// out; then times the spells of pods left idle while requests wait
    /// (a pod idle too long takes the first it can: hand out again).
    fn hand_out(self: &Arc<Self>, gate: &mut Gate<Waiter>) {
        loop {
            while let Some((waiter, grant)) = gate.next_grant() {
                if let Err(mut slot) = waiter.send(self.slot(gate, grant)) {
                    // The waiter left: the room goes to the next one. The slot must
                    // not release itself (we hold the lock); release it here.
                    slot.armed = false;
                    gate.release(grant.endpoint);
                }
            }
            let (overdue, next) = gate.note_idle(Instant::now);
            if let Some(due) = next {
                self.end_idle_spell_at(due);
            }
            if !overdue {
                return;
            }
        }
    }

    /// Hands out again at `due`, when a pod's idle spell reaches its bound
    /// (one timer at a time: the earliest).
    #[cold]
    fn end_idle_spell_at(self: &Arc<Self>, due: Instant) {
        let mut armed = lock(&self.idle_timer);
        if armed.is_some_and(|at| at <= due) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        *armed = Some(due);
        let shared = Arc::downgrade(self);
        runtime.spawn(async move {
            tokio::time::sleep_until(due).await;
            let Some(shared) = shared.upgrade() else { return };
            {
                let mut armed = lock(&shared.idle_timer);
                if *armed == Some(due) {
                    *armed = None;
                }
            }
            let mut gate = shared.lock();
            shared.hand_out(&mut gate);
            shared.publish(&gate);
        });
    }

    #[inline]
    fn publish(&self, gate: &Gate<Waiter>) {
        self.observer.queue(gate.queue_depth(), gate.inflight());
        // The per-client and per-class figures change only with the queue:
        // told while it has waiters, and once more when it empties.
        let waiting = gate.queue_depth() > 0;
        if waiting || self.waiting_told.swap(false, std::sync::atomic::Ordering::Relaxed) {
            self.waiting_told.store(waiting, std::sync::atomic::Ordering::Relaxed);
            let by_class = [gate.depth_of(Priority::Interactive), gate.depth_of(Priority::Batch)];
            self.observer.waiting(gate.waiting_clients(), by_class);
            if gate.knows_checkpoints() {
                self.publish_checkpoints(gate);
            }
        }
    }

    #[cold]
    fn publish_checkpoints(&self, gate: &Gate<Waiter>) {
        self.observer.checkpoint_waiting(&mut gate.checkpoint_demand());
    }

    fn publish_endpoints(&self, gate: &Gate<Waiter>) {
        let ready = gate.ready_count();
        let draining = gate.endpoints().iter().filter(|e| e.draining).count();
        let quarantined = gate.endpoints().iter().filter(|e| !e.draining && e.quarantined > 0).count();
        let not_ready = gate.endpoints().len() - ready - draining - quarantined;
        self.observer.endpoints(EndpointCounts { ready, not_ready, draining, quarantined });
    }
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
            // Nor for a pod: idle spells end.
            gate.note_idle(Instant::now);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn one_pod() -> (Arc<SharedGate>, EndpointId) {
        let gate = SharedGate::new(1, 10, Arc::new(Unobserved));
        let pod = gate.add_endpoint(SocketAddr::from(([127, 0, 0, 1], 7860)));
        gate.set_ready(pod, true);
        (gate, pod)
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_at_its_queue_timeout_and_leaves_the_queue() {
        let (gate, _) = one_pod();
        let held = gate.acquire(gate.arrive(), Duration::from_secs(1)).await.expect("the pod is free");
        let started = Instant::now();
        let waited = gate.acquire(gate.arrive(), Duration::from_secs(300)).await;
        assert!(matches!(waited, Err(ProxyError::QueueTimeout { .. })), "{waited:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(300), "the paused clock ran exactly the timeout");
        assert_eq!(gate.inspect(|g| g.queue_depth()), 0);
        drop(held);
        assert_eq!(gate.inspect(|g| g.inflight()), 0);
    }

    /// Two ready pods, holding checkpoints a and c.
    fn pods_holding_a_and_c(gate: &Arc<SharedGate>) -> [EndpointId; 2] {
        let pods = [7860, 7861].map(|port| gate.add_endpoint(SocketAddr::from(([127, 0, 0, 1], port))));
        for (pod, name) in pods.iter().zip(["a", "c"]) {
            gate.set_checkpoint(*pod, name);
            gate.set_ready(*pod, true);
        }
        pods
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_for_a_busy_pod_holding_its_checkpoint_takes_a_free_pod_after_its_patience() {
        let gate = SharedGate::new(1, 10, Arc::new(Unobserved));
        // Loads dear and pods' idle spells unbounded: the waiter's patience decides.
        let policy = ModelPolicy {
            switch_cost: Duration::from_secs(60),
            max_idle: Duration::from_secs(60),
            ..ModelPolicy::default()
        };
        gate.set_model_policy(policy);
        let [on_a, on_c] = pods_holding_a_and_c(&gate);
        // a is in use (asked for lately), so a's pod is kept for it while it can.
        let for_a = Origin { want: gate.want("a", false), ..Origin::default() };
        drop(gate.arrive_and_try(for_a, None).1.expect("a's pod is free"));
        let for_c = Origin { want: gate.want("c", false), ..Origin::default() };
        let (ticket, busy) = gate.arrive_and_try(for_c, None);
        let busy = busy.expect("c's pod is free");
        assert_eq!(busy.endpoint(), on_c);
        let started = Instant::now();
        let (ticket_2, none) = gate.arrive_and_try(for_c, None);
        assert!(none.is_none(), "it waits for c's pod, cheaper than a load");
        let _ = ticket;
        let patience = Duration::from_secs(10);
        let slot = gate.acquire_patient(ticket_2, None, for_c, Duration::from_secs(300), Some(patience)).await;
        let slot = slot.expect("a pod after its patience");
        assert_eq!((slot.endpoint(), started.elapsed()), (on_a, patience), "a's pod, at once when patience ran out");
        assert_eq!(
            gate.inspect(|g| g.endpoint(on_a).and_then(|e| e.model.holds).map(|m| g.checkpoint_name(m).to_string())),
            Some("c".to_string())
        );
        drop(busy);
    }

    /// A pod with room idles while requests wait for the busy pod that
    /// holds their checkpoint, at most the cheaper of its load and
    /// `max_idle`: then the first waiter loads there. Its spell restarts
    /// whenever it takes a request.
    #[tokio::test(start_paused = true)]
    async fn a_pod_idle_while_requests_wait_takes_the_first_after_a_loads_time() {
        let gate = SharedGate::new(1, 10, Arc::new(Unobserved));
        let load = Duration::from_millis(1500);
        let policy = ModelPolicy { switch_cost: load, idle_by_load: true, ..ModelPolicy::default() };
        gate.set_model_policy(policy);
        let [on_a, _on_c] = pods_holding_a_and_c(&gate);
        let for_a = Origin { want: gate.want("a", false), ..Origin::default() };
        drop(gate.arrive_and_try(for_a, None).1.expect("a's pod is free"));
        let for_c = Origin { want: gate.want("c", false), ..Origin::default() };
        let busy = gate.arrive_and_try(for_c, None).1.expect("c's pod is free");
        let started = Instant::now();
        let (ticket, none) = gate.arrive_and_try(for_c, None);
        assert!(none.is_none(), "it waits for c's pod");
        let patience = Some(Duration::from_secs(10));
        let slot = gate.acquire_patient(ticket, None, for_c, Duration::from_secs(300), patience).await;
        let slot = slot.expect("a pod after a load's time");
        assert_eq!((slot.endpoint(), started.elapsed()), (on_a, load), "a's pod, once idle for a load's time");
        assert_eq!(gate.inspect(|g| g.endpoint(on_a).map(|e| (e.idle_since, e.overdue))), Some((None, false)));
        // Nobody waits: no spell, no timer.
        drop((slot, busy));
        assert!(gate.inspect(|g| g.endpoints().iter().all(|e| e.idle_since.is_none())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_slot_goes_to_the_first_waiter_when_the_holder_finishes() {
        let (gate, pod) = one_pod();
        let held = gate.acquire(gate.arrive(), Duration::from_secs(1)).await.expect("the pod is free");
        let (first, second) = (gate.arrive(), gate.arrive());
        let waiting = {
            let gate = gate.clone();
            tokio::spawn(async move {
                let first = async {
                    // The slot is dropped as soon as it came: the pod goes on to the second.
                    gate.acquire(first, Duration::from_secs(60)).await.map(|slot| (Instant::now(), slot.endpoint()))
                };
                let second = async {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    gate.acquire(second, Duration::from_secs(60)).await.is_ok()
                };
                tokio::join!(first, second)
            })
        };
        tokio::time::sleep(Duration::from_secs(20)).await;
        let freed_at = Instant::now();
        drop(held);
        let (first_got, second_got) = waiting.await.expect("waiters ran");
        let (at, endpoint) = first_got.expect("the first waiter got the pod");
        assert_eq!((at, endpoint), (freed_at, pod), "handed over the moment it was freed");
        assert!(second_got, "the second got it after the first");
    }
}
