//! Many checkpoints, one pool: requests go to a pod that already holds the
//! checkpoint they name (`override_settings.sd_model_checkpoint`), against
//! sims that load a checkpoint the way the WebUI does (inside the
//! generation lock, `--load-time` long).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use sdgate::tools::sim::SimOptions;

/// A txt2img request naming `checkpoint` (as a title, the way WebUI clients
/// often send it, or as a bare name).
fn for_checkpoint(addr: SocketAddr, checkpoint: &str, steps: u32) -> Request<Full<Bytes>> {
    txt2img_json(
        addr,
        serde_json::json!({
            "prompt": format!("on {checkpoint}"),
            "steps": steps,
            "override_settings": { "sd_model_checkpoint": checkpoint },
            "override_settings_restore_afterwards": false,
        }),
    )
}

/// Sims that all start on checkpoint `a` and take `load` to load another.
async fn pods_on_a(n: usize, load: Duration) -> Vec<sdgate::tools::sim::SimHandle> {
    sims(n, SimOptions { checkpoint: "a".into(), load_time: load, ..fast_sim(10) }).await
}

/// The scenario of the issue: 3 pods on `a`, 6 clients (two each on a, b and
/// c) sending 10 requests each one after another. Blind, nearly every
/// request loads; by checkpoint, one load each for b and c and a few more at
/// most while the pods sort themselves out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_checkpoints_on_three_pods_load_each_about_once() {
    let workers = pods_on_a(3, Duration::from_millis(300)).await;
    let backends: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let gateway =
        TestGateway::in_front_of(&backends, 1, "    checkpoints: { switch_cost: 300ms, max_wait_for_match: 5s }\n")
            .await;
    let addr = gateway.addr;
    let clients = ["a", "a", "b", "b", "c", "c"].map(|checkpoint| {
        tokio::spawn(async move {
            let client = client();
            let mut statuses = Vec::new();
            // Titles, file names and names of one checkpoint are one checkpoint.
            for (i, name) in [format!("{checkpoint}.safetensors [0123456789]"), checkpoint.to_string()]
                .iter()
                .cycle()
                .take(10)
                .enumerate()
            {
                let answer = send(&client, for_checkpoint(addr, name, 4)).await;
                let info: serde_json::Value =
                    serde_json::from_str(answer.json()["info"].as_str().unwrap_or("{}")).unwrap_or_default();
                assert_eq!(info["sd_model_name"], checkpoint, "request {i} ran on its checkpoint");
                statuses.push(answer.status.as_u16());
            }
            statuses
        })
    });
    let mut statuses = Vec::new();
    for client in clients {
        statuses.extend(client.await.expect("client ran"));
    }
    assert_eq!(statuses, vec![200; 60]);
    let stats: Vec<_> = workers.iter().map(|w| w.stats()).collect();
    assert_no_overlap(&stats);
    let loads: u64 = stats.iter().map(|s| s.loads).sum();
    eprintln!("checkpoint loads: {loads}");
    if std::env::var("SHOW_JOBS").is_ok() {
        for s in &stats {
            let jobs: Vec<String> = s
                .jobs
                .iter()
                .map(|j| format!("{}{}@{}", j.checkpoint, if j.loaded { "*" } else { "" }, j.arrived_us / 1000))
                .collect();
            eprintln!("{}: {}", s.name, jobs.join(" "));
        }
    }
    assert!(loads <= 6, "{loads} checkpoint loads for 60 requests on 3 checkpoints and 3 pods: {stats:?}");
    // sdgate counted the same loads the pods did.
    let mut counted = 0.0;
    for checkpoint in ["a", "b", "c"] {
        let series = format!("sdgate_checkpoint_loads_total{{checkpoint=\"{checkpoint}\",service=\"sd\"}}");
        counted += metric(gateway.admin, &series).await.unwrap_or(0.0);
    }
    assert_eq!(counted as u64, loads);
    let requested = metric(gateway.admin, "sdgate_checkpoint_requests_total{checkpoint=\"b\",service=\"sd\"}").await;
    assert_eq!(requested, Some(20.0));
    // The status page shows what each pod holds, as the pods say.
    let status = status(gateway.admin).await;
    for endpoint in status["services"][0]["endpoints"].as_array().expect("endpoints") {
        let pod = workers.iter().find(|w| endpoint["address"] == w.addr.to_string()).expect("a sim");
        assert_eq!(endpoint["checkpoint"], pod.stats().checkpoint, "{endpoint}");
    }
    // Each pod learned its generation time from the answers.
    for endpoint in status["services"][0]["endpoints"].as_array().expect("endpoints") {
        assert!(endpoint["generation_seconds"].as_f64().is_some_and(|s| s > 0.0), "{endpoint}");
    }
}

/// Checkpoint-blind routing (`checkpoints.route: false`) on the same
/// scenario, for contrast: it loads far more (the benchmark measures what
/// that costs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_routing_loads_again_and_again_on_the_same_scenario() {
    let workers = pods_on_a(3, Duration::from_millis(20)).await;
    let backends: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let gateway = TestGateway::in_front_of(&backends, 1, "    checkpoints: { route: false }\n").await;
    let addr = gateway.addr;
    let clients = ["a", "a", "b", "b", "c", "c"].map(|checkpoint| {
        tokio::spawn(async move {
            let client = client();
            let mut ok = 0;
            for _ in 0..10 {
                ok += usize::from(send(&client, for_checkpoint(addr, checkpoint, 2)).await.status == 200);
            }
            ok
        })
    });
    let mut ok = 0;
    for client in clients {
        ok += client.await.expect("client ran");
    }
    assert_eq!(ok, 60);
    let stats: Vec<_> = workers.iter().map(|w| w.stats()).collect();
    assert_no_overlap(&stats);
    let loads: u64 = stats.iter().map(|s| s.loads).sum();
    assert!(loads > 6, "blind routing loaded only {loads} times: the scenario would not tell the two apart");
}

/// One checkpoint for everyone: nothing to load, and the pods are used as
/// checkpoint-blind routing uses them (the gate's tests show the same
/// dispatch decision for decision).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_checkpoint_loads_nothing_and_keeps_every_pod_busy() {
    let workers = pods_on_a(3, Duration::from_millis(300)).await;
    let backends: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let gateway = TestGateway::in_front_of(&backends, 1, "").await;
    let addr = gateway.addr;
    let clients: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                let client = client();
                let mut ok = 0;
                for _ in 0..5 {
                    ok += usize::from(send(&client, for_checkpoint(addr, "a", 4)).await.status == 200);
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for client in clients {
        ok += client.await.expect("client ran");
    }
    assert_eq!(ok, 30);
    let stats: Vec<_> = workers.iter().map(|w| w.stats()).collect();
    assert_no_overlap(&stats);
    assert_eq!(stats.iter().map(|s| s.loads).sum::<u64>(), 0);
    assert!(stats.iter().all(|s| s.served > 0), "every pod served: {stats:?}");
}

/// A request for a checkpoint whose only pod is busy with a long job waits
/// for it at most `max_wait_for_match`, then loads its checkpoint on a free
/// pod: it is answered while the long job still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rare_checkpoint_waits_at_most_max_wait_for_match() {
    let on_a = sims(1, SimOptions { checkpoint: "a".into(), name: Some("pod-a".into()), ..fast_sim(10) }).await;
    let on_c = sims(1, SimOptions { checkpoint: "c".into(), name: Some("pod-c".into()), ..fast_sim(10) }).await;
    let backends = [on_a[0].addr, on_c[0].addr];
    // A load is said to cost a minute: without the bound it would wait for c's pod.
    let extra = "    checkpoints: { switch_cost: 60s, max_wait_for_match: 300ms }\n";
    let gateway = TestGateway::in_front_of(&backends, 1, extra).await;
    let addr = gateway.addr;
    // a is in use: a's pod is kept for it while that is cheaper.
    assert_eq!(send(&client(), for_checkpoint(addr, "a", 1)).await.status, 200);
    // c's pod starts a long job (400 steps of 10 ms).
    let long = tokio::spawn(async move { send(&client(), for_checkpoint(addr, "c", 400)).await });
    gateway.wait_for(|g| g.inflight() == 1, "the long job runs").await;
    let rare = send(&client(), for_checkpoint(addr, "c", 2)).await;
    assert_eq!(rare.status, 200);
    assert_eq!(rare.worker(), "pod-a", "it loaded c on the free pod");
    let long = long.await.expect("long job");
    assert_eq!((long.status.as_u16(), long.worker()), (200, "pod-c".to_string()));
    let [pod_a, pod_c] = [on_a[0].stats(), on_c[0].stats()];
    let rare_job = pod_a.jobs.last().expect("pod a ran the rare request");
    let long_job = pod_c.jobs.last().expect("pod c ran the long job");
    assert!(rare_job.ended_us < long_job.ended_us, "answered while the long job ran");
    assert!(rare_job.loaded && rare_job.checkpoint == "c");
    assert_no_overlap(&[pod_a, pod_c]);
}

/// What a pod holds is learned from its options before its first request,
/// and a request that names no checkpoint runs on the pod's setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_is_asked_what_it_holds_before_its_first_request() {
    let workers = sims(1, SimOptions { checkpoint: "sdxl-base.safetensors".into(), ..fast_sim(1) }).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let status = status(gateway.admin).await;
    assert_eq!(status["services"][0]["endpoints"][0]["checkpoint"], "sdxl-base");
    let plain = send(&client(), txt2img(gateway.addr, "no checkpoint named", 2)).await;
    assert_eq!(plain.status, 200);
    assert_eq!(workers[0].stats().loads, 0);
}

/// A pod that does not have the checkpoint a request names runs it on its
/// own (as the WebUI does); its answer says so, and sdgate believes it
/// rather than what it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_corrects_what_a_pod_is_taken_to_hold() {
    let options = SimOptions { checkpoint: "a".into(), available: vec!["a".into()], ..fast_sim(1) };
    let workers = sims(1, options).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let answer = send(&client(), for_checkpoint(gateway.addr, "not-on-this-pod", 2)).await;
    assert_eq!(answer.status, 200);
    let status = status(gateway.admin).await;
    assert_eq!(status["services"][0]["endpoints"][0]["checkpoint"], "a", "{status}");
    assert_eq!(workers[0].stats().loads, 0);
}
