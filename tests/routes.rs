//! Routes and live reload (issue #12): weighted splits across revisions,
//! sessions kept on their revision, and reloads that drop no request.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use sdgate::tools::sim::SimHandle;
use sdgate::Config;

/// One revision: a service over `workers`.
fn service_yaml(name: &str, workers: &[SimHandle], cc: u32, extra: &str) -> String {
    let fixed: Vec<String> = workers.iter().map(|w| format!("\"{}\"", w.addr)).collect();
    format!(
        "  - name: {name}\n    container_concurrency: {cc}\n    readiness: {{ http: /internal/ping, period: 20ms }}\n    backend: {{ fixed: [{}] }}\n{extra}",
        fixed.join(", ")
    )
}

/// A config: `services` (from [`service_yaml`]), then one route on [`HOST`]
/// splitting across `split` (service, weight).
fn config_with_route(services: &[String], split: &[(&str, u32)]) -> String {
    let split: Vec<String> = split.iter().map(|(s, w)| format!("      - {{ service: {s}, weight: {w} }}\n")).collect();
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ndrain_timeout: 10s\nservices:\n{}routes:\n  - name: sd\n    hosts: [\"{HOST}\"]\n    split:\n{}",
        services.concat(),
        split.concat()
    )
}

async fn all_ready(gateway: &TestGateway, pods: usize) {
    let proxy = gateway.proxy.clone();
    eventually("every pod ready", || {
        let ready: usize = proxy.services().iter().map(|s| s.gate.inspect(|g| g.ready_count())).sum();
        async move { ready == pods }
    })
    .await;
}

async fn reload(gateway: &TestGateway, yaml: &str) {
    let config = Config::from_yaml(yaml).expect("a valid config");
    gateway.reloader.reload(Ok(config)).await.expect("reloaded");
}

fn get_with_cookie(addr: SocketAddr, cookie: Option<&str>) -> Request<Full<Bytes>> {
    let mut request = get(addr, "/sdapi/v1/options");
    if let Some(cookie) = cookie {
        request.headers_mut().insert("cookie", cookie.parse().expect("cookie"));
    }
    request
}

/// The `sd=...` pair of an answer's Set-Cookie.
fn cookie_of(answer: &Answer) -> Option<String> {
    let value = answer.headers.get("set-cookie")?.to_str().ok()?;
    value.split(';').next().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_requests_on_a_90_10_split_land_within_three_points() {
    let (v1, v2) = (sims(1, fast_sim(1)).await, sims(1, fast_sim(1)).await);
    let yaml = config_with_route(
        &[service_yaml("sd-v1", &v1, 0, ""), service_yaml("sd-v2", &v2, 0, "")],
        &[("sd-v1", 90), ("sd-v2", 10)],
    );
    let gateway = TestGateway::start(&yaml).await;
    all_ready(&gateway, 2).await;
    let client = client();
    let mut lanes = Vec::new();
    for _ in 0..16 {
        let (client, addr) = (client.clone(), gateway.addr);
        lanes.push(tokio::spawn(async move {
            let mut workers = Vec::new();
            for _ in 0..125 {
                let answer = send(&client, get(addr, "/sdapi/v1/options")).await;
                assert_eq!(answer.status, 200);
                workers.push(answer.worker());
            }
            workers
        }));
    }
    let mut counts: HashMap<String, u32> = HashMap::new();
    for lane in lanes {
        for worker in lane.await.expect("lane") {
            *counts.entry(worker).or_default() += 1;
        }
    }
    let to_v1 = counts.get(&v1[0].stats().name).copied().unwrap_or(0);
    let to_v2 = counts.get(&v2[0].stats().name).copied().unwrap_or(0);
    assert_eq!(to_v1 + to_v2, 2000, "{counts:?}");
    let share = f64::from(to_v1) / 2000.0;
    assert!((0.87..=0.93).contains(&share), "sd-v1 got {:.1} % (90 +- 3 expected)", share * 100.0);
    let series = |service: &str| format!("sdgate_route_requests_total{{route=\"sd\",service=\"{service}\"}}");
    assert_eq!(metric(gateway.admin, &series("sd-v1")).await, Some(f64::from(to_v1)));
    assert_eq!(metric(gateway.admin, &series("sd-v2")).await, Some(f64::from(to_v2)));
    // /status shows the route, its weights and last minute's shares.
    let status =
        send(&client, Request::get(format!("http://{}/status", gateway.admin)).body(Full::default()).expect("request"))
            .await
            .json();
    let split = &status["routes"][0]["split"];
    assert_eq!(status["routes"][0]["name"], "sd");
    assert_eq!((split[0]["service"].as_str(), split[0]["weight"].as_u64()), (Some("sd-v1"), Some(90)));
    assert_eq!(split[0]["requests_last_minute"].as_u64(), Some(u64::from(to_v1)));
    assert!((split[0]["share_last_minute"].as_f64().unwrap_or(0.0) - share).abs() < 1e-9);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_stay_on_their_revision_also_after_a_reload_moves_every_weight_away() {
    let (v1, v2) = (sims(1, fast_sim(1)).await, sims(1, fast_sim(1)).await);
    let affinity = "    affinity: { timeout: 1800s }\n";
    let services = [service_yaml("sd-v1", &v1, 0, affinity), service_yaml("sd-v2", &v2, 0, affinity)];
    let gateway = TestGateway::start(&config_with_route(&services, &[("sd-v1", 50), ("sd-v2", 50)])).await;
    all_ready(&gateway, 2).await;
    let client = client();
    let addr = gateway.addr;
    // 200 sessions: one request each to start them, then two more.
    let sessions = Arc::new(tokio::sync::Mutex::new(Vec::<(String, String)>::new()));
    let run_lanes = |requests: usize| {
        let (client, sessions) = (client.clone(), sessions.clone());
        async move {
            let mut lanes = Vec::new();
            for lane in 0..20 {
                let (client, sessions) = (client.clone(), sessions.clone());
                lanes.push(tokio::spawn(async move {
                    for i in (lane..200).step_by(20) {
                        let mut known = sessions.lock().await.get(i).cloned();
                        for _ in 0..requests {
                            let cookie = known.as_ref().map(|(cookie, _)| cookie.as_str());
                            let answer = send(&client, get_with_cookie(addr, cookie)).await;
                            assert_eq!(answer.status, 200);
                            let cookie = cookie_of(&answer).expect("a session cookie");
                            match &known {
                                Some((_, worker)) => assert_eq!(&answer.worker(), worker, "session {i} moved"),
                                None => known = Some((cookie.clone(), answer.worker())),
                            }
                            if let Some(known) = known.as_mut() {
                                known.0 = cookie;
                            }
                        }
                        let mut all = sessions.lock().await;
                        match all.get_mut(i) {
                            Some(slot) => *slot = known.expect("a session"),
                            None => all.push(known.expect("a session")),
                        }
                    }
                }));
            }
            for lane in lanes {
                lane.await.expect("lane");
            }
        }
    };
    // Sessions are created in index order so that `sessions[i]` is session i.
    for i in 0..200 {
        let answer = send(&client, get_with_cookie(addr, None)).await;
        assert_eq!(answer.status, 200, "session {i}");
        sessions.lock().await.push((cookie_of(&answer).expect("a session cookie"), answer.worker()));
    }
    run_lanes(2).await;
    let on_v1 = sessions.lock().await.iter().filter(|(_, w)| *w == v1[0].stats().name).count();
    assert!(on_v1 > 50 && on_v1 < 150, "both revisions have sessions ({on_v1} on sd-v1)");

    // Every weight moves to sd-v2: sessions on sd-v1 stay there.
    reload(&gateway, &config_with_route(&services, &[("sd-v1", 0), ("sd-v2", 100)])).await;
    run_lanes(2).await;
    for _ in 0..50 {
        let answer = send(&client, get_with_cookie(addr, None)).await;
        assert_eq!(answer.worker(), v2[0].stats().name, "a new session goes to the new revision");
    }
    assert_eq!(v1[0].stats().served + v2[0].stats().served, 0, "no generation: options only");
    // /status counts the last minute across the reload: 200 x 5 + 50 requests.
    let status =
        send(&client, Request::get(format!("http://{}/status", gateway.admin)).body(Full::default()).expect("request"))
            .await
            .json();
    let counted: u64 = status["routes"][0]["split"]
        .as_array()
        .expect("split")
        .iter()
        .map(|s| s["requests_last_minute"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(counted, 1050);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_fifty_queued_and_four_in_flight_answers_every_one_of_them() {
    // `keep`: one worker at cc 2; `gone`: two workers at cc 1.
    let keep = sims(1, fast_sim(30)).await;
    let gone = sims(2, fast_sim(30)).await;
    let before = config_with_route(
        &[
            service_yaml("keep", &keep, 2, "    queue: { max_depth: 100, timeout: 60s }\n    scale: { max: 1 }\n"),
            service_yaml("gone", &gone, 1, "    queue: { max_depth: 100, timeout: 60s }\n"),
        ],
        &[("keep", 50), ("gone", 50)],
    );
    let gateway = TestGateway::start(&before).await;
    all_ready(&gateway, 3).await;
    let client = client();
    let mut requests = Vec::new();
    for i in 0..54 {
        let (client, addr) = (client.clone(), gateway.addr);
        requests.push(tokio::spawn(async move { send(&client, txt2img(addr, &format!("r{i}"), 4)).await }));
    }
    let proxy = gateway.proxy.clone();
    eventually("4 in flight and 50 queued", || {
        let (inflight, queued) = proxy
            .services()
            .iter()
            .map(|s| s.gate.inspect(|g| (g.inflight(), g.queue_depth())))
            .fold((0, 0), |(a, b), (i, q)| (a + i, b + q));
        async move { inflight == 4 && queued == 50 }
    })
    .await;
    // New weights (all to `keep`), keep's cc 2 -> 1 and scale, `gone` removed.
    let after = config_with_route(
        &[service_yaml("keep", &keep, 1, "    queue: { max_depth: 100, timeout: 60s }\n    scale: { max: 2 }\n")],
        &[("keep", 100)],
    );
    reload(&gateway, &after).await;
    assert_eq!(gateway.proxy.services().len(), 1, "gone takes no new requests");
    let mut answered = 0;
    for request in requests {
        let answer = request.await.expect("request task");
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        answered += 1;
    }
    assert_eq!(answered, 54);
    assert_no_overlap(&gone.iter().map(SimHandle::stats).collect::<Vec<_>>());
    let served: u64 = keep.iter().chain(&gone).map(|w| w.stats().served).sum();
    assert_eq!(served, 54);
    // keep now holds one generation at a time: six at once overlap nowhere.
    let overlaps = keep[0].stats().overlaps;
    let mut more = Vec::new();
    for i in 0..6 {
        let (client, addr) = (client.clone(), gateway.addr);
        more.push(tokio::spawn(async move { send(&client, txt2img(addr, &format!("after {i}"), 2)).await.status }));
    }
    for status in more {
        assert_eq!(status.await.expect("request task"), 200);
    }
    assert_eq!(keep[0].stats().overlaps, overlaps, "cc 1 after the reload");
    assert_eq!(metric(gateway.admin, "sdgate_config_reloads_total{result=\"ok\"}").await, Some(1.0));
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_keeps_the_old_config_and_says_which_key() {
    let workers = sims(1, fast_sim(1)).await;
    let yaml = config_with_route(&[service_yaml("sd-v1", &workers, 1, "")], &[("sd-v1", 100)]);
    let gateway = TestGateway::start(&yaml).await;
    all_ready(&gateway, 1).await;
    // A config that does not load: the error names the key.
    let broken = yaml.replace("container_concurrency: 1", "container_concurrency: many");
    let error = Config::from_yaml(&broken).map_err(|e| format!("{e:#}")).expect_err("invalid");
    let refused = gateway.reloader.reload(Err(error)).await.expect_err("refused");
    assert!(refused.contains("services[0].container_concurrency"), "{refused}");
    // One that loads but may not be applied live.
    let moved = Config::from_yaml(&yaml.replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:1")).expect("valid");
    let refused = gateway.reloader.reload(Ok(moved)).await.expect_err("refused");
    assert!(refused.starts_with("listen:"), "{refused}");
    // A kept service's pool or its autoscaler's mode: a new service, or a restart.
    let external =
        Config::from_yaml(&yaml.replace("backend:", "scale: { mode: external }\n    backend:")).expect("valid");
    let refused = gateway.reloader.reload(Ok(external)).await.expect_err("refused");
    assert!(refused.starts_with("services[0].scale:"), "{refused}");
    // A route naming no service is refused by validation.
    let unknown = yaml.replace("service: sd-v1, weight: 100", "service: sd-v9, weight: 100");
    assert!(Config::from_yaml(&unknown).is_err_and(|e| e.to_string().contains("routes[0].split[0].service")));
    // Served as before.
    assert_eq!(send(&client(), txt2img(gateway.addr, "still here", 1)).await.status, 200);
    assert_eq!(metric(gateway.admin, "sdgate_config_reloads_total{result=\"error\"}").await, Some(3.0));
    assert_eq!(metric(gateway.admin, "sdgate_config_reloads_total{result=\"ok\"}").await, Some(0.0));
    // Every weight at 0: 503 naming the route.
    reload(&gateway, &yaml.replace("weight: 100", "weight: 0")).await;
    let answer = send(&client(), txt2img(gateway.addr, "nowhere", 1)).await;
    answer.assert_json_error(503);
    assert_eq!(answer.json()["route"], "sd");
    gateway.shutdown().await;
}
