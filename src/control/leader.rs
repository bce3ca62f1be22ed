//! Leader election over a `coordination.k8s.io/v1` Lease, so that two or
//! more sdgate replicas never dispatch to the same pods at once (one gate
//! per service, one `container_concurrency` count that is exact).
//!
//! - Every `renew_period` each replica reads the Lease. The holder renews
//!   it; a standby takes it when it is free, or when it has seen the same
//!   version of it for `lease_duration` (its own clock: no trust in the
//!   other replica's clock, as client-go's leader election).
//! - Every write carries the version it read: of two replicas racing for a
//!   free lease the API lets one win (409 Conflict for the other).
//! - The holder that cannot renew for `lease_duration - renew_period` (so
//!   before anyone else may take it), or finds it taken, has lost it:
//!   [`run`] returns an error and the process exits, to come back as a
//!   standby. Requests it held in flight are cut.
//!
//! Takeover after the holder dies: at most `lease_duration + 2 x
//! renew_period` (14 s with the defaults of 10 s and 2 s).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::LeaderElection;

/// The Lease annotation where the holder says where it serves clients.
pub const ADDRESS_ANNOTATION: &str = "sdgate.io/address";
/// The Lease annotation with the holder's relay token: a standby sends it
/// with each request it hands over, so the holder believes the client
/// address the standby names (and nobody else can make it believe one).
pub const TOKEN_ANNOTATION: &str = "sdgate.io/relay-token";

/// Where the active replica takes requests a standby hands over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub addr: std::net::SocketAddr,
    pub token: String,
}

/// This replica as it advertises itself when it holds the Lease.
#[derive(Clone, Debug)]
pub struct Advertised {
    /// Where other replicas reach its listener (none: it cannot be relayed to).
    pub addr: Option<std::net::SocketAddr>,
    pub token: String,
}

/// Follows the lease until it is lost; `active` says whether this replica
/// holds it, `holder` where the replica that holds it takes requests (none
/// while this one holds it, or while no holder says).
pub async fn run(
    config: LeaderElection,
    active: watch::Sender<bool>,
    me: Advertised,
    holder: watch::Sender<Option<Holder>>,
) -> Result<()> {
    let identity = config.identity();
    let api = loop {
        match crate::control::provider::kubernetes::client(config.kubeconfig.as_deref()).await {
            Ok(client) => break Api::<Lease>::namespaced(client, &config.namespace),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "leader election: no Kubernetes API; retrying");
                tokio::time::sleep(config.renew_period).await;
            }
        }
    };
    tracing::info!(lease = %config.lease, %identity, "leader election: standing by");
    let mut elector = Elector { api, config, identity, observed: None, renewed: None, me, holder: None };
    let mut tick = tokio::time::interval(elector.config.renew_period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Each call to the API may take half a renew period; the holder gives up
    // `lease_duration - 2 x renew_period` after its last renewal, so that it
    // has stopped (at the latest a tick and a call later) before anyone else
    // may take the lease (`lease_duration` after it last saw it change).
    let call_timeout = elector.config.renew_period / 2;
    let give_up_after = elector.config.lease_duration.saturating_sub(elector.config.renew_period * 2);
    loop {
        tick.tick().await;
        let leading = *active.borrow();
        let now = Instant::now();
        let held = match tokio::time::timeout(call_timeout, elector.try_hold(now)).await {
            Ok(held) => held,
            Err(_) => Err(anyhow::anyhow!("the API did not answer within {call_timeout:?}")),
        };
        holder.send_if_modified(|known| {
            let now_known = if matches!(held, Ok(true)) { None } else { elector.holder.clone() };
            let changed = *known != now_known;
            *known = now_known;
            changed
        });
        match held {
            Ok(true) => {
                elector.renewed = Some(now);
                if !leading {
                    tracing::info!(lease = %elector.config.lease, identity = %elector.identity, "leader election: this replica is now active");
                    let _ = active.send(true);
                }
            }
            Ok(false) if leading => {
                bail!("leader election: lease {} was taken by another replica", elector.config.lease)
            }
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "leader election: cannot read or write the lease");
                if leading && elector.renewed.is_none_or(|at| Instant::now().duration_since(at) >= give_up_after) {
                    bail!("leader election: could not renew lease {} within {give_up_after:?}", elector.config.lease);
                }
            }
        }
    }
}

/// Gives the lease up after a graceful shutdown (its requests drained), so a
/// standby takes over at its next try instead of after `lease_duration`.
/// Only if this replica still holds it; errors are logged, never fatal.
pub async fn release(config: &LeaderElection) {
    let identity = config.identity();
    let attempt = async {
        let client = crate::control::provider::kubernetes::client(config.kubeconfig.as_deref()).await?;
        let api = Api::<Lease>::namespaced(client, &config.namespace);
        let Some(mut lease) = api.get_opt(&config.lease).await? else { return Ok(false) };
        let Some(spec) = lease.spec.as_mut().filter(|s| s.holder_identity.as_deref() == Some(identity.as_str())) else {
            return Ok(false);
        };
        spec.holder_identity = None;
        // Standbys stop handing requests to this replica's address.
        if let Some(annotations) = lease.metadata.annotations.as_mut() {
            annotations.remove(ADDRESS_ANNOTATION);
            annotations.remove(TOKEN_ANNOTATION);
        }
        api.replace(&config.lease, &PostParams::default(), &lease).await?;
        anyhow::Ok(true)
    };
    match tokio::time::timeout(config.renew_period, attempt).await {
        Ok(Ok(true)) => tracing::info!(lease = %config.lease, %identity, "leader election: lease released"),
        Ok(Ok(false)) => {}
        Ok(Err(error)) => tracing::warn!(error = %format!("{error:#}"), "leader election: cannot release the lease"),
        Err(_) => tracing::warn!("leader election: the API did not answer the lease release in time"),
    }
}

struct Elector {
    api: Api<Lease>,
    config: LeaderElection,
    identity: String,
    /// The other holder's lease version we last saw change, and when.
    observed: Option<(String, Instant)>,
    /// When this replica last renewed.
    renewed: Option<Instant>,
    /// What this replica writes into the Lease when it holds it.
    me: Advertised,
    /// What the other holder wrote there, as last read.
    holder: Option<Holder>,
}

impl Elector {
    /// Renews or takes the lease; `Ok(true)` when this replica holds it now.
    async fn try_hold(&mut self, now: Instant) -> Result<bool> {
        let name = self.config.lease.clone();
        let Some(lease) = self.api.get_opt(&name).await.with_context(|| format!("get lease {name}"))? else {
            return self.write(None, 0).await;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let annotations = lease.metadata.annotations.clone().unwrap_or_default();
        self.holder = match (holder, annotations.get(ADDRESS_ANNOTATION), annotations.get(TOKEN_ANNOTATION)) {
            (Some(_), Some(addr), Some(token)) => addr.parse().ok().map(|addr| Holder { addr, token: token.clone() }),
            _ => None,
        };
        let transitions = spec.lease_transitions.unwrap_or(0);
        if holder == Some(self.identity.as_str()) {
            // Ours: a conflict here is another writer touching the object
            // (labels, annotations), not a lost lease: try again next tick.
            if !self.write(Some(lease), transitions).await? {
                bail!("lease {name} changed while renewing it");
            }
            return Ok(true);
        }
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let seen_at = match &self.observed {
            Some((seen, at)) if *seen == version => *at,
            _ => {
                self.observed = Some((version, now));
                now
            }
        };
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.config.lease_duration, Duration::from_secs);
        if holder.is_some() && now.duration_since(seen_at) < duration {
            return Ok(false);
        }
        self.write(Some(lease), transitions + 1).await
    }

    /// Writes the lease as held by this replica, at the version read (a
    /// conflict means another replica wrote first: not held).
    async fn write(&self, current: Option<Lease>, transitions: i32) -> Result<bool> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let renewing = current.as_ref().and_then(|l| l.spec.as_ref()).and_then(|s| s.holder_identity.as_deref())
            == Some(self.identity.as_str());
        let acquired = match &current {
            Some(lease) if renewing => lease.spec.as_ref().and_then(|s| s.acquire_time.clone()),
            _ => None,
        };
        // Other writers' labels and annotations stay; the version read
        // makes the write conditional.
        let mut metadata = current.as_ref().map(|l| l.metadata.clone()).unwrap_or_else(|| ObjectMeta {
            name: Some(self.config.lease.clone()),
            namespace: Some(self.config.namespace.clone()),
            ..ObjectMeta::default()
        });
        let annotations = metadata.annotations.get_or_insert_with(Default::default);
        match self.me.addr {
            Some(addr) => {
                annotations.insert(ADDRESS_ANNOTATION.into(), addr.to_string());
                annotations.insert(TOKEN_ANNOTATION.into(), self.me.token.clone());
            }
            None => {
                annotations.remove(ADDRESS_ANNOTATION);
                annotations.remove(TOKEN_ANNOTATION);
            }
        }
        let lease = Lease {
            metadata,
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.config.lease_duration.as_secs().max(1) as i32),
                acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
                renew_time: Some(now),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        };
        let params = PostParams::default();
        let written = match current {
            None => self.api.create(&params, &lease).await,
            Some(_) => self.api.replace(&self.config.lease, &params, &lease).await,
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error).with_context(|| format!("write lease {}", self.config.lease)),
        }
    }
}
