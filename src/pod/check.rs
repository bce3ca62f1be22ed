//! Short calls to a pod (probes, idle checks, interrupts) on the shared
//! pool: the answer read in full up to a limit, the connection kept.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::pool::{Pool, SendError};
use super::ReplayableBody;

/// What a short call to a pod got.
#[derive(Debug)]
pub enum Reply {
    /// An answer, read in full.
    Answer(StatusCode, Bytes),
    /// No connection (nothing listens: the process and its job are gone),
    /// with why in a few words ("refused").
    Refused(String),
    /// Nothing usable: no answer in time, a broken one, or one over the limit.
    Nothing,
}

impl Pool {
    /// `method path` to `pod` with `body` (none: empty), the answer read up
    /// to `limit` bytes, all within `timeout`.
    #[allow(clippy::too_many_arguments)]
    pub async fn call(
        &self,
        pod: SocketAddr,
        method: Method,
        path: &str,
        host: Option<&HeaderValue>,
        body: Option<Bytes>,
        limit: usize,
        timeout: Duration,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(host) = host {
            request = request.header(header::HOST, host);
        }
        let body = match body {
            Some(bytes) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                ReplayableBody::new(crate::body::full(bytes))
            }
            None => ReplayableBody::empty(),
        };
        let Ok(request) = request.body(body) else { return Reply::Nothing };
        let attempt = async {
            match self.send(pod, request, super::Share::Any).await {
                Ok((response, sent)) => {
                    let status = response.status();
                    match Limited::new(response.into_body(), limit).collect().await {
                        Ok(body) => {
                            sent.put_back(self, pod);
                            Reply::Answer(status, body.to_bytes())
                        }
                        Err(_) => Reply::Nothing,
                    }
                }
                Err(SendError::Connect(reason, _)) => Reply::Refused(reason),
                Err(SendError::Http(_)) => Reply::Nothing,
            }
        };
        tokio::time::timeout(timeout, attempt).await.unwrap_or(Reply::Nothing)
    }

    /// Whether `pod` runs no job, asked at `path` (the WebUI's progress API).
    /// Idle: 2xx (with the WebUI's progress JSON, `state.job_count` exactly 0),
    /// 404/401/403/405 (no such API, or not ours to read: nothing more to
    /// learn), or nothing listening (the job died with its process).
    pub async fn is_idle(&self, pod: SocketAddr, path: &str) -> bool {
        match self.call(pod, Method::GET, path, None, None, IDLE_ANSWER_LIMIT, IDLE_CHECK_TIMEOUT).await {
            Reply::Answer(
                StatusCode::NOT_FOUND
                | StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::METHOD_NOT_ALLOWED,
                _,
            )
            | Reply::Refused(_) => true,
            Reply::Answer(status, body) => status.is_success() && idle_progress(&body),
            Reply::Nothing => false,
        }
    }
}

/// The most of an idle check's answer that is read.
const IDLE_ANSWER_LIMIT: usize = 64 * 1024;
/// Each idle-check request may take this long.
const IDLE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a progress answer says no job runs. The WebUI sets
/// `state.job_count` to -1 while a job starts (before the model and scripts
/// are ready) and to the batch count while it runs: only 0 is idle. An
/// answer that is not the WebUI's JSON says nothing either way: idle.
pub fn idle_progress(body: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else { return true };
    match value.pointer("/state/job_count") {
        None => true,
        Some(count) => count.as_i64() == Some(0),
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
