//! Session affinity: the `sd` cookie and the pin table.
//!
//! Guarantees:
//! - the cookie is opaque and signed: `hex(session id (16 bytes) || expiry
//!   (unix seconds, 8 bytes) || pin (8 bytes) || HMAC-SHA256 over those and
//!   the service's name, first 16 bytes)`. The pin is the gate's id of the
//!   session's pod (never its address), so a session is pinned before the
//!   table holds it, and it cannot be forged to aim at a pod; a cookie that
//!   fails verification (garbled, forged, expired, another key or another
//!   service) starts a new session, never an error;
//! - a session costs table space only once its cookie has come back: a flood
//!   of cookieless requests adds nothing to the pin table, so it cannot
//!   evict anyone's pin or inflate the per-pod session counts;
//! - a cookie signed with the previous key (rotation) is still accepted and
//!   re-issued with the current one;
//! - the pin table (session -> pod) forgets sessions idle for the timeout and
//!   never holds more than `max_sessions`, so a flood of new sessions cannot
//!   exhaust memory.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use cookie::{Cookie, SameSite};
use hmac::{Hmac, Mac};
use http::{header, HeaderMap, HeaderValue};
use sha2::Sha256;

use crate::config::AffinityConfig;
pub use crate::gate::pins::{SessionId, Sessions};
use crate::gate::EndpointId;

type HmacSha256 = Hmac<Sha256>;

/// The environment variable holding the signing key.
pub const KEY_ENV: &str = "SDGATE_AFFINITY_KEY";
/// The environment variable holding the previous key, still accepted.
pub const PREVIOUS_KEY_ENV: &str = "SDGATE_AFFINITY_PREVIOUS_KEY";

const ID_LEN: usize = 16;
const EXPIRY_LEN: usize = 8;
const PIN_LEN: usize = 8;
const MAC_LEN: usize = 16;
const SIGNED_LEN: usize = ID_LEN + EXPIRY_LEN + PIN_LEN;
const TOKEN_LEN: usize = SIGNED_LEN + MAC_LEN;
/// The pin field of a session with no pod yet.
const NO_PIN: u64 = u64::MAX;

/// What a request's cookie (or session header) said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presented {
    /// No cookie: a new session.
    Nothing,
    /// A cookie that failed verification: a new session.
    Invalid,
    /// A valid session, and the pod its cookie names (none for a session
    /// header, or a cookie issued before the session had a pod).
    Valid(SessionId, Option<EndpointId>),
}

impl Presented {
    /// The session, if valid.
    pub fn session(&self) -> Option<SessionId> {
        match self {
            Presented::Valid(id, _) => Some(*id),
            _ => None,
        }
    }
}

/// Signs and verifies session tokens.
#[derive(Clone)]
pub struct Signer {
    current: HmacSha256,
    previous: Option<HmacSha256>,
}

fn keyed(key: &HmacSha256, context: &[u8]) -> HmacSha256 {
    let mut mac = key.clone();
    mac.update(&(context.len() as u64).to_be_bytes());
    mac.update(context);
    mac
}

impl Signer {
    /// The key comes from `SDGATE_AFFINITY_KEY`, else the config's `key_file`;
    /// with neither, a random key (sessions then do not survive a restart nor
    /// span several sdgate replicas, and a warning says so).
    pub fn from_environment(config: &AffinityConfig, service: &str) -> Result<Self> {
        let key = match (std::env::var(KEY_ENV).ok(), &config.key_file) {
            (Some(key), _) if !key.is_empty() => key.into_bytes(),
            (_, Some(path)) => std::fs::read(path).with_context(|| format!("affinity key file {}", path.display()))?,
            _ => {
                tracing::warn!(
                    %service,
                    "no {KEY_ENV} or affinity.key_file: using a random key; sessions will not survive a restart \
                     or span sdgate replicas"
                );
                random_key()?
            }
        };
        let previous = match (std::env::var(PREVIOUS_KEY_ENV).ok(), &config.previous_key_file) {
            (Some(key), _) if !key.is_empty() => Some(key.into_bytes()),
            (_, Some(path)) => {
                Some(std::fs::read(path).with_context(|| format!("affinity key file {}", path.display()))?)
            }
            _ => None,
        };
        Self::new(&key, previous.as_deref())
    }

    pub fn new(key: &[u8], previous: Option<&[u8]>) -> Result<Self> {
        let mac = |key: &[u8]| HmacSha256::new_from_slice(key).map_err(|_| anyhow::anyhow!("bad affinity key"));
        Ok(Self { current: mac(key)?, previous: previous.map(mac).transpose()? })
    }

    /// The signer of one service's cookies: a token signed for one service
    /// does not verify for another.
    pub fn for_service(&self, service: &str) -> Self {
        let context = [b"service:", service.as_bytes()].concat();
        Self {
            current: keyed(&self.current, &context),
            previous: self.previous.as_ref().map(|previous| keyed(previous, &context)),
        }
    }

    /// A token for `id` with no pod, valid until `expires` (unix seconds).
    pub fn sign(&self, id: &SessionId, expires: u64) -> String {
        self.sign_pinned(id, None, expires)
    }

    /// A token for `id` pinned to `pin`, valid until `expires` (unix seconds).
    pub fn sign_pinned(&self, id: &SessionId, pin: Option<EndpointId>, expires: u64) -> String {
        let mut token = [0u8; TOKEN_LEN];
        token[..ID_LEN].copy_from_slice(id);
        token[ID_LEN..ID_LEN + EXPIRY_LEN].copy_from_slice(&expires.to_be_bytes());
        token[ID_LEN + EXPIRY_LEN..SIGNED_LEN].copy_from_slice(&pin.map_or(NO_PIN, |p| p.0).to_be_bytes());
        let mut mac = self.current.clone();
        mac.update(&token[..SIGNED_LEN]);
        token[SIGNED_LEN..].copy_from_slice(&mac.finalize().into_bytes()[..MAC_LEN]);
        hex(&token)
    }

    /// The session a token names, if it is well-formed, signed by the current
    /// or previous key (compared in constant time), and not expired at `now`.
    pub fn verify(&self, token: &str, now: u64) -> Option<SessionId> {
        self.verify_pinned(token, now).map(|(id, _)| id)
    }

    /// [`Signer::verify`], with the pod the token names.
    pub fn verify_pinned(&self, token: &str, now: u64) -> Option<(SessionId, Option<EndpointId>)> {
        let token = unhex::<TOKEN_LEN>(token)?;
        let (signed, tag) = token.split_at(SIGNED_LEN);
        let valid = |key: &HmacSha256| {
            let mut mac = key.clone();
            mac.update(signed);
            mac.verify_truncated_left(tag).is_ok()
        };
        if !valid(&self.current) && !self.previous.as_ref().is_some_and(valid) {
            return None;
        }
        let mut expiry = [0u8; EXPIRY_LEN];
        expiry.copy_from_slice(&signed[ID_LEN..ID_LEN + EXPIRY_LEN]);
        if u64::from_be_bytes(expiry) <= now {
            return None;
        }
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&signed[..ID_LEN]);
        let mut pin = [0u8; PIN_LEN];
        pin.copy_from_slice(&signed[ID_LEN + EXPIRY_LEN..]);
        let pin = Some(u64::from_be_bytes(pin)).filter(|p| *p != NO_PIN).map(EndpointId);
        Some((id, pin))
    }

    /// The session of a caller `auth` named: apart from every session a
    /// client-chosen key can name (another MAC domain).
    pub fn caller_session(&self, name: &str) -> SessionId {
        let mut mac = self.current.clone();
        mac.update(b"caller:");
        mac.update(name.as_bytes());
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&mac.finalize().into_bytes()[..ID_LEN]);
        id
    }

    /// A stable session for a client-chosen key (`X-Session-Key`): the same
    /// key always names the same session, and cannot name another's.
    pub fn session_for_key(&self, key: &[u8]) -> SessionId {
        let mut mac = self.current.clone();
        mac.update(b"session-key:");
        mac.update(key);
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&mac.finalize().into_bytes()[..ID_LEN]);
        id
    }
}

/// One service's affinity: the cookie, the signer and the pin table.
pub struct Affinity {
    pub config: AffinityConfig,
    signer: Signer,
    pub sessions: std::sync::Arc<Sessions>,
}

impl Affinity {
    pub fn new(config: AffinityConfig, signer: Signer) -> Self {
        let sessions = std::sync::Arc::new(Sessions::new(config.max_sessions, config.timeout));
        Self { config, signer, sessions }
    }

    /// The same sessions and key under a reloaded config (its timeout and
    /// `secure` may change).
    pub fn reconfigured(&self, config: AffinityConfig) -> Self {
        self.sessions.set_idle(config.timeout);
        Self { config, signer: self.signer.clone(), sessions: self.sessions.clone() }
    }

    /// The session a request presents: a valid cookie, else a valid token or
    /// key in the session header.
    pub fn presented(&self, headers: &HeaderMap) -> Presented {
        let now = unix_now();
        let mut presented = Presented::Nothing;
        for value in headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()) {
            for cookie in Cookie::split_parse(value).flatten() {
                if cookie.name() == self.config.cookie {
                    match self.signer.verify_pinned(cookie.value(), now) {
                        Some((id, pin)) => return Presented::Valid(id, pin),
                        None => presented = Presented::Invalid,
                    }
                }
            }
        }
        if let Some(header) = &self.config.header {
            if let Some(value) = headers.get(header.as_str()).filter(|v| !v.is_empty()) {
                let text = value.to_str().unwrap_or("");
                let (id, pin) = self
                    .signer
                    .verify_pinned(text, now)
                    .unwrap_or_else(|| (self.signer.session_for_key(value.as_bytes()), None));
                return Presented::Valid(id, pin);
            }
        }
        presented
    }

    /// The one session of a caller `auth` named, whatever cookie it sends:
    /// its pin and its running job are its identity's, not a cookie's.
    pub fn caller_session(&self, name: &str) -> SessionId {
        self.signer.caller_session(name)
    }

    /// A new session id.
    pub fn new_session(&self) -> SessionId {
        let mut id = [0u8; ID_LEN];
        for chunk in id.chunks_mut(8) {
            chunk.copy_from_slice(&fastrand::u64(..).to_le_bytes()[..chunk.len()]);
        }
        id
    }

    /// The `Set-Cookie` value that (re)issues `id`, pinned to `pin`, for
    /// another `timeout`.
    pub fn set_cookie(&self, id: &SessionId, pin: Option<EndpointId>, secure: bool) -> Option<HeaderValue> {
        let timeout = self.config.timeout;
        let token = self.signer.sign_pinned(id, pin, unix_now() + timeout.as_secs());
        let cookie = Cookie::build((self.config.cookie.as_str(), token))
            .path("/")
            .http_only(true)
            .same_site(SameSite::Lax)
            .secure(secure || self.config.secure)
            .max_age(cookie::time::Duration::seconds(i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX)));
        HeaderValue::from_str(&cookie.to_string()).ok()
    }

    /// Removes the affinity cookie from the request the pod will see.
    pub fn strip_cookie(&self, headers: &mut HeaderMap) {
        if !headers.contains_key(header::COOKIE) {
            return;
        }
        let kept: Vec<String> = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .map(str::trim)
            .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some(self.config.cookie.as_str()))
            .map(str::to_string)
            .collect();
        headers.remove(header::COOKIE);
        if !kept.is_empty() {
            if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
                headers.insert(header::COOKIE, value);
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn random_key() -> Result<Vec<u8>> {
    let mut key = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .context("cannot read /dev/urandom for a random affinity key")?;
    Ok(key)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::new(b"current key", Some(b"previous key")).unwrap()
    }

    #[test]
    fn a_signed_token_verifies_until_it_expires() {
        let id = [7u8; ID_LEN];
        let token = signer().sign(&id, 1000);
        assert_eq!(token.len(), TOKEN_LEN * 2);
        assert_eq!(signer().verify(&token, 999), Some(id));
        assert_eq!(signer().verify(&token, 1000), None);
    }

    #[test]
    fn any_flipped_character_breaks_the_token() {
        let token = signer().sign(&[1u8; ID_LEN], u64::MAX);
        for i in 0..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
            assert_eq!(signer().verify(std::str::from_utf8(&bytes).unwrap(), 0), None, "position {i}");
        }
    }

    #[test]
    fn the_previous_key_still_verifies_but_a_foreign_one_does_not() {
        let old = Signer::new(b"previous key", None).unwrap();
        let foreign = Signer::new(b"someone else", None).unwrap();
        let id = [3u8; ID_LEN];
        assert_eq!(signer().verify(&old.sign(&id, u64::MAX), 0), Some(id));
        assert_eq!(signer().verify(&foreign.sign(&id, u64::MAX), 0), None);
    }

    #[test]
    fn the_pin_travels_signed_and_another_service_cannot_use_the_token() {
        let a = signer().for_service("a");
        let token = a.sign_pinned(&[5u8; ID_LEN], Some(EndpointId(42)), u64::MAX);
        assert_eq!(a.verify_pinned(&token, 0), Some(([5u8; ID_LEN], Some(EndpointId(42)))));
        assert_eq!(a.verify_pinned(&a.sign(&[5u8; ID_LEN], u64::MAX), 0), Some(([5u8; ID_LEN], None)));
        assert_eq!(signer().for_service("b").verify(&token, 0), None);
        assert_eq!(signer().verify(&token, 0), None);
        let rotated = Signer::new(b"new key", Some(b"current key")).unwrap().for_service("a");
        assert_eq!(rotated.verify(&token, 0), Some([5u8; ID_LEN]), "the previous key, same service");
    }

    #[test]
    fn garbage_is_not_a_session() {
        for junk in ["", "zz", "not hex at all", &"a".repeat(TOKEN_LEN * 2), &"0".repeat(TOKEN_LEN * 2 + 2)] {
            assert_eq!(signer().verify(junk, 0), None, "{junk:?}");
        }
    }
}
