//! The gate: which pod may take a request now, and who waits for one.
//!
//! Guarantees, for one service:
//! - an endpoint never holds more than `capacity` granted requests
//!   (`container_concurrency`; 0 means unlimited);
//! - waiters are served in [`Ticket`] order, and a waiter is never left
//!   waiting while an endpoint that could take it has room (work-conserving:
//!   every event that frees room is followed by [`Gate::next_grant`] until it
//!   returns `None`), except a waiter for a checkpoint, which may choose to
//!   wait for a busy endpoint holding it rather than load it on one with
//!   room, while waiting is expected to cost less than a load and at most
//!   until it loses patience (`checkpoints.max_wait_for_match`): meanwhile
//!   an endpoint with room may idle, at most `checkpoints.max_pod_idle` in
//!   one spell (`max_wait_for_match` unless set; `load`: the cheaper of its
//!   load time and that), then the first waiter it can take loads there
//!   ([`Gate::note_idle`]);
//! - tickets share the pods fairly between clients (start-time fair
//!   queueing, one unit per request): a client's requests are served in
//!   arrival order, and a newcomer waits behind at most about one request of
//!   each other client with requests waiting, however many those sent. A
//!   `batch` request yields to `batch_delay` units of interactive work, then
//!   goes in its turn (nothing starves). Requests of one client (or all
//!   taken with [`Gate::arrive`]) keep strict arrival order;
//! - the queue never holds more than `max_depth` waiters.
//!
//! The gate is plain data: no clock (callers pass `now`), no locks, no I/O. The
//! waiter type `W` is opaque to it (the async layer in [`crate::gate`] stores a
//! channel there), so every rule here is tested without a runtime.
//!
//! ```
//! use sdgate::gate::Gate;
//! use tokio::time::Instant;
//! let mut gate: Gate<&str> = Gate::new(1, 10);
//! let pod = gate.add_endpoint("127.0.0.1:7860".parse().unwrap());
//! gate.set_ready(pod, true);
//! let first = gate.arrive();
//! let grant = gate.try_dispatch(first).unwrap();          // the pod is free
//! let second = gate.arrive();
//! assert!(gate.try_dispatch(second).is_none());            // one in flight per pod
//! gate.enqueue(second, "second", Instant::now()).unwrap();
//! gate.release(grant.endpoint);
//! assert_eq!(gate.next_grant().unwrap().0, "second");      // FIFO hand-over
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::models::{Holding, ModelId, ModelPolicy, Models, Source, Want};

/// Removed endpoints remembered for the status page.
const MAX_RETIRED: usize = 16;

/// Units of interactive work a batch request yields to, by default.
pub const DEFAULT_BATCH_DELAY: u64 = 20;

/// Identifies an endpoint for as long as the gate knows it; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u64);

/// A request's place in line: taken at arrival, kept across retries, so a
/// request that must be re-dispatched goes back to its own place, not the end.
/// Ordered by its fair-queueing tag, then arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket {
    /// The virtual time it is served at (its start tag, plus the batch
    /// delay for a batch request).
    key: u64,
    /// Arrival order.
    seq: u64,
    /// Its start tag (the virtual time moves to it when it is served).
    start: u64,
}

/// A request's class: interactive requests go first; a batch request waits
/// for at most `batch_delay` units of interactive work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

/// Who sent a request, for fair share: a hash of its key (session, API key
/// or address), never the key itself.
pub type ClientKey = u64;

/// Permission to send one request to one endpoint. The caller must call
/// [`Gate::release`] with `endpoint` exactly once when the pod has finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub endpoint: EndpointId,
    pub addr: SocketAddr,
    /// The checkpoint the request makes the pod load, if any.
    pub load: Option<ModelId>,
    /// Time the exchange, to learn the pod's generation and load times
    /// (the request named a checkpoint).
    pub timed: bool,
    /// The service knows checkpoints: a generation's answer may say what
    /// the pod ran on.
    pub tracked: bool,
}

impl Grant {
    /// A grant that loads nothing and is not timed (requests that skip the gate).
    pub fn plain(endpoint: EndpointId, addr: SocketAddr) -> Self {
        Self { endpoint, addr, load: None, timed: false, tracked: false }
    }
}

/// How a free endpoint is chosen, following Knative's activator (docs/behaviour.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// cc = 1..=3: the first endpoint (in insertion order) with room, so work
    /// packs onto few pods and idle ones can be scaled away.
    FirstAvailable,
    /// cc > 3: the endpoint with the fewest in flight.
    LeastLoaded,
    /// cc = 0 (unlimited): the less loaded of two random endpoints.
    PowerOfTwoChoices,
}

impl Policy {
    pub fn for_capacity(capacity: u32) -> Self {
        match capacity {
            0 => Policy::PowerOfTwoChoices,
            1..=3 => Policy::FirstAvailable,
            _ => Policy::LeastLoaded,
        }
    }
}

/// One pod as the gate sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub id: EndpointId,
    pub addr: SocketAddr,
    /// Passed its readiness probe and may take new requests.
    pub ready: bool,
    /// Being scaled away: takes no new requests, finishes those it holds.
    pub draining: bool,
    /// Exchanges sdgate gave up on while the pod may still be working on
    /// them: no new request until each has passed an idle check.
    pub quarantined: u32,
    /// Exchanges in a row that ended abnormally (timeout, reset); reset by
    /// one answered in full (passive health).
    pub failures: u32,
    /// Requests granted and not yet released.
    pub inflight: u32,
    /// Requests granted over the endpoint's life.
    pub served: u64,
    /// Exchanges that ended abnormally over its life.
    pub failed: u64,
    /// The checkpoint it holds, and its learned timings.
    pub model: Holding,
    /// Since when it has had room while requests waited (for pods that
    /// hold their checkpoints); see [`Gate::note_idle`].
    pub idle_since: Option<Instant>,
    /// Idle so long while requests waited that the first of them it can
    /// take loads its checkpoint here rather than wait on.
    pub overdue: bool,
}

impl Endpoint {
    /// May take new requests.
    pub fn is_serving(&self) -> bool {
        self.ready && !self.draining && self.quarantined == 0
    }
}

/// A session's pod. A strict pin waits for its pod (in that pod's FIFO turn)
/// even while others are idle; a preferring pin takes its pod when it has
/// room and any pod otherwise. A pin to a pod that is gone, not ready or
/// draining is ignored: the session moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pin {
    pub endpoint: EndpointId,
    pub strict: bool,
}

/// Why a waiter could not join the queue.
#[derive(Debug, PartialEq, Eq)]
pub struct QueueFull<W>(pub W);

struct Waiting<W> {
    waiter: W,
    since: Instant,
    pin: Option<Pin>,
    client: Option<ClientKey>,
    priority: Priority,
    /// The checkpoint it wants.
    want: Option<Want>,
    /// Waits for a pod that holds its checkpoint when that is cheaper than
    /// a load (until `max_wait_for_match`, after which it takes any pod).
    patient: bool,
}

/// Where a request may go now.
enum Choice {
    /// This endpoint.
    At(usize),
    /// Wherever the policy picks among those with room.
    Policy,
    /// Nowhere yet: it waits.
    Wait,
}

/// Maps keyed by clients: their keys are hashes under a random seed already,
/// so foldhash (a few instructions) rather than SipHash.
type ClientMap<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

/// The fair-queueing state: the virtual time and each client's next start.
#[derive(Default)]
struct Fairness {
    /// Just past the start tag of the latest request served.
    virtual_time: u64,
    /// Each client's finish tag in each class: where its next request of
    /// that class starts, at the earliest (a client's batch backlog does not
    /// hold back its interactive requests). Entries at or behind the virtual
    /// time say nothing and are pruned.
    finish: ClientMap<(ClientKey, Priority), u64>,
    /// The size `finish` may grow to before it is pruned.
    prune_at: usize,
    /// Waiting requests per client.
    waiting: ClientMap<ClientKey, usize>,
    /// Waiting requests per class (interactive, batch).
    depth: [usize; 2],
    /// Units of interactive work a batch request yields to.
    batch_delay: u64,
}

impl Fairness {
    /// A new request's start tag: its client's finish tag, or the virtual
    /// time if that is later. With nobody waiting every finish tag is at or
    /// behind the virtual time (a served request moves it past its own), so
    /// the tag is the virtual time and the table is left alone until the
    /// request has to wait ([`Fairness::started`]): the common case costs
    /// no lookup.
    fn start(&mut self, client: Option<ClientKey>, priority: Priority, anyone_waiting: bool) -> u64 {
        match client {
            Some(client) if anyone_waiting => {
                let start = self.finish.get(&(client, priority)).map_or(0, |finish| *finish).max(self.virtual_time);
                self.started(client, priority, start);
                start
            }
            _ => self.virtual_time,
        }
    }

    /// Records that `client` has a request of `priority` starting at
    /// `start`: its next one starts after it.
    fn started(&mut self, client: ClientKey, priority: Priority, start: u64) {
        if self.finish.len() >= self.prune_at {
            let now = self.virtual_time;
            self.finish.retain(|_, finish| *finish > now);
            self.prune_at = (self.finish.len() * 2).max(1024);
        }
        let finish = self.finish.entry((client, priority)).or_insert(0);
        *finish = (*finish).max(start + 1);
    }

    /// The virtual time moves past the start of each request served, so a
    /// newcomer starts behind those already waiting at the same tag and a
    /// client that has nothing waiting falls behind (and is forgotten).
    fn served(&mut self, ticket: Ticket) {
        self.virtual_time = self.virtual_time.max(ticket.start + 1);
    }

    fn joined(&mut self, client: Option<ClientKey>, priority: Priority) {
        if let Some(client) = client {
            *self.waiting.entry(client).or_default() += 1;
        }
        self.depth[priority as usize] += 1;
    }

    fn left(&mut self, client: Option<ClientKey>, priority: Priority) {
        if let Some(client) = client {
            if let Some(count) = self.waiting.get_mut(&client) {
                *count -= 1;
                if *count == 0 {
                    self.waiting.remove(&client);
                }
            }
        }
        self.depth[priority as usize] = self.depth[priority as usize].saturating_sub(1);
    }
}

pub struct Gate<W> {
    capacity: u32,
    policy: Policy,
    max_depth: usize,
    endpoints: Vec<Endpoint>,
    /// The latest endpoints removed (scaled away, gone), newest last, one
    /// per address: what they did stays visible after a scale to zero.
    retired: VecDeque<Endpoint>,
    queue: BTreeMap<Ticket, Waiting<W>>,
    next_ticket: u64,
    next_endpoint: u64,
    rng: fastrand::Rng,
    fairness: Fairness,
    /// Checkpoint names, and requests waiting per checkpoint.
    models: Models,
    model_policy: ModelPolicy,
    /// Waiters per checkpoint met so far in a pass over the queue (kept to
    /// reuse its memory).
    ahead: Vec<usize>,
    /// Some endpoint has `idle_since` set.
    idle_noted: bool,
}

impl<W> Gate<W> {
    /// `capacity` is `container_concurrency` (0 = unlimited); `max_depth`
    /// bounds the wait queue.
    pub fn new(capacity: u32, max_depth: usize) -> Self {
        Self {
            capacity,
            policy: Policy::for_capacity(capacity),
            max_depth,
            endpoints: Vec::new(),
            retired: VecDeque::new(),
            queue: BTreeMap::new(),
            next_ticket: 0,
            next_endpoint: 0,
            rng: fastrand::Rng::with_seed(0x5d_6a7e),
            fairness: Fairness { prune_at: 1024, batch_delay: DEFAULT_BATCH_DELAY, ..Fairness::default() },
            models: Models::default(),
            model_policy: ModelPolicy::default(),
            ahead: Vec::new(),
            idle_noted: false,
        }
    }

    /// Whether and how dispatch weighs checkpoints.
    pub fn set_model_policy(&mut self, policy: ModelPolicy) {
        self.model_policy = policy;
    }

    /// The id of a checkpoint name a request gives (normalised by the
    /// caller); None when the service's table of names is full of names
    /// in use (see `models`).
    pub fn checkpoint(&mut self, name: &str) -> Option<ModelId> {
        self.intern(name, Source::Client)
    }

    /// Whether a pod has reported `id` as what it holds or is set to.
    pub fn checkpoint_reported(&self, id: ModelId) -> bool {
        self.models.is_reported(id)
    }

    fn intern(&mut self, name: &str, source: Source) -> Option<ModelId> {
        let endpoints = &self.endpoints;
        let id = self.models.intern(name, source, |id| {
            endpoints.iter().any(|e| e.model.holds == Some(id) || e.model.setting == Some(id))
        })?;
        // Asked for now: the last to be forgotten while its request goes on
        // to queue (it is counted as waiting under a later lock).
        if self.models.last_asked(Some(id)) == 0 {
            self.models.asked(id, self.next_ticket.max(1));
        }
        Some(id)
    }

    pub fn checkpoint_name(&self, id: ModelId) -> &str {
        self.models.name(id)
    }

    /// Each checkpoint with requests waiting for it.
    pub fn checkpoint_demand(&self) -> impl Iterator<Item = (&str, usize)> {
        self.models.demand()
    }

    /// Whether any request or pod has named a checkpoint.
    pub fn knows_checkpoints(&self) -> bool {
        !self.models.is_empty()
    }

    /// What a pod says it is set to (`sd_model_checkpoint`, asked when it
    /// became ready): its setting, and what it holds unless sdgate has
    /// already sent it another.
    pub fn set_checkpoint(&mut self, id: EndpointId, name: &str) {
        let Some(model) = self.intern(name, Source::Pod) else { return };
        // A new pod's checkpoint counts as in use for a while: its clients
        // may not have come yet.
        if self.models.last_asked(Some(model)) < self.next_ticket.max(1) {
            self.models.asked(model, self.next_ticket.max(1));
        }
        if let Some(endpoint) = self.endpoint_mut(id) {
            endpoint.model.setting = Some(model);
            endpoint.model.holds = endpoint.model.holds.or(Some(model));
        }
    }

    /// What a pod's answer says it holds now (the WebUI's
    /// `info.sd_model_name`): corrects what sdgate assumed it loaded.
    pub fn set_held(&mut self, id: EndpointId, name: &str) -> Option<ModelId> {
        let model = self.intern(name, Source::Pod)?;
        if let Some(endpoint) = self.endpoint_mut(id) {
            endpoint.model.holds = Some(model);
        }
        Some(model)
    }

    /// An answer in full from `id`, `took` from grant to end, that loaded a
    /// checkpoint or not: the pod's generation and load times learn from it.
    pub fn learn(&mut self, id: EndpointId, took: Duration, loaded: bool) {
        if let Some(endpoint) = self.endpoint_mut(id) {
            endpoint.model.learn(took, loaded);
        }
    }

    /// A waiter has waited `max_wait_for_match`: from now on it takes any
    /// pod with room. False if it is no longer waiting.
    pub fn lose_patience(&mut self, ticket: Ticket) -> bool {
        self.queue.get_mut(&ticket).map(|w| w.patient = false).is_some()
    }

    /// How many units of interactive work a batch request yields to.
    pub fn set_batch_delay(&mut self, units: u64) {
        self.fairness.batch_delay = units;
    }

    /// New limits (a reload): requests an endpoint may hold and the queue's
    /// depth. Requests above a lowered capacity finish; waiters above a
    /// lowered depth keep their place.
    pub fn set_limits(&mut self, capacity: u32, max_depth: usize) {
        self.capacity = capacity;
        self.policy = Policy::for_capacity(capacity);
        self.max_depth = max_depth;
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Takes a place in line for a new request, in strict arrival order
    /// with every other request taken so.
    pub fn arrive(&mut self) -> Ticket {
        self.arrive_from(None, Priority::Interactive)
    }

    /// Takes a place in line for a new request of `client` (none: a client
    /// of its own) in class `priority`: after the client's own earlier
    /// requests, and about one request of each other waiting client.
    pub fn arrive_from(&mut self, client: Option<ClientKey>, priority: Priority) -> Ticket {
        self.next_ticket += 1;
        let start = self.fairness.start(client, priority, !self.queue.is_empty());
        let key = match priority {
            Priority::Interactive => start,
            Priority::Batch => start.saturating_add(self.fairness.batch_delay),
        };
        Ticket { key, seq: self.next_ticket, start }
    }

    /// Grants an endpoint at once if one has room and nobody who arrived
    /// earlier is waiting (FIFO: a newcomer never overtakes the queue).
    pub fn try_dispatch(&mut self, ticket: Ticket) -> Option<Grant> {
        self.try_dispatch_pinned(ticket, None)
    }

    /// [`Gate::try_dispatch`] for a request that may be pinned to a pod: it
    /// is granted a pod that has room and that no earlier waiter could take
    /// (waiters strictly pinned elsewhere do not hold it back).
    pub fn try_dispatch_pinned(&mut self, ticket: Ticket, pin: Option<Pin>) -> Option<Grant> {
        self.try_dispatch_for(ticket, pin, None, true)
    }

    /// [`Gate::try_dispatch_pinned`] for a request that wants a checkpoint:
    /// a pod that holds it, else (unless it is `patient` and waiting for one
    /// that holds it is cheaper than a load) the pod whose checkpoint the
    /// queue wants least.
    pub fn try_dispatch_for(
        &mut self,
        ticket: Ticket,
        pin: Option<Pin>,
        want: Option<Want>,
        patient: bool,
    ) -> Option<Grant> {
        let choice = match (pin, want) {
            // The common case: no pin, no checkpoint.
            (None, None) => Choice::Policy,
            (_, None) => self.choose(pin, None, patient, 0),
            (_, Some(want)) => {
                self.models.asked(want.model, ticket.seq);
                self.choose(pin, Some(want), patient, self.models.waiting_for(Some(want.model)))
            }
        };
        let index = match choice {
            Choice::At(index) => index,
            Choice::Policy => self.pick()?,
            Choice::Wait => return None,
        };
        let endpoint = self.endpoints[index].id;
        if self.queue.range(..ticket).any(|(_, w)| self.could_take(w, endpoint)) {
            return None;
        }
        self.fairness.served(ticket);
        Some(self.grant(index, want))
    }

    /// Puts a waiter in line at its ticket's place. Refused when the queue
    /// is full; the waiter comes back so the caller can answer it.
    pub fn enqueue(&mut self, ticket: Ticket, waiter: W, now: Instant) -> Result<(), QueueFull<W>> {
        self.enqueue_pinned(ticket, None, waiter, now)
    }

    /// [`Gate::enqueue`] for a request that may be pinned to a pod.
    pub fn enqueue_pinned(
        &mut self,
        ticket: Ticket,
        pin: Option<Pin>,
        waiter: W,
        now: Instant,
    ) -> Result<(), QueueFull<W>> {
        self.enqueue_from(ticket, pin, None, Priority::Interactive, waiter, now)
    }

    /// [`Gate::enqueue_pinned`] for a request of `client`, in class
    /// `priority` (counted for [`Gate::waiting_clients`] and
    /// [`Gate::depth_of`]).
    pub fn enqueue_from(
        &mut self,
        ticket: Ticket,
        pin: Option<Pin>,
        client: Option<ClientKey>,
        priority: Priority,
        waiter: W,
        now: Instant,
    ) -> Result<(), QueueFull<W>> {
        let request = Queued { pin, client, priority, want: None, patient: true };
        self.enqueue_request(ticket, request, waiter, now)
    }

    /// Puts a request in line at its ticket's place (see [`Queued`]).
    pub fn enqueue_request(
        &mut self,
        ticket: Ticket,
        request: Queued,
        waiter: W,
        now: Instant,
    ) -> Result<(), QueueFull<W>> {
        if self.queue.len() >= self.max_depth {
            return Err(QueueFull(waiter));
        }
        let Queued { pin, client, priority, want, patient } = request;
        let waiting = Waiting { waiter, since: now, pin, client, priority, want, patient };
        if let Some(old) = self.queue.insert(ticket, waiting) {
            self.fairness.left(old.client, old.priority);
            self.models.left(old.want);
        }
        self.fairness.joined(client, priority);
        self.models.joined(want);
        if let Some(client) = client {
            self.fairness.started(client, priority, ticket.start);
        }
        Ok(())
    }

    /// Requests `client` has waiting.
    pub fn waiting_of(&self, client: ClientKey) -> usize {
        self.fairness.waiting.get(&client).copied().unwrap_or(0)
    }

    /// Clients with requests waiting (those that named one).
    pub fn waiting_clients(&self) -> usize {
        self.fairness.waiting.len()
    }

    /// Requests of class `priority` waiting.
    pub fn depth_of(&self, priority: Priority) -> usize {
        self.fairness.depth[priority as usize]
    }

    /// How many waiters are ahead of `ticket` in line; None when it is not
    /// waiting.
    pub fn position(&self, ticket: Ticket) -> Option<usize> {
        self.queue.contains_key(&ticket).then(|| self.queue.range(..ticket).count())
    }

    /// Removes a waiter that gave up (timeout, client gone). `None` if it is
    /// no longer queued, i.e. it was granted an endpoint already.
    pub fn cancel(&mut self, ticket: Ticket) -> Option<W> {
        let waiting = self.queue.remove(&ticket)?;
        self.fairness.left(waiting.client, waiting.priority);
        self.models.left(waiting.want);
        Some(waiting.waiter)
    }

    /// Hands the first waiter an endpoint, if one has room. Call until `None`
    /// after anything that frees room (release, an endpoint becoming ready).
    pub fn next_grant(&mut self) -> Option<(W, Grant)> {
        if self.queue.is_empty() || !self.endpoints.iter().any(|e| self.has_room(e)) {
            return None;
        }
        // The first waiter that some pod with room can take: usually the
        // head of the line; behind strictly pinned waiters whose pods are
        // busy, or waiters for a busy pod that holds their checkpoint,
        // someone else.
        let mut ahead = std::mem::take(&mut self.ahead);
        ahead.clear();
        ahead.resize(self.models.waiting.len(), 0);
        let mut found = None;
        for (&ticket, waiting) in &self.queue {
            let slot = waiting.want.map(|w| w.model.index());
            let before = slot.map_or(0, |i| ahead[i]);
            match self.choose(waiting.pin, waiting.want, waiting.patient, before) {
                Choice::Wait => {
                    if let Some(i) = slot {
                        ahead[i] += 1;
                    }
                }
                choice => {
                    found = Some((ticket, choice));
                    break;
                }
            }
        }
        self.ahead = ahead;
        let (ticket, choice) = found?;
        let index = match choice {
            Choice::At(index) => index,
            Choice::Policy => self.pick()?,
            Choice::Wait => return None,
        };
        let waiting = self.queue.remove(&ticket)?;
        self.fairness.left(waiting.client, waiting.priority);
        self.models.left(waiting.want);
        self.fairness.served(ticket);
        Some((waiting.waiter, self.grant(index, waiting.want)))
    }

    /// After [`Gate::next_grant`] has run out: times the spell of each pod
    /// with room while requests wait (for busy pods that hold their
    /// checkpoints, or strictly pinned elsewhere). A pod idle for its
    /// bound (`checkpoints.max_pod_idle`: `max_wait_for_match`, a duration,
    /// or its load's time) becomes overdue: the first waiter it can take
    /// loads there. Returns
    /// whether a pod became overdue now (the caller hands out again), and
    /// when the next spell reaches its bound (the caller calls again then),
    /// None if no pod idles while requests wait. `now` is read only when
    /// requests wait or a spell was under way.
    pub fn note_idle(&mut self, now: impl FnOnce() -> Instant) -> (bool, Option<Instant>) {
        if self.queue.is_empty() && !self.idle_noted {
            return (false, None);
        }
        let now = now();
        let waiting = !self.queue.is_empty();
        let (policy, capacity) = (self.model_policy, self.capacity);
        let (mut next, mut became_overdue): (Option<Instant>, bool) = (None, false);
        self.idle_noted = false;
        for endpoint in &mut self.endpoints {
            let room = endpoint.is_serving() && (capacity == 0 || endpoint.inflight < capacity);
            if !(waiting && room) {
                endpoint.idle_since = None;
                endpoint.overdue = false;
                continue;
            }
            self.idle_noted = true;
            let due = *endpoint.idle_since.get_or_insert(now) + endpoint.model.max_idle(&policy);
            if due <= now {
                became_overdue |= !endpoint.overdue;
                endpoint.overdue = true;
            } else {
                next = Some(next.map_or(due, |next| next.min(due)));
            }
        }
        (became_overdue, next)
    }

    /// The pod has finished one request. Releasing on an endpoint that was
    /// removed meanwhile is a no-op.
    pub fn release(&mut self, id: EndpointId) {
        if let Some(endpoint) = self.endpoint_mut(id) {
            endpoint.inflight = endpoint.inflight.saturating_sub(1);
        }
    }

    /// A new endpoint starts not ready: it takes requests only once a probe
    /// has said so.
    pub fn add_endpoint(&mut self, addr: SocketAddr) -> EndpointId {
        self.next_endpoint += 1;
        let id = EndpointId(self.next_endpoint);
        self.endpoints.push(Endpoint {
            id,
            addr,
            ready: false,
            draining: false,
            quarantined: 0,
            failures: 0,
            inflight: 0,
            served: 0,
            failed: 0,
            model: Holding::default(),
            idle_since: None,
            overdue: false,
        });
        id
    }

    /// Returns whether the state changed. A pod that stops being ready may
    /// come back restarted: what it held is forgotten (it is asked again).
    pub fn set_ready(&mut self, id: EndpointId, ready: bool) -> bool {
        match self.endpoint_mut(id) {
            Some(endpoint) if endpoint.ready != ready => {
                endpoint.ready = ready;
                if !ready {
                    endpoint.model.holds = None;
                    endpoint.model.setting = None;
                }
                true
            }
            _ => false,
        }
    }

    /// What a pod holds is no longer known (an answer that failed after a
    /// load was assumed).
    pub fn forget_held(&mut self, id: EndpointId) {
        if let Some(endpoint) = self.endpoint_mut(id) {
            endpoint.model.holds = None;
        }
    }

    /// Stops giving an endpoint new requests, for good (scale-down).
    pub fn set_draining(&mut self, id: EndpointId) {
        if let Some(endpoint) = self.endpoint_mut(id) {
            endpoint.draining = true;
        }
    }

    /// The pod answered in full: releases like [`Gate::release`] and ends a
    /// run of failures.
    pub fn release_answered(&mut self, id: EndpointId) {
        if let Some(endpoint) = self.endpoint_mut(id) {
            endpoint.inflight = endpoint.inflight.saturating_sub(1);
            endpoint.failures = 0;
        }
    }

    /// One more exchange in a row ended abnormally; returns how many.
    pub fn record_failure(&mut self, id: EndpointId) -> u32 {
        self.endpoint_mut(id).map_or(0, |endpoint| {
            endpoint.failures += 1;
            endpoint.failed += 1;
            endpoint.failures
        })
    }

    /// Puts an endpoint in quarantine (`true`) or lets one quarantined
    /// exchange out (`false`); it serves again once none is left.
    pub fn quarantine(&mut self, id: EndpointId, on: bool) {
        if let Some(endpoint) = self.endpoint_mut(id) {
            endpoint.quarantined = if on { endpoint.quarantined + 1 } else { endpoint.quarantined.saturating_sub(1) };
        }
    }

    /// Takes a drained endpoint back (a scale-down that was called off).
    pub fn undrain(&mut self, id: EndpointId) {
        if let Some(endpoint) = self.endpoint_mut(id) {
            endpoint.draining = false;
        }
    }

    /// Forgets an endpoint. Its outstanding grants release as no-ops.
    pub fn remove_endpoint(&mut self, id: EndpointId) -> Option<Endpoint> {
        let index = self.endpoints.iter().position(|e| e.id == id)?;
        let removed = self.endpoints.remove(index);
        self.retired.retain(|e| e.addr != removed.addr);
        if self.retired.len() == MAX_RETIRED {
            self.retired.pop_front();
        }
        self.retired.push_back(removed.clone());
        Some(removed)
    }

    /// The latest removed endpoints (at most 16, one per address), oldest
    /// first, as they were when removed.
    pub fn retired(&self) -> impl Iterator<Item = &Endpoint> {
        self.retired.iter()
    }

    /// Any ready endpoint, for requests that skip the gate (`bypass`); the
    /// least loaded one, so cheap calls avoid busy pods when they can.
    pub fn any_ready(&self) -> Option<Grant> {
        self.endpoints.iter().filter(|e| e.is_serving()).min_by_key(|e| e.inflight).map(|e| Grant::plain(e.id, e.addr))
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub fn endpoint(&self, id: EndpointId) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.id == id)
    }

    /// Requests that have arrived so far (tickets handed out).
    pub fn arrivals(&self) -> u64 {
        self.next_ticket
    }

    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// Requests granted and not yet released, over all endpoints.
    pub fn inflight(&self) -> u32 {
        self.endpoints.iter().map(|e| e.inflight).sum()
    }

    /// Endpoints that may take new requests (ready and not draining).
    pub fn ready_count(&self) -> usize {
        self.endpoints.iter().filter(|e| e.is_serving()).count()
    }

    /// How long the longest-waiting request has waited. (Not simply the
    /// first in line: a retried request goes back to its old place with a
    /// fresh wait.) Linear in the queue; for status pages, not the hot path.
    pub fn oldest_wait(&self, now: Instant) -> Option<Duration> {
        self.queue.values().map(|w| w.since).min().map(|since| now.saturating_duration_since(since))
    }

    fn endpoint_mut(&mut self, id: EndpointId) -> Option<&mut Endpoint> {
        self.endpoints.iter_mut().find(|e| e.id == id)
    }

    fn has_room(&self, endpoint: &Endpoint) -> bool {
        endpoint.is_serving() && (self.capacity == 0 || endpoint.inflight < self.capacity)
    }

    fn grant(&mut self, index: usize, want: Option<Want>) -> Grant {
        // Only requests that name a checkpoint are timed: their answers
        // (generations, not streams or tunnels) teach the pod's times.
        let timed = want.is_some();
        let endpoint = &mut self.endpoints[index];
        endpoint.inflight += 1;
        endpoint.served += 1;
        endpoint.idle_since = None;
        endpoint.overdue = false;
        let tracked = !self.models.is_empty();
        let load = endpoint.model.take(want);
        Grant { endpoint: endpoint.id, addr: endpoint.addr, load, timed, tracked }
    }

    /// Whether the pin names a pod that may take requests (else it is moot).
    fn pin_holds(&self, pin: Option<Pin>) -> Option<Pin> {
        pin.filter(|p| self.endpoint(p.endpoint).is_some_and(Endpoint::is_serving))
    }

    /// Whether a waiter could be given `endpoint` (it is not held back by
    /// a strict pin elsewhere, or by waiting for a pod holding its checkpoint).
    fn could_take(&self, waiting: &Waiting<W>, endpoint: EndpointId) -> bool {
        match self.pin_holds(waiting.pin) {
            Some(pin) if pin.strict => return pin.endpoint == endpoint,
            Some(pin) if pin.endpoint == endpoint => return true,
            _ => {}
        }
        match waiting.want {
            Some(want) if waiting.patient && self.model_policy.aware => {
                let holds = |e: &Endpoint| e.model.holds == Some(want.model);
                self.endpoint(endpoint).is_some_and(|e| holds(e) || e.overdue)
                    || !self.endpoints.iter().any(|e| e.is_serving() && holds(e))
            }
            _ => true,
        }
    }

    /// Where a request with this pin, wanting this checkpoint, goes now;
    /// `ahead` waiters for the same checkpoint are before it in line.
    ///
    /// Pins win. A request that names no checkpoint (or a blind gate) takes
    /// what the policy picks. One that names one takes a pod with room that
    /// holds it; else, when a busy pod holds it and the expected wait for
    /// that pod is shorter than a load (and it is `patient`), it waits;
    /// else it takes the pod with room whose checkpoint the queue wants
    /// least (ties: one whose checkpoint another pod also holds, then the
    /// least recently asked for, then the policy's order).
    fn choose(&self, pin: Option<Pin>, want: Option<Want>, patient: bool, ahead: usize) -> Choice {
        if let Some(pin) = self.pin_holds(pin) {
            if let Some(index) = self.endpoints.iter().position(|e| e.id == pin.endpoint && self.has_room(e)) {
                return Choice::At(index);
            }
            if pin.strict {
                return Choice::Wait;
            }
        }
        // The policy's pick (none when no pod has room: the caller waits).
        let Some(want) = want.filter(|_| self.model_policy.aware) else { return Choice::Policy };
        let by_load = self.policy != Policy::FirstAvailable;
        let mut matching = 0;
        let mut matched: Option<(u32, usize)> = None;
        let mut switch: Option<((usize, usize, u64, u32), usize)> = None;
        let mut overdue: Option<((usize, usize, u64, u32), usize)> = None;
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            if !endpoint.is_serving() {
                continue;
            }
            let holds = endpoint.model.holds == Some(want.model);
            matching += usize::from(holds);
            if !self.has_room(endpoint) {
                continue;
            }
            let load = if by_load { endpoint.inflight } else { 0 };
            if holds {
                if matched.is_none_or(|(best, _)| load < best) {
                    matched = Some((load, index));
                }
            } else {
                // Least wanted by the queue; then a checkpoint another pod
                // also holds before the only copy; then the least recently
                // asked for; then the policy's order.
                let held = endpoint.model.holds;
                let sole = held.is_some()
                    && !self.endpoints.iter().any(|e| e.id != endpoint.id && e.is_serving() && e.model.holds == held);
                let key = (self.models.waiting_for(held), usize::from(sole), self.models.last_asked(held), load);
                if switch.is_none_or(|(best, _)| key < best) {
                    switch = Some((key, index));
                }
                if endpoint.overdue && overdue.is_none_or(|(best, _)| key < best) {
                    overdue = Some((key, index));
                }
            }
        }
        if let Some((_, index)) = matched {
            return Choice::At(index);
        }
        let Some((_, index)) = switch else { return Choice::Wait };
        if patient && matching > 0 && self.in_use(index) && self.worth_waiting(want.model, ahead, matching, index) {
            // A pod idle too long while requests wait takes this one.
            return overdue.map_or(Choice::Wait, |(_, index)| Choice::At(index));
        }
        Choice::At(index)
    }

    /// Whether the checkpoint the endpoint at `index` holds is in use: known,
    /// and asked for among the latest arrivals (eight per slot of the pods
    /// serving, at least 16; a pod's checkpoint counts as asked for when the
    /// pod said it holds it). A pod holding one nobody asks for any more
    /// (or one not known) is not worth keeping idle: a request loads there
    /// rather than wait, and the next ones find it loaded.
    fn in_use(&self, index: usize) -> bool {
        let held = self.endpoints[index].model.holds;
        let slots = self.endpoints.iter().filter(|e| e.is_serving()).count() * self.capacity.max(1) as usize;
        let window = (8 * slots).max(16) as u64;
        let asked = self.models.last_asked(held);
        held.is_some() && asked > 0 && self.next_ticket.saturating_sub(asked) <= window
    }

    /// Whether a request for `model`, with `ahead` others for it before it,
    /// should wait for one of the `matching` pods that hold it rather than
    /// make the pod at `switch` load it: its expected wait (its turn among
    /// their slots, at their mean generation time) is shorter than that
    /// pod's load time. Before a generation time is known: when it would be
    /// next on one of them.
    fn worth_waiting(&self, model: ModelId, ahead: usize, matching: usize, switch: usize) -> bool {
        let slots = matching * self.capacity.max(1) as usize;
        let (mut sum, mut known) = (Duration::ZERO, 0u32);
        for endpoint in &self.endpoints {
            if let (true, Some(generation)) =
                (endpoint.is_serving() && endpoint.model.holds == Some(model), endpoint.model.generation)
            {
                sum += generation;
                known += 1;
            }
        }
        if known == 0 {
            return ahead < slots;
        }
        let expected = (sum / known).mul_f64((ahead + 1) as f64 / slots as f64);
        expected < self.endpoints[switch].model.switch_cost(&self.model_policy)
    }

    /// Index of the endpoint the policy chooses, among those with room.
    fn pick(&mut self) -> Option<usize> {
        match self.policy {
            Policy::FirstAvailable => self.endpoints.iter().position(|e| self.has_room(e)),
            Policy::LeastLoaded => self
                .endpoints
                .iter()
                .enumerate()
                .filter(|(_, e)| self.has_room(e))
                .min_by_key(|(_, e)| e.inflight)
                .map(|(i, _)| i),
            Policy::PowerOfTwoChoices => self.pick_two_random(),
        }
    }

    fn pick_two_random(&mut self) -> Option<usize> {
        let ready = self.ready_count();
        let nth_ready = |endpoints: &[Endpoint], n: usize| {
            endpoints.iter().enumerate().filter(|(_, e)| e.is_serving()).nth(n).map(|(i, _)| i)
        };
        match ready {
            0 => None,
            1 => nth_ready(&self.endpoints, 0),
            _ => {
                let a = self.rng.usize(..ready);
                let mut b = self.rng.usize(..ready - 1);
                if b >= a {
                    b += 1;
                }
                let a = nth_ready(&self.endpoints, a)?;
                let b = nth_ready(&self.endpoints, b)?;
                if self.endpoints[b].inflight < self.endpoints[a].inflight {
                    Some(b)
                } else {
                    Some(a)
                }
            }
        }
    }
}

/// What a request brings to the queue besides its waiter.
#[derive(Clone, Copy, Debug, Default)]
pub struct Queued {
    pub pin: Option<Pin>,
    pub client: Option<ClientKey>,
    pub priority: Priority,
    pub want: Option<Want>,
    /// See [`Gate::lose_patience`].
    pub patient: bool,
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
