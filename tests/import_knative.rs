//! `sdgate import-knative FILE` on the Knative Services of the Knative Stable Diffusion guides (tests/fixtures/knative/,
//! the YAML of the Knative Stable Diffusion guides' pages cleaned of HTML): the real binary, its config checked
//! by the real `sdgate check`, warnings for what does not map, exit 1 on garbage.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sdgate::config::{Backend, PortRef};
use sdgate::Config;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/knative").join(name)
}

fn sdgate(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdgate")).args(args).output().expect("sdgate runs")
}

fn import(path: &Path) -> Output {
    sdgate(&["import-knative".as_ref(), path.as_os_str()])
}

/// A file removed when dropped.
struct Temp(PathBuf);

impl Temp {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("sdgate-import-knative-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write a temp file");
        Self(path)
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Imports a guide's Knative Service, runs `sdgate check` on the result, and checks what the
/// guides ask for: cc 1, max 10, utilization 1.0, cookie sd 1800 s, TCP
/// readiness, the Deployment named after the service on port 7860.
fn guide_imports_and_checks(file: &str, name: &str) -> String {
    let output = import(&fixture(file));
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{file}: {stderr}");
    assert!(stdout.starts_with("# sdgate config imported by `sdgate import-knative`"), "{stdout}");

    let config_file = Temp::new(file, &stdout);
    let check = sdgate(&["check".as_ref(), "--config".as_ref(), config_file.0.as_os_str()]);
    assert!(check.status.success(), "sdgate check: {}\n{stdout}", String::from_utf8_lossy(&check.stderr));

    // The guides name no namespace: none is written, nor a Lease, so sdgate
    // in a pod uses its own namespace for both (the Lease named after the
    // Deployment, leader_election's default).
    assert!(!stdout.contains("namespace:") && !stdout.contains("\nleader_election:"), "{stdout}");
    let in_pod = Command::new(env!("CARGO_BIN_EXE_sdgate"))
        .args(["check".as_ref(), "--config".as_ref(), config_file.0.as_os_str()])
        .env("POD_NAMESPACE", "sd-prod")
        .output()
        .expect("sdgate runs");
    let effective = String::from_utf8_lossy(&in_pod.stdout);
    assert!(in_pod.status.success(), "{}", String::from_utf8_lossy(&in_pod.stderr));
    let in_pod = Config::from_yaml(&effective).expect("check prints a config");
    let Backend::Kubernetes(k8s) = &in_pod.services[0].backend else { panic!("{effective}") };
    let election = in_pod.election().expect("leader election on");
    assert_eq!(k8s.namespace, "sd-prod", "{effective}");
    assert_eq!((election.lease.as_str(), election.namespace.as_str()), (format!("sdgate-{name}").as_str(), "sd-prod"));

    let config = Config::from_yaml(&stdout).expect("the printed config parses");
    assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.admin.map(|a| a.to_string()).as_deref(), Some("0.0.0.0:9090"));
    let service = &config.services[0];
    assert_eq!(service.name, name);
    assert_eq!(service.hosts, [format!("{name}.default.example.com")]);
    assert_eq!(service.container_concurrency, 1);
    assert_eq!(service.scale.max, 10);
    assert_eq!(service.scale.min, 0);
    assert_eq!(service.scale.target_utilization, 1.0);
    let affinity = service.affinity.as_ref().expect("cookie affinity");
    assert_eq!(affinity.cookie, "sd");
    assert_eq!(affinity.timeout, Duration::from_secs(1800));
    assert!(service.readiness.tcp && service.readiness.http.is_none(), "tcp readiness: {:?}", service.readiness);
    assert_eq!(service.readiness.ready_period, Duration::from_secs(1), "the guides' periodSeconds: 1");
    assert_eq!(service.readiness.failure_threshold, 3);
    let Backend::Kubernetes(k8s) = &service.backend else { panic!("a kubernetes backend: {:?}", service.backend) };
    assert_eq!(k8s.deployment, name);
    assert_eq!(k8s.port, PortRef::Number(7860));

    // The Alibaba ECI annotation does not map: a warning names it.
    assert!(stderr.contains("warning: ") && stderr.contains("k8s.aliyun.com/eci-use-specs"), "{stderr}");
    stderr
}

#[test]
fn the_guides_knative_sd_demo() {
    let stderr = guide_imports_and_checks("knative-sd-demo.yaml", "knative-sd-demo");
    // Alibaba's MPA class is not KPA: said so.
    assert!(stderr.contains("mpa.autoscaling.knative.dev"), "{stderr}");
}

#[test]
fn the_guides_stable_diffusion() {
    let stderr = guide_imports_and_checks("stable-diffusion.yaml", "stable-diffusion");
    assert!(!stderr.contains("autoscaling.knative.dev/class"), "KPA is what sdgate does: {stderr}");
    let warnings: Vec<_> = stderr.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 2, "the ECI annotation and the probe's initial delay: {stderr}");
    assert!(warnings[0].contains("readinessProbe.initialDelaySeconds is not imported"), "{stderr}");
}

#[test]
fn an_unknown_annotation_is_named_in_a_warning() {
    let guide = std::fs::read_to_string(fixture("stable-diffusion.yaml")).unwrap();
    let marked = "        autoscaling.knative.dev/targetUtilizationPercentage: \"100\"\n";
    assert!(guide.contains(marked));
    let yaml = guide.replace(marked, &format!("{marked}        example.com/gpu-flavour: \"a100\"\n"));
    let file = Temp::new("unknown-annotation.yaml", &yaml);
    let output = import(&file.0);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let line = stderr.lines().find(|l| l.contains("example.com/gpu-flavour")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.starts_with("warning: "), "{line}");
    // ... and repeated in the config's header, so it stays with the file.
    assert!(String::from_utf8_lossy(&output.stdout).contains("example.com/gpu-flavour"));
}

#[test]
fn standard_input_is_read_for_a_dash() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdgate"))
        .args(["import-knative", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let guide = std::fs::read(fixture("stable-diffusion.yaml")).unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &guide).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("deployment: stable-diffusion"));
    assert!(
        stdout.starts_with(
            "# sdgate config imported by `sdgate import-knative` from the Knative Service in the standard input.\n"
        ),
        "{stdout}"
    );
}

/// Every probe setting sdgate has no use for is named in a warning: none is
/// dropped silently.
#[test]
fn probe_settings_that_do_not_map_are_each_named() {
    let guide = std::fs::read_to_string(fixture("stable-diffusion.yaml")).unwrap();
    let marked = "          initialDelaySeconds: 5\n";
    assert!(guide.contains(marked), "{guide}");
    let yaml = guide.replace(marked, "          initialDelaySeconds: 5\n          successThreshold: 2\n          terminationGracePeriodSeconds: 9\n")
        .replace("          periodSeconds: 1\n", "          periodSeconds: 0\n");
    let yaml = yaml.replace(
        "        readinessProbe:\n",
        "        livenessProbe:\n          tcpSocket: { port: 7860 }\n        readinessProbe:\n",
    );
    let file = Temp::new("probe.yaml", &yaml);
    let output = import(&file.0);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for named in [
        "readinessProbe.initialDelaySeconds",
        "readinessProbe.successThreshold",
        "readinessProbe.terminationGracePeriodSeconds",
        "readinessProbe.periodSeconds 0",
        "livenessProbe is not imported",
    ] {
        assert!(stderr.lines().any(|l| l.starts_with("warning: ") && l.contains(named)), "{named}: {stderr}");
    }
}

/// An HTTP readiness probe with a Host and other headers: sdgate's probe
/// sends them as the kubelet's would, and no warning says otherwise.
#[test]
fn probe_host_and_headers_are_imported() {
    let guide = std::fs::read_to_string(fixture("stable-diffusion.yaml")).unwrap();
    let tcp = "          tcpSocket:\n            port: 7860\n";
    assert!(guide.contains(tcp), "{guide}");
    let http = "          httpGet:\n            path: /sdapi/v1/sd-models\n            port: 7860\n\
                \x20           httpHeaders:\n            - name: Host\n              value: sd.internal\n\
                \x20           - name: X-Probe\n              value: kubelet\n";
    let file = Temp::new("probe-headers.yaml", &guide.replace(tcp, http));
    let output = import(&file.0);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("httpHeaders"), "{stderr}");
    let config_file = Temp::new("probe-headers-config.yaml", &stdout);
    let check = sdgate(&["check".as_ref(), "--config".as_ref(), config_file.0.as_os_str()]);
    assert!(check.status.success(), "sdgate check: {}\n{stdout}", String::from_utf8_lossy(&check.stderr));
    let readiness = &Config::from_yaml(&stdout).expect("the printed config parses").services[0].readiness;
    assert_eq!(readiness.http.as_deref(), Some("/sdapi/v1/sd-models"));
    assert_eq!(readiness.host.as_deref(), Some("sd.internal"));
    assert_eq!(readiness.headers.iter().collect::<Vec<_>>(), [(&"X-Probe".to_string(), &"kubelet".to_string())]);
}

#[test]
fn garbage_unreadable_and_non_knative_input_exit_1_with_a_message() {
    let cases = [
        ("garbage.yaml", "\u{1}\u{2} {{ not: [yaml at all\n", "not valid YAML"),
        ("prose.yaml", "Deploy Stable Diffusion on Serverless Kubernetes\n", "no Knative Service"),
        ("deployment.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: sd }\n", "no Knative Service"),
    ];
    for (name, text, needle) in cases {
        let file = Temp::new(name, text);
        let output = import(&file.0);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains("cannot import") && stderr.contains(needle), "{name}: {stderr}");
        assert!(output.stdout.is_empty(), "{name}: nothing on stdout");
    }
    let output = import(Path::new("/nonexistent/ksvc.yaml"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot read /nonexistent/ksvc.yaml"), "{stderr}");
}
