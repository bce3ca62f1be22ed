//! Commands beside the gateway: `sdgate sim` (a fake SD WebUI worker) and
//! `sdgate import-knative`.

pub mod knative;
pub mod sim;
