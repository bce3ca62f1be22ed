//! Checkpoints, as the gate sees them: which one each request wants, which
//! one each pod holds, and what a switch costs.
//!
//! Plain data like the rest of the gate: names are interned to small ids
//! (a bounded table: names come from clients), waiting requests are counted
//! per checkpoint, and each pod's generation time and load time are learned
//! from its answers (exponentially weighted means).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

/// The most checkpoint names a service keeps; a request naming another
/// once the table is full is routed as if it named none.
pub const MAX_CHECKPOINTS: usize = 256;

/// Weight of a new answer in a learned mean.
const LEARN_WEIGHT: f64 = 0.25;

/// A checkpoint's name, interned by its service's gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(NonZeroU32);

impl ModelId {
    /// Its place in per-checkpoint tables.
    pub(super) fn index(self) -> usize {
        self.0.get() as usize - 1
    }
}

/// What a request wants loaded: a checkpoint, and whether it stays the pod's
/// setting afterwards (`override_settings_restore_afterwards: false`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Want {
    pub model: ModelId,
    pub keep: bool,
}

/// How a checkpoint-aware dispatch weighs waiting against loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelPolicy {
    /// Route by checkpoint at all.
    pub aware: bool,
    /// What a load costs on a pod that has not measured one yet.
    pub switch_cost: Duration,
}

impl Default for ModelPolicy {
    fn default() -> Self {
        Self { aware: true, switch_cost: Duration::from_secs(2) }
    }
}

/// The interned names and the waiting requests per checkpoint.
#[derive(Default)]
pub(super) struct Models {
    names: Vec<String>,
    ids: HashMap<String, ModelId>,
    /// Waiting requests per checkpoint (index = id - 1).
    pub(super) waiting: Vec<usize>,
    /// When each checkpoint was last asked for (an arrival number).
    asked: Vec<u64>,
}

impl Models {
    /// The id of `name` (already normalised by the caller), interned on
    /// first sight while the table has room.
    pub(super) fn intern(&mut self, name: &str) -> Option<ModelId> {
        if let Some(id) = self.ids.get(name) {
            return Some(*id);
        }
        if self.names.len() >= MAX_CHECKPOINTS {
            return None;
        }
        let id = ModelId(NonZeroU32::new(self.names.len() as u32 + 1)?);
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        self.waiting.push(0);
        self.asked.push(0);
        Some(id)
    }

    pub(super) fn name(&self, id: ModelId) -> &str {
        self.names.get(id.index()).map_or("", String::as_str)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Requests waiting for `id`.
    pub(super) fn waiting_for(&self, id: Option<ModelId>) -> usize {
        id.and_then(|id| self.waiting.get(id.index())).copied().unwrap_or(0)
    }

    pub(super) fn joined(&mut self, want: Option<Want>) {
        if let Some(count) = want.and_then(|w| self.waiting.get_mut(w.model.index())) {
            *count += 1;
        }
    }

    pub(super) fn left(&mut self, want: Option<Want>) {
        if let Some(count) = want.and_then(|w| self.waiting.get_mut(w.model.index())) {
            *count = count.saturating_sub(1);
        }
    }

    /// A request for `id` arrived (the `seq`-th).
    pub(super) fn asked(&mut self, id: ModelId, seq: u64) {
        if let Some(at) = self.asked.get_mut(id.index()) {
            *at = seq;
        }
    }

    /// When `id` was last asked for (0: never, or not known).
    pub(super) fn last_asked(&self, id: Option<ModelId>) -> u64 {
        id.and_then(|id| self.asked.get(id.index())).copied().unwrap_or(0)
    }

    /// Each checkpoint with requests waiting for it, by name.
    pub(super) fn demand(&self) -> impl Iterator<Item = (&str, usize)> {
        self.names.iter().zip(&self.waiting).filter(|(_, n)| **n > 0).map(|(name, n)| (name.as_str(), *n))
    }
}

/// The extensions checkpoint files have.
const EXTENSIONS: [&str; 6] = [".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf"];

/// A checkpoint's model name, however it was named: what the WebUI calls
/// its `model_name` and reports in `info.sd_model_name`. The WebUI resolves
/// a checkpoint by its title (`sd/v1-5.safetensors [6ce0161689]`), its file
/// name (`sd/v1-5.safetensors`) or its model name (`sd_v1-5`): all three
/// normalise to the model name (the `[hash]` suffix and the extension
/// dropped, a directory's separators written `_`, as the WebUI does). A bare
/// hash stays a name of its own.
pub fn normalize_checkpoint(name: &str) -> std::borrow::Cow<'_, str> {
    let mut name = name.trim();
    if let (true, Some(open)) = (name.ends_with(']'), name.rfind(" [")) {
        name = name[..open].trim_end();
    }
    for extension in EXTENSIONS {
        let cut = name.len().saturating_sub(extension.len());
        if name.len() > extension.len() && name.is_char_boundary(cut) && name[cut..].eq_ignore_ascii_case(extension) {
            name = &name[..cut];
            break;
        }
    }
    match name.contains(['/', '\\']) {
        true => std::borrow::Cow::Owned(name.replace(['/', '\\'], "_")),
        false => std::borrow::Cow::Borrowed(name),
    }
}

/// What one pod has loaded, and what it has taught about its timings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holding {
    /// The checkpoint in its memory (None: not known).
    pub holds: Option<ModelId>,
    /// Its setting (`sd_model_checkpoint`): what a request that names no
    /// checkpoint runs on (the WebUI loads it back first).
    pub setting: Option<ModelId>,
    /// Checkpoint loads sdgate caused on it.
    pub loads: u64,
    /// Mean time of an answer that loaded nothing.
    pub generation: Option<Duration>,
    /// Mean extra time of an answer that loaded a checkpoint.
    pub load: Option<Duration>,
}

impl Holding {
    /// A request that names a checkpoint will run here: returns the
    /// checkpoint it makes the pod load, if any, and records what the pod
    /// then holds. A request that names none changes nothing: it may be no
    /// generation at all (a page, the options), and a generation that loads
    /// the setting back says so in its answer.
    pub(super) fn take(&mut self, want: Option<Want>) -> Option<ModelId> {
        let want = want?;
        if want.keep {
            self.setting = Some(want.model);
        }
        // A pod whose checkpoint is not known is not counted as loading: it
        // may have held the named one all along.
        let load = self.holds.filter(|held| *held != want.model).map(|_| want.model);
        self.holds = Some(want.model);
        if load.is_some() {
            self.loads += 1;
        }
        load
    }

    /// An answer in full, `took` from grant to the end, that did or did not
    /// load a checkpoint.
    pub(super) fn learn(&mut self, took: Duration, loaded: bool) {
        let mean = |old: Option<Duration>, new: Duration| {
            Some(old.map_or(new, |old| old.mul_f64(1.0 - LEARN_WEIGHT) + new.mul_f64(LEARN_WEIGHT)))
        };
        if !loaded {
            self.generation = mean(self.generation, took);
        } else if let Some(generation) = self.generation {
            self.load = mean(self.load, took.saturating_sub(generation));
        }
    }

    /// What a load costs here: learned, else the configured default.
    pub(super) fn switch_cost(&self, policy: &ModelPolicy) -> Duration {
        self.load.unwrap_or(policy.switch_cost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (Models, ModelId, ModelId) {
        let mut models = Models::default();
        let a = models.intern("a").expect("room");
        let b = models.intern("b").expect("room");
        (models, a, b)
    }

    #[test]
    fn names_are_interned_once_and_the_table_is_bounded() {
        let mut models = Models::default();
        let first = models.intern("v1-5").expect("room");
        assert_eq!(models.intern("v1-5"), Some(first));
        assert_eq!(models.name(first), "v1-5");
        for n in 1..MAX_CHECKPOINTS {
            assert!(models.intern(&format!("m{n}")).is_some());
        }
        assert_eq!(models.intern("one-too-many"), None, "a full table routes new names blind");
        assert_eq!(models.intern("v1-5"), Some(first), "known names still resolve");
    }

    #[test]
    fn a_pod_loads_what_it_does_not_hold_and_a_kept_override_becomes_its_setting() {
        let (_, a, b) = ids();
        let mut pod = Holding { holds: Some(a), setting: Some(a), ..Holding::default() };
        assert_eq!(pod.take(Some(Want { model: a, keep: false })), None, "already loaded");
        assert_eq!(pod.take(Some(Want { model: b, keep: false })), Some(b));
        assert_eq!((pod.holds, pod.setting), (Some(b), Some(a)), "restored afterwards: the setting stays");
        assert_eq!(pod.take(None), None, "a request naming none changes nothing (its answer tells)");
        assert_eq!(pod.holds, Some(b));
        assert_eq!(pod.take(Some(Want { model: a, keep: true })), Some(a));
        assert_eq!((pod.holds, pod.setting), (Some(a), Some(a)), "kept: a is now its setting");
        assert_eq!(pod.loads, 2);
    }

    #[test]
    fn a_pod_of_unknown_checkpoint_is_not_counted_as_loading() {
        let (_, a, _) = ids();
        let mut pod = Holding::default();
        assert_eq!(pod.take(Some(Want { model: a, keep: false })), None);
        assert_eq!((pod.holds, pod.loads), (Some(a), 0));
        assert_eq!(pod.take(None), None);
    }

    #[test]
    fn switch_cost_is_learned_from_answers_that_loaded_against_those_that_did_not() {
        let policy = ModelPolicy::default();
        let mut pod = Holding::default();
        assert_eq!(pod.switch_cost(&policy), policy.switch_cost);
        pod.learn(Duration::from_millis(1700), true);
        assert_eq!(pod.load, None, "a load's cost needs a generation time to compare with");
        pod.learn(Duration::from_millis(200), false);
        pod.learn(Duration::from_millis(1700), true);
        assert_eq!(pod.generation, Some(Duration::from_millis(200)));
        assert_eq!(pod.switch_cost(&policy), Duration::from_millis(1500));
        pod.learn(Duration::from_millis(600), false);
        assert_eq!(pod.generation, Some(Duration::from_millis(300)), "a weighted mean: 0.75 x 200 + 0.25 x 600");
    }

    #[test]
    fn demand_counts_waiting_requests_per_checkpoint() {
        let (mut models, a, b) = ids();
        models.joined(Some(Want { model: a, keep: false }));
        models.joined(Some(Want { model: a, keep: true }));
        models.joined(Some(Want { model: b, keep: false }));
        models.left(Some(Want { model: b, keep: false }));
        models.joined(None);
        assert_eq!(models.demand().collect::<Vec<_>>(), vec![("a", 2)]);
        assert_eq!(models.waiting_for(Some(a)), 2);
        assert_eq!(models.waiting_for(None), 0);
    }
}
