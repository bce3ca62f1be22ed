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
        let keys = config.keys_path().map(|path| Keys::load(&path, config)).transpose()?;
        if config.forward.is_some() && (config.jwt.is_some() || config.keys_file.is_some()) {
            anyhow::bail!("auth.forward: the forward-auth service decides alone (no keys_file or jwt beside it)");
        }
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
    pub async fn caller(&self, asking: &Asking<'_>) -> Result<Arc<Tenant>, ProxyError> {
        if let Some(forward) = &self.forward {
            let (name, group) = forward.ask(asking).await?;
            return self.met(name, group.as_deref());
        }
        let credential = self.credential(asking.headers)?;
        match (&self.jwt, &self.keys) {
            (Some(jwt), Some(_)) | (Some(jwt), None) if self.keys.is_none() || jwt::looks_like_jwt(credential) => {
                let (name, group) = jwt.verify(credential).await?;
                self.met(name, group.as_deref())
            }
            (_, Some(keys)) => keys.caller(credential),
            (_, None) => Err(ProxyError::Unauthorized("no way in is configured")),
        }
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
    /// new one with its group's limits.
    fn met(&self, name: String, group: Option<&str>) -> Result<Arc<Tenant>, ProxyError> {
        if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
            return Err(ProxyError::Unauthorized("the caller's name is empty, too long or not text"));
        }
        let limits = group.and_then(|g| self.groups.get(g)).unwrap_or(&self.limits);
        let mut met = lock(&self.met);
        if let Some(tenant) = met.by_name.get(&name).filter(|t| t.limits == *limits) {
            return Ok(tenant.clone());
        }
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
        let tenant = Arc::new(Tenant::new(name.clone(), label, limits.clone()));
        met.by_name.insert(name, tenant.clone());
        Ok(tenant)
    }

    /// The caller of that name, for a job it submitted: a key's (None once
    /// revoked or expired), else the one met (its token was checked at
    /// submit).
    pub fn named(&self, name: &str) -> Option<Arc<Tenant>> {
        if let Some(keys) = &self.keys {
            if let Some(tenant) = keys.named(name) {
                return Some(tenant);
            }
        }
        if self.jwt.is_none() && self.forward.is_none() {
            return None;
        }
        if let Some(tenant) = lock(&self.met).by_name.get(name) {
            return Some(tenant.clone());
        }
        self.met(name.to_string(), None).ok()
    }

    /// The header the credential came in, which no pod or store sees (none
    /// with forward-auth: the pod may need its cookies).
    pub fn header(&self) -> Option<&HeaderName> {
        match self.forward {
            Some(_) => None,
            None => Some(&self.header),
        }
    }
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

/// An `http://` or `https://` URL with a host.
pub(crate) fn url(text: &str, what: &str) -> Result<Uri> {
    let uri: Uri = text.parse().with_context(|| format!("{what}: {text:?} is not a URL"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => anyhow::bail!("{what}: {text:?} is not an http:// or https:// URL"),
    }
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
