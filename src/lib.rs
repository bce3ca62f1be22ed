//! sdgate: a concurrency-aware activator and reverse proxy for Stable
//! Diffusion GPU pods.
//!
//! The folders are the planes, and their arrows run one way
//! (`tests/layering.rs` keeps them so; `docs/architecture.md` draws them):
//!
//! - request path: [`serve`] (listeners, lobby, threads) -> [`proxy`] (host
//!   table, routes, affinity, admission) -> [`gate`] (slots and the wait
//!   queue) -> [`forward`] (the exchange with the pod) -> [`pod`] (the pod
//!   client);
//! - control loop: [`control`] (providers and probes -> endpoints -> the
//!   gate; the gate's demand -> autoscaler -> provider; leader election);
//! - [`jobs`]: async jobs kept in a store, run through the request path by
//!   the active replica (the proxy is its `Runner`), with webhooks;
//! - [`observe`]: metrics, the status snapshot and its history; written to
//!   by the planes, steering none;
//! - [`config`], [`error`] and [`body`]: used by all, using nothing above them;
//! - [`tools`]: `sdgate sim` and `sdgate import-knative`.
//!
//! Only [`serve`] joins the planes together.

pub(crate) mod body;
pub mod config;
pub mod control;
pub mod error;
pub(crate) mod forward;
pub mod gate;
pub mod jobs;
pub mod observe;
pub(crate) mod pod;
pub mod proxy;
pub mod serve;
pub mod tools;

pub use config::Config;
/// Reading a pod's answer (for `benches/answer.rs`).
#[doc(hidden)]
pub use forward::answer;
pub use serve::Gateway;
