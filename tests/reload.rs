//! Reload of the real binary: a ConfigMap-style symlink swap, a broken
//! config (the log names the key, the old config serves on), and SIGHUP.

// Times real work (wall clock), not sdgate's runtime: the std clock is right here.
#![allow(clippy::disallowed_types)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// A config serving `host` from `worker`.
fn config(worker: std::net::SocketAddr, host: &str, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nservices:\n  - name: sd\n    hosts: [\"{host}\"]\n    readiness: {{ http: /internal/ping, period: 20ms }}\n    backend: {{ fixed: [\"{worker}\"] }}\n{extra}"
    )
}

/// Publishes `yaml` as a Kubernetes ConfigMap volume does: a new timestamped
/// directory, then `..data` swapped to it by an atomic rename of a symlink.
fn publish(dir: &Path, version: u32, yaml: &str) {
    let data = dir.join(format!("..v{version}"));
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("config.yaml"), yaml).expect("write");
    let next = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&next);
    std::os::unix::fs::symlink(format!("..v{version}"), &next).expect("symlink");
    std::fs::rename(&next, dir.join("..data")).expect("swap ..data");
}

async fn answer_for(addr: std::net::SocketAddr, host: &str) -> u16 {
    let request = http::Request::get(format!("http://{addr}/sdapi/v1/options"))
        .header("host", host)
        .body(http_body_util::Full::default())
        .expect("request");
    send(&client(), request).await.status.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_symlink_swap_reloads_within_two_seconds_and_a_broken_one_is_refused_by_key() {
    let workers = sims(1, fast_sim(1)).await;
    let dir = std::env::temp_dir().join(format!("sdgate-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    publish(&dir, 1, &config(workers[0].addr, "old.example.com", ""));
    std::os::unix::fs::symlink("..data/config.yaml", dir.join("config.yaml")).expect("symlink");

    let mut child = tokio::process::Command::new(sdgate_bin())
        .arg("--config")
        .arg(dir.join("config.yaml"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start sdgate");
    let (line_tx, mut log) = mpsc::unbounded_channel::<String>();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = line_tx.send(line);
        }
    });
    let (mut addr, mut admin) = (None, None);
    while addr.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(20), log.recv()).await.expect("a log line").expect("log");
        if line.contains("sdgate listening") {
            addr = address_after(&line, "listen=");
            admin = address_after(&line, "admin=");
        }
    }
    let (addr, admin) = (addr.expect("listen"), admin.expect("admin"));
    eventually("the old host served", || async move { answer_for(addr, "old.example.com").await == 200 }).await;
    assert_eq!(answer_for(addr, "new.example.com").await, 404);

    // The swap: the new host is served within 2 s.
    publish(&dir, 2, &config(workers[0].addr, "new.example.com", ""));
    let swapped = Instant::now();
    eventually_within(Duration::from_secs(2), "the new config in force", || async move {
        answer_for(addr, "new.example.com").await == 200
    })
    .await;
    let took = swapped.elapsed();
    assert_eq!(metric(admin, "sdgate_config_reloads_total{result=\"ok\"}").await, Some(1.0), "after {took:?}");

    // A broken config: refused, the log names the key, the old one serves on.
    publish(&dir, 3, &config(workers[0].addr, "new.example.com", "    container_concurrency: many\n"));
    eventually("the broken config counted", || async move {
        metric(admin, "sdgate_config_reloads_total{result=\"error\"}").await == Some(1.0)
    })
    .await;
    let mut named = false;
    while let Ok(line) = log.try_recv() {
        named |= line.contains("config reload refused") && line.contains("services[0].container_concurrency");
    }
    assert!(named, "a log line names services[0].container_concurrency");
    assert_eq!(answer_for(addr, "new.example.com").await, 200);

    // SIGHUP reloads too (here the same broken file: a second refusal), and
    // never kills the gateway.
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill");
    assert!(status.success());
    eventually("the SIGHUP reload counted", || async move {
        metric(admin, "sdgate_config_reloads_total{result=\"error\"}").await == Some(2.0)
    })
    .await;
    assert_eq!(answer_for(addr, "new.example.com").await, 200);
    let _ = child.start_kill();
    let _ = std::fs::remove_dir_all(&dir);
}
