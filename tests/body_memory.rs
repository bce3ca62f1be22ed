//! A stranger's body cannot take the gateway's memory by naming a
//! checkpoint: reading the name walks the JSON once and keeps nothing but
//! the name. Counted with an allocator that records the most bytes live at
//! once while a body is read (a JSON tree of the same body took 18 times
//! its size: ~290 MB for a 16 MiB body).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderMap;
use sdgate::config::CheckpointConfig;
use sdgate::proxy::checkpoint::Reader;

/// The system allocator, counting bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
        PEAK.fetch_max(now, Ordering::SeqCst);
        // SAFETY: as the caller's contract for GlobalAlloc::alloc.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: as the caller's contract for GlobalAlloc::dealloc.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most bytes allocated at once, beyond what was live before, while `f` runs.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let out = f();
    (out, PEAK.load(Ordering::SeqCst) - before)
}

#[test]
fn reading_the_checkpoint_of_a_big_hostile_body_takes_a_few_kib() {
    let reader = Reader::new(&CheckpointConfig::default());
    let headers = HeaderMap::new();
    // Two bytes per JSON value: the shape that makes a tree cost the most.
    let pad = "0,".repeat(4 << 20);
    let body = format!(
        r#"{{"prompt":"dog","pad":[{pad}0],"override_settings":{{"sd_model_checkpoint":"sdxl.safetensors"}}}}"#
    );
    let (named, peak) = peak_of(|| reader.wanted(&headers, Some(body.as_bytes())));
    assert_eq!(named, Some(("sdxl".to_string(), false)));
    assert!(peak < 16 * 1024, "reading an {} MiB body took {peak} bytes", body.len() >> 20);

    // An escaped name as long as allowed, among deep and wide values.
    let deep = format!("{}1{}", "[".repeat(120), "]".repeat(120));
    let wide = r#"{"k":"v"},"#.repeat(100_000);
    let body = format!(
        r#"{{"a":{deep},"b":[{wide}{{}}],"override_settings":{{"sd_model_checkpoint":"\u0073d{}"}}}}"#,
        "x".repeat(200)
    );
    let (named, peak) = peak_of(|| reader.wanted(&headers, Some(body.as_bytes())));
    assert_eq!(named.map(|(name, _)| name.len()), Some(202));
    assert!(peak < 16 * 1024, "{peak} bytes");
}
