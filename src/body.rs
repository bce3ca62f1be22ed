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
    // A body that comes in one piece (the common case) is kept as it came,
    // without a copy.
    let first = loop {
        match body.frame().await {
            None => return Ok(Buffered::Complete(Bytes::new())),
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    break data;
                }
            }
        }
    };
    if first.len() > limit {
        return Ok(Buffered::Partial(first, body));
    }
    if body.is_end_stream() {
        return Ok(Buffered::Complete(first));
    }
    let mut bytes = BytesMut::with_capacity(declared.max(first.len()));
    bytes.extend_from_slice(&first);
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

/// A client's request body paused for longer than `body_read_timeout`
/// while sdgate was reading it.
#[derive(Debug, thiserror::Error)]
#[error("the request body paused for more than {0:?}")]
pub struct Stalled(pub std::time::Duration);

/// `body`, failing with [`Stalled`] once it keeps its reader waiting `pause`
/// for one frame. The clock runs only while a frame is asked for: a body
/// nobody reads (its request waits for a pod, or the pod reads slowly) is
/// not the client's fault.
pub struct PauseLimit<B> {
    body: B,
    pause: std::time::Duration,
    waiting: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<B> PauseLimit<B> {
    pub fn new(body: B, pause: std::time::Duration) -> Self {
        Self { body, pause, waiting: None }
    }
}

impl<B> Body for PauseLimit<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.waiting = None;
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
            }
            Poll::Pending => {
                let pause = self.pause;
                let timer = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(pause)));
                match std::future::Future::poll(timer.as_mut(), cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Stalled(pause))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_body_that_pauses_too_long_while_read_is_stalled() {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let stream = futures_util::stream::unfold(receiver, |mut r| async move { r.recv().await.map(|f| (f, r)) });
        let mut body = PauseLimit::new(StreamBody::new(Box::pin(stream)), std::time::Duration::from_secs(10));
        // Nobody reads for a minute (the request waited for a pod): no fault.
        tokio::time::advance(std::time::Duration::from_secs(60)).await;
        sender.send(Ok(Frame::data(Bytes::from_static(b"a")))).await.unwrap();
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "a");
        let reader = tokio::spawn(async move { body.frame().await.map(|f| f.map(|_| ())) });
        tokio::time::sleep(std::time::Duration::from_secs(11)).await;
        let stalled = reader.await.unwrap().unwrap().unwrap_err();
        assert!(stalled.is::<Stalled>(), "{stalled}");
        drop(sender);
    }

    fn frames(parts: &[&'static str]) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            parts.iter().map(|part| Ok(Frame::data(Bytes::from_static(part.as_bytes())))).collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    fn complete<B>(buffered: Buffered<B>) -> Bytes {
        match buffered {
            Buffered::Complete(bytes) => bytes,
            Buffered::Partial(..) => panic!("expected the whole body"),
        }
    }

    #[tokio::test]
    async fn a_body_in_one_piece_is_kept_as_it_came() {
        let piece = Bytes::from_static(b"{\"images\":[]}");
        let body = Full::new(piece.clone());
        let bytes = complete(buffer(body, 1024).await.unwrap());
        assert_eq!(bytes, piece);
        assert_eq!(bytes.as_ptr(), piece.as_ptr(), "no copy");
    }

    #[tokio::test]
    async fn pieces_are_joined_and_an_empty_body_is_empty() {
        assert_eq!(complete(buffer(frames(&["ab", "c", "de"]), 1024).await.unwrap()), "abcde");
        assert_eq!(complete(buffer(frames(&[]), 1024).await.unwrap()), "");
    }

    #[tokio::test]
    async fn past_the_limit_the_rest_streams() {
        match buffer(frames(&["abc", "def", "gh"]), 4).await.unwrap() {
            Buffered::Partial(head, rest) => {
                assert_eq!(head, "abcdef");
                assert_eq!(rest.collect().await.unwrap().to_bytes(), "gh");
            }
            Buffered::Complete(_) => panic!("expected the rest to stream"),
        }
        match buffer(Full::new(Bytes::from_static(b"abcdef")), 4).await.unwrap() {
            Buffered::Partial(head, rest) => {
                assert_eq!(head, "abcdef");
                assert!(rest.is_end_stream());
            }
            Buffered::Complete(_) => panic!("a single piece over the limit is partial too"),
        }
    }
}
