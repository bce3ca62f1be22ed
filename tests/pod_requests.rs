//! What sdgate sends to a pod is what the WebUI's server (uvicorn on h11)
//! accepts: every request carries a Host (the pod's `ip:port` unless the
//! config names one), and the sim refuses what h11 refuses, so no test can
//! pass by sending what a real pod would answer 400. A pod that does not get
//! ready says why, in /status and in the log.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;

#[tokio::test]
async fn the_sim_refuses_what_the_webuis_server_refuses() {
    let sim = sims(1, fast_sim(1)).await.remove(0);
    let refused = |answer: &str, status: &str| answer.starts_with(&format!("HTTP/1.1 {status}"));
    let no_host = raw_exchange(sim.addr, b"GET /internal/ping HTTP/1.1\r\n\r\n").await;
    assert!(refused(&no_host, "400"), "HTTP/1.1 without Host: {no_host:?}");
    let two_hosts = raw_exchange(sim.addr, b"GET /internal/ping HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await;
    assert!(refused(&two_hosts, "400"), "two Host headers: {two_hosts:?}");
    let lengths = b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}";
    let conflicting = raw_exchange(sim.addr, lengths).await;
    assert!(refused(&conflicting, "400"), "conflicting Content-Length: {conflicting:?}");
    let coding = b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n";
    let gzip_chunked = raw_exchange(sim.addr, coding).await;
    assert!(refused(&gzip_chunked, "400"), "a transfer coding other than chunked: {gzip_chunked:?}");
    let bad_chunk =
        b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n";
    let bad = raw_exchange(sim.addr, bad_chunk).await;
    assert!(refused(&bad, "400"), "bad chunking: {bad:?}");
    assert_eq!(sim.stats().served, 0, "nothing refused reached a route");

    let with_host =
        raw_exchange(sim.addr, b"GET /internal/ping HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert!(with_host.starts_with("HTTP/1.1 200"), "{with_host:?}");
    let http10 = raw_exchange(sim.addr, b"GET /internal/ping HTTP/1.0\r\n\r\n").await;
    assert!(
        http10.starts_with("HTTP/1.1 200") || http10.starts_with("HTTP/1.0 200"),
        "HTTP/1.0 needs no Host: {http10:?}"
    );
}

/// One request a pod received: method, target, and the headers that matter.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    host: Option<String>,
    content_length: Option<String>,
    extra: Option<String>,
}

/// A strict WebUI-shaped pod that records every request: Host is required
/// (400 without, as h11), a generation takes `generation`, its progress says
/// whether one runs.
async fn recording_pod(generation: Duration) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (record, running) = (record.clone(), running.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (record, running) = (record.clone(), running.clone());
                    async move {
                        let header = |name: &str| {
                            request.headers().get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).to_string())
                        };
                        let host_count = request.headers().get_all("host").iter().count();
                        record.lock().unwrap().push(Seen {
                            method: request.method().to_string(),
                            target: request.uri().to_string(),
                            host: header("host"),
                            content_length: header("content-length"),
                            extra: header("x-probe"),
                        });
                        let answer = |status: StatusCode, body: String| {
                            let mut response = Response::new(Full::new(Bytes::from(body)));
                            *response.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(response)
                        };
                        if host_count != 1 {
                            return answer(StatusCode::BAD_REQUEST, "Invalid HTTP request received.".into());
                        }
                        let path = request.uri().path().to_string();
                        let _ = request.into_body().collect().await;
                        match path.as_str() {
                            "/sdapi/v1/txt2img" => {
                                // Runs to its end if the connection closes, as the WebUI's jobs do.
                                running.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                let job = tokio::spawn(async move {
                                    tokio::time::sleep(generation).await;
                                    running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                                });
                                let _ = job.await;
                                answer(StatusCode::OK, r#"{"images":[],"info":"{}"}"#.into())
                            }
                            "/sdapi/v1/progress" => {
                                let jobs = running.load(std::sync::atomic::Ordering::SeqCst);
                                answer(StatusCode::OK, format!(r#"{{"progress":0,"state":{{"job_count":{jobs}}}}}"#))
                            }
                            "/sdapi/v1/options" => answer(StatusCode::OK, r#"{"sd_model_checkpoint":"sd15"}"#.into()),
                            _ => answer(StatusCode::OK, "{}".into()),
                        }
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_sdgate_sends_a_pod_carries_a_host() {
    let (pod, seen) = recording_pod(Duration::from_millis(400)).await;
    let extra = "    request_timeout: 150ms\n    interrupt_on_disconnect: /sdapi/v1/interrupt\n    idle_check: { path: /sdapi/v1/progress, period: 50ms, timeout: 5s }\n";
    let gateway = TestGateway::in_front_of(&[pod], 1, extra).await;
    let client = client();
    // A timeout: the pod is quarantined, interrupted and checked until idle.
    send(&client, txt2img(gateway.addr, "slow", 1)).await.assert_json_error(504);
    gateway.wait_for(|g| g.endpoints().iter().all(|e| e.quarantined == 0), "the idle check freed the pod").await;
    // A client that leaves: the pod is interrupted with the client's Host.
    let leaving = tokio::spawn({
        let (client, addr) = (client.clone(), gateway.addr);
        async move { send(&client, txt2img(addr, "left", 1)).await }
    });
    gateway.wait_for(|g| g.inflight() == 1, "the second generation running").await;
    leaving.abort();
    eventually("the departed client's interrupt", || {
        let n = seen.lock().unwrap().iter().filter(|s| s.target == "/sdapi/v1/interrupt").count();
        async move { n == 2 }
    })
    .await;
    gateway.wait_for(|g| g.inflight() == 0 && g.endpoints().iter().all(|e| e.quarantined == 0), "all done").await;

    let seen = seen.lock().unwrap().clone();
    let pod_host = pod.to_string();
    let by = |method: &str, target: &str| {
        seen.iter().filter(|s| s.method == method && s.target == target).cloned().collect::<Vec<_>>()
    };
    for (method, target) in [
        ("GET", "/internal/ping"),
        ("GET", "/sdapi/v1/options"),
        ("GET", "/sdapi/v1/progress?skip_current_image=true"),
        ("POST", "/sdapi/v1/interrupt"),
    ] {
        assert!(!by(method, target).is_empty(), "{method} {target} was sent: {seen:?}");
    }
    assert!(seen.iter().all(|s| s.host.is_some()), "every request has a Host: {seen:?}");
    for s in &seen {
        let expected = if s.target == "/sdapi/v1/txt2img" { HOST } else { pod_host.as_str() };
        // The departed client's interrupt goes with the client's Host, as its request did.
        let clients_interrupt = s.target == "/sdapi/v1/interrupt" && s.host.as_deref() == Some(HOST);
        assert!(clients_interrupt || s.host.as_deref() == Some(expected), "{s:?}");
        if s.method == "POST" {
            assert!(s.content_length.is_some(), "a POST says its length: {s:?}");
        }
    }
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_probe_sends_the_configured_host_and_headers() {
    let (pod, seen) = recording_pod(Duration::from_millis(1)).await;
    let yaml = config_yaml(&[pod], 1, "").replace(
        "readiness: { http: /internal/ping, period: 20ms }",
        "readiness: { http: /internal/ping, period: 20ms, host: sd.internal, headers: { X-Probe: kubelet } }",
    );
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "ready").await;
    let pings: Vec<Seen> = seen.lock().unwrap().iter().filter(|s| s.target == "/internal/ping").cloned().collect();
    assert!(!pings.is_empty());
    for ping in pings {
        assert_eq!(ping.host.as_deref(), Some("sd.internal"), "{ping:?}");
        assert_eq!(ping.extra.as_deref(), Some("kubelet"), "{ping:?}");
    }
    gateway.shutdown().await;
}

/// A pod whose readiness answer is not 2xx: the reason is in /status and in
/// the log from the first probe on (both while its first probe period
/// runs: /status still counts one probe).
#[tokio::test]
async fn a_pod_that_does_not_get_ready_says_why() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let pod = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request: Request<hyper::body::Incoming>| async {
                    let mut response = Response::new(Full::new(Bytes::from_static(b"Model loading\n")));
                    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    Ok::<_, std::convert::Infallible>(response)
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    let yaml = config_yaml(&[pod], 1, "").replace("period: 20ms", "period: 3s, ready_period: 3s");
    let gateway = GatewayProcess::start(&yaml).await;
    let reason = "GET /internal/ping -> 503 Model loading";
    let line = gateway.log_line(&[&format!("{pod} not ready: {reason}"), "1 times"]).await;
    assert!(line.contains("WARN"), "an answer that is not 2xx is a warning: {line}");
    let status = status(gateway.admin).await;
    let probe = &status["services"][0]["endpoints"][0]["probe"];
    assert_eq!(probe["ok"], false, "{status}");
    assert_eq!(probe["result"], reason, "{status}");
    assert_eq!(probe["times"], 1, "still the first probe period: {status}");
}
