//! What a request pays besides the gate: recording its metrics, and, with
//! session affinity, verifying its cookie, looking up and updating its pin,
//! and signing the cookie it gets back; with API keys (`auth`), finding its
//! caller among 1,000 keys and admitting it against its limits.
//!
//! Run with `cargo bench --bench hot_path` (about half a minute on two cores).

use std::hint::black_box;
use std::time::Duration;

use tokio::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{header, HeaderMap, HeaderValue};
use sdgate::config::AffinityConfig;
use sdgate::gate::EndpointId;
use sdgate::observe::metrics::{Metrics, Recent};
use sdgate::proxy::affinity::{Affinity, Presented, Signer};

/// The metrics one answered request updates (what `proxy` records).
fn metrics_per_request(c: &mut Criterion) {
    let metrics = Metrics::new();
    let service = metrics.service("stable-diffusion");
    let recent = Recent::default();
    c.bench_function("metrics/record one answer", |b| {
        b.iter(|| {
            service.answered(black_box(200));
            service.duration.observe(black_box(1.25));
            service.queue_wait.observe(black_box(0.0));
            recent.record(Instant::now(), 200, black_box(Duration::from_millis(1250)));
        })
    });
}

fn affinity() -> Affinity {
    let config = AffinityConfig::default();
    let signer = Signer::new(b"a benchmark key, 32 bytes long..", Some(b"the previous key")).expect("signer");
    Affinity::new(config, signer)
}

fn cookies(c: &mut Criterion) {
    let affinity = affinity();
    let id = affinity.new_session();
    let issued = affinity.set_cookie(&id, Some(sdgate::gate::EndpointId(3)), false).expect("a cookie");
    let token = issued.to_str().expect("ascii").split(';').next().expect("name=value").to_string();
    let mut headers = HeaderMap::new();
    // A browser's Cookie header: the session among other cookies.
    let cookie = format!("_ga=GA1.1.123456789.1700000000; theme=dark; {token}; lang=en");
    headers.insert(header::COOKIE, HeaderValue::from_str(&cookie).expect("header"));
    assert!(matches!(affinity.presented(&headers), Presented::Valid(found, _) if found == id));
    c.bench_function("affinity/verify the sd cookie among 4", |b| {
        b.iter(|| black_box(affinity.presented(black_box(&headers))))
    });
    c.bench_function("affinity/sign and build Set-Cookie", |b| {
        b.iter(|| black_box(affinity.set_cookie(black_box(&id), Some(sdgate::gate::EndpointId(3)), false)))
    });
}

/// The pin table with 100 000 live sessions: one lookup and one update per
/// request.
fn pin_table(c: &mut Criterion) {
    let affinity = affinity();
    let now = Instant::now();
    let ids: Vec<_> = (0..100_000u64)
        .map(|n| {
            let id = affinity.new_session();
            affinity.sessions.set(id, EndpointId(n % 8), now);
            id
        })
        .collect();
    let mut n = 0usize;
    c.bench_function("affinity/pin get+set, 100k sessions", |b| {
        b.iter(|| {
            n = (n + 7919) % ids.len();
            let id = &ids[n];
            let pinned = affinity.sessions.get(black_box(id), now);
            affinity.sessions.set(*id, pinned.unwrap_or(EndpointId(0)), now);
        })
    });
}

/// A request to a service with `auth`: its key looked up by its SHA-256
/// among 1,000, and admitted against limits (rate, concurrency, GPU-seconds).
fn api_keys(c: &mut Criterion) {
    let mut lines = String::from("keys:\n");
    let mut last = String::new();
    for i in 0..1000 {
        let (key, line) = sdgate::proxy::tenants::new_key(&format!("tenant-{i}")).expect("a key");
        lines.push_str(&line);
        lines.push('\n');
        last = key;
    }
    let path = std::env::temp_dir().join(format!("sdgate-bench-keys-{}.yaml", std::process::id()));
    std::fs::write(&path, lines).expect("keys file");
    let limits = sdgate::config::TenantLimits {
        concurrent: 1000,
        per_minute: u32::MAX / 2,
        gpu_seconds_per_hour: 1e12,
        gpu_seconds_per_day: 1e12,
    };
    let config = sdgate::config::AuthConfig { keys_file: path.clone(), limits, ..Default::default() };
    let keys = sdgate::proxy::tenants::Keys::load(&config).expect("keys");
    let _ = std::fs::remove_file(&path);
    let usage = sdgate::proxy::tenants::Usage::default();
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {last}")).expect("header"));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let _entered = runtime.enter();
    c.bench_function("auth/find the caller and admit it", |b| {
        b.iter(|| {
            let tenant = keys.caller(black_box(&headers)).expect("known");
            let admission = usage.admit("stable-diffusion", &tenant).expect("admitted");
            drop(black_box(admission));
        })
    });
    let _ = usage.take_pending();
}

criterion_group!(benches, metrics_per_request, cookies, pin_table, api_keys);
criterion_main!(benches);
