//! Async jobs (`Prefer: respond-async`): a request answered 202 at once,
//! run through the gate like any other, its result fetched later by its
//! owner only; cancel; webhooks; and jobs that outlive a SIGKILL of sdgate,
//! on the embedded store (SQLite) and on PostgreSQL (the real server on
//! 127.0.0.1; `SDGATE_JOBS_POSTGRES=required` makes its absence a failure,
//! as CI sets it).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

/// The top-level `jobs` key for a config, on `store`.
fn jobs_key(store: &str, extra: &str) -> String {
    format!("jobs: {{ store: {store}{extra} }}\n")
}

fn sqlite_store(dir: &TempDir) -> String {
    format!("{{ file: \"{}\" }}", dir.path.join("jobs.sqlite3").display())
}

fn submit_request(addr: SocketAddr, prompt: &str, steps: u32) -> Request<Full<Bytes>> {
    let mut request = txt2img(addr, prompt, steps);
    request.headers_mut().insert("prefer", "respond-async".parse().unwrap());
    request
}

/// Submits; the job's id (asserting the 202 and its Location).
async fn submit(client: &TestClient, jar: &mut Jar, addr: SocketAddr, prompt: &str, steps: u32) -> String {
    let answer = jar.send(client, submit_request(addr, prompt, steps)).await;
    assert_eq!(answer.status.as_u16(), 202, "{}", String::from_utf8_lossy(&answer.body));
    let id = answer.json()["id"].as_str().expect("an id").to_string();
    let location = answer.headers.get("location").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert_eq!(location, format!("/.sdgate/jobs/{id}"));
    assert_eq!(answer.headers.get("preference-applied").and_then(|v| v.to_str().ok()), Some("respond-async"));
    assert_eq!(id.len(), 32, "128 bits in hex");
    id
}

async fn job(client: &TestClient, jar: &Jar, addr: SocketAddr, id: &str) -> Answer {
    send(client, jar.prepare(get(addr, &format!("/.sdgate/jobs/{id}")))).await
}

/// Waits (at most `limit`) until the job's state is `state`; its view.
async fn job_becomes(
    client: &TestClient,
    jar: &Jar,
    addr: SocketAddr,
    id: &str,
    state: &str,
    limit: Duration,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let view = job(client, jar, addr, id).await.json();
        if view["state"] == state {
            return view;
        }
        assert!(tokio::time::Instant::now() < deadline, "job {id} not {state} within {limit:?}: {view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn delete(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::delete(format!("http://{addr}{path}")).header("host", HOST).body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_answered_at_once_and_its_result_read_later_by_its_owner_only() {
    let dir = TempDir::new();
    let workers = sims(1, fast_sim(20)).await;
    let keys = keys();
    let yaml = format!(
        "{}{}",
        jobs_key(&sqlite_store(&dir), ""),
        config_yaml(&[workers[0].addr], 1, &affinity("prefer", &keys, ""))
    );
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "the pod ready").await;
    let client = client();
    // The submit starts a session (the cookie), and the client leaves.
    let mut owner = Jar::default();
    let id = submit(&client, &mut owner, gateway.addr, "mine", 3).await;
    assert!(owner.cookie.is_some(), "a session for the owner");
    let view = job_becomes(&client, &owner, gateway.addr, &id, "succeeded", Duration::from_secs(10)).await;
    assert_eq!(view["result"]["status"], 200);
    assert_eq!(view["result"]["body"]["parameters"]["prompt"], "mine", "its own result: {view}");
    assert_eq!(view["attempts"], 1);
    // The raw answer as the pod gave it.
    let result = send(&client, owner.prepare(get(gateway.addr, &format!("/.sdgate/jobs/{id}/result")))).await;
    assert_eq!(result.status.as_u16(), 200);
    assert_eq!(result.json()["parameters"]["prompt"], "mine");
    assert_eq!(result.headers.get("content-type").and_then(|v| v.to_str().ok()), Some("application/json"));
    // Nobody else: another session, no cookie, a forged cookie, a forged id.
    let mut other = Jar::default();
    let _ = submit(&client, &mut other, gateway.addr, "theirs", 1).await;
    for (who, jar) in
        [("another session", other.clone()), ("no cookie", Jar::default()), ("a forged cookie", Jar::with("forged"))]
    {
        let answer = job(&client, &jar, gateway.addr, &id).await;
        answer.assert_json_error(404);
        let answer = send(&client, jar.prepare(get(gateway.addr, &format!("/.sdgate/jobs/{id}/result")))).await;
        assert_eq!(answer.status.as_u16(), 404, "{who}");
        let answer = send(&client, jar.prepare(delete(gateway.addr, &format!("/.sdgate/jobs/{id}")))).await;
        assert_eq!(answer.status.as_u16(), 404, "{who} cannot cancel");
    }
    let forged = "0123456789abcdef0123456789abcdef";
    job(&client, &owner, gateway.addr, forged).await.assert_json_error(404);
    job(&client, &owner, gateway.addr, "../../etc/passwd").await.assert_json_error(404);
    // A client on a raw socket that hangs up as soon as it has its 202:
    // its job runs, and it reads the result later on a new connection.
    let raw = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let body = r#"{"prompt":"hung up","steps":2}"#;
        let cookie = format!("sd={}", owner.cookie.clone().unwrap());
        let head = format!(
            "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {HOST}\r\nPrefer: respond-async\r\nCookie: {cookie}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = stream.read(&mut answer).await.unwrap();
        drop(stream);
        String::from_utf8_lossy(&answer[..n]).to_string()
    };
    assert!(raw.starts_with("HTTP/1.1 202"), "{raw}");
    let raw_id = raw.split("/.sdgate/jobs/").nth(1).map(|rest| rest[..32].to_string()).expect("a job URL");
    let view = job_becomes(&client, &owner, gateway.addr, &raw_id, "succeeded", Duration::from_secs(10)).await;
    assert_eq!(view["result"]["body"]["parameters"]["prompt"], "hung up");
    // The owner's list has its jobs and not the other's.
    let list = send(&client, owner.prepare(get(gateway.addr, "/.sdgate/jobs"))).await.json();
    let ids: Vec<&str> = list["jobs"].as_array().unwrap().iter().filter_map(|j| j["id"].as_str()).collect();
    assert_eq!(ids, vec![raw_id.as_str(), id.as_str()], "newest first");
    // /status and /metrics count jobs by state.
    let admin = gateway.admin;
    eventually("the store counted", || async move {
        let status = status(admin).await;
        status["jobs"]["store"] == "sqlite"
            && status["jobs"]["by_state"].as_array().is_some_and(|counts| {
                counts.iter().any(|c| c["service"] == "sd" && c["state"] == "succeeded" && c["jobs"] == 3)
            })
    })
    .await;
    assert_eq!(metric(admin, "sdgate_jobs{service=\"sd\",state=\"succeeded\"}").await, Some(3.0));
    assert_eq!(metric(admin, "sdgate_jobs_submitted_total{service=\"sd\"}").await, Some(3.0));
    assert_no_overlap(&[workers[0].stats()]);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_takes_a_queued_job_out_and_interrupts_a_running_one() {
    let dir = TempDir::new();
    let workers = sims(1, fast_sim(20)).await;
    let yaml = format!("{}{}", jobs_key(&sqlite_store(&dir), ""), config_yaml(&[workers[0].addr], 1, ""));
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "the pod ready").await;
    let client = client();
    let mut jar = Jar::default();
    let running = submit(&client, &mut jar, gateway.addr, "long", 500).await;
    let view = job_becomes(&client, &jar, gateway.addr, &running, "running", Duration::from_secs(5)).await;
    assert_eq!(view["attempts"], 1);
    let queued = submit(&client, &mut jar, gateway.addr, "never", 1).await;
    let view = job(&client, &jar, gateway.addr, &queued).await.json();
    assert_eq!((view["state"].as_str(), view["position"].as_u64()), (Some("queued"), Some(0)), "{view}");
    // The running job's view has its pod's own progress.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let progress = job(&client, &jar, gateway.addr, &running).await.json()["progress"].clone();
        if progress["state"]["sampling_step"].as_u64().is_some_and(|step| step > 0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress from the pod in the view: {progress}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancelled = send(&client, delete(gateway.addr, &format!("/.sdgate/jobs/{queued}"))).await;
    assert_eq!((cancelled.status.as_u16(), cancelled.json()["state"].as_str()), (200, Some("cancelled")));
    let cancelled = send(&client, delete(gateway.addr, &format!("/.sdgate/jobs/{running}"))).await;
    assert_eq!((cancelled.status.as_u16(), cancelled.json()["state"].as_str()), (200, Some("cancelled")));
    let worker = &workers[0];
    eventually("the pod interrupted", || {
        let stats = worker.stats();
        async move { stats.interrupts == 1 && stats.served == 1 }
    })
    .await;
    // Twice is a conflict: nothing left to cancel.
    send(&client, delete(gateway.addr, &format!("/.sdgate/jobs/{running}"))).await.assert_json_error(409);
    gateway.wait_for(|g| g.inflight() == 0 && g.queue_depth() == 0, "nothing left in the gate").await;
    let stats = worker.stats();
    let prompts: Vec<&str> = stats.jobs.iter().map(|j| j.prompt.as_str()).collect();
    assert_eq!(prompts, vec!["long"], "the queued job never reached the pod");
    assert!(stats.jobs[0].interrupted);
    gateway.shutdown().await;
}

/// Waits until the gateway's store says `n` jobs of `sd` succeeded.
async fn succeeded_become(admin: SocketAddr, n: f64, limit: Duration) {
    eventually_within(limit, &format!("{n} jobs succeeded"), || async move {
        metric(admin, "sdgate_jobs{service=\"sd\",state=\"succeeded\"}").await == Some(n)
    })
    .await;
}

/// 200 jobs on 4 pods; sdgate SIGKILLed mid-run and started again on the
/// same store: every job succeeds with its own result, no pod ever runs
/// two generations.
async fn jobs_survive_a_sigkill(store: &str) {
    let workers = sims(4, fast_sim(10)).await;
    let backends: Vec<SocketAddr> = workers.iter().map(|w| w.addr).collect();
    let yaml = format!("{}{}", jobs_key(store, ", max_dispatched: 16"), config_yaml(&backends, 1, ""));
    let gateway = GatewayProcess::start(&yaml).await;
    let client = client();
    let mut jar = Jar::default();
    let mut ids = BTreeMap::new();
    for i in 0..200 {
        let prompt = format!("job {i}");
        ids.insert(submit(&client, &mut jar, gateway.addr, &prompt, 8).await, prompt);
    }
    let served = || workers.iter().map(|w| w.stats().served).sum::<u64>();
    eventually_within(Duration::from_secs(30), "some jobs done", || {
        let served = served();
        async move { served >= 40 }
    })
    .await;
    let mut gateway = gateway;
    gateway.child.start_kill().expect("SIGKILL");
    let _ = gateway.child.wait().await;
    let at_kill = served();
    assert!(at_kill < 200, "killed mid-run ({at_kill} served)");
    let gateway = GatewayProcess::start(&yaml).await;
    succeeded_become(gateway.admin, 200.0, Duration::from_secs(90)).await;
    for (id, prompt) in &ids {
        let view = job(&client, &jar, gateway.addr, id).await.json();
        assert_eq!(view["state"], "succeeded", "{view}");
        assert_eq!(view["result"]["body"]["parameters"]["prompt"], prompt.as_str(), "job {id}'s own result");
    }
    // `sdgate jobs` reads the same store.
    let config = TempFile::new("yaml", &yaml);
    let (some_id, _) = ids.iter().next().unwrap();
    let shown = std::process::Command::new(sdgate_bin())
        .args(["--config", config.path.to_str().unwrap(), "jobs", some_id])
        .output()
        .unwrap();
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!((shown["id"].as_str(), shown["state"].as_str()), (Some(some_id.as_str()), Some("succeeded")));
    let listed = std::process::Command::new(sdgate_bin())
        .args(["--config", config.path.to_str().unwrap(), "jobs", "--state", "succeeded", "--limit", "5"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert_eq!(listed.lines().filter(|l| l.contains(" succeeded ")).count(), 5, "{listed}");
    let stats: Vec<_> = workers.iter().map(|w| w.stats()).collect();
    assert_no_overlap(&stats);
    let total: u64 = stats.iter().map(|s| s.served).sum();
    assert!(total >= 200, "{total} generations");
    println!("SIGKILL at {at_kill} generations; {total} in all (a run lost with the process runs again)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_jobs_outlive_a_sigkill_of_sdgate_on_the_embedded_store() {
    let dir = TempDir::new();
    jobs_survive_a_sigkill(&sqlite_store(&dir)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_jobs_outlive_a_sigkill_of_sdgate_on_postgres() {
    let Some((url, table)) = postgres_table("sigkill").await else { return };
    jobs_survive_a_sigkill(&format!("{{ postgres: {{ url: \"{url}\", table: {table} }} }}")).await;
}

/// What a test receiver was sent.
#[derive(Clone, Default)]
struct Received {
    calls: Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>,
}

/// A webhook receiver on `port` answering 200 to every POST.
async fn receiver(port: u16, received: Received) -> tokio::task::JoinHandle<()> {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the receiver");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let received = received.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let received = received.clone();
                    async move {
                        use http_body_util::BodyExt;
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        received.calls.lock().unwrap().push((parts.headers, body));
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    })
}

/// `HMAC-SHA256(secret, "<t>.<body>")` in hex, as a receiver computes it.
fn expected_signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// A receiver down for 30 s still gets the webhook, signed; a target in a
/// private block not allowed is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_reaches_a_receiver_that_was_down_for_30_s_signed() {
    let dir = TempDir::new();
    let secret = TempFile::new("secret", "whsec-test-0123456789abcdef");
    let workers = sims(1, fast_sim(10)).await;
    let extra =
        format!(", webhooks: {{ secret_file: \"{}\", allow: [127.0.0.1/32], max_backoff: 8s }}", secret.path.display());
    let yaml = format!("{}{}", jobs_key(&sqlite_store(&dir), &extra), config_yaml(&[workers[0].addr], 1, ""));
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "the pod ready").await;
    let client = client();
    let jar = Jar::default();
    let port = free_port().await;
    let mut request = submit_request(gateway.addr, "hooked", 2);
    request.headers_mut().insert("sdgate-callback", format!("http://127.0.0.1:{port}/hook").parse().unwrap());
    let answer = send(&client, request).await;
    assert_eq!(answer.status.as_u16(), 202);
    let id = answer.json()["id"].as_str().unwrap().to_string();
    let mut refused = submit_request(gateway.addr, "private", 1);
    refused.headers_mut().insert("sdgate-callback", "http://10.255.255.1:9/hook".parse().unwrap());
    let refused = send(&client, refused).await.json()["id"].as_str().unwrap().to_string();
    let down_since = tokio::time::Instant::now();
    job_becomes(&client, &jar, gateway.addr, &id, "succeeded", Duration::from_secs(10)).await;
    let admin = gateway.admin;
    eventually("a failed delivery retried", || async move {
        metric(admin, "sdgate_job_webhooks_total{result=\"retried\"}").await.unwrap_or(0.0) >= 1.0
    })
    .await;
    job_becomes(&client, &jar, gateway.addr, &refused, "succeeded", Duration::from_secs(10)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let view = loop {
        let view = job(&client, &jar, gateway.addr, &refused).await.json();
        if view["webhook"]["state"] != "pending" || tokio::time::Instant::now() > deadline {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        view["webhook"]["state"]
            .as_str()
            .is_some_and(|s| s.starts_with("failed") && s.contains("not a public address")),
        "{view}"
    );
    // The receiver comes up 30 s after the job ended.
    let left = Duration::from_secs(30).saturating_sub(down_since.elapsed());
    tokio::time::sleep(left).await;
    let received = Received::default();
    let _receiver = receiver(port, received.clone()).await;
    let calls = received.calls.clone();
    eventually_within(Duration::from_secs(20), "the webhook delivered", || {
        let n = calls.lock().unwrap().len();
        async move { n == 1 }
    })
    .await;
    let (headers, body) = received.calls.lock().unwrap()[0].clone();
    let signature = headers.get("sdgate-signature").and_then(|v| v.to_str().ok()).expect("signed").to_string();
    let (t, v1) = signature.split_once(",v1=").expect("t=...,v1=...");
    let t = t.strip_prefix("t=").expect("t=");
    assert_eq!(v1, expected_signature(b"whsec-test-0123456789abcdef", t, &body), "the signature checks out");
    let payload: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (payload["id"].as_str(), payload["state"].as_str(), payload["status"].as_u64()),
        (Some(id.as_str()), Some("succeeded"), Some(200))
    );
    let view = job_becomes(&client, &jar, gateway.addr, &id, "succeeded", Duration::from_secs(1)).await;
    eventually("the delivery recorded", || {
        let answer = job(&client, &jar, gateway.addr, &id);
        async move { answer.await.json()["webhook"]["state"] == "delivered" }
    })
    .await;
    assert!(view["webhook"]["url"].as_str().is_some());
    assert_eq!(metric(gateway.admin, "sdgate_job_webhooks_total{result=\"delivered\"}").await, Some(1.0));
    gateway.shutdown().await;
}

/// What is over a bound is told up front: a body over
/// `jobs.max_request_bytes` is refused (413) before it is kept; a service
/// may make a path always async; the job API without `jobs` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_are_told_up_front_and_a_path_may_always_be_async() {
    let dir = TempDir::new();
    let workers = sims(1, fast_sim(10)).await;
    let yaml = format!(
        "{}{}",
        jobs_key(&sqlite_store(&dir), ", max_request_bytes: 1000, max_result_bytes: 100"),
        config_yaml(&[workers[0].addr], 1, "    async_paths: [/sdapi/v1/img2img]\n")
    );
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "the pod ready").await;
    let client = client();
    let jar = Jar::default();
    let big = serde_json::json!({ "prompt": "x".repeat(2000) });
    let answer = send(&client, {
        let mut r = txt2img_json(gateway.addr, big);
        r.headers_mut().insert("prefer", "respond-async".parse().unwrap());
        r
    })
    .await;
    answer.assert_json_error(413);
    // img2img is always async; its answer is over max_result_bytes: the job fails and says why.
    let request = Request::post(format!("http://{}/sdapi/v1/img2img", gateway.addr))
        .header("host", HOST)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(r#"{"prompt":"always async","steps":1}"#)))
        .unwrap();
    let answer = send(&client, request).await;
    assert_eq!(answer.status.as_u16(), 202);
    let id = answer.json()["id"].as_str().unwrap().to_string();
    let view = job_becomes(&client, &jar, gateway.addr, &id, "failed", Duration::from_secs(10)).await;
    assert!(view["error"].as_str().is_some_and(|e| e.contains("max_result_bytes")), "{view}");
    send(&client, get(gateway.addr, &format!("/.sdgate/jobs/{id}/result"))).await.assert_json_error(409);
    // Without Prefer, txt2img stays synchronous.
    assert_eq!(send(&client, txt2img(gateway.addr, "sync", 1)).await.status.as_u16(), 200);
    gateway.shutdown().await;

    let plain = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    send(&client, get(plain.addr, "/.sdgate/jobs/0123456789abcdef0123456789abcdef")).await.assert_json_error(404);
    // Without jobs the preference is ignored: served as it comes.
    assert_eq!(send(&client, submit_request(plain.addr, "ignored", 1)).await.status.as_u16(), 200);
    plain.shutdown().await;
}

/// Jobs the gate turns away for now (here: one client's share of the queue,
/// `fairness.max_queued: 1`) stay queued and run later, in order; a job
/// submitted over HTTP/2 (its host in `:authority`, no Host header) runs on
/// its own service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_turned_away_by_the_gate_wait_their_turn_and_http2_submits_keep_their_host() {
    let dir = TempDir::new();
    let workers = sims(1, fast_sim(10)).await;
    let yaml = format!(
        "{}{}",
        jobs_key(&sqlite_store(&dir), ""),
        config_yaml(&[workers[0].addr], 1, "    fairness: { key: header, header: X-Api-Key, max_queued: 1 }\n")
    );
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "the pod ready").await;
    let client = client();
    let mut ids = Vec::new();
    for i in 0..6 {
        let mut request = submit_request(gateway.addr, &format!("turn {i}"), 3);
        request.headers_mut().insert("x-api-key", "one-client".parse().unwrap());
        let answer = send(&client, request).await;
        assert_eq!(answer.status.as_u16(), 202);
        ids.push(answer.json()["id"].as_str().unwrap().to_string());
    }
    let keyed = |mut request: Request<Full<Bytes>>| {
        request.headers_mut().insert("x-api-key", "one-client".parse().unwrap());
        request
    };
    for (i, id) in ids.iter().enumerate() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let view = send(&client, keyed(get(gateway.addr, &format!("/.sdgate/jobs/{id}")))).await.json();
            if view["state"] == "succeeded" {
                assert_eq!(view["result"]["body"]["parameters"]["prompt"], format!("turn {i}"));
                break;
            }
            assert!(view["state"] == "queued" || view["state"] == "running", "{view}");
            assert!(tokio::time::Instant::now() < deadline, "{view}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let prompts: Vec<String> = workers[0].stats().jobs.iter().map(|j| j.prompt.clone()).collect();
    assert_eq!(prompts, (0..6).map(|i| format!("turn {i}")).collect::<Vec<_>>(), "each once, in order");
    // HTTP/2 with prior knowledge: the host is the URI's authority.
    let mut h2 = h2_sender(gateway.addr).await;
    let request = Request::post(format!("http://{HOST}/sdapi/v1/txt2img"))
        .header("prefer", "respond-async")
        .header("x-api-key", "one-client")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(r#"{"prompt":"over h2","steps":1}"#)))
        .unwrap();
    let answer = h2.send_request(request).await.unwrap();
    assert_eq!(answer.status().as_u16(), 202);
    let body = http_body_util::BodyExt::collect(answer.into_body()).await.unwrap().to_bytes();
    let id = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let view = send(&client, keyed(get(gateway.addr, &format!("/.sdgate/jobs/{id}")))).await.json();
        if view["state"] == "succeeded" {
            assert_eq!(view["result"]["body"]["parameters"]["prompt"], "over h2");
            break;
        }
        assert!(view["state"] == "queued" || view["state"] == "running", "{view}");
        assert!(tokio::time::Instant::now() < deadline, "{view}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_no_overlap(&[workers[0].stats()]);
    gateway.shutdown().await;
}
