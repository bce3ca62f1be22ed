//! Who is calling, what they may spend and what they spent: API keys per
//! service (`auth`), per-key limits, and GPU-seconds measured by sdgate.
//!
//! A key is looked up by its SHA-256 (the keys file holds only hashes). The
//! key's name is the caller's identity: its fair-share client, the owner of
//! its jobs, and the `tenant` label of its metrics (bounded: the names of
//! the keys file). Before anything is queued, a caller is refused when it
//! has `concurrent` requests in progress, has used its `per_minute` rate
//! (a token bucket), or has spent `gpu_seconds_per_hour` or
//! `gpu_seconds_per_day` (fixed UTC windows) of pod time: 429 with
//! `Retry-After` and the limit in the JSON. A request's GPU time is the time
//! it held a pod slot (from dispatch until the pod finished answering, a
//! client that left included), measured by sdgate, counted when the slot is
//! freed: a request in progress can end past a budget, the next one is
//! refused.
//!
//! Spend is kept per service, tenant and UTC hour, in memory and, with a
//! jobs store, in its `usage` table (flushed every 2 s by the active replica;
//! read back when a replica becomes active), so budgets survive a restart
//! and a takeover (less what the last 2 s before a crash spent).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::{AuthConfig, TenantLimits};
use crate::error::{lock, ProxyError};
use crate::jobs::store::{Spend, UsageRow};

/// A caller: a key's name, or the identity a token or forward-auth named.
pub struct Tenant {
    pub name: String,
    /// Its `tenant` metric label: its name, or `other` past the first
    /// [`MAX_LABELS`] callers that no keys file named.
    pub label: String,
    pub limits: TenantLimits,
    /// The group whose limits it has (`auth.groups`), if any.
    pub group: Option<String>,
    /// After this the key is refused (401).
    expires: Option<std::time::SystemTime>,
    /// Its requests in progress (shared by every `Tenant` of its name: a
    /// caller whose group changed keeps its count).
    active: Arc<AtomicU32>,
}

impl Tenant {
    pub fn new(
        name: String,
        label: String,
        limits: TenantLimits,
        group: Option<String>,
        active: Arc<AtomicU32>,
    ) -> Self {
        Self { name, label, limits, group, expires: None, active }
    }

    /// Its in-progress count, to share with a `Tenant` of the same name.
    pub fn counter(&self) -> Arc<AtomicU32> {
        self.active.clone()
    }
}

/// The most `tenant` labels callers named by tokens or forward-auth get
/// (per service); the rest share `other`.
pub const MAX_LABELS: usize = 100;

/// One service's keys.
pub struct Keys {
    by_hash: HashMap<[u8; 32], Arc<Tenant>>,
    by_name: HashMap<String, Arc<Tenant>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    /// SHA-256 of the key, in hex.
    sha256: String,
    /// This key's own limits (else the service's `auth.limits`).
    #[serde(default)]
    limits: Option<TenantLimits>,
    /// When the key stops working (RFC 3339, e.g. `2027-01-01T00:00:00Z`).
    #[serde(default)]
    expires: Option<String>,
}

impl Keys {
    /// Reads the keys file at `path`.
    pub fn load(path: &std::path::Path, config: &AuthConfig) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("auth.keys_file: cannot read {}", path.display()))?;
        let file: KeysFile = serde_yaml::from_str(&text)
            .with_context(|| format!("auth.keys_file: {} is not a keys file", path.display()))?;
        let mut by_hash = HashMap::new();
        let mut by_name = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for entry in file.keys {
            let hash = parse_hash(&entry.sha256)
                .with_context(|| format!("auth.keys_file: key {:?}: sha256 is not 64 hex digits", entry.name))?;
            if entry.name.is_empty() || entry.name.len() > 64 || !names.insert(entry.name.clone()) {
                anyhow::bail!("auth.keys_file: key name {:?} is empty, longer than 64 or given twice", entry.name);
            }
            let limits = entry.limits.unwrap_or_else(|| config.limits.clone());
            let expires = match &entry.expires {
                Some(text) => Some(humantime::parse_rfc3339_weak(text).with_context(|| {
                    format!("auth.keys_file: key {:?}: expires {text:?} is not an RFC 3339 time", entry.name)
                })?),
                None => None,
            };
            let tenant = Arc::new(Tenant {
                label: entry.name.clone(),
                name: entry.name,
                limits,
                group: None,
                expires,
                active: Arc::default(),
            });
            by_name.insert(tenant.name.clone(), tenant.clone());
            if by_hash.insert(hash, tenant).is_some() {
                anyhow::bail!("auth.keys_file: two keys have the same sha256");
            }
        }
        Ok(Self { by_hash, by_name })
    }

    /// The caller `key` names, or why not (401).
    pub fn caller(&self, key: &str) -> Result<Arc<Tenant>, ProxyError> {
        let hash: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let tenant = self.by_hash.get(&hash).ok_or(ProxyError::Unauthorized("an unknown API key"))?;
        if tenant.expires.is_some_and(|at| std::time::SystemTime::now() >= at) {
            return Err(ProxyError::Unauthorized("an expired API key"));
        }
        Ok(tenant.clone())
    }

    /// Whether the file names a key `name` (valid or not).
    pub fn knows(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The caller of that name (a job's, when it runs).
    pub fn named(&self, name: &str) -> Option<Arc<Tenant>> {
        let tenant = self.by_name.get(name)?;
        match tenant.expires.is_some_and(|at| std::time::SystemTime::now() >= at) {
            true => None,
            false => Some(tenant.clone()),
        }
    }
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A new API key and the line of the keys file that names it.
pub fn new_key(name: &str) -> Result<(String, String)> {
    let mut bytes = [0u8; 24];
    getrandom::getrandom(&mut bytes).context("no randomness for a key")?;
    let key = format!("sdg_{}", crate::jobs::hex(&bytes));
    let hash = crate::jobs::hex(&Sha256::digest(key.as_bytes()));
    Ok((key, format!("  - {{ name: {name:?}, sha256: \"{hash}\" }}")))
}

/// (service, tenant, UTC hour).
type HourKey = (String, String, i64);

/// Spend and rates of every (service, tenant), kept across reloads.
#[derive(Default)]
pub struct Usage {
    accounts: Mutex<HashMap<(String, String), Account>>,
    /// Spend not yet written to the store: (service, tenant, hour) ->
    /// (requests, GPU microseconds).
    pending: Mutex<HashMap<HourKey, Spend>>,
    /// Admissions since accounts idle for two days were last forgotten.
    admitted: AtomicU32,
}

#[derive(Default)]
struct Account {
    /// UTC hour (Unix seconds of its start) -> (requests, GPU microseconds).
    hours: BTreeMap<i64, Spend>,
    tokens: f64,
    refilled: Option<tokio::time::Instant>,
}

impl Account {
    /// The GPU budget this account has spent at `now` (429 until its
    /// window ends), if any.
    fn over_budget(&self, limits: &TenantLimits, now: i64) -> Option<ProxyError> {
        let (hour, day) = (now - now.rem_euclid(HOUR), now - now.rem_euclid(DAY));
        let spent_hour = self.hours.get(&hour).map_or(0, |spend| spend.gpu_us);
        let spent_day: i64 = self.hours.range(day..).map(|(_, spend)| spend.gpu_us).sum();
        let over = |limit: f64, spent: i64| limit > 0.0 && spent as f64 >= limit * 1e6;
        let (limit, ends) = if over(limits.gpu_seconds_per_hour, spent_hour) {
            ("gpu_seconds_per_hour", hour + HOUR)
        } else if over(limits.gpu_seconds_per_day, spent_day) {
            ("gpu_seconds_per_day", day + DAY)
        } else {
            return None;
        };
        Some(ProxyError::OverLimit { limit, retry_after: (ends - now).max(1) as u32 })
    }
}

/// A caller admitted: counted as in progress until dropped.
pub struct Admission {
    tenant: Arc<Tenant>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.tenant.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn tenant(&self) -> &Arc<Tenant> {
        &self.tenant
    }
}

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl Usage {
    /// Admits a request of `tenant` to `service`, or refuses it (429) by the
    /// first limit it is over.
    pub fn admit(&self, service: &str, tenant: &Arc<Tenant>) -> Result<Admission, ProxyError> {
        let limits = &tenant.limits;
        let now = unix_now();
        let mut accounts = lock(&self.accounts);
        // Now and then, the accounts of callers unseen for two days go
        // (tokens and callers met are many; their spend is in the store).
        if self.admitted.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            let since = Self::since();
            accounts.retain(|_, account| account.hours.keys().next_back().is_some_and(|hour| *hour >= since));
        }
        let account = accounts.entry((service.to_string(), tenant.name.clone())).or_default();
        let (hour, day) = (now - now.rem_euclid(HOUR), now - now.rem_euclid(DAY));
        if let Some(over) = account.over_budget(limits, now) {
            return Err(over);
        }
        if limits.concurrent > 0 && tenant.active.load(Ordering::Acquire) >= limits.concurrent {
            return Err(ProxyError::OverLimit { limit: "concurrent", retry_after: 1 });
        }
        if limits.per_minute > 0 {
            let rate = f64::from(limits.per_minute) / 60.0;
            let clock = tokio::time::Instant::now();
            let tokens = match account.refilled {
                Some(at) => {
                    (account.tokens + clock.duration_since(at).as_secs_f64() * rate).min(f64::from(limits.per_minute))
                }
                None => f64::from(limits.per_minute),
            };
            account.refilled = Some(clock);
            if tokens < 1.0 {
                account.tokens = tokens;
                let wait = ((1.0 - tokens) / rate).ceil().max(1.0) as u32;
                return Err(ProxyError::OverLimit { limit: "per_minute", retry_after: wait });
            }
            account.tokens = tokens - 1.0;
        }
        tenant.active.fetch_add(1, Ordering::AcqRel);
        account.hours.entry(hour).or_default().requests += 1;
        // Two days back is all a budget looks at.
        let keep_from = day - DAY;
        account.hours.retain(|start, _| *start >= keep_from);
        drop(accounts);
        lock(&self.pending).entry((service.to_string(), tenant.name.clone(), hour)).or_default().requests += 1;
        Ok(Admission { tenant: tenant.clone() })
    }

    /// Whether `tenant` has spent a GPU budget on `service` (a job's run is
    /// held to them, not to the rate or concurrency of its submit).
    pub fn over_budget(&self, service: &str, tenant: &Tenant) -> Option<ProxyError> {
        let accounts = lock(&self.accounts);
        accounts.get(&(service.to_string(), tenant.name.clone()))?.over_budget(&tenant.limits, unix_now())
    }

    /// What a request of `tenant` on `service` spent (its pod time, the
    /// images it made, the loads it caused), now.
    pub fn spend(&self, service: &str, tenant: &str, spent: Spend) {
        let now = unix_now();
        let hour = now - now.rem_euclid(HOUR);
        let key = (service.to_string(), tenant.to_string());
        *lock(&self.accounts).entry(key).or_default().hours.entry(hour).or_default() += spent;
        *lock(&self.pending).entry((service.to_string(), tenant.to_string(), hour)).or_default() += spent;
    }

    /// What was spent and not yet written (taken).
    pub fn take_pending(&self) -> Vec<UsageRow> {
        lock(&self.pending)
            .drain()
            .map(|((service, tenant, hour), spend)| UsageRow { service, tenant, hour, spend })
            .collect()
    }

    /// Puts back what could not be written.
    pub fn put_back(&self, rows: Vec<UsageRow>) {
        let mut pending = lock(&self.pending);
        for row in rows {
            *pending.entry((row.service, row.tenant, row.hour)).or_default() += row.spend;
        }
    }

    /// Spend read from the store (at activation): it replaces what memory
    /// holds for those hours (plus what is still pending).
    pub fn load(&self, rows: Vec<UsageRow>) {
        let pending = lock(&self.pending).clone();
        let mut accounts = lock(&self.accounts);
        for row in rows {
            let mut spend = row.spend;
            spend += pending.get(&(row.service.clone(), row.tenant.clone(), row.hour)).copied().unwrap_or_default();
            accounts.entry((row.service, row.tenant)).or_default().hours.insert(row.hour, spend);
        }
    }

    /// Each caller's spend on each service this UTC hour and day, for
    /// /status: (service, tenant, this hour, today), by service and tenant.
    pub fn summary(&self) -> Vec<(String, String, Spend, Spend)> {
        let now = unix_now();
        let (hour, day) = (now - now.rem_euclid(HOUR), now - now.rem_euclid(DAY));
        let accounts = lock(&self.accounts);
        let mut out: Vec<_> = accounts
            .iter()
            .filter_map(|((service, tenant), account)| {
                let mut today = Spend::default();
                for (_, spend) in account.hours.range(day..) {
                    today += *spend;
                }
                (today != Spend::default()).then(|| {
                    let this_hour = account.hours.get(&hour).copied().unwrap_or_default();
                    (service.clone(), tenant.clone(), this_hour, today)
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    /// The start of the window the store is read back from.
    pub fn since() -> i64 {
        let now = unix_now();
        now - now.rem_euclid(DAY) - DAY
    }
}

/// Counts what a request spent for its tenant when its slot is freed.
pub struct Spender {
    usage: Arc<Usage>,
    service: String,
    tenant: String,
    gpu_seconds: prometheus::Counter,
    images: prometheus::IntCounter,
    loads: prometheus::IntCounter,
}

impl Spender {
    pub fn new(usage: Arc<Usage>, metrics: &TenantMetrics, service: &str, tenant: &Tenant) -> Self {
        let labels = [service, tenant.label.as_str()];
        Self {
            usage,
            service: service.to_string(),
            tenant: tenant.name.clone(),
            gpu_seconds: metrics.gpu_seconds.with_label_values(&labels),
            images: metrics.images.with_label_values(&labels),
            loads: metrics.loads.with_label_values(&labels),
        }
    }

    /// The guard a slot holds from dispatch (`loads`: the pod loads a
    /// checkpoint for this request).
    pub fn start(self: &Arc<Self>, cell: &AdmissionCell, loads: bool) -> SpendGuard {
        SpendGuard {
            spender: self.clone(),
            started: tokio::time::Instant::now(),
            images: AtomicU32::new(0),
            loads,
            _admission: cell.take(),
        }
    }
}

/// Held by a slot: measures from dispatch to the slot's release, counts
/// the images the pod's answer reports, and keeps the request's admission
/// until then.
pub struct SpendGuard {
    spender: Arc<Spender>,
    started: tokio::time::Instant,
    images: AtomicU32,
    loads: bool,
    _admission: Option<Admission>,
}

impl crate::gate::Held for SpendGuard {
    fn generated(&self, images: u32) {
        self.images.fetch_add(images, Ordering::Relaxed);
    }
}

impl Drop for SpendGuard {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        let spender = &self.spender;
        let images = self.images.load(Ordering::Relaxed);
        spender.gpu_seconds.inc_by(took.as_secs_f64());
        spender.images.inc_by(u64::from(images));
        spender.loads.inc_by(u64::from(self.loads));
        let spent = Spend {
            requests: 0,
            gpu_us: took.as_micros() as i64,
            images: i64::from(images),
            loads: i64::from(self.loads),
        };
        spender.usage.spend(&spender.service, &spender.tenant, spent);
    }
}

/// The caller of a request, once its key was checked (a request
/// extension: fair share, job owners and the meter read it).
#[derive(Clone)]
pub struct Caller(pub Arc<Tenant>, pub AdmissionCell);

/// A request's admission, moved onto its slot when a pod takes it (so
/// `concurrent` counts it until the pod is done, not until its client
/// leaves); dropped with the request if it never gets one.
#[derive(Clone, Default)]
pub struct AdmissionCell(Arc<Mutex<Option<Admission>>>);

impl AdmissionCell {
    pub fn new(admission: Option<Admission>) -> Self {
        Self(Arc::new(Mutex::new(admission)))
    }

    fn take(&self) -> Option<Admission> {
        lock(&self.0).take()
    }
}

/// `sdgate_gpu_seconds_total`, `sdgate_tenant_requests_total`,
/// `sdgate_tenant_images_total`, `sdgate_tenant_checkpoint_loads_total`,
/// `sdgate_tenant_refused_total`.
#[derive(Clone)]
pub struct TenantMetrics {
    pub gpu_seconds: prometheus::CounterVec,
    pub requests: prometheus::IntCounterVec,
    pub images: prometheus::IntCounterVec,
    pub loads: prometheus::IntCounterVec,
    pub refused: prometheus::IntCounterVec,
}

impl TenantMetrics {
    pub fn new(metrics: &crate::observe::metrics::Metrics) -> Self {
        let made = Self {
            gpu_seconds: prometheus::CounterVec::new(
                prometheus::Opts::new(
                    "sdgate_gpu_seconds_total",
                    "Pod time held by each caller's requests (dispatch to the pod's last byte), by API key name",
                ),
                &["service", "tenant"],
            )
            .expect("static metric definition"),
            requests: prometheus::IntCounterVec::new(
                prometheus::Opts::new("sdgate_tenant_requests_total", "Requests admitted, by API key name"),
                &["service", "tenant"],
            )
            .expect("static metric definition"),
            images: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "sdgate_tenant_images_total",
                    "Images each caller's generations made, as the pods' answers report them (the WebUI's all_seeds)",
                ),
                &["service", "tenant"],
            )
            .expect("static metric definition"),
            loads: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "sdgate_tenant_checkpoint_loads_total",
                    "Checkpoint loads each caller's requests caused (dispatched to a pod holding another)",
                ),
                &["service", "tenant"],
            )
            .expect("static metric definition"),
            refused: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "sdgate_tenant_refused_total",
                    "Requests refused before the queue: unauthorized (401) or over a limit (429), by reason",
                ),
                &["service", "reason"],
            )
            .expect("static metric definition"),
        };
        metrics.register(Box::new(made.gpu_seconds.clone()));
        metrics.register(Box::new(made.requests.clone()));
        metrics.register(Box::new(made.images.clone()));
        metrics.register(Box::new(made.loads.clone()));
        metrics.register(Box::new(made.refused.clone()));
        made
    }
}

/// The active replica's writer of spend: reads the store's back at start,
/// then writes what was spent every 2 s (and once more when stopped).
pub async fn keep_usage(
    usage: Arc<Usage>,
    store: crate::jobs::store::Store,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match store.usage_since(Usage::since()).await {
            Ok(rows) => {
                usage.load(rows);
                break;
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "usage: cannot read spend from the store; trying again in 1 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
        }
    }
    loop {
        let stopped = tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => false,
            _ = stop.wait_for(|stop| *stop) => true,
        };
        let mut rows = usage.take_pending().into_iter();
        while let Some(row) = rows.next() {
            if let Err(error) = store.add_usage(std::slice::from_ref(&row)).await {
                tracing::warn!(error = %format!("{error:#}"), "usage: cannot write spend to the store; kept for the next try");
                usage.put_back(std::iter::once(row).chain(rows).collect());
                break;
            }
        }
        if stopped {
            return;
        }
    }
}

impl super::Proxy {
    /// The request's caller, or why not (401); with `limited` (a request
    /// that will take a slot or become a job), admitted against its limits
    /// (429). Progress polls, interrupts and the job API are only
    /// authenticated: a caller at its limit can still watch and stop its
    /// own work and fetch its results.
    pub(super) async fn authenticate<B>(
        &self,
        service: &super::Service,
        auth: &super::auth::Auth,
        request: &http::Request<B>,
        client: Option<std::net::IpAddr>,
        limited: bool,
    ) -> Result<(Caller, Vec<http::HeaderValue>), ProxyError> {
        let name = service.config.name.as_str();
        let caller = auth.caller(&super::auth::Asking::of(request, client)).await.and_then(|called| {
            let admission = match limited {
                true => Some(self.usage.admit(name, &called.tenant)?),
                false => None,
            };
            Ok((Caller(called.tenant, AdmissionCell::new(admission)), called.set_cookies))
        });
        match &caller {
            Ok((Caller(tenant, _), _)) if limited => {
                self.tenant_metrics.requests.with_label_values(&[name, &tenant.label]).inc();
            }
            Ok(_) => {}
            Err(ProxyError::OverLimit { limit, .. }) => {
                self.tenant_metrics.refused.with_label_values(&[name, limit]).inc();
            }
            Err(ProxyError::AuthUnavailable(_)) => {
                self.tenant_metrics.refused.with_label_values(&[name, "auth_unavailable"]).inc();
            }
            Err(_) => self.tenant_metrics.refused.with_label_values(&[name, "unauthorized"]).inc(),
        }
        caller
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(limits: TenantLimits) -> Arc<Tenant> {
        Arc::new(Tenant::new("a".into(), "a".into(), limits, None, Arc::default()))
    }

    #[test]
    fn a_gpu_budget_refuses_once_spent_and_says_when_it_frees() {
        let usage = Usage::default();
        let a = tenant(TenantLimits { gpu_seconds_per_hour: 2.0, ..TenantLimits::default() });
        drop(usage.admit("sd", &a).unwrap());
        let gpu = |ms: i64| Spend { gpu_us: ms * 1000, ..Spend::default() };
        usage.spend("sd", "a", gpu(1500));
        drop(usage.admit("sd", &a).unwrap());
        usage.spend("sd", "a", gpu(600));
        match usage.admit("sd", &a) {
            Err(ProxyError::OverLimit { limit, retry_after }) => {
                assert_eq!(limit, "gpu_seconds_per_hour");
                assert!((1..=3600).contains(&retry_after));
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        // Another service's budget is its own.
        assert!(usage.admit("other", &a).is_ok());
        let pending = usage.take_pending();
        let sd: (i64, i64) = pending
            .iter()
            .filter(|r| r.service == "sd")
            .fold((0, 0), |t, r| (t.0 + r.spend.requests, t.1 + r.spend.gpu_us));
        assert_eq!(sd, (2, 2_100_000));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_and_rate_are_bounded() {
        let usage = Usage::default();
        let a = tenant(TenantLimits { concurrent: 2, per_minute: 3, ..TenantLimits::default() });
        let one = usage.admit("sd", &a).unwrap();
        let _two = usage.admit("sd", &a).unwrap();
        assert!(matches!(usage.admit("sd", &a), Err(ProxyError::OverLimit { limit: "concurrent", .. })));
        drop(one);
        let _three = usage.admit("sd", &a).unwrap();
        drop(_three);
        assert!(matches!(usage.admit("sd", &a), Err(ProxyError::OverLimit { limit: "per_minute", retry_after: 20 })));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(usage.admit("sd", &a).is_ok(), "a token back after 20 s");
    }

    #[test]
    fn keys_are_read_by_their_hash_only() {
        let (key, line) = new_key("team-a").unwrap();
        let dir = std::env::temp_dir().join(format!("sdgate-keys-{}", std::process::id()));
        std::fs::write(&dir, format!("keys:\n{line}\n")).unwrap();
        let keys = Keys::load(&dir, &AuthConfig::default()).unwrap();
        let _ = std::fs::remove_file(&dir);
        assert_eq!(keys.caller(&key).unwrap().name, "team-a");
        assert!(matches!(keys.caller("sdg_wrong"), Err(ProxyError::Unauthorized(_))));
        assert!(!line.contains(&key), "the file holds the hash only");
    }
}
