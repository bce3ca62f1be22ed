//! What scale-to-zero saves (`cargo bench --bench cost`): a bursty trace
//! replayed against the local worker pool, counting worker-seconds (sampled
//! from /proc every 20 ms) against an always-on pool at `max`, with latency
//! percentiles and errors.
//!
//! Trace: `BURSTS` (3) bursts of `BURST` (24) txt2img requests from 6 clients,
//! `GAP` seconds (25) apart. Workers: `sdgate sim` with a 2 s startup and 1 s
//! per image (20 steps x 50 ms), pool 0..4, stable window 6 s, grace 2 s.

// Times real work (wall clock), not sdgate's runtime: the std clock is right here.
#![allow(clippy::disallowed_types)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let bursts = env("BURSTS", 3);
    let burst = env("BURST", 24);
    let gap = Duration::from_secs(env("GAP", 25));
    let max = 4u64;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let marker = unique_marker("cost");
        let port_base = free_port_range(max as u16);
        let scale = format!("max: {max}, stable_window: 6s, panic_window: 2s, scale_to_zero_grace: 2s, tick: 500ms");
        let yaml = pool_yaml(&marker, port_base, "2s", &scale, "").replace("\"10ms\"", "\"50ms\"");
        let gateway = TestGateway::start(&yaml).await;

        let worker_seconds = Arc::new(Mutex::new(0.0f64));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (worker_seconds, stop, marker) = (worker_seconds.clone(), stop.clone(), marker.clone());
            std::thread::spawn(move || {
                let mut last = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                    let now = Instant::now();
                    let live = processes_with(&marker).len() as f64;
                    *worker_seconds.lock().expect("lock") += live * (now - last).as_secs_f64();
                    last = now;
                }
            })
        };

        let started = Instant::now();
        let client = client();
        let mut latencies = Vec::new();
        let mut errors = 0;
        for b in 0..bursts {
            if b > 0 {
                tokio::time::sleep(gap).await;
            }
            let per_client = burst.div_ceil(6);
            let mut tasks = Vec::new();
            for c in 0..6 {
                let (client, addr) = (client.clone(), gateway.addr);
                tasks.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    for i in 0..per_client {
                        let t = Instant::now();
                        let status = send(&client, txt2img(addr, &format!("{b}-{c}-{i}"), 20)).await.status;
                        out.push((t.elapsed(), status.as_u16()));
                    }
                    out
                }));
            }
            for task in tasks {
                for (latency, status) in task.await.expect("client") {
                    latencies.push(latency);
                    errors += usize::from(status != 200);
                }
            }
        }
        // The pool scales back to zero after the last burst; that idle tail is
        // part of the bill.
        let mut desired = gateway.desired.clone();
        while *desired.borrow_and_update() != 0 {
            let _ = desired.changed().await;
        }
        while !processes_with(&marker).is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let wall = started.elapsed();
        stop.store(true, Ordering::SeqCst);
        let _ = sampler.join();
        gateway.shutdown().await;

        latencies.sort_unstable();
        let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize].as_secs_f64();
        let used = *worker_seconds.lock().expect("lock");
        let always_on = max as f64 * wall.as_secs_f64();
        println!("| trace | requests | errors | p50 | p95 | worker-seconds (scale to zero) | always-on at max={max} | saved |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        println!(
            "| {bursts} bursts x {burst}, {}s gaps, {:.0}s in all | {} | {errors} | {:.2}s | {:.2}s | {used:.0} | {always_on:.0} | {:.0}% |",
            gap.as_secs(),
            wall.as_secs_f64(),
            latencies.len(),
            at(0.5),
            at(0.95),
            100.0 * (1.0 - used / always_on)
        );
    });
}
