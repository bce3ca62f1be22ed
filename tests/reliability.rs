//! Reliability: a pod never runs two generations, even when sdgate gives up
//! on an exchange while the pod (like the real WebUI) keeps generating.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use sdgate::tools::sim::SimStats;

/// One worker that keeps generating after its client left; a
/// request_timeout shorter than a generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_generation_keeps_its_pod_until_the_pod_is_idle() {
    let workers = sims(1, fast_sim(20)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "    request_timeout: 150ms\n").await;
    gateway.wait_for(|g| g.ready_count() == 1, "pod ready").await;
    let client = client();
    // 20 steps of 20 ms: the pod works 400 ms, sdgate gives up after 150 ms.
    let first = send(&client, txt2img(gateway.addr, "too long", 20)).await;
    first.assert_json_error(504);
    // The next requests must wait for the pod to finish, not land on it now.
    let later: Vec<_> = (0..3)
        .map(|i| {
            let (client, addr) = (client.clone(), gateway.addr);
            tokio::spawn(async move { send(&client, txt2img(addr, &format!("after {i}"), 2)).await.status })
        })
        .collect();
    for task in later {
        assert_eq!(task.await.unwrap().as_u16(), 200);
    }
    let stats = workers[0].stats();
    assert_eq!(stats.served, 4, "the abandoned job ran to its end, then the three others");
    assert_no_overlap(&[stats]);
    assert_eq!(metric(gateway.admin, "sdgate_quarantined_total{service=\"sd\"}").await, Some(1.0));
    assert_eq!(metric(gateway.admin, "sdgate_upstream_errors_total{kind=\"timeout\",service=\"sd\"}").await, Some(1.0));
    gateway.wait_for(|g| g.inflight() == 0 && g.ready_count() == 1, "pod back in rotation").await;
}

/// A pod frozen (SIGSTOP) past request_timeout, then resumed: it finishes
/// the job sdgate gave up on before it gets another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_frozen_past_the_timeout_gets_nothing_until_it_has_finished() {
    let port = free_port().await;
    let mut worker = tokio::process::Command::new(sdgate_bin())
        .args(["sim", "--port", &port.to_string(), "--step-time", "20ms"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = worker.id().unwrap().to_string();
    let worker_addr = format!("127.0.0.1:{port}").parse().unwrap();
    let gateway = TestGateway::in_front_of(&[worker_addr], 1, "    request_timeout: 300ms\n").await;
    gateway.wait_for(|g| g.ready_count() == 1, "pod ready").await;
    let client = client();
    let frozen = {
        let (client, addr) = (client.clone(), gateway.addr);
        tokio::spawn(async move { send(&client, txt2img(addr, "frozen", 10)).await })
    };
    eventually("generation running", || {
        let client = client.clone();
        async move { send(&client, get(worker_addr, "/sim/stats")).await.json()["inflight"] == 1 }
    })
    .await;
    signal(&pid, "STOP");
    frozen.await.unwrap().assert_json_error(504);
    let later: Vec<_> = (0..3)
        .map(|i| {
            let (client, addr) = (client.clone(), gateway.addr);
            tokio::spawn(async move { send(&client, txt2img(addr, &format!("after {i}"), 2)).await.status })
        })
        .collect();
    // Frozen past several idle checks: nothing may be sent to it.
    gateway.wait_for(|g| g.queue_depth() == 3, "the later requests wait").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gateway.queue_depth(), 3, "no request dispatched to the frozen pod");
    signal(&pid, "CONT");
    for task in later {
        assert_eq!(task.await.unwrap().as_u16(), 200);
    }
    let stats: SimStats = serde_json::from_value(send(&client, get(worker_addr, "/sim/stats")).await.json()).unwrap();
    assert_eq!(stats.served, 4);
    assert_no_overlap(&[stats]);
    let _ = worker.start_kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_requests_in_flight_kills_nothing() {
    let workers = sims(2, fast_sim(20)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let gateway = GatewayProcess::start(&config_yaml(&addrs, 1, "")).await;
    let client = client();
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let (client, addr) = (client.clone(), gateway.addr);
            tokio::spawn(async move { send(&client, txt2img(addr, &format!("hup {i}"), 10)).await.status })
        })
        .collect();
    eventually("generations running", || {
        let busy = workers.iter().any(|w| w.stats().inflight > 0);
        async move { busy }
    })
    .await;
    gateway.signal("HUP");
    for task in tasks {
        assert_eq!(task.await.unwrap().as_u16(), 200);
    }
    let answer = send(&client, txt2img(gateway.addr, "after hup", 1)).await;
    assert_eq!(answer.status.as_u16(), 200, "still serving");
    let mut gateway = gateway;
    assert!(gateway.child.try_wait().unwrap().is_none(), "sdgate still runs");
}

fn signal(pid: &str, name: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{name}")).arg(pid).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{name} {pid} failed");
}

/// Raw HTTP/1.1 POST head for a txt2img whose body the caller sends itself.
fn post_head(length: usize) -> String {
    format!(
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// Three clients trickling their uploads and three that never read their
/// large answers hold no pod: a normal request on three pods is served while
/// all six are still stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_and_slow_readers_hold_no_pod() {
    use tokio::io::AsyncWriteExt;
    let options = sdgate::tools::sim::SimOptions { image_bytes: 8 << 20, ..fast_sim(5) };
    let workers = sims(3, options).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let gateway = TestGateway::in_front_of(&addrs, 1, "").await;
    gateway.wait_for(|g| g.ready_count() == 3, "pods ready").await;
    // Slow uploads: the head and one byte of a 100-byte body.
    let mut uploads = Vec::new();
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
        stream.write_all(post_head(100).as_bytes()).await.unwrap();
        stream.write_all(b"{").await.unwrap();
        uploads.push(stream);
    }
    // Slow readers: ask for an 8 MiB answer and never read it.
    let mut readers = Vec::new();
    for i in 0..3 {
        readers.push(raw_request(gateway.addr, &format!("slow reader {i}"), 1).await);
    }
    eventually("the three large answers generated", || {
        let served: u64 = workers.iter().map(|w| w.stats().served).sum();
        async move { served == 3 }
    })
    .await;
    gateway.wait_for(|g| g.inflight() == 0, "no slot held by a slow client").await;
    let answer = send(&client(), txt2img(gateway.addr, "normal", 2)).await;
    assert_eq!(answer.status.as_u16(), 200);
    assert_eq!(gateway.queue_depth(), 0, "the slow uploads never queued for a pod");
    assert_no_overlap(&workers.iter().map(|w| w.stats()).collect::<Vec<_>>());
    drop((uploads, readers));
}

/// A body that does not arrive in time is the client's fault: 408, and no
/// pod is counted as failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_slow_is_408_and_a_broken_one_400_never_the_pods_fault() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let workers = sims(1, fast_sim(5)).await;
    let yaml = format!("limits: {{ body_read_timeout: 300ms }}\n{}", config_yaml(&[workers[0].addr], 1, ""));
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "pod ready").await;
    let answer_of = |mut stream: tokio::net::TcpStream| async move {
        let mut text = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut text)).await;
        String::from_utf8_lossy(&text).to_string()
    };
    let mut slow = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    slow.write_all(post_head(50).as_bytes()).await.unwrap();
    slow.write_all(b"{\"prompt\":").await.unwrap();
    let text = answer_of(slow).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"error\""), "a JSON body: {text}");

    let mut broken = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let head = format!(
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    broken.write_all(head.as_bytes()).await.unwrap();
    broken.write_all(b"5\r\n{\"a\":\r\nZZ-not-a-chunk-size\r\n").await.unwrap();
    let text = answer_of(broken).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("\"error\""), "a JSON body: {text}");

    assert_eq!(workers[0].stats().served, 0, "neither reached the pod");
    for kind in sdgate::error::UpstreamFailure::ALL.map(|k| k.as_str()) {
        let series = format!("sdgate_upstream_errors_total{{kind=\"{kind}\",service=\"sd\"}}");
        assert_eq!(metric(gateway.admin, &series).await, Some(0.0), "{series}");
    }
}

/// A pod busy with a job sdgate did not send (a replica that lost its lease,
/// an sdgate restarted mid-generation) gets its first request only once idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_found_busy_gets_its_first_request_only_once_idle() {
    let workers = sims(1, fast_sim(20)).await;
    let worker = workers[0].addr;
    let client = client();
    let stranger = {
        let client = client.clone();
        tokio::spawn(async move { send(&client, txt2img(worker, "someone else's", 25)).await.status })
    };
    eventually("the stranger's job running", || {
        let running = workers[0].stats().inflight == 1;
        async move { running }
    })
    .await;
    let gateway = TestGateway::in_front_of(&[worker], 1, "").await;
    assert_eq!(send(&client, txt2img(gateway.addr, "ours", 2)).await.status.as_u16(), 200);
    assert_eq!(stranger.await.unwrap().as_u16(), 200);
    assert_no_overlap(&[workers[0].stats()]);
}

/// The quarantine policy travels with each exchange: a reload that turns
/// `interrupt_on_disconnect` on is used by the next exchange's idle check
/// (it was once fixed when the service was built).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_sets_interrupt_on_disconnect_is_used_by_the_next_idle_check() {
    let workers = sims(1, fast_sim(20)).await;
    let yaml = |extra: &str| config_yaml(&[workers[0].addr], 1, &format!("    request_timeout: 150ms\n{extra}"));
    let gateway = TestGateway::start(&yaml("")).await;
    gateway.wait_for(|g| g.ready_count() == 1, "pod ready").await;
    let client = client();
    // Without the key: sdgate gives up after 150 ms and only polls the pod.
    send(&client, txt2img(gateway.addr, "before the reload", 20)).await.assert_json_error(504);
    eventually("the pod back in rotation", || {
        let free = gateway.inflight() == 0;
        async move { free }
    })
    .await;
    assert_eq!(workers[0].stats().interrupts, 0, "no interrupt before the reload");
    let next = sdgate::Config::from_yaml(&yaml("    interrupt_on_disconnect: /sdapi/v1/interrupt\n")).expect("config");
    gateway.reloader.reload(Ok(next)).await.expect("reload applied");
    // The next exchange sdgate gives up on is interrupted by its idle check.
    send(&client, txt2img(gateway.addr, "after the reload", 20)).await.assert_json_error(504);
    eventually("the pod interrupted once", || {
        let interrupts = workers[0].stats().interrupts;
        async move { interrupts == 1 }
    })
    .await;
    assert_no_overlap(&[workers[0].stats()]);
    gateway.shutdown().await;
}

/// An app that serves its page (200, 100 KiB of HTML) on every path, the
/// WebUI's progress API included, and counts the paths it was asked.
async fn page_for_every_path() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = asked.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    seen.lock().unwrap().push(request.uri().to_string());
                    let page = format!("<html>{}</html>", "x".repeat(100 * 1024));
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "text/html")
                                .body(http_body_util::Full::new(bytes::Bytes::from(page)))
                                .unwrap(),
                        )
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (addr, asked)
}

/// The idle check a never-used pod must pass reads an answer too large or
/// not the WebUI's JSON as idle: such a pod is not shut out for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_answers_every_path_with_a_large_page_is_not_taken_for_busy() {
    let (pod, asked) = page_for_every_path().await;
    let gateway = TestGateway::start(&config_yaml(&[pod], 1, "").replace("http: /internal/ping", "tcp: true")).await;
    let answer = send(&client(), txt2img(gateway.addr, "ours", 1)).await;
    assert_eq!(answer.status.as_u16(), 200);
    assert!(answer.body.len() > 100 * 1024, "the pod's own page came back");
    let asked = asked.lock().unwrap().clone();
    assert!(
        asked.iter().any(|p| p == "/sdapi/v1/progress?skip_current_image=true"),
        "the idle check asked without the preview image: {asked:?}"
    );
    assert_eq!(asked.last().map(String::as_str), Some("/sdapi/v1/txt2img"));
}
