//! Short calls to a pod (probes, idle checks, interrupts) on the shared
//! pool: the answer read in full up to a limit, the connection kept.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, StatusCode};
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
    /// An answer larger than the limit (its head only).
    Oversized(StatusCode),
    /// Nothing usable: no answer in time, or a broken one.
    Nothing,
}

impl Pool {
    /// `method path` to `pod` with `headers` (a Host among them, else the
    /// pod's `ip:port`) and a JSON `body` (none: empty), the answer read up
    /// to `limit` bytes, all within `timeout`.
    #[allow(clippy::too_many_arguments)]
    pub async fn call(
        &self,
        pod: SocketAddr,
        method: Method,
        path: &str,
        headers: Option<&HeaderMap>,
        body: Option<Bytes>,
        limit: usize,
        timeout: Duration,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(path);
        if let (Some(headers), Some(map)) = (headers, request.headers_mut()) {
            map.extend(headers.iter().map(|(name, value)| (name.clone(), value.clone())));
        }
        let body = match body {
            Some(bytes) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                ReplayableBody::new(crate::body::full(bytes))
            }
            None => {
                // A POST says it has no body (hyper sends no length for an empty one).
                if !matches!(request.method_ref(), Some(&Method::GET | &Method::HEAD)) {
                    request = request.header(header::CONTENT_LENGTH, "0");
                }
                ReplayableBody::empty()
            }
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
                        Err(error) if error.is::<http_body_util::LengthLimitError>() => Reply::Oversized(status),
                        Err(_) => Reply::Nothing,
                    }
                }
                Err(SendError::Connect(reason, _)) => Reply::Refused(reason),
                Err(SendError::Http(_)) => Reply::Nothing,
            }
        };
        tokio::time::timeout(timeout, attempt).await.unwrap_or(Reply::Nothing)
    }

    /// Whether `pod` runs a job, asked at `path` (the WebUI's progress API,
    /// asked without its live preview image: `skip_current_image=true`).
    /// Idle only on what says so: the WebUI's progress JSON with
    /// `state.job_count` 0, or nothing listening (the job died with its
    /// process). Busy on that JSON with another count, a 5xx, or no answer
    /// in time (a busy pod may be slow to answer). Anything else cannot be read
    /// (another status, a page that is not that JSON, an answer too large):
    /// the caller decides (see [`Activity::Unreadable`]).
    pub async fn idle_state(&self, pod: SocketAddr, path: &str, headers: Option<&HeaderMap>) -> Activity {
        let path = with_skip_current_image(path);
        match self.call(pod, Method::GET, &path, headers, None, IDLE_ANSWER_LIMIT, IDLE_CHECK_TIMEOUT).await {
            Reply::Answer(status, body) if status.is_success() => match progress_jobs(&body) {
                Some(0) => Activity::Idle,
                Some(_) => Activity::Busy,
                None => Activity::Unreadable(format!("GET {path} -> {} (not the WebUI's progress)", status.as_u16())),
            },
            // A pod in trouble mid-job (a 5xx) is not taken as idle either.
            Reply::Answer(status, _) | Reply::Oversized(status) if status.is_server_error() => Activity::Busy,
            Reply::Answer(status, _) | Reply::Oversized(status) => {
                Activity::Unreadable(format!("GET {path} -> {}", status.as_u16()))
            }
            Reply::Refused(_) => Activity::Idle,
            Reply::Nothing => Activity::Busy,
        }
    }
}

/// What an idle check says of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Activity {
    Idle,
    Busy,
    /// An answer that says neither (what it was): never read as idle. In
    /// quarantine it keeps the pod out until `idle_check.timeout`; before a
    /// pod's first request it lets it in (a pod that does not speak the
    /// WebUI's API is not shut out for good), with a warning.
    Unreadable(String),
}

/// `path` asking the WebUI's progress API to leave out the live preview
/// (a base64 image in every answer otherwise), unless the path says already.
fn with_skip_current_image(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.ends_with("/progress") && !path.contains("/progress?") || path.contains("skip_current_image") {
        return path.into();
    }
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}skip_current_image=true").into()
}

/// The most of an idle check's answer that is read.
const IDLE_ANSWER_LIMIT: usize = 64 * 1024;
/// Each idle-check request may take this long.
const IDLE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The jobs a WebUI progress answer counts (`state.job_count`), if it is
/// one. The WebUI sets it to -1 while a job starts (before the model and
/// scripts are ready) and to the batch count while it runs: only 0 is idle.
pub fn progress_jobs(body: &[u8]) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Progress {
        state: State,
    }
    #[derive(serde::Deserialize)]
    struct State {
        job_count: i64,
    }
    serde_json::from_slice::<Progress>(body).ok().map(|progress| progress.state.job_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webui_progress_says_whether_a_job_runs() {
        assert_eq!(progress_jobs(br#"{"progress":0.5,"state":{"job_count":1}}"#), Some(1));
        assert_eq!(progress_jobs(br#"{"progress":0,"state":{"job_count":-1}}"#), Some(-1), "a job starting");
        assert_eq!(progress_jobs(br#"{"progress":0,"state":{"job_count":0}}"#), Some(0));
        assert_eq!(progress_jobs(b"ok"), None, "not JSON: cannot be read");
        assert_eq!(progress_jobs(br#"{"status":"fine"}"#), None, "not the progress");
        assert_eq!(progress_jobs(br#"{"state":{"job_count":"0"}}"#), None, "not a count");
    }

    #[test]
    fn progress_is_asked_without_its_preview_image() {
        assert_eq!(with_skip_current_image("/sdapi/v1/progress"), "/sdapi/v1/progress?skip_current_image=true");
        assert_eq!(with_skip_current_image("/sdapi/v1/progress?a=1"), "/sdapi/v1/progress?a=1&skip_current_image=true");
        assert_eq!(
            with_skip_current_image("/sdapi/v1/progress?skip_current_image=false"),
            "/sdapi/v1/progress?skip_current_image=false"
        );
        assert_eq!(with_skip_current_image("/busy"), "/busy");
    }
}
