//! The reactor's timer queue: deadlines keyed by (service, key), ordered so
//! the earliest one sets the poll timeout.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;
use zbroker_services::TimerKey;

pub type TimerId = (usize, TimerKey);

#[derive(Default)]
pub struct Timers {
    by_deadline: BTreeMap<(Instant, u64), TimerId>,
    by_id: HashMap<TimerId, (Instant, u64)>,
    seq: u64,
}

impl Timers {
    /// Arms `id` at `at`, replacing any earlier deadline for it.
    pub fn set(&mut self, id: TimerId, at: Instant) {
        self.cancel(id);
        self.seq += 1;
        self.by_deadline.insert((at, self.seq), id);
        self.by_id.insert(id, (at, self.seq));
    }

    pub fn cancel(&mut self, id: TimerId) {
        if let Some(slot) = self.by_id.remove(&id) {
            self.by_deadline.remove(&slot);
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.keys().next().map(|(at, _)| *at)
    }

    /// A mark for [`Timers::pop_due`]: timers armed after it are left for
    /// a later pass.
    pub fn mark(&self) -> u64 {
        self.seq
    }

    /// Removes and returns the earliest timer due at `now` that was armed
    /// before `mark`, if any. A timer armed while timers fire, due at once
    /// (a service continuing its work on the next pass), waits for the next
    /// pass instead of making this one endless.
    pub fn pop_due(&mut self, now: Instant, mark: u64) -> Option<TimerId> {
        let (&slot, _) = self
            .by_deadline
            .iter()
            .take_while(|((at, _), _)| *at <= now)
            .find(|((_, seq), _)| *seq <= mark)?;
        let id = self.by_deadline.remove(&slot)?;
        self.by_id.remove(&id);
        Some(id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fires_in_deadline_order_and_replaces() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut timers = Timers::default();
        timers.set((0, 1), ms(30));
        timers.set((0, 2), ms(10));
        timers.set((1, 1), ms(20));
        timers.set((0, 1), ms(5)); // replaces the 30 ms deadline
        timers.cancel((1, 1));
        assert_eq!(timers.next_deadline(), Some(ms(5)));
        let mark = timers.mark();
        assert_eq!(timers.pop_due(ms(4), mark), None);
        assert_eq!(timers.pop_due(ms(100), mark), Some((0, 1)));
        assert_eq!(timers.pop_due(ms(100), mark), Some((0, 2)));
        assert_eq!(timers.pop_due(ms(100), mark), None);
        assert_eq!(timers.len(), 0);
    }

    #[test]
    fn a_timer_armed_while_firing_waits_for_the_next_pass() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.set((0, 1), t0);
        let mark = timers.mark();
        assert_eq!(timers.pop_due(t0, mark), Some((0, 1)));
        timers.set((0, 1), t0); // re-armed by its own firing, due at once
        assert_eq!(timers.pop_due(t0, mark), None, "not in this pass");
        assert_eq!(timers.pop_due(t0, timers.mark()), Some((0, 1)), "in the next");
    }
}
