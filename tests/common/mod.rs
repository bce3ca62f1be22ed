//! Shared test harness: real listeners on 127.0.0.1 port 0, in-process sim
//! workers, a gateway in-process or as the real binary, and waiting on
//! conditions with a deadline instead of sleeping.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use sdgate::proxy::Proxy;
use sdgate::tools::sim::{SimHandle, SimOptions, SimStats};
use sdgate::{Config, Gateway};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const HOST: &str = "stable-diffusion.default.example.com";

/// Starts `n` in-process sim workers.
pub async fn sims(n: usize, options: SimOptions) -> Vec<SimHandle> {
    let mut out = Vec::new();
    for _ in 0..n {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sim");
        out.push(sdgate::tools::sim::spawn(listener, options.clone()).expect("spawn sim"));
    }
    out
}

pub fn fast_sim(step_ms: u64) -> SimOptions {
    SimOptions { step_time: Duration::from_millis(step_ms), image_bytes: 1024, ..SimOptions::default() }
}

/// A free port on 127.0.0.1 (bound and released).
pub async fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A one-service config in front of `backends` with the given
/// `container_concurrency`; `extra` is appended to the service (YAML lines
/// indented by four spaces).
pub fn config_yaml(backends: &[SocketAddr], cc: u32, extra: &str) -> String {
    let fixed: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ndrain_timeout: 10s\nservices:\n  - name: sd\n    hosts: [\"{HOST}\"]\n    container_concurrency: {cc}\n    readiness: {{ http: /internal/ping, period: 20ms }}\n    backend: {{ fixed: [{}] }}\n{extra}",
        fixed.join(", ")
    )
}

/// `yaml` (a whole config) with `limits: { LIMITS }`.
pub fn with_limits(limits: &str, yaml: String) -> String {
    format!("limits: {{ {limits} }}\n{yaml}")
}

/// `yaml` (a whole config) with `threads` serving threads.
pub fn with_threads(yaml: &str, threads: usize) -> String {
    format!("threads: {threads}\n{yaml}")
}

/// A gateway running in this process.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub proxy: Arc<Proxy>,
    /// The first service's desired replica count (its provider's scale calls).
    pub desired: tokio::sync::watch::Receiver<u32>,
    /// Hands the running gateway a new config.
    pub reloader: sdgate::serve::reload::Reloader,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestGateway {
    pub async fn start(yaml: &str) -> Self {
        let config = Config::from_yaml(yaml).expect("valid test config");
        let gateway = Gateway::bind(config).await.expect("bind gateway");
        let addr = gateway.local_addr().expect("addr");
        let admin = gateway.admin_addr().expect("admin addr");
        let proxy = gateway.proxy().clone();
        let desired = gateway.desired(0).expect("one service");
        let reloader = gateway.reloader();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.run(async move {
            let _ = stopped.await;
        }));
        Self { addr, admin, proxy, desired, reloader, stop: Some(stop), task }
    }

    /// Starts a gateway in front of `backends` and waits until they are all ready.
    pub async fn in_front_of(backends: &[SocketAddr], cc: u32, extra: &str) -> Self {
        let gateway = Self::start(&config_yaml(backends, cc, extra)).await;
        let n = backends.len();
        gateway.wait_for(|g| g.ready_count() == n, "all endpoints ready").await;
        gateway
    }

    /// Waits until `check` holds for the first service's gate (5 s at most).
    pub async fn wait_for(&self, check: impl Fn(&sdgate::gate::Gate<sdgate::gate::Waiter>) -> bool, what: &str) {
        let gate = self.proxy.services()[0].gate.clone();
        eventually(what, || {
            let ok = gate.inspect(&check);
            async move { ok }
        })
        .await;
    }

    /// The first service's endpoints now.
    pub fn endpoints(&self) -> Vec<sdgate::gate::Endpoint> {
        self.proxy.services()[0].gate.inspect(|g| g.endpoints().to_vec())
    }

    pub fn queue_depth(&self) -> usize {
        self.proxy.services()[0].gate.inspect(|g| g.queue_depth())
    }

    pub fn inflight(&self) -> u32 {
        self.proxy.services()[0].gate.inspect(|g| g.inflight())
    }

    pub fn arrivals(&self) -> u64 {
        self.proxy.services()[0].gate.inspect(|g| g.arrivals())
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), &mut self.task).await;
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `check` every 5 ms until it holds; panics after 10 s.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(Duration::from_secs(10), what, check).await
}

/// Polls `check` every 5 ms until it holds; panics after `limit`.
pub async fn eventually_within<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An answer read in full.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| panic!("not JSON: {:?}", self.body))
    }

    pub fn worker(&self) -> String {
        self.headers.get("x-worker").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
    }

    /// Asserts a JSON error body naming the service.
    pub fn assert_json_error(&self, status: u16) {
        assert_eq!(self.status.as_u16(), status, "body: {:?}", self.body);
        assert_eq!(self.headers["content-type"], "application/json");
        let json = self.json();
        assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()), "{json}");
    }
}

pub async fn send(client: &TestClient, request: Request<Full<Bytes>>) -> Answer {
    let response: Response<_> = client.request(request).await.expect("request reaches the gateway");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer { status: parts.status, headers: parts.headers, body }
}

pub fn txt2img(addr: SocketAddr, prompt: &str, steps: u32) -> Request<Full<Bytes>> {
    txt2img_json(addr, serde_json::json!({ "prompt": prompt, "steps": steps }))
}

/// A txt2img request with this JSON body.
pub fn txt2img_json(addr: SocketAddr, body: serde_json::Value) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/sdapi/v1/txt2img"))
        .header("host", HOST)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// A GET without a Host header (the admin listener's pages).
pub fn plain_get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).expect("request")
}

/// The admin listener's `/status`.
pub async fn status(admin: SocketAddr) -> serde_json::Value {
    let answer = send(&client(), plain_get(admin, "/status")).await;
    assert_eq!(answer.status.as_u16(), 200);
    answer.json()
}

pub fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}")).header("host", HOST).body(Full::new(Bytes::new())).expect("request")
}

/// Asserts that no worker ever held two generations.
pub fn assert_no_overlap(stats: &[SimStats]) {
    for s in stats {
        assert_eq!(s.overlaps, 0, "{} saw overlapping generations", s.name);
        assert!(s.max_inflight <= 1, "{} had {} generations at once", s.name, s.max_inflight);
    }
}

/// A raw HTTP/1.1 request written on a socket, to model clients that leave.
pub async fn raw_request(addr: SocketAddr, prompt: &str, steps: u32) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::json!({ "prompt": prompt, "steps": steps }).to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /sdapi/v1/txt2img HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream
}

/// Writes `request` on a new connection; reads until the server closes it
/// or 2 s pass.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).to_string()
}

/// An HTTP/2 connection (prior knowledge) to `addr`, driven in the background.
pub async fn h2_sender(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let io = hyper_util::rt::TokioIo::new(stream);
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("h2 handshake");
    tokio::spawn(connection);
    sender
}

/// The sdgate binary built for these tests.
pub fn sdgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sdgate")
}

/// A gateway running as the real binary (for signals and memory).
pub struct GatewayProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// Its log (stdout), line by line as written.
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
    _config: TempFile,
}

impl GatewayProcess {
    pub async fn start(yaml: &str) -> Self {
        let config = TempFile::new("yaml", yaml);
        let mut child = tokio::process::Command::new(sdgate_bin())
            .arg("--config")
            .arg(&config.path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start sdgate");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (mut addr, mut admin) = (None, None);
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("sdgate listening") {
                    addr = address_after(&line, "listen=");
                    admin = address_after(&line, "admin=");
                    break;
                }
            }
        })
        .await;
        assert!(found.is_ok(), "sdgate did not report its listen address");
        // Keep reading stdout so the child never blocks on a full pipe.
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                kept.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Self { child, addr: addr.expect("listen address"), admin: admin.expect("admin address"), log, _config: config }
    }

    /// The first log line containing every one of `parts`, once written (5 s at most).
    pub async fn log_line(&self, parts: &[&str]) -> String {
        let mut found = None;
        eventually_within(Duration::from_secs(5), &format!("a log line with {parts:?}"), || {
            let lines = self.log.lock().unwrap_or_else(|p| p.into_inner());
            found = lines.iter().find(|line| parts.iter().all(|part| line.contains(part))).cloned();
            let ok = found.is_some();
            async move { ok }
        })
        .await;
        found.unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill").arg(format!("-{name}")).arg(self.pid().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} failed");
    }
}

/// The address after `key` (`listen=`, `admin=`) in a log line.
pub fn address_after(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(key)? + key.len();
    let rest = line[start..].trim_start_matches('"');
    let end = rest.find(|c: char| c == '"' || c.is_whitespace()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Reads the value of a metric line (exact name with labels) from a scrape.
pub async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let answer =
        send(&client(), Request::get(format!("http://{admin}/metrics")).body(Full::new(Bytes::new())).ok()?).await;
    let text = String::from_utf8_lossy(&answer.body).to_string();
    text.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

/// A file removed on drop.
pub struct TempFile {
    pub path: std::path::PathBuf,
}

impl TempFile {
    pub fn new(extension: &str, contents: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "sdgate-test-{}-{}.{extension}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, contents).expect("write temp file");
        Self { path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Pids of live processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Zombies (state Z) have exited; they only wait to be reaped.
            let zombie = stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
            !zombie && String::from_utf8_lossy(&cmdline).contains(marker)
        })
        .collect()
}

/// A marker unique to this test run, to find its worker processes by.
pub fn unique_marker(name: &str) -> String {
    format!("sdgate-test-{name}-{}-{}", std::process::id(), free_port_sync())
}

fn free_port_sync() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// Waits until exactly `count` processes carry `marker` on their command line.
pub async fn processes_become(marker: &str, count: usize, what: &str) {
    eventually(what, || {
        let n = processes_with(marker).len();
        async move { n == count }
    })
    .await;
}

/// A base port with `count` free ports after it (checked now; tests pick
/// distinct random bases so parallel tests do not collide).
pub fn free_port_range(count: u16) -> u16 {
    loop {
        let base = 20_000 + fastrand::u16(0..4000) * 10;
        if (base..base + count).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
}

/// A config whose one service is a pool of `sdgate sim` worker processes
/// tagged with `marker` (their `--name`), on ports from `port_base`.
pub fn pool_yaml(marker: &str, port_base: u16, startup: &str, scale: &str, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ndrain_timeout: 10s\nservices:\n  - name: sd\n    hosts: [\"{HOST}\"]\n    container_concurrency: 1\n    readiness: {{ http: /internal/ping, period: 20ms }}\n    scale: {{ {scale} }}\n    backend:\n      process:\n        command: [\"{}\", \"sim\", \"--port\", \"{{port}}\", \"--startup-delay\", \"{startup}\", \"--step-time\", \"10ms\", \"--name\", \"{marker}-{{index}}\"]\n        port_base: {port_base}\n        stop_grace: 2s\n{extra}",
        sdgate_bin()
    )
}

/// Starts `command` with this open-files limit (soft, hard).
pub fn with_open_files_limit(command: &mut std::process::Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child before exec.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

// ---------------------------------------------------------------- affinity

pub const KEY: &str = "test key, current";
pub const PREVIOUS_KEY: &str = "test key, previous";

/// Affinity lines for `config_yaml`, with key files that outlive the test body.
pub fn affinity(mode: &str, keys: &(TempFile, TempFile), extra: &str) -> String {
    format!(
        "    affinity: {{ cookie: sd, timeout: 1800s, mode: {mode}, header: X-Session-Key, key_file: \"{}\", previous_key_file: \"{}\" }}\n{extra}",
        keys.0.path.display(),
        keys.1.path.display()
    )
}

pub fn keys() -> (TempFile, TempFile) {
    (TempFile::new("key", KEY), TempFile::new("key", PREVIOUS_KEY))
}

/// A client that keeps the `sd` cookie like a browser.
#[derive(Clone, Default)]
pub struct Jar {
    pub cookie: Option<String>,
}

impl Jar {
    pub fn with(cookie: &str) -> Self {
        Self { cookie: Some(cookie.to_string()) }
    }

    pub fn prepare(&self, mut request: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
        if let Some(cookie) = &self.cookie {
            request.headers_mut().insert("cookie", format!("theme=dark; sd={cookie}").parse().unwrap());
        }
        request
    }

    /// Sends, keeps the cookie it is given, and returns the answer.
    pub async fn send(&mut self, client: &TestClient, request: Request<Full<Bytes>>) -> Answer {
        let answer = send(client, self.prepare(request)).await;
        if let Some(value) = set_cookie(&answer) {
            self.cookie = Some(value);
        }
        answer
    }
}

/// The `sd` value of an answer's Set-Cookie.
pub fn set_cookie(answer: &Answer) -> Option<String> {
    let header = answer.headers.get("set-cookie")?.to_str().ok()?;
    let value = header.strip_prefix("sd=")?.split(';').next()?;
    Some(value.to_string())
}

/// PostgreSQL on 127.0.0.1 (`SDGATE_TEST_POSTGRES`, else the machine's
/// `test` database as root): a fresh table for the test, dropped after.
/// None (SKIP) when it cannot be reached, unless `SDGATE_JOBS_POSTGRES=required`.
pub async fn postgres_table(name: &str) -> Option<(String, String)> {
    let url =
        std::env::var("SDGATE_TEST_POSTGRES").unwrap_or_else(|_| "host=127.0.0.1 user=root dbname=test".to_string());
    let table = format!("sdgate_test_{}_{}", name, std::process::id());
    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            client.batch_execute(&format!("DROP TABLE IF EXISTS {table}")).await.expect("drop the test table");
            Some((url, table))
        }
        Err(error) if std::env::var("SDGATE_JOBS_POSTGRES").as_deref() == Ok("required") => {
            panic!("PostgreSQL is required (SDGATE_JOBS_POSTGRES=required) and cannot be reached at {url:?}: {error}")
        }
        Err(error) => {
            println!("SKIP: PostgreSQL cannot be reached at {url:?}: {error}");
            None
        }
    }
}

/// A small HTTP/1 server on 127.0.0.1 port 0 answering every request with
/// `answer(request head)` (a JWKS, a forward-auth service): its address.
pub async fn serve_fn<F>(answer: F) -> SocketAddr
where
    F: Fn(&http::request::Parts) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    use hyper::service::service_fn;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a test server");
    let addr = listener.local_addr().expect("its address");
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (parts, _) = request.into_parts();
                    let response = answer(&parts);
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    addr
}

/// A scratch directory, removed at the end.
pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(unique_marker("sdgate-test"));
        std::fs::create_dir_all(&path).expect("temp dir");
        Self { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
