//! Nothing a stranger sends takes another user's job, the pool's routing or
//! the gateway: one scenario per hole an independent hostile run found,
//! each against pods as strict as the WebUI (the sim routes on the
//! percent-decoded path, as uvicorn does). The memory hole (a big body
//! naming a checkpoint) is `tests/body_memory.rs` and
//! `benches/body_memory.sh`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sdgate::tools::sim::SimOptions;
use tokio::net::TcpListener;

fn post(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}{path}")).header("host", HOST).body(Full::new(Bytes::new())).expect("request")
}

/// A victim's long job on a pod with room for two (cc 2): no disguise of
/// interrupt, skip or progress reaches it, over HTTP/1 or HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoded_path_never_reaches_another_users_job() {
    let pod = sims(1, fast_sim(20)).await.remove(0);
    let keys = keys();
    let gateway = TestGateway::in_front_of(&[pod.addr], 2, &affinity("strict", &keys, "")).await;
    let client = client();
    let mut victim = Jar::default();
    assert_eq!(victim.send(&client, txt2img(gateway.addr, "first", 1)).await.status, 200);
    let long = tokio::spawn({
        let (client, addr, victim) = (client.clone(), gateway.addr, victim.clone());
        async move { send(&client, victim.prepare(txt2img(addr, "victim", 100))).await }
    });
    gateway.wait_for(|g| g.inflight() == 1, "the victim's job running").await;
    for path in [
        "/sdapi/v1/%69nterrupt",
        "/sdapi/v1/%73kip",
        "/sdapi%2Fv1%2Finterrupt",
        "//sdapi/v1/interrupt",
        "/sdapi/v1/./interrupt",
        "/sdapi/v1/x/../interrupt",
        "/SDAPI/V1/INTERRUPT",
        "/internal/%70rogress",
        "/sdapi/v1/%70rogress",
    ] {
        let answer = send(&client, post(gateway.addr, path)).await;
        assert!(matches!(answer.status.as_u16(), 400 | 409), "{path}: {} {:?}", answer.status, answer.body);
        answer.assert_json_error(answer.status.as_u16());
        assert_eq!(answer.worker(), "", "{path} reached a pod");
    }
    let h2 = h2_post(gateway.addr, "/sdapi/v1/%69nterrupt").await;
    assert_eq!(h2, StatusCode::BAD_REQUEST, "over HTTP/2");
    assert_eq!(pod.stats().interrupts, 0, "no interrupt reached the pod");
    let finished = long.await.expect("victim");
    assert_eq!(finished.status, 200);
    assert!(!pod.stats().jobs.iter().any(|job| job.interrupted), "the victim's job ran its full length");
}

async fn h2_post(addr: SocketAddr, path: &str) -> StatusCode {
    let mut sender = h2_sender(addr).await;
    let request = Request::post(format!("http://{HOST}{path}")).body(Full::new(Bytes::new())).expect("request");
    sender.send_request(request).await.expect("h2 request").status()
}

/// `Upgrade: h2c` is not tunnelled to the pod: the request goes on as a
/// plain one, and the pod never sees the upgrade.
#[tokio::test]
async fn an_h2c_upgrade_is_not_passed_to_the_pod() {
    let pod = sims(1, fast_sim(1)).await.remove(0);
    let gateway = TestGateway::in_front_of(&[pod.addr], 1, "").await;
    let request = format!(
        "GET /sim/headers HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
    );
    let answer = raw_exchange(gateway.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let headers: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or_default();
    assert!(headers.get("host").is_some(), "{answer}");
    for name in ["upgrade", "http2-settings", "connection"] {
        assert!(headers.get(name).is_none(), "the pod saw {name}: {headers}");
    }
    gateway.wait_for(|g| g.inflight() == 0, "no tunnel holds the pod").await;
}

/// A pod whose idle check answers what sdgate cannot read (400, as h11 did
/// to Host-less checks) stays held after a timeout (until idle_check.timeout,
/// then through its probe): the next request waits instead of running
/// beside the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_check_that_cannot_be_read_holds_the_pod_until_its_timeout() {
    let (pod, jobs) = progress_refusing_pod(Duration::from_millis(800)).await;
    let extra = "    request_timeout: 100ms\n    idle_check: { path: /sdapi/v1/progress, period: 50ms, timeout: 2s }\n";
    let gateway = TestGateway::in_front_of(&[pod], 1, extra).await;
    let client = client();
    send(&client, txt2img(gateway.addr, "slow", 1)).await.assert_json_error(504);
    // Dispatched once the hold ended (and timed out too: each job outlasts request_timeout).
    send(&client, txt2img(gateway.addr, "next", 1)).await.assert_json_error(504);
    eventually("both jobs ended", || {
        let n = jobs.lock().unwrap().len();
        async move { n == 2 }
    })
    .await;
    let jobs = jobs.lock().unwrap().clone();
    assert!(jobs[1].0 >= jobs[0].1, "the second job began after the first ended: {jobs:?}");
}

/// A pod running one job at a time for `generation`, answering its progress
/// 400; returns each job's (start, end) on the test's clock.
async fn progress_refusing_pod(
    generation: Duration,
) -> (SocketAddr, Arc<Mutex<Vec<(tokio::time::Instant, tokio::time::Instant)>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let jobs = Arc::new(Mutex::new(Vec::new()));
    let record = jobs.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let record = record.clone();
                    async move {
                        let path = request.uri().path().to_string();
                        let _ = request.into_body().collect().await;
                        let (status, body) = match path.as_str() {
                            "/sdapi/v1/txt2img" => {
                                let job = tokio::spawn(async move {
                                    let start = tokio::time::Instant::now();
                                    tokio::time::sleep(generation).await;
                                    record.lock().unwrap().push((start, tokio::time::Instant::now()));
                                });
                                let _ = job.await;
                                (StatusCode::OK, r#"{"images":[],"info":"{}"}"#)
                            }
                            "/sdapi/v1/progress" => (StatusCode::BAD_REQUEST, "Invalid HTTP request received."),
                            _ => (StatusCode::OK, "{}"),
                        };
                        let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                        *response.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (addr, jobs)
}

/// Clients naming hundreds of invented checkpoints: a checkpoint a pod
/// really loads afterwards is still learned (what the pod holds, and a
/// metric label of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_checkpoint_names_do_not_switch_routing_off() {
    let options =
        SimOptions { checkpoint: "sd15".into(), available: vec!["sd15".into(), "flux".into()], ..fast_sim(1) };
    let pod = sims(1, options).await.remove(0);
    let gateway = TestGateway::in_front_of(&[pod.addr], 1, "").await;
    let client = client();
    let named = |name: String| serde_json::json!({ "prompt": "x", "steps": 1, "override_settings": { "sd_model_checkpoint": name } });
    for n in 0..400 {
        let answer = send(&client, txt2img_json(gateway.addr, named(format!("junk-{n}")))).await;
        assert_eq!(answer.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(send(&client, txt2img_json(gateway.addr, named("flux".into()))).await.status, 200);
    }
    let status = status(gateway.admin).await;
    assert_eq!(status["services"][0]["endpoints"][0]["checkpoint"], "flux", "what the pod holds is known: {status}");
    let labelled = metric(gateway.admin, "sdgate_checkpoint_requests_total{checkpoint=\"flux\",service=\"sd\"}").await;
    assert!(labelled.is_some_and(|n| n >= 1.0), "flux has a label of its own: {labelled:?}");
}

/// A checkpoint name that is markup does not break the dashboard: the page
/// has exactly the template's script elements, and the name reads back.
#[tokio::test]
async fn a_hostile_checkpoint_name_cannot_break_the_dashboard() {
    let name = "<!--<script>&</script>\u{2028}";
    let options = SimOptions { checkpoint: name.into(), ..fast_sim(1) };
    let pod = sims(1, options).await.remove(0);
    let gateway = TestGateway::in_front_of(&[pod.addr], 1, "").await;
    eventually("the pod's checkpoint known", || {
        let known = gateway.endpoints().iter().all(|e| e.model.holds.is_some());
        async move { known }
    })
    .await;
    let page =
        send(&client(), Request::get(format!("http://{}/", gateway.admin)).body(Full::new(Bytes::new())).unwrap())
            .await;
    let page = String::from_utf8_lossy(&page.body).to_string();
    let template = include_str!("../src/observe/dashboard.html");
    for tag in ["<script", "</script", "<!--"] {
        assert_eq!(page.matches(tag).count(), template.matches(tag).count(), "{tag} in the served page");
    }
    assert!(page.contains("\\u003c!--\\u003cscript\\u003e"), "the name is in the page, escaped");
}

#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_refused_501() {
    let pod = sims(1, fast_sim(1)).await.remove(0);
    let gateway = TestGateway::in_front_of(&[pod.addr], 1, "").await;
    let request = format!(
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
    );
    let answer = raw_exchange(gateway.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 501"), "{answer}");
    assert!(answer.contains("application/json"), "{answer}");
    assert_eq!(pod.stats().served, 0);
}

/// Relay headers are a standby's, for the active replica: a client's never
/// reach a pod, nor change the X-Forwarded-For the pod sees.
#[tokio::test]
async fn a_clients_relay_headers_never_reach_a_pod() {
    let pod = sims(1, fast_sim(1)).await.remove(0);
    let gateway = TestGateway::in_front_of(&[pod.addr], 1, "").await;
    let mut request = get(gateway.addr, "/sim/headers");
    request.headers_mut().insert("x-sdgate-relay", "guessed".parse().unwrap());
    request.headers_mut().insert("x-sdgate-client", "6.6.6.6".parse().unwrap());
    let headers = send(&client(), request).await.json();
    assert!(headers.get("x-sdgate-relay").is_none() && headers.get("x-sdgate-client").is_none(), "{headers}");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{headers}");
}

/// A Host with spaces cannot forge fields of the log line: it is quoted.
#[tokio::test]
async fn a_host_cannot_forge_log_fields() {
    let pod = sims(1, fast_sim(1)).await.remove(0);
    let gateway = GatewayProcess::start(&config_yaml(&[pod.addr], 1, "")).await;
    let request = "GET /sdapi/v1/options HTTP/1.1\r\nHost: a client=6.6.6.6 status=200\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(gateway.addr, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    // (a 400 or a 404: either way the line is written)
    let line = gateway.log_line(&["unrouted"]).await;
    assert!(line.contains("host=\"a client=6.6.6.6 status=200\""), "{line}");
}

/// A client that reads none of an answer the pod has finished (hyper holds
/// it, the socket's buffers are full) is cut at `send_timeout`, not left
/// open until `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_non_reader_is_cut_at_send_timeout() {
    use tokio::io::AsyncReadExt;
    let options = SimOptions { step_time: Duration::from_millis(1), image_bytes: 16 << 20, ..SimOptions::default() };
    let workers = sims(1, options).await;
    let yaml = with_limits("send_timeout: 1s, idle_timeout: 300s", config_yaml(&[workers[0].addr], 1, ""));
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "pod ready").await;
    // 22 MB of answer, buffered whole at sdgate (under buffer_response_bytes):
    // the pod is free at once, hyper writes until the socket is full.
    let mut silent = raw_request(gateway.addr, "never read", 1).await;
    let closed = "sdgate_client_connections_closed_total{reason=\"send_timeout\"}";
    eventually_within(Duration::from_secs(30), "the non-reader cut", || async {
        metric(gateway.admin, closed).await == Some(1.0)
    })
    .await;
    assert_eq!(metric(gateway.admin, "sdgate_client_connections").await, Some(0.0));
    // The client reads now: what the socket held, then the end (a connection
    // still open would send the rest and wait for the next request).
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), silent.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection was closed");
    assert!(got.len() < 16 << 20, "the answer was cut short: {} bytes", got.len());
    assert_eq!(send(&client(), txt2img(gateway.addr, "next", 1)).await.status, 200);
}

/// An HTTP/2 client that reads none of a streamed answer (its flow-control
/// window fills; the socket never blocks) is cut within an eighth of
/// `send_timeout` past it, and the pod is freed: not after twice the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_non_reader_frees_its_pod_at_send_timeout() {
    let options = SimOptions { step_time: Duration::from_millis(1), image_bytes: 16 << 20, ..SimOptions::default() };
    let workers = sims(1, options).await;
    let send_timeout = Duration::from_secs(2);
    let yaml = with_limits("send_timeout: 2s, buffer_response_bytes: 1024", config_yaml(&[workers[0].addr], 1, ""));
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "pod ready").await;
    let mut sender = h2_sender(gateway.addr).await;
    let started = tokio::time::Instant::now();
    let body = serde_json::json!({ "prompt": "never read", "steps": 1 }).to_string();
    let request = Request::post(format!("http://{HOST}/sdapi/v1/txt2img"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let response = sender.send_request(request).await.expect("the answer's head");
    assert_eq!(response.status(), StatusCode::OK);
    // The body is held, never polled: the window fills and hyper stops.
    let _held = response;
    gateway.wait_for(|g| g.inflight() == 0, "the pod freed").await;
    let took = started.elapsed();
    assert!(took >= send_timeout, "not before send_timeout: {took:?}");
    assert!(
        took < send_timeout * 3 / 2,
        "within an eighth of send_timeout past it, with room for a slow machine: {took:?}"
    );
    assert_eq!(
        metric(gateway.admin, "sdgate_client_connections_closed_total{reason=\"send_timeout\"}").await,
        Some(1.0)
    );
    assert_eq!(send(&client(), txt2img(gateway.addr, "next", 1)).await.status, 200);
}
