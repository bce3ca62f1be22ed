//! Bodies stream: websockets tunnel, server-sent events arrive one by one,
//! and a 20 MB answer passes without the proxy holding it.

// Times real work (wall clock), not sdgate's runtime: the std clock is right here.
#![allow(clippy::disallowed_types)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echoes_through_the_proxy() {
    let workers = sims(1, fast_sim(1)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let url = format!("ws://{HOST}/queue/join");
    let (mut socket, response) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    assert_eq!(response.status().as_u16(), 101);
    for text in ["hello", "pretty dog"] {
        socket.send(Message::text(text)).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    // The tunnel holds the pod's slot (the path is not in `bypass`) ...
    assert_eq!(gateway.inflight(), 1);
    socket.close(None).await.unwrap();
    drop(socket);
    // ... and frees it when the socket closes.
    gateway.wait_for(|g| g.inflight() == 0, "tunnel slot freed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_one_by_one() {
    let workers = sims(1, fast_sim(1)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let response = client().request(get(gateway.addr, "/sim/events?count=4&interval_ms=150")).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut events = Vec::new();
    let mut text = String::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            text.push_str(std::str::from_utf8(&data).unwrap());
            while let Some(end) = text.find("\n\n") {
                events.push((text[..end].to_string(), Instant::now()));
                text.drain(..end + 2);
            }
        }
    }
    let names: Vec<_> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(names, ["data: 0", "data: 1", "data: 2", "data: 3"]);
    // Each event is passed on when the pod sends it: a buffering proxy would
    // deliver them all together at the end.
    for pair in events.windows(2) {
        let gap = pair[1].1 - pair[0].1;
        assert!(gap >= Duration::from_millis(75), "events {:?} and {:?} arrived {gap:?} apart", pair[0].0, pair[1].0);
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mb_answer_over_the_buffer_limit_streams_without_the_proxy_holding_it() {
    const IMAGE: usize = 20 * 1024 * 1024;
    let options = sdgate::tools::sim::SimOptions { image_bytes: IMAGE, ..fast_sim(1) };
    let workers = sims(1, options).await;
    // Answers up to 1 MiB are buffered (the slot frees when the pod is done);
    // this one is larger, so past its first MiB it streams.
    let yaml = format!("limits: {{ buffer_response_bytes: 1048576 }}\n{}", config_yaml(&[workers[0].addr], 1, ""));
    let gateway = GatewayProcess::start(&yaml).await;
    let client = client();
    eventually("pod ready", || {
        let client = client.clone();
        let addr = gateway.addr;
        async move { send(&client, get(addr, "/sdapi/v1/options")).await.status.as_u16() == 200 }
    })
    .await;
    let before = peak_rss_kib(gateway.pid());
    let answer = send(&client, txt2img(gateway.addr, "big", 1)).await;
    assert_eq!(answer.status.as_u16(), 200);
    assert!(answer.body.len() > IMAGE, "whole image received");
    let growth_kib = peak_rss_kib(gateway.pid()).saturating_sub(before);
    assert!(growth_kib < 8 * 1024, "proxy peak memory grew by {growth_kib} KiB for a 20 MiB answer");
}
