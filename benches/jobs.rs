//! What an async job costs, side by side in one run (`cargo bench --bench
//! jobs`):
//!
//! 1. **A job against a plain request**: one gateway with `jobs` on SQLite
//!    (and one on PostgreSQL, when 127.0.0.1 has it), one sim each (one
//!    step of `STEP_MS`, default 10 ms). Taking turns, `RUNS` (default 200)
//!    synchronous txt2img requests and `RUNS` jobs of the same request:
//!    submit (202), poll its URL every millisecond until it has ended, fetch
//!    its result. Reports p50/p95 of each, and the job's overhead at the
//!    median.
//! 2. **The store's cost per job**: the writes and reads one job makes
//!    (insert, running, finished with a 64 KiB result, one view, the result),
//!    `STORE_JOBS` (default 300) times, on each store.
//! 3. **The synchronous path, jobs on and off**: the same sync requests to a
//!    gateway with `jobs` and to one without, in alternating blocks of 100;
//!    the process's CPU time per request (getrusage: the sims and the client
//!    included, the same for both) per block, medians.

// Times real work (wall clock), not sdgate's runtime: the std clock is right here.
#![allow(clippy::disallowed_types)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let runs = env("RUNS", 200) as usize;
    let step = env("STEP_MS", 10);
    let store_jobs = env("STORE_JOBS", 300) as usize;
    let dir = std::env::temp_dir().join(unique_marker("sdgate-bench-jobs"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sqlite = format!("{{ file: \"{}\" }}", dir.join("jobs.sqlite3").display());
    let postgres = postgres_table("bench")
        .await
        .map(|(url, table)| format!("{{ postgres: {{ url: \"{url}\", table: {table} }} }}"));

    println!("## A job against a plain request ({runs} of each, taking turns; one step of {step} ms per generation)\n");
    println!("| store | plain request p50 | p95 | job submit (202) p50 | job, submit to result fetched p50 | p95 | overhead at the median |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, store) in [("sqlite", Some(sqlite.clone())), ("postgres", postgres.clone())] {
        let Some(store) = store else {
            println!("| {name} | (not reachable: skipped) | | | | | |");
            continue;
        };
        let workers = sims(1, fast_sim(step)).await;
        let yaml = format!("jobs: {{ store: {store} }}\n{}", config_yaml(&[workers[0].addr], 1, ""));
        let gateway = TestGateway::start(&yaml).await;
        gateway.wait_for(|g| g.ready_count() == 1, "the pod ready").await;
        let (mut plain, mut submits, mut jobs) = (Vec::new(), Vec::new(), Vec::new());
        let client = client();
        for i in 0..runs {
            let started = Instant::now();
            let answer = send(&client, txt2img(gateway.addr, &format!("plain {i}"), 1)).await;
            assert_eq!(answer.status.as_u16(), 200);
            plain.push(started.elapsed());
            let (submit, whole) = one_job(&client, gateway.addr, &format!("job {i}")).await;
            submits.push(submit);
            jobs.push(whole);
        }
        let (p, s, j) = (quantiles(&mut plain), quantiles(&mut submits), quantiles(&mut jobs));
        println!(
            "| {name} | {} | {} | {} | {} | {} | +{} |",
            ms(p.0),
            ms(p.1),
            ms(s.0),
            ms(j.0),
            ms(j.1),
            ms(j.0.saturating_sub(p.0))
        );
        gateway.shutdown().await;
    }

    println!("\n## The store's cost per job ({store_jobs} jobs; insert, running, finished with a 64 KiB result, a view, the result)\n");
    println!("| store | per job | insert | running | finished | view | result |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (name, store) in [("sqlite", Some(sqlite.clone())), ("postgres", postgres.clone())] {
        let Some(store) = store else {
            println!("| {name} | (not reachable: skipped) | | | | | |");
            continue;
        };
        let config: sdgate::config::JobsConfig =
            serde_yaml::from_str(&format!("store: {store}")).expect("a jobs config");
        let store = sdgate::jobs::store::Store::open(&config.store).await.expect("the store");
        let times = store_cost(&store, store_jobs).await;
        let per = |d: Duration| format!("{:.0} us", d.as_secs_f64() * 1e6 / store_jobs as f64);
        let total: Duration = times.iter().sum();
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} |",
            per(total),
            per(times[0]),
            per(times[1]),
            per(times[2]),
            per(times[3]),
            per(times[4])
        );
    }

    println!(
        "\n## The synchronous path, jobs on and off (CPU per request of the whole process, medians of blocks of 100)\n"
    );
    let workers = sims(2, fast_sim(0)).await;
    let with =
        TestGateway::start(&format!("jobs: {{ store: {sqlite} }}\n{}", config_yaml(&[workers[0].addr], 0, ""))).await;
    let without = TestGateway::start(&config_yaml(&[workers[1].addr], 0, "")).await;
    with.wait_for(|g| g.ready_count() == 1, "ready").await;
    without.wait_for(|g| g.ready_count() == 1, "ready").await;
    let client = client();
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..(runs / 10).max(10) {
        for (addr, out) in [(with.addr, &mut on), (without.addr, &mut off)] {
            let before = cpu();
            for i in 0..100 {
                let answer = send(&client, txt2img(addr, &format!("{round} {i}"), 1)).await;
                assert_eq!(answer.status.as_u16(), 200);
            }
            out.push((cpu() - before) / 100);
        }
    }
    let (on, off) = (quantiles(&mut on).0, quantiles(&mut off).0);
    println!("| gateway | CPU per sync request |");
    println!("| --- | ---: |");
    println!("| jobs on (SQLite) | {:.1} us |", on.as_secs_f64() * 1e6);
    println!("| jobs off | {:.1} us |", off.as_secs_f64() * 1e6);
    with.shutdown().await;
    without.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Submit, poll until ended, fetch the result: (the submit's time, the whole).
async fn one_job(client: &TestClient, addr: SocketAddr, prompt: &str) -> (Duration, Duration) {
    let started = Instant::now();
    let mut request = txt2img(addr, prompt, 1);
    request.headers_mut().insert("prefer", "respond-async".parse().expect("a header"));
    let answer = send(client, request).await;
    assert_eq!(answer.status.as_u16(), 202);
    let submitted = started.elapsed();
    let url = answer.json()["url"].as_str().expect("a url").to_string();
    loop {
        let view = send(client, get(addr, &url)).await.json();
        if view["state"] == "succeeded" {
            break;
        }
        assert!(view["state"] == "queued" || view["state"] == "running", "{view}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let result = send(client, get(addr, &format!("{url}/result"))).await;
    assert_eq!(result.status.as_u16(), 200);
    (submitted, started.elapsed())
}

/// The time of each kind of store call over `n` jobs.
async fn store_cost(store: &sdgate::jobs::store::Store, n: usize) -> [Duration; 5] {
    use sdgate::jobs::store::{Ending, New, Row};
    use sdgate::jobs::{new_id, now_us, State};
    let mut times = [Duration::ZERO; 5];
    let result = vec![b'x'; 64 * 1024];
    for _ in 0..n {
        let id = new_id().expect("an id");
        let row = Row {
            id: id.clone(),
            service: "bench".into(),
            owner: "0".repeat(64),
            state: State::Queued,
            created_us: now_us(),
            started_us: None,
            finished_us: None,
            expires_us: None,
            attempts: 0,
            pod: None,
            error: None,
            webhook: None,
            webhook_state: None,
            result_status: None,
            result_headers: None,
            request_bytes: 300,
            result_bytes: 0,
        };
        let at = Instant::now();
        store.insert(New { row, head: "{}".repeat(100), body: vec![b'{'; 100] }).await.expect("insert");
        times[0] += at.elapsed();
        let at = Instant::now();
        store.set_running(&id, "127.0.0.1:7860", now_us()).await.expect("running");
        times[1] += at.elapsed();
        let at = Instant::now();
        let ending = Ending {
            state: State::Succeeded,
            finished_us: now_us(),
            expires_us: now_us(),
            error: None,
            status: Some(200),
            headers: Some("[[\"content-type\",\"application/json\"]]".into()),
            body: Some(result.clone()),
            webhook_state: None,
        };
        store.finish(&id, ending).await.expect("finish");
        times[2] += at.elapsed();
        let at = Instant::now();
        store.get(&id).await.expect("get");
        times[3] += at.elapsed();
        let at = Instant::now();
        store.result_body(&id).await.expect("result");
        times[4] += at.elapsed();
    }
    store.expire(now_us() + 1).await.expect("cleaned up");
    times
}

fn cpu() -> Duration {
    // SAFETY: getrusage writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn quantiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.95))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
