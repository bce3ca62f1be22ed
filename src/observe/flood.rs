//! Events that can come in floods (a client resetting HTTP/2 streams,
//! thousands of clients leaving the queue) are summarised in the log, one
//! line per period with their count, instead of one line each: the log
//! cannot be made to slow the proxy. Their metrics still count every one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// How often a summary line may be written.
const PERIOD: Duration = Duration::from_secs(10);

/// A kind of event summarised in the log.
pub struct Flood {
    what: &'static str,
    count: AtomicU64,
    /// When the last summary was written: milliseconds since [`epoch`], plus
    /// one (0: never).
    last: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Flood {
    pub const fn new(what: &'static str) -> Self {
        Self { what, count: AtomicU64::new(0), last: AtomicU64::new(0) }
    }

    /// One more event; writes the summary when a period has passed since
    /// the last one (the first event of a quiet spell is written at once).
    pub fn hit(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let now = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let last = self.last.load(Ordering::Relaxed);
        let period = PERIOD.as_millis() as u64;
        if last != 0 && now.saturating_sub(last) < period {
            return;
        }
        if self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            let count = self.count.swap(0, Ordering::Relaxed);
            tracing::info!(
                count,
                what = self.what,
                "{count} {} (summarised: at most one line per {PERIOD:?})",
                self.what
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_one_line_per_period() {
        let flood = Flood::new("test events");
        flood.hit();
        assert_eq!(flood.count.load(Ordering::Relaxed), 0, "the first is written at once");
        for _ in 0..1000 {
            flood.hit();
        }
        assert_eq!(flood.count.load(Ordering::Relaxed), 1000, "held for the next summary");
        tokio::time::advance(PERIOD).await;
        flood.hit();
        assert_eq!(flood.count.load(Ordering::Relaxed), 0, "1001 summarised in one line");
    }
}
