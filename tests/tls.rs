//! TLS on the public listener, with real TLS clients (curl and Python's ssl,
//! the machine's OpenSSL): SNI picks the certificate, HTTP/2 over TLS, a
//! rotated certificate served to new connections with no failed request,
//! and bad TLS input (garbage, TLS 1.0, no SNI) refused without reaching a
//! pod. Certificates are made by the test (rcgen).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for `hosts`, written to `name`.pem and
/// `name`.key (atomically: a rename); its PEM (the CA a client trusts).
fn certificate(dir: &Path, name: &str, hosts: &[&str]) -> String {
    let made = rcgen::generate_simple_self_signed(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>()).unwrap();
    let pem = made.cert.pem();
    for (file, text) in [(format!("{name}.key"), made.key_pair.serialize_pem()), (format!("{name}.pem"), pem.clone())] {
        let part = dir.join(format!("{file}.part"));
        std::fs::write(&part, text).unwrap();
        std::fs::rename(&part, dir.join(file)).unwrap();
    }
    pem
}

fn tls_yaml(dir: &Path, backends: &[SocketAddr]) -> String {
    format!(
        "tls:\n  certificates:\n    - {{ hosts: [a.example], cert: \"{0}/a.pem\", key: \"{0}/a.key\" }}\n    - {{ hosts: [b.example, \"*.b.example\"], cert: \"{0}/b.pem\", key: \"{0}/b.key\" }}\n{1}",
        dir.display(),
        config_yaml(backends, 1, "")
    )
}

/// curl over TLS to `sni` at `addr`, trusting `ca`: (exit code, "status version").
fn curl(addr: SocketAddr, sni: &str, ca: &Path, http2: bool) -> (i32, String) {
    let url = format!("https://{sni}:{}/sdapi/v1/txt2img", addr.port());
    let output = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--max-time", "10"])
        .args(["--resolve", &format!("{sni}:{}:127.0.0.1", addr.port())])
        .arg("--cacert")
        .arg(ca)
        .arg(if http2 { "--http2" } else { "--http1.1" })
        .args(["-H", &format!("Host: {HOST}"), "-H", "Content-Type: application/json"])
        .args(["-d", r#"{"prompt":"tls","steps":1}"#, &url])
        .output()
        .expect("curl runs");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).to_string())
}

/// Python's ssl client: what it says of a handshake to `addr` with these
/// settings (`ok <alpn>`, or the error's class).
fn python(addr: SocketAddr, sni: Option<&str>, ca: &Path, tls10: bool) -> String {
    let script = r#"
import socket, ssl, sys
port, sni, ca, tls10 = int(sys.argv[1]), sys.argv[2] or None, sys.argv[3], sys.argv[4] == "1"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.check_hostname = sni is not None
if sni is None:
    ctx.verify_mode = ssl.CERT_NONE
if tls10:
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1
ctx.set_alpn_protocols(["http/1.1"])
try:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            host = "stable-diffusion.default.example.com"
            body = b'{"prompt":"python","steps":1}'
            tls.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            answer = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                answer += chunk
            print("ok", tls.selected_alpn_protocol(), answer.split(b"\r\n")[0].decode())
except Exception as error:
    print("refused", type(error).__name__, error)
"#;
    let output = Command::new("python3")
        .args([
            "-c",
            script,
            &addr.port().to_string(),
            sni.unwrap_or(""),
            ca.to_str().unwrap(),
            if tls10 { "1" } else { "0" },
        ])
        .output()
        .expect("python3 runs");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

async fn setup() -> (Dir, TestGateway, Vec<sdgate::tools::sim::SimHandle>) {
    let dir = Dir(std::env::temp_dir().join(unique_marker("sdgate-tls")));
    std::fs::create_dir_all(&dir.0).unwrap();
    certificate(&dir.0, "a", &["a.example"]);
    certificate(&dir.0, "b", &["b.example", "x.b.example"]);
    let workers = sims(1, fast_sim(5)).await;
    let gateway = TestGateway::start(&tls_yaml(&dir.0, &[workers[0].addr])).await;
    gateway.wait_for(|g| g.ready_count() == 1, "the pod ready").await;
    (dir, gateway, workers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_http2_and_http1_work_over_tls() {
    let (dir, gateway, workers) = setup().await;
    let (a, b) = (dir.0.join("a.pem"), dir.0.join("b.pem"));
    let addr = gateway.addr;
    let run = move |sni: &'static str, ca: PathBuf, http2: bool| {
        tokio::task::spawn_blocking(move || curl(addr, sni, &ca, http2))
    };
    assert_eq!(run("a.example", a.clone(), true).await.unwrap(), (0, "200 2".to_string()), "HTTP/2 over TLS");
    assert_eq!(run("a.example", a.clone(), false).await.unwrap(), (0, "200 1.1".to_string()));
    assert_eq!(run("b.example", b.clone(), true).await.unwrap(), (0, "200 2".to_string()));
    assert_eq!(run("x.b.example", b.clone(), true).await.unwrap(), (0, "200 2".to_string()), "a wildcard");
    // b.example is served b's certificate, which a's CA does not sign.
    let (code, _) = run("b.example", a.clone(), true).await.unwrap();
    assert_eq!(code, 60, "curl: the peer's certificate is not a.example's");
    let said = tokio::task::spawn_blocking(move || python(addr, Some("a.example"), &a, false)).await.unwrap();
    assert_eq!(said, "ok http/1.1 HTTP/1.1 200 OK", "Python's ssl client");
    assert_eq!(workers[0].stats().served, 5);
    // The pod is told the client came over https, and the host it asked
    // for, whatever the client said.
    let ca = dir.0.join("a.pem");
    let seen = tokio::task::spawn_blocking(move || {
        let output = Command::new("curl")
            .args(["-s", "--max-time", "10", "--resolve", &format!("a.example:{}:127.0.0.1", addr.port())])
            .arg("--cacert")
            .arg(&ca)
            .args([
                "-H",
                &format!("Host: {HOST}"),
                "-H",
                "X-Forwarded-Proto: http",
                "-H",
                "X-Forwarded-Host: evil.example",
            ])
            .arg(format!("https://a.example:{}/sim/headers", addr.port()))
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&output.stdout).to_string()
    })
    .await
    .unwrap();
    let headers: serde_json::Value = serde_json::from_str(&seen).expect("the headers the pod saw");
    assert_eq!(headers["x-forwarded-proto"], "https", "{headers}");
    assert_eq!(headers["x-forwarded-host"], HOST, "a client's own X-Forwarded-Host is not passed on: {headers}");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_new_connections_with_no_failed_request() {
    let (dir, gateway, workers) = setup().await;
    // The clients trust both the old and the new certificate.
    let old = std::fs::read_to_string(dir.0.join("a.pem")).unwrap();
    let addr = gateway.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let bundle = dir.0.join("bundle.pem");
    let new_pem = {
        // Made first, written later: the bundle must hold it before the swap.
        let staging = dir.0.join("staging");
        std::fs::create_dir_all(&staging).unwrap();
        let pem = certificate(&staging, "a", &["a.example"]);
        std::fs::write(&bundle, format!("{old}{pem}")).unwrap();
        pem
    };
    let (stop_loop, bundle_loop) = (stop.clone(), bundle.clone());
    let load = tokio::task::spawn_blocking(move || {
        let mut codes = Vec::new();
        while !stop_loop.load(Ordering::Relaxed) {
            codes.push(curl(addr, "a.example", &bundle_loop, codes.len() % 2 == 0));
        }
        codes
    });
    // A few requests on the old certificate, then the swap (two renames).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for file in ["a.key", "a.pem"] {
        std::fs::rename(dir.0.join("staging").join(file), dir.0.join(file)).unwrap();
    }
    std::fs::write(dir.0.join("new.pem"), &new_pem).unwrap();
    let new_ca = dir.0.join("new.pem");
    eventually_within(Duration::from_secs(10), "the new certificate served", || {
        let ca = new_ca.clone();
        async move { tokio::task::spawn_blocking(move || curl(addr, "a.example", &ca, true)).await.unwrap().0 == 0 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let codes = load.await.unwrap();
    let failed: Vec<_> = codes.iter().filter(|(code, out)| *code != 0 || !out.starts_with("200")).collect();
    assert!(failed.is_empty(), "{} of {} failed: {failed:?}", failed.len(), codes.len());
    assert!(codes.len() >= 3, "{} requests", codes.len());
    // The old certificate alone no longer does.
    let old_ca = dir.0.join("a-old.pem");
    std::fs::write(&old_ca, &old).unwrap();
    let (code, _) = tokio::task::spawn_blocking(move || curl(addr, "a.example", &old_ca, true)).await.unwrap();
    assert_eq!(code, 60);
    assert_no_overlap(&[workers[0].stats()]);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_tls_1_0_and_no_sni_are_refused_and_reach_no_pod() {
    let (dir, gateway, workers) = setup().await;
    let addr = gateway.addr;
    // Plain HTTP to a TLS listener, and bytes that are no handshake: closed.
    for bytes in
        [format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").into_bytes(), vec![0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3]]
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "closed, not left hanging");
        assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"), "no answer from a pod");
    }
    let ca = dir.0.join("a.pem");
    let (ca1, ca2) = (ca.clone(), ca.clone());
    let tls10 = tokio::task::spawn_blocking(move || python(addr, Some("a.example"), &ca1, true)).await.unwrap();
    println!("TLS 1.0: {tls10}");
    assert!(tls10.starts_with("refused") && tls10.contains("ALERT"), "TLS 1.0, refused by the server: {tls10}");
    let no_sni = tokio::task::spawn_blocking(move || python(addr, None, &ca2, false)).await.unwrap();
    println!("no SNI: {no_sni}");
    assert!(no_sni.starts_with("refused") && no_sni.contains("ALERT"), "no SNI, refused by the server: {no_sni}");
    let unknown = tokio::task::spawn_blocking(move || python(addr, Some("c.example"), &ca, false)).await.unwrap();
    assert!(unknown.starts_with("refused"), "a host with no certificate: {unknown}");
    assert_eq!(workers[0].stats().served, 0);
    assert_eq!(gateway.arrivals(), 0, "nothing queued");
    gateway.shutdown().await;
}

/// `tls.redirect_http`: a plain-HTTP listener answers 308 to the same host
/// and path over https.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_http_listener_redirects_to_https() {
    let dir = Dir(std::env::temp_dir().join(unique_marker("sdgate-tls")));
    std::fs::create_dir_all(&dir.0).unwrap();
    certificate(&dir.0, "a", &["a.example"]);
    certificate(&dir.0, "b", &["b.example"]);
    let workers = sims(1, fast_sim(5)).await;
    let plain = free_port().await;
    let yaml = tls_yaml(&dir.0, &[workers[0].addr]).replacen(
        "tls:\n",
        &format!("tls:\n  redirect_http: 127.0.0.1:{plain}\n"),
        1,
    );
    let gateway = TestGateway::start(&yaml).await;
    let answer = raw_exchange(
        format!("127.0.0.1:{plain}").parse().unwrap(),
        b"GET /sdapi/v1/progress?id=7 HTTP/1.1\r\nHost: a.example:80\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    let location = format!("location: https://a.example:{}/sdapi/v1/progress?id=7", gateway.addr.port());
    assert!(answer.to_ascii_lowercase().contains(&location), "{answer}");
    assert_eq!(workers[0].stats().served, 0);
    gateway.shutdown().await;
    // Behind a Service or NAT, clients reach https on https_port.
    let yaml = yaml.replacen("tls:\n", "tls:\n  https_port: 443\n", 1);
    let gateway = TestGateway::start(&yaml).await;
    let answer = raw_exchange(
        format!("127.0.0.1:{plain}").parse().unwrap(),
        b"GET /x HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.to_ascii_lowercase().contains("location: https://a.example/x\r\n"), "{answer}");
    gateway.shutdown().await;
}
