//! Checkpoints, as the gate sees them: which one each request wants, which
//! one each pod holds, and what a switch costs.
//!
//! Plain data like the rest of the gate: names are interned to small ids
//! (a bounded table: names come from clients), waiting requests are counted
//! per checkpoint, and each pod's generation time and load time are learned
//! from its answers (exponentially weighted means).
//!
//! The table forgets: a name nobody waits for and no pod holds is dropped,
//! least recently asked for first, when a new name needs its place. Names a
//! pod has reported (its options, an answer) are kept apart from names only
//! clients sent: those take at most [`MAX_CLIENT_NAMES`] places, so a flood
//! of invented names can neither push out what pods hold nor stop a pod's
//! new checkpoint from being learned.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

/// The most checkpoint names a service keeps; a request naming another
/// once the table is full of names in use is routed as if it named none.
pub const MAX_CHECKPOINTS: usize = 256;
/// The most places names that no pod has reported may take.
pub const MAX_CLIENT_NAMES: usize = 192;

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
    /// The longest a pod with room stays idle while requests wait for
    /// others that hold their checkpoints (`checkpoints.max_pod_idle`, at
    /// most `max_wait_for_match`).
    pub max_idle: Duration,
    /// A pod's own load time (learned, else `switch_cost`) bounds its idle
    /// spell too, when cheaper (`max_pod_idle: load`).
    pub idle_by_load: bool,
}

impl Default for ModelPolicy {
    fn default() -> Self {
        Self {
            aware: true,
            switch_cost: Duration::from_secs(2),
            max_idle: Duration::from_secs(10),
            idle_by_load: false,
        }
    }
}

/// The interned names and the waiting requests per checkpoint.
#[derive(Default)]
pub(super) struct Models {
    /// Index = id - 1; "" for a place freed by [`Models::intern`].
    names: Vec<String>,
    ids: HashMap<String, ModelId>,
    /// Waiting requests per checkpoint (index = id - 1).
    pub(super) waiting: Vec<usize>,
    /// When each checkpoint was last asked for (an arrival number).
    asked: Vec<u64>,
    /// Whether a pod has reported each (its options or an answer).
    reported: Vec<bool>,
    /// Names in the table that no pod has reported.
    client_names: usize,
    /// Places freed, to reuse.
    free: Vec<ModelId>,
}

/// Who names a checkpoint: a client's request, or a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    Client,
    Pod,
}

impl Models {
    /// The id of `name` (already normalised by the caller), interned on
    /// first sight. When there is no room (for a client's name: its share),
    /// the least recently asked name that nobody waits for and `in_use`
    /// (held by a pod) does not claim is forgotten for it; None when every
    /// name is in use.
    pub(super) fn intern(&mut self, name: &str, source: Source, in_use: impl Fn(ModelId) -> bool) -> Option<ModelId> {
        if let Some(&id) = self.ids.get(name) {
            if source == Source::Pod && !self.reported[id.index()] {
                self.reported[id.index()] = true;
                self.client_names -= 1;
            }
            return Some(id);
        }
        let live = self.names.len() - self.free.len();
        let full = match source {
            Source::Client => self.client_names >= MAX_CLIENT_NAMES || live >= MAX_CHECKPOINTS,
            Source::Pod => live >= MAX_CHECKPOINTS,
        };
        if full {
            // A client's name makes room among clients' names only.
            let only_clients = source == Source::Client && self.client_names >= MAX_CLIENT_NAMES;
            self.forget_one(only_clients, &in_use)?;
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let id = ModelId(NonZeroU32::new(u32::try_from(self.names.len() + 1).ok()?)?);
                self.names.push(String::new());
                self.waiting.push(0);
                self.asked.push(0);
                self.reported.push(false);
                id
            }
        };
        let at = id.index();
        self.names[at] = name.to_string();
        self.ids.insert(name.to_string(), id);
        self.reported[at] = source == Source::Pod;
        if source == Source::Client {
            self.client_names += 1;
        }
        Some(id)
    }

    /// Forgets the least recently asked name that nobody waits for and no
    /// pod holds (a client's name only, if `only_clients`); None if there
    /// is none.
    fn forget_one(&mut self, only_clients: bool, in_use: &impl Fn(ModelId) -> bool) -> Option<()> {
        let victim = (0..self.names.len())
            .filter(|&at| !self.names[at].is_empty() && self.waiting[at] == 0)
            .filter(|&at| !(only_clients && self.reported[at]))
            .filter_map(|at| NonZeroU32::new(u32::try_from(at + 1).ok()?).map(ModelId))
            .filter(|id| !in_use(*id))
            .min_by_key(|id| self.asked[id.index()])?;
        let at = victim.index();
        let name = std::mem::take(&mut self.names[at]);
        self.ids.remove(&name);
        self.asked[at] = 0;
        if !self.reported[at] {
            self.client_names -= 1;
        }
        self.reported[at] = false;
        self.free.push(victim);
        Some(())
    }

    /// Whether a pod has reported `id` (its options or an answer).
    pub(super) fn is_reported(&self, id: ModelId) -> bool {
        self.reported.get(id.index()).copied().unwrap_or(false)
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

    /// The longest this pod idles while requests wait for others.
    pub(super) fn max_idle(&self, policy: &ModelPolicy) -> Duration {
        match policy.idle_by_load {
            true => self.switch_cost(policy).min(policy.max_idle),
            false => policy.max_idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (Models, ModelId, ModelId) {
        let mut models = Models::default();
        let a = models.intern("a", Source::Client, |_| false).expect("room");
        let b = models.intern("b", Source::Client, |_| false).expect("room");
        (models, a, b)
    }

    #[test]
    fn names_are_interned_once_and_the_table_is_bounded() {
        let mut models = Models::default();
        let first = models.intern("v1-5", Source::Pod, |_| false).expect("room");
        models.joined(Some(Want { model: first, keep: false }));
        assert_eq!(models.intern("v1-5", Source::Client, |_| false), Some(first));
        assert_eq!(models.name(first), "v1-5");
        for n in 1..MAX_CHECKPOINTS {
            let source = if n < MAX_CLIENT_NAMES { Source::Client } else { Source::Pod };
            assert!(models.intern(&format!("m{n}"), source, |_| false).is_some());
            models.asked(models.ids[&format!("m{n}")], n as u64);
            models.joined(Some(Want { model: models.ids[&format!("m{n}")], keep: false }));
        }
        // Every name is waited for: none can go.
        assert_eq!(models.intern("one-too-many", Source::Pod, |_| false), None, "a full table routes new names blind");
        assert_eq!(models.intern("v1-5", Source::Client, |_| false), Some(first), "known names still resolve");
    }

    #[test]
    fn a_flood_of_invented_names_forgets_its_own_and_keeps_what_pods_hold() {
        let mut models = Models::default();
        let held = models.intern("sd15", Source::Pod, |_| false).expect("room");
        models.asked(held, 1);
        for n in 0..10_000u64 {
            let id = models.intern(&format!("junk-{n}"), Source::Client, |id| id == held).expect("room, by forgetting");
            models.asked(id, n + 2);
        }
        assert_eq!(models.client_names, MAX_CLIENT_NAMES, "clients' names keep to their share");
        assert_eq!(models.ids.get("sd15"), Some(&held), "what a pod reported stays");
        assert!(
            models.ids.contains_key("junk-9999") && !models.ids.contains_key("junk-0"),
            "least recently asked go first"
        );
        // A pod's new checkpoint is still learned, and a real one asked by clients still routes.
        let new = models.intern("sdxl", Source::Pod, |id| id == held).expect("room for what pods report");
        assert!(models.is_reported(new));
        assert!(models.intern("flux", Source::Client, |id| id == held || id == new).is_some());
        assert_eq!(models.name(held), "sd15");
    }

    #[test]
    fn a_name_waited_for_or_held_is_never_forgotten() {
        let mut models = Models::default();
        let waited = models.intern("waited", Source::Client, |_| false).expect("room");
        models.joined(Some(Want { model: waited, keep: false }));
        let held = models.intern("held", Source::Client, |_| false).expect("room");
        for n in 0..1000 {
            let id = models.intern(&format!("x{n}"), Source::Client, |id| id == held);
            assert!(id.is_some_and(|id| id != waited && id != held), "{n}");
        }
        assert_eq!((models.name(waited), models.name(held)), ("waited", "held"));
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
