//! Local workers that cannot start: each is retried with its own growing
//! delay (a real WebUI is a torch process, not to be relaunched in a tight
//! loop), and once every start has failed waiting requests are answered
//! 503 with the cause at once instead of waiting out the queue timeout.

mod common;

use std::time::Duration;

use common::*;

/// Start times written by a worker command (seconds, one a line).
fn starts(file: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(file).unwrap_or_default().lines().filter_map(|line| line.trim().parse().ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_start_is_retried_less_and_less_often_while_another_is_ready() {
    let log = TempFile::new("starts", "");
    let port_base = free_port_range(2);
    // Worker 0 serves; worker 1 writes down when it starts and exits at once.
    let script = format!(
        "if [ {{index}} = 1 ]; then date +%s.%N >> {}; echo 'cd: /models: No such file or directory' >&2; exit 3; fi; exec {} sim --port {{port}} --step-time 1ms",
        log.path.display(),
        sdgate_bin()
    );
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ndrain_timeout: 5s\nservices:\n  - name: sd\n    hosts: [\"{HOST}\"]\n    readiness: {{ http: /internal/ping, period: 20ms }}\n    scale: {{ min: 2, max: 2 }}\n    backend:\n      process:\n        command: [\"/bin/sh\", \"-c\", {script:?}]\n        port_base: {port_base}\n        stop_grace: 2s\n"
    );
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "worker 0 ready").await;
    eventually_within(Duration::from_secs(30), "worker 1 tried four times", || {
        let n = starts(&log.path).len();
        async move { n >= 4 }
    })
    .await;
    let times = starts(&log.path);
    let gaps: Vec<f64> = times.windows(2).map(|pair| pair[1] - pair[0]).collect();
    // 0.5 s, 1 s, 2 s: each wait at least half again the one before.
    for pair in gaps.windows(2) {
        assert!(pair[1] > 1.5 * pair[0], "the delays grow while worker 0 is ready: {gaps:?}");
    }
    assert_eq!(gateway.proxy.services()[0].gate.inspect(|g| g.ready_count()), 1, "worker 0 served throughout");
    assert!(!gateway.proxy.services()[0].gate.is_down(), "one worker is ready: the backend is not down");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_start_fails_a_waiting_request_gets_503_with_the_cause_at_once() {
    let port_base = free_port_range(1);
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ndrain_timeout: 5s\nservices:\n  - name: sd\n    hosts: [\"{HOST}\"]\n    queue: {{ timeout: 300s }}\n    readiness: {{ http: /internal/ping, period: 20ms }}\n    scale: {{ min: 0, max: 1 }}\n    backend:\n      process:\n        command: [\"/bin/sh\", \"-c\", \"echo 'cd: /models: No such file or directory' >&2; exit 1\"]\n        port_base: {port_base}\n        stop_grace: 2s\n"
    );
    let gateway = TestGateway::start(&yaml).await;
    let client = client();
    // The queue timeout is 300 s: an answer within the test's 30 s is the early one.
    let answer = tokio::time::timeout(Duration::from_secs(30), send(&client, txt2img(gateway.addr, "dog", 1)))
        .await
        .expect("answered long before the queue timeout");
    answer.assert_json_error(503);
    let error = answer.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("worker 0 exited"), "{error}");
    assert!(error.contains("cd: /models: No such file or directory"), "the worker's own words: {error}");
    assert!(answer.headers.contains_key("retry-after"), "{:?}", answer.headers);
    // While it waits to try again, new requests are told at once too.
    if gateway.proxy.services()[0].gate.is_down() {
        let again = tokio::time::timeout(Duration::from_secs(5), send(&client, txt2img(gateway.addr, "cat", 1)))
            .await
            .expect("at once");
        again.assert_json_error(503);
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_another_process_holds_is_replaced_with_a_free_one() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port_base = taken.local_addr().expect("addr").port();
    let marker = unique_marker("taken-port");
    let gateway = TestGateway::start(&pool_yaml(&marker, port_base, "0s", "min: 1, max: 1", "")).await;
    gateway.wait_for(|g| g.ready_count() == 1, "the worker ready on another port").await;
    let endpoint = gateway.endpoints()[0].addr;
    assert_ne!(endpoint.port(), port_base, "not the taken port");
    assert_eq!(send(&client(), txt2img(gateway.addr, "dog", 1)).await.status, 200);
    gateway.shutdown().await;
    drop(taken);
}
