//! The lobby: a connection's first request waits for its pod outside hyper.
//! These tests pin down what a client must not notice: the answer, keep-alive
//! and pipelining after it, a head or body that comes in pieces, a client
//! leaving, and a shutdown while requests wait there.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn txt2img_raw(prompt: &str, steps: u32) -> String {
    let body = serde_json::json!({ "prompt": prompt, "steps": steps }).to_string();
    format!(
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// One HTTP/1.1 answer read off `reader`: its status, its `connection` header
/// and its body.
async fn read_answer(reader: &mut BufReader<TcpStream>) -> (u16, String, serde_json::Value) {
    let mut line = String::new();
    reader.read_line(&mut line).await.expect("status line");
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status");
    let (mut length, mut connection) = (0usize, String::new());
    loop {
        line.clear();
        reader.read_line(&mut line).await.expect("header line");
        let field = line.trim_end();
        if field.is_empty() {
            break;
        }
        let (name, value) = field.split_once(':').expect("a header");
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().expect("a length"),
            "connection" => connection = value.trim().to_ascii_lowercase(),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await.expect("body");
    (status, connection, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
}

/// A gateway with one worker (cc 1) busy with a long generation, so that
/// the next requests wait in the lobby.
async fn busy_gateway() -> (TestGateway, Vec<sdgate::tools::sim::SimHandle>, BufReader<TcpStream>) {
    let workers = sims(1, fast_sim(20)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let mut busy = TcpStream::connect(gateway.addr).await.expect("connect");
    busy.write_all(txt2img_raw("busy", 25).as_bytes()).await.expect("send");
    gateway.wait_for(|g| g.inflight() == 1, "the worker busy").await;
    (gateway, workers, BufReader::new(busy))
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waited_in_the_lobby_is_answered_and_its_connection_serves_the_next() {
    let (gateway, workers, mut busy) = busy_gateway().await;
    let mut waiting = BufReader::new(connect(gateway.addr).await);
    waiting.get_mut().write_all(txt2img_raw("first", 1).as_bytes()).await.expect("send");
    gateway.wait_for(|g| g.queue_depth() == 1, "the request queued").await;
    assert_eq!(read_answer(&mut busy).await.0, 200);
    let (status, connection, body) = read_answer(&mut waiting).await;
    assert_eq!((status, connection.as_str()), (200, ""), "answered, connection kept");
    assert!(body["images"].is_array(), "the worker's answer: {body}");
    // The same connection, now hyper's: a second request.
    waiting.get_mut().write_all(txt2img_raw("second", 1).as_bytes()).await.expect("send again");
    assert_eq!(read_answer(&mut waiting).await.0, 200);
    assert_eq!(workers[0].stats().served, 3);
    assert_no_overlap(&[workers[0].stats()]);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_pipelined_behind_a_waiting_one_is_answered_after_it() {
    let (gateway, workers, mut busy) = busy_gateway().await;
    let mut waiting = BufReader::new(connect(gateway.addr).await);
    let both = format!("{}{}", txt2img_raw("one", 1), txt2img_raw("two", 1));
    waiting.get_mut().write_all(both.as_bytes()).await.expect("send");
    gateway.wait_for(|g| g.queue_depth() == 1, "the first request queued").await;
    assert_eq!(read_answer(&mut busy).await.0, 200);
    assert_eq!(read_answer(&mut waiting).await.0, 200);
    assert_eq!(read_answer(&mut waiting).await.0, 200);
    let prompts: Vec<String> = workers[0].stats().jobs.iter().map(|j| j.prompt.clone()).collect();
    assert_eq!(prompts, ["busy", "one", "two"], "in the order sent");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_and_body_sent_in_pieces_still_wait_and_are_answered() {
    let (gateway, workers, mut busy) = busy_gateway().await;
    let mut waiting = BufReader::new(connect(gateway.addr).await);
    let text = txt2img_raw("pieces", 1);
    let (head, body) = text.split_at(text.find("\r\n\r\n").expect("head end") + 4);
    let (head_a, head_b) = head.split_at(20);
    let (body_a, body_b) = body.split_at(5);
    for piece in [head_a, head_b, body_a] {
        waiting.get_mut().write_all(piece.as_bytes()).await.expect("send a piece");
        waiting.get_mut().flush().await.expect("flush");
        tokio::task::yield_now().await;
    }
    assert_eq!(gateway.queue_depth(), 0, "not queued before its body is complete");
    waiting.get_mut().write_all(body_b.as_bytes()).await.expect("send the rest");
    gateway.wait_for(|g| g.queue_depth() == 1, "queued once whole").await;
    assert_eq!(read_answer(&mut busy).await.0, 200);
    assert_eq!(read_answer(&mut waiting).await.0, 200);
    assert_eq!(workers[0].stats().jobs.last().map(|j| j.prompt.clone()), Some("pieces".to_string()));
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_the_lobby_are_counted_499_and_never_reach_the_pod() {
    let (gateway, workers, mut busy) = busy_gateway().await;
    let mut leaving = Vec::new();
    for i in 0..20 {
        let mut stream = connect(gateway.addr).await;
        stream.write_all(txt2img_raw(&format!("leaving {i}"), 1).as_bytes()).await.expect("send");
        leaving.push(stream);
    }
    gateway.wait_for(|g| g.queue_depth() == 20, "twenty queued").await;
    drop(leaving);
    gateway.wait_for(|g| g.queue_depth() == 0, "the queue empty").await;
    let admin = gateway.admin;
    eventually("twenty 499s counted", || async move {
        metric(admin, "sdgate_requests_total{code=\"499\",service=\"sd\"}").await == Some(20.0)
    })
    .await;
    assert_eq!(read_answer(&mut busy).await.0, 200);
    gateway.wait_for(|g| g.inflight() == 0, "nothing in flight").await;
    assert_eq!(workers[0].stats().served, 1, "only the busy request reached the worker");
    gateway.shutdown().await;
}

/// A connection accepted before the shutdown whose request comes just after
/// it is served, not closed unread: a client (a standby handing a request
/// over) connects first and writes next, and nothing refused its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_just_after_the_shutdown_on_a_connection_opened_before_is_served() {
    let (gateway, workers, mut busy) = busy_gateway().await;
    let mut late = BufReader::new(connect(gateway.addr).await);
    let addr = gateway.addr;
    let stopping = tokio::spawn(gateway.shutdown());
    // The listener is closed once new connections are refused; the drain
    // starts with it.
    eventually("the listener closed", || async move { TcpStream::connect(addr).await.is_err() }).await;
    late.get_mut().write_all(txt2img_raw("late", 1).as_bytes()).await.expect("send");
    assert_eq!(read_answer(&mut busy).await.0, 200);
    let (status, connection, _) = read_answer(&mut late).await;
    assert_eq!((status, connection.as_str()), (200, "close"), "served, then closed: the gateway is stopping");
    stopping.await.expect("the gateway stopped");
    assert_eq!(workers[0].stats().served, 2);
    assert_no_overlap(&[workers[0].stats()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_serves_the_requests_waiting_in_the_lobby_before_it_ends() {
    let (gateway, workers, mut busy) = busy_gateway().await;
    let mut waiting = Vec::new();
    for i in 0..3 {
        let mut stream = connect(gateway.addr).await;
        stream.write_all(txt2img_raw(&format!("queued {i}"), 1).as_bytes()).await.expect("send");
        waiting.push(BufReader::new(stream));
    }
    gateway.wait_for(|g| g.queue_depth() == 3, "three queued").await;
    // An idle connection, with nothing sent: closed by the shutdown.
    let mut idle = connect(gateway.addr).await;
    let stopping = tokio::spawn(gateway.shutdown());
    assert_eq!(read_answer(&mut busy).await.0, 200);
    for stream in &mut waiting {
        let (status, connection, _) = read_answer(stream).await;
        assert_eq!((status, connection.as_str()), (200, "close"), "served, then closed: the gateway is stopping");
    }
    let mut rest = Vec::new();
    assert_eq!(idle.read_to_end(&mut rest).await.expect("closed"), 0, "the idle connection closed unanswered");
    stopping.await.expect("the gateway stopped");
    assert_eq!(workers[0].stats().served, 4);
    assert_no_overlap(&[workers[0].stats()]);
}
