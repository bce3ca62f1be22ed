//! sdgate: a concurrency-aware activator and reverse proxy for Stable
//! Diffusion GPU pods.
//!
//! Request path: [`server`] ([`threads`], [`lobby`]) -> [`proxy`] ([`router`] -> [`slot`]/[`gate`] ->
//! [`forward`]). Control loop: [`provider`] (fixed, process, kubernetes) + [`probe`] ->
//! [`provider::Endpoints`] -> [`gate`] -> [`autoscale`] -> [`provider`]; [`leader`] decides
//! which replica runs it.

pub mod admin;
pub mod affinity;
pub mod autoscale;
pub mod body;
pub mod config;
pub mod error;
pub mod forward;
pub mod gate;
pub mod knative;
pub mod leader;
pub mod lobby;
pub mod metrics;
pub mod probe;
pub mod provider;
pub mod proxy;
pub mod quarantine;
pub mod reload;
pub mod router;
pub mod routes;
pub mod server;
pub mod sim;
pub mod slot;
pub mod status;
pub mod threads;

pub use config::Config;
pub use server::Gateway;
