//! `sdgate import-knative FILE`: turns a Knative Service (`serving.knative.dev/v1`,
//! like the Knative Stable Diffusion guides' own) into an sdgate config whose service fronts a Kubernetes
//! Deployment of the same name.
//!
//! The YAML is read as plain values (no Knative types). What maps:
//!
//! | Knative | sdgate |
//! | --- | --- |
//! | `metadata.name` | service name, `backend.kubernetes.deployment` |
//! | `metadata.namespace` | `backend.kubernetes.namespace` (absent: none written, so sdgate uses its own pod's namespace) |
//! | both | host `NAME.NAMESPACE.example.com` (`default` for an absent namespace, as Knative's domain) |
//! | `containerConcurrency` (absent: Knative's 0, unlimited) | `container_concurrency` |
//! | `responseStartTimeoutSeconds`, else `timeoutSeconds` (absent: Knative's 300) | `request_timeout` |
//! | containers' `ports[0].containerPort` (absent: Knative's 8080) | `backend.kubernetes.port` |
//! | `readinessProbe.tcpSocket` / `httpGet.path` | `readiness.tcp` / `readiness.http` |
//! | `readinessProbe.httpGet.host` (as the Host header only: sdgate probes the pod, and warns), a `Host` in `httpGet.httpHeaders` (it wins, as with the kubelet) | `readiness.host` |
//! | `readinessProbe.httpGet.httpHeaders` (other names) | `readiness.headers` |
//! | `readinessProbe.periodSeconds`, `timeoutSeconds`, `failureThreshold` | `readiness.ready_period`, `timeout`, `failure_threshold` |
//! | `autoscaling.knative.dev/minScale`, `maxScale` (or `min-scale`, `max-scale`) | `scale.min`, `scale.max` |
//! | `.../targetUtilizationPercentage` (absent: Knative's 70) | `scale.target_utilization` (percent / 100) |
//! | `.../target` (soft concurrency target per pod) | folded into `scale.target_utilization` (see [`soft_target`]) |
//! | `.../window`, `.../panic-window-percentage` | `scale.stable_window`, `scale.panic_window` (window x percent / 100) |
//! | `.../scale-to-zero-grace-period` | `scale.scale_to_zero_grace` |
//! | `serving.knative.dev.alibabacloud/affinity: cookie`, `cookie-name`, `cookie-timeout` (seconds) | `affinity: { cookie, timeout }` |
//!
//! `readinessProbe.periodSeconds` becomes the period *once ready*: while a pod
//! starts, sdgate keeps probing every `readiness.period` (25 ms), as Knative's
//! queue-proxy probes a starting pod aggressively, so cold starts end as soon
//! as the port answers.
//!
//! No `leader_election` is written: its default (on with a `kubernetes`
//! backend, Lease `sdgate-DEPLOYMENT` in the backend's namespace) is the one
//! wanted, and configs imported from two Knative Services elect on two
//! Leases, where one fixed name would make them share one and leave all but
//! one config's replicas standing by.
//!
//! Anything that changes behaviour and does not map (an annotation not in the
//! table, a non-KPA class, a traffic split, ...) becomes a warning that names
//! it: nothing is dropped silently. Annotations that only record who changed
//! the object (`kubectl.kubernetes.io/last-applied-configuration`,
//! `serving.knative.dev/creator`, `lastModifier`) are skipped quietly.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::json;
use serde_yaml::Value;

use crate::config::Config;

/// The config made from a Knative Service, and what did not map.
#[derive(Debug)]
pub struct Imported {
    pub config: Config,
    pub warnings: Vec<String>,
    /// Per service, whether the Knative Service named its namespace. One it
    /// did not name is left out of the printed config: parsing the config
    /// filled in the namespace of the machine that imported it, and sdgate
    /// must look for the pods in its own pod's namespace where it runs.
    namespaced: Vec<bool>,
}

impl Imported {
    /// The config as YAML behind a comment header that says where it came
    /// from and repeats the warnings (so they stay with the file).
    pub fn to_yaml(&self, source: &str) -> Result<String> {
        let mut out =
            format!("# sdgate config imported by `sdgate import-knative` from the Knative Service in {source}.\n");
        for (service, named) in self.config.services.iter().zip(&self.namespaced) {
            if let crate::config::Backend::Kubernetes(k) = &service.backend {
                let deployment = if *named {
                    format!("{}/{}", k.namespace, k.deployment)
                } else {
                    format!("{} in sdgate's own namespace", k.deployment)
                };
                out.push_str(&format!(
                    "# Service {:?}: its pods are the Deployment {deployment}\n\
                     # (create it from the Knative Service's container, e.g. deploy/stable-diffusion.yaml);\n\
                     # sdgate scales it and probes its pods.\n",
                    service.name
                ));
            }
        }
        if let Some(election) = self.config.election() {
            out.push_str(&format!(
                "# Several sdgate replicas: one active, elected by the Lease {} (leader_election's default).\n",
                election.lease
            ));
        }
        if self.warnings.is_empty() {
            out.push_str("# Everything in it mapped.\n");
        } else {
            out.push_str("# Not imported (also printed on stderr):\n");
            for warning in &self.warnings {
                out.push_str(&format!("#   - {}\n", warning.replace('\n', " ")));
            }
        }
        out.push_str("# Check it with: sdgate check --config FILE\n");
        out.push_str(&serde_yaml::to_string(&self.printed()?).context("cannot print the imported config")?);
        Ok(out)
    }

    /// The effective config without what depends on where it is read: the
    /// namespaces the Knative Service did not name and `leader_election`
    /// (its default follows the backend's namespace), so that sdgate fills
    /// them in from its own pod.
    fn printed(&self) -> Result<Value> {
        let mut value = serde_yaml::to_value(&self.config).context("cannot print the imported config")?;
        if let Some(map) = value.as_mapping_mut() {
            map.remove("leader_election");
        }
        let services = value.get_mut("services").and_then(Value::as_sequence_mut).into_iter().flatten();
        for (service, named) in services.zip(&self.namespaced) {
            let backend = service.get_mut("backend").and_then(|b| b.get_mut("kubernetes"));
            if let (false, Some(map)) = (*named, backend.and_then(Value::as_mapping_mut)) {
                map.remove("namespace");
            }
        }
        Ok(value)
    }
}

const KNATIVE_DEFAULT_PORT: u16 = 8080;
const KNATIVE_DEFAULT_TIMEOUT_SECONDS: u64 = 300;
const KNATIVE_DEFAULT_UTILIZATION_PERCENT: f64 = 70.0;
const KNATIVE_DEFAULT_PANIC_WINDOW_PERCENT: f64 = 10.0;
const KNATIVE_DEFAULT_WINDOW: Duration = Duration::from_secs(60);
const KPA_CLASS: &str = "kpa.autoscaling.knative.dev";
const SCALE_PREFIX: &str = "autoscaling.knative.dev/";
const ALIBABA_PREFIX: &str = "serving.knative.dev.alibabacloud/";
/// Annotations that record history only: nothing to map, nothing to warn about.
const QUIET: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    "serving.knative.dev/creator",
    "serving.knative.dev/lastModifier",
];

/// Reads every Knative Service in `yaml` (one or several documents, or a
/// `kind: List`) into one sdgate config.
pub fn import(yaml: &str) -> Result<Imported> {
    let mut documents = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(yaml).enumerate() {
        let value = Value::deserialize(document).with_context(|| format!("document {} is not valid YAML", i + 1))?;
        if value.is_null() {
            continue; // an empty document, e.g. before a leading `---`
        }
        if kind_of(&value) == ("v1", "List") {
            documents.extend(value.get("items").and_then(Value::as_sequence).into_iter().flatten().cloned());
        } else {
            documents.push(value);
        }
    }

    let mut warnings = Vec::new();
    let mut services = Vec::new();
    for (i, document) in documents.iter().enumerate() {
        let (api_version, kind) = kind_of(document);
        if api_version.starts_with("serving.knative.dev/") && kind == "Service" {
            services.push(service(document, &mut warnings)?);
        } else {
            let name = str_at(document, &["metadata", "name"]).unwrap_or("?");
            let what = if document.is_mapping() {
                format!("{api_version:?} {kind:?} named {name:?}")
            } else {
                "not a Kubernetes object".to_string()
            };
            warnings.push(format!("document {} ({what}) is not a Knative Service: skipped", i + 1));
        }
    }
    if services.is_empty() {
        bail!(
            "no Knative Service found (a YAML document with `apiVersion: serving.knative.dev/v1` and `kind: Service`)"
        );
    }

    let namespaced = services.iter().map(|s| s["backend"]["kubernetes"].get("namespace").is_some()).collect();
    // No leader_election: see the module's doc.
    let config = json!({
        "listen": "0.0.0.0:8080",
        "admin": "0.0.0.0:9090",
        "services": services,
    });
    let text = serde_yaml::to_string(&config).context("cannot print the imported config")?;
    let config = Config::from_yaml(&text).context("the imported config is not valid")?;
    Ok(Imported { config, warnings, namespaced })
}

/// One Knative Service as an sdgate service (a JSON value for the config).
fn service(ksvc: &Value, warnings: &mut Vec<String>) -> Result<serde_json::Value> {
    let name =
        str_at(ksvc, &["metadata", "name"]).ok_or_else(|| anyhow!("the Knative Service has no metadata.name"))?;
    let named_namespace = str_at(ksvc, &["metadata", "namespace"]).filter(|n| !n.is_empty());
    // A Knative Service applied without a namespace lands in `default`, and
    // its host says so.
    let namespace = named_namespace.unwrap_or("default");
    let mut warn = |text: String| warnings.push(format!("{name}: {text}"));
    let spec = at(ksvc, &["spec", "template", "spec"]);

    let mut service = json!({
        "name": name,
        "hosts": [format!("{name}.{namespace}.example.com")],
    });

    // Concurrency and timeouts (revision spec).
    let cc = match spec.and_then(|s| s.get("containerConcurrency")) {
        Some(v) => u32_of(v).ok_or_else(|| anyhow!("spec.template.spec.containerConcurrency: {v:?} is not a count"))?,
        None => {
            warn(
                "containerConcurrency not set: Knative's default 0 (unlimited) kept; a Stable Diffusion pod wants 1"
                    .into(),
            );
            0
        }
    };
    service["container_concurrency"] = json!(cc);
    let timeout_key = ["responseStartTimeoutSeconds", "timeoutSeconds"]
        .into_iter()
        .find(|key| spec.and_then(|s| s.get(*key)).is_some());
    let timeout = match timeout_key {
        Some(key) => {
            let value = &spec.and_then(|s| s.get(key)).cloned().unwrap_or_default();
            u64_of(value)
                .filter(|s| *s > 0)
                .ok_or_else(|| anyhow!("spec.template.spec.{key}: {value:?} is not seconds"))?
        }
        None => KNATIVE_DEFAULT_TIMEOUT_SECONDS,
    };
    service["request_timeout"] = json!(secs(Duration::from_secs(timeout)));
    if spec.and_then(|s| s.get("idleTimeoutSeconds")).is_some() {
        warn("spec.template.spec.idleTimeoutSeconds is not imported (sdgate has no idle timeout on a response)".into());
    }
    if ksvc.get("spec").and_then(|s| s.get("traffic")).is_some() {
        warn(format!(
            "spec.traffic (a split between revisions) is not imported: every request goes to Deployment {name}"
        ));
    }
    if str_at(ksvc, &["metadata", "labels", "networking.knative.dev/visibility"]) == Some("cluster-local") {
        warn(format!("label networking.knative.dev/visibility: cluster-local is not imported: sdgate answers host {name}.{namespace}.example.com"));
    }

    // The container: its port and readiness probe.
    let containers = spec.and_then(|s| s.get("containers")).and_then(Value::as_sequence);
    let containers =
        containers.filter(|c| !c.is_empty()).ok_or_else(|| anyhow!("spec.template.spec.containers: none"))?;
    let container = containers.iter().find(|c| c.get("ports").is_some()).unwrap_or(&containers[0]);
    if containers.len() > 1 {
        let which = str_at(container, &["name"]).unwrap_or("?");
        warn(format!("{} containers: sdgate sends requests to the port of container {which:?}", containers.len()));
    }
    let port = match at(container, &["ports"]).and_then(Value::as_sequence).and_then(|p| p.first()) {
        Some(port) => {
            let number = port.get("containerPort").cloned().unwrap_or_default();
            u64_of(&number)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| anyhow!("containers[].ports[0].containerPort: {number:?} is not a port"))?
        }
        None => KNATIVE_DEFAULT_PORT,
    };
    service["readiness"] = readiness(container.get("readinessProbe"), port, &mut warn)?;
    for probe in ["livenessProbe", "startupProbe"].into_iter().filter(|p| container.get(*p).is_some()) {
        warn(format!("{probe} is not imported: sdgate uses the readinessProbe only (keep it in the Deployment)"));
    }
    service["backend"] = json!({ "kubernetes": { "deployment": name, "port": port } });
    if let Some(namespace) = named_namespace {
        service["backend"]["kubernetes"]["namespace"] = json!(namespace);
    }

    // Annotations: the Service's and its revision template's (the latter win).
    let mut annotations = BTreeMap::new();
    for path in [&["metadata", "annotations"][..], &["spec", "template", "metadata", "annotations"][..]] {
        for (key, value) in at(ksvc, path).and_then(Value::as_mapping).into_iter().flatten() {
            let key = scalar(key).ok_or_else(|| anyhow!("{}: an annotation key is not text", path.join(".")))?;
            let value = scalar(value).ok_or_else(|| anyhow!("annotation {key}: its value is not text"))?;
            if let Some(old) = annotations.insert(key.clone(), value.clone()) {
                if old != value {
                    warn(format!("annotation {key} is set twice ({old:?} on the Service, {value:?} on its template): {value:?} used"));
                }
            }
        }
    }
    let mut taken = Taken { annotations, warnings: Vec::new() };
    let scale = scale(&mut taken, cc)?;
    service["scale"] = scale;
    if let Some(affinity) = affinity(&mut taken)? {
        service["affinity"] = affinity;
    }
    for text in taken.warnings.drain(..) {
        warn(text);
    }
    for (key, value) in &taken.annotations {
        if !QUIET.contains(&key.as_str()) {
            warn(format!(
                "annotation {key}: {value:?} is not understood by sdgate: ignored \
                 (if it is meant for the pods, put it on Deployment {name}'s pod template)"
            ));
        }
    }
    Ok(service)
}

/// The annotations not yet mapped, and notes made while mapping.
struct Taken {
    annotations: BTreeMap<String, String>,
    warnings: Vec<String>,
}

impl Taken {
    /// Removes an annotation by any of its spellings (`minScale`, `min-scale`);
    /// returns the key used and the value.
    fn take(&mut self, prefix: &str, names: &[&str]) -> Option<(String, String)> {
        let mut found: Option<(String, String)> = None;
        for name in names {
            let key = format!("{prefix}{name}");
            if let Some(value) = self.annotations.remove(&key) {
                match &found {
                    Some((first, used)) => {
                        self.warnings.push(format!("annotations {first} and {key} both set: {used:?} used"));
                    }
                    None => found = Some((key, value)),
                }
            }
        }
        found
    }
}

fn scale(taken: &mut Taken, cc: u32) -> Result<serde_json::Value> {
    let mut scale = json!({});
    if let Some((key, value)) = taken.take(SCALE_PREFIX, &["class"]) {
        if value != KPA_CLASS {
            taken.warnings.push(format!(
                "annotation {key}: {value:?} is not {KPA_CLASS}: sdgate's autoscaler follows KPA's rules \
                 (for HPA or KEDA, set scale.mode: external)"
            ));
        }
    }
    let concurrency_metric = match taken.take(SCALE_PREFIX, &["metric"]) {
        Some((key, value)) if value != "concurrency" => {
            taken.warnings.push(format!("annotation {key}: {value:?} is not imported: sdgate scales on concurrency"));
            false
        }
        _ => true,
    };
    let min = match taken.take(SCALE_PREFIX, &["minScale", "min-scale"]) {
        Some((key, value)) => count(&key, &value)?,
        None => 0,
    };
    scale["min"] = json!(min);
    let max = match taken.take(SCALE_PREFIX, &["maxScale", "max-scale"]) {
        Some((key, value)) => Some(count(&key, &value)?).filter(|max| *max > 0),
        None => None,
    };
    let max = max.unwrap_or_else(|| {
        let max = min.max(10);
        taken.warnings.push(format!("no maxScale (Knative: no limit): scale.max {max} (edit it to your GPU budget)"));
        max
    });
    scale["max"] = json!(max);

    let mut utilization =
        match taken.take(SCALE_PREFIX, &["targetUtilizationPercentage", "target-utilization-percentage"]) {
            Some((key, value)) => {
                let percent = number(&key, &value)?;
                if !(percent > 0.0 && percent <= 100.0) {
                    bail!("annotation {key}: {value:?} is not a percentage in (0, 100]");
                }
                percent / 100.0
            }
            None => KNATIVE_DEFAULT_UTILIZATION_PERCENT / 100.0,
        };
    if let Some((key, value)) = taken.take(SCALE_PREFIX, &["target"]) {
        let target = number(&key, &value)?;
        if target <= 0.0 {
            bail!("annotation {key}: {value:?} is not a positive number");
        }
        if !concurrency_metric {
            taken.warnings.push(format!("annotation {key}: {value:?} is a target of another metric: ignored"));
        } else {
            let (factor, note) = soft_target(target, cc);
            utilization *= factor;
            if let Some(note) = note {
                taken.warnings.push(format!("annotation {key}: {value:?}: {note}"));
            }
        }
    }
    // At most 4 decimals: 0.7 stays 0.7 in the printed config.
    scale["target_utilization"] = json!((utilization * 10_000.0).round().max(1.0) / 10_000.0);

    let window = match taken.take(SCALE_PREFIX, &["window"]) {
        Some((key, value)) => Some(duration(&key, &value)?),
        None => None,
    };
    let percent = match taken.take(SCALE_PREFIX, &["panic-window-percentage"]) {
        Some((key, value)) => {
            let percent = number(&key, &value)?;
            if !(percent > 0.0 && percent <= 100.0) {
                bail!("annotation {key}: {value:?} is not a percentage in (0, 100]");
            }
            Some(percent)
        }
        None => None,
    };
    if let Some(window) = window {
        scale["stable_window"] = json!(secs(window));
    }
    if window.is_some() || percent.is_some() {
        let window = window.unwrap_or(KNATIVE_DEFAULT_WINDOW);
        let percent = percent.unwrap_or(KNATIVE_DEFAULT_PANIC_WINDOW_PERCENT);
        let millis = (window.as_millis() as f64 * percent / 100.0).round().max(1.0) as u64;
        scale["panic_window"] = json!(secs(Duration::from_millis(millis)));
    }
    if let Some((key, value)) = taken.take(SCALE_PREFIX, &["panic-threshold-percentage"]) {
        if number(&key, &value)? != 200.0 {
            taken.warnings.push(format!(
                "annotation {key}: {value:?} is not imported: sdgate panics when the short window asks for 2x the ready pods (200)"
            ));
        }
    }
    if let Some((key, value)) = taken.take(SCALE_PREFIX, &["scale-to-zero-grace-period"]) {
        scale["scale_to_zero_grace"] = json!(secs(duration(&key, &value)?));
    }
    Ok(scale)
}

/// Knative's soft `target` (requests per pod the autoscaler aims at, capped at
/// `containerConcurrency`) as a factor on `target_utilization`: sdgate aims at
/// `container_concurrency x target_utilization` per pod, counting an unlimited
/// pod (cc 0) as 100.
fn soft_target(target: f64, cc: u32) -> (f64, Option<String>) {
    let capacity = if cc == 0 { 100.0 } else { f64::from(cc) };
    if target >= capacity {
        let note = (cc == 0 && target > capacity).then(|| {
            "above 100 with unlimited containerConcurrency: sdgate counts an unlimited pod as 100 requests".to_string()
        });
        (1.0, note)
    } else {
        (target / capacity, None)
    }
}

fn affinity(taken: &mut Taken) -> Result<Option<serde_json::Value>> {
    let mode = taken.take(ALIBABA_PREFIX, &["affinity"]);
    let cookie = taken.take(ALIBABA_PREFIX, &["cookie-name"]);
    let timeout = taken.take(ALIBABA_PREFIX, &["cookie-timeout"]);
    match mode {
        Some((_, value)) if value.eq_ignore_ascii_case("cookie") => {
            let mut affinity = json!({});
            if let Some((_, name)) = cookie {
                affinity["cookie"] = json!(name);
            }
            if let Some((key, value)) = timeout {
                // Seconds, as Alibaba's annotation; "30m" accepted too.
                let timeout = match value.trim().parse::<u64>() {
                    Ok(seconds) => Duration::from_secs(seconds),
                    Err(_) => duration(&key, &value)?,
                };
                affinity["timeout"] = json!(secs(timeout));
            }
            Ok(Some(affinity))
        }
        Some((key, value)) => {
            taken.warnings.push(format!("annotation {key}: {value:?} is not imported: sdgate's affinity is by cookie"));
            Ok(None)
        }
        None => {
            for (key, _) in cookie.into_iter().chain(timeout) {
                taken.warnings.push(format!("annotation {key} without {ALIBABA_PREFIX}affinity: \"cookie\": ignored"));
            }
            Ok(None)
        }
    }
}

fn readiness(probe: Option<&Value>, port: u16, warn: &mut impl FnMut(String)) -> Result<serde_json::Value> {
    let mut readiness = json!({ "tcp": true });
    let Some(probe) = probe else {
        return Ok(readiness); // Knative's default: a TCP probe of the user port
    };
    let check_port = |kind: &str, warn: &mut dyn FnMut(String)| {
        if let Some(value) = at(probe, &[kind, "port"]) {
            if u64_of(value).is_some_and(|p| p != u64::from(port)) {
                warn(format!(
                    "readinessProbe.{kind}.port {value:?} is not the serving port: sdgate probes port {port}"
                ));
            }
        }
    };
    if probe.get("httpGet").is_some() {
        let path = str_at(probe, &["httpGet", "path"]).unwrap_or("/");
        let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
        readiness = json!({ "http": path });
        check_port("httpGet", warn);
        let (host, headers) = probe_headers(probe, warn)?;
        if let Some(host) = host {
            readiness["host"] = json!(host);
        }
        if !headers.is_empty() {
            readiness["headers"] = json!(headers);
        }
        if str_at(probe, &["httpGet", "scheme"]).is_some_and(|s| s.eq_ignore_ascii_case("https")) {
            warn("readinessProbe.httpGet.scheme HTTPS is not imported: sdgate probes over plain HTTP".into());
        }
    } else if probe.get("tcpSocket").is_some() {
        check_port("tcpSocket", warn);
    } else if let Some(kind) = ["exec", "grpc"].into_iter().find(|k| probe.get(*k).is_some()) {
        warn(format!("readinessProbe.{kind} is not imported: sdgate probes with a TCP connect"));
    }
    for key in probe.as_mapping().into_iter().flat_map(|m| m.keys()).filter_map(Value::as_str) {
        let why = match key {
            "httpGet" | "tcpSocket" | "exec" | "grpc" | "periodSeconds" | "timeoutSeconds" | "failureThreshold" => {
                continue
            }
            "initialDelaySeconds" => {
                "sdgate probes a starting pod from its start (every readiness.period); it gets requests once it answers"
            }
            "successThreshold" => "one successful probe makes a pod ready",
            _ => "sdgate has no such setting",
        };
        warn(format!("readinessProbe.{key} is not imported: {why}"));
    }
    if probe.get("periodSeconds").and_then(u64_of) == Some(0) {
        warn("readinessProbe.periodSeconds 0 (Knative's aggressive probing) is not imported: sdgate probes a starting pod every readiness.period (25 ms) anyway; once ready, every readiness.ready_period".into());
    }
    let seconds = |key: &str| probe.get(key).and_then(u64_of).filter(|s| *s > 0);
    if let Some(period) = seconds("periodSeconds") {
        readiness["ready_period"] = json!(secs(Duration::from_secs(period)));
    }
    if let Some(timeout) = seconds("timeoutSeconds") {
        readiness["timeout"] = json!(secs(Duration::from_secs(timeout)));
    }
    if let Some(threshold) = seconds("failureThreshold") {
        readiness["failure_threshold"] = json!(threshold);
    }
    Ok(readiness)
}

/// The Host and other headers of an HTTP readiness probe, as the kubelet
/// sends them: the first Host in `httpHeaders`, else `httpGet.host`; then
/// every other header.
fn probe_headers(probe: &Value, warn: &mut impl FnMut(String)) -> Result<(Option<String>, BTreeMap<String, String>)> {
    let mut host_header = None;
    let mut headers = BTreeMap::<String, String>::new();
    let list = at(probe, &["httpGet", "httpHeaders"]).filter(|v| !v.is_null());
    let list = match list.map(Value::as_sequence) {
        None => &[][..],
        Some(Some(list)) => &list[..],
        Some(None) => bail!("readinessProbe.httpGet.httpHeaders: not a list of {{name, value}}"),
    };
    for (i, header) in list.iter().enumerate() {
        let key = format!("readinessProbe.httpGet.httpHeaders[{i}]");
        let name = str_at(header, &["name"]).filter(|n| !n.is_empty());
        let (Some(name), Some(value)) = (name, header.get("value").and_then(scalar)) else {
            bail!("{key}: a header needs a name and a value");
        };
        if name.eq_ignore_ascii_case("host") {
            if host_header.is_some() {
                warn(format!("{key}: a second Host header is not imported: the first one is sent"));
            } else {
                host_header = Some(value);
            }
        } else if let Some(first) = headers.keys().find(|n| n.eq_ignore_ascii_case(name)) {
            warn(format!(
                "{key}: {name} is not imported: {first} is given before it, and sdgate sends one value per header"
            ));
        } else {
            headers.insert(name.to_string(), value);
        }
    }
    let Some(host) = str_at(probe, &["httpGet", "host"]).filter(|h| !h.is_empty()) else {
        return Ok((host_header, headers));
    };
    // The kubelet connects to httpGet.host; sdgate always probes the pod.
    if host_header.is_some() {
        warn(format!(
            "readinessProbe.httpGet.host {host:?} is not imported: the Host header of httpHeaders is sent, \
             to the pod's own address (the kubelet would connect to {host:?})"
        ));
        return Ok((host_header, headers));
    }
    warn(format!(
        "readinessProbe.httpGet.host {host:?} is imported as the probe's Host header only: \
         sdgate probes the pod's own address (the kubelet would connect to {host:?})"
    ));
    // A bare IPv6 address is written in brackets in a Host header.
    let host = if host.parse::<std::net::Ipv6Addr>().is_ok() { format!("[{host}]") } else { host.to_string() };
    Ok((Some(host), headers))
}

fn kind_of(value: &Value) -> (&str, &str) {
    (str_at(value, &["apiVersion"]).unwrap_or(""), str_at(value, &["kind"]).unwrap_or(""))
}

fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |value, key| value.get(*key))
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(value, path).and_then(Value::as_str)
}

/// Annotation values are strings, but a YAML number or bool is read as its text.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn u64_of(value: &Value) -> Option<u64> {
    value.as_u64().or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
}

fn u32_of(value: &Value) -> Option<u32> {
    u64_of(value).and_then(|n| u32::try_from(n).ok())
}

fn count(key: &str, value: &str) -> Result<u32> {
    value.trim().parse().map_err(|_| anyhow!("annotation {key}: {value:?} is not a whole number"))
}

fn number(key: &str, value: &str) -> Result<f64> {
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
        .ok_or_else(|| anyhow!("annotation {key}: {value:?} is not a number"))
}

fn duration(key: &str, value: &str) -> Result<Duration> {
    humantime::parse_duration(value.trim())
        .map_err(|_| anyhow!("annotation {key}: {value:?} is not a duration like \"60s\""))
}

fn secs(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, PortRef};

    /// A Knative Service with the given revision annotations and spec lines.
    fn ksvc(annotations: &str, spec: &str) -> String {
        format!(
            "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: sd\n  namespace: gpu\n\
             spec:\n  template:\n    metadata:\n      annotations:\n        x/placeholder: \"1\"\n{annotations}\
             \x20   spec:\n{spec}      containers:\n      - image: sd\n        ports:\n        - containerPort: 7860\n"
        )
    }

    fn import_ok(yaml: &str) -> Imported {
        match import(yaml) {
            Ok(imported) => imported,
            Err(e) => panic!("{e:#}\n{yaml}"),
        }
    }

    fn warned(imported: &Imported, needle: &str) -> bool {
        imported.warnings.iter().any(|w| w.contains(needle))
    }

    #[test]
    fn names_host_backend_and_cluster_listeners() {
        let imported = import_ok(&ksvc("", "      containerConcurrency: 1\n"));
        let config = &imported.config;
        assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(config.admin.map(|a| a.to_string()).as_deref(), Some("0.0.0.0:9090"));
        let election = config.election().unwrap();
        assert_eq!((election.lease.as_str(), election.namespace.as_str()), ("sdgate-sd", "gpu"));
        let service = &config.services[0];
        assert_eq!(service.name, "sd");
        assert_eq!(service.hosts, ["sd.gpu.example.com"]);
        let Backend::Kubernetes(k) = &service.backend else { panic!("{:?}", service.backend) };
        assert_eq!((k.namespace.as_str(), k.deployment.as_str(), &k.port), ("gpu", "sd", &PortRef::Number(7860)));
        assert!(warned(&imported, "x/placeholder"), "{:?}", imported.warnings);
    }

    #[test]
    fn a_named_namespace_is_kept_and_no_lease_is_written() {
        let imported = import_ok(&ksvc("", "      containerConcurrency: 1\n"));
        let text = imported.to_yaml("ksvc.yaml").unwrap();
        assert!(text.contains("    kubernetes:\n      namespace: gpu\n"), "{text}");
        assert!(text.contains("the Deployment gpu/sd\n"), "{text}");
        assert!(!text.contains("\nleader_election:"), "its default, a Lease per Deployment: {text}");
        assert!(text.contains("elected by the Lease sdgate-sd "), "{text}");
    }

    /// With no namespace named, none is written: sdgate looks for the pods
    /// (and keeps its Lease) in its own pod's namespace where it runs, not
    /// in the namespace of the machine that imported the Service.
    #[test]
    fn no_namespace_is_written_when_the_service_names_none() {
        let yaml = ksvc("", "      containerConcurrency: 1\n").replace("  namespace: gpu\n", "");
        let imported = import_ok(&yaml);
        assert_eq!(imported.config.services[0].hosts, ["sd.default.example.com"], "Knative's host for no namespace");
        let text = imported.to_yaml("ksvc.yaml").unwrap();
        assert!(!text.contains("namespace:"), "{text}");
        assert!(!text.contains("\nleader_election:"), "{text}");
        assert!(text.contains("the Deployment sd in sdgate's own namespace"), "{text}");
        let again = Config::from_yaml(&text).unwrap();
        let Backend::Kubernetes(k) = &again.services[0].backend else { panic!("{:?}", again.services[0].backend) };
        let election = again.election().unwrap();
        assert_eq!(k.namespace, crate::config::pod_namespace());
        assert_eq!((election.lease.as_str(), election.namespace.as_str()), ("sdgate-sd", k.namespace.as_str()));
    }

    /// Two Knative Services imported into two configs (two sdgate
    /// Deployments) elect on two Leases: one shared name would leave one
    /// config's replicas all standing by.
    #[test]
    fn two_imported_services_do_not_share_a_lease() {
        let lease = |name: &str| {
            let yaml = ksvc("", "").replace("  name: sd\n", &format!("  name: {name}\n"));
            let text = import_ok(&yaml).to_yaml("ksvc.yaml").unwrap();
            let config = Config::from_yaml(&text).unwrap();
            let election = config.election().cloned().unwrap();
            (election.lease, election.namespace)
        };
        let (a, b) = (lease("sd-anime"), lease("sd-photo"));
        assert_eq!(a, ("sdgate-sd-anime".to_string(), "gpu".to_string()));
        assert_eq!(b, ("sdgate-sd-photo".to_string(), "gpu".to_string()));
    }

    #[test]
    fn knative_defaults_are_kept_when_keys_are_absent() {
        let yaml = "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: { name: hello }\n\
                    spec: { template: { spec: { containers: [{ image: x }] } } }\n";
        let imported = import_ok(yaml);
        let service = &imported.config.services[0];
        assert_eq!(service.hosts, ["hello.default.example.com"]);
        assert_eq!(service.container_concurrency, 0);
        assert_eq!(service.request_timeout, Duration::from_secs(300));
        assert_eq!(service.scale.target_utilization, 0.7);
        assert_eq!(service.scale.max, 10);
        assert!(service.readiness.tcp && service.readiness.http.is_none());
        assert!(service.affinity.is_none());
        let Backend::Kubernetes(k) = &service.backend else { panic!() };
        assert_eq!(k.port, PortRef::Number(8080));
        assert!(warned(&imported, "containerConcurrency not set"), "{:?}", imported.warnings);
        assert!(warned(&imported, "no maxScale"), "{:?}", imported.warnings);
    }

    #[test]
    fn scale_annotations_map_in_either_spelling() {
        let annotations = "        autoscaling.knative.dev/min-scale: \"1\"\n\
                           \x20       autoscaling.knative.dev/max-scale: \"4\"\n\
                           \x20       autoscaling.knative.dev/target-utilization-percentage: \"80\"\n\
                           \x20       autoscaling.knative.dev/window: \"2m\"\n\
                           \x20       autoscaling.knative.dev/panic-window-percentage: \"5\"\n\
                           \x20       autoscaling.knative.dev/scale-to-zero-grace-period: \"45s\"\n\
                           \x20       autoscaling.knative.dev/class: kpa.autoscaling.knative.dev\n\
                           \x20       autoscaling.knative.dev/metric: concurrency\n\
                           \x20       autoscaling.knative.dev/panic-threshold-percentage: \"200\"\n";
        let imported = import_ok(&ksvc(annotations, "      containerConcurrency: 2\n      timeoutSeconds: 900\n"));
        let service = &imported.config.services[0];
        let scale = &service.scale;
        assert_eq!((scale.min, scale.max, scale.target_utilization), (1, 4, 0.8));
        assert_eq!(scale.stable_window, Duration::from_secs(120));
        assert_eq!(scale.panic_window, Duration::from_secs(6));
        assert_eq!(scale.scale_to_zero_grace, Duration::from_secs(45));
        assert_eq!(service.container_concurrency, 2);
        assert_eq!(service.request_timeout, Duration::from_secs(900));
        assert_eq!(imported.warnings.len(), 1, "only the placeholder: {:?}", imported.warnings);
    }

    #[test]
    fn panic_window_alone_uses_knatives_default_window() {
        let annotations = "        autoscaling.knative.dev/panic-window-percentage: \"20\"\n";
        let scale = import_ok(&ksvc(annotations, "")).config.services[0].scale.clone();
        assert_eq!((scale.stable_window, scale.panic_window), (Duration::from_secs(60), Duration::from_secs(12)));
    }

    #[test]
    fn soft_target_folds_into_utilization() {
        assert_eq!(soft_target(2.0, 4), (0.5, None));
        assert_eq!(soft_target(8.0, 4), (1.0, None)); // Knative caps target at containerConcurrency
        assert_eq!(soft_target(10.0, 0), (0.1, None));
        assert!(soft_target(150.0, 0).1.is_some());
        let annotations = "        autoscaling.knative.dev/target: \"2\"\n\
                           \x20       autoscaling.knative.dev/targetUtilizationPercentage: \"50\"\n";
        let imported = import_ok(&ksvc(annotations, "      containerConcurrency: 4\n"));
        assert_eq!(imported.config.services[0].scale.target_utilization, 0.25);
    }

    #[test]
    fn a_non_kpa_class_and_other_metrics_warn() {
        let annotations = "        autoscaling.knative.dev/class: hpa.autoscaling.knative.dev\n\
                           \x20       autoscaling.knative.dev/metric: rps\n\
                           \x20       autoscaling.knative.dev/target: \"150\"\n\
                           \x20       autoscaling.knative.dev/panic-threshold-percentage: \"150\"\n";
        let imported = import_ok(&ksvc(annotations, "      containerConcurrency: 1\n"));
        for needle in ["hpa.autoscaling.knative.dev", "\"rps\"", "autoscaling.knative.dev/target:", "panic-threshold"] {
            assert!(warned(&imported, needle), "{needle}: {:?}", imported.warnings);
        }
        assert_eq!(imported.config.services[0].scale.target_utilization, 0.7);
    }

    #[test]
    fn alibaba_cookie_affinity_maps_from_the_service_metadata() {
        let yaml = ksvc("", "      containerConcurrency: 1\n").replace(
            "  namespace: gpu\n",
            "  namespace: gpu\n  annotations:\n    serving.knative.dev.alibabacloud/affinity: \"cookie\"\n\
             \x20   serving.knative.dev.alibabacloud/cookie-name: \"sess\"\n\
             \x20   serving.knative.dev.alibabacloud/cookie-timeout: \"600\"\n",
        );
        let imported = import_ok(&yaml);
        let affinity = imported.config.services[0].affinity.clone().unwrap();
        assert_eq!((affinity.cookie.as_str(), affinity.timeout), ("sess", Duration::from_secs(600)));
        assert!(!warned(&imported, "alibabacloud"), "{:?}", imported.warnings);
    }

    #[test]
    fn cookie_settings_without_cookie_affinity_warn() {
        let annotations = "        serving.knative.dev.alibabacloud/cookie-name: \"sd\"\n";
        let imported = import_ok(&ksvc(annotations, ""));
        assert!(imported.config.services[0].affinity.is_none());
        assert!(warned(&imported, "cookie-name without"), "{:?}", imported.warnings);
    }

    #[test]
    fn readiness_probes_map() {
        let http = "        readinessProbe:\n          httpGet: { path: /internal/ping, port: 7860 }\n\
                    \x20         periodSeconds: 2\n          timeoutSeconds: 1\n          failureThreshold: 5\n";
        let yaml = format!("{}{http}", ksvc("", ""));
        let readiness = import_ok(&yaml).config.services[0].readiness.clone();
        assert_eq!(readiness.http.as_deref(), Some("/internal/ping"));
        assert!(!readiness.tcp);
        assert_eq!((readiness.ready_period, readiness.timeout), (Duration::from_secs(2), Duration::from_secs(1)));
        assert_eq!(readiness.failure_threshold, 5);
        assert_eq!(readiness.period, Duration::from_millis(25), "a starting pod is still probed fast");

        let tcp = "        readinessProbe:\n          tcpSocket: { port: 9999 }\n";
        let imported = import_ok(&format!("{}{tcp}", ksvc("", "")));
        assert!(imported.config.services[0].readiness.tcp);
        assert!(warned(&imported, "tcpSocket.port"), "{:?}", imported.warnings);

        let exec = "        readinessProbe:\n          exec: { command: [\"true\"] }\n";
        let imported = import_ok(&format!("{}{exec}", ksvc("", "")));
        assert!(imported.config.services[0].readiness.tcp);
        assert!(warned(&imported, "readinessProbe.exec"), "{:?}", imported.warnings);
    }

    /// `httpGet.host` and `httpHeaders` are what the kubelet's probe sends:
    /// a Host among the headers wins over `host`.
    #[test]
    fn probe_host_and_headers_map() {
        let probe = |http_get: &str| {
            let yaml = format!("{}        readinessProbe:\n          httpGet: {http_get}\n", ksvc("", ""));
            let imported = import_ok(&yaml);
            (imported.config.services[0].readiness.clone(), imported.warnings)
        };

        let (readiness, warnings) = probe(
            "{ path: /internal/ping, port: 7860, host: sd.internal, \
             httpHeaders: [{ name: X-Probe, value: kubelet }, { name: Authorization, value: Bearer t0k }] }",
        );
        assert_eq!(readiness.http.as_deref(), Some("/internal/ping"));
        assert_eq!(readiness.host.as_deref(), Some("sd.internal"));
        let headers: Vec<_> = readiness.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(headers, [("Authorization", "Bearer t0k"), ("X-Probe", "kubelet")]);
        assert!(!warnings.iter().any(|w| w.contains("httpHeaders")), "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("httpGet.host \"sd.internal\" is imported as")), "{warnings:?}");

        // A Host header overrides httpGet.host, as the kubelet's; the first of two wins.
        let (readiness, warnings) = probe(
            "{ path: /healthz, host: 10.0.0.9, httpHeaders: [{ name: host, value: sd.example.com }, \
             { name: Host, value: other.example.com }, { name: X-A, value: 1 }, { name: x-a, value: 2 }] }",
        );
        assert_eq!(readiness.host.as_deref(), Some("sd.example.com"));
        assert_eq!(readiness.headers.len(), 1);
        assert_eq!(readiness.headers["X-A"], "1", "a number is read as its text; the first of two is sent");
        for needle in
            ["httpGet.host \"10.0.0.9\" is not imported", "httpHeaders[1]: a second Host", "httpHeaders[3]: x-a"]
        {
            assert!(warnings.iter().any(|w| w.contains(needle)), "{needle}: {warnings:?}");
        }

        // Host alone, from the headers; an IPv6 httpGet.host in brackets.
        let (readiness, _) = probe("{ path: /, httpHeaders: [{ name: Host, value: sd.local }] }");
        assert_eq!((readiness.host.as_deref(), readiness.headers.len()), (Some("sd.local"), 0));
        let (readiness, _) = probe("{ path: /, host: \"fd00::1\" }");
        assert_eq!(readiness.host.as_deref(), Some("[fd00::1]"));

        // The printed config keeps them, and sdgate reads it back.
        let yaml = format!(
            "{}        readinessProbe:\n          httpGet: {{ path: /, httpHeaders: [{{ name: Host, value: sd.local }}, \
             {{ name: X-Probe, value: \"1\" }}] }}\n",
            ksvc("", "")
        );
        let again = Config::from_yaml(&import_ok(&yaml).to_yaml("ksvc.yaml").unwrap()).unwrap();
        let readiness = &again.services[0].readiness;
        assert_eq!((readiness.host.as_deref(), readiness.headers["X-Probe"].as_str()), (Some("sd.local"), "1"));

        for (http_get, needle) in [
            ("{ path: /, httpHeaders: [{ name: X-A }] }", "httpHeaders[0]: a header needs a name and a value"),
            ("{ path: /, httpHeaders: { X-A: b } }", "httpHeaders: not a list"),
        ] {
            let yaml = format!("{}        readinessProbe:\n          httpGet: {http_get}\n", ksvc("", ""));
            let text = format!("{:#}", import(&yaml).unwrap_err());
            assert!(text.contains(needle), "{http_get}: {text}");
        }
    }

    #[test]
    fn other_documents_are_skipped_with_a_warning_and_lists_are_read() {
        let yaml =
            format!("---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{ name: portal }}\n---\n{}", ksvc("", ""));
        let imported = import_ok(&yaml);
        assert!(warned(&imported, "\"Deployment\" named \"portal\""), "{:?}", imported.warnings);
        let indented: String = ksvc("", "").lines().map(|l| format!("  {l}\n")).collect();
        let list = format!("apiVersion: v1\nkind: List\nitems:\n- {}", indented.trim_start());
        assert_eq!(import_ok(&list).config.services[0].name, "sd");
    }

    #[test]
    fn bad_input_is_an_error_that_says_why() {
        for (yaml, needle) in [
            ("{ not: [yaml", "not valid YAML"),
            ("just some text", "no Knative Service"),
            ("apiVersion: apps/v1\nkind: Deployment\n", "no Knative Service"),
            ("apiVersion: serving.knative.dev/v1\nkind: Service\nspec: {}\n", "metadata.name"),
        ] {
            let text = format!("{:#}", import(yaml).unwrap_err());
            assert!(text.contains(needle), "{yaml}: {text}");
        }
        let bad = ksvc("        autoscaling.knative.dev/maxScale: \"ten\"\n", "");
        let text = format!("{:#}", import(&bad).unwrap_err());
        assert!(text.contains("autoscaling.knative.dev/maxScale"), "{text}");
        let inverted = ksvc(
            "        autoscaling.knative.dev/minScale: \"5\"\n        autoscaling.knative.dev/maxScale: \"2\"\n",
            "",
        );
        let text = format!("{:#}", import(&inverted).unwrap_err());
        assert!(text.contains("scale.min"), "{text}");
    }

    #[test]
    fn the_output_round_trips_and_keeps_the_warnings() {
        let imported = import_ok(&ksvc("", "      containerConcurrency: 1\n"));
        let text = imported.to_yaml("ksvc.yaml").unwrap();
        assert!(text.starts_with("# sdgate config imported"), "{text}");
        assert!(text.contains("#   - sd: annotation x/placeholder"), "{text}");
        let again = Config::from_yaml(&text).unwrap();
        assert_eq!(again.to_yaml().unwrap(), imported.config.to_yaml().unwrap());
    }
}
