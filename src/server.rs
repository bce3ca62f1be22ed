//! The listeners: the proxy's, with its client-input limits and graceful
//! shutdown, and the admin one.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::autoscale;
use crate::config::{Config, ScaleMode};
use crate::forward::Peer;
use crate::leader;
use crate::metrics::Metrics;
use crate::provider;
use crate::proxy::Proxy;
use crate::threads::{self, ServingThreads};

/// A bound, not yet running gateway.
pub struct Gateway {
    config: Config,
    proxy: Arc<Proxy>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    /// The control loop, once this replica is active (at once without
    /// leader election).
    control: Option<Control>,
}

/// The control loop of every service: providers and autoscalers.
struct Control {
    providers: Vec<provider::Running>,
    autoscalers: Vec<JoinHandle<()>>,
    desired: Vec<watch::Receiver<u32>>,
}

impl Control {
    /// Starts each service's provider (endpoints and probes) and autoscaler.
    fn start(proxy: &Proxy) -> Result<Self> {
        let mut control = Control { providers: Vec::new(), autoscalers: Vec::new(), desired: Vec::new() };
        for service in proxy.services() {
            let (desired_tx, desired_rx) = watch::channel(service.config.scale.min);
            control.desired.push(desired_rx.clone());
            control.providers.push(provider::start(&service.config, service.gate.clone(), desired_rx)?);
            if service.config.scale.mode == ScaleMode::Builtin {
                let settings = autoscale::Settings::new(&service.config.scale, service.config.container_concurrency);
                control.autoscalers.push(tokio::spawn(autoscale::run(
                    service.config.name.clone(),
                    service.gate.clone(),
                    settings,
                    service.config.scale.tick,
                    desired_tx,
                )));
            }
        }
        Ok(control)
    }

    async fn stop(self) {
        for task in self.autoscalers {
            task.abort();
        }
        for provider in self.providers {
            provider.shutdown().await;
        }
    }
}

impl Gateway {
    /// Binds the listeners and, unless leader election decides, starts the
    /// providers (endpoints and probes) and autoscalers.
    pub async fn bind(config: Config) -> Result<Self> {
        let proxy = Arc::new(Proxy::new(&config, Metrics::new())?);
        let listener =
            TcpListener::bind(config.listen).await.with_context(|| format!("listen: cannot bind {}", config.listen))?;
        let admin = match config.admin {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| format!("admin: cannot bind {addr}"))?),
            None => None,
        };
        let control = match config.leader_election {
            None => Some(Control::start(&proxy)?),
            Some(_) => None,
        };
        Ok(Self { config, proxy, listener, admin, control })
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
        self.control.as_ref().and_then(|c| c.desired.get(index).cloned())
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Serves until `shutdown` completes, then stops accepting and lets queued
    /// and in-flight requests finish, at most `drain_timeout`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Gateway { config, proxy, listener, admin, mut control } = self;
        tracing::info!(
            listen = %listener.local_addr()?,
            admin = admin.as_ref().and_then(|a| a.local_addr().ok()).map(|a| a.to_string()).unwrap_or_default(),
            "sdgate listening"
        );
        let mut threads = ServingThreads::start(threads::count(config.threads))?;
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let admin_task = admin.map(|admin| tokio::spawn(admin::serve(admin, proxy.clone(), draining.clone())));

        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.limits.header_read_timeout)
            .max_buf_size(config.limits.max_header_bytes.max(8192) + 16 * 1024);
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        let (active_tx, mut active) = watch::channel(control.is_some());
        let mut election =
            config.leader_election.clone().map(|election| tokio::spawn(leader::run(election, active_tx)));
        let mut lost: Option<anyhow::Error> = None;
        loop {
            tokio::select! {
                changed = active.changed(), if control.is_none() => {
                    if changed.is_ok() && *active.borrow_and_update() {
                        control = Some(Control::start(&proxy)?);
                        proxy.set_active(true);
                    }
                }
                ended = async { match &mut election { Some(task) => task.await, None => std::future::pending().await } } => {
                    // Lost the lease: stop dispatching now; the process exits
                    // and comes back as a standby.
                    proxy.set_active(false);
                    lost = Some(match ended {
                        Ok(Err(error)) => error,
                        Ok(Ok(())) => anyhow::anyhow!("leader election ended"),
                        Err(error) => anyhow::anyhow!("leader election failed: {error}"),
                    });
                    break;
                }
                accepted = listener.accept() => {
                    let (stream, client) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            // Out of file descriptors and the like: keep serving.
                            tracing::warn!(%error, "accept failed");
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    // The connection moves to a serving thread's runtime.
                    let stream = match stream.into_std() {
                        Ok(stream) => stream,
                        Err(error) => {
                            tracing::warn!(%error, %client, "cannot hand the connection over");
                            continue;
                        }
                    };
                    threads.next_runtime().spawn(serve_connection(stream, client, proxy.clone(), builder.clone(), graceful.watcher()));
                }
                _ = &mut shutdown => break,
            }
        }
        drop(listener);
        draining.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(error) = lost {
            return Err(error);
        }
        tracing::info!(timeout = ?config.drain_timeout, "shutting down: draining requests");
        tokio::select! {
            _ = graceful.shutdown() => tracing::info!("drained"),
            _ = tokio::time::sleep(config.drain_timeout) => tracing::warn!("drain timeout reached; exiting with requests still open"),
        }
        if let Some(task) = admin_task {
            task.abort();
        }
        threads.stop().await;
        if let Some(task) = election {
            task.abort();
        }
        if let Some(control) = control {
            control.stop().await;
        }
        Ok(())
    }
}

/// Serves one client connection, on the serving thread it was handed to.
async fn serve_connection(
    stream: std::net::TcpStream,
    client: SocketAddr,
    proxy: Arc<Proxy>,
    builder: auto::Builder<TokioExecutor>,
    graceful: Watcher,
) {
    let stream = match TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(error) => return tracing::warn!(%error, %client, "cannot register the connection"),
    };
    let peer = Arc::new(Peer::new(client));
    let service = service_fn(move |request| {
        let (proxy, peer) = (proxy.clone(), peer.clone());
        async move { Ok::<_, Infallible>(proxy.handle(request, peer).await) }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    if let Err(error) = graceful.watch(connection.into_owned()).await {
        tracing::debug!(%error, %client, "connection ended with an error");
    }
}

/// Takes SIGHUP, which would otherwise kill the process with every request
/// in flight: it is logged (config reload is not built yet).
pub fn ignore_sighup() -> Result<()> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            tracing::warn!("SIGHUP received: configuration reload is not supported yet; carrying on");
        }
    });
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
