use super::*;
use crate::gate::models::{ModelPolicy, Want};

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

// ---------------------------------------------------------------------------
// Helpers. The waiter is the request's own ticket, so every hand-over can be
// checked against arrival order.
// ---------------------------------------------------------------------------

fn addr(n: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7000 + n))
}

/// A gate with `pods` endpoints, all ready.
fn gate_with(capacity: u32, max_depth: usize, pods: u16) -> (Gate<Ticket>, Vec<EndpointId>) {
    let mut gate = Gate::new(capacity, max_depth);
    let ids = (0..pods)
        .map(|n| {
            let id = gate.add_endpoint(addr(n));
            assert!(gate.set_ready(id, true));
            id
        })
        .collect();
    (gate, ids)
}

fn inflight_of(gate: &Gate<Ticket>, id: EndpointId) -> u32 {
    gate.endpoint(id).expect("endpoint is known").inflight
}

fn loads(gate: &Gate<Ticket>) -> Vec<u32> {
    gate.endpoints().iter().map(|e| e.inflight).collect()
}

/// A new request that finds room at once.
fn admit(gate: &mut Gate<Ticket>) -> Grant {
    let ticket = gate.arrive();
    gate.try_dispatch(ticket).expect("a pod has room for a newcomer")
}

/// A new request that finds no room and joins the queue.
fn wait(gate: &mut Gate<Ticket>, now: Instant) -> Ticket {
    let ticket = gate.arrive();
    assert!(gate.try_dispatch(ticket).is_none(), "expected no room for {ticket:?}");
    gate.enqueue(ticket, ticket, now).expect("room in the queue");
    ticket
}

/// What the async layer does after anything that frees room.
fn drain(gate: &mut Gate<Ticket>) -> Vec<(Ticket, Grant)> {
    std::iter::from_fn(|| gate.next_grant()).collect()
}

fn tickets(granted: &[(Ticket, Grant)]) -> Vec<Ticket> {
    granted.iter().map(|(ticket, _)| *ticket).collect()
}

// ---------------------------------------------------------------------------
// Policy and tickets
// ---------------------------------------------------------------------------

#[test]
fn the_policy_follows_container_concurrency() {
    assert_eq!(Policy::for_capacity(0), Policy::PowerOfTwoChoices);
    for cc in 1..=3 {
        assert_eq!(Policy::for_capacity(cc), Policy::FirstAvailable, "cc={cc}");
    }
    for cc in [4, 5, 16, 1000, u32::MAX] {
        assert_eq!(Policy::for_capacity(cc), Policy::LeastLoaded, "cc={cc}");
    }
    assert_eq!(Gate::<()>::new(0, 1).policy(), Policy::PowerOfTwoChoices);
    assert_eq!(Gate::<()>::new(1, 1).policy(), Policy::FirstAvailable);
    assert_eq!(Gate::<()>::new(3, 1).policy(), Policy::FirstAvailable);
    assert_eq!(Gate::<()>::new(4, 1).policy(), Policy::LeastLoaded);
}

#[test]
fn every_arrival_gets_a_later_ticket_than_the_one_before() {
    let mut gate: Gate<()> = Gate::new(1, 1);
    let mut previous = gate.arrive();
    for _ in 0..100 {
        let next = gate.arrive();
        assert!(next > previous);
        previous = next;
    }
}

// ---------------------------------------------------------------------------
// Capacity per endpoint
// ---------------------------------------------------------------------------

#[test]
fn a_cc1_pod_holds_one_request_at_a_time() {
    let (mut gate, pods) = gate_with(1, 10, 1);
    let grant = admit(&mut gate);
    assert_eq!(grant, Grant::plain(pods[0], addr(0)));
    for _ in 0..5 {
        let ticket = gate.arrive();
        assert!(gate.try_dispatch(ticket).is_none());
    }
    assert_eq!(inflight_of(&gate, pods[0]), 1);

    gate.release(grant.endpoint);
    assert_eq!(inflight_of(&gate, pods[0]), 0);
    assert_eq!(admit(&mut gate).endpoint, pods[0]);
    assert_eq!(inflight_of(&gate, pods[0]), 1);
}

#[test]
fn each_cc1_pod_takes_exactly_one_request_before_anyone_waits() {
    let (mut gate, pods) = gate_with(1, 10, 4);
    let taken: BTreeSet<EndpointId> = (0..4).map(|_| admit(&mut gate).endpoint).collect();
    assert_eq!(taken, pods.iter().copied().collect());
    assert_eq!(loads(&gate), [1, 1, 1, 1]);
    let fifth = gate.arrive();
    assert!(gate.try_dispatch(fifth).is_none());
    assert_eq!(gate.inflight(), 4);
}

#[test]
fn a_cc2_pod_holds_at_most_two_requests() {
    let (mut gate, pods) = gate_with(2, 10, 2);
    for _ in 0..4 {
        admit(&mut gate);
    }
    assert_eq!(loads(&gate), [2, 2]);
    let extra = gate.arrive();
    assert!(gate.try_dispatch(extra).is_none());

    gate.release(pods[1]);
    assert_eq!(admit(&mut gate).endpoint, pods[1]);
    let extra = gate.arrive();
    assert!(gate.try_dispatch(extra).is_none());
    assert_eq!(loads(&gate), [2, 2]);
}

#[test]
fn a_cc5_pod_holds_at_most_five_requests() {
    let (mut gate, pods) = gate_with(5, 10, 3);
    for _ in 0..15 {
        admit(&mut gate);
    }
    assert_eq!(loads(&gate), [5, 5, 5]);
    let extra = gate.arrive();
    assert!(gate.try_dispatch(extra).is_none());

    gate.release(pods[2]);
    gate.release(pods[2]);
    assert_eq!(admit(&mut gate).endpoint, pods[2]);
    assert_eq!(admit(&mut gate).endpoint, pods[2]);
    let extra = gate.arrive();
    assert!(gate.try_dispatch(extra).is_none());
    assert_eq!(loads(&gate), [5, 5, 5]);
}

#[test]
fn queued_waiters_never_push_a_pod_over_its_capacity() {
    let now = Instant::now();
    for cc in [1, 2, 3, 4, 5] {
        let (mut gate, pods) = gate_with(cc, 100, 2);
        for _ in 0..2 * cc {
            admit(&mut gate);
        }
        for _ in 0..20 {
            wait(&mut gate, now);
        }
        assert!(drain(&mut gate).is_empty(), "cc={cc}: nothing was freed");
        for round in 0..10 {
            gate.release(pods[round % 2]);
            let granted = drain(&mut gate);
            assert_eq!(granted.len(), 1, "cc={cc}: one release frees one place");
            assert_eq!(granted[0].1.endpoint, pods[round % 2]);
            assert!(loads(&gate).iter().all(|&load| load == cc), "cc={cc}: {:?}", loads(&gate));
        }
    }
}

// ---------------------------------------------------------------------------
// Unlimited capacity (cc = 0): power of two choices
// ---------------------------------------------------------------------------

#[test]
fn unlimited_capacity_never_queues_while_a_pod_is_ready() {
    let (mut gate, pods) = gate_with(0, 0, 3);
    gate.set_ready(pods[0], false);
    gate.set_ready(pods[2], false);
    for _ in 0..1000 {
        assert_eq!(admit(&mut gate).endpoint, pods[1], "the only ready pod takes everything");
    }
    gate.set_ready(pods[0], true);
    gate.set_ready(pods[2], true);
    for _ in 0..1000 {
        admit(&mut gate);
    }
    assert_eq!(gate.inflight(), 2000);
    assert_eq!(gate.queue_depth(), 0);
}

#[test]
fn unlimited_capacity_spreads_load_over_the_ready_pods() {
    let (mut gate, _) = gate_with(0, 0, 4);
    for _ in 0..4000 {
        admit(&mut gate);
    }
    let loads = loads(&gate);
    let (min, max) = (*loads.iter().min().unwrap(), *loads.iter().max().unwrap());
    assert!(max - min <= 4, "power of two choices keeps pods balanced: {loads:?}");
    assert_eq!(loads.iter().sum::<u32>(), 4000);
}

#[test]
fn unlimited_capacity_prefers_the_idle_pod_of_two() {
    let (mut gate, pods) = gate_with(0, 0, 2);
    gate.set_ready(pods[1], false);
    for _ in 0..10 {
        assert_eq!(admit(&mut gate).endpoint, pods[0]);
    }
    gate.set_ready(pods[1], true);
    // With two ready pods both are always compared, so the less loaded wins
    // until they are even.
    for _ in 0..10 {
        assert_eq!(admit(&mut gate).endpoint, pods[1]);
    }
    assert_eq!(loads(&gate), [10, 10]);
}

#[test]
fn unlimited_capacity_never_picks_a_pod_that_is_not_ready() {
    let (mut gate, pods) = gate_with(0, 0, 5);
    gate.set_ready(pods[1], false);
    gate.set_ready(pods[3], false);
    for _ in 0..300 {
        let endpoint = admit(&mut gate).endpoint;
        assert!(endpoint != pods[1] && endpoint != pods[3]);
    }
    assert_eq!(inflight_of(&gate, pods[1]), 0);
    assert_eq!(inflight_of(&gate, pods[3]), 0);
    for pod in [pods[0], pods[2], pods[4]] {
        assert!(inflight_of(&gate, pod) >= 90, "{:?}", loads(&gate));
    }
}

#[test]
fn unlimited_capacity_with_no_ready_pod_queues_and_serves_everyone_once_one_is_ready() {
    let now = Instant::now();
    let mut gate: Gate<Ticket> = Gate::new(0, 100);
    let pod = gate.add_endpoint(addr(0));
    let waiting: Vec<Ticket> = (0..50).map(|_| wait(&mut gate, now)).collect();
    assert!(drain(&mut gate).is_empty());
    assert!(gate.set_ready(pod, true));
    let granted = drain(&mut gate);
    assert_eq!(tickets(&granted), waiting);
    assert!(granted.iter().all(|(_, grant)| grant.endpoint == pod));
    assert_eq!(gate.inflight(), 50);
    assert_eq!(gate.queue_depth(), 0);
}

// ---------------------------------------------------------------------------
// First available (cc 1..=3) and least loaded (cc > 3)
// ---------------------------------------------------------------------------

#[test]
fn first_available_packs_requests_onto_the_first_pod() {
    let (mut gate, pods) = gate_with(3, 10, 3);
    let chosen: Vec<EndpointId> = (0..7).map(|_| admit(&mut gate).endpoint).collect();
    assert_eq!(chosen, [pods[0], pods[0], pods[0], pods[1], pods[1], pods[1], pods[2]]);

    // Room freed on the first pod is used before the idler last pod.
    gate.release(pods[0]);
    assert_eq!(admit(&mut gate).endpoint, pods[0]);
    assert_eq!(admit(&mut gate).endpoint, pods[2]);
}

#[test]
fn first_available_prefers_an_earlier_pod_even_when_it_is_busier() {
    let (mut gate, pods) = gate_with(2, 10, 2);
    assert_eq!(admit(&mut gate).endpoint, pods[0]);
    assert_eq!(admit(&mut gate).endpoint, pods[0]);
    assert_eq!(loads(&gate), [2, 0]);
}

#[test]
fn first_available_skips_pods_that_are_not_ready() {
    let (mut gate, pods) = gate_with(1, 10, 3);
    gate.set_ready(pods[0], false);
    assert_eq!(admit(&mut gate).endpoint, pods[1]);
    assert_eq!(admit(&mut gate).endpoint, pods[2]);
    let extra = gate.arrive();
    assert!(gate.try_dispatch(extra).is_none());
}

#[test]
fn least_loaded_spreads_requests_when_cc_is_above_three() {
    let (mut gate, pods) = gate_with(4, 10, 3);
    let chosen: Vec<EndpointId> = (0..6).map(|_| admit(&mut gate).endpoint).collect();
    assert_eq!(chosen, [pods[0], pods[1], pods[2], pods[0], pods[1], pods[2]]);

    gate.release(pods[1]);
    gate.release(pods[1]);
    assert_eq!(loads(&gate), [2, 0, 2]);
    assert_eq!(admit(&mut gate).endpoint, pods[1]);
    assert_eq!(admit(&mut gate).endpoint, pods[1]);
    // All even again: ties go to the earliest pod.
    assert_eq!(admit(&mut gate).endpoint, pods[0]);
}

#[test]
fn least_loaded_fills_every_pod_to_capacity_and_no_further() {
    let (mut gate, pods) = gate_with(4, 10, 3);
    for _ in 0..12 {
        admit(&mut gate);
    }
    assert_eq!(loads(&gate), [4, 4, 4]);
    let extra = gate.arrive();
    assert!(gate.try_dispatch(extra).is_none());
    gate.release(pods[2]);
    assert_eq!(admit(&mut gate).endpoint, pods[2]);
}

#[test]
fn least_loaded_skips_idle_pods_that_are_not_ready() {
    let (mut gate, pods) = gate_with(8, 10, 3);
    gate.set_ready(pods[1], false);
    for _ in 0..6 {
        admit(&mut gate);
    }
    assert_eq!(loads(&gate), [3, 0, 3]);
}

// ---------------------------------------------------------------------------
// FIFO
// ---------------------------------------------------------------------------

#[test]
fn waiters_are_served_in_arrival_order() {
    let now = Instant::now();
    let (mut gate, _) = gate_with(1, 10, 1);
    let mut holder = admit(&mut gate);
    let waiting: Vec<Ticket> = (0..5).map(|_| wait(&mut gate, now)).collect();

    let mut served = Vec::new();
    for _ in 0..5 {
        gate.release(holder.endpoint);
        let granted = drain(&mut gate);
        assert_eq!(granted.len(), 1);
        served.push(granted[0].0);
        holder = granted[0].1;
    }
    assert_eq!(served, waiting);
    assert_eq!(gate.queue_depth(), 0);
}

#[test]
fn waiters_are_served_by_ticket_whatever_order_they_were_enqueued_in() {
    let now = Instant::now();
    let (mut gate, pods) = gate_with(1, 10, 1);
    admit(&mut gate);
    let (a, b, c) = (gate.arrive(), gate.arrive(), gate.arrive());
    for ticket in [c, a, b] {
        gate.enqueue(ticket, ticket, now).unwrap();
    }
    let mut served = Vec::new();
    for _ in 0..3 {
        gate.release(pods[0]);
        served.extend(tickets(&drain(&mut gate)));
    }
    assert_eq!(served, [a, b, c]);
}

#[test]
fn one_release_hands_over_to_exactly_one_waiter_per_freed_place() {
    let now = Instant::now();
    let (mut gate, pods) = gate_with(1, 10, 3);
    for _ in 0..3 {
        admit(&mut gate);
    }
    let waiting: Vec<Ticket> = (0..4).map(|_| wait(&mut gate, now)).collect();
    gate.release(pods[2]);
    gate.release(pods[0]);
    let granted = drain(&mut gate);
    assert_eq!(tickets(&granted), waiting[..2]);
    // First available: the first freed pod in insertion order goes first.
    assert_eq!(granted[0].1.endpoint, pods[0]);
    assert_eq!(granted[1].1.endpoint, pods[2]);
    assert_eq!(gate.queue_depth(), 2);
}

#[test]
fn a_newcomer_never_overtakes_the_queue() {
    let now = Instant::now();
    let (mut gate, pods) = gate_with(1, 10, 1);
    admit(&mut gate);
    let waiter = wait(&mut gate, now);
    // Room frees up, and a newcomer asks before the waiters are served.
    gate.release(pods[0]);
    let newcomer = gate.arrive();
    assert!(gate.try_dispatch(newcomer).is_none());
    assert_eq!(inflight_of(&gate, pods[0]), 0, "the refused newcomer took nothing");
    gate.enqueue(newcomer, newcomer, now).unwrap();
    assert_eq!(tickets(&drain(&mut gate)), [waiter]);
    gate.release(pods[0]);
    assert_eq!(tickets(&drain(&mut gate)), [newcomer]);
}

#[test]
fn an_earlier_ticket_is_not_held_back_by_later_waiters() {
    let now = Instant::now();
    let (mut gate, pods) = gate_with(1, 10, 1);
    let holder = admit(&mut gate);
    let early = gate.arrive();
    let late = wait(&mut gate, now);
    gate.release(holder.endpoint);
    // `early` arrived before `late`, so it may take the free room at once.
    let grant = gate.try_dispatch(early).expect("an older ticket is first in line");
    assert_eq!(grant.endpoint, pods[0]);
    assert!(drain(&mut gate).is_empty());
    assert_eq!(gate.queue_depth(), 1);
    gate.release(pods[0]);
    assert_eq!(tickets(&drain(&mut gate)), [late]);
}

#[test]
fn a_retried_request_goes_back_to_its_original_place() {
    let now = Instant::now();
    let (mut gate, pods) = gate_with(1, 10, 1);
    let first = gate.arrive();
    let grant = gate.try_dispatch(first).unwrap();
    let second = wait(&mut gate, now);
    let third = wait(&mut gate, now);

    // The pod refused the connection: the slot is returned (and handed on),
    // then the request tries again with the ticket it arrived with.
    gate.release(grant.endpoint);
    assert_eq!(tickets(&drain(&mut gate)), [second]);
    assert!(gate.try_dispatch(first).is_none());
    gate.enqueue(first, first, now).unwrap();
    assert_eq!(gate.queue_depth(), 2);

    gate.release(pods[0]);
    assert_eq!(tickets(&drain(&mut gate)), [first], "the retry is ahead of later arrivals");
    gate.release(pods[0]);
    assert_eq!(tickets(&drain(&mut gate)), [third]);
}

#[test]
fn a_retried_request_is_refused_when_the_queue_is_full() {
    let now = Instant::now();
    let (mut gate, pods) = gate_with(1, 1, 1);
    let first = gate.arrive();
    gate.try_dispatch(first).unwrap();
    let second = wait(&mut gate, now);
    gate.release(pods[0]);
    assert_eq!(tickets(&drain(&mut gate)), [second]);
    let third = wait(&mut gate, now);
    assert!(gate.try_dispatch(first).is_none());
    assert_eq!(gate.enqueue(first, first, now), Err(QueueFull(first)));
    assert_eq!(gate.cancel(third), Some(third));
    assert_eq!(gate.enqueue(first, first, now), Ok(()));
}

// ---------------------------------------------------------------------------
// Bounded queue and cancellation
// ---------------------------------------------------------------------------

#[test]
fn a_full_queue_hands_the_waiter_back() {
    let now = Instant::now();
    let (mut gate, _) = gate_with(1, 2, 1);
    admit(&mut gate);
    let first = wait(&mut gate, now);
    wait(&mut gate, now);
    let refused = gate.arrive();
    assert!(gate.try_dispatch(refused).is_none());
    assert_eq!(gate.enqueue(refused, refused, now), Err(QueueFull(refused)));
    assert_eq!(gate.queue_depth(), 2);

    // A waiter leaving makes room for one more.
    assert_eq!(gate.cancel(first), Some(first));
    assert_eq!(gate.enqueue(refused, refused, now), Ok(()));
    assert_eq!(gate.queue_depth(), 2);
}

#[test]
fn a_queue_of_depth_zero_refuses_every_waiter() {
    let now = Instant::now();
    let mut gate: Gate<&str> = Gate::new(1, 0);
    let ticket = gate.arrive();
    assert!(gate.try_dispatch(ticket).is_none(), "no endpoint at all");
    assert_eq!(gate.enqueue(ticket, "mine", now), Err(QueueFull("mine")));
    assert_eq!(gate.queue_depth(), 0);
}

#[test]
fn the_queue_never_grows_past_its_depth() {
    let now = Instant::now();
    let mut gate: Gate<u32> = Gate::new(2, 7);
    for n in 0..100 {
        let ticket = gate.arrive();
        let result = gate.enqueue(ticket, n, now);
        assert_eq!(result.is_ok(), n < 7);
        assert!(gate.queue_depth() <= 7);
    }
    assert_eq!(gate.queue_depth(), 7);
}

#[test]
fn cancelling_a_waiter_removes_it_from_the_queue() {
    let now = Instant::now();
    let (mut gate, pods) = gate_with(1, 10, 1);
    admit(&mut gate);
    let a = wait(&mut gate, now);
    let b = wait(&mut gate, now);
    let c = wait(&mut gate, now);
    assert_eq!(gate.cancel(b), Some(b));
    assert_eq!(gate.queue_depth(), 2);

    gate.release(pods[0]);
    assert_eq!(tickets(&drain(&mut gate)), [a]);
    gate.release(pods[0]);
    assert_eq!(tickets(&drain(&mut gate)), [c]);
}

#[test]
fn cancelling_the_first_waiter_lets_the_next_one_go_first() {
    let now = Instant::now();
    let (mut gate, pods) = gate_with(1, 10, 1);
    admit(&mut gate);
    let a = wait(&mut gate, now);
    let b = wait(&mut gate, now);
    assert_eq!(gate.cancel(a), Some(a));
    gate.release(pods[0]);
    assert_eq!(tickets(&drain(&mut gate)), [b]);
}

#[test]
fn cancelling_a_granted_request_returns_none() {
    let now = Instant::now();
    let (mut gate, pods) = gate_with(1, 10, 1);
    let direct = gate.arrive();
    gate.try_dispatch(direct).unwrap();
    let queued = wait(&mut gate, now);
    gate.release(pods[0]);
    assert_eq!(tickets(&drain(&mut gate)), [queued]);

    assert_eq!(gate.cancel(queued), None, "granted from the queue");
    assert_eq!(gate.cancel(direct), None, "granted without queueing");
    assert_eq!(inflight_of(&gate, pods[0]), 1, "cancelling a granted ticket frees nothing");
}

#[test]
fn cancelling_twice_or_an_unknown_ticket_returns_none() {
    let now = Instant::now();
    let mut gate: Gate<Ticket> = Gate::new(1, 10);
    let ticket = gate.arrive();
    gate.enqueue(ticket, ticket, now).unwrap();
    assert_eq!(gate.cancel(ticket), Some(ticket));
    assert_eq!(gate.cancel(ticket), None);
    let never_queued = gate.arrive();
    assert_eq!(gate.cancel(never_queued), None);
    assert_eq!(gate.queue_depth(), 0);
}

// ---------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------

#[test]
fn a_new_endpoint_starts_not_ready_and_takes_nothing() {
    let now = Instant::now();
    for cc in [0, 1, 2, 3, 4, 8] {
        let mut gate: Gate<Ticket> = Gate::new(cc, 10);
        let pod = gate.add_endpoint(addr(0));
        let endpoint = gate.endpoint(pod).unwrap();
        assert!(!endpoint.ready);
        assert_eq!((endpoint.inflight, endpoint.served, endpoint.addr), (0, 0, addr(0)));
        assert_eq!(gate.ready_count(), 0);
        let waiter = wait(&mut gate, now);
        assert!(drain(&mut gate).is_empty(), "cc={cc}");
        assert_eq!(gate.any_ready(), None);
        assert_eq!(gate.cancel(waiter), Some(waiter));
    }
}

#[test]
fn a_pod_that_is_not_ready_gets_nothing() {
    let now = Instant::now();
    for cc in [0, 1, 2, 4] {
        let (mut gate, pods) = gate_with(cc, 10, 2);
        for &pod in &pods {
            gate.set_ready(pod, false);
        }
        let waiter = wait(&mut gate, now);
        gate.release(pods[0]);
        assert!(drain(&mut gate).is_empty(), "cc={cc}");
        assert_eq!(gate.inflight(), 0);
        assert_eq!(gate.any_ready(), None);
        assert_eq!(gate.queue_depth(), 1);
        assert_eq!(gate.cancel(waiter), Some(waiter));
    }
}

#[test]
fn set_ready_reports_only_real_changes() {
    let mut gate: Gate<()> = Gate::new(1, 1);
    let pod = gate.add_endpoint(addr(0));
    assert!(!gate.set_ready(pod, false), "already not ready");
    assert!(gate.set_ready(pod, true));
    assert!(!gate.set_ready(pod, true), "already ready");
    assert!(gate.set_ready(pod, false));
    assert!(!gate.set_ready(EndpointId(999), true), "unknown endpoint");
    assert_eq!(gate.ready_count(), 0);
}

#[test]
fn a_pod_becoming_ready_takes_the_waiters() {
    let now = Instant::now();
    for (cc, takes) in [(0, 5), (1, 1), (2, 2), (3, 3), (4, 4), (8, 5)] {
        let mut gate: Gate<Ticket> = Gate::new(cc, 10);
        let pod = gate.add_endpoint(addr(0));
        let waiting: Vec<Ticket> = (0..5).map(|_| wait(&mut gate, now)).collect();
        assert!(gate.set_ready(pod, true));
        let granted = drain(&mut gate);
        assert_eq!(tickets(&granted), waiting[..takes], "cc={cc}");
        assert!(granted.iter().all(|(_, grant)| grant.endpoint == pod));
        assert_eq!(gate.queue_depth(), 5 - takes);
        assert_eq!(gate.inflight() as usize, takes);
    }
}

#[test]
fn a_pod_going_unready_keeps_its_requests_but_takes_no_new_ones() {
    let now = Instant::now();
    let (mut gate, pods) = gate_with(1, 10, 2);
    assert_eq!(admit(&mut gate).endpoint, pods[0]);
    assert!(gate.set_ready(pods[0], false));
    assert_eq!(inflight_of(&gate, pods[0]), 1);
    assert_eq!(admit(&mut gate).endpoint, pods[1]);
    let waiter = wait(&mut gate, now);

    gate.release(pods[0]);
    assert!(drain(&mut gate).is_empty(), "the freed pod is not ready");
    assert_eq!(inflight_of(&gate, pods[0]), 0);
    gate.release(pods[1]);
    let granted = drain(&mut gate);
    assert_eq!(tickets(&granted), [waiter]);
    assert_eq!(granted[0].1.endpoint, pods[1]);
}

// ---------------------------------------------------------------------------
// Removing endpoints and releasing
// ---------------------------------------------------------------------------

#[test]
fn releasing_on_a_removed_pod_is_a_noop() {
    let (mut gate, pods) = gate_with(2, 10, 2);
    for _ in 0..3 {
        admit(&mut gate);
    }
    assert_eq!(loads(&gate), [2, 1]);
    let removed = gate.remove_endpoint(pods[0]).expect("pod was known");
    assert_eq!((removed.id, removed.inflight, removed.served), (pods[0], 2, 2));
    assert_eq!(gate.endpoint(pods[0]), None);
    assert_eq!(gate.inflight(), 1);

    for _ in 0..3 {
        gate.release(pods[0]);
    }
    assert_eq!(gate.inflight(), 1);
    assert_eq!(inflight_of(&gate, pods[1]), 1);
    assert_eq!(gate.endpoints().len(), 1);
}

#[test]
fn waiters_are_not_granted_a_removed_pod() {
    let now = Instant::now();
    let (mut gate, pods) = gate_with(1, 10, 1);
    admit(&mut gate);
    let waiter = wait(&mut gate, now);
    gate.remove_endpoint(pods[0]);
    gate.release(pods[0]);
    assert!(drain(&mut gate).is_empty());
    assert_eq!(gate.queue_depth(), 1);

    let replacement = gate.add_endpoint(addr(1));
    assert!(gate.set_ready(replacement, true));
    let granted = drain(&mut gate);
    assert_eq!(tickets(&granted), [waiter]);
    assert_eq!(granted[0].1, Grant::plain(replacement, addr(1)));
}

#[test]
fn releasing_more_than_was_granted_never_underflows() {
    let (mut gate, pods) = gate_with(1, 10, 2);
    admit(&mut gate);
    for _ in 0..3 {
        gate.release(pods[0]);
        gate.release(pods[1]);
    }
    assert_eq!(loads(&gate), [0, 0]);
    assert_eq!(gate.inflight(), 0);
    // And the pod still honours its capacity afterwards.
    admit(&mut gate);
    admit(&mut gate);
    let extra = gate.arrive();
    assert!(gate.try_dispatch(extra).is_none());
}

#[test]
fn releasing_on_an_unknown_endpoint_is_a_noop() {
    let (mut gate, _) = gate_with(1, 10, 2);
    admit(&mut gate);
    gate.release(EndpointId(0));
    gate.release(EndpointId(12345));
    assert_eq!(loads(&gate), [1, 0]);
    assert_eq!(gate.inflight(), 1);
}

#[test]
fn removing_an_unknown_endpoint_returns_none() {
    let (mut gate, pods) = gate_with(1, 10, 1);
    assert_eq!(gate.remove_endpoint(EndpointId(77)), None);
    assert!(gate.remove_endpoint(pods[0]).is_some());
    assert_eq!(gate.remove_endpoint(pods[0]), None, "already removed");
    assert!(gate.endpoints().is_empty());
}

#[test]
fn endpoint_ids_are_never_reused() {
    let mut gate: Gate<()> = Gate::new(1, 1);
    let mut seen = BTreeSet::new();
    for n in 0..20 {
        let id = gate.add_endpoint(addr(0));
        assert!(seen.insert(id), "{id:?} handed out twice");
        if n % 2 == 0 {
            gate.remove_endpoint(id);
        }
    }
    assert_eq!(gate.endpoints().len(), 10);
}

#[test]
fn removing_a_pod_keeps_the_order_of_the_others() {
    let (mut gate, pods) = gate_with(1, 10, 4);
    gate.remove_endpoint(pods[1]);
    let order: Vec<EndpointId> = gate.endpoints().iter().map(|e| e.id).collect();
    assert_eq!(order, [pods[0], pods[2], pods[3]]);
    // First available still follows insertion order.
    assert_eq!(admit(&mut gate).endpoint, pods[0]);
    assert_eq!(admit(&mut gate).endpoint, pods[2]);
}

// ---------------------------------------------------------------------------
// any_ready (bypass)
// ---------------------------------------------------------------------------

#[test]
fn any_ready_picks_the_least_loaded_ready_pod() {
    let (mut gate, pods) = gate_with(4, 10, 3);
    for _ in 0..6 {
        admit(&mut gate);
    }
    gate.release(pods[2]);
    assert_eq!(loads(&gate), [2, 2, 1]);
    assert_eq!(gate.any_ready(), Some(Grant::plain(pods[2], addr(2))));

    // An idle pod that is not ready is not a candidate.
    gate.release(pods[0]);
    gate.release(pods[0]);
    gate.set_ready(pods[0], false);
    assert_eq!(gate.any_ready().map(|g| g.endpoint), Some(pods[2]));
}

#[test]
fn any_ready_ignores_capacity_and_takes_no_slot() {
    let (mut gate, pods) = gate_with(1, 10, 2);
    admit(&mut gate);
    admit(&mut gate);
    let before = loads(&gate);
    let bypass = gate.any_ready().expect("full pods still take bypass calls");
    assert_eq!(bypass.endpoint, pods[0], "ties go to the earliest pod");
    assert_eq!(loads(&gate), before);
    assert_eq!(gate.endpoints().iter().map(|e| e.served).sum::<u64>(), 2);
}

#[test]
fn any_ready_is_none_without_a_ready_pod() {
    let mut gate: Gate<()> = Gate::new(1, 1);
    assert_eq!(gate.any_ready(), None);
    let pod = gate.add_endpoint(addr(0));
    assert_eq!(gate.any_ready(), None);
    gate.set_ready(pod, true);
    assert_eq!(gate.any_ready().map(|g| g.endpoint), Some(pod));
}

// ---------------------------------------------------------------------------
// oldest_wait and accounting
// ---------------------------------------------------------------------------

#[test]
fn oldest_wait_measures_how_long_the_first_waiter_has_waited() {
    let start = Instant::now();
    let (mut gate, pods) = gate_with(1, 10, 1);
    assert_eq!(gate.oldest_wait(start), None);
    admit(&mut gate);
    let first = wait(&mut gate, start);
    wait(&mut gate, start + Duration::from_secs(2));
    assert_eq!(gate.oldest_wait(start + Duration::from_secs(5)), Some(Duration::from_secs(5)));

    assert_eq!(gate.cancel(first), Some(first));
    assert_eq!(gate.oldest_wait(start + Duration::from_secs(5)), Some(Duration::from_secs(3)));
    // A clock reading from before the waiter arrived does not panic.
    assert_eq!(gate.oldest_wait(start), Some(Duration::ZERO));

    gate.release(pods[0]);
    drain(&mut gate);
    assert_eq!(gate.oldest_wait(start + Duration::from_secs(9)), None);
}

#[test]
fn the_counters_track_grants_waiters_and_readiness() {
    let now = Instant::now();
    let mut gate: Gate<Ticket> = Gate::new(2, 10);
    assert_eq!((gate.inflight(), gate.queue_depth(), gate.ready_count()), (0, 0, 0));
    let a = gate.add_endpoint(addr(0));
    let b = gate.add_endpoint(addr(1));
    assert_eq!((gate.endpoints().len(), gate.ready_count()), (2, 0));
    gate.set_ready(a, true);
    assert_eq!(gate.ready_count(), 1);

    admit(&mut gate);
    admit(&mut gate);
    wait(&mut gate, now);
    wait(&mut gate, now);
    assert_eq!((gate.inflight(), gate.queue_depth()), (2, 2));

    gate.set_ready(b, true);
    assert_eq!(gate.ready_count(), 2);
    assert_eq!(drain(&mut gate).len(), 2);
    assert_eq!((gate.inflight(), gate.queue_depth()), (4, 0));

    gate.release(a);
    gate.release(b);
    assert_eq!(gate.inflight(), 2);
    gate.remove_endpoint(b);
    assert_eq!((gate.inflight(), gate.ready_count(), gate.endpoints().len()), (1, 1, 1));
    gate.release(a);
    assert_eq!(gate.inflight(), 0);
}

#[test]
fn served_counts_every_grant_over_a_pods_life() {
    let now = Instant::now();
    let (mut gate, pods) = gate_with(1, 10, 1);
    admit(&mut gate);
    wait(&mut gate, now);
    for _ in 0..3 {
        gate.release(pods[0]);
        drain(&mut gate);
        let ticket = gate.arrive();
        gate.enqueue(ticket, ticket, now).unwrap();
    }
    let endpoint = gate.endpoint(pods[0]).unwrap();
    assert_eq!((endpoint.served, endpoint.inflight), (4, 1));
}

#[test]
fn next_grant_without_waiters_grants_nothing() {
    let (mut gate, _) = gate_with(1, 10, 2);
    assert!(gate.next_grant().is_none());
    assert_eq!(gate.inflight(), 0);
}

#[test]
fn next_grant_keeps_the_waiter_while_every_pod_is_full() {
    let now = Instant::now();
    let (mut gate, _) = gate_with(1, 10, 2);
    admit(&mut gate);
    admit(&mut gate);
    let waiter = wait(&mut gate, now);
    for _ in 0..3 {
        assert!(gate.next_grant().is_none());
    }
    assert_eq!(gate.queue_depth(), 1);
    assert_eq!(gate.cancel(waiter), Some(waiter));
}

// ---------------------------------------------------------------------------
// Draining (scale-down) and arrivals
// ---------------------------------------------------------------------------

#[test]
fn a_draining_pod_finishes_its_requests_but_takes_no_new_ones() {
    let now = Instant::now();
    let (mut gate, pods) = gate_with(2, 10, 1);
    admit(&mut gate);
    gate.set_draining(pods[0]);
    let endpoint = gate.endpoint(pods[0]).unwrap();
    assert!(endpoint.ready && endpoint.draining && !endpoint.is_serving());
    assert_eq!(endpoint.inflight, 1);
    assert_eq!(gate.ready_count(), 0, "a draining pod does not count as ready");

    let waiter = wait(&mut gate, now);
    gate.release(pods[0]);
    assert!(drain(&mut gate).is_empty(), "room on a draining pod is not handed out");
    assert_eq!(gate.inflight(), 0);
    assert_eq!(gate.cancel(waiter), Some(waiter));
}

#[test]
fn a_draining_pod_stays_draining_when_its_probe_passes_again() {
    let (mut gate, pods) = gate_with(1, 10, 1);
    gate.set_draining(pods[0]);
    assert!(gate.set_ready(pods[0], false));
    gate.set_ready(pods[0], true);
    assert!(gate.endpoint(pods[0]).unwrap().draining);
    let ticket = gate.arrive();
    assert!(gate.try_dispatch(ticket).is_none());
    assert_eq!(gate.any_ready(), None, "bypass calls avoid a draining pod too");
}

#[test]
fn waiters_go_to_the_pods_that_are_not_draining() {
    let now = Instant::now();
    for cc in [0, 1, 4] {
        let (mut gate, pods) = gate_with(cc, 10, 3);
        gate.set_draining(pods[0]);
        gate.set_draining(pods[2]);
        for _ in 0..6 {
            let ticket = gate.arrive();
            match gate.try_dispatch(ticket) {
                Some(grant) => assert_eq!(grant.endpoint, pods[1], "cc={cc}"),
                None => gate.enqueue(ticket, ticket, now).unwrap(),
            }
        }
        gate.release(pods[1]);
        assert!(drain(&mut gate).iter().all(|(_, grant)| grant.endpoint == pods[1]));
        assert_eq!(inflight_of(&gate, pods[0]) + inflight_of(&gate, pods[2]), 0);
        assert_eq!(gate.any_ready().map(|g| g.endpoint), Some(pods[1]));
    }
}

#[test]
fn draining_an_unknown_pod_changes_nothing() {
    let (mut gate, pods) = gate_with(1, 10, 1);
    gate.set_draining(EndpointId(404));
    assert!(gate.endpoint(pods[0]).unwrap().is_serving());
    assert_eq!(gate.ready_count(), 1);
}

#[test]
fn arrivals_count_every_ticket_handed_out() {
    let now = Instant::now();
    let (mut gate, _) = gate_with(1, 1, 1);
    assert_eq!(gate.arrivals(), 0);
    admit(&mut gate);
    wait(&mut gate, now);
    let refused = gate.arrive();
    assert!(gate.enqueue(refused, refused, now).is_err());
    assert_eq!(gate.arrivals(), 3, "refused requests arrived too");
}

// ---------------------------------------------------------------------------
// Randomized model check
// ---------------------------------------------------------------------------

/// One endpoint as the test believes it to be.
struct Pod {
    id: EndpointId,
    addr: SocketAddr,
    ready: bool,
    draining: bool,
    served: u64,
    /// Grants the test holds on this pod.
    load: u32,
}

impl Pod {
    fn serving(&self) -> bool {
        self.ready && !self.draining
    }
}

/// How often the random walk reached the states worth checking.
#[derive(Default, Debug)]
struct Stats {
    queue_full: u32,
    granted_from_queue: u32,
    retried_ahead_of_waiters: u32,
    removed_with_inflight: u32,
    saturated_with_waiters: u32,
}

/// Drives a gate with random operations, keeping its own account of what the
/// gate should hold, and checks every promise after every step.
struct Model {
    gate: Gate<Ticket>,
    capacity: u32,
    max_depth: usize,
    /// In the gate's order (insertion order).
    pods: Vec<Pod>,
    /// Grants the test holds and has not released; some may be on removed pods.
    held: Vec<(Ticket, Grant)>,
    /// Waiters and when they joined the queue.
    queued: BTreeMap<Ticket, Instant>,
    arrivals: u64,
    last_ticket: Option<Ticket>,
    last_endpoint: Option<EndpointId>,
    rng: fastrand::Rng,
    now: Instant,
    addrs: u16,
    stats: Stats,
}

impl Model {
    fn new(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let capacity = [0, 1, 2, 3, 4, 5][rng.usize(..6)];
        let max_depth = [0, 1, 3, 8, 64][rng.usize(..5)];
        Self {
            gate: Gate::new(capacity, max_depth),
            capacity,
            max_depth,
            pods: Vec::new(),
            held: Vec::new(),
            queued: BTreeMap::new(),
            arrivals: 0,
            last_ticket: None,
            last_endpoint: None,
            rng,
            now: Instant::now(),
            addrs: 0,
            stats: Stats::default(),
        }
    }

    fn pod_mut(&mut self, id: EndpointId) -> Option<&mut Pod> {
        self.pods.iter_mut().find(|pod| pod.id == id)
    }

    fn has_room(&self, pod: &Pod) -> bool {
        pod.serving() && (self.capacity == 0 || pod.load < self.capacity)
    }

    fn any_room(&self) -> bool {
        self.pods.iter().any(|pod| self.has_room(pod))
    }

    /// Gives back a random held grant; the gate is not told yet.
    fn take_held(&mut self) -> (Ticket, Grant) {
        let (ticket, grant) = self.held.swap_remove(self.rng.usize(..self.held.len()));
        if let Some(pod) = self.pod_mut(grant.endpoint) {
            pod.load -= 1;
        }
        (ticket, grant)
    }

    /// Checks a grant against capacity, policy and FIFO, before it is recorded.
    fn check_choice(&self, ticket: Ticket, grant: Grant) {
        let rooms: Vec<(EndpointId, u32)> =
            self.pods.iter().filter(|pod| self.has_room(pod)).map(|pod| (pod.id, pod.load)).collect();
        let pod = self.pods.iter().find(|pod| pod.id == grant.endpoint).expect("granted a known pod");
        assert_eq!(grant.addr, pod.addr);
        assert!(
            self.has_room(pod),
            "{ticket:?} granted {:?}, which had no room (cap {}, ready {}, draining {}, load {})",
            pod.id,
            self.capacity,
            pod.ready,
            pod.draining,
            pod.load
        );
        match self.gate.policy() {
            Policy::FirstAvailable => assert_eq!(grant.endpoint, rooms[0].0, "first available"),
            Policy::LeastLoaded => {
                let least = rooms.iter().min_by_key(|(_, load)| *load).unwrap();
                assert_eq!(grant.endpoint, least.0, "least loaded among {rooms:?}");
            }
            Policy::PowerOfTwoChoices => {
                // The less loaded of two distinct candidates: never the only
                // busiest pod when there are two to compare.
                if rooms.len() >= 2 {
                    assert!(
                        rooms.iter().any(|(id, other)| *id != grant.endpoint && *other >= pod.load),
                        "p2c chose the busiest pod {:?} among {rooms:?}",
                        grant.endpoint
                    );
                }
            }
        }
        // FIFO: nobody who arrived earlier is still waiting.
        if let Some((&head, _)) = self.queued.first_key_value() {
            assert!(ticket < head, "{ticket:?} granted while {head:?} waits");
        }
    }

    fn record(&mut self, ticket: Ticket, grant: Grant) {
        self.check_choice(ticket, grant);
        let pod = self.pod_mut(grant.endpoint).expect("granted a known pod");
        pod.served += 1;
        pod.load += 1;
        self.held.push((ticket, grant));
    }

    /// Hands freed room to waiters, as the async layer does.
    fn drain(&mut self) {
        while let Some((ticket, grant)) = self.gate.next_grant() {
            let (&head, _) = self.queued.first_key_value().expect("granted from an empty queue");
            assert_eq!(ticket, head, "next_grant serves the earliest ticket");
            self.queued.remove(&ticket);
            self.record(ticket, grant);
            self.stats.granted_from_queue += 1;
        }
        assert!(self.queued.is_empty() || !self.any_room(), "drained while a waiter could be served");
    }

    /// A request (new or retried) asks for a pod, and waits if it gets none.
    fn request(&mut self, ticket: Ticket) {
        let head = self.queued.keys().next().copied();
        let first_in_line = head.is_none_or(|head| ticket < head);
        let expect_grant = first_in_line && self.any_room();
        match self.gate.try_dispatch(ticket) {
            Some(grant) => {
                assert!(expect_grant, "{ticket:?} dispatched although it should wait");
                self.record(ticket, grant);
            }
            None => {
                assert!(!expect_grant, "{ticket:?} refused although it is first and a pod has room");
                match self.gate.enqueue(ticket, ticket, self.now) {
                    Ok(()) => {
                        assert!(self.queued.len() < self.max_depth, "queue grew past its depth");
                        if head.is_some_and(|head| ticket < head) {
                            self.stats.retried_ahead_of_waiters += 1;
                        }
                        self.queued.insert(ticket, self.now);
                    }
                    Err(QueueFull(waiter)) => {
                        assert_eq!(waiter, ticket, "the refused waiter comes back");
                        assert_eq!(self.queued.len(), self.max_depth, "refused with room");
                        self.stats.queue_full += 1;
                    }
                }
            }
        }
    }

    /// A new request takes its ticket.
    fn arrive(&mut self) -> Ticket {
        let ticket = self.gate.arrive();
        self.arrivals += 1;
        assert!(self.last_ticket.is_none_or(|last| ticket > last));
        self.last_ticket = Some(ticket);
        ticket
    }

    fn random_pod(&mut self) -> Option<usize> {
        (!self.pods.is_empty()).then(|| self.rng.usize(..self.pods.len()))
    }

    fn step(&mut self) {
        self.now += Duration::from_millis(self.rng.u64(1..50));
        match self.rng.u32(0..100) {
            // A new request arrives.
            0..=31 => {
                let ticket = self.arrive();
                self.request(ticket);
            }
            // A request finishes; sometimes it failed to connect and retries
            // with its ticket.
            32..=63 => {
                if self.held.is_empty() {
                    return;
                }
                let (ticket, grant) = self.take_held();
                self.gate.release(grant.endpoint);
                if self.rng.u32(0..4) == 0 {
                    // Someone asks between the release and the hand-over:
                    // the gate alone must keep the queue's order.
                    let ticket = if self.rng.bool() { ticket } else { self.arrive() };
                    self.request(ticket);
                    self.drain();
                    return;
                }
                self.drain();
                if self.rng.u32(0..5) == 0 {
                    self.request(ticket);
                }
            }
            // A waiter gives up; or a granted request gives up too late.
            64..=70 => {
                if !self.queued.is_empty() && self.rng.bool() {
                    let nth = self.rng.usize(..self.queued.len());
                    let ticket = *self.queued.keys().nth(nth).unwrap();
                    assert_eq!(self.gate.cancel(ticket), Some(ticket));
                    self.queued.remove(&ticket);
                } else if !self.held.is_empty() {
                    let (ticket, _) = self.held[self.rng.usize(..self.held.len())];
                    if !self.queued.contains_key(&ticket) {
                        assert_eq!(self.gate.cancel(ticket), None);
                    }
                }
            }
            // A pod appears, not ready.
            71..=77 => {
                if self.pods.len() >= 6 {
                    return;
                }
                self.addrs += 1;
                let addr = addr(self.addrs);
                let id = self.gate.add_endpoint(addr);
                assert!(self.last_endpoint.is_none_or(|last| id > last), "id reused");
                self.last_endpoint = Some(id);
                let (ready, draining, served, load) = (false, false, 0, 0);
                self.pods.push(Pod { id, addr, ready, draining, served, load });
            }
            // A probe passes.
            78..=88 => {
                let Some(index) = self.random_pod() else {
                    return;
                };
                let changed = self.gate.set_ready(self.pods[index].id, true);
                assert_eq!(changed, !self.pods[index].ready);
                self.pods[index].ready = true;
                self.drain();
            }
            // A probe fails.
            89..=93 => {
                let Some(index) = self.random_pod() else {
                    return;
                };
                let changed = self.gate.set_ready(self.pods[index].id, false);
                assert_eq!(changed, self.pods[index].ready);
                self.pods[index].ready = false;
            }
            // A pod is being scaled away.
            94..=95 => {
                let Some(index) = self.random_pod() else {
                    return;
                };
                self.gate.set_draining(self.pods[index].id);
                self.pods[index].draining = true;
            }
            // A pod goes away, maybe with requests in flight.
            96..=98 => {
                let Some(index) = self.random_pod() else {
                    return;
                };
                let pod = self.pods.remove(index);
                let removed = self.gate.remove_endpoint(pod.id).expect("a known pod");
                assert_eq!(removed.id, pod.id);
                assert_eq!(removed.inflight, pod.load);
                assert_eq!(removed.served, pod.served);
                if removed.inflight > 0 {
                    self.stats.removed_with_inflight += 1;
                }
            }
            // Noise: releases and cancels for things the gate never knew.
            _ => {
                self.gate.release(EndpointId(u64::MAX));
                self.gate.set_draining(EndpointId(u64::MAX));
                assert_eq!(self.gate.cancel(Ticket { key: u64::MAX, seq: u64::MAX, start: u64::MAX }), None);
            }
        }
    }

    fn check(&self) {
        let capacity = self.capacity;
        let endpoints = self.gate.endpoints();
        assert_eq!(endpoints.len(), self.pods.len());
        let mut total = 0;
        for (endpoint, pod) in endpoints.iter().zip(&self.pods) {
            assert_eq!(endpoint.id, pod.id);
            assert_eq!(endpoint.addr, pod.addr);
            assert_eq!(endpoint.ready, pod.ready);
            assert_eq!(endpoint.draining, pod.draining);
            assert_eq!(endpoint.is_serving(), pod.serving());
            assert_eq!(endpoint.served, pod.served, "{:?} served", pod.id);
            let held = self.held.iter().filter(|(_, grant)| grant.endpoint == pod.id).count() as u32;
            assert_eq!(held, pod.load, "the test's own account of {:?}", pod.id);
            assert_eq!(endpoint.inflight, held, "{:?} in flight vs grants held", pod.id);
            assert!(capacity == 0 || endpoint.inflight <= capacity, "{:?} over capacity {capacity}", pod.id);
            total += held;
        }
        assert_eq!(self.gate.inflight(), total);
        let serving = self.pods.iter().filter(|pod| pod.serving()).count();
        assert_eq!(self.gate.ready_count(), serving);
        assert_eq!(self.gate.arrivals(), self.arrivals);

        assert_eq!(self.gate.queue_depth(), self.queued.len());
        assert!(self.gate.queue_depth() <= self.max_depth);
        assert!(self.queued.is_empty() || !self.any_room(), "work-conserving: a waiter waits while a pod has room");
        // The longest wait, which is not always the first in line's: a retry
        // goes back to its old place with a fresh wait.
        let oldest = self.queued.values().min().map(|&since| self.now.saturating_duration_since(since));
        assert_eq!(self.gate.oldest_wait(self.now), oldest);

        match self.gate.any_ready() {
            None => assert_eq!(serving, 0),
            Some(grant) => {
                let least = self.pods.iter().filter(|pod| pod.serving()).map(|pod| pod.load).min();
                let pod = self.pods.iter().find(|pod| pod.id == grant.endpoint).expect("a known pod");
                assert!(pod.serving(), "any_ready chose {:?}, which takes nothing", pod.id);
                assert_eq!(Some(pod.load), least, "any_ready picks the least loaded");
                assert_eq!(grant.addr, pod.addr);
            }
        }
    }

    /// Traffic stops: every grant is released (and handed on), every waiter
    /// left gives up, and nothing is left in flight.
    fn wind_down(&mut self) {
        while !self.held.is_empty() {
            let (_, grant) = self.take_held();
            self.gate.release(grant.endpoint);
            self.drain();
            self.check();
        }
        assert_eq!(self.gate.inflight(), 0);
        assert!(self.gate.endpoints().iter().all(|e| e.inflight == 0));
        for ticket in std::mem::take(&mut self.queued).into_keys() {
            assert_eq!(self.gate.cancel(ticket), Some(ticket));
        }
        assert_eq!(self.gate.queue_depth(), 0);
        assert_eq!(self.gate.oldest_wait(self.now), None);
    }
}

#[test]
fn random_operations_never_break_the_gates_promises() {
    let mut total = Stats::default();
    for seed in 0..200 {
        let mut model = Model::new(seed);
        for _ in 0..2000 {
            model.step();
            model.check();
            if model.capacity > 0 && !model.queued.is_empty() && !model.pods.is_empty() {
                model.stats.saturated_with_waiters += 1;
            }
        }
        model.wind_down();
        total.queue_full += model.stats.queue_full;
        total.granted_from_queue += model.stats.granted_from_queue;
        total.retried_ahead_of_waiters += model.stats.retried_ahead_of_waiters;
        total.removed_with_inflight += model.stats.removed_with_inflight;
        total.saturated_with_waiters += model.stats.saturated_with_waiters;
    }
    // Guards the check itself against a walk that never stresses the gate.
    assert!(total.queue_full > 1000, "{total:?}");
    assert!(total.granted_from_queue > 10_000, "{total:?}");
    assert!(total.retried_ahead_of_waiters > 100, "{total:?}");
    assert!(total.removed_with_inflight > 100, "{total:?}");
    assert!(total.saturated_with_waiters > 10_000, "{total:?}");
}

#[test]
fn a_quarantined_pod_takes_nothing_even_with_room_and_serves_once_every_quarantine_ended() {
    let (mut gate, pods) = gate_with(2, 10, 1);
    let first = admit(&mut gate);
    gate.quarantine(pods[0], true);
    let ticket = gate.arrive();
    assert!(gate.try_dispatch(ticket).is_none(), "room for a second, but quarantined");
    gate.enqueue(ticket, ticket, Instant::now()).unwrap();
    assert!(gate.next_grant().is_none());
    gate.quarantine(pods[0], true);
    gate.quarantine(pods[0], false);
    assert!(gate.next_grant().is_none(), "one quarantine still open");
    gate.quarantine(pods[0], false);
    assert_eq!(gate.next_grant().map(|(t, _)| t), Some(ticket));
    gate.release(first.endpoint);
}

#[test]
fn failures_count_in_a_row_and_an_answer_in_full_ends_the_run() {
    let (mut gate, pods) = gate_with(1, 10, 1);
    assert_eq!(gate.record_failure(pods[0]), 1);
    assert_eq!(gate.record_failure(pods[0]), 2);
    let grant = admit(&mut gate);
    gate.release_answered(grant.endpoint);
    assert_eq!(inflight_of(&gate, pods[0]), 0);
    assert_eq!(gate.record_failure(pods[0]), 1, "the answer ended the run");
}

#[test]
fn a_drain_called_off_serves_again() {
    let (mut gate, pods) = gate_with(1, 10, 1);
    gate.set_draining(pods[0]);
    assert_eq!(gate.ready_count(), 0);
    gate.undrain(pods[0]);
    assert_eq!(gate.ready_count(), 1);
}

// ---------------------------------------------------------------------------
// Fair share between clients, and priority classes.
// ---------------------------------------------------------------------------

/// One pod at cc=1, busy; requests of (client, class) arrive in `arrivals`
/// order and wait; returns the clients in the order the pod serves them.
fn served_order(arrivals: &[(ClientKey, Priority)], batch_delay: u64) -> Vec<ClientKey> {
    let (mut gate, ids) = gate_with(1, 1000, 1);
    gate.set_batch_delay(batch_delay);
    let now = Instant::now();
    let busy = admit(&mut gate);
    let mut clients = BTreeMap::new();
    for &(client, priority) in arrivals {
        let ticket = gate.arrive_from(Some(client), priority);
        assert!(gate.try_dispatch(ticket).is_none());
        gate.enqueue_from(ticket, None, Some(client), priority, ticket, now).unwrap();
        clients.insert(ticket, client);
    }
    let mut order = Vec::new();
    gate.release(busy.endpoint);
    while let Some((ticket, grant)) = gate.next_grant() {
        order.push(clients[&ticket]);
        gate.release(grant.endpoint);
    }
    assert_eq!(order.len(), arrivals.len());
    assert_eq!(ids.len(), 1);
    order
}

#[test]
fn a_light_client_waits_behind_one_request_of_a_greedy_one_not_all_forty() {
    const GREEDY: ClientKey = 1;
    const LIGHT: ClientKey = 2;
    let mut arrivals = vec![(GREEDY, Priority::Interactive); 40];
    arrivals.push((LIGHT, Priority::Interactive));
    let order = served_order(&arrivals, DEFAULT_BATCH_DELAY);
    let light_at = order.iter().position(|&c| c == LIGHT).unwrap();
    assert!(light_at <= 1, "the light client is served at place {light_at}: {order:?}");
}

#[test]
fn waiting_clients_are_served_round_robin_and_each_in_its_own_order() {
    let mut arrivals = Vec::new();
    for client in [1, 2, 3] {
        arrivals.extend(std::iter::repeat_n((client, Priority::Interactive), 4));
    }
    let order = served_order(&arrivals, DEFAULT_BATCH_DELAY);
    assert_eq!(order, [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3]);
}

#[test]
fn one_clients_requests_keep_arrival_order() {
    let (mut gate, _) = gate_with(1, 100, 1);
    let now = Instant::now();
    let busy = admit(&mut gate);
    let tickets: Vec<Ticket> = (0..10).map(|_| gate.arrive_from(Some(7), Priority::Interactive)).collect();
    for &ticket in tickets.iter().rev() {
        gate.enqueue_from(ticket, None, Some(7), Priority::Interactive, ticket, now).unwrap();
    }
    assert_eq!(gate.waiting_of(7), 10);
    assert_eq!(gate.waiting_clients(), 1);
    gate.release(busy.endpoint);
    let mut served = Vec::new();
    while let Some((ticket, grant)) = gate.next_grant() {
        served.push(ticket);
        gate.release(grant.endpoint);
    }
    assert_eq!(served, tickets);
    assert_eq!((gate.waiting_of(7), gate.waiting_clients()), (0, 0));
}

#[test]
fn interactive_requests_go_before_a_batch_flood_which_still_gets_its_turn() {
    const BATCH: ClientKey = 1;
    const USER: ClientKey = 2;
    let mut arrivals = vec![(BATCH, Priority::Batch); 10];
    arrivals.extend(std::iter::repeat_n((USER, Priority::Interactive), 30));
    let order = served_order(&arrivals, 5);
    // The user's first five go first; then a batch request takes its turn
    // each time the user has had one (nothing starves).
    assert_eq!(&order[..5], &[USER; 5]);
    let first_batch = order.iter().position(|&c| c == BATCH).unwrap();
    assert!(first_batch <= 6, "{order:?}");
    let batch_done = order.iter().rposition(|&c| c == BATCH).unwrap();
    assert!(batch_done < 30, "the batch flood is not starved by the user: {order:?}");
}

#[test]
fn the_fairness_table_forgets_clients_that_fell_behind() {
    let (mut gate, _) = gate_with(0, 10, 1);
    for client in 0..5000u64 {
        let ticket = gate.arrive_from(Some(client), Priority::Interactive);
        assert!(gate.try_dispatch(ticket).is_some());
    }
    assert!(gate.fairness.finish.len() <= 2048, "{} clients remembered", gate.fairness.finish.len());
}

#[test]
fn removed_endpoints_are_remembered_with_their_counts_one_per_address() {
    let (mut gate, ids) = gate_with(1, 10, 2);
    for _ in 0..3 {
        let grant = admit(&mut gate);
        gate.release_answered(grant.endpoint);
    }
    let grant = admit(&mut gate);
    assert_eq!(gate.record_failure(grant.endpoint), 1);
    gate.release(grant.endpoint);
    let first = gate.endpoint(ids[0]).cloned().unwrap();
    assert_eq!((first.served, first.failed), (4, 1), "FirstAvailable packs onto the first pod");
    gate.remove_endpoint(ids[0]).unwrap();
    let retired: Vec<_> = gate.retired().map(|e| (e.addr, e.served, e.failed)).collect();
    assert_eq!(retired, [(addr(0), 4, 1)]);
    // The same address back and gone again: one entry, the latest.
    let again = gate.add_endpoint(addr(0));
    gate.remove_endpoint(again).unwrap();
    let retired: Vec<_> = gate.retired().map(|e| (e.addr, e.served)).collect();
    assert_eq!(retired, [(addr(0), 0)]);
    // Bounded: the oldest go first.
    for n in 10..40 {
        let id = gate.add_endpoint(addr(n));
        gate.remove_endpoint(id).unwrap();
    }
    let retired: Vec<_> = gate.retired().map(|e| e.addr).collect();
    assert_eq!(retired.len(), 16);
    assert_eq!(retired[0], addr(24));
    assert_eq!(retired[15], addr(39));
}

// ---------------------------------------------------------------------------
// Checkpoints: a pod that holds the wanted one first; wait for one when that
// is cheaper than a load; else load on the pod the queue wants least.
// ---------------------------------------------------------------------------

/// Pods holding these checkpoints, all ready, each checkpoint asked for
/// lately (in use).
fn gate_holding(capacity: u32, held: &[&str]) -> (Gate<Ticket>, Vec<EndpointId>) {
    let (mut gate, pods) = gate_with(capacity, 100, held.len() as u16);
    for (pod, name) in pods.iter().zip(held) {
        gate.set_checkpoint(*pod, name);
        let model = gate.checkpoint(name).expect("room");
        let asked = gate.arrive();
        gate.models.asked(model, asked.seq);
    }
    (gate, pods)
}

fn want(gate: &mut Gate<Ticket>, name: &str) -> Option<Want> {
    gate.checkpoint(name).map(|model| Want { model, keep: false })
}

/// A new request for `name`: granted at once, or queued.
fn request_for(gate: &mut Gate<Ticket>, name: &str, now: Instant) -> Result<Grant, Ticket> {
    let wanted = want(gate, name);
    let ticket = gate.arrive();
    match gate.try_dispatch_for(ticket, None, wanted, true) {
        Some(grant) => Ok(grant),
        None => {
            let queued = Queued { want: wanted, patient: true, ..Queued::default() };
            gate.enqueue_request(ticket, queued, ticket, now).expect("room in the queue");
            Err(ticket)
        }
    }
}

fn held_by(gate: &Gate<Ticket>, pod: EndpointId) -> String {
    let model = gate.endpoint(pod).and_then(|e| e.model.holds).expect("a known checkpoint");
    gate.checkpoint_name(model).to_string()
}

#[test]
fn a_request_takes_the_free_pod_that_holds_its_checkpoint_not_the_first_free_one() {
    let (mut gate, pods) = gate_holding(1, &["a", "b", "c"]);
    let now = Instant::now();
    let grant = request_for(&mut gate, "c", now).expect("a free pod");
    assert_eq!((grant.endpoint, grant.load), (pods[2], None));
    let grant = request_for(&mut gate, "b", now).expect("a free pod");
    assert_eq!((grant.endpoint, grant.load), (pods[1], None));
    let plain = admit(&mut gate);
    assert_eq!(plain.endpoint, pods[0], "a request naming none takes the policy's pick");
    assert!(gate.endpoints().iter().all(|e| e.model.loads == 0));
}

#[test]
fn a_request_waits_for_a_busy_pod_holding_its_checkpoint_while_another_takes_the_free_pod() {
    let (mut gate, pods) = gate_holding(1, &["a", "b"]);
    let now = Instant::now();
    let running = request_for(&mut gate, "b", now).expect("b's pod is free");
    let waiting = request_for(&mut gate, "b", now).expect_err("next on b's pod, cheaper than a load");
    assert_eq!(inflight_of(&gate, pods[0]), 0, "a's pod stays free");
    let other = request_for(&mut gate, "a", now).expect("a later request for a takes a's pod");
    assert_eq!(other.endpoint, pods[0]);
    gate.release(other.endpoint);
    assert!(drain(&mut gate).is_empty(), "the waiter for b does not take a's pod");
    gate.release(running.endpoint);
    let granted = drain(&mut gate);
    assert_eq!(granted.len(), 1);
    assert_eq!((granted[0].0, granted[0].1.endpoint, granted[0].1.load), (waiting, pods[1], None));
}

#[test]
fn a_request_loads_its_checkpoint_on_a_free_pod_when_waiting_would_cost_more() {
    let (mut gate, pods) = gate_holding(1, &["a", "b"]);
    // b's pod takes 1 s a generation, a load costs 2 s (the default):
    // second in line for b (2 x 1 s) is no cheaper than a load.
    gate.learn(pods[1], Duration::from_secs(1), false);
    let now = Instant::now();
    let _running = request_for(&mut gate, "b", now).expect("b's pod is free");
    let first = request_for(&mut gate, "b", now).expect_err("1 s for b's pod, cheaper than a 2 s load");
    let second = request_for(&mut gate, "b", now).expect("2 s for b's pod: load b on a's pod instead");
    assert_eq!((second.endpoint, second.load), (pods[0], want(&mut gate, "b").map(|w| w.model)));
    assert_eq!(held_by(&gate, pods[0]), "b");
    assert_eq!(gate.endpoint(pods[0]).map(|e| e.model.loads), Some(1));
    assert_eq!(gate.position(first), Some(0));
}

#[test]
fn a_switch_takes_the_free_pod_whose_checkpoint_the_queue_wants_least() {
    let (mut gate, pods) = gate_holding(1, &["a", "b", "c"]);
    let now = Instant::now();
    // c's pod is busy with a queue for c; a and b's pods are free; one waits for a.
    let _c = request_for(&mut gate, "c", now).expect("free");
    let _a = request_for(&mut gate, "a", now).expect("free");
    let waiting_a = request_for(&mut gate, "a", now).expect_err("next on a's pod");
    let _ = waiting_a;
    // d is held nowhere: it loads on b's pod (nobody waits for b), not a's.
    let d = request_for(&mut gate, "d", now).expect("a free pod");
    assert_eq!(d.endpoint, pods[1]);
    assert_eq!(held_by(&gate, pods[1]), "d");
}

#[test]
fn a_waiter_that_lost_patience_takes_any_pod() {
    let (mut gate, pods) = gate_holding(1, &["a", "b"]);
    let now = Instant::now();
    let _running = request_for(&mut gate, "b", now).expect("free");
    let waiting = request_for(&mut gate, "b", now).expect_err("waits for b's pod");
    assert!(drain(&mut gate).is_empty());
    assert!(gate.lose_patience(waiting));
    let granted = drain(&mut gate);
    assert_eq!(tickets(&granted), vec![waiting]);
    assert_eq!(granted[0].1.endpoint, pods[0], "loads b on a's pod");
    assert!(!gate.lose_patience(waiting), "no longer waiting");
}

#[test]
fn pins_win_over_checkpoints() {
    let (mut gate, pods) = gate_holding(1, &["a", "b"]);
    let wanted = want(&mut gate, "b");
    let ticket = gate.arrive();
    let pin = Some(Pin { endpoint: pods[0], strict: false });
    let grant = gate.try_dispatch_for(ticket, pin, wanted, true).expect("its pod is free");
    assert_eq!(grant.endpoint, pods[0], "the session stays on its pod and loads b there");
    assert_eq!(held_by(&gate, pods[0]), "b");
}

#[test]
fn a_blind_gate_takes_the_first_free_pod_whatever_it_holds() {
    let (mut gate, pods) = gate_holding(1, &["a", "b"]);
    gate.set_model_policy(ModelPolicy { aware: false, ..ModelPolicy::default() });
    let grant = request_for(&mut gate, "b", Instant::now()).expect("free");
    assert_eq!(grant.endpoint, pods[0]);
    assert_eq!(held_by(&gate, pods[0]), "b", "what pods hold is still tracked");
    assert_eq!(gate.endpoint(pods[0]).map(|e| e.model.loads), Some(1));
}

#[test]
fn fair_order_decides_which_waiter_goes_next_among_those_a_pod_suits() {
    let (mut gate, pods) = gate_holding(1, &["a", "b"]);
    let now = Instant::now();
    let on_a = request_for(&mut gate, "a", now).expect("free");
    let on_b = request_for(&mut gate, "b", now).expect("free");
    let first_b = request_for(&mut gate, "b", now).expect_err("busy");
    let first_a = request_for(&mut gate, "a", now).expect_err("busy");
    let second_a = request_for(&mut gate, "a", now).expect_err("busy");
    gate.release(on_a.endpoint);
    // First in line is a b request: it waits for b's pod (next there), so
    // a's pod goes to the first a request, not to the b request.
    assert_eq!(tickets(&drain(&mut gate)), vec![first_a]);
    gate.release(on_b.endpoint);
    assert_eq!(tickets(&drain(&mut gate)), vec![first_b]);
    gate.release(pods[0]);
    assert_eq!(tickets(&drain(&mut gate)), vec![second_a]);
}

#[test]
fn with_several_slots_a_pod_holding_the_checkpoint_is_preferred_least_loaded_first() {
    let (mut gate, pods) = gate_holding(4, &["a", "b", "b"]);
    let now = Instant::now();
    let first = request_for(&mut gate, "b", now).expect("free");
    let second = request_for(&mut gate, "b", now).expect("free");
    assert_eq!((first.endpoint, second.endpoint), (pods[1], pods[2]), "least loaded among b's pods");
    for _ in 0..6 {
        assert_ne!(request_for(&mut gate, "b", now).expect("room").endpoint, pods[0]);
    }
    assert_eq!(loads(&gate), vec![0, 4, 4]);
    let ninth = request_for(&mut gate, "b", now);
    assert!(ninth.is_err(), "next on a b pod: cheaper than a load (no time learned yet)");
}

#[test]
fn a_request_naming_none_changes_nothing_a_pod_is_taken_to_hold() {
    let (mut gate, pods) = gate_holding(1, &["a"]);
    let b = request_for(&mut gate, "b", Instant::now()).expect("free");
    gate.release(b.endpoint);
    let plain = admit(&mut gate);
    assert_eq!((plain.endpoint, plain.load), (pods[0], None));
    assert_eq!(held_by(&gate, pods[0]), "b", "an options GET or a page loads nothing; a generation's answer tells");
    assert_eq!(gate.endpoint(pods[0]).map(|e| e.model.loads), Some(1));
}

#[test]
fn a_pod_holding_a_checkpoint_nobody_asks_for_is_used_rather_than_kept_idle() {
    // Two clients loop on a; b's pod was never asked for: the second a
    // request loads a there rather than wait for a's pod, every time.
    let (mut gate, pods) = gate_holding(1, &["a", "b"]);
    gate.learn(pods[0], Duration::from_millis(500), false);
    let now = Instant::now();
    // While b is recent (as when its pod came up), a's requests wait for a's pod.
    let first = request_for(&mut gate, "a", now).expect("free");
    let mut waiting = Vec::new();
    loop {
        match request_for(&mut gate, "a", now) {
            Err(ticket) => {
                waiting.push(ticket);
                gate.release(first.endpoint);
                let granted = drain(&mut gate);
                assert_eq!(granted.len(), 1);
                assert_eq!(granted[0].1.endpoint, pods[0]);
            }
            Ok(second) => {
                assert_eq!(second.endpoint, pods[1], "b's pod, once b is out of use");
                break;
            }
        }
        assert!(waiting.len() < 20, "b's pod was never used");
    }
    assert!(waiting.len() >= 4, "b stayed in use a while: {}", waiting.len());
    assert_eq!(held_by(&gate, pods[1]), "a");
    // A pod whose checkpoint is not known is used at once too.
    let (mut gate, pods) = gate_holding(1, &["a"]);
    let unknown = gate.add_endpoint(addr(9));
    gate.set_ready(unknown, true);
    let _busy = request_for(&mut gate, "a", now).expect("free");
    let next = request_for(&mut gate, "a", now).expect("the unknown pod");
    assert_eq!((next.endpoint, next.load), (unknown, None));
    assert_eq!(pods.len(), 1);
}

#[test]
fn a_pod_holding_a_checkpoint_in_use_is_kept_for_it() {
    let (mut gate, pods) = gate_holding(1, &["a", "b"]);
    let now = Instant::now();
    // b was asked for lately (and answered): its pod is kept for it.
    let b = request_for(&mut gate, "b", now).expect("free");
    gate.release(b.endpoint);
    let _a = request_for(&mut gate, "a", now).expect("free");
    assert!(request_for(&mut gate, "a", now).is_err(), "next on a's pod, cheaper than a load; b is in use");
    assert_eq!(held_by(&gate, pods[1]), "b");
}

#[test]
fn a_pod_idle_while_requests_wait_is_overdue_after_its_bound() {
    let by_load = ModelPolicy { max_idle: Duration::from_secs(5), idle_by_load: true, ..ModelPolicy::default() };
    let (mut gate, pods) = gate_holding(1, &["a", "b"]);
    gate.set_model_policy(by_load);
    let now = Instant::now();
    assert_eq!(gate.note_idle(|| unreachable!("nothing waits: no clock read")), (false, None));
    let running = request_for(&mut gate, "b", now).expect("b's pod is free");
    let waiting = request_for(&mut gate, "b", now).expect_err("next on b's pod");
    // a's pod idles while the request waits: its spell starts now, bounded
    // by the default switch_cost (2 s), cheaper than max_idle.
    assert_eq!(gate.note_idle(|| now), (false, Some(now + Duration::from_secs(2))));
    assert_eq!(gate.note_idle(|| now + Duration::from_millis(1999)), (false, Some(now + Duration::from_secs(2))));
    assert!(drain(&mut gate).is_empty());
    assert_eq!(gate.note_idle(|| now + Duration::from_secs(2)), (true, None));
    let granted = drain(&mut gate);
    assert_eq!(granted.len(), 1);
    assert_eq!((granted[0].0, granted[0].1.endpoint), (waiting, pods[0]), "the waiter loads b on a's pod");
    assert_eq!(gate.endpoint(pods[0]).map(|e| (e.idle_since, e.overdue)), Some((None, false)));
    gate.release(running.endpoint);
    gate.release(granted[0].1.endpoint);
    assert_eq!(gate.note_idle(|| now), (false, None), "nobody waits: spells end");

    // A learned load time bounds the spell instead, and max_idle bounds both.
    let (mut gate, pods) = gate_holding(1, &["a", "b"]);
    gate.set_model_policy(by_load);
    gate.learn(pods[0], Duration::from_millis(200), false);
    gate.learn(pods[0], Duration::from_millis(900), true);
    let load = gate.endpoint(pods[0]).and_then(|e| e.model.load).expect("a learned load");
    let _running = request_for(&mut gate, "b", now).expect("b's pod is free");
    let _waiting = request_for(&mut gate, "b", now).expect_err("next on b's pod");
    assert_eq!(gate.note_idle(|| now), (false, Some(now + load)));
    gate.set_model_policy(ModelPolicy { max_idle: Duration::from_millis(100), ..by_load });
    assert_eq!(gate.note_idle(|| now), (false, Some(now + Duration::from_millis(100))));
    // By default the bound is max_idle alone (max_wait_for_match).
    gate.set_model_policy(ModelPolicy { max_idle: Duration::from_secs(5), ..ModelPolicy::default() });
    assert_eq!(gate.note_idle(|| now), (false, Some(now + Duration::from_secs(5))));
}

#[test]
fn with_one_checkpoint_every_dispatch_is_the_blind_one() {
    for capacity in [1, 2, 4] {
        let (mut aware, pods) = gate_holding(capacity, &["a", "a", "a"]);
        let (mut blind, _) = gate_holding(capacity, &["a", "a", "a"]);
        blind.set_model_policy(ModelPolicy { aware: false, ..ModelPolicy::default() });
        let mut rng = fastrand::Rng::with_seed(22);
        let now = Instant::now();
        for step in 0..2000 {
            if rng.bool() || aware.queue_depth() >= 50 {
                let pod = pods[rng.usize(..pods.len())];
                if inflight_of(&aware, pod) > 0 {
                    aware.learn(pod, Duration::from_millis(rng.u64(100..300)), false);
                    aware.release(pod);
                    blind.release(pod);
                    assert_eq!(drain(&mut aware), drain(&mut blind), "step {step}");
                }
            } else {
                let got = request_for(&mut aware, "a", now);
                assert_eq!(got, request_for(&mut blind, "a", now), "step {step}");
            }
            assert_eq!(loads(&aware), loads(&blind));
        }
        assert!(aware.endpoints().iter().all(|e| e.model.loads == 0));
    }
}
