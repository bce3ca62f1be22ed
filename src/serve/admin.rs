//! The admin listener: `/` (the dashboard page), `/status` (JSON),
//! `/status/history` (the last minutes of the charted figures), `/metrics`,
//! `/healthz`, `/readyz`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::body::{self, ResponseBody};
use crate::observe::status::{History, Status};
use crate::proxy::Proxy;
use crate::serve::{
    out_of_descriptors, AcceptErrors, Activity, ConnectionBudget, Open, Timeouts, Tracked, Watch, Watched,
};

/// Admin connections open at once; more are closed at once (a poller
/// retries). Well above what dashboards and scrapers use.
const MAX_CONNECTIONS: usize = 1024;

/// The dashboard: one self-contained page (no CDN) that starts its charts
/// from `/status/history` and polls `/status`.
const DASHBOARD: &str = include_str!("../observe/dashboard.html");

/// Serves the admin listener until the task is aborted.
///
/// It keeps answering when the process runs out of descriptors: client
/// connections are capped below the limit (see `server`), and this loop
/// holds a reserve descriptor (`/dev/null`) that it gives up to accept an
/// admin connection when an accept fails for want of one; it takes the
/// reserve back once a descriptor is free again. Other failed accepts
/// pause 50 ms and are logged at most once a second.
///
/// Its connections have the proxy's watchdog: a connection with no complete
/// request head within `header_read_timeout`, or idle for `idle_timeout`, is
/// closed, and at most [`MAX_CONNECTIONS`] are open, so silent clients
/// cannot use up the descriptors `/healthz` needs.
///
/// It also runs the [`History`] sampler, which stops with it.
pub(super) async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    draining: Arc<AtomicBool>,
    timeouts: Timeouts,
    key_sha256: Option<String>,
) {
    let key: Option<Arc<[u8]>> = key_sha256.map(|hex| hex.to_ascii_lowercase().into_bytes().into());
    let started = Instant::now();
    let history = Arc::new(History::new(&*proxy));
    let _sampler = AbortOnDrop(tokio::spawn(history.clone().run(proxy.clone())));
    let mut reserve = std::fs::File::open("/dev/null").ok();
    let mut errors = AcceptErrors::new("admin");
    let budget = Arc::new(ConnectionBudget::new(MAX_CONNECTIONS, None));
    // Admin connections are not drained on shutdown: a sender that never
    // says so (kept for as long as the listener runs).
    let (_never, not_draining) = tokio::sync::watch::channel(false);
    loop {
        if reserve.is_none() {
            reserve = std::fs::File::open("/dev/null").ok();
        }
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                let pause = errors.failed(&error);
                if out_of_descriptors(&error) && reserve.take().is_some() {
                    // The reserve's descriptor is free now: take the waiting connection with it.
                    match listener.accept().await {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            if let Some(pause) = errors.failed(&error) {
                                tokio::time::sleep(pause).await;
                            }
                            continue;
                        }
                    }
                } else {
                    if let Some(pause) = pause {
                        tokio::time::sleep(pause).await;
                    }
                    continue;
                }
            }
        };
        if budget.full() {
            drop(stream);
            continue;
        }
        let activity = Arc::new(Activity::new());
        let io = Watched { stream, read: Bytes::new(), activity: activity.clone(), _budget: budget.take() };
        let watch = Watch {
            client,
            activity: activity.clone(),
            early: None,
            draining: not_draining.clone(),
            timeouts,
            cuts: None,
        };
        let proxy = proxy.clone();
        let draining = draining.clone();
        let history = history.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let open = Open::start(&activity, request.version() == http::Version::HTTP_2);
                let response = match key.as_deref() {
                    Some(key) if !allowed(&request, key) => unauthorized(),
                    _ => answer(&request, &proxy, &history, &draining, started),
                };
                async move { Ok::<_, Infallible>(response.map(|body| Tracked::new(body, open))) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = std::pin::pin!(builder.serve_connection(TokioIo::new(io), service));
            watch.serve(connection, |connection| connection.graceful_shutdown()).await;
        });
    }
}

/// Whether a request may see the admin listener with `admin_key_sha256`
/// set: the probes always; the rest with the key (its SHA-256 compared in
/// constant time).
fn allowed(request: &Request<Incoming>, key_hex: &[u8]) -> bool {
    if matches!(request.uri().path(), "/healthz" | "/readyz") {
        return true;
    }
    let presented = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    let Some(presented) = presented else { return false };
    let hash = sha2::Digest::finalize(sha2::Digest::chain_update(<sha2::Sha256 as sha2::Digest>::new(), presented));
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    bool::from(subtle::ConstantTimeEq::ct_eq(hex.as_bytes(), key_hex))
}

fn unauthorized() -> Response<ResponseBody> {
    let mut response =
        crate::error::ProxyError::Unauthorized("the admin listener asks for its key").into_response(None);
    response
        .headers_mut()
        .insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer realm=\"sdgate-admin\""));
    response
}

/// Aborts a task when dropped: the sampler ends with the listener's task.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn answer(
    request: &Request<Incoming>,
    proxy: &Proxy,
    history: &History,
    draining: &AtomicBool,
    started: Instant,
) -> Response<ResponseBody> {
    match request.uri().path() {
        "/" => with_type(Response::new(body::full(dashboard(proxy, history, started))), "text/html; charset=utf-8"),
        "/status" => {
            let status = serde_json::to_vec(&Status::of(proxy, started)).unwrap_or_default();
            with_type(Response::new(body::full(status)), "application/json")
        }
        "/status/history" => {
            let report = serde_json::to_vec(&history.report(Instant::now())).unwrap_or_default();
            with_type(Response::new(body::full(report)), "application/json")
        }
        "/metrics" => {
            with_type(Response::new(body::full(proxy.metrics().render())), "text/plain; version=0.0.4; charset=utf-8")
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if draining.load(Ordering::Relaxed) => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/readyz" if !proxy.is_ready() => text(StatusCode::SERVICE_UNAVAILABLE, "standby\n"),
        "/readyz" if !proxy.is_active() => {
            text(StatusCode::OK, "ready (standby: hands requests to the active replica)\n")
        }
        "/readyz" => text(StatusCode::OK, "ready\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The dashboard page with the state it opens on inlined (/status,
/// /status/history, the server's clock), so its first paint has data.
fn dashboard(proxy: &Proxy, history: &History, started: Instant) -> String {
    let served_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let initial = serde_json::json!({
        "status": Status::of(proxy, started),
        "history": history.report(Instant::now()),
        "served_at": served_at,
    });
    DASHBOARD.replacen("/*INITIAL*/null", &script_json(&initial.to_string()), 1)
}

/// JSON text made safe inside a `<script>` element: `<`, `>` and `&` as
/// `\u003c`, `\u003e`, `\u0026` (so no `</script>`, `<!--` or `<script`
/// can end or change the element: a checkpoint name or a Host is a
/// stranger's text), and U+2028/U+2029 escaped as older engines require.
/// Inside JSON strings these escapes read back as the same characters; they
/// never occur outside strings.
fn script_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

fn text(status: StatusCode, message: &'static str) -> Response<ResponseBody> {
    let mut response = with_type(Response::new(body::full(Bytes::from_static(message.as_bytes()))), "text/plain");
    *response.status_mut() = status;
    response
}

fn with_type(mut response: Response<ResponseBody>, content_type: &'static str) -> Response<ResponseBody> {
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::script_json;

    #[test]
    fn inlined_json_cannot_end_or_change_its_script_element() {
        let hostile = serde_json::json!({ "checkpoint": "<!--<script></script>&\u{2028}\u{2029}>" }).to_string();
        let inlined = script_json(&hostile);
        for bad in ["<", ">", "&", "\u{2028}", "\u{2029}"] {
            assert!(!inlined.contains(bad), "{bad:?} in {inlined}");
        }
        let read: serde_json::Value = serde_json::from_str(&inlined).expect("still JSON");
        assert_eq!(read["checkpoint"], "<!--<script></script>&\u{2028}\u{2029}>", "the same text once read");
    }
}
