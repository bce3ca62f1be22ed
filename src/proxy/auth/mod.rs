//! Who is calling a service with `auth`: an API key of its keys file, a
//! JWT signed by a key of a JWKS ([`jwt`]), or whoever an external
//! forward-auth service names ([`forward`]). The answer is a
//! [`Tenant`]: its name is the caller's identity from then on (fair
//! share, job owner, pin, log, spend), its limits what it may spend.
//!
//! Keys name callers known in advance (their limits in the keys file).
//! Tokens and forward-auth name callers met as they come: each gets the
//! limits of its group (`auth.groups`) or the service's, and one
//! [`Tenant`] kept while it has requests in progress, so `concurrent`
//! counts all of them.

pub mod forward;
pub mod jwt;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, Uri};
use http_body_util::Full;

use super::tenants::{Keys, Tenant, MAX_LABELS};
use crate::config::{AuthConfig, TenantLimits};
use crate::error::{lock, ProxyError};

/// One service's way of telling who calls.
pub struct Auth {
    keys: Option<Keys>,
    jwt: Option<jwt::Jwt>,
    forward: Option<forward::Forward>,
    /// The header a key or token comes in (removed before the pod sees
    /// the request).
    header: HeaderName,
    bearer: bool,
    limits: TenantLimits,
    groups: std::collections::BTreeMap<String, TenantLimits>,
    met: Mutex<Met>,
}

/// Callers named by tokens or forward-auth.
#[derive(Default)]
struct Met {
    by_name: HashMap<String, Arc<Tenant>>,
    labels: HashSet<String>,
}

/// Callers kept while idle; past this, those with nothing in progress are
/// forgotten (their spend is kept by name, in `Usage`).
const MAX_MET: usize = 10_000;

/// The longest identity a token or forward-auth may name.
const MAX_NAME: usize = 128;

/// A request, as auth sees it.
pub struct Asking<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub host: Option<&'a str>,
    pub client: Option<IpAddr>,
    pub secure: bool,
}

impl<'a> Asking<'a> {
    pub fn of<B>(request: &'a http::Request<B>, client: Option<IpAddr>) -> Self {
        Self {
            method: request.method(),
            uri: request.uri(),
            headers: request.headers(),
            host: super::router::request_host(request),
            client,
            secure: request.headers().get("x-forwarded-proto").is_some_and(|v| v == "https"),
        }
    }
}

impl Auth {
    /// A service's `auth`: reads its keys file, checks its URLs.
    pub fn load(config: &AuthConfig) -> Result<Self> {
        // What needs no file or service was checked with the config.
        let keys = config.keys_path().map(|path| Keys::load(&path, config)).transpose()?;
        let jwt = config.jwt.as_ref().map(jwt::Jwt::new).transpose().context("auth.jwt")?;
        let forward = config.forward.as_ref().map(forward::Forward::new).transpose().context("auth.forward")?;
        let header = HeaderName::from_bytes(config.header.to_ascii_lowercase().as_bytes())
            .with_context(|| format!("auth.header: {:?} is not a header name", config.header))?;
        let bearer = header == http::header::AUTHORIZATION;
        Ok(Self {
            keys,
            jwt,
            forward,
            header,
            bearer,
            limits: config.limits.clone(),
            groups: config.groups.clone(),
            met: Mutex::default(),
        })
    }

    /// Who is calling, or why not: 401, the forward-auth service's refusal,
    /// or 503 when the JWKS or the forward-auth service cannot be asked.
    /// With forward-auth, also the `Set-Cookie`s of its 2xx, for the
    /// client's answer (a session it refreshed).
    pub async fn caller(&self, asking: &Asking<'_>) -> Result<Called, ProxyError> {
        if let Some(forward) = &self.forward {
            let allowed = forward.ask(asking).await?;
            let tenant = self.met(allowed.name, &allowed.groups)?;
            return Ok(Called { tenant, set_cookies: allowed.set_cookies });
        }
        let credential = self.credential(asking.headers)?;
        let tenant = match (&self.jwt, &self.keys) {
            (Some(jwt), Some(_)) | (Some(jwt), None) if self.keys.is_none() || jwt::looks_like_jwt(credential) => {
                let (name, groups) = jwt.verify(credential).await?;
                self.met(name, &groups)?
            }
            (_, Some(keys)) => keys.caller(credential)?,
            (_, None) => return Err(ProxyError::Unauthorized("no way in is configured")),
        };
        Ok(Called { tenant, set_cookies: Vec::new() })
    }

    /// The key or token a request carries.
    fn credential<'h>(&self, headers: &'h HeaderMap) -> Result<&'h str, ProxyError> {
        let value = headers.get(&self.header).ok_or(ProxyError::Unauthorized("no API key or token"))?;
        let value = value.to_str().map_err(|_| ProxyError::Unauthorized("a malformed API key or token"))?.trim();
        match self.bearer {
            true => value
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, key)| key.trim())
                .ok_or(ProxyError::Unauthorized("Authorization is not `Bearer <key or token>`")),
            false => Ok(value),
        }
    }

    /// The caller a token or forward-auth named: the one met before, or a
    /// new one with the limits of the first of its `groups` that
    /// `auth.groups` knows (else the service's). A name the keys file
    /// holds is a key's, never a token's.
    fn met(&self, name: String, groups: &[String]) -> Result<Arc<Tenant>, ProxyError> {
        if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
            return Err(ProxyError::Unauthorized("the caller's name is empty, too long or not text"));
        }
        if self.keys.as_ref().is_some_and(|keys| keys.knows(&name)) {
            return Err(ProxyError::Unauthorized("the caller's name is an API key's"));
        }
        let group = groups.iter().find(|g| self.groups.contains_key(*g));
        let limits = group.and_then(|g| self.groups.get(g)).unwrap_or(&self.limits);
        let mut met = lock(&self.met);
        let known = met.by_name.get(&name).cloned();
        if let Some(tenant) = known.as_ref().filter(|t| t.group.as_ref() == group) {
            return Ok(tenant.clone());
        }
        // Its group changed: the same count of requests in progress.
        let active = known.map(|t| t.counter()).unwrap_or_default();
        if met.by_name.len() >= MAX_MET {
            met.by_name.retain(|_, tenant| Arc::strong_count(tenant) > 1);
        }
        let label = match met.labels.len() < MAX_LABELS || met.labels.contains(&name) {
            true => {
                met.labels.insert(name.clone());
                name.clone()
            }
            false => "other".to_string(),
        };
        let tenant = Arc::new(Tenant::new(name.clone(), label, limits.clone(), group.cloned(), active));
        met.by_name.insert(name, tenant.clone());
        Ok(tenant)
    }

    /// The caller of that name, for a job it submitted: a key's (None once
    /// revoked or expired), else, with tokens or forward-auth, the one met,
    /// with the limits of the group it had (its token was checked at
    /// submit).
    pub fn named(&self, name: &str, group: Option<&str>) -> Option<Arc<Tenant>> {
        if let Some(keys) = self.keys.as_ref().filter(|keys| keys.knows(name)) {
            return keys.named(name);
        }
        if self.jwt.is_none() && self.forward.is_none() {
            return None;
        }
        let groups: Vec<String> = group.map(String::from).into_iter().collect();
        self.met(name.to_string(), &groups).ok()
    }

    /// The headers with the credential, which no pod (keys and tokens) or
    /// job store (any) sees: with forward-auth, those shown to it (the
    /// pod of a plain request may need its cookies).
    pub fn credential_headers(&self) -> Vec<&HeaderName> {
        match &self.forward {
            Some(forward) => forward.copied().iter().collect(),
            None => vec![&self.header],
        }
    }

    /// The header removed before the pod sees a request (keys and tokens).
    pub fn header(&self) -> Option<&HeaderName> {
        match self.forward {
            Some(_) => None,
            None => Some(&self.header),
        }
    }
}

/// A caller let in, and cookies for its answer.
pub struct Called {
    pub tenant: Arc<Tenant>,
    pub set_cookies: Vec<http::HeaderValue>,
}

/// The client auth asks the JWKS and forward-auth services with: plain
/// HTTP or HTTPS (the system's roots).
pub(crate) type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// One client for every service's auth, made at first use.
pub(crate) fn client() -> &'static Client {
    static CLIENT: std::sync::OnceLock<Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match builder.with_native_roots() {
            Ok(builder) => builder,
            Err(error) => {
                tracing::warn!(%error, "auth: no system certificates; https JWKS and forward-auth URLs will fail");
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                    tokio_rustls::rustls::ClientConfig::builder()
                        .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                )
            }
        };
        let connector = builder.https_or_http().enable_http1().build();
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build(connector)
    })
}

/// Reads at most `limit` bytes of an answer's body.
pub(crate) async fn read_capped(body: hyper::body::Incoming, limit: usize) -> Result<Bytes, String> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => Err(format!("its answer could not be read ({error})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(keys: &str) -> (Auth, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("sdgate-auth-{}-{}.yaml", std::process::id(), fastrand::u64(..)));
        std::fs::write(&path, keys).unwrap();
        let yaml = format!(
            "keys_file: {}\njwt: {{ jwks_url: \"http://127.0.0.1:1/jwks\", issuer: iss, audience: aud }}\n\
             limits: {{ concurrent: 5 }}\ngroups: {{ free: {{ concurrent: 1 }}, pro: {{ concurrent: 3 }} }}\n",
            path.display()
        );
        let config: AuthConfig = serde_yaml::from_str(&yaml).unwrap();
        (Auth::load(&config).unwrap(), path)
    }

    #[test]
    fn a_token_caller_gets_its_first_known_group_and_keeps_its_count_when_the_group_changes() {
        let (line_key, line) = crate::proxy::tenants::new_key("team-a").unwrap();
        let (auth, path) = auth(&format!("keys:\n{line}\n"));
        let _ = std::fs::remove_file(path);
        let groups = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let alice = auth.met("alice".into(), &groups(&["users", "free"])).unwrap();
        assert_eq!((alice.limits.concurrent, alice.group.as_deref()), (1, Some("free")));
        let usage = crate::proxy::tenants::Usage::default();
        let held = usage.admit("sd", &alice).unwrap();
        // Her group changes: her request in progress still counts.
        let pro = auth.met("alice".into(), &groups(&["pro"])).unwrap();
        assert_eq!(pro.limits.concurrent, 3);
        assert!(Arc::ptr_eq(&pro.counter(), &alice.counter()));
        let bob = auth.met("bob".into(), &[]).unwrap();
        assert_eq!((bob.limits.concurrent, bob.group.as_deref()), (5, None));
        drop(held);
        // A job's run finds her with the group she submitted with.
        assert_eq!(auth.named("alice", Some("free")).unwrap().limits.concurrent, 1);
        // A key's name is never a token's; a revoked key runs nothing.
        assert!(matches!(auth.met("team-a".into(), &[]), Err(ProxyError::Unauthorized(_))));
        assert!(auth.named("team-a", None).is_some());
        assert!(!line.contains(&line_key));
        for bad in [String::new(), "x".repeat(129), "a\nb".into()] {
            assert!(auth.met(bad, &[]).is_err());
        }
    }

    #[test]
    fn callers_met_get_at_most_max_labels_labels() {
        let (auth, path) = auth("keys: []\n");
        let _ = std::fs::remove_file(path);
        for i in 0..MAX_LABELS + 5 {
            let tenant = auth.met(format!("user-{i}"), &[]).unwrap();
            let expected = if i < MAX_LABELS { format!("user-{i}") } else { "other".into() };
            assert_eq!(tenant.label, expected);
        }
        assert_eq!(auth.met("user-0".into(), &[]).unwrap().label, "user-0", "a labelled caller keeps its label");
    }
}
