//! What a request pays besides the gate: recording its metrics, and, with
//! session affinity, verifying its cookie, looking up and updating its pin,
//! and signing the cookie it gets back; with API keys (`auth`), finding its
//! caller among 1,000 keys and admitting it against its limits; with JWTs,
//! verifying one against the JWKS held; with forward-auth, asking a
//! service on loopback.
//!
//! Run with `cargo bench --bench hot_path` (about half a minute on two cores).

use std::hint::black_box;
use std::time::Duration;

use tokio::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};

#[path = "../tests/support/jwt.rs"]
mod jwt_support;
use http::{header, HeaderMap, HeaderValue};
use sdgate::config::AffinityConfig;
use sdgate::gate::EndpointId;
use sdgate::observe::metrics::{Metrics, Recent};
use sdgate::proxy::affinity::{Affinity, Presented, Signer};

/// The metrics one answered request updates (what `proxy` records).
fn metrics_per_request(c: &mut Criterion) {
    let metrics = Metrics::new();
    let service = metrics.service("stable-diffusion");
    let recent = Recent::default();
    c.bench_function("metrics/record one answer", |b| {
        b.iter(|| {
            service.answered(black_box(200));
            service.duration.observe(black_box(1.25));
            service.queue_wait.observe(black_box(0.0));
            recent.record(Instant::now(), 200, black_box(Duration::from_millis(1250)));
        })
    });
}

fn affinity() -> Affinity {
    let config = AffinityConfig::default();
    let signer = Signer::new(b"a benchmark key, 32 bytes long..", Some(b"the previous key")).expect("signer");
    Affinity::new(config, signer)
}

fn cookies(c: &mut Criterion) {
    let affinity = affinity();
    let id = affinity.new_session();
    let issued = affinity.set_cookie(&id, Some(sdgate::gate::EndpointId(3)), false).expect("a cookie");
    let token = issued.to_str().expect("ascii").split(';').next().expect("name=value").to_string();
    let mut headers = HeaderMap::new();
    // A browser's Cookie header: the session among other cookies.
    let cookie = format!("_ga=GA1.1.123456789.1700000000; theme=dark; {token}; lang=en");
    headers.insert(header::COOKIE, HeaderValue::from_str(&cookie).expect("header"));
    assert!(matches!(affinity.presented(&headers), Presented::Valid(found, _) if found == id));
    c.bench_function("affinity/verify the sd cookie among 4", |b| {
        b.iter(|| black_box(affinity.presented(black_box(&headers))))
    });
    c.bench_function("affinity/sign and build Set-Cookie", |b| {
        b.iter(|| black_box(affinity.set_cookie(black_box(&id), Some(sdgate::gate::EndpointId(3)), false)))
    });
}

/// The pin table with 100 000 live sessions: one lookup and one update per
/// request.
fn pin_table(c: &mut Criterion) {
    let affinity = affinity();
    let now = Instant::now();
    let ids: Vec<_> = (0..100_000u64)
        .map(|n| {
            let id = affinity.new_session();
            affinity.sessions.set(id, EndpointId(n % 8), now);
            id
        })
        .collect();
    let mut n = 0usize;
    c.bench_function("affinity/pin get+set, 100k sessions", |b| {
        b.iter(|| {
            n = (n + 7919) % ids.len();
            let id = &ids[n];
            let pinned = affinity.sessions.get(black_box(id), now);
            affinity.sessions.set(*id, pinned.unwrap_or(EndpointId(0)), now);
        })
    });
}

/// A future that is ready at its first poll (a caller found without I/O:
/// a key, a JWT whose keys are held), as a serving thread polls it.
fn ready<T>(future: impl std::future::Future<Output = T>) -> T {
    let mut context = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => panic!("waited on I/O"),
    }
}

/// A request to a service with `auth`: its key looked up by its SHA-256
/// among 1,000, and admitted against limits (rate, concurrency, GPU-seconds).
fn api_keys(c: &mut Criterion) {
    let mut lines = String::from("keys:\n");
    let mut last = String::new();
    for i in 0..1000 {
        let (key, line) = sdgate::proxy::tenants::new_key(&format!("tenant-{i}")).expect("a key");
        lines.push_str(&line);
        lines.push('\n');
        last = key;
    }
    let path = std::env::temp_dir().join(format!("sdgate-bench-keys-{}.yaml", std::process::id()));
    std::fs::write(&path, lines).expect("keys file");
    let limits = sdgate::config::TenantLimits {
        concurrent: 1000,
        per_minute: u32::MAX / 2,
        gpu_seconds_per_hour: 1e12,
        gpu_seconds_per_day: 1e12,
        queued: 0,
    };
    let config = sdgate::config::AuthConfig { keys_file: Some(path.clone()), limits, ..Default::default() };
    let auth = sdgate::proxy::auth::Auth::load(&config).expect("keys");
    let _ = std::fs::remove_file(&path);
    let usage = sdgate::proxy::tenants::Usage::default();
    let request = http::Request::post("/sdapi/v1/txt2img")
        .header(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {last}")).expect("header"))
        .body(())
        .expect("request");
    c.bench_function("auth/find the caller and admit it", |b| {
        b.iter(|| {
            let asking = sdgate::proxy::auth::Asking::of(black_box(&request), None);
            let tenant = ready(auth.caller(&asking)).expect("known").tenant;
            let admission = usage.admit("stable-diffusion", &tenant).expect("admitted");
            drop(black_box(admission));
        })
    });
    let _ = usage.take_pending();
}

/// A request with a JWT (`auth.jwt`): its ES256 signature verified against
/// the JWKS held (fetched once, from a server in this process), its
/// issuer, audience and expiry checked, its caller found and admitted.
fn jwt(c: &mut Criterion) {
    let key = jwt_support::SigningKey::new("k");
    let jwks = serde_json::json!({ "keys": [key.jwk] }).to_string();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    runtime.spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let answer =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}", jwks.len());
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    let yaml = format!("jwt: {{ jwks_url: \"http://{addr}/jwks\", issuer: iss, audience: sdgate }}");
    let config: sdgate::config::AuthConfig = serde_yaml::from_str(&yaml).expect("auth config");
    let auth = sdgate::proxy::auth::Auth::load(&config).expect("jwt auth");
    let usage = sdgate::proxy::tenants::Usage::default();
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() + 3600;
    let token = key.token(serde_json::json!({ "sub": "team-a", "iss": "iss", "aud": "sdgate", "exp": exp }));
    let request = http::Request::post("/sdapi/v1/txt2img")
        .header(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).expect("header"))
        .body(())
        .expect("request");
    let asking = sdgate::proxy::auth::Asking::of(&request, None);
    runtime.block_on(auth.caller(&asking)).expect("the JWKS fetched, the token good");
    c.bench_function("auth/a JWT seen before: found and admitted", |b| {
        b.iter(|| {
            let asking = sdgate::proxy::auth::Asking::of(black_box(&request), None);
            let tenant = ready(auth.caller(&asking)).expect("good").tenant;
            let admission = usage.admit("stable-diffusion", &tenant).expect("admitted");
            drop(black_box(admission));
        })
    });
    // Each token new (another jti): its ES256 signature checked.
    let mut n = 0u64;
    c.bench_function("auth/a JWT first seen (ES256): verified and admitted", |b| {
        b.iter_batched(
            || {
                n += 1;
                let claims =
                    serde_json::json!({ "sub": "team-a", "iss": "iss", "aud": "sdgate", "exp": exp, "jti": n });
                http::Request::post("/sdapi/v1/txt2img")
                    .header(header::AUTHORIZATION, format!("Bearer {}", key.token(claims)))
                    .body(())
                    .expect("request")
            },
            |request| {
                let asking = sdgate::proxy::auth::Asking::of(&request, None);
                let tenant = ready(auth.caller(&asking)).expect("good").tenant;
                let admission = usage.admit("stable-diffusion", &tenant).expect("admitted");
                drop(black_box(admission));
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

/// A request with forward-auth (`auth.forward`): one GET to the auth
/// service (here a hyper server on loopback in this process, answering 200
/// with the caller's name at once), on a kept-alive connection: sdgate's
/// share of the round trip plus the loopback's.
fn forward_auth(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request: http::Request<hyper::body::Incoming>| async {
                    let mut response = http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                    response.headers_mut().insert("x-auth-request-user", HeaderValue::from_static("team-a"));
                    Ok::<_, std::convert::Infallible>(response)
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    let yaml = format!("forward: {{ url: \"http://{addr}/auth\" }}");
    let config: sdgate::config::AuthConfig = serde_yaml::from_str(&yaml).expect("auth config");
    let auth = sdgate::proxy::auth::Auth::load(&config).expect("forward auth");
    let request = http::Request::post("/sdapi/v1/txt2img")
        .header(header::COOKIE, HeaderValue::from_static("_oauth2_proxy=abc"))
        .body(())
        .expect("request");
    c.bench_function("auth/ask forward-auth on loopback (kept-alive)", |b| {
        b.iter(|| {
            let asking = sdgate::proxy::auth::Asking::of(black_box(&request), None);
            black_box(runtime.block_on(auth.caller(&asking)).expect("allowed").tenant);
        })
    });
}

criterion_group!(benches, metrics_per_request, cookies, pin_table, api_keys, jwt, forward_auth);
criterion_main!(benches);
