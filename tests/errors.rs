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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_host_is_404_and_a_missing_host_400() {
    let workers = sims(1, fast_sim(1)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let request = Request::get(format!("http://{}/", gateway.addr))
        .header("host", "elsewhere.example.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = send(&client(), request).await;
    answer.assert_json_error(404);
    assert!(answer.json()["service"].is_null());

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.0 400"), "{reply}");
    assert!(reply.contains("\"error\""), "{reply}");
    assert_eq!(workers[0].stats().served, 0);
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
