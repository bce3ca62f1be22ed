//! Client connections that take without giving: silent ones, idle
//! keep-alive ones, and a flood of them under a small descriptor limit.

// Times real work (wall clock), not sdgate's runtime: the std clock is right here.
#![allow(clippy::disallowed_types)]

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Reads until the server closes `stream` (EOF or reset) or `limit` passes;
/// returns how long after `since` it closed.
async fn closed_by_server(stream: &mut TcpStream, since: Instant, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return since.elapsed(),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()
}

fn limits_yaml(limits: &str, backends: &[SocketAddr]) -> String {
    with_limits(limits, config_yaml(backends, 1, ""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_or_half_a_head_is_closed_after_header_read_timeout() {
    let workers = sims(1, fast_sim(1)).await;
    let gateway =
        TestGateway::start(&limits_yaml("header_read_timeout: 500ms, idle_timeout: 30s", &[workers[0].addr])).await;
    gateway.wait_for(|g| g.ready_count() == 1, "ready").await;
    for (what, sent) in [
        ("nothing", &b""[..]),
        ("half a request head", &b"GET / HTTP/1.1\r\nhost: x\r\n"[..]),
        ("the HTTP/2 preface only", &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]),
        ("part of the HTTP/2 preface", &b"PRI * HTTP/2"[..]),
    ] {
        let since = Instant::now();
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let closed = closed_by_server(&mut stream, since, Duration::from_secs(5)).await;
        let closed = closed.unwrap_or_else(|| panic!("a client that sent {what} was not disconnected"));
        assert!(closed >= Duration::from_millis(450), "{what}: closed after {closed:?}, before the timeout");
    }
    // A normal request is unaffected.
    assert_eq!(send(&client(), txt2img(gateway.addr, "after", 1)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout_not_header_read_timeout() {
    let workers = sims(1, fast_sim(1)).await;
    // The idle timeout is longer than the header timeout: an idle connection
    // outlives header_read_timeout and goes at idle_timeout.
    let gateway =
        TestGateway::start(&limits_yaml("header_read_timeout: 300ms, idle_timeout: 1200ms", &[workers[0].addr])).await;
    gateway.wait_for(|g| g.ready_count() == 1, "ready").await;

    // HTTP/1.1: a request answered (its generation outlasts the header
    // timeout: a request in progress is never cut), then silence.
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let body = r#"{"prompt": "slow", "steps": 40}"#;
    let head = format!(
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut answer = vec![0u8; length];
    reader.read_exact(&mut answer).await.unwrap();
    let idle_from = Instant::now();
    let mut stream = reader.into_inner();
    let closed =
        closed_by_server(&mut stream, idle_from, Duration::from_secs(5)).await.expect("HTTP/1 idle connection closed");
    assert!(closed >= Duration::from_millis(1100), "HTTP/1 closed after {closed:?} idle: before idle_timeout");

    // HTTP/2 (prior knowledge): one request, then no stream open.
    let stream = TcpStream::connect(gateway.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::post(format!("http://{HOST}/sdapi/v1/txt2img"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(r#"{"prompt": "h2", "steps": 1}"#)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let idle_from = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("HTTP/2 idle connection closed")
        .unwrap()
        .ok();
    let closed = idle_from.elapsed();
    assert!(closed >= Duration::from_millis(1100), "HTTP/2 closed after {closed:?} idle: before idle_timeout");
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat.rsplit_once(") ").expect("stat format").1.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from the state (field 3) here.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// GET /healthz on a fresh connection; true when it answers 200 within a second.
async fn healthz(admin: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(admin).await.ok()?;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").await.ok()?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.ok()?;
        Some(answer.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt).await.ok().flatten().unwrap_or(false)
}

/// Waits until the server has closed every one of `silent` (each `None`
/// if not within 20 s), asking `admin` for /healthz every 100 ms meanwhile
/// (each must answer); returns how long after `since` each closed, and
/// the number of /healthz probes.
async fn closed_while_healthz_answers(
    silent: Vec<TcpStream>,
    since: Instant,
    admin: SocketAddr,
) -> (Vec<Option<Duration>>, usize) {
    let waits: Vec<_> = silent
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move { closed_by_server(&mut stream, since, Duration::from_secs(20)).await })
        })
        .collect();
    let closes = tokio::spawn(async move {
        let mut closed = Vec::new();
        for wait in waits {
            closed.push(wait.await.unwrap());
        }
        closed
    });
    let mut probes = 0;
    while !closes.is_finished() {
        assert!(healthz(admin).await, "the admin port stopped answering /healthz ({:?} in)", since.elapsed());
        probes += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (closes.await.unwrap(), probes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_silent_connections_under_a_256_descriptor_limit() {
    const SILENT: usize = 300;
    let workers = sims(1, fast_sim(1)).await;
    let yaml = format!("threads: 2\n{}", limits_yaml("header_read_timeout: 1s", &[workers[0].addr]));
    let config = TempFile::new("yaml", &yaml);
    let mut command = std::process::Command::new(sdgate_bin());
    command.arg("--config").arg(&config.path).env("RUST_LOG", "info").stdout(Stdio::piped()).stderr(Stdio::piped());
    with_open_files_limit(&mut command, 256, 256);
    let mut child = tokio::process::Command::from(command).kill_on_drop(true).spawn().expect("start sdgate");
    let pid = child.id().expect("pid");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    for output in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let lines = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(output).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                lines.lock().unwrap().push(line);
            }
        });
    }
    let mut addrs = None;
    eventually("sdgate reports its addresses", || {
        let found = lines.lock().unwrap().iter().find(|l| l.contains("sdgate listening")).cloned();
        addrs = found.and_then(|line| Some((address_after(&line, "listen=")?, address_after(&line, "admin=")?)));
        let done = addrs.is_some();
        async move { done }
    })
    .await;
    let (addr, admin) = addrs.unwrap();
    let client = client();
    eventually("a first request is served", || {
        let client = client.clone();
        async move {
            let request = txt2img(addr, "before", 1);
            matches!(client.request(request).await, Ok(response) if response.status() == 200)
        }
    })
    .await;

    let window = Instant::now();
    let ticks_before = cpu_ticks(pid);
    let lines_before = lines.lock().unwrap().len();
    // Timed from before the first connect: under load, connecting all of
    // them can take longer than the timeout, and the first is closed first.
    let connected = Instant::now();
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(addr).await.expect("the listen backlog takes the connection"));
    }

    // Every silent connection is closed by the server (EOF or reset) once
    // it has been accepted and kept silent for header_read_timeout, while
    // the admin listener answers throughout.
    let (closed, probes) = closed_while_healthz_answers(silent, connected, admin).await;
    let elapsed = window.elapsed();
    assert!(probes >= 5, "only {probes} /healthz probes during the window");
    for (i, after) in closed.iter().enumerate() {
        let after = after.unwrap_or_else(|| panic!("silent connection {i} was never closed"));
        assert!(
            after >= Duration::from_millis(900),
            "silent connection {i} closed after {after:?}: before the timeout"
        );
    }

    // A small share of one core over the window.
    let ticks = cpu_ticks(pid) - ticks_before;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = ticks as f64 / per_second / elapsed.as_secs_f64();
    assert!(cpu < 0.2, "sdgate used {:.0}% of a core over {elapsed:?}", cpu * 100.0);

    // New clients are served afterwards.
    assert_eq!(send(&client, txt2img(addr, "after", 1)).await.status, 200);

    // At most about one line a second about accept errors or the connection limit.
    let lines = lines.lock().unwrap()[lines_before..].to_vec();
    let allowed = elapsed.as_secs() as usize + 2;
    for what in ["accept failed", "connections at their limit"] {
        let count = lines.iter().filter(|l| l.contains(what)).count();
        assert!(count <= allowed, "{count} lines about {what:?} in {elapsed:?}:\n{}", lines.join("\n"));
    }
    let slowest = closed.iter().flatten().max().copied();
    eprintln!(
        "window {elapsed:?}, cpu {:.1}%, slowest close {slowest:?}, {probes} healthz probes, lines:\n{}",
        cpu * 100.0,
        lines.join("\n")
    );
    let _ = child.start_kill();
}

/// The admin listener has the proxy's watchdog: silent connections are
/// closed at `header_read_timeout`, and `/healthz` answers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_silent_admin_connections_are_closed_while_healthz_answers() {
    const SILENT: usize = 500;
    sdgate::serve::raise_open_files_limit(0);
    let workers = sims(1, fast_sim(1)).await;
    let gateway = TestGateway::start(&limits_yaml("header_read_timeout: 1s", &[workers[0].addr])).await;
    let admin = gateway.admin;
    let connected = Instant::now();
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(admin).await.expect("the admin listener takes the connection"));
    }
    let (closed, probes) = closed_while_healthz_answers(silent, connected, admin).await;
    assert!(probes >= 5, "only {probes} /healthz probes while the silent connections were open");
    for (i, after) in closed.into_iter().enumerate() {
        let after = after.unwrap_or_else(|| panic!("silent admin connection {i} was never closed"));
        assert!(after >= Duration::from_millis(900), "silent admin connection {i} closed after {after:?}");
    }
    assert!(healthz(admin).await);
}
