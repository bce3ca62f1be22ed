//! Every failure a client sees: the right status, a JSON body, Retry-After
//! where retrying helps, and no slot leaked afterwards.

mod common;

use std::process::Stdio;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after() {
    let workers = sims(1, fast_sim(20)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "    queue: { max_depth: 1, timeout: 30s }\n").await;
    let client = client();
    let mut held = Vec::new();
    for (i, wait) in [(0, "dispatched"), (1, "queued")] {
        let (client, addr) = (client.clone(), gateway.addr);
        held.push(tokio::spawn(async move { send(&client, txt2img(addr, &i.to_string(), 5)).await.status }));
        gateway
            .wait_for(move |g| g.arrivals() == i + 1 && g.inflight() + g.queue_depth() as u32 == i as u32 + 1, wait)
            .await;
    }
    let answer = send(&client, txt2img(gateway.addr, "overflow", 1)).await;
    answer.assert_json_error(503);
    assert_eq!(answer.headers["retry-after"], "5");
    assert_eq!(answer.json()["service"], "sd");
    for task in held {
        assert_eq!(task.await.unwrap().as_u16(), 200);
    }
    assert_eq!(workers[0].stats().served, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_past_the_queue_timeout_answers_504() {
    let workers = sims(1, fast_sim(50)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "    queue: { timeout: 200ms }\n").await;
    let client = client();
    let busy = {
        let (client, addr) = (client.clone(), gateway.addr);
        tokio::spawn(async move { send(&client, txt2img(addr, "long", 20)).await.status })
    };
    gateway.wait_for(|g| g.inflight() == 1, "dispatched").await;
    let answer = send(&client, txt2img(gateway.addr, "late", 1)).await;
    answer.assert_json_error(504);
    assert!(answer.json()["error"].as_str().unwrap().contains("queue timeout"));
    assert_eq!(gateway.queue_depth(), 0);
    assert_eq!(busy.await.unwrap().as_u16(), 200);
    assert_eq!(workers[0].stats().served, 1, "the timed-out request never reached the pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_pod_at_all_requests_time_out_with_504_not_a_hang() {
    let port = free_port().await;
    let gateway = TestGateway::start(&config_yaml(
        &[format!("127.0.0.1:{port}").parse().unwrap()],
        1,
        "    queue: { timeout: 150ms }\n",
    ))
    .await;
    let answer = send(&client(), txt2img(gateway.addr, "nobody", 1)).await;
    answer.assert_json_error(504);
}

/// A GET for a host no service has.
fn to_elsewhere(addr: std::net::SocketAddr) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}/"))
        .header("host", "elsewhere.example.com")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_host_is_404_and_a_missing_host_400() {
    let workers = sims(1, fast_sim(1)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let answer = send(&client(), to_elsewhere(gateway.addr)).await;
    answer.assert_json_error(404);
    assert!(answer.json()["service"].is_null());
    // On a loopback listener it says how to name a host, and lists them.
    let hint = answer.json()["hint"].as_str().unwrap().to_string();
    assert!(hint.contains(&format!("curl -H \"Host: {HOST}\"")), "{hint}");
    assert_eq!(answer.json()["hosts"], serde_json::json!([HOST]));

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.0 400"), "{reply}");
    assert!(reply.contains("\"error\""), "{reply}");
    assert!(reply.contains("\"hint\""), "{reply}");
    assert_eq!(workers[0].stats().served, 0);
}

/// `list_hosts: never` (the default `auto` on a public listener): the 404
/// says how to name a host but not which hosts there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_hosts_404_lists_no_hosts_where_the_config_says_not_to() {
    let workers = sims(1, fast_sim(1)).await;
    let gateway = TestGateway::start(&format!("list_hosts: never\n{}", config_yaml(&[workers[0].addr], 1, ""))).await;
    let answer = send(&client(), to_elsewhere(gateway.addr)).await;
    answer.assert_json_error(404);
    assert!(answer.json().get("hosts").is_none(), "{:?}", answer.json());
    let hint = answer.json()["hint"].as_str().unwrap().to_string();
    assert!(hint.contains("Host: <a service's host>") && !hint.contains(HOST), "{hint}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_431_and_oversized_bodies_413() {
    let workers = sims(1, fast_sim(1)).await;
    let yaml = config_yaml(&[workers[0].addr], 1, "").replace(
        "drain_timeout: 10s\n",
        "drain_timeout: 10s\nlimits: { max_header_bytes: 4096, max_body_bytes: 1000 }\n",
    );
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "ready").await;
    let client = client();
    let mut request = txt2img(gateway.addr, "x", 1);
    request.headers_mut().insert("x-big", "a".repeat(5000).parse().unwrap());
    send(&client, request).await.assert_json_error(431);
    let big = Request::post(format!("http://{}/sdapi/v1/txt2img", gateway.addr))
        .header("host", HOST)
        .body(Full::new(Bytes::from(vec![b' '; 2000])))
        .unwrap();
    send(&client, big).await.assert_json_error(413);
    assert_eq!(workers[0].stats().served, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_request_gives_502_and_frees_its_slot() {
    let port = free_port().await;
    let mut worker = tokio::process::Command::new(sdgate_bin())
        .args(["sim", "--port", &port.to_string(), "--step-time", "50ms"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let worker_addr = format!("127.0.0.1:{port}").parse().unwrap();
    let gateway = TestGateway::in_front_of(&[worker_addr], 1, "").await;
    let client = client();
    let doomed = {
        let (client, addr) = (client.clone(), gateway.addr);
        tokio::spawn(async move { send(&client, txt2img(addr, "doomed", 100)).await })
    };
    eventually("generation running on the worker", || {
        let client = client.clone();
        async move {
            let stats = send(
                &client,
                Request::get(format!("http://{worker_addr}/sim/stats")).body(Full::new(Bytes::new())).unwrap(),
            )
            .await;
            stats.json()["inflight"] == 1
        }
    })
    .await;
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
    let answer = doomed.await.unwrap();
    answer.assert_json_error(502);
    assert_eq!(answer.json()["service"], "sd");
    gateway.wait_for(|g| g.inflight() == 0, "in-flight back to 0").await;
    assert_eq!(metric(gateway.admin, "sdgate_upstream_errors_total{kind=\"failed\",service=\"sd\"}").await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_does_not_start_its_answer_in_time_is_504() {
    let workers = sims(1, fast_sim(100)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "    request_timeout: 150ms\n").await;
    let answer = send(&client(), txt2img(gateway.addr, "slow", 20)).await;
    answer.assert_json_error(504);
    gateway.wait_for(|g| g.inflight() == 0, "slot freed after the timeout").await;
}

/// Writes `raw` on a fresh connection and reads the answer to its end.
async fn raw_exchange(addr: std::net::SocketAddr, raw: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut reply))
        .await
        .expect("answered")
        .unwrap();
    String::from_utf8_lossy(&reply).to_string()
}

fn reply_body(reply: &str) -> serde_json::Value {
    let body = reply.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {reply}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_host_headers_are_400_json_and_reach_no_pod() {
    let workers = sims(1, fast_sim(1)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    for second in [HOST, "elsewhere.example.com"] {
        let reply = raw_exchange(
            gateway.addr,
            &format!("GET /sim/headers HTTP/1.1\r\nhost: {HOST}\r\nhost: {second}\r\nconnection: close\r\n\r\n"),
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        assert!(reply.to_ascii_lowercase().contains("content-type: application/json"), "{reply}");
        assert!(reply.to_ascii_lowercase().contains("x-request-id: "), "{reply}");
        let json = reply_body(&reply);
        assert!(json["error"].as_str().unwrap().contains("more than one Host"), "{json}");
        assert!(json["service"].is_null());
    }
    assert_eq!(workers[0].stats().served, 0);
    assert_eq!(metric(gateway.admin, "sdgate_requests_total{code=\"400\",service=\"\"}").await, Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_wins_over_host_and_the_pod_sees_its_host() {
    let workers = sims(1, fast_sim(1)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    // Host names no service; the target's authority does: routed, and the
    // pod is told the target's host (RFC 9112 3.2.2).
    let reply = raw_exchange(
        gateway.addr,
        &format!(
            "GET http://{HOST}:8080/sim/headers HTTP/1.1\r\nhost: elsewhere.example.com\r\nconnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let seen = reply_body(&reply);
    assert_eq!(seen["host"], format!("{HOST}:8080"), "{seen}");
    assert_eq!(seen["x-forwarded-host"], format!("{HOST}:8080"), "{seen}");
    // And the other way round: the target names no service, Host does: 404.
    let reply = raw_exchange(
        gateway.addr,
        &format!("GET http://elsewhere.example.com/sim/headers HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n"),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    assert!(reply_body(&reply)["error"].as_str().unwrap().contains("elsewhere.example.com"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_a_trailing_dot_is_routed_as_without() {
    let workers = sims(1, fast_sim(1)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let request = Request::get(format!("http://{}/sim/headers", gateway.addr))
        .header("host", format!("{HOST}.:8080"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = send(&client(), request).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    // The pod gets the Host the client sent.
    assert_eq!(answer.json()["host"], format!("{HOST}.:8080"));
}

/// Needs `Prober::report_refusals` wired into the fixed provider
/// (`src/provider/fixed.rs`: `Prober::new(..).report_refusals()`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_backend_whose_pods_all_refuse_connections_says_so() {
    let (a, b) = (free_port().await, free_port().await);
    let backends: Vec<std::net::SocketAddr> =
        [a, b].iter().map(|port| format!("127.0.0.1:{port}").parse().unwrap()).collect();
    let gateway = TestGateway::start(&config_yaml(&backends, 1, "    queue: { timeout: 300ms }\n")).await;
    let answer = send(&client(), txt2img(gateway.addr, "nobody", 1)).await;
    answer.assert_json_error(504);
    let error = answer.json()["error"].as_str().unwrap().to_string();
    let mut sorted = backends.clone();
    sorted.sort();
    let expected = format!("no pod accepts connections: {} refused; {} refused", sorted[0], sorted[1]);
    assert!(error.contains(&expected), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_405_json_and_reaches_no_pod() {
    let workers = sims(1, fast_sim(1)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let reply = raw_exchange(
        gateway.addr,
        &format!("CONNECT {HOST}:443 HTTP/1.1\r\nhost: {HOST}:443\r\nconnection: close\r\n\r\n"),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
    assert!(reply.to_ascii_lowercase().contains("allow: get, head, post"), "{reply}");
    assert!(reply_body(&reply)["error"].as_str().unwrap().contains("CONNECT"), "{reply}");
    assert_eq!(workers[0].stats().served, 0);
    assert_eq!(metric(gateway.admin, "sdgate_requests_total{code=\"405\",service=\"sd\"}").await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_with_a_sign_is_400_before_it_takes_a_slot() {
    let workers = sims(1, fast_sim(1)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let body = r#"{"prompt":"x","steps":1}"#;
    for length in [format!("+{}", body.len()), format!("{0}, {0}", body.len() + 1)] {
        let reply = raw_exchange(
            gateway.addr,
            &format!(
                "POST /sdapi/v1/txt2img HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: {length}\r\nconnection: close\r\n\r\n{body}"
            ),
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 400"), "Content-Length: {length}: {reply}");
    }
    assert_eq!(gateway.arrivals(), 0, "no request took a place in line");
    assert_eq!(workers[0].stats().served, 0);
}

/// A pod that answers a POST with a head promising 1000 bytes and closes
/// after 10; GETs (the idle check) get 404.
async fn cutting_pod() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                loop {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    let head_end = loop {
                        let Ok(n) = stream.read(&mut buf).await else { return };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&request[..head_end]).to_ascii_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                        .unwrap_or(0);
                    while request.len() < head_end + length {
                        let Ok(n) = stream.read(&mut buf).await else { return };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                    }
                    if head.starts_with("post") {
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789").await;
                        return;
                    }
                    if head.starts_with("get /sdapi/v1/progress") {
                        // Idle, as the WebUI says it (only that frees a held pod).
                        let idle = br#"{"state":{"job_count":0}}"#;
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", idle.len());
                        let _ = stream.write_all(&[head.as_bytes(), idle].concat()).await;
                        continue;
                    }
                    let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_off_mid_body_is_one_502_counted_once() {
    let pod = cutting_pod().await;
    let gateway = TestGateway::start(&config_yaml(&[pod], 1, "").replace("http: /internal/ping", "tcp: true")).await;
    send(&client(), txt2img(gateway.addr, "cut", 1)).await.assert_json_error(502);
    gateway.wait_for(|g| g.inflight() == 0, "the pod back after its idle check").await;
    let count = |kind: &'static str| {
        let admin = gateway.admin;
        async move { metric(admin, &format!("sdgate_upstream_errors_total{{kind=\"{kind}\",service=\"sd\"}}")).await }
    };
    assert_eq!(count("reset").await, Some(1.0));
    assert_eq!(count("failed").await, Some(0.0));
    assert_eq!(count("connect").await, Some(0.0));
}
