//! One in flight per pod, FIFO, work-conserving, cancel-safe: scenarios with
//! real sockets and sim workers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guides_hey_run_gets_fifty_200s_and_no_worker_runs_two_generations() {
    let workers = sims(5, fast_sim(10)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let gateway = TestGateway::in_front_of(&addrs, 1, "").await;
    let client = client();
    // hey -n 50 -c 5: five clients, ten requests each, one after another.
    let mut clients = Vec::new();
    for c in 0..5 {
        let (client, addr) = (client.clone(), gateway.addr);
        clients.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..10 {
                statuses.push(send(&client, txt2img(addr, &format!("pretty dog {c}-{i}"), 5)).await.status);
            }
            statuses
        }));
    }
    let mut ok = 0;
    for task in clients {
        ok += task.await.unwrap().iter().filter(|s| s.as_u16() == 200).count();
    }
    assert_eq!(ok, 50);
    let stats: Vec<_> = workers.iter().map(|w| w.stats()).collect();
    assert_eq!(stats.iter().map(|s| s.served).sum::<u64>(), 50);
    for s in &stats {
        assert_eq!(s.max_inflight, 1, "{} max_inflight", s.name);
    }
    assert_no_overlap(&stats);
    gateway.wait_for(|g| g.inflight() == 0 && g.queue_depth() == 0, "gate empty").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_on_two_workers_are_served_in_arrival_order_across_four_serving_threads() {
    let workers = sims(2, fast_sim(5)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    // Four serving threads whatever the CPU count: the clients' connections
    // spread over them, and the gate's order and limit hold across threads.
    let gateway = TestGateway::start(&with_threads(&config_yaml(&addrs, 1, ""), 4)).await;
    gateway.wait_for(|g| g.ready_count() == 2, "both workers ready").await;
    let client = client();
    let clients = Arc::new(Semaphore::new(20));
    let mut tasks = Vec::new();
    for i in 0..60u64 {
        let permit = clients.clone().acquire_owned().await.unwrap();
        let (client, addr) = (client.clone(), gateway.addr);
        tasks.push(tokio::spawn(async move {
            let answer = send(&client, txt2img(addr, &i.to_string(), 2)).await;
            drop(permit);
            answer.status.as_u16()
        }));
        // The next request is sent only once this one has arrived, so the
        // arrival order is known.
        gateway.wait_for(|g| g.arrivals() == i + 1, "request arrived").await;
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let stats: Vec<_> = workers.iter().map(|w| w.stats()).collect();
    assert_no_overlap(&stats);
    // Each worker started its jobs in arrival order...
    for s in &stats {
        let prompts: Vec<u64> = s.jobs.iter().map(|j| j.prompt.parse().unwrap()).collect();
        assert!(prompts.windows(2).all(|w| w[0] < w[1]), "{}: {prompts:?}", s.name);
    }
    // ...and across workers no request started more than one place early (two
    // requests handed out in the same instant may reach their workers in
    // either order).
    let mut all: Vec<_> = stats.iter().flat_map(|s| s.jobs.iter()).collect();
    assert_eq!(all.len(), 60);
    all.sort_by_key(|j| j.arrived_us);
    for (position, job) in all.iter().enumerate() {
        let id: usize = job.prompt.parse().unwrap();
        assert!(id.abs_diff(position) <= 1, "request {id} started at position {position}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_worker_sits_idle_while_a_request_waits() {
    let workers = sims(2, fast_sim(10)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let gateway = TestGateway::in_front_of(&addrs, 1, "").await;
    let client = client();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (client, addr) = (client.clone(), gateway.addr);
        tasks.push(tokio::spawn(async move { send(&client, txt2img(addr, &i.to_string(), 5)).await.status }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().as_u16(), 200);
    }
    let mut gaps = Vec::new();
    for worker in &workers {
        let jobs = worker.stats().jobs;
        assert!(jobs.len() >= 10, "both workers take work");
        gaps.extend(jobs.windows(2).map(|w| w[1].arrived_us.saturating_sub(w[0].ended_us)));
    }
    gaps.sort_unstable();
    let median = gaps[gaps.len() / 2];
    let worst = gaps[gaps.len() - 1];
    // A few ms covers reading the answer, freeing the slot and sending the
    // next request on a 2-core machine running a debug build; an idle worker
    // would show a gap of a whole job (50 ms) or more.
    assert!(median <= 10_000, "median gap between jobs {median} us; gaps {gaps:?}");
    assert!(worst <= 45_000, "worst gap between jobs {worst} us; gaps {gaps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_queued_never_reaches_a_worker() {
    let workers = sims(1, fast_sim(20)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let client = client();
    let busy = {
        let (client, addr) = (client.clone(), gateway.addr);
        tokio::spawn(async move { send(&client, txt2img(addr, "first", 10)).await.status })
    };
    gateway.wait_for(|g| g.inflight() == 1, "first request dispatched").await;
    let leaver = raw_request(gateway.addr, "leaver", 1).await;
    gateway.wait_for(|g| g.queue_depth() == 1, "second request queued").await;
    drop(leaver);
    gateway.wait_for(|g| g.queue_depth() == 0, "departed client left the queue").await;
    assert_eq!(busy.await.unwrap().as_u16(), 200);
    assert_eq!(send(&client, txt2img(gateway.addr, "third", 1)).await.status.as_u16(), 200);
    let prompts: Vec<_> = workers[0].stats().jobs.into_iter().map(|j| j.prompt).collect();
    assert_eq!(prompts, ["first", "third"]);
    gateway.wait_for(|g| g.inflight() == 0, "in-flight back to 0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_generation_keeps_its_worker_busy_until_done() {
    let workers = sims(1, fast_sim(20)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let leaver = raw_request(gateway.addr, "leaver", 10).await;
    eventually("generation started", || {
        let inflight = workers[0].stats().inflight;
        async move { inflight == 1 }
    })
    .await;
    drop(leaver);
    // The next request must wait for the departed client's generation.
    let answer = send(&client(), txt2img(gateway.addr, "next", 1)).await;
    assert_eq!(answer.status.as_u16(), 200);
    let stats = workers[0].stats();
    assert_eq!(stats.max_inflight, 1);
    assert_eq!(stats.overlaps, 0);
    let jobs = stats.jobs;
    assert_eq!(jobs.iter().map(|j| j.prompt.as_str()).collect::<Vec<_>>(), ["leaver", "next"]);
    assert!(jobs[1].arrived_us >= jobs[0].ended_us, "next arrived before the first finished");
    gateway.wait_for(|g| g.inflight() == 0, "in-flight back to 0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_wait_for_a_worker_that_opens_its_port_later() {
    let port = free_port().await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let gateway = TestGateway::start(&config_yaml(&[addr], 1, "")).await;
    let client = client();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let (client, gateway_addr) = (client.clone(), gateway.addr);
        tasks.push(tokio::spawn(async move { send(&client, txt2img(gateway_addr, &i.to_string(), 1)).await.status }));
    }
    gateway.wait_for(|g| g.queue_depth() == 3 && g.ready_count() == 0, "three requests queued, no pod").await;
    let listener = TcpListener::bind(addr).await.unwrap();
    let worker = sdgate::tools::sim::spawn(listener, fast_sim(5)).unwrap();
    for task in tasks {
        assert_eq!(task.await.unwrap().as_u16(), 200);
    }
    assert_eq!(worker.stats().served, 3);
    assert_no_overlap(&[worker.stats()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypass_paths_answer_during_a_generation_without_a_slot() {
    let workers = sims(1, fast_sim(20)).await;
    // Without affinity, progress is a bypass path only with `owner_only` off
    // (tests/isolation.rs: otherwise sdgate answers it).
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "    owner_only: []\n").await;
    let client = client();
    let busy = {
        let (client, addr) = (client.clone(), gateway.addr);
        tokio::spawn(async move { send(&client, txt2img(addr, "long", 20)).await.status })
    };
    gateway.wait_for(|g| g.inflight() == 1, "generation dispatched").await;
    eventually("progress reported", || {
        let (client, addr) = (client.clone(), gateway.addr);
        async move {
            let answer = send(&client, get(addr, "/sdapi/v1/progress")).await;
            assert_eq!(answer.status.as_u16(), 200);
            answer.json()["progress"].as_f64().unwrap_or(0.0) > 0.0
        }
    })
    .await;
    assert_eq!(gateway.inflight(), 1, "progress took no slot");
    assert_eq!(busy.await.unwrap().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_refusing_pod_is_retried_on_another() {
    let workers = sims(1, fast_sim(5)).await;
    // A pod that passed its probe and then stopped listening.
    let dead_port = free_port().await;
    let dead = format!("127.0.0.1:{dead_port}").parse().unwrap();
    let gateway = TestGateway::start(&config_yaml(&[dead, workers[0].addr], 1, "")).await;
    gateway.wait_for(|g| g.ready_count() == 1, "live pod ready").await;
    let dead_id = gateway.proxy.services()[0].gate.inspect(|g| g.endpoints()[0].id);
    gateway.proxy.services()[0].gate.set_ready(dead_id, true);
    let answer = send(&client(), txt2img(gateway.addr, "retried", 1)).await;
    assert_eq!(answer.status.as_u16(), 200);
    assert_eq!(workers[0].stats().served, 1);
    let dead_ready = gateway.proxy.services()[0].gate.inspect(|g| g.endpoints()[0].ready);
    assert!(!dead_ready, "the refusing pod is out of rotation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_client_gets_the_full_answer_through_the_gate() {
    let workers = sims(1, fast_sim(1)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let mut stream = raw_request(gateway.addr, "raw", 1).await;
    let mut head = vec![0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut head)).await.unwrap().unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_backend_named_by_host_name_is_resolved_to_its_addresses() {
    let workers = sims(1, fast_sim(1)).await;
    let port = workers[0].addr.port();
    let yaml = config_yaml(&[workers[0].addr], 1, "")
        .replace(&format!("\"127.0.0.1:{port}\""), &format!("\"localhost:{port}\""));
    assert!(yaml.contains("localhost:"), "{yaml}");
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "the name's 127.0.0.1 address ready").await;
    assert!(gateway.endpoints().iter().any(|e| e.addr == workers[0].addr), "resolved to the worker's address");
    assert_eq!(send(&client(), txt2img(gateway.addr, "by name", 1)).await.status.as_u16(), 200);
}
