//! The listeners: the proxy's, with its client-input limits and graceful
//! shutdown, and the admin one.

pub(crate) mod admin;
pub(crate) mod lobby;
pub mod reload;
pub(crate) mod threads;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::body::ResponseBody;
use crate::config::{Config, Limits, ScaleMode};
use crate::control::autoscale;
use crate::control::leader;
use crate::control::provider;
use crate::forward::Peer;
use crate::observe::metrics::Metrics;
use crate::proxy::router;
use crate::proxy::{self, Proxy};
use crate::serve::threads::ServingThreads;

/// A bound, not yet running gateway.
pub struct Gateway {
    config: Config,
    proxy: Arc<Proxy>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    /// `tls.redirect_http`'s plain listener (bound with the others).
    redirect: Option<TcpListener>,
    /// `tls.relay_listen` (with TLS and leader election): hand-overs.
    relays: Option<TcpListener>,
    /// The control loop, once this replica is active (at once without
    /// leader election).
    control: Option<Control>,
    reloads: (mpsc::Sender<reload::Request>, mpsc::Receiver<reload::Request>),
}

/// The control loop of every service: providers and autoscalers.
struct Control {
    services: Vec<ServiceControl>,
    /// The jobs runner (with `jobs`): its stop signal and task.
    jobs: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    /// The writer of API keys' spend to the jobs store: its stop signal and
    /// task (stopped after the drain, so the drained requests' spend is
    /// written too).
    usage: Option<(watch::Sender<bool>, JoinHandle<()>)>,
}

/// One service's provider (pods and probes) and autoscaler.
struct ServiceControl {
    name: String,
    provider: provider::Running,
    autoscaler: Option<JoinHandle<()>>,
    /// The autoscaler's settings (a reload changes them).
    settings: watch::Sender<autoscale::Settings>,
    desired: watch::Receiver<u32>,
}

impl Control {
    /// Starts each service's provider (endpoints and probes) and autoscaler.
    fn start(proxy: &Arc<Proxy>) -> Result<Self> {
        let services = proxy.services().iter().map(|s| ServiceControl::start(s)).collect::<Result<_>>()?;
        let (jobs, usage) = match proxy.jobs() {
            Some(jobs) => {
                let (stop, stopped) = watch::channel(false);
                let (usage_stop, usage_stopped) = watch::channel(false);
                let usage = tokio::spawn(proxy::tenants::keep_usage(
                    proxy.usage().clone(),
                    jobs.store().clone(),
                    usage_stopped,
                ));
                (Some((stop, tokio::spawn(jobs.clone().run(proxy.clone(), stopped)))), Some((usage_stop, usage)))
            }
            None => (None, None),
        };
        Ok(Control { services, jobs, usage })
    }

    /// Follows a reload: starts new services, gives changed ones their new
    /// autoscaler settings, and retires removed ones once they have
    /// finished their queued and in-flight requests (at most `drain_timeout`).
    fn apply(&mut self, changes: &proxy::Changes, drain_timeout: Duration) -> Result<()> {
        for service in &changes.changed {
            if let Some(control) = self.services.iter().find(|c| c.name == service.config.name) {
                control.settings.send_replace(settings_of(service));
            }
        }
        for service in &changes.removed {
            if let Some(at) = self.services.iter().position(|c| c.name == service.config.name) {
                tokio::spawn(self.services.remove(at).retire(service.clone(), drain_timeout));
            }
        }
        for service in &changes.added {
            self.services.push(ServiceControl::start(service)?);
        }
        Ok(())
    }

    /// Stops the jobs runner: waiting jobs go back to the store, running
    /// ones may finish until `deadline`.
    async fn stop_jobs(&mut self, proxy: &Proxy, deadline: tokio::time::Instant) {
        if let (Some((stop, task)), Some(jobs)) = (self.jobs.take(), proxy.jobs()) {
            stop.send_replace(true);
            jobs.stop(deadline).await;
            // The runner stops at its next await (a store call is bounded);
            // anything it dispatched meanwhile goes too.
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task).await.is_err() {
                abort.abort();
            }
            jobs.stop(tokio::time::Instant::now()).await;
        }
    }

    /// The last write of API keys' spend (after the drain).
    async fn stop_usage(&mut self) {
        if let Some((stop, usage)) = self.usage.take() {
            stop.send_replace(true);
            let abort = usage.abort_handle();
            if tokio::time::timeout(Duration::from_secs(15), usage).await.is_err() {
                abort.abort();
            }
        }
    }

    async fn stop(self) {
        for service in self.services {
            service.stop().await;
        }
    }
}

fn settings_of(service: &proxy::Service) -> autoscale::Settings {
    autoscale::Settings::new(&service.config.scale, service.config.container_concurrency)
}

impl ServiceControl {
    fn start(service: &proxy::Service) -> Result<Self> {
        let (desired_tx, desired) = watch::channel(service.config.scale.min);
        let endpoints = provider::Endpoints::new(service.gate.clone())
            .with_sessions(service.affinity.as_ref().map(|a| a.sessions.clone()));
        let provider = provider::start(&service.config, endpoints, desired.clone())?;
        let (settings, settings_rx) = watch::channel(settings_of(service));
        let autoscaler = (service.config.scale.mode == ScaleMode::Builtin).then(|| {
            tokio::spawn(autoscale::run(
                service.config.name.clone(),
                service.gate.clone(),
                service.metrics.clone(),
                settings_rx,
                service.config.scale.tick,
                desired_tx,
            ))
        });
        Ok(Self { name: service.config.name.clone(), provider, autoscaler, settings, desired })
    }

    /// A service removed by a reload: it takes no new requests; once its
    /// queue and in-flight requests are done (or `drain_timeout` passed), its
    /// pods and autoscaler stop.
    async fn retire(self, service: Arc<proxy::Service>, drain_timeout: Duration) {
        let deadline = tokio::time::Instant::now() + drain_timeout;
        let busy = || service.gate.inspect(|g| g.queue_depth() > 0 || g.inflight() > 0);
        while busy() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::info!(service = %self.name, unfinished = busy(), "removed service retired");
        self.stop().await;
    }

    async fn stop(self) {
        if let Some(task) = self.autoscaler {
            task.abort();
        }
        self.provider.shutdown().await;
    }
}

impl Gateway {
    /// Binds the listeners and, unless leader election decides, starts the
    /// providers (endpoints and probes) and autoscalers.
    pub async fn bind(config: Config) -> Result<Self> {
        crate::pod::Pool::shared().set_idle_timeout(config.limits.pod_idle_timeout);
        let proxy = Arc::new(Proxy::new(&config, Metrics::new())?);
        if let Some(jobs) = &config.jobs {
            proxy.set_jobs(crate::jobs::Jobs::open(jobs, proxy.metrics()).await?);
        }
        let listener =
            TcpListener::bind(config.listen).await.with_context(|| format!("listen: cannot bind {}", config.listen))?;
        let admin = match config.admin {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("admin: cannot bind {addr}"))?),
            None => None,
        };
        let redirect = match config.tls.as_ref().and_then(|tls| tls.redirect_http) {
            Some(addr) => {
                Some(TcpListener::bind(addr).await.with_context(|| format!("tls.redirect_http: cannot bind {addr}"))?)
            }
            None => None,
        };
        // A standby cannot hand requests over on the TLS listener (its
        // certificate is for clients): the active one takes them on a plain
        // listener of their own.
        let relays = match (config.tls.as_ref(), config.election()) {
            (Some(tls), Some(_)) => Some(
                TcpListener::bind(tls.relay_listen)
                    .await
                    .with_context(|| format!("tls.relay_listen: cannot bind {}", tls.relay_listen))?,
            ),
            _ => None,
        };
        let control = match config.election() {
            None => Some(Control::start(&proxy)?),
            Some(_) => None,
        };
        Ok(Self { config, proxy, listener, admin, redirect, relays, control, reloads: mpsc::channel(4) })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The desired replica count of service `index`, as its provider sees
    /// it (each change is a scale call).
    pub fn desired(&self, index: usize) -> Option<watch::Receiver<u32>> {
        self.control.as_ref().and_then(|c| c.services.get(index)).map(|c| c.desired.clone())
    }

    /// Hands new configs to this gateway once it runs (see [`reload`]).
    pub fn reloader(&self) -> reload::Reloader {
        reload::Reloader { tx: self.reloads.0.clone() }
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Serves until `shutdown` completes, then stops accepting and lets queued
    /// and in-flight requests finish, at most `drain_timeout`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        self.run_until(async {
            shutdown.await;
            Stop::Now
        })
        .await
    }

    /// [`Gateway::run`] until `stop` says how to stop: at once, or (SIGTERM)
    /// after `shutdown_delay` of serving as before while `/readyz` answers
    /// 503, so that load balancers stop sending first.
    pub async fn run_until(self, stop: impl Future<Output = Stop>) -> Result<()> {
        let shutdown = stop;
        let Gateway {
            mut config,
            proxy,
            listener,
            admin,
            redirect: plain,
            relays,
            mut control,
            reloads: (reload_tx, mut reload_rx),
        } = self;
        drop(reload_tx);
        tracing::info!(
            listen = %listener.local_addr()?,
            admin = admin.as_ref().and_then(|a| a.local_addr().ok()).map(|a| a.to_string()).unwrap_or_default(),
            "sdgate listening"
        );
        let mut threads = ServingThreads::start(threads::count(config.threads))?;
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let admin_timeouts = Timeouts::of(&config.limits);
        let admin_task = admin.map(|admin| {
            let key = config.admin_key_sha256.clone();
            tokio::spawn(admin::serve(admin, proxy.clone(), draining.clone(), admin_timeouts, key))
        });

        // Shared, not copied into every connection's state.
        let mut builders = Builders::new(&config.limits);
        let mut tls_watch = None;
        let mut redirect = None;
        if let Some(tls) = &config.tls {
            if let Some(plain) = plain {
                let port = match tls.https_port {
                    Some(port) => port,
                    None => listener.local_addr()?.port(),
                };
                redirect = Some(tokio::spawn(tls::redirect(plain, port, config.limits.header_read_timeout)));
            }
            let tls = Arc::new(tls::Tls::new(tls)?);
            tls_watch = Some(tokio::spawn(tls.clone().watch(Duration::from_secs(1))));
            builders.tls = Some(tls);
        }
        let builder = Arc::new(builders);
        let timeouts = Timeouts::of(&config.limits);
        let budget =
            Arc::new(ConnectionBudget::new(max_client_connections(), Some(proxy.metrics().client_connections())));
        let mut accept_errors = AcceptErrors::new("listen");
        let mut at_limit_logged: Option<tokio::time::Instant> = None;
        // Told to every connection when the gateway shuts down; the drain is
        // over when they have all dropped their receiver (hyper-util's
        // `GracefulShutdown` cannot wait for a request still in the lobby).
        let (drain, drain_rx) = watch::channel(false);
        tokio::pin!(shutdown);
        let (active_tx, mut active) = watch::channel(control.is_some());
        // Where this replica serves, for standbys to hand requests to: the
        // pod's IP (POD_IP) and the listen port, else the listen address.
        let relay_addr = match &relays {
            Some(relays) => relays.local_addr()?,
            None => listener.local_addr()?,
        };
        let me = leader::Advertised { addr: advertised(relay_addr), token: proxy.relay().token().to_string() };
        let relay_task = relays.map(|relays| {
            tracing::info!(relay = %relay_addr, "taking hand-overs from standbys here (tls.relay_listen)");
            tokio::spawn(tls::relays(relays, proxy.clone(), config.limits.header_read_timeout, drain_rx.clone()))
        });
        let (holder_tx, mut holder) = watch::channel(None);
        let mut election =
            config.election().cloned().map(|election| tokio::spawn(leader::run(election, active_tx, me, holder_tx)));
        let mut lost: Option<anyhow::Error> = None;
        // Set by a delayed stop: when to stop accepting.
        let mut stop_at: Option<tokio::time::Instant> = None;
        let mut accepted_to =
            AcceptedTo { threads: &mut threads, proxy: &proxy, builder: &builder, drain: &drain_rx, timeouts };
        loop {
            tokio::select! {
                _ = async { match stop_at { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => break,
                changed = holder.changed(), if election.is_some() => {
                    if changed.is_ok() {
                        let target = holder.borrow_and_update().clone().map(|h| (h.addr, h.token));
                        if let Some((addr, _)) = &target {
                            tracing::info!(active = %addr, "standby: handing requests to the active replica");
                        }
                        proxy.relay().set_target(target);
                    }
                }
                changed = active.changed(), if control.is_none() => {
                    if changed.is_ok() && *active.borrow_and_update() {
                        control = Some(Control::start(&proxy)?);
                        proxy.set_active(true);
                    }
                }
                ended = async { match &mut election { Some(task) => task.await, None => std::future::pending().await } } => {
                    // Lost the lease: stop dispatching now; the process exits
                    // and comes back as a standby. Its jobs are left to the
                    // new active replica (running ones count as lost).
                    proxy.set_active(false);
                    if let Some(control) = control.as_mut() {
                        control.stop_jobs(&proxy, tokio::time::Instant::now()).await;
                        control.stop_usage().await;
                    }
                    lost = Some(match ended {
                        Ok(Err(error)) => error,
                        Ok(Ok(())) => anyhow::anyhow!("leader election ended"),
                        Err(error) => anyhow::anyhow!("leader election failed: {error}"),
                    });
                    break;
                }
                // At the connection limit: new clients wait in the listen
                // backlog until one of the open connections closes.
                _ = budget.freed.notified(), if budget.full() => {}
                accepted = listener.accept(), if !budget.full() => {
                    let (stream, client) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            if let Some(pause) = accept_errors.failed(&error) {
                                tokio::time::sleep(pause).await;
                            }
                            continue;
                        }
                    };
                    if budget.full() && at_limit_logged.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(1)) {
                        at_limit_logged = Some(tokio::time::Instant::now());
                        tracing::warn!(limit = budget.max, "client connections at their limit (descriptors kept for pods and the admin listener); new ones wait");
                    }
                    spawn_connection(stream, client, budget.take(), &mut accepted_to);
                }
                Some(request) = reload_rx.recv() => {
                    let result = apply_reload(&mut config, request.config, &proxy, control.as_mut());
                    if let Err(error) = &result {
                        tracing::error!(%error, "config reload refused; the old config stays in force");
                    }
                    let _ = request.done.send(result);
                }
                stop = &mut shutdown, if stop_at.is_none() => {
                    if stop == Stop::Now || config.shutdown_delay.is_zero() {
                        break;
                    }
                    // Not ready any more, still serving: clients that follow
                    // readiness move away before the listener closes.
                    draining.store(true, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(delay = ?config.shutdown_delay, "shutting down: /readyz says 503, serving on for shutdown_delay");
                    stop_at = Some(tokio::time::Instant::now() + config.shutdown_delay);
                }
            }
        }
        // Connections the kernel completed before the listener closes would
        // be reset unread: they are served like the others (one arriving
        // after this last look is refused, and a client may retry that).
        if lost.is_none() {
            while let Some(Ok((stream, client))) = futures_util::FutureExt::now_or_never(listener.accept()) {
                spawn_connection(stream, client, budget.take(), &mut accepted_to);
            }
        }
        drop(listener);
        drop(drain_rx);
        draining.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(error) = lost {
            return Err(error);
        }
        tracing::info!(timeout = ?config.drain_timeout, "shutting down: draining requests");
        drain.send_replace(true);
        let drained = async {
            tokio::select! {
                _ = drain.closed() => tracing::info!("drained"),
                _ = tokio::time::sleep(config.drain_timeout) => tracing::warn!("drain timeout reached; exiting with requests still open"),
            }
        };
        // Jobs stop with the connections: no new ones start, running ones
        // may finish within the same drain_timeout.
        let jobs_deadline = tokio::time::Instant::now() + config.drain_timeout;
        match control.as_mut() {
            Some(control) => {
                tokio::join!(drained, control.stop_jobs(&proxy, jobs_deadline));
                control.stop_usage().await;
            }
            None => drained.await,
        }
        if let Some(task) = admin_task {
            task.abort();
        }
        for task in [tls_watch, redirect, relay_task].into_iter().flatten() {
            task.abort();
        }
        threads.stop().await;
        if let Some(task) = election {
            task.abort();
        }
        let was_active = control.is_some();
        if let Some(control) = control {
            control.stop().await;
        }
        if let (Some(election), true) = (config.election(), was_active) {
            leader::release(election).await;
        }
        Ok(())
    }
}

/// Puts `next` in force, or says why not (the old config then stays):
/// see [`Config::reload_refusal`] and [`Proxy::reload`].
fn apply_reload(
    config: &mut Config,
    next: Result<Config, String>,
    proxy: &Proxy,
    control: Option<&mut Control>,
) -> Result<(), String> {
    let applied = next.and_then(|next| {
        if let Some(why) = config.reload_refusal(&next) {
            return Err(why);
        }
        let changes = proxy.reload(&next).map_err(|error| format!("{error:#}"))?;
        if let Some(control) = control {
            control.apply(&changes, next.drain_timeout).map_err(|error| format!("{error:#}"))?;
        }
        let names = |services: &[Arc<proxy::Service>]| {
            services.iter().map(|s| s.config.name.as_str()).collect::<Vec<_>>().join(",")
        };
        tracing::info!(
            added = names(&changes.added),
            changed = names(&changes.changed),
            removed = names(&changes.removed),
            routes = next.routes.len(),
            "config reloaded"
        );
        *config = next;
        Ok(())
    });
    proxy.record_reload(applied.as_ref().err().cloned());
    applied
}

/// An accepted client connection on its way to a serving thread.
struct Connection {
    stream: std::net::TcpStream,
    client: SocketAddr,
    budget: BudgetSlot,
    timeouts: Timeouts,
}

/// Serves one client connection, on the serving thread it was handed to:
/// its first request in the lobby (see [`lobby`]), then hyper. Closes it
/// when it has been silent too long: no complete request head within
/// `header_read_timeout` of connecting (or of the first byte of a later
/// request head, HTTP/1), or no request in progress for `idle_timeout`.
async fn serve_connection(
    connection: Connection,
    proxy: Arc<Proxy>,
    builder: Arc<Builders>,
    mut draining: watch::Receiver<bool>,
) {
    let Connection { stream, client, budget, timeouts } = connection;
    let stream = match TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(error) => return tracing::warn!(%error, %client, "cannot register the connection"),
    };
    if let Some(tls) = builder.tls.clone() {
        return serve_tls(stream, client, budget, timeouts, tls, proxy, builder, draining).await;
    }
    let limits = lobby::Limits {
        head_deadline: tokio::time::Instant::now() + timeouts.header_read,
        body_read_timeout: timeouts.body_read,
        max_header_bytes: timeouts.max_header_bytes,
    };
    let (read, early, http1) = match lobby::first_request(&stream, &proxy, limits, &mut draining).await {
        lobby::Outcome::Close(reason) => {
            if reason.ends_with("within header_read_timeout") {
                proxy.metrics().connections_closed().with_label_values(&["header_read_timeout"]).inc();
            }
            return tracing::debug!(%client, reason, "closing the connection");
        }
        lobby::Outcome::Serve { read, early, http1 } => (read, early, http1),
    };
    // Boxed, so that a connection waiting in the lobby does not carry the
    // size of hyper's part.
    let activity = Arc::new(Activity::new());
    activity.fd.store(std::os::fd::AsRawFd::as_raw_fd(&stream), Ordering::Relaxed);
    let io = Watched { stream, read, activity, _budget: budget };
    let activity = io.activity.clone();
    Box::pin(serve_http(io, activity, client, proxy, builder, draining, timeouts, early, http1, false)).await
}

/// Where an accepted connection goes: a serving thread, with what it needs.
struct AcceptedTo<'a> {
    threads: &'a mut ServingThreads,
    proxy: &'a Arc<Proxy>,
    builder: &'a Arc<Builders>,
    drain: &'a watch::Receiver<bool>,
    timeouts: Timeouts,
}

/// Moves an accepted connection to a serving thread's runtime.
fn spawn_connection(stream: TcpStream, client: SocketAddr, budget: BudgetSlot, to: &mut AcceptedTo<'_>) {
    let _ = stream.set_nodelay(true);
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(error) => return tracing::warn!(%error, %client, "cannot hand the connection over"),
    };
    let connection = Connection { stream, client, budget, timeouts: to.timeouts };
    to.threads.next_runtime().spawn(serve_connection(
        connection,
        to.proxy.clone(),
        to.builder.clone(),
        to.drain.clone(),
    ));
}

/// A TLS connection: the handshake within `header_read_timeout`, then
/// hyper on the decrypted stream (no lobby: it reads plain HTTP), HTTP/2 or
/// HTTP/1.1 as ALPN said. Its requests say `X-Forwarded-Proto: https`.
#[allow(clippy::too_many_arguments)]
async fn serve_tls(
    stream: TcpStream,
    client: SocketAddr,
    budget: BudgetSlot,
    timeouts: Timeouts,
    tls: Arc<tls::Tls>,
    proxy: Arc<Proxy>,
    builder: Arc<Builders>,
    draining: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    activity.fd.store(std::os::fd::AsRawFd::as_raw_fd(&stream), Ordering::Relaxed);
    let io = Watched { stream, read: bytes::Bytes::new(), activity: activity.clone(), _budget: budget };
    let accepted = tokio::time::timeout(timeouts.header_read, tls.acceptor.accept(io)).await;
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return tracing::debug!(%client, %error, "TLS handshake refused"),
        Err(_) => {
            proxy.metrics().connections_closed().with_label_values(&["header_read_timeout"]).inc();
            return tracing::debug!(%client, "no TLS handshake within header_read_timeout");
        }
    };
    let http1 = stream.get_ref().1.alpn_protocol() == Some(b"http/1.1");
    Box::pin(serve_http(stream, activity, client, proxy, builder, draining, timeouts, None, http1, true)).await
}

/// hyper's connection settings: HTTP/1 alone, for a connection the lobby
/// saw speak it, and both versions (told apart by the first bytes).
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    auto: auto::Builder<TokioExecutor>,
    /// TLS on the listener (`tls`).
    tls: Option<Arc<tls::Tls>>,
}

impl Builders {
    fn new(limits: &Limits) -> Self {
        let max_buf_size = limits.max_header_bytes.max(8192) + 16 * 1024;
        // The header and idle timeouts are kept by each connection's
        // watchdog (see `serve_connection`): hyper's own header timeout does
        // not cover a connection that never sends a byte (the auto builder
        // waits for the first bytes before hyper sees the connection), and
        // it would close an idle keep-alive connection after
        // `header_read_timeout` rather than `idle_timeout`.
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1.timer(TokioTimer::new()).header_read_timeout(None).max_buf_size(max_buf_size);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1().timer(TokioTimer::new()).header_read_timeout(None).max_buf_size(max_buf_size);
        Self { http1, auto, tls: None }
    }
}

/// hyper's part of a connection, with the watchdog and graceful shutdown.
/// A connection known to speak HTTP/1 skips hyper-util's version detection
/// (and the rewinding reader it puts under hyper).
#[allow(clippy::too_many_arguments)]
async fn serve_http<I>(
    io: I,
    activity: Arc<Activity>,
    client: SocketAddr,
    proxy: Arc<Proxy>,
    builder: Arc<Builders>,
    draining: watch::Receiver<bool>,
    timeouts: Timeouts,
    early: Option<proxy::Early>,
    http1: bool,
    https: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cuts = Some(proxy.metrics().connections_closed());
    let peer = Arc::new(Peer::new(client));
    let early = early.map(|early| {
        Arc::new(EarlyCell { early: std::sync::Mutex::new(Some(early)), taken: tokio::sync::Notify::new() })
    });
    let (service_activity, service_early) = (activity.clone(), early.clone());
    let service = service_fn(move |mut request: Request<Incoming>| {
        let (proxy, peer) = (proxy.clone(), peer.clone());
        let open = Open::start(&service_activity, request.version() == http::Version::HTTP_2);
        // hyper reads the lobby's request first: it takes what the lobby did.
        let early = service_early.as_ref().and_then(|cell| cell.take());
        if https {
            // Said by sdgate, which decrypted it: never the client's word.
            request.headers_mut().insert("x-forwarded-proto", http::HeaderValue::from_static("https"));
            request.extensions_mut().insert(crate::proxy::ViaTls);
        }
        async move {
            let response = match router::normalize_host(&mut request) {
                Ok(()) => proxy.handle(request, peer, early).await,
                Err(reason) => proxy.bad_host(&mut request, reason),
            };
            Ok::<_, Infallible>(response.map(|body| Tracked::new(body, open)))
        }
    });
    let watch = Watch { client, activity, early, draining, timeouts, cuts };
    // Pinned here, not inside `Watch::serve`: an async fn keeps its
    // arguments for its whole life, so hyper's connection would be held twice.
    if http1 {
        let connection = std::pin::pin!(builder.http1.serve_connection(TokioIo::new(io), service).with_upgrades());
        watch.serve(connection, |connection| connection.graceful_shutdown()).await
    } else {
        let connection = std::pin::pin!(builder.auto.serve_connection_with_upgrades(TokioIo::new(io), service));
        watch.serve(connection, |connection| connection.graceful_shutdown()).await
    }
}

/// What watches a connection hyper serves.
struct Watch {
    client: SocketAddr,
    activity: Arc<Activity>,
    early: Option<Arc<EarlyCell>>,
    draining: watch::Receiver<bool>,
    timeouts: Timeouts,
    /// `sdgate_client_connections_closed_total` (the public listener's).
    cuts: Option<prometheus::IntCounterVec>,
}

impl Watch {
    /// Runs `connection` to its end, or until it has been silent too long;
    /// `shutdown` starts its graceful shutdown.
    async fn serve<C, E>(self, mut connection: Pin<&mut C>, shutdown: impl Fn(Pin<&mut C>))
    where
        C: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let Watch { client, activity, early, mut draining, timeouts, cuts } = self;
        let mut wake = match activity.check(timeouts) {
            Ok(wake) => wake,
            Err(_) => return,
        };
        // Shutdown was asked before hyper read the lobby's request: hyper's
        // graceful shutdown would close the connection unread, so it waits.
        let (mut shutting_down, mut shutdown_deferred) = (false, false);
        loop {
            tokio::select! {
                biased;
                ended = &mut connection => {
                    if let Err(error) = ended {
                        tracing::debug!(%error, %client, "connection ended with an error");
                    }
                    return;
                }
                _ = draining.wait_for(|draining| *draining), if !shutting_down => {
                    shutting_down = true;
                    if early.as_ref().is_some_and(|cell| !cell.is_taken()) {
                        shutdown_deferred = true;
                    } else {
                        shutdown(connection.as_mut());
                    }
                }
                _ = async { if let Some(cell) = &early { cell.taken.notified().await } }, if shutdown_deferred => {
                    shutdown_deferred = false;
                    shutdown(connection.as_mut());
                }
                _ = async { tokio::select! { _ = tokio::time::sleep_until(wake) => {}, _ = activity.wake.notified() => {} } } => match activity.check(timeouts) {
                    Ok(next) => wake = next,
                    Err(cut) => {
                        if let Some(cuts) = &cuts {
                            cuts.with_label_values(&[cut.label()]).inc();
                        }
                        // Dropping the connection closes the socket.
                        return tracing::debug!(%client, reason = cut.reason(), "closing a silent connection");
                    }
                },
            }
        }
    }
}

/// The lobby's request of a connection, until hyper reads it.
struct EarlyCell {
    early: std::sync::Mutex<Option<proxy::Early>>,
    /// Told when hyper has read it.
    taken: tokio::sync::Notify,
}

impl EarlyCell {
    fn take(&self) -> Option<proxy::Early> {
        let early = self.early.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if early.is_some() {
            self.taken.notify_one();
        }
        early
    }

    fn is_taken(&self) -> bool {
        self.early.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).is_none()
    }
}

/// The connection limits of `limits`.
#[derive(Clone, Copy)]
struct Timeouts {
    header_read: Duration,
    idle: Duration,
    send: Duration,
    body_read: Duration,
    max_header_bytes: usize,
}

impl Timeouts {
    fn of(limits: &Limits) -> Self {
        Self {
            header_read: limits.header_read_timeout,
            idle: limits.idle_timeout,
            send: limits.send_timeout,
            body_read: limits.body_read_timeout,
            max_header_bytes: limits.max_header_bytes,
        }
    }
}

/// No head being read (a `u64` millisecond field's "none").
const NONE: u64 = u64::MAX;

/// What a connection's watchdog knows of it. Times are milliseconds since
/// `epoch` (when it was accepted).
struct Activity {
    epoch: tokio::time::Instant,
    /// Requests whose answer has not been sent in full (or given up).
    open: AtomicUsize,
    /// A request has arrived on this connection.
    served: AtomicBool,
    /// The connection speaks HTTP/2 (its reads are not request heads).
    http2: AtomicBool,
    /// When the last request finished.
    idle_since: AtomicU64,
    /// HTTP/1, no request open: when the first byte of the next head came.
    head_since: AtomicU64,
    /// Answers that gave hyper a frame it has not yet taken the next one
    /// after (hyper is writing it, or the client is not reading).
    sending: AtomicUsize,
    /// Frames hyper has taken, over all answers (no clock read per frame:
    /// the watchdog notices when this stops moving).
    frames: AtomicU64,
    /// The watchdog's: `frames` when it last saw it move, and when.
    frames_seen: AtomicU64,
    frames_moved_at: AtomicU64,
    /// Answers whose head hyper has (their body is being sent).
    answering: AtomicUsize,
    /// When the socket first refused a write since it last took bytes.
    write_blocked_since: AtomicU64,
    /// Bytes the kernel held unacknowledged when that spell began (a
    /// client reading slowly drains them between two of tokio's retries).
    queued_at_block: AtomicU64,
    /// Successful writes (progress, counted without a clock read).
    writes: AtomicU64,
    /// The socket's descriptor (-1: none known), for its send queue.
    fd: std::sync::atomic::AtomicI32,
    /// Wakes the watchdog: an answer started, or the socket refused a write.
    wake: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: tokio::time::Instant::now(),
            open: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NONE),
            sending: AtomicUsize::new(0),
            frames: AtomicU64::new(0),
            frames_seen: AtomicU64::new(0),
            frames_moved_at: AtomicU64::new(0),
            answering: AtomicUsize::new(0),
            write_blocked_since: AtomicU64::new(NONE),
            queued_at_block: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            fd: std::sync::atomic::AtomicI32::new(-1),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn at(&self, millis: u64) -> tokio::time::Instant {
        self.epoch + Duration::from_millis(millis)
    }

    /// Bytes came in: with no request open on HTTP/1, a head has begun.
    fn read(&self) {
        if self.open.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == NONE
            && self.served.load(Ordering::Relaxed)
            && !self.http2.load(Ordering::Relaxed)
        {
            self.head_since.store(self.now(), Ordering::Relaxed);
            // Its deadline is header_read_timeout, not idle_timeout.
            self.wake.notify_one();
        }
    }

    /// When to look again, or why the connection must close now.
    fn check(&self, timeouts: Timeouts) -> Result<tokio::time::Instant, Cut> {
        let now = tokio::time::Instant::now();
        // The socket takes no bytes (its buffers are full: the client reads
        // nothing): cut `send_timeout` after its first refused write, also
        // when hyper holds the rest of an answer the pod has finished.
        let blocked = self.write_blocked_since.load(Ordering::Acquire);
        let unblocked_by = match blocked {
            NONE => None,
            since if self.at(since) + timeouts.send <= now => {
                // Bytes left the kernel's queue since (tokio retries a write
                // only once a good part has): a slow reader, not a silent one.
                let queued = self.send_queue();
                if queued.is_none_or(|queued| queued >= self.queued_at_block.load(Ordering::Relaxed)) {
                    return Err(Cut::Send);
                }
                self.queued_at_block.store(queued.unwrap_or(0), Ordering::Relaxed);
                self.write_blocked_since.store(self.now(), Ordering::Release);
                Some(now + timeouts.send)
            }
            since => Some(self.at(since) + timeouts.send),
        };
        let next = |at: tokio::time::Instant| Ok(unblocked_by.map_or(at, |by| by.min(at)));
        if self.open.load(Ordering::Acquire) > 0 {
            // A client that takes no frame of an answer for `send_timeout`
            // (HTTP/2 flow control stops hyper before the socket does) is
            // cut: dropping the connection drops the answer, whose pod part
            // is then read to its end in the background. While an answer is
            // being sent, the watchdog looks every eighth of `send_timeout`
            // (frames are counted, not timed): it cuts within an eighth of
            // the timeout's end.
            if self.answering.load(Ordering::Acquire) > 0 {
                // Progress: a frame taken, or bytes written (a frame may be
                // large, or wait behind another stream's).
                let moved = self.frames.load(Ordering::Acquire) + self.writes.load(Ordering::Acquire);
                if self.frames_seen.swap(moved, Ordering::Relaxed) != moved || self.sending.load(Ordering::Acquire) == 0
                {
                    self.frames_moved_at.store(self.now(), Ordering::Relaxed);
                }
                let stuck_until = self.at(self.frames_moved_at.load(Ordering::Relaxed)) + timeouts.send;
                if stuck_until <= now {
                    return Err(Cut::Send);
                }
                return next(stuck_until.min(now + (timeouts.send / 8).max(Duration::from_millis(10))));
            }
            // Queued, or waiting for its pod: an answer's start wakes the
            // watchdog (`Activity::wake`).
            return next(now + timeouts.header_read.min(timeouts.idle).min(timeouts.send));
        }
        let (deadline, cut) = if !self.served.load(Ordering::Acquire) {
            (self.epoch + timeouts.header_read, Cut::NoRequest)
        } else {
            match self.head_since.load(Ordering::Acquire) {
                NONE => (self.at(self.idle_since.load(Ordering::Acquire)) + timeouts.idle, Cut::Idle),
                since => (self.at(since) + timeouts.header_read, Cut::HeadIncomplete),
            }
        };
        if deadline <= now {
            Err(cut)
        } else {
            // A request may open before the deadline (the watchdog is not
            // told until its answer starts).
            next(deadline)
        }
    }

    /// The socket refused a write (Pending): the first refusal of a spell
    /// is timed (with the kernel's send queue then), and wakes the watchdog.
    fn write_blocked(&self) {
        if self.write_blocked_since.load(Ordering::Relaxed) == NONE {
            self.queued_at_block.store(self.send_queue().unwrap_or(0), Ordering::Relaxed);
            self.write_blocked_since.store(self.now(), Ordering::Release);
            self.wake.notify_one();
        }
    }

    /// The socket took bytes.
    fn wrote(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        if self.write_blocked_since.load(Ordering::Relaxed) != NONE {
            self.write_blocked_since.store(NONE, Ordering::Release);
        }
    }

    /// Bytes the kernel holds unacknowledged on the socket (SIOCOUTQ), if known.
    fn send_queue(&self) -> Option<u64> {
        let fd = self.fd.load(Ordering::Relaxed);
        if fd < 0 {
            return None;
        }
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int; the descriptor is the connection's,
        // open while its watchdog runs (a closed or reused one only gives a
        // wrong count, never a wrong write).
        match unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } {
            0 => u64::try_from(queued).ok(),
            _ => None,
        }
    }
}

/// Why a connection's watchdog closed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    NoRequest,
    HeadIncomplete,
    Idle,
    Send,
}

impl Cut {
    fn reason(self) -> &'static str {
        match self {
            Cut::NoRequest => "no request within header_read_timeout",
            Cut::HeadIncomplete => "request head not complete within header_read_timeout",
            Cut::Idle => "idle_timeout",
            Cut::Send => "the client took no bytes of its answer within send_timeout",
        }
    }

    /// The `reason` label of `sdgate_client_connections_closed_total`.
    fn label(self) -> &'static str {
        match self {
            Cut::NoRequest | Cut::HeadIncomplete => "header_read_timeout",
            Cut::Idle => "idle_timeout",
            Cut::Send => "send_timeout",
        }
    }
}

/// A request in progress on its connection, from its head until its answer
/// has been sent (or the connection gave up on it).
struct Open {
    activity: Arc<Activity>,
}

impl Open {
    fn start(activity: &Arc<Activity>, http2: bool) -> Self {
        if http2 {
            activity.http2.store(true, Ordering::Relaxed);
        }
        activity.served.store(true, Ordering::Relaxed);
        activity.open.fetch_add(1, Ordering::AcqRel);
        activity.head_since.store(NONE, Ordering::Release);
        Self { activity: activity.clone() }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.activity.idle_since.store(self.activity.now(), Ordering::Release);
        self.activity.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An answer's body that keeps its request [`Open`] until it is dropped
/// (sent in full, or the connection closed), and tells the watchdog while a
/// frame it gave hyper has not been followed by a call for the next (the
/// client may not be reading).
struct Tracked {
    body: ResponseBody,
    open: Open,
    sending: bool,
}

impl Tracked {
    fn new(body: ResponseBody, open: Open) -> Self {
        let activity = &open.activity;
        if activity.answering.fetch_add(1, Ordering::AcqRel) == 0 {
            activity.wake.notify_one();
        }
        Self { body, open, sending: false }
    }

    fn set_sending(&mut self, sending: bool) {
        if self.sending == sending {
            return;
        }
        self.sending = sending;
        let activity = &self.open.activity;
        if sending {
            activity.frames.fetch_add(1, Ordering::AcqRel);
            activity.sending.fetch_add(1, Ordering::AcqRel);
        } else {
            activity.sending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.set_sending(false);
        self.open.activity.answering.fetch_sub(1, Ordering::AcqRel);
    }
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        // hyper asks for the next frame: the one before has been taken.
        self.set_sending(false);
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.set_sending(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A client socket that tells its connection's [`Activity`] of reads and
/// gives its descriptor back to the [`ConnectionBudget`] when closed (also
/// after an upgrade, which takes the socket out of hyper's connection).
struct Watched {
    stream: TcpStream,
    /// What the lobby read, given to hyper before the socket.
    read: bytes::Bytes,
    activity: Arc<Activity>,
    _budget: BudgetSlot,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        polled
    }
}

impl Watched {
    /// Tells the watchdog whether the socket took bytes or refused them.
    fn note_write(&self, polled: &Poll<std::io::Result<usize>>) {
        match polled {
            Poll::Pending => self.activity.write_blocked(),
            Poll::Ready(Ok(written)) if *written > 0 => self.activity.wrote(),
            Poll::Ready(_) => {}
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.note_write(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Raises the soft open-files limit to the hard one (as nginx's
/// `worker_rlimit_nofile` and Go's runtime do): every waiting client is a
/// descriptor, and a common soft limit of 1024 would cap the queue far below
/// `queue.max_depth`. Logs the limit; warns when it is below what the queues
/// may hold. Returns the soft limit in force.
pub fn raise_open_files_limit(queued: usize) -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read or write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    let soft = limit.rlim_cur;
    tracing::info!(open_files = soft, "open-files limit");
    if soft != libc::RLIM_INFINITY && (soft as usize) < queued {
        tracing::warn!(
            open_files = soft,
            queued,
            "the open-files limit is below what the queues may hold (queue.max_depth over all services): raise the hard limit (ulimit -Hn, LimitNOFILE=)"
        );
    }
    soft
}

/// How many client connections may be open at once: the descriptor limit
/// less those open now (listeners, runtimes, logs) and a reserve (an
/// eighth of the limit, 32 to 1024) for pod connections, probes, worker
/// processes and admin connections, so a flood of clients cannot take the
/// descriptors sdgate needs to serve them and to answer `/healthz`.
fn max_client_connections() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return usize::MAX;
    }
    let soft = usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX);
    let open_now = std::fs::read_dir("/proc/self/fd").map(|dir| dir.count()).unwrap_or(0);
    soft.saturating_sub(open_now + (soft / 8).clamp(32, 1024)).max(16)
}

/// Open client connections, against their limit.
struct ConnectionBudget {
    open: AtomicUsize,
    max: usize,
    /// Told when a connection closes.
    freed: tokio::sync::Notify,
    /// `sdgate_client_connections` (the public listener's).
    gauge: Option<prometheus::IntGauge>,
}

impl ConnectionBudget {
    fn new(max: usize, gauge: Option<prometheus::IntGauge>) -> Self {
        Self { open: AtomicUsize::new(0), max, freed: tokio::sync::Notify::new(), gauge }
    }

    fn full(&self) -> bool {
        self.open.load(Ordering::Acquire) >= self.max
    }

    fn take(self: &Arc<Self>) -> BudgetSlot {
        self.open.fetch_add(1, Ordering::AcqRel);
        if let Some(gauge) = &self.gauge {
            gauge.inc();
        }
        BudgetSlot(self.clone())
    }
}

/// One open client connection, given back on drop.
struct BudgetSlot(Arc<ConnectionBudget>);

impl Drop for BudgetSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(gauge) = &self.0.gauge {
            gauge.dec();
        }
        self.0.freed.notify_one();
    }
}

/// Failed accepts of one listener: a pause after those that will fail again
/// at once (out of descriptors or memory), and a log line at most once a
/// second, counting the failures since the previous one.
pub(crate) struct AcceptErrors {
    listener: &'static str,
    since_logged: u64,
    logged: Option<tokio::time::Instant>,
}

impl AcceptErrors {
    /// How long a listener waits after running out of descriptors.
    pub(crate) const PAUSE: Duration = Duration::from_millis(50);

    pub(crate) fn new(listener: &'static str) -> Self {
        Self { listener, since_logged: 0, logged: None }
    }

    /// Records a failed accept; returns how long to wait before the next.
    pub(crate) fn failed(&mut self, error: &std::io::Error) -> Option<Duration> {
        self.since_logged += 1;
        if self.logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            tracing::warn!(listener = self.listener, %error, errors = self.since_logged, "accept failed (errors counted since the last such line)");
            self.since_logged = 0;
            self.logged = Some(tokio::time::Instant::now());
        }
        match error.raw_os_error() {
            // The failure belongs to that one connection: go on at once.
            Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM | libc::EINTR) => None,
            // EMFILE, ENFILE, ENOBUFS, ENOMEM and anything unknown.
            _ => Some(Self::PAUSE),
        }
    }
}

/// Whether a failed accept ran out of descriptors (the process's or the
/// system's).
pub(crate) fn out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Takes SIGTERM and SIGINT from now on (their default action would kill
/// the process with requests in flight) and completes when one comes. Call
/// it before anything starts: a signal that arrives before the handlers are
/// installed kills the process.
/// The address other replicas reach this one's listener at: `POD_IP` with
/// the listen port, else the listen address unless it is unspecified.
fn advertised(listen: SocketAddr) -> Option<SocketAddr> {
    let pod_ip = std::env::var("POD_IP").ok().and_then(|ip| ip.trim().parse::<std::net::IpAddr>().ok());
    match pod_ip {
        Some(ip) => Some(SocketAddr::new(ip, listen.port())),
        None => (!listen.ip().is_unspecified()).then_some(listen),
    }
}

/// How the gateway is told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Drain now (SIGINT: someone at a terminal).
    Now,
    /// Serve on for `shutdown_delay` with `/readyz` 503, then drain
    /// (SIGTERM: an orchestrator, whose load balancers still send for a
    /// moment).
    AfterDelay,
}

/// SIGTERM ([`Stop::AfterDelay`]) or SIGINT ([`Stop::Now`]).
pub fn shutdown_signal() -> Result<impl Future<Output = Stop>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            // Both at once (a script stopping everything it started): at once.
            biased;
            _ = interrupt.recv() => Stop::Now,
            _ = terminate.recv() => Stop::AfterDelay,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            send: Duration::from_secs(30),
            body_read: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_closes_a_silent_connection_at_header_read_timeout_and_an_idle_one_at_idle_timeout() {
        let activity = Arc::new(Activity::new());
        let wake = activity.check(timeouts()).expect("a new connection may wait");
        assert_eq!(wake, activity.epoch + Duration::from_secs(10));
        tokio::time::sleep_until(wake).await;
        assert_eq!(activity.check(timeouts()), Err(Cut::NoRequest));

        let activity = Arc::new(Activity::new());
        drop(Open::start(&activity, false));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(activity.check(timeouts()).is_ok(), "idle for 59 s of 60");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(activity.check(timeouts()), Err(Cut::Idle));
    }

    /// An answer whose frame hyper took, with no call for the next one for
    /// `send_timeout`, closes the connection; a pod that is slow to give the
    /// next frame does not.
    #[tokio::test(start_paused = true)]
    async fn the_watchdog_cuts_a_client_that_takes_no_bytes_for_send_timeout() {
        use http_body::Body;
        let activity = Arc::new(Activity::new());
        struct Frames(tokio::sync::mpsc::Receiver<bytes::Bytes>);
        impl Body for Frames {
            type Data = bytes::Bytes;
            type Error = crate::body::BoxError;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                cx: &mut TaskContext<'_>,
            ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
                self.0.poll_recv(cx).map(|frame| frame.map(|data| Ok(http_body::Frame::data(data))))
            }
        }
        let (sender, frames) = tokio::sync::mpsc::channel(4);
        let body: ResponseBody = http_body_util::BodyExt::boxed_unsync(Frames(frames));
        let mut tracked = Box::pin(Tracked::new(body, Open::start(&activity, false)));
        let waker = futures_util::task::noop_waker();
        let mut cx = TaskContext::from_waker(&waker);
        // The pod is slow: hyper waits for a frame.
        assert!(tracked.as_mut().poll_frame(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(300)).await;
        assert!(activity.check(timeouts()).is_ok(), "a slow pod is not the client's fault");
        // A frame comes and hyper takes it (the watchdog sees it move); the
        // client does not read on.
        sender.send(bytes::Bytes::from_static(b"frame")).await.unwrap();
        assert!(tracked.as_mut().poll_frame(&mut cx).is_ready());
        assert!(activity.check(timeouts()).is_ok());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(activity.check(timeouts()).is_ok(), "29 s of 30");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(activity.check(timeouts()), Err(Cut::Send));
        // hyper asked for the next frame: the client is reading again.
        assert!(tracked.as_mut().poll_frame(&mut cx).is_pending());
        assert!(activity.check(timeouts()).is_ok());
    }

    /// A socket whose client reads slowly (the kernel's send queue drains
    /// between two of tokio's write retries) is not cut.
    #[tokio::test]
    async fn a_slow_reader_is_told_from_a_silent_one_by_the_kernels_send_queue() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let activity = Activity::new();
        activity.fd.store(std::os::fd::AsRawFd::as_raw_fd(&server), Ordering::Relaxed);
        let chunk = vec![0u8; 64 << 10];
        while server.write(&chunk).is_ok() {}
        activity.served.store(true, Ordering::Relaxed);
        activity.idle_since.store(activity.now(), Ordering::Relaxed);
        activity.write_blocked();
        let queued = activity.send_queue().expect("the kernel's send queue");
        assert!(queued > 0);
        let timeouts = Timeouts { send: Duration::from_millis(100), ..timeouts() };
        tokio::time::sleep(Duration::from_millis(150)).await;
        // The client reads some: bytes left the queue, no write succeeded yet.
        let mut taken = vec![0u8; 256 << 10];
        let mut read = 0;
        while read < taken.len() {
            read += std::io::Read::read(&mut client, &mut taken[read..]).unwrap();
        }
        // Until the queue has shrunk and settled (the client's window is full again).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut last = None;
        loop {
            assert!(tokio::time::Instant::now() < deadline, "the queue drains as the client reads, then settles");
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = activity.send_queue();
            if now.is_some_and(|now| now < queued) && now == last {
                break;
            }
            last = now;
        }
        assert!(activity.check(timeouts).is_ok(), "a slow reader is not cut");
        // (A silent one on a real socket: tests/hostile.rs, an_http1_non_reader_is_cut_at_send_timeout.)
    }

    /// A socket that refuses writes for `send_timeout` is cut, also when no
    /// request is open any more (hyper holds an answer the pod finished);
    /// one that takes bytes again is not. The refusal wakes the watchdog.
    #[tokio::test(start_paused = true)]
    async fn the_watchdog_cuts_a_socket_that_takes_no_bytes_for_send_timeout() {
        let activity = Arc::new(Activity::new());
        drop(Open::start(&activity, false));
        activity.write_blocked();
        tokio::time::timeout(Duration::from_millis(1), activity.wake.notified()).await.expect("the watchdog woken");
        assert_eq!(activity.check(timeouts()), Ok(tokio::time::Instant::now() + Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(20)).await;
        activity.write_blocked();
        activity.wrote();
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(activity.check(timeouts()).is_ok(), "bytes went out 20 s ago");
        activity.write_blocked();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(activity.check(timeouts()), Err(Cut::Send));
    }
}
