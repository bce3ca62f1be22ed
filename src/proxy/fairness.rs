//! Who a request comes from, for fair share between the clients of a
//! service (`fairness.key`), and its class (`priority`).
//!
//! The key is hashed at once (an API key or a session id is never kept,
//! shown or logged) with a hasher seeded at random per process (so no
//! client can aim its key at another's).

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::OnceLock;

use http::HeaderMap;

use super::Service;
use crate::config::{FairnessKey, IpBlock, PriorityConfig};
use crate::gate::{ClientKey, Origin, Priority, SessionId};

/// The gate's class for a configured one.
pub fn priority(config: PriorityConfig) -> Priority {
    match config {
        PriorityConfig::Interactive => Priority::Interactive,
        PriorityConfig::Batch => Priority::Batch,
    }
}

/// The service's fairness settings, parsed once.
pub struct Fairness {
    key: FairnessKey,
    header: Option<http::HeaderName>,
    trusted: Vec<IpBlock>,
    max_queued: usize,
}

impl Fairness {
    pub fn of(config: &crate::config::FairnessConfig) -> Self {
        Self {
            key: config.key,
            header: config.header.as_deref().and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
            // Validated with the config.
            trusted: config.trusted_proxies.iter().filter_map(|p| IpBlock::parse(p).ok()).collect(),
            max_queued: config.max_queued,
        }
    }
}

impl Fairness {
    /// The value of the `fairness.key` header, when the key is a header.
    pub fn key_header<'a>(&self, headers: &'a HeaderMap) -> Option<&'a http::HeaderValue> {
        match self.key {
            FairnessKey::Header => self.header.as_ref().and_then(|name| headers.get(name)),
            _ => None,
        }
    }
}

/// Where a request of `service` comes from: its client (by the service's
/// `fairness.key`), its class, and the bound on its client's waiting requests.
pub fn origin(
    service: &Service,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
    session: Option<&SessionId>,
    priority: Priority,
) -> Origin {
    let fairness = &service.fairness;
    let client = match fairness.key {
        FairnessKey::Header => fairness.header.as_ref().and_then(|name| headers.get(name)).map(|v| hash(v.as_bytes())),
        FairnessKey::Session => session.map(hash),
        FairnessKey::Address => None,
    }
    .or_else(|| client_address(fairness, headers, peer).map(|ip| hash(&ip)));
    let client = client.map(|key| std::num::NonZeroU64::new(key).unwrap_or(std::num::NonZeroU64::MIN));
    Origin { client, priority, max_queued: u32::try_from(fairness.max_queued).unwrap_or(u32::MAX), ..Origin::default() }
}

/// The client's address (for fair share and the log): the peer's, or the
/// last `X-Forwarded-For` hop when the peer is a trusted proxy.
pub fn client_address(fairness: &Fairness, headers: &HeaderMap, peer: Option<IpAddr>) -> Option<IpAddr> {
    let peer = peer?;
    if !trusts(fairness, peer) {
        return Some(peer);
    }
    let forwarded = headers.get_all("x-forwarded-for").iter().next_back().and_then(|v| v.to_str().ok());
    forwarded.and_then(|v| v.rsplit(',').next()).and_then(|hop| hop.trim().parse().ok()).or(Some(peer))
}

/// Whether `peer` is one of the service's `trusted_proxies`.
pub fn trusts(fairness: &Fairness, peer: IpAddr) -> bool {
    fairness.trusted.iter().any(|block| block.contains(peer))
}

/// The fair-share client of a caller with an API key (its name).
pub fn client_named(name: &str) -> std::num::NonZeroU64 {
    let key = hash(&("api-key", name));
    std::num::NonZeroU64::new(key).unwrap_or(std::num::NonZeroU64::MIN)
}

fn hash<T: std::hash::Hash + ?Sized>(key: &T) -> ClientKey {
    static STATE: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
    STATE.get_or_init(Default::default).hash_one(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fairness(key: FairnessKey, trusted: &[&str]) -> Fairness {
        let config = crate::config::FairnessConfig {
            key,
            header: Some("X-Api-Key".into()),
            trusted_proxies: trusted.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        Fairness::of(&config)
    }

    #[test]
    fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "203.0.113.9, 198.51.100.7".parse().unwrap());
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let trusting = fairness(FairnessKey::Address, &["10.0.0.0/8"]);
        assert_eq!(client_address(&trusting, &headers, Some(proxy)), Some("198.51.100.7".parse().unwrap()));
        let wary = fairness(FairnessKey::Address, &[]);
        assert_eq!(client_address(&wary, &headers, Some(proxy)), Some(proxy));
        assert_eq!(client_address(&trusting, &HeaderMap::new(), Some(proxy)), Some(proxy));
    }

    #[test]
    fn one_key_one_client() {
        assert_eq!(hash(b"key-a"), hash(b"key-a"));
        assert_ne!(hash(b"key-a"), hash(b"key-b"));
    }
}
