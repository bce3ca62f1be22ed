//! A request's path as a pod will route it, for sdgate's own path rules
//! (`owner_only`, `bypass`, `wake`).
//!
//! The WebUI's server (uvicorn) percent-decodes the whole path before
//! routing, aiohttp too, and other servers in front of pods also merge
//! slashes or resolve `.` and `..`: `POST /sdapi/v1/%69nterrupt` is the
//! WebUI's interrupt. So the rules are matched on the path with every
//! `%XX` decoded, duplicate slashes merged and dot segments resolved
//! ([`routed`]); `owner_only` also ignores case. A request that reaches an
//! `owner_only` path only in such a disguise, or whose disguise changes
//! whether it skips the gate, is refused (400) rather than guessed at; the
//! path itself goes to the pod as the client wrote it.

use std::borrow::Cow;

/// `path` as pods route it (see the module doc), or why it cannot be read:
/// a `%XX` that decodes to bytes that are not UTF-8, or to a control
/// character. Borrowed, with no work beyond one scan, for a path that has
/// no `%`, no `//` and no dot segment: nearly every request.
pub fn routed(path: &str) -> Result<Cow<'_, str>, &'static str> {
    if is_plain(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = percent_decode(path.as_bytes());
    let text = String::from_utf8(decoded).map_err(|_| "the path is not UTF-8 once percent-decoded")?;
    if text.chars().any(char::is_control) {
        return Err("the path holds a control character once percent-decoded");
    }
    Ok(Cow::Owned(resolve(&text)))
}

/// No `%`, no `//`, no `.` or `..` segment.
fn is_plain(path: &[u8]) -> bool {
    if path.contains(&b'%') || path.windows(2).any(|pair| pair == b"//") {
        return false;
    }
    !path.split(|&b| b == b'/').any(|segment| segment == b"." || segment == b"..")
}

/// Every `%XX` decoded (a `%` not followed by two hex digits stays, as
/// uvicorn's and Python's `unquote` leave it).
fn percent_decode(path: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'%' && i + 2 < path.len() {
            if let (Some(high), Some(low)) = (hex(path[i + 1]), hex(path[i + 2])) {
                out.push(high << 4 | low);
                i += 3;
                continue;
            }
        }
        out.push(path[i]);
        i += 1;
    }
    out
}

/// Duplicate slashes merged and dot segments resolved (RFC 3986 5.2.4);
/// `..` never climbs above the root. A trailing slash is kept.
fn resolve(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_path_is_borrowed_as_it_is() {
        for path in ["/sdapi/v1/txt2img", "/", "/file=/tmp/a.png", "/a.b/c..d/.e"] {
            assert!(matches!(routed(path), Ok(Cow::Borrowed(p)) if p == path), "{path}");
        }
    }

    #[test]
    fn disguises_are_read_as_pods_read_them() {
        let cases = [
            ("/sdapi/v1/%69nterrupt", "/sdapi/v1/interrupt"),
            ("/sdapi%2Fv1%2Fskip", "/sdapi/v1/skip"),
            ("//sdapi/v1//progress", "/sdapi/v1/progress"),
            ("/sdapi/v1/x/../interrupt", "/sdapi/v1/interrupt"),
            ("/./internal/./progress", "/internal/progress"),
            ("/../../sdapi/v1/skip", "/sdapi/v1/skip"),
            ("/internal/%70rogress", "/internal/progress"),
            ("/a/%2e%2e/internal/progress", "/internal/progress"),
            ("/file=/tmp/a%20b.png", "/file=/tmp/a b.png"),
            ("/x/", "/x/"),
            ("/x/.", "/x/"),
            ("/100%", "/100%"),
            ("/%zz", "/%zz"),
            ("/caf%C3%A9", "/café"),
        ];
        for (path, pod) in cases {
            assert_eq!(routed(path).as_deref(), Ok(pod), "{path}");
        }
    }

    #[test]
    fn what_cannot_be_read_is_refused() {
        assert!(routed("/a%FF").is_err(), "not UTF-8");
        assert!(routed("/sdapi/v1/interrupt%00").is_err(), "NUL");
        assert!(routed("/a%0Ab").is_err(), "a newline");
    }
}
