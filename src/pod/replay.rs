//! The request body on its way to a pod, kept so that a request whose
//! connection failed before sending can go to another pod.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::body::BoxError;
use crate::error::lock;

/// The client's body, boxed.
pub type RequestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The client's request body, shared so that a request whose connection
/// failed before sending can be sent again: the body is only taken out of the
/// shared cell when the client polls it for the first time, which happens
/// after the connection to the pod is up.
#[derive(Clone)]
pub struct ReplayableBody {
    /// None for a request without a body (nothing to share).
    cell: Option<Arc<Mutex<BodyCell>>>,
}

struct BodyCell {
    body: Option<RequestBody>,
    read: bool,
}

impl std::fmt::Debug for ReplayableBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayableBody").field("read", &self.was_read()).finish_non_exhaustive()
    }
}

impl ReplayableBody {
    pub fn new(body: RequestBody) -> Self {
        Self { cell: Some(Arc::new(Mutex::new(BodyCell { body: Some(body), read: false }))) }
    }

    /// The body of a request that has none.
    pub fn empty() -> Self {
        Self { cell: None }
    }

    /// Whether any part of the body has been asked for by a connection.
    pub fn was_read(&self) -> bool {
        self.lock().is_some_and(|cell| cell.read)
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, BodyCell>> {
        self.cell.as_ref().map(|cell| lock(cell))
    }
}

impl Body for ReplayableBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(mut cell) = self.lock() else { return Poll::Ready(None) };
        cell.read = true;
        match cell.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.lock().is_none_or(|cell| cell.body.as_ref().is_none_or(|b| b.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        self.lock()
            .and_then(|cell| cell.body.as_ref().map(|b| b.size_hint()))
            .unwrap_or_else(|| SizeHint::with_exact(0))
    }
}
