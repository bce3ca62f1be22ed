//! `auth.jwt`: a bearer JWT, signed by a key of the configured JWKS, from
//! `issuer`, for `audience`, not expired: its `identity_claim` names the
//! caller.
//!
//! The JWKS is fetched at first use and again every `refresh` (in the
//! background: requests go on with the keys held); a token whose `kid` is
//! not among them fetches it at once (at most every 10 s), so a key an
//! issuer rotates in is honoured at its first token, and one rotated out
//! is refused after the next fetch. Only asymmetric keys are used (a
//! JWKS is public: an HMAC key there would let anyone sign), and only the
//! algorithms of their kind (or the one a key names); the token's own
//! `jwk`, `jku` or `x5u` are never followed. A token verified once is not
//! verified again until it expires, while its key is in the JWKS (the
//! signature check is most of the cost; clients send one token many times).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::Digest;
use tokio::time::Instant;

use crate::config::JwtConfig;
use crate::error::{lock, ProxyError};

/// A token signed by an unseen key fetches the JWKS at most this often
/// (or every `refresh`, if shorter); a fetch that failed is tried again no
/// sooner either.
const MIN_REFETCH: Duration = Duration::from_secs(10);

/// The whole of a JWKS fetch, answer and body.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest JWKS read.
const MAX_JWKS_BYTES: usize = 1 << 20;

pub struct Jwt {
    inner: Arc<Inner>,
}

struct Inner {
    config: JwtConfig,
    url: Uri,
    state: Mutex<State>,
    /// Tokens verified, by their SHA-256, until they expire.
    verified: Mutex<HashMap<[u8; 32], Verified>>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    keys: Arc<KeySet>,
    /// When the keys held were fetched.
    fetched: Option<Instant>,
    /// When a fetch was last tried.
    tried: Option<Instant>,
    /// A background refresh is under way.
    refreshing: bool,
    /// The SHA-256 of the JWKS document held: when it changes, tokens
    /// verified before are verified again (a kid reused for a new key, a
    /// key without a kid replaced).
    document: Option<[u8; 32]>,
}

/// What a verified token said, kept until it expires (`exp` + leeway,
/// Unix seconds) while its key (`kid`) is in the JWKS.
struct Verified {
    name: String,
    groups: Vec<String>,
    until: i64,
    kid: String,
}

/// Tokens kept verified at most; past it, all are forgotten at once.
const MAX_VERIFIED: usize = 10_000;

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// The JWKS's usable keys, by `kid` (a key without one: `""`).
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Vec<(DecodingKey, Vec<Algorithm>)>>,
}

/// Whether a bearer credential is a JWT rather than an API key: three
/// base64url parts.
pub fn looks_like_jwt(credential: &str) -> bool {
    credential.bytes().filter(|b| *b == b'.').count() == 2
}

impl Jwt {
    pub fn new(config: &JwtConfig) -> Result<Self> {
        // The rest is checked with the config (AuthConfig::validate).
        let url = crate::config::web_url(&config.jwks_url).context("jwks_url")?;
        let inner = Inner {
            config: config.clone(),
            url,
            state: Mutex::default(),
            verified: Mutex::default(),
            fetching: tokio::sync::Mutex::new(()),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The caller a token names, and its groups; or why not (401; 503 when
    /// no keys could ever be fetched).
    pub async fn verify(&self, token: &str) -> Result<(String, Vec<String>), ProxyError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| ProxyError::Unauthorized("a malformed token"))?;
        let kid = header.kid.unwrap_or_default();
        let keys = self.keys_for(&kid).await?;
        let candidates = keys.by_kid.get(&kid).ok_or(ProxyError::Unauthorized("a token signed by an unknown key"))?;
        // A token seen before, signed by a key the JWKS still has, not
        // expired: its signature is not checked again.
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        let now = unix_now();
        if let Some(seen) = lock(&self.inner.verified).get(&digest).filter(|seen| now <= seen.until && seen.kid == kid)
        {
            return Ok((seen.name.clone(), seen.groups.clone()));
        }
        let config = &self.inner.config;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&config.audience);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway.as_secs();
        let mut last = ProxyError::Unauthorized("a token signed with an algorithm its key does not use");
        for (key, _) in candidates.iter().filter(|(_, algorithms)| algorithms.contains(&header.alg)) {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, key, &validation) {
                Ok(data) => {
                    let (name, groups) = self.identity(&data.claims)?;
                    let exp = data.claims.get("exp").and_then(serde_json::Value::as_i64).unwrap_or(0);
                    let until = exp.saturating_add(config.leeway.as_secs() as i64);
                    let mut verified = lock(&self.inner.verified);
                    if verified.len() >= MAX_VERIFIED {
                        verified.clear();
                    }
                    let seen = Verified { name: name.clone(), groups: groups.clone(), until, kid: kid.clone() };
                    verified.insert(digest, seen);
                    return Ok((name, groups));
                }
                Err(error) => last = refusal(error.kind()),
            }
        }
        Err(last)
    }

    fn identity(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(String, Vec<String>), ProxyError> {
        let config = &self.inner.config;
        let name = match claims.get(&config.identity_claim) {
            Some(serde_json::Value::String(name)) => name.clone(),
            Some(serde_json::Value::Number(number)) => number.to_string(),
            _ => return Err(ProxyError::Unauthorized("a token without its identity claim")),
        };
        let groups = match config.group_claim.as_ref().and_then(|claim| claims.get(claim)) {
            Some(serde_json::Value::String(group)) => vec![group.clone()],
            Some(serde_json::Value::Array(groups)) => {
                groups.iter().filter_map(|g| g.as_str().map(String::from)).collect()
            }
            _ => Vec::new(),
        };
        Ok((name, groups))
    }

    /// The keys to check a token of `kid` with: those held (a stale set is
    /// refreshed in the background), else a fetch now.
    async fn keys_for(&self, kid: &str) -> Result<Arc<KeySet>, ProxyError> {
        let now = Instant::now();
        let min_refetch = MIN_REFETCH.min(self.inner.config.refresh);
        let (keys, fresh, may_fetch) = {
            let mut state = lock(&self.inner.state);
            let may_fetch = state.tried.is_none_or(|at| now.duration_since(at) >= min_refetch);
            let stale = state.fetched.is_none_or(|at| now.duration_since(at) >= self.inner.config.refresh);
            if stale && may_fetch && state.fetched.is_some() && !state.refreshing {
                state.refreshing = true;
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    // Cleared however the fetch ends.
                    struct Done(Arc<Inner>);
                    impl Drop for Done {
                        fn drop(&mut self) {
                            lock(&self.0.state).refreshing = false;
                        }
                    }
                    let done = Done(inner);
                    done.0.fetch().await;
                });
            }
            (state.keys.clone(), state.fetched.is_some(), may_fetch)
        };
        if keys.by_kid.contains_key(kid) || !may_fetch {
            return match fresh {
                true => Ok(keys),
                false => Err(ProxyError::AuthUnavailable("the issuer's keys (JWKS) cannot be read".into())),
            };
        }
        self.inner.fetch().await;
        let state = lock(&self.inner.state);
        match state.fetched {
            Some(_) => Ok(state.keys.clone()),
            None => Err(ProxyError::AuthUnavailable("the issuer's keys (JWKS) cannot be read".into())),
        }
    }
}

impl Inner {
    /// Fetches the JWKS once (a caller that waited for another's fetch
    /// does not fetch again); keeps the keys held when it fails.
    async fn fetch(&self) {
        let asked = Instant::now();
        let _one = self.fetching.lock().await;
        if lock(&self.state).tried.is_some_and(|at| at >= asked) {
            return;
        }
        let result = match tokio::time::timeout(FETCH_TIMEOUT, self.get()).await {
            Ok(result) => result,
            Err(_) => Err(format!("not fetched within {FETCH_TIMEOUT:?}")),
        };
        let mut state = lock(&self.state);
        state.tried = Some(Instant::now());
        match result {
            Ok((keys, document)) => {
                if state.document != Some(document) {
                    tracing::info!(url = %self.url, keys = keys.by_kid.values().map(Vec::len).sum::<usize>(), "auth.jwt: JWKS fetched");
                    lock(&self.verified).clear();
                    state.document = Some(document);
                }
                state.keys = Arc::new(keys);
                state.fetched = Some(Instant::now());
            }
            Err(error) => {
                tracing::warn!(url = %self.url, %error, "auth.jwt: cannot fetch the JWKS; the keys held are kept")
            }
        }
    }

    async fn get(&self) -> Result<(KeySet, [u8; 32]), String> {
        let request = http::Request::get(self.url.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = super::client().request(request).await.map_err(|e| format!("{e}"))?;
        if !response.status().is_success() {
            return Err(format!("it answered {}", response.status()));
        }
        let body = super::read_capped(response.into_body(), MAX_JWKS_BYTES).await?;
        Ok((parse_jwks(&body)?, sha2::Sha256::digest(&body).into()))
    }
}

/// The usable keys of a JWKS document; keys sdgate cannot or must not use
/// are skipped.
fn parse_jwks(body: &[u8]) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let document: Document = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut set = KeySet::default();
    for value in document.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else { continue };
        if matches!(jwk.common.public_key_use, Some(ref usage) if *usage != PublicKeyUse::Signature) {
            continue;
        }
        let algorithms = algorithms_of(&jwk);
        if algorithms.is_empty() {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(&jwk) else { continue };
        set.by_kid.entry(jwk.common.key_id.clone().unwrap_or_default()).or_default().push((key, algorithms));
    }
    Ok(set)
}

/// The algorithms a key may verify: the one it names, else those of its
/// kind; none for symmetric keys.
fn algorithms_of(jwk: &Jwk) -> Vec<Algorithm> {
    use Algorithm::*;
    let of_kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => vec![EdDSA],
        AlgorithmParameters::OctetKey(_) | AlgorithmParameters::OctetKeyPair(_) => vec![],
    };
    match &jwk.common.key_algorithm {
        None => of_kind,
        Some(named) => {
            let named = match named {
                KeyAlgorithm::RS256 => RS256,
                KeyAlgorithm::RS384 => RS384,
                KeyAlgorithm::RS512 => RS512,
                KeyAlgorithm::PS256 => PS256,
                KeyAlgorithm::PS384 => PS384,
                KeyAlgorithm::PS512 => PS512,
                KeyAlgorithm::ES256 => ES256,
                KeyAlgorithm::ES384 => ES384,
                KeyAlgorithm::EdDSA => EdDSA,
                _ => return vec![],
            };
            of_kind.into_iter().filter(|a| *a == named).collect()
        }
    }
}

/// Why a token was refused, for the client.
fn refusal(kind: &jsonwebtoken::errors::ErrorKind) -> ProxyError {
    use jsonwebtoken::errors::ErrorKind::*;
    ProxyError::Unauthorized(match kind {
        ExpiredSignature => "an expired token",
        ImmatureSignature => "a token not valid yet",
        InvalidIssuer => "a token from another issuer",
        InvalidAudience => "a token for another audience",
        MissingRequiredClaim(_) => "a token without exp, iss or aud",
        InvalidSignature => "a token whose signature does not verify",
        _ => "an invalid token",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_and_unknown_keys_are_skipped() {
        let jwks = br#"{"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"},
            {"kty": "EC", "crv": "P-256", "kid": "ec",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "XYZ", "kid": "odd"}
        ]}"#;
        let set = parse_jwks(jwks).unwrap();
        assert_eq!(set.by_kid.keys().collect::<Vec<_>>(), vec!["ec"]);
        assert_eq!(set.by_kid["ec"][0].1, vec![Algorithm::ES256]);
    }

    #[test]
    fn a_jwt_is_told_from_a_key_by_its_shape() {
        assert!(looks_like_jwt("eyJ.eyJ.sig"));
        assert!(!looks_like_jwt("sdg_0123abcd"));
    }
}
