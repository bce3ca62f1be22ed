//! Routes: a host's requests split across services (revisions of a model)
//! by weight, with sessions kept on the revision they started on.
//!
//! A request that presents a session (the `sd` cookie, or the session
//! header) that one of the split's services holds in its pin table goes to
//! that service, whatever its weight, 0 included: users mid-session are not
//! moved to another model. Any other request picks a service at random in
//! proportion to the weights. A service's own `hosts` are a route of one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

use http::HeaderMap;
use prometheus::IntCounter;

use crate::error::ProxyError;
use crate::gate::Priority;
use crate::proxy::affinity::Presented;
use crate::proxy::Service;

/// One route: its name and its split.
pub struct Route {
    pub name: String,
    pub split: Vec<Split>,
    total: u64,
}

/// One service of a route, its weight and the requests the route sent it.
pub struct Split {
    pub service: Arc<Service>,
    pub weight: u32,
    /// `sdgate_route_requests_total{route, service}`.
    pub requests: IntCounter,
    /// The same, over the last minute (kept across reloads).
    pub recent: Arc<Window>,
    /// The class of the requests it sends (the route's, else the service's).
    pub priority: Priority,
}

impl Route {
    pub fn new(name: String, split: Vec<Split>) -> Self {
        let total = split.iter().map(|s| u64::from(s.weight)).sum();
        Self { name, split, total }
    }

    /// The service a request goes to: the one holding its session, else one
    /// picked by weight. Every weight 0 and no session: 503.
    pub fn pick(&self, headers: &HeaderMap) -> Result<&Split, ProxyError> {
        if let [only] = self.split.as_slice() {
            if only.weight > 0 {
                return Ok(only);
            }
        }
        if self.split.len() > 1 {
            if let Some(split) = self.split.iter().find(|split| holds_session(&split.service, headers)) {
                return Ok(split);
            }
        }
        if self.total == 0 {
            return Err(ProxyError::NoWeight(self.name.clone()));
        }
        let mut left = fastrand::u64(..self.total);
        for split in &self.split {
            let weight = u64::from(split.weight);
            if left < weight {
                return Ok(split);
            }
            left -= weight;
        }
        Err(ProxyError::NoWeight(self.name.clone()))
    }
}

/// Whether `service` pins the session a request presents.
fn holds_session(service: &Service, headers: &HeaderMap) -> bool {
    let Some(affinity) = &service.affinity else { return false };
    match affinity.presented(headers) {
        // A cookie's token is signed for one service, so one that names a
        // pod is this service's; a session header's is known by the table.
        Presented::Valid(_, Some(_)) => true,
        Presented::Valid(id, None) => affinity.sessions.get(&id, Instant::now()).is_some(),
        _ => false,
    }
}

/// Counts over the last minute, in one-second buckets, without a lock.
pub struct Window {
    origin: Instant,
    /// (second since `origin`, count) per bucket; a bucket of an older
    /// second is reset by the first count of a new one.
    buckets: [(AtomicU64, AtomicU64); 60],
}

impl Default for Window {
    fn default() -> Self {
        Self { origin: Instant::now(), buckets: std::array::from_fn(|_| (AtomicU64::new(0), AtomicU64::new(0))) }
    }
}

impl Window {
    /// Counts one request, made at `at`.
    pub fn record(&self, at: Instant) {
        let second = at.saturating_duration_since(self.origin).as_secs();
        let (at, count) = &self.buckets[(second % 60) as usize];
        if at.swap(second, Ordering::Relaxed) != second {
            count.store(0, Ordering::Relaxed);
        }
        count.fetch_add(1, Ordering::Relaxed);
    }

    /// The count over the last 60 seconds.
    pub fn last_minute(&self) -> u64 {
        let now = self.origin.elapsed().as_secs();
        self.buckets
            .iter()
            .filter(|(at, _)| now.saturating_sub(at.load(Ordering::Relaxed)) < 60)
            .map(|(_, count)| count.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_counts_the_last_minute() {
        let window = Window::default();
        for _ in 0..5 {
            window.record(Instant::now());
        }
        assert_eq!(window.last_minute(), 5);
    }
}
