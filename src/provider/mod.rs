//! Where a service's endpoints come from.
//!
//! A provider adds endpoints to the service's gate (not ready), starts their
//! readiness probes, and removes them when they go away. `fixed` is a static
//! list of addresses.

pub mod fixed;

use std::sync::Arc;

use anyhow::Result;
use tokio::task::JoinHandle;

use crate::config::ServiceConfig;
use crate::slot::SharedGate;

/// The running provider of one service; dropping it stops its tasks.
pub struct Provider {
    tasks: Vec<JoinHandle<()>>,
}

impl Provider {
    /// Starts the provider the service's `backend` names.
    pub fn start(config: &ServiceConfig, gate: Arc<SharedGate>) -> Result<Self> {
        let tasks = match &config.backend.fixed {
            Some(addrs) => fixed::start(addrs, &config.readiness, gate)?,
            None => anyhow::bail!("service {}: no backend configured", config.name),
        };
        Ok(Self { tasks })
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
