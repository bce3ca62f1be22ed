//! Many users, one pool: a job belongs to its session. Interrupt, skip and
//! progress reach a pod only for the session whose request runs there; any
//! other caller (no cookie, a forged one, or its own valid one pinned to the
//! same pod) gets sdgate's own answer and the pod never hears of it. A strict
//! pin waits for its busy pod at most `affinity.max_wait`.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

fn post(addr: std::net::SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}{path}")).header("host", HOST).body(Full::new(Bytes::new())).expect("request")
}

/// The caller has no job: every `owner_only` path is answered by sdgate.
async fn assert_shut_out(client: &TestClient, addr: std::net::SocketAddr, jar: &Jar, who: &str) {
    for path in ["/sdapi/v1/interrupt", "/sdapi/v1/skip"] {
        let answer = send(client, jar.prepare(post(addr, path))).await;
        answer.assert_json_error(409);
        assert_eq!(answer.worker(), "", "{who}: {path} reached a pod");
    }
    let progress = send(client, jar.prepare(get(addr, "/sdapi/v1/progress"))).await;
    assert_eq!(progress.status, 200, "{who}");
    assert_eq!(progress.worker(), "", "{who}: progress reached a pod");
    assert_eq!(progress.json()["state"]["job_count"], 0, "{who}: {}", progress.json());
    let internal = send(client, jar.prepare(post(addr, "/internal/progress"))).await;
    assert_eq!(internal.status, 200, "{who}");
    assert_eq!(internal.json()["active"], false, "{who}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_forged_or_other_cookie_can_interrupt_skip_or_watch_a_running_job() {
    let workers = sims(2, fast_sim(20)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let keys = keys();
    let gateway = TestGateway::in_front_of(&addrs, 1, &affinity("strict", &keys, "")).await;
    let client = client();

    // Victim and attacker both start on the first pod (first available).
    let mut victim = Jar::default();
    let home = victim.send(&client, txt2img(gateway.addr, "victim-first", 1)).await.worker();
    let mut attacker = Jar::default();
    assert_eq!(attacker.send(&client, txt2img(gateway.addr, "attacker-first", 1)).await.worker(), home);

    // The victim's 40-step job runs on that pod.
    let long = {
        let (client, addr, victim) = (client.clone(), gateway.addr, victim.clone());
        tokio::spawn(async move { send(&client, victim.prepare(txt2img(addr, "victim-long", 40))).await })
    };
    gateway.wait_for(|g| g.inflight() == 1, "the victim's job running").await;

    assert_shut_out(&client, gateway.addr, &Jar::default(), "no cookie").await;
    assert_shut_out(&client, gateway.addr, &Jar::with("00ff00ff00ff00ff00ff00ff00ff00ff"), "forged cookie").await;
    assert_shut_out(&client, gateway.addr, &attacker, "own cookie, same pod").await;

    // The attacker's own request waits behind the victim's job (strict
    // pin): its progress shows its place in line, not the victim's job.
    let queued = {
        let (client, addr, attacker) = (client.clone(), gateway.addr, attacker.clone());
        tokio::spawn(async move { send(&client, attacker.prepare(txt2img(addr, "attacker-queued", 1))).await })
    };
    gateway.wait_for(|g| g.queue_depth() == 1, "the attacker's request waiting").await;
    let progress = send(&client, attacker.prepare(get(gateway.addr, "/sdapi/v1/progress"))).await;
    assert_eq!(progress.worker(), "");
    assert_eq!(progress.json()["state"]["job_count"], 0);
    assert_eq!(progress.json()["queue_position"], 0, "{}", progress.json());
    assert!(progress.json()["textinfo"].as_str().is_some_and(|t| t.contains("next in line")));

    // The victim sees its own job.
    let mine = send(&client, victim.prepare(get(gateway.addr, "/sdapi/v1/progress"))).await;
    assert_eq!(mine.worker(), home, "the owner's progress reaches its pod");
    assert_eq!(mine.json()["state"]["job_count"], 1);

    let long = long.await.unwrap();
    assert_eq!(long.status, 200);
    assert_eq!(queued.await.unwrap().status, 200);
    let stats: Vec<_> = workers.iter().map(|w| w.stats()).collect();
    assert!(stats.iter().all(|s| s.interrupts == 0), "no interrupt reached a pod: {stats:?}");
    let job = stats.iter().flat_map(|s| s.jobs.iter()).find(|j| j.prompt == "victim-long").unwrap();
    assert!(!job.interrupted, "the victim's job ran its full length");
    assert_no_overlap(&stats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_interrupts_its_own_job() {
    let workers = sims(2, fast_sim(20)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let keys = keys();
    let gateway = TestGateway::in_front_of(&addrs, 1, &affinity("strict", &keys, "")).await;
    let client = client();
    let mut owner = Jar::default();
    owner.send(&client, txt2img(gateway.addr, "first", 1)).await;
    let long = {
        let (client, addr, owner) = (client.clone(), gateway.addr, owner.clone());
        tokio::spawn(async move { send(&client, owner.prepare(txt2img(addr, "long", 500))).await })
    };
    gateway.wait_for(|g| g.inflight() == 1, "the job running").await;
    let answer = send(&client, owner.prepare(post(gateway.addr, "/sdapi/v1/interrupt"))).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(long.await.unwrap().status, 200);
    let stats: Vec<_> = workers.iter().map(|w| w.stats()).collect();
    assert_eq!(stats.iter().map(|s| s.interrupts).sum::<u64>(), 1);
    let job = stats.iter().flat_map(|s| s.jobs.iter()).find(|j| j.prompt == "long").unwrap();
    assert!(job.interrupted, "the owner's interrupt reached its job");
    // Its job over, the owner is shut out too.
    assert_shut_out(&client, gateway.addr, &owner, "owner, no job").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_affinity_no_caller_reaches_a_busy_pod_on_owner_only_paths() {
    let workers = sims(1, fast_sim(20)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let client = client();
    let long = {
        let (client, addr) = (client.clone(), gateway.addr);
        tokio::spawn(async move { send(&client, txt2img(addr, "long", 30)).await })
    };
    gateway.wait_for(|g| g.inflight() == 1, "the job running").await;
    assert_shut_out(&client, gateway.addr, &Jar::default(), "no affinity").await;
    assert_eq!(long.await.unwrap().status, 200);
    assert_eq!(workers[0].stats().interrupts, 0);
    assert!(!workers[0].stats().jobs[0].interrupted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_pin_moves_after_max_wait_while_another_pod_is_free() {
    let workers = sims(2, fast_sim(20)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let keys = keys();
    let extra = affinity("strict", &keys, "").replace("timeout: 1800s,", "timeout: 1800s, max_wait: 200ms,");
    let gateway = TestGateway::in_front_of(&addrs, 1, &extra).await;
    let client = client();
    let mut user = Jar::default();
    let home = user.send(&client, txt2img(gateway.addr, "first", 1)).await.worker();
    // Another session's long job (first available: the same pod).
    let long = {
        let (client, addr) = (client.clone(), gateway.addr);
        tokio::spawn(async move { send(&client, txt2img(addr, "other-long", 250)).await })
    };
    gateway.wait_for(|g| g.inflight() == 1, "the other job running").await;
    let moved = user.send(&client, txt2img(gateway.addr, "mine", 1)).await;
    assert_eq!(moved.status, 200);
    assert_ne!(moved.worker(), home, "the session moved to the free pod");
    assert!(!long.is_finished(), "it did not wait for the other session's job");
    assert_eq!(metric(gateway.admin, "sdgate_affinity_total{result=\"repinned\",service=\"sd\"}").await, Some(1.0));
    assert_eq!(long.await.unwrap().worker(), home);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_cookieless_requests_neither_move_a_pin_nor_take_table_space() {
    let workers = sims(2, fast_sim(1)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let keys = keys();
    let extra = affinity("strict", &keys, "").replace("timeout: 1800s,", "timeout: 1800s, max_sessions: 1000,");
    let gateway = TestGateway::in_front_of(&addrs, 1, &extra).await;
    let client = client();
    let mut user = Jar::default();
    let home = user.send(&client, txt2img(gateway.addr, "first", 1)).await.worker();
    // The cookie came back once: now the session has its place in the table.
    assert_eq!(user.send(&client, txt2img(gateway.addr, "second", 1)).await.worker(), home);

    let flood: Vec<_> = (0..8)
        .map(|_| {
            let (client, addr) = (client.clone(), gateway.addr);
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..2_500 {
                    ok += u32::from(send(&client, get(addr, "/sdapi/v1/options")).await.status == 200);
                }
                ok
            })
        })
        .collect();
    // The user keeps working through the flood, always on its pod.
    while !flood.iter().all(|f| f.is_finished()) {
        assert_eq!(user.send(&client, txt2img(gateway.addr, "during", 1)).await.worker(), home);
    }
    let mut answered = 0;
    for f in flood {
        answered += f.await.unwrap();
    }
    assert_eq!(answered, 20_000);
    assert_eq!(user.send(&client, txt2img(gateway.addr, "after", 1)).await.worker(), home);

    let service = &gateway.proxy.services()[0];
    let sessions = &service.affinity.as_ref().unwrap().sessions;
    assert_eq!(sessions.len(), 1, "only the session whose cookie came back holds a place");
    let status: serde_json::Value =
        send(&client, Request::get(format!("http://{}/status", gateway.admin)).body(Full::new(Bytes::new())).unwrap())
            .await
            .json();
    let counts: Vec<u64> = status["services"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sessions"].as_u64().unwrap())
        .collect();
    let mut sorted = counts.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [0, 1], "per-pod session counts: {counts:?}");
    assert_no_overlap(&workers.iter().map(|w| w.stats()).collect::<Vec<_>>());
}
