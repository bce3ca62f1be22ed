//! Host -> service.
//!
//! The host comes from the `Host` header (HTTP/1.1) or the URI authority
//! (HTTP/2 `:authority`, absolute-form HTTP/1 requests); its port and a
//! trailing dot are ignored and it is compared without regard to case. `"*"`
//! names the default service. [`normalize_host`] runs first: it refuses two
//! Host headers and makes Host agree with an absolute-form target.

use http::Request;

use crate::error::ProxyError;

#[derive(Debug, Default)]
pub struct Router {
    /// foldhash, not SipHash: looked up per request, and its keys come from
    /// the config (a client's host is only looked up, never inserted).
    by_host: foldhash::HashMap<String, usize>,
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
        // `example.com.` (fully qualified) names the same host as `example.com`.
        let name = name.strip_suffix('.').unwrap_or(name);
        let found = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_host.get(&name.to_ascii_lowercase())
        } else {
            self.by_host.get(name)
        };
        found.or(self.default.as_ref()).copied().ok_or_else(|| ProxyError::UnknownHost(name.to_string()))
    }
}

/// Makes a request's host unambiguous before it is routed (RFC 9112 3.2):
/// more than one Host header is refused (the caller answers 400 with the
/// message); a request target with an authority (absolute-form HTTP/1, or
/// HTTP/2 `:authority`) wins over Host, and a Host header that says
/// otherwise is replaced by it, so the pod sees the host the request was
/// routed by (RFC 9112 3.2.2).
pub fn normalize_host<B>(request: &mut Request<B>) -> Result<(), &'static str> {
    let mut hosts = request.headers().get_all(http::header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Err("request has more than one Host header");
    }
    let Some(authority) = request.uri().authority() else { return Ok(()) };
    let host = host_of(authority);
    match request.headers().get(http::header::HOST) {
        // No Host (HTTP/2): the pod gets one made from the authority.
        None => Ok(()),
        Some(value) if value.as_bytes() == host.as_bytes() => Ok(()),
        Some(_) => {
            let value = http::HeaderValue::from_str(host).map_err(|_| "request target has an invalid host")?;
            request.headers_mut().insert(http::header::HOST, value);
            Ok(())
        }
    }
}

/// An authority without its `user@` part: what a Host header would say.
fn host_of(authority: &http::uri::Authority) -> &str {
    let text = authority.as_str();
    text.rsplit_once('@').map_or(text, |(_, host)| host)
}

/// The host a request names: the URI authority if present (HTTP/2), else the
/// Host header.
pub fn request_host<B>(request: &Request<B>) -> Option<&str> {
    if let Some(authority) = request.uri().authority() {
        return Some(host_of(authority));
    }
    request.headers().get(http::header::HOST)?.to_str().ok()
}

/// [`request_host`] as a header value, for passing on to the pod (the Host
/// header itself when there is one: no copy).
pub fn request_host_value<B>(request: &Request<B>) -> Option<http::HeaderValue> {
    if let Some(authority) = request.uri().authority() {
        let host = host_of(authority);
        // After `normalize_host`, the Host header already says it: no copy.
        if let Some(value) = request.headers().get(http::header::HOST).filter(|v| v.as_bytes() == host.as_bytes()) {
            return Some(value.clone());
        }
        return http::HeaderValue::from_str(host).ok();
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
    fn a_trailing_dot_is_ignored() {
        let router = router();
        assert_eq!(router.route(&with_host("stable-diffusion.default.example.com.")).unwrap(), 0);
        assert_eq!(router.route(&with_host("Stable-Diffusion.default.example.com.:8080")).unwrap(), 0);
        let sd = vec!["sd.example.com".to_string()];
        let err = Router::new([sd.as_slice()]).route(&with_host("other.example.com.")).unwrap_err();
        assert!(matches!(err, ProxyError::UnknownHost(ref h) if h == "other.example.com"), "{err:?}");
    }

    #[test]
    fn two_host_headers_are_refused() {
        let mut request =
            Request::builder().header("host", "a.example.com").header("host", "a.example.com").body(()).unwrap();
        assert!(normalize_host(&mut request).is_err());
    }

    #[test]
    fn an_absolute_form_target_wins_over_host_and_host_follows_it() {
        let mut request = Request::builder()
            .uri("http://user@stable-diffusion.default.example.com:8080/sdapi/v1/txt2img")
            .header("host", "other.example.com")
            .body(())
            .unwrap();
        normalize_host(&mut request).unwrap();
        assert_eq!(request.headers()["host"], "stable-diffusion.default.example.com:8080");
        assert_eq!(router().route(&request).unwrap(), 0);
        assert_eq!(request_host_value(&request).unwrap(), "stable-diffusion.default.example.com:8080");
        // Origin-form: Host is left alone.
        let mut request = with_host("other.example.com");
        normalize_host(&mut request).unwrap();
        assert_eq!(request.headers()["host"], "other.example.com");
    }

    #[test]
    fn http2_authority_is_used() {
        let request =
            Request::builder().uri("http://stable-diffusion.default.example.com/sdapi/v1/txt2img").body(()).unwrap();
        assert_eq!(router().route(&request).unwrap(), 0);
    }
}
