//! Scale from zero with a pool of real `sdgate sim` worker processes:
//! activation, bounds, replacement of dead workers, and no worker left behind.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use sdgate::tools::sim::SimStats;

const QUICK_SCALE: &str = "max: 10, stable_window: 2s, panic_window: 1s, scale_to_zero_grace: 1s, tick: 200ms";

/// Watches the worker processes tagged `marker` until stopped: the most seen
/// at once, and every pid seen.
struct ProcessWatch {
    most: Arc<AtomicUsize>,
    pids: Arc<Mutex<BTreeSet<u32>>>,
    stop: Arc<AtomicBool>,
}

impl ProcessWatch {
    fn start(marker: &str) -> Self {
        let (most, pids, stop) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(BTreeSet::new())), Arc::new(AtomicBool::new(false)));
        let (m, p, s, marker) = (most.clone(), pids.clone(), stop.clone(), marker.to_string());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let live = processes_with(&marker);
                m.fetch_max(live.len(), Ordering::SeqCst);
                p.lock().unwrap().extend(live);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self { most, pids, stop }
    }

    fn most(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }

    fn pids(&self) -> BTreeSet<u32> {
        self.pids.lock().unwrap().clone()
    }
}

impl Drop for ProcessWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn worker_stats(port_base: u16, count: u16) -> Vec<SimStats> {
    let client = client();
    let mut out = Vec::new();
    for port in port_base..port_base + count {
        let request = Request::get(format!("http://127.0.0.1:{port}/sim/stats")).body(Full::new(Bytes::new())).unwrap();
        if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(2), client.request(request)).await {
            use http_body_util::BodyExt;
            let body = response.into_body().collect().await.unwrap().to_bytes();
            // Another test's listener may have taken a port of the range
            // since it was chosen (a gateway on port 0): only sims count.
            if let Ok(stats) = serde_json::from_slice(&body) {
                out.push(stats);
            }
        }
    }
    out
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_zero_fifty_requests_are_served_by_at_most_five_workers_that_then_go_away() {
    let marker = unique_marker("fromzero");
    let port_base = free_port_range(10);
    let watch = ProcessWatch::start(&marker);
    let gateway = TestGateway::start(&pool_yaml(&marker, port_base, "2s", QUICK_SCALE, "")).await;
    assert!(processes_with(&marker).is_empty(), "no worker before the first request");
    let client = client();
    let mut clients = Vec::new();
    for c in 0..5 {
        let (client, addr) = (client.clone(), gateway.addr);
        clients.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..10 {
                ok += usize::from(send(&client, txt2img(addr, &format!("{c}-{i}"), 20)).await.status.as_u16() == 200);
            }
            ok
        }));
    }
    let mut ok = 0;
    for task in clients {
        ok += task.await.unwrap();
    }
    assert_eq!(ok, 50);
    let stats = worker_stats(port_base, 10).await;
    assert_eq!(stats.iter().map(|s| s.served).sum::<u64>(), 50, "every answer came from a live worker");
    for s in &stats {
        assert!(s.max_inflight <= 1, "{} had {} at once", s.name, s.max_inflight);
    }
    assert_no_overlap(&stats);
    assert!(watch.most() <= 5, "{} workers at once for 5 clients", watch.most());
    let pids = watch.pids();
    assert!(!pids.is_empty());
    eventually_within(Duration::from_secs(30), "every worker gone after the idle window", || {
        let gone = pids.iter().all(|pid| !pid_alive(*pid)) && processes_with(&marker).is_empty();
        async move { gone }
    })
    .await;
    assert_eq!(*gateway.desired.borrow(), 0);
    // At zero, /status still says what each worker did, as last known
    // (the last endpoint leaves the list a moment after its process).
    let admin = gateway.admin;
    eventually("no endpoint listed", || async move {
        status(admin).await["services"][0]["endpoints"].as_array().map(Vec::len) == Some(0)
    })
    .await;
    let status = status(gateway.admin).await;
    let service = &status["services"][0];
    let gone = service["gone_endpoints"].as_array().expect("gone endpoints");
    assert_eq!(gone.len(), pids.len(), "one per worker: {service}");
    assert_eq!(gone.iter().map(|g| g["served"].as_u64().unwrap()).sum::<u64>(), 50, "{service}");
    assert!(gone.iter().all(|g| g["failed"] == 0), "{service}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_clients_never_get_more_than_max_workers() {
    let marker = unique_marker("max3");
    let port_base = free_port_range(3);
    let watch = ProcessWatch::start(&marker);
    let scale = QUICK_SCALE.replace("max: 10", "max: 3");
    let gateway = TestGateway::start(&pool_yaml(&marker, port_base, "500ms", &scale, "")).await;
    let client = client();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (client, addr) = (client.clone(), gateway.addr);
        tasks.push(tokio::spawn(async move { send(&client, txt2img(addr, &i.to_string(), 2)).await.status.as_u16() }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert!(watch.most() <= 3, "{} workers at once with max 3", watch.most());
    assert_no_overlap(&worker_stats(port_base, 3).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_at_zero_calls_scale_without_waiting_for_a_tick() {
    // No pod, and a decision tick of an hour: only activation can scale.
    let port = free_port().await;
    let yaml = config_yaml(
        &[format!("127.0.0.1:{port}").parse().unwrap()],
        1,
        "    scale: { tick: 3600s }\n    queue: { timeout: 2s }\n",
    );
    let gateway = TestGateway::start(&yaml).await;
    let mut desired = gateway.desired.clone();
    assert_eq!(*desired.borrow_and_update(), 0);
    let request = {
        let addr = gateway.addr;
        tokio::spawn(async move { send(&client(), txt2img(addr, "wake up", 1)).await })
    };
    tokio::time::timeout(Duration::from_secs(1), desired.changed()).await.expect("scale call").unwrap();
    assert_eq!(*desired.borrow(), 1);
    assert_eq!(metric(gateway.admin, "sdgate_desired_replicas{service=\"sd\"}").await, Some(1.0));
    request.await.unwrap().assert_json_error(504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_request_is_replaced_and_only_its_request_fails() {
    let marker = unique_marker("kill9");
    let port_base = free_port_range(2);
    let scale = "min: 2, max: 2, tick: 200ms";
    let gateway = TestGateway::start(&pool_yaml(&marker, port_base, "0s", scale, "")).await;
    gateway.wait_for(|g| g.ready_count() == 2, "two workers ready").await;
    let before: BTreeSet<u32> = processes_with(&marker).into_iter().collect();
    let client = client();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (client, addr) = (client.clone(), gateway.addr);
        tasks.push(tokio::spawn(async move { send(&client, txt2img(addr, &i.to_string(), 30)).await }));
    }
    gateway.wait_for(|g| g.inflight() == 2, "both workers given a request").await;
    // A slot is granted before its request reaches the worker; a worker killed
    // in between is a refused connection, which is retried elsewhere (no 502).
    eventually("both workers generating", || async move {
        let stats = worker_stats(port_base, 2).await;
        stats.len() == 2 && stats.iter().all(|s| s.inflight == 1)
    })
    .await;
    let victim = *before.iter().next().unwrap();
    assert!(std::process::Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap().success());
    let mut failed = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        if answer.status.as_u16() == 200 {
            continue;
        }
        answer.assert_json_error(502);
        failed += 1;
    }
    assert_eq!(failed, 1, "only the request on the killed worker fails");
    gateway.wait_for(|g| g.ready_count() == 2, "the worker is replaced").await;
    let after: BTreeSet<u32> = processes_with(&marker).into_iter().collect();
    assert_eq!(after.len(), 2);
    assert!(!after.contains(&victim));
    gateway.shutdown().await;
    assert!(processes_with(&marker).is_empty(), "shutdown stops the workers");
}

/// sdgate as a process with two workers running.
async fn gateway_with_two_workers(name: &str) -> (GatewayProcess, String) {
    let marker = unique_marker(name);
    let port_base = free_port_range(2);
    let gateway = GatewayProcess::start(&pool_yaml(&marker, port_base, "0s", "min: 2, max: 2", "")).await;
    processes_become(&marker, 2, "two workers running").await;
    (gateway, marker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_sdgate_leaves_no_worker_behind() {
    let (mut gateway, marker) = gateway_with_two_workers("term").await;
    gateway.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(15), gateway.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(processes_with(&marker).is_empty(), "workers stopped before sdgate exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_to_sdgate_leaves_no_worker_behind() {
    let (mut gateway, marker) = gateway_with_two_workers("kill").await;
    gateway.signal("KILL");
    let _ = gateway.child.wait().await;
    processes_become(&marker, 0, "workers died with sdgate").await;
}

#[test]
fn a_command_that_does_not_exist_is_a_check_error_and_a_startup_error() {
    let yaml = "services:\n  - name: sd\n    hosts: [\"*\"]\n    backend:\n      process: { command: [\"/no/such/worker\", \"--port\", \"{port}\"], port_base: 17000 }\n";
    let file = TempFile::new("yaml", yaml);
    for args in [vec!["check", "--config"], vec!["--config"]] {
        let output = std::process::Command::new(sdgate_bin()).args(&args).arg(&file.path).output().unwrap();
        assert!(!output.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("services[0].backend.process.command[0]"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_at_once_is_retried_with_backoff_and_waiters_are_told_why() {
    let starts = TempFile::new("log", "");
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: sd\n    hosts: [\"{HOST}\"]\n    queue: {{ timeout: 2500ms }}\n    backend:\n      process: {{ command: [\"sh\", \"-c\", \"echo start >> {}; exit 3\"], port_base: {} }}\n",
        starts.path.display(),
        free_port_range(1)
    );
    let gateway = TestGateway::start(&yaml).await;
    let answer = send(&client(), txt2img(gateway.addr, "never", 1)).await;
    // Every start failed: told at once (503), not at the queue timeout (504).
    answer.assert_json_error(503);
    let error = answer.json()["error"].as_str().unwrap().to_string();
    assert!(error.contains("no pod can start: worker 0 exited"), "{error}");
    assert!(error.contains("exit status: 3"), "{error}");
    let attempts = std::fs::read_to_string(&starts.path).unwrap().lines().count();
    // Backoff 0.5 s, 1 s, 2 s...: a handful of attempts, not a hot loop.
    assert!((1..=6).contains(&attempts), "{attempts} start attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_drains_the_worker_holding_the_fewest_sessions() {
    use sdgate::gate::SharedGate;
    use sdgate::proxy::affinity::Sessions;

    let marker = unique_marker("sessions");
    let port_base = free_port_range(2);
    let config = sdgate::Config::from_yaml(&pool_yaml(&marker, port_base, "0s", "max: 2", "")).expect("config");
    let sessions = Arc::new(Sessions::new(1000, Duration::from_secs(1800)));
    let metrics = sdgate::observe::metrics::Metrics::new();
    let gate = SharedGate::new(1, 100, Arc::new(metrics.service("sd")));
    let endpoints = sdgate::control::provider::Endpoints::new(gate.clone()).with_sessions(Some(sessions.clone()));
    // The provider alone, driven by hand: two workers, then one.
    let (desired, desired_rx) = tokio::sync::watch::channel(2);
    let provider = sdgate::control::provider::start(&config.services[0], endpoints, desired_rx).expect("provider");
    let ready = |n: usize| {
        let gate = gate.clone();
        move || {
            let count = gate.inspect(|g| g.ready_count());
            async move { count == n }
        }
    };
    eventually("two workers ready", ready(2)).await;
    let endpoint_on = |port: u16| {
        gate.inspect(|g| g.endpoints().iter().find(|e| e.addr.port() == port).map(|e| e.id)).expect("endpoint")
    };
    let (low, high) = (endpoint_on(port_base), endpoint_on(port_base + 1));
    // Sessions live on the higher-index worker, the one that would go first
    // if sessions did not count.
    for n in 0..3u8 {
        sessions.set([n; 16], high, tokio::time::Instant::now());
    }
    desired.send(1).expect("provider listening");
    eventually("the sessionless worker gone", || {
        let gone = gate.inspect(|g| g.endpoint(low).is_none());
        async move { gone }
    })
    .await;
    assert!(gate.inspect(|g| g.endpoint(high).is_some_and(|e| e.is_serving())), "the worker with sessions stays");
    assert!(processes_with(&format!("{marker}-0")).is_empty(), "worker 0 exited");
    assert_eq!(processes_with(&format!("{marker}-1")).len(), 1, "worker 1 still runs");
    provider.shutdown().await;
    processes_become(&marker, 0, "no worker left").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_request_at_zero_pods_starts_no_worker_and_a_generation_does() {
    let marker = unique_marker("wake");
    let port_base = free_port_range(1);
    let gateway = TestGateway::start(&pool_yaml(&marker, port_base, "0s", "max: 1", "")).await;
    let client = client();
    for path in ["/favicon.ico", "/version", "/robots.txt"] {
        let answer = send(&client, get(gateway.addr, path)).await;
        answer.assert_json_error(503);
        assert!(answer.headers.contains_key("retry-after"), "{path}: Retry-After");
    }
    let mut desired = gateway.desired.clone();
    assert_eq!(*desired.borrow_and_update(), 0, "nothing woke the pool");
    assert!(processes_with(&marker).is_empty(), "no worker started");
    assert_eq!(send(&client, txt2img(gateway.addr, "wake", 1)).await.status.as_u16(), 200);
    // Once a pod exists, any path is served.
    assert_eq!(send(&client, get(gateway.addr, "/sdapi/v1/options")).await.status.as_u16(), 200);
}
