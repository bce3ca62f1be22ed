//! What the planes tell the outside: Prometheus [`metrics`], the `/status`
//! snapshot and the dashboard's history ([`status`]). Observers read; they
//! steer nothing.

pub(crate) mod flood;
pub mod metrics;
pub(crate) mod status;
