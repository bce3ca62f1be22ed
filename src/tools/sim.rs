//! `sdgate sim`: a fake Stable Diffusion WebUI (AUTOMATIC1111 API shape) for
//! the demo, the tests and the benchmarks.
//!
//! Like the real one it serialises generations on one lock, so a second
//! request sent to a busy worker silently waits inside it; the worker counts
//! such overlaps, which a correct gateway never causes. Like the real one it
//! finishes a generation whose client has left (unless
//! `--cancel-on-disconnect`), answers malformed JSON with 422, and returns
//! a decodable PNG (base64). Cheap calls (progress, interrupt, ping) answer
//! during a generation.
//!
//! Like the real one (1.6 and later) it holds one checkpoint
//! (`--checkpoint`) and loads another when a request names it in
//! `override_settings.sd_model_checkpoint`, taking `--load-time` inside the
//! generation lock; `override_settings_restore_afterwards` (default true)
//! keeps its setting, so a later request that names none loads the setting
//! back. Answers' `info` has `sd_model_name` and `sd_model_hash`; `GET
//! /sdapi/v1/options` has `sd_model_checkpoint` (the setting's title) and
//! `POST /sdapi/v1/options` changes it (and loads it).
//!
//! Like the real one's server (uvicorn on h11) it answers 400 to an
//! HTTP/1.1 request without a Host header (or with two), or with a
//! transfer coding other than chunked, before any route sees it.
//!
//! Routes: POST `/sdapi/v1/txt2img` and `/sdapi/v1/img2img`; GET
//! `/sdapi/v1/progress`; POST `/sdapi/v1/interrupt` and `/sdapi/v1/skip`; GET
//! `/sdapi/v1/options`; GET `/internal/ping`; a websocket echo at
//! `/queue/join`; server-sent events at `/sim/events?count=N&interval_ms=M`;
//! GET `/sim/stats`; GET `/sim/headers` (the request's headers, as JSON).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{handshake::derive_accept_key, protocol::Role};
use tokio_tungstenite::WebSocketStream;

use crate::body::{self, ResponseBody};
use crate::gate::normalize_checkpoint;

/// How a fake worker behaves.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// The checkpoint it holds (and is set to) at start.
    pub checkpoint: String,
    /// Time a checkpoint load takes.
    pub load_time: Duration,
    /// The checkpoints it has (empty: any name is one it has). A request
    /// naming another runs on the setting, as the WebUI does.
    pub available: Vec<String>,
    /// Time one sampling step takes.
    pub step_time: Duration,
    /// Size of the base64 image in each generation's response.
    pub image_bytes: usize,
    /// Name reported in the `X-Worker` header; defaults to `sim-PORT`.
    pub name: Option<String>,
    /// Stop a generation when its client disconnects. The real WebUI does
    /// not (FastAPI runs the job to the end), and neither does the sim by
    /// default: a gateway must not be tested against a kinder worker.
    pub cancel_on_disconnect: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            checkpoint: "sim".into(),
            load_time: Duration::ZERO,
            available: Vec::new(),
            step_time: Duration::from_millis(50),
            image_bytes: 64 * 1024,
            name: None,
            cancel_on_disconnect: false,
        }
    }
}

/// What a worker has seen, from `/sim/stats`.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct SimStats {
    pub name: String,
    /// Generations answered.
    pub served: u64,
    /// Generation requests inside the worker right now (running or waiting
    /// for the generation lock).
    pub inflight: u64,
    /// The most generation requests ever inside the worker at once.
    pub max_inflight: u64,
    /// Generation requests that arrived while another was inside.
    pub overlaps: u64,
    /// Interrupt calls received.
    pub interrupts: u64,
    /// Checkpoint loads (after the one at start).
    #[serde(default)]
    pub loads: u64,
    /// Images generated (`batch_size` x `n_iter` of each generation).
    #[serde(default)]
    pub images: u64,
    /// The checkpoint it holds now.
    #[serde(default)]
    pub checkpoint: String,
    /// The latest generations (at most 1000), oldest first.
    pub jobs: Vec<JobRecord>,
}

/// One generation: its prompt, and when it arrived and ended, in microseconds
/// since the first sim of this process started (comparable across the sims
/// of one process).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct JobRecord {
    pub prompt: String,
    pub arrived_us: u64,
    pub ended_us: u64,
    pub interrupted: bool,
    /// The checkpoint it ran on, and whether it was loaded for it.
    #[serde(default)]
    pub checkpoint: String,
    #[serde(default)]
    pub loaded: bool,
    /// Images it made.
    #[serde(default)]
    pub images: u64,
}

const JOB_HISTORY: usize = 1000;

struct State {
    options: SimOptions,
    name: HeaderValue,
    name_text: String,
    image: String,
    inflight: AtomicU64,
    max_inflight: AtomicU64,
    overlaps: AtomicU64,
    served: AtomicU64,
    interrupts: AtomicU64,
    loads: AtomicU64,
    images: AtomicU64,
    /// What it holds and is set to (changed under the generation lock).
    model: Mutex<Model>,
    generation: tokio::sync::Mutex<()>,
    progress: Mutex<Progress>,
    jobs: Mutex<VecDeque<JobRecord>>,
}

/// The checkpoint in memory, and the setting (`sd_model_checkpoint`).
struct Model {
    loaded: String,
    setting: String,
}

#[derive(Default, Clone, Copy)]
struct Progress {
    step: u32,
    steps: u32,
    running: bool,
    interrupted: bool,
}

/// A running in-process worker.
pub struct SimHandle {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl SimHandle {
    pub fn stats(&self) -> SimStats {
        self.state.stats()
    }

    /// Stops accepting connections (open ones finish their requests).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Microseconds since the first sim of this process started: the clock of
/// [`JobRecord`] times.
pub fn micros_since_origin() -> u64 {
    origin().elapsed().as_micros() as u64
}

/// Starts a worker on `listener` in this process.
pub fn spawn(listener: TcpListener, options: SimOptions) -> Result<SimHandle> {
    let addr = listener.local_addr()?;
    let state = Arc::new(State::new(options, addr.port()));
    let task = tokio::spawn(serve(listener, state.clone()));
    Ok(SimHandle { addr, state, task })
}

/// Runs a worker until the process ends: waits `startup_delay` (a model
/// loading), then opens `addr`.
pub async fn run(addr: SocketAddr, startup_delay: Duration, options: SimOptions) -> Result<()> {
    origin();
    tokio::time::sleep(startup_delay).await;
    let listener = TcpListener::bind(addr).await.with_context(|| format!("sim: cannot bind {addr}"))?;
    let state = Arc::new(State::new(options, listener.local_addr()?.port()));
    tracing::info!(addr = %listener.local_addr()?, name = %state.name_text, "sim worker listening");
    serve(listener, state).await;
    Ok(())
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    origin();
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(state.answer(request).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Counts a generation request inside the worker until dropped, also when
/// the connection closes mid-generation.
struct Inside<'a>(&'a State);

impl<'a> Inside<'a> {
    fn enter(state: &'a State) -> Self {
        let now = state.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_inflight.fetch_max(now, Ordering::SeqCst);
        if now > 1 {
            state.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        Inside(state)
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl State {
    fn new(options: SimOptions, port: u16) -> Self {
        let name_text = options.name.clone().unwrap_or_else(|| format!("sim-{port}"));
        let name = HeaderValue::from_str(&name_text).unwrap_or_else(|_| HeaderValue::from_static("sim"));
        let image = png_base64(options.image_bytes);
        let checkpoint = normalize_checkpoint(&options.checkpoint).to_string();
        Self {
            options,
            name,
            name_text,
            image,
            inflight: AtomicU64::new(0),
            max_inflight: AtomicU64::new(0),
            overlaps: AtomicU64::new(0),
            served: AtomicU64::new(0),
            interrupts: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            images: AtomicU64::new(0),
            model: Mutex::new(Model { loaded: checkpoint.clone(), setting: checkpoint }),
            generation: tokio::sync::Mutex::new(()),
            progress: Mutex::new(Progress::default()),
            jobs: Mutex::new(VecDeque::new()),
        }
    }

    fn stats(&self) -> SimStats {
        SimStats {
            name: self.name_text.clone(),
            served: self.served.load(Ordering::SeqCst),
            inflight: self.inflight.load(Ordering::SeqCst),
            max_inflight: self.max_inflight.load(Ordering::SeqCst),
            overlaps: self.overlaps.load(Ordering::SeqCst),
            interrupts: self.interrupts.load(Ordering::SeqCst),
            loads: self.loads.load(Ordering::SeqCst),
            images: self.images.load(Ordering::SeqCst),
            checkpoint: lock(&self.model).loaded.clone(),
            jobs: lock(&self.jobs).iter().cloned().collect(),
        }
    }

    async fn answer(self: &Arc<Self>, request: Request<Incoming>) -> Response<ResponseBody> {
        if let Some(refusal) = refusal(&request) {
            return refusal;
        }
        // Routed on the percent-decoded path, as uvicorn hands Starlette
        // `scope["path"]`: `/sdapi/v1/%69nterrupt` is the interrupt.
        let path = percent_decoded(request.uri().path());
        let mut response = match (request.method(), path.as_ref()) {
            (&Method::POST, "/sdapi/v1/txt2img" | "/sdapi/v1/img2img") => self.generate(request).await,
            (&Method::GET, "/sdapi/v1/progress") => json_response(self.progress()),
            (&Method::POST, "/sdapi/v1/interrupt" | "/sdapi/v1/skip") => {
                self.interrupts.fetch_add(1, Ordering::SeqCst);
                lock(&self.progress).interrupted = true;
                json_response(json!({}))
            }
            (&Method::GET, "/sdapi/v1/options") => {
                json_response(json!({"sd_model_checkpoint": title(&lock(&self.model).setting)}))
            }
            (&Method::POST, "/sdapi/v1/options") => self.set_options(request).await,
            (&Method::GET, "/internal/ping") => json_response(json!({})),
            (&Method::GET, "/sim/stats") => json_response(json!(self.stats())),
            (&Method::GET, "/sim/headers") => json_response(headers_json(&request)),
            (&Method::GET, "/sim/events") => events(&request),
            (&Method::GET, "/queue/join") => websocket_echo(request),
            _ => status_response(StatusCode::NOT_FOUND, "not found"),
        };
        response.headers_mut().insert("x-worker", self.name.clone());
        response
    }

    async fn generate(self: &Arc<Self>, request: Request<Incoming>) -> Response<ResponseBody> {
        let arrived_us = micros_since_origin();
        let payload = match request.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return status_response(StatusCode::BAD_REQUEST, "body read failed"),
        };
        let payload: Value = match serde_json::from_slice::<Value>(&payload) {
            Ok(value) if value.is_object() => value,
            _ if payload.is_empty() => json!({}),
            _ => return status_response(StatusCode::UNPROCESSABLE_ENTITY, "request body is not a JSON object"),
        };
        if self.options.cancel_on_disconnect {
            return self.run_job(payload, arrived_us).await;
        }
        // The job runs to its end even if the connection closes (the
        // handler's future is dropped, the task is not).
        let state = self.clone();
        match tokio::spawn(async move { state.run_job(payload, arrived_us).await }).await {
            Ok(response) => response,
            Err(_) => status_response(StatusCode::INTERNAL_SERVER_ERROR, "generation failed"),
        }
    }

    async fn run_job(&self, payload: Value, arrived_us: u64) -> Response<ResponseBody> {
        let _inside = Inside::enter(self);
        let steps = payload.get("steps").and_then(Value::as_u64).unwrap_or(20).clamp(1, 10_000) as u32;
        let prompt = payload.get("prompt").and_then(Value::as_str).unwrap_or("").to_string();
        // As the WebUI: batch_size images per iteration, n_iter iterations.
        let count = |key: &str| payload.get(key).and_then(Value::as_u64).unwrap_or(1).clamp(1, 100);
        let images = count("batch_size") * count("n_iter");
        let named = payload.pointer("/override_settings/sd_model_checkpoint").and_then(Value::as_str);
        let restore = payload.get("override_settings_restore_afterwards").and_then(Value::as_bool).unwrap_or(true);
        let _generation = self.generation.lock().await;
        // As the WebUI: the named checkpoint, else the setting, loaded first.
        let wanted = named
            .map(|name| normalize_checkpoint(name).into_owned())
            .filter(|name| !name.is_empty())
            .filter(|name| self.options.available.is_empty() || self.options.available.contains(name));
        let target = wanted.clone().unwrap_or_else(|| lock(&self.model).setting.clone());
        let loaded = self.load(&target).await;
        if let (Some(wanted), false) = (wanted, restore) {
            lock(&self.model).setting = wanted;
        }
        *lock(&self.progress) = Progress { step: 0, steps, running: true, interrupted: false };
        let mut interrupted = false;
        for step in 1..=steps {
            tokio::time::sleep(self.options.step_time).await;
            let mut progress = lock(&self.progress);
            progress.step = step;
            if progress.interrupted {
                interrupted = true;
                break;
            }
        }
        lock(&self.progress).running = false;
        let info = json!({
            "worker": self.name_text,
            "steps": steps,
            "interrupted": interrupted,
            "sd_model_name": target,
            "sd_model_hash": hash_of(&target),
            "all_seeds": (0..images).map(|i| 1000 + i).collect::<Vec<_>>(),
        })
        .to_string();
        let body =
            format!("{{\"images\":[\"{}\"],\"parameters\":{},\"info\":{}}}", self.image, payload, Value::String(info));
        self.served.fetch_add(1, Ordering::SeqCst);
        self.images.fetch_add(images, Ordering::SeqCst);
        let mut jobs = lock(&self.jobs);
        if jobs.len() == JOB_HISTORY {
            jobs.pop_front();
        }
        let ended_us = micros_since_origin();
        jobs.push_back(JobRecord { prompt, arrived_us, ended_us, interrupted, checkpoint: target, loaded, images });
        drop(jobs);
        with_json_type(Response::new(body::full(body)))
    }

    /// Loads `checkpoint` unless it is in memory (the caller holds the
    /// generation lock); returns whether it loaded.
    async fn load(&self, checkpoint: &str) -> bool {
        if lock(&self.model).loaded == checkpoint {
            return false;
        }
        tokio::time::sleep(self.options.load_time).await;
        lock(&self.model).loaded = checkpoint.to_string();
        self.loads.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// `POST /sdapi/v1/options`: a new `sd_model_checkpoint` setting is
    /// loaded at once, as the WebUI does.
    async fn set_options(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        let Ok(body) = request.into_body().collect().await.map(|b| b.to_bytes()) else {
            return status_response(StatusCode::BAD_REQUEST, "body read failed");
        };
        let Ok(options) = serde_json::from_slice::<Value>(&body) else {
            return status_response(StatusCode::UNPROCESSABLE_ENTITY, "request body is not JSON");
        };
        if let Some(name) = options.get("sd_model_checkpoint").and_then(Value::as_str) {
            let name = normalize_checkpoint(name).to_string();
            let _generation = self.generation.lock().await;
            lock(&self.model).setting = name.clone();
            self.load(&name).await;
        }
        json_response(json!(null))
    }

    fn progress(&self) -> Value {
        let p = *lock(&self.progress);
        let fraction = if p.running && p.steps > 0 { f64::from(p.step) / f64::from(p.steps) } else { 0.0 };
        let left = p.steps.saturating_sub(p.step);
        json!({
            "progress": fraction,
            "eta_relative": if p.running { self.options.step_time.as_secs_f64() * f64::from(left) } else { 0.0 },
            "state": {
                "job_count": u32::from(p.running),
                "sampling_step": p.step,
                "sampling_steps": p.steps,
                "interrupted": p.interrupted,
            },
            "current_image": null,
        })
    }
}

/// What the WebUI's server (uvicorn on h11) refuses before any route sees
/// the request, answered as it does; hyper, under the sim, already refuses
/// the rest of what h11 does (conflicting `Content-Length`, bad chunking,
/// obsolete line folding) with 400. A gateway that sends what h11 refuses
/// fails against the sim as it would against the WebUI.
fn refusal<B>(request: &Request<B>) -> Option<Response<ResponseBody>> {
    let headers = request.headers();
    let hosts = headers.get_all(header::HOST).iter().count();
    let http11_without_host = request.version() == http::Version::HTTP_11 && hosts == 0;
    if http11_without_host || hosts > 1 {
        // h11: "Missing mandatory Host: header" / "Found multiple Host: headers".
        return Some(plain_response(StatusCode::BAD_REQUEST, "Invalid HTTP request received."));
    }
    let encodings = headers.get_all(header::TRANSFER_ENCODING).iter().collect::<Vec<_>>();
    if !encodings.is_empty() && (encodings.len() > 1 || !encodings[0].as_bytes().eq_ignore_ascii_case(b"chunked")) {
        // h11: "Only Transfer-Encoding: chunked is supported"; uvicorn
        // answers every h11 error 400.
        return Some(plain_response(StatusCode::BAD_REQUEST, "Invalid HTTP request received."));
    }
    None
}

fn plain_response(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// `path` with every `%XX` decoded (lossily, as text), as uvicorn does.
/// (The proxy's rules match a fuller normalisation, `proxy::path`; tools
/// may not depend on the proxy, and a pod decodes, nothing more.)
fn percent_decoded(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains('%') {
        return path.into();
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&first, tail)) = rest.split_first() {
        let digits = tail.get(..2).filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        let hex = digits.and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (first, hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                rest = &tail[2..];
            }
            _ => {
                out.push(first);
                rest = tail;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned().into()
}

/// A checkpoint's title as the WebUI writes it: file name and short hash.
fn title(name: &str) -> String {
    format!("{name}.safetensors [{}]", hash_of(name))
}

/// A stand-in for a checkpoint's short hash (10 hex digits, FNV-1a).
fn hash_of(name: &str) -> String {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{:010x}", hash & 0xff_ffff_ffff)
}

/// A 1x1 grey PNG (signature, IHDR, IDAT), then IEND.
const PNG_HEAD: [u8; 55] = [
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00, 0x00, 0x00, 0x00, 0x3a, 0x7e, 0x9b, 0x55, 0x00, 0x00, 0x00, 0x0a, 0x49,
    0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x68, 0x00, 0x00, 0x00, 0x82, 0x00, 0x81, 0x77, 0xcd, 0x72, 0xb6,
];
const PNG_END: [u8; 12] = [0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82];

/// A decodable PNG, in base64, of about `size` characters: a 1x1 image plus
/// a private ancillary chunk (`sdPd`, skipped by decoders) as padding, the
/// size of a real answer's image.
pub fn png_base64(size: usize) -> String {
    let fixed = PNG_HEAD.len() + PNG_END.len() + 12;
    let padding = (size * 3 / 4).saturating_sub(fixed);
    let mut png = Vec::with_capacity(fixed + padding);
    png.extend_from_slice(&PNG_HEAD);
    let mut chunk = b"sdPd".to_vec();
    chunk.resize(4 + padding, 0);
    png.extend_from_slice(&(padding as u32).to_be_bytes());
    png.extend_from_slice(&chunk);
    png.extend_from_slice(&crc32(&chunk).to_be_bytes());
    png.extend_from_slice(&PNG_END);
    base64(&png)
}

/// CRC-32 (IEEE), as PNG chunks carry.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let n = group.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn with_json_type(mut response: Response<ResponseBody>) -> Response<ResponseBody> {
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn json_response(value: Value) -> Response<ResponseBody> {
    with_json_type(Response::new(body::full(value.to_string())))
}

fn status_response(status: StatusCode, detail: &str) -> Response<ResponseBody> {
    let mut response = json_response(json!({ "detail": detail }));
    *response.status_mut() = status;
    response
}

/// The request's headers as a JSON object (for checking what a proxy sends).
fn headers_json(request: &Request<Incoming>) -> Value {
    let map: serde_json::Map<String, Value> = request
        .headers()
        .iter()
        .map(|(name, value)| (name.to_string(), Value::String(value.to_str().unwrap_or("").to_string())))
        .collect();
    Value::Object(map)
}

fn query_number(request: &Request<Incoming>, key: &str, default: u64) -> u64 {
    request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(default)
}

/// `count` server-sent events, `interval_ms` apart, each sent as it is made.
fn events(request: &Request<Incoming>) -> Response<ResponseBody> {
    let count = query_number(request, "count", 5);
    let interval = Duration::from_millis(query_number(request, "interval_ms", 100));
    let stream = futures_util::stream::unfold(0u64, move |i| async move {
        if i == count {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        let frame = Frame::data(Bytes::from(format!("data: {i}\n\n")));
        Some((Ok::<_, body::BoxError>(frame), i + 1))
    });
    let mut response = Response::new(StreamBody::new(stream).boxed_unsync());
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Accepts a websocket and echoes its text and binary messages.
fn websocket_echo(mut request: Request<Incoming>) -> Response<ResponseBody> {
    let Some(key) = request.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return status_response(StatusCode::BAD_REQUEST, "websocket upgrade expected");
    };
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = socket.next().await {
            if message.is_close() {
                break;
            }
            let echo = message.is_text() || message.is_binary();
            if echo && socket.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}
