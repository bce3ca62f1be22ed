//! A flood of sessions cannot exhaust memory: a million distinct random
//! cookies leave the pin table within its bound, measured with a counting
//! allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use http::{HeaderMap, HeaderValue};
use sdgate::config::AffinityConfig;
use sdgate::gate::EndpointId;
use sdgate::proxy::affinity::{Affinity, Presented, Signer};

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn a_million_random_cookies_leave_the_pin_table_within_its_bound() {
    const BOUND: usize = 10_000;
    let config = AffinityConfig { max_sessions: BOUND, ..AffinityConfig::default() };
    let affinity = Affinity::new(config, Signer::new(b"key", None).unwrap());
    let now = Instant::now();
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let mut peak = 0isize;
    let mut headers = HeaderMap::new();
    for i in 0..1_000_000u32 {
        // Every request brings a different random cookie: each is invalid, so
        // each starts (and pins) a new session, as in the request path.
        let cookie = format!("sd={:016x}{:016x}{:016x}{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..), i, 0, 0);
        headers.insert(http::header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        if i % 100 == 0 {
            // The full cookie check (HMAC) on a sample; every one is refused.
            assert_eq!(affinity.presented(&headers), Presented::Invalid);
        }
        let id = affinity.new_session();
        affinity.sessions.set(id, EndpointId(u64::from(i % 4)), now + Duration::from_millis(u64::from(i)));
        if i % 10_000 == 0 {
            peak = peak.max(LIVE_BYTES.load(Ordering::Relaxed) - before);
        }
    }
    assert!(affinity.sessions.len() <= BOUND, "{} sessions kept", affinity.sessions.len());
    let grown = LIVE_BYTES.load(Ordering::Relaxed) - before;
    // About 40 bytes a session (table entry + eviction order), with hash table
    // slack: well under 200 bytes each.
    let limit = (BOUND * 200) as isize;
    assert!(grown < limit, "pin table uses {grown} bytes for {BOUND} sessions");
    assert!(peak < limit, "pin table peaked at {peak} bytes");
}
