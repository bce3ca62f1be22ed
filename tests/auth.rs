//! Who is calling, beyond API keys: JWTs checked against a JWKS (issuer,
//! audience, expiry; keys rotated in and out at the issuer) and an
//! external forward-auth service (its 2xx names the caller, its 3xx/4xx is
//! the client's answer, its failure is a 503). Nothing refused reaches a
//! pod; the identity is the caller's tenant label and the owner of its
//! jobs.

mod common;
#[path = "support/jwt.rs"]
mod jwt;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Response;
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use jwt::SigningKey;

const ISSUER: &str = "https://issuer.test/";

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn claims(sub: &str, aud: &str, iss: &str, exp_in: i64) -> serde_json::Value {
    let exp = unix_now() as i64 + exp_in;
    serde_json::json!({ "sub": sub, "aud": aud, "iss": iss, "exp": exp, "iat": unix_now() })
}

fn bearer(mut request: http::Request<Full<Bytes>>, credential: &str) -> http::Request<Full<Bytes>> {
    request.headers_mut().insert("authorization", format!("Bearer {credential}").parse().unwrap());
    request
}

fn json_response(status: u16, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
    response
}

/// The issuer's JWKS endpoint: serves `keys` as they are now, counts its
/// fetches.
async fn jwks_server(keys: Arc<Mutex<Vec<serde_json::Value>>>, fetches: Arc<Mutex<u32>>) -> std::net::SocketAddr {
    serve_fn(move |_| {
        *fetches.lock().unwrap() += 1;
        let keys = keys.lock().unwrap().clone();
        json_response(200, serde_json::json!({ "keys": keys }).to_string())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_checked_against_a_jwks_whose_keys_rotate() {
    let workers = sims(1, fast_sim(5)).await;
    let (a, b) = (SigningKey::new("key-a"), SigningKey::new("key-b"));
    let published = Arc::new(Mutex::new(vec![a.jwk.clone()]));
    let fetches = Arc::new(Mutex::new(0));
    let jwks = jwks_server(published.clone(), fetches.clone()).await;
    let store = TempDir::new();
    let auth = format!(
        "    auth:\n      jwt: {{ jwks_url: \"http://{jwks}/jwks.json\", issuer: \"{ISSUER}\", audience: sdgate, refresh: 2s }}\n"
    );
    let yaml = format!(
        "jobs: {{ store: {{ file: \"{}\" }} }}\n{}",
        store.path.join("jobs.sqlite3").display(),
        config_yaml(&[workers[0].addr], 1, &auth)
    );
    let gateway = TestGateway::start(&yaml).await;
    gateway.wait_for(|g| g.ready_count() == 1, "pod ready").await;
    let client = client();
    let alice = a.token(claims("alice", "sdgate", ISSUER, 600));
    let answer = send(&client, bearer(txt2img(gateway.addr, "x", 1), &alice)).await;
    assert_eq!(answer.status.as_u16(), 200, "{:?}", answer.body);
    let seen = send(&client, bearer(get(gateway.addr, "/sim/headers"), &alice)).await.json();
    assert!(seen.get("authorization").is_none(), "the token is not passed on: {seen}");

    // Refused, each with 401 before anything is queued.
    let hmac = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("key-a".into());
        jsonwebtoken::encode(&header, &claims("mallory", "sdgate", ISSUER, 600), &EncodingKey::from_secret(b"x"))
            .unwrap()
    };
    let arrivals = gateway.arrivals();
    for (what, credential, why) in [
        ("expired", a.token(claims("alice", "sdgate", ISSUER, -600)), "expired"),
        ("another audience", a.token(claims("alice", "other-api", ISSUER, 600)), "audience"),
        ("another issuer", a.token(claims("alice", "sdgate", "https://evil.test/", 600)), "issuer"),
        ("signed by a key not published", b.token(claims("alice", "sdgate", ISSUER, 600)), "unknown key"),
        ("HS256 with the public key's id", hmac, "algorithm"),
        ("not a token", "a.b.c".to_string(), "malformed"),
    ] {
        let answer = send(&client, bearer(txt2img(gateway.addr, "x", 1), &credential)).await;
        answer.assert_json_error(401);
        let error = answer.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains(why), "{what}: {error}");
        assert!(answer.headers.contains_key("www-authenticate"), "{what}");
    }
    send(&client, txt2img(gateway.addr, "no token", 1)).await.assert_json_error(401);
    assert_eq!(gateway.arrivals(), arrivals, "nothing refused was queued");
    assert_eq!(workers[0].stats().served, 1, "nothing refused reached the pod (one generation)");

    // The issuer rotates: key B in, key A out. B's tokens are honoured (a
    // token of an unseen key fetches the JWKS again), A's are refused once
    // the JWKS is read again.
    *published.lock().unwrap() = vec![b.jwk.clone()];
    let bob = b.token(claims("bob", "sdgate", ISSUER, 600));
    eventually_within(Duration::from_secs(15), "key B honoured", || {
        let request = bearer(txt2img(gateway.addr, "rotated", 1), &bob);
        let client = client.clone();
        async move { send(&client, request).await.status.as_u16() == 200 }
    })
    .await;
    eventually_within(Duration::from_secs(15), "key A refused", || {
        let request = bearer(txt2img(gateway.addr, "old key", 1), &alice);
        let client = client.clone();
        async move { send(&client, request).await.status.as_u16() == 401 }
    })
    .await;
    assert!(*fetches.lock().unwrap() >= 2, "the JWKS was fetched again");

    // The identity is the tenant label and the owner of its jobs.
    assert_eq!(
        metric(gateway.admin, "sdgate_tenant_requests_total{service=\"sd\",tenant=\"alice\"}").await,
        Some(2.0),
        "her generation and her /sim/headers"
    );
    let mut submit = bearer(txt2img(gateway.addr, "async", 1), &bob);
    submit.headers_mut().insert("prefer", "respond-async".parse().unwrap());
    let submitted = send(&client, submit).await;
    assert_eq!(submitted.status.as_u16(), 202, "{:?}", submitted.body);
    let location = submitted.headers["location"].to_str().unwrap().to_string();
    let bob_again = b.token(claims("bob", "sdgate", ISSUER, 300));
    let carol = b.token(claims("carol", "sdgate", ISSUER, 300));
    assert_eq!(send(&client, bearer(get(gateway.addr, &location), &carol)).await.status.as_u16(), 404);
    assert_eq!(send(&client, bearer(get(gateway.addr, &location), &bob_again)).await.status.as_u16(), 200);
    gateway.shutdown().await;
}

/// What the forward-auth service was shown.
type Shown = Arc<Mutex<Vec<http::HeaderMap>>>;

/// A forward-auth service: `Bearer good-NAME` is NAME; `Bearer login` is
/// sent to log in (302); `Bearer broken` breaks it (500); anything else
/// is 401 with its own challenge.
async fn forward_auth_server(shown: Shown) -> std::net::SocketAddr {
    serve_fn(move |parts| {
        shown.lock().unwrap().push(parts.headers.clone());
        let credential = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        let mut response = match credential.strip_prefix("Bearer ") {
            Some(token) if token.starts_with("good-") => {
                let mut ok = json_response(202, String::new());
                ok.headers_mut().insert("x-auth-request-user", token["good-".len()..].parse().unwrap());
                ok.headers_mut().insert("set-cookie", "_session=refreshed; Path=/".parse().unwrap());
                ok
            }
            Some("login") => {
                let mut redirect = json_response(302, String::new());
                redirect.headers_mut().insert("location", "https://login.test/start".parse().unwrap());
                redirect
            }
            Some("broken") => json_response(500, "oops".into()),
            _ => {
                let mut denied = json_response(401, "who are you".into());
                denied.headers_mut().insert("www-authenticate", "Basic realm=\"login.test\"".parse().unwrap());
                denied
            }
        };
        response.headers_mut().insert("x-auth-server", "1".parse().unwrap());
        response
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_lets_in_whom_it_names_and_its_refusals_reach_the_client() {
    let workers = sims(1, fast_sim(5)).await;
    let shown = Shown::default();
    let server = forward_auth_server(shown.clone()).await;
    let auth = format!("    auth: {{ forward: {{ url: \"http://{server}/oauth2/auth\", timeout: 2s }} }}\n");
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, &auth).await;
    let client = client();

    let answer = send(&client, bearer(txt2img(gateway.addr, "allowed", 1), "good-alice")).await;
    assert_eq!(answer.status.as_u16(), 200, "{:?}", answer.body);
    let cookies: Vec<_> = answer.headers.get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).collect();
    assert!(
        cookies.contains(&"_session=refreshed; Path=/"),
        "the session it refreshed reaches the client: {cookies:?}"
    );
    let asked = shown.lock().unwrap().last().cloned().unwrap();
    assert_eq!(asked["authorization"], "Bearer good-alice");
    assert_eq!(asked["x-forwarded-method"], "POST");
    assert_eq!(asked["x-forwarded-uri"], "/sdapi/v1/txt2img");
    assert_eq!(asked["x-forwarded-host"], HOST);
    assert_eq!(asked["x-forwarded-proto"], "http");
    assert_eq!(asked["x-forwarded-for"], "127.0.0.1");
    assert_eq!(metric(gateway.admin, "sdgate_tenant_requests_total{service=\"sd\",tenant=\"alice\"}").await, Some(1.0));

    let arrivals = gateway.arrivals();
    let denied = send(&client, txt2img(gateway.addr, "no credential", 1)).await;
    denied.assert_json_error(401);
    assert_eq!(denied.headers["www-authenticate"], "Basic realm=\"login.test\"", "its challenge is passed on");
    let login = send(&client, bearer(txt2img(gateway.addr, "to log in", 1), "login")).await;
    login.assert_json_error(302);
    assert_eq!(login.headers["location"], "https://login.test/start");
    let broken = send(&client, bearer(txt2img(gateway.addr, "auth broken", 1), "broken")).await;
    broken.assert_json_error(503);
    assert!(!broken.headers.contains_key("x-auth-server"), "sdgate's answer, not the auth service's");
    assert_eq!(gateway.arrivals(), arrivals, "nothing refused was queued");
    assert_eq!(workers[0].stats().served, 1, "nothing refused reached the pod");
    assert_eq!(
        metric(gateway.admin, "sdgate_tenant_refused_total{reason=\"auth_unavailable\",service=\"sd\"}").await,
        Some(1.0)
    );
    gateway.shutdown().await;

    // A forward-auth service nobody answers at: 503, fail closed.
    let closed = free_port().await;
    let auth = format!("    auth: {{ forward: {{ url: \"http://127.0.0.1:{closed}/auth\", timeout: 2s }} }}\n");
    let gateway = TestGateway::in_front_of(&[workers[0].addr], 1, &auth).await;
    send(&client, bearer(txt2img(gateway.addr, "nobody home", 1), "good-alice")).await.assert_json_error(503);
    assert_eq!(workers[0].stats().served, 1);
    gateway.shutdown().await;
}
