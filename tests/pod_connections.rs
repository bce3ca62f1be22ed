//! One pod client: a pod's connections belong to the pod, not to a serving
//! thread, so a pod at cc=1 sees at most cc + 1 connections from sdgate (the
//! request's, and a probe's while they overlap), however many threads serve.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use common::*;

/// A pod that counts the connections it accepts and answers every request
/// with 200 after `work` (the real WebUI keeps connections alive too).
async fn counting_pod(work: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| async move {
                    if request.method() == http::Method::POST {
                        tokio::time::sleep(work).await;
                    }
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"{\"images\":[]}"))))
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_requests_on_eight_threads_use_at_most_two_pod_connections_at_cc_1() {
    let (pod, accepted) = counting_pod(Duration::from_millis(5)).await;
    let yaml = with_threads(&config_yaml(&[pod], 1, ""), 8);
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "the pod ready").await;
    // Clients on their own connections, so they land on different threads.
    let mut tasks = Vec::new();
    for n in 0..8 {
        let addr = gateway.addr;
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut codes = Vec::new();
            for i in 0..5 {
                codes.push(send(&client, txt2img(addr, &format!("c{n} r{i}"), 1)).await.status.as_u16());
            }
            codes
        }));
    }
    let mut codes = Vec::new();
    for task in tasks {
        codes.extend(task.await.expect("client task"));
    }
    assert_eq!(codes.len(), 40);
    assert!(codes.iter().all(|&code| code == 200), "every request answered: {codes:?}");
    let connections = accepted.load(Ordering::SeqCst);
    assert!(connections <= 2, "a pod at cc=1 saw {connections} connections from sdgate (at most cc + 1)");
    gateway.shutdown().await;
}
