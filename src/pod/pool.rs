//! The pool of pod connections (see [`Pool`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::ThreadId;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use super::ReplayableBody;
use crate::error::{chain, lock};

/// Pod connections, HTTP/1.1 and kept alive, shared by every thread and by
/// all who talk to pods. It takes the place of hyper-util's legacy client,
/// whose per-request pool work (a hashed key, a boxed connect future,
/// connection info in extensions, an absolute URI) cost about a sixth of a
/// small request's CPU. A connection goes back once its answer has been read
/// in full; one whose answer streams (server-sent events, large or upgraded)
/// is closed at its end instead.
///
/// A connection belongs to its pod, not to a thread. Each thread prefers a
/// connection it opened itself (its driver task runs there, so the request
/// and its connection wake each other without crossing threads: a crossing
/// costs a futex and an eventfd write each way, about a fifth of a small
/// request's CPU). When it has none of its own, it opens one while the pod
/// has fewer open connections than the exchange's budget, and only then
/// takes another thread's. A pod at cc=1 (budget cc + 1) serving one request
/// at a time thus sees at most two connections from sdgate however many
/// serving threads there are; at cc=0 (no budget) each thread keeps its own.
pub struct Pool {
    /// Keyed with foldhash, not SipHash: it is looked up twice per request
    /// and its keys are the pods' addresses, not a client's input.
    idle: Mutex<foldhash::HashMap<SocketAddr, PodConnections>>,
    /// An idle connection older than this is closed, not reused
    /// (`limits.pod_idle_timeout`), in milliseconds.
    idle_timeout_ms: AtomicU64,
}

impl Default for Pool {
    fn default() -> Self {
        Self { idle: Mutex::default(), idle_timeout_ms: AtomicU64::new(DEFAULT_IDLE_TIMEOUT.as_millis() as u64) }
    }
}

#[derive(Default)]
struct PodConnections {
    /// Idle connections, oldest first.
    idle: Vec<Idle>,
    /// Connections open to the pod, idle or busy (each connection's driver
    /// task holds a count until the connection closes).
    open: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts a connection as open until its driver task ends.
struct OpenConnection(Arc<std::sync::atomic::AtomicUsize>);

impl OpenConnection {
    fn new(open: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(open)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Which idle connection a request may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Share {
    /// This thread's, else any thread's (probes, idle checks: rare, and one
    /// connection fewer is worth a crossing).
    Any,
    /// This thread's; another thread's only once the pod has this many
    /// connections open (`container_concurrency` + 1).
    Above(usize),
    /// This thread's only (cc=0: no bound on a pod's requests).
    Never,
}

struct Idle {
    sender: http1::SendRequest<ReplayableBody>,
    since: Instant,
    /// The thread whose runtime drives the connection.
    thread: ThreadId,
}

/// Until the config says (`limits.pod_idle_timeout`).
const DEFAULT_IDLE_TIMEOUT: Duration = crate::config::DEFAULT_POD_IDLE_TIMEOUT;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per pod.
const POOL_MAX_IDLE: usize = 64;

/// Why a request did not get its answer head from a pod.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection to the pod: nothing was sent; the request comes back.
    #[error("{0}")]
    Connect(String, Box<Request<ReplayableBody>>),
    /// The connection failed with the request sent, at least in part.
    #[error("{}", chain(.0))]
    Http(hyper::Error),
}

impl Pool {
    /// The pool every part of sdgate uses: one per process, as a pod's
    /// connections are the pod's whoever sends on them.
    pub fn shared() -> Arc<Pool> {
        static SHARED: OnceLock<Arc<Pool>> = OnceLock::new();
        SHARED.get_or_init(Arc::default).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, foldhash::HashMap<SocketAddr, PodConnections>> {
        lock(&self.idle)
    }

    /// Idle connections older than `timeout` are closed from now on (the
    /// config's `limits.pod_idle_timeout`, applied at start: limits need a restart).
    pub fn set_idle_timeout(&self, timeout: Duration) {
        self.idle_timeout_ms.store(timeout.as_millis().try_into().unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.load(Ordering::Relaxed))
    }

    /// A fresh idle connection to `pod` (the most recently used one this
    /// thread drives, else, as `share` allows, another thread's), or the
    /// pod's open-connection count for the new one to take.
    fn take(&self, pod: SocketAddr, share: Share) -> Result<http1::SendRequest<ReplayableBody>, OpenConnection> {
        let mut pods = self.lock();
        let conns = pods.entry(pod).or_default();
        let list = &mut conns.idle;
        let now = Instant::now();
        let max_idle = self.idle_timeout();
        // Expired or closed ones go first (the oldest are a prefix).
        let stale = list.partition_point(|entry| now.saturating_duration_since(entry.since) >= max_idle);
        list.drain(..stale);
        list.retain(|entry| !entry.sender.is_closed());
        let here = std::thread::current().id();
        let others = match share {
            Share::Any => true,
            Share::Above(budget) => conns.open.load(std::sync::atomic::Ordering::Relaxed) >= budget,
            Share::Never => false,
        };
        let mine = list.iter().rposition(|entry| entry.thread == here);
        match mine.or_else(|| others.then(|| list.len().checked_sub(1)).flatten()) {
            Some(at) => Ok(list.remove(at).sender),
            None => Err(OpenConnection::new(conns.open.clone())),
        }
    }

    /// Keeps a connection whose exchange is over for the next request.
    pub fn put(&self, pod: SocketAddr, sender: http1::SendRequest<ReplayableBody>, thread: ThreadId) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let max_idle = self.idle_timeout();
        let mut pods = self.lock();
        let list = &mut pods.entry(pod).or_default().idle;
        // Oldest first: the expired ones are a prefix (one clock read per
        // put, not one per idle connection).
        let expired = list.partition_point(|entry| now.saturating_duration_since(entry.since) >= max_idle);
        list.drain(..expired);
        if list.len() < POOL_MAX_IDLE {
            list.push(Idle { sender, since: now, thread });
        }
    }

    /// A new connection to `pod`, or why there is none; `open` counts it
    /// until it closes.
    async fn connect(pod: SocketAddr, open: OpenConnection) -> Result<http1::SendRequest<ReplayableBody>, String> {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(pod)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(connect_error(&error)),
            Err(_) => return Err(format!("tcp connect timed out after {CONNECT_TIMEOUT:?}")),
        };
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            http1::handshake(TokioIo::new(stream)).await.map_err(|error| format!("handshake: {}", chain(&error)))?;
        tokio::spawn(async move {
            let _open = open;
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%pod, %error, "pod connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Sends `request` (origin-form) to `pod` on an idle connection `share`
    /// allows, else a new one; a request an idle connection closed before
    /// sending goes on a new one. A request without a Host header gets the
    /// pod's `ip:port`, as the kubelet's HTTP probe sends: HTTP/1.1 requires
    /// one, and the WebUI's server (uvicorn on h11) and aiohttp answer 400
    /// without it. Returns the answer head and its
    /// connection, which the caller [`Pool::put`]s back once it has read the
    /// answer in full (with the thread it was taken on: [`Sent::thread`]).
    pub async fn send(
        &self,
        pod: SocketAddr,
        mut request: Request<ReplayableBody>,
        share: Share,
    ) -> Result<(Response<Incoming>, Sent), SendError> {
        if let header::Entry::Vacant(host) = request.headers_mut().entry(header::HOST) {
            host.insert(authority_of(pod));
        }
        loop {
            let (mut sender, fresh) = match self.take(pod, share) {
                Ok(mut sender) => match sender.ready().await {
                    Ok(()) => (sender, false),
                    Err(_) => continue,
                },
                // Boxed: a new connection is rare (they are kept alive), and
                // its future would otherwise add to every exchange's size.
                Err(open) => match Box::pin(Self::connect(pod, open)).await {
                    Ok(sender) => (sender, true),
                    Err(reason) => return Err(SendError::Connect(reason, Box::new(request))),
                },
            };
            if fresh && sender.ready().await.is_err() {
                return Err(SendError::Connect("the pod closed the connection at once".into(), Box::new(request)));
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, Sent { sender, thread: std::thread::current().id() })),
                Err(mut error) => match error.take_message() {
                    Some(unsent) if !fresh => request = unsent,
                    Some(unsent) => {
                        let reason = format!("closed before sending: {}", chain(error.error()));
                        return Err(SendError::Connect(reason, Box::new(unsent)));
                    }
                    None => return Err(SendError::Http(error.into_error())),
                },
            }
        }
    }
}

/// A connection whose request went out, to give back with [`Pool::put`].
pub struct Sent {
    pub sender: http1::SendRequest<ReplayableBody>,
    /// The thread that sent on it.
    pub thread: ThreadId,
}

impl Sent {
    /// Gives the connection back to `pool` for `pod`'s next request.
    pub fn put_back(self, pool: &Pool, pod: SocketAddr) {
        pool.put(pod, self.sender, self.thread);
    }
}

/// A pod's address as a Host header: `ip:port`, `[v6]:port`.
pub fn authority_of(pod: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&pod.to_string()).unwrap_or_else(|_| HeaderValue::from_static("localhost"))
}

/// A failed connect in a few words: "refused", "connect timed out",
/// "unreachable", or the error.
pub fn connect_error(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused".to_string(),
        std::io::ErrorKind::TimedOut => "connect timed out".to_string(),
        _ => match error.raw_os_error() {
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH) => "unreachable".to_string(),
            _ => error.to_string(),
        },
    }
}
