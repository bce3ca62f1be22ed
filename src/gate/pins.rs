//! The pin table: which pod each session is pinned to.
//!
//! It forgets sessions idle for the timeout and never holds more than
//! `max_sessions`, so a flood of new sessions cannot exhaust memory. The
//! proxy puts a session here only once its cookie has come back (a new
//! session is pinned by its cookie alone), so cookieless requests never
//! take a place. The sessions pinned to each pod are counted as they are
//! pinned and unpinned; idle ones leave the counts as a sweep of a few
//! entries per call finds them, never by a scan of the table. The
//! cookie that names a session is the proxy's (`proxy::affinity`); the table
//! belongs to the gate's core, since pins decide where a request may go.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::core::EndpointId;
use crate::error::lock;

/// A session's id: 16 random bytes, carried signed in its cookie.
pub type SessionId = [u8; 16];

/// The pin table: session -> pod, forgetting idle sessions, bounded in size.
pub struct Sessions {
    table: Mutex<Table>,
    max: usize,
    /// The idle timeout, in milliseconds (changed by a reload).
    idle_ms: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Table {
    pins: HashMap<SessionId, Pin>,
    /// Sessions in the order they were pinned: eviction candidates, oldest
    /// first (a recently used one gets a second chance at the back).
    order: VecDeque<SessionId>,
    /// Sessions pinned to each pod.
    counts: HashMap<EndpointId, usize>,
}

/// Entries of the order looked at per call for idle sessions.
const SWEEP: usize = 4;

impl Table {
    fn count(&mut self, endpoint: EndpointId, add: bool) {
        let count = self.counts.entry(endpoint).or_default();
        if add {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.counts.remove(&endpoint);
            }
        }
    }

    fn remove(&mut self, id: &SessionId) -> Option<Pin> {
        let pin = self.pins.remove(id)?;
        self.count(pin.endpoint, false);
        Some(pin)
    }

    /// Drops idle sessions among the first few of the order (live ones go
    /// to the back), so the counts shed sessions no request comes back for.
    fn sweep(&mut self, now: Instant, idle: Duration) {
        for _ in 0..self.order.len().min(SWEEP) {
            let Some(id) = self.order.pop_front() else { break };
            match self.pins.get(&id) {
                Some(pin) if now.saturating_duration_since(pin.last_used) >= idle => {
                    self.remove(&id);
                }
                Some(_) => self.order.push_back(id),
                None => {}
            }
        }
    }
}

struct Pin {
    endpoint: EndpointId,
    last_used: Instant,
}

impl Sessions {
    pub fn new(max: usize, idle: Duration) -> Self {
        let idle_ms = std::sync::atomic::AtomicU64::new(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX));
        Self { table: Mutex::new(Table::default()), max: max.max(1), idle_ms }
    }

    fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// A new idle timeout (`affinity.timeout` changed by a reload).
    pub fn set_idle(&self, idle: Duration) {
        let millis = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        self.idle_ms.store(millis, std::sync::atomic::Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// The pod a live session is pinned to.
    pub fn get(&self, id: &SessionId, now: Instant) -> Option<EndpointId> {
        let mut table = self.lock();
        match table.pins.get(id) {
            Some(pin) if now.saturating_duration_since(pin.last_used) < self.idle() => Some(pin.endpoint),
            Some(_) => {
                table.remove(id);
                None
            }
            None => None,
        }
    }

    /// Pins (or re-pins, or refreshes) a session.
    pub fn set(&self, id: SessionId, endpoint: EndpointId, now: Instant) {
        let mut table = self.lock();
        if let Some(pin) = table.pins.get_mut(&id) {
            let moved = std::mem::replace(&mut pin.endpoint, endpoint);
            pin.last_used = now;
            if moved != endpoint {
                table.count(moved, false);
                table.count(endpoint, true);
            }
            return;
        }
        table.sweep(now, self.idle());
        while table.pins.len() >= self.max {
            self.evict_one(&mut table, now);
        }
        table.pins.insert(id, Pin { endpoint, last_used: now });
        table.count(endpoint, true);
        table.order.push_back(id);
    }

    /// Drops the oldest-pinned session, unless it was used within the last
    /// tenth of the idle timeout (then it goes to the back, once per pass).
    fn evict_one(&self, table: &mut Table, now: Instant) {
        let recent = self.idle() / 10;
        // A bounded look for a second chance: under a flood every session is
        // recent, and scanning them all per insert would be quadratic.
        for _ in 0..table.order.len().min(8) {
            let Some(id) = table.order.pop_front() else { break };
            let Some(pin) = table.pins.get(&id) else { continue };
            if now.saturating_duration_since(pin.last_used) < recent {
                table.order.push_back(id);
                continue;
            }
            table.remove(&id);
            return;
        }
        // Every session is in active use: drop the oldest pinned anyway.
        while let Some(id) = table.order.pop_front() {
            if table.remove(&id).is_some() {
                return;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().pins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions pinned to `endpoint` (for status and scale-down): a counter,
    /// read after a short sweep for idle sessions.
    pub fn count_for(&self, endpoint: EndpointId, now: Instant) -> usize {
        let mut table = self.lock();
        table.sweep(now, self.idle());
        table.counts.get(&endpoint).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_table_forgets_idle_sessions() {
        let sessions = Sessions::new(10, Duration::from_secs(60));
        let now = Instant::now();
        sessions.set([1; 16], EndpointId(1), now);
        assert_eq!(sessions.get(&[1; 16], now + Duration::from_secs(59)), Some(EndpointId(1)));
        assert_eq!(sessions.get(&[1; 16], now + Duration::from_secs(61)), None);
        assert!(sessions.is_empty());
    }

    #[test]
    fn the_counts_follow_pins_moves_evictions_and_idle_sessions() {
        let sessions = Sessions::new(3, Duration::from_secs(60));
        let now = Instant::now();
        sessions.set([1; 16], EndpointId(1), now);
        sessions.set([2; 16], EndpointId(1), now);
        sessions.set([3; 16], EndpointId(2), now);
        assert_eq!((sessions.count_for(EndpointId(1), now), sessions.count_for(EndpointId(2), now)), (2, 1));
        sessions.set([2; 16], EndpointId(2), now);
        assert_eq!((sessions.count_for(EndpointId(1), now), sessions.count_for(EndpointId(2), now)), (1, 2));
        // A fourth evicts the oldest (session 1, on pod 1).
        sessions.set([4; 16], EndpointId(2), now + Duration::from_secs(30));
        assert_eq!((sessions.count_for(EndpointId(1), now), sessions.count_for(EndpointId(2), now)), (0, 3));
        // Idle ones leave the counts as sweeps find them, with no lookup.
        let later = now + Duration::from_secs(61);
        assert_eq!(sessions.count_for(EndpointId(2), later), 1, "sessions 2 and 3 idle, 4 live");
        let much_later = now + Duration::from_secs(200);
        assert_eq!(sessions.count_for(EndpointId(2), much_later), 0);
        assert!(sessions.is_empty());
    }

    #[test]
    fn the_pin_table_stays_within_its_bound_and_keeps_active_sessions() {
        let sessions = Sessions::new(100, Duration::from_secs(1800));
        let start = Instant::now();
        let active = [0xAA; 16];
        sessions.set(active, EndpointId(9), start);
        for i in 0..10_000u32 {
            let now = start + Duration::from_millis(u64::from(i) * 100);
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_le_bytes());
            sessions.set(id, EndpointId(1), now);
            if i % 50 == 0 {
                sessions.set(active, EndpointId(9), now);
            }
            assert!(sessions.len() <= 100);
        }
        let end = start + Duration::from_millis(999_900);
        assert_eq!(sessions.get(&active, end), Some(EndpointId(9)), "an active session survives the flood");
    }
}
