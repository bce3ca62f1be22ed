//! Where a service's endpoints come from, and how their number changes.
//!
//! Every backend implements [`Provider`]: it adds endpoints (not ready) to
//! its service through a narrow [`Endpoints`] handle, probes them or learns
//! their readiness, removes them when they go away, and follows the desired
//! replica count it is sent on a `watch` channel (its scale call). It never
//! sees the gate's locks, queue or metrics; the gate never knows which
//! provider it has. Scale-down everywhere uses one drain policy
//! ([`drain::choose`]).
//!
//! - `fixed`: a list of `host:port` addresses (names re-resolved); cannot scale.
//! - `process`: local worker processes (the embedded default).
//! - `kubernetes`: the pods of a Deployment, watched through the API and
//!   scaled through its scale subresource.

pub(crate) mod drain;
pub(crate) mod endpoints;
pub mod fixed;
pub mod kubernetes;
pub mod process;

use std::future::Future;

use anyhow::Result;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{Backend, ServiceConfig};

pub use endpoints::Endpoints;

/// What a provider runs with.
pub struct Context {
    pub service: ServiceConfig,
    pub endpoints: Endpoints,
    /// The autoscaler's desired replica count (its scale call).
    pub desired: watch::Receiver<u32>,
    /// Fires when the gateway stops: stop what was started and return.
    pub stop: oneshot::Receiver<()>,
}

/// A backend: runs until `stop` fires, keeping the service's endpoints in
/// step with where the pods are.
pub trait Provider: Send + 'static {
    fn run(self, cx: Context) -> impl Future<Output = ()> + Send;
}

/// A provider running in its task.
pub struct Running {
    task: Option<JoinHandle<()>>,
    stop: Option<oneshot::Sender<()>>,
}

/// Starts the provider the service's `backend` names, on the service's
/// endpoints handle.
pub fn start(config: &ServiceConfig, endpoints: Endpoints, desired: watch::Receiver<u32>) -> Result<Running> {
    let (stop_tx, stop) = oneshot::channel();
    let endpoints = endpoints
        .with_idle_check(config.idle_check.as_ref().map(|check| check.path.as_str()))
        .with_checkpoint_options(config.checkpoints.options_path.as_deref());
    let cx = Context { service: config.clone(), endpoints, desired, stop };
    let task = match &config.backend {
        Backend::Fixed(addrs) => tokio::spawn(fixed::Fixed::new(addrs)?.run(cx)),
        Backend::Process(backend) => tokio::spawn(process::Pool::new(backend.clone()).run(cx)),
        Backend::Kubernetes(backend) => tokio::spawn(kubernetes::Kubernetes::new(backend.clone()).run(cx)),
    };
    Ok(Running { task: Some(task), stop: Some(stop_tx) })
}

impl Running {
    /// Stops what the provider started (worker processes included) and waits
    /// for it.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
