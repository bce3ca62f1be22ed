//! Nothing holds a pod without working: an idle websocket, a client that
//! reads none of a streamed answer, and an upload that stalls all let the pod
//! go (without blame); a small body that is too slow gets one 408, after one
//! `body_read_timeout`.

// Times one timeout against two (wall clock): the std clock is right here.
#![allow(clippy::disallowed_types)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use sdgate::tools::sim::SimOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads what the server sends until it closes, at most `limit`.
async fn read_all(stream: &mut tokio::net::TcpStream, limit: Duration) -> String {
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut reply)).await;
    String::from_utf8_lossy(&reply).to_string()
}

fn no_upstream_errors_and_no_quarantine(gateway: &TestGateway) {
    let endpoints = gateway.endpoints();
    assert!(endpoints.iter().all(|e| e.quarantined == 0 && e.failures == 0), "{endpoints:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_is_closed_after_tunnel_idle_timeout_and_frees_its_pod() {
    let workers = sims(1, fast_sim(1)).await;
    let yaml = with_limits("tunnel_idle_timeout: 300ms", config_yaml(&[workers[0].addr], 1, ""));
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "pod ready").await;
    let stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let (mut socket, response) =
        tokio_tungstenite::client_async(format!("ws://{HOST}/queue/join"), stream).await.unwrap();
    assert_eq!(response.status().as_u16(), 101);
    assert_eq!(gateway.inflight(), 1, "the tunnel holds the pod");
    // Nothing is sent either way: the tunnel closes and the pod is free.
    gateway.wait_for(|g| g.inflight() == 0, "the idle tunnel's pod freed").await;
    let ended = tokio::time::timeout(Duration::from_secs(10), socket.next()).await.expect("the socket ends");
    assert!(!matches!(ended, Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_)))), "{ended:?}");
    assert_eq!(send(&client(), txt2img(gateway.addr, "next", 1)).await.status, 200);
    no_upstream_errors_and_no_quarantine(&gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_keep_streaming_while_bytes_flow() {
    let workers = sims(1, fast_sim(1)).await;
    let yaml = with_limits("send_timeout: 300ms, tunnel_idle_timeout: 300ms", config_yaml(&[workers[0].addr], 1, ""));
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "pod ready").await;
    // Six events 200 ms apart: the stream lasts four times send_timeout.
    let response = client().request(get(gateway.addr, "/sim/events?count=6&interval_ms=200")).await.unwrap();
    let body = response.into_body().collect().await.expect("the whole stream").to_bytes();
    assert_eq!(String::from_utf8_lossy(&body).matches("data:").count(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_none_of_a_streamed_answer_is_cut_and_the_pod_freed() {
    let options = SimOptions { step_time: Duration::from_millis(1), image_bytes: 16 << 20, ..SimOptions::default() };
    let workers = sims(1, options).await;
    let yaml = with_limits("send_timeout: 300ms, buffer_response_bytes: 1024", config_yaml(&[workers[0].addr], 1, ""));
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "pod ready").await;
    // Sends its request, then reads nothing: 22 MB of answer fill the
    // socket buffers and hyper's writes stop.
    let _silent = raw_request(gateway.addr, "never read", 1).await;
    gateway.wait_for(|g| g.inflight() == 1, "the answer streaming").await;
    gateway.wait_for(|g| g.inflight() == 0, "the pod freed once its answer was read to its end").await;
    let next = send(&client(), txt2img(gateway.addr, "next", 1)).await;
    assert_eq!(next.status, 200);
    assert_eq!(workers[0].stats().served, 2);
    no_upstream_errors_and_no_quarantine(&gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_that_stalls_gets_408_and_frees_the_pod_without_quarantine() {
    let workers = sims(1, fast_sim(1)).await;
    let yaml = with_limits("body_read_timeout: 300ms, buffer_body_bytes: 1024", config_yaml(&[workers[0].addr], 1, ""));
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "pod ready").await;
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let head = format!("POST /sdapi/v1/txt2img HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![b' '; 90_000]).await.unwrap();
    // 90 % sent, then nothing: 408, and the pod goes back without blame.
    let reply = read_all(&mut stream, Duration::from_secs(20)).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    gateway.wait_for(|g| g.inflight() == 0, "the pod freed").await;
    no_upstream_errors_and_no_quarantine(&gateway);
    assert_eq!(send(&client(), txt2img(gateway.addr, "next", 1)).await.status, 200);
    for kind in sdgate::error::UpstreamFailure::ALL.map(|k| k.as_str()) {
        let series = format!("sdgate_upstream_errors_total{{kind=\"{kind}\",service=\"sd\"}}");
        assert_eq!(metric(gateway.admin, &series).await, Some(0.0), "{series}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_small_body_gets_one_408_after_one_body_read_timeout() {
    let workers = sims(1, fast_sim(1)).await;
    let timeout = Duration::from_secs(2);
    let yaml = with_limits("body_read_timeout: 2s", config_yaml(&[workers[0].addr], 1, ""));
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "pod ready").await;
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let head =
        format!("POST /sdapi/v1/txt2img HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"prompt\":");
    let started = Instant::now();
    stream.write_all(head.as_bytes()).await.unwrap();
    let reply = read_all(&mut stream, Duration::from_secs(20)).await;
    let took = started.elapsed();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.to_ascii_lowercase().contains("content-type: application/json"), "{reply}");
    assert!(took >= timeout && took < 2 * timeout, "one body_read_timeout ({timeout:?}), not two: {took:?}");
    assert_eq!(metric(gateway.admin, "sdgate_requests_total{code=\"408\",service=\"sd\"}").await, Some(1.0));
    assert_eq!(workers[0].stats().served, 0);
}
