//! The control plane: where pods come from and how many there should be.
//!
//! [`provider`]s (fixed, process, kubernetes) add endpoints and follow the
//! desired replica count; [`probe`]s tell when a pod is ready; the
//! [`autoscale`]r turns the gate's demand into a desired count;
//! [`leader`] election decides which replica runs all this.
//!
//! It reaches the gate only through [`provider::Endpoints`] and the gate's
//! demand signal, and never imports the request path (`proxy`, `forward`,
//! `serve`).

pub mod autoscale;
pub(crate) mod leader;
pub mod probe;
pub mod provider;
