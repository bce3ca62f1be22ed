//! Host -> service.
//!
//! The host comes from the `Host` header (HTTP/1.1) or the URI authority
//! (HTTP/2 `:authority`, absolute-form HTTP/1 requests); its port is ignored
//! and it is compared without regard to case. `"*"` names the default service.

use std::collections::HashMap;

use http::Request;

use crate::error::ProxyError;

#[derive(Debug, Default)]
pub struct Router {
    by_host: HashMap<String, usize>,
    default: Option<usize>,
}

impl Router {
    /// `services[i]` lists the host names of service `i`.
    pub fn new<'a>(services: impl IntoIterator<Item = &'a [String]>) -> Self {
        let mut router = Router::default();
        for (index, hosts) in services.into_iter().enumerate() {
            for host in hosts {
                if host == "*" {
                    router.default = Some(index);
                } else {
                    router.by_host.insert(host.to_ascii_lowercase(), index);
                }
            }
        }
        router
    }

    /// The index of the service a request is for.
    pub fn route<B>(&self, request: &Request<B>) -> Result<usize, ProxyError> {
        let host = request_host(request).ok_or(ProxyError::MissingHost)?;
        self.route_host(host)
    }

    pub fn route_host(&self, host: &str) -> Result<usize, ProxyError> {
        let name = strip_port(host);
        let found = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_host.get(&name.to_ascii_lowercase())
        } else {
            self.by_host.get(name)
        };
        found.or(self.default.as_ref()).copied().ok_or_else(|| ProxyError::UnknownHost(name.to_string()))
    }
}

/// The host a request names: the URI authority if present (HTTP/2), else the
/// Host header.
pub fn request_host<B>(request: &Request<B>) -> Option<&str> {
    if let Some(authority) = request.uri().authority() {
        return Some(authority.as_str());
    }
    request.headers().get(http::header::HOST)?.to_str().ok()
}

/// [`request_host`] as a header value, for passing on to the pod (the Host
/// header itself when there is one: no copy).
pub fn request_host_value<B>(request: &Request<B>) -> Option<http::HeaderValue> {
    if let Some(authority) = request.uri().authority() {
        return http::HeaderValue::from_str(authority.as_str()).ok();
    }
    request.headers().get(http::header::HOST).cloned()
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [::1]:8080
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let sd = vec!["Stable-Diffusion.default.example.com".to_string()];
        let other = vec!["other.example.com".to_string(), "*".to_string()];
        Router::new([sd.as_slice(), other.as_slice()])
    }

    fn with_host(host: &str) -> Request<()> {
        Request::builder().header("host", host).body(()).unwrap()
    }

    #[test]
    fn host_matches_without_case_or_port() {
        let router = router();
        assert_eq!(router.route(&with_host("stable-diffusion.default.example.com")).unwrap(), 0);
        assert_eq!(router.route(&with_host("STABLE-diffusion.default.example.com:8080")).unwrap(), 0);
        assert_eq!(router.route(&with_host("other.example.com")).unwrap(), 1);
    }

    #[test]
    fn unknown_host_goes_to_the_default_service() {
        assert_eq!(router().route(&with_host("[::1]:8080")).unwrap(), 1);
    }

    #[test]
    fn unknown_host_without_default_is_404() {
        let sd = vec!["sd".to_string()];
        let router = Router::new([sd.as_slice()]);
        let err = router.route(&with_host("nope:80")).unwrap_err();
        assert!(matches!(err, ProxyError::UnknownHost(ref h) if h == "nope"));
        assert_eq!(err.status(), http::StatusCode::NOT_FOUND);
    }

    #[test]
    fn missing_host_is_400() {
        let err = router().route(&Request::new(())).unwrap_err();
        assert_eq!(err.status(), http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn http2_authority_is_used() {
        let request =
            Request::builder().uri("http://stable-diffusion.default.example.com/sdapi/v1/txt2img").body(()).unwrap();
        assert_eq!(router().route(&request).unwrap(), 0);
    }
}
