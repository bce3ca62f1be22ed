//! Where a service's endpoints come from, and how their number changes.
//!
//! A provider adds endpoints to the service's gate (not ready), starts their
//! readiness probes, removes them when they go away, and follows the desired
//! replica count it is sent on a `watch` channel (its scale call). The gate
//! never knows which provider it has.
//!
//! - `fixed`: a static list of addresses; cannot scale.
//! - `process`: local worker processes (the embedded default).

pub mod fixed;
pub mod process;

use std::sync::Arc;

use anyhow::Result;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::ServiceConfig;
use crate::slot::SharedGate;

/// The running provider of one service.
pub struct Provider {
    tasks: Vec<JoinHandle<()>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Provider {
    /// Starts the provider the service's `backend` names.
    pub fn start(config: &ServiceConfig, gate: Arc<SharedGate>, desired: watch::Receiver<u32>) -> Result<Self> {
        if let Some(addrs) = &config.backend.fixed {
            return Ok(Self { tasks: fixed::start(addrs, &config.readiness, gate)?, stop: None });
        }
        if let Some(backend) = &config.backend.process {
            let (stop, stopped) = oneshot::channel();
            let task = tokio::spawn(process::run(
                config.name.clone(),
                backend.clone(),
                config.readiness.clone(),
                gate,
                desired,
                stopped,
            ));
            return Ok(Self { tasks: vec![task], stop: Some(stop) });
        }
        anyhow::bail!("service {}: no backend configured", config.name)
    }

    /// Stops what the provider started (worker processes included) and waits
    /// for it.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            for task in self.tasks.drain(..) {
                let _ = task.await;
            }
        }
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
