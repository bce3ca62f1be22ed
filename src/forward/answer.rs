//! What a pod's answer says it ran on: the WebUI's `info` (a JSON string at
//! the end of a generation's answer) names the checkpoint in memory as
//! `sd_model_name`. It corrects what sdgate assumed, e.g. when a pod does
//! not have the checkpoint a request named and kept its own.

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

#[cfg(test)]
mod tests {
    use super::held_in;

    #[test]
    fn the_checkpoint_is_read_from_a_webui_answers_info_string() {
        let webui = br#"{"images":["iVBOR..."],"parameters":{},"info":"{\"prompt\": \"dog\", \"sd_model_name\": \"v1-5-pruned-emaonly\", \"sd_model_hash\": \"6ce0161689\"}"}"#;
        assert_eq!(held_in(webui), Some("v1-5-pruned-emaonly"));
        let compact = br#"{"info":"{\"sd_model_name\":\"sd_xl\"}"}"#;
        assert_eq!(held_in(compact), Some("sd_xl"));
        assert_eq!(held_in(br#"{"sd_model_name": "plain"}"#), Some("plain"));
    }

    #[test]
    fn anything_unclear_is_left_alone() {
        assert_eq!(held_in(br#"{"info":"{\"sd_model_name\": null}"}"#), None);
        assert_eq!(held_in(br#"{"info":"{\"sd_model_name\": \"caf\u00e9\"}"}"#), None);
        assert_eq!(held_in(br#"{"info":"{\"sd_model_name\": \"\"}"}"#), None);
        assert_eq!(held_in(br#"{"images":[]}"#), None);
        assert_eq!(held_in(b"sd_model_name"), None);
    }
}
