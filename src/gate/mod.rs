//! The gate: which pod may take a request now, and who waits for one.
//!
//! - [`core`]: the pure rules (slots per endpoint, the FIFO wait queue,
//!   pins), plain data with no clock, lock or I/O, tested exhaustively;
//! - [`shell`]: the core behind a lock, shared by a service's requests and
//!   its control loop, with async waiting;
//! - [`slot`]: the right to have one request on one pod, freed by `Drop`;
//! - [`pins`]: the session -> pod table that pins requests;
//! - [`jobs`]: whose request runs on each pod, and whose wait where;
//! - [`models`]: the checkpoint each request wants and each pod holds.
//!
//! The gate depends on nothing in the crate but [`crate::error`].

pub(crate) mod core;
pub(crate) mod jobs;
pub(crate) mod models;
pub(crate) mod pins;
pub(crate) mod shell;
pub(crate) mod slot;

pub use self::core::{ClientKey, Endpoint, EndpointId, Gate, Grant, Pin, Policy, Priority, QueueFull, Ticket};
pub use self::jobs::{Jobs, Running, Waiting};
pub use self::models::{normalize_checkpoint, Holding, ModelId, ModelPolicy, Want, MAX_CHECKPOINTS, MAX_CLIENT_NAMES};
pub use self::pins::{SessionId, Sessions};
pub use self::shell::{Down, EndpointCounts, Observer, Origin, ProbeNote, SharedGate, Unobserved, Waiter};
pub use self::slot::{Held, Slot};
