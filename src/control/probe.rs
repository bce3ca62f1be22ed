//! Readiness probing of endpoints.
//!
//! A not-ready endpoint is probed every `readiness.period` (50 ms by default,
//! like Knative's queue-proxy) so a cold start ends as soon as the pod can
//! answer; a ready one at the slower `ready_period`, and taken out of rotation
//! after `failure_threshold` failures in a row. A pod that refuses a
//! connection at dispatch is marked not ready at once by the forwarder; the
//! probe then brings it back.
//!
//! A prober made with [`Prober::report_refusals`] also tells requests that
//! time out waiting why, when no endpoint is ready and every one it probes
//! refuses connections: `no pod accepts connections: 127.0.0.1:7860
//! refused` (through [`Endpoints::report_error`]). It is for backends whose
//! provider has nothing better to say (a fixed list); a process backend's
//! own message ("worker 0 exited ...") is more useful than its refusals.
//!
//! Endpoints at the same address probed the same way (many services in
//! front of one pod) share their probes: a probe's answer serves every such
//! endpoint due within half its period, and those due at once wait for one
//! probe instead of each sending their own. Each endpoint still keeps its own
//! readiness, failure count and period, so the probes a pod gets grow with
//! the pods, not with the services in front of them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::Readiness;
use crate::control::provider::Endpoints;
use crate::error::lock;
use crate::gate::EndpointId;
use crate::pod::{connect_error, Activity, Pool, Reply};

/// How a probe checks a pod.
#[derive(Clone)]
pub struct Prober {
    readiness: Readiness,
    /// The headers of an HTTP probe (`readiness.host`, `readiness.headers`);
    /// a Host not given here is the pod's `ip:port` (see `Pool::send`).
    headers: Arc<http::HeaderMap>,
    /// Set by [`Prober::report_refusals`]; shared by the probes of one provider.
    refusals: Option<Arc<Mutex<Refusals>>>,
}

/// What the probes of one provider last saw, to name refusing pods.
#[derive(Default)]
struct Refusals {
    /// Each probed endpoint: why it refused its last connection, or `None`
    /// when it accepted one.
    probed: BTreeMap<SocketAddr, Option<String>>,
    /// The message last reported (cleared once it no longer holds).
    reported: Option<String>,
}

impl Refusals {
    /// "no pod accepts connections: ..." when every probed endpoint refuses.
    fn message(&self) -> Option<String> {
        if self.probed.is_empty() || self.probed.values().any(Option::is_none) {
            return None;
        }
        let each: Vec<String> =
            self.probed.iter().map(|(addr, why)| format!("{addr} {}", why.as_deref().unwrap_or(""))).collect();
        Some(format!("no pod accepts connections: {}", each.join("; ")))
    }
}

/// Why a probe failed.
#[derive(Clone)]
enum Failure {
    /// The connection itself failed ("refused", "connect timed out", ...).
    Connect(String),
    /// It answered, but not 2xx: what it said ("GET /internal/ping -> 400
    /// Invalid HTTP request received.").
    Answer(String),
    /// It connected but gave no usable answer in time.
    Silent(String),
}

impl Failure {
    fn describe(&self) -> &str {
        match self {
            Failure::Connect(why) | Failure::Answer(why) | Failure::Silent(why) => why,
        }
    }
}

/// A summary line of a failing probe is written at most once per period.
const LOG_PERIOD: Duration = Duration::from_secs(5);
/// Requests waiting this long with no pod ready make the summary a warning.
const WAIT_WARNING: Duration = Duration::from_secs(10);
/// The most of a refusing answer's body quoted in its reason.
const REASON_BODY_CHARS: usize = 80;

impl Prober {
    pub fn new(readiness: Readiness) -> Self {
        let headers = Arc::new(readiness.header_map());
        Self { readiness, headers, refusals: None }
    }

    /// Reports, when no endpoint is ready and all refuse connections, which
    /// ones and why (see the module doc).
    pub fn report_refusals(mut self) -> Self {
        self.refusals = Some(Arc::default());
        self
    }

    /// Probes `endpoint` until the task is aborted (the endpoint was removed).
    pub fn spawn(&self, endpoints: Endpoints, endpoint: EndpointId, addr: SocketAddr) -> JoinHandle<()> {
        let prober = self.clone();
        tokio::spawn(async move { prober.run(endpoints, endpoint, addr).await })
    }

    async fn run(self, gate: Endpoints, endpoint: EndpointId, addr: SocketAddr) {
        let _forget = self.refusals.clone().map(|refusals| Forget { refusals, addr, gate: gate.clone() });
        let shared = SharedProbe::of(self.key(addr));
        let mut failures = 0u32;
        let mut logged: Option<Instant> = None;
        loop {
            let Some(ready) = gate.is_ready(endpoint) else { return };
            let fresh_for = if ready { self.readiness.ready_period } else { self.readiness.period } / 2;
            let (taken, probed) = self.probe_shared(&shared, addr, fresh_for).await;
            self.record(&gate, addr, &probed);
            let note = gate.note_probe(endpoint, probed.as_ref().err().map(Failure::describe));
            let answered = matches!(probed, Err(Failure::Answer(_)));
            tell_failing(&gate, addr, &note, answered, &mut logged);
            let ok = probed.is_ok();
            if ok {
                failures = 0;
                if !ready
                    && self.idle_before_first_use(&gate, endpoint, addr).await
                    && self.learn_checkpoint(&gate, endpoint, addr).await
                    && gate.set_ready(endpoint, true)
                {
                    tracing::info!(%addr, "endpoint ready");
                }
            } else {
                failures += 1;
                if ready && failures >= self.readiness.failure_threshold && gate.set_ready(endpoint, false) {
                    tracing::warn!(%addr, failures, "endpoint not ready");
                }
            }
            let now_ready = ok || (ready && failures < self.readiness.failure_threshold);
            let period = if now_ready { self.readiness.ready_period } else { self.readiness.period };
            // From when the answer was taken: endpoints sharing it stay in
            // step, and next time one probe serves them all again.
            tokio::time::sleep_until(taken + period).await;
        }
    }

    /// The shared probe's last answer if it is younger than `fresh_for`,
    /// else a new probe (which others due now wait for); with when it was
    /// taken.
    async fn probe_shared(
        &self,
        shared: &SharedProbe,
        addr: SocketAddr,
        fresh_for: Duration,
    ) -> (Instant, Result<(), Failure>) {
        let mut last = shared.last.lock().await;
        if let Some((taken, probed)) = last.as_ref().filter(|(taken, _)| taken.elapsed() < fresh_for) {
            return (*taken, probed.clone());
        }
        let probed = self.probe_with(addr).await;
        let taken = Instant::now();
        *last = Some((taken, probed.clone()));
        (taken, probed)
    }

    /// A pod sdgate has never used may be busy with someone else's job (a
    /// replica that just lost its lease, an sdgate restarted with requests
    /// in flight): before its first request it must pass the idle check too.
    async fn idle_before_first_use(&self, gate: &Endpoints, endpoint: EndpointId, addr: SocketAddr) -> bool {
        if gate.ever_served(endpoint) {
            return true;
        }
        let Some(path) = gate.idle_check_path() else { return true };
        match Pool::shared().idle_state(addr, &path, Some(&self.headers)).await {
            Activity::Idle => true,
            Activity::Busy => {
                tracing::info!(%addr, "endpoint answers but is busy with a job sdgate did not send: waiting until it is idle");
                false
            }
            Activity::Unreadable(what) => {
                // Not shut out for good: a pod that does not speak the
                // WebUI's progress API would never get ready.
                tracing::warn!(%addr, "idle check cannot be read ({what}): taking the pod as idle; set idle_check.path (or idle_check: null) for this pod's server");
                true
            }
        }
    }

    /// Each time a pod becomes ready (a first time, or again: it may have
    /// restarted), what checkpoint it holds: its options'
    /// `sd_model_checkpoint` (what the WebUI loads at start). A pod that
    /// does not answer it (not the WebUI, an older API) is taken as it is.
    /// Always true: it only learns.
    async fn learn_checkpoint(&self, gate: &Endpoints, endpoint: EndpointId, addr: SocketAddr) -> bool {
        let Some(path) = gate.checkpoint_options_path() else { return true };
        let reply = Pool::shared()
            .call(
                addr,
                http::Method::GET,
                &path,
                Some(&self.headers),
                None,
                OPTIONS_ANSWER_LIMIT,
                self.readiness.timeout,
            )
            .await;
        if let Reply::Answer(status, body) = reply {
            let setting = serde_json::from_slice::<serde_json::Value>(&body).ok().filter(|_| status.is_success());
            if let Some(name) = setting.as_ref().and_then(|o| o.get("sd_model_checkpoint")).and_then(|v| v.as_str()) {
                tracing::info!(%addr, checkpoint = name, "endpoint holds its checkpoint setting");
                gate.set_checkpoint(endpoint, name);
            }
        }
        true
    }

    /// One probe: TCP connect, or HTTP GET expecting 2xx, within the timeout.
    pub async fn check(&self, addr: SocketAddr) -> bool {
        self.probe_with(addr).await.is_ok()
    }

    fn key(&self, addr: SocketAddr) -> ProbeKey {
        let host = self.readiness.host.iter().map(|host| ("host".to_string(), host.clone()));
        let headers = host.chain(self.readiness.headers.clone()).collect();
        ProbeKey { addr, http: self.readiness.http.clone(), headers, timeout: self.readiness.timeout }
    }

    /// One probe on the pod client's shared connections (an HTTP probe) or
    /// a connection of its own (a TCP probe: the connect is the probe).
    async fn probe_with(&self, addr: SocketAddr) -> Result<(), Failure> {
        let timeout = self.readiness.timeout;
        let attempt = async {
            match &self.readiness.http {
                None => {
                    TcpStream::connect(addr).await.map(drop).map_err(|error| Failure::Connect(connect_error(&error)))
                }
                Some(path) => {
                    let headers = Some(&*self.headers);
                    match Pool::shared()
                        .call(addr, http::Method::GET, path, headers, None, PROBE_ANSWER_LIMIT, timeout)
                        .await
                    {
                        Reply::Answer(status, _) | Reply::Oversized(status) if status.is_success() => Ok(()),
                        Reply::Refused(why) => Err(Failure::Connect(why)),
                        Reply::Answer(status, body) => {
                            Err(Failure::Answer(format!("GET {path} -> {}", answer_text(status, &body))))
                        }
                        Reply::Oversized(status) => Err(Failure::Answer(format!("GET {path} -> {}", status.as_u16()))),
                        Reply::Nothing => Err(Failure::Silent(format!("GET {path} -> no answer within {timeout:?}"))),
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            // No answer in time: the port may be open (a busy pod) or not.
            Err(_) => Err(Failure::Silent(format!("no answer within {timeout:?}"))),
        }
    }

    /// Keeps the refusals up to date, and reports or clears their message.
    fn record(&self, gate: &Endpoints, addr: SocketAddr, probed: &Result<(), Failure>) {
        let Some(refusals) = &self.refusals else { return };
        let mut refusals = lock(refusals);
        let refused = match probed {
            Err(Failure::Connect(why)) => Some(why.clone()),
            _ => None,
        };
        refusals.probed.insert(addr, refused);
        update_report(&mut refusals, gate);
    }
}

/// An answer as a reason: its status and the start of its body on one line
/// ("400 Invalid HTTP request received.").
fn answer_text(status: http::StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(4 * REASON_BODY_CHARS)]);
    let mut quoted: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(REASON_BODY_CHARS)
        .collect::<String>()
        .trim()
        .to_string();
    if text.chars().count() > REASON_BODY_CHARS {
        quoted.push_str("...");
    }
    match quoted.is_empty() {
        true => status.as_u16().to_string(),
        false => format!("{} {quoted}", status.as_u16()),
    }
}

/// Logs a failing probe: its first failure at once, then one summary per
/// [`LOG_PERIOD`] while it goes on ("127.0.0.1:7860 not ready: GET
/// /internal/ping -> 400 Invalid HTTP request received. (280 times in
/// 7 s)"). An answer that is not 2xx (the server is up and says no) is a
/// warning, and so is any failure while requests have waited
/// [`WAIT_WARNING`] with no pod ready; a pod still refusing connections
/// while it starts is information.
fn tell_failing(
    gate: &Endpoints,
    addr: SocketAddr,
    note: &crate::gate::ProbeNote,
    answered: bool,
    logged: &mut Option<Instant>,
) {
    let Some(failure) = &note.failure else {
        *logged = None;
        return;
    };
    let now = note.at;
    // At most one line per period, even when each answer differs (a body
    // with a timestamp): the first failure after a pass is logged at once.
    if logged.is_some_and(|at| now.saturating_duration_since(at) < LOG_PERIOD) {
        return;
    }
    *logged = Some(now);
    let span = humantime::format_duration(Duration::from_secs(now.saturating_duration_since(note.since).as_secs()));
    let times = note.times;
    let waiting = gate.oldest_wait().filter(|wait| *wait >= WAIT_WARNING && !gate.any_ready());
    match waiting {
        Some(wait) => {
            let wait = humantime::format_duration(Duration::from_secs(wait.as_secs()));
            tracing::warn!(%addr, times, "{addr} not ready: {failure} ({times} times in {span}); requests have waited {wait} with no pod ready")
        }
        None if answered => tracing::warn!(%addr, times, "{addr} not ready: {failure} ({times} times in {span})"),
        None => tracing::info!(%addr, times, "{addr} not ready: {failure} ({times} times in {span})"),
    }
}

/// What makes two endpoints' probes the same probe.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ProbeKey {
    addr: SocketAddr,
    /// The HTTP path, or `None` for a TCP connect.
    http: Option<String>,
    /// The HTTP probe's headers, as written in the config.
    headers: Vec<(String, String)>,
    timeout: Duration,
}

/// The most of a probe's answer that is read (a readiness page is small; a
/// larger one is read no further: its status alone decides).
const PROBE_ANSWER_LIMIT: usize = 256 * 1024;
/// The most of a pod's options sdgate reads (the WebUI's are tens of KiB).
const OPTIONS_ANSWER_LIMIT: usize = 1024 * 1024;

/// The probes of one [`ProbeKey`], shared by every endpoint it describes.
struct SharedProbe {
    /// The last answer and when it was taken; held for the length of a
    /// probe, so that endpoints due together send one.
    last: tokio::sync::Mutex<Option<(Instant, Result<(), Failure>)>>,
}

/// Every [`SharedProbe`] in use, by key; an entry lives as long as a probe
/// task holds it.
#[derive(Default)]
struct SharedProbes {
    by_key: HashMap<ProbeKey, Weak<SharedProbe>>,
    /// Entries whose probes all ended are swept when the map reaches this.
    sweep_at: usize,
}

impl SharedProbe {
    fn of(key: ProbeKey) -> Arc<SharedProbe> {
        static ALL: OnceLock<Mutex<SharedProbes>> = OnceLock::new();
        let mut all = lock(ALL.get_or_init(Mutex::default));
        if let Some(shared) = all.by_key.get(&key).and_then(Weak::upgrade) {
            return shared;
        }
        if all.by_key.len() >= all.sweep_at {
            all.by_key.retain(|_, shared| shared.strong_count() > 0);
            all.sweep_at = (2 * all.by_key.len()).max(64);
        }
        let shared = Arc::new(SharedProbe { last: tokio::sync::Mutex::new(None) });
        all.by_key.insert(key, Arc::downgrade(&shared));
        shared
    }
}

/// Reports the refusals' message while no endpoint is ready; clears it
/// once it no longer holds.
fn update_report(refusals: &mut Refusals, gate: &Endpoints) {
    let message = refusals.message().filter(|_| !gate.any_ready());
    if message != refusals.reported {
        if message.is_some() || refusals.reported.is_some() {
            gate.report_error(message.clone());
        }
        refusals.reported = message;
    }
}

/// Takes an endpoint out of the refusals when its probe ends.
struct Forget {
    refusals: Arc<Mutex<Refusals>>,
    addr: SocketAddr,
    gate: Endpoints,
}

impl Drop for Forget {
    fn drop(&mut self) {
        let mut refusals = lock(&self.refusals);
        refusals.probed.remove(&self.addr);
        update_report(&mut refusals, &self.gate);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::ProxyError;
    use crate::gate::SharedGate;
    use bytes::Bytes;
    use http_body_util::Empty;

    /// A port on 127.0.0.1 that nothing listens on.
    fn closed_port() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind")
    }

    async fn cause_of_timeout(gate: &Arc<SharedGate>) -> Option<String> {
        match gate.acquire(gate.arrive(), Duration::from_millis(300)).await {
            Err(ProxyError::QueueTimeout { cause, .. }) => cause,
            other => panic!("expected a queue timeout, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn a_service_whose_pods_all_refuse_says_so_and_stops_once_one_accepts() {
        for http in [None, Some("/internal/ping".to_string())] {
            let gate = SharedGate::new(1, 10, Arc::new(crate::gate::Unobserved));
            let endpoints = Endpoints::new(gate.clone());
            let readiness = Readiness { http: http.clone(), period: Duration::from_millis(10), ..Readiness::default() };
            let prober = Prober::new(readiness).report_refusals();
            let (a, b) = (closed_port(), closed_port());
            let probes: Vec<_> =
                [a, b].iter().map(|addr| prober.spawn(endpoints.clone(), endpoints.add(*addr), *addr)).collect();
            let cause = cause_of_timeout(&gate).await.expect("a cause");
            let (first, second) = if a < b { (a, b) } else { (b, a) };
            assert_eq!(cause, format!("no pod accepts connections: {first} refused; {second} refused"), "{http:?}");
            // One pod accepts connections (but is not ready: 404): not every pod refuses any more.
            let listener = tokio::net::TcpListener::bind(a).await.expect("rebind");
            let accept = tokio::spawn(async move {
                loop {
                    let Ok((mut stream, _)) = listener.accept().await else { return };
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
                }
            });
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                // The TCP probe takes the pod as ready; the HTTP one does not, and the message goes.
                match gate.acquire(gate.arrive(), Duration::from_millis(50)).await {
                    Ok(_) => break,
                    Err(ProxyError::QueueTimeout { cause: None, .. }) => break,
                    Err(_) => assert!(tokio::time::Instant::now() < deadline, "the refusal message stayed"),
                }
            }
            accept.abort();
            for probe in probes {
                probe.abort();
            }
        }
    }

    /// A pod answering 200 to every request, counting them; aborting the
    /// task closes its listener and connections.
    async fn counting_pod() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>, JoinHandle<()>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let counted = counted.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |_request| {
                        counted.fetch_add(1, Ordering::SeqCst);
                        async { Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new())) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        (addr, hits, task)
    }

    #[tokio::test]
    async fn services_in_front_of_one_pod_share_its_probes_and_each_keeps_its_readiness() {
        let (addr, hits, pod) = counting_pod().await;
        let readiness = Readiness {
            http: Some("/internal/ping".to_string()),
            period: Duration::from_millis(10),
            ready_period: Duration::from_millis(100),
            failure_threshold: 2,
            ..Readiness::default()
        };
        let gates: Vec<_> = (0..20).map(|_| SharedGate::new(1, 10, Arc::new(crate::gate::Unobserved))).collect();
        let probes: Vec<_> = gates
            .iter()
            .map(|gate| {
                let endpoints = Endpoints::new(gate.clone());
                let id = endpoints.add(addr);
                Prober::new(readiness.clone()).spawn(endpoints, id, addr)
            })
            .collect();
        let all_ready = |ready: usize| gates.iter().all(|g| g.inspect(|g| g.ready_count()) == ready);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !all_ready(1) {
            assert!(tokio::time::Instant::now() < deadline, "every service's endpoint becomes ready");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = hits.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let probed = hits.load(std::sync::atomic::Ordering::SeqCst) - before;
        // Each alone would probe every 100 ms (200 probes); shared, an answer
        // serves every endpoint due within 50 ms of it.
        assert!((1..=25).contains(&probed), "{probed} probes in 1 s for 20 endpoints at one address");
        pod.abort();
        while !all_ready(0) {
            assert!(tokio::time::Instant::now() < deadline + Duration::from_secs(5), "each endpoint sees the pod go");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for probe in probes {
            probe.abort();
        }
    }

    #[tokio::test]
    async fn without_report_refusals_nothing_is_reported() {
        let gate = SharedGate::new(1, 10, Arc::new(crate::gate::Unobserved));
        let endpoints = Endpoints::new(gate.clone());
        let readiness = Readiness { period: Duration::from_millis(10), ..Readiness::default() };
        let addr = closed_port();
        let probe = Prober::new(readiness).spawn(endpoints.clone(), endpoints.add(addr), addr);
        assert_eq!(cause_of_timeout(&gate).await, None);
        probe.abort();
    }
}
