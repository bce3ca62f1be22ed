//! The built-in autoscaler: Knative's KPA rules (see docs/behaviour.md), per service.
//!
//! - Demand is queued + in-flight requests (queued ones count: they are what
//!   more pods would serve), sampled every 100 ms and averaged over the
//!   stable window (60 s by default) and the panic window (6 s).
//! - desired = ceil(average demand / (container_concurrency x
//!   target_utilization)), clamped to `[min, max]`.
//! - Panic: when the panic window asks for at least twice the ready pods,
//!   its figure is used and nothing scales down until a stable window has
//!   passed without panic.
//! - Scale-down is at most halving per decision; scale to zero only after
//!   demand has been 0 for the stable window plus `scale_to_zero_grace`.
//! - Activation: a request that must wait while no pod is wanted wakes the
//!   scaler at once (no waiting for a tick).
//! - Rest: a service that wants `min` pods and has seen no demand for a
//!   whole window stops sampling; it looks at its demand once a tick
//!   instead of ten times a second, and a waiting request still wakes it at
//!   once. On waking, the rest counts as the zero samples it would have
//!   taken, so every decision is the one continuous sampling gives. Five
//!   hundred idle services cost a few hundred wake-ups a second, not
//!   thousands.
//!
//! [`Autoscaler`] is pure (the clock is passed in) and unit-tested alone;
//! [`run`] is the task around it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::watch;

use crate::config::ScaleConfig;
use crate::gate::SharedGate;
use crate::observe::metrics::ServiceMetrics;

/// Why the desired replica count is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A request arrived with no pod wanted.
    Activation,
    /// The panic window asked for at least twice the ready pods.
    Panic,
    /// The stable window average.
    Stable,
    /// No demand for the stable window plus the grace period.
    Idle,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Activation => "activation",
            Reason::Panic => "panic",
            Reason::Stable => "stable",
            Reason::Idle => "idle",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub desired: u32,
    pub reason: Reason,
}

/// The figures the rules need.
#[derive(Clone, Debug)]
pub struct Settings {
    pub min: u32,
    pub max: u32,
    /// Requests one pod should hold: cc x target_utilization (100 for cc = 0,
    /// Knative's default target when concurrency is unlimited).
    pub target: f64,
    pub stable_window: Duration,
    pub panic_window: Duration,
    pub scale_to_zero_grace: Duration,
}

impl Settings {
    pub fn new(scale: &ScaleConfig, container_concurrency: u32) -> Self {
        let per_pod = if container_concurrency == 0 { 100.0 } else { f64::from(container_concurrency) };
        Self {
            min: scale.min,
            max: scale.max,
            target: (per_pod * scale.target_utilization).max(0.01),
            stable_window: scale.stable_window,
            panic_window: scale.panic_window,
            scale_to_zero_grace: scale.scale_to_zero_grace,
        }
    }
}

pub struct Autoscaler {
    settings: Settings,
    samples: VecDeque<(Instant, u32)>,
    desired: u32,
    panic_until: Option<Instant>,
    last_demand: Option<Instant>,
    /// At rest (see [`Autoscaler::rest`]): the first of the zero samples
    /// dropped then; the next [`Autoscaler::record`] puts them back.
    zeros_since: Option<Instant>,
}

impl Autoscaler {
    pub fn new(settings: Settings) -> Self {
        let desired = settings.min;
        Self { settings, samples: VecDeque::new(), desired, panic_until: None, last_demand: None, zeros_since: None }
    }

    pub fn desired(&self) -> u32 {
        self.desired
    }

    /// Records the demand (queued + in flight) seen at `now`.
    pub fn record(&mut self, now: Instant, demand: u32) {
        let horizon = self.horizon();
        if let Some(since) = self.zeros_since.take() {
            // Back from rest: the zeros sampling would have seen, one per
            // sample period, within the horizon.
            let mut at = now.checked_sub(horizon).map_or(since, |start| start.max(since));
            while at < now {
                self.samples.push_back((at, 0));
                at += SAMPLE_PERIOD;
            }
        }
        self.samples.push_back((now, demand));
        if demand > 0 {
            self.last_demand = Some(now);
        }
        while self.samples.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > horizon) {
            self.samples.pop_front();
        }
    }

    fn horizon(&self) -> Duration {
        self.settings.stable_window.max(self.settings.panic_window)
    }

    /// Whether nothing can change until demand returns: `min` pods wanted,
    /// no panic, and no demand within the windows, so every decision would
    /// say `min` again. Then the samples (all zeros) are dropped, to be put
    /// back by the next [`Autoscaler::record`], and the caller may stop
    /// sampling and deciding until it sees demand.
    pub fn rest(&mut self, now: Instant) -> bool {
        let resting = self.desired == self.settings.min
            && self.panic_until.is_none()
            && self.last_demand.is_none_or(|t| now.saturating_duration_since(t) > self.horizon());
        if resting && self.zeros_since.is_none() {
            self.zeros_since = Some(self.samples.front().map_or(now, |(t, _)| *t));
            self.samples = VecDeque::new();
        }
        resting
    }

    /// A request is waiting: if no pod is wanted, want enough for the
    /// demand right now, at once.
    pub fn activate(&mut self, now: Instant, demand: u32) -> Option<Decision> {
        if self.desired > 0 || demand == 0 {
            return None;
        }
        self.record(now, demand);
        let desired = self.clamp(self.pods_for(f64::from(demand)).max(1));
        self.desired = desired;
        Some(Decision { desired, reason: Reason::Activation })
    }

    /// The queue grew: if the requests in hand right now already ask for at
    /// least twice the ready pods, panic at once with that figure (scale-up
    /// only; the windows and the tick still decide everything else). A burst
    /// gets every pod it needs without waiting for a tick or for the panic
    /// window's average to catch up.
    pub fn on_demand(&mut self, now: Instant, demand: u32, ready: u32) -> Option<Decision> {
        self.record(now, demand);
        let wanted = self.clamp(self.pods_for(f64::from(demand)));
        if wanted <= self.desired || wanted < 2 * ready.max(1) {
            return None;
        }
        self.panic_until = Some(now + self.settings.stable_window);
        let reason = if self.desired == 0 { Reason::Activation } else { Reason::Panic };
        self.desired = wanted;
        Some(Decision { desired: wanted, reason })
    }

    /// The periodic decision, given how many pods are ready now.
    pub fn decide(&mut self, now: Instant, ready: u32) -> Decision {
        let stable = self.pods_for(self.average(now, self.settings.stable_window));
        let panic = self.pods_for(self.average(now, self.settings.panic_window));
        if panic > ready && panic >= 2 * ready.max(1) {
            self.panic_until = Some(now + self.settings.stable_window);
        }
        let in_panic = self.panic_until.is_some_and(|until| now < until);
        let decision = if in_panic {
            Decision { desired: self.clamp(panic.max(self.desired)), reason: Reason::Panic }
        } else {
            self.panic_until = None;
            self.stable_decision(now, stable)
        };
        self.desired = decision.desired;
        decision
    }

    fn stable_decision(&self, now: Instant, stable: u32) -> Decision {
        // At most halve per decision (Knative's max scale-down rate of 2),
        // from what was wanted: pods the provider does not remove (a fixed
        // backend) must not hold the desired count up.
        let floor = self.desired / 2;
        let desired = stable.max(floor);
        if desired > 0 {
            return Decision { desired: self.clamp(desired), reason: Reason::Stable };
        }
        let idle_for = self.last_demand.map(|t| now.saturating_duration_since(t));
        let grace = self.settings.stable_window + self.settings.scale_to_zero_grace;
        if self.desired > 0 && idle_for.is_some_and(|idle| idle < grace) {
            // Keep one pod warm through the grace period.
            return Decision { desired: self.clamp(1), reason: Reason::Stable };
        }
        Decision { desired: self.clamp(0), reason: Reason::Idle }
    }

    /// Average demand over the last `window` (over the samples there are).
    fn average(&self, now: Instant, window: Duration) -> f64 {
        let (sum, count) = self
            .samples
            .iter()
            .rev()
            .take_while(|(t, _)| now.saturating_duration_since(*t) <= window)
            .fold((0u64, 0u64), |(sum, count), (_, d)| (sum + u64::from(*d), count + 1));
        if count == 0 {
            0.0
        } else {
            sum as f64 / count as f64
        }
    }

    fn pods_for(&self, demand: f64) -> u32 {
        let pods = (demand / self.settings.target - 1e-9).ceil();
        if pods <= 0.0 {
            0
        } else {
            pods.min(f64::from(u32::MAX)) as u32
        }
    }

    fn clamp(&self, desired: u32) -> u32 {
        desired.clamp(self.settings.min, self.settings.max)
    }
}

/// How often demand is sampled.
const SAMPLE_PERIOD: Duration = Duration::from_millis(100);
/// Demand changes are acted on at most this often (a burst of arrivals is
/// one decision, taken within this of its last arrival).
const DEMAND_DEBOUNCE: Duration = Duration::from_millis(50);

/// Drives one service's desired replica count: samples demand, decides every
/// `tick`, and reacts to activation at once. Each change is sent on
/// `desired` (the provider's scale call), logged with its reason, and
/// exported as `sdgate_desired_replicas`. New `settings` (a reload) apply
/// at once.
pub async fn run(
    service: String,
    gate: Arc<SharedGate>,
    metrics: ServiceMetrics,
    mut settings: watch::Receiver<Settings>,
    tick: Duration,
    desired: watch::Sender<u32>,
) {
    let mut autoscaler = Autoscaler::new(settings.borrow_and_update().clone());
    let mut reloadable = true;
    let mut sample = tokio::time::interval(SAMPLE_PERIOD);
    let mut decide = tokio::time::interval(tick);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    decide.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let publish = |decision: Decision, demand: u32, ready: u32| {
        metrics.desired_replicas.set(i64::from(decision.desired));
        if desired.send_if_modified(|current| std::mem::replace(current, decision.desired) != decision.desired) {
            metrics.record_scale(decision.desired, decision.reason.as_str());
            tracing::info!(
                %service,
                desired = decision.desired,
                reason = decision.reason.as_str(),
                demand,
                ready,
                "scale"
            );
        }
    };
    publish(Decision { desired: autoscaler.desired(), reason: Reason::Stable }, 0, 0);
    let mut last_demand_check = Instant::now() - DEMAND_DEBOUNCE;
    let mut recheck: Option<Instant> = None;
    // At rest: when to look at the demand next (no sampling, no decisions).
    let mut resting: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = gate.demand.notified() => {
                if resting.take().is_some() {
                    sample.reset();
                    decide.reset();
                }
                let now = Instant::now();
                let (demand, ready) = demand_and_ready(&gate);
                // Activation is never debounced: the first request at zero wakes pods at once.
                if let Some(decision) = autoscaler.activate(now, demand) {
                    publish(decision, demand, ready);
                    last_demand_check = now;
                } else if now >= last_demand_check + DEMAND_DEBOUNCE {
                    if let Some(decision) = autoscaler.on_demand(now, demand, ready) {
                        publish(decision, demand, ready);
                    }
                    last_demand_check = now;
                } else {
                    recheck.get_or_insert(last_demand_check + DEMAND_DEBOUNCE);
                }
            }
            _ = async { match recheck { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {
                recheck = None;
                let now = Instant::now();
                let (demand, ready) = demand_and_ready(&gate);
                if let Some(decision) = autoscaler.on_demand(now, demand, ready) {
                    publish(decision, demand, ready);
                }
                last_demand_check = now;
            }
            _ = sample.tick(), if resting.is_none() => {
                let (demand, _) = demand_and_ready(&gate);
                autoscaler.record(Instant::now(), demand);
            }
            changed = settings.changed(), if reloadable => {
                if changed.is_err() {
                    reloadable = false;
                    continue;
                }
                // A reload ends a rest: the next decision tick looks again.
                if resting.take().is_some() {
                    sample.reset();
                    decide.reset();
                }
                autoscaler.settings = settings.borrow_and_update().clone();
                let (demand, ready) = demand_and_ready(&gate);
                let decision = autoscaler.decide(Instant::now(), ready);
                publish(decision, demand, ready);
            }
            _ = decide.tick(), if resting.is_none() => {
                let (demand, ready) = demand_and_ready(&gate);
                let now = Instant::now();
                let decision = autoscaler.decide(now, ready);
                publish(decision, demand, ready);
                if demand == 0 && autoscaler.rest(now) {
                    resting = Some(now + tick);
                }
            }
            // Demand that never waits (pods ready) does not wake the scaler:
            // look once a tick.
            _ = async { match resting { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {
                let now = Instant::now();
                let (demand, _) = demand_and_ready(&gate);
                if demand == 0 {
                    resting = Some(now + tick);
                } else {
                    resting = None;
                    autoscaler.record(now, demand);
                    sample.reset();
                    decide.reset();
                }
            }
        }
    }
}

fn demand_and_ready(gate: &SharedGate) -> (u32, u32) {
    gate.inspect(|g| (g.queue_depth() as u32 + g.inflight(), g.ready_count() as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            min: 0,
            max: 10,
            target: 1.0,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            scale_to_zero_grace: Duration::from_secs(30),
        }
    }

    /// Feeds `demand` every 100 ms for `for_secs`, deciding every 2 s like
    /// the KPA tick; returns the last decision.
    fn feed(a: &mut Autoscaler, clock: &mut Instant, demand: u32, for_secs: u64, ready: u32) -> Decision {
        let mut last = None;
        for step in 1..=for_secs * 10 {
            *clock += Duration::from_millis(100);
            a.record(*clock, demand);
            if step % 20 == 0 {
                last = Some(a.decide(*clock, ready));
            }
        }
        last.expect("at least one decision")
    }

    #[test]
    fn activation_from_zero_wants_pods_for_the_waiting_requests_at_once() {
        let mut a = Autoscaler::new(settings());
        let now = Instant::now();
        assert_eq!(a.activate(now, 3), Some(Decision { desired: 3, reason: Reason::Activation }));
        assert_eq!(a.activate(now, 5), None, "already activated");
    }

    #[test]
    fn steady_demand_settles_on_demand_over_target() {
        let mut a = Autoscaler::new(Settings { target: 2.0, ..settings() });
        let mut clock = Instant::now();
        let decision = feed(&mut a, &mut clock, 6, 70, 3);
        assert_eq!(decision, Decision { desired: 3, reason: Reason::Stable });
    }

    #[test]
    fn target_utilization_below_one_adds_headroom() {
        let scale = ScaleConfig { target_utilization: 0.7, ..ScaleConfig::default() };
        let mut a = Autoscaler::new(Settings { max: 100, ..Settings::new(&scale, 1) });
        let mut clock = Instant::now();
        assert_eq!(feed(&mut a, &mut clock, 7, 70, 10).desired, 10);
    }

    #[test]
    fn a_burst_panics_and_scales_up_within_the_panic_window() {
        let mut a = Autoscaler::new(settings());
        let mut clock = Instant::now();
        feed(&mut a, &mut clock, 1, 70, 1);
        let decision = feed(&mut a, &mut clock, 8, 6, 1);
        assert_eq!(decision, Decision { desired: 8, reason: Reason::Panic });
    }

    #[test]
    fn panic_never_scales_down_until_a_stable_window_has_passed() {
        let mut a = Autoscaler::new(settings());
        let mut clock = Instant::now();
        feed(&mut a, &mut clock, 1, 70, 1);
        feed(&mut a, &mut clock, 8, 6, 1);
        let during = feed(&mut a, &mut clock, 1, 30, 8);
        assert_eq!(during, Decision { desired: 8, reason: Reason::Panic });
        let after = feed(&mut a, &mut clock, 1, 40, 8);
        assert_eq!(after.reason, Reason::Stable);
        assert!(after.desired < 8);
    }

    #[test]
    fn scale_down_at_most_halves_per_decision() {
        let mut a = Autoscaler::new(settings());
        let mut clock = Instant::now();
        feed(&mut a, &mut clock, 8, 70, 8);
        clock += Duration::from_millis(100);
        a.record(clock, 0);
        // Force the stable average low by replacing the window with zeros.
        let mut b = Autoscaler { samples: VecDeque::new(), ..a };
        b.record(clock, 0);
        let decision = b.decide(clock, 8);
        assert_eq!(decision, Decision { desired: 4, reason: Reason::Stable });
    }

    #[test]
    fn pods_that_stay_ready_do_not_hold_the_desired_count_up() {
        // A fixed backend: two pods are always ready, whatever is desired.
        let mut a = Autoscaler::new(settings());
        let mut clock = Instant::now();
        a.activate(clock, 1);
        feed(&mut a, &mut clock, 1, 10, 2);
        let zero = feed(&mut a, &mut clock, 0, 100, 2);
        assert_eq!(zero, Decision { desired: 0, reason: Reason::Idle });
    }

    #[test]
    fn scale_to_zero_waits_for_the_stable_window_plus_grace() {
        let mut a = Autoscaler::new(settings());
        let mut clock = Instant::now();
        a.activate(clock, 1);
        feed(&mut a, &mut clock, 1, 10, 1);
        // 80 s idle: past the stable window (60 s) but inside the grace (30 s).
        let held = feed(&mut a, &mut clock, 0, 80, 1);
        assert_eq!(held, Decision { desired: 1, reason: Reason::Stable });
        let zero = feed(&mut a, &mut clock, 0, 12, 1);
        assert_eq!(zero, Decision { desired: 0, reason: Reason::Idle });
    }

    #[test]
    fn min_and_max_bound_every_decision() {
        let mut a = Autoscaler::new(Settings { min: 2, max: 4, ..settings() });
        assert_eq!(a.desired(), 2);
        let mut clock = Instant::now();
        assert_eq!(feed(&mut a, &mut clock, 50, 10, 2).desired, 4);
        assert_eq!(feed(&mut a, &mut clock, 0, 200, 4).desired, 2);
        let mut zero = Autoscaler::new(Settings { max: 3, ..settings() });
        assert_eq!(zero.activate(clock, 50).unwrap().desired, 3);
    }

    #[test]
    fn a_burst_gets_every_pod_it_needs_when_it_arrives_not_at_the_next_tick() {
        let mut a = Autoscaler::new(settings());
        let now = Instant::now();
        assert_eq!(a.activate(now, 1), Some(Decision { desired: 1, reason: Reason::Activation }));
        // Four more arrive before any pod is ready: five wanted at once.
        assert_eq!(a.on_demand(now, 5, 0), Some(Decision { desired: 5, reason: Reason::Panic }));
        assert_eq!(a.on_demand(now, 5, 0), None, "nothing new");
        // Panic holds: a tick right after does not scale the burst down.
        assert_eq!(a.decide(now + Duration::from_secs(2), 5).desired, 5);
    }

    #[test]
    fn demand_below_twice_the_ready_pods_waits_for_the_tick() {
        let mut a = Autoscaler::new(settings());
        let now = Instant::now();
        a.activate(now, 1);
        feed(&mut a, &mut now.clone(), 3, 70, 3);
        assert_eq!(a.on_demand(now + Duration::from_secs(71), 5, 3), None, "5 < 2 x 3 ready");
        assert_eq!(a.on_demand(now + Duration::from_secs(71), 20, 3).map(|d| d.desired), Some(10), "clamped to max");
    }

    /// Feeds `demand` like [`feed`], every decision kept.
    fn decisions(a: &mut Autoscaler, clock: &mut Instant, demand: u32, for_secs: u64, ready: u32) -> Vec<Decision> {
        let mut out = Vec::new();
        for step in 1..=for_secs * 10 {
            *clock += Duration::from_millis(100);
            a.record(*clock, demand);
            if step % 20 == 0 {
                out.push(a.decide(*clock, ready));
            }
        }
        out
    }

    #[test]
    fn a_service_at_rest_decides_as_if_it_had_sampled_all_along() {
        let (mut sampled, mut rested) = (Autoscaler::new(settings()), Autoscaler::new(settings()));
        let start = Instant::now();
        for a in [&mut sampled, &mut rested] {
            let mut clock = start;
            a.activate(clock, 2);
            feed(a, &mut clock, 2, 10, 2);
            assert_eq!(feed(a, &mut clock, 0, 100, 2).desired, 0, "scaled to zero");
        }
        let mut clock = start + Duration::from_secs(110);
        assert!(rested.rest(clock), "no demand for a window, min wanted");
        assert!(rested.samples.is_empty(), "at rest the zeros are not kept");
        // 30 s later (inside the windows' reach): one sampled them, the other slept.
        let mut sampled_clock = clock;
        feed(&mut sampled, &mut sampled_clock, 0, 30, 0);
        clock += Duration::from_secs(30);
        for (demand, secs) in [(3, 8), (1, 70), (0, 100)] {
            let mut other = clock;
            let expected = decisions(&mut sampled, &mut other, demand, secs, 1);
            assert_eq!(decisions(&mut rested, &mut clock, demand, secs, 1), expected, "demand {demand}");
            assert_eq!(rested.samples.len(), sampled.samples.len());
        }
    }

    #[test]
    fn rest_waits_for_min_no_panic_and_a_quiet_window() {
        let mut a = Autoscaler::new(Settings { min: 1, ..settings() });
        let mut clock = Instant::now();
        feed(&mut a, &mut clock, 4, 10, 1);
        assert!(!a.rest(clock), "more than min wanted");
        feed(&mut a, &mut clock, 0, 30, 4);
        assert!(!a.rest(clock), "demand within the stable window");
        feed(&mut a, &mut clock, 0, 70, 1);
        assert_eq!(a.desired(), 1);
        assert!(a.rest(clock));
        // Demand again: the next record ends the rest.
        a.record(clock + Duration::from_millis(100), 1);
        assert!(!a.rest(clock + Duration::from_millis(100)));
    }

    #[test]
    fn unlimited_concurrency_targets_one_hundred_per_pod() {
        let settings = Settings::new(&ScaleConfig::default(), 0);
        assert_eq!(settings.target, 100.0);
    }
}

#[cfg(test)]
mod paused {
    use super::*;
    use crate::config::ScaleConfig;
    use crate::gate::Unobserved;
    use crate::observe::metrics::Metrics;

    #[tokio::test(start_paused = true)]
    async fn the_first_waiting_request_wakes_the_scaler_and_idleness_brings_it_back_to_zero() {
        let gate = SharedGate::new(1, 10, Arc::new(Unobserved));
        let scale = ScaleConfig::default();
        let (_settings_tx, settings) = watch::channel(Settings::new(&scale, 1));
        let (desired_tx, mut desired) = watch::channel(0);
        let metrics = Metrics::new().service("sd");
        tokio::spawn(run("sd".into(), gate.clone(), metrics.clone(), settings, scale.tick, desired_tx));
        // A request waits with no pod: activation at once, not at the next tick.
        let ticket = gate.arrive();
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.acquire(ticket, Duration::from_secs(5)).await.is_err() }
        });
        let woke = Instant::now();
        desired.wait_for(|d| *d >= 1).await.expect("scaler running");
        assert!(woke.elapsed() < Duration::from_secs(1), "activated within {:?}", woke.elapsed());
        assert!(waiter.await.expect("waiter ran"), "no pod came: the waiter timed out");
        // No demand: back to zero after the stable window and the grace.
        let quiet = Instant::now();
        desired.wait_for(|d| *d == 0).await.expect("scaler running");
        assert!(quiet.elapsed() >= scale.scale_to_zero_grace, "scaled to zero after {:?}", quiet.elapsed());
        assert_eq!(metrics.last_scale().map(|event| event.desired), Some(0));
    }
}
