//! Body types at the edges of the proxy.

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, StreamBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What sdgate answers clients with: a pod's streamed body or its own JSON.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body read into memory up to a limit.
pub enum Buffered<B> {
    /// All of it.
    Complete(Bytes),
    /// More than the limit: what was read, and the rest, still to stream.
    Partial(Bytes, B),
}

/// Reads `body` until its end or until more than `limit` bytes have come
/// (trailers are not kept: neither clients of the WebUI nor pods send any).
pub async fn buffer<B>(mut body: B, limit: usize) -> Result<Buffered<B>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    // The declared length, when there is one: one allocation of the right
    // size instead of doubling (a 3 MiB answer would end in a 4 MiB buffer).
    let declared = usize::try_from(body.size_hint().lower()).unwrap_or(0).min(limit.saturating_add(1));
    let mut bytes = BytesMut::with_capacity(declared);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            bytes.extend_from_slice(&data);
            if bytes.len() > limit {
                return Ok(Buffered::Partial(bytes.freeze(), body));
            }
        }
    }
    Ok(Buffered::Complete(bytes.freeze()))
}

/// `head` followed by what is left of `rest`, as one body.
pub fn chain<B>(head: Bytes, rest: B) -> UnsyncBoxBody<Bytes, BoxError>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let first = futures_util::stream::once(async move { Ok::<_, BoxError>(Frame::data(head)) });
    let rest = http_body_util::BodyStream::new(rest.map_err(Into::into));
    StreamBody::new(futures_util::StreamExt::chain(first, rest)).boxed_unsync()
}
