//! Cold-start latencies, measured end to end on 127.0.0.1 (`cargo bench --bench cold_start`).
//!
//! 1. Activation: from a request sent to a gateway with no pod to the
//!    provider's scale call (the desired count changing), with a decision
//!    tick of an hour so only activation can explain it. Goal: < 5 ms.
//! 2. Readiness -> dispatch: from a worker opening its port to the first
//!    queued request arriving in its handler, with the default probe period
//!    (25 ms). Goal: p99 <= 50 ms.
//!
//! 3. Burst: 20 requests sent at once to a service at zero pods (scale max
//!    5, a decision tick of an hour): from the 5th request sent to the
//!    desired count reaching 5. Goal: < 100 ms (demand changes are acted on
//!    within 50 ms, not at the next tick).
//!
//! `RUNS` (default 40) sets the number of runs of each.

// Times real work (wall clock), not sdgate's runtime: the std clock is right here.
#![allow(clippy::disallowed_types)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::net::TcpListener;

fn main() {
    let runs: usize = std::env::var("RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let activation = runtime.block_on(async {
        let mut samples = Vec::new();
        for _ in 0..runs {
            samples.push(activation_once().await);
        }
        samples
    });
    let dispatch = runtime.block_on(async {
        let mut samples = Vec::new();
        for _ in 0..runs {
            samples.push(readiness_to_dispatch_once().await);
        }
        samples
    });
    let burst = runtime.block_on(async {
        let mut samples = Vec::new();
        for _ in 0..runs {
            samples.push(burst_once().await);
        }
        samples
    });
    println!("| measure ({runs} runs) | p50 | p99 | max |");
    println!("| --- | ---: | ---: | ---: |");
    report("activation: request sent -> scale call", activation);
    report("readiness -> dispatch: port opens -> request at worker", dispatch);
    report("burst of 20 at zero pods: 5th request sent -> desired 5", burst);
}

async fn burst_once() -> Duration {
    let port = free_port().await;
    let yaml = config_yaml(
        &[format!("127.0.0.1:{port}").parse().expect("addr")],
        1,
        "    scale: { max: 5, tick: 3600s }\n    queue: { timeout: 2s }\n",
    );
    let gateway = TestGateway::start(&yaml).await;
    let mut desired = gateway.desired.clone();
    let client = client();
    let addr = gateway.addr;
    let mut requests = Vec::new();
    let mut fifth = None;
    for i in 0..20 {
        let client = client.clone();
        requests.push(tokio::spawn(async move { send(&client, txt2img(addr, "burst", 1)).await }));
        if i == 4 {
            fifth = Some(Instant::now());
        }
    }
    let fifth = fifth.expect("five sent");
    tokio::time::timeout(Duration::from_secs(5), desired.wait_for(|d| *d >= 5))
        .await
        .expect("desired 5")
        .expect("open");
    let took = fifth.elapsed();
    for request in requests {
        let _ = request.await;
    }
    gateway.shutdown().await;
    took
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    println!("| {name} | {} | {} | {} |", ms(at(0.5)), ms(at(0.99)), ms(at(1.0)));
}

async fn activation_once() -> Duration {
    let port = free_port().await;
    let yaml = config_yaml(
        &[format!("127.0.0.1:{port}").parse().expect("addr")],
        1,
        "    scale: { tick: 3600s }\n    queue: { timeout: 1s }\n",
    );
    let gateway = TestGateway::start(&yaml).await;
    let mut desired = gateway.desired.clone();
    desired.borrow_and_update();
    let client = client();
    let addr = gateway.addr;
    let sent = Instant::now();
    let request = tokio::spawn(async move { send(&client, txt2img(addr, "wake", 1)).await });
    desired.changed().await.expect("scale call");
    let took = sent.elapsed();
    let _ = request.await;
    gateway.shutdown().await;
    took
}

async fn readiness_to_dispatch_once() -> Duration {
    let port = free_port().await;
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    let yaml = config_yaml(&[addr], 1, "").replace("period: 20ms", "period: 25ms");
    let gateway = TestGateway::start(&yaml).await;
    let client = client();
    let gateway_addr = gateway.addr;
    let request = tokio::spawn(async move { send(&client, txt2img(gateway_addr, "first", 1)).await });
    gateway.wait_for(|g| g.queue_depth() == 1, "request queued").await;
    // Let the probe fall into its rhythm against a closed port.
    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..50))).await;
    let listener = TcpListener::bind(addr).await.expect("bind worker port");
    let opened_us = sdgate::tools::sim::micros_since_origin();
    let worker = sdgate::tools::sim::spawn(listener, fast_sim(1)).expect("sim");
    let answer = request.await.expect("request");
    assert_eq!(answer.status.as_u16(), 200);
    let arrived_us = worker.stats().jobs[0].arrived_us;
    gateway.shutdown().await;
    Duration::from_micros(arrived_us.saturating_sub(opened_us))
}
