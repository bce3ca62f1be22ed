//! Cost of the gate's decisions, and of the async slot layer under contention.
//!
//! Run with `cargo bench --bench gate` (about a minute on two cores).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use sdgate::gate::SharedGate;
use sdgate::gate::{EndpointId, Gate};
use sdgate::observe::metrics::Metrics;

fn addr(n: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + n))
}

/// A gate with `pods` ready endpoints.
fn ready_gate<W>(capacity: u32, max_depth: usize, pods: u16) -> (Gate<W>, Vec<EndpointId>) {
    let mut gate = Gate::new(capacity, max_depth);
    let ids = (0..pods)
        .map(|n| {
            let id = gate.add_endpoint(addr(n));
            gate.set_ready(id, true);
            id
        })
        .collect();
    (gate, ids)
}

/// (a) A request that finds a free cc=1 pod at once, then finishes.
fn uncontended_dispatch(c: &mut Criterion) {
    let (mut gate, _) = ready_gate::<()>(1, 16, 4);
    c.bench_function("gate/try_dispatch+release cc=1 4 pods", |b| {
        b.iter(|| {
            let ticket = gate.arrive();
            let grant = gate.try_dispatch(black_box(ticket)).expect("a free pod");
            gate.release(black_box(grant.endpoint));
        })
    });
    assert_eq!(gate.inflight(), 0);
}

/// (b) FIFO hand-over with 1000 waiters: one joins at the back, the pod is
/// released, the head waiter takes it. The queue stays at 1000.
fn fifo_handover(c: &mut Criterion) {
    const WAITERS: u64 = 1000;
    let (mut gate, pods) = ready_gate::<u64>(1, 2 * WAITERS as usize, 1);
    let now = Instant::now();
    let holder = gate.arrive();
    gate.try_dispatch(holder).expect("the pod is free");
    for n in 0..WAITERS {
        let ticket = gate.arrive();
        gate.enqueue(ticket, n, now).expect("room in the queue");
    }
    let pod = pods[0];
    c.bench_function("gate/enqueue+release+next_grant queue=1000", |b| {
        b.iter(|| {
            let ticket = gate.arrive();
            if gate.enqueue(ticket, 0, now).is_err() {
                unreachable!("the queue stays at its depth");
            }
            gate.release(pod);
            black_box(gate.next_grant().expect("the head waiter takes the pod"));
        })
    });
    assert_eq!(gate.queue_depth(), WAITERS as usize);
}

/// (c) Unlimited capacity: the power-of-two pick among 16 loaded pods.
fn power_of_two_pick(c: &mut Criterion) {
    let (mut gate, _) = ready_gate::<()>(0, 16, 16);
    // Background load, so the two candidates rarely tie.
    for _ in 0..16 * 8 {
        let ticket = gate.arrive();
        gate.try_dispatch(ticket).expect("cc=0 always has room");
    }
    c.bench_function("gate/p2c try_dispatch+release cc=0 16 pods", |b| {
        b.iter(|| {
            let ticket = gate.arrive();
            let grant = gate.try_dispatch(black_box(ticket)).expect("cc=0 always has room");
            gate.release(black_box(grant.endpoint));
        })
    });
    assert_eq!(gate.inflight(), 16 * 8);
}

/// (d) The async layer: `tasks` tasks loop on acquire, yield while holding
/// the slot (so others queue behind it), then drop it. Reports time per
/// acquire+release, over all tasks.
fn shared_gate(c: &mut Criterion) {
    const PODS: u16 = 4;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let gate = SharedGate::new(1, 1024, std::sync::Arc::new(Metrics::new().service("bench")));
    for n in 0..PODS {
        let id = gate.add_endpoint(addr(n));
        gate.set_ready(id, true);
    }

    let mut group = c.benchmark_group("slot");
    for tasks in [1u64, 64] {
        let name = format!("acquire+release {tasks} tasks {PODS} pods cc=1");
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let gate = gate.clone();
                runtime.block_on(async move {
                    let start = Instant::now();
                    let workers: Vec<_> = (0..tasks)
                        .map(|i| {
                            let gate = Arc::clone(&gate);
                            let rounds = iters / tasks + u64::from(i < iters % tasks);
                            tokio::spawn(async move {
                                for _ in 0..rounds {
                                    let ticket = gate.arrive();
                                    let slot = gate.acquire(ticket, Duration::from_secs(60)).await.expect("a slot");
                                    tokio::task::yield_now().await;
                                    drop(black_box(slot));
                                }
                            })
                        })
                        .collect();
                    for worker in workers {
                        worker.await.expect("worker finished");
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
    assert_eq!(gate.inspect(|g| (g.inflight(), g.queue_depth())), (0, 0));
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = uncontended_dispatch, fifo_handover, power_of_two_pick, shared_gate
}
criterion_main!(benches);
