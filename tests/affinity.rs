//! Session affinity: the signed `sd` cookie pins a client to its pod, cheap
//! calls follow the pin without a slot, bad cookies start new sessions, and a
//! session moves when its pod goes away.

// Times real work (wall clock), not sdgate's runtime: the std clock is right here.
#![allow(clippy::disallowed_types)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use sdgate::proxy::affinity::Signer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stays_on_its_worker_and_four_sessions_spread_over_four() {
    let workers = sims(4, fast_sim(10)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let keys = keys();
    let gateway = TestGateway::in_front_of(&addrs, 1, &affinity("strict", &keys, "")).await;
    let client = client();
    let mut sessions = Vec::new();
    for s in 0..4 {
        let (client, addr) = (client.clone(), gateway.addr);
        sessions.push(tokio::spawn(async move {
            let mut jar = Jar::default();
            let mut seen = Vec::new();
            for i in 0..10 {
                let answer = jar.send(&client, txt2img(addr, &format!("{s}-{i}"), 10)).await;
                assert_eq!(answer.status.as_u16(), 200);
                seen.push(answer.worker());
            }
            seen
        }));
    }
    let mut workers_used = std::collections::BTreeSet::new();
    for session in sessions {
        let seen = session.await.unwrap();
        assert!(seen.iter().all(|w| *w == seen[0]), "one session, one worker: {seen:?}");
        workers_used.insert(seen[0].clone());
    }
    assert_eq!(workers_used.len(), 4, "four sessions on four workers: {workers_used:?}");
    assert_no_overlap(&workers.iter().map(|w| w.stats()).collect::<Vec<_>>());
    assert_eq!(metric(gateway.admin, "sdgate_affinity_total{result=\"new\",service=\"sd\"}").await, Some(4.0));
    assert_eq!(metric(gateway.admin, "sdgate_affinity_total{result=\"hit\",service=\"sd\"}").await, Some(36.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_polls_reach_the_sessions_worker_during_its_generation_without_waiting() {
    let workers = sims(4, fast_sim(20)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let keys = keys();
    let gateway = TestGateway::in_front_of(&addrs, 1, &affinity("strict", &keys, "")).await;
    let client = client();
    let mut jar = Jar::default();
    let first = jar.send(&client, txt2img(gateway.addr, "warm up", 1)).await;
    let worker = first.worker();
    // A 2 s generation on the session's worker...
    let generation = {
        let (client, addr, jar) = (client.clone(), gateway.addr, jar.clone());
        tokio::spawn(async move { send(&client, jar.prepare(txt2img(addr, "two seconds", 100))).await })
    };
    gateway.wait_for(|g| g.inflight() == 1, "generation dispatched").await;
    // ...and progress polls from the same session.
    let mut fastest = Duration::MAX;
    let mut progress = 0.0;
    for _ in 0..3 {
        eventually("progress above 0", || {
            let (client, addr, jar) = (client.clone(), gateway.addr, jar.clone());
            async move {
                let answer = send(&client, jar.prepare(get(addr, "/sdapi/v1/progress"))).await;
                answer.json()["progress"].as_f64().unwrap_or(0.0) > 0.0
            }
        })
        .await;
        let started = Instant::now();
        let answer = jar.clone().send(&client, get(gateway.addr, "/sdapi/v1/progress")).await;
        fastest = fastest.min(started.elapsed());
        assert_eq!(answer.status.as_u16(), 200);
        assert_eq!(answer.worker(), worker, "the poll reached the session's worker");
        progress = answer.json()["progress"].as_f64().unwrap();
    }
    assert!(progress > 0.0);
    assert!(fastest <= Duration::from_millis(100), "progress took {fastest:?}");
    assert_eq!(gateway.inflight(), 1, "polls take no slot");
    let done = generation.await.unwrap();
    assert_eq!(done.status.as_u16(), 200);
    assert_eq!(done.worker(), worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cookies_start_new_sessions_and_the_previous_key_still_pins() {
    let workers = sims(3, fast_sim(5)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let keys = keys();
    let gateway = TestGateway::in_front_of(&addrs, 1, &affinity("strict", &keys, "")).await;
    let client = client();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let current = Signer::new(KEY.as_bytes(), None).unwrap().for_service("sd");
    let valid = current.sign(&[9; 16], now + 600);
    let mut flipped = valid.clone().into_bytes();
    flipped[10] = if flipped[10] == b'a' { b'b' } else { b'a' };
    let foreign = Signer::new(b"another key", None).unwrap().sign(&[9; 16], now + 600);
    let expired = current.sign(&[9; 16], now - 1);
    for bad in [String::from_utf8(flipped).unwrap(), foreign, expired, "garbage".to_string()] {
        let answer = Jar::with(&bad).send(&client, txt2img(gateway.addr, "bad cookie", 1)).await;
        assert_eq!(answer.status.as_u16(), 200, "a bad cookie is never an error");
        let fresh = set_cookie(&answer).expect("a fresh cookie");
        assert_ne!(fresh, bad);
        assert!(current.verify(&fresh, now).is_some(), "the fresh cookie is signed with the current key");
    }
    assert_eq!(metric(gateway.admin, "sdgate_affinity_total{result=\"invalid\",service=\"sd\"}").await, Some(4.0));

    let old = Signer::new(PREVIOUS_KEY.as_bytes(), None).unwrap().for_service("sd").sign(&[7; 16], now + 600);
    let mut seen = Vec::new();
    for i in 0..5 {
        let answer = Jar::with(&old).send(&client, txt2img(gateway.addr, &i.to_string(), 1)).await;
        assert_eq!(answer.status.as_u16(), 200);
        let reissued = set_cookie(&answer).expect("cookie re-issued");
        assert!(current.verify(&reissued, now).is_some(), "re-issued with the current key");
        seen.push(answer.worker());
    }
    assert!(seen.iter().all(|w| *w == seen[0]), "the previous key's session stays pinned: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cookie_is_http_only_lax_for_half_an_hour_on_every_path() {
    let workers = sims(1, fast_sim(1)).await;
    let keys = keys();
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, &affinity("strict", &keys, "")).await;
    let answer = send(&client(), txt2img(gateway.addr, "x", 1)).await;
    let header = answer.headers["set-cookie"].to_str().unwrap().to_string();
    let attributes: Vec<&str> = header.split("; ").collect();
    assert!(attributes[0].starts_with("sd=") && attributes[0].len() == 3 + 96, "{header}");
    for expected in ["HttpOnly", "SameSite=Lax", "Max-Age=1800", "Path=/"] {
        assert!(attributes.contains(&expected), "{expected} missing from {header}");
    }
    assert!(!attributes.contains(&"Secure"));
    // A client's own X-Forwarded-Proto is not believed...
    let https = |prompt: &str| {
        let mut request = txt2img(gateway.addr, prompt, 1);
        request.headers_mut().insert("x-forwarded-proto", "https".parse().unwrap());
        request
    };
    let plain = send(&client(), https("y")).await;
    assert!(!plain.headers["set-cookie"].to_str().unwrap().contains("; Secure"));
    let mut headers = get(gateway.addr, "/sim/headers");
    headers.headers_mut().insert("x-forwarded-proto", "https".parse().unwrap());
    headers.headers_mut().insert("x-forwarded-host", "evil.example".parse().unwrap());
    let seen = send(&client(), headers).await.json();
    assert_eq!((seen["x-forwarded-proto"].as_str(), seen["x-forwarded-host"].as_str()), (Some("http"), Some(HOST)));
    gateway.shutdown().await;
    // ...a trusted proxy's (one that terminated TLS in front) is.
    let trusted = "    fairness: { trusted_proxies: [\"127.0.0.1\"] }\n";
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, &affinity("strict", &keys, trusted)).await;
    let mut request = txt2img(gateway.addr, "y", 1);
    request.headers_mut().insert("x-forwarded-proto", "https".parse().unwrap());
    let secure = send(&client(), request).await;
    assert!(secure.headers["set-cookie"].to_str().unwrap().contains("; Secure"));
}

/// A pod's error answer passes through as the pod wrote it, and starts no
/// session: no cookie for a request the pod refused (a session with a
/// cookie keeps it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_answer_from_the_pod_sets_no_cookie() {
    let workers = sims(1, fast_sim(1)).await;
    let keys = keys();
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, &affinity("strict", &keys, "")).await;
    let request = Request::post(format!("http://{}/sdapi/v1/txt2img", gateway.addr))
        .header("host", HOST)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"[1, 2]")))
        .unwrap();
    let refused = send(&client(), request).await;
    assert_eq!(refused.status.as_u16(), 422);
    assert!(refused.json()["detail"].is_string(), "the pod's own body: {:?}", refused.body);
    assert!(!refused.headers.contains_key("set-cookie"), "{:?}", refused.headers);
    let answered = send(&client(), txt2img(gateway.addr, "x", 1)).await;
    assert_eq!(answered.status.as_u16(), 200);
    assert!(answered.headers.contains_key("set-cookie"));
    assert_eq!(workers[0].stats().served, 1);
}

/// Two workers behind affinity in `mode`: a session's first request ("first")
/// found its home worker, and the session's 15-step "long" generation now
/// keeps that worker busy while the other one is idle.
struct BusyHome {
    workers: Vec<sdgate::tools::sim::SimHandle>,
    gateway: TestGateway,
    client: TestClient,
    jar: Jar,
    home: String,
    long: tokio::task::JoinHandle<Answer>,
    _keys: (TempFile, TempFile),
}

async fn busy_home(mode: &str) -> BusyHome {
    let workers = sims(2, fast_sim(20)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let keys = keys();
    let gateway = TestGateway::in_front_of(&addrs, 1, &affinity(mode, &keys, "")).await;
    let client = client();
    let mut jar = Jar::default();
    let home = jar.send(&client, txt2img(gateway.addr, "first", 1)).await.worker();
    let long = {
        let (client, addr, jar) = (client.clone(), gateway.addr, jar.clone());
        tokio::spawn(async move { send(&client, jar.prepare(txt2img(addr, "long", 15))).await })
    };
    gateway.wait_for(|g| g.inflight() == 1, "long generation running").await;
    BusyHome { workers, gateway, client, jar, home, long, _keys: keys }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_session_waits_for_its_busy_worker_while_another_is_idle() {
    let BusyHome { workers, gateway, client, jar, home, long, _keys } = busy_home("strict").await;
    let next = {
        let (client, addr, jar) = (client.clone(), gateway.addr, jar.clone());
        tokio::spawn(async move { send(&client, jar.prepare(txt2img(addr, "next", 1))).await })
    };
    gateway
        .wait_for(|g| g.queue_depth() == 1 && g.ready_count() == 2, "the second request waits though a worker is idle")
        .await;
    assert_eq!(long.await.unwrap().worker(), home);
    assert_eq!(next.await.unwrap().worker(), home);
    let home_worker = workers.iter().find(|w| w.stats().name == home).unwrap();
    let prompts: Vec<_> = home_worker.stats().jobs.into_iter().map(|j| j.prompt).collect();
    assert_eq!(prompts, ["first", "long", "next"]);
    let other = workers.iter().find(|w| w.stats().name != home).unwrap();
    assert_eq!(other.stats().served, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preferring_session_takes_an_idle_worker_when_its_own_is_busy() {
    let BusyHome { workers: _workers, gateway, client, mut jar, home, long, _keys } = busy_home("prefer").await;
    let moved = jar.send(&client, txt2img(gateway.addr, "moved", 1)).await;
    assert_ne!(moved.worker(), home, "prefer mode does not wait for a busy worker");
    assert_eq!(long.await.unwrap().worker(), home);
    assert_eq!(metric(gateway.admin, "sdgate_affinity_total{result=\"repinned\",service=\"sd\"}").await, Some(1.0));
    // The session now lives on the worker it moved to.
    assert_eq!(jar.send(&client, txt2img(gateway.addr, "after", 1)).await.worker(), moved.worker());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_pinned_worker_dies_the_session_moves_with_a_rewritten_cookie() {
    let ports = [free_port().await, free_port().await];
    let mut children = Vec::new();
    for port in ports {
        children.push(
            tokio::process::Command::new(sdgate_bin())
                .args(["sim", "--port", &port.to_string(), "--step-time", "5ms"])
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
    }
    let addrs: Vec<_> = ports.iter().map(|p| format!("127.0.0.1:{p}").parse().unwrap()).collect();
    let keys = keys();
    let gateway = TestGateway::in_front_of(&addrs, 1, &affinity("strict", &keys, "")).await;
    let client = client();
    let mut jar = Jar::default();
    let home = jar.send(&client, txt2img(gateway.addr, "first", 1)).await.worker();
    let dead = ports.iter().position(|p| home == format!("sim-{p}")).unwrap();
    children[dead].start_kill().unwrap();
    let _ = children[dead].wait().await;
    let moved = jar.send(&client, txt2img(gateway.addr, "after death", 1)).await;
    assert_eq!(moved.status.as_u16(), 200);
    assert_ne!(moved.worker(), home);
    assert!(set_cookie(&moved).is_some(), "the cookie is rewritten");
    assert_eq!(metric(gateway.admin, "sdgate_affinity_total{result=\"repinned\",service=\"sd\"}").await, Some(1.0));
    assert_eq!(jar.send(&client, txt2img(gateway.addr, "again", 1)).await.worker(), moved.worker());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_client_without_cookies_is_pinned_by_its_session_header() {
    let workers = sims(3, fast_sim(5)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let keys = keys();
    let gateway = TestGateway::in_front_of(&addrs, 1, &affinity("strict", &keys, "")).await;
    let client = client();
    let mut seen = std::collections::BTreeSet::new();
    for key in ["alice", "bob", "carol"] {
        let mut workers_for_key = Vec::new();
        for i in 0..4 {
            let mut request = txt2img(gateway.addr, &format!("{key}{i}"), 3);
            request.headers_mut().insert("x-session-key", key.parse().unwrap());
            workers_for_key.push(send(&client, request).await.worker());
        }
        assert!(workers_for_key.iter().all(|w| *w == workers_for_key[0]), "{key}: {workers_for_key:?}");
        seen.insert(workers_for_key[0].clone());
    }
    assert!(!seen.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_generation_interrupts_it_and_the_worker_stays_busy_until_it_ends() {
    let workers = sims(1, fast_sim(20)).await;
    let keys = keys();
    let extra = affinity("strict", &keys, "    interrupt_on_disconnect: /sdapi/v1/interrupt\n");
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, &extra).await;
    let leaver = raw_request(gateway.addr, "leaver", 500).await;
    eventually("generation running", || {
        let stats = workers[0].stats();
        async move { stats.inflight == 1 }
    })
    .await;
    drop(leaver);
    eventually("the worker was told to interrupt", || {
        let interrupts = workers[0].stats().interrupts;
        async move { interrupts == 1 }
    })
    .await;
    let next = send(&client(), txt2img(gateway.addr, "next", 1)).await;
    assert_eq!(next.status.as_u16(), 200);
    let stats = workers[0].stats();
    assert_eq!(stats.max_inflight, 1);
    let jobs = stats.jobs;
    assert_eq!(jobs[0].prompt, "leaver");
    assert!(jobs[0].interrupted, "the departed client's generation ended early");
    assert!(jobs[0].ended_us - jobs[0].arrived_us < 5_000_000, "500 steps x 20 ms would take 10 s");
    assert!(jobs[1].arrived_us >= jobs[0].ended_us, "the next request waited for the interrupted one");
    gateway.wait_for(|g| g.inflight() == 0, "slot freed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_never_sees_the_affinity_cookie() {
    let workers = sims(1, fast_sim(1)).await;
    let keys = keys();
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, &affinity("strict", &keys, "")).await;
    let client = client();
    let mut jar = Jar::default();
    jar.send(&client, txt2img(gateway.addr, "a", 1)).await;
    let answer = jar.send(&client, get(gateway.addr, "/sim/headers")).await;
    let cookie = answer.json()["cookie"].as_str().unwrap_or("").to_string();
    assert_eq!(cookie, "theme=dark", "other cookies pass, sd does not");
}
