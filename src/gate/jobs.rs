//! Whose job runs where: the sessions with a request on each pod, and the
//! sessions with a request waiting.
//!
//! Paths that act on or reveal a pod's current job (interrupt, skip,
//! progress) reach a pod only for a session whose request is in flight
//! there; this table answers "where does this session's job run?". An entry
//! lives exactly as long as its [`Running`] guard, which the request's
//! [`super::Slot`] carries: it ends when the pod is done (answered, or out
//! of quarantine), not when the client leaves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::core::{EndpointId, Ticket};
use super::pins::SessionId;
use crate::error::lock;

/// The jobs of one service's sessions.
#[derive(Default)]
pub struct Jobs {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    /// Session -> the pods its requests are on (one entry per request).
    running: HashMap<SessionId, Vec<EndpointId>>,
    /// Session -> the tickets of its waiting requests.
    waiting: HashMap<SessionId, Vec<Ticket>>,
}

impl Jobs {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Records that `session`'s request runs on `endpoint` until the guard drops.
    pub fn run(self: &Arc<Self>, session: SessionId, endpoint: EndpointId) -> Running {
        lock(&self.table).running.entry(session).or_default().push(endpoint);
        Running { jobs: self.clone(), session, endpoint }
    }

    /// Records that `session`'s request waits at `ticket` until the guard drops.
    pub fn wait(self: &Arc<Self>, session: SessionId, ticket: Ticket) -> Waiting {
        lock(&self.table).waiting.entry(session).or_default().push(ticket);
        Waiting { jobs: self.clone(), session, ticket }
    }

    /// The pod `session`'s most recent running request is on.
    pub fn running_on(&self, session: &SessionId) -> Option<EndpointId> {
        lock(&self.table).running.get(session).and_then(|pods| pods.last().copied())
    }

    /// The earliest ticket of `session`'s waiting requests.
    pub fn waiting_at(&self, session: &SessionId) -> Option<Ticket> {
        lock(&self.table).waiting.get(session).and_then(|tickets| tickets.iter().min().copied())
    }

    /// Sessions with a request on `endpoint`.
    pub fn sessions_on(&self, endpoint: EndpointId) -> usize {
        lock(&self.table).running.values().filter(|pods| pods.contains(&endpoint)).count()
    }
}

/// A session's request on a pod; dropping it ends the record.
pub struct Running {
    jobs: Arc<Jobs>,
    session: SessionId,
    endpoint: EndpointId,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut table = lock(&self.jobs.table);
        if let Some(pods) = table.running.get_mut(&self.session) {
            if let Some(at) = pods.iter().position(|e| *e == self.endpoint) {
                pods.swap_remove(at);
            }
            if pods.is_empty() {
                table.running.remove(&self.session);
            }
        }
    }
}

/// A session's request waiting in line; dropping it ends the record.
pub struct Waiting {
    jobs: Arc<Jobs>,
    session: SessionId,
    ticket: Ticket,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut table = lock(&self.jobs.table);
        if let Some(tickets) = table.waiting.get_mut(&self.session) {
            tickets.retain(|t| *t != self.ticket);
            if tickets.is_empty() {
                table.waiting.remove(&self.session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_known_while_its_guard_lives() {
        let jobs = Jobs::new();
        let (alice, bob) = ([1; 16], [2; 16]);
        let running = jobs.run(alice, EndpointId(3));
        assert_eq!(jobs.running_on(&alice), Some(EndpointId(3)));
        assert_eq!(jobs.running_on(&bob), None);
        assert_eq!(jobs.sessions_on(EndpointId(3)), 1);
        let second = jobs.run(alice, EndpointId(4));
        assert_eq!(jobs.running_on(&alice), Some(EndpointId(4)));
        drop(second);
        assert_eq!(jobs.running_on(&alice), Some(EndpointId(3)));
        drop(running);
        assert_eq!(jobs.running_on(&alice), None);
        assert!(lock(&jobs.table).running.is_empty());
    }

    #[test]
    fn a_wait_is_known_while_its_guard_lives() {
        let jobs = Jobs::new();
        let mut gate: super::super::Gate<()> = super::super::Gate::new(1, 10);
        let (first, second) = (gate.arrive(), gate.arrive());
        let late = jobs.wait([1; 16], second);
        let early = jobs.wait([1; 16], first);
        assert_eq!(jobs.waiting_at(&[1; 16]), Some(first));
        drop(early);
        assert_eq!(jobs.waiting_at(&[1; 16]), Some(second));
        drop(late);
        assert_eq!(jobs.waiting_at(&[1; 16]), None);
        assert!(lock(&jobs.table).waiting.is_empty());
    }
}
