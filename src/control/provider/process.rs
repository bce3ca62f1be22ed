//! Local worker processes, started and stopped to follow the desired count.
//!
//! - Worker `i` runs `command` (placeholders filled) and listens on
//!   `port_base + i`; it is an endpoint from its start, ready once probed.
//! - Scaling down drains: the worker takes no new requests, finishes those it
//!   holds, then gets SIGTERM and, after `stop_grace`, SIGKILL.
//! - A worker that dies while wanted is restarted with exponential backoff,
//!   its own: a worker that keeps failing to start is tried less and less
//!   often whatever the others do (a real WebUI is a torch process: it is
//!   not relaunched in a tight loop).
//! - While workers die before ever becoming ready, waiting requests are told
//!   the backend fails to start; once every wanted worker has failed and none
//!   is ready or starting, they are answered 503 with the cause at once, and
//!   so are new requests until a worker starts again (see `SharedGate::set_down`).
//! - A worker's port (`port_base + i`) that another process already listens
//!   on is replaced with a free one the system picks.
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
use crate::control::probe::Prober;
use crate::control::provider::{Context, Endpoints, Provider};
use crate::gate::{Down, EndpointId};

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
    /// The last line it wrote on stderr (often why it could not start).
    last_words: Option<String>,
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
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = desired.changed() => {
                    if changed.is_err() { break; }
                    pool.desired = *desired.borrow_and_update();
                    pool.reconcile();
                }
                Some(exit) = pool.exits.recv() => pool.on_exit(exit),
                // A pool with nothing pending (no restart due, no worker
                // draining or stopping) sleeps until an event: no timer per
                // idle service.
                _ = housekeeping.tick(), if pool.has_housekeeping() => pool.housekeeping(),
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
        if desired == 0 {
            // Nothing wanted: nothing fails to start.
            self.endpoints.set_down(None);
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
        let port = self.port(index);
        let argv = self.backend.command_for(index, port);
        let addr = SocketAddr::new(self.backend.host, port);
        match spawn_worker(&self.service, index, &argv, self.backend.env_for(index, port), self.exits_tx.clone()) {
            Ok(pid) => {
                let endpoint = self.endpoints.add(addr);
                let probe = self.prober.spawn(self.endpoints.clone(), endpoint, addr);
                tracing::info!(service = %self.service, worker = index, pid, %addr, "started worker");
                let worker = Worker { pid, endpoint, probe, phase: Phase::Running, started: Instant::now() };
                self.workers.insert(index, worker);
                // A start is under way: requests wait for it again.
                self.endpoints.set_down(None);
            }
            Err(error) => {
                let program = argv.first().map_or("(no command)", String::as_str);
                self.fail(index, format!("cannot run {program}: {error}"));
            }
        }
    }

    /// The port of worker `index`: `port_base + index`, unless another
    /// process listens there (a WebUI started by hand on 7860, another
    /// sdgate's demo), then one the system picks.
    fn port(&self, index: u32) -> u16 {
        let preferred = self.backend.port_for(index);
        match std::net::TcpListener::bind((self.backend.host, preferred)) {
            Ok(_) => preferred,
            Err(error) => {
                let free = std::net::TcpListener::bind((self.backend.host, 0))
                    .and_then(|listener| listener.local_addr())
                    .map_or(preferred, |addr| addr.port());
                tracing::warn!(service = %self.service, worker = index, preferred, port = free, %error, "port {preferred} is taken by another process: worker {index} listens on {free}");
                free
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
                let mut cause = format!(
                    "worker {} exited ({status}) {} after starting",
                    exit.index,
                    humantime::format_duration(Duration::from_millis(worker.started.elapsed().as_millis() as u64))
                );
                if let Some(words) = &exit.last_words {
                    cause.push_str(&format!("; its last words: {words}"));
                }
                if was_ready {
                    self.schedule_restart(exit.index);
                } else {
                    self.fail(exit.index, cause);
                }
            }
            Phase::Draining | Phase::Stopping { .. } => {
                tracing::info!(service = %self.service, worker = exit.index, %status, "worker stopped");
                self.reconcile();
            }
        }
    }

    /// A worker could not start or died before becoming ready: tell waiting
    /// requests why, and try again later. Once no wanted worker is ready or
    /// starting, waiting requests are answered with the cause at once.
    fn fail(&mut self, index: u32, cause: String) {
        let message = format!("backend fails to start: {cause}");
        tracing::error!(service = %self.service, worker = index, "{message}");
        *self.failures.entry(index).or_insert(0) += 1;
        self.schedule_restart(index);
        let starting = self.workers.values().any(|w| matches!(w.phase, Phase::Running));
        if !starting && !self.endpoints.any_ready() {
            let retry_at = self.restarts.values().map(|r| r.at).min().unwrap_or_else(Instant::now);
            self.endpoints.set_down(Some(Down { cause, retry_at }));
        }
        self.endpoints.report_error(Some(message));
    }

    fn schedule_restart(&mut self, index: u32) {
        let failures = self.failures.get(&index).copied().unwrap_or(0);
        let delay = FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(6)).min(MAX_BACKOFF);
        let delay = if failures == 0 { Duration::ZERO } else { delay };
        self.restarts.insert(index, Restart { at: Instant::now() + delay, failures });
    }

    /// Whether [`ProcessPool::housekeeping`] has anything to do: a restart
    /// waiting, a worker draining or stopping, or failure counts to clear
    /// once a worker is ready. Everything else is driven by events.
    fn has_housekeeping(&self) -> bool {
        !self.restarts.is_empty()
            || self.workers.values().any(|w| !matches!(w.phase, Phase::Running))
            || self.failures.keys().any(|index| self.workers.contains_key(index))
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
        // A worker's failures are forgotten once it has been ready itself:
        // another worker being ready says nothing of this one's start.
        let endpoints = &self.endpoints;
        let workers = &self.workers;
        self.failures.retain(|index, _| !workers.get(index).is_some_and(|w| endpoints.ever_served(w.endpoint)));
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
    let stderr = child.stderr.take().map(|stderr| tokio::spawn(log_lines(service.to_string(), index, stderr)));
    tokio::spawn(async move {
        let status = child.wait().await;
        // Its stderr closes with it (unless a child of its own holds it).
        let last_words = match stderr {
            Some(lines) => tokio::time::timeout(LAST_WORDS_WAIT, lines).await.ok().and_then(Result::ok).flatten(),
            None => None,
        };
        let _ = exits.send(Exit { index, pid, status, last_words });
    });
    Ok(pid)
}

/// How long a dead worker's stderr is read for its last line.
const LAST_WORDS_WAIT: Duration = Duration::from_millis(500);
/// The most of a worker's last line quoted in a start failure.
const LAST_WORDS_CHARS: usize = 300;

/// Passes a worker's output to sdgate's log, line by line, tagged with its
/// index. sdgate's log line has its own timestamp, so a worker's leading one
/// is dropped; a level right after it (or at the start) becomes the line's
/// level: `2026-11-26T06:31:00.123Z  WARN x: y` is logged as a warning `x: y`.
/// Returns the last non-empty line, once the stream ends.
async fn log_lines(service: String, index: u32, stream: impl AsyncRead + Unpin) -> Option<String> {
    let mut lines = BufReader::new(stream).lines();
    let mut last = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if !line.trim().is_empty() {
            last = Some(line.trim().chars().take(LAST_WORDS_CHARS).collect());
        }
        let (level, text) = worker_line(&line);
        match level {
            Some(WorkerLevel::Error) => tracing::error!(target: "sdgate::worker", %service, worker = index, "{text}"),
            Some(WorkerLevel::Warn) => tracing::warn!(target: "sdgate::worker", %service, worker = index, "{text}"),
            Some(WorkerLevel::Debug) => tracing::debug!(target: "sdgate::worker", %service, worker = index, "{text}"),
            Some(WorkerLevel::Trace) => tracing::trace!(target: "sdgate::worker", %service, worker = index, "{text}"),
            Some(WorkerLevel::Info) | None => {
                tracing::info!(target: "sdgate::worker", %service, worker = index, "{text}")
            }
        }
    }
    last
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WorkerLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// A worker's line without its leading timestamp and level (the level is
/// returned). Timestamps as tracing, Python's logging, env_logger and Go
/// write them: `2026-11-26T06:31:00.123456Z`, `2026-11-26 06:31:00,123`,
/// `[2026-11-26T06:31:00Z`, `2026/11/26 06:31:00`, with an optional zone.
/// Levels are upper-case words (`INFO`, `WARNING`, `[ERROR]`, `INFO:`), so
/// prose that starts with "Error" is left alone. A line that would be left
/// empty is kept whole.
fn worker_line(line: &str) -> (Option<WorkerLevel>, &str) {
    let rest = skip_separators(skip_timestamp(line));
    let (level, rest) = match take_level(rest) {
        Some((level, after)) => (Some(level), skip_target(skip_separators(after))),
        None => (None, rest),
    };
    if rest.is_empty() {
        (None, line)
    } else {
        (level, rest)
    }
}

/// `text` after a leading Rust module path and colon (a tracing target,
/// `sdgate::tools::sim: `): sdgate's own line already says whose it is.
fn skip_target(text: &str) -> &str {
    let Some((target, rest)) = text.split_once(": ") else { return text };
    let is_path = target.contains("::")
        && target.split("::").all(|part| {
            part.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if is_path && !rest.is_empty() {
        rest
    } else {
        text
    }
}

/// `line` after a leading timestamp, or all of it.
fn skip_timestamp(line: &str) -> &str {
    let bytes = line.as_bytes();
    let mut at = usize::from(bytes.first() == Some(&b'['));
    let digits = |at: usize, n: usize| bytes.len() >= at + n && bytes[at..at + n].iter().all(u8::is_ascii_digit);
    let is = |at: usize, options: &[u8]| bytes.get(at).is_some_and(|b| options.contains(b));
    // Date: 2026-11-26 or 2026/11/26.
    if !(digits(at, 4) && is(at + 4, b"-/") && digits(at + 5, 2) && is(at + 7, b"-/") && digits(at + 8, 2)) {
        return line;
    }
    at += 10;
    // Time: T06:31:00 or " 06:31:00".
    if !(is(at, b"T ") && digits(at + 1, 2) && is(at + 3, b":") && digits(at + 4, 2) && is(at + 6, b":")) {
        return line;
    }
    if !digits(at + 7, 2) {
        return line;
    }
    at += 9;
    // Fraction: .123456 or ,123.
    if is(at, b".,") && digits(at + 1, 1) {
        at += 1;
        while digits(at, 1) {
            at += 1;
        }
    }
    // Zone: Z, +01:00, -0500.
    if is(at, b"Z") {
        at += 1;
    } else if is(at, b"+-") && digits(at + 1, 2) {
        at += 3;
        if is(at, b":") && digits(at + 1, 2) {
            at += 3;
        } else if digits(at, 2) {
            at += 2;
        }
    }
    if is(at, b"]") {
        at += 1;
    }
    // The timestamp must end at a word boundary.
    match bytes.get(at) {
        None => &line[at..],
        Some(b) if !b.is_ascii_alphanumeric() => &line[at..],
        Some(_) => line,
    }
}

/// A leading level word (optionally in brackets) and what follows it.
fn take_level(text: &str) -> Option<(WorkerLevel, &str)> {
    let (bracketed, word_start) = match text.strip_prefix('[') {
        Some(inner) => (true, inner),
        None => (false, text),
    };
    let end = word_start.find(|c: char| !c.is_ascii_uppercase()).unwrap_or(word_start.len());
    let level = match &word_start[..end] {
        "ERROR" | "CRITICAL" | "FATAL" => WorkerLevel::Error,
        "WARN" | "WARNING" => WorkerLevel::Warn,
        "INFO" | "NOTICE" => WorkerLevel::Info,
        "DEBUG" => WorkerLevel::Debug,
        "TRACE" => WorkerLevel::Trace,
        _ => return None,
    };
    let mut after = &word_start[end..];
    if bracketed {
        after = after.strip_prefix(']')?;
    }
    // The level is a word of its own: followed by the end, a space or a separator.
    match after.chars().next() {
        None => Some((level, after)),
        Some(c) if c.is_whitespace() || c == ':' || c == '-' || c == '|' || c == ']' => Some((level, after)),
        Some(_) => None,
    }
}

/// Spaces and one separator (`-`, `:`, `|`) between prefix fields.
fn skip_separators(text: &str) -> &str {
    let text = text.trim_start();
    match text.strip_prefix(['-', ':', '|']) {
        Some(after) if after.is_empty() || after.starts_with(char::is_whitespace) => after.trim_start(),
        _ => text,
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

#[cfg(test)]
mod tests {
    use super::{worker_line, WorkerLevel};

    #[test]
    fn a_worker_line_keeps_no_timestamp_of_its_own() {
        let cases: &[(&str, Option<WorkerLevel>, &str)] = &[
            // sdgate sim (tracing's text format)
            (
                "2026-11-26T06:31:00.123456Z  INFO sdgate::tools::sim: sim worker listening addr=127.0.0.1:17860",
                Some(WorkerLevel::Info),
                "sim worker listening addr=127.0.0.1:17860",
            ),
            ("2026-11-26T06:31:00.123Z  WARN sdgate::tools::sim: slow", Some(WorkerLevel::Warn), "slow"),
            // A module path without a level is left alone; so is a colon in prose.
            ("sdgate::tools::sim: no level", None, "sdgate::tools::sim: no level"),
            ("2026-11-26 06:31:00,123 INFO Note: weights cached", Some(WorkerLevel::Info), "Note: weights cached"),
            // Python logging with asctime
            ("2026-11-26 06:31:00,123 - ERROR - model not found", Some(WorkerLevel::Error), "model not found"),
            ("2026-11-26 06:31:00,123 INFO Loading weights", Some(WorkerLevel::Info), "Loading weights"),
            // env_logger, Go's log, an offset
            ("[2026-11-26T06:31:00Z DEBUG worker] tick", Some(WorkerLevel::Debug), "worker] tick"),
            ("2026/11/26 06:31:00 listening on :7860", None, "listening on :7860"),
            ("2026-11-26T06:31:00+01:00 [WARNING] low memory", Some(WorkerLevel::Warn), "low memory"),
            // uvicorn: a level, no timestamp
            (
                "INFO:     127.0.0.1:50000 - \"POST /sdapi/v1/txt2img HTTP/1.1\" 200 OK",
                Some(WorkerLevel::Info),
                "127.0.0.1:50000 - \"POST /sdapi/v1/txt2img HTTP/1.1\" 200 OK",
            ),
            // Lines that have neither stay as they are.
            ("Model loaded in 4.2s (load weights: 3.1s)", None, "Model loaded in 4.2s (load weights: 3.1s)"),
            ("Error: CUDA out of memory", None, "Error: CUDA out of memory"),
            ("100%|##########| 20/20 [00:01<00:00, 14.2it/s]", None, "100%|##########| 20/20 [00:01<00:00, 14.2it/s]"),
            ("2026-11-26 is the date", None, "2026-11-26 is the date"),
            ("2026-11-26T06:31:00Z", None, "2026-11-26T06:31:00Z"),
            ("INFOS sent", None, "INFOS sent"),
            ("", None, ""),
        ];
        for (line, level, text) in cases {
            assert_eq!(worker_line(line), (*level, *text), "{line:?}");
        }
    }
}
