//! What a pod's answer says it ran on: the WebUI's `info` (a JSON string at
//! the end of a generation's answer) names the checkpoint in memory as
//! `sd_model_name`. It corrects what sdgate assumed, e.g. when a pod does
//! not have the checkpoint a request named and kept its own.
//!
//! The WebUI gzips answers over 1000 bytes for clients that accept gzip
//! (Python's `requests`, so `webuiapi`, asks by default): such an answer is
//! inflated to read its tail, and passed on to the client as the pod sent
//! it. Inflating costs far less than compressing again at sdgate would
//! (benches/README.md), and only a generation's answer is read.

/// How far from the end of an answer `info` is looked for.
const TAIL: usize = 16 << 10;

/// The `sd_model_name` an answer reports, if it reports one plainly (a
/// name with escaped characters is left alone).
pub fn held_in<'a>(answer: &'a [u8]) -> Option<&'a str> {
    let tail = &answer[answer.len().saturating_sub(TAIL)..];
    let key = b"sd_model_name";
    let after = &tail[memchr::memmem::rfind(tail, key)? + key.len()..];
    // `\": \"NAME\"` inside the info string (or `": "NAME"` in plain JSON).
    let quote = |rest: &'a [u8]| rest.strip_prefix(b"\\").unwrap_or(rest).strip_prefix(b"\"");
    let spaces = |rest: &'a [u8]| &rest[rest.iter().take_while(|b| **b == b' ').count()..];
    let rest = spaces(quote(after)?).strip_prefix(b":")?;
    let value = quote(spaces(rest))?;
    let end = value.iter().position(|b| matches!(b, b'\\' | b'"'))?;
    let closed = value[end..].starts_with(b"\\\"") || value[end] == b'"';
    let name = std::str::from_utf8(&value[..end]).ok()?;
    (closed && !name.is_empty() && name.len() <= 256).then_some(name)
}

/// How many images an answer says its generation made: the length of the
/// WebUI's `all_seeds` in `info` (one seed per image, the grid aside),
/// looked for from the end (`info` is last; a whole plain answer, or a
/// gzipped one's inflated tail). None if it says nothing plainly.
pub fn images_in(answer: &[u8]) -> Option<u32> {
    let key = b"all_seeds";
    // The last one that parses: a prompt in `infotexts` may say the word,
    // but its quotes are escaped twice there.
    memchr::memmem::rfind_iter(answer, key).find_map(|at| {
        let after = &answer[at + key.len()..];
        let after = after.strip_prefix(b"\\").unwrap_or(after).strip_prefix(b"\"")?;
        let after = after.trim_ascii_start().strip_prefix(b":")?.trim_ascii_start().strip_prefix(b"[")?;
        let list = &after[..memchr::memchr(b']', after)?];
        if !list.iter().all(|b| b.is_ascii_digit() || matches!(b, b',' | b' ' | b'-')) {
            return None;
        }
        let items = list.split(|b| *b == b',').filter(|item| !item.trim_ascii().is_empty()).count();
        u32::try_from(items).ok()
    })
}

/// The most an inflated answer may grow to before sdgate stops reading it
/// (a pod's answer is not a stranger's, but a bound costs nothing).
const MAX_INFLATED: usize = 256 << 20;

/// The last [`TAIL`] bytes of a gzipped answer, inflated in pieces: the
/// memory it takes is bounded whatever the answer's size. None if it is
/// not gzip, is broken, or inflates past [`MAX_INFLATED`].
pub fn gunzip_tail(answer: &[u8]) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut inflater = flate2::read::GzDecoder::new(answer);
    let mut piece = vec![0u8; 32 << 10];
    let mut tail: Vec<u8> = Vec::with_capacity(2 * TAIL + piece.len());
    let mut total = 0usize;
    loop {
        let n = inflater.read(&mut piece).ok()?;
        if n == 0 {
            break;
        }
        total += n;
        if total > MAX_INFLATED {
            return None;
        }
        tail.extend_from_slice(&piece[..n]);
        if tail.len() > 2 * TAIL {
            tail.drain(..tail.len() - TAIL);
        }
    }
    let keep = tail.len().saturating_sub(TAIL);
    tail.drain(..keep);
    Some(tail)
}

/// Whether a `Content-Encoding` value is gzip alone.
pub fn is_gzip(encoding: &http::HeaderValue) -> bool {
    let value = encoding.as_bytes();
    value.eq_ignore_ascii_case(b"gzip") || value.eq_ignore_ascii_case(b"x-gzip")
}

#[cfg(test)]
mod tests {
    use super::{gunzip_tail, held_in, images_in, TAIL};

    #[test]
    fn the_checkpoint_is_read_from_a_webui_answers_info_string() {
        let webui = br#"{"images":["iVBOR..."],"parameters":{},"info":"{\"prompt\": \"dog\", \"sd_model_name\": \"v1-5-pruned-emaonly\", \"sd_model_hash\": \"6ce0161689\"}"}"#;
        assert_eq!(held_in(webui), Some("v1-5-pruned-emaonly"));
        let compact = br#"{"info":"{\"sd_model_name\":\"sd_xl\"}"}"#;
        assert_eq!(held_in(compact), Some("sd_xl"));
        assert_eq!(held_in(br#"{"sd_model_name": "plain"}"#), Some("plain"));
    }

    #[test]
    fn the_images_made_are_read_from_all_seeds() {
        let info = r#"{\"prompt\": \"dog\", \"seed\": 5, \"all_seeds\": [5, 6, 7, 8], \"infotexts\": [\"all_seeds\"]}"#;
        let answer = format!(r#"{{"images": ["AAAA"], "parameters": {{}}, "info": "{info}"}}"#);
        assert_eq!(images_in(answer.as_bytes()), Some(4));
        assert_eq!(images_in(br#"{"info": {"all_seeds": [12]}}"#), Some(1));
        assert_eq!(images_in(br#"{"images": ["AAAA"]}"#), None);
        assert_eq!(images_in(br#"{"all_seeds": "x]"}"#), None);
    }

    #[test]
    fn anything_unclear_is_left_alone() {
        assert_eq!(held_in(br#"{"info":"{\"sd_model_name\": null}"}"#), None);
        assert_eq!(held_in(br#"{"info":"{\"sd_model_name\": \"caf\u00e9\"}"}"#), None);
        assert_eq!(held_in(br#"{"info":"{\"sd_model_name\": \"\"}"}"#), None);
        assert_eq!(held_in(br#"{"images":[]}"#), None);
        assert_eq!(held_in(b"sd_model_name"), None);
    }

    #[test]
    fn a_gzipped_answer_is_inflated_to_its_tail() {
        use std::io::Write;
        let image = "A".repeat(3 * TAIL);
        let answer = format!(r#"{{"images":["{image}"],"info":"{{\"sd_model_name\": \"sd_xl_base\"}}"}}"#);
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(answer.as_bytes()).unwrap();
        let compressed = gzip.finish().unwrap();
        let tail = gunzip_tail(&compressed).expect("inflates");
        assert_eq!(tail.len(), TAIL);
        assert_eq!(held_in(&tail), Some("sd_xl_base"));
        assert_eq!(gunzip_tail(answer.as_bytes()), None, "not gzip");
        assert_eq!(gunzip_tail(&compressed[..compressed.len() / 2]), None, "broken off");
    }
}
