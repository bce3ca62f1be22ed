//! deploy/: every resource the kustomization lists deserialises into its
//! k8s-openapi type with no unknown field; the ConfigMap's config is one sdgate
//! accepts; the Deployment reads it where the ConfigMap is mounted; the Role
//! grants exactly what the code calls; Services, probes, the ServiceMonitor and
//! the KEDA example point at names and ports that exist. With `kubectl` on PATH
//! (or SDGATE_RENDERED naming its output, tests/deploy/render.sh), the real
//! `kubectl kustomize deploy/` output passes the same typed check.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
// (apiGroup, resource, verbs): what the kubernetes backend and the leader election call.
use sdgate::control::provider::kubernetes::RBAC;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every YAML document of `text` as JSON, empty documents skipped.
fn documents(text: &str, origin: &str) -> Vec<Value> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document).unwrap_or_else(|e| panic!("{origin} document {i}: {e}"));
        if !value.is_null() {
            out.push(serde_json::to_value(value).unwrap_or_else(|e| panic!("{origin} document {i}: {e}")));
        }
    }
    out
}

/// The resources deploy/kustomization.yaml lists, every document of each.
fn listed_resources() -> Vec<Value> {
    let text = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).expect("deploy/kustomization.yaml");
    let kustomization: serde_yaml::Value = serde_yaml::from_str(&text).expect("kustomization YAML");
    assert_eq!(kustomization["kind"].as_str(), Some("Kustomization"));
    let files = kustomization["resources"].as_sequence().expect("resources: a list");
    assert!(!files.is_empty());
    let mut resources = Vec::new();
    for file in files {
        let file = file.as_str().expect("a resource is a file name");
        let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap_or_else(|e| panic!("deploy/{file}: {e}"));
        resources.extend(documents(&text, file));
    }
    resources
}

/// Paths of `original` that `typed` (its re-serialised typed value) lacks or
/// changed: the fields the type does not know (k8s-openapi ignores them).
fn lost_fields(original: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(original), Value::Object(typed)) => {
            for (key, value) in original {
                let here = format!("{path}.{key}");
                match typed.get(key) {
                    _ if value.is_null() => {}
                    None => out.push(format!("{here} (unknown field)")),
                    Some(typed) => lost_fields(value, typed, &here, out),
                }
            }
        }
        (Value::Array(original), Value::Array(typed)) => {
            if original.len() != typed.len() {
                out.push(format!("{path} ({} items, typed {})", original.len(), typed.len()));
            }
            for (i, (original, typed)) in original.iter().zip(typed).enumerate() {
                lost_fields(original, typed, &format!("{path}[{i}]"), out);
            }
        }
        // A quantity written as a number comes back as its text.
        (Value::Number(n), Value::String(s)) if n.to_string() == *s => {}
        (original, typed) if original == typed => {}
        (original, typed) => out.push(format!("{path} ({original} became {typed})")),
    }
}

/// Deserialises into `T`, then checks that no field was dropped.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(value: &Value, what: &str) -> T {
    let typed: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let again = serde_json::to_value(&typed).unwrap();
    let mut lost = Vec::new();
    lost_fields(value, &again, "", &mut lost);
    assert!(lost.is_empty(), "{what}: fields k8s-openapi does not know: {lost:#?}");
    typed
}

/// The typed objects of a set of documents.
#[derive(Default)]
struct Objects {
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    config_maps: Vec<ConfigMap>,
    secrets: Vec<Secret>,
    disruption_budgets: Vec<PodDisruptionBudget>,
    /// (kind, namespace, name) of each.
    ids: BTreeSet<(String, String, String)>,
}

fn load(documents: &[Value]) -> Objects {
    let mut objects = Objects::default();
    for document in documents {
        let kind = document["kind"].as_str().expect("every document has a kind");
        let name = document["metadata"]["name"].as_str().expect("every document has a name");
        let namespace = document["metadata"]["namespace"].as_str().unwrap_or("").to_string();
        let what = format!("{kind} {name}");
        match kind {
            "Deployment" => objects.deployments.push(typed(document, &what)),
            "Service" => objects.services.push(typed(document, &what)),
            "ServiceAccount" => objects.service_accounts.push(typed(document, &what)),
            "Role" => objects.roles.push(typed(document, &what)),
            "RoleBinding" => objects.role_bindings.push(typed(document, &what)),
            "ConfigMap" => objects.config_maps.push(typed(document, &what)),
            "Secret" => objects.secrets.push(typed(document, &what)),
            "PodDisruptionBudget" => objects.disruption_budgets.push(typed(document, &what)),
            other => panic!("{what}: no k8s-openapi type is checked for kind {other}"),
        }
        let id = (kind.to_string(), namespace, name.to_string());
        assert!(objects.ids.insert(id.clone()), "{id:?} twice");
    }
    objects
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or("")
}

impl Objects {
    fn deployment(&self, name: &str) -> &Deployment {
        self.deployments.iter().find(|d| name_of(&d.metadata) == name).unwrap_or_else(|| panic!("Deployment {name}"))
    }

    fn service(&self, name: &str) -> &Service {
        self.services.iter().find(|s| name_of(&s.metadata) == name).unwrap_or_else(|| panic!("Service {name}"))
    }
}

fn container<'a>(deployment: &'a Deployment, name: &str) -> &'a Container {
    let pod = deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("a pod spec");
    pod.containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("container {name}"))
}

fn pod_labels(deployment: &Deployment) -> std::collections::BTreeMap<String, String> {
    let template = &deployment.spec.as_ref().expect("spec").template;
    template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default()
}

/// The container port a Service's or probe's port refers to.
fn container_port(container: &Container, port: &IntOrString) -> i32 {
    let ports = container.ports.as_deref().unwrap_or_default();
    match port {
        IntOrString::Int(n) => {
            assert!(ports.iter().any(|p| p.container_port == *n), "{}: no container port {n}", container.name);
            *n
        }
        IntOrString::String(name) => {
            ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("{}: no container port named {name}", container.name))
                .container_port
        }
    }
}

fn config_text(objects: &Objects) -> String {
    let config_map =
        objects.config_maps.iter().find(|c| name_of(&c.metadata) == "sdgate-config").expect("sdgate-config");
    config_map.data.as_ref().and_then(|d| d.get("config.yaml")).expect("data: config.yaml").clone()
}

fn sdgate_config(objects: &Objects) -> sdgate::Config {
    sdgate::Config::from_yaml(&config_text(objects)).unwrap_or_else(|e| panic!("the ConfigMap's config: {e:#}"))
}

#[test]
fn every_listed_resource_is_a_known_kind_with_no_unknown_field() {
    let objects = load(&listed_resources());
    assert_eq!(objects.deployments.len(), 2, "sdgate and stable-diffusion");
    assert!(objects.secrets.is_empty(), "the affinity Secret is the user's to create, with a random key");
    for kind in ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service"] {
        assert!(objects.ids.iter().any(|(k, _, _)| k == kind), "no {kind}");
    }
    for (kind, namespace, name) in &objects.ids {
        assert_eq!(namespace, "", "{kind} {name}: no namespace written (they go where they are applied)");
    }
}

#[test]
fn the_configmap_config_passes_check_and_names_the_sd_deployment() {
    let objects = load(&listed_resources());
    let config = sdgate_config(&objects);
    assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.admin.map(|a| a.to_string()).as_deref(), Some("0.0.0.0:9090"));
    // No namespace written anywhere in the config: sdgate's own (POD_NAMESPACE).
    let text = config_text(&objects);
    assert!(!text.contains("namespace:"), "{text}");
    let election = config.election().expect("leader election, on by default with a kubernetes backend");
    assert_eq!(election.lease, "sdgate-stable-diffusion");
    let sdgate = container(objects.deployment("sdgate"), "sdgate");
    let env = sdgate.env.as_ref().expect("env");
    let from_field = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(from_field("POD_NAMESPACE").as_deref(), Some("metadata.namespace"));
    let service = &config.services[0];
    assert_eq!(service.name, "stable-diffusion");
    assert_eq!(service.hosts, ["stable-diffusion.default.example.com"]);
    assert_eq!(service.container_concurrency, 1);
    let affinity = service.affinity.as_ref().expect("affinity");
    assert_eq!((affinity.cookie.as_str(), affinity.timeout.as_secs()), ("sd", 1800));
    assert!(service.readiness.tcp);
    assert_eq!((service.scale.min, service.scale.max), (0, 10));
    let sdgate::config::Backend::Kubernetes(k8s) = &service.backend else { panic!("{:?}", service.backend) };
    assert_eq!(k8s.namespace, sdgate::config::pod_namespace(), "the pod's");
    let sd = objects.deployment(&k8s.deployment);
    assert_eq!(sd.spec.as_ref().and_then(|s| s.replicas), Some(0), "the SD Deployment starts at zero");
    let sd_container = container(sd, "stable-diffusion");
    let sdgate::config::PortRef::Number(port) = k8s.port else { panic!("{:?}", k8s.port) };
    container_port(sd_container, &IntOrString::Int(i32::from(port)));
}

#[test]
fn the_sd_deployment_mirrors_the_knative_guides() {
    let objects = load(&listed_resources());
    let sd = objects.deployment("stable-diffusion");
    assert_eq!(pod_labels(sd).get("app").map(String::as_str), Some("stable-diffusion"));
    let c = container(sd, "stable-diffusion");
    assert!(c
        .image
        .as_deref()
        .is_some_and(|i| i.starts_with("yunqi-registry.cn-shanghai.cr.aliyuncs.com/lab/stable-diffusion@sha256:")));
    let command: Vec<_> = c.command.iter().flatten().chain(c.args.iter().flatten()).map(String::as_str).collect();
    assert_eq!(command, ["python3", "launch.py", "--listen", "--skip-torch-cuda-test", "--api"]);
    let probe = c.readiness_probe.as_ref().and_then(|p| p.tcp_socket.as_ref()).expect("tcp readiness probe");
    assert_eq!(container_port(c, &probe.port), 7860);
    let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref()).expect("limits");
    assert_eq!(limits.get("nvidia.com/gpu").map(|q| q.0.as_str()), Some("1"));
}

/// A rollout never leaves no replica serving: every replica is Ready (a
/// standby hands requests over), so new ones come up before old ones go
/// (maxSurge 1, maxUnavailable 0), a PodDisruptionBudget keeps one through
/// node drains, each replica advertises its pod IP for hand-overs, and the
/// grace period covers shutdown_delay + drain_timeout.
#[test]
fn a_rollout_of_sdgate_keeps_a_replica_serving() {
    let objects = load(&listed_resources());
    let deployment = objects.deployment("sdgate");
    let spec = deployment.spec.as_ref().unwrap();
    let rolling = spec.strategy.as_ref().and_then(|s| s.rolling_update.as_ref()).expect("a rolling update");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(objects.disruption_budgets.len(), 1);
    let budget = objects.disruption_budgets[0].spec.as_ref().unwrap();
    assert_eq!(budget.min_available, Some(IntOrString::Int(1)));
    let labels = budget.selector.as_ref().and_then(|s| s.match_labels.clone()).unwrap_or_default();
    assert_eq!(labels, pod_labels(deployment));
    let c = container(deployment, "sdgate");
    let env = c.env.as_ref().expect("env");
    let pod_ip =
        env.iter().find(|e| e.name == "POD_IP").and_then(|e| e.value_from.as_ref()).and_then(|v| v.field_ref.as_ref());
    assert_eq!(pod_ip.map(|f| f.field_path.as_str()), Some("status.podIP"));
    let config = sdgate_config(&objects);
    let grace = spec.template.spec.as_ref().and_then(|p| p.termination_grace_period_seconds).unwrap_or(30);
    assert!(
        grace as u64 > (config.shutdown_delay + config.drain_timeout).as_secs(),
        "terminationGracePeriodSeconds {grace} must exceed shutdown_delay + drain_timeout"
    );
}

#[test]
fn the_sdgate_deployment_reads_the_configmap_where_it_is_mounted() {
    let objects = load(&listed_resources());
    let deployment = objects.deployment("sdgate");
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("sdgate"));
    let c = container(deployment, "sdgate");

    // --config PATH, PATH inside a mount of the ConfigMap, its file a key of it.
    let args = c.args.as_deref().unwrap_or_default();
    let at = args.iter().position(|a| a == "--config").expect("--config");
    let path = Path::new(&args[at + 1]);
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| path.parent() == Some(Path::new(&m.mount_path)))
        .unwrap_or_else(|| panic!("no volume mounted at {}", path.display()));
    assert!(mount.sub_path.is_none(), "a subPath mount would not see ConfigMap updates");
    let volume = pod.volumes.iter().flatten().find(|v| v.name == mount.name).expect("the mounted volume");
    let source = volume.config_map.as_ref().expect("a configMap volume");
    assert_eq!(source.name, "sdgate-config");
    let key = path.file_name().unwrap().to_str().unwrap();
    assert!(source.items.is_none(), "every key mounted under its own name");
    let config_map = objects.config_maps.iter().find(|c| name_of(&c.metadata) == "sdgate-config").unwrap();
    assert!(config_map.data.as_ref().is_some_and(|d| d.contains_key(key)), "ConfigMap key {key}");

    // POD_NAME from the downward API, the affinity key from the user's Secret.
    let env = c.env.as_deref().unwrap_or_default();
    let var = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value_from.clone());
    let pod_name = var("POD_NAME").and_then(|v| v.field_ref).expect("POD_NAME from fieldRef");
    assert_eq!(pod_name.field_path, "metadata.name");
    let key_ref = var("SDGATE_AFFINITY_KEY").and_then(|v| v.secret_key_ref).expect("SDGATE_AFFINITY_KEY from a Secret");
    assert_eq!((key_ref.name.as_str(), key_ref.key.as_str()), ("sdgate-affinity", "key"));

    // Probes on the admin listener, which the config puts on 9090.
    let config = sdgate_config(&objects);
    let admin = config.admin.expect("admin listener").port();
    for (probe, path) in [(&c.readiness_probe, "/readyz"), (&c.liveness_probe, "/healthz")] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("{path} probe"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(container_port(c, &get.port), i32::from(admin), "{path} on the admin port");
    }
    assert!(c.resources.as_ref().and_then(|r| r.requests.as_ref()).is_some(), "resource requests");

    // The Services reach the right ports of these pods.
    let labels = pod_labels(deployment);
    let public = objects.service("sdgate");
    let public_spec = public.spec.as_ref().unwrap();
    assert_eq!(public_spec.type_.as_deref(), Some("LoadBalancer"));
    let http = public_spec.ports.iter().flatten().find(|p| p.name.as_deref() == Some("http")).expect("port http");
    assert_eq!(http.port, 80);
    assert_eq!(container_port(c, http.target_port.as_ref().unwrap()), i32::from(config.listen.port()));
    assert!(
        !public_spec.ports.iter().flatten().any(|p| p.name.as_deref() == Some("admin")),
        "the admin listener stays off the LoadBalancer"
    );
    for service in &objects.services {
        let selector = service.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default();
        if selector.get("app").map(String::as_str) == Some("sdgate") {
            assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "{}", name_of(&service.metadata));
        }
    }
}

#[test]
fn the_role_grants_exactly_what_the_code_calls() {
    let objects = load(&listed_resources());
    assert_eq!(objects.roles.len(), 1);
    let role = &objects.roles[0];
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{rule:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    assert!(granted.insert((group.clone(), resource.clone(), verb.clone())), "granted twice: {rule:?}");
                }
            }
        }
    }
    let wanted: BTreeSet<_> = RBAC
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(move |v| (group.to_string(), resource.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(granted, wanted);

    let binding = &objects.role_bindings[0];
    assert_eq!((binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()), ("Role", name_of(&role.metadata)));
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!((subject.kind.as_str(), subject.name.as_str()), ("ServiceAccount", "sdgate"));
    assert_eq!(name_of(&objects.service_accounts[0].metadata), "sdgate");
}

#[test]
fn the_servicemonitor_and_keda_examples_match_the_manifests() {
    let objects = load(&listed_resources());
    let text = std::fs::read_to_string(deploy_dir().join("servicemonitor.yaml")).unwrap();
    let monitor = documents(&text, "servicemonitor.yaml").into_iter().find(|d| d["kind"] == "ServiceMonitor").unwrap();
    let match_labels = monitor["spec"]["selector"]["matchLabels"].as_object().expect("matchLabels");
    assert!(monitor["spec"].get("namespaceSelector").is_none(), "its own namespace, sdgate's");
    let port = monitor["spec"]["endpoints"][0]["port"].as_str().expect("endpoint port");
    let selected: Vec<_> = objects
        .services
        .iter()
        .filter(|s| {
            let labels = s.metadata.labels.clone().unwrap_or_default();
            match_labels.iter().all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
        })
        .collect();
    assert_eq!(selected.len(), 1, "the ServiceMonitor selects one Service");
    let admin = selected[0];
    let admin_port = admin.spec.as_ref().unwrap().ports.iter().flatten().find(|p| p.name.as_deref() == Some(port));
    let admin_port = admin_port.unwrap_or_else(|| panic!("Service {} has no port {port}", name_of(&admin.metadata)));
    let config = sdgate_config(&objects);
    let sdgate = container(objects.deployment("sdgate"), "sdgate");
    assert_eq!(
        container_port(sdgate, admin_port.target_port.as_ref().unwrap()),
        i32::from(config.admin.unwrap().port())
    );

    let text = std::fs::read_to_string(deploy_dir().join("keda-scaledobject.yaml")).unwrap();
    let keda = &documents(&text, "keda-scaledobject.yaml")[0];
    let target = keda["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
    let sdgate::config::Backend::Kubernetes(k8s) = &config.services[0].backend else { panic!() };
    assert_eq!(target, k8s.deployment, "KEDA scales the Deployment sdgate fronts");
    let query = keda["spec"]["triggers"][0]["metadata"]["query"].as_str().unwrap();
    assert!(query.contains(&format!("service=\"{}\"", config.services[0].name)), "{query}");
    assert_eq!(config.services[0].scale.mode, sdgate::config::ScaleMode::Builtin, "KEDA off by default: not both");
}

#[test]
fn unknown_fields_are_caught() {
    // The check itself: k8s-openapi would silently drop these.
    let document = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "x" },
        "spec": { "replica": 2, "selector": {}, "template": { "spec": { "containers": [
            { "name": "c", "image": "i", "readinessProbe": { "httpGet": { "path": "/", "port": 1 }, "period": 1 } }
        ] } } }
    });
    let typed: Deployment = serde_json::from_value(document.clone()).unwrap();
    let mut lost = Vec::new();
    lost_fields(&document, &serde_json::to_value(&typed).unwrap(), "", &mut lost);
    assert_eq!(
        lost,
        [".spec.replica (unknown field)", ".spec.template.spec.containers[0].readinessProbe.period (unknown field)"]
    );
}

/// The real renderer: its output is typed the same way and holds the same
/// objects. Skipped (with a note) where kubectl is not installed, unless
/// SDGATE_RENDERED names a rendered file (tests/deploy/render.sh).
#[test]
fn kubectl_kustomize_renders_the_same_objects() {
    let rendered = match std::env::var_os("SDGATE_RENDERED") {
        Some(path) => std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("SDGATE_RENDERED: {e}")),
        None => match std::process::Command::new("kubectl").arg("kustomize").arg(deploy_dir()).output() {
            Ok(output) => {
                assert!(output.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&output.stderr));
                String::from_utf8(output.stdout).unwrap()
            }
            Err(_) => {
                eprintln!("skipped: kubectl is not installed (tests/deploy/render.sh installs it)");
                return;
            }
        },
    };
    let rendered = load(&documents(&rendered, "kubectl kustomize"));
    assert_eq!(rendered.ids, load(&listed_resources()).ids);
}

/// `kubectl kustomize` of an overlay (its kustomization.yaml, written in
/// target/, beside deploy/: kustomize takes a base by a relative path);
/// None, with a note, where kubectl is not installed.
fn kustomize_overlay(name: &str, kustomization: &str) -> Option<String> {
    let overlay = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(format!("overlay-{name}-{}", std::process::id()))
        .join(name);
    std::fs::create_dir_all(&overlay).unwrap();
    std::fs::write(overlay.join("kustomization.yaml"), kustomization).unwrap();
    let output = std::process::Command::new("kubectl").arg("kustomize").arg(&overlay).output();
    let _ = std::fs::remove_dir_all(overlay.parent().unwrap());
    let Ok(output) = output else {
        eprintln!("skipped: kubectl is not installed (tests/deploy/render.sh installs it)");
        return None;
    };
    assert!(output.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&output.stderr));
    Some(String::from_utf8(output.stdout).unwrap())
}

/// An overlay with kustomize's `namespace:` puts every object there and
/// leaves nothing in `default`: no object, no RoleBinding subject, and no
/// namespace in sdgate's config (it takes its pod's).
#[test]
fn kubectl_kustomize_an_overlay_with_a_namespace_leaves_nothing_in_default() {
    let kustomization = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: sd-prod\nresources:\n  - ../../../deploy\n";
    let Some(text) = kustomize_overlay("sd-prod", kustomization) else { return };
    let documents = documents(&text, "the overlay");
    let objects = load(&documents);
    assert_eq!(objects.ids.len(), load(&listed_resources()).ids.len());
    for (kind, namespace, name) in &objects.ids {
        assert_eq!(namespace, "sd-prod", "{kind} {name}");
    }
    let binding = documents.iter().find(|d| d["kind"] == "RoleBinding").expect("the RoleBinding");
    assert_eq!(binding["subjects"][0]["namespace"], "sd-prod", "{binding}");
    assert!(!text.contains("namespace: default"), "{text}");
    assert!(!config_text(&objects).contains("namespace:"));
}

/// The image carries the profile-guided binary (the CPU figure the README
/// leads with), built by the same script the benchmarks use, and runs it as
/// the uid the Deployment expects. (Building the image itself needs a
/// container runtime and base images: not run here.)
#[test]
fn the_dockerfile_builds_the_profile_guided_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("ARG PGO=1"), "profile-guided by default");
    assert!(dockerfile.contains("bash benches/pgo.sh && cp target/pgo/release/sdgate /usr/local/bin/sdgate"));
    let pgo = std::fs::read_to_string(root.join("benches/pgo.sh")).unwrap();
    assert!(pgo.contains("--target-dir target/pgo)"), "pgo.sh writes target/pgo/release/sdgate");
    assert_eq!(pgo.matches("--locked").count(), 2, "both builds from Cargo.lock");
    let user = dockerfile.lines().find(|l| l.starts_with("USER ")).expect("USER");
    let objects = load(&listed_resources());
    let pod = objects.deployment("sdgate").spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let uid = pod.security_context.as_ref().and_then(|s| s.run_as_user).expect("runAsUser");
    assert_eq!(user, format!("USER {uid}:{uid}"));
}

/// The part of cert-manager's `Certificate` (cert-manager.io/v1) that
/// deploy/tls writes: no field outside it, each named as its CRD names it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Certificate {
    api_version: String,
    kind: String,
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: CertificateSpec,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CertificateSpec {
    secret_name: String,
    dns_names: Vec<String>,
    issuer_ref: IssuerRef,
    private_key: Option<PrivateKey>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuerRef {
    name: String,
    kind: String,
    group: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PrivateKey {
    algorithm: String,
    size: u32,
    rotation_policy: String,
}

fn tls_component(file: &str) -> Vec<Value> {
    let path = deploy_dir().join("tls").join(file);
    documents(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("deploy/tls/{file}: {e}")), file)
}

/// deploy/tls (a kustomize Component): cert-manager's Certificate writes
/// the Secret the sdgate pods mount where the config reads its PEM files,
/// for the config's hosts; the config is the base's with TLS on the
/// listener; the pods' ports and the Service's match the config's
/// listeners (https, the http redirect, the standby's relay).
#[test]
fn the_tls_component_mounts_the_certificates_secret_where_the_config_reads_it() {
    let kustomization: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(deploy_dir().join("tls/kustomization.yaml")).unwrap()).unwrap();
    assert_eq!(kustomization["kind"].as_str(), Some("Component"));
    let base: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap()).unwrap();
    assert!(base.get("components").is_none(), "TLS is opt-in: the quick start has no certificate to get");

    let certificate: Certificate = serde_json::from_value(tls_component("certificate.yaml").remove(0)).unwrap();
    assert_eq!((certificate.api_version.as_str(), certificate.kind.as_str()), ("cert-manager.io/v1", "Certificate"));
    assert!(certificate.metadata.namespace.is_none());
    assert!(!certificate.spec.issuer_ref.name.is_empty() && certificate.spec.issuer_ref.group == "cert-manager.io");
    assert!(["Issuer", "ClusterIssuer"].contains(&certificate.spec.issuer_ref.kind.as_str()));
    let key = certificate.spec.private_key.as_ref().expect("privateKey");
    assert!(key.algorithm == "ECDSA" && key.size == 256 && key.rotation_policy == "Always");

    let config_map: ConfigMap = typed(&tls_component("config.yaml")[0], "ConfigMap sdgate-config (tls)");
    let text = config_map.data.as_ref().and_then(|d| d.get("config.yaml")).expect("config.yaml").clone();
    let config = sdgate::Config::from_yaml(&text).unwrap_or_else(|e| panic!("the TLS config: {e:#}"));
    let tls = config.tls.as_ref().expect("tls");
    let hosts: BTreeSet<&str> = tls.certificates.iter().flat_map(|c| c.hosts.iter().map(String::as_str)).collect();
    let names: BTreeSet<&str> = certificate.spec.dns_names.iter().map(String::as_str).collect();
    assert_eq!(hosts, names, "the certificate is for the hosts the config serves over TLS");
    assert_eq!(hosts, config.services[0].hosts.iter().map(String::as_str).collect());
    // The same config as the base's but for the listener.
    let without = |text: &str| {
        let mut value: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
        let map = value.as_mapping_mut().unwrap();
        map.remove("listen");
        map.remove("tls");
        value
    };
    assert_eq!(
        without(&text),
        without(&config_text(&load(&listed_resources()))),
        "keep deploy/tls/config.yaml as the base's"
    );

    // The pods mount the Secret where the config reads it, and have its ports.
    let patch = &tls_component("deployment.yaml")[0];
    let pod = &patch["spec"]["template"]["spec"];
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tls").expect("volume tls");
    assert_eq!(volume["secret"]["secretName"], certificate.spec.secret_name.as_str());
    let patched = &pod["containers"][0];
    assert_eq!(patched["name"], "sdgate");
    let mount = patched["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "tls").expect("mount");
    let dir = std::path::Path::new(mount["mountPath"].as_str().unwrap());
    for c in &tls.certificates {
        assert_eq!((c.cert.parent(), c.key.parent()), (Some(dir), Some(dir)));
        let (cert, key) = (c.cert.file_name().unwrap(), c.key.file_name().unwrap());
        assert_eq!((cert.to_str(), key.to_str()), (Some("tls.crt"), Some("tls.key")), "a TLS Secret's keys");
    }
    let port = |name: &str| {
        patched["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
    };
    assert_eq!(port("https"), Some(u64::from(config.listen.port())));
    assert_eq!(port("relay"), Some(u64::from(tls.relay_listen.port())));
    // The base's `http` port (the Service's port 80) is the redirect.
    let objects = load(&listed_resources());
    let base_http =
        container_port(container(objects.deployment("sdgate"), "sdgate"), &IntOrString::String("http".into()));
    assert_eq!(tls.redirect_http.map(|a| i32::from(a.port())), Some(base_http));
    let service: Service = typed(&tls_component("service.yaml")[0], "Service sdgate (tls)");
    let ports = service.spec.and_then(|s| s.ports).unwrap_or_default();
    let https = ports.iter().find(|p| p.target_port == Some(IntOrString::String("https".into()))).expect("https");
    assert_eq!(
        tls.https_port.map(i32::from),
        Some(https.port),
        "the redirect sends clients to the Service's https port"
    );
}

/// The base with the TLS component, rendered by kubectl: the objects of the
/// base (typed, no unknown field) plus the Certificate, the Deployment
/// mounting the Secret and the Service on 443 and 80.
#[test]
fn kubectl_kustomize_renders_the_tls_component_onto_the_base() {
    let kustomization = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../../deploy\ncomponents:\n  - ../../../deploy/tls\n";
    let Some(text) = kustomize_overlay("with-tls", kustomization) else { return };
    let (certificates, rest): (Vec<Value>, Vec<Value>) =
        documents(&text, "base + tls").into_iter().partition(|d| d["kind"] == "Certificate");
    assert_eq!(certificates.len(), 1);
    let objects = load(&rest);
    assert_eq!(objects.ids, load(&listed_resources()).ids);
    let config = sdgate_config(&objects);
    assert!(config.tls.is_some());
    let sdgate = objects.deployment("sdgate");
    let pod = sdgate.spec.as_ref().and_then(|s| s.template.spec.as_ref()).unwrap();
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    assert!(volumes.iter().any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("sdgate-tls")));
    assert!(volumes.iter().any(|v| v.name == "config"), "the base's volume kept");
    let c = container(sdgate, "sdgate");
    for name in ["http", "https", "relay", "admin"] {
        container_port(c, &IntOrString::String(name.into()));
    }
    let ports: Vec<i32> = objects
        .service("sdgate")
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .iter()
        .map(|p| p.port)
        .collect();
    assert!(ports.contains(&443) && ports.contains(&80), "{ports:?}");
}
