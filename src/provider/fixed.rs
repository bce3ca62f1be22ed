//! A fixed list of pod addresses: probed, never scaled.

use std::sync::Arc;

use anyhow::Result;
use tokio::task::JoinHandle;

use crate::config::{parse_addr, Readiness};
use crate::probe::Prober;
use crate::slot::SharedGate;

pub fn start(addrs: &[String], readiness: &Readiness, gate: Arc<SharedGate>) -> Result<Vec<JoinHandle<()>>> {
    let prober = Prober::new(readiness.clone());
    addrs
        .iter()
        .map(|addr| {
            let addr = parse_addr(addr)?;
            let endpoint = gate.add_endpoint(addr);
            Ok(prober.spawn(gate.clone(), endpoint, addr))
        })
        .collect()
}
