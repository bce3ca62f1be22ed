//! Bursts: many waiting clients, few descriptors to start with.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A soft open-files limit of 1024 (a common default) under a hard one of
/// 20000: sdgate raises its own soft limit, so 5,000 clients can wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_soft_limit_of_1024_sdgate_holds_five_thousand_waiting_clients() {
    const CLIENTS: usize = 5000;
    raise_own_limit(CLIENTS as u64 + 1000);
    // One pod busy with a long generation: everyone else waits.
    let workers = sims(1, fast_sim(50)).await;
    let config = TempFile::new("yaml", &config_yaml(&[workers[0].addr], 1, ""));
    let mut command = std::process::Command::new(sdgate_bin());
    command.arg("--config").arg(&config.path).env("RUST_LOG", "info").stdout(Stdio::piped()).stderr(Stdio::null());
    with_open_files_limit(&mut command, 1024, 20000);
    let mut child = tokio::process::Command::from(command).kill_on_drop(true).spawn().expect("start sdgate");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut addr, mut admin, mut limit_line) = (None, None, None);
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("open-files limit") {
                limit_line = Some(line.clone());
            }
            if line.contains("sdgate listening") {
                addr = address_after(&line, "listen=");
                admin = address_after(&line, "admin=");
                break;
            }
        }
    })
    .await
    .expect("sdgate started");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (addr, admin) = (addr.expect("listen"), admin.expect("admin"));
    assert!(limit_line.is_some_and(|l| l.contains("20000")), "the soft limit was raised to the hard one");
    let body = r#"{"prompt":"x","steps":2000}"#;
    let head = format!(
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(head.as_bytes()).await.expect("send");
        clients.push(stream);
    }
    eventually_within(Duration::from_secs(60), "all clients queued or in flight", || async move {
        let queued = metric(admin, "sdgate_queue_depth{service=\"sd\"}").await.unwrap_or(0.0);
        let inflight = metric(admin, "sdgate_inflight_requests{service=\"sd\"}").await.unwrap_or(0.0);
        queued + inflight == CLIENTS as f64
    })
    .await;
    // All leave at once: the queue empties, the pod sees none of them.
    drop(clients);
    eventually_within(Duration::from_secs(30), "queue back to 0", || async move {
        metric(admin, "sdgate_queue_depth{service=\"sd\"}").await == Some(0.0)
    })
    .await;
    assert_eq!(workers[0].stats().served + workers[0].stats().inflight, 1, "only the first reached the pod");
    let _ = child.start_kill();
}

fn raise_own_limit(want: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read or write the struct they are given.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        if limit.rlim_cur < want {
            limit.rlim_cur = want.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
