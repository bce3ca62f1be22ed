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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::config::Readiness;
use crate::gate::EndpointId;
use crate::provider::Endpoints;

/// How a probe checks a pod.
#[derive(Clone)]
pub struct Prober {
    readiness: Readiness,
    client: Client<HttpConnector, Empty<Bytes>>,
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
enum Failure {
    /// The connection itself failed ("refused", "connect timed out", ...).
    Connect(String),
    /// It connected but the answer was wrong or late.
    Other,
}

impl Prober {
    pub fn new(readiness: Readiness) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(readiness.timeout));
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1).build(connector);
        Self { readiness, client, refusals: None }
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
        let mut failures = 0u32;
        loop {
            let Some(ready) = gate.is_ready(endpoint) else { return };
            let probed = self.probe(addr).await;
            self.record(&gate, addr, &probed);
            let ok = probed.is_ok();
            if ok {
                failures = 0;
                if !ready && self.idle_before_first_use(&gate, endpoint, addr).await && gate.set_ready(endpoint, true) {
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
            tokio::time::sleep(period).await;
        }
    }

    /// A pod sdgate has never used may be busy with someone else's job (a
    /// replica that just lost its lease, an sdgate restarted with requests
    /// in flight): before its first request it must pass the idle check too.
    async fn idle_before_first_use(&self, gate: &Endpoints, endpoint: EndpointId, addr: SocketAddr) -> bool {
        if gate.ever_served(endpoint) {
            return true;
        }
        let Some(path) = gate.idle_check_path() else { return true };
        let idle = crate::quarantine::is_idle(&self.client, addr, &path).await;
        if !idle {
            tracing::info!(%addr, "endpoint answers but is busy with a job sdgate did not send: waiting until it is idle");
        }
        idle
    }

    /// One probe: TCP connect, or HTTP GET expecting 2xx, within the timeout.
    pub async fn check(&self, addr: SocketAddr) -> bool {
        self.probe(addr).await.is_ok()
    }

    async fn probe(&self, addr: SocketAddr) -> Result<(), Failure> {
        let timeout = self.readiness.timeout;
        let attempt = async {
            match &self.readiness.http {
                None => TcpStream::connect(addr).await.map(drop).map_err(|error| Failure::Connect(why(&error))),
                Some(path) => {
                    let Ok(request) = Request::get(format!("http://{addr}{path}")).body(Empty::new()) else {
                        return Err(Failure::Other);
                    };
                    match self.client.request(request).await {
                        Ok(response) if response.status().is_success() => Ok(()),
                        Ok(_) => Err(Failure::Other),
                        Err(error) if error.is_connect() => Err(Failure::Connect(connect_error(&error))),
                        Err(_) => Err(Failure::Other),
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            // No answer in time: the port may be open (a busy pod) or not.
            Err(_) => Err(Failure::Other),
        }
    }

    /// Keeps the refusals up to date, and reports or clears their message.
    fn record(&self, gate: &Endpoints, addr: SocketAddr, probed: &Result<(), Failure>) {
        let Some(refusals) = &self.refusals else { return };
        let mut refusals = refusals.lock().unwrap_or_else(|e| e.into_inner());
        let refused = match probed {
            Err(Failure::Connect(why)) => Some(why.clone()),
            _ => None,
        };
        refusals.probed.insert(addr, refused);
        update_report(&mut refusals, gate);
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
        let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        refusals.probed.remove(&self.addr);
        update_report(&mut refusals, &self.gate);
    }
}

/// A failed connect in a few words: "refused", "unreachable", or the error.
fn why(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused".to_string(),
        std::io::ErrorKind::TimedOut => "connect timed out".to_string(),
        _ => match error.raw_os_error() {
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH) => "unreachable".to_string(),
            _ => error.to_string(),
        },
    }
}

/// [`why`] for the HTTP client's connect error (an `io::Error` in its sources).
fn connect_error(error: &(dyn std::error::Error + 'static)) -> String {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return why(io);
        }
        source = error.source();
    }
    error.to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::ProxyError;
    use crate::metrics::Metrics;
    use crate::slot::SharedGate;

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
            let gate = SharedGate::new(1, 10, Metrics::new().service("sd"));
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

    #[tokio::test]
    async fn without_report_refusals_nothing_is_reported() {
        let gate = SharedGate::new(1, 10, Metrics::new().service("sd"));
        let endpoints = Endpoints::new(gate.clone());
        let readiness = Readiness { period: Duration::from_millis(10), ..Readiness::default() };
        let addr = closed_port();
        let probe = Prober::new(readiness).spawn(endpoints.clone(), endpoints.add(addr), addr);
        assert_eq!(cause_of_timeout(&gate).await, None);
        probe.abort();
    }
}
