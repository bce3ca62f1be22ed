//! What sdgate answers itself on an `owner_only` path (interrupt, skip,
//! progress) for a caller with no job running: nothing reaches a pod, so no
//! one can stop or watch another session's generation.
//!
//! - progress (`/sdapi/v1/progress` and other paths ending in `progress`):
//!   the WebUI's idle answer, with the caller's place in line when one of
//!   its requests waits (`textinfo`, and `queue_position` beside the WebUI's
//!   fields);
//! - `/internal/progress` (the WebUI's own page): Gradio's idle answer, with
//!   `queued: true` while the caller waits;
//! - anything else (interrupt, skip): 409, JSON like every sdgate error.

use http::Response;

use super::Service;
use crate::body::ResponseBody;
use crate::error::ProxyError;
use crate::gate::SessionId;

/// The answer to an `owner_only` request whose session has no job running.
pub fn no_job(service: &Service, path: &str, session: Option<&SessionId>) -> Response<ResponseBody> {
    if !path.ends_with("progress") {
        return ProxyError::NoJob.into_response(Some(&service.config.name));
    }
    let ahead =
        session.and_then(|session| service.jobs.waiting_at(session)).and_then(|ticket| service.gate.position(ticket));
    let textinfo = ahead.map(|ahead| match ahead {
        0 => "Waiting for a free GPU: next in line".to_string(),
        1 => "Waiting for a free GPU: 1 request ahead".to_string(),
        n => format!("Waiting for a free GPU: {n} requests ahead"),
    });
    let payload = if path == "/internal/progress" {
        serde_json::json!({
            "active": false,
            "queued": ahead.is_some(),
            "completed": false,
            "progress": null,
            "eta": null,
            "live_preview": null,
            "id_live_preview": -1,
            "textinfo": textinfo,
            "queue_position": ahead,
        })
    } else {
        serde_json::json!({
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": {
                "skipped": false,
                "interrupted": false,
                "job": "",
                "job_count": 0,
                "job_timestamp": "0",
                "job_no": 0,
                "sampling_step": 0,
                "sampling_steps": 0,
            },
            "current_image": null,
            "textinfo": textinfo,
            "queue_position": ahead,
        })
    };
    let mut response = Response::new(crate::body::full(payload.to_string()));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}
