//! The lobby: where a new connection's first request waits for a pod,
//! before hyper takes the connection.
//!
//! A burst at zero pods is thousands of clients that each send one request
//! and wait, for seconds or minutes. Waiting inside hyper, each held hyper's
//! connection state: a read buffer (8 KiB, then another while it watches for
//! the client leaving), an 8 KiB write buffer and its dispatcher, about
//! 20 KiB of RSS per waiting client (HAProxy: 7.7 KiB). Here the request is
//! read into a buffer of its own size and parsed with httparse (hyper's own
//! parser), then routed, admitted and queued by the same [`Proxy`] code as
//! any request; a client that leaves shows as the end of its socket. When the
//! request has its slot (or its error), hyper gets the connection and the
//! bytes read: it parses the request again and the proxy forwards it with the
//! slot it already holds.
//!
//! Only what is cheap to hold goes through the lobby: an HTTP/1 request whose
//! head and body (a `Content-Length` of at most [`MAX_BODY`]) come within the
//! connection's `header_read_timeout` and `body_read_timeout`. Everything
//! else goes to hyper as it is and takes the ordinary path, which answers as
//! before: HTTP/2, chunked bodies, `Expect: 100-continue`, upgrades, `CONNECT`,
//! heads httparse refuses, and requests that are refused or do not queue.

use std::io;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::proxy::router;
use crate::proxy::{Early, EarlyWait, Proxy};

/// The largest request body a request may have to wait in the lobby.
pub const MAX_BODY: usize = 64 * 1024;
/// As many header fields as hyper accepts.
const MAX_HEADERS: usize = 100;
/// How long a connection that has sent nothing yet may still send its
/// first request once the gateway drains.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// How much a read asks for at most.
const READ_CHUNK: usize = 2048;

/// What the lobby leaves of a connection (once per connection: its size
/// does not matter).
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    /// Close it: why (the client left, or sent no complete head in time).
    Close(&'static str),
    /// hyper serves it, reading `read` before the socket; `early` is its
    /// first request's admission and slot, if it waited here; `http1` when
    /// its first bytes were an HTTP/1 request head.
    Serve { read: Bytes, early: Option<Early>, http1: bool },
}

/// The lobby's limits for one connection.
#[derive(Clone, Copy)]
pub struct Limits {
    /// When the first request's head must be complete.
    pub head_deadline: Instant,
    pub body_read_timeout: std::time::Duration,
    pub max_header_bytes: usize,
}

/// Reads a new connection's first request and, when it queues, waits there
/// for its slot; see the module documentation.
pub async fn first_request(
    stream: &TcpStream,
    proxy: &Proxy,
    limits: Limits,
    draining: &mut watch::Receiver<bool>,
) -> Outcome {
    let mut read = Vec::new();
    let mut head_deadline = limits.head_deadline;
    let mut drain_grace = false;
    let (mut request, head, whole) = loop {
        match parse(&read, limits.max_header_bytes) {
            Parsed::Partial => {}
            Parsed::Pass { http1 } => return Outcome::Serve { read: Bytes::from(read), early: None, http1 },
            Parsed::Complete { request, head, body } => break (request, head, head + body),
        }
        let more = tokio::select! {
            more = tokio::time::timeout_at(head_deadline, read_more(stream, &mut read)) => more,
            // Shutting down: a connection that has sent nothing yet gets
            // DRAIN_GRACE for its first bytes, then is closed (as hyper
            // closes an idle one). It was accepted while the listener was
            // open, so its request may be on its way: closing it unread at
            // once would fail a request nobody refused (a standby's
            // hand-over connects, then writes).
            _ = draining.wait_for(|draining| *draining), if read.is_empty() && !drain_grace => {
                drain_grace = true;
                head_deadline = head_deadline.min(Instant::now() + DRAIN_GRACE);
                continue;
            }
        };
        match more {
            Err(_) if read.is_empty() && drain_grace => return Outcome::Close("shutting down"),
            Err(_) if read.is_empty() => return Outcome::Close("no request within header_read_timeout"),
            Err(_) => return Outcome::Close("request head not complete within header_read_timeout"),
            Ok(Ok(0) | Err(_)) => return Outcome::Close("client left"),
            Ok(Ok(_)) => {}
        }
    };
    let body_deadline = Instant::now() + limits.body_read_timeout;
    while read.len() < whole {
        match tokio::time::timeout_at(body_deadline, read_more(stream, &mut read)).await {
            // A slow body gets its 408 here, once: handing it to hyper would
            // start a second `body_read_timeout`.
            Err(_) => {
                let _ = router::normalize_host(&mut request);
                let response = proxy.body_timed_out(&mut request, stream.peer_addr().ok().map(|a| a.ip()));
                write_answer(stream, response).await;
                return Outcome::Close("request body not complete within body_read_timeout");
            }
            Ok(Ok(0) | Err(_)) => return Outcome::Close("client left"),
            Ok(Ok(_)) => {}
        }
    }
    let waiting = match router::normalize_host(&mut request) {
        Ok(()) => proxy.admit_early(&mut request, &read[head..whole], stream.peer_addr().ok().map(|a| a.ip())),
        Err(_) => None,
    };
    drop(request);
    let Some(waiting) = waiting else { return http1(read, None) };
    read.shrink_to_fit();
    let limit = whole + limits.max_header_bytes;
    let early = tokio::select! {
        early = EarlyWait::wait(waiting) => early,
        // Dropping the wait takes the request out of the queue.
        left = client_left(stream, &mut read, limit) => return Outcome::Close(left),
    };
    http1(read, Some(early))
}

/// hyper serves an HTTP/1 connection.
fn http1(read: Vec<u8>, early: Option<Early>) -> Outcome {
    Outcome::Serve { read: Bytes::from(read), early, http1: true }
}

/// Writes sdgate's own answer (a small JSON error) on the socket, closing
/// the connection after it; gives up after a few seconds.
async fn write_answer(stream: &TcpStream, response: http::Response<crate::body::ResponseBody>) {
    use http_body_util::BodyExt;
    let (parts, body) = response.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else { return };
    let mut out = format!("HTTP/1.1 {} {}\r\n", parts.status.as_u16(), parts.status.canonical_reason().unwrap_or(""))
        .into_bytes();
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\nconnection: close\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(&body);
    let write = async {
        let mut written = 0;
        while written < out.len() {
            stream.writable().await?;
            match stream.try_write(&out[written..]) {
                Ok(n) => written += n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        }
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), write).await;
}

/// Reads what the socket has into `read`: the count, 0 at its end.
async fn read_more(stream: &TcpStream, read: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        stream.readable().await?;
        read.reserve(READ_CHUNK);
        match stream.try_read_buf(read) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            done => return done,
        }
    }
}

/// Completes when the client closes its end of the connection (or it
/// fails). What the client sends meanwhile (a pipelined request) is kept for
/// hyper, up to `limit` bytes in all; past that, the lobby stops reading, as
/// hyper does with a full buffer.
async fn client_left(stream: &TcpStream, read: &mut Vec<u8>, limit: usize) -> &'static str {
    loop {
        if read.len() >= limit {
            return std::future::pending().await;
        }
        match read_more(stream, read).await {
            Ok(0) => return "client left",
            Err(_) => return "client connection failed",
            Ok(_) => {}
        }
    }
}

/// A parse of what has been read (a value of the moment, never stored).
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// Not for the lobby: hyper takes the connection as it is (`http1` if
    /// it is an HTTP/1 request head).
    Pass { http1: bool },
    /// A head of `head` bytes, then a body of `body` bytes.
    Complete { request: Request<()>, head: usize, body: usize },
}

fn parse(read: &[u8], max_header_bytes: usize) -> Parsed {
    if read.is_empty() {
        return Parsed::Partial;
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut fields);
    match head.parse(read) {
        Ok(httparse::Status::Complete(length)) => match request_of(&head) {
            Some((request, body)) => Parsed::Complete { request, head: length, body },
            None => Parsed::Pass { http1: true },
        },
        // hyper refuses a head larger than its buffer; so does the lobby.
        Ok(httparse::Status::Partial) if read.len() <= max_header_bytes => Parsed::Partial,
        _ => Parsed::Pass { http1: false },
    }
}

/// The request a parsed head describes and its body's length; None for a
/// request the lobby leaves to hyper.
fn request_of(head: &httparse::Request<'_, '_>) -> Option<(Request<()>, usize)> {
    let method = Method::from_bytes(head.method?.as_bytes()).ok()?;
    if method == Method::CONNECT {
        return None;
    }
    let version = match head.version? {
        1 => Version::HTTP_11,
        0 => Version::HTTP_10,
        _ => return None,
    };
    let uri: Uri = head.path?.parse().ok()?;
    let mut headers = HeaderMap::with_capacity(head.headers.len());
    let mut body = None;
    for field in head.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        if name == TRANSFER_ENCODING || name == EXPECT || name == UPGRADE {
            return None;
        }
        if name == CONTENT_LENGTH {
            // Two lengths are hyper's to refuse.
            if body.is_some() {
                return None;
            }
            // Digits only, as hyper reads it (`+5` or `5, 5` are hyper's to refuse).
            let digits = std::str::from_utf8(field.value).ok()?.trim();
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            body = Some(digits.parse::<usize>().ok()?);
        }
        headers.append(name, HeaderValue::from_bytes(field.value).ok()?);
    }
    let body = body.unwrap_or(0);
    if body > MAX_BODY {
        return None;
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Some((request, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Parsed {
        parse(text.as_bytes(), 8192)
    }

    #[test]
    fn a_post_with_its_body_length_is_for_the_lobby() {
        let text = "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: sd\r\nContent-Length: 5\r\n\r\nhello";
        let Parsed::Complete { request, head, body } = parsed(text) else { panic!("not complete") };
        assert_eq!((head, body), (text.len() - 5, 5));
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri().path(), "/sdapi/v1/txt2img");
        assert_eq!(request.headers()["host"], "sd");
    }

    #[test]
    fn a_head_in_parts_waits_for_the_rest() {
        assert!(matches!(parsed(""), Parsed::Partial));
        assert!(matches!(parsed("POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: s"), Parsed::Partial));
    }

    #[test]
    fn what_the_lobby_leaves_to_hyper() {
        // Not HTTP/1: hyper-util tells the version.
        for text in ["PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "GARBAGE\r\n\r\n"] {
            assert!(matches!(parsed(text), Parsed::Pass { http1: false }), "{text:?} goes to hyper, either version");
        }
        for text in [
            "POST / HTTP/1.1\r\nHost: sd\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: sd\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: sd\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: sd\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: sd\r\nContent-Length: x\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: sd\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: sd\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: sd\r\nContent-Length: 65537\r\n\r\n",
            "CONNECT sd:443 HTTP/1.1\r\nHost: sd\r\n\r\n",
        ] {
            assert!(matches!(parsed(text), Parsed::Pass { http1: true }), "{text:?} goes to hyper, HTTP/1");
        }
    }

    #[test]
    fn a_head_larger_than_the_limit_goes_to_hyper() {
        let text = format!("GET / HTTP/1.1\r\nX-Big: {}", "a".repeat(9000));
        assert!(matches!(parsed(&text), Parsed::Pass { http1: false }));
    }
}
