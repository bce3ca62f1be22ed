//! The pin table under contention: is one lock the wrong tool? Two threads
//! (the build machine's two cores) each look up and refresh a pin per
//! request, as the request path does with affinity on, over 10,000 live
//! sessions: sdgate's table (`gate::pins::Sessions`, one mutex, with its
//! eviction order and per-pod counts) against a `DashMap` (sharded locks)
//! doing only the lookup and the refresh, which is the least a sharded table
//! would do per request.
//!
//! Run with `cargo bench --bench pins`.

// Times real work on real threads: the std clock is right here.
#![allow(clippy::disallowed_types)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use dashmap::DashMap;
use sdgate::gate::{EndpointId, SessionId, Sessions};
use tokio::time::Instant;

const SESSIONS: u64 = 10_000;
const THREADS: u64 = 2;

fn id(n: u64) -> SessionId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_le_bytes());
    id[8..].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    id
}

/// Runs `op(thread, i)` `iters` times on each of [`THREADS`] threads at once;
/// the wall time per operation of one thread.
fn contended(iters: u64, op: impl Fn(u64, u64) + Sync) -> Duration {
    let start = std::time::Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let op = &op;
            scope.spawn(move || {
                for i in 0..iters {
                    op(thread, i);
                }
            });
        }
    });
    start.elapsed()
}

fn pins(c: &mut Criterion) {
    let now = Instant::now();
    let sessions = Arc::new(Sessions::new(100_000, Duration::from_secs(1800)));
    for n in 0..SESSIONS {
        sessions.set(id(n), EndpointId(n % 4), now);
    }
    let ids: Vec<SessionId> = (0..SESSIONS).map(id).collect();
    c.bench_function("pins/mutex table: get + set, 2 threads", |b| {
        b.iter_custom(|iters| {
            contended(iters, |thread, i| {
                let id = &ids[((i * THREADS + thread) % SESSIONS) as usize];
                let pinned = sessions.get(black_box(id), now);
                sessions.set(*id, pinned.unwrap_or(EndpointId(0)), now);
            })
        })
    });

    let map: DashMap<SessionId, (EndpointId, Instant)> = DashMap::new();
    for n in 0..SESSIONS {
        map.insert(id(n), (EndpointId(n % 4), now));
    }
    c.bench_function("pins/dashmap: get + set, 2 threads", |b| {
        b.iter_custom(|iters| {
            contended(iters, |thread, i| {
                let id = &ids[((i * THREADS + thread) % SESSIONS) as usize];
                let pinned = map.get(black_box(id)).map(|entry| entry.0);
                if let Some(mut entry) = map.get_mut(id) {
                    *entry = (pinned.unwrap_or(EndpointId(0)), now);
                }
            })
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = pins
}
criterion_main!(benches);
