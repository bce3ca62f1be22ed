//! TLS on the public listener: rustls (TLS 1.2 and 1.3, ALPN `h2` and
//! `http/1.1`), a certificate per set of host names picked by the client's
//! SNI, its PEM files re-read when they change (new connections get the new
//! certificate; open ones keep theirs).
//!
//! A client without SNI, or naming a host no certificate has, is refused in
//! the handshake (an alert, no answer): it never reaches a service. So is
//! anything that is not a TLS 1.2+ handshake (garbage, TLS 1.0), within
//! `limits.header_read_timeout`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::config::{Certificate, TlsConfig};

/// The listener's TLS: the acceptor and its certificates.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    resolver: Arc<Resolver>,
    config: TlsConfig,
}

#[derive(Debug, Default)]
struct Resolver {
    /// Host name (lower case; `*.` for a wildcard) -> its certificate.
    by_host: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        let by_host = self.by_host.read().unwrap_or_else(|p| p.into_inner());
        if let Some(key) = by_host.get(&name) {
            return Some(key.clone());
        }
        let parent = name.split_once('.').map(|(_, rest)| format!("*.{rest}"))?;
        by_host.get(&parent).cloned()
    }
}

/// What a certificate's files looked like when last read.
type Seen = Vec<Option<(SystemTime, u64)>>;

impl Tls {
    pub fn new(config: &TlsConfig) -> Result<Self> {
        let resolver = Arc::new(Resolver::default());
        *resolver.by_host.write().unwrap_or_else(|p| p.into_inner()) = load(config)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("tls: the protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        Ok(Self { acceptor, resolver, config: config.clone() })
    }

    /// Re-reads the certificates whose files changed, every `period`, for
    /// as long as it runs; a file that does not load keeps the old one
    /// (logged).
    pub async fn watch(self: Arc<Self>, period: Duration) {
        let mut seen = seen(&self.config);
        loop {
            tokio::time::sleep(period).await;
            let now = self::seen(&self.config);
            if now == seen {
                continue;
            }
            match load(&self.config) {
                Ok(loaded) => {
                    *self.resolver.by_host.write().unwrap_or_else(|p| p.into_inner()) = loaded;
                    tracing::info!("tls: certificates reloaded");
                    seen = now;
                }
                // A pair mid-rename (the key written, not yet the
                // certificate): tried again at the next look.
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "tls: certificates not reloaded; the old ones stay")
                }
            }
        }
    }
}

fn seen(config: &TlsConfig) -> Seen {
    config
        .certificates
        .iter()
        .flat_map(|c| [&c.cert, &c.key])
        .map(|path| std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

fn load(config: &TlsConfig) -> Result<HashMap<String, Arc<CertifiedKey>>> {
    let provider = rustls::crypto::ring::default_provider();
    let mut by_host = HashMap::new();
    for certificate in &config.certificates {
        let key = certified(certificate, &provider)?;
        for host in &certificate.hosts {
            by_host.insert(host.to_ascii_lowercase(), key.clone());
        }
    }
    Ok(by_host)
}

fn certified(certificate: &Certificate, provider: &rustls::crypto::CryptoProvider) -> Result<Arc<CertifiedKey>> {
    let read =
        |path: &std::path::Path| std::fs::read(path).with_context(|| format!("tls: cannot read {}", path.display()));
    let cert_pem = read(&certificate.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("tls: {} is not PEM certificates", certificate.cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("tls: {} holds no certificate", certificate.cert.display());
    }
    let key_pem = read(&certificate.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("tls: {} is not a PEM private key", certificate.key.display()))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .with_context(|| format!("tls: {} is not a key rustls can sign with", certificate.key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .with_context(|| format!("tls: {} does not match {}", certificate.key.display(), certificate.cert.display()))?;
    Ok(Arc::new(certified))
}

/// The plain-HTTP listener of `tls.redirect_http`: every request gets a 308
/// to the same host and path over https (on `https_port`), with a JSON body.
pub async fn redirect(listener: tokio::net::TcpListener, https_port: u16, header_read: Duration) {
    use http_body_util::BodyExt;
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_read);
    let http1 = Arc::new(http1);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let http1 = http1.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let host = crate::proxy::router::request_host_value(&request)
                    .and_then(|h| h.to_str().ok().map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name).to_string()));
                let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
                let response = match host.filter(|h| !h.is_empty()) {
                    Some(host) => {
                        let port = if https_port == 443 { String::new() } else { format!(":{https_port}") };
                        let location = format!("https://{host}{port}{path}");
                        let body = serde_json::json!({ "error": "this listener only redirects to https", "location": location });
                        let mut response = http::Response::new(crate::body::full(body.to_string()));
                        *response.status_mut() = http::StatusCode::PERMANENT_REDIRECT;
                        if let Ok(value) = http::HeaderValue::from_str(&location) {
                            response.headers_mut().insert(http::header::LOCATION, value);
                        }
                        response
                            .headers_mut()
                            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                        response
                    }
                    None => crate::error::ProxyError::MissingHost.into_response(None),
                };
                async move { Ok::<_, std::convert::Infallible>(response.map(|b| b.boxed_unsync())) }
            });
            let _ = http1.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
        });
    }
}

/// `tls.relay_listen`: the plain-HTTP listener where the active replica
/// takes what a standby hands over (the TLS listener's certificates are
/// for clients' host names, not the pod's address). Only a request with
/// this replica's relay token is served; anything else gets 403. At the
/// drain it stops taking hand-overs and its connections finish what they
/// serve, as the public listener's do (each holds a `drain` receiver).
pub async fn relays(
    listener: tokio::net::TcpListener,
    proxy: Arc<crate::proxy::Proxy>,
    header_read: Duration,
    mut drain: tokio::sync::watch::Receiver<bool>,
) {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_read);
    let http1 = Arc::new(http1);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = async { drain.wait_for(|draining| *draining).await.map(|_| ()) } => return,
        };
        let Ok((stream, addr)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (http1, proxy, mut drain) = (http1.clone(), proxy.clone(), drain.clone());
        tokio::spawn(async move {
            let peer = Arc::new(crate::forward::Peer::new(addr));
            let service = hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
                let (proxy, peer) = (proxy.clone(), peer.clone());
                async move {
                    let ours = request
                        .headers()
                        .get(&crate::proxy::relay::RELAY_TOKEN)
                        .is_some_and(|t| proxy.relay().is_ours(t));
                    let response = if !ours {
                        crate::error::ProxyError::NotARelay.into_response(None)
                    } else {
                        match crate::proxy::router::normalize_host(&mut request) {
                            Ok(()) => proxy.handle(request, peer, None).await,
                            Err(reason) => proxy.bad_host(&mut request, reason),
                        }
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let connection = http1.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = async { drain.wait_for(|draining| *draining).await.map(|_| ()) } => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}
