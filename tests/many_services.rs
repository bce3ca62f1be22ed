//! Many services in one config (issue 12, item 3): 500 services, fixed
//! backends and process backends at zero, start together, each request goes
//! to its own service's worker, and a process service nobody asked for has
//! no endpoint and runs no worker. (How fast and how small is measured by
//! `benches/many_services.sh`, not asserted here.)

mod common;

use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use sdgate::tools::sim::{SimHandle, SimOptions};

const SERVICES: usize = 500;
/// Fixed services are the first and the last quarter; the middle half are
/// process services at zero.
const FIXED_HEAD: usize = SERVICES / 4;
const FIXED_TAIL: usize = SERVICES - SERVICES / 4;
/// Sim workers behind the fixed services: service i -> worker i % SIMS.
const SIMS: usize = 5;

fn is_fixed(index: usize) -> bool {
    !(FIXED_HEAD..FIXED_TAIL).contains(&index)
}

fn host(index: usize) -> String {
    format!("svc-{index:03}.many.test")
}

/// 500 services; process services run `sdgate sim` tagged with `marker`
/// (so a worker started by mistake can be found) on ports no one uses.
fn many_yaml(sims: &[SocketAddr], marker: &str) -> String {
    // 100 services in front of each sim: each counts its slots apart (the
    // test is about routing and start-up, not container_concurrency).
    let mut yaml = String::from(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ndrain_timeout: 5s\nallow_shared_pods: true\nservices:\n",
    );
    for index in 0..SERVICES {
        yaml += &format!("  - name: svc-{index:03}\n    hosts: [\"{}\"]\n", host(index));
        yaml += "    readiness: { http: /internal/ping, period: 20ms }\n";
        if is_fixed(index) {
            yaml += &format!("    backend: {{ fixed: [\"{}\"] }}\n", sims[index % SIMS]);
        } else {
            let port_base = 40_000 + 4 * (index - FIXED_HEAD);
            yaml += &format!(
                "    scale: {{ min: 0, max: 4 }}\n    backend:\n      process:\n        command: [\"{}\", \"sim\", \"--port\", \"{{port}}\", \"--name\", \"{marker}-{index}\"]\n        port_base: {port_base}\n",
                sdgate_bin()
            );
        }
    }
    yaml
}

async fn named_sims() -> Vec<SimHandle> {
    let mut out = Vec::new();
    for k in 0..SIMS {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind sim");
        let options = SimOptions { name: Some(format!("many-sim-{k}")), ..fast_sim(1) };
        out.push(sdgate::tools::sim::spawn(listener, options).expect("spawn sim"));
    }
    out
}

fn options_for(addr: SocketAddr, host: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}/sdapi/v1/options")).header("host", host).body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_services_route_to_their_own_worker_and_those_at_zero_start_nothing() {
    let sims = named_sims().await;
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
    let marker = unique_marker("many");
    let gateway = TestGateway::start(&many_yaml(&addrs, &marker)).await;
    let services = gateway.proxy.services();
    assert_eq!(services.len(), SERVICES);

    eventually("every fixed service has its endpoint ready", || {
        let ready = (0..SERVICES).filter(|&i| is_fixed(i)).all(|i| services[i].gate.inspect(|g| g.ready_count() == 1));
        async move { ready }
    })
    .await;

    let client = client();
    for index in [0, SERVICES - 1, FIXED_HEAD - 1, FIXED_TAIL] {
        let answer = send(&client, options_for(gateway.addr, &host(index))).await;
        assert_eq!(answer.status, 200, "{}: {:?}", host(index), answer.body);
        assert_eq!(answer.worker(), format!("many-sim-{}", index % SIMS), "{} went to the wrong worker", host(index));
    }
    // Host matching ignores case and port, with 500 names as with one.
    let shouted = format!("{}:8080", host(SERVICES - 1).to_uppercase());
    assert_eq!(send(&client, options_for(gateway.addr, &shouted)).await.worker(), format!("many-sim-{}", 499 % SIMS));
    send(&client, options_for(gateway.addr, "svc-500.many.test")).await.assert_json_error(404);

    for (index, service) in services.iter().enumerate().filter(|(i, _)| !is_fixed(*i)) {
        assert_eq!(service.config.backend.kind(), "process");
        assert!(service.gate.inspect(|g| g.endpoints().is_empty()), "{} has endpoints at zero", host(index));
        assert_eq!(service.metrics.desired_replicas.get(), 0, "{} wants pods", host(index));
    }
    assert_eq!(processes_with(&marker), Vec::<u32>::new(), "a process service at zero started a worker");
    // Each fixed service holds its one endpoint, no more.
    for (index, service) in services.iter().enumerate().filter(|(i, _)| is_fixed(*i)) {
        let endpoints = service.gate.inspect(|g| g.endpoints().iter().map(|e| e.addr).collect::<Vec<_>>());
        assert_eq!(endpoints, vec![addrs[index % SIMS]], "{}", host(index));
    }
    gateway.shutdown().await;
}
