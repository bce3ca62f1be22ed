//! The `/status` snapshot: per service, its endpoints, queue, replicas, last
//! scale decision and recent request figures. The dashboard page renders it.

use std::time::Instant;

use serde::Serialize;

use crate::metrics::RecentSummary;
use crate::proxy::{Proxy, Service};

#[derive(Serialize)]
pub struct Status {
    pub uptime_seconds: f64,
    pub services: Vec<ServiceStatus>,
}

#[derive(Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub hosts: Vec<String>,
    pub container_concurrency: u32,
    pub queue_depth: usize,
    /// How long the longest-waiting request has waited.
    pub oldest_wait_seconds: Option<f64>,
    pub inflight: u32,
    pub desired_replicas: i64,
    pub ready_replicas: usize,
    pub last_scale: Option<LastScale>,
    pub endpoints: Vec<EndpointStatus>,
    pub recent: RecentSummary,
}

#[derive(Serialize)]
pub struct LastScale {
    pub desired: u32,
    pub reason: &'static str,
    pub seconds_ago: f64,
}

#[derive(Serialize)]
pub struct EndpointStatus {
    pub address: String,
    /// `ready`, `not_ready` (starting or failing its probe) or `draining`.
    pub state: &'static str,
    pub inflight: u32,
    pub sessions: usize,
    pub served: u64,
}

impl Status {
    pub fn of(proxy: &Proxy, started: Instant) -> Self {
        Self {
            uptime_seconds: started.elapsed().as_secs_f64(),
            services: proxy.services().iter().map(ServiceStatus::of).collect(),
        }
    }
}

impl ServiceStatus {
    fn of(service: &Service) -> Self {
        let gate = &service.gate;
        let now = Instant::now();
        let (queue_depth, oldest_wait_seconds, inflight, ready_replicas, endpoints) = gate.inspect(|g| {
            let endpoints = g
                .endpoints()
                .iter()
                .map(|e| EndpointStatus {
                    address: e.addr.to_string(),
                    state: if e.draining {
                        "draining"
                    } else if e.ready {
                        "ready"
                    } else {
                        "not_ready"
                    },
                    inflight: e.inflight,
                    sessions: gate.sessions.as_ref().map_or(0, |s| s.count_for(e.id, now)),
                    served: e.served,
                })
                .collect();
            (g.queue_depth(), g.oldest_wait(now).map(|d| d.as_secs_f64()), g.inflight(), g.ready_count(), endpoints)
        });
        Self {
            name: service.config.name.clone(),
            hosts: service.config.hosts.clone(),
            container_concurrency: service.config.container_concurrency,
            queue_depth,
            oldest_wait_seconds,
            inflight,
            desired_replicas: gate.metrics().desired_replicas.get(),
            ready_replicas,
            last_scale: gate.last_scale().map(|event| LastScale {
                desired: event.desired,
                reason: event.reason,
                seconds_ago: event.at.elapsed().as_secs_f64(),
            }),
            endpoints,
            recent: gate.recent.summary(),
        }
    }
}
