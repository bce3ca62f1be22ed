//! Conformance: sdgate's core scenarios against the servers Stable Diffusion
//! pods really run, not only against its own sim (which runs on hyper and
//! would accept what they refuse):
//! - `uvicorn::*`: `tests/pods/webui_app.py`, the AUTOMATIC1111 WebUI's API
//!   shape on its own stack (FastAPI on uvicorn with the h11 parser, as the
//!   WebUI pins them), gzip middleware included;
//! - `aiohttp::*`: `tests/pods/comfy_app.py`, the same routes on aiohttp
//!   (ComfyUI's server stack).
//!
//! Both answer 400 to an HTTP/1.1 request without Host, as the real servers
//! do; every scenario would fail if sdgate sent one.
//!
//! They need the Python environment `bash tests/pods/deps.sh` makes (its
//! python in `SDGATE_POD_PYTHON`, or at /opt/sdgate-pods-venv). Without it
//! each test prints SKIP and passes, so `cargo test` needs nothing but Rust;
//! CI installs it and sets `SDGATE_CONFORMANCE=required`, which turns a
//! missing environment into a failure.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use sdgate::tools::sim::SimStats;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug)]
enum Stack {
    Uvicorn,
    Aiohttp,
}

impl Stack {
    fn script(self) -> String {
        let name = match self {
            Stack::Uvicorn => "webui_app.py",
            Stack::Aiohttp => "comfy_app.py",
        };
        format!("{}/tests/pods/{name}", env!("CARGO_MANIFEST_DIR"))
    }
}

/// The python of the pods' environment, if it is installed.
fn python() -> Option<&'static str> {
    static PYTHON: OnceLock<Option<String>> = OnceLock::new();
    let found = PYTHON.get_or_init(|| {
        let candidate =
            std::env::var("SDGATE_POD_PYTHON").unwrap_or_else(|_| "/opt/sdgate-pods-venv/bin/python".to_string());
        let works = std::process::Command::new(&candidate)
            .args(["-c", "import fastapi, uvicorn, h11, aiohttp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        works.then_some(candidate)
    });
    if found.is_none() {
        assert!(
            std::env::var("SDGATE_CONFORMANCE").as_deref() != Ok("required"),
            "SDGATE_CONFORMANCE=required but the pods' Python environment is missing: run `bash tests/pods/deps.sh`"
        );
        eprintln!("SKIP: no pods' Python environment (bash tests/pods/deps.sh; SDGATE_POD_PYTHON)");
    }
    found.as_deref()
}

/// One pod process on a stack, killed when dropped.
struct Pod {
    addr: SocketAddr,
    _child: tokio::process::Child,
}

impl Pod {
    /// Starts `stack`'s app on a free port with `args` and waits until it listens.
    async fn start(python: &str, stack: Stack, args: &[&str]) -> Pod {
        let port = free_port().await;
        let mut child = tokio::process::Command::new(python)
            .arg(stack.script())
            .args(["--port", &port.to_string(), "--image-bytes", "2048"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start a pod");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let listening = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("listening on") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(listening.ok(), Some(true), "{stack:?} pod did not start");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Pod { addr: SocketAddr::from(([127, 0, 0, 1], port)), _child: child }
    }

    async fn stats(&self) -> SimStats {
        pod_stats(self.addr).await
    }
}

async fn pod_stats(addr: SocketAddr) -> SimStats {
    let answer = send(&client(), get_with_host(addr, "/sim/stats", "pod")).await;
    assert_eq!(answer.status, 200, "stats of {addr}");
    serde_json::from_slice(&answer.body).expect("stats JSON")
}

fn get_with_host(addr: SocketAddr, path: &str, host: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}")).header("host", host).body(Full::new(Bytes::new())).expect("request")
}

/// A config in front of `pods` with readiness on the WebUI's ping.
async fn gateway(pods: &[&Pod], cc: u32, extra: &str) -> TestGateway {
    let addrs: Vec<SocketAddr> = pods.iter().map(|pod| pod.addr).collect();
    TestGateway::in_front_of(&addrs, cc, extra).await
}

/// Every scenario, once per stack: `uvicorn::NAME` and `aiohttp::NAME`.
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod uvicorn {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(python) = super::python() {
                        super::$name(python, super::Stack::Uvicorn).await;
                    }
                }
            )*
        }
        mod aiohttp {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(python) = super::python() {
                        super::$name(python, super::Stack::Aiohttp).await;
                    }
                }
            )*
        }
    };
}

scenarios!(
    the_server_refuses_a_request_without_host,
    http_readiness_and_scale_from_zero,
    checkpoint_options_at_ready_and_routing,
    idle_check_after_a_timeout,
    interrupt_on_abandon,
    owner_only_paths,
    server_sent_events,
    websocket_queue,
    chunked_and_expect_continue_uploads,
    large_answers,
    connection_reuse,
    keep_alive_race,
    gzip_answer_teaches_its_checkpoint,
    http2_client_authority_becomes_host,
);

/// The stack is as strict as the real one: without Host, 400; with it, 200.
/// (Were it kinder, the other scenarios would prove nothing.)
async fn the_server_refuses_a_request_without_host(python: &str, stack: Stack) {
    let pod = Pod::start(python, stack, &[]).await;
    let without = raw_exchange(pod.addr, b"GET /internal/ping HTTP/1.1\r\n\r\n").await;
    // aiohttp answers a request it cannot parse as HTTP/1.0.
    let refused = without.starts_with("HTTP/1.1 400") || without.starts_with("HTTP/1.0 400");
    assert!(refused, "{stack:?} without Host: {without:?}");
    let with = raw_exchange(pod.addr, b"GET /internal/ping HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n").await;
    assert!(with.starts_with("HTTP/1.1 200"), "{stack:?} with Host: {with:?}");
}

/// 20 requests at zero pods, a process backend of the stack's app with an
/// HTTP readiness probe (the guides' `/internal/ping`): 20 answers, and no
/// pod ever runs two generations.
async fn http_readiness_and_scale_from_zero(python: &str, stack: Stack) {
    let marker = unique_marker("conformance");
    let port_base = free_port_range(2);
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ndrain_timeout: 10s\nservices:\n  - name: sd\n    hosts: [\"{HOST}\"]\n    container_concurrency: 1\n    queue: {{ timeout: 60s }}\n    readiness: {{ http: /internal/ping, period: 25ms }}\n    scale: {{ min: 0, max: 2, scale_to_zero_grace: 60s }}\n    backend:\n      process:\n        command: [\"{python}\", \"{}\", \"--port\", \"{{port}}\", \"--step-time\", \"10ms\", \"--image-bytes\", \"2048\", \"--name\", \"{marker}-{{index}}\"]\n        port_base: {port_base}\n        stop_grace: 2s\n",
        stack.script()
    );
    let gateway = TestGateway::start(&yaml).await;
    let client = client();
    let requests: Vec<_> = (0..20)
        .map(|i| {
            let (client, addr) = (client.clone(), gateway.addr);
            tokio::spawn(async move { send(&client, txt2img(addr, &format!("burst-{i}"), 5)).await })
        })
        .collect();
    let mut ok = 0;
    for request in requests {
        let answer = request.await.expect("request task");
        assert_eq!(answer.status, 200, "{stack:?}: {}", String::from_utf8_lossy(&answer.body));
        ok += 1;
    }
    assert_eq!(ok, 20);
    let mut stats = Vec::new();
    for endpoint in gateway.endpoints() {
        stats.push(pod_stats(endpoint.addr).await);
    }
    assert_eq!(stats.iter().map(|s| s.served).sum::<u64>(), 20, "{stats:?}");
    assert_no_overlap(&stats);
    gateway.shutdown().await;
    processes_become(&marker, 0, "the pool's workers stop with sdgate").await;
}

/// Each pod is asked its checkpoint when it becomes ready (GET options), and
/// requests naming a checkpoint go to the pod that holds it: no load.
async fn checkpoint_options_at_ready_and_routing(python: &str, stack: Stack) {
    let sd15 = Pod::start(python, stack, &["--checkpoint", "sd15", "--load-time", "500ms", "--step-time", "5ms"]).await;
    let sdxl = Pod::start(python, stack, &["--checkpoint", "sdxl", "--load-time", "500ms", "--step-time", "5ms"]).await;
    let gateway = gateway(&[&sd15, &sdxl], 1, "").await;
    eventually("both pods' checkpoints learned at ready", || {
        let known = gateway.endpoints().iter().filter(|e| e.model.holds.is_some()).count();
        async move { known == 2 }
    })
    .await;
    let client = client();
    for round in 0..3 {
        for (checkpoint, pod) in [("sd15", &sd15), ("sdxl", &sdxl)] {
            let body = serde_json::json!({
                "prompt": format!("{checkpoint}-{round}"),
                "steps": 2,
                "override_settings": { "sd_model_checkpoint": format!("{checkpoint}.safetensors") },
            });
            let answer = send(&client, txt2img_json(gateway.addr, body)).await;
            assert_eq!(answer.status, 200, "{stack:?}");
            assert_eq!(answer.worker(), format!("sim-{}", pod.addr.port()), "{stack:?}: {checkpoint} on its holder");
        }
    }
    assert_eq!(sd15.stats().await.loads + sdxl.stats().await.loads, 0, "{stack:?}: no checkpoint load");
}

/// A request that outlives `request_timeout` gets 504; the pod keeps
/// generating (as the WebUI does), so sdgate's idle check must read its
/// progress (sent with Host) as busy until it ends: the next request waits,
/// and the pod never runs two generations.
async fn idle_check_after_a_timeout(python: &str, stack: Stack) {
    let pod = Pod::start(python, stack, &["--step-time", "25ms"]).await;
    let extra =
        "    request_timeout: 200ms\n    idle_check: { path: /sdapi/v1/progress, period: 50ms, timeout: 10s }\n";
    let gateway = gateway(&[&pod], 1, extra).await;
    let client = client();
    let timed_out = send(&client, txt2img(gateway.addr, "too-long", 30)).await;
    timed_out.assert_json_error(504);
    let next = send(&client, txt2img(gateway.addr, "next", 2)).await;
    assert_eq!(next.status, 200, "{stack:?}");
    let stats = pod.stats().await;
    assert_eq!(stats.served, 2, "{stack:?}: {stats:?}");
    assert_eq!(stats.overlaps, 0, "{stack:?}: the next request waited for the first to end: {stats:?}");
}

/// A client that leaves during its generation: sdgate POSTs the interrupt
/// to the pod, which stops the job.
async fn interrupt_on_abandon(python: &str, stack: Stack) {
    let pod = Pod::start(python, stack, &["--step-time", "20ms"]).await;
    let gateway = gateway(&[&pod], 1, "    interrupt_on_disconnect: /sdapi/v1/interrupt\n").await;
    let client = client();
    let leaving = tokio::spawn({
        let (client, addr) = (client.clone(), gateway.addr);
        async move { send(&client, txt2img(addr, "abandoned", 500)).await }
    });
    running_on(pod.addr).await;
    leaving.abort();
    eventually("the pod was interrupted and ended the job", || {
        let addr = pod.addr;
        async move {
            let stats = pod_stats(addr).await;
            stats.interrupts == 1 && stats.jobs.first().is_some_and(|job| job.interrupted)
        }
    })
    .await;
    gateway.wait_for(|g| g.inflight() == 0, "the slot back once the pod answered").await;
}

/// Interrupt and progress reach the pod only for the session whose job runs
/// there; the owner's interrupt reaches it (with a Host the pod accepts).
async fn owner_only_paths(python: &str, stack: Stack) {
    let pod = Pod::start(python, stack, &["--step-time", "20ms"]).await;
    let keys = keys();
    let gateway = gateway(&[&pod], 1, &affinity("strict", &keys, "")).await;
    let client = client();
    let mut owner = Jar::default();
    assert_eq!(owner.send(&client, txt2img(gateway.addr, "first", 1)).await.status, 200);
    let long = tokio::spawn({
        let (client, addr, owner) = (client.clone(), gateway.addr, owner.clone());
        async move { send(&client, owner.prepare(txt2img(addr, "long", 500))).await }
    });
    running_on(pod.addr).await;
    let stranger = send(&client, post(gateway.addr, "/sdapi/v1/interrupt")).await;
    stranger.assert_json_error(409);
    let progress = send(&client, owner.prepare(get(gateway.addr, "/sdapi/v1/progress?skip_current_image=true"))).await;
    assert_eq!(progress.status, 200, "{stack:?}");
    assert_eq!(progress.json()["state"]["job_count"], 1, "{stack:?}: the owner sees its job: {}", progress.json());
    assert_eq!(pod.stats().await.interrupts, 0, "{stack:?}: the stranger's interrupt never reached the pod");
    let own = send(&client, owner.prepare(post(gateway.addr, "/sdapi/v1/interrupt"))).await;
    assert_eq!(own.status, 200, "{stack:?}: {}", String::from_utf8_lossy(&own.body));
    let finished = long.await.expect("owner's request");
    assert_eq!(finished.status, 200, "{stack:?}");
    let stats = pod.stats().await;
    assert_eq!(stats.interrupts, 1, "{stack:?}");
    assert!(stats.jobs.last().is_some_and(|job| job.interrupted && job.prompt == "long"), "{stack:?}: {stats:?}");
}

/// Waits until the pod itself says a job runs (its progress), not only
/// that sdgate dispatched one: an interrupt that reaches a job before it
/// starts is lost, in the WebUI as in these pods (a job clears the flag as
/// it begins).
async fn running_on(pod: SocketAddr) {
    eventually("the pod running the job", || async move {
        let answer = send(&client(), get_with_host(pod, "/sdapi/v1/progress?skip_current_image=true", "pod")).await;
        answer.json()["state"]["job_count"] == 1
    })
    .await;
}

fn post(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}{path}")).header("host", HOST).body(Full::new(Bytes::new())).expect("request")
}

/// Server-sent events stream through, each as it is made.
async fn server_sent_events(python: &str, stack: Stack) {
    let pod = Pod::start(python, stack, &[]).await;
    let gateway = gateway(&[&pod], 1, "").await;
    let response = client().request(get(gateway.addr, "/sim/events?count=5&interval_ms=200")).await.expect("events");
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().is_ok_and(|t| t.starts_with("text/event-stream")));
    let mut body = response.into_body();
    let first = body.frame().await.expect("a first event").expect("frame");
    let first = first.into_data().unwrap_or_default();
    // Streamed, not buffered: the first frame holds the first event alone.
    assert_eq!(String::from_utf8_lossy(&first), "data: 0\n\n", "{stack:?}");
    let rest = body.collect().await.expect("the rest").to_bytes();
    let text = format!("{}{}", String::from_utf8_lossy(&first), String::from_utf8_lossy(&rest));
    assert_eq!(text.matches("data: ").count(), 5, "{stack:?}: {text:?}");
}

/// The Gradio queue's websocket (`/queue/join`) is tunnelled and echoes.
async fn websocket_queue(python: &str, stack: Stack) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let pod = Pod::start(python, stack, &[]).await;
    let gateway = gateway(&[&pod], 1, "").await;
    let stream = TcpStream::connect(gateway.addr).await.expect("connect");
    let (mut socket, response) =
        tokio_tungstenite::client_async(format!("ws://{HOST}/queue/join"), stream).await.expect("websocket handshake");
    assert_eq!(response.status(), 101, "{stack:?}");
    socket.send(Message::text("{\"fn_index\": 1}")).await.expect("send");
    let echo = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.expect("an echo in time");
    assert_eq!(echo.expect("a message").expect("no error"), Message::text("{\"fn_index\": 1}"), "{stack:?}");
    socket.close(None).await.expect("close");
    drop(socket);
    gateway.wait_for(|g| g.inflight() == 0, "the tunnel's slot back").await;
}

/// A chunked upload and one with `Expect: 100-continue` reach the pod whole.
async fn chunked_and_expect_continue_uploads(python: &str, stack: Stack) {
    let pod = Pod::start(python, stack, &[]).await;
    let gateway = gateway(&[&pod], 1, "").await;
    let payload: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let digest = sha256_hex(&payload);

    let mut chunked =
        format!("POST /sim/echo HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
            .into_bytes();
    for piece in payload.chunks(70_000) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = raw_exchange(gateway.addr, &chunked).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{stack:?} chunked: {answer:?}");
    assert!(answer.contains(&digest) && answer.contains("200000"), "{stack:?} chunked: {answer:?}");

    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    let head = format!(
        "POST /sim/echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        payload.len()
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut interim))
        .await
        .expect("100 Continue in time")
        .expect("read");
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"),
        "{stack:?}: {:?}",
        String::from_utf8_lossy(&interim)
    );
    stream.write_all(&payload).await.expect("body");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains(&digest), "{stack:?} expect: {answer:?}");
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Answers larger than sdgate buffers (here 4 MiB) stream through whole;
/// smaller ones are buffered whole.
async fn large_answers(python: &str, stack: Stack) {
    let pod = Pod::start(python, stack, &[]).await;
    let gateway =
        TestGateway::start(&with_limits("buffer_response_bytes: 4194304", config_yaml(&[pod.addr], 1, ""))).await;
    gateway.wait_for(|g| g.ready_count() == 1, "ready").await;
    let client = client();
    for bytes in [1_000_000usize, 24 << 20] {
        let answer = send(&client, get(gateway.addr, &format!("/sim/large?bytes={bytes}"))).await;
        assert_eq!(answer.status, 200, "{stack:?}");
        assert_eq!(answer.body.len(), bytes, "{stack:?}");
    }
    gateway.wait_for(|g| g.inflight() == 0, "slots back").await;
}

/// Sequential requests reuse kept-alive connections: a pod at cc=1 sees at
/// most two connections from sdgate, however many requests.
async fn connection_reuse(python: &str, stack: Stack) {
    let pod = Pod::start(python, stack, &["--step-time", "1ms"]).await;
    let gateway = gateway(&[&pod], 1, "").await;
    let client = client();
    for i in 0..30 {
        assert_eq!(send(&client, txt2img(gateway.addr, &format!("reuse-{i}"), 1)).await.status, 200, "{stack:?}");
    }
    let open = established_to(pod.addr.port());
    assert!((1..=2).contains(&open), "{stack:?}: {open} connections to the pod after 30 requests");
    assert_eq!(pod.stats().await.served, 30);
}

/// Established TCP connections to `port` on loopback (IPv4), from /proc.
fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields.get(2).and_then(|r| r.rsplit_once(':')).map(|(_, p)| p);
            remote_port.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port) && fields.get(3) == Some(&"01")
        })
        .count()
}

/// The pod closes an idle connection after 5 s (uvicorn's keep-alive):
/// 200 requests, each after a 5.0-5.2 s pause on its client, get 200 every
/// one (sdgate drops pooled connections before the pod's timeout).
async fn keep_alive_race(python: &str, stack: Stack) {
    let pod = Pod::start(python, stack, &["--keep-alive", "5"]).await;
    // cc 0 (unlimited): 40 clients at once, each 5 times.
    let gateway = gateway(&[&pod], 0, "").await;
    let client = client();
    let clients: Vec<_> = (0..40u64)
        .map(|c| {
            let (client, addr) = (client.clone(), gateway.addr);
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for round in 0..5u64 {
                    let answer = send(&client, get(addr, "/sdapi/v1/options")).await;
                    if answer.status != 200 {
                        failures.push(format!("{}: {}", answer.status, String::from_utf8_lossy(&answer.body)));
                    }
                    if round < 4 {
                        tokio::time::sleep(Duration::from_millis(5000 + (c * 7 + round * 13) % 200)).await;
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(client.await.expect("client task"));
    }
    assert_eq!(failures, Vec::<String>::new(), "{stack:?}: 200 requests after keep-alive pauses");
}

/// The WebUI gzips answers over 1000 bytes for clients that accept gzip:
/// sdgate still reads which checkpoint an answer ran on. The pod lacks the
/// checkpoint asked for and runs on its own (as the WebUI does), and sdgate
/// learns that from the gzipped answer instead of assuming the load.
async fn gzip_answer_teaches_its_checkpoint(python: &str, stack: Stack) {
    let pod = Pod::start(python, stack, &["--checkpoint", "sd15", "--available", "sd15"]).await;
    let gateway = gateway(&[&pod], 1, "").await;
    let body = serde_json::json!({
        "prompt": "gzip",
        "steps": 2,
        "override_settings": { "sd_model_checkpoint": "sdxl.safetensors" },
    });
    let mut request = txt2img_json(gateway.addr, body);
    request.headers_mut().insert("accept-encoding", http::HeaderValue::from_static("gzip"));
    let answer = send(&client(), request).await;
    assert_eq!(answer.status, 200, "{stack:?}");
    if matches!(stack, Stack::Uvicorn) {
        assert_eq!(
            answer.headers.get("content-encoding").map(|v| v.as_bytes()),
            Some(&b"gzip"[..]),
            "passed on as sent"
        );
    }
    let status = status(gateway.admin).await;
    let held = &status["services"][0]["endpoints"][0]["checkpoint"];
    assert_eq!(held, "sd15", "{stack:?}: learned from the answer: {status}");
}

/// An HTTP/2 client names the host in `:authority`: the pod gets it as Host.
async fn http2_client_authority_becomes_host(python: &str, stack: Stack) {
    let pod = Pod::start(python, stack, &[]).await;
    let gateway = gateway(&[&pod], 1, "").await;
    let mut sender = h2_sender(gateway.addr).await;
    // No Host header: HTTP/2 names the host in `:authority` only.
    let request = Request::get(format!("http://{HOST}/sim/headers")).body(Full::new(Bytes::new())).expect("request");
    let response = sender.send_request(request).await.expect("h2 request");
    assert_eq!(response.status(), 200, "{stack:?}");
    let body = response.into_body().collect().await.expect("body").to_bytes();
    let headers: serde_json::Value = serde_json::from_slice(&body).expect("headers JSON");
    assert_eq!(headers["host"], HOST, "{stack:?}: {headers}");
}
