//! Checkpoint-aware routing against checkpoint-blind routing, side by side
//! in one run (`cargo bench --bench checkpoints`).
//!
//! Three gateways in this process, one with `checkpoints.route: true` (the
//! default), one that also bounds a pod's idle spell by its load time
//! (`max_pod_idle: load`) and one with `route: false`, each in front of its own 4 sims
//! that all start on checkpoint `ck1`, load a checkpoint in `LOAD_MS`
//! (default 1500) and generate in 4 steps of `STEP_MS` (default 50: 0.2 s).
//! Both get the same trace at the same time: `REQUESTS` (default 120)
//! txt2img requests naming one of 5 checkpoints drawn from a Zipf law
//! (s = 1: ck1 is asked for most), sent by `CLIENTS` (default 8) clients
//! that each send their next request when the last is answered.
//!
//! Reports, for each: checkpoint loads (counted by the pods; then of ck1..ck5), p50 and p95 of
//! the request latency, the makespan (first request to last answer), and
//! how long a ready pod sat idle while requests waited (the gate sampled
//! every 10 ms: the share of samples with one so, and the longest spell of
//! one pod); then the
//! same for a trace that names one checkpoint only, where both must do the
//! same.

// Times real work (wall clock), not sdgate's runtime: the std clock is right here.
#![allow(clippy::disallowed_types)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use sdgate::tools::sim::{SimHandle, SimOptions};

const PODS: usize = 4;
const CHECKPOINTS: usize = 5;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let requests = env("REQUESTS", 120) as usize;
    let clients = env("CLIENTS", 8) as usize;
    let load = Duration::from_millis(env("LOAD_MS", 1500));
    let step = Duration::from_millis(env("STEP_MS", 50));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mixed = zipf_trace(requests, 0x5d_22);
    let single = vec![1; requests];
    println!(
        "{PODS} pods starting on ck1, loads of {} ms, generations of 4 x {} ms; {requests} requests from {clients} clients, each sending its next when answered\n",
        load.as_millis(),
        step.as_millis()
    );
    println!("| trace | routing | loads (ck1..ck5) | p50 | p95 | makespan | idle pod while requests wait |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, trace) in [("Zipf over 5 checkpoints", &mixed), ("one checkpoint", &single)] {
        let counts: Vec<usize> = (1..=CHECKPOINTS).map(|k| trace.iter().filter(|c| **c == k).count()).collect();
        let (aware, by_load, blind) = runtime.block_on(async {
            tokio::join!(
                run(trace, clients, load, step, "route: true"),
                run(trace, clients, load, step, "route: true, max_pod_idle: load"),
                run(trace, clients, load, step, "route: false")
            )
        });
        for (routing, result) in [
            ("checkpoint-aware", aware),
            ("checkpoint-aware, max_pod_idle: load", by_load),
            ("checkpoint-blind", blind),
        ] {
            println!(
                "| {name} {counts:?} | {routing} | {} {:?} | {} | {} | {} | {:.1} % of samples, longest {} |",
                result.loads,
                result.by_checkpoint,
                secs(result.at(0.5)),
                secs(result.at(0.95)),
                secs(result.makespan),
                result.idle.share() * 100.0,
                secs(result.idle.longest)
            );
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Checkpoint numbers 1..=5 with probability proportional to 1/k.
fn zipf_trace(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let weights: Vec<f64> = (1..=CHECKPOINTS).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    (0..n)
        .map(|_| {
            let mut x = rng.f64() * total;
            for (k, w) in weights.iter().enumerate() {
                if x < *w {
                    return k + 1;
                }
                x -= w;
            }
            CHECKPOINTS
        })
        .collect()
}

/// Samples of the gate: how often, and how long at most, a ready pod with
/// room sat idle while requests waited.
#[derive(Default)]
struct IdleWhileWaiting {
    samples: u64,
    idle: u64,
    longest: Duration,
}

impl IdleWhileWaiting {
    fn share(&self) -> f64 {
        self.idle as f64 / self.samples.max(1) as f64
    }
}

/// Samples `gate` every 10 ms until `done`: the share of samples with
/// some pod idle while requests wait, and the longest spell of one pod.
async fn sample_idle(
    gate: Arc<sdgate::gate::SharedGate>,
    done: Arc<std::sync::atomic::AtomicBool>,
) -> IdleWhileWaiting {
    let mut seen = IdleWhileWaiting::default();
    let mut since: std::collections::HashMap<sdgate::gate::EndpointId, Instant> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        tick.tick().await;
        let idle: Vec<sdgate::gate::EndpointId> = gate.inspect(|g| match g.queue_depth() > 0 {
            true => g
                .endpoints()
                .iter()
                .filter(|e| e.ready && !e.draining && e.quarantined == 0 && e.inflight == 0)
                .map(|e| e.id)
                .collect(),
            false => Vec::new(),
        });
        seen.samples += 1;
        seen.idle += u64::from(!idle.is_empty());
        since.retain(|id, _| idle.contains(id));
        for id in idle {
            let start = *since.entry(id).or_insert_with(Instant::now);
            seen.longest = seen.longest.max(start.elapsed());
        }
    }
    seen
}

struct Result {
    idle: IdleWhileWaiting,
    loads: u64,
    /// Loads of ck1..ck5.
    by_checkpoint: [usize; CHECKPOINTS],
    latencies: Vec<Duration>,
    makespan: Duration,
}

impl Result {
    fn at(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
    }
}

async fn run(trace: &[usize], clients: usize, load: Duration, step: Duration, checkpoints: &str) -> Result {
    let options = SimOptions { checkpoint: "ck1".into(), load_time: load, ..fast_sim(step.as_millis() as u64) };
    let pods: Vec<SimHandle> = sims(PODS, options).await;
    let backends: Vec<SocketAddr> = pods.iter().map(|p| p.addr).collect();
    let extra = format!("    queue: {{ timeout: 600s }}\n    checkpoints: {{ {checkpoints} }}\n");
    let gateway = TestGateway::in_front_of(&backends, 1, &extra).await;
    let addr = gateway.addr;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn(sample_idle(gateway.proxy.services()[0].gate.clone(), done.clone()));
    let next = Arc::new(Mutex::new(trace.iter().copied().collect::<std::collections::VecDeque<_>>()));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                let client = client();
                let mut latencies = Vec::new();
                loop {
                    let Some(checkpoint) = next.lock().expect("trace").pop_front() else { break };
                    let sent = Instant::now();
                    let answer = send(&client, request(addr, checkpoint)).await;
                    assert_eq!(answer.status, 200, "{:?}", answer.body);
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("client"));
    }
    let makespan = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let idle = sampler.await.expect("sampler");
    let stats: Vec<_> = pods.iter().map(|p| p.stats()).collect();
    assert_no_overlap(&stats);
    gateway.shutdown().await;
    let mut by_checkpoint = [0; CHECKPOINTS];
    for job in stats.iter().flat_map(|s| &s.jobs).filter(|j| j.loaded) {
        if let Some(k) = job.checkpoint.strip_prefix("ck").and_then(|k| k.parse::<usize>().ok()) {
            by_checkpoint[k.clamp(1, CHECKPOINTS) - 1] += 1;
        }
    }
    Result { idle, loads: stats.iter().map(|s| s.loads).sum(), by_checkpoint, latencies, makespan }
}

fn request(addr: SocketAddr, checkpoint: usize) -> Request<Full<Bytes>> {
    txt2img_json(
        addr,
        serde_json::json!({
            "prompt": "pretty dog",
            "steps": 4,
            "override_settings": { "sd_model_checkpoint": format!("ck{checkpoint}.safetensors") },
        }),
    )
}
