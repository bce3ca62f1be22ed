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
//! logged as failed and stays out until it is idle (or is removed). Only a
//! well-formed "idle" frees it: an answer the check cannot read (a 400, a
//! page that is not the WebUI's progress) keeps it held, and at
//! `idle_check.timeout` it is let go through its readiness probe.

use std::sync::Arc;

use tokio::time::Instant;

use crate::config::IdleCheck;
use crate::gate::Slot;
use crate::pod::{Activity, Pool};

/// How one service checks that a pod is idle. It travels with each exchange
/// (see `ExchangeLimits::quarantine`), so a reload that changes it applies to
/// the next exchange and to its idle checks alike.
#[derive(Clone, Debug)]
pub struct Policy {
    pub check: IdleCheck,
    /// POSTed to the pod before polling (e.g. `/sdapi/v1/interrupt`).
    pub interrupt: Option<String>,
    /// The headers of sdgate's own calls to the service's pods (its
    /// readiness probe's Host and headers), as the probes send them.
    pub headers: http::HeaderMap,
}

/// Abnormal exchanges in a row after which a pod, once idle, must pass its
/// readiness probe again before it gets traffic (passive health).
pub const FAILURES_OUT_OF_ROTATION: u32 = 3;

/// Keeps `slot` until its pod is idle (see the module docs); without a
/// policy (`idle_check: null`) the slot is freed at once.
pub fn hold(slot: Slot, why: &'static str, policy: Option<Arc<Policy>>) {
    // A bypass request (progress poll, static file) holds no slot: its pod
    // is busy with someone else's job, which is not sdgate's to judge.
    if !slot.is_armed() {
        return;
    }
    let gate = slot.gate().clone();
    let Some(policy) = policy else { return };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let (endpoint, addr) = (slot.endpoint(), slot.addr());
    gate.quarantine(endpoint, true);
    gate.observer().quarantined();
    let failures = gate.record_failure(endpoint);
    tracing::warn!(pod = %addr, why, "pod may still be working: quarantined until an idle check passes");
    runtime.spawn(async move {
        let pool = Pool::shared();
        // Interrupt only a job that is surely this exchange's: the pod holds
        // no other request of sdgate's.
        let alone = gate.inspect(|g| g.endpoint(endpoint).is_some_and(|e| e.inflight == 1));
        if let (Some(path), true) = (&policy.interrupt, alone) {
            let timeout = std::time::Duration::from_secs(2);
            pool.call(addr, http::Method::POST, path, Some(&policy.headers), None, 64 * 1024, timeout).await;
        }
        let started = Instant::now();
        let mut failed = false;
        let mut unreadable: Option<String> = None;
        let mut out_of_rotation = failures >= FAILURES_OUT_OF_ROTATION;
        loop {
            // Gone, or on its way out and past the timeout: nothing more to wait for.
            let leaving = gate.inspect(|g| g.endpoint(endpoint).is_none_or(|e| e.draining));
            if leaving && (failed || gate.inspect(|g| g.endpoint(endpoint).is_none())) {
                break;
            }
            match pool.idle_state(addr, &policy.check.path, Some(&policy.headers)).await {
                Activity::Idle => {
                    tracing::info!(pod = %addr, after = ?started.elapsed(), "pod idle again: back in rotation");
                    break;
                }
                Activity::Busy => unreadable = None,
                Activity::Unreadable(what) => {
                    // Never read as idle: held, and said once per new answer.
                    if unreadable.as_deref() != Some(what.as_str()) {
                        tracing::warn!(pod = %addr, "idle check cannot be read ({what}): the pod stays held");
                        unreadable = Some(what);
                    }
                }
            }
            if started.elapsed() >= policy.check.timeout {
                if let Some(what) = &unreadable {
                    // Not known to be busy, but not known idle: let it go,
                    // through its readiness probe again.
                    tracing::error!(pod = %addr, timeout = ?policy.check.timeout, "idle check still cannot be read ({what}): released after idle_check.timeout, out of rotation until its probe passes");
                    out_of_rotation = true;
                    break;
                }
                if !failed {
                    failed = true;
                    tracing::error!(pod = %addr, timeout = ?policy.check.timeout, "pod still busy: failed, kept out of rotation until idle");
                }
            }
            tokio::time::sleep(policy.check.period).await;
        }
        if out_of_rotation {
            if failures >= FAILURES_OUT_OF_ROTATION {
                tracing::warn!(pod = %addr, failures, "failed too often in a row: out of rotation until its probe passes");
            }
            gate.set_ready(endpoint, false);
        }
        gate.quarantine(endpoint, false);
        drop(slot);
    });
}

impl Policy {
    pub fn of(service: &crate::config::ServiceConfig) -> Option<Arc<Self>> {
        let check = service.idle_check.clone()?;
        Some(Arc::new(Self {
            check,
            interrupt: service.interrupt_on_disconnect.clone(),
            headers: service.readiness.header_map(),
        }))
    }
}
