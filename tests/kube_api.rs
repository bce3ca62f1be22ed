//! The Kubernetes API stand-in (`tests/support/kube_api.rs`) against the real
//! `kube` client: list and watcher after a scale patch, recovery from 410
//! Gone and from cut watches, pod patches and the ReplicaSet's deletion
//! order, Lease optimistic concurrency, and a pod's port opening before the
//! kubelet marks it Ready.

// Times real work (wall clock), not sdgate's runtime: the std clock is right here.
#![allow(clippy::disallowed_types)]

#[path = "support/kube_api.rs"]
mod kube_api;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube_api::{ClusterOptions, FakeCluster, DELETION_COST};
use serde_json::json;

const APP: &str = "stable-diffusion";
const SELECTOR: &str = "app=stable-diffusion";

async fn client(cluster: &FakeCluster) -> kube::Client {
    let kubeconfig = Kubeconfig::read_from(cluster.kubeconfig_path()).expect("read kubeconfig");
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("kube config");
    kube::Client::try_from(config).expect("kube client")
}

fn fast(replicas: i32) -> ClusterOptions {
    ClusterOptions {
        replicas,
        startup_delay: Duration::from_millis(100),
        kubelet_ready_delay: Duration::from_millis(300),
        termination_grace: Duration::from_millis(500),
        ..Default::default()
    }
}

/// Polls `check` every 5 ms until it holds; panics after `limit`.
async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref().and_then(|s| s.pod_ip.clone())
}

fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// What a `kube::runtime::watcher` emitted, and the store it implies (as a
/// reflector keeps it).
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Init,
    InitApply(String),
    InitDone,
    Apply(String),
    Delete(String),
    Error(Option<u16>),
}

#[derive(Default)]
struct Watched {
    events: Vec<(Instant, Seen)>,
    store: BTreeMap<String, Pod>,
    buffer: BTreeMap<String, Pod>,
}

impl Watched {
    fn count(&self, seen: &Seen) -> usize {
        self.events.iter().filter(|(_, s)| s == seen).count()
    }
}

/// Runs a pod watcher (label `app=stable-diffusion`) until dropped.
struct PodWatcher {
    state: Arc<Mutex<Watched>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodWatcher {
    fn start(client: kube::Client) -> Self {
        let state = Arc::new(Mutex::new(Watched::default()));
        let shared = state.clone();
        let api: Api<Pod> = Api::namespaced(client, "default");
        let task = tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default().labels(SELECTOR)).boxed();
            while let Some(event) = stream.next().await {
                let failed = event.is_err();
                {
                    let mut w = shared.lock().expect("watched");
                    let now = Instant::now();
                    match event {
                        Ok(watcher::Event::Init) => {
                            w.buffer.clear();
                            w.events.push((now, Seen::Init));
                        }
                        Ok(watcher::Event::InitApply(pod)) => {
                            w.events.push((now, Seen::InitApply(name(&pod))));
                            w.buffer.insert(name(&pod), pod);
                        }
                        Ok(watcher::Event::InitDone) => {
                            w.store = std::mem::take(&mut w.buffer);
                            w.events.push((now, Seen::InitDone));
                        }
                        Ok(watcher::Event::Apply(pod)) => {
                            w.events.push((now, Seen::Apply(name(&pod))));
                            w.store.insert(name(&pod), pod);
                        }
                        Ok(watcher::Event::Delete(pod)) => {
                            w.events.push((now, Seen::Delete(name(&pod))));
                            w.store.remove(&name(&pod));
                        }
                        Err(watcher::Error::WatchError(status)) => w.events.push((now, Seen::Error(Some(status.code)))),
                        Err(e) => {
                            eprintln!("watcher error: {e}");
                            w.events.push((now, Seen::Error(None)));
                        }
                    }
                }
                // The watcher retries at once after an error: without a pause a
                // dead API would make this a busy loop that never yields.
                if failed {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        Self { state, task }
    }

    fn with<T>(&self, f: impl FnOnce(&Watched) -> T) -> T {
        f(&self.state.lock().expect("watched"))
    }

    fn store(&self) -> BTreeMap<String, Pod> {
        self.with(|w| w.store.clone())
    }
}

impl Drop for PodWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn ping(addr: SocketAddr) -> Option<u16> {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let request =
        http::Request::get(format!("http://{addr}/internal/ping")).body(Full::new(Bytes::new())).expect("request");
    let response = tokio::time::timeout(Duration::from_secs(2), client.request(request)).await.ok()?.ok()?;
    Some(response.status().as_u16())
}

async fn generate(addr: SocketAddr, steps: u32) -> (u16, String) {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let body = json!({"prompt": "pretty dog", "steps": steps}).to_string();
    let request = http::Request::post(format!("http://{addr}/sdapi/v1/txt2img"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    match client.request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let worker = response.headers().get("x-worker").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let _ = response.into_body().collect().await;
            (status, worker)
        }
        Err(e) => (0, e.to_string()),
    }
}

async fn refuses_connections(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}

fn api_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_patch_makes_pods_that_list_and_watcher_see() {
    let cluster = FakeCluster::start(fast(0)).await;
    let client = client(&cluster).await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());

    let listed = pods.list(&ListParams::default().labels(SELECTOR)).await.expect("list pods");
    assert!(listed.items.is_empty());
    assert!(listed.metadata.resource_version.is_some_and(|rv| rv.parse::<u64>().is_ok()));

    let deployment = deployments.get(APP).await.expect("get deployment");
    let spec = deployment.spec.expect("spec");
    assert_eq!(spec.replicas, Some(0));
    assert_eq!(spec.selector.match_labels.expect("matchLabels")["app"], APP);
    let port = &spec.template.spec.expect("template").containers[0].ports.clone().expect("ports")[0];
    assert_eq!(port.name.as_deref(), Some("http"));
    assert_eq!(port.container_port, i32::from(cluster.pod_port()));
    assert_eq!(deployments.get_scale(APP).await.expect("get scale").spec.expect("spec").replicas, Some(0));

    let watched = PodWatcher::start(client.clone());
    until("the watcher's first InitDone", Duration::from_secs(5), || watched.with(|w| w.count(&Seen::InitDone) == 1))
        .await;

    let patched = deployments
        .patch_scale(APP, &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 2}})))
        .await
        .expect("patch scale");
    assert_eq!(patched.spec.expect("spec").replicas, Some(2));
    assert_eq!(cluster.replicas(), 2);

    until("two ready pods in the watcher's store", Duration::from_secs(10), || {
        let store = watched.store();
        store.len() == 2 && store.values().all(|p| is_ready(p) && pod_ip(p).is_some())
    })
    .await;
    let mut ips: Vec<String> = watched.store().values().filter_map(pod_ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 2, "each pod has its own IP: {ips:?}");
    for info in cluster.pods() {
        let ip = info.ip.expect("pod IP");
        assert_eq!(ip.octets()[..3], [127, 0, 1], "pods live on 127.0.1.N");
        assert!(ips.contains(&ip.to_string()));
        assert_eq!(ping(info.addr.expect("addr")).await, Some(200), "{} answers on its own address", info.name);
    }
    let listed = pods.list(&ListParams::default().labels(SELECTOR)).await.expect("list pods");
    assert_eq!(listed.items.len(), 2);
    assert!(pods.list(&ListParams::default().labels("app=other")).await.expect("list").items.is_empty());

    // Back to zero: each pod terminates (deletionTimestamp), then is DELETED.
    let addrs: Vec<SocketAddr> = cluster.pods().iter().filter_map(|p| p.addr).collect();
    deployments
        .patch_scale(APP, &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 0}})))
        .await
        .expect("patch scale to 0");
    until("both pods terminating in the watcher", Duration::from_secs(5), || {
        watched.store().values().filter(|p| p.metadata.deletion_timestamp.is_some()).count() == 2
    })
    .await;
    until("both pods deleted", Duration::from_secs(10), || watched.store().is_empty() && cluster.pods().is_empty())
        .await;
    assert_eq!(watched.with(|w| w.events.iter().filter(|(_, s)| matches!(s, Seen::Delete(_))).count()), 2);
    for addr in addrs {
        assert!(refuses_connections(addr).await, "{addr} stopped with its pod");
    }

    // What the client asked for: the verbs an RBAC Role must grant.
    let verbs = cluster.verbs();
    for (verb, resource) in [
        ("list", "pods"),
        ("watch", "pods"),
        ("get", "deployments"),
        ("get", "deployments/scale"),
        ("patch", "deployments/scale"),
    ] {
        assert!(verbs.contains(&(verb.to_string(), resource.to_string())), "{verb} {resource} missing: {verbs:?}");
    }
    let scale_patches = cluster.requests_of("patch", "deployments/scale");
    assert_eq!(scale_patches.len(), 2);
    assert_eq!(scale_patches[0].content_type.as_deref(), Some("application/merge-patch+json"));
    assert!(cluster.first_request_at("patch", "deployments/scale").is_some());
    let watch = &cluster.requests_of("watch", "pods")[0];
    eprintln!("kube watcher's watch query: {}", watch.query);
    eprintln!("kube watcher's list query: {}", cluster.requests_of("list", "pods")[1].query);
    assert_eq!(watch.param("allowWatchBookmarks").as_deref(), Some("true"));
    assert_eq!(watch.param("labelSelector").as_deref(), Some(SELECTOR));
    assert!(watch.param("resourceVersion").is_some_and(|rv| rv.parse::<u64>().is_ok()));
    assert!(watch.param("timeoutSeconds").is_some());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_relists_after_410_and_resumes_after_a_cut() {
    let cluster = FakeCluster::start(fast(2)).await;
    cluster
        .wait_for("two ready pods", Duration::from_secs(10), |c| {
            let pods = c.pods();
            pods.len() == 2 && pods.iter().all(|p| p.ready)
        })
        .await;
    let client = client(&cluster).await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let old_rv = pods.list(&ListParams::default()).await.expect("list").metadata.resource_version.expect("rv");

    let watched = PodWatcher::start(client.clone());
    until("InitDone with both pods", Duration::from_secs(5), || {
        watched.with(|w| w.count(&Seen::InitDone) == 1 && w.store.len() == 2)
    })
    .await;
    cluster.wait_for("the watch open", Duration::from_secs(5), |c| c.open_watches() == 1).await;
    let before: Vec<String> = watched.store().into_keys().collect();
    let lists = cluster.requests_of("list", "pods").len();

    // 410: the watcher gets the ERROR event, re-lists, and keeps both pods.
    cluster.expire_watches();
    until("a second InitDone", Duration::from_secs(5), || watched.with(|w| w.count(&Seen::InitDone) == 2)).await;
    watched.with(|w| {
        let error = w.events.iter().position(|(_, s)| *s == Seen::Error(Some(410))).expect("a 410 error event");
        let init = w.events.iter().rposition(|(_, s)| *s == Seen::Init).expect("a second Init");
        assert!(error < init, "the 410 comes before the re-list: {:?}", w.events);
        let applied: Vec<&Seen> = w.events[init..].iter().map(|(_, s)| s).collect();
        assert_eq!(applied.iter().filter(|s| matches!(s, Seen::InitApply(_))).count(), 2, "{applied:?}");
        assert_eq!(w.store.keys().cloned().collect::<Vec<_>>(), before, "no pod lost or duplicated");
    });
    assert_eq!(cluster.requests_of("list", "pods").len(), lists + 1, "exactly one re-list");

    // A watch from the old resourceVersion: an ERROR event with a 410 Status, as the API server sends.
    let mut stream = pods.watch(&WatchParams::default(), &old_rv).await.expect("watch from an old rv").boxed();
    match tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("an event") {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    drop(stream);

    // A cut connection: the watcher resumes from its resourceVersion, no re-list.
    cluster.wait_for("the watch re-opened", Duration::from_secs(5), |c| c.open_watches() == 1).await;
    let watches = cluster.requests_of("watch", "pods").len();
    let lists = cluster.requests_of("list", "pods").len();
    cluster.cut_watches();
    cluster
        .wait_for("a new watch after the cut", Duration::from_secs(10), |c| {
            c.requests_of("watch", "pods").len() > watches && c.open_watches() == 1
        })
        .await;
    assert_eq!(cluster.requests_of("list", "pods").len(), lists, "a cut watch resumes without a re-list");
    let resumed = cluster.requests_of("watch", "pods").pop().expect("the resumed watch");
    assert!(resumed.param("resourceVersion").is_some_and(|rv| rv != "0"), "resumed from its rv: {}", resumed.query);

    cluster.set_replicas(3);
    until("the third pod, ready, through the resumed watch", Duration::from_secs(10), || {
        let store = watched.store();
        store.len() == 3 && store.values().all(is_ready)
    })
    .await;
    let names: Vec<String> = cluster.pods().into_iter().map(|p| p.name).collect();
    assert_eq!(watched.store().into_keys().collect::<Vec<_>>(), {
        let mut n = names.clone();
        n.sort();
        n
    });
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_patch_and_deletion_cost_choose_the_pod_scaled_down() {
    let cluster = FakeCluster::start(fast(2)).await;
    cluster
        .wait_for("two ready pods", Duration::from_secs(10), |c| {
            let pods = c.pods();
            pods.len() == 2 && pods.iter().all(|p| p.ready)
        })
        .await;
    let client = client(&cluster).await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    let (older, newer) = {
        let p = cluster.pods();
        (p[0].name.clone(), p[1].name.clone())
    };
    let rv = pods.list(&ListParams::default()).await.expect("list").metadata.resource_version.expect("rv");
    let mut events = pods.watch(&WatchParams::default(), &rv).await.expect("watch").boxed();

    // Left alone the ReplicaSet would delete the newer pod; a lower cost on the older one picks it instead.
    let patch = json!({"metadata": {"annotations": {DELETION_COST: "-100"}}});
    let patched = pods.patch(&older, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch pod");
    assert_eq!(patched.metadata.annotations.expect("annotations")[DELETION_COST], "-100");
    assert_eq!(cluster.pod(&older).expect("pod").annotations[DELETION_COST], "-100");
    let modified = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = events.next().await {
            if let Ok(WatchEvent::Modified(pod)) = event {
                return pod;
            }
        }
        panic!("watch ended");
    })
    .await
    .expect("a MODIFIED event");
    assert_eq!(name(&modified), older);
    assert_eq!(modified.metadata.annotations.expect("annotations")[DELETION_COST], "-100");

    // A patch carrying a stale resourceVersion is refused.
    let stale = json!({"metadata": {"resourceVersion": rv, "labels": {"x": "y"}}});
    let err = pods.patch(&older, &PatchParams::default(), &Patch::Merge(&stale)).await.expect_err("stale patch");
    assert_eq!(api_code(&err), Some(409));
    // A strategic merge patch is taken as a merge patch.
    let patch = json!({"metadata": {"labels": {"drained": "true"}}});
    pods.patch(&newer, &PatchParams::default(), &Patch::Strategic(&patch)).await.expect("strategic patch");
    assert_eq!(cluster.pod(&newer).expect("pod").labels["drained"], "true");

    deployments
        .patch_scale(APP, &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 1}})))
        .await
        .expect("scale to 1");
    cluster
        .wait_for("the older pod terminating", Duration::from_secs(5), |c| c.pod(&older).is_some_and(|p| p.terminating))
        .await;
    assert!(!cluster.pod(&newer).expect("newer").terminating, "the pod with the higher cost stays");
    cluster.wait_for("the older pod deleted", Duration::from_secs(5), |c| c.pods().len() == 1).await;
    assert_eq!(cluster.pods()[0].name, newer);
    assert!(matches!(pods.get(&older).await, Err(ref e) if api_code(e) == Some(404)));
    assert!(cluster.verbs().contains(&("patch".to_string(), "pods".to_string())));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_create_get_replace_with_optimistic_concurrency() {
    let cluster = FakeCluster::start(fast(0)).await;
    let client = client(&cluster).await;
    let leases: Api<Lease> = Api::default_namespaced(client);
    let err = leases.get("sdgate").await.expect_err("no lease yet");
    assert_eq!(api_code(&err), Some(404));
    assert!(leases.get_opt("sdgate").await.expect("get_opt").is_none());

    let lease = |holder: &str| Lease {
        metadata: ObjectMeta { name: Some("sdgate".into()), ..Default::default() },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(10),
            ..Default::default()
        }),
    };
    let created = leases.create(&PostParams::default(), &lease("a")).await.expect("create");
    assert!(created.metadata.resource_version.is_some());
    let err = leases.create(&PostParams::default(), &lease("b")).await.expect_err("create twice");
    assert_eq!(api_code(&err), Some(409));

    let got = leases.get("sdgate").await.expect("get");
    assert_eq!(got.spec.as_ref().and_then(|s| s.holder_identity.as_deref()), Some("a"));
    let mut next = got.clone();
    next.spec.as_mut().expect("spec").holder_identity = Some("b".into());
    let replaced = leases.replace("sdgate", &PostParams::default(), &next).await.expect("replace");
    assert_ne!(replaced.metadata.resource_version, got.metadata.resource_version);
    // The same stale object again: someone else wrote in between.
    let err = leases.replace("sdgate", &PostParams::default(), &next).await.expect_err("stale replace");
    assert_eq!(api_code(&err), Some(409));
    let stored = cluster.lease("sdgate").expect("lease");
    assert_eq!(stored.spec.expect("spec").holder_identity.as_deref(), Some("b"));

    // Another replica takes it behind our back.
    cluster.set_lease("sdgate", Some("other"), Some(k8s_openapi::jiff::Timestamp::now()), 10);
    let err = leases.replace("sdgate", &PostParams::default(), &replaced).await.expect_err("stale after set_lease");
    assert_eq!(api_code(&err), Some(409));
    let got = leases.get("sdgate").await.expect("get");
    assert_eq!(got.spec.as_ref().and_then(|s| s.holder_identity.as_deref()), Some("other"));
    assert!(got.spec.as_ref().and_then(|s| s.renew_time.as_ref()).is_some());

    let verbs = cluster.verbs();
    for verb in ["get", "create", "update"] {
        assert!(verbs.contains(&(verb.to_string(), "leases".to_string())), "{verb} leases: {verbs:?}");
    }
    assert_eq!(cluster.requests_of("update", "leases").iter().filter(|r| r.status == 409).count(), 2);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_port_opens_before_the_kubelet_marks_it_ready() {
    let cluster = FakeCluster::start(ClusterOptions {
        startup_delay: Duration::from_millis(500),
        kubelet_ready_delay: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let client = client(&cluster).await;
    let deployments: Api<Deployment> = Api::default_namespaced(client.clone());
    let watched = PodWatcher::start(client.clone());
    until("the watcher's InitDone", Duration::from_secs(5), || watched.with(|w| w.count(&Seen::InitDone) == 1)).await;
    deployments
        .patch_scale(APP, &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 1}})))
        .await
        .expect("scale to 1");

    // The pod's IP is known (from the watch) before its port opens.
    until("the pod's IP in the watcher", Duration::from_secs(5), || {
        watched.store().values().any(|p| pod_ip(p).is_some())
    })
    .await;
    let ip = watched.store().values().find_map(pod_ip).expect("ip");
    let addr: SocketAddr = format!("{ip}:{}", cluster.pod_port()).parse().expect("addr");
    assert!(refuses_connections(addr).await, "the port is not open yet (the model loads)");
    let deadline = Instant::now() + Duration::from_secs(5);
    while refuses_connections(addr).await {
        assert!(Instant::now() < deadline, "the port never opened");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let opened = Instant::now();
    assert!(!watched.store().values().any(is_ready), "Ready already, when the port just opened");
    assert_eq!(generate(addr, 2).await.0, 200, "the pod serves before it is Ready");

    until("Ready in the watcher", Duration::from_secs(5), || watched.store().values().any(is_ready)).await;
    let ready = Instant::now();
    assert!(ready - opened >= Duration::from_millis(800), "Ready {:?} after the port opened", ready - opened);
    let info = &cluster.pods()[0];
    assert!(info.port_open_at.expect("opened") < info.ready_at.expect("ready"));
    let stats = info.stats.clone().expect("stats");
    assert_eq!(stats.served, 1);
    assert!(stats.jobs[0].arrived_us >= info.port_open_us.expect("opened"), "one clock for jobs and the port");

    // The EndpointSlice follows: the endpoint, ready, pointing at the pod.
    let slices: Api<EndpointSlice> = Api::default_namespaced(client.clone());
    let list = slices.list(&ListParams::default().labels(&format!("kubernetes.io/service-name={APP}"))).await;
    let slice = list.expect("list endpointslices").items.pop().expect("one slice");
    let endpoint = &slice.endpoints[0];
    assert_eq!(endpoint.addresses, vec![ip.clone()]);
    assert_eq!(endpoint.target_ref.as_ref().and_then(|r| r.name.clone()), Some(info.name.clone()));
    let conditions = endpoint.conditions.clone().expect("conditions");
    assert_eq!((conditions.ready, conditions.serving, conditions.terminating), (Some(true), Some(true), Some(false)));
    assert_eq!(slice.ports.expect("ports")[0].port, Some(i32::from(cluster.pod_port())));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pod_finishes_in_flight_work_and_is_replaced() {
    let cluster = FakeCluster::start(ClusterOptions { termination_grace: Duration::from_secs(1), ..fast(1) }).await;
    cluster.wait_for("a ready pod", Duration::from_secs(10), |c| c.pods().first().is_some_and(|p| p.ready)).await;
    let client = client(&cluster).await;
    let slices: Api<EndpointSlice> = Api::default_namespaced(client.clone());
    let pod = cluster.pods().remove(0);
    let addr = pod.addr.expect("addr");

    // A slice watch from now sees the endpoint turn terminating.
    let rv = slices.list(&ListParams::default()).await.expect("list").metadata.resource_version.expect("rv");
    let mut slice_events = slices
        .watch(&WatchParams::default().labels(&format!("kubernetes.io/service-name={APP}")), &rv)
        .await
        .expect("watch")
        .boxed();

    let in_flight = tokio::spawn(generate(addr, 50)); // 500 ms
    cluster
        .wait_for("the generation inside the worker", Duration::from_secs(5), |c| {
            c.pod(&pod.name).and_then(|p| p.stats).is_some_and(|s| s.inflight == 1)
        })
        .await;
    assert!(cluster.delete_pod(&pod.name));
    let info = cluster.pod(&pod.name).expect("still there");
    assert!(info.terminating && info.worker_alive);
    // SIGTERM: the worker stops accepting (a few ms later: it is another thread).
    let deadline = Instant::now() + Duration::from_secs(2);
    while !refuses_connections(addr).await {
        assert!(Instant::now() < deadline, "a terminating worker still takes new connections");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    let terminating = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(event)) = slice_events.next().await {
            if let WatchEvent::Modified(slice) = event {
                let endpoint = slice.endpoints.iter().find(|e| e.addresses == vec![addr.ip().to_string()]).cloned();
                if let Some(c) = endpoint.and_then(|e| e.conditions).filter(|c| c.terminating == Some(true)) {
                    return c;
                }
            }
        }
        panic!("slice watch ended");
    })
    .await
    .expect("a terminating endpoint");
    assert_eq!(terminating.ready, Some(false));

    let (status, worker) = in_flight.await.expect("join");
    assert_eq!((status, worker.as_str()), (200, pod.name.as_str()), "the in-flight generation finishes");
    cluster
        .wait_for("a ready replacement", Duration::from_secs(10), |c| {
            c.pods().iter().any(|p| p.name != pod.name && p.ready && !p.terminating)
        })
        .await;
    cluster.wait_for("the old pod deleted", Duration::from_secs(5), |c| c.pods().len() == 1).await;
    let gone = cluster.pod(&pod.name).expect("in all_pods");
    assert!(gone.deleted && !gone.worker_alive);
    let replacement = cluster.pods().remove(0);
    assert_ne!(replacement.ip, gone.ip, "pod IPs are never reused within a cluster");
    for stats in cluster.worker_stats() {
        assert_eq!(stats.overlaps, 0);
        assert!(stats.max_inflight <= 1);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_killed_workers_and_unknown_paths() {
    let cluster = FakeCluster::start(ClusterOptions { bookmark_interval: Duration::from_millis(200), ..fast(1) }).await;
    cluster.wait_for("a ready pod", Duration::from_secs(10), |c| c.pods().first().is_some_and(|p| p.ready)).await;
    let client = client(&cluster).await;
    let pods: Api<Pod> = Api::default_namespaced(client.clone());

    // Bookmarks come on a quiet watch that asked for them.
    let rv = pods.list(&ListParams::default()).await.expect("list").metadata.resource_version.expect("rv");
    let mut events = pods.watch(&WatchParams::default(), &rv).await.expect("watch").boxed();
    match tokio::time::timeout(Duration::from_secs(3), events.next()).await.expect("a bookmark in time") {
        Some(Ok(WatchEvent::Bookmark(bookmark))) => assert!(bookmark.metadata.resource_version.parse::<u64>().is_ok()),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    // timeoutSeconds ends a watch cleanly.
    let mut short = pods.watch(&WatchParams::default().timeout(1), &rv).await.expect("watch").boxed();
    let ended = tokio::time::timeout(Duration::from_secs(3), async { while short.next().await.is_some() {} }).await;
    assert!(ended.is_ok(), "a watch with timeoutSeconds=1 ends");

    // A killed worker: the port is gone at once, the API still shows the pod.
    let pod = cluster.pods().remove(0);
    assert!(cluster.kill_pod_worker(&pod.name));
    assert!(refuses_connections(pod.addr.expect("addr")).await);
    assert!(pods.get(&pod.name).await.is_ok());
    assert!(!cluster.pod(&pod.name).expect("pod").worker_alive);

    // Anything else: a 404 Status.
    let http: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let request = http::Request::get(format!("{}/api/v1/namespaces/default/services", cluster.url()))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = http.request(request).await.expect("answer");
    assert_eq!(response.status().as_u16(), 404);
    let body = response.into_body().collect().await.expect("body").to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!((status["kind"].as_str(), status["code"].as_i64()), (Some("Status"), Some(404)));
    cluster.shutdown().await;
}
