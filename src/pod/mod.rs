//! The pod client: one pool of kept-alive HTTP/1.1 connections per pod,
//! shared by every serving thread and by everyone who talks to pods:
//! forwarding, readiness probes, idle checks and interrupts.
//!
//! At `container_concurrency: 1` a pod sees at most a couple of connections
//! from sdgate in steady state (the request's, and a probe's while they
//! overlap), whatever `threads` is.
//!
//! It depends on nothing but the error and body helpers, so the request path
//! (`forward`) and the control plane (`control`'s probes) can both use it
//! without depending on each other.

mod check;
mod pool;
mod replay;

pub use check::{Activity, Reply};
pub use pool::{connect_error, Pool, SendError, Share};
pub use replay::{ReplayableBody, RequestBody};
