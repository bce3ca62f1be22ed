//! A standby's hand-over: a replica that does not hold the Lease passes each
//! request to the replica that does, which keeps the only queue and the only
//! pod slots (so `container_concurrency` stays exact and the order is one
//! order for every replica's clients). A standby is then as good an entry
//! point as the active replica, and a Service can send to both.
//!
//! The active replica advertises its address and a random token in the
//! Lease (see `control::leader`); a standby sends the token with each
//! request it hands over, with the client's address, so the active replica
//! counts the client (fair share, the log) and nobody without the token can
//! make it believe an address. A request that already carries a token is
//! never handed over again (no loops between two standbys).

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;

use http::{HeaderName, HeaderValue};

/// The token of the active replica, on a request a standby handed over.
pub const RELAY_TOKEN: HeaderName = HeaderName::from_static("x-sdgate-relay");
/// The client's address, as the standby that handed the request over saw it.
pub const RELAY_CLIENT: HeaderName = HeaderName::from_static("x-sdgate-client");

/// Where a standby hands requests over to: the active replica's address and
/// token, from the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub token: HeaderValue,
}

/// This replica's side of hand-overs: its own token (checked on requests
/// handed to it) and, while it is a standby, its target.
pub struct Relay {
    token: String,
    target: Mutex<Option<Target>>,
}

impl Default for Relay {
    fn default() -> Self {
        Self { token: format!("{:032x}", fastrand::u128(..)), target: Mutex::new(None) }
    }
}

impl Relay {
    /// The token this replica advertises while it holds the Lease.
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn set_target(&self, target: Option<(SocketAddr, String)>) {
        let target = target.and_then(|(addr, token)| Some(Target { addr, token: HeaderValue::from_str(&token).ok()? }));
        *crate::error::lock(&self.target) = target;
    }

    pub fn target(&self) -> Option<Target> {
        crate::error::lock(&self.target).clone()
    }

    /// The client a standby of ours named on a request it handed over; none
    /// for any other request (a token that is not ours is ignored).
    pub fn relayed_client(&self, headers: &http::HeaderMap) -> Option<IpAddr> {
        self.client_named(headers.get(&RELAY_TOKEN)?, headers.get(&RELAY_CLIENT))
    }

    /// The client named with `token`, if the token is ours.
    pub fn client_named(&self, token: &HeaderValue, client: Option<&HeaderValue>) -> Option<IpAddr> {
        if !self.is_ours(token) {
            return None;
        }
        client?.to_str().ok()?.parse().ok()
    }

    /// Whether `token` is this replica's relay token.
    pub fn is_ours(&self, token: &HeaderValue) -> bool {
        // In constant time: how much of a guess matched must not show in
        // how long the answer takes.
        bool::from(subtle::ConstantTimeEq::ct_eq(token.as_bytes(), self.token.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_token_makes_a_client_address_believed() {
        let relay = Relay::default();
        let mut headers = http::HeaderMap::new();
        headers.insert(RELAY_CLIENT, HeaderValue::from_static("203.0.113.9"));
        assert_eq!(relay.relayed_client(&headers), None, "no token");
        headers.insert(RELAY_TOKEN, HeaderValue::from_static("guessed"));
        assert_eq!(relay.relayed_client(&headers), None, "another token");
        headers.insert(RELAY_TOKEN, HeaderValue::from_str(relay.token()).unwrap());
        assert_eq!(relay.relayed_client(&headers), Some("203.0.113.9".parse().unwrap()));
        assert_ne!(Relay::default().token(), relay.token(), "random per process");
    }
}
