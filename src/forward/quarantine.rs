//! Quarantine: the slot of an exchange sdgate gave up on is freed only once
//! its pod is known to be idle.
//!
//! The SD WebUI finishes a job whose client left (FastAPI runs it to the
//! end), so when sdgate stops waiting (request_timeout, the pod reset the
//! connection mid-answer, a departed client's answer still unread after
//! `request_timeout`) the pod may still be generating. Freeing the slot then
//! would put a second generation on it. Instead the slot is kept and the
//! endpoint quarantined (no new request, even with `container_concurrency`
//! above 1) while an idle check is polled every `idle_check.period`:
//! `interrupt_on_disconnect` is sent first where configured. Queued requests
//! go to other pods meanwhile. A pod still busy after `idle_check.timeout` is
//! logged as failed and stays out until it is idle (or is removed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use crate::config::IdleCheck;
use crate::gate::Slot;

/// How one service checks that a pod is idle.
#[derive(Clone, Debug)]
pub struct Policy {
    pub check: IdleCheck,
    /// POSTed to the pod before polling (e.g. `/sdapi/v1/interrupt`).
    pub interrupt: Option<String>,
}

/// Abnormal exchanges in a row after which a pod, once idle, must pass its
/// readiness probe again before it gets traffic (passive health).
pub const FAILURES_OUT_OF_ROTATION: u32 = 3;

/// Each idle-check request may take this long.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Keeps `slot` until its pod is idle (see the module docs); without a
/// policy (`idle_check: null`) the slot is freed at once.
pub fn hold(slot: Slot, why: &'static str) {
    // A bypass request (progress poll, static file) holds no slot: its pod
    // is busy with someone else's job, which is not sdgate's to judge.
    if !slot.is_armed() {
        return;
    }
    let gate = slot.gate().clone();
    let Some(policy) = gate.quarantine_policy() else { return };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let (endpoint, addr) = (slot.endpoint(), slot.addr());
    gate.quarantine(endpoint, true);
    gate.metrics().quarantined();
    let failures = gate.record_failure(endpoint);
    tracing::warn!(pod = %addr, why, "pod may still be working: quarantined until an idle check passes");
    runtime.spawn(async move {
        let client = client();
        // Interrupt only a job that is surely this exchange's: the pod holds
        // no other request of sdgate's.
        let alone = gate.inspect(|g| g.endpoint(endpoint).is_some_and(|e| e.inflight == 1));
        if let (Some(path), true) = (&policy.interrupt, alone) {
            send(&client, addr, http::Method::POST, path).await;
        }
        let started = Instant::now();
        let mut failed = false;
        loop {
            // Gone, or on its way out and past the timeout: nothing more to wait for.
            let leaving = gate.inspect(|g| g.endpoint(endpoint).is_none_or(|e| e.draining));
            if leaving && (failed || gate.inspect(|g| g.endpoint(endpoint).is_none())) {
                break;
            }
            if is_idle(&client, addr, &policy.check.path).await {
                tracing::info!(pod = %addr, after = ?started.elapsed(), "pod idle again: back in rotation");
                break;
            }
            if !failed && started.elapsed() >= policy.check.timeout {
                failed = true;
                tracing::error!(pod = %addr, timeout = ?policy.check.timeout, "pod still busy: failed, kept out of rotation until idle");
            }
            tokio::time::sleep(policy.check.period).await;
        }
        if failures >= FAILURES_OUT_OF_ROTATION {
            tracing::warn!(pod = %addr, failures, "failed too often in a row: out of rotation until its probe passes");
            gate.set_ready(endpoint, false);
        }
        gate.quarantine(endpoint, false);
        drop(slot);
    });
}

/// What a call to the pod got: an answer, a refused connection (nothing
/// listens: the process and its job are gone), or nothing (hung, or busy
/// past the check's timeout).
enum Reply {
    Answer(StatusCode, Bytes),
    Refused,
    Nothing,
}

async fn send(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    method: http::Method,
    path: &str,
) -> Reply {
    let Ok(request) = Request::builder().method(method).uri(format!("http://{addr}{path}")).body(Empty::new()) else {
        return Reply::Nothing;
    };
    let attempt = async {
        match client.request(request).await {
            Ok(response) => {
                let status = response.status();
                match Limited::new(response.into_body(), 64 * 1024).collect().await {
                    Ok(body) => Reply::Answer(status, body.to_bytes()),
                    Err(_) => Reply::Nothing,
                }
            }
            Err(error) if error.is_connect() => Reply::Refused,
            Err(_) => Reply::Nothing,
        }
    };
    tokio::time::timeout(CHECK_TIMEOUT, attempt).await.unwrap_or(Reply::Nothing)
}

/// Idle: 2xx (with the WebUI's progress JSON, `state.job_count` exactly 0),
/// 404/401/403/405 (no such API, or not ours to read: nothing more to learn),
/// or nothing listening (the job died with its process).
pub async fn is_idle(client: &Client<HttpConnector, Empty<Bytes>>, addr: SocketAddr, path: &str) -> bool {
    match send(client, addr, http::Method::GET, path).await {
        Reply::Answer(
            StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::METHOD_NOT_ALLOWED,
            _,
        )
        | Reply::Refused => true,
        Reply::Answer(status, body) => status.is_success() && idle_progress(&body),
        Reply::Nothing => false,
    }
}

/// Whether a progress answer says no job runs. The WebUI sets
/// `state.job_count` to -1 while a job starts (before the model and scripts
/// are ready) and to the batch count while it runs: only 0 is idle. An
/// answer that is not the WebUI's JSON says nothing either way: idle.
fn idle_progress(body: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else { return true };
    match value.pointer("/state/job_count") {
        None => true,
        Some(count) => count.as_i64() == Some(0),
    }
}

/// A client for idle checks.
pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

impl Policy {
    pub fn of(service: &crate::config::ServiceConfig) -> Option<Arc<Self>> {
        let check = service.idle_check.clone()?;
        Some(Arc::new(Self { check, interrupt: service.interrupt_on_disconnect.clone() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webui_progress_says_whether_a_job_runs() {
        assert!(!idle_progress(br#"{"progress":0.5,"state":{"job_count":1}}"#));
        assert!(!idle_progress(br#"{"progress":0,"state":{"job_count":-1}}"#), "a job starting");
        assert!(idle_progress(br#"{"progress":0,"state":{"job_count":0}}"#));
        assert!(idle_progress(b"ok"));
        assert!(idle_progress(br#"{"status":"fine"}"#));
    }
}
