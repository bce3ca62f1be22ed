//! Observability: the Prometheus counters equal what was sent, a scale from
//! zero records one cold start, every metric the deploy/ files use exists in a
//! real scrape, and the admin listener serves the dashboard page and the
//! history its charts start from.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

/// One sample line of a scrape: `name{labels} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed `/metrics` scrape.
struct Scrape {
    samples: Vec<Sample>,
    /// Metric family -> its `# TYPE` (counter, gauge, histogram, ...).
    types: BTreeMap<String, String>,
    text: String,
}

impl Scrape {
    async fn of(admin: SocketAddr) -> Self {
        let answer = send(&client(), plain_get(admin, "/metrics")).await;
        assert_eq!(answer.status.as_u16(), 200);
        Self::parse(&String::from_utf8_lossy(&answer.body))
    }

    fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line: {line}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in: {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, parse_labels(labels.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.push(Sample { name: name.to_string(), labels, value });
        }
        Self { samples, types, text: text.to_string() }
    }

    /// The value of the sample with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples.iter().find(|s| s.name == name && s.labels == wanted).map(|s| s.value)
    }

    /// The samples of `name` whose labels include `labels`.
    fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
        })
    }

    /// `sdgate_requests_total` of one service as {code: count}.
    fn codes(&self, service: &str) -> BTreeMap<String, f64> {
        self.matching("sdgate_requests_total", &[("service", service)])
            .filter(|s| s.value != 0.0)
            .map(|s| (s.labels["code"].clone(), s.value))
            .collect()
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => value.extend(chars.next().map(|(_, c)| if c == 'n' { '\n' } else { c })),
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    labels
}

fn txt2img_to(addr: SocketAddr, host: &str, prompt: &str, steps: u32) -> Request<Full<Bytes>> {
    let mut request = txt2img(addr, prompt, steps);
    request.headers_mut().insert("host", host.parse().expect("host header"));
    request
}

async fn history(admin: SocketAddr) -> serde_json::Value {
    let answer = send(&client(), plain_get(admin, "/status/history")).await;
    assert_eq!(answer.status.as_u16(), 200);
    assert_eq!(answer.headers["content-type"], "application/json");
    answer.json()
}

/// The first service's history samples, oldest first.
async fn history_samples(admin: SocketAddr) -> Vec<serde_json::Value> {
    history(admin).await["services"][0]["samples"].as_array().cloned().unwrap_or_default()
}

/// Waits until every service's queue and in-flight gauges read 0 in a scrape.
async fn wait_until_idle(admin: SocketAddr, services: &[&str]) {
    let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
    eventually("queue depth and in-flight back to 0 in /metrics", || {
        let services = services.clone();
        async move {
            let scrape = Scrape::of(admin).await;
            services.iter().all(|s| {
                scrape.value("sdgate_queue_depth", &[("service", s)]) == Some(0.0)
                    && scrape.value("sdgate_inflight_requests", &[("service", s)]) == Some(0.0)
            })
        }
    })
    .await;
}

const SLOW_HOST: &str = "slow.example.com";

/// Two services: `sd` in front of `sd_workers` (cc 1), and `slow` in front of
/// `slow_worker` with the given extra service lines.
fn two_services_yaml(sd_name: &str, sd_workers: &[SocketAddr], slow_worker: SocketAddr, slow_extra: &str) -> String {
    let fixed: Vec<String> = sd_workers.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ndrain_timeout: 10s\nservices:\n  - name: {sd_name}\n    hosts: [\"{HOST}\"]\n    container_concurrency: 1\n    readiness: {{ http: /internal/ping, period: 20ms }}\n    backend: {{ fixed: [{}] }}\n  - name: slow\n    hosts: [\"{SLOW_HOST}\"]\n    container_concurrency: 1\n    readiness: {{ http: /internal/ping, period: 20ms }}\n    backend: {{ fixed: [\"{slow_worker}\"] }}\n{slow_extra}",
        fixed.join(", ")
    )
}

/// Starts a two-service gateway and waits until all its pods are ready.
async fn two_service_gateway(yaml: &str, sd_pods: usize) -> TestGateway {
    let gateway = TestGateway::start(yaml).await;
    let services = gateway.proxy.services();
    let (sd, slow) = (services[0].gate.clone(), services[1].gate.clone());
    eventually("every pod of both services ready", || {
        let ok = sd.inspect(|g| g.ready_count()) == sd_pods && slow.inspect(|g| g.ready_count()) == 1;
        async move { ok }
    })
    .await;
    gateway
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_histograms_equal_exactly_what_a_scripted_run_sent() {
    let workers = sims(2, fast_sim(10)).await;
    let slow_worker = sims(1, fast_sim(50)).await;
    let yaml = two_services_yaml(
        "sd",
        &[workers[0].addr, workers[1].addr],
        slow_worker[0].addr,
        "    queue: { timeout: 300ms }\n",
    );
    let gateway = two_service_gateway(&yaml, 2).await;
    let client = client();

    // 30 generations at once on 2 pods that take one each: 28 wait in line.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let (client, addr) = (client.clone(), gateway.addr);
        tasks.push(tokio::spawn(async move { send(&client, txt2img(addr, &format!("dog {i}"), 10)).await.status }));
    }
    gateway.wait_for(|g| g.queue_depth() >= 10, "requests queued behind the two busy pods").await;
    assert!(metric(gateway.admin, "sdgate_queue_depth{service=\"sd\"}").await.unwrap_or(0.0) >= 1.0);

    // An unknown host: 404, counted with service="".
    let unknown = send(&client, txt2img_to(gateway.addr, "nobody.example.com", "lost", 1)).await;
    unknown.assert_json_error(404);

    // `slow`: one generation keeps its only pod busy for 1 s; the next request
    // waits past the 300 ms queue timeout: 504.
    let busy = {
        let (client, addr) = (client.clone(), gateway.addr);
        tokio::spawn(async move { send(&client, txt2img_to(addr, SLOW_HOST, "long", 20)).await.status })
    };
    let slow_gate = gateway.proxy.services()[1].gate.clone();
    eventually("the slow pod busy", || {
        let busy = slow_gate.inspect(|g| g.inflight()) == 1;
        async move { busy }
    })
    .await;
    send(&client, txt2img_to(gateway.addr, SLOW_HOST, "late", 1)).await.assert_json_error(504);
    assert_eq!(busy.await.unwrap().as_u16(), 200);
    for task in tasks {
        assert_eq!(task.await.unwrap().as_u16(), 200);
    }

    wait_until_idle(gateway.admin, &["sd", "slow"]).await;
    let scrape = Scrape::of(gateway.admin).await;
    let codes = |pairs: &[(&str, f64)]| pairs.iter().map(|(c, n)| (c.to_string(), *n)).collect::<BTreeMap<_, _>>();
    assert_eq!(scrape.codes("sd"), codes(&[("200", 30.0)]), "sd: 30 answers, all 200");
    assert_eq!(scrape.codes("slow"), codes(&[("200", 1.0), ("504", 1.0)]), "slow: the busy one and the timed-out one");
    assert_eq!(scrape.codes(""), codes(&[("404", 1.0)]), "the unknown host, unrouted");
    let total: f64 = scrape.matching("sdgate_requests_total", &[]).map(|s| s.value).sum();
    assert_eq!(total, 33.0, "every request counted once");

    for (service, routed) in [("sd", 30.0), ("slow", 2.0)] {
        for histogram in ["sdgate_queue_wait_seconds", "sdgate_request_duration_seconds"] {
            let count = scrape.value(&format!("{histogram}_count"), &[("service", service)]);
            assert_eq!(count, Some(routed), "{histogram}_count{{service={service}}}");
            let inf = scrape.value(&format!("{histogram}_bucket"), &[("service", service), ("le", "+Inf")]);
            assert_eq!(inf, Some(routed), "{histogram}_bucket{{le=+Inf,service={service}}}");
        }
    }
    let waited = scrape.value("sdgate_queue_wait_seconds_sum", &[("service", "sd")]).unwrap();
    assert!(waited > 1.0, "28 queued requests waited {waited} s in total");
    let slow_wait = scrape.value("sdgate_queue_wait_seconds_sum", &[("service", "slow")]).unwrap();
    assert!((0.3..5.0).contains(&slow_wait), "the 504 waited its 300 ms timeout, not {slow_wait} s");
    // Every kind has its series from the start (8: four kinds, two services), all at 0.
    let errors: Vec<f64> = scrape.matching("sdgate_upstream_errors_total", &[]).map(|s| s.value).collect();
    assert_eq!(errors, vec![0.0; 8], "no pod failed");
    assert_eq!(scrape.value("sdgate_endpoints", &[("service", "sd"), ("state", "ready")]), Some(2.0));
    assert_eq!(workers.iter().map(|w| w.stats().served).sum::<u64>(), 30);

    // /status tells the same story.
    let status = status(gateway.admin).await;
    let sd = &status["services"][0];
    assert_eq!(sd["name"], "sd");
    assert_eq!(sd["queue_depth"], 0);
    assert_eq!(sd["inflight"], 0);
    assert_eq!(sd["ready_replicas"], 2);
    assert_eq!(sd["recent"]["requests"], 30);
    assert_eq!(sd["recent"]["codes"], serde_json::json!({ "200": 30 }));
    assert_eq!(sd["recent"]["success_rate"], 1.0);
    let served: u64 = sd["endpoints"].as_array().unwrap().iter().map(|e| e["served"].as_u64().unwrap()).sum();
    assert_eq!(served, 30, "endpoints' served counts: {}", sd["endpoints"]);
    for p in ["p50", "p90", "p95", "p99"] {
        assert!(sd["recent"]["latency_seconds"][p].as_f64().is_some_and(|s| s > 0.0), "{p}: {}", sd["recent"]);
    }
    let slow = &status["services"][1];
    assert_eq!(slow["recent"]["codes"], serde_json::json!({ "200": 1, "504": 1 }));
    assert_eq!(slow["recent"]["success_rate"], 0.5);
    assert_eq!(slow["queue_depth"], 0);
    assert!(slow["oldest_wait_seconds"].is_null(), "nobody waits: {slow}");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_from_zero_records_exactly_one_cold_start_of_plausible_length() {
    let marker = unique_marker("coldstart");
    let port_base = free_port_range(2);
    let scale = "max: 2, stable_window: 2s, panic_window: 1s, scale_to_zero_grace: 1s, tick: 200ms";
    let gateway = TestGateway::start(&pool_yaml(&marker, port_base, "1s", scale, "")).await;
    let cold_count = "sdgate_cold_start_seconds_count{service=\"sd\"}";
    assert_eq!(metric(gateway.admin, cold_count).await, Some(0.0), "no cold start before any request");
    let ready = "sdgate_endpoints{service=\"sd\",state=\"ready\"}";
    assert_eq!(metric(gateway.admin, ready).await, Some(0.0), "a series even with no endpoint at all");

    let client = client();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let (client, addr) = (client.clone(), gateway.addr);
        tasks.push(tokio::spawn(async move { send(&client, txt2img(addr, &format!("cold {i}"), 5)).await.status }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().as_u16(), 200);
    }
    let scrape = Scrape::of(gateway.admin).await;
    assert_eq!(scrape.value("sdgate_cold_start_seconds_count", &[("service", "sd")]), Some(1.0));
    let took = scrape.value("sdgate_cold_start_seconds_sum", &[("service", "sd")]).unwrap();
    assert!((1.0..10.0).contains(&took), "cold start of {took} s with a 1 s model load");
    let last_scale = &status(gateway.admin).await["services"][0]["last_scale"];
    assert!(last_scale["desired"].as_u64().is_some_and(|d| d >= 1), "last scale: {last_scale}");

    // Going back to zero is not a cold start.
    eventually_within(Duration::from_secs(30), "the pool back at zero", || {
        let admin = gateway.admin;
        async move { status(admin).await["services"][0]["endpoints"].as_array().is_some_and(|e| e.is_empty()) }
    })
    .await;
    assert_eq!(metric(gateway.admin, cold_count).await, Some(1.0));
    gateway.shutdown().await;
}

/// A label matcher of a query: `key op "value"`.
struct Matcher {
    key: String,
    op: String,
    value: String,
}

/// Every `sdgate_*` name in `text`, with the label matchers written after it
/// (`{key op "value", ...}`), JSON escapes undone.
fn metric_uses(text: &str) -> Vec<(String, Vec<Matcher>)> {
    let text = text.replace("\\\"", "\"");
    let mut uses = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("sdgate_") {
        let after = &rest[start..];
        let end = after.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(after.len());
        let name = after[..end].trim_end_matches('_').to_string();
        let mut matchers = Vec::new();
        if let Some(body) = after[end..].strip_prefix('{').and_then(|b| b.split_once('}')).map(|(b, _)| b) {
            for matcher in body.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                let op_at = matcher.find(['=', '!']).unwrap_or_else(|| panic!("odd label matcher {matcher:?}"));
                let op_len =
                    if matcher[op_at..].starts_with("=~") || matcher[op_at..].starts_with('!') { 2 } else { 1 };
                let key = matcher[..op_at].trim().to_string();
                let value = matcher[op_at + op_len..].trim().trim_matches('"').to_string();
                matchers.push(Matcher { key, op: matcher[op_at..op_at + op_len].to_string(), value });
            }
        }
        uses.push((name, matchers));
        rest = &after[end..];
    }
    uses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_grafana_dashboard_and_keda_example_use_exists_in_a_real_scrape() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&deploy).expect("deploy/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json" || e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    for required in ["grafana-dashboard.json", "keda-scaledobject.yaml"] {
        assert!(files.iter().any(|f| f.ends_with(required)), "deploy/{required} is missing");
    }
    let grafana = std::fs::read_to_string(deploy.join("grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&grafana).expect("the Grafana dashboard is valid JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 8), "Grafana panels");

    // A gateway whose service is named as in the KEDA example, that served a
    // few requests, and a second service whose pod answers too late (an
    // upstream timeout), so that every series has been born.
    let workers = sims(1, fast_sim(5)).await;
    let slow_worker = sims(1, fast_sim(50)).await;
    let yaml =
        two_services_yaml("stable-diffusion", &[workers[0].addr], slow_worker[0].addr, "    request_timeout: 100ms\n");
    let gateway = two_service_gateway(&yaml, 1).await;
    let client = client();
    for i in 0..3 {
        assert_eq!(send(&client, txt2img(gateway.addr, &i.to_string(), 2)).await.status.as_u16(), 200);
    }
    send(&client, txt2img_to(gateway.addr, "nobody.example.com", "lost", 1)).await.assert_json_error(404);
    send(&client, txt2img_to(gateway.addr, SLOW_HOST, "too slow", 20)).await.assert_json_error(504);
    let scrape = Scrape::of(gateway.admin).await;

    let mut checked = BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let shown = file.file_name().unwrap().to_string_lossy().to_string();
        for (name, matchers) in metric_uses(&text) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| name.strip_suffix(suffix))
                .find(|base| scrape.types.get(*base).is_some_and(|t| t == "histogram"))
                .unwrap_or(&name);
            assert!(
                scrape.types.contains_key(family),
                "{shown} uses {name}, but a scrape has no {family}:\n{}",
                scrape.text
            );
            let samples: Vec<&Sample> = scrape.samples.iter().filter(|s| s.name == name).collect();
            if family == name && scrape.types[family] == "histogram" && matchers.is_empty() {
                checked.insert(name); // a histogram named in prose, not queried
                continue;
            }
            assert!(!samples.is_empty(), "{shown} queries {name}, which no sample of the scrape is named");
            for Matcher { key, op, value } in &matchers {
                assert!(
                    samples.iter().any(|s| s.labels.contains_key(key)),
                    "{shown}: {name} has no label {key:?} (matcher {key}{op}\"{value}\")"
                );
                if op == "=" && !value.contains('$') {
                    assert!(
                        samples.iter().any(|s| s.labels.get(key) == Some(value)),
                        "{shown}: no series {name}{{{key}=\"{value}\"}} in the scrape"
                    );
                }
            }
            checked.insert(name);
        }
    }
    for needed in [
        "sdgate_requests_total",
        "sdgate_queue_depth",
        "sdgate_inflight_requests",
        "sdgate_desired_replicas",
        "sdgate_endpoints",
        "sdgate_request_duration_seconds_bucket",
        "sdgate_queue_wait_seconds_bucket",
        "sdgate_cold_start_seconds_count",
    ] {
        assert!(checked.contains(needed), "the deploy files never use {needed}: {checked:?}");
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_root_serves_a_self_contained_dashboard_that_polls_status() {
    let workers = sims(1, fast_sim(1)).await;
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, "").await;
    let answer = send(&client(), plain_get(gateway.admin, "/")).await;
    assert_eq!(answer.status.as_u16(), 200);
    let content_type = answer.headers["content-type"].to_str().unwrap();
    assert!(content_type.starts_with("text/html"), "content-type {content_type}");
    let page = String::from_utf8(answer.body.to_vec()).expect("UTF-8 page");
    assert!(page.starts_with("<!doctype html>"), "an HTML page");
    assert!(page.contains("fetch(\"/status\""), "the page polls /status");
    assert!(page.contains("fetch(\"/status/history\""), "the page starts its charts from /status/history");
    for external in ["<script src", "<link", "@import", "url(", "//cdn", "fonts.googleapis"] {
        assert!(!page.contains(external), "the page loads something from elsewhere: {external}");
    }
    for metric in ["queue_depth", "inflight", "ready_replicas", "desired_replicas", "success_rate", "latency_"] {
        assert!(page.contains(&format!("\"{metric}")), "the page shows {metric}");
    }
    // The state it opens on is in the page: its first paint needs no fetch.
    let start = page.find("const INITIAL = ").expect("the inlined state") + "const INITIAL = ".len();
    let end = start + page[start..].find(";\n").unwrap();
    let initial: serde_json::Value = serde_json::from_str(&page[start..end]).expect("the inlined state is JSON");
    assert_eq!(initial["status"]["services"][0]["name"], "sd");
    assert_eq!(initial["status"]["services"][0]["endpoints"][0]["address"], workers[0].addr.to_string());
    assert!(initial["history"]["services"].is_array(), "{initial}");
    assert!(!page.contains("/*INITIAL*/"));
    // The page's data source answers.
    assert_eq!(status(gateway.admin).await["services"][0]["name"], "sd");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_are_counted_as_499_and_every_answer_carries_a_request_id() {
    // No tracing subscriber here: the log line is off, as at RUST_LOG=warn.
    assert!(!tracing::enabled!(tracing::Level::INFO));
    let worker = sims(1, fast_sim(50)).await;
    let gateway = TestGateway::in_front_of(&[worker[0].addr], 1, "").await;
    gateway.wait_for(|g| g.ready_count() == 1, "the pod ready").await;

    // One generation on the pod (1 s), one behind it in line; both clients leave.
    let dispatched = raw_request(gateway.addr, "left while generating", 20).await;
    gateway.wait_for(|g| g.inflight() == 1, "the first request on the pod").await;
    let queued = raw_request(gateway.addr, "left while queued", 1).await;
    gateway.wait_for(|g| g.queue_depth() == 1, "the second request in line").await;
    drop(queued);
    drop(dispatched);
    let left = "sdgate_requests_total{code=\"499\",service=\"sd\"}";
    eventually("both departures counted", || async move { metric(gateway.admin, left).await == Some(2.0) }).await;
    gateway.wait_for(|g| g.inflight() == 0 && g.queue_depth() == 0, "the pod finished and freed").await;
    assert_eq!(worker[0].stats().served, 1, "the queued request never reached the pod");

    // A request id is made when the client sends none, kept when it does,
    // and passed to the pod.
    let client = client();
    let made = send(&client, txt2img(gateway.addr, "id", 1)).await;
    let id = made.headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
    assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "made id {id:?}");
    let mut request = get(gateway.addr, "/sim/headers");
    request.headers_mut().insert("x-request-id", http::HeaderValue::from_static("client-chosen-7"));
    let kept = send(&client, request).await;
    assert_eq!(kept.headers["x-request-id"], "client-chosen-7");
    assert_eq!(kept.json()["x-request-id"], "client-chosen-7", "the pod saw the client's id");
    let unknown = send(&client, txt2img_to(gateway.addr, "nobody.example.com", "lost", 1)).await;
    unknown.assert_json_error(404);
    assert!(unknown.headers.contains_key("x-request-id"), "errors carry the id too");

    let scrape = Scrape::of(gateway.admin).await;
    assert_eq!(scrape.codes("sd"), BTreeMap::from([("200".to_string(), 2.0), ("499".to_string(), 2.0)]));
    for histogram in ["sdgate_queue_wait_seconds_count", "sdgate_request_duration_seconds_count"] {
        assert_eq!(scrape.value(histogram, &[("service", "sd")]), Some(4.0), "{histogram}");
    }
    let recent = &status(gateway.admin).await["services"][0]["recent"];
    assert_eq!(recent["codes"], serde_json::json!({ "200": 2, "499": 2 }));
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_times_out_before_any_pod_is_ready_is_not_a_cold_start() {
    let port = free_port().await;
    let pod: SocketAddr = ([127, 0, 0, 1], port).into();
    let gateway = TestGateway::start(&config_yaml(&[pod], 1, "    queue: { timeout: 200ms }\n")).await;
    let client = client();
    send(&client, txt2img(gateway.addr, "nobody home", 1)).await.assert_json_error(504);

    // The pod comes up later, with nobody waiting for it.
    let listener = tokio::net::TcpListener::bind(pod).await.expect("bind the pod's port");
    let _worker = sdgate::tools::sim::spawn(listener, fast_sim(1)).expect("spawn sim");
    gateway.wait_for(|g| g.ready_count() == 1, "the pod ready").await;
    assert_eq!(send(&client, txt2img(gateway.addr, "warm", 1)).await.status, 200);
    let scrape = Scrape::of(gateway.admin).await;
    assert_eq!(scrape.value("sdgate_cold_start_seconds_count", &[("service", "sd")]), Some(0.0));
    for (state, count) in [("ready", 1.0), ("not_ready", 0.0), ("draining", 0.0)] {
        assert_eq!(scrape.value("sdgate_endpoints", &[("service", "sd"), ("state", state)]), Some(count), "{state}");
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bypass_request_records_no_queue_wait_however_long_the_pod_takes() {
    let worker = sims(1, fast_sim(50)).await;
    // txt2img skips the gate here, so its 1 s generation is all upstream time.
    let extra = "    bypass: [\"/sdapi/v1/txt2img\"]\n";
    let gateway = TestGateway::in_front_of(&[worker[0].addr], 1, extra).await;
    assert_eq!(send(&client(), txt2img(gateway.addr, "bypassing", 20)).await.status, 200);
    let scrape = Scrape::of(gateway.admin).await;
    let sd = [("service", "sd")];
    assert_eq!(scrape.value("sdgate_queue_wait_seconds_count", &sd), Some(1.0));
    assert_eq!(scrape.value("sdgate_queue_wait_seconds_sum", &sd), Some(0.0), "a bypass request never waits");
    let took = scrape.value("sdgate_request_duration_seconds_sum", &sd).unwrap();
    assert!(took >= 0.9, "the generation took {took} s");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_history_keeps_the_charted_figures_so_a_new_dashboard_starts_with_them() {
    // One pod at 200 ms a step: a 20-step generation holds it for 4 s (two
    // sampling periods) while two more requests wait behind it.
    let worker = sims(1, fast_sim(200)).await;
    let gateway = TestGateway::in_front_of(&[worker[0].addr], 1, "").await;
    let admin = gateway.admin;
    let fresh = history(admin).await;
    assert_eq!(fresh["period_seconds"], 2.0);
    assert_eq!(fresh["span_seconds"], 300.0);
    assert_eq!(fresh["services"][0]["name"], "sd");
    // The sampler takes its first sample as the admin listener starts.
    eventually("a first sample", || async move { !history_samples(admin).await.is_empty() }).await;

    let client = client();
    let long = {
        let (client, addr) = (client.clone(), gateway.addr);
        tokio::spawn(async move { send(&client, txt2img(addr, "long", 20)).await.status })
    };
    gateway.wait_for(|g| g.inflight() == 1, "the long generation on the pod").await;
    let mut queued = Vec::new();
    for i in 0..2 {
        let (client, addr) = (client.clone(), gateway.addr);
        queued.push(tokio::spawn(async move { send(&client, txt2img(addr, &format!("next {i}"), 1)).await.status }));
    }
    gateway.wait_for(|g| g.queue_depth() == 2, "two requests in line").await;
    eventually("a sample with 1 in flight and 2 queued on the 1 ready pod", || async move {
        history_samples(admin)
            .await
            .iter()
            .any(|s| s["inflight"] == 1 && s["queue_depth"] == 2 && s["ready_replicas"] == 1)
    })
    .await;
    assert_eq!(long.await.unwrap().as_u16(), 200);
    for task in queued {
        assert_eq!(task.await.unwrap().as_u16(), 200);
    }

    // Once answered: the pods' rate, the minute's rate and its latencies.
    eventually("a sample after the answers", || async move {
        let samples = history_samples(admin).await;
        let last = samples.last().cloned().unwrap_or_default();
        samples.iter().any(|s| s["served_per_second"].as_f64().is_some_and(|r| r > 0.0))
            && last["queue_depth"] == 0
            && last["inflight"] == 0
            && last["requests_per_second"].as_f64().is_some_and(|r| r > 0.0)
            && last["latency_seconds"]["p99"].as_f64().is_some_and(|p| p >= 4.0)
    })
    .await;

    // Oldest first, within the span, the newest at most about a period old.
    let samples = history_samples(admin).await;
    let ages: Vec<f64> = samples.iter().map(|s| s["age_seconds"].as_f64().expect("age_seconds")).collect();
    assert!(ages.windows(2).all(|w| w[0] > w[1]), "ages not decreasing: {ages:?}");
    assert!(ages[0] <= 300.0 && ages[ages.len() - 1] < 4.0, "ages {ages:?}");
    assert!(samples.len() <= 151, "{} samples", samples.len());
    assert!(samples[0]["served_per_second"].is_null(), "no rate before a second sample: {}", samples[0]);
    gateway.shutdown().await;
}
