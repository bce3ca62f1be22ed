//! The gate: which pod may take a request now, and who waits for one.
//!
//! - [`core`]: the pure rules (slots per endpoint, the FIFO wait queue,
//!   pins), plain data with no clock, lock or I/O, tested exhaustively;
//! - [`shell`]: the core behind a lock, shared by a service's requests and
//!   its control loop, with async waiting;
//! - [`Slot`]: the right to have one request on one pod, freed by `Drop`.
//!
//! The gate depends on nothing in the crate but [`crate::error`].

pub mod core;
pub mod shell;

pub use self::core::{Endpoint, EndpointId, Gate, Grant, Pin, Policy, QueueFull, Ticket};
pub use self::shell::{ScaleEvent, SharedGate, Slot, Waiter};
