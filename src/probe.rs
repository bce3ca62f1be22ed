//! Readiness probing of endpoints.
//!
//! A not-ready endpoint is probed every `readiness.period` (50 ms by default,
//! like Knative's queue-proxy) so a cold start ends as soon as the pod can
//! answer; a ready one at the slower `ready_period`, and taken out of rotation
//! after `failure_threshold` failures in a row. A pod that refuses a
//! connection at dispatch is marked not ready at once by the forwarder; the
//! probe then brings it back.

use std::net::SocketAddr;

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
}

impl Prober {
    pub fn new(readiness: Readiness) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(readiness.timeout));
        let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1).build(connector);
        Self { readiness, client }
    }

    /// Probes `endpoint` until the task is aborted (the endpoint was removed).
    pub fn spawn(&self, endpoints: Endpoints, endpoint: EndpointId, addr: SocketAddr) -> JoinHandle<()> {
        let prober = self.clone();
        tokio::spawn(async move { prober.run(endpoints, endpoint, addr).await })
    }

    async fn run(self, gate: Endpoints, endpoint: EndpointId, addr: SocketAddr) {
        let mut failures = 0u32;
        loop {
            let Some(ready) = gate.is_ready(endpoint) else { return };
            let ok = self.check(addr).await;
            if ok {
                failures = 0;
                if !ready && gate.set_ready(endpoint, true) {
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

    /// One probe: TCP connect, or HTTP GET expecting 2xx, within the timeout.
    pub async fn check(&self, addr: SocketAddr) -> bool {
        let timeout = self.readiness.timeout;
        let attempt = async {
            match &self.readiness.http {
                None => TcpStream::connect(addr).await.is_ok(),
                Some(path) => {
                    let Ok(request) = Request::get(format!("http://{addr}{path}")).body(Empty::new()) else {
                        return false;
                    };
                    match self.client.request(request).await {
                        Ok(response) => response.status().is_success(),
                        Err(_) => false,
                    }
                }
            }
        };
        tokio::time::timeout(timeout, attempt).await.unwrap_or(false)
    }
}
