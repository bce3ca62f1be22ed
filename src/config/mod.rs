//! The YAML configuration: schema, defaults, and validation whose messages
//! name the key at fault (`services[0].queue.timeout: ...`).
//!
//! Unknown keys are errors (a typo must not silently fall back to a default).
//! Durations are written as "300s", "100ms", "5m".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The configuration `sdgate` runs with when given no `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.yaml");

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where clients connect.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where /metrics, /healthz and /readyz are served; omit to disable.
    #[serde(default = "default_admin")]
    pub admin: Option<SocketAddr>,
    /// On SIGTERM/SIGINT, how long queued and in-flight requests may take to
    /// finish before sdgate exits anyway.
    #[serde(default = "default_drain", with = "duration")]
    pub drain_timeout: Duration,
    #[serde(default)]
    pub limits: Limits,
    /// Whether a 404 for an unknown host lists the hosts sdgate serves:
    /// `auto` (when `listen` is a loopback address), `always` or `never`.
    /// On a public listener host names are for clients that know them.
    #[serde(default)]
    pub list_hosts: ListHosts,
    /// Threads serving client connections, each with its own single-threaded
    /// runtime and pod connection pool; 0 = one per CPU.
    #[serde(default)]
    pub threads: usize,
    /// Several replicas, one active (Kubernetes Lease). Omitted: on when a
    /// service has a `kubernetes` backend (a Lease named after its
    /// Deployment), so two replicas can never both dispatch to its pods;
    /// `off` turns it off (one replica only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader_election: Option<Election>,
    /// On SIGTERM, how long sdgate keeps accepting and serving with
    /// `/readyz` answering 503, so load balancers stop sending before it
    /// stops listening; then it drains (`drain_timeout`). SIGINT (Ctrl-C)
    /// drains at once.
    #[serde(default = "default_shutdown_delay", with = "duration")]
    pub shutdown_delay: Duration,
    /// Lets two services be in front of one pod (a fixed address, a
    /// process port, a Deployment). Each service counts the pod's slots and
    /// jobs on its own, so `container_concurrency` and job ownership then
    /// hold per service only: refused unless this is true. One pod under
    /// several host names is one service with several `hosts` (or routes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_shared_pods: bool,
    /// The SHA-256 (hex) of the key the admin listener asks for
    /// (`Authorization: Bearer KEY`) on everything but `/healthz` and
    /// `/readyz`; omitted: open (keep it off public networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_key_sha256: Option<String>,
    /// TLS on the public listener (certificates per host by SNI); omitted:
    /// plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Async jobs (`Prefer: respond-async`, a service's `async_paths`):
    /// where they are kept and for how long. Omitted: off (such requests
    /// are served as they come, the preference ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<JobsConfig>,
    pub services: Vec<ServiceConfig>,
    /// Weighted splits of hosts across services (revisions of a model); a
    /// service's own `hosts` are a route to it alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
}

/// `leader_election`: settings for a Lease, or `off`.
#[derive(Clone, Debug)]
pub enum Election {
    Off,
    On(LeaderElection),
}

impl Serialize for Election {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Election::Off => serializer.serialize_str("off"),
            Election::On(settings) => settings.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Election {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let value = serde_yaml::Value::deserialize(deserializer)?;
        match &value {
            serde_yaml::Value::String(word) if word == "off" => Ok(Election::Off),
            serde_yaml::Value::Bool(false) => Ok(Election::Off),
            serde_yaml::Value::String(word) => {
                Err(serde::de::Error::custom(format!("{word:?}: write `off`, or the Lease's settings")))
            }
            _ => serde_yaml::from_value(value).map(Election::On).map_err(serde::de::Error::custom),
        }
    }
}

impl Config {
    /// Refuses two services in front of one pod (see `allow_shared_pods`).
    fn refuse_shared_pods(&self) -> Result<()> {
        let mut owner: HashMap<String, usize> = HashMap::new();
        for (i, service) in self.services.iter().enumerate() {
            for pod in service.pods() {
                if let Some(first) = owner.insert(pod.clone(), i).filter(|first| *first != i) {
                    bail!(
                        "services[{i}].backend: {pod} is also services[{first}]'s pod ({:?}): each service would count its slots and jobs apart, breaking container_concurrency; serve its hosts from one service (or set allow_shared_pods: true)",
                        self.services[first].name
                    );
                }
            }
        }
        Ok(())
    }
}

impl ServiceConfig {
    /// What names the pods of this service, to find two services in front
    /// of one: fixed addresses, a process pool's ports, a Deployment.
    fn pods(&self) -> Vec<String> {
        match &self.backend {
            Backend::Fixed(addrs) => addrs.iter().map(|a| a.trim().to_ascii_lowercase()).collect(),
            Backend::Process(process) => (0..self.scale.max.min(u32::from(u16::MAX)))
                .map(|i| SocketAddr::new(process.host, process.port_for(i)).to_string())
                .collect(),
            Backend::Kubernetes(k) => {
                vec![format!("Deployment {}/{}", k.namespace, k.deployment)]
            }
        }
    }
}

/// The namespace sdgate runs in: `POD_NAMESPACE` (the downward API), else
/// the service account's namespace file (in a pod), else `default`.
pub fn pod_namespace() -> String {
    const FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
    namespace_from(std::env::var("POD_NAMESPACE").ok(), std::fs::read_to_string(FILE).ok())
}

fn namespace_from(env: Option<String>, file: Option<String>) -> String {
    [env, file]
        .into_iter()
        .flatten()
        .map(|n| n.trim().to_string())
        .find(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// Service keys that do nothing with a `fixed` backend.
const INERT_WITH_FIXED: [&str; 2] = ["scale", "wake"];

/// See [`Config::list_hosts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListHosts {
    #[default]
    Auto,
    Always,
    Never,
}

impl Config {
    /// Whether a 404 for an unknown host lists the hosts (see `list_hosts`).
    pub fn lists_hosts(&self) -> bool {
        match self.list_hosts {
            ListHosts::Auto => self.listen.ip().is_loopback(),
            ListHosts::Always => true,
            ListHosts::Never => false,
        }
    }

    /// The host names clients can send (services' and routes'), in config
    /// order, without `*`.
    pub fn host_names(&self) -> Vec<String> {
        let mut hosts: Vec<String> = Vec::new();
        let all = self.routes.iter().flat_map(|r| &r.hosts).chain(self.services.iter().flat_map(|s| &s.hosts));
        for host in all {
            if host != "*" && !hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
                hosts.push(host.clone());
            }
        }
        hosts
    }
}

/// Hosts whose requests are split across services by weight; a session
/// stays on the service it started on while that service is in the split.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The route's name in metrics, /status and errors; default: its first host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub hosts: Vec<String>,
    pub split: Vec<SplitConfig>,
    /// The class of requests that come through this route (default: each
    /// service's own `priority`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<PriorityConfig>,
}

/// A request's class: `interactive` goes first; `batch` yields to
/// `fairness.batch_delay` interactive requests, then takes its turn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PriorityConfig {
    #[default]
    Interactive,
    Batch,
}

/// What tells clients apart for fair share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FairnessKey {
    /// The client's address (the last `X-Forwarded-For` hop when the
    /// connection comes from one of `trusted_proxies`).
    #[default]
    Address,
    /// The session (the affinity cookie or session header); else the address.
    Session,
    /// A request header (e.g. `X-Api-Key`, `Authorization`), hashed and never
    /// logged; else the address.
    Header,
}

/// Fair share between the clients of one service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FairnessConfig {
    pub key: FairnessKey,
    /// The header for `key: header`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Proxies (addresses or CIDR blocks) whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
    /// Requests one client may have waiting; more get 429 (0: no bound).
    pub max_queued: usize,
    /// Interactive requests a batch request yields to before its turn.
    pub batch_delay: u64,
}

impl Default for FairnessConfig {
    fn default() -> Self {
        Self { key: FairnessKey::Address, header: None, trusted_proxies: Vec::new(), max_queued: 0, batch_delay: 20 }
    }
}

/// An address or a CIDR block (`10.0.0.0/8`, `::1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpBlock {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpBlock {
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || anyhow::anyhow!("{text:?} is not an address or CIDR block");
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix.parse::<u8>().map_err(|_| bad())?)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        match (self.addr, ip) {
            (std::net::IpAddr::V4(block), std::net::IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(block) & mask == u32::from(ip) & mask
            }
            (std::net::IpAddr::V6(block), std::net::IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(block) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    pub service: String,
    /// A share of the route's new sessions (relative to the other weights);
    /// 0: no new ones, the service keeps its sessions.
    pub weight: u32,
}

impl RouteConfig {
    pub fn name(&self) -> &str {
        self.name.as_deref().or(self.hosts.first().map(String::as_str)).unwrap_or("")
    }
}

/// Protection against slow or oversized client input.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// A client must send its full request head within this time (slowloris).
    #[serde(default = "default_header_read_timeout", with = "duration")]
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in progress is closed after
    /// this long (HTTP/1 and HTTP/2).
    #[serde(default = "default_idle_timeout", with = "duration")]
    pub idle_timeout: Duration,
    /// Larger request heads are answered 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Larger request bodies are answered 413; omit for no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// Request bodies up to this size are read in full before the request
    /// takes a pod (a slow upload holds no pod); larger ones stream.
    #[serde(default = "default_buffer_body_bytes")]
    pub buffer_body_bytes: usize,
    /// A request body must arrive within this, and a streamed one (over
    /// `buffer_body_bytes`) may pause no longer than this between bytes
    /// (408 otherwise; the pod is freed without blame).
    #[serde(default = "default_body_read_timeout", with = "duration")]
    pub body_read_timeout: Duration,
    /// Pod answers up to this size are read in full before the client gets
    /// them, so the pod is free when it has answered, not when a slow client
    /// has read; larger ones, server-sent events and websockets stream.
    #[serde(default = "default_buffer_response_bytes")]
    pub buffer_response_bytes: usize,
    /// A tunnel through sdgate (a websocket, another upgrade) with no byte
    /// either way for this long is closed, and its pod freed.
    #[serde(default = "default_tunnel_idle_timeout", with = "duration")]
    pub tunnel_idle_timeout: Duration,
    /// A client that takes no byte of an answer for this long is cut; a
    /// streamed answer is still read from the pod to its end, so the pod
    /// is freed when it is done.
    #[serde(default = "default_send_timeout", with = "duration")]
    pub send_timeout: Duration,
    /// A kept-alive connection to a pod idle this long is closed rather than
    /// reused: keep it below the pod server's keep-alive (uvicorn, which
    /// serves the WebUI: 5 s by default, 30 s as the WebUI starts it; aiohttp: 3630 s), or a request may be
    /// sent just as the pod closes the connection.
    #[serde(default = "default_pod_idle_timeout", with = "duration")]
    pub pod_idle_timeout: Duration,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    /// Host names routed here (case-insensitive, port ignored); "*" makes this
    /// the default service. May be empty for a service reached through `routes`.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Requests one pod may hold at once; 0 = unlimited.
    #[serde(default = "default_cc")]
    pub container_concurrency: u32,
    #[serde(default)]
    pub queue: QueueConfig,
    /// After dispatch, how long the pod may take to start its response.
    #[serde(default = "default_request_timeout", with = "duration")]
    pub request_timeout: Duration,
    /// Path prefixes that skip the gate (no slot taken): cheap calls made
    /// during a generation, such as progress polling.
    #[serde(default = "default_bypass")]
    pub bypass: Vec<String>,
    /// Paths (exact, query ignored) that act on or reveal a pod's current
    /// job: they reach a pod only for the session whose request runs there;
    /// sdgate answers the others itself (progress: idle, with the caller's
    /// place in line; anything else: 409).
    #[serde(default = "default_owner_only")]
    pub owner_only: Vec<String>,
    /// Path prefixes whose requests may wake a service at zero pods; other
    /// requests then get 503 at once (a port scan or a browser's favicon
    /// must not start a GPU pod). `"/"` matches the root page only.
    #[serde(default = "default_wake")]
    pub wake: Vec<String>,
    /// How many times a request is sent to another pod when the connection to
    /// its pod failed before any byte was sent.
    #[serde(default = "default_connect_retries")]
    pub connect_retries: u32,
    #[serde(default)]
    pub readiness: Readiness,
    #[serde(default)]
    pub scale: ScaleConfig,
    /// Session affinity with a signed cookie; omit to disable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<AffinityConfig>,
    /// Fair share between clients waiting for a pod.
    #[serde(default)]
    pub fairness: FairnessConfig,
    /// The class of this service's requests (a route may set another).
    #[serde(default)]
    pub priority: PriorityConfig,
    /// When a client leaves during its generation, POST this path to the pod
    /// (e.g. `/sdapi/v1/interrupt`) so it stops early. The slot is still held
    /// until the pod answers the original request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupt_on_disconnect: Option<String>,
    /// The protocols a client may upgrade a request to (`Upgrade`), each
    /// tunnelled to the pod holding a slot; any other upgrade is dropped
    /// from the request, which goes on as a plain one. Only websocket by
    /// default: `h2c` through to a pod that speaks it would be a connection
    /// beside the gate (generations no slot counts).
    #[serde(default = "default_upgrades")]
    pub upgrades: Vec<String>,
    /// How sdgate learns that a pod it gave up on (timeout, reset, client
    /// gone mid-answer) has finished the job: until then the pod is
    /// quarantined and takes no request. `null` turns it off.
    #[serde(default = "default_idle_check")]
    pub idle_check: Option<IdleCheck>,
    /// Checkpoint-aware dispatch: send a request to a pod that already holds
    /// the checkpoint it names.
    #[serde(default)]
    pub checkpoints: CheckpointConfig,
    /// Who may call the service: API keys (`keys_file`), each with limits;
    /// omitted: anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    /// Paths whose requests always become async jobs (202 and a job URL),
    /// as if each came with `Prefer: respond-async`; needs `jobs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub async_paths: Vec<String>,
    /// A webhook URL POSTed when each of this service's jobs ends, unless
    /// the job names its own (`Sdgate-Callback` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_webhook: Option<String>,
    /// Written as a map of one key (`{ fixed: [...] }`), not a YAML tag.
    #[serde(with = "serde_yaml::with::singleton_map")]
    pub backend: Backend,
}

/// `tls`: the public listener's certificates (see `serve::tls`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// One per set of host names; a client's SNI picks it (`*.example.com`
    /// matches one label). A client without SNI, or naming no host here,
    /// is refused.
    pub certificates: Vec<Certificate>,
    /// A plain-HTTP listener that answers every request with a 308 to the
    /// same URL over https (omit: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_http: Option<SocketAddr>,
    /// The port clients reach the TLS listener on, where the redirect
    /// sends them (behind a Service or NAT: 443); default: the listen port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_port: Option<u16>,
    /// With leader election: the plain-HTTP listener the active replica
    /// takes a standby's hand-overs on (only requests with its relay token;
    /// a standby hands over to the pod's IP and this port).
    #[serde(default = "default_relay_listen")]
    pub relay_listen: SocketAddr,
}

fn default_relay_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8081))
}

/// A certificate chain and its key, PEM files (re-read when they change).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub hosts: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `auth`: who may call a service and what each caller may spend (see
/// `proxy::auth` and `proxy::tenants`). One way of telling who calls: API
/// keys (`keys_file`), JWTs (`jwt`), both (a bearer token with two dots
/// is a JWT), or an external service (`forward`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// YAML file: `keys: [{ name, sha256, limits? }]` (`sdgate key NAME`
    /// makes a key and its line); read at start and at each reload.
    /// `keys.yaml` when neither `jwt` nor `forward` is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_file: Option<PathBuf>,
    /// The header with the key or token: `Authorization` (as `Bearer
    /// KEY`) or another (its whole value).
    pub header: String,
    /// Each caller's limits, unless its key or group has its own.
    pub limits: TenantLimits,
    /// Limits by group: a JWT's `group_claim` or forward-auth's
    /// `group_header` names one.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, TenantLimits>,
    /// JWTs checked against a JWKS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    /// An external service asked about each request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward: Option<ForwardAuthConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            keys_file: None,
            header: "Authorization".into(),
            limits: TenantLimits::default(),
            groups: BTreeMap::new(),
            jwt: None,
            forward: None,
        }
    }
}

impl AuthConfig {
    /// What can be told without reading a file or asking a service.
    fn validate(&self, key: &str) -> Result<()> {
        let header = |name: &str, what: &str| {
            http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map(|_| ())
                .with_context(|| format!("{key}.{what}: {name:?} is not a header name"))
        };
        header(&self.header, "header")?;
        if self.forward.is_some() && (self.jwt.is_some() || self.keys_file.is_some()) {
            bail!("{key}.forward: the forward-auth service decides alone (no keys_file or jwt beside it)");
        }
        if let Some(jwt) = &self.jwt {
            let uri = web_url(&jwt.jwks_url).with_context(|| format!("{key}.jwt.jwks_url"))?;
            let loopback = uri.host().is_some_and(|h| {
                h == "localhost"
                    || h.trim_matches(|c| c == '[' || c == ']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            });
            if uri.scheme_str() == Some("http") && !loopback && !jwt.allow_http {
                bail!(
                    "{key}.jwt.jwks_url: {} is plain http: anyone on the way could serve keys of their own (https://, or allow_http: true)",
                    jwt.jwks_url
                );
            }
            if jwt.issuer.is_empty() || jwt.audience.is_empty() || jwt.audience.iter().any(String::is_empty) {
                bail!("{key}.jwt: issuer and audience are required (a token for anyone is a token for anything)");
            }
            if jwt.identity_claim.is_empty() {
                bail!("{key}.jwt.identity_claim: may not be empty");
            }
            if jwt.refresh < Duration::from_secs(1) {
                bail!("{key}.jwt.refresh: at least 1s");
            }
        }
        if let Some(forward) = &self.forward {
            web_url(&forward.url).with_context(|| format!("{key}.forward.url"))?;
            header(&forward.identity_header, "forward.identity_header")?;
            for name in forward.request_headers.iter().chain(&forward.group_header) {
                header(name, "forward.request_headers")?;
            }
            if forward.timeout.is_zero() {
                bail!("{key}.forward.timeout: must be more than 0s");
            }
        }
        Ok(())
    }

    /// The keys file, if keys are one of the ways in.
    pub fn keys_path(&self) -> Option<PathBuf> {
        match (&self.keys_file, &self.jwt, &self.forward) {
            (Some(path), ..) => Some(path.clone()),
            (None, None, None) => Some(PathBuf::from("keys.yaml")),
            _ => None,
        }
    }
}

/// `auth.jwt`: a bearer JWT signed by a key of the JWKS, from `issuer`,
/// for `audience`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Where the signing keys are (`http://` or `https://`, e.g.
    /// `https://issuer/.well-known/jwks.json`).
    pub jwks_url: String,
    /// The `iss` every token must have.
    pub issuer: String,
    /// The `aud` every token must hold (one of these; a string or a list).
    #[serde(deserialize_with = "one_or_many")]
    pub audience: Vec<String>,
    /// The claim that names the caller.
    #[serde(default = "default_identity_claim")]
    pub identity_claim: String,
    /// A claim naming the caller's group (a string, or a list whose first
    /// member that `auth.groups` knows is taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_claim: Option<String>,
    /// How often the keys are fetched again, at least 1 s (also at once
    /// for a token signed by a key not yet seen, at most every 10 s or
    /// `refresh`, the shorter).
    #[serde(default = "default_jwks_refresh", with = "duration")]
    pub refresh: Duration,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_jwt_leeway", with = "duration")]
    pub leeway: Duration,
    /// Take the JWKS over plain `http://` from a host other than loopback
    /// (anyone on the way could then serve keys of their own): for an
    /// issuer inside the cluster.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
}

/// An `http://` or `https://` URL with a host.
pub fn web_url(text: &str) -> Result<http::Uri> {
    let uri: http::Uri = text.parse().with_context(|| format!("{text:?} is not a URL"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => bail!("{text:?} is not an http:// or https:// URL"),
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

fn default_identity_claim() -> String {
    "sub".into()
}

fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}

fn default_jwt_leeway() -> Duration {
    Duration::from_secs(30)
}

/// `auth.forward`: each request is first shown to an external service
/// (oauth2-proxy, Authelia, ...): a 2xx lets it in, naming the caller in a
/// header; a 3xx or 4xx is passed to the client.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ForwardAuthConfig {
    /// The service's URL (`http://` or `https://`), asked with GET.
    pub url: String,
    /// The request's headers it is shown (with `X-Forwarded-Method`,
    /// `-Proto`, `-Host`, `-Uri` and `-For`).
    #[serde(default = "default_forward_headers")]
    pub request_headers: Vec<String>,
    /// The header of its 2xx that names the caller.
    #[serde(default = "default_identity_header")]
    pub identity_header: String,
    /// A header of its 2xx naming the caller's group (`auth.groups`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_header: Option<String>,
    /// How long to wait for its answer (then 503).
    #[serde(default = "default_forward_timeout", with = "duration")]
    pub timeout: Duration,
}

fn default_forward_headers() -> Vec<String> {
    vec!["Authorization".into(), "Cookie".into()]
}

fn default_identity_header() -> String {
    "X-Auth-Request-User".into()
}

fn default_forward_timeout() -> Duration {
    Duration::from_secs(5)
}

/// What one caller may use (0: no bound).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    /// Requests in progress at once (waiting or on a pod).
    pub concurrent: u32,
    /// Requests per minute (a token bucket as large as the rate).
    pub per_minute: u32,
    /// Pod time its requests may hold per UTC hour, in seconds.
    pub gpu_seconds_per_hour: f64,
    /// The same per UTC day.
    pub gpu_seconds_per_day: f64,
    /// Its requests waiting for a pod (more: 429); 0: the service's
    /// `fairness.max_queued`.
    pub queued: u32,
}

/// `jobs`: async jobs, kept in a store (see `jobs`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Where jobs live: `{ file: PATH }` (SQLite, embedded, one replica)
    /// or `{ postgres: "host=... user=... dbname=...", table: NAME }`
    /// (shared by replicas).
    #[serde(with = "serde_yaml::with::singleton_map")]
    pub store: JobStore,
    /// How long a finished job (and its result) is kept.
    #[serde(with = "duration")]
    pub result_ttl: Duration,
    /// The largest request body a job may have (a larger one: 413).
    pub max_request_bytes: u64,
    /// The largest result kept per job; a larger answer fails the job
    /// (its error says so).
    pub max_result_bytes: u64,
    /// The most bytes all kept jobs may hold (requests and results); a
    /// submit beyond it is refused (507) before it is accepted.
    pub max_total_bytes: u64,
    /// The longest a job may stay queued; then it fails.
    #[serde(with = "duration")]
    pub queue_timeout: Duration,
    /// Jobs of one service in its queue or on its pods at once; the rest
    /// wait in the store, in order.
    pub max_dispatched: usize,
    /// A job that was running when its replica died: `retry` (once; it may
    /// then have run twice) or `fail`.
    pub on_lost: OnLost,
    pub webhooks: WebhookConfig,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            store: JobStore::File(PathBuf::from("sdgate-jobs.sqlite3")),
            result_ttl: Duration::from_secs(3600),
            max_request_bytes: 16 << 20,
            max_result_bytes: 64 << 20,
            max_total_bytes: 2 << 30,
            queue_timeout: Duration::from_secs(3600),
            max_dispatched: 64,
            on_lost: OnLost::Retry,
            webhooks: WebhookConfig::default(),
        }
    }
}

/// `jobs.store`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JobStore {
    /// SQLite on this file (created if missing).
    File(PathBuf),
    /// PostgreSQL: a libpq-style connection string and the table's name
    /// (created if missing).
    Postgres(PostgresStore),
}

/// `jobs.store.postgres`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PostgresStore {
    pub url: String,
    #[serde(default = "default_jobs_table")]
    pub table: String,
}

fn default_jobs_table() -> String {
    "sdgate_jobs".into()
}

/// `jobs.on_lost`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnLost {
    Retry,
    Fail,
}

/// `jobs.webhooks`: how job webhooks are sent.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// A file holding the signing secret (HMAC-SHA256); omitted: webhooks
    /// are sent unsigned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Address blocks (CIDR) a webhook may be sent to besides public
    /// addresses; loopback, private, link-local and other non-public
    /// addresses are refused unless listed (no requests into the cluster).
    pub allow: Vec<String>,
    /// One delivery's time limit.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// How long a failing delivery is retried (with backoff from 1 s,
    /// doubling to at most `max_backoff`) before it is given up.
    #[serde(with = "duration")]
    pub retry_for: Duration,
    #[serde(with = "duration")]
    pub max_backoff: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            secret_file: None,
            allow: Vec::new(),
            timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(3600),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl JobsConfig {
    fn validate(&self) -> Result<()> {
        if let JobStore::Postgres(pg) = &self.store {
            let name_ok = !pg.table.is_empty()
                && pg.table.len() <= 48
                && pg.table.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && !pg.table.as_bytes()[0].is_ascii_digit();
            if !name_ok {
                bail!("jobs.store.postgres.table: {:?} must be lowercase letters, digits and _", pg.table);
            }
        }
        if self.result_ttl.is_zero() || self.queue_timeout.is_zero() {
            bail!("jobs: result_ttl and queue_timeout must be more than 0s");
        }
        if self.max_dispatched == 0 {
            bail!("jobs.max_dispatched: must be at least 1");
        }
        for block in &self.webhooks.allow {
            IpBlock::parse(block).map_err(|why| anyhow::anyhow!("jobs.webhooks.allow: {why}"))?;
        }
        if self.webhooks.timeout.is_zero() || self.webhooks.max_backoff.is_zero() {
            bail!("jobs.webhooks: timeout and max_backoff must be more than 0s");
        }
        Ok(())
    }
}

/// How a service learns which checkpoint each request wants and each pod
/// holds, and how it weighs waiting for a pod that holds it against a load.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Dispatch by checkpoint (false: checkpoint-blind; what requests want
    /// and pods hold is still tracked and counted).
    pub route: bool,
    /// A header naming the checkpoint (looked at before the body).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// JSON pointers into a buffered request body naming the checkpoint;
    /// the first that is a string wins.
    pub pointers: Vec<String>,
    /// A JSON pointer to a boolean: `false` there means the checkpoint stays
    /// the pod's setting after the request (the WebUI's
    /// `override_settings_restore_afterwards`, default true).
    pub restore_pointer: String,
    /// What a checkpoint load costs on a pod that has not shown one yet;
    /// each pod then learns its own from its answers.
    #[serde(with = "duration")]
    pub switch_cost: Duration,
    /// The longest a request waits for a pod that holds its checkpoint while
    /// another could load it; after that it takes any pod.
    #[serde(with = "duration")]
    pub max_wait_for_match: Duration,
    /// The longest a pod with room idles while requests wait for others
    /// that hold their checkpoints: a duration, or `load` (the pod's own
    /// load time, learned from its answers, `switch_cost` until then);
    /// never longer than `max_wait_for_match` (unset: that).
    #[serde(skip_serializing_if = "Option::is_none", with = "pod_idle")]
    pub max_pod_idle: Option<PodIdle>,
    /// GET this when a pod becomes ready and read its `sd_model_checkpoint`
    /// (the WebUI's options); `null`: not asked.
    pub options_path: Option<String>,
    /// Checkpoints with a metric label of their own (the first seen, at
    /// most 64); the rest are counted as `other`.
    pub metric_labels: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            route: true,
            header: None,
            pointers: vec!["/override_settings/sd_model_checkpoint".into()],
            restore_pointer: "/override_settings_restore_afterwards".into(),
            switch_cost: Duration::from_secs(2),
            max_wait_for_match: Duration::from_secs(10),
            max_pod_idle: None,
            options_path: Some("/sdapi/v1/options".into()),
            metric_labels: 10,
        }
    }
}

impl CheckpointConfig {
    fn validate(&self, key: &str) -> Result<()> {
        let all: Vec<&String> = self.pointers.iter().chain(std::iter::once(&self.restore_pointer)).collect();
        for pointer in &all {
            if !pointer.is_empty() && !pointer.starts_with('/') {
                bail!("{key}: JSON pointer {pointer:?} must be empty or start with /");
            }
        }
        // A body is read in one pass that keeps the value where a pointer
        // ends: one pointer may not lie inside another's value.
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                let inside =
                    |outer: &str, inner: &str| inner.strip_prefix(outer).is_some_and(|rest| rest.starts_with('/'));
                if a != b && (inside(a, b) || inside(b, a)) {
                    bail!("{key}: JSON pointers {a:?} and {b:?}: one lies inside the other");
                }
            }
        }
        if let Some(header) = &self.header {
            http::HeaderName::try_from(header.as_str())
                .map_err(|_| anyhow::anyhow!("{key}.header: {header:?} is not a header name"))?;
        }
        if let Some(path) = &self.options_path {
            if !path.starts_with('/') {
                bail!("{key}.options_path: {path:?} must start with /");
            }
        }
        if self.metric_labels > 64 {
            bail!("{key}.metric_labels: {} is more than 64", self.metric_labels);
        }
        Ok(())
    }
}

/// The idle check of a quarantined pod (see `quarantine`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdleCheck {
    /// GET this path: idle when it answers the WebUI's progress JSON with
    /// `state.job_count` 0 (or nothing listens); busy on another count or
    /// no answer in time; any other answer cannot be read and is never
    /// taken as idle (see `pod::Pool::idle_state`).
    pub path: String,
    /// Poll period.
    #[serde(with = "duration")]
    pub period: Duration,
    /// A pod still busy after this is logged as failed; it stays out of
    /// rotation until it is idle. One whose check cannot be read is let go
    /// then, through its readiness probe.
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl Default for IdleCheck {
    fn default() -> Self {
        Self {
            path: "/sdapi/v1/progress".to_string(),
            period: Duration::from_millis(100),
            timeout: Duration::from_secs(600),
        }
    }
}

/// Session affinity (see `affinity`). A key left out takes its value from
/// `Default` (one place for the defaults).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AffinityConfig {
    /// Cookie name.
    pub cookie: String,
    /// Idle time after which a session is forgotten; the cookie's Max-Age,
    /// renewed on every answer (sliding).
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// `strict`: wait for the session's pod; `prefer`: take it when free.
    pub mode: AffinityMode,
    /// Always mark the cookie Secure (it is also when X-Forwarded-Proto is https).
    pub secure: bool,
    /// A request header that names the session for API clients without
    /// cookies (e.g. `X-Session-Key`); omit to disable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// File holding the signing key (SDGATE_AFFINITY_KEY takes precedence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<std::path::PathBuf>,
    /// File holding the previous key, still accepted (SDGATE_AFFINITY_PREVIOUS_KEY).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_key_file: Option<std::path::PathBuf>,
    /// Most sessions remembered; the oldest idle ones are dropped first.
    pub max_sessions: usize,
    /// `strict` mode: how long a session waits for its own pod while another
    /// session's job runs there; after that it takes any pod with room.
    #[serde(with = "duration")]
    pub max_wait: Duration,
}

impl Default for AffinityConfig {
    fn default() -> Self {
        Self {
            cookie: "sd".to_string(),
            timeout: Duration::from_secs(1800),
            mode: AffinityMode::default(),
            secure: false,
            header: None,
            key_file: None,
            previous_key_file: None,
            max_sessions: 100_000,
            max_wait: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AffinityMode {
    #[default]
    Strict,
    Prefer,
}

/// The autoscaler (Knative KPA rules; see `autoscale`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleConfig {
    /// Fewest pods, also when idle (0 = scale to zero).
    #[serde(default)]
    pub min: u32,
    /// Most pods.
    #[serde(default = "default_max_scale")]
    pub max: u32,
    /// Fraction of `container_concurrency` each pod should be loaded to.
    #[serde(default = "default_target_utilization")]
    pub target_utilization: f64,
    /// Demand is averaged over this window for normal decisions.
    #[serde(default = "default_stable_window", with = "duration")]
    pub stable_window: Duration,
    /// A short window that takes over when it asks for twice the ready pods.
    #[serde(default = "default_panic_window", with = "duration")]
    pub panic_window: Duration,
    /// After a stable window without demand, how long one pod stays.
    #[serde(default = "default_grace", with = "duration")]
    pub scale_to_zero_grace: Duration,
    /// How often a decision is made (activation does not wait for it).
    #[serde(default = "default_tick", with = "duration")]
    pub tick: Duration,
    /// `builtin`: sdgate decides; `external`: only export the metrics (KEDA/HPA).
    #[serde(default)]
    pub mode: ScaleMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleMode {
    #[default]
    Builtin,
    External,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        Self {
            min: 0,
            max: default_max_scale(),
            target_utilization: default_target_utilization(),
            stable_window: default_stable_window(),
            panic_window: default_panic_window(),
            scale_to_zero_grace: default_grace(),
            tick: default_tick(),
            mode: ScaleMode::Builtin,
        }
    }
}

/// Local worker processes, one endpoint each (the embedded default).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessBackend {
    /// The worker command. In every argument and `env` value, `{port}` is
    /// the worker's port, `{index}` its number (0, 1, ...), and `{sdgate}`
    /// the path of the running sdgate executable.
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Worker i listens on port_base + i; a port another process already
    /// listens on is skipped for a free one the system picks (logged).
    pub port_base: u16,
    /// Address the workers listen on.
    #[serde(default = "default_worker_host")]
    pub host: IpAddr,
    /// After SIGTERM, how long a stopping worker may take before SIGKILL.
    #[serde(default = "default_stop_grace", with = "duration")]
    pub stop_grace: Duration,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Requests waiting beyond this are answered 503 with Retry-After.
    #[serde(default = "default_max_depth")]
    pub max_depth: usize,
    /// A request waiting longer is answered 504.
    #[serde(default = "default_queue_timeout", with = "duration")]
    pub timeout: Duration,
}

/// How sdgate decides a pod may take requests.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Readiness {
    /// HTTP GET of this path must answer 2xx; omit to use a TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// Probe with a TCP connect (the default when `http` is not set).
    #[serde(default)]
    pub tcp: bool,
    /// Probe period while a pod is not ready (fast, so cold starts end soon).
    #[serde(default = "default_probe_period", with = "duration")]
    pub period: Duration,
    /// Probe period once a pod is ready.
    #[serde(default = "default_ready_period", with = "duration")]
    pub ready_period: Duration,
    /// A probe that takes longer fails.
    #[serde(default = "default_probe_timeout", with = "duration")]
    pub timeout: Duration,
    /// Consecutive failures that take a ready pod out of rotation.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// The Host header of an HTTP probe, as Kubernetes' `httpGet.host`;
    /// omitted: the pod's `ip:port`, as the kubelet sends (HTTP/1.1 requires
    /// a Host, and the WebUI's server answers 400 without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// More headers for an HTTP probe, as Kubernetes' `httpGet.httpHeaders`
    /// (name: value).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl Readiness {
    /// The headers an HTTP probe sends (`host` and `headers`); validated
    /// with the config, so nothing is dropped here in practice.
    pub fn header_map(&self) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        let host = self.host.iter().map(|host| ("host", host.as_str()));
        for (name, value) in host.chain(self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()))) {
            if let (Ok(name), Ok(value)) =
                (http::HeaderName::from_bytes(name.as_bytes()), http::HeaderValue::from_str(value))
            {
                map.append(name, value);
            }
        }
        map
    }
}

/// Where the pods are: exactly one kind, written as a map of one key
/// (`backend: { fixed: [...] }`, `{ process: {...} }`, `{ kubernetes: {...} }`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Backend {
    /// A fixed list of `host:port` addresses; names are resolved at start and
    /// again every few seconds, each address found being one endpoint.
    Fixed(Vec<String>),
    /// Worker processes started and stopped by sdgate.
    Process(ProcessBackend),
    /// The pods of a Kubernetes Deployment, found by watching the API and
    /// scaled through the Deployment's scale subresource.
    Kubernetes(KubernetesBackend),
}

impl Backend {
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Fixed(_) => "fixed",
            Backend::Process(_) => "process",
            Backend::Kubernetes(_) => "kubernetes",
        }
    }
}

/// A Kubernetes Deployment whose pods are the endpoints.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesBackend {
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The Deployment sdgate scales (its `scale` subresource).
    pub deployment: String,
    /// The pods' port: a number, or the name of a container port.
    pub port: PortRef,
    /// A label selector (`app=sd,tier=gpu`) for the pods; default: the
    /// Deployment's own `spec.selector.matchLabels`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// A kubeconfig file; default: the pod's service account in a cluster,
    /// else `KUBECONFIG` or `~/.kube/config` (an `http://` server such as
    /// `kubectl proxy` works).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<std::path::PathBuf>,
}

/// A port by number or by the name of a container port.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

/// Several sdgate replicas, one active: a `coordination.k8s.io` Lease elects
/// the replica that dispatches to pods and scales them; the others answer
/// `/readyz` 503 and take over when the lease lapses.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderElection {
    /// The Lease's name.
    #[serde(default = "default_lease_name")]
    pub lease: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// This replica's identity; default: the `POD_NAME` environment variable,
    /// else the host name and process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// A lease not renewed for this long is free to take.
    #[serde(default = "default_lease_duration", with = "duration")]
    pub lease_duration: Duration,
    /// How often the holder renews it (and a standby tries to take it).
    #[serde(default = "default_renew_period", with = "duration")]
    pub renew_period: Duration,
    /// A kubeconfig file (as `backend.kubernetes.kubeconfig`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<std::path::PathBuf>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
            max_header_bytes: default_max_header_bytes(),
            max_body_bytes: None,
            buffer_body_bytes: default_buffer_body_bytes(),
            body_read_timeout: default_body_read_timeout(),
            buffer_response_bytes: default_buffer_response_bytes(),
            tunnel_idle_timeout: default_tunnel_idle_timeout(),
            send_timeout: default_send_timeout(),
            pod_idle_timeout: default_pod_idle_timeout(),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self { max_depth: default_max_depth(), timeout: default_queue_timeout() }
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            http: None,
            tcp: false,
            period: default_probe_period(),
            ready_period: default_ready_period(),
            timeout: default_probe_timeout(),
            failure_threshold: default_failure_threshold(),
            host: None,
            headers: BTreeMap::new(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_admin() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9090)))
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_buffer_body_bytes() -> usize {
    16 << 20
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_tunnel_idle_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_send_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_buffer_response_bytes() -> usize {
    64 << 20
}
fn default_cc() -> u32 {
    1
}
fn default_max_depth() -> usize {
    10_000
}
fn default_queue_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_wake() -> Vec<String> {
    ["/sdapi/", "/run/", "/queue/", "/api/", "/"].map(String::from).to_vec()
}
fn default_connect_retries() -> u32 {
    3
}
fn default_upgrades() -> Vec<String> {
    vec!["websocket".to_string()]
}
fn default_owner_only() -> Vec<String> {
    ["/sdapi/v1/interrupt", "/sdapi/v1/skip", "/sdapi/v1/progress", "/internal/progress"].map(String::from).to_vec()
}
fn default_bypass() -> Vec<String> {
    ["/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/skip", "/internal/", "/file="].map(String::from).to_vec()
}
fn default_idle_check() -> Option<IdleCheck> {
    Some(IdleCheck::default())
}
fn default_max_scale() -> u32 {
    10
}
fn default_target_utilization() -> f64 {
    1.0
}
fn default_stable_window() -> Duration {
    Duration::from_secs(60)
}
fn default_panic_window() -> Duration {
    Duration::from_secs(6)
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_tick() -> Duration {
    Duration::from_secs(2)
}
fn default_namespace() -> String {
    pod_namespace()
}
fn default_shutdown_delay() -> Duration {
    Duration::from_secs(5)
}
fn default_lease_name() -> String {
    "sdgate".to_string()
}
fn default_lease_duration() -> Duration {
    Duration::from_secs(10)
}
fn default_renew_period() -> Duration {
    Duration::from_secs(2)
}
fn default_worker_host() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn default_stop_grace() -> Duration {
    Duration::from_secs(10)
}
/// Below the keep-alive of uvicorn (5 s by default), which serves the SD
/// WebUI, so a pooled connection is not reused just as the pod closes it.
pub const DEFAULT_POD_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

fn default_pod_idle_timeout() -> Duration {
    DEFAULT_POD_IDLE_TIMEOUT
}
fn default_probe_period() -> Duration {
    // Knative's queue-proxy probes every 50 ms; half that keeps the time from
    // a pod's port opening to its first request under 50 ms at p99.
    Duration::from_millis(25)
}
fn default_ready_period() -> Duration {
    Duration::from_secs(1)
}
fn default_probe_timeout() -> Duration {
    Duration::from_millis(300)
}
fn default_failure_threshold() -> u32 {
    3
}

impl Config {
    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let mut config: Config = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text))
            .map_err(|e| anyhow::anyhow!("{}", key_error(&e)))?;
        if config.leader_election.is_none() {
            config.leader_election = config.default_election().map(Election::On);
        }
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::from_yaml(&text).with_context(|| format!("invalid config {}", path.display()))
    }

    pub fn default_config() -> Result<Self> {
        Self::from_yaml(DEFAULT_CONFIG).context("the built-in default config is invalid")
    }

    /// The effective config (defaults filled in) as YAML.
    pub fn to_yaml(&self) -> Result<String> {
        serde_yaml::to_string(self).context("cannot print config")
    }

    /// What `sdgate check` prints: the effective config without the keys
    /// that do nothing for a service's backend (a fixed backend's `scale`
    /// and `wake`: sdgate neither starts nor stops its pods).
    pub fn to_effective_yaml(&self) -> Result<String> {
        let mut value = serde_yaml::to_value(self).context("cannot print config")?;
        if let Some(services) = value.get_mut("services").and_then(serde_yaml::Value::as_sequence_mut) {
            for (service, config) in services.iter_mut().zip(&self.services) {
                if let (Backend::Fixed(_), Some(map)) = (&config.backend, service.as_mapping_mut()) {
                    for key in INERT_WITH_FIXED {
                        map.remove(key);
                    }
                }
            }
        }
        serde_yaml::to_string(&value).context("cannot print config")
    }

    /// Keys written in `text` (this config's YAML) that do nothing with the
    /// rest of it, one warning each, naming the key.
    pub fn inert_keys(&self, text: &str) -> Vec<String> {
        let Ok(raw) = serde_yaml::from_str::<serde_yaml::Value>(text) else { return Vec::new() };
        let mut warnings = Vec::new();
        let written = raw.get("services").and_then(serde_yaml::Value::as_sequence);
        for (i, (service, raw)) in self.services.iter().zip(written.into_iter().flatten()).enumerate() {
            let has = |path: &[&str]| path.iter().try_fold(raw, |v, key| v.get(*key)).is_some();
            if let Backend::Fixed(_) = service.backend {
                for key in INERT_WITH_FIXED.into_iter().filter(|key| has(&[key])) {
                    warnings.push(format!(
                        "services[{i}].{key}: does nothing with a fixed backend (sdgate neither starts nor stops its pods)"
                    ));
                }
            }
            if has(&["affinity", "max_wait"])
                && service.affinity.as_ref().is_some_and(|a| a.mode != AffinityMode::Strict)
            {
                warnings.push(format!("services[{i}].affinity.max_wait: does nothing unless affinity.mode is strict"));
            }
            if has(&["fairness", "header"]) && service.fairness.key != FairnessKey::Header {
                warnings.push(format!("services[{i}].fairness.header: does nothing unless fairness.key is header"));
            }
            if !service.checkpoints.route {
                for key in ["switch_cost", "max_wait_for_match", "max_pod_idle"]
                    .into_iter()
                    .filter(|k| has(&["checkpoints", k]))
                {
                    warnings.push(format!(
                        "services[{i}].checkpoints.{key}: does nothing with checkpoints.route false (checkpoint-blind dispatch)"
                    ));
                }
            } else if service.checkpoints.max_wait_for_match >= service.queue.timeout {
                warnings.push(format!(
                    "services[{i}].checkpoints.max_wait_for_match: does nothing unless shorter than queue.timeout \
                     (a request waiting for a pod that holds its checkpoint would time out first)"
                ));
            }
            if has(&["scale"]) && service.scale.mode == ScaleMode::External {
                for key in
                    ["stable_window", "panic_window", "scale_to_zero_grace"].into_iter().filter(|k| has(&["scale", k]))
                {
                    warnings.push(format!(
                        "services[{i}].scale.{key}: does nothing with scale.mode external (KEDA or an HPA decides)"
                    ));
                }
            }
        }
        warnings
    }

    /// The Lease that elects the active replica, if any.
    pub fn election(&self) -> Option<&LeaderElection> {
        match &self.leader_election {
            Some(Election::On(settings)) => Some(settings),
            _ => None,
        }
    }

    /// With `leader_election` not written: a Lease for the first service
    /// with a `kubernetes` backend, named after its Deployment, in its
    /// namespace; none without such a service.
    fn default_election(&self) -> Option<LeaderElection> {
        self.services.iter().find_map(|service| match &service.backend {
            Backend::Kubernetes(k8s) => Some(LeaderElection {
                lease: format!("sdgate-{}", k8s.deployment),
                namespace: k8s.namespace.clone(),
                identity: None,
                lease_duration: default_lease_duration(),
                renew_period: default_renew_period(),
                kubeconfig: k8s.kubeconfig.clone(),
            }),
            _ => None,
        })
    }

    /// The one-line verdict of `sdgate check`.
    pub fn verdict(&self) -> String {
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        format!("ok: {}, {}", plural(self.services.len(), "service"), plural(self.routes.len(), "route"))
    }

    fn validate(&self) -> Result<()> {
        if self.services.is_empty() {
            bail!("services: at least one service is required");
        }
        if self.limits.max_header_bytes < 1024 {
            bail!("limits.max_header_bytes: must be at least 1024");
        }
        if self.limits.header_read_timeout.is_zero() {
            bail!("limits.header_read_timeout: must be more than 0s");
        }
        if self.limits.idle_timeout.is_zero() {
            bail!("limits.idle_timeout: must be more than 0s");
        }
        if self.limits.tunnel_idle_timeout.is_zero() {
            bail!("limits.tunnel_idle_timeout: must be more than 0s");
        }
        if self.limits.pod_idle_timeout.is_zero() {
            bail!("limits.pod_idle_timeout: must be more than 0s");
        }
        if self.limits.send_timeout.is_zero() {
            bail!("limits.send_timeout: must be more than 0s");
        }
        if let Some(election) = self.election() {
            election.validate()?;
        }
        if let Some(tls) = &self.tls {
            if tls.certificates.is_empty() || tls.certificates.iter().any(|c| c.hosts.is_empty()) {
                bail!("tls.certificates: at least one, each with its hosts");
            }
        }
        if let Some(hash) = &self.admin_key_sha256 {
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("admin_key_sha256: must be 64 hex digits (sha256sum of the key)");
            }
        }
        if let Some(jobs) = &self.jobs {
            jobs.validate()?;
            if let (JobStore::File(_), Some(_)) = (&jobs.store, self.election()) {
                bail!(
                    "jobs.store: a file is one replica's; with leader_election (on by default with a kubernetes \
                     backend) the replicas share jobs through PostgreSQL (jobs.store.postgres), or set \
                     leader_election: off for one replica"
                );
            }
        }
        for (i, service) in self.services.iter().enumerate() {
            if self.jobs.is_none() && (!service.async_paths.is_empty() || service.job_webhook.is_some()) {
                bail!("services[{i}]: async_paths and job_webhook need `jobs` (the store)");
            }
            for path in &service.async_paths {
                if !path.starts_with('/') {
                    bail!("services[{i}].async_paths: {path:?} must start with '/'");
                }
            }
        }
        let mut names = HashSet::new();
        let mut hosts = HashSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let key = format!("services[{i}]");
            if !names.insert(service.name.as_str()) {
                bail!("{key}.name: duplicate service name {:?}", service.name);
            }
            for (j, host) in service.hosts.iter().enumerate() {
                let host = host.to_ascii_lowercase();
                if host.is_empty() {
                    bail!("{key}.hosts[{j}]: empty host name");
                }
                if !hosts.insert(host.clone()) {
                    bail!("{key}.hosts[{j}]: host {host:?} is routed to another service already");
                }
            }
            service.validate(&key)?;
        }
        if !self.allow_shared_pods {
            self.refuse_shared_pods()?;
        }
        for (i, route) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if route.hosts.is_empty() {
                bail!("{key}.hosts: at least one host (or \"*\") is required");
            }
            for (j, host) in route.hosts.iter().enumerate() {
                let host = host.to_ascii_lowercase();
                if host.is_empty() {
                    bail!("{key}.hosts[{j}]: empty host name");
                }
                if !hosts.insert(host.clone()) {
                    bail!("{key}.hosts[{j}]: host {host:?} is routed elsewhere already");
                }
            }
            if route.split.is_empty() {
                bail!("{key}.split: at least one service is required");
            }
            let mut in_split = HashSet::new();
            for (j, split) in route.split.iter().enumerate() {
                if !names.contains(split.service.as_str()) {
                    bail!("{key}.split[{j}].service: no service named {:?}", split.service);
                }
                if !in_split.insert(split.service.as_str()) {
                    bail!("{key}.split[{j}].service: {:?} is in the split twice", split.service);
                }
                if split.weight > 1_000_000 {
                    bail!("{key}.split[{j}].weight: at most 1000000");
                }
            }
        }
        Ok(())
    }

    /// Why `next` cannot replace this config without a restart, if it cannot:
    /// the listeners, threads and leader election are fixed at start, and a
    /// service keeps its pods (its `backend`, `readiness` and `idle_check`);
    /// a new pool is a new service (add it, move the weights, remove the old).
    pub fn reload_refusal(&self, next: &Config) -> Option<String> {
        if self.listen != next.listen {
            return Some("listen: changing it needs a restart".into());
        }
        if self.admin != next.admin || self.admin_key_sha256 != next.admin_key_sha256 {
            return Some("admin, admin_key_sha256: changing them needs a restart".into());
        }
        if self.threads != next.threads {
            return Some("threads: changing it needs a restart".into());
        }
        if yaml(&self.limits) != yaml(&next.limits) {
            return Some("limits: changing them needs a restart".into());
        }
        if yaml(&self.leader_election) != yaml(&next.leader_election) {
            return Some("leader_election: changing it needs a restart".into());
        }
        if yaml(&self.tls) != yaml(&next.tls) {
            return Some("tls: changing it needs a restart (its files are re-read when they change)".into());
        }
        if yaml(&self.jobs) != yaml(&next.jobs) {
            return Some("jobs: changing them needs a restart (the store is opened at start)".into());
        }
        for (i, service) in next.services.iter().enumerate() {
            let Some(old) = self.services.iter().find(|old| old.name == service.name) else { continue };
            let key = format!("services[{i}]");
            if yaml(&old.backend) != yaml(&service.backend) {
                return Some(format!(
                    "{key}.backend: a service keeps its pods; give the new pool a new service name (or restart)"
                ));
            }
            if yaml(&old.readiness) != yaml(&service.readiness) {
                return Some(format!(
                    "{key}.readiness: a service keeps its probes; give the new pool a new service name (or restart)"
                ));
            }
            if old.scale.mode != service.scale.mode || old.scale.tick != service.scale.tick {
                return Some(format!(
                    "{key}.scale: its mode and tick are fixed while the service runs (its other scale keys reload); \
                     give the new settings a new service name (or restart)"
                ));
            }
            if yaml(&old.idle_check) != yaml(&service.idle_check) {
                return Some(format!("{key}.idle_check: a service keeps its idle check; give the new pool a new service name (or restart)"));
            }
            let identity = |a: &Option<AffinityConfig>| {
                a.as_ref().map(|a| {
                    (
                        a.cookie.clone(),
                        a.mode,
                        a.header.clone(),
                        a.key_file.clone(),
                        a.previous_key_file.clone(),
                        a.max_sessions,
                    )
                })
            };
            if old.affinity.is_some() != service.affinity.is_some()
                || identity(&old.affinity) != identity(&service.affinity)
            {
                return Some(format!(
                    "{key}.affinity: only its timeout, secure and max_wait may change on reload (or restart)"
                ));
            }
        }
        None
    }
}

/// A config part as YAML, to compare parts that hold durations, paths and
/// enums without `PartialEq`.
fn yaml<T: Serialize>(value: &T) -> String {
    serde_yaml::to_string(value).unwrap_or_default()
}

impl ServiceConfig {
    fn validate(&self, key: &str) -> Result<()> {
        if self.name.is_empty() {
            bail!("{key}.name: must not be empty");
        }
        if self.queue.timeout.is_zero() {
            bail!("{key}.queue.timeout: must be more than 0s");
        }
        if self.request_timeout.is_zero() {
            bail!("{key}.request_timeout: must be more than 0s");
        }
        for (j, path) in self.wake.iter().enumerate() {
            if !path.starts_with('/') {
                bail!("{key}.wake[{j}]: {path:?} must start with '/'");
            }
        }
        for (j, path) in self.bypass.iter().enumerate() {
            if !path.starts_with('/') {
                bail!("{key}.bypass[{j}]: {path:?} must start with '/'");
            }
        }
        for (j, path) in self.owner_only.iter().enumerate() {
            if !path.starts_with('/') {
                bail!("{key}.owner_only[{j}]: {path:?} must start with '/'");
            }
        }
        let readiness = &self.readiness;
        if readiness.period.is_zero() || readiness.ready_period.is_zero() {
            bail!("{key}.readiness.period: must be more than 0s");
        }
        if readiness.failure_threshold == 0 {
            bail!("{key}.readiness.failure_threshold: must be at least 1");
        }
        match (&readiness.http, readiness.tcp) {
            (Some(_), true) => bail!("{key}.readiness: give either http or tcp, not both"),
            (Some(path), false) if !path.starts_with('/') => {
                bail!("{key}.readiness.http: {path:?} must start with '/'")
            }
            _ => {}
        }
        if readiness.http.is_none() && (readiness.host.is_some() || !readiness.headers.is_empty()) {
            bail!("{key}.readiness: host and headers are for an http probe");
        }
        if let Some(host) = &readiness.host {
            if host.is_empty() || http::uri::Authority::try_from(host.as_str()).is_err() || host.contains('@') {
                bail!("{key}.readiness.host: {host:?} is not a host[:port]");
            }
        }
        for (name, value) in &readiness.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() || http::HeaderValue::from_str(value).is_err() {
                bail!("{key}.readiness.headers.{name}: not a valid header name and value");
            }
            if name.eq_ignore_ascii_case("host") {
                bail!("{key}.readiness.headers.{name}: set the probe's Host with readiness.host");
            }
        }
        self.scale.validate(&format!("{key}.scale"))?;
        self.checkpoints.validate(&format!("{key}.checkpoints"))?;
        if let Some(auth) = &self.auth {
            auth.validate(&format!("{key}.auth"))?;
        }
        if let Some(affinity) = &self.affinity {
            if affinity.cookie.is_empty()
                || !affinity.cookie.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                bail!("{key}.affinity.cookie: {:?} is not a valid cookie name", affinity.cookie);
            }
            if affinity.timeout.is_zero() {
                bail!("{key}.affinity.timeout: must be more than 0s");
            }
            if affinity.max_sessions == 0 {
                bail!("{key}.affinity.max_sessions: must be at least 1");
            }
            if let Some(header) = &affinity.header {
                if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    bail!("{key}.affinity.header: {header:?} is not a header name");
                }
            }
        }
        for (j, proxy) in self.fairness.trusted_proxies.iter().enumerate() {
            IpBlock::parse(proxy).map_err(|error| anyhow::anyhow!("{key}.fairness.trusted_proxies[{j}]: {error}"))?;
        }
        match (&self.fairness.key, &self.fairness.header) {
            (FairnessKey::Header, None) => bail!("{key}.fairness.header: required with key: header"),
            (_, Some(header)) if http::HeaderName::from_bytes(header.as_bytes()).is_err() => {
                bail!("{key}.fairness.header: {header:?} is not a header name")
            }
            _ => {}
        }
        if let Some(check) = &self.idle_check {
            if !check.path.starts_with('/') {
                bail!("{key}.idle_check.path: {:?} must start with '/'", check.path);
            }
            if check.period.is_zero() || check.timeout.is_zero() {
                bail!("{key}.idle_check: period and timeout must be more than 0s");
            }
        }
        if let Some(path) = &self.interrupt_on_disconnect {
            if !path.starts_with('/') {
                bail!("{key}.interrupt_on_disconnect: {path:?} must start with '/'");
            }
        }
        if self.scale.mode == ScaleMode::External && matches!(self.backend, Backend::Process(_)) {
            bail!("{key}.scale.mode: external scaling cannot drive a process backend (use builtin)");
        }
        self.backend.validate(&format!("{key}.backend"), self.scale.max)
    }

    /// Whether a request for `path` may wake the service at zero pods.
    pub fn may_wake(&self, path: &str) -> bool {
        self.wake.iter().any(|prefix| if prefix == "/" { path == "/" } else { path.starts_with(prefix.as_str()) })
    }

    /// Whether `path` reaches a pod only for the owner of its job (case
    /// ignored: a pod that ignores it must not be reached in capitals).
    #[inline]
    pub fn is_owner_only(&self, path: &str) -> bool {
        self.owner_only.iter().any(|owned| owned.eq_ignore_ascii_case(path))
    }

    /// Whether a request may upgrade to `protocol` (an `Upgrade` value:
    /// its name, before any `/version`, in any case).
    pub fn allows_upgrade(&self, protocol: &[u8]) -> bool {
        let name = protocol.split(|&b| b == b'/').next().unwrap_or_default();
        let name = name.trim_ascii();
        self.upgrades.iter().any(|allowed| allowed.as_bytes().eq_ignore_ascii_case(name))
    }

    /// Whether `path` skips the gate.
    #[inline]
    pub fn is_bypass(&self, path: &str) -> bool {
        self.bypass.iter().any(|prefix| path.starts_with(prefix.as_str()))
    }
}

impl ScaleConfig {
    fn validate(&self, key: &str) -> Result<()> {
        if self.max == 0 {
            bail!("{key}.max: must be at least 1");
        }
        if self.min > self.max {
            bail!("{key}.min: {} is more than max ({})", self.min, self.max);
        }
        if !(self.target_utilization > 0.0 && self.target_utilization <= 1.0) {
            bail!("{key}.target_utilization: must be in (0, 1]");
        }
        if self.stable_window.is_zero() {
            bail!("{key}.stable_window: must be more than 0s");
        }
        if self.panic_window.is_zero() || self.panic_window > self.stable_window {
            bail!("{key}.panic_window: must be more than 0s and at most stable_window");
        }
        if self.tick.is_zero() {
            bail!("{key}.tick: must be more than 0s");
        }
        Ok(())
    }
}

impl Backend {
    fn validate(&self, key: &str, max_scale: u32) -> Result<()> {
        match self {
            Backend::Fixed(fixed) => {
                if fixed.is_empty() {
                    bail!("{key}.fixed: at least one address is required");
                }
                for (j, addr) in fixed.iter().enumerate() {
                    split_host_port(addr).with_context(|| format!("{key}.fixed[{j}]"))?;
                }
                Ok(())
            }
            Backend::Process(process) => process.validate(&format!("{key}.process"), max_scale),
            Backend::Kubernetes(kubernetes) => kubernetes.validate(&format!("{key}.kubernetes")),
        }
    }
}

impl KubernetesBackend {
    fn validate(&self, key: &str) -> Result<()> {
        if self.namespace.is_empty() {
            bail!("{key}.namespace: must not be empty");
        }
        if self.deployment.is_empty() {
            bail!("{key}.deployment: must not be empty");
        }
        match &self.port {
            PortRef::Number(0) => bail!("{key}.port: must not be 0"),
            PortRef::Name(name) if name.is_empty() => bail!("{key}.port: must not be empty"),
            _ => {}
        }
        if let Some(selector) = &self.selector {
            if selector.split(',').any(|term| term.trim().is_empty()) {
                bail!("{key}.selector: {selector:?} is not a label selector like \"app=sd\"");
            }
        }
        Ok(())
    }
}

impl LeaderElection {
    fn validate(&self) -> Result<()> {
        if self.lease.is_empty() || self.namespace.is_empty() {
            bail!("leader_election: lease and namespace must not be empty");
        }
        if self.renew_period.is_zero() || self.renew_period * 2 > self.lease_duration {
            bail!("leader_election.renew_period: must be more than 0s and at most half of lease_duration");
        }
        Ok(())
    }

    /// This replica's identity in the Lease.
    pub fn identity(&self) -> String {
        if let Some(identity) = &self.identity {
            return identity.clone();
        }
        if let Ok(name) = std::env::var("POD_NAME") {
            if !name.is_empty() {
                return name;
            }
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    }
}

impl ProcessBackend {
    fn validate(&self, key: &str, max_scale: u32) -> Result<()> {
        let Some(program) = self.command.first() else {
            bail!("{key}.command: must name a program");
        };
        if program != SELF_PLACEHOLDER && find_program(program).is_none() {
            bail!("{key}.command[0]: program {program:?} not found (neither a path to an executable nor on PATH)");
        }
        if u32::from(self.port_base) + max_scale > 65_535 {
            bail!("{key}.port_base: port_base + scale.max exceeds 65535");
        }
        Ok(())
    }

    /// The command of worker `index`, placeholders filled in.
    /// The command of worker `index` listening on `port`.
    pub fn command_for(&self, index: u32, port: u16) -> Vec<String> {
        self.command.iter().map(|arg| self.fill(arg, index, port)).collect()
    }

    pub fn env_for(&self, index: u32, port: u16) -> Vec<(String, String)> {
        self.env.iter().map(|(k, v)| (k.clone(), self.fill(v, index, port))).collect()
    }

    /// The port worker `index` listens on unless another process holds it.
    pub fn port_for(&self, index: u32) -> u16 {
        self.port_base.saturating_add(index as u16)
    }

    fn fill(&self, text: &str, index: u32, port: u16) -> String {
        let mut out = text.replace("{port}", &port.to_string()).replace("{index}", &index.to_string());
        if out.contains(SELF_PLACEHOLDER) {
            let me = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "sdgate".into());
            out = out.replace(SELF_PLACEHOLDER, &me);
        }
        out
    }
}

/// Stands for the running sdgate executable in a process command.
pub const SELF_PLACEHOLDER: &str = "{sdgate}";

/// Resolves a program as a shell would: a path if it has a '/', else PATH.
pub fn find_program(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        let path = Path::new(program);
        return executable(path).then(|| path.to_path_buf());
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths).map(|dir| dir.join(program)).find(|p| executable(p))
}

/// "services[0].queue.timeout: <what is wrong> at line 4 column 12": the
/// full path of the key, once (serde_yaml names only the enclosing mapping
/// for errors raised by a field's own parser).
fn key_error(error: &serde_path_to_error::Error<serde_yaml::Error>) -> String {
    let path = error.path().to_string();
    let inner = error.inner().to_string();
    let message = match inner.split_once(": ") {
        Some((prefix, rest)) if path.starts_with(prefix) => rest,
        _ => inner.as_str(),
    };
    if path == "." {
        message.to_string()
    } else {
        format!("{path}: {message}")
    }
}

/// Splits `host:port` (an IP or a DNS name such as a headless Service's
/// `sd-0.sd.default.svc`), checking both parts. Names are resolved by the
/// fixed provider, off the data path.
pub fn split_host_port(addr: &str) -> Result<(String, u16)> {
    if let Ok(addr) = addr.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    let bad = || anyhow::anyhow!("{addr:?} is not a host:port address");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let label_ok =
        |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if port == 0 || host.is_empty() || !host.trim_end_matches('.').split('.').all(label_ok) {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// serde for durations written as "300s" / "100ms".
/// `checkpoints.max_pod_idle`: a fixed bound, or a load's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodIdle {
    Load,
    For(Duration),
}

mod pod_idle {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::PodIdle;

    pub fn serialize<S: Serializer>(value: &Option<PodIdle>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(PodIdle::For(bound)) => super::duration::serialize(bound, serializer),
            Some(PodIdle::Load) => serializer.serialize_str("load"),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<PodIdle>, D::Error> {
        let Some(text) = Option::<String>::deserialize(deserializer)? else { return Ok(None) };
        if text == "load" {
            return Ok(Some(PodIdle::Load));
        }
        humantime::parse_duration(&text).map(|bound| Some(PodIdle::For(bound))).map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is neither `load` nor a duration like \"2s\" ({e})"))
        })
    }
}

mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is not a duration like \"300s\" or \"100ms\" ({e})"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_namespace_comes_from_the_pod_unless_the_config_names_one() {
        assert_eq!(namespace_from(Some("sd-prod".into()), Some("other\n".into())), "sd-prod");
        assert_eq!(namespace_from(None, Some("sd-prod\n".into())), "sd-prod");
        assert_eq!(namespace_from(Some(" ".into()), None), "default");
        assert_eq!(namespace_from(None, None), "default");
    }

    #[test]
    fn leader_election_is_on_with_a_kubernetes_backend_unless_it_says_off() {
        let k8s = "services:\n  - name: sd\n    hosts: [sd.test]\n    backend: { kubernetes: { namespace: sd-prod, deployment: stable-diffusion, port: 7860 } }\n";
        let config = Config::from_yaml(k8s).unwrap();
        let election = config.election().expect("on by default");
        assert_eq!((election.lease.as_str(), election.namespace.as_str()), ("sdgate-stable-diffusion", "sd-prod"));
        // The effective config says so, and reads back the same.
        let again = Config::from_yaml(&config.to_yaml().unwrap()).unwrap();
        assert_eq!(again.election().map(|e| e.lease.clone()), Some("sdgate-stable-diffusion".into()));
        for off in ["off", "false"] {
            let config = Config::from_yaml(&format!("leader_election: {off}\n{k8s}")).unwrap();
            assert!(config.election().is_none(), "{off}");
            assert!(config.to_yaml().unwrap().contains("leader_election: off"));
            assert!(Config::from_yaml(&config.to_yaml().unwrap()).unwrap().election().is_none());
        }
        let error = Config::from_yaml(&format!("leader_election: no\n{k8s}")).unwrap_err();
        assert!(format!("{error:#}").contains("leader_election"), "{error:#}");
        let error = Config::from_yaml(&format!("leader_election: {{ leese: x }}\n{k8s}")).unwrap_err();
        assert!(format!("{error:#}").contains("leese"), "{error:#}");
        let explicit = Config::from_yaml(&format!("leader_election: {{ lease: mine }}\n{k8s}")).unwrap();
        assert_eq!(explicit.election().map(|e| e.lease.as_str()), Some("mine"));
        // No kubernetes backend: one replica, nothing to elect.
        let fixed = "services:\n  - name: sd\n    hosts: [sd.test]\n    backend: { fixed: [\"127.0.0.1:7860\"] }\n";
        assert!(Config::from_yaml(fixed).unwrap().election().is_none());
    }

    #[test]
    fn ip_blocks_hold_what_they_should() {
        let block = IpBlock::parse("10.1.0.0/16").unwrap();
        assert!(block.contains("10.1.200.3".parse().unwrap()));
        assert!(!block.contains("10.2.0.1".parse().unwrap()));
        assert!(!block.contains("::1".parse().unwrap()));
        assert!(IpBlock::parse("127.0.0.1").unwrap().contains("127.0.0.1".parse().unwrap()));
        assert!(IpBlock::parse("0.0.0.0/0").unwrap().contains("192.168.1.1".parse().unwrap()));
        assert!(IpBlock::parse("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x"] {
            assert!(IpBlock::parse(bad).is_err(), "{bad}");
        }
    }

    fn minimal(service: &str) -> String {
        format!(
            "services:\n  - name: sd\n    hosts: [\"*\"]\n    backend: {{ fixed: [\"127.0.0.1:7860\"] }}\n{service}"
        )
    }

    #[test]
    fn defaults_follow_the_design() {
        let config = Config::from_yaml(&minimal("")).unwrap();
        let service = &config.services[0];
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(service.container_concurrency, 1);
        assert_eq!(service.queue.max_depth, 10_000);
        assert_eq!(service.queue.timeout, Duration::from_secs(300));
        assert_eq!(service.request_timeout, Duration::from_secs(600));
        assert_eq!(service.readiness.period, Duration::from_millis(25));
        assert!(service.is_bypass("/sdapi/v1/progress?skip_current_image=false"));
        assert!(!service.is_bypass("/sdapi/v1/txt2img"));
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = Config::from_yaml(&minimal("    queue: { max_dept: 3 }\n")).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("services[0].queue") && text.contains("max_dept"), "{text}");
    }

    #[test]
    fn a_bad_duration_is_named() {
        let err = Config::from_yaml(&minimal("    request_timeout: soon\n")).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("services[0].request_timeout"), "{text}");
    }

    #[test]
    fn a_bad_address_is_named() {
        let yaml = "services:\n  - name: sd\n    hosts: [a]\n    backend: { fixed: [\"nowhere\"] }\n";
        let text = format!("{:#}", Config::from_yaml(yaml).unwrap_err());
        assert!(text.contains("services[0].backend.fixed[0]"), "{text}");
    }

    #[test]
    fn a_host_routed_twice_is_an_error() {
        let yaml = "services:\n  - name: a\n    hosts: [x]\n    backend: { fixed: [\"127.0.0.1:1\"] }\n  - name: b\n    hosts: [X]\n    backend: { fixed: [\"127.0.0.1:2\"] }\n";
        let text = format!("{:#}", Config::from_yaml(yaml).unwrap_err());
        assert!(text.contains("services[1].hosts[0]"), "{text}");
    }

    #[test]
    fn checkpoints_are_on_by_default_and_a_bad_setting_is_named() {
        let config = Config::from_yaml(&minimal("")).unwrap();
        let checkpoints = &config.services[0].checkpoints;
        assert!(checkpoints.route);
        assert_eq!(checkpoints.pointers, ["/override_settings/sd_model_checkpoint"]);
        assert_eq!(checkpoints.max_wait_for_match, Duration::from_secs(10));
        assert_eq!(checkpoints.max_pod_idle, None);
        for (text, bound) in [("load", PodIdle::Load), ("1500ms", PodIdle::For(Duration::from_millis(1500)))] {
            let yaml = minimal(&format!("    checkpoints: {{ max_pod_idle: {text} }}\n"));
            let config = Config::from_yaml(&yaml).unwrap();
            assert_eq!(config.services[0].checkpoints.max_pod_idle, Some(bound));
            let again = Config::from_yaml(&config.to_yaml().unwrap()).unwrap();
            assert_eq!(again.services[0].checkpoints.max_pod_idle, Some(bound), "round trip");
        }
        for (bad, named) in [
            ("    checkpoints: { max_pod_idle: soon }\n", "neither `load` nor a duration"),
            ("    checkpoints: { pointers: [override_settings] }\n", "must be empty or start with /"),
            ("    checkpoints: { header: \"bad header\" }\n", "is not a header name"),
            ("    checkpoints: { options_path: options }\n", "options_path"),
        ] {
            let text = format!("{:#}", Config::from_yaml(&minimal(bad)).unwrap_err());
            assert!(text.contains("services[0].checkpoints") && text.contains(named), "{text}");
        }
    }

    #[test]
    fn check_warns_when_the_wait_for_a_match_outlasts_the_queue_timeout() {
        let text = minimal("    queue: { timeout: 5s }\n");
        let config = Config::from_yaml(&text).unwrap();
        let warnings = config.inert_keys(&text);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("services[0].checkpoints.max_wait_for_match: does nothing unless shorter"));
        let text = minimal("    queue: { timeout: 5s }\n    checkpoints: { max_wait_for_match: 2s }\n");
        assert!(Config::from_yaml(&text).unwrap().inert_keys(&text).is_empty());
    }

    #[test]
    fn the_effective_config_round_trips() {
        let config = Config::default_config().unwrap();
        let again = Config::from_yaml(&config.to_yaml().unwrap()).unwrap();
        assert_eq!(again.to_yaml().unwrap(), config.to_yaml().unwrap());
    }
    #[test]
    fn auth_is_checked_with_the_config() {
        let with = |auth: &str| {
            let yaml = format!(
                "services:\n  - name: sd\n    hosts: [sd.test]\n    backend: {{ fixed: [\"127.0.0.1:7860\"] }}\n    auth: {auth}\n"
            );
            Config::from_yaml(&yaml).err().map(|e| format!("{e:#}")).unwrap_or_default()
        };
        let jwt = |url: &str, more: &str| format!("{{ jwt: {{ jwks_url: \"{url}\", issuer: i, audience: a{more} }} }}");
        assert!(with(&jwt("http://idp.example/jwks", ""))
            .contains("services[0].auth.jwt.jwks_url: http://idp.example/jwks is plain http"));
        assert_eq!(with(&jwt("http://idp.example/jwks", ", allow_http: true")), "");
        assert_eq!(with(&jwt("http://127.0.0.1:8080/jwks", "")), "", "loopback");
        assert_eq!(with(&jwt("https://idp.example/jwks", "")), "");
        assert!(with(&jwt("ftp://idp.example/jwks", "")).contains("not an http:// or https:// URL"));
        assert!(with(&jwt("https://idp.example/jwks", ", refresh: 0s")).contains("refresh: at least 1s"));
        assert!(
            with("{ jwt: { jwks_url: \"https://idp.example/jwks\", issuer: \"\", audience: a } }").contains("required")
        );
        assert!(with("{ keys_file: k.yaml, forward: { url: \"http://auth/\" } }").contains("decides alone"));
        assert!(with("{ forward: { url: \"http://auth/\", identity_header: \"bad header\" } }")
            .contains("not a header name"));
        assert_eq!(with("{ forward: { url: \"http://oauth2-proxy.auth/oauth2/auth\" } }"), "");
    }

    #[test]
    fn two_services_in_front_of_one_pod_are_refused_unless_allowed() {
        let two = |a: &str, b: &str, allow: bool| {
            format!(
                "allow_shared_pods: {allow}\nservices:\n  - name: a\n    hosts: [a]\n    backend: {a}\n  - name: b\n    hosts: [b]\n    backend: {b}\n"
            )
        };
        let fixed =
            two("{ fixed: [\"127.0.0.1:7860\"] }", "{ fixed: [\"127.0.0.1:7861\", \"127.0.0.1:7860\"] }", false);
        let error = format!("{:#}", Config::from_yaml(&fixed).map(drop).expect_err("refused"));
        assert!(error.contains("services[1].backend: 127.0.0.1:7860 is also services[0]'s pod"), "{error}");
        let process = "{ process: { command: [\"{sdgate}\", sim, --port, \"{port}\"], port_base: 7859 } }";
        let refusal = |yaml: String| Config::from_yaml(&yaml).err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(refusal(two("{ fixed: [\"127.0.0.1:7860\"] }", process, false)).contains("127.0.0.1:7860 is also"));
        let kube = "{ kubernetes: { namespace: gpu, deployment: sd, port: 7860 } }";
        assert!(refusal(two(kube, kube, false)).contains("Deployment gpu/sd is also"), "one Deployment");
        assert!(Config::from_yaml(&two("{ fixed: [\"127.0.0.1:7860\"] }", "{ fixed: [\"127.0.0.1:7861\"] }", false))
            .is_ok());
        assert!(Config::from_yaml(&fixed.replace("allow_shared_pods: false", "allow_shared_pods: true")).is_ok());
    }

    #[test]
    fn jobs_keys_are_checked_and_read_at_start_only() {
        let service = "services:\n  - name: a\n    hosts: [a]\n    backend: { fixed: [\"127.0.0.1:7860\"] }\n";
        let refusal = |yaml: String| Config::from_yaml(&yaml).err().map(|e| format!("{e:#}")).unwrap_or_default();
        let with = |jobs: &str| format!("jobs: {jobs}\n{service}");
        let config = Config::from_yaml(&with("{ store: { file: /tmp/j.sqlite3 } }")).unwrap();
        let jobs = config.jobs.as_ref().unwrap();
        assert_eq!(
            (jobs.result_ttl, jobs.on_lost, jobs.max_dispatched),
            (Duration::from_secs(3600), OnLost::Retry, 64)
        );
        assert!(refusal(with("{ store: { postgres: { url: x, table: \"a; DROP\" } } }"))
            .contains("jobs.store.postgres.table"));
        assert!(refusal(with("{ webhooks: { allow: [nonsense] } }")).contains("jobs.webhooks.allow"));
        let paths = service.replace("    backend:", "    async_paths: [/sdapi/v1/txt2img]\n    backend:");
        assert!(refusal(paths).contains("need `jobs`"), "async_paths without a store");
        let elected = format!("leader_election: {{ lease: l }}\n{}", with("{ store: { file: /tmp/j.sqlite3 } }"));
        assert!(refusal(elected).contains("PostgreSQL"), "a file store with several replicas");
        let other = Config::from_yaml(&with("{ store: { file: /tmp/other.sqlite3 } }")).unwrap();
        assert!(config.reload_refusal(&other).is_some_and(|why| why.starts_with("jobs:")));
        assert!(config.reload_refusal(&config.clone()).is_none());
    }
}
