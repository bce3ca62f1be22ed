//! Which checkpoint a request wants: from a header, or from its buffered
//! JSON body (the WebUI's `override_settings.sd_model_checkpoint`).
//!
//! Names are compared as [`normalize`] makes them (see there).

use http::HeaderMap;
use serde_json::Value;

use crate::config::CheckpointConfig;
use crate::gate::normalize_checkpoint as normalize;

/// The longest checkpoint name taken (a longer one is routed as if none
/// were named): names come from clients.
const MAX_NAME: usize = 256;

/// How a service reads requests for a checkpoint: its config, and a
/// searcher for each pointer's last key (built once).
pub struct Reader {
    config: CheckpointConfig,
    keys: Vec<memchr::memmem::Finder<'static>>,
}

impl Reader {
    pub fn new(config: &CheckpointConfig) -> Self {
        let keys = config
            .pointers
            .iter()
            .filter_map(|pointer| pointer.rsplit('/').next().filter(|key| !key.is_empty()))
            // A pointer escapes `/` and `~` in a key (RFC 6901).
            .map(|key| key.replace("~1", "/").replace("~0", "~"))
            .map(|key| memchr::memmem::Finder::new(key.as_bytes()).into_owned())
            .collect();
        Self { config: config.clone(), keys }
    }

    /// Whether a request, with a body or not, may name a checkpoint.
    #[inline]
    pub fn may_name(&self, has_body: bool) -> bool {
        self.config.header.is_some() || (has_body && !self.keys.is_empty())
    }

    /// The checkpoint a request names (normalised), and whether it stays
    /// the pod's setting afterwards; None when it names none.
    pub fn wanted(&self, headers: &HeaderMap, body: Option<&[u8]>) -> Option<(String, bool)> {
        let config = &self.config;
        if let Some(value) = config.header.as_deref().and_then(|name| headers.get(name)) {
            let name = normalize(value.to_str().ok()?);
            return (!name.is_empty() && name.len() <= MAX_NAME).then(|| (name.to_string(), false));
        }
        let body = body?;
        // Parse only a body that may name one: most do not.
        if !self.keys.iter().any(|key| key.find(body).is_some()) {
            return None;
        }
        let json: Value = serde_json::from_slice(body).ok()?;
        let name = config.pointers.iter().find_map(|pointer| json.pointer(pointer).and_then(Value::as_str))?;
        let name = normalize(name);
        if name.is_empty() || name.len() > MAX_NAME {
            return None;
        }
        let keep = json.pointer(&config.restore_pointer).and_then(Value::as_bool) == Some(false);
        Some((name.to_string(), keep))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(config: &CheckpointConfig, headers: &HeaderMap, body: Option<&[u8]>) -> Option<(String, bool)> {
        Reader::new(config).wanted(headers, body)
    }

    #[test]
    fn a_title_a_file_name_and_a_model_name_are_one_checkpoint() {
        for name in [
            "v1-5-pruned-emaonly.safetensors [6ce0161689]",
            "v1-5-pruned-emaonly.safetensors",
            "v1-5-pruned-emaonly",
            "  v1-5-pruned-emaonly.ckpt ",
            "v1-5-pruned-emaonly.SAFETENSORS [6ce0161689]",
        ] {
            assert_eq!(normalize(name), "v1-5-pruned-emaonly", "{name}");
        }
        // In a subdirectory, the WebUI's model name keeps the directory.
        for name in ["sd/v1-5.safetensors [6ce0161689]", "sd\\v1-5.safetensors", "sd_v1-5"] {
            assert_eq!(normalize(name), "sd_v1-5", "{name}");
        }
        assert_eq!(normalize("6ce0161689"), "6ce0161689", "a bare hash stays a name of its own");
        assert_eq!(normalize(".safetensors"), ".safetensors");
    }

    fn body(json: &str) -> Option<(String, bool)> {
        wanted(&CheckpointConfig::default(), &HeaderMap::new(), Some(json.as_bytes()))
    }

    #[test]
    fn the_body_names_it_in_override_settings_and_may_keep_it() {
        let named = r#"{"prompt":"dog","override_settings":{"sd_model_checkpoint":"b.safetensors [abc]"}}"#;
        assert_eq!(body(named), Some(("b".into(), false)));
        let kept = r#"{"override_settings":{"sd_model_checkpoint":"b"},"override_settings_restore_afterwards":false}"#;
        assert_eq!(body(kept), Some(("b".into(), true)));
        assert_eq!(body(r#"{"prompt":"sd_model_checkpoint"}"#), None, "named nowhere it counts");
        assert_eq!(body(r#"{"prompt":"dog"}"#), None);
        assert_eq!(body("not json sd_model_checkpoint"), None);
        assert_eq!(body(r#"{"override_settings":{"sd_model_checkpoint":""}}"#), None);
        let long = format!(r#"{{"override_settings":{{"sd_model_checkpoint":"{}"}}}}"#, "x".repeat(300));
        assert_eq!(body(&long), None, "a name longer than 256 bytes is not taken");
    }

    #[test]
    fn a_configured_header_wins_over_the_body() {
        let config = CheckpointConfig { header: Some("x-checkpoint".into()), ..CheckpointConfig::default() };
        let mut headers = HeaderMap::new();
        headers.insert("x-checkpoint", http::HeaderValue::from_static("sdxl.safetensors"));
        let json = br#"{"override_settings":{"sd_model_checkpoint":"b"}}"#;
        assert_eq!(wanted(&config, &headers, Some(json)), Some(("sdxl".into(), false)));
        assert_eq!(wanted(&config, &HeaderMap::new(), Some(json)), Some(("b".into(), false)));
        let other = CheckpointConfig { pointers: vec!["/model".into()], ..CheckpointConfig::default() };
        assert_eq!(wanted(&other, &HeaderMap::new(), Some(br#"{"model":"c"}"#)), Some(("c".into(), false)));
        let escaped = CheckpointConfig { pointers: vec!["/opts/model~1name".into()], ..CheckpointConfig::default() };
        let json = br#"{"opts":{"model/name":"d"}}"#;
        assert_eq!(wanted(&escaped, &HeaderMap::new(), Some(json)), Some(("d".into(), false)));
    }
}
