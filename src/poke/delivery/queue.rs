//! The pending-spaces queue: each changed space at most once, oldest first, bounded (a full
//! queue drops its oldest space), plus the batch the worker holds in flight.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use crate::protocol::SpaceId;

pub(super) struct PendingPoke {
    pub(super) space: SpaceId,
    /// The earliest commit this poke announces (for the latency log).
    pub(super) committed_at: Instant,
}

/// Spaces waiting for a poke, oldest first, each at most once; plus what the worker holds.
pub(super) struct PokeQueue {
    order: VecDeque<SpaceId>,
    committed_at: HashMap<SpaceId, Instant>,
    capacity: usize,
    accepting: bool,
    in_flight: usize,
}

/// What became of a changed space offered to the queue.
pub(super) enum Insert {
    Queued,
    AlreadyPending,
    QueuedDroppingOldest(SpaceId),
    Refused,
}

impl PokeQueue {
    pub(super) fn new(capacity: usize) -> Self {
        PokeQueue {
            order: VecDeque::new(),
            committed_at: HashMap::new(),
            capacity: capacity.max(1),
            accepting: true,
            in_flight: 0,
        }
    }

    pub(super) fn insert(&mut self, space: &SpaceId, committed_at: Instant) -> Insert {
        if !self.accepting {
            return Insert::Refused;
        }
        if let Some(earliest) = self.committed_at.get_mut(space) {
            *earliest = (*earliest).min(committed_at);
            return Insert::AlreadyPending;
        }
        let dropped = if self.order.len() >= self.capacity {
            self.pop_oldest().map(|poke| poke.space)
        } else {
            None
        };
        self.order.push_back(space.clone());
        self.committed_at.insert(space.clone(), committed_at);
        match dropped {
            Some(space) => Insert::QueuedDroppingOldest(space),
            None => Insert::Queued,
        }
    }

    /// Spaces waiting (not counting the batch in flight).
    pub(super) fn pending(&self) -> usize {
        self.order.len()
    }

    pub(super) fn is_accepting(&self) -> bool {
        self.accepting
    }

    /// From now on `insert` refuses every space.
    pub(super) fn stop_accepting(&mut self) {
        self.accepting = false;
    }

    fn pop_oldest(&mut self) -> Option<PendingPoke> {
        let space = self.order.pop_front()?;
        let committed_at = self
            .committed_at
            .remove(&space)
            .unwrap_or_else(Instant::now);
        Some(PendingPoke {
            space,
            committed_at,
        })
    }

    /// Takes up to `max` of the oldest spaces; they count as in flight until `finish_batch`.
    pub(super) fn take_batch(&mut self, max: usize) -> Vec<PendingPoke> {
        let batch: Vec<PendingPoke> = std::iter::from_fn(|| self.pop_oldest()).take(max).collect();
        self.in_flight = batch.len();
        batch
    }

    pub(super) fn finish_batch(&mut self) {
        self.in_flight = 0;
    }

    /// Everything pending or in flight, forgotten; returns how many spaces that was.
    pub(super) fn abandon_all(&mut self) -> usize {
        let abandoned = self.order.len() + self.in_flight;
        self.order.clear();
        self.committed_at.clear();
        self.in_flight = 0;
        abandoned
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::poke::pusher::test_support::space;

    #[test]
    fn queue_deduplicates_keeps_the_earliest_commit_and_drops_the_oldest_when_full() {
        let mut queue = PokeQueue::new(2);
        let early = Instant::now();
        let late = early + Duration::from_secs(1);
        assert!(matches!(queue.insert(&space("a"), late), Insert::Queued));
        assert!(matches!(
            queue.insert(&space("a"), early),
            Insert::AlreadyPending
        ));
        assert!(matches!(queue.insert(&space("b"), late), Insert::Queued));
        match queue.insert(&space("c"), late) {
            Insert::QueuedDroppingOldest(dropped) => assert_eq!(dropped, space("a")),
            _ => panic!("a full queue must drop its oldest space"),
        }
        let batch = queue.take_batch(10);
        let spaces: Vec<&str> = batch.iter().map(|poke| poke.space.as_str()).collect();
        assert_eq!(spaces, ["b", "c"]);
        assert_eq!(queue.in_flight, 2);

        let mut queue = PokeQueue::new(5);
        queue.insert(&space("a"), late);
        queue.insert(&space("a"), early);
        assert_eq!(queue.take_batch(10)[0].committed_at, early);
    }

    #[test]
    fn a_stopped_queue_refuses_spaces_and_abandons_what_it_holds() {
        let mut queue = PokeQueue::new(5);
        queue.insert(&space("a"), Instant::now());
        queue.insert(&space("b"), Instant::now());
        let in_flight = queue.take_batch(1);
        assert_eq!(in_flight.len(), 1);
        queue.stop_accepting();
        assert!(!queue.is_accepting());
        assert!(matches!(
            queue.insert(&space("c"), Instant::now()),
            Insert::Refused
        ));
        assert_eq!(queue.pending(), 1);
        assert_eq!(queue.abandon_all(), 2);
        assert_eq!(queue.pending(), 0);
    }
}
