//! Local worker processes, started and stopped to follow the desired count.
//!
//! - Worker `i` runs `command` (placeholders filled) and listens on
//!   `port_base + i`; it is an endpoint from its start, ready once probed.
//! - Scaling down drains: the worker takes no new requests, finishes those it
//!   holds, then gets SIGTERM and, after `stop_grace`, SIGKILL.
//! - A worker that dies while wanted is restarted with exponential backoff;
//!   while workers die before ever becoming ready, waiting requests are told
//!   the backend fails to start.
//! - No worker outlives sdgate: each runs in its own process group (so its
//!   children are stopped with it) and gets SIGKILL if sdgate dies, even by
//!   SIGKILL (parent-death signal).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::ProcessBackend;
use crate::gate::EndpointId;
use crate::probe::Prober;
use crate::provider::{Context, Endpoints, Provider};

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const HOUSEKEEPING: Duration = Duration::from_millis(50);

enum Phase {
    /// Wanted: serving, or starting and being probed.
    Running,
    /// Not wanted: takes no new requests, finishing those it holds.
    Draining,
    /// Sent SIGTERM; SIGKILL at the deadline.
    Stopping { kill_at: Instant },
}

struct Worker {
    pid: u32,
    endpoint: EndpointId,
    probe: JoinHandle<()>,
    phase: Phase,
    started: Instant,
}

/// A wanted worker waiting to be started again after it died.
struct Restart {
    at: Instant,
    failures: u32,
}

struct Exit {
    index: u32,
    pid: u32,
    status: std::io::Result<ExitStatus>,
}

/// The `process` backend.
pub struct Pool {
    backend: ProcessBackend,
}

impl Pool {
    pub fn new(backend: ProcessBackend) -> Self {
        Self { backend }
    }
}

impl Provider for Pool {
    /// Runs the pool until `stop` fires, then stops every worker.
    async fn run(self, cx: Context) {
        let Context { service, endpoints, mut desired, mut stop } = cx;
        let (exits_tx, exits) = mpsc::unbounded_channel();
        let mut pool = ProcessPool {
            service: service.name.clone(),
            backend: self.backend,
            endpoints,
            prober: Prober::new(service.readiness.clone()),
            workers: BTreeMap::new(),
            restarts: BTreeMap::new(),
            failures: BTreeMap::new(),
            exits_tx,
            exits,
            desired: *desired.borrow_and_update(),
        };
        pool.reconcile();
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        loop {
            tokio::select! {
                changed = desired.changed() => {
                    if changed.is_err() { break; }
                    pool.desired = *desired.borrow_and_update();
                    pool.reconcile();
                }
                Some(exit) = pool.exits.recv() => pool.on_exit(exit),
                _ = housekeeping.tick() => pool.housekeeping(),
                _ = &mut stop => break,
            }
        }
        pool.stop_all().await;
    }
}

struct ProcessPool {
    service: String,
    backend: ProcessBackend,
    endpoints: Endpoints,
    prober: Prober,
    workers: BTreeMap<u32, Worker>,
    restarts: BTreeMap<u32, Restart>,
    /// Consecutive deaths before readiness, per worker index.
    failures: BTreeMap<u32, u32>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits: mpsc::UnboundedReceiver<Exit>,
    desired: u32,
}

impl ProcessPool {
    /// Wanted workers: running ones and those waiting to restart.
    fn wanted(&self) -> usize {
        self.workers.values().filter(|w| matches!(w.phase, Phase::Running)).count() + self.restarts.len()
    }

    fn reconcile(&mut self) {
        let desired = self.desired as usize;
        while self.wanted() < desired {
            let Some(index) = (0..).find(|i| !self.workers.contains_key(i) && !self.restarts.contains_key(i)) else {
                break;
            };
            self.start(index);
        }
        while self.wanted() > desired {
            // First give up restarts, then drain the running worker that is
            // cheapest to lose: idle before busy, starting before ready,
            // highest index first.
            if let Some(&index) = self.restarts.keys().next_back() {
                self.restarts.remove(&index);
                continue;
            }
            let Some(index) = self.drain_candidate() else { break };
            if let Some(worker) = self.workers.get_mut(&index) {
                worker.phase = Phase::Draining;
                self.endpoints.set_draining(worker.endpoint);
                tracing::info!(service = %self.service, worker = index, "draining worker");
            }
        }
    }

    /// The worker to scale away, by the shared drain policy.
    fn drain_candidate(&self) -> Option<u32> {
        let running: Vec<(u32, EndpointId)> = self
            .workers
            .iter()
            .filter(|(_, w)| matches!(w.phase, Phase::Running))
            .map(|(index, w)| (*index, w.endpoint))
            .collect();
        self.endpoints.drain_order(&running).first().copied()
    }

    fn start(&mut self, index: u32) {
        let argv = self.backend.command_for(index);
        let addr = SocketAddr::new(self.backend.host, self.backend.port_for(index));
        match spawn_worker(&self.service, index, &argv, self.backend.env_for(index), self.exits_tx.clone()) {
            Ok(pid) => {
                let endpoint = self.endpoints.add(addr);
                let probe = self.prober.spawn(self.endpoints.clone(), endpoint, addr);
                tracing::info!(service = %self.service, worker = index, pid, %addr, "started worker");
                let worker = Worker { pid, endpoint, probe, phase: Phase::Running, started: Instant::now() };
                self.workers.insert(index, worker);
            }
            Err(error) => {
                let message = format!("backend fails to start: cannot run {:?}: {error}", argv.first());
                self.fail(index, message);
            }
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        let Some(worker) = self.workers.get(&exit.index) else { return };
        if worker.pid != exit.pid {
            return;
        }
        let Some(worker) = self.workers.remove(&exit.index) else { return };
        worker.probe.abort();
        let was_ready = self.endpoints.ever_served(worker.endpoint);
        self.endpoints.remove(worker.endpoint);
        let status = match exit.status {
            Ok(status) => status.to_string(),
            Err(error) => error.to_string(),
        };
        match worker.phase {
            Phase::Running => {
                tracing::warn!(service = %self.service, worker = exit.index, %status, "worker died");
                if was_ready {
                    self.failures.remove(&exit.index);
                }
                let message = format!(
                    "backend fails to start: worker {} exited ({status}) {} after starting",
                    exit.index,
                    humantime::format_duration(Duration::from_millis(worker.started.elapsed().as_millis() as u64))
                );
                if was_ready {
                    self.schedule_restart(exit.index);
                } else {
                    self.fail(exit.index, message);
                }
            }
            Phase::Draining | Phase::Stopping { .. } => {
                tracing::info!(service = %self.service, worker = exit.index, %status, "worker stopped");
                self.reconcile();
            }
        }
    }

    /// A worker could not start or died before becoming ready: tell waiting
    /// requests why, and try again later.
    fn fail(&mut self, index: u32, message: String) {
        tracing::warn!(service = %self.service, worker = index, "{message}");
        self.endpoints.report_error(Some(message));
        *self.failures.entry(index).or_insert(0) += 1;
        self.schedule_restart(index);
    }

    fn schedule_restart(&mut self, index: u32) {
        let failures = self.failures.get(&index).copied().unwrap_or(0);
        let delay = FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(6)).min(MAX_BACKOFF);
        let delay = if failures == 0 { Duration::ZERO } else { delay };
        self.restarts.insert(index, Restart { at: Instant::now() + delay, failures });
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        let due: Vec<u32> = self.restarts.iter().filter(|(_, r)| r.at <= now).map(|(i, _)| *i).collect();
        for index in due {
            if let Some(restart) = self.restarts.remove(&index) {
                tracing::info!(service = %self.service, worker = index, failures = restart.failures, "restarting worker");
                self.start(index);
            }
        }
        if self.endpoints.any_ready() {
            self.failures.retain(|index, _| !self.workers.contains_key(index));
        }
        for (index, worker) in &mut self.workers {
            match worker.phase {
                Phase::Draining => {
                    let idle = self.endpoints.is_idle(worker.endpoint);
                    if idle {
                        tracing::info!(service = %self.service, worker = index, pid = worker.pid, "stopping drained worker");
                        signal_group(worker.pid, Signal::Term);
                        worker.phase = Phase::Stopping { kill_at: now + self.backend.stop_grace };
                    }
                }
                Phase::Stopping { kill_at } if now >= kill_at => {
                    tracing::warn!(service = %self.service, worker = index, pid = worker.pid, "worker ignored SIGTERM; killing");
                    signal_group(worker.pid, Signal::Kill);
                    worker.phase = Phase::Stopping { kill_at: now + self.backend.stop_grace };
                }
                _ => {}
            }
        }
    }

    /// Stops every worker: SIGTERM, then SIGKILL after the grace period.
    async fn stop_all(&mut self) {
        for worker in self.workers.values() {
            worker.probe.abort();
            self.endpoints.set_draining(worker.endpoint);
            signal_group(worker.pid, Signal::Term);
        }
        let deadline = Instant::now() + self.backend.stop_grace;
        while !self.workers.is_empty() {
            match tokio::time::timeout_at(deadline, self.exits.recv()).await {
                Ok(Some(exit)) => {
                    if let Some(worker) = self.workers.remove(&exit.index) {
                        self.endpoints.remove(worker.endpoint);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    for worker in self.workers.values() {
                        signal_group(worker.pid, Signal::Kill);
                    }
                    break;
                }
            }
        }
        tracing::info!(service = %self.service, "all workers stopped");
    }
}

fn spawn_worker(
    service: &str,
    index: u32,
    argv: &[String],
    env: Vec<(String, String)>,
    exits: mpsc::UnboundedSender<Exit>,
) -> std::io::Result<u32> {
    let (program, args) = argv.split_first().ok_or_else(|| std::io::Error::other("empty command"))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    // SAFETY: prctl and getppid are async-signal-safe and touch no memory of
    // the parent; this runs in the child between fork and exec.
    unsafe {
        command.pre_exec(|| {
            // Die with sdgate, even if it is killed with SIGKILL. (The signal
            // follows the thread that forked: tokio's worker threads live as
            // long as the runtime.)
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("sdgate exited while starting a worker"));
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let pid = child.id().ok_or_else(|| std::io::Error::other("worker exited at once"))?;
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(log_lines(service.to_string(), index, stdout));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(log_lines(service.to_string(), index, stderr));
    }
    tokio::spawn(async move {
        let status = child.wait().await;
        let _ = exits.send(Exit { index, pid, status });
    });
    Ok(pid)
}

/// Passes a worker's output to sdgate's log, line by line, tagged with its index.
async fn log_lines(service: String, index: u32, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(target: "sdgate::worker", %service, worker = index, "{line}");
    }
}

enum Signal {
    Term,
    Kill,
}

/// Signals a worker's whole process group (it leads its own group).
fn signal_group(pid: u32, signal: Signal) {
    let signal = match signal {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
    };
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) with a negative pid signals a process group; it has no
    // memory-safety preconditions.
    unsafe {
        libc::kill(-pid, signal);
    }
}
