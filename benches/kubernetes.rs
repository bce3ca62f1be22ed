//! The kubernetes backend's latencies, against the in-process API stand-in
//! (`cargo bench --bench kubernetes`; `RUNS`, default 20).
//!
//! 1. Activation: from a request sent to a gateway whose Deployment is at 0
//!    replicas to the scale PATCH arriving at the API. Goal: < 5 ms.
//! 2. Port open -> first request: from a new pod's port opening to the
//!    request that woke it arriving in its handler, with the default probe
//!    period (25 ms) and the kubelet's Ready 1 s later. Goal: < 50 ms.

// Times real work (wall clock), not sdgate's runtime: the std clock is right here.
#![allow(clippy::disallowed_types)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/support/kube_api.rs"]
mod kube_api;

use std::time::{Duration, Instant};

use common::*;
use kube_api::{ClusterOptions, FakeCluster};

fn main() {
    let runs: usize = std::env::var("RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (activation, first_request) = runtime.block_on(async {
        let (mut activation, mut first_request) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (a, f) = once().await;
            activation.push(a);
            first_request.push(f);
        }
        (activation, first_request)
    });
    println!("| measure ({runs} runs) | p50 | p99 | max |");
    println!("| --- | ---: | ---: | ---: |");
    report("activation: request sent -> scale PATCH at the API", activation);
    report("port opens -> first request at the pod (kubelet Ready 1 s later)", first_request);
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1000.0);
    println!("| {name} | {} | {} | {} |", ms(at(0.5)), ms(at(0.99)), ms(at(1.0)));
}

async fn once() -> (Duration, Duration) {
    let cluster = FakeCluster::start(ClusterOptions::default()).await;
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nleader_election: off\nservices:\n  - name: sd\n    hosts: [\"{HOST}\"]\n    readiness: {{ tcp: true }}\n    scale: {{ max: 1 }}\n    backend: {{ kubernetes: {{ deployment: {}, port: http, kubeconfig: \"{}\" }} }}\n",
        cluster.deployment_name(),
        cluster.kubeconfig_path().display()
    );
    let gateway = TestGateway::start(&yaml).await;
    cluster.wait_for("sdgate watching pods", Duration::from_secs(10), |c| c.open_watches() >= 2).await;
    let client = client();
    let sent = Instant::now();
    let answer = send(&client, txt2img(gateway.addr, "wake", 1)).await;
    assert_eq!(answer.status.as_u16(), 200);
    let patched = cluster.first_request_at("patch", "deployments/scale").expect("scale patch");
    let pod = cluster.pods().into_iter().next().expect("a pod");
    let opened = pod.port_open_us.expect("port opened");
    let arrived = pod.stats.expect("stats").jobs[0].arrived_us;
    gateway.shutdown().await;
    cluster.shutdown().await;
    (patched.saturating_duration_since(sent), Duration::from_micros(arrived.saturating_sub(opened)))
}
