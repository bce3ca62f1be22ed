//! A flood of requests whose clients leave before reaching a pod (clients
//! giving up in the queue, reset HTTP/2 streams) is counted in the metrics,
//! one by one, and summarised in the log, not written one line each.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;

/// Everything the process logs, kept in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_clients_leaving_the_queue_are_one_summary_line() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let workers = sims(1, fast_sim(20)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let client = client();
    let busy = {
        let (client, addr) = (client.clone(), gateway.addr);
        tokio::spawn(async move { send(&client, txt2img(addr, "busy", 50)).await })
    };
    gateway.wait_for(|g| g.inflight() == 1, "the pod busy").await;
    let mut leaving = Vec::new();
    for i in 0..100 {
        leaving.push(raw_request(gateway.addr, &format!("leaves-{i}"), 1).await);
    }
    gateway.wait_for(|g| g.queue_depth() == 100, "a hundred waiting").await;
    drop(leaving);
    gateway.wait_for(|g| g.queue_depth() == 0, "all of them gone").await;
    eventually("each counted as 499", || {
        let admin = gateway.admin;
        async move { metric(admin, "sdgate_requests_total{code=\"499\",service=\"sd\"}").await == Some(100.0) }
    })
    .await;
    assert_eq!(busy.await.unwrap().status, 200);
    let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).to_string();
    let summaries = log.lines().filter(|l| l.contains("ended by their client before reaching a pod")).count();
    let singles = log.lines().filter(|l| l.contains("status=499")).count();
    assert!((1..=2).contains(&summaries), "{summaries} summary lines:\n{log}");
    assert_eq!(singles, 0, "no line per departed client:\n{log}");
    assert_eq!(workers[0].stats().served, 1, "none of them reached the pod");
    // The one that was served has its line: how long in all, and from whom.
    let served: Vec<&str> = log.lines().filter(|l| l.contains("status=200")).collect();
    assert_eq!(served.len(), 1, "{log}");
    for field in ["total_ms=", "queue_ms=", "upstream_ms=", "client=127.0.0.1", "service=sd"] {
        assert!(served[0].contains(field), "{field} missing: {}", served[0]);
    }
}
