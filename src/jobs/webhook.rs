//! Job webhooks: a POST to the job's callback URL when it ends, signed as
//! Stripe signs its events, retried with backoff.
//!
//! The body is JSON (`id`, `service`, `state`, `error`, `status`, `url`,
//! `result_url`, `finished_at`); the header `Sdgate-Signature:
//! t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>` lets the
//! receiver check it came from sdgate and is recent. A delivery is retried
//! from 1 s, doubling to `jobs.webhooks.max_backoff`, for
//! `jobs.webhooks.retry_for`; its state is kept with the job (`pending`,
//! `delivered`, `failed: why`), so a replica that takes over sends the
//! pending ones.
//!
//! Targets: `http://` URLs (a TLS client is not built in yet). The host is
//! resolved and every address checked before the connection, which goes to
//! the checked address: loopback, private, link-local and other non-public
//! addresses are refused unless `jobs.webhooks.allow` lists them, so a job
//! cannot make sdgate call into the cluster.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderValue, Method};
use prometheus::IntCounterVec;
use sha2::Sha256;

use super::store::{Row, Store};
use crate::config::{IpBlock, WebhookConfig};
use crate::pod::Reply;

/// The signature header.
pub const SIGNATURE: &str = "sdgate-signature";

#[derive(Clone)]
pub struct Sender {
    secret: Option<Vec<u8>>,
    allow: Vec<IpBlock>,
    timeout: Duration,
    retry_for: Duration,
    max_backoff: Duration,
    counts: IntCounterVec,
}

impl Sender {
    pub fn new(config: &WebhookConfig, counts: IntCounterVec) -> Result<Self> {
        let secret = match &config.secret_file {
            Some(path) => {
                let text = std::fs::read(path)
                    .with_context(|| format!("jobs.webhooks.secret_file: cannot read {}", path.display()))?;
                let secret = text.trim_ascii().to_vec();
                if secret.len() < 16 {
                    bail!("jobs.webhooks.secret_file: the secret is shorter than 16 bytes");
                }
                Some(secret)
            }
            None => None,
        };
        let allow = config.allow.iter().map(|block| IpBlock::parse(block)).collect::<Result<_>>()?;
        Ok(Self {
            secret,
            allow,
            timeout: config.timeout,
            retry_for: config.retry_for,
            max_backoff: config.max_backoff,
            counts,
        })
    }

    /// Delivers the webhook of ended job `row` in the background.
    pub fn send(&self, store: Store, row: Row) {
        let sender = self.clone();
        tokio::spawn(async move {
            let state = sender.deliver(&row).await;
            if let Err(error) = store.set_webhook_state(&row.id, &state).await {
                tracing::warn!(job = %row.id, error = %format!("{error:#}"), "jobs: cannot record a webhook's outcome");
            }
        });
    }

    /// Tries until delivered or `retry_for` has passed; the final state.
    async fn deliver(&self, row: &Row) -> String {
        let Some(url) = row.webhook.as_deref() else { return "failed: no URL".into() };
        let body = payload(row);
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_secs(1);
        loop {
            match self.attempt(url, &body).await {
                Ok(()) => {
                    self.counts.with_label_values(&["delivered"]).inc();
                    tracing::info!(job = %row.id, %url, "webhook delivered");
                    return "delivered".into();
                }
                Err(Failure::Refused(why)) => {
                    self.counts.with_label_values(&["refused"]).inc();
                    tracing::warn!(job = %row.id, %url, %why, "webhook refused");
                    return format!("failed: {why}");
                }
                Err(Failure::Retry(why)) if started.elapsed() + backoff <= self.retry_for => {
                    self.counts.with_label_values(&["retried"]).inc();
                    tracing::info!(job = %row.id, %url, %why, retry_in = ?backoff, "webhook not delivered; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.max_backoff);
                }
                Err(Failure::Retry(why)) => {
                    self.counts.with_label_values(&["failed"]).inc();
                    tracing::warn!(job = %row.id, %url, %why, "webhook given up (jobs.webhooks.retry_for)");
                    return format!("failed: {why}");
                }
            }
        }
    }

    async fn attempt(&self, url: &str, body: &Bytes) -> Result<(), Failure> {
        let target = Target::parse(url).map_err(|e| Failure::Refused(format!("{e:#}")))?;
        let addr = self.resolve(&target).await?;
        let timestamp = super::now_us() / 1_000_000;
        let mut headers = HeaderMap::new();
        let host = HeaderValue::from_str(&target.host_header).map_err(|_| Failure::Refused("a bad host".into()))?;
        headers.insert(http::header::HOST, host);
        if let Some(secret) = &self.secret {
            let signature = sign(secret, timestamp, body);
            if let Ok(value) = HeaderValue::from_str(&format!("t={timestamp},v1={signature}")) {
                headers.insert(SIGNATURE, value);
            }
        }
        let pool = crate::pod::Pool::shared();
        match pool
            .call(addr, Method::POST, &target.path, Some(&headers), Some(body.clone()), 64 * 1024, self.timeout)
            .await
        {
            Reply::Answer(status, _) | Reply::Oversized(status) if status.is_success() => Ok(()),
            Reply::Answer(status, _) | Reply::Oversized(status) => Err(Failure::Retry(format!("answered {status}"))),
            Reply::Refused(why) => Err(Failure::Retry(why)),
            Reply::Nothing => Err(Failure::Retry("no answer".into())),
        }
    }

    /// The target's address: the first that resolves and is allowed.
    async fn resolve(&self, target: &Target) -> Result<SocketAddr, Failure> {
        let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
        let addrs: Vec<SocketAddr> = tokio::time::timeout(self.timeout, lookup)
            .await
            .map_err(|_| Failure::Retry(format!("cannot resolve {} in time", target.host)))?
            .map_err(|e| Failure::Retry(format!("cannot resolve {}: {e}", target.host)))?
            .collect();
        addrs.iter().copied().find(|addr| self.allowed(addr.ip())).ok_or_else(|| {
            Failure::Refused(format!(
                "{} is not a public address and not in jobs.webhooks.allow",
                addrs.first().map(|a| a.ip().to_string()).unwrap_or_else(|| target.host.clone())
            ))
        })
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|block| block.contains(ip)) || is_public(ip)
    }
}

enum Failure {
    /// Never delivered: the URL or its address is not allowed.
    Refused(String),
    /// Worth another try.
    Retry(String),
}

/// `HMAC-SHA256(secret, "<timestamp>.<body>")` in hex.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return String::new() };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    super::hex(&mac.finalize().into_bytes())
}

fn payload(row: &Row) -> Bytes {
    let value = serde_json::json!({
        "type": "job.ended",
        "id": row.id,
        "service": row.service,
        "state": row.state,
        "error": row.error,
        "status": row.result_status,
        "url": format!("{}/{}", super::PREFIX, row.id),
        "result_url": format!("{}/{}/result", super::PREFIX, row.id),
        "finished_at": row.finished_us.map(|us| us as f64 / 1e6),
    });
    Bytes::from(value.to_string())
}

/// An `http://` URL, split.
struct Target {
    host: String,
    port: u16,
    /// `host[:port]`, without any `user:password@`.
    host_header: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self> {
        let uri: http::Uri = url.parse().context("not a URL")?;
        if uri.scheme_str() != Some("http") {
            bail!("only http:// webhooks are supported");
        }
        let authority = uri.authority().context("a URL without a host")?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        let port = authority.port_u16().unwrap_or(80);
        let path = uri.path_and_query().map_or("/".to_string(), |p| p.as_str().to_string());
        let host_header = match authority.port_u16() {
            Some(port) => format!("{}:{port}", authority.host()),
            None => authority.host().to_string(),
        };
        Ok(Self { host, port, host_header, path })
    }
}

/// Whether `ip` is a public unicast address (not loopback, private,
/// link-local, shared, documentation, multicast or unspecified).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || (a == 198 && (18..20).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let segments = v6.segments();
            let embedded = |hi: u16, lo: u16| std::net::Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
            // Addresses that carry an IPv4 one (and reach it through a
            // gateway): judged by it. NAT64 (64:ff9b::/96, 64:ff9b:1::/48),
            // IPv4-compatible (::a.b.c.d), 6to4 (2002::/16).
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || segments[..6] == [0, 0, 0, 0, 0, 0] {
                return is_public(IpAddr::V4(embedded(segments[6], segments[7])));
            }
            if segments[0] == 0x64 && segments[1] == 0xff9b && segments[2] == 1 {
                return false;
            }
            if segments[0] == 0x2002 {
                return is_public(IpAddr::V4(embedded(segments[1], segments[2])));
            }
            let first = segments[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_targets_by_default() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "0.0.0.0",
            "192.0.0.8",
            "198.18.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.216.34", "1.1.1.1", "2606:4700::1111", "64:ff9b::101:101", "2002:101:101::1"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_and_body() {
        // RFC 4231 style check against a value computed independently:
        // python3 -c 'import hmac,hashlib;print(hmac.new(b"0123456789abcdef",b"1700000000.{}",hashlib.sha256).hexdigest())'
        assert_eq!(
            sign(b"0123456789abcdef", 1_700_000_000, b"{}"),
            "e4f8e2ecae2295b2ddb2f0b5584c8275e226c0ebe9b3b819e70156bb67122e3e"
        );
    }

    #[test]
    fn only_http_urls_with_a_host_are_targets() {
        assert!(Target::parse("https://example.com/hook").is_err());
        assert!(Target::parse("/relative").is_err());
        let target = Target::parse("http://hooks.example.com:8080/a?b=1").unwrap();
        assert_eq!((target.host.as_str(), target.port, target.path.as_str()), ("hooks.example.com", 8080, "/a?b=1"));
        let target = Target::parse("http://user:secret@hooks.example.com/a").unwrap();
        assert_eq!(target.host_header, "hooks.example.com", "no credentials in Host");
    }
}
