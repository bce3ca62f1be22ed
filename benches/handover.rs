//! What a standby's hand-over costs: two sdgate replicas on one Lease (the
//! in-process API stand-in), the same sequential requests sent to the active
//! replica and to the standby (which hands each one to the active replica),
//! taking turns, in one run (`cargo bench --bench handover`; `RUNS`, default
//! 200 requests to each; `STEPS`, default 1 step of 10 ms per generation).
//!
//! Reports each path's p50/p95/p99 and the difference of the medians: the
//! hand-over's own latency (one more connection and a copy of the bytes).

// Times real work (wall clock), not sdgate's runtime: the std clock is right here.
#![allow(clippy::disallowed_types)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/support/kube_api.rs"]
mod kube_api;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use kube_api::{ClusterOptions, FakeCluster};

fn main() {
    let runs: usize = std::env::var("RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let steps: u32 = std::env::var("STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (direct, handed) = runtime.block_on(measure(runs, steps));
    println!("| path ({runs} sequential txt2img of {steps} x 10 ms each, taking turns) | p50 | p95 | p99 |");
    println!("| --- | ---: | ---: | ---: |");
    let direct_p50 = report("to the active replica", direct);
    let handed_p50 = report("to the standby (handed to the active replica)", handed);
    println!("\nhand-over: +{:.2} ms at the median", (handed_p50 - direct_p50).as_secs_f64() * 1000.0);
}

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    println!("| {name} | {} | {} | {} |", ms(at(0.5)), ms(at(0.95)), ms(at(0.99)));
    at(0.5)
}

/// A replica in this process: its listener and admin addresses.
async fn replica(cluster: &FakeCluster, identity: &str) -> (SocketAddr, SocketAddr) {
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nshutdown_delay: 0s\n\
         leader_election: {{ lease: sdgate, identity: {identity}, lease_duration: 10s, renew_period: 500ms, kubeconfig: \"{}\" }}\n\
         services:\n  - name: sd\n    hosts: [\"{HOST}\"]\n    container_concurrency: 1\n    readiness: {{ tcp: true, period: 10ms }}\n\
         \x20   scale: {{ min: 1, max: 1 }}\n    backend: {{ kubernetes: {{ deployment: {}, port: http, kubeconfig: \"{}\" }} }}\n",
        cluster.kubeconfig_path().display(),
        cluster.deployment_name(),
        cluster.kubeconfig_path().display()
    );
    let config = sdgate::Config::from_yaml(&yaml).expect("config");
    let gateway = sdgate::Gateway::bind(config).await.expect("bind");
    let addrs = (gateway.local_addr().expect("listen"), gateway.admin_addr().expect("admin"));
    tokio::spawn(gateway.run(std::future::pending()));
    addrs
}

async fn measure(runs: usize, steps: u32) -> (Vec<Duration>, Vec<Duration>) {
    let cluster = FakeCluster::start(ClusterOptions { replicas: 1, ..ClusterOptions::default() }).await;
    let a = replica(&cluster, "a").await;
    let b = replica(&cluster, "b").await;
    let active = |admin| async move { status(admin).await["active"] == true };
    eventually_within(Duration::from_secs(30), "one replica active", || {
        let (ra, rb) = (active(a.1), active(b.1));
        async move { ra.await ^ rb.await }
    })
    .await;
    let (holder, standby) = if active(a.1).await { (a, b) } else { (b, a) };
    eventually_within(Duration::from_secs(30), "the standby ready", || async move {
        send(&client(), get(standby.1, "/readyz")).await.status.as_u16() == 200
    })
    .await;
    let client = client();
    // Warm both paths (the pod, connections).
    for addr in [holder.0, standby.0] {
        for _ in 0..5 {
            assert_eq!(send(&client, txt2img(addr, "warm", steps)).await.status.as_u16(), 200);
        }
    }
    let (mut direct, mut handed) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        for (addr, samples) in [(holder.0, &mut direct), (standby.0, &mut handed)] {
            let sent = Instant::now();
            assert_eq!(send(&client, txt2img(addr, "measured", steps)).await.status.as_u16(), 200);
            samples.push(sent.elapsed());
        }
    }
    (direct, handed)
}
