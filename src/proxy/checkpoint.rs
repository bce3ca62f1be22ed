//! Which checkpoint a request wants: from a header, or from its buffered
//! JSON body (the WebUI's `override_settings.sd_model_checkpoint`).
//!
//! Names are compared as [`normalize`] makes them (see there).
//!
//! A body is read without building its tree: one pass over the JSON that
//! keeps only the values at the configured pointers (a string up to a few
//! hundred bytes, a bool) and skips everything else in place, so a 16 MiB
//! body costs no memory beyond itself, whatever it holds (it took ~290 MB
//! as a `serde_json::Value`).

use std::fmt;

use http::HeaderMap;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::config::CheckpointConfig;
use crate::gate::normalize_checkpoint as normalize;

/// The longest checkpoint name taken (a longer one is routed as if none
/// were named): names come from clients.
const MAX_NAME: usize = 256;

/// How a service reads requests for a checkpoint: its config, a searcher
/// for each pointer's last key, and the pointers as paths (built once).
pub struct Reader {
    config: CheckpointConfig,
    keys: Vec<memchr::memmem::Finder<'static>>,
    /// The checkpoint pointers, then the restore pointer, each as its
    /// unescaped tokens.
    paths: Vec<Vec<String>>,
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
        let paths = config.pointers.iter().chain([&config.restore_pointer]).map(|p| tokens(p)).collect();
        Self { config: config.clone(), keys, paths }
    }

    /// Whether a request, with a body or not, may name a checkpoint.
    #[inline]
    pub fn may_name(&self, has_body: bool) -> bool {
        self.config.header.is_some() || (has_body && !self.keys.is_empty())
    }

    /// The checkpoint a request names (normalised), and whether it stays
    /// the pod's setting afterwards; None when it names none.
    pub fn wanted(&self, headers: &HeaderMap, body: Option<&[u8]>) -> Option<(String, bool)> {
        match self.from_header(headers) {
            Some(named) => named,
            None => self.from_body(body?),
        }
    }

    /// What the configured header names: None when the request has no such
    /// header (the body may name one), Some(None) when it names none.
    pub fn from_header(&self, headers: &HeaderMap) -> Option<Option<(String, bool)>> {
        let value = self.config.header.as_deref().and_then(|name| headers.get(name))?;
        let Ok(text) = value.to_str() else { return Some(None) };
        let name = normalize(text);
        Some((!name.is_empty() && name.len() <= MAX_NAME).then(|| (name.to_string(), false)))
    }

    /// What the body names (see [`Reader::wanted`]).
    pub fn from_body(&self, body: &[u8]) -> Option<(String, bool)> {
        // Parse only a body that may name one: most do not.
        if !self.keys.iter().any(|key| key.find(body).is_some()) {
            return None;
        }
        let found = self.walk(body)?;
        let (restore, names) = found.split_last()?;
        let name = names.iter().find_map(|leaf| match leaf {
            Some(Leaf::Text(text)) => Some(text.as_str()),
            _ => None,
        })?;
        let name = normalize(name);
        if name.is_empty() || name.len() > MAX_NAME {
            return None;
        }
        let keep = matches!(restore, Some(Leaf::Bool(false)));
        Some((name.to_string(), keep))
    }

    /// The values at [`Reader::paths`] in `body`, in one pass that skips
    /// the rest; None if the body is not JSON.
    fn walk(&self, body: &[u8]) -> Option<Vec<Option<Leaf>>> {
        let mut found = vec![None; self.paths.len()];
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        let all: Vec<usize> = (0..self.paths.len()).collect();
        Node { paths: &self.paths, live: &all, depth: 0, found: &mut found }.deserialize(&mut deserializer).ok()?;
        deserializer.end().ok()?;
        Some(found)
    }
}

/// A JSON pointer's tokens (RFC 6901: `~1` is `/`, `~0` is `~`); "" is the
/// whole document.
fn tokens(pointer: &str) -> Vec<String> {
    pointer.split('/').skip(1).map(|token| token.replace("~1", "/").replace("~0", "~")).collect()
}

/// A pointer token as an array index, as RFC 6901 reads one: digits, no
/// leading zero ("0" itself aside), no sign.
fn array_index(token: &str) -> Option<usize> {
    let digits = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
    (digits && (token == "0" || !token.starts_with('0'))).then(|| token.parse().ok()).flatten()
}

/// What sdgate keeps of a value at a pointer: short text or a bool.
#[derive(Clone, Debug, PartialEq)]
enum Leaf {
    Text(String),
    Bool(bool),
    /// Anything else (a number, null, a container, text too long).
    Other,
}

/// A value at `depth` on the way to the pointers in `live` (those whose
/// first `depth` tokens led here).
struct Node<'a> {
    paths: &'a [Vec<String>],
    live: &'a [usize],
    depth: usize,
    found: &'a mut [Option<Leaf>],
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        let ends_here: Vec<usize> = self.live.iter().copied().filter(|&i| self.paths[i].len() == self.depth).collect();
        if ends_here.is_empty() {
            return deserializer.deserialize_any(self);
        }
        // A pointer ends at this value: keep it (its children are not
        // looked at by any pointer that ends here).
        let leaf = deserializer.deserialize_any(LeafVisitor)?;
        for i in ends_here {
            self.found[i] = Some(leaf.clone());
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Node { paths, live, depth, found } = self;
        while let Some(next) = map.next_key_seed(Key { paths, live, depth })? {
            // A key seen again replaces what its first value held, as in
            // serde_json's tree and Python's json (the last one wins).
            for &i in &next {
                found[i] = None;
            }
            if next.is_empty() {
                map.next_value::<IgnoredAny>()?;
            } else {
                map.next_value_seed(Node { paths, live: &next, depth: depth + 1, found: &mut *found })?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Node { paths, live, depth, found } = self;
        let mut index = 0usize;
        loop {
            let next: Vec<usize> =
                live.iter().copied().filter(|&i| array_index(&paths[i][depth]) == Some(index)).collect();
            let more = if next.is_empty() {
                seq.next_element::<IgnoredAny>()?.is_some()
            } else {
                seq.next_element_seed(Node { paths, live: &next, depth: depth + 1, found: &mut *found })?.is_some()
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }

    // Scalars on the way to a pointer: the pointer leads nowhere.
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// An object's key, read as the pointers in `live` that go on through it
/// (compared in place: no key is copied).
struct Key<'a> {
    paths: &'a [Vec<String>],
    live: &'a [usize],
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = Vec<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<usize>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = Vec<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, key: &str) -> Result<Vec<usize>, E> {
        Ok(self.live.iter().copied().filter(|&i| self.paths[i][self.depth] == key).collect())
    }
}

/// Reads a value at a pointer, keeping only what [`Leaf`] holds.
struct LeafVisitor;

/// The longest text kept at a pointer (a name longer than [`MAX_NAME`]
/// after normalising is refused anyway).
const MAX_TEXT: usize = 4 * MAX_NAME;

impl<'de> Visitor<'de> for LeafVisitor {
    type Value = Leaf;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_str<E>(self, text: &str) -> Result<Leaf, E> {
        Ok(if text.len() <= MAX_TEXT { Leaf::Text(text.to_string()) } else { Leaf::Other })
    }
    fn visit_bool<E>(self, value: bool) -> Result<Leaf, E> {
        Ok(Leaf::Bool(value))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Leaf, E> {
        Ok(Leaf::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Leaf, E> {
        Ok(Leaf::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Leaf, E> {
        Ok(Leaf::Other)
    }
    fn visit_unit<E>(self) -> Result<Leaf, E> {
        Ok(Leaf::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Leaf, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Leaf::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Leaf, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Leaf::Other)
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

    #[test]
    fn the_body_is_walked_to_the_pointers_only() {
        let reader = Reader::new(&CheckpointConfig {
            pointers: vec!["/a/0/m".into(), "/override_settings/sd_model_checkpoint".into()],
            ..CheckpointConfig::default()
        });
        let walk = |json: &str| reader.wanted(&HeaderMap::new(), Some(json.as_bytes()));
        assert_eq!(walk(r#"{"a":[{"m":"first"},{"m":"second"}]}"#), Some(("first".into(), false)), "an index");
        assert_eq!(
            walk(r#"{"a":[{"x":1},{"m":"second"}],"override_settings":{"sd_model_checkpoint":"b"}}"#),
            Some(("b".into(), false))
        );
        let escaped = r#"{"override_settings":{"sd_model_checkpoint":"caf\u00e9 \"x\""}}"#;
        assert_eq!(walk(escaped), Some(("café \"x\"".into(), false)), "escapes in the value");
        let key = r#"{"override_\u0073ettings":{"sd_model_checkpoint":"k"}}"#;
        assert_eq!(walk(key), Some(("k".into(), false)), "escapes in a key");
        let duplicate = r#"{"override_settings":{"sd_model_checkpoint":"one","sd_model_checkpoint":"two"}}"#;
        assert_eq!(walk(duplicate), Some(("two".into(), false)), "the last of a duplicate key, as serde_json's tree");
        let parent = r#"{"override_settings":{"sd_model_checkpoint":"A"},"override_settings":{}}"#;
        assert_eq!(walk(parent), None, "a duplicate parent: the last object, which names none");
        assert_eq!(walk(r#"{"a":[{"m":"x"},{"m":"y"}],"override_settings":1}"#), Some(("x".into(), false)));
        let signed = Reader::new(&CheckpointConfig {
            pointers: vec!["/a/+1".into(), "/a/01".into()],
            ..CheckpointConfig::default()
        });
        assert_eq!(signed.wanted(&HeaderMap::new(), Some(br#"{"a":["x","y"]}"#)), None, "+1 and 01 are no indexes");
        assert_eq!(walk(r#"{"override_settings":{"sd_model_checkpoint":{"deep":["x"]}}}"#), None, "not text");
        assert_eq!(walk(r#"{"override_settings":{"sd_model_checkpoint":"b"}} trailing"#), None, "not JSON");
        assert_eq!(walk(r#"{"override_settings":{"sd_model_checkpoint":"b"}"#), None, "cut short");
        let nested = format!(
            r#"{{"x":{}1{},"override_settings":{{"sd_model_checkpoint":"n"}}}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert_eq!(walk(&nested), Some(("n".into(), false)), "deep values elsewhere are skipped");
        let image = "A".repeat(1 << 20);
        let big = format!(r#"{{"init_images":["{image}"],"override_settings":{{"sd_model_checkpoint":"big"}}}}"#);
        assert_eq!(walk(&big), Some(("big".into(), false)));
    }
}
