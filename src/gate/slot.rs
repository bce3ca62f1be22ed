//! The [`Slot`]: the right to have one request on one pod.
//!
//! It is returned by `Drop`, never by remembering to call a release function
//! (tower's `ConcurrencyLimit` permit, but owned by the upstream exchange
//! rather than the client's future, because the pod stays busy after a client
//! leaves).

use std::net::SocketAddr;
use std::sync::Arc;

use super::core::{EndpointId, Grant};
use super::jobs::Running;
use super::shell::SharedGate;

/// The right to have one request on one pod; dropping it frees the room.
/// What a slot keeps until it is freed (a caller's meter): told what the
/// pod's answer reports.
pub trait Held: Send + Sync {
    fn generated(&self, images: u32);
}

pub struct Slot {
    gate: Arc<SharedGate>,
    grant: Grant,
    pub(super) armed: bool,
    /// The pod answered in full (ends a run of failures on release).
    answered: bool,
    /// Whose job this is, known for as long as the pod holds it (boxed: a
    /// slot is moved along the whole exchange, and most have no session).
    job: Option<Box<Running>>,
    /// Whatever must last as long as the pod holds the slot (a caller's
    /// meter of pod time).
    held: Option<Box<dyn Held>>,
}

impl Slot {
    pub(super) fn new(gate: Arc<SharedGate>, grant: Grant) -> Self {
        Self { gate, grant, armed: true, answered: false, job: None, held: None }
    }

    /// A slot-less stand-in for requests that skip the gate.
    pub fn bypass(gate: Arc<SharedGate>, grant: Grant) -> Self {
        Self { gate, grant, armed: false, answered: false, job: None, held: None }
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

    /// Records whose job the slot holds, until the pod is done with it.
    pub fn own(&mut self, job: Running) {
        self.job = Some(Box::new(job));
    }

    /// Keeps `guard` until the slot is freed (dropped after the release).
    pub fn hold(&mut self, guard: Box<dyn Held>) {
        self.held = Some(guard);
    }

    /// Whether the pod loads a checkpoint for this request.
    pub fn loads(&self) -> bool {
        self.grant.load.is_some()
    }

    /// Whether something keeps count of what this slot's request made (a
    /// caller's meter): an answer is read for it only then.
    pub fn is_metered(&self) -> bool {
        self.held.is_some()
    }

    /// The pod's answer says it made `images` images.
    pub fn generated(&self, images: u32) {
        if let Some(held) = &self.held {
            held.generated(images);
        }
    }

    /// A timed request's answer in full (see [`Grant::timed`]), `took`
    /// after it was sent, and the checkpoint it says it ran on: the gate
    /// takes that as what the pod holds, and learns the pod's generation or
    /// load time (a load that did not happen, the pod keeping its own, is
    /// not learned as one).
    pub fn learn(&self, ran_on: Option<&str>, took: std::time::Duration) {
        let endpoint = self.grant.endpoint;
        let held = ran_on.and_then(|name| self.gate.set_held(endpoint, name));
        let loaded = self.grant.load.is_some() && (held.is_none() || held == self.grant.load);
        self.gate.learn(endpoint, took, loaded);
    }

    /// A request that named no checkpoint was answered: if it was a
    /// generation, its answer says what the pod ran on (the WebUI may have
    /// loaded its setting back).
    pub fn ran_on(&self, checkpoint: &str) {
        self.gate.set_held(self.grant.endpoint, checkpoint);
    }

    /// A timed request failed (an error answer): whether the pod loaded
    /// what it was sent is not known any more.
    pub fn failed(&self) {
        if self.grant.load.is_some() {
            self.gate.forget_held(self.grant.endpoint);
        }
    }

    /// The service knows checkpoints (see [`Grant::tracked`]).
    pub fn is_tracked(&self) -> bool {
        self.grant.tracked
    }

    /// Its request named a checkpoint (see [`Grant::timed`]).
    pub fn is_timed(&self) -> bool {
        self.grant.timed
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
