//! The pod client.
