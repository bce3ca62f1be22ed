//! `auth.forward`: each request is first shown to an external service, as
//! Traefik's ForwardAuth and nginx's `auth_request` do (oauth2-proxy's
//! `/oauth2/auth`, Authelia, a team's own): a `GET` of its URL with the
//! request's credential headers and `X-Forwarded-Method`, `-Proto`,
//! `-Host`, `-Uri` and `-For`. A 2xx lets the request in, its
//! `identity_header` naming the caller; a 3xx or 4xx is the client's answer
//! (sdgate's JSON, with the service's status and its `WWW-Authenticate`,
//! `Location` and `Set-Cookie`); anything else, or no answer within
//! `timeout`, is 503: a request nobody could vouch for never reaches a pod.

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use http_body_util::Full;

use super::Asking;
use crate::config::ForwardAuthConfig;
use crate::error::ProxyError;

pub struct Forward {
    url: Uri,
    copy: Vec<HeaderName>,
    identity: HeaderName,
    group: Option<HeaderName>,
    timeout: std::time::Duration,
}

/// The headers of a refusal passed on to the client.
const PASSED: [HeaderName; 3] = [http::header::WWW_AUTHENTICATE, http::header::LOCATION, http::header::SET_COOKIE];

fn header_name(text: &str, what: &str) -> Result<HeaderName> {
    HeaderName::from_bytes(text.to_ascii_lowercase().as_bytes())
        .with_context(|| format!("{what}: {text:?} is not a header name"))
}

impl Forward {
    pub fn new(config: &ForwardAuthConfig) -> Result<Self> {
        let copy = config.request_headers.iter().map(|h| header_name(h, "request_headers")).collect::<Result<_>>()?;
        Ok(Self {
            url: crate::config::web_url(&config.url).context("url")?,
            copy,
            identity: header_name(&config.identity_header, "identity_header")?,
            group: config.group_header.as_deref().map(|h| header_name(h, "group_header")).transpose()?,
            timeout: config.timeout,
        })
    }

    /// The request headers shown to the service.
    pub fn copied(&self) -> &[HeaderName] {
        &self.copy
    }

    /// Who the service says is calling (and its group), or its refusal.
    pub async fn ask(&self, asking: &Asking<'_>) -> Result<Allowed, ProxyError> {
        let mut request = http::Request::get(self.url.clone())
            .body(Full::new(Bytes::new()))
            .map_err(|e| unavailable(format!("forward-auth: {e}")))?;
        let headers = request.headers_mut();
        for name in &self.copy {
            for value in asking.headers.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let forwarded = [
            ("x-forwarded-method", Some(asking.method.as_str().to_string())),
            ("x-forwarded-proto", Some(if asking.secure { "https" } else { "http" }.to_string())),
            ("x-forwarded-host", asking.host.map(String::from)),
            ("x-forwarded-uri", asking.uri.path_and_query().map(|p| p.as_str().to_string())),
            ("x-forwarded-for", asking.client.map(|ip| ip.to_string())),
        ];
        for (name, value) in forwarded {
            if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
        let answer = tokio::time::timeout(self.timeout, super::client().request(request)).await;
        let response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                return Err(unavailable(format!("forward-auth at {} cannot be reached ({error})", self.url)))
            }
            Err(_) => {
                return Err(unavailable(format!(
                    "forward-auth at {} did not answer within {:?}",
                    self.url, self.timeout
                )))
            }
        };
        let status = response.status();
        let passed = |names: &[HeaderName]| {
            let mut passed = HeaderMap::new();
            for name in names {
                for value in response.headers().get_all(name) {
                    passed.append(name.clone(), value.clone());
                }
            }
            passed
        };
        if status.is_success() {
            let name = text_of(response.headers(), &self.identity).ok_or_else(|| {
                unavailable(format!("forward-auth at {} answered {status} without {}", self.url, self.identity))
            })?;
            let groups = self.group.as_ref().and_then(|g| text_of(response.headers(), g)).into_iter().collect();
            let set_cookies = response.headers().get_all(http::header::SET_COOKIE).iter().cloned().collect();
            return Ok(Allowed { name, groups, set_cookies });
        }
        if status.is_redirection() || status.is_client_error() {
            return Err(ProxyError::Denied(Box::new((status, passed(&PASSED)))));
        }
        Err(unavailable(format!("forward-auth at {} answered {status}", self.url)))
    }
}

/// What the service said of a request it let in.
pub struct Allowed {
    pub name: String,
    pub groups: Vec<String>,
    /// Its `Set-Cookie`s (a session it refreshed), for the client's answer.
    pub set_cookies: Vec<HeaderValue>,
}

/// A 503 that says no more to the client than that (the details, which
/// name internal addresses, are logged).
fn unavailable(why: String) -> ProxyError {
    tracing::warn!(why, "auth.forward: cannot ask");
    ProxyError::AuthUnavailable("the forward-auth service cannot be asked".into())
}

fn text_of(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let text = headers.get(name)?.to_str().ok()?.trim();
    (!text.is_empty()).then(|| text.to_string())
}
