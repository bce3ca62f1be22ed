//! sdgate as the ingress of a Kubernetes cluster, against an in-process API
//! server stand-in (tests/support/kube_api.rs) that the real kube client
//! talks to, whose pods are sim workers on their own loopback addresses.

// Times real work (wall clock), not sdgate's runtime: the std clock is right here.
#![allow(clippy::disallowed_types)]

mod common;
#[path = "support/kube_api.rs"]
mod kube_api;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use kube_api::{ClusterOptions, FakeCluster};
use sdgate::control::provider::kubernetes::{DELETION_COST, RBAC};

/// A one-service config whose backend is the cluster's Deployment; one
/// replica (`leader_election: off`) unless `extra` sets leader election.
fn kube_yaml(cluster: &FakeCluster, scale: &str, extra: &str) -> String {
    let extra =
        if extra.contains("leader_election") { extra.to_string() } else { format!("leader_election: off\n{extra}") };
    kube_yaml_as_written(cluster, scale, &extra)
}

/// [`kube_yaml`] with `extra` as it is (no `leader_election` unless it has one).
fn kube_yaml_as_written(cluster: &FakeCluster, scale: &str, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ndrain_timeout: 5s\n{extra}services:\n  - name: sd\n    hosts: [\"{HOST}\"]\n    container_concurrency: 1\n    readiness: {{ tcp: true, period: 10ms }}\n    scale: {{ {scale} }}\n    backend: {{ kubernetes: {{ namespace: default, deployment: {}, port: http, kubeconfig: \"{}\" }} }}\n",
        cluster.deployment_name(),
        cluster.kubeconfig_path().display()
    )
}

const FAST_SCALE: &str = "min: 0, max: 5, stable_window: 3s, panic_window: 1s, scale_to_zero_grace: 1s, tick: 200ms";

fn no_overlap_anywhere(cluster: &FakeCluster) {
    let stats: Vec<_> = cluster.all_pods().into_iter().filter_map(|p| p.stats).collect();
    assert!(!stats.is_empty(), "some pod served");
    assert_no_overlap(&stats);
}

/// What the code asked of the API is within what the Role grants.
fn verbs_within_rbac(cluster: &FakeCluster) {
    let granted: BTreeSet<(String, String)> = RBAC
        .iter()
        .flat_map(|(_, resource, verbs)| verbs.iter().map(move |v| (v.to_string(), resource.to_string())))
        .collect();
    let used = cluster.verbs();
    assert!(used.is_subset(&granted), "used {used:?}, granted {granted:?}");
}

/// 5 clients x 10 requests (the guides' `hey -n 50 -c 5`).
async fn guides_load(addr: std::net::SocketAddr) -> Vec<u16> {
    let client = client();
    let tasks: Vec<_> = (0..5)
        .map(|c| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut codes = Vec::new();
                for i in 0..10 {
                    codes.push(send(&client, txt2img(addr, &format!("pretty dog {c}-{i}"), 10)).await.status.as_u16());
                }
                codes
            })
        })
        .collect();
    let mut codes = Vec::new();
    for task in tasks {
        codes.extend(task.await.unwrap());
    }
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_zero_replicas_the_guides_load_is_all_200_and_the_deployment_goes_back_to_zero() {
    let cluster = FakeCluster::start(ClusterOptions::default()).await;
    let gateway = TestGateway::start(&kube_yaml(&cluster, FAST_SCALE, "")).await;
    cluster.wait_for("sdgate watching pods", Duration::from_secs(10), |c| c.open_watches() >= 2).await;
    let sent = Instant::now();
    let codes = guides_load(gateway.addr).await;
    assert_eq!(codes, vec![200; 50], "50 x 200");
    let patched = cluster.first_request_at("patch", "deployments/scale").expect("scaled");
    assert!(patched >= sent && patched - sent < Duration::from_secs(1), "activation patched at once");
    assert!(cluster.all_pods().len() >= 2, "the burst scaled past one pod");
    no_overlap_anywhere(&cluster);
    cluster.wait_for("replicas back to 0", Duration::from_secs(40), |c| c.replicas() == 0 && c.pods().is_empty()).await;
    gateway.wait_for(|g| g.endpoints().is_empty(), "every endpoint removed").await;
    // Scale-down marked the pods it drained before lowering replicas, so
    // the ReplicaSet deleted exactly those.
    for pod in cluster.all_pods() {
        assert_eq!(
            pod.annotations.get(DELETION_COST).map(String::as_str),
            Some("-1000"),
            "{} deleted undrained",
            pod.name
        );
    }
    verbs_within_rbac(&cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_gets_its_first_request_as_soon_as_its_port_opens_before_the_kubelet_says_ready() {
    let options = ClusterOptions { kubelet_ready_delay: Duration::from_secs(3), ..ClusterOptions::default() };
    let cluster = FakeCluster::start(options).await;
    let gateway = TestGateway::start(&kube_yaml(&cluster, FAST_SCALE, "")).await;
    cluster.wait_for("sdgate watching pods", Duration::from_secs(10), |c| c.open_watches() >= 2).await;
    let answer = send(&client(), txt2img(gateway.addr, "first", 1)).await;
    assert_eq!(answer.status.as_u16(), 200);
    let answered = Instant::now();
    let pod = cluster.pods().into_iter().next().expect("a pod");
    assert!(pod.ready_at.is_none_or(|ready| ready > answered), "served before the kubelet's Ready");
    let open = pod.port_open_us.expect("port opened");
    let job = &pod.stats.expect("stats").jobs[0];
    let after_open = Duration::from_micros(job.arrived_us.saturating_sub(open));
    assert!(after_open < Duration::from_secs(1), "first request {after_open:?} after the port opened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_deleted_with_requests_in_flight_loses_none_and_queued_ones_go_elsewhere() {
    let cluster = FakeCluster::start(ClusterOptions::default()).await;
    let scale = "min: 2, max: 3, stable_window: 60s, panic_window: 6s, tick: 200ms";
    let gateway = TestGateway::start(&kube_yaml(&cluster, scale, "")).await;
    gateway.wait_for(|g| g.ready_count() == 2, "two pods ready").await;
    let client = client();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (client, addr) = (client.clone(), gateway.addr);
            tokio::spawn(async move { send(&client, txt2img(addr, &format!("job {i}"), 30)).await })
        })
        .collect();
    gateway.wait_for(|g| g.inflight() == 2 && g.queue_depth() == 6, "both pods busy, six queued").await;
    let victim = cluster.pods()[0].name.clone();
    assert!(cluster.delete_pod(&victim));
    let mut ok = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        match answer.status.as_u16() {
            200 => ok += 1,
            502 => answer.assert_json_error(502),
            other => panic!("unexpected {other}"),
        }
    }
    assert!(ok >= 7, "only the deleted pod's own request may fail ({ok} of 8 ok)");
    no_overlap_anywhere(&cluster);
    let victim_served =
        cluster.all_pods().into_iter().find(|p| p.name == victim).and_then(|p| p.stats).map(|s| s.served);
    assert!(victim_served.unwrap_or(0) <= 1, "nothing new was sent to the terminating pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_expired_with_410_relists_without_duplicate_or_lost_endpoints() {
    let cluster = FakeCluster::start(ClusterOptions::default()).await;
    let scale = "min: 2, max: 3, stable_window: 60s, panic_window: 6s, tick: 200ms";
    let gateway = TestGateway::start(&kube_yaml(&cluster, scale, "")).await;
    gateway.wait_for(|g| g.ready_count() == 2, "two pods ready").await;
    let lists = cluster.requests_of("list", "pods").len();
    cluster.expire_watches();
    cluster.wait_for("a re-list", Duration::from_secs(10), |c| c.requests_of("list", "pods").len() > lists).await;
    // A pod born during the outage is found by the re-list too.
    cluster.set_replicas(3);
    gateway.wait_for(|g| g.ready_count() == 3, "three pods").await;
    let addrs: BTreeSet<_> = gateway.endpoints().iter().map(|e| e.addr).collect();
    let pods: BTreeSet<_> = cluster.pods().iter().filter_map(|p| p.addr).collect();
    assert_eq!(gateway.endpoints().len(), 3, "no duplicate endpoint");
    assert_eq!(addrs, pods, "one endpoint per pod");
    assert_eq!(send(&client(), txt2img(gateway.addr, "after 410", 1)).await.status.as_u16(), 200);
}

/// Whether a gateway's `/readyz` answers 200 (the lease holder, or a
/// standby that knows where to hand requests).
async fn is_ready(admin: std::net::SocketAddr) -> bool {
    send(&client(), get(admin, "/readyz")).await.status.as_u16() == 200
}

/// The status of an answer, 0 when there is none (refused, reset).
async fn status_of(request: http::Request<http_body_util::Full<bytes::Bytes>>) -> u16 {
    match tokio::time::timeout(Duration::from_secs(30), client().request(request)).await {
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            match http_body_util::BodyExt::collect(response.into_body()).await {
                Ok(_) => status,
                Err(_) => 0,
            }
        }
        _ => 0,
    }
}

/// Whether a gateway holds the lease (`/status` `active`).
async fn is_active(admin: std::net::SocketAddr) -> bool {
    status(admin).await["active"] == true
}

/// The requests a standby handed to the active replica.
async fn handed_over(admin: std::net::SocketAddr) -> f64 {
    metric(admin, "sdgate_handed_over_total{result=\"sent\"}").await.unwrap_or(0.0)
}

/// Two sdgate processes on one Lease; returns (holder, standby) once exactly
/// one of them is active.
async fn two_replicas(cluster: &FakeCluster, scale: &str, lease: &str) -> (GatewayProcess, GatewayProcess) {
    two_replicas_with(cluster, scale, lease, "").await
}

/// [`two_replicas`] with `extra` top-level config lines.
async fn two_replicas_with(
    cluster: &FakeCluster,
    scale: &str,
    lease: &str,
    extra: &str,
) -> (GatewayProcess, GatewayProcess) {
    let election = |name: &str| {
        format!(
            "shutdown_delay: 1s\nleader_election: {{ lease: sdgate, identity: {name}, {lease}, kubeconfig: \"{}\" }}\n{extra}",
            cluster.kubeconfig_path().display()
        )
    };
    let a = GatewayProcess::start(&kube_yaml(cluster, scale, &election("a"))).await;
    let b = GatewayProcess::start(&kube_yaml(cluster, scale, &election("b"))).await;
    holder_and_standby(a, b).await
}

/// (holder, standby) of two replicas, once exactly one is active and the
/// other is ready to hand requests over.
async fn holder_and_standby(a: GatewayProcess, b: GatewayProcess) -> (GatewayProcess, GatewayProcess) {
    eventually("one replica active", || {
        let (ra, rb) = (is_active(a.admin), is_active(b.admin));
        async move { ra.await ^ rb.await }
    })
    .await;
    let (holder, standby) = if is_active(a.admin).await { (a, b) } else { (b, a) };
    eventually("the standby ready to hand requests over", || is_ready(standby.admin)).await;
    (holder, standby)
}

/// Two replicas started from a config written for one (no
/// `leader_election`): a kubernetes backend elects by default, on a Lease
/// named after the Deployment, so only one of them ever dispatches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_a_config_without_leader_election_never_both_dispatch() {
    let cluster = FakeCluster::start(ClusterOptions::default()).await;
    let scale = "min: 1, max: 2, stable_window: 60s, panic_window: 6s, tick: 200ms";
    let yaml = kube_yaml_as_written(&cluster, scale, "shutdown_delay: 0s\n");
    let config = sdgate::Config::from_yaml(&yaml).unwrap();
    let lease = config.election().expect("on by default with a kubernetes backend");
    assert_eq!(lease.lease, format!("sdgate-{}", cluster.deployment_name()));
    let a = GatewayProcess::start(&yaml).await;
    let b = GatewayProcess::start(&yaml).await;
    let (active, standby) = holder_and_standby(a, b).await;
    let client = client();
    let mut sent = Vec::new();
    for i in 0..6 {
        let (client, addr) = (client.clone(), active.addr);
        sent.push(tokio::spawn(async move { send(&client, txt2img(addr, &i.to_string(), 2)).await.status.as_u16() }));
    }
    for task in sent {
        assert_eq!(task.await.unwrap(), 200);
    }
    // The standby hands its requests to the active replica: one queue.
    assert_eq!(send(&client, txt2img(standby.addr, "to the standby", 1)).await.status.as_u16(), 200);
    assert_eq!(handed_over(standby.admin).await, 1.0);
    // A handed-over request's X-Forwarded-For names its client (here from
    // 127.0.0.2), not the standby (127.0.0.1); the relay headers stop at
    // the active replica.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stream = socket.connect(standby.addr).await.unwrap();
    let head = format!(
        "GET /sim/headers HTTP/1.1\r\nHost: {HOST}\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(30), tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer))
            .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    let headers: serde_json::Value = serde_json::from_str(body).expect("the headers the pod saw, as JSON");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.2", "{headers}");
    // What the client said of its scheme and host is not believed because a
    // standby passed it on.
    assert_eq!(
        (headers["x-forwarded-proto"].as_str(), headers["x-forwarded-host"].as_str()),
        (Some("http"), Some(HOST))
    );
    assert!(headers.get("x-sdgate-relay").is_none() && headers.get("x-sdgate-client").is_none(), "{headers}");
    assert_eq!(handed_over(standby.admin).await, 2.0);
    no_overlap_anywhere(&cluster);
}

/// A txt2img over TLS with curl to `addr` (SNI: the service's host),
/// trusting `ca`: the status code curl saw.
fn curl_tls(addr: std::net::SocketAddr, ca: &std::path::Path, steps: u32) -> String {
    let url = format!("https://{HOST}:{}/sdapi/v1/txt2img", addr.port());
    let output = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30"])
        .args(["--resolve", &format!("{HOST}:{}:127.0.0.1", addr.port())])
        .arg("--cacert")
        .arg(ca)
        .args([
            "-H",
            "Content-Type: application/json",
            "-d",
            &format!(r#"{{"prompt":"tls relay","steps":{steps}}}"#),
            &url,
        ])
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// With TLS on the listener, a standby hands requests over on the holder's
/// plain relay listener (`tls.relay_listen`; the TLS certificates are for
/// clients' host names, not the pod's address): a client of the standby
/// over TLS gets its answer, and the relay listener serves nothing without
/// the holder's relay token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_a_standby_hands_over_on_the_holders_relay_listener() {
    let cluster = FakeCluster::start(ClusterOptions::default()).await;
    let dir = std::env::temp_dir().join(unique_marker("sdgate-relay-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let made = rcgen::generate_simple_self_signed(vec![HOST.to_string()]).unwrap();
    std::fs::write(dir.join("sd.pem"), made.cert.pem()).unwrap();
    std::fs::write(dir.join("sd.key"), made.key_pair.serialize_pem()).unwrap();
    let tls = format!(
        "tls:\n  certificates:\n    - {{ hosts: [\"{HOST}\"], cert: \"{0}/sd.pem\", key: \"{0}/sd.key\" }}\n  relay_listen: 127.0.0.1:0\n",
        dir.display()
    );
    let scale = "min: 1, max: 2, stable_window: 60s, panic_window: 6s, tick: 200ms";
    let (holder, standby) = two_replicas_with(&cluster, scale, "lease_duration: 2s, renew_period: 500ms", &tls).await;
    let ca = dir.join("sd.pem");
    let (holder_addr, ca_path) = (holder.addr, ca.clone());
    let to_holder = tokio::task::spawn_blocking(move || curl_tls(holder_addr, &ca_path, 1)).await.unwrap();
    assert_eq!(to_holder, "200");
    let standby_addr = standby.addr;
    let via_standby = tokio::task::spawn_blocking(move || curl_tls(standby_addr, &ca, 1)).await.unwrap();
    assert_eq!(via_standby, "200", "handed over");
    assert_eq!(handed_over(standby.admin).await, 1.0);
    // The relay listener takes hand-overs only.
    let line = holder.log_line(&["taking hand-overs"]).await;
    let relay = address_after(&line, "relay=").expect("the relay listener's address");
    let refused = raw_exchange(
        relay,
        format!("GET /sim/headers HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    // A hand-over in progress when the holder is stopped is drained, not cut.
    let ca = dir.join("sd.pem");
    let long = tokio::task::spawn_blocking(move || curl_tls(standby_addr, &ca, 150));
    let holder_admin = holder.admin;
    eventually("the long hand-over on a pod", || async move {
        metric(holder_admin, "sdgate_inflight_requests{service=\"sd\"}").await == Some(1.0)
    })
    .await;
    holder.signal("TERM");
    assert_eq!(long.await.unwrap(), "200", "the handed-over request finished across the holder's drain");
    no_overlap_anywhere(&cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two sdgate processes, one Lease: only the holder serves; kill it and the
/// other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_lease_the_standby_takes_over_when_the_holder_is_killed() {
    let cluster = FakeCluster::start(ClusterOptions::default()).await;
    let scale = "min: 1, max: 3, stable_window: 60s, panic_window: 6s, tick: 200ms";
    let (mut leader, standby) = two_replicas(&cluster, scale, "lease_duration: 2s, renew_period: 500ms").await;
    let client = client();
    assert_eq!(send(&client, txt2img(leader.addr, "to the leader", 2)).await.status.as_u16(), 200);
    assert_eq!(send(&client, txt2img(standby.addr, "via the standby", 2)).await.status.as_u16(), 200);
    let holder = cluster.lease("sdgate").and_then(|l| l.spec).and_then(|s| s.holder_identity);
    assert!(holder.is_some(), "the lease is held");

    leader.child.start_kill().unwrap();
    let killed = Instant::now();
    let _ = leader.child.wait().await;
    eventually_within(Duration::from_secs(15), "the standby active", || is_active(standby.admin)).await;
    let takeover = killed.elapsed();
    println!("takeover after SIGKILL: {takeover:?}");
    // lease_duration + 2 x renew_period, plus the probe of the pods.
    assert!(takeover < Duration::from_secs(6), "takeover took {takeover:?}");
    let codes = guides_load(standby.addr).await;
    assert_eq!(codes, vec![200; 50]);
    no_overlap_anywhere(&cluster);
    verbs_within_rbac(&cluster);
}

/// A holder stopped with SIGTERM drains, then gives the lease up: the
/// standby takes over at its next try, not after `lease_duration`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_stopped_gracefully_releases_the_lease_at_once() {
    let cluster = FakeCluster::start(ClusterOptions::default()).await;
    let scale = "min: 1, max: 2, stable_window: 60s, panic_window: 6s, tick: 200ms";
    let (mut leader, standby) = two_replicas(&cluster, scale, "lease_duration: 10s, renew_period: 500ms").await;
    let client = client();
    assert_eq!(send(&client, txt2img(leader.addr, "before", 2)).await.status.as_u16(), 200);
    leader.signal("TERM");
    let stopped = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(15), leader.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "a graceful exit");
    eventually_within(Duration::from_secs(15), "the standby active", || is_active(standby.admin)).await;
    let takeover = stopped.elapsed();
    println!("takeover after SIGTERM: {takeover:?}");
    assert!(takeover < Duration::from_secs(5), "released, not expired: {takeover:?} (lease_duration 10 s)");
    assert_eq!(send(&client, txt2img(standby.addr, "after", 2)).await.status.as_u16(), 200);
    no_overlap_anywhere(&cluster);
}

/// A rollout drops nothing: clients that follow readiness (as a Service
/// does) keep sending across a SIGTERM of the active replica; the standby
/// hands their requests over, then takes the Lease, and every answer is 200
/// with no pod ever running two generations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_follow_readiness_see_no_failure_across_a_sigterm_of_the_active_replica() {
    let cluster = FakeCluster::start(ClusterOptions::default()).await;
    let scale = "min: 2, max: 2, stable_window: 60s, panic_window: 6s, tick: 200ms";
    let (leader, standby) = two_replicas(&cluster, scale, "lease_duration: 10s, renew_period: 500ms").await;
    let replicas = [(leader.addr, leader.admin), (standby.addr, standby.admin)];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Four clients, each sending to a replica that says it is ready, in turn.
    let mut clients = Vec::new();
    for c in 0..4usize {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            let mut turn = c;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                turn += 1;
                // The first replica, in turn, whose /readyz says 200 (one that
                // is gone is not ready); none: a failure for this client.
                let mut chosen = None;
                for k in 0..2 {
                    let (addr, admin) = replicas[(turn + k) % 2];
                    if status_of(get(admin, "/readyz")).await == 200 {
                        chosen = Some(addr);
                        break;
                    }
                }
                codes.push(match chosen {
                    Some(addr) => status_of(txt2img(addr, &format!("{c}"), 2)).await,
                    None => 0,
                });
            }
            codes
        }));
    }
    eventually("requests through both replicas", || {
        let admin = standby.admin;
        async move { handed_over(admin).await >= 4.0 }
    })
    .await;
    leader.signal("TERM");
    let mut leader = leader;
    let status = tokio::time::timeout(Duration::from_secs(20), leader.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "a graceful exit");
    eventually_within(Duration::from_secs(15), "the standby active", || is_active(standby.admin)).await;
    // A few more rounds on the new holder alone.
    let now_active = standby.admin;
    eventually("requests served by the new holder", || async move {
        metric(now_active, "sdgate_requests_total{code=\"200\",service=\"sd\"}").await.unwrap_or(0.0) >= 4.0
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut codes = Vec::new();
    for task in clients {
        codes.extend(task.await.unwrap());
    }
    let failed: Vec<_> = codes.iter().filter(|c| **c != 200).collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), codes.len());
    assert!(codes.len() >= 12, "{} requests", codes.len());
    no_overlap_anywhere(&cluster);
}

/// Two replicas share one PostgreSQL jobs store: jobs submitted to either
/// (the standby hands its submits over) are run by the active one; SIGKILL
/// it and the other, once it holds the Lease, finishes every job, each with
/// its own result, no pod ever running two generations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_jobs_store_and_the_survivor_finishes_every_job() {
    let Some((url, table)) = postgres_table("replicas").await else { return };
    let cluster = FakeCluster::start(ClusterOptions::default()).await;
    let scale = "min: 2, max: 2, stable_window: 60s, panic_window: 6s, tick: 200ms";
    let jobs = format!("jobs: {{ store: {{ postgres: {{ url: \"{url}\", table: {table} }} }}, max_dispatched: 4 }}\n");
    let (mut active, standby) =
        two_replicas_with(&cluster, scale, "lease_duration: 2s, renew_period: 500ms", &jobs).await;
    let client = client();
    let mut ids = Vec::new();
    for i in 0..40 {
        let addr = if i % 2 == 0 { active.addr } else { standby.addr };
        let prompt = format!("job {i}");
        let mut request = txt2img(addr, &prompt, 20);
        request.headers_mut().insert("prefer", "respond-async".parse().unwrap());
        let answer = send(&client, request).await;
        assert_eq!(answer.status.as_u16(), 202, "{}", String::from_utf8_lossy(&answer.body));
        ids.push((answer.json()["id"].as_str().unwrap().to_string(), prompt));
    }
    let admin = active.admin;
    eventually_within(Duration::from_secs(30), "some jobs done on the active replica", || async move {
        metric(admin, "sdgate_jobs_finished_total{service=\"sd\",state=\"succeeded\"}").await.unwrap_or(0.0) >= 4.0
    })
    .await;
    active.child.start_kill().unwrap();
    let _ = active.child.wait().await;
    eventually_within(Duration::from_secs(15), "the standby active", || is_active(standby.admin)).await;
    let admin = standby.admin;
    eventually_within(Duration::from_secs(60), "every job succeeded", || async move {
        metric(admin, "sdgate_jobs{service=\"sd\",state=\"succeeded\"}").await == Some(40.0)
    })
    .await;
    let finished_here =
        metric(standby.admin, "sdgate_jobs_finished_total{service=\"sd\",state=\"succeeded\"}").await.unwrap_or(0.0);
    println!("the survivor finished {finished_here} of 40 jobs");
    assert!(finished_here >= 1.0, "the survivor finished what was left");
    for (id, prompt) in &ids {
        let view = send(&client, get(standby.addr, &format!("/.sdgate/jobs/{id}"))).await.json();
        assert_eq!(view["state"], "succeeded", "{view}");
        assert_eq!(view["result"]["body"]["parameters"]["prompt"], prompt.as_str(), "its own result: {view}");
    }
    no_overlap_anywhere(&cluster);
}

/// No API to talk to: waiting requests are told why no pod comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_api_server_waiting_requests_are_told_why() {
    let port = free_port().await;
    let kubeconfig = TempFile::new(
        "yaml",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{ server: \"http://127.0.0.1:{port}\" }}\ncontexts:\n- name: c\n  context: {{ cluster: c, user: u }}\ncurrent-context: c\nusers:\n- name: u\n  user: {{}}\n"
        ),
    );
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nleader_election: off\nservices:\n  - name: sd\n    hosts: [\"{HOST}\"]\n    queue: {{ timeout: 1s }}\n    backend: {{ kubernetes: {{ deployment: sd, port: 7860, kubeconfig: \"{}\" }} }}\n",
        kubeconfig.path.display()
    );
    let gateway = TestGateway::start(&yaml).await;
    let answer = send(&client(), txt2img(gateway.addr, "nobody home", 1)).await;
    answer.assert_json_error(504);
    let error = answer.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("kubernetes backend"), "{error}");
}
