//! The one drain policy every provider uses to pick what to scale away:
//! idle before busy, not ready (still starting, or failing) before ready,
//! fewest live sessions, then the highest key (the newest worker or pod).

/// One endpoint that could be scaled away, as the policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate<K> {
    /// The provider's own name for it (worker index, pod name...).
    pub key: K,
    pub idle: bool,
    pub not_ready: bool,
    pub sessions: usize,
}

/// Orders all candidates, cheapest to lose first.
pub fn order<K: Ord>(candidates: impl IntoIterator<Item = Candidate<K>>) -> Vec<K> {
    let mut all: Vec<Candidate<K>> = candidates.into_iter().collect();
    all.sort_by(|a, b| {
        (b.idle, b.not_ready, std::cmp::Reverse(b.sessions))
            .cmp(&(a.idle, a.not_ready, std::cmp::Reverse(a.sessions)))
            .then_with(|| b.key.cmp(&a.key))
    });
    all.into_iter().map(|c| c.key).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(key: u32, idle: bool, not_ready: bool, sessions: usize) -> Candidate<u32> {
        Candidate { key, idle, not_ready, sessions }
    }

    #[test]
    fn idle_goes_before_busy() {
        assert_eq!(order([c(1, true, false, 5), c(2, false, true, 0)]), vec![1, 2]);
    }

    #[test]
    fn among_idle_a_pod_still_starting_goes_first() {
        assert_eq!(order([c(1, true, true, 0), c(2, true, false, 0)]), vec![1, 2]);
    }

    #[test]
    fn then_the_one_with_fewest_sessions_then_the_newest() {
        assert_eq!(order([c(1, true, false, 0), c(2, true, false, 3)]), vec![1, 2]);
        assert_eq!(order([c(1, true, false, 0), c(2, true, false, 0)]), vec![2, 1]);
    }

    #[test]
    fn every_rule_at_once() {
        let all = [c(1, false, false, 0), c(2, true, false, 2), c(3, true, false, 0), c(4, true, true, 9)];
        assert_eq!(order(all), vec![4, 3, 2, 1]);
        assert!(order(Vec::<Candidate<u32>>::new()).is_empty());
    }
}
