//! The front door's API keys: who is calling (401 before anything is
//! queued), what each key may spend (GPU-seconds measured by sdgate: 429
//! once spent, another key unaffected, the budget kept across a restart in
//! the jobs store), and what each spent (`sdgate usage`, against the pods'
//! own counters).

mod common;

use std::time::Duration;

use common::*;
use sha2::Digest;

fn key_line(name: &str, key: &str, limits: &str) -> String {
    let hash: String = sha2::Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    format!("  - {{ name: {name}, sha256: \"{hash}\"{limits} }}\n")
}

fn with_key(
    mut request: http::Request<http_body_util::Full<bytes::Bytes>>,
    key: &str,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    request.headers_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_wrong_expired_or_malformed_key_gets_401_and_nothing_reaches_a_pod() {
    let workers = sims(1, fast_sim(5)).await;
    let keys = TempFile::new(
        "yaml",
        &format!(
            "keys:\n{}{}",
            key_line("team-a", "sdg_right", ""),
            key_line("gone", "sdg_expired", ", expires: \"2020-01-01T00:00:00Z\"")
        ),
    );
    let auth = format!("    auth: {{ keys_file: \"{}\" }}\n", keys.path.display());
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, &auth).await;
    let client = client();
    for (what, request) in [
        ("no key", txt2img(gateway.addr, "x", 1)),
        ("a wrong key", with_key(txt2img(gateway.addr, "x", 1), "sdg_wrong")),
        ("an expired key", with_key(txt2img(gateway.addr, "x", 1), "sdg_expired")),
        ("not a bearer", {
            let mut r = txt2img(gateway.addr, "x", 1);
            r.headers_mut().insert("authorization", "Basic sdg_right".parse().unwrap());
            r
        }),
        ("a progress poll without a key", get(gateway.addr, "/sdapi/v1/progress")),
    ] {
        let answer = send(&client, request).await;
        answer.assert_json_error(401);
        assert_eq!(
            answer.headers.get("www-authenticate").and_then(|v| v.to_str().ok()),
            Some("Bearer realm=\"sdgate\""),
            "{what}"
        );
    }
    assert_eq!(workers[0].stats().served, 0, "nothing reached the pod");
    assert_eq!(gateway.arrivals(), 0, "nothing was queued");
    let answer = send(&client, with_key(txt2img(gateway.addr, "x", 1), "sdg_right")).await;
    assert_eq!(answer.status.as_u16(), 200);
    assert_eq!(
        metric(gateway.admin, "sdgate_tenant_refused_total{reason=\"unauthorized\",service=\"sd\"}").await,
        Some(5.0)
    );
    assert_eq!(
        metric(gateway.admin, "sdgate_tenant_requests_total{service=\"sd\",tenant=\"team-a\"}").await,
        Some(1.0)
    );
    // The key is not passed on to the pod.
    let seen = send(&client, with_key(get(gateway.addr, "/sim/headers"), "sdg_right")).await.json();
    assert!(seen.get("authorization").is_none(), "{seen}");
    assert_eq!(seen["host"], HOST);
    gateway.shutdown().await;
}

/// A caller at its `concurrent` limit is refused new generations (429) but
/// may still poll its progress: only what takes a pod is limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_at_its_limit_still_polls_its_progress() {
    let workers = sims(1, fast_sim(20)).await;
    let keys =
        TempFile::new("yaml", &format!("keys:\n{}", key_line("solo", "sdg_solo", ", limits: { concurrent: 1 }")));
    let auth = format!("    auth: {{ keys_file: \"{}\" }}\n", keys.path.display());
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, &auth).await;
    let client = client();
    let (long_client, addr) = (client.clone(), gateway.addr);
    let long = tokio::spawn(async move { send(&long_client, with_key(txt2img(addr, "long", 50), "sdg_solo")).await });
    gateway.wait_for(|g| g.inflight() == 1, "the long one on the pod").await;
    let refused = send(&client, with_key(txt2img(gateway.addr, "second", 1), "sdg_solo")).await;
    refused.assert_json_error(429);
    assert_eq!(refused.json()["limit"], "concurrent");
    let progress = send(&client, with_key(get(gateway.addr, "/sdapi/v1/progress"), "sdg_solo")).await;
    assert_eq!(progress.status.as_u16(), 200, "a poll is not limited");
    assert_eq!(long.await.unwrap().status.as_u16(), 200);
    assert_eq!(send(&client, with_key(txt2img(gateway.addr, "third", 1), "sdg_solo")).await.status.as_u16(), 200);
    gateway.shutdown().await;
}

/// A key's `queued` limit bounds its requests waiting for a pod: one more
/// is refused 429 at once, while another key's requests still queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_may_have_at_most_its_queued_limit_waiting() {
    let workers = sims(1, fast_sim(20)).await;
    let keys = TempFile::new(
        "yaml",
        &format!("keys:\n{}{}", key_line("busy", "sdg_busy", ""), key_line("q", "sdg_q", ", limits: { queued: 1 }")),
    );
    let auth = format!("    auth: {{ keys_file: \"{}\" }}\n", keys.path.display());
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, &auth).await;
    let client = client();
    let spawn = |prompt: &'static str, steps: u32, key: &'static str| {
        let (client, addr) = (client.clone(), gateway.addr);
        tokio::spawn(async move { send(&client, with_key(txt2img(addr, prompt, steps), key)).await.status.as_u16() })
    };
    let long = spawn("long", 50, "sdg_busy");
    gateway.wait_for(|g| g.inflight() == 1, "the long one on the pod").await;
    let waiting = spawn("waits", 1, "sdg_q");
    gateway.wait_for(|g| g.queue_depth() == 1, "q's first waiting").await;
    let refused = send(&client, with_key(txt2img(gateway.addr, "one too many", 1), "sdg_q")).await;
    refused.assert_json_error(429);
    assert!(refused.json()["error"].as_str().unwrap_or_default().contains("1 requests waiting"), "{:?}", refused.body);
    let other = spawn("other key", 1, "sdg_busy");
    gateway.wait_for(|g| g.queue_depth() == 2, "the other key's request waits too").await;
    for task in [long, waiting, other] {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(workers[0].stats().served, 3);
    gateway.shutdown().await;
}

/// Two keys, one with a GPU-second budget: it gets 429 once spent while the
/// other keeps full service; the budget holds across a restart (kept in the
/// jobs store); `sdgate usage` says what the pods counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_gpu_budget_gets_429_while_another_keeps_full_service() {
    let dir = std::env::temp_dir().join(unique_marker("sdgate-tenants"));
    std::fs::create_dir_all(&dir).unwrap();
    let workers = sims(1, fast_sim(50)).await;
    let keys = TempFile::new(
        "yaml",
        &format!(
            "keys:\n{}{}",
            key_line("spender", "sdg_spender", ", limits: { gpu_seconds_per_hour: 0.5 }"),
            key_line("other", "sdg_other", "")
        ),
    );
    let auth = format!("    auth: {{ keys_file: \"{}\" }}\n", keys.path.display());
    let yaml = format!(
        "jobs: {{ store: {{ file: \"{}\" }} }}\n{}",
        dir.join("jobs.sqlite3").display(),
        config_yaml(&[workers[0].addr], 1, &auth)
    );
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "the pod ready").await;
    let client = client();
    // 4 steps of 50 ms: 0.2 s of pod time each; the third ends past 0.5 s.
    let mut served = 0;
    let refusal = loop {
        let answer =
            send(&client, with_key(txt2img(gateway.addr, &format!("spender {served}"), 4), "sdg_spender")).await;
        if answer.status.as_u16() != 200 {
            break answer;
        }
        served += 1;
        assert!(served <= 5, "the budget never refused");
    };
    assert_eq!(served, 3, "0.2 s each against 0.5 s per hour");
    refusal.assert_json_error(429);
    let body = refusal.json();
    assert_eq!(body["limit"], "gpu_seconds_per_hour");
    let retry: u64 =
        refusal.headers.get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).expect("Retry-After");
    assert!((1..=3600).contains(&retry), "{retry}");
    // The other key's generations make 2, 4 and 6 images, and the first
    // asks for a checkpoint the pod does not hold (one load).
    for i in 0..3u64 {
        let body = serde_json::json!({ "prompt": format!("other {i}"), "steps": 4, "batch_size": 2, "n_iter": i + 1,
            "override_settings": { "sd_model_checkpoint": "sdxl" } });
        let answer = send(&client, with_key(txt2img_json(gateway.addr, body), "sdg_other")).await;
        assert_eq!(answer.status.as_u16(), 200, "the other key keeps full service");
    }
    let before_restart = workers[0].stats().served;
    gateway.shutdown().await;
    // The spend was written at the stop: the budget holds after a restart.
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "the pod ready").await;
    let admin = gateway.admin;
    let _ = admin;
    let mut refused_again = false;
    for _ in 0..50 {
        let answer = send(&client, with_key(txt2img(gateway.addr, "after restart", 1), "sdg_spender")).await;
        if answer.status.as_u16() == 429 {
            refused_again = true;
            break;
        }
        // Until the restarted replica has read the spend back (at once,
        // but it is a task of its own).
        assert!(workers[0].stats().served <= before_restart + 1, "served after the restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused_again, "the budget survives a restart");
    gateway.shutdown().await;

    // What each key spent, as `sdgate usage` exports it, against the pod's own counters.
    let config = TempFile::new("yaml", &yaml);
    let output = std::process::Command::new(sdgate_bin())
        .args(["--config", config.path.to_str().unwrap(), "usage", "--format", "json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let sum = |tenant: &str, field: &str| -> f64 {
        rows.as_array().unwrap().iter().filter(|r| r["tenant"] == tenant).filter_map(|r| r[field].as_f64()).sum()
    };
    let stats = workers[0].stats();
    let pod = |prefix: &str| -> (f64, f64, f64, f64) {
        let jobs: Vec<_> = stats.jobs.iter().filter(|j| j.prompt.starts_with(prefix)).collect();
        let seconds = jobs.iter().map(|j| (j.ended_us - j.arrived_us) as f64 / 1e6).sum();
        let images = jobs.iter().map(|j| j.images as f64).sum();
        let loads = jobs.iter().filter(|j| j.loaded).count() as f64;
        (jobs.len() as f64, seconds, images, loads)
    };
    let after = stats.jobs.iter().filter(|j| j.prompt == "after restart").count() as f64;
    for (tenant, prefix) in [("spender", "spender"), ("other", "other")] {
        let (requests, seconds, images, loads) = pod(prefix);
        let extra = if tenant == "spender" { after } else { 0.0 };
        assert_eq!(sum(tenant, "requests"), requests + extra, "{tenant}'s requests: {rows}");
        assert_eq!(sum(tenant, "images"), images + extra, "{tenant}'s images: {rows}");
        assert_eq!(sum(tenant, "checkpoint_loads"), loads, "{tenant}'s checkpoint loads: {rows}");
        let spent = sum(tenant, "gpu_seconds");
        // sdgate's meter runs from dispatch to the last byte: a little
        // more than the pod's own time, never less.
        assert!(
            spent >= seconds && spent <= seconds + 0.1 * (requests + extra) + 0.2,
            "{tenant}: {spent} s against the pod's {seconds} s"
        );
    }
    assert_eq!((pod("other").2, pod("other").3), (12.0, 1.0), "the pod made 2 + 4 + 6 images and loaded once");
    assert_no_overlap(&[stats]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A key added to or removed from the keys file is honoured without a
/// signal (a Kubernetes Secret's file is updated in place): the file is
/// watched like the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_to_or_removed_from_the_keys_file_is_honoured_without_a_signal() {
    let workers = sims(1, fast_sim(5)).await;
    let keys = TempFile::new("yaml", &format!("keys:\n{}", key_line("first", "sdg_first", "")));
    let auth = format!("    auth: {{ keys_file: \"{}\" }}\n", keys.path.display());
    let gateway = GatewayProcess::start(&config_yaml(&[workers[0].addr], 1, &auth)).await;
    let client = client();
    eventually("the pod ready", || {
        let client = client.clone();
        let request = with_key(txt2img(gateway.addr, "first", 1), "sdg_first");
        async move { send(&client, request).await.status.as_u16() == 200 }
    })
    .await;
    send(&client, with_key(txt2img(gateway.addr, "second", 1), "sdg_second")).await.assert_json_error(401);
    // The file replaced as a Secret's is (a rename): the second key in, the first out.
    let next = keys.path.with_extension("next");
    std::fs::write(&next, format!("keys:\n{}", key_line("second", "sdg_second", ""))).unwrap();
    std::fs::rename(&next, &keys.path).unwrap();
    eventually_within(Duration::from_secs(10), "the second key honoured", || {
        let client = client.clone();
        let request = with_key(txt2img(gateway.addr, "second", 1), "sdg_second");
        async move { send(&client, request).await.status.as_u16() == 200 }
    })
    .await;
    send(&client, with_key(txt2img(gateway.addr, "first", 1), "sdg_first")).await.assert_json_error(401);
    gateway.log_line(&["a keys file changed"]).await;
}

/// `admin_key_sha256`: the admin listener asks for its key, except on the
/// probes kubelet calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_asks_for_its_key_but_not_on_its_probes() {
    let workers = sims(1, fast_sim(5)).await;
    let hash: String = sha2::Sha256::digest(b"admin-secret").iter().map(|b| format!("{b:02x}")).collect();
    let yaml = format!("admin_key_sha256: \"{hash}\"\n{}", config_yaml(&[workers[0].addr], 1, ""));
    let gateway = TestGateway::start(&yaml).await;
    let client = client();
    for path in ["/metrics", "/status", "/"] {
        let answer = send(&client, plain_get(gateway.admin, path)).await;
        answer.assert_json_error(401);
        let mut request = plain_get(gateway.admin, path);
        request.headers_mut().insert("authorization", "Bearer wrong".parse().unwrap());
        assert_eq!(send(&client, request).await.status.as_u16(), 401, "{path}");
        let mut request = plain_get(gateway.admin, path);
        request.headers_mut().insert("authorization", "Bearer admin-secret".parse().unwrap());
        assert_eq!(send(&client, request).await.status.as_u16(), 200, "{path}");
    }
    assert_eq!(send(&client, plain_get(gateway.admin, "/healthz")).await.status.as_u16(), 200);
    assert_eq!(send(&client, plain_get(gateway.admin, "/readyz")).await.status.as_u16(), 200);
    gateway.shutdown().await;
}

/// A jobs store whose usage table was made before images and loads were
/// counted gets the two columns at open, its rows kept (SQLite and, where
/// it runs, PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_table_made_before_images_and_loads_gets_them_with_its_rows_kept() {
    use sdgate::config::{JobStore, PostgresStore};
    use sdgate::jobs::store::{Spend, Store, UsageRow};
    const OLD: &str = "(service TEXT NOT NULL, tenant TEXT NOT NULL, hour BIGINT NOT NULL, requests BIGINT NOT NULL, \
                       gpu_us BIGINT NOT NULL, PRIMARY KEY (service, tenant, hour))";
    let added = UsageRow {
        service: "sd".into(),
        tenant: "team-a".into(),
        hour: 7200,
        spend: Spend { requests: 1, gpu_us: 10, images: 4, loads: 1 },
    };
    let check = |rows: Vec<UsageRow>| {
        let old = UsageRow {
            service: "sd".into(),
            tenant: "team-a".into(),
            hour: 3600,
            spend: Spend { requests: 2, gpu_us: 500, images: 0, loads: 0 },
        };
        assert_eq!(rows, vec![old, added.clone()]);
    };
    let dir = TempDir::new();
    let file = dir.path.join("old.sqlite3");
    let old = rusqlite::Connection::open(&file).unwrap();
    old.execute_batch(&format!(
        "CREATE TABLE jobs_usage {OLD}; INSERT INTO jobs_usage VALUES ('sd', 'team-a', 3600, 2, 500);"
    ))
    .unwrap();
    drop(old);
    let store = Store::open(&JobStore::File(file)).await.expect("the old file opens");
    store.add_usage(std::slice::from_ref(&added)).await.unwrap();
    check(store.usage_since(0).await.unwrap());
    // Opened again: the columns are there, nothing is added twice.
    drop(store);
    let store = Store::open(&JobStore::File(dir.path.join("old.sqlite3"))).await.expect("opens again");
    check(store.usage_since(0).await.unwrap());

    let Some((url, table)) = postgres_table("usage_columns").await else { return };
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS \"{table}_usage\"; CREATE TABLE \"{table}_usage\" {OLD}; \
             INSERT INTO \"{table}_usage\" VALUES ('sd', 'team-a', 3600, 2, 500);"
        ))
        .await
        .unwrap();
    let store = Store::open(&JobStore::Postgres(PostgresStore { url, table: table.clone() })).await.unwrap();
    store.add_usage(std::slice::from_ref(&added)).await.unwrap();
    check(store.usage_since(0).await.unwrap());
    client.batch_execute(&format!("DROP TABLE \"{table}_usage\"; DROP TABLE IF EXISTS \"{table}\"")).await.unwrap();
}
