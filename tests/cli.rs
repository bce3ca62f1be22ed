//! The binary: `sdgate check` on the shipped configs and a broken one, the
//! flags each command takes, and a graceful drain on SIGTERM.

mod common;

use std::process::Command;

use common::*;

#[test]
fn check_passes_on_every_shipped_config() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let output = Command::new(sdgate_bin()).arg("check").arg("--config").arg(&path).output().unwrap();
            assert!(output.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&output.stderr));
            assert!(String::from_utf8_lossy(&output.stdout).contains("container_concurrency"));
            checked += 1;
        }
    }
    assert!(checked >= 3, "config/ holds the shipped examples");
}

#[test]
fn check_without_a_file_prints_the_built_in_default() {
    let output = Command::new(sdgate_bin()).arg("check").output().unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("stable-diffusion"));
}

/// `check` ends with a one-line verdict on stderr, and names each key that
/// does nothing with the rest of the config; the effective config leaves
/// out what does not apply (a fixed backend's `scale`).
#[test]
fn check_says_ok_and_warns_about_keys_that_do_nothing() {
    let output = Command::new(sdgate_bin()).arg("check").output().unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stderr), "ok: 1 service, 0 routes\n");
    let config = TempFile::new(
        "yaml",
        "services:\n  - name: sd\n    hosts: [sd.test]\n    scale: { max: 3 }\n    affinity: { mode: prefer, max_wait: 5s }\n    checkpoints: { route: false, max_wait_for_match: 3s }\n    backend: { fixed: [\"127.0.0.1:7860\"] }\n",
    );
    let output = Command::new(sdgate_bin()).arg("check").arg("--config").arg(&config.path).output().unwrap();
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 4, "{stderr}");
    assert!(lines[0].starts_with("warning: services[0].scale: does nothing with a fixed backend"), "{stderr}");
    assert!(lines[1].starts_with("warning: services[0].affinity.max_wait: does nothing"), "{stderr}");
    assert!(lines[2].starts_with("warning: services[0].checkpoints.max_wait_for_match: does nothing"), "{stderr}");
    assert_eq!(lines[3], "ok: 1 service, 0 routes");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("scale:") && !stdout.contains("wake:"), "{stdout}");
    assert!(sdgate::Config::from_yaml(&stdout).is_ok(), "the effective config loads: {stdout}");
}

/// The single-GPU-box example runs AUTOMATIC1111 itself, one per GPU, and
/// `check` finds nothing to say against it.
#[test]
fn the_a1111_example_starts_one_webui_per_gpu() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/a1111-local.yaml");
    let output = Command::new(sdgate_bin()).arg("check").arg("--config").arg(&path).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stderr), "ok: 1 service, 0 routes\n");
    let config = sdgate::Config::load(&path).unwrap();
    let service = &config.services[0];
    assert_eq!(service.container_concurrency, 1);
    // One machine: clients call it by any name (127.0.0.1, localhost, its host name).
    assert_eq!(service.hosts, ["*"]);
    assert_eq!(service.readiness.http.as_deref(), Some("/sdapi/v1/sd-models"));
    let sdgate::config::Backend::Process(process) = &service.backend else { panic!("{:?}", service.backend) };
    let command = process.command.join(" ");
    assert!(command.contains("launch.py --api --nowebui --server-name 127.0.0.1 --port {port}"), "{command}");
    // With --nowebui the WebUI binds every interface unless given a server
    // name: its unauthenticated API would be reachable around sdgate.
    assert!(!command.contains("--listen"), "{command}");
    assert_eq!(process.env["CUDA_VISIBLE_DEVICES"], "{index}");
    assert_eq!(process.host.to_string(), "127.0.0.1");
    assert_eq!(config.listen.ip().to_string(), "127.0.0.1");
}

#[test]
fn check_names_the_key_of_a_broken_config() {
    let broken = TempFile::new(
        "yaml",
        "services:\n  - name: sd\n    hosts: [\"*\"]\n    queue: { max_depth: 10, timeout: forever }\n    backend: { fixed: [\"127.0.0.1:7860\"] }\n",
    );
    let output = Command::new(sdgate_bin()).arg("check").arg("--config").arg(&broken.path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("services[0].queue.timeout"), "{stderr}");
}

#[test]
fn sim_help_lists_only_the_flags_a_sim_worker_reads() {
    let help = Command::new(sdgate_bin()).args(["sim", "--help"]).output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(!help.contains("--config"), "a sim reads no config file, yet its help offers --config:\n{help}");
    for flag in ["--port", "--host", "--step-time", "--startup-delay", "--checkpoint", "--load-time", "--log-format"] {
        assert!(help.contains(flag), "sim --help lacks {flag}:\n{help}");
    }
    // Written after `sim` it is unknown; written before, it is refused rather than ignored.
    for args in [&["sim", "--config", "x.yaml", "--port", "0"][..], &["--config", "x.yaml", "sim", "--port", "0"]] {
        let output = Command::new(sdgate_bin()).args(args).output().unwrap();
        assert!(!output.status.success(), "sdgate {args:?} ran");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("--config"), "sdgate {args:?}: {stderr}");
    }
    // The gateway and `check` read it, written before or after `check`.
    let top = String::from_utf8_lossy(&Command::new(sdgate_bin()).arg("--help").output().unwrap().stdout).to_string();
    assert!(top.contains("--config"), "{top}");
    let default = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.yaml");
    let before = Command::new(sdgate_bin()).arg("--config").arg(&default).arg("check").output().unwrap();
    assert!(before.status.success(), "{}", String::from_utf8_lossy(&before.stderr));
}

/// A rollout drops nothing: on SIGTERM `/readyz` says 503 at once while
/// sdgate keeps accepting and serving for `shutdown_delay` (a load balancer
/// still sends for a moment); a client that follows readiness sees no
/// failure: every request it sent, before and after the signal, is 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_readyz_fails_at_once_and_new_connections_are_served_for_shutdown_delay() {
    let workers = sims(1, fast_sim(1)).await;
    let yaml = format!("shutdown_delay: 3s\n{}", config_yaml(&[workers[0].addr], 1, ""));
    let mut gateway = GatewayProcess::start(&yaml).await;
    let ready = |admin| async move { send(&client(), plain_get(admin, "/readyz")).await.status.as_u16() };
    let client = client();
    eventually("ready", || async { ready(gateway.admin).await == 200 }).await;
    assert_eq!(send(&client, txt2img(gateway.addr, "before", 1)).await.status.as_u16(), 200);
    gateway.signal("TERM");
    let signalled = tokio::time::Instant::now();
    eventually("/readyz 503 after SIGTERM", || async { ready(gateway.admin).await == 503 }).await;
    // What a load balancer that has not noticed yet sends: new connections
    // (a fresh client each time), all answered.
    let mut answered = 0;
    while signalled.elapsed() < std::time::Duration::from_millis(1500) {
        assert_eq!(send(&common::client(), txt2img(gateway.addr, "late", 1)).await.status.as_u16(), 200);
        answered += 1;
    }
    assert!(answered > 0);
    let status = tokio::time::timeout(std::time::Duration::from_secs(15), gateway.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(signalled.elapsed() >= std::time::Duration::from_secs(3), "served on for shutdown_delay");
    assert_eq!(workers[0].stats().served, 1 + answered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_queued_and_inflight_requests_then_exits_0() {
    let workers = sims(2, fast_sim(20)).await;
    let addrs: Vec<_> = workers.iter().map(|w| w.addr).collect();
    let mut gateway = GatewayProcess::start(&config_yaml(&addrs, 1, "")).await;
    let client = client();
    eventually("pods ready", || {
        let admin = gateway.admin;
        async move { metric(admin, "sdgate_endpoints{service=\"sd\",state=\"ready\"}").await == Some(2.0) }
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (client, addr) = (client.clone(), gateway.addr);
        tasks.push(tokio::spawn(async move { send(&client, txt2img(addr, &i.to_string(), 5)).await.status }));
    }
    eventually("10 requests queued or in flight", || {
        let admin = gateway.admin;
        async move {
            let queued = metric(admin, "sdgate_queue_depth{service=\"sd\"}").await.unwrap_or(0.0);
            let inflight = metric(admin, "sdgate_inflight_requests{service=\"sd\"}").await.unwrap_or(0.0);
            queued + inflight == 10.0
        }
    })
    .await;
    gateway.signal("TERM");
    for task in tasks {
        assert_eq!(task.await.unwrap().as_u16(), 200);
    }
    let status = tokio::time::timeout(std::time::Duration::from_secs(15), gateway.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let served: u64 = workers.iter().map(|w| w.stats().served).sum();
    assert_eq!(served, 10);
}
