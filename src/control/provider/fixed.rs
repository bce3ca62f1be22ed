//! A fixed list of pod addresses: probed, never scaled.
//!
//! An entry may be an `ip:port` or a `name:port` (a headless Service's DNS
//! name, `sd-0.sd.default.svc:7860`): names are resolved at start and every
//! [`RESOLVE_PERIOD`], and each address found is an endpoint. An address
//! that disappears from the answer is drained (no new requests; removed once
//! idle); a failed lookup keeps the addresses already known.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use tokio::task::JoinHandle;

use crate::config::split_host_port;
use crate::control::probe::Prober;
use crate::control::provider::{Context, Endpoints, Provider};
use crate::gate::EndpointId;

/// How often names are looked up again.
pub const RESOLVE_PERIOD: Duration = Duration::from_secs(5);

pub struct Fixed {
    targets: Vec<(String, u16)>,
}

struct Known {
    id: EndpointId,
    probe: JoinHandle<()>,
    /// Gone from the last lookup: draining, removed once idle.
    gone: bool,
}

impl Fixed {
    pub fn new(addrs: &[String]) -> Result<Self> {
        let targets = addrs.iter().map(|a| split_host_port(a)).collect::<Result<_>>()?;
        Ok(Self { targets })
    }

    /// Every address the targets name now; the lookup errors, if any.
    async fn resolve(&self) -> (Vec<SocketAddr>, Vec<String>) {
        let mut found = Vec::new();
        let mut errors = Vec::new();
        for (host, port) in &self.targets {
            if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                found.push(SocketAddr::new(ip, *port));
                continue;
            }
            match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(addrs) => found.extend(addrs),
                Err(error) => errors.push(format!("cannot resolve {host}: {error}")),
            }
        }
        // Config order is dispatch order (first available), so keep it.
        let mut seen = std::collections::HashSet::new();
        found.retain(|addr| seen.insert(*addr));
        (found, errors)
    }

    fn has_names(&self) -> bool {
        self.targets.iter().any(|(host, _)| host.parse::<std::net::IpAddr>().is_err())
    }
}

impl Provider for Fixed {
    async fn run(self, mut cx: Context) {
        let prober = Prober::new(cx.service.readiness.clone()).report_refusals();
        let mut known: BTreeMap<SocketAddr, Known> = BTreeMap::new();
        let mut tick = tokio::time::interval(RESOLVE_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lookups = true;
        loop {
            tokio::select! {
                _ = tick.tick(), if lookups => {
                    let (found, errors) = self.resolve().await;
                    update(&cx.endpoints, &prober, &mut known, &found, errors.is_empty());
                    if !errors.is_empty() {
                        tracing::warn!(service = %cx.service.name, errors = %errors.join("; "), "address lookup failed");
                    }
                    if !errors.is_empty() && !cx.endpoints.any_ready() {
                        cx.endpoints.report_error(Some(errors.join("; ")));
                    }
                    // Literal addresses never change: only the probes keep running.
                    lookups = self.has_names();
                }
                _ = &mut cx.stop => break,
            }
        }
        for entry in known.into_values() {
            entry.probe.abort();
        }
    }
}

/// Brings the endpoints in line with a lookup's answer. After a failed
/// lookup (`complete` false) nothing is taken away.
fn update(
    endpoints: &Endpoints,
    prober: &Prober,
    known: &mut BTreeMap<SocketAddr, Known>,
    found: &[SocketAddr],
    complete: bool,
) {
    for addr in found {
        known.entry(*addr).or_insert_with(|| {
            let id = endpoints.add(*addr);
            tracing::info!(%addr, "endpoint added");
            Known { id, probe: prober.spawn(endpoints.clone(), id, *addr), gone: false }
        });
    }
    if complete {
        for (addr, entry) in known.iter_mut() {
            if !entry.gone && !found.contains(addr) {
                tracing::info!(%addr, "endpoint no longer resolved: draining");
                endpoints.set_draining(entry.id);
                entry.gone = true;
            }
        }
    }
    known.retain(|_, entry| {
        let keep = !(entry.gone && endpoints.is_idle(entry.id));
        if !keep {
            entry.probe.abort();
            endpoints.remove(entry.id);
        }
        keep
    });
}
